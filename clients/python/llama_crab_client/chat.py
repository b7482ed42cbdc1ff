"""Chat types, shaped like OpenAI's chat completions, shared by both transports.

Messages, tools and the streamed deltas are plain frozen dataclasses; `to_openai()` on a
chunk or a result gives the exact dict OpenAI's API would send (`chat.completion.chunk`,
`chat.completion`), and `from_openai()` reads OpenAI-shaped messages and tools.
"""

from __future__ import annotations

import json
import re
import secrets
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Union

from .types import LIMITS, FieldViolation, StreamControl, Timings, TokenLogprob, Usage

__all__ = [
    "ROLES",
    "ChatChunk",
    "ChatCompletion",
    "ChatCompletionCallback",
    "ChatDelta",
    "ChatMessage",
    "ChatRequest",
    "FinishReason",
    "ResponseFormat",
    "Tool",
    "ToolCall",
    "ToolCallDelta",
    "ToolChoice",
    "chat_completion_from_delivered",
    "message_from_deltas",
    "new_chat_id",
    "usage_to_openai",
]

ROLES = frozenset({"system", "user", "assistant", "tool"})
# OpenAI's rule for function names; a template writes them into the prompt verbatim.
_TOOL_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_MAX_MESSAGES = 4096
_MAX_TOOLS = 128
_MAX_TOOL_CALLS = 128
_MAX_SCHEMA_BYTES = 64 * 1024


class FinishReason:
    """Why a chat reply ended (OpenAI's values, plus `cancelled` for STOP)."""

    STOP = "stop"
    LENGTH = "length"
    TOOL_CALLS = "tool_calls"
    CANCELLED = "cancelled"


def new_chat_id() -> str:
    return "chatcmpl-" + secrets.token_urlsafe(18)


@dataclass(frozen=True)
class ToolCall:
    """A call the assistant made: `arguments` is JSON text (as OpenAI sends it)."""

    id: str
    name: str
    arguments: str = "{}"

    def parsed_arguments(self) -> Any:
        return json.loads(self.arguments)

    def to_openai(self) -> dict[str, Any]:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}

    @classmethod
    def from_openai(cls, data: Mapping[str, Any]) -> ToolCall:
        function = data.get("function") or {}
        arguments = function.get("arguments", "{}")
        if not isinstance(arguments, str):
            arguments = json.dumps(arguments)
        return cls(str(data.get("id", "")), str(function.get("name", "")), arguments)


@dataclass(frozen=True)
class ChatMessage:
    """One message of a conversation. Build with the role helpers:

    `ChatMessage.system(...)`, `.user(...)`, `.assistant(...)`, `.tool(result, call_id)`.
    """

    role: str
    content: Optional[str] = None
    tool_calls: tuple[ToolCall, ...] = ()
    # A tool result: the call it answers, and (optionally) the tool's name.
    tool_call_id: Optional[str] = None
    name: Optional[str] = None
    # The model's thinking, where the template separates it from the reply.
    reasoning_content: Optional[str] = None

    def __post_init__(self) -> None:
        if not isinstance(self.tool_calls, tuple):
            object.__setattr__(self, "tool_calls", tuple(self.tool_calls))

    @classmethod
    def system(cls, content: str) -> ChatMessage:
        return cls("system", content)

    @classmethod
    def user(cls, content: str) -> ChatMessage:
        return cls("user", content)

    @classmethod
    def assistant(cls, content: Optional[str] = None, tool_calls: Sequence[ToolCall] = ()) -> ChatMessage:
        return cls("assistant", content, tuple(tool_calls))

    @classmethod
    def tool(cls, content: str, tool_call_id: str, name: Optional[str] = None) -> ChatMessage:
        return cls("tool", content, tool_call_id=tool_call_id, name=name)

    def to_openai(self) -> dict[str, Any]:
        out: dict[str, Any] = {"role": self.role, "content": self.content}
        if self.reasoning_content:
            out["reasoning_content"] = self.reasoning_content
        if self.tool_calls:
            out["tool_calls"] = [c.to_openai() for c in self.tool_calls]
        if self.tool_call_id is not None:
            out["tool_call_id"] = self.tool_call_id
        if self.name is not None:
            out["name"] = self.name
        return out

    @classmethod
    def from_openai(cls, data: Mapping[str, Any]) -> ChatMessage:
        content = data.get("content")
        if isinstance(content, list):  # typed text parts: their text, joined
            content = "".join(str(p.get("text", "")) for p in content if isinstance(p, Mapping))
        return cls(
            role=str(data.get("role", "")),
            content=content,
            tool_calls=tuple(ToolCall.from_openai(c) for c in data.get("tool_calls") or ()),
            tool_call_id=data.get("tool_call_id"),
            name=data.get("name"),
            reasoning_content=data.get("reasoning_content"),
        )


