"""The HTTP column: llama-crab's OpenAI-compatible SSE endpoint against llama-server's, with
llama-crab's gRPC stream beside them, at 1/4/8 streams.

    python bench/openai_http.py [--model NAME] [--threads N] [--reps N] [--n-predict N]
    python bench/run.py --scenario http

Three sides, both servers up at once, rounds interleaved (the order rotating by round):
  crab-http     POST /v1/completions with "stream": true on `llama-crab serve --http-port`
  crab-grpc     Complete on the same server
  server-http   POST /v1/completions with "stream": true on `llama-server`
Every side does the same work: the benchmark prompt, `n_predict` tokens, end-of-generation
tokens banned, greedy (`samplers: ["top_k"]`, `top_k: 1`), the prompt never from a cache.
Reported per side and stream count: aggregate decode tokens/s (every stream's tokens after
its first, over the time from the round's first first-token to its last token), and the
server's CPU per token (its process's user + system time over the round / tokens). Writes
docs/http-performance.md and bench/out/http.json. Speed is measured here, never asserted
in tests.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import llama_bench
import llama_server
from common import (
    PROMPT,
    add_model_arguments,
    cpu_name,
    end_of_generation_bias,
    load_average,
    median_range,
    proc_cpu_seconds,
    together,
    write_results,
)
from service import free_port, serve_process

from llama_crab_client import Client, CompletionOptions

ROOT = Path(__file__).resolve().parent.parent
OUT = Path(__file__).resolve().parent / "out"
DOC = ROOT / "docs" / "http-performance.md"
N_CTX = 4096
PARALLEL = 8
SIDES = ("crab-http", "crab-grpc", "server-http")
STREAMS = (1, 4, 8)


@dataclass(frozen=True)
class Stream:
    first: float
    end: float
    tokens: int


def sse_stream(port: int, body: bytes, timeout: float) -> Stream:
    """One streamed `/v1/completions`; the tokens from its usage chunk."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    first: Optional[float] = None
    tokens = 0
    try:
        conn.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
        resp = conn.getresponse()
        if resp.status != 200:
            raise RuntimeError(f"HTTP {resp.status} from port {port}: {resp.read()[:300]!r}")
        for line in resp:
            if not line.startswith(b"data: "):
                continue
            if line[6:].strip() == b"[DONE]":
                break
            event = json.loads(line[6:])
            if "error" in event:
                raise RuntimeError(f"stream error from port {port}: {event['error']}")
            if event.get("choices") and first is None:
                first = time.perf_counter()
            if event.get("usage"):
                tokens = int(event["usage"]["completion_tokens"])
    finally:
        conn.close()
    if first is None or not tokens:
        raise RuntimeError(f"port {port}: no token or no usage in the stream")
    return Stream(first, time.perf_counter(), tokens)


def grpc_stream(client: Client, options: CompletionOptions) -> Stream:
    first: Optional[float] = None
    with client.stream(PROMPT, options) as stream:
        for _chunk in stream:
            if first is None:
                first = time.perf_counter()
    completion = stream.completion
    assert completion is not None and first is not None
    return Stream(first, time.perf_counter(), completion.usage.completion_tokens)


def measure_round(run_one: Callable[[], Stream], n: int, pid: int) -> dict[str, float]:
    cpu_before = proc_cpu_seconds(pid) or 0.0
    _wall, streams = together(run_one, n)
    cpu = (proc_cpu_seconds(pid) or 0.0) - cpu_before
    tokens = sum(s.tokens for s in streams)
    decode_s = max(s.end for s in streams) - min(s.first for s in streams)
    return {"tok_s": sum(s.tokens - 1 for s in streams) / decode_s, "server_cpu_ms_per_token": 1000 * cpu / tokens}


def openai_body(n_predict: int, banned: dict[int, float]) -> bytes:
    return json.dumps(
        {
            "prompt": PROMPT,
            "max_tokens": n_predict,
            "stream": True,
            "stream_options": {"include_usage": True},
            "temperature": 0.0,
            "samplers": ["top_k"],
            "top_k": 1,
            "logit_bias": {str(t): -100 for t in sorted(banned)},
            "cache_prompt": False,
        }
    ).encode()


