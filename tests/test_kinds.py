"""Every kind through its behaviour object, with the controller over the fake runtime and real stores
(an SQLite queue store, the job manager on the state database): what each kind wants, what scales
it, what its replicas pull from, and how its status reads."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, get_args

import pytest
from test_controller import World

from cirrus.control.controller import AUTOSCALE_INTERVAL_S, Controller
from cirrus.control.jobs import JobManager, JobStore
from cirrus.gateway.routing import ApiRoute
from cirrus.jobs import JobRequest
from cirrus.kinds import KINDS, kind_of
from cirrus.spec import ApiSpec
from cirrus.store.base import NewRequest
from cirrus.store.sqlite import SqliteQueueStore
from cirrus.types import ApiStatusName


class KindWorld(World):
    """The controller world with a queue store and a job manager, as the daemon wires them."""

    def __init__(self, tmp_path: Path) -> None:
        super().__init__(tmp_path)
        self.queue = SqliteQueueStore(str(tmp_path / "queue.db"))
        self.jobs = JobManager(JobStore(tmp_path / "jobs.db"), self.queue, tmp_path / "results")
        self.controller = Controller(
            self.store,
            self.runtime,
            self.gateway,
            endpoint=lambda name: f"http://test/{name}",
            clock=self.clock,
            queue_store=self.queue,
            queue_url=f"sqlite://{tmp_path / 'queue.db'}",
            jobs=self.jobs,
            snapshots=self.snapshots,
        )

    def close(self) -> None:
        self.queue.close()
        super().close()


@pytest.fixture
def world(tmp_path: Path) -> Iterator[KindWorld]:
    w = KindWorld(tmp_path)
    yield w
    w.close()


def run(coro: Any) -> None:
    asyncio.run(coro)


def autoscale(world: World, seconds: float) -> None:
    for _ in range(int(seconds / AUTOSCALE_INTERVAL_S)):
        world.clock.advance(AUTOSCALE_INTERVAL_S)
        world.controller.autoscale()


def test_every_kind_of_the_spec_has_a_behaviour() -> None:
    assert set(KINDS) == {"realtime", "async", "batch", "splitter", "server", "task"}
    assert set(KINDS) == set(get_args(ApiSpec.model_fields["kind"].annotation))
    assert [kind_of(name).name for name in KINDS] == list(KINDS)
    with pytest.raises(ValueError, match="unknown API kind 'stream'; known: realtime, async, batch, splitter, server"):
        kind_of("stream")


def test_the_gateway_serves_each_kind_by_its_behaviour() -> None:
    realtime, queued, batch = (ApiRoute("a", 4, 8, 1.0, kind) for kind in ("realtime", "async", "batch"))
    assert (realtime.behaviour.takes_predictions, realtime.behaviour.queued, realtime.behaviour.model_paths) == (
        True,
        False,
        True,
    )
    assert (queued.behaviour.takes_predictions, queued.behaviour.queued) == (True, True)
    assert not batch.behaviour.takes_predictions
    assert "cirrus jobs submit a" in batch.behaviour.no_predictions_hint("a")


def test_realtime_scales_on_the_gateways_load(world: KindWorld) -> None:
    async def main() -> None:
        spec = {"min_replicas": 1, "max_replicas": 4, "window_s": 5, "panic_window_s": 2}
        world.controller.deploy([world.deployment(autoscaling=spec)])
        world.gateway.demand["api"] = 4.0
        autoscale(world, 10)
        assert world.controller.apis["api"].desired == 4
        await world.reconcile()
        assert all(launch.queue is None for launch in world.runtime.launches)

    run(main())


def test_async_scales_on_the_queue_backlog_and_pulls_from_the_store(world: KindWorld) -> None:
    async def main() -> None:
        spec = {"min_replicas": 1, "max_replicas": 3, "window_s": 5, "panic_window_s": 2}
        world.controller.deploy([world.deployment(kind="async", autoscaling=spec)])
        requests = [NewRequest("api", uuid.uuid4().hex, b"{}", "application/json") for _ in range(6)]
        world.queue.submit_many(requests, time.time())
        world.gateway.demand["api"] = 0.0  # the gateway holds nothing: the backlog is in the store
        autoscale(world, 10)
        assert world.controller.apis["api"].desired == 3
        await world.reconcile()
        queue = world.runtime.launches[0].queue
        assert queue is not None and queue.store_url.startswith("sqlite://")
        assert world.gateway.apis["api"].timeout_s == 30.0

    run(main())


def test_batch_runs_its_jobs_workers_and_needs_no_proof_replica(world: KindWorld) -> None:
    async def main() -> None:
        world.controller.deploy([world.deployment(kind="batch", autoscaling={"min_replicas": 0})])
        await world.reconcile()
        assert world.runtime.running() == []  # no job, no worker: nothing to prove without one
        status = world.controller.status("api")
        assert status is not None and status.status is ApiStatusName.LIVE
        assert status.message == "no job running; start one with `cirrus jobs submit api`"

        spec = world.controller.apis["api"].stored.deployment.spec
        job = world.jobs.submit(spec, JobRequest(items=list(range(30)), batch_size=10, workers=5))
        world.jobs.track(job)
        world.controller.step_jobs()
        await world.reconcile()
        assert len(world.runtime.running()) == 3  # min(workers, batches)
        launch = world.runtime.launches[0]
        assert launch.queue is not None and launch.queue.job is not None
        assert (launch.queue.job.job_id, launch.queue.queue_name) == (job.id, job.queue)
        autoscale(world, 5)  # the autoscaler leaves a batch API alone
        assert world.controller.apis["api"].scaler.reason == f"job {job.id}: 3 workers"

    run(main())


def test_replicas_reach_the_queue_store_the_way_the_runtime_says(tmp_path: Path) -> None:
    world = World(tmp_path)
    daemon_url = f"sqlite://{tmp_path / 'queue.db'}"
    world.runtime.store_urls[daemon_url] = "redis://queue.cluster:6379/0"  # as a cluster runtime would
    controller = Controller(
        world.store,
        world.runtime,
        world.gateway,
        endpoint=lambda name: f"http://test/{name}",
        clock=world.clock,
        queue_url=daemon_url,
        snapshots=world.snapshots,
    )

    async def main() -> None:
        controller.deploy([world.deployment(kind="async")])
        await world.settle()
        controller.reconcile()
        await world.settle()
        queue = world.runtime.launches[-1].queue
        assert queue is not None and queue.store_url == "redis://queue.cluster:6379/0"

    try:
        run(main())
    finally:
        world.close()
