"""Nothing a request contains may crash the process, stall the other streams or grow
memory without bound: guards before llama.cpp's aborts, cost limits, capped fields and
errors, and backpressure for clients that stop reading. Real model throughout.
"""

from __future__ import annotations

import dataclasses
import math
import random
import statistics
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2  # type: ignore[import-untyped]
from grpc_status import rpc_status

from helpers import wait_until
from llama_crab import (
    Chunk,
    Completion,
    CompletionOptions,
    InvalidArgumentError,
    Llama,
    LlamaParams,
    StopReason,
)
from llama_crab.server.testing import TestServer, start_test_server
from llama_crab_client import convert, sampling
from llama_crab_client.sampling import SamplerChain, SamplerStage
from llama_crab_client.errors import MAX_VIOLATIONS, bounded_violations
from llama_crab_client.status import to_status
from llama_crab_client.types import LIMITS, FieldViolation
from llama_crab_client.v1 import llama_crab_pb2 as pb
from llama_crab_client.v1 import llama_crab_pb2_grpc as pb_grpc

PROMPT = "The capital of France is"
# The default gRPC client refuses trailers over 8 KiB (grpc.max_metadata_size).
METADATA_LIMIT = 8 * 1024


def alternatives(n: int, prefix: str = "") -> str:
    """A grammar of n literal alternatives: cheap to parse, costly to apply per step."""
    return f"root ::= {prefix}(" + " | ".join(f'"w{i}"' for i in range(n)) + ")"


@pytest.fixture(scope="module")
def only_a(llama: Llama) -> CompletionOptions:
    """A grammar that allows just "a", with every token that could start it banned."""
    n_vocab = llama.model_info().n_vocab
    ids = [t for t in range(n_vocab) if llama.detokenize([t]) == "a"]
    assert ids, "the model has a token for 'a'"
    return CompletionOptions(8, grammar='root ::= "a"', logit_bias={t: -math.inf for t in ids})


@pytest.fixture(scope="module")
def server(llama: Llama) -> Iterator[TestServer]:
    with start_test_server(llama) as s:
        yield s


@pytest.fixture(scope="module")
def stub(server: TestServer) -> Iterator[pb_grpc.LlamaCrabServiceStub]:
    with grpc.insecure_channel(server.address) as channel:
        yield pb_grpc.LlamaCrabServiceStub(channel)


def violations_of(error: grpc.RpcError) -> list[error_details_pb2.BadRequest.FieldViolation]:
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    assert status is not None
    out: list[Any] = []
    for detail in status.details:
        bad = error_details_pb2.BadRequest()
        if detail.Unpack(bad):
            out += bad.field_violations
    return out


def call(stub: pb_grpc.LlamaCrabServiceStub, prompt: Any, options: CompletionOptions) -> list[Any]:
    return list(stub.Complete(convert.complete_request_to_proto(prompt, options), timeout=60))


def expect_invalid(stub: pb_grpc.LlamaCrabServiceStub, prompt: Any, options: CompletionOptions) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as exc:
        call(stub, prompt, options)
    assert exc.value.code() is grpc.StatusCode.INVALID_ARGUMENT, exc.value
    return exc.value


def serves_normally(llama: Llama) -> None:
    completion = llama.create_completion(PROMPT, CompletionOptions(4))
    assert completion.usage.completion_tokens == 4


# ---- 1. no request can abort the process ----------------------------------------------
@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_grammar_with_every_allowed_token_banned_ends_that_sequence(
    llama: Llama, only_a: CompletionOptions, temperature: float
) -> None:
    # Before the guard this aborted the interpreter (GGML_ABORT in llama-grammar.cpp).
    before = llama.metrics().guarded_failures_total
    with pytest.raises(InvalidArgumentError) as exc:
        llama.create_completion(PROMPT, only_a.with_temperature(temperature).with_seed(1))
    assert exc.value.field == "grammar"
    assert "no token is allowed" in exc.value.message
    assert llama.metrics().guarded_failures_total == before + 1
    serves_normally(llama)


