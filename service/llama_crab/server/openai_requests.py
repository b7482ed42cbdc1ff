"""OpenAI request bodies (`/v1/completions`, `/v1/chat/completions`) as llama-crab calls.

A body becomes the same `(prompt, CompletionOptions)` or `(ChatRequest, CompletionOptions)`
a gRPC request becomes, so both protocols share every check after this one. Fields are
named as OpenAI names them in errors (`max_tokens`, `messages[2].role`, `stop`); llama.cpp's
extras that llama-server accepts (`top_k`, `min_p`, `grammar`, `samplers`, ...) and every
other `CompletionOptions` field pass by their own names. Unknown fields are ignored, as
OpenAI's SDKs and agent frameworks send fields a server may not know.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Optional, Union

from llama_crab_client.chat import ChatRequest
from llama_crab_client.errors import InvalidArgumentError
from llama_crab_client.infill import Infill
from llama_crab_client.types import CompletionOptions

__all__ = ["ChatCall", "TextCall", "chat_call", "text_call"]

Prompt = Union[str, list[int], Infill]

# OpenAI's chat default is "as long as the context allows": the engine ends at the
# sequence's context with finish_reason "length", which bounds the cost.
_UNBOUNDED_MAX_TOKENS = 2**31 - 1
# OpenAI's sampling default (temperature 1); the other knobs keep llama.cpp's defaults.
_DEFAULT_TEMPERATURE = 1.0
_MAX_LOGIT_BIAS = 1024
# Fields handled below by their OpenAI meaning; every other CompletionOptions field may be
# given by its own name.
_MAPPED = {"max_tokens", "stop_sequences", "logprobs", "logit_bias", "sampler_chain"}
_PASSTHROUGH = {f.name for f in dataclasses.fields(CompletionOptions)} - _MAPPED


@dataclass(frozen=True)
class TextCall:
    """A `/v1/completions` body, checked."""

    prompt: Prompt
    options: CompletionOptions
    stream: bool
    include_usage: bool


@dataclass(frozen=True)
class ChatCall:
    """A `/v1/chat/completions` body, checked."""

    chat: ChatRequest
    options: CompletionOptions
    stream: bool
    include_usage: bool


def _bad(field: str, why: str) -> InvalidArgumentError:
    return InvalidArgumentError.for_field(field, why)


def is_json_int(value: Any) -> bool:
    """An integer in a JSON body (true/false are not: Python's bool is an int)."""
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)) and math.isfinite(value)


def _body(body: Any) -> Mapping[str, Any]:
    if not isinstance(body, Mapping):
        raise _bad("body", "must be a JSON object")
    return body


def _flag(body: Mapping[str, Any], name: str) -> bool:
    value = body.get(name, False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise _bad(name, "must be true or false")
    return value


def _include_usage(body: Mapping[str, Any], stream: bool) -> bool:
    options = body.get("stream_options")
    if options is None:
        return False
    if not isinstance(options, Mapping):
        raise _bad("stream_options", "must be an object")
    if not stream:
        raise _bad("stream_options", "is only allowed when stream is true")
    value = options.get("include_usage", False)
    if not isinstance(value, bool):
        raise _bad("stream_options.include_usage", "must be true or false")
    return value


def _max_tokens(body: Mapping[str, Any], names: Sequence[str], default: int) -> int:
    for name in names:
        value = body.get(name)
        if value is None:
            continue
        if not is_json_int(value) or value < 1 or value > _UNBOUNDED_MAX_TOKENS:
            raise _bad(name, "must be an integer >= 1")
        return int(value)
    return default


def _stop(body: Mapping[str, Any]) -> tuple[str, ...]:
    value = body.get("stop")
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,) if value else ()
    if isinstance(value, list) and all(isinstance(s, str) for s in value):
        return tuple(s for s in value if s)
    raise _bad("stop", "must be a string or a list of strings")


def _logit_bias(body: Mapping[str, Any]) -> dict[int, float]:
    value = body.get("logit_bias")
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise _bad("logit_bias", "must be an object of token id to bias")
    if len(value) > _MAX_LOGIT_BIAS:
        raise _bad("logit_bias", f"at most {_MAX_LOGIT_BIAS} entries")
    out: dict[int, float] = {}
    for key, bias in value.items():
        try:
            token = int(key)
        except (TypeError, ValueError):
            raise _bad("logit_bias", f"key {key!r} is not a token id") from None
        if not _is_number(bias) or not -100 <= bias <= 100:
            raise _bad(f"logit_bias.{key}", "must be a number in [-100, 100]")
        # OpenAI's -100 bans the token outright.
        out[token] = -math.inf if bias <= -100 else float(bias)
    return out


def _n(body: Mapping[str, Any]) -> None:
    for name in ("n", "best_of"):
        value = body.get(name)
        if value is not None and value != 1:
            raise _bad(name, "only 1 is supported")


