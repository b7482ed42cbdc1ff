'use strict';
// A small Node.js client for llama-crab. The contract is loaded from protos/ at run time
// with @grpc/proto-loader, so there is no generated code to keep in sync.
//
//   const { LlamaCrabClient } = require('./index.js');
//   const client = new LlamaCrabClient('localhost:50051');
//   const done = await client.complete('Once upon a time', { max_tokens: 32 },
//     { onChunk: (chunk) => process.stdout.write(chunk.text) });
//   const reply = await client.chat([{ role: 'user', content: 'Hi!' }], { max_tokens: 32 },
//     { onChunk: (chunk) => process.stdout.write(chunk.delta.content ?? '') });
//   reply.choices[0].message.content; // an OpenAI-shaped chat.completion
//
// Option and message fields use the proto's snake_case names (CompletionOptions in
// protos/llama_crab/v1/llama_crab.proto); chat messages, tools, tool_choice and
// response_format are OpenAI-shaped.

const path = require('node:path');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');
const protobuf = require('protobufjs');

const PROTO_ROOT = process.env.LLAMA_CRAB_PROTOS || path.resolve(__dirname, '..', '..', 'protos');
const PROTO_FILE = 'llama_crab/v1/llama_crab.proto';
const DEFAULT_ADDRESS = 'localhost:50051';

/** The server address: $LLAMA_CRAB_SERVER (as the Python CLI), else $LLAMA_CRAB_ADDR, else localhost:50051. */
function defaultAddress(env = process.env) {
  return env.LLAMA_CRAB_SERVER || env.LLAMA_CRAB_ADDR || DEFAULT_ADDRESS;
}

const definition = protoLoader.loadSync(PROTO_FILE, {
  includeDirs: [PROTO_ROOT],
  keepCase: true, // fields as named in the .proto
  longs: Number, // n_params fits a double
  enums: String, // stop_reason as 'STOP_REASON_LENGTH', ...
  defaults: true, // absent repeated/scalar fields read as [] / 0 / ''
  oneofs: true, // `response` says which of chunk/completion a message holds
});
const v1 = grpc.loadPackageDefinition(definition).llama_crab.v1;

// google.rpc.Status and BadRequest, the two messages of the rich error trailer
// (grpc-status-details-bin) this client reads; declared by field number only.
const richStatus = protobuf.Root.fromJSON({
  nested: {
    Status: {
      fields: {
        code: { type: 'int32', id: 1 },
        message: { type: 'string', id: 2 },
        details: { rule: 'repeated', type: 'Any', id: 3 },
      },
    },
    Any: { fields: { type_url: { type: 'string', id: 1 }, value: { type: 'bytes', id: 2 } } },
    BadRequest: { fields: { field_violations: { rule: 'repeated', type: 'FieldViolation', id: 1 } } },
    FieldViolation: { fields: { field: { type: 'string', id: 1 }, description: { type: 'string', id: 2 } } },
  },
});
const StatusType = richStatus.lookupType('Status');
const BadRequestType = richStatus.lookupType('BadRequest');
const BAD_REQUEST_URL = 'type.googleapis.com/google.rpc.BadRequest';

/** An RPC failure: `status` is the gRPC status name, `violations` the BadRequest field violations. */
class LlamaCrabError extends Error {
  constructor(code, message, violations) {
    super(message);
    this.name = 'LlamaCrabError';
    this.code = code;
    this.status = grpc.status[code] || 'UNKNOWN';
    this.violations = violations;
    this.field = violations.length ? violations[0].field : null;
  }
}

function fieldViolations(metadata) {
  const raw = metadata ? metadata.get('grpc-status-details-bin') : [];
  const out = [];
  for (const value of raw) {
    try {
      const status = StatusType.decode(value);
      for (const detail of status.details) {
        if (detail.type_url === BAD_REQUEST_URL) {
          for (const v of BadRequestType.decode(detail.value).field_violations) {
            out.push({ field: v.field, description: v.description });
          }
        }
      }
    } catch {
      // A malformed trailer: the status code alone still tells the kind of error.
    }
  }
  return out;
}

function toError(err) {
  if (err instanceof LlamaCrabError) return err;
  return new LlamaCrabError(err.code, err.details || err.message, fieldViolations(err.metadata));
}

