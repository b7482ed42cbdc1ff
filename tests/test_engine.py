"""The in-process streaming API on the real default model (issue: foundation)."""

from __future__ import annotations

import math
import threading
from pathlib import Path

import pytest
from helpers import wait_until

from llama_crab import (
    Chunk,
    Completion,
    CompletionOptions,
    InvalidArgumentError,
    Llama,
    LlamaParams,
    StopReason,
    StreamControl,
)

PROMPT = "The capital of France is"


def collect(llama: Llama, prompt: str, options: CompletionOptions) -> tuple[list[Chunk], Completion]:
    chunks: list[Chunk] = []
    completion = llama.create_completion_stream(prompt, options, chunks.append)
    return chunks, completion


def test_greedy_is_deterministic(llama: Llama) -> None:
    a = llama.create_completion(PROMPT, CompletionOptions(24))
    b = llama.create_completion(PROMPT, CompletionOptions(24))
    assert a.text and a.text == b.text
    assert a.token_ids == b.token_ids


def test_chunks_concatenate_to_completion(llama: Llama) -> None:
    chunks, completion = collect(llama, PROMPT, CompletionOptions(24))
    assert len(chunks) >= 2
    assert "".join(c.text for c in chunks) == completion.text
    assert tuple(t for c in chunks for t in c.token_ids) == completion.token_ids
    assert [c.n_tokens for c in chunks] == sorted(c.n_tokens for c in chunks)
    assert chunks[-1].n_tokens == len(completion.token_ids)
    assert completion.usage.prompt_tokens == len(llama.tokenize(PROMPT))
    assert completion.usage.completion_tokens == len(completion.token_ids)
    assert completion.timings.time_to_first_token_ms > 0
    assert completion.timings.total_ms >= completion.timings.time_to_first_token_ms


def test_a_reader_that_fell_behind_gets_one_merged_chunk(llama: Llama) -> None:
    """Chunks pending when the consumer reads are merged into one (one message, not one per
    step), with every token, logprob and character in order."""
    options = CompletionOptions(24, logprobs=1, ignore_eos=True, cache_prompt=False)
    reference = llama.create_completion(PROMPT, options)
    done_before = llama.metrics().completion_tokens_total
    handle = llama.submit(PROMPT, options)
    # Read nothing until the whole completion is generated.
    assert wait_until(lambda: llama.metrics().completion_tokens_total >= done_before + 24)
    events = list(handle.events())
    handle.close()
    chunks, final = events[:-1], events[-1]
    assert isinstance(final, Completion) and len(chunks) == 1
    (chunk,) = chunks
    assert isinstance(chunk, Chunk)
    assert chunk.text == final.text == reference.text
    assert chunk.token_ids == final.token_ids
    assert chunk.logprobs is not None and [lp.token_id for lp in chunk.logprobs] == list(final.token_ids)


def test_max_tokens_is_honoured(llama: Llama) -> None:
    for n in (1, 5, 17):
        completion = llama.create_completion("Once upon a time", CompletionOptions(n))
        assert len(completion.token_ids) <= n
        if completion.stop_reason is StopReason.LENGTH:
            assert len(completion.token_ids) == n


def test_same_seed_same_sample(llama: Llama) -> None:
    options = CompletionOptions(24, temperature=0.9, top_k=0, top_p=1.0, min_p=0.0, seed=1234)
    a = llama.create_completion("My favourite animal is", options)
    b = llama.create_completion("My favourite animal is", options)
    assert a.text == b.text
    # A different seed over 24 tokens of a flat distribution practically never repeats the text.
    texts = {llama.create_completion("My favourite animal is", options.with_seed(s)).text for s in (1, 2, 3)}
    assert len(texts) > 1


def test_stop_sequence_split_across_chunks(llama: Llama) -> None:
    ref_chunks, ref = collect(llama, PROMPT, CompletionOptions(32))
    # A stop sequence made of the end of one chunk and the start of the next.
    stop = None
    for i in range(len(ref_chunks) - 1):
        left, right = ref_chunks[i].text, ref_chunks[i + 1].text
        if len(left) >= 2 and len(right) >= 2:
            candidate = left[-2:] + right[:2]
            prefix = "".join(c.text for c in ref_chunks[:i]) + left[:-2]
            if candidate not in prefix:
                stop = candidate
                break
    assert stop is not None, f"no usable chunk boundary in {ref.text!r}"
    chunks, completion = collect(llama, PROMPT, CompletionOptions(32).with_stop_sequence(stop))
    assert completion.stop_reason is StopReason.STOP_SEQUENCE
    assert completion.stop_sequence == stop
    assert completion.text == ref.text[: ref.text.index(stop)]
    assert "".join(c.text for c in chunks) == completion.text
    assert all(stop not in c.text for c in chunks)


