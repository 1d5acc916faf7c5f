"""In-memory stand-ins for the runtime and the gateway's control side (no processes, no sockets).

`FakeRuntime` implements `cirrus.runtimes.base.Runtime`; a test drives each replica's life with
`make_ready`, `crash` and `fail_load`, which deliver the same events a real runtime would.
`FakeGateway` implements `cirrus.control.controller.GatewayControl` and records every call.
"""

from __future__ import annotations

import signal as signals
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cirrus.runtimes.base import ReplicaExit, RuntimeEvents
from cirrus.spec import ConcurrencySpec
from cirrus.wire import ReplicaLaunch, ReplicaReady

if TYPE_CHECKING:
    from cirrus.control.controller import GatewayControl
    from cirrus.runtimes.base import Runtime

FIRST_FAKE_PID = 10_000


@dataclass
class FakeReplica:
    """One replica the fake runtime considers running."""

    launch: ReplicaLaunch
    env: dict[str, str]
    pid: int
    ready: bool = False


class FakeRuntime:
    """A `Runtime` without processes: records launches and stops; tests decide what happens next."""

    def __init__(self, logs_dir: Path | str = "fake-logs") -> None:
        self.logs_dir = Path(logs_dir)
        self.launches: list[ReplicaLaunch] = []  # every start, in order (a restart appears again)
        self.envs: dict[str, dict[str, str]] = {}  # replica id -> environment of its latest start
        self.stops: list[str] = []  # replica ids passed to stop(), in order
        self.start_error: Exception | None = None  # raised by the next start() calls while set
        self.prepared: list[tuple[str, int]] = []  # (API, revision) of every prepare(), in order
        self.released: list[tuple[str, int]] = []  # (API, revision) of every release(), in order
        self.templates: set[tuple[str, int]] = set()  # prepared and not yet released
        self.closed = False
        self._events: RuntimeEvents | None = None
        self._live: dict[str, FakeReplica] = {}
        self._next_pid = FIRST_FAKE_PID

    # --- the Runtime protocol ------------------------------------------------------------
    def subscribe(self, events: RuntimeEvents) -> None:
        self._events = events

    async def prepare(self, launch: ReplicaLaunch, env: dict[str, str]) -> None:
        key = (launch.api, launch.revision)
        self.prepared.append(key)
        self.templates.add(key)

    async def release(self, api: str, revision: int) -> None:
        self.released.append((api, revision))
        self.templates.discard((api, revision))

    async def start(self, launch: ReplicaLaunch, env: dict[str, str]) -> int | None:
        if self.start_error is not None:
            raise self.start_error
        if launch.replica_id in self._live:
            raise RuntimeError(f"replica {launch.replica_id} is already running")
        pid = self._next_pid
        self._next_pid += 1
        self.launches.append(launch)
        self.envs[launch.replica_id] = dict(env)
        self._live[launch.replica_id] = FakeReplica(launch, dict(env), pid)
        return pid

    async def stop(self, replica_id: str, grace_s: float) -> None:
        self.stops.append(replica_id)
        if replica_id in self._live:
            self._exit(replica_id, ReplicaExit(signal=int(signals.SIGTERM)))

    def log_path(self, api: str, replica_id: str) -> Path:
        return self.logs_dir / api / f"{replica_id}.log"

    async def close(self) -> None:
        self.closed = True
        for replica_id in list(self._live):
            await self.stop(replica_id, 0.0)
        self.templates.clear()

    # --- driving it from a test ----------------------------------------------------------
    def running(self) -> list[str]:
        """Ids of the replicas started and not yet exited, in start order."""
        return list(self._live)

    def ready(self) -> list[str]:
        """Ids of the running replicas that reported ready."""
        return [rid for rid, replica in self._live.items() if replica.ready]

    def replica(self, replica_id: str) -> FakeReplica:
        try:
            return self._live[replica_id]
        except KeyError:
            raise KeyError(f"replica {replica_id!r} is not running; running: {self.running()}") from None

    def make_ready(
        self,
        replica_id: str,
        *,
        load_s: float = 0.0,
        openapi: dict[str, Any] | None = None,
    ) -> ReplicaReady:
        """The replica loaded its predictor and listens; subscribers get `replica_ready`."""
        replica = self.replica(replica_id)
        if replica.ready:
            raise RuntimeError(f"replica {replica_id!r} is already ready")
        replica.ready = True
        report = ReplicaReady(address=f"fake:{replica_id}", pid=replica.pid, load_s=load_s, openapi=openapi)
        if self._events is not None:
            self._events.replica_ready(replica_id, report)
        return report

    def crash(
        self,
        replica_id: str,
        *,
        code: int | None = 1,
        signal: int | None = None,
        log_tail: list[str] | None = None,
    ) -> ReplicaExit:
        """The replica's process ended on its own (exit `code`, or killed by `signal`)."""
        self.replica(replica_id)
        exit = ReplicaExit(code=None if signal is not None else code, signal=signal, log_tail=list(log_tail or []))
        self._exit(replica_id, exit)
        return exit

    def fail_load(self, replica_id: str, error: str) -> ReplicaExit:
        """The replica reported that its predictor failed to load, then exited with code 1."""
        replica = self.replica(replica_id)
        if replica.ready:
            raise RuntimeError(f"replica {replica_id!r} is ready already; it cannot fail to load")
        exit = ReplicaExit(code=1, error=error)
        self._exit(replica_id, exit)
        return exit

    def _exit(self, replica_id: str, exit: ReplicaExit) -> None:
        del self._live[replica_id]
        if self._events is not None:
            self._events.replica_exited(replica_id, exit)


