'use strict';
// Chat conversions and the stream logic, without a model: pure functions, then the
// client against a scripted in-process gRPC server (tool-call deltas, STOP, errors).

const test = require('node:test');
const assert = require('node:assert/strict');
const grpc = require('@grpc/grpc-js');
const {
  LlamaCrabClient,
  ChatStreamHeader,
  chatRequest,
  defaultAddress,
  deliveredChatCompletion,
  messageFromDeltas,
  proto,
} = require('../index.js');

const chatMethod = proto.LlamaCrabService.service.Chat;
// A proto message as the client receives it (encoded and decoded as on the wire).
const wire = (response) => chatMethod.responseDeserialize(chatMethod.responseSerialize(response));

test('defaultAddress: LLAMA_CRAB_SERVER, else LLAMA_CRAB_ADDR, else localhost:50051', () => {
  assert.equal(defaultAddress({ LLAMA_CRAB_SERVER: 'a:1', LLAMA_CRAB_ADDR: 'b:2' }), 'a:1');
  assert.equal(defaultAddress({ LLAMA_CRAB_ADDR: 'b:2' }), 'b:2');
  assert.equal(defaultAddress({}), 'localhost:50051');
});

test('chatRequest converts OpenAI-shaped messages, tools, tool_choice and response_format', () => {
  const schema = { type: 'object', properties: { city: { type: 'string' } }, required: ['city'] };
  const request = chatRequest(
    [
      { role: 'system', content: 'Be brief.' },
      { role: 'user', content: [{ type: 'text', text: 'Weather in ' }, { type: 'text', text: 'Paris?' }] },
      {
        role: 'assistant',
        content: null,
        tool_calls: [{ id: 'call_1', type: 'function', function: { name: 'get_weather', arguments: { city: 'Paris' } } }],
      },
      { role: 'tool', content: '{"temp": 21}', tool_call_id: 'call_1', name: 'get_weather' },
    ],
    { max_tokens: 8 },
    {
      tools: [{ type: 'function', function: { name: 'get_weather', description: 'Weather now', parameters: schema } }],
      tool_choice: { type: 'function', function: { name: 'get_weather' } },
      parallel_tool_calls: true,
    },
  );
  // It encodes, and reads back as the server would see it.
  const seen = chatMethod.requestDeserialize(chatMethod.requestSerialize(request));
  assert.equal(seen.messages.length, 4);
  assert.equal(seen.messages[1].content, 'Weather in Paris?');
  assert.equal(seen.messages[2].content, undefined); // unset: an assistant message with only calls
  assert.deepEqual(seen.messages[2].tool_calls, [{ id: 'call_1', name: 'get_weather', arguments: '{"city":"Paris"}' }]);
  assert.equal(seen.messages[3].tool_call_id, 'call_1');
  assert.equal(seen.messages[3].name, 'get_weather');
  assert.deepEqual(seen.tools, [{ name: 'get_weather', description: 'Weather now', parameters: JSON.stringify(schema) }]);
  assert.equal(seen.tool_choice, 'get_weather');
  assert.equal(seen.parallel_tool_calls, true);
  assert.equal(seen.response_format, null);
  assert.equal(seen.options.max_tokens, 8);

  assert.equal(chatRequest([], {}, { tool_choice: 'required' }).tool_choice, 'required');
  assert.equal(chatRequest([], {}).tool_choice, 'auto');
  assert.deepEqual(
    chatRequest([], {}, { response_format: { type: 'json_schema', json_schema: { name: 'weather', schema } } }).response_format,
    { type: 'json_schema', schema: JSON.stringify(schema), name: 'weather' },
  );
  assert.deepEqual(chatRequest([], {}, { response_format: { type: 'json_object' } }).response_format, {
    type: 'json_object',
    schema: '',
    name: 'response',
  });
  // A tool without parameters takes no arguments (an empty object schema).
  assert.deepEqual(JSON.parse(chatRequest([], {}, { tools: [{ type: 'function', function: { name: 'now' } }] }).tools[0].parameters), {
    type: 'object',
    properties: {},
  });
});

test('ChatStreamHeader copies the first chunk id/created/model/prompt_tokens onto later chunks', () => {
  const header = new ChatStreamHeader();
  const first = header.chunk(
    wire({
      chunk: {
        delta: { role: 'assistant', content: 'Hel' },
        token_ids: [1, 2],
        n_tokens: 2,
        id: 'chatcmpl-x',
        created: 1700000000,
        model: 'm',
        prompt_tokens: 9,
      },
    }).chunk,
  );
  const second = header.chunk(wire({ chunk: { delta: { content: 'lo' }, token_ids: [3], n_tokens: 3 } }).chunk);
  const empty = header.chunk(wire({ chunk: { delta: { content: '' }, token_ids: [4], n_tokens: 4 } }).chunk);
  for (const c of [first, second, empty]) {
    assert.equal(c.id, 'chatcmpl-x');
    assert.equal(c.created, 1700000000);
    assert.equal(c.model, 'm');
    assert.equal(c.prompt_tokens, 9);
  }
  assert.deepEqual(first.toOpenAI(), {
    id: 'chatcmpl-x',
    object: 'chat.completion.chunk',
    created: 1700000000,
    model: 'm',
    choices: [{ index: 0, delta: { role: 'assistant', content: 'Hel' }, logprobs: null, finish_reason: null }],
  });
  assert.deepEqual(second.delta, { content: 'lo' });
  assert.deepEqual(empty.delta, { content: '' }); // set-but-empty content stays set
  assert.deepEqual(second.token_ids, [3]);
  assert.equal(second.n_tokens, 3);
});

