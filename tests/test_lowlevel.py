"""The low-level API (`llama_crab.lowlevel`) on the real default model: the examples run and
hold, every misuse raises a Python exception (never a crash), states round-trip, decode
cancels."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from llama_crab.lowlevel import (
    Batch,
    BusyError,
    ClosedError,
    Context,
    ContextFullError,
    DecodeCancelledError,
    DecodeError,
    Model,
    ModelLoadError,
    Sampler,
    SamplerChain,
    StateError,
    TopK,
)

ROOT = Path(__file__).resolve().parent.parent
PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def model(model_path: str) -> Iterator[Model]:
    with Model.load(model_path) as m:
        yield m


@pytest.fixture
def ctx(model: Model) -> Iterator[Context]:
    with Context(model, n_ctx=512, n_threads=2) as c:
        yield c


def decode_prompt(model: Model, ctx: Context, seq: int = 0, text: str = PROMPT) -> list[int]:
    tokens = model.tokenize(text)
    batch = Batch(len(tokens))
    batch.add_tokens(tokens, 0, seq)
    ctx.decode(batch)
    return tokens


# ---- the examples ------------------------------------------------------------------------------


@pytest.mark.parametrize("example", ["manual_loop", "shared_prefix", "custom_sampler"])
def test_example_runs_and_its_assertions_hold(example: str, model_path: str) -> None:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "examples" / f"{example}.py"), model_path],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "OK:" in proc.stdout


# ---- Model ---------------------------------------------------------------------------------------


def test_model_vocabulary_and_metadata(model: Model) -> None:
    assert model.n_vocab > 1000 and model.n_ctx_train > 0 and model.n_params > 0 and model.size > 0
    meta = model.metadata()
    assert meta["general.architecture"] == "llama"
    assert model.chat_template() == meta.get("tokenizer.chat_template")
    assert model.chat_template("no-such-template") is None
    assert model.eos is not None and model.is_eog(model.eos)
    assert model.fim_pre is None or 0 <= model.fim_pre < model.n_vocab
    tokens = model.tokenize(PROMPT)
    assert model.detokenize(tokens) == PROMPT
    assert "".join(model.token_to_piece(t) for t in tokens) == PROMPT
    # Special-token text is only parsed when asked.
    assert len(model.tokenize("<|im_end|>", add_special=False, parse_special=True)) == 1
    assert len(model.tokenize("<|im_end|>", add_special=False)) > 1


def test_token_pieces_that_split_a_character(model: Model) -> None:
    tokens = model.tokenize("\u20ac\u20ac\U0001f600", add_special=False)
    assert b"".join(model.token_to_bytes(t) for t in tokens).decode() == "\u20ac\u20ac\U0001f600"
    assert model.detokenize(tokens) == "\u20ac\u20ac\U0001f600"
    for t in tokens:  # a piece holding part of a character decodes with U+FFFD, never raises
        assert model.token_to_piece(t) == model.token_to_bytes(t).decode("utf-8", "replace")


def test_model_load_errors(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError):
        Model.load(tmp_path / "missing.gguf")
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"GGUF" + os.urandom(200))
    with pytest.raises(ModelLoadError):
        Model.load(junk)


def test_vocab_only_model_tokenizes_but_makes_no_context(model_path: str) -> None:
    with Model.load(model_path, vocab_only=True) as vocab:
        assert vocab.vocab_only and vocab.tokenize(PROMPT)
        with pytest.raises(ValueError, match="vocab_only"):
            Context(vocab)  # llama.cpp would abort on the first decode


def test_closed_model_raises_and_live_context_keeps_it(model_path: str) -> None:
    with Model.load(model_path) as m:
        ctx = Context(m, n_ctx=256, n_threads=2)
        sampler = Sampler(m, SamplerChain().greedy())
    assert m.closed
    for use in (lambda: m.n_vocab, lambda: m.tokenize("x"), lambda: m.metadata(), lambda: Context(m)):
        with pytest.raises(ClosedError, match="Model is closed"):
            use()
    assert issubclass(ClosedError, ValueError)
    # The context and sampler still hold the weights.
    batch = Batch(8)
    batch.add_tokens([1, 2, 3])
    ctx.decode(batch)
    assert 0 <= sampler.sample(ctx) < 49152
    ctx.close()
    ctx.close()  # idempotent
    sampler.close()
    for use in (lambda: ctx.decode(batch), lambda: ctx.logits(), lambda: ctx.n_ctx, lambda: ctx.seq_rm(0)):
        with pytest.raises(ClosedError, match="Context is closed"):
            use()
    with pytest.raises(ClosedError, match="Sampler is closed"):
        sampler.accept(1)


# ---- misuse: every path raises ---------------------------------------------------------------


def test_token_outside_the_vocabulary(model: Model, ctx: Context) -> None:
    n = model.n_vocab
    batch = Batch(4)
    batch.add(n, 0)
    with pytest.raises(IndexError, match="outside the vocabulary"):
        ctx.decode(batch)
    with pytest.raises(IndexError):
        Batch(4).add(-1, 0)
    for use in (
        lambda: model.token_to_piece(n),
        lambda: model.token_to_bytes(-3),
        lambda: model.detokenize([1, n]),
        lambda: model.is_eog(n + 5),
        lambda: model.detokenize([2**40]),
    ):
        with pytest.raises((IndexError, ValueError)):
            use()
    with Sampler(model, SamplerChain().greedy()) as sampler, pytest.raises(IndexError):
        sampler.accept(n)
    assert ctx.seq_pos_max(0) == -1  # nothing reached the memory


def test_sequence_id_outside_the_context(model: Model) -> None:
    with Context(model, n_ctx=512, n_seq_max=2, n_threads=2) as ctx:
        batch = Batch(4)
        batch.add(1, 0, 2)
        with pytest.raises(IndexError, match=r"seq id 2 is outside \[0, 2\)"):
            ctx.decode(batch)
        for use in (
            lambda: ctx.seq_rm(2),
            lambda: ctx.seq_rm(-1),
            lambda: ctx.seq_cp(0, 7),
            lambda: ctx.seq_keep(2),
            lambda: ctx.seq_add(5, 0, -1, 1),
            lambda: ctx.seq_pos_max(-2),
            lambda: ctx.seq_state_get(2),
            lambda: ctx.seq_state_set(b"x", 9),
        ):
            with pytest.raises(IndexError):
                use()
    with pytest.raises(IndexError):
        Batch(4).add(1, 0, -1)
    with pytest.raises(ValueError, match="seq_ids"):
        Batch(4, n_seq_max=1).add(1, 0, [0, 1])


def test_batch_overfull_and_batch_size(model: Model, ctx: Context) -> None:
    batch = Batch(2)
    batch.add(1, 0)
    batch.add(2, 1)
    with pytest.raises(IndexError, match="full"):
        batch.add(3, 2)
    batch.clear()
    with pytest.raises(IndexError, match="too full"):
        batch.add_tokens([1, 2, 3])
    assert len(batch) == 0  # all or nothing
    with pytest.raises(ValueError, match="empty"):
        ctx.decode(batch)
    with Context(model, n_ctx=256, n_batch=8, n_threads=2) as small:
        big = Batch(16)
        big.add_tokens(list(range(1, 10)))
        with pytest.raises(ValueError, match="n_batch"):
            small.decode(big)


def test_decoding_past_the_context(model: Model) -> None:
    with Context(model, n_ctx=64, n_threads=2) as ctx:
        n = ctx.n_ctx_seq
        batch = Batch(n + 1)
        batch.add(1, n)
        with pytest.raises(ContextFullError, match="past the context"):
            ctx.decode(batch)
        for start in range(0, n, ctx.n_batch):  # exactly full
            batch.clear()
            batch.add_tokens([1] * min(ctx.n_batch, n - start), start)
            ctx.decode(batch)
        batch.clear()
        batch.add(1, n, logits=True)
        with pytest.raises(ContextFullError):
            ctx.decode(batch)
        assert issubclass(ContextFullError, DecodeError)
        assert ctx.seq_pos_max(0) == n - 1
        # Room again after dropping the tail.
        assert ctx.seq_rm(0, n - 4)
        batch.clear()
        batch.add_tokens([1, 2, 3, 4], n - 4)
        ctx.decode(batch)


def test_positions_llama_cpp_refuses_leave_the_memory_as_it_was(model: Model, ctx: Context) -> None:
    decode_prompt(model, ctx)
    before = ctx.seq_pos_max(0)
    batch = Batch(2)
    batch.add(1, before + 5, logits=True)  # a gap in sequence 0
    with pytest.raises(DecodeError, match="returned -1"):
        ctx.decode(batch)
    assert ctx.seq_pos_max(0) == before
    with pytest.raises(ValueError, match="no logits"):
        ctx.logits()  # a failed decode leaves no logits to read


def test_logits_of_positions_without_logits(model: Model, ctx: Context) -> None:
    with pytest.raises(ValueError, match="nothing was decoded"):
        ctx.logits(0)
    tokens = decode_prompt(model, ctx)
    assert len(ctx.logits(-1)) == model.n_vocab
    assert ctx.logits(len(tokens) - 1) == ctx.logits(-1)
    with pytest.raises(ValueError, match="logits=False"):
        ctx.logits(0)
    with pytest.raises(IndexError):
        ctx.logits(len(tokens))
    with pytest.raises(IndexError):
        ctx.logprobs(-len(tokens) - 1)
    with pytest.raises(ValueError, match="top_n"):
        ctx.logprobs(-1, 0)


def test_logprobs_are_a_stable_log_softmax(model: Model, ctx: Context) -> None:
    decode_prompt(model, ctx)
    logits = ctx.logits()
    top = ctx.logprobs(-1, model.n_vocab)
    assert len(top) == model.n_vocab
    assert all(a[1] >= b[1] for a, b in zip(top, top[1:]))
    assert top[0][0] == max(range(len(logits)), key=lambda t: logits[t])
    assert math.isclose(sum(math.exp(lp) for _, lp in top), 1.0, rel_tol=1e-4)
    m = max(logits)
    log_z = m + math.log(sum(math.exp(v - m) for v in logits))
    for token, lp in top[:5]:
        assert math.isclose(lp, logits[token] - log_z, abs_tol=1e-4)


def test_context_parameters_are_checked(model: Model) -> None:
    for kwargs in ({"n_seq_max": 0}, {"n_batch": 0}, {"flash_attn": "maybe"}, {"n_ctx": -1}, {"n_ctx": 16, "n_seq_max": 4}):
        with pytest.raises(ValueError):
            Context(model, **kwargs)  # type: ignore[arg-type]


def test_partial_seq_cp_needs_a_unified_cache(model: Model) -> None:
    with Context(model, n_ctx=512, n_seq_max=2, n_threads=2) as ctx:
        decode_prompt(model, ctx)
        with pytest.raises(ValueError, match="kv_unified"):
            ctx.seq_cp(0, 1, 0, 3)  # llama.cpp would GGML_ASSERT here
        ctx.seq_cp(0, 1)
        assert ctx.seq_pos_max(1) == ctx.seq_pos_max(0)
    with Context(model, n_ctx=512, n_seq_max=2, kv_unified=True, n_threads=2) as ctx:
        decode_prompt(model, ctx)
        ctx.seq_cp(0, 1, 0, 3)
        assert (ctx.seq_pos_min(1), ctx.seq_pos_max(1)) == (0, 2)


def test_memory_operations(model: Model) -> None:
    with Context(model, n_ctx=512, n_seq_max=2, n_threads=2) as ctx:
        tokens = decode_prompt(model, ctx)
        decode_prompt(model, ctx, seq=1)
        last = len(tokens) - 1
        assert (ctx.seq_pos_min(0), ctx.seq_pos_max(0)) == (0, last)
        assert ctx.seq_rm(0, last)
        assert ctx.seq_pos_max(0) == last - 1
        ctx.seq_add(0, 0, -1, 10)
        assert (ctx.seq_pos_min(0), ctx.seq_pos_max(0)) == (10, last + 9)
        ctx.seq_div(0, -1, -1, 2)
        assert ctx.seq_pos_max(0) == (last + 9) // 2
        ctx.seq_keep(1)
        assert ctx.seq_pos_max(0) == -1 and ctx.seq_pos_max(1) == last
        ctx.clear()
        assert ctx.seq_pos_max(1) == -1


# ---- Sampler ---------------------------------------------------------------------------------


def test_sampler_chains(model: Model, ctx: Context) -> None:
    decode_prompt(model, ctx)
    greedy = Sampler(model, SamplerChain().greedy()).sample(ctx)
    assert greedy == ctx.logprobs(-1, 1)[0][0]
    assert Sampler(model, SamplerChain().top_k(1)).sample(ctx) == greedy  # dist appended: top-1 left
    assert Sampler(model, [TopK(1)]).sample(ctx) == greedy
    seeded = [Sampler(model, SamplerChain().top_k(40).temp(1.5), seed=7).sample(ctx) for _ in range(3)]
    assert len(set(seeded)) == 1
    every_stage = (
        SamplerChain().penalties(last_n=-1, repeat=1.1).dry(sequence_breakers=["\n", "."]).top_k(50).top_p(0.9)
        .min_p(0.05).typical(0.95).xtc(0.5, 0.1).top_n_sigma(2.0).dynamic_temp(0.8, 0.2).temp(0.9)
    )
    for selector in (SamplerChain().dist(), SamplerChain().mirostat(), SamplerChain().mirostat_v2(), SamplerChain().adaptive_p()):
        chain = SamplerChain(every_stage.stages + selector.stages)
        assert 0 <= Sampler(model, chain, seed=3, n_ctx=512).sample(ctx) < model.n_vocab
    s = Sampler(model, SamplerChain().penalties(last_n=64, repeat=1.3).greedy())
    s.accept(greedy)
    s.reset()
    assert "penalties" in repr(s)


def test_sampler_chain_problems_are_invalid_arguments(model: Model) -> None:
    with pytest.raises(ValueError, match="chain"):
        Sampler(model, [TopK(-3)])
    with pytest.raises(ValueError, match="last stage"):
        Sampler(model, SamplerChain((SamplerChain().greedy().stages[0], TopK(3))))
    with pytest.raises(ValueError, match="last stage"):
        Sampler(model, SamplerChain().custom(lambda logits: 0).stages + (TopK(3),))


def test_custom_stage_errors_propagate_and_the_sampler_survives(model: Model, ctx: Context) -> None:
    decode_prompt(model, ctx)
    top2 = [t for t, _ in ctx.logprobs(-1, 2)]

    def boom(logits: object) -> int:
        raise ZeroDivisionError("from the stage")

    cases = [
        (boom, ZeroDivisionError, "from the stage"),
        (lambda logits: top2[1], ValueError, "removed"),  # top_k(1) left only top2[0]
        (lambda logits: len(logits), IndexError, "outside the vocabulary"),
        (lambda logits: "seven", TypeError, "int token id"),
        (lambda logits: True, TypeError, "int token id"),
    ]
    for fn, exc, message in cases:
        with Sampler(model, SamplerChain().top_k(1).custom(fn)) as sampler:  # type: ignore[arg-type]
            with pytest.raises(exc, match=message):
                sampler.sample(ctx)
    # Re-entering the sampler from its own stage is refused, not a crash.
    holder: list[Sampler] = []
    sampler = Sampler(model, SamplerChain().custom(lambda logits: holder[0].sample(ctx)))
    holder.append(sampler)
    with pytest.raises(BusyError):
        sampler.sample(ctx)
    del sampler, holder  # a cycle through the stage's function: the GC collects it
    ok = Sampler(model, SamplerChain().top_k(1).custom(lambda logits: top2[0]))
    assert ok.sample(ctx) == top2[0]


def test_sampler_of_another_model(model: Model, ctx: Context) -> None:
    from llama_crab.models import cached_path

    other_path = cached_path("gemma3-270m")
    if other_path is None:
        pytest.skip("gemma3-270m is not cached")
    decode_prompt(model, ctx)
    with Model.load(other_path) as other, Sampler(other, SamplerChain().greedy()) as sampler:
        with pytest.raises(ValueError, match="another Model"):
            sampler.sample(ctx)


# ---- state -----------------------------------------------------------------------------------


def assert_close(a: list[tuple[int, float]], b: list[tuple[int, float]]) -> None:
    assert [t for t, _ in a] == [t for t, _ in b]
    assert all(math.isclose(x, y, abs_tol=1e-4) for (_, x), (_, y) in zip(a, b))


def redecode_last(ctx: Context, tokens: list[int], seq: int = 0) -> list[tuple[int, float]]:
    """Drop the last token of seq and decode it again: the next token's top logprobs. (A
    state holds the KV, not the logits, so this is how to get logits after a restore.)"""
    ctx.seq_rm(seq, len(tokens) - 1)
    batch = Batch(1)
    batch.add(tokens[-1], len(tokens) - 1, seq, logits=True)
    ctx.decode(batch)
    return ctx.logprobs(-1, 5)


def test_state_round_trips(model: Model, ctx: Context, tmp_path: Path) -> None:
    tokens = decode_prompt(model, ctx)
    expected = redecode_last(ctx, tokens)
    state = ctx.state_get()
    ctx.state_save(tmp_path / "whole.bin", tokens)
    ctx.seq_state_save(tmp_path / "seq.bin", 0, tokens)
    seq_state = ctx.seq_state_get(0)
    restores = {
        "state_set": lambda: ctx.state_set(state),
        "state_load": lambda: ctx.state_load(tmp_path / "whole.bin"),
        "seq_state_set": lambda: ctx.seq_state_set(seq_state, 0),
        "seq_state_load": lambda: ctx.seq_state_load(tmp_path / "seq.bin", 0),
    }
    for name, restore in restores.items():
        ctx.clear()
        got = restore()
        if name.endswith("load"):
            assert got == tokens, name
        assert ctx.seq_pos_max(0) == len(tokens) - 1, name
        if name.startswith("state"):
            with pytest.raises(ValueError, match="no logits"):  # a whole state brings no logits
                ctx.logits()
        assert_close(redecode_last(ctx, tokens), expected)


def test_sequence_state_into_another_sequence(model: Model) -> None:
    with Context(model, n_ctx=512, n_seq_max=2, n_threads=2) as ctx:
        tokens = decode_prompt(model, ctx, seq=0)
        expected = redecode_last(ctx, tokens, 0)
        ctx.seq_state_set(ctx.seq_state_get(0), 1)
        ctx.seq_rm(0)
        assert ctx.seq_pos_max(0) == -1 and ctx.seq_pos_max(1) == len(tokens) - 1
        assert_close(redecode_last(ctx, tokens, 1), expected)


def test_bad_states_raise_and_the_context_stays_usable(model: Model, ctx: Context, tmp_path: Path) -> None:
    tokens = decode_prompt(model, ctx)
    good = ctx.state_get()
    seq_file = tmp_path / "seq.bin"
    ctx.seq_state_save(seq_file, 0, tokens)
    whole_file = tmp_path / "whole.bin"
    ctx.state_save(whole_file, tokens)
    garbage = tmp_path / "garbage.bin"
    garbage.write_bytes(os.urandom(4096))
    truncated = tmp_path / "truncated.bin"
    truncated.write_bytes(whole_file.read_bytes()[: whole_file.stat().st_size // 2])
    bad = [
        lambda: ctx.state_set(b""),
        lambda: ctx.state_set(b"garbage" * 100),
        lambda: ctx.state_set(good[: len(good) // 2]),
        lambda: ctx.state_set(good + b"trailing"),
        lambda: ctx.seq_state_set(os.urandom(1000), 0),
        lambda: ctx.seq_state_set(good, 0),  # a whole state is not a sequence state
        lambda: ctx.state_load(tmp_path / "missing.bin"),
        lambda: ctx.state_load(garbage),
        lambda: ctx.state_load(truncated),
        lambda: ctx.state_load(seq_file),
        lambda: ctx.seq_state_load(whole_file, 0),
        lambda: ctx.seq_state_load(garbage, 0),
        lambda: ctx.state_save(tmp_path / "no" / "such" / "dir.bin", tokens),
    ]
    for use in bad:
        with pytest.raises(StateError):
            use()
    # Still usable: a good state goes back in and decoding continues.
    ctx.state_set(good)
    batch = Batch(1)
    batch.add(tokens[-1], len(tokens), logits=True)
    ctx.decode(batch)
    # A state of another context shape (n_seq_max) or another model is refused.
    with Context(model, n_ctx=512, n_seq_max=2, n_threads=2) as two, pytest.raises(StateError):
        two.state_set(good)
    from llama_crab.models import cached_path

    other_path = cached_path("gemma3-270m")
    if other_path is not None:
        with Model.load(other_path) as other, Context(other, n_ctx=512, n_threads=2) as foreign:
            with pytest.raises(StateError):
                foreign.state_set(good)
            with pytest.raises(StateError):
                foreign.seq_state_load(seq_file, 0)
            assert foreign.seq_pos_max(0) == -1


# ---- cancel and threads ----------------------------------------------------------------------


def test_cancel_before_a_decode_cancels_it(model: Model, ctx: Context) -> None:
    ctx.cancel()
    batch = Batch(4)
    batch.add_tokens([1, 2, 3])
    with pytest.raises(DecodeCancelledError, match="nothing was decoded"):
        ctx.decode(batch)
    assert ctx.seq_pos_max(0) == -1
    ctx.decode(batch)  # the cancel was used up
    assert ctx.seq_pos_max(0) == 2


def test_cancel_stops_a_running_decode_from_another_thread(model: Model) -> None:
    with Context(model, n_ctx=2048, n_batch=1024, n_ubatch=128, n_threads=1) as ctx:
        batch = Batch(1024)
        batch.add_tokens((model.tokenize("The quick brown fox jumps over the lazy dog. ") * 200)[:1024])
        outcome: list[BaseException] = []

        def run() -> None:
            try:
                ctx.decode(batch)
            except BaseException as e:
                outcome.append(e)

        worker = threading.Thread(target=run)
        worker.start()
        time.sleep(0.2)
        if worker.is_alive():
            # The decode released the GIL; a second thread is refused, not let in.
            for use in (lambda: ctx.seq_pos_max(0), lambda: ctx.logits(), lambda: batch.add(1, 1024)):
                try:
                    use()
                except BusyError:
                    pass
                else:
                    assert not worker.is_alive(), "a second thread got in during a decode"
        ctx.cancel()
        worker.join(120)
        assert not worker.is_alive()
        if outcome:
            assert isinstance(outcome[0], DecodeCancelledError), outcome
            assert ctx.seq_pos_max(0) == -1  # the ubatches done before the cancel were dropped
        else:  # finished before the cancel arrived: then the cancel stops the next decode
            with pytest.raises(DecodeCancelledError):
                ctx.decode(batch)
            ctx.seq_rm(0)
        small = Batch(4)
        small.add_tokens([1, 2, 3])
        ctx.decode(small)
        assert ctx.seq_pos_max(0) == 2


# ---- packaging ---------------------------------------------------------------------------------


def test_submodule_is_importable_and_ships_its_stub() -> None:
    import llama_crab
    import llama_crab._engine.lowlevel as native

    assert native.Context is Context
    assert (Path(llama_crab.__file__).parent / "_engine" / "lowlevel.pyi").is_file()
