// LlamaCrabClient: the service over @grpc/grpc-js, with messages generated from protos/ by
// protoc-gen-es. The same shape as the Python Client: a stream of chunks where leaving
// the loop or an AbortSignal is STOP, then the final Completion; chat with tool-call
// deltas; sessions; errors as typed classes that name the field.

import { create, fromBinary, toBinary, type DescMessage, type MessageInitShape, type MessageShape } from '@bufbuild/protobuf';
import { Client as GrpcClient, credentials, Metadata, type CallOptions } from '@grpc/grpc-js';

import {
  ChatChunk,
  ChatStreamHeader,
  chatCompletionFromProto,
  chatRequest,
  deliveredChatCompletion,
  type ChatCompletion,
  type ChatExtras,
  type MessageParam,
} from './chat';
import { toError } from './errors';
import { Session } from './session';
import { Stream } from './stream';
import {
  CompletionSchema,
  LlamaCrabService,
  Pooling,
  StopReason,
  type CompleteRequestSchema,
  type EmbedResponse,
  type InfillSchema,
  type Chunk,
  type Completion,
  type CompletionOptionsSchema,
  type ModelInfo,
} from '../gen/llama_crab/v1/llama_crab_pb';

/** Request options: CompletionOptions' fields, camelCase (`{ maxTokens: 32, stopSequences: ['\n\n'] }`). */
export type CompletionOptions = MessageInitShape<typeof CompletionOptionsSchema>;

/** Fill in the middle: the code around the cursor (a code model's FIM tokens build the prompt). */
export type Infill = MessageInitShape<typeof InfillSchema>;

/** A prompt: text, token ids used as given, or `{ infill: { prefix, suffix, indent } }`. */
export type Prompt = string | number[] | { infill: Infill };

/** How an input's token vectors become its embedding (unset: the model's own). */
export type PoolingName = 'model' | 'none' | 'mean' | 'cls' | 'last';

const POOLINGS: Record<PoolingName, Pooling> = {
  model: Pooling.UNSPECIFIED,
  none: Pooling.NONE,
  mean: Pooling.MEAN,
  cls: Pooling.CLS,
  last: Pooling.LAST,
};

function promptCase(prompt: Prompt): MessageInitShape<typeof CompleteRequestSchema>['prompt'] {
  if (typeof prompt === 'string') return { case: 'text', value: prompt };
  if (Array.isArray(prompt)) return { case: 'tokens', value: { ids: prompt } };
  return { case: 'infill', value: prompt.infill };
}

export interface ClientOptions {
  /** Bearer token, sent as `authorization: Bearer <token>`. */
  token?: string;
  /** TLS (mutual with cert and key); `true`: the system's roots. */
  tls?: boolean | { ca?: Buffer; cert?: Buffer; key?: Buffer };
  /** A deadline for every call, in milliseconds. */
  timeoutMs?: number;
}

export interface CallParams {
  /** Aborting it is STOP. */
  signal?: AbortSignal;
  /** Sent as x-request-id; the server logs it and echoes it in errors. */
  requestId?: string;
}

/** What a callback returns to stop the stream ('stop' is accepted too). */
export enum StreamControl {
  CONTINUE = 'continue',
  STOP = 'stop',
}

export type OnChunk<C> = (chunk: C) => StreamControl | 'stop' | void | undefined;

const DEFAULT_ADDRESS = 'localhost:50051';

/** The server address: $LLAMA_CRAB_SERVER (as the Python CLI), else $LLAMA_CRAB_ADDR, else localhost:50051. */
export function defaultAddress(env: NodeJS.ProcessEnv = process.env): string {
  return env.LLAMA_CRAB_SERVER || env.LLAMA_CRAB_ADDR || DEFAULT_ADDRESS;
}

