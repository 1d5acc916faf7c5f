"""TLS on the gateway through the real daemon and CLI: with `CIRRUS_TLS_CERT`/`CIRRUS_TLS_KEY` the
gateway serves HTTPS only (the admin API stays plain HTTP on loopback), `cirrus predict` trusts a
self-signed certificate through `CIRRUS_TLS_CA`, and a bad certificate or key is one clear line at
start."""

from __future__ import annotations

import datetime
import ipaddress
import socket
import ssl
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest
from conftest import ECHO_PREDICTOR, Cirrus, module_daemon, write_project
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from cirrus.types import ApiStatusName


def write_key(path: Path) -> ec.EllipticCurvePrivateKey:
    key = ec.generate_private_key(ec.SECP256R1())
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    path.write_bytes(pem)
    return key


def self_signed(directory: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 signed by its own key: (certificate file, key file)."""
    key_file, cert_file = directory / "gateway.key", directory / "gateway.pem"
    key = write_key(key_file)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return cert_file, key_file


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return self_signed(tmp_path_factory.mktemp("certs"))


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory, certs: tuple[Path, Path]) -> Iterator[Cirrus]:
    cert, key = certs
    home = tmp_path_factory.mktemp("tls") / "home"
    env = {"CIRRUS_TLS_CERT": str(cert), "CIRRUS_TLS_KEY": str(key), "CIRRUS_TLS_CA": str(cert)}
    with module_daemon(home, **env) as cirrus:
        project = write_project(tmp_path_factory.mktemp("project"), ECHO_PREDICTOR)
        code, out, err = cirrus.cli("deploy", str(project))
        assert code == 0, out + err
        assert "https://127.0.0.1:" in out  # the endpoint printed
        cirrus.wait_for("echo", lambda s: s.status == ApiStatusName.LIVE)
        yield cirrus


def test_the_gateway_serves_https_and_only_https(gw: Cirrus, certs: tuple[Path, Path]) -> None:
    info = gw.info
    assert info.gateway_url.startswith("https://127.0.0.1:")
    assert info.admin_url.startswith("http://127.0.0.1:")  # the admin API stays plain HTTP on loopback
    trust = ssl.create_default_context(cafile=str(certs[0]))
    with httpx.Client(verify=trust) as client:
        answered = client.post(gw.url("/echo"), json={"x": 1})
        assert answered.status_code == 200 and answered.json()["echo"] == {"x": 1}
        assert client.get(gw.url("/healthz")).status_code == 200
    with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"), httpx.Client() as client:
        client.post(gw.url("/echo"), json={})  # not trusted without the CA
    plain = "http://" + info.gateway_url.removeprefix("https://") + "/echo"
    with pytest.raises(httpx.TransportError), httpx.Client() as client:
        client.post(plain, json={"x": 1}, timeout=5)


def test_cirrus_predict_trusts_the_ca_it_is_given(gw: Cirrus) -> None:
    code, out, err = gw.cli("predict", "echo", '{"x": 2}')
    assert code == 0, err
    assert '"x": 2' in out or '"x":2' in out
    untrusting = Cirrus(gw.home, CIRRUS_TLS_CA="")
    code, out, err = untrusting.cli("predict", "echo", "{}")
    assert code == 1 and "not trusted" in err and "CIRRUS_TLS_CA" in err and "Traceback" not in err


@pytest.mark.parametrize("case", ["mismatched key", "missing key file", "certificate alone"])
def test_a_bad_certificate_or_key_is_one_clear_line(tmp_path: Path, certs: tuple[Path, Path], case: str) -> None:
    cert, _ = certs
    if case == "mismatched key":
        write_key(tmp_path / "other.key")
        env, expected = {"CIRRUS_TLS_CERT": str(cert), "CIRRUS_TLS_KEY": str(tmp_path / "other.key")}, "does not match"
    elif case == "missing key file":
        env, expected = {"CIRRUS_TLS_CERT": str(cert), "CIRRUS_TLS_KEY": str(tmp_path / "nowhere.key")}, "cannot read"
    else:
        env, expected = {"CIRRUS_TLS_CERT": str(cert)}, "give both or neither"
    cirrus = Cirrus(tmp_path / "home", **env)
    try:
        code, out, err = cirrus.cli("up", timeout=30)
        assert code == 1, out + err
        assert expected in err and "exited with code 1" in err, err
        assert "Traceback" not in err
    finally:
        assert cirrus.shutdown() == {}
    if case == "mismatched key":  # `cirrus serve` says the same before it starts anything
        project = write_project(tmp_path / "project", ECHO_PREDICTOR)
        code, out, err = cirrus.cli("serve", str(project), timeout=30)
        assert code == 1 and expected in err and "Traceback" not in err, out + err


def test_a_connection_that_never_handshakes_counts_and_is_closed(tmp_path: Path, certs: tuple[Path, Path]) -> None:
    """Raw TCP connections that never start (or never finish) their TLS handshake count against
    `CIRRUS_MAX_CONNECTIONS` and are closed within `CIRRUS_HEADER_TIMEOUT_S` of connecting (asyncio's
    own handshake timeout is 60 s, and uvicorn counts a connection only once its handshake is done)."""
    cert, key = certs
    env = {"CIRRUS_TLS_CERT": str(cert), "CIRRUS_TLS_KEY": str(key), "CIRRUS_TLS_CA": str(cert)}
    cirrus = Cirrus(tmp_path / "home", **env, CIRRUS_MAX_CONNECTIONS="4", CIRRUS_HEADER_TIMEOUT_S="1")
    cirrus.up()
    trust = ssl.create_default_context(cafile=str(cert))
    try:
        url = cirrus.url("/healthz")
        address = (urlsplit(url).hostname or "", urlsplit(url).port or 0)
        started = time.monotonic()
        silent = [socket.create_connection(address) for _ in range(4)]  # three say nothing at all ...
        silent[-1].sendall(bytes.fromhex("16030100a5010000a10303") + b"\x00" * 16)  # ... one a ClientHello cut short
        try:
            time.sleep(0.3)
            with pytest.raises(httpx.TransportError), httpx.Client(verify=trust, timeout=5) as client:
                client.get(url)  # a fifth connection: over the cap while the four hang in their handshakes
            for sock in silent:
                sock.settimeout(5)
                assert sock.recv(1024) == b""  # closed without a word
            assert time.monotonic() - started < 1 + 1.5, "closed by asyncio's 60 s, not the 1 s header timeout"
        finally:
            for sock in silent:
                sock.close()
        with httpx.Client(verify=trust, timeout=5) as client:
            assert client.get(url).status_code == 200  # served again once they are gone
        log = cirrus.daemon_log()
        assert "the limit is 4" in log and "TLS handshake was not complete within 1s" in log, log[-2000:]
    finally:
        assert cirrus.shutdown() == {}
