"""What only the remote client has: deadlines, bearer tokens, TLS and mutual TLS, request
ids, and the `llama-crab-client complete` command (streaming, --json, errors, Ctrl-C)."""

from __future__ import annotations

import datetime
import ipaddress
import io
import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from llama_crab import Llama
from llama_crab_client import Client, CompletionOptions, StopReason
from llama_crab_client.cli import main
from llama_crab_client.errors import DeadlineExceededError, LlamaCrabError, UnauthenticatedError

PROMPT = "The capital of France is"
TOKEN = "client-test-token"


@pytest.fixture(scope="module")
def server_address(llama: Llama) -> Iterator[str]:
    from llama_crab.server.testing import start_test_server

    server = start_test_server(llama)
    yield server.address
    server.stop()


# ---- deadlines, tokens, request ids -------------------------------------------------------
def test_deadline_exceeded(server_address: str) -> None:
    with Client(server_address, timeout=0.05) as client:
        with pytest.raises(DeadlineExceededError):
            client.create_completion("Once upon a time", CompletionOptions(500))
        # A per-call timeout overrides the client's default.
        assert client.create_completion(PROMPT, CompletionOptions(2), timeout=60).usage.completion_tokens > 0


def test_bearer_token(llama: Llama) -> None:
    from llama_crab.server.testing import start_test_server

    with start_test_server(llama, auth_token=TOKEN) as server:
        with Client(server.address, token=TOKEN, timeout=60) as client:
            assert client.create_completion(PROMPT, CompletionOptions(2)).usage.completion_tokens > 0
        for token in (None, "wrong-token"):
            with Client(server.address, token=token, timeout=60) as client:
                with pytest.raises(UnauthenticatedError):
                    client.model_info()
                with pytest.raises(UnauthenticatedError):
                    client.create_completion(PROMPT, CompletionOptions(2))


def test_request_id_reaches_the_server_logs(server_address: str, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="llama_crab"):
        with Client(server_address, timeout=60) as client:
            client.create_completion(PROMPT, CompletionOptions(2), request_id="client-req-42")
        deadline = time.monotonic() + 5  # the server logs the finish on its own thread
        while time.monotonic() < deadline and not any(
            getattr(r, "request_id", None) == "client-req-42" for r in caplog.records
        ):
            time.sleep(0.05)
    assert any(getattr(r, "request_id", None) == "client-req-42" for r in caplog.records)


# ---- TLS ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Pki:
    ca_file: Path
    server_cert: Path
    server_key: Path
    client_cert: bytes
    client_key: bytes


