"""Cirrus on a real Ray cluster of network namespaces (`tests/netns_cluster.py`), with the real daemon,
CLI and gateway in the root namespace as the Ray driver.

A realtime API whose two replicas are forced onto two nodes (a custom resource each node has once)
answers through the gateway from both, over TCP to the nodes' addresses, running each node's own
copy of the revision's snapshot (shipped through Ray's object store, never read from the project
directory); `cirrus get` shows where each replica runs; a replica that fits no node says so; and a
node killed under load takes only its in-flight requests with it: its replica is replaced on a
surviving node and the API serves on.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import netns_cluster
import pytest
from conftest import Cirrus, write_project
from netns_cluster import NetnsCluster, NetnsNode
from s3_server import MotoServer, aws_test_credentials

WHERE = """
    import os


    class Predictor:
        def predict(self, payload):
            print(f"answered from {os.readlink('/proc/self/ns/net')}", flush=True)
            return {
                "netns": os.readlink("/proc/self/ns/net"),
                "code": os.path.dirname(os.path.abspath(__file__)),
                "pid": os.getpid(),
            }
"""


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[NetnsCluster, list[NetnsNode], MotoServer]]:
    """Three worker nodes, and an S3 server on the bridge that every node reaches."""
    netns_cluster.require()
    workdir = tmp_path_factory.mktemp("ray-cluster")
    with NetnsCluster(workdir) as made, aws_test_credentials():  # (the nodes inherit the credentials)
        s3 = MotoServer(workdir / "moto", host=made.head_ip)
        s3.start()
        try:
            made.start_head(num_cpus=0)  # the daemon's node: replicas go to the worker nodes
            nodes = [made.add_node(num_cpus=2, resources={"spread": 1}, wait=False) for _ in range(3)]
            gpu_node = made.add_node(num_cpus=2, num_gpus=1, wait=False)  # stands in for a GPU node (no CUDA)
            made.wait_joined(*nodes, gpu_node)
            print(f"cluster timings: {made.timings}")
            yield made, nodes, s3
        finally:
            s3.stop()


@pytest.fixture(scope="module")
def daemon(
    cluster: tuple[NetnsCluster, list[NetnsNode], MotoServer], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Cirrus]:
    made, _, s3 = cluster
    env = {k: v for k, v in made.env().items() if k.startswith(("RAY_", "AWS_", netns_cluster.MARKER_ENV))}
    env["CIRRUS_S3_ENDPOINT_URL"] = s3.endpoint_url
    cirrus = Cirrus(tmp_path_factory.mktemp("ray-daemon") / "home", CIRRUS_RUNTIME="ray", **env)
    started = time.monotonic()
    cirrus.up()
    print(f"daemon up as a Ray driver in {time.monotonic() - started:.1f} s")
    try:
        yield cirrus
    finally:
        leftovers = cirrus.shutdown()
        assert not leftovers, leftovers


def _deployed(cirrus: Cirrus, project: Path) -> None:
    code, _, err = cirrus.cli("deploy", str(project), "--timeout", "120")
    assert code == 0, err + cirrus.daemon_log()[-4000:]


def _get(cirrus: Cirrus, api: str) -> dict[str, Any]:
    code, out, err = cirrus.cli("get", api, "-o", "json")
    assert code == 0, err
    return dict(json.loads(out))


def test_replicas_on_two_nodes_answer_from_their_own_copy_of_the_code(
    daemon: Cirrus, cluster: tuple[NetnsCluster, list[NetnsNode], MotoServer], tmp_path: Path
) -> None:
    _, nodes, _ = cluster
    project = write_project(
        tmp_path / "where",
        WHERE,
        name="where",
        compute={"cpu": 0.5, "accelerators": {"spread": 1}},
        autoscaling={"min_replicas": 2, "max_replicas": 2},
    )
    started = time.monotonic()
    _deployed(daemon, project)
    print(f"2 replicas on 2 nodes ready in {time.monotonic() - started:.1f} s (fresh nodes: agent, snapshot, template)")

    answers = [httpx.post(daemon.url("where"), json={}, timeout=30).json() for _ in range(40)]
    namespaces = Counter(a["netns"] for a in answers)
    assert len(namespaces) == 2, namespaces  # both nodes answered
    assert os.readlink("/proc/self/ns/net") not in namespaces  # neither is the daemon's namespace
    for answer in answers:
        assert not answer["code"].startswith(str(project)) and "/snapshots/" in answer["code"], answer

    status = _get(daemon, "where")
    node_ips = {replica["node"] for replica in status["replicas"]}
    assert len(node_ips) == 2 and node_ips <= {node.ip for node in nodes}, status["replicas"]
    # `cirrus logs` reads each replica's log on its own node.
    code, out, err = daemon.cli("logs", "where", "--lines", "50")
    assert code == 0, err
    logged = {line.split()[-1] for line in out.splitlines() if "answered from" in line}
    assert logged == set(namespaces), out[-2000:]
    code, _, err = daemon.cli("delete", "where")  # its nodes are free again for the next tests
    assert code == 0, err


MODEL = """
    from pathlib import Path


    class Predictor:
        def __init__(self, config, models):
            self.path = models["weights"]

        def predict(self, payload):
            return {"path": self.path, "text": (Path(self.path) / "weights.txt").read_text()}
