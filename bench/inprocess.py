"""The in-process column: `Llama` streams in this process; writes JSON to --out.

Run by bench/run.py as its own process so its peak RSS is the API's alone.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from dataclasses import asdict

from common import PROMPT, RoundResult, Summary, end_of_generation_bias, time_stream

from llama_crab import CompletionOptions, Llama, LlamaParams


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", required=True, help="a .gguf path")
    parser.add_argument("--threads", type=int, required=True)
    parser.add_argument("--n-predict", type=int, required=True)
    parser.add_argument("--n-ctx", type=int, required=True)
    parser.add_argument("--parallel", type=int, required=True)
    parser.add_argument("--reps", type=int, required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    started = time.perf_counter()
    params = (
        LlamaParams(args.model).with_n_ctx(args.n_ctx).with_n_parallel(args.parallel).with_n_threads(args.threads)
    )
    with Llama.load(params) as llama:
        load_s = time.perf_counter() - started
        # The prompt computed every time (no prefix cache), as in the service rounds: a cold TTFT.
        options = CompletionOptions(args.n_predict, logit_bias=end_of_generation_bias(llama), cache_prompt=False)
        # Warm-up: first-touch of the mmap'd weights and the compute buffers.
        for _ in llama.stream(PROMPT, CompletionOptions(8)):
            pass
        rounds = [RoundResult.of([time_stream(lambda: llama.stream(PROMPT, options))]) for _ in range(args.reps)]
        prompt_tokens = len(llama.tokenize(PROMPT))
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KB on Linux
    result = {
        "load_s": load_s,
        "prompt_tokens": prompt_tokens,
        "eog_banned": len(options.logit_bias),
        "single": asdict(Summary.of(rounds)),
        "peak_rss_mb": peak_kb / 1024.0,
    }
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
