"""Deliver one `CompletionHandle`'s events to asyncio without a thread per stream.

The handle's fd becomes readable when events wait; the event loop watches it
(`loop.add_reader`) and drains `poll()`. It takes events only while its consumer has
none left to write: a client that stops reading stalls the consumer's writes, events
then stay in the engine, and the engine pauses that sequence (backpressure) instead of
anything buffering without bound. After a cancel it drains regardless, so the handle
is always closed once its final Completion arrives, and whoever cares (logs, metrics)
hears about that final through `on_close`.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from typing import TYPE_CHECKING, Callable, Optional, Union

from llama_crab_client.errors import LlamaCrabError
from llama_crab_client.chat import ChatChunk, ChatCompletion
from llama_crab_client.types import Chunk, Completion

if TYPE_CHECKING:
    from ..llama import CompletionHandle

__all__ = ["EngineFailure", "Final", "HandleRelay"]

_log = logging.getLogger("llama_crab.server")

Event = Union[Chunk, Completion, ChatChunk, ChatCompletion]
Final = Union[Completion, ChatCompletion]


class EngineFailure(RuntimeError):
    """The engine failed this sequence (e.g. a decode error); other streams are unaffected."""


class HandleRelay:
    """Events of one handle as awaitables: `await relay.next()` until the final
    (`Completion`, or `ChatCompletion` for a chat request)."""

    def __init__(self, handle: CompletionHandle, loop: Optional[asyncio.AbstractEventLoop] = None) -> None:
        self._handle = handle
        self._loop = loop or asyncio.get_running_loop()
        self._fd = handle.fileno()
        self._pending: collections.deque[Event] = collections.deque()
        self._wakeup: Optional[asyncio.Future[None]] = None
        self._on_close: list[Callable[[Optional[Final], Optional[BaseException]], None]] = []
        self.final: Optional[Final] = None
        self.error: Optional[BaseException] = None
        self.closed = False
        self.cancelled = False
        self._watching = False
        self._watch()
        # Events may have arrived before the reader was registered; the pipe byte is still
        # there in that case, so the reader fires at once. Nothing to drain by hand.

    # ---- consumer side ------------------------------------------------------------
    async def next(self) -> Event:
        """The next event. Raises the request's own error (a LlamaCrabError, e.g. a
        grammar that left no token allowed) or EngineFailure if the engine failed."""
        while not self._pending:
            if isinstance(self.error, LlamaCrabError):
                raise self.error
            if self.error is not None:
                raise EngineFailure(str(self.error)) from self.error
            if self.closed:
                raise RuntimeError("relay closed without a final Completion")  # engine contract broken
            self._watch()
            self._wakeup = self._loop.create_future()
            try:
                await self._wakeup
            finally:
                self._wakeup = None
        return self._pending.popleft()

    def cancel(self) -> None:
        """Stop generation; the engine answers with a CANCELLED Completion within one step."""
        if not self.closed and not self.cancelled:
            self.cancelled = True
            self._handle.cancel()
            self._watch()  # drain to the final even if nobody reads any more

    def add_close_callback(self, callback: Callable[[Optional[Final], Optional[BaseException]], None]) -> None:
        """`callback(final, error)` once the handle is closed (right away if it already is)."""
        if self.closed:
            callback(self.final, self.error)
        else:
            self._on_close.append(callback)

    # ---- event-loop side ----------------------------------------------------------
    def _watch(self) -> None:
        if not self._watching and not self.closed:
            self._watching = True
            self._loop.add_reader(self._fd, self._on_readable)

    def _on_readable(self) -> None:
        if self._pending and not self.cancelled:
            # The consumer has not written what it holds: leave the rest in the engine
            # (which pauses the sequence once enough waits) until `next()` asks again.
            self._watching = False
            self._loop.remove_reader(self._fd)
            return
        events: list[Event] = []
        try:
            events.extend(self._handle.poll())
            if self._handle.error_pending:
                events.extend(self._handle.poll())  # raises it
        except Exception as e:  # the engine reported a failed sequence: its stream ends here
            self.error = e
        for event in events:
            self._pending.append(event)
            if isinstance(event, (Completion, ChatCompletion)):
                self.final = event
        if self.final is not None or self.error is not None:
            self._close()
        elif events:
            self._wake()

    def _wake(self) -> None:
        if self._wakeup is not None and not self._wakeup.done():
            self._wakeup.set_result(None)

    def _close(self) -> None:
        if self.closed:
            return
        self.closed = True
        # Unwatch before close(): the fd goes away with the handle.
        if self._watching:
            self._watching = False
            self._loop.remove_reader(self._fd)
        try:
            if self.error is None:
                self._handle.close()  # the final arrived: close() has nothing left to wait for
            else:
                # After a failed sequence the handle never reports done, and close() would
                # wait for a final that already came; cancel() releases what is left.
                self._handle.cancel()
        except Exception:
            _log.exception("closing a completion handle failed")
        self._wake()
        callbacks, self._on_close = self._on_close, []
        for callback in callbacks:
            try:
                callback(self.final, self.error)
            except Exception:
                _log.exception("completion close callback failed")
