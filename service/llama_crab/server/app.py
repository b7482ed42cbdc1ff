"""Build and run the gRPC server: servicer, health, reflection, metrics, signals, drain.

Lifecycle: the server starts listening with health NOT_SERVING; the model loads; a
real one-token decode must pass; then health turns SERVING. On SIGTERM/SIGINT (or
`Service.drain`) health turns NOT_SERVING, new completions get UNAVAILABLE, in-flight
streams get `grace` seconds to finish and are then cancelled (their clients still get
a final CANCELLED Completion), and the server stops.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import signal
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any, Optional

import grpc
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection

from llama_crab_client.errors import LlamaCrabError
from llama_crab_client.types import CompletionOptions

from .auth import BearerTokenInterceptor
from .config import HTTP_OFF, ServeConfig
from .http_front import HttpFront
from .logs import configure_logging, log_event
from .metrics import MetricsServer, ServiceMetrics
from .servicer import SERVICE_NAME, LlamaCrabServicer, register_servicer

if TYPE_CHECKING:
    from ..llama import EngineMetrics, Llama

__all__ = ["Service", "load_llama", "run_serve"]

_log = logging.getLogger("llama_crab.server")

# After the grace period, cancelled streams need a moment to send their final message.
_CANCEL_SETTLE_S = 5.0
_WARMUP_PROMPT = "Hello"


def _server_options(config: ServeConfig) -> list[tuple[str, Any]]:
    ms = 1000.0
    return [
        ("grpc.max_send_message_length", config.max_message_bytes),
        ("grpc.max_receive_message_length", config.max_message_bytes),
        # Keepalive pings notice vanished clients, whose streams are then cancelled.
        ("grpc.keepalive_time_ms", int(config.keepalive_time * ms)),
        ("grpc.keepalive_timeout_ms", int(config.keepalive_timeout * ms)),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_recv_ping_interval_without_data_ms", int(config.keepalive_min_ping_interval * ms)),
        ("grpc.http2.max_ping_strikes", 2),
        # Two servers must never share a port silently (Linux allows it with SO_REUSEPORT).
        ("grpc.so_reuseport", 0),
    ]


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def _server_credentials(config: ServeConfig) -> Optional[grpc.ServerCredentials]:
    if config.tls_cert is None or config.tls_key is None:
        return None
    client_ca = _read(config.tls_client_ca) if config.tls_client_ca else None
    return grpc.ssl_server_credentials(
        [(_read(config.tls_key), _read(config.tls_cert))],
        root_certificates=client_ca,
        require_client_auth=client_ca is not None,
    )


class Service:
    """One running gRPC server around one `Llama` (attached now or once loaded)."""

    def __init__(self, config: ServeConfig, llama: Optional[Llama] = None) -> None:
        self.config = config
        self._llama = llama
        self.metrics = ServiceMetrics(self._engine_metrics)
        self.servicer = LlamaCrabServicer(self.metrics)
        self.health = health_aio.HealthServicer()
        self.port = 0
        self.metrics_port = 0
        self.http_port = 0
        self._server: Optional[aio.Server] = None
        self._http: Optional[HttpFront] = None
        self._metrics_server: Optional[MetricsServer] = None
        self._drain_task: Optional[asyncio.Task[None]] = None
        self._stopped: Optional[asyncio.Event] = None
        self.serving = False

    def _engine_metrics(self) -> Optional[EngineMetrics]:
        llama = self._llama
        if llama is None:
            return None
        try:
            return llama.metrics()
        except Exception:  # closed engine during shutdown: no gauges rather than a failed scrape
            return None

    @property
    def draining(self) -> bool:
        return self._drain_task is not None

    async def _set_health(self, status: int) -> None:
        for service in ("", SERVICE_NAME):
            await self.health.set(service, status)

    async def start(self) -> int:
        """Listen (health NOT_SERVING until `attach`); returns the bound port."""
        config = self.config
        self._stopped = asyncio.Event()
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        interceptors: list[aio.ServerInterceptor] = []
        token = config.resolved_auth_token()
        if token is not None:
            interceptors.append(BearerTokenInterceptor(token, self.servicer.on_unauthenticated))
        server = aio.server(
            interceptors=interceptors,
            options=_server_options(config),
            maximum_concurrent_rpcs=config.max_concurrent_rpcs or None,
        )
        register_servicer(self.servicer, server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        if config.reflection:
            names = (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME)
            reflection.enable_server_reflection(names, server)
        credentials = _server_credentials(config)
        if credentials is None:
            self.port = server.add_insecure_port(config.address)
        else:
            self.port = server.add_secure_port(config.address, credentials)
        if self.port == 0:
            raise OSError(f"cannot listen on {config.address}")
        await server.start()
        self._server = server
        if config.http_port != HTTP_OFF:
            http = HttpFront(config, self.servicer, self.metrics)
            try:
                self.http_port = await http.start()
            except OSError:
                await server.stop(grace=None)
                raise
            self._http = http
        if config.metrics_port:
            self._metrics_server = MetricsServer(self.metrics, config.metrics_host or config.host, config.metrics_port)
            self.metrics_port = self._metrics_server.port
        log_event(
            "listening",
            host=config.host,
            port=self.port,
            http_port=self.http_port or None,
            tls=credentials is not None,
            mtls=config.tls_client_ca is not None,
            auth=token is not None,
            metrics_port=self.metrics_port or None,
            event_loop=type(asyncio.get_running_loop()).__module__.split(".")[0],  # uvloop or asyncio
        )
        if self._llama is not None:
            await self.attach(self._llama)
        return self.port

    async def attach(self, llama: Llama) -> None:
        """Serve `llama` once a real one-token decode (or, for an encoder, one embedding)
        passes; then health is SERVING."""
        self._llama = llama
        if llama.model_info().generates:
            await asyncio.to_thread(llama.create_completion, _WARMUP_PROMPT, CompletionOptions(max_tokens=1))
        else:
            await asyncio.to_thread(llama.embed, [_WARMUP_PROMPT])
        if self.draining:
            return
        self.servicer.attach(llama)
        await self._set_health(health_pb2.HealthCheckResponse.SERVING)
        self.serving = True
        info = llama.model_info()
        log_event(
            "serving", model=info.name, n_ctx=info.n_ctx, slots=info.n_slots, port=self.port, http_port=self.http_port or None
        )

    def request_stop(self, grace: Optional[float] = None) -> None:
        """Begin draining (first call), or cancel every stream now (later calls). Never blocks."""
        if self._drain_task is None:
            self._drain_task = asyncio.get_running_loop().create_task(
                self._drain(self.config.grace if grace is None else grace)
            )
        else:
            n = self.servicer.cancel_all()
            log_event("stop requested again: cancelling in-flight streams now", cancelled=n)

    async def drain(self, grace: Optional[float] = None) -> None:
        """Drain and stop; returns when the server has stopped."""
        self.request_stop(grace)
        assert self._drain_task is not None
        await asyncio.shield(self._drain_task)

    async def _drain(self, grace: float) -> None:
        self.servicer.start_draining()
        self.serving = False
        await self.health.enter_graceful_shutdown()
        log_event("draining", grace_s=grace, in_flight=self.servicer.in_flight)
        if not await self.servicer.wait_idle(grace):
            n = self.servicer.cancel_all()
            log_event("grace period over: cancelling in-flight streams", logging.WARNING, cancelled=n)
            await self.servicer.wait_idle(_CANCEL_SETTLE_S)
        if self._server is not None:
            # Every stream has ended: this only closes connections (and drops any stragglers).
            await self._server.stop(grace=1.0)
        if self._http is not None:
            await self._http.stop()
        if self._metrics_server is not None:
            # shutdown() waits out the HTTP server's poll interval: not on the event loop.
            await asyncio.to_thread(self._metrics_server.close)
        log_event("stopped")
        assert self._stopped is not None
        self._stopped.set()

    async def wait_stopped(self) -> None:
        assert self._stopped is not None, "start() first"
        await self._stopped.wait()


def load_llama(config: ServeConfig) -> Llama:
    """Resolve the model (catalogue name or path; may download) and load it."""
    from .. import models
    from ..llama import Llama
    from ..params import LlamaParams, Speculative

    path = models.ensure(config.model)
    speculative = None
    if config.spec_types:
        # Each Speculative field is the serve option of the same name behind "spec_".
        knobs = {
            f.name: getattr(config, "spec_" + f.name)
            for f in dataclasses.fields(Speculative)
            if f.name not in ("types", "draft_model")
        }
        draft = models.ensure(config.spec_draft_model) if config.spec_draft_model else None
        speculative = Speculative(types=config.spec_types, draft_model=draft, **knobs)
    params = LlamaParams(
        path,
        n_ctx=config.n_ctx,
        n_batch=config.n_batch,
        prefill_step_tokens=config.prefill_step,
        embed_n_ctx=config.embed_ctx,
        max_embed_inputs=config.max_embed_inputs,
        max_embed_tokens=config.max_embed_tokens,
        n_threads=config.threads,
        adaptive_threads=config.adaptive_threads,
        n_gpu_layers=config.n_gpu_layers,
        deterministic=config.deterministic,
        n_parallel=config.parallel,
        max_queue=config.max_queue,
        max_grammar_bytes=config.max_grammar_bytes,
        max_sample_ms=config.max_sample_ms,
        max_buffered_bytes=config.stream_buffer_kib * 1024,
        slow_reader_timeout=None if config.slow_reader_timeout < 0 else config.slow_reader_timeout,
        cache_prompt=config.cache_prompt,
        cache_ram_mib=config.cache_ram,
        chat_template=_read_text(config.chat_template) if config.chat_template else None,
        speculative=speculative,
    )
    return Llama.load(params)


def _read_text(path: str) -> str:
    with open(path, encoding="utf-8") as f:
        return f.read()


async def _serve(config: ServeConfig) -> int:
    service = Service(config)
    try:
        await service.start()
    except (OSError, RuntimeError, ValueError) as e:
        log_event("cannot start the server", logging.ERROR, error=str(e))
        return 1
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, service.request_stop)
    llama: Optional[Llama] = None
    try:
        log_event("loading model", model=config.model)
        llama = await asyncio.to_thread(load_llama, config)
        await service.attach(llama)
    except (LlamaCrabError, OSError, RuntimeError, ValueError) as e:
        log_event("model failed to load or to decode", logging.ERROR, model=config.model, error=str(e))
        await service.drain(0.0)
        if llama is not None:
            llama.close()
        return 1
    await service.wait_stopped()
    llama.close()
    return 0


def run_serve(config: ServeConfig) -> int:
    """`llama-crab serve`: run until SIGTERM/SIGINT has drained the server; the exit status."""
    configure_logging(config.log_level, config.log_format)
    return _run_loop(_serve(config), config.event_loop)


def _run_loop(main: Coroutine[Any, Any, int], event_loop: str) -> int:
    """`main` on uvloop's event loop for `uvloop` where it is installed, else on asyncio's."""
    if event_loop == "uvloop":
        try:
            import uvloop
        except ImportError:
            log_event("uvloop is not installed; using asyncio's event loop", logging.INFO)
        else:
            return uvloop.run(main)
    return asyncio.run(main)
