"""The controller's state machine, driven with FakeRuntime + FakeGateway and an injected clock."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from cirrus.control.controller import BACKOFF_MAX_S, Controller, backoff_s
from cirrus.control.store import Store
from cirrus.snapshots import SnapshotStore
from cirrus.spec import Deployment, parse_specs
from cirrus.testing import FakeGateway, FakeRuntime
from cirrus.types import ApiStatusName, ReplicaState

T = TypeVar("T")


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


class Clock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class World:
    """A controller over fakes, plus helpers to deploy and to let it act."""

    def __init__(self, tmp_path: Path, db: Path | None = None) -> None:
        self.tmp_path = tmp_path
        self.clock = Clock()
        self.runtime = FakeRuntime(tmp_path / "logs")
        self.gateway = FakeGateway()
        self.store = Store(db or tmp_path / "state.db")
        self.snapshots = SnapshotStore(tmp_path / "snapshots")
        self.controller = Controller(
            self.store,
            self.runtime,
            self.gateway,
            endpoint=lambda name: f"http://test/{name}",
            clock=self.clock,
            snapshots=self.snapshots,
        )

    def deployment(self, name: str = "api", code: str = "v1", **fields: Any) -> Deployment:
        project = self.tmp_path / "project"
        project.mkdir(exist_ok=True)
        (project / "predictor.py").write_text(
            f"class Predictor:\n    def predict(self, payload):\n        return {code!r}\n"
        )
        [spec] = parse_specs({"name": name, "predictor": {"path": "predictor.py"}, **fields})
        return Deployment(spec=spec, project_dir=str(project), snapshot=self.snapshots.add(project).digest)

    async def settle(self) -> None:
        """Let every task the controller spawned run to its next wait (the fakes never block)."""
        for _ in range(20):
            await asyncio.sleep(0)

    async def reconcile(self) -> None:
        """One pass of the controller's loop, with the tasks it spawned before and after run out."""
        await self.settle()
        self.controller.reconcile()
        await self.settle()

    def replicas(self, api: str = "api") -> dict[str, ReplicaState]:
        state = self.controller.apis[api]
        return {r.id: r.state for r in state.replicas.values()}

    def status(self, api: str = "api") -> ApiStatusName:
        status = self.controller.status(api)
        assert status is not None
        return status.status

    def close(self) -> None:
        self.store.close()


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    w = World(tmp_path)
    yield w
    w.close()


def scaled(n: int) -> dict[str, Any]:
    return {"autoscaling": {"min_replicas": n, "max_replicas": max(n, 1)}}


# --- backoff (pure) -------------------------------------------------------------------------------


def test_backoff_doubles_up_to_a_cap() -> None:
    assert [backoff_s(n) for n in range(7)] == [0.0, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0]
    assert backoff_s(7) == backoff_s(100) == BACKOFF_MAX_S


# --- deploy and ready -----------------------------------------------------------------------------


def test_deploy_starts_init_replicas_and_goes_live(world: World) -> None:
    async def main() -> None:
        [result] = world.controller.deploy([world.deployment(autoscaling={"min_replicas": 1, "init_replicas": 2})])
        assert (result.name, result.action, result.revision) == ("api", "created", 1)
        assert result.endpoint == "http://test/api"
        assert "api" in world.gateway.apis
        await world.reconcile()
        running = world.runtime.running()
        assert len(running) == 2
        assert all(state is ReplicaState.STARTING for state in world.replicas().values())
        assert world.status() is ApiStatusName.STARTING
        launch = world.runtime.launches[0]
        assert (launch.api, launch.revision, launch.predictor_path, launch.class_name) == (
            "api",
            1,
            "predictor.py",
            "Predictor",
        )
        assert world.runtime.envs[running[0]]["CIRRUS_REPLICA_ID"] == running[0]
        # A second pass starts nothing more.
        await world.reconcile()
        assert len(world.runtime.launches) == 2

        world.runtime.make_ready(running[0])
        await world.settle()
        assert world.replicas()[running[0]] is ReplicaState.READY
        assert world.gateway.replicas["api"] == [running[0]]
        assert world.status() is ApiStatusName.UPDATING  # one of two ready
        world.runtime.make_ready(running[1])
        await world.settle()
        status = world.controller.status("api")
        assert status is not None
        assert status.status is ApiStatusName.LIVE
        assert (status.replicas_ready, status.replicas_desired, status.revision) == (2, 2, 1)
        assert {r.pid for r in status.replicas} == {world.runtime.replica(rid).pid for rid in running}
        assert [s.name for s in world.controller.statuses()] == ["api"]

    run(main())


