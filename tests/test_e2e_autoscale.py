"""Autoscaling through the real daemon: scale from zero (requests held, not dropped), scale up
under load, scale down by draining (no request fails), and back to zero when idle."""

from __future__ import annotations

import threading
import time
from collections import Counter
from pathlib import Path

import httpx
from conftest import Cirrus, replica_pids, wait_gone, write_project

from cirrus.types import ApiStatusName, ReplicaState

SLOW_PREDICTOR = """
import os, time


class Predictor:
    def __init__(self, config):
        self.hold_s = config.get("hold_s", 0.2)

    def predict(self, payload):
        time.sleep(self.hold_s)
        return {"pid": os.getpid()}
"""

FAST = {
    "window_s": 2,
    "panic_window_s": 1,
    "downscale_stabilization_s": 1,
    "scale_to_zero_after_s": 2,
}


def test_scale_from_zero_holds_the_request_then_returns_to_zero(daemon: Cirrus, tmp_path: Path) -> None:
    project = write_project(
        tmp_path / "project",
        SLOW_PREDICTOR,
        name="lazy",
        predictor={"config": {"hold_s": 0.0}},
        autoscaling={"min_replicas": 0, "max_replicas": 2, **FAST},
    )
    client = daemon.client()
    client.deploy(project)
    status = client.get("lazy")
    assert (status.status, status.replicas_desired, status.replicas) == (ApiStatusName.LIVE, 0, [])
    assert status.message is not None and "scaled to zero" in status.message

    started = time.monotonic()
    response = client.predict("lazy", {})
    cold = time.monotonic() - started
    assert response.status_code == 200, response.text
    status = client.get("lazy")
    assert status.cold_starts == 1
    assert status.last_cold_start_s is not None and 0 < status.last_cold_start_s <= cold
    [pid] = replica_pids(status)

    # Idle for scale_to_zero_after_s: back to zero, and the replica process is gone.
    status = daemon.wait_for("lazy", lambda s: s.replicas_desired == 0 and not s.replicas, timeout=20)
    assert wait_gone({pid}) == {}
    assert client.predict("lazy", {}).status_code == 200  # and from zero once more
    assert client.get("lazy").cold_starts == 2


def test_load_scales_up_then_down_without_failing_a_request(daemon: Cirrus, tmp_path: Path) -> None:
    project = write_project(
        tmp_path / "project",
        SLOW_PREDICTOR,
        name="elastic",
        predictor={"config": {"hold_s": 0.1}},
        concurrency={"max_concurrency": 4, "inference_slots": 1, "max_queue_length": 256, "timeout_s": 20},
        autoscaling={"min_replicas": 1, "max_replicas": 4, "target_concurrency": 1, **FAST},
    )
    client = daemon.client()
    client.deploy(project)
    url = daemon.url("elastic")
    statuses: Counter[int] = Counter()
    pids: set[int] = set()
    stop = threading.Event()
    clients = [6]  # concurrent loops while loaded; one keeps going while it scales down

    def loop(index: int) -> None:
        with httpx.Client(timeout=30) as http:
            while not stop.is_set() and (index < clients[0]):
                response = http.post(url, json={})
                statuses[response.status_code] += 1
                if response.status_code == 200:
                    pids.add(response.json()["pid"])

    threads = [threading.Thread(target=loop, args=(i,)) for i in range(6)]
    for thread in threads:
        thread.start()
    try:
        loaded = daemon.wait_for("elastic", lambda s: s.replicas_ready >= 3, timeout=30)
        assert loaded.replicas_desired >= 3
        time.sleep(1.0)
        clients[0] = 1  # load drops to one client: the autoscaler drains the extra replicas
        quiet = daemon.wait_for(
            "elastic",
            lambda s: s.replicas_desired == 1 and len([r for r in s.replicas if r.state is ReplicaState.READY]) == 1,
            timeout=30,
        )
        assert len(quiet.replicas) >= 1
        time.sleep(1.0)
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=30)
    assert set(statuses) == {200}, statuses  # no request failed, scaling up or down
    assert len(pids) >= 3  # the load really was spread over the added replicas
    log = daemon.daemon_log()
    assert "elastic: 1 ->" in log and "-> 1 replicas" in log
