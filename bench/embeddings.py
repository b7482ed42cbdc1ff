"""Embeddings benchmark: llama-crab's Embed RPC beside llama.cpp's own llama-server
`/v1/embeddings` on the same GGUF, in one run, rounds interleaved, both servers up; then what
embedding costs a generating stream on the same engine (and the other way round).

    python bench/embeddings.py [--model minilm-l6] [--threads N] [--reps 3]
                               [--llama-server PATH] [--no-build]

Throughput: texts/s at batch 1 (one text per request, one request at a time) and at batch 32
(32 texts per request), over the same 32 sentences (8-30 tokens), mean pooling, normalised.
  crab-grpc       `llama-crab serve --model M`, `Client.embed`
  crab-inprocess  `Llama.embed` in this process (no transport: the engine's own speed)
  server-http     `llama-server --embeddings --pooling mean -np 8 -b 2048 -ub 2048` (an
                  encoder's whole batch in one micro-batch), `POST /v1/embeddings`
Beside generation (in process, a generative model, `--gen-model`): one stream's decode tok/s
alone and while a thread embeds batches of 32 in a loop; embed texts/s alone and while the
stream decodes. Writes docs/embeddings-performance.md and bench/out/embeddings.json. Speed is
measured here, never asserted in tests.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
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
from common import add_model_arguments, cpu_name, load_average, median_range, write_results
from service import free_port, serve_process

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench" / "out"
DOC = ROOT / "docs" / "embeddings-performance.md"

SENTENCES = [
    "A man is eating food.",
    "A man is eating a piece of bread.",
    "The girl is carrying a baby.",
    "A man is riding a horse across an open field at sunset.",
    "A woman is playing the violin in a crowded subway station.",
    "Two men pushed carts through the woods.",
    "A monkey is playing drums.",
    "The new movie is awesome, everyone in the theatre applauded at the end.",
    "How do I reset my password if I no longer have access to my email?",
    "The quarterly report shows revenue growth of 12 percent over last year.",
    "Python is a programming language that lets you work quickly.",
    "Rust guarantees memory safety without a garbage collector.",
    "The train to Lyon was delayed by forty minutes because of a signal failure.",
    "Please summarise the attached contract and list every termination clause.",
    "She planted tomatoes, basil and peppers in the raised beds behind the house.",
    "The museum opens at nine and closes at six on weekdays.",
    "Our API returns a 429 status code when the rate limit is exceeded.",
    "Gradient descent updates the parameters in the direction of the negative gradient.",
    "The cat sat on the mat.",
    "A storm is expected to reach the coast tomorrow night with strong winds.",
    "He forgot his umbrella and got soaked on the way to the office.",
    "The recipe calls for two cups of flour, one egg and a pinch of salt.",
    "Distributed systems must tolerate partial failures and network partitions.",
    "The children built a sandcastle with towers, walls and a moat.",
    "An embedding maps a sentence to a point in a vector space.",
    "Is this restaurant open on Sunday evenings?",
    "The orchestra rehearsed the symphony for three weeks before the premiere.",
    "Backups are useless unless you regularly test restoring them.",
    "The hikers reached the summit just before the clouds rolled in.",
    "Quantum computers use qubits that can be in superpositions of states.",
    "The library extended its hours during the exam period.",
    "A dog is running through the snow with a stick in its mouth.",
]
BATCH1_REQUESTS = 64
BATCH32_REQUESTS = 8


def server_embed(port: int, texts: Sequence[str]) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
    try:
        conn.request("POST", "/v1/embeddings", json.dumps({"input": list(texts), "model": "m"}), {"content-type": "application/json"})
        response = conn.getresponse()
        body = json.loads(response.read())
        if response.status != 200:
            raise RuntimeError(f"llama-server: {response.status} {body}")
        return len(body["data"])
    finally:
        conn.close()


def texts_per_second(embed: Callable[[Sequence[str]], int], batch: int) -> float:
    n_requests = BATCH1_REQUESTS if batch == 1 else BATCH32_REQUESTS
    start = time.perf_counter()
    done = 0
    for i in range(n_requests):
        texts = [SENTENCES[(i * batch + k) % len(SENTENCES)] for k in range(batch)]
        done += embed(texts)
    return done / (time.perf_counter() - start)


def throughput(configs: dict[str, Callable[[Sequence[str]], int]], reps: int) -> dict[str, dict[str, list[float]]]:
    names = list(configs)
    cells: dict[str, dict[str, list[float]]] = {f"batch {b}": {n: [] for n in names} for b in (1, 32)}
    for rep in range(reps):
        order = names[rep % len(names) :] + names[: rep % len(names)]  # rotate: drift hits each alike
        for batch in (1, 32):
            for name in order:
                configs[name](SENTENCES[:batch])  # warm the connection and the path
                value = texts_per_second(configs[name], batch)
                cells[f"batch {batch}"][name].append(value)
                print(f"round {rep + 1} batch {batch} {name}: {value:.1f} texts/s", file=sys.stderr, flush=True)
    return cells


def beside_generation(model: str, threads: int, reps: int) -> dict[str, list[float]]:
    from llama_crab import CompletionOptions, Llama, LlamaParams

    out: dict[str, list[float]] = {"decode alone": [], "decode beside embedding": [], "embed alone": [], "embed beside decoding": []}
    options = CompletionOptions(128, ignore_eos=True, cache_prompt=False)
    with Llama.load(LlamaParams(model, n_ctx=2048, n_threads=threads)) as llama:
        llama.embed(SENTENCES)  # creates the embedding context before timing

        def decode_rate() -> float:
            c = llama.create_completion("Once upon a time", options)
            return c.timings.decode_tokens_per_second

        def embed_rate(seconds: float) -> float:
            start, n = time.perf_counter(), 0
            while time.perf_counter() - start < seconds:
                n += len(llama.embed(SENTENCES).data)
            return n / (time.perf_counter() - start)

        for _ in range(reps):
            out["decode alone"].append(decode_rate())
            out["embed alone"].append(embed_rate(3.0))
            stop = threading.Event()
            embedded: list[float] = []

            def embed_loop() -> None:
                start, n = time.perf_counter(), 0
                while not stop.is_set():
                    n += len(llama.embed(SENTENCES).data)
                embedded.append(n / (time.perf_counter() - start))

            worker = threading.Thread(target=embed_loop)
            worker.start()
            try:
                out["decode beside embedding"].append(decode_rate())
            finally:
                stop.set()
                worker.join()
            out["embed beside decoding"].append(embedded[0])
    return out


def report(results: dict[str, Any]) -> str:
    lines = [
        "# Embeddings performance",
        "",
        f"Measured {results['measured']} on {results['cpu']}, {results['threads']} threads, model "
        f"`{results['model']}`, {results['reps']} rounds (configurations rotated each round); "
        f"llama-server `{results['llama_server_binary']}` (pinned llama.cpp {results['pinned_commit'] or '?'}), "
        f"`{' '.join(results['server_flags'])}`. Load average before/after: {results['load_before']} / "
        f"{results['load_after']}. Written by `python bench/embeddings.py`; medians (min-max).",
        "",
        "## Throughput (texts/s)",
        "",
        "| batch | llama-crab gRPC | llama-crab in process | llama-server HTTP | gRPC / llama-server |",
        "|---|---:|---:|---:|---:|",
    ]
    for batch, by in results["throughput"].items():
        ratio = statistics.median(by["crab-grpc"]) / statistics.median(by["server-http"])
        lines.append(
            f"| {batch} | {median_range(by['crab-grpc'])} | {median_range(by['crab-inprocess'])} | "
            f"{median_range(by['server-http'])} | **{ratio:.2f}x** |"
        )
    beside = results.get("beside")
    if beside:
        lines += [
            "",
            f"## Beside generation (`{results['gen_model']}`, in process, one stream of 128 tokens; embedding 32 texts per call)",
            "",
            "| measure | alone | beside the other | ratio |",
            "|---|---:|---:|---:|",
        ]
        for what, unit in (("decode", "tok/s"), ("embed", "texts/s")):
            other = "embedding" if what == "decode" else "decoding"
            alone, mixed = beside[f"{what} alone"], beside[f"{what} beside {other}"]
            lines.append(
                f"| {what} {unit} | {median_range(alone)} | {median_range(mixed)} | "
                f"{statistics.median(mixed) / statistics.median(alone):.2f}x |"
            )
    return "\n".join(lines) + "\n"


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser, default_model="minilm-l6")
    parser.add_argument("--gen-model", default="qwen2.5-coder-0.5b", help="generative model for the beside-generation cells")
    parser.add_argument("--reps", type=int, default=3, help="rounds (default: 3)")
    parser.add_argument("--llama-server", metavar="PATH", help="a llama-server binary (else $LLAMA_SERVER or built)")
    parser.add_argument("--no-build", action="store_true", help="fail rather than build llama-server when missing")
    parser.add_argument("--skip-beside", action="store_true", help="leave out the beside-generation cells")
    args = parser.parse_args(argv)
    from llama_crab import Llama, LlamaParams, models
    from llama_crab_client import Client

    model = models.ensure(args.model)
    OUT.mkdir(parents=True, exist_ok=True)
    binary = llama_bench.locate(args.llama_server, allow_build=not args.no_build, tool="llama-server")
    server_flags = ("--embeddings", "--pooling", "mean", "-b", "2048", "-ub", "2048")
    results: dict[str, Any] = {
        "model": args.model,
        "gen_model": args.gen_model,
        "threads": args.threads,
        "reps": args.reps,
        "cpu": cpu_name(),
        "llama_server_binary": llama_bench.shown(binary),
        "pinned_commit": llama_bench.pinned_commit(),
        "server_flags": ["-np", "8", *server_flags],
        "load_before": load_average(),
    }
    with contextlib.ExitStack() as stack:
        _proc, address = stack.enter_context(
            serve_process(model, OUT / "embeddings.server.log", "--threads", str(args.threads), "--log-level", "warning")
        )
        client = stack.enter_context(Client(address, timeout=300))
        port = free_port()
        stack.enter_context(
            llama_server.serve(binary, model, args.threads, 4096, 8, port, OUT / "embeddings.llama-server.log", extra=server_flags)
        )
        local = stack.enter_context(Llama.load(LlamaParams(model, n_threads=args.threads)))
        configs: dict[str, Callable[[Sequence[str]], int]] = {
            "crab-grpc": lambda texts: len(client.embed(texts).data),
            "crab-inprocess": lambda texts: len(local.embed(texts).data),
            "server-http": lambda texts: server_embed(port, texts),
        }
        results["throughput"] = throughput(configs, args.reps)
    if not args.skip_beside:
        results["beside"] = beside_generation(models.ensure(args.gen_model), args.threads, args.reps)
    results["measured"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    return write_results(results, OUT / "embeddings.json", DOC, report)


if __name__ == "__main__":
    sys.exit(main())