test('tool-call deltas: OpenAI shape per chunk, joined by index into complete calls', () => {
  const header = new ChatStreamHeader();
  const messages = [
    { chunk: { delta: { role: 'assistant' }, token_ids: [1], id: 'chatcmpl-t', created: 5, model: 'q', prompt_tokens: 30 } },
    { chunk: { delta: { tool_calls: [{ index: 0, id: 'call_a', name: 'get_weather', arguments: '{"ci' }] }, token_ids: [2, 3] } },
    { chunk: { delta: { tool_calls: [{ index: 1, id: 'call_b', name: 'get_time', arguments: '' }] }, token_ids: [4] } },
    { chunk: { delta: { tool_calls: [{ index: 0, arguments: 'ty": "Paris"}' }] }, token_ids: [5] } },
    { chunk: { delta: { tool_calls: [{ index: 1, arguments: '{}' }] }, token_ids: [6] } },
  ];
  const chunks = messages.map((m) => header.chunk(wire(m).chunk));
  assert.deepEqual(chunks[1].toOpenAI().choices[0].delta, {
    tool_calls: [{ index: 0, id: 'call_a', type: 'function', function: { name: 'get_weather', arguments: '{"ci' } }],
  });
  assert.deepEqual(chunks[3].delta, { tool_calls: [{ index: 0, function: { arguments: 'ty": "Paris"}' } }] });

  assert.deepEqual(messageFromDeltas(chunks.map((c) => c.delta)), {
    role: 'assistant',
    content: null, // only tool calls
    tool_calls: [
      { id: 'call_a', type: 'function', function: { name: 'get_weather', arguments: '{"city": "Paris"}' } },
      { id: 'call_b', type: 'function', function: { name: 'get_time', arguments: '{}' } },
    ],
  });
  // Cut short after the first argument piece: exactly what was delivered.
  const cut = deliveredChatCompletion(chunks.slice(0, 2), header);
  assert.deepEqual(cut, {
    id: 'chatcmpl-t',
    object: 'chat.completion',
    created: 5,
    model: 'q',
    choices: [
      {
        index: 0,
        message: {
          role: 'assistant',
          content: null,
          tool_calls: [{ id: 'call_a', type: 'function', function: { name: 'get_weather', arguments: '{"ci' } }],
        },
        logprobs: null,
        finish_reason: 'cancelled',
      },
    ],
    usage: { prompt_tokens: 30, completion_tokens: 3, total_tokens: 33, prompt_tokens_details: { cached_tokens: 0 } },
  });
});

test('messageFromDeltas: content and reasoning joined; content "" without deltas', () => {
  assert.deepEqual(messageFromDeltas([{ role: 'assistant' }, { reasoning_content: 'hm' }, { content: 'a' }, { content: 'b' }]), {
    role: 'assistant',
    content: 'ab',
    reasoning_content: 'hm',
  });
  assert.deepEqual(messageFromDeltas([]), { role: 'assistant', content: '' });
  const none = deliveredChatCompletion([]);
  assert.match(none.id, /^chatcmpl-/);
  assert.equal(none.choices[0].finish_reason, 'cancelled');
  assert.equal(none.usage.completion_tokens, 0);
});

// ---- the client against a scripted server ----------------------------------------------

/** Start a server whose Chat answers with `script(call)`; resolves with its address. */
async function scriptedServer(script) {
  const server = new grpc.Server();
  const received = [];
  server.addService(proto.LlamaCrabService.service, {
    Chat: (call) => {
      received.push(call.request);
      script(call);
    },
  });
  const port = await new Promise((resolve, reject) =>
    server.bindAsync('127.0.0.1:0', grpc.ServerCredentials.createInsecure(), (err, p) => (err ? reject(err) : resolve(p))),
  );
  return { address: `127.0.0.1:${port}`, server, received };
}

