"""The OpenAI-compatible HTTP API, driven by the clients people run: the official `openai`
SDK (sync and asyncio), raw HTTP for the SSE bytes (`curl -N` where installed), and the gRPC
client beside it for agreement. A real model serves every request; nothing is mocked."""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import shutil
import subprocess
import urllib.parse
from collections.abc import Iterator
from typing import Any, Optional

import jsonschema
import openai
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llama_crab import Llama, LlamaParams
from llama_crab.models import ensure
from llama_crab.server.testing import TestServer, start_test_server
from llama_crab_client import Client, CompletionOptions

from helpers import wait_until

WEATHER_SCHEMA = {
    "type": "object",
    "properties": {"city": {"type": "string"}, "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
    "required": ["city"],
}
WEATHER_TOOL = {
    "type": "function",
    "function": {"name": "get_weather", "description": "Get the current weather in a city", "parameters": WEATHER_SCHEMA},
}
ASK_WEATHER = [{"role": "user", "content": "What is the weather in Paris right now? Use the tool."}]
GREEDY = {"temperature": 0, "extra_body": {"cache_prompt": False}}


# ---- servers ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def qwen() -> Iterator[Llama]:
    # Sampling's cost guard at 1 s instead of 0.1 s: under scripts/sanitize.sh a grammar step
    # (tools, response_format) takes ~0.3 s of CPU, and the guard is test_reliability's subject.
    params = LlamaParams(ensure("qwen2.5-coder-0.5b")).with_n_ctx(4096).with_n_parallel(2).with_max_sample_ms(1000)
    with Llama.load(params) as model:
        yield model


@pytest.fixture(scope="module")
def server(qwen: Llama) -> Iterator[TestServer]:
    with start_test_server(qwen, http_port=0) as s:
        yield s


@pytest.fixture(scope="module")
def small_server(llama: Llama) -> Iterator[TestServer]:
    """The session's smollm2 (4 slots of 512 tokens): quick, bounded generations."""
    with start_test_server(llama, http_port=0) as s:
        yield s


@pytest.fixture()
def sdk(server: TestServer) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=server.http_url + "/v1", api_key="unused", max_retries=0, timeout=120) as client:
        yield client


def post(url: str, path: str, body: Any, headers: Optional[dict[str, str]] = None) -> tuple[int, dict[str, str], bytes]:
    """A raw POST (bytes or JSON); (status, lower-cased headers, body)."""
    parts = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=120)
    try:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        conn.request("POST", path, data, {"content-type": "application/json", **(headers or {})})
        response = conn.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        conn.close()


def get(url: str, path: str) -> tuple[int, bytes]:
    parts = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


# ---- routes -------------------------------------------------------------------------------
def test_models_health_tokenize_detokenize(server: TestServer, sdk: openai.OpenAI, qwen: Llama) -> None:
    (model,) = sdk.models.list().data
    assert model.id == qwen.model_info().name and model.object == "model"
    assert get(server.http_url, "/health") == (200, b'{"status":"ok"}')
    status, _, body = post(server.http_url, "/tokenize", {"content": "Hello world"})
    tokens = json.loads(body)["tokens"]
    assert status == 200 and tokens == qwen.tokenize("Hello world", False, True)
    status, _, body = post(server.http_url, "/detokenize", {"tokens": tokens})
    assert status == 200 and json.loads(body)["content"] == "Hello world"
    status, _, body = post(server.http_url, "/tokenize", {"content": 5})
    assert status == 400 and json.loads(body)["error"]["param"] == "content"


