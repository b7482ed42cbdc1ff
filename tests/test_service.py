"""The gRPC service on the real model: streaming, cancellation, deadlines, concurrency, errors.

The server runs in-process (`start_test_server`) on an ephemeral port; clients are plain
synchronous grpc stubs, so what is tested is exactly what goes over the wire.
"""

from __future__ import annotations

import logging
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Optional, Union

import grpc
import pytest
from google.rpc import error_details_pb2  # type: ignore[import-untyped]
from grpc_status import rpc_status

from llama_crab import Chunk, Completion, CompletionOptions, Llama, LlamaParams, StopReason
from llama_crab.server.testing import TestServer, start_test_server
from helpers import wait_until
from llama_crab_client import convert
from llama_crab_client.v1 import llama_crab_pb2 as pb
from llama_crab_client.v1 import llama_crab_pb2_grpc as pb_grpc

Stub = pb_grpc.LlamaCrabServiceStub
PROMPT = "The capital of France is"
LONG = CompletionOptions(400)  # far longer than any test waits for: it gets cancelled
Prompt = Union[str, Sequence[int]]


# ---- helpers --------------------------------------------------------------------------
def start(stub: Stub, prompt: Prompt, options: CompletionOptions, **kwargs: Any) -> Any:
    """Begin a Complete call; the returned call is also an iterator of responses."""
    return stub.Complete(convert.complete_request_to_proto(prompt, options), **kwargs)


def read(responses: Iterator[Any]) -> tuple[list[Chunk], list[Completion]]:
    """Every chunk and every completion of a stream, in order, checking their order."""
    chunks: list[Chunk] = []
    completions: list[Completion] = []
    for response in responses:
        event = convert.complete_response_from_proto(response)
        assert not completions, "nothing may follow the Completion"
        if isinstance(event, Completion):
            completions.append(event)
        else:
            chunks.append(event)
    return chunks, completions


def bad_request_fields(error: grpc.RpcError) -> list[str]:
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    assert status is not None, "error carries no google.rpc.Status details"
    fields = []
    for detail in status.details:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            fields += [v.field for v in bad.field_violations]
    return fields


def slots_idle(llama: Llama) -> bool:
    m = llama.metrics()
    return m.busy_slots == 0 and m.queue_depth == 0


def request_count(server: TestServer, method: str, code: str) -> float:
    return server.metrics.value("llama_crab_requests_total", {"method": method, "code": code})


# ---- fixtures ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def server(llama: Llama) -> Iterator[TestServer]:
    with start_test_server(llama) as s:
        yield s


@pytest.fixture(scope="module")
def stub(server: TestServer) -> Iterator[Stub]:
    with grpc.insecure_channel(server.address) as channel:
        yield Stub(channel)


@pytest.fixture(autouse=True)
def idle_engine(llama: Llama) -> Iterator[None]:
    """Every test starts and ends with all slots free (a leak fails the test that caused it)."""
    assert wait_until(lambda: slots_idle(llama))
    yield
    assert wait_until(lambda: slots_idle(llama)), "a slot was left busy"


# ---- streaming ------------------------------------------------------------------------
def test_chunks_in_order_then_exactly_one_completion(stub: Stub) -> None:
    call = start(stub, PROMPT, CompletionOptions(12))
    chunks, completions = read(call)
    assert len(completions) == 1
    completion = completions[0]
    assert chunks and "".join(c.text for c in chunks) == completion.text
    assert [c.n_tokens for c in chunks] == sorted({c.n_tokens for c in chunks})  # strictly increasing
    assert tuple(t for c in chunks for t in c.token_ids) == completion.token_ids
    assert completion.stop_reason is StopReason.LENGTH and completion.usage.completion_tokens == 12
    assert call.code() is grpc.StatusCode.OK


def test_stream_matches_in_process_greedy(stub: Stub, llama: Llama) -> None:
    options = CompletionOptions(10)
    _, completions = read(start(stub, PROMPT, options))
    assert completions[0].text == llama.create_completion(PROMPT, options).text


