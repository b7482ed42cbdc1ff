"""The gRPC column: `llama-crab serve` as a subprocess, driven by `llama_crab_client.Client`,
and, measured in the same run with its rounds interleaved, the llama-server column
(bench/llama_server.py) on the same work.

Concurrent gRPC streams share one channel (HTTP/2 multiplexing, as a real client would);
every round's streams, of either side, run one per thread and start together behind a
barrier.
"""

from __future__ import annotations

import contextlib
import resource
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any, Optional

import grpc
import llama_server
from common import (
    PROMPT,
    ChunkStream,
    RoundResult,
    StreamTiming,
    Summary,
    end_of_generation_bias,
    machine_busy_seconds,
    peak_rss_mb,
    percentile,
    proc_cpu_seconds,
    time_stream,
    together,
)
from grpc_health.v1 import health_pb2, health_pb2_grpc

from llama_crab_client import Client, CompletionOptions


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_serving(address: str, proc: subprocess.Popen[bytes], timeout: float) -> None:
    """Until health says SERVING (the model is loaded and a warm-up decode passed)."""
    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"llama-crab serve exited with {proc.returncode} before serving")
            try:
                reply = health.Check(health_pb2.HealthCheckRequest(), timeout=2.0)  # type: ignore[attr-defined]
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.2)
    raise RuntimeError(f"llama-crab serve did not become SERVING within {timeout:.0f}s")


@contextmanager
def serve_process(model: str, log: Path, *args: str) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    """`llama-crab serve --model MODEL ARGS...` on 127.0.0.1 and a free port, until SERVING;
    yields (process, address). Killed on the way out if still running: a caller that wants
    a clean SIGTERM shutdown does it (and times it) itself."""
    port = free_port()
    cmd = [
        sys.executable, "-m", "llama_crab.cli", "serve", "--model", model, "--host", "127.0.0.1",
        "--port", str(port), "--http-port", "0", *args,
    ]  # fmt: skip
    print("+ " + " ".join(cmd), file=sys.stderr, flush=True)
    with log.open("wb") as log_file:
        proc = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT)
        try:
            address = f"127.0.0.1:{port}"
            wait_serving(address, proc, timeout=300.0)
            yield proc, address
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


@contextmanager
def serve(model: str, threads: int, n_ctx: int, parallel: int, log: Path) -> Iterator[tuple[str, int]]:
    """A running server: yields (address, pid); stopped (SIGTERM, then SIGKILL) on exit."""
    args = ("--threads", str(threads), "--n-ctx", str(n_ctx), "--parallel", str(parallel))
    with serve_process(model, log, *args, "--max-queue", "64", "--grace", "5", "--log-level", "warning") as (
        proc,
        address,
    ):
        try:
            yield address, proc.pid
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    pass  # serve_process kills it


def run_concurrent(start: Callable[[], ChunkStream], streams: int) -> list[StreamTiming]:
    """`streams` streams from `start()` on as many threads, begun together behind a barrier."""
    _wall, timings = together(lambda: time_stream(start), streams)
    return timings


def run_round(client: Client, options: CompletionOptions, streams: int) -> RoundResult:
    return RoundResult.of(run_concurrent(lambda: client.stream(PROMPT, options), streams))