# ---- completions --------------------------------------------------------------------------
def test_completion_matches_grpc_and_its_own_stream(server: TestServer, sdk: openai.OpenAI) -> None:
    prompt = "def fibonacci(n):"
    whole = sdk.completions.create(model="any", prompt=prompt, max_tokens=24, **GREEDY)  # type: ignore[arg-type]
    assert whole.object == "text_completion" and whole.choices[0].finish_reason == "length"
    assert whole.usage is not None and whole.usage.completion_tokens == 24
    with Client(server.address, timeout=120) as grpc_client:
        over_grpc = grpc_client.create_completion(prompt, CompletionOptions(24, cache_prompt=False))
    assert whole.choices[0].text == over_grpc.text

    stream = sdk.completions.create(
        model="any", prompt=prompt, max_tokens=24, stream=True, stream_options={"include_usage": True}, **GREEDY  # type: ignore[arg-type]
    )
    events = list(stream)
    texts = [e.choices[0].text for e in events if e.choices]
    assert "".join(texts) == whole.choices[0].text
    finish = [e.choices[0].finish_reason for e in events if e.choices]
    assert finish[-1] == "length" and all(f is None for f in finish[:-1])
    assert events[-1].choices == [] and events[-1].usage is not None
    assert events[-1].usage.completion_tokens == 24 and events[-1].usage.prompt_tokens == whole.usage.prompt_tokens
    assert len({e.id for e in events}) == 1


def test_completion_logprobs_and_stop(sdk: openai.OpenAI) -> None:
    got = sdk.completions.create(model="any", prompt="1, 2, 3, 4,", max_tokens=12, logprobs=2, stop=[" 7"], **GREEDY)  # type: ignore[arg-type]
    choice = got.choices[0]
    assert choice.finish_reason == "stop" and " 7" not in choice.text
    assert choice.logprobs is not None and choice.logprobs.tokens is not None
    assert "".join(choice.logprobs.tokens).startswith(choice.text)
    assert all(lp is not None and lp <= 0 for lp in choice.logprobs.token_logprobs or [])
    assert all(len(top) <= 2 for top in choice.logprobs.top_logprobs or [])


# ---- chat ---------------------------------------------------------------------------------
def test_chat_stream_follows_openais_order(sdk: openai.OpenAI) -> None:
    messages = [{"role": "user", "content": "Name three colours."}]
    whole = sdk.chat.completions.create(model="any", messages=messages, max_tokens=20, **GREEDY)  # type: ignore[arg-type]
    assert whole.object == "chat.completion" and whole.choices[0].message.role == "assistant"
    events = list(
        sdk.chat.completions.create(
            model="any", messages=messages, max_tokens=20, stream=True, stream_options={"include_usage": True}, **GREEDY  # type: ignore[arg-type]
        )
    )
    assert events[0].choices[0].delta.role == "assistant" and not events[0].choices[0].delta.content
    body = events[1:-2]
    assert body and all(e.choices[0].delta.role is None and e.choices[0].finish_reason is None for e in body)
    assert "".join(e.choices[0].delta.content or "" for e in body) == whole.choices[0].message.content
    assert events[-2].choices[0].finish_reason == whole.choices[0].finish_reason
    assert events[-1].choices == [] and events[-1].usage is not None
    assert whole.usage is not None and events[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_chat_logprobs_streamed_and_whole(sdk: openai.OpenAI) -> None:
    messages = [{"role": "user", "content": "Count to five."}]
    whole = sdk.chat.completions.create(model="any", messages=messages, max_tokens=12, logprobs=True, top_logprobs=3, **GREEDY)  # type: ignore[arg-type]
    entries = whole.choices[0].logprobs.content if whole.choices[0].logprobs else None
    assert entries and whole.usage is not None and len(entries) == whole.usage.completion_tokens
    assert "".join(e.token for e in entries) == whole.choices[0].message.content
    # Greedy: each chosen token is the most likely of its top three.
    assert all(len(e.top_logprobs) == 3 and e.logprob >= max(t.logprob for t in e.top_logprobs) - 1e-6 for e in entries)
    events = list(
        sdk.chat.completions.create(model="any", messages=messages, max_tokens=12, logprobs=True, top_logprobs=3, stream=True, **GREEDY)  # type: ignore[arg-type]
    )
    streamed = [e for ev in events if ev.choices and ev.choices[0].logprobs for e in ev.choices[0].logprobs.content or ()]
    assert [(e.token, e.logprob) for e in streamed] == [(e.token, e.logprob) for e in entries]


def test_chat_tool_call_deltas(sdk: openai.OpenAI) -> None:
    events = list(
        sdk.chat.completions.create(
            model="any", messages=ASK_WEATHER, tools=[WEATHER_TOOL], tool_choice="required", max_tokens=64, stream=True, **GREEDY  # type: ignore[arg-type]
        )
    )
    deltas = [d for e in events if e.choices for d in e.choices[0].delta.tool_calls or ()]
    assert len(deltas) >= 2
    head, rest = deltas[0], deltas[1:]
    assert head.index == 0 and head.id and head.type == "function" and head.function and head.function.name == "get_weather"
    assert all(d.id is None and d.function and d.function.name is None for d in rest)
    arguments = "".join((d.function.arguments or "") for d in deltas if d.function)
    jsonschema.validate(json.loads(arguments), WEATHER_SCHEMA)
    assert events[-1].choices[0].finish_reason == "tool_calls"

    whole = sdk.chat.completions.create(
        model="any", messages=ASK_WEATHER, tools=[WEATHER_TOOL], tool_choice="required", max_tokens=64, **GREEDY  # type: ignore[arg-type]
    )
    (call,) = whole.choices[0].message.tool_calls or ()
    assert call.function.name == "get_weather" and call.function.arguments == arguments
    assert whole.choices[0].finish_reason == "tool_calls"


def test_chat_response_format_json_schema(sdk: openai.OpenAI) -> None:
    schema = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}}, "required": ["name", "age"]}
    whole = sdk.chat.completions.create(
        model="any",
        messages=[{"role": "user", "content": "Invent a person."}],
        response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": schema}},
        max_tokens=64,
        **GREEDY,  # type: ignore[arg-type]
    )
    jsonschema.validate(json.loads(whole.choices[0].message.content or ""), schema)


