"""The client package without a server: proto conversion both ways, the error mapping,
request validation, channel settings and the delivered-completion helper."""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any, Optional

import grpc
import pytest

from llama_crab_client import Client, convert
from llama_crab_client.calls import complete_call, detokenize_request
from llama_crab_client.channel import ChannelSettings, lists_several_servers, read_pem
from llama_crab_client.errors import (
    DeadlineExceededError,
    InternalError,
    InvalidArgumentError,
    LlamaCrabError,
    PermissionDeniedError,
    ResourceExhaustedError,
    UnauthenticatedError,
    UnavailableError,
)
from llama_crab_client.status import exception_to_status, from_rpc_error, rpc_error_to_exception
from llama_crab_client.types import (
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
    completion_from_delivered,
)
from llama_crab_client.sampling import AdaptiveP, Dist, Dry, Greedy, Mirostat, SamplerChain, SamplerStage, TopK
from llama_crab_client.v1 import llama_crab_pb2 as pb

# Values exactly representable as float32, so a round trip through the proto is exact.
FULL_OPTIONS = CompletionOptions(
    max_tokens=7,
    stop_sequences=("\n\n", "END"),
    logprobs=2,
    temperature=0.5,
    top_k=10,
    top_p=0.75,
    min_p=0.125,
    typical_p=0.5,
    repeat_penalty=1.25,
    presence_penalty=-0.5,
    frequency_penalty=0.25,
    penalty_last_n=-1,
    seed=1234,
    logit_bias={5: -math.inf, 17: 2.5},
    grammar='root ::= "yes" | "no"',
    samplers=("top_k", "temperature"),
    cache_prompt=False,
    speculative=False,
    min_keep=3,
    top_n_sigma=1.5,
    xtc_probability=0.5,
    xtc_threshold=0.25,
    dry_multiplier=0.75,
    dry_base=2.0,
    dry_allowed_length=3,
    dry_penalty_last_n=-1,
    dry_sequence_breakers=("\n", "::"),
    mirostat=2,
    mirostat_tau=4.5,
    mirostat_eta=0.125,
    dynatemp_range=0.5,
    dynatemp_exponent=1.5,
    adaptive_target=0.25,
    adaptive_decay=0.5,
    ignore_eos=True,
    min_tokens=4,
    json_schema='{"type": "object"}',
    sampler_chain=SamplerChain()
    .penalties(32, 1.25, 0.5, -0.5)
    .dry(0.5, 2.0, 3, -1, ("x",))
    .top_k(5)
    .typical(0.5, 1)
    .top_p(0.75, 2)
    .min_p(0.125, 3)
    .xtc(0.25, 0.5, 1)
    .top_n_sigma(2.5)
    .temp(0.5)
    .dynamic_temp(0.75, 0.25, 2.0)
    .mirostat_v2(3.5, 0.25),
)

LOGPROBS = (
    TokenLogprob(5, "a", -0.25, (TopLogprob(5, "a", -0.25), TopLogprob(6, "b", -2.0))),
    TokenLogprob(9, "ü", -1.5, ()),
)


# ---- conversion -------------------------------------------------------------------------
@pytest.mark.parametrize("options", [CompletionOptions(), FULL_OPTIONS], ids=["defaults", "every-field"])
def test_options_round_trip(options: CompletionOptions) -> None:
    wire = pb.CompletionOptions.FromString(convert.options_to_proto(options).SerializeToString())
    assert convert.options_from_proto(wire) == options


def test_full_options_set_every_field() -> None:
    """So the round trip above covers each option, including ones added later."""
    defaults = CompletionOptions()
    unset = [f.name for f in dataclasses.fields(CompletionOptions) if getattr(FULL_OPTIONS, f.name) == getattr(defaults, f.name)]
    assert unset == []


@pytest.mark.parametrize("stage", [Greedy(), Dist(), Mirostat(4.5, 0.25, 50), AdaptiveP(0.25, 0.5), Dry(), TopK()])
def test_every_stage_round_trips(stage: SamplerStage) -> None:
    wire = pb.SamplerStage.FromString(convert.stage_to_proto(stage).SerializeToString())
    assert convert.stage_from_proto(wire) == stage


def test_unset_proto_options_mean_the_shared_defaults() -> None:
    assert convert.options_from_proto(pb.CompletionOptions()) == CompletionOptions()


def test_explicit_zeros_stay_zeros() -> None:
    """0 is a value, not "unset": max_tokens=0 must reach validation, top_p=0 must not become 0.95."""
    got = convert.options_from_proto(pb.CompletionOptions(max_tokens=0, top_p=0.0, top_k=0, seed=0, logprobs=0))
    assert (got.max_tokens, got.top_p, got.top_k, got.seed, got.logprobs) == (0, 0.0, 0, 0, 0)
    assert [v.field for v in got.violations()] == ["max_tokens"]


