"""Service logging: text or JSON lines, each carrying the current call's request id.

The request id lives in a context variable: every gRPC call runs in its own asyncio
task (its own context), so log lines from concurrent calls never mix ids up.
"""

from __future__ import annotations

import contextvars
import json
import logging
import sys
import time
import uuid
from collections.abc import Mapping
from typing import Any, Optional

__all__ = [
    "REQUEST_ID_KEY",
    "JsonFormatter",
    "configure_logging",
    "new_request_id",
    "request_id_var",
    "log_event",
]

REQUEST_ID_KEY = "x-request-id"
# Caller-chosen ids are echoed into logs; bound them so a client cannot flood a log line.
_MAX_REQUEST_ID_LEN = 128

request_id_var: contextvars.ContextVar[Optional[str]] = contextvars.ContextVar("llama_crab_request_id", default=None)

_log = logging.getLogger("llama_crab.server")


def new_request_id(given: Optional[str] = None) -> str:
    """The caller's id when it is usable, else a fresh one."""
    if given:
        cleaned = "".join(c for c in given if c.isprintable())[:_MAX_REQUEST_ID_LEN]
        if cleaned:
            return cleaned
    return uuid.uuid4().hex


class _RequestIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "request_id"):
            record.request_id = request_id_var.get()
        return True


def _fields(record: logging.LogRecord) -> Mapping[str, Any]:
    fields = getattr(record, "fields", None)
    return fields if isinstance(fields, Mapping) else {}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, msg, request_id and the event's fields."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        request_id = getattr(record, "request_id", None)
        if request_id:
            out["request_id"] = request_id
        out.update(_fields(record))
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    """`time LEVEL logger [request_id] msg key=value ...`"""

    def format(self, record: logging.LogRecord) -> str:
        request_id = getattr(record, "request_id", None)
        parts = [self.formatTime(record), record.levelname, record.name]
        if request_id:
            parts.append(f"[{request_id}]")
        parts.append(record.getMessage())
        parts.extend(f"{k}={v}" for k, v in _fields(record).items())
        line = " ".join(parts)
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


def configure_logging(level: str = "info", fmt: str = "text", stream: Any = None) -> None:
    """Send every `llama_crab*` logger's records to stderr in the chosen format."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    handler.addFilter(_RequestIdFilter())
    root = logging.getLogger("llama_crab")
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    root.propagate = False
    if level == "debug":
        # llama.cpp's own log is kept to errors otherwise (see llama_crab.logs); takes
        # effect for models loaded after this call.
        logging.getLogger("llama_crab.llama_cpp").setLevel(logging.DEBUG)


def log_event(msg: str, level: int = logging.INFO, **fields: Any) -> None:
    """Log `msg` with structured fields (JSON keys, or key=value in text)."""
    _log.log(level, msg, extra={"fields": fields, "request_id": request_id_var.get()})
