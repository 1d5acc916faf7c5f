"""Machines follow the load: Cirrus on a Ray cluster whose autoscaler adds and removes nodes.

The cluster is Ray's own fake multi-node provider (`type: fake_multinode`, what
`ray.cluster_utils.AutoscalingCluster` starts): a head with no GPU, and a worker node type with one
GPU (no device needed: Ray is told so) that the autoscaler launches, as raylets on this machine,
when demand needs one, and ends once idle. The real daemon, CLI and gateway drive it as in
tests/test_e2e_ray.py. An API with `compute: {gpu: 1}` scaled from 0 to 2 replicas waits for nodes
(`cirrus get` says so), gets two new GPU nodes, one replica each, serving; scaled back to zero, the
nodes go.

`AutoscalingCluster` itself is not used: its `start()` and `shutdown()` run `ray stop --force`,
which kills every Ray process on the machine (other tests' clusters too), and it reads a
`fake_multi_node/example.yaml` the Ray 2.60 wheel does not ship. The head is started here the way it
starts it (`ray start --head --autoscaling-config=...` with RAY_FAKE_CLUSTER=1), on ports of its own,
and stopped by what it started: its session and a marker in every process's environment.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

import backends
import httpx
import pytest
from conftest import Cirrus, write_project
from netns_cluster import RAY_START, RayPorts, _cmdline, _kill_until_gone, pid_alive, session_pids

MARKER_ENV = "CIRRUS_RAY_AUTOSCALING_CLUSTER"
GPU_NODE_TYPE = "gpu-worker"
IDLE_TIMEOUT_MIN = 0.05  # a node idle for 3 s is ended (the autoscaler looks every second)
NODES_GONE_WITHIN_S = 60.0
OBJECT_STORE_BYTES = 100_000_000  # per node

# What the predictor answers: which fake node it runs on. The fake provider starts each node's
# raylet with RAY_CLOUD_INSTANCE_ID set to that node's id, and the replica inherits it (its address,
# the `node` of `cirrus get`, is this machine's for every node).
WHICH_NODE = """
    import os


    class Predictor:
        def predict(self, payload):
            return {"node": os.environ.get("RAY_CLOUD_INSTANCE_ID"), "gpus": os.environ.get("CUDA_VISIBLE_DEVICES")}
"""

# A driver that prints the cluster's alive GPU nodes (id -> GPUs free) whenever they change, with
# the time (CLOCK_MONOTONIC, the same clock as the test's).
WATCH_GPU_NODES = """
import json, sys, time
import ray
from ray._private.state import available_resources_per_node

ray.init(address=sys.argv[1], log_to_driver=False, logging_level="ERROR")
last = None
while True:
    free = available_resources_per_node()
    nodes = {
        node["NodeID"]: free.get(node["NodeID"], {}).get("GPU", 0.0)
        for node in ray.nodes()
        if node["Alive"] and node["Resources"].get("GPU")
    }
    if nodes != last:
        print(json.dumps({"at": time.monotonic(), "gpu_nodes": nodes}), flush=True)
        last = nodes
    time.sleep(0.2)
