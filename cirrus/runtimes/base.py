"""The runtime interface the controller is written against (see cirrus/testing for a fake)."""

from __future__ import annotations

import signal
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from cirrus.wire import ReplicaLaunch, ReplicaReady


@dataclass(frozen=True)
class ReplicaExit:
    """How a replica process ended."""

    code: int | None = None  # exit status, when it exited
    signal: int | None = None  # the signal that killed it
    error: str | None = None  # the replica's own ReplicaFailed message (load failures)
    log_tail: list[str] = field(default_factory=list)

    def describe(self) -> str:
        if self.error:
            head = f"failed to load the predictor: {self.error}"
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

    async def start(self, launch: ReplicaLaunch, env: dict[str, str]) -> int | None:
        """Start a replica; returns its pid if it has one. Readiness and exit come as events."""
        ...

    async def stop(self, replica_id: str, grace_s: float) -> None:
        """Ask a replica to finish and exit (SIGTERM); kill it after `grace_s`."""
        ...

    def log_path(self, api: str, replica_id: str) -> Path: ...

    async def close(self) -> None:
        """Stop every replica, and whatever `prepare` started."""
        ...
