"""Small helpers shared by the test modules (pytest puts this folder on sys.path)."""

from __future__ import annotations

import asyncio
import fcntl
import os
import shutil
import subprocess
import threading
import time
from collections.abc import Coroutine, Sequence
from pathlib import Path
from typing import Any, Callable, Optional, TypeVar

import pytest

T = TypeVar("T")

APT_LOCK = Path("/tmp/llama-crab-apt.lock")


def _which(binary: str) -> Optional[str]:
    return shutil.which(binary) or next(
        (p for p in (f"/usr/sbin/{binary}", f"/usr/bin/{binary}") if os.path.exists(p)), None
    )


def ensure_debian_packages(packages: Sequence[str], ready: Callable[[], bool], what: str) -> None:
    """Install Debian's `packages` with apt-get unless `ready()` already holds (once, under a
    lock, for parallel sessions); `ready()` must hold afterwards. Skips, saying why, only
    where there is no apt-get or no root."""
    if ready():
        return
    if shutil.which("apt-get") is None:
        pytest.skip(f"{what} is missing and there is no apt-get for Debian's {' '.join(packages)}")
    if os.geteuid() != 0:
        pytest.skip(f"{what} is missing and apt-get needs root for Debian's {' '.join(packages)}")
    with APT_LOCK.open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not ready():
            env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
            subprocess.run(["apt-get", "update"], check=True, env=env, stdout=subprocess.DEVNULL, timeout=600)
            subprocess.run(
                ["apt-get", "install", "-y", "--no-install-recommends", *packages],
                check=True,
                env=env,
                stdout=subprocess.DEVNULL,
                timeout=600,
            )
    if not ready():
        raise RuntimeError(f"apt-get installed {' '.join(packages)}, but {what} is still missing")


def ensure_debian_tools(binaries: Sequence[str], packages: Sequence[str]) -> list[str]:
    """The paths of `binaries`, installed from Debian's `packages` when any is missing."""
    ensure_debian_packages(packages, lambda: all(_which(b) for b in binaries), ", ".join(binaries))
    return [p for p in (_which(b) for b in binaries) if p]


def wait_until(predicate: Callable[[], bool], timeout: float = 30.0) -> bool:
    """Poll `predicate` until true; a bounded wait, not a speed assertion."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.005)
    return predicate()


class LoopThread:
    """A long-lived event loop on its own thread: grpc.aio channels stay bound to one loop."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="conformance-aio", daemon=True)
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(120)
