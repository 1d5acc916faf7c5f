"""Malformed HTTP on raw sockets: the gateway answers 4xx or closes, never 5xx, never hangs.

One daemon with the echo API takes garbage request lines, bad chunked bodies, request smuggling
attempts, half-open connections and slow bodies; each case must end, within a few seconds, in a
4xx answer or a closed connection, and no smuggled inner request may be answered as a request of
its own. After all of them the same daemon still serves (tests/test_edge.py covers the head limits
in depth; only a couple of them are repeated here).
"""

from __future__ import annotations

import contextlib
import json
import re
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from urllib.parse import urlsplit

import httpx
import pytest
from conftest import ECHO_PREDICTOR, Cirrus, module_daemon, write_project

from cirrus.types import ApiStatusName

HEADER_TIMEOUT_S = 2.0  # the daemon's CIRRUS_HEADER_TIMEOUT_S, short so half-open cases end fast
API_TIMEOUT_S = 3.0  # the echo API's timeout_s: it bounds a body whose bytes flow (the gateway's 408)
# The daemon's CIRRUS_BODY_TIMEOUT_S: it bounds a body whose bytes stop coming, or never start (the
# edge's 408); longer than the API's timeout_s, so that a body that flows and then stops meets that first.
BODY_TIMEOUT_S = 3.5
ANSWER_S = 5.0  # the longest any case may leave a connection silent
SMUGGLED = "smuggled-7f3a"  # the marker in every smuggled inner request's body


@dataclass
class Gateway:
    cirrus: Cirrus
    address: tuple[str, int]
    daemon_pid: int


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    home = tmp_path_factory.mktemp("attack-http") / "home"
    env = {"CIRRUS_HEADER_TIMEOUT_S": str(HEADER_TIMEOUT_S), "CIRRUS_BODY_TIMEOUT_S": str(BODY_TIMEOUT_S)}
    with module_daemon(home, **env) as cirrus:
        project = write_project(home.parent / "echo", ECHO_PREDICTOR, concurrency={"timeout_s": API_TIMEOUT_S})
        cirrus.client().deploy(project)
        cirrus.wait_for("echo", lambda s: s.status == ApiStatusName.LIVE)
        parts = urlsplit(cirrus.gateway_url)
        assert parts.hostname is not None and parts.port is not None
        yield Gateway(cirrus, (parts.hostname, parts.port), cirrus.info.pid)


# --- a raw exchange --------------------------------------------------------------------------


@dataclass
class Response:
    status: int
    headers: dict[str, str]
    body: bytes


@dataclass
class Exchange:
    responses: list[Response]
    raw: bytes
    closed: bool  # the server closed the connection (else it went quiet, kept alive, after answering)
    seconds: float

    @property
    def statuses(self) -> list[int]:
        return [r.status for r in self.responses]


def _parse(raw: bytes) -> list[Response]:
    """The HTTP/1.x responses in `raw` (content-length or chunked bodies); a torn tail is dropped."""
    responses: list[Response] = []
    rest = raw
    while rest:
        head, sep, rest = rest.partition(b"\r\n\r\n")
        if not sep:
            break
        lines = head.split(b"\r\n")
        match = re.match(rb"HTTP/1\.[01] (\d{3})", lines[0])
        assert match, f"not an HTTP response: {raw[:300]!r}"
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            headers[name.strip().lower().decode()] = value.strip().decode(errors="replace")
        if headers.get("transfer-encoding", "").lower() == "chunked":
            body = b""
            while True:
                size_line, _, rest = rest.partition(b"\r\n")
                size = int(size_line.split(b";")[0] or b"0", 16)
                body, rest = body + rest[:size], rest[size + 2 :]
                if size == 0:
                    break
        else:
            length = int(headers.get("content-length", "0"))
            body, rest = rest[:length], rest[length:]
        responses.append(Response(int(match.group(1)), headers, body))
    return responses


