"""A real multi-node Ray cluster on one machine: each worker node is a Linux network namespace.

    with NetnsCluster(tmp_path) as cluster:              # a bridge 10.251.X.1/24 in the root namespace
        cluster.start_head(num_cpus=1)                    # `ray start --head` on the bridge address
        a = cluster.add_node(resources={"node-a": 1})     # a namespace at .2 with its own raylet
        b = cluster.add_node(num_gpus=1, wait=False)      # .3, joining while the next line waits
        cluster.wait_joined(b)
        cluster.run_driver("import ray; ray.init(); ...")  # a driver in the root namespace (RAY_ADDRESS set)
        a.kill()                                          # SIGKILL every process in a's namespace
        seconds = cluster.wait_dead(a)                    # until `ray.nodes()` says Alive False
    # everything is gone: processes, namespaces, veth pairs, the bridge, the temporary directories

or ask for the `netns_cluster` fixture (import `netns_cluster_fixture` into a test module), a cluster
with no head yet. The head (and anything else meant to be reached by every node, such as Redis)
runs in the root namespace bound to `cluster.head_ip`; each node has its own address (`node.ip`), a
veth pair into the bridge, loopback, and no default route, so it reaches the bridge's subnet and
nothing else. Every process is found by what the fixture created, never by name: a node's are those
`ip netns pids` lists for its namespace, the root namespace's are the sessions of the processes the
fixture started (each in a session of its own), and, as a last net, any carrying
`CIRRUS_NETNS_CLUSTER=<token>` in its environment. Killing is SIGKILL until dead, with this process
a child subreaper meanwhile so that it reaps the orphans (no zombies left for PID 1); `leftovers()`
proves that nothing outlived `close()`.

Ray 2.60 on such a cluster: `RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER` must be unset or 1 (0 makes a worker
node's `ray start` abort, and a driver take 127.0.0.1 for its address); `RAY_AUTH_MODE=disabled`;
the head's autoscaler and dashboard processes open Prometheus ports 44217 and 44227 even with the
dashboard off, moved with AUTOSCALER_METRIC_PORT and DASHBOARD_METRIC_PORT; a driver inside a node's
namespace must say `ray.init(_node_ip_address=node.ip)`, or it attaches to the head's raylet; a
node the GCS declared dead never comes back (after `heal()` its raylet exits, and `ray start --block`
stops the rest).

Needs root, `ip` (iproute2) and Ray (`pip install -e '.[ray]'`); `require()` skips the test (or fails
it under CIRRUS_TESTS_REQUIRE_BACKENDS=1) as the backend "ray-cluster" otherwise. Ray runs small:
100 MB of object store per node, explicit CPU counts, no dashboard UI, usage stats off, and explicit
ports, picked at random from 20000-32000 and checked free in the root namespace (below the
ephemeral range, above Ray's default worker ports), the same numbers being reused inside each
namespace, which has a port space of its own.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import importlib.util
import ipaddress
import json
import os
import random
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import IO, Any

import backends
import pytest

BACKEND = "ray-cluster"
RAY_INSTALL = "pip install -e '.[ray]'"
MARKER_ENV = "CIRRUS_NETNS_CLUSTER"
OBJECT_STORE_BYTES = 100_000_000
START_TIMEOUT_S = 60.0
KILL_TIMEOUT_S = 10.0
STARTED_LINE = "Ray runtime started"
PORT_RANGE = (20000, 32000)
WORKER_PORTS = 64

# `ray start` of Ray 2.60, under `python -m` so it is this interpreter's Ray whatever PATH says.
RAY_START = [sys.executable, "-m", "ray.scripts.scripts", "start", "--block", "--disable-usage-stats"]


# --- whether this machine can run it -------------------------------------------------------------


_available: str | None = None


def require() -> None:
    """Skip the calling test (`backends.missing`) unless a namespace cluster can run here: root, `ip`,
    Ray importable, and the kernel letting us create a namespace and a bridge (a container without
    CAP_NET_ADMIN does not)."""
    global _available
    if _available is None:
        _available = _check()
    if _available:
        backends.missing(BACKEND, _available)


def _check() -> str:
    if not sys.platform.startswith("linux"):
        return f"network namespaces need Linux, not {sys.platform}"
    if os.geteuid() != 0:
        return "network namespaces, a bridge and veth pairs need root (run the tests as root)"
    if shutil.which("ip") is None:
        return "the `ip` command (iproute2) is not installed"
    if importlib.util.find_spec("ray") is None:
        return f"cannot import ray: {RAY_INSTALL}"
    probe = f"cirrusp{secrets.token_hex(3)}"  # interface names: 15 bytes at most
    for create, delete in (
        (["netns", "add", probe], ["netns", "del", probe]),
        (["link", "add", probe, "type", "bridge"], ["link", "del", probe]),
    ):
        made = subprocess.run(["ip", *create], capture_output=True, text=True)
        if made.returncode != 0:
            return f"`ip {' '.join(create)}` failed: {made.stderr.strip()}"
        subprocess.run(["ip", *delete], capture_output=True)
    return ""


# --- small helpers -------------------------------------------------------------------------------


def ip(*args: str) -> str:
    """Run `ip ARGS`; its stdout, or RuntimeError with its stderr."""
    result = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if result.returncode != 0:
        raise RuntimeError(f"`ip {' '.join(args)}` failed ({result.returncode}): {result.stderr.strip()}")
    return result.stdout


def _stat(pid: int) -> list[str]:
    """/proc/PID/stat after the command name: [state, ppid, pgrp, session, ...]; [] once gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return []


