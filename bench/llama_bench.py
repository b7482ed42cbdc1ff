"""The raw llama.cpp columns: `llama-bench`, `llama-server` and `llama-batched-bench` from
the pinned third_party/llama.cpp.

llama-bench is found (in order) at --llama-bench / $LLAMA_BENCH; in the package build
(`pip install .` builds it next to the engine, build/<wheel tag>/bin/, with the very same
ggml flags, so that is the fairest comparison); in build/bench-llama/bin/; otherwise built
there with cmake from third_party/llama.cpp (provisioned first if absent). The package
build configures llama.cpp with LLAMA_BUILD_SERVER forced OFF, so `llama-server` always
comes from build/bench-llama, configured to match the package's ggml build (Release,
static, position-independent, GGML_NATIVE, OpenMP: the defaults both share) and with the
server's web UI left out (no npm, no download: the build works offline);
`llama-batched-bench` from the package build if someone built it there, else from
build/bench-llama. One `build()` makes all three.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
from collections.abc import Sequence
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
    "-DLLAMA_BUILD_SERVER=ON",
    "-DLLAMA_BUILD_APP=OFF",
    # The server's web UI: no npm build, no download of prebuilt assets (no network needed);
    # llama-server then embeds an empty asset table, and the bench runs it with --no-webui.
    "-DLLAMA_BUILD_UI=OFF",
    "-DLLAMA_USE_PREBUILT_UI=OFF",
    "-DLLAMA_OPENSSL=OFF",
    "-DLLAMA_CURL=OFF",
    "-DBUILD_SHARED_LIBS=OFF",
    "-DCMAKE_POSITION_INDEPENDENT_CODE=ON",  # as the package build (ggml linked into a Python extension)
    # The package build's compiler flags beyond ggml's own (AMX off: see the file).
    f"-DCMAKE_PROJECT_INCLUDE={ROOT / 'cmake' / 'no_amx.cmake'}",
)
TARGETS = ("llama-bench", "llama-server", "llama-batched-bench")


def _run(cmd: list[str]) -> None:
    print("+ " + " ".join(cmd), file=sys.stderr, flush=True)
    subprocess.run(cmd, check=True)


def build(tool: str = "llama-bench") -> Path:
    """Configure and build every tool of TARGETS into build/bench-llama (minutes on a small
    machine; incremental after that); returns `tool`'s path."""
    if shutil.which("cmake") is None:
        raise RuntimeError("cmake is not installed; pass --llama-bench PATH or install cmake")
    if not (SOURCE_DIR / "CMakeLists.txt").is_file():
        _run([sys.executable, str(ROOT / "third_party" / "provision.py")])
    generator = ["-G", "Ninja"] if shutil.which("ninja") else []
    _run(["cmake", "-S", str(SOURCE_DIR), "-B", str(BUILD_DIR), *generator, *CMAKE_OPTIONS])
    _run(["cmake", "--build", str(BUILD_DIR), "--parallel", str(os.cpu_count() or 1), "--target", *TARGETS])
    return BUILD_DIR / "bin" / tool


def locate(explicit: Optional[str], allow_build: bool, tool: str = "llama-bench") -> Path:
    """`tool`'s binary: `explicit` (or $LLAMA_BENCH / $LLAMA_SERVER / $LLAMA_BATCHED_BENCH),
    the package build's (not for llama-server), build/bench-llama's, or built there."""
    candidate = explicit or os.environ.get(tool.upper().replace("-", "_"))
    if candidate:
        path = Path(candidate)
        if not os.access(path, os.X_OK):
            raise RuntimeError(f"{tool} {path} is not an executable file")
        return path
    package_builds = sorted(ROOT.glob(f"build/cp*/bin/{tool}"), key=lambda p: p.stat().st_mtime, reverse=True)
    built = BUILD_DIR / "bin" / tool
    for path in (*package_builds, built):
        if os.access(path, os.X_OK):
            return path
    if not allow_build:
        raise RuntimeError(f"no {tool} at {built} (run without --no-build to build it)")
    return build(tool)