/** The Completion of a stream stopped by the caller: exactly the delivered chunks. */
function deliveredCompletion(chunks, logprobsRequested) {
  const tokenIds = chunks.flatMap((c) => c.token_ids);
  return {
    text: chunks.map((c) => c.text).join(''),
    token_ids: tokenIds,
    stop_reason: 'STOP_REASON_CANCELLED',
    stop_sequence: '',
    // The server sends the prompt's length on a stream's first chunk only.
    usage: { prompt_tokens: chunks.length ? chunks[0].prompt_tokens || 0 : 0, completion_tokens: tokenIds.length, cached_tokens: 0 },
    timings: null,
    logprobs: logprobsRequested ? chunks.flatMap((c) => c.logprobs) : [],
    has_logprobs: logprobsRequested,
  };
}

// ---- chat ---------------------------------------------------------------------------
// Requests are OpenAI-shaped in, ChatRequest out; chunks and the result are ChatChunk /
// ChatCompletion in, OpenAI's chat.completion.chunk / chat.completion shapes out.

const EMPTY_SCHEMA = { type: 'object', properties: {} };

/** Present means set: proto-loader leaves an unset proto3 `optional` field out. */
function has(obj, key) {
  return obj !== null && obj !== undefined && obj[key] !== undefined && obj[key] !== null;
}

function jsonText(value) {
  return typeof value === 'string' ? value : JSON.stringify(value);
}

function messageToProto(m) {
  let content = m.content;
  if (Array.isArray(content)) {
    // Typed content parts: their text, joined (as the Python client does).
    content = content.map((p) => (p && typeof p === 'object' && p.text !== undefined ? String(p.text) : '')).join('');
  }
  const out = {
    role: m.role === undefined || m.role === null ? '' : String(m.role),
    tool_calls: (m.tool_calls || []).map((c) => {
      const fn = c.function || {};
      return {
        id: c.id === undefined || c.id === null ? '' : String(c.id),
        name: fn.name === undefined || fn.name === null ? '' : String(fn.name),
        arguments: fn.arguments === undefined || fn.arguments === null ? '{}' : jsonText(fn.arguments),
      };
    }),
    tool_call_id: m.tool_call_id || '',
    name: m.name || '',
    reasoning_content: m.reasoning_content || '',
  };
  if (content !== undefined && content !== null) out.content = content;
  return out;
}

function toolToProto(t) {
  const fn = t.function || t;
  return {
    name: fn.name === undefined || fn.name === null ? '' : String(fn.name),
    description: fn.description ? String(fn.description) : '',
    parameters: jsonText(fn.parameters || EMPTY_SCHEMA),
  };
}

function toolChoiceToProto(choice) {
  if (choice === undefined || choice === null) return 'auto';
  if (typeof choice === 'object') return String((choice.function || {}).name || '');
  return String(choice) || 'auto';
}

function responseFormatToProto(rf) {
  if (rf === undefined || rf === null) return null;
  const type = rf.type ? String(rf.type) : 'text';
  let schema = rf.schema;
  let name = 'response';
  if (type === 'json_schema') {
    const wrapper = rf.json_schema || {};
    schema = wrapper.schema;
    if (wrapper.name) name = String(wrapper.name);
  }
  return { type, schema: schema === undefined || schema === null ? '' : jsonText(schema), name };
}

/** The ChatRequest message for OpenAI-shaped messages, tools, tool_choice and response_format. */
function chatRequest(messages, options = {}, { tools, tool_choice, response_format, parallel_tool_calls } = {}) {
  return {
    messages: (messages || []).map(messageToProto),
    tools: (tools || []).map(toolToProto),
    tool_choice: toolChoiceToProto(tool_choice),
    response_format: responseFormatToProto(response_format),
    parallel_tool_calls: Boolean(parallel_tool_calls),
    options: options || {},
  };
}

