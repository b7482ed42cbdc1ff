"""What a remote Complete stream has received and delivered: one state object that the sync
and asyncio streams drive (they differ only in how they wait for the next message), as
`chat_stream.ChatStreamState` is for Chat."""

from __future__ import annotations

from typing import Any, Optional

import grpc

from . import convert
from .calls import StreamClock
from .errors import InternalError
from .status import from_rpc_error
from .types import Chunk, Completion, completion_from_delivered

__all__ = ["CompletionStreamState"]


class CompletionStreamState:
    """The chunks delivered so far, and the Completion once known."""

    def __init__(self, logprobs_requested: bool, prompt_tokens: int) -> None:
        self.logprobs_requested = logprobs_requested
        self.prompt_tokens = prompt_tokens  # known up front for token prompts; else sent on the first chunk
        self.delivered: list[Chunk] = []
        self.clock = StreamClock()
        self.finished = False
        self.completion: Optional[Completion] = None

    def receive(self, message: Any) -> Optional[Chunk]:
        """The chunk to hand out for a response message; None for the final Completion
        (then in `completion`). `message` None: the stream ended without one."""
        if message is None:
            self.finished = True
            raise InternalError("the server ended the stream without a final Completion")
        if message.WhichOneof("response") == "chunk" and message.chunk.prompt_tokens:
            self.prompt_tokens = message.chunk.prompt_tokens
        event = convert.complete_response_from_proto(message, self.logprobs_requested)
        if isinstance(event, Completion):
            self.finished = True
            self.completion = event
            return None
        self.clock.chunk()
        self.delivered.append(event)
        return event

    def failed(self, error: grpc.RpcError) -> Exception:
        self.finished = True
        return from_rpc_error(error)

    def cut_short(self) -> Completion:
        """The Completion of a stream left early: exactly what was delivered (CANCELLED)."""
        self.finished = True
        self.completion = completion_from_delivered(
            None,
            self.delivered,
            prompt_tokens=self.prompt_tokens,
            timings=self.clock.timings(),
            logprobs_requested=self.logprobs_requested,
        )
        return self.completion