def test_async_sdk_streams_chat(server: TestServer) -> None:
    async def main() -> tuple[str, str]:
        async with openai.AsyncOpenAI(base_url=server.http_url + "/v1", api_key="unused", max_retries=0) as client:
            messages = [{"role": "user", "content": "Say hello."}]
            stream = await client.chat.completions.create(model="any", messages=messages, max_tokens=12, stream=True, **GREEDY)  # type: ignore[arg-type, call-overload]
            streamed = "".join([e.choices[0].delta.content or "" async for e in stream if e.choices])
            whole = await client.chat.completions.create(model="any", messages=messages, max_tokens=12, **GREEDY)  # type: ignore[arg-type, call-overload]
            return streamed, whole.choices[0].message.content or ""

    streamed, whole = asyncio.run(main())
    assert streamed and streamed == whole


# ---- embeddings and infill ------------------------------------------------------------------
@pytest.fixture(scope="module")
def minilm_server() -> Iterator[TestServer]:
    with Llama.load(LlamaParams(ensure("minilm-l6"), n_ctx=512)) as llama, start_test_server(llama, http_port=0) as s:
        yield s


def test_embeddings_with_the_sdk_equal_the_grpc_vectors(minilm_server: TestServer) -> None:
    texts = ["A man is eating food.", "A man is eating a piece of bread.", "The stock market fell."]
    with openai.OpenAI(base_url=minilm_server.http_url + "/v1", api_key="unused", max_retries=0) as sdk:
        by_base64 = sdk.embeddings.create(model="minilm", input=texts)  # the SDK asks for base64
        by_float = sdk.embeddings.create(model="minilm", input=texts, encoding_format="float")
        one = sdk.embeddings.create(model="minilm", input=texts[0])
        with pytest.raises(openai.BadRequestError) as exc:
            sdk.embeddings.create(model="minilm", input=["fine", ""])
        assert isinstance(exc.value.body, dict) and exc.value.body["param"] == "input[1]"
        with pytest.raises(openai.BadRequestError) as exc:
            sdk.embeddings.create(model="minilm", input=texts, dimensions=128)
        assert isinstance(exc.value.body, dict) and exc.value.body["param"] == "dimensions"
    with Client(minilm_server.address) as client:
        grpc_vectors = [list(d.vector) for d in client.embed(texts).data]
    assert [d.embedding for d in by_base64.data] == grpc_vectors
    assert [d.embedding for d in by_float.data] == grpc_vectors
    assert one.data[0].embedding == grpc_vectors[0] and one.data[0].index == 0
    assert [d.index for d in by_float.data] == [0, 1, 2]
    assert by_float.usage.prompt_tokens == by_float.usage.total_tokens > 0


