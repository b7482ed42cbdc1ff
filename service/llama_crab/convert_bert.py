"""Hugging Face BERT sentence-embedding folder -> GGUF, without torch.

One job: read config.json, tokenizer.json, the sentence-transformers pooling config and
model.safetensors (numpy API), and write the GGUF that llama.cpp's convert_hf_to_gguf.py
(class BertModel, pinned llama.cpp tree, `--outtype f32`) would write: architecture "bert",
its hparams, tensor names from gguf's own name map, a "bert" (WordPiece) vocabulary in
llama.cpp's phantom-space form, the special token ids, the pooling type.

All tensors stay F32 (the converter's `auto` would make the matrices F16): the model is small
(about 91 MB) and F32 keeps the file exact against the source weights, so a reference forward
pass over the safetensors can be compared with llama.cpp's output without a rounding budget.

The output bytes are a pure function of the input folder (no timestamps, paths or dict-order
accidents; tensors in sorted source-name order), so the catalogue can pin their sha256.
"""

from __future__ import annotations

import json
import shutil
import zipfile
from pathlib import Path, PurePosixPath
from typing import Any, Optional

import gguf
import numpy as np
from safetensors import safe_open

__all__ = ["CONVERTER_VERSION", "ConversionError", "convert", "extract_source"]

# Bump whenever the bytes written for the same input change: the catalogue records the
# version its pinned sha256 was made with (models.Conversion.converter_version).
CONVERTER_VERSION = 1

# What convert_hf_to_gguf.py's get_vocab_base_pre() derives for the uncased BERT WordPiece
# vocabulary (its hash of the tokenization of a check text, "ref: BAAI/bge-small-en-v1.5").
# For a WordPiece ("bert") vocabulary llama.cpp ignores the pre-tokenizer name, but the key
# is written as the converter writes it; tests/test_convert_bert.py recomputes the hash with
# the independent reference tokenizer.
BERT_TOKENIZER_PRE = "bert-bge"

# The HF tensors llama.cpp's BERT graph does not use (BertModel.filter_tensors drops them).
_DROPPED = ("embeddings.position_ids", "pooler.dense.weight", "pooler.dense.bias")
_DROPPED_PREFIXES = ("cls.predictions", "cls.seq_relationship")


class ConversionError(ValueError):
    """The folder is not a BERT sentence-embedding model this converter supports."""


def _json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ConversionError(f"cannot read {path.name}: {e}") from None


def extract_source(archive: Path, dest: Path) -> Path:
    """Unpack a zip of a Hugging Face model folder into `dest` (which must not exist yet)
    and return the folder that holds its config.json (`dest` or its single subfolder).

    Members that would land outside `dest` (absolute paths, `..`) are refused: the archive
    comes from a package index, so it is checked like any other download."""
    dest.mkdir(parents=True)
    try:
        with zipfile.ZipFile(archive) as zf:
            for info in zf.infolist():
                parts = PurePosixPath(info.filename).parts
                if info.filename.startswith("/") or ".." in parts or not parts:
                    raise ConversionError(f"{archive.name}: unsafe member {info.filename!r}")
                target = dest.joinpath(*parts)
                if info.is_dir():
                    target.mkdir(parents=True, exist_ok=True)
                    continue
                target.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(info) as src, target.open("wb") as sink:
                    shutil.copyfileobj(src, sink, 1 << 20)
    except zipfile.BadZipFile as e:
        raise ConversionError(f"{archive.name} is not a zip archive: {e}") from None
    if (dest / "config.json").is_file():
        return dest
    subdirs = [p for p in dest.iterdir() if p.is_dir() and (p / "config.json").is_file()]
    if len(subdirs) != 1:
        raise ConversionError(f"{archive.name} holds no single model folder with a config.json")
    return subdirs[0]


def _pooling_type(model_dir: Path) -> Optional[gguf.PoolingType]:
    """The sentence-transformers Pooling module's mode (TextModel._try_set_pooling_type)."""
    modules_file = model_dir / "modules.json"
    if not modules_file.is_file():
        return None
    path = next((m["path"] for m in _json(modules_file) if str(m["type"]).endswith("Pooling")), None)
    if path is None:
        return None
    pooling = _json(model_dir / path / "config.json")
    if pooling.get("pooling_mode_mean_tokens"):
        return gguf.PoolingType.MEAN
    if pooling.get("pooling_mode_cls_token"):
        return gguf.PoolingType.CLS
    if pooling.get("pooling_mode_lasttoken"):
        return gguf.PoolingType.LAST
    modes = {"mean": gguf.PoolingType.MEAN, "cls": gguf.PoolingType.CLS, "lasttoken": gguf.PoolingType.LAST}
    if (mode := pooling.get("pooling_mode")) in modes:
        return modes[mode]
    raise ConversionError(f"unsupported pooling config {pooling} (only mean, cls and last token)")


