#!/usr/bin/env python3
"""Cirrus on a Ray cluster: the data path, scale-ups and a node's death, on one namespace cluster.

One real multi-node Ray 2.60 cluster on this machine (``tests/netns_cluster.py``: a head with 0 CPUs
in the root namespace, worker nodes in Linux network namespaces on a bridge), one run, four parts:

* **noop**: no-op req/s and latency (``wrk -t1 -c16``, after a warm-up) through the gateway to one
  replica, three ways: a plain ``cirrus up`` daemon (local runtime, replica on this machine), a
  ``CIRRUS_RUNTIME=ray`` daemon (a Ray driver; the replica forced onto a worker node by a custom
  resource, ``compute: {accelerators: {spread: 1}}``), and Ray Serve on the same cluster (the peer
  harness's no-op deployment, one replica on a worker node, HTTP proxy on the head's address on a
  port given here, driven by ``bench/serve_noop.py``; default settings, then ``max_ongoing_requests=100``).
* **scale**: ``bench/projects/sleep50`` (50 ms ``predict``) with target_concurrency 1 and 1-2
  replicas on different nodes; N closed-loop clients start at once (``autoscale.drive``); the time
  from the load's start until ``cirrus get`` shows 2 ready replicas on 2 nodes (polled every 50 ms).
* **minilm**: examples/sentence-embeddings (all-MiniLM-L6-v2) on the two nodes that have an ``ml``
  resource. The first replica lands on the only one there is at deploy time; the second node joins
  meanwhile, so the scale 1 -> 2 that follows starts a replica on a node no Cirrus agent ever ran on
  (agent, snapshot, template, replica). Then 2 -> 1 -> 2 (``--warm-tries`` times): the re-added
  replica lands on the node just freed, which keeps the revision's template. Each is a deploy that
  changes only ``min_replicas``/``max_replicas`` (action ``scaled``), timed from the deploy call
  until the new replica is ready.
* **death**: the no-op at one replica; the node it runs on is killed (every process of its
  namespace, SIGKILL). Times from the kill until Ray lists the node dead (``NetnsCluster.wait_dead``,
  whose watching driver starts ``--death-lead`` s before the kill), until ``cirrus get`` no longer
  shows the replica ready, until a replacement is ready on a surviving node, and until a request
  through the gateway answers 200.

Every measurement carries the CPU the rest of the machine used meanwhile ("other CPU", as in
realtime.py: machine busy time less the run's own processes, wrk and this script), since the
machine is small and shared. Everything stops on the way out (also on Ctrl-C / SIGTERM): Ray Serve
(``serve.shutdown``), the daemons (``cirrus down``, then their marked processes), and the cluster
(every process of its namespaces and sessions, the namespaces, the bridge). The tables and targets
are in ``cluster_tables.py``.

    python bench/cluster.py                                   # all four parts (~2-3 minutes)
    python bench/cluster.py --only noop --duration 15 --json /tmp/cluster.json
    python bench/cluster.py --only minilm,death
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import os
import re
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import autoscale
import procs
import report
import yaml
from cluster_tables import Targets, markdown, start_text, targets
from serve_noop import DEFAULT_LABEL, ServeDriver
from wrk import Wrk, add_load_args, find_wrk

from cirrus.types import ApiStatus, ReplicaState

ROOT = procs.ROOT
sys.path.insert(0, str(ROOT / "tests"))
import netns_cluster  # noqa: E402  (a test helper: tests/ on the path first)
from netns_cluster import NetnsCluster, NetnsNode  # noqa: E402

BODY = '{"x": 1}'
POLL_S = 0.05
PARTS = ("noop", "scale", "minilm", "death")
HEALTH = netns_cluster.HealthCheck()  # NetnsCluster's default: how fast Ray declares a silent node dead
HEADER = re.compile(
    r"^--- (\d{4}-\d\d-\d\d \d\d:\d\d:\d\d) starting (?:replica \S+ \(revision (\d+)|the template)", re.M
)
IMPORTED = re.compile(r"ready: imported \S+ in ([\d.]+)s")
LOADED = re.compile(r"\(loaded in ([\d.]+)s\)")
SPREAD = "spread"  # one on each of node1 and node2: one replica per node
ML = "ml"  # on node2 and node3: where MiniLM's two replicas go

log = procs.logger("cluster")


# The processes of the run ----------------------------------------------------------------------


class RunTree(procs.Tree):
    """Every process of the run but this one: the cluster's (its namespaces, the head's and drivers'
    sessions, what carries its marker: the Ray daemon too) and each local daemon's (by `procs.TAG_ENV`)."""

    def __init__(self, cluster: NetnsCluster) -> None:
        super().__init__(0)
        self.cluster = cluster
        self.tags: list[str] = []

    def pids(self) -> dict[int, procs.ProcStat]:
        found = set(self.cluster.pids())
        for tag in self.tags:
            found.update(procs.tagged_pids(tag))
        return procs.stats_of(found)


