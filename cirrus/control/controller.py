"""The controller: reconciles each API's desired replicas with what the runtime runs.

It owns no processes (the runtime does) and serves no requests (the gateway does): it decides which
replicas should exist (the autoscaler's answer), places them on the node's capacity (the scheduler's
answer), asks the runtime to start or stop them, and tells the gateway which ones are ready. Crashed
replicas restart with exponential backoff; a new revision's replicas start beside the old ones, and
the old ones drain once the new ones serve; replicas removed by a scale-down drain too.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from cirrus.control.envs import EnvBuilder
from cirrus.control.keys import KeyStore
from cirrus.control.launches import build_launch
from cirrus.control.models import ModelFetcher
from cirrus.control.rollouts import Rollouts, canary_replicas
from cirrus.control.scaling import ApiScaler
from cirrus.control.status import api_status, backlog_fields
from cirrus.control.store import Action, Store, StoredApi
from cirrus.kinds import Kind, kind_of
from cirrus.runtimes.base import ReplicaExit, Reservation, Runtime, Unplaceable
from cirrus.spec import SPEC_FILENAMES, ConcurrencySpec, CorsSpec, Deployment, ProtocolSpec, QueueSpec, SplitTarget
from cirrus.store.base import API_DELETED, QueueStore
from cirrus.types import ApiKey, ApiStatus, ApiStatusName, DeployResult, ReplicaState, TrafficShare
from cirrus.wire import QueueConfig, ReplicaLaunch, ReplicaReady

if TYPE_CHECKING:
    from cirrus.control.jobs import JobManager
    from cirrus.control.tasks import TaskRunner
    from cirrus.snapshots import SnapshotStore

log = logging.getLogger("cirrus.controller")

BACKOFF_BASE_S = 0.5
BACKOFF_MAX_S = 30.0
STOP_GRACE_S = 30.0
LOST_GRACE_S = 1.0  # a replica whose gateway connection was lost is restarted unless it exits by then
TICK_S = 0.5
AUTOSCALE_INTERVAL_S = 1.0
JOB_START_FAILURES = 3  # a job fails when every worker failed to start this many times in a row
JOBS_INTERVAL_S = 0.25  # batch jobs are stepped this often at most (the loop may wake more often)


def backoff_s(consecutive_failures: int) -> float:
    """Delay before restarting a replica that failed `consecutive_failures` times in a row."""
    if consecutive_failures <= 0:
        return 0.0
    return min(BACKOFF_MAX_S, BACKOFF_BASE_S * 2 ** (consecutive_failures - 1))


class GatewayControl(Protocol):
    """What the controller needs from the gateway (cirrus.gateway.control implements it)."""

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
    ) -> None: ...

    def remove_api(self, name: str) -> None: ...

    def set_canary(self, name: str, serving: int | None, canary: int | None, percent: float) -> None:
        """Send `percent` of requests to revision `canary`'s replicas, the rest to `serving`'s (None: no
        canary; one that ran is aborted: its replicas drain, its waiting requests go to `serving`)."""
        ...

    def promote_canary(self, name: str) -> None:
        """The canary's replicas serve every request from now on, with no request dropped."""
        ...

    def traffic(self, name: str, now: float) -> list[TrafficShare]:
        """Where the API's requests went over the last minute (a canary's revisions, a splitter's APIs)."""
        ...

    def set_unavailable(self, name: str, reason: str | None) -> None:
        """While `reason` is set, requests to the API get 503 with it at once instead of waiting."""
        ...

    def set_keys(self, keys: list[ApiKey]) -> None:
        """The API keys requests may carry (the gateway enforces them where an API needs one)."""
        ...

    async def add_replica(
        self,
        api: str,
        replica_id: str,
        report: ReplicaReady,
        secret: bytes,
        on_lost: Callable[[str], None] | None = None,
        revision: int = 0,
    ) -> None:
        """Connect to a ready replica, proving the gateway knows the `secret` it was launched with, and
        route to it; should that connection be lost, it leaves routing and `on_lost(reason)` is called."""
        ...

    def drain_replica(self, api: str, replica_id: str) -> None: ...

    async def wait_drained(self, api: str, replica_id: str, timeout_s: float) -> None: ...

    def api_metrics(
        self, name: str, now: float
    ) -> tuple[int, float | None, float | None, int, int, dict[str, int]]: ...

    def load(self, name: str) -> float:
        """In flight for an API: executing in replicas plus queued in the gateway."""
        ...

    def cold_starts(self, name: str) -> tuple[int, float | None]:
        """(count, seconds of the last one) of starts from zero replicas."""
        ...

    def inference_metrics(self, name: str, now: float) -> tuple[float | None, float | None, float | None]:
        """(mean batch size, p50 slot wait s, p50 predict s) over the last minute, as replicas measured them."""
        ...


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
    reservation: Reservation | None = None  # the compute the runtime holds for it while it runs
    reason: str | None = None  # why it is pending
    job: str | None = None  # a batch API's worker: the id of the job it runs
    secret: bytes = b""  # of its current launch: the gateway proves it knows it when it connects


