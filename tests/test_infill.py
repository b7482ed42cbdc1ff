"""Fill in the middle on a real code model (qwen2.5-coder-0.5b): the prompt llama.cpp's
server builds from the vocabulary's FIM tokens, a middle that makes the file valid Python,
the indentation rule that ends it, the prefix cache, and every client."""

from __future__ import annotations

import ast
import asyncio
from collections.abc import Iterator

import pytest

from llama_crab import (
    CompletionOptions,
    Infill,
    InfillFile,
    InvalidArgumentError,
    Llama,
    LlamaParams,
    StopReason,
    _engine,
)
from llama_crab.models import ensure
from llama_crab.server.testing import start_test_server
from llama_crab_client import AsyncClient, Client

# (prefix, suffix): a body between a signature and its return.
BODIES = (
    ("def fib(n):\n    ", "\n    return result\n"),
    ("def add(a, b):\n    ", "\n    return c\n"),
    ('import os\n\n\ndef python_files(path):\n    """Python files under path."""\n    ', "\n    return files\n"),
)
GREEDY = CompletionOptions(128, cache_prompt=False)


@pytest.fixture(scope="module")
def coder() -> Iterator[Llama]:
    with Llama.load(LlamaParams(ensure("qwen2.5-coder-0.5b"), n_ctx=4096, n_parallel=2)) as llama:
        yield llama


@pytest.mark.parametrize(("prefix", "suffix"), BODIES)
def test_the_middle_makes_valid_python_and_ends_with_its_block(coder: Llama, prefix: str, suffix: str) -> None:
    c = coder.create_completion(Infill(prefix, suffix, indent=4), GREEDY)
    assert c.text.strip(), c.text
    ast.parse(prefix + c.text + suffix)
    # The block's end was found (not the token limit), and no line left the body.
    assert c.stop_reason == StopReason.EOS
    assert all(line.startswith("    ") or not line for line in c.text.split("\n")[1:])


def test_without_the_indentation_rule_the_model_runs_on(coder: Llama) -> None:
    prefix, suffix = BODIES[0]
    bounded = coder.create_completion(Infill(prefix, suffix, indent=4), GREEDY)
    free = coder.create_completion(Infill(prefix, suffix), GREEDY)
    assert free.text.startswith(bounded.text) and len(free.text) > len(bounded.text)


def test_the_prompt_is_llama_servers_fim_layout(coder: Llama) -> None:
    infill = Infill("def f():\n    ", "\n    return x\n", prompt="x =", extra=(InfillFile("util.py", "X = 1\n"),), filename="main.py")
    native = _engine.InfillInput()
    native.prefix, native.suffix, native.prompt, native.filename = infill.prefix, infill.suffix, infill.prompt, infill.filename
    native.extra = [("util.py", "X = 1\n")]
    text = coder.detokenize(coder._engine.infill_prompt(native, 16))
    assert text == (
        "<|repo_name|>myproject\n<|file_sep|>util.py\nX = 1\n<|file_sep|>main.py\n"
        "<|fim_prefix|>def f():\n    <|fim_suffix|>\n    return x\n<|fim_middle|>x ="
    )


def test_a_long_prefix_keeps_its_end(coder: Llama) -> None:
    # 3/4 of a 512-token batch for the prefix: the code nearest the cursor survives.
    lines = "".join(f"v{i} = {i}\n" for i in range(400))
    native = _engine.InfillInput()
    native.prefix, native.suffix = lines + "def last():\n    ", "\n"
    text = coder.detokenize(coder._engine.infill_prompt(native, 16))
    assert "def last():" in text and "v399 = 399" in text and "v0 = 0\n" not in text
    assert len(coder.tokenize(text, add_special=False)) <= 512 + 16


