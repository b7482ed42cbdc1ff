"""Chat and tool calling on real models, in process and over gRPC (sync and asyncio).

Templates: the prompt llama.cpp renders equals Python's jinja2 rendering of the GGUF's
own `tokenizer.chat_template` (as Hugging Face's apply_chat_template does it), for all
three catalogue models; gemma3-270m carries no template, so there the fallback (ChatML)
is what is tested. Tools run on qwen2.5-coder-0.5b, the catalogue's tool-capable model.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from datetime import datetime
from typing import Any, Optional, Protocol

import jinja2
import jsonschema
import pytest
from jinja2.sandbox import ImmutableSandboxedEnvironment
from gguf_meta import gguf_string
from helpers import LoopThread, wait_until

from llama_crab import Llama, LlamaParams
from llama_crab.models import ensure
from llama_crab.server.testing import TestServer, start_test_server
from llama_crab_client import AsyncClient, Client
from llama_crab_client.chat import (
    ChatChunk,
    ChatCompletion,
    ChatCompletionCallback,
    ChatMessage,
    FinishReason,
    ResponseFormat,
    Tool,
    ToolCall,
    message_from_deltas,
)
from llama_crab_client.errors import InvalidArgumentError
from llama_crab_client.types import CompletionOptions, StreamControl

WEATHER_SCHEMA = {
    "type": "object",
    "properties": {"city": {"type": "string"}, "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
    "required": ["city"],
}
WEATHER = Tool("get_weather", "Get the current weather in a city", WEATHER_SCHEMA)
ASK = [ChatMessage.user("What is the weather in Paris right now? Use the tool.")]
CONVERSATION = [
    ChatMessage.system("You are a terse assistant."),
    ChatMessage.user("Hi there"),
    ChatMessage.assistant("Hello! How can I help?"),
    ChatMessage.user("Name a colour."),
]
def _nested(depth: int) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "string"}
    for _ in range(depth):
        schema = {"type": "array", "items": schema}
    return schema


CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def hf_render(template: str, messages: Sequence[ChatMessage]) -> str:
    """Render like transformers' apply_chat_template (sandboxed jinja2, trim/lstrip blocks)."""

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(value: Any, ensure_ascii: bool = False, indent: Optional[int] = None, **_: Any) -> str:
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    rendered = [{"role": m.role, "content": m.content} for m in messages]
    return env.from_string(template).render(
        messages=rendered, add_generation_prompt=True, bos_token="", eos_token=""
    )


# ---- models -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def qwen() -> Iterator[Llama]:
    with Llama.load(LlamaParams(ensure("qwen2.5-coder-0.5b")).with_n_ctx(4096).with_n_parallel(2)) as model:
        yield model


@pytest.fixture(scope="module")
def gemma() -> Iterator[Llama]:
    with Llama.load(LlamaParams(ensure("gemma3-270m")).with_n_ctx(1024)) as model:
        yield model


# ---- templates --------------------------------------------------------------------------
@pytest.mark.parametrize("messages", [CONVERSATION, CONVERSATION[1:]], ids=["with-system", "no-system"])
def test_prompt_matches_jinja2_rendering_of_the_gguf_template(
    llama: Llama, model_path: str, qwen: Llama, messages: list[ChatMessage]
) -> None:
    for model, path in ((llama, model_path), (qwen, ensure("qwen2.5-coder-0.5b"))):
        template = gguf_string(path, "tokenizer.chat_template")
        assert template, f"{path} should carry a chat template"
        assert model.apply_chat_template(messages) == hf_render(template, messages)


def test_model_without_template_falls_back_to_chatml(gemma: Llama) -> None:
    # gemma3-270m's GGUF has no tokenizer.chat_template: llama.cpp renders ChatML, and
    # tools are refused (there is no tool-call format to parse).
    assert gguf_string(ensure("gemma3-270m"), "tokenizer.chat_template") is None
    info = gemma.model_info()
    assert not info.has_chat_template and not info.supports_tools
    assert gemma.apply_chat_template(CONVERSATION) == hf_render(CHATML, CONVERSATION)
    reply = gemma.create_chat_completion(CONVERSATION, CompletionOptions(8))
    assert reply.usage.completion_tokens > 0 and reply.finish_reason in (FinishReason.STOP, FinishReason.LENGTH)
    # Gemma's vocabulary asks for BOS: the chat prompt gets it, as a completion's would.
    with_bos = gemma.tokenize(gemma.apply_chat_template(CONVERSATION))
    assert reply.usage.prompt_tokens == len(with_bos) == len(gemma.tokenize(gemma.apply_chat_template(CONVERSATION), add_special=False)) + 1
    with pytest.raises(InvalidArgumentError) as exc:
        gemma.create_chat_completion(ASK, CompletionOptions(8), tools=[WEATHER])
    assert exc.value.field == "tools"


