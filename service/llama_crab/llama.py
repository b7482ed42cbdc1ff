"""The in-process API: `Llama` over the native continuous-batching engine.

Python sees whole chunks; decoding, sampling, detokenizing and stop checks run in the
engine's C++ scheduler thread with the GIL released.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import os
import threading
from collections.abc import Iterator, Sequence
from types import TracebackType
from typing import Any, Callable, Generic, Mapping, Optional, TypeVar, Union

from llama_crab_client.errors import (
    InvalidArgumentError,
    ResourceExhaustedError,
    UnavailableError,
)
from llama_crab_client.chat import (
    ChatChunk,
    ChatCompletion,
    ChatCompletionCallback,
    ChatMessage,
    ChatRequest,
    ResponseFormat,
    Tool,
    chat_completion_from_delivered,
)
from llama_crab_client.callbacks import run_stream
from llama_crab_client.chat_session import ChatSession
from llama_crab_client.embeddings import EmbedInput, Embedding, Embeddings, embed_input_violations
from llama_crab_client.infill import Infill
from llama_crab_client.session import Session
from llama_crab_client.types import (
    LIMITS,
    Chunk,
    Completion,
    CompletionCallback,
    CompletionOptions,
    FieldViolation,
    ModelInfo,
    StopReason,
    Usage,
    completion_from_delivered,
)

from . import _engine
from .chat_events import ChatEvents, engine_logprobs, engine_timings, native_chat_inputs
from .logs import install_llama_log_bridge
from .params import LlamaParams, Speculative
from .sampling_params import sampling_params
from .session_file import SessionFile, model_identity, read_session_file, write_session_file

__all__ = ["ChatCompletionStream", "CompletionHandle", "CompletionStream", "EngineMetrics", "Event", "Llama"]

Event = Union[Chunk, Completion, ChatChunk, ChatCompletion]
Prompt = Union[str, Sequence[int], Infill]
Messages = Sequence[Union[ChatMessage, Mapping[str, Any]]]
Tools = Optional[Sequence[Union[Tool, Mapping[str, Any]]]]

_STOP_REASONS = {
    _engine.StopReason.LENGTH: StopReason.LENGTH,
    _engine.StopReason.EOS: StopReason.EOS,
    _engine.StopReason.STOP_SEQUENCE: StopReason.STOP_SEQUENCE,
    _engine.StopReason.CANCELLED: StopReason.CANCELLED,
}

_log = logging.getLogger("llama_crab")

# Embedding poolings by name, as the engine numbers them (llama_pooling_type).
_POOLINGS = {"model": -1, "none": 0, "mean": 1, "cls": 2, "last": 3}
_POOLING_NAMES = {v: k for k, v in _POOLINGS.items()}


def _to_event(ev: _engine.Event) -> Event:
    if not ev.is_final:
        return Chunk(ev.text, tuple(ev.token_ids), ev.n_tokens, engine_logprobs(ev.logprobs))
    if ev.error:
        if ev.error_field:
            # The request itself made generation impossible (e.g. a grammar that leaves
            # no token allowed): the caller's error, with the field to blame.
            raise InvalidArgumentError.for_field(ev.error_field, ev.error)
        # The engine failed this sequence (e.g. llama_decode error); surface it, don't hide it.
        raise RuntimeError(f"generation failed: {ev.error}")
    return Completion(
        text=ev.text,
        token_ids=tuple(ev.token_ids),
        stop_reason=_STOP_REASONS[ev.stop_reason],
        stop_sequence=ev.stop_sequence or None,
        usage=Usage(ev.prompt_tokens, ev.n_tokens, ev.cached_tokens),
        timings=engine_timings(ev),
        logprobs=engine_logprobs(ev.logprobs),
    )


class EngineMetrics:
    """A snapshot of the engine's counters (the service exports them)."""

    def __init__(self, native: _engine.Metrics) -> None:
        self.n_slots: int = native.n_slots
        self.busy_slots: int = native.busy_slots
        self.queue_depth: int = native.queue_depth
        self.requests_total: int = native.requests_total
        self.prompt_tokens_total: int = native.prompt_tokens_total
        self.completion_tokens_total: int = native.completion_tokens_total
        self.decode_steps_total: int = native.decode_steps_total
        # Backpressure and guards: sequences paused for a slow reader now / ever, cancelled
        # for reading too slowly, and ended because their request was too costly or
        # left no token allowed.
        self.paused_slots: int = native.paused_slots
        self.pauses_total: int = native.pauses_total
        self.slow_reader_cancels_total: int = native.slow_reader_cancels_total
        self.guarded_failures_total: int = native.guarded_failures_total
        # Prefix cache: prompt tokens reused vs computed, and the host-RAM cache.
        self.cache_hit_tokens_total: int = native.cache_hit_tokens_total
        self.cache_miss_tokens_total: int = native.cache_miss_tokens_total
        self.ram_cache_bytes: int = native.ram_cache_bytes
        self.ram_cache_entries: int = native.ram_cache_entries
        self.ram_cache_budget: int = native.ram_cache_budget
        self.ram_cache_saves_total: int = native.ram_cache_saves_total
        self.ram_cache_restores_total: int = native.ram_cache_restores_total
        # Compute threads decoding now: fewer than configured while the host is busy.
        self.n_threads_active: int = native.n_threads_active
        # Speculative decoding: draft tokens put into batches, and those accepted.
        self.draft_tokens_total: int = native.draft_tokens_total
        self.draft_accepted_tokens_total: int = native.draft_accepted_tokens_total
        # Embeddings: inputs embedded, and their tokens.
        self.embed_inputs_total: int = native.embed_inputs_total
        self.embed_tokens_total: int = native.embed_tokens_total


