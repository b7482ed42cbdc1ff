"""The low-level API: llama.cpp's model, context, batch and sampler for hand-written loops.

    from llama_crab.lowlevel import Batch, Context, Model, Sampler, SamplerChain

    with Model.load(path) as model, Context(model, n_ctx=512) as ctx:
        sampler = Sampler(model, SamplerChain().greedy())
        tokens = model.tokenize("The capital of France is")
        batch = Batch(512)
        batch.add_tokens(tokens)              # positions 0.., logits for the last one
        ctx.decode(batch)
        pos = len(tokens)
        for _ in range(16):
            token = sampler.sample(ctx)       # from the last position with logits
            if model.is_eog(token):
                break
            print(model.token_to_piece(token), end="")
            batch.clear()
            batch.add(token, pos, 0, logits=True)
            ctx.decode(batch)
            pos += 1

These objects share nothing with `llama_crab.Llama`'s engine: a Context is a llama.cpp
context of its own. `Model`, `Context` and `Batch` are the native classes themselves;
`Sampler` builds its native chain from the typed stages of `llama_crab_client.sampling`
(re-exported here), including `Custom`, a Python function from logits to a token id (called
once per sampled token with the whole vocabulary's logits as a list: slow, for experiments).

Errors are Python exceptions, never a crash: a closed object raises `ClosedError`
(a ValueError); a token outside the vocabulary or a sequence id outside
[0, n_seq_max) raises IndexError (checked before llama.cpp sees it); a full batch
IndexError; a position past the context `ContextFullError`; `Context.cancel()` makes the
running decode raise `DecodeCancelledError`; other decode failures `DecodeError` (each
leaves the memory as before the call); unreadable or foreign states `StateError`. The
objects are not thread-safe, except `Context.cancel()`; a second thread calling into an
object that another thread is using (e.g. during a decode, which releases the GIL) gets
`BusyError`. See docs/lowlevel.md.
"""

from __future__ import annotations

from typing import Any, Optional

from llama_crab_client.errors import InvalidArgumentError
from llama_crab_client.sampling import (
    AdaptiveP,
    ChainLike,
    Custom,
    Dist,
    Dry,
    DynamicTemp,
    Greedy,
    MinP,
    Mirostat,
    MirostatV2,
    Penalties,
    SamplerChain,
    SamplerStage,
    Temp,
    TopK,
    TopNSigma,
    TopP,
    Typical,
    Xtc,
    as_chain,
)
from llama_crab_client.types import FieldViolation

from ._engine import ModelLoadError
from ._engine.lowlevel import (
    DEFAULT_SEED,
    Batch,
    BusyError,
    ClosedError,
    Context,
    ContextFullError,
    DecodeCancelledError,
    DecodeError,
    Model,
    StateError,
)
from ._engine.lowlevel import Sampler as _NativeSampler
from .logs import install_llama_log_bridge
from .sampling_params import engine_stage

__all__ = [
    "AdaptiveP",
    "Batch",
    "BusyError",
    "ClosedError",
    "Context",
    "ContextFullError",
    "Custom",
    "DEFAULT_SEED",
    "DecodeCancelledError",
    "DecodeError",
    "Dist",
    "Dry",
    "DynamicTemp",
    "Greedy",
    "MinP",
    "Mirostat",
    "MirostatV2",
    "Model",
    "ModelLoadError",
    "Penalties",
    "Sampler",
    "SamplerChain",
    "SamplerStage",
    "StateError",
    "Temp",
    "TopK",
    "TopNSigma",
    "TopP",
    "Typical",
    "Xtc",
]

# llama.cpp's log lines go to `logging` (and its errors into the exceptions' messages).
install_llama_log_bridge()


class Sampler:
    """A llama.cpp sampler chain built from typed stages.

    `chain` is a `SamplerChain` or a sequence of stages; a chain whose last stage does not
    pick the token gets `Dist` appended (as everywhere in llama-crab). A `Custom(fn)` last
    stage calls `fn(logits)` with one float per vocabulary token (-inf where an earlier stage
    removed it) and uses the token id it returns; it must be a token that is still a
    candidate, or `sample` raises ValueError / IndexError / TypeError, and an exception
    raised by `fn` propagates unchanged. `seed` seeds the random stages (DEFAULT_SEED:
    random); `n_ctx` resolves a `last_n` of -1 (0: the model's training context).
    """

    def __init__(
        self, model: Model, chain: ChainLike, *, seed: int = DEFAULT_SEED, n_ctx: int = 0
    ) -> None:
        resolved = as_chain(chain)
        assert resolved is not None
        problems = resolved.problems("chain")
        if problems:
            raise InvalidArgumentError.from_violations([FieldViolation(f, why) for f, why in problems])
        stages = list(resolved.stages)
        custom: Optional[Any] = None
        last = stages[-1] if stages else None
        if isinstance(last, Custom):
            custom = last.fn
            stages.pop()
        self.chain: SamplerChain = resolved
        self._native = _NativeSampler(model, [engine_stage(s) for s in stages], custom, seed=seed, n_ctx=n_ctx)

    @property
    def closed(self) -> bool:
        return self._native.closed

    def sample(self, ctx: Context, idx: int = -1) -> int:
        """Pick a token from batch position `idx` of `ctx`'s last decode (it must have been
        added with logits=True; negative counts from the end) and accept it. Releases the GIL
        unless the chain has a Custom stage."""
        return self._native.sample(ctx, idx)

    def accept(self, token: int) -> None:
        """Feed a token the chain did not sample (e.g. the prompt's) to its stateful stages
        (penalties, dry, mirostat); `sample` already accepts what it returns."""
        self._native.accept(token)

    def reset(self) -> None:
        """Forget the accepted tokens (penalty history, mirostat's running estimate)."""
        self._native.reset()

    def close(self) -> None:
        """Free the chain; later calls raise ClosedError."""
        self._native.close()

    def __enter__(self) -> Sampler:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        kinds = ", ".join(s.kind for s in self.chain.stages)
        return f"Sampler([{kinds}]{', closed' if self.closed else ''})"
