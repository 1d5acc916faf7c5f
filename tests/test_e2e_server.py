"""`kind: server` through the real daemon: an unmodified FastAPI app (tests/apps/fastapi_app) and a
plain stdlib server started by a command (tests/apps/plain_server), proxied by the gateway under
/<api>/... with real processes and sockets: methods, path parameters, query strings, headers both
ways, bodies streamed both ways, the app's own 404 and OpenAPI page, the gateway's limits."""

from __future__ import annotations

import json
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml
from conftest import Cirrus, module_daemon

from cirrus.types import ApiStatusName

APPS = Path(__file__).parent / "apps"
MAX_BODY_BYTES = 4 * 1024 * 1024


def server_project(directory: Path, app: str, apis: list[dict]) -> Path:
    """A project holding the app's files as they are and a cirrus.yaml with `apis`."""
    shutil.copytree(APPS / app, directory, dirs_exist_ok=True)
    (directory / "cirrus.yaml").write_text(yaml.safe_dump(apis, sort_keys=False))
    return directory


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cirrus]:
    home = tmp_path_factory.mktemp("server") / "home"
    with module_daemon(home, CIRRUS_MAX_BODY_BYTES=str(MAX_BODY_BYTES)) as cirrus:
        project = server_project(
            tmp_path_factory.mktemp("shop"),
            "fastapi_app",
            [
                {
                    "name": "shop",
                    "kind": "server",
                    "server": {"app": "main:app", "readiness": {"path": "/healthz"}},
                    "concurrency": {"max_concurrency": 8, "timeout_s": 3},
                    "autoscaling": {"min_replicas": 1, "max_replicas": 1},
                    "access_log": True,
                },
                {
                    "name": "tiny",  # one request at a time, one more queued
                    "kind": "server",
                    "server": {"app": "main:app", "readiness": {"path": "/healthz"}},
                    "concurrency": {"max_concurrency": 1, "max_queue_length": 1, "timeout_s": 10},
                    "autoscaling": {"min_replicas": 1, "max_replicas": 1},
                },
            ],
        )
        cirrus.client().deploy(project)
        yield cirrus


@pytest.fixture(scope="module")
def http(gw: Cirrus) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=gw.gateway_url, timeout=30) as client:
        yield client


def test_routes_methods_path_parameters_and_query(http: httpx.Client) -> None:
    assert http.get("/shop").json()["app"] == "shop"  # /<api> is the app's "/"
    assert http.get("/shop/").json()["app"] == "shop"
    item = http.get("/shop/items/2", params={"q": "a b&c"})
    assert item.status_code == 200, item.text
    assert item.json() == {"id": 2, "name": "pear", "q": "a b&c"}
    created = http.post("/shop/items", json={"name": "fig", "price": 1.5})
    assert created.status_code == 200 and created.json()["created"] == "fig"
    invalid = http.post("/shop/items", json={"name": "fig"})  # the app's own validation error
    assert invalid.status_code == 422 and invalid.json()["detail"][0]["loc"] == ["body", "price"]


def test_the_apps_own_404_and_405(http: httpx.Client) -> None:
    missing = http.get("/shop/items/99")
    assert missing.status_code == 404 and missing.json() == {"detail": "no item 99"}
    nowhere = http.get("/shop/no/such/path")
    assert nowhere.status_code == 404 and nowhere.json() == {"detail": "Not Found"}
    assert http.delete("/shop/items/1").status_code == 405
    head = http.head("/shop/items/1")
    assert head.status_code == 405 and head.content == b""  # (FastAPI routes GET only) the app said so


def test_headers_both_ways(http: httpx.Client) -> None:
    response = http.get(
        "/shop/headers",
        headers={
            "x-custom": "kept",
            "x-request-id": "rid-123",
            "x-cirrus-model": "dropped",
            "x-forwarded-for": "10.9.9.9",
            "connection": "keep-alive, x-hop",
            "x-hop": "dropped too",
        },
    )
    assert response.status_code == 200
    seen = response.json()
    assert seen["x-custom"] == "kept"
    assert seen["x-request-id"] == "rid-123" and response.headers["x-request-id"] == "rid-123"
    assert seen["x-forwarded-prefix"] == "/shop"
    assert seen["x-forwarded-for"].startswith("10.9.9.9")  # the chain goes on, with the client last
    assert seen["x-forwarded-proto"] == "http"
    assert seen["x-forwarded-host"] == seen["host"]
    assert not any(k.startswith("x-cirrus") for k in seen), seen  # nor the replica's secret
    assert "x-hop" not in seen and "connection" not in seen
    generated = http.get("/shop/headers")
    assert len(generated.headers["x-request-id"]) == 32


