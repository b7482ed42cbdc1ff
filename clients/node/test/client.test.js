'use strict';
// Runs against a live llama-crab server: LLAMA_CRAB_ADDR=host:port npm test
// (LLAMA_CRAB_TOKEN too if the server requires one). Skipped when LLAMA_CRAB_ADDR is unset.

const test = require('node:test');
const assert = require('node:assert/strict');
const { LlamaCrabClient, LlamaCrabError } = require('../index.js');

const ADDR = process.env.LLAMA_CRAB_ADDR;
const skip = ADDR ? false : 'LLAMA_CRAB_ADDR is not set (host:port of a running llama-crab server)';

function client() {
  return new LlamaCrabClient(ADDR, { token: process.env.LLAMA_CRAB_TOKEN, timeoutMs: 60000 });
}

test('GetModel describes the served model', { skip }, async () => {
  const c = client();
  try {
    const model = await c.model();
    assert.ok(model.name.length > 0);
    assert.ok(model.n_vocab > 0);
    assert.ok(model.n_slots >= 1);
  } finally {
    c.close();
  }
});

test('Tokenize and Detokenize round-trip', { skip }, async () => {
  const c = client();
  try {
    const tokens = await c.tokenize('Hello world', { addSpecial: false });
    assert.ok(tokens.length > 0);
    assert.equal(await c.detokenize(tokens), 'Hello world');
  } finally {
    c.close();
  }
});

test('a streamed completion: chunks then one Completion that concatenates them', { skip }, async () => {
  const c = client();
  try {
    const chunks = [];
    const done = await c.complete('The capital of France is', { max_tokens: 12 }, { onChunk: (ch) => chunks.push(ch) });
    assert.ok(chunks.length > 0);
    assert.equal(chunks.map((ch) => ch.text).join(''), done.text);
    assert.deepEqual(chunks.flatMap((ch) => ch.token_ids), done.token_ids);
    assert.ok(['STOP_REASON_LENGTH', 'STOP_REASON_EOS'].includes(done.stop_reason));
    assert.equal(done.usage.completion_tokens, done.token_ids.length);
    assert.ok(done.usage.prompt_tokens > 0);
  } finally {
    c.close();
  }
});

test("returning 'stop' cancels and the Completion holds exactly the delivered chunks", { skip }, async () => {
  const c = client();
  try {
    const seen = [];
    const done = await c.complete(
      'Once upon a time',
      { max_tokens: 64 },
      {
        onChunk: (ch) => {
          seen.push(ch);
          return seen.length === 2 ? 'stop' : undefined;
        },
      },
    );
    assert.equal(seen.length, 2);
    assert.equal(done.stop_reason, 'STOP_REASON_CANCELLED');
    assert.equal(done.text, seen.map((ch) => ch.text).join(''));
    // The server keeps serving after a cancel.
    const next = await c.complete('Hello', { max_tokens: 4 });
    assert.ok(next.token_ids.length > 0);
  } finally {
    c.close();
  }
});

test('invalid options fail with INVALID_ARGUMENT naming the field', { skip }, async () => {
  const c = client();
  try {
    await assert.rejects(c.complete('Hello', { max_tokens: 0 }), (err) => {
      assert.ok(err instanceof LlamaCrabError);
      assert.equal(err.status, 'INVALID_ARGUMENT');
      assert.equal(err.field, 'max_tokens');
      return true;
    });
    await assert.rejects(c.complete('Hello', { max_tokens: 4, top_p: 2 }), (err) => err.field === 'top_p');
  } finally {
    c.close();
  }
});