def test_a_shared_prefix_is_served_from_the_cache(coder: Llama) -> None:
    # An editor's requests repeat the file around the cursor: the second prefills only the tail.
    context = tuple(InfillFile(f"mod{i}.py", f"def helper_{i}(x):\n    return x + {i}\n") for i in range(20))
    first = coder.create_completion(Infill("def g(y):\n    ", "\n    return z\n", extra=context, indent=4), CompletionOptions(48))
    second = coder.create_completion(Infill("def g(y):\n    z =", "\n    return z\n", extra=context, indent=4), CompletionOptions(48))
    assert second.usage.cached_tokens >= first.usage.prompt_tokens - 8
    assert first.text and second.text


def test_a_model_without_fim_tokens_is_refused(llama: Llama) -> None:
    assert not llama.model_info().supports_infill
    with pytest.raises(InvalidArgumentError) as e:
        llama.create_completion(Infill("def f():\n    ", "\n"), CompletionOptions(8))
    assert e.value.field == "infill" and "fill-in-the-middle" in str(e.value)


@pytest.mark.parametrize(
    ("infill", "field"),
    [
        (Infill(""), "infill.prefix"),
        (Infill("x", indent=-1), "infill.indent"),
        (Infill("x", indent=5000), "infill.indent"),
        (Infill("x", extra=tuple(InfillFile("f", "") for _ in range(65))), "infill.extra"),
        (Infill("x" * (4 * 1024 * 1024 + 1)), "infill"),
    ],
)
def test_bad_infills_are_refused_naming_the_field(coder: Llama, infill: Infill, field: str) -> None:
    with pytest.raises(InvalidArgumentError) as e:
        coder.create_completion(infill, CompletionOptions(8))
    assert e.value.field == field


def test_every_client_gets_the_same_middle(coder: Llama) -> None:
    infill = Infill(*BODIES[0], indent=4)
    local = coder.create_completion(infill, GREEDY)
    with start_test_server(coder) as server, Client(server.address) as client:
        assert client.model_info().supports_infill
        remote = client.create_completion(infill, GREEDY)
        chunks: list[str] = []
        streamed = client.create_completion_stream(infill, GREEDY, lambda c: chunks.append(c.text))
        with pytest.raises(InvalidArgumentError) as e:
            client.create_completion(Infill("x", indent=-1), GREEDY)
        assert e.value.field == "infill.indent"

        async def via_async() -> str:
            async with AsyncClient(server.address) as aclient:
                return (await aclient.create_completion(infill, GREEDY)).text

        async_text = asyncio.run(via_async())
    assert remote.text == streamed.text == "".join(chunks) == async_text == local.text
    assert remote.stop_reason == StopReason.EOS


# ---- the indentation rule on exact bytes ----------------------------------------------------
def push_all(stream: _engine.TextStream, pieces: list[str]) -> tuple[str, bool]:
    out = ""
    for piece in pieces:
        emit, stopped, _ = stream.push(piece.encode())
        out += emit
        if stopped:
            return out, True
    return out + stream.flush(), False


@pytest.mark.parametrize(
    ("indent", "pieces", "text", "stopped"),
    [
        # The first line is the cursor's own: never cut.
        (4, ["x = 1", "\n    y = 2\n", "z = 3"], "x = 1\n    y = 2\n", True),
        # A blank line ends the block.
        (4, ["a\n", "    b\n", "\n    c"], "a\n    b\n", True),
        # Tabs count as indentation; deeper lines pass.
        (1, ["a\n\tb\n", "\t\tc\n", "\t d"], "a\n\tb\n\t\tc\n\t d", False),
        (2, ["a\n\tb"], "a\n\t", True),
        # The cut may fall inside a token.
        (4, ["if x:\n        return 1\n    else", ":\nprint(2)"], "if x:\n        return 1\n    else:\n", True),
        # Off.
        (0, ["a\n", "b\n\nc"], "a\nb\n\nc", False),
    ],
)
def test_the_indentation_rule(indent: int, pieces: list[str], text: str, stopped: bool) -> None:
    assert push_all(_engine.TextStream([], indent), pieces) == (text, stopped)


def test_an_earlier_stop_sequence_wins_over_the_rule() -> None:
    stream = _engine.TextStream(["STOP"], 4)
    emit, stopped, seq = stream.push(b"ab STOP\nc")
    assert (emit, stopped, seq) == ("ab ", True, "STOP")
