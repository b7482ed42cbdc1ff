"""Chat benchmark: streaming `Chat` vs `Complete` on one rendered prompt, and a multi-turn session.

    python bench/chat.py [--model smollm2-135m] [--threads N] [--n-predict 128] [--reps 5] [--turns 5]
    python bench/run.py --scenario chat [--model ...] [--threads N] [--n-predict 128] [--reps 5]

Two parts, each against its own `llama-crab serve`, through `llama_crab_client.Client`:
  chat vs complete  one conversation (system + user message), rendered once with the model's
                    chat template in this process (`Llama.apply_chat_template`), goes to `Chat`
                    as messages and to `Complete` as that text's tokens (no BOS added, special
                    tokens parsed: what `Chat` computes). End-of-generation tokens banned, so
                    both decode exactly --n-predict tokens (the same ones: checked); the prefix
                    cache off for both. 1 and 8 concurrent streams; rounds interleaved, the side
                    that goes first alternating. Reported: aggregate tok/s, Chat / Complete per
                    pair of rounds, and the CPU per token of the server and of this client.
  session           a --turns-turn `ChatSession` (user turns of ~160 tokens, --turn-tokens-token
                    replies), the prefix cache on vs off per request (`cache_prompt`), whole
                    conversations interleaved: per-turn prompt tokens, cached tokens, TTFT.
Writes docs/chat-performance.md and bench/out/chat.json. Speed is measured here, never
asserted in tests; on a shared machine read the ratios and the ranges, not one number.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Optional

from common import ChunkStream, PROMPT, add_model_arguments, cpu_name, end_of_generation_bias, loadavg_text, proc_cpu_seconds
from service import run_concurrent, serve

from llama_crab import Llama, LlamaParams
from llama_crab_client import ChatChunk, ChatMessage, Client, CompletionOptions

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench" / "out"
DOC = ROOT / "docs" / "chat-performance.md"
CONCURRENCY = (1, 8)
TARGET = 0.95  # Chat may cost at most 5% of Complete's decode throughput
SIDES = ("complete", "chat")

MESSAGES = [ChatMessage.system("You are a helpful assistant."), ChatMessage.user(PROMPT)]

TOPICS = ("tides", "lighthouses", "sea glass", "hermit crabs", "kelp forests", "sand dunes", "storm surges")
SENTENCES = (
    "In the early morning the {t} along the northern shore look nothing like the way the old guidebooks "
    "describe them.",
    "My grandmother, who lived by the harbour for sixty years, used to say that the {t} told her more about "
    "the coming weather than any forecast on the radio.",
    "When I walked there last summer I counted every detail I could see and wrote each one down in a small "
    "blue notebook.",
    "Some of the older fishermen still argue about whether the {t} have changed since the new breakwater was built.",
    "I want this paragraph to explain why the {t} matter to the town without sounding like a brochure for tourists.",
    "Please also check that the tense stays consistent and that no sentence is longer than it needs to be.",
)


def user_turn(i: int) -> str:
    """The i-th user message of the session: ~160 tokens, distinct per turn."""
    topic = TOPICS[i % len(TOPICS)]
    intro = f"Here is paragraph {i + 1} of my essay, about {topic}. Suggest one improvement. "
    return intro + " ".join(s.format(t=topic) for s in SENTENCES)


def render(model_path: str, messages: Sequence[ChatMessage]) -> str:
    """The prompt text the model's chat template makes of `messages`, as `Chat` renders it."""
    with Llama.load(LlamaParams(model_path).with_n_ctx(512).with_n_threads(1)) as llama:
        return llama.apply_chat_template(messages)


# ---- part 1: Chat vs Complete -------------------------------------------------------------


def timed_round(start: Callable[[], ChunkStream], streams: int, server_pid: int) -> dict[str, float]:
    """One round of `streams` concurrent streams: throughput to the end of every stream (its
    final message received) and the CPU the server and this client spent per token."""
    server_before, client_before = proc_cpu_seconds(server_pid), time.process_time()
    timings = run_concurrent(start, streams)
    server_after, client_after = proc_cpu_seconds(server_pid), time.process_time()
    tokens = sum(t.tokens for t in timings)
    ended = [t.ended or t.started for t in timings]
    wall = max(ended) - min(t.started for t in timings)
    decode = [
        (t.tokens - t.first_tokens) / (end - t.first) for t, end in zip(timings, ended) if t.first and end > t.first
    ]
    server_cpu = None if server_before is None or server_after is None else server_after - server_before
    return {
        "tokens": tokens,
        "min_tokens": min(t.tokens for t in timings),
        "wall_s": wall,
        "aggregate_tps": tokens / wall if wall > 0 else 0.0,
        "ttft_ms": statistics.fmean(t.ttft_ms for t in timings),
        "decode_tps_per_stream": statistics.fmean(decode) if decode else 0.0,
        "engine_decode_tps": statistics.fmean(t.engine_decode_tps for t in timings),
        "server_cpu_ms_per_token": 1000.0 * server_cpu / tokens if server_cpu is not None and tokens else -1.0,
        "client_cpu_ms_per_token": 1000.0 * (client_after - client_before) / tokens if tokens else 0.0,
    }


