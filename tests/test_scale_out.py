"""Scale-out, proven here: three `llama-crab serve` replicas behind a real L7 gRPC balancer.

The balancer is nginx (`grpc_pass`, Debian's `nginx` package) running
`deploy/nginx/llama-crab.conf` as shipped, with only the replicas' and the listener's ports
swapped in. The module's setup installs nginx with apt-get when it is missing (once, under
a lock) and skips, saying why, only where there is no apt-get. Everything listens on
127.0.0.1; every stream is bounded (few streams, small `max_tokens`); the module takes
about a minute on 2 cores. What it shows:

- calls spread over all three replicas, through nginx and with the client's own
  `round_robin` over the three addresses (no proxy);
- SIGTERM mid-load: every stream the replica had ends with its final `Completion`, new
  calls land on the others, no client sees an error (nginx: the replica leaves the
  upstream first, as Kubernetes' preStop does); and while a replica drains still in the
  balancer, its refusals of new calls (trailers-only UNAVAILABLE) are retried elsewhere;
- SIGKILL mid-load: only the killed replica's in-flight streams fail, and the client's
  retry lands elsewhere;
- `x-session-id`: the turns of one session hit one replica, whose prefix cache serves them
  (`usage.cached_tokens`).
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from helpers import ensure_debian_tools, wait_until
from llama_crab_client import Client, Completion, CompletionOptions, convert
from llama_crab_client.channel import ChannelSettings
from llama_crab_client.v1 import llama_crab_pb2_grpc as pb_grpc

ROOT = Path(__file__).resolve().parent.parent
NGINX_CONF = ROOT / "deploy" / "nginx" / "llama-crab.conf"
# The addresses deploy/nginx/llama-crab.conf is written with: replicas, then the listener.
SHIPPED_REPLICAS = ("127.0.0.1:50051", "127.0.0.1:50052", "127.0.0.1:50053")
SHIPPED_LISTEN = "127.0.0.1:8080"
SHIPPED_HTTP_REPLICAS = ("127.0.0.1:8081", "127.0.0.1:8082", "127.0.0.1:8083")
SHIPPED_HTTP_LISTEN = "127.0.0.1:8000"
UPSTREAM_HEADER = "x-llama-crab-upstream"
PROMPT = "Once upon a time, a small crab"
LONG = CompletionOptions(96, ignore_eos=True)  # long enough to still run when a replica goes
SHORT = CompletionOptions(4)

pytestmark = pytest.mark.timeout(240)


# ---- nginx, installed by the suite itself ---------------------------------------------------
def ensure_nginx() -> str:
    """The nginx binary; installed from Debian's packages when missing."""
    return ensure_debian_tools(["nginx"], ["nginx"])[0]


def render_nginx_conf(
    replicas: Sequence[str],
    listen: str,
    down: Sequence[str] = (),
    http_replicas: Sequence[str] = SHIPPED_HTTP_REPLICAS,
    http_listen: str = SHIPPED_HTTP_LISTEN,
) -> str:
    """deploy/nginx/llama-crab.conf with these addresses (gRPC, then the HTTP API's);
    `down` replicas marked down."""
    text = NGINX_CONF.read_text()
    assert text.count(SHIPPED_LISTEN) == 1, "the shipped config listens on one address"
    text = text.replace(SHIPPED_LISTEN, listen)
    assert text.count(f"listen {SHIPPED_HTTP_LISTEN};") == 1, "one HTTP listen address"
    text = text.replace(f"listen {SHIPPED_HTTP_LISTEN};", f"listen {http_listen};")
    for shipped, actual in zip(SHIPPED_HTTP_REPLICAS, http_replicas, strict=True):
        assert text.count(f"server {shipped} ") == 1, "each HTTP replica is in the HTTP upstream"
        text = text.replace(f"server {shipped} ", f"server {actual} ")
    for shipped, actual in zip(SHIPPED_REPLICAS, replicas, strict=True):
        assert text.count(f"server {shipped} ") == 2, "each replica is in both upstreams"
        text = text.replace(f"server {shipped} ", f"server {actual} ")
        if actual in down:
            text = re.sub(rf"(server {re.escape(actual)} [^;]*);", r"\1 down;", text)
    return text