def test_request_id_is_echoed_or_generated(stub: Stub) -> None:
    call = start(stub, PROMPT, CompletionOptions(2), metadata=(("x-request-id", "req-abc"),))
    read(call)
    assert ("x-request-id", "req-abc") in tuple(call.initial_metadata())
    call = start(stub, PROMPT, CompletionOptions(2))
    read(call)
    generated = dict(call.initial_metadata()).get("x-request-id")
    assert generated and len(generated) == 32


def test_completion_log_line_carries_the_request_id(stub: Stub, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="llama_crab.server"):
        read(start(stub, PROMPT, CompletionOptions(3), metadata=(("x-request-id", "req-log-1"),)))
        assert wait_until(lambda: any(getattr(r, "request_id", None) == "req-log-1" for r in caplog.records))
    record = next(r for r in caplog.records if getattr(r, "request_id", None) == "req-log-1")
    assert record.getMessage() == "completion finished"
    fields = record.fields  # type: ignore[attr-defined]
    assert fields["stop_reason"] == "length" and fields["completion_tokens"] == 3 and fields["code"] == "OK"


def test_tokenize_detokenize_and_model(stub: Stub, llama: Llama) -> None:
    tokens = list(stub.Tokenize(pb.TokenizeRequest(text=PROMPT, add_special=True), timeout=10).tokens)
    assert tokens == llama.tokenize(PROMPT)
    text = stub.Detokenize(pb.DetokenizeRequest(tokens=tokens), timeout=10).text
    assert text == llama.detokenize(tokens)
    info = convert.model_info_from_proto(stub.GetModel(pb.GetModelRequest(), timeout=10))
    assert info == llama.model_info()


def test_token_prompt_equals_text_prompt(stub: Stub, llama: Llama) -> None:
    options = CompletionOptions(6)
    _, by_text = read(start(stub, PROMPT, options))
    _, by_tokens = read(start(stub, llama.tokenize(PROMPT), options))
    assert by_text[0].text == by_tokens[0].text


# ---- cancellation and deadlines ---------------------------------------------------------
def _assert_freed_and_counted(server: TestServer, llama: Llama, code: str, before: float) -> None:
    assert wait_until(lambda: slots_idle(llama)), "the slot was not freed"
    assert wait_until(lambda: request_count(server, "Complete", code) == before + 1)


def test_cancel_during_decode_frees_the_slot(server: TestServer, stub: Stub, llama: Llama) -> None:
    before = request_count(server, "Complete", "CANCELLED")
    cancelled_before = server.metrics.value("llama_crab_completions_total", {"stop_reason": "cancelled"})
    call = start(stub, PROMPT, LONG)
    responses = iter(call)
    next(responses)
    next(responses)
    call.cancel()
    with pytest.raises(grpc.RpcError) as exc:
        list(responses)
    assert exc.value.code() is grpc.StatusCode.CANCELLED
    _assert_freed_and_counted(server, llama, "CANCELLED", before)
    # The CANCELLED completion was accounted for (log + metrics), and the next request runs.
    assert wait_until(
        lambda: (
            server.metrics.value("llama_crab_completions_total", {"stop_reason": "cancelled"}) == cancelled_before + 1
        )
    )
    _, completions = read(start(stub, PROMPT, CompletionOptions(4)))
    assert completions[0].usage.completion_tokens == 4


def test_cancel_during_prefill_frees_the_slot(server: TestServer, stub: Stub, llama: Llama) -> None:
    before = request_count(server, "Complete", "CANCELLED")
    long_prompt = "word " * 400  # a prompt that takes a while to prefill
    call = start(stub, long_prompt, LONG)
    assert wait_until(lambda: llama.metrics().busy_slots > 0)
    call.cancel()
    _assert_freed_and_counted(server, llama, "CANCELLED", before)