def other_pct(window: procs.CpuWindow) -> float:
    split = window.stop()
    return split.pct(split.other_s)


def cirrus_processes(node: NetnsNode, api: str) -> list[int]:
    """The replica and template processes of `api` on `node` (their command lines name the API)."""
    found = []
    for pid in node.pids():
        words = procs.cmdline(pid, limit=1000).split()
        if any("cirrus.replica" in w for w in words) and api in words:
            found.append(pid)
    return found


def delete_api(daemon: procs.Daemon, nodes: list[NetnsNode], api: str, timeout: float = 60) -> None:
    """`cirrus delete API`, then wait until its replicas and templates are gone from the nodes (their Ray
    resources are free then)."""
    daemon.client.delete(api)
    deadline = time.monotonic() + timeout
    while any(cirrus_processes(node, api) for node in nodes):
        if time.monotonic() > deadline:
            raise procs.BenchError(f"{api}: replicas still running {timeout:g} s after `cirrus delete`")
        time.sleep(0.1)


# Projects ----------------------------------------------------------------------------------------


def write_project(source: Path, dest: Path, **changes: Any) -> Path:
    """SOURCE's predictor.py and its one API's cirrus.yaml in DEST, each field of `changes` set (a dict
    merged into the field's). Rewriting only the autoscaling bounds leaves the snapshot as it was."""
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copy2(source / "predictor.py", dest / "predictor.py")
    [api] = yaml.safe_load((source / "cirrus.yaml").read_text())
    for key, value in changes.items():
        api[key] = {**api.get(key, {}), **value} if isinstance(value, dict) else value
    (dest / "cirrus.yaml").write_text(yaml.safe_dump([api], sort_keys=False))
    return dest


def noop_on_ray(workdir: Path) -> Path:
    """examples/noop, its replica on a node with a `spread` resource."""
    return write_project(ROOT / "examples" / "noop", workdir / "noop-ray", compute={"accelerators": {SPREAD: 1}})


# Polling `cirrus get` ------------------------------------------------------------------------------


@dataclass
class Poll:
    at: float  # seconds since the origin
    status: ApiStatus


def watch(
    daemon: procs.Daemon, api: str, done: Callable[[ApiStatus], bool], origin: float, timeout: float
) -> list[Poll]:
    """`cirrus get API` (the admin API, in-process) every POLL_S s until `done` holds or `timeout` s have
    passed since `origin` (time.monotonic()); every poll, the last one first to satisfy `done` if any did."""
    polls = []
    while True:
        status = daemon.client.get(api)
        polls.append(Poll(time.monotonic() - origin, status))
        if done(status) or polls[-1].at > timeout:
            return polls
        time.sleep(POLL_S)


def first_at(polls: list[Poll], check: Callable[[ApiStatus], bool]) -> float | None:
    return next((round(p.at, 3) for p in polls if check(p.status)), None)


