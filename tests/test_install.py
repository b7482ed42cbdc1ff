"""The README's install works on any day: pinned builds, runtime floors that exist and mean
something, and both packages' requirements resolvable against the package index as it is
today, from nothing (not from whatever this environment happens to hold).

The index tests need the network; they skip, saying so, only when no index answers.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import venv
from functools import cache
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - the suite's own interpreter is 3.11+
    tomllib = pytest.importorskip("tomli")

ROOT = Path(__file__).resolve().parent.parent
CLIENT = ROOT / "clients" / "python"
SERVER_DIST, CLIENT_DIST = "llama-crab", "llama-crab-client"
# Plenty for one resolution on a slow link; a hung index is a failure, not a wait.
PIP_TIMEOUT_S = 600


# ---- what the installed packages declare -----------------------------------------------------


def declared(dist: str, extras: tuple[str, ...] = ()) -> list[Requirement]:
    """`dist`'s requirements from its installed (built) metadata that apply on this machine:
    the runtime ones, plus those of `extras`. Our own packages are left out (each is
    resolved from its own metadata)."""
    out = []
    for text in metadata.requires(dist) or []:
        req = Requirement(text)
        if req.name in (SERVER_DIST, CLIENT_DIST):
            continue
        if req.marker is not None and not any(req.marker.evaluate({"extra": e}) for e in ("", *extras)):
            continue
        out.append(req)
    return out


def without_marker(req: Requirement) -> str:
    """The requirement as pip should take it here: its marker already held on this machine
    (pip would drop an `extra == "test"` one, having no extra to match)."""
    extras = f"[{','.join(sorted(req.extras))}]" if req.extras else ""
    return f"{req.name}{extras}{req.specifier}"


def floor(req: Requirement) -> Version:
    floors = [Version(s.version) for s in req.specifier if s.operator == ">="]
    assert len(floors) == 1, f"{req}: one '>=' floor expected"
    return floors[0]


def runtime_requirements() -> list[Requirement]:
    return declared(CLIENT_DIST) + declared(SERVER_DIST)


def test_build_requirements_are_pinned_or_bounded() -> None:
    """A release tomorrow must not change what today's source builds into."""
    for pyproject in (ROOT / "pyproject.toml", CLIENT / "pyproject.toml"):
        requires = tomllib.loads(pyproject.read_text())["build-system"]["requires"]
        for text in requires:
            spec = Requirement(text).specifier
            pinned = any(s.operator == "==" for s in spec)
            bounded = any(s.operator == ">=" for s in spec) and any(s.operator == "<" for s in spec)
            assert pinned or bounded, f"{pyproject.relative_to(ROOT)}: build requirement {text!r} is open-ended"
    generator = tomllib.loads((CLIENT / "pyproject.toml").read_text())["build-system"]["requires"]
    for name in ("grpcio-tools", "mypy-protobuf"):
        (pin,) = [Requirement(t) for t in generator if Requirement(t).name == name]
        assert [s.operator for s in pin.specifier] == ["=="], f"the stub generator {name} must be pinned exactly"


def test_runtime_floors_match_the_generated_code() -> None:
    """The generated modules refuse an older grpcio than GRPC_GENERATED_VERSION and an older
    protobuf than their gencode version: the declared floors must be exactly those."""
    from llama_crab_client.v1 import llama_crab_pb2, llama_crab_pb2_grpc

    grpc_generated = llama_crab_pb2_grpc.GRPC_GENERATED_VERSION
    header = re.search(r"^# Protobuf Python Version: (\S+)$", Path(llama_crab_pb2.__file__).read_text(), re.M)
    assert header, "llama_crab_pb2.py names no gencode version"
    expected = {"grpcio": Version(grpc_generated), "protobuf": Version(header.group(1))}
    for dist in (CLIENT_DIST, SERVER_DIST):
        floors = {r.name: floor(r) for r in declared(dist) if r.name in expected}
        assert floors == expected, f"{dist} declares {floors}; the generated code needs {expected}"


# ---- against the index ------------------------------------------------------------------------


@cache
def index_unreachable() -> str | None:
    """Why no package index answers here, or None when one does."""
    probe = [sys.executable, "-m", "pip", "index", "versions", "pip", "--timeout", "15", "--retries", "1"]
    try:
        result = subprocess.run(probe, capture_output=True, text=True, timeout=120)
    except subprocess.TimeoutExpired:
        return "`pip index versions pip` did not answer in 120 s"
    if result.returncode == 0 and "Available versions" in result.stdout:
        return None
    return "`pip index versions pip` failed: " + (result.stderr.strip().splitlines() or ["no output"])[-1]


