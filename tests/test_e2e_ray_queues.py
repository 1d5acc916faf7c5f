"""Async APIs and batch jobs on a real Ray cluster of network namespaces (`tests/netns_cluster.py`),
with the real daemon, CLI and gateway in the root namespace as the Ray driver and a Redis queue
store on the cluster's bridge, which every node reaches.

A thousand async requests are all answered once although the node of one of their two replicas is
killed while they are worked (its leases expire and go to the other replica); a batch job's two
workers on two nodes write every item once to the job's sink (a directory every node sees; an S3
sink is expected to fail: it ignores CIRRUS_S3_ENDPOINT_URL); and a daemon on the default SQLite
store, which replicas on other nodes cannot reach, refuses async and batch APIs with an error that
says Redis is needed.
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

ECHO_ID = """
    import os
    import random
    import time


    class Predictor:
        def predict(self, payload):
            time.sleep(random.uniform(0.02, 0.05))
            return {"n": payload["n"], "netns": os.readlink("/proc/self/ns/net")}
"""

CRUNCH = """
    import os
    import time


    class Predictor:
        def predict_batch(self, payloads):
            time.sleep(0.25)
            return [{"double": 2 * item, "netns": os.readlink("/proc/self/ns/net")} for item in payloads]
"""

REQUESTS = 1000
ITEMS = 200
SINK_BUCKET = "ray-sink"

Cluster = tuple[NetnsCluster, list[NetnsNode], MotoServer]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """Three worker nodes (two replicas spread over two of them, the third has room for a
    replacement), and an S3 server on the bridge that every node reaches."""
    netns_cluster.require()
    workdir = tmp_path_factory.mktemp("ray-cluster")
    with NetnsCluster(workdir) as made, aws_test_credentials():  # (the nodes inherit the credentials)
        s3 = MotoServer(workdir / "moto", host=made.head_ip)
        s3.start()
        try:
            made.start_head(num_cpus=0)  # the daemon's node: replicas go to the worker nodes
            nodes = [made.add_node(num_cpus=2, resources={"spread": 1}, wait=False) for _ in range(3)]
            made.wait_joined(*nodes)
            print(f"cluster timings: {made.timings}")
            yield made, nodes, s3
        finally:
            s3.stop()


@pytest.fixture(scope="module")
def redis_store(cluster: Cluster) -> Iterator[str]:
    """A Redis server on the bridge: the daemon and every node reach it. Its URL."""
    from redis_server import RedisServer

    made, _, _ = cluster
    server = RedisServer(made.workdir / "redis", host=made.head_ip)
    server.start()
    try:
        yield server.url
    finally:
        server.stop()


def _ray_env(made: NetnsCluster) -> dict[str, str]:
    return {k: v for k, v in made.env().items() if k.startswith(("RAY_", "AWS_", netns_cluster.MARKER_ENV))}


@pytest.fixture(scope="module")
def daemon(cluster: Cluster, redis_store: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cirrus]:
    """A Ray driver daemon whose queue store is the Redis server every node reaches."""
    made, _, s3 = cluster
    cirrus = Cirrus(
        tmp_path_factory.mktemp("ray-queues-daemon") / "home",
        CIRRUS_RUNTIME="ray",
        CIRRUS_STORE=redis_store,
        CIRRUS_S3_ENDPOINT_URL=s3.endpoint_url,
        **_ray_env(made),
    )
    started = time.monotonic()
    with pytest.MonkeyPatch.context() as patch:  # (the daemon inherits this process's environment)
        patch.setenv("AWS_MAX_ATTEMPTS", "1")  # S3 at a wrong endpoint fails at once, not after ~20 s of retries
        cirrus.up()
    print(f"daemon on Redis up as a Ray driver in {time.monotonic() - started:.1f} s")
    try:
        yield cirrus
    finally:
        leftovers = cirrus.shutdown()
        assert not leftovers, leftovers


def _deployed(cirrus: Cirrus, project: Path) -> None:
    code, _, err = cirrus.cli("deploy", str(project), "--timeout", "120")
    assert code == 0, err + cirrus.daemon_log()[-4000:]


def _deleted(cirrus: Cirrus, api: str) -> None:
    code, _, err = cirrus.cli("delete", api)
    assert code == 0, err


def _get(cirrus: Cirrus, api: str) -> dict[str, Any]:
    code, out, err = cirrus.cli("get", api, "-o", "json")
    assert code == 0, err
    return dict(json.loads(out))


# --- SQLite cannot serve nodes ----------------------------------------------------------------


def test_async_apis_and_batch_jobs_on_ray_need_a_redis_store(
    cluster: Cluster, tmp_path_factory: pytest.TempPathFactory, tmp_path: Path
) -> None:
    made, _, _ = cluster
    cirrus = Cirrus(tmp_path_factory.mktemp("ray-sqlite-daemon") / "home", CIRRUS_RUNTIME="ray", **_ray_env(made))
    cirrus.up()  # on the default store: SQLite in its home, which no other node reaches
    try:
        for kind in ("async", "batch"):
            project = write_project(tmp_path / kind, ECHO_ID, name=f"on-sqlite-{kind}", kind=kind)
            code, out, err = cirrus.cli("deploy", str(project), "--timeout", "30")
            assert code == 1, (out, err)
            assert f"'on-sqlite-{kind}' ({kind})" in err, err
            assert "need a Redis store every node reaches (CIRRUS_STORE=redis://HOST:PORT/0)" in err, err
            code, _, err = cirrus.cli("get", f"on-sqlite-{kind}")
            assert code == 1 and "no API named" in err, err  # refused before anything was recorded
    finally:
        leftovers = cirrus.shutdown()
        assert not leftovers, leftovers


# --- a batch job over two nodes ---------------------------------------------------------------


def _sink_lines(sink: str, s3: MotoServer) -> list[dict[str, Any]]:
    """Every line of the job's part files."""
    if sink.startswith("s3://"):
        fs = s3.filesystem()
        texts = [fs.cat_file(path).decode() for path in sorted(fs.glob(f"{sink.removeprefix('s3://')}/part-*.jsonl"))]
    else:
        texts = [part.read_text() for part in sorted(Path(sink).glob("part-*.jsonl"))]
    return [json.loads(line) for text in texts for line in text.splitlines()]