def test_complete_request_round_trip() -> None:
    prompt, options = convert.complete_request_from_proto(convert.complete_request_to_proto("hi", FULL_OPTIONS))
    assert (prompt, options) == ("hi", FULL_OPTIONS)
    prompt, options = convert.complete_request_from_proto(convert.complete_request_to_proto([1, 2, 3], None))
    assert (prompt, options) == ([1, 2, 3], CompletionOptions())


def test_tokenize_request_defaults_to_true() -> None:
    assert convert.tokenize_request_from_proto(pb.TokenizeRequest(text="x")) == ("x", True, True)
    assert convert.tokenize_request_from_proto(convert.tokenize_request_to_proto("x", False, False)) == ("x", False, False)


@pytest.mark.parametrize("logprobs", [None, (), LOGPROBS], ids=["off", "on-empty", "on"])
def test_chunk_round_trip(logprobs: Optional[tuple[TokenLogprob, ...]]) -> None:
    chunk = Chunk("aü", (5, 9), 4, logprobs)
    wire = pb.CompleteResponse.FromString(convert.chunk_response_to_proto(chunk).SerializeToString())
    assert convert.complete_response_from_proto(wire, logprobs_requested=logprobs is not None) == chunk


@pytest.mark.parametrize("logprobs", [None, (), LOGPROBS], ids=["off", "on-empty", "on"])
@pytest.mark.parametrize("stop", [StopReason.LENGTH, StopReason.EOS, StopReason.STOP_SEQUENCE, StopReason.CANCELLED])
def test_completion_round_trip(stop: StopReason, logprobs: Optional[tuple[TokenLogprob, ...]]) -> None:
    completion = Completion(
        text="aü",
        token_ids=(5, 9),
        stop_reason=stop,
        stop_sequence="END" if stop is StopReason.STOP_SEQUENCE else None,
        usage=Usage(3, 2, 1),
        timings=Timings(0.5, 12.25, 100.0, 50.0, 60.5),
        logprobs=logprobs,
    )
    wire = pb.CompleteResponse.FromString(convert.completion_response_to_proto(completion).SerializeToString())
    assert convert.complete_response_from_proto(wire) == completion


def test_model_info_round_trip() -> None:
    info = ModelInfo("m", "llama", "llama 135M Q4_1", 134_515_008, 8192, 2048, 49152, True, 4)
    wire = pb.GetModelResponse.FromString(convert.model_info_to_proto(info).SerializeToString())
    assert convert.model_info_from_proto(wire) == info


# ---- errors -----------------------------------------------------------------------------
class FakeRpcError(grpc.RpcError):
    """What grpc raises on the client: code(), details() and trailing_metadata()."""

    def __init__(self, status: grpc.Status) -> None:
        self._status = status

    def code(self) -> grpc.StatusCode:
        return self._status.code

    def details(self) -> str:
        return self._status.details

    def trailing_metadata(self) -> Any:
        return self._status.trailing_metadata


ALL_ERRORS = [
    InvalidArgumentError,
    ResourceExhaustedError,
    UnavailableError,
    DeadlineExceededError,
    UnauthenticatedError,
    PermissionDeniedError,
    InternalError,
]


@pytest.mark.parametrize("cls", ALL_ERRORS)
def test_every_error_survives_the_wire(cls: type[LlamaCrabError]) -> None:
    status = exception_to_status(cls("it broke"))
    assert status.code.name == cls.status
    back = rpc_error_to_exception(FakeRpcError(status))
    assert type(back) is cls
    assert back.message == "it broke"


def test_field_violations_travel_as_bad_request() -> None:
    error = InvalidArgumentError.from_violations(
        [FieldViolation("top_p", "must be in [0.0, 1.0]"), FieldViolation("max_tokens", "must be >= 1")]
    )
    back = from_rpc_error(FakeRpcError(exception_to_status(error)))
    assert isinstance(back, InvalidArgumentError)
    assert back.violations == error.violations
    assert back.field == "top_p"
    assert back.message == error.message


def test_unknown_codes_and_bad_trailers_still_map() -> None:
    class Plain(grpc.RpcError):
        def code(self) -> grpc.StatusCode:
            return grpc.StatusCode.UNIMPLEMENTED

        def details(self) -> str:
            return "no such method"

        def trailing_metadata(self) -> Any:
            return (("grpc-status-details-bin", b"\xff not a status"),)

    error = from_rpc_error(Plain())
    assert type(error) is LlamaCrabError
    assert "UNIMPLEMENTED" in error.message and error.violations == ()


def test_unreachable_server_is_unavailable() -> None:
    # Port 1 on loopback refuses connections: UNAVAILABLE, quickly, without retries.
    with Client("127.0.0.1:1", retry_unavailable=False, timeout=10) as client:
        with pytest.raises(UnavailableError):
            client.tokenize("hi")
        with pytest.raises(UnavailableError):
            client.create_completion("hi", CompletionOptions(2))


