"""OpenAI's `/v1/embeddings`: its request body as an Embed call, and its response shape.

`input` is a string, token ids, or a list of either (OpenAI's four shapes); vectors come
back as floats or, with `encoding_format: "base64"` (what the official SDK asks for when
numpy is present), as base64 of little-endian float32, which is what the engine produced.
"""

from __future__ import annotations

import array
import base64
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from llama_crab_client.embeddings import EmbedInput, Embeddings
from llama_crab_client.errors import InvalidArgumentError

from .openai_requests import is_json_int

__all__ = ["EmbedCall", "embed_call", "embeddings_body"]


@dataclass(frozen=True)
class EmbedCall:
    """A `/v1/embeddings` body, checked."""

    inputs: list[EmbedInput]
    base64: bool
    dimensions: int  # 0: the model's


def embed_call(raw: Any) -> EmbedCall:
    """Raises InvalidArgumentError naming the field (`input[2]`, `encoding_format`, ...)."""
    if not isinstance(raw, Mapping):
        raise InvalidArgumentError.for_field("body", "must be a JSON object")
    value = raw.get("input")
    inputs: list[EmbedInput]
    if isinstance(value, str):
        inputs = [value]
    elif isinstance(value, list) and value and all(is_json_int(t) for t in value):
        inputs = [list(value)]
    elif isinstance(value, list) and value:
        inputs = []
        for i, item in enumerate(value):
            if isinstance(item, str):
                inputs.append(item)
            elif isinstance(item, list) and all(is_json_int(t) for t in item):
                inputs.append(list(item))
            else:
                raise InvalidArgumentError.for_field(f"input[{i}]", "must be a string or a list of token ids")
    else:
        raise InvalidArgumentError.for_field("input", "must be a string, token ids, or a non-empty list of either")
    encoding = raw.get("encoding_format", "float")
    if encoding not in ("float", "base64"):
        raise InvalidArgumentError.for_field("encoding_format", 'must be "float" or "base64"')
    dimensions = raw.get("dimensions", 0)
    if dimensions is None:
        dimensions = 0
    if not is_json_int(dimensions) or dimensions < 0:
        raise InvalidArgumentError.for_field("dimensions", "must be a positive integer")
    return EmbedCall(inputs, encoding == "base64", dimensions)


def _base64(vector: tuple[float, ...]) -> str:
    packed = array.array("f", vector)
    if sys.byteorder != "little":
        packed.byteswap()
    return base64.b64encode(packed.tobytes()).decode("ascii")


def embeddings_body(result: Embeddings, model: str, as_base64: bool) -> dict[str, Any]:
    data = [
        {"object": "embedding", "index": i, "embedding": _base64(e.vector) if as_base64 else list(e.vector)}
        for i, e in enumerate(result.data)
    ]
    usage = {"prompt_tokens": result.prompt_tokens, "total_tokens": result.prompt_tokens}
    return {"object": "list", "data": data, "model": model, "usage": usage}
