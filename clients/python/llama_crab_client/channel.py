"""How the clients connect: credentials, channel options and per-call metadata.

Shared by the sync `Client` and the asyncio `AsyncClient`, so both dial alike.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Optional, TypeVar, Union

import grpc
import grpc.experimental

__all__ = [
    "ChannelSettings",
    "ClientBase",
    "PemSource",
    "SERVICE_NAME",
    "call_metadata",
    "lists_several_servers",
    "read_pem",
    "service_config",
]

SERVICE_NAME = "llama_crab.v1.LlamaCrabService"
USER_AGENT = "llama-crab-client/0.1.0"

# PEM given as bytes, as text that starts with "-----BEGIN", or as a file path.
PemSource = Union[bytes, str, "os.PathLike[str]"]


def read_pem(source: Optional[PemSource]) -> Optional[bytes]:
    if source is None or isinstance(source, bytes):
        return source
    if isinstance(source, str) and source.lstrip().startswith("-----BEGIN"):
        return source.encode("ascii")
    with open(source, "rb") as f:
        return f.read()


def lists_several_servers(target: str) -> bool:
    """True for targets that can resolve to several backends (`dns:`, `ipv4:a,b`, `ipv6:a,b`)."""
    scheme, _, rest = target.partition(":")
    if scheme == "dns":
        return True
    return scheme in ("ipv4", "ipv6") and "," in rest


def service_config(retry_unavailable: bool, load_balancing: Optional[str]) -> str:
    """The gRPC service config: retry UNAVAILABLE (before any response arrived) and the LB policy.

    gRPC never retries a call once a response has arrived, so retrying `Complete` cannot
    duplicate streamed output; it covers a draining or restarting backend.
    """
    config: dict[str, Any] = {}
    if load_balancing:
        config["loadBalancingConfig"] = [{load_balancing: {}}]
    if retry_unavailable:
        config["methodConfig"] = [
            {
                "name": [{"service": SERVICE_NAME}],
                "retryPolicy": {
                    "maxAttempts": 4,
                    "initialBackoff": "0.2s",
                    "maxBackoff": "2s",
                    "backoffMultiplier": 2,
                    "retryableStatusCodes": ["UNAVAILABLE"],
                },
            }
        ]
    return json.dumps(config)


@dataclass(frozen=True)
class ChannelSettings:
    """Everything about a connection except the target's calls.

    TLS is on when `tls` is set or any certificate is given; a client certificate and
    key make it mutual TLS. `token` is sent as `authorization: Bearer <token>`.
    `load_balancing=None` picks round_robin for targets that list several servers
    (`dns:`, `ipv4:a,b`) and gRPC's default (pick_first) otherwise.
    """

    target: str
    tls: bool = False
    root_certificates: Optional[bytes] = None
    certificate_chain: Optional[bytes] = None
    private_key: Optional[bytes] = None
    server_name: Optional[str] = None
    token: Optional[str] = None
    keepalive_time: Optional[float] = None
    keepalive_timeout: float = 20.0
    retry_unavailable: bool = True
    load_balancing: Optional[str] = None
    extra_options: Sequence[tuple[str, Any]] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.target, str) or not self.target.strip():
            raise ValueError("target must be a non-empty 'host:port' (or a gRPC target URI)")
        if (self.certificate_chain is None) != (self.private_key is None):
            raise ValueError("a client certificate and its private key go together (mutual TLS)")
        if self.keepalive_time is not None and self.keepalive_time <= 0:
            raise ValueError("keepalive_time must be > 0 seconds (or None for no keepalive pings)")
        if self.keepalive_timeout <= 0:
            raise ValueError("keepalive_timeout must be > 0 seconds")
        if self.token is not None and (not self.token.strip() or "\n" in self.token):
            raise ValueError("token must be a non-empty single line")

    @property
    def uses_tls(self) -> bool:
        return self.tls or any(
            x is not None for x in (self.root_certificates, self.certificate_chain, self.private_key)
        )

    def credentials(self) -> Optional[grpc.ChannelCredentials]:
        if not self.uses_tls:
            return None
        return grpc.ssl_channel_credentials(
            root_certificates=self.root_certificates,
            private_key=self.private_key,
            certificate_chain=self.certificate_chain,
        )

    def effective_load_balancing(self) -> Optional[str]:
        if self.load_balancing is not None:
            return self.load_balancing or None  # "" forces gRPC's default
        return "round_robin" if lists_several_servers(self.target) else None

    def options(self) -> list[tuple[str, Any]]:
        opts: list[tuple[str, Any]] = [
            ("grpc.primary_user_agent", USER_AGENT),
            ("grpc.enable_retries", 1 if self.retry_unavailable else 0),
            ("grpc.service_config", service_config(self.retry_unavailable, self.effective_load_balancing())),
        ]
        if self.keepalive_time is not None:
            opts += [
                ("grpc.keepalive_time_ms", int(self.keepalive_time * 1000)),
                ("grpc.keepalive_timeout_ms", int(self.keepalive_timeout * 1000)),
                ("grpc.keepalive_permit_without_calls", 1),
                ("grpc.http2.max_pings_without_data", 0),
            ]
        if self.server_name is not None:
            opts.append(("grpc.ssl_target_name_override", self.server_name))
        return opts + list(self.extra_options)

    def metadata(self, request_id: Optional[str] = None, session_id: Optional[str] = None) -> tuple[tuple[str, str], ...]:
        return call_metadata(self.token, request_id, session_id)

    def sync_channel(self) -> grpc.Channel:
        # Streams are read by the thread that iterates them, not handed over from grpc's
        # channel thread: one thread wakeup per message instead of two. Measured: client
        # CPU per token -15% at 1 stream, -20% at 8 (hypothesis 3, docs/performance.md).
        options = [(grpc.experimental.ChannelOptions.SingleThreadedUnaryStream, 1), *self.options()]
        creds = self.credentials()
        if creds is None:
            return grpc.insecure_channel(self.target, options=options)
        return grpc.secure_channel(self.target, creds, options=options)

    def aio_channel(self) -> grpc.aio.Channel:
        creds = self.credentials()
        if creds is None:
            return grpc.aio.insecure_channel(self.target, options=self.options())
        return grpc.aio.secure_channel(self.target, creds, options=self.options())


def call_metadata(
    token: Optional[str], request_id: Optional[str], session_id: Optional[str] = None
) -> tuple[tuple[str, str], ...]:
    """Metadata of one call: the bearer token, the caller's request id (for server logs)
    and a session id (`x-session-id`: a balancer's affinity key, deploy/nginx)."""
    md: list[tuple[str, str]] = []
    if token is not None:
        md.append(("authorization", f"Bearer {token}"))
    if request_id is not None:
        md.append(("x-request-id", request_id))
    if session_id is not None:
        md.append(("x-session-id", session_id))
    return tuple(md)


_Client = TypeVar("_Client", bound="ClientBase")


class ClientBase:
    """Connection settings and per-call options shared by `Client` and `AsyncClient`.

    `target` is `host:port` or any gRPC target (`dns:///svc:50051`, `ipv4:10.0.0.1:1,10.0.0.2:1`;
    several servers get round_robin load balancing). TLS: `tls=True` (system roots) or
    `root_certificates`; mutual TLS: also `certificate_chain` and `private_key` (PEM bytes,
    PEM text or file paths). `token` is sent as a bearer token. `timeout` is the default
    per-call deadline in seconds (None: none). UNAVAILABLE is retried (with backoff) unless
    `retry_unavailable=False`. `keepalive_time` (seconds) turns on HTTP/2 keepalive pings.
    """

    def __init__(
        self,
        target: str = "localhost:50051",
        *,
        tls: bool = False,
        root_certificates: Optional[PemSource] = None,
        certificate_chain: Optional[PemSource] = None,
        private_key: Optional[PemSource] = None,
        server_name: Optional[str] = None,
        token: Optional[str] = None,
        timeout: Optional[float] = None,
        keepalive_time: Optional[float] = None,
        keepalive_timeout: float = 20.0,
        retry_unavailable: bool = True,
        load_balancing: Optional[str] = None,
        channel_options: Sequence[tuple[str, Any]] = (),
    ) -> None:
        self.settings = ChannelSettings(
            target=target,
            tls=tls,
            root_certificates=read_pem(root_certificates),
            certificate_chain=read_pem(certificate_chain),
            private_key=read_pem(private_key),
            server_name=server_name,
            token=token,
            keepalive_time=keepalive_time,
            keepalive_timeout=keepalive_timeout,
            retry_unavailable=retry_unavailable,
            load_balancing=load_balancing,
            extra_options=tuple(channel_options),
        )
        if timeout is not None and timeout <= 0:
            raise ValueError("timeout must be > 0 seconds (or None for no deadline)")
        self.timeout = timeout
        self._connect()

    def _connect(self) -> None:
        """Open the channel and the stub (sync or asyncio)."""
        raise NotImplementedError

    @classmethod
    def from_env(cls: type[_Client], **overrides: Any) -> _Client:
        """A client for $LLAMA_CRAB_SERVER (default localhost:50051) with $LLAMA_CRAB_TOKEN."""
        kwargs: dict[str, Any] = {"token": os.environ.get("LLAMA_CRAB_TOKEN") or None, **overrides}
        return cls(os.environ.get("LLAMA_CRAB_SERVER", "localhost:50051"), **kwargs)

    def _call_kwargs(
        self, timeout: Optional[float], request_id: Optional[str], session_id: Optional[str] = None
    ) -> dict[str, Any]:
        return {
            "timeout": self.timeout if timeout is None else timeout,
            "metadata": self.settings.metadata(request_id, session_id),
        }