def test_the_reported_probe_is_refused_not_fatal(llama: Llama) -> None:
    n_vocab = llama.model_info().n_vocab
    options = CompletionOptions(8, grammar='root ::= "zzzq"', logit_bias={t: -math.inf for t in range(n_vocab)})
    with pytest.raises(InvalidArgumentError) as exc:
        llama.create_completion(PROMPT, options)
    assert [v.field for v in exc.value.violations] == ["logit_bias"]
    serves_normally(llama)


def test_banned_grammar_over_grpc_is_invalid_argument_and_the_server_lives(
    stub: pb_grpc.LlamaCrabServiceStub, llama: Llama, only_a: CompletionOptions
) -> None:
    error = expect_invalid(stub, PROMPT, only_a)
    assert [v.field for v in violations_of(error)] == ["grammar"]
    responses = call(stub, PROMPT, CompletionOptions(4))
    final = convert.complete_response_from_proto(responses[-1])
    assert isinstance(final, Completion) and final.usage.completion_tokens == 4


def test_engine_checks_token_ids_itself(llama: Llama) -> None:
    # The native engine is reachable without the Python checks: it must not index out of bounds.
    from llama_crab import _engine

    engine = llama._engine
    sp = _engine.SamplingParams()
    for prompt, bias, field in (([10**9], [], "prompt"), ([-1], [], "prompt"), ([1], [(10**9, 1.0)], "logit_bias")):
        sp.logit_bias = bias
        with pytest.raises(ValueError, match=field):
            engine.submit(prompt, sp)
    serves_normally(llama)


EXTREME_CHAINS = [
    CompletionOptions(6, temperature=1.0, top_p=0.0, min_p=1.0, typical_p=1e-9, top_k=1, seed=1),
    CompletionOptions(6, temperature=100.0, samplers=("xtc", "top_n_sigma", "dry", "typical_p"), seed=2),
    CompletionOptions(6, temperature=1e-9, samplers=("min_p", "top_p"), min_p=1.0, top_p=0.0, seed=3),
    CompletionOptions(6, repeat_penalty=10.0, presence_penalty=2.0, frequency_penalty=-2.0, penalty_last_n=-1),
    CompletionOptions(6, temperature=0.7, samplers=("penalties",) * 16, seed=4),
]


@pytest.mark.parametrize("options", EXTREME_CHAINS)
def test_extreme_sampler_chains_with_most_tokens_banned(llama: Llama, options: CompletionOptions) -> None:
    # Chains that cut the candidate set hard, on top of a bias that bans all but a few
    # hundred tokens: each request ends (in a Completion or a clean error), never aborts.
    n_vocab = llama.model_info().n_vocab
    banned = {t: -math.inf for t in range(0, min(n_vocab, LIMITS.logit_bias))}
    for bias in ({}, banned):
        try:
            completion = llama.create_completion(PROMPT, dataclasses.replace(options, logit_bias=bias))
        except InvalidArgumentError as e:
            assert e.field in ("logit_bias", "samplers")
        else:
            assert completion.usage.completion_tokens <= options.max_tokens
            assert not set(completion.token_ids) & set(bias)
    serves_normally(llama)


def _random_stage(rng: random.Random) -> SamplerStage:
    """A valid stage with parameters at the edges of their documented ranges."""

    def edge(lo: float, hi: float) -> float:
        return rng.choice([lo, hi, rng.uniform(lo, hi)])

    makers: list[Callable[[], SamplerStage]] = [
        lambda: sampling.TopK(rng.choice([0, 1, 2, 1 << 20])),
        lambda: sampling.TopP(edge(0, 1), rng.choice([0, 1, 1024])),
        lambda: sampling.MinP(edge(0, 1), rng.choice([0, 5])),
        lambda: sampling.Typical(max(1e-6, edge(0, 1)), rng.choice([0, 3])),
        lambda: sampling.Temp(edge(0, 100)),
        lambda: sampling.DynamicTemp(edge(0, 100), edge(0, 100), edge(0, 100)),
        lambda: sampling.Xtc(edge(0, 1), edge(0, 1), rng.choice([0, 1024])),
        lambda: sampling.TopNSigma(max(1e-6, edge(0, 100))),
        lambda: sampling.Penalties(rng.choice([-1, 0, 1, 64]), max(1e-3, edge(0, 10)), edge(-2, 2), edge(-2, 2)),
        lambda: sampling.Dry(edge(0, 100), edge(1, 100), rng.choice([0, 1, 1000]), rng.choice([-1, 0, 5]), ("a", "\n")),
        lambda: sampling.Greedy(),
        lambda: sampling.Dist(),
        lambda: sampling.Mirostat(edge(0, 100), edge(0, 10), rng.choice([1, 1000])),
        lambda: sampling.MirostatV2(edge(0, 100), edge(0, 10)),
        lambda: sampling.AdaptiveP(edge(0, 1), edge(0, 0.99)),
    ]
    return rng.choice(makers)()


