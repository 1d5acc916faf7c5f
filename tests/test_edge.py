"""The edge is bounded: request line, header size and count, header-read timeout, connection cap.

Raw sockets against a real daemon (`cirrus/gateway/edge.py`); every check fails against a plain
uvicorn + httptools server (no cap: huge heads are parsed, slow ones wait forever, any number of
connections is served).
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest
from conftest import ECHO_PREDICTOR, Cirrus, module_daemon, write_project

from cirrus.types import ApiStatusName

ANSWER_S = 1.0  # how long an ordinary request may take while the gateway is under attack


def _address(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    assert parts.hostname is not None and parts.port is not None
    return parts.hostname, parts.port


def _connect(url: str, timeout: float = 10.0) -> socket.socket:
    return socket.create_connection(_address(url), timeout=timeout)


def _read_until_closed(sock: socket.socket, timeout: float) -> bytes:
    """Everything the server sends until it closes the connection (AssertionError after `timeout`)."""
    sock.settimeout(timeout)
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except ConnectionResetError:
        pass
    except TimeoutError:
        raise AssertionError(f"the connection is still open after {timeout}s; got {data[:200]!r}") from None
    return data


def _send_and_read(url: str, request: bytes, timeout: float = 5.0) -> tuple[bytes, float]:
    """Send `request` (from a thread: the server may answer before it has read all of it) and read
    the answer until the server closes; (answer, seconds)."""
    started = time.monotonic()
    with _connect(url) as sock:

        def send() -> None:
            with contextlib.suppress(OSError):
                sock.sendall(request)

        sender = threading.Thread(target=send, daemon=True)
        sender.start()
        answer = _read_until_closed(sock, timeout)
        sender.join(timeout)
    return answer, time.monotonic() - started


def _status(answer: bytes) -> int:
    assert answer.startswith(b"HTTP/1.1 "), answer[:200]
    return int(answer.split(b" ", 2)[1])


def _echo(cirrus: Cirrus, tmp: Path) -> str:
    """Deploy the echo API; its URL."""
    cirrus.client().deploy(write_project(tmp / "echo-project", ECHO_PREDICTOR))
    cirrus.wait_for("echo", lambda s: s.status == ApiStatusName.LIVE)
    return cirrus.url("echo")


def _ordinary(url: str, timeout: float = 10.0) -> tuple[int, float]:
    """A fresh connection's POST {"n": 1}: (status, seconds)."""
    started = time.monotonic()
    with httpx.Client(timeout=timeout) as client:
        status = client.post(url, json={"n": 1}).status_code
    return status, time.monotonic() - started


def _health(cirrus: Cirrus, timeout: float = 10.0) -> tuple[int, float]:
    started = time.monotonic()
    token = cirrus.settings.token_file.read_text().strip()
    with httpx.Client(timeout=timeout) as client:
        status = client.get(
            cirrus.info.admin_url + "/v1/health", headers={"authorization": f"Bearer {token}"}
        ).status_code
    return status, time.monotonic() - started


def _head(path: str = "/echo", headers: list[tuple[str, str]] | None = None, body: bytes = b"") -> bytes:
    lines = [f"POST {path} HTTP/1.1", "Host: test", "Content-Type: application/json", f"Content-Length: {len(body)}"]
    lines += [f"{name}: {value}" for name, value in headers or []]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


# --- limits on the head (default limits) ----------------------------------------------------


@pytest.fixture(scope="module")
def edge(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Cirrus, str]]:
    home = tmp_path_factory.mktemp("edge") / "home"
    with module_daemon(home) as cirrus:
        yield cirrus, _echo(cirrus, home.parent)


def test_a_huge_header_gets_431_fast_and_the_connection_closes(edge: tuple[Cirrus, str]) -> None:
    cirrus, url = edge
    answer, seconds = _send_and_read(cirrus.gateway_url, _head(headers=[("X-Big", "a" * (1 << 20))]))
    assert _status(answer) == 431, answer
    assert b"connection: close" in answer.lower()
    assert seconds < 2.0, f"the 431 took {seconds:.2f}s"
    assert _ordinary(url)[0] == 200


def test_too_many_headers_get_431(edge: tuple[Cirrus, str]) -> None:
    cirrus, _ = edge
    answer, _ = _send_and_read(cirrus.gateway_url, _head(headers=[(f"X-H{i}", "v") for i in range(200)]))
    assert _status(answer) == 431, answer


def test_a_long_url_gets_414(edge: tuple[Cirrus, str]) -> None:
    cirrus, _ = edge
    answer, _ = _send_and_read(cirrus.gateway_url, _head(path="/echo?q=" + "a" * 20 * 1024))
    assert _status(answer) == 414, answer