def nginx_main_conf(run_dir: Path, snippet: Path) -> str:
    """A minimal nginx.conf around the shipped http-level snippet, everything in `run_dir`."""
    return f"""worker_processes 1;
pid {run_dir}/nginx.pid;
error_log {run_dir}/error.log info;
events {{ worker_connections 512; }}
http {{
    access_log {run_dir}/access.log;
    client_body_temp_path {run_dir}/client_body;
    proxy_temp_path {run_dir}/proxy;
    fastcgi_temp_path {run_dir}/fastcgi;
    uwsgi_temp_path {run_dir}/uwsgi;
    scgi_temp_path {run_dir}/scgi;
    include {snippet};
}}
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Nginx:
    """nginx in the foreground on a loopback port, with its own config, pid and logs."""

    def __init__(self, binary: str, run_dir: Path, replicas: Sequence[str], http_replicas: Sequence[str]) -> None:
        self.binary = binary
        self.run_dir = run_dir
        self.replicas = list(replicas)
        self.http_replicas = list(http_replicas)
        self.address = f"127.0.0.1:{free_port()}"
        self.http_address = f"127.0.0.1:{free_port()}"
        self.snippet = run_dir / "llama-crab.conf"
        self.conf = run_dir / "nginx.conf"
        self.snippet.write_text(self._render())
        self.conf.write_text(nginx_main_conf(run_dir, self.snippet))
        self._base = [binary, "-e", str(run_dir / "error.log"), "-p", str(run_dir), "-c", str(self.conf)]
        self.proc = subprocess.Popen([*self._base, "-g", "daemon off;"], stdout=subprocess.DEVNULL)
        host, port = self.address.split(":")
        assert wait_until(lambda: _accepts(host, int(port)) or self.proc.poll() is not None, timeout=30)
        assert self.proc.poll() is None, self.error_log()

    def take_out(self, replica: str) -> None:
        """Mark a replica down and reload: old workers finish their streams, new ones skip it."""
        self.snippet.write_text(self._render(down=[replica]))
        reloads = self.error_log().count("gracefully shutting down")
        subprocess.run([*self._base, "-s", "reload"], check=True, timeout=30)
        # The new workers run the new config once the old ones were told to leave.
        assert wait_until(lambda: self.error_log().count("gracefully shutting down") > reloads, timeout=30)

    def _render(self, down: Sequence[str] = ()) -> str:
        return render_nginx_conf(self.replicas, self.address, down, self.http_replicas, self.http_address)

    def error_log(self) -> str:
        path = self.run_dir / "error.log"
        return path.read_text() if path.exists() else ""

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def _accepts(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex((host, port)) == 0


# ---- replicas ---------------------------------------------------------------------------------
class Replica:
    """`llama-crab serve` as a subprocess, configured through its LLAMA_CRAB_* variables (as the
    container image does), with a metrics port to count what it served."""

    def __init__(self, model_path: str, log: Path) -> None:
        self.port = free_port()
        self.metrics_port = free_port()
        self.http_port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.http_address = f"127.0.0.1:{self.http_port}"
        self.log = log
        env = {
            **os.environ,
            "LLAMA_CRAB_MODEL": model_path,
            "LLAMA_CRAB_HOST": "127.0.0.1",
            "LLAMA_CRAB_PORT": str(self.port),
            "LLAMA_CRAB_METRICS_PORT": str(self.metrics_port),
            "LLAMA_CRAB_HTTP_PORT": str(self.http_port),  # three replicas on one host: one port each
            "LLAMA_CRAB_N_CTX": "1024",
            "LLAMA_CRAB_PARALLEL": "4",
            "LLAMA_CRAB_THREADS": "1",  # three replicas share two cores
            "LLAMA_CRAB_CACHE_RAM": "32",
            "LLAMA_CRAB_GRACE": "60",
            "LLAMA_CRAB_LOG_FORMAT": "json",
        }
        with log.open("wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "llama_crab.cli", "serve"], env=env, stdout=out, stderr=subprocess.STDOUT
            )

    def wait_serving(self, timeout: float = 180.0) -> None:
        deadline = time.monotonic() + timeout
        with grpc.insecure_channel(self.address) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            while time.monotonic() < deadline:
                assert self.proc.poll() is None, f"replica exited with {self.proc.returncode}:\n{self.log.read_text()}"
                with contextlib.suppress(grpc.RpcError):
                    reply = health.Check(health_pb2.HealthCheckRequest(), timeout=2.0)  # type: ignore[attr-defined]
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        return
                time.sleep(0.1)
        raise AssertionError(f"replica {self.address} not SERVING within {timeout:.0f}s:\n{self.log.read_text()}")

    def metric(self, name: str, **labels: str) -> float:
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as response:
            text = response.read().decode()
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == name and sample.labels == labels:
                    return float(sample.value)
        return 0.0

    def completions(self) -> list[dict[str, Any]]:
        """Its "completion finished" log lines (request_id, code, tokens...)."""
        return self.log_events("completion finished")

    def refused(self) -> list[dict[str, Any]]:
        """Complete calls it refused without streaming (e.g. UNAVAILABLE while draining)."""
        return [e for e in self.log_events("call finished") if e.get("method") == "Complete"]

    def log_events(self, msg: str) -> list[dict[str, Any]]:
        out = []
        for line in self.log.read_text().splitlines():
            with contextlib.suppress(ValueError):
                record = json.loads(line)
                if isinstance(record, dict) and record.get("msg") == msg:
                    out.append(record)
        return out

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@dataclass
class Cluster:
    replicas: list[Replica]
    nginx: Nginx

    @property
    def round_robin_target(self) -> str:
        """The three replicas as one gRPC target: the client balances them itself."""
        return "ipv4:" + ",".join(r.address for r in self.replicas)

    def target(self, via: str) -> str:
        return self.nginx.address if via == "nginx" else self.round_robin_target

    def served_by(self, request_id: str, timeout: float = 10.0) -> Replica:
        """The one replica that logged this call's completion (its log line follows the
        final message by a moment, hence the bounded wait)."""

        def found() -> list[Replica]:
            return [
                r for r in self.replicas if any(e.get("request_id") == request_id for e in r.completions())
            ]

        wait_until(lambda: bool(found()), timeout=timeout)
        replicas = found()
        assert len(replicas) == 1, f"call {request_id} completed on {[r.address for r in replicas]}"
        return replicas[0]


@pytest.fixture(scope="module")
def nginx_binary() -> str:
    return ensure_nginx()


@pytest.fixture
def cluster(model_path: str, nginx_binary: str, tmp_path: Path) -> Iterator[Cluster]:
    """Three fresh replicas (each test stops one) and nginx in front of them."""
    replicas = [Replica(model_path, tmp_path / f"replica{i}.log") for i in range(3)]
    nginx: Optional[Nginx] = None
    try:
        for replica in replicas:
            replica.wait_serving()
        run_dir = tmp_path / "nginx"
        run_dir.mkdir()
        nginx = Nginx(nginx_binary, run_dir, [r.address for r in replicas], [r.http_address for r in replicas])
        yield Cluster(replicas, nginx)
    finally:
        if nginx is not None:
            nginx.stop()
        for replica in replicas:
            replica.stop()


# ---- streams ----------------------------------------------------------------------------------
@dataclass
class Stream:
    """One Complete call on a thread, with its own x-request-id: its chunks, then its final
    Completion or its error."""

    stub: pb_grpc.LlamaCrabServiceStub
    options: CompletionOptions
    metadata: tuple[tuple[str, str], ...] = ()
    prompt: Any = PROMPT
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    upstream: Optional[str] = None  # the replica nginx chose (its response header)
    chunks: int = 0
    completion: Optional[Completion] = None
    error: Optional[grpc.RpcError] = None
    first_chunk: threading.Event = field(default_factory=threading.Event)
    done: threading.Event = field(default_factory=threading.Event)

    def start(self) -> Stream:
        threading.Thread(target=self._run, daemon=True).start()
        return self

    def _run(self) -> None:
        try:
            call = self.stub.Complete(
                convert.complete_request_to_proto(self.prompt, self.options),
                metadata=(("x-request-id", self.request_id), *self.metadata),
                timeout=120,
            )
            for response in call:
                event = convert.complete_response_from_proto(response)
                if isinstance(event, Completion):
                    self.completion = event
                else:
                    self.chunks += 1
                    self.first_chunk.set()
            self.upstream = _text(dict(call.initial_metadata()).get(UPSTREAM_HEADER))
        except grpc.RpcError as e:
            self.error = e
            self.upstream = _text(dict(e.initial_metadata() or ()).get(UPSTREAM_HEADER))  # type: ignore[attr-defined]
        finally:
            self.first_chunk.set()
            self.done.set()

    def wait(self, timeout: float = 120.0) -> Stream:
        assert self.done.wait(timeout), "a stream did not end"
        return self

    @property
    def finished(self) -> bool:
        """Ran to its end: the final Completion, every token asked for."""
        c = self.completion
        return self.error is None and c is not None and c.usage.completion_tokens == self.options.max_tokens


def _text(value: Any) -> Optional[str]:
    return value.decode() if isinstance(value, bytes) else value


def channel(target: str) -> grpc.Channel:
    """A channel exactly as `llama_crab_client.Client` dials (retry policy, round_robin)."""
    return ChannelSettings(target).sync_channel()


def start_streams(stub: pb_grpc.LlamaCrabServiceStub, n: int, options: CompletionOptions = LONG) -> list[Stream]:
    streams = [Stream(stub, options).start() for _ in range(n)]
    for s in streams:
        assert s.first_chunk.wait(60), "a stream got no first chunk"
    return streams


def complete(client: Client, options: CompletionOptions) -> str:
    """One call through the public client, which must succeed; returns its request id."""
    request_id = uuid.uuid4().hex
    completion = client.create_completion(PROMPT, options, request_id=request_id)
    assert completion.usage.completion_tokens == options.max_tokens
    return request_id


def spread_round_robin(client: Client, replicas: Sequence[Replica]) -> None:
    """Until the client's round_robin has a connection to every replica (a bounded warm-up)."""

    def all_seen() -> bool:
        client.tokenize("warm-up")
        return all(r.metric("llama_crab_requests_total", method="Tokenize", code="OK") > 0 for r in replicas)

    assert wait_until(all_seen, timeout=30), "round_robin never reached every replica"