def same_work(client: Client, prompt_ids: list[int], options: CompletionOptions) -> dict[str, Any]:
    """One stream of each (also the warm-up): the prompt tokens each computed and whether they
    generated the same tokens, so the comparison is on identical work."""
    with client.chat_stream(MESSAGES, options) as chat:
        chat_ids = [t for chunk in chat for t in chunk.token_ids]
        chat_done = chat.completion
    with client.stream(prompt_ids, options) as complete:
        complete_ids = [t for chunk in complete for t in chunk.token_ids]
        complete_done = complete.completion
    assert chat_done is not None and complete_done is not None
    return {
        "prompt_tokens": {"chat": chat_done.usage.prompt_tokens, "complete": complete_done.usage.prompt_tokens},
        "generated": {"chat": len(chat_ids), "complete": len(complete_ids)},
        "same_output": chat_ids == complete_ids,
    }


def chat_vs_complete(
    client: Client, server_pid: int, prompt_ids: list[int], options: CompletionOptions, reps: int
) -> dict[str, dict[str, list[dict[str, float]]]]:
    starts: dict[str, Callable[[], ChunkStream]] = {
        "complete": lambda: client.stream(prompt_ids, options),
        "chat": lambda: client.chat_stream(MESSAGES, options),
    }
    rounds: dict[str, dict[str, list[dict[str, float]]]] = {str(n): {s: [] for s in SIDES} for n in CONCURRENCY}
    for rep in range(reps):
        order = SIDES if rep % 2 == 0 else SIDES[::-1]
        for streams in CONCURRENCY:
            for side in order:
                rounds[str(streams)][side].append(timed_round(starts[side], streams, server_pid))
    return rounds


# ---- part 2: a multi-turn session -----------------------------------------------------------


def conversation(client: Client, label: str, turns: int, options: CompletionOptions) -> list[dict[str, float]]:
    """One `ChatSession` of `turns` turns; per turn: tokens and TTFT (to the first chunk with a token)."""
    session = client.chat_session(system=f"Conversation {label}. You are a patient writing tutor.")
    rows = []
    for i in range(turns):
        start = time.perf_counter()
        first: Optional[float] = None

        def on_chunk(chunk: ChatChunk) -> None:
            nonlocal first
            if first is None and chunk.token_ids:
                first = time.perf_counter() - start

        reply = session.send(user_turn(i), options, on_chunk)
        rows.append(
            {
                "turn": i + 1,
                "prompt_tokens": reply.usage.prompt_tokens,
                "cached_tokens": reply.usage.cached_tokens,
                "completion_tokens": reply.usage.completion_tokens,
                "ttft_ms": 1000.0 * (first if first is not None else time.perf_counter() - start),
                "engine_ttft_ms": reply.timings.time_to_first_token_ms,
            }
        )
    return rows


Conversation = list[dict[str, float]]


def sessions(client: Client, turns: int, options: CompletionOptions, reps: int) -> dict[str, list[Conversation]]:
    """`reps` conversations with the cache on and as many with it off, interleaved; each
    conversation has its own system prompt, so none finds another's turns in the cache."""
    out: dict[str, list[Conversation]] = {"on": [], "off": []}
    for rep in range(reps):
        for mode in ("on", "off") if rep % 2 == 0 else ("off", "on"):
            cache = dataclasses.replace(options, cache_prompt=mode == "on")
            out[mode].append(conversation(client, f"{rep + 1}{mode}", turns, cache))
    return out


# ---- the run and its report -------------------------------------------------------------------


