"""The runtime interface the controller is written against (see cirrus/testing for a fake)."""

from __future__ import annotations

import signal
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from cirrus.runtimes.placement import Unplaceable
from cirrus.spec import ComputeSpec
from cirrus.wire import ReplicaLaunch, ReplicaReady

__all__ = ["Placement", "ReplicaExit", "Reservation", "Runtime", "RuntimeEvents", "Unplaceable"]


@dataclass(frozen=True)
class Reservation:
    """What a runtime set aside for one replica (`Runtime.reserve`), held until it exits.

    `devices` is what `cirrus get` shows, e.g. {"gpu": "0,1"} or {"gpu": "0:0.5"} (a share of
    device 0); empty when it holds none. `detail` is the runtime's own record (the local runtime's
    `Assignment`); nothing outside the runtime reads it.
    """

    devices: dict[str, str] = field(default_factory=dict)
    detail: object = None


@dataclass(frozen=True)
class Placement:
    """Where a replica runs (`node`), the devices it was given, or why it is not placed yet (`waiting`)."""

    node: str | None = None
    devices: dict[str, str] = field(default_factory=dict)
    waiting: str | None = None


@dataclass(frozen=True)
class ReplicaExit:
    """How a replica process ended."""

    code: int | None = None  # exit status, when it exited
    signal: int | None = None  # the signal that killed it
    error: str | None = None  # the replica's own ReplicaFailed message (load failures)
    stage: str = "load the predictor"  # what failed, with `error` (ReplicaFailed.stage)
    log_tail: list[str] = field(default_factory=list)
    lost: str | None = None  # it went with its node, or the runtime lost track of it: why

    def describe(self) -> str:
        if self.lost:
            return f"lost: {self.lost}"
        if self.error:
            head = f"failed to {self.stage}: {self.error}"
        elif self.signal is not None:
            try:
                name = signal.Signals(self.signal).name
            except ValueError:
                name = str(self.signal)
            head = f"killed by signal {self.signal} ({name})"
        elif self.code is None:
            head = "exited (exit status unknown: the template it was forked from was gone)"
        else:
            head = f"exited with code {self.code}"
        if self.log_tail and not self.error:
            head += "; last log lines:\n" + "\n".join(self.log_tail)
        return head


class RuntimeEvents(Protocol):
    def replica_ready(self, replica_id: str, report: ReplicaReady) -> None: ...

    def replica_exited(self, replica_id: str, exit: ReplicaExit) -> None: ...


class Runtime(Protocol):
    def subscribe(self, events: RuntimeEvents) -> None: ...

    async def prepare(self, launch: ReplicaLaunch, env: dict[str, str]) -> None:
        """Get ready to start replicas of `launch.api` at `launch.revision` fast (the local runtime
        starts a template process that imports the predictor module once and forks replicas).
        Idempotent; never raises: when preparing fails, `start` still works, only slower."""
        ...

    async def release(self, api: str, revision: int) -> None:
        """Undo `prepare` for a retired revision; replicas already started keep running until stopped."""
        ...

    def reserve(self, replica_id: str, compute: ComputeSpec) -> Reservation | Unplaceable:
        """Set aside `compute` for a replica about to start, or say why it does not fit now
        (`Unplaceable.never_fits`: nor ever, on this node). The reservation is held until the
        replica started with that id stops or exits, or `unreserve`; reserving again for an id
        that is not running replaces its reservation."""
        ...

    def unreserve(self, replica_id: str) -> None:
        """Drop the reservation of a replica that was never started; no effect on a running one
        (its reservation goes when it exits) or on an id holding none."""
        ...

    async def start(self, launch: ReplicaLaunch, env: dict[str, str]) -> int | None:
        """Start a replica; returns its pid if it has one. Readiness and exit come as events.
        The replica gets `env` plus the device environment of its reservation (CUDA_VISIBLE_DEVICES
        and the like; none without one). A start that raises frees the reservation."""
        ...

    async def stop(self, replica_id: str, grace_s: float) -> None:
        """Ask a replica to finish and exit (SIGTERM); kill it after `grace_s`. Frees its reservation."""
        ...

    def address(self, replica_id: str) -> str | None:
        """Where a running replica listens (its `ReplicaReady.address`); None before it is ready or after it exits."""
        ...

    def placement(self, replica_id: str) -> Placement | None:
        """Where a started replica runs and what it holds, or why it waits to be placed; None: unknown."""
        ...

    def logs(self, api: str | None, replica_id: str | None, lines: int, follow: bool) -> AsyncIterator[bytes]:
        """The newest `lines` log lines of one replica of `api` (every replica of it when
        `replica_id` is None; of every API when `api` is None too), oldest first, each as
        b"[<replica id>] <text>\\n"; then, when `follow`, each new line as it is written, until
        the caller stops iterating."""
        ...

    def has_logs(self, api: str) -> bool:
        """Whether any replica of `api` has left logs (an API deleted since still has)."""
        ...

    def model_cache_dir(self) -> Path | None:
        """Where this node's model cache lives; None where the runtime has none."""
        ...

    def replica_store_url(self, store_url: str) -> str:
        """How this runtime's replicas reach the queue store the daemon opened at `store_url` (async
        requests, job batches). Local replicas share the daemon's node, so its SQLite file or Redis URL
        as it is; a runtime whose replicas run on other nodes must refuse a file only this node has."""
        ...

    def log_path(self, api: str, replica_id: str) -> Path: ...

    async def close(self) -> None:
        """Stop every replica, and whatever `prepare` started."""
        ...