def test_zero_replicas_is_live_with_nothing_running(world: World) -> None:
    async def main() -> None:
        world.controller.deploy([world.deployment(**scaled(0))])
        await world.reconcile()
        # A new revision proves it loads first (one replica), then goes to zero (issue: a broken
        # predictor used to look live at min_replicas 0).
        [proof] = world.runtime.running()
        world.runtime.make_ready(proof)
        await world.reconcile()
        await world.reconcile()
        assert world.runtime.running() == []
        assert world.status() is ApiStatusName.LIVE

    run(main())


def test_unchanged_redeploy(world: World) -> None:
    async def main() -> None:
        world.controller.deploy([world.deployment()])
        await world.reconcile()
        [replica_id] = world.runtime.running()
        world.runtime.make_ready(replica_id)
        await world.settle()
        [again] = world.controller.deploy([world.deployment()])
        assert (again.action, again.revision) == ("unchanged", 1)
        await world.reconcile()
        assert world.runtime.running() == [replica_id]
        assert len(world.runtime.launches) == 1
        assert world.status() is ApiStatusName.LIVE
        # Changing only the predictor's code is a change.
        [changed] = world.controller.deploy([world.deployment(code="v2")])
        assert (changed.action, changed.revision) == ("updated", 2)

    run(main())


# --- crashes and backoff --------------------------------------------------------------------------


def test_crash_restarts_with_exponential_backoff(world: World) -> None:
    async def main() -> None:
        world.controller.deploy([world.deployment()])
        await world.reconcile()
        [replica_id] = world.runtime.running()
        world.runtime.make_ready(replica_id)
        await world.settle()
        assert world.status() is ApiStatusName.LIVE

        for failures, delay in enumerate([0.5, 1.0, 2.0, 4.0], start=1):
            world.runtime.crash(replica_id, code=3, log_tail=["Traceback ...", "MemoryError"])
            assert world.replicas()[replica_id] is ReplicaState.BACKOFF
            assert ("api", replica_id) in world.gateway.drained
            assert replica_id not in world.gateway.replicas["api"]
            status = world.controller.status("api")
            assert status is not None
            assert status.status is ApiStatusName.ERROR
            assert status.message is not None
            assert status.message.startswith("exited with code 3; last log lines:\nTraceback ...\nMemoryError")
            assert status.replicas[0].restarts == failures
            starts = len(world.runtime.launches)
            world.clock.advance(delay - 0.01)
            await world.reconcile()
            assert world.runtime.running() == [], f"restarted before {delay}s"
            assert len(world.runtime.launches) == starts
            world.clock.advance(0.01)
            await world.reconcile()
            assert world.runtime.running() == [replica_id]  # the same replica, started again
            assert world.replicas()[replica_id] is ReplicaState.STARTING
            assert len(world.runtime.launches) == starts + 1

        # Serving again resets the backoff.
        world.runtime.make_ready(replica_id)
        await world.settle()
        assert world.status() is ApiStatusName.LIVE
        world.runtime.crash(replica_id, signal=9)
        message = world.controller.status("api")
        assert message is not None and message.message == "killed by signal 9 (SIGKILL)"
        world.clock.advance(0.5)
        await world.reconcile()
        assert world.runtime.running() == [replica_id]

    run(main())


def test_one_of_two_failing_is_degraded(world: World) -> None:
    async def main() -> None:
        world.controller.deploy([world.deployment(**scaled(2))])
        await world.reconcile()
        good, bad = world.runtime.running()
        world.runtime.make_ready(good)
        world.runtime.fail_load(bad, "boom")
        await world.settle()
        status = world.controller.status("api")
        assert status is not None
        assert status.status is ApiStatusName.DEGRADED
        assert status.message == "failed to load the predictor: boom"

    run(main())


def test_load_failure_is_an_error_with_the_message(world: World) -> None:
    async def main() -> None:
        world.controller.deploy([world.deployment()])
        await world.reconcile()
        [replica_id] = world.runtime.running()
        world.runtime.fail_load(replica_id, "ModuleNotFoundError: No module named 'torch'")
        status = world.controller.status("api")
        assert status is not None
        assert status.status is ApiStatusName.ERROR
        assert status.message == "failed to load the predictor: ModuleNotFoundError: No module named 'torch'"
        assert status.replicas[0].state is ReplicaState.BACKOFF
        assert status.replicas[0].last_error == status.message
        assert world.gateway.added == []

    run(main())


