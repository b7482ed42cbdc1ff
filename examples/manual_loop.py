"""Greedy generation by hand with the low-level API, checked against the engine.

    python examples/manual_loop.py [MODEL]    # a .gguf path or a catalogue name

Tokenize, decode the prompt, then sample one token, decode it, repeat: the tokens must
equal `Llama.create_completion` on the same prompt (greedy, same context size, batch and
threads), which runs the same llama.cpp computation through the engine's scheduler.
"""

from __future__ import annotations

import os
import sys

from llama_crab import CompletionOptions, Llama, LlamaParams
from llama_crab.lowlevel import Batch, Context, Model, Sampler, SamplerChain
from llama_crab.models import DEFAULT_MODEL, ensure

PROMPT = "The three primary colours are"
MAX_TOKENS = 32
N_CTX, N_BATCH, N_THREADS = 2048, 512, os.cpu_count() or 1


def generate(model: Model, prompt: str, max_tokens: int) -> list[int]:
    """Greedy tokens after prompt, stopping before an end-of-generation token."""
    tokens = model.tokenize(prompt, add_special=True, parse_special=True)  # as the engine does
    out: list[int] = []
    with Context(model, n_ctx=N_CTX, n_batch=N_BATCH, n_threads=N_THREADS) as ctx, Sampler(
        model, SamplerChain().greedy()
    ) as sampler:
        batch = Batch(N_BATCH)
        # The prompt, n_batch tokens per decode; logits only for its last token.
        for start in range(0, len(tokens), N_BATCH):
            piece = tokens[start : start + N_BATCH]
            batch.clear()
            batch.add_tokens(piece, pos=start, seq_id=0, logits_last=start + len(piece) == len(tokens))
            ctx.decode(batch)
        pos = len(tokens)
        while len(out) < max_tokens:
            token = sampler.sample(ctx)  # the last position with logits
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
        mine = generate(model, PROMPT, MAX_TOKENS)
        text = model.detokenize(mine)
    print(f"prompt: {PROMPT!r}\nby hand: {text!r}")

    params = LlamaParams(path, n_ctx=N_CTX, n_batch=N_BATCH, n_threads=N_THREADS, adaptive_threads=False)
    with Llama.load(params) as llama:
        reference = llama.create_completion(PROMPT, CompletionOptions(MAX_TOKENS))
    print(f"engine:  {reference.text!r}")

    assert mine == list(reference.token_ids), f"tokens differ:\n  by hand {mine}\n  engine  {list(reference.token_ids)}"
    assert text == reference.text
    print(f"OK: {len(mine)} tokens, identical to create_completion")


if __name__ == "__main__":
    main()
