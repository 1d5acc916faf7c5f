"""Per-request timings, access logs, trace context and spans through a real daemon: every answer's
`Server-Timing` names the stages that ran (plain, batched, streamed, async), an API with
`access_log: true` writes a JSON line per request (one without writes none), the predictor sees
the request's `traceparent` (the client's trace, the gateway's span), the spans reach a real
OTLP/HTTP receiver on loopback, and `/metrics` parses with Prometheus's own parser."""

from __future__ import annotations

import asyncio
import gzip
import json
import re
import stat
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest
from conftest import Cirrus, module_daemon, write_project
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from prometheus_client.parser import text_string_to_metric_families

PREDICTORS = {
    "plain.py": """
        import asyncio


        class Predictor:
            async def pre_predict(self, payload):
                await asyncio.sleep(0.01)
                return payload

            def predict(self, payload, headers):
                return {"echo": payload, "traceparent": headers.get("traceparent")}
    """,
    "batched.py": """
        import time


        class Predictor:
            def predict(self, payload):
                return payload

            def predict_batch(self, payloads):
                time.sleep(0.02)
                return payloads
    """,
    "tokens.py": """
        class Predictor:
            def predict(self, payload):
                for i in range(payload["n"]):
                    yield {"token": i}
    """,
    "worker.py": """
        class Predictor:
            def predict(self, payload):
                return payload
    """,
}
APIS: list[dict[str, Any]] = [
    {"name": "plain", "predictor": {"path": "plain.py"}, "access_log": True},
    {
        "name": "batched",
        "predictor": {"path": "batched.py"},
        "concurrency": {"max_concurrency": 16},
        "batching": {"max_batch_size": 16, "max_wait_ms": 5},
    },
    {"name": "tokens", "predictor": {"path": "tokens.py"}, "access_log": True},
    {"name": "jobs", "kind": "async", "predictor": {"path": "worker.py"}, "access_log": True},
]
CLIENT_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CLIENT_SPAN = "00f067aa0ba902b7"
TIMING = re.compile(r"([a-z_]+);dur=([0-9.]+)")


class Receiver:
    """An OTLP/HTTP trace receiver on loopback: what was POSTed to /v1/traces, decoded."""

    def __init__(self) -> None:
        self.spans: list[Any] = []
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["content-length"]))
                if self.headers.get("content-encoding") == "gzip":
                    body = gzip.decompress(body)
                request = ExportTraceServiceRequest()
                request.ParseFromString(body)
                with receiver.lock:
                    for resource in request.resource_spans:
                        for scope in resource.scope_spans:
                            receiver.spans.extend(scope.spans)
                status = 200 if self.path == "/v1/traces" else 404
                self.send_response(status)
                self.send_header("content-type", "application/x-protobuf")
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def of_trace(self, trace_id: str) -> list[Any]:
        with self.lock:
            return [s for s in self.spans if s.trace_id.hex() == trace_id]


@pytest.fixture(scope="module")
def receiver() -> Iterator[Receiver]:
    found = Receiver()
    yield found
    found.server.shutdown()
    found.server.server_close()


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory, receiver: Receiver) -> Iterator[Cirrus]:
    root = tmp_path_factory.mktemp("observability")
    project = write_project(root / "project", PREDICTORS, apis=APIS)
    env = {
        "CIRRUS_OTEL_ENDPOINT": receiver.url,
        "OTEL_BSP_SCHEDULE_DELAY": "100",  # export within 0.1 s, not the default 5 s
        "NO_PROXY": "127.0.0.1,localhost",
        "no_proxy": "127.0.0.1,localhost",
    }
    with module_daemon(root / "home", **env) as cirrus:
        cirrus.client().deploy(project, timeout=60)
        yield cirrus


def stages(response: httpx.Response) -> dict[str, float]:
    return {name: float(ms) for name, ms in TIMING.findall(response.headers["server-timing"])}


def test_a_plain_request_names_every_stage(gw: Cirrus) -> None:
    response = httpx.post(gw.url("/plain"), json={"x": 1}, timeout=30)
    assert response.status_code == 200
    timing = stages(response)
    assert list(timing) == ["queue", "pre_predict", "slot_wait", "predict", "total"]
    assert timing["pre_predict"] >= 9  # the hook sleeps 10 ms
    assert timing["total"] >= timing["queue"] + timing["pre_predict"] + timing["predict"]


