"""The namespace cluster of tests/netns_cluster.py: a Ray head in the root namespace and worker nodes in
network namespaces on one machine, each reached over a bridge as a separate host would be.

Run with `-s` to see how long each step took (head start, node join, death detection).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import netns_cluster as netns_cluster_module
import pytest
from netns_cluster import (
    NetnsCluster,
    netns_cluster_fixture,  # noqa: F401 (the `netns_cluster` fixture)
    pid_alive,
)

DEATH_BOUND_S = 20.0  # a killed or cut-off node is declared dead within this (HealthCheck(): ~3-6 s)


def _say(message: str) -> None:
    print(f"\n[netns-cluster] {message}", flush=True)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NetnsCluster]:
    """A head (1 CPU) and two nodes joining together: node1 with {"node-a": 1}, node2 a stand-in GPU
    node (1 GPU, no device) with {"node-b": 1}. Its teardown proves that close() left nothing."""
    netns_cluster_module.require()
    cluster = NetnsCluster(tmp_path_factory.mktemp("netns-cluster"))
    try:
        cluster.start_head(num_cpus=1)
        _say(f"head on {cluster.address} started in {cluster.timings['head_start_s']:.1f} s")
        a = cluster.add_node(num_cpus=1, resources={"node-a": 1}, wait=False)
        b = cluster.add_node(num_cpus=1, num_gpus=1, resources={"node-b": 1}, wait=False)
        cluster.wait_joined(a, b)
        for node in (a, b):
            _say(
                f"{node.name} ({node.ip}, {node.netns}): ray start done in "
                f"{cluster.timings[f'{node.name}_start_s']:.1f} s, listed alive after "
                f"{cluster.timings[f'{node.name}_join_s']:.1f} s (two nodes joining at once)"
            )
        yield cluster
    finally:
        _close_and_check(cluster)


def _close_and_check(cluster: NetnsCluster) -> None:
    """close(), then check with our own eyes (not only `leftovers()`) that nothing is left."""
    pids = set(cluster.pids())
    assert cluster.head is not None and set(cluster.head.pids()) <= pids
    assert all(set(node.pids()) <= pids for node in cluster.nodes)
    started = time.monotonic()
    left = cluster.close()
    _say(f"close: {len(pids)} processes stopped, network removed in {time.monotonic() - started:.1f} s")
    alive = sorted(pid for pid in pids if pid_alive(pid))
    unreaped = sorted(pid for pid in pids if Path(f"/proc/{pid}").exists())  # zombies included
    namespaces = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True, check=True).stdout
    assert not left, left
    assert not alive, f"processes outlived close(): {alive}"
    assert not unreaped, f"processes left unreaped by close(): {unreaped}"
    assert cluster.token not in namespaces, namespaces
    assert cluster.token not in links, links
    assert cluster.bridge not in links
    assert not Path(cluster._temp_root).exists()


WHERE = """
import json, os, sys
import ray

ray.init(logging_level="ERROR")

@ray.remote(num_cpus=0)
class Where:
    def where(self):
        return {
            "netns": os.readlink("/proc/self/ns/net"),
            "ip": ray.util.get_node_ip_address(),
            "node_id": ray.get_runtime_context().get_node_id(),
            "pid": os.getpid(),
            "cuda": os.environ.get("CUDA_VISIBLE_DEVICES"),
        }

actors = {
    "a": Where.options(resources={"node-a": 1}).remote(),
    "b": Where.options(resources={"node-b": 1}).remote(),
    "gpu1": Where.options(num_gpus=0.5).remote(),
    "gpu2": Where.options(num_gpus=0.5).remote(),
}
print(json.dumps({name: ray.get(actor.where.remote()) for name, actor in actors.items()}))
"""


def test_actors_pinned_by_resources_land_in_their_namespaces(cluster: NetnsCluster) -> None:
    a, b = cluster.nodes[:2]
    started = time.monotonic()
    seen = json.loads(cluster.run_driver(WHERE).stdout.splitlines()[-1])
    _say(f"driver with 4 actors on 2 nodes: {time.monotonic() - started:.1f} s (Python start and imports included)")

    assert seen["a"]["netns"] == a.netns_id
    assert seen["b"]["netns"] == b.netns_id
    assert seen["a"]["netns"] != seen["b"]["netns"] != os.readlink("/proc/self/ns/net")
    assert (seen["a"]["ip"], seen["a"]["node_id"]) == (a.ip, a.node_id)
    assert (seen["b"]["ip"], seen["b"]["node_id"]) == (b.ip, b.node_id)
    # The stand-in GPU node takes both half-GPU actors, which share device 0.
    for name in ("gpu1", "gpu2"):
        assert seen[name]["node_id"] == b.node_id
        assert seen[name]["cuda"] == "0"


ACROSS = """
import json, socket, sys, threading
import ray

