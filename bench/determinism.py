#!/usr/bin/env python3
"""Deterministic mode: what it fixes (--check) and what it costs (the default).

    python bench/determinism.py --check [--models smollm2-135m,gemma3-270m,qwen2.5-coder-0.5b]
    python bench/determinism.py --sources
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

--sources shows each source of batch variance on its own, with llama_crab.lowlevel (one
llama.cpp context, the switches set one at a time) and a ~300-token prompt. Each compares
the logits of two rows that must be equal, bit for bit:
  S1 attention   smollm2 (no repacked or K-quant weights): the prompt prefilled whole
                 (tiled flash attention) against 32 tokens a step; a token decoded alone
                 (split-KV attention) against the same token beside a second sequence;
                 the lone decode on 1 thread against 2
  S2 repack      qwen, reference kernels on: five identical sequences decode one token in
                 one batch; row 0 (GEMM) against row 4 (GEMV), repacked weights on and off
  S3 tiled mm    qwen, repack off: row 0 of 7 identical rows (vec_dot) against row 0 of 8
                 (tiled K-quant matmul)
  S4 no FA       smollm2, flash attention off: the last two prompt tokens decoded as one
                 2-row batch (llamafile sgemm) against one at a time (vec_dot)
  S5 SWA ring    gemma3, reference kernels on: the next token after 1,224 prompt tokens
                 (the sliding window across the ring's wrap) against the same after the
                 sequence's state is restored into another, swa_full off and on
Each with the switch that removes it, which must make the pair equal.

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
from typing import Any, Optional

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
            llm.close()  # the saved state must come back in another engine
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


def lowlevel_sources() -> dict[str, Any]:
    from llama_crab.lowlevel import Batch, Context, Model

    def prompt_tokens(model: Any) -> list[int]:
        return list(model.tokenize(PREFIX))[:300]

    def prefill(ctx: Any, tokens: list[int], seq: int, chunk: int) -> list[float]:
        batch = Batch(512)
        for i in range(0, len(tokens), chunk):
            batch.clear()
            piece = tokens[i : i + chunk]
            batch.add_tokens(piece, pos=i, seq_id=seq, logits_last=i + len(piece) == len(tokens))
            ctx.decode(batch)
        return list(ctx.logits(-1))

    def decode_rows(ctx: Any, token: int, pos: int, seqs: list[int]) -> list[list[float]]:
        batch = Batch(512, n_seq_max=1)
        for seq in seqs:
            batch.add(token, pos, seq, logits=True)
        ctx.decode(batch)
        out = [list(ctx.logits(i)) for i in range(len(seqs))]
        for seq in seqs:
            ctx.seq_rm(seq, pos, -1)
        return out

    results: dict[str, Any] = {}

    def record(source: str, what: str, switch: str, equal: bool) -> None:
        results.setdefault(source, []).append({"what": what, "switch": switch, "equal": equal})
        print(f"{source:12} {what:58} {switch:28} {'equal' if equal else 'DIFFER'}", flush=True)

    smol = models.ensure("smollm2-135m")
    qwen = models.ensure("qwen2.5-coder-0.5b")
    # S1: attention kernels (smollm2 has only Q4_1/Q8_0 weights: no repack, no tiled matmul).
    with Model.load(smol) as model:
        tokens = prompt_tokens(model)
        for ref in (False, True):
            switch = "reference kernels" if ref else "default"
            with Context(model, n_ctx=2048, n_seq_max=2, n_threads=2, cpu_reference_kernels=ref) as ctx:
                whole = prefill(ctx, tokens, 0, 512)
                prefill(ctx, tokens, 1, 32)
                pieces = list(ctx.logits(-1))
                record("S1 attention", "prompt prefilled whole vs 32 tokens a step", switch, whole == pieces)
                ctx.seq_rm(1, -1, -1)
                prefill(ctx, tokens, 1, 512)
                t, pos = tokens[5], len(tokens)
                alone = decode_rows(ctx, t, pos, [0])[0]
                beside = decode_rows(ctx, t, pos, [0, 1])[0]
                record("S1 attention", "decode alone vs beside a second sequence", switch, alone == beside)
                ctx.set_threads(1, 1)
                one_thread = decode_rows(ctx, t, pos, [0])[0]
                record("S1 attention", "lone decode on 2 threads vs 1", switch, alone == one_thread)
    # S2: repacked Q4_K weights, GEMM for rows in fours, GEMV for the rest.
    for repack in (True, False):
        with Model.load(qwen, use_extra_bufts=repack) as model:
            tokens = prompt_tokens(model)
            with Context(model, n_ctx=6 * 1024, n_seq_max=6, n_threads=2, cpu_reference_kernels=True) as ctx:
                prefill(ctx, tokens, 0, 512)
                for seq in range(1, 5):
                    ctx.seq_cp(0, seq)
                rows = decode_rows(ctx, tokens[5], len(tokens), [0, 1, 2, 3, 4])
                switch = "repacked weights" if repack else "no repack"
                record("S2 repack", "row 0 vs row 4 of five identical rows", switch, rows[0] == rows[4])
    # S3: the tiled K-quant matmul from 8 rows up.
    with Model.load(qwen, use_extra_bufts=False) as model:
        tokens = prompt_tokens(model)
        for ref in (False, True):
            with Context(model, n_ctx=9 * 1024, n_seq_max=9, n_threads=2, cpu_reference_kernels=ref) as ctx:
                prefill(ctx, tokens, 0, 512)
                for seq in range(1, 8):
                    ctx.seq_cp(0, seq)
                seven = decode_rows(ctx, tokens[5], len(tokens), list(range(7)))[0]
                eight = decode_rows(ctx, tokens[5], len(tokens), list(range(8)))[0]
                switch = "reference kernels" if ref else "default (no repack)"
                record("S3 tiled mm", "row 0 of 7 identical rows vs of 8", switch, seven == eight)
    # S4: without flash attention, KQ is a matmul: llamafile's sgemm for 2+ rows, vec_dot for 1.
    with Model.load(smol) as model:
        tokens = prompt_tokens(model)
        for fa in ("off", "on"):
            with Context(model, n_ctx=2048, n_seq_max=2, n_threads=2, flash_attn=fa, cpu_reference_kernels=True) as ctx:
                prefill(ctx, tokens[:-2], 0, 512)
                prefill(ctx, tokens[:-2], 1, 512)
                batch = Batch(8)
                batch.add_tokens(tokens[-2:], pos=len(tokens) - 2, seq_id=0, logits_last=True)
                ctx.decode(batch)
                two_rows = list(ctx.logits(-1))
                for i, t in enumerate(tokens[-2:]):
                    batch.clear()
                    batch.add(t, len(tokens) - 2 + i, 1, logits=True)
                    ctx.decode(batch)
                one_by_one = list(ctx.logits(-1))
                switch = f"flash attention {fa}, ref kernels"
                record("S4 no FA", "last 2 prompt tokens as one batch vs one at a time", switch, two_rows == one_by_one)
    # S5: gemma3's sliding-window layers without swa_full keep a ring of n_swa + n_ubatch
    # cells; once it wraps, the window's cells are no longer in position order, and a state
    # restored elsewhere is. 1,224 tokens put the 512-token window across the wrap (1,024).
    gemma = models.ensure("gemma3-270m")
    long_prefix = " ".join(f"Record {i}: the {('red', 'green', 'blue')[i % 3]} box holds {i * 7 % 11} keys." for i in range(200))
    with Model.load(gemma) as model:
        tokens = list(model.tokenize(long_prefix))[:1224]
        for swa_full in (False, True):
            with Context(
                model, n_ctx=8192, n_seq_max=2, n_threads=2, swa_full=swa_full, cpu_reference_kernels=True, flash_attn="on"
            ) as ctx:
                batch = Batch(512)
                for i in range(0, len(tokens) - 1, 512):
                    batch.clear()
                    batch.add_tokens(tokens[i : min(i + 512, len(tokens) - 1)], pos=i, seq_id=0, logits_last=False)
                    ctx.decode(batch)
                ctx.seq_state_set(ctx.seq_state_get(0), 1)
                fresh, restored = (decode_rows(ctx, tokens[-1], len(tokens) - 1, [seq])[0] for seq in (0, 1))
                switch = "swa_full" if swa_full else "SWA ring (swa_full off)"
                record("S5 SWA ring", "the next token after the cache vs after its restored state", switch, fresh == restored)
    return results


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
    # Which switch costs the prefill: the same prompt through llama_crab.lowlevel with each.
    from llama_crab.lowlevel import Batch, Context, Model

    loaded = {repack: Model.load(path, use_extra_bufts=repack) for repack in (True, False)}
    try:
        tokens = list(loaded[True].tokenize(long_prompt))[:768]
        for rep in range(reps):
            for repack, ref in ((True, False), (False, False), (True, True), (False, True)):
                name = f"prefill, {'repack' if repack else 'no repack'}, {'reference kernels' if ref else 'default kernels'}"
                with Context(loaded[repack], n_ctx=1024, n_threads=2, cpu_reference_kernels=ref) as ctx:
                    batch = Batch(512)
                    start = time.perf_counter()
                    for i in range(0, len(tokens), 512):
                        batch.clear()
                        batch.add_tokens(tokens[i : i + 512], pos=i, logits_last=i + 512 >= len(tokens))
                        ctx.decode(batch)
                    tok_s = len(tokens) / (time.perf_counter() - start)
                cells.setdefault(name, {}).setdefault("default", []).append(tok_s)
                print(f"round {rep} {name}: {tok_s:.1f}", flush=True)
    finally:
        for weights in loaded.values():
            weights.close()
    return cells


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="compare tokens and logprobs under each condition")
    parser.add_argument("--sources", action="store_true", help="show each source of batch variance alone")
    parser.add_argument("--models", default="smollm2-135m,gemma3-270m,qwen2.5-coder-0.5b", help="for --check")
    parser.add_argument("--model", default="qwen2.5-coder-0.5b", help="for the cost run")
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args(argv)
    OUT.mkdir(parents=True, exist_ok=True)
    if args.sources:
        found = lowlevel_sources()
        (OUT / "determinism-sources.json").write_text(json.dumps({"cpu": cpu_name(), "result": found}, indent=2))
        return 0
    if args.check:
        result = check([m.strip() for m in args.models.split(",") if m.strip()])
        (OUT / "determinism-check.json").write_text(json.dumps({"cpu": cpu_name(), "result": result}, indent=2))
        return 0
    cells = cost(args.model, args.reps)
    print(f"\n{args.model} on {cpu_name()}, 2 threads, {args.reps} rounds, interleaved; medians (min-max):")
    summary = {}
    for key, by_mode in cells.items():
        if "deterministic" not in by_mode:  # the per-switch prefill rows
            print(f"| {key} | {median_range(by_mode['default'])} |")
            continue
        d, x = statistics.median(by_mode["default"]), statistics.median(by_mode["deterministic"])
        summary[key] = x / d
        print(f"| {key} | {median_range(by_mode['default'])} | {median_range(by_mode['deterministic'])} | {x / d:.2f}x |")
    (OUT / "determinism-cost.json").write_text(
        json.dumps({"cpu": cpu_name(), "model": args.model, "cells": cells, "ratio": summary}, indent=2)
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
