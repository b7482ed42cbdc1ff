"""Benchmark llama-crab against raw llama.cpp, side by side, in one run.

    python bench/run.py [--model smollm2-135m] [--threads N] [--n-predict 128] [--reps 3]
    python bench/run.py --scenario chat [...]    # Chat vs Complete, and a multi-turn session
    python bench/run.py --scenario busy [...]    # decode beside a CPU-bound neighbour process
    python bench/run.py --scenario mixed [...]   # a long prompt arriving beside 4 decoding streams
    python bench/run.py --scenario prefix [...]  # a shared 1,000-token prefix, cache on vs off, vs llama-server
    python bench/run.py --scenario http [...]    # the OpenAI-compatible SSE endpoint vs llama-server's, and gRPC
    python bench/run.py --scenario all [...]     # all of them

Columns, all on the same model and thread count:
  llama-bench    raw llama.cpp (pp and tg tokens/s), built from third_party/llama.cpp if needed
  in-process     `Llama.stream()`: TTFT and decode tokens/s
  gRPC           `llama-crab serve` + `llama_crab_client.Client` at 1, 4 and 8 concurrent streams
  llama-server   llama.cpp's own server (same build, settings, prompt and token count), streamed
                 over HTTP SSE at 1, 4 and 8 streams, its rounds interleaved with the gRPC rounds
  batched-bench  `llama-batched-bench` at 1, 4 and 8 sequences: the aggregate decode limit (S_TG)
The llama.cpp tools are built together into build/bench-llama (bench/llama_bench.py) when
missing. Writes docs/performance.md, docs/performance.png and bench/out/results.json. A column
whose piece is missing (no engine, no server, no cmake) is skipped with the reason in the report.
The chat scenario (bench/chat.py) writes docs/chat-performance.md and bench/out/chat.json; the busy
scenario (bench/busy_host.py: the thread governor, fixed thread counts and the wait policy beside a
CPU hog) writes docs/busy-host.md and bench/out/busy.json.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Optional

import llama_bench
import report
from common import RoundResult, Summary, add_model_arguments, cpu_name, loadavg_text, run_measured

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench" / "out"
CONCURRENCY = (1, 4, 8)


def _missing(check: list[str]) -> Optional[str]:
    """None when the command succeeds, else why not (its last error line)."""
    proc = subprocess.run(check, capture_output=True, text=True)
    if proc.returncode == 0:
        return None
    lines = (proc.stderr or proc.stdout).strip().splitlines()
    return lines[-1] if lines else f"exit {proc.returncode}"


def _models_module() -> Any:
    """llama_crab.models; straight from the source tree when the package (or its engine) won't import,
    so the llama-bench column still runs."""
    try:
        from llama_crab import models

        return models
    except ImportError:
        source = ROOT / "service" / "llama_crab" / "models.py"
        spec = importlib.util.spec_from_file_location("llama_crab_models", source)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # dataclasses look their module up while building
        spec.loader.exec_module(module)
        return module


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--scenario",
        choices=("performance", "chat", "busy", "mixed", "prefix", "speculative", "http", "all"),
        default="performance",
        help="performance: the columns above; chat: bench/chat.py (Chat vs Complete, a session); "
        "busy: bench/busy_host.py (decode beside a CPU hog); mixed: bench/mixed.py (a long prompt "
        "beside decoding streams, the --prefill-step budget); prefix: bench/prefix.py (the prefix "
        "cache on vs off, beside llama-server's); speculative: bench/speculative.py (edit, JSON and story "
        "work with and without speculation, beside llama-server's; qwen2.5-coder-0.5b unless --model says "
        "otherwise); http: bench/openai_http.py (/v1/completions streamed, beside llama-server's and gRPC); "
        "all: the seven",
    )
    add_model_arguments(parser)
    parser.add_argument(
        "--n-predict", type=int, help="tokens generated per stream (default: 128; the busy scenario's: 256)"
    )
    parser.add_argument("--n-prompt", type=int, default=512, help="llama-bench pp test size (default: %(default)s)")
    parser.add_argument("--reps", type=int, default=3, help="rounds per measurement; medians reported (default: 3)")
    parser.add_argument("--parallel", type=int, default=max(CONCURRENCY), help="slots in process and in the server")
    parser.add_argument("--n-ctx", type=int, default=4096, help="context shared by the slots (default: %(default)s)")
    parser.add_argument(
        "--timeout", type=float, default=300.0, help="seconds a column (or one gRPC stream) may take (default: 300)"
    )
    parser.add_argument("--llama-bench", metavar="PATH", help="a llama-bench binary (else $LLAMA_BENCH or built)")
    parser.add_argument("--llama-server", metavar="PATH", help="a llama-server binary (else $LLAMA_SERVER or built)")
    parser.add_argument(
        "--llama-batched-bench",
        metavar="PATH",
        help="a llama-batched-bench binary (else $LLAMA_BATCHED_BENCH or built)",
    )
    parser.add_argument(
        "--no-build", action="store_true", help="skip the llama.cpp tools' columns rather than build them"
    )
    parser.add_argument(
        "--skip",
        action="append",
        default=[],
        choices=("llama-bench", "inprocess", "grpc", "llama-server", "batched-bench"),
        help="leave a column out",
    )
    parser.add_argument("--markdown", type=Path, default=ROOT / "docs" / "performance.md")
    parser.add_argument("--chat-markdown", type=Path, default=ROOT / "docs" / "chat-performance.md")
    parser.add_argument("--busy-markdown", type=Path, default=ROOT / "docs" / "busy-host.md")
    parser.add_argument("--mixed-markdown", type=Path, default=ROOT / "docs" / "mixed-load.md")
    parser.add_argument("--png", type=Path, default=ROOT / "docs" / "performance.png")
    args = parser.parse_args(argv)
    import busy_host  # its defaults and limits (it imports nothing heavy)

    args.busy_n_predict = busy_host.N_PREDICT if args.n_predict is None else args.n_predict
    args.n_predict = 128 if args.n_predict is None else args.n_predict
    for name in ("threads", "n_predict", "n_prompt", "reps", "parallel", "n_ctx"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.scenario in ("busy", "all") and max(args.busy_n_predict, busy_host.SETTLE_TOKENS) > busy_host.N_CTX - 64:
        parser.error(f"--scenario busy: --n-predict must leave room for the prompt in {busy_host.N_CTX} tokens")
    if args.n_ctx // args.parallel < args.n_predict + 64:
        parser.error("--n-ctx / --parallel must hold the prompt plus --n-predict tokens per slot")
    if args.scenario in ("busy", "all") and args.threads < 2:
        parser.error("--scenario busy compares thread counts: --threads must be >= 2")
    if args.scenario in ("chat", "all") and args.parallel < 8:
        parser.error("--scenario chat runs 8 streams at once: --parallel must be >= 8")
    return args


def run_inprocess(args: argparse.Namespace, model: str) -> dict[str, Any]:
    out = OUT / "inprocess.json"
    out.unlink(missing_ok=True)
    cmd = [
        sys.executable, str(Path(__file__).with_name("inprocess.py")), "--model", model,
        "--threads", str(args.threads), "--n-predict", str(args.n_predict), "--n-ctx", str(args.n_ctx),
        "--parallel", str(args.parallel), "--reps", str(args.reps), "--out", str(out),
    ]  # fmt: skip
    print("+ " + " ".join(cmd), file=sys.stderr, flush=True)
    code, _, err, peak_mb = run_measured(cmd, args.timeout)
    if code != 0:
        raise RuntimeError(f"in-process run failed (exit {code}): {err.strip()[-1500:]}")
    result: dict[str, Any] = json.loads(out.read_text())
    result["peak_rss_mb"] = peak_mb  # the kernel's figure for the whole process
    return result


def bracket(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """In-process rounds from before and after the gRPC column, summarized together: a
    shared machine drifts during a run, and the ratio should not depend on which went first."""
    rounds = [RoundResult(**r) for r in before["single"]["rounds"] + after["single"]["rounds"]]
    merged = dict(before)
    merged["single"] = asdict(Summary.of(rounds))
    merged["peak_rss_mb"] = max(before.get("peak_rss_mb") or 0.0, after.get("peak_rss_mb") or 0.0)
    return merged


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    OUT.mkdir(parents=True, exist_ok=True)
    try:
        model = _models_module().ensure(args.model)
    except (ValueError, RuntimeError) as e:
        print(f"bench: {e}", file=sys.stderr)
        return 2
    if args.scenario in ("performance", "all"):
        run_performance(args, model)
    if args.scenario in ("chat", "all"):
        import chat

        chat_results = chat.run(
            args.model, model, args.threads, args.n_predict, args.reps, args.n_ctx, args.parallel, args.timeout,
            markdown=args.chat_markdown,
        )  # fmt: skip
        print(chat.report(chat_results))
    if args.scenario in ("busy", "all"):
        import busy_host

        busy_results = busy_host.run(
            args.model, model, args.threads, args.busy_n_predict, args.reps, args.timeout, markdown=args.busy_markdown
        )
        print(busy_host.report(busy_results))
    if args.scenario in ("mixed", "all"):
        import mixed

        server, bench, mixed_skipped = mixed.tools(args.llama_server, args.llama_bench, args.no_build)
        mixed_results = mixed.run(
            args.model, model, args.threads, args.reps, mixed.BUDGETS, args.timeout, server, bench,
            markdown=args.mixed_markdown, skipped=mixed_skipped,
        )  # fmt: skip
        print(mixed.report(mixed_results))
    if args.scenario in ("prefix", "all"):
        import prefix

        prefix_argv = ["--model", args.model, "--threads", str(args.threads), "--reps", str(args.reps)]
        if args.llama_server:
            prefix_argv += ["--llama-server", args.llama_server]
        if args.no_build:
            prefix_argv.append("--no-build")
        prefix.main(prefix_argv)
    if args.scenario in ("speculative", "all"):
        import speculative

        spec_argv = ["--threads", str(args.threads), "--reps", str(args.reps)]
        if args.model != "smollm2-135m":  # the scenario's own default is a coder model
            spec_argv += ["--model", args.model]
        if args.llama_server:
            spec_argv += ["--llama-server", args.llama_server]
        if args.no_build:
            spec_argv.append("--no-build")
        speculative.main(spec_argv)
    if args.scenario in ("http", "all"):
        import openai_http

        http_argv = ["--model", args.model, "--threads", str(args.threads), "--reps", str(args.reps)]
        if args.n_predict:
            http_argv += ["--n-predict", str(args.n_predict)]
        if args.llama_server:
            http_argv += ["--llama-server", args.llama_server]
        if args.no_build:
            http_argv.append("--no-build")
        openai_http.main(http_argv)
    return 0


def run_performance(args: argparse.Namespace, model: str) -> None:
    results: dict[str, Any] = {
        "measured_at": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "config": {
            "model": args.model,
            "model_path": model,
            "model_mb": os.path.getsize(model) / 1e6,
            "threads": args.threads,
            "n_predict": args.n_predict,
            "n_prompt": args.n_prompt,
            "reps": args.reps,
            "parallel": args.parallel,
            "n_ctx": args.n_ctx,
        },
        "environment": {"cpu": cpu_name(), "cores": os.cpu_count(), "load_before": loadavg_text()},
        "skipped": {},
    }
    skipped: dict[str, str] = results["skipped"]
    for column in args.skip:
        skipped[column] = "left out with --skip"

    tools: dict[str, Path] = {}  # llama-server and llama-batched-bench, found or built up front
    for column, tool, explicit in (
        ("llama-server", "llama-server", args.llama_server),
        ("batched-bench", "llama-batched-bench", args.llama_batched_bench),
    ):
        if column not in args.skip:
            try:
                tools[column] = llama_bench.locate(explicit, allow_build=not args.no_build, tool=tool)
            except (RuntimeError, OSError, subprocess.CalledProcessError) as e:
                skipped[column] = str(e)

    if "llama-bench" not in args.skip:
        try:
            binary = llama_bench.locate(args.llama_bench, allow_build=not args.no_build)
            results["llama_bench"] = llama_bench.run(
                binary, model, args.threads, args.n_prompt, args.n_predict, args.reps, args.timeout
            )
        except (RuntimeError, OSError, subprocess.CalledProcessError, ValueError, KeyError) as e:
            skipped["llama-bench"] = str(e)

    engine_missing = _missing([sys.executable, "-c", "import llama_crab._engine"])
    if "inprocess" not in args.skip:
        if engine_missing:
            skipped["inprocess"] = f"the native engine does not import: {engine_missing}"
        else:
            try:
                results["inprocess"] = run_inprocess(args, model)
                results["prompt_tokens"] = results["inprocess"]["prompt_tokens"]
            except (RuntimeError, OSError, ValueError) as e:
                skipped["inprocess"] = str(e)

    batched: Optional[llama_bench.BatchedBench] = None

    def new_batched(prompt_tokens: int) -> llama_bench.BatchedBench:
        return llama_bench.BatchedBench(
            tools["batched-bench"], model, args.threads, args.n_ctx, prompt_tokens, args.n_predict, CONCURRENCY,
            args.timeout,
        )  # fmt: skip

    if "grpc" in args.skip and "llama-server" in tools:
        skipped["llama-server"] = "its rounds are interleaved with the gRPC rounds, which were left out"
    if "grpc" not in args.skip:
        server_missing = engine_missing or _missing([sys.executable, "-m", "llama_crab.cli", "serve", "--help"])
        try:
            import service
        except ImportError as e:
            server_missing = server_missing or f"the Python client is not importable: {e}"
        if server_missing:
            skipped["grpc"] = f"the service is not available: {server_missing}"
            if "llama-server" in tools:
                skipped["llama-server"] = "its rounds are interleaved with the gRPC rounds, which could not run"
        else:
            each_rep = None
            if "batched-bench" in tools:
                # One llama-batched-bench run before each repetition of the server rounds, so the
                # machine's drift does not favour either side of the server-side / S_TG ratio.
                def each_rep(prompt_tokens: int) -> None:
                    nonlocal batched
                    if "batched-bench" in skipped:
                        return
                    try:
                        if batched is None:
                            batched = new_batched(prompt_tokens)
                        batched.run()
                    except (RuntimeError, OSError, ValueError, KeyError) as e:
                        skipped["batched-bench"] = str(e)

            try:
                measured = service.measure(
                    model, args.threads, args.n_predict, args.n_ctx, args.parallel, CONCURRENCY, args.reps,
                    args.timeout, OUT / "server.log", tools.get("llama-server"), OUT / "llama-server.log", each_rep,
                )  # fmt: skip
                results["grpc"] = measured["grpc"]
                results["client_peak_rss_mb"] = measured["client_peak_rss_mb"]
                results.setdefault("prompt_tokens", measured["prompt_tokens"])
                results["eog_banned"] = measured["eog_banned"]
                if "llama-server" in tools:
                    results["llama_server_binary"] = llama_bench.shown(tools["llama-server"])
                    if measured["llama_server"] is not None:
                        results["llama_server"] = measured["llama_server"]
                        results["check"] = measured["check"]
                    else:
                        why = measured["llama_server_skipped"]
                        skipped["llama-server"] = f"{why} (log: {OUT / 'llama-server.log'})"
            except Exception as e:  # any failure (a deadline, a crash) skips the column, with the reason
                skipped["grpc"] = f"{e} (server log: {OUT / 'server.log'})"
                if "llama-server" in tools:
                    skipped["llama-server"] = f"its rounds are interleaved with the gRPC rounds, which failed: {e}"

    if "batched-bench" in tools and "batched-bench" not in skipped:
        try:
            if batched is None or len(batched.runs) < args.reps:  # the server rounds did not run (all)
                batched = batched or new_batched(int(results.get("prompt_tokens") or 32))
                while len(batched.runs) < args.reps:
                    batched.run()
            results["batched_bench"] = batched.summary()
        except (RuntimeError, OSError, ValueError, KeyError) as e:
            skipped["batched-bench"] = str(e)

    if "inprocess" in results and "grpc" in results:
        try:
            results["inprocess"] = bracket(results["inprocess"], run_inprocess(args, model))
        except (RuntimeError, OSError, ValueError) as e:
            print(f"bench: second in-process pass failed, keeping the first: {e}", file=sys.stderr)

    results["environment"]["load_after"] = loadavg_text()
    results["ratios"] = report.ratios(results)
    (OUT / "results.json").write_text(json.dumps(results, indent=2, default=str))

    no_plot = report.plot(results, args.png)
    if no_plot:
        print(f"bench: {no_plot}", file=sys.stderr)
    args.markdown.parent.mkdir(parents=True, exist_ok=True)
    args.markdown.write_text(report.markdown(results, None if no_plot else args.png.name))
    print(report.markdown(results, None))
    for column, why in skipped.items():
        print(f"bench: skipped {column}: {why}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