def test_build_leaves_out_ggml_amx_kernels() -> None:
    # ggml's AMX matmul segfaults on the first decode on some Sapphire Rapids hosts
    # (llama.cpp #20824); cmake/no_amx.cmake keeps it out even where -march=native has AMX.
    # Only an AMX build machine can fail this; elsewhere AMX is absent anyway.
    from llama_crab import _engine

    info = _engine.system_info()
    assert "CPU :" in info  # the real feature list, not an empty string
    assert "AMX_INT8 = 1" not in info


def test_text_stream_holds_back_split_utf8_and_stops() -> None:
    from llama_crab import _engine

    crab = "🦀".encode()
    s = _engine.TextStream([])
    assert s.push(crab[:1]) == ("", False, "")
    assert s.push(crab[1:3]) == ("", False, "")
    assert s.push(crab[3:] + b"!") == ("🦀!", False, "")

    s = _engine.TextStream(["END"])
    assert s.push(b"abc E") == ("abc ", False, "")
    assert s.push(b"N") == ("", False, "")
    assert s.push(b"Dxyz") == ("", True, "END")

    s = _engine.TextStream(["END"])
    assert s.push(b"EN") == ("", False, "")
    assert s.push(b"o") == ("ENo", False, "")
    # A dangling partial character at the end becomes U+FFFD: output is always valid UTF-8.
    s = _engine.TextStream([])
    s.push("中".encode()[:2])
    assert s.flush() == "\ufffd\ufffd"


@pytest.mark.parametrize("prompt", ["Translate to Chinese: I love crabs. 我爱", "Emoji story: 🦀🐙🦑 then", "日本語で答えて: 蟹は"])
def test_utf8_never_broken(llama: Llama, prompt: str) -> None:
    chunks, completion = collect(llama, prompt, CompletionOptions(40, temperature=0.8, seed=7))
    for c in chunks:
        c.text.encode("utf-8", errors="strict")  # no lone surrogates
        assert c.text
    assert "".join(c.text for c in chunks) == completion.text


def test_stop_after_k_chunks(llama: Llama) -> None:
    delivered: list[str] = []

    def stop_after_three(chunk: Chunk) -> StreamControl:
        delivered.append(chunk.text)
        return StreamControl.STOP if len(delivered) == 3 else StreamControl.CONTINUE

    completion = llama.create_completion_stream("Count: one, two, three,", CompletionOptions(64), stop_after_three)
    assert len(delivered) == 3
    assert completion.stop_reason is StopReason.CANCELLED
    assert completion.text == "".join(delivered)
    assert completion.usage.completion_tokens == len(completion.token_ids)


def test_callback_returning_none_continues(llama: Llama) -> None:
    completion = llama.create_completion_stream(PROMPT, CompletionOptions(8), lambda chunk: None)
    assert completion.stop_reason in (StopReason.LENGTH, StopReason.EOS)


def test_raising_callback_propagates_and_llama_stays_usable(llama: Llama) -> None:
    class Boom(Exception):
        pass

    def explode(chunk: Chunk) -> StreamControl:
        raise Boom("callback failed")

    with pytest.raises(Boom):
        llama.create_completion_stream(PROMPT, CompletionOptions(32), explode)
    after = llama.create_completion(PROMPT, CompletionOptions(8))
    assert after.text
    assert llama.metrics().busy_slots == 0


def test_iterator_break_is_stop(llama: Llama) -> None:
    stream = llama.stream(PROMPT, CompletionOptions(64))
    got = []
    for chunk in stream:
        got.append(chunk.text)
        if len(got) == 2:
            break
    completion = stream.close()
    assert completion.stop_reason is StopReason.CANCELLED
    assert completion.text == "".join(got)
    with llama.stream(PROMPT, CompletionOptions(4)) as s:
        full = "".join(c.text for c in s)
    assert s.completion is not None and s.completion.text == full