@contextlib.contextmanager
def servers(args: argparse.Namespace, model: str, binary: Path) -> Iterator[dict[str, Any]]:
    with contextlib.ExitStack() as stack:
        crab_http = free_port()
        proc, address = stack.enter_context(
            serve_process(
                model, OUT / "http.server.log", "--threads", str(args.threads), "--n-ctx", str(N_CTX),
                "--parallel", str(PARALLEL), "--http-port", str(crab_http), "--log-level", "warning",
            )
        )  # fmt: skip
        client = stack.enter_context(Client(address, timeout=args.timeout))
        server_port = free_port()
        server_pid = stack.enter_context(
            llama_server.serve(binary, model, args.threads, N_CTX, PARALLEL, server_port, OUT / "http.llama-server.log")
        )
        yield {"client": client, "crab_pid": proc.pid, "crab_http": crab_http, "server_port": server_port, "server_pid": server_pid}


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    parser.add_argument("--reps", type=int, default=3, help="rounds per cell; medians reported (default: 3)")
    parser.add_argument("--n-predict", type=int, default=128, help="tokens per stream (default: 128)")
    parser.add_argument("--llama-server", metavar="PATH", help="a llama-server binary (else $LLAMA_SERVER or built)")
    parser.add_argument("--no-build", action="store_true", help="fail rather than build llama-server when missing")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds one stream may take (default: 600)")
    args = parser.parse_args(argv)
    if args.reps < 1 or args.n_predict < 1:
        parser.error("--reps and --n-predict must be >= 1")
    from llama_crab import models

    model = models.ensure(args.model)
    binary = llama_bench.locate(args.llama_server, allow_build=not args.no_build, tool="llama-server")
    OUT.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {
        "model": args.model, "threads": args.threads, "reps": args.reps, "n_predict": args.n_predict,
        "cpu": cpu_name(), "llama_server_binary": llama_bench.shown(binary),
        "pinned_commit": llama_bench.pinned_commit(), "load_before": load_average(),
    }  # fmt: skip
    with servers(args, model, binary) as s:
        banned = end_of_generation_bias(s["client"])
        body = openai_body(args.n_predict, banned)
        options = CompletionOptions(args.n_predict, logit_bias=banned, cache_prompt=False, samplers=("top_k",), top_k=1)
        runs: dict[str, tuple[Callable[[], Stream], int]] = {
            "crab-http": (lambda: sse_stream(s["crab_http"], body, args.timeout), s["crab_pid"]),
            "crab-grpc": (lambda: grpc_stream(s["client"], options), s["crab_pid"]),
            "server-http": (lambda: sse_stream(s["server_port"], body, args.timeout), s["server_pid"]),
        }
        for side in SIDES:  # warm-up: every slot, connections, first touch of the weights
            together(runs[side][0], max(STREAMS))
        cells: dict[str, dict[str, list[dict[str, float]]]] = {str(n): {side: [] for side in SIDES} for n in STREAMS}
        for rep in range(args.reps):
            order = SIDES[rep % 3 :] + SIDES[: rep % 3]
            for n in STREAMS:
                for side in order:
                    run_one, pid = runs[side]
                    cells[str(n)][side].append(measure_round(run_one, n, pid))
                    print(f"{n} {side}: {cells[str(n)][side][-1]}", file=sys.stderr, flush=True)
    results["cells"] = cells
    results["measured"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    return write_results(results, OUT / "http.json", DOC, report)


def report(results: dict[str, Any]) -> str:
    load = " ".join(f"{v:.2f}" for v in results.get("load_before") or ()) or "?"
    lines = [
        "# The HTTP API beside llama-server's",
        "",
        "Generated by `python bench/openai_http.py`; do not edit by hand, run it again.",
        "",
        f"Measured {results['measured']} on {results['cpu']}, {results['threads']} threads, model "
        f"{results['model']}, {results['n_predict']} tokens per stream, {results['reps']} round(s) per cell, "
        f"rounds interleaved (sides rotating), both servers up; load average before {load}. llama-server: "
        f"`{results['llama_server_binary']}` at llama.cpp `{results['pinned_commit']}`. Medians, (min-max) over rounds.",
        "",
        "| streams | crab HTTP tok/s | crab gRPC tok/s | llama-server HTTP tok/s | HTTP / llama-server | "
        "HTTP / gRPC | server CPU ms/token: crab HTTP, crab gRPC, llama-server |",
        "|---|---|---|---|---|---|---|",
    ]
    for n, by_side in results["cells"].items():
        tps = {side: [r["tok_s"] for r in rounds] for side, rounds in by_side.items()}
        cpu = {side: statistics.median(r["server_cpu_ms_per_token"] for r in rounds) for side, rounds in by_side.items()}
        med = {side: statistics.median(v) for side, v in tps.items()}
        lines.append(
            f"| {n} | {median_range(tps['crab-http'])} | {median_range(tps['crab-grpc'])} | "
            f"{median_range(tps['server-http'])} | {med['crab-http'] / med['server-http']:.2f}x | "
            f"{med['crab-http'] / med['crab-grpc']:.2f}x | "
            f"{cpu['crab-http']:.1f}, {cpu['crab-grpc']:.1f}, {cpu['server-http']:.1f} |"
        )
    lines += [
        "",
        "Target (issue 19): the HTTP endpoint at >= 1.0x llama-server's aggregate. The CPU column is "
        "the whole server process (decoding included) per generated token; the gRPC and HTTP sides "
        "are the same process, so their difference is what each protocol costs per token.",
        "",
        "Reproduce: `python bench/run.py --scenario http` or `python bench/openai_http.py` "
        "(raw numbers: `bench/out/http.json`). The API: [http.md](http.md).",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
