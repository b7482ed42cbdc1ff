"""Ending a streaming call after its final message: read its status instead of dropping it.

grpc cancels a call that is dropped before its status arrives. The final `Completion` is
the last message, so nothing is lost for the caller, but the server (and a proxy in
between) would then count a call that delivered everything as CANCELLED. The status
follows the final message at once, so reading it costs no round trip.
"""

from __future__ import annotations

from typing import Any

import grpc

__all__ = ["end_call", "end_call_async"]


def end_call(call: Any) -> None:
    """Read a sync streaming call to its end (its status); errors after the final are moot."""
    try:
        for _ in call:
            pass  # nothing follows the final message; never more than the status
    except grpc.RpcError:
        pass


async def end_call_async(call: Any) -> None:
    """`end_call` for a `grpc.aio` streaming call."""
    try:
        while await call.read() is not grpc.aio.EOF:
            pass
    except grpc.RpcError:
        pass
