"""Streaming responses through the real daemon: generators stream chunk by chunk (time to first
byte far below the total), SSE on request, a client that disconnects frees the slot at once, a
slow client holds the generator back (backpressure), and errors end a stream cleanly."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlparse

import httpx
import pytest
from conftest import Cirrus, module_daemon, write_project

STREAMERS = """
import asyncio, os, time


class Tokens:
    def predict(self, payload):
        for i in range(payload["n"]):
            time.sleep(payload["delay"])
            yield {"token": i}


class AsyncTokens:
    async def predict(self, payload):
        for i in range(payload["n"]):
            await asyncio.sleep(payload["delay"])
            yield f"tok{i} "


class Big:
    def __init__(self, config):
        self.counter = config["counter"]

    def predict(self, payload):
        for i in range(payload["n"]):
            with open(self.counter, "w") as f:
                f.write(str(i + 1))
            yield b"x" * payload["size"]


class Broken:
    def predict(self, payload):
        if payload.get("early"):
            raise ValueError("no tokens today")
        if payload.get("refuse"):
            from cirrus import HTTPError
            raise HTTPError(422, "n must be positive")
        yield "one "
        raise RuntimeError("the model fell over")
"""


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Cirrus, Path]]:
    root = tmp_path_factory.mktemp("streaming")
    counter = root / "produced"
    concurrency = {"inference_slots": 1, "max_concurrency": 4, "timeout_s": 30}
    project = write_project(
        root / "project",
        STREAMERS,
        apis=[
            {"name": "tokens", "predictor": {"class": "Tokens"}, "concurrency": concurrency},
            {"name": "atokens", "predictor": {"class": "AsyncTokens"}, "concurrency": concurrency},
            {"name": "big", "predictor": {"class": "Big", "config": {"counter": str(counter)}}},
            {"name": "broken", "predictor": {"class": "Broken"}},
        ],
    )
    with module_daemon(root / "home") as cirrus:
        cirrus.client().deploy(project)
        yield cirrus, counter


@pytest.mark.parametrize(("api", "media_type"), [("tokens", "application/x-ndjson"), ("atokens", "text/plain")])
def test_first_byte_arrives_long_before_the_last(gateway: tuple[Cirrus, Path], api: str, media_type: str) -> None:
    cirrus, _ = gateway
    started = time.perf_counter()
    arrivals = []
    with (
        httpx.Client(timeout=30) as http,
        http.stream("POST", cirrus.url(api), json={"n": 8, "delay": 0.1}) as response,
    ):
        assert response.status_code == 200
        assert response.headers["content-type"].startswith(media_type)
        assert "content-length" not in response.headers  # chunked
        body = b""
        for chunk in response.iter_raw():
            arrivals.append(time.perf_counter() - started)
            body += chunk
    total = time.perf_counter() - started
    assert total >= 0.8
    assert arrivals[0] < 0.4  # the first token, not the whole answer
    if api == "tokens":
        assert body.decode().splitlines() == [f'{{"token":{i}}}' for i in range(8)]
    else:
        assert body.decode() == "".join(f"tok{i} " for i in range(8))


def test_server_sent_events_when_asked(gateway: tuple[Cirrus, Path]) -> None:
    cirrus, _ = gateway
    response = httpx.post(
        cirrus.url("tokens"), json={"n": 3, "delay": 0.0}, headers={"accept": "text/event-stream"}, timeout=30
    )
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    assert response.text == "".join(f'data: {{"token":{i}}}\n\n' for i in range(3))


@pytest.mark.parametrize("api", ["tokens", "atokens"])
def test_a_client_that_disconnects_frees_the_slot(gateway: tuple[Cirrus, Path], api: str) -> None:
    cirrus, _ = gateway
    url = urlparse(cirrus.url(api))
    body = b'{"n": 100000, "delay": 0.02}'
    with socket.create_connection((url.hostname, url.port), timeout=10) as sock:
        sock.sendall(
            f"POST {url.path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        assert b"200 OK" in sock.recv(4096)  # streaming has begun and holds the only slot
    # The stream would take 2000 s; with the client gone, its slot is free for the next request.
    started = time.perf_counter()
    response = httpx.post(cirrus.url(api), json={"n": 1, "delay": 0.0}, timeout=10)
    assert response.status_code == 200
    assert time.perf_counter() - started < 2.0
    status = cirrus.client().get(api)
    assert status.in_flight == 0


def test_a_slow_client_holds_the_generator_back(gateway: tuple[Cirrus, Path]) -> None:
    cirrus, counter = gateway
    size, n = 1 << 20, 200  # 200 MiB if the replica ran ahead of the client
    with (
        httpx.Client(timeout=30) as http,
        http.stream("POST", cirrus.url("big"), json={"n": n, "size": size}) as response,
    ):
        chunks = response.iter_raw(size)
        next(chunks)
        time.sleep(1.5)  # the client reads nothing for a while
        produced = int(counter.read_text())
        assert produced < 40, f"the generator ran {produced} chunks ahead of a client that read one"
        received = size + sum(len(c) for c in chunks)  # now read everything
    assert received == n * size
    assert int(counter.read_text()) == n


def test_errors_end_a_stream_and_the_replica_keeps_serving(gateway: tuple[Cirrus, Path]) -> None:
    cirrus, _ = gateway
    early = httpx.post(cirrus.url("broken"), json={"early": True}, timeout=30)
    assert early.status_code == 500
    assert (
        early.json()["error"] == f"the predictor failed; see the replica log (request id {early.json()['request_id']})"
    )
    received = b""
    with (
        pytest.raises(httpx.RemoteProtocolError),  # the head was sent: the body is cut short, visibly
        httpx.stream("POST", cirrus.url("broken"), json={}, timeout=30) as late,
    ):
        assert late.status_code == 200
        for chunk in late.iter_raw():
            received += chunk
    assert received == b"one "
    sse = httpx.post(cirrus.url("broken"), json={}, headers={"accept": "text/event-stream"}, timeout=30)
    rid = sse.headers["x-request-id"]
    assert (
        sse.text
        == f"data: one \n\nevent: error\ndata: the predictor failed; see the replica log (request id {rid})\n\n"
    )
    # An HTTPError before the first item is an answer like any predict's: its status and message.
    refused = httpx.post(cirrus.url("broken"), json={"refuse": True}, timeout=30)
    assert (refused.status_code, refused.json()["error"]) == (422, "n must be positive")
    logs = cirrus.client().logs("broken", lines=200)
    assert "RuntimeError: the model fell over" in logs
    ok = httpx.post(cirrus.url("tokens"), json={"n": 2, "delay": 0.0}, timeout=30)
    assert ok.status_code == 200