def _looks_special(token: str) -> bool:
    # TextModel.does_token_look_special: added tokens that ought to be control tokens.
    return (
        token in ("<pad>", "<mask>", "<2mass>", "[@BOS@]")
        or (token.startswith("<|") and token.endswith("|>"))
        or (token.startswith("<｜") and token.endswith("｜>"))
        or (token.startswith("<unused") and token.endswith(">"))
    )


def _vocab(tokenizer: dict[str, Any], vocab_size: int) -> tuple[list[str], list[int]]:
    """Tokens (in llama.cpp's phantom-space form) and token types, indexed by id
    (TextModel.get_vocab_base followed by BertModel.set_vocab's phantom())."""
    model = tokenizer.get("model", {})
    if model.get("type") != "WordPiece":
        raise ConversionError(f"tokenizer model {model.get('type')!r} is not WordPiece")
    by_id = {int(i): tok for tok, i in model["vocab"].items()}
    added = {int(a["id"]): a for a in tokenizer.get("added_tokens", [])}
    for i, a in added.items():
        by_id[i] = a["content"]
    if max(by_id) >= vocab_size:
        raise ConversionError(f"token id {max(by_id)} is outside vocab_size {vocab_size}")
    tokens: list[str] = []
    types: list[int] = []
    for i in range(vocab_size):
        tok = by_id.get(i)
        if tok is None:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
            continue
        if i in added and (added[i].get("special") or _looks_special(tok)):
            types.append(gguf.TokenType.CONTROL)
            tokens.append(tok)  # control tokens keep their text (no phantom space)
            continue
        if i in added:
            types.append(gguf.TokenType.USER_DEFINED)
            tok = tok.replace("\u2581", " ")
        else:
            types.append(gguf.TokenType.NORMAL)
        # llama.cpp's WPM tokenizer matches words as "▁word" and continuations bare.
        tokens.append(tok[2:] if tok.startswith("##") else "\u2581" + tok)
    return tokens, types


def _special_ids(tokenizer: dict[str, Any], tok_config: dict[str, Any]) -> tuple[dict[str, int], dict[str, bool]]:
    """Special token ids and add_*_token flags as gguf.SpecialVocab derives them for a BERT
    tokenizer: bos = [CLS], eos = sep = [SEP] (tokenizer_config's cls/sep stand in for the
    missing bos/eos), and add_bos/add_eos from the single-text TemplateProcessing."""
    ids = {a["content"]: int(a["id"]) for a in tokenizer.get("added_tokens", [])}
    ids.update({k: v for k, v in tokenizer["model"]["vocab"].items() if k not in ids})

    def name(kind: str) -> Optional[str]:
        value = tok_config.get(f"{kind}_token")
        return value.get("content") if isinstance(value, dict) else value

    cls_tok, sep_tok = name("cls"), name("sep")
    bos_tok, eos_tok = name("bos") or cls_tok, name("eos") or sep_tok
    flags: dict[str, bool] = {}
    post = tokenizer.get("post_processor") or {}
    if post.get("type") != "TemplateProcessing":
        raise ConversionError(f"post-processor {post.get('type')!r} is not TemplateProcessing")
    single = post.get("single", [])
    first = single[0].get("SpecialToken", {}).get("id") if len(single) > 1 else None
    last = single[-1].get("SpecialToken", {}).get("id") if len(single) > 1 else None
    if first is not None:
        flags["bos"] = first in (bos_tok, cls_tok)
    if last is not None:
        if last != eos_tok:
            raise ConversionError(f"template ends with {last!r}, not the eos/sep token {eos_tok!r}")
        flags["eos"] = True
    pair = post.get("pair", [])[1 if first else 0 : -1 if last else None]
    middle = pair[1:-1]  # what stands between sequences A and B
    if middle:
        # SpecialVocab's add_sep: "A [SEP] B" adds a separator only when the template has no
        # trailing eos (else that [SEP] is A's eos); "A [SEP] [SEP] B" always does.
        seps = [p.get("SpecialToken", {}).get("id") in (sep_tok, eos_tok) for p in middle[:2]]
        flags["sep"] = (seps[0] and last is None) or (len(seps) == 2 and seps[1])
    special: dict[str, int] = {}
    for kind, tok in (("bos", bos_tok), ("eos", eos_tok), ("unk", name("unk")), ("sep", sep_tok),
                      ("pad", name("pad")), ("mask", name("mask"))):  # fmt: skip
        if tok is not None and tok in ids:
            special[kind] = ids[tok]
    # (SpecialVocab also finds cls; gguf-py has no cls key and skips it, so it is not written.)
    return special, flags


def _normalizer_flags(tokenizer: dict[str, Any]) -> tuple[Optional[bool], Optional[bool]]:
    """(lowercase, strip_accents) from a BertNormalizer. The pinned llama.cpp reads
    tokenizer.ggml.normalizer.lowercase and defaults it to false: without the key an
    uncased model would be tokenized cased. strip_accents=None means "as lowercase"
    (llama.cpp's default too), so, as in the converter, only an explicit value is written."""
    norm = tokenizer.get("normalizer") or {}
    if norm.get("type") != "BertNormalizer":
        raise ConversionError(f"normalizer {norm.get('type')!r} is not BertNormalizer")
    return norm.get("lowercase"), norm.get("strip_accents")


