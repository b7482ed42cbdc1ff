"""The LlamaCrab gRPC servicer: a thin layer over `Llama.submit` and friends.

Knows nothing of llama.cpp: requests become shared types (`llama_crab_client.convert`),
engine errors become gRPC statuses with google.rpc.BadRequest details
(`llama_crab_client.status`), and each stream relays its handle's events.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Optional, TypeVar

from grpc import aio

from llama_crab_client import convert, status
from llama_crab_client.embeddings import EmbedInput, Embeddings
from llama_crab_client.errors import InternalError, LlamaCrabError, UnavailableError
from llama_crab_client.v1 import llama_crab_pb2 as pb
from llama_crab_client.v1 import llama_crab_pb2_grpc as pb_grpc

from .logs import REQUEST_ID_KEY, log_event, new_request_id, request_id_var
from .metrics import ServiceMetrics
from .relay import Final, HandleRelay
from .streaming import CHAT, COMPLETE, StreamEncoder, StreamProgress, final_as_delivered, relay_stream

if TYPE_CHECKING:
    from ..llama import CompletionHandle, Llama

__all__ = ["SERVICE_NAME", "Call", "CallGone", "LlamaCrabServicer", "in_worker", "register_servicer"]

SERVICE_NAME: str = pb.DESCRIPTOR.services_by_name["LlamaCrabService"].full_name

_log = logging.getLogger("llama_crab.server")

Context = aio.ServicerContext[Any, Any]
T = TypeVar("T")


@dataclass
class Call:
    """Book-keeping of one call (an RPC or an HTTP request): who, since when, and how it ended."""

    method: str
    request_id: str
    peer: str
    started: float = field(default_factory=time.monotonic)
    code: str = "OK"
    # A submitted completion logs its own line when its handle closes.
    streamed: bool = False

    def log_finished(self) -> None:
        """The one log line of a call that did not stream (whatever the protocol)."""
        level = logging.WARNING if self.code == "INTERNAL" else logging.DEBUG if self.code == "OK" else logging.INFO
        log_event(
            "call finished",
            level,
            method=self.method,
            code=self.code,
            peer=self.peer,
            duration_ms=round((time.monotonic() - self.started) * 1000, 3),
        )


class LlamaCrabServicer(pb_grpc.LlamaCrabServiceServicer):
    """Complete and Chat (server streaming), Embed, Tokenize, Detokenize, GetModel."""

    def __init__(self, metrics: ServiceMetrics) -> None:
        self._metrics = metrics
        self._llama: Optional[Llama] = None
        self._draining = False
        self._streams: set[HandleRelay] = set()
        self._idle = asyncio.Event()
        self._idle.set()
        self._embed_executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="llama-crab-embed")

    # ---- lifecycle (driven by app.Service) ------------------------------------------
    def attach(self, llama: Llama) -> None:
        self._llama = llama

    def start_draining(self) -> None:
        """From now on new completions get UNAVAILABLE; running ones continue."""
        self._draining = True

    @property
    def in_flight(self) -> int:
        return len(self._streams)

    async def wait_idle(self, timeout: float) -> bool:
        """True once no stream is in flight; False if `timeout` seconds pass first."""
        if self._idle.is_set():
            return True
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except asyncio.TimeoutError:
            return False
        return True

    def cancel_all(self) -> int:
        """Cancel every in-flight stream (each still ends with a CANCELLED Completion)."""
        for relay in list(self._streams):
            relay.cancel()
        return len(self._streams)

    def on_unauthenticated(self, method: str, why: str) -> None:
        """Called by the auth interceptor for each refused call."""
        self._metrics.count_request(method.rsplit("/", 1)[-1], "UNAUTHENTICATED")
        log_event("unauthenticated call refused", logging.WARNING, method=method, reason=why)

    # ---- per-call plumbing ----------------------------------------------------------
    def _ready_llama(self, allow_draining: bool = True) -> Llama:
        if self._llama is None:
            raise UnavailableError("the model is still loading")
        if self._draining and not allow_draining:
            raise UnavailableError("the server is shutting down")
        return self._llama

    @contextlib.asynccontextmanager
    async def _observe(self, method: str, context: Context, refuse_while_draining: bool = False) -> AsyncIterator[Call]:
        """Request id in and out, one status code per call, one log line, one metric.

        `refuse_while_draining`: a new stream on a draining server is refused before any
        header goes out, so its UNAVAILABLE is trailers-only, which gRPC clients and
        proxies (the Python client's retry policy, Envoy's retry_on) may retry elsewhere;
        after headers a call counts as committed and is never retried."""
        given = None
        for key, value in context.invocation_metadata() or ():
            if key == REQUEST_ID_KEY:
                given = value.decode("utf-8", "replace") if isinstance(value, bytes) else value
        call = Call(method, new_request_id(given), context.peer())
        token = request_id_var.set(call.request_id)
        try:
            if refuse_while_draining:
                self._ready_llama(allow_draining=False)
            await context.send_initial_metadata(((REQUEST_ID_KEY, call.request_id),))
            yield call
        except LlamaCrabError as e:
            call.code = e.status
            await status.abort(context, e)
        except asyncio.CancelledError:
            call.code = _cancel_code(context)
            raise
        except aio.AbortError:
            raise  # already reported: `call.code` was set before aborting
        except CallGone:
            call.code = _cancel_code(context)  # nobody to send a status to
        except Exception as e:  # a bug or an engine failure: fail this call only
            call.code = "INTERNAL"
            _log.exception("%s failed", method)
            await status.abort(context, InternalError(f"internal error: {type(e).__name__}"))
        finally:
            self._metrics.count_request(method, call.code)
            if not call.streamed:
                call.log_finished()
            request_id_var.reset(token)

    # ---- RPCs -------------------------------------------------------------------------
    # Writes with `context.write` instead of yielding (the stub's declared shape): a
    # cancelled call then raises right here, so the finally below always runs at once.
    async def Complete(self, request: pb.CompleteRequest, context: Context) -> None:  # type: ignore[override]
        async with self._observe("Complete", context, refuse_while_draining=True) as call:
            llama = self._ready_llama(allow_draining=False)
            prompt, options = convert.complete_request_from_proto(request)
            handle = await in_worker(llama.submit, prompt, options)
            await self._stream(call, handle, COMPLETE, context)

    async def Chat(self, request: pb.ChatRequest, context: Context) -> None:  # type: ignore[override]
        async with self._observe("Chat", context, refuse_while_draining=True) as call:
            llama = self._ready_llama(allow_draining=False)
            chat, options = convert.chat_request_from_proto(request)
            handle = await in_worker(llama.submit_chat, chat, options)
            await self._stream(call, handle, CHAT, context)

    async def _stream(
        self, call: Call, handle: CompletionHandle, encoder: StreamEncoder[Any, Any], context: Context
    ) -> None:
        def code_of(error: BaseException) -> str:
            if isinstance(error, LlamaCrabError):
                return error.status
            return _cancel_code(context)  # cancelled, or the call is gone

        await self.run_stream(call, handle, encoder, lambda m: _write(context, m), code_of)

    def ready_llama(self, allow_draining: bool = True) -> Llama:
        """The served model; UnavailableError while it loads (or, unless allowed, drains)."""
        return self._ready_llama(allow_draining)

    async def run_stream(
        self,
        call: Call,
        handle: CompletionHandle,
        encoder: StreamEncoder[Any, Any],
        write: Callable[[Any], Any],
        code_of: Callable[[BaseException], str],
    ) -> None:
        """Relay `handle` to `write` (an awaitable per message) with every stream's
        book-keeping: drain waits for it, and its metrics and log line count it whatever
        the protocol. `code_of` names how an error ended the call (set before accounting)."""
        relay = HandleRelay(handle)
        progress: StreamProgress[Any] = StreamProgress(prompt_tokens=handle.prompt_tokens)
        self._track(relay, call, progress, encoder)
        try:
            await relay_stream(relay, progress, encoder, write, self._metrics)
        except (asyncio.CancelledError, LlamaCrabError, CallGone) as e:
            call.code = code_of(e)  # known before the accounting below
            raise
        finally:
            # Cancelled call, passed deadline, dropped connection or write failure:
            # stop generating now; the relay closes the handle when the final arrives.
            relay.cancel()
            progress.handler_done = True
            self._account(call, progress, relay, encoder)

    def _track(
        self, relay: HandleRelay, call: Call, progress: StreamProgress[Any], encoder: StreamEncoder[Any, Any]
    ) -> None:
        call.streamed = True
        self._streams.add(relay)
        self._idle.clear()

        def closed(final: Optional[Final], error: Optional[BaseException]) -> None:
            self._streams.discard(relay)
            if not self._streams:
                self._idle.set()
            progress.handle_closed = True
            self._account(call, progress, relay, encoder)

        relay.add_close_callback(closed)

    def _account(
        self, call: Call, progress: StreamProgress[Any], relay: HandleRelay, encoder: StreamEncoder[Any, Any]
    ) -> None:
        """Metrics and the log line of a finished completion (normal, cancelled or failed)."""
        if progress.accounted or not (progress.handler_done and progress.handle_closed):
            return
        progress.accounted = True
        final, error = relay.final, relay.error
        m = self._metrics
        if progress.first_chunk_at is not None:
            m.ttft.observe(progress.first_chunk_at - call.started)
        m.completion_tokens.inc(progress.n_tokens)
        fields: dict[str, Any] = {
            "method": call.method,
            "peer": call.peer,
            "completion_tokens": progress.n_tokens,
            "duration_ms": round((time.monotonic() - call.started) * 1000, 3),
        }
        if final is not None:
            if relay.cancelled:
                final = final_as_delivered(encoder, final, progress)
            m.prompt_tokens.inc(final.usage.prompt_tokens)
            m.completions.labels(stop_reason=encoder.stop_reason(final)).inc()
            fields.update(
                stop_reason=encoder.stop_reason(final),
                prompt_tokens=final.usage.prompt_tokens,
                cached_tokens=final.usage.cached_tokens,
                queue_ms=round(final.timings.queue_ms, 3),
                ttft_ms=round(final.timings.time_to_first_token_ms, 3),
            )
        if error is not None:
            fields["error"] = str(error)
        fields["code"] = call.code
        level = logging.WARNING if error is not None else logging.INFO
        log_event("completion finished", level, **fields)

    async def _unary(self, method: str, context: Context, answer: Callable[[Llama], T]) -> T:
        """Run a unary RPC: `answer(llama)` builds the response (or raises), in a worker
        thread, since tokenizing megabytes must not stall the streams on the event loop."""
        async with self._observe(method, context):
            return await asyncio.to_thread(answer, self._ready_llama())
        raise AssertionError("unreachable: _observe turns every error into an abort")

    async def Tokenize(self, request: pb.TokenizeRequest, context: Context) -> pb.TokenizeResponse:
        def answer(llama: Llama) -> pb.TokenizeResponse:
            text, add_special, parse_special = convert.tokenize_request_from_proto(request)
            return convert.tokenize_response_to_proto(llama.tokenize(text, add_special, parse_special))

        return await self._unary("Tokenize", context, answer)

    async def Detokenize(self, request: pb.DetokenizeRequest, context: Context) -> pb.DetokenizeResponse:
        def answer(llama: Llama) -> pb.DetokenizeResponse:
            return convert.detokenize_response_to_proto(
                llama.detokenize(convert.detokenize_request_from_proto(request))
            )

        return await self._unary("Detokenize", context, answer)

    async def embed(self, inputs: list[EmbedInput], pooling: str = "model", normalize: bool = True) -> Embeddings:
        """`Llama.embed` in the embedding executor. Embed calls take turns on the engine's
        embedding context anyway; waiting in their own one-thread executor, queued ones never
        hold the default pool's threads, which submissions and the other unary calls need.
        A call cancelled while it waits never runs."""
        llama = self._ready_llama()
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._embed_executor, llama.embed, inputs, pooling, normalize)

    async def Embed(self, request: pb.EmbedRequest, context: Context) -> pb.EmbedResponse:
        async with self._observe("Embed", context):
            inputs, pooling, normalize = convert.embed_request_from_proto(request)
            return convert.embed_response_to_proto(await self.embed(inputs, pooling, normalize))
        raise AssertionError("unreachable: _observe turns every error into an abort")

    async def GetModel(self, request: pb.GetModelRequest, context: Context) -> pb.GetModelResponse:
        return await self._unary("GetModel", context, lambda llama: convert.model_info_to_proto(llama.model_info()))


class CallGone(Exception):
    """The client cancelled, its deadline passed or its connection dropped while a write
    waited: grpc fails that write with its own error, and the call is over."""


async def _write(context: Context, message: pb.CompleteResponse) -> None:
    try:
        await context.write(message)
    except asyncio.CancelledError:
        raise
    except Exception as e:  # grpc's ExecuteBatchError and kin: the call has ended
        raise CallGone(str(e)) from e


async def in_worker(submit: Callable[..., CompletionHandle], *args: Any) -> CompletionHandle:
    """`llama.submit` (or `submit_chat`) in a worker thread: tokenizing, rendering a chat
    template and parsing a grammar can take a while, and the event loop relays every
    other stream meanwhile. A call cancelled while the submission runs still gets its
    request released once it exists."""
    future = asyncio.get_running_loop().run_in_executor(None, submit, *args)
    try:
        return await asyncio.shield(future)
    except asyncio.CancelledError:

        def release(done: asyncio.Future[CompletionHandle]) -> None:
            if not done.cancelled() and done.exception() is None:
                handle = done.result()
                handle.cancel()
                asyncio.get_running_loop().run_in_executor(None, handle.close)

        future.add_done_callback(release)
        raise


# The client's clock starts before the server's (the request's flight), so a client whose
# deadline passes resets the stream while the server's copy of the deadline has a few
# milliseconds left; a loaded host stretches that. Within this margin, it was the deadline.
_DEADLINE_MARGIN_S = 0.5


def _cancel_code(context: Context) -> str:
    """Why a call's task was cancelled: its deadline passed, or the client went away."""
    remaining = context.time_remaining()
    if remaining is not None and remaining <= _DEADLINE_MARGIN_S:
        return "DEADLINE_EXCEEDED"
    return "CANCELLED"


def register_servicer(servicer: LlamaCrabServicer, server: aio.Server) -> None:
    pb_grpc.add_LlamaCrabServiceServicer_to_server(servicer, server)
