"""Decode beside a CPU-bound neighbour process: the thread governor vs fixed thread counts.

    python bench/busy_host.py [--model smollm2-135m] [--threads N] [--n-predict 256] [--reps 3]
    python bench/run.py --scenario busy [--model ...] [--threads N] [--reps 3]

ggml's compute threads meet at a barrier after every operation, so with threads == cores one
neighbour process that takes a core stalls them all. This measures one stream's decode rate
(engine-timed: `Completion.timings.decode_tokens_per_second`, --n-predict tokens with the
end-of-generation tokens banned, `cache_prompt=False`) in six configurations:

  (a) adaptive, quiet      --threads cores, the thread governor on (the default)
  (b) fixed, quiet         --threads cores, `adaptive_threads=False`
  (c) adaptive, hog        (a) with one CPU hog beside it
  (d) fixed, hog           (b) with one CPU hog beside it
  (e) 1 thread, quiet      one compute thread, fixed
  (f) 1 thread, hog        (e) with one CPU hog beside it
  (g)-(j)                  libgomp's passive wait policy (`OMP_WAIT_POLICY=PASSIVE`: threads waiting at a
                           barrier sleep at once instead of spinning first), governor off (g, h) and on
                           (i, j), quiet and beside the hog: the other lever, the wait policy

The hog is a separate process spinning on one core (`while time.monotonic() < end: pass`),
started before the measuring process and killed after it (try/finally), and bounded by its own
deadline besides. Each measurement is a fresh process that loads its own `Llama`, runs a
--settle-tokens stream (warm-up, and time for the governor to settle), then the measured
stream. Rounds are interleaved: per repetition each thread setting once quiet and once beside
the hog, the order rotating. Then, with the governor on, one process goes through quiet ->
hog started -> hog killed, reporting the thread count (`Llama.metrics().n_threads_active`)
and the decode rate in each phase; and, with --service (on by default), `llama-crab serve`
with `--adaptive-threads true` and `false`, one stream through `llama_crab_client.Client`,
quiet and beside the hog, the compute-thread gauge read from /metrics.

Writes docs/busy-host.md and bench/out/busy.json. Speed is measured here, never asserted in
tests; on a shared machine read the ratios and the ranges, not one number.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from common import (
    add_model_arguments,
    PROMPT,
    ChunkStream,
    cpu_name,
    end_of_generation_bias,
    loadavg_text,
    machine_busy_seconds,
    proc_cpu_seconds,
    run_measured,
    time_stream,
)

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench" / "out"
DOC = ROOT / "docs" / "busy-host.md"
N_PREDICT = 256
SETTLE_TOKENS = 128
N_CTX = 1024
HOST = "127.0.0.1"
# Targets from the issue: decode beside one hog >= 70% of quiet; the governor costs <= 3% quiet.
BUSY_TARGET = 0.70
QUIET_TARGET = 0.97

# The neighbour: one process spinning on a core until its own deadline (argv[1] seconds), so
# it ends even if the benchmark is killed before its `finally`.
HOG_CODE = "import sys, time\nend = time.monotonic() + float(sys.argv[1])\nwhile time.monotonic() < end:\n    pass\n"


@dataclass(frozen=True)
class Setting:
    """A way to run the compute threads, measured quiet and beside the hog."""

    name: str
    all_threads: bool  # --threads (every core by default), else 1
    adaptive: bool
    env: tuple[tuple[str, str], ...] = ()  # set before libgomp loads (it reads them once)

    def threads(self, threads: int) -> int:
        return threads if self.all_threads else 1

    def describe(self, threads: int) -> str:
        n = self.threads(threads)
        what = f"{n}, governor {'on' if self.adaptive else 'off'}" if n > 1 else "1, fixed"
        return what + "".join(f", `{k}={v}`" for k, v in self.env)


PASSIVE = (("OMP_WAIT_POLICY", "PASSIVE"),)
SETTINGS = {
    "adaptive": Setting("adaptive", True, True),
    "fixed": Setting("fixed", True, False),
    "one": Setting("one", False, False),
    # libgomp's wait policy: waiting threads sleep at once instead of spinning first.
    "passive": Setting("passive", True, False, PASSIVE),
    "adaptive-passive": Setting("adaptive-passive", True, True, PASSIVE),
}


@dataclass(frozen=True)
class Config:
    key: str
    label: str
    setting: str
    hog: bool


CONFIGS = (
    Config("a", "governor on, quiet", "adaptive", False),
    Config("b", "governor off, quiet", "fixed", False),
    Config("c", "governor on, hog", "adaptive", True),
    Config("d", "governor off, hog", "fixed", True),
    Config("e", "1 thread, quiet", "one", False),
    Config("f", "1 thread, hog", "one", True),
    Config("g", "passive wait, governor off, quiet", "passive", False),
    Config("h", "passive wait, governor off, hog", "passive", True),
    Config("i", "passive wait, governor on, quiet", "adaptive-passive", False),
    Config("j", "passive wait, governor on, hog", "adaptive-passive", True),
)


# ---- the neighbour ---------------------------------------------------------------------------


@contextmanager
def cpu_hog(active: bool, limit_s: float) -> Iterator[Optional[int]]:
    """One CPU-bound neighbour process while inside (its pid; None when not `active`).
    Killed on the way out; it also ends by itself after `limit_s` seconds. Raises if it
    was gone before the end (its deadline passed): the numbers would not be 'beside a hog'."""
    if not active:
        yield None
        return
    proc = subprocess.Popen([sys.executable, "-c", HOG_CODE, str(limit_s)])
    try:
        time.sleep(0.2)  # past the interpreter's start-up: spinning by now
        yield proc.pid
        if proc.poll() is not None:
            raise RuntimeError(f"the CPU hog ended early (exit {proc.returncode}): its {limit_s:.0f}s bound passed")
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


# ---- the measuring process (--worker) --------------------------------------------------------


class ThreadSampler:
    """`Llama.metrics().n_threads_active` every 50 ms on a thread: (seconds since start, threads)."""

    def __init__(self, read: Callable[[], int]) -> None:
        self._read = read
        self.t0 = time.perf_counter()
        self.samples: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append((time.perf_counter() - self.t0, self._read()))
            self._stop.wait(0.05)

    def __enter__(self) -> ThreadSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def now(self) -> float:
        return time.perf_counter() - self.t0

    def between(self, start: float, end: float) -> list[int]:
        return [n for t, n in self.samples if start <= t <= end]


def measured_stream(
    start: Callable[[], ChunkStream], threads_now: Callable[[], int], hog_pid: Optional[int]
) -> dict[str, Any]:
    """One stream to the end: its engine-timed decode rate, the compute threads at its end, and
    what else ran meanwhile: the hog's CPU share and everyone else's (in cores)."""
    machine_before, own_before = machine_busy_seconds(), time.process_time()
    hog_before = proc_cpu_seconds(hog_pid) if hog_pid else None
    timing = time_stream(start)
    machine_after, own_after = machine_busy_seconds(), time.process_time()
    hog_after = proc_cpu_seconds(hog_pid) if hog_pid else None
    wall = (timing.ended or timing.started) - timing.started
    hog_cpu = hog_after - hog_before if hog_before is not None and hog_after is not None else 0.0
    foreign: Optional[float] = None
    if machine_before is not None and machine_after is not None and wall > 0:
        foreign = max(0.0, (machine_after - machine_before) - (own_after - own_before) - hog_cpu) / wall
    return {
        "engine_decode_tps": timing.engine_decode_tps,
        "client_decode_tps": timing.decode_tps,
        "tokens": timing.tokens,
        "wall_s": wall,
        "threads_end": threads_now(),
        "hog_cores": hog_cpu / wall if hog_pid and wall > 0 else None,
        "foreign_cores": foreign,
        "own_cores": (own_after - own_before) / wall if wall > 0 else None,
    }


def worker(spec: dict[str, Any]) -> dict[str, Any]:
    """Load a `Llama` with the spec's threads; mode "measure": a settle stream, then the measured
    one (the hog, if any, is the parent's); mode "recovery": quiet, hog started, hog killed."""
    os.environ.update(spec.get("env") or {})  # before libgomp loads with the engine: it reads them once
    from llama_crab import CompletionOptions, Llama, LlamaParams

    params = LlamaParams(spec["model"], n_ctx=N_CTX, n_threads=spec["threads"], adaptive_threads=spec["adaptive"])
    started = time.perf_counter()
    with Llama.load(params) as llama:
        load_s = time.perf_counter() - started
        bias = end_of_generation_bias(llama)
        options = CompletionOptions(spec["n_predict"], logit_bias=bias, cache_prompt=False)
        settle = CompletionOptions(spec["settle_tokens"], logit_bias=bias, cache_prompt=False)

        def threads_now() -> int:
            return int(llama.metrics().n_threads_active)

        def stream(opts: CompletionOptions) -> Callable[[], ChunkStream]:
            return lambda: llama.stream(PROMPT, opts)

        out: dict[str, Any] = {"load_s": load_s, "eog_banned": len(bias), "prompt_tokens": len(llama.tokenize(PROMPT))}
        with ThreadSampler(threads_now) as sampler:
            if spec["mode"] == "measure":
                hog_pid = spec.get("hog_pid")
                time_stream(stream(settle))
                out["threads_after_settle"] = threads_now()
                t = sampler.now()
                out.update(measured_stream(stream(options), threads_now, hog_pid))
                seen = sampler.between(t, sampler.now())
                out["threads_min"], out["threads_max"] = min(seen or [0]), max(seen or [0])
            else:
                out["phases"] = recovery_phases(sampler, stream(options), stream(settle), threads_now, spec)
    return out


def recovery_phases(
    sampler: ThreadSampler,
    measured: Callable[[], ChunkStream],
    settle: Callable[[], ChunkStream],
    threads_now: Callable[[], int],
    spec: dict[str, Any],
) -> list[dict[str, Any]]:
    """Quiet; the hog started (two streams: while the governor reacts, and after); the hog
    killed (two streams again). Per phase: decode rate, threads seen, and for the changes the
    seconds from the hog's start (or end) to the first sample with the new count."""
    full = int(spec["threads"])
    phases: list[dict[str, Any]] = []

    def phase(name: str, hog_pid: Optional[int]) -> None:
        t = sampler.now()
        row = measured_stream(measured, threads_now, hog_pid)
        seen = sampler.between(t, sampler.now())
        row.update(phase=name, threads_min=min(seen or [0]), threads_max=max(seen or [0]))
        phases.append(row)

    def first(since: float, want: Callable[[int], bool]) -> Optional[float]:
        return next((t - since for t, n in sampler.samples if t >= since and want(n)), None)

    time_stream(settle)
    phase("quiet", None)
    with cpu_hog(True, spec["hog_limit_s"]) as hog_pid:
        hog_started = sampler.now()
        phase("hog started: 1st stream", hog_pid)
        phase("hog: 2nd stream", hog_pid)
        dropped = first(hog_started, lambda n: n < full)
    hog_killed = sampler.now()
    phase("hog killed: 1st stream", None)
    phase("after: 2nd stream", None)
    back = first(hog_killed, lambda n: n >= full)
    phases[1]["seconds_to_change"] = dropped
    phases[3]["seconds_to_change"] = back
    return phases


def run_worker(spec: dict[str, Any], timeout: float) -> dict[str, Any]:
    """`spec` in a fresh process (`--worker`); its JSON result."""
    OUT.mkdir(parents=True, exist_ok=True)
    out = OUT / f"busy.worker.{os.getpid()}.json"
    out.unlink(missing_ok=True)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec), "--worker-out", str(out)]
    try:
        code, _, err, _ = run_measured(cmd, timeout)
        if code != 0:
            raise RuntimeError(f"the measuring process failed (exit {code}): {err.strip()[-1500:]}")
        result: dict[str, Any] = json.loads(out.read_text())
        return result
    finally:
        out.unlink(missing_ok=True)