def _tensors(model_dir: Path, n_layer: int) -> list[tuple[str, np.ndarray[Any, Any]]]:
    """(GGUF name, F32 array) in sorted source-name order (what safe_open lists)."""
    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.BERT, n_layer)
    out: list[tuple[str, np.ndarray[Any, Any]]] = []
    weights = model_dir / "model.safetensors"
    if not weights.is_file():
        raise ConversionError("no model.safetensors (sharded or .bin checkpoints are not supported)")
    with safe_open(str(weights), framework="np") as f:
        for src in sorted(f.keys()):
            name = src.removeprefix("bert.")
            if name.endswith(".gamma"):
                name = name[: -len(".gamma")] + ".weight"
            elif name.endswith(".beta"):
                name = name[: -len(".beta")] + ".bias"
            if name in _DROPPED or name.startswith(_DROPPED_PREFIXES):
                continue
            new_name = name_map.get_name(name, try_suffixes=(".weight", ".bias"))
            if new_name is None:
                raise ConversionError(f"cannot map tensor {src!r} to a GGUF name")
            data = f.get_tensor(src)
            if data.dtype not in (np.float32, np.float16):
                raise ConversionError(f"tensor {src!r} has dtype {data.dtype} (only F32/F16 sources)")
            out.append((new_name, np.ascontiguousarray(data, dtype=np.float32)))
    return out


def convert(model_dir: Path, out: Path, *, name: str) -> None:
    """Write `model_dir` (a Hugging Face BERT folder) as an F32 GGUF file at `out`.

    `name` becomes general.name (the converter would take it from config.json's
    `_name_or_path`, which for a fine-tune names the base model). Raises ConversionError
    for what it does not support rather than writing a file llama.cpp would misread."""
    model_dir = Path(model_dir)
    config = _json(model_dir / "config.json")
    if config.get("model_type") != "bert" or config.get("architectures", ["BertModel"])[0] != "BertModel":
        raise ConversionError(f"not a BertModel: {config.get('model_type')!r} {config.get('architectures')!r}")
    if config.get("hidden_act") != "gelu" or config.get("position_embedding_type", "absolute") != "absolute":
        raise ConversionError("llama.cpp's BERT graph needs GELU and absolute position embeddings")
    tokenizer = _json(model_dir / "tokenizer.json")
    tok_config_file = model_dir / "tokenizer_config.json"
    tok_config = _json(tok_config_file) if tok_config_file.is_file() else {}
    n_layer = int(config["num_hidden_layers"])
    tensors = _tensors(model_dir, n_layer)
    tokens, types = _vocab(tokenizer, int(config["vocab_size"]))
    special, add_flags = _special_ids(tokenizer, tok_config)
    lowercase, strip_accents = _normalizer_flags(tokenizer)

    writer = gguf.GGUFWriter(path=None, arch=gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.BERT])
    for tname, data in tensors:
        writer.add_tensor(tname, data)
    # Key order follows ModelBase.write(): general metadata, hparams, quantization version, vocab.
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name)
    total, shared, expert, n_expert = writer.get_total_parameter_count()
    writer.add_size_label(gguf.size_label(total, shared, expert, n_expert))

    writer.add_block_count(n_layer)
    writer.add_context_length(int(config["max_position_embeddings"]))
    writer.add_embedding_length(int(config["hidden_size"]))
    writer.add_feed_forward_length(int(config["intermediate_size"]))
    writer.add_head_count(int(config["num_attention_heads"]))
    writer.add_layer_norm_eps(float(config["layer_norm_eps"]))
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    writer.add_causal_attention(False)  # an encoder: every token attends to every token
    pooling = _pooling_type(model_dir)
    if pooling is not None:
        writer.add_pooling_type(pooling)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)

    writer.add_token_type_count(int(config.get("type_vocab_size", 1)))
    writer.add_tokenizer_model("bert")
    writer.add_tokenizer_pre(BERT_TOKENIZER_PRE)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    for kind, token_id in special.items():
        writer.add_uint32(f"tokenizer.ggml.{_SPECIAL_KEYS[kind]}", token_id)
    for kind, flag in add_flags.items():
        writer.add_bool(f"tokenizer.ggml.add_{kind}_token", flag)
    # Written by the pinned tree's gguf-py (newer than the PyPI release), read by its llama.cpp.
    if lowercase is not None:
        writer.add_bool("tokenizer.ggml.normalizer.lowercase", lowercase)
    if strip_accents is not None:
        writer.add_bool("tokenizer.ggml.normalizer.strip_accents", strip_accents)

    writer.write_header_to_file(path=out)
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file(progress=False)
    writer.close()


_SPECIAL_KEYS = {
    "bos": "bos_token_id",
    "eos": "eos_token_id",
    "unk": "unknown_token_id",
    "sep": "seperator_token_id",  # sic: llama.cpp's spelling
    "pad": "padding_token_id",
    "mask": "mask_token_id",
}
