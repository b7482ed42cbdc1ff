"""Speculative-decoding benchmark: llama-crab with and without speculation beside llama.cpp's
own llama-server with the same drafter, in one run, rounds interleaved, both servers up.

    python bench/speculative.py [--model qwen2.5-coder-0.5b] [--threads N] [--reps 3]
                                [--spec-type ngram-simple] [--n-predict 256]
                                [--llama-server PATH] [--no-build]
    python bench/speculative.py --report-only   # the report again from bench/out/speculative.json

Three workloads, each at 1 and 4 concurrent streams, greedy, `--n-predict` tokens (end of
generation banned on both sides, so both do the same work), the prompt never from a cache:
  edit    2.5 KB of this repository's Python (examples/manual_loop.py) asked back with one
          variable renamed: the everyday "apply this edit" call
  json    a JSON document asked back with one field changed
  story   a story, which does not repeat its prompt: what speculation costs when it does
          not pay
Three configurations per round, their order rotating by round so drift hits each alike:
  crab-spec     `llama-crab serve --spec-type T`, requests as they come (speculative on)
  crab-plain    the same server, requests with `speculative=False`
  server-spec   `llama-server --spec-type T` (built from the same pinned llama.cpp)
Reported per cell: aggregate decode tokens/s (every stream's tokens after its first, over
the time from the round's first first-token to its last token),
median TTFT (client side: request sent to first token), the acceptance rate (accepted /
drafted draft tokens, from each server's own counts) and streamed messages per token.
Writes docs/speculative-performance.md and bench/out/speculative.json. Speed is measured
here, never asserted in tests.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import llama_bench
import llama_server
from common import (
    add_model_arguments,
    cpu_name,
    end_of_generation_bias,
    load_average,
    median_range,
    together,
    write_results,
)
from service import free_port, serve_process

from llama_crab_client import Client, CompletionOptions

ROOT = Path(__file__).resolve().parent.parent
OUT = Path(__file__).resolve().parent / "out"
DOC = ROOT / "docs" / "speculative-performance.md"
N_CTX = 8192
PARALLEL = 4
CONFIGS = ("crab-spec", "crab-plain", "server-spec")
STREAMS = (1, 4)


def workloads() -> dict[str, str]:
    code = (ROOT / "examples" / "manual_loop.py").read_text()[:2500]
    records = [{"id": i, "name": f"item-{i}", "status": "open", "owner": f"user{i % 5}", "tags": ["a", "b"]} for i in range(18)]
    document = json.dumps(records, indent=2)
    return {
        "edit": (
            "Rewrite the Python file below with the variable `tokens` renamed to `ids`. Reply with the "
            f"whole file and nothing else.\n\n```python\n{code}\n```\n\n```python\n"
        ),
        "json": (
            'Return the JSON below unchanged except that the item with "id": 7 gets "status": "closed". '
            f"Reply with the JSON only.\n\n```json\n{document}\n```\n\n```json\n"
        ),
        "story": "Write a long story about a lighthouse keeper who finds a message in a bottle.\n\n",
    }


@dataclass(frozen=True)
class Stream:
    """One stream's result; `first` and `end` are perf_counter stamps."""

    sent: float
    first: float
    end: float
    tokens: int
    messages: int
    drafted: int
    accepted: int


def crab_stream(client: Client, prompt: str, n_predict: int, banned: dict[int, float], speculative: bool) -> Stream:
    options = CompletionOptions(
        n_predict, logit_bias=banned, cache_prompt=False, speculative=speculative, samplers=("top_k",), top_k=1
    )
    start = time.perf_counter()
    first: Optional[float] = None
    messages = 0
    with client.stream(prompt, options) as stream:
        for _chunk in stream:
            messages += 1
            if first is None:
                first = time.perf_counter()
    end = time.perf_counter()
    completion = stream.completion
    assert completion is not None and first is not None
    t = completion.timings
    return Stream(start, first, end, completion.usage.completion_tokens, messages, t.draft_tokens, t.draft_accepted_tokens)


