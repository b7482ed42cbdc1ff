"""Protobuf messages <-> the shared Python types, both directions.

The server and the client both use this module, so a field means the same thing on
either side of the wire. Unset optional proto fields take `CompletionOptions`' defaults.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable, Sequence
from typing import Any, Optional, Union

from .chat import (
    ChatChunk,
    ChatCompletion,
    ChatDelta,
    ChatMessage,
    ChatRequest,
    ResponseFormat,
    Tool,
    ToolCall,
    ToolCallDelta,
    ToolChoice,
)
from .embeddings import EmbedInput, Embedding, Embeddings
from .errors import InvalidArgumentError
from .infill import Infill, InfillFile
from .sampling import STAGE_TYPES, SamplerChain, SamplerStage
from .types import (
    Chunk,
    Completion,
    CompletionOptions,
    FieldViolation,
    ModelInfo,
    StopReason,
    Timings,
    TokenLogprob,
    TopLogprob,
    Usage,
)
from .v1 import llama_crab_pb2 as pb

__all__ = [
    "ChatStreamHeader",
    "chat_chunk_response_to_proto",
    "chat_completion_response_to_proto",
    "chat_request_from_proto",
    "chat_request_to_proto",
    "chat_response_from_proto",
    "chunk_response_to_proto",
    "complete_request_from_proto",
    "complete_request_to_proto",
    "complete_response_from_proto",
    "completion_response_to_proto",
    "detokenize_request_from_proto",
    "detokenize_response_to_proto",
    "model_info_from_proto",
    "model_info_to_proto",
    "options_from_proto",
    "options_to_proto",
    "stage_from_proto",
    "stage_to_proto",
    "tokenize_request_from_proto",
    "tokenize_request_to_proto",
    "tokenize_response_to_proto",
]

Prompt = Union[str, Sequence[int], Infill]

_DEFAULTS = CompletionOptions()

_STOP_TO_PROTO = {
    StopReason.LENGTH: pb.STOP_REASON_LENGTH,
    StopReason.EOS: pb.STOP_REASON_EOS,
    StopReason.STOP_SEQUENCE: pb.STOP_REASON_STOP_SEQUENCE,
    StopReason.CANCELLED: pb.STOP_REASON_CANCELLED,
}
_STOP_FROM_PROTO = {v: k for k, v in _STOP_TO_PROTO.items()}


# ---- options ----------------------------------------------------------------------------
# CompletionOptions' fields and the message's have the same names: scalars travel by name
# (unset = the dataclass default), so a new option needs no line here. Only the fields
# below have another wire form.
_REPEATED = ("stop_sequences", "samplers", "dry_sequence_breakers")
_OTHER = ("logit_bias", "sampler_chain", *_REPEATED)
_SCALARS = tuple(f.name for f in dataclasses.fields(CompletionOptions) if f.name not in _OTHER)


def stage_to_proto(stage: SamplerStage) -> pb.SamplerStage:
    msg = pb.SamplerStage()
    sub = getattr(msg, stage.kind)
    sub.SetInParent()
    for name, value in stage.params().items():
        if isinstance(value, tuple):
            getattr(sub, name).extend(value)
        else:
            setattr(sub, name, value)
    return msg


def stage_from_proto(m: pb.SamplerStage) -> Optional[SamplerStage]:
    """The typed stage, or None for a message with no stage set (a violation downstream)."""
    kind = m.WhichOneof("stage")
    if kind is None:
        return None
    sub = getattr(m, kind)
    values: dict[str, Any] = {}
    for f in dataclasses.fields(STAGE_TYPES[kind]):
        if isinstance(f.default, tuple):
            if len(getattr(sub, f.name)):
                values[f.name] = tuple(getattr(sub, f.name))
        elif sub.HasField(f.name):
            values[f.name] = getattr(sub, f.name)
    return STAGE_TYPES[kind](**values)


def options_to_proto(o: CompletionOptions) -> pb.CompletionOptions:
    msg = pb.CompletionOptions(logit_bias={int(k): float(v) for k, v in o.logit_bias.items()})
    for name in _REPEATED:
        getattr(msg, name).extend(getattr(o, name) or ())
    if o.sampler_chain is not None:
        msg.sampler_chain.extend(stage_to_proto(s) for s in o.sampler_chain.stages)
    for name in _SCALARS:
        value = getattr(o, name)
        if value is not None and value != getattr(_DEFAULTS, name):
            setattr(msg, name, value)
    return msg


def options_from_proto(m: pb.CompletionOptions) -> CompletionOptions:
    message: Any = m  # fields by name: HasField's typed literals do not cover a loop
    values: dict[str, Any] = {name: getattr(m, name) for name in _SCALARS if message.HasField(name)}
    # An empty stage stays None in the chain, which its validation then names.
    stages: tuple[Any, ...] = tuple(stage_from_proto(s) for s in m.sampler_chain)
    return CompletionOptions(
        stop_sequences=tuple(m.stop_sequences),
        logit_bias=dict(m.logit_bias),
        samplers=tuple(m.samplers) if m.samplers else None,
        dry_sequence_breakers=tuple(m.dry_sequence_breakers),
        sampler_chain=SamplerChain(stages) if stages else None,
        **values,
    )


# ---- requests ---------------------------------------------------------------------------
def infill_to_proto(i: Infill) -> pb.Infill:
    return pb.Infill(
        prefix=i.prefix, suffix=i.suffix, prompt=i.prompt, filename=i.filename, indent=i.indent,
        extra=[pb.InfillFile(filename=f.filename, text=f.text) for f in i.extra],
    )  # fmt: skip


def infill_from_proto(m: pb.Infill) -> Infill:
    extra = tuple(InfillFile(f.filename, f.text) for f in m.extra)
    return Infill(m.prefix, m.suffix, m.prompt, extra, m.filename, m.indent)


def complete_request_to_proto(prompt: Prompt, options: Optional[CompletionOptions]) -> pb.CompleteRequest:
    opts = options_to_proto(options or CompletionOptions())
    if isinstance(prompt, Infill):
        return pb.CompleteRequest(infill=infill_to_proto(prompt), options=opts)
    if isinstance(prompt, str):
        return pb.CompleteRequest(text=prompt, options=opts)
    return pb.CompleteRequest(tokens=pb.TokenList(ids=list(prompt)), options=opts)


def complete_request_from_proto(m: pb.CompleteRequest) -> tuple[Prompt, CompletionOptions]:
    """The prompt (text, token ids or an Infill; "" when none was set) and the options."""
    which = m.WhichOneof("prompt")
    prompt: Prompt
    if which == "infill":
        prompt = infill_from_proto(m.infill)
    elif which == "tokens":
        prompt = list(m.tokens.ids)
    else:
        prompt = m.text
    return prompt, options_from_proto(m.options)


# ---- embeddings -------------------------------------------------------------------------
_POOLING_TO_PROTO = {
    "model": pb.POOLING_UNSPECIFIED, "none": pb.POOLING_NONE, "mean": pb.POOLING_MEAN,
    "cls": pb.POOLING_CLS, "last": pb.POOLING_LAST,
}  # fmt: skip
_POOLING_FROM_PROTO = {v: k for k, v in _POOLING_TO_PROTO.items()}


def embed_request_to_proto(inputs: Sequence[EmbedInput], pooling: str = "model", normalize: bool = True) -> pb.EmbedRequest:
    items = [pb.EmbedInput(text=x) if isinstance(x, str) else pb.EmbedInput(tokens=pb.TokenList(ids=list(x))) for x in inputs]
    return pb.EmbedRequest(inputs=items, pooling=_POOLING_TO_PROTO.get(pooling, pb.POOLING_UNSPECIFIED), normalize=normalize)


def embed_request_from_proto(m: pb.EmbedRequest) -> tuple[list[EmbedInput], str, bool]:
    """The inputs (an input with neither text nor tokens is "", refused as empty), the
    pooling's name ("?" for a number this version does not know) and normalize."""
    inputs: list[EmbedInput] = [list(x.tokens.ids) if x.WhichOneof("input") == "tokens" else x.text for x in m.inputs]
    pooling = _POOLING_FROM_PROTO.get(m.pooling, f"unknown ({m.pooling})")
    return inputs, pooling, m.normalize if m.HasField("normalize") else True