def test_runtime_that_cannot_start_a_replica(world: World) -> None:
    async def main() -> None:
        world.runtime.start_error = OSError("no such interpreter")
        world.controller.deploy([world.deployment()])
        await world.reconcile()
        status = world.controller.status("api")
        assert status is not None
        assert status.status is ApiStatusName.ERROR
        assert status.message is not None and "the runtime could not start it: no such interpreter" in status.message
        world.runtime.start_error = None
        world.clock.advance(0.5)
        await world.reconcile()
        assert len(world.runtime.running()) == 1

    run(main())


def test_gateway_that_cannot_connect_stops_the_replica(world: World) -> None:
    async def main() -> None:
        world.gateway.add_error = ConnectionRefusedError("refused")
        world.controller.deploy([world.deployment()])
        await world.reconcile()
        [replica_id] = world.runtime.running()
        world.runtime.make_ready(replica_id)
        await world.settle()
        assert world.runtime.stops == [replica_id]
        status = world.controller.status("api")
        assert status is not None
        assert status.status is ApiStatusName.ERROR
        assert status.message is not None and "could not connect" in status.message
        # It is restarted after the backoff, and serves once the gateway can reach it.
        world.gateway.add_error = None
        world.clock.advance(0.5)
        await world.reconcile()
        world.runtime.make_ready(replica_id)
        await world.settle()
        assert world.status() is ApiStatusName.LIVE

    run(main())


# --- revisions ------------------------------------------------------------------------------------


def test_new_revision_replaces_the_old_only_once_ready(world: World) -> None:
    async def main() -> None:
        world.controller.deploy([world.deployment(**scaled(2))])
        await world.reconcile()
        old = world.runtime.running()
        for replica_id in old:
            world.runtime.make_ready(replica_id)
        await world.settle()

        [result] = world.controller.deploy([world.deployment(code="v2", **scaled(2))])
        assert (result.action, result.revision) == ("updated", 2)
        await world.reconcile()
        new = [rid for rid in world.runtime.running() if rid not in old]
        assert len(new) == 2
        assert {world.runtime.replica(rid).launch.revision for rid in new} == {2}
        assert world.status() is ApiStatusName.UPDATING
        assert world.gateway.drained == []

        world.runtime.make_ready(new[0])
        await world.reconcile()
        assert world.gateway.drained == []  # one of two new replicas is not enough
        assert sorted(world.gateway.replicas["api"]) == sorted([*old, new[0]])

        world.runtime.make_ready(new[1])
        await world.reconcile()
        assert set(world.gateway.drained) == {("api", rid) for rid in old}
        assert sorted(world.gateway.waited) == sorted(("api", rid) for rid in old)
        assert sorted(world.runtime.stops) == sorted(old)
        assert sorted(world.runtime.running()) == sorted(new)
        assert sorted(world.gateway.replicas["api"]) == sorted(new)
        assert set(world.replicas()) == set(new)
        status = world.controller.status("api")
        assert status is not None
        assert (status.status, status.revision, status.replicas_ready) == (ApiStatusName.LIVE, 2, 2)

    run(main())


def test_failing_new_revision_keeps_the_old_serving(world: World) -> None:
    async def main() -> None:
        world.controller.deploy([world.deployment()])
        await world.reconcile()
        [old] = world.runtime.running()
        world.runtime.make_ready(old)
        await world.settle()
        world.controller.deploy([world.deployment(code="broken")])
        await world.reconcile()
        [new] = [rid for rid in world.runtime.running() if rid != old]
        world.runtime.fail_load(new, "SyntaxError")
        await world.reconcile()
        status = world.controller.status("api")
        assert status is not None
        assert status.status is ApiStatusName.ERROR
        assert status.message == (
            "revision 2 does not start (an older revision still serves): failed to load the predictor: SyntaxError"
        )
        assert world.gateway.replicas["api"] == [old]
        assert world.runtime.stops == []

    run(main())


def test_a_replica_lost_with_its_node_is_replaced_at_once(world: World) -> None:
    async def main() -> None:
        world.controller.deploy([world.deployment()])
        await world.reconcile()
        [replica_id] = world.runtime.running()
        world.runtime.make_ready(replica_id)
        await world.settle()
        for _ in range(3):  # not a crash: no backoff, however often it happens
            world.runtime.lose(replica_id, "its node (abc) died")
            status = world.controller.status("api")
            assert status is not None and status.replicas[0].last_error == "lost: its node (abc) died"
            await world.reconcile()
            assert world.runtime.running() == [replica_id]
            world.runtime.make_ready(replica_id)
            await world.settle()

    asyncio.run(main())