def test_a_generative_model_embeds_over_http_too(server: TestServer, sdk: openai.OpenAI) -> None:
    reply = sdk.embeddings.create(model="any", input=[[9707, 1879], "hello world"], encoding_format="float")
    assert len(reply.data) == 2 and len(reply.data[0].embedding) == 896


def test_completion_with_a_suffix_fills_the_middle(server: TestServer, sdk: openai.OpenAI) -> None:
    prefix, suffix = "def add(a, b):\n    ", "\n    return c\n"
    reply = sdk.completions.create(
        model="any", prompt=prefix, suffix=suffix, max_tokens=64, temperature=0, extra_body={"n_indent": 4}
    )
    with Client(server.address) as client:
        from llama_crab_client import Infill

        want = client.create_completion(Infill(prefix, suffix, indent=4), CompletionOptions(64))
    assert reply.choices[0].text == want.text and reply.choices[0].finish_reason == "stop"
    with pytest.raises(openai.BadRequestError) as exc:
        sdk.completions.create(model="any", prompt=[1, 2], suffix="x", max_tokens=4)
    assert isinstance(exc.value.body, dict) and exc.value.body["param"] == "prompt"


# ---- errors -------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"prompt": "x", "n": 2}, "n"),
        ({"prompt": "x", "max_tokens": 0}, "max_tokens"),
        ({"prompt": ""}, "prompt"),
        ({"prompt": "x", "temperature": "hot"}, "temperature"),
        ({"prompt": "x", "logit_bias": {"abc": 1}}, "logit_bias"),
        ({"prompt": "x", "grammar": "root ::= ("}, "grammar"),
    ],
)
def test_bad_input_is_a_400_naming_the_field(sdk: openai.OpenAI, body: dict[str, Any], param: str) -> None:
    prompt = body.pop("prompt")
    with pytest.raises(openai.BadRequestError) as exc:
        sdk.completions.create(model="any", prompt=prompt, extra_body=body)  # type: ignore[arg-type]
    assert exc.value.status_code == 400
    error = exc.value.body
    assert isinstance(error, dict) and error["param"] == param and error["type"] == "invalid_request_error"


def test_bad_json_and_chat_fields(server: TestServer) -> None:
    status, _, body = post(server.http_url, "/v1/chat/completions", b"{not json")
    assert status == 400 and json.loads(body)["error"]["param"] == "body"
    status, _, body = post(server.http_url, "/v1/chat/completions", {"messages": [{"role": "wizard", "content": "x"}]})
    assert status == 400 and json.loads(body)["error"]["param"].startswith("messages")
    status, _, body = post(server.http_url, "/v1/chat/completions", {"messages": []})
    assert status == 400 and json.loads(body)["error"]["param"] == "messages"
    ask = {"messages": [{"role": "user", "content": "x"}], "max_tokens": 1}
    status, _, body = post(server.http_url, "/v1/chat/completions", {**ask, "top_logprobs": 2})
    assert status == 400 and json.loads(body)["error"]["param"] == "top_logprobs"
    status, _, body = post(server.http_url, "/v1/chat/completions", {**ask, "n": 3})
    assert status == 400 and json.loads(body)["error"]["param"] == "n"


def test_a_body_over_the_message_limit_is_refused(llama: Llama) -> None:
    with start_test_server(llama, http_port=0, max_message_bytes=4096) as s:
        status, _, body = post(s.http_url, "/v1/completions", {"prompt": "x" * 8192, "max_tokens": 1})
        assert status == 400 and json.loads(body)["error"]["param"] == "body"
        assert post(s.http_url, "/v1/completions", {"prompt": "x", "max_tokens": 1})[0] == 200