def busiest(replicas: Sequence[Replica]) -> Replica:
    """A replica with streams in flight (the one with the most)."""
    return max(replicas, key=lambda r: r.metric("llama_crab_busy_slots"))


# ---- 1. spread ----------------------------------------------------------------------------------
@pytest.mark.parametrize("via", ["nginx", "round_robin"])
def test_streams_spread_over_all_three_replicas(cluster: Cluster, via: str) -> None:
    target = cluster.target(via)
    with Client(target) as client, channel(target) as ch:
        if via == "round_robin":
            spread_round_robin(client, cluster.replicas)
        streams = [Stream(pb_grpc.LlamaCrabServiceStub(ch), SHORT).start() for _ in range(9)]
        for s in streams:
            s.wait()
    assert all(s.finished for s in streams), [(s.error, s.completion) for s in streams]
    served = {r.address: 0 for r in cluster.replicas}
    for s in streams:
        served[cluster.served_by(s.request_id).address] += 1
    assert all(n >= 1 for n in served.values()), served
    if via == "nginx":  # nginx says the same in its response header
        assert all(s.upstream == cluster.served_by(s.request_id).address for s in streams)


def test_calls_that_delivered_everything_count_as_ok_through_nginx(cluster: Cluster) -> None:
    # The client reads each call's status after the final Completion. Dropping the call
    # there (grpc then cancels it) made replicas behind nginx count some finished calls as
    # CANCELLED, which skews llama_crab_requests_total, the metric deploy.md sizes with.
    with Client(cluster.nginx.address) as client:
        for _ in range(24):
            complete(client, SHORT)

    def total(code: str) -> float:
        return sum(r.metric("llama_crab_requests_total", method="Complete", code=code) for r in cluster.replicas)

    assert wait_until(lambda: total("OK") == 24, timeout=10), (total("OK"), total("CANCELLED"))
    assert total("CANCELLED") == 0