# ---- the six configurations, interleaved ------------------------------------------------------


def inprocess_rounds(
    model: str, threads: int, n_predict: int, settle_tokens: int, reps: int, timeout: float
) -> dict[str, list[dict[str, Any]]]:
    rounds: dict[str, list[dict[str, Any]]] = {c.key: [] for c in CONFIGS}
    by_setting = {(c.setting, c.hog): c for c in CONFIGS}
    names = list(SETTINGS)
    for rep in range(reps):
        shift = rep % len(names)
        for name in names[shift:] + names[:shift]:
            setting = SETTINGS[name]
            for hog in (False, True) if rep % 2 == 0 else (True, False):
                config = by_setting[(name, hog)]
                with cpu_hog(hog, timeout + 60) as hog_pid:
                    spec = {
                        "mode": "measure", "model": model, "threads": setting.threads(threads),
                        "adaptive": setting.adaptive, "env": dict(setting.env), "n_predict": n_predict,
                        "settle_tokens": settle_tokens, "hog_pid": hog_pid,
                    }  # fmt: skip
                    result = run_worker(spec, timeout)
                result["rep"] = rep
                rounds[config.key].append(result)
                print(
                    f"busy: rep {rep + 1} ({config.key}) {config.label}: "
                    f"{result['engine_decode_tps']:.1f} tok/s, {result['threads_end']} thread(s)",
                    file=sys.stderr,
                    flush=True,
                )
    return rounds