def test_random_typed_chains_at_their_edges_never_abort(llama: Llama) -> None:
    # Valid chains (the fuzzer mostly sends invalid ones), parameters at their limits, with
    # most of the vocabulary banned, a grammar, banned end-of-generation: every request ends
    # in a Completion or INVALID_ARGUMENT, and the server then serves normally.
    rng = random.Random(7)
    n_vocab = llama.model_info().n_vocab
    for _ in range(60):
        stages = [_random_stage(rng) for _ in range(rng.randint(1, 5))]
        selectors = [s for s in stages if s.selects]
        chain = SamplerChain((*[s for s in stages if not s.selects], *selectors[-1:]))
        bias = {t: -math.inf for t in rng.sample(range(n_vocab), LIMITS.logit_bias)} if rng.random() < 0.4 else {}
        options = CompletionOptions(
            rng.randint(1, 8), seed=rng.randrange(100), sampler_chain=chain, logit_bias=bias,
            grammar=rng.choice([None, None, "root ::= [a-z]+", 'root ::= "zz"']), min_tokens=rng.choice([0, 0, 5]),
            ignore_eos=rng.random() < 0.2, logprobs=rng.choice([None, 3]),
        )  # fmt: skip
        try:
            completion = llama.create_completion(rng.choice([PROMPT, "1 2 3"]), options)
        except InvalidArgumentError as e:
            assert e.field in ("grammar", "logit_bias"), e
        else:
            assert completion.usage.completion_tokens <= options.max_tokens
            assert not set(completion.token_ids) & set(bias)
    serves_normally(llama)


# ---- grammar cost ------------------------------------------------------------------------
def test_grammar_size_and_repetition_limits(llama: Llama) -> None:
    big = alternatives(4000)
    assert len(big) > llama.params.max_grammar_bytes
    with pytest.raises(InvalidArgumentError, match="bytes") as exc:
        llama.create_completion(PROMPT, CompletionOptions(4, grammar=big))
    assert exc.value.field == "grammar"
    # Small text, huge expansion: each {0,2000} becomes 2000 rules when llama.cpp parses it.
    repeated = "\n".join(f'r{i} ::= "a"{{0,2000}}' for i in range(8)) + "\nroot ::= r0"
    with pytest.raises(InvalidArgumentError, match="repetitions") as exc:
        llama.create_completion(PROMPT, CompletionOptions(4, grammar=repeated))
    assert exc.value.field == "grammar"
    # llama.cpp computed n - m unsigned for this and looped practically forever.
    with pytest.raises(InvalidArgumentError, match="n < m") as exc:
        llama.create_completion(PROMPT, CompletionOptions(4, grammar='root ::= "a"{3,1}'))
    assert exc.value.field == "grammar"
    # llama.cpp parses groups recursively: this deep a nesting used to overflow its stack.
    with pytest.raises(InvalidArgumentError, match="nest") as exc:
        llama.create_completion(PROMPT, CompletionOptions(4, grammar="root ::= " + "(" * 30_000))
    assert exc.value.field == "grammar"
    # Braces inside literals and classes are text, not repetitions.
    assert llama.create_completion(PROMPT, CompletionOptions(2, grammar='root ::= "{9999}" [{}]')).text