def run(
    model_name: str,
    model_path: str,
    threads: int,
    n_predict: int,
    reps: int,
    n_ctx: int,
    parallel: int,
    timeout: float,
    turns: int = 5,
    turn_tokens: int = 32,
    markdown: Path = DOC,
) -> dict[str, Any]:
    if parallel < max(CONCURRENCY):
        raise ValueError(f"the chat scenario runs {max(CONCURRENCY)} streams at once: --parallel must be >= that")
    OUT.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {
        "measured_at": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "config": {
            "model": model_name, "model_path": model_path, "threads": threads, "n_predict": n_predict,
            "reps": reps, "n_ctx": n_ctx, "parallel": parallel, "turns": turns, "turn_tokens": turn_tokens,
        },  # fmt: skip
        "environment": {"cpu": cpu_name(), "cores": os.cpu_count(), "load_before": loadavg_text()},
    }
    prompt_text = render(model_path, MESSAGES)
    with serve(model_path, threads, n_ctx, parallel, OUT / "chat.server.log") as (address, pid):
        with Client(address, timeout=timeout) as client:
            prompt_ids = client.tokenize(prompt_text, add_special=True)
            bias = end_of_generation_bias(client)
            options = CompletionOptions(n_predict, logit_bias=bias, cache_prompt=False)
            results["check"] = same_work(client, prompt_ids, options)
            results["check"]["rendered_prompt_tokens"] = len(prompt_ids)
            results["check"]["eog_banned"] = len(bias)
            results["ab"] = chat_vs_complete(client, pid, prompt_ids, options, reps)
    # The session's history outgrows the A/B server's slots: its own server, 2 slots.
    slot_ctx = max(2048, 256 * (turns + 2))
    with serve(model_path, threads, 2 * slot_ctx, 2, OUT / "chat.session.server.log") as (address, _pid):
        with Client(address, timeout=timeout) as client:
            options = CompletionOptions(turn_tokens, logit_bias=end_of_generation_bias(client))
            client.create_chat_completion(MESSAGES, CompletionOptions(8))  # warm-up
            results["session"] = sessions(client, turns, options, reps)
            results["config"]["session_slot_ctx"] = slot_ctx
    results["environment"]["load_after"] = loadavg_text()
    results["summary"] = summarize(results)
    (OUT / "chat.json").write_text(json.dumps(results, indent=2, default=str))
    markdown.parent.mkdir(parents=True, exist_ok=True)
    markdown.write_text(report(results))
    return results


