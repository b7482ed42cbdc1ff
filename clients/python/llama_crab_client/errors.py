"""Exceptions shared by the in-process engine and the remote client.

Each carries the gRPC status name it maps to, so the server can turn an engine error
into the right status and the client can turn a status back into the same exception.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

from .types import FieldViolation

__all__ = [
    "MAX_DESCRIPTION_CHARS",
    "MAX_VIOLATIONS",
    "DeadlineExceededError",
    "InternalError",
    "InvalidArgumentError",
    "LlamaCrabError",
    "PermissionDeniedError",
    "ResourceExhaustedError",
    "UnauthenticatedError",
    "UnavailableError",
    "bounded_violations",
    "clip",
]


# An error names at most this many violations (then one "and K more"), each description
# at most this long, so that any error fits default gRPC metadata limits (8 KiB).
MAX_VIOLATIONS = 8
MAX_DESCRIPTION_CHARS = 200


def clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def bounded_violations(violations: Sequence[FieldViolation]) -> list[FieldViolation]:
    """The first MAX_VIOLATIONS violations (descriptions clipped), plus one line that
    counts the rest: what an error reports however much of a request was wrong."""
    shown = [FieldViolation(v.field, clip(v.description, MAX_DESCRIPTION_CHARS)) for v in violations[:MAX_VIOLATIONS]]
    rest = len(violations) - len(shown)
    if rest > 0:
        shown.append(FieldViolation(violations[MAX_VIOLATIONS].field, f"and {rest} more violations not listed"))
    return shown


class LlamaCrabError(Exception):
    """Base of every llama-crab error; `status` is the gRPC status code name."""

    status: ClassVar[str] = "UNKNOWN"

    def __init__(self, message: str, violations: Sequence[FieldViolation] = ()) -> None:
        super().__init__(message)
        self.message = message
        self.violations: tuple[FieldViolation, ...] = tuple(violations)

    @property
    def field(self) -> str | None:
        """The first offending field, if the error names one."""
        return self.violations[0].field if self.violations else None


class InvalidArgumentError(LlamaCrabError, ValueError):
    """A request field is invalid (bad option, bad grammar, empty or too-long prompt)."""

    status = "INVALID_ARGUMENT"

    @classmethod
    def from_violations(cls, violations: Sequence[FieldViolation]) -> InvalidArgumentError:
        shown = bounded_violations(violations)
        text = "; ".join(f"{v.field}: {v.description}" for v in shown)
        return cls(f"invalid argument: {text}", shown)

    @classmethod
    def for_field(cls, field: str, description: str) -> InvalidArgumentError:
        return cls.from_violations([FieldViolation(field, description)])


class ResourceExhaustedError(LlamaCrabError):
    """The server's wait queue is full; retry later."""

    status = "RESOURCE_EXHAUSTED"


class UnavailableError(LlamaCrabError):
    """The server is starting, draining or unreachable."""

    status = "UNAVAILABLE"


class DeadlineExceededError(LlamaCrabError):
    status = "DEADLINE_EXCEEDED"


class UnauthenticatedError(LlamaCrabError):
    status = "UNAUTHENTICATED"


class PermissionDeniedError(LlamaCrabError):
    status = "PERMISSION_DENIED"


class InternalError(LlamaCrabError):
    status = "INTERNAL"
