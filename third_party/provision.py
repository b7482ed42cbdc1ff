#!/usr/bin/env python3
"""Fill third_party/llama.cpp/ with the pinned llama.cpp source (see llama.cpp.pin).

The source comes from an sdist on PyPI fetched by package name with pip, is checked
against the pinned sha256, and is extracted without VCS metadata; then the patches beside
this script (llama.cpp.NNNN-*.patch, in name order, each saying at its top why it exists)
are applied. Keep them few and small: a run-time switch llama.cpp offers beats a patch. The folder appears
atomically (extract to a temporary sibling, then rename), so an interrupted run never
leaves a half-filled tree. CMake runs this when the folder is missing.

    python third_party/provision.py [--dest third_party/llama.cpp] [--force]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
PIN_FILE = HERE / "llama.cpp.pin"
STAMP = ".llama-crab-provisioned"


def read_pin(path: Path = PIN_FILE) -> dict[str, str]:
    pin: dict[str, str] = {}
    for raw in path.read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if line:
            key, _, value = line.partition("=")
            pin[key.strip()] = value.strip()
    missing = {"package", "version", "sha256", "subdir", "commit"} - pin.keys()
    if missing:
        raise SystemExit(f"provision: {path} lacks {sorted(missing)}")
    return pin


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def download_sdist(pin: dict[str, str], workdir: Path) -> Path:
    cmd = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
        "--disable-pip-version-check", "-q",
        f"{pin['package']}=={pin['version']}", "-d", str(workdir),
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True)
    archives = sorted(workdir.glob("*.tar.gz"))
    if not archives:
        raise SystemExit(
            f"provision: pip could not download {pin['package']}=={pin['version']} "
            f"(exit {proc.returncode}):\n{proc.stderr[-2000:]}"
        )
    return archives[0]


def extract_subdir(archive: Path, subdir: str, dest: Path) -> None:
    with tarfile.open(archive, "r:gz") as tar:
        members = tar.getmembers()
        root = members[0].name.split("/", 1)[0]
        prefix = f"{root}/{subdir.strip('/')}/"
        picked = []
        for m in members:
            if not m.name.startswith(prefix):
                continue
            rel = m.name[len(prefix):]
            # No VCS metadata, nothing escaping the folder, no links out of it.
            if not rel or rel == ".git" or rel.startswith(".git/") or ".." in Path(rel).parts:
                continue
            if m.issym() or m.islnk():
                continue
            m.name = rel
            picked.append(m)
        if not picked:
            raise SystemExit(f"provision: {archive.name} has no {subdir}/")
        if hasattr(tarfile, "data_filter"):  # Python >= 3.11.4 / 3.12: refuse unsafe members outright
            tar.extractall(dest, members=picked, filter="data")
        else:
            tar.extractall(dest, members=picked)


def patches() -> list[Path]:
    return sorted(HERE.glob("llama.cpp.*.patch"))


def stamp_text(pin: dict[str, str]) -> str:
    """What a tree provisioned from this pin and these patches records: the commit, then
    each patch's name and sha256, so that changing a patch re-provisions."""
    return "\n".join([pin["commit"], *(f"{p.name} {sha256_of(p)}" for p in patches())]) + "\n"


def apply_patches(tree: Path) -> None:
    for patch in patches():
        cmd = ["patch", "-p1", "--forward", "--batch", "--no-backup-if-mismatch", "-d", str(tree), "-i", str(patch)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"provision: {patch.name} does not apply:\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")


def provision(dest: Path, force: bool = False) -> Path:
    pin = read_pin()
    stamp = dest / STAMP
    if dest.exists() and not force:
        if stamp.exists() and stamp.read_text() == stamp_text(pin):
            return dest
        if (dest / "CMakeLists.txt").exists() and not stamp.exists():
            print(f"provision: {dest} exists and was not provisioned by this script; leaving it alone")
            return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="llama-crab-provision-", dir=dest.parent) as tmp:
        tmpdir = Path(tmp)
        print(f"provision: fetching {pin['package']}=={pin['version']} with pip")
        archive = download_sdist(pin, tmpdir / "dl")
        actual = sha256_of(archive)
        if actual != pin["sha256"]:
            raise SystemExit(
                f"provision: sha256 mismatch for {archive.name}: expected {pin['sha256']}, got {actual}"
            )
        staging = tmpdir / "llama.cpp"
        extract_subdir(archive, pin["subdir"], staging)
        apply_patches(staging)
        (staging / STAMP).write_text(stamp_text(pin))
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(staging, dest)
    print(f"provision: llama.cpp {pin['commit'][:12]} is in {dest}")
    return dest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dest", type=Path, default=HERE / "llama.cpp")
    parser.add_argument("--force", action="store_true", help="re-fetch even if already provisioned")
    args = parser.parse_args(argv)
    provision(args.dest.resolve(), args.force)
    return 0


if __name__ == "__main__":
    sys.exit(main())
