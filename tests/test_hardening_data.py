"""Issue 11, the data path, through a real daemon: a lost replica connection leaves routing at once
and the replica is restarted; a response over the body limit is a 502 and the replica keeps serving;
a replica's socket refuses anyone without its secret; deep JSON is a 400 at once; a streaming client
that stops reading frees the slot after timeout_s; a 500 names no exception and a 404 no other API;
a chunked stream that fails midway is cut short and counted as a 5xx."""

from __future__ import annotations

import asyncio
import os
import re
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlparse

import httpx
import pytest
from conftest import Cirrus, module_daemon, write_project

from cirrus.wire import FrameBuffer, Hello, InferRequest, encode_frame, frame_limit

MAX_BODY_BYTES = 65536
DEEP = "[" * 1000 + "]" * 1000  # 2 KB of JSON nested 1000 deep

PREDICTORS = {
    "big.py": """
        class Predictor:
            def predict(self, payload):
                return b"x" * payload["size"]
    """,
    "cut.py": """
        import os
        import socket
        import struct


        def gateway_socket():
            for name in os.listdir("/proc/self/fd"):
                try:
                    if not os.readlink(f"/proc/self/fd/{name}").startswith("socket:"):
                        continue
                    sock = socket.socket(fileno=os.dup(int(name)))
                except OSError:
                    continue
                try:
                    if sock.family == socket.AF_INET:
                        sock.getpeername()  # the listening socket has no peer
                        return sock
                except OSError:
                    pass
                sock.close()
            raise RuntimeError("no connection to the gateway")


        class Predictor:
            def predict(self, payload):
                how = payload.get("how")
                if how == "shutdown":
                    gateway_socket().shutdown(socket.SHUT_RDWR)
                elif how == "garbage":  # a frame header far over the gateway's limit
                    gateway_socket().sendall(struct.pack(">I", 0xFFFFFFF0))
                return {"pid": os.getpid()}
    """,
    "guarded.py": """
        from pathlib import Path


        class Predictor:
            def __init__(self, config):
                self.marker = Path(config["marker"])

            def predict(self, payload):
                with self.marker.open("a") as f:
                    f.write("ran\\n")
                return {"ok": True}
    """,
    "echo.py": """
        class Predictor:
            def predict(self, payload):
                return {"echo": payload}
    """,
    "raises.py": """
        import cirrus


        class Predictor:
            def predict(self, payload):
                raise ValueError("cannot reach postgres://admin:hunter2@db.internal")
    """,
    "stream.py": """
        class Flood:
            def predict(self, payload):
                n = payload.get("n")
                i = 0
                while n is None or i < n:
                    yield b"x" * payload.get("size", 32768)
                    i += 1


        class Broken:
            def predict(self, payload):
                yield "one "
                raise RuntimeError("the model at /srv/secret-weights fell over")
    """,
}


def _apis(marker: Path) -> list[dict[str, object]]:
    return [
        {"name": "big", "predictor": {"path": "big.py"}},
        {"name": "cut", "predictor": {"path": "cut.py"}},
        {"name": "guarded", "predictor": {"path": "guarded.py", "config": {"marker": str(marker)}}},
        {
            "name": "deep",
            "predictor": {"path": "echo.py"},
            "concurrency": {"max_concurrency": 4, "max_queue_length": 8, "timeout_s": 3},  # room for 12 at once
        },
        {
            "name": "flood",
            "predictor": {"path": "stream.py", "class": "Flood"},
            "concurrency": {"inference_slots": 1, "max_concurrency": 4, "timeout_s": 2},
        },
        {"name": "broken", "predictor": {"path": "stream.py", "class": "Broken"}},
        {"name": "raises", "predictor": {"path": "raises.py"}},
        {"name": "raises-debug", "predictor": {"path": "raises.py"}, "debug_errors": True},
    ]


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Cirrus, Path]]:
    root = tmp_path_factory.mktemp("hardening-data")
    marker = root / "guarded-ran.txt"
    with module_daemon(root / "home", CIRRUS_MAX_BODY_BYTES=str(MAX_BODY_BYTES)) as cirrus:
        project = write_project(root / "project", PREDICTORS, apis=_apis(marker))
        cirrus.client().deploy(project, timeout=60)
        yield cirrus, marker


@pytest.fixture
def http(gw: tuple[Cirrus, Path]) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=gw[0].gateway_url, timeout=30) as client:
        yield client


def _failed(request_id: str) -> str:
    return f"the predictor failed; see the replica log (request id {request_id})"


# --- item 2: a lost replica connection; oversized responses ----------------------------------------


