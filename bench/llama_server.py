"""The llama-server column: llama.cpp's own HTTP server, built from the same third_party/llama.cpp
(bench/llama_bench.py builds it), as a subprocess, streamed over its SSE API by a minimal client.

The request matches the gRPC rounds' work: the same prompt (tokenized by the server with
BOS, as `Complete` does), `n_predict` tokens, the same end-of-generation token ids banned
(`logit_bias` `false` is -inf), greedy decoding with the engine's own sampler chain for
temperature 0 (`samplers: ["top_k"]`, `top_k: 1`), the prompt never taken from a cache
(`cache_prompt: false`). The client is `http.client`, a connection per stream, reading the
`data: {...}` lines; a stream's progress is the server's `tokens_predicted`.
"""

from __future__ import annotations

import http.client
import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from common import PROMPT

HOST = "127.0.0.1"


@dataclass(frozen=True)
class SseTimings:
    """What `common.time_stream` reads off a stream's completion, from llama-server's `timings`."""

    time_to_first_token_ms: float  # llama-server's prompt_ms: prompt processing only, no queueing
    decode_tokens_per_second: float  # predicted_per_second: predicted_n / time after the first token


@dataclass(frozen=True)
class SseCompletion:
    timings: SseTimings
    tokens_predicted: int
    stop_type: str
    final: dict[str, Any] = field(repr=False)


@dataclass(frozen=True)
class SseChunk:
    n_tokens: int  # cumulative generated tokens, the server's `tokens_predicted`


class Connections:
    """HTTP/1.1 connections to one server: a new one per stream. (llama-server's HTTP library
    closes a connection idle for 5 s, shorter than the other side's rounds, so a pool would
    reconnect for most streams anyway; a localhost connect is ~0.1 ms of the TTFT.)"""

    def __init__(self, port: int, timeout: float) -> None:
        self.port = port
        self.timeout = timeout

    def open(self) -> http.client.HTTPConnection:
        return http.client.HTTPConnection(HOST, self.port, timeout=self.timeout)

    def post(self, path: str, body: Mapping[str, Any]) -> dict[str, Any]:
        """One non-streamed request; its JSON reply."""
        conn = self.open()
        try:
            conn.request("POST", path, json.dumps(body).encode(), {"Content-Type": "application/json"})
            resp = conn.getresponse()
            data = resp.read()
        finally:
            conn.close()
        if resp.status != 200:
            raise RuntimeError(f"llama-server {path}: HTTP {resp.status}: {data[:500]!r}")
        reply: dict[str, Any] = json.loads(data)
        return reply


def completion_body(
    prompt: str, n_predict: int, banned: Mapping[int, float], stream: bool = True, return_tokens: bool = False
) -> dict[str, Any]:
    """A `POST /completion` body doing the gRPC rounds' work (see the module docstring)."""
    return {
        "prompt": prompt,
        "n_predict": n_predict,
        "stream": stream,
        "temperature": 0.0,
        "samplers": ["top_k"],
        "top_k": 1,
        "logit_bias": [[token, False] for token in sorted(banned)],
        "cache_prompt": False,
        "return_tokens": return_tokens,
    }


def events(connections: Connections, body: bytes) -> Iterator[dict[str, Any]]:
    """The JSON events of one streamed `POST /completion`, the final (`stop`) one included;
    raises on an HTTP error or an error event."""
    conn = connections.open()
    try:
        conn.request("POST", "/completion", body, {"Content-Type": "application/json"})
        resp = conn.getresponse()
        if resp.status != 200:
            raise RuntimeError(f"llama-server /completion: HTTP {resp.status}: {resp.read()[:500]!r}")
        for line in resp:  # http.client undoes the chunked transfer coding
            if not line.startswith(b"data: ") or line[6:].strip() == b"[DONE]":
                continue
            event: dict[str, Any] = json.loads(line[6:])
            if "error" in event:
                raise RuntimeError(f"llama-server stream error: {event['error']}")
            yield event
    finally:
        conn.close()


