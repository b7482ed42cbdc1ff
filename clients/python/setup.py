"""Generate the protobuf/gRPC modules (+ mypy-protobuf .pyi stubs) from protos/ at build time.

The import package `llama_crab` belongs to the server distribution, so the generated
modules' absolute `llama_crab.v1` imports are rewritten to this package's `.v1`.

The runtime floors are static in pyproject.toml: the generator is pinned there, so they are
known before any build (tests/test_install.py checks them against the generated modules).
"""

from __future__ import annotations

import re
import shutil
import sys
import sysconfig
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py
from setuptools.command.sdist import sdist

HERE = Path(__file__).resolve().parent
PROTO_ROOTS = [HERE.parent.parent / "protos", HERE / "protos"]  # repo checkout, then sdist copy
OUT = HERE / "llama_crab_client" / "v1"


def _plugin(name: str) -> str:
    for directory in (sysconfig.get_path("scripts"), str(Path(sys.executable).parent)):
        candidate = Path(directory) / name
        if candidate.exists():
            return str(candidate)
    found = shutil.which(name)
    if not found:
        raise RuntimeError(f"{name} not found: mypy-protobuf must be installed in the build environment")
    return found


def generate() -> None:
    from grpc_tools import protoc

    root = next((r for r in PROTO_ROOTS if (r / "llama_crab" / "v1").is_dir()), None)
    if root is None:
        raise RuntimeError("protos/llama_crab/v1 not found next to the client")
    protos = sorted(str(p.relative_to(root)) for p in (root / "llama_crab" / "v1").glob("*.proto"))
    tmp = HERE / "build" / "proto-gen"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    include = str(Path(protoc.__file__).parent / "_proto")
    args = [
        "grpc_tools.protoc", f"-I{root}", f"-I{include}",
        f"--python_out={tmp}", f"--grpc_python_out={tmp}",
        f"--plugin=protoc-gen-mypy={_plugin('protoc-gen-mypy')}",
        f"--plugin=protoc-gen-mypy_grpc={_plugin('protoc-gen-mypy_grpc')}",
        f"--mypy_out={tmp}", f"--mypy_grpc_out={tmp}",
        *protos,
    ]  # fmt: skip
    if protoc.main(args) != 0:
        raise RuntimeError("protoc failed on " + ", ".join(protos))
    OUT.mkdir(parents=True, exist_ok=True)
    for generated in (tmp / "llama_crab" / "v1").iterdir():
        text = generated.read_text()
        text = re.sub(r"^from llama_crab\.v1 import ", "from . import ", text, flags=re.M)
        text = re.sub(r"^import llama_crab\.v1\.(\w+)$", r"from . import \1", text, flags=re.M)
        if generated.suffix == ".pyi":  # stubs name types by module path; .py must keep its registry name
            text = text.replace("llama_crab.v1.llama_crab_pb2", "llama_crab_pb2")
        (OUT / generated.name).write_text(text)
    (OUT / "__init__.py").write_text('"""Generated from protos/llama_crab/v1 at build time; do not edit."""\n')


def ensure_package_dir() -> None:
    """setuptools checks that every listed package directory exists (egg_info runs before
    build_py), and in a clean checkout the generated one does not yet."""
    OUT.mkdir(parents=True, exist_ok=True)
    init = OUT / "__init__.py"
    if not init.exists():
        init.write_text('"""Generated from protos/llama_crab/v1 at build time; do not edit."""\n')


class BuildPyWithProtos(build_py):
    def run(self) -> None:
        generate()
        super().run()


class SdistWithProtos(sdist):
    """Ship the contract inside the sdist: ../../protos is outside this project's tree."""

    def make_release_tree(self, base_dir: str, files: list[str]) -> None:
        super().make_release_tree(base_dir, files)
        root = next((r for r in PROTO_ROOTS if (r / "llama_crab" / "v1").is_dir()), None)
        if root is None:
            raise RuntimeError("protos/llama_crab/v1 not found next to the client")
        target = Path(base_dir) / "protos"
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(root, target, ignore=shutil.ignore_patterns("buf.*"))


ensure_package_dir()
setup(
    cmdclass={"build_py": BuildPyWithProtos, "sdist": SdistWithProtos},
)
