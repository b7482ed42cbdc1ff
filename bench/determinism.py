#!/usr/bin/env python3
"""Deterministic mode: what it fixes (--check) and what it costs (the default).

    python bench/determinism.py --check [--models smollm2-135m,gemma3-270m,qwen2.5-coder-0.5b]
    python bench/determinism.py [--model qwen2.5-coder-0.5b] [--reps 3]

--check runs one greedy request (48 tokens, its logprobs) under each condition of issue 20
and compares its tokens and logprobs, bit for bit, with the same request run alone with the
prefix cache off; once with the default engine and once with `deterministic=True`:
  cached-prefix   its prompt's first 300 tokens come from a slot's prefix cache
  concurrent      seven other requests decode beside it
  beside-decode   it is prefilled while four long requests decode
  chunked         its prompt is prefilled 64 tokens a step (n_batch 64)
  speculative     the engine speculates (ngram-simple)
  session         its prefix comes back from a saved session (RAM cache), not a slot

The cost run times, in process, the default engine and the deterministic one side by side
(rounds interleaved): aggregate decode tokens/s at 1, 4 and 8 streams, and prefill
tokens/s of a ~770-token prompt. Speed is measured here, never asserted in tests.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable, Optional

from common import cpu_name, median_range, together

from llama_crab import CompletionOptions, Llama, LlamaParams, Speculative, StreamControl, models

OUT = Path(__file__).resolve().parent / "out"
N_TOKENS = 48
PREFIX = " ".join(f"Record {i}: the {('red', 'green', 'blue')[i % 3]} box holds {i * 7 % 11} keys." for i in range(30))
QUESTION = "\nQuestion: which boxes hold exactly three keys? Answer:"
OTHER = "\nQuestion: how many boxes are blue? Answer:"
CONDITIONS = ("cached-prefix", "concurrent", "beside-decode", "chunked", "speculative", "session")

Result = tuple[tuple[int, ...], tuple[float, ...]]


def greedy(n: int = N_TOKENS, cache_prompt: bool = True) -> CompletionOptions:
    return CompletionOptions(n, samplers=("top_k",), top_k=1, logprobs=0, cache_prompt=cache_prompt, ignore_eos=True)


def run(llm: Llama, prompt: str, options: CompletionOptions) -> Result:
    c = llm.create_completion(prompt, options)
    assert c.logprobs is not None
    return c.token_ids, tuple(lp.logprob for lp in c.logprobs)


def params(path: str, deterministic: bool, **kw: Any) -> LlamaParams:
    return LlamaParams(path, n_ctx=8 * 1024, n_parallel=8, n_threads=2, deterministic=deterministic, **kw)


def condition(name: str, path: str, deterministic: bool, prompt: str) -> Result:
    """The target request's result under one condition, on a fresh engine."""
    if name == "chunked":
        with Llama.load(params(path, deterministic, n_batch=64, n_ubatch=64)) as llm:
            return run(llm, prompt, greedy(cache_prompt=False))
    if name == "speculative":
        with Llama.load(params(path, deterministic, speculative=Speculative(types=("ngram-simple",)))) as llm:
            return run(llm, prompt, greedy(cache_prompt=False))
    if name == "session":
        with tempfile.TemporaryDirectory() as tmp, Llama.load(params(path, deterministic)) as llm:
            run(llm, PREFIX + OTHER, greedy(4))
            a, b = llm.tokenize(PREFIX + OTHER), llm.tokenize(prompt)
            shared = next(i for i, (x, y) in enumerate(zip(a, b)) if x != y) - 1
            llm.save_session(a[:shared], Path(tmp) / "s.session")
            llm.close()
            with Llama.load(params(path, deterministic)) as fresh:
                fresh.load_session(Path(tmp) / "s.session")
                return run(fresh, prompt, greedy())
    with Llama.load(params(path, deterministic)) as llm:
        if name == "cached-prefix":
            run(llm, PREFIX + OTHER, greedy(4))
            return run(llm, prompt, greedy())
        if name == "concurrent":
            others = [f"Story {i}: once upon a time" for i in range(7)]
            results: dict[int, Result] = {}

            def one(i: int) -> None:
                results[i] = run(llm, prompt if i == 7 else others[i], greedy(cache_prompt=False))

            threads = [threading.Thread(target=one, args=(i,)) for i in range(8)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            return results[7]
        if name == "beside-decode":
            decoding = [threading.Event() for _ in range(4)]
            stop = threading.Event()

            def long_stream(i: int) -> None:
                def on_chunk(_chunk: Any) -> StreamControl:
                    decoding[i].set()
                    return StreamControl.STOP if stop.is_set() else StreamControl.CONTINUE

                llm.create_completion_stream(f"List {i}: 1, 2, 3,", greedy(2000, cache_prompt=False), on_chunk)

            threads = [threading.Thread(target=long_stream, args=(i,)) for i in range(4)]
            for t in threads:
                t.start()
            try:
                for e in decoding:
                    e.wait(60)  # the four are decoding
                return run(llm, prompt, greedy(cache_prompt=False))
            finally:
                stop.set()
                for t in threads:
                    t.join()
    raise ValueError(name)


def reference(path: str, deterministic: bool, prompt: str) -> Result:
    with Llama.load(params(path, deterministic)) as llm:
        return run(llm, prompt, greedy(cache_prompt=False))


def check(model_names: list[str]) -> dict[str, Any]:
    prompt = PREFIX + QUESTION
    out: dict[str, Any] = {}
    for name in model_names:
        path = models.ensure(name)
        for deterministic in (False, True):
            ref = reference(path, deterministic, prompt)
            mode = "deterministic" if deterministic else "default"
            for cond in CONDITIONS:
                got = condition(cond, path, deterministic, prompt)
                same_tokens = got[0] == ref[0]
                same_logprobs = got[1] == ref[1]
                first = next((i for i, (a, b) in enumerate(zip(got[0], ref[0])) if a != b), None)
                out.setdefault(name, {}).setdefault(cond, {})[mode] = {
                    "tokens_equal": same_tokens,
                    "logprobs_equal": same_logprobs,
                    "first_token_diff": first,
                }
                verdict = "same" if same_tokens and same_logprobs else ("logprobs differ" if same_tokens else f"tokens differ at {first}")
                print(f"{name:20} {cond:14} {mode:13} {verdict}", flush=True)
    return out


def cost(model: str, reps: int) -> dict[str, Any]:
    path = models.ensure(model)
    engines = {m: Llama.load(params(path, m == "deterministic")) for m in ("default", "deterministic")}
    long_prompt = (PREFIX + " ") * 2  # ~770 tokens: a slot holds 1,024
    cells: dict[str, dict[str, list[float]]] = {}
    try:
        for rep in range(reps):
            for mode in (("default", "deterministic") if rep % 2 == 0 else ("deterministic", "default")):
                llm = engines[mode]
                for n in (1, 4, 8):
                    opts = CompletionOptions(64, samplers=("top_k",), top_k=1, cache_prompt=False, ignore_eos=True)
                    wall, done = together(lambda: llm.create_completion("Once upon a time", opts), n)
                    tok_s = sum(c.usage.completion_tokens for c in done) / wall
                    cells.setdefault(f"decode/{n}", {}).setdefault(mode, []).append(tok_s)
                opts = CompletionOptions(1, cache_prompt=False)
                start = time.perf_counter()
                c = llm.create_completion(long_prompt, opts)
                cells.setdefault("prefill", {}).setdefault(mode, []).append(c.usage.prompt_tokens / (time.perf_counter() - start))
                print(f"round {rep} {mode}: " + ", ".join(f"{k} {v[mode][-1]:.1f}" for k, v in cells.items()), flush=True)
    finally:
        for llm in engines.values():
            llm.close()
    return cells


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="compare tokens and logprobs under each condition")
    parser.add_argument("--models", default="smollm2-135m,gemma3-270m,qwen2.5-coder-0.5b", help="for --check")
    parser.add_argument("--model", default="qwen2.5-coder-0.5b", help="for the cost run")
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args(argv)
    OUT.mkdir(parents=True, exist_ok=True)
    if args.check:
        result = check([m.strip() for m in args.models.split(",") if m.strip()])
        (OUT / "determinism-check.json").write_text(json.dumps({"cpu": cpu_name(), "result": result}, indent=2))
        return 0
    cells = cost(args.model, args.reps)
    print(f"\n{args.model} on {cpu_name()}, 2 threads, {args.reps} rounds, interleaved; medians (min-max):")
    summary = {}
    for key, by_mode in cells.items():
        d, x = statistics.median(by_mode["default"]), statistics.median(by_mode["deterministic"])
        summary[key] = x / d
        print(f"| {key} | {median_range(by_mode['default'])} | {median_range(by_mode['deterministic'])} | {x / d:.2f}x |")
    (OUT / "determinism-cost.json").write_text(json.dumps({"cpu": cpu_name(), "model": args.model, "cells": cells, "ratio": summary}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