def exchange(
    gateway: Gateway,
    *parts: bytes,
    pause_s: float = 0.0,
    shut_wr: bool = False,
    timeout: float = ANSWER_S,
) -> Exchange:
    """Send `parts` (`pause_s` apart, from a thread: the server may answer before it has read them
    all; then `shutdown(SHUT_WR)` if asked) and read until the server closes, or until it has been
    quiet for `timeout`: a hang (AssertionError) unless it had answered everything by then."""
    started = time.monotonic()
    with socket.create_connection(gateway.address, timeout=10) as sock:
        done = threading.Event()

        def send() -> None:
            with contextlib.suppress(OSError):
                for i, part in enumerate(parts):
                    if i and pause_s and done.wait(pause_s):
                        return
                    sock.sendall(part)
                if shut_wr:
                    sock.shutdown(socket.SHUT_WR)

        sender = threading.Thread(target=send, daemon=True)
        sender.start()
        sock.settimeout(timeout)
        raw, closed = b"", False
        try:
            while chunk := sock.recv(65536):
                raw += chunk
            closed = True
        except ConnectionResetError:
            closed = True
        except TimeoutError:
            pass
        finally:
            done.set()
            sender.join(timeout)
    result = Exchange(_parse(raw), raw, closed, time.monotonic() - started)
    if not closed:
        assert result.responses, f"the gateway hung: nothing within {timeout}s and the connection still open"
    return result


def assert_refused(result: Exchange, *, served: int = 0) -> None:
    """The exchange ended in 4xx answers (after `served` answered requests) or a silent close; no
    5xx, no smuggled inner request answered."""
    assert all(s < 500 for s in result.statuses), f"a 5xx: {result.raw[:500]!r}"
    for response in result.responses:
        assert not (response.status == 200 and SMUGGLED.encode() in response.body), (
            f"a smuggled request was answered on its own: {result.raw[:800]!r}"
        )
    assert all(400 <= s < 500 for s in result.statuses[served:]), f"not refused: {result.raw[:500]!r}"
    if result.statuses[served:]:
        assert result.closed, f"the connection stayed open after a {result.statuses[-1]}: {result.raw[:300]!r}"


def head(
    method: str = "POST",
    path: str = "/echo",
    headers: list[tuple[str, str]] | None = None,
    version: str = "HTTP/1.1",
) -> bytes:
    lines = [f"{method} {path} {version}", "Host: test", "Content-Type: application/json"]
    lines += [f"{name}: {value}" for name, value in headers or []]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def smuggled_request() -> bytes:
    body = json.dumps({"x": SMUGGLED}).encode()
    return head(headers=[("Content-Length", str(len(body)))]) + body


# --- garbage request lines ------------------------------------------------------------------

GARBAGE = {
    "binary-junk": bytes(range(256)) * 4,
    "tls-client-hello": bytes.fromhex("16030100a5010000a10303") + b"\x00" * 64,
    "nul-bytes": b"\x00" * 1024 + b"\r\n\r\n",
    "get-without-version": b"GET /echo\r\nHost: test\r\n\r\n",
    "http-0.9": b"GET /echo\r\n",
    "unknown-method": head("BREW", headers=[("Content-Length", "0")]),
    "lowercase-method": head("get", "/healthz"),
    "method-with-control-char": head("PO\x01ST", headers=[("Content-Length", "0")]),
    "http2-preface": b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
    "http2-preface-then-frames": b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00" * 8,
    "bad-version": head(version="HTTP/9.9", headers=[("Content-Length", "0")]),
    "version-garbage": head(version="HTTX/1.1", headers=[("Content-Length", "0")]),
    "space-in-path": b"GET /ec ho HTTP/1.1\r\nHost: test\r\n\r\n",
    "no-path": b"GET  HTTP/1.1\r\nHost: test\r\n\r\n",
    "header-without-colon": b"POST /echo HTTP/1.1\r\nHost test\r\nContent-Length: 0\r\n\r\n",
    "header-name-with-space": b"POST /echo HTTP/1.1\r\nHost: test\r\nX Bad: 1\r\nContent-Length: 0\r\n\r\n",
    "nul-in-header-value": b"POST /echo HTTP/1.1\r\nHost: test\r\nX-A: a\x00b\r\nContent-Length: 0\r\n\r\n",
    "negative-content-length": head(headers=[("Content-Length", "-1")]) + b"{}",
    "hex-content-length": head(headers=[("Content-Length", "0x2")]) + b"{}",
    "huge-content-length": head(headers=[("Content-Length", "9" * 30)]) + b"{}",
    "a-60KiB-header-name": b"POST /echo HTTP/1.1\r\nHost: test\r\n" + b"X" * 60_000 + b"\r\n\r\n",
    "many-empty-headers": head(headers=[("X-E", "")] * 500),
}


def _cases(cases: dict[str, bytes], bugs: dict[str, pytest.MarkDecorator]) -> list[object]:
    return [pytest.param(value, id=name, marks=[bugs[name]] if name in bugs else []) for name, value in cases.items()]


