"""A joined gateway on another host: `cirrus gateway --join` inside a network namespace
(`tests/netns_cluster.py`), reaching the daemon's admin API over the bridge (`CIRRUS_ADMIN_HOST` set
to the bridge address) and the replicas at their node's address.

The daemon runs in the root namespace with the Ray runtime on a one-node cluster (its head, on the
bridge address): Ray replicas listen on their node's address, where the other host can reach them
(local replicas listen on 127.0.0.1, which only the daemon's machine reaches). The joined gateway's
host is a bare namespace (no Ray there). Needs root, `ip` and Ray; skipped loudly otherwise.
"""

from __future__ import annotations

import json
import os
import selectors
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import netns_cluster
import pytest
from conftest import Cirrus, write_project
from netns_cluster import NetnsCluster

WHERE = """
    import os


    class Predictor:
        def predict(self, payload):
            return {"echo": payload, "netns": os.readlink("/proc/self/ns/net")}
"""


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NetnsCluster]:
    netns_cluster.require()
    with NetnsCluster(tmp_path_factory.mktemp("gateway-netns")) as made:
        made.start_head(num_cpus=2)  # the daemon's node, where the replicas run
        yield made


@pytest.fixture(scope="module")
def daemon(cluster: NetnsCluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cirrus]:
    env = {k: v for k, v in cluster.env().items() if k.startswith(("RAY_", netns_cluster.MARKER_ENV))}
    cirrus = Cirrus(
        tmp_path_factory.mktemp("gateway-netns-daemon") / "home",
        CIRRUS_RUNTIME="ray",
        CIRRUS_ADMIN_HOST=cluster.head_ip,
        **env,
    )
    cirrus.up()
    try:
        yield cirrus
    finally:
        leftovers = cirrus.shutdown()
        assert not leftovers, leftovers


def _serving_line(process: subprocess.Popen[str], timeout: float = 30.0) -> str:
    assert process.stdout is not None
    selector = selectors.DefaultSelector()
    selector.register(process.stdout, selectors.EVENT_READ)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline and process.poll() is None:
            if selector.select(timeout=0.1):
                return process.stdout.readline()
    finally:
        selector.close()
    return ""


def test_a_gateway_in_another_network_namespace_serves_the_daemons_apis(
    cluster: NetnsCluster, daemon: Cirrus, tmp_path: Path
) -> None:
    admin = daemon.info.admin_url
    assert admin.startswith(f"http://{cluster.head_ip}:"), admin  # the admin API on the bridge address
    project = write_project(tmp_path / "where", WHERE, name="where", compute={"cpu": 0.5})
    code, _, err = daemon.cli("deploy", str(project), "--timeout", "120")
    assert code == 0, err + daemon.daemon_log()[-4000:]
    code, out, err = daemon.cli("keys", "create", "-o", "json")  # the host is not loopback: keys are required
    assert code == 0, err
    key = json.loads(out)["key"]

    host = cluster.add_node(ray=False)
    token_file = tmp_path / "token"
    token_file.write_text((daemon.home / "token").read_text())
    argv = [sys.executable, "-m", "cirrus.cli", "gateway", "--join", admin, "--token-file", str(token_file)]
    process = cluster.run_in(
        host,
        [*argv, "--host", host.ip, "--port", "0"],
        env=cluster.env(CIRRUS_PORT="0"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        line = _serving_line(process)
        assert f" serving http://{host.ip}:" in line, (line, process.poll())
        url = line.rsplit(" serving ", 1)[1].strip()
        assert os.readlink(f"/proc/{process.pid}/ns/net") == host.netns_id  # it runs on the other host

        auth = {"authorization": f"Bearer {key}"}
        there = httpx.post(f"{url}/where", json={"n": 1}, headers=auth, timeout=30)
        here = httpx.post(daemon.url("where"), json={"n": 1}, timeout=30)
        assert there.status_code == here.status_code == 200, there.text
        assert there.json() == here.json()  # the same replica, in the root namespace, answered both
        assert there.json()["netns"] == os.readlink("/proc/self/ns/net")
        assert httpx.post(f"{url}/where", json={}, timeout=30).status_code == 401  # keys apply there too
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            _, log = process.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            _, log = process.communicate()
    assert process.returncode == 0 and "Traceback" not in log, log[-4000:]
