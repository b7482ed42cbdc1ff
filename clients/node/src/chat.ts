// Chat in OpenAI's shapes: OpenAI-shaped messages, tools, tool_choice and response_format
// in, the proto ChatRequest out; proto chunks and the final ChatCompletion in, OpenAI's
// chat.completion.chunk / chat.completion out.

import { create, type MessageInitShape } from '@bufbuild/protobuf';
import { randomBytes } from 'node:crypto';
import {
  ChatRequestSchema,
  type ChatChunk as ProtoChatChunk,
  type ChatCompletion as ProtoChatCompletion,
  type ChatDelta,
  type ChatMessage,
  type ChatRequest,
  type CompletionOptionsSchema,
  type Timings,
  type Usage,
} from '../gen/llama_crab/v1/llama_crab_pb';

type Json = string | number | boolean | null | Json[] | { [key: string]: Json };

export interface ToolCall {
  id: string;
  type: 'function';
  function: { name: string; arguments: string };
}

/** A message as OpenAI's API takes it; `content` may be typed parts (their text is joined). */
export interface MessageParam {
  role: string;
  content?: string | { type?: string; text?: string }[] | null;
  tool_calls?: { id?: string; type?: string; function: { name: string; arguments: string | Json } }[];
  tool_call_id?: string;
  name?: string;
  reasoning_content?: string;
}

export interface Tool {
  type: 'function';
  function: { name: string; description?: string; parameters?: Json };
}

export type ToolChoice = 'auto' | 'none' | 'required' | (string & {}) | { type: 'function'; function: { name: string } };

export type ResponseFormat =
  | { type: 'text' }
  | { type: 'json_object'; schema?: Json }
  | { type: 'json_schema'; json_schema: { name?: string; schema: Json } };

export interface ChatExtras {
  tools?: Tool[];
  tool_choice?: ToolChoice;
  response_format?: ResponseFormat;
  parallel_tool_calls?: boolean;
}

export interface ToolCallDeltaParam {
  index: number;
  id?: string;
  type?: 'function';
  function: { name?: string; arguments: string };
}

/** OpenAI's delta: only what this chunk sets. */
export interface Delta {
  role?: string;
  content?: string;
  reasoning_content?: string;
  tool_calls?: ToolCallDeltaParam[];
}

/** The assistant's message in a chat.completion. */
export interface AssistantMessage {
  role: string;
  content: string | null;
  reasoning_content?: string;
  tool_calls?: ToolCall[];
  tool_call_id?: string;
  name?: string;
}

export interface ChatUsage {
  prompt_tokens: number;
  completion_tokens: number;
  total_tokens: number;
  prompt_tokens_details: { cached_tokens: number };
}

/** OpenAI's chat.completion; `timings` (server-side) rides along, not enumerable. */
export interface ChatCompletion {
  id: string;
  object: 'chat.completion';
  created: number;
  model: string;
  choices: [{ index: 0; message: AssistantMessage; logprobs: null; finish_reason: string }];
  usage: ChatUsage;
  readonly timings?: Timings | null;
}

const EMPTY_SCHEMA = { type: 'object', properties: {} };

function jsonText(value: Json | undefined): string {
  return typeof value === 'string' ? value : JSON.stringify(value);
}

function messageToProto(m: MessageParam): MessageInitShape<typeof ChatRequestSchema>['messages'] extends (infer T)[] | undefined ? T : never {
  let content = m.content;
  if (Array.isArray(content)) {
    // Typed content parts: their text, joined (as the Python client does).
    content = content.map((p) => (p && typeof p === 'object' && p.text !== undefined ? String(p.text) : '')).join('');
  }
  return {
    role: m.role ?? '',
    content: content ?? undefined, // unset: an assistant message with only calls
    toolCalls: (m.tool_calls ?? []).map((c) => ({
      id: c.id ?? '',
      name: c.function?.name ?? '',
      arguments: c.function?.arguments === undefined ? '{}' : jsonText(c.function.arguments),
    })),
    toolCallId: m.tool_call_id ?? '',
    name: m.name ?? '',
    reasoningContent: m.reasoning_content ?? '',
  };
}