def test_logprobs_on_every_chunk(llama: Llama) -> None:
    chunks, completion = collect(llama, PROMPT, CompletionOptions(16).with_logprobs(3))
    assert chunks
    for chunk in chunks:
        assert chunk.logprobs is not None
        assert [lp.token_id for lp in chunk.logprobs] == list(chunk.token_ids)
        for lp in chunk.logprobs:
            assert lp.logprob <= 0.0 and math.isfinite(lp.logprob)
            assert len(lp.top) == 3
            values = [t.logprob for t in lp.top]
            assert values == sorted(values, reverse=True)
            # Greedy: the chosen token is the most likely one.
            assert lp.token_id == lp.top[0].token_id
    assert completion.logprobs is not None and len(completion.logprobs) == len(completion.token_ids)
    plain, _ = collect(llama, PROMPT, CompletionOptions(4))
    assert all(c.logprobs is None for c in plain)


def test_grammar_constrains_output(llama: Llama) -> None:
    grammar = 'root ::= ("yes" | "no") "."'
    completion = llama.create_completion("Is the sky blue? Answer:", CompletionOptions(8).with_grammar(grammar))
    assert completion.text in ("yes.", "no.")


def test_logit_bias_bans_a_token(llama: Llama) -> None:
    ref = llama.create_completion(PROMPT, CompletionOptions(1))
    banned = ref.token_ids[0]
    biased = llama.create_completion(PROMPT, CompletionOptions(1).with_logit_bias(banned, -math.inf))
    assert biased.token_ids and biased.token_ids[0] != banned


def test_explicit_sampler_chain(llama: Llama) -> None:
    options = CompletionOptions(8, temperature=0.7, seed=3).with_samplers(["top_k", "temperature"]).with_top_k(5)
    a = llama.create_completion(PROMPT, options)
    b = llama.create_completion(PROMPT, options)
    assert a.text == b.text and a.token_ids


def test_each_call_starts_clean(llama: Llama) -> None:
    first = llama.create_completion(PROMPT, CompletionOptions(12))
    llama.create_completion("Completely different context about the ocean and fish", CompletionOptions(12))
    again = llama.create_completion(PROMPT, CompletionOptions(12))
    assert again.text == first.text


@pytest.mark.parametrize(
    ("options", "field"),
    [
        (CompletionOptions(0), "max_tokens"),
        (CompletionOptions(8, top_p=2.0), "top_p"),
        (CompletionOptions(8, temperature=-1.0), "temperature"),
        (CompletionOptions(8, logprobs=99), "logprobs"),
        (CompletionOptions(8, stop_sequences=("",)), "stop_sequences[0]"),
        (CompletionOptions(8, logit_bias={10**9: 1.0}), "logit_bias"),
        (CompletionOptions(8, samplers=("nope",)), "samplers"),
        (CompletionOptions(8, grammar="root ::= ("), "grammar"),
        (CompletionOptions(8, grammar='root ::= undefined_rule'), "grammar"),
    ],
)
def test_bad_options_name_the_field(llama: Llama, options: CompletionOptions, field: str) -> None:
    with pytest.raises(InvalidArgumentError) as info:
        llama.create_completion(PROMPT, options)
    assert info.value.field == field
    assert isinstance(info.value, ValueError)


def test_prompt_errors(llama: Llama) -> None:
    with pytest.raises(InvalidArgumentError) as info:
        llama.create_completion("", CompletionOptions(4))
    assert info.value.field == "prompt"
    too_long = "crab " * (llama.n_ctx_per_slot + 10)
    with pytest.raises(InvalidArgumentError) as info:
        llama.create_completion(too_long, CompletionOptions(4))
    assert info.value.field == "prompt" and "context" in str(info.value)
    with pytest.raises(InvalidArgumentError) as info:
        llama.create_completion([10**9], CompletionOptions(4))
    assert info.value.field == "prompt"


def test_token_prompt_equals_text_prompt(llama: Llama) -> None:
    tokens = llama.tokenize(PROMPT)
    assert llama.create_completion(tokens, CompletionOptions(8)).text == llama.create_completion(
        PROMPT, CompletionOptions(8)
    ).text
    assert llama.detokenize(llama.tokenize("hello world", add_special=False)) == "hello world"


def test_model_info(llama: Llama) -> None:
    info = llama.model_info()
    assert info.architecture == "llama"
    assert info.n_vocab > 1000 and info.n_params > 1_000_000
    assert info.n_slots == 4 and info.n_ctx >= 2048
    assert info.has_chat_template


