"""llama-crab: stream text generation from llama.cpp, in process or over gRPC.

    from llama_crab import Llama, LlamaParams, CompletionOptions, StreamControl
    llama = Llama.load(LlamaParams("model.gguf").with_n_ctx(512))
    completion = llama.create_completion_stream(
        "Write one short sentence about Rust.",
        CompletionOptions(64).with_stop_sequence("\\n\\n"),
        lambda chunk: StreamControl.CONTINUE,
    )
"""

from llama_crab_client.chat import (
    ChatChunk,
    ChatCompletion,
    ChatMessage,
    FinishReason,
    ResponseFormat,
    Tool,
    ToolCall,
    ToolChoice,
)
from llama_crab_client.chat_session import ChatSession
from llama_crab_client.embeddings import Embedding, Embeddings
from llama_crab_client.infill import Infill, InfillFile
from llama_crab_client.errors import (
    InvalidArgumentError,
    LlamaCrabError,
    ResourceExhaustedError,
    UnavailableError,
)
from llama_crab_client.types import (
    Chunk,
    Completion,
    CompletionCallback,
    CompletionOptions,
    FieldViolation,
    ModelInfo,
    StopReason,
    StreamControl,
    Timings,
    TokenLogprob,
    TopLogprob,
    Usage,
)

from llama_crab_client.sampling import SamplerChain, SamplerStage
from llama_crab_client.session import Session

from .llama import ChatCompletionStream, CompletionHandle, CompletionStream, EngineMetrics, Llama
from .params import LlamaParams, Speculative

__all__ = [
    "ChatChunk",
    "ChatCompletion",
    "ChatCompletionStream",
    "ChatMessage",
    "ChatSession",
    "Chunk",
    "Completion",
    "CompletionCallback",
    "CompletionHandle",
    "CompletionOptions",
    "Embedding",
    "Embeddings",
    "Infill",
    "InfillFile",
    "CompletionStream",
    "EngineMetrics",
    "FieldViolation",
    "FinishReason",
    "InvalidArgumentError",
    "Llama",
    "LlamaCrabError",
    "LlamaParams",
    "ModelInfo",
    "ResourceExhaustedError",
    "ResponseFormat",
    "SamplerChain",
    "SamplerStage",
    "Speculative",
    "Session",
    "StopReason",
    "StreamControl",
    "Timings",
    "TokenLogprob",
    "Tool",
    "ToolCall",
    "ToolChoice",
    "TopLogprob",
    "UnavailableError",
    "Usage",
]