def pid_alive(pid: int) -> bool:
    """True while `pid` runs (a zombie, dead but not yet reaped, counts as gone)."""
    stat = _stat(pid)
    return bool(stat) and stat[0] not in ("Z", "X")


def _all_pids() -> Iterator[int]:
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            yield int(entry.name)


def _cmdline(pid: int) -> str:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return "?"
    return raw.replace(b"\0", b" ").decode(errors="replace").strip()[:300]


def _marked(pid: int, token: str) -> bool:
    """Whether `pid` carries `CIRRUS_NETNS_CLUSTER=token` in its environment. (Not every process of
    ours does, as /proc sees it: Ray's agents set their process title over their environment.)"""
    try:
        environ = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return False
    return f"{MARKER_ENV}={token}".encode() in environ.split(b"\0")


def session_pids(leader: subprocess.Popen[Any]) -> list[int]:
    """The live processes of the session `leader` (started with `start_new_session`) leads: it and
    every descendant that did not leave the session, even once orphaned. The session id is the
    leader's pid, which Linux does not hand out again while it is still any process's session id;
    once the leader is reaped and its session empty, it may, so a live process with that pid that is
    not the unreaped leader means the number now belongs to someone else: none are ours."""
    sid = leader.pid
    if leader.returncode is not None and Path(f"/proc/{sid}").exists():
        return []
    return [pid for pid in _all_pids() if (stat := _stat(pid))[3:4] == [str(sid)] and stat[0] not in ("Z", "X")]


def _start_time(pid: int) -> str | None:
    """When `pid` started (in clock ticks since boot), to tell it from a later process with its number."""
    stat = _stat(pid)
    return stat[19] if len(stat) > 19 and stat[0] not in ("Z", "X") else None


