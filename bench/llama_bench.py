"""The raw llama.cpp column: `llama-bench` from the pinned third_party/llama.cpp.

Found (in order) at --llama-bench / $LLAMA_BENCH; in the package build (`pip install .`
builds it next to the engine, build/<wheel tag>/bin/, with the very same ggml flags, so
that is the fairest comparison); in build/bench-llama/bin/; otherwise built there with
cmake from third_party/llama.cpp (provisioned first if absent).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, Optional

from common import run_measured

ROOT = Path(__file__).resolve().parent.parent
BUILD_DIR = ROOT / "build" / "bench-llama"
SOURCE_DIR = ROOT / "third_party" / "llama.cpp"

CMAKE_OPTIONS = (
    "-DCMAKE_BUILD_TYPE=Release",
    "-DLLAMA_BUILD_TOOLS=ON",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_SERVER=OFF",
    "-DLLAMA_OPENSSL=OFF",
    "-DLLAMA_CURL=OFF",
    "-DBUILD_SHARED_LIBS=OFF",
)


def _run(cmd: list[str]) -> None:
    print("+ " + " ".join(cmd), file=sys.stderr, flush=True)
    subprocess.run(cmd, check=True)


def build() -> Path:
    """Configure and build llama-bench into build/bench-llama (minutes on a small machine)."""
    if shutil.which("cmake") is None:
        raise RuntimeError("cmake is not installed; pass --llama-bench PATH or install cmake")
    if not (SOURCE_DIR / "CMakeLists.txt").is_file():
        _run([sys.executable, str(ROOT / "third_party" / "provision.py")])
    generator = ["-G", "Ninja"] if shutil.which("ninja") else []
    _run(["cmake", "-S", str(SOURCE_DIR), "-B", str(BUILD_DIR), *generator, *CMAKE_OPTIONS])
    _run(["cmake", "--build", str(BUILD_DIR), "--target", "llama-bench", "--parallel", str(os.cpu_count() or 1)])
    return BUILD_DIR / "bin" / "llama-bench"


def locate(explicit: Optional[str], allow_build: bool) -> Path:
    candidate = explicit or os.environ.get("LLAMA_BENCH")
    if candidate:
        path = Path(candidate)
        if not os.access(path, os.X_OK):
            raise RuntimeError(f"llama-bench {path} is not an executable file")
        return path
    package_builds = sorted(ROOT.glob("build/cp*/bin/llama-bench"), key=lambda p: p.stat().st_mtime, reverse=True)
    built = BUILD_DIR / "bin" / "llama-bench"
    for path in (*package_builds, built):
        if os.access(path, os.X_OK):
            return path
    if not allow_build:
        raise RuntimeError(f"no llama-bench at {built} (run without --no-build to build it)")
    return build()


def _shown(path: Path) -> str:
    resolved = path.resolve()
    return str(resolved.relative_to(ROOT)) if resolved.is_relative_to(ROOT) else str(path)


def pinned_commit() -> Optional[str]:
    """The llama.cpp commit third_party/llama.cpp.pin names (llama-bench's own build info
    reports whatever git repository encloses the source tree, which is not llama.cpp's)."""
    try:
        for line in (ROOT / "third_party" / "llama.cpp.pin").read_text().splitlines():
            key, _, value = line.split("#", 1)[0].partition("=")
            if key.strip() == "commit":
                return value.strip()[:12]
    except OSError:
        pass
    return None


def run(
    binary: Path, model: str, threads: int, n_prompt: int, n_predict: int, reps: int, timeout: float
) -> dict[str, Any]:
    """pp and tg tokens/s (mean over `reps`) plus llama-bench's peak RSS."""
    cmd = [
        str(binary), "-m", model, "-t", str(threads), "-p", str(n_prompt), "-n", str(n_predict),
        "-r", str(reps), "-o", "json",
    ]  # fmt: skip
    print("+ " + " ".join(cmd), file=sys.stderr, flush=True)
    code, out, err, peak_mb = run_measured(cmd, timeout)
    if code != 0:
        raise RuntimeError(f"llama-bench failed (exit {code}): {err.strip()[-1500:]}")
    tests = json.loads(out)
    result: dict[str, Any] = {"binary": _shown(binary), "pinned_commit": pinned_commit(), "peak_rss_mb": peak_mb}
    for test in tests:
        kind = "pp" if test["n_gen"] == 0 else "tg"
        result[f"{kind}_tps"] = float(test["avg_ts"])
        result[f"{kind}_tps_stddev"] = float(test["stddev_ts"])
        result[f"{kind}_tokens"] = int(test["n_prompt"] or test["n_gen"])
    return result