@pytest.mark.parametrize("request_bytes", _cases(GARBAGE, {}))
def test_garbage_is_refused(gateway: Gateway, request_bytes: bytes) -> None:
    result = exchange(gateway, request_bytes)
    assert_refused(result)
    assert result.seconds < ANSWER_S, f"took {result.seconds:.1f}s"


# --- bad chunked bodies -----------------------------------------------------------------------

CHUNKED = head(headers=[("Transfer-Encoding", "chunked")])

BAD_CHUNKED = {
    "invalid-hex-size": CHUNKED + b"zz\r\n{}\r\n0\r\n\r\n",
    "size-with-0x": CHUNKED + b"0x2\r\n{}\r\n0\r\n\r\n",
    "negative-size": CHUNKED + b"-2\r\n{}\r\n0\r\n\r\n",
    "overflowing-size": CHUNKED + b"f" * 40 + b"\r\n{}\r\n0\r\n\r\n",
    "missing-crlf-after-data": CHUNKED + b"2\r\n{}0\r\n\r\n",
    "chunk-larger-than-declared": CHUNKED + b'2\r\n{"n": 1}\r\n0\r\n\r\n',
    "chunk-smaller-than-declared": CHUNKED + b"9\r\n{}\r\n0\r\n\r\n",
    "endless-chunk-extensions": CHUNKED + b"2" + b";a=b" * 500_000,
    "bad-trailer": CHUNKED + b"2\r\n{}\r\n0\r\nno colon here\r\n\r\n",
}


@pytest.mark.parametrize("request_bytes", _cases(BAD_CHUNKED, {}))
def test_bad_chunked_bodies_are_refused(gateway: Gateway, request_bytes: bytes) -> None:
    """Some are malformed (400); others leave the body waiting on bytes that never come (408):
    chunk-smaller-than-declared (its declared 9 bytes consume the rest) meets the API's timeout_s,
    endless-chunk-extensions (not one body byte) the edge's CIRRUS_BODY_TIMEOUT_S."""
    assert_refused(exchange(gateway, request_bytes))


def test_a_good_chunked_body_is_served(gateway: Gateway) -> None:
    """The control for the cases above: chunked encoding done right is answered 200."""
    body = json.dumps({"x": "chunked-ok"}).encode()
    request = CHUNKED[:-2] + b"Connection: close\r\n\r\n" + b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)
    result = exchange(gateway, request)
    assert result.statuses == [200], result.raw[:500]
    assert json.loads(result.responses[0].body)["echo"] == {"x": "chunked-ok"}


# --- request smuggling ------------------------------------------------------------------------


def _cl_te() -> bytes:
    """CL.TE: by Content-Length the body runs to the end; by chunked it ends at `0`, and the inner
    request would follow as a request of its own."""
    body = b"0\r\n\r\n" + smuggled_request()
    return head(headers=[("Content-Length", str(len(body))), ("Transfer-Encoding", "chunked")]) + body


def _te_cl() -> bytes:
    """TE.CL: by Content-Length the body is 4 bytes and the inner request follows; by chunked the
    inner request is chunk data."""
    inner = smuggled_request()
    body = b"%x\r\n%s\r\n0\r\n\r\n" % (len(inner), inner)
    return head(headers=[("Content-Length", "4"), ("Transfer-Encoding", "chunked")]) + body


def _obfuscated(transfer_encoding: bytes) -> bytes:
    """A Transfer-Encoding the gateway may or may not read as chunked, with a Content-Length: one
    reading of it leaves the inner request as a request of its own."""
    body = b"0\r\n\r\n" + smuggled_request()
    return (
        b"POST /echo HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
        + b"Content-Length: %d\r\n" % len(body)
        + transfer_encoding
        + b"\r\n\r\n"
        + body
    )


def _two_lengths() -> bytes:
    inner = smuggled_request()
    return head(headers=[("Content-Length", "2"), ("Content-Length", str(2 + len(inner)))]) + b"{}" + inner


SMUGGLING = {
    "cl-te": _cl_te(),
    "te-cl": _te_cl(),
    "two-content-lengths": _two_lengths(),
    "content-length-list": head(headers=[("Content-Length", "2, 40")]) + b"{}" + smuggled_request(),
    "te-xchunked": _obfuscated(b"Transfer-Encoding: xchunked"),
    "te-space-before-colon": _obfuscated(b"Transfer-Encoding : chunked"),
    "te-leading-space-line": _obfuscated(b"X-A: 1\r\n Transfer-Encoding: chunked"),
    "te-folded-value": _obfuscated(b"Transfer-Encoding:\r\n chunked"),
    "te-chunked-identity": _obfuscated(b"Transfer-Encoding: chunked, identity"),
    "te-twice": _obfuscated(b"Transfer-Encoding: chunked\r\nTransfer-Encoding: x"),
    "te-vertical-tab": _obfuscated(b"Transfer-Encoding:\x0bchunked"),
    "te-uppercase": _obfuscated(b"TRANSFER-ENCODING: CHUNKED"),
}


