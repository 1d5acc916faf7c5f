"""Issue 11, async APIs, through the real daemon: no credentials stored with a request, webhooks
opt-in with a host allowlist and a refusal of non-public addresses after DNS, malformed JSON
refused at submit as a realtime API refuses it, a deleted API's queue never run again, `durability:
fsync` reaching the store, and a full disk answered 503 + Retry-After with nothing accepted lost.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import sqlite3
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import Cirrus, module_daemon, write_project
from test_hardening_async_store import tiny_filesystem

from cirrus.store import open_store
from cirrus.store.base import API_DELETED
from cirrus.types import ApiStatusName

PREDICTOR = """
class Predictor:
    def __init__(self, config):
        pass

    def predict(self, payload, headers):
        return {"payload": payload, "headers": headers}
"""
NEVER_PLACED = {"cpu": 4096}  # more CPU than any node has: the API's replica stays pending, its queue full
NO_REPLICAS = {"min_replicas": 0, "init_replicas": 0, "max_replicas": 1}
SECRETS = {"authorization": "Bearer s3cr3t-token", "cookie": "session=s3cr3t-cookie", "x-secret": "s3cr3t-x"}


def _async_api(name: str, queue: dict[str, Any] | None = None, **spec: Any) -> dict[str, Any]:
    return {
        "name": name,
        "kind": "async",
        "concurrency": {"max_concurrency": 4, "timeout_s": 10},
        "queue": {"lease_s": 5, **(queue or {})},
        **spec,
    }


class _Hooks(BaseHTTPRequestHandler):
    """A webhook receiver on 127.0.0.1: records (Host header, JSON body) of every POST."""

    received: list[tuple[str, dict[str, Any]]] = []

    def do_POST(self) -> None:
        length = int(self.headers["content-length"])
        _Hooks.received.append((self.headers["host"], json.loads(self.rfile.read(length))))
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@dataclass
class Env:
    cirrus: Cirrus
    root: Path
    queue_db: Path
    hook_port: int

    def url(self, path: str) -> str:
        return self.cirrus.url(path)


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    root = tmp_path_factory.mktemp("hardening-async")
    hooks = HTTPServer(("127.0.0.1", 0), _Hooks)
    threading.Thread(target=hooks.serve_forever, daemon=True).start()
    project = write_project(
        root / "project",
        PREDICTOR,
        apis=[
            _async_api("plain", {"forward_headers": ["X-Trace"]}),
            _async_api("hooks", {"webhooks": {"allowed_hosts": ["localhost", "*.example.org"]}}),
            _async_api("hooks-private", {"webhooks": {"allowed_hosts": ["localhost"], "allow_private": True}}),
            _async_api("durable", {"durability": "fsync"}, compute=NEVER_PLACED, autoscaling=NO_REPLICAS),
            _async_api("normal", compute=NEVER_PLACED, autoscaling=NO_REPLICAS),
            {"name": "echo", "kind": "realtime"},
        ],
    )
    queue_db = root / "queue.db"
    try:
        with module_daemon(root / "home", CIRRUS_STORE=f"sqlite://{queue_db}") as cirrus:
            cirrus.client().deploy(project, wait=False)  # the never-placed APIs never become live
            for name in ("plain", "hooks", "hooks-private", "echo"):
                cirrus.wait_for(name, lambda status: status.status is ApiStatusName.LIVE, timeout=120)
            yield Env(cirrus, root, queue_db, hooks.server_address[1])
    finally:
        hooks.shutdown()
        hooks.server_close()


def _final(http: httpx.Client, url: str, request_id: str, until: str = "status", timeout: float = 30) -> dict[str, Any]:
    """The request's record once it is finished (and, with until="webhook_result", its webhook too)."""
    deadline = time.monotonic() + timeout
    while True:
        record: dict[str, Any] = http.get(f"{url}/{request_id}").json()
        done = record["status"] in ("completed", "failed") and (until == "status" or until in record)
        if done or time.monotonic() > deadline:
            return record
        time.sleep(0.05)


def _stored_headers(queue_db: Path, request_id: str) -> list[list[str]]:
    with contextlib.closing(sqlite3.connect(queue_db)) as db:
        (headers,) = db.execute("SELECT headers FROM requests WHERE id = ?", (request_id,)).fetchone()
    stored: list[list[str]] = json.loads(headers)
    return stored


# --- 1. no credentials stored -----------------------------------------------------------------