def transitions(polls: list[Poll]) -> list[tuple[float, list[str]]]:
    """(seconds, each replica's "id state node, reason") at each poll that differs from the one before."""
    out: list[tuple[float, list[str]]] = []
    for p in polls:
        seen = [f"{r.id} {r.state.value} {r.node}, {r.reason or r.last_error or ''}" for r in p.status.replicas]
        if not out or out[-1][1] != seen:
            out.append((round(p.at, 3), seen))
    return out


def ready(status: ApiStatus) -> list[Any]:
    return [r for r in status.replicas if r.state is ReplicaState.READY]


def ready_nodes(status: ApiStatus) -> set[str]:
    return {r.node for r in ready(status) if r.node}


def first_200(url: str, origin: float, timeout: float) -> float:
    """POST BODY to `url` every POLL_S s until a no-op reply; the seconds since `origin` (monotonic)."""
    last = "no answer"
    while time.monotonic() - origin < timeout:
        try:
            if json.loads(procs.post(url, BODY, timeout=5)) == {"y": 1}:
                return round(time.monotonic() - origin, 3)
            last = "unexpected reply"
        except (OSError, ValueError) as exc:
            last = str(exc)
        time.sleep(POLL_S)
    raise procs.BenchError(f"{url} did not answer 200 within {timeout:g} s ({last})")


# The cluster and the Ray daemon ------------------------------------------------------------------


