"""The installed packages type-check under mypy --strict (stubs for the extension and the
generated protos included). Run from a scratch dir so the installed copies are checked."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest


def test_mypy_strict(tmp_path: Path) -> None:
    pytest.importorskip("mypy")
    proc = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--no-incremental", "-p", "llama_crab", "-p", "llama_crab_client"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]


def test_extension_ships_its_stub() -> None:
    import llama_crab

    pkg = Path(llama_crab.__file__).parent
    assert (pkg / "_engine.pyi").is_file()
    assert (pkg / "py.typed").is_file()
