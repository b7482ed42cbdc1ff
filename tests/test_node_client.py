"""The Node client (clients/node, @grpc/grpc-js) streams, chats, cancels and sees errors against a
live in-process server: the contract works from another language."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

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
    npm = shutil.which("npm")
    if npm is None or shutil.which("node") is None:
        pytest.skip("node/npm not installed")
    if not (NODE_DIR / "node_modules").is_dir():
        subprocess.run([npm, "ci", "--no-audit", "--no-fund"], cwd=NODE_DIR, check=True, capture_output=True, timeout=300)
    proc = subprocess.run(
        [npm, "test"],
        cwd=NODE_DIR,
        env={**os.environ, "LLAMA_CRAB_SERVER": server_address},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "# fail 0" in proc.stdout and "# skipped 0" in proc.stdout