@dataclass
class FakeGateway:
    """A `GatewayControl` that records calls; `add_replica` succeeds at once unless `add_error` is set."""

    apis: dict[str, ConcurrencySpec] = field(default_factory=dict)
    replicas: dict[str, list[str]] = field(default_factory=dict)  # API -> ids of routed replicas
    added: list[tuple[str, str]] = field(default_factory=list)  # (API, replica id)
    drained: list[tuple[str, str]] = field(default_factory=list)
    waited: list[tuple[str, str]] = field(default_factory=list)  # wait_drained calls
    removed_apis: list[str] = field(default_factory=list)
    in_flight: dict[str, int] = field(default_factory=dict)  # replica id -> load reported by api_metrics
    demand: dict[str, float] = field(default_factory=dict)  # API -> in flight + queued, as `load` reports it
    cold: dict[str, tuple[int, float | None]] = field(default_factory=dict)  # API -> (count, last seconds)
    inference: dict[str, tuple[float | None, float | None, float | None]] = field(
        default_factory=dict
    )  # API -> (mean batch size, p50 slot wait s, p50 predict s)
    add_error: Exception | None = None

    def set_api(
        self, name: str, concurrency: ConcurrencySpec, kind: str = "realtime", multi_model: bool = False
    ) -> None:
        self.apis[name] = concurrency
        self.replicas.setdefault(name, [])

    def remove_api(self, name: str) -> None:
        self.removed_apis.append(name)
        self.apis.pop(name, None)
        self.replicas.pop(name, None)

    async def add_replica(self, api: str, replica_id: str, report: ReplicaReady) -> None:
        if self.add_error is not None:
            raise self.add_error
        if api not in self.apis:
            raise LookupError(f"the API {api!r} is gone")
        self.added.append((api, replica_id))
        self.replicas[api].append(replica_id)

    def drain_replica(self, api: str, replica_id: str) -> None:
        self.drained.append((api, replica_id))
        routed = self.replicas.get(api, [])
        if replica_id in routed:
            routed.remove(replica_id)

    async def wait_drained(self, api: str, replica_id: str, timeout_s: float) -> None:
        self.waited.append((api, replica_id))

    def api_metrics(self, name: str, now: float) -> tuple[int, float | None, float | None, int, int, dict[str, int]]:
        load = {rid: self.in_flight.get(rid, 0) for rid in self.replicas.get(name, [])}
        return 0, None, None, sum(load.values()), 0, load

    def load(self, name: str) -> float:
        return self.demand.get(name, 0.0)

    def cold_starts(self, name: str) -> tuple[int, float | None]:
        return self.cold.get(name, (0, None))

    def inference_metrics(self, name: str, now: float) -> tuple[float | None, float | None, float | None]:
        return self.inference.get(name, (None, None, None))


if TYPE_CHECKING:  # mypy checks that the fakes satisfy the protocols they stand in for

    def _conforms(runtime: FakeRuntime, gateway: FakeGateway) -> tuple[Runtime, GatewayControl]:
        return runtime, gateway
