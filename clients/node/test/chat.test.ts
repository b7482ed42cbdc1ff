// Chat conversions and the stream logic, without a model: pure functions, then the client
// against a scripted in-process gRPC server (tool-call deltas, STOP, errors).

import assert from 'node:assert/strict';
import test from 'node:test';

import { create, fromBinary, toBinary, type MessageInitShape } from '@bufbuild/protobuf';
import { Server, ServerCredentials, type ServerWritableStream } from '@grpc/grpc-js';

import {
  ChatStreamHeader,
  InternalError,
  LlamaCrabClient,
  StreamControl,
  chatRequest,
  defaultAddress,
  deliveredChatCompletion,
  messageFromDeltas,
  proto,
  type MessageParam,
} from '../src/index';

type ChatResponseInit = MessageInitShape<typeof proto.ChatResponseSchema>;

/** A ChatResponse as the client receives it (encoded and decoded as on the wire). */
function wire(init: ChatResponseInit): proto.ChatChunk {
  const m = fromBinary(proto.ChatResponseSchema, toBinary(proto.ChatResponseSchema, create(proto.ChatResponseSchema, init)));
  assert.equal(m.response.case, 'chunk');
  return m.response.value as proto.ChatChunk;
}

const chunk = (c: MessageInitShape<typeof proto.ChatChunkSchema>): ChatResponseInit => ({ response: { case: 'chunk', value: c } });

test('defaultAddress: LLAMA_CRAB_SERVER, else LLAMA_CRAB_ADDR, else localhost:50051', () => {
  assert.equal(defaultAddress({ LLAMA_CRAB_SERVER: 'a:1', LLAMA_CRAB_ADDR: 'b:2' }), 'a:1');
  assert.equal(defaultAddress({ LLAMA_CRAB_ADDR: 'b:2' }), 'b:2');
  assert.equal(defaultAddress({}), 'localhost:50051');
});

test('chatRequest converts OpenAI-shaped messages, tools, tool_choice and response_format', () => {
  const schema = { type: 'object', properties: { city: { type: 'string' } }, required: ['city'] };
  const messages: MessageParam[] = [
    { role: 'system', content: 'Be brief.' },
    { role: 'user', content: [{ type: 'text', text: 'Weather in ' }, { type: 'text', text: 'Paris?' }] },
    {
      role: 'assistant',
      content: null,
      tool_calls: [{ id: 'call_1', type: 'function', function: { name: 'get_weather', arguments: { city: 'Paris' } } }],
    },
    { role: 'tool', content: '{"temp": 21}', tool_call_id: 'call_1', name: 'get_weather' },
  ];
  const request = chatRequest(messages, { maxTokens: 8 }, {
    tools: [{ type: 'function', function: { name: 'get_weather', description: 'Weather now', parameters: schema } }],
    tool_choice: { type: 'function', function: { name: 'get_weather' } },
    parallel_tool_calls: true,
  });
  // It encodes, and reads back as the server would see it.
  const seen = fromBinary(proto.ChatRequestSchema, toBinary(proto.ChatRequestSchema, request));
  assert.equal(seen.messages.length, 4);
  assert.equal(seen.messages[1].content, 'Weather in Paris?');
  assert.equal(seen.messages[2].content, undefined); // unset: an assistant message with only calls
  assert.deepEqual(
    seen.messages[2].toolCalls.map((c) => [c.id, c.name, c.arguments]),
    [['call_1', 'get_weather', '{"city":"Paris"}']],
  );
  assert.equal(seen.messages[3].toolCallId, 'call_1');
  assert.equal(seen.messages[3].name, 'get_weather');
  assert.deepEqual(
    seen.tools.map((t) => [t.name, t.description, t.parameters]),
    [['get_weather', 'Weather now', JSON.stringify(schema)]],
  );
  assert.equal(seen.toolChoice, 'get_weather');
  assert.equal(seen.parallelToolCalls, true);
  assert.equal(seen.responseFormat, undefined);
  assert.equal(seen.options?.maxTokens, 8);

  assert.equal(chatRequest([], {}, { tool_choice: 'required' }).toolChoice, 'required');
  assert.equal(chatRequest([], {}).toolChoice, 'auto');
  const rf = chatRequest([], {}, { response_format: { type: 'json_schema', json_schema: { name: 'weather', schema } } }).responseFormat;
  assert.deepEqual([rf?.type, rf?.schema, rf?.name], ['json_schema', JSON.stringify(schema), 'weather']);
  const obj = chatRequest([], {}, { response_format: { type: 'json_object' } }).responseFormat;
  assert.deepEqual([obj?.type, obj?.schema, obj?.name], ['json_object', '', 'response']);
  // A tool without parameters takes no arguments (an empty object schema).
  assert.deepEqual(JSON.parse(chatRequest([], {}, { tools: [{ type: 'function', function: { name: 'now' } }] }).tools[0].parameters), {
    type: 'object',
    properties: {},
  });
});