/** A proto ChatDelta in OpenAI's delta shape (only what the delta sets). */
function deltaFromProto(d) {
  const out = {};
  if (!d) return out;
  if (d.role) out.role = d.role;
  if (has(d, 'content')) out.content = d.content;
  if (has(d, 'reasoning_content')) out.reasoning_content = d.reasoning_content;
  if (d.tool_calls && d.tool_calls.length) {
    out.tool_calls = d.tool_calls.map((t) => {
      const call = { index: t.index };
      if (t.id) {
        call.id = t.id;
        call.type = 'function';
      }
      call.function = t.name ? { name: t.name, arguments: t.arguments } : { arguments: t.arguments };
      return call;
    });
  }
  return out;
}

/** A streamed piece of a chat reply; `toOpenAI()` gives the exact chat.completion.chunk. */
class ChatChunk {
  constructor({ id, created, model, prompt_tokens, delta, token_ids, n_tokens }) {
    this.id = id; // the reply's id, time, model and prompt length: copied from the first chunk
    this.created = created;
    this.model = model;
    this.prompt_tokens = prompt_tokens;
    this.delta = delta; // OpenAI-shaped: {role?, content?, reasoning_content?, tool_calls?}
    this.token_ids = token_ids; // the tokens this chunk came from
    this.n_tokens = n_tokens; // tokens generated so far, including this chunk's
  }

  toOpenAI() {
    return {
      id: this.id,
      object: 'chat.completion.chunk',
      created: this.created,
      model: this.model,
      choices: [{ index: 0, delta: this.delta, logprobs: null, finish_reason: null }],
    };
  }
}

/** The reply's id, time, model and prompt length: sent on a Chat stream's first chunk only. */
class ChatStreamHeader {
  constructor() {
    this.id = '';
    this.created = 0;
    this.model = '';
    this.prompt_tokens = 0;
  }

  /** The ChatChunk to hand out for a proto ChatChunk (fills the header from the first). */
  chunk(c) {
    if (c.id) {
      this.id = c.id;
      this.created = c.created;
      this.model = c.model;
      this.prompt_tokens = c.prompt_tokens;
    }
    return new ChatChunk({
      id: this.id,
      created: this.created,
      model: this.model,
      prompt_tokens: this.prompt_tokens,
      delta: deltaFromProto(c.delta),
      token_ids: c.token_ids || [],
      n_tokens: c.n_tokens || 0,
    });
  }
}

function usageOpenAI(u) {
  const prompt = (u && u.prompt_tokens) || 0;
  const completion = (u && u.completion_tokens) || 0;
  return {
    prompt_tokens: prompt,
    completion_tokens: completion,
    total_tokens: prompt + completion,
    prompt_tokens_details: { cached_tokens: (u && u.cached_tokens) || 0 },
  };
}

function chatCompletionOpenAI({ id, created, model, message, finish_reason, usage, timings }) {
  const out = {
    id,
    object: 'chat.completion',
    created,
    model,
    choices: [{ index: 0, message, logprobs: null, finish_reason }],
    usage: usageOpenAI(usage),
  };
  // Server-side timings ride along without changing the OpenAI shape (not enumerable).
  Object.defineProperty(out, 'timings', { value: timings || null, enumerable: false });
  return out;
}

/** A proto ChatMessage (the completion's) in OpenAI's message shape. */
function messageFromProto(m) {
  const out = { role: m.role || 'assistant', content: has(m, 'content') ? m.content : null };
  if (m.reasoning_content) out.reasoning_content = m.reasoning_content;
  if (m.tool_calls && m.tool_calls.length) {
    out.tool_calls = m.tool_calls.map((c) => ({ id: c.id, type: 'function', function: { name: c.name, arguments: c.arguments } }));
  }
  if (m.tool_call_id) out.tool_call_id = m.tool_call_id;
  if (m.name) out.name = m.name;
  return out;
}

/** The final ChatCompletion message in OpenAI's chat.completion shape. */
function chatCompletionFromProto(f) {
  return chatCompletionOpenAI({
    id: f.id,
    created: f.created,
    model: f.model,
    message: messageFromProto(f.message || {}),
    finish_reason: f.finish_reason,
    usage: f.usage,
    timings: f.timings,
  });
}

/**
 * The assistant message (OpenAI shape) that a sequence of OpenAI-shaped deltas spells:
 * content and reasoning joined; tool calls joined by index (id and name from the first
 * delta of an index, arguments concatenated); content null when there are only calls.
 */
