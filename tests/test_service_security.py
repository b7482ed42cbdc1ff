"""TLS, mutual TLS and bearer-token auth: the right client gets in, the wrong one does not."""

from __future__ import annotations

import datetime
import http.client
import ipaddress
import ssl
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from llama_crab import Llama
from llama_crab.server.testing import TestServer, start_test_server
from llama_crab_client.v1 import llama_crab_pb2 as pb
from llama_crab_client.v1 import llama_crab_pb2_grpc as pb_grpc


TOKEN = "test-token-1234"


@dataclass(frozen=True)
class Pem:
    cert: bytes
    key: bytes


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def make_ca(name: str) -> tuple[Pem, ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = _key()
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(name))
        .issuer_name(_name(name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(key, hashes.SHA256())
    )
    return Pem(cert.public_bytes(serialization.Encoding.PEM), _key_pem(key)), key, cert


def make_leaf(ca_key: ec.EllipticCurvePrivateKey, ca_cert: x509.Certificate, name: str, server: bool) -> Pem:
    key = _key()
    now = datetime.datetime.now(datetime.timezone.utc)
    usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(name))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    )
    if server:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
    cert = builder.sign(ca_key, hashes.SHA256())
    return Pem(cert.public_bytes(serialization.Encoding.PEM), _key_pem(key))


@dataclass(frozen=True)
class Pki:
    ca: Pem
    server: Pem
    client: Pem
    stranger: Pem  # a client certificate from a CA the server does not trust
    ca_file: Path
    server_cert_file: Path
    server_key_file: Path


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    directory = tmp_path_factory.mktemp("pki")
    ca, ca_key, ca_cert = make_ca("llama-crab test CA")
    _, other_key, other_cert = make_ca("some other CA")
    server = make_leaf(ca_key, ca_cert, "localhost", server=True)
    client = make_leaf(ca_key, ca_cert, "client", server=False)
    stranger = make_leaf(other_key, other_cert, "stranger", server=False)
    files = {"ca.pem": ca.cert, "server.pem": server.cert, "server.key": server.key}
    for name, data in files.items():
        (directory / name).write_bytes(data)
    return Pki(ca, server, client, stranger, directory / "ca.pem", directory / "server.pem", directory / "server.key")


def get_model(channel: grpc.Channel, metadata: tuple[tuple[str, str], ...] = ()) -> pb.ModelInfo:
    reply = pb_grpc.LlamaCrabServiceStub(channel).GetModel(pb.GetModelRequest(), metadata=metadata, timeout=10)
    return reply.model


def secure_channel(server: TestServer, pki: Pki, client: Pem | None) -> grpc.Channel:
    credentials = grpc.ssl_channel_credentials(
        root_certificates=pki.ca.cert,
        private_key=client.key if client else None,
        certificate_chain=client.cert if client else None,
    )
    return grpc.secure_channel(f"localhost:{server.port}", credentials)


@pytest.fixture(scope="module")
def tls_server(llama: Llama, pki: Pki) -> Iterator[TestServer]:
    with start_test_server(
        llama, tls_cert=str(pki.server_cert_file), tls_key=str(pki.server_key_file), http_port=0
    ) as server:
        yield server


@pytest.fixture(scope="module")
def mtls_server(llama: Llama, pki: Pki) -> Iterator[TestServer]:
    with start_test_server(
        llama,
        tls_cert=str(pki.server_cert_file),
        tls_key=str(pki.server_key_file),
        tls_client_ca=str(pki.ca_file),
        http_port=0,
    ) as server:
        yield server


@pytest.fixture(scope="module")
def token_server(llama: Llama) -> Iterator[TestServer]:
    with start_test_server(llama, auth_token=TOKEN) as server:
        yield server


def test_tls_accepts_a_client_trusting_the_ca(tls_server: TestServer, pki: Pki) -> None:
    with secure_channel(tls_server, pki, None) as channel:
        assert get_model(channel).n_slots == 4
    # The certificate names 127.0.0.1 too, so the plain address verifies as well.
    trusting = grpc.ssl_channel_credentials(root_certificates=pki.ca.cert)
    assert tls_server.health_status("", credentials=trusting) == "SERVING"


