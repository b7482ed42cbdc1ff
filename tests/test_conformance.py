"""One behavioural suite, run against every way of calling llama-crab.

`local` is the in-process `Llama`; `remote` is the sync `Client` and `remote-aio` the
`AsyncClient`, both over gRPC to an in-process server on an ephemeral port serving
that same `Llama`. Whatever a test asserts must hold for all three, so code written
against one transport works against the others. Expected values come from the
in-process engine (greedy decoding is deterministic), never from constants.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence
from typing import Optional, Protocol, Union

import pytest
from helpers import LoopThread

from llama_crab import Llama
from llama_crab_client import AsyncClient, Client
from llama_crab_client.errors import InvalidArgumentError, LlamaCrabError
from llama_crab_client.sampling import SamplerChain, TopK, TopP
from llama_crab_client.types import (
    Chunk,
    Completion,
    CompletionCallback,
    CompletionOptions,
    ModelInfo,
    StopReason,
    StreamControl,
)

Prompt = Union[str, Sequence[int]]

BACKENDS = ["local", "remote", "remote-aio"]


class Backend(Protocol):
    def create_completion(self, prompt: Prompt, options: Optional[CompletionOptions] = None) -> Completion: ...

    def create_completion_stream(
        self, prompt: Prompt, options: Optional[CompletionOptions], callback: CompletionCallback
    ) -> Completion: ...

    def tokenize(self, text: str, add_special: bool = True, parse_special: bool = True) -> list[int]: ...

    def detokenize(self, tokens: Sequence[int]) -> str: ...

    def model_info(self) -> ModelInfo: ...


class AsyncClientBackend:
    """The AsyncClient driven from synchronous tests (its coroutines run on LoopThread)."""

    def __init__(self, loop: LoopThread, address: str) -> None:
        self._loop = loop

        async def make() -> AsyncClient:
            return AsyncClient(address)

        self.client = loop.run(make())

    def create_completion(self, prompt: Prompt, options: Optional[CompletionOptions] = None) -> Completion:
        return self._loop.run(self.client.create_completion(prompt, options))

    def create_completion_stream(
        self, prompt: Prompt, options: Optional[CompletionOptions], callback: CompletionCallback
    ) -> Completion:
        return self._loop.run(self.client.create_completion_stream(prompt, options, callback))

    def tokenize(self, text: str, add_special: bool = True, parse_special: bool = True) -> list[int]:
        return self._loop.run(self.client.tokenize(text, add_special, parse_special))

    def detokenize(self, tokens: Sequence[int]) -> str:
        return self._loop.run(self.client.detokenize(tokens))

    def model_info(self) -> ModelInfo:
        return self._loop.run(self.client.model_info())

    def close(self) -> None:
        self._loop.run(self.client.close())


@pytest.fixture(scope="module")
def server_address(llama: Llama) -> Iterator[str]:
    from llama_crab.server.testing import start_test_server

    server = start_test_server(llama)
    yield server.address
    server.stop()


@pytest.fixture(scope="module")
def remote_client(server_address: str) -> Iterator[Client]:
    with Client(server_address, timeout=120) as client:
        yield client


@pytest.fixture(scope="module")
def remote_aio_backend(server_address: str) -> Iterator[AsyncClientBackend]:
    backend = AsyncClientBackend(LoopThread(), server_address)
    yield backend
    backend.close()


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest, llama: Llama) -> Backend:
    if request.param == "local":
        return llama
    if request.param == "remote":
        client: Client = request.getfixturevalue("remote_client")
        return client
    aio_backend: AsyncClientBackend = request.getfixturevalue("remote_aio_backend")
    return aio_backend


def collect(backend: Backend, prompt: Prompt, options: CompletionOptions) -> tuple[list[Chunk], Completion]:
    chunks: list[Chunk] = []

    def keep(chunk: Chunk) -> None:
        chunks.append(chunk)

    return chunks, backend.create_completion_stream(prompt, options, keep)


PROMPT = "The capital of France is"


# ---- same output ------------------------------------------------------------------------
def test_greedy_output_matches_in_process(backend: Backend, llama: Llama) -> None:
    options = CompletionOptions(16)
    expected = llama.create_completion(PROMPT, options)
    got = backend.create_completion(PROMPT, options)
    assert got.text == expected.text
    assert got.token_ids == expected.token_ids
    assert got.stop_reason == expected.stop_reason
    assert got.usage.prompt_tokens == expected.usage.prompt_tokens
    assert got.usage.completion_tokens == len(got.token_ids) > 0


def test_token_prompt_matches_text_prompt(backend: Backend, llama: Llama) -> None:
    options = CompletionOptions(8)
    tokens = backend.tokenize(PROMPT)
    assert tokens == llama.tokenize(PROMPT)
    assert backend.create_completion(tokens, options).token_ids == llama.create_completion(PROMPT, options).token_ids


def test_tokenize_detokenize_and_model_info_match(backend: Backend, llama: Llama) -> None:
    text = "Hello, wörld! 你好 🙂"
    tokens = backend.tokenize(text, add_special=False)
    assert tokens == llama.tokenize(text, add_special=False)
    assert backend.detokenize(tokens) == llama.detokenize(tokens) == text
    assert backend.model_info() == llama.model_info()


# ---- streaming ----------------------------------------------------------------------------
@pytest.mark.parametrize("prompt", ["Emoji party: 🎉🎊🥳 and more emoji:", "日本語の文章: 東京は日本の首都です。大阪は"])
def test_chunks_concatenate_to_the_completion_and_never_split_utf8(backend: Backend, prompt: str) -> None:
    chunks, completion = collect(backend, prompt, CompletionOptions(24))
    assert chunks, "no chunk was streamed"
    assert "".join(c.text for c in chunks) == completion.text
    assert tuple(t for c in chunks for t in c.token_ids) == completion.token_ids
    assert [c.n_tokens for c in chunks] == list(itertools.accumulate(len(c.token_ids) for c in chunks))
    for chunk in chunks:
        assert "\ufffd" not in chunk.text, f"a chunk split a UTF-8 character: {chunk.text!r}"
        chunk.text.encode("utf-8")  # no lone surrogates either
    # The prompts are chosen so the default model writes multi-byte characters.
    assert any(ord(ch) > 127 for ch in completion.text)


def test_stop_sequence_is_never_emitted(backend: Backend, llama: Llama) -> None:
    reference = llama.create_completion(PROMPT, CompletionOptions(24)).text
    words = reference.split()
    assert len(words) >= 3, reference
    stop = words[2]
    expected_text = reference[: reference.index(stop)]

    chunks, completion = collect(backend, PROMPT, CompletionOptions(24).with_stop_sequence(stop))
    assert completion.stop_reason is StopReason.STOP_SEQUENCE
    assert completion.stop_sequence == stop
    assert completion.text == expected_text
    assert "".join(c.text for c in chunks) == expected_text
    assert stop not in completion.text


@pytest.mark.parametrize("k", [1, 3])
def test_stop_after_k_chunks_returns_exactly_those_chunks(backend: Backend, k: int) -> None:
    delivered: list[Chunk] = []

    def stop_after_k(chunk: Chunk) -> StreamControl:
        delivered.append(chunk)
        return StreamControl.STOP if len(delivered) == k else StreamControl.CONTINUE

    completion = backend.create_completion_stream(
        "Once upon a time", CompletionOptions(64).with_logprobs(1), stop_after_k
    )
    assert len(delivered) == k
    assert completion.stop_reason is StopReason.CANCELLED
    assert completion.stop_sequence is None
    assert completion.text == "".join(c.text for c in delivered)
    assert completion.token_ids == tuple(t for c in delivered for t in c.token_ids)
    assert completion.usage.completion_tokens == len(completion.token_ids)
    # The prompt's length is known even though the server's final message never came.
    assert completion.usage.prompt_tokens == 4  # "Once upon a time" in smollm2's tokenizer
    assert completion.logprobs == tuple(lp for c in delivered for lp in (c.logprobs or ()))
    # Still usable afterwards.
    assert backend.create_completion("Hello", CompletionOptions(4)).usage.completion_tokens > 0


def test_callback_exception_cancels_and_propagates(backend: Backend) -> None:
    class Boom(Exception):
        pass

    def explode(chunk: Chunk) -> None:
        raise Boom()

    with pytest.raises(Boom):
        backend.create_completion_stream("Once upon a time", CompletionOptions(64), explode)
    assert backend.create_completion("Hello", CompletionOptions(4)).usage.completion_tokens > 0


def test_leaving_a_stream_loop_is_stop(llama: Llama, remote_client: Client) -> None:
    """`stream()` (sync): breaking out inside `with` leaves exactly the delivered chunks."""
    for source in (llama, remote_client):
        delivered: list[Chunk] = []
        with source.stream("Once upon a time", CompletionOptions(64)) as stream:
            for chunk in stream:
                delivered.append(chunk)
                if len(delivered) == 2:
                    break
        assert stream.completion is not None
        assert stream.completion.stop_reason is StopReason.CANCELLED
        assert stream.completion.text == "".join(c.text for c in delivered)


def test_async_stream_break_is_stop(remote_aio_backend: AsyncClientBackend) -> None:
    async def run() -> tuple[list[Chunk], Optional[Completion]]:
        delivered: list[Chunk] = []
        async with remote_aio_backend.client.stream("Once upon a time", CompletionOptions(64)) as stream:
            async for chunk in stream:
                delivered.append(chunk)
                if len(delivered) == 2:
                    break
        return delivered, stream.completion

    delivered, completion = remote_aio_backend._loop.run(run())
    assert completion is not None and completion.stop_reason is StopReason.CANCELLED
    assert completion.text == "".join(c.text for c in delivered)
    assert completion.usage.prompt_tokens == 4


# ---- logprobs -----------------------------------------------------------------------------
def test_logprobs_shape(backend: Backend) -> None:
    top_n = 3
    chunks, completion = collect(backend, PROMPT, CompletionOptions(12).with_logprobs(top_n))
    assert chunks
    for chunk in chunks:
        assert chunk.logprobs is not None
        assert len(chunk.logprobs) == len(chunk.token_ids)
        for token_id, lp in zip(chunk.token_ids, chunk.logprobs):
            assert lp.token_id == token_id
            assert lp.logprob <= 0.0
            assert len(lp.top) == top_n
            tops = [t.logprob for t in lp.top]
            assert tops == sorted(tops, reverse=True)
            # Greedy: the chosen token is the most likely one.
            assert lp.top[0].token_id == token_id
            assert lp.top[0].logprob == pytest.approx(lp.logprob, abs=1e-5)
    assert completion.logprobs == tuple(lp for c in chunks for lp in (c.logprobs or ()))


def test_no_logprobs_unless_asked(backend: Backend) -> None:
    chunks, completion = collect(backend, PROMPT, CompletionOptions(4))
    assert all(c.logprobs is None for c in chunks)
    assert completion.logprobs is None


# Every sampler option travels: with a fixed seed each transport gives the in-process output.
SAMPLING = [
    CompletionOptions(24, temperature=1.0, seed=3, mirostat=2, mirostat_tau=3.0, mirostat_eta=0.2),
    CompletionOptions(24, temperature=0.8, seed=3, dry_multiplier=1.5, dry_penalty_last_n=-1, dry_sequence_breakers=("\n", ".")),
    CompletionOptions(24, temperature=1.0, seed=3, xtc_probability=0.7, xtc_threshold=0.05, min_keep=2, top_n_sigma=2.0),
    CompletionOptions(24, temperature=1.0, seed=3, dynatemp_range=0.5, dynatemp_exponent=1.5, adaptive_target=0.4),
    CompletionOptions(24, seed=3, sampler_chain=SamplerChain().penalties(32, 1.2, 0.1, 0.1).dry(1.0).top_k(20).typical(0.9)
                      .top_p(0.9).min_p(0.01).xtc(0.5, 0.1).top_n_sigma(3.0).dynamic_temp(0.9, 0.2, 1.0).dist()),
    CompletionOptions(24, seed=3, sampler_chain=SamplerChain().temp(1.0).mirostat(4.0, 0.1, 50)),
    CompletionOptions(24, seed=3, sampler_chain=SamplerChain().min_p(0.05).adaptive_p(0.5, 0.8)),
    CompletionOptions(24, min_tokens=6, stop_sequences=(" ",), ignore_eos=True),
    CompletionOptions(48, json_schema='{"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}'),
]  # fmt: skip


@pytest.mark.parametrize("options", SAMPLING, ids=[f"sampling-{i}" for i in range(len(SAMPLING))])
def test_sampler_options_give_the_same_output_everywhere(backend: Backend, llama: Llama, options: CompletionOptions) -> None:
    expected = llama.create_completion(PROMPT, options)
    got = backend.create_completion(PROMPT, options)
    assert got.token_ids == expected.token_ids
    assert got.stop_reason == expected.stop_reason


# ---- errors -------------------------------------------------------------------------------
BAD_REQUESTS: list[tuple[str, Prompt, CompletionOptions]] = [
    ("max_tokens", PROMPT, CompletionOptions(max_tokens=0)),
    ("top_p", PROMPT, CompletionOptions(top_p=2.0)),
    ("temperature", PROMPT, CompletionOptions(temperature=-1.0)),
    ("grammar", PROMPT, CompletionOptions(grammar="root ::= (")),
    ("logit_bias", PROMPT, CompletionOptions(logit_bias={10**8: 1.0})),
    ("stop_sequences[0]", PROMPT, CompletionOptions(stop_sequences=("",))),
    ("samplers", PROMPT, CompletionOptions(samplers=("no_such_sampler",))),
    ("json_schema", PROMPT, CompletionOptions(json_schema="{oops")),
    ("mirostat", PROMPT, CompletionOptions(mirostat=7)),
    ("sampler_chain[1].p", PROMPT, CompletionOptions(sampler_chain=SamplerChain((TopK(5), TopP(2.0))))),
    ("prompt", "", CompletionOptions(4)),
    ("prompt", [10**8], CompletionOptions(4)),
]


@pytest.mark.parametrize(("field", "prompt", "options"), BAD_REQUESTS, ids=[f"{f}-{i}" for i, (f, _, _) in enumerate(BAD_REQUESTS)])
def test_invalid_requests_raise_the_same_error(
    backend: Backend, llama: Llama, field: str, prompt: Prompt, options: CompletionOptions
) -> None:
    with pytest.raises(InvalidArgumentError) as expected:
        llama.create_completion(prompt, options)
    with pytest.raises(InvalidArgumentError) as got:
        backend.create_completion(prompt, options)
    assert got.value.field == field
    assert got.value.status == "INVALID_ARGUMENT"
    assert [v.field for v in got.value.violations] == [v.field for v in expected.value.violations]


def test_server_validates_what_the_client_does_not(remote_client: Client, llama: Llama) -> None:
    """Raw protos skip the client's own checks; the server answers with the same fields."""
    import grpc

    from llama_crab_client.status import from_rpc_error
    from llama_crab_client.v1 import llama_crab_pb2 as pb
    from llama_crab_client.v1 import llama_crab_pb2_grpc as pb_grpc

    cases = [
        ("max_tokens", pb.CompletionOptions(max_tokens=0)),
        ("top_p", pb.CompletionOptions(top_p=2.0)),
        ("stop_sequences[0]", pb.CompletionOptions(stop_sequences=[""])),
        ("dry_base", pb.CompletionOptions(dry_base=0.5)),
        ("sampler_chain[0]", pb.CompletionOptions(sampler_chain=[pb.SamplerStage()])),
        ("sampler_chain[0].k", pb.CompletionOptions(sampler_chain=[pb.SamplerStage(top_k=pb.TopKStage(k=-3))])),
        ("sampler_chain[0]", pb.CompletionOptions(sampler_chain=[pb.SamplerStage(greedy=pb.GreedyStage()), pb.SamplerStage(dist=pb.DistStage())])),
        ("json_schema", pb.CompletionOptions(json_schema='{"type": "object"}', grammar='root ::= "x"')),
    ]
    with grpc.insecure_channel(remote_client.settings.target) as channel:
        stub = pb_grpc.LlamaCrabServiceStub(channel)
        for field, options in cases:
            with pytest.raises(grpc.RpcError) as raised:
                list(stub.Complete(pb.CompleteRequest(text=PROMPT, options=options), timeout=30))
            error = from_rpc_error(raised.value)
            assert isinstance(error, InvalidArgumentError)
            assert error.field == field
        # No prompt at all.
        with pytest.raises(grpc.RpcError) as raised:
            list(stub.Complete(pb.CompleteRequest(), timeout=30))
        assert from_rpc_error(raised.value).field == "prompt"


def test_errors_are_llama_crab_errors(backend: Backend) -> None:
    with pytest.raises(LlamaCrabError):
        backend.detokenize([10**8])


def test_async_client_accepts_a_coroutine_callback(remote_aio_backend: AsyncClientBackend) -> None:
    delivered: list[Chunk] = []

    async def stop_after_two(chunk: Chunk) -> StreamControl:
        delivered.append(chunk)
        return StreamControl.STOP if len(delivered) == 2 else StreamControl.CONTINUE

    completion = remote_aio_backend._loop.run(
        remote_aio_backend.client.create_completion_stream("Once upon a time", CompletionOptions(64), stop_after_two)
    )
    assert len(delivered) == 2
    assert completion.stop_reason is StopReason.CANCELLED
    assert completion.text == "".join(c.text for c in delivered)