def test_cancel_while_queued(server: TestServer, stub: Stub, llama: Llama) -> None:
    n_slots = llama.metrics().n_slots
    running = [start(stub, PROMPT, LONG) for _ in range(n_slots)]
    try:
        for call in running:
            next(iter(call))  # each holds a slot and is decoding
        before = request_count(server, "Complete", "CANCELLED")
        queued = start(stub, PROMPT, LONG)
        assert wait_until(lambda: llama.metrics().queue_depth == 1)
        queued.cancel()
        assert wait_until(lambda: llama.metrics().queue_depth == 0)
        assert wait_until(lambda: request_count(server, "Complete", "CANCELLED") == before + 1)
    finally:
        for call in running:
            call.cancel()
    assert wait_until(lambda: slots_idle(llama))


def test_deadline_exceeded_frees_the_slot(model_path: str) -> None:
    # One big slot: 4000 tokens outlast a 1 s deadline on any hardware.
    with Llama.load(LlamaParams(model_path).with_n_ctx(4096).with_n_parallel(1)) as roomy:
        with start_test_server(roomy) as server, grpc.insecure_channel(server.address) as channel:
            call = start(Stub(channel), PROMPT, CompletionOptions(4000), timeout=1.0)
            responses = iter(call)
            next(responses)  # generating: the handler runs, so the call will be counted
            with pytest.raises(grpc.RpcError) as exc:
                read(responses)
            assert exc.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
            _assert_freed_and_counted(server, roomy, "DEADLINE_EXCEEDED", 0)


_CLIENT_THAT_VANISHES = """
import sys, grpc
from llama_crab_client import convert
from llama_crab_client.types import CompletionOptions
from llama_crab_client.v1 import llama_crab_pb2_grpc as pb_grpc
channel = grpc.insecure_channel(sys.argv[1])
request = convert.complete_request_to_proto("Once upon a time", CompletionOptions(400))
call = pb_grpc.LlamaCrabServiceStub(channel).Complete(request)
next(iter(call))
print("streaming", flush=True)
sys.stdin.read()
"""


