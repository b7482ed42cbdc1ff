'use strict';
// Runs against a live llama-crab server: LLAMA_CRAB_SERVER=host:port npm test
// (LLAMA_CRAB_ADDR is read too; LLAMA_CRAB_TOKEN if the server requires one). Skipped when
// neither is set. The chat tests expect a model with a chat template (the test model,
// smollm2, has ChatML).

const test = require('node:test');
const assert = require('node:assert/strict');
const { LlamaCrabClient, LlamaCrabError, defaultAddress } = require('../index.js');

const ADDR = process.env.LLAMA_CRAB_SERVER || process.env.LLAMA_CRAB_ADDR ? defaultAddress() : null;
const skip = ADDR ? false : 'LLAMA_CRAB_SERVER is not set (host:port of a running llama-crab server)';

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
    // The first chunk carries the prompt's length; the partial Completion reports it.
    assert.ok(seen[0].prompt_tokens > 0);
    assert.equal(done.usage.prompt_tokens, seen[0].prompt_tokens);
    assert.equal(done.usage.completion_tokens, seen.flatMap((ch) => ch.token_ids).length);
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

test('typed sampler chains and JSON schemas travel as plain objects', { skip }, async () => {
  const c = client();
  try {
    // A chain that keeps one token is greedy, whatever the seed.
    const greedy = await c.complete('The capital of France is', { max_tokens: 8 });
    const chain = [{ top_k: { k: 1 } }, { temp: { t: 1.5 } }, { dist: {} }];
    for (const seed of [1, 2]) {
      const done = await c.complete('The capital of France is', { max_tokens: 8, seed, sampler_chain: chain });
      assert.deepEqual(done.token_ids, greedy.token_ids);
    }
    const schema = { type: 'object', properties: { n: { type: 'integer' } }, required: ['n'], additionalProperties: false };
    const json = await c.complete('A number as JSON: ', { max_tokens: 24, json_schema: JSON.stringify(schema) });
    assert.equal(typeof JSON.parse(json.text).n, 'number');
    await assert.rejects(
      c.complete('Hello', { max_tokens: 4, sampler_chain: [{ top_p: { p: 3 } }] }),
      (err) => err.field === 'sampler_chain[0].p',
    );
  } finally {
    c.close();
  }
});

const HELLO = [
  { role: 'system', content: 'You are a helpful assistant.' },
  { role: 'user', content: 'Say hello in one short sentence.' },
];

test('a streamed chat reply: content deltas join to the final message, OpenAI-shaped', { skip }, async () => {
  const c = client();
  try {
    const chunks = [];
    const done = await c.chat(HELLO, { max_tokens: 12 }, { onChunk: (ch) => chunks.push(ch) });
    assert.ok(chunks.length > 0);
    const first = chunks[0].toOpenAI();
    assert.equal(first.object, 'chat.completion.chunk');
    assert.match(first.id, /^chatcmpl-/);
    assert.equal(first.choices[0].delta.role, 'assistant');
    assert.deepEqual(Object.keys(first.choices[0]), ['index', 'delta', 'logprobs', 'finish_reason']);
    // Every chunk carries the first chunk's id, created, model and prompt length.
    for (const ch of chunks) {
      assert.equal(ch.id, done.id);
      assert.equal(ch.created, done.created);
      assert.equal(ch.model, done.model);
      assert.equal(ch.prompt_tokens, done.usage.prompt_tokens);
    }
    assert.equal(done.object, 'chat.completion');
    const [choice] = done.choices;
    assert.equal(choice.message.role, 'assistant');
    assert.ok(choice.message.content.length > 0);
    assert.equal(chunks.map((ch) => ch.delta.content || '').join(''), choice.message.content);
    assert.equal(choice.message.tool_calls, undefined);
    assert.ok(['stop', 'length'].includes(choice.finish_reason));
    assert.ok(done.usage.prompt_tokens > 0);
    assert.equal(done.usage.completion_tokens, chunks.flatMap((ch) => ch.token_ids).length);
    assert.equal(done.usage.total_tokens, done.usage.prompt_tokens + done.usage.completion_tokens);
    assert.equal(typeof done.usage.prompt_tokens_details.cached_tokens, 'number');
  } finally {
    c.close();
  }
});

test("chat: returning 'stop' after the first chunk gives exactly the delivered content, 'cancelled'", { skip }, async () => {
  const c = client();
  try {
    const seen = [];
    const done = await c.chat(
      [{ role: 'user', content: 'Tell me a long story about a dragon.' }],
      { max_tokens: 48 },
      {
        onChunk: (ch) => {
          seen.push(ch);
          return 'stop';
        },
      },
    );
    assert.equal(seen.length, 1);
    assert.equal(done.choices[0].finish_reason, 'cancelled');
    assert.ok(seen[0].delta.content); // greedy: the first chunk has reply text
    assert.equal(done.choices[0].message.content, seen[0].delta.content);
    assert.equal(done.id, seen[0].id);
    assert.equal(done.usage.prompt_tokens, seen[0].prompt_tokens);
    assert.ok(done.usage.prompt_tokens > 0);
    assert.equal(done.usage.completion_tokens, seen[0].token_ids.length);
    // The server keeps serving after a cancel.
    const next = await c.chat(HELLO, { max_tokens: 4 });
    assert.ok(next.usage.completion_tokens > 0);
  } finally {
    c.close();
  }
});

test('chat: an unknown role fails with INVALID_ARGUMENT naming messages[0].role', { skip }, async () => {
  const c = client();
  try {
    await assert.rejects(c.chat([{ role: 'wizard', content: 'Hi' }], { max_tokens: 4 }), (err) => {
      assert.ok(err instanceof LlamaCrabError);
      assert.equal(err.status, 'INVALID_ARGUMENT');
      assert.equal(err.field, 'messages[0].role');
      return true;
    });
  } finally {
    c.close();
  }
});
