"""The gateway's per-request pieces on their own: `Server-Timing` values, W3C traceparent checks,
the access log writer (0600, rotation) and `/metrics` rendering with extra collectors."""

from __future__ import annotations

import json
import re
import stat
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.parser import text_string_to_metric_families

from cirrus.gateway.access import AccessLog, RequestRecord
from cirrus.gateway.app import Gateway
from cirrus.gateway.prometheus import render
from cirrus.gateway.timing import child_traceparent, server_timing, total_timing, valid_traceparent
from cirrus.wire import InferResponse

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
SPAN = "00f067aa0ba902b7"


def reply(**fields: Any) -> InferResponse:
    return InferResponse(id=1, status=200, body=b"", **fields)


def test_server_timing_names_only_the_stages_that_ran() -> None:
    full = reply(pre_s=0.002, slot_wait_s=0.0005, predict_s=0.01, batch_size=4)
    assert server_timing(0.001, full, 0.02) == (
        b"queue;dur=1.000, pre_predict;dur=2.000, slot_wait;dur=0.500, predict;dur=10.000, total;dur=20.000"
    )
    assert server_timing(0.001, reply(), 0.002) == b"queue;dur=1.000, total;dur=2.000"  # predict never ran
    head = reply(stream=True, slot_wait_s=0.003)
    assert server_timing(0.001, head, None) == b"queue;dur=1.000, slot_wait;dur=3.000"
    assert total_timing(0.0125) == (b"server-timing", b"total;dur=12.500")


@pytest.mark.parametrize(
    ("value", "valid"),
    [
        (f"00-{TRACE}-{SPAN}-01", True),
        (f"00-{TRACE}-{SPAN}-00", True),
        (f"01-{TRACE}-{SPAN}-01-more", True),  # a later version may add fields
        (f"00-{TRACE}-{SPAN}-01-more", False),  # version 00 may not
        (f"ff-{TRACE}-{SPAN}-01", False),
        (f"00-{'0' * 32}-{SPAN}-01", False),
        (f"00-{TRACE}-{'0' * 16}-01", False),
        (f"00-{TRACE.upper()}-{SPAN}-01", False),
        (f"00-{TRACE}-{SPAN}", False),
        ("", False),
    ],
)
def test_traceparent_validation(value: str, valid: bool) -> None:
    assert valid_traceparent(value) is valid


def test_child_traceparent_keeps_the_trace_and_flags_with_a_new_span() -> None:
    child = child_traceparent(f"00-{TRACE}-{SPAN}-00", sampled=True)
    assert child.startswith(f"00-{TRACE}-") and child.endswith("-00") and SPAN not in child
    started = child_traceparent("nonsense", sampled=True)
    assert re.fullmatch(r"00-[0-9a-f]{32}-[0-9a-f]{16}-01", started)
    assert child_traceparent("", sampled=False).endswith("-00")
    assert len({child_traceparent("", sampled=False) for _ in range(100)}) == 100


def record(request_id: str) -> RequestRecord:
    return RequestRecord(
        api="a",
        method="POST",
        path="/a",
        client="127.0.0.1:1",
        request_id=request_id,
        traceparent=f"00-{TRACE}-{SPAN}-01",
        parent_span="",
        started=time.perf_counter(),
        started_ns=time.time_ns(),
    )


@pytest.fixture
def access_log(tmp_path: Path) -> Iterator[AccessLog]:
    writer = AccessLog(tmp_path / "logs" / "access.log", max_bytes=2000, backups=2)
    yield writer
    writer.close()


def test_access_log_lines_are_json_in_a_private_file_that_rotates(access_log: AccessLog) -> None:
    for n in range(40):  # ~300 bytes each: past 2000 bytes several times
        access_log.write(record(f"r{n}").line())
        if n % 5 == 4:
            time.sleep(0.3)  # (the writer checks the size between batches)
    access_log.close()
    path = access_log.path
    files = [path, path.with_name("access.log.1"), path.with_name("access.log.2")]
    assert all(f.exists() for f in files) and not path.with_name("access.log.3").exists()
    for f in files:
        assert stat.S_IMODE(f.stat().st_mode) == 0o600
        for line in f.read_text().splitlines():
            assert json.loads(line)["api"] == "a"
    assert json.loads(path.read_text().splitlines()[-1])["request_id"] == "r39"


def test_no_file_until_a_line_is_written(access_log: AccessLog) -> None:
    time.sleep(0.3)
    assert not access_log.path.exists()


def test_record_watches_the_status_bytes_and_request_id() -> None:
    import asyncio

    sent: list[Any] = []

    async def send(message: Any) -> None:
        sent.append(message)

    rec = record("client-id")
    watched = rec.wrap(send)
    start = {"type": "http.response.start", "status": 202, "headers": [(b"x-request-id", b"queue-id")]}
    asyncio.run(watched(start))
    asyncio.run(watched({"type": "http.response.body", "body": b"12345"}))
    assert (rec.status, rec.sent_bytes, rec.request_id, len(sent)) == (202, 5, "queue-id", 2)
    line = json.loads(rec.line())
    assert line["timings_ms"] == {"total": 0.0} and line["trace_id"] == TRACE and line["batch_size"] == 0


def test_render_collects_extra_collectors() -> None:
    gateway = Gateway(1024)
    route = gateway.set_api("a", max_concurrency=1, max_queue_length=1, timeout_s=1)
    route.metrics.observe(
        200, 0.01, 1.0, "3", 0.001, reply(pre_s=0.001, slot_wait_s=0.001, predict_s=0.002, batch_size=2)
    )

    class Extra:
        def collect(self) -> Iterator[Any]:
            yield GaugeMetricFamily("cirrus_something_else", "another collector's", value=7)

    families = {f.name: f for f in text_string_to_metric_families(render(gateway, extra=[Extra()]).decode())}
    assert families["cirrus_something_else"].samples[0].value == 7
    stages = {s.labels["stage"] for s in families["cirrus_stage_duration_seconds"].samples}
    assert stages == {"queue", "pre_predict", "slot_wait", "predict"}
    [count] = [s for s in families["cirrus_batch_size"].samples if s.name == "cirrus_batch_size_count"]
    assert count.labels == {"api": "a", "revision": "3"} and count.value == 1
