"""Service lifecycle: health across start and drain, graceful SIGTERM, reflection, metrics."""

from __future__ import annotations

import json
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from typing import IO, Any

import grpc
import pytest
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase
from prometheus_client.parser import text_string_to_metric_families

from llama_crab import Chunk, Completion, CompletionOptions, Llama, LlamaParams, StopReason
from llama_crab.server.testing import start_test_server
from helpers import wait_until
from llama_crab_client import convert
from llama_crab_client.v1 import llama_crab_pb2 as pb
from llama_crab_client.v1 import llama_crab_pb2_grpc as pb_grpc

PROMPT = "The capital of France is"
SERVICE = "llama_crab.v1.LlamaCrabService"


def start(stub: pb_grpc.LlamaCrabServiceStub, options: CompletionOptions, **kwargs: Any) -> Any:
    return stub.Complete(convert.complete_request_to_proto(PROMPT, options), **kwargs)


def read(responses: Iterator[Any]) -> tuple[list[Chunk], list[Completion]]:
    chunks: list[Chunk] = []
    completions: list[Completion] = []
    for response in responses:
        event = convert.complete_response_from_proto(response)
        (completions if isinstance(event, Completion) else chunks).append(event)  # type: ignore[arg-type]
    return chunks, completions


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(autouse=True)
def idle_engine(llama: Llama) -> Iterator[None]:
    yield
    assert wait_until(lambda: llama.metrics().busy_slots == 0), "a slot was left busy"


# ---- health ------------------------------------------------------------------------------
def test_health_not_serving_then_serving_then_not_serving_while_draining(llama: Llama) -> None:
    server = start_test_server(None)  # listening, but no model yet: as while one loads
    try:
        assert server.health_status("") == "NOT_SERVING"
        assert server.health_status(SERVICE) == "NOT_SERVING"
        with grpc.insecure_channel(server.address) as channel:
            stub = pb_grpc.LlamaCrabServiceStub(channel)
            with pytest.raises(grpc.RpcError) as exc:
                read(start(stub, CompletionOptions(2), timeout=10))
            assert exc.value.code() is grpc.StatusCode.UNAVAILABLE

            server.attach(llama)  # runs a real one-token decode first
            assert server.health_status("") == "SERVING"
            assert server.health_status(SERVICE) == "SERVING"

            # Drain with a stream in flight: health flips, new work is refused,
            # and the running stream still finishes normally.
            running = start(stub, CompletionOptions(48))
            responses = iter(running)
            first = convert.complete_response_from_proto(next(responses))
            stopped = server.begin_drain(grace=60.0)
            assert wait_until(lambda: server.health_status("") == "NOT_SERVING")
            assert server.health_status(SERVICE) == "NOT_SERVING"
            with pytest.raises(grpc.RpcError) as exc:
                read(start(stub, CompletionOptions(2), timeout=10))
            assert exc.value.code() is grpc.StatusCode.UNAVAILABLE
            chunks, completions = read(responses)
            assert isinstance(first, Chunk)
            assert completions[0].stop_reason is StopReason.LENGTH
            assert completions[0].usage.completion_tokens == 48
            assert first.text + "".join(c.text for c in chunks) == completions[0].text
            stopped.result(timeout=30)
    finally:
        server.stop()


def test_grace_period_over_cancels_with_a_final_completion(model_path: str) -> None:
    # One big slot: 4000 tokens outlast the grace period on any hardware.
    roomy = Llama.load(LlamaParams(model_path).with_n_ctx(4096).with_n_parallel(1))
    server = start_test_server(roomy)
    try:
        with grpc.insecure_channel(server.address) as channel:
            running = start(pb_grpc.LlamaCrabServiceStub(channel), CompletionOptions(4000))
            responses = iter(running)
            first = convert.complete_response_from_proto(next(responses))
            server.begin_drain(grace=0.2).result(timeout=30)
            chunks, completions = read(responses)
        assert isinstance(first, Chunk)
        assert len(completions) == 1 and completions[0].stop_reason is StopReason.CANCELLED
        delivered = [first, *chunks]
        assert "".join(c.text for c in delivered) == completions[0].text
        assert completions[0].usage.completion_tokens == sum(len(c.token_ids) for c in delivered) < 4000
        assert running.code() is grpc.StatusCode.OK
        assert wait_until(lambda: roomy.metrics().busy_slots == 0)
    finally:
        server.stop()
        roomy.close()


