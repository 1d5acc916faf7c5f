"""The Ray runtime: replicas on the nodes of a Ray cluster (`cirrus up --runtime ray`).

The daemon is a Ray driver. For each replica it creates a `Holder` actor with the replica's
`compute` as Ray resources; Ray places it on a node with room (or keeps it waiting) and sets the
devices it may use. The `NodeAgent` of that node (one per node, created on first use) then starts
the replica there with the local runtime: from a template of its revision when the node has one,
from the revision's snapshot, which the agent unpacks on the node (sent once per node through
Ray's object store). Replicas listen on their node's address; the gateway connects to them over TCP
with the same authenticated frames as on one machine. An agent's events come back through a
long poll; an agent that dies (its node did) takes its replicas with it, and they are reported lost.

Only this module and `ray_node.py` import ray, and only when this runtime is chosen.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray
from ray.autoscaler.sdk import request_resources
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from cirrus.runtimes.base import Placement, ReplicaExit, Reservation, RuntimeEvents
from cirrus.runtimes.placement import Unplaceable
from cirrus.runtimes.ray_node import Holder, NodeAgent
from cirrus.snapshots import SnapshotStore
from cirrus.spec import ComputeSpec
from cirrus.wire import ReplicaLaunch, ReplicaReady, decode_launch, encode_launch

log = logging.getLogger("cirrus.runtime.ray")

NODES_TTL_S = 5.0  # how long the cluster's node list is reused for feasibility checks
AGENT_POLL_S = 30.0  # an agent's long poll for events returns empty after this
AGENT_IDLE_S = 60.0  # a node without replicas keeps its agent (and warm templates) this long


class RayRuntimeError(ValueError):
    """The cluster cannot be used as asked (no cluster at the address, a store nodes cannot reach)."""


@dataclass
class _Replica:
    api: str
    holder: Any  # its Holder actor
    shape: dict[str, float] = field(default_factory=dict)  # the resources it holds (or waits for)
    waiting: str | None = None  # why Ray has not placed it yet
    node_id: str | None = None
    node_ip: str | None = None
    agent: Any = None  # the NodeAgent it runs under
    devices: dict[str, str] = field(default_factory=dict)
    address: str | None = None
    exited: bool = False


def ray_options(compute: ComputeSpec) -> dict[str, Any]:
    """The Ray actor options that hold a replica's `compute`."""
    resources = {name: float(count) for name, count in compute.accelerators.items()}
    options: dict[str, Any] = {"num_cpus": float(compute.cpu), "num_gpus": float(compute.gpu), "resources": resources}
    if compute.mem:
        options["memory"] = compute.mem
    return options


def runtime_env(pins: list[str]) -> dict[str, Any]:
    """The Ray `runtime_env` that builds an API's own environment (its resolved pins) on each node, with
    Ray's uv support; the actor's interpreter there is the replica's."""
    return {"uv": {"packages": list(pins)}}


