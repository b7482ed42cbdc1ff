"""Embeddings: what an `Embed` call takes and returns, the same in process and remotely."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, Union

from .types import LIMITS, FieldViolation

__all__ = ["EMBED_LIMITS", "POOLINGS", "EmbedInput", "Embedding", "Embeddings", "Pooling", "embed_input_violations"]

# "model": the model's own pooling (ModelInfo.embed_pooling); "none": one vector per token.
Pooling = Literal["model", "none", "mean", "cls", "last"]
POOLINGS: tuple[str, ...] = ("model", "none", "mean", "cls", "last")

# One input: text (tokenized with the model's special tokens) or token ids used as given.
EmbedInput = Union[str, Sequence[int]]


@dataclass(frozen=True)
class EmbedLimits:
    """Caps on one Embed call that hold before the engine sees it (the engine also caps
    inputs and tokens per call: `LlamaParams.max_embed_inputs` / `max_embed_tokens`)."""

    inputs: int = 2048
    text_bytes: int = LIMITS.prompt_text_bytes


EMBED_LIMITS = EmbedLimits()


@dataclass(frozen=True)
class Embedding:
    """One input's embedding: `vector` when pooled; with pooling "none", `token_vectors`
    holds one vector per token and `vector` is empty."""

    vector: tuple[float, ...]
    prompt_tokens: int
    token_vectors: tuple[tuple[float, ...], ...] = ()


@dataclass(frozen=True)
class Embeddings:
    """The embeddings of a batch of inputs, in input order."""

    data: tuple[Embedding, ...]
    # The pooling applied ("mean", ...: the model's own when "model" was asked).
    pooling: str
    dimensions: int
    prompt_tokens: int


def embed_input_violations(inputs: Sequence[EmbedInput], pooling: str) -> list[FieldViolation]:
    """What is wrong with an Embed request before any tokenizing: the field is named."""
    problems: list[FieldViolation] = []
    if isinstance(inputs, (str, bytes)):
        problems.append(FieldViolation("inputs", "must be a list of inputs, not one string"))
        return problems
    if not inputs:
        problems.append(FieldViolation("inputs", "at least one input is required"))
    elif len(inputs) > EMBED_LIMITS.inputs:
        problems.append(FieldViolation("inputs", f"at most {EMBED_LIMITS.inputs} inputs (got {len(inputs)})"))
    else:
        for i, item in enumerate(inputs):
            if isinstance(item, str):
                if item == "":
                    problems.append(FieldViolation(f"inputs[{i}]", "empty"))
                elif len(item.encode("utf-8")) > EMBED_LIMITS.text_bytes:
                    problems.append(FieldViolation(f"inputs[{i}]", f"at most {EMBED_LIMITS.text_bytes} bytes of text"))
            elif not isinstance(item, Sequence) or isinstance(item, bytes):
                problems.append(FieldViolation(f"inputs[{i}]", "must be text or a list of token ids"))
            elif not item:
                problems.append(FieldViolation(f"inputs[{i}]", "empty"))
            elif not all(isinstance(t, int) and not isinstance(t, bool) for t in item):
                problems.append(FieldViolation(f"inputs[{i}]", "token ids must be integers"))
    if pooling not in POOLINGS:
        problems.append(FieldViolation("pooling", f"must be one of {', '.join(POOLINGS)} (got {pooling!r})"))
    return problems
