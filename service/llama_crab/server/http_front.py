"""The OpenAI-compatible HTTP front: Starlette routes under uvicorn, in the gRPC server's
own event loop, over the same servicer (so the same engine, queue, limits, drain, metrics
and log lines).

Starlette and uvicorn because they are the ASGI stack vLLM's OpenAI server runs on: small,
typed, well kept, with streaming and client-disconnect handling done right; nothing here
parses HTTP by hand. Streams are written straight to ASGI `send` by the shared relay, so a
client that stops reading stalls the relay and the engine pauses that sequence, as on gRPC.

Routes: GET /health, GET /v1/models, POST /v1/completions, POST /v1/chat/completions,
POST /tokenize, POST /detokenize.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import socket
from collections.abc import Awaitable, Iterator
from typing import TYPE_CHECKING, Any, Callable, Optional

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from llama_crab_client.errors import InternalError, InvalidArgumentError, LlamaCrabError, UnauthenticatedError
from llama_crab_client.types import FieldViolation

from .logs import REQUEST_ID_KEY, log_event, new_request_id, request_id_var
from .openai_embeddings import embed_call, embeddings_body
from .openai_requests import chat_call, text_call
from .openai_stream import chat_encoder, error_event, error_of, http_status, text_encoder
from .servicer import Call, CallGone, LlamaCrabServicer, in_worker
from .streaming import StreamEncoder

if TYPE_CHECKING:
    from ..llama import CompletionHandle, Llama
    from .config import ServeConfig
    from .metrics import ServiceMetrics

__all__ = ["HttpFront"]

_log = logging.getLogger("llama_crab.server")

_SSE_HEADERS = {"content-type": "text/event-stream", "cache-control": "no-cache", "x-accel-buffering": "no"}
# A full queue: when to try again (a slot frees within a generation; clients back off).
_RETRY_AFTER_S = "1"


def _error_response(error: LlamaCrabError, request_id: str) -> JSONResponse:
    headers = {REQUEST_ID_KEY: request_id}
    if error.status == "RESOURCE_EXHAUSTED":
        headers["retry-after"] = _RETRY_AFTER_S
    if error.status == "UNAUTHENTICATED":
        headers["www-authenticate"] = "Bearer"
    return JSONResponse(error_of(error), status_code=http_status(error.status), headers=headers)


class _EventStream(Response):
    """Server-sent events written by `run(write)`; a client that disconnects cancels `run`
    (a STOP to the engine). An error after the first byte becomes an error event."""

    def __init__(
        self,
        run: Callable[[Callable[[Any], Awaitable[None]]], Awaitable[None]],
        abandon: Callable[[], None],
        request_id: str,
    ) -> None:
        super().__init__()
        # No content-length: the body is as long as the stream.
        headers = {**_SSE_HEADERS, REQUEST_ID_KEY: request_id}
        self.raw_headers = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()]
        self._run = run
        self._abandon = abandon  # releases the request if `run` never got to start

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        started = False

        async def body_task(write: Callable[[Any], Awaitable[None]]) -> None:
            nonlocal started
            started = True
            await self._run(write)

        try:
            await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
            await self._stream(body_task, receive, send)
        finally:
            if not started:
                self._abandon()

    async def _stream(
        self, run: Callable[[Callable[[Any], Awaitable[None]]], Awaitable[None]], receive: Receive, send: Send
    ) -> None:

        async def write(data: Optional[bytes]) -> None:
            if data:
                try:
                    await send({"type": "http.response.body", "body": data, "more_body": True})
                except asyncio.CancelledError:
                    raise
                except Exception as e:  # the connection went away mid-write
                    raise CallGone(str(e)) from e

        left, error = await _watching_disconnect(run(write), receive)
        if left:
            return  # the client left: nothing more to send
        if isinstance(error, CallGone):
            return  # nobody left to write to
        tail = b""
        if isinstance(error, LlamaCrabError):
            tail = error_event(error)
        elif isinstance(error, BaseException) and not isinstance(error, asyncio.CancelledError):
            _log.error("HTTP stream failed", exc_info=error)
            tail = error_event(InternalError("internal error"))
        with contextlib.suppress(Exception):
            await send({"type": "http.response.body", "body": tail, "more_body": False})


async def _watching_disconnect(work: Awaitable[None], receive: Receive) -> tuple[bool, Optional[BaseException]]:
    """Run `work` until it ends or the client disconnects, which cancels it (a STOP to the
    engine). Returns (whether the client left, the exception `work` ended with)."""

    async def disconnected() -> None:
        while (await receive())["type"] != "http.disconnect":
            pass

    body = asyncio.ensure_future(work)
    watch = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({body, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (body, watch):
            task.cancel()
        results = await asyncio.gather(body, watch, return_exceptions=True)
    left = watch.done() and not watch.cancelled()
    error = results[0] if isinstance(results[0], BaseException) else None
    return left, error


class _Server(uvicorn.Server):
    """uvicorn inside our own loop: the service owns the signals (drain on SIGTERM)."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class HttpFront:
    """The HTTP listener of one Service."""

    def __init__(self, config: ServeConfig, servicer: LlamaCrabServicer, metrics: ServiceMetrics) -> None:
        self._config = config
        self._servicer = servicer
        self._metrics = metrics
        self._token = config.resolved_auth_token()
        self._max_body = config.max_message_bytes
        self._server: Optional[_Server] = None
        self._task: Optional[asyncio.Task[None]] = None
        self.port = 0
        self.app = Starlette(
            routes=[
                Route("/health", self._health, methods=["GET"]),
                Route("/v1/models", self._models, methods=["GET"]),
                Route("/v1/completions", self._completions, methods=["POST"]),
                Route("/v1/chat/completions", self._chat_completions, methods=["POST"]),
                Route("/v1/embeddings", self._embeddings, methods=["POST"]),
                Route("/tokenize", self._tokenize, methods=["POST"]),
                Route("/detokenize", self._detokenize, methods=["POST"]),
            ]
        )

    # ---- lifecycle ----------------------------------------------------------------------
    async def start(self) -> int:
        """Listen; returns the bound port. Raises OSError when the port is taken."""
        config = self._config
        host = config.host
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, config.http_port))
        except OSError as e:
            sock.close()
            raise OSError(f"cannot listen for HTTP on {host}:{config.http_port}: {e.strerror or e}") from None
        sock.setblocking(False)
        self.port = sock.getsockname()[1]
        ssl: dict[str, Any] = {}
        if config.tls_cert and config.tls_key:
            import ssl as ssl_module

            ssl = {"ssl_certfile": config.tls_cert, "ssl_keyfile": config.tls_key}
            if config.tls_client_ca:
                ssl.update(ssl_ca_certs=config.tls_client_ca, ssl_cert_reqs=ssl_module.CERT_REQUIRED)
        server_config = uvicorn.Config(
            self.app,
            log_config=None,
            access_log=False,
            lifespan="off",
            timeout_graceful_shutdown=2,
            # --max-concurrent-rpcs bounds HTTP requests in flight too (503 beyond it); uvicorn
            # counts the connection asking as one of its limit, hence the + 1.
            limit_concurrency=config.max_concurrent_rpcs + 1 if config.max_concurrent_rpcs else None,
            **ssl,
        )
        self._server = _Server(server_config)
        self._task = asyncio.get_running_loop().create_task(self._server.serve(sockets=[sock]))
        while not self._server.started:
            if self._task.done():
                self._task.result()
                raise OSError(f"HTTP server on {host}:{self.port} did not start")
            await asyncio.sleep(0.01)
        return self.port

    async def stop(self) -> None:
        if self._server is None or self._task is None:
            return
        self._server.should_exit = True
        with contextlib.suppress(Exception, SystemExit):
            await self._task

    # ---- plumbing -------------------------------------------------------------------------
    def _check_auth(self, request: Request) -> None:
        if self._token is None:
            return
        given = request.headers.get("authorization", "")
        scheme, _, value = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(value.strip().encode(), self._token.encode()):
            raise UnauthenticatedError("missing or wrong bearer token (Authorization: Bearer TOKEN)")

    async def _json(self, request: Request) -> Any:
        size = 0
        parts = []
        async for part in request.stream():
            size += len(part)
            if size > self._max_body:
                raise InvalidArgumentError.for_field("body", f"larger than {self._max_body} bytes")
            parts.append(part)
        try:
            return json.loads(b"".join(parts))
        except (ValueError, UnicodeDecodeError) as e:
            raise InvalidArgumentError.for_field("body", f"not valid JSON ({e})") from None

    async def _answer(self, request: Request, method: str, handle: Callable[[Call], Awaitable[Response]]) -> Response:
        """One request: its id, auth, error mapping, one metric and (unless it streamed) one log line."""
        call = Call(method, new_request_id(request.headers.get(REQUEST_ID_KEY)), _peer(request))
        token = request_id_var.set(call.request_id)
        try:
            self._check_auth(request)
            response = await handle(call)
            response.headers.setdefault(REQUEST_ID_KEY, call.request_id)
            return response
        except LlamaCrabError as e:
            call.code = e.status
            if e.status == "UNAUTHENTICATED":
                log_event("unauthenticated call refused", logging.WARNING, method=method)
            return _error_response(e, call.request_id)
        except Exception:
            call.code = "INTERNAL"
            _log.exception("%s failed", method)
            return _error_response(InternalError("internal error"), call.request_id)
        finally:
            if not call.streamed:
                self._metrics.count_request(method, call.code)
                call.log_finished()
            request_id_var.reset(token)

    async def _generate(
        self,
        call: Call,
        receive: Receive,
        submit: Callable[[Llama], CompletionHandle],
        encoder: StreamEncoder[Any, Any],
        stream: bool,
    ) -> Response:
        """Submit (in a worker thread), then stream events or answer with the final object."""
        llama = self._servicer.ready_llama(allow_draining=False)  # draining: 503 before any header
        handle = await in_worker(submit, llama)
        metrics, method = self._metrics, call.method

        def code_of(error: BaseException) -> str:
            return error.status if isinstance(error, LlamaCrabError) else "CANCELLED"

        async def run(write: Callable[[Any], Awaitable[None]]) -> None:
            try:
                await self._servicer.run_stream(call, handle, encoder, write, code_of)
            finally:
                metrics.count_request(method, call.code)

        if stream:
            call.streamed = True  # counted and logged when the stream ends, not now

            def abandon() -> None:
                handle.cancel()
                metrics.count_request(method, "CANCELLED")
                asyncio.get_running_loop().run_in_executor(None, handle.close)

            return _EventStream(run, abandon, call.request_id)
        answer: list[Any] = []

        async def keep(message: Any) -> None:
            if message is not None:
                answer.append(message)

        # Not streamed, yet a client that leaves still stops the generation.
        left, error = await _watching_disconnect(run(keep), receive)
        if left:
            return Response(status_code=499)  # nobody reads it (nginx's "client closed request")
        if error is not None:
            raise error
        return JSONResponse(answer[-1])

    # ---- routes ----------------------------------------------------------------------------
    async def _health(self, request: Request) -> Response:
        try:
            self._servicer.ready_llama(allow_draining=False)
        except LlamaCrabError as e:
            return JSONResponse({"status": "unavailable", "reason": e.message}, status_code=503)
        return JSONResponse({"status": "ok"})

    async def _models(self, request: Request) -> Response:
        async def handle(call: Call) -> Response:
            info = self._servicer.ready_llama().model_info()
            model = {"id": info.name, "object": "model", "created": 0, "owned_by": "llama-crab"}
            model["meta"] = {"n_ctx": info.n_ctx, "n_slots": info.n_slots}
            return JSONResponse({"object": "list", "data": [model]})

        return await self._answer(request, "http:/v1/models", handle)

    async def _completions(self, request: Request) -> Response:
        async def handle(call: Call) -> Response:
            parsed = text_call(await self._json(request))
            model = self._servicer.ready_llama().model_info().name
            encoder = text_encoder(model, parsed.stream, parsed.include_usage)
            return await self._generate(
                call, request.receive, lambda llama: llama.submit(parsed.prompt, parsed.options), encoder, parsed.stream
            )

        return await self._answer(request, "http:/v1/completions", handle)

    async def _chat_completions(self, request: Request) -> Response:
        async def handle(call: Call) -> Response:
            parsed = chat_call(await self._json(request))
            encoder = chat_encoder(parsed.stream, parsed.include_usage)
            return await self._generate(
                call, request.receive, lambda llama: llama.submit_chat(parsed.chat, parsed.options), encoder, parsed.stream
            )

        return await self._answer(request, "http:/v1/chat/completions", handle)

    async def _embeddings(self, request: Request) -> Response:
        async def handle(call: Call) -> Response:
            parsed = embed_call(await self._json(request))
            info = self._servicer.ready_llama().model_info()
            if parsed.dimensions not in (0, info.n_embd):
                # The model's vectors have one length; cutting them would not be what
                # OpenAI's Matryoshka-trained models give.
                raise InvalidArgumentError.for_field("dimensions", f"this model's embeddings have {info.n_embd}")
            try:
                result = await self._servicer.embed(parsed.inputs)
            except InvalidArgumentError as e:
                # OpenAI calls the list `input`: name the field as the caller wrote it.
                raise InvalidArgumentError.from_violations(
                    [FieldViolation("input" + v.field[len("inputs"):] if v.field.startswith("inputs") else v.field,
                                    v.description) for v in e.violations]
                ) from None
            return JSONResponse(embeddings_body(result, info.name, parsed.base64))

        return await self._answer(request, "http:/v1/embeddings", handle)

    async def _tokenize(self, request: Request) -> Response:
        async def handle(call: Call) -> Response:
            body = await self._json(request)
            content = body.get("content") if isinstance(body, dict) else None
            if not isinstance(content, str):
                raise InvalidArgumentError.for_field("content", "must be a string")
            add_special = _bool_field(body, "add_special", False)
            parse_special = _bool_field(body, "parse_special", True)
            llama = self._servicer.ready_llama()
            tokens = await asyncio.to_thread(llama.tokenize, content, add_special, parse_special)
            return JSONResponse({"tokens": tokens})

        return await self._answer(request, "http:/tokenize", handle)

    async def _detokenize(self, request: Request) -> Response:
        async def handle(call: Call) -> Response:
            body = await self._json(request)
            tokens = body.get("tokens") if isinstance(body, dict) else None
            if not isinstance(tokens, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in tokens):
                raise InvalidArgumentError.for_field("tokens", "must be a list of token ids")
            llama = self._servicer.ready_llama()
            text = await asyncio.to_thread(llama.detokenize, tokens)
            return JSONResponse({"content": text})

        return await self._answer(request, "http:/detokenize", handle)


def _bool_field(body: dict[str, Any], name: str, default: bool) -> bool:
    value = body.get(name, default)
    if not isinstance(value, bool):
        raise InvalidArgumentError.for_field(name, "must be true or false")
    return value


def _peer(request: Request) -> str:
    client = request.client
    return f"{client.host}:{client.port}" if client else "unknown"