def test_a_response_over_the_body_limit_is_502_and_the_replica_keeps_serving(
    gw: tuple[Cirrus, Path], http: httpx.Client
) -> None:
    cirrus, _ = gw
    limit = frame_limit(MAX_BODY_BYTES)  # the body limit plus headroom
    too_big = http.post("/big", json={"size": limit + 1})
    assert too_big.status_code == 502
    assert f"response of {limit + 1} bytes exceeds the limit of {limit} bytes" in too_big.text
    fits = http.post("/big", json={"size": limit - 1000})
    assert (fits.status_code, len(fits.content)) == (200, limit - 1000)
    [replica] = cirrus.client().get("big").replicas
    assert replica.restarts == 0  # no connection was lost for it


@pytest.mark.parametrize("how", ["shutdown", "garbage"])
def test_a_lost_connection_leaves_routing_at_once_and_the_replica_restarts(
    gw: tuple[Cirrus, Path], http: httpx.Client, how: str
) -> None:
    cirrus, _ = gw
    client = cirrus.client()
    before = client.get("cut").replicas[0]
    first = http.post("/cut", json={})
    assert first.status_code == 200
    pid = first.json()["pid"]

    cut = http.post("/cut", json={"how": how})
    assert cut.status_code == 502  # the request in flight on it fails, once
    assert http.get("/cut").json()["replicas_ready"] == 0  # out of routing at once
    after = http.post("/cut", json={})  # waits for the restarted replica instead of a 502
    assert after.status_code == 200, after.text
    assert after.json()["pid"] != pid
    status = cirrus.wait_for("cut", lambda s: s.replicas[0].restarts == before.restarts + 1)
    assert "lost its connection to the gateway" in (status.replicas[0].last_error or "")
    assert all(http.post("/cut", json={}).status_code == 200 for _ in range(5))


# --- item 7: replica sockets only the gateway can use ----------------------------------------------


