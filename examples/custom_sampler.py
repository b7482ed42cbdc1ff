"""A Python sampler stage at the end of a llama.cpp chain.

    python examples/custom_sampler.py [MODEL]    # a .gguf path or a catalogue name

`SamplerChain().top_k(200).custom(fn)`: llama.cpp's top_k keeps 200 candidates, then `fn`
gets the logits of the whole vocabulary (-inf for the removed tokens) and returns the token
to use. Here fn writes a lipogram: the most likely candidate without the letter 'e'. The
same hook as an argmax gives exactly the greedy chain's tokens. A Python stage runs once
per token with the GIL held and a list of n_vocab floats: fine for experiments, slow
for serving.
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Sequence

from llama_crab.lowlevel import Batch, Context, Model, Sampler, SamplerChain
from llama_crab.models import DEFAULT_MODEL, ensure

PROMPT = "Write one sentence about a cat:"
MAX_TOKENS = 24


def run(model: Model, chain: SamplerChain) -> list[int]:
    tokens = model.tokenize(PROMPT)
    out: list[int] = []
    with Context(model, n_ctx=512, n_threads=os.cpu_count() or 1) as ctx, Sampler(model, chain) as sampler:
        batch = Batch(512)
        batch.add_tokens(tokens)
        ctx.decode(batch)
        pos = len(tokens)
        while len(out) < MAX_TOKENS:
            token = sampler.sample(ctx)
            if model.is_eog(token):
                break
            out.append(token)
            batch.clear()
            batch.add(token, pos, 0, logits=True)
            ctx.decode(batch)
            pos += 1
    return out


def main() -> None:
    path = ensure(sys.argv[1] if len(sys.argv) > 1 else DEFAULT_MODEL)
    with Model.load(path) as model:
        has_e = [("e" in model.token_to_piece(t).lower()) for t in range(model.n_vocab)]
        calls = 0

        def no_e(logits: Sequence[float]) -> int:
            nonlocal calls
            calls += 1
            candidates = [t for t, v in enumerate(logits) if v != -math.inf]
            allowed = [t for t in candidates if not has_e[t]] or candidates
            return max(allowed, key=lambda t: logits[t])

        def argmax(logits: Sequence[float]) -> int:
            return max(range(len(logits)), key=lambda t: logits[t])

        lipogram = run(model, SamplerChain().top_k(200).custom(no_e))
        text = model.detokenize(lipogram)
        print(f"{PROMPT}{text!r}  ({calls} calls to the Python stage)")
        assert calls >= len(lipogram) > 0
        assert "e" not in text.lower(), text

        greedy = run(model, SamplerChain().greedy())
        by_hook = run(model, SamplerChain().custom(argmax))
        print(f"greedy:        {model.detokenize(greedy)!r}")
        assert by_hook == greedy, (by_hook, greedy)
        print("OK: the custom stage shapes the output; as an argmax it equals the greedy chain")


if __name__ == "__main__":
    main()