# ---- request validation ------------------------------------------------------------------
@pytest.mark.parametrize(
    ("field", "prompt", "options"),
    [
        ("max_tokens", "hi", CompletionOptions(0)),
        ("top_p", "hi", CompletionOptions(top_p=2.0)),
        ("seed", "hi", CompletionOptions(seed=-1)),
        ("logprobs", "hi", CompletionOptions(logprobs=21)),
        ("samplers", "hi", CompletionOptions(samplers=())),
        ("prompt", "", None),
        ("prompt", [], None),
        ("prompt", [1, 2**40], None),
        ("prompt", [1, "2"], None),
    ],
)
def test_bad_requests_fail_before_the_network(field: str, prompt: Any, options: Optional[CompletionOptions]) -> None:
    with pytest.raises(InvalidArgumentError) as raised:
        complete_call(prompt, options)
    assert raised.value.field == field


def test_options_must_be_completion_options() -> None:
    with pytest.raises(TypeError):
        complete_call("hi", {"max_tokens": 4})  # type: ignore[arg-type]


def test_a_good_request_is_built_once_checked() -> None:
    call = complete_call([1, 2, 3], CompletionOptions(4).with_logprobs(1))
    assert call.logprobs_requested and call.prompt_tokens == 3
    assert list(call.request.tokens.ids) == [1, 2, 3]
    assert complete_call("hi", None).prompt_tokens == 0
    with pytest.raises(InvalidArgumentError, match="tokens"):
        detokenize_request([-(2**40)])


# ---- delivered completion ---------------------------------------------------------------
def test_completion_from_delivered_keeps_only_what_was_delivered() -> None:
    delivered = [Chunk("a", (5,), 1, LOGPROBS[:1]), Chunk("ü", (9,), 2, LOGPROBS[1:])]
    final = Completion("aüzz", (5, 9, 7, 7), StopReason.LENGTH, None, Usage(3, 4, 1), Timings(total_ms=9.0), LOGPROBS)
    got = completion_from_delivered(final, delivered)
    assert got == Completion("aü", (5, 9), StopReason.CANCELLED, None, Usage(3, 2, 1), Timings(total_ms=9.0), LOGPROBS)

    remote = completion_from_delivered(None, delivered[:1], prompt_tokens=3, logprobs_requested=True)
    assert (remote.text, remote.usage, remote.logprobs) == ("a", Usage(3, 1, 0), LOGPROBS[:1])
    assert completion_from_delivered(None, [], logprobs_requested=True).logprobs == ()
    assert completion_from_delivered(None, [Chunk("a", (5,), 1)]).logprobs is None


# ---- channel settings ---------------------------------------------------------------------
@pytest.mark.parametrize(
    ("target", "several"),
    [
        ("localhost:50051", False),
        ("dns:///llama.svc:50051", True),
        ("ipv4:10.0.0.1:50051,10.0.0.2:50051", True),
        ("ipv4:10.0.0.1:50051", False),
        ("unix:/tmp/llama.sock", False),
    ],
)
def test_round_robin_for_targets_listing_several_servers(target: str, several: bool) -> None:
    assert lists_several_servers(target) is several
    config = json.loads(dict(ChannelSettings(target).options())["grpc.service_config"])
    assert ("loadBalancingConfig" in config) is several
    if several:
        assert config["loadBalancingConfig"] == [{"round_robin": {}}]


def test_unavailable_is_retried_only_when_asked() -> None:
    config = json.loads(dict(ChannelSettings("h:1").options())["grpc.service_config"])
    policy = config["methodConfig"][0]["retryPolicy"]
    assert policy["retryableStatusCodes"] == ["UNAVAILABLE"]
    assert config["methodConfig"][0]["name"] == [{"service": "llama_crab.v1.LlamaCrabService"}]
    off = dict(ChannelSettings("h:1", retry_unavailable=False).options())
    assert off["grpc.enable_retries"] == 0 and "methodConfig" not in json.loads(off["grpc.service_config"])


def test_metadata_and_keepalive() -> None:
    settings = ChannelSettings("h:1", token="s3cret", keepalive_time=30)
    assert settings.metadata("req-1") == (("authorization", "Bearer s3cret"), ("x-request-id", "req-1"))
    assert ChannelSettings("h:1").metadata() == ()
    options = dict(settings.options())
    assert options["grpc.keepalive_time_ms"] == 30_000
    assert "grpc.keepalive_time_ms" not in dict(ChannelSettings("h:1").options())


@pytest.mark.parametrize(
    "kwargs",
    [
        {"target": ""},
        {"target": "h:1", "certificate_chain": b"cert"},
        {"target": "h:1", "keepalive_time": 0},
        {"target": "h:1", "token": " "},
    ],
)
def test_bad_channel_settings_are_refused(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        ChannelSettings(**kwargs)


def test_tls_is_on_when_any_certificate_is_given(tmp_path: Any) -> None:
    assert not ChannelSettings("h:1").uses_tls
    assert ChannelSettings("h:1", tls=True).uses_tls
    assert ChannelSettings("h:1", root_certificates=b"x").uses_tls
    pem = "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"
    path = tmp_path / "ca.pem"
    path.write_text(pem)
    assert read_pem(str(path)) == read_pem(pem) == read_pem(pem.encode()) == pem.encode()
    assert read_pem(None) is None
