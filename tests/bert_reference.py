"""An independent numpy BERT sentence embedder: the yardstick for the converted minilm-l6 GGUF.

Nothing here comes from llama.cpp or from the converter (llama_crab.convert_bert): it reads
the Hugging Face folder itself (tokenizer.json, config.json, 1_Pooling/config.json,
model.safetensors) and does what Hugging Face's tokenizers and sentence-transformers do:
BertNormalizer + BertPreTokenizer + WordPiece, [CLS] ... [SEP]; the BERT encoder in float64
(post-LayerNorm, erf GELU); mean pooling over the tokens; L2 normalisation. One text at a
time, so there is no padding and the attention mask is all ones.
"""

from __future__ import annotations

import json
import math
import unicodedata
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from safetensors.numpy import load_file

F64 = npt.NDArray[np.float64]

# Rust's char::is_whitespace (the Unicode White_Space property), which the Hugging Face
# tokenizers use; Python's str.isspace() also counts U+001C..U+001F, so it is not used.
_WHITESPACE = frozenset(
    "\t\n\x0b\x0c\r \x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008\u2009\u200a"
    "\u2028\u2029\u202f\u205f\u3000"
)
# BertNormalizer's "Chinese characters" (CJK ideograph blocks), each spaced out as a word.
_CJK = ((0x4E00, 0x9FFF), (0x3400, 0x4DBF), (0x20000, 0x2A6DF), (0x2A700, 0x2B73F), (0x2B740, 0x2B81F),
        (0x2B920, 0x2CEAF), (0xF900, 0xFAFF), (0x2F800, 0x2FA1F))  # fmt: skip
_erf = np.frompyfunc(math.erf, 1, 1)


def _is_cjk(c: str) -> bool:
    cp = ord(c)
    return any(lo <= cp <= hi for lo, hi in _CJK)


def _is_punct(c: str) -> bool:
    # BertPreTokenizer: ASCII punctuation (which includes symbols like $ + < = > ^ ` | ~)
    # or any Unicode punctuation category (P*).
    return (c.isascii() and not c.isalnum() and c.isprintable() and c != " ") or unicodedata.category(c).startswith("P")