def test_old_revision_that_crashes_during_an_update_restarts_with_its_own_revision(world: World) -> None:
    async def main() -> None:
        world.controller.deploy([world.deployment()])
        await world.reconcile()
        [old] = world.runtime.running()
        world.runtime.make_ready(old)
        await world.settle()
        world.controller.deploy([world.deployment(code="v2")])
        await world.reconcile()
        [new] = [rid for rid in world.runtime.running() if rid != old]
        world.runtime.fail_load(new, "SyntaxError")
        world.runtime.crash(old, signal=9)
        assert world.replicas()[old] is ReplicaState.BACKOFF
        world.clock.advance(0.5)
        await world.reconcile()
        assert old in world.runtime.running()  # restarted: the new revision cannot serve yet
        assert world.runtime.replica(old).launch.revision == 1

    run(main())


def test_surplus_replicas_retire_not_ready_first(world: World) -> None:
    async def main() -> None:
        world.controller.deploy([world.deployment(**scaled(3))])
        await world.reconcile()
        first, *rest = world.runtime.running()
        world.runtime.make_ready(first)
        await world.settle()
        # Lower the target within the same revision (as an autoscaler would).
        state = world.controller.apis["api"]
        state.scaler.desired = 1
        await world.reconcile()
        assert world.runtime.running() == [first]
        assert sorted(world.runtime.stops) == sorted(rest)
        assert world.status() is ApiStatusName.LIVE

    run(main())


# --- delete and restore ---------------------------------------------------------------------------


def test_delete_drains_and_removes(world: World) -> None:
    async def main() -> None:
        world.controller.deploy([world.deployment(**scaled(2))])
        await world.reconcile()
        ready, starting = world.runtime.running()
        world.runtime.make_ready(ready)
        await world.settle()

        assert world.controller.delete("api") is True
        assert world.gateway.removed_apis == ["api"]
        assert world.controller.status("api") is None
        assert world.controller.statuses() == []
        assert world.store.get("api") is None
        await world.reconcile()
        assert world.runtime.running() == []
        assert ("api", ready) in world.gateway.drained
        assert sorted(world.runtime.stops) == sorted([ready, starting])
        await world.reconcile()
        assert "api" not in world.controller.apis
        assert world.controller.delete("api") is False

        # The name can be deployed again.
        [result] = world.controller.deploy([world.deployment()])
        assert (result.action, result.revision) == ("created", 2)
        await world.reconcile()
        assert len(world.runtime.running()) == 1

    run(main())


def test_delete_of_a_replica_in_backoff(world: World) -> None:
    async def main() -> None:
        world.controller.deploy([world.deployment()])
        await world.reconcile()
        [replica_id] = world.runtime.running()
        world.runtime.crash(replica_id)
        world.controller.delete("api")
        await world.reconcile()
        await world.reconcile()
        assert "api" not in world.controller.apis
        world.clock.advance(60)
        await world.reconcile()
        assert world.runtime.running() == []

    run(main())


def test_restore_after_a_restart(tmp_path: Path) -> None:
    async def first_life() -> None:
        w = World(tmp_path)
        w.controller.deploy([w.deployment("one"), w.deployment("two", **scaled(2))])
        w.controller.deploy([w.deployment("one", code="v2")])
        await w.reconcile()
        w.controller.delete("two")
        w.controller.deploy([w.deployment("three")])
        await w.controller.shutdown()
        assert w.runtime.closed and w.runtime.running() == []
        w.close()

    async def second_life() -> None:
        w = World(tmp_path, db=tmp_path / "state.db")
        w.controller.restore()
        assert sorted(w.controller.apis) == ["one", "three"]
        assert sorted(w.gateway.apis) == ["one", "three"]
        await w.reconcile()
        assert sorted(launch.api for launch in w.runtime.launches) == ["one", "three"]
        assert {launch.api: launch.revision for launch in w.runtime.launches} == {"one": 2, "three": 1}
        for replica_id in w.runtime.running():
            w.runtime.make_ready(replica_id)
        await w.settle()
        assert [(s.name, s.status, s.revision) for s in w.controller.statuses()] == [
            ("one", ApiStatusName.LIVE, 2),
            ("three", ApiStatusName.LIVE, 1),
        ]
        [again] = w.controller.deploy([w.deployment("one", code="v2")])
        assert (again.action, again.revision) == ("unchanged", 2)
        w.close()

    run(first_life())
    run(second_life())