@pytest.mark.parametrize(
    "sink_kind",
    [
        # The namespaces share this machine's file system, so a directory is a sink every node reaches.
        pytest.param("shared-directory"),
        pytest.param("s3"),  # the daemon's CIRRUS_S3_ENDPOINT_URL reaches the replicas on every node
    ],
)
def test_a_batch_job_across_nodes_writes_every_item_once_to_the_sink(
    daemon: Cirrus, cluster: Cluster, tmp_path: Path, sink_kind: str
) -> None:
    _, _, s3 = cluster
    api = f"crunch-{sink_kind}"
    project = write_project(
        tmp_path / "crunch",
        CRUNCH,
        name=api,
        kind="batch",
        compute={"cpu": 0.5, "accelerators": {"spread": 1}},  # one worker a node
        concurrency={"timeout_s": 10},
        queue={"lease_s": 3.0, "max_attempts": 3},
    )
    _deployed(daemon, project)
    if sink_kind == "s3":
        s3.filesystem().mkdir(SINK_BUCKET)
        sink = f"s3://{SINK_BUCKET}/{api}"
    else:
        sink = str(tmp_path / "sink")
    items = list(range(ITEMS))
    started = time.monotonic()
    code, out, err = daemon.cli(
        "jobs", "submit", api, "--items-json", json.dumps(items), "--batch-size", "10", "--workers", "2",
        "--sink", sink, "-f", "-o", "json", timeout=120,
    )  # fmt: skip
    assert code == 0, out[-2000:] + err[-2000:] + daemon.daemon_log()[-3000:]
    job = json.loads(out)
    print(f"{sink_kind}: {ITEMS} items in 20 batches on 2 workers in {time.monotonic() - started:.1f} s")
    assert (job["status"], job["batches_done"], job["items_done"]) == ("succeeded", 20, ITEMS), job

    lines = _sink_lines(job["sink"], s3)
    written = Counter(line["index"] for line in lines)
    assert sorted(written) == items and set(written.values()) == {1}, written  # every item exactly once
    assert all(line["item"] == line["index"] and line["result"]["double"] == 2 * line["index"] for line in lines)
    where = Counter(line["result"]["netns"] for line in lines)
    assert len(where) == 2 and os.readlink("/proc/self/ns/net") not in where, where  # two workers, two nodes
    _deleted(daemon, api)