class Run:
    """The cluster, the Ray daemon and what the parts share."""

    def __init__(self, cluster: NetnsCluster, workdir: Path, wrk: Wrk, args: argparse.Namespace) -> None:
        self.cluster = cluster
        self.workdir = workdir
        self.wrk = wrk
        self.args = args
        self.tree = RunTree(cluster)
        self.nodes: list[NetnsNode] = []
        self.ray_daemon: procs.Daemon | None = None
        self.ml_spare: NetnsNode | None = None  # node3, joined during the MiniLM part
        self.declared: dict[str, dict[str, float]] = {}  # node name -> its custom resources
        self.agents: set[str] = set()  # nodes where the Ray daemon has run a replica (an agent is there)

    def start(self) -> dict[str, Any]:
        cluster = self.cluster
        t0 = time.monotonic()
        cluster.start_head(num_cpus=0)
        self.nodes = [self.add_node({SPREAD: 1}), self.add_node({SPREAD: 1, ML: 1})]
        cluster.wait_joined(*self.nodes)
        up_s = time.monotonic() - t0
        nodes = ", ".join(f"{n.name} {n.ip} {self.declared[n.name]}" for n in self.nodes)
        log(f"cluster up in {up_s:.1f} s: head {cluster.head_ip} (0 CPUs), {nodes}")
        env = {k: v for k, v in cluster.env().items() if k.startswith("RAY_") or k == netns_cluster.MARKER_ENV}
        self.ray_daemon = daemon = procs.Daemon(
            "ray", self.workdir, self.args.logdir, log, env={**env, "CIRRUS_RUNTIME": "ray"}
        )
        self.tree.tags.append(daemon.tag)
        t1 = time.monotonic()
        daemon.start()
        daemon_s = time.monotonic() - t1
        window = procs.CpuWindow(self.tree)
        time.sleep(self.args.idle)
        idle = window.stop()
        log(
            f"idle for {self.args.idle:g} s: cluster + daemon {idle.pct(idle.tree_s)} % of a core, "
            f"other processes {idle.pct(idle.other_s)} %"
        )
        return {
            "cluster_up_s": round(up_s, 2),
            "ray_daemon_up_s": round(daemon_s, 2),
            "timings": {k: round(v, 2) for k, v in cluster.timings.items()},
            "idle_cluster_cpu_pct": idle.pct(idle.tree_s),
            "idle_other_cpu_pct": idle.pct(idle.other_s),
            "loadavg_at_start": [round(x, 2) for x in os.getloadavg()],
            "health_check": asdict(HEALTH),
        }

    def add_node(self, resources: dict[str, float]) -> NetnsNode:
        """A worker node with 2 CPUs and these custom resources, joining (`wait_joined` waits for it)."""
        node = self.cluster.add_node(num_cpus=2, resources=resources, wait=False)
        self.declared[node.name] = resources
        return node

    def all_nodes(self) -> list[NetnsNode]:
        return [*self.nodes, *([self.ml_spare] if self.ml_spare else [])]

    def node_at(self, ip: str | None) -> NetnsNode | None:
        return next((n for n in self.all_nodes() if n.ip == ip), None)

    def name_of(self, ip: str | None) -> str:
        node = self.node_at(ip)
        return node.name if node else f"{ip} (not a worker node)"

    @property
    def daemon(self) -> procs.Daemon:
        assert self.ray_daemon is not None
        return self.ray_daemon

    def seen(self, status: ApiStatus) -> None:
        """Remember the nodes where replicas run (each has a Cirrus agent from then on)."""
        self.agents.update(r.node for r in status.replicas if r.node)

    def node_root(self) -> Path:
        """Where the Ray runtime keeps each node's snapshots and logs (cirrus/runtimes/ray.py's default)."""
        snapshots = (self.daemon.home / "snapshots").resolve()
        return Path(f"/tmp/cirrus-ray-{hashlib.sha256(str(snapshots).encode()).hexdigest()[:12]}")

    def start_info(self, api: str, replica_id: str, ip: str | None, since: float) -> dict[str, Any]:
        """How a replica started, from its node's logs: `mode` ('forked' from the node's template, or
        'fresh'), its predictor's `load_s`, and `template_import_s` when its template started after `since`
        (time.time(); the logs' timestamps have whole seconds)."""
        node = self.node_at(ip)
        if node is None or node.node_id is None:
            return {"mode": "?"}
        logs = self.node_root() / node.node_id[:16] / "logs" / api
        replica_log = read(logs / f"{replica_id}.log")
        info: dict[str, Any] = {"mode": autoscale.start_mode(logs / f"{replica_id}.log")}
        if loaded := LOADED.findall(replica_log):
            info["load_s"] = float(loaded[-1])
        revision = next((h[1] for h in reversed(HEADER.findall(replica_log)) if h[1]), None)
        template_log = read(logs / "templates" / f"revision-{revision}.log")
        started = HEADER.findall(template_log)
        imported = IMPORTED.findall(template_log)
        if started and imported and time.mktime(time.strptime(started[-1][0], "%Y-%m-%d %H:%M:%S")) >= int(since):
            info["template_import_s"] = float(imported[-1])
        return info

    def stop(self) -> None:
        """Stop the Ray daemon (and its replicas), keep the nodes' replica logs, remove their directories."""
        if self.ray_daemon is None:
            return
        if procs.stop_and_report(self.ray_daemon, log, "ray"):
            log("Ray daemon and its replicas stopped")
        root = self.node_root()
        if root.is_dir():
            with contextlib.suppress(OSError, shutil.Error):
                ignore = shutil.ignore_patterns("snapshots", "models")
                shutil.copytree(root, self.args.logdir / "ray" / "nodes", dirs_exist_ok=True, ignore=ignore)
            shutil.rmtree(root, ignore_errors=True)


def read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""


# Part 1: the no-op's data path --------------------------------------------------------------------


def load(run: Run, url: str) -> dict[str, Any]:
    """The warm-up, then the measured wrk run; the CPU of the whole run's processes counts as the server's."""
    args = run.args
    if args.warmup > 0:
        run.wrk.run(url, args.conns, args.warmup, run.tree)
    return run.wrk.run(url, args.conns, args.duration, run.tree)


def noop_row(name: str, label: str, where: str, res: dict[str, Any], ready_s: float) -> dict[str, Any]:
    log(
        f"{name}: {res['rps']:.0f} req/s, p50 {res['p50_ms']} ms, p99 {res['p99_ms']} ms, errors "
        f"{res['non2xx']}/{res['socket_errors']}, run's CPU {res['server_cpu_pct']} %, other {res['other_cpu_pct']} %"
    )
    return {"name": name, "label": label, "where": where, "ready_s": ready_s, **res}


