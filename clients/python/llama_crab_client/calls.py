"""Checked request building shared by the sync and asyncio clients.

Options are validated here with the same rules the engine applies
(`CompletionOptions.violations`), so a bad option fails before any network round trip
with the same `InvalidArgumentError` and field as in process. What needs the model
(vocabulary range, grammar syntax, prompt length) is checked by the server.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Optional, Union

from . import convert
from .chat import ChatRequest
from .errors import InvalidArgumentError
from .embeddings import EmbedInput, embed_input_violations
from .infill import Infill
from .types import CompletionOptions, FieldViolation, Timings
from .v1 import llama_crab_pb2 as pb

__all__ = [
    "CompleteCall", "StreamClock", "chat_call", "complete_call", "detokenize_request", "embed_request", "tokenize_request",
]  # fmt: skip

Prompt = Union[str, Sequence[int], Infill]

_INT32 = (-(2**31), 2**31 - 1)


@dataclass(frozen=True)
class CompleteCall:
    """A validated Complete request and what the client needs to interpret its stream."""

    request: pb.CompleteRequest
    logprobs_requested: bool
    # Prompt length when known without the model (token prompts); else 0.
    prompt_tokens: int


def _check_token_ids(tokens: Sequence[int], field: str) -> list[int]:
    if isinstance(tokens, (str, bytes)):
        raise InvalidArgumentError.for_field(field, "must be a list of token ids")
    out: list[int] = []
    for t in tokens:
        if not isinstance(t, int) or isinstance(t, bool) or not _INT32[0] <= t <= _INT32[1]:
            raise InvalidArgumentError.for_field(field, f"token id {t!r} is not in the vocabulary")
        out.append(t)
    return out


def complete_call(prompt: Prompt, options: Optional[CompletionOptions]) -> CompleteCall:
    options = CompletionOptions() if options is None else options
    if not isinstance(options, CompletionOptions):
        raise TypeError(f"options must be a CompletionOptions, not {type(options).__name__}")
    problems = options.violations()
    if problems:
        raise InvalidArgumentError.from_violations(problems)
    if isinstance(prompt, Infill):
        infill_problems = prompt.violations()
        if infill_problems:
            raise InvalidArgumentError.from_violations(infill_problems)
        request = convert.complete_request_to_proto(prompt, options)
        n_prompt = 0
    elif isinstance(prompt, str):
        if prompt == "":
            raise InvalidArgumentError.for_field("prompt", "must not be empty")
        request = convert.complete_request_to_proto(prompt, options)
        n_prompt = 0
    else:
        ids = _check_token_ids(prompt, "prompt")
        if not ids:
            raise InvalidArgumentError.for_field("prompt", "must not be empty")
        request = convert.complete_request_to_proto(ids, options)
        n_prompt = len(ids)
    return CompleteCall(request, options.logprobs is not None, n_prompt)


def embed_request(inputs: Sequence[EmbedInput], pooling: str, normalize: bool) -> pb.EmbedRequest:
    """A validated Embed request (the server checks lengths against the model)."""
    problems = embed_input_violations(inputs, pooling)
    if problems:
        raise InvalidArgumentError.from_violations(problems)
    for i, item in enumerate(inputs):
        if not isinstance(item, str):
            _check_token_ids(item, f"inputs[{i}]")
    return convert.embed_request_to_proto(inputs, pooling, bool(normalize))


def tokenize_request(text: str, add_special: bool, parse_special: bool) -> pb.TokenizeRequest:
    if not isinstance(text, str):
        raise InvalidArgumentError.for_field("text", "must be a string")
    return convert.tokenize_request_to_proto(text, bool(add_special), bool(parse_special))


def detokenize_request(tokens: Sequence[int]) -> pb.DetokenizeRequest:
    return pb.DetokenizeRequest(tokens=_check_token_ids(tokens, "tokens"))


def chat_call(request: ChatRequest, options: Optional[CompletionOptions]) -> pb.ChatRequest:
    """A validated Chat request (the same checks as in process; schemas and the template
    are checked by the server)."""
    options = CompletionOptions() if options is None else options
    if not isinstance(options, CompletionOptions):
        raise TypeError(f"options must be a CompletionOptions, not {type(options).__name__}")
    problems = options.violations() + request.violations()
    if options.grammar is not None:
        problems.append(FieldViolation("grammar", "not with chat: use response_format"))
    if problems:
        raise InvalidArgumentError.from_violations(problems)
    return convert.chat_request_to_proto(request, options)


def _elapsed_ms(since: float) -> float:
    return (time.monotonic() - since) * 1000.0


class StreamClock:
    """Client-side timings for a stream the client cut short (the server's never arrive)."""

    def __init__(self) -> None:
        self.started = time.monotonic()
        self.first_chunk_ms: Optional[float] = None

    def chunk(self) -> None:
        if self.first_chunk_ms is None:
            self.first_chunk_ms = _elapsed_ms(self.started)

    def timings(self) -> Timings:
        return Timings(time_to_first_token_ms=self.first_chunk_ms or 0.0, total_ms=_elapsed_ms(self.started))
