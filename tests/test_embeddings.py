"""Embeddings: llama.cpp's embedding path on a real encoder (all-MiniLM-L6-v2, converted at
pull) checked against an independent numpy forward pass of the same weights, and on a
generative model; the limits; beside generation; over gRPC."""

from __future__ import annotations

import asyncio
import math
import threading
from collections.abc import Iterator, Sequence

import numpy as np
import pytest

from bert_reference import BertReference
from helpers import wait_until
from llama_crab import ChatMessage, CompletionOptions, InvalidArgumentError, Llama, LlamaParams
from llama_crab.models import ensure, source_dir
from llama_crab.server.testing import start_test_server
from llama_crab_client import AsyncClient, Client

# Punctuation, accents, numbers, casing, non-Latin scripts, a long input.
SENTENCES = (
    "A man is eating food.",
    "Café au lait, s'il vous plaît!",
    "The invoice totals $3,450.75 (due 2026-12-31).",
    "UPPER and lower CASE Words",
    "東京は日本の首都です。",
    "def f(x): return x ** 2  # squares",
    "tabs\tand\nnewlines",
    " ".join(["The quick brown fox jumps over the lazy dog near the river bank."] * 12),
)

# (anchor, similar, dissimilar)
PAIRS = (
    ("A man is eating food.", "A man is eating a piece of bread.", "The stock market fell sharply today."),
    ("How do I reset my password?", "I forgot my password and need to change it.", "The cat sleeps on the sofa."),
    ("The weather is lovely today.", "It is sunny and warm outside.", "He compiled the Rust crate with cargo."),
    ("Python is a programming language.", "Guido created the Python language.", "Bananas are rich in potassium."),
    ("The train was late again.", "My railway journey was delayed.", "She painted the fence blue."),
)


def cosine(a: Sequence[float], b: Sequence[float]) -> float:
    va, vb = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(va @ vb / (np.linalg.norm(va) * np.linalg.norm(vb)))


@pytest.fixture(scope="module")
def minilm() -> Iterator[Llama]:
    with Llama.load(LlamaParams(ensure("minilm-l6"), n_ctx=512)) as llama:
        yield llama


@pytest.fixture(scope="module")
def reference() -> BertReference:
    return BertReference(source_dir("minilm-l6"))


def test_vectors_match_an_independent_numpy_forward_pass(minilm: Llama, reference: BertReference) -> None:
    got = minilm.embed(list(SENTENCES))
    want = reference.embed(list(SENTENCES))
    assert got.pooling == "mean" and got.dimensions == 384
    for i, text in enumerate(SENTENCES):
        assert got.data[i].prompt_tokens == len(reference.tokenize(text)), text
        assert cosine(got.data[i].vector, want[i]) >= 0.999, text
    assert got.prompt_tokens == sum(d.prompt_tokens for d in got.data)


def test_the_engine_counts_what_it_embedded() -> None:
    with Llama.load(LlamaParams(ensure("minilm-l6"), n_ctx=512)) as llama:
        a = llama.embed(["one input", "two inputs"])
        b = llama.embed([llama.tokenize("three")])
        with pytest.raises(InvalidArgumentError):
            llama.embed(["refused", ""])  # counts nothing
        metrics = llama.metrics()
        assert metrics.embed_inputs_total == 3
        assert metrics.embed_tokens_total == a.prompt_tokens + b.prompt_tokens
        with start_test_server(llama, metrics_port=0) as server:  # its warm-up embeds one more
            exported = server.metrics.value("llama_crab_embed_inputs_total")
            assert exported == llama.metrics().embed_inputs_total == 4


def test_tokens_are_the_reference_tokenizers(minilm: Llama, reference: BertReference) -> None:
    for text in SENTENCES:
        assert minilm.tokenize(text) == reference.tokenize(text), text


def test_similar_pairs_score_above_dissimilar_ones(minilm: Llama) -> None:
    for anchor, similar, other in PAIRS:
        a, s, o = (e.vector for e in minilm.embed([anchor, similar, other]).data)
        assert cosine(a, s) > cosine(a, o) + 0.2, (anchor, cosine(a, s), cosine(a, o))