function messageFromDeltas(deltas) {
  const content = [];
  const reasoning = [];
  const calls = new Map(); // index -> {id, name, args: []}
  for (const d of deltas) {
    if (d.content) content.push(d.content);
    if (d.reasoning_content) reasoning.push(d.reasoning_content);
    for (const t of d.tool_calls || []) {
      const fn = t.function || {};
      if (!calls.has(t.index)) calls.set(t.index, { id: t.id || '', name: fn.name || '', args: [] });
      calls.get(t.index).args.push(fn.arguments || '');
    }
  }
  const out = { role: 'assistant', content: content.length || !calls.size ? content.join('') : null };
  if (reasoning.length) out.reasoning_content = reasoning.join('');
  if (calls.size) {
    out.tool_calls = [...calls.keys()]
      .sort((a, b) => a - b)
      .map((i) => {
        const c = calls.get(i);
        return { id: c.id, type: 'function', function: { name: c.name, arguments: c.args.join('') } };
      });
  }
  return out;
}

function newChatId() {
  return 'chatcmpl-' + require('node:crypto').randomBytes(18).toString('base64url');
}

/**
 * The ChatCompletion (OpenAI shape) of a chat stream stopped by the caller: exactly the
 * delivered chunks, finish_reason 'cancelled', prompt_tokens from the first chunk.
 */
function deliveredChatCompletion(chunks, header = null) {
  const first = chunks.length ? chunks[0] : null;
  const id = (header && header.id) || (first && first.id) || newChatId();
  const created = (header && header.created) || (first && first.created) || Math.floor(Date.now() / 1000);
  const model = (header && header.model) || (first && first.model) || '';
  const promptTokens = (header && header.prompt_tokens) || (first && first.prompt_tokens) || 0;
  return chatCompletionOpenAI({
    id,
    created,
    model,
    message: messageFromDeltas(chunks.map((c) => c.delta)),
    finish_reason: 'cancelled',
    usage: {
      prompt_tokens: promptTokens,
      completion_tokens: chunks.reduce((n, c) => n + c.token_ids.length, 0),
      cached_tokens: 0,
    },
    timings: null,
  });
}

class LlamaCrabClient {
  /**
   * @param {string} [address] host:port; default $LLAMA_CRAB_SERVER, else $LLAMA_CRAB_ADDR, else localhost:50051
   * @param {object} [opts]
   * @param {string} [opts.token] bearer token (sent as `authorization: Bearer <token>`)
   * @param {{ca?: Buffer, cert?: Buffer, key?: Buffer}|boolean} [opts.tls] TLS (mutual with cert+key)
   * @param {number} [opts.timeoutMs] per-call deadline
   */
  constructor(address, opts = {}) {
    const tls = opts.tls;
    const creds = tls
      ? grpc.credentials.createSsl(tls.ca || null, tls.key || null, tls.cert || null)
      : grpc.credentials.createInsecure();
    this._stub = new v1.LlamaCrabService(address || defaultAddress(), creds);
    this._token = opts.token || null;
    this._timeoutMs = opts.timeoutMs || null;
  }

  _metadata(requestId) {
    const md = new grpc.Metadata();
    if (this._token) md.set('authorization', `Bearer ${this._token}`);
    if (requestId) md.set('x-request-id', requestId);
    return md;
  }

  _callOptions() {
    return this._timeoutMs ? { deadline: new Date(Date.now() + this._timeoutMs) } : {};
  }

  /**
   * Stream a completion. `onChunk(chunk)` may return 'stop' to cancel; so may `signal`
   * (an AbortSignal). Resolves with the final Completion; after a stop it holds exactly
   * the delivered chunks and stop_reason 'STOP_REASON_CANCELLED'. Rejects with a
   * LlamaCrabError (status, field) when the server refuses the request.
   */
  complete(prompt, options = {}, { onChunk = () => {}, signal = null, requestId = null } = {}) {
    const request = typeof prompt === 'string' ? { text: prompt, options } : { tokens: { ids: prompt }, options };
    const logprobsRequested = options.logprobs !== undefined && options.logprobs !== null;
    return this._serverStream('Complete', request, { onChunk, signal, requestId }, {
      chunk: (c) => c,
      completion: (f) => f,
      delivered: (chunks) => deliveredCompletion(chunks, logprobsRequested),
    });
  }