def server_stream(connections: llama_server.Connections, prompt: str, n_predict: int, banned: dict[int, float]) -> Stream:
    body = json.dumps(llama_server.completion_body(prompt, n_predict, banned)).encode()
    start = time.perf_counter()
    first: Optional[float] = None
    messages = 0
    final: dict[str, Any] = {}
    for event in llama_server.events(connections, body):
        if event.get("stop"):
            final = event
            continue
        messages += 1
        if first is None:
            first = time.perf_counter()
    end = time.perf_counter()
    assert first is not None and final, "llama-server: no token, or no final event"
    timings = final.get("timings") or {}
    return Stream(
        start,
        first,
        end,
        int(final.get("tokens_predicted", 0)),
        messages,
        int(timings.get("draft_n", 0)),
        int(timings.get("draft_n_accepted", 0)),
    )


def cell(wall: float, streams: list[Stream]) -> dict[str, float]:
    """Aggregate decode tokens/s: every token after each stream's first, over the time from
    the first first-token to the last stream's end (prefill left out, as in llama-server's
    own predicted_per_second)."""
    tokens = sum(s.tokens for s in streams)
    decode_s = max(s.end for s in streams) - min(s.first for s in streams)
    drafted, accepted = sum(s.drafted for s in streams), sum(s.accepted for s in streams)
    return {
        "tok_s": sum(s.tokens - 1 for s in streams) / decode_s,
        "wall_s": wall,
        "ttft_ms": 1000 * statistics.median(s.first - s.sent for s in streams),
        "acceptance": accepted / drafted if drafted else 0.0,
        "drafted": drafted,
        "messages_per_token": sum(s.messages for s in streams) / max(1, tokens),
    }