@dataclass
class ApiState:
    stored: StoredApi  # the revision the API rolls to
    scaler: ApiScaler
    replicas: dict[str, Replica] = field(default_factory=dict)
    deleted: bool = False
    prepared: set[int] = field(default_factory=set)  # revisions the runtime was asked to prepare
    serving: StoredApi | None = None  # the last revision that served in full, while `stored` is not there yet
    loaded: set[int] = field(default_factory=set)  # revisions a replica of which became ready
    unavailable: str | None = None  # why requests get 503 at once (no revision can serve), as told the gateway
    saved: int | None = None  # the serving revision the store records
    canary: float | None = None  # `stored` is a canary taking this percent of requests beside `serving`

    @property
    def name(self) -> str:
        return self.stored.name

    @property
    def revision(self) -> int:
        return self.stored.revision

    @property
    def kind(self) -> Kind:
        return kind_of(self.stored.deployment.spec.kind)

    @property
    def proven(self) -> bool:
        """Whether the revision rolled to has shown it loads (or its kind needs no proof)."""
        return self.revision in self.loaded or not self.kind.proves_load

    @property
    def desired(self) -> int:
        """Replicas of the revision rolled to: the autoscaler's answer, and at least one until it has
        loaded once, so a deploy at `min_replicas: 0` proves its code before it reports live."""
        return self.scaler.desired if self.proven else max(1, self.scaler.desired)


