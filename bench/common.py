"""What every benchmark column shares: the workload, per-stream timing and peak-RSS probes.

The same prompt and options go to the in-process API and the gRPC service; end-of-
generation tokens are banned so every stream decodes exactly `n_predict` tokens, as
llama-bench's tg test does.
"""

from __future__ import annotations

import argparse
import json

import math
import os
import platform
import statistics
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional, Protocol, TypeVar

PROMPT = (
    "Write a long, detailed story about a small crab who teaches itself to program "
    "computers on the beach. Once upon a time,"
)

# Special tokens that end generation in the catalogue models' vocabularies; the ones a
# model has (one token each) get a -inf bias so every stream runs to max_tokens.
END_OF_GENERATION_TEXTS = (
    "</s>",
    "<|endoftext|>",
    "<|im_end|>",
    "<|end|>",
    "<|eot_id|>",
    "<end_of_turn>",
    "<eos>",
    "<|file_sep|>",
    "<|fim_pad|>",
)


class Tokenizer(Protocol):
    def tokenize(self, text: str, add_special: bool = True, parse_special: bool = True) -> list[int]: ...


def end_of_generation_bias(model: Tokenizer) -> dict[int, float]:
    """-inf for each end-of-generation special token this model's vocabulary has."""
    bias: dict[int, float] = {}
    for text in END_OF_GENERATION_TEXTS:
        tokens = model.tokenize(text, False, True)
        if len(tokens) == 1:
            bias[tokens[0]] = -math.inf
    return bias


@dataclass
class StreamTiming:
    """One stream seen by its consumer: when it started, first and last chunk, tokens."""

    started: float
    first: Optional[float] = None
    last: Optional[float] = None
    tokens: int = 0
    first_tokens: int = 0
    chunks: int = 0
    # The engine's own view, from the final Completion's timings.
    engine_ttft_ms: float = 0.0
    engine_decode_tps: float = 0.0
    # When the stream was over for its consumer: the final message received too.
    ended: Optional[float] = None

    def chunk(self, total_tokens: int) -> None:
        """A chunk arrived; `total_tokens` is Chunk.n_tokens (cumulative)."""
        now = time.perf_counter()
        if self.first is None:
            self.first = now
            self.first_tokens = total_tokens
        self.last = now
        self.tokens = total_tokens
        self.chunks += 1

    @property
    def ttft_ms(self) -> float:
        return ((self.first or self.started) - self.started) * 1000.0

    @property
    def decode_tps(self) -> float:
        """Tokens after the first chunk's, over the time from the first to the last chunk."""
        if self.first is None or self.last is None or self.last <= self.first:
            return 0.0
        return (self.tokens - self.first_tokens) / (self.last - self.first)


class ChunkStream(Protocol):
    """`Llama.stream()`, `Client.stream()` and `Client.chat_stream()` alike: chunks, then `.completion`."""

    @property
    def completion(self) -> Any: ...

    def __iter__(self) -> Iterator[Any]: ...


def time_stream(start: Callable[[], ChunkStream]) -> StreamTiming:
    """Run one stream to the end, timing each chunk as the consumer receives it."""
    timing = StreamTiming(time.perf_counter())
    stream = start()
    for chunk in stream:
        timing.chunk(int(chunk.n_tokens))
    timing.ended = time.perf_counter()
    if stream.completion is not None:
        timing.engine_ttft_ms = float(stream.completion.timings.time_to_first_token_ms)
        timing.engine_decode_tps = float(stream.completion.timings.decode_tokens_per_second)
    return timing


@dataclass
class RoundResult:
    """`streams` concurrent streams started together."""

    streams: int
    ttft_ms: float  # mean over the streams
    decode_tps_per_stream: float  # mean over the streams
    aggregate_tps: float  # every generated token / wall time of the round
    tokens: int
    min_tokens: int  # fewest tokens one stream got: < n_predict means a stream ended early
    chunks_per_token: float  # < 1 when chunks carry several tokens (a consumer falling behind)
    engine_ttft_ms: float
    engine_decode_tps: float

    @classmethod
    def of(cls, timings: Sequence[StreamTiming]) -> RoundResult:
        start = min(t.started for t in timings)
        end = max(t.last or t.started for t in timings)
        tokens = sum(t.tokens for t in timings)
        return cls(
            streams=len(timings),
            ttft_ms=statistics.fmean(t.ttft_ms for t in timings),
            decode_tps_per_stream=statistics.fmean(t.decode_tps for t in timings),
            aggregate_tps=tokens / (end - start) if end > start else 0.0,
            tokens=tokens,
            min_tokens=min(t.tokens for t in timings),
            chunks_per_token=sum(t.chunks for t in timings) / tokens if tokens else 0.0,
            engine_ttft_ms=statistics.fmean(t.engine_ttft_ms for t in timings),
            engine_decode_tps=statistics.fmean(t.engine_decode_tps for t in timings),
        )


