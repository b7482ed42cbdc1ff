"""What every streaming RPC shares: relaying a handle's events to the client, and the
truth about what was delivered (for the final after a cancel, logs and metrics).

An RPC differs only in its `StreamEncoder`: how a chunk and the final become messages,
how the final of a stream cut short is rebuilt from the delivered chunks, and what its
stop reason is called. `Complete` and `Chat` are two encoders over the same relay.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Generic, Optional, TypeVar, Union

from llama_crab_client import convert
from llama_crab_client.chat import ChatChunk, ChatCompletion, FinishReason, chat_completion_from_delivered
from llama_crab_client.errors import InternalError
from llama_crab_client.types import Chunk, Completion, StopReason, completion_from_delivered

from .metrics import ServiceMetrics
from .relay import EngineFailure, HandleRelay

__all__ = ["CHAT", "COMPLETE", "StreamEncoder", "StreamProgress", "final_as_delivered", "relay_stream"]

C = TypeVar("C", Chunk, ChatChunk)
F = TypeVar("F", Completion, ChatCompletion)


@dataclass
class StreamProgress(Generic[C]):
    """What a stream has delivered so far (the truth for logs and metrics)."""

    prompt_tokens: int = 0
    chunks: list[C] = field(default_factory=list)
    first_chunk_at: Optional[float] = None
    last_chunk_at: Optional[float] = None
    # Accounting waits for both: the handle closed (final known) and the handler done
    # (every chunk it will deliver is in `chunks`), whichever comes last.
    handler_done: bool = False
    handle_closed: bool = False
    accounted: bool = False

    @property
    def n_tokens(self) -> int:
        return sum(len(c.token_ids) for c in self.chunks)


@dataclass(frozen=True)
class StreamEncoder(Generic[C, F]):
    final_type: type
    # (chunk, first of the stream, prompt length) -> response message
    chunk: Callable[[C, bool, int], Any]
    final: Callable[[F], Any]
    # The final of a stream cut short: exactly the delivered chunks.
    delivered: Callable[[F, list[C]], F]
    stop_reason: Callable[[F], str]
    cancelled: Callable[[F], bool]


def _complete_delivered(final: Completion, chunks: list[Chunk]) -> Completion:
    return completion_from_delivered(final, chunks)


def _chat_delivered(final: ChatCompletion, chunks: list[ChatChunk]) -> ChatCompletion:
    return chat_completion_from_delivered(chunks, final=final)


COMPLETE: StreamEncoder[Chunk, Completion] = StreamEncoder(
    final_type=Completion,
    chunk=lambda c, first, prompt_tokens: convert.chunk_response_to_proto(c, prompt_tokens if first else 0),
    final=convert.completion_response_to_proto,
    delivered=_complete_delivered,
    stop_reason=lambda f: f.stop_reason.value,
    cancelled=lambda f: f.stop_reason is StopReason.CANCELLED,
)

CHAT: StreamEncoder[ChatChunk, ChatCompletion] = StreamEncoder(
    final_type=ChatCompletion,
    chunk=lambda c, first, prompt_tokens: convert.chat_chunk_response_to_proto(c, first, prompt_tokens),
    final=convert.chat_completion_response_to_proto,
    delivered=_chat_delivered,
    stop_reason=lambda f: f.finish_reason,
    cancelled=lambda f: f.finish_reason == FinishReason.CANCELLED,
)


def final_as_delivered(encoder: StreamEncoder[C, F], final: F, progress: StreamProgress[C]) -> F:
    """The final of a stream that may have been cut short: what reached the client."""
    if not encoder.cancelled(final):
        return final  # it finished on its own before the cancel landed
    return encoder.delivered(final, progress.chunks)


async def relay_stream(
    relay: HandleRelay,
    progress: StreamProgress[C],
    encoder: StreamEncoder[C, F],
    write: Callable[[Any], Any],
    metrics: ServiceMetrics,
) -> None:
    """Write each chunk, then the final, with `write` (an awaitable per message)."""
    while True:
        try:
            event: Union[C, F] = await relay.next()  # type: ignore[assignment]
        except EngineFailure as e:
            raise InternalError(f"generation failed: {e}") from e
        if isinstance(event, encoder.final_type):
            final: F = event  # type: ignore[assignment]
            if relay.cancelled:  # cancelled by drain: report what the client received
                final = final_as_delivered(encoder, final, progress)
            await write(encoder.final(final))
            return
        chunk: C = event  # type: ignore[assignment]
        now = time.monotonic()
        first = progress.first_chunk_at is None
        if first:
            progress.first_chunk_at = now
        elif progress.last_chunk_at is not None and chunk.token_ids:
            gap = (now - progress.last_chunk_at) / len(chunk.token_ids)
            for _ in chunk.token_ids:
                metrics.token_latency.observe(gap)
        progress.last_chunk_at = now
        progress.chunks.append(chunk)
        # The first chunk carries the prompt length, for clients that stop early.
        await write(encoder.chunk(chunk, first, progress.prompt_tokens))
