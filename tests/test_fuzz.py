"""Fuzz the request surface: random CompleteRequests and ChatRequests, built from the
proto descriptors (so a field added to the proto is fuzzed without touching this file), in
process and over gRPC. Every request must end in a final Completion or a clean status (INVALID_ARGUMENT,
RESOURCE_EXHAUSTED), never a crash, a hang or INTERNAL, and the engine must serve a normal
request correctly afterwards.

CI runs a bounded, reproducible number of examples; a longer random run:

    LLAMA_CRAB_FUZZ_EXAMPLES=5000 LLAMA_CRAB_FUZZ_RANDOM=1 python -m pytest tests/test_fuzz.py
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from typing import Any, Callable

import grpc
import pytest
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llama_crab import Completion, CompletionOptions, Llama, LlamaParams, Speculative
from llama_crab.server.testing import TestServer, start_test_server
from llama_crab_client import convert
from llama_crab_client.errors import InvalidArgumentError, ResourceExhaustedError
from llama_crab_client.v1 import llama_crab_pb2 as pb
from llama_crab_client.v1 import llama_crab_pb2_grpc as pb_grpc

EXAMPLES = int(os.environ.get("LLAMA_CRAB_FUZZ_EXAMPLES", "250"))
FUZZ_SETTINGS = settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,
    derandomize=not os.environ.get("LLAMA_CRAB_FUZZ_RANDOM"),
    suppress_health_check=list(HealthCheck),
)
# Small slots keep any request cheap: nothing generates more than a slot's context.
N_CTX, N_SLOTS = 512, 4
CLEAN_CODES = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED}
NORMAL_PROMPT = "The capital of France is"

# Grammars worth trying beside random text: valid, invalid, pathological for llama.cpp's
# parser (deep nesting, inverted or huge repetitions), and ones that allow no token.
GRAMMARS = [
    'root ::= "yes" | "no"',
    "root ::= [a-z]+",
    'root ::= ""',
    'root ::= "a"',
    "root ::= [^\\x00-\\U0010FFFF]",
    'root ::= "\\u0000"',
    "root ::= <[999999]>",
    "root ::= !<[1]>",
    'root ::= root "a"',
    "root ::= x",
    "root ::= [a-",
    'root ::= "a"{3,1}',
    'root ::= "a"{0,100000}',
    "\n".join(f'r{i} ::= "a"{{0,2000}}' for i in range(8)) + "\nroot ::= r0",
    'root ::= ("a"*)*',
    "root ::= " + "(" * 5000,
    "root ::= " + "(" * 150 + '"a"' + ")" * 150,
    "root ::= (" + " | ".join(f'"w{i}"' for i in range(3000)) + ")",
    '# comment\nroot ::= "{" [0-9]{1,3} "}"',
]


def _scalar(field: FieldDescriptor, n_vocab: int) -> st.SearchStrategy[Any]:
    t = field.type
    if t in (FieldDescriptor.TYPE_INT32, FieldDescriptor.TYPE_SINT32, FieldDescriptor.TYPE_SFIXED32):
        return st.one_of(st.integers(-3, 40), st.integers(-(2**31), 2**31 - 1), st.integers(n_vocab - 3, n_vocab + 3))
    if t in (FieldDescriptor.TYPE_UINT32, FieldDescriptor.TYPE_FIXED32):
        return st.one_of(st.integers(0, 40), st.integers(0, 2**32 - 1))
    if t in (FieldDescriptor.TYPE_INT64, FieldDescriptor.TYPE_SINT64, FieldDescriptor.TYPE_SFIXED64):
        return st.integers(-(2**63), 2**63 - 1)
    if t in (FieldDescriptor.TYPE_UINT64, FieldDescriptor.TYPE_FIXED64):
        return st.integers(0, 2**64 - 1)
    if t in (FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT):
        width = 32 if t == FieldDescriptor.TYPE_FLOAT else 64
        return st.one_of(
            st.floats(-3.0, 3.0, width=width),
            st.floats(width=width, allow_nan=True, allow_infinity=True),
            st.sampled_from([0.0, 1.0, -math.inf, math.inf, math.nan]),
        )
    if t == FieldDescriptor.TYPE_BOOL:
        return st.booleans()
    if t == FieldDescriptor.TYPE_STRING:
        return st.text(max_size=64)
    if t == FieldDescriptor.TYPE_BYTES:
        return st.binary(max_size=64)
    if t == FieldDescriptor.TYPE_ENUM:
        return st.sampled_from([v.number for v in field.enum_type.values])
    raise AssertionError(f"no strategy for field type {t} ({field.full_name})")


def _overrides(n_vocab: int) -> dict[str, st.SearchStrategy[Any]]:
    """Field-specific values that reach deeper than uniform randomness (by full name)."""
    # Mostly valid values, some invalid: one bad entry invalidates the whole request.
    token = st.one_of(st.integers(0, n_vocab - 1), st.integers(0, n_vocab - 1), st.integers(-5, n_vocab + 5))
    return {
        "llama_crab.v1.CompletionOptions.max_tokens": st.one_of(st.integers(-2, 24), st.sampled_from([2**31 - 1])),
        "llama_crab.v1.CompletionOptions.grammar": st.one_of(st.sampled_from(GRAMMARS), st.text(max_size=40)),
        "llama_crab.v1.CompletionOptions.samplers": st.one_of(
            st.lists(st.sampled_from(["top_k", "top_p", "min_p", "xtc", "dry", "temperature", "penalties"]), max_size=5),
            st.lists(st.text(max_size=8), max_size=20),
        ),
        "llama_crab.v1.CompletionOptions.stop_sequences": st.lists(st.text(max_size=8), max_size=20),
        "llama_crab.v1.CompletionOptions.logprobs": st.integers(-2, 25),
        "llama_crab.v1.CompletionOptions.logit_bias": st.dictionaries(
            token,
            st.one_of(st.floats(-100, 100), st.floats(-100, 100), st.sampled_from([-math.inf, math.inf, math.nan])),
            max_size=12,
        ),
        "llama_crab.v1.TokenList.ids": st.lists(token, max_size=80),
        "llama_crab.v1.CompleteRequest.text": st.one_of(st.text(max_size=200), st.sampled_from(["", "Hello", "<|im_start|>"])),
    }


def message_strategy(
    descriptor: Descriptor, n_vocab: int, overrides: dict[str, st.SearchStrategy[Any]], depth: int = 0
) -> st.SearchStrategy[Message]:
    """Random messages of `descriptor`: every field, oneof and optional presence, from the
    descriptor itself, so new fields are covered without edits here."""
    cls = getattr(pb, descriptor.name)

    def field_value(field: FieldDescriptor) -> st.SearchStrategy[Any]:
        if field.full_name in overrides:
            return overrides[field.full_name]
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            key, value = field.message_type.fields_by_name["key"], field.message_type.fields_by_name["value"]
            return st.dictionaries(_scalar(key, n_vocab), _scalar(value, n_vocab), max_size=8)
        if field.message_type is not None:
            element = message_strategy(field.message_type, n_vocab, overrides, depth + 1)
        else:
            element = _scalar(field, n_vocab)
        if field.is_repeated:
            return st.lists(element, max_size=6)
        return element

    # proto3 `optional` fields sit in synthetic oneofs named "_<field>": not real choices.
    real_oneofs = [o for o in descriptor.oneofs if not o.name.startswith("_")]
    oneof_fields = {f.name for o in real_oneofs for f in o.fields}

    @st.composite
    def build(draw: Callable[[st.SearchStrategy[Any]], Any]) -> Message:
        kwargs: dict[str, Any] = {}
        # How many fields this message sets: few fields mostly yield valid requests that
        # reach generation; many fields mostly reach validation. Both matter.
        density = draw(st.sampled_from([0.1, 0.3, 0.7]))
        for field in descriptor.fields:
            if field.name in oneof_fields:
                continue
            if depth > 3 and field.message_type is not None:
                continue
            # Hypothesis leans towards small integers: small means "leave it unset".
            if draw(st.integers(0, 9)) < 10 * (1 - density):
                continue
            kwargs[field.name] = draw(field_value(field))
        for oneof in real_oneofs:
            choice = draw(st.sampled_from([None, *oneof.fields]))
            if choice is not None:
                kwargs[choice.name] = draw(field_value(choice))
        try:
            return cls(**kwargs)  # type: ignore[no-any-return]
        except (ValueError, TypeError):  # a value protobuf itself refuses (e.g. lone surrogates)
            return cls()  # type: ignore[no-any-return]

    return build()


# JSON schemas for tools and response formats: valid, unconvertible, unsatisfiable,
# explosive, too deep, not JSON.
SCHEMAS = [
    '{"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}',
    "{}",
    '{"type": "array", "items": 5}',
    '{"type": "integer", "minimum": 5, "maximum": 1}',
    '{"type": "array", "minItems": 100000000}',
    '{"enum": []}',
    '{"type": "object", "properties": {"x": {"type": "string", "pattern": "^(a$"}}}',
    '{"$ref": "#/definitions/nope"}',
    '{"type": "array", "items": ' * 70 + "{}" + "}" * 70,
    "[1, 2]",
    "{not json",
]


def _chat_overrides(n_vocab: int) -> dict[str, st.SearchStrategy[Any]]:
    text = st.one_of(st.text(max_size=80), st.sampled_from(["", "Hello", "<|im_start|>", "<tool_call>"]))
    return {
        **_overrides(n_vocab),
        # Random messages are mostly invalid somewhere; mix in valid conversations (with
        # random text) so that many requests reach generation and the tool-call parser.
        "llama_crab.v1.ChatRequest.messages": st.one_of(
            st.lists(message_strategy(pb.ChatMessage.DESCRIPTOR, n_vocab, _CHAT_FIELDS), min_size=0, max_size=4),
            st.lists(st.builds(pb.ChatMessage, role=st.just("user"), content=text), min_size=1, max_size=2),
            st.builds(
                lambda question, arguments: [
                    pb.ChatMessage(role="user", content=question),
                    pb.ChatMessage(
                        role="assistant", tool_calls=[pb.ChatToolCall(id="c1", name="get_weather", arguments=arguments)]
                    ),
                    pb.ChatMessage(role="tool", content="sunny", tool_call_id="c1"),
                ],
                text,
                st.sampled_from(['{"city": "Paris"}', "{}", "["]),
            ),
        ),
        "llama_crab.v1.ChatRequest.tools": st.one_of(
            st.just([pb.ChatTool(name="get_weather", description="weather", parameters=SCHEMAS[0])]),
            st.lists(message_strategy(pb.ChatTool.DESCRIPTOR, n_vocab, _CHAT_TOOL_FIELDS), max_size=3),
        ),
        "llama_crab.v1.ChatRequest.options": st.one_of(
            st.builds(pb.CompletionOptions, max_tokens=st.integers(1, 24)),
            message_strategy(pb.CompletionOptions.DESCRIPTOR, n_vocab, _overrides(n_vocab)),
        ),
        "llama_crab.v1.ChatRequest.response_format": st.one_of(
            st.just(pb.ChatResponseFormat()),
            message_strategy(pb.ChatResponseFormat.DESCRIPTOR, n_vocab, _CHAT_FORMAT_FIELDS),
        ),
        "llama_crab.v1.ChatRequest.tool_choice": st.sampled_from(["", "auto", "none", "required", "get_weather", "nope"]),
        "llama_crab.v1.ChatMessage.content": text,
    }


_CHAT_FORMAT_FIELDS: dict[str, st.SearchStrategy[Any]] = {
    "llama_crab.v1.ChatResponseFormat.type": st.sampled_from(["", "text", "json_object", "json_schema", "yaml"]),
    "llama_crab.v1.ChatResponseFormat.schema": st.one_of(st.sampled_from(SCHEMAS), st.text(max_size=20)),
}

_CHAT_TOOL_FIELDS: dict[str, st.SearchStrategy[Any]] = {
    "llama_crab.v1.ChatTool.name": st.one_of(st.sampled_from(["get_weather", "f", "bad name", ""]), st.text(max_size=8)),
    "llama_crab.v1.ChatTool.parameters": st.one_of(st.sampled_from(SCHEMAS), st.text(max_size=20)),
}

_CHAT_FIELDS: dict[str, st.SearchStrategy[Any]] = {
    "llama_crab.v1.ChatMessage.role": st.sampled_from(["system", "user", "assistant", "tool", "user", "wizard", ""]),
    "llama_crab.v1.ChatMessage.content": st.one_of(st.text(max_size=80), st.sampled_from(["Hi", "<|im_end|>"])),
    "llama_crab.v1.ChatToolCall.name": st.sampled_from(["get_weather", "f", ""]),
    "llama_crab.v1.ChatToolCall.arguments": st.one_of(
        st.sampled_from(['{"city": "Paris"}', "{}", "[", '{"a": ' * 70, "null"]), st.text(max_size=12)
    ),
}


# ---- fixtures -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def fuzz_llama(model_path: str) -> Iterator[Llama]:
    # Speculating, with n-grams short enough that random prompts get drafts: every random
    # sampler setting is then also verified against drafts (unless the request opts out).
    spec = Speculative(types=("ngram-simple",), ngram_size_n=2, ngram_size_m=8)
    params = LlamaParams(model_path, n_ctx=N_CTX, n_parallel=N_SLOTS, max_queue=16, speculative=spec)
    with Llama.load(params) as model:
        yield model


@pytest.fixture(scope="module")
def reference(fuzz_llama: Llama) -> Completion:
    """A greedy completion taken before any fuzzing: afterwards it must come out the same."""
    return fuzz_llama.create_completion(NORMAL_PROMPT, CompletionOptions(6))


@pytest.fixture(scope="module")
def requests(fuzz_llama: Llama) -> st.SearchStrategy[Message]:
    n_vocab = fuzz_llama.model_info().n_vocab
    return message_strategy(pb.CompleteRequest.DESCRIPTOR, n_vocab, _overrides(n_vocab))


@pytest.fixture(scope="module")
def server(fuzz_llama: Llama) -> Iterator[TestServer]:
    with start_test_server(fuzz_llama) as s:
        yield s


def serves_a_normal_request(llama: Llama, reference: Completion) -> None:
    again = llama.create_completion(NORMAL_PROMPT, CompletionOptions(6))
    assert again.token_ids == reference.token_ids
    assert llama.metrics().busy_slots == 0


# ---- the fuzz tests ---------------------------------------------------------------------------
def test_random_requests_in_process(
    fuzz_llama: Llama, reference: Completion, requests: st.SearchStrategy[Message]
) -> None:
    outcomes: dict[str, int] = {}

    @FUZZ_SETTINGS
    @given(requests)
    def run(request: Message) -> None:
        assert isinstance(request, pb.CompleteRequest)
        prompt, options = convert.complete_request_from_proto(request)
        try:
            handle = fuzz_llama.submit(prompt, options)
        except (InvalidArgumentError, ResourceExhaustedError) as e:
            outcomes[type(e).__name__] = outcomes.get(type(e).__name__, 0) + 1
            return
        try:
            events = list(handle.events())
        except InvalidArgumentError as e:  # the request made generation impossible mid-way
            assert e.field in ("grammar", "logit_bias", "samplers"), e
            outcomes["ended: " + str(e.field)] = outcomes.get("ended: " + str(e.field), 0) + 1
            return
        finally:
            handle.close()
        final = events[-1]
        assert isinstance(final, Completion)
        assert final.text == "".join(e.text for e in events[:-1] if not isinstance(e, Completion))
        assert final.usage.completion_tokens <= options.max_tokens
        outcomes[final.stop_reason.value] = outcomes.get(final.stop_reason.value, 0) + 1

    run()
    print("in-process outcomes:", outcomes)
    assert sum(outcomes.values()) >= min(EXAMPLES, 50)
    # Both kinds of outcome happened: the fuzzer reaches generation, not only validation.
    assert outcomes.get("InvalidArgumentError", 0) > 0
    assert any(k in outcomes for k in ("length", "eos", "stop_sequence"))
    serves_a_normal_request(fuzz_llama, reference)


def test_random_requests_over_grpc(
    server: TestServer, fuzz_llama: Llama, reference: Completion, requests: st.SearchStrategy[Message]
) -> None:
    outcomes: dict[str, int] = {}
    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.LlamaCrabServiceStub(channel)

        @FUZZ_SETTINGS
        @given(requests)
        def run(request: Message) -> None:
            assert isinstance(request, pb.CompleteRequest)
            try:
                responses = list(stub.Complete(request, timeout=120))
            except grpc.RpcError as e:
                assert e.code() in CLEAN_CODES, f"{e.code()}: {e.details()}"
                outcomes[e.code().name] = outcomes.get(e.code().name, 0) + 1
                return
            assert responses, "a stream must end with a Completion"
            kinds = [r.WhichOneof("response") for r in responses]
            assert kinds[-1] == "completion" and kinds.count("completion") == 1
            name = pb.StopReason.Name(responses[-1].completion.stop_reason)
            assert name != "STOP_REASON_UNSPECIFIED"
            outcomes[name] = outcomes.get(name, 0) + 1

        run()
        print("gRPC outcomes:", outcomes)
        assert outcomes.get("INVALID_ARGUMENT", 0) > 0
        assert sum(v for k, v in outcomes.items() if k.startswith("STOP_REASON")) > 0
        # The server still serves everyone normally.
        ok = list(stub.Complete(convert.complete_request_to_proto("Hello", CompletionOptions(4)), timeout=60))
        assert ok[-1].completion.usage.completion_tokens == 4
    serves_a_normal_request(fuzz_llama, reference)


def test_random_chat_requests_over_grpc(model_path: str) -> None:
    """Chat requests with random messages, tools, schemas and options, on a model whose
    template has a tool-call format (smollm2 with qwen2.5's template: the tool path at
    smollm2's speed). Every one ends cleanly and the server keeps serving."""
    from llama_crab.models import ensure

    from gguf_meta import gguf_string

    template = gguf_string(ensure("qwen2.5-coder-0.5b"), "tokenizer.chat_template")
    assert template
    params = LlamaParams(model_path, n_ctx=2048, n_parallel=N_SLOTS, max_queue=16).with_chat_template(template)
    outcomes: dict[str, int] = {}
    with Llama.load(params) as llama, start_test_server(llama) as chat_server:
        assert llama.model_info().supports_tools
        n_vocab = llama.model_info().n_vocab
        overrides = _chat_overrides(n_vocab)

        def with_messages(request: Message, messages: list[pb.ChatMessage]) -> Message:
            # A request without messages only tests one check; most get some.
            assert isinstance(request, pb.ChatRequest)
            if not request.messages:
                request.messages.extend(messages)
            return request

        # And forced tool calls with random text: the grammar and the parser on whatever
        # the model makes of it.
        forced = st.builds(
            lambda question, choice, n: pb.ChatRequest(
                messages=[pb.ChatMessage(role="user", content=question)],
                tools=[pb.ChatTool(name="get_weather", parameters=SCHEMAS[0])],
                tool_choice=choice,
                options=pb.CompletionOptions(max_tokens=n),
            ),
            overrides["llama_crab.v1.ChatMessage.content"],
            st.sampled_from(["required", "get_weather"]),
            st.integers(8, 48),
        )
        requests = st.one_of(
            st.builds(
                with_messages,
                message_strategy(pb.ChatRequest.DESCRIPTOR, n_vocab, overrides),
                overrides["llama_crab.v1.ChatRequest.messages"],
            ),
            forced,
        )
        with grpc.insecure_channel(chat_server.address) as channel:
            stub = pb_grpc.LlamaCrabServiceStub(channel)

            @settings(FUZZ_SETTINGS, max_examples=max(EXAMPLES // 2, 1))
            @given(requests)
            def run(request: Message) -> None:
                assert isinstance(request, pb.ChatRequest)
                try:
                    responses = list(stub.Chat(request, timeout=120))
                except grpc.RpcError as e:
                    assert e.code() in CLEAN_CODES, f"{e.code()}: {e.details()}"
                    outcomes[e.code().name] = outcomes.get(e.code().name, 0) + 1
                    return
                kinds = [r.WhichOneof("response") for r in responses]
                assert kinds and kinds[-1] == "completion" and kinds.count("completion") == 1
                reason = responses[-1].completion.finish_reason
                assert reason in ("stop", "length", "tool_calls"), reason
                outcomes[reason] = outcomes.get(reason, 0) + 1
                if responses[-1].completion.message.tool_calls:
                    outcomes["with a tool call"] = outcomes.get("with a tool call", 0) + 1

            run()
            print("chat outcomes:", outcomes)
            assert outcomes.get("INVALID_ARGUMENT", 0) > 0
            assert sum(v for k, v in outcomes.items() if k in ("stop", "length", "tool_calls")) > 0
            assert outcomes.get("with a tool call", 0) > 0
            ok = list(stub.Complete(convert.complete_request_to_proto("Hello", CompletionOptions(4)), timeout=60))
            assert ok[-1].completion.usage.completion_tokens == 4
        assert llama.metrics().busy_slots == 0


def test_random_embed_requests_over_grpc(
    server: TestServer, fuzz_llama: Llama, reference: Completion
) -> None:
    """Random EmbedRequests (inputs of text and token ids, every pooling, unknown enum
    values): each is embedded whole or refused with a clean status, and generation goes on."""
    n_vocab = fuzz_llama.model_info().n_vocab
    overrides = {
        **_overrides(n_vocab),
        "llama_crab.v1.EmbedInput.text": st.one_of(st.text(max_size=120), st.sampled_from(["", "Hello", "<|im_start|>"])),
        "llama_crab.v1.EmbedRequest.pooling": st.integers(-2, 6),
    }
    outcomes: dict[str, int] = {}
    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.LlamaCrabServiceStub(channel)

        @settings(FUZZ_SETTINGS, max_examples=max(EXAMPLES // 2, 1))
        @given(message_strategy(pb.EmbedRequest.DESCRIPTOR, n_vocab, overrides))
        def run(request: Message) -> None:
            assert isinstance(request, pb.EmbedRequest)
            try:
                reply = stub.Embed(request, timeout=120)
            except grpc.RpcError as e:
                assert e.code() in CLEAN_CODES, f"{e.code()}: {e.details()}"
                outcomes[e.code().name] = outcomes.get(e.code().name, 0) + 1
                return
            assert len(reply.embeddings) == len(request.inputs)
            for e in reply.embeddings:
                width = len(e.vector) or len(e.token_vectors[0].values)
                assert width == reply.dimensions and all(math.isfinite(x) for x in e.vector)
            outcomes["OK"] = outcomes.get("OK", 0) + 1

        run()
        print("Embed outcomes:", outcomes)
        assert outcomes.get("INVALID_ARGUMENT", 0) > 0 and outcomes.get("OK", 0) > 0
    serves_a_normal_request(fuzz_llama, reference)