def test_streaming_response_arrives_chunk_by_chunk(http: httpx.Client) -> None:
    arrivals = []
    with http.stream("GET", "/shop/stream", params={"n": 3, "gap": 0.4}) as response:
        assert response.status_code == 200
        assert response.headers["x-app"] == "shop" and response.headers["content-type"].startswith("text/plain")
        for chunk in response.iter_raw():
            arrivals.append((time.monotonic(), chunk))
    text = b"".join(c for _, c in arrivals).decode()
    assert text == "chunk 0\nchunk 1\nchunk 2\n"
    first = next(t for t, c in arrivals if b"chunk 0" in c)
    last = next(t for t, c in arrivals if b"chunk 2" in c)
    assert last - first >= 0.6, arrivals  # not buffered until the end


def test_large_request_body_is_streamed(http: httpx.Client) -> None:
    data = bytes(range(256)) * (3 * 1024 * 1024 // 256)  # 3 MiB, under the 4 MiB limit

    def parts() -> Iterator[bytes]:
        for i in range(0, len(data), 256 * 1024):
            yield data[i : i + 256 * 1024]

    response = http.post("/shop/digest", content=parts())  # chunked: no Content-Length
    assert response.status_code == 200, response.text
    import hashlib

    assert response.json()["size"] == len(data)
    assert response.json()["sha256"] == hashlib.sha256(data).hexdigest()
    assert response.json()["chunks"] > 1  # it reached the app in pieces, not as one buffer


def test_oversized_body_is_413(http: httpx.Client) -> None:
    declared = http.post("/shop/digest", content=b"x" * (MAX_BODY_BYTES + 1))
    assert declared.status_code == 413 and "limit of" in declared.json()["error"]

    def parts() -> Iterator[bytes]:
        for _ in range(5):
            yield b"y" * (1024 * 1024)

    chunked = http.post("/shop/digest", content=parts())
    assert chunked.status_code == 413 and "limit of" in chunked.json()["error"]
    assert http.get("/shop/items/1").status_code == 200  # the replica serves on


def test_slow_body_is_408(gw: Cirrus) -> None:
    host, port = httpx.URL(gw.gateway_url).host, httpx.URL(gw.gateway_url).port
    with socket.create_connection((host, port), timeout=10) as sock:
        sock.sendall(b"POST /shop/digest HTTP/1.1\r\nhost: x\r\ncontent-length: 100\r\n\r\n" + b"z" * 10)
        sock.settimeout(10)
        started = time.monotonic()
        answer = sock.recv(65536)
        assert answer.startswith(b"HTTP/1.1 408"), answer
        assert time.monotonic() - started < 8  # the API's timeout_s (3s), not forever


def test_slow_app_is_504_and_the_slot_is_freed(http: httpx.Client) -> None:
    response = http.get("/shop/slow", params={"s": 5})
    assert response.status_code == 504 and "no answer within 3s" in response.json()["error"]
    assert http.get("/shop/slow", params={"s": 0}).status_code == 200


def test_client_going_away_frees_the_slot(gw: Cirrus, http: httpx.Client) -> None:
    for _ in range(12):  # more than max_concurrency (8): a leaked slot would show
        with pytest.raises(httpx.ReadTimeout):
            httpx.get(gw.url("/shop/slow?s=2"), timeout=0.2)
    deadline = time.monotonic() + 5
    while http.get("/shop").status_code != 200 or gw.client().get("shop").in_flight:
        assert time.monotonic() < deadline
        time.sleep(0.1)


def test_openapi_page_through_the_gateway(http: httpx.Client) -> None:
    docs = http.get("/shop/docs")
    assert docs.status_code == 200 and "text/html" in docs.headers["content-type"]
    assert "/shop/openapi.json" in docs.text  # FastAPI built the URL from the root path
    schema = http.get("/shop/openapi.json")
    assert schema.status_code == 200
    assert schema.json()["info"]["title"] == "shop"
    assert "/items/{item_id}" in schema.json()["paths"]
    where = http.get("/shop/where").json()
    assert where["root_path"] == "/shop" and where["path"] == "/shop/where"


def test_websocket_upgrade_is_refused(http: httpx.Client) -> None:
    response = http.get("/shop/ws", headers={"connection": "upgrade", "upgrade": "websocket"})
    assert response.status_code == 501 and "websocket" in response.json()["error"]


def test_replica_only_answers_its_gateway(gw: Cirrus) -> None:
    status = gw.client().get("shop")
    assert status.status == ApiStatusName.LIVE
    [replica] = status.replicas
    log = gw.daemon_log()
    assert "shop" in log
    # The app's port is not announced; find it from the replica's log line and call it directly.
    logs = gw.cli("logs", "shop", "--lines", "10000")[1]
    address = next(
        w for line in logs.splitlines() if "serving its app at" in line for w in line.split() if w.startswith("http://")
    )
    direct = httpx.get(address + "/items/1")
    assert direct.status_code == 403 and replica.id
    assert httpx.get(address + "/items/1", headers={"x-cirrus-replica-secret": "00" * 32}).status_code == 403


def test_metrics_count_proxied_requests(gw: Cirrus, http: httpx.Client) -> None:
    for _ in range(5):
        http.get("/shop/items/1")
    metrics = http.get("/metrics").text
    assert 'api="shop"' in metrics
    threads = [threading.Thread(target=http.get, args=("/shop/slow?s=0.5",)) for _ in range(4)]
    for thread in threads:
        thread.start()
    time.sleep(0.2)
    assert gw.client().get("shop").in_flight >= 1
    for thread in threads:
        thread.join()


def test_access_log_line_and_trace_context(gw: Cirrus, http: httpx.Client) -> None:
    trace = "4bf92f3577b34da6a3ce929d0e0e4736"
    sent = f"00-{trace}-00f067aa0ba902b7-01"
    response = http.get("/shop/headers?x=1", headers={"x-request-id": "logged-shop", "traceparent": sent})
    seen = response.json()["traceparent"]
    assert seen.startswith(f"00-{trace}-") and seen != sent  # the gateway's span is the app's parent
    path = gw.home / "logs" / "access.log"
    deadline = time.monotonic() + 10
    while True:
        lines = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
        found = [line for line in lines if line["request_id"] == "logged-shop"]
        if found or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    [line] = found
    assert (line["api"], line["method"], line["path"], line["status"]) == ("shop", "GET", "/shop/headers", 200)
    assert line["replica"].startswith("shop-") and line["bytes"] == len(response.content)
    assert line["trace_id"] == trace


def test_full_queue_is_503_with_retry_after(gw: Cirrus) -> None:
    answers: list[httpx.Response] = []

    def call() -> None:
        answers.append(httpx.get(gw.url("/tiny/slow?s=1"), timeout=20))

    threads = [threading.Thread(target=call) for _ in range(3)]
    for thread in threads:
        thread.start()
        time.sleep(0.2)
    for thread in threads:
        thread.join()
    statuses = sorted(a.status_code for a in answers)
    assert statuses == [200, 200, 503], [a.text for a in answers]
    [refused] = [a for a in answers if a.status_code == 503]
    assert refused.headers["retry-after"] == "1" and "queue is full" in refused.json()["error"]


def test_a_stream_that_stalls_is_cut_short(http: httpx.Client) -> None:
    started = time.monotonic()
    with http.stream("GET", "/shop/stream", params={"n": 2, "gap": 6}) as response:
        assert response.status_code == 200
        with pytest.raises(httpx.RemoteProtocolError):  # the body ends unfinished: not a complete answer
            response.read()
    assert 3 <= time.monotonic() - started < 6  # the API's timeout_s (3s) between chunks