/** The Completion of a stream stopped by the caller: exactly the delivered chunks. */
export function deliveredCompletion(chunks: Chunk[], logprobsRequested: boolean): Completion {
  const tokenIds = chunks.flatMap((c) => c.tokenIds);
  return create(CompletionSchema, {
    text: chunks.map((c) => c.text).join(''),
    tokenIds,
    stopReason: StopReason.CANCELLED,
    // The server sends the prompt's length on a stream's first chunk only.
    usage: { promptTokens: chunks.length ? chunks[0].promptTokens : 0, completionTokens: tokenIds.length },
    logprobs: logprobsRequested ? chunks.flatMap((c) => c.logprobs) : [],
    hasLogprobs: logprobsRequested,
  });
}

type Method = (typeof LlamaCrabService.method)[keyof typeof LlamaCrabService.method];

function path(method: Method): string {
  return `/${LlamaCrabService.typeName}/${method.name}`;
}

function codec<D extends DescMessage>(schema: D): { encode: (m: MessageShape<D>) => Buffer; decode: (b: Buffer) => MessageShape<D> } {
  return {
    encode: (m) => Buffer.from(toBinary(schema, m)),
    decode: (b) => fromBinary(schema, b),
  };
}

export class LlamaCrabClient {
  private readonly grpc: GrpcClient;
  private readonly token: string | null;
  private readonly timeoutMs: number | null;

  /** `address` is host:port; default $LLAMA_CRAB_SERVER, else $LLAMA_CRAB_ADDR, else localhost:50051. */
  constructor(address?: string, opts: ClientOptions = {}) {
    const tls = opts.tls;
    const creds = tls
      ? tls === true
        ? credentials.createSsl()
        : credentials.createSsl(tls.ca ?? null, tls.key ?? null, tls.cert ?? null)
      : credentials.createInsecure();
    this.grpc = new GrpcClient(address || defaultAddress(), creds);
    this.token = opts.token ?? null;
    this.timeoutMs = opts.timeoutMs ?? null;
  }

  /**
   * Stream a completion: `for await (const chunk of stream)`, then `await stream.completion`.
   * Leaving the loop early, `stream.stop()` or aborting `signal` is STOP: the call is
   * cancelled and the completion holds exactly the chunks handed out (stopReason CANCELLED).
   * A refused request rejects both with a typed LlamaCrabError.
   */
  stream(prompt: Prompt, options: CompletionOptions = {}, params: CallParams = {}): Stream<Chunk, Completion> {
    const method = LlamaCrabService.method.complete;
    const request = create(method.input, { prompt: promptCase(prompt), options });
    const logprobsRequested = options.logprobs !== undefined;
    return this.serverStream<Chunk, Completion>(method, request, params, (m) => {
      const r = (m as MessageShape<typeof method.output>).response;
      if (r.case === 'completion') return { final: r.value };
      if (r.case === 'chunk') return { chunk: r.value };
      throw new Error('a response with neither chunk nor completion');
    }, (chunks) => deliveredCompletion(chunks, logprobsRequested));
  }

  /** The whole completion; `onChunk` sees each chunk and may return STOP. */
  async complete(prompt: Prompt, options: CompletionOptions = {}, params: CallParams & { onChunk?: OnChunk<Chunk> } = {}): Promise<Completion> {
    return drain(this.stream(prompt, options, params), params.onChunk);
  }

  /**
   * Stream a chat reply made with the model's chat template. Messages, tools, tool_choice
   * and response_format are OpenAI-shaped; each chunk's `delta` is OpenAI's (tool-call
   * deltas included), and the completion is a chat.completion. STOP as in `stream`.
   */
  chatStream(messages: MessageParam[], options: CompletionOptions = {}, params: CallParams & ChatExtras = {}): Stream<ChatChunk, ChatCompletion> {
    const method = LlamaCrabService.method.chat;
    const header = new ChatStreamHeader();
    return this.serverStream<ChatChunk, ChatCompletion>(method, chatRequest(messages, options, params), params, (m) => {
      const r = (m as MessageShape<typeof method.output>).response;
      if (r.case === 'completion') return { final: chatCompletionFromProto(r.value) };
      if (r.case === 'chunk') return { chunk: header.chunk(r.value) };
      throw new Error('a response with neither chunk nor completion');
    }, (chunks) => deliveredChatCompletion(chunks, header));
  }

