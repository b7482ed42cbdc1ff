"""Deterministic mode: a greedy request's tokens and logprobs are bit-identical to the same
request run alone with the cache off, whatever ran beside it, however its prompt was
prefilled, wherever its prefix came from, and with speculation. Exact equality: no near-tie
rule here (the default mode keeps that rule, in test_prefix_cache and test_speculative).

In the default mode these same conditions change the logprobs, and on smollm2 even the first
token (bench/determinism.py --check; counts in docs/determinism.md).
"""

from __future__ import annotations

import argparse
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from llama_crab import CompletionOptions, InvalidArgumentError, Llama, LlamaParams, Speculative, StreamControl
from llama_crab.models import ensure
from llama_crab.server.config import add_serve_parser, config_from_args
from llama_crab.server.testing import start_test_server
from llama_crab_client import Client

MODELS = ("smollm2-135m", "gemma3-270m", "qwen2.5-coder-0.5b")
# ~300 tokens: enough for the prefix cache to matter and for a lone stream's KV to pass 256
# cells (where the default CPU attention splits the KV across threads).
PREFIX = " ".join(f"Record {i}: the {('red', 'green', 'blue')[i % 3]} box holds {i * 7 % 11} keys." for i in range(20))
PROMPT = PREFIX + "\nQuestion: which boxes hold exactly three keys? Answer:"
OTHER = PREFIX + "\nQuestion: how many boxes are blue? Answer:"
N_PARALLEL = 8

Result = tuple[tuple[int, ...], tuple[float, ...]]


def greedy(n: int = 24, cache_prompt: bool = True) -> CompletionOptions:
    return CompletionOptions(n, samplers=("top_k",), top_k=1, logprobs=0, cache_prompt=cache_prompt, ignore_eos=True)


def run(llm: Llama, prompt: str, options: CompletionOptions) -> Result:
    c = llm.create_completion(prompt, options)
    assert c.logprobs is not None and len(c.token_ids) == options.max_tokens
    return c.token_ids, tuple(lp.logprob for lp in c.logprobs)


def run_remote(llm: Llama, prompt: str, options: CompletionOptions) -> Result:
    """The same request over gRPC, served by `llm`."""
    server = start_test_server(llm)
    try:
        with Client(server.address) as client:
            c = client.create_completion(prompt, options)
    finally:
        server.stop()
    assert c.logprobs is not None
    return c.token_ids, tuple(lp.logprob for lp in c.logprobs)


def load(path: str, **kw: Any) -> Llama:
    return Llama.load(LlamaParams(path, n_ctx=768 * N_PARALLEL, n_parallel=N_PARALLEL, deterministic=True, **kw))


@pytest.fixture(scope="module", params=MODELS)
def model(request: pytest.FixtureRequest) -> str:
    return ensure(request.param)


@pytest.fixture(scope="module")
def engine(model: str) -> Iterator[Llama]:
    with load(model) as llm:
        yield llm


@pytest.fixture(scope="module")
def alone(engine: Llama) -> Result:
    """The reference: the request alone, its prompt prefilled from nothing."""
    return run(engine, PROMPT, greedy(cache_prompt=False))