function toolChoiceToProto(choice: ToolChoice | undefined): string {
  if (choice === undefined || choice === null) return 'auto';
  if (typeof choice === 'object') return choice.function?.name ?? '';
  return choice || 'auto';
}

/** The ChatRequest for OpenAI-shaped messages, tools, tool_choice and response_format. */
export function chatRequest(
  messages: MessageParam[],
  options: MessageInitShape<typeof CompletionOptionsSchema> = {},
  extras: ChatExtras = {},
): ChatRequest {
  const rf = extras.response_format;
  let responseFormat: { type: string; schema: string; name: string } | undefined;
  if (rf) {
    const schema = rf.type === 'json_schema' ? rf.json_schema.schema : rf.type === 'json_object' ? rf.schema : undefined;
    const name = rf.type === 'json_schema' && rf.json_schema.name ? rf.json_schema.name : 'response';
    responseFormat = { type: rf.type, schema: schema === undefined || schema === null ? '' : jsonText(schema), name };
  }
  return create(ChatRequestSchema, {
    messages: messages.map(messageToProto),
    tools: (extras.tools ?? []).map((t) => ({
      name: t.function.name,
      description: t.function.description ?? '',
      parameters: jsonText(t.function.parameters ?? EMPTY_SCHEMA),
    })),
    toolChoice: toolChoiceToProto(extras.tool_choice),
    responseFormat,
    parallelToolCalls: Boolean(extras.parallel_tool_calls),
    options,
  });
}

/** A proto ChatDelta in OpenAI's delta shape (only what the delta sets). */
export function deltaFromProto(d: ChatDelta | undefined): Delta {
  const out: Delta = {};
  if (!d) return out;
  if (d.role) out.role = d.role;
  if (d.content !== undefined) out.content = d.content;
  if (d.reasoningContent !== undefined) out.reasoning_content = d.reasoningContent;
  if (d.toolCalls.length) {
    out.tool_calls = d.toolCalls.map((t) => {
      const call: ToolCallDeltaParam = { index: t.index, function: { arguments: t.arguments } };
      if (t.id) {
        call.id = t.id;
        call.type = 'function';
      }
      if (t.name) call.function = { name: t.name, arguments: t.arguments };
      return call;
    });
  }
  return out;
}

/** A streamed piece of a chat reply; `toOpenAI()` gives the exact chat.completion.chunk. */
export class ChatChunk {
  constructor(
    readonly id: string, // the reply's id, time, model and prompt length: from the first chunk
    readonly created: number,
    readonly model: string,
    readonly promptTokens: number,
    readonly delta: Delta,
    readonly tokenIds: number[], // the tokens this chunk came from
    readonly nTokens: number, // tokens generated so far, including this chunk's
  ) {}