def _native_speculative(spec: Speculative) -> _engine.SpeculativeParams:
    """Speculative's fields onto the engine's twin, by name."""
    native = _engine.SpeculativeParams()
    for f in dataclasses.fields(spec):
        value = getattr(spec, f.name)
        if f.name == "types":
            value = list(value)
        elif f.name == "draft_model":
            value = value or ""
        setattr(native, f.name, value)
    return native


class CompletionHandle:
    """A submitted request: zero or more `Chunk` events, then exactly one `Completion`
    (a chat request: `ChatChunk` events, then one `ChatCompletion`).

    `fileno()` becomes readable whenever events are waiting, so an asyncio loop can
    watch it (`loop.add_reader`) and call `poll()` without a thread per stream.
    """

    def __init__(self, native: _engine.Request, convert: Callable[[_engine.Event], Event] = _to_event) -> None:
        self._native = native
        self._to_event = convert
        self.done = False
        # A failed final that arrived behind chunks: raised on the next call, so the
        # chunks before it are still delivered.
        self._error: Optional[BaseException] = None

    @property
    def id(self) -> int:
        return int(self._native.id)

    @property
    def prompt_tokens(self) -> int:
        """Length of the prompt in tokens, known as soon as the request is submitted."""
        return int(self._native.prompt_tokens)

    def fileno(self) -> int:
        return int(self._native.fileno())

    def _convert(self, events: list[_engine.Event]) -> list[Event]:
        if self._error is not None:
            error, self._error = self._error, None
            raise error
        # Mark done before converting: a failed sequence's final event raises below, and
        # events()/close() must not wait for another final after that.
        if events and events[-1].is_final:
            self.done = True
        out: list[Event] = []
        for e in events:
            try:
                out.append(self._to_event(e))
            except Exception as error:
                if not out:
                    raise
                self._error = error
        return out

    @property
    def error_pending(self) -> bool:
        """A failed final arrived behind the events just returned: the next call raises it."""
        return self._error is not None

    def poll(self) -> list[Event]:
        """Events ready now, without blocking."""
        return self._convert(self._native.poll())

    def wait(self, timeout: Optional[float] = None) -> list[Event]:
        """Block (GIL released) until at least one event is ready or `timeout` seconds pass."""
        return self._convert(self._native.wait(-1.0 if timeout is None else max(0.0, timeout)))

    def cancel(self) -> None:
        """Stop generation (queued, prefilling or decoding); a final CANCELLED Completion follows."""
        self._native.cancel()

    def events(self) -> Iterator[Event]:
        """Every event until the final Completion (blocking)."""
        while not self.done or self._error is not None:
            yield from self.wait()

    def close(self) -> None:
        """Cancel if still running and release the engine-side resources."""
        if not self.done:
            self.cancel()
            for _ in self.events():
                pass
        self._error = None
        self._native.close()


C = TypeVar("C", Chunk, ChatChunk)
F = TypeVar("F", Completion, ChatCompletion)


