"""OpenAI's response shapes as `StreamEncoder`s: the same relay that writes gRPC messages
writes server-sent events (or, without streaming, one JSON object) through these.

A stream follows OpenAI's order exactly: a first delta with the role (chat), the content and
tool-call deltas, the chunk with `finish_reason`, a usage chunk when
`stream_options.include_usage` is set, then `data: [DONE]`.
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Sequence
from typing import Any, Optional

from llama_crab_client.chat import (
    ChatChunk,
    ChatCompletion,
    FinishReason,
    chat_completion_from_delivered,
    usage_to_openai as usage,
)
from llama_crab_client.errors import LlamaCrabError
from llama_crab_client.types import Chunk, Completion, StopReason, TokenLogprob, completion_from_delivered

from .streaming import StreamEncoder

__all__ = [
    "DONE",
    "chat_encoder",
    "error_body",
    "error_event",
    "http_status",
    "text_encoder",
]

DONE = b"data: [DONE]\n\n"

# gRPC status name -> (HTTP status, OpenAI error type).
_STATUS: dict[str, tuple[int, str]] = {
    "INVALID_ARGUMENT": (400, "invalid_request_error"),
    "UNAUTHENTICATED": (401, "authentication_error"),
    "PERMISSION_DENIED": (403, "permission_error"),
    "NOT_FOUND": (404, "not_found_error"),
    "RESOURCE_EXHAUSTED": (429, "rate_limit_error"),
    "UNAVAILABLE": (503, "service_unavailable"),
    "DEADLINE_EXCEEDED": (504, "timeout"),
    "INTERNAL": (500, "server_error"),
}


def http_status(status: str) -> int:
    return _STATUS.get(status, (500, ""))[0]


def error_body(message: str, status: str, param: Optional[str] = None, code: Optional[str] = None) -> dict[str, Any]:
    """OpenAI's error object (the `openai` SDK reads message, type, param and code)."""
    kind = _STATUS.get(status, (500, "server_error"))[1]
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def error_of(error: LlamaCrabError) -> dict[str, Any]:
    return error_body(error.message, error.status, error.field, error.status.lower())


def error_event(error: LlamaCrabError) -> bytes:
    """An error after the stream began: an event the `openai` SDK raises as APIError."""
    return _event(error_of(error))


def _event(data: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(data, separators=(",", ":"), ensure_ascii=False).encode() + b"\n\n"


def _finish_reason(reason: StopReason) -> str:
    if reason is StopReason.LENGTH:
        return "length"
    if reason is StopReason.CANCELLED:
        return FinishReason.CANCELLED
    return "stop"


class _TextLogprobs:
    """The legacy completions `logprobs` object, its text offsets running across chunks."""

    def __init__(self) -> None:
        self.offset = 0

    def __call__(self, entries: Optional[Sequence[TokenLogprob]]) -> Optional[dict[str, Any]]:
        if entries is None:
            return None
        offsets = []
        for e in entries:
            offsets.append(self.offset)
            self.offset += len(e.text)
        return {
            "tokens": [e.text for e in entries],
            "token_logprobs": [e.logprob for e in entries],
            "top_logprobs": [{t.text: t.logprob for t in e.top} for e in entries],
            "text_offset": offsets,
        }


def _chat_logprobs(entries: Optional[Sequence[TokenLogprob]]) -> Optional[dict[str, Any]]:
    """Chat's `logprobs` object: `{"content": [{token, logprob, bytes, top_logprobs}]}`."""
    if entries is None:
        return None

    def one(text: str, logprob: float) -> dict[str, Any]:
        return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

    return {
        "content": [{**one(e.text, e.logprob), "top_logprobs": [one(t.text, t.logprob) for t in e.top]} for e in entries]
    }


def text_encoder(model: str, stream: bool, include_usage: bool) -> StreamEncoder[Chunk, Completion]:
    """`/v1/completions`: `text_completion` chunks as events, or one `text_completion`."""
    head = {"id": "cmpl-" + secrets.token_urlsafe(18), "object": "text_completion", "created": int(time.time()), "model": model}
    logprobs = _TextLogprobs()

    def choice(text: str, lp: Optional[dict[str, Any]], finish: Optional[str]) -> dict[str, Any]:
        return {"index": 0, "text": text, "logprobs": lp, "finish_reason": finish}

    def chunk(c: Chunk, first: bool, prompt_tokens: int) -> Optional[bytes]:
        if not stream:
            return None
        return _event({**head, "choices": [choice(c.text, logprobs(c.logprobs), None)]})

    def final(f: Completion) -> Any:
        if not stream:
            all_logprobs = _TextLogprobs()(f.logprobs) if f.logprobs is not None else None
            return {**head, "choices": [choice(f.text, all_logprobs, _finish_reason(f.stop_reason))], "usage": usage(f.usage)}
        out = _event({**head, "choices": [choice("", None, _finish_reason(f.stop_reason))]})
        if include_usage:
            out += _event({**head, "choices": [], "usage": usage(f.usage)})
        return out + DONE

    return StreamEncoder(
        final_type=Completion,
        chunk=chunk,
        final=final,
        delivered=lambda f, chunks: completion_from_delivered(f, chunks),
        stop_reason=lambda f: f.stop_reason.value,
        cancelled=lambda f: f.stop_reason is StopReason.CANCELLED,
    )


def chat_encoder(stream: bool, include_usage: bool) -> StreamEncoder[ChatChunk, ChatCompletion]:
    """`/v1/chat/completions`: `chat.completion.chunk` events, or one `chat.completion`."""

    def head(c: Any) -> dict[str, Any]:
        return {"id": c.id, "object": "chat.completion.chunk", "created": c.created, "model": c.model}

    def choice(delta: dict[str, Any], finish: Optional[str], logprobs: Optional[dict[str, Any]] = None) -> dict[str, Any]:
        return {"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish}

    role_sent = False

    def role(c: Any) -> bytes:
        """The role on its own, first, as OpenAI sends it (also before a reply with no chunk)."""
        nonlocal role_sent
        if role_sent:
            return b""
        role_sent = True
        return _event({**head(c), "choices": [choice({"role": "assistant", "content": ""}, None)]})

    def chunk(c: ChatChunk, first: bool, prompt_tokens: int) -> Optional[bytes]:
        if not stream:
            return None
        out = role(c)
        delta = c.delta.to_openai()
        delta.pop("role", None)
        if delta or c.logprobs:
            out += _event({**head(c), "choices": [choice(delta, None, _chat_logprobs(c.logprobs))]})
        return out or None

    def final(f: ChatCompletion) -> Any:
        if not stream:
            whole = f.to_openai()
            whole["choices"][0]["logprobs"] = _chat_logprobs(f.logprobs)
            return whole
        out = role(f) + _event({**head(f), "choices": [choice({}, f.finish_reason)]})
        if include_usage:
            out += _event({**head(f), "choices": [], "usage": usage(f.usage)})
        return out + DONE

    return StreamEncoder(
        final_type=ChatCompletion,
        chunk=chunk,
        final=final,
        delivered=lambda f, chunks: chat_completion_from_delivered(chunks, final=f),
        stop_reason=lambda f: f.finish_reason,
        cancelled=lambda f: f.finish_reason == FinishReason.CANCELLED,
    )
