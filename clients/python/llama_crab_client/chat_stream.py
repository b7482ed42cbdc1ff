"""Remote Chat streams, sync and asyncio, over one shared state object.

Each yields `ChatChunk`s, then a closing chunk (empty delta, finish reason, usage) built
from the server's final `ChatCompletion`, which `completion` then holds. Leaving early
cancels the RPC; `completion` then holds exactly the delivered deltas (`cancelled`).
"""

from __future__ import annotations

from types import TracebackType
from collections.abc import Awaitable
from typing import Any, Callable, Optional, Union

import grpc

from . import convert
from .call_end import end_call, end_call_async
from .chat import ChatChunk, ChatCompletion, ChatCompletionCallback, chat_completion_from_delivered
from .callbacks import run_async_stream, run_stream
from .calls import StreamClock
from .errors import InternalError
from .status import from_rpc_error
from .types import StreamControl

__all__ = [
    "AsyncChatCallback",
    "AsyncRemoteChatStream",
    "ChatStreamState",
    "RemoteChatStream",
    "run_async_chat_stream",
    "run_chat_stream",
]

# A callback may be a plain function or a coroutine function.
AsyncChatCallback = Callable[[ChatChunk], Union[Optional[StreamControl], Awaitable[Optional[StreamControl]]]]


class ChatStreamState:
    """What a remote chat stream has received and delivered."""

    def __init__(self) -> None:
        self.header = convert.ChatStreamHeader()
        self.delivered: list[ChatChunk] = []
        self.clock = StreamClock()
        self.finished = False
        self.completion: Optional[ChatCompletion] = None

    def receive(self, message: Any) -> ChatChunk:
        """The chunk to hand out for a response message (the closing one for the final)."""
        if message is None:
            self.finished = True
            raise InternalError("the server ended the stream without a final ChatCompletion")
        event = convert.chat_response_from_proto(message, self.header)
        if isinstance(event, ChatCompletion):
            self.finished = True
            self.completion = event
            return event.last_chunk()
        self.clock.chunk()
        self.delivered.append(event)
        return event

    def failed(self, error: grpc.RpcError) -> Exception:
        self.finished = True
        return from_rpc_error(error)

    def cut_short(self) -> ChatCompletion:
        self.finished = True
        self.completion = chat_completion_from_delivered(
            self.delivered,
            id=self.header.id,
            model=self.header.model,
            prompt_tokens=self.header.prompt_tokens,
            timings=self.clock.timings(),
        )
        return self.completion


class RemoteChatStream:
    """Iterate the chunks of a remote chat reply; `completion` holds the result after."""

    def __init__(self, call: Any) -> None:
        self._call = call
        self._state = ChatStreamState()

    @property
    def completion(self) -> Optional[ChatCompletion]:
        return self._state.completion

    def __iter__(self) -> RemoteChatStream:
        return self

    def __next__(self) -> ChatChunk:
        if self._state.finished:
            raise StopIteration
        try:
            message = next(self._call)
        except StopIteration:
            message = None
        except grpc.RpcError as e:
            raise self._state.failed(e) from None
        chunk = self._state.receive(message)
        if self._state.completion is not None:
            end_call(self._call)
        return chunk

    def close(self) -> ChatCompletion:
        """Stop now (if not finished) and return the ChatCompletion of what was delivered."""
        if self._state.completion is None:
            self._call.cancel()
            return self._state.cut_short()
        return self._state.completion

    def __enter__(self) -> RemoteChatStream:
        return self

    def __exit__(
        self, exc_type: Optional[type[BaseException]], exc: Optional[BaseException], tb: Optional[TracebackType]
    ) -> None:
        self.close()

    def __del__(self) -> None:
        state = getattr(self, "_state", None)
        if state is not None and not state.finished:
            try:
                self._call.cancel()
            except Exception:  # interpreter shutdown: nothing useful to do
                pass


class AsyncRemoteChatStream:
    """`async for` the chunks of a remote chat reply; `completion` holds the result after."""

    def __init__(self, call: Any) -> None:
        self._call = call  # grpc.aio.UnaryStreamCall
        self._state = ChatStreamState()

    @property
    def completion(self) -> Optional[ChatCompletion]:
        return self._state.completion

    def __aiter__(self) -> AsyncRemoteChatStream:
        return self

    async def __anext__(self) -> ChatChunk:
        if self._state.finished:
            raise StopAsyncIteration
        try:
            message = await self._call.read()
        except grpc.RpcError as e:
            raise self._state.failed(e) from None
        chunk = self._state.receive(None if message is grpc.aio.EOF else message)
        if self._state.completion is not None:
            await end_call_async(self._call)
        return chunk

    async def close(self) -> ChatCompletion:
        """Stop now (if not finished) and return the ChatCompletion of what was delivered."""
        if self._state.completion is None:
            self._call.cancel()
            return self._state.cut_short()
        return self._state.completion

    async def __aenter__(self) -> AsyncRemoteChatStream:
        return self

    async def __aexit__(
        self, exc_type: Optional[type[BaseException]], exc: Optional[BaseException], tb: Optional[TracebackType]
    ) -> None:
        await self.close()

    def __del__(self) -> None:
        state = getattr(self, "_state", None)
        if state is not None and not state.finished:
            try:
                self._call.cancel()
            except Exception:  # loop already closed: the channel's close cancels it
                pass


def run_chat_stream(stream: RemoteChatStream, callback: ChatCompletionCallback) -> ChatCompletion:
    """Feed `callback` until the end or STOP (see `callbacks.run_stream`)."""
    result: ChatCompletion = run_stream(stream, callback)
    return result


async def run_async_chat_stream(stream: AsyncRemoteChatStream, callback: AsyncChatCallback) -> ChatCompletion:
    """`run_chat_stream` for asyncio; `callback` may be a coroutine function."""
    result: ChatCompletion = await run_async_stream(stream, callback)
    return result
