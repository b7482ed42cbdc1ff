"""The prefix cache on the real model: a request reuses the KV of the longest prompt prefix
a slot (or the host-RAM cache) holds, reports it in `usage.cached_tokens`, and generates
what a cold run generates."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from helpers import wait_until
from llama_crab import Completion, CompletionOptions, Llama, LlamaParams

SLOTS = 4
GREEDY = CompletionOptions(16)


def long_text(topic: str, n_sentences: int = 30) -> str:
    """A prompt of a few hundred tokens whose start differs by topic."""
    return f"Notes on {topic}. " + " ".join(f"Fact {i} about {topic} is worth writing down." for i in range(n_sentences))


@pytest.fixture(scope="module")
def cached(model_path: str) -> Iterator[Llama]:
    # 1024 tokens per slot; a small RAM cache so eviction can be seen.
    with Llama.load(LlamaParams(model_path, n_ctx=4096, n_parallel=SLOTS, cache_ram_mib=64)) as llama:
        yield llama


def same_or_near_tie(llama: Llama, prompt: list[int], cold: Completion, warm: Completion) -> None:
    """Greedy warm output equals cold, or first differs where the cold run had a near-tie
    (llama.cpp's arithmetic differs slightly between a full and a partial prefill)."""
    if warm.token_ids == cold.token_ids:
        return
    i = next(i for i, (a, b) in enumerate(zip(cold.token_ids, warm.token_ids)) if a != b)
    probe = llama.create_completion(
        prompt + list(cold.token_ids[:i]), CompletionOptions(1, logprobs=2, cache_prompt=False)
    )
    assert probe.logprobs is not None
    top = probe.logprobs[0].top
    assert abs(top[0].logprob - top[1].logprob) < 0.05, f"token {i} differs without a near-tie: {top}"


def test_second_request_reuses_the_prefix_and_generates_the_same(cached: Llama) -> None:
    prompt = cached.tokenize(long_text("rivers"))
    assert len(prompt) >= 300
    cold = cached.create_completion(prompt, GREEDY.with_cache_prompt(False))
    assert cold.usage.cached_tokens == 0
    first = cached.create_completion(prompt, GREEDY)
    warm = cached.create_completion(prompt, GREEDY)
    # Everything but the last prompt token (its logits are needed) came from the cache.
    assert warm.usage.cached_tokens == len(prompt) - 1
    assert first.usage.prompt_tokens == warm.usage.prompt_tokens == len(prompt)
    same_or_near_tie(cached, prompt, cold, warm)


def test_a_prompt_that_diverges_reuses_exactly_the_common_prefix(cached: Llama) -> None:
    prompt = cached.tokenize(long_text("mountains"))
    cached.create_completion(prompt, CompletionOptions(2))
    cut = len(prompt) // 2
    other = prompt[:cut] + cached.tokenize(" Something else entirely follows here.", add_special=False)
    result = cached.create_completion(other, CompletionOptions(2))
    assert result.usage.cached_tokens == cut


def test_cache_prompt_false_computes_everything(cached: Llama) -> None:
    prompt = cached.tokenize(long_text("lakes"))
    cached.create_completion(prompt, CompletionOptions(2))
    again = cached.create_completion(prompt, CompletionOptions(2, cache_prompt=False))
    assert again.usage.cached_tokens == 0


def test_concurrent_prefixes_find_their_own_slots_again(cached: Llama) -> None:
    prompts = [cached.tokenize(long_text(topic, 20)) for topic in ("owls", "ferns", "comets", "harbours")]
    results: list[list[Completion]] = [[], [], [], []]

    def run(i: int) -> None:
        results[i].append(cached.create_completion(prompts[i], CompletionOptions(4)))

    for _round in range(2):
        threads = [threading.Thread(target=run, args=(i,)) for i in range(SLOTS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
    for i, (first, second) in enumerate(results):
        assert second.usage.cached_tokens == len(prompts[i]) - 1, f"prefix {i} lost its slot"


def test_ram_cache_restores_an_evicted_prefix_within_its_budget(cached: Llama) -> None:
    # More distinct prefixes than slots, one after another: the first is evicted from
    # every slot, then must come back from RAM.
    prompts = [cached.tokenize(long_text(f"topic number {i}", 20)) for i in range(SLOTS + 2)]
    for prompt in prompts:
        cached.create_completion(prompt, CompletionOptions(2))
    before = cached.metrics()
    assert before.ram_cache_entries >= 1
    assert 0 < before.ram_cache_bytes <= before.ram_cache_budget == 64 << 20
    again = cached.create_completion(prompts[0], CompletionOptions(2))
    assert again.usage.cached_tokens == len(prompts[0]) - 1
    after = cached.metrics()
    assert after.ram_cache_restores_total == before.ram_cache_restores_total + 1
    assert after.ram_cache_bytes <= after.ram_cache_budget


def test_ram_cache_never_exceeds_a_small_budget(model_path: str) -> None:
    # A budget that holds about two of these prefixes: it evicts instead of growing.
    with Llama.load(LlamaParams(model_path, n_ctx=1024, n_parallel=1, cache_ram_mib=8)) as llama:
        for i in range(8):
            llama.create_completion(long_text(f"subject {i}", 10), CompletionOptions(1))
            m = llama.metrics()
            assert m.ram_cache_bytes <= m.ram_cache_budget == 8 << 20
        assert llama.metrics().ram_cache_saves_total >= 5
        assert 1 <= llama.metrics().ram_cache_entries < 8


def test_cancel_during_prefill_leaves_the_slot_correct(model_path: str) -> None:
    params = LlamaParams(model_path, n_ctx=2048, n_batch=32, n_parallel=1, cache_ram_mib=0)
    with Llama.load(params) as llama:
        prompt = llama.tokenize(long_text("glaciers", 40))
        cold = llama.create_completion(prompt, GREEDY.with_cache_prompt(False))
        llama.create_completion("Something unrelated.", CompletionOptions(1))  # displaces it
        steps = llama.metrics().decode_steps_total
        handle = llama.submit(prompt, CompletionOptions(4))
        # Prefilled in 32-token pieces: cancel once part of it is in.
        assert wait_until(lambda: llama.metrics().decode_steps_total >= steps + 2)
        handle.cancel()
        handle.close()
        warm = llama.create_completion(prompt, GREEDY)
        # It reuses what the cancelled prefill had computed, and only that.
        assert 0 < warm.usage.cached_tokens < len(prompt) - 1
        same_or_near_tie(llama, prompt, cold, warm)


def test_with_cache_off_the_engine_behaves_as_before(model_path: str) -> None:
    with Llama.load(LlamaParams(model_path, n_ctx=1024).with_cache_prompt(False)) as llama:
        prompt = long_text("deserts", 10)
        a = llama.create_completion(prompt, GREEDY)
        b = llama.create_completion(prompt, GREEDY)
        assert a.usage.cached_tokens == b.usage.cached_tokens == 0
        assert a.token_ids == b.token_ids
        assert llama.metrics().ram_cache_entries == 0


def test_a_session_prefills_only_the_new_tokens_each_turn(cached: Llama) -> None:
    session = cached.session()
    turns = [long_text("the history of bread", 15)] + [f" Question {i}: what comes next?" for i in range(4)]
    for i, text in enumerate(turns):
        before = len(session.tokens)
        completion = session.create_completion(text, CompletionOptions(8))
        new_tokens = completion.usage.prompt_tokens - before
        if i == 0:
            assert completion.usage.cached_tokens < 10  # at most "Notes on" was seen before
        else:
            # All the history but its last token (generated, never decoded) came from the cache.
            assert completion.usage.cached_tokens >= before - 1
            assert completion.usage.prompt_tokens - completion.usage.cached_tokens <= new_tokens + 1
        assert session.tokens[-len(completion.token_ids) :] == list(completion.token_ids)


def test_a_session_equals_sending_the_whole_history(cached: Llama) -> None:
    session = cached.session()
    first = session.create_completion("The capital of France is", CompletionOptions(6))
    second = session.create_completion(" and the capital of Spain is", CompletionOptions(6))
    history = cached.tokenize("The capital of France is") + list(first.token_ids)
    history += cached.tokenize(" and the capital of Spain is", add_special=False)
    assert second.usage.prompt_tokens == len(history)
    cold = cached.create_completion(history, CompletionOptions(6, cache_prompt=False))
    same_or_near_tie(cached, history, cold, second)


def test_session_save_and_load_round_trip(cached: Llama, model_path: str, tmp_path: Path) -> None:
    session = cached.session()
    session.create_completion(long_text("tea", 10), CompletionOptions(8))
    session.create_completion(" And then?", CompletionOptions(8))
    path = tmp_path / "tea.session"
    session.save(str(path))
    expected = session.create_completion(" Finally:", CompletionOptions(8, cache_prompt=False))
    # A fresh engine (as many slots: llama.cpp's state records the layout): the state
    # comes from the file, not from a slot.
    with Llama.load(LlamaParams(model_path, n_ctx=4096, n_parallel=SLOTS)) as other:
        restored = other.load_session(path)
        assert restored.tokens == session.tokens[: len(restored.tokens)]
        assert other.metrics().ram_cache_entries == 1
        held = len(restored.tokens)
        again = restored.create_completion(" Finally:", CompletionOptions(8))
        assert again.usage.cached_tokens >= held - 1
        history = restored.tokens[: again.usage.prompt_tokens]
        same_or_near_tie(other, history, expected, again)


def test_a_session_file_from_another_model_or_damaged_is_refused(cached: Llama, tmp_path: Path) -> None:
    from llama_crab import InvalidArgumentError
    from llama_crab.session_file import MAGIC

    session = cached.session()
    session.create_completion("Hello there", CompletionOptions(4))
    path = tmp_path / "s.session"
    session.save(str(path))
    raw = path.read_bytes()
    n = int.from_bytes(raw[len(MAGIC) : len(MAGIC) + 4], "little")
    header = json.loads(raw[len(MAGIC) + 4 : len(MAGIC) + 4 + n])
    header["model"]["name"] = "some-other-model"
    forged = json.dumps(header).encode()
    (tmp_path / "other.session").write_bytes(MAGIC + len(forged).to_bytes(4, "little") + forged + raw[len(MAGIC) + 4 + n :])
    with pytest.raises(InvalidArgumentError, match="some-other-model") as exc:
        cached.load_session(tmp_path / "other.session")
    assert exc.value.field == "session"
    # A damaged state (same header, truncated KV bytes) is refused, not loaded or fatal.
    (tmp_path / "cut.session").write_bytes(raw[: len(raw) - 1000])
    with pytest.raises(InvalidArgumentError) as exc:
        cached.load_session(tmp_path / "cut.session")
    assert exc.value.field == "session"
    (tmp_path / "junk.session").write_bytes(b"not a session at all")
    with pytest.raises(InvalidArgumentError, match="not a llama-crab session"):
        cached.load_session(tmp_path / "junk.session")
    assert cached.create_completion("Hello there", CompletionOptions(4)).usage.completion_tokens == 4


def test_a_grpc_session_hits_the_servers_cache(cached: Llama) -> None:
    from llama_crab.server.testing import start_test_server
    from llama_crab_client import Client

    with start_test_server(cached) as server, Client(server.address) as client:
        session = client.session()
        first = session.create_completion(long_text("kites", 12), CompletionOptions(6))
        second = session.create_completion(" What else?", CompletionOptions(6))
        assert second.usage.cached_tokens >= first.usage.prompt_tokens + len(first.token_ids) - 1
        assert session.tokens[-len(second.token_ids) :] == list(second.token_ids)
        with pytest.raises(TypeError):
            session.save("nowhere")
        # The reuse shows in the server's metrics too.
        assert server.metrics.value("llama_crab_cache_hit_tokens_total") >= second.usage.cached_tokens
        assert server.metrics.value("llama_crab_ram_cache_bytes") <= 64 << 20


def test_a_session_file_loads_into_another_slot_layout_without_its_kv(cached: Llama, model_path: str, tmp_path: Path) -> None:
    session = cached.session()
    session.create_completion(long_text("salt", 6), CompletionOptions(4))
    session.save(str(tmp_path / "salt.session"))
    with Llama.load(LlamaParams(model_path, n_ctx=2048, n_parallel=2)) as other:
        restored = other.load_session(tmp_path / "salt.session")
        assert restored.tokens == session.tokens
        nxt = restored.create_completion(" More:", CompletionOptions(4))
        assert nxt.usage.cached_tokens < 10  # recomputed once, correctly
        assert nxt.usage.prompt_tokens == len(session.tokens) + len(other.tokenize(" More:", add_special=False))


def test_an_asyncio_session_hits_the_servers_cache(cached: Llama) -> None:
    import asyncio

    from llama_crab.server.testing import start_test_server
    from llama_crab_client import AsyncClient

    async def turns(address: str) -> tuple[Completion, Completion]:
        async with AsyncClient(address) as client:
            session = client.session()
            first = await session.create_completion(long_text("lanterns", 12), CompletionOptions(6))
            second = await session.create_completion_stream(" Next?", CompletionOptions(6), lambda chunk: None)
            return first, second

    with start_test_server(cached) as server:
        first, second = asyncio.run(turns(server.address))
    assert second.usage.cached_tokens >= first.usage.prompt_tokens + len(first.token_ids) - 1
