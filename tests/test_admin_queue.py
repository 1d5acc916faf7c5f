"""The admin API's queue tools, in process: dead letters with their payload, requeue, listing and
cancelling an async API's requests, and the 4xx each answers to bad input (never a 5xx).

The admin app runs over a real controller with a fake runtime and a real SQLite queue store; the
requests are put in the store directly, as the gateway would (the real path, with replicas, is
tests/test_e2e_queue_tools.py).
"""

from __future__ import annotations

import base64
import time
from collections.abc import Iterator
from pathlib import Path

import hypothesis
import pytest
from hypothesis import HealthCheck, given
from hypothesis import strategies as st
from starlette.testclient import TestClient

from cirrus.admin import build_admin_app
from cirrus.control.controller import Controller
from cirrus.control.statedb import StateDB
from cirrus.control.store import Store
from cirrus.snapshots import SnapshotStore
from cirrus.store import open_store
from cirrus.store.base import NewRequest, QueueStore
from cirrus.testing import FakeGateway, FakeRuntime
from cirrus.types import DaemonInfo

TOKEN = "test-token"
PREDICTOR = "class Predictor:\n    def predict(self, payload):\n        return payload\n"


class Queue:
    def __init__(self, http: TestClient, store: QueueStore) -> None:
        self.http, self.store = http, store

    def submit(self, id: str, body: bytes = b'{"x": 1}', content_type: str = "application/json") -> str:
        self.store.submit(NewRequest("q", id, body, content_type, max_attempts=1), time.time())
        return id

    def fail(self, id: str) -> None:
        (lease,) = self.store.lease("q", "w", 1, 30, time.time())
        assert lease.id == id and self.store.fail(lease, "boom", False, time.time())


@pytest.fixture
def queue(tmp_path: Path) -> Iterator[Queue]:
    """The admin app with an async API `q` and a realtime API `echo`."""
    project = tmp_path / "project"
    project.mkdir()
    (project / "predictor.py").write_text(PREDICTOR)
    state = StateDB(tmp_path / "state.db")
    url = f"sqlite://{tmp_path / 'queue.db'}"
    store = open_store(url)
    controller = Controller(
        Store(state),
        FakeRuntime(tmp_path / "logs"),
        FakeGateway(),
        endpoint=lambda name: f"http://gateway/{name}",
        queue_store=store,
        queue_url=url,
        snapshots=SnapshotStore(tmp_path / "snapshots"),
    )
    info = DaemonInfo(pid=1, version="0", gateway_url="http://gateway", admin_url="http://admin", started_at=0)
    app = build_admin_app(controller, token=TOKEN, info=lambda: info, shutdown=lambda: None)
    specs = [{"name": "q", "kind": "async"}, {"name": "echo"}]
    deployments = [{"spec": {**s, "predictor": {"path": "predictor.py"}}, "project_dir": str(project)} for s in specs]
    with TestClient(app, headers={"authorization": f"Bearer {TOKEN}"}) as http:
        deployed = http.post("/v1/apis", json={"deployments": deployments})
        assert deployed.status_code == 200, deployed.text
        yield Queue(http, store)
    store.close()
    state.close()


def hex_id(n: int) -> str:
    return f"{n:032x}"


def test_dead_letters_show_the_start_of_their_payload(queue: Queue) -> None:
    queue.fail(queue.submit(hex_id(1), b'{"text": "' + b"a" * 2000 + b'"}'))
    queue.fail(queue.submit(hex_id(2), b"\x00\xffbinary", "application/octet-stream"))
    dead = {r["id"]: r for r in queue.http.get("/v1/apis/q/dead-letters").json()["dead_letters"]}
    text, binary = dead[hex_id(1)], dead[hex_id(2)]
    assert text["payload"].startswith('{"text": "aaa') and len(text["payload"]) == 1024
    assert (text["payload_bytes"], text["truncated"], text["payload_type"]) == (2012, True, "application/json")
    assert "payload_encoding" not in text and text["error"] == "boom"
    assert binary["payload_encoding"] == "base64" and base64.b64decode(binary["payload"]) == b"\x00\xffbinary"
    assert (binary["payload_bytes"], binary["truncated"]) == (8, False)


def test_requeue_named_or_every_dead_letter(queue: Queue) -> None:
    for n in (1, 2, 3):
        queue.fail(queue.submit(hex_id(n)))
    pending = queue.submit(hex_id(4))
    answer = queue.http.post("/v1/apis/q/dead-letters/requeue", json={"ids": [hex_id(1), pending, hex_id(9)]})
    assert answer.status_code == 200, answer.text
    assert answer.json() == {"requeued": [hex_id(1)], "not_dead_letters": [pending, hex_id(9)]}
    everything = queue.http.post("/v1/apis/q/dead-letters/requeue")  # no body: all of them
    assert everything.json() == {"requeued": [hex_id(2), hex_id(3)], "not_dead_letters": []}
    assert queue.http.get("/v1/apis/q/dead-letters").json()["dead_letters"] == []