test('ChatStreamHeader copies the first chunk id/created/model/prompt_tokens onto later chunks', () => {
  const header = new ChatStreamHeader();
  const first = header.chunk(
    wire(chunk({ delta: { role: 'assistant', content: 'Hel' }, tokenIds: [1, 2], nTokens: 2, id: 'chatcmpl-x', created: 1700000000n, model: 'm', promptTokens: 9 })),
  );
  const second = header.chunk(wire(chunk({ delta: { content: 'lo' }, tokenIds: [3], nTokens: 3 })));
  const empty = header.chunk(wire(chunk({ delta: { content: '' }, tokenIds: [4], nTokens: 4 })));
  for (const c of [first, second, empty]) {
    assert.equal(c.id, 'chatcmpl-x');
    assert.equal(c.created, 1700000000);
    assert.equal(c.model, 'm');
    assert.equal(c.promptTokens, 9);
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
  assert.deepEqual(second.tokenIds, [3]);
  assert.equal(second.nTokens, 3);
});

const TOOL_STREAM: ChatResponseInit[] = [
  chunk({ delta: { role: 'assistant' }, tokenIds: [1], nTokens: 1, id: 'chatcmpl-s', created: 7n, model: 'qwen', promptTokens: 40 }),
  chunk({ delta: { toolCalls: [{ index: 0, id: 'call_1', name: 'get_weather', arguments: '{"city"' }] }, tokenIds: [2], nTokens: 2 }),
  chunk({ delta: { toolCalls: [{ index: 0, arguments: ': "Paris"}' }] }, tokenIds: [3, 4], nTokens: 4 }),
];
const TOOL_FINAL: ChatResponseInit = {
  response: {
    case: 'completion',
    value: {
      id: 'chatcmpl-s',
      created: 7n,
      model: 'qwen',
      message: { role: 'assistant', toolCalls: [{ id: 'call_1', name: 'get_weather', arguments: '{"city": "Paris"}' }] },
      finishReason: 'tool_calls',
      usage: { promptTokens: 40, completionTokens: 4, cachedTokens: 8 },
      timings: { totalMs: 12 },
    },
  },
};

test('tool-call deltas: OpenAI shape per chunk, joined by index into complete calls', () => {
  const header = new ChatStreamHeader();
  const chunks = [
    ...TOOL_STREAM,
    chunk({ delta: { toolCalls: [{ index: 1, id: 'call_b', name: 'get_time', arguments: '' }] }, tokenIds: [5] }),
    chunk({ delta: { toolCalls: [{ index: 1, arguments: '{}' }] }, tokenIds: [6] }),
  ].map((m) => header.chunk(wire(m)));
  assert.deepEqual(chunks[1].delta, {
    tool_calls: [{ index: 0, id: 'call_1', type: 'function', function: { name: 'get_weather', arguments: '{"city"' } }],
  });
  assert.deepEqual(chunks[2].delta, { tool_calls: [{ index: 0, function: { arguments: ': "Paris"}' } }] });
  assert.deepEqual(messageFromDeltas(chunks.map((c) => c.delta)), {
    role: 'assistant',
    content: null, // only tool calls
    tool_calls: [
      { id: 'call_1', type: 'function', function: { name: 'get_weather', arguments: '{"city": "Paris"}' } },
      { id: 'call_b', type: 'function', function: { name: 'get_time', arguments: '{}' } },
    ],
  });
  // Cut short after the first argument piece: exactly what was delivered.
  const cut = deliveredChatCompletion(chunks.slice(0, 2), header);
  assert.deepEqual(cut, {
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
          tool_calls: [{ id: 'call_1', type: 'function', function: { name: 'get_weather', arguments: '{"city"' } }],
        },
        logprobs: null,
        finish_reason: 'cancelled',
      },
    ],
    usage: { prompt_tokens: 40, completion_tokens: 2, total_tokens: 42, prompt_tokens_details: { cached_tokens: 0 } },
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

type ChatCall = ServerWritableStream<proto.ChatRequest, proto.ChatResponse>;

/** A server whose Chat answers with `script(call)`. */
async function scriptedServer(script: (call: ChatCall) => void): Promise<{ address: string; server: Server; received: proto.ChatRequest[] }> {
  const server = new Server();
  const received: proto.ChatRequest[] = [];
  server.addService(
    {
      Chat: {
        path: `/${proto.LlamaCrabService.typeName}/Chat`,
        requestStream: false,
        responseStream: true,
        requestSerialize: (m: proto.ChatRequest) => Buffer.from(toBinary(proto.ChatRequestSchema, m)),
        requestDeserialize: (b: Buffer) => fromBinary(proto.ChatRequestSchema, b),
        responseSerialize: (m: proto.ChatResponse) => Buffer.from(toBinary(proto.ChatResponseSchema, m)),
        responseDeserialize: (b: Buffer) => fromBinary(proto.ChatResponseSchema, b),
      },
    },
    {
      Chat: (call: ChatCall) => {
        received.push(call.request);
        script(call);
      },
    },
  );
  const port = await new Promise<number>((resolve, reject) =>
    server.bindAsync('127.0.0.1:0', ServerCredentials.createInsecure(), (err, p) => (err ? reject(err) : resolve(p))),
  );
  return { address: `127.0.0.1:${port}`, server, received };
}

const send = (call: ChatCall, init: ChatResponseInit): boolean => call.write(create(proto.ChatResponseSchema, init));

test('chat streams chunks then resolves with the OpenAI-shaped completion', async () => {
  const { address, server, received } = await scriptedServer((call) => {
    for (const m of TOOL_STREAM) send(call, m);
    send(call, TOOL_FINAL);
    call.end();
  });
  const client = new LlamaCrabClient(address);
  try {
    const seen: object[] = [];
    const done = await client.chat([{ role: 'user', content: 'Weather in Paris?' }], { maxTokens: 32 }, {
      tools: [{ type: 'function', function: { name: 'get_weather', parameters: { type: 'object' } } }],
      tool_choice: 'required',
      onChunk: (c) => {
        seen.push(c.toOpenAI());
      },
    });
    assert.equal(received[0].toolChoice, 'required');
    assert.equal(received[0].tools[0].parameters, '{"type":"object"}');
    assert.equal(seen.length, 3);
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
    assert.equal(done.timings?.totalMs, 12); // not enumerable: the shape above stays OpenAI's
    assert.equal(JSON.stringify(done).includes('timings'), false);
  } finally {
    client.close();
    server.forceShutdown();
  }
});

test('chatStream: breaking out of the loop is STOP; the completion holds exactly the delivered deltas', async () => {
  let cancelled!: (v: boolean) => void;
  const wasCancelled = new Promise<boolean>((resolve) => (cancelled = resolve));
  const { address, server } = await scriptedServer((call) => {
    call.on('cancelled', () => cancelled(true));
    send(call, TOOL_STREAM[0]);
    send(call, TOOL_STREAM[1]);
    // ... and never finishes on its own.
  });
  const client = new LlamaCrabClient(address);
  try {
    const stream = client.chatStream([{ role: 'user', content: 'Weather?' }]);
    let n = 0;
    for await (const c of stream) {
      assert.equal(c.id, 'chatcmpl-s');
      if (++n === 2) break;
    }
    const done = await stream.completion;
    assert.equal(await wasCancelled, true);
    assert.equal(done.choices[0].finish_reason, 'cancelled');
    assert.deepEqual(done.choices[0].message, {
      role: 'assistant',
      content: null,
      tool_calls: [{ id: 'call_1', type: 'function', function: { name: 'get_weather', arguments: '{"city"' } }],
    });
    assert.deepEqual(done.usage, { prompt_tokens: 40, completion_tokens: 2, total_tokens: 42, prompt_tokens_details: { cached_tokens: 0 } });
  } finally {
    client.close();
    server.forceShutdown();
  }
});

test('chat: onChunk returning STOP, and an AbortSignal, stop the stream alike', async () => {
  const { address, server } = await scriptedServer((call) => {
    send(call, chunk({ delta: { role: 'assistant', content: 'Hi' }, tokenIds: [1], id: 'chatcmpl-a', created: 1n, model: 'm', promptTokens: 3 }));
  });
  const client = new LlamaCrabClient(address);
  try {
    const byControl = await client.chat([{ role: 'user', content: 'x' }], {}, { onChunk: () => StreamControl.STOP });
    const abort = new AbortController();
    const bySignal = await client.chat([{ role: 'user', content: 'x' }], {}, { signal: abort.signal, onChunk: () => abort.abort() });
    for (const done of [byControl, bySignal]) {
      assert.equal(done.choices[0].finish_reason, 'cancelled');
      assert.equal(done.choices[0].message.content, 'Hi');
      assert.equal(done.usage.prompt_tokens, 3);
    }
  } finally {
    client.close();
    server.forceShutdown();
  }
});

test('chat: a stream that ends without a completion rejects with an InternalError', async () => {
  const { address, server } = await scriptedServer((call) => {
    send(call, TOOL_STREAM[0]);
    call.end();
  });
  const client = new LlamaCrabClient(address);
  try {
    await assert.rejects(client.chat([{ role: 'user', content: 'x' }]), (err: unknown) => err instanceof InternalError && err.status === 'INTERNAL');
  } finally {
    client.close();
    server.forceShutdown();
  }
});
