"""Queue tools through the real daemon and CLI: a dead letter is listed with its payload, requeued
once its cause is fixed, and then completes; pending requests are listed, and a cancelled one is
never run (and a cancelled in-progress one never records its result).

One async API, one replica taking one request at a time: a request with `hold` keeps the replica
busy until the test creates the `release` file, so what is queued behind it stays queued; while the
`fail` file exists every request fails (a 5xx, retried until `max_attempts`). Every call of the
predictor is written to `calls.log`.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import Cirrus, module_daemon, write_project

from cirrus.async_client import AsyncClient
from cirrus.client_common import AsyncRequest, CirrusError, NotFoundError
from cirrus.store.base import CANCELLED, Status
from cirrus.types import ApiStatusName

API = "tools"
PREDICTOR = """
import os, time


class Predictor:
    def __init__(self, config):
        self.dir = config["dir"]

    def predict(self, payload, request_id):
        with open(os.path.join(self.dir, "calls.log"), "a") as f:
            f.write(payload["key"] + "\\n")
        deadline = time.monotonic() + 20
        while payload.get("hold") and not os.path.exists(os.path.join(self.dir, "release")):
            if time.monotonic() > deadline:
                raise RuntimeError("never released")
            time.sleep(0.02)
        if os.path.exists(os.path.join(self.dir, "fail")):
            raise RuntimeError("the fail flag is up")
        return {"key": payload["key"], "double": payload["x"] * 2}
"""


@pytest.fixture(scope="module")
def tools(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Cirrus, Path]]:
    root = tmp_path_factory.mktemp("queue-tools")
    flags = root / "flags"
    flags.mkdir()
    with module_daemon(root / "home") as cirrus:
        project = write_project(
            root / "project",
            PREDICTOR,
            name=API,
            kind="async",
            predictor={"config": {"dir": str(flags)}},
            concurrency={"max_concurrency": 1, "timeout_s": 30},
            queue={"max_attempts": 2},
            autoscaling={"min_replicas": 1, "max_replicas": 1},
        )
        cirrus.client().deploy(project)
        cirrus.wait_for(API, lambda s: s.status == ApiStatusName.LIVE and s.replicas_ready == 1)
        yield cirrus, flags


def calls(flags: Path) -> list[str]:
    log = flags / "calls.log"
    return log.read_text().split() if log.exists() else []


def wait_status(cirrus: Cirrus, request_id: str, status: Status, timeout: float = 15.0) -> AsyncRequest:
    client, deadline = cirrus.client(), time.monotonic() + timeout
    while True:
        record = client.status(API, request_id)
        if record.status is status:
            return record
        assert time.monotonic() < deadline, f"request {request_id} is {record.status.value}, not {status.value}"
        time.sleep(0.05)


def test_a_dead_letter_is_shown_with_its_payload_requeued_and_then_succeeds(tools: tuple[Cirrus, Path]) -> None:
    cirrus, flags = tools
    (flags / "fail").touch()
    try:
        request_id = cirrus.client().submit(API, {"key": "dead", "x": 21})
        failed = wait_status(cirrus, request_id, Status.FAILED)
    finally:
        (flags / "fail").unlink()
    assert failed.attempts == 2 and "the predictor failed" in (failed.error or "")

    code, out, err = cirrus.cli("dead-letters", API)
    assert code == 0, err
    (row,) = [line for line in out.splitlines() if request_id in line]
    assert "the predictor failed" in row and '{"key":"dead","x":21}' in row.replace(" ", ""), out
    code, out, err = cirrus.cli("dead-letters", API, "-o", "json")
    (record,) = [r for r in json.loads(out) if r["id"] == request_id]
    assert json.loads(record["payload"]) == {"key": "dead", "x": 21}
    assert (record["payload_type"], record["truncated"]) == ("application/json", False)

    code, out, err = cirrus.cli("dead-letters", API, "--requeue", request_id, "f" * 32)
    assert code == 1 and "requeued 1 dead letter of tools" in out and request_id in out, (out, err)
    assert f"not dead letters of {API}: {'f' * 32}" in err
    done = cirrus.client().wait(API, request_id, timeout=15)
    assert done.status is Status.COMPLETED and done.value() == {"key": "dead", "double": 42}
    assert done.attempts == 1 and calls(flags).count("dead") == 3
    code, out, err = cirrus.cli("dead-letters", API, "--requeue", "-o", "json")
    assert code == 0 and json.loads(out)["requeued"] == [], (out, err)  # none left


def test_pending_requests_are_listed_and_cancelled_ones_never_finish(tools: tuple[Cirrus, Path]) -> None:
    cirrus, flags = tools
    client = cirrus.client()
    held = client.submit(API, {"key": "held", "x": 1, "hold": True})
    wait_status(cirrus, held, Status.IN_PROGRESS)
    queued = client.submit(API, {"key": "queued", "x": 2})
    try:
        code, out, err = cirrus.cli("requests", API, "--status", "in_queue")
        assert code == 0, err
        assert queued in out and held not in out and '"queued"' in out, out
        listed = json.loads(cirrus.cli("requests", API, "-o", "json")[1])
        assert [(r["id"], r["status"]) for r in listed] == [(held, "in_progress"), (queued, "in_queue")]

        code, out, err = cirrus.cli("requests", "cancel", queued)
        assert code == 0 and f"cancelled {queued} of {API}" in out, (out, err)
        code, out, err = cirrus.cli("requests", "cancel", held, "--api", API)  # in progress: its lease is taken
        assert code == 0, err
        code, _, err = cirrus.cli("requests", "cancel", queued)
        assert code == 1 and "already failed" in err, err
    finally:
        (flags / "release").touch()
    after = client.submit(API, {"key": "after", "x": 3})
    assert client.wait(API, after, timeout=15).value() == {"key": "after", "double": 6}
    for request_id in (queued, held):
        record = client.status(API, request_id)
        assert (record.status, record.error, record.result) == (Status.FAILED, CANCELLED, None)
    assert "queued" not in calls(flags) and {"held", "after"} <= set(calls(flags))
    assert json.loads(cirrus.cli("requests", API, "-o", "json")[1]) == []


def test_both_clients_have_the_queue_tools(tools: tuple[Cirrus, Path]) -> None:
    cirrus, _ = tools
    client = cirrus.client()
    request_id = client.submit(API, {"key": "client", "x": 5})
    client.wait(API, request_id, timeout=15)

    async def calls() -> None:
        async with AsyncClient(cirrus.settings) as aclient:
            assert await aclient.requests(API, status="in_queue") == []
            assert await aclient.requeue_dead_letters(API, [request_id]) == {
                "requeued": [],
                "not_dead_letters": [request_id],
            }
            with pytest.raises(CirrusError, match="already completed") as finished:
                await aclient.cancel_request(request_id)
            assert finished.value.status == 409
            assert isinstance(await aclient.dead_letters(API), list)

    asyncio.run(calls())
    with pytest.raises(NotFoundError):
        client.cancel_request("0" * 32, API)
    with pytest.raises(NotFoundError, match="no API named 'nope'"):
        client.requests("nope")
