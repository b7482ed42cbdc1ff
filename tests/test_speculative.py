"""Speculative decoding: drafts from llama.cpp's own drafters, verified in the shared batch
with each request's own sampler. What is generated must be what the model alone generates
(greedy: the same tokens, up to the near-tie rule of batch arithmetic), every limit holds
exactly inside an accepted run, and the cache stays right. Real models throughout.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest

from helpers import wait_until
from llama_crab import (
    Chunk,
    Completion,
    CompletionOptions,
    InvalidArgumentError,
    Llama,
    LlamaParams,
    Speculative,
    StopReason,
    StreamControl,
)
from llama_crab.models import ensure
from llama_crab.server.testing import start_test_server
from llama_crab_client import Client

# An "apply this edit" request: the answer repeats most of the prompt, which is what
# n-gram drafting predicts.
CODE = '''def total_price(items, tax_rate):
    subtotal = 0
    for item in items:
        subtotal += item.price * item.quantity
    tax = subtotal * tax_rate
    return subtotal + tax


def cheapest(items):
    best = None
    for item in items:
        if best is None or item.price < best.price:
            best = item
    return best
'''
EDIT_PROMPT = (
    "Rewrite the code below, renaming `subtotal` to `net`. Reply with the code only.\n\n"
    f"```python\n{CODE}```\n\n```python\n"
)
# The code twice, then a third copy begun: every catalogue model copies this one (smollm2
# does not follow the edit instruction above), so the limit tests below land inside runs
# of accepted drafts.
COPY_PROMPT = f"```python\n{CODE}```\n\n```python\n{CODE}```\n\n```python\n"
MODELS = ("smollm2-135m", "qwen2.5-coder-0.5b", "gemma3-270m")
NGRAM = Speculative(types=("ngram-simple",), ngram_size_n=4, ngram_size_m=16)


def load(path: str, speculative: Speculative | None = NGRAM, n_parallel: int = 2) -> Llama:
    return Llama.load(LlamaParams(path, n_ctx=2048 * n_parallel, n_parallel=n_parallel, speculative=speculative))


@pytest.fixture(scope="module")
def spec_llama(model_path: str) -> Iterator[Llama]:
    with load(model_path) as llama:
        yield llama


# How far apart the top two candidates may be where a greedy run with speculation parts from
# one without. Verifying a draft computes several tokens of a sequence in one batch, which
# llama.cpp does with other kernels than one token at a time (GEMM against GEMV on the
# quantized weights): measured on smollm2-135m (Q4_1) the same position's logprob differs by
# up to 0.21 between the two paths (0.04 on average), and a plain batched prefill of the same
# tokens sides with the speculative run. See the determinism issue.
NEAR_TIE = 0.25


def same_or_near_tie(llama: Llama, prompt: str, a: Completion, b: Completion) -> None:
    """a and b are greedy runs of one prompt: equal (as far as the shorter goes), or they part
    where the model's top two candidates are within NEAR_TIE of each other (batch arithmetic
    differs in the last bits)."""
    k = next((i for i, (x, y) in enumerate(zip(a.token_ids, b.token_ids)) if x != y), None)
    if k is None:
        return
    probe = llama.create_completion(
        list(llama.tokenize(prompt)) + list(a.token_ids[:k]),
        CompletionOptions(1, logprobs=2, speculative=False, cache_prompt=False),
    )
    assert probe.logprobs is not None
    top = probe.logprobs[0].top
    gap = top[0].logprob - top[1].logprob
    assert len(top) == 2 and gap < NEAR_TIE, f"diverged at token {k} without a near-tie (gap {gap:.3f})"
    assert {a.token_ids[k], b.token_ids[k]} <= {t.token_id for t in top}, f"token {k}: not the top two"


# ---- the same output ----------------------------------------------------------------------


@pytest.mark.parametrize("model", MODELS)
def test_greedy_with_speculation_equals_greedy_without(model: str) -> None:
    with load(ensure(model)) as llama:
        options = CompletionOptions(160)
        plain = llama.create_completion(EDIT_PROMPT, options.with_speculative(False))
        fast = llama.create_completion(EDIT_PROMPT, options)
        assert plain.timings.draft_tokens == 0
        assert fast.timings.draft_tokens > 0, "the edit prompt was never drafted for"
        assert 0 <= fast.timings.draft_accepted_tokens <= fast.timings.draft_tokens
        same_or_near_tie(llama, EDIT_PROMPT, plain, fast)


def test_a_rewrite_is_drafted_and_accepted_in_runs() -> None:
    """The premise of the benchmarks, on the catalogue's coder model, which does the rename:
    a good part of the drafted tokens is accepted, and a step then delivers several tokens
    in one chunk (one message per step)."""
    with load(ensure("qwen2.5-coder-0.5b"), n_parallel=1) as llama:
        chunks: list[Chunk] = []
        completion = llama.create_completion_stream(EDIT_PROMPT, CompletionOptions(160), chunks.append)
        assert "net = 0" in completion.text and "subtotal" not in completion.text
        t = completion.timings
        assert t.draft_accepted_tokens >= 0.3 * t.draft_tokens > 0, t
        assert max(len(c.token_ids) for c in chunks) > 1
        assert sum(len(c.token_ids) for c in chunks) == len(completion.token_ids)
        assert "".join(c.text for c in chunks) == completion.text
        metrics = llama.metrics()
        assert metrics.draft_tokens_total == t.draft_tokens
        assert metrics.draft_accepted_tokens_total == t.draft_accepted_tokens


# Runs compared for exact equality compute the prompt afresh: a cached prefix changes the
# batches the rest is computed in, and with them the last bits.
COLD = CompletionOptions(96, cache_prompt=False)


def test_greedy_over_grpc_equals_in_process(spec_llama: Llama) -> None:
    local = spec_llama.create_completion(EDIT_PROMPT, COLD)
    with start_test_server(spec_llama) as server, Client(server.address) as client:
        remote = client.create_completion(EDIT_PROMPT, COLD)
        off = client.create_completion(EDIT_PROMPT, COLD.with_speculative(False))
    assert remote.text == local.text and remote.token_ids == local.token_ids
    assert remote.timings.draft_tokens > 0 and off.timings.draft_tokens == 0
    assert remote.timings.draft_accepted_tokens == local.timings.draft_accepted_tokens
    same_or_near_tie(spec_llama, EDIT_PROMPT, off, remote)


def test_seeded_sampling_is_reproducible(model_path: str) -> None:
    # Bit-for-bit repetition of a sampled run is the deterministic mode's promise. By default
    # the batch a request shares, the KV cells it lands in and its draft lengths change the
    # arithmetic's last bits, and a token drawn near a boundary of the seeded draw can go the
    # other way (seen in CI at token 149 of 160, two runs alone one after the other). So the
    # second run here shares its batch with another stream, and still must repeat the first.
    params = LlamaParams(model_path, n_ctx=4096, n_parallel=2, speculative=NGRAM).with_deterministic()
    options = CompletionOptions(
        160, temperature=0.5, top_k=20, seed=1234, logprobs=0, cache_prompt=False, ignore_eos=True
    )
    with Llama.load(params) as llama:
        first = llama.create_completion(EDIT_PROMPT, options)
        other = llama.submit(COPY_PROMPT, CompletionOptions(400, ignore_eos=True))
        try:
            assert wait_until(lambda: llama.metrics().busy_slots == 1)
            second = llama.create_completion(EDIT_PROMPT, options)
        finally:
            other.cancel()
            other.close()
    assert first.token_ids == second.token_ids
    assert first.logprobs is not None and second.logprobs is not None
    assert [lp.logprob for lp in first.logprobs] == [lp.logprob for lp in second.logprobs]
    assert first.timings.draft_tokens > 0 and second.timings.draft_tokens > 0


def test_prefix_cache_and_concurrency_keep_the_output(spec_llama: Llama) -> None:
    """A cached prompt and streams decoded side by side: rejected drafts leave no KV behind."""
    cold = spec_llama.create_completion(EDIT_PROMPT, CompletionOptions(96, cache_prompt=False))
    warm = spec_llama.create_completion(EDIT_PROMPT, CompletionOptions(96))
    assert warm.usage.cached_tokens > 0
    same_or_near_tie(spec_llama, EDIT_PROMPT, cold, warm)
    results: list[Completion] = []

    def run() -> None:
        results.append(spec_llama.create_completion(EDIT_PROMPT, CompletionOptions(96)))

    threads = [threading.Thread(target=run) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert len(results) == 2
    for r in results:
        same_or_near_tie(spec_llama, EDIT_PROMPT, cold, r)


# ---- limits inside an accepted run ------------------------------------------------------------


def test_max_tokens_lands_exactly_inside_accepted_runs(spec_llama: Llama) -> None:
    full = spec_llama.create_completion(COPY_PROMPT, COLD)
    assert full.timings.draft_accepted_tokens > 0
    for n in (5, 17, 33):
        # Drafts near the limit are shorter, so the last steps' batches differ: near-ties only.
        cut = spec_llama.create_completion(COPY_PROMPT, CompletionOptions(n, cache_prompt=False))
        assert cut.stop_reason is StopReason.LENGTH and cut.usage.completion_tokens == n == len(cut.token_ids)
        same_or_near_tie(spec_llama, COPY_PROMPT, full, cut)


def test_stop_sequence_inside_an_accepted_run(spec_llama: Llama) -> None:
    full = spec_llama.create_completion(COPY_PROMPT, COLD)
    assert full.timings.draft_accepted_tokens > 0
    # A stop string from the middle of the output, where drafted tokens were accepted. Stop
    # strings do not change what is drafted, so the batches are the same: exact equality.
    stop = full.text[len(full.text) // 2 : len(full.text) // 2 + 6]
    at = full.text.index(stop)
    cut = spec_llama.create_completion(COPY_PROMPT, CompletionOptions(96, cache_prompt=False, stop_sequences=(stop,)))
    assert cut.stop_reason is StopReason.STOP_SEQUENCE
    assert cut.text == full.text[:at]


def test_min_tokens_and_ignore_eos_hold_with_drafts(spec_llama: Llama) -> None:
    options = CompletionOptions(80, ignore_eos=True, min_tokens=80)
    out = spec_llama.create_completion(EDIT_PROMPT, options)
    assert out.usage.completion_tokens == 80 and out.stop_reason is StopReason.LENGTH


def test_stop_in_the_middle_of_a_run_keeps_exactly_the_delivered_text(spec_llama: Llama) -> None:
    delivered: list[str] = []

    def callback(chunk: Chunk) -> StreamControl:
        delivered.append(chunk.text)
        return StreamControl.STOP if len(chunk.token_ids) > 1 else StreamControl.CONTINUE

    completion = spec_llama.create_completion_stream(COPY_PROMPT, CompletionOptions(160), callback)
    assert completion.stop_reason is StopReason.CANCELLED
    assert completion.text == "".join(delivered)
    assert len(completion.token_ids) > 1


def test_cancel_mid_draft_frees_the_slot_within_a_step(spec_llama: Llama) -> None:
    handle = spec_llama.submit(EDIT_PROMPT, CompletionOptions(400, ignore_eos=True))
    assert wait_until(lambda: spec_llama.metrics().busy_slots == 1)
    for _ in range(3):
        handle.wait(5.0)
    handle.cancel()
    assert wait_until(lambda: spec_llama.metrics().busy_slots == 0, timeout=10.0)
    handle.close()
    assert spec_llama.create_completion(EDIT_PROMPT, CompletionOptions(8)).usage.completion_tokens == 8


# ---- grammars and chat ----------------------------------------------------------------------


def test_grammar_and_json_schema_with_speculation(spec_llama: Llama) -> None:
    grammar = 'root ::= ("    " [a-z_]+ " = " [a-z_0-9.* ]+ "\\n")+'
    schema = '{"type": "object", "properties": {"net": {"type": "integer"}}, "required": ["net"]}'
    for options in (CompletionOptions(48, grammar=grammar), CompletionOptions(48, json_schema=schema)):
        with_spec = spec_llama.create_completion(EDIT_PROMPT, options)
        without = spec_llama.create_completion(EDIT_PROMPT, options.with_speculative(False))
        same_or_near_tie(spec_llama, EDIT_PROMPT, without, with_spec)


def test_chat_speculates_too(spec_llama: Llama) -> None:
    messages = [{"role": "user", "content": EDIT_PROMPT}]
    fast = spec_llama.create_chat_completion(messages, CompletionOptions(96))
    plain = spec_llama.create_chat_completion(messages, CompletionOptions(96, speculative=False))
    assert fast.timings.draft_tokens > 0 and plain.timings.draft_tokens == 0
    if fast.message.content != plain.message.content:
        # Texts may part only at a near-tie of the batch arithmetic: check it on the tokens
        # of the rendered chat prompt.
        prompt = spec_llama.apply_chat_template(messages)
        same_or_near_tie(
            spec_llama,
            prompt,
            spec_llama.create_completion(prompt, CompletionOptions(96, speculative=False)),
            spec_llama.create_completion(prompt, CompletionOptions(96)),
        )


# ---- draft models -----------------------------------------------------------------------------


def test_the_target_as_its_own_draft_model_is_accepted(model_path: str) -> None:
    spec = Speculative(types=("draft-simple",), draft_model=model_path, draft_p_min=0.0, draft_n_max=8)
    with load(model_path, spec) as llama:
        plain = llama.create_completion(EDIT_PROMPT, CompletionOptions(64, speculative=False))
        fast = llama.create_completion(EDIT_PROMPT, CompletionOptions(64))
        t = fast.timings
        # Greedy draft and greedy target agree except at near-ties of their arithmetic: at
        # most one draft (8 tokens) is turned down where the two parted.
        assert t.draft_tokens >= 16 and t.draft_tokens - t.draft_accepted_tokens <= 8, t
        same_or_near_tie(llama, EDIT_PROMPT, plain, fast)
        # After the cache served the prompt, the draft model catches up on it and still drafts.
        again = llama.create_completion(EDIT_PROMPT, CompletionOptions(64))
        assert again.usage.cached_tokens > 0 and again.timings.draft_accepted_tokens > 0


def test_a_draft_model_of_another_vocabulary_is_refused(model_path: str) -> None:
    spec = Speculative(types=("draft-simple",), draft_model=ensure("gemma3-270m"))
    with pytest.raises(InvalidArgumentError) as exc:
        load(model_path, spec)
    assert exc.value.field == "speculative.draft_model"


@pytest.mark.parametrize(
    ("spec", "field"),
    [
        (Speculative(types=("ngram-nope",)), "speculative.types"),
        (Speculative(types=("draft-simple",)), "speculative.draft_model"),
        (Speculative(types=("ngram-simple",), ngram_size_n=0), "speculative.ngram_size_n"),
        (Speculative(types=("ngram-mod",), ngram_mod_n_min=80, ngram_mod_n_max=10), "speculative.ngram_mod_n_max"),
    ],
)
def test_bad_settings_are_refused_naming_the_field(model_path: str, spec: Speculative, field: str) -> None:
    with pytest.raises(InvalidArgumentError) as exc:
        load(model_path, spec)
    assert exc.value.field == field


@pytest.mark.parametrize("kind", ["ngram-map-k", "ngram-map-k4v", "ngram-mod", "ngram-cache"])
def test_every_self_speculative_type_keeps_greedy_output(model_path: str, kind: str) -> None:
    spec = Speculative(types=(kind,), ngram_size_n=4, ngram_size_m=16, ngram_mod_n_match=8, ngram_mod_n_min=4)
    with load(model_path, spec, n_parallel=1) as llama:
        plain = llama.create_completion(EDIT_PROMPT, CompletionOptions(96, speculative=False))
        fast = llama.create_completion(EDIT_PROMPT, CompletionOptions(96))
        same_or_near_tie(llama, EDIT_PROMPT, plain, fast)
        assert fast.timings.draft_accepted_tokens <= fast.timings.draft_tokens


def test_the_server_flag_builds_the_engine_setting() -> None:
    from llama_crab.server.config import ServeConfig

    assert ServeConfig(spec_type="ngram-simple, ngram-mod").spec_types == ("ngram-simple", "ngram-mod")
    assert ServeConfig(spec_type="none").spec_types == ()
    problems = dict(ServeConfig(spec_type="draft-simple").violations())
    assert "spec_type" in problems
    problems = dict(ServeConfig(spec_draft_model="smollm2-135m").violations())
    assert "spec_draft_model" in problems


def test_serve_loads_a_speculating_engine_from_its_flags(model_path: str) -> None:
    from llama_crab.server.app import load_llama
    from llama_crab.server.config import ServeConfig

    config = ServeConfig(model=model_path, n_ctx=2048, parallel=1, spec_type="ngram-simple", spec_ngram_size_n=4)
    with load_llama(config) as llama:
        out = llama.create_completion(EDIT_PROMPT, CompletionOptions(96, ignore_eos=True))
        assert out.timings.draft_tokens > 0
