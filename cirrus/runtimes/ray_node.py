"""What runs on each node of a Ray cluster for the Ray runtime (`cirrus/runtimes/ray.py`).

`NodeAgent` is one Ray actor per node, pinned there: it runs that node's replicas (and the template
processes they fork from) with the ordinary `LocalRuntime`, keeps the revision snapshots it was sent
unpacked on the node's disk, and hands the runtime's events (ready, exited) to the daemon, which
long-polls `next_events`. Its replicas are its children: if the agent dies (its node did, or the
daemon that owns it went), they notice their parent gone and exit, so nothing is orphaned.

`Holder` is one small actor per replica that exists only to hold the replica's resources in Ray's
accounting (`num_cpus`, `num_gpus`, `memory`, custom resources): Ray places it, which places the
replica, and sets the devices it may use (`CUDA_VISIBLE_DEVICES` and the like), which the replica
inherits. The daemon kills it when the replica exits, which frees the resources.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
from pathlib import Path
from typing import Any

import msgspec

from cirrus.logs import read_all_new, read_tails
from cirrus.models.cache import ModelCache
from cirrus.runtimes.base import ReplicaExit
from cirrus.runtimes.local import LocalRuntime
from cirrus.snapshots import SnapshotStore
from cirrus.wire import ReplicaLaunch, ReplicaReady, decode_launch

# Environment variables through which Ray tells an actor which accelerators it holds.
DEVICE_ENV = (
    "CUDA_VISIBLE_DEVICES",
    "HIP_VISIBLE_DEVICES",
    "ROCR_VISIBLE_DEVICES",
    "NEURON_RT_VISIBLE_CORES",
    "TPU_VISIBLE_CHIPS",
    "HABANA_VISIBLE_MODULES",
    "ONEAPI_DEVICE_SELECTOR",
)

LOG_ROTATE_EVERY_S = 60.0
Event = tuple[str, str, Any]  # ("ready", replica id, ReplicaReady) or ("exited", replica id, ReplicaExit)


class Holder:
    """Holds one replica's resources on the node Ray chose; says where that is and what it got."""

    def where(self) -> dict[str, Any]:
        import ray

        context = ray.get_runtime_context()
        return {
            "node_id": context.get_node_id(),
            "node_ip": ray.util.get_node_ip_address(),
            # No GPU held: none visible (Ray leaves the variable unset then, which would show them all).
            "device_env": {"CUDA_VISIBLE_DEVICES": "", **{n: os.environ[n] for n in DEVICE_ENV if n in os.environ}},
            "accelerators": {kind: ",".join(ids) for kind, ids in context.get_accelerator_ids().items() if ids},
            "python": sys.executable,  # its runtime_env's interpreter, where the API has its own environment
        }