ray.init(logging_level="ERROR")
root_host, root_port = sys.argv[1], int(sys.argv[2])

def exchange(host, port, message):
    with socket.create_connection((host, port), timeout=10) as sock:
        sock.sendall(message.encode())
        sock.shutdown(socket.SHUT_WR)
        return b"".join(iter(lambda: sock.recv(4096), b"")).decode()

@ray.remote(num_cpus=0)
class Replica:
    def serve(self):
        # A TCP server on this node's address that answers "echo <what it got>" to each connection.
        server = socket.create_server((ray.util.get_node_ip_address(), 0))
        def loop():
            while True:
                conn, _ = server.accept()
                with conn:
                    conn.sendall(b"echo " + b"".join(iter(lambda: conn.recv(4096), b"")))
        threading.Thread(target=loop, daemon=True).start()
        return server.getsockname()[:2]

    def call(self, host, port, message):
        return exchange(host, port, message)

a = Replica.options(resources={"node-a": 1}).remote()
b = Replica.options(resources={"node-b": 1}).remote()
a_host, a_port = ray.get(a.serve.remote())
print(json.dumps({
    "a_to_root": ray.get(a.call.remote(root_host, root_port, "from a")),
    "root_to_a": exchange(a_host, a_port, "from the driver"),
    "b_to_a": ray.get(b.call.remote(a_host, a_port, "from b")),
    "a_server": [a_host, a_port],
}))
"""


def test_tcp_between_the_root_namespace_and_nodes_both_ways(cluster: NetnsCluster) -> None:
    """What a gateway in the root namespace and replicas on the nodes need: a node reaches a server on
    the bridge address, the root namespace (and another node) reaches a server a node opens."""
    a = cluster.nodes[0]
    server = socket.create_server((cluster.head_ip, 0))
    peers: list[str] = []

    def answer() -> None:
        conn, peer = server.accept()
        with conn:
            peers.append(peer[0])
            conn.sendall(b"root got " + b"".join(iter(lambda: conn.recv(4096), b"")))

    thread = threading.Thread(target=answer, daemon=True)
    thread.start()
    try:
        started = time.monotonic()
        out = cluster.run_driver(ACROSS, cluster.head_ip, str(server.getsockname()[1])).stdout
        _say(f"TCP both ways across namespaces: {time.monotonic() - started:.1f} s (driver included)")
    finally:
        server.close()
        thread.join(5)
    seen = json.loads(out.splitlines()[-1])
    assert seen["a_to_root"] == "root got from a"
    assert peers == [a.ip]  # it came from node a's own address, over the bridge
    assert seen["a_server"][0] == a.ip
    assert seen["root_to_a"] == "echo from the driver"
    assert seen["b_to_a"] == "echo from b"


def test_a_killed_node_is_reported_dead(cluster: NetnsCluster) -> None:
    node = cluster.add_node(num_cpus=1, resources={"node-c": 1})
    _say(f"{node.name} joined alone in {cluster.timings[f'{node.name}_join_s']:.1f} s")
    bystander = cluster.run_in(node, ["sleep", "300"])  # not Ray: kill() takes every process there
    before = node.pids()
    assert bystander.pid in before and len(before) >= 4  # ray start, raylet, its agents, sleep

    killed = node.kill()
    assert set(before) <= set(killed)
    assert node.pids() == []
    assert bystander.wait(5) == -9
    seconds = cluster.wait_dead(node, timeout=DEATH_BOUND_S + 10)
    _say(f"{node.name} SIGKILLed ({len(killed)} processes): Ray reported it dead after {seconds:.1f} s")
    assert seconds < DEATH_BOUND_S

    alive = {n["ip"] for n in cluster.ray_nodes() if n["alive"]}
    assert alive == {cluster.head_ip, cluster.nodes[0].ip, cluster.nodes[1].ip}


def _reachable(host: str, timeout: float = 1.0) -> bool:
    """Whether `host` answers at all: a refused connection (nothing listens on port 9) counts."""
    try:
        with socket.create_connection((host, 9), timeout=timeout):
            return True
    except ConnectionRefusedError:
        return True
    except OSError:  # a timeout, or no route once ARP gives up
        return False


def test_a_partitioned_node_is_reported_dead(cluster: NetnsCluster) -> None:
    node = cluster.add_node(num_cpus=1, resources={"node-d": 1})
    _say(f"{node.name} joined alone in {cluster.timings[f'{node.name}_join_s']:.1f} s")
    assert _reachable(node.ip)

    node.partition()
    assert not _reachable(node.ip)
    assert node.pids()  # its processes run on, cut off
    seconds = cluster.wait_dead(node, timeout=DEATH_BOUND_S + 10)
    _say(f"{node.name} cut off (veth down): Ray reported it dead after {seconds:.1f} s")
    assert seconds < DEATH_BOUND_S

    node.heal()
    healed = time.monotonic()
    deadline = healed + 10
    while not _reachable(node.ip) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _reachable(node.ip)
    # Back on the network, the raylet learns that it was declared dead and exits; `ray start --block`
    # then stops the rest: Ray never takes a dead node back (a new node has to join instead).
    while node.pids() and time.monotonic() < healed + 20:
        time.sleep(0.1)
    assert node.pids() == []
    _say(f"{node.name} healed: its Ray processes exited by themselves {time.monotonic() - healed:.1f} s later")


SERVE_ONCE = """
import socket, sys
server = socket.create_server((sys.argv[1], 8000))  # a namespace has ports of its own
print("ready", flush=True)
conn, peer = server.accept()
conn.sendall(f"hello {peer[0]}".encode())
conn.close()
"""


def test_bare_hosts_reach_each_other_and_nothing_else(netns_cluster: NetnsCluster) -> None:
    """Namespaces without Ray (`ray=False`): one host reaches another over the bridge; none has a
    route beyond the cluster's /24."""
    h1, h2 = netns_cluster.add_node(ray=False), netns_cluster.add_node(ray=False)
    server = netns_cluster.run_in(h1, [sys.executable, "-c", SERVE_ONCE, h1.ip], stdout=subprocess.PIPE, text=True)
    assert server.stdout is not None and server.stdout.readline() == "ready\n"
    client = "import socket, sys; print(socket.create_connection((sys.argv[1], 8000), timeout=5).recv(100).decode())"
    assert netns_cluster.run_driver(client, h1.ip, node=h2, timeout=10).stdout == f"hello {h2.ip}\n"
    assert server.wait(5) == 0
    for host in (h1, h2):
        routes = netns_cluster_module.ip("-n", host.netns, "-4", "route").splitlines()
        assert [route.split()[0] for route in routes] == [str(netns_cluster.subnet)]  # no default route


