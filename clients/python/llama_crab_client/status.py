"""Shared exceptions <-> gRPC status, with google.rpc.BadRequest field violations.

The server turns a `LlamaCrabError` into a rich status (`to_status` / `abort`); the client
turns the status back into the same exception type with the same violations
(`from_rpc_error`), so in-process and remote callers handle errors alike.
"""

from __future__ import annotations

from typing import Any, NoReturn

import grpc
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2  # type: ignore[import-untyped]  # googleapis-common-protos ships no stubs
from grpc_status import rpc_status

from .errors import (
    DeadlineExceededError,
    bounded_violations,
    clip,
    InternalError,
    InvalidArgumentError,
    LlamaCrabError,
    PermissionDeniedError,
    ResourceExhaustedError,
    UnauthenticatedError,
    UnavailableError,
)
from .types import FieldViolation

__all__ = ["abort", "exception_to_status", "from_rpc_error", "rpc_error_to_exception", "to_status"]

_BY_STATUS: dict[grpc.StatusCode, type[LlamaCrabError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgumentError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhaustedError,
    grpc.StatusCode.UNAVAILABLE: UnavailableError,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceededError,
    grpc.StatusCode.UNAUTHENTICATED: UnauthenticatedError,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDeniedError,
    grpc.StatusCode.INTERNAL: InternalError,
}


# The status message rides in the grpc-message trailer: keep it well inside 8 KiB.
_MAX_MESSAGE_CHARS = 500


def to_status(error: LlamaCrabError) -> grpc.Status:
    """The error as a status whose trailers stay small, whatever the error carries."""
    code: grpc.StatusCode = getattr(grpc.StatusCode, error.status, grpc.StatusCode.UNKNOWN)
    details = []
    if error.violations:
        bad_request = error_details_pb2.BadRequest(
            field_violations=[
                error_details_pb2.BadRequest.FieldViolation(field=v.field, description=v.description)
                for v in bounded_violations(error.violations)
            ]
        )
        packed = any_pb2.Any()
        packed.Pack(bad_request)
        details.append(packed)
    message = clip(error.message, _MAX_MESSAGE_CHARS)
    return rpc_status.to_status(status_pb2.Status(code=code.value[0], message=message, details=details))


async def abort(context: Any, error: LlamaCrabError) -> NoReturn:
    """End an aio RPC with the error's status (raises, as grpc's abort does)."""
    await context.abort_with_status(to_status(error))
    raise AssertionError("abort_with_status returned")  # pragma: no cover - grpc always raises


def _violations(call: Any) -> list[FieldViolation]:
    try:
        status = rpc_status.from_call(call)
    except Exception:  # a malformed status trailer: the code alone still tells the kind
        return []
    out: list[FieldViolation] = []
    if status is None:
        return out
    for detail in status.details:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad_request = error_details_pb2.BadRequest()
            detail.Unpack(bad_request)
            out.extend(FieldViolation(v.field, v.description) for v in bad_request.field_violations)
    return out


def from_rpc_error(error: grpc.RpcError) -> LlamaCrabError:
    """The shared exception for a failed call (status code, message and field violations)."""
    code = error.code() if hasattr(error, "code") else grpc.StatusCode.UNKNOWN
    message = (error.details() if hasattr(error, "details") else None) or str(code)
    cls = _BY_STATUS.get(code)
    if cls is None:
        return LlamaCrabError(f"{code.name}: {message}", _violations(error))
    return cls(message, _violations(error))


# Descriptive aliases: the server side reads `exception_to_status`, the client side
# `rpc_error_to_exception`; both are the one mapping above.
exception_to_status = to_status
rpc_error_to_exception = from_rpc_error
