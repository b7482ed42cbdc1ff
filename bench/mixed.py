"""Mixed load: a long prompt arriving while streams decode, and the per-step prefill budget.

    python bench/mixed.py [--model smollm2-135m] [--threads N] [--rounds 2] [--budgets 0,256,128,64]
    python bench/run.py --scenario mixed [--model ...] [--threads N] [--reps 2]

Two measurements, written to docs/mixed-load.md and bench/out/mixed.json:

1. Prefill throughput. One stream, a --prompt-tokens (~1,000) token prompt given as token ids,
   `max_tokens` 1, `cache_prompt` false, against `llama-crab serve` (default budget): the
   engine's `Completion.timings.prompt_tokens_per_second` and the client's prompt tokens /
   TTFT; also a 512-token prompt (pp512's size); beside it `llama-bench -p 512 -n 0 -r 1`
   with the same threads, one run per round, rounds interleaved; medians.

2. Mixed load. 4 streams decode (the usual prompt, --decode-tokens tokens, end-of-generation
   banned as bench/run.py does, so none stops early); --arrive-after seconds after they
   start, a 5th request arrives with the ~1,000-token prompt (`cache_prompt` false) and
   --newcomer-tokens tokens. Every chunk's arrival is timestamped. Reported per configuration:
   the newcomer's TTFT (client-side), the decoders' inter-chunk gaps during the newcomer's
   prefill (gaps overlapping the window from its request to its first chunk): p50 / p99 /
   max, the decoders' tokens/s in that window, and the gaps over the whole run. The
   configurations: `llama-crab serve --prefill-step N` for each budget (0 = n_batch = 512),
   and llama-server (bench/llama_server.py: -b 512 -ub 512), every server with --parallel
   slots, the same model, threads and context, all up at once and the rounds interleaved
   (the order rotating per round).

Speed is measured here, never asserted in tests; on a shared machine read the ranges.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from common import PROMPT, add_model_arguments, cpu_name, end_of_generation_bias, loadavg_text, percentile

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench" / "out"
DOC = ROOT / "docs" / "mixed-load.md"
BUDGETS = (0, 256, 128, 64)
DECODERS = 4
PROMPT_TOKENS = 1000
DECODE_TOKENS = 320
NEWCOMER_TOKENS = 16
ARRIVE_AFTER_S = 1.0
PARALLEL = 8
SLOT_CTX = 1280  # per slot: the long prompt plus its tokens, or the short prompt plus DECODE_TOKENS
PREFILL_TARGET = 0.95
TTFT_SLACK = 1.3  # the recommended budget: the smallest whose newcomer TTFT is within this of 512's

# Filler for the long prompt: varied sentences, cut to the token count wanted.
FILLER = (
    "The tide came in slowly over the flat grey sand, and the crab counted every wave. "
    "Each line of its program was written in the wet sand with one claw, then checked twice. "
    "A gull watched from the rocks, curious about the loops and the conditions and the errors. "
    "By noon the crab had a compiler of shells, a debugger of seaweed and a test suite of pebbles. "
)


@dataclass
class Stamps:
    """One stream as its consumer saw it: start, each chunk's arrival and cumulative tokens."""

    started: float
    times: list[float] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    completion: Any = None

    @property
    def ttft_s(self) -> Optional[float]:
        return self.times[0] - self.started if self.times else None


def stamp(start: Callable[[], Any]) -> Stamps:
    s = Stamps(time.perf_counter())
    stream = start()
    for chunk in stream:
        s.times.append(time.perf_counter())
        s.tokens.append(int(chunk.n_tokens))
    s.completion = stream.completion
    return s


# ---- one configuration's side: a client and how to start each kind of stream -----------------


@dataclass
class Side:
    name: str
    label: str
    decoder: Callable[[], Any]  # a decoding stream
    newcomer: Callable[[Sequence[int]], Any]  # the long prompt (token ids), few tokens
    prefill: Callable[[Sequence[int]], Any]  # one token after a prompt (token ids)
    pid: int


