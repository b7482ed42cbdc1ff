"""Soak test: one real `llama-crab serve` under mixed, hostile load for a bounded time.

    python bench/soak.py [--duration 600] [--seed 1] [--out bench/out/soak.json]

Starts one server on 127.0.0.1 (smollm2-135m, 4 slots, n_ctx 2048, a 64 KiB stream
buffer, a 20 s slow-reader timeout) and drives it with 16 worker threads (4x the slots),
each looping over randomly chosen scenarios (seeded):

  normal          Complete read to the end (8..96 tokens)
  cancel_queue    short prompt, cancelled 0-5 ms after the call starts (usually queued)
  cancel_prefill  long prompt (a few hundred tokens), cancelled after 0-5 ms
  cancel_decode   cancelled after 1-20 chunks
  deadline        a 50-500 ms deadline on a 200-token request
  killed_client   a child Python process opens a stream and is SIGKILLed 0.2-1.5 s later
  slow_reader     a small HTTP/2 window, logprobs 20, 0.05-0.5 s between reads; some stop
                  reading for 25 s so the server's slow-reader timeout cancels them
                  (at most 2 slow readers at once, so they cannot hold every slot)
  bad_request     max_tokens 0 or a bad grammar: must be INVALID_ARGUMENT

It checks, and exits 1 unless all hold:
  - no stuck stream: every call finished or failed by its own deadline + 10 s (a watchdog
    thread watches the calls in flight; deadlines alone are not trusted);
  - every outcome is one its scenario allows (no INTERNAL, UNKNOWN, UNAVAILABLE, ...), and
    the server's own llama_crab_requests_total counts no Complete as INTERNAL or UNKNOWN;
  - the server's RSS is flat (the last half of the run grows < max(5%, 10 MB) over the
    first sample after warm-up) and so is its open fd count (the last sample, taken idle
    after the load, <= the first after warm-up + 4);
  - after the load the server goes idle (no busy slot, empty queue), still answers a
    normal request with the same text as before the load, and exits 0 within 30 s of
    SIGTERM.
Every 10 s it samples the server's VmRSS, fd count and slot/queue gauges (/metrics).
Prints a markdown summary; writes every request's outcome and every sample to --out (the
server's log goes beside it, *.server.log). Exits 2 if the server never became SERVING.

Loopback only, every call has a deadline, and every wait is bounded: the run ends by itself,
at most about 2 minutes after --duration (drain, idle wait, final request, shutdown).
Throughput depends heavily on what else the machine runs (llama.cpp's threads degrade badly
when their cores are shared); the load average is recorded with the results.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import select
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

import grpc
from common import load_average, proc_status_mb
from service import free_port, serve_process

from llama_crab_client import Client, Completion, CompletionOptions, LlamaCrabError
from llama_crab_client.v1 import llama_crab_pb2 as pb
from llama_crab_client.v1 import llama_crab_pb2_grpc as pb_grpc

ROOT = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"
PARALLEL = 4
WORKERS = 4 * PARALLEL
CALL_DEADLINE_S = 60.0  # every call's own deadline
STUCK_MARGIN_S = 10.0  # a call alive this long past its deadline is stuck
SAMPLE_EVERY_S = 10.0
STALL_S = 25.0  # longer than --slow-reader-timeout, so the server cancels the stream
SLOW_READER_TIMEOUT_S = 20
SERVER_ARGS = [
    "--parallel", str(PARALLEL), "--n-ctx", "2048", "--max-queue", "64", "--threads", "2",
    "--stream-buffer-kib", "64", "--slow-reader-timeout", str(SLOW_READER_TIMEOUT_S),
    # Short enough that "exits within 30 s of SIGTERM" fails if a stream is left behind.
    "--grace", "10", "--log-level", "warning",
    # The prefix cache's RAM part grows to its budget by design (~5 MB/s under this load):
    # a small budget fills within the warm-up, so "RSS flat" afterwards tests for leaks.
    "--cache-ram", "32",
]  # fmt: skip

# Relative weights. killed_client stays under 1 in 10: each spawns a Python interpreter,
# which costs a 2-core machine real CPU.
SCENARIOS: dict[str, int] = {
    "normal": 30,
    "cancel_queue": 10,
    "cancel_prefill": 10,
    "cancel_decode": 12,
    "deadline": 10,
    "killed_client": 6,
    "slow_reader": 14,
    "bad_request": 5,
}
STALL_SHARE = 0.3  # of slow readers that stop reading for STALL_S
# A slow reader holds its (paused) slot for up to its whole deadline: more than 2 at once
# would leave the other scenarios almost no slot of the 4. One of them may be stalled.
MAX_SLOW_READERS = 2
MAX_STALLED = 1

# Outcomes each scenario may end with; anything else is a finding. "cut_at_end": the soak
# itself cancelled the call when the load stopped.
_DONE = {"completion:length", "completion:eos"}
ALLOWED: dict[str, set[str]] = {
    "normal": _DONE | {"status:DEADLINE_EXCEEDED"},
    "cancel_queue": _DONE | {"client_cancelled", "status:DEADLINE_EXCEEDED"},
    "cancel_prefill": _DONE | {"client_cancelled", "status:DEADLINE_EXCEEDED"},
    "cancel_decode": _DONE | {"client_cancelled", "status:DEADLINE_EXCEEDED"},
    "deadline": _DONE | {"status:DEADLINE_EXCEEDED"},
    "killed_client": {"killed", "child_exit:0"},
    # completion:cancelled: the server's slow-reader timeout ended it.
    "slow_reader": _DONE | {"completion:cancelled", "status:DEADLINE_EXCEEDED"},
    "bad_request": {"status:INVALID_ARGUMENT"},
}

SHORT_PROMPTS = (
    "The capital of France is",
    "Once upon a time, a small crab",
    "def fibonacci(n):",
    "The three primary colors are",
    "In 1969, the first humans",
    "A haiku about the sea:",
    "To make bread, you need",
    "The quick brown fox",
)
WORDS = (
    "river mountain crab shell ocean tide sand wave little program computer code beach "
    "sun moon star light night morning garden tree leaf wind rain cloud story teacher "
    "learn write read number loop function value memory quiet bright slowly carefully"
).split()
REFERENCE_PROMPT = "The capital of France is"
REFERENCE_OPTIONS = CompletionOptions(16)  # greedy: the same text every time, when alone

# Run by `killed_client` as `python -c CHILD address prompt`: prints "open" once the call
# is sent and "chunk" at the first response, so the parent knows where the kill landed.
CHILD = """
import sys, grpc
from llama_crab_client.v1 import llama_crab_pb2 as pb, llama_crab_pb2_grpc as pb_grpc
channel = grpc.insecure_channel(sys.argv[1])
stub = pb_grpc.LlamaCrabServiceStub(channel)
request = pb.CompleteRequest(text=sys.argv[2], options=pb.CompletionOptions(max_tokens=300))
responses = stub.Complete(request, timeout=60)
print("open", flush=True)
for i, _ in enumerate(responses):
    if i == 0:
        print("chunk", flush=True)
