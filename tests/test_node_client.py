"""The typed Node client (clients/node: TypeScript, messages generated from protos/ by
protoc-gen-es, over @grpc/grpc-js) against a live in-process server: it builds with
`tsc --strict` over its sources, tests and examples, ships its .d.ts files, and its tests
stream, stop, chat with tool-call deltas, keep sessions and see typed errors. Node and npm
come from Debian when missing."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from helpers import ensure_debian_tools
from llama_crab import Llama
from llama_crab.server.testing import start_test_server

NODE_DIR = Path(__file__).resolve().parent.parent / "clients" / "node"


@pytest.fixture(scope="module")
def server_address(llama: Llama) -> Iterator[str]:
    server = start_test_server(llama)
    try:
        yield server.address
    finally:
        server.stop()


def test_node_client_against_live_server(server_address: str) -> None:
    _node, npm = ensure_debian_tools(["node", "npm"], ["nodejs", "npm"])
    if not (NODE_DIR / "node_modules").is_dir():
        subprocess.run([npm, "ci", "--no-audit", "--no-fund"], cwd=NODE_DIR, check=True, capture_output=True, timeout=600)
    proc = subprocess.run(
        [npm, "test"],  # generates the messages, builds with tsc (strict), runs the tests
        cwd=NODE_DIR,
        env={**os.environ, "LLAMA_CRAB_SERVER": server_address},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "# fail 0" in proc.stdout and "# skipped 0" in proc.stdout
    # The typed package: declarations for the API and the generated messages ship with it.
    for declaration in ("dist/src/index.d.ts", "dist/src/client.d.ts", "dist/gen/llama_crab/v1/llama_crab_pb.d.ts"):
        assert (NODE_DIR / declaration).is_file(), declaration
