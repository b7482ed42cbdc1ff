"""`CompletionOptions` to the engine's `SamplingParams`, field by field, by name.

The option dataclass is the one list of fields: a field whose engine twin has the same
name and type is copied as it is, so a new sampler option needs no line here. Only the
fields whose engine form differs are converted below.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from llama_crab_client.sampling import SamplerChain, SamplerStage
from llama_crab_client.types import CompletionOptions

from . import _engine

__all__ = ["engine_stage", "sampling_params"]


def engine_stage(stage: SamplerStage) -> _engine.SamplerStage:
    """One typed stage as the engine's stage (same parameter names)."""
    out = _engine.SamplerStage()
    out.kind = stage.kind
    for name, value in stage.params().items():
        setattr(out, name, list(value) if isinstance(value, tuple) else value)
    return out


def _chain(chain: SamplerChain | None) -> list[_engine.SamplerStage]:
    return [] if chain is None else [engine_stage(s) for s in chain.stages]


# Fields whose engine form differs: None becomes the engine's "unset" value, mappings
# become pairs, tuples lists.
_CONVERT: dict[str, Callable[[Any], Any]] = {
    "logprobs": lambda v: -1 if v is None else v,
    "seed": lambda v: v or 0,
    "logit_bias": lambda v: [(int(k), float(b)) for k, b in v.items()],
    "grammar": lambda v: v or "",
    "json_schema": lambda v: v or "",
    "samplers": lambda v: list(v) if v is not None else [],
    "sampler_chain": _chain,
}


def sampling_params(options: CompletionOptions) -> _engine.SamplingParams:
    sp = _engine.SamplingParams()
    for f in dataclasses.fields(options):
        value = getattr(options, f.name)
        convert = _CONVERT.get(f.name)
        if convert is not None:
            value = convert(value)
        elif isinstance(value, tuple):
            value = list(value)
        setattr(sp, f.name, value)
    sp.has_seed = options.seed is not None
    return sp