def noop_local(run: Run) -> dict[str, Any]:
    daemon = procs.Daemon("local", run.workdir, run.args.logdir, log)
    run.tree.tags.append(daemon.tag)
    try:
        daemon.start()
        t0 = time.monotonic()
        daemon.client.deploy(ROOT / "examples" / "noop", wait=True, timeout=run.args.ready_timeout)
        ready_s = first_200(f"{daemon.gateway_url}/noop", t0, run.args.ready_timeout)
        res = load(run, f"{daemon.gateway_url}/noop")
        return noop_row("local", "Cirrus, local runtime (`cirrus up`)", "this machine", res, ready_s)
    finally:
        procs.stop_and_report(daemon, log, "local")
        run.tree.tags.remove(daemon.tag)


def noop_ray(run: Run) -> dict[str, Any]:
    daemon = run.daemon
    t0 = time.monotonic()
    daemon.client.deploy(noop_on_ray(run.workdir), wait=True, timeout=run.args.ready_timeout)
    ready_s = first_200(f"{daemon.gateway_url}/noop", t0, run.args.ready_timeout)
    status = daemon.client.get("noop")
    run.seen(status)
    where = run.name_of(status.replicas[0].node)
    log(f"ray: noop's replica on {where}, serving {ready_s:.1f} s after the deploy call")
    res = load(run, f"{daemon.gateway_url}/noop")
    delete_api(daemon, run.nodes, "noop")
    return noop_row("ray", "Cirrus, Ray runtime (replica on a worker node)", where, res, ready_s)


def noop_serve(run: Run) -> list[dict[str, Any]]:
    driver = ServeDriver(run.cluster, run.nodes, SPREAD, run.args.logdir / "serve-driver.log")
    rows = []
    try:
        t0 = time.monotonic()
        why = driver.start(run.args.ready_timeout)
        if why is not None:
            log(f"Ray Serve skipped: {why}")
            return [{"name": "serve", "skipped": why}]
        log(f"Ray Serve started ({time.monotonic() - t0:.1f} s); proxy on {driver.url}")
        variants = [(None, "serve", DEFAULT_LABEL)]
        if run.args.serve_max_ongoing:
            mor = run.args.serve_max_ongoing
            variants.append((mor, f"serve-{mor}", f"Ray Serve, max_ongoing_requests {mor}"))
        for max_ongoing, name, label in variants:
            t1 = time.monotonic()
            driver.deploy(max_ongoing, run.args.ready_timeout)
            ready_s = first_200(driver.url, t1, run.args.ready_timeout)
            rows.append(noop_row(name, label, driver.replica_node(), load(run, driver.url), ready_s))
    finally:
        driver.stop()
    return rows


def run_noop(run: Run) -> list[dict[str, Any]]:
    return [noop_local(run), noop_ray(run), *noop_serve(run)]


# Part 2: a load step, and a second replica on another node ---------------------------------------


