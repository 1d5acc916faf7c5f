"""In-memory stand-ins for the runtime and the gateway's control side (no processes, no sockets).

`FakeRuntime` implements `cirrus.runtimes.base.Runtime`; a test drives each replica's life with
`make_ready`, `crash` and `fail_load`, which deliver the same events a real runtime would. It
reserves with the local runtime's placement over an optional `inventory` (None: everything fits)
and serves the log lines a test wrote with `write_log`.
`FakeGateway` implements `cirrus.control.controller.GatewayControl` and records every call.
"""

from __future__ import annotations

import asyncio
import signal as signals
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cirrus.runtimes.base import Placement, ReplicaExit, Reservation, RuntimeEvents
from cirrus.runtimes.placement import Assignment, Inventory, Unplaceable, place
from cirrus.spec import ComputeSpec, ConcurrencySpec, CorsSpec, ProtocolSpec, SplitTarget
from cirrus.types import ApiKey, TrafficShare
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

    def __init__(
        self,
        logs_dir: Path | str = "fake-logs",
        inventory: Inventory | None = None,
        models_dir: Path | None = None,
    ) -> None:
        self.logs_dir = Path(logs_dir)
        self.inventory = inventory  # None: every reservation fits, and carries no devices
        self.models_dir = models_dir
        self.reservations: dict[str, Reservation] = {}  # replica id -> its reservation, while held
        self.reserved: list[str] = []  # replica ids of every reservation made, in order
        self.log_lines: list[tuple[str, str, str]] = []  # (API, replica id, line) as `write_log` got them
        self.launches: list[ReplicaLaunch] = []  # every start, in order (a restart appears again)
        self.envs: dict[str, dict[str, str]] = {}  # replica id -> environment of its latest start
        self.stops: list[str] = []  # replica ids passed to stop(), in order
        self.start_error: Exception | None = None  # raised by the next start() calls while set
        self.prepared: list[tuple[str, int]] = []  # (API, revision) of every prepare(), in order
        self.released: list[tuple[str, int]] = []  # (API, revision) of every release(), in order
        self.templates: set[tuple[str, int]] = set()  # prepared and not yet released
        self.store_urls: dict[str, str] = {}  # daemon store URL -> the one replicas get
        self.placements: dict[str, Placement] = {}  # replica id -> where tests say it runs (or waits)
        self.closed = False
        self._events: RuntimeEvents | None = None
        self._live: dict[str, FakeReplica] = {}
        self._next_pid = FIRST_FAKE_PID
        self._log_written: asyncio.Event | None = None  # set by the next write_log

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

    def reserve(self, replica_id: str, compute: ComputeSpec) -> Reservation | Unplaceable:
        if replica_id in self._live:
            raise RuntimeError(f"replica {replica_id} is running; its reservation cannot change")
        self.reservations.pop(replica_id, None)
        if self.inventory is None:
            reservation = Reservation()
        else:
            held = [r.detail for r in self.reservations.values() if isinstance(r.detail, Assignment)]
            placed = place(compute, self.inventory, held)
            if isinstance(placed, Unplaceable):
                return placed
            reservation = Reservation(devices=placed.devices(), detail=placed)
        self.reservations[replica_id] = reservation
        self.reserved.append(replica_id)
        return reservation

    def unreserve(self, replica_id: str) -> None:
        if replica_id not in self._live:
            self.reservations.pop(replica_id, None)

    async def start(self, launch: ReplicaLaunch, env: dict[str, str]) -> int | None:
        if self.start_error is not None:
            self.unreserve(launch.replica_id)
            raise self.start_error
        if launch.replica_id in self._live:
            raise RuntimeError(f"replica {launch.replica_id} is already running")
        reservation = self.reservations.get(launch.replica_id)
        if reservation is not None and isinstance(reservation.detail, Assignment):
            env = {**env, **reservation.detail.env()}
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
        else:
            self.unreserve(replica_id)

    def address(self, replica_id: str) -> str | None:
        replica = self._live.get(replica_id)
        return f"fake:{replica_id}" if replica is not None and replica.ready else None

    def placement(self, replica_id: str) -> Placement | None:
        return self.placements.get(replica_id)

    def model_cache_dir(self) -> Path | None:
        return self.models_dir

    def replica_store_url(self, store_url: str) -> str:
        """The store URL replicas get: `store_urls` maps the daemon's to another (a node elsewhere)."""
        return self.store_urls.get(store_url, store_url)

    def log_path(self, api: str, replica_id: str) -> Path:
        return self.logs_dir / api / f"{replica_id}.log"

    def has_logs(self, api: str) -> bool:
        return any(logged_api == api for logged_api, _, _ in self.log_lines)

    async def logs(self, api: str | None, replica_id: str | None, lines: int, follow: bool) -> AsyncIterator[bytes]:
        def chosen(start: int) -> list[bytes]:
            return [
                f"[{rid}] {line}\n".encode()
                for logged_api, rid, line in self.log_lines[start:]
                if api in (None, logged_api) and replica_id in (None, rid)
            ]

        seen = len(self.log_lines)
        for chunk in chosen(0)[-lines:] if lines > 0 else []:
            yield chunk
        while follow:
            if len(self.log_lines) == seen:  # nothing new since: wait for the next write_log
                if self._log_written is None:
                    self._log_written = asyncio.Event()
                await self._log_written.wait()
            new, seen = chosen(seen), len(self.log_lines)
            for chunk in new:
                yield chunk

    async def close(self) -> None:
        self.closed = True
        for replica_id in list(self._live):
            await self.stop(replica_id, 0.0)
        self.templates.clear()
        self.reservations.clear()

    # --- driving it from a test ----------------------------------------------------------
    def write_log(self, api: str, replica_id: str, line: str) -> None:
        """A replica of `api` logged `line` (without its newline); followers of its logs get it."""
        self.log_lines.append((api, replica_id, line))
        if self._log_written is not None:
            self._log_written.set()
            self._log_written = None

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

    def lose(self, replica_id: str, why: str = "its node died") -> ReplicaExit:
        """The replica went with its node (a cluster runtime reports it lost, not exited)."""
        self.replica(replica_id)
        exit = ReplicaExit(lost=why)
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
        self.reservations.pop(replica_id, None)
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
    secrets: dict[str, bytes] = field(default_factory=dict)  # replica id -> the secret add_replica was given
    on_lost: dict[str, Callable[[str], None]] = field(default_factory=dict)  # replica id -> its lost callback
    unavailable: dict[str, str | None] = field(default_factory=dict)  # API -> why requests get 503 at once
    keys: list[ApiKey] = field(default_factory=list)  # the API keys last published
    auth_required: dict[str, bool] = field(default_factory=dict)  # API -> needs a key
    cors: dict[str, CorsSpec | None] = field(default_factory=dict)  # API -> its CORS policy (None: no CORS)
    splits: dict[str, list[SplitTarget] | None] = field(default_factory=dict)  # API -> a splitter's targets
    protocols: dict[str, ProtocolSpec | None] = field(default_factory=dict)  # API -> the protocol it speaks
    access_logs: dict[str, bool] = field(default_factory=dict)  # API -> writes an access log line per request
    canaries: dict[str, tuple[int | None, int, float] | None] = field(default_factory=dict)  # (serving, canary, %)
    promoted: list[str] = field(default_factory=list)  # APIs whose canary was promoted

    def set_api(
        self,
        name: str,
        concurrency: ConcurrencySpec,
        kind: str = "realtime",
        multi_model: bool = False,
        auth_required: bool = False,
        cors: CorsSpec | None = None,
        split: list[SplitTarget] | None = None,
        sticky_header: str | None = None,
        protocol: ProtocolSpec | None = None,
        access_log: bool = False,
    ) -> None:
        self.splits[name] = split
        self.protocols[name] = protocol
        self.access_logs[name] = access_log
        self.apis[name] = concurrency
        self.replicas.setdefault(name, [])
        self.auth_required[name] = auth_required
        self.cors[name] = cors

    def set_unavailable(self, name: str, reason: str | None) -> None:
        self.unavailable[name] = reason

    def set_canary(self, name: str, serving: int | None, canary: int | None, percent: float) -> None:
        self.canaries[name] = None if canary is None else (serving, canary, percent)

    def promote_canary(self, name: str) -> None:
        self.promoted.append(name)

    def traffic(self, name: str, now: float) -> list[TrafficShare]:
        return []

    def set_keys(self, keys: list[ApiKey]) -> None:
        self.keys = list(keys)

    def remove_api(self, name: str) -> None:
        self.removed_apis.append(name)
        self.apis.pop(name, None)
        self.replicas.pop(name, None)

    async def add_replica(
        self,
        api: str,
        replica_id: str,
        report: ReplicaReady,
        secret: bytes,
        on_lost: Callable[[str], None] | None = None,
        revision: int = 0,
    ) -> None:
        if self.add_error is not None:
            raise self.add_error
        if api not in self.apis:
            raise LookupError(f"the API {api!r} is gone")
        self.added.append((api, replica_id))
        self.replicas[api].append(replica_id)
        self.secrets[replica_id] = secret
        if on_lost is not None:
            self.on_lost[replica_id] = on_lost

    def lose(self, api: str, replica_id: str, reason: str = "the replica closed its connection") -> None:
        """As the real gateway does when a replica's connection is lost: stop routing to it, tell the controller."""
        routed = self.replicas.get(api, [])
        if replica_id in routed:
            routed.remove(replica_id)
        callback = self.on_lost.pop(replica_id, None)
        if callback is not None:
            callback(reason)

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