# ---- the service ------------------------------------------------------------------------------


def scrape_threads(metrics_port: int) -> Optional[float]:
    """The llama_crab_compute_threads gauge; None when unreadable."""
    try:
        with urllib.request.urlopen(f"http://{HOST}:{metrics_port}/metrics", timeout=5.0) as reply:
            text = reply.read().decode("utf-8")
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("llama_crab_compute_threads"):
            return float(line.rsplit(" ", 1)[1])
    return None


def service_rounds(
    model: str, threads: int, n_predict: int, settle_tokens: int, reps: int, timeout: float
) -> dict[str, list[dict[str, Any]]]:
    """Both servers up at once (an idle one sleeps); per repetition, each server quiet and beside
    the hog, orders alternating. A settle stream after each change of the hog, as in process."""
    from service import free_port, serve_process

    from llama_crab_client import Client, CompletionOptions

    rounds: dict[str, list[dict[str, Any]]] = {}
    with contextlib.ExitStack() as stack:
        servers: dict[str, tuple[Client, int, int]] = {}
        for side, flag in (("adaptive", "true"), ("fixed", "false")):
            metrics_port = free_port()
            proc, address = stack.enter_context(
                serve_process(
                    model, OUT / f"busy.{side}.server.log", "--threads", str(threads), "--adaptive-threads", flag,
                    "--n-ctx", str(N_CTX), "--parallel", "1", "--metrics-port", str(metrics_port),
                    "--log-level", "warning",
                )
            )  # fmt: skip
            servers[side] = (stack.enter_context(Client(address, timeout=timeout)), proc.pid, metrics_port)
        for side, (client, _pid, _port) in servers.items():
            for _ in client.stream(PROMPT, CompletionOptions(8)):  # warm-up
                pass
            for hog in (False, True):
                rounds[f"{side}, {'hog' if hog else 'quiet'}"] = []
        for rep in range(reps):
            sides = ("adaptive", "fixed") if rep % 2 == 0 else ("fixed", "adaptive")
            for side in sides:
                client, pid, metrics_port = servers[side]
                bias = end_of_generation_bias(client)
                options = CompletionOptions(n_predict, logit_bias=bias, cache_prompt=False)
                settle = CompletionOptions(settle_tokens, logit_bias=bias, cache_prompt=False)
                for hog in (False, True) if rep % 2 == 0 else (True, False):
                    with cpu_hog(hog, timeout + 60) as hog_pid:
                        time_stream(lambda: client.stream(PROMPT, settle))
                        server_before = proc_cpu_seconds(pid)
                        row = measured_stream(
                            lambda: client.stream(PROMPT, options), lambda: int(scrape_threads(metrics_port) or 0),
                            hog_pid,
                        )  # fmt: skip
                        server_after = proc_cpu_seconds(pid)
                    if server_before is not None and server_after is not None and row["wall_s"] > 0:
                        row["server_cores"] = (server_after - server_before) / row["wall_s"]
                        if row["foreign_cores"] is not None:  # the server is not "foreign"
                            row["foreign_cores"] = max(0.0, row["foreign_cores"] - row["server_cores"])
                    row["rep"] = rep
                    rounds[f"{side}, {'hog' if hog else 'quiet'}"].append(row)
                    print(
                        f"busy: service rep {rep + 1} {side}, {'hog' if hog else 'quiet'}: "
                        f"{row['engine_decode_tps']:.1f} tok/s, {row['threads_end']} thread(s)",
                        file=sys.stderr,
                        flush=True,
                    )
    return rounds