@contextlib.contextmanager
def _subreaper() -> Iterator[None]:
    """While it lasts, this process is a child subreaper (prctl PR_SET_CHILD_SUBREAPER): a process
    below it whose parent dies comes to it rather than to PID 1, so it can reap what it killed (PID 1
    of a container does not always reap)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        before = ctypes.c_int(0)
        libc.prctl(37, ctypes.byref(before), 0, 0, 0)  # PR_GET_CHILD_SUBREAPER
        libc.prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER
    except (OSError, AttributeError):
        yield
        return
    try:
        yield
    finally:
        libc.prctl(36, before.value, 0, 0, 0)


def _kill_until_gone(find: Callable[[], Iterable[int]], what: str, timeout: float = KILL_TIMEOUT_S) -> set[int]:
    """SIGKILL every pid `find()` returns, again and again (a parent may start one more child while it
    dies), until every one of them is dead (a zombie or gone, not merely no longer found: a dying
    process can drop out of `find()` before it is dead); the pids killed. Reaps those that came to
    this process as orphans, never its own children (whose `Popen` reaps them)."""
    targets: dict[int, str] = {}
    own_children: set[int] = set()
    deadline = time.monotonic() + timeout
    with _subreaper():
        while True:
            for pid in find():
                start = _start_time(pid)
                if start is not None and pid not in targets:
                    targets[pid] = start
                    if _stat(pid)[1:2] == [str(os.getpid())]:
                        own_children.add(pid)
            alive = [pid for pid, start in targets.items() if _start_time(pid) == start]
            if not alive:
                break
            if time.monotonic() >= deadline:
                raise RuntimeError(f"{what}: still alive after SIGKILL: {alive}")
            for pid in alive:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.02)
        # A thread group shows Z once its leader exits, but is reapable (and its children passed on to
        # us) only once its last thread has: wait for each orphan to be ours and reap it, unless its
        # parent is none of the dying (a live parent, or PID 1 where we could not be the subreaper).
        orphans = set(targets) - own_children
        while orphans:
            for pid in list(orphans):
                try:
                    if os.waitpid(pid, os.WNOHANG)[0] == pid:
                        orphans.discard(pid)
                except ChildProcessError:
                    parent = _stat(pid)[1:2]
                    if not parent or int(parent[0]) not in targets:
                        orphans.discard(pid)
            if orphans and time.monotonic() >= deadline:
                raise RuntimeError(f"{what}: not reaped: {sorted(orphans)}")
            time.sleep(0.01 if orphans else 0)
    return set(targets)


def _port_free(port: int) -> bool:
    families = [socket.AF_INET] + ([socket.AF_INET6] if socket.has_ipv6 else [])
    for family in families:
        try:
            with socket.socket(family, socket.SOCK_STREAM) as sock:
                sock.bind(("::" if family == socket.AF_INET6 else "0.0.0.0", port))
        except OSError as exc:
            if family == socket.AF_INET6 and exc.errno == 97:  # EAFNOSUPPORT: IPv6 off
                continue
            return False
    return True


def _ipv4_addresses() -> list[tuple[str, ipaddress.IPv4Interface]]:
    """(device, address/prefix) of every IPv4 address in the root namespace."""
    found = []
    for line in ip("-4", "-o", "addr").splitlines():  # "2: eth0    inet 192.0.2.2/24 brd ..."
        words = line.split()
        if "inet" in words:
            found.append((words[1], ipaddress.IPv4Interface(words[words.index("inet") + 1])))
    return found


@dataclass(frozen=True)
class RayPorts:
    """Every port a Ray 2.60 node listens on, chosen rather than left to Ray's defaults (6379, 10001,
    8265, workers 10002-19999), which another Ray on the machine may hold."""

    gcs: int
    node_manager: int
    object_manager: int
    ray_client_server: int
    dashboard: int
    dashboard_agent_listen: int
    dashboard_agent_grpc: int
    metrics_export: int
    runtime_env_agent: int
    autoscaler_metrics: int  # no flag: AUTOSCALER_METRIC_PORT in the environment (44217 by default)
    dashboard_metrics: int  # no flag: DASHBOARD_METRIC_PORT in the environment (44227 by default)
    min_worker: int
    max_worker: int

    @classmethod
    def pick(cls, attempts: int = 50) -> RayPorts:
        """A random block of free ports in PORT_RANGE: the single ones, then WORKER_PORTS for workers
        (and drivers, whose gRPC servers take theirs from the same range)."""
        singles = [f.name for f in fields(cls) if f.name not in ("min_worker", "max_worker")]
        for _ in range(attempts):
            base = random.randrange(PORT_RANGE[0], PORT_RANGE[1] - len(singles) - WORKER_PORTS)
            ports = list(range(base, base + len(singles) + WORKER_PORTS))
            if all(_port_free(port) for port in ports):
                workers = ports[len(singles) :]
                return cls(**dict(zip(singles, ports, strict=False)), min_worker=workers[0], max_worker=workers[-1])
        raise RuntimeError(f"no block of {len(singles) + WORKER_PORTS} free ports in {PORT_RANGE}")

    def env(self) -> dict[str, str]:
        """The two ports Ray reads from the environment: the Prometheus endpoints of the head's
        autoscaler monitor and dashboard process, which start even with the dashboard off."""
        return {
            "AUTOSCALER_METRIC_PORT": str(self.autoscaler_metrics),
            "DASHBOARD_METRIC_PORT": str(self.dashboard_metrics),
        }

    def args(self, head: bool) -> list[str]:
        node = [
            f"--node-manager-port={self.node_manager}",
            f"--object-manager-port={self.object_manager}",
            f"--dashboard-agent-listen-port={self.dashboard_agent_listen}",
            f"--dashboard-agent-grpc-port={self.dashboard_agent_grpc}",
            f"--metrics-export-port={self.metrics_export}",
            f"--runtime-env-agent-port={self.runtime_env_agent}",
            f"--min-worker-port={self.min_worker}",
            f"--max-worker-port={self.max_worker}",
        ]
        if not head:
            return node
        return [
            f"--port={self.gcs}",
            f"--ray-client-server-port={self.ray_client_server}",
            f"--dashboard-port={self.dashboard}",
            *node,
        ]


@dataclass(frozen=True)
class HealthCheck:
    """How fast the GCS declares a silent node dead (Ray's defaults take ~12 s after a SIGKILL here):
    a check every `period_ms`, each failing after `timeout_ms`, dead after `failure_threshold` failures."""

    period_ms: int = 1000
    timeout_ms: int = 1000
    failure_threshold: int = 3

    def env(self) -> dict[str, str]:
        return {
            "RAY_health_check_period_ms": str(self.period_ms),
            "RAY_health_check_timeout_ms": str(self.timeout_ms),
            "RAY_health_check_failure_threshold": str(self.failure_threshold),
            "RAY_health_check_initial_delay_ms": "0",
        }


def _resource_args(
    num_cpus: float, num_gpus: int, resources: Mapping[str, float] | None, memory: int | None
) -> list[str]:
    args = [f"--num-cpus={num_cpus}", f"--num-gpus={num_gpus}", f"--object-store-memory={OBJECT_STORE_BYTES}"]
    if resources:
        args.append(f"--resources={json.dumps(dict(resources))}")
    if memory is not None:
        args.append(f"--memory={memory}")
    return args


# --- the nodes -----------------------------------------------------------------------------------


@dataclass(eq=False)
class RayNode:
    """What the head and the namespace nodes share: a `ray start --block` process and its log."""

    name: str
    ip: str
    temp_dir: Path
    log_path: Path
    process: subprocess.Popen[bytes] | None = None
    node_id: str | None = None  # Ray's NodeID, once `wait_joined` saw it
    started_at: float = 0.0  # time.monotonic() when `ray start` was launched
    down_at: float | None = None  # time.time() of the kill or partition, for `wait_dead`

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return "(no log)"

    def _wait_started(self, timeout: float) -> float:
        """Wait for `ray start` to print that the runtime started; seconds since it was launched."""
        assert self.process is not None
        deadline = time.monotonic() + timeout
        while True:
            with contextlib.suppress(OSError):
                if STARTED_LINE in self.log_path.read_text(errors="replace"):
                    return time.monotonic() - self.started_at
            if self.process.poll() is not None:
                raise RuntimeError(f"ray start on {self.name} exited ({self.process.returncode}):\n{self.log_tail()}")
            if time.monotonic() >= deadline:
                raise TimeoutError(f"ray start on {self.name} did not start in {timeout:.0f} s:\n{self.log_tail()}")
            time.sleep(0.1)


@dataclass(eq=False)
class HeadNode(RayNode):
    """The head, in the root namespace: its processes are the session of its `ray start` (GCS, raylet,
    agents, the head's workers)."""

    def pids(self) -> list[int]:
        return [] if self.process is None else session_pids(self.process)


@dataclass(eq=False)
class NetnsNode(RayNode):
    """A worker node: a network namespace with a veth pair into the cluster's bridge."""

    netns: str = ""
    veth: str = ""  # the end in the root namespace, on the bridge (partition() takes it down)
    veth_peer: str = ""  # the end inside the namespace
    has_ray: bool = True

    @property
    def netns_id(self) -> str:
        """What `os.readlink("/proc/self/ns/net")` says in a process of this namespace: `net:[INODE]`."""
        return f"net:[{os.stat(f'/var/run/netns/{self.netns}').st_ino}]"

    def pids(self) -> list[int]:
        """Every live process in the namespace (`ip netns pids`): the node's Ray processes, its workers,
        whatever `run_in` started there."""
        result = subprocess.run(["ip", "netns", "pids", self.netns], capture_output=True, text=True, timeout=30)
        if result.returncode != 0:
            return []  # the namespace is gone
        return [pid for pid in map(int, result.stdout.split()) if pid_alive(pid)]

    def kill(self, timeout: float = KILL_TIMEOUT_S) -> list[int]:
        """The machine crashes: SIGKILL every process in the namespace until none is left; the pids."""
        if self.down_at is None:
            self.down_at = time.time()
        killed = _kill_until_gone(self.pids, f"namespace {self.netns}", timeout)
        if self.process is not None:
            self.process.wait(timeout)
        return sorted(killed)

    def partition(self) -> None:
        """Cut the node off the network (its veth down): its processes run on, unreachable."""
        if self.down_at is None:
            self.down_at = time.time()
        ip("link", "set", "dev", self.veth, "down")

    def heal(self) -> None:
        """Plug it back in. (Ray does not take back a node it has declared dead: its raylet exits.)"""
        ip("link", "set", "dev", self.veth, "up")
        self.down_at = None


# --- the cluster ---------------------------------------------------------------------------------


@dataclass
class _Created:
    """What close() must undo, recorded as it is made."""

    netns: list[str] = field(default_factory=list)
    links: list[str] = field(default_factory=list)
    processes: list[subprocess.Popen[Any]] = field(default_factory=list)
    logs: list[IO[bytes]] = field(default_factory=list)


NODES_SCRIPT = r"""
import json, sys, time
import ray

want = json.loads(sys.argv[1])
ray.init(address=want["address"], logging_level="ERROR", log_to_driver=False)
deadline = time.monotonic() + want["timeout"]
while True:
    nodes = [
        {"node_id": n["NodeID"], "ip": n["NodeManagerAddress"], "alive": n["Alive"], "resources": n["Resources"]}
        for n in ray.nodes()
    ]
    alive = {n["ip"] for n in nodes if n["alive"]}
    dead = {n["node_id"] for n in nodes if not n["alive"]}
    ok = set(want["alive"]) <= alive and set(want["dead"]) <= dead
    if ok or time.monotonic() >= deadline:
        print(json.dumps({"ok": ok, "seen_at": time.time(), "nodes": nodes}), flush=True)
        break
    time.sleep(0.1)
ray.shutdown()
"""


class NetnsCluster:
    """A bridge with a private /24, a Ray head on its .1 in the root namespace, and worker nodes in
    network namespaces at .2, .3, ...; `close()` (or leaving the `with`) removes all of it."""

    def __init__(
        self,
        workdir: Path,
        *,
        health_check: HealthCheck | None = HealthCheck(),
        log_monitor: bool = True,
        keep_logs: bool = True,
    ) -> None:
        """`workdir` keeps the `ray start` outputs (and, with `keep_logs`, a copy of Ray's own logs
        made at close); Ray's temporary directories go under a short /tmp directory, since Ray puts
        Unix sockets there and their paths must stay under 108 bytes. `health_check=None` keeps
        Ray's defaults; `log_monitor=False` saves a process per node but no longer sends workers'
        output to drivers."""
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.token = secrets.token_hex(3)
        self.health_check = health_check
        self.log_monitor = log_monitor
        self.keep_logs = keep_logs
        self.bridge = f"cirrusbr{self.token}"
        self.head: HeadNode | None = None
        self.nodes: list[NetnsNode] = []
        self.timings: dict[str, float] = {}
        self._created = _Created()
        self._closed = False
        self._temp_root = Path(tempfile.mkdtemp(prefix="cnc", dir="/tmp" if Path("/tmp").is_dir() else None))
        try:
            self.ports = RayPorts.pick()
            self._create_bridge()
        except BaseException:
            self.close()
            raise

    # The network.

    @staticmethod
    def _pick_subnet() -> ipaddress.IPv4Network:
        """A random 10.251.X.0/24 that no address or route of the root namespace overlaps."""
        used = [address.network for _, address in _ipv4_addresses()]
        for line in ip("-4", "route").splitlines():  # "DEST [via GW] dev ...", DEST "default" or a network
            with contextlib.suppress(ValueError):
                used.append(ipaddress.IPv4Network(line.split()[0], strict=False))
        for third in random.sample(range(256), 256):
            candidate = ipaddress.IPv4Network(f"10.251.{third}.0/24")
            if not any(candidate.overlaps(net) for net in used):
                return candidate
        raise RuntimeError("no free /24 in 10.251.0.0/16")

    def _create_bridge(self, attempts: int = 5) -> None:
        """The bridge, with .1 of a free /24; should another cluster have taken the same /24 at the same
        moment (both seeing it free), the later of the two moves to another."""
        ip("link", "add", self.bridge, "type", "bridge")
        self._created.links.append(self.bridge)
        for _ in range(attempts):
            self.subnet = self._pick_subnet()
            self.head_ip = str(self.subnet.network_address + 1)
            ip("addr", "add", f"{self.head_ip}/{self.subnet.prefixlen}", "dev", self.bridge)
            if not any(dev != self.bridge and address in self.subnet for dev, address in _ipv4_addresses()):
                ip("link", "set", "dev", self.bridge, "up")
                return
            ip("addr", "del", f"{self.head_ip}/{self.subnet.prefixlen}", "dev", self.bridge)
        raise RuntimeError(f"no /24 of 10.251.0.0/16 stayed free in {attempts} attempts")

    def _create_netns(self, node: NetnsNode) -> None:
        ip("netns", "add", node.netns)
        self._created.netns.append(node.netns)
        ip("link", "add", node.veth, "type", "veth", "peer", "name", node.veth_peer, "netns", node.netns)
        self._created.links.append(node.veth)
        ip("link", "set", "dev", node.veth, "master", self.bridge, "up")
        ip("-n", node.netns, "addr", "add", f"{node.ip}/{self.subnet.prefixlen}", "dev", node.veth_peer)
        ip("-n", node.netns, "link", "set", "dev", node.veth_peer, "up")
        ip("-n", node.netns, "link", "set", "dev", "lo", "up")

    # Processes.

    @property
    def address(self) -> str:
        """HEAD_IP:PORT of the GCS, for `ray.init(address=...)` or RAY_ADDRESS."""
        return f"{self.head_ip}:{self.ports.gcs}"

    def env(self, **extra: str) -> dict[str, str]:
        """The environment of every process the cluster starts: ours, plus the marker, RAY_ADDRESS
        (once the head runs) and the settings Ray 2.60 needs here."""
        env = dict(os.environ)
        env.pop("RAY_ADDRESS", None)
        env.update(
            {
                MARKER_ENV: self.token,
                "RAY_AUTH_MODE": "disabled",  # no token authentication between the nodes
                # 1 (or unset) on Linux; "0" makes a worker node's `ray start` abort with "Multi-node
                # Ray clusters are not supported on Windows and OSX".
                "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "1",
                "RAY_USAGE_STATS_ENABLED": "0",  # no report to usage-stats.ray.io
                "PYTHONUNBUFFERED": "1",
            }
        )
        env.update(self.ports.env())
        if self.health_check is not None:
            env.update(self.health_check.env())
        if self.head is not None:
            env["RAY_ADDRESS"] = self.address
        env.update(extra)
        return env

    def _in_netns(self, node: NetnsNode | None, argv: Sequence[str]) -> list[str]:
        return list(argv) if node is None else ["ip", "netns", "exec", node.netns, *argv]

    def run_in(self, node: NetnsNode | None, argv: Sequence[str], **popen: Any) -> subprocess.Popen[Any]:
        """Start `argv` inside `node`'s namespace (the root namespace for None) with `env()`, in a
        session of its own, stdin from /dev/null unless `popen` says otherwise; returns once it is in
        the namespace (so `node.pids()` and `node.kill()` see it). Stopped by close()."""
        self._check_open()
        popen.setdefault("env", self.env())
        popen.setdefault("stdin", subprocess.DEVNULL)
        popen.setdefault("start_new_session", True)
        process = subprocess.Popen(self._in_netns(node, argv), **popen)
        self._created.processes.append(process)
        if node is not None:  # return once it is in there (`ip netns exec` switches, then execs)
            netns_id, deadline = node.netns_id, time.monotonic() + 10
            while process.poll() is None and time.monotonic() < deadline:
                with contextlib.suppress(OSError):
                    if os.readlink(f"/proc/{process.pid}/ns/net") == netns_id:
                        break
                time.sleep(0.002)
        return process

    def run_driver(
        self, source: str, *args: str, node: NetnsNode | None = None, timeout: float = 60.0, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        """Run `python -c SOURCE ARGS` (a Ray driver: `ray.init()` connects through RAY_ADDRESS) in
        `node`'s namespace or the root one; its stdout and stderr. With `check`, a failure or a
        timeout raises AssertionError carrying both. (In a node's namespace, a driver that is to be
        on that node calls `ray.init(_node_ip_address=node.ip)`; without it, it joins the head.)"""
        process = self.run_in(
            node, [sys.executable, "-c", source, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        try:
            stdout, stderr = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill_until_gone(lambda: session_pids(process), "a driver")
            stdout, stderr = process.communicate()
            if check:
                raise AssertionError(f"driver timed out after {timeout:.0f} s\n{stdout}\n{stderr}") from None
        result = subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)
        if check and result.returncode != 0:
            raise AssertionError(f"driver failed ({result.returncode}):\n{stdout}\n{stderr[-6000:]}")
        return result

    def _start_ray(self, node: RayNode, netns: NetnsNode | None, args: list[str]) -> None:
        node.temp_dir.mkdir(parents=True)
        log = node.log_path.open("ab")
        self._created.logs.append(log)
        argv = [
            *RAY_START,
            f"--node-ip-address={node.ip}",
            f"--temp-dir={node.temp_dir}",
            f"--include-log-monitor={str(self.log_monitor).lower()}",
            *args,
        ]
        node.started_at = time.monotonic()
        node.process = self.run_in(netns, argv, stdout=log, stderr=subprocess.STDOUT)

    def start_head(
        self,
        *,
        num_cpus: float = 1,
        num_gpus: int = 0,
        resources: Mapping[str, float] | None = None,
        memory: int | None = None,
        timeout: float = START_TIMEOUT_S,
    ) -> HeadNode:
        """`ray start --head` on the bridge address, in the root namespace; returns once it runs."""
        self._check_open()
        if self.head is not None:
            raise RuntimeError("the head is already started")
        head = HeadNode("head", self.head_ip, self._temp_root / "h", self.workdir / "head.log")
        self._start_ray(
            head,
            None,
            [
                "--head",
                "--include-dashboard=false",
                *self.ports.args(head=True),
                *_resource_args(num_cpus, num_gpus, resources, memory),
            ],
        )
        self.head = head
        self.timings["head_start_s"] = head._wait_started(timeout)
        return head

    def add_node(
        self,
        *,
        num_cpus: float = 1,
        num_gpus: int = 0,
        resources: Mapping[str, float] | None = None,
        memory: int | None = None,
        ray: bool = True,
        wait: bool = True,
        timeout: float = START_TIMEOUT_S,
    ) -> NetnsNode:
        """A new namespace at the next address with a Ray node in it joined to the head (`wait`: once
        Ray lists it alive; else call `wait_joined` later, so that several nodes start together).
        `ray=False` makes only the namespace (a bare host for `run_in`). `num_gpus` is what Ray is
        told: no device is needed to stand in for a GPU node."""
        self._check_open()
        index = len(self.nodes) + 1
        if index + 1 >= self.subnet.num_addresses - 1:
            raise RuntimeError("the /24 is full")
        name = f"node{index}"
        node = NetnsNode(
            name=name,
            ip=str(self.subnet.network_address + index + 1),
            temp_dir=self._temp_root / f"n{index}",
            log_path=self.workdir / f"{name}.log",
            netns=f"cirrus-{self.token}-{index}",
            veth=f"cv{self.token}{index}h",  # 15 characters at most (IFNAMSIZ)
            veth_peer=f"cv{self.token}{index}n",
            has_ray=ray,
        )
        self.nodes.append(node)
        self._create_netns(node)
        if not ray:
            return node
        if self.head is None:
            raise RuntimeError("start_head() before add_node(ray=True)")
        args = ["--address", self.address, *self.ports.args(head=False)]
        self._start_ray(node, node, [*args, *_resource_args(num_cpus, num_gpus, resources, memory)])
        if wait:
            self.wait_joined(node, timeout=timeout)
        return node

    # Asking Ray.

    def _poll_nodes(self, alive: Sequence[str] = (), dead: Sequence[str] = (), timeout: float = 0.0) -> dict[str, Any]:
        """One driver that polls `ray.nodes()` until the IPs in `alive` are alive and the node ids in
        `dead` are dead, or `timeout`: {"ok", "seen_at" (time.time()), "nodes": [...]}."""
        want = {"address": self.address, "alive": list(alive), "dead": list(dead), "timeout": timeout}
        result = self.run_driver(NODES_SCRIPT, json.dumps(want), timeout=timeout + 60)
        answer: dict[str, Any] = json.loads(result.stdout.strip().splitlines()[-1])
        return answer

    def ray_nodes(self) -> list[dict[str, Any]]:
        """`ray.nodes()` now (node_id, ip, alive, resources of each), from a short driver."""
        nodes: list[dict[str, Any]] = self._poll_nodes()["nodes"]
        return nodes

    def wait_joined(self, *nodes: NetnsNode, timeout: float = START_TIMEOUT_S) -> None:
        """Wait until Ray lists every one of `nodes` alive; records `node.node_id` and, in `timings`,
        `<name>_start_s` (from launching `ray start` to its "Ray runtime started") and `<name>_join_s`
        (to being listed alive by this wait's driver, whose own start, ~1.5 s, is included)."""
        for node in nodes:
            self.timings[f"{node.name}_start_s"] = node._wait_started(timeout)
        answer = self._poll_nodes(alive=[node.ip for node in nodes], timeout=timeout)
        if not answer["ok"]:
            tails = "\n".join(f"--- {node.name} ---\n{node.log_tail()}" for node in nodes)
            raise TimeoutError(f"nodes not alive after {timeout:.0f} s: {answer['nodes']}\n{tails}")
        now = time.monotonic()
        for node in nodes:
            node.node_id = next(n["node_id"] for n in answer["nodes"] if n["ip"] == node.ip and n["alive"])
            self.timings[f"{node.name}_join_s"] = now - node.started_at

    def wait_dead(self, node: NetnsNode, timeout: float = 60.0) -> float:
        """Wait until Ray lists `node` as dead; seconds from its `kill()` / `partition()` until a driver
        saw it so (polling every 0.1 s), also recorded in `timings` as `<name>_death_s`."""
        if node.node_id is None:
            raise RuntimeError(f"{node.name} never joined (wait_joined)")
        answer = self._poll_nodes(dead=[node.node_id], timeout=timeout)
        if not answer["ok"]:
            raise TimeoutError(f"{node.name} still alive after {timeout:.0f} s: {answer['nodes']}")
        seconds = float(answer["seen_at"]) - (node.down_at or float(answer["seen_at"]))
        self.timings[f"{node.name}_death_s"] = seconds
        return seconds

    # The end.

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("the cluster is closed")

    def marked_pids(self) -> list[int]:
        """Every live process, in any namespace, with this cluster's marker in its environment."""
        return [pid for pid in _all_pids() if pid != os.getpid() and _marked(pid, self.token) and pid_alive(pid)]

    def pids(self) -> list[int]:
        """Every live process of the cluster: those in its namespaces, in the sessions of the processes
        it started (the head's GCS, raylet, agents and workers; drivers; `run_in` in the root
        namespace), and any other carrying its marker."""
        found = set(self.marked_pids())
        for node in self.nodes:
            found.update(node.pids())
        for process in self._created.processes:
            found.update(session_pids(process))
        return sorted(found)

    def close(self) -> list[str]:
        """Stop every process the cluster started (SIGKILL: namespaces first, then the sessions of the
        root namespace's processes, then any process still carrying the marker), copy Ray's logs
        into the workdir (`keep_logs`), delete the namespaces, veth pairs and bridge and the temporary
        directories. Runs once; goes on past errors; returns `leftovers()`."""
        if self._closed:
            return self.leftovers()
        self._closed = True
        errors: list[str] = []

        def attempt(what: str, step: Any, *args: Any) -> None:
            try:
                step(*args)
            except Exception as exc:
                errors.append(f"{what}: {exc}")

        for node in self.nodes:
            attempt(f"kill {node.name}", node.kill)
        for process in self._created.processes:
            attempt("kill a session", _kill_until_gone, functools.partial(session_pids, process), "a session")
        attempt("kill marked processes", _kill_until_gone, self.marked_pids, "marked processes")
        for process in self._created.processes:
            attempt("reap", process.wait, KILL_TIMEOUT_S)
            for pipe in (process.stdin, process.stdout, process.stderr):
                if pipe is not None:
                    pipe.close()
        for log in self._created.logs:
            log.close()
        for netns in reversed(self._created.netns):
            attempt(f"delete namespace {netns}", ip, "netns", "del", netns)
        for link in reversed(self._created.links):
            attempt(f"delete {link}", self._delete_link, link)
        if self.keep_logs:
            self._copy_logs()
        shutil.rmtree(self._temp_root, ignore_errors=True)
        left = self.leftovers()
        if errors:
            left.extend(f"error during close: {error}" for error in errors)
        return left

    @staticmethod
    def _delete_link(name: str) -> None:
        """`ip link del`, where deleting a namespace has not already taken the link (a veth pair goes
        with its namespace, a moment after `ip netns del` returns)."""
        result = subprocess.run(["ip", "link", "del", name], capture_output=True, text=True, timeout=30)
        if result.returncode != 0 and "Cannot find device" not in result.stderr:
            raise RuntimeError(f"`ip link del {name}` failed: {result.stderr.strip()}")

    def _copy_logs(self) -> None:
        for node in [self.head, *self.nodes]:
            if node is None or not node.temp_dir.is_dir():
                continue
            logs = node.temp_dir / "session_latest" / "logs"
            with contextlib.suppress(OSError, shutil.Error):
                shutil.copytree(logs, self.workdir / "ray-logs" / node.name, dirs_exist_ok=True)

    def _links(self) -> set[str]:
        return {line.split(":")[1].strip().partition("@")[0] for line in ip("-o", "link").splitlines()}

    def leftovers(self) -> list[str]:
        """What of this cluster still exists: live marked processes, namespaces, links, temporary
        directories ([] after a clean close)."""
        left = [f"process {pid}: {_cmdline(pid)}" for pid in self.pids()]
        namespaces = {line.split()[0] for line in ip("netns", "list").splitlines() if line.strip()}
        left += [f"namespace {name}" for name in sorted(namespaces) if self.token in name]
        left += [f"link {name}" for name in sorted(self._links()) if self.token in name]
        if self._temp_root.exists():
            left.append(f"directory {self._temp_root}")
        return left

    def __enter__(self) -> NetnsCluster:
        return self

    def __exit__(self, *exc_info: object) -> None:
        left = self.close()
        if left and exc_info[0] is None:
            raise AssertionError("the netns cluster left things behind:\n  " + "\n  ".join(left))


@pytest.fixture(name="netns_cluster")
def netns_cluster_fixture(tmp_path: Path) -> Iterator[NetnsCluster]:
    """A `NetnsCluster` with no head yet (skipped where one cannot run), removed after the test."""
    require()
    with NetnsCluster(tmp_path / "netns-cluster") as cluster:
        yield cluster