const TOOL_STREAM = [
  { chunk: { delta: { role: 'assistant' }, token_ids: [1], n_tokens: 1, id: 'chatcmpl-s', created: 7, model: 'qwen', prompt_tokens: 40 } },
  { chunk: { delta: { tool_calls: [{ index: 0, id: 'call_1', name: 'get_weather', arguments: '{"city"' }] }, token_ids: [2], n_tokens: 2 } },
  { chunk: { delta: { tool_calls: [{ index: 0, arguments: ': "Paris"}' }] }, token_ids: [3, 4], n_tokens: 4 } },
];
const TOOL_FINAL = {
  completion: {
    id: 'chatcmpl-s',
    created: 7,
    model: 'qwen',
    message: { role: 'assistant', tool_calls: [{ id: 'call_1', name: 'get_weather', arguments: '{"city": "Paris"}' }] },
    finish_reason: 'tool_calls',
    usage: { prompt_tokens: 40, completion_tokens: 4, cached_tokens: 8 },
    timings: { total_ms: 12 },
  },
};

test('chat streams chunks then resolves with the OpenAI-shaped completion', async () => {
  const { address, server, received } = await scriptedServer((call) => {
    for (const m of TOOL_STREAM) call.write(m);
    call.write(TOOL_FINAL);
    call.end();
  });
  const client = new LlamaCrabClient(address);
  try {
    const seen = [];
    const done = await client.chat([{ role: 'user', content: 'Weather in Paris?' }], { max_tokens: 32 }, {
      tools: [{ type: 'function', function: { name: 'get_weather', parameters: { type: 'object' } } }],
      tool_choice: 'required',
      onChunk: (c) => seen.push(c.toOpenAI()),
    });
    assert.equal(received[0].tool_choice, 'required');
    assert.equal(received[0].tools[0].parameters, '{"type":"object"}');
    assert.equal(seen.length, 3);
    assert.ok(seen.every((c) => c.id === 'chatcmpl-s' && c.created === 7 && c.model === 'qwen'));
    assert.deepEqual(done, {
      id: 'chatcmpl-s',
      object: 'chat.completion',
      created: 7,
      model: 'qwen',
      choices: [
        {
          index: 0,
          message: {
            role: 'assistant',
            content: null,
            tool_calls: [{ id: 'call_1', type: 'function', function: { name: 'get_weather', arguments: '{"city": "Paris"}' } }],
          },
          logprobs: null,
          finish_reason: 'tool_calls',
        },
      ],
      usage: { prompt_tokens: 40, completion_tokens: 4, total_tokens: 44, prompt_tokens_details: { cached_tokens: 8 } },
    });
    assert.equal(done.timings.total_ms, 12); // not enumerable: the shape above stays OpenAI's
    assert.equal(JSON.stringify(done).includes('timings'), false);
  } finally {
    client.close();
    server.forceShutdown();
  }
});

test("chat: 'stop' cancels the call and resolves with exactly the delivered deltas", async () => {
  let cancelled;
  const wasCancelled = new Promise((resolve) => (cancelled = resolve));
  const { address, server } = await scriptedServer((call) => {
    call.on('cancelled', () => cancelled(true));
    call.write(TOOL_STREAM[0]);
    call.write(TOOL_STREAM[1]);
    // ... and never finishes on its own.
  });
  const client = new LlamaCrabClient(address);
  try {
    const seen = [];
    const done = await client.chat([{ role: 'user', content: 'Weather?' }], {}, {
      onChunk: (c) => {
        seen.push(c);
        return seen.length === 2 ? 'stop' : undefined;
      },
    });
    assert.equal(await wasCancelled, true);
    assert.equal(done.choices[0].finish_reason, 'cancelled');
    assert.deepEqual(done.choices[0].message, {
      role: 'assistant',
      content: null,
      tool_calls: [{ id: 'call_1', type: 'function', function: { name: 'get_weather', arguments: '{"city"' } }],
    });
    assert.equal(done.id, 'chatcmpl-s');
    assert.deepEqual(done.usage, { prompt_tokens: 40, completion_tokens: 2, total_tokens: 42, prompt_tokens_details: { cached_tokens: 0 } });
  } finally {
    client.close();
    server.forceShutdown();
  }
});

test('chat: an AbortSignal stops the stream like returning stop', async () => {
  const { address, server } = await scriptedServer((call) => {
    call.write({ chunk: { delta: { role: 'assistant', content: 'Hi' }, token_ids: [1], id: 'chatcmpl-a', created: 1, model: 'm', prompt_tokens: 3 } });
  });
  const client = new LlamaCrabClient(address);
  try {
    const abort = new AbortController();
    const done = await client.chat([{ role: 'user', content: 'x' }], {}, { signal: abort.signal, onChunk: () => abort.abort() });
    assert.equal(done.choices[0].finish_reason, 'cancelled');
    assert.equal(done.choices[0].message.content, 'Hi');
    assert.equal(done.usage.prompt_tokens, 3);
  } finally {
    client.close();
    server.forceShutdown();
  }
});

test('chat: a stream that ends without a completion rejects with INTERNAL', async () => {
  const { address, server } = await scriptedServer((call) => {
    call.write(TOOL_STREAM[0]);
    call.end();
  });
  const client = new LlamaCrabClient(address);
  try {
    await assert.rejects(client.chat([{ role: 'user', content: 'x' }]), (err) => err.status === 'INTERNAL');
  } finally {
    client.close();
    server.forceShutdown();
  }
});
