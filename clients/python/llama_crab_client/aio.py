"""The asyncio remote client (grpc.aio), mirroring `Client` with `await`/`async for`.

    async with AsyncClient("localhost:50051") as client:
        async with client.stream("Once upon a time", CompletionOptions(32)) as stream:
            async for chunk in stream:
                print(chunk.text, end="", flush=True)
        print(stream.completion)
"""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Mapping, Sequence
from types import TracebackType
from typing import Any, Callable, Optional, Union

import grpc

from . import convert
from .call_end import end_call_async
from .calls import (
    Prompt,
    StreamClock,
    chat_call,
    complete_call,
    detokenize_request,
    embed_request,
    tokenize_request,
)
from .embeddings import EmbedInput, Embeddings
from .chat import ChatCompletion, ChatMessage, ChatRequest, ResponseFormat, Tool
from .chat_stream import AsyncChatCallback, AsyncRemoteChatStream, run_async_chat_stream
from .callbacks import run_async_stream
from .channel import ClientBase
from .status import from_rpc_error
from .stream_state import CompletionStreamState
from .chat_session import AsyncChatSession
from .session import AsyncSession
from .types import (
    Chunk,
    Completion,
    CompletionOptions,
    ModelInfo,
    StreamControl,
)
from .v1 import llama_crab_pb2 as pb
from .v1 import llama_crab_pb2_grpc as pb_grpc

__all__ = ["AsyncClient", "AsyncCompletionCallback", "AsyncRemoteCompletionStream"]

# A callback may be a plain function or a coroutine function.
AsyncCompletionCallback = Callable[
    [Chunk], Union[Optional[StreamControl], Awaitable[Optional[StreamControl]]]
]


Messages = Sequence[Union[ChatMessage, Mapping[str, Any]]]
Tools = Optional[Sequence[Union[Tool, Mapping[str, Any]]]]


class AsyncRemoteCompletionStream:
    """`async for` the chunks; `completion` holds the result once iteration ends.

    Leaving early (break inside `async with`, `await close()`, an exception) cancels the
    RPC; `completion` then holds what was delivered (CANCELLED).
    """

    def __init__(self, call: Any, logprobs_requested: bool, prompt_tokens: int) -> None:
        self._call = call  # grpc.aio.UnaryStreamCall
        self._state = CompletionStreamState(logprobs_requested, prompt_tokens)

    @property
    def completion(self) -> Optional[Completion]:
        return self._state.completion

    def __aiter__(self) -> AsyncRemoteCompletionStream:
        return self

    async def __anext__(self) -> Chunk:
        if self._state.finished:
            raise StopAsyncIteration
        try:
            message = await self._call.read()
        except grpc.RpcError as e:
            raise self._state.failed(e) from None
        chunk = self._state.receive(None if message is grpc.aio.EOF else message)
        if chunk is None:
            await end_call_async(self._call)
            raise StopAsyncIteration
        return chunk

    async def close(self) -> Completion:
        """Stop now (if not finished) and return the Completion of what was delivered."""
        if self._state.completion is None:
            self._call.cancel()
            return self._state.cut_short()
        return self._state.completion

    async def __aenter__(self) -> AsyncRemoteCompletionStream:
        return self

    async def __aexit__(
        self,
        exc_type: Optional[type[BaseException]],
        exc: Optional[BaseException],
        tb: Optional[TracebackType],
    ) -> None:
        await self.close()

    def __del__(self) -> None:
        state = getattr(self, "_state", None)
        if state is not None and not state.finished:
            try:
                self._call.cancel()
            except Exception:  # loop already closed: the channel's close cancels it
                pass