def test_among_seven_concurrent_requests(engine: Llama, alone: Result) -> None:
    results: dict[int, Result] = {}

    def one(i: int) -> None:
        prompt = PROMPT if i == 0 else f"Story {i}: once upon a time"
        results[i] = run(engine, prompt, greedy(cache_prompt=False))

    threads = [threading.Thread(target=one, args=(i,)) for i in range(N_PARALLEL)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results[0] == alone


def test_after_a_cached_shared_prefix(engine: Llama, alone: Result) -> None:
    run(engine, OTHER, greedy(2))  # leaves PREFIX in a slot
    before = engine.metrics().cache_hit_tokens_total
    assert run(engine, PROMPT, greedy()) == alone
    assert engine.metrics().cache_hit_tokens_total - before > 200  # the prefix did come from the cache


def test_prefilled_while_four_others_decode(engine: Llama, alone: Result) -> None:
    decoding = [threading.Event() for _ in range(4)]
    stop = threading.Event()

    def long_stream(i: int) -> None:
        def on_chunk(_chunk: Any) -> StreamControl:
            decoding[i].set()
            return StreamControl.STOP if stop.is_set() else StreamControl.CONTINUE

        engine.create_completion_stream(f"List {i}: 1, 2, 3,", greedy(2000, cache_prompt=False), on_chunk)

    threads = [threading.Thread(target=long_stream, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    try:
        assert all(e.wait(60) for e in decoding)
        assert run(engine, PROMPT, greedy(cache_prompt=False)) == alone
    finally:
        stop.set()
        for t in threads:
            t.join()


def test_prefilled_in_small_chunks(model: str, alone: Result) -> None:
    with load(model, n_batch=64, n_ubatch=64) as llm:
        assert run(llm, PROMPT, greedy(cache_prompt=False)) == alone
        assert run_remote(llm, PROMPT, greedy(cache_prompt=False)) == alone


def test_with_speculation(model: str, engine: Llama) -> None:
    # Text every catalogue model copies, so n-gram drafts are proposed and verified.
    block = "\n".join(f"Record {i}: the {('red', 'green', 'blue')[i % 3]} box holds {i * 7 % 11} keys." for i in range(8))
    prompt = f"{block}\n\n{block}\n\n{block[:60]}"
    alone = run(engine, prompt, greedy(cache_prompt=False))
    spec = Speculative(types=("ngram-simple",), ngram_size_n=3, ngram_size_m=8)
    with load(model, speculative=spec) as llm:
        c = llm.create_completion(prompt, greedy(cache_prompt=False))
        assert c.logprobs is not None
        assert (c.token_ids, tuple(lp.logprob for lp in c.logprobs)) == alone
        # Drafts were verified in multi-row batches, which is what could have changed it.
        assert c.timings.draft_tokens > 0
        assert run_remote(llm, prompt, greedy(cache_prompt=False)) == alone


def test_after_a_session_restore(model: str, engine: Llama, alone: Result, tmp_path: Path) -> None:
    run(engine, OTHER, greedy(2))
    a, b = engine.tokenize(OTHER), engine.tokenize(PROMPT)
    shared = next(i for i, (x, y) in enumerate(zip(a, b)) if x != y) - 1
    engine.save_session(a[:shared], tmp_path / "prefix.session")
    with load(model) as fresh:
        fresh.load_session(tmp_path / "prefix.session")
        assert run(fresh, PROMPT, greedy()) == alone
        assert fresh.metrics().cache_hit_tokens_total > 200


def test_over_grpc_alone_among_others_cached_and_beside_decoding(engine: Llama, alone: Result) -> None:
    server = start_test_server(engine)
    try:
        with Client(server.address) as client:
            ref = client.create_completion(PROMPT, greedy(cache_prompt=False))
            results: dict[int, Any] = {}

            def one(i: int) -> None:
                prompt = PROMPT if i == 0 else f"Story {i}: once upon a time"
                results[i] = client.create_completion(prompt, greedy(cache_prompt=False))

            threads = [threading.Thread(target=one, args=(i,)) for i in range(N_PARALLEL)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            client.create_completion(OTHER, greedy(2))
            cached = client.create_completion(PROMPT, greedy())
            # Prefilled while four other gRPC streams decode.
            streams = [client.stream(f"List {i}: 1, 2, 3,", greedy(2000, cache_prompt=False)) for i in range(4)]
            try:
                for s in streams:
                    next(iter(s))  # each is decoding
                beside = client.create_completion(PROMPT, greedy(cache_prompt=False))
            finally:
                for s in streams:
                    s.close()  # STOP
    finally:
        server.stop()
    # Over the wire, the same bits as in process.
    for got in (ref, results[0], cached, beside):
        assert got.token_ids == alone[0] and got.logprobs is not None
        assert tuple(lp.logprob for lp in got.logprobs) == alone[1]


def test_needs_flash_attention() -> None:
    with pytest.raises(InvalidArgumentError) as e:
        Llama.load(LlamaParams(ensure("smollm2-135m"), deterministic=True, flash_attn="off"))
    assert e.value.field == "deterministic"


def test_serve_flag_alone_means_true() -> None:
    p = argparse.ArgumentParser(prog="llama-crab")
    add_serve_parser(p.add_subparsers(dest="command", required=True))
    assert config_from_args(p.parse_args(["serve", "--deterministic"]), environ={}).deterministic is True
    assert config_from_args(p.parse_args(["serve", "--deterministic", "false"]), environ={}).deterministic is False
    assert config_from_args(p.parse_args(["serve"]), environ={"LLAMA_CRAB_DETERMINISTIC": "1"}).deterministic is True
    assert config_from_args(p.parse_args(["serve"]), environ={}).deterministic is False


def test_lowlevel_switches_make_a_row_independent_of_its_batch() -> None:
    """The low-level API's switches: five identical sequences decode one token in one batch;
    with reference kernels and no repacked weights every row's logits are the same bits
    (rows 0-3 and row 4 would otherwise go through different matmul kernels), and a token
    decoded alone equals the same token beside others."""
    from llama_crab.lowlevel import Batch, Context, Model

    with Model.load(ensure("qwen2.5-coder-0.5b"), use_extra_bufts=False) as model:
        tokens = list(model.tokenize(PREFIX))[:300]
        with Context(model, n_ctx=6 * 1024, n_seq_max=6, cpu_reference_kernels=True, flash_attn="on") as ctx:
            batch = Batch(512)
            batch.add_tokens(tokens, seq_id=0)
            ctx.decode(batch)
            for seq in range(1, 5):
                ctx.seq_cp(0, seq)
            batch.clear()
            batch.add(tokens[5], len(tokens), 0, logits=True)
            ctx.decode(batch)
            alone = list(ctx.logits(0))
            ctx.seq_rm(0, len(tokens), -1)
            batch.clear()
            for seq in range(5):
                batch.add(tokens[5], len(tokens), seq, logits=True)
            ctx.decode(batch)
            rows = [list(ctx.logits(i)) for i in range(5)]
    assert all(row == alone for row in rows)