def test_grammar_too_costly_per_step_is_refused_at_submit(llama: Llama) -> None:
    # Within the byte limit, but applying it to the vocabulary costs more than a step may.
    costly = alternatives(3000)
    assert len(costly) <= llama.params.max_grammar_bytes
    with pytest.raises(InvalidArgumentError, match="vocabulary once") as exc:
        llama.submit(PROMPT, CompletionOptions(4, grammar=costly))
    assert exc.value.field == "grammar"


def grammar_probe_cpu_ms(model_path: str, grammar: str) -> float:
    """CPU of the submit-time cost probe for `grammar` on this build and host: submit runs
    it on the calling thread, and with a bound it cannot reach it runs to the end."""
    with Llama.load(LlamaParams(model_path, n_ctx=512).with_max_sample_ms(600_000)) as llama:
        start = time.thread_time()
        handle = llama.submit(PROMPT, CompletionOptions(1, grammar=grammar))
        cost = (time.thread_time() - start) * 1000.0
        handle.close()
    return cost


def test_grammar_that_becomes_costly_later_is_ended_at_that_step(model_path: str) -> None:
    # One stack until "§§" is out, so the probe at submit stays cheap (~5 ms on a release
    # build: no token gets past both characters); 2000 stacks after it, which makes each
    # later step cost ~40 times the probe (~200 ms). The bound sits between the two: 50 ms,
    # or 4x the measured probe where the build is slower (ASan + UBSan: scripts/sanitize.sh),
    # so the probe passes and the later step is still ~10x over it.
    sneaky = alternatives(2000, prefix='"§§" ')
    probe_ms = grammar_probe_cpu_ms(model_path, sneaky)
    bound_ms = max(50.0, 4.0 * probe_ms)
    print(f"probe {probe_ms:.1f} ms of CPU; max_sample_ms {bound_ms:.0f}")
    with Llama.load(LlamaParams(model_path, n_ctx=512).with_max_sample_ms(bound_ms)) as llama:
        handle = llama.submit(PROMPT, CompletionOptions(8, grammar=sneaky))
        with pytest.raises(InvalidArgumentError, match="in one step") as exc:
            list(handle.events())
        handle.close()
        assert exc.value.field == "grammar"
        assert llama.metrics().guarded_failures_total == 1
        serves_normally(llama)


def test_hostile_grammars_do_not_stall_a_running_stream(llama: Llama, only_a: CompletionOptions) -> None:
    """A victim stream's inter-chunk gaps while hostile grammars arrive. The bound is
    generous: 2 s where a quiet gap is ~10 ms (a release build on 2 cores), scaled by the
    quiet gaps measured first, so a slower build (ASan + UBSan) is held to the same ratio;
    docs/reliability.md has the measured values."""
    stamps: list[float] = []
    victim_done = threading.Event()

    def victim() -> None:
        for _chunk in llama.stream(PROMPT, CompletionOptions(160)):
            stamps.append(time.monotonic())
        victim_done.set()

    thread = threading.Thread(target=victim)
    thread.start()
    assert wait_until(lambda: len(stamps) >= 5)
    quiet = statistics.median(b - a for a, b in zip(stamps[:5], stamps[1:5]))
    bound = 2.0 * max(1.0, quiet / 0.010)
    print(f"quiet gap {quiet * 1000:.1f} ms; stall bound {bound:.1f} s")
    hostile = [
        CompletionOptions(4, grammar=alternatives(3000)),  # refused by the probe
        CompletionOptions(4, grammar=alternatives(3000, prefix='"§" ')),  # refused by the probe
        CompletionOptions(4, grammar=alternatives(1000, prefix='"§" ')),  # passes; ~100 ms steps
        only_a,  # ended by the no-allowed-token guard
        CompletionOptions(4, grammar=alternatives(4000)),  # over the byte limit
    ]
    for options in hostile * 2:
        try:
            llama.create_completion(PROMPT, options)
        except InvalidArgumentError as e:
            assert e.field == "grammar"
    thread.join(120)
    assert victim_done.is_set()
    gaps = [b - a for a, b in zip(stamps, stamps[1:])]
    assert max(gaps) < bound, f"the victim stalled {max(gaps):.3f} s (quiet gap {quiet * 1000:.1f} ms)"