def test_stored_requests_keep_no_credentials(env: Env) -> None:
    url = env.url("plain")
    with httpx.Client(timeout=10) as http:
        headers = {**SECRETS, "x-api-key": "s3cr3t-key", "x-trace": "t-1", "user-agent": "hardening/1"}
        accepted = http.post(url, json={"x": 1}, headers=headers)
        assert accepted.status_code == 202, accepted.text
        request_id = accepted.json()["id"]
        # Read the store directly: only the allowlist (and the spec's X-Trace) is there.
        stored = dict(_stored_headers(env.queue_db, request_id))
        assert not {"authorization", "cookie", "x-secret", "x-api-key"} & set(stored), stored
        assert stored["x-trace"] == "t-1" and stored["user-agent"] == "hardening/1"
        assert set(stored) <= {"content-type", "accept", "user-agent", "x-request-id", "x-trace"}, stored
        # The predictor's `headers` argument does not see them either.
        record = _final(http, url, request_id)
        assert record["status"] == "completed", record
        seen = record["result"]["headers"]
        assert not {"authorization", "cookie", "x-secret", "x-api-key"} & set(seen), seen
        assert seen["x-trace"] == "t-1"
    # No trace of a secret anywhere in the queue's files (the WAL included).
    for path in env.root.glob("queue.db*"):
        data = path.read_bytes()
        for secret in (*SECRETS.values(), "s3cr3t-key"):
            assert secret.encode() not in data, (path, secret)


# --- 2. webhooks: opt-in, allowlisted, public addresses only -----------------------------------


def test_webhooks_are_opt_in_and_limited_to_allowed_hosts(env: Env) -> None:
    hook = f"http://localhost:{env.hook_port}/done"
    with httpx.Client(timeout=10) as http:
        for how in ({"headers": {"x-cirrus-webhook": hook}}, {"params": {"webhook": hook}}):
            refused = http.post(env.url("plain"), json={"x": 1}, **how)  # type: ignore[arg-type]
            assert refused.status_code == 400, refused.text
            assert "this API does not send webhooks" in refused.json()["error"]
        for bad, message in [
            ("http://evil.example.net/x", "not allowed"),
            ("http://example.org/x", "not allowed"),  # *.example.org: subdomains only
            (f"http://127.0.0.1:{env.hook_port}/done", "not allowed"),  # an address, not an allowed name
            ("ftp://localhost/x", "not an http"),
        ]:
            refused = http.post(env.url("hooks"), json={"x": 1}, headers={"x-cirrus-webhook": bad})
            assert refused.status_code == 400, (bad, refused.text)
            assert message in refused.json()["error"], (bad, refused.json())


def test_webhook_to_a_loopback_name_is_refused_unless_allow_private(env: Env) -> None:
    hook = f"http://localhost:{env.hook_port}/done"
    with httpx.Client(timeout=10) as http:
        public_only = http.post(env.url("hooks"), json={"x": 1}, headers={"x-cirrus-webhook": hook})
        private_ok = http.post(env.url("hooks-private"), json={"x": 2}, headers={"x-cirrus-webhook": hook})
        assert (public_only.status_code, private_ok.status_code) == (202, 202), (public_only.text, private_ok.text)
        refused = _final(http, env.url("hooks"), public_only.json()["id"], until="webhook_result")
        delivered = _final(http, env.url("hooks-private"), private_ok.json()["id"], until="webhook_result")
    # localhost resolves to a loopback address: no request made, the refusal recorded on the request
    assert refused["status"] == "completed", refused
    assert refused["webhook_result"].startswith("refused: localhost resolves to"), refused
    assert "loopback address" in refused["webhook_result"]
    assert all(body["id"] != public_only.json()["id"] for _, body in _Hooks.received)
    # with allow_private, it reaches the receiver, at the checked address, with the URL's Host
    assert delivered["webhook_result"] == "delivered: HTTP 204", delivered
    [(host, body)] = [(h, b) for h, b in _Hooks.received if b["id"] == private_ok.json()["id"]]
    assert host == f"localhost:{env.hook_port}"
    assert body["status"] == "completed" and body["result"]["payload"] == {"x": 2}


# --- 4. malformed JSON refused at submit --------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "content_type"),
    [
        (b'{"x": ', "application/json"),
        (b"[" * 5000 + b"]" * 5000, "application/json"),  # nested too deeply
        (b"\xff\xfe not utf-8", "text/plain"),
    ],
    ids=["truncated", "deep", "not-utf8-text"],
)
def test_malformed_body_is_400_at_submit_as_in_realtime(env: Env, body: bytes, content_type: str) -> None:
    with httpx.Client(timeout=10) as http:
        queued = http.post(env.url("plain"), content=body, headers={"content-type": content_type})
        realtime = http.post(env.url("echo"), content=body, headers={"content-type": content_type})
        assert realtime.status_code == 400, realtime.text
        assert queued.status_code == 400, queued.text
        assert queued.json()["error"] == realtime.json()["error"]
        assert "id" not in queued.json()


def test_well_formed_bodies_are_still_accepted(env: Env) -> None:
    with httpx.Client(timeout=10) as http:
        for body, content_type in [
            (b'{"x": 1}', "application/json"),
            (b"", "application/json"),
            (b"[" * 100 + b"]" * 100, "application/json"),
            (b"hello", "text/plain"),
            (b"\xff\x00", "application/octet-stream"),
        ]:
            response = http.post(env.url("plain"), content=body, headers={"content-type": content_type})
            assert response.status_code == 202, (body[:20], response.text)


# --- 3. a deleted API's queue --------------------------------------------------------------------