def grpc_side(client: Any, name: str, label: str, pid: int, bias: dict[int, float]) -> Side:
    from llama_crab_client import CompletionOptions

    dec = CompletionOptions(DECODE_TOKENS, logit_bias=bias, cache_prompt=False)
    new = CompletionOptions(NEWCOMER_TOKENS, logit_bias=bias, cache_prompt=False)
    one = CompletionOptions(1, logit_bias=bias, cache_prompt=False)
    return Side(
        name, label, lambda: client.stream(PROMPT, dec), lambda ids: client.stream(list(ids), new),
        lambda ids: client.stream(list(ids), one), pid,
    )  # fmt: skip


def http_side(client: Any, pid: int, bias: dict[int, float]) -> Side:
    return Side(
        "llama-server", "llama-server (-b 512 -ub 512)", lambda: client.stream(DECODE_TOKENS, bias),
        lambda ids: client.stream(NEWCOMER_TOKENS, bias, prompt=list(ids)),
        lambda ids: client.stream(1, bias, prompt=list(ids)), pid,
    )  # fmt: skip


# ---- the mixed-load round ---------------------------------------------------------------------


def mixed_round(side: Side, prompt: Sequence[int], arrive_after: float) -> dict[str, Any]:
    """DECODERS decoding streams started together; `arrive_after` s later the newcomer."""
    barrier = threading.Barrier(DECODERS + 1)
    results: list[Optional[Stamps]] = [None] * (DECODERS + 1)
    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            barrier.wait()
            if i == DECODERS:
                time.sleep(arrive_after)
                results[i] = stamp(lambda: side.newcomer(prompt))
            else:
                results[i] = stamp(side.decoder)
        except BaseException as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(DECODERS + 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise RuntimeError(f"{side.name}: {len(errors)} stream(s) failed: {errors[0]!r}")
    decoders = [r for r in results[:DECODERS] if r is not None]
    newcomer = results[DECODERS]
    assert newcomer is not None and newcomer.times, "the newcomer got no token"
    arrive, first = newcomer.started, newcomer.times[0]
    window_gaps: list[float] = []
    all_gaps: list[float] = []
    window_tokens = 0
    for d in decoders:
        for i in range(1, len(d.times)):
            gap = d.times[i] - d.times[i - 1]
            all_gaps.append(gap)
            if d.times[i] > arrive and d.times[i - 1] < first:
                window_gaps.append(gap)
            if arrive < d.times[i] <= first:
                window_tokens += d.tokens[i] - d.tokens[i - 1]
    # The decoders must still be running when the newcomer's first token comes, else the
    # window's gaps undercount: flag it.
    covered = all(d.times and d.times[-1] > first for d in decoders)
    engine_ttft = None
    if newcomer.completion is not None:
        engine_ttft = float(newcomer.completion.timings.time_to_first_token_ms)
    return {
        "newcomer_ttft_ms": 1000.0 * (first - arrive),
        "newcomer_engine_ttft_ms": engine_ttft,
        "window_s": first - arrive,
        "window_gaps": len(window_gaps),
        "itl_window_p50_ms": 1000.0 * percentile(window_gaps, 50),
        "itl_window_p99_ms": 1000.0 * percentile(window_gaps, 99),
        "itl_window_max_ms": 1000.0 * max(window_gaps, default=0.0),
        "decoder_tps_window": window_tokens / DECODERS / (first - arrive) if first > arrive else 0.0,
        "itl_all_p50_ms": 1000.0 * percentile(all_gaps, 50),
        "itl_all_p99_ms": 1000.0 * percentile(all_gaps, 99),
        "itl_all_max_ms": 1000.0 * max(all_gaps, default=0.0),
        "decoder_tokens": [d.tokens[-1] if d.tokens else 0 for d in decoders],
        "tokens_per_chunk": sum(d.tokens[-1] for d in decoders if d.tokens) / max(1, sum(len(d.times) for d in decoders)),
        "decoders_cover_window": covered,
        "load": loadavg_text(),
    }


def prefill_round(side: Side, prompt: Sequence[int]) -> dict[str, Any]:
    s = stamp(lambda: side.prefill(prompt))
    ttft = s.ttft_s or 0.0
    out: dict[str, Any] = {"prompt_tokens": len(prompt), "client_ttft_ms": 1000.0 * ttft}
    out["client_prompt_tps"] = len(prompt) / ttft if ttft > 0 else 0.0
    c = s.completion
    if c is not None and hasattr(c.timings, "prompt_tokens_per_second"):
        out["engine_prompt_tps"] = float(c.timings.prompt_tokens_per_second)
        out["engine_ttft_ms"] = float(c.timings.time_to_first_token_ms)
    elif c is not None:  # llama-server: timings.prompt_per_second, prompt_ms
        t = c.final.get("timings") or {}
        out["engine_prompt_tps"] = float(t.get("prompt_per_second", 0.0))
        out["engine_ttft_ms"] = float(t.get("prompt_ms", 0.0))
    return out


def med(rows: Sequence[dict[str, Any]], key: str) -> Optional[float]:
    values = [r[key] for r in rows if r.get(key) is not None]
    return statistics.median(values) if values else None


def rng(rows: Sequence[dict[str, Any]], key: str) -> Optional[list[float]]:
    values = [r[key] for r in rows if r.get(key) is not None]
    return [min(values), max(values)] if values else None


MIXED_KEYS = (
    "newcomer_ttft_ms", "newcomer_engine_ttft_ms", "itl_window_p50_ms", "itl_window_p99_ms", "itl_window_max_ms",
    "decoder_tps_window", "itl_all_p50_ms", "itl_all_p99_ms", "itl_all_max_ms",
)  # fmt: skip
PREFILL_KEYS = ("client_prompt_tps", "engine_prompt_tps", "client_ttft_ms", "engine_ttft_ms")


def summarize(results: dict[str, Any]) -> dict[str, Any]:
    summary: dict[str, Any] = {"mixed": {}, "prefill": {}}
    for name, rows in results["mixed"].items():
        summary["mixed"][name] = {k: med(rows, k) for k in MIXED_KEYS}
        summary["mixed"][name]["range"] = {k: rng(rows, k) for k in MIXED_KEYS}
        summary["mixed"][name]["covered"] = all(r["decoders_cover_window"] for r in rows)
    for name, rows in results["prefill"].items():
        summary["prefill"][name] = {k: med(rows, k) for k in PREFILL_KEYS}
        summary["prefill"][name]["range"] = {k: rng(rows, k) for k in PREFILL_KEYS}
    pp = [r["pp_tps"] for r in results.get("llama_bench") or [] if r.get("pp_tps")]
    summary["pp512"] = statistics.median(pp) if pp else None
    summary["pp512_range"] = [min(pp), max(pp)] if pp else None
    if summary["pp512"]:
        for name, s in summary["prefill"].items():
            s["ratio_engine"] = (s["engine_prompt_tps"] or 0.0) / summary["pp512"]
            s["ratio_client"] = (s["client_prompt_tps"] or 0.0) / summary["pp512"]
    # The recommendation: the smallest budget whose newcomer TTFT is within TTFT_SLACK of 512's.
    base = summary["mixed"].get("budget-0", {}).get("newcomer_ttft_ms")
    fits = []
    for budget in results["config"]["budgets"]:
        s = summary["mixed"].get(f"budget-{budget}")
        if base and s and s["newcomer_ttft_ms"] is not None and s["newcomer_ttft_ms"] <= TTFT_SLACK * base:
            fits.append(budget if budget else 512)
    summary["recommended_budget"] = min(fits) if fits else None
    return summary


# ---- the run ----------------------------------------------------------------------------------


def long_prompt(tokenize: Callable[[str], list[int]], n: int) -> list[int]:
    text = FILLER
    while len(tokenize(text)) < n + 8:
        text += FILLER
    return tokenize(text)[:n]


def run(
    model_name: str,
    model: str,
    threads: int,
    rounds: int,
    budgets: Sequence[int],
    timeout: float,
    llama_server_binary: Optional[Path],
    llama_bench_binary: Optional[Path],
    markdown: Optional[Path] = DOC,
    prompt_tokens: int = PROMPT_TOKENS,
    arrive_after: float = ARRIVE_AFTER_S,
    skipped: Optional[dict[str, str]] = None,
) -> dict[str, Any]:
    import llama_bench
    import llama_server
    import service

    from llama_crab_client import Client

    OUT.mkdir(parents=True, exist_ok=True)
    n_ctx = PARALLEL * SLOT_CTX
    results: dict[str, Any] = {
        "measured_at": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "config": {
            "model": model_name, "model_path": model, "threads": threads, "rounds": rounds, "budgets": list(budgets),
            "parallel": PARALLEL, "n_ctx": n_ctx, "decoders": DECODERS, "decode_tokens": DECODE_TOKENS,
            "prompt_tokens": prompt_tokens, "newcomer_tokens": NEWCOMER_TOKENS, "arrive_after_s": arrive_after,
        },  # fmt: skip
        "environment": {"cpu": cpu_name(), "cores": os.cpu_count(), "load_before": loadavg_text()},
        "mixed": {}, "prefill": {}, "llama_bench": [], "skipped": dict(skipped or {}),
    }  # fmt: skip
    sides: list[Side] = []
    with contextlib.ExitStack() as stack:
        bias: dict[int, float] = {}
        prompt: list[int] = []
        for budget in budgets:
            args = (
                "--threads", str(threads), "--n-ctx", str(n_ctx), "--parallel", str(PARALLEL),
                "--prefill-step", str(budget), "--max-queue", "64", "--log-level", "warning",
            )  # fmt: skip
            proc, address = stack.enter_context(service.serve_process(model, OUT / f"mixed-server-{budget}.log", *args))
            proc_pid = proc.pid
            client = stack.enter_context(Client(address, timeout=timeout))
            if not bias:
                bias = end_of_generation_bias(client)
                prompt = long_prompt(lambda t: client.tokenize(t), prompt_tokens)
            label = f"llama-crab --prefill-step {budget}" + (" (0 = n_batch = 512)" if budget == 0 else "")
            sides.append(grpc_side(client, f"budget-{budget}", label, proc_pid, bias))
        if llama_server_binary is not None:
            try:
                port = service.free_port()
                pid = stack.enter_context(
                    llama_server.serve(llama_server_binary, model, threads, n_ctx, PARALLEL, port, OUT / "mixed-llama-server.log")
                )
                sides.append(http_side(llama_server.Client(port, timeout), pid, bias))
            except (RuntimeError, OSError) as e:
                results["skipped"]["llama-server"] = str(e)
        results["config"]["eog_banned"] = len(bias)
        # Warm-up: each side's every decoder slot and one long prefill.
        for side in sides:
            service.run_concurrent(side.decoder, DECODERS)
            warm_prefill = side.prefill
            stamp(lambda: warm_prefill(prompt))
        short = prompt[:512]
        for rep in range(rounds):
            order = sides[rep % len(sides) :] + sides[: rep % len(sides)]
            if llama_bench_binary is not None and "llama-bench" not in results["skipped"]:
                try:
                    results["llama_bench"].append(
                        llama_bench.run(llama_bench_binary, model, threads, 512, 0, 1, timeout)
                    )
                except (RuntimeError, OSError, ValueError, KeyError) as e:
                    results["skipped"]["llama-bench"] = str(e)
            for side in order:
                for key, p in ((f"{side.name}@{len(prompt)}", prompt), (f"{side.name}@512", short)):
                    if side.name.startswith("budget-") and side.name != f"budget-{budgets[0]}":
                        continue  # the budget only matters beside decoders: prefill alone on the default
                    row = prefill_round(side, p)
                    results["prefill"].setdefault(key, []).append(row)
                    print(f"mixed: round {rep + 1} prefill {key}: {row['engine_prompt_tps']:.0f} tok/s", file=sys.stderr)
            for side in order:
                row = mixed_round(side, prompt, arrive_after)
                row["label"] = side.label
                results["mixed"].setdefault(side.name, []).append(row)
                print(
                    f"mixed: round {rep + 1} {side.name}: newcomer TTFT {row['newcomer_ttft_ms']:.0f} ms, "
                    f"ITL in window p50 {row['itl_window_p50_ms']:.1f} p99 {row['itl_window_p99_ms']:.1f} "
                    f"max {row['itl_window_max_ms']:.1f} ms",
                    file=sys.stderr,
                    flush=True,
                )
        results["labels"] = {s.name: s.label for s in sides}
    results["environment"]["load_after"] = loadavg_text()
    results["summary"] = summarize(results)
    (OUT / "mixed.json").write_text(json.dumps(results, indent=2, default=str))
    if markdown is not None:
        markdown.parent.mkdir(parents=True, exist_ok=True)
        markdown.write_text(report(results))
    return results


# ---- the report -------------------------------------------------------------------------------


def _f(v: Optional[float], digits: int = 0) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def _r(v: Optional[list[float]], digits: int = 0) -> str:
    return "" if not v else f" ({v[0]:.{digits}f}-{v[1]:.{digits}f})"


def report(results: dict[str, Any]) -> str:
    cfg, env, s = results["config"], results["environment"], results["summary"]
    labels = results.get("labels", {})
    lines = [
        "# Mixed load: a long prompt arriving beside decoding streams",
        "",
        f"Measured {results['measured_at']} on {env['cpu']} ({env['cores']} cores), model `{cfg['model']}`, "
        f"{cfg['threads']} threads, {cfg['rounds']} round(s) per configuration, rounds interleaved; "
        f"load average before {env['load_before']}, after {env['load_after']}. "
        "Written by `python bench/run.py --scenario mixed` (or `python bench/mixed.py`); raw numbers in "
        "`bench/out/mixed.json`.",
        "",
        "## Method",
        "",
        f"- Every server: `--parallel {cfg['parallel']}`, context {cfg['n_ctx']} ({cfg['n_ctx'] // cfg['parallel']} "
        "per slot), the same model and threads, all started at once (idle while another is measured).",
        f"- {cfg['decoders']} streams decode the usual short prompt, {cfg['decode_tokens']} tokens each, "
        f"end-of-generation tokens banned ({cfg['eog_banned']}), `cache_prompt` false. {cfg['arrive_after_s']:.1f} s "
        f"after they start, a 5th request arrives: a {cfg['prompt_tokens']}-token prompt (token ids, the same on "
        f"both servers), `cache_prompt` false, {cfg['newcomer_tokens']} tokens.",
        "- Newcomer TTFT: client-side, from its request to its first chunk. Decoders' ITL: the gaps between "
        "consecutive chunks of each decoder (a chunk carried "
        + ", ".join(
            sorted({f"{r['tokens_per_chunk']:.2f}" for rows in results["mixed"].values() for r in rows})
        )
        + " tokens on average), counted in the window when the gap overlaps the newcomer's request-to-first-token "
        "interval; p50 / p99 / max over the gaps of all four decoders (medians over the rounds, range over the "
        "rounds in brackets). 'Whole run' is every gap of every decoder.",
        "- `llama-crab serve --prefill-step N`: at most N prompt tokens prefilled per engine step beside the "
        "decoding streams (0 = n_batch = 512). llama-server (bench/llama_server.py: `-b 512 -ub 512`, "
        "`--no-kv-unified`, `--cache-ram 0`) has no per-step prompt budget of its own: `llama-server --help` "
        "offers only `-b/--batch-size` (the logical batch, default 2048, which also caps a step's prompt tokens: "
        "the server puts the decoding tokens in the batch first, then fills it with prompt tokens) and "
        "`-ub/--ubatch-size`; so its prompt tokens per step are n_batch minus the decoders' tokens.",
        "",
        "## Newcomer TTFT and the decoders' inter-token latency",
        "",
        "| configuration | newcomer TTFT ms | decoders ITL during prefill p50 / p99 / max ms | decoder tok/s during "
        "prefill (each) | ITL whole run p50 / p99 / max ms |",
        "|---|---|---|---|---|",
    ]
    for name, m in s["mixed"].items():
        rr = m["range"]
        lines.append(
            f"| {labels.get(name, name)} | {_f(m['newcomer_ttft_ms'])}{_r(rr['newcomer_ttft_ms'])} | "
            f"{_f(m['itl_window_p50_ms'], 1)} / {_f(m['itl_window_p99_ms'], 1)} / {_f(m['itl_window_max_ms'], 1)}"
            f"{_r(rr['itl_window_max_ms'], 1)} | {_f(m['decoder_tps_window'], 1)} | "
            f"{_f(m['itl_all_p50_ms'], 1)} / {_f(m['itl_all_p99_ms'], 1)} / {_f(m['itl_all_max_ms'], 1)} |"
            + ("" if m["covered"] else " (decoders ended before the newcomer's first token)")
        )
    lines += [
        "",
        "## Prefill throughput vs llama-bench pp512",
        "",
        f"One stream, `max_tokens` 1, `cache_prompt` false, no other load; llama-bench `-p 512 -n 0 -r 1` "
        f"(same threads) once per round: pp512 {_f(s['pp512'])} tok/s{_r(s['pp512_range'])} (median of "
        f"{len(results.get('llama_bench') or [])}). Target: the service's prefill >= "
        f"{PREFILL_TARGET:.0%} of pp512.",
        "",
        "| server, prompt tokens | engine prompt tok/s | vs pp512 | client: prompt tokens / TTFT | vs pp512 |",
        "|---|---|---|---|---|",
    ]
    for key, p in s["prefill"].items():
        name, _, n = key.partition("@")
        what = "llama-crab (default budget)" if name.startswith("budget-") else name
        lines.append(
            f"| {what}, {n} | {_f(p['engine_prompt_tps'])}{_r(p['range']['engine_prompt_tps'])} | "
            f"{_f(100 * p['ratio_engine'] if p.get('ratio_engine') is not None else None)}% | "
            f"{_f(p['client_prompt_tps'])}{_r(p['range']['client_prompt_tps'])} | "
            f"{_f(100 * p['ratio_client'] if p.get('ratio_client') is not None else None)}% |"
        )
    rec = s.get("recommended_budget")
    base = s["mixed"].get("budget-0", {}).get("newcomer_ttft_ms")
    lines += [
        "",
        "## Recommendation",
        "",
        (
            f"Smallest budget whose newcomer TTFT stays within {TTFT_SLACK}x of the 512 budget's "
            f"({_f(base)} ms): **{rec}**."
            if rec
            else "No smaller budget kept the newcomer's TTFT within "
            f"{TTFT_SLACK}x of the 512 budget's ({_f(base)} ms)."
        ),
        "",
    ]
    if results.get("skipped"):
        lines += ["Skipped: " + "; ".join(f"{k}: {v}" for k, v in results["skipped"].items()), ""]
    return "\n".join(lines)


# ---- command line ------------------------------------------------------------------------------


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--budgets", default=",".join(str(b) for b in BUDGETS), help="--prefill-step values")
    parser.add_argument("--prompt-tokens", type=int, default=PROMPT_TOKENS)
    parser.add_argument("--arrive-after", type=float, default=ARRIVE_AFTER_S)
    parser.add_argument("--timeout", type=float, default=300.0)
    parser.add_argument("--llama-server", metavar="PATH")
    parser.add_argument("--llama-bench", metavar="PATH")
    parser.add_argument("--no-build", action="store_true")
    parser.add_argument("--markdown", type=Path, default=DOC)
    parser.add_argument("--report-only", action="store_true", help="rewrite the report from bench/out/mixed.json")
    args = parser.parse_args(argv)
    args.budgets = [int(b) for b in args.budgets.split(",") if b.strip()]
    if args.prompt_tokens + NEWCOMER_TOKENS + 16 > SLOT_CTX:
        parser.error(f"--prompt-tokens must fit a {SLOT_CTX}-token slot")
    return args


def tools(llama_server_path: Optional[str], llama_bench_path: Optional[str], no_build: bool) -> tuple[Any, Any, dict[str, str]]:
    import llama_bench

    found: dict[str, Any] = {}
    skipped: dict[str, str] = {}
    for tool, explicit in (("llama-server", llama_server_path), ("llama-bench", llama_bench_path)):
        try:
            found[tool] = llama_bench.locate(explicit, allow_build=not no_build, tool=tool)
        except Exception as e:  # noqa: BLE001 - the column is skipped, with the reason
            skipped[tool] = str(e)
    return found.get("llama-server"), found.get("llama-bench"), skipped


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    if args.report_only:
        results = json.loads((OUT / "mixed.json").read_text())
        results["summary"] = summarize(results)
        args.markdown.write_text(report(results))
        print(report(results))
        return 0
    from llama_crab import models

    try:
        model = models.ensure(args.model)
    except (ValueError, RuntimeError) as e:
        print(f"bench: {e}", file=sys.stderr)
        return 2
    server, bench, skipped = tools(args.llama_server, args.llama_bench, args.no_build)
    results = run(
        args.model, model, args.threads, args.rounds, args.budgets, args.timeout, server, bench, args.markdown,
        args.prompt_tokens, args.arrive_after, skipped,
    )  # fmt: skip
    print(report(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