  toOpenAI(): object {
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
export class ChatStreamHeader {
  id = '';
  created = 0;
  model = '';
  promptTokens = 0;

  /** The ChatChunk to hand out for a proto ChatChunk (fills the header from the first). */
  chunk(c: ProtoChatChunk): ChatChunk {
    if (c.id) {
      this.id = c.id;
      this.created = Number(c.created);
      this.model = c.model;
      this.promptTokens = c.promptTokens;
    }
    return new ChatChunk(this.id, this.created, this.model, this.promptTokens, deltaFromProto(c.delta), c.tokenIds, c.nTokens);
  }
}

function usageOpenAI(u: Pick<Usage, 'promptTokens' | 'completionTokens' | 'cachedTokens'> | undefined): ChatUsage {
  const prompt = u?.promptTokens ?? 0;
  const completion = u?.completionTokens ?? 0;
  return {
    prompt_tokens: prompt,
    completion_tokens: completion,
    total_tokens: prompt + completion,
    prompt_tokens_details: { cached_tokens: u?.cachedTokens ?? 0 },
  };
}

function chatCompletionOpenAI(
  id: string,
  created: number,
  model: string,
  message: AssistantMessage,
  finishReason: string,
  usage: Pick<Usage, 'promptTokens' | 'completionTokens' | 'cachedTokens'> | undefined,
  timings: Timings | null,
): ChatCompletion {
  const out: ChatCompletion = {
    id,
    object: 'chat.completion',
    created,
    model,
    choices: [{ index: 0, message, logprobs: null, finish_reason: finishReason }],
    usage: usageOpenAI(usage),
  };
  // Server-side timings ride along without changing the OpenAI shape (not enumerable).
  Object.defineProperty(out, 'timings', { value: timings, enumerable: false });
  return out;
}

function messageFromProto(m: ChatMessage | undefined): AssistantMessage {
  const out: AssistantMessage = { role: m?.role || 'assistant', content: m?.content ?? null };
  if (!m) return out;
  if (m.reasoningContent) out.reasoning_content = m.reasoningContent;
  if (m.toolCalls.length) {
    out.tool_calls = m.toolCalls.map((c) => ({ id: c.id, type: 'function', function: { name: c.name, arguments: c.arguments } }));
  }
  if (m.toolCallId) out.tool_call_id = m.toolCallId;
  if (m.name) out.name = m.name;
  return out;
}

/** The final proto ChatCompletion in OpenAI's chat.completion shape. */
export function chatCompletionFromProto(f: ProtoChatCompletion): ChatCompletion {
  return chatCompletionOpenAI(f.id, Number(f.created), f.model, messageFromProto(f.message), f.finishReason, f.usage, f.timings ?? null);
}

/**
 * The assistant message that a sequence of OpenAI-shaped deltas spells: content and
 * reasoning joined; tool calls joined by index (id and name from the first delta of an
 * index, arguments concatenated); content null when there are only calls.
 */
export function messageFromDeltas(deltas: Delta[]): AssistantMessage {
  const content: string[] = [];
  const reasoning: string[] = [];
  const calls = new Map<number, { id: string; name: string; args: string[] }>();
  for (const d of deltas) {
    if (d.content) content.push(d.content);
    if (d.reasoning_content) reasoning.push(d.reasoning_content);
    for (const t of d.tool_calls ?? []) {
      let call = calls.get(t.index);
      if (!call) {
        call = { id: t.id ?? '', name: t.function.name ?? '', args: [] };
        calls.set(t.index, call);
      }
      call.args.push(t.function.arguments ?? '');
    }
  }
  const out: AssistantMessage = { role: 'assistant', content: content.length || !calls.size ? content.join('') : null };
  if (reasoning.length) out.reasoning_content = reasoning.join('');
  if (calls.size) {
    out.tool_calls = [...calls.entries()]
      .sort(([a], [b]) => a - b)
      .map(([, c]) => ({ id: c.id, type: 'function', function: { name: c.name, arguments: c.args.join('') } }));
  }
  return out;
}

/**
 * The chat.completion of a chat stream stopped by the caller: exactly the delivered
 * chunks, finish_reason 'cancelled', prompt_tokens from the first chunk.
 */
export function deliveredChatCompletion(chunks: ChatChunk[], header: ChatStreamHeader | null = null): ChatCompletion {
  const first = chunks.length ? chunks[0] : null;
  return chatCompletionOpenAI(
    header?.id || first?.id || 'chatcmpl-' + randomBytes(18).toString('base64url'),
    header?.created || first?.created || Math.floor(Date.now() / 1000),
    header?.model || first?.model || '',
    messageFromDeltas(chunks.map((c) => c.delta)),
    'cancelled',
    {
      promptTokens: header?.promptTokens || first?.promptTokens || 0,
      completionTokens: chunks.reduce((n, c) => n + c.tokenIds.length, 0),
      cachedTokens: 0,
    },
    null,
  );
}
