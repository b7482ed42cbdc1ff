"""Turn bench/run.py's results into docs/performance.md and docs/performance.png."""

from __future__ import annotations

import os
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

CONCURRENCY = ("1", "4", "8")
# key: (direction, target value, shown as a percentage rather than a factor)
TARGETS: dict[str, tuple[str, float, bool]] = {
    "grpc_vs_inprocess": (">=", 0.95, True),
    "inprocess_vs_llama_bench": (">=", 0.95, True),
    **{f"aggregate_grpc_vs_llama_server_x{n}": (">=", 1.0, False) for n in CONCURRENCY},
    **{f"ttft_p50_grpc_vs_llama_server_x{n}": ("<=", 1.0, False) for n in CONCURRENCY},
    "server_aggregate_8_vs_batched_bench": (">=", 0.97, True),
    **{f"client_cpu_grpc_vs_llama_server_x{n}": ("<=", 1.5, False) for n in CONCURRENCY},
}
LABELS = {
    "grpc_vs_inprocess": "gRPC 1-stream decode / in-process decode",
    "inprocess_vs_llama_bench": "in-process decode / llama-bench tg",
    "aggregate_8_vs_1": "gRPC aggregate, 8 streams / 1 stream",
    **{f"aggregate_grpc_vs_llama_server_x{n}": f"aggregate tok/s, gRPC / llama-server, {n} stream(s)"
       for n in CONCURRENCY},
    **{f"ttft_p50_grpc_vs_llama_server_x{n}": f"TTFT p50, gRPC / llama-server, {n} stream(s)" for n in CONCURRENCY},
    "server_aggregate_8_vs_batched_bench":
        "gRPC server-side aggregate decode, 8 streams / llama-batched-bench S_TG, B=8",
    "llama_server_aggregate_8_vs_batched_bench": "llama-server server-side aggregate decode, 8 streams / S_TG, B=8",
    **{f"client_cpu_grpc_vs_llama_server_x{n}": f"client CPU per token, gRPC / HTTP, {n} stream(s)"
       for n in CONCURRENCY},
    **{f"server_cpu_grpc_vs_llama_server_x{n}": f"server CPU per token, gRPC / llama-server, {n} stream(s)"
       for n in CONCURRENCY},
}  # fmt: skip


def _num(value: Optional[float], digits: int = 1) -> str:
    return "–" if value is None else f"{value:,.{digits}f}"


def _ratio(numerator: Optional[float], denominator: Optional[float]) -> Optional[float]:
    if numerator is None or not denominator:
        return None
    return numerator / denominator


def _paired(grpc: dict[str, Any], http: dict[str, Any], key: str) -> list[float]:
    """gRPC / llama-server of `key`, per pair of interleaved rounds (the same repetition)."""
    out = []
    for a, b in zip(grpc.get("rounds") or [], http.get("rounds") or []):
        ratio = _ratio(a.get(key), b.get(key))
        if ratio is not None:
            out.append(ratio)
    return out


def ratio_ranges(results: dict[str, Any]) -> dict[str, list[float]]:
    """Lowest and highest per-pair value of the gRPC / llama-server ratios taken per pair of rounds."""
    grpc = (results.get("grpc") or {}).get("concurrency") or {}
    http = (results.get("llama_server") or {}).get("concurrency") or {}
    out: dict[str, list[float]] = {}
    for n in CONCURRENCY:
        for name, key in (("aggregate", "aggregate_tps"), ("client_cpu", "client_cpu_ms_per_token"),
                          ("server_cpu", "server_cpu_ms_per_token")):  # fmt: skip
            pairs = _paired(grpc.get(n) or {}, http.get(n) or {}, key)
            if pairs:
                out[f"{name}_grpc_vs_llama_server_x{n}"] = [min(pairs), max(pairs)]
    return out


