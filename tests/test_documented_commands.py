"""Every command the README and docs/ tell a user to run at least starts on this install, so
the docs cannot drift from what works.

A command in a fenced shell block is checked with its documented arguments: the program
parses them exactly as it would, then stops before doing any work (the "dry run" below), so
a renamed flag, a removed scenario or an import that fails on a fresh install is caught.
A program named in running text (often with placeholders) must at least answer `--help`.
The README's install and test commands themselves run in .ci/run; `llama-crab models pull`
runs for real in test_models.py, and the examples in test_lowlevel.py.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", ROOT / "clients" / "python" / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```(?:sh|bash|shell|console)\n(.*?)^```", re.S | re.M)
INLINE = re.compile(r"`((?:python (?:bench|examples)/\w+\.py|scripts/\w+\.sh|llama-crab(?:-client)?)(?:\s[^`]*)?)`")
ENV_ASSIGNMENT = re.compile(r"^[A-Z_][A-Z0-9_]*=")

# Runs `program` with the documented argv, but every argparse parser stops (exit 0) right
# after it accepted the arguments: the imports, the parser and the values are the real ones.
DRY_RUN = """
import argparse, runpy, sys
parse = argparse.ArgumentParser.parse_args
def parse_then_stop(self, args=None, namespace=None):
    parse(self, args, namespace)
    print("dry run: arguments accepted")
    raise SystemExit(0)
argparse.ArgumentParser.parse_args = parse_then_stop
kind, target, *argv = sys.argv[1:]
if kind == "module":
    sys.argv = [target, *argv]
    sys.exit(__import__(target, fromlist=["main"]).main(argv))