def run_scale(run: Run) -> dict[str, Any]:
    daemon, args, api = run.daemon, run.args, "sleep50"
    project = write_project(
        ROOT / "bench" / "projects" / "sleep50",
        run.workdir / "sleep50",
        compute={"cpu": 0.25, "accelerators": {SPREAD: 1}},
        autoscaling={"min_replicas": 1, "max_replicas": 2, "target_concurrency": 1},
    )
    daemon.client.deploy(project, wait=True, timeout=args.ready_timeout)
    for _ in range(5):  # the gateway's connection to the replica, the slot's thread: warm
        procs.post(f"{daemon.gateway_url}/{api}", BODY, timeout=10)
    before = daemon.client.get(api)
    first_node = before.replicas[0].node
    run.seen(before)
    agents = set(run.agents)
    log(f"scale: 1 replica on {run.name_of(first_node)}; {args.clients} clients for {args.scale_load:g} s")
    outcome: dict[str, Any] = {}

    def drive() -> None:
        outcome["load"] = asyncio.run(autoscale.drive(daemon, api, 0.0, args.scale_load, args.clients))

    wall0, origin = time.time(), time.monotonic()
    window = procs.CpuWindow(run.tree)
    driver = threading.Thread(target=drive, daemon=True)
    driver.start()
    polls = watch(daemon, api, lambda s: len(ready_nodes(s)) >= 2, origin, args.scale_load)
    other = other_pct(window)
    driver.join()
    _, step, end, records, _ = outcome["load"]
    offset = step - wall0  # the load starts this long after `origin`
    last = polls[-1].status
    ready_at = first_at(polls, lambda s: len(ready_nodes(s)) >= 2)
    new = [r for r in ready(last) if r.node != first_node]
    run.seen(last)
    result = {
        "clients": args.clients,
        "first_node": run.name_of(first_node),
        "new_node": run.name_of(new[0].node) if new else None,
        "new_node_had_agent": bool(new) and new[0].node in agents,
        "desired_2_s": rel(first_at(polls, lambda s: s.replicas_desired >= 2), offset),
        "ready_2_nodes_s": rel(ready_at, offset),
        "start": run.start_info(api, new[0].id, new[0].node, wall0) if new else None,
        "before": autoscale.window(records, step, step + (ready_at - offset if ready_at else end - step)),
        "after": autoscale.window(records, step + ready_at - offset, end) if ready_at else None,
        "other_cpu_pct": other,
    }
    log(
        f"scale: desired 2 after {result['desired_2_s']} s, 2 ready on 2 nodes after {result['ready_2_nodes_s']} s "
        f"({result['new_node']}, {start_text(result['start'])}); other CPU {other} %"
    )
    delete_api(daemon, run.nodes, api)
    return result


def rel(at: float | None, offset: float) -> float | None:
    return None if at is None else round(at - offset, 3)


# Part 3: MiniLM scale-ups, on a fresh node and on a warm one --------------------------------------


def minilm_project(run: Run, replicas: int) -> Path:
    return write_project(
        ROOT / "examples" / "sentence-embeddings",
        run.workdir / "minilm",
        name="minilm",
        compute={"cpu": 0.5, "accelerators": {ML: 1}},
        autoscaling={"min_replicas": replicas, "max_replicas": replicas},
    )


def scale_up(run: Run, kind: str, ran_revision: set[str]) -> dict[str, Any]:
    """Redeploy MiniLM at 2 replicas (only the bounds change) and time the added replica to ready."""
    daemon, api = run.daemon, "minilm"
    before = {r.id for r in daemon.client.get(api).replicas}
    agents = set(run.agents)
    project = minilm_project(run, 2)
    window = procs.CpuWindow(run.tree)
    wall0, t0 = time.time(), time.monotonic()
    [result] = daemon.client.deploy(project, wait=False)

    def added(status: ApiStatus) -> bool:
        return any(r.id not in before for r in ready(status))

    polls = watch(daemon, api, added, t0, run.args.ready_timeout)
    other = other_pct(window)
    if not added(polls[-1].status):
        raise procs.BenchError(f"minilm: no replica added within {run.args.ready_timeout:g} s; {polls[-1].status}")
    [new] = [r for r in ready(polls[-1].status) if r.id not in before]
    step = {
        "kind": kind,
        "action": result.action,
        "revision": result.revision,
        "node": run.name_of(new.node),
        "node_had_agent": new.node in agents,
        "node_ran_revision": new.node in ran_revision,
        "ready_s": round(polls[-1].at, 3),
        "placed_s": first_at(polls, lambda s: any(r.id not in before and r.node for r in s.replicas)),
        "start": run.start_info(api, new.id, new.node, wall0),
        "other_cpu_pct": other,
    }
    ran_revision.add(new.node or "")
    run.seen(polls[-1].status)
    log(
        f"minilm 1 -> 2 ({kind}): ready {step['ready_s']:.2f} s after the deploy call on {step['node']} "
        f"(agent there before: {step['node_had_agent']}, revision ran there: {step['node_ran_revision']}, "
        f"{start_text(step['start'])}, action {step['action']}); other CPU {other} %"
    )
    return step


