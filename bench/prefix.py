"""Prefix-cache benchmark: a shared ~1,000-token system prompt, cache on vs off, one run,
llama-crab beside llama.cpp's own llama-server.

    python bench/prefix.py [--model smollm2-135m] [--threads N] [--reps 5] [--turns 10]
                           [--llama-server PATH] [--no-build]
    python bench/prefix.py --report-only    # the report again from bench/out/prefix.json

Two servers on the same model file, threads, context (8192) and 4 slots, up together (each
idle between requests; the idle one's CPU during the other's rounds is recorded):
  llama-crab     `llama-crab serve`, through `llama_crab_client.Client`; the cache on and off
                 per request (`cache_prompt`)
  llama-server   llama.cpp's server (bench/llama_server.py; built into build/bench-llama by
                 bench/llama_bench.py when missing) with its default host-RAM prompt cache,
                 through `POST /completion`; the cache on and off per request (its
                 `cache_prompt`, true by default)
A warm-up (cache on) leaves the prefix in one slot of each, then sends 4 questions at once
(recorded apart: how each serves a prefix only one slot holds), which leaves it in every
slot. Each round then runs both servers, cache on and off, the servers' order alternating
by round, so drift hits every column:
  sequential    one question after another behind the shared prefix: TTFT
  concurrent    4 questions at once behind the shared prefix: TTFT
  chat          a 10-turn session (history re-sent each turn as token ids), turns interleaved
                across the four sessions: per-turn TTFT and the prompt tokens actually computed
TTFT is the client's: from sending the request to the first streamed token. Writes
docs/prefix-cache.md (the report) and bench/out/prefix.json (raw numbers). Speed is measured
here, never asserted in tests.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Optional

import llama_bench
import llama_server
from common import add_model_arguments, load_average, proc_cpu_seconds
from service import free_port, serve

from llama_crab_client import Client, CompletionOptions

OUT = Path(__file__).resolve().parent / "out"
DOC = Path(__file__).resolve().parent.parent / "docs" / "prefix-cache.md"
N_CTX = 8192
PARALLEL = 4
SYSTEM = "You are a careful assistant for a library. " + " ".join(
    f"Rule {i}: answer questions about book number {i} politely, citing the shelf and the floor."
    for i in range(60)
)
QUESTIONS = [f"\nQuestion: where is book number {i}?\nAnswer:" for i in range(200)]
SIDES = ("crab", "server")  # llama-crab, llama-server
SIDE_LABEL = {"crab": "llama-crab", "server": "llama-server"}

# One request: (seconds to the first token, prompt tokens, prompt tokens computed, generated token ids).
Result = tuple[float, int, int, list[int]]


def ttft(client: Client, prompt: str | Sequence[int], options: CompletionOptions) -> Result:
    """llama-crab: seconds to the first chunk, prompt tokens, computed tokens, generated ids."""
    start = time.perf_counter()
    first: Optional[float] = None
    with client.stream(prompt, options) as stream:
        for _chunk in stream:
            if first is None:
                first = time.perf_counter() - start
        completion = stream.completion
    assert completion is not None and first is not None
    usage = completion.usage
    return first, usage.prompt_tokens, usage.prompt_tokens - usage.cached_tokens, list(completion.token_ids)


class ServerClient:
    """llama-server's `/completion`, streamed: the same request the crab side makes (greedy,
    `n_predict` tokens), the cache per request (`cache_prompt`), generated ids returned."""

    def __init__(self, port: int, timeout: float) -> None:
        self.connections = llama_server.Connections(port, timeout)

    def tokenize(self, text: str, add_special: bool = True) -> list[int]:
        reply = self.connections.post("/tokenize", {"content": text, "add_special": add_special})
        return [int(t) for t in reply["tokens"]]

    def stream(self, prompt: str | Sequence[int], n_predict: int, cache: bool) -> Result:
        body = llama_server.completion_body("", n_predict, {}, stream=True, return_tokens=True)
        body["prompt"] = prompt if isinstance(prompt, str) else list(prompt)
        body["cache_prompt"] = cache
        data = json.dumps(body).encode()
        start = time.perf_counter()
        first: Optional[float] = None
        tokens: list[int] = []
        final: Optional[dict[str, Any]] = None
        for event in llama_server.events(self.connections, data):
            if event.get("stop"):
                final = event
                continue
            if first is None:
                first = time.perf_counter() - start
            tokens += [int(t) for t in event.get("tokens") or ()]
        assert final is not None and first is not None, "llama-server: no token, or no final event"
        timings = final.get("timings") or {}
        prompt_tokens = int(final.get("tokens_evaluated") or 0)
        return first, prompt_tokens, int(timings.get("prompt_n", prompt_tokens)), tokens


def concurrent(run_one: Callable[[int], Result], n: int) -> list[Result]:
    """`run_one(i)` for i < n, on as many threads begun together behind a barrier."""
    barrier = threading.Barrier(n)
    out: list[Optional[Result]] = [None] * n
    errors: list[BaseException] = []

    def one(i: int) -> None:
        try:
            barrier.wait()
            out[i] = run_one(i)
        except BaseException as e:  # re-raised below; a thread must not swallow it
            errors.append(e)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise RuntimeError(f"{len(errors)} of {n} concurrent requests failed: {errors[0]!r}")
    return [r for r in out if r is not None]


class Sides:
    """Both servers, one request shape: `request(side, prompt, n_predict, cache)`."""

    def __init__(self, crab: Client, server: ServerClient, pids: dict[str, int]) -> None:
        self.crab = crab
        self.server = server
        self.pids = pids
        # CPU seconds each idle server used while the other one served, and those rounds' wall time.
        self.idle_cpu_s = {side: 0.0 for side in SIDES}
        self.busy_wall_s = {side: 0.0 for side in SIDES}

    def request(self, side: str, prompt: str | Sequence[int], n_predict: int, cache: bool) -> Result:
        if side == "crab":
            return ttft(self.crab, prompt, options(n_predict, cache))
        return self.server.stream(prompt, n_predict, cache)

    def timed(self, side: str, work: Callable[[], Any]) -> Any:
        """`work()` against `side`, recording the other (idle) server's CPU meanwhile."""
        other = "server" if side == "crab" else "crab"
        before, start = proc_cpu_seconds(self.pids[other]), time.perf_counter()
        result = work()
        after, wall = proc_cpu_seconds(self.pids[other]), time.perf_counter() - start
        if before is not None and after is not None:
            self.idle_cpu_s[other] += after - before
            self.busy_wall_s[side] += wall
        return result


