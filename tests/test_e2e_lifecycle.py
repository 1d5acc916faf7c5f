"""The daemon's and the replicas' life: restarts restore APIs, no replica outlives its daemon, hooks
overlap without holding the inference slot, post_predict runs after the reply, updates drop nothing."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import httpx
import pytest
from conftest import ECHO_PREDICTOR, Cirrus, pid_alive, replica_pids, wait_gone, write_project

from cirrus.types import ApiStatusName


def _two_apis(directory: Path) -> Path:
    return write_project(
        directory,
        ECHO_PREDICTOR,
        apis=[{"name": "alpha", "predictor": {"config": {"greeting": "a"}}}, {"name": "beta"}],
    )


def _all_live(cirrus: Cirrus, names: list[str]) -> set[int]:
    pids: set[int] = set()
    for name in names:
        status = cirrus.wait_for(name, lambda s: s.status == ApiStatusName.LIVE)
        pids |= replica_pids(status)
    return pids


def _answers(cirrus: Cirrus) -> None:
    client = cirrus.client()
    assert client.predict("alpha", {"n": 1}).json() == {"greeting": "a", "echo": {"n": 1}}
    assert client.predict("beta", {"n": 2}).json() == {"greeting": "hello", "echo": {"n": 2}}


NO_REAPER = """
import ctypes, json, os, subprocess, sys, time

PR_SET_CHILD_SUBREAPER = 36
if ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
    sys.exit("prctl failed")
cli = [sys.executable, "-m", "cirrus.cli"]
subprocess.run([*cli, "up"], check=True, capture_output=True)  # the daemon is orphaned to us: we never reap it
started = time.monotonic()
down = subprocess.run([*cli, "down", "--timeout", "6"], capture_output=True, text=True)
elapsed = time.monotonic() - started
while True:  # reap the daemon at last
    try:
        os.waitpid(-1, 0)
    except ChildProcessError:
        break