def test_max_concurrent_rpcs_bounds_http_requests_too(llama: Llama) -> None:
    with start_test_server(llama, http_port=0, max_concurrent_rpcs=1) as s:
        held = _open_stream(s.http_url, {"prompt": "Once upon a time", "max_tokens": 200, "stream": True, "ignore_eos": True})
        try:
            response = held.getresponse()
            assert response.status == 200 and response.readline().startswith(b"data: ")
            assert post(s.http_url, "/v1/completions", {"prompt": "x", "max_tokens": 1})[0] == 503
        finally:
            held.close()
        assert wait_until(lambda: post(s.http_url, "/v1/completions", {"prompt": "x", "max_tokens": 1})[0] == 200)


def test_wrong_token_is_an_authentication_error(qwen: Llama) -> None:
    with start_test_server(qwen, http_port=0, auth_token="s3cret") as s:
        with openai.OpenAI(base_url=s.http_url + "/v1", api_key="wrong", max_retries=0) as client:
            with pytest.raises(openai.AuthenticationError):
                client.models.list()
        with openai.OpenAI(base_url=s.http_url + "/v1", api_key="s3cret", max_retries=0) as client:
            assert client.models.list().data
        assert get(s.http_url, "/health")[0] == 200  # probes need no token


def test_full_queue_is_a_rate_limit_error_with_retry_after(model_path: str) -> None:
    with Llama.load(LlamaParams(model_path).with_n_ctx(2048).with_n_parallel(1).with_max_queue(1)) as busy:
        with start_test_server(busy, http_port=0) as s:
            # Long enough (seconds, and unread: paused for its reader) that the slot stays
            # busy and the second request queued while the third is refused.
            body = {"prompt": "Once upon a time", "max_tokens": 1500, "stream": True, "ignore_eos": True}
            holders = [_open_stream(s.http_url, body) for _ in range(2)]  # one decoding, one queued
            try:
                assert wait_until(lambda: busy.metrics().busy_slots == 1 and busy.metrics().queue_depth == 1)
                status, headers, raw = post(s.http_url, "/v1/completions", {"prompt": "x", "max_tokens": 1})
                assert status == 429 and headers.get("retry-after") == "1"
                assert json.loads(raw)["error"]["type"] == "rate_limit_error"
                with openai.OpenAI(base_url=s.http_url + "/v1", api_key="x", max_retries=0) as client:
                    with pytest.raises(openai.RateLimitError):
                        client.completions.create(model="any", prompt="x", max_tokens=1)
            finally:
                for conn in holders:
                    conn.close()


def _open_stream(url: str, body: dict[str, Any]) -> http.client.HTTPConnection:
    """A streaming request whose first event has arrived (or that is queued); left open."""
    parts = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=120)
    conn.request("POST", "/v1/completions", json.dumps(body).encode(), {"content-type": "application/json"})
    return conn


def test_draining_server_answers_503_before_any_header(llama: Llama) -> None:
    s = start_test_server(llama, http_port=0)
    try:
        s.service.servicer.start_draining()
        status, _, body = post(s.http_url, "/v1/completions", {"prompt": "x", "max_tokens": 1, "stream": True})
        assert status == 503 and json.loads(body)["error"]["type"] == "service_unavailable"
        assert get(s.http_url, "/health")[0] == 503
    finally:
        s.stop()