def _empty_schema() -> Mapping[str, Any]:
    return {"type": "object", "properties": {}}


@dataclass(frozen=True)
class Tool:
    """A function the model may call; `parameters` is a JSON schema of its arguments."""

    name: str
    description: str = ""
    parameters: Mapping[str, Any] = field(default_factory=_empty_schema)

    def to_openai(self) -> dict[str, Any]:
        return {
            "type": "function",
            "function": {"name": self.name, "description": self.description, "parameters": dict(self.parameters)},
        }

    @classmethod
    def from_openai(cls, data: Mapping[str, Any]) -> Tool:
        function = data.get("function", data)
        return cls(
            str(function.get("name", "")),
            str(function.get("description", "")),
            function.get("parameters") or _empty_schema(),
        )


class ToolChoice:
    """`tool_choice` values: "auto" (the model decides), "none", "required" (some call),
    or the name of one function (that call, grammar-constrained)."""

    AUTO = "auto"
    NONE = "none"
    REQUIRED = "required"


@dataclass(frozen=True)
class ResponseFormat:
    """Constrain the reply: "text" (free), "json_object" (any JSON object) or
    "json_schema" (JSON matching `schema`)."""

    type: str = "text"
    schema: Optional[Mapping[str, Any]] = None
    name: str = "response"

    @classmethod
    def json_schema(cls, schema: Mapping[str, Any], name: str = "response") -> ResponseFormat:
        return cls("json_schema", schema, name)

    @classmethod
    def from_openai(cls, data: Mapping[str, Any]) -> ResponseFormat:
        kind = str(data.get("type", "text"))
        if kind == "json_schema":
            wrapper = data.get("json_schema") or {}
            return cls(kind, wrapper.get("schema"), str(wrapper.get("name", "response")))
        return cls(kind, data.get("schema"))

    def schema_text(self) -> str:
        """The JSON schema the grammar enforces ("" for free text)."""
        if self.type == "json_schema":
            return json.dumps(self.schema)
        if self.type == "json_object":
            return json.dumps(self.schema or {"type": "object"})
        return ""