def _listening_port(pid: int) -> int:
    """The TCP port the process `pid` listens on (its socket inodes matched against /proc/net/tcp)."""
    inodes = set()
    for name in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{name}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[len("socket:[") : -1])
    for line in Path(f"/proc/{pid}/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[3] == "0A" and fields[9] in inodes:  # LISTEN
            return int(fields[1].rpartition(":")[2], 16)
    raise AssertionError(f"process {pid} listens on no TCP port")


def test_a_replica_refuses_a_connection_that_does_not_authenticate(gw: tuple[Cirrus, Path], http: httpx.Client) -> None:
    cirrus, marker = gw
    [replica] = cirrus.client().get("guarded").replicas
    assert replica.pid is not None
    port = _listening_port(replica.pid)
    request = InferRequest(id=1, request_id="forged", body=b"{}", content_type="application/json")
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.settimeout(5)
        sock.sendall(encode_frame(request))  # a hand-made request, past the gateway's limits
        received = b""
        try:
            while chunk := sock.recv(65536):
                received += chunk
        except ConnectionResetError:
            pass  # closed: no answer
    assert [type(frame) for frame in FrameBuffer().feed(received)] == [Hello]  # nothing but its hello
    assert not marker.exists()  # the predictor never ran

    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:  # one that says nothing
        started = time.monotonic()
        sock.settimeout(5)
        try:
            while sock.recv(65536):
                pass
        except ConnectionResetError:
            pass
        assert time.monotonic() - started < 4  # closed after 2 s

    assert http.post("/guarded", json={}).status_code == 200  # the gateway still gets in
    assert marker.read_text() == "ran\n"


# --- item 3: deep JSON -------------------------------------------------------------------------------


def test_deep_json_is_400_at_once_and_pushes_nobody_to_503(gw: tuple[Cirrus, Path], http: httpx.Client) -> None:
    cirrus, _ = gw
    started = time.monotonic()
    response = http.post("/deep", content=DEEP, headers={"content-type": "application/json"})
    assert response.status_code == 400
    assert response.json()["error"] == "JSON nested too deeply"
    assert time.monotonic() - started < 1.5

    async def normal_client(client: httpx.AsyncClient) -> httpx.Response:
        await asyncio.sleep(0.3)  # while the dozen would still hold every slot and queue place
        return await client.post("/deep", json={"fine": True})

    async def burst() -> tuple[list[httpx.Response], httpx.Response, float]:
        async with httpx.AsyncClient(base_url=cirrus.gateway_url, timeout=30) as client:
            headers = {"content-type": "application/json"}
            deep = [client.post("/deep", content=DEEP, headers=headers) for _ in range(12)]
            started = time.monotonic()
            *answers, normal = await asyncio.gather(*deep, normal_client(client))
            return answers, normal, time.monotonic() - started

    answers, normal, took = asyncio.run(burst())
    assert [r.status_code for r in answers] == [400] * 12
    assert normal.status_code == 200 and normal.json() == {"echo": {"fine": True}}
    assert took < 2.5  # not the 3 s timeout


# --- item 5: a streaming client that stops reading ---------------------------------------------------


def test_a_client_that_stops_reading_frees_the_slot_after_timeout_s(gw: tuple[Cirrus, Path]) -> None:
    cirrus, _ = gw
    url = urlparse(cirrus.url("flood"))
    body = b'{"size": 32768}'
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    try:
        sock.settimeout(10)
        sock.connect((url.hostname, url.port))
        sock.sendall(
            f"POST {url.path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        assert b"200 OK" in sock.recv(1024)  # the stream holds the only slot; now read nothing more
        time.sleep(1.0)
        started = time.perf_counter()
        second = httpx.post(cirrus.url("flood"), json={"n": 1, "size": 10}, timeout=15)
        assert second.status_code == 200, second.text
        assert second.content == b"x" * 10
        assert time.perf_counter() - started < 5
        deadline = time.monotonic() + 5
        while cirrus.client().get("flood").in_flight and time.monotonic() < deadline:
            time.sleep(0.1)
        assert cirrus.client().get("flood").in_flight == 0  # the gateway gave up on it too
    finally:
        sock.close()
    # Whichever noticed first, the replica (no credit) or the gateway (a send that did not finish), said so.
    assert "read nothing for 2s" in cirrus.client().logs("flood", lines=200) + cirrus.daemon_log()


# --- item 10: errors that leak nothing ---------------------------------------------------------------


def test_a_500_names_only_the_request_id_unless_debug_errors(gw: tuple[Cirrus, Path], http: httpx.Client) -> None:
    cirrus, _ = gw
    response = http.post("/raises", json={}, headers={"x-request-id": "leak-1"})
    assert response.status_code == 500
    assert response.json() == {"error": _failed("leak-1"), "request_id": "leak-1"}
    assert "hunter2" not in response.text and "ValueError" not in response.text
    logs = cirrus.client().logs("raises", lines=200)
    assert "request leak-1: the predictor raised" in logs
    assert "Traceback (most recent call last)" in logs and "hunter2@db.internal" in logs

    debug = http.post("/raises-debug", json={})
    assert debug.status_code == 500
    assert debug.json()["error"] == "the predictor raised ValueError: cannot reach postgres://admin:hunter2@db.internal"


def test_a_404_names_no_other_api(http: httpx.Client) -> None:
    response = http.post("/nope", json={})
    assert response.status_code == 404
    assert response.json()["error"] == "no API at '/nope'"
    assert not any(name in response.text for name in ("raises", "guarded", "flood"))
    assert "guarded" in http.get("/").json()["apis"]


# --- item 12: a failed chunked stream looks failed ---------------------------------------------------


def _requests_by_status(http: httpx.Client, api: str) -> dict[int, float]:
    found = re.findall(
        rf'^cirrus_requests_total{{api="{api}",code="(\d+)",revision="\d*"}} (\S+)$', http.get("/metrics").text, re.M
    )
    counts: dict[int, float] = {}
    for status, count in found:  # (summed over revisions)
        counts[int(status)] = counts.get(int(status), 0.0) + float(count)
    return counts


def test_a_stream_that_fails_midway_is_cut_short_and_counted_as_an_error(
    gw: tuple[Cirrus, Path], http: httpx.Client
) -> None:
    before = _requests_by_status(http, "broken")
    received = b""
    with (
        pytest.raises(httpx.RemoteProtocolError, match="incomplete chunked read"),
        http.stream("POST", "/broken", json={}) as response,
    ):
        assert response.status_code == 200  # the head went out before the failure
        for chunk in response.iter_raw():
            received += chunk
    assert received == b"one "

    sse = http.post("/broken", json={}, headers={"accept": "text/event-stream"})
    rid = sse.headers["x-request-id"]
    assert sse.text == f"data: one \n\nevent: error\ndata: {_failed(rid)}\n\n"
    assert "secret-weights" not in sse.text

    after = _requests_by_status(http, "broken")
    assert after.get(500, 0) - before.get(500, 0) == 2  # both counted as errors
    assert after.get(499, 0) == before.get(499, 0) and after.get(200, 0) == before.get(200, 0)