@dataclass
class Summary:
    """The median of each metric over repeated rounds (robust to a noisy machine)."""

    streams: int
    ttft_ms: float
    decode_tps_per_stream: float
    aggregate_tps: float
    engine_ttft_ms: float
    engine_decode_tps: float
    rounds: list[dict[str, float]] = field(default_factory=list)

    @classmethod
    def of(cls, rounds: Sequence[RoundResult]) -> Summary:
        return cls(
            streams=rounds[0].streams,
            ttft_ms=statistics.median(r.ttft_ms for r in rounds),
            decode_tps_per_stream=statistics.median(r.decode_tps_per_stream for r in rounds),
            aggregate_tps=statistics.median(r.aggregate_tps for r in rounds),
            engine_ttft_ms=statistics.median(r.engine_ttft_ms for r in rounds),
            engine_decode_tps=statistics.median(r.engine_decode_tps for r in rounds),
            rounds=[asdict(r) for r in rounds],
        )


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0-100) of `values`, linear between the closest ranks (numpy's
    default); 0.0 for no values."""
    ordered = sorted(values)
    if not ordered:
        return 0.0
    rank = (len(ordered) - 1) * q / 100.0
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def proc_status_mb(pid: int, field: str) -> Optional[float]:
    """A kB field of /proc/PID/status (VmRSS, VmHWM, ...) in MB; None where there is no answer."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return None


def peak_rss_mb(pid: int) -> Optional[float]:
    """A live process's peak resident set (VmHWM), in MB."""
    return proc_status_mb(pid, "VmHWM")


def load_average() -> Optional[tuple[float, float, float]]:
    """How busy the machine was: numbers taken on a shared, loaded machine are noisy."""
    try:
        return os.getloadavg()
    except OSError:
        return None


def write_results(results: dict[str, Any], raw: Path, doc: Path, report: Callable[[dict[str, Any]], str]) -> int:
    """End a benchmark run: note the load after it, write the raw numbers to `raw` and the
    report rendered from them to `doc`, print the report; 0, the exit status."""
    results["load_after"] = load_average()
    raw.write_text(json.dumps(results, indent=2))
    text = report(results)
    doc.write_text(text)
    print(text)
    return 0


def loadavg_text() -> str:
    load = load_average()
    return "?" if load is None else " ".join(f"{v:.2f}" for v in load)


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def proc_cpu_seconds(pid: int) -> Optional[float]:
    """User + system CPU time of a live process, every thread of it (/proc/PID/stat, clock
    ticks: 10 ms on most kernels); None where there is no answer."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()  # past "pid (comm)": comm may hold spaces
    except (OSError, IndexError):
        return None
    # utime and stime are the 14th and 15th fields; fields[0] here is the 3rd (state).
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def machine_busy_seconds() -> Optional[float]:
    """CPU time every process on the machine has used (user, nice, system, irq, softirq from
    /proc/stat's first line, all cores): around a round, minus the servers' and the client's,
    it is what anything else running took meanwhile; None where there is no answer."""
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()
    except OSError:
        return None
    if not fields or fields[0] != "cpu" or len(fields) < 8:
        return None
    user, nice, system, _idle, _iowait, irq, softirq = (int(v) for v in fields[1:8])
    return (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK")


def run_measured(cmd: list[str], timeout: float) -> tuple[int, str, str, float]:
    """Run to the end; (exit code, stdout, stderr, peak RSS in MB from the kernel's rusage).

    Killed with a RuntimeError after `timeout` seconds: on a starved machine a run can
    crawl, and a benchmark must end either way.
    """
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, text=True)
        deadline = time.monotonic() + timeout
        while True:
            # wait4 gives this child's own rusage (RUSAGE_CHILDREN would mix in every child).
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.monotonic() > deadline:
                proc.kill()
                proc.wait()
                raise RuntimeError(f"{os.path.basename(cmd[0])} ran past {timeout:.0f}s (machine too busy?); killed")
            time.sleep(0.05)
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        return proc.returncode, out.read(), err.read(), usage.ru_maxrss / 1024.0


def add_model_arguments(parser: argparse.ArgumentParser, default_model: str = "smollm2-135m") -> None:
    """--model and --threads, the same in every benchmark script."""
    parser.add_argument("--model", default=default_model, help="catalogue name or .gguf path (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="default: every core (%(default)s)")


T = TypeVar("T")


def together(run_one: Callable[[], T], n: int) -> tuple[float, list[T]]:
    """`n` runs of `run_one` on as many threads, begun together behind a barrier; (wall
    seconds from the start to the last one's end, their results). Raises if any failed."""
    barrier = threading.Barrier(n + 1)
    out: list[T] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def one() -> None:
        try:
            barrier.wait()
            result = run_one()
            with lock:
                out.append(result)
        except BaseException as e:  # re-raised below
            with lock:
                errors.append(e)

    threads = [threading.Thread(target=one) for _ in range(n)]
    for t in threads:
        t.start()
    barrier.wait()
    start = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    if errors:
        raise RuntimeError(f"{len(errors)} of {n} streams failed: {errors[0]!r}")
    return wall, out


def median_range(values: Sequence[float], fmt: str = "{:.1f}") -> str:
    """`median (min-max)`, as the reports print a cell."""
    return f"{fmt.format(statistics.median(values))} ({fmt.format(min(values))}-{fmt.format(max(values))})"