def embed_response_to_proto(e: Embeddings) -> pb.EmbedResponse:
    return pb.EmbedResponse(
        embeddings=[
            pb.Embedding(vector=d.vector, token_vectors=[pb.Vector(values=v) for v in d.token_vectors],
                         prompt_tokens=d.prompt_tokens)
            for d in e.data
        ],
        pooling=_POOLING_TO_PROTO[e.pooling], dimensions=e.dimensions,
        usage=pb.Usage(prompt_tokens=e.prompt_tokens),
    )  # fmt: skip


def embed_response_from_proto(m: pb.EmbedResponse) -> Embeddings:
    data = tuple(
        Embedding(tuple(d.vector), d.prompt_tokens, tuple(tuple(v.values) for v in d.token_vectors))
        for d in m.embeddings
    )
    return Embeddings(data, _POOLING_FROM_PROTO.get(m.pooling, "model"), m.dimensions, m.usage.prompt_tokens)


def tokenize_request_to_proto(text: str, add_special: bool = True, parse_special: bool = True) -> pb.TokenizeRequest:
    return pb.TokenizeRequest(text=text, add_special=add_special, parse_special=parse_special)


def tokenize_request_from_proto(m: pb.TokenizeRequest) -> tuple[str, bool, bool]:
    add = m.add_special if m.HasField("add_special") else True
    parse = m.parse_special if m.HasField("parse_special") else True
    return m.text, add, parse