def _spread(values: Sequence[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def summarize(results: dict[str, Any]) -> dict[str, Any]:
    """Medians and ranges over the rounds; Chat / Complete per interleaved pair of rounds."""
    ab: dict[str, Any] = {}
    for streams, sides in results["ab"].items():
        row: dict[str, Any] = {}
        for side, rounds in sides.items():
            row[side] = {key: _spread([r[key] for r in rounds]) for key in rounds[0]}
        pairs = list(zip(sides["chat"], sides["complete"]))
        row["chat_vs_complete"] = _spread([c["aggregate_tps"] / p["aggregate_tps"] for c, p in pairs])
        cpu = [(c["server_cpu_ms_per_token"], p["server_cpu_ms_per_token"]) for c, p in pairs]
        row["server_cpu_chat_vs_complete"] = _spread([c / p for c, p in cpu if c > 0 and p > 0] or [0.0])
        ab[streams] = row
    session: dict[str, Any] = {}
    for mode, convs in results["session"].items():
        session[mode] = [
            {key: _spread([conv[i][key] for conv in convs]) for key in convs[0][i] if key != "turn"}
            for i in range(len(convs[0]))
        ]
    return {"ab": ab, "session": session}


def _range(s: dict[str, float], digits: int = 1, scale: float = 1.0) -> str:
    return f"{s['median'] * scale:,.{digits}f} ({s['min'] * scale:,.{digits}f}–{s['max'] * scale:,.{digits}f})"


def _percent(s: dict[str, float]) -> str:
    return f"{s['median']:.1%} ({s['min']:.1%}–{s['max']:.1%})"


def report(results: dict[str, Any]) -> str:
    cfg, env, check, summary = results["config"], results["environment"], results["check"], results["summary"]
    ab, session = summary["ab"], summary["session"]
    lines = [
        "# Chat performance",
        "",
        f"Generated by `python bench/run.py --scenario chat --model {cfg['model']} --threads {cfg['threads']} "
        f"--n-predict {cfg['n_predict']} --reps {cfg['reps']}` (or `python bench/chat.py` with the same options); "
        "do not edit by hand, run it again.",
        "",
        f"- Measured: {results['measured_at']} on {env['cpu']} ({env['cores']} cores), "
        f"load average before/after: {env['load_before']} / {env['load_after']}.",
        f"- Model: `{cfg['model']}`, {cfg['threads']} threads, `llama-crab serve` with {cfg['parallel']} slots "
        f"sharing {cfg['n_ctx']} tokens of context, through `llama_crab_client.Client` in the benchmark process.",
        "",
        "## Streaming `Chat` vs `Complete`",
        "",
        "The same conversation (system + user message) rendered by the chat template: "
        f"{check['rendered_prompt_tokens']} tokens; prompt tokens computed by Chat / Complete: "
        f"{check['prompt_tokens']['chat']} / "
        f"{check['prompt_tokens']['complete']}; generated tokens identical: "
        f"{'yes' if check['same_output'] else '**no**'} ({check['generated']['chat']} / "
        f"{check['generated']['complete']} in the check). {cfg['n_predict']} tokens per stream, "
        f"{check['eog_banned']} end-of-generation tokens banned, greedy, prefix cache off for both. "
        f"Median (lowest–highest) of {cfg['reps']} interleaved rounds per side.",
        "",
        "| streams | side | aggregate tok/s | decode tok/s per stream | TTFT (ms) | server CPU ms/token "
        "| client CPU ms/token |",
        "|---:|---|---:|---:|---:|---:|---:|",
    ]
    for streams, row in ab.items():
        for side in SIDES:
            s = row[side]
            lines.append(
                f"| {streams} | {side.capitalize()} | {_range(s['aggregate_tps'])} "
                f"| {_range(s['decode_tps_per_stream'])} | {_range(s['ttft_ms'])} "
                f"| {_range(s['server_cpu_ms_per_token'], 2)} | {_range(s['client_cpu_ms_per_token'], 2)} |"
            )
    lines += [
        "",
        "| streams | Chat / Complete, aggregate tok/s (per pair of rounds) | target | "
        "server CPU per token, Chat / Complete |",
        "|---:|---:|---:|---:|",
    ]
    for streams, row in ab.items():
        ratio = row["chat_vs_complete"]
        verdict = "met" if ratio["median"] >= TARGET else "**missed**"
        lines.append(
            f"| {streams} | {_percent(ratio)} "
            f"| ≥ {TARGET:.0%} ({verdict}) | {_range(row['server_cpu_chat_vs_complete'], 2)} |"
        )
    short = [
        f"{streams} stream(s), {side}" for streams, sides in results["ab"].items() for side, rounds in sides.items()
        if any(r["min_tokens"] < cfg["n_predict"] for r in rounds)
    ]  # fmt: skip
    if short:
        lines += ["", f"Warning: some streams ended before {cfg['n_predict']} tokens ({'; '.join(short)}); "
                  "their rates are not comparable."]
    on, off = session["on"], session["off"]
    lines += [
        "",
        f"## A {cfg['turns']}-turn conversation",
        "",
        f"`client.chat_session(system=...)`, `session.send(text, CompletionOptions({cfg['turn_tokens']}))`: each turn "
        "re-sends the whole history; user turns of ~160 tokens, replies of "
        f"{cfg['turn_tokens']} tokens (end-of-generation banned). The prefix cache on vs off per request "
        f"(`cache_prompt`), {cfg['reps']} conversations each, interleaved, each with its own system prompt; "
        f"a server with 2 slots of {cfg.get('session_slot_ctx', '?')} tokens. TTFT from the call to the first chunk "
        "with a token, median (lowest–highest).",
        "",
        "| turn | prompt tokens | cached, cache on | TTFT cache on (ms) | cached, cache off | TTFT cache off (ms) "
        "| off / on |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for i, (a, b) in enumerate(zip(on, off)):
        lines.append(
            f"| {i + 1} | {a['prompt_tokens']['median']:.0f} | {a['cached_tokens']['median']:.0f} "
            f"| {_range(a['ttft_ms'], 0)} | {b['cached_tokens']['median']:.0f} | {_range(b['ttft_ms'], 0)} "
            f"| {b['ttft_ms']['median'] / a['ttft_ms']['median']:.1f}× |"
        )
    if len(on) > 1:
        growth_on = on[-1]["ttft_ms"]["median"] / on[1]["ttft_ms"]["median"]
        growth_off = off[-1]["ttft_ms"]["median"] / off[1]["ttft_ms"]["median"]
        prompt_growth = on[-1]["prompt_tokens"]["median"] / on[1]["prompt_tokens"]["median"]
        computed = [a["prompt_tokens"]["median"] - a["cached_tokens"]["median"] for a in on[1:]]
        lines += [
            "",
            f"From turn 2 to turn {len(on)} the prompt grows {prompt_growth:.1f}×; TTFT grows {growth_on:.2f}× with "
            f"the cache on (each turn computes {min(computed):.0f}–{max(computed):.0f} new tokens, against a longer "
            f"cached history each time) and {growth_off:.2f}× with it off (the whole "
            "history computed every turn). Turn 1 computes the whole prompt either way.",
        ]
    lines += [
        "",
        "## How it is measured",
        "",
        "- **Same work on both sides**: the conversation is rendered once in the benchmark process with "
        "`Llama.apply_chat_template`, tokenized by the server with `add_special=True` (BOS as the vocabulary asks, special tokens parsed), "
        "as `Chat` tokenizes its rendered prompt, and sent to `Complete` as token ids; `Chat` gets the messages. "
        "The check above compares the prompt tokens each computed and the tokens each generated.",
        "- **Rounds**: for each repetition, for 1 and then 8 concurrent streams, one round of `Complete` and one of "
        "`Chat`, the side that goes first alternating between repetitions; concurrent streams share one channel "
        "and start together behind a barrier (`service.run_concurrent`).",
        "- **Aggregate tok/s** = all generated tokens / wall time from the first stream's start to the last "
        "stream's end (its final message received: for `Chat` that includes the final parse). **Decode tok/s per "
        "stream** = tokens after the first chunk's / time from the first chunk to the stream's end. The ratio is "
        "taken per pair of rounds run back to back, then its median and range.",
        "- **CPU per token**: the server's user + system time from `/proc/PID/stat` (every thread, 10 ms "
        "ticks) and this process's `time.process_time()` (the client: gRPC threads, protobuf decoding, "
        "building `Chunk`/`ChatChunk`s), around each round, over the tokens of the round. Client and server "
        "share the machine's cores. With as many threads as cores the server's compute threads are busy for the "
        "whole round, so its CPU per token is close to threads × wall time / tokens and follows throughput; "
        "the client's is the part that is the client's own work.",
        "- **Session**: TTFT is seen by the client (send to the first chunk with a token); `cached` is "
        "`usage.cached_tokens`, the prompt tokens the prefix cache supplied.",
        "",
        "Reproduce: `python bench/run.py --scenario chat [--model NAME] [--threads N] [--n-predict 128] [--reps 5]` "
        "or `python bench/chat.py [--turns 5] [--turn-tokens 32]` (raw numbers: `bench/out/chat.json`). "
        "The rest of the benchmarks: [performance.md](performance.md).",
        "",
    ]
    return "\n".join(lines)


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    parser.add_argument("--n-predict", type=int, default=128, help="tokens per stream, Chat vs Complete (default: 128)")
    parser.add_argument("--reps", type=int, default=5, help="rounds per side and conversations per mode (default: 5)")
    parser.add_argument("--n-ctx", type=int, default=4096, help="context shared by the slots (default: %(default)s)")
    parser.add_argument("--parallel", type=int, default=max(CONCURRENCY), help="server slots (default: %(default)s)")
    parser.add_argument("--turns", type=int, default=5, help="turns of the session (default: %(default)s)")
    parser.add_argument("--turn-tokens", type=int, default=32, help="tokens per reply in the session (default: 32)")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds one call may take (default: 300)")
    parser.add_argument("--markdown", type=Path, default=DOC)
    args = parser.parse_args(argv)
    for name in ("threads", "n_predict", "reps", "n_ctx", "parallel", "turns", "turn_tokens"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.parallel < max(CONCURRENCY):
        parser.error(f"--parallel must be >= {max(CONCURRENCY)} (the most concurrent streams)")
    if args.n_ctx // args.parallel < args.n_predict + 64:
        parser.error("--n-ctx / --parallel must hold the prompt plus --n-predict tokens per slot")
    return args


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    from llama_crab import models

    try:
        model = models.ensure(args.model)
    except (ValueError, RuntimeError) as e:
        print(f"bench: {e}", file=sys.stderr)
        return 2
    results = run(
        args.model, model, args.threads, args.n_predict, args.reps, args.n_ctx, args.parallel, args.timeout,
        args.turns, args.turn_tokens, args.markdown,
    )  # fmt: skip
    print(report(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