"""


def _cluster_config(gcs_address: str) -> dict[str, Any]:
    """The cluster config of the fake provider (what `AutoscalingCluster` builds from example.yaml):
    a head with no worker, and up to two one-GPU nodes the autoscaler adds and removes."""
    return {
        "cluster_name": "cirrus-autoscaling",
        "max_workers": 2,
        "provider": {
            "type": "fake_multinode",
            "use_node_id_as_ip": True,  # the nodes share this machine's address: told apart by id
            "disable_node_updaters": True,  # a node is up once its raylet is: nothing to install
            "disable_launch_config_check": True,
            "gcs_address": gcs_address,  # else the nodes look for the head's GCS at port 6379
        },
        "available_node_types": {
            "ray.head.default": {"resources": {"CPU": 1}, "node_config": {}, "max_workers": 0},
            GPU_NODE_TYPE: {
                "resources": {"CPU": 1, "GPU": 1, "object_store_memory": OBJECT_STORE_BYTES},  # (else 30% of RAM)
                "node_config": {},
                "min_workers": 0,
                "max_workers": 2,
            },
        },
        "head_node_type": "ray.head.default",
        "upscaling_speed": 1.0,
        "idle_timeout_minutes": IDLE_TIMEOUT_MIN,
        # The keys the autoscaler's config schema wants, empty: the nodes are processes here.
        "auth": {},
        "docker": {},
        "file_mounts": {},
        "cluster_synced_files": [],
        "file_mounts_sync_continuously": False,
        "rsync_exclude": [],
        "rsync_filter": [],
        "initialization_commands": [],
        "setup_commands": [],
        "head_setup_commands": [],
        "worker_setup_commands": [],
        "head_start_ray_commands": [],
        "worker_start_ray_commands": [],
    }


class FakeAutoscalingCluster:
    """A Ray head whose autoscaler (Ray's fake multi-node provider) starts worker nodes as local
    raylets. Every process of it is in the session of its `ray start --block` (the worker nodes are
    started by the head's autoscaler monitor) and carries `MARKER_ENV=<its temp dir>`."""

    def __init__(self) -> None:
        # Short: Ray's socket paths under it must fit AF_UNIX's 108 bytes.
        self.temp_dir = Path(tempfile.mkdtemp(prefix="cirrus-ras-"))
        self.ports = RayPorts.pick()
        self.address = f"127.0.0.1:{self.ports.gcs}"
        self.log_path = self.temp_dir / "head.log"
        self._head: subprocess.Popen[bytes] | None = None
        self._watcher: subprocess.Popen[str] | None = None
        self._log: IO[bytes] | None = None
        self.changes: list[tuple[float, dict[str, float]]] = []  # (when, alive GPU node id -> GPUs free)

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        env.update(
            {
                MARKER_ENV: str(self.temp_dir),
                "RAY_FAKE_CLUSTER": "1",  # the fake provider refuses to run without it
                # Else `ray start --head` turns token authentication on whenever a ~/.ray/auth_token
                # exists (any local `ray.init()` of Ray 2.60 writes one), and drivers without it fail.
                "RAY_AUTH_MODE": "disabled",
                "AUTOSCALER_UPDATE_INTERVAL_S": "1",  # (5 s by default)
                "RAY_USAGE_STATS_ENABLED": "0",
                "PYTHONUNBUFFERED": "1",
                **self.ports.env(),
            }
        )
        return env

    def start(self, timeout: float = 60.0) -> float:
        """`ray start --head` with the autoscaling config; seconds until it runs."""
        config = self.temp_dir / "autoscaling.json"
        config.write_text(json.dumps(_cluster_config(self.address)))
        self._log = self.log_path.open("ab")
        started = time.monotonic()
        self._head = subprocess.Popen(
            [
                *RAY_START,
                "--head",
                "--node-ip-address=127.0.0.1",
                f"--temp-dir={self.temp_dir}",
                "--include-dashboard=false",
                *self.ports.args(head=True),
                "--num-cpus=1",
                "--num-gpus=0",
                f"--object-store-memory={OBJECT_STORE_BYTES}",
                f"--autoscaling-config={config}",
            ],
            env=self.env(),
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        while b"Ray runtime started" not in self.log_path.read_bytes():
            if self._head.poll() is not None or time.monotonic() - started > timeout:
                raise RuntimeError(f"the Ray head did not start:\n{self.log_tail()}")
            time.sleep(0.1)
        return time.monotonic() - started

    def watch(self) -> None:
        """Follow the alive GPU nodes from now on (into `changes`), with a driver of the cluster."""
        self._watcher = subprocess.Popen(
            [sys.executable, "-c", WATCH_GPU_NODES, self.address],
            env=self.env(),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            start_new_session=True,
        )
        stdout = self._watcher.stdout
        assert stdout is not None

        def follow() -> None:
            for line in stdout:
                change = json.loads(line)
                self.changes.append((change["at"], change["gpu_nodes"]))

        threading.Thread(target=follow, daemon=True).start()

    def gpu_nodes(self) -> dict[str, float]:
        """The alive GPU nodes as last seen (id -> GPUs free)."""
        return self.changes[-1][1] if self.changes else {}

    def wait_gpu_nodes(self, check: Callable[[dict[str, float]], bool], since: float, timeout: float) -> float:
        """Wait until the alive GPU nodes satisfy `check`; when (time.monotonic()) they first did at
        or after `since` (as seen by the watcher, which polls 5 times a second)."""
        deadline = time.monotonic() + timeout
        while True:
            for at, nodes in list(self.changes):
                if at >= since and check(nodes):
                    return at
            if time.monotonic() >= deadline:
                raise AssertionError(f"GPU nodes not as expected after {timeout:.0f} s: {self.changes}")
            time.sleep(0.2)

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return "(no log)"

    def monitor_log_tail(self, chars: int = 4000) -> str:
        """The autoscaler's own log, for failures."""
        try:
            return (self.temp_dir / "session_latest" / "logs" / "monitor.log").read_text(errors="replace")[-chars:]
        except OSError:
            return "(no monitor log)"

    def marked_pids(self) -> list[int]:
        token = f"{MARKER_ENV}={self.temp_dir}".encode()
        found = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) == os.getpid():
                continue
            with contextlib.suppress(OSError):
                if token in (entry / "environ").read_bytes().split(b"\0") and pid_alive(int(entry.name)):
                    found.append(int(entry.name))
        return found

    def pids(self) -> list[int]:
        """Every live process of the cluster (the head's session, the watcher's, the marked)."""
        found = set(self.marked_pids())
        for process in (self._head, self._watcher):
            if process is not None:
                found.update(session_pids(process))
        return sorted(found)

    def close(self) -> list[str]:
        """SIGKILL every process of the cluster (never `ray stop`, which kills every Ray of the
        machine), reap them, delete the temporary directory; what is left (nothing, normally)."""
        _kill_until_gone(self.pids, "the fake autoscaling cluster")
        for process in (self._head, self._watcher):
            if process is not None:
                process.wait(10)
                if process.stdout is not None:
                    process.stdout.close()
        if self._log is not None:
            self._log.close()
        shutil.rmtree(self.temp_dir, ignore_errors=True)
        left = [f"process {pid}: {_cmdline(pid)}" for pid in self.pids()]
        if self.temp_dir.exists():
            left.append(f"directory {self.temp_dir}")
        return left


@pytest.fixture
def cluster() -> Iterator[FakeAutoscalingCluster]:
    backends.module("ray")  # skipped (backend "ray") where Ray is not installed
    made = FakeAutoscalingCluster()
    try:
        print(f"autoscaling Ray head up in {made.start():.1f} s at {made.address}")
        made.watch()
        yield made
    finally:
        left = made.close()
        assert not left, left


@pytest.fixture
def daemon(cluster: FakeAutoscalingCluster, tmp_path: Path) -> Iterator[Cirrus]:
    cirrus = Cirrus(
        tmp_path / "home",
        CIRRUS_RUNTIME="ray",
        RAY_ADDRESS=cluster.address,
        RAY_AUTH_MODE="disabled",
        CIRRUS_RAY_AGENT_IDLE_S="1",  # an idle node's agent ends soon, so the node can go
    )
    cirrus.up()
    try:
        yield cirrus
    finally:
        leftovers = cirrus.shutdown()
        assert not leftovers, leftovers


def _get(cirrus: Cirrus, api: str) -> dict[str, Any]:
    code, out, err = cirrus.cli("get", api, "-o", "json")
    assert code == 0, err
    return dict(json.loads(out))


def _all_ready(cirrus: Cirrus, api: str, count: int) -> list[dict[str, Any]]:
    """The API's replicas once there are `count`, all ready ([] until then)."""
    replicas: list[dict[str, Any]] = _get(cirrus, api)["replicas"]
    return replicas if len(replicas) == count and all(r["state"] == "ready" for r in replicas) else []


def _poll(what: str, check: Callable[[], Any], timeout: float, explain: Callable[[], str]) -> Any:
    deadline = time.monotonic() + timeout
    while not (result := check()):
        if time.monotonic() >= deadline:
            raise AssertionError(f"{what}: not within {timeout:.0f} s\n{explain()}")
        time.sleep(0.3)
    return result


def test_gpu_nodes_are_added_for_replicas_and_removed_at_zero(
    daemon: Cirrus, cluster: FakeAutoscalingCluster, tmp_path: Path
) -> None:
    assert cluster.gpu_nodes() == {}  # the head has no GPU, and no worker runs yet
    project = tmp_path / "project"
    scaled_up = {"min_replicas": 2, "max_replicas": 2}
    write_project(project, WHICH_NODE, name="gpu", compute={"gpu": 1}, autoscaling=scaled_up)
    explain = functools.partial(_explain, daemon, cluster)

    deployed = time.monotonic()
    code, _, err = daemon.cli("deploy", str(project), "--no-wait")
    assert code == 0, err
    # Before any GPU node is up, `cirrus get` says why the replicas wait.
    reasons = _poll(
        "a replica waiting for a node",
        lambda: [r["reason"] for r in _get(daemon, "gpu")["replicas"] if "waiting for a node" in (r["reason"] or "")],
        timeout=30,
        explain=explain,
    )
    seen_waiting = time.monotonic()
    assert "autoscaler" in reasons[0], reasons

    first_node = cluster.wait_gpu_nodes(lambda nodes: len(nodes) >= 1, since=deployed, timeout=60)
    both_nodes = cluster.wait_gpu_nodes(lambda nodes: len(nodes) == 2, since=deployed, timeout=60)
    ready = _poll("2 replicas ready", lambda: _all_ready(daemon, "gpu", 2), timeout=60, explain=explain)
    serving = time.monotonic()
    assert all(replica["node"] for replica in ready), ready

    # One replica on each new node: both nodes' GPUs are taken, and the two answer from two nodes.
    cluster.wait_gpu_nodes(lambda nodes: len(nodes) == 2 and set(nodes.values()) == {0.0}, since=deployed, timeout=10)
    answers = [httpx.post(daemon.url("gpu"), json={}, timeout=30).json() for _ in range(20)]
    assert {answer["node"] for answer in answers} == set(cluster.gpu_nodes()), (answers, cluster.changes)
    assert {answer["gpus"] for answer in answers} == {"0"}  # each node's one GPU

    # Back to zero: the replicas stop, and the idle GPU nodes are ended.
    scaled_down = {"min_replicas": 0, "max_replicas": 2, "scale_to_zero_after_s": 1, "window_s": 2, "panic_window_s": 1}
    write_project(project, WHICH_NODE, name="gpu", compute={"gpu": 1}, autoscaling=scaled_down)
    code, out, err = daemon.cli("deploy", str(project), "--no-wait")
    assert code == 0, err
    assert "scaled" in out, out  # the same revision: only the scale changed
    _poll("zero replicas", lambda: not _get(daemon, "gpu")["replicas"], timeout=30, explain=explain)
    at_zero = time.monotonic()
    gone = cluster.wait_gpu_nodes(lambda nodes: not nodes, since=both_nodes, timeout=NODES_GONE_WITHIN_S)

    print(
        f"deploy -> replica waiting for a node {seen_waiting - deployed:.1f} s, first GPU node added "
        f"{first_node - deployed:.1f} s, both {both_nodes - deployed:.1f} s, 2 replicas serving "
        f"{serving - deployed:.1f} s; at zero -> GPU nodes gone {gone - at_zero:.1f} s "
        f"(idle timeout {IDLE_TIMEOUT_MIN * 60:g} s)"
    )


def _explain(daemon: Cirrus, cluster: FakeAutoscalingCluster) -> str:
    _, out, err = daemon.cli("get", "gpu", "-o", "json")
    return (
        f"cirrus get: {out or err}\nGPU nodes seen: {cluster.changes}\n"
        f"--- daemon.log ---\n{daemon.daemon_log()[-3000:]}\n--- autoscaler (monitor.log) ---\n"
        f"{cluster.monitor_log_tail()}"
    )