def _make_pki(directory: Path) -> Pki:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.timezone.utc)

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    def key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
        return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())

    def builder(subject: str, issuer: x509.Name, key: ec.EllipticCurvePrivateKey) -> x509.CertificateBuilder:
        return (
            x509.CertificateBuilder()
            .subject_name(name(subject))
            .issuer_name(issuer)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(hours=1))
        )

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (
        builder("client-test CA", name("client-test CA"), ca_key)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    server_key = ec.generate_private_key(ec.SECP256R1())
    server = (
        builder("localhost", ca.subject, server_key)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    client_key = ec.generate_private_key(ec.SECP256R1())
    client = (
        builder("client", ca.subject, client_key)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    (directory / "ca.pem").write_bytes(ca.public_bytes(pem))
    (directory / "server.pem").write_bytes(server.public_bytes(pem))
    (directory / "server.key").write_bytes(key_pem(server_key))
    return Pki(
        directory / "ca.pem",
        directory / "server.pem",
        directory / "server.key",
        client.public_bytes(pem),
        key_pem(client_key),
    )


def test_mutual_tls(llama: Llama, tmp_path: Path) -> None:
    pytest.importorskip("cryptography")
    from llama_crab.server.testing import start_test_server

    pki = _make_pki(tmp_path)
    with start_test_server(
        llama, tls_cert=str(pki.server_cert), tls_key=str(pki.server_key), tls_client_ca=str(pki.ca_file)
    ) as server:
        target = f"localhost:{server.port}"
        # CA as a path, client certificate and key as PEM bytes.
        with Client(
            target, root_certificates=str(pki.ca_file), certificate_chain=pki.client_cert, private_key=pki.client_key
        ) as client:
            completion = client.create_completion(PROMPT, CompletionOptions(2), timeout=60)
            assert completion.stop_reason is StopReason.LENGTH
        # TLS without a client certificate, and plaintext, are both refused.
        for refused in (Client(target, root_certificates=str(pki.ca_file)), Client(target)):
            with refused, pytest.raises(LlamaCrabError):
                refused.model_info(timeout=10)


# ---- the command --------------------------------------------------------------------------
def test_cli_streams_the_text(server_address: str, llama: Llama, capsys: pytest.CaptureFixture[str]) -> None:
    expected = llama.create_completion(PROMPT, CompletionOptions(8)).text
    assert main(["complete", PROMPT, "--server", server_address, "-n", "8"]) == 0
    out = capsys.readouterr().out
    assert out == expected + ("" if expected.endswith("\n") else "\n")


def test_cli_json_lines(server_address: str, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["complete", PROMPT, "--server", server_address, "-n", "8", "--json", "--logprobs", "1", "--stop", "zzz"]
    assert main(argv) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [line["type"] for line in lines] == ["chunk"] * (len(lines) - 1) + ["completion"]
    final = lines[-1]
    assert "".join(line["text"] for line in lines[:-1]) == final["text"]
    assert final["stop_reason"] in ("length", "eos")
    assert len(final["logprobs"]) == len(final["token_ids"]) == final["usage"]["completion_tokens"]


def test_cli_has_a_flag_for_every_sampler_option(server_address: str, llama: Llama, capsys: pytest.CaptureFixture[str]) -> None:
    options = CompletionOptions(
        8, temperature=1.0, seed=3, mirostat=2, mirostat_tau=3.0, dry_multiplier=1.0, dry_sequence_breakers=("\n", "."),
        ignore_eos=True, min_tokens=2, samplers=None,
    )  # fmt: skip
    expected = llama.create_completion(PROMPT, options).text
    argv = ["complete", PROMPT, "--server", server_address, "-n", "8", "--temperature", "1.0", "--seed", "3",
            "--mirostat", "2", "--mirostat-tau", "3.0", "--dry-multiplier", "1.0", "--dry-sequence-breaker", "\n",
            "--dry-sequence-breaker", ".", "--ignore-eos", "--min-tokens", "2"]  # fmt: skip
    assert main(argv) == 0
    assert capsys.readouterr().out.rstrip("\n") == expected.rstrip("\n")


def test_cli_reports_bad_options(server_address: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["complete", PROMPT, "--server", server_address, "--top-p", "2"]) == 1
    err = capsys.readouterr().err
    assert "INVALID_ARGUMENT" in err and "top_p" in err


def test_cli_reads_the_prompt_from_stdin(
    server_address: str, llama: Llama, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sys, "stdin", io.StringIO(PROMPT))
    assert main(["complete", "-", "--server", server_address, "-n", "4"]) == 0
    assert capsys.readouterr().out.rstrip("\n") == llama.create_completion(PROMPT, CompletionOptions(4)).text.rstrip("\n")


def test_cli_ctrl_c_cancels_cleanly(server_address: str) -> None:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "llama_crab_client.cli", "complete", "Once upon a time", "--server", server_address,
         "-n", "2000", "--json"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        # As from a terminal: a suite started in the background (`cmd &` in a script)
        # passes SIGINT on as ignored, and Python then never turns it into Ctrl-C.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )  # fmt: skip
    assert proc.stdout is not None
    first = proc.stdout.readline()  # wait for the first chunk: the stream is running
    assert json.loads(first)["type"] == "chunk"
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    lines = [json.loads(line) for line in (first + out).splitlines()]
    final = lines[-1]
    assert final["type"] == "completion" and final["stop_reason"] == "cancelled"
    assert final["text"] == "".join(line["text"] for line in lines[:-1])