@pytest.mark.parametrize("kind", ["missing", "not_gguf", "truncated"])
def test_bad_model_file(tmp_path: Path, model_path: str, kind: str) -> None:
    path = tmp_path / "model.gguf"
    if kind == "not_gguf":
        path.write_bytes(b"definitely not a gguf file" * 100)
    elif kind == "truncated":
        with open(model_path, "rb") as f:
            path.write_bytes(f.read(1 << 20))
    with pytest.raises(ValueError) as info:
        Llama.load(LlamaParams(str(path)))
    assert "model" in str(info.value)


def test_bad_llama_params(model_path: str) -> None:
    with pytest.raises(InvalidArgumentError) as info:
        Llama.load(LlamaParams(model_path, n_ctx=0))
    assert info.value.field == "n_ctx"


def _first_divergence(a: tuple[int, ...], b: tuple[int, ...]) -> int | None:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def test_four_threads_batched_without_cross_talk(llama: Llama) -> None:
    prompts = [
        "The capital of France is",
        "Rust is a programming language that",
        "Crabs walk sideways because",
        "def fibonacci(n):",
    ]
    options = CompletionOptions(24).with_logprobs(2)
    solo = [llama.create_completion(p, options) for p in prompts]
    results: list[Completion | None] = [None] * len(prompts)
    chunks_seen: list[list[str]] = [[] for _ in prompts]
    errors: list[BaseException] = []
    barrier = threading.Barrier(len(prompts))

    def worker(i: int) -> None:
        try:
            barrier.wait()
            results[i] = llama.create_completion_stream(prompts[i], options, lambda c: chunks_seen[i].append(c.text))
        except BaseException as e:  # surfaced below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors
    assert llama.metrics().decode_steps_total > 0
    for i, result in enumerate(results):
        assert result is not None
        assert "".join(chunks_seen[i]) == result.text
        ref = solo[i]
        k = _first_divergence(result.token_ids, ref.token_ids)
        if k is None:
            continue
        # Batched arithmetic may differ in the last bits; only a near-tie may flip.
        assert ref.logprobs is not None and k < len(ref.logprobs)
        top = ref.logprobs[k].top
        assert len(top) == 2 and top[0].logprob - top[1].logprob < 0.1, f"prompt {i} diverged at token {k}"


