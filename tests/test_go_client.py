"""The Go client (clients/go) streams, stops and sees errors against a live in-process server:
the contract works from Go with stubs that protoc-gen-go / protoc-gen-go-grpc generate at
build time (clients/go/build.sh, offline, GOPATH mode on Debian's Go packages).

The module's setup installs the Debian packages when they are missing (once, under a lock)
and skips, saying why, only where there is no apt-get or no root. On 2 cores a cold install
(apt-get update plus 24 packages) takes about 25 s and a cold build (empty Go build cache)
about 30 s. Warm (the packages installed, Go's build cache filled), a build into a new
directory takes about 1 s and the module a few seconds.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from helpers import ensure_debian_packages, wait_until
from llama_crab import Llama
from llama_crab.server.testing import TestServer, start_test_server
from llama_crab_client import Client, CompletionOptions

ROOT = Path(__file__).resolve().parent.parent
BUILD_SH = ROOT / "clients" / "go" / "build.sh"
# What clients/go/build.sh needs. golang-github-golang-protobuf-1-5-dev is named on purpose:
# golang-google-grpc-dev alone brings v1.3, which cannot marshal protoc-gen-go's messages.
GO_PACKAGES = (
    "golang-go",
    "protobuf-compiler",
    "protoc-gen-go",
    "protoc-gen-go-grpc",
    "golang-google-grpc-dev",
    "golang-google-protobuf-dev",
    "golang-google-genproto-dev",
    "golang-github-golang-protobuf-1-5-dev",
)
PROMPT = "Once upon a time"


# ---- the toolchain, installed by the suite itself, and the build ----------------------------
def _check() -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", str(BUILD_SH), "--check"], capture_output=True, text=True, timeout=60)


def ensure_go_toolchain() -> None:
    """Install the Debian packages build.sh needs when its check fails."""
    ensure_debian_packages(GO_PACKAGES, lambda: _check().returncode == 0, "the Go toolchain (clients/go/build.sh --check)")


@pytest.fixture(scope="module")
def go_binary(tmp_path_factory: pytest.TempPathFactory) -> Path:
    ensure_go_toolchain()
    out = tmp_path_factory.mktemp("go-client")
    proc = subprocess.run(["bash", str(BUILD_SH), str(out)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    binary = Path(proc.stdout.strip().splitlines()[-1])
    assert binary.is_file() and os.access(binary, os.X_OK), proc.stdout
    # Generated code stays in the build output, never in the source tree.
    assert not list((ROOT / "clients" / "go").rglob("*.pb.go"))
    assert list(out.rglob("llama_crab_grpc.pb.go"))
    return binary


@pytest.fixture(scope="module")
def server(llama: Llama) -> Iterator[TestServer]:
    with start_test_server(llama) as s:
        yield s


@dataclass
class Run:
    returncode: int
    stdout: str
    stderr: str

    def summary(self) -> dict[str, str]:
        """The `key=value ...` line the example writes to stderr after the stream."""
        line = self.stderr.strip().splitlines()[-1]
        return dict(item.split("=", 1) for item in line.split())

    def messages(self) -> list[dict[str, Any]]:
        """The -json output: one CompleteResponse per line (proto field names)."""
        return [json.loads(line) for line in self.stdout.splitlines()]


def run_go(binary: Path, server: TestServer, *args: str) -> Run:
    proc = subprocess.run(
        [str(binary), *args],
        env={**os.environ, "LLAMA_CRAB_SERVER": server.address},
        capture_output=True,
        text=True,
        timeout=60,
    )
    return Run(proc.returncode, proc.stdout, proc.stderr)


def request_count(server: TestServer, code: str) -> float:
    return server.metrics.value("llama_crab_requests_total", {"method": "Complete", "code": code})


# ---- the tests -----------------------------------------------------------------------------
def test_go_sources_are_gofmt_clean(go_binary: Path) -> None:
    proc = subprocess.run(["gofmt", "-l", str(BUILD_SH.parent)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout == "", proc.stdout + proc.stderr


def test_streams_text_to_length(go_binary: Path, server: TestServer) -> None:
    run = run_go(go_binary, server, "-max-tokens", "8", PROMPT)
    assert run.returncode == 0, run.stderr
    # Greedy: the Go client streams exactly what the Python client gets for the same request.
    with Client(server.address) as client:
        expected = client.create_completion(PROMPT, CompletionOptions(8))
    assert expected.text.strip()
    assert run.stdout == expected.text + "\n"
    summary = run.summary()
    assert summary["stop_reason"] == "STOP_REASON_LENGTH"
    assert int(summary["completion_tokens"]) == 8
    assert int(summary["prompt_tokens"]) == expected.usage.prompt_tokens > 0
    assert 1 <= int(summary["chunks"]) <= 8


def test_json_stream_is_consistent(go_binary: Path, server: TestServer) -> None:
    run = run_go(go_binary, server, "-json", "-max-tokens", "8", PROMPT)
    assert run.returncode == 0, run.stderr
    messages = run.messages()
    chunks = [m["chunk"] for m in messages[:-1]]
    assert chunks and all(set(m) == {"chunk"} for m in messages[:-1])
    done = messages[-1]["completion"]
    assert done["stop_reason"] == "STOP_REASON_LENGTH"
    assert done["text"] == "".join(c["text"] for c in chunks) != ""
    assert done["token_ids"] == [t for c in chunks for t in c["token_ids"]]
    assert done["usage"]["completion_tokens"] == len(done["token_ids"]) == 8 == chunks[-1]["n_tokens"]
    assert done["usage"]["prompt_tokens"] == chunks[0]["prompt_tokens"] > 0
    assert done["timings"]["total_ms"] > 0
    assert run.summary()["chunks"] == str(len(chunks))


def test_stop_after_cancels_the_stream(go_binary: Path, server: TestServer, llama: Llama) -> None:
    cancelled_before = request_count(server, "CANCELLED")
    completions_before = server.metrics.value("llama_crab_completions_total", {"stop_reason": "cancelled"})
    run = run_go(go_binary, server, "-json", "-stop-after", "3", "-max-tokens", "64", "-ignore-eos", PROMPT)
    assert run.returncode == 0, run.stderr
    messages = run.messages()
    # Exactly the requested number of chunks, then the Completion of what was delivered.
    assert [set(m) for m in messages] == [{"chunk"}] * 3 + [{"completion"}]
    chunks = [m["chunk"] for m in messages[:3]]
    done = messages[3]["completion"]
    assert done["stop_reason"] == "STOP_REASON_CANCELLED"
    assert done["text"] == "".join(c["text"] for c in chunks) != ""
    assert done["token_ids"] == [t for c in chunks for t in c["token_ids"]]
    assert done["usage"]["completion_tokens"] == len(done["token_ids"]) == chunks[-1]["n_tokens"] < 64
    assert done["usage"]["prompt_tokens"] == chunks[0]["prompt_tokens"] > 0
    summary = run.summary()
    assert summary["stop_reason"] == "STOP_REASON_CANCELLED" and summary["chunks"] == "3"
    # The cancel reached the server: counted as CANCELLED, and the slot was freed.
    assert wait_until(lambda: request_count(server, "CANCELLED") == cancelled_before + 1)
    assert wait_until(
        lambda: server.metrics.value("llama_crab_completions_total", {"stop_reason": "cancelled"})
        == completions_before + 1
    )
    assert wait_until(lambda: llama.metrics().busy_slots == 0)


def test_invalid_argument_names_the_field(go_binary: Path, server: TestServer) -> None:
    run = run_go(go_binary, server, "-max-tokens", "0", PROMPT)
    assert run.returncode == 1
    assert run.stdout == ""
    assert "InvalidArgument" in run.stderr and "[field max_tokens:" in run.stderr, run.stderr