# --- 1,000 async requests and a node killed -------------------------------------------------


def _submit(url: str, numbers: list[int], accepted: dict[str, int], refused: list[int], lock: threading.Lock) -> None:
    with httpx.Client(timeout=30) as http:
        for n in numbers:
            response = http.post(url, json={"n": n})
            with lock:
                if response.status_code == 202:
                    accepted[response.json()["id"]] = n
                else:
                    refused.append(response.status_code)


def test_1000_async_requests_with_a_node_killed_midway_every_accepted_id_completes_once(
    daemon: Cirrus, cluster: Cluster, redis_store: str, tmp_path: Path
) -> None:
    from cirrus.store import open_store

    _, nodes, _ = cluster
    project = write_project(
        tmp_path / "ids",
        ECHO_ID,
        name="ids",
        kind="async",
        compute={"cpu": 0.5, "accelerators": {"spread": 1}},  # two of the three nodes: the third is spare
        concurrency={"max_concurrency": 16, "inference_slots": 4, "timeout_s": 10},
        queue={"lease_s": 3.0, "max_attempts": 5},
        autoscaling={"min_replicas": 2, "max_replicas": 2},
    )
    _deployed(daemon, project)
    replicas = _get(daemon, "ids")["replicas"]
    assert len({r["node"] for r in replicas}) == 2, replicas
    victim_ip = replicas[0]["node"]
    [victim] = [node for node in nodes if node.ip == victim_ip]

    store = open_store(redis_store)
    url = daemon.url("ids")
    accepted: dict[str, int] = {}
    refused: list[int] = []
    lock = threading.Lock()
    senders = [
        threading.Thread(target=_submit, args=(url, list(range(i, REQUESTS, 8)), accepted, refused, lock))
        for i in range(8)
    ]
    started = time.monotonic()
    for sender in senders:
        sender.start()
    try:
        deadline = time.monotonic() + 60
        while (counts := store.counts("ids")).completed < REQUESTS // 4:
            assert time.monotonic() < deadline, counts
            time.sleep(0.02)
        assert counts.in_queue > 0, counts  # midway: a backlog is still waiting
        killed_at = time.monotonic()
        victim.kill()
        for sender in senders:
            sender.join(timeout=60)
        assert not refused and len(accepted) == REQUESTS, (Counter(refused), len(accepted))
        submitted_s = time.monotonic() - started

        deadline = time.monotonic() + 90
        while (counts := store.counts("ids")).completed < REQUESTS:
            assert counts.failed == 0, store.dead_letters("ids")[:3]
            assert time.monotonic() < deadline, counts
            time.sleep(0.05)
        backlog_s = time.monotonic() - started
        # Each request is in exactly one of the store's sets: all done, once each, none failed.
        assert (counts.in_queue, counts.in_progress, counts.completed, counts.failed) == (0, 0, REQUESTS, 0), counts
    finally:
        store.close()

    attempts: Counter[int] = Counter()
    served_from: Counter[str] = Counter()
    with httpx.Client(timeout=30) as http:
        for request_id, n in accepted.items():
            record = http.get(f"{url}/{request_id}").json()
            assert record["status"] == "completed" and record["result"]["n"] == n, record
            attempts[record["attempts"]] += 1
            served_from[record["result"]["netns"]] += 1
    redelivered = REQUESTS - attempts[1]
    print(
        f"{REQUESTS} async requests: submitted in {submitted_s:.1f} s, all completed {backlog_s:.1f} s after the "
        f"first ({backlog_s - (killed_at - started):.1f} s after the kill); redelivered: {redelivered} "
        f"(attempts: {dict(sorted(attempts.items()))}); served from {len(served_from)} nodes: "
        f"{sorted(served_from.values(), reverse=True)}"
    )
    # Only what the dead node held was delivered again: at most its leases (max_concurrency), once more.
    assert 1 <= redelivered <= 16 and set(attempts) <= {1, 2}, attempts
    assert len(served_from) >= 2, served_from  # the victim answered some before it died, the others the rest
    _deleted(daemon, "ids")