def measure(
    crab: Client,
    server: Optional[llama_server.Connections],
    banned: dict[int, float],
    n_predict: int,
    reps: int,
    names: tuple[str, ...],
    stream_counts: tuple[int, ...],
    configs: tuple[str, ...] = CONFIGS,
) -> dict[str, Any]:
    runs: dict[str, Callable[[str], Stream]] = {
        "crab-spec": lambda p: crab_stream(crab, p, n_predict, banned, True),
        "crab-plain": lambda p: crab_stream(crab, p, n_predict, banned, False),
    }
    if server is not None:
        runs["server-spec"] = lambda p: server_stream(server, p, n_predict, banned)
    results: dict[str, Any] = {}
    warm = False
    for name, prompt in workloads().items():
        if name not in names:
            continue
        for n in stream_counts:
            key = f"{name}/{n}"
            results[key] = {c: [] for c in configs}
            if not warm:  # one warm-up round per configuration, not recorded
                for config in configs:
                    together(lambda: runs[config](prompt), 1)
                warm = True
            for rep in range(reps):
                shift = rep % len(configs)
                order = configs[shift:] + configs[:shift]
                for config in order:
                    wall, streams = together(lambda: runs[config](prompt), n)
                    results[key][config].append(cell(wall, streams))
                    print(f"{key} {config}: {results[key][config][-1]}", file=sys.stderr, flush=True)
    return results


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser, default_model="qwen2.5-coder-0.5b")
    parser.add_argument("--reps", type=int, default=3, help="rounds per cell; medians reported (default: 3)")
    parser.add_argument("--spec-type", default="ngram-simple", help="llama.cpp's type, for both servers")
    parser.add_argument("--n-predict", type=int, default=256, help="tokens per stream (default: 256)")
    parser.add_argument("--llama-server", metavar="PATH", help="a llama-server binary (else $LLAMA_SERVER or built)")
    parser.add_argument("--no-build", action="store_true", help="fail rather than build llama-server when missing")
    parser.add_argument(
        "--prefill-step",
        type=int,
        help="llama-crab's prompt tokens per step beside decoding streams (default: the server's, 128; "
        "0 = n_batch, llama-server's policy)",
    )
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds one stream may take (default: 600)")
    parser.add_argument("--report-only", action="store_true", help="rewrite the report from bench/out/speculative.json")
    parser.add_argument("--workloads", default="edit,json,story", help="comma list of edit, json, story")
    parser.add_argument("--streams", default="1,4", help="comma list of concurrent stream counts (default: 1,4)")
    parser.add_argument(
        "--append", action="store_true", help="add these cells to bench/out/speculative.json instead of replacing it"
    )
    parser.add_argument(
        "--crab-only",
        action="store_true",
        help="speculation against none, llama-server left out (no build); prints the cells and writes "
        "bench/out/speculative-crab-only.json, not the report",
    )
    args = parser.parse_args(argv)
    if args.report_only:
        saved = json.loads((OUT / "speculative.json").read_text())
        DOC.write_text(report(saved))
        print(report(saved))
        return 0
    if args.reps < 1 or args.n_predict < 1:
        parser.error("--reps and --n-predict must be >= 1")
    names = tuple(n.strip() for n in args.workloads.split(",") if n.strip())
    if not names or not set(names) <= set(workloads()):
        parser.error(f"--workloads: choose from {', '.join(workloads())}")
    try:
        stream_counts = tuple(int(n) for n in args.streams.split(","))
    except ValueError:
        parser.error("--streams: a comma list of integers")
    if not stream_counts or not all(1 <= n <= PARALLEL for n in stream_counts):
        parser.error(f"--streams: each between 1 and {PARALLEL}")
    from llama_crab import models

    model = models.ensure(args.model)
    OUT.mkdir(parents=True, exist_ok=True)
    if args.crab_only:
        return crab_only(args, model, names, stream_counts)
    binary = llama_bench.locate(args.llama_server, allow_build=not args.no_build, tool="llama-server")
    results: dict[str, Any] = {
        "model": args.model,
        "threads": args.threads,
        "reps": args.reps,
        "spec_type": args.spec_type,
        "n_predict": args.n_predict,
        "prefill_step": args.prefill_step,
        "cpu": cpu_name(),
        "llama_server_binary": llama_bench.shown(binary),
        "pinned_commit": llama_bench.pinned_commit(),
        "load_before": load_average(),
    }
    with contextlib.ExitStack() as stack:
        proc, address = stack.enter_context(serve_process(model, OUT / "speculative.server.log", *crab_args(args)))
        crab = stack.enter_context(Client(address, timeout=args.timeout))
        port = free_port()
        stack.enter_context(
            llama_server.serve(
                binary, model, args.threads, N_CTX, PARALLEL, port, OUT / "speculative.llama-server.log",
                extra=("--spec-type", args.spec_type),
            )
        )  # fmt: skip
        banned = end_of_generation_bias(crab)
        cells = measure(
            crab, llama_server.Connections(port, args.timeout), banned, args.n_predict, args.reps, names, stream_counts
        )
    measured = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    for cell_results in cells.values():
        cell_results["measured"] = measured
    previous = json.loads((OUT / "speculative.json").read_text()) if args.append else {}
    results["cells"] = {**previous.get("cells", {}), **cells}
    results["measured"] = measured
    return write_results(results, OUT / "speculative.json", DOC, report)


def crab_args(args: argparse.Namespace) -> tuple[str, ...]:
    return (
        "--threads", str(args.threads), "--n-ctx", str(N_CTX), "--parallel", str(PARALLEL), "--spec-type",
        args.spec_type, "--log-level", "warning",
    ) + (("--prefill-step", str(args.prefill_step)) if args.prefill_step is not None else ())  # fmt: skip


def crab_only(args: argparse.Namespace, model: str, names: tuple[str, ...], stream_counts: tuple[int, ...]) -> int:
    """Speculation on and off in the same server, interleaved: for tuning, where building
    llama-server would take longer than the measurement."""
    with contextlib.ExitStack() as stack:
        _proc, address = stack.enter_context(serve_process(model, OUT / "speculative.server.log", *crab_args(args)))
        crab = stack.enter_context(Client(address, timeout=args.timeout))
        banned = end_of_generation_bias(crab)
        cells = measure(
            crab, None, banned, args.n_predict, args.reps, names, stream_counts, configs=("crab-spec", "crab-plain")
        )
    summary = {}
    for key, by_config in cells.items():
        spec = statistics.median(c["tok_s"] for c in by_config["crab-spec"])
        plain = statistics.median(c["tok_s"] for c in by_config["crab-plain"])
        summary[key] = {"spec_tok_s": spec, "plain_tok_s": plain, "spec_over_plain": spec / plain}
        print(f"{key}: spec {spec:.1f} tok/s, plain {plain:.1f} tok/s, {spec / plain:.2f}x")
    out = {"cpu": cpu_name(), "threads": args.threads, "reps": args.reps, "cells": cells, "summary": summary}
    (OUT / "speculative-crab-only.json").write_text(json.dumps(out, indent=2))
    return 0


