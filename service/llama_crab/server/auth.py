"""Bearer-token authentication: a server interceptor checking `authorization` metadata.

Health checks are exempt so orchestrators can probe without the secret.
"""

from __future__ import annotations

import hmac
from collections.abc import Awaitable
from typing import TYPE_CHECKING, Any, Callable, Optional

import grpc
from grpc import aio

__all__ = ["EXEMPT_PREFIXES", "BearerTokenInterceptor"]

EXEMPT_PREFIXES = ("/grpc.health.v1.Health/",)

if TYPE_CHECKING:  # the stubs' generics are not subscriptable at run time
    Handler = grpc.RpcMethodHandler[Any, Any]
    Continuation = Callable[[grpc.HandlerCallDetails], Awaitable[Optional[Handler]]]


def _bearer(metadata: Any) -> Optional[str]:
    for key, value in metadata or ():
        if key == "authorization":
            text = value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)
            scheme, _, token = text.strip().partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return token.strip()
            return None
    return None


class BearerTokenInterceptor(aio.ServerInterceptor):
    """Reject calls whose `authorization: Bearer <token>` is missing or wrong (UNAUTHENTICATED).

    `on_reject(method)` lets the service count and log refused calls.
    """

    def __init__(self, token: str, on_reject: Optional[Callable[[str, str], None]] = None) -> None:
        self._token = token.encode("utf-8")
        self._on_reject = on_reject

    def _accepts(self, details: grpc.HandlerCallDetails) -> tuple[bool, str]:
        given = _bearer(details.invocation_metadata)
        if given is None:
            return False, "missing `authorization: Bearer <token>` metadata"
        # Constant-time comparison: the token is a secret.
        if not hmac.compare_digest(given.encode("utf-8"), self._token):
            return False, "invalid bearer token"
        return True, ""

    async def intercept_service(
        self, continuation: Continuation, handler_call_details: grpc.HandlerCallDetails
    ) -> Optional[Handler]:
        method = handler_call_details.method
        handler = await continuation(handler_call_details)
        if handler is None or method.startswith(EXEMPT_PREFIXES):
            return handler
        ok, why = self._accepts(handler_call_details)
        if ok:
            return handler
        if self._on_reject is not None:
            self._on_reject(method, why)
        return _rejecting_handler(handler, why)


def _rejecting_handler(handler: Handler, why: str) -> Handler:
    """A handler of the same shape as `handler` that fails with UNAUTHENTICATED."""

    async def reject(request: Any, context: aio.ServicerContext[Any, Any]) -> Any:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, why)

    async def reject_stream(request: Any, context: aio.ServicerContext[Any, Any]) -> Any:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, why)
        yield  # pragma: no cover  (makes this an async generator, as streaming handlers are)

    des, ser = handler.request_deserializer, handler.response_serializer
    if handler.unary_unary is not None:
        return grpc.unary_unary_rpc_method_handler(reject, des, ser)
    if handler.unary_stream is not None:
        return grpc.unary_stream_rpc_method_handler(reject_stream, des, ser)
    if handler.stream_unary is not None:
        return grpc.stream_unary_rpc_method_handler(reject, des, ser)
    return grpc.stream_stream_rpc_method_handler(reject_stream, des, ser)
