// Runs against a live llama-crab server: LLAMA_CRAB_SERVER=host:port npm test
// (LLAMA_CRAB_ADDR is read too; LLAMA_CRAB_TOKEN if the server requires one). Skipped when
// neither is set. The chat tests expect a model with a chat template (the test model,
// smollm2, has ChatML).

import assert from 'node:assert/strict';
import test from 'node:test';

import {
  InvalidArgumentError,
  LlamaCrabClient,
  LlamaCrabError,
  StopReason,
  StreamControl,
  defaultAddress,
  type Chunk,
  type ChatChunk,
  type MessageParam,
} from '../src/index';

const ADDR = process.env.LLAMA_CRAB_SERVER || process.env.LLAMA_CRAB_ADDR ? defaultAddress() : null;
const skip = ADDR ? false : 'LLAMA_CRAB_SERVER is not set (host:port of a running llama-crab server)';

async function withClient(fn: (c: LlamaCrabClient) => Promise<void>): Promise<void> {
  const c = new LlamaCrabClient(ADDR ?? undefined, { token: process.env.LLAMA_CRAB_TOKEN, timeoutMs: 60000 });
  try {
    await fn(c);
  } finally {
    c.close();
  }
}

test('GetModel describes the served model', { skip }, () =>
  withClient(async (c) => {
    const model = await c.model();
    assert.ok(model.name.length > 0);
    assert.ok(model.nVocab > 0);
    assert.ok(model.nSlots >= 1);
  }));

test('Tokenize and Detokenize round-trip', { skip }, () =>
  withClient(async (c) => {
    const tokens = await c.tokenize('Hello world', { addSpecial: false });
    assert.ok(tokens.length > 0);
    assert.equal(await c.detokenize(tokens), 'Hello world');
  }));

test('a stream: chunks, then one Completion that concatenates them', { skip }, () =>
  withClient(async (c) => {
    const stream = c.stream('The capital of France is', { maxTokens: 12 });
    const chunks: Chunk[] = [];
    for await (const chunk of stream) chunks.push(chunk);
    const done = await stream.completion;
    assert.ok(chunks.length > 0);
    assert.equal(chunks.map((ch) => ch.text).join(''), done.text);
    assert.deepEqual(chunks.flatMap((ch) => ch.tokenIds), done.tokenIds);
    assert.ok([StopReason.LENGTH, StopReason.EOS].includes(done.stopReason));
    assert.equal(done.usage?.completionTokens, done.tokenIds.length);
    assert.ok((done.usage?.promptTokens ?? 0) > 0);
  }));

test('breaking out of the loop is STOP: the Completion holds exactly the delivered chunks', { skip }, () =>
  withClient(async (c) => {
    const stream = c.stream('Once upon a time', { maxTokens: 64 });
    const seen: Chunk[] = [];
    for await (const chunk of stream) {
      seen.push(chunk);
      if (seen.length === 2) break;
    }
    const done = await stream.completion;
    assert.equal(seen.length, 2);
    assert.equal(done.stopReason, StopReason.CANCELLED);
    assert.equal(done.text, seen.map((ch) => ch.text).join(''));
    // The first chunk carries the prompt's length; the partial Completion reports it.
    assert.ok(seen[0].promptTokens > 0);
    assert.equal(done.usage?.promptTokens, seen[0].promptTokens);
    assert.equal(done.usage?.completionTokens, seen.flatMap((ch) => ch.tokenIds).length);
    // The server keeps serving after a cancel.
    const next = await c.complete('Hello', { maxTokens: 4 });
    assert.ok(next.tokenIds.length > 0);
  }));

test('onChunk returning STOP, or an AbortSignal, stops complete() alike', { skip }, () =>
  withClient(async (c) => {
    const byControl = await c.complete('Once upon a time', { maxTokens: 64 }, { onChunk: () => StreamControl.STOP });
    const abort = new AbortController();
    const bySignal = await c.complete('Once upon a time', { maxTokens: 64 }, { signal: abort.signal, onChunk: () => abort.abort() });
    for (const done of [byControl, bySignal]) {
      assert.equal(done.stopReason, StopReason.CANCELLED);
      assert.ok(done.tokenIds.length > 0 && done.tokenIds.length < 64);
    }
  }));

test('invalid options fail with a typed InvalidArgumentError naming the field', { skip }, () =>
  withClient(async (c) => {
    await assert.rejects(c.complete('Hello', { maxTokens: 0 }), (err: unknown) => {
      assert.ok(err instanceof InvalidArgumentError && err instanceof LlamaCrabError);
      assert.equal(err.status, 'INVALID_ARGUMENT');
      assert.equal(err.field, 'max_tokens');
      return true;
    });
    // A stream that is refused rejects its iteration and its completion alike.
    const stream = c.stream('Hello', { maxTokens: 4, topP: 2 });
    await assert.rejects(
      (async () => {
        for await (const _ of stream) assert.fail('no chunk expected');
      })(),
      (err: unknown) => err instanceof InvalidArgumentError && err.field === 'top_p',
    );
    await assert.rejects(stream.completion, InvalidArgumentError);
  }));