def test_template_without_tool_format_refuses_tools(llama: Llama) -> None:
    assert llama.model_info().has_chat_template and not llama.model_info().supports_tools  # smollm2: ChatML
    with pytest.raises(InvalidArgumentError) as exc:
        llama.create_chat_completion(ASK, CompletionOptions(8), tools=[WEATHER], tool_choice="required")
    assert exc.value.field == "tools"


def test_override_template_is_used(model_path: str) -> None:
    override = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}[assistant] "
    with Llama.load(LlamaParams(model_path).with_n_ctx(512).with_chat_template(override)) as model:
        assert model.apply_chat_template(CONVERSATION[1:2]) == "[user] Hi there\n[assistant] "


# ---- one behavioural suite over three transports ------------------------------------------
class ChatBackend(Protocol):
    def create_chat_completion(
        self,
        messages: Sequence[Any],
        options: Optional[CompletionOptions] = None,
        tools: Any = None,
        tool_choice: Any = None,
        response_format: Any = None,
    ) -> ChatCompletion: ...

    def create_chat_completion_stream(
        self,
        messages: Sequence[Any],
        options: Optional[CompletionOptions],
        callback: ChatCompletionCallback,
        tools: Any = None,
        tool_choice: Any = None,
        response_format: Any = None,
    ) -> ChatCompletion: ...


class AsyncChatBackend:
    """The AsyncClient's chat, driven from synchronous tests."""

    def __init__(self, loop: LoopThread, address: str) -> None:
        self._loop = loop

        async def make() -> AsyncClient:
            return AsyncClient(address, timeout=120)

        self.client = loop.run(make())

    def create_chat_completion(self, messages: Sequence[Any], options: Optional[CompletionOptions] = None, tools: Any = None, tool_choice: Any = None, response_format: Any = None) -> ChatCompletion:  # noqa: E501
        return self._loop.run(self.client.create_chat_completion(messages, options, tools, tool_choice, response_format))

    def create_chat_completion_stream(self, messages: Sequence[Any], options: Optional[CompletionOptions], callback: ChatCompletionCallback, tools: Any = None, tool_choice: Any = None, response_format: Any = None) -> ChatCompletion:  # noqa: E501
        return self._loop.run(
            self.client.create_chat_completion_stream(messages, options, callback, tools, tool_choice, response_format)
        )

    def close(self) -> None:
        self._loop.run(self.client.close())


@pytest.fixture(scope="module")
def qwen_server(qwen: Llama) -> Iterator[TestServer]:
    with start_test_server(qwen) as server:
        yield server


@pytest.fixture(scope="module")
def qwen_address(qwen_server: TestServer) -> str:
    return qwen_server.address


@pytest.fixture(scope="module")
def qwen_client(qwen_address: str) -> Iterator[Client]:
    with Client(qwen_address, timeout=120) as client:
        yield client


@pytest.fixture(scope="module")
def qwen_aio(qwen_address: str) -> Iterator[AsyncChatBackend]:
    backend = AsyncChatBackend(LoopThread(), qwen_address)
    yield backend
    backend.close()


@pytest.fixture(params=["local", "remote", "remote-aio"])
def chat(request: pytest.FixtureRequest, qwen: Llama) -> ChatBackend:
    if request.param == "local":
        return qwen
    if request.param == "remote":
        return request.getfixturevalue("qwen_client")  # type: ignore[no-any-return]
    return request.getfixturevalue("qwen_aio")  # type: ignore[no-any-return]


def collect(backend: ChatBackend, messages: Sequence[Any], options: CompletionOptions, **kw: Any) -> tuple[list[ChatChunk], ChatCompletion]:  # noqa: E501
    chunks: list[ChatChunk] = []
    final = backend.create_chat_completion_stream(messages, options, chunks.append, **kw)
    return chunks, final


