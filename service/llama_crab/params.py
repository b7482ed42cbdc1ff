"""`LlamaParams`: how to load a model and size its context."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Any, Literal, Optional

FlashAttn = Literal["auto", "on", "off"]


@dataclass(frozen=True)
class Speculative:
    """Speculative decoding, with llama.cpp's own drafters (common/speculative): after each
    sampled token a sequence puts a draft into the same batch, and the request's own
    sampler verifies it there, so the output is what it would be without it, sooner.

    `types`: llama.cpp's names, as `llama-server --spec-type` takes them: the
    self-speculative `ngram-simple`, `ngram-map-k`, `ngram-map-k4v`, `ngram-mod`,
    `ngram-cache` (drafts from the sequence's own history: edits, rewrites, code), and
    `draft-simple` with a `draft_model` (a small model sharing the target's vocabulary).
    The knobs keep llama.cpp's names and defaults (`--spec-draft-n-max`, ...).
    """

    types: tuple[str, ...] = ("ngram-simple",)
    draft_model: Optional[str] = None
    draft_n_max: int = 16
    draft_n_min: int = 0
    draft_p_min: float = 0.75
    ngram_size_n: int = 12
    ngram_size_m: int = 48
    ngram_min_hits: int = 1
    ngram_mod_n_match: int = 24
    ngram_mod_n_min: int = 48
    ngram_mod_n_max: int = 64

    def violations(self) -> list[tuple[str, str]]:
        out: list[tuple[str, str]] = []
        if not isinstance(self.types, tuple) or not self.types or not all(isinstance(t, str) for t in self.types):
            out.append(("speculative.types", "must be a non-empty tuple of llama.cpp type names"))
        if self.draft_model is not None and not isinstance(self.draft_model, str):
            out.append(("speculative.draft_model", "must be None or a .gguf path"))
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.type == "int" and (not isinstance(value, int) or isinstance(value, bool)):
                out.append((f"speculative.{f.name}", "must be an integer"))
        if not isinstance(self.draft_p_min, (int, float)) or not 0 <= self.draft_p_min <= 1:
            out.append(("speculative.draft_p_min", "must be a number in [0, 1]"))
        return out


@dataclass(frozen=True)
class LlamaParams:
    """Model and context parameters. Build with keywords or `with_*` builders.

    `n_parallel` is the number of sequences (slots) served at once from one context;
    each slot gets `n_ctx / n_parallel` tokens of KV. `max_queue` bounds how many
    requests may wait for a slot (0 = unbounded).
    """

    model_path: str
    n_ctx: int = 2048
    n_batch: int = 512
    n_ubatch: int = 512
    # None: all cores for both (llama.cpp's default would use fewer).
    n_threads: Optional[int] = None
    n_threads_batch: Optional[int] = None
    # Drop a compute thread while a neighbour process takes cores (ggml's threads wait for
    # each other every operation, so one starved thread stalls all), and take it back when
    # a core is idle. False: always n_threads. See docs/busy-host.md.
    adaptive_threads: bool = True
    # Prompt tokens one step may prefill beside streams already decoding (0: n_batch; a
    # prompt alone always gets whole batches): lower keeps their inter-token latency down
    # while a long prompt arrives, higher gets the newcomer's first token sooner. 128:
    # measured in docs/mixed-load.md (worst decoder gap 2.0 s -> 0.56 s, TTFT +6%).
    prefill_step_tokens: int = 128
    n_gpu_layers: int = -1  # -1: offload everything a GPU build can; ignored on CPU builds
    use_mmap: bool = True
    use_mlock: bool = False
    flash_attn: FlashAttn = "auto"
    seed: int = 0xFFFFFFFF  # default seed for requests that set none; 0xFFFFFFFF = random
    n_parallel: int = 1
    max_queue: int = 0
    # What one request may cost the others: grammar text size, and the CPU time one
    # sequence's sampling (grammar, chain) may take per step before it is ended.
    max_grammar_bytes: int = 32 * 1024
    max_sample_ms: float = 100.0
    # Backpressure: a stream whose reader is this many bytes behind is paused (KV kept)
    # until it catches up; paused for `slow_reader_timeout` seconds it is cancelled
    # (0: cancel instead of pausing; None: pause for as long as it takes).
    max_buffered_bytes: int = 256 * 1024
    slow_reader_timeout: Optional[float] = 120.0
    # Prefix cache: a request reuses the KV of the longest matching prefix a slot (or the
    # host-RAM cache, `cache_ram_mib` of it; 0 = off) holds, and prefills only the rest.
    cache_prompt: bool = True
    cache_ram_mib: int = 512
    # Chat: a Jinja chat template's source used instead of the model's own (None: the
    # model's; a model without one gets llama.cpp's ChatML fallback).
    chat_template: Optional[str] = None
    # Speculative decoding (None: off). Requests may turn it off for themselves
    # (CompletionOptions.speculative).
    speculative: Optional[Speculative] = None
    # Deterministic mode: on the same build and host, a request's tokens and logprobs are
    # bit-identical whatever ran beside it, its prefill chunking, the prefix cache or
    # speculation. CPU only (n_gpu_layers=0 on a GPU build); needs flash_attn auto or on.
    # Costs prefill speed (docs/determinism.md).
    deterministic: bool = False
    # Embeddings (Llama.embed): tokens one input may have (0: min(n_ctx_train, 512); a
    # causal model's embedding context also holds n_vocab logits per token), and what one
    # call may embed, so it holds the embedding context for a bounded time.
    embed_n_ctx: int = 0
    max_embed_inputs: int = 256
    max_embed_tokens: int = 16384

    def __post_init__(self) -> None:
        object.__setattr__(self, "model_path", os.fspath(self.model_path))

    def _with(self, **changes: Any) -> LlamaParams:
        return dataclasses.replace(self, **changes)

    def with_n_ctx(self, n_ctx: int) -> LlamaParams:
        return self._with(n_ctx=n_ctx)

    def with_n_batch(self, n_batch: int) -> LlamaParams:
        return self._with(n_batch=n_batch)

    def with_n_ubatch(self, n_ubatch: int) -> LlamaParams:
        return self._with(n_ubatch=n_ubatch)

    def with_n_threads(self, n_threads: int, n_threads_batch: Optional[int] = None) -> LlamaParams:
        return self._with(n_threads=n_threads, n_threads_batch=n_threads_batch)

    def with_n_gpu_layers(self, n_gpu_layers: int) -> LlamaParams:
        return self._with(n_gpu_layers=n_gpu_layers)

    def with_use_mmap(self, use_mmap: bool) -> LlamaParams:
        return self._with(use_mmap=use_mmap)

    def with_use_mlock(self, use_mlock: bool) -> LlamaParams:
        return self._with(use_mlock=use_mlock)

    def with_flash_attn(self, flash_attn: FlashAttn) -> LlamaParams:
        return self._with(flash_attn=flash_attn)

    def with_seed(self, seed: int) -> LlamaParams:
        return self._with(seed=seed)

    def with_n_parallel(self, n_parallel: int) -> LlamaParams:
        return self._with(n_parallel=n_parallel)

    def with_max_queue(self, max_queue: int) -> LlamaParams:
        return self._with(max_queue=max_queue)

    def with_max_grammar_bytes(self, max_grammar_bytes: int) -> LlamaParams:
        return self._with(max_grammar_bytes=max_grammar_bytes)

    def with_max_sample_ms(self, max_sample_ms: float) -> LlamaParams:
        return self._with(max_sample_ms=max_sample_ms)

    def with_cache_prompt(self, cache_prompt: bool, cache_ram_mib: Optional[int] = None) -> LlamaParams:
        if cache_ram_mib is None:
            return self._with(cache_prompt=cache_prompt)
        return self._with(cache_prompt=cache_prompt, cache_ram_mib=cache_ram_mib)

    def with_speculative(self, speculative: Optional[Speculative]) -> LlamaParams:
        return self._with(speculative=speculative)

    def with_deterministic(self, deterministic: bool = True) -> LlamaParams:
        return self._with(deterministic=deterministic)

    def with_chat_template(self, source: Optional[str]) -> LlamaParams:
        return self._with(chat_template=source)

    def with_backpressure(self, max_buffered_bytes: int, slow_reader_timeout: Optional[float] = 120.0) -> LlamaParams:
        return self._with(max_buffered_bytes=max_buffered_bytes, slow_reader_timeout=slow_reader_timeout)

    def violations(self) -> list[tuple[str, str]]:
        out: list[tuple[str, str]] = []
        positive = ("n_ctx", "n_batch", "n_ubatch", "n_parallel")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                out.append((name, "must be an integer >= 1"))
        for name in ("n_threads", "n_threads_batch"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                out.append((name, "must be None or an integer >= 1"))
        if not isinstance(self.adaptive_threads, bool):
            out.append(("adaptive_threads", "must be True or False"))
        if not isinstance(self.deterministic, bool):
            out.append(("deterministic", "must be True or False"))
        elif self.deterministic and self.flash_attn == "off":
            out.append(("deterministic", "needs flash_attn 'auto' or 'on'"))
        if not isinstance(self.cache_prompt, bool):
            out.append(("cache_prompt", "must be True or False"))
        if not isinstance(self.cache_ram_mib, int) or isinstance(self.cache_ram_mib, bool) or not 0 <= self.cache_ram_mib < 2**22:
            out.append(("cache_ram_mib", "must be an integer >= 0 (0 = off)"))
        for name in ("embed_n_ctx",):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= 1 << 20:
                out.append((name, "must be an integer in [0, 2**20] (0 = the model's, at most 512)"))
        for name in ("max_embed_inputs", "max_embed_tokens"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value < 2**31:
                out.append((name, "must be an integer >= 1"))
        for name in ("max_queue", "max_grammar_bytes", "max_buffered_bytes", "prefill_step_tokens"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < 2**32:
                out.append((name, "must be an integer >= 0 (0 = unbounded)"))
        if not isinstance(self.max_sample_ms, (int, float)) or not 0 <= self.max_sample_ms < 1e9:
            out.append(("max_sample_ms", "must be a number >= 0 (0 = unbounded)"))
        timeout = self.slow_reader_timeout
        if timeout is not None and (not isinstance(timeout, (int, float)) or not 0 <= timeout <= 2e6):
            out.append(("slow_reader_timeout", "must be None or a number of seconds >= 0"))
        if self.chat_template is not None and (not isinstance(self.chat_template, str) or not self.chat_template.strip()):
            out.append(("chat_template", "must be None or a template's source text"))
        if self.flash_attn not in ("auto", "on", "off"):
            out.append(("flash_attn", "must be 'auto', 'on' or 'off'"))
        if not isinstance(self.seed, int) or not 0 <= self.seed <= 0xFFFFFFFF:
            out.append(("seed", "must be an integer in [0, 2**32 - 1]"))
        if self.speculative is not None:
            if isinstance(self.speculative, Speculative):
                out += self.speculative.violations()
            else:
                out.append(("speculative", "must be None or a Speculative"))
        if isinstance(self.n_ctx, int) and isinstance(self.n_parallel, int) and self.n_parallel >= 1:
            if self.n_ctx // self.n_parallel < 8:
                out.append(("n_ctx", "must leave at least 8 tokens per slot (n_ctx / n_parallel)"))
        return out
