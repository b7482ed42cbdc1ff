"""Option and result types shared by the in-process engine and the remote client.

One definition serves both transports: `llama_crab` (server distribution, native
engine) re-exports these, and `llama_crab_client` (pure Python) uses them over gRPC,
so code written against one works against the other.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Union

from .sampling import MAX_MIN_KEEP, ChainLike, Custom, SamplerChain, as_chain, sequence_breaker_problems

__all__ = [
    "Chunk",
    "Completion",
    "CompletionCallback",
    "CompletionOptions",
    "FieldViolation",
    "Limits",
    "LIMITS",
    "ModelInfo",
    "SAMPLER_NAMES",
    "StopReason",
    "StreamControl",
    "Timings",
    "TokenLogprob",
    "TopLogprob",
    "Usage",
    "completion_from_delivered",
]


class StreamControl(enum.Enum):
    """What a stream callback returns: keep generating or stop now."""

    CONTINUE = "continue"
    STOP = "stop"


class StopReason(enum.Enum):
    """Why generation ended."""

    LENGTH = "length"  # max_tokens reached (or the context filled up)
    EOS = "eos"  # the model produced an end-of-generation token
    STOP_SEQUENCE = "stop_sequence"  # a stop sequence matched; see Completion.stop_sequence
    CANCELLED = "cancelled"  # the caller stopped the stream (STOP, cancel, deadline)


# Names accepted in CompletionOptions.samplers (llama.cpp common's sampler names).
SAMPLER_NAMES: frozenset[str] = frozenset(
    {
        "penalties",
        "dry",
        "top_n_sigma",
        "top_k",
        "typical_p",
        "top_p",
        "min_p",
        "xtc",
        "temperature",
        "adaptive_p",
    }
)


@dataclass(frozen=True)
class Limits:
    """Size caps on request fields, the same in process and over the wire (the proto
    documents them): each keeps one request's cost bounded. Grammar size and cost are
    bounded by the engine (`LlamaParams.max_grammar_bytes`), since servers tune them."""

    stop_sequences: int = 16
    stop_sequence_chars: int = 256
    logit_bias: int = 1024
    samplers: int = 16
    json_schema_bytes: int = 64 * 1024
    prompt_text_bytes: int = 4 * 1024 * 1024
    prompt_tokens: int = 1 << 20


LIMITS = Limits()


@dataclass(frozen=True)
class FieldViolation:
    """One invalid field of a request: its name and what is wrong with it."""

    field: str
    description: str


@dataclass(frozen=True)
class TopLogprob:
    token_id: int
    text: str
    logprob: float


@dataclass(frozen=True)
class TokenLogprob:
    """A generated token with its log-probability under the model and the top-N alternatives."""

    token_id: int
    text: str
    logprob: float
    top: tuple[TopLogprob, ...] = ()


@dataclass(frozen=True)
class Chunk:
    """A piece of streamed output. Never splits a UTF-8 character."""

    text: str
    token_ids: tuple[int, ...]
    # Cumulative number of generated tokens, including this chunk's.
    n_tokens: int
    # One entry per token of this chunk when logprobs were requested, else None.
    logprobs: Optional[tuple[TokenLogprob, ...]] = None


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    # Prompt tokens whose KV was reused rather than computed (prefix caching).
    cached_tokens: int = 0


@dataclass(frozen=True)
class Timings:
    # Time spent waiting for a free slot.
    queue_ms: float = 0.0
    # From submission to the first generated token.
    time_to_first_token_ms: float = 0.0
    prompt_tokens_per_second: float = 0.0
    decode_tokens_per_second: float = 0.0
    total_ms: float = 0.0
    # Speculative decoding: tokens drafted, and those the model accepted.
    draft_tokens: int = 0
    draft_accepted_tokens: int = 0


@dataclass(frozen=True)
class Completion:
    """The final result of a completion, also after STOP (it then holds what was delivered)."""

    text: str
    token_ids: tuple[int, ...]
    stop_reason: StopReason
    stop_sequence: Optional[str] = None
    usage: Usage = field(default_factory=Usage)
    timings: Timings = field(default_factory=Timings)
    logprobs: Optional[tuple[TokenLogprob, ...]] = None


@dataclass(frozen=True)
class ModelInfo:
    name: str
    architecture: str
    description: str
    n_params: int
    n_ctx_train: int
    n_ctx: int
    n_vocab: int
    has_chat_template: bool
    n_slots: int
    # The chat template has a tool-call format (tools can be offered in chat).
    supports_tools: bool = False
    # False for an encoder (BERT) that only embeds: Complete and Chat refuse.
    generates: bool = True
    # The vocabulary has fill-in-the-middle tokens (Complete takes an `Infill`).
    supports_infill: bool = False
    # The length of an embedding, and the pooling Embed applies by default.
    n_embd: int = 0
    embed_pooling: str = ""

    @classmethod
    def from_attributes(cls, source: Any) -> ModelInfo:
        """Copy the fields by name from any object that has them (the native engine's
        ModelInfo, the protobuf message), so the field list is written once."""
        return cls(**{f.name: getattr(source, f.name) for f in dataclasses.fields(cls)})


CompletionCallback = Callable[[Chunk], Optional[StreamControl]]


def completion_from_delivered(
    final: Optional[Completion],
    delivered: Sequence[Chunk],
    *,
    prompt_tokens: int = 0,
    timings: Optional[Timings] = None,
    logprobs_requested: Optional[bool] = None,
) -> Completion:
    """The Completion of a stream its consumer stopped: exactly the delivered chunks.

    `final` is the producer's own final Completion when one arrived (in process, the
    engine's; remotely none, since the call is cancelled). Its usage and timings are
    kept, but text, token ids and logprobs are rebuilt from `delivered`, because the
    producer may have generated more than the consumer saw. Without `final`,
    `prompt_tokens` and `timings` fill in what is known. Logprobs are present when
    they were requested: `final` says so, else `logprobs_requested`, else whether the
    chunks carried them.
    """
    token_ids = tuple(t for c in delivered for t in c.token_ids)
    if final is not None:
        wants_logprobs = final.logprobs is not None
        prompt_tokens, cached = final.usage.prompt_tokens, final.usage.cached_tokens
        timings = final.timings
    else:
        wants_logprobs = (
            logprobs_requested
            if logprobs_requested is not None
            else any(c.logprobs is not None for c in delivered)
        )
        cached = 0
    logprobs = tuple(lp for c in delivered for lp in (c.logprobs or ())) if wants_logprobs else None
    return Completion(
        text="".join(c.text for c in delivered),
        token_ids=token_ids,
        stop_reason=StopReason.CANCELLED,
        stop_sequence=None,
        usage=Usage(prompt_tokens, len(token_ids), cached),
        timings=timings if timings is not None else Timings(),
        logprobs=logprobs,
    )


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return (isinstance(value, (int, float))) and not isinstance(value, bool)


@dataclass(frozen=True)
class CompletionOptions:
    """How to generate. Greedy unless `temperature > 0`.

    Build with keywords or with the `with_*` builders, which return a new object:

        CompletionOptions(64).with_stop_sequence("\\n\\n").with_temperature(0.7).with_seed(1)
    """

    max_tokens: int = 16
    stop_sequences: tuple[str, ...] = ()
    # None: no logprobs. N >= 0: the chosen token's logprob plus the top-N alternatives.
    logprobs: Optional[int] = None
    temperature: float = 0.0
    top_k: int = 40
    top_p: float = 0.95
    min_p: float = 0.05
    typical_p: float = 1.0
    repeat_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    # How many recent tokens the penalties look at (0 disables, -1 the whole context).
    penalty_last_n: int = 64
    # None: a random seed per request.
    seed: Optional[int] = None
    # token id -> bias added to its logit (use -inf to ban a token).
    logit_bias: Mapping[int, float] = field(default_factory=dict)
    # A GBNF grammar constraining the output (root rule `root`).
    grammar: Optional[str] = None
    # An explicit ordered sampler chain (names from SAMPLER_NAMES); None = llama.cpp's default order.
    samplers: Optional[tuple[str, ...]] = None
    # Reuse the KV of a cached prefix of the prompt (the server's prefix cache); False
    # computes the whole prompt afresh. Never changes what is generated, only how fast.
    cache_prompt: bool = True
    # Speculative decoding, where the server (or Llama) runs it: drafts verified with this
    # request's own sampler, so the output is the same, only sooner. False turns it off.
    speculative: bool = True
    # ---- the rest of llama.cpp's samplers (common's names, defaults and meanings) --------
    # At least this many candidates survive top_p / min_p / typical_p / xtc (0: no floor).
    min_keep: int = 0
    # Keep tokens within n standard deviations of the top logit; <= 0 disables.
    top_n_sigma: float = -1.0
    # XTC: with this probability, drop every token above the threshold but the least likely one.
    xtc_probability: float = 0.0
    xtc_threshold: float = 0.1
    # DRY repetition penalty: multiplier * base ** (repeat length - allowed_length); 0 disables.
    dry_multiplier: float = 0.0
    dry_base: float = 1.75
    dry_allowed_length: int = 2
    # How many recent tokens DRY scans (0 disables, -1 the whole context).
    dry_penalty_last_n: int = 64
    # Strings that end a repeat for DRY; empty means llama.cpp's defaults ("\n", ":", '"', "*").
    dry_sequence_breakers: tuple[str, ...] = ()
    # Mirostat: 0 off, 1 (v1) or 2 (v2); replaces the chain with temperature + mirostat.
    mirostat: int = 0
    mirostat_tau: float = 5.0
    mirostat_eta: float = 0.1
    # Dynamic temperature: entropy-scaled in [temperature - range, temperature + range].
    dynatemp_range: float = 0.0
    dynatemp_exponent: float = 1.0
    # Adaptive-p: pick tokens near this probability over time (negative disables), EMA decay.
    adaptive_target: float = -1.0
    adaptive_decay: float = 0.9
    # Never end at an end-of-generation token (generate until max_tokens or a stop sequence).
    ignore_eos: bool = False
    # End-of-generation tokens and stop sequences wait until this many tokens are generated.
    min_tokens: int = 0
    # A JSON schema (JSON text) the output must follow, converted to a grammar by llama.cpp.
    json_schema: Optional[str] = None
    # An explicit typed chain (see `SamplerChain`); wins over `samplers` and the flat fields above.
    sampler_chain: Optional[SamplerChain] = None

    def __post_init__(self) -> None:
        # Accept lists and other sequences but store tuples so options stay hashable-ish and immutable.
        if isinstance(self.stop_sequences, str):
            object.__setattr__(self, "stop_sequences", (self.stop_sequences,))
        elif not isinstance(self.stop_sequences, tuple):
            object.__setattr__(self, "stop_sequences", tuple(self.stop_sequences))
        if self.samplers is not None and not isinstance(self.samplers, tuple):
            object.__setattr__(self, "samplers", tuple(self.samplers))
        if not isinstance(self.logit_bias, dict):
            object.__setattr__(self, "logit_bias", dict(self.logit_bias))
        if not isinstance(self.dry_sequence_breakers, (tuple, str)):
            object.__setattr__(self, "dry_sequence_breakers", tuple(self.dry_sequence_breakers))
        if self.sampler_chain is not None and not isinstance(self.sampler_chain, SamplerChain):
            object.__setattr__(self, "sampler_chain", as_chain(self.sampler_chain))

    # ---- builders -------------------------------------------------------------------
    def _with(self, **changes: Any) -> CompletionOptions:
        return dataclasses.replace(self, **changes)

    def with_max_tokens(self, max_tokens: int) -> CompletionOptions:
        return self._with(max_tokens=max_tokens)

    def with_stop_sequence(self, stop: str) -> CompletionOptions:
        return self._with(stop_sequences=(*self.stop_sequences, stop))

    def with_stop_sequences(self, stops: Sequence[str]) -> CompletionOptions:
        return self._with(stop_sequences=(*self.stop_sequences, *stops))

    def with_logprobs(self, top_n: int = 0) -> CompletionOptions:
        return self._with(logprobs=top_n)

    def with_temperature(self, temperature: float) -> CompletionOptions:
        return self._with(temperature=temperature)

    def with_top_k(self, top_k: int) -> CompletionOptions:
        return self._with(top_k=top_k)

    def with_top_p(self, top_p: float) -> CompletionOptions:
        return self._with(top_p=top_p)

    def with_min_p(self, min_p: float) -> CompletionOptions:
        return self._with(min_p=min_p)

    def with_typical_p(self, typical_p: float) -> CompletionOptions:
        return self._with(typical_p=typical_p)

    def with_repeat_penalty(self, penalty: float, last_n: Optional[int] = None) -> CompletionOptions:
        if last_n is None:
            return self._with(repeat_penalty=penalty)
        return self._with(repeat_penalty=penalty, penalty_last_n=last_n)

    def with_presence_penalty(self, penalty: float) -> CompletionOptions:
        return self._with(presence_penalty=penalty)

    def with_frequency_penalty(self, penalty: float) -> CompletionOptions:
        return self._with(frequency_penalty=penalty)

    def with_penalty_last_n(self, last_n: int) -> CompletionOptions:
        return self._with(penalty_last_n=last_n)

    def with_seed(self, seed: int) -> CompletionOptions:
        return self._with(seed=seed)

    def with_logit_bias(self, token_id: int, bias: float) -> CompletionOptions:
        return self._with(logit_bias={**self.logit_bias, token_id: bias})

    def with_grammar(self, grammar: str) -> CompletionOptions:
        return self._with(grammar=grammar)

    def with_samplers(self, samplers: Sequence[str]) -> CompletionOptions:
        return self._with(samplers=tuple(samplers))

    def with_cache_prompt(self, cache_prompt: bool) -> CompletionOptions:
        return self._with(cache_prompt=cache_prompt)

    def with_speculative(self, speculative: bool) -> CompletionOptions:
        return self._with(speculative=speculative)

    def with_min_keep(self, min_keep: int) -> CompletionOptions:
        return self._with(min_keep=min_keep)

    def with_top_n_sigma(self, n: float) -> CompletionOptions:
        return self._with(top_n_sigma=n)

    def with_xtc(self, probability: float, threshold: float = 0.1) -> CompletionOptions:
        return self._with(xtc_probability=probability, xtc_threshold=threshold)

    def with_dry(
        self,
        multiplier: float,
        base: float = 1.75,
        allowed_length: int = 2,
        penalty_last_n: int = 64,
        sequence_breakers: Sequence[str] = (),
    ) -> CompletionOptions:
        return self._with(
            dry_multiplier=multiplier,
            dry_base=base,
            dry_allowed_length=allowed_length,
            dry_penalty_last_n=penalty_last_n,
            dry_sequence_breakers=tuple(sequence_breakers),
        )

    def with_mirostat(self, mode: int, tau: float = 5.0, eta: float = 0.1) -> CompletionOptions:
        return self._with(mirostat=mode, mirostat_tau=tau, mirostat_eta=eta)

    def with_dynamic_temperature(self, range: float, exponent: float = 1.0) -> CompletionOptions:
        return self._with(dynatemp_range=range, dynatemp_exponent=exponent)

    def with_adaptive_p(self, target: float, decay: float = 0.9) -> CompletionOptions:
        return self._with(adaptive_target=target, adaptive_decay=decay)

    def with_ignore_eos(self, ignore_eos: bool = True) -> CompletionOptions:
        return self._with(ignore_eos=ignore_eos)

    def with_min_tokens(self, min_tokens: int) -> CompletionOptions:
        return self._with(min_tokens=min_tokens)

    def with_json_schema(self, schema: Union[str, Mapping[str, Any]]) -> CompletionOptions:
        """Constrain the output to a JSON schema (a mapping, or its JSON text)."""
        return self._with(json_schema=schema if isinstance(schema, str) else json.dumps(schema))

    def with_sampler_chain(self, chain: ChainLike) -> CompletionOptions:
        return self._with(sampler_chain=as_chain(chain))

    # ---- validation -----------------------------------------------------------------
    def violations(self, n_vocab: Optional[int] = None) -> list[FieldViolation]:
        """Every invalid field, checked without a model (grammar syntax is checked by the engine)."""
        out: list[FieldViolation] = []

        def bad(name: str, why: str) -> None:
            out.append(FieldViolation(name, why))

        def check_float(name: str, lo: float, hi: float, lo_open: bool = False) -> None:
            v = getattr(self, name)
            if not _is_number(v) or not math.isfinite(v):
                bad(name, "must be a finite number")
            elif (v <= lo if lo_open else v < lo) or v > hi:
                bad(name, f"must be in {'(' if lo_open else '['}{lo}, {hi}]")

        if not _is_int(self.max_tokens) or self.max_tokens < 1:
            bad("max_tokens", "must be an integer >= 1")
        if len(self.stop_sequences) > LIMITS.stop_sequences:
            bad("stop_sequences", f"at most {LIMITS.stop_sequences} entries (got {len(self.stop_sequences)})")
        else:
            for i, stop in enumerate(self.stop_sequences):
                if not isinstance(stop, str) or stop == "":
                    bad(f"stop_sequences[{i}]", "must be a non-empty string")
                elif len(stop) > LIMITS.stop_sequence_chars:
                    bad(f"stop_sequences[{i}]", f"at most {LIMITS.stop_sequence_chars} characters")
        if self.logprobs is not None and (not _is_int(self.logprobs) or not 0 <= self.logprobs <= 20):
            bad("logprobs", "must be an integer in [0, 20]")
        check_float("temperature", 0.0, 100.0)
        if not _is_int(self.top_k) or self.top_k < 0:
            bad("top_k", "must be an integer >= 0 (0 disables)")
        check_float("top_p", 0.0, 1.0)
        check_float("min_p", 0.0, 1.0)
        check_float("typical_p", 0.0, 1.0, lo_open=True)
        check_float("repeat_penalty", 0.0, 10.0, lo_open=True)
        check_float("presence_penalty", -2.0, 2.0)
        check_float("frequency_penalty", -2.0, 2.0)
        if not _is_int(self.penalty_last_n) or self.penalty_last_n < -1:
            bad("penalty_last_n", "must be an integer >= -1")
        if self.seed is not None and (not _is_int(self.seed) or not 0 <= self.seed < 2**32 - 1):
            bad("seed", "must be an integer in [0, 2**32 - 2]")
        if len(self.logit_bias) > LIMITS.logit_bias:
            bad("logit_bias", f"at most {LIMITS.logit_bias} entries (got {len(self.logit_bias)})")
        else:
            for token, bias in self.logit_bias.items():
                if not _is_int(token) or token < 0 or (n_vocab is not None and token >= n_vocab):
                    bad("logit_bias", f"token id {token!r} is not in the vocabulary")
                elif not _is_number(bias) or math.isnan(bias) or bias == math.inf:
                    bad("logit_bias", f"bias for token {token} must be a number or -inf")
        if self.grammar is not None and (not isinstance(self.grammar, str) or not self.grammar.strip()):
            bad("grammar", "must be a non-empty GBNF grammar")
        if not isinstance(self.cache_prompt, bool):
            bad("cache_prompt", "must be True or False")
        if not isinstance(self.speculative, bool):
            bad("speculative", "must be True or False")
        if not _is_int(self.min_keep) or not 0 <= self.min_keep <= MAX_MIN_KEEP:
            bad("min_keep", f"must be an integer in [0, {MAX_MIN_KEEP}]")
        check_float("top_n_sigma", -1.0, 100.0)
        check_float("xtc_probability", 0.0, 1.0)
        check_float("xtc_threshold", 0.0, 1.0)
        check_float("dry_multiplier", 0.0, 100.0)
        check_float("dry_base", 1.0, 100.0)
        if not _is_int(self.dry_allowed_length) or not 0 <= self.dry_allowed_length <= 1000:
            bad("dry_allowed_length", "must be an integer in [0, 1000]")
        if not _is_int(self.dry_penalty_last_n) or not -1 <= self.dry_penalty_last_n <= 1 << 20:
            bad("dry_penalty_last_n", "must be an integer in [-1, 1048576]")
        out.extend(FieldViolation(f, why) for f, why in sequence_breaker_problems("dry_sequence_breakers", self.dry_sequence_breakers))
        if not _is_int(self.mirostat) or self.mirostat not in (0, 1, 2):
            bad("mirostat", "must be 0 (off), 1 or 2")
        check_float("mirostat_tau", 0.0, 100.0)
        check_float("mirostat_eta", 0.0, 10.0)
        check_float("dynatemp_range", 0.0, 100.0)
        check_float("dynatemp_exponent", 0.0, 100.0)
        check_float("adaptive_target", -1.0, 1.0)
        check_float("adaptive_decay", 0.0, 0.99)
        if not isinstance(self.ignore_eos, bool):
            bad("ignore_eos", "must be True or False")
        if not _is_int(self.min_tokens) or not 0 <= self.min_tokens <= 1 << 20:
            bad("min_tokens", "must be an integer in [0, 1048576]")
        if self.json_schema is not None:
            if not isinstance(self.json_schema, str) or not self.json_schema.strip():
                bad("json_schema", "must be a JSON schema (JSON text)")
            elif len(self.json_schema.encode()) > LIMITS.json_schema_bytes:
                bad("json_schema", f"at most {LIMITS.json_schema_bytes} bytes")
            elif self.grammar is not None:
                bad("json_schema", "cannot be combined with grammar")
        if self.sampler_chain is not None:
            if not isinstance(self.sampler_chain, SamplerChain):
                bad("sampler_chain", "must be a SamplerChain")
            else:
                if self.samplers is not None:
                    bad("sampler_chain", "cannot be combined with samplers (the name list)")
                if len(self.sampler_chain) == 0:
                    bad("sampler_chain", "must have at least one stage (or be None)")
                out.extend(FieldViolation(f, why) for f, why in self.sampler_chain.problems("sampler_chain"))
                for i, stage in enumerate(self.sampler_chain.stages):
                    if isinstance(stage, Custom):
                        bad(f"sampler_chain[{i}]", "a custom (Python) stage runs only in llama_crab.lowlevel.Sampler")
        if self.samplers is not None:
            if len(self.samplers) == 0:
                bad("samplers", "must name at least one sampler (or be None for the default chain)")
            if len(self.samplers) > LIMITS.samplers:
                bad("samplers", f"at most {LIMITS.samplers} entries (got {len(self.samplers)})")
            for name in self.samplers[: LIMITS.samplers]:
                if name not in SAMPLER_NAMES:
                    bad("samplers", f"unknown sampler {name!r}; known: {', '.join(sorted(SAMPLER_NAMES))}")
        return out


PromptLike = Union[str, Sequence[int]]
