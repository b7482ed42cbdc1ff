"""`llama-crab chat` driven in a real terminal (tmux): turns stream and the prompt comes
back, /save and /reset act on the history, Ctrl-C stops a streaming reply (the delivered
part stays in the history) and only re-prompts at the prompt, Ctrl-D exits with 0.

The local backend runs the real default model; no sleeps are assertions, every wait polls
the pane with a bound."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import wait_until

pytestmark = pytest.mark.skipif(
    shutil.which("tmux") is None, reason="tmux is not installed (the chat REPL is driven in a real terminal)"
)

SYSTEM = "You are a helpful assistant."
WAIT_S = 30.0  # bound of each wait; turns take well under a second with this model


def _chat_command() -> list[str]:
    # The installed console script, next to this interpreter; else the same entry point.
    script = Path(sys.executable).parent / "llama-crab"
    return [str(script)] if script.is_file() else [sys.executable, "-m", "llama_crab.cli"]


class Terminal:
    """One tmux pane (on a private tmux server) running `llama-crab chat ...`."""

    def __init__(self, tmp_path: Path, name: str, args: list[str]) -> None:
        self.socket = f"llama-crab-test-{os.getpid()}-{name}"
        self.name = name
        self.exit_file = tmp_path / f"{name}.exit"
        command = f"{shlex.join(_chat_command() + ['chat', *args])}; echo EXIT=$? > {shlex.quote(str(self.exit_file))}"
        self._tmux(
            "-f", "/dev/null", "new-session", "-d", "-s", name, "-x", "200", "-y", "50", "-c", str(tmp_path), command
        )
        self._tmux("set-option", "-t", name, "remain-on-exit", "on")  # the pane stays readable after the exit
        self._socket_path = self._tmux("display-message", "-p", "#{socket_path}").strip()

    def _tmux(self, *args: str) -> str:
        proc = subprocess.run(["tmux", "-L", self.socket, *args], capture_output=True, text=True, timeout=10)
        assert proc.returncode == 0, f"tmux {args[0]}: {proc.stderr}"
        return proc.stdout

    def close(self) -> None:
        subprocess.run(["tmux", "-L", self.socket, "kill-server"], capture_output=True, timeout=10)
        if self._socket_path:
            Path(self._socket_path).unlink(missing_ok=True)

    def send(self, *keys: str) -> None:
        self._tmux("send-keys", "-t", self.name, *keys)

    def type_line(self, text: str) -> None:
        self._tmux("send-keys", "-t", self.name, "-l", text)  # literally, then Enter
        self.send("Enter")

    def lines(self) -> list[str]:
        """The whole pane, scrollback included, wrapped lines joined, trailing blanks dropped."""
        text = self._tmux("capture-pane", "-p", "-J", "-S", "-", "-t", self.name)
        lines = [line.rstrip() for line in text.splitlines()]
        while lines and not lines[-1]:
            lines.pop()
        return lines

    def text(self) -> str:
        return "\n".join(self.lines())

    def prompts(self) -> int:
        return sum(1 for line in self.lines() if line == ">" or line.startswith("> "))

    def at_prompt(self, count: int) -> bool:
        """The `count`-th prompt is shown and waits for input (the last line is a bare prompt)."""
        lines = self.lines()
        return bool(lines) and lines[-1] == ">" and self.prompts() >= count

    def wait_prompt(self, count: int) -> None:
        assert wait_until(lambda: self.at_prompt(count), WAIT_S), (
            f"no prompt #{count} within {WAIT_S}s:\n{self.text()[-3000:]}"
        )

    def reply_after(self, typed: str) -> str:
        """What was printed between the prompt line with `typed` and the next prompt."""
        lines = self.lines()
        start = max(i for i, line in enumerate(lines) if line == f"> {typed}")
        out = []
        for line in lines[start + 1 :]:
            if line == ">" or line.startswith("> "):
                break
            out.append(line)
        return "\n".join(out).strip()

    def exit_status(self) -> str | None:
        return self.exit_file.read_text().strip() if self.exit_file.exists() else None


@pytest.fixture
def terminals(tmp_path: Path) -> Iterator[list[Terminal]]:
    opened: list[Terminal] = []
    yield opened
    for t in opened:
        t.close()


def _open(terminals: list[Terminal], tmp_path: Path, name: str, args: list[str]) -> Terminal:
    t = Terminal(tmp_path, name, args)
    terminals.append(t)
    t.wait_prompt(1)  # the model loaded
    return t


def _saved(path: Path) -> list[dict[str, str]]:
    data = json.loads(path.read_text(encoding="utf-8"))
    assert isinstance(data, list)
    return data


def test_turns_save_reset_and_exit(model_path: str, tmp_path: Path, terminals: list[Terminal]) -> None:
    t = _open(terminals, tmp_path, "turns", ["--model", model_path, "--max-tokens", "32", "--system", SYSTEM])

    questions = ["Hi! What can you do?", "Tell me one fact about the sea."]
    replies = []
    for n, question in enumerate(questions, start=2):
        t.type_line(question)
        t.wait_prompt(n)
        reply = t.reply_after(question)
        assert reply, f"no reply to {question!r}:\n{t.text()}"
        replies.append(reply)

    first = tmp_path / "first.json"
    t.type_line(f"/save {first}")
    t.wait_prompt(4)
    assert "saved 4 messages and the system prompt" in t.text()
    saved = _saved(first)
    assert [m["role"] for m in saved] == ["system", "user", "assistant", "user", "assistant"]
    assert saved[0]["content"] == SYSTEM
    assert [saved[1]["content"], saved[3]["content"]] == questions
    for message, shown in zip((saved[2], saved[4]), replies):
        assert message["content"].strip()
        assert " ".join(message["content"].split())[:20] in " ".join(shown.split())  # what streamed is kept

    t.type_line("/reset")
    t.wait_prompt(5)
    assert "conversation reset" in t.text()
    second = tmp_path / "second.json"
    t.type_line(f"/save {second}")
    t.wait_prompt(6)
    assert _saved(second) == [{"role": "system", "content": SYSTEM}]

    t.type_line("/load /nonexistent/history.json")  # an error is a message, not a traceback
    t.wait_prompt(7)
    assert "cannot load /nonexistent/history.json" in t.text()

    t.send("C-c")  # at the prompt: a fresh prompt, still running
    t.wait_prompt(8)
    assert t.exit_status() is None

    t.send("C-d")
    assert wait_until(lambda: t.exit_status() is not None, WAIT_S), t.text()
    assert t.exit_status() == "EXIT=0"
    assert "Traceback" not in t.text()


def test_ctrl_c_stops_a_streaming_reply(model_path: str, tmp_path: Path, terminals: list[Terminal]) -> None:
    max_tokens = 2000
    t = _open(terminals, tmp_path, "cancel", ["--model", model_path, "--max-tokens", str(max_tokens), "--verbose"])

    questions = ["Write a very long story about a dragon and a knight, with many chapters.", "Go on, tell me more."]
    for n, question in enumerate(questions, start=1):
        t.type_line(question)
        # Let it stream a little (a long reply: it cannot finish first), then stop it.
        assert wait_until(lambda: len(t.reply_after(question)) > 40, WAIT_S), t.text()
        t.send("C-c")
        t.wait_prompt(n + 1)
        text = t.text()
        assert "Traceback" not in text and "KeyboardInterrupt" not in text, text
        assert text.count("finish: cancelled") == n, text  # stopped, not run to its end
        assert t.exit_status() is None  # Ctrl-C did not end the REPL

    # The replies as delivered joined the history.
    path = tmp_path / "cancelled.json"
    t.type_line(f"/save {path}")
    t.wait_prompt(4)
    saved = _saved(path)
    assert [m["role"] for m in saved] == ["user", "assistant", "user", "assistant"]
    for question, message in zip(questions, saved[1::2]):
        shown = " ".join(t.reply_after(question).replace("^C", "").split())
        assert message["content"].strip()
        assert " ".join(message["content"].split()) in shown

    t.send("C-d")
    assert wait_until(lambda: t.exit_status() is not None, WAIT_S), t.text()
    assert t.exit_status() == "EXIT=0"