# ---- reflection and metrics ---------------------------------------------------------------
def test_reflection_lists_the_service(llama: Llama) -> None:
    with start_test_server(llama) as server, grpc.insecure_channel(server.address) as channel:
        reflected = ProtoReflectionDescriptorDatabase(channel)
        assert {SERVICE, "grpc.health.v1.Health"} <= set(reflected.get_services())
        # The service's descriptor is served too, so grpcurl can call it without a .proto.
        file = reflected.FindFileContainingSymbol(SERVICE)
        assert "Complete" in {m.name for s in file.service for m in s.method}


def test_metrics_endpoint(llama: Llama) -> None:
    with start_test_server(llama, metrics_port=free_port()) as server:
        with grpc.insecure_channel(server.address) as channel:
            chunks, completions = read(start(pb_grpc.LlamaCrabServiceStub(channel), CompletionOptions(5)))
        assert completions[0].usage.completion_tokens == 5
        # The call is counted as it ends, just after its last message went out.
        ok = {"method": "Complete", "code": "OK"}
        assert wait_until(lambda: server.metrics.value("llama_crab_requests_total", ok) == 1)
        url = f"http://127.0.0.1:{server.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as response:
            text = response.read().decode()
    samples = {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }

    def value(name: str, **labels: str) -> float:
        return samples[(name, tuple(sorted(labels.items())))]

    assert value("llama_crab_requests_total", method="Complete", code="OK") == 1
    assert value("llama_crab_completions_total", stop_reason="length") == 1
    assert value("llama_crab_completion_tokens_total") == 5
    assert value("llama_crab_prompt_tokens_total") == len(llama.tokenize(PROMPT))
    assert value("llama_crab_time_to_first_token_seconds_count") == 1
    # One observation per token after the first chunk.
    assert value("llama_crab_token_latency_seconds_count") == 5 - len(chunks[0].token_ids)
    assert value("llama_crab_slots") == 4
    assert value("llama_crab_busy_slots") == 0
    assert value("llama_crab_queue_depth") == 0


# ---- the real command: SIGTERM drains ----------------------------------------------------
def _lines(stream: IO[str]) -> queue.Queue[str]:
    out: queue.Queue[str] = queue.Queue()

    def pump() -> None:
        for line in stream:
            out.put(line)

    threading.Thread(target=pump, daemon=True).start()
    return out


def _wait_for_event(
    proc: subprocess.Popen[str], lines: queue.Queue[str], msg: str, timeout: float = 120.0
) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    seen = []
    while time.monotonic() < deadline:
        try:
            line = lines.get(timeout=0.5)
        except queue.Empty:
            if proc.poll() is not None and lines.empty():
                break  # it exited: no point waiting
            continue
        seen.append(line)
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if record.get("msg") == msg:
            return dict(record)
    raise AssertionError(f"no {msg!r} log line (exit status {proc.poll()}); got:\n{''.join(seen)}")


@pytest.mark.parametrize("event_loop", ["uvloop", "asyncio"])
def test_sigterm_drains_an_in_flight_stream_and_exits_0(model_path: str, event_loop: str) -> None:
    env = {**os.environ, "LLAMA_CRAB_LOG_FORMAT": "json"}  # the env twin of --log-format
    command = [sys.executable, "-m", "llama_crab.cli", "serve", "--model", model_path, "--port", "0", "--http-port", "0"]
    command += ["--n-ctx", "1024", "--parallel", "2", "--grace", "60", "--event-loop", event_loop]
    proc = subprocess.Popen(command, env=env, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    try:
        assert proc.stderr is not None
        lines = _lines(proc.stderr)
        listening = _wait_for_event(proc, lines, "listening")
        assert listening["event_loop"] == event_loop  # uvloop is a dependency, so it is installed
        port = listening["port"]
        _wait_for_event(proc, lines, "serving")
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            running = start(pb_grpc.LlamaCrabServiceStub(channel), CompletionOptions(64), timeout=120)
            responses = iter(running)
            first = convert.complete_response_from_proto(next(responses))
            proc.send_signal(signal.SIGTERM)
            _wait_for_event(proc, lines, "draining")
            chunks, completions = read(responses)
        assert isinstance(first, Chunk)
        assert completions[0].stop_reason is StopReason.LENGTH and completions[0].usage.completion_tokens == 64
        assert first.text + "".join(c.text for c in chunks) == completions[0].text
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_max_message_size_is_enforced(llama: Llama) -> None:
    with start_test_server(llama, max_message_bytes=4096) as server, grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.LlamaCrabServiceStub(channel)
        assert stub.Tokenize(pb.TokenizeRequest(text="small"), timeout=10).tokens
        with pytest.raises(grpc.RpcError) as exc:
            stub.Tokenize(pb.TokenizeRequest(text="x" * 10_000), timeout=10)
        assert exc.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