def options(n_predict: int, cache: bool) -> CompletionOptions:
    return CompletionOptions(n_predict, cache_prompt=cache)


def chat_turn(sides: Sides, side: str, history: list[int], turn: int, cache: bool) -> dict[str, Any]:
    """One turn of a session kept here as token ids (as `Client.session()` keeps it): the
    history so far plus the new question's tokens (BOS only at the start), 16 tokens generated."""
    text = (SYSTEM if turn == 0 else "") + QUESTIONS[100 + turn]
    if side == "crab":
        new = sides.crab.tokenize(text, add_special=turn == 0, parse_special=True)
    else:
        new = sides.server.tokenize(text, add_special=turn == 0)
    prompt = history + new
    first, prompt_tokens, computed, generated = sides.timed(side, lambda: sides.request(side, prompt, 16, cache))
    history[:] = prompt + generated
    return {"turn": turn + 1, "ttft_ms": 1000 * first, "prompt_tokens": prompt_tokens, "computed_tokens": computed}


def median_range(values: list[float]) -> str:
    ms = [1000 * v for v in values]
    return f"{statistics.median(ms):.0f} ({min(ms):.0f}-{max(ms):.0f})"


def measure(sides: Sides, reps: int, turns: int) -> dict[str, Any]:
    results: dict[str, Any] = {}
    # Warm-up, cache on: one request leaves the prefix in one slot of each server; then 4 at
    # once (recorded: how a server serves a prefix that only one of its slots holds) leave it
    # in every slot, so the measured rounds see each server's steady state.
    warm: dict[str, dict[str, list[float]]] = {}
    for side in SIDES:
        sides.request(side, SYSTEM + QUESTIONS[0], 8, True)
        prompts0 = [SYSTEM + QUESTIONS[190 + i] for i in range(PARALLEL)]
        rs0 = concurrent(lambda i: sides.request(side, prompts0[i], 8, True), PARALLEL)
        warm[side] = {"ttft_s": [r[0] for r in rs0], "computed_tokens": [float(r[2]) for r in rs0]}
    results["warmup_concurrent4"] = warm
    seq: dict[str, dict[str, list[float]]] = {side: {"on": [], "off": []} for side in SIDES}
    conc: dict[str, dict[str, list[float]]] = {side: {"on": [], "off": []} for side in SIDES}
    computed: dict[str, list[int]] = {
        f"{side}/{kind}/{cache}": []
        for side in SIDES
        for kind in ("sequential", "concurrent4")
        for cache in ("on", "off")
    }
    for rep in range(reps):  # interleaved: both servers, on and off, each round; the servers' order alternates
        order = SIDES if rep % 2 == 0 else SIDES[::-1]
        for side in order:
            q = 1 + 10 * rep  # the same questions for both servers
            for cache in ("on", "off"):
                flag = cache == "on"
                prompt = SYSTEM + QUESTIONS[q]
                r = sides.timed(side, lambda: sides.request(side, prompt, 8, flag))
                seq[side][cache].append(r[0])
                computed[f"{side}/sequential/{cache}"].append(r[2])
                q += 1
                prompts = [SYSTEM + QUESTIONS[q + i] for i in range(PARALLEL)]
                rs: list[Result] = sides.timed(
                    side, lambda: concurrent(lambda i: sides.request(side, prompts[i], 8, flag), PARALLEL)
                )
                conc[side][cache] += [r[0] for r in rs]
                computed[f"{side}/concurrent4/{cache}"] += [r[2] for r in rs]
                q += PARALLEL
            print(
                f"prefix: round {rep + 1} {SIDE_LABEL[side]}: sequential on {1000 * seq[side]['on'][-1]:.0f} ms, "
                f"off {1000 * seq[side]['off'][-1]:.0f} ms",
                file=sys.stderr,
                flush=True,
            )
    results["sequential_ttft_s"] = seq
    results["concurrent4_ttft_s"] = conc
    results["computed_tokens"] = computed
    chat: dict[str, dict[str, list[dict[str, Any]]]] = {side: {"on": [], "off": []} for side in SIDES}
    histories: dict[tuple[str, str], list[int]] = {(side, cache): [] for side in SIDES for cache in ("on", "off")}
    for turn in range(turns):  # the four sessions' turns interleaved
        for side in SIDES if turn % 2 == 0 else SIDES[::-1]:
            for cache in ("on", "off"):
                chat[side][cache].append(chat_turn(sides, side, histories[(side, cache)], turn, cache == "on"))
    results["chat"] = chat
    return results


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--turns", type=int, default=10)
    parser.add_argument("--llama-server", metavar="PATH", help="a llama-server binary (else $LLAMA_SERVER or built)")
    parser.add_argument("--no-build", action="store_true", help="fail rather than build llama-server when missing")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds one request may take (default: 600)")
    parser.add_argument(
        "--report-only", action="store_true", help="rewrite docs/prefix-cache.md from bench/out/prefix.json, no run"
    )
    args = parser.parse_args(argv)
    if args.report_only:
        saved = json.loads((OUT / "prefix.json").read_text())
        lines = report(saved, int(saved["reps"]), int(saved["turns"]))
        DOC.write_text("\n".join(lines) + "\n")
        print("\n".join(lines))
        return 0
    if not 1 <= args.turns <= 100:
        parser.error("--turns must be 1..100")
    from llama_crab import models

    model = models.ensure(args.model)
    binary = llama_bench.locate(args.llama_server, allow_build=not args.no_build, tool="llama-server")
    OUT.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {
        "model": args.model,
        "model_path": model,
        "threads": args.threads,
        "reps": args.reps,
        "turns": args.turns,
        "n_ctx": N_CTX,
        "parallel": PARALLEL,
        "llama_server_binary": llama_bench.shown(binary),
        "pinned_commit": llama_bench.pinned_commit(),
        "llama_server_cache_ram": "default (8192 MiB, idle slots saved to it)",
        "load_before": load_average(),
    }
    with contextlib.ExitStack() as stack:
        address, crab_pid = stack.enter_context(serve(model, args.threads, N_CTX, PARALLEL, OUT / "prefix.server.log"))
        crab = stack.enter_context(Client(address, timeout=args.timeout))
        port = free_port()
        server_pid = stack.enter_context(
            llama_server.serve(
                binary, model, args.threads, N_CTX, PARALLEL, port, OUT / "prefix.llama-server.log", cache_ram=None
            )
        )
        server = ServerClient(port, args.timeout)
        prefix = {"crab": len(crab.tokenize(SYSTEM)), "server": len(server.tokenize(SYSTEM))}
        results["prefix_tokens"] = prefix["crab"]
        results["prefix_tokens_llama_server"] = prefix["server"]
        sides = Sides(crab, server, {"crab": crab_pid, "server": server_pid})
        results.update(measure(sides, args.reps, args.turns))
        results["idle_cpu_s"] = sides.idle_cpu_s  # CPU the idle server used...
        results["other_busy_wall_s"] = sides.busy_wall_s  # ...during this much of the other's work
    results["measured"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    results["load_average"] = load_average()
    (OUT / "prefix.json").write_text(json.dumps(results, indent=2))
    lines = report(results, args.reps, args.turns)
    DOC.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


def ratio(a: list[float], b: list[float]) -> str:
    x = statistics.median(a) / statistics.median(b)
    return f"{x:.1f}x" if x >= 1 else f"{x:.2f}x"


def report(results: dict[str, Any], reps: int, turns: int) -> list[str]:
    seq, conc = results["sequential_ttft_s"], results["concurrent4_ttft_s"]

    def loadavg(key: str) -> str:
        return " ".join(f"{v:.2f}" for v in results.get(key) or ()) or "?"

    idle = results["idle_cpu_s"]
    busy = results["other_busy_wall_s"]
    idle_text = "; ".join(
        f"{SIDE_LABEL[side]} {1000 * idle[side]:.0f} ms of CPU over {busy[other]:.0f} s of the other's work"
        for side, other in (("crab", "server"), ("server", "crab"))
    )
    lines = [
        "# Prefix cache",
        "",
        "Generated by `python bench/prefix.py`; do not edit by hand, run it again.",
        "",
        f"- Measured {results['measured']}, load average {loadavg('load_before')} before, "
        f"{loadavg('load_average')} after (a shared machine: numbers are noisy); `{results['model']}`, "
        f"{results['threads']} threads, a context of {results['n_ctx']} tokens shared by {results['parallel']} slots.",
        "- llama-crab: `llama-crab serve`, through `llama_crab_client.Client`. llama-server: llama.cpp's own "
        f"(`{results['llama_server_binary']}`, llama.cpp {results['pinned_commit']}), "
        "`-np 4 -c 8192 -b 512 -ub 512 -fa auto --no-kv-unified`, its host-RAM prompt cache at its default "
        "(on, 8192 MiB, idle slots saved to it), through `POST /completion` (streamed, greedy).",
        f"- A shared prefix of {results['prefix_tokens']} tokens (llama-server's tokenizer: "
        f"{results['prefix_tokens_llama_server']}), then a short distinct question, the same prompts (as text) to "
        "both; the cache on and off per request (`cache_prompt` on either server), 8 tokens generated.",
        f"- Rounds interleaved: each of {reps} rounds runs both servers, cache on and off, the servers' order "
        "alternating. TTFT is the client's (request sent to first streamed token), in ms, median (min-max) of "
        f"{reps} rounds (4 concurrent: of {PARALLEL * reps} requests).",
        f"- Both servers up at once, each idle while the other serves; the idle one's CPU meanwhile: {idle_text}.",
        "",
        "| scenario | llama-crab on | llama-crab off | off / on | llama-server on | llama-server off | off / on "
        "| crab on / server on |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for label, data in (("sequential", seq), ("4 concurrent", conc)):
        c, s = data["crab"], data["server"]
        lines.append(
            f"| {label} | {median_range(c['on'])} | {median_range(c['off'])} | {ratio(c['off'], c['on'])} "
            f"| {median_range(s['on'])} | {median_range(s['off'])} | {ratio(s['off'], s['on'])} "
            f"| {ratio(c['on'], s['on'])} |"
        )
    computed = results["computed_tokens"]

    def med(key: str) -> str:
        return f"{statistics.median(computed[key]):.0f}"

    lines += [
        "",
        "Prompt tokens computed per request in the rounds, cache on (median): "
        + "; ".join(
            f"{label}: llama-crab {med(f'crab/{kind}/on')}, llama-server {med(f'server/{kind}/on')}"
            for label, kind in (("sequential", "sequential"), ("4 concurrent", "concurrent4"))
        )
        + " (cache off: every prompt token). Where both compute the same tokens, the TTFT gap between the servers "
        "is each engine's speed on this machine at the time (see the ranges), not the cache.",
    ]
    warm = results["warmup_concurrent4"]

    def warm_text(side: str) -> str:
        rows = sorted(zip(warm[side]["computed_tokens"], warm[side]["ttft_s"]))
        return ", ".join(f"{c:.0f} ({1000 * t:.0f} ms)" for c, t in rows)

    lines += [
        "",
        "Before the rounds (warm-up, not in the table): the prefix in one slot only, then 4 questions at once, "
        f"cache on; prompt tokens computed (TTFT) per request: llama-crab {warm_text('crab')}; "
        f"llama-server {warm_text('server')}. The table's rounds start with the prefix in every slot of either.",
    ]
    lines += [
        "",
        f"A {turns}-turn session, 16 tokens generated per turn, the history re-sent each turn as token ids (the "
        "client keeps it, as `Client.session()` does; llama-server's ids from its `/tokenize`). Computed = prompt "
        "tokens the server actually prefilled (llama-crab: prompt - cached; llama-server: `timings.prompt_n`). "
        "TTFT in ms, one session each, the four sessions' turns interleaved:",
        "",
        "| turn | prompt tokens | crab computed, on | crab TTFT on | crab computed, off | crab TTFT off "
        "| server computed, on | server TTFT on | server computed, off | server TTFT off | crab on / server on |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    chat = results["chat"]
    for a, b, c, d in zip(chat["crab"]["on"], chat["crab"]["off"], chat["server"]["on"], chat["server"]["off"]):
        tokens = {a["prompt_tokens"], b["prompt_tokens"], c["prompt_tokens"], d["prompt_tokens"]}
        shown = str(a["prompt_tokens"]) if len(tokens) == 1 else f"{a['prompt_tokens']} (server {c['prompt_tokens']})"
        lines.append(
            f"| {a['turn']} | {shown} | {a['computed_tokens']} | {a['ttft_ms']:.0f} | {b['computed_tokens']} "
            f"| {b['ttft_ms']:.0f} | {c['computed_tokens']} | {c['ttft_ms']:.0f} | {d['computed_tokens']} "
            f"| {d['ttft_ms']:.0f} | {ratio([a['ttft_ms']], [c['ttft_ms']])} |"
        )
    return lines


if __name__ == "__main__":
    sys.exit(main())