def https_health(server: TestServer, pki: Pki, client: Pem | None, tmp_path: Path) -> int:
    """GET /health over the HTTP API's TLS, trusting the test CA; the status."""
    context = ssl.create_default_context(cafile=str(pki.ca_file))
    if client is not None:
        (tmp_path / "client.pem").write_bytes(client.cert)
        (tmp_path / "client.key").write_bytes(client.key)
        context.load_cert_chain(tmp_path / "client.pem", tmp_path / "client.key")
    conn = http.client.HTTPSConnection("localhost", server.http_port, timeout=10, context=context)
    try:
        conn.request("GET", "/health")
        response = conn.getresponse()
        response.read()
        return response.status
    finally:
        conn.close()


def test_http_api_uses_the_same_tls(tls_server: TestServer, pki: Pki, tmp_path: Path) -> None:
    assert tls_server.http_url.startswith("https://")
    assert https_health(tls_server, pki, None, tmp_path) == 200
    plain = http.client.HTTPConnection("127.0.0.1", tls_server.http_port, timeout=10)
    try:
        with pytest.raises((http.client.HTTPException, ConnectionError)):
            plain.request("GET", "/health")
            plain.getresponse().read()
    finally:
        plain.close()


def test_http_api_uses_the_same_mutual_tls(mtls_server: TestServer, pki: Pki, tmp_path: Path) -> None:
    assert https_health(mtls_server, pki, pki.client, tmp_path) == 200
    for stranger in (None, pki.stranger):  # no certificate, or one the server's CA did not sign
        with pytest.raises((ssl.SSLError, ConnectionError)):
            https_health(mtls_server, pki, stranger, tmp_path)


def test_tls_refuses_plaintext(tls_server: TestServer) -> None:
    with grpc.insecure_channel(tls_server.address) as channel:
        with pytest.raises(grpc.RpcError) as exc:
            get_model(channel)
    assert exc.value.code() is grpc.StatusCode.UNAVAILABLE


def test_tls_refuses_a_client_not_trusting_the_server(tls_server: TestServer, pki: Pki) -> None:
    other_ca, _, _ = make_ca("not the server's CA")
    credentials = grpc.ssl_channel_credentials(root_certificates=other_ca.cert)
    with grpc.secure_channel(f"localhost:{tls_server.port}", credentials) as channel:
        with pytest.raises(grpc.RpcError) as exc:
            get_model(channel)
    assert exc.value.code() is grpc.StatusCode.UNAVAILABLE


def test_mtls_accepts_a_client_certificate_from_the_ca(mtls_server: TestServer, pki: Pki) -> None:
    with secure_channel(mtls_server, pki, pki.client) as channel:
        assert get_model(channel).n_slots == 4


@pytest.mark.parametrize("who", ["no certificate", "untrusted certificate"])
def test_mtls_refuses_other_clients(mtls_server: TestServer, pki: Pki, who: str) -> None:
    client = None if who == "no certificate" else pki.stranger
    with secure_channel(mtls_server, pki, client) as channel:
        with pytest.raises(grpc.RpcError) as exc:
            get_model(channel)
    assert exc.value.code() is grpc.StatusCode.UNAVAILABLE


def test_token_accepts_the_right_bearer(token_server: TestServer) -> None:
    with grpc.insecure_channel(token_server.address) as channel:
        assert get_model(channel, (("authorization", f"Bearer {TOKEN}"),)).n_slots == 4


@pytest.mark.parametrize(
    "metadata",
    [(), (("authorization", "Bearer wrong-token"),), (("authorization", TOKEN),), (("authorization", "Basic x"),)],
    ids=["missing", "wrong", "no scheme", "other scheme"],
)
def test_token_refuses_others(token_server: TestServer, metadata: tuple[tuple[str, str], ...]) -> None:
    before = token_server.metrics.value("llama_crab_requests_total", {"method": "GetModel", "code": "UNAUTHENTICATED"})
    with grpc.insecure_channel(token_server.address) as channel:
        with pytest.raises(grpc.RpcError) as exc:
            get_model(channel, metadata)
        assert exc.value.code() is grpc.StatusCode.UNAUTHENTICATED
        # Streaming calls are refused the same way, before any generation.
        stream = pb_grpc.LlamaCrabServiceStub(channel).Complete(pb.CompleteRequest(), metadata=metadata, timeout=10)
        with pytest.raises(grpc.RpcError) as exc:
            list(stream)
        assert exc.value.code() is grpc.StatusCode.UNAUTHENTICATED
    after = token_server.metrics.value("llama_crab_requests_total", {"method": "GetModel", "code": "UNAUTHENTICATED"})
    assert after == before + 1


def test_health_checks_need_no_token(token_server: TestServer) -> None:
    assert token_server.health_status("") == "SERVING"  # a plain Check, no authorization metadata