class SseStream:
    """One streamed completion; iterating yields a chunk per token event, then `.completion` is set.
    Satisfies `common.ChunkStream`."""

    def __init__(self, connections: Connections, body: bytes) -> None:
        self._connections = connections
        self._body = body
        self.completion: Optional[SseCompletion] = None

    def __iter__(self) -> Iterator[SseChunk]:
        for event in events(self._connections, self._body):
            if event.get("stop"):
                timings = event.get("timings") or {}
                prompt_ms, decode_tps = timings.get("prompt_ms", 0.0), timings.get("predicted_per_second", 0.0)
                self.completion = SseCompletion(
                    SseTimings(float(prompt_ms), float(decode_tps)),
                    int(event.get("tokens_predicted", 0)),
                    str(event.get("stop_type", "")),
                    event,
                )
            else:
                yield SseChunk(int(event["tokens_predicted"]))


def health_ok(port: int) -> bool:
    conn = http.client.HTTPConnection(HOST, port, timeout=2.0)
    try:
        conn.request("GET", "/health")
        return conn.getresponse().status == 200
    except OSError:
        return False
    finally:
        conn.close()


@contextmanager
def serve(
    binary: Path,
    model: str,
    threads: int,
    n_ctx: int,
    parallel: int,
    port: int,
    log: Path,
    timeout: float = 300.0,
    cache_ram: Optional[int] = 0,
    extra: tuple[str, ...] = (),
) -> Iterator[int]:
    """`llama-server` on 127.0.0.1:`port` with the gRPC server's engine settings (threads, one
    context of `n_ctx` shared by `parallel` slots with a KV cache per slot, batch 512, flash
    attention auto), until `/health` is 200; yields its pid. SIGTERM (then SIGKILL) on exit.

    `--cache-ram 0` turns off llama-server's host-memory prompt cache, which otherwise saves
    each idle slot's KV on every new request: work a cold, uncached request does not need.
    `cache_ram` is its size in MiB; None leaves the flag out (llama-server's default: on,
    8192 MiB, idle slots saved to it), for the prefix-cache scenario (bench/prefix.py).
    `extra`: more flags (bench/speculative.py's `--spec-type`).
    """
    cmd = [
        str(binary), "--host", HOST, "--port", str(port), "-m", model, "-t", str(threads), "-tb", str(threads),
        "-np", str(parallel), "-c", str(n_ctx), "-b", "512", "-ub", "512", "-fa", "auto", "--no-kv-unified",
        "--no-webui",
    ]  # fmt: skip
    if cache_ram is not None:
        cmd += ["--cache-ram", str(cache_ram)]
    cmd += extra
    print("+ " + " ".join(cmd), file=sys.stderr, flush=True)
    with log.open("wb") as log_file:
        proc = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + timeout
            while not health_ok(port):
                if proc.poll() is not None:
                    raise RuntimeError(f"llama-server exited with {proc.returncode} before serving (log: {log})")
                if time.monotonic() > deadline:
                    raise RuntimeError(f"llama-server did not become healthy within {timeout:.0f}s (log: {log})")
                time.sleep(0.2)
            yield proc.pid
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()


class Client:
    """The benchmark's llama-server client: streams, and a one-shot completion for the check."""

    def __init__(self, port: int, timeout: float) -> None:
        self.connections = Connections(port, timeout)

    def stream(self, n_predict: int, banned: Mapping[int, float], prompt: str = PROMPT) -> SseStream:
        return SseStream(self.connections, json.dumps(completion_body(prompt, n_predict, banned)).encode())

    def complete(self, n_predict: int, banned: Mapping[int, float], prompt: str = PROMPT) -> dict[str, Any]:
        """Not streamed, with the generated token ids (`tokens`): for the same-work check."""
        return self.connections.post("/completion", completion_body(prompt, n_predict, banned, False, True))