def test_requests_within_the_limits_are_served(edge: tuple[Cirrus, str]) -> None:
    """Just under every head limit, and a body far larger than the head limit, in one connection."""
    cirrus, _ = edge
    body = b'{"n": "' + b"x" * (4 << 20) + b'"}'
    near_limits = [(f"X-H{i}", "v" * 600) for i in range(90)]  # 90 headers, ~55 KiB
    requests = [
        _head(headers=near_limits, body=b'{"n": 1}'),
        _head(path="/echo?q=" + "a" * 7000, body=b'{"n": 2}'),
        _head(body=body),
    ]
    with _connect(cirrus.gateway_url) as sock:
        for request in requests:
            sock.sendall(request)
            with sock.makefile("rb") as answer:
                status = int(answer.readline().split()[1])
                length = 0
                while (line := answer.readline()) not in (b"\r\n", b""):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":")[1])
                answer.read(length)
            assert status == 200


def test_many_small_pipelined_requests_are_not_one_big_head(edge: tuple[Cirrus, str]) -> None:
    """1,000 requests in one write (~100 KiB, more than one head may be) are all answered."""
    cirrus, _ = edge
    count = 1000
    with _connect(cirrus.gateway_url) as sock:
        sock.sendall(
            b"GET /no-such-api HTTP/1.1\r\nHost: x\r\nX-Pad: 0123456789012345678901234567890123456789\r\n\r\n" * count
        )
        sock.settimeout(10)
        answers = b""
        while answers.count(b"HTTP/1.1 ") < count:
            chunk = sock.recv(1 << 20)
            assert chunk, f"closed after {answers.count(b'HTTP/1.1 ')} answers"
            answers += chunk
    assert answers.count(b"HTTP/1.1 404 ") == count


def test_the_admin_api_is_bounded_too(edge: tuple[Cirrus, str]) -> None:
    cirrus, _ = edge
    request = b"GET /v1/health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * (1 << 20) + b"\r\n\r\n"
    answer, _ = _send_and_read(cirrus.info.admin_url, request)
    assert _status(answer) == 431, answer


# --- under attack ------------------------------------------------------------------------------


def _slowloris(url: str, count: int) -> list[socket.socket]:
    sockets = []
    for _ in range(count):
        sock = _connect(url)
        sock.sendall(b"GET /echo HTTP/1.1\r\nHost: x\r\nX-Slow: a")
        sockets.append(sock)
    return sockets


def _flood(url: str, size: int, stop: threading.Event) -> None:
    """Send heads of one `size`-byte header, again and again, until `stop`."""
    chunk = b"a" * (1 << 20)
    while not stop.is_set():
        with contextlib.suppress(OSError), _connect(url) as sock:
            sock.sendall(b"GET /echo HTTP/1.1\r\nHost: x\r\nX-Big: ")
            for _ in range(size // len(chunk)):
                if stop.is_set():
                    break
                sock.sendall(chunk)


def test_the_gateway_and_admin_answer_while_under_attack(edge: tuple[Cirrus, str]) -> None:
    cirrus, url = edge
    attackers = _slowloris(cirrus.gateway_url, 300)
    stop = threading.Event()
    floods = [threading.Thread(target=_flood, args=(cirrus.gateway_url, 64 << 20, stop)) for _ in range(2)]
    try:
        for flood in floods:
            flood.start()
        time.sleep(0.5)
        timings = []
        for _ in range(5):
            gateway, gateway_s = _ordinary(url)
            admin, admin_s = _health(cirrus)
            assert (gateway, admin) == (200, 200)
            timings.append((gateway_s, admin_s))
            time.sleep(0.2)
    finally:
        stop.set()
        for flood in floods:
            flood.join(30)
        for sock in attackers:
            sock.close()
    worst = max(max(pair) for pair in timings)
    assert worst < ANSWER_S, f"requests took {timings} s under attack"


# --- header timeout ---------------------------------------------------------------------------


def test_a_slow_head_is_closed_after_the_header_timeout(cirrus: Cirrus) -> None:
    slow = Cirrus(cirrus.home, CIRRUS_HEADER_TIMEOUT_S="1")
    slow.up()
    try:
        started = time.monotonic()
        partial = _slowloris(slow.gateway_url, 1)[0]
        idle = _connect(slow.gateway_url)
        admin = _slowloris(slow.info.admin_url, 1)[0]
        with partial, idle, admin:
            assert _status(_read_until_closed(partial, 5.0)) == 408
            assert _read_until_closed(idle, 5.0) == b""  # it sent nothing: closed without a word
            assert _status(_read_until_closed(admin, 5.0)) == 408
        assert time.monotonic() - started < 4.5  # the 1 s header timeout, not the 5 s keep-alive, closed them
        assert "its request head was not complete within 1s" in slow.daemon_log()
        # a kept-alive connection whose next head stalls is closed as well
        with _connect(slow.gateway_url) as sock:
            sock.sendall(b"GET /v1/none HTTP/1.1\r\nHost: x\r\n\r\n")
            first = b""
            while not first.endswith(b"}"):  # the whole 404 (head and JSON body may come apart)
                chunk = sock.recv(65536)
                assert chunk, first
                first += chunk
            assert first.startswith(b"HTTP/1.1 404")
            time.sleep(0.5)
            sock.sendall(b"GET /v1/none HTTP/1.1\r\nHost: x\r\nX-Slow: a")
            assert _status(_read_until_closed(sock, 5.0)) == 408
    finally:
        slow.shutdown()


# --- connection cap ----------------------------------------------------------------------------


def test_connections_past_the_cap_are_refused_and_logged(cirrus: Cirrus, tmp_path: Path) -> None:
    capped = Cirrus(cirrus.home, CIRRUS_MAX_CONNECTIONS="20")
    capped.up()
    try:
        url = _echo(capped, tmp_path)
        held = [_connect(capped.gateway_url) for _ in range(20)]
        try:
            time.sleep(0.3)  # all 20 accepted
            with _connect(capped.gateway_url) as extra:
                extra.sendall(b"GET /echo HTTP/1.1\r\nHost: x\r\n\r\n")
                answer = _read_until_closed(extra, 2.0)
            assert answer == b"" or _status(answer) == 503, answer
            assert "refused a connection" in capped.daemon_log()
            assert "the limit is 20" in capped.daemon_log()
            assert _health(capped)[0] == 200  # the admin API has a cap of its own
        finally:
            for sock in held:
                sock.close()
        time.sleep(0.3)
        assert _ordinary(url)[0] == 200  # served again once the attackers are gone
    finally:
        capped.shutdown()


# --- body timeout ------------------------------------------------------------------------------

SLEEPY_PREDICTOR = """
    import time


    class Predictor:
        def __init__(self, config):
            pass

        def predict(self, payload):
            time.sleep(payload.get("sleep", 0))
            return {"echo": payload}
"""


def _post_head(length: int | None) -> bytes:
    """A POST /echo head: `Content-Length: length`, or chunked when None."""
    framing = f"Content-Length: {length}" if length is not None else "Transfer-Encoding: chunked"
    return f"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n{framing}\r\n\r\n".encode()


def _answers(sock: socket.socket, count: int, timeout: float = 10.0) -> list[int]:
    """The statuses of the next `count` answers (each with a Content-Length body)."""
    sock.settimeout(timeout)
    statuses = []
    with sock.makefile("rb") as answer:
        for _ in range(count):
            statuses.append(int(answer.readline().split()[1]))
            length = 0
            while (line := answer.readline()) not in (b"\r\n", b""):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":")[1])
            answer.read(length)
    return statuses