"""


def test_a_model_from_s3_is_fetched_on_the_replica_s_node(
    daemon: Cirrus, cluster: tuple[NetnsCluster, list[NetnsNode], MotoServer], tmp_path: Path
) -> None:
    _, _, s3 = cluster
    fs = s3.filesystem()
    fs.mkdir("ray-models")
    fs.pipe({"ray-models/w/v1/weights.txt": b"the weights"})
    project = write_project(
        tmp_path / "modelled",
        MODEL,
        name="modelled",
        compute={"accelerators": {"spread": 1}},
        models=[{"name": "weights", "path": "s3://ray-models/w/v1/"}],
    )
    _deployed(daemon, project)
    answer = httpx.post(daemon.url("modelled"), json={}, timeout=30).json()
    assert answer["text"] == "the weights"
    assert "/tmp/cirrus-ray-" in answer["path"] and "/models/" in answer["path"], answer  # the node's own cache
    assert not Path(answer["path"]).is_relative_to(daemon.settings.models_dir)
    code, _, err = daemon.cli("delete", "modelled")
    assert code == 0, err


GPU_SHARE = """
    import os


    class Predictor:
        def predict(self, payload):
            return {"devices": os.environ.get("CUDA_VISIBLE_DEVICES"), "netns": os.readlink("/proc/self/ns/net")}