@dataclass(frozen=True)
class ChatRequest:
    """Everything a chat call sends besides the sampling options."""

    messages: tuple[ChatMessage, ...]
    tools: tuple[Tool, ...] = ()
    tool_choice: str = ToolChoice.AUTO
    response_format: Optional[ResponseFormat] = None
    parallel_tool_calls: bool = False

    @classmethod
    def build(
        cls,
        messages: Sequence[Union[ChatMessage, Mapping[str, Any]]],
        tools: Optional[Sequence[Union[Tool, Mapping[str, Any]]]] = None,
        tool_choice: Union[str, Mapping[str, Any], None] = None,
        response_format: Union[ResponseFormat, Mapping[str, Any], None] = None,
        parallel_tool_calls: bool = False,
    ) -> ChatRequest:
        """From typed values or OpenAI-shaped dicts (`{"role": ..., "content": ...}`,
        `{"type": "function", "function": {...}}`, `{"type": "function", "function":
        {"name": ...}}` as a tool choice)."""
        if isinstance(tool_choice, Mapping):
            tool_choice = str((tool_choice.get("function") or {}).get("name", ""))
        if isinstance(response_format, Mapping):
            response_format = ResponseFormat.from_openai(response_format)
        return cls(
            messages=tuple(m if isinstance(m, ChatMessage) else ChatMessage.from_openai(m) for m in messages),
            tools=tuple(t if isinstance(t, Tool) else Tool.from_openai(t) for t in tools or ()),
            tool_choice=tool_choice or ToolChoice.AUTO,
            response_format=response_format,
            parallel_tool_calls=parallel_tool_calls,
        )

    @property
    def forced_function(self) -> Optional[str]:
        """The one function a named tool choice forces, else None."""
        if self.tool_choice in (ToolChoice.AUTO, ToolChoice.NONE, ToolChoice.REQUIRED):
            return None
        return self.tool_choice

    def violations(self) -> list[FieldViolation]:
        """Every invalid field, checked without a model (schemas are checked by the engine)."""
        out: list[FieldViolation] = []

        def bad(name: str, why: str) -> None:
            out.append(FieldViolation(name, why))

        if not self.messages:
            bad("messages", "must hold at least one message")
        if len(self.messages) > _MAX_MESSAGES:
            bad("messages", f"at most {_MAX_MESSAGES} messages")
        size = 0
        for i, m in enumerate(self.messages[:_MAX_MESSAGES]):
            where = f"messages[{i}]"
            if m.role not in ROLES:
                bad(f"{where}.role", f"unknown role {m.role!r}; one of {', '.join(sorted(ROLES))}")
            if m.content is not None and not isinstance(m.content, str):
                bad(f"{where}.content", "must be text")
            elif m.role != "assistant" and m.content is None:
                bad(f"{where}.content", f"a {m.role} message needs content")
            elif m.role == "assistant" and m.content is None and not m.tool_calls:
                bad(f"{where}.content", "an assistant message needs content or tool_calls")
            size += len((m.content or "").encode("utf-8", "replace")) + len(m.reasoning_content or "")
            if m.tool_calls and m.role != "assistant":
                bad(f"{where}.tool_calls", "only assistant messages make tool calls")
            if len(m.tool_calls) > _MAX_TOOL_CALLS:
                bad(f"{where}.tool_calls", f"at most {_MAX_TOOL_CALLS} calls")
            for j, call in enumerate(m.tool_calls[:_MAX_TOOL_CALLS]):
                if not call.name:
                    bad(f"{where}.tool_calls[{j}].name", "must not be empty")
                size += len(call.arguments)
                try:
                    json.loads(call.arguments)
                except (ValueError, TypeError):
                    bad(f"{where}.tool_calls[{j}].arguments", "must be JSON text")
        if size > LIMITS.prompt_text_bytes:
            bad("messages", f"at most {LIMITS.prompt_text_bytes} bytes of text in all")
        if len(self.tools) > _MAX_TOOLS:
            bad("tools", f"at most {_MAX_TOOLS} tools")
        names = set()
        for i, tool in enumerate(self.tools[:_MAX_TOOLS]):
            if not isinstance(tool.name, str) or not _TOOL_NAME.match(tool.name):
                bad(f"tools[{i}].name", "must be 1-64 letters, digits, '_' or '-'")
            elif tool.name in names:
                bad(f"tools[{i}].name", f"{tool.name!r} is defined twice")
            names.add(tool.name)
            if not isinstance(tool.parameters, Mapping):
                bad(f"tools[{i}].parameters", "must be a JSON schema object")
            elif len(json.dumps(tool.parameters)) > _MAX_SCHEMA_BYTES:
                bad(f"tools[{i}].parameters", f"at most {_MAX_SCHEMA_BYTES} bytes of JSON")
        if self.forced_function is not None and self.forced_function not in names:
            bad("tool_choice", f"{self.tool_choice!r} is none of auto, none, required or a tool's name")
        if self.tool_choice == ToolChoice.REQUIRED and not self.tools:
            bad("tool_choice", "'required' needs tools")
        rf = self.response_format
        if rf is not None:
            if rf.type not in ("text", "json_object", "json_schema"):
                bad("response_format", f"type must be text, json_object or json_schema (got {rf.type!r})")
            elif rf.type == "json_schema" and not isinstance(rf.schema, Mapping):
                bad("response_format", "json_schema needs a schema object")
            elif rf.schema is not None and len(json.dumps(rf.schema)) > _MAX_SCHEMA_BYTES:
                bad("response_format", f"at most {_MAX_SCHEMA_BYTES} bytes of JSON schema")
            if rf.type != "text" and self.tools and self.tool_choice != ToolChoice.NONE:
                bad("response_format", "not together with tools (set tool_choice 'none' or drop one)")
        return out


@dataclass(frozen=True)
class ToolCallDelta:
    """A piece of a streamed tool call: the first has `id` and `name`, later ones only
    more `arguments` text. Join by `index`."""

    index: int
    id: Optional[str] = None
    name: Optional[str] = None
    arguments: str = ""

    def to_openai(self) -> dict[str, Any]:
        out: dict[str, Any] = {"index": self.index}
        function: dict[str, Any] = {"arguments": self.arguments}
        if self.id is not None:
            out["id"] = self.id
            out["type"] = "function"
        if self.name is not None:
            function = {"name": self.name, "arguments": self.arguments}
        out["function"] = function
        return out


@dataclass(frozen=True)
class ChatDelta:
    """What one chunk adds to the assistant message."""

    role: Optional[str] = None
    content: Optional[str] = None
    reasoning_content: Optional[str] = None
    tool_calls: tuple[ToolCallDelta, ...] = ()

    def to_openai(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.role is not None:
            out["role"] = self.role
        if self.content is not None:
            out["content"] = self.content
        if self.reasoning_content is not None:
            out["reasoning_content"] = self.reasoning_content
        if self.tool_calls:
            out["tool_calls"] = [d.to_openai() for d in self.tool_calls]
        return out


def usage_to_openai(usage: Usage) -> dict[str, Any]:
    """OpenAI's `usage` object (chat and completions alike)."""
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.prompt_tokens + usage.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": usage.cached_tokens},
    }