def test_requests_are_listed_oldest_first_with_their_payload(queue: Queue) -> None:
    first, second = queue.submit(hex_id(1), b"hello", "text/plain"), queue.submit(hex_id(2))
    queue.store.lease("q", "w", 1, 30, time.time())  # the first is now in progress
    listed = queue.http.get("/v1/apis/q/requests").json()["requests"]
    assert [(r["id"], r["status"]) for r in listed] == [(first, "in_progress"), (second, "in_queue")]
    assert (listed[0]["payload"], listed[0]["payload_bytes"]) == ("hello", 5)
    queued = queue.http.get("/v1/apis/q/requests?status=in_queue&limit=5").json()["requests"]
    assert [r["id"] for r in queued] == [second]


def test_cancel_fails_a_pending_request_once(queue: Queue) -> None:
    request_id = queue.submit(hex_id(1))
    cancelled = queue.http.post(f"/v1/requests/{request_id}/cancel")
    assert cancelled.status_code == 200, cancelled.text
    assert (cancelled.json()["status"], cancelled.json()["error"]) == ("failed", "cancelled by the operator")
    again = queue.http.post(f"/v1/requests/{request_id}/cancel?api=q")
    assert again.status_code == 409 and "already failed" in again.json()["error"], again.text
    assert [r["id"] for r in queue.http.get("/v1/apis/q/dead-letters").json()["dead_letters"]] == [request_id]


CASES = [
    ("requeue-realtime", ("POST", "/v1/apis/echo/dead-letters/requeue", {}), 400, "not async"),
    ("requeue-no-api", ("POST", "/v1/apis/nope/dead-letters/requeue", {}), 404, "no API named 'nope'"),
    ("requeue-bad-id", ("POST", "/v1/apis/q/dead-letters/requeue", {"ids": ["x"]}), 400, "ids.0"),
    ("requeue-list", ("POST", "/v1/apis/q/dead-letters/requeue", ["a"]), 400, "must be a JSON object"),
    ("requeue-typo", ("POST", "/v1/apis/q/dead-letters/requeue", {"id": []}), 400, "id: unknown field"),
    ("list-realtime", ("GET", "/v1/apis/echo/requests", None), 400, "not async"),
    ("list-no-api", ("GET", "/v1/apis/nope/requests", None), 404, "no API named"),
    ("list-status", ("GET", "/v1/apis/q/requests?status=completed", None), 400, "status must be"),
    ("list-limit", ("GET", "/v1/apis/q/requests?limit=x", None), 400, "limit must be an integer"),
    ("cancel-bad-id", ("POST", "/v1/requests/ABC..x/cancel", None), 400, "32 lowercase hex"),
    ("cancel-unknown", ("POST", f"/v1/requests/{hex_id(7)}/cancel", None), 404, "any async API"),
    ("cancel-realtime", ("POST", f"/v1/requests/{hex_id(7)}/cancel?api=echo", None), 400, "not async"),
    ("cancel-no-api", ("POST", f"/v1/requests/{hex_id(7)}/cancel?api=nope", None), 404, "no API named"),
]


@pytest.mark.parametrize(("request_", "status", "message"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_gets_a_4xx_that_says_what_was_wrong(
    queue: Queue, request_: tuple[str, str, object], status: int, message: str
) -> None:
    method, path, body = request_
    response = queue.http.request(method, path, json=body)
    assert response.status_code == status, response.text
    assert message in response.json()["error"], response.text


@hypothesis.settings(
    max_examples=60, deadline=None, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(ids=st.lists(st.text(max_size=40), max_size=4), request_id=st.text(max_size=40), status=st.text(max_size=12))
def test_any_id_or_status_gets_an_answer(queue: Queue, ids: list[str], request_id: str, status: str) -> None:
    """Any text, lone surrogates and NUL bytes included, is a 4xx or a 2xx, never a 5xx."""
    answers = [
        queue.http.post("/v1/apis/q/dead-letters/requeue", json={"ids": ids}),
        queue.http.post(f"/v1/requests/{request_id.encode('utf-8', 'replace').hex()[:40]}/cancel"),
        queue.http.get("/v1/apis/q/requests", params={"status": status.encode("utf-8", "replace")}),
    ]
    assert all(answer.status_code < 500 for answer in answers), [a.text for a in answers]