def test_http_streams_spread_through_nginx(cluster: Cluster) -> None:
    """The OpenAI-compatible API behind the shipped nginx config: every stream arrives whole
    (events as they are written, then [DONE]) and the replicas share them."""
    host, port = cluster.nginx.http_address.split(":")
    body = json.dumps({"prompt": PROMPT, "max_tokens": 4, "stream": True, "temperature": 0}).encode()
    upstreams = []
    for _ in range(9):
        conn = http.client.HTTPConnection(host, int(port), timeout=60)
        try:
            conn.request("POST", "/v1/completions", body, {"content-type": "application/json"})
            response = conn.getresponse()
            events = response.read().decode().split("\n\n")
        finally:
            conn.close()
        assert response.status == 200 and events[-2] == "data: [DONE]", events
        upstreams.append(response.getheader(UPSTREAM_HEADER))
    assert {u for u in upstreams} == {r.http_address for r in cluster.replicas}, upstreams


# ---- 2. SIGTERM mid-load -------------------------------------------------------------------------
def test_sigterm_mid_load_through_nginx(cluster: Cluster) -> None:
    nginx = cluster.nginx
    with channel(nginx.address) as ch, Client(nginx.address) as client:
        streams = start_streams(pb_grpc.LlamaCrabServiceStub(ch), 6)
        victim = busiest(cluster.replicas)
        in_flight = int(victim.metric("llama_crab_busy_slots"))
        assert in_flight >= 1
        # The preStop step: the replica leaves the balancer, then gets SIGTERM.
        nginx.take_out(victim.address)
        victim.proc.send_signal(signal.SIGTERM)
        assert wait_until(lambda: bool(victim.log_events("draining")), timeout=30)
        # New calls while it drains: none fails (each would raise), all land elsewhere.
        new_calls = [complete(client, SHORT) for _ in range(6)]
        for s in streams:
            s.wait()
        assert victim.proc.wait(timeout=90) == 0
    # Every stream it had finished, with its final Completion.
    assert all(s.finished for s in streams), [(s.upstream, s.error, s.completion) for s in streams]
    its_streams = [s for s in streams if s.upstream == victim.address]
    assert len(its_streams) == in_flight
    assert all(cluster.served_by(s.request_id) is victim for s in its_streams)
    # No new call reached it, not even to be refused.
    assert all(cluster.served_by(rid) is not victim for rid in new_calls)
    assert victim.refused() == []