def test_poolings_are_views_of_the_token_vectors(minilm: Llama) -> None:
    text = "Poolings of one sentence."
    tokens = minilm.embed([text], pooling="none", normalize=False).data[0]
    assert tokens.vector == () and len(tokens.token_vectors) == tokens.prompt_tokens
    rows = np.asarray(tokens.token_vectors, dtype=np.float64)
    mean = minilm.embed([text], pooling="mean", normalize=False).data[0].vector
    assert np.allclose(mean, rows.mean(axis=0), atol=1e-5)
    assert minilm.embed([text], pooling="cls", normalize=False).data[0].vector == pytest.approx(rows[0], abs=1e-6)
    assert minilm.embed([text], pooling="last", normalize=False).data[0].vector == pytest.approx(rows[-1], abs=1e-6)
    normalized = minilm.embed([text], pooling="mean").data[0].vector
    assert math.isclose(float(np.linalg.norm(normalized)), 1.0, rel_tol=1e-5)
    assert cosine(normalized, mean) == pytest.approx(1.0, abs=1e-6)
    assert not math.isclose(float(np.linalg.norm(mean)), 1.0, rel_tol=1e-3)


def test_token_ids_and_text_give_the_same_vector(minilm: Llama) -> None:
    text = "Token ids or text."
    by_text = minilm.embed([text]).data[0].vector
    by_ids = minilm.embed([minilm.tokenize(text)]).data[0].vector
    assert by_text == by_ids


def test_an_input_does_not_depend_on_its_batch(minilm: Llama) -> None:
    alone = [minilm.embed([s]).data[0].vector for s in SENTENCES]
    batch = minilm.embed(list(SENTENCES) * 5)  # 40 inputs: several llama.cpp batches
    for i, d in enumerate(batch.data):
        assert cosine(d.vector, alone[i % len(SENTENCES)]) >= 0.99999


def test_deterministic_mode_gives_the_same_bits_in_any_batch() -> None:
    params = LlamaParams(ensure("minilm-l6"), n_ctx=512).with_deterministic()
    with Llama.load(params) as llama:
        alone = [llama.embed([s]).data[0].vector for s in SENTENCES]
        batch = llama.embed(list(SENTENCES)[::-1] + list(SENTENCES))
    assert [d.vector for d in batch.data] == alone[::-1] + alone


def test_an_encoder_refuses_to_generate(minilm: Llama) -> None:
    info = minilm.model_info()
    assert not info.generates and info.embed_pooling == "mean" and info.n_embd == 384
    with pytest.raises(InvalidArgumentError) as e:
        minilm.create_completion("Hello", CompletionOptions(4))
    assert e.value.field == "prompt" and "embeddings" in str(e.value)
    with pytest.raises(InvalidArgumentError):
        minilm.create_chat_completion([ChatMessage("user", "Hello")], CompletionOptions(4))


@pytest.mark.parametrize(
    ("inputs", "pooling", "field", "words"),
    [
        (["fine", ""], "model", "inputs[1]", "empty"),
        ([], "model", "inputs", "at least one"),
        (["fine", [1, 2, 999999]], "model", "inputs[1]", "vocabulary"),
        (["word " * 600], "model", "inputs[0]", "more than the embedding context's 512"),
        (["fine"], "max", "pooling", "must be one of"),
        ("a string", "model", "inputs", "list"),
    ],
)
def test_bad_inputs_are_refused_naming_the_field(
    minilm: Llama, inputs: list[str], pooling: str, field: str, words: str
) -> None:
    with pytest.raises(InvalidArgumentError) as e:
        minilm.embed(inputs, pooling=pooling)
    assert e.value.field == field and words in str(e.value)


def test_one_call_is_bounded_in_inputs_and_tokens() -> None:
    params = LlamaParams(ensure("minilm-l6"), n_ctx=512, max_embed_inputs=4, max_embed_tokens=40)
    with Llama.load(params) as llama:
        with pytest.raises(InvalidArgumentError) as e:
            llama.embed(["a"] * 5)
        assert e.value.field == "inputs" and "more than the 4" in str(e.value)
        with pytest.raises(InvalidArgumentError) as e:
            llama.embed(["one two three four five six seven eight nine ten eleven twelve"] * 4)
        assert e.value.field == "inputs" and "more than the 40" in str(e.value)
        assert len(llama.embed(["a", "b", "c", "d"]).data) == 4