def test_a_deleted_apis_queued_requests_never_run_again(env: Env) -> None:
    project = env.root / "doomed"
    write_project(project, PREDICTOR, apis=[_async_api("doomed", compute=NEVER_PLACED, autoscaling=NO_REPLICAS)])
    client = env.cirrus.client()
    client.deploy(project, wait=False)  # its replica is never placed: what it is sent stays queued
    url = env.url("doomed")
    with httpx.Client(timeout=10) as http:
        old = [http.post(url, json={"old": i}) for i in range(5)]
        assert {r.status_code for r in old} == {202}
        client.delete("doomed")
        assert http.post(url, json={"old": 99}).status_code == 404
        # The same name again, now with a replica that runs: only the new requests run.
        write_project(project, PREDICTOR, apis=[_async_api("doomed")])
        client.deploy(project, wait=False)
        env.cirrus.wait_for("doomed", lambda status: status.status is ApiStatusName.LIVE, timeout=60)
        new = [http.post(url, json={"new": i}) for i in range(2)]
        assert {r.status_code for r in new} == {202}
        for response in new:
            record = _final(http, url, response.json()["id"])
            assert record["status"] == "completed", record
        time.sleep(1.0)  # the replica had time to lease anything else queued
        for response in old:
            record = http.get(f"{url}/{response.json()['id']}").json()
            assert (record["status"], record["attempts"], record["error"]) == ("failed", 0, API_DELETED), record
            assert "result" not in record
    dead = {d["id"] for d in client.dead_letters("doomed")}
    assert {r.json()["id"] for r in old} <= dead
    client.delete("doomed")


# --- 5. durability -------------------------------------------------------------------------------


def _daemon_fsyncs(env: Env, api: str, count: int) -> int:
    """fsync/fdatasync calls the daemon makes while `count` requests are accepted one by one."""
    trace, errors = env.root / f"{api}.strace", env.root / f"{api}.strace-errors"
    command = ["strace", "-f", "-qq", "-e", "trace=fsync,fdatasync", "-o", str(trace), "-p", str(env.cirrus.info.pid)]
    with errors.open("wb") as stderr, subprocess.Popen(command, stderr=stderr) as strace:
        try:
            time.sleep(1.0)  # attached to every thread
            if strace.poll() is not None:
                pytest.skip(f"strace cannot attach here: {errors.read_text()[:200]}")
            with httpx.Client(timeout=10) as http:
                for i in range(count):
                    assert http.post(env.url(api), json={"i": i}).status_code == 202
        finally:
            strace.terminate()
    return sum(1 for line in trace.read_text().splitlines() if "sync(" in line)


def test_fsync_durability_reaches_the_store(env: Env) -> None:
    if shutil.which("strace") is None:
        pytest.skip("strace is not installed: cannot count the daemon's fsync calls")
    normal, fsync = _daemon_fsyncs(env, "normal", 40), _daemon_fsyncs(env, "durable", 40)
    assert fsync - normal >= 30, (normal, fsync)  # a sync per accept (each one its own batch here)
    store = open_store(f"sqlite://{env.queue_db}")
    try:
        assert store.counts("durable").in_queue >= 40
    finally:
        store.close()


# --- 5. a full disk --------------------------------------------------------------------------------


def test_disk_full_is_503_with_retry_after_and_loses_nothing_accepted(tmp_path: Path) -> None:
    project = write_project(
        tmp_path / "project", PREDICTOR, apis=[_async_api("jobs", compute=NEVER_PLACED, autoscaling=NO_REPLICAS)]
    )
    with tiny_filesystem(tmp_path / "tiny") as tiny:
        cirrus = Cirrus(tmp_path / "home", CIRRUS_STORE=f"sqlite://{tiny / 'queue.db'}")
        try:
            cirrus.up()
            cirrus.client().deploy(project, wait=False)
            url = cirrus.url("jobs")
            accepted: list[str] = []
            with httpx.Client(timeout=30) as http:
                for i in range(500):
                    response = http.post(url, json={"i": i, "pad": "x" * 16_000})
                    if response.status_code != 202:
                        break
                    accepted.append(response.json()["id"])
                assert response.status_code == 503, response.text
                assert response.headers["retry-after"].isdigit()
                assert "full" in response.json()["error"] and "not stored" in response.json()["error"]
                assert len(accepted) >= 10, len(accepted)
                # It stays a clear 503 while the disk is full (never a bare 500), and reads go on.
                again = http.post(url, json={"i": -1, "pad": "x" * 16_000})
                assert again.status_code == 503 and "retry-after" in again.headers
                for request_id in accepted:
                    record = http.get(f"{url}/{request_id}")
                    assert record.status_code == 200 and record.json()["status"] == "in_queue", record.text
            assert "is full" in cirrus.daemon_log()
        finally:
            assert cirrus.shutdown() == {}
        store = open_store(f"sqlite://{tiny / 'queue.db'}")  # after a restart: every accepted request
        try:
            assert {r for r in accepted if store.get("jobs", r) is not None} == set(accepted)
            assert store.counts("jobs").in_queue == len(accepted)
        finally:
            store.close()