def report(results: dict[str, Any]) -> str:
    load = " ".join(f"{v:.2f}" for v in results.get("load_before") or ()) or "?"
    lines = [
        "# Speculative decoding",
        "",
        f"Generated by `python bench/speculative.py --model {results['model']} --threads {results['threads']} "
        f"--reps {results['reps']} --spec-type {results['spec_type']} --n-predict {results['n_predict']}"
        + (f" --prefill-step {results['prefill_step']}" if results.get("prefill_step") is not None else "")
        + "`; "
        "do not edit by hand, run it again.",
        "",
        f"Measured {results['measured']} on {results['cpu']}, {results['threads']} threads, "
        f"{results['reps']} round(s) per cell, rounds interleaved (configurations rotating), both servers up; "
        f"load average before {load}. llama-server: `{results['llama_server_binary']}` at llama.cpp "
        f"`{results['pinned_commit']}`, `--spec-type {results['spec_type']}`. Medians, (min-max) over rounds.",
        "",
        "| workload / streams | crab-spec decode tok/s | crab-plain decode tok/s | server-spec decode tok/s | spec / plain | spec / server "
        "| end to end: spec / plain, spec / server | acceptance crab, server | TTFT ms crab-spec, plain, server "
        "| messages/token crab-spec, server |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for key, cells in results["cells"].items():
        if cells.get("measured") and cells["measured"] != results["measured"]:
            lines[4] += f" Row {key}: measured {cells['measured']}, {len(cells['crab-spec'])} round(s)."
        tps = {c: [r["tok_s"] for r in cells[c]] for c in CONFIGS}
        med = {c: statistics.median(v) for c, v in tps.items()}
        acc = {c: statistics.median(r["acceptance"] for r in cells[c]) for c in CONFIGS}
        ttft = {c: statistics.median(r["ttft_ms"] for r in cells[c]) for c in CONFIGS}
        mpt = {c: statistics.median(r["messages_per_token"] for r in cells[c]) for c in CONFIGS}
        # End to end: the round's wall time, prefill included (the same work on every side).
        wall = {c: statistics.median(r["wall_s"] for r in cells[c]) for c in CONFIGS}
        lines.append(
            f"| {key} | {median_range(tps['crab-spec'])} | {median_range(tps['crab-plain'])} | "
            f"{median_range(tps['server-spec'])} | {med['crab-spec'] / med['crab-plain']:.2f}x | "
            f"{med['crab-spec'] / med['server-spec']:.2f}x | "
            f"{wall['crab-plain'] / wall['crab-spec']:.2f}x, {wall['server-spec'] / wall['crab-spec']:.2f}x | "
            f"{acc['crab-spec']:.0%}, {acc['server-spec']:.0%} | "
            f"{ttft['crab-spec']:.0f}, {ttft['crab-plain']:.0f}, {ttft['server-spec']:.0f} | "
            f"{mpt['crab-spec']:.2f}, {mpt['server-spec']:.2f} |"
        )
    lines += [
        "",
        "Decode tok/s: every stream's tokens after its first, over the time from the round's first "
        "first-token to its last token; at 4 streams that window also holds the other streams' prefill, "
        "so the end-to-end ratios (round wall time, prefill included) are shown beside it.",
        "",
        "Targets (issue 18): edit work at 1 stream >= 1.0x llama-server with the same type and >= 2x "
        "llama-crab without speculation; edit work at 4 streams >= 1.0x llama-server; the story >= 0.97x "
        "llama-crab without speculation.",
        "",
        "Reproduce: `python bench/run.py --scenario speculative` or `python bench/speculative.py` (raw numbers: "
        "`bench/out/speculative.json`). How speculation works here: [speculative.md](speculative.md).",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