def ratios(results: dict[str, Any]) -> dict[str, Optional[float]]:
    bench = results.get("llama_bench") or {}
    inproc = (results.get("inprocess") or {}).get("single") or {}
    grpc = (results.get("grpc") or {}).get("concurrency") or {}
    http = (results.get("llama_server") or {}).get("concurrency") or {}
    batched = ((results.get("batched_bench") or {}).get("batch") or {}).get("8") or {}
    one, eight = grpc.get("1") or {}, grpc.get("8") or {}
    out: dict[str, Optional[float]] = {
        "grpc_vs_inprocess": _ratio(one.get("decode_tps_per_stream"), inproc.get("decode_tps_per_stream")),
        "inprocess_vs_llama_bench": _ratio(inproc.get("decode_tps_per_stream"), bench.get("tg_tps")),
        "aggregate_8_vs_1": _ratio(eight.get("aggregate_tps"), one.get("aggregate_tps")),
    }

    def paired_median(n: str, key: str) -> Optional[float]:
        # Throughput and CPU: the median of the per-pair ratios (robust to drift between pairs).
        pairs = _paired(grpc.get(n) or {}, http.get(n) or {}, key)
        return statistics.median(pairs) if pairs else None

    for n in CONCURRENCY:
        out[f"aggregate_grpc_vs_llama_server_x{n}"] = paired_median(n, "aggregate_tps")
    for n in CONCURRENCY:
        out[f"ttft_p50_grpc_vs_llama_server_x{n}"] = _ratio(
            (grpc.get(n) or {}).get("ttft_p50_ms"), (http.get(n) or {}).get("ttft_p50_ms")
        )
    out["server_aggregate_8_vs_batched_bench"] = _ratio(eight.get("engine_decode_tps_total"), batched.get("speed_tg"))
    out["llama_server_aggregate_8_vs_batched_bench"] = _ratio(
        (http.get("8") or {}).get("engine_decode_tps_total"), batched.get("speed_tg")
    )
    for n in CONCURRENCY:
        out[f"client_cpu_grpc_vs_llama_server_x{n}"] = paired_median(n, "client_cpu_ms_per_token")
    for n in CONCURRENCY:
        out[f"server_cpu_grpc_vs_llama_server_x{n}"] = paired_median(n, "server_cpu_ms_per_token")
    return out


def _met(key: str, value: Optional[float]) -> str:
    if key not in TARGETS or value is None:
        return ""
    direction, target, _ = TARGETS[key]
    return " (met)" if (value >= target if direction == ">=" else value <= target) else " (**missed**)"


PERCENT = {"llama_server_aggregate_8_vs_batched_bench"}  # shown as a percentage, no target


def _shown_ratio(key: str, value: Optional[float]) -> str:
    if value is None:
        return "–"
    percent = TARGETS[key][2] if key in TARGETS else key in PERCENT
    shown = _ratio_text(value, percent)
    if key in TARGETS and value != TARGETS[key][1] and shown == _ratio_text(TARGETS[key][1], percent):
        # Rounded onto the target ("95% (missed)" for 94.6%): one more digit shows which side it is on.
        shown = _ratio_text(value, percent, extra_digits=1)
    return shown


def _ratio_text(value: float, percent: bool, extra_digits: int = 0) -> str:
    """A percentage with no decimals, or a ratio with two, plus `extra_digits`."""
    digits = (0 if percent else 2) + extra_digits
    return f"{value:.{digits}%}" if percent else f"{value:.{digits}f}×"


def _shown_target(key: str) -> str:
    if key not in TARGETS:
        return "–"
    direction, target, percent = TARGETS[key]
    return ("≥ " if direction == ">=" else "≤ ") + _ratio_text(target, percent)


def short_streams(results: dict[str, Any]) -> list[str]:
    """Setups where a stream did not get exactly n_predict tokens (an end token the bias missed)."""
    want = results["config"]["n_predict"]
    return [
        name for name, s in _summaries(results).items()
        if any(r["min_tokens"] != want or r.get("max_tokens", want) != want for r in s["rounds"])
    ]  # fmt: skip


