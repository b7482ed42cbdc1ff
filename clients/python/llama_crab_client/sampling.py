"""Typed sampler chains: each stage is one llama.cpp sampler with its own parameters.

    SamplerChain().penalties(last_n=64, repeat=1.1).top_k(40).top_p(0.95).temp(0.8).dist()

A chain is immutable; each builder validates its stage and returns a new chain. The last
stage picks the token (`greedy`, `dist`, `mirostat`, `mirostat_v2`, `adaptive_p`, or a
low-level `custom` function); a chain that ends otherwise gets `dist` appended. The same
stages travel over gRPC (`CompletionOptions.sampler_chain`, one `SamplerStage` message per
stage) and build the low-level `llama_crab.lowlevel.Sampler`. The ranges below are the ones
the proto documents; stage field names equal the proto's and the engine's.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Optional, Union

__all__ = [
    "AdaptiveP",
    "Custom",
    "DEFAULT_DRY_SEQUENCE_BREAKERS",
    "Dist",
    "Dry",
    "DynamicTemp",
    "Greedy",
    "MinP",
    "Mirostat",
    "MirostatV2",
    "Penalties",
    "SamplerChain",
    "SamplerStage",
    "STAGE_TYPES",
    "Temp",
    "TopK",
    "TopNSigma",
    "TopP",
    "Typical",
    "Xtc",
]

# llama.cpp common's DRY sequence breakers; an empty list means these.
DEFAULT_DRY_SEQUENCE_BREAKERS: tuple[str, ...] = ("\n", ":", '"', "*")
MAX_STAGES = 16
# DRY breakers are matched against the whole vocabulary when a request is submitted:
# measured on a 49k vocabulary, ~6 ms for a one-character breaker and ~80-100 ms for a
# longer one. So a request holds at most 8, at most 2 of them longer than one character
# (~250 ms at worst), and llama.cpp reads only the first 40 bytes of each.
MAX_SEQUENCE_BREAKERS = 8
MAX_LONG_SEQUENCE_BREAKERS = 2
MAX_SEQUENCE_BREAKER_CHARS = 40
MAX_MIN_KEEP = 1024

Problem = tuple[str, str]  # (parameter, why)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _num(name: str, value: Any, lo: float, hi: float, lo_open: bool = False) -> list[Problem]:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return [(name, "must be a finite number")]
    if (value <= lo if lo_open else value < lo) or value > hi:
        return [(name, f"must be in {'(' if lo_open else '['}{lo}, {hi}]")]
    return []


def _int(name: str, value: Any, lo: int, hi: int) -> list[Problem]:
    if not _is_int(value) or not lo <= value <= hi:
        return [(name, f"must be an integer in [{lo}, {hi}]")]
    return []


def sequence_breaker_problems(name: str, breakers: Any) -> list[Problem]:
    """DRY's sequence breakers: a few short non-empty strings (shared with the flat option)."""
    if isinstance(breakers, str) or not isinstance(breakers, Sequence):
        return [(name, "must be a list of strings")]
    if len(breakers) > MAX_SEQUENCE_BREAKERS:
        return [(name, f"at most {MAX_SEQUENCE_BREAKERS} entries (got {len(breakers)})")]
    out: list[Problem] = []
    for i, b in enumerate(breakers):
        if not isinstance(b, str) or not b or len(b) > MAX_SEQUENCE_BREAKER_CHARS:
            out.append((f"{name}[{i}]", f"must be a non-empty string of at most {MAX_SEQUENCE_BREAKER_CHARS} characters"))
    if not out and long_breakers(breakers) > MAX_LONG_SEQUENCE_BREAKERS:
        out.append((name, f"at most {MAX_LONG_SEQUENCE_BREAKERS} breakers longer than one character (each costs a vocabulary scan)"))
    return out


def long_breakers(breakers: Sequence[str]) -> int:
    return sum(1 for b in breakers if len(b) > 1)