@pytest.mark.parametrize("tool_choice", ["required", "get_weather", {"type": "function", "function": {"name": "get_weather"}}])
def test_forced_tool_call_streams_deltas_that_join_to_the_final_call(chat: ChatBackend, tool_choice: Any) -> None:
    chunks, final = collect(chat, ASK, CompletionOptions(64), tools=[WEATHER], tool_choice=tool_choice)
    assert final.finish_reason == FinishReason.TOOL_CALLS
    (call,) = final.message.tool_calls
    assert call.name == "get_weather" and call.id
    arguments = json.loads(call.arguments)
    jsonschema.validate(arguments, WEATHER_SCHEMA)
    # Streamed: the first delta of the call names it, the rest only add arguments.
    deltas = [d for c in chunks for d in c.delta.tool_calls]
    assert len(deltas) >= 2
    assert deltas[0].index == 0 and deltas[0].id == call.id and deltas[0].name == "get_weather"
    assert all(d.id is None and d.name is None for d in deltas[1:])
    assert "".join(d.arguments for d in deltas) == call.arguments
    # The final message is exactly the joined deltas; the last chunk closes the stream.
    assert message_from_deltas([c.delta for c in chunks[:-1]]) == final.message
    assert chunks[0].delta.role == "assistant" and chunks[-1].finish_reason == FinishReason.TOOL_CALLS
    assert chunks[-1].usage == final.usage and final.usage.completion_tokens > 0
    # OpenAI's shapes.
    openai = final.to_openai()
    assert openai["object"] == "chat.completion" and openai["choices"][0]["finish_reason"] == "tool_calls"
    assert openai["choices"][0]["message"]["tool_calls"][0]["function"]["name"] == "get_weather"
    first = chunks[0].to_openai()
    assert first["object"] == "chat.completion.chunk" and first["id"] == final.id
    assert first["choices"][0]["delta"]["tool_calls"][0]["type"] == "function"


def test_tool_result_continues_the_conversation(chat: ChatBackend) -> None:
    call = ToolCall("call_1", "get_weather", json.dumps({"city": "Paris"}))
    messages = [
        *ASK,
        ChatMessage.assistant(tool_calls=[call]),
        ChatMessage.tool(json.dumps({"temperature_celsius": 21, "sky": "sunny"}), "call_1", "get_weather"),
    ]
    reply = chat.create_chat_completion(messages, CompletionOptions(40), tools=[WEATHER])
    assert reply.message.role == "assistant" and reply.message.content
    assert reply.finish_reason in (FinishReason.STOP, FinishReason.LENGTH)
    assert "21" in reply.message.content or "sunny" in reply.message.content.lower()


def test_json_schema_response_parses_and_validates(chat: ChatBackend) -> None:
    schema = {
        "type": "object",
        "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
        "required": ["name", "age"],
    }
    messages = [ChatMessage.user("Invent a person. Reply with JSON.")]
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": schema}}
    reply = chat.create_chat_completion(messages, CompletionOptions(64), response_format=fmt)
    assert reply.finish_reason == FinishReason.STOP
    jsonschema.validate(json.loads(reply.message.content or ""), schema)


def test_stop_mid_tool_call_keeps_exactly_the_delivered_fragments(chat: ChatBackend) -> None:
    seen: list[ChatChunk] = []

    def stop_after_three(chunk: ChatChunk) -> StreamControl:
        seen.append(chunk)
        return StreamControl.STOP if len(seen) == 3 else StreamControl.CONTINUE

    final = chat.create_chat_completion_stream(
        ASK, CompletionOptions(64), stop_after_three, tools=[WEATHER], tool_choice="required"
    )
    assert len(seen) == 3
    assert final.finish_reason == FinishReason.CANCELLED
    assert final.message == message_from_deltas([c.delta for c in seen])
    (call,) = final.message.tool_calls
    assert call.name == "get_weather" and call.arguments  # a fragment, not necessarily valid JSON
    assert final.usage.completion_tokens == sum(len(c.token_ids) for c in seen)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages[0].role"),
        ({"messages": [{"role": "user"}]}, "messages[0].content"),
        ({"tools": [Tool("", "no name", WEATHER_SCHEMA)]}, "tools[0].name"),
        ({"tools": [Tool("bad", "", {"type": "array", "items": 5})]}, "tools[0].parameters"),
        ({"tools": [WEATHER], "tool_choice": "get_time"}, "tool_choice"),
        ({"response_format": ResponseFormat("yaml")}, "response_format"),
        ({"response_format": {"type": "json_schema", "json_schema": {"schema": {"type": "strin"}}}}, "response_format"),
        ({"messages": [ChatMessage.assistant(tool_calls=[ToolCall("c", "f", "{not json")])]}, "messages[0].tool_calls[0].arguments"),
        # Bounded in cost: a schema whose grammar would expand without bound, or nests
        # deeper than llama.cpp's recursive converter should see.
        ({"response_format": ResponseFormat.json_schema({"type": "array", "minItems": 10**8})}, "response_format"),
        ({"tools": [Tool("deep", "", {"type": "object", "properties": {"x": _nested(80)}})]}, "tools[0].parameters"),
    ],
)
def test_bad_chat_requests_name_the_field(chat: ChatBackend, kwargs: dict[str, Any], field: str) -> None:
    kwargs = dict(kwargs)  # the parameter is shared by the three transports
    messages = kwargs.pop("messages", ASK)
    with pytest.raises(InvalidArgumentError) as exc:
        chat.create_chat_completion(messages, CompletionOptions(4), **kwargs)
    assert exc.value.field == field