def test_close_removes_everything_even_when_the_test_fails(tmp_path: Path) -> None:
    """Without Ray: bare namespaces, a process in each and in the root namespace (one that ignores
    SIGTERM, one with a child of its own); an exception inside the `with` still removes it all."""
    netns_cluster_module.require()
    pids: list[int] = []
    with pytest.raises(RuntimeError, match="the test failed"), NetnsCluster(tmp_path) as cluster:
        hosts = [cluster.add_node(ray=False), cluster.add_node(ray=False)]
        assert [host.ip for host in hosts] == [str(cluster.subnet.network_address + n) for n in (2, 3)]
        for host in hosts:
            cluster.run_in(host, ["sleep", "300"])
        stubborn = cluster.run_in(None, ["sh", "-c", "trap '' TERM; sleep 300 & wait"])
        deadline = time.monotonic() + 5
        while len(cluster.pids()) < 4 and time.monotonic() < deadline:
            time.sleep(0.02)
        pids = cluster.pids()
        assert stubborn.pid in pids and len(pids) == 4  # sleep in each namespace, sh and its sleep
        raise RuntimeError("the test failed")
    assert not any(pid_alive(pid) for pid in pids)
    assert cluster.leftovers() == []
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True, check=True).stdout
    assert cluster.token not in links
    assert cluster.token not in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout


def test_a_second_cluster_moves_off_a_subnet_taken_at_the_same_moment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two clusters (two people's test runs) that both saw the same /24 free: the later one moves."""
    netns_cluster_module.require()
    with NetnsCluster(tmp_path / "first") as first:
        picks = iter([first.subnet])
        real_pick = NetnsCluster._pick_subnet
        monkeypatch.setattr(NetnsCluster, "_pick_subnet", staticmethod(lambda: next(picks, None) or real_pick()))
        with NetnsCluster(tmp_path / "second") as second:
            assert second.subnet != first.subnet
            assert second.head_ip not in netns_cluster_module.ip("-4", "-o", "addr", "show", "dev", first.bridge)