# ---- the run and its report -------------------------------------------------------------------


def run(
    model_name: str,
    model_path: str,
    threads: int,
    n_predict: int = N_PREDICT,
    reps: int = 3,
    timeout: float = 300.0,
    settle_tokens: int = SETTLE_TOKENS,
    with_service: bool = True,
    markdown: Path = DOC,
) -> dict[str, Any]:
    if threads < 2:
        raise ValueError("the busy-host scenario compares thread counts: --threads must be >= 2")
    OUT.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {
        "measured_at": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "config": {
            "model": model_name, "model_path": model_path, "threads": threads, "n_predict": n_predict,
            "settle_tokens": settle_tokens, "reps": reps, "n_ctx": N_CTX,
        },  # fmt: skip
        "environment": {"cpu": cpu_name(), "cores": os.cpu_count(), "load_before": loadavg_text()},
        "skipped": {},
    }
    results["inprocess"] = inprocess_rounds(model_path, threads, n_predict, settle_tokens, reps, timeout)
    spec = {
        "mode": "recovery", "model": model_path, "threads": threads, "adaptive": True, "n_predict": n_predict,
        "settle_tokens": settle_tokens, "hog_limit_s": timeout + 60,
    }  # fmt: skip
    results["recovery"] = run_worker(spec, timeout)["phases"]
    if with_service:
        try:
            results["service"] = service_rounds(model_path, threads, n_predict, settle_tokens, reps, timeout)
        except Exception as e:  # a missing piece or a failure skips the part, with the reason
            results["skipped"]["service"] = f"{e} (server logs: {OUT}/busy.*.server.log)"
    else:
        results["skipped"]["service"] = "left out with --no-service"
    results["environment"]["load_after"] = loadavg_text()
    results["summary"] = summarize(results)
    (OUT / "busy.json").write_text(json.dumps(results, indent=2, default=str))
    markdown.parent.mkdir(parents=True, exist_ok=True)
    markdown.write_text(report(results))
    return results