"""


def test_half_gpu_replicas_pack_two_on_a_gpu_node_and_a_third_waits_saying_why(
    daemon: Cirrus, cluster: tuple[NetnsCluster, list[NetnsNode], MotoServer], tmp_path: Path
) -> None:
    made, _, _ = cluster
    gpu_node = made.nodes[3]
    project = write_project(
        tmp_path / "shared-gpu",
        GPU_SHARE,
        name="shared-gpu",
        compute={"gpu": 0.5},
        autoscaling={"min_replicas": 3, "max_replicas": 3},
    )
    code, _, _ = daemon.cli("deploy", str(project), "--no-wait")
    assert code == 0
    deadline = time.monotonic() + 60
    while True:
        replicas = _get(daemon, "shared-gpu")["replicas"]
        ready = [r for r in replicas if r["state"] == "ready"]
        waiting = [
            r for r in replicas if r["state"] != "ready" and "waiting for a node with room" in (r["reason"] or "")
        ]
        if len(ready) == 2 and len(waiting) == 1:
            break
        assert time.monotonic() < deadline, replicas
        time.sleep(0.5)
    assert {r["node"] for r in ready} == {gpu_node.ip}
    assert all(r["devices"] == {"gpu": "0"} for r in ready), ready
    answers = {tuple(httpx.post(daemon.url("shared-gpu"), json={}, timeout=30).json().values()) for _ in range(20)}
    assert {devices for devices, _ in answers} == {"0"}  # both halves see device 0
    code, _, err = daemon.cli("delete", "shared-gpu")
    assert code == 0, err


def test_a_replica_no_node_can_hold_says_so(daemon: Cirrus, tmp_path: Path) -> None:
    project = write_project(tmp_path / "huge", WHERE, name="huge", compute={"gpu": 4})
    code, _, _ = daemon.cli("deploy", str(project), "--no-wait")
    assert code == 0
    deadline = time.monotonic() + 30
    while True:
        status = _get(daemon, "huge")
        reasons = [r.get("reason") or "" for r in status["replicas"]]
        if any("waiting for a node to be added: no node of the Ray cluster has" in reason for reason in reasons):
            break
        assert time.monotonic() < deadline, status
        time.sleep(0.5)
    assert "GPU 4" in reasons[0]
    code, _, err = daemon.cli("delete", "huge")
    assert code == 0, err


def _replica_processes(nodes: list[NetnsNode]) -> list[str]:
    """The Cirrus replica and template processes running on the nodes."""
    found = []
    for node in nodes:
        for pid in node.pids():
            cmdline = netns_cluster._cmdline(pid)
            if "cirrus.replica" in cmdline:
                found.append(f"{node.name} {pid}: {cmdline}")
    return found


def test_a_daemon_killed_leaves_no_replica_behind_and_a_new_one_serves_again(
    daemon: Cirrus, cluster: tuple[NetnsCluster, list[NetnsNode], MotoServer], tmp_path: Path
) -> None:
    _, nodes, _ = cluster
    project = write_project(tmp_path / "again", WHERE, name="again", compute={"accelerators": {"spread": 1}})
    _deployed(daemon, project)
    assert _replica_processes(nodes)
    os.kill(daemon.info.pid, 9)  # the driver dies: Ray ends the actors it owned, their replicas follow
    deadline = time.monotonic() + 60
    while left := _replica_processes(nodes):
        assert time.monotonic() < deadline, left
        time.sleep(0.5)
    daemon.up()  # restores the API from its state, on the cluster again
    status = daemon.wait_for("again", lambda s: s.status == "live", timeout=60)
    assert status.replicas[0].node in {node.ip for node in nodes}
    assert httpx.post(daemon.url("again"), json={}, timeout=30).status_code == 200
    code, _, err = daemon.cli("delete", "again")
    assert code == 0, err


def test_a_killed_node_takes_only_its_in_flight_requests(
    daemon: Cirrus, cluster: tuple[NetnsCluster, list[NetnsNode], MotoServer], tmp_path: Path
) -> None:
    _, nodes, _ = cluster
    project = write_project(
        tmp_path / "sturdy",
        WHERE,
        name="sturdy",
        compute={"cpu": 0.5, "accelerators": {"spread": 1}},  # two of the three nodes: the third is spare
        autoscaling={"min_replicas": 2, "max_replicas": 2},
    )
    _deployed(daemon, project)
    status = _get(daemon, "sturdy")
    victim_ip = status["replicas"][0]["node"]
    [victim] = [node for node in nodes if node.ip == victim_ip]

    outcomes: list[tuple[float, int]] = []
    stop = threading.Event()

    def load() -> None:
        with httpx.Client(timeout=30) as http:
            while not stop.is_set():
                try:
                    status_code = http.post(daemon.url("sturdy"), json={}).status_code
                except httpx.HTTPError:
                    status_code = 0
                outcomes.append((time.monotonic(), status_code))

    workers = [threading.Thread(target=load, daemon=True) for _ in range(4)]
    for worker in workers:
        worker.start()
    time.sleep(1.0)
    killed_at = time.monotonic()
    victim.kill()
    deadline = time.monotonic() + 90
    while True:
        replicas = _get(daemon, "sturdy")["replicas"]
        ready = [r for r in replicas if r["state"] == "ready" and r["node"] not in (None, victim_ip)]
        if len(ready) == 2:
            break
        assert time.monotonic() < deadline, replicas
        time.sleep(0.5)
    replaced_s = time.monotonic() - killed_at
    time.sleep(1.0)
    stop.set()
    for worker in workers:
        worker.join(timeout=30)

    failed = [status_code for _, status_code in outcomes if status_code != 200]
    after = [status_code for at, status_code in outcomes if at > killed_at + replaced_s]
    print(f"node killed: replaced in {replaced_s:.1f} s; {len(outcomes)} requests, failed: {Counter(failed)}")
    assert len(failed) <= len(workers), Counter(failed)  # at most the requests in flight on the dead node
    assert after and set(after) == {200}