@dataclass(frozen=True)
class ChatChunk:
    """One streamed piece of a chat reply. The last chunk of a stream has an empty delta,
    the `finish_reason` and the `usage`."""

    id: str
    created: int
    model: str
    delta: ChatDelta
    # This chunk's token ids and the cumulative count generated so far.
    token_ids: tuple[int, ...] = ()
    n_tokens: int = 0
    finish_reason: Optional[str] = None
    usage: Optional[Usage] = None
    # One entry per token when logprobs were requested (in process and over HTTP; the gRPC
    # Chat stream does not carry them yet).
    logprobs: Optional[tuple[TokenLogprob, ...]] = None

    def to_openai(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "choices": [
                {"index": 0, "delta": self.delta.to_openai(), "logprobs": None, "finish_reason": self.finish_reason}
            ],
        }
        if self.usage is not None:
            out["usage"] = usage_to_openai(self.usage)
        return out


@dataclass(frozen=True)
class ChatCompletion:
    """A whole chat reply: the assistant message (complete tool calls, JSON arguments),
    why it ended, usage and timings. After STOP it holds exactly what was delivered."""

    id: str
    created: int
    model: str
    message: ChatMessage
    finish_reason: str
    usage: Usage = field(default_factory=Usage)
    timings: Timings = field(default_factory=Timings)
    # Every generated token's, when logprobs were requested (see ChatChunk.logprobs).
    logprobs: Optional[tuple[TokenLogprob, ...]] = None

    def to_openai(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "chat.completion",
            "created": self.created,
            "model": self.model,
            "choices": [
                {"index": 0, "message": self.message.to_openai(), "logprobs": None, "finish_reason": self.finish_reason}
            ],
            "usage": usage_to_openai(self.usage),
        }

    def last_chunk(self) -> ChatChunk:
        """The stream's closing chunk: empty delta, finish reason, usage."""
        return ChatChunk(
            self.id, self.created, self.model, ChatDelta(), (), self.usage.completion_tokens, self.finish_reason, self.usage
        )


ChatCompletionCallback = Callable[[ChatChunk], Optional[StreamControl]]


def message_from_deltas(deltas: Sequence[ChatDelta]) -> ChatMessage:
    """The assistant message that a sequence of deltas spells."""
    content: list[str] = []
    reasoning: list[str] = []
    calls: dict[int, list[str]] = {}
    heads: dict[int, tuple[str, str]] = {}
    for d in deltas:
        if d.content:
            content.append(d.content)
        if d.reasoning_content:
            reasoning.append(d.reasoning_content)
        for t in d.tool_calls:
            if t.index not in heads:
                heads[t.index] = (t.id or "", t.name or "")
            calls.setdefault(t.index, []).append(t.arguments)
    return ChatMessage(
        role="assistant",
        content="".join(content) if content or not heads else None,
        tool_calls=tuple(ToolCall(heads[i][0], heads[i][1], "".join(calls[i])) for i in sorted(heads)),
        reasoning_content="".join(reasoning) if reasoning else None,
    )


def chat_completion_from_delivered(
    delivered: Sequence[ChatChunk],
    *,
    final: Optional[ChatCompletion] = None,
    id: str = "",
    model: str = "",
    prompt_tokens: int = 0,
    timings: Optional[Timings] = None,
) -> ChatCompletion:
    """The ChatCompletion of a stream its consumer stopped: exactly the delivered deltas.
    `final` (the producer's own result, when one arrived) lends usage and timings."""
    n_tokens = sum(len(c.token_ids) for c in delivered)
    if final is not None:
        id, model, created = final.id, final.model, final.created
        prompt_tokens, cached, timings = final.usage.prompt_tokens, final.usage.cached_tokens, final.timings
    else:
        created = delivered[0].created if delivered else int(time.time())
        id = id or (delivered[0].id if delivered else new_chat_id())
        model = model or (delivered[0].model if delivered else "")
        cached = 0
    return ChatCompletion(
        id=id,
        created=created,
        model=model,
        message=message_from_deltas([c.delta for c in delivered]),
        finish_reason=FinishReason.CANCELLED,
        usage=Usage(prompt_tokens, n_tokens, cached),
        timings=timings if timings is not None else Timings(),
    )