def tokenize_response_to_proto(tokens: Sequence[int]) -> pb.TokenizeResponse:
    return pb.TokenizeResponse(tokens=list(tokens))


def detokenize_request_from_proto(m: pb.DetokenizeRequest) -> list[int]:
    return list(m.tokens)


def detokenize_response_to_proto(text: str) -> pb.DetokenizeResponse:
    return pb.DetokenizeResponse(text=text)


# ---- results ----------------------------------------------------------------------------
def _logprobs_to_proto(lps: Optional[Iterable[TokenLogprob]]) -> list[pb.TokenLogprob]:
    return [
        pb.TokenLogprob(
            token_id=lp.token_id,
            text=lp.text,
            logprob=lp.logprob,
            top=[pb.TopLogprob(token_id=t.token_id, text=t.text, logprob=t.logprob) for t in lp.top],
        )
        for lp in lps or ()
    ]


def _logprobs_from_proto(lps: Iterable[pb.TokenLogprob]) -> tuple[TokenLogprob, ...]:
    return tuple(
        TokenLogprob(lp.token_id, lp.text, lp.logprob, tuple(TopLogprob(t.token_id, t.text, t.logprob) for t in lp.top))
        for lp in lps
    )


def _usage_to_proto(u: Usage) -> pb.Usage:
    return pb.Usage(prompt_tokens=u.prompt_tokens, completion_tokens=u.completion_tokens, cached_tokens=u.cached_tokens)


def _usage_from_proto(u: pb.Usage) -> Usage:
    return Usage(u.prompt_tokens, u.completion_tokens, u.cached_tokens)


def _timings_to_proto(t: Timings) -> pb.Timings:
    return pb.Timings(
        queue_ms=t.queue_ms,
        time_to_first_token_ms=t.time_to_first_token_ms,
        prompt_tokens_per_second=t.prompt_tokens_per_second,
        decode_tokens_per_second=t.decode_tokens_per_second,
        total_ms=t.total_ms,
        draft_tokens=t.draft_tokens,
        draft_accepted_tokens=t.draft_accepted_tokens,
    )


def _timings_from_proto(t: pb.Timings) -> Timings:
    return Timings(
        queue_ms=t.queue_ms,
        time_to_first_token_ms=t.time_to_first_token_ms,
        prompt_tokens_per_second=t.prompt_tokens_per_second,
        decode_tokens_per_second=t.decode_tokens_per_second,
        total_ms=t.total_ms,
        draft_tokens=t.draft_tokens,
        draft_accepted_tokens=t.draft_accepted_tokens,
    )