@dataclass(frozen=True)
class SamplerStage:
    """Base of the stages; `kind` names the llama.cpp sampler (and the proto oneof field)."""

    kind: ClassVar[str] = ""
    # Picks the token, so it must come last.
    selects: ClassVar[bool] = False

    def problems(self) -> list[Problem]:
        """Every invalid parameter as (parameter, why); empty when valid."""
        return []

    def params(self) -> dict[str, Any]:
        """The parameters by name (what the proto message and the engine's stage carry)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


@dataclass(frozen=True)
class Greedy(SamplerStage):
    """Pick the most likely token."""

    kind: ClassVar[str] = "greedy"
    selects: ClassVar[bool] = True


@dataclass(frozen=True)
class Dist(SamplerStage):
    """Draw from the remaining distribution (seeded by the request's seed)."""

    kind: ClassVar[str] = "dist"
    selects: ClassVar[bool] = True


@dataclass(frozen=True)
class TopK(SamplerStage):
    """Keep the k most likely tokens; 0 keeps all."""

    kind: ClassVar[str] = "top_k"
    k: int = 40

    def problems(self) -> list[Problem]:
        return _int("k", self.k, 0, 1 << 20)


@dataclass(frozen=True)
class TopP(SamplerStage):
    """Nucleus: keep the most likely tokens whose mass reaches p (at least min_keep)."""

    kind: ClassVar[str] = "top_p"
    p: float = 0.95
    min_keep: int = 0

    def problems(self) -> list[Problem]:
        return _num("p", self.p, 0.0, 1.0) + _int("min_keep", self.min_keep, 0, MAX_MIN_KEEP)


@dataclass(frozen=True)
class MinP(SamplerStage):
    """Drop tokens below p times the top probability."""

    kind: ClassVar[str] = "min_p"
    p: float = 0.05
    min_keep: int = 0

    def problems(self) -> list[Problem]:
        return _num("p", self.p, 0.0, 1.0) + _int("min_keep", self.min_keep, 0, MAX_MIN_KEEP)


@dataclass(frozen=True)
class Typical(SamplerStage):
    """Locally typical sampling with mass p; 1 disables."""

    kind: ClassVar[str] = "typical"
    p: float = 1.0
    min_keep: int = 0

    def problems(self) -> list[Problem]:
        return _num("p", self.p, 0.0, 1.0, lo_open=True) + _int("min_keep", self.min_keep, 0, MAX_MIN_KEEP)


@dataclass(frozen=True)
class Temp(SamplerStage):
    """Divide the logits by t; t <= 0 keeps only the most likely token."""

    kind: ClassVar[str] = "temp"
    t: float = 0.8

    def problems(self) -> list[Problem]:
        return _num("t", self.t, 0.0, 100.0)


@dataclass(frozen=True)
class DynamicTemp(SamplerStage):
    """Entropy-scaled temperature in [t - range, t + range], shaped by exponent."""

    kind: ClassVar[str] = "dynamic_temp"
    t: float = 0.8
    range: float = 0.0
    exponent: float = 1.0

    def problems(self) -> list[Problem]:
        return _num("t", self.t, 0.0, 100.0) + _num("range", self.range, 0.0, 100.0) + _num("exponent", self.exponent, 0.0, 100.0)


@dataclass(frozen=True)
class Xtc(SamplerStage):
    """Exclude top choices: with `probability`, drop every token above `threshold` but the least likely of them."""

    kind: ClassVar[str] = "xtc"
    probability: float = 0.5
    threshold: float = 0.1
    min_keep: int = 0

    def problems(self) -> list[Problem]:
        return (
            _num("probability", self.probability, 0.0, 1.0)
            + _num("threshold", self.threshold, 0.0, 1.0)
            + _int("min_keep", self.min_keep, 0, MAX_MIN_KEEP)
        )


@dataclass(frozen=True)
class TopNSigma(SamplerStage):
    """Keep tokens whose logit is within n standard deviations of the top one."""

    kind: ClassVar[str] = "top_n_sigma"
    n: float = 1.0

    def problems(self) -> list[Problem]:
        return _num("n", self.n, 0.0, 100.0, lo_open=True)


@dataclass(frozen=True)
class Mirostat(SamplerStage):
    """Mirostat v1: aim at surprise tau, learning rate eta, estimating from the top m tokens."""

    kind: ClassVar[str] = "mirostat"
    selects: ClassVar[bool] = True
    tau: float = 5.0
    eta: float = 0.1
    m: int = 100

    def problems(self) -> list[Problem]:
        return _num("tau", self.tau, 0.0, 100.0) + _num("eta", self.eta, 0.0, 10.0) + _int("m", self.m, 1, 1000)


@dataclass(frozen=True)
class MirostatV2(SamplerStage):
    """Mirostat v2: aim at surprise tau with learning rate eta."""

    kind: ClassVar[str] = "mirostat_v2"
    selects: ClassVar[bool] = True
    tau: float = 5.0
    eta: float = 0.1

    def problems(self) -> list[Problem]:
        return _num("tau", self.tau, 0.0, 100.0) + _num("eta", self.eta, 0.0, 10.0)


@dataclass(frozen=True)
class Penalties(SamplerStage):
    """Repetition, frequency and presence penalties over the last `last_n` tokens (-1: the whole context)."""

    kind: ClassVar[str] = "penalties"
    last_n: int = 64
    repeat: float = 1.0
    frequency: float = 0.0
    presence: float = 0.0

    def problems(self) -> list[Problem]:
        return (
            _int("last_n", self.last_n, -1, 1 << 20)
            + _num("repeat", self.repeat, 0.0, 10.0, lo_open=True)
            + _num("frequency", self.frequency, -2.0, 2.0)
            + _num("presence", self.presence, -2.0, 2.0)
        )


@dataclass(frozen=True)
class Dry(SamplerStage):
    """DRY: penalise a token that extends a repeat longer than `allowed_length` by
    multiplier * base ** (length - allowed_length); `sequence_breakers` end a repeat
    (empty means llama.cpp's defaults, as an empty list does over the wire)."""

    kind: ClassVar[str] = "dry"
    multiplier: float = 0.8
    base: float = 1.75
    allowed_length: int = 2
    last_n: int = 64
    sequence_breakers: tuple[str, ...] = DEFAULT_DRY_SEQUENCE_BREAKERS

    def __post_init__(self) -> None:
        if not isinstance(self.sequence_breakers, (tuple, str)) and isinstance(self.sequence_breakers, Sequence):
            object.__setattr__(self, "sequence_breakers", tuple(self.sequence_breakers))

    def problems(self) -> list[Problem]:
        return (
            _num("multiplier", self.multiplier, 0.0, 100.0)
            + _num("base", self.base, 1.0, 100.0)
            + _int("allowed_length", self.allowed_length, 0, 1000)
            + _int("last_n", self.last_n, -1, 1 << 20)
            + sequence_breaker_problems("sequence_breakers", self.sequence_breakers)
        )


@dataclass(frozen=True)
class AdaptiveP(SamplerStage):
    """Pick tokens near probability `target` over time (an EMA with `decay`)."""

    kind: ClassVar[str] = "adaptive_p"
    selects: ClassVar[bool] = True
    target: float = 0.5
    decay: float = 0.9

    def problems(self) -> list[Problem]:
        return _num("target", self.target, 0.0, 1.0) + _num("decay", self.decay, 0.0, 0.99)


@dataclass(frozen=True)
class Custom(SamplerStage):
    """A Python function from the logits (one float per vocabulary token, -inf where an
    earlier stage removed it) to the chosen token id. Low-level `Sampler` only (it runs
    in the caller's thread with the GIL held: slow); the engine and gRPC refuse it."""

    kind: ClassVar[str] = "custom"
    selects: ClassVar[bool] = True
    fn: Callable[[Sequence[float]], int] = dataclasses.field(default=lambda logits: 0)

    def problems(self) -> list[Problem]:
        return [] if callable(self.fn) else [("fn", "must be callable")]

    def params(self) -> dict[str, Any]:
        return {}


# Every stage type by kind: the proto's oneof field names.
STAGE_TYPES: dict[str, type[SamplerStage]] = {
    t.kind: t
    for t in (
        Greedy, Dist, TopK, TopP, MinP, Typical, Temp, DynamicTemp, Xtc, TopNSigma,
        Mirostat, MirostatV2, Penalties, Dry, AdaptiveP, Custom,
    )
}  # fmt: skip


@dataclass(frozen=True)
class SamplerChain:
    """An ordered, immutable sampler chain; the builders validate and return a new chain."""

    stages: tuple[SamplerStage, ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.stages, tuple):
            object.__setattr__(self, "stages", tuple(self.stages))

    def __iter__(self) -> Iterator[SamplerStage]:
        return iter(self.stages)

    def __len__(self) -> int:
        return len(self.stages)

    def sequence_breakers(self) -> list[str]:
        """The DRY sequence breakers of all the chain's DRY stages (an empty list: the defaults)."""
        return [b for s in self.stages if isinstance(s, Dry) for b in (s.sequence_breakers or DEFAULT_DRY_SEQUENCE_BREAKERS)]

    def problems(self, prefix: str = "sampler_chain") -> list[Problem]:
        """Every invalid stage or parameter, named `prefix[i].parameter`."""
        out: list[Problem] = []
        if len(self.stages) > MAX_STAGES:
            return [(prefix, f"at most {MAX_STAGES} stages (got {len(self.stages)})")]
        if all(isinstance(s, Dry) and isinstance(s.sequence_breakers, tuple) for s in self.stages if isinstance(s, Dry)):
            breakers = self.sequence_breakers()
            if len(breakers) > MAX_SEQUENCE_BREAKERS or long_breakers(breakers) > MAX_LONG_SEQUENCE_BREAKERS:
                out.append((prefix, f"its DRY stages hold at most {MAX_SEQUENCE_BREAKERS} sequence breakers in all, "
                            f"at most {MAX_LONG_SEQUENCE_BREAKERS} of them longer than one character"))
        for i, stage in enumerate(self.stages):
            where = f"{prefix}[{i}]"
            if not isinstance(stage, SamplerStage) or type(stage) not in STAGE_TYPES.values():
                out.append((where, "must be a sampler stage (see llama_crab_client.sampling)"))
                continue
            out.extend((f"{where}.{name}", why) for name, why in stage.problems())
            if stage.selects and i != len(self.stages) - 1:
                out.append((where, f"{stage.kind} picks the token, so it must be the last stage"))
        return out

    def then(self, stage: SamplerStage) -> SamplerChain:
        """This chain plus `stage`; raises InvalidArgumentError naming a bad parameter."""
        chain = SamplerChain((*self.stages, stage))
        problems = chain.problems()
        if problems:
            from .errors import InvalidArgumentError
            from .types import FieldViolation

            raise InvalidArgumentError(
                f"{problems[0][0]}: {problems[0][1]}", [FieldViolation(f, why) for f, why in problems]
            )
        return chain

    # ---- builders, one per stage ----------------------------------------------------------
    def greedy(self) -> SamplerChain:
        return self.then(Greedy())

    def dist(self) -> SamplerChain:
        return self.then(Dist())

    def top_k(self, k: int = 40) -> SamplerChain:
        return self.then(TopK(k))

    def top_p(self, p: float = 0.95, min_keep: int = 0) -> SamplerChain:
        return self.then(TopP(p, min_keep))

    def min_p(self, p: float = 0.05, min_keep: int = 0) -> SamplerChain:
        return self.then(MinP(p, min_keep))

    def typical(self, p: float = 1.0, min_keep: int = 0) -> SamplerChain:
        return self.then(Typical(p, min_keep))

    def temp(self, t: float = 0.8) -> SamplerChain:
        return self.then(Temp(t))

    def dynamic_temp(self, t: float = 0.8, range: float = 0.0, exponent: float = 1.0) -> SamplerChain:
        return self.then(DynamicTemp(t, range, exponent))

    def xtc(self, probability: float = 0.5, threshold: float = 0.1, min_keep: int = 0) -> SamplerChain:
        return self.then(Xtc(probability, threshold, min_keep))

    def top_n_sigma(self, n: float = 1.0) -> SamplerChain:
        return self.then(TopNSigma(n))

    def mirostat(self, tau: float = 5.0, eta: float = 0.1, m: int = 100) -> SamplerChain:
        return self.then(Mirostat(tau, eta, m))

    def mirostat_v2(self, tau: float = 5.0, eta: float = 0.1) -> SamplerChain:
        return self.then(MirostatV2(tau, eta))

    def penalties(
        self, last_n: int = 64, repeat: float = 1.0, frequency: float = 0.0, presence: float = 0.0
    ) -> SamplerChain:
        return self.then(Penalties(last_n, repeat, frequency, presence))

    def dry(
        self,
        multiplier: float = 0.8,
        base: float = 1.75,
        allowed_length: int = 2,
        last_n: int = 64,
        sequence_breakers: Sequence[str] = DEFAULT_DRY_SEQUENCE_BREAKERS,
    ) -> SamplerChain:
        return self.then(Dry(multiplier, base, allowed_length, last_n, tuple(sequence_breakers)))

    def adaptive_p(self, target: float = 0.5, decay: float = 0.9) -> SamplerChain:
        return self.then(AdaptiveP(target, decay))

    def custom(self, fn: Callable[[Sequence[float]], int]) -> SamplerChain:
        return self.then(Custom(fn))


ChainLike = Union[SamplerChain, Sequence[SamplerStage]]


def as_chain(value: Optional[ChainLike]) -> Optional[SamplerChain]:
    """A SamplerChain from a chain or a sequence of stages (None stays None)."""
    if value is None or isinstance(value, SamplerChain):
        return value
    return SamplerChain(tuple(value))
