"""Run the service in-process for tests: `start_test_server(llama, **config_overrides)`.

The aio server lives on one background event-loop thread shared by every test server
of the process, so plain synchronous pytest code (and sync or aio gRPC clients on
other threads) can talk to it.

    server = start_test_server(llama, max_queue=4)
    channel = grpc.insecure_channel(server.address)
    ...
    server.stop()
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any, Optional, TypeVar

import grpc
from grpc_health.v1 import health_pb2

from .app import Service
from .config import HTTP_OFF, ServeConfig

if TYPE_CHECKING:
    from ..llama import Llama
    from .metrics import ServiceMetrics

__all__ = ["TestServer", "start_test_server"]

T = TypeVar("T")

_loop: Optional[asyncio.AbstractEventLoop] = None
_loop_lock = threading.Lock()


def _background_loop() -> asyncio.AbstractEventLoop:
    global _loop
    with _loop_lock:
        if _loop is None:
            loop = asyncio.new_event_loop()
            threading.Thread(target=loop.run_forever, name="llama-crab-test-server", daemon=True).start()
            _loop = loop
        return _loop


def _run(coro: Coroutine[Any, Any, T], timeout: Optional[float] = None) -> T:
    return asyncio.run_coroutine_threadsafe(coro, _background_loop()).result(timeout)


class TestServer:
    """A started in-process server. `port`/`address` to connect; `stop()` when done."""

    __test__ = False  # not a pytest test class

    def __init__(self, service: Service) -> None:
        self.service = service
        self.port: int = service.port
        host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(service.config.host, service.config.host)
        self.address = f"[{host}]:{self.port}" if ":" in host else f"{host}:{self.port}"
        self._stopped = False

    @property
    def config(self) -> ServeConfig:
        return self.service.config

    @property
    def metrics(self) -> ServiceMetrics:
        return self.service.metrics

    @property
    def metrics_port(self) -> int:
        return self.service.metrics_port

    @property
    def http_port(self) -> int:
        """The HTTP API's port (start with `http_port=0` to have one)."""
        return self.service.http_port

    @property
    def http_url(self) -> str:
        """`http://127.0.0.1:PORT` (https with TLS) of the HTTP API."""
        scheme = "https" if self.service.config.tls_cert else "http"
        host = self.address.rsplit(":", 1)[0]
        return f"{scheme}://{host}:{self.http_port}"

    def attach(self, llama: Llama) -> None:
        """Serve `llama` (started with `llama=None`): warm-up decode, then SERVING."""
        _run(self.service.attach(llama), timeout=120.0)

    def begin_drain(self, grace: float = 0.0) -> concurrent.futures.Future[None]:
        """Start draining (as SIGTERM does) and return at once; the future ends when stopped."""
        self._stopped = True
        return asyncio.run_coroutine_threadsafe(self.service.drain(grace), _background_loop())

    def stop(self, grace: float = 0.0) -> None:
        """Drain (in-flight streams get `grace` seconds) and stop. Idempotent."""
        if self._stopped:
            return
        self.begin_drain(grace).result(grace + 30.0)

    def health_status(
        self, service: str = "", timeout: float = 5.0, credentials: Optional[grpc.ChannelCredentials] = None
    ) -> str:
        """The grpc.health.v1 status name (SERVING, NOT_SERVING, ...) over a real call.

        Plaintext unless `credentials` are given (needed for a TLS server).
        """
        if credentials is None:
            channel = grpc.insecure_channel(self.address)
        else:
            channel = grpc.secure_channel(self.address, credentials)
        with channel:
            check = channel.unary_unary(
                "/grpc.health.v1.Health/Check",
                request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
                response_deserializer=health_pb2.HealthCheckResponse.FromString,
            )
            reply = check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)

    def __enter__(self) -> TestServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_test_server(llama: Optional[Llama], **overrides: Any) -> TestServer:
    """Start a server for `llama` on 127.0.0.1 and an ephemeral port; SERVING on return.

    `overrides` are `ServeConfig` fields (auth_token, tls_cert, grace, ...). With
    `llama=None` the server stays NOT_SERVING (as while a model loads) until
    `server.attach(llama)`.
    """
    config = ServeConfig(**{"host": "127.0.0.1", "port": 0, "http_port": HTTP_OFF, "grace": 5.0, **overrides})
    problems = config.violations()
    if problems:
        raise ValueError("; ".join(f"{f}: {why}" for f, why in problems))

    async def start() -> Service:
        service = Service(config, llama)
        await service.start()
        return service

    return TestServer(_run(start(), timeout=120.0))
