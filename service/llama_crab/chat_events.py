"""Chat between the shared types and the native engine: requests in, events out.

`native_chat_inputs` turns a `ChatRequest` into the engine's `ChatInputs`; `ChatEvents`
turns the engine's chat events (deltas of the assistant message, then the message) into
`ChatChunk`s and one `ChatCompletion`.
"""

from __future__ import annotations

import json
import time
from typing import Optional, Union

from llama_crab_client.chat import (
    ChatChunk,
    ChatCompletion,
    ChatDelta,
    ChatMessage,
    ChatRequest,
    FinishReason,
    ToolCall,
    ToolCallDelta,
    ToolChoice,
    new_chat_id,
)
from llama_crab_client.errors import InvalidArgumentError
from llama_crab_client.types import Timings, TokenLogprob, TopLogprob, Usage

from . import _engine

__all__ = ["ChatEvents", "engine_timings", "native_chat_inputs"]


def engine_logprobs(native: Optional[list[_engine.TokenLogprob]]) -> Optional[tuple[TokenLogprob, ...]]:
    """An event's logprobs (completions and chat replies alike); None when not requested."""
    if native is None:
        return None
    return tuple(
        TokenLogprob(lp.token_id, lp.text, lp.logprob, tuple(TopLogprob(t.token_id, t.text, t.logprob) for t in lp.top))
        for lp in native
    )


def engine_timings(ev: _engine.Event) -> Timings:
    """A final event's timings (completions and chat replies alike)."""
    return Timings(
        queue_ms=ev.queue_ms,
        time_to_first_token_ms=ev.ttft_ms,
        prompt_tokens_per_second=ev.prompt_tps,
        decode_tokens_per_second=ev.decode_tps,
        total_ms=ev.total_ms,
        draft_tokens=ev.draft_tokens,
        draft_accepted_tokens=ev.draft_accepted_tokens,
    )


def native_chat_inputs(request: ChatRequest, add_generation_prompt: bool = True) -> _engine.ChatInputs:
    inputs = _engine.ChatInputs()
    messages = []
    for m in request.messages:
        native = _engine.ChatMessage()
        native.role = m.role
        native.content = m.content or ""
        native.reasoning_content = m.reasoning_content or ""
        native.name = m.name or ""
        native.tool_call_id = m.tool_call_id or ""
        calls = []
        for c in m.tool_calls:
            call = _engine.ChatToolCall()
            call.id, call.name, call.arguments = c.id, c.name, c.arguments
            calls.append(call)
        native.tool_calls = calls
        messages.append(native)
    inputs.messages = messages
    tools = request.tools
    choice = request.tool_choice
    if request.forced_function is not None:
        # A named function: the one tool, and a call required (grammar-constrained).
        tools = tuple(t for t in tools if t.name == request.forced_function)
        choice = ToolChoice.REQUIRED
    native_tools = []
    for t in tools:
        tool = _engine.ChatTool()
        tool.name, tool.description, tool.parameters = t.name, t.description, json.dumps(t.parameters)
        native_tools.append(tool)
    inputs.tools = native_tools
    inputs.tool_choice = choice
    inputs.parallel_tool_calls = request.parallel_tool_calls
    inputs.json_schema = request.response_format.schema_text() if request.response_format else ""
    inputs.add_generation_prompt = add_generation_prompt
    return inputs


def _delta(native: list[_engine.ChatDelta], first: bool) -> ChatDelta:
    content = "".join(d.content for d in native if d.content)
    reasoning = "".join(d.reasoning_content for d in native if d.reasoning_content)
    calls = tuple(
        ToolCallDelta(d.tool_index, d.tool_id or None, d.tool_name or None, d.tool_arguments)
        for d in native
        if d.tool_index >= 0
    )
    return ChatDelta(
        role="assistant" if first else None,
        content=content or None,
        reasoning_content=reasoning or None,
        tool_calls=calls,
    )


def _message(native: _engine.ChatMessage) -> ChatMessage:
    calls = tuple(ToolCall(c.id, c.name, c.arguments) for c in native.tool_calls)
    return ChatMessage(
        role="assistant",
        content=native.content if native.content or not calls else None,
        tool_calls=calls,
        reasoning_content=native.reasoning_content or None,
    )


class ChatEvents:
    """Converts one chat request's native events; every chunk shares the reply's id."""

    def __init__(self, model: str) -> None:
        self.id = new_chat_id()
        self.created = int(time.time())
        self.model = model
        self._first = True

    def __call__(self, ev: _engine.Event) -> Union[ChatChunk, ChatCompletion]:
        if not ev.is_final:
            chunk = ChatChunk(
                self.id,
                self.created,
                self.model,
                _delta(ev.chat_deltas, self._first),
                tuple(ev.token_ids),
                ev.n_tokens,
                logprobs=engine_logprobs(ev.logprobs),
            )
            self._first = False
            return chunk
        if ev.error:
            if ev.error_field:
                raise InvalidArgumentError.for_field(ev.error_field, ev.error)
            raise RuntimeError(f"generation failed: {ev.error}")
        message = _message(ev.chat_message) if ev.chat_message is not None else ChatMessage("assistant", "")
        if ev.stop_reason is _engine.StopReason.CANCELLED:
            finish = FinishReason.CANCELLED
        elif ev.stop_reason is _engine.StopReason.LENGTH:
            finish = FinishReason.LENGTH
        else:
            finish = FinishReason.TOOL_CALLS if message.tool_calls else FinishReason.STOP
        return ChatCompletion(
            id=self.id,
            created=self.created,
            model=self.model,
            message=message,
            finish_reason=finish,
            usage=Usage(ev.prompt_tokens, ev.n_tokens, ev.cached_tokens),
            timings=engine_timings(ev),
            logprobs=engine_logprobs(ev.logprobs),
        )