def _spread(values: Sequence[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def _paired(numerator: Sequence[dict[str, Any]], denominator: Sequence[dict[str, Any]]) -> dict[str, float]:
    """numerator / denominator per repetition (rounds run close together), median and range."""
    pairs = [(n["engine_decode_tps"], d["engine_decode_tps"]) for n, d in zip(numerator, denominator)]
    return _spread([n / d for n, d in pairs if d > 0] or [0.0])


# (name, numerator, denominator, what it says)
RATIOS = (
    ("c/a", "c", "a", "governor on: beside the hog / quiet"),
    ("d/b", "d", "b", "governor off: beside the hog / quiet"),
    ("a/b", "a", "b", "quiet: governor on / off (the governor's quiet cost)"),
    ("f/e", "f", "e", "1 thread: beside the hog / quiet"),
    ("f/a", "f", "a", "1 thread beside the hog / all threads quiet (the ceiling of any thread count)"),
    ("e/a", "e", "a", "quiet: 1 thread / all threads, governor on (what pinning fewer threads costs quiet)"),
    ("h/g", "h", "g", "passive wait, governor off: beside the hog / quiet"),
    ("g/b", "g", "b", "quiet: passive / default wait, governor off (the passive wait's quiet cost)"),
    ("j/i", "j", "i", "passive wait, governor on: beside the hog / quiet"),
    ("j/a", "j", "a", "passive wait + governor beside the hog / the default quiet"),
    ("i/a", "i", "a", "quiet: passive wait + governor / the default (governor on)"),
)


def summarize(results: dict[str, Any]) -> dict[str, Any]:
    rounds = results["inprocess"]
    configs = {
        key: {
            "engine_decode_tps": _spread([r["engine_decode_tps"] for r in rs]),
            "threads_end": sorted({int(r["threads_end"]) for r in rs}),
            "threads_min": min(int(r["threads_min"]) for r in rs),
            "threads_max": max(int(r["threads_max"]) for r in rs),
            "rounds_below_max": sum(1 for r in rs if int(r["threads_min"]) < int(r["threads_max"]) or
                                    int(r["threads_min"]) < results["config"]["threads"]),
            "threads_after_settle": sorted({int(r["threads_after_settle"]) for r in rs}),
            "hog_cores": _spread([r["hog_cores"] for r in rs if r["hog_cores"] is not None] or [0.0]),
            "foreign_cores_max": max((r["foreign_cores"] or 0.0) for r in rs),
        }
        for key, rs in rounds.items()
    }
    ratios = {name: _paired(rounds[n], rounds[d]) for name, n, d, _ in RATIOS}
    out: dict[str, Any] = {"configs": configs, "ratios": ratios}
    out["busy_met"] = ratios["c/a"]["median"] >= BUSY_TARGET
    out["quiet_met"] = ratios["a/b"]["median"] >= QUIET_TARGET
    out["ceiling_reaches_target"] = ratios["f/a"]["median"] >= BUSY_TARGET
    if "service" in results:
        svc = results["service"]
        out["service"] = {
            key: {
                "engine_decode_tps": _spread([r["engine_decode_tps"] for r in rs]),
                "threads_end": sorted({int(r["threads_end"]) for r in rs}),
            }
            for key, rs in svc.items()
        }
        out["service_ratios"] = {
            "adaptive: hog / quiet": _paired(svc["adaptive, hog"], svc["adaptive, quiet"]),
            "fixed: hog / quiet": _paired(svc["fixed, hog"], svc["fixed, quiet"]),
            "quiet: adaptive / fixed": _paired(svc["adaptive, quiet"], svc["fixed, quiet"]),
            "hog: adaptive / fixed": _paired(svc["adaptive, hog"], svc["fixed, hog"]),
        }
    return out


def _range(s: dict[str, float], digits: int = 1) -> str:
    return f"{s['median']:,.{digits}f} ({s['min']:,.{digits}f}–{s['max']:,.{digits}f})"


def _percent(s: dict[str, float]) -> str:
    return f"{s['median']:.0%} ({s['min']:.0%}–{s['max']:.0%})"


def _threads(values: Sequence[int]) -> str:
    return "/".join(str(v) for v in values)


def _seconds(value: Optional[float]) -> str:
    return "never" if value is None else f"{value:.1f} s"


def report(results: dict[str, Any]) -> str:
    cfg, env, summary = results["config"], results["environment"], results["summary"]
    configs, ratios = summary["configs"], summary["ratios"]
    threads = cfg["threads"]
    quiet = configs["a"]["engine_decode_tps"]["median"]
    hogged = configs["c"]["engine_decode_tps"]["median"]
    lines = [
        "# Decode on a busy host",
        "",
        f"Generated by `python bench/run.py --scenario busy --model {cfg['model']} --threads {threads} "
        f"--reps {cfg['reps']}` (or `python bench/busy_host.py` with the same options); do not edit by hand, "
        "run it again.",
        "",
        f"- Measured: {results['measured_at']} on {env['cpu']} ({env['cores']} cores), "
        f"load average before/after: {env['load_before']} / {env['load_after']}.",
        f"- Model: `{cfg['model']}`; one stream of {cfg['n_predict']} tokens (end-of-generation banned, greedy, "
        f"`cache_prompt=False`) after a {cfg['settle_tokens']}-token settle stream, engine-timed decode tok/s "
        f"(`Completion.timings.decode_tokens_per_second`); median (lowest–highest) of {cfg['reps']} interleaved "
        "rounds.",
        "- The hog: one separate process spinning on a core (`while time.monotonic() < end: pass`), started "
        "before the measuring process, killed after it.",
        "",
        "## The problem",
        "",
        "ggml's compute threads meet at a barrier after every operation of the graph. With as many threads as "
        "cores, a neighbour process that wants a core makes the kernel share one core between it and a compute "
        "thread; every barrier then waits for the thread that is off its core, so all threads run at the speed "
        "of the one that is descheduled.",
        "",
        "## In process (`Llama`)",
        "",
        "| | configuration | threads | decode tok/s | threads during the measured streams | hog's CPU (cores) |",
        "|---|---|---|---:|---:|---:|",
    ]
    for c in CONFIGS:
        s = configs[c.key]
        what = SETTINGS[c.setting].describe(threads)
        hog = _range(s["hog_cores"], 2) if c.hog else "–"
        lines.append(
            f"| ({c.key}) | {c.label} | {what} | {_range(s['engine_decode_tps'])} "
            f"| {s['threads_min']}–{s['threads_max']} "
            f"| {hog} |"
        )
    lines += [
        "",
        "Ratios per repetition (the rounds of one repetition run back to back), median (lowest–highest):",
        "",
        "| ratio | what | value | target |",
        "|---|---|---:|---|",
    ]
    targets = {
        "c/a": f"≥ {BUSY_TARGET:.0%} ({'met' if summary['busy_met'] else '**missed**'})",
        "a/b": f"≥ {QUIET_TARGET:.0%} ({'met' if summary['quiet_met'] else '**missed**'})",
    }
    for name, _, _, what in RATIOS:
        lines.append(f"| ({name.replace('/', ')/(')}) | {what} | {_percent(ratios[name])} | {targets.get(name, '')} |")
    foreign = max(s["foreign_cores_max"] for s in configs.values())
    quiet_ratio = ratios["a/b"]
    if quiet_ratio["min"] < QUIET_TARGET or quiet_ratio["max"] > 2 - QUIET_TARGET:
        kept = configs["a"]["threads_min"] == threads and configs["a"]["threads_max"] == threads
        lines += [
            "",
            f"The governor's quiet cost is below what this machine resolves: per repetition (a)/(b) spans "
            f"{quiet_ratio['min']:.0%}–{quiet_ratio['max']:.0%}, wider than the {1 - QUIET_TARGET:.0%} the target "
            "allows either way. "
            + (
                f"What it does quiet is seen directly: in every quiet round it kept all {threads} threads for the "
                "whole measured stream ((a)), so what it costs is its bookkeeping (two clock reads per decode, "
                "one read of /proc/stat per 0.5 s window)."
                if kept
                else "It also changed its thread count during a quiet round ((a)): see the table."
            ),
        ]
    lines += [
        "",
        f"The neighbour's side: beside {threads} fixed threads the hog got {_range(configs['d']['hog_cores'], 2)} "
        f"of a core, beside the governor {_range(configs['c']['hog_cores'], 2)}, beside 1 thread "
        f"{_range(configs['f']['hog_cores'], 2)}.",
        "",
        f"Anything else on the machine took at most {foreign:.2f} of a core during a measured stream "
        "(`/proc/stat` minus the measuring process and the hog).",
        "",
    ]
    ceiling = ratios["f/a"]["median"]
    if summary["busy_met"]:
        lines.append(
            f"Beside one hog the governor keeps {ratios['c/a']['median']:.0%} of the quiet rate "
            f"({hogged:.1f} vs {quiet:.1f} tok/s): the target (≥ {BUSY_TARGET:.0%}) is met."
        )
    else:
        lines.append(
            f"Beside one hog the governor keeps {ratios['c/a']['median']:.0%} of the quiet rate ({hogged:.1f} vs "
            f"{quiet:.1f} tok/s), against {ratios['d/b']['median']:.0%} with the thread count fixed: "
            f"the target (≥ {BUSY_TARGET:.0%}) is **not met**. "
            + (
                f"No thread count reaches it on this machine: the best one can do beside the hog is one thread "
                f"fewer, and one thread beside the hog runs at {ceiling:.0%} of {threads} threads quiet "
                f"((f)/(a)); the governor gets {ratios['c/a']['median'] / ceiling:.0%} of that ceiling. "
                f"With {threads} cores, one thread fewer is {1 / threads:.0%} of the compute gone; on a machine "
                "with more cores one thread fewer costs less."
                if not summary["ceiling_reaches_target"]
                else f"One thread fixed beside the hog does reach {ceiling:.0%} of quiet ((f)/(a)), so the governor "
                "leaves speed behind here (see the recovery timings: it needs time to react)."
            )
        )
    lines += [
        "",
        "## Reaction and recovery (governor on)",
        "",
        "One process: quiet, then the hog started (two streams), then the hog killed (two streams). "
        "The thread count is `Llama.metrics().n_threads_active`, sampled every 50 ms; the seconds are from the "
        "hog's start (or kill) to the first sample with the new count.",
        "",
        "| phase | decode tok/s | threads during the stream (min–max) | threads at the end | change after |",
        "|---|---:|---:|---:|---:|",
    ]
    for p in results["recovery"]:
        change = _seconds(p["seconds_to_change"]) if "seconds_to_change" in p else ""
        lines.append(
            f"| {p['phase']} | {p['engine_decode_tps']:.1f} | {p['threads_min']}–{p['threads_max']} "
            f"| {p['threads_end']} | {change} |"
        )
    if "service" in summary:
        svc, svc_ratios = summary["service"], summary["service_ratios"]
        lines += [
            "",
            "## The service (`llama-crab serve`)",
            "",
            f"`llama-crab serve --threads {threads} --adaptive-threads true|false --parallel 1 --n-ctx {N_CTX}`, "
            "both servers up at once (the idle one sleeps), one stream at a time through `llama_crab_client.Client` "
            "in the benchmark process (its client work shares the same cores); a settle stream after each change of "
            "the hog; threads from the `llama_crab_compute_threads` gauge (/metrics) after the stream.",
            "",
            "| server | decode tok/s | threads at the end |",
            "|---|---:|---:|",
        ]
        for key, s in svc.items():
            lines.append(f"| {key} | {_range(s['engine_decode_tps'])} | {_threads(s['threads_end'])} |")
        lines += ["", "| ratio | value |", "|---|---:|"]
        for key, s in svc_ratios.items():
            lines.append(f"| {key} | {_percent(s)} |")
    for part, why in results["skipped"].items():
        lines += ["", f"Skipped: {part}: {why}"]
    one_quiet = ratios["e/a"]["median"]
    lines += [
        "",
        "## The choice",
        "",
        "- **The governor is on by default** (`LlamaParams(adaptive_threads=True)`, `llama-crab serve "
        "--adaptive-threads true`). It times the scheduler thread (itself a compute thread) over 0.5 s windows of "
        "decoding: under 75% CPU of wall time for two windows in a row drops a thread (`llama_set_n_threads`); "
        "0.6 of a core idle for two windows takes one back. It never goes above `--threads`, never below 1, and "
        "judges only windows with decode work, so an idle server keeps its count. Quiet, governor on / off = "
        f"{_percent(ratios['a/b'])} ((a)/(b), target ≥ {QUIET_TARGET:.0%}); beside a hog it keeps "
        f"{ratios['c/a']['median']:.0%} of quiet where the fixed count keeps {ratios['d/b']['median']:.0%}.",
        f"- **Not fewer fixed threads**: one thread fewer would be safe beside a neighbour, but quiet it gives "
        f"up {1 - one_quiet:.0%} of decode here ((e)/(a) = {one_quiet:.0%}), on every request, to guard against a "
        "neighbour that may never come. The governor pays that only while a neighbour is there.",
        f"- **The wait policy**: ggml's barriers are OpenMP barriers here, so libgomp's wait policy decides "
        f"whether a thread that reaches one spins (the default, for a while) or sleeps at once "
        f"(`OMP_WAIT_POLICY=PASSIVE`). Passive, governor off: quiet {ratios['g/b']['median']:.0%} of the default "
        f"wait ((g)/(b)), beside the hog {ratios['h/g']['median']:.0%} of its quiet ((h)/(g)); passive with the "
        f"governor: beside the hog {ratios['j/a']['median']:.0%} of the default quiet ((j)/(a)), quiet "
        f"{ratios['i/a']['median']:.0%} of it ((i)/(a)). "
        + (
            "Passive waiting costs the quiet run more than the target allows, so the default wait stays."
            if ratios["g/b"]["median"] < QUIET_TARGET
            else "Passive waiting is within the quiet target; see the table for whether it beats the governor "
            "beside the hog."
        )
        + (
            f" With passive waiting the governor also misreads a quiet host: the scheduler thread sleeps at "
            f"every barrier, its CPU falls under 75% of wall time, and it dropped to {configs['i']['threads_min']} "
            f"thread(s) in {configs['i']['rounds_below_max']} of {cfg['reps']} quiet rounds with no neighbour at all "
            "((i)): the governor assumes the default (spinning) wait."
            if configs["i"]["threads_min"] < threads
            else ""
        ),
        "",
        "## `--threads` advice",
        "",
        "- On a host shared with other work, leave the governor on (the default) and `--threads` at the cores the "
        "server may use; watch `llama_crab_compute_threads` (or `Llama.metrics().n_threads_active`): below "
        "`--threads` means a neighbour is taking cores now.",
        "- When some cores are reserved for other work (pinned containers, `taskset`, a CPU quota), set "
        "`--threads` to the cores you own, not the host's count: the governor only takes threads away and never "
        "goes above `--threads`, and it reacts after about a second of decoding, so a standing neighbour is "
        "better left out of the count from the start.",
        "- On a dedicated host, `--adaptive-threads false` pins the count; there is nothing to gain from it but "
        "the governor's small bookkeeping.",
        "- More threads than cores never helps: every extra thread is one that waits off its core at every "
        "barrier.",
        "- Leave `OMP_WAIT_POLICY` unset: `PASSIVE` costs quiet decode far more than it saves beside a "
        "neighbour (above), and the governor reads its sleeping barriers as a busy host.",
        "",
        "## How it is measured",
        "",
        "- Each in-process measurement is a fresh process (`python bench/busy_host.py --worker ...`) that loads "
        f"its own `Llama` (`n_ctx={N_CTX}`, `n_threads`, `adaptive_threads`), runs a {cfg['settle_tokens']}-token "
        "stream (warm-up, and a second or more of decoding for the governor to react), then the measured stream; "
        "`OMP_WAIT_POLICY` is set in that process before the engine (and libgomp) loads. Rounds: per repetition "
        "each setting in the table (governor on, off, 1 thread, passive wait with the governor off and on) once "
        "quiet and once beside the hog, the settings' order rotating and quiet/hog alternating between "
        "repetitions. The threads column is `Llama.metrics().n_threads_active` sampled every 50 ms during the "
        "measured streams, lowest–highest over all rounds.",
        "- The hog's CPU share (in the table) and everything else's are taken around the measured stream from "
        "`/proc`: the hog's share shows what each setting does to the neighbour; spinning compute threads take "
        "CPU from it too.",
        "- The ratios are taken per repetition, then their median and range.",
        "",
        "Reproduce: `python bench/run.py --scenario busy [--model NAME] [--threads N] [--reps 3]` or "
        "`python bench/busy_host.py [--n-predict 256] [--settle-tokens 128] [--no-service]` (raw numbers: "
        "`bench/out/busy.json`). The rest of the benchmarks: [performance.md](performance.md).",
        "",
    ]
    return "\n".join(lines)


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    parser.add_argument("--n-predict", type=int, default=N_PREDICT, help="tokens per measured stream (default: 256)")
    parser.add_argument("--settle-tokens", type=int, default=SETTLE_TOKENS, help="tokens before it (default: 128)")
    parser.add_argument("--reps", type=int, default=3, help="rounds per configuration (default: %(default)s)")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds one measurement may take (default: 300)")
    parser.add_argument("--no-service", action="store_true", help="leave the `llama-crab serve` part out")
    parser.add_argument("--markdown", type=Path, default=DOC)
    parser.add_argument(
        "--report-only", action="store_true", help="rewrite --markdown from bench/out/busy.json; measure nothing"
    )
    parser.add_argument("--worker", metavar="JSON", help=argparse.SUPPRESS)
    parser.add_argument("--worker-out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    for name in ("n_predict", "settle_tokens", "reps"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.threads < 2:
        parser.error("--threads must be >= 2: the scenario compares thread counts")
    if max(args.n_predict, args.settle_tokens) > N_CTX - 64:
        parser.error(f"--n-predict and --settle-tokens must leave room for the prompt in {N_CTX} tokens")
    return args


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    if args.worker:
        result = worker(json.loads(args.worker))
        args.worker_out.write_text(json.dumps(result))
        return 0
    if args.report_only:
        results = json.loads((OUT / "busy.json").read_text())
        results["summary"] = summarize(results)
        (OUT / "busy.json").write_text(json.dumps(results, indent=2, default=str))
        args.markdown.write_text(report(results))
        print(report(results))
        return 0
    from llama_crab import models

    try:
        model = models.ensure(args.model)
    except (ValueError, RuntimeError) as e:
        print(f"bench: {e}", file=sys.stderr)
        return 2
    results = run(
        args.model, model, args.threads, args.n_predict, args.reps, args.timeout, args.settle_tokens,
        not args.no_service, args.markdown,
    )  # fmt: skip
    print(report(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
