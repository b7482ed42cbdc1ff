"""Greedy output is token-identical to llama.cpp's own `examples/simple` built from the same
third_party/llama.cpp (CMake builds it next to the extension as `bin/llama-simple`)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from llama_crab import CompletionOptions, Llama, LlamaParams, StopReason

REPO = Path(__file__).resolve().parent.parent


def find_llama_simple() -> Path | None:
    override = os.environ.get("LLAMA_CRAB_LLAMA_SIMPLE")
    if override:
        return Path(override)
    found = sorted(REPO.glob("build/*/bin/llama-simple"), key=lambda p: p.stat().st_mtime)
    return found[-1] if found else None


@pytest.fixture(scope="module")
def llama_simple() -> Path:
    path = find_llama_simple()
    if path is None:
        if os.environ.get("CI"):
            pytest.fail("llama-simple was not built (LLAMA_CRAB_REFERENCE_TOOLS=ON builds it under build/*/bin)")
        pytest.skip("llama-simple not built; run the README's test command")
    return path


@pytest.mark.parametrize(
    ("prompt", "n_predict"),
    [("Hello my name is", 32), ("The three primary colours are", 48), ("def add(a, b):\n", 40)],
)
def test_greedy_matches_llama_simple(llama_simple: Path, model_path: str, prompt: str, n_predict: int) -> None:
    proc = subprocess.run(
        [str(llama_simple), "-m", model_path, "-n", str(n_predict), prompt],
        capture_output=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")[-2000:]
    out = proc.stdout.decode("utf-8")
    assert out.endswith("\n")
    out = out[:-1]

    # Same context shape as llama-simple: one sequence, n_ctx = prompt + n_predict (padded by llama.cpp).
    with Llama.load(LlamaParams(model_path).with_n_ctx(256).with_n_parallel(1)) as single:
        completion = single.create_completion(prompt, CompletionOptions(n_predict))
    # llama-simple prints the prompt's pieces, then every generated piece.
    assert out.endswith(completion.text), f"llama-simple: {out!r}\nllama-crab: {completion.text!r}"
    rendered_prompt = out[: len(out) - len(completion.text)]
    assert rendered_prompt.endswith(prompt)
    if completion.stop_reason is StopReason.LENGTH:
        assert len(completion.token_ids) == n_predict
    assert len(completion.text) > 0
