"""`llama-crab serve` options: flags, their environment twins, defaults and validation."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import pytest

from llama_crab.server.config import OPTIONS, ConfigError, ServeConfig, add_serve_parser, config_from_args
from llama_crab.server.logs import configure_logging, log_event, new_request_id, request_id_var


def parse(argv: list[str], env: dict[str, str] | None = None) -> ServeConfig:
    parser = argparse.ArgumentParser(prog="llama-crab")
    add_serve_parser(parser.add_subparsers(dest="command", required=True))
    return config_from_args(parser.parse_args(["serve", *argv]), env or {})


def test_no_flags_serves_the_default_model_on_localhost() -> None:
    config = parse([])
    assert config == ServeConfig()
    assert (config.model, config.host, config.port) == ("smollm2-135m", "127.0.0.1", 50051)
    assert config.address == "127.0.0.1:50051"
    assert config.metrics_port == 0 and config.auth_token is None and config.tls_cert is None


def test_every_option_has_a_flag_and_an_env_twin_in_help() -> None:
    parser = argparse.ArgumentParser(prog="llama-crab")
    sub = parser.add_subparsers(dest="command")
    help_text = add_serve_parser(sub).format_help()
    fields = {f.name for f in ServeConfig.__dataclass_fields__.values()}
    assert {o.dest for o in OPTIONS} == fields  # nothing configurable only from code
    for option in OPTIONS:
        assert option.flag in help_text
        assert option.env in help_text
        assert option.env == "LLAMA_CRAB_" + option.dest.upper()


def test_env_twin_applies_and_the_flag_wins() -> None:
    env = {"LLAMA_CRAB_PORT": "6000", "LLAMA_CRAB_PARALLEL": "2", "LLAMA_CRAB_LOG_FORMAT": "json"}
    config = parse([], env)
    assert (config.port, config.parallel, config.log_format) == (6000, 2, "json")
    assert parse(["--port", "7000"], env).port == 7000


def test_reflection_can_be_switched_off_both_ways() -> None:
    assert parse(["--reflection", "false"]).reflection is False
    assert parse([], {"LLAMA_CRAB_REFLECTION": "off"}).reflection is False
    assert parse([]).reflection is True


def test_bad_env_value_names_the_variable() -> None:
    with pytest.raises(ConfigError, match="LLAMA_CRAB_PORT"):
        parse([], {"LLAMA_CRAB_PORT": "fifty"})
    with pytest.raises(ConfigError, match="LLAMA_CRAB_LOG_FORMAT"):
        parse([], {"LLAMA_CRAB_LOG_FORMAT": "xml"})


def test_bad_flag_value_exits_with_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        parse(["--port", "fifty"])
    assert exc.value.code == 2
    assert "--port" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "flag"),
    [
        (["--port", "70000"], "--port (LLAMA_CRAB_PORT)"),
        (["--parallel", "0"], "--parallel (LLAMA_CRAB_PARALLEL)"),
        (["--max-queue", "-1"], "--max-queue"),
        (["--grace", "-2"], "--grace"),
        (["--tls-cert", "cert.pem"], "--tls-cert"),
        (["--tls-client-ca", "ca.pem"], "--tls-client-ca"),
        (["--auth-token-file", "/nonexistent/token"], "--auth-token-file"),
        (["--auth-token", " "], "--auth-token"),
    ],
)
def test_invalid_settings_name_the_flag(argv: list[str], flag: str) -> None:
    with pytest.raises(ConfigError, match=flag.replace("(", r"\(").replace(")", r"\)")):
        parse(argv)


def test_auth_token_file_is_read_and_stripped(tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("s3cret\n")
    assert parse(["--auth-token-file", str(token_file)]).resolved_auth_token() == "s3cret"
    assert parse(["--auth-token", "abc"]).resolved_auth_token() == "abc"
    assert parse([]).resolved_auth_token() is None


def test_json_logs_carry_the_request_id_and_fields(capsys: pytest.CaptureFixture[str]) -> None:
    import sys

    logger = logging.getLogger("llama_crab")
    saved = (list(logger.handlers), logger.level, logger.propagate)
    configure_logging("info", "json", stream=sys.stderr)
    try:
        token = request_id_var.set("req-42")
        log_event("completion finished", stop_reason="length", completion_tokens=3)
        request_id_var.reset(token)
        log_event("no request here", logging.WARNING)
    finally:
        logger.handlers[:], logger.level, logger.propagate = saved
    lines = [json.loads(line) for line in capsys.readouterr().err.splitlines()]
    assert lines[0]["msg"] == "completion finished" and lines[0]["request_id"] == "req-42"
    assert lines[0]["stop_reason"] == "length" and lines[0]["completion_tokens"] == 3
    assert lines[1]["level"] == "warning" and "request_id" not in lines[1]


def test_request_ids_are_kept_or_generated() -> None:
    assert new_request_id("client-7") == "client-7"
    generated = new_request_id(None)
    assert len(generated) == 32 and generated != new_request_id(None)
    assert new_request_id("\x00\x01") != "\x00\x01"  # unprintable ids are replaced
    assert len(new_request_id("x" * 1000)) == 128
