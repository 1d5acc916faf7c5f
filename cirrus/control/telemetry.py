"""The control plane's Prometheus metrics, built at scrape time from the controller's state.

Replicas by revision and state, the replicas the autoscaler wants, async APIs' backlogs, running
jobs' progress and replica restarts. The daemon adds this collector to the gateway's `/metrics`
(docs/observability.md lists every metric). A scrape reads memory, except the backlog: a queue
store call per async API, cached for `BACKLOG_TTL_S`, and left out (logged) when the store fails,
so an unreachable store never breaks `/metrics`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from cirrus.types import ReplicaState

if TYPE_CHECKING:
    from cirrus.control.controller import ApiState, Controller
    from cirrus.store.base import Backlog

log = logging.getLogger("cirrus.telemetry")

BACKLOG_TTL_S = 1.0  # scrapes within this reuse an API's last backlog read


class ControlPlaneCollector:
    """A prometheus_client collector (`collect()`) over a controller; `clock`: wall time, as the
    queue store stamps requests."""

    def __init__(self, controller: Controller, clock: Callable[[], float] = time.time) -> None:
        self.controller = controller
        self.clock = clock
        self._backlogs: dict[str, tuple[float, Backlog | None]] = {}  # api -> (read at, backlog; None: failed)
        self._restarts: dict[str, int] = {}  # api -> restarts counted so far (replicas gone included)
        self._seen: dict[str, int] = {}  # replica id -> its restarts at the last count

    def collect(self) -> Iterator[Metric]:
        apis = sorted((s for s in self.controller.apis.values() if not s.deleted), key=lambda s: s.name)
        yield from self._replicas(apis)
        yield from self._backlog(apis)
        yield from self._jobs(apis)

    def _replicas(self, apis: list[ApiState]) -> Iterator[Metric]:
        replicas = GaugeMetricFamily(
            "cirrus_replicas", "Replicas by revision and state", labels=["api", "revision", "state"]
        )
        desired = GaugeMetricFamily("cirrus_replicas_desired", "Replicas the autoscaler wants", labels=["api"])
        restarts = CounterMetricFamily(
            "cirrus_replica_restarts", "Replicas restarted after a crash or a failed load", labels=["api"]
        )
        self._count_restarts(apis)
        for state in apis:
            revisions = {state.revision, *(r.revision for r in state.replicas.values())}
            for revision in sorted(revisions):
                mine = [r.state for r in state.replicas.values() if r.revision == revision]
                for replica_state in ReplicaState:
                    replicas.add_metric([state.name, str(revision), replica_state.value], mine.count(replica_state))
            desired.add_metric([state.name], state.desired)
            restarts.add_metric([state.name], self._restarts.get(state.name, 0))
        yield from (replicas, desired, restarts)

    def _count_restarts(self, apis: list[ApiState]) -> None:
        """Replicas count their own restarts and are forgotten when they stop: the API's counter adds
        each replica's increase since the last scrape, so it never goes down."""
        seen: dict[str, int] = {}
        for state in apis:
            for replica in state.replicas.values():
                before = self._seen.get(replica.id, 0)
                if replica.restarts > before:
                    self._restarts[state.name] = self._restarts.get(state.name, 0) + replica.restarts - before
                seen[replica.id] = replica.restarts
        self._seen = seen
        live = {state.name for state in apis}
        self._restarts = {api: n for api, n in self._restarts.items() if api in live}

    def _backlog(self, apis: list[ApiState]) -> Iterator[Metric]:
        requests = GaugeMetricFamily(
            "cirrus_async_backlog_requests", "Async requests stored and not finished", labels=["api", "status"]
        )
        oldest = GaugeMetricFamily(
            "cirrus_async_oldest_queued_age_seconds", "Age of the oldest queued async request", labels=["api"]
        )
        now = self.clock()
        for state in apis:
            if not state.kind.queued:
                continue
            backlog = self._read_backlog(state.name, now)
            if backlog is None:
                continue
            requests.add_metric([state.name, "in_queue"], backlog.in_queue)
            requests.add_metric([state.name, "in_progress"], backlog.in_progress)
            age = 0.0 if backlog.oldest_queued_at is None else max(0.0, now - backlog.oldest_queued_at)
            oldest.add_metric([state.name], age)
        live = {state.name for state in apis}
        self._backlogs = {api: cached for api, cached in self._backlogs.items() if api in live}
        yield from (requests, oldest)

    def _read_backlog(self, api: str, now: float) -> Backlog | None:
        cached = self._backlogs.get(api)
        if cached is not None and 0 <= now - cached[0] < BACKLOG_TTL_S:
            return cached[1]
        store = self.controller.queue_store
        backlog = None
        if store is not None:
            try:
                backlog = store.backlog(api, now, detail=True)
            except Exception:
                log.warning("%s: reading the queue backlog for /metrics failed", api, exc_info=True)
        self._backlogs[api] = (now, backlog)
        return backlog

    def _jobs(self, apis: list[ApiState]) -> Iterator[Metric]:
        items = GaugeMetricFamily(
            "cirrus_job_items", "Items of running batch jobs by state", labels=["api", "job", "state"]
        )
        jobs = self.controller.jobs
        for state in apis:
            job = None if jobs is None or not state.kind.runs_jobs else jobs.running(state.name)
            if job is None:
                continue
            failed = sum(batch.size for batch in job.failed_batches)
            items.add_metric([state.name, job.id, "total"], job.total_items)
            items.add_metric([state.name, job.id, "done"], job.items_done)
            items.add_metric([state.name, job.id, "failed"], failed)
        yield items
