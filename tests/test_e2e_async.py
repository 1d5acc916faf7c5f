"""Async APIs through the real daemon, on SQLite and on Redis: nothing accepted is ever lost, even
when kill -9 hits a replica and then the daemon; results are recorded once; failures become dead
letters; webhooks are called; bad input gets clear errors."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import httpx
import pytest
import yaml
from conftest import Cirrus, pid_alive, replica_pids, write_project

from cirrus.store import open_store
from cirrus.types import ApiStatusName

WORKER = """
import os, time


class Predictor:
    def __init__(self, config):
        self.log = config["log"]

    def predict(self, payload, request_id):
        if payload.get("reject"):
            from cirrus import HTTPError
            raise HTTPError(422, "x must be positive")
        if payload.get("explode"):
            raise RuntimeError("boom")
        time.sleep(0.004)
        with open(self.log, "a") as f:  # every delivery, duplicates included
            f.write(payload["key"] + "\\n")
        return {"key": payload["key"], "double": payload["x"] * 2, "pid": os.getpid(), "request_id": request_id}
"""


@pytest.fixture(params=["sqlite", "redis"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite://{tmp_path / 'queue.db'}"
        return
    from redis_server import redis_url

    with redis_url(tmp_path / "redis") as url:
        yield url


@contextlib.contextmanager
def daemon_with(home: Path, store_url: str) -> Iterator[Cirrus]:
    cirrus = Cirrus(home, CIRRUS_STORE=store_url)
    cirrus.up()
    try:
        yield cirrus
    finally:
        assert cirrus.shutdown() == {}


def _project(tmp_path: Path, **autoscaling: float) -> Path:
    return write_project(
        tmp_path / "project",
        WORKER,
        name="jobs",
        kind="async",
        predictor={"config": {"log": str(tmp_path / "deliveries.log")}},
        concurrency={"max_concurrency": 8, "timeout_s": 10},
        queue={"lease_s": 1.0, "max_attempts": 20},
        autoscaling={"min_replicas": 2, "max_replicas": 2, **autoscaling},
    )


def _submit(url: str, keys: list[int], accepted: dict[str, str], lock: threading.Lock) -> None:
    with httpx.Client(timeout=10) as http:
        for n in keys:
            key = f"k{n}"
            try:
                response = http.post(url, json={"key": key, "x": n})
            except httpx.TransportError:
                continue  # the daemon is down: not accepted, the client would retry
            if response.status_code == 202:
                with lock:
                    accepted[response.json()["id"]] = key
            else:
                assert response.status_code == 503, response.text


def test_nothing_accepted_is_lost_through_replica_and_daemon_kills(tmp_path: Path, store_url: str) -> None:
    home = tmp_path / "home"
    accepted: dict[str, str] = {}
    lock = threading.Lock()
    with daemon_with(home, store_url) as cirrus:
        client = cirrus.client()
        client.deploy(_project(tmp_path))
        url = cirrus.url("jobs")
        threads = [
            threading.Thread(target=_submit, args=(url, list(range(i, 600, 4)), accepted, lock)) for i in range(4)
        ]
        for thread in threads:
            thread.start()
        while len(accepted) < 200:
            time.sleep(0.01)
        victim = sorted(replica_pids(client.get("jobs")))[0]
        os.kill(victim, signal.SIGKILL)  # a replica dies mid-work
        while len(accepted) < 400:
            time.sleep(0.01)
        daemon_pid = cirrus.info.pid
        os.kill(daemon_pid, signal.SIGKILL)  # then the daemon itself
        for thread in threads:
            thread.join()
        assert not pid_alive(victim)

        cirrus.up()  # recovery: the restarted daemon restores the API; its replicas resume the queue
        url = cirrus.url("jobs")
        # The client sends again what was refused while the daemon was down, and the rest.
        done = {int(key[1:]) for key in accepted.values()}
        rest = [n for n in range(1000) if n not in done]
        threads = [threading.Thread(target=_submit, args=(url, rest[i::4], accepted, lock)) for i in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert sorted(int(key[1:]) for key in accepted.values()) == list(range(1000))

        store = open_store(store_url)
        deadline = time.monotonic() + 90
        while True:
            backlog = store.backlog("jobs", time.time())
            if backlog.in_queue == backlog.in_progress == 0 or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert (backlog.in_queue, backlog.in_progress) == (0, 0)
        with httpx.Client(timeout=10) as http:
            for request_id, key in accepted.items():
                record = http.get(f"{url}/{request_id}").json()
                assert record["status"] == "completed", record
                n = int(key[1:])
                assert record["result"]["key"] == key and record["result"]["double"] == 2 * n
        assert store.dead_letters("jobs") == []
        store.close()
        # At least once: every accepted request was delivered; some more than once (the kills).
        delivered = (tmp_path / "deliveries.log").read_text().split()
        assert set(accepted.values()) <= set(delivered)
        status = client.get("jobs")
        assert status.status is ApiStatusName.LIVE


class _Hook(BaseHTTPRequestHandler):
    received: list[dict[str, object]] = []

    def do_POST(self) -> None:
        length = int(self.headers["content-length"])
        _Hook.received.append(json.loads(self.rfile.read(length)))
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


def test_failures_dead_letters_webhooks_and_bad_input(tmp_path: Path, store_url: str) -> None:
    hook = HTTPServer(("127.0.0.1", 0), _Hook)
    threading.Thread(target=hook.serve_forever, daemon=True).start()
    webhook = f"http://127.0.0.1:{hook.server_address[1]}/done"
    _Hook.received.clear()
    try:
        with daemon_with(tmp_path / "home", store_url) as cirrus:
            client = cirrus.client()
            project = _project(
                tmp_path, min_replicas=0, max_replicas=1, scale_to_zero_after_s=1, window_s=1, panic_window_s=1
            )
            spec = (project / "cirrus.yaml").read_text().replace("max_attempts: 20", "max_attempts: 2")
            apis = yaml.safe_load(spec)  # webhooks are opt-in; the receiver is on loopback
            apis[0]["queue"]["webhooks"] = {"allowed_hosts": ["127.0.0.1"], "allow_private": True}
            (project / "cirrus.yaml").write_text(yaml.safe_dump(apis))
            client.deploy(project)
            url = cirrus.url("jobs")
            with httpx.Client(timeout=10) as http:
                ok = http.post(url, json={"key": "a", "x": 1}, headers={"x-cirrus-webhook": webhook})
                rejected = http.post(url, json={"reject": True})
                exploded = http.post(f"{url}?webhook={webhook}", json={"explode": True})
                assert {ok.status_code, rejected.status_code, exploded.status_code} == {202}
                assert ok.headers["location"] == f"/jobs/{ok.json()['id']}"

                def final(response: httpx.Response) -> dict[str, object]:
                    deadline = time.monotonic() + 30
                    while True:
                        record: dict[str, object] = http.get(f"{url}/{response.json()['id']}").json()
                        if record["status"] in ("completed", "failed") or time.monotonic() > deadline:
                            return record
                        time.sleep(0.05)

                result = final(ok)["result"]
                assert result == {"key": "a", "double": 2, "pid": result["pid"], "request_id": result["request_id"]}  # type: ignore[index]
                # One id everywhere: the 202's id and request_id, its X-Request-Id and the predictor's request_id.
                accepted = ok.json()
                assert accepted["id"] == accepted["request_id"] == ok.headers["x-request-id"] == result["request_id"]  # type: ignore[index]
                # A client's own X-Request-Id is not the queue's id (it could repeat): the 202 names the one to poll.
                mine = http.post(url, json={"key": "b", "x": 2}, headers={"x-request-id": "my-correlation-id"})
                assert (
                    mine.json()["id"]
                    == mine.json()["request_id"]
                    == mine.headers["x-request-id"]
                    != "my-correlation-id"
                )
                assert final(mine)["result"]["request_id"] == mine.json()["id"]  # type: ignore[index]
                record = final(rejected)
                assert (record["status"], record["attempts"], record["error"]) == ("failed", 1, "x must be positive")
                record = final(exploded)
                assert record["status"] == "failed" and record["attempts"] == 2  # retried, then a dead letter
                assert str(record["error"]).startswith("the predictor failed; see the replica log")  # no message

                # Bad input: clear errors, nothing stored.
                assert http.get(f"{url}/{'0' * 32}").status_code == 404
                assert http.get(f"{url}/not-an-id").status_code == 404
                bad_hook = http.post(url, json={}, headers={"x-cirrus-webhook": "ftp://x"})
                assert bad_hook.status_code == 400 and "webhook" in bad_hook.json()["error"]
                assert http.post(cirrus.url("nope"), json={}).status_code == 404

            dead = client.dead_letters("jobs")
            assert {d["id"] for d in dead} == {rejected.json()["id"], exploded.json()["id"]}
            code, out, _ = cirrus.cli("dead-letters", "jobs")
            assert code == 0 and "the predictor failed" in out and "x must be positive" in out

            deadline = time.monotonic() + 30
            while len(_Hook.received) < 2 and time.monotonic() < deadline:
                time.sleep(0.05)
            assert sorted(str(h["status"]) for h in _Hook.received) == ["completed", "failed"]

            # The backlog is empty: the API goes back to zero replicas.
            idle = cirrus.wait_for("jobs", lambda s: s.replicas_desired == 0 and not s.replicas, timeout=30)
            assert idle.status is ApiStatusName.LIVE

    finally:
        hook.shutdown()
        hook.server_close()


def test_daemon_stops_promptly_under_accept_load_and_keeps_every_accepted_request(tmp_path: Path) -> None:
    store_url = f"sqlite://{tmp_path / 'queue.db'}"
    project = write_project(
        tmp_path / "project",
        WORKER,
        name="idle",
        kind="async",
        predictor={"config": {"log": str(tmp_path / "deliveries.log")}},
        compute={"cpu": 4096},  # never placed: every accepted request stays queued
        autoscaling={"min_replicas": 0, "max_replicas": 1},
    )
    cirrus = Cirrus(tmp_path / "home", CIRRUS_STORE=store_url)
    try:
        cirrus.up()
        cirrus.client().deploy(project, wait=False)
        url, pid = cirrus.url("idle"), cirrus.info.pid
        accepted: dict[str, str] = {}
        lock = threading.Lock()
        threads = [
            threading.Thread(target=_submit, args=(url, list(range(i, 20_000, 8)), accepted, lock)) for i in range(8)
        ]
        for thread in threads:
            thread.start()
        while len(accepted) < 300:
            time.sleep(0.01)
        started = time.monotonic()
        cirrus.client().down(timeout=30)
        while pid_alive(pid) and time.monotonic() - started < 20:
            time.sleep(0.05)
        assert not pid_alive(pid), "the daemon hung on shutdown under accept load"
        for thread in threads:
            thread.join()
        store = open_store(store_url)
        try:
            assert all(store.get("idle", request_id) is not None for request_id in accepted)  # every 202 was kept
        finally:
            store.close()
    finally:
        cirrus.shutdown()
