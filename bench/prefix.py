"""Prefix-cache benchmark: a shared ~1,000-token system prompt, cache on vs off, one run.

    python bench/prefix.py [--model smollm2-135m] [--threads N] [--reps 5] [--turns 10]

Against one `llama-crab serve` (4 slots), through `llama_crab_client.Client`, the cache on
and off per request (`cache_prompt`), rounds interleaved so that drift hits both:
  sequential    one question after another behind the shared prefix: TTFT
  concurrent    4 questions at once behind the shared prefix: TTFT
  chat          a 10-turn session (history re-sent each turn): per-turn TTFT and the
                prompt tokens actually computed
Writes docs/prefix-cache.md (the report) and bench/out/prefix.json (raw numbers). Speed
is measured here, never asserted in tests. llama.cpp's own server on the same scenario
belongs beside these numbers; it is not built here yet (the performance work adds it).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any, Optional

from common import add_model_arguments, load_average
from service import serve

from llama_crab_client import Client, CompletionOptions

OUT = Path(__file__).resolve().parent / "out"
DOC = Path(__file__).resolve().parent.parent / "docs" / "prefix-cache.md"
SYSTEM = "You are a careful assistant for a library. " + " ".join(
    f"Rule {i}: answer questions about book number {i} politely, citing the shelf and the floor."
    for i in range(60)
)
QUESTIONS = [f"\nQuestion: where is book number {i}?\nAnswer:" for i in range(200)]


def ttft(client: Client, prompt: str, options: CompletionOptions) -> tuple[float, int, int]:
    """Seconds to the first chunk, prompt tokens, cached tokens."""
    start = time.perf_counter()
    first: Optional[float] = None
    with client.stream(prompt, options) as stream:
        for _chunk in stream:
            if first is None:
                first = time.perf_counter() - start
        completion = stream.completion
    assert completion is not None and first is not None
    return first, completion.usage.prompt_tokens, completion.usage.cached_tokens


def concurrent_ttfts(client: Client, prompts: list[str], options: CompletionOptions) -> list[float]:
    barrier = threading.Barrier(len(prompts))
    out: list[float] = [0.0] * len(prompts)

    def one(i: int) -> None:
        barrier.wait()
        out[i] = ttft(client, prompts[i], options)[0]

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out


def chat(client: Client, turns: int, cache: bool) -> list[dict[str, float]]:
    session = client.session()
    rows = []
    options = CompletionOptions(16, cache_prompt=cache)
    for i in range(turns):
        start = time.perf_counter()
        first: Optional[float] = None
        text = (SYSTEM if i == 0 else "") + QUESTIONS[100 + i]

        def on_chunk(_chunk: Any) -> None:
            nonlocal first
            if first is None:
                first = time.perf_counter() - start

        completion = session.create_completion_stream(text, options, on_chunk)
        rows.append(
            {
                "turn": i + 1,
                "ttft_ms": 1000 * (first or 0.0),
                "prompt_tokens": completion.usage.prompt_tokens,
                "computed_tokens": completion.usage.prompt_tokens - completion.usage.cached_tokens,
            }
        )
    return rows


def median_range(values: list[float]) -> str:
    ms = [1000 * v for v in values]
    return f"{statistics.median(ms):.0f} ({min(ms):.0f}-{max(ms):.0f})"


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--turns", type=int, default=10)
    args = parser.parse_args(argv)
    OUT.mkdir(parents=True, exist_ok=True)
    on, off = CompletionOptions(8), CompletionOptions(8, cache_prompt=False)
    results: dict[str, Any] = {"model": args.model, "threads": args.threads}
    with serve(args.model, args.threads, 8192, 4, OUT / "prefix.server.log") as (address, _pid):
        with Client(address, timeout=600) as client:
            prefix_tokens = len(client.tokenize(SYSTEM))
            results["prefix_tokens"] = prefix_tokens
            ttft(client, SYSTEM + QUESTIONS[0], on)  # warm-up; leaves the prefix cached
            seq: dict[str, list[float]] = {"on": [], "off": []}
            conc: dict[str, list[float]] = {"on": [], "off": []}
            q = 1
            for _rep in range(args.reps):  # interleaved: on, off, on, off...
                for name, options in (("on", on), ("off", off)):
                    seq[name].append(ttft(client, SYSTEM + QUESTIONS[q], options)[0])
                    q += 1
                    conc[name] += concurrent_ttfts(client, [SYSTEM + QUESTIONS[q + i] for i in range(4)], options)
                    q += 4
            results["sequential_ttft_s"] = seq
            results["concurrent4_ttft_s"] = conc
            results["chat"] = {"on": chat(client, args.turns, True), "off": chat(client, args.turns, False)}
    results["measured"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    results["load_average"] = load_average()
    (OUT / "prefix.json").write_text(json.dumps(results, indent=2))
    lines = report(results, args.reps, args.turns)
    DOC.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


def report(results: dict[str, Any], reps: int, turns: int) -> list[str]:
    seq, conc = results["sequential_ttft_s"], results["concurrent4_ttft_s"]
    load = " ".join(f"{v:.2f}" for v in results.get("load_average") or ()) or "?"
    lines = [
        "# Prefix cache",
        "",
        "Generated by `python bench/prefix.py`; do not edit by hand, run it again.",
        "",
        f"- Measured {results['measured']}, load average {load}; `{results['model']}`, "
        f"{results['threads']} threads, `llama-crab serve` with 4 slots, through `llama_crab_client.Client`.",
        f"- A shared prefix of {results['prefix_tokens']} tokens, then a short distinct question; the cache on and "
        f"off per request (`cache_prompt`), rounds interleaved; TTFT in ms, median (min-max) of {reps} rounds.",
        "",
        "| scenario | cache on | cache off | off / on |",
        "|---|---:|---:|---:|",
    ]
    for label, data in (("sequential", seq), ("4 concurrent", conc)):
        ratio = statistics.median(data["off"]) / statistics.median(data["on"])
        lines.append(f"| {label} | {median_range(data['on'])} | {median_range(data['off'])} | {ratio:.1f}x |")
    lines += ["", f"A {turns}-turn session (`Client.session()`, the history re-sent each turn as token ids):", ""]
    lines += ["| turn | prompt tokens | computed, cache on | TTFT on (ms) | computed, cache off | TTFT off (ms) |"]
    lines += ["|---:|---:|---:|---:|---:|---:|"]
    for a, b in zip(results["chat"]["on"], results["chat"]["off"]):
        lines.append(
            f"| {a['turn']} | {a['prompt_tokens']} | {a['computed_tokens']} | {a['ttft_ms']:.0f} "
            f"| {b['computed_tokens']} | {b['ttft_ms']:.0f} |"
        )
    return lines


if __name__ == "__main__":
    sys.exit(main())