# ---- capped fields and bounded errors -----------------------------------------------------
@pytest.mark.parametrize(
    ("options", "field"),
    [
        (CompletionOptions(4, logit_bias={10**6 + i: 1.0 for i in range(100_000)}), "logit_bias"),
        (CompletionOptions(4, stop_sequences=tuple(f"s{i}" for i in range(LIMITS.stop_sequences + 1))), "stop_sequences"),
        (CompletionOptions(4, stop_sequences=("x" * (LIMITS.stop_sequence_chars + 1),)), "stop_sequences[0]"),
        (CompletionOptions(4, samplers=("top_k",) * (LIMITS.samplers + 1)), "samplers"),
    ],
)
def test_capped_fields_get_one_short_violation(
    stub: pb_grpc.LlamaCrabServiceStub, options: CompletionOptions, field: str
) -> None:
    error = expect_invalid(stub, PROMPT, options)
    assert [v.field for v in violations_of(error)] == [field]


def test_over_long_prompts_are_refused_before_tokenizing(llama: Llama, stub: pb_grpc.LlamaCrabServiceStub) -> None:
    text = "a" * (LIMITS.prompt_text_bytes + 1)
    with pytest.raises(InvalidArgumentError, match="bytes") as exc:
        llama.submit(text)
    assert exc.value.field == "prompt"
    with pytest.raises(InvalidArgumentError) as exc:
        llama.submit([1] * (LIMITS.prompt_tokens + 1))
    assert exc.value.field == "prompt"
    with pytest.raises(grpc.RpcError) as rpc:
        stub.Tokenize(pb.TokenizeRequest(text=text), timeout=30)
    assert rpc.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert [v.field for v in violations_of(rpc.value)] == ["text"]


def test_error_details_are_bounded() -> None:
    many = [FieldViolation(f"f{i}", "x" * 1000) for i in range(50_000)]
    shown = bounded_violations(many)
    assert len(shown) == MAX_VIOLATIONS + 1
    assert shown[-1].description == f"and {50_000 - MAX_VIOLATIONS} more violations not listed"
    error = InvalidArgumentError.from_violations(many)
    status = to_status(error)
    # Binary trailers travel base64-encoded: 4/3 of their size.
    size = sum(len(k) + len(v) * 4 / 3 for k, v in status.trailing_metadata) + len(status.details)
    assert size < METADATA_LIMIT / 2


def test_many_violations_reach_a_default_client_as_invalid_argument(stub: pb_grpc.LlamaCrabServiceStub) -> None:
    # 16 empty stop sequences and more bad fields: over MAX_VIOLATIONS in all.
    bad = CompletionOptions(0, stop_sequences=("",) * LIMITS.stop_sequences, top_k=-1, top_p=2.0)
    error = expect_invalid(stub, PROMPT, bad)
    violations = violations_of(error)
    assert len(violations) == MAX_VIOLATIONS + 1
    assert "more violations not listed" in violations[-1].description


def test_a_long_grammar_error_stays_small_on_the_wire(stub: pb_grpc.LlamaCrabServiceStub) -> None:
    # llama.cpp's parse errors quote the rest of the grammar; the status must not.
    broken = "root ::= @ " + '"a" ' * 7000
    error = expect_invalid(stub, PROMPT, CompletionOptions(4, grammar=broken))
    assert len(error.details() or "") <= 500
    assert all(len(v.description) <= 200 for v in violations_of(error))


# ---- backpressure -------------------------------------------------------------------------
BUFFER = 4096
SLOW = CompletionOptions(300, logprobs=5)


@pytest.fixture(scope="module")
def small_buffer(model_path: str) -> Iterator[Llama]:
    params = LlamaParams(model_path, n_ctx=1024, n_parallel=2).with_backpressure(BUFFER, None)
    with Llama.load(params) as model:
        yield model