# --- the loop -------------------------------------------------------------------------------------


async def wait_for(condition: Callable[[], bool], timeout_s: float = 2.0) -> None:
    async with asyncio.timeout(timeout_s):
        while not condition():
            await asyncio.sleep(0.005)


def test_run_loop_reacts_to_events(world: World) -> None:
    async def main() -> None:
        loop_task = asyncio.create_task(world.controller.run())
        world.controller.deploy([world.deployment()])
        await wait_for(lambda: len(world.runtime.running()) == 1)
        [replica_id] = world.runtime.running()
        world.runtime.make_ready(replica_id)
        await wait_for(lambda: world.status() is ApiStatusName.LIVE)
        world.controller.deploy([world.deployment(code="v2")])
        await wait_for(lambda: len(world.runtime.running()) == 2)
        [new] = [rid for rid in world.runtime.running() if rid != replica_id]
        world.runtime.make_ready(new)
        await wait_for(lambda: world.runtime.running() == [new])
        world.controller.delete("api")
        await wait_for(lambda: "api" not in world.controller.apis)
        assert world.runtime.running() == []
        await world.controller.shutdown()
        await asyncio.wait_for(loop_task, 2.0)

    run(main())


# --- the fakes themselves -------------------------------------------------------------------------


def test_fake_runtime_refuses_what_a_real_one_could_not_do(world: World) -> None:
    async def main() -> None:
        with pytest.raises(KeyError, match="is not running"):
            world.runtime.make_ready("ghost")
        with pytest.raises(KeyError, match="is not running"):
            world.runtime.crash("ghost")
        world.controller.deploy([world.deployment()])
        await world.reconcile()
        [replica_id] = world.runtime.running()
        world.runtime.make_ready(replica_id)
        with pytest.raises(RuntimeError, match="already ready"):
            world.runtime.make_ready(replica_id)
        with pytest.raises(RuntimeError, match="cannot fail to load"):
            world.runtime.fail_load(replica_id, "late")
        assert world.runtime.ready() == [replica_id]
        assert world.runtime.log_path("api", replica_id) == world.tmp_path / "logs" / "api" / f"{replica_id}.log"
        await world.settle()
        world.gateway.in_flight[replica_id] = 3
        status = world.controller.status("api")
        assert status is not None and status.in_flight == 3 and status.replicas[0].in_flight == 3

    run(main())


# --- templates: prepared at deploy, released once a revision can start no more replicas ----------


def test_runtime_prepares_each_revision_and_releases_retired_ones(world: World) -> None:
    async def main() -> None:
        world.controller.deploy([world.deployment()])
        await world.reconcile()
        assert world.runtime.prepared == [("api", 1)]
        [old] = world.runtime.running()
        world.runtime.make_ready(old)
        await world.settle()

        world.controller.deploy([world.deployment(code="v2")])
        await world.reconcile()
        assert world.runtime.prepared == [("api", 1), ("api", 2)]
        assert world.runtime.released == []  # revision 1 still serves and may need a restart
        [new] = [rid for rid in world.runtime.running() if rid != old]
        world.runtime.make_ready(new)
        await world.reconcile()  # revision 1 drains and stops
        await world.reconcile()
        assert world.runtime.released == [("api", 1)]

        world.controller.delete("api")
        await world.reconcile()
        await world.reconcile()
        assert world.runtime.released == [("api", 1), ("api", 2)]
        assert world.runtime.templates == set()

    run(main())


def test_scale_to_zero_keeps_the_template_for_a_fast_cold_start(world: World) -> None:
    async def main() -> None:
        world.controller.deploy([world.deployment(autoscaling={"min_replicas": 0, "max_replicas": 2})])
        await world.reconcile()
        [proof] = world.runtime.running()  # the deploy proves the revision loads, then goes to zero
        world.runtime.make_ready(proof)
        await world.reconcile()
        await world.reconcile()
        assert world.runtime.running() == []
        assert world.runtime.templates == {("api", 1)}
        world.gateway.demand["api"] = 1.0
        world.controller.demand("api")  # a request arrived at zero replicas
        await world.reconcile()
        assert len(world.runtime.running()) == 1

    run(main())
