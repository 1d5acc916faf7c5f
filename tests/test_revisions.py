"""Revisions as immutable snapshots, through the controller over the fake runtime: what serves is
restored exactly, scale-only changes restart nothing, a deploy proves it loads, failed revisions go,
rollback brings an old snapshot back, and `init_replicas` holds."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any

import pytest
from test_controller import World, scaled

from cirrus.control.controller import AUTOSCALE_INTERVAL_S
from cirrus.types import ApiStatusName


def run(coro: Coroutine[Any, Any, None]) -> None:
    asyncio.run(coro)


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    w = World(tmp_path)
    yield w
    w.close()


async def serve(world: World, **fields: Any) -> str:
    """Deploy `fields`, make the one new replica ready; returns its id."""
    before = set(world.runtime.running())
    world.controller.deploy([world.deployment(**fields)])
    await world.reconcile()
    [new] = [rid for rid in world.runtime.running() if rid not in before]
    world.runtime.make_ready(new)
    await world.reconcile()
    return new


def revisions_running(world: World) -> list[int]:
    return sorted(world.controller.apis["api"].replicas[rid].revision for rid in world.runtime.running())


def test_a_helper_module_edit_is_a_new_revision_and_force_makes_one_too(world: World) -> None:
    async def main() -> None:
        [first] = world.controller.deploy([world.deployment()])
        [same] = world.controller.deploy([world.deployment()])
        assert (first.revision, same.action, same.revision) == (1, "unchanged", 1)
        (world.tmp_path / "project" / "helpers.py").write_text("FACTOR = 2\n")
        [edited] = world.controller.deploy([world.deployment()])
        assert (edited.action, edited.revision) == ("updated", 2)
        [forced] = world.controller.deploy([world.deployment()], force=True)
        assert (forced.action, forced.revision) == ("updated", 3)

    run(main())


def test_replicas_run_the_snapshot_not_the_working_tree(world: World) -> None:
    async def main() -> None:
        deployment = world.deployment(code="v1")
        world.controller.deploy([deployment])
        await world.reconcile()
        [launch] = world.runtime.launches
        assert deployment.snapshot is not None
        assert launch.project_dir == str(world.snapshots.unpacked(deployment.snapshot))
        assert launch.project_dir != deployment.project_dir
        assert "'v1'" in (Path(launch.project_dir) / "predictor.py").read_text()

    run(main())


def test_a_scale_only_change_applies_in_place(world: World) -> None:
    async def main() -> None:
        first = await serve(world, **scaled(1))
        launches = len(world.runtime.launches)
        [result] = world.controller.deploy(
            [world.deployment(autoscaling={"min_replicas": 1, "max_replicas": 7}, concurrency={"timeout_s": 9})]
        )
        assert (result.action, result.revision) == ("scaled", 1)
        await world.reconcile()
        assert world.runtime.running() == [first]
        assert len(world.runtime.launches) == launches and world.runtime.stops == []
        state = world.controller.apis["api"]
        assert state.stored.deployment.spec.autoscaling.max_replicas == 7
        assert world.gateway.apis["api"].timeout_s == 9
        # ...and a change a replica depends on rolls a new revision.
        [rolled] = world.controller.deploy([world.deployment(compute={"cpu": 0.5}, **scaled(1))])
        assert (rolled.action, rolled.revision) == ("updated", 2)

    run(main())


def test_a_restart_restores_the_revision_that_served(world: World, tmp_path: Path) -> None:
    async def main() -> None:
        await serve(world, code="v1")
        world.controller.deploy([world.deployment(code="broken")])
        await world.reconcile()
        [new] = [rid for rid in world.runtime.running() if world.controller.apis["api"].replicas[rid].revision == 2]
        world.runtime.fail_load(new, "SyntaxError")
        await world.reconcile()

        # The daemon dies (kill -9: nothing is shut down) and a new one starts on the same state.
        again = World(tmp_path, db=tmp_path / "state.db")
        again.controller.restore()
        await again.reconcile()
        launched = sorted(launch.revision for launch in again.runtime.launches)
        assert launched == [1, 2]  # revision 1 serves again, revision 2 is tried beside it
        [old] = [launch.replica_id for launch in again.runtime.launches if launch.revision == 1]
        again.runtime.make_ready(old)
        await again.reconcile()
        assert again.gateway.replicas["api"] == [old]
        status = again.controller.status("api")
        assert status is not None and status.revision == 2
        again.close()

    run(main())


def test_a_deploy_at_min_zero_proves_it_loads_then_scales_to_zero(world: World) -> None:
    async def main() -> None:
        world.controller.deploy([world.deployment(**scaled(0))])
        await world.reconcile()
        [proof] = world.runtime.running()
        assert world.status() is ApiStatusName.STARTING
        world.runtime.make_ready(proof)
        await world.reconcile()
        await world.reconcile()
        assert world.status() is ApiStatusName.LIVE
        assert world.runtime.running() == [] and proof in world.runtime.stops

    run(main())


def test_a_broken_predictor_at_min_zero_is_an_error_and_503_at_once(world: World) -> None:
    async def main() -> None:
        world.controller.deploy([world.deployment(**scaled(0))])
        await world.reconcile()
        [proof] = world.runtime.running()
        world.runtime.fail_load(proof, "ZeroDivisionError: division by zero")
        await world.reconcile()
        assert world.status() is ApiStatusName.ERROR
        reason = world.gateway.unavailable["api"]
        assert reason is not None
        assert "revision 1 does not load" in reason and "ZeroDivisionError" in reason
        # A fixed deploy clears it once a replica of it starts.
        world.controller.deploy([world.deployment(code="fixed", **scaled(0))])
        await world.reconcile()
        assert world.gateway.unavailable["api"] is None

    run(main())


def test_a_new_deploy_retires_failed_revisions(world: World) -> None:
    async def main() -> None:
        first = await serve(world, code="v1")
        world.controller.deploy([world.deployment(code="broken")])
        await world.reconcile()
        [broken] = [rid for rid in world.runtime.running() if rid != first]
        world.runtime.fail_load(broken, "SyntaxError")
        await world.reconcile()
        assert broken in world.replicas()  # in backoff
        world.controller.deploy([world.deployment(code="v3")])
        await world.reconcile()
        revisions = {r.revision for r in world.controller.apis["api"].replicas.values()}
        assert revisions == {1, 3}
        status = world.controller.status("api")
        assert status is not None and "SyntaxError" not in (status.message or "")

    run(main())


def test_rollback_serves_an_old_snapshot_as_a_new_revision(world: World) -> None:
    async def main() -> None:
        v1 = world.deployment(code="v1")
        await serve(world, code="v1")
        await serve(world, code="v2")
        result = world.controller.rollouts.rollback("api")
        assert (result.action, result.revision) == ("updated", 3)
        await world.reconcile()
        [launch] = [launch for launch in world.runtime.launches if launch.revision == 3]
        assert v1.snapshot is not None
        assert launch.project_dir == str(world.snapshots.unpacked(v1.snapshot))
        roles = {r.revision: r.role for r in world.controller.rollouts.revisions("api")}
        assert roles == {1: "", 2: "serving", 3: "rolling out"}
        world.runtime.make_ready(launch.replica_id)
        await world.reconcile()
        roles = {r.revision: (r.role, r.note) for r in world.controller.rollouts.revisions("api")}
        assert roles[3] == ("serving", "rollback to 1")
        with pytest.raises(KeyError):
            world.controller.rollouts.rollback("api", to=99)

    run(main())


def test_init_replicas_hold_for_the_downscale_stabilization_window(world: World) -> None:
    async def main() -> None:
        spec = {"min_replicas": 1, "max_replicas": 4, "init_replicas": 2, "downscale_stabilization_s": 60}
        world.controller.deploy([world.deployment(autoscaling=spec)])
        for _ in range(30):  # 30 s of idle autoscaling
            world.clock.advance(AUTOSCALE_INTERVAL_S)
            world.controller.autoscale()
        assert world.controller.apis["api"].desired == 2
        for _ in range(90):
            world.clock.advance(AUTOSCALE_INTERVAL_S)
            world.controller.autoscale()
        assert world.controller.apis["api"].desired == 1

    run(main())