def test_a_reader_that_stops_pauses_its_sequence_and_resumes_exactly(small_buffer: Llama) -> None:
    llama = small_buffer
    reference = llama.create_completion(PROMPT, SLOW)  # read as it goes: never paused
    handle = llama.submit(PROMPT, SLOW)
    native = handle._native
    assert wait_until(lambda: llama.metrics().paused_slots == 1)
    held = native.buffered_bytes()
    time.sleep(0.3)
    # Paused: nothing more was generated, and what waits is bounded by the buffer (+ one chunk).
    assert native.buffered_bytes() == held
    assert held < BUFFER + 2048
    events = list(handle.events())
    handle.close()
    final = events[-1]
    assert isinstance(final, Completion)
    assert final.token_ids == reference.token_ids
    assert final.text == reference.text
    assert llama.metrics().paused_slots == 0
    assert llama.metrics().pauses_total >= 1


def test_cancel_policy_ends_a_stream_whose_reader_is_behind(model_path: str) -> None:
    params = LlamaParams(model_path, n_ctx=1024).with_backpressure(BUFFER, 0.0)
    with Llama.load(params) as llama:
        handle = llama.submit(PROMPT, SLOW)
        assert wait_until(lambda: llama.metrics().slow_reader_cancels_total == 1)
        final = list(handle.events())[-1]
        handle.close()
        assert isinstance(final, Completion) and final.stop_reason is StopReason.CANCELLED
        assert final.usage.completion_tokens < SLOW.max_tokens
        assert llama.metrics().busy_slots == 0


def test_grpc_client_that_stops_reading_pauses_the_engine(small_buffer: Llama) -> None:
    """A client whose HTTP/2 window is small and that stops reading: the server's writes
    wait, its relay stops taking events, and the engine pauses the sequence. (A default
    grpc client keeps reading the socket into its own memory with a window it grows, so
    it never pushes back; the server is bounded either way.)"""
    llama = small_buffer
    window = [("grpc.http2.bdp_probe", 0), ("grpc.http2.lookahead_bytes", 16384)]
    with start_test_server(llama) as server, grpc.insecure_channel(server.address, options=window) as channel:
        stub = pb_grpc.LlamaCrabServiceStub(channel)
        request = convert.complete_request_to_proto(PROMPT, CompletionOptions(400, logprobs=20))
        responses = stub.Complete(request, timeout=120)
        first = convert.complete_response_from_proto(next(responses))  # started; now read nothing more
        assert wait_until(lambda: llama.metrics().paused_slots == 1)
        steps = llama.metrics().decode_steps_total
        time.sleep(0.5)
        assert llama.metrics().paused_slots == 1
        assert llama.metrics().decode_steps_total == steps, "a paused sequence kept decoding"
        # Reading again resumes it to the end.
        rest = [convert.complete_response_from_proto(r, logprobs_requested=True) for r in responses]
        final = rest[-1]
        assert isinstance(final, Completion)
        assert final.stop_reason in (StopReason.LENGTH, StopReason.EOS)
        chunks = [first, *rest[:-1]]
        assert final.token_ids == tuple(t for c in chunks if isinstance(c, Chunk) for t in c.token_ids)
        assert wait_until(lambda: llama.metrics().busy_slots == 0)


def test_cancelling_a_stream_whose_writes_wait_counts_as_cancelled(small_buffer: Llama) -> None:
    # The server is blocked writing to this client when it cancels: grpc fails that write
    # with its own error, which must count as CANCELLED, not INTERNAL.
    llama = small_buffer
    window = [("grpc.http2.bdp_probe", 0), ("grpc.http2.lookahead_bytes", 16384)]
    with start_test_server(llama) as server, grpc.insecure_channel(server.address, options=window) as channel:
        stub = pb_grpc.LlamaCrabServiceStub(channel)
        responses = stub.Complete(convert.complete_request_to_proto(PROMPT, CompletionOptions(400, logprobs=20)))
        next(responses)
        assert wait_until(lambda: llama.metrics().paused_slots == 1)
        responses.cancel()
        assert wait_until(lambda: llama.metrics().busy_slots == 0)
        labels = {"method": "Complete"}
        assert wait_until(lambda: server.metrics.value("llama_crab_requests_total", {**labels, "code": "CANCELLED"}) == 1)
        assert server.metrics.value("llama_crab_requests_total", {**labels, "code": "INTERNAL"}) == 0