  /** The whole chat reply (a chat.completion); `onChunk` may return STOP. */
  async chat(
    messages: MessageParam[],
    options: CompletionOptions = {},
    params: CallParams & ChatExtras & { onChunk?: OnChunk<ChatChunk> } = {},
  ): Promise<ChatCompletion> {
    return drain(this.chatStream(messages, options, params), params.onChunk);
  }

  /** A token history continued across calls: each prompt is the history plus the new text. */
  session(tokens: number[] = []): Session {
    return new Session(this, tokens);
  }

  /**
   * Embeddings of `inputs` (texts, or token id lists), in input order: one `vector` each,
   * or `tokenVectors` with pooling 'none'; L2-normalised unless `normalize` is false.
   */
  async embed(inputs: Array<string | number[]>, { pooling = 'model', normalize = true }: { pooling?: PoolingName; normalize?: boolean } = {}): Promise<EmbedResponse> {
    const method = LlamaCrabService.method.embed;
    if (!Object.hasOwn(POOLINGS, pooling)) throw new TypeError(`pooling must be one of ${Object.keys(POOLINGS).join(', ')}`);
    const request = create(method.input, {
      inputs: inputs.map((x) => ({ input: typeof x === 'string' ? { case: 'text' as const, value: x } : { case: 'tokens' as const, value: { ids: x } } })),
      pooling: POOLINGS[pooling],
      normalize,
    });
    return this.unary(method, request);
  }

  async tokenize(text: string, { addSpecial = true, parseSpecial = true } = {}): Promise<number[]> {
    const method = LlamaCrabService.method.tokenize;
    return (await this.unary(method, create(method.input, { text, addSpecial, parseSpecial }))).tokens;
  }

  async detokenize(tokens: number[]): Promise<string> {
    const method = LlamaCrabService.method.detokenize;
    return (await this.unary(method, create(method.input, { tokens }))).text;
  }

  async model(): Promise<ModelInfo> {
    const method = LlamaCrabService.method.getModel;
    const reply = await this.unary(method, create(method.input, {}));
    if (!reply.model) throw new Error('GetModel: no model in the reply');
    return reply.model;
  }

  close(): void {
    this.grpc.close();
  }

  private metadata(requestId?: string): Metadata {
    const md = new Metadata();
    if (this.token) md.set('authorization', `Bearer ${this.token}`);
    if (requestId) md.set('x-request-id', requestId);
    return md;
  }

  private callOptions(): CallOptions {
    return this.timeoutMs ? { deadline: new Date(Date.now() + this.timeoutMs) } : {};
  }

  private serverStream<C, F>(
    method: Method,
    request: MessageShape<DescMessage>,
    params: CallParams,
    convert: (message: unknown) => { chunk: C } | { final: F },
    afterStop: (delivered: C[]) => F,
  ): Stream<C, F> {
    const input = codec(method.input as DescMessage);
    const output = codec(method.output as DescMessage);
    const call = this.grpc.makeServerStreamRequest(
      path(method),
      input.encode,
      output.decode,
      request,
      this.metadata(params.requestId),
      this.callOptions(),
    );
    return new Stream<C, F>(call, convert, afterStop, params.signal);
  }

  private unary<M extends Method>(method: M, request: MessageShape<M['input']>): Promise<MessageShape<M['output']>> {
    const input = codec(method.input as DescMessage);
    const output = codec(method.output as DescMessage);
    return new Promise((resolve, reject) => {
      this.grpc.makeUnaryRequest(
        path(method),
        input.encode,
        output.decode,
        request as MessageShape<DescMessage>,
        this.metadata(),
        this.callOptions(),
        (err, reply) => (err || !reply ? reject(toError(err)) : resolve(reply as MessageShape<M['output']>)),
      );
    });
  }
}

/** Iterate a stream to its end, handing each chunk to `onChunk` (which may STOP it). */
export async function drain<C, F>(stream: Stream<C, F>, onChunk?: OnChunk<C>): Promise<F> {
  for await (const chunk of stream) {
    const control: string | void = onChunk?.(chunk);
    if (control === StreamControl.STOP) break; // StreamControl.STOP is 'stop'

  }
  return stream.completion;
}