def timed_round(start: Callable[[], ChunkStream], streams: int, pid: int, other_pid: Optional[int]) -> dict[str, Any]:
    """One round of `streams` concurrent streams against the server `pid`: `RoundResult`'s
    numbers plus each stream's TTFT, the CPU the server and this process (the client) spent
    per token, and the CPU of the other, idle server (`other_pid`) meanwhile."""
    machine_before = machine_busy_seconds()
    server_before, client_before = proc_cpu_seconds(pid), time.process_time()
    other_before = proc_cpu_seconds(other_pid) if other_pid else None
    timings = run_concurrent(start, streams)
    server_after, client_after = proc_cpu_seconds(pid), time.process_time()
    other_after = proc_cpu_seconds(other_pid) if other_pid else None
    machine_after = machine_busy_seconds()
    result: dict[str, Any] = asdict(RoundResult.of(timings))
    tokens = result["tokens"]
    server_cpu = None if server_before is None or server_after is None else server_after - server_before
    other_cpu = None if other_before is None or other_after is None else other_after - other_before
    foreign_cpu = None
    if machine_before is not None and machine_after is not None and server_cpu is not None:
        ours = server_cpu + (client_after - client_before) + (other_cpu or 0.0)
        foreign_cpu = max(0.0, (machine_after - machine_before) - ours)
    wall = max(t.last or t.started for t in timings) - min(t.started for t in timings)
    result.update(
        max_tokens=max(t.tokens for t in timings),
        ttfts_ms=sorted(t.ttft_ms for t in timings),
        # The server's own decode rate over all its streams: each stream's engine-timed rate, summed.
        engine_decode_tps_total=sum(t.engine_decode_tps for t in timings),
        server_cpu_ms_per_token=1000.0 * server_cpu / tokens if server_cpu is not None and tokens else None,
        client_cpu_ms_per_token=1000.0 * (client_after - client_before) / tokens if tokens else None,
        other_server_cpu_ms=None if other_cpu is None else 1000.0 * other_cpu,
        # Everything else on the machine (other work, the kernel's share) over the round, as a
        # fraction of one core: a noisy round shows here.
        foreign_cpu_cores=None if foreign_cpu is None or wall <= 0 else foreign_cpu / wall,
    )
    return result


SUMMARIZED = (
    "aggregate_tps", "decode_tps_per_stream", "engine_decode_tps", "engine_decode_tps_total", "server_cpu_ms_per_token",
    "client_cpu_ms_per_token",
)  # fmt: skip