def test_sigterm_mid_load_with_client_round_robin(cluster: Cluster) -> None:
    target = cluster.round_robin_target
    with Client(target) as client, channel(target) as ch:
        spread_round_robin(client, cluster.replicas)
        streams = start_streams(pb_grpc.LlamaCrabServiceStub(ch), 6)
        victim = busiest(cluster.replicas)
        in_flight = int(victim.metric("llama_crab_busy_slots"))
        assert in_flight >= 1
        victim.proc.send_signal(signal.SIGTERM)
        for s in streams:
            s.wait()
        assert victim.proc.wait(timeout=90) == 0
        # Gone: the client's round_robin skips it; nothing fails. (New calls *while* it drains:
        # the test of section 4.)
        new_calls = [complete(client, SHORT) for _ in range(6)]
    assert all(s.finished for s in streams), [(s.error, s.completion) for s in streams]
    assert sum(cluster.served_by(s.request_id) is victim for s in streams) == in_flight
    assert all(cluster.served_by(rid) is not victim for rid in new_calls)


# ---- 3. SIGKILL mid-load -------------------------------------------------------------------------
@pytest.mark.parametrize("via", ["nginx", "round_robin"])
def test_sigkill_mid_load_fails_only_its_streams_and_a_retry_succeeds(cluster: Cluster, via: str) -> None:
    target = cluster.target(via)
    with Client(target) as client, channel(target) as ch:
        if via == "round_robin":
            spread_round_robin(client, cluster.replicas)
        streams = start_streams(pb_grpc.LlamaCrabServiceStub(ch), 6)
        victim = busiest(cluster.replicas)
        in_flight = int(victim.metric("llama_crab_busy_slots"))
        assert in_flight >= 1
        victim.proc.kill()
        victim.proc.wait()
        for s in streams:
            s.wait()
        failed = [s for s in streams if s.error is not None]
        # The client retries each failed one: it lands on a live replica and completes.
        retries = [complete(client, LONG) for _ in failed]
        # New calls too (nginx: connection refused -> next upstream; round_robin: skipped).
        new_calls = [complete(client, SHORT) for _ in range(3)]
    # Only its streams failed, and all of them; every other one finished.
    assert len(failed) == in_flight, [(s.error, s.completion) for s in streams]
    assert all(s.finished for s in streams if s.error is None)
    assert all(cluster.served_by(s.request_id) is not victim for s in streams if s.error is None)
    # Directly, the broken connection is UNAVAILABLE. nginx had already sent the response
    # headers, so it can only reset the HTTP/2 stream (RST_STREAM INTERNAL_ERROR): INTERNAL.
    expected = grpc.StatusCode.INTERNAL if via == "nginx" else grpc.StatusCode.UNAVAILABLE
    assert {s.error.code() for s in failed if s.error is not None} == {expected}
    if via == "nginx":
        assert {s.upstream for s in failed} == {victim.address}
    assert all(cluster.served_by(rid) is not victim for rid in retries + new_calls)