def test_batched_requests_name_slot_wait_and_predict(gw: Cirrus) -> None:
    async def run() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=gw.gateway_url, timeout=30) as client:
            return list(await asyncio.gather(*(client.post("/batched", json={"i": i}) for i in range(8))))

    for response in asyncio.run(run()):
        assert response.status_code == 200
        timing = stages(response)
        assert list(timing) == ["queue", "slot_wait", "predict", "total"]  # no pre_predict hook: not named
        assert timing["predict"] >= 19  # the batch's predict_batch sleeps 20 ms


def test_a_stream_names_the_stages_known_at_its_first_byte(gw: Cirrus) -> None:
    with httpx.stream("POST", gw.url("/tokens"), json={"n": 3}, timeout=30) as response:
        assert response.status_code == 200
        assert list(stages(response)) == ["queue", "slot_wait"]
        assert len(response.read().splitlines()) == 3


def test_an_async_accept_names_its_total(gw: Cirrus) -> None:
    response = httpx.post(gw.url("/jobs"), json={"x": 1}, timeout=30)
    assert response.status_code == 202
    assert list(stages(response)) == ["total"]


def test_the_predictor_sees_the_clients_trace_with_the_gateways_span(gw: Cirrus) -> None:
    sent = f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01"
    seen = httpx.post(gw.url("/plain"), json={}, headers={"traceparent": sent}, timeout=30).json()["traceparent"]
    version, trace_id, span_id, flags = seen.split("-")
    assert (version, trace_id, flags) == ("00", CLIENT_TRACE, "01")
    assert span_id != CLIENT_SPAN and re.fullmatch(r"[0-9a-f]{16}", span_id)


@pytest.mark.parametrize(
    "sent",
    [
        None,
        "garbage",
        f"00-{'0' * 32}-{CLIENT_SPAN}-01",  # an all-zero trace id
        f"ff-{CLIENT_TRACE}-{CLIENT_SPAN}-01",  # the forbidden version
        f"00-{CLIENT_TRACE.upper()}-{CLIENT_SPAN}-01",  # upper case
    ],
)
def test_a_missing_or_invalid_traceparent_starts_a_new_trace(gw: Cirrus, sent: str | None) -> None:
    headers = {} if sent is None else {"traceparent": sent}
    seen = httpx.post(gw.url("/plain"), json={}, headers=headers, timeout=30).json()["traceparent"]
    assert re.fullmatch(r"00-[0-9a-f]{32}-[0-9a-f]{16}-01", seen)
    assert CLIENT_TRACE not in seen.lower()


def access_lines(gw: Cirrus, request_id: str, timeout: float = 10.0) -> list[dict[str, Any]]:
    path = gw.home / "logs" / "access.log"
    deadline = time.monotonic() + timeout
    while True:
        lines = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
        found = [line for line in lines if line["request_id"] == request_id]
        if found or time.monotonic() > deadline:
            return found
        time.sleep(0.1)


def test_an_api_with_access_log_writes_a_line_per_request(gw: Cirrus) -> None:
    sent = f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01"
    headers = {"x-request-id": "logged-1", "traceparent": sent}
    response = httpx.post(gw.url("/plain"), json={"x": 1}, headers=headers, timeout=30)
    [line] = access_lines(gw, "logged-1")
    assert line["api"] == "plain" and line["revision"] == "1" and line["replica"].startswith("plain-")
    assert (line["method"], line["path"], line["status"]) == ("POST", "/plain", 200)
    assert line["bytes"] == len(response.content)
    assert list(line["timings_ms"]) == ["queue", "pre_predict", "slot_wait", "predict", "total"]
    assert line["batch_size"] == 1
    assert line["client"].startswith("127.0.0.1:")
    assert line["trace_id"] == CLIENT_TRACE
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", line["ts"])
    assert stat.S_IMODE((gw.home / "logs" / "access.log").stat().st_mode) == 0o600


