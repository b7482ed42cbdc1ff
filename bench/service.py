"""The gRPC column: `llama-crab serve` as a subprocess, driven by `llama_crab_client.Client`.

Concurrent streams share one channel (HTTP/2 multiplexing, as a real client would) and
start together behind a barrier.
"""

from __future__ import annotations

import resource
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any

import grpc
from common import (
    PROMPT,
    ChunkStream,
    RoundResult,
    StreamTiming,
    Summary,
    end_of_generation_bias,
    peak_rss_mb,
    time_stream,
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
        "--port", str(port), *args,
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
    barrier = threading.Barrier(streams)
    timings: list[StreamTiming] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def one() -> None:
        try:
            barrier.wait()
            timing = time_stream(start)
            with lock:
                timings.append(timing)
        except BaseException as e:  # reported below; a thread must not swallow it
            with lock:
                errors.append(e)

    threads = [threading.Thread(target=one) for _ in range(streams)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise RuntimeError(f"{len(errors)} of {streams} streams failed: {errors[0]!r}")
    return timings


def run_round(client: Client, options: CompletionOptions, streams: int) -> RoundResult:
    return RoundResult.of(run_concurrent(lambda: client.stream(PROMPT, options), streams))


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
) -> dict[str, Any]:
    with serve(model, threads, n_ctx, parallel, log) as (address, pid), Client(address, timeout=timeout) as client:
        options = CompletionOptions(n_predict, logit_bias=end_of_generation_bias(client))
        run_round(client, CompletionOptions(8), 1)  # warm-up, as in process
        results: dict[str, Any] = {}
        for streams in concurrency:
            rounds = [run_round(client, options, streams) for _ in range(reps)]
            results[str(streams)] = asdict(Summary.of(rounds))
        server_peak = peak_rss_mb(pid)
    return {
        "concurrency": results,
        "server_peak_rss_mb": server_peak,
        "client_peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
    }