@pytest.mark.parametrize("request_bytes", _cases(SMUGGLING, {}))
def test_smuggling_attempts_are_refused(gateway: Gateway, request_bytes: bytes) -> None:
    result = exchange(gateway, request_bytes)
    assert_refused(result)


def test_a_pipelined_second_request_is_answered_as_itself(gateway: Gateway) -> None:
    """The control for the cases above: two honest requests in one write get two right answers."""
    first = json.dumps({"x": "first"}).encode()
    second = json.dumps({"x": "second"}).encode()
    result = exchange(
        gateway,
        head(headers=[("Content-Length", str(len(first)))])
        + first
        + head(headers=[("Content-Length", str(len(second))), ("Connection", "close")])
        + second,
    )
    assert result.statuses == [200, 200], result.raw[:800]
    assert [json.loads(r.body)["echo"]["x"] for r in result.responses] == ["first", "second"]


# --- half-open connections and slow bodies --------------------------------------------------------


def test_a_silent_connection_is_closed_without_an_answer(gateway: Gateway) -> None:
    result = exchange(gateway)
    assert result.closed and result.raw == b"", result.raw[:200]
    assert result.seconds < HEADER_TIMEOUT_S + 1.5


def test_half_a_head_is_answered_408(gateway: Gateway) -> None:
    result = exchange(gateway, b"POST /echo HTTP/1.1\r\nHost: test\r\nContent-Le")
    assert result.statuses == [408] and result.closed, result.raw[:200]


def test_half_a_head_then_eof_is_closed(gateway: Gateway) -> None:
    assert_refused(exchange(gateway, b"POST /echo HTTP/1.1\r\nHost: test\r\nContent-Le", shut_wr=True))


def test_half_a_body_then_eof_is_closed(gateway: Gateway) -> None:
    result = exchange(gateway, head(headers=[("Content-Length", "100")]) + b'{"n": ', shut_wr=True)
    assert_refused(result)


def test_a_body_that_never_starts_is_answered_408(gateway: Gateway) -> None:
    """Headers complete, then silence: the gateway's timeout never starts (no body byte reached it);
    the edge answers 408 after CIRRUS_BODY_TIMEOUT_S."""
    result = exchange(gateway, head(headers=[("Content-Length", "100")]))
    assert result.statuses == [408] and result.closed, result.raw[:200]
    assert BODY_TIMEOUT_S <= result.seconds < BODY_TIMEOUT_S + 1.5, f"{result.seconds:.1f}s"


def test_a_body_that_stops_halfway_is_not_waited_on_forever(gateway: Gateway) -> None:
    """Headers complete, then 6 of 100 body bytes, then silence: bounded (by the API's 3 s timeout)."""
    result = exchange(gateway, head(headers=[("Content-Length", "100")]) + b'{"n": ')
    assert_refused(result)


def test_a_trickled_body_is_bounded(gateway: Gateway) -> None:
    """A byte every 0.2 s of a 1000-byte body (200 s at that pace): the gateway must give up first."""
    parts = [head(headers=[("Content-Length", "1000")])] + [b" "] * 60
    result = exchange(gateway, *parts, pause_s=0.2)
    assert_refused(result)
    assert result.closed and result.seconds < 10, f"{result.seconds:.1f}s"


# --- afterwards -------------------------------------------------------------------------------------


def test_the_daemon_is_healthy_afterwards(gateway: Gateway) -> None:
    """Last in the module: the same daemon, serving, its CLI answering, no unhandled exception logged."""
    cirrus = gateway.cirrus
    assert cirrus.info.pid == gateway.daemon_pid
    with httpx.Client(timeout=10) as client:
        response = client.post(cirrus.url("echo"), json={"after": "attacks"})
    assert response.status_code == 200, response.text
    assert response.json()["echo"] == {"after": "attacks"}
    code, out, err = cirrus.cli("get")
    assert code == 0, err
    assert "echo" in out
    log = cirrus.daemon_log()
    assert "Traceback" not in log, log[-4000:]