class BertReference:
    def __init__(self, model_dir: Path) -> None:
        model_dir = Path(model_dir)
        self.config: dict[str, Any] = json.loads((model_dir / "config.json").read_text())
        tok = json.loads((model_dir / "tokenizer.json").read_text(encoding="utf-8"))
        norm, model = tok["normalizer"], tok["model"]
        # Only the tokenizer this class implements; anything else must fail, not drift.
        assert norm["type"] == "BertNormalizer" and tok["pre_tokenizer"]["type"] == "BertPreTokenizer", tok
        assert model["type"] == "WordPiece", model["type"]
        self.clean_text: bool = norm["clean_text"]
        self.chinese: bool = norm["handle_chinese_chars"]
        self.lowercase: bool = norm["lowercase"]
        self.strip_accents: bool = norm["lowercase"] if norm["strip_accents"] is None else norm["strip_accents"]
        self.vocab: dict[str, int] = model["vocab"]
        self.unk = self.vocab[model["unk_token"]]
        self.prefix: str = model["continuing_subword_prefix"]
        self.max_chars: int = model["max_input_chars_per_word"]
        single = tok["post_processor"]["single"]
        assert [next(iter(s)) for s in single] == ["SpecialToken", "Sequence", "SpecialToken"], single
        self.cls = self.vocab[single[0]["SpecialToken"]["id"]]
        self.sep = self.vocab[single[2]["SpecialToken"]["id"]]

        pooling = json.loads((model_dir / "1_Pooling" / "config.json").read_text())
        assert pooling["pooling_mode_mean_tokens"] and not pooling["pooling_mode_cls_token"], pooling
        cfg = self.config
        assert cfg["hidden_act"] == "gelu" and cfg.get("position_embedding_type", "absolute") == "absolute", cfg
        self.n_layer: int = cfg["num_hidden_layers"]
        self.n_head: int = cfg["num_attention_heads"]
        self.eps: float = cfg["layer_norm_eps"]
        raw = load_file(str(model_dir / "model.safetensors"))
        self.w: dict[str, F64] = {k.removeprefix("bert."): v.astype(np.float64) for k, v in raw.items()}

    # ---- tokenizer ---------------------------------------------------------------------
    def _normalize(self, text: str) -> str:
        out = []
        for c in text:
            if self.clean_text:
                if c in "\t\n\r" or c in _WHITESPACE:
                    c = " "
                elif ord(c) in (0, 0xFFFD) or unicodedata.category(c).startswith("C"):
                    continue
            out.append(f" {c} " if self.chinese and _is_cjk(c) else c)
        text = "".join(out)
        if self.strip_accents:
            text = "".join(c for c in unicodedata.normalize("NFD", text) if unicodedata.category(c) != "Mn")
        return text.lower() if self.lowercase else text

    def _words(self, text: str) -> list[str]:
        words: list[str] = []
        current = ""
        for c in self._normalize(text):
            if c in _WHITESPACE or _is_punct(c):
                if current:
                    words.append(current)
                current = ""
                if c not in _WHITESPACE:
                    words.append(c)
            else:
                current += c
        return words + [current] if current else words

    def _wordpiece(self, word: str) -> list[int]:
        if len(word) > self.max_chars:
            return [self.unk]
        ids, start = [], 0
        while start < len(word):
            # Greedy longest match; continuation pieces carry the "##" prefix.
            for end in range(len(word), start, -1):
                piece = word[start:end] if start == 0 else self.prefix + word[start:end]
                if piece in self.vocab:
                    ids.append(self.vocab[piece])
                    start = end
                    break
            else:
                return [self.unk]  # one unmatched piece makes the whole word unknown
        return ids

    def tokenize(self, text: str) -> list[int]:
        """[CLS] + WordPiece ids + [SEP], as the tokenizer.json's template does for one text."""
        return [self.cls, *(i for w in self._words(text) for i in self._wordpiece(w)), self.sep]

    # ---- encoder -------------------------------------------------------------------------
    def _layer_norm(self, x: F64, name: str) -> F64:
        mean = x.mean(-1, keepdims=True)
        var = ((x - mean) ** 2).mean(-1, keepdims=True)
        out: F64 = (x - mean) / np.sqrt(var + self.eps) * self.w[name + ".weight"] + self.w[name + ".bias"]
        return out

    def _linear(self, x: F64, name: str) -> F64:
        out: F64 = x @ self.w[name + ".weight"].T + self.w[name + ".bias"]
        return out

    def hidden(self, ids: list[int]) -> F64:
        """The last layer's token states, shape (len(ids), hidden)."""
        w, n = self.w, len(ids)
        x = w["embeddings.word_embeddings.weight"][ids] + w["embeddings.position_embeddings.weight"][:n]
        x = self._layer_norm(x + w["embeddings.token_type_embeddings.weight"][0], "embeddings.LayerNorm")
        d = x.shape[1] // self.n_head
        for i in range(self.n_layer):
            p = f"encoder.layer.{i}."
            q, k, v = (
                self._linear(x, p + f"attention.self.{m}").reshape(n, self.n_head, d).transpose(1, 0, 2)
                for m in ("query", "key", "value")
            )
            scores = q @ k.transpose(0, 2, 1) / math.sqrt(d)
            probs = np.exp(scores - scores.max(-1, keepdims=True))
            probs /= probs.sum(-1, keepdims=True)
            ctx = (probs @ v).transpose(1, 0, 2).reshape(n, -1)
            x = self._layer_norm(x + self._linear(ctx, p + "attention.output.dense"), p + "attention.output.LayerNorm")
            h = self._linear(x, p + "intermediate.dense")
            h = 0.5 * h * (1.0 + np.asarray(_erf(h / math.sqrt(2.0)), dtype=np.float64))  # the exact (erf) GELU
            x = self._layer_norm(x + self._linear(h, p + "output.dense"), p + "output.LayerNorm")
        return x

    def embed(self, texts: list[str]) -> npt.NDArray[np.float64]:
        """Mean-pooled, L2-normalised sentence embeddings, shape (len(texts), hidden)."""
        rows = []
        for text in texts:
            pooled = self.hidden(self.tokenize(text)).mean(0)
            rows.append(pooled / np.linalg.norm(pooled))
        return np.stack(rows)