def test_an_error_after_the_stream_began_is_an_error_event(small_server: TestServer, llama: Llama) -> None:
    """A grammar that needs "b" then "a", with every token that could finish it banned:
    the stream has begun ("b") when the engine finds no token allowed."""
    finishing = [t for t in range(llama.model_info().n_vocab) if llama.detokenize([t]) in ("a", "ba")]
    body = {
        "prompt": "Say something.", "max_tokens": 8, "stream": True, "grammar": 'root ::= "b" "a"',
        "logit_bias": {str(t): -100 for t in finishing},
    }  # fmt: skip
    status, _, raw = post(small_server.http_url, "/v1/completions", body)
    events = [json.loads(e[len("data: ") :]) for e in raw.decode().split("\n\n") if e]
    assert status == 200 and events[0]["choices"][0]["text"] == "b"
    assert events[-1]["error"]["param"] == "grammar" and "no token is allowed" in events[-1]["error"]["message"]
    with openai.OpenAI(base_url=small_server.http_url + "/v1", api_key="x", max_retries=0) as client:
        stream = client.completions.create(model="any", prompt="Say something.", max_tokens=8, stream=True, extra_body={k: body[k] for k in ("grammar", "logit_bias")})  # type: ignore[arg-type]
        with pytest.raises(openai.APIError, match="no token is allowed"):
            list(stream)
    assert post(small_server.http_url, "/v1/completions", {"prompt": "x", "max_tokens": 2})[0] == 200


# ---- streams over the wire ----------------------------------------------------------------
@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_curl_sees_sse_events_then_done(small_server: TestServer) -> None:
    body = json.dumps({"prompt": "Hello", "max_tokens": 6, "stream": True, "temperature": 0})
    out = subprocess.run(
        ["curl", "-sN", "-H", "content-type: application/json", "-d", body, small_server.http_url + "/v1/completions"],
        capture_output=True,
        timeout=120,
        check=True,
        # Not curl under scripts/sanitize.sh's preloaded ASan runtime.
        env={k: v for k, v in os.environ.items() if k != "LD_PRELOAD"},
    ).stdout.decode()
    events = [e for e in out.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"
    payloads = [json.loads(e[len("data: ") :]) for e in events[:-1]]
    assert payloads[-1]["choices"][0]["finish_reason"] == "length"
    assert all(p["object"] == "text_completion" for p in payloads)


@pytest.mark.parametrize("stream", [True, False])
def test_a_client_that_leaves_frees_its_slot(small_server: TestServer, llama: Llama, stream: bool) -> None:
    """Mid-stream, or before a whole (not streamed) reply: a STOP, counted CANCELLED."""

    def cancelled() -> float:
        labels = {"method": "http:/v1/completions", "code": "CANCELLED"}
        return small_server.metrics.value("llama_crab_requests_total", labels)

    before = cancelled()
    body = {"prompt": "Once upon a time", "max_tokens": 400, "stream": stream, "ignore_eos": True}
    conn = _open_stream(small_server.http_url, body)
    if stream:
        response = conn.getresponse()
        assert response.status == 200 and response.readline().startswith(b"data: ")
    assert wait_until(lambda: llama.metrics().busy_slots == 1, timeout=30)
    conn.close()
    assert wait_until(lambda: llama.metrics().busy_slots == 0, timeout=30)
    assert wait_until(lambda: cancelled() == before + 1, timeout=30)


# ---- fuzzing ------------------------------------------------------------------------------
_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**40), 2**40) | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
_keys = st.sampled_from(
    [
        "prompt", "messages", "max_tokens", "stop", "temperature", "top_p", "seed", "logprobs", "top_logprobs",
        "tools", "tool_choice", "response_format", "logit_bias", "stream", "stream_options", "n", "top_k",
        "min_p", "grammar", "samplers", "presence_penalty", "mirostat", "json_schema", "min_tokens",
        "input", "encoding_format", "dimensions", "suffix", "n_indent",
    ]
)  # fmt: skip


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    path=st.sampled_from(["/v1/completions", "/v1/chat/completions", "/v1/embeddings"]),
    body=st.dictionaries(_keys, _values, max_size=6),
    max_tokens=st.integers(1, 4),
)
def test_random_bodies_never_get_a_500(small_server: TestServer, path: str, body: dict[str, Any], max_tokens: int) -> None:
    body.setdefault("max_tokens", max_tokens)
    status, _, raw = post(small_server.http_url, path, body)
    assert status in (200, 400), (status, raw[:500])
    if status == 400:
        error = json.loads(raw)["error"]
        assert error["message"] and error["type"] == "invalid_request_error"