def resolve(requirements: list[str], tmp_path: Path) -> dict[str, Version]:
    """Resolve `requirements` from nothing (as in a fresh venv), without installing: the
    versions pip would install. Fails naming the requirement that no version satisfies."""
    report = tmp_path / "report.json"
    command = [
        sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet",
        "--report", str(report), *requirements,
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=PIP_TIMEOUT_S)
    if result.returncode != 0:
        why = index_unreachable()
        if why:
            pytest.skip(f"no package index reachable, so the resolution was not checked: {why}")
        unsatisfied = re.findall(r"Could not find a version that satisfies the requirement (\S+)", result.stderr)
        conflict = re.findall(r"^ERROR: (Cannot install .*|ResolutionImpossible.*)$", result.stderr, re.M)
        if unsatisfied:
            pytest.fail(f"no version on the index satisfies {', '.join(sorted(set(unsatisfied)))}")
        if conflict:
            pytest.fail("the requirements conflict on today's index: " + conflict[0] + "\n" + result.stderr[-2000:])
        pytest.fail(f"pip could not resolve {requirements}:\n{result.stderr[-3000:]}")
    installs = json.loads(report.read_text())["install"]
    return {canonicalize_name(item["metadata"]["name"]): Version(item["metadata"]["version"]) for item in installs}


def test_install_requirements_resolve_on_todays_index(tmp_path: Path) -> None:
    """Both packages' requirements, with the test extra, from the built metadata: what the
    README's test command installs. The serve command's are a subset."""
    requirements = declared(CLIENT_DIST) + declared(SERVER_DIST, ("test",))
    resolved = resolve(sorted({without_marker(r) for r in requirements}), tmp_path)
    for req in requirements:
        name = canonicalize_name(req.name)
        assert name in resolved, f"{req.name} missing from the resolution"
        assert resolved[name] in req.specifier, f"{req.name} {resolved[name]} breaks {req}"


def test_runtime_floors_exist_and_install_together(tmp_path: Path) -> None:
    """Every runtime floor is a release on the index, and all of them install side by side:
    a floor that no version meets, or that conflicts with another floor, means nothing."""
    pins = sorted({f"{r.name}=={floor(r)}" for r in runtime_requirements()})
    resolved = resolve(pins, tmp_path)
    for pin in pins:
        name, version = pin.split("==")
        assert resolved[canonicalize_name(name)] == Version(version), f"{pin} resolved to {resolved[canonicalize_name(name)]}"


def test_the_client_runs_on_its_floors(tmp_path: Path) -> None:
    """The floors mean something: the client, built as the README builds it, imports and
    builds a request with every runtime dependency at exactly its floor."""
    if why := index_unreachable():
        pytest.skip(f"no package index reachable, so the floors were not installed: {why}")
    env_dir = tmp_path / "floors"
    venv.create(env_dir, with_pip=True)
    python = str(env_dir / ("Scripts" if sys.platform == "win32" else "bin") / "python")
    pins = sorted({f"{r.name}=={floor(r)}" for r in declared(CLIENT_DIST)})
    pip = [python, "-m", "pip", "install", "--quiet"]
    for step in (pins, ["--no-deps", str(CLIENT)]):
        result = subprocess.run(pip + step, capture_output=True, text=True, timeout=PIP_TIMEOUT_S)
        assert result.returncode == 0, f"pip install {' '.join(step)}:\n{result.stderr[-3000:]}"
    check = (
        "from importlib.metadata import version\n"
        "from llama_crab_client import CompletionOptions, convert\n"
        "from llama_crab_client.v1 import llama_crab_pb2_grpc\n"
        "from llama_crab_client import status\n"
        "request = convert.complete_request_to_proto('Hi', CompletionOptions(4))\n"
        "assert request.options.max_tokens == 4\n"
        f"print(' '.join(n + '==' + version(n) for n in {[p.split('==')[0] for p in pins]!r}))\n"
    )
    result = subprocess.run([python, "-W", "error", "-c", check], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split() == pins, f"ran on {result.stdout.split()}, not the floors {pins}"