class _Stream(Generic[C, F]):
    """Iterate chunks; `completion` holds the final result once iteration ends.

    Leaving the loop early (break, exception, `close()`, or the stream being dropped)
    counts as STOP: generation is cancelled and `completion` holds what was delivered.
    """

    _final_type: type

    def __init__(self, handle: CompletionHandle) -> None:
        self._handle = handle
        self._delivered: list[C] = []
        self._pending: list[Event] = []
        self.completion: Optional[F] = None

    def _from_delivered(self, final: F, delivered: list[C]) -> F:
        raise NotImplementedError

    def _closing_chunk(self, final: F) -> Optional[C]:
        return None  # a chunk that closes the stream, built from the final (chat only)

    def __iter__(self) -> _Stream[C, F]:
        return self

    def __next__(self) -> C:
        while self.completion is None:
            if not self._pending:
                self._pending = self._handle.wait()
                continue
            event = self._pending.pop(0)
            if isinstance(event, self._final_type):
                self.completion = event  # type: ignore[assignment]
                self._handle.close()
                closing = self._closing_chunk(event)  # type: ignore[arg-type]
                if closing is not None:
                    return closing
                break
            self._delivered.append(event)  # type: ignore[arg-type]
            return event  # type: ignore[return-value]
        raise StopIteration

    def close(self) -> F:
        """Stop now (if not finished) and return the result of what was delivered."""
        if self.completion is None:
            self._handle.cancel()
            # The final may already wait among the events taken but not yet handed out.
            final = next(
                e for e in itertools.chain(self._pending, self._handle.events()) if isinstance(e, self._final_type)
            )
            self._pending = []
            self._handle.close()
            self.completion = self._from_delivered(final, self._delivered)  # type: ignore[arg-type]
        return self.completion

    def __enter__(self) -> _Stream[C, F]:
        return self

    def __exit__(
        self,
        exc_type: Optional[type[BaseException]],
        exc: Optional[BaseException],
        tb: Optional[TracebackType],
    ) -> None:
        self.close()

    def __del__(self) -> None:
        if self.completion is None:
            try:
                self.close()
            except Exception:  # interpreter shutdown: nothing useful to do
                pass


class CompletionStream(_Stream[Chunk, Completion]):
    """Iterate `Chunk`s; `completion` holds the final `Completion` once iteration ends."""

    _final_type = Completion

    def _from_delivered(self, final: Completion, delivered: list[Chunk]) -> Completion:
        return completion_from_delivered(final, delivered)


class ChatCompletionStream(_Stream[ChatChunk, ChatCompletion]):
    """Iterate `ChatChunk`s (the last one has the finish reason and usage); `completion`
    holds the `ChatCompletion` once iteration ends."""

    _final_type = ChatCompletion

    def _from_delivered(self, final: ChatCompletion, delivered: list[ChatChunk]) -> ChatCompletion:
        return chat_completion_from_delivered(delivered, final=final)

    def _closing_chunk(self, final: ChatCompletion) -> Optional[ChatChunk]:
        return final.last_chunk()