def test_streams_and_async_accepts_are_logged_too(gw: Cirrus) -> None:
    with httpx.stream("POST", gw.url("/tokens"), json={"n": 2}, headers={"x-request-id": "logged-stream"}) as r:
        body = r.read()
    [line] = access_lines(gw, "logged-stream")
    assert line["status"] == 200 and line["bytes"] == len(body)
    assert list(line["timings_ms"]) == ["queue", "slot_wait", "total"]
    accepted = httpx.post(gw.url("/jobs"), json={"x": 1}, timeout=30).json()
    [line] = access_lines(gw, accepted["id"])
    assert line["status"] == 202 and list(line["timings_ms"]) == ["total"]


def test_an_api_without_access_log_writes_none(gw: Cirrus) -> None:
    httpx.post(gw.url("/batched"), json={"i": 1}, headers={"x-request-id": "not-logged"}, timeout=30)
    httpx.post(gw.url("/plain"), json={}, headers={"x-request-id": "logged-after"}, timeout=30)
    assert access_lines(gw, "logged-after")  # written after the other: had it been logged, it would be there
    assert access_lines(gw, "not-logged", timeout=0) == []


def test_spans_reach_an_otlp_receiver(gw: Cirrus, receiver: Receiver) -> None:
    trace_id = "0af7651916cd43dd8448eb211c80319c"
    sent = f"00-{trace_id}-{CLIENT_SPAN}-01"
    seen = httpx.post(gw.url("/plain"), json={}, headers={"traceparent": sent}, timeout=30).json()["traceparent"]
    deadline = time.monotonic() + 15
    while len(receiver.of_trace(trace_id)) < 5 and time.monotonic() < deadline:
        time.sleep(0.1)
    spans = {span.name: span for span in receiver.of_trace(trace_id)}
    assert set(spans) == {"cirrus.request", "queue", "pre_predict", "slot_wait", "predict"}
    request = spans.pop("cirrus.request")
    assert request.parent_span_id.hex() == CLIENT_SPAN  # the client's span is its parent
    assert request.span_id.hex() == seen.split("-")[2]  # and it is the parent the replica was told
    attributes = {a.key: a.value for a in request.attributes}
    assert attributes["cirrus.api"].string_value == "plain"
    assert attributes["cirrus.revision"].string_value == "1"
    assert attributes["http.response.status_code"].int_value == 200
    assert attributes["cirrus.batch_size"].int_value == 1
    for child in spans.values():
        assert child.parent_span_id == request.span_id
        assert request.start_time_unix_nano <= child.start_time_unix_nano <= child.end_time_unix_nano
        assert child.end_time_unix_nano <= request.end_time_unix_nano


def test_metrics_parse_with_the_expected_names_and_labels(gw: Cirrus) -> None:
    httpx.post(gw.url("/plain"), json={}, timeout=30)
    families = {f.name: f for f in text_string_to_metric_families(httpx.get(gw.url("/metrics"), timeout=10).text)}
    labels = {
        "cirrus_requests": {"api", "revision", "code"},
        "cirrus_request_duration_seconds": {"api", "revision"},
        "cirrus_stage_duration_seconds": {"api", "revision", "stage"},
        "cirrus_batch_size": {"api", "revision"},
        "cirrus_in_flight_requests": {"api"},
        "cirrus_queued_requests": {"api"},
        "cirrus_cold_starts": {"api"},
    }
    for name, expected in labels.items():
        family = families[name]
        assert family.samples, name
        for sample in family.samples:
            assert set(sample.labels) - {"le"} == expected, (name, sample)
    assert families["cirrus_requests"].type == "counter"
    assert families["cirrus_request_duration_seconds"].type == "histogram"
    stages_seen = {s.labels["stage"] for s in families["cirrus_stage_duration_seconds"].samples}
    assert stages_seen == {"queue", "pre_predict", "slot_wait", "predict"}
    plain = [
        s
        for s in families["cirrus_requests"].samples
        if s.labels["api"] == "plain" and s.name == "cirrus_requests_total"
    ]
    assert any(s.labels == {"api": "plain", "revision": "1", "code": "200"} and s.value >= 1 for s in plain)