def scale_down(run: Run) -> None:
    run.daemon.client.deploy(minilm_project(run, 1), wait=False)
    running = (ReplicaState.PENDING, ReplicaState.STARTING, ReplicaState.READY, ReplicaState.DRAINING)
    run.daemon.wait("at 1 replica", lambda s: sum(r.state in running for r in s.replicas) == 1, "minilm", 60)


def run_minilm(run: Run) -> list[dict[str, Any]]:
    daemon, args = run.daemon, run.args
    daemon.client.deploy(minilm_project(run, 1), wait=False)
    if run.ml_spare is None:  # node3 joins once the first replica has its node: it cannot go there
        daemon.wait("placed", lambda s: any(r.node for r in s.replicas), "minilm", 60)
        run.ml_spare = run.add_node({ML: 1})
    status = daemon.wait("live", lambda s: s.status == "live", "minilm", args.ready_timeout)
    run.cluster.wait_joined(run.ml_spare)
    run.seen(status)
    ran_revision = {r.node for r in status.replicas if r.node}
    log(f"minilm: 1 replica on {run.name_of(status.replicas[0].node)}; {run.ml_spare.name} joined ({ML}: 1)")
    steps = [scale_up(run, "fresh", ran_revision)]
    for _ in range(args.warm_tries):
        scale_down(run)
        steps.append(scale_up(run, "warm", ran_revision))
    delete_api(daemon, run.all_nodes(), "minilm")
    return steps


# Part 4: a node dies ------------------------------------------------------------------------------


def run_death(run: Run) -> dict[str, Any]:
    daemon, args = run.daemon, run.args
    daemon.client.deploy(noop_on_ray(run.workdir), wait=True, timeout=args.ready_timeout)
    status = daemon.client.get("noop")
    run.seen(status)
    [replica] = ready(status)
    victim = run.node_at(replica.node)
    if victim is None:
        raise procs.BenchError(f"noop's replica is not on a worker node: {replica.node}")
    detected: dict[str, Any] = {}

    def wait_dead() -> None:
        try:
            detected["s"] = run.cluster.wait_dead(victim, timeout=60 + args.death_lead)
        except Exception as exc:
            detected["error"] = str(exc)

    watcher = threading.Thread(target=wait_dead, daemon=True)
    watcher.start()
    time.sleep(args.death_lead)  # the watching driver connects meanwhile
    log(f"death: killing {victim.name} ({victim.ip}), which runs noop's replica {replica.id}")
    wall0, t0 = time.time(), time.monotonic()
    killed = victim.kill()
    kill_s = time.monotonic() - t0
    # From here on: the killed processes, reaped by this one as their subreaper, would count as its children.
    window = procs.CpuWindow(run.tree)

    def replaced(s: ApiStatus) -> bool:
        return any(r.node != victim.ip for r in ready(s))

    polls = watch(daemon, "noop", replaced, t0, args.ready_timeout)
    other = other_pct(window)
    if not replaced(polls[-1].status):
        raise procs.BenchError(f"noop not replaced within {args.ready_timeout:g} s; {polls[-1].status}")
    serving_s = first_200(f"{daemon.gateway_url}/noop", t0, args.ready_timeout)
    watcher.join(90)
    new = next(r for r in ready(polls[-1].status) if r.node != victim.ip)
    result = {
        "victim": victim.name,
        "watch_lead_s": args.death_lead,
        "processes_killed": len(killed),
        "kill_s": round(kill_s, 3),
        "ray_dead_s": round(detected["s"], 3) if "s" in detected else None,
        "ray_dead_error": detected.get("error"),
        "cirrus_dropped_s": first_at(polls, lambda s: replica.id not in {r.id for r in ready(s)}),
        "replacement_placed_s": first_at(polls, lambda s: any(r.node not in (None, victim.ip) for r in s.replicas)),
        "replacement_ready_s": round(polls[-1].at, 3),
        "first_200_s": serving_s,
        "replacement_node": run.name_of(new.node),
        "start": run.start_info("noop", new.id, new.node, wall0),
        "timeline": transitions(polls),
        "other_cpu_pct": other,
    }
    log(
        f"death: Ray says dead after {result['ray_dead_s']} s; Cirrus drops the replica after "
        f"{result['cirrus_dropped_s']} s; replacement ready on {result['replacement_node']} after "
        f"{result['replacement_ready_s']} s, first 200 after {serving_s} s; other CPU {other} %"
    )
    return result