def _summaries(results: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    single = (results.get("inprocess") or {}).get("single")
    if single:
        out["in-process"] = single
    for streams, s in ((results.get("grpc") or {}).get("concurrency") or {}).items():
        out[f"gRPC x{streams}"] = s
    for streams, s in ((results.get("llama_server") or {}).get("concurrency") or {}).items():
        out[f"llama-server x{streams}"] = s
    return out


@dataclass
class Row:
    label: str
    ttft_ms: Optional[float]  # p50 over the streams of every round
    decode_tps: Optional[float]  # per stream, as its consumer received the chunks
    engine_decode_tps: Optional[float]  # per stream, as the engine timed it
    aggregate_tps: Optional[float]
    peak_rss_mb: Optional[float]
    ttft_p95_ms: Optional[float] = None
    server_cpu_ms_per_token: Optional[float] = None
    client_cpu_ms_per_token: Optional[float] = None


def rows(results: dict[str, Any]) -> list[Row]:
    """One row per measured setup."""
    out: list[Row] = []
    bench = results.get("llama_bench")
    if bench:
        tg = bench["tg_tps"]
        out.append(Row(f"llama-bench tg{bench['tg_tokens']}", None, tg, tg, tg, bench["peak_rss_mb"]))
    inproc = results.get("inprocess")
    if inproc:
        s = inproc["single"]
        out.append(
            Row(
                "in-process `Llama`, 1 stream", s["ttft_ms"], s["decode_tps_per_stream"], s["engine_decode_tps"],
                s["aggregate_tps"], inproc["peak_rss_mb"],
            )  # fmt: skip
        )
    batched = results.get("batched_bench")
    if batched:
        for b, s in batched["batch"].items():
            tg = s["speed_tg"]
            out.append(Row(f"llama-batched-bench, B={b}", None, tg / int(b), tg / int(b), tg, batched["peak_rss_mb"]))
    names = (("grpc", "gRPC service"), ("llama_server", "llama-server (HTTP SSE)"))
    served_sides = [(results[key], name) for key, name in names if results.get(key)]
    # gRPC and llama-server side by side at each concurrency.
    by_streams = sorted({n for served, _ in served_sides for n in served["concurrency"]}, key=int)
    for streams in by_streams:
        for served, name in served_sides:
            s = served["concurrency"].get(streams)
            if not s:
                continue
            out.append(
                Row(
                    f"{name}, {streams} stream{'s' if streams != '1' else ''}", s.get("ttft_p50_ms", s["ttft_ms"]),
                    s["decode_tps_per_stream"], s["engine_decode_tps"], s["aggregate_tps"],
                    served["server_peak_rss_mb"], s.get("ttft_p95_ms"), s.get("server_cpu_ms_per_token"),
                    s.get("client_cpu_ms_per_token"),
                )  # fmt: skip
            )
    return out


def _ranged(s: dict[str, Any], key: str, digits: int = 1) -> str:
    """`median (lowest–highest)` of a summarized metric."""
    value, spread = s.get(key), (s.get("range") or {}).get(key)
    if value is None:
        return "–"
    if not spread:
        return _num(value, digits)
    return f"{_num(value, digits)} ({_num(spread[0], digits)}–{_num(spread[1], digits)})"


def versus_lines(results: dict[str, Any]) -> list[str]:
    """The gRPC vs llama-server section: per concurrency, both sides' medians and ranges."""
    grpc, http = results.get("grpc"), results.get("llama_server")
    if not grpc or not http:
        return []
    cfg, check = results["config"], results.get("check") or {}
    lines = [
        "",
        "## gRPC service vs llama-server",
        "",
        f"`llama-server` (`{results.get('llama_server_binary', '?')}`, the same pinned llama.cpp and ggml flags) and "
        "`llama-crab serve`, both up for the whole column, with the same model, threads, "
        f"{cfg['parallel']} slots sharing {cfg['n_ctx']} tokens of context (a KV cache per slot), prompt "
        f"and {cfg['n_predict']} tokens per stream ({results.get('eog_banned', '?')} end-of-generation tokens banned), "
        "greedy, prompt cache off; rounds interleaved (gRPC, llama-server, then the other way round the next "
        f"repetition), {cfg['reps']} per side and concurrency. Median (lowest–highest round); TTFT p50/p95 "
        "over every stream of every round.",
    ]
    if check:
        same = "yes" if check.get("same_output") else "**no**"
        lines += [
            "",
            f"Same work, checked on one stream each: prompt tokens gRPC / llama-server "
            f"{check['prompt_tokens']['grpc']} / {check['prompt_tokens']['llama_server']} (computed, not cached: "
            f"{check['computed_prompt_tokens']['grpc']} / {check['computed_prompt_tokens']['llama_server']}); "
            f"generated {check['generated']['grpc']} / {check['generated']['llama_server']} tokens, identical: {same}.",
        ]
    lines += [
        "",
        "| streams | server | aggregate tok/s | decode tok/s per stream | TTFT p50 / p95 (ms) | server CPU ms/token "
        "| client CPU ms/token | server peak RSS (MB) |",
        "|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for n in CONCURRENCY:
        for name, side in (("gRPC", grpc), ("llama-server", http)):
            s = side["concurrency"].get(n)
            if not s:
                continue
            lines.append(
                f"| {n} | {name} | {_ranged(s, 'aggregate_tps')} | {_ranged(s, 'decode_tps_per_stream')} "
                f"| {_num(s.get('ttft_p50_ms'))} / {_num(s.get('ttft_p95_ms'))} "
                f"| {_ranged(s, 'server_cpu_ms_per_token', 2)} | {_ranged(s, 'client_cpu_ms_per_token', 3)} "
                f"| {_num(side.get('server_peak_rss_mb'), 0)} |"
            )
    summaries = [side["concurrency"][n] for side in (grpc, http) for n in side["concurrency"]]
    idle = max(s.get("other_server_cpu_ms_max", 0.0) for s in summaries)
    foreign = max(s.get("foreign_cpu_cores_max", 0.0) for s in summaries)
    lines += [
        "",
        f"CPU the idle server used during the other side's rounds: at most {idle:.0f} ms in a round. "
        f"CPU everything else on the machine used during a round (other work, kernel threads): at most "
        f"{foreign:.2f} of a core on average over the round.",
    ]
    return lines


def batched_lines(results: dict[str, Any]) -> list[str]:
    batched = results.get("batched_bench")
    if not batched:
        return []
    grpc = (results.get("grpc") or {}).get("concurrency") or {}
    http = (results.get("llama_server") or {}).get("concurrency") or {}
    st = batched["settings"]
    lines = [
        "",
        "## The batching limit: llama-batched-bench",
        "",
        f"`{batched['binary']}` `-npp {batched['n_prompt']} -ntg {batched['n_predict']} -npl "
        f"{','.join(batched['batch'])}` (n_kv_max {st['n_kv_max']}, batch {st['n_batch']}/{st['n_ubatch']}, "
        f"{st['n_threads']} threads, a KV cache per sequence), {batched['reps']} runs, median (lowest–highest): B "
        "sequences decoded together, no sampling or serving. Next to it, each server's own aggregate decode "
        "rate: the sum over the round's streams of the engine-timed decode tok/s (gRPC: `Completion.timings`; "
        "llama-server: `timings.predicted_per_second`), median over the rounds.",
        "",
        "| B = streams | S_TG tok/s | S_PP tok/s | gRPC server-side decode tok/s "
        "| llama-server server-side decode tok/s |",
        "|---:|---:|---:|---:|---:|",
    ]
    for b, s in batched["batch"].items():
        low, high = s["speed_tg_range"]
        lines.append(
            f"| {b} | {_num(s['speed_tg'])} ({_num(low)}–{_num(high)}) | {_num(s['speed_pp'])} "
            f"| {_num((grpc.get(b) or {}).get('engine_decode_tps_total'))} "
            f"| {_num((http.get(b) or {}).get('engine_decode_tps_total'))} |"
        )
    return lines


def markdown(results: dict[str, Any], png_name: Optional[str]) -> str:
    cfg = results["config"]
    env = results["environment"]
    lines = [
        "# Performance",
        "",
        "Generated by `python bench/run.py` "
        f"(`--model {cfg['model']} --threads {cfg['threads']} --n-predict {cfg['n_predict']}`); "
        "do not edit by hand, run it again.",
        "",
        f"- Measured: {results['measured_at']} on {env['cpu']} ({env['cores']} cores), "
        f"load average before/after: {env['load_before']} / {env['load_after']}.",
        f"- Model: `{cfg['model']}` ({cfg['model_mb']:.0f} MB), {cfg['threads']} threads everywhere, "
        f"{cfg['n_predict']} generated tokens per stream (end-of-generation tokens banned so every stream "
        f"runs to the end), prompt of {results.get('prompt_tokens', '?')} tokens computed every time (no prefix "
        "cache), greedy sampling.",
        f"- In-process and service: one context of {cfg['n_ctx']} tokens shared by {cfg['parallel']} slots "
        "(the same engine settings); medians over "
        f"{cfg['reps']} rounds.",
    ]
    bench = results.get("llama_bench")
    if bench:
        lines.append(
            f"- llama-bench `{bench['binary']}` from the pinned llama.cpp (commit {bench.get('pinned_commit')}): "
            f"pp{bench['pp_tokens']} {bench['pp_tps']:.1f} tok/s, tg{bench['tg_tokens']} {bench['tg_tps']:.1f} "
            f"± {bench['tg_tps_stddev']:.1f} tok/s (mean of {cfg['reps']} repetitions)."
        )
    lines += [
        "",
        "| setup | TTFT p50 (ms) | decode tok/s per stream | engine-timed decode tok/s | aggregate tok/s "
        "| peak RSS (MB) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows(results):
        lines.append(
            f"| {r.label} | {_num(r.ttft_ms)} | {_num(r.decode_tps)} | {_num(r.engine_decode_tps)} "
            f"| {_num(r.aggregate_tps)} | {_num(r.peak_rss_mb, 0)} |"
        )
    ranges = ratio_ranges(results)
    lines += ["", "| ratio | value | target |", "|---|---:|---:|"]
    for key, value in ratios(results).items():
        shown = _shown_ratio(key, value)
        if key in ranges:
            low, high = ranges[key]
            shown += f" ({_shown_ratio(key, low)}–{_shown_ratio(key, high)})"
        target = _shown_target(key)
        lines.append(f"| {LABELS[key]} | {shown} | {target}{_met(key, value) if target != '–' else ''} |")
    if ranges:
        lines += ["", "Ratios with a range are taken per pair of interleaved rounds: median (lowest–highest pair)."]
    spread = []
    for name, summary in _summaries(results).items():
        values = [r["decode_tps_per_stream"] for r in summary["rounds"]]
        spread.append(f"{name} {min(values):.1f}–{max(values):.1f}")
    if spread:
        lines += ["", "Decode tok/s per stream, lowest–highest round (a wide range means a noisy machine): "
                  + "; ".join(spread) + "."]
    short = short_streams(results)
    if short:
        lines += ["", f"Warning: some streams did not generate exactly {cfg['n_predict']} tokens ({', '.join(short)}); "
                  "their rates are not comparable."]
    lines += versus_lines(results)
    lines += batched_lines(results)
    skipped = results.get("skipped") or {}
    if skipped:
        lines += ["", "Not measured in this run:", ""]
        lines += [f"- {column}: {why}" for column, why in skipped.items()]
    if png_name:
        lines += ["", f"![throughput, time to first token and CPU per token]({png_name})"]
    lines += [
        "",
        "## How it is measured",
        "",
        "- **llama-bench**: `llama-bench -m MODEL -t THREADS -p N_PROMPT -n N_PREDICT -r REPS -o json`; "
        "tg is pure decoding of one sequence, no sampling or detokenizing.",
        "- **in-process**: `Llama.stream()` in its own process (`cache_prompt=False`, as the service rounds); "
        "TTFT from the call to the first chunk; "
        "decode tok/s = tokens after the first chunk / time from the first to the last chunk. "
        "This includes sampling, detokenizing, stop checks and the handoff to Python. "
        "Its rounds are taken once before and once after the gRPC column and summarized together, "
        "so the machine's drift during the run does not favour either side of the ratio.",
        "- **gRPC**: `llama-crab serve --parallel P` as a subprocess, `llama_crab_client.Client` in the "
        "benchmark process; N streams on one channel, one thread each, start together behind a barrier; "
        "TTFT from a stream's call to its first chunk, decode tok/s per stream as in-process (means over the "
        "streams, then the median over the rounds), aggregate = all tokens / time from the first stream's "
        "start to the last token received. `CompletionOptions(N_PREDICT, logit_bias=-inf on the end tokens, "
        "cache_prompt=False)`.",
        "- **llama-server**: built from the same pinned llama.cpp into `build/bench-llama` (the package build "
        "forces `LLAMA_BUILD_SERVER` off) with the package's ggml flags (Release, `-march=native`, OpenMP, "
        "static, PIC) and no web UI (`-DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF`, run with "
        "`--no-webui`); started as `llama-server -m MODEL -t THREADS -tb THREADS -np P -c N_CTX -b 512 -ub 512 "
        "-fa auto --no-kv-unified --cache-ram 0` (the engine's context settings; `--cache-ram 0` turns off its "
        "host-memory prompt cache, which would otherwise save idle slots on every request: no measurable "
        "difference here, but no work the cold requests need). Each stream is "
        "`POST /completion` with `stream: true`, `n_predict`, `temperature: 0`, `samplers: [\"top_k\"]`, "
        "`top_k: 1` (the engine's greedy chain), `logit_bias` false (-inf) on the same end-of-generation ids, "
        "`cache_prompt: false`, on its own `http.client` connection and thread, reading the SSE "
        "`data:` lines; progress is the server's `tokens_predicted`. Every stream of every round is checked "
        "to have generated exactly N_PREDICT tokens on both sides. Rounds are interleaved with the gRPC "
        "rounds, both servers up at once (the idle one's CPU is measured and reported).",
        "- **llama-batched-bench**: `-npp PROMPT_TOKENS -ntg N_PREDICT -npl 1,4,8 -c N_CTX -b 512 -ub 512 "
        "-fa auto --no-kv-unified --output-format jsonl`, one run before each repetition of the server rounds "
        "(both servers idle meanwhile), medians; "
        "S_TG = B × N_PREDICT / time of the N_PREDICT decode steps of B sequences at once. The servers' "
        "**server-side aggregate decode** is the sum over a round's streams of each stream's engine-timed "
        "decode rate (tokens after the first / time from the first token to the last, as each server times "
        "it), so the ratio to S_TG is what serving (scheduling, sampling, detokenizing, streaming) costs "
        "the decode loop.",
        "- **CPU per token**: the server's user + system time from `/proc/PID/stat` (every thread, 10 ms "
        "ticks) and the benchmark process's `time.process_time()` (the client: every thread of it, gRPC's "
        "C-core threads included), each taken around a round, over the round's tokens. The benchmark process "
        "runs nothing but the round's client meanwhile, so the two sides' client numbers compare like for like.",
        "- **Peak RSS**: the kernel's high-water mark of each process (`wait4` rusage for llama-bench, "
        "llama-batched-bench and the in-process run, `/proc/PID/status` VmHWM for the servers); the mmap'd "
        "weights count once they are touched.",
        "- On a machine with as many threads as cores, the server and its client (and anything else "
        "running) compete for the same cores, so the service columns also carry the client's cost; "
        "compare ratios from quiet runs only.",
        "",
        "Reproduce: `python bench/run.py [--model NAME] [--threads N] [--n-predict 128] [--reps 3]` "
        "(raw numbers: `bench/out/results.json`; server logs `bench/out/server.log`, "
        "`bench/out/llama-server.log`).",
        "",
        "Streaming `Chat` vs `Complete` and a multi-turn session: [chat-performance.md](chat-performance.md) "
        "(`python bench/run.py --scenario chat`).",
        "",
        "Decode beside a CPU-bound neighbour process (the thread governor, the wait policy, `--threads` advice): "
        "[busy-host.md](busy-host.md) (`python bench/run.py --scenario busy`).",
        "",
        "A long prompt arriving beside 4 decoding streams (newcomer TTFT, the decoders' inter-token latency, "
        "the `--prefill-step` budget, prefill vs llama-bench pp512): [mixed-load.md](mixed-load.md) "
        "(`python bench/run.py --scenario mixed`).",
        "",
    ]
    # The profiling hypotheses and their outcomes are written by hand; they ride along.
    hypotheses = Path(__file__).resolve().parent / "hypotheses.md"
    if hypotheses.is_file():
        lines += [hypotheses.read_text(encoding="utf-8").rstrip(), ""]
    return "\n".join(lines)


def plot(results: dict[str, Any], path: Path) -> Optional[str]:
    """Write the PNG; returns a reason instead when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install matplotlib) — no plot"
    data = rows(results)
    labels = [r.label.replace("`", "") for r in data]
    fig, (left, middle, right) = plt.subplots(1, 3, figsize=(18, 6), gridspec_kw={"width_ratios": [1.3, 1, 1]})
    y = list(range(len(data)))
    height = 0.38
    left.barh([i - height / 2 for i in y], [r.decode_tps or 0 for r in data], height, label="decode tok/s per stream")
    left.barh([i + height / 2 for i in y], [r.aggregate_tps or 0 for r in data], height, label="aggregate tok/s")
    left.set_yticks(y, labels)
    left.invert_yaxis()
    left.set_xlabel("tokens / second")
    left.legend(loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=2, frameon=False)
    left.set_title("Throughput")
    ttft = [(label, r) for label, r in zip(labels, data) if r.ttft_ms is not None]
    ttft_y = list(range(len(ttft)))
    above = [max(0.0, (r.ttft_p95_ms or r.ttft_ms or 0.0) - (r.ttft_ms or 0.0)) for _, r in ttft]
    errors = [[0.0 for _ in ttft], above]
    middle.barh(ttft_y, [r.ttft_ms or 0.0 for _, r in ttft], color="tab:green", xerr=errors, capsize=3)
    middle.set_yticks(ttft_y, [label for label, _ in ttft])
    middle.invert_yaxis()
    middle.set_xlabel("milliseconds")
    middle.set_title("Time to first token (p50, whisker to p95)")
    # The client's CPU per token (the servers' own is ~ threads x wall time / tokens on a busy
    # machine: in the table).
    cpu = [(label, r) for label, r in zip(labels, data) if r.client_cpu_ms_per_token is not None]
    cpu_y = list(range(len(cpu)))
    right.barh(cpu_y, [1000.0 * (r.client_cpu_ms_per_token or 0.0) for _, r in cpu], color="tab:orange")
    right.set_yticks(cpu_y, [label for label, _ in cpu])
    right.invert_yaxis()
    right.set_xlabel("CPU microseconds per generated token")
    right.set_title("Client CPU per token (median round)")
    cfg = results["config"]
    fig.suptitle(f"{cfg['model']}, {cfg['threads']} threads, {cfg['n_predict']} tokens per stream")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    os.replace(tmp, path)
    return None
