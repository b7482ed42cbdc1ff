// llama-crab's typed Node.js client. Messages and the service come from protos/ by
// protoc-gen-es (gen/, made by `npm run build`); see README.md.

export { LlamaCrabClient, StreamControl, defaultAddress, deliveredCompletion, drain } from './client';
export type { CallParams, ClientOptions, CompletionOptions, Infill, OnChunk, PoolingName, Prompt } from './client';
export { Stream } from './stream';
export { Session } from './session';
export {
  ChatChunk,
  ChatStreamHeader,
  chatCompletionFromProto,
  chatRequest,
  deliveredChatCompletion,
  deltaFromProto,
  messageFromDeltas,
} from './chat';
export type { AssistantMessage, ChatCompletion, ChatExtras, Delta, MessageParam, ResponseFormat, Tool, ToolCall, ToolChoice } from './chat';
export {
  CancelledError,
  DeadlineExceededError,
  InternalError,
  InvalidArgumentError,
  LlamaCrabError,
  ResourceExhaustedError,
  UnauthenticatedError,
  UnavailableError,
  errorFor,
  fieldViolations,
} from './errors';
export type { FieldViolation } from './errors';
export * as proto from '../gen/llama_crab/v1/llama_crab_pb';
export { StopReason } from '../gen/llama_crab/v1/llama_crab_pb';
export type { Chunk, Completion, EmbedResponse, Embedding, ModelInfo, TokenLogprob, Usage, Timings } from '../gen/llama_crab/v1/llama_crab_pb';