def shown(path: Path) -> str:
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
    result: dict[str, Any] = {"binary": shown(binary), "pinned_commit": pinned_commit(), "peak_rss_mb": peak_mb}
    for test in tests:
        kind = "pp" if test["n_gen"] == 0 else "tg"
        result[f"{kind}_tps"] = float(test["avg_ts"])
        result[f"{kind}_tps_stddev"] = float(test["stddev_ts"])
        result[f"{kind}_tokens"] = int(test["n_prompt"] or test["n_gen"])
    return result


class BatchedBench:
    """`llama-batched-bench` runs, one `run()` at a time (so they can be interleaved with other
    measurements), then `summary()`. Each run: for each B in `batch_sizes`, B sequences of an
    `n_prompt`-token prompt each, then `n_predict` decode steps of all B at once. S_TG is
    B * n_predict / decode time: the aggregate decode limit of this build, no sampling, no
    detokenizing, no serving. The engine settings are the servers': one context of `n_ctx`,
    a KV cache per sequence, batch 512, flash attention auto."""

    def __init__(
        self,
        binary: Path,
        model: str,
        threads: int,
        n_ctx: int,
        n_prompt: int,
        n_predict: int,
        batch_sizes: Sequence[int],
        timeout: float,
    ) -> None:
        self.binary = binary
        self.n_prompt = n_prompt
        self.n_predict = n_predict
        self.batch_sizes = list(batch_sizes)
        self.timeout = timeout
        self.cmd = [
            str(binary), "-m", model, "-t", str(threads), "-tb", str(threads), "-c", str(n_ctx), "-b", "512",
            "-ub", "512", "-fa", "auto", "--no-kv-unified", "-npp", str(n_prompt), "-ntg", str(n_predict),
            "-npl", ",".join(str(b) for b in batch_sizes), "--output-format", "jsonl",
        ]  # fmt: skip
        self.runs: list[list[dict[str, Any]]] = []
        self.peak_rss_mb = 0.0

    def run(self) -> None:
        print("+ " + " ".join(self.cmd), file=sys.stderr, flush=True)
        code, out, err, peak_mb = run_measured(self.cmd, self.timeout)
        if code != 0:
            raise RuntimeError(f"llama-batched-bench failed (exit {code}): {err.strip()[-1500:]}")
        self.peak_rss_mb = max(self.peak_rss_mb, peak_mb)
        # The JSON lines go to the log (stderr here, stdout in other versions): take them from both.
        rows = [json.loads(line) for line in (out + "\n" + err).splitlines() if line.startswith("{")]
        if sorted(int(r["pl"]) for r in rows) != sorted(self.batch_sizes):
            raise RuntimeError(f"llama-batched-bench reported B = {[r['pl'] for r in rows]}, not {self.batch_sizes}")
        self.runs.append(rows)

    def summary(self) -> dict[str, Any]:
        """Per B, the medians over the runs of S_TG, S_PP and their times, and S_TG's range."""
        if not self.runs:
            raise RuntimeError("llama-batched-bench: no run finished")
        per_b: dict[str, Any] = {}
        for b in self.batch_sizes:
            rows = [r for run in self.runs for r in run if int(r["pl"]) == b]
            per_b[str(b)] = {
                key: statistics.median(float(r[key]) for r in rows) for key in ("speed_tg", "speed_pp", "t_tg", "t_pp")
            }
            tg = [float(r["speed_tg"]) for r in rows]
            per_b[str(b)]["speed_tg_range"] = [min(tg), max(tg)]
        return {
            "binary": shown(self.binary),
            "pinned_commit": pinned_commit(),
            "n_prompt": self.n_prompt,
            "n_predict": self.n_predict,
            "reps": len(self.runs),
            "batch": per_b,
            "peak_rss_mb": self.peak_rss_mb,
            "settings": {k: self.runs[0][0][k] for k in ("n_kv_max", "n_batch", "n_ubatch", "flash_attn", "n_threads")},
        }
