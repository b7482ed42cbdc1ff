"""Feeding a remote stream's chunks to a callback, with the STOP rule: STOP (or an
exception from the callback) cancels the call, and the result holds what was delivered.
One loop for completions and chat, sync and asyncio."""

from __future__ import annotations

import inspect
from collections.abc import Awaitable
from typing import Any, Callable, Optional, Union

from .types import StreamControl

__all__ = ["run_async_stream", "run_stream"]

def run_stream(stream: Any, callback: Callable[[Any], Optional[StreamControl]]) -> Any:
    """Feed `callback` until the end or STOP; an exception from it cancels and propagates.
    `stream`: a remote stream (iterable, `close()`, `completion`)."""
    try:
        for chunk in stream:
            if callback(chunk) is StreamControl.STOP:
                return stream.close()
    except BaseException:
        stream.close()
        raise
    assert stream.completion is not None
    return stream.completion


async def run_async_stream(
    stream: Any, callback: Callable[[Any], Union[Optional[StreamControl], Awaitable[Optional[StreamControl]]]]
) -> Any:
    """`run_stream` for asyncio; `callback` may be a coroutine function."""
    try:
        async for chunk in stream:
            control = callback(chunk)
            if inspect.isawaitable(control):
                control = await control
            if control is StreamControl.STOP:
                return await stream.close()
    except BaseException:
        await stream.close()
        raise
    assert stream.completion is not None
    return stream.completion