def test_dropped_connection_frees_the_slot(server: TestServer, llama: Llama) -> None:
    before = request_count(server, "Complete", "CANCELLED")
    client = subprocess.Popen(
        [sys.executable, "-c", _CLIENT_THAT_VANISHES, server.address],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert client.stdout is not None and client.stdout.readline().strip() == "streaming"
        assert llama.metrics().busy_slots == 1
    finally:
        client.kill()  # no goodbye: the connection just drops
        client.wait()
    _assert_freed_and_counted(server, llama, "CANCELLED", before)


# ---- concurrency -------------------------------------------------------------------------
def _first_divergence(a: Sequence[int], b: Sequence[int]) -> Optional[int]:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def test_eight_concurrent_streams_complete_independently(stub: Stub, llama: Llama) -> None:
    prompts = [
        "The capital of France is",
        "Rust is a programming language that",
        "Crabs walk sideways because",
        "def fibonacci(n):",
        "Once upon a time",
        "The best way to learn to cook is",
        "Water boils at",
        "My favourite colour is",
    ]
    options = CompletionOptions(16).with_logprobs(2)
    solo = [llama.create_completion(p, options) for p in prompts]
    results: list[Optional[tuple[list[Chunk], list[Completion]]]] = [None] * len(prompts)
    errors: list[BaseException] = []
    barrier = threading.Barrier(len(prompts))

    def worker(i: int) -> None:
        try:
            barrier.wait()
            results[i] = read(start(stub, prompts[i], options, timeout=120))
        except BaseException as e:  # surfaced below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=180)
    assert not errors
    for i, result in enumerate(results):
        assert result is not None
        chunks, completions = result
        assert len(completions) == 1 and "".join(c.text for c in chunks) == completions[0].text
        ref = solo[i]
        k = _first_divergence(completions[0].token_ids, ref.token_ids)
        if k is None:
            continue
        # Batched arithmetic may differ in the last bits; only a near-tie may flip.
        assert ref.logprobs is not None and k < len(ref.logprobs)
        top = ref.logprobs[k].top
        assert len(top) == 2 and top[0].logprob - top[1].logprob < 0.1, f"stream {i} diverged at token {k}"


def test_full_queue_is_resource_exhausted(model_path: str) -> None:
    with Llama.load(LlamaParams(model_path).with_n_ctx(512).with_n_parallel(1).with_max_queue(1)) as single:
        with start_test_server(single) as server, grpc.insecure_channel(server.address) as channel:
            stub = Stub(channel)
            running = start(stub, PROMPT, LONG)
            queued = None
            try:
                next(iter(running))  # holds the only slot
                queued = start(stub, PROMPT, CompletionOptions(4))
                assert wait_until(lambda: single.metrics().queue_depth == 1)
                with pytest.raises(grpc.RpcError) as exc:
                    read(start(stub, PROMPT, CompletionOptions(4), timeout=30))
                assert exc.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
                assert wait_until(lambda: request_count(server, "Complete", "RESOURCE_EXHAUSTED") == 1)
            finally:
                running.cancel()
            # The queued request gets the slot once the running one is cancelled.
            assert queued is not None
            _, completions = read(queued)
            assert completions[0].usage.completion_tokens == 4
            assert wait_until(lambda: slots_idle(single))


# ---- bad input ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("prompt", "options", "field"),
    [
        ("", CompletionOptions(4), "prompt"),
        (PROMPT, CompletionOptions(0), "max_tokens"),
        (PROMPT, CompletionOptions(4, temperature=-1.0), "temperature"),
        (PROMPT, CompletionOptions(4, top_p=2.0), "top_p"),
        (PROMPT, CompletionOptions(4, logprobs=99), "logprobs"),
        (PROMPT, CompletionOptions(4, samplers=("nope",)), "samplers"),
        (PROMPT, CompletionOptions(4, grammar="root ::= ("), "grammar"),
        ([10**9], CompletionOptions(4), "prompt"),
    ],
    ids=["empty prompt", "max_tokens", "temperature", "top_p", "logprobs", "samplers", "grammar", "token id"],
)
def test_bad_input_is_invalid_argument_naming_the_field(
    stub: Stub, prompt: Prompt, options: CompletionOptions, field: str
) -> None:
    with pytest.raises(grpc.RpcError) as exc:
        read(start(stub, prompt, options, timeout=30))
    assert exc.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert field in bad_request_fields(exc.value)


def test_over_long_prompt_is_invalid_argument(stub: Stub, llama: Llama) -> None:
    too_long = llama.tokenize("word") * llama.n_ctx_per_slot
    with pytest.raises(grpc.RpcError) as exc:
        read(start(stub, too_long, CompletionOptions(4), timeout=30))
    assert exc.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert bad_request_fields(exc.value) == ["prompt"]


def test_detokenize_bad_token_names_the_field(stub: Stub) -> None:
    with pytest.raises(grpc.RpcError) as exc:
        stub.Detokenize(pb.DetokenizeRequest(tokens=[-5]), timeout=10)
    assert exc.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert bad_request_fields(exc.value) == ["tokens"]


def test_bad_request_does_not_disturb_other_streams(stub: Stub) -> None:
    running = start(stub, PROMPT, CompletionOptions(24))
    responses = iter(running)
    first = next(responses)
    with pytest.raises(grpc.RpcError):
        read(start(stub, PROMPT, CompletionOptions(4, grammar="root ::= ("), timeout=30))
    chunks, completions = read(responses)
    first_chunk = convert.complete_response_from_proto(first)
    assert isinstance(first_chunk, Chunk)
    assert first_chunk.text + "".join(c.text for c in chunks) == completions[0].text
    assert completions[0].stop_reason is StopReason.LENGTH