class AsyncClient(ClientBase):
    """A llama-crab server over grpc.aio; the same options as `Client`."""

    def _connect(self) -> None:
        self._channel = self.settings.aio_channel()
        self._stub = pb_grpc.LlamaCrabServiceStub(self._channel)

    # ---- lifecycle ------------------------------------------------------------------
    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # ---- calls ----------------------------------------------------------------------
    def stream(
        self,
        prompt: Prompt,
        options: Optional[CompletionOptions] = None,
        *,
        timeout: Optional[float] = None,
        request_id: Optional[str] = None,
        session_id: Optional[str] = None,
    ) -> AsyncRemoteCompletionStream:
        """`async for chunk in client.stream(...)` (inside `async with` to cancel on leaving)."""
        call = complete_call(prompt, options)
        rpc = self._stub.Complete(call.request, **self._call_kwargs(timeout, request_id, session_id))
        return AsyncRemoteCompletionStream(rpc, call.logprobs_requested, call.prompt_tokens)

    async def create_completion_stream(
        self,
        prompt: Prompt,
        options: Optional[CompletionOptions],
        callback: AsyncCompletionCallback,
        *,
        timeout: Optional[float] = None,
        request_id: Optional[str] = None,
        session_id: Optional[str] = None,
    ) -> Completion:
        """Stream chunks to `callback` (plain or async) and return the final Completion.

        STOP cancels the RPC and the Completion holds exactly the delivered chunks; an
        exception from the callback cancels and propagates.
        """
        stream = self.stream(prompt, options, timeout=timeout, request_id=request_id, session_id=session_id)
        result: Completion = await run_async_stream(stream, callback)
        return result

    async def create_completion(
        self,
        prompt: Prompt,
        options: Optional[CompletionOptions] = None,
        *,
        timeout: Optional[float] = None,
        request_id: Optional[str] = None,
        session_id: Optional[str] = None,
    ) -> Completion:
        """Generate to the end and return the Completion."""
        async with self.stream(prompt, options, timeout=timeout, request_id=request_id, session_id=session_id) as stream:
            async for _ in stream:
                pass
            assert stream.completion is not None
            return stream.completion

    # ---- chat -----------------------------------------------------------------------
    def chat_stream(
        self,
        messages: Messages,
        options: Optional[CompletionOptions] = None,
        tools: Tools = None,
        tool_choice: Union[str, Mapping[str, Any], None] = None,
        response_format: Union[ResponseFormat, Mapping[str, Any], None] = None,
        *,
        timeout: Optional[float] = None,
        request_id: Optional[str] = None,
    ) -> AsyncRemoteChatStream:
        """`async for chunk in client.chat_stream(...)` (inside `async with` to cancel on leaving)."""
        request = chat_call(ChatRequest.build(messages, tools, tool_choice, response_format), options)
        return AsyncRemoteChatStream(self._stub.Chat(request, **self._call_kwargs(timeout, request_id)))

    async def create_chat_completion_stream(
        self,
        messages: Messages,
        options: Optional[CompletionOptions],
        callback: AsyncChatCallback,
        tools: Tools = None,
        tool_choice: Union[str, Mapping[str, Any], None] = None,
        response_format: Union[ResponseFormat, Mapping[str, Any], None] = None,
        *,
        timeout: Optional[float] = None,
        request_id: Optional[str] = None,
    ) -> ChatCompletion:
        """Stream `ChatChunk`s to `callback` (plain or async); STOP cancels the RPC and the
        result holds exactly the delivered deltas."""
        stream = self.chat_stream(
            messages, options, tools, tool_choice, response_format, timeout=timeout, request_id=request_id
        )
        return await run_async_chat_stream(stream, callback)

    async def create_chat_completion(
        self,
        messages: Messages,
        options: Optional[CompletionOptions] = None,
        tools: Tools = None,
        tool_choice: Union[str, Mapping[str, Any], None] = None,
        response_format: Union[ResponseFormat, Mapping[str, Any], None] = None,
        *,
        timeout: Optional[float] = None,
        request_id: Optional[str] = None,
    ) -> ChatCompletion:
        """Generate the whole reply and return the `ChatCompletion`."""
        async with self.chat_stream(
            messages, options, tools, tool_choice, response_format, timeout=timeout, request_id=request_id
        ) as stream:
            async for _ in stream:
                pass
            assert stream.completion is not None
            return stream.completion

    async def _unary(self, method: Any, request: Any, timeout: Optional[float], request_id: Optional[str]) -> Any:
        try:
            return await method(request, **self._call_kwargs(timeout, request_id))
        except grpc.RpcError as e:
            raise from_rpc_error(e) from None

    async def embed(
        self,
        inputs: Sequence[EmbedInput],
        pooling: str = "model",
        normalize: bool = True,
        *,
        timeout: Optional[float] = None,
        request_id: Optional[str] = None,
    ) -> Embeddings:
        """Embeddings of `inputs` (texts or token id lists), in order; see `Llama.embed`."""
        reply: pb.EmbedResponse = await self._unary(
            self._stub.Embed, embed_request(inputs, pooling, normalize), timeout, request_id
        )
        return convert.embed_response_from_proto(reply)

    async def tokenize(
        self,
        text: str,
        add_special: bool = True,
        parse_special: bool = True,
        *,
        timeout: Optional[float] = None,
        request_id: Optional[str] = None,
    ) -> list[int]:
        reply: pb.TokenizeResponse = await self._unary(
            self._stub.Tokenize, tokenize_request(text, add_special, parse_special), timeout, request_id
        )
        return list(reply.tokens)

    def chat_session(
        self, system: Optional[str] = None, tools: Sequence[Tool] = (), messages: Sequence[ChatMessage] = ()
    ) -> AsyncChatSession:
        """A conversation kept across turns (`AsyncChatSession`); the prefix cache makes each turn
        compute only its new tokens."""
        return AsyncChatSession(self, system, tools, messages)

    def session(self, tokens: Sequence[int] = (), session_id: Optional[str] = None) -> AsyncSession:
        """A token history continued across calls (`AsyncSession`); the server's prefix
        cache makes each turn prefill only its new tokens. No server-side state is kept.
        Each call carries `x-session-id` (`session_id`, else a random one), as `Client.session`."""
        return AsyncSession(_AsyncSessionCalls(self, session_id or uuid.uuid4().hex), tokens)

    async def detokenize(
        self, tokens: Sequence[int], *, timeout: Optional[float] = None, request_id: Optional[str] = None
    ) -> str:
        reply: pb.DetokenizeResponse = await self._unary(
            self._stub.Detokenize, detokenize_request(tokens), timeout, request_id
        )
        return reply.text

    async def model_info(self, *, timeout: Optional[float] = None, request_id: Optional[str] = None) -> ModelInfo:
        reply: pb.GetModelResponse = await self._unary(
            self._stub.GetModel, pb.GetModelRequest(), timeout, request_id
        )
        return convert.model_info_from_proto(reply)

    async def model(self, *, timeout: Optional[float] = None, request_id: Optional[str] = None) -> ModelInfo:
        """Alias of `model_info()`."""
        return await self.model_info(timeout=timeout, request_id=request_id)


class _AsyncSessionCalls:
    """An `AsyncClient`'s calls that an `AsyncSession` makes, each with its `x-session-id`."""

    def __init__(self, client: AsyncClient, session_id: str) -> None:
        self.client = client
        self.session_id = session_id

    async def tokenize(self, text: str, add_special: bool = True, parse_special: bool = True) -> list[int]:
        return await self.client.tokenize(text, add_special, parse_special)

    async def create_completion(self, prompt: Prompt, options: Optional[CompletionOptions] = None) -> Completion:
        return await self.client.create_completion(prompt, options, session_id=self.session_id)

    async def create_completion_stream(
        self, prompt: Prompt, options: Optional[CompletionOptions], callback: AsyncCompletionCallback
    ) -> Completion:
        return await self.client.create_completion_stream(prompt, options, callback, session_id=self.session_id)
