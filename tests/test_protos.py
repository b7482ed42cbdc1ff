"""The gRPC contract lints clean under buf's default (STANDARD) rules, and no generated stub
is committed. buf comes from the npm package @bufbuild/buf, installed once into a cache."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
BUF_VERSION = "1.75.0"


def buf_binary() -> Path:
    tools = Path(os.environ.get("LLAMA_CRAB_TOOLS", Path.home() / ".cache" / "llama-crab" / "tools")) / f"buf-{BUF_VERSION}"
    binary = tools / "node_modules" / ".bin" / "buf"
    if not binary.exists():
        npm = shutil.which("npm")
        if npm is None:
            pytest.fail("npm is needed to install @bufbuild/buf for the proto lint")
        tools.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            [npm, "install", "--prefix", str(tools), "--no-audit", "--no-fund", f"@bufbuild/buf@{BUF_VERSION}"],
            check=True,
            capture_output=True,
            timeout=300,
        )
    return binary


def test_buf_lint_clean() -> None:
    proc = subprocess.run([str(buf_binary()), "lint", "protos"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_no_generated_stubs_committed() -> None:
    if not (REPO / ".git").exists():
        pytest.skip("not a git checkout")
    tracked = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    # Python (grpcio-tools), Go (protoc-gen-go) and TypeScript (protoc-gen-es) stubs are all
    # generated at build time.
    assert not [f for f in tracked if "_pb2" in f or f.endswith(".pb.go") or f.endswith("_pb.ts") or f.endswith("_pb.js")]
    assert not [f for f in tracked if f.startswith("third_party/llama.cpp/")]