class NodeAgent:
    """The Ray runtime's hands on one node (an async Ray actor: its methods run on one event loop)."""

    def __init__(
        self, root: str, python: str | None, log_max_bytes: int, storage_options: dict[str, Any] | None = None
    ) -> None:
        import ray

        # A directory of this node's own (nodes sharing a filesystem must not share snapshots or logs).
        self.root = Path(root) / ray.get_runtime_context().get_node_id()[:16]
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.logs_dir = self.root / "logs"
        self.runtime = LocalRuntime(self.logs_dir, python=python or sys.executable, log_max_bytes=log_max_bytes)
        self.snapshots = SnapshotStore(self.root / "snapshots")
        self.storage_options = storage_options  # how this node reaches model sources (an S3 endpoint)
        self._models: ModelCache | None = None
        self._rotating: asyncio.Task[None] | None = None
        self._events: list[Event] = []
        self._wake: asyncio.Event | None = None
        self.runtime.subscribe(self)

    # --- the LocalRuntime's events, queued for the daemon ------------------------------------
    def replica_ready(self, replica_id: str, report: ReplicaReady) -> None:
        self._push(("ready", replica_id, report))

    def replica_exited(self, replica_id: str, exit: ReplicaExit) -> None:
        self._push(("exited", replica_id, exit))

    def _push(self, event: Event) -> None:
        self._events.append(event)
        if self._wake is not None:
            self._wake.set()

    async def next_events(self, timeout_s: float = 30.0) -> list[Event]:
        """The events since the last call, waiting up to `timeout_s` for one (empty: none came)."""
        if not self._events:
            self._wake = self._wake or asyncio.Event()
            self._wake.clear()
            try:
                async with asyncio.timeout(timeout_s):
                    await self._wake.wait()
            except TimeoutError:
                pass
        events, self._events = self._events, []
        return events

    # --- code and replicas -------------------------------------------------------------------
    async def snapshot(self, digest: str, data: list[Any] | None) -> str | None:
        """Where revision snapshot `digest` is unpacked on this node; None when it is not here and
        `data` (a one-item list holding the archive's object ref, so Ray does not fetch it unasked)
        is None: the daemon sends it then."""
        if not self.snapshots.has(digest):
            if data is None:
                return None
            archive: bytes = await data[0]
            stored = await asyncio.to_thread(self.snapshots.put, archive)
            if stored.digest != digest:
                raise ValueError(f"the snapshot sent as {digest} is {stored.digest}")
        return str(await asyncio.to_thread(self.snapshots.unpacked, digest))

    async def prepare(self, launch: str, env: dict[str, str]) -> None:
        await self.runtime.prepare(decode_launch(launch), env)

    async def release(self, api: str, revision: int) -> None:
        await self.runtime.release(api, revision)

    async def start(self, launch: str, env: dict[str, str]) -> int | None:
        if self._rotating is None:
            self._rotating = asyncio.get_running_loop().create_task(self._rotate_logs())
        return await self.runtime.start(await self._with_models(decode_launch(launch)), env)

    async def _rotate_logs(self) -> None:
        """Keep this node's replica and template logs bounded, as the daemon does on one machine."""
        while True:
            await asyncio.sleep(LOG_ROTATE_EVERY_S)
            with contextlib.suppress(Exception):
                await self.runtime.rotate_logs()

    async def _with_models(self, launch: ReplicaLaunch) -> ReplicaLaunch:
        """The launch with its URL models fetched into this node's cache (once per node: replicas of
        the node share the files, memory-mapped); models given as paths must exist on the node."""
        if not launch.model_urls:
            return launch
        if self._models is None:
            self._models = ModelCache(self.root / "models", storage_options=self.storage_options)
        models = dict(launch.models)
        for name, url in launch.model_urls.items():
            fetched = await asyncio.to_thread(self._models.fetch, url, launch.model_versions.get(name), name=name)
            models[name] = str(fetched)
        return msgspec.structs.replace(launch, models=models)

    async def stop(self, replica_id: str, grace_s: float) -> None:
        await self.runtime.stop(replica_id, grace_s)

    async def close(self) -> None:
        await self.runtime.close()

    # --- logs ----------------------------------------------------------------------------------
    async def tail(self, api: str | None, replica_id: str | None, lines: int, follow: bool) -> tuple[list[bytes], Any]:
        """The newest `lines` lines (as `LocalRuntime.logs`), and where a follower goes on from."""
        offsets: dict[Path, int] = {}
        chunks = await asyncio.to_thread(read_tails, self.logs_dir, api, replica_id, lines, offsets if follow else None)
        return chunks[-lines:] if lines > 0 else [], offsets

    async def more_logs(self, api: str | None, replica_id: str | None, offsets: Any) -> tuple[list[bytes], Any]:
        """Lines written since `offsets` (from `tail` or the last call), and the offsets after them."""
        chunks = await asyncio.to_thread(read_all_new, self.logs_dir, api, replica_id, offsets)
        return chunks, offsets

    async def has_logs(self, api: str) -> bool:
        return self.runtime.has_logs(api)