  /**
   * Stream a chat reply with the model's chat template. `messages` are OpenAI-shaped
   * ({role, content, tool_calls, tool_call_id, name}); so are `tools`
   * ({type: 'function', function: {name, description, parameters}}), `tool_choice`
   * ('auto' | 'none' | 'required' | a function's name | {type: 'function', function: {name}})
   * and `response_format` ({type: 'json_schema', json_schema: {name, schema}} | {type: 'json_object'}).
   * `onChunk(chunk)` gets a ChatChunk (OpenAI-shaped `delta`, `token_ids`, `toOpenAI()`)
   * and may return 'stop' to cancel; so may `signal`. Resolves with an OpenAI-shaped
   * chat.completion; after a stop it holds exactly the delivered deltas and
   * finish_reason 'cancelled'. Rejects with a LlamaCrabError as `complete` does.
   */
  chat(
    messages,
    options = {},
    { tools, tool_choice, response_format, parallel_tool_calls, onChunk = () => {}, signal = null, requestId = null } = {},
  ) {
    const request = chatRequest(messages, options, { tools, tool_choice, response_format, parallel_tool_calls });
    const header = new ChatStreamHeader();
    return this._serverStream('Chat', request, { onChunk, signal, requestId }, {
      chunk: (c) => header.chunk(c),
      completion: (f) => chatCompletionFromProto(f),
      delivered: (chunks) => deliveredChatCompletion(chunks, header),
    });
  }

  /**
   * A server-streaming call of `chunk` messages then one `completion`: `convert.chunk`
   * makes what onChunk gets, `convert.completion` the result, `convert.delivered` the
   * result after a stop (from the chunks handed out).
   */
  _serverStream(method, request, { onChunk, signal, requestId }, convert) {
    return new Promise((resolve, reject) => {
      const call = this._stub[method](request, this._metadata(requestId), this._callOptions());
      const chunks = [];
      let settled = false;
      const settle = (fn, value) => {
        if (!settled) {
          settled = true;
          if (signal) signal.removeEventListener('abort', onAbort);
          fn(value);
        }
      };
      const stop = () => {
        call.cancel();
        let result;
        try {
          result = convert.delivered(chunks);
        } catch (err) {
          settle(reject, err);
          return;
        }
        settle(resolve, result);
      };
      const onAbort = () => stop();
      call.on('data', (message) => {
        if (settled) return;
        let control;
        try {
          if (message.response === 'completion') {
            settle(resolve, convert.completion(message.completion));
            return;
          }
          const chunk = convert.chunk(message.chunk);
          chunks.push(chunk);
          control = onChunk(chunk);
        } catch (err) {
          call.cancel();
          settle(reject, err);
          return;
        }
        if (control === 'stop') stop();
      });
      call.on('error', (err) => settle(reject, toError(err)));
      call.on('end', () => settle(reject, new LlamaCrabError(grpc.status.INTERNAL, 'stream ended without a final message', [])));
      if (signal) {
        if (signal.aborted) stop();
        else signal.addEventListener('abort', onAbort);
      }
    });
  }

  _unary(method, request) {
    return new Promise((resolve, reject) => {
      this._stub[method](request, this._metadata(null), this._callOptions(), (err, reply) =>
        err ? reject(toError(err)) : resolve(reply),
      );
    });
  }

  async tokenize(text, { addSpecial = true, parseSpecial = true } = {}) {
    return (await this._unary('Tokenize', { text, add_special: addSpecial, parse_special: parseSpecial })).tokens;
  }

  async detokenize(tokens) {
    return (await this._unary('Detokenize', { tokens })).text;
  }

  async model() {
    return (await this._unary('GetModel', {})).model;
  }

  close() {
    this._stub.close();
  }
}

module.exports = {
  LlamaCrabClient,
  LlamaCrabError,
  ChatChunk,
  ChatStreamHeader,
  chatRequest,
  chatCompletionFromProto,
  defaultAddress,
  deliveredChatCompletion,
  deliveredCompletion,
  messageFromDeltas,
  proto: v1,
};