def summarize(rounds: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """`Summary` (medians over the rounds) plus TTFT p50/p95 over every stream of every round,
    the medians of the CPU and server-side numbers, and each one's range (lowest, highest)."""
    fields = RoundResult.__dataclass_fields__
    out = asdict(Summary.of([RoundResult(**{k: v for k, v in r.items() if k in fields}) for r in rounds]))
    out["rounds"] = list(rounds)
    ttfts = [t for r in rounds for t in r["ttfts_ms"]]
    out["ttft_p50_ms"] = percentile(ttfts, 50)
    out["ttft_p95_ms"] = percentile(ttfts, 95)
    out["range"] = {"ttft_ms": [min(ttfts), max(ttfts)]}
    for key in SUMMARIZED:
        values = [r[key] for r in rounds if r.get(key) is not None]
        out[key] = statistics.median(values) if values else None
        out["range"][key] = [min(values), max(values)] if values else None
    out["other_server_cpu_ms_max"] = max((r["other_server_cpu_ms"] or 0.0 for r in rounds), default=0.0)
    out["foreign_cpu_cores_max"] = max((r["foreign_cpu_cores"] or 0.0 for r in rounds), default=0.0)
    return out


def same_work(client: Client, http: llama_server.Client, options: CompletionOptions) -> dict[str, Any]:
    """One stream each side (also a warm-up): the prompt tokens each computed, and whether
    they generated the same tokens, so the comparison is on identical work."""
    with client.stream(PROMPT, options) as stream:
        grpc_ids = [t for chunk in stream for t in chunk.token_ids]
        done = stream.completion
    assert done is not None
    reply = http.complete(options.max_tokens, options.logit_bias)
    timings = reply.get("timings") or {}
    return {
        "prompt_tokens": {"grpc": done.usage.prompt_tokens, "llama_server": int(reply.get("tokens_evaluated", -1))},
        "computed_prompt_tokens": {
            "grpc": done.usage.prompt_tokens - done.usage.cached_tokens,
            "llama_server": int(timings.get("prompt_n", -1)),
        },
        "generated": {"grpc": len(grpc_ids), "llama_server": len(reply.get("tokens") or [])},
        "stop": {"grpc": str(done.stop_reason), "llama_server": str(reply.get("stop_type"))},
        "same_output": grpc_ids == list(reply.get("tokens") or []),
    }


def measure(
    model: str,
    threads: int,
    n_predict: int,
    n_ctx: int,
    parallel: int,
    concurrency: Sequence[int],
    reps: int,
    timeout: float,
    log: Path,
    llama_server_binary: Optional[Path] = None,
    llama_server_log: Optional[Path] = None,
    each_rep: Optional[Callable[[int], None]] = None,
) -> dict[str, Any]:
    """gRPC rounds and, with `llama_server_binary`, llama-server rounds on the same work, both
    servers up at once and rounds interleaved: for each repetition, for each concurrency, one
    round of each, the side that goes first alternating between repetitions. `each_rep(prompt
    tokens)` runs before each repetition's rounds (another measurement, interleaved too).
    Returns {"grpc": ..., "llama_server": ... or None, "llama_server_skipped": why or None,
    "check": ..., "prompt_tokens": ..., ...}."""
    out: dict[str, Any] = {"llama_server": None, "llama_server_skipped": None, "check": None}
    with contextlib.ExitStack() as stack:
        address, pid = stack.enter_context(serve(model, threads, n_ctx, parallel, log))
        client = stack.enter_context(Client(address, timeout=timeout))
        bias = end_of_generation_bias(client)
        options = CompletionOptions(n_predict, logit_bias=bias, cache_prompt=False)
        out["prompt_tokens"] = len(client.tokenize(PROMPT))
        out["eog_banned"] = len(bias)
        http: Optional[llama_server.Client] = None
        http_pid: Optional[int] = None
        if llama_server_binary is not None:
            try:
                http_log = llama_server_log or log.with_name("llama-server.log")
                port = free_port()
                http_pid = stack.enter_context(
                    llama_server.serve(llama_server_binary, model, threads, n_ctx, parallel, port, http_log)
                )
                http = llama_server.Client(port, timeout)
                out["check"] = same_work(client, http, options)
            except (RuntimeError, OSError, ValueError, KeyError) as e:
                out["llama_server_skipped"] = str(e)
                http = None
        starts: dict[str, Callable[[], ChunkStream]] = {"grpc": lambda: client.stream(PROMPT, options)}
        pids: dict[str, int] = {"grpc": pid}
        if http is not None and http_pid is not None:
            http_client = http
            starts["llama_server"] = lambda: http_client.stream(n_predict, bias)
            pids["llama_server"] = http_pid
        sides = list(starts)
        # Warm-up, as in process: first-touch of weights and buffers, and as many streams as the
        # largest round (threads, connections, every slot).
        run_round(client, CompletionOptions(8), 1)
        run_concurrent(lambda: client.stream(PROMPT, CompletionOptions(8)), max(concurrency))
        if http is not None:
            warm = http
            run_concurrent(lambda: warm.stream(8, {}), max(concurrency))
        rounds: dict[str, dict[str, list[dict[str, Any]]]] = {side: {str(n): [] for n in concurrency} for side in sides}
        for rep in range(reps):
            if each_rep is not None:
                each_rep(out["prompt_tokens"])
            order = sides if rep % 2 == 0 else sides[::-1]
            for streams in concurrency:
                for side in order:
                    other = [pids[s] for s in sides if s != side]
                    result = timed_round(starts[side], streams, pids[side], other[0] if other else None)
                    rounds[side][str(streams)].append(result)
        for side in sides:
            out[side] = {
                "concurrency": {n: summarize(rs) for n, rs in rounds[side].items()},
                "server_peak_rss_mb": peak_rss_mb(pids[side]),
            }
        # The benchmark process's own high-water mark: it is both sides' client.
        out["client_peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    return out