print("done", flush=True)
"""


# ---- bookkeeping -------------------------------------------------------------------------
@dataclass
class Call:
    """A call in flight, as the watchdog sees it."""

    id: int
    scenario: str
    worker: int
    started: float  # time.monotonic()
    deadline_s: float
    cancel: Optional[Callable[[], object]] = None  # set once the call object exists
    cut: bool = False  # cancelled by the soak's own end
    stuck: bool = False


@dataclass
class Record:
    """A finished call."""

    id: int
    scenario: str
    worker: int
    start_s: float  # since the load started
    duration_s: float
    outcome: str
    allowed: bool
    stuck: bool
    detail: dict[str, Any]


class Ledger:
    """Calls started, in flight and finished; shared by workers and the watchdog."""

    def __init__(self, t0: float) -> None:
        self.t0 = t0
        self._lock = threading.Lock()
        self._next_id = 0
        self.inflight: dict[int, Call] = {}
        self.records: list[Record] = []
        self.started: Counter[str] = Counter()
        self.stuck: list[dict[str, Any]] = []

    def begin(self, scenario: str, worker: int, deadline_s: float) -> Call:
        with self._lock:
            self._next_id += 1
            call = Call(self._next_id, scenario, worker, time.monotonic(), deadline_s)
            self.inflight[call.id] = call
            self.started[scenario] += 1
            return call

    def arm(self, call: Call, cancel: Callable[[], object]) -> None:
        """Give the watchdog (and the end of the load) a way to cancel this call."""
        with self._lock:
            call.cancel = cancel
        if call.cut:  # the load ended while the call was being set up
            cancel()

    def finish(self, call: Call, outcome: str, detail: dict[str, Any]) -> None:
        if call.cut and outcome not in ALLOWED[call.scenario]:
            detail = {**detail, "outcome_before_cut": outcome}
            outcome = "cut_at_end"
        allowed = outcome in ALLOWED[call.scenario] or outcome == "cut_at_end"
        now = time.monotonic()
        record = Record(
            call.id, call.scenario, call.worker, round(call.started - self.t0, 3), round(now - call.started, 3),
            outcome, allowed, call.stuck, detail,
        )  # fmt: skip
        with self._lock:
            self.inflight.pop(call.id, None)
            self.records.append(record)

    def overdue(self) -> list[Call]:
        """Calls past their deadline + margin not yet reported stuck; marks them stuck."""
        now = time.monotonic()
        found: list[Call] = []
        with self._lock:
            for call in self.inflight.values():
                if not call.stuck and now - call.started > call.deadline_s + STUCK_MARGIN_S:
                    call.stuck = True
                    found.append(call)
                    self.stuck.append(
                        {"id": call.id, "scenario": call.scenario, "worker": call.worker,
                         "elapsed_s": round(now - call.started, 1), "deadline_s": call.deadline_s}
                    )  # fmt: skip
        return found

    def cut_all(self) -> int:
        """The load is over: cancel whatever is still in flight. Returns how many."""
        with self._lock:
            calls = list(self.inflight.values())
            for call in calls:
                call.cut = True
        for call in calls:
            if call.cancel is not None:
                _quietly(call.cancel)
        return len(calls)

    def snapshot(self) -> tuple[list[Record], list[Call]]:
        with self._lock:
            return list(self.records), list(self.inflight.values())


def _quietly(action: Callable[[], object]) -> None:
    """Cancelling a call that just ended may raise; the call is over either way."""
    try:
        action()
    except Exception:
        pass


# ---- server probes -----------------------------------------------------------------------
def proc_rss_mb(pid: int) -> Optional[float]:
    """VmRSS (current resident set, not the peak) in MB; None once the process is gone."""
    return proc_status_mb(pid, "VmRSS")


def proc_fds(pid: int) -> Optional[int]:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return None


def scrape(metrics_port: int) -> dict[str, float]:
    """Every sample of /metrics, keyed by name{labels} as exposed; {} when unreachable."""
    try:
        with urllib.request.urlopen(f"http://{HOST}:{metrics_port}/metrics", timeout=5.0) as reply:
            text = reply.read().decode("utf-8")
    except OSError:
        return {}
    samples: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        key, _, value = line.rpartition(" ")
        try:
            samples[key] = float(value)
        except ValueError:
            continue
    return samples


@dataclass
class Sample:
    t_s: float  # since the load started
    rss_mb: Optional[float]
    fds: Optional[int]
    busy_slots: Optional[float]
    paused_slots: Optional[float]
    queue_depth: Optional[float]
    slow_reader_pauses: Optional[float]
    slow_reader_cancels: Optional[float]
    inflight_calls: int
    phase: str  # "idle-before", "load", "idle-after"


def take_sample(pid: int, metrics_port: int, t0: float, inflight: int, phase: str) -> Sample:
    m = scrape(metrics_port)
    return Sample(
        t_s=round(time.monotonic() - t0, 1),
        rss_mb=proc_rss_mb(pid),
        fds=proc_fds(pid),
        busy_slots=m.get("llama_crab_busy_slots"),
        paused_slots=m.get("llama_crab_paused_slots"),
        queue_depth=m.get("llama_crab_queue_depth"),
        slow_reader_pauses=m.get("llama_crab_slow_reader_pauses_total"),
        slow_reader_cancels=m.get("llama_crab_slow_reader_cancels_total"),
        inflight_calls=inflight,
        phase=phase,
    )


# ---- the server --------------------------------------------------------------------------
@dataclass
class Server:
    proc: subprocess.Popen[bytes]
    address: str
    metrics_port: int
    log: Path


@contextmanager
def start_server(model: str, log: Path) -> Iterator[Server]:
    """`llama-crab serve` until SERVING; SIGKILLed on the way out if still running (the
    clean SIGTERM shutdown is checked, and timed, by `stop_server`)."""
    metrics_port = free_port()
    with serve_process(model, log, "--metrics-port", str(metrics_port), *SERVER_ARGS) as (proc, address):
        yield Server(proc, address, metrics_port, log)


def stop_server(server: Server, timeout: float = 30.0) -> tuple[Optional[int], float]:
    """SIGTERM; (exit code or None if it had to be killed, seconds it took)."""
    start = time.monotonic()
    server.proc.send_signal(signal.SIGTERM)
    try:
        code: Optional[int] = server.proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        server.proc.kill()
        server.proc.wait()
        code = None
    return code, round(time.monotonic() - start, 2)


# ---- scenarios ---------------------------------------------------------------------------
@dataclass
class Context:
    """What every worker shares."""

    address: str
    client: Client  # one channel for the ordinary calls, multiplexed as a real client would
    raw: pb_grpc.LlamaCrabServiceStub  # for requests the client would refuse before sending
    ledger: Ledger
    stop: threading.Event
    slow_readers: threading.BoundedSemaphore = field(
        default_factory=lambda: threading.BoundedSemaphore(MAX_SLOW_READERS)
    )
    stalls: threading.BoundedSemaphore = field(default_factory=lambda: threading.BoundedSemaphore(MAX_STALLED))


Outcome = tuple[str, dict[str, Any]]


def short_prompt(rng: random.Random) -> str:
    # A random word after a fixed opening: the prompts differ, but share a cacheable prefix.
    return f"{rng.choice(SHORT_PROMPTS)} {rng.choice(WORDS)}"


def long_prompt(rng: random.Random) -> str:
    """About 250-300 tokens: long enough that prefill takes a while, short of a 512-token slot."""
    return " ".join(rng.choice(WORDS) for _ in range(240)) + ". Summarize:"


def completion_outcome(c: Completion, max_tokens: int) -> Outcome:
    detail: dict[str, Any] = {"tokens": c.usage.completion_tokens, "max_tokens": max_tokens}
    if c.usage.completion_tokens > max_tokens or len(c.token_ids) != c.usage.completion_tokens:
        return "bad_completion", detail
    return f"completion:{c.stop_reason.value}", detail


def code_of(error: BaseException) -> str:
    """The gRPC status name of a failed call, from a raw grpc error or a client exception."""
    if isinstance(error, grpc.Call):
        return str(error.code().name)
    if isinstance(error, LlamaCrabError):
        if error.status != "UNKNOWN":
            return error.status
        # Codes without an exception type of their own arrive as "NAME: message".
        head = str(error).split(":", 1)[0]
        return head if head in grpc.StatusCode.__members__ else "UNKNOWN"
    return "UNKNOWN"


def run_normal(ctx: Context, call: Call, rng: random.Random) -> Outcome:
    max_tokens = rng.randint(8, 96)
    options = CompletionOptions(max_tokens, temperature=rng.choice((0.0, 0.8)), seed=rng.randrange(2**31))
    with ctx.client.stream(short_prompt(rng), options, timeout=call.deadline_s) as stream:
        ctx.ledger.arm(call, stream.close)
        for _ in stream:
            pass
        assert stream.completion is not None
        return completion_outcome(stream.completion, max_tokens)


def run_cancel_early(ctx: Context, call: Call, rng: random.Random, prompt: str) -> Outcome:
    """Cancel 0-5 ms in: the request is queued, or in prefill for a long prompt."""
    delay = rng.uniform(0.0, 0.005)
    stream = ctx.client.stream(prompt, CompletionOptions(32), timeout=call.deadline_s)
    ctx.ledger.arm(call, stream.close)
    ctx.stop.wait(delay)
    stream.close()
    return "client_cancelled", {"delay_ms": round(delay * 1000, 2)}


def run_cancel_decode(ctx: Context, call: Call, rng: random.Random) -> Outcome:
    prompt = long_prompt(rng) if rng.random() < 0.3 else short_prompt(rng)
    max_tokens = rng.randint(64, 200)
    after = rng.randint(1, 20)
    with ctx.client.stream(prompt, CompletionOptions(max_tokens), timeout=call.deadline_s) as stream:
        ctx.ledger.arm(call, stream.close)
        chunks = 0
        for _ in stream:
            chunks += 1
            if chunks >= after:
                break
        if stream.completion is not None:  # it ended before `after` chunks
            return completion_outcome(stream.completion, max_tokens)
        stream.close()
        return "client_cancelled", {"chunks": chunks}


def run_deadline(ctx: Context, call: Call, rng: random.Random) -> Outcome:
    timeout = rng.uniform(0.05, 0.5)
    call.deadline_s = timeout  # the watchdog holds this call to its own, short deadline
    with ctx.client.stream(short_prompt(rng), CompletionOptions(200), timeout=timeout) as stream:
        ctx.ledger.arm(call, stream.close)
        for _ in stream:
            pass
        assert stream.completion is not None
        outcome, detail = completion_outcome(stream.completion, 200)
        return outcome, {**detail, "timeout_ms": round(timeout * 1000)}


def _wait_line(stream: Any, want: bytes, timeout: float, stop: threading.Event) -> bool:
    """Wait (bounded, and no longer than the load lasts) for the child to print `want`."""
    end = time.monotonic() + timeout
    while time.monotonic() < end and not stop.is_set():
        ready, _, _ = select.select([stream], [], [], 0.2)
        if ready:
            return bool(stream.readline().strip() == want)
    return False


def run_killed_client(ctx: Context, call: Call, rng: random.Random) -> Outcome:
    """A client process that dies without a word: the server must notice and free the slot."""
    with tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(
            [sys.executable, "-c", CHILD, ctx.address, short_prompt(rng)], stdout=subprocess.PIPE, stderr=err
        )
        try:
            ctx.ledger.arm(call, proc.kill)
            assert proc.stdout is not None
            if not _wait_line(proc.stdout, b"open", 30.0, ctx.stop):
                proc.kill()
                proc.wait()
                if ctx.stop.is_set():  # the load ended while the child was starting
                    return "cut_at_end", {}
                err.seek(0)
                return "child_no_open", {"exit": proc.returncode, "stderr": err.read()[-500:].decode(errors="replace")}
            delay = rng.uniform(0.2, 1.5)
            ctx.stop.wait(delay)
            outcome = "killed"
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
            else:
                outcome = f"child_exit:{proc.returncode}"
            proc.wait(timeout=10)
            rest = proc.stdout.read()
            err.seek(0)
            detail: dict[str, Any] = {"delay_ms": round(delay * 1000), "had_chunk": b"chunk" in rest}
            if outcome not in ("killed", "child_exit:0"):
                detail["stderr"] = err.read()[-500:].decode(errors="replace")
            return outcome, detail
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            if proc.stdout is not None:
                proc.stdout.close()


# Small HTTP/2 windows (no BDP growth, 16 KiB lookahead): a reader that stops makes the
# server's writes wait, so the engine's backpressure is what is tested, not client memory.
# A local subchannel pool gives each slow reader its own connection, as separate clients have.
SLOW_CHANNEL_OPTIONS = [
    ("grpc.http2.bdp_probe", 0),
    ("grpc.http2.lookahead_bytes", 16384),
    ("grpc.use_local_subchannel_pool", 1),
]


def run_slow_reader(ctx: Context, call: Call, rng: random.Random) -> Outcome:
    stall = rng.random() < STALL_SHARE and ctx.stalls.acquire(blocking=False)
    request = pb.CompleteRequest(text=short_prompt(rng), options=pb.CompletionOptions(max_tokens=300, logprobs=20))
    messages = 0
    try:
        with grpc.insecure_channel(ctx.address, options=SLOW_CHANNEL_OPTIONS) as channel:
            responses = pb_grpc.LlamaCrabServiceStub(channel).Complete(request, timeout=call.deadline_s)
            ctx.ledger.arm(call, responses.cancel)
            for message in responses:
                messages += 1
                if message.WhichOneof("response") == "completion":
                    final = message.completion
                    reason = pb.StopReason.Name(final.stop_reason).removeprefix("STOP_REASON_").lower()
                    detail = {"messages": messages, "tokens": final.usage.completion_tokens, "stalled": stall}
                    return f"completion:{reason}", detail
                pause = STALL_S if stall and messages == 1 else rng.uniform(0.05, 0.5)
                if ctx.stop.wait(pause):
                    responses.cancel()
                    return "cut_at_end", {"messages": messages, "stalled": stall}
            return "no_final_completion", {"messages": messages, "stalled": stall}
    except grpc.RpcError as e:
        return f"status:{code_of(e)}", {"messages": messages, "stalled": stall}
    finally:
        if stall:
            ctx.stalls.release()


def run_bad_request(ctx: Context, call: Call, rng: random.Random) -> Outcome:
    """Invalid on purpose, through the raw stub (the client would refuse max_tokens 0 itself)."""
    kind = rng.choice(("max_tokens_0", "bad_grammar", "undefined_rule"))
    options = {
        "max_tokens_0": pb.CompletionOptions(max_tokens=0),
        "bad_grammar": pb.CompletionOptions(max_tokens=8, grammar='root ::= "a" | ('),
        "undefined_rule": pb.CompletionOptions(max_tokens=8, grammar="root ::= missing"),
    }[kind]
    responses = ctx.raw.Complete(pb.CompleteRequest(text=short_prompt(rng), options=options), timeout=call.deadline_s)
    ctx.ledger.arm(call, responses.cancel)
    try:
        messages = sum(1 for _ in responses)
    except grpc.RpcError as e:
        return f"status:{code_of(e)}", {"kind": kind}
    return "accepted", {"kind": kind, "messages": messages}


def run_scenario(ctx: Context, scenario: str, call: Call, rng: random.Random) -> Outcome:
    if scenario == "normal":
        return run_normal(ctx, call, rng)
    if scenario == "cancel_queue":
        return run_cancel_early(ctx, call, rng, short_prompt(rng))
    if scenario == "cancel_prefill":
        return run_cancel_early(ctx, call, rng, long_prompt(rng))
    if scenario == "cancel_decode":
        return run_cancel_decode(ctx, call, rng)
    if scenario == "deadline":
        return run_deadline(ctx, call, rng)
    if scenario == "killed_client":
        return run_killed_client(ctx, call, rng)
    if scenario == "slow_reader":
        return run_slow_reader(ctx, call, rng)
    return run_bad_request(ctx, call, rng)


def one_call(ctx: Context, scenario: str, worker: int, rng: random.Random) -> None:
    call = ctx.ledger.begin(scenario, worker, CALL_DEADLINE_S)
    try:
        outcome, detail = run_scenario(ctx, scenario, call, rng)
    except (LlamaCrabError, grpc.RpcError) as e:
        outcome, detail = f"status:{code_of(e)}", {"message": str(e)[:200]}
    except Exception as e:  # the soak's own bug, or a broken client: counted, never fatal
        outcome, detail = f"client_error:{type(e).__name__}", {"message": str(e)[:200]}
    ctx.ledger.finish(call, outcome, detail)


def pick_scenario(ctx: Context, rng: random.Random) -> str:
    """A weighted random scenario; not slow_reader while MAX_SLOW_READERS are running
    (the caller releases `ctx.slow_readers` after a slow_reader call)."""
    names = list(SCENARIOS)
    scenario = rng.choices(names, list(SCENARIOS.values()))[0]
    if scenario == "slow_reader" and not ctx.slow_readers.acquire(blocking=False):
        others = [n for n in names if n != "slow_reader"]
        scenario = rng.choices(others, [SCENARIOS[n] for n in others])[0]
    return scenario


def worker(ctx: Context, index: int, seed: int) -> None:
    rng = random.Random(seed * 1000 + index)  # each worker its own reproducible sequence
    while not ctx.stop.is_set():
        scenario = pick_scenario(ctx, rng)
        try:
            one_call(ctx, scenario, index, rng)
        finally:
            if scenario == "slow_reader":
                ctx.slow_readers.release()


# ---- background threads ------------------------------------------------------------------
def watchdog(ledger: Ledger, done: threading.Event) -> None:
    """Flags calls alive past deadline + margin, and cancels them so the worker moves on."""
    while not done.wait(1.0):
        for call in ledger.overdue():
            print(f"STUCK: call {call.id} ({call.scenario}) past its deadline + {STUCK_MARGIN_S:.0f}s",
                  file=sys.stderr, flush=True)  # fmt: skip
            if call.cancel is not None:
                _quietly(call.cancel)


def sampler(server: Server, ctx: Context, samples: list[Sample], done: threading.Event) -> None:
    ledger = ctx.ledger
    while not done.wait(SAMPLE_EVERY_S):
        _, inflight = ledger.snapshot()
        phase = "drain" if ctx.stop.is_set() else "load"
        sample = take_sample(server.proc.pid, server.metrics_port, ledger.t0, len(inflight), phase)
        samples.append(sample)
        print(f"  t={sample.t_s:5.0f}s rss={sample.rss_mb} MB fds={sample.fds} busy={sample.busy_slots} "
              f"paused={sample.paused_slots} queue={sample.queue_depth} in flight={sample.inflight_calls} "
              f"done={len(ledger.records)}", file=sys.stderr, flush=True)  # fmt: skip


# ---- the run -----------------------------------------------------------------------------
def say(message: str) -> None:
    """Progress on stderr, so a slow phase shows where the time goes."""
    print(message, file=sys.stderr, flush=True)


def reference_completion(client: Client, timeout: float) -> tuple[Completion, float]:
    """The fixed greedy request, and how many seconds it took (a loaded machine is slow)."""
    start = time.monotonic()
    completion = client.create_completion(REFERENCE_PROMPT, REFERENCE_OPTIONS, timeout=timeout)
    return completion, round(time.monotonic() - start, 2)


def drive_load(ctx: Context, server: Server, duration: float, seed: int, drain: float) -> dict[str, Any]:
    """Run the workers for `duration`, then stop them (bounded). Returns timing facts."""
    threads = [threading.Thread(target=worker, args=(ctx, i, seed), daemon=True, name=f"w{i}") for i in range(WORKERS)]
    for t in threads:
        t.start()
    ctx.stop.wait(duration)
    ctx.stop.set()
    # Workers stop at their next call; the long-running scenarios watch `stop` themselves.
    # What is still in flight after `drain` seconds is cancelled, and the workers get 10 s more.
    end = time.monotonic() + drain
    for t in threads:
        t.join(max(0.0, end - time.monotonic()))
    cut = ctx.ledger.cut_all()
    end = time.monotonic() + STUCK_MARGIN_S
    for t in threads:
        t.join(max(0.0, end - time.monotonic()))
    alive = [t.name for t in threads if t.is_alive()]
    return {"cut_at_end": cut, "workers_not_stopped": alive}


def wait_idle(server: Server, timeout: float) -> tuple[bool, dict[str, float]]:
    """Until no slot is busy or paused and nothing is queued; (reached, last gauges)."""
    end = time.monotonic() + timeout
    gauges: dict[str, float] = {}
    while True:
        m = scrape(server.metrics_port)
        gauges = {k: m.get(f"llama_crab_{k}", -1.0) for k in ("busy_slots", "paused_slots", "queue_depth")}
        if all(v == 0 for v in gauges.values()):
            return True, gauges
        if time.monotonic() > end:
            return False, gauges
        time.sleep(0.5)


def check_final(client: Client, reference: Completion) -> tuple[bool, dict[str, Any]]:
    """The server still answers, and with the text it gave before the load (greedy)."""
    try:
        final, seconds = reference_completion(client, 30.0)
    except LlamaCrabError as e:
        return False, {"error": f"{code_of(e)}: {e}"}
    ok = final.text == reference.text and final.stop_reason == reference.stop_reason
    return ok, {"text": final.text, "reference": reference.text, "stop_reason": final.stop_reason.value,
                "seconds": seconds}  # fmt: skip


# ---- judging -----------------------------------------------------------------------------
def judge_rss(samples: list[Sample], warmup: float, duration: float) -> dict[str, Any]:
    rss = [(s.t_s, s.rss_mb) for s in samples if s.rss_mb is not None and s.phase != "idle-before"]
    if not rss:
        return {"ok": False, "why": "no RSS samples"}
    base_t, base = next(((t, v) for t, v in rss if t >= warmup), rss[0])
    late = [v for t, v in rss if t >= duration / 2] or [rss[-1][1]]
    limit = max(0.05 * base, 10.0)
    growth = max(late) - base
    return {
        "ok": growth < limit, "baseline_mb": round(base, 1), "baseline_t_s": base_t,
        "last_half_max_mb": round(max(late), 1), "growth_mb": round(growth, 1), "limit_mb": round(limit, 1),
        "min_mb": round(min(v for _, v in rss), 1), "max_mb": round(max(v for _, v in rss), 1),
        "first_mb": round(rss[0][1], 1), "last_mb": round(rss[-1][1], 1),
    }  # fmt: skip


def judge_fds(samples: list[Sample], warmup: float) -> dict[str, Any]:
    fds = [(s.t_s, s.fds) for s in samples if s.fds is not None and s.phase != "idle-before"]
    if not fds:
        return {"ok": False, "why": "no fd samples"}
    base_t, base = next(((t, v) for t, v in fds if t >= warmup), fds[0])
    last = fds[-1][1]  # taken idle, after the load: connections of the load are closed
    return {"ok": last <= base + 4, "baseline": base, "baseline_t_s": base_t, "first": fds[0][1], "last": last,
            "max": max(v for _, v in fds)}  # fmt: skip


def tally(records: list[Record]) -> dict[str, Any]:
    by_scenario: dict[str, Counter[str]] = {name: Counter() for name in SCENARIOS}
    errors: Counter[str] = Counter()
    for r in records:
        by_scenario[r.scenario][r.outcome] += 1
        if r.outcome.startswith("status:"):
            errors[r.outcome.removeprefix("status:")] += 1
    unexpected = [asdict(r) for r in records if not r.allowed]
    return {
        "finished": {k: sum(v.values()) for k, v in by_scenario.items()},
        "outcomes": {k: dict(v) for k, v in by_scenario.items()},
        "errors_by_code": dict(errors),
        "unexpected": unexpected,
    }


def markdown(result: dict[str, Any]) -> str:
    t = result["tally"]
    lines = [
        f"## Soak: {result['duration_s']:.0f} s, {WORKERS} workers on {PARALLEL} slots, seed {result['seed']}",
        "",
        "| scenario | started | finished | outcomes |",
        "|---|---:|---:|---|",
    ]
    for name in SCENARIOS:
        outcomes = ", ".join(f"{k} {v}" for k, v in sorted(t["outcomes"][name].items()))
        lines.append(f"| {name} | {result['started'].get(name, 0)} | {t['finished'][name]} | {outcomes} |")
    total = sum(t["finished"].values())
    lines.append(f"| **all** | {sum(result['started'].values())} | {total} | |")
    errors = ", ".join(f"{k} {v}" for k, v in sorted(t["errors_by_code"].items())) or "none"
    rss, fds, c = result["rss"], result["fds"], result["counters"]
    checks = result["checks"]
    lines += [
        "",
        f"- calls finished: {total} ({total / max(result['duration_s'], 1):.1f}/s), "
        f"{sum(r['outcome'].startswith('completion:') for r in result['requests'])} with a final Completion",
        f"- errors by code (client side): {errors}",
        "- Complete RPCs by code (server side): "
        + (", ".join(f"{k} {v}" for k, v in sorted(c["server_codes"].items())) or "none"),
        f"- unexpected outcomes: {len(t['unexpected'])}",
        f"- stuck streams: {len(result['stuck'])}",
        f"- RSS MB: min {rss.get('min_mb')}, max {rss.get('max_mb')}, first {rss.get('first_mb')}, "
        f"last {rss.get('last_mb')}; baseline {rss.get('baseline_mb')} at t={rss.get('baseline_t_s')}s, "
        f"last-half growth {rss.get('growth_mb')} (limit {rss.get('limit_mb')})",
        f"- fds: first {fds.get('first')}, baseline {fds.get('baseline')}, max {fds.get('max')}, last {fds.get('last')}",
        f"- slow-reader pauses {c.get('pauses')}, slow-reader cancels {c.get('cancels')}, "
        f"guarded failures {c.get('guarded_failures')}; client-side cancels {c.get('client_cancels')}, "
        f"killed clients {c.get('killed_clients')}",
        f"- server: idle after load {checks['server_idle']}, final request {checks['final_request']} "
        f"({result['final_request'].get('seconds')} s; {result['reference_s']} s before the load), "
        f"exit code {result['server_exit']['code']} in {result['server_exit']['seconds']} s",
        "",
        "| check | ok |",
        "|---|---|",
        *(f"| {name} | {'yes' if ok else '**NO**'} |" for name, ok in checks.items()),
    ]
    return "\n".join(lines)


def server_codes(metrics: dict[str, float]) -> dict[str, int]:
    """Finished Complete RPCs by status code, as the server counted them."""
    prefix = 'llama_crab_requests_total{code="'
    out: dict[str, int] = {}
    for key, value in metrics.items():
        if key.startswith(prefix) and 'method="Complete"' in key:
            code = key[len(prefix) :].split('"', 1)[0]
            out[code] = out.get(code, 0) + int(value)
    return out


def counters(metrics: dict[str, float], records: list[Record]) -> dict[str, Any]:
    return {
        "pauses": metrics.get("llama_crab_slow_reader_pauses_total"),
        "cancels": metrics.get("llama_crab_slow_reader_cancels_total"),
        "guarded_failures": metrics.get("llama_crab_guarded_failures_total"),
        "client_cancels": sum(r.outcome == "client_cancelled" for r in records),
        "killed_clients": sum(r.outcome == "killed" for r in records),
        "server_codes": server_codes(metrics),
        "server_completions": {k: v for k, v in metrics.items() if k.startswith("llama_crab_completions_total")},
    }


# ---- main --------------------------------------------------------------------------------
def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=600.0, help="seconds of load (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=1, help="seed of the scenario choices (default: %(default)s)")
    parser.add_argument("--model", default="smollm2-135m", help="catalogue name or .gguf path (default: %(default)s)")
    parser.add_argument(
        "--warmup", type=float, default=None, help="seconds before the RSS/fd baseline (default: 20%% of duration, 10-120)"
    )
    parser.add_argument(
        "--drain", type=float, default=None, help="seconds in-flight calls get to end after the load stops, "
        "before they are cancelled (default: 10%% of duration, 5-15)",
    )  # fmt: skip
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "out" / "soak.json", help="raw results (JSON)")
    args = parser.parse_args(argv)
    if args.duration <= 0:
        parser.error("--duration must be > 0")
    if args.warmup is None:
        args.warmup = min(max(0.2 * args.duration, 10.0), 120.0)
    if args.drain is None:
        args.drain = min(max(0.1 * args.duration, 5.0), 15.0)
    return args


def soak(args: argparse.Namespace, server: Server) -> dict[str, Any]:
    samples: list[Sample] = []
    with Client(server.address, timeout=CALL_DEADLINE_S) as client, grpc.insecure_channel(server.address) as raw:
        reference, reference_s = reference_completion(client, CALL_DEADLINE_S)
        say(f"reference request: {reference_s} s; load: {WORKERS} workers for {args.duration:.0f} s")
        ledger = Ledger(time.monotonic())
        ctx = Context(server.address, client, pb_grpc.LlamaCrabServiceStub(raw), ledger, threading.Event())
        samples.append(take_sample(server.proc.pid, server.metrics_port, ledger.t0, 0, "idle-before"))
        done = threading.Event()
        background = [
            threading.Thread(target=watchdog, args=(ledger, done), daemon=True),
            threading.Thread(target=sampler, args=(server, ctx, samples, done), daemon=True),
        ]
        for t in background:
            t.start()
        stopping = drive_load(ctx, server, args.duration, args.seed, args.drain)
        load_s = time.monotonic() - ledger.t0
        done.set()
        for t in background:
            t.join(SAMPLE_EVERY_S)
        say(f"load stopped ({stopping['cut_at_end']} calls cut); waiting for the server to go idle")
        idle, gauges = wait_idle(server, 30.0)
        samples.append(take_sample(server.proc.pid, server.metrics_port, ledger.t0, 0, "idle-after"))
        say(f"idle: {idle} {gauges}; final request")
        final_ok, final = check_final(client, reference)
        metrics = scrape(server.metrics_port)
        records, inflight = ledger.snapshot()
        # A call still in flight now outlived its cancel by STUCK_MARGIN_S: it is stuck too.
        stuck = ledger.stuck + [{"id": c.id, "scenario": c.scenario, "still_in_flight": True}
                                for c in inflight if not c.stuck]  # fmt: skip
    return {
        "records": records, "samples": samples, "stuck": stuck, "stopping": stopping, "load_s": load_s,
        "idle": idle, "idle_gauges": gauges, "final_ok": final_ok, "final": final, "metrics": metrics,
        "started": dict(ledger.started), "reference": reference.text, "reference_s": reference_s,
    }  # fmt: skip


def _exit_on_sigterm(signum: int, frame: object) -> None:
    # SystemExit unwinds through the finally blocks, so the server is not left running.
    raise SystemExit(128 + signum)


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    log = args.out.with_suffix(".server.log")
    wall = time.monotonic()
    try:
        with start_server(args.model, log) as server:
            run = soak(args, server)
            say("SIGTERM to the server")
            code, seconds = stop_server(server)
    except RuntimeError as e:  # the server never came up: nothing to soak
        print(f"soak: {e} (see {log})", file=sys.stderr)
        return 2
    records: list[Record] = run["records"]
    samples: list[Sample] = run["samples"]
    rss = judge_rss(samples, args.warmup, args.duration)
    fds = judge_fds(samples, args.warmup)
    tallied = tally(records)
    checks = {
        "no_stuck_streams": not run["stuck"],
        "no_unexpected_outcomes": not tallied["unexpected"],
        "rss_flat": bool(rss["ok"]),
        "fds_flat": bool(fds["ok"]),
        "server_idle": bool(run["idle"]),
        "final_request": bool(run["final_ok"]),
        # The server's own count: a call it failed as INTERNAL may reach the client as
        # anything (CANCELLED, nothing at all), so the client-side outcomes miss it.
        "no_server_internal_errors": not any(
            server_codes(run["metrics"]).get(code) for code in ("INTERNAL", "UNKNOWN")
        ),
        "server_exit_clean": code == 0,
    }
    result: dict[str, Any] = {
        "duration_s": args.duration, "load_s": round(run["load_s"], 1), "wall_s": round(time.monotonic() - wall, 1),
        "seed": args.seed, "model": args.model, "warmup_s": args.warmup, "drain_s": args.drain, "server_args": SERVER_ARGS,
        "workers": WORKERS, "scenario_weights": SCENARIOS, "load_average": load_average(),
        "started": run["started"], "tally": tallied, "stuck": run["stuck"], "stopping": run["stopping"],
        "rss": rss, "fds": fds, "counters": counters(run["metrics"], records),
        "idle_gauges": run["idle_gauges"], "final_request": run["final"], "reference_text": run["reference"],
        "reference_s": run["reference_s"],
        "server_exit": {"code": code, "seconds": seconds}, "server_log": str(log), "checks": checks,
        "samples": [asdict(s) for s in samples], "metrics_at_end": run["metrics"],
        "requests": [asdict(r) for r in records],
    }  # fmt: skip
    args.out.write_text(json.dumps(result, indent=1))
    print(markdown(result))
    print(f"\nraw data: {args.out}; server log: {log}")
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