def test_a_stalled_body_is_answered_408_after_the_body_timeout(cirrus: Cirrus, tmp_path: Path) -> None:
    """A head is complete and no byte of its body comes (silence, or chunk extensions without end,
    which are not body bytes): the gateway's own timeout starts only once a body byte reached it, so
    the edge answers 408 after CIRRUS_BODY_TIMEOUT_S and closes. A body that flows slowly (each gap
    under the bound, all of it over) is served, and so is a pipelined request whose body waits
    behind a slow request (the bound is on the client, not on the app)."""
    timed = Cirrus(cirrus.home, CIRRUS_BODY_TIMEOUT_S="1")
    timed.up()
    try:
        timed.client().deploy(write_project(tmp_path / "sleepy", SLEEPY_PREDICTOR))
        timed.wait_for("echo", lambda s: s.status == ApiStatusName.LIVE)
        gateway = timed.gateway_url

        started = time.monotonic()
        with _connect(gateway) as silent:
            silent.sendall(_post_head(100))
            assert _status(_read_until_closed(silent, 5.0)) == 408
        assert 1.0 <= time.monotonic() - started < 2.5

        stop = threading.Event()
        with _connect(gateway) as extensions:
            extensions.sendall(_post_head(None) + b"7")

            def extend() -> None:
                with contextlib.suppress(OSError):
                    while not stop.wait(0.05):
                        extensions.sendall(b";a=b")

            sender = threading.Thread(target=extend, daemon=True)
            sender.start()
            started = time.monotonic()
            try:
                assert _status(_read_until_closed(extensions, 5.0)) == 408
            finally:
                stop.set()
                sender.join(5)
        assert time.monotonic() - started < 2.5
        assert "no byte of its request body came within 1s (CIRRUS_BODY_TIMEOUT_S)" in timed.daemon_log()

        with _connect(gateway) as trickle:
            trickle.sendall(_post_head(8))
            for byte in b'{"n": 1}':  # 8 bytes, 0.4 s apart: 2.8 s in all
                time.sleep(0.4)
                trickle.sendall(bytes([byte]))
            assert _answers(trickle, 1) == [200]

        with _connect(gateway) as pipelined:
            slow = b'{"sleep": 2}'
            pipelined.sendall(_post_head(len(slow)) + slow + _post_head(8))
            time.sleep(1.5)  # the second body comes late, while the first request is still served
            pipelined.sendall(b'{"n": 2}')
            assert _answers(pipelined, 2) == [200, 200]
    finally:
        timed.shutdown()
