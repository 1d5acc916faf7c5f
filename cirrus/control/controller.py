"""The controller: reconciles each API's desired replicas with what the runtime runs.

It owns no processes (the runtime does) and serves no requests (the gateway does): it decides
which replicas should exist, asks the runtime to start or stop them, and tells the gateway which
ones are ready. Crashed replicas restart with exponential backoff; a new revision's replicas
start beside the old ones, and the old ones drain once the new ones serve.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from cirrus.control.store import Store, StoredApi
from cirrus.runtimes.base import ReplicaExit, Runtime
from cirrus.spec import ConcurrencySpec, Deployment
from cirrus.types import ApiStatus, ApiStatusName, DeployResult, ReplicaState, ReplicaStatus
from cirrus.wire import ReplicaLaunch, ReplicaReady

log = logging.getLogger("cirrus.controller")

BACKOFF_BASE_S = 0.5
BACKOFF_MAX_S = 30.0
STOP_GRACE_S = 30.0
TICK_S = 0.5


def backoff_s(consecutive_failures: int) -> float:
    """Delay before restarting a replica that failed `consecutive_failures` times in a row."""
    if consecutive_failures <= 0:
        return 0.0
    return min(BACKOFF_MAX_S, BACKOFF_BASE_S * 2 ** (consecutive_failures - 1))


class GatewayControl(Protocol):
    """What the controller needs from the gateway (cirrus.gateway.control implements it)."""

    def set_api(self, name: str, concurrency: ConcurrencySpec) -> None: ...

    def remove_api(self, name: str) -> None: ...

    async def add_replica(self, api: str, replica_id: str, report: ReplicaReady) -> None: ...

    def drain_replica(self, api: str, replica_id: str) -> None: ...

    async def wait_drained(self, api: str, replica_id: str, timeout_s: float) -> None: ...

    def api_metrics(
        self, name: str, now: float
    ) -> tuple[int, float | None, float | None, int, int, dict[str, int]]: ...


@dataclass
class Replica:
    id: str
    api: str
    revision: int
    state: ReplicaState = ReplicaState.STARTING
    pid: int | None = None
    restarts: int = 0
    consecutive_failures: int = 0
    last_error: str | None = None
    stop_reason: str | None = None  # why the controller stopped it, reported instead of the exit itself
    started_at: float | None = None
    next_start_at: float = 0.0
    task: asyncio.Task[None] | None = None
    stored: StoredApi | None = None  # the revision it runs (None: the API's current one)


@dataclass
class ApiState:
    stored: StoredApi
    replicas: dict[str, Replica] = field(default_factory=dict)
    deleted: bool = False

    @property
    def name(self) -> str:
        return self.stored.name

    @property
    def revision(self) -> int:
        return self.stored.revision

    @property
    def desired(self) -> int:
        return self.stored.deployment.spec.autoscaling.initial


class Controller:
    def __init__(
        self,
        store: Store,
        runtime: Runtime,
        gateway: GatewayControl,
        endpoint: Callable[[str], str],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.store = store
        self.runtime = runtime
        self.gateway = gateway
        self.endpoint = endpoint
        self.clock = clock
        self.apis: dict[str, ApiState] = {}
        self._by_replica: dict[str, Replica] = {}
        self._wake = asyncio.Event()
        self._stopping = False
        runtime.subscribe(self)

    # --- public operations --------------------------------------------------------------
    def restore(self) -> None:
        """Bring back every API recorded in the store (after a daemon restart)."""
        for stored in self.store.apis():
            self._install(stored)
        self._wake.set()

    def deploy(self, deployments: list[Deployment]) -> list[DeployResult]:
        results = []
        for deployment in deployments:
            stored, action = self.store.put(deployment)
            if action != "unchanged" or stored.name not in self.apis:
                self._install(stored)
            results.append(
                DeployResult(
                    name=stored.name,
                    action=action,
                    revision=stored.revision,
                    endpoint=self.endpoint(stored.name),
                )
            )
        self._wake.set()
        return results

    def delete(self, name: str) -> bool:
        state = self.apis.get(name)
        if state is None or state.deleted:  # a deleted API lingers here only until its replicas stop
            return False
        self.store.delete(name)
        state.deleted = True
        self.gateway.remove_api(name)
        self._wake.set()
        return True

    def status(self, name: str) -> ApiStatus | None:
        state = self.apis.get(name)
        if state is None or state.deleted:
            return None
        return self._status(state)

    def statuses(self) -> list[ApiStatus]:
        return [self._status(s) for s in sorted(self.apis.values(), key=lambda s: s.name) if not s.deleted]

    async def run(self) -> None:
        """Reconcile on every change and at least every TICK_S."""
        while not self._stopping:
            self._wake.clear()
            for state in list(self.apis.values()):
                self._reconcile(state)
            try:
                await asyncio.wait_for(self._wake.wait(), TICK_S)
            except TimeoutError:
                pass

    async def shutdown(self) -> None:
        self._stopping = True
        self._wake.set()
        await self.runtime.close()
        tasks = [r.task for r in self._by_replica.values() if r.task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    # --- runtime events -----------------------------------------------------------------
    def replica_ready(self, replica_id: str, report: ReplicaReady) -> None:
        replica = self._by_replica.get(replica_id)
        if replica is None or replica.state is not ReplicaState.STARTING:
            return
        replica.pid = report.pid
        self._spawn(replica, self._connect(replica, report))

    async def _connect(self, replica: Replica, report: ReplicaReady) -> None:
        try:
            await self.gateway.add_replica(replica.api, replica.id, report)
        except Exception as exc:
            log.warning("cannot reach replica %s at %s: %s", replica.id, report.address, exc)
            replica.stop_reason = f"the gateway could not connect: {exc}"
            await self.runtime.stop(replica.id, 5.0)
            return
        if replica.state is not ReplicaState.STARTING:  # retired while connecting
            self.gateway.drain_replica(replica.api, replica.id)
        else:
            replica.state = ReplicaState.READY
            replica.consecutive_failures = 0
            log.info(
                "replica %s of %s is ready (pid %s, loaded in %.2fs)",
                replica.id,
                replica.api,
                report.pid,
                report.load_s,
            )
        self._wake.set()

    def replica_exited(self, replica_id: str, exit: ReplicaExit) -> None:
        replica = self._by_replica.get(replica_id)
        if replica is None:
            return
        self.gateway.drain_replica(replica.api, replica.id)
        replica.pid = None
        stop_reason, replica.stop_reason = replica.stop_reason, None
        if replica.state in (ReplicaState.DRAINING, ReplicaState.STOPPED) or self._stopping:
            replica.state = ReplicaState.STOPPED
            self._forget(replica)
        else:
            replica.restarts += 1
            replica.consecutive_failures += 1
            replica.last_error = stop_reason or exit.describe()
            replica.state = ReplicaState.BACKOFF
            replica.next_start_at = self.clock() + backoff_s(replica.consecutive_failures)
            log.warning(
                "replica %s of %s %s; restarting in %.1fs",
                replica.id,
                replica.api,
                replica.last_error.splitlines()[0],
                backoff_s(replica.consecutive_failures),
            )
        self._wake.set()

    # --- reconciliation -----------------------------------------------------------------
    def _install(self, stored: StoredApi) -> None:
        state = self.apis.get(stored.name)
        if state is None or state.deleted:
            old = state.replicas if state is not None else {}
            state = ApiState(stored=stored, replicas=old)
            self.apis[stored.name] = state
        else:
            state.stored = stored
        self.gateway.set_api(stored.name, stored.deployment.spec.concurrency)

    def _reconcile(self, state: ApiState) -> None:
        now = self.clock()
        if state.deleted:
            for replica in list(state.replicas.values()):
                self._retire(replica)
            if not state.replicas and self.apis.get(state.name) is state:
                del self.apis[state.name]
            return
        current = [
            r for r in state.replicas.values() if r.revision == state.revision and r.state is not ReplicaState.DRAINING
        ]
        for replica in current:
            if replica.state is ReplicaState.BACKOFF and now >= replica.next_start_at:
                self._start(state, replica)
        missing = state.desired - len(current)
        for _ in range(missing):
            replica = Replica(
                id=f"{state.name}-{secrets.token_hex(3)}", api=state.name, revision=state.revision, stored=state.stored
            )
            state.replicas[replica.id] = replica
            self._by_replica[replica.id] = replica
            self._start(state, replica)
        if missing < 0:
            # Too many: retire the least useful first (not ready before ready).
            surplus = sorted(current, key=lambda r: r.state is ReplicaState.READY)[:-missing]
            for replica in surplus:
                self._retire(replica)
        ready = sum(1 for r in current if r.state is ReplicaState.READY)
        older = [r for r in state.replicas.values() if r.revision != state.revision]
        for replica in older:
            if ready >= state.desired:
                self._retire(replica)
            elif replica.state is ReplicaState.BACKOFF and now >= replica.next_start_at:
                self._start(state, replica)  # the old revision keeps serving until the new one can

    def _start(self, state: ApiState, replica: Replica) -> None:
        stored = replica.stored or state.stored
        spec = stored.deployment.spec
        replica.state = ReplicaState.STARTING
        replica.started_at = time.time()
        launch = ReplicaLaunch(
            api=state.name,
            replica_id=replica.id,
            revision=replica.revision,
            project_dir=stored.deployment.project_dir,
            predictor_path=spec.predictor.path,
            class_name=spec.predictor.class_name,
            config=dict(spec.predictor.config),
            inference_slots=spec.concurrency.inference_slots,
        )
        env = {**spec.predictor.env, "CIRRUS_API": state.name, "CIRRUS_REPLICA_ID": replica.id}
        self._spawn(replica, self._launch(replica, launch, env))

    async def _launch(self, replica: Replica, launch: ReplicaLaunch, env: dict[str, str]) -> None:
        try:
            replica.pid = await self.runtime.start(launch, env)
        except Exception as exc:
            log.exception("cannot start replica %s", replica.id)
            self.replica_exited(replica.id, ReplicaExit(error=f"the runtime could not start it: {exc}"))

    def _retire(self, replica: Replica) -> None:
        """Drain a replica (no new requests, finish those in flight), then stop it."""
        if replica.state in (ReplicaState.DRAINING, ReplicaState.STOPPED):
            return
        if replica.state is ReplicaState.BACKOFF or (
            replica.pid is None and replica.state is not ReplicaState.STARTING
        ):
            replica.state = ReplicaState.STOPPED
            self._forget(replica)
            return
        replica.state = ReplicaState.DRAINING
        self.gateway.drain_replica(replica.api, replica.id)
        self._spawn(replica, self._stop(replica))

    async def _stop(self, replica: Replica) -> None:
        state = self.apis.get(replica.api)
        timeout_s = state.stored.deployment.spec.concurrency.timeout_s if state else STOP_GRACE_S
        await self.gateway.wait_drained(replica.api, replica.id, timeout_s + 2.0)
        await self.runtime.stop(replica.id, STOP_GRACE_S)

    def _forget(self, replica: Replica) -> None:
        self._by_replica.pop(replica.id, None)
        state = self.apis.get(replica.api)
        if state is not None:
            state.replicas.pop(replica.id, None)

    def _spawn(self, replica: Replica, coro: object) -> None:
        task: asyncio.Task[None] = asyncio.get_running_loop().create_task(coro)  # type: ignore[arg-type]
        replica.task = task

    # --- status -------------------------------------------------------------------------
    def _status(self, state: ApiState) -> ApiStatus:
        current = [r for r in state.replicas.values() if r.revision == state.revision]
        ready = sum(1 for r in current if r.state is ReplicaState.READY)
        old_serving = any(
            r.revision != state.revision and r.state is ReplicaState.READY for r in state.replicas.values()
        )
        failing = [r for r in current if r.consecutive_failures > 0]
        message = None
        if ready >= state.desired and not old_serving:
            status = ApiStatusName.LIVE
        elif ready == 0 and failing:
            status = ApiStatusName.ERROR
            message = failing[0].last_error
            if old_serving:
                message = f"revision {state.revision} does not start (an older revision still serves): {message}"
        elif failing:
            status = ApiStatusName.DEGRADED
            message = failing[0].last_error
        elif old_serving or ready:
            status = ApiStatusName.UPDATING
        else:
            status = ApiStatusName.STARTING
        requests, p50, p99, in_flight, queued, replica_load = self.gateway.api_metrics(state.name, time.time())
        return ApiStatus(
            name=state.name,
            kind=state.stored.deployment.spec.kind,
            status=status,
            revision=state.revision,
            replicas_ready=ready,
            replicas_desired=state.desired,
            requests_last_minute=requests,
            p50_ms=None if p50 is None else round(p50 * 1000, 3),
            p99_ms=None if p99 is None else round(p99 * 1000, 3),
            in_flight=in_flight,
            queued=queued,
            endpoint=self.endpoint(state.name),
            message=message,
            replicas=[
                ReplicaStatus(
                    id=r.id,
                    revision=r.revision,
                    state=r.state,
                    pid=r.pid,
                    restarts=r.restarts,
                    in_flight=replica_load.get(r.id, 0),
                    last_error=r.last_error,
                    started_at=r.started_at,
                )
                for r in sorted(state.replicas.values(), key=lambda r: (r.revision, r.id))
            ],
        )