sys.argv = [target, *argv]
sys.path.insert(0, target.rsplit("/", 1)[0])
runpy.run_path(target, run_name="__main__")
raise SystemExit("dry run: the program parsed no arguments")
"""
CONSOLE_SCRIPTS = {"llama-crab": "llama_crab.cli", "llama-crab-client": "llama_crab_client.cli"}


@dataclass(frozen=True)
class Documented:
    where: str
    env: tuple[tuple[str, str], ...]
    argv: tuple[str, ...]

    def __str__(self) -> str:
        return f"{self.where}: {' '.join([f'{k}={v}' for k, v in self.env] + list(self.argv))}"


def shell_lines(text: str) -> list[str]:
    lines: list[str] = []
    for block in FENCE.findall(text):
        pending = ""
        for raw in block.splitlines():
            if raw.rstrip().endswith("\\"):
                pending += raw.rstrip()[:-1] + " "
                continue
            lines.append(pending + raw)
            pending = ""
    return lines


def project_command(words: list[str]) -> bool:
    if not words:
        return False
    head = words[0]
    if head in CONSOLE_SCRIPTS or head.startswith("scripts/"):
        return True
    return head == "python" and len(words) > 1 and (words[1].startswith(("bench/", "examples/")) or words[1:3] == ["-m", "pytest"])


def split_command(line: str, where: str) -> list[Documented]:
    out = []
    # `a && b`, `a; b`: each part is a command of its own (the README's install lines are not
    # project commands and drop out below).
    for part in re.split(r"&&|;|\|", line):
        try:
            words = shlex.split(part, comments=True)
        except ValueError:
            continue
        words = [w for w in words if w != "&"]
        env = []
        while words and ENV_ASSIGNMENT.match(words[0]):
            name, _, value = words.pop(0).partition("=")
            env.append((name, value))
        if project_command(words) and "$" not in part:
            out.append(Documented(where, tuple(env), tuple(words)))
    return out


def fenced_commands() -> list[Documented]:
    found: list[Documented] = []
    for doc in DOCS:
        for line in shell_lines(doc.read_text()):
            found += split_command(line, str(doc.relative_to(ROOT)))
    return sorted(set(found), key=str)


def inline_programs() -> dict[str, str]:
    """Each program named in running text (`python bench/x.py`, `scripts/x.sh`,
    `llama-crab sub ...` as its subcommand), with the first doc that names it."""
    found: dict[str, str] = {}
    for doc in DOCS:
        for span in INLINE.findall(doc.read_text()):
            words = span.split()
            program = words[1] if words[0] == "python" else words[0]
            if program in CONSOLE_SCRIPTS and len(words) > 1 and re.fullmatch(r"[a-z]+", words[1]):
                program = f"{program} {words[1]}"
            found.setdefault(program, str(doc.relative_to(ROOT)))
    return dict(sorted(found.items()))


def run(argv: list[str], env: tuple[tuple[str, str], ...] = ()) -> subprocess.CompletedProcess[str]:
    environ = {**os.environ, **dict(env)}
    return subprocess.run(argv, cwd=ROOT, env=environ, capture_output=True, text=True, timeout=300)


FENCED = fenced_commands()
INLINE_PROGRAMS = inline_programs()


def test_the_docs_name_the_commands_this_checks() -> None:
    """The extraction itself works: the commands the README shows are among those checked."""
    argv = {c.argv for c in FENCED}
    assert ("llama-crab", "models", "pull", "qwen2.5-coder-0.5b") in argv
    assert ("scripts/sanitize.sh",) in argv
    assert ("python", "bench/soak.py") in argv
    assert "bench/run.py" in INLINE_PROGRAMS and "llama-crab serve" in INLINE_PROGRAMS


@pytest.mark.parametrize("command", FENCED, ids=str)
def test_documented_command_starts(command: Documented) -> None:
    argv = list(command.argv)
    if argv[0].startswith("scripts/"):
        syntax = run(["bash", "-n", argv[0]])
        assert syntax.returncode == 0, syntax.stderr
        result = run(["bash", argv[0], "--help"], command.env)
        assert result.returncode == 0 and "scripts/" in result.stdout, f"{command}\n{result.stdout}{result.stderr}"
        return
    if argv[:3] == ["python", "-m", "pytest"]:
        result = run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", *argv[3:]], command.env)
        collected = re.search(r"^(\d+) tests? collected", result.stdout, re.M)
        assert result.returncode == 0 and collected and int(collected.group(1)) > 0, (
            f"{command}\n{result.stdout[-2000:]}{result.stderr[-2000:]}"
        )
        return
    if argv[0] in CONSOLE_SCRIPTS:
        dry = [sys.executable, "-c", DRY_RUN, "module", CONSOLE_SCRIPTS[argv[0]], *argv[1:]]
    else:
        dry = [sys.executable, "-c", DRY_RUN, "script", argv[1], *argv[2:]]
    result = run(dry, command.env)
    assert result.returncode == 0 and "dry run: arguments accepted" in result.stdout, (
        f"{command}\n{result.stdout[-2000:]}{result.stderr[-2000:]}"
    )


@pytest.mark.parametrize("program", INLINE_PROGRAMS)
def test_documented_program_answers_help(program: str) -> None:
    doc = INLINE_PROGRAMS[program]
    if program.startswith("scripts/"):
        argv = ["bash", program, "--help"]
    elif program.split()[0] in CONSOLE_SCRIPTS:
        name, *sub = program.split()
        argv = [sys.executable, "-m", CONSOLE_SCRIPTS[name], *sub, "--help"]
    else:
        argv = [sys.executable, program, "--help"]
    assert (ROOT / program).exists() or not program.startswith(("bench/", "examples/", "scripts/")), (
        f"{doc} names {program}, which does not exist"
    )
    if program.startswith("examples/"):
        return  # examples take a model, not flags, and run for real in test_lowlevel.py
    result = run(argv)
    assert result.returncode == 0 and "usage" in (result.stdout + result.stderr).lower(), (
        f"{doc}: {' '.join(argv)}\n{result.stdout[-2000:]}{result.stderr[-2000:]}"
    )