def chunk_response_to_proto(c: Chunk, prompt_tokens: int = 0) -> pb.CompleteResponse:
    """`prompt_tokens`: set it on a stream's first chunk (0 leaves the field unset)."""
    return pb.CompleteResponse(
        chunk=pb.Chunk(
            text=c.text,
            token_ids=list(c.token_ids),
            n_tokens=c.n_tokens,
            logprobs=_logprobs_to_proto(c.logprobs),
            prompt_tokens=prompt_tokens,
        )
    )


def completion_response_to_proto(c: Completion) -> pb.CompleteResponse:
    return pb.CompleteResponse(
        completion=pb.Completion(
            text=c.text,
            token_ids=list(c.token_ids),
            stop_reason=_STOP_TO_PROTO[c.stop_reason],
            stop_sequence=c.stop_sequence or "",
            usage=_usage_to_proto(c.usage),
            timings=_timings_to_proto(c.timings),
            logprobs=_logprobs_to_proto(c.logprobs),
            has_logprobs=c.logprobs is not None,
        )
    )


def complete_response_from_proto(m: pb.CompleteResponse, logprobs_requested: bool = False) -> Union[Chunk, Completion]:
    """A Chunk or the final Completion. Chunk logprobs are None unless they were requested."""
    if m.WhichOneof("response") == "chunk":
        c = m.chunk
        lps = _logprobs_from_proto(c.logprobs) if (logprobs_requested or len(c.logprobs)) else None
        return Chunk(c.text, tuple(c.token_ids), c.n_tokens, lps)
    f = m.completion
    return Completion(
        text=f.text,
        token_ids=tuple(f.token_ids),
        stop_reason=_STOP_FROM_PROTO.get(f.stop_reason, StopReason.CANCELLED),
        stop_sequence=f.stop_sequence or None,
        usage=_usage_from_proto(f.usage),
        timings=_timings_from_proto(f.timings),
        logprobs=_logprobs_from_proto(f.logprobs) if f.has_logprobs else None,
    )


def model_info_to_proto(m: ModelInfo) -> pb.GetModelResponse:
    return pb.GetModelResponse(model=pb.ModelInfo(**dataclasses.asdict(m)))


def model_info_from_proto(r: pb.GetModelResponse) -> ModelInfo:
    return ModelInfo.from_attributes(r.model)


# ---- chat -------------------------------------------------------------------------------
def _message_to_proto(m: ChatMessage) -> pb.ChatMessage:
    msg = pb.ChatMessage(
        role=m.role,
        tool_calls=[pb.ChatToolCall(id=c.id, name=c.name, arguments=c.arguments) for c in m.tool_calls],
        tool_call_id=m.tool_call_id or "",
        name=m.name or "",
        reasoning_content=m.reasoning_content or "",
    )
    if m.content is not None:
        msg.content = m.content
    return msg


def _message_from_proto(m: pb.ChatMessage) -> ChatMessage:
    return ChatMessage(
        role=m.role,
        content=m.content if m.HasField("content") else None,
        tool_calls=tuple(ToolCall(c.id, c.name, c.arguments) for c in m.tool_calls),
        tool_call_id=m.tool_call_id or None,
        name=m.name or None,
        reasoning_content=m.reasoning_content or None,
    )


def chat_request_to_proto(request: ChatRequest, options: Optional[CompletionOptions]) -> pb.ChatRequest:
    msg = pb.ChatRequest(
        messages=[_message_to_proto(m) for m in request.messages],
        tools=[
            pb.ChatTool(name=t.name, description=t.description, parameters=json.dumps(dict(t.parameters)))
            for t in request.tools
        ],
        tool_choice=request.tool_choice,
        parallel_tool_calls=request.parallel_tool_calls,
        options=options_to_proto(options or _DEFAULTS),
    )
    rf = request.response_format
    if rf is not None:
        msg.response_format.CopyFrom(
            pb.ChatResponseFormat(type=rf.type, schema=json.dumps(rf.schema) if rf.schema is not None else "", name=rf.name)
        )
    return msg


def _json_field(text: str, field: str, violations: list[FieldViolation]) -> Any:
    try:
        return json.loads(text)
    except ValueError as e:
        violations.append(FieldViolation(field, f"not JSON: {e}"))
        return None


