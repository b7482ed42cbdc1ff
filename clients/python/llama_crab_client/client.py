"""The synchronous remote client: the in-process `Llama` API over gRPC.

    with Client("localhost:50051") as client:
        for chunk in client.stream("Once upon a time", CompletionOptions(32)):
            print(chunk.text, end="", flush=True)

Leaving a stream early (break, `close()`, an exception, STOP from a callback) cancels
the RPC, and the Completion then holds exactly the chunks delivered, with stop reason
CANCELLED, as in process.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from types import TracebackType
from typing import Any, Optional, Union

import grpc

from . import convert
from .call_end import end_call
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
from .chat import ChatCompletion, ChatCompletionCallback, ChatMessage, ChatRequest, ResponseFormat, Tool
from .chat_stream import RemoteChatStream, run_chat_stream
from .callbacks import run_stream
from .channel import ClientBase
from .status import from_rpc_error
from .stream_state import CompletionStreamState
from .chat_session import ChatSession
from .session import Session
from .types import (
    Chunk,
    Completion,
    CompletionCallback,
    CompletionOptions,
    ModelInfo,
)
from .v1 import llama_crab_pb2 as pb
from .v1 import llama_crab_pb2_grpc as pb_grpc

__all__ = ["Client", "RemoteCompletionStream", "StreamClock"]


Messages = Sequence[Union[ChatMessage, Mapping[str, Any]]]
Tools = Optional[Sequence[Union[Tool, Mapping[str, Any]]]]


class RemoteCompletionStream:
    """Iterate chunks of a remote completion; `completion` holds the result once iteration ends.

    Leaving the loop early (break, exception, `close()`, the stream being dropped)
    cancels the RPC; `completion` then holds what was delivered (CANCELLED).
    """

    def __init__(self, call: Any, logprobs_requested: bool, prompt_tokens: int) -> None:
        self._call = call  # grpc's stream call: an iterator of responses with cancel()
        self._state = CompletionStreamState(logprobs_requested, prompt_tokens)

    @property
    def completion(self) -> Optional[Completion]:
        return self._state.completion

    def __iter__(self) -> RemoteCompletionStream:
        return self

    def __next__(self) -> Chunk:
        if self._state.finished:
            raise StopIteration
        try:
            message = next(self._call)
        except StopIteration:
            message = None
        except grpc.RpcError as e:
            raise self._state.failed(e) from None
        chunk = self._state.receive(message)
        if chunk is None:
            end_call(self._call)
            raise StopIteration
        return chunk

    def close(self) -> Completion:
        """Stop now (if not finished) and return the Completion of what was delivered."""
        if self._state.completion is None:
            self._call.cancel()
            return self._state.cut_short()
        return self._state.completion

    def __enter__(self) -> RemoteCompletionStream:
        return self

    def __exit__(
        self,
        exc_type: Optional[type[BaseException]],
        exc: Optional[BaseException],
        tb: Optional[TracebackType],
    ) -> None:
        self.close()

    def __del__(self) -> None:
        state = getattr(self, "_state", None)
        if state is not None and not state.finished:
            try:
                self._call.cancel()
            except Exception:  # interpreter shutdown: nothing useful to do
                pass


class Client(ClientBase):
    """A llama-crab server, used like the in-process `Llama` (connection options: `ClientBase`)."""

    def _connect(self) -> None:
        self._channel = self.settings.sync_channel()
        self._stub = pb_grpc.LlamaCrabServiceStub(self._channel)

    # ---- lifecycle ------------------------------------------------------------------
    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- calls ----------------------------------------------------------------------
    def stream(
        self,
        prompt: Prompt,
        options: Optional[CompletionOptions] = None,
        *,
        timeout: Optional[float] = None,
        request_id: Optional[str] = None,
        session_id: Optional[str] = None,
    ) -> RemoteCompletionStream:
        """Iterate chunks: `for chunk in client.stream(...)`; leaving the loop is STOP."""
        call = complete_call(prompt, options)
        rpc = self._stub.Complete(call.request, **self._call_kwargs(timeout, request_id, session_id))
        return RemoteCompletionStream(rpc, call.logprobs_requested, call.prompt_tokens)

    def create_completion_stream(
        self,
        prompt: Prompt,
        options: Optional[CompletionOptions],
        callback: CompletionCallback,
        *,
        timeout: Optional[float] = None,
        request_id: Optional[str] = None,
        session_id: Optional[str] = None,
    ) -> Completion:
        """Stream chunks to `callback` and return the final Completion.

        `callback` returns StreamControl.CONTINUE (or None) or StreamControl.STOP; after
        STOP the RPC is cancelled and the Completion holds exactly the delivered chunks
        (CANCELLED). An exception from the callback cancels the RPC and propagates.
        """
        stream = self.stream(prompt, options, timeout=timeout, request_id=request_id, session_id=session_id)
        result: Completion = run_stream(stream, callback)
        return result

    def create_completion(
        self,
        prompt: Prompt,
        options: Optional[CompletionOptions] = None,
        *,
        timeout: Optional[float] = None,
        request_id: Optional[str] = None,
        session_id: Optional[str] = None,
    ) -> Completion:
        """Generate to the end and return the Completion."""
        with self.stream(prompt, options, timeout=timeout, request_id=request_id, session_id=session_id) as stream:
            for _ in stream:
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
    ) -> RemoteChatStream:
        """Iterate `ChatChunk`s: `for chunk in client.chat_stream(...)`; leaving the loop is STOP."""
        request = chat_call(ChatRequest.build(messages, tools, tool_choice, response_format), options)
        return RemoteChatStream(self._stub.Chat(request, **self._call_kwargs(timeout, request_id)))

    def create_chat_completion_stream(
        self,
        messages: Messages,
        options: Optional[CompletionOptions],
        callback: ChatCompletionCallback,
        tools: Tools = None,
        tool_choice: Union[str, Mapping[str, Any], None] = None,
        response_format: Union[ResponseFormat, Mapping[str, Any], None] = None,
        *,
        timeout: Optional[float] = None,
        request_id: Optional[str] = None,
    ) -> ChatCompletion:
        """Stream `ChatChunk`s to `callback`; STOP cancels the RPC and the result holds
        exactly the delivered deltas (finish reason `cancelled`)."""
        stream = self.chat_stream(
            messages, options, tools, tool_choice, response_format, timeout=timeout, request_id=request_id
        )
        return run_chat_stream(stream, callback)

    def create_chat_completion(
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
        with self.chat_stream(
            messages, options, tools, tool_choice, response_format, timeout=timeout, request_id=request_id
        ) as stream:
            for _ in stream:
                pass
            assert stream.completion is not None
            return stream.completion

    def _unary(self, method: Any, request: Any, timeout: Optional[float], request_id: Optional[str]) -> Any:
        try:
            return method(request, **self._call_kwargs(timeout, request_id))
        except grpc.RpcError as e:
            raise from_rpc_error(e) from None

    def embed(
        self,
        inputs: Sequence[EmbedInput],
        pooling: str = "model",
        normalize: bool = True,
        *,
        timeout: Optional[float] = None,
        request_id: Optional[str] = None,
    ) -> Embeddings:
        """Embeddings of `inputs` (texts or token id lists), in order; see `Llama.embed`."""
        reply: pb.EmbedResponse = self._unary(
            self._stub.Embed, embed_request(inputs, pooling, normalize), timeout, request_id
        )
        return convert.embed_response_from_proto(reply)

    def tokenize(
        self,
        text: str,
        add_special: bool = True,
        parse_special: bool = True,
        *,
        timeout: Optional[float] = None,
        request_id: Optional[str] = None,
    ) -> list[int]:
        """Tokens of `text`; `add_special` adds BOS/EOS as the model's metadata asks."""
        reply: pb.TokenizeResponse = self._unary(
            self._stub.Tokenize, tokenize_request(text, add_special, parse_special), timeout, request_id
        )
        return list(reply.tokens)

    def detokenize(
        self, tokens: Sequence[int], *, timeout: Optional[float] = None, request_id: Optional[str] = None
    ) -> str:
        reply: pb.DetokenizeResponse = self._unary(
            self._stub.Detokenize, detokenize_request(tokens), timeout, request_id
        )
        return reply.text

    def model_info(self, *, timeout: Optional[float] = None, request_id: Optional[str] = None) -> ModelInfo:
        reply: pb.GetModelResponse = self._unary(self._stub.GetModel, pb.GetModelRequest(), timeout, request_id)
        return convert.model_info_from_proto(reply)

    def chat_session(
        self, system: Optional[str] = None, tools: Sequence[Tool] = (), messages: Sequence[ChatMessage] = ()
    ) -> ChatSession:
        """A conversation kept across turns (`ChatSession`); the prefix cache makes each turn
        compute only its new tokens."""
        return ChatSession(self, system, tools, messages)

    def session(self, tokens: Sequence[int] = (), session_id: Optional[str] = None) -> Session:
        """A token history continued across calls (`Session`); the server's prefix cache
        makes each turn prefill only its new tokens. No server-side state is kept.

        Each call carries `x-session-id` (`session_id`, else a random one): a balancer that
        hashes on it (deploy/nginx) sends every turn to the replica whose cache holds it."""
        return Session(_SessionCalls(self, session_id or uuid.uuid4().hex), tokens)

    def model(self, *, timeout: Optional[float] = None, request_id: Optional[str] = None) -> ModelInfo:
        """Alias of `model_info()`."""
        return self.model_info(timeout=timeout, request_id=request_id)


class _SessionCalls:
    """A `Client`'s calls that a `Session` makes, each with the session's `x-session-id`."""

    def __init__(self, client: Client, session_id: str) -> None:
        self.client = client
        self.session_id = session_id

    def tokenize(self, text: str, add_special: bool = True, parse_special: bool = True) -> list[int]:
        return self.client.tokenize(text, add_special, parse_special)

    def create_completion(self, prompt: Prompt, options: Optional[CompletionOptions] = None) -> Completion:
        return self.client.create_completion(prompt, options, session_id=self.session_id)

    def create_completion_stream(
        self, prompt: Prompt, options: Optional[CompletionOptions], callback: CompletionCallback
    ) -> Completion:
        return self.client.create_completion_stream(prompt, options, callback, session_id=self.session_id)