def test_unsatisfiable_schema_ends_bounded_and_the_model_keeps_serving(qwen: Llama) -> None:
    # min > max: llama.cpp accepts the schema, its grammar admits no number. The reply is
    # cut at max_tokens (nothing crashes, nothing hangs) and the next request is served.
    fmt = ResponseFormat.json_schema({"type": "integer", "minimum": 5, "maximum": 1})
    reply = qwen.create_chat_completion(ASK, CompletionOptions(8), response_format=fmt)
    assert reply.finish_reason in (FinishReason.LENGTH, FinishReason.STOP)
    assert qwen.create_chat_completion(CONVERSATION, CompletionOptions(4)).usage.completion_tokens > 0


def test_plain_chat_streams_content_and_usage(chat: ChatBackend, qwen: Llama) -> None:
    chunks, final = collect(chat, CONVERSATION, CompletionOptions(12))
    text = "".join(c.delta.content or "" for c in chunks)
    assert text and text == final.message.content
    assert final.message.tool_calls == ()
    assert final.usage.prompt_tokens == len(qwen.tokenize(qwen.apply_chat_template(CONVERSATION)))


def test_deadline_ends_a_chat_stream_and_frees_the_slot(qwen_server: TestServer, qwen: Llama) -> None:
    # A deadline passing is a STOP to the engine, as for Complete; the call is counted.
    import grpc

    from llama_crab_client import convert
    from llama_crab_client.chat import ChatRequest
    from llama_crab_client.v1 import llama_crab_pb2_grpc as pb_grpc

    def count() -> float:
        return qwen_server.metrics.value("llama_crab_requests_total", {"method": "Chat", "code": "DEADLINE_EXCEEDED"})

    before = count()
    # End-of-turn banned: the reply runs far past the deadline on any hardware.
    ends = {t: float("-inf") for t in qwen.tokenize("<|im_end|><|endoftext|>", add_special=False)}
    request = convert.chat_request_to_proto(
        ChatRequest.build([ChatMessage.user("Tell me a very long story.")]), CompletionOptions(2000, logit_bias=ends)
    )
    with grpc.insecure_channel(qwen_server.address) as channel:
        responses = pb_grpc.LlamaCrabServiceStub(channel).Chat(request, timeout=1.5)
        with pytest.raises(grpc.RpcError) as exc:
            for _ in responses:
                pass
    assert exc.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
    assert wait_until(lambda: qwen.metrics().busy_slots == 0 and qwen.metrics().queue_depth == 0)
    assert wait_until(lambda: count() == before + 1)


# ---- sessions -----------------------------------------------------------------------------
def test_chat_session_turns_reuse_the_prefix_cache(llama: Llama) -> None:
    session = llama.chat_session(system="You are a terse assistant.")
    first = session.send("Name a fruit.", CompletionOptions(12))
    second = session.send("Name another one.", CompletionOptions(12))
    third = session.send("And a vegetable?", CompletionOptions(12))
    assert [m.role for m in session.messages] == ["system", "user", "assistant", "user", "assistant", "user", "assistant"]
    assert session.messages[2] == first.message and session.messages[4] == second.message
    # Each turn re-sends the whole history; only what is new is computed.
    for before, after in ((first, second), (second, third)):
        assert after.usage.cached_tokens >= before.usage.prompt_tokens, (before.usage, after.usage)
    session.reset()
    assert [m.role for m in session.messages] == ["system"]


def test_chat_session_over_grpc_keeps_history_and_saves_it(qwen_client: Client, tmp_path: Any) -> None:
    from llama_crab_client.chat_session import ChatSession

    session = qwen_client.chat_session(system="Be brief.")
    session.send("Hello!", CompletionOptions(8))
    reply = session.send("Say it again.", CompletionOptions(8))
    assert reply.usage.cached_tokens > 0
    path = tmp_path / "history.json"
    session.save(path)
    again = ChatSession.load(qwen_client, path)
    assert again.messages == session.messages
    assert json.loads(path.read_text())[1] == {"role": "user", "content": "Hello!"}