def test_single_slot_queues_concurrent_calls(model_path: str) -> None:
    with Llama.load(LlamaParams(model_path).with_n_ctx(512).with_n_parallel(1)) as single:
        out: list[str] = []
        threads = [
            threading.Thread(target=lambda: out.append(single.create_completion(PROMPT, CompletionOptions(8)).text))
            for _ in range(3)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        assert len(out) == 3 and len(set(out)) == 1
        assert single.metrics().requests_total == 3


def test_cancel_while_queued_and_prefilling(model_path: str) -> None:
    with Llama.load(LlamaParams(model_path).with_n_ctx(512).with_n_parallel(1).with_max_queue(1)) as single:
        no_eos = {t: -math.inf for t in (0, 1, 2)}
        running = single.submit(PROMPT, CompletionOptions(400, logit_bias=no_eos))
        first = running.wait()  # running holds the only slot once it streams
        assert first and isinstance(first[0], Chunk)
        queued = single.submit(PROMPT, CompletionOptions(8))
        from llama_crab import ResourceExhaustedError

        with pytest.raises(ResourceExhaustedError):
            single.submit(PROMPT, CompletionOptions(8))
        queued.cancel()
        final = [e for e in queued.events() if isinstance(e, Completion)]
        assert final[0].stop_reason is StopReason.CANCELLED and final[0].text == ""
        running.cancel()
        last = [e for e in running.events() if isinstance(e, Completion)][0]
        assert last.stop_reason is StopReason.CANCELLED
        running.close()
        queued.close()
        # The slot is free at once: a new request starts and completes.
        assert single.create_completion(PROMPT, CompletionOptions(4)).text
        assert single.metrics().busy_slots == 0


def test_closed_llama_refuses_work(model_path: str) -> None:
    from llama_crab import UnavailableError

    model = Llama.load(LlamaParams(model_path).with_n_ctx(256))
    model.close()
    with pytest.raises(UnavailableError):
        model.create_completion(PROMPT, CompletionOptions(4))


def test_long_prompt_is_prefilled_in_pieces_while_others_decode(model_path: str) -> None:
    # n_batch 16: a ~400-token prompt needs ~25 steps to prefill. With continuous batching
    # the already-decoding stream gets a token in each of those steps.
    params = LlamaParams(model_path).with_n_ctx(1024).with_n_parallel(2).with_n_batch(16)
    with Llama.load(params) as model:
        no_eos = {t: -math.inf for t in (0, 1, 2)}
        short = model.submit("Once upon a time", CompletionOptions(400, logit_bias=no_eos))
        produced = 0
        while produced == 0:
            produced += sum(len(e.token_ids) for e in short.wait() if isinstance(e, Chunk))
        long_prompt = " ".join(["crabs"] * 400)
        long = model.submit(long_prompt, CompletionOptions(2))
        before = produced
        first_long: list[Chunk | Completion] = []
        while not first_long:
            first_long = long.wait()
        during = sum(len(e.token_ids) for e in short.poll() if isinstance(e, Chunk))
        assert during >= 12, f"decoding stream got only {during} tokens while a long prompt prefilled"
        assert before >= 1
        long.close()
        short.close()


def test_llama_cpp_log_goes_through_logging(model_path: str, caplog: pytest.LogCaptureFixture) -> None:
    import logging

    logger = logging.getLogger("llama_crab.llama_cpp")
    old = logger.level
    logger.setLevel(logging.INFO)
    try:
        with caplog.at_level(logging.INFO, logger="llama_crab.llama_cpp"):
            Llama.load(LlamaParams(model_path).with_n_ctx(256)).close()
        assert any("llama" in r.getMessage() for r in caplog.records if r.name == "llama_crab.llama_cpp")
    finally:
        logger.setLevel(old)
        Llama.load(LlamaParams(model_path).with_n_ctx(256)).close()  # re-reads the level: quiet again


def test_stop_after_the_final_arrived_still_returns_the_delivered_completion(llama: Llama) -> None:
    # The final can already sit among the events taken from the engine when the callback
    # says STOP (the callback was slow; generation finished meanwhile): STOP still returns
    # exactly the delivered chunks.
    seen: list[Chunk] = []

    def slow_then_stop(chunk: Chunk) -> StreamControl:
        seen.append(chunk)
        if len(seen) == 1:
            assert wait_until(lambda: llama.metrics().busy_slots == 0)  # the request finished
            return StreamControl.CONTINUE
        return StreamControl.STOP

    completion = llama.create_completion_stream("Once upon a time", CompletionOptions(8), slow_then_stop)
    assert len(seen) == 2
    assert completion.stop_reason is StopReason.CANCELLED
    assert completion.text == "".join(c.text for c in seen)


def test_thread_count_is_reported_and_fixed_without_the_governor(model_path: str) -> None:
    # The adaptive count is a bench matter (docs/performance.md, busy host); here: the
    # engine reports the threads it decodes with, and adaptive_threads=False pins them.
    params = LlamaParams(model_path, n_ctx=256, n_threads=2, adaptive_threads=False)
    with Llama.load(params) as fixed:
        fixed.create_completion(PROMPT, CompletionOptions(4))
        assert fixed.metrics().n_threads_active == 2
    with pytest.raises(InvalidArgumentError) as exc:
        Llama.load(LlamaParams(model_path, adaptive_threads="yes"))  # type: ignore[arg-type]
    assert exc.value.field == "adaptive_threads"


def test_prefill_step_bounds_the_prompt_tokens_per_step_beside_decoders(model_path: str) -> None:
    # Beside a decoding stream, a long prompt is prefilled at most prefill_step_tokens per
    # step (the decoder waits one short step at a time); alone, it gets whole batches.
    prompt = "The history of the city began long ago, when " * 12
    params = LlamaParams(model_path, n_ctx=1024, n_parallel=2, prefill_step_tokens=16)
    with Llama.load(params) as stepped:
        before = stepped.metrics().decode_steps_total
        alone = stepped.create_completion(prompt, CompletionOptions(1, cache_prompt=False))
        assert stepped.metrics().decode_steps_total - before == 1  # one batch: 100+ tokens < n_batch
        n_prompt = alone.usage.prompt_tokens
        assert n_prompt > 16 * 4
        # A grammar that cannot end before max_tokens keeps the decoder running throughout.
        endless = CompletionOptions(400, cache_prompt=False, grammar='root ::= "ab"{1000}')
        decoder = stepped.submit("Once upon a time", endless)
        try:
            assert next(iter(decoder.events())) is not None  # decoding now
            before = stepped.metrics().decode_steps_total
            stepped.create_completion(prompt, CompletionOptions(1, cache_prompt=False))
            assert stepped.metrics().decode_steps_total - before >= -(-n_prompt // 16)
        finally:
            decoder.close()
