"""llama-crab client: the in-process `Llama` API over gRPC, and the types both sides share.

    from llama_crab_client import Client, CompletionOptions

    with Client("localhost:50051") as client:
        print(client.create_completion("The capital of France is", CompletionOptions(8)).text)

`AsyncClient` is the asyncio twin. Errors are the same exception types as in process
(`InvalidArgumentError` with `.field`, `ResourceExhaustedError`, ...).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .chat import (
    ChatChunk,
    ChatCompletion,
    ChatDelta,
    ChatMessage,
    ChatRequest,
    FinishReason,
    ResponseFormat,
    Tool,
    ToolCall,
    ToolCallDelta,
    ToolChoice,
)
from .embeddings import Embedding, Embeddings
from .errors import (
    DeadlineExceededError,
    InternalError,
    InvalidArgumentError,
    LlamaCrabError,
    PermissionDeniedError,
    ResourceExhaustedError,
    UnauthenticatedError,
    UnavailableError,
)
from .infill import Infill, InfillFile
from .sampling import SamplerChain, SamplerStage
from .types import (
    Chunk,
    Completion,
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

if TYPE_CHECKING:
    from .aio import AsyncClient, AsyncRemoteCompletionStream
    from .chat_session import AsyncChatSession, ChatSession
    from .client import Client, RemoteCompletionStream
    from .session import AsyncSession, Session

__version__ = "0.1.0"

# The clients need grpc; the types above do not. Import the clients on first use, so
# `import llama_crab_client.types` (or `.chat`) works without grpc installed.
_LAZY = {
    "AsyncClient": ".aio",
    "AsyncRemoteCompletionStream": ".aio",
    "Client": ".client",
    "RemoteCompletionStream": ".client",
    "AsyncSession": ".session",
    "Session": ".session",
    "AsyncChatSession": ".chat_session",
    "ChatSession": ".chat_session",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


__all__ = [
    "AsyncChatSession",
    "AsyncClient",
    "AsyncRemoteCompletionStream",
    "AsyncSession",
    "ChatChunk",
    "ChatCompletion",
    "ChatDelta",
    "ChatMessage",
    "ChatRequest",
    "ChatSession",
    "Chunk",
    "Client",
    "Completion",
    "Embedding",
    "Embeddings",
    "Infill",
    "InfillFile",
    "CompletionOptions",
    "DeadlineExceededError",
    "FieldViolation",
    "FinishReason",
    "InternalError",
    "InvalidArgumentError",
    "LlamaCrabError",
    "ModelInfo",
    "PermissionDeniedError",
    "RemoteCompletionStream",
    "ResponseFormat",
    "SamplerChain",
    "SamplerStage",
    "ResourceExhaustedError",
    "Session",
    "StopReason",
    "StreamControl",
    "Timings",
    "TokenLogprob",
    "Tool",
    "ToolCall",
    "ToolCallDelta",
    "ToolChoice",
    "TopLogprob",
    "UnauthenticatedError",
    "UnavailableError",
    "Usage",
]