print(json.dumps({"code": down.returncode, "out": down.stdout, "err": down.stderr, "elapsed": elapsed}))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="needs prctl(PR_SET_CHILD_SUBREAPER)")
def test_down_does_not_wait_for_a_zombie_daemon(cirrus: Cirrus) -> None:
    """A daemon that exited but is not reaped yet (its `cirrus up` is gone and init reaps late or,
    in some containers, never) is stopped: `down` must not wait for the reaping."""
    result = subprocess.run(
        [sys.executable, "-c", NO_REAPER], env=cirrus.env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    down = json.loads(result.stdout)
    assert (down["code"], down["out"].strip()) == (0, "Cirrus daemon stopped"), down["err"]
    assert down["elapsed"] < 3, down


def test_daemon_restarts_restore_every_api(daemon: Cirrus, tmp_path: Path) -> None:
    client = daemon.client()
    client.deploy(_two_apis(tmp_path / "project"))
    _answers(daemon)
    first_pids = _all_live(daemon, ["alpha", "beta"])
    assert len(first_pids) == 2

    # A clean restart: down stops the replicas, up brings every API back.
    assert client.down() is True
    assert not wait_gone(first_pids), "replicas outlived `down`"
    client.up()
    second_pids = _all_live(daemon, ["alpha", "beta"])
    assert not second_pids & first_pids
    _answers(daemon)
    assert [s.revision for s in client.get()] == [1, 1]

    # A crash: kill -9 of the daemon. Its replicas notice and exit by themselves.
    old_daemon = daemon.info.pid
    os.kill(old_daemon, signal.SIGKILL)
    left = wait_gone(second_pids, timeout=5)
    assert not left, f"replicas of a killed daemon still run: {left}"
    assert not wait_gone(lambda: daemon.processes(), timeout=5)
    info = client.up()  # the stale daemon.json is ignored
    assert info.pid != old_daemon
    third_pids = _all_live(daemon, ["alpha", "beta"])
    assert not third_pids & second_pids
    _answers(daemon)


HOOKS_PREDICTOR = """
    import asyncio
    import time
    from pathlib import Path


    class Predictor:
        def __init__(self, config):
            self.marker_dir = Path(config["marker_dir"])
            self.waiting = 0
            self.peak_waiting = 0
            self.predicting = 0
            self.peak_predicting = 0

        async def pre_predict(self, payload):
            self.waiting += 1
            self.peak_waiting = max(self.peak_waiting, self.waiting)
            try:
                await asyncio.sleep(0.05)  # I/O: holds no inference slot
            finally:
                self.waiting -= 1
            return {**payload, "fetched": True}

        def predict(self, payload, request_id):
            self.predicting += 1
            self.peak_predicting = max(self.peak_predicting, self.predicting)
            time.sleep(0.001)
            self.predicting -= 1
            return {
                "payload": payload,
                "request_id": request_id,
                "peak_waiting": self.peak_waiting,
                "peak_predicting": self.peak_predicting,
            }

        async def post_predict(self, response, payload):
            if payload.get("mark"):
                await asyncio.sleep(1.0)
                (self.marker_dir / payload["mark"]).write_text(response["request_id"])
"""


def _hooks_project(directory: Path, marker_dir: Path) -> Path:
    return write_project(
        directory,
        HOOKS_PREDICTOR,
        name="hooks",
        predictor={"config": {"marker_dir": str(marker_dir)}},
        concurrency={"inference_slots": 1, "max_concurrency": 32},
    )


def test_async_pre_predict_overlaps_on_one_slot(daemon: Cirrus, tmp_path: Path) -> None:
    daemon.client().deploy(_hooks_project(tmp_path / "project", tmp_path))

    async def rounds() -> list[tuple[float, list[httpx.Response]]]:
        results = []
        async with httpx.AsyncClient(base_url=daemon.gateway_url, timeout=30) as http:
            for attempt in range(4):  # the first round also opens the connections
                started = time.perf_counter()
                responses = await asyncio.gather(*(http.post("/hooks", json={"i": i}) for i in range(10)))
                results.append((time.perf_counter() - started, list(responses)))
                del attempt
        return results

    results = asyncio.run(rounds())
    for _, responses in results:
        assert [r.status_code for r in responses] == [200] * 10
        assert [r.json()["payload"] for r in responses] == [{"i": i, "fetched": True} for i in range(10)]
    best = min(elapsed for elapsed, _ in results[1:])
    assert best < 0.3, f"10 requests with 50 ms of async I/O each took {[round(e, 3) for e, _ in results]}s"
    last = results[-1][1][-1].json()
    assert last["peak_waiting"] >= 2  # several requests were in pre_predict at once...
    assert last["peak_predicting"] == 1  # ...but only one ever held the single slot


def test_post_predict_runs_after_the_reply(daemon: Cirrus, tmp_path: Path) -> None:
    markers = tmp_path / "markers"
    markers.mkdir()
    daemon.client().deploy(_hooks_project(tmp_path / "project", markers))
    marker = markers / "done"
    with httpx.Client(base_url=daemon.gateway_url, timeout=30) as http:
        started = time.monotonic()
        response = http.post("/hooks", json={"mark": "done"}, headers={"x-request-id": "post-1"})
        answered = time.monotonic() - started
    assert response.status_code == 200
    assert answered < 0.8, f"the reply waited for post_predict ({answered:.2f}s)"
    assert not marker.exists()
    deadline = time.monotonic() + 10
    while not marker.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert marker.exists(), "post_predict never ran"
    assert time.monotonic() - started >= 1.0
    assert marker.read_text() == "post-1"


VERSIONED_PREDICTOR = """
    import time

    VERSION = {version}


    class Predictor:
        def predict(self, payload):
            time.sleep(0.01)
            return {{"version": VERSION, "echo": payload}}
"""


def test_redeploy_rolls_out_revision_2_without_failing_a_request(daemon: Cirrus, tmp_path: Path) -> None:
    project = write_project(tmp_path / "project", VERSIONED_PREDICTOR.format(version=1), name="model")
    client = daemon.client()
    [result] = client.deploy(project)
    assert result.revision == 1
    [old_pid] = replica_pids(client.get("model"))

    stop = threading.Event()
    seen: list[tuple[float, int, object]] = []  # (start time, status, version or error text)
    lock = threading.Lock()

    def traffic() -> None:
        with httpx.Client(base_url=daemon.gateway_url, timeout=30) as http:
            n = 0
            while not stop.is_set():
                n += 1
                started = time.monotonic()
                try:
                    response = http.post("/model", json=n)
                    outcome: object = response.json().get("version") if response.is_success else response.text
                    record = (started, response.status_code, outcome)
                except httpx.HTTPError as exc:
                    record = (started, 0, repr(exc))
                with lock:
                    seen.append(record)

    workers = [threading.Thread(target=traffic) for _ in range(3)]
    for worker in workers:
        worker.start()
    try:
        time.sleep(0.3)
        (project / "predictor.py").write_text(textwrap.dedent(VERSIONED_PREDICTOR.format(version=2)))
        [result] = client.deploy(project)
        live_at = time.monotonic()
        assert (result.action, result.revision) == ("updated", 2)
        time.sleep(0.5)
    finally:
        stop.set()
        for worker in workers:
            worker.join(timeout=30)

    failures = [record for record in seen if record[1] != 200]
    assert not failures, f"{len(failures)} of {len(seen)} requests failed during the update: {failures[:5]}"
    versions = [version for _, _, version in seen]
    assert 1 in versions and 2 in versions
    after = [version for started, _, version in seen if started > live_at]
    assert after and set(after) == {2}, "a request sent after the update went to the old revision"

    status = daemon.wait_for("model", lambda s: [r.revision for r in s.replicas] == [2])
    assert status.revision == 2 and status.status == ApiStatusName.LIVE
    assert not wait_gone({old_pid}), "the old revision's replica still runs"
    assert pid_alive(status.replicas[0].pid or -1)