class Llama:
    """A loaded model serving completions from one context, `n_parallel` at a time."""

    def __init__(self, engine: _engine.Engine, params: LlamaParams) -> None:
        self._engine = engine
        self.params = params
        self._closed = False
        self._lock = threading.Lock()
        self._model_info: Optional[ModelInfo] = None

    @classmethod
    def load(cls, params: Union[LlamaParams, str, "os.PathLike[str]"]) -> Llama:
        """Load a GGUF model. Raises ValueError for bad parameters or a bad model file."""
        if not isinstance(params, LlamaParams):
            params = LlamaParams(os.fspath(params))
        problems = params.violations()
        if problems:
            raise InvalidArgumentError.from_violations(
                [FieldViolation(f, d) for f, d in problems]
            )
        if not os.path.isfile(params.model_path):
            raise InvalidArgumentError.for_field("model_path", f"no such file: {params.model_path!r}")
        install_llama_log_bridge()
        threads = params.n_threads or os.cpu_count() or 1
        native = _engine.EngineParams()
        native.model_path = params.model_path
        native.n_ctx = params.n_ctx
        native.n_batch = params.n_batch
        native.n_ubatch = min(params.n_ubatch, params.n_batch)
        native.n_threads = threads
        native.n_threads_batch = params.n_threads_batch or threads
        native.n_gpu_layers = params.n_gpu_layers
        native.use_mmap = params.use_mmap
        native.use_mlock = params.use_mlock
        native.flash_attn = {"auto": -1, "off": 0, "on": 1}[params.flash_attn]
        native.seed = params.seed
        native.n_parallel = params.n_parallel
        native.max_queue = params.max_queue
        native.max_grammar_bytes = params.max_grammar_bytes
        native.max_sample_ms = params.max_sample_ms
        native.max_buffered_bytes = params.max_buffered_bytes
        native.slow_reader_timeout_ms = -1 if params.slow_reader_timeout is None else int(params.slow_reader_timeout * 1000)
        native.cache_prompt = params.cache_prompt
        native.cache_ram_bytes = params.cache_ram_mib << 20
        native.adaptive_threads = params.adaptive_threads
        native.deterministic = params.deterministic
        native.prefill_step_tokens = params.prefill_step_tokens
        native.embed_n_ctx = params.embed_n_ctx
        native.max_embed_inputs = params.max_embed_inputs
        native.max_embed_tokens = params.max_embed_tokens
        if params.speculative is not None:
            native.speculative = _native_speculative(params.speculative)
        if params.chat_template is not None:
            native.chat_template = params.chat_template
        try:
            engine = _engine.Engine(native)
        except _engine.ModelLoadError as e:
            raise InvalidArgumentError.for_field("model_path", str(e)) from None
        except ValueError as e:
            # The engine names the setting it refuses ("speculative.types: ...").
            field, sep, problem = str(e).partition(": ")
            if sep and field.startswith("speculative"):
                raise InvalidArgumentError.for_field(field, problem) from None
            raise
        return cls(engine, params)

    # ---- lifecycle ------------------------------------------------------------------
    def close(self) -> None:
        """Cancel everything in flight and free the model and context."""
        with self._lock:
            if not self._closed:
                self._closed = True
                self._engine.close()

    def __enter__(self) -> Llama:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        # Join the scheduler thread deterministically (the native close releases the GIL).
        if not getattr(self, "_closed", True):
            self.close()

    def _check_open(self) -> None:
        if self._closed:
            raise UnavailableError("the model is closed")

    # ---- model ----------------------------------------------------------------------
    def tokenize(self, text: str, add_special: bool = True, parse_special: bool = True) -> list[int]:
        """Tokens of `text`; `add_special` adds BOS/EOS as the model's metadata asks."""
        self._check_open()
        return self._tokenize(text, "text", add_special, parse_special)

    def _tokenize(self, text: str, field: str, add_special: bool = True, parse_special: bool = True) -> list[int]:
        # Refused before tokenizing: tokenizing megabytes only to refuse them costs seconds.
        if len(text) > LIMITS.prompt_text_bytes or len(text.encode("utf-8")) > LIMITS.prompt_text_bytes:
            raise InvalidArgumentError.for_field(field, f"at most {LIMITS.prompt_text_bytes} bytes of text")
        return list(self._engine.tokenize(text, add_special, parse_special))

    def detokenize(self, tokens: Sequence[int], remove_special: bool = False, unparse_special: bool = True) -> str:
        self._check_open()
        if len(tokens) > LIMITS.prompt_tokens:
            raise InvalidArgumentError.for_field("tokens", f"at most {LIMITS.prompt_tokens} token ids")
        self._check_tokens(tokens, "tokens")
        return str(self._engine.detokenize(list(tokens), remove_special, unparse_special))

    def model_info(self) -> ModelInfo:
        self._check_open()
        return ModelInfo.from_attributes(self._engine.model_info())

    def _info(self) -> ModelInfo:
        if self._model_info is None:
            self._model_info = self.model_info()
        return self._model_info

    def metrics(self) -> EngineMetrics:
        return EngineMetrics(self._engine.metrics())

    @property
    def n_ctx_per_slot(self) -> int:
        return int(self._engine.n_ctx_per_slot())

    # ---- generation -----------------------------------------------------------------
    def _check_tokens(self, tokens: Sequence[int], field: str) -> None:
        n_vocab = self._engine.n_vocab()
        for t in tokens:
            if not isinstance(t, int) or not 0 <= t < n_vocab:
                raise InvalidArgumentError.for_field(field, f"token id {t!r} is not in the vocabulary [0, {n_vocab})")

    def submit(self, prompt: Prompt, options: Optional[CompletionOptions] = None) -> CompletionHandle:
        """Queue a completion and return its handle (the low-level form the service uses).

        Raises InvalidArgumentError (field named) for a bad prompt or options,
        ResourceExhaustedError when the wait queue is full, UnavailableError after close().
        """
        self._check_open()
        options = options or CompletionOptions()
        problems = options.violations(self._engine.n_vocab())
        if problems:
            raise InvalidArgumentError.from_violations(problems)
        if isinstance(prompt, Infill):
            tokens = self._infill_tokens(prompt, options.max_tokens)
        elif isinstance(prompt, str):
            if prompt == "":
                raise InvalidArgumentError.for_field("prompt", "must not be empty")
            tokens = self._tokenize(prompt, "prompt")
        else:
            tokens = list(prompt)
            if len(tokens) > LIMITS.prompt_tokens:
                raise InvalidArgumentError.for_field("prompt", f"at most {LIMITS.prompt_tokens} token ids")
            self._check_tokens(tokens, "prompt")
        if not tokens:
            raise InvalidArgumentError.for_field("prompt", "must not be empty")
        limit = self.n_ctx_per_slot
        if len(tokens) >= limit:
            raise InvalidArgumentError.for_field(
                "prompt", f"is {len(tokens)} tokens; a sequence's context holds {limit} (prompt must be shorter)"
            )
        indent = prompt.indent if isinstance(prompt, Infill) else 0

        def submit(sp: _engine.SamplingParams) -> _engine.Request:
            sp.min_indent = indent
            return self._engine.submit(tokens, sp)

        return self._submit_native(submit, options, _to_event)

    def _infill_tokens(self, infill: Infill, max_tokens: int) -> list[int]:
        problems = infill.violations()
        if problems:
            raise InvalidArgumentError.from_violations(problems)
        native = _engine.InfillInput()
        native.prefix, native.suffix, native.prompt, native.filename = (
            infill.prefix, infill.suffix, infill.prompt, infill.filename
        )
        native.extra = [(f.filename, f.text) for f in infill.extra]
        try:
            return list(self._engine.infill_prompt(native, max_tokens))
        except ValueError as e:
            raise InvalidArgumentError.for_field("infill", str(e).partition(": ")[2] or str(e)) from None

    # ---- embeddings -----------------------------------------------------------------
    def embed(self, inputs: Sequence[EmbedInput], pooling: str = "model", normalize: bool = True) -> Embeddings:
        """Embeddings of `inputs` (texts, or token id lists), in order: each pooled to one
        vector ("model": the model's own pooling, ModelInfo.embed_pooling; "mean", "cls",
        "last"), or one vector per token ("none"); L2-normalised unless `normalize` is
        False. Inputs share batches on an embedding context beside generation.

        Raises InvalidArgumentError naming `inputs[i]` (empty, longer than the embedding
        context, ...) or `pooling`; UnavailableError after close()."""
        self._check_open()
        problems = embed_input_violations(inputs, pooling)
        if problems:
            raise InvalidArgumentError.from_violations(problems)
        token_lists: list[list[int]] = []
        for i, item in enumerate(inputs):
            if isinstance(item, str):
                token_lists.append(self._tokenize(item, f"inputs[{i}]"))
            else:
                token_lists.append(list(item))
                self._check_tokens(token_lists[-1], f"inputs[{i}]")
        try:
            rows, n_embd, pooling_used, prompt_tokens = self._engine.embed(token_lists, _POOLINGS[pooling], normalize)
        except _engine.EngineClosedError as e:
            raise UnavailableError(str(e)) from None
        except ValueError as e:
            field, _, why = str(e).partition(": ")
            raise InvalidArgumentError.for_field(field if why else "inputs", why or field) from None
        data = []
        for values, n_rows, n_tokens in rows:
            floats = memoryview(values).cast("f").tolist()
            if pooling_used == 0:
                vectors = tuple(tuple(floats[r * n_embd : (r + 1) * n_embd]) for r in range(n_rows))
                data.append(Embedding((), n_tokens, vectors))
            else:
                data.append(Embedding(tuple(floats), n_tokens))
        return Embeddings(tuple(data), _POOLING_NAMES[pooling_used], n_embd, prompt_tokens)

    def _submit_native(
        self,
        submit: Callable[[_engine.SamplingParams], _engine.Request],
        options: CompletionOptions,
        convert: Callable[[_engine.Event], Event],
        grammar_field: str = "grammar",
    ) -> CompletionHandle:
        sp = sampling_params(options)
        if options.json_schema is not None:
            grammar_field = "json_schema"
        try:
            return CompletionHandle(submit(sp), convert)
        except _engine.InvalidGrammarError as e:
            raise InvalidArgumentError.for_field(grammar_field, str(e)) from None
        except _engine.QueueFullError as e:
            raise ResourceExhaustedError(str(e)) from None
        except _engine.EngineClosedError as e:
            raise UnavailableError(str(e)) from None
        except ValueError as e:
            # The engine's own checks say "field: problem" (the ones above ran first).
            field, _, why = str(e).partition(": ")
            raise InvalidArgumentError.for_field(field if why else "request", why or field) from None

    def stream(self, prompt: Prompt, options: Optional[CompletionOptions] = None) -> CompletionStream:
        """Iterate chunks: `for chunk in llama.stream(...)`; leaving the loop is STOP."""
        return CompletionStream(self.submit(prompt, options))

    def create_completion_stream(
        self,
        prompt: Prompt,
        options: Optional[CompletionOptions],
        callback: CompletionCallback,
    ) -> Completion:
        """Stream chunks to `callback` and return the final Completion.

        `callback` returns StreamControl.CONTINUE (or None) or StreamControl.STOP. After
        STOP no further chunk is delivered and the Completion holds exactly the delivered
        text with stop reason CANCELLED. An exception from the callback cancels the
        request and propagates; the Llama stays usable.
        """
        completion: Completion = run_stream(self.stream(prompt, options), callback)
        return completion

    # ---- chat -----------------------------------------------------------------------
    def _chat_inputs(self, request: ChatRequest, add_generation_prompt: bool = True) -> _engine.ChatInputs:
        problems = request.violations()
        if request.tools and request.tool_choice != "none" and not self._info().supports_tools:
            why = "this model's chat template has no tool-call format" if self._info().has_chat_template else (
                "this model has no chat template, so it has no tool-call format"
            )
            problems.append(FieldViolation("tools", why))
        for i, tool in enumerate(request.tools):
            if isinstance(tool.parameters, Mapping):
                why = _engine.json_schema_problem(json.dumps(tool.parameters))
                if why:
                    problems.append(FieldViolation(f"tools[{i}].parameters", why))
        if problems:
            raise InvalidArgumentError.from_violations(problems)
        return native_chat_inputs(request, add_generation_prompt)

    def apply_chat_template(
        self, messages: Messages, tools: Tools = None, add_generation_prompt: bool = True
    ) -> str:
        """The prompt text the model's chat template makes of `messages` (and `tools`)."""
        self._check_open()
        inputs = self._chat_inputs(ChatRequest.build(messages, tools), add_generation_prompt)
        try:
            return str(self._engine.apply_chat(inputs).prompt)
        except ValueError as e:
            field, _, why = str(e).partition(": ")
            raise InvalidArgumentError.for_field(field if why else "messages", why or field) from None

    def submit_chat(self, request: ChatRequest, options: Optional[CompletionOptions] = None) -> CompletionHandle:
        """Queue a chat reply; its handle yields `ChatChunk`s, then one `ChatCompletion`.
        Raises like `submit` (InvalidArgumentError naming the field, ...)."""
        self._check_open()
        options = options or CompletionOptions()
        problems = options.violations(self._engine.n_vocab())
        if options.grammar is not None:
            problems.append(FieldViolation("grammar", "not with chat: use response_format"))
        if problems:
            raise InvalidArgumentError.from_violations(problems)
        inputs = self._chat_inputs(request)
        events = ChatEvents(self._info().name or os.path.basename(self.params.model_path))
        # A chat grammar comes from the response format or the tools: blame what made it.
        grammar_field = "response_format" if request.response_format is not None else "tools"
        return self._submit_native(lambda sp: self._engine.submit_chat(inputs, sp), options, events, grammar_field)

    def chat_stream(
        self,
        messages: Messages,
        options: Optional[CompletionOptions] = None,
        tools: Tools = None,
        tool_choice: Union[str, Mapping[str, Any], None] = None,
        response_format: Union[ResponseFormat, Mapping[str, Any], None] = None,
    ) -> ChatCompletionStream:
        """Iterate `ChatChunk`s: `for chunk in llama.chat_stream(...)`; leaving the loop is STOP."""
        request = ChatRequest.build(messages, tools, tool_choice, response_format)
        return ChatCompletionStream(self.submit_chat(request, options))

    def create_chat_completion_stream(
        self,
        messages: Messages,
        options: Optional[CompletionOptions],
        callback: ChatCompletionCallback,
        tools: Tools = None,
        tool_choice: Union[str, Mapping[str, Any], None] = None,
        response_format: Union[ResponseFormat, Mapping[str, Any], None] = None,
    ) -> ChatCompletion:
        """Stream `ChatChunk`s to `callback` and return the `ChatCompletion`, with the
        semantics of `create_completion_stream`: after STOP the result's message holds
        exactly the delivered deltas, finish reason `cancelled`."""
        # The one STOP loop every stream shares, remote ones included.
        completion: ChatCompletion = run_stream(
            self.chat_stream(messages, options, tools, tool_choice, response_format), callback
        )
        return completion

    def create_chat_completion(
        self,
        messages: Messages,
        options: Optional[CompletionOptions] = None,
        tools: Tools = None,
        tool_choice: Union[str, Mapping[str, Any], None] = None,
        response_format: Union[ResponseFormat, Mapping[str, Any], None] = None,
    ) -> ChatCompletion:
        """Generate the whole reply and return the `ChatCompletion`."""
        stream = self.chat_stream(messages, options, tools, tool_choice, response_format)
        for _ in stream:
            pass
        assert stream.completion is not None
        return stream.completion

    def save_session(self, tokens: Sequence[int], path: Union[str, "os.PathLike[str]"]) -> None:
        """Write `tokens` and the KV state this engine holds for them (a free slot's, or the
        RAM cache's) to `path`; `Session.save` calls this. Written aside and renamed."""
        self._check_open()
        state_tokens, state = self._engine.sequence_state(list(tokens))
        info = self.model_info()
        saved = SessionFile(list(tokens), list(state_tokens), bytes(state), info.n_slots)
        write_session_file(os.fspath(path), model_identity(info), saved)

    def load_session(self, path: Union[str, "os.PathLike[str]"]) -> Session:
        """A `Session` continuing the history saved at `path`, its KV state put back so the
        next turn prefills only new tokens. InvalidArgumentError (field `session`) for a
        file that is not one, is damaged, or was saved with another model."""
        self._check_open()
        info = self.model_info()
        saved = read_session_file(os.fspath(path), model_identity(info))
        self._check_tokens(saved.tokens, "session")
        if saved.state and saved.n_slots != info.n_slots:
            # Same model, another slot layout: the history is good, its KV is not usable
            # here, so the next turn computes the whole history once.
            _log.warning(
                "session %s was saved with %d slots, this engine has %d: its KV is recomputed",
                os.fspath(path),
                saved.n_slots,
                info.n_slots,
            )
        elif saved.state:
            try:
                self._engine.add_sequence_state(saved.state_tokens, saved.state)
            except ValueError as e:
                raise InvalidArgumentError.for_field("session", f"{os.fspath(path)!r}: {e}") from None
        return Session(self, saved.tokens)

    def chat_session(
        self, system: Optional[str] = None, tools: Sequence[Tool] = (), messages: Sequence[ChatMessage] = ()
    ) -> ChatSession:
        """A conversation kept across turns (`ChatSession`); the prefix cache makes each turn
        compute only its new tokens."""
        return ChatSession(self, system, tools, messages)

    def session(self, tokens: Sequence[int] = ()) -> Session:
        """A token history continued across calls (`Session`): each turn's prompt is the
        history plus the new text, and the prefix cache prefills only the new tokens."""
        return Session(self, tokens)

    def create_completion(self, prompt: Prompt, options: Optional[CompletionOptions] = None) -> Completion:
        """Generate to the end and return the Completion."""
        handle = self.submit(prompt, options)
        try:
            for event in handle.events():
                if isinstance(event, Completion):
                    return event
        finally:
            handle.close()
        raise AssertionError("engine ended a stream without a Completion")