# ---- a generative model embeds too ----------------------------------------------------
def test_a_generative_model_embeds_with_last_or_mean_pooling(llama: Llama) -> None:
    info = llama.model_info()
    assert info.generates and info.embed_pooling == "last"
    last = llama.embed(["The sky is blue.", "Rust is a language."])
    assert last.pooling == "last" and last.dimensions == info.n_embd
    mean = llama.embed(["The sky is blue."], pooling="mean")
    for v in (last.data[0].vector, last.data[1].vector, mean.data[0].vector):
        assert len(v) == info.n_embd and all(math.isfinite(x) for x in v)
        assert math.isclose(float(np.linalg.norm(v)), 1.0, rel_tol=1e-5)
    assert cosine(last.data[0].vector, mean.data[0].vector) < 0.9999  # two different poolings
    # The last token's vector is the last row of the per-token ones.
    rows = llama.embed(["The sky is blue."], pooling="none").data[0].token_vectors
    assert cosine(rows[-1], last.data[0].vector) == pytest.approx(1.0, abs=1e-5)
    with pytest.raises(InvalidArgumentError) as e:
        llama.embed(["x"], pooling="cls")
    assert e.value.field == "pooling"


def test_embedding_beside_generation_leaves_the_stream_unchanged(llama: Llama) -> None:
    options = CompletionOptions(48, cache_prompt=False)
    alone = llama.create_completion("Once upon a time", options)
    done = threading.Event()
    embedded: list[int] = []

    def embed_loop() -> None:
        while not done.is_set():
            embedded.append(len(llama.embed(["some text to embed while decoding"] * 8).data))

    worker = threading.Thread(target=embed_loop)
    worker.start()
    try:
        beside = llama.create_completion("Once upon a time", options)
    finally:
        done.set()
        worker.join()
    assert embedded and all(n == 8 for n in embedded)
    assert beside.token_ids == alone.token_ids


def test_close_waits_for_an_embedding_in_progress() -> None:
    llama = Llama.load(LlamaParams(ensure("minilm-l6"), n_ctx=512))
    results: list[object] = []

    def embed() -> None:
        try:
            results.append(llama.embed(["text"] * 200))
        except Exception as e:  # the call may start after close: a clean error, never a crash
            results.append(e)

    worker = threading.Thread(target=embed)
    worker.start()
    llama.close()
    worker.join()
    assert len(results) == 1


# ---- over gRPC ----------------------------------------------------------------------------
def test_queued_embed_calls_leave_the_other_calls_free(minilm: Llama) -> None:
    # Eight heavy Embed calls at once take turns on the embedding context. They wait in
    # their own queue: a Tokenize (which, like every submission, runs in the server's shared
    # worker pool) answers at once instead of waiting behind them.
    heavy = [" ".join(["words to embed for a while"] * 12)] * 16
    with start_test_server(minilm) as server, Client(server.address) as client:
        finished: list[int] = []

        def embed() -> None:
            finished.append(len(client.embed(heavy).data))

        threads = [threading.Thread(target=embed) for _ in range(8)]
        for t in threads:
            t.start()
        try:
            queue = server.service.servicer._embed_executor._work_queue  # type: ignore[attr-defined]
            assert wait_until(lambda: queue.qsize() >= 6)
            assert client.tokenize("still answering") and len(finished) <= 1
        finally:
            for t in threads:
                t.join()
    assert finished == [16] * 8


def test_grpc_embed_equals_in_process(minilm: Llama) -> None:
    local = minilm.embed(list(SENTENCES[:3]) + [minilm.tokenize("ids")], pooling="mean")
    none_local = minilm.embed(["per token"], pooling="none", normalize=False)
    with start_test_server(minilm) as server, Client(server.address) as client:
        remote = client.embed(list(SENTENCES[:3]) + [minilm.tokenize("ids")], pooling="mean")
        none_remote = client.embed(["per token"], pooling="none", normalize=False)
        info = client.model_info()
        with pytest.raises(InvalidArgumentError) as e:
            client.embed(["fine", ""])
        assert e.value.field == "inputs[1]"
        with pytest.raises(InvalidArgumentError) as e:
            client.embed(["word " * 600])
        assert e.value.field == "inputs[0]" and "602 tokens" in str(e.value) and "512" in str(e.value)
        with pytest.raises(InvalidArgumentError) as e:
            client.create_completion("Hello", CompletionOptions(4))
        assert e.value.field == "prompt"

        async def via_async() -> tuple[float, ...]:
            async with AsyncClient(server.address) as aclient:
                return (await aclient.embed(["A man is eating food."])).data[0].vector

        async_vector = asyncio.run(via_async())
    assert remote == local  # float32 both ways: the same bits
    assert none_remote == none_local
    assert async_vector == local.data[0].vector
    assert not info.generates and info.embed_pooling == "mean" and info.n_embd == 384