def env_pins(python: str | None) -> list[str] | None:
    """The resolved pins of the environment whose interpreter is `python` (None: the API has none).
    The daemon resolved and built it (cirrus/envs.py): `requirements.txt` lies beside `bin/`."""
    if python is None:
        return None
    text = (Path(python).parent.parent / "requirements.txt").read_text()
    return [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def bundle(options: dict[str, Any]) -> dict[str, float]:
    """The resource shape of a replica's Ray options, as Ray's autoscaler takes it (zeros left out)."""
    shape = {"CPU": options.get("num_cpus", 0.0), "GPU": options.get("num_gpus", 0.0), **options["resources"]}
    if "memory" in options:
        shape["memory"] = float(options["memory"])
    return {name: float(amount) for name, amount in shape.items() if amount}


def infeasible(options: dict[str, Any], nodes: list[dict[str, Any]]) -> str | None:
    """Why no alive node could ever hold `options` (None: one could), from `ray.nodes()`."""
    wanted = bundle(options)
    alive = [node.get("Resources", {}) for node in nodes if node.get("Alive")]
    if any(all(have.get(name, 0.0) >= amount for name, amount in wanted.items()) for have in alive):
        return None
    need = ", ".join(f"{name} {amount:g}" for name, amount in wanted.items())
    largest = {name: max((have.get(name, 0.0) for have in alive), default=0.0) for name in wanted}
    most = ", ".join(f"{name} {amount:g}" for name, amount in largest.items())
    return f"never fits: no node of the Ray cluster has {need} (the most any node has: {most})"


class RayRuntime:
    """Replicas as processes on the nodes of a Ray cluster (see the module's docstring)."""

    def __init__(
        self,
        address: str,
        snapshots: SnapshotStore,
        node_root: str | None = None,
        python: str | None = None,
        log_max_bytes: int = 16 << 20,
        namespace: str | None = None,
        storage_options: dict[str, Any] | None = None,
        agent_idle_s: float = AGENT_IDLE_S,
        replica_env: dict[str, str] | None = None,
    ) -> None:
        """`storage_options`: how nodes reach model sources (fsspec options by protocol, e.g. an S3 endpoint)."""
        self.snapshots = snapshots
        key = hashlib.sha256(str(snapshots.root.resolve()).encode()).hexdigest()[:12]
        self.node_root = node_root or f"/tmp/cirrus-ray-{key}"  # on each node: snapshots, logs
        self.python = python
        self.log_max_bytes = log_max_bytes
        self.storage_options = storage_options
        self.replica_env = dict(replica_env or {})  # the daemon's settings replicas on other nodes need too
        self.agent_idle_s = agent_idle_s  # a node's agent (and its warm templates) ends after this without replicas
        self._end_agent_task: asyncio.Task[None] | None = None
        try:
            ray.init(
                address=address,
                namespace=namespace or f"cirrus-{key}",
                log_to_driver=False,
                logging_level=logging.WARNING,
                configure_logging=False,
            )
        except Exception as exc:
            raise RayRuntimeError(f"cannot connect to the Ray cluster at {address}: {exc}") from exc
        self._events: RuntimeEvents | None = None
        self._replicas: dict[str, _Replica] = {}
        self._reserved: dict[str, dict[str, Any]] = {}  # replica id -> Ray options, until started
        self._agents: dict[str, Any] = {}  # node id -> its NodeAgent
        self._agent_tasks: dict[str, asyncio.Task[None]] = {}
        self._snapshot_refs: dict[str, Any] = {}  # digest -> the archive in the object store
        self._prepared: dict[tuple[str, int], tuple[str, dict[str, str]]] = {}  # (api, revision) -> launch, env
        self._node_prepared: set[tuple[str, str, int]] = set()  # (node id, api, revision)
        self._nodes: tuple[float, list[dict[str, Any]]] = (0.0, [])
        self._asked: list[tuple[tuple[str, float], ...]] = []  # the shapes last asked of Ray's autoscaler
        self._asking: asyncio.Task[None] | None = None
        self._holder = ray.remote(Holder)
        self._agent_class = ray.remote(NodeAgent)

    def subscribe(self, events: RuntimeEvents) -> None:
        self._events = events

    def model_cache_dir(self) -> Path | None:
        return None  # each node keeps its own

    def replica_store_url(self, store_url: str) -> str:
        if not store_url.startswith(("redis://", "rediss://")):
            raise RayRuntimeError(
                f"replicas on other nodes cannot reach the queue store {store_url}: on Ray, async APIs and "
                "batch jobs need a Redis store every node reaches (CIRRUS_STORE=redis://HOST:PORT/0)"
            )
        return store_url

    # --- placement ----------------------------------------------------------------------------
    def _cluster_nodes(self) -> list[dict[str, Any]]:
        at, nodes = self._nodes
        if time.monotonic() - at > NODES_TTL_S:
            nodes = ray.nodes()
            self._nodes = (time.monotonic(), nodes)
        return nodes

    def reserve(self, replica_id: str, compute: ComputeSpec) -> Reservation | Unplaceable:
        """Always taken: Ray places the replica when a node has room; one that no node of the cluster
        could hold now waits, saying so, for a node to be added (by Ray's autoscaler, where the
        cluster has one: the waiting replica is what asks it)."""
        options = ray_options(compute)
        self._reserved[replica_id] = options
        return Reservation(detail=options)

    def unreserve(self, replica_id: str) -> None:
        self._reserved.pop(replica_id, None)

    def placement(self, replica_id: str) -> Placement | None:
        replica = self._replicas.get(replica_id)
        if replica is None:
            return None
        return Placement(node=replica.node_ip, devices=replica.devices, waiting=replica.waiting)

    # --- templates ------------------------------------------------------------------------------
    async def prepare(self, launch: ReplicaLaunch, env: dict[str, str]) -> None:
        """Remembered: each node starts a template of the revision when its first replica lands there."""
        self._prepared[(launch.api, launch.revision)] = (encode_launch(launch), env)

    async def release(self, api: str, revision: int) -> None:
        self._prepared.pop((api, revision), None)
        for node_id, agent in list(self._agents.items()):
            if (node_id, api, revision) in self._node_prepared:
                self._node_prepared.discard((node_id, api, revision))
                with contextlib.suppress(Exception):
                    await agent.release.remote(api, revision)

    # --- replicas -------------------------------------------------------------------------------
    async def start(self, launch: ReplicaLaunch, env: dict[str, str]) -> int | None:
        options = self._reserved.pop(launch.replica_id, None) or {"num_cpus": 1.0, "resources": {}}
        pins = env_pins(launch.python)
        extra = {} if pins is None else {"runtime_env": runtime_env(pins)}
        holder: Any = self._holder.options(**options, **extra).remote()
        too_big = infeasible(options, self._cluster_nodes())
        waiting = (
            "waiting for a node with room"
            if too_big is None
            else f"waiting for a node to be added: {too_big.removeprefix('never fits: ')}"
        ) + " (Ray's autoscaler, where the cluster has one, is asked for it)"
        replica = _Replica(api=launch.api, holder=holder, shape=bundle(options), waiting=waiting)
        self._replicas[launch.replica_id] = replica
        self._ask_for_capacity()
        try:
            where = await holder.where.remote()
            replica.waiting = None
            replica.node_id, replica.node_ip = where["node_id"], where["node_ip"]
            replica.devices = {k.lower(): v for k, v in where["accelerators"].items()}
            replica.agent = agent = await self._agent(where["node_id"])
            project_dir = await self._ship(agent, launch)
            node_python = where.get("python") if pins is not None else None  # the runtime_env's, there
            await self._prepare_on(where["node_id"], agent, launch, project_dir, node_python)
            placed = _on_node(launch, project_dir, where["node_ip"], node_python)
            env = {**self.replica_env, **env, **where["device_env"]}
            pid: int | None = await agent.start.remote(encode_launch(placed), env)
        except BaseException:
            self._forget(launch.replica_id)
            raise
        return pid

    async def _ship(self, agent: Any, launch: ReplicaLaunch) -> str:
        """The revision's code on the agent's node: its unpacked snapshot (sent there if missing)."""
        digest = launch.snapshot
        if digest is None:
            return launch.project_dir  # no snapshot: a path every node must see (tests, shared filesystems)
        path: str | None = await agent.snapshot.remote(digest, None)
        if path is None:
            ref = self._snapshot_refs.get(digest)
            if ref is None:
                data = await asyncio.to_thread(self.snapshots.read, digest)
                ref = self._snapshot_refs[digest] = ray.put(data)
            path = await agent.snapshot.remote(digest, [ref])
        assert path is not None
        return path

    async def _prepare_on(
        self, node_id: str, agent: Any, launch: ReplicaLaunch, project_dir: str, python: str | None = None
    ) -> None:
        key = (node_id, launch.api, launch.revision)
        prepared = self._prepared.get((launch.api, launch.revision))
        if prepared is None or key in self._node_prepared:
            return
        self._node_prepared.add(key)
        template, env = prepared
        on_node = _on_node(decode_launch(template), project_dir, None, python)
        with contextlib.suppress(Exception):  # a node without a template still starts replicas, slower
            await agent.prepare.remote(encode_launch(on_node), env)

    async def _agent(self, node_id: str) -> Any:
        agent = self._agents.get(node_id)
        if agent is None:
            strategy = NodeAffinitySchedulingStrategy(node_id=node_id, soft=False)
            agent = self._agent_class.options(
                num_cpus=0, scheduling_strategy=strategy, max_concurrency=1000, max_restarts=0
            ).remote(self.node_root, self.python, self.log_max_bytes, self.storage_options)
            self._agents[node_id] = agent
            self._agent_tasks[node_id] = asyncio.get_running_loop().create_task(self._follow(node_id, agent))
        return agent

    async def _follow(self, node_id: str, agent: Any) -> None:
        """Relay one agent's events; when it dies, its node's replicas are lost."""
        try:
            while True:
                for kind, replica_id, detail in await agent.next_events.remote(AGENT_POLL_S):
                    self._relay(kind, replica_id, detail)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            why = f"its node ({node_id[:12]}) or the node's Cirrus agent died: {type(exc).__name__}"
            log.warning("the Cirrus agent on node %s is gone: %s", node_id[:12], exc)
            self._agents.pop(node_id, None)
            self._agent_tasks.pop(node_id, None)
            self._node_prepared = {key for key in self._node_prepared if key[0] != node_id}
            for replica_id, replica in list(self._replicas.items()):
                if replica.node_id == node_id:
                    self._relay("exited", replica_id, ReplicaExit(lost=why))

    def _relay(self, kind: str, replica_id: str, detail: Any) -> None:
        replica = self._replicas.get(replica_id)
        if replica is None or self._events is None:
            return
        if kind == "ready" and isinstance(detail, ReplicaReady):
            replica.address = detail.address
            self._events.replica_ready(replica_id, detail)
        elif kind == "exited" and isinstance(detail, ReplicaExit):
            self._forget(replica_id)
            self._events.replica_exited(replica_id, detail)

    def _forget(self, replica_id: str) -> None:
        replica = self._replicas.pop(replica_id, None)
        if replica is not None:
            with contextlib.suppress(Exception):
                ray.kill(replica.holder)  # its resources go back to Ray
            self._ask_for_capacity()
            node_id = replica.node_id
            if node_id is not None and node_id in self._agents and not self._runs_on(node_id):
                asyncio.get_running_loop().call_later(self.agent_idle_s, self._release_idle_node, node_id)

    def _runs_on(self, node_id: str) -> bool:
        return any(r.node_id == node_id for r in self._replicas.values())

    def _release_idle_node(self, node_id: str) -> None:
        """A node that ran no replica for `agent_idle_s`: end its agent (and the templates it keeps
        warm), which would otherwise keep Ray from ever seeing the node idle, so that an autoscaling
        cluster can let it go. The next replica there starts a new agent (slower: no template)."""
        if self._runs_on(node_id):
            return
        agent = self._agents.pop(node_id, None)
        task = self._agent_tasks.pop(node_id, None)
        if task is not None:
            task.cancel()
        self._node_prepared = {key for key in self._node_prepared if key[0] != node_id}
        if agent is not None:
            log.info("node %s ran no replica for %gs: its Cirrus agent ends", node_id[:12], self.agent_idle_s)
            self._end_agent_task = asyncio.get_running_loop().create_task(self._end_agent(agent))

    async def _end_agent(self, agent: Any) -> None:
        with contextlib.suppress(Exception):
            await agent.close.remote()
        with contextlib.suppress(Exception):
            ray.kill(agent)

    def _ask_for_capacity(self) -> None:
        """Tell Ray's autoscaler the shapes of every replica there is (running or waiting), so that a
        cluster that can add nodes adds what waiting replicas need, and lets idle nodes go when
        replicas go (none at all: the request is withdrawn). A no-op on a cluster without one."""
        shapes = sorted((tuple(sorted(r.shape.items())) for r in self._replicas.values() if r.shape), key=str)
        if shapes == self._asked:
            return
        self._asked = shapes
        if self._asking is None or self._asking.done():
            self._asking = asyncio.get_running_loop().create_task(self._send_capacity_request())

    async def _send_capacity_request(self) -> None:
        sent: list[tuple[tuple[str, float], ...]] | None = None
        while sent != self._asked:
            sent = list(self._asked)
            try:
                await asyncio.to_thread(request_resources, bundles=[dict(shape) for shape in sent])
            except Exception as exc:
                log.warning("could not ask Ray's autoscaler for capacity: %s", exc)
                return

    async def stop(self, replica_id: str, grace_s: float) -> None:
        replica = self._replicas.get(replica_id)
        if replica is None:
            return
        if replica.agent is None:  # not placed yet: nothing runs
            self._forget(replica_id)
            return
        try:
            await replica.agent.stop.remote(replica_id, grace_s)
        except Exception as exc:  # the agent is gone: its exit comes through _follow
            log.info("stopping replica %s: its node's agent is gone (%s)", replica_id, exc)

    def address(self, replica_id: str) -> str | None:
        replica = self._replicas.get(replica_id)
        return None if replica is None else replica.address

    # --- logs -------------------------------------------------------------------------------------
    async def _logs(self, api: str | None, replica_id: str | None, lines: int, follow: bool) -> AsyncIterator[bytes]:
        agents = list(self._agents.values())
        offsets: list[Any] = []
        for agent in agents:
            try:
                chunks, where = await agent.tail.remote(api, replica_id, lines, follow)
            except Exception:
                chunks, where = [], {}
            offsets.append(where)
            for chunk in chunks:
                yield chunk
        while follow:
            await asyncio.sleep(0.5)
            for index, agent in enumerate(agents):
                try:
                    chunks, offsets[index] = await agent.more_logs.remote(api, replica_id, offsets[index])
                except Exception:
                    continue
                for chunk in chunks:
                    yield chunk

    def logs(self, api: str | None, replica_id: str | None, lines: int, follow: bool) -> AsyncIterator[bytes]:
        return self._logs(api, replica_id, lines, follow)

    def has_logs(self, api: str) -> bool:
        return bool(self._agents)  # (each node knows; the admin API asks this only to tell 404 from empty)

    def log_path(self, api: str, replica_id: str) -> Path:
        return Path(self.node_root) / "logs" / api / f"{replica_id}.log"  # on the replica's node

    async def close(self) -> None:
        """Stop every replica (their agents stop them and the templates), then leave the cluster."""
        for task in self._agent_tasks.values():
            task.cancel()
        for agent in list(self._agents.values()):
            with contextlib.suppress(Exception):
                await agent.close.remote()
            with contextlib.suppress(Exception):
                ray.kill(agent)
        self._agents.clear()
        for replica_id in list(self._replicas):
            self._forget(replica_id)
        if self._asking is not None:  # the autoscaler's request withdrawn before leaving (it outlives drivers)
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._asking, timeout=5.0)
        with contextlib.suppress(Exception):
            ray.shutdown()


def _on_node(launch: ReplicaLaunch, project_dir: str, node_ip: str | None, python: str | None = None) -> ReplicaLaunch:
    """The launch as it runs on a node: its code where the node unpacked it, listening on the node's
    address (which the gateway reaches) instead of loopback, with the node's interpreter of its
    environment (`python`: the runtime_env's; the daemon's path means nothing there)."""
    import msgspec

    changes: dict[str, Any] = {"project_dir": project_dir, "python": python}
    if node_ip is not None:
        changes["listen"] = f"tcp:{node_ip}:0"
    return msgspec.structs.replace(launch, **changes)