def _passthrough(body: Mapping[str, Any]) -> dict[str, Any]:
    """OpenAI's sampling fields and llama.cpp's extras, by CompletionOptions' own names."""
    out: dict[str, Any] = {}
    for name in _PASSTHROUGH:
        if name in body and body[name] is not None:
            value = body[name]
            if name in ("samplers", "dry_sequence_breakers"):
                if not isinstance(value, list) or not all(isinstance(s, str) for s in value):
                    raise _bad(name, "must be a list of strings")
                value = tuple(value)
            out[name] = value
    if "temperature" not in out:
        out["temperature"] = _DEFAULT_TEMPERATURE
    return out


def _refuse_sampler_chain(body: Mapping[str, Any]) -> None:
    if body.get("sampler_chain") is not None:
        raise _bad("sampler_chain", "is not available over HTTP; use `samplers` (llama.cpp's names)")


def _options(body: Mapping[str, Any], max_tokens: int, logprobs: Optional[int]) -> CompletionOptions:
    _refuse_sampler_chain(body)
    stop, bias, extra = _stop(body), _logit_bias(body), _passthrough(body)
    try:
        options = CompletionOptions(
            max_tokens=max_tokens, stop_sequences=stop, logprobs=logprobs, logit_bias=bias, **extra
        )
    except (TypeError, ValueError) as e:
        raise _bad("body", str(e)) from None
    problems = options.violations()
    if problems:
        raise InvalidArgumentError.from_violations(problems)
    return options


def _prompt(body: Mapping[str, Any]) -> Union[str, list[int]]:
    value = body.get("prompt")
    # OpenAI's shapes: a string, token ids, or a batch of either; a batch of one is one.
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], (str, list)):
        value = value[0]
    if isinstance(value, str):
        if not value:
            raise _bad("prompt", "must not be empty")
        return value
    if isinstance(value, list) and value and all(is_json_int(t) for t in value):
        return [int(t) for t in value]
    if isinstance(value, list) and len(value) > 1:
        raise _bad("prompt", "one prompt per request (a batch is not supported)")
    raise _bad("prompt", "must be a non-empty string or list of token ids")


def text_call(raw: Any) -> TextCall:
    """A `/v1/completions` body. Raises InvalidArgumentError naming the field."""
    body = _body(raw)
    _n(body)
    for name in ("echo",):
        if body.get(name):
            raise _bad(name, "is not supported")
    stream = _flag(body, "stream")
    logprobs = body.get("logprobs")
    if logprobs is not None and (not is_json_int(logprobs) or not 0 <= logprobs <= 20):
        raise _bad("logprobs", "must be an integer in [0, 20]")
    prompt: Prompt = _prompt(body)
    suffix = body.get("suffix")
    if suffix is not None and suffix != "":
        # OpenAI's insert mode: the prompt is what comes before, `suffix` what comes after.
        if not isinstance(suffix, str):
            raise _bad("suffix", "must be a string")
        if not isinstance(prompt, str):
            raise _bad("prompt", "must be text when a suffix is given")
        indent = body.get("n_indent", 0)
        if not is_json_int(indent):
            raise _bad("n_indent", "must be an integer")
        prompt = Infill(prompt, suffix, indent=indent)
    options = _options(body, _max_tokens(body, ("max_tokens",), 16), logprobs)
    return TextCall(prompt, options, stream, _include_usage(body, stream))


def chat_call(raw: Any) -> ChatCall:
    """A `/v1/chat/completions` body. Raises InvalidArgumentError naming the field."""
    body = _body(raw)
    _n(body)
    stream = _flag(body, "stream")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _bad("messages", "must be a non-empty list of messages")
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping):
            raise _bad(f"messages[{i}]", "must be an object")
    tools = body.get("tools")
    if tools is not None and (not isinstance(tools, list) or not all(isinstance(t, Mapping) for t in tools)):
        raise _bad("tools", "must be a list of tool objects")
    tool_choice = body.get("tool_choice")
    if tool_choice is not None and not isinstance(tool_choice, (str, Mapping)):
        raise _bad("tool_choice", 'must be "auto", "none", "required" or a function choice')
    response_format = body.get("response_format")
    if response_format is not None and not isinstance(response_format, Mapping):
        raise _bad("response_format", "must be an object")
    parallel = body.get("parallel_tool_calls", False)
    if not isinstance(parallel, bool):
        raise _bad("parallel_tool_calls", "must be true or false")
    top = body.get("top_logprobs")
    if top is not None and (not is_json_int(top) or not 0 <= top <= 20):
        raise _bad("top_logprobs", "must be an integer in [0, 20]")
    want_logprobs = _flag(body, "logprobs")
    if top is not None and not want_logprobs:
        raise _bad("top_logprobs", "needs logprobs: true")
    logprobs = (top or 0) if want_logprobs else None
    try:
        chat = ChatRequest.build(messages, tools, tool_choice, response_format, parallel)
    except (TypeError, ValueError, AttributeError) as e:
        if isinstance(e, InvalidArgumentError):
            raise
        raise _bad("messages", str(e)) from None
    options = _options(body, _max_tokens(body, ("max_completion_tokens", "max_tokens"), _UNBOUNDED_MAX_TOKENS), logprobs)
    return ChatCall(chat, options, stream, _include_usage(body, stream))