test('typed sampler chains and JSON schemas', { skip }, () =>
  withClient(async (c) => {
    // A chain that keeps one token is greedy, whatever the seed.
    const greedy = await c.complete('The capital of France is', { maxTokens: 8 });
    for (const seed of [1, 2]) {
      const done = await c.complete('The capital of France is', {
        maxTokens: 8,
        seed,
        samplerChain: [{ stage: { case: 'topK', value: { k: 1 } } }, { stage: { case: 'temp', value: { t: 1.5 } } }, { stage: { case: 'dist', value: {} } }],
      });
      assert.deepEqual(done.tokenIds, greedy.tokenIds);
    }
    const schema = { type: 'object', properties: { n: { type: 'integer' } }, required: ['n'], additionalProperties: false };
    const json = await c.complete('A number as JSON: ', { maxTokens: 24, jsonSchema: JSON.stringify(schema) });
    assert.equal(typeof JSON.parse(json.text).n, 'number');
    await assert.rejects(
      c.complete('Hello', { maxTokens: 4, samplerChain: [{ stage: { case: 'topP', value: { p: 3 } } }] }),
      (err: unknown) => err instanceof InvalidArgumentError && err.field === 'sampler_chain[0].p',
    );
  }));

test('a session continues one token history across calls', { skip }, () =>
  withClient(async (c) => {
    const session = c.session();
    const first = await session.complete('Q: What is 2+2?\nA:', { maxTokens: 4 });
    const afterFirst = [...session.tokens];
    assert.deepEqual(afterFirst.slice(-first.tokenIds.length), first.tokenIds);
    const second = await session.complete('\nQ: And 3+3?\nA:', { maxTokens: 4 });
    // The second prompt was the whole history plus the new text, prefilled from the cache.
    assert.deepEqual(session.tokens.slice(0, afterFirst.length), afterFirst);
    assert.equal(second.usage?.promptTokens, session.tokens.length - second.tokenIds.length);
    assert.ok((second.usage?.cachedTokens ?? 0) >= afterFirst.length - 1);
    // Token ids held on the client: a new session from them continues the same history.
    const resumed = c.session(session.tokens);
    const third = await resumed.complete('\nQ: And 4+4?\nA:', { maxTokens: 2 });
    assert.ok(third.tokenIds.length > 0);
  }));

const HELLO: MessageParam[] = [
  { role: 'system', content: 'You are a helpful assistant.' },
  { role: 'user', content: 'Say hello in one short sentence.' },
];

test('a streamed chat reply: content deltas join to the final message, OpenAI-shaped', { skip }, () =>
  withClient(async (c) => {
    const chunks: ChatChunk[] = [];
    const done = await c.chat(HELLO, { maxTokens: 12 }, { onChunk: (ch) => void chunks.push(ch) });
    assert.ok(chunks.length > 0);
    assert.match(chunks[0].id, /^chatcmpl-/);
    assert.equal(chunks[0].delta.role, 'assistant');
    for (const ch of chunks) {
      assert.equal(ch.id, done.id);
      assert.equal(ch.created, done.created);
      assert.equal(ch.model, done.model);
      assert.equal(ch.promptTokens, done.usage.prompt_tokens);
    }
    assert.equal(done.object, 'chat.completion');
    const [choice] = done.choices;
    assert.equal(choice.message.role, 'assistant');
    assert.ok((choice.message.content ?? '').length > 0);
    assert.equal(chunks.map((ch) => ch.delta.content ?? '').join(''), choice.message.content);
    assert.equal(choice.message.tool_calls, undefined);
    assert.ok(['stop', 'length'].includes(choice.finish_reason));
    assert.equal(done.usage.completion_tokens, chunks.flatMap((ch) => ch.tokenIds).length);
    assert.equal(done.usage.total_tokens, done.usage.prompt_tokens + done.usage.completion_tokens);
  }));

test('chat: an unknown role fails with InvalidArgumentError naming messages[0].role', { skip }, () =>
  withClient(async (c) => {
    await assert.rejects(c.chat([{ role: 'wizard', content: 'Hi' }], { maxTokens: 4 }), (err: unknown) => {
      assert.ok(err instanceof InvalidArgumentError);
      assert.equal(err.field, 'messages[0].role');
      return true;
    });
  }));

test('Embed: one normalised vector per input, per-token vectors with pooling none', { skip }, () =>
  withClient(async (c) => {
    const model = await c.model();
    const reply = await c.embed(['The sky is blue.', [1, 2, 3]]);
    assert.equal(reply.embeddings.length, 2);
    assert.equal(reply.dimensions, model.nEmbd);
    assert.equal(reply.usage?.promptTokens, reply.embeddings[0].promptTokens + 3);
    for (const e of reply.embeddings) {
      assert.equal(e.vector.length, model.nEmbd);
      assert.ok(Math.abs(Math.hypot(...e.vector) - 1) < 1e-4);
    }
    const tokens = await c.embed(['The sky is blue.'], { pooling: 'none', normalize: false });
    const first = tokens.embeddings[0];
    assert.equal(first.vector.length, 0);
    assert.equal(first.tokenVectors.length, first.promptTokens);
    // The model's pooling here is the last token's vector.
    const last = first.tokenVectors[first.tokenVectors.length - 1].values;
    const norm = Math.hypot(...last);
    reply.embeddings[0].vector.forEach((x, i) => assert.ok(Math.abs(x - last[i] / norm) < 1e-4));
    await assert.rejects(c.embed(['fine', '']), (err: unknown) => err instanceof InvalidArgumentError && err.field === 'inputs[1]');
    await assert.rejects(c.embed(['x'], { pooling: 'cls' }), (err: unknown) => err instanceof InvalidArgumentError && err.field === 'pooling');
  }));

test('an infill prompt reaches the server: a model without FIM tokens refuses it naming infill', { skip }, () =>
  withClient(async (c) => {
    const model = await c.model();
    assert.equal(model.supportsInfill, false);
    await assert.rejects(
      c.complete({ infill: { prefix: 'def f():\n    ', suffix: '\n', indent: 4 } }, { maxTokens: 8 }),
      (err: unknown) => err instanceof InvalidArgumentError && err.field === 'infill',
    );
  }));