class Controller:
    def __init__(
        self,
        store: Store,
        runtime: Runtime,
        gateway: GatewayControl,
        endpoint: Callable[[str], str],
        clock: Callable[[], float] = time.monotonic,
        queue_store: QueueStore | None = None,
        queue_url: str | None = None,
        jobs: JobManager | None = None,
        models: ModelFetcher | None = None,
        snapshots: SnapshotStore | None = None,
        debug_errors: bool = False,
        keys: KeyStore | None = None,
        envs: EnvBuilder | None = None,
    ) -> None:
        self.store = store
        self.runtime = runtime
        self.gateway = gateway
        self.endpoint = endpoint
        self.clock = clock
        self.queue_store = queue_store  # async APIs' requests; its backlog drives their autoscaling
        self.queue_refused: str | None = None  # why replicas cannot reach the queue store (async APIs, jobs)
        try:
            self.queue_url = None if queue_url is None else runtime.replica_store_url(queue_url)  # as replicas reach it
        except ValueError as exc:
            self.queue_url, self.queue_refused = None, str(exc)
        self.jobs = jobs  # batch APIs' jobs: they decide how many workers a batch API runs
        self.models = models or ModelFetcher(None, clock)  # each revision's models, fetched before it starts
        self.snapshots = snapshots  # where revisions' code lives (None: run from project_dir, as tests may)
        self.debug_errors = debug_errors  # for specs that do not say: 500s show the exception (cirrus serve)
        self.keys = keys or KeyStore(":memory:")  # API keys; the gateway checks requests against them
        self.tasks: TaskRunner | None = None  # task APIs' runs; their replicas' events go to it
        self.envs = envs or EnvBuilder()  # APIs' own Python environments (`python:`; the daemon's: $CIRRUS_HOME/envs)
        self.envs.on_change = self.wake
        self.apis: dict[str, ApiState] = {}
        self._by_replica: dict[str, Replica] = {}
        self._wake = asyncio.Event()
        self._stopping = False
        self._background: set[asyncio.Task[None]] = set()
        self.rollouts = Rollouts(self)  # canaries, promotions, rollbacks
        runtime.subscribe(self)

    # --- public operations --------------------------------------------------------------
    def restore(self) -> None:
        """Bring back every API recorded in the store (after a daemon restart): the revision that
        served last serves again, while the one rolled to (if newer) is tried beside it."""
        self.publish_keys()
        for stored in self.store.apis():
            serving = self.store.serving(stored.name)
            self._install(stored)
            state = self.apis[stored.name]
            state.saved = serving
            state.canary = self.store.canary(stored.name) if serving not in (None, stored.revision) else None
            if serving == stored.revision:
                state.loaded.add(serving)
            elif serving is not None:
                state.serving = self.store.revision(stored.name, serving)
                if state.serving is not None:
                    state.loaded.add(serving)
                    self._prepare(state, state.serving)
        self._wake.set()

    def publish_keys(self) -> None:
        """Tell the gateway the keys it accepts (after a change, and on restore)."""
        self.gateway.set_keys(self.keys.list())

    def deploy(
        self, deployments: list[Deployment], force: bool = False, canary: float | None = None
    ) -> list[DeployResult]:
        """Record and roll out each deployment (`force`: a new revision even if nothing changed;
        `canary`: the new revision takes that percent of requests beside the serving one, until
        promoted or rolled back). DeployRefused: nothing was recorded."""
        self.rollouts.check(deployments, force, canary)
        results = []
        for deployment in deployments:
            self.rollouts.replacing(deployment, force)
            stored, action = self.store.put(deployment, force=force)
            self.apply(stored, action)
            if canary is not None:
                self.rollouts.started(self.apis[stored.name], canary)
            results.append(
                DeployResult(
                    name=stored.name, action=action, revision=stored.revision, endpoint=self.endpoint(stored.name)
                )
            )
        self._wake.set()
        return results

    def apply(self, stored: StoredApi, action: Action) -> None:
        state = self.apis.get(stored.name)
        if action == "scaled" and state is not None and not state.deleted:
            state.stored = stored  # same revision, new scale settings: no replica restarts
            state.scaler.update_spec(stored.deployment.spec)
            self.set_route(stored)
        elif action != "unchanged" or state is None or state.deleted:
            self._install(stored)

    def wake(self) -> None:
        """Reconcile soon (something changed)."""
        self._wake.set()

    def redeploy(self, name: str, reason: str) -> StoredApi | None:
        """A new revision of an API's current deployment (e.g. a model changed at its source): the
        rolling update fetches its models again and replaces the replicas without dropping requests."""
        state = self.apis.get(name)
        if state is None or state.deleted:
            return None
        stored, _ = self.store.put(state.stored.deployment, force=True, note=reason)
        log.info("%s: revision %d (%s)", name, stored.revision, reason)
        self._install(stored)
        self._wake.set()
        return stored

    def delete(self, name: str) -> bool:
        state = self.apis.get(name)
        if state is None or state.deleted:  # a deleted API lingers here only until its replicas stop
            return False
        self.store.delete(name)
        state.deleted = True
        self.models.forget(name)
        self.gateway.remove_api(name)
        if state.kind.queued and self.queue_store is not None:
            # Its unfinished requests are dead letters now: they must not run for an API deployed
            # later under this name (a replica still working on one can no longer complete it).
            try:
                failed = self.queue_store.fail_all(name, API_DELETED, time.time())
            except Exception:
                log.exception("%s: failing the deleted API's queued requests failed", name)
            else:
                if failed:
                    log.info("%s: deleted with %d unfinished requests: failed (dead letters)", name, failed)
        self._wake.set()
        return True

    def status(self, name: str) -> ApiStatus | None:
        state = self.apis.get(name)
        if state is None or state.deleted:
            return None
        return self._status(state)

    def statuses(self) -> list[ApiStatus]:
        live = sorted((s for s in self.apis.values() if not s.deleted), key=lambda s: s.name)
        return [self._status(s) for s in live]

    def _status(self, state: ApiState) -> ApiStatus:
        placements = {r.id: self.runtime.placement(r.id) for r in state.replicas.values()}
        models = self.models.status((state.name, state.revision))
        env = self.envs.status((state.name, state.revision))
        status = api_status(state, self.gateway, self.endpoint(state.name), models, placements, env)
        if self.tasks is not None and state.kind.name == "task" and status.status is ApiStatusName.LIVE:
            status = status.model_copy(update={"message": self.tasks.summary(state.name)})  # its runs
        if not state.kind.queued or self.queue_store is None:
            return status
        return status.model_copy(update=backlog_fields(self.queue_store, state.name, time.time()))

    def demand(self, name: str) -> None:
        """A request is waiting for an API with no ready replica: decide now, not at the next tick."""
        state = self.apis.get(name)
        if state is None or state.deleted:
            return
        if state.desired == 0:
            now = self.clock()
            state.scaler.observe(max(1.0, self.gateway.load(name)), now)
            state.scaler.decide(now)
            log.info("%s: a request arrived at zero replicas; scaling to %d", name, state.desired)
        self._wake.set()

    def autoscale(self) -> None:
        """Sample every API's load and apply the policy once."""
        now = self.clock()
        for state in self.apis.values():
            if state.deleted or not state.kind.autoscaled:
                continue
            state.scaler.observe(state.kind.load(self, state.name, state.desired), now)
            before = state.desired
            state.scaler.decide(now)
            if state.desired != before:
                log.info("%s: %d -> %d replicas (%s)", state.name, before, state.desired, state.scaler.reason)

    def max_attempts(self, name: str) -> int:
        """Deliveries of one async request before it is failed."""
        state = self.apis.get(name)
        return 3 if state is None else state.stored.deployment.spec.queue.max_attempts

    def queue_spec(self, name: str) -> QueueSpec | None:
        """An async API's `queue` spec, for the gateway's accepts (None: no such API)."""
        state = self.apis.get(name)
        return None if state is None or state.deleted else state.stored.deployment.spec.queue

    # --- what kinds may ask (KindHost) ----------------------------------------------------
    def gateway_load(self, api: str) -> float:
        return self.gateway.load(api)

    def queue_backlog(self, api: str) -> float | None:
        if self.queue_store is None:
            return self.gateway.load(api)
        try:
            backlog = self.queue_store.backlog(api, time.time())
        except Exception:
            log.exception("%s: reading the queue backlog failed", api)
            return None
        return float(backlog.in_queue + backlog.in_progress)

    def running_job(self, api: str) -> tuple[str, int] | None:
        running = self.jobs.running(api) if self.jobs is not None else None
        return None if running is None else (running.id, min(running.workers, running.total_batches))

    async def run(self) -> None:
        """Autoscale every AUTOSCALE_INTERVAL_S; reconcile on every change and at least every TICK_S."""
        next_autoscale = next_jobs = self.clock()
        while not self._stopping:
            self._wake.clear()
            if self.clock() >= next_autoscale:
                self.autoscale()
                next_autoscale = self.clock() + AUTOSCALE_INTERVAL_S
            if self.clock() >= next_jobs:
                self.step_jobs()
                next_jobs = self.clock() + JOBS_INTERVAL_S
            current = [(s.name, s.revision) for s in self.apis.values() if not s.deleted]
            for name, reason in self.models.check_sources(current):
                self.redeploy(name, reason)
            self.reconcile()
            try:
                await asyncio.wait_for(self._wake.wait(), TICK_S)
            except TimeoutError:
                pass

    def step_jobs(self) -> None:
        """Advance the batch jobs; fail a job whose workers all keep failing to start."""
        if self.jobs is None:
            return
        batch = {s.name: s.stored.deployment.spec for s in self.apis.values() if not s.deleted and s.kind.runs_jobs}
        working = {r.job for name in batch for r in self.apis[name].replicas.values() if r.job is not None}
        self.jobs.step(batch, working)
        for name in batch:
            job = self.jobs.running(name)
            workers = [r for r in self.apis[name].replicas.values() if job is not None and r.job == job.id]
            if job is not None and workers and all(r.consecutive_failures >= JOB_START_FAILURES for r in workers):
                self.jobs.fail(job.id, f"its workers cannot start: {workers[0].last_error}")

    def reconcile(self) -> None:
        for state in list(self.apis.values()):
            self._reconcile(state)
        self._place_pending()

    async def shutdown(self) -> None:
        self._stopping = True
        self._wake.set()
        await self.runtime.close()
        tasks = [r.task for r in self._by_replica.values() if r.task is not None] + list(self._background)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    # --- runtime events -----------------------------------------------------------------
    def replica_ready(self, replica_id: str, report: ReplicaReady) -> None:
        replica = self._by_replica.get(replica_id)
        if replica is None and self.tasks is not None:
            self.tasks.replica_ready(replica_id, report)  # a task run's replica
        if replica is None or replica.state is not ReplicaState.STARTING:
            return
        replica.pid = report.pid
        self._spawn(replica, self._connect(replica, report))

    async def _connect(self, replica: Replica, report: ReplicaReady) -> None:
        try:
            await self.gateway.add_replica(
                replica.api,
                replica.id,
                report,
                replica.secret,
                partial(self._connection_lost, replica, report.pid),
                replica.revision,
            )
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
            state = self.apis.get(replica.api)
            if state is not None:
                state.loaded.add(replica.revision)
            log.info(
                "replica %s of %s is ready (pid %s, loaded in %.2fs)",
                replica.id,
                replica.api,
                report.pid,
                report.load_s,
            )
        self._wake.set()

    def _connection_lost(self, replica: Replica, pid: int, reason: str) -> None:
        """The gateway lost its connection to a replica (it no longer routes to it): restart it, unless it
        is exiting anyway (then the runtime reports its exit within LOST_GRACE_S, with the real cause)."""

        async def restart() -> None:
            await asyncio.sleep(LOST_GRACE_S)
            if self._stopping or replica.state is not ReplicaState.READY or replica.pid != pid:
                return
            log.info("replica %s of %s lost its gateway connection; stopping it to restart it", replica.id, replica.api)
            replica.stop_reason = f"lost its connection to the gateway: {reason}"
            await self.runtime.stop(replica.id, 5.0)

        if not self._stopping:
            self._run_in_background(restart())

    def replica_exited(self, replica_id: str, exit: ReplicaExit) -> None:
        replica = self._by_replica.get(replica_id)
        if replica is None and self.tasks is not None:
            self.tasks.replica_exited(replica_id, exit)  # a task run's replica
        if replica is None:
            return
        self.gateway.drain_replica(replica.api, replica.id)
        replica.pid = None
        replica.reservation = None
        stop_reason, replica.stop_reason = replica.stop_reason, None
        if replica.state in (ReplicaState.DRAINING, ReplicaState.STOPPED) or self._stopping:
            replica.state = ReplicaState.STOPPED
            self._forget(replica)
        else:
            # A replica lost with its node did not fail: it is replaced at once, with no backoff.
            replica.restarts += 1
            replica.consecutive_failures += 0 if exit.lost else 1
            replica.last_error = stop_reason or exit.describe()
            replica.state = ReplicaState.BACKOFF
            delay = 0.0 if exit.lost else backoff_s(replica.consecutive_failures)
            replica.next_start_at = self.clock() + delay
            log.warning(
                "replica %s of %s %s; restarting in %.1fs",
                replica.id,
                replica.api,
                replica.last_error.splitlines()[0],
                delay,
            )
        self._wake.set()

    # --- reconciliation -----------------------------------------------------------------
    def _install(self, stored: StoredApi) -> None:
        state = self.apis.get(stored.name)
        if state is None or state.deleted:
            old = state.replicas if state is not None else {}
            prepared = state.prepared if state is not None else set()
            scaler = ApiScaler(stored.deployment.spec, self.clock())
            state = ApiState(stored=stored, scaler=scaler, replicas=old, prepared=prepared)
            self.apis[stored.name] = state
        else:
            if state.revision in state.loaded and state.canary is None:
                state.serving = state.stored  # it serves (or scales from zero) until the new revision can
            state.stored = stored
            state.scaler.update_spec(stored.deployment.spec)
        self._prepare(state, stored)
        self.set_route(stored)

    def _prepare(self, state: ApiState, stored: StoredApi) -> None:
        if stored.revision in state.prepared or not (state.kind.runs_replicas and state.kind.forks):
            return
        code_dir = partial(self.code_dir, stored)
        if self.envs.ready((stored.name, stored.revision), stored.deployment, code_dir):  # templates run its Python
            # A template process imports the predictor's module now, so replicas (even the first,
            # from zero) start by forking instead of importing everything again.
            state.prepared.add(stored.revision)
            launch, env = self._launch_for(stored, f"{stored.name}-template")
            self._run_in_background(self.runtime.prepare(launch, env))

    def set_route(self, stored: StoredApi) -> None:
        spec = stored.deployment.spec
        self.gateway.set_api(
            stored.name,
            spec.concurrency,
            spec.kind,
            multi_model=spec.multi_model is not None,
            auth_required=spec.auth == "required",
            cors=spec.cors,
            split=spec.apis,
            sticky_header=spec.sticky_header,
            protocol=spec.protocol,
            access_log=spec.access_log,
        )

    def _reconcile(self, state: ApiState) -> None:
        self._release_templates(state)
        if state.deleted:
            for replica in list(state.replicas.values()):
                self._retire(replica)
            if not state.replicas and self.apis.get(state.name) is state:
                del self.apis[state.name]
                self.envs.forget(state.name)  # its environments may be evicted once its replicas are gone
            return
        for revision in (state.stored, state.serving):  # (once its environment is ready)
            if revision is not None:
                self._prepare(state, revision)
        job = self._wanted(state)
        canary = state.canary
        wanted = state.desired if canary is None else canary_replicas(state.desired, canary)
        current = self._fleet(state, state.stored, wanted, job)
        ready = sum(1 for r in current if r.state is ReplicaState.READY)
        if state.proven and ready >= state.desired and canary is None:
            self._promote(state)
        fallback = state.serving
        if fallback is not None:  # the last revision that served keeps serving until the new one can
            self._fleet(state, fallback, state.desired, job)
        keep = {state.revision} | ({fallback.revision} if fallback is not None else set())
        for replica in [r for r in state.replicas.values() if r.revision not in keep or r.job != job]:
            self._retire(replica)
        self._tell_gateway(state)

    def _wanted(self, state: ApiState) -> str | None:
        """Ask the kind how many replicas to run (a batch API: its running job's workers); returns the job."""
        if state.kind.autoscaled:
            return None
        wanted = state.kind.wanted(self, state.name, state.scaler.desired, state.scaler.reason)
        state.scaler.desired, state.scaler.reason = wanted.replicas, wanted.reason
        return wanted.job

    def _fleet(self, state: ApiState, stored: StoredApi, wanted: int, job: str | None) -> list[Replica]:
        """Keep `wanted` replicas of revision `stored` (restarting those whose backoff is over); returns them."""
        now = self.clock()
        fleet = [
            r
            for r in state.replicas.values()
            if r.revision == stored.revision and r.job == job and r.state is not ReplicaState.DRAINING
        ]
        for replica in fleet:
            if replica.state is ReplicaState.BACKOFF and now >= replica.next_start_at:
                replica.state = ReplicaState.PENDING  # placed again, by _place_pending
        missing = max(0, wanted) - len(fleet)
        for _ in range(missing):
            replica = Replica(
                id=f"{state.name}-{secrets.token_hex(3)}",
                api=state.name,
                revision=stored.revision,
                state=ReplicaState.PENDING,
                stored=stored,
                job=job,
            )
            state.replicas[replica.id] = replica
            self._by_replica[replica.id] = replica
            fleet.append(replica)
        if missing < 0:
            # Too many: retire the least useful first: pending, then starting, then the least loaded.
            load = self.gateway.api_metrics(state.name, time.time())[5]
            order = {ReplicaState.PENDING: 0, ReplicaState.BACKOFF: 0, ReplicaState.STARTING: 1}
            surplus = sorted(fleet, key=lambda r: (order.get(r.state, 2), load.get(r.id, 0)))[:-missing]
            for replica in surplus:
                self._retire(replica)
                fleet.remove(replica)
        return fleet

    def _promote(self, state: ApiState) -> None:
        """The revision rolled to serves in full: it is the one a restart restores."""
        state.serving = None
        if state.saved != state.revision:
            state.saved = state.revision
            self.store.set_serving(state.name, state.revision)
            log.info("%s: revision %d serves", state.name, state.revision)

    def _tell_gateway(self, state: ApiState) -> None:
        """Requests get 503 at once, naming the load error, while no revision of the API can serve."""
        reason = None
        live = [r for r in state.replicas.values() if r.state is not ReplicaState.DRAINING]
        if not any(r.state in (ReplicaState.READY, ReplicaState.STARTING) for r in live):
            failing = [r for r in live if r.consecutive_failures > 0 and r.last_error]
            fetch = self.models.failure((state.name, state.revision)) or self.envs.failure((state.name, state.revision))
            # (a revision that has loaded can serve again: requests wait for its restarted replicas)
            if state.serving is None and state.revision not in state.loaded and (failing or fetch):
                error = fetch or failing[0].last_error
                reason = f"API {state.name!r} cannot serve: revision {state.revision} does not load: {error}"
        if reason != state.unavailable:
            state.unavailable = reason
            self.gateway.set_unavailable(state.name, reason)
        if state.kind.runs_replicas and (state.kind.takes_predictions or state.kind.proxied):
            serving = state.serving.revision if state.serving is not None else state.revision
            canary = state.revision if state.canary is not None else None
            self.gateway.set_canary(state.name, serving, canary, state.canary or 0.0)

    def _place_pending(self) -> None:
        """Start pending replicas, oldest API first, as far as the node's capacity allows."""
        for state in list(self.apis.values()):
            for replica in list(state.replicas.values()):
                if replica.state is not ReplicaState.PENDING:
                    continue
                stored = replica.stored or state.stored
                paths, waiting = self.start_gate(stored)
                if paths is None:
                    replica.reason = waiting
                    continue
                placed = self.runtime.reserve(replica.id, stored.deployment.spec.compute)
                if isinstance(placed, Unplaceable):
                    replica.reason = placed.reason
                    continue
                replica.reservation = placed
                replica.reason = None
                self._start(state, replica, paths)

    def start_gate(self, stored: StoredApi) -> tuple[dict[str, str] | None, str | None]:
        """(the revision's fetched models, None) when its replicas may start now; else (None, why they
        wait): its models are being fetched, or its Python environment built, or either failed and will be retried."""
        key = (stored.name, stored.revision)
        paths = self.models.paths(key, stored.deployment)
        env_ready = self.envs.ready(key, stored.deployment, partial(self.code_dir, stored))
        if paths is None or not env_ready:
            return None, self.models.waiting_reason(key) or self.envs.waiting_reason(key)
        return paths, None

    def _release_templates(self, state: ApiState) -> None:
        """Release the runtime's preparation of revisions that will start no more replicas."""
        for revision in list(state.prepared):
            serving = state.serving.revision if state.serving is not None else None
            if revision in (state.revision, serving) and not state.deleted:
                continue
            if any(r.revision == revision for r in state.replicas.values()):
                continue  # an old revision may still need a restart while the new one comes up
            state.prepared.discard(revision)
            self.models.release((state.name, revision))
            self.envs.release((state.name, revision))
            self._run_in_background(self.runtime.release(state.name, revision))

    def _launch_for(
        self, stored: StoredApi, replica_id: str, job: str | None = None, models: dict[str, str] | None = None
    ) -> tuple[ReplicaLaunch, dict[str, str]]:
        spec = stored.deployment.spec
        config: dict[str, Any] = {}
        queue: QueueConfig | None
        if job is not None and self.jobs is not None and self.queue_url is not None:
            queue, config = self.jobs.launch(job, spec, self.queue_url)
        else:
            queue = kind_of(spec.kind).queue(spec, self.queue_url)
        python = self.envs.interpreter((stored.name, stored.revision))
        return build_launch(stored, replica_id, self.code_dir(stored), self.debug_errors, queue, config, models, python)

    def snapshot(self, deployment: Deployment, spec_file: str | None = None) -> Deployment:
        """The deployment with a snapshot of its project directory (packed here, on this node), which
        leaves out the spec file (`spec_file`, else cirrus.yaml / cirrus.yml): the revision records the spec."""
        if deployment.snapshot is not None or self.snapshots is None:
            return deployment
        leave_out = (spec_file,) if spec_file else SPEC_FILENAMES
        snapshot = self.snapshots.add(Path(deployment.project_dir), leave_out)
        return deployment.model_copy(update={"snapshot": snapshot.digest})

    def code_dir(self, stored: StoredApi) -> str:
        """Where a revision's replicas run from: its unpacked snapshot, never the user's working tree."""
        digest = stored.deployment.snapshot
        if digest is None or self.snapshots is None:
            return stored.deployment.project_dir
        return str(self.snapshots.unpacked(digest))

    def _start(self, state: ApiState, replica: Replica, models: dict[str, str]) -> None:
        replica.state = ReplicaState.STARTING
        replica.started_at = time.time()
        launch, env = self._launch_for(replica.stored or state.stored, replica.id, replica.job, models)
        replica.secret = launch.secret
        self._spawn(replica, self._launch(replica, launch, env))

    async def _launch(self, replica: Replica, launch: ReplicaLaunch, env: dict[str, str]) -> None:
        try:
            replica.pid = await self.runtime.start(launch, env)
        except Exception as exc:
            log.exception("cannot start replica %s", replica.id)
            self.replica_exited(replica.id, ReplicaExit(error=f"the runtime could not start it: {exc}", stage="start"))

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
        replica.reservation = None
        self.runtime.unreserve(replica.id)
        self._by_replica.pop(replica.id, None)
        state = self.apis.get(replica.api)
        if state is not None:
            state.replicas.pop(replica.id, None)

    def _run_in_background(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _spawn(self, replica: Replica, coro: object) -> None:
        task: asyncio.Task[None] = asyncio.get_running_loop().create_task(coro)  # type: ignore[arg-type]
        replica.task = task
