"""llama-crab client: the in-process `Llama` API over gRPC, and the types both sides share.

    from llama_crab_client import Client, CompletionOptions

    with Client("localhost:50051") as client:
        print(client.create_completion("The capital of France is", CompletionOptions(8)).text)

`AsyncClient` is the asyncio twin. Errors are the same exception types as in process
(`InvalidArgumentError` with `.field`, `ResourceExhaustedError`, ...).
"""

from __future__ import annotations

from .aio import AsyncClient, AsyncRemoteCompletionStream
from .client import Client, RemoteCompletionStream
from .session import AsyncSession, Session
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

__version__ = "0.1.0"

__all__ = [
    "AsyncClient",
    "AsyncRemoteCompletionStream",
    "AsyncSession",
    "Chunk",
    "Client",
    "Completion",
    "CompletionOptions",
    "DeadlineExceededError",
    "FieldViolation",
    "InternalError",
    "InvalidArgumentError",
    "LlamaCrabError",
    "ModelInfo",
    "PermissionDeniedError",
    "RemoteCompletionStream",
    "ResourceExhaustedError",
    "Session",
    "StopReason",
    "StreamControl",
    "Timings",
    "TokenLogprob",
    "TopLogprob",
    "UnauthenticatedError",
    "UnavailableError",
    "Usage",
]