def chat_request_from_proto(m: pb.ChatRequest) -> tuple[ChatRequest, CompletionOptions]:
    """Raises InvalidArgumentError for JSON text fields that do not parse (the field named)."""
    problems: list[FieldViolation] = []
    tools = []
    for i, t in enumerate(m.tools):
        parameters = _json_field(t.parameters, f"tools[{i}].parameters", problems) if t.parameters else None
        tools.append(Tool(t.name, t.description, parameters if parameters is not None else {"type": "object", "properties": {}}))
    response_format = None
    if m.HasField("response_format"):
        rf = m.response_format
        schema = _json_field(rf.schema, "response_format", problems) if rf.schema else None
        response_format = ResponseFormat(rf.type or "text", schema, rf.name or "response")
    if problems:
        raise InvalidArgumentError.from_violations(problems)
    request = ChatRequest(
        messages=tuple(_message_from_proto(x) for x in m.messages),
        tools=tuple(tools),
        tool_choice=m.tool_choice or ToolChoice.AUTO,
        response_format=response_format,
        parallel_tool_calls=m.parallel_tool_calls,
    )
    return request, options_from_proto(m.options)


def chat_chunk_response_to_proto(c: ChatChunk, first: bool = False, prompt_tokens: int = 0) -> pb.ChatResponse:
    """`first`: a stream's first chunk also carries the reply's id, time, model, prompt length."""
    delta = pb.ChatDelta(
        role=c.delta.role or "",
        tool_calls=[
            pb.ToolCallDelta(index=d.index, id=d.id or "", name=d.name or "", arguments=d.arguments)
            for d in c.delta.tool_calls
        ],
    )
    if c.delta.content is not None:
        delta.content = c.delta.content
    if c.delta.reasoning_content is not None:
        delta.reasoning_content = c.delta.reasoning_content
    chunk = pb.ChatChunk(delta=delta, token_ids=list(c.token_ids), n_tokens=c.n_tokens)
    if first:
        chunk.id, chunk.created, chunk.model, chunk.prompt_tokens = c.id, c.created, c.model, prompt_tokens
    return pb.ChatResponse(chunk=chunk)


def chat_completion_response_to_proto(c: ChatCompletion) -> pb.ChatResponse:
    return pb.ChatResponse(
        completion=pb.ChatCompletion(
            id=c.id,
            created=c.created,
            model=c.model,
            message=_message_to_proto(c.message),
            finish_reason=c.finish_reason,
            usage=_usage_to_proto(c.usage),
            timings=_timings_to_proto(c.timings),
        )
    )


@dataclasses.dataclass
class ChatStreamHeader:
    """What a Chat stream's first chunk says once for all: the reply's id, time, model
    and the prompt's length (the client's later chunks reuse it)."""

    id: str = ""
    created: int = 0
    model: str = ""
    prompt_tokens: int = 0


def chat_response_from_proto(m: pb.ChatResponse, header: ChatStreamHeader) -> Union[ChatChunk, ChatCompletion]:
    """A ChatChunk or the final ChatCompletion; `header` is filled from the first chunk."""
    if m.WhichOneof("response") == "chunk":
        c = m.chunk
        if c.id:
            header.id, header.created, header.model, header.prompt_tokens = c.id, c.created, c.model, c.prompt_tokens
        d = c.delta
        delta = ChatDelta(
            role=d.role or None,
            content=d.content if d.HasField("content") else None,
            reasoning_content=d.reasoning_content if d.HasField("reasoning_content") else None,
            tool_calls=tuple(ToolCallDelta(t.index, t.id or None, t.name or None, t.arguments) for t in d.tool_calls),
        )
        return ChatChunk(header.id, header.created, header.model, delta, tuple(c.token_ids), c.n_tokens)
    f = m.completion
    return ChatCompletion(
        id=f.id,
        created=f.created,
        model=f.model,
        message=_message_from_proto(f.message),
        finish_reason=f.finish_reason,
        usage=_usage_from_proto(f.usage),
        timings=_timings_from_proto(f.timings),
    )