# Running ------------------------------------------------------------------------------------------


def parse_only(text: str) -> list[str]:
    parts = [p.strip() for p in text.split(",") if p.strip()]
    unknown = set(parts) - set(PARTS)
    if not parts or unknown:
        raise argparse.ArgumentTypeError(f"--only takes a comma-separated list of {', '.join(PARTS)}")
    return parts


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--only", type=parse_only, default=list(PARTS), help=f"parts to run (default {','.join(PARTS)})")
    add_load_args(ap, 16, 10, 3, "before each no-op run")
    ap.add_argument("--serve-max-ongoing", type=int, default=100, help="a second Ray Serve run with this (0: none)")
    ap.add_argument("--clients", type=int, default=4, help="scale: concurrent clients of the load step (default 4)")
    ap.add_argument("--scale-load", type=float, default=10.0, help="scale: seconds of load (default 10)")
    ap.add_argument("--warm-tries", type=int, default=2, help="minilm: 2 -> 1 -> 2 cycles (default 2)")
    ap.add_argument("--death-lead", type=float, default=3.0, help="death: s the Ray watcher gets before the kill")
    ap.add_argument("--idle", type=float, default=2.0, help="s of idle CPU measured once the cluster is up")
    ap.add_argument("--ready-timeout", type=float, default=180.0, help="s to wait for a deploy or a replica")
    report.add_output_args(ap, report.LOGDIR / "cluster", "Ray's, the daemons' and the replicas' logs")
    return ap.parse_args(argv)


@contextlib.contextmanager
def namespace_cluster(logdir: Path) -> Iterator[NetnsCluster]:
    why = netns_cluster._check()
    if why:
        raise procs.BenchError(f"no namespace cluster here: {why}")
    shutil.rmtree(logdir / "netns", ignore_errors=True)
    with NetnsCluster(logdir / "netns", health_check=HEALTH) as cluster:
        yield cluster


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if (binary := find_wrk()) is None:
        return 2
    args.logdir.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {"parts": args.only}
    t_start = time.monotonic()
    with (
        tempfile.TemporaryDirectory(prefix="cirrus-bench-cluster-") as tmp,
        procs.sigterm_as_interrupt(),
        namespace_cluster(args.logdir) as cluster,
    ):
        workdir = Path(tmp)
        run = Run(cluster, workdir, Wrk.posting(binary, workdir, BODY), args)
        try:
            results["cluster"] = run.start()
            steps: dict[str, Callable[[Run], Any]] = {
                "noop": run_noop,
                "scale": run_scale,
                "minilm": run_minilm,
                "death": run_death,
            }
            for part in PARTS:
                if part in args.only:
                    t0 = time.monotonic()
                    results[part] = steps[part](run)
                    log(f"{part}: {time.monotonic() - t0:.0f} s")
        finally:
            run.stop()
    results["run_s"] = round(time.monotonic() - t_start, 1)
    results["loadavg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    log(f"run took {results['run_s']} s; cluster removed; logs in {args.logdir}")
    found = targets(results)
    versions = report.versions(("ray", "torch", "sentence_transformers"), Wrk(binary, ""))
    return report.conclude(args, markdown(results, found), results, found, versions, Targets(), log)


if __name__ == "__main__":
    procs.run_main(main)
