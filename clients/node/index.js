'use strict';
// A small Node.js client for llama-crab. The contract is loaded from protos/ at run time
// with @grpc/proto-loader, so there is no generated code to keep in sync.
//
//   const { LlamaCrabClient } = require('./index.js');
//   const client = new LlamaCrabClient('localhost:50051');
//   const done = await client.complete('Once upon a time', { max_tokens: 32 },
//     { onChunk: (chunk) => process.stdout.write(chunk.text) });
//
// Option and message fields use the proto's snake_case names (CompletionOptions in
// protos/llama_crab/v1/llama_crab.proto).

const path = require('node:path');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');
const protobuf = require('protobufjs');

const PROTO_ROOT = process.env.LLAMA_CRAB_PROTOS || path.resolve(__dirname, '..', '..', 'protos');
const PROTO_FILE = 'llama_crab/v1/llama_crab.proto';

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
    usage: { prompt_tokens: 0, completion_tokens: tokenIds.length, cached_tokens: 0 },
    timings: null,
    logprobs: logprobsRequested ? chunks.flatMap((c) => c.logprobs) : [],
    has_logprobs: logprobsRequested,
  };
}

class LlamaCrabClient {
  /**
   * @param {string} address host:port
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
    this._stub = new v1.LlamaCrabService(address, creds);
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
    return new Promise((resolve, reject) => {
      const call = this._stub.Complete(request, this._metadata(requestId), this._callOptions());
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
        settle(resolve, deliveredCompletion(chunks, logprobsRequested));
      };
      const onAbort = () => stop();
      call.on('data', (message) => {
        if (settled) return;
        if (message.response === 'completion') {
          settle(resolve, message.completion);
          return;
        }
        chunks.push(message.chunk);
        let control;
        try {
          control = onChunk(message.chunk);
        } catch (err) {
          call.cancel();
          settle(reject, err);
          return;
        }
        if (control === 'stop') stop();
      });
      call.on('error', (err) => settle(reject, toError(err)));
      call.on('end', () => settle(reject, new LlamaCrabError(grpc.status.INTERNAL, 'stream ended without a Completion', [])));
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

module.exports = { LlamaCrabClient, LlamaCrabError, deliveredCompletion };