# ---- 4. draining without the preStop step ---------------------------------------------------------
@pytest.mark.parametrize("via", ["nginx", "round_robin"])
def test_new_calls_while_a_replica_drains_are_retried_elsewhere(cluster: Cluster, via: str) -> None:
    target = cluster.target(via)
    with Client(target) as client, channel(target) as ch:
        if via == "round_robin":
            spread_round_robin(client, cluster.replicas)
        streams = start_streams(pb_grpc.LlamaCrabServiceStub(ch), 3)
        victim = busiest(cluster.replicas)
        victim.proc.send_signal(signal.SIGTERM)
        assert wait_until(lambda: bool(victim.log_events("draining")), timeout=30)
        errors = []
        for _ in range(6):
            try:
                complete(client, SHORT)
            except Exception as e:  # what a client would see
                errors.append(e)
        for s in streams:
            s.wait()
        assert victim.proc.wait(timeout=90) == 0
    assert all(s.finished for s in streams)
    assert not errors, errors


# ---- 5. x-session-id: one session, one replica, its prefix cache -----------------------------------
def test_client_sessions_carry_their_id_and_stay_on_one_replica(cluster: Cluster) -> None:
    # Client.session() sends its x-session-id on every call: through nginx each turn lands
    # on the replica that served the last one, so its whole history comes from the cache.
    with Client(cluster.nginx.address) as client:
        for opening in ("The crab said hello to the sea.", "A lighthouse keeper counted the waves."):
            session = client.session()
            previous_prompt = 0
            for turn in range(4):
                done = session.create_completion(
                    opening if turn == 0 else f"\nAnd then, part {turn}:", CompletionOptions(8, ignore_eos=True)
                )
                if turn:
                    assert done.usage.cached_tokens >= previous_prompt, (turn, done.usage)
                previous_prompt = done.usage.prompt_tokens


def test_session_id_keeps_a_session_on_one_replica_and_its_cache(cluster: Cluster) -> None:
    address = cluster.nginx.address
    with Client(address) as client, channel(address) as ch:
        stub = pb_grpc.LlamaCrabServiceStub(ch)

        def turns(session_id: Optional[str], opening: str) -> list[Stream]:
            """Four turns of one conversation, each sending the whole token history (as
            `Client.session()` does), with or without an x-session-id header."""
            metadata = (("x-session-id", session_id),) if session_id else ()
            history = client.tokenize(opening)
            out = []
            for turn in range(4):
                if turn:
                    history = history + client.tokenize(f"\nAnd then, part {turn}:", add_special=False)
                s = Stream(stub, CompletionOptions(8, ignore_eos=True), metadata, prompt=list(history)).start().wait()
                assert s.finished, (s.error, s.completion)
                assert s.completion is not None
                history = history + list(s.completion.token_ids)
                out.append(s)
            return out

        pinned = turns("chat-42", "The crab said hello to the sea.")
        roaming = turns(None, "A lighthouse keeper counted the waves.")

    assert len({cluster.served_by(s.request_id).address for s in pinned}) == 1, [s.upstream for s in pinned]
    for before, after in zip(pinned, pinned[1:]):
        assert before.completion is not None and after.completion is not None
        # The whole previous prompt (at least) came from that replica's prefix cache.
        assert after.completion.usage.cached_tokens >= before.completion.usage.prompt_tokens
    # Without the header the same kind of conversation goes round robin over the replicas.
    assert len({cluster.served_by(s.request_id).address for s in roaming}) >= 2, [s.upstream for s in roaming]
