"""Canary rollouts and splitters through the controller over the fake runtime: a canary runs beside
the serving revision with its share, is promoted or aborted with every request served, survives a
daemon restart, and deploys that cannot work are refused before anything is recorded."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any

import pytest
from test_controller import World, scaled

from cirrus.control.rollouts import DeployRefused, canary_replicas
from cirrus.spec import Deployment, parse_specs
from cirrus.types import ApiStatusName, ReplicaState


def run(coro: Coroutine[Any, Any, None]) -> None:
    asyncio.run(coro)


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    w = World(tmp_path)
    yield w
    w.close()


def by_revision(world: World, state: ReplicaState | None = None) -> dict[int, int]:
    counts: dict[int, int] = {}
    for replica in world.controller.apis["api"].replicas.values():
        if state is None or replica.state is state:
            counts[replica.revision] = counts.get(replica.revision, 0) + 1
    return counts


async def ready_all(world: World) -> None:
    await world.reconcile()
    for rid in world.runtime.running():
        if world.controller.apis["api"].replicas[rid].state is ReplicaState.STARTING:
            world.runtime.make_ready(rid)
    await world.reconcile()


async def serving_v1(world: World, replicas: int = 4) -> None:
    world.controller.deploy([world.deployment(code="v1", **scaled(replicas))])
    await ready_all(world)
    assert by_revision(world, ReplicaState.READY) == {1: replicas}


def test_canary_replicas_follow_the_share() -> None:
    assert [canary_replicas(n, 10) for n in (0, 1, 4, 10, 11, 30)] == [0, 1, 1, 1, 2, 3]
    assert canary_replicas(4, 50) == 2


def test_a_canary_runs_beside_the_serving_revision_then_is_promoted(world: World) -> None:
    async def main() -> None:
        await serving_v1(world)
        [result] = world.controller.deploy([world.deployment(code="v2", **scaled(4))], canary=10)
        assert (result.action, result.revision) == ("updated", 2)
        await ready_all(world)
        assert by_revision(world, ReplicaState.READY) == {1: 4, 2: 1}  # one canary replica, nothing drained
        assert world.gateway.canaries["api"] == (1, 2, 10)
        assert world.status() is ApiStatusName.CANARY
        roles = {r.revision: r.role for r in world.controller.rollouts.revisions("api")}
        assert roles == {1: "serving", 2: "canary 10%"}

        promoted = world.controller.rollouts.promote("api")
        assert (promoted.action, promoted.revision) == ("promoted", 2)
        assert world.gateway.promoted == ["api"]
        await ready_all(world)  # revision 2 gets all its replicas, then revision 1 drains
        await world.reconcile()
        assert by_revision(world, ReplicaState.READY) == {2: 4}
        assert world.store.serving("api") == 2 and world.store.canary("api") is None
        assert world.status() is ApiStatusName.LIVE
        with pytest.raises(DeployRefused, match="runs no canary to promote"):
            world.controller.rollouts.promote("api")

    run(main())


def test_rollback_aborts_a_canary(world: World) -> None:
    async def main() -> None:
        await serving_v1(world, 2)
        world.controller.deploy([world.deployment(code="v2", **scaled(2))], canary=25)
        await ready_all(world)
        [canary_id] = [r.id for r in world.controller.apis["api"].replicas.values() if r.revision == 2]

        result = world.controller.rollouts.rollback("api")
        assert (result.action, result.revision) == ("canary 2 aborted", 1)
        await world.reconcile()
        assert ("api", canary_id) in world.gateway.drained
        assert world.gateway.canaries["api"] is None
        assert by_revision(world, ReplicaState.READY) == {1: 2}
        assert world.store.get("api").revision == 1  # type: ignore[union-attr]
        assert world.status() is ApiStatusName.LIVE
        # The next deploy numbers on, and rolls over revision 1 as usual.
        [again] = world.controller.deploy([world.deployment(code="v3", **scaled(2))])
        assert again.revision == 3

    run(main())


def test_a_plain_deploy_during_a_canary_replaces_it(world: World) -> None:
    async def main() -> None:
        await serving_v1(world, 2)
        world.controller.deploy([world.deployment(code="v2", **scaled(2))], canary=10)
        await ready_all(world)
        world.controller.deploy([world.deployment(code="v3", **scaled(2))])
        await ready_all(world)
        await world.reconcile()
        assert by_revision(world, ReplicaState.READY) == {3: 2}
        assert world.controller.apis["api"].canary is None and world.store.canary("api") is None

    run(main())


def test_a_canary_survives_a_daemon_restart(world: World, tmp_path: Path) -> None:
    async def main() -> None:
        await serving_v1(world, 2)
        world.controller.deploy([world.deployment(code="v2", **scaled(2))], canary=20)
        await ready_all(world)

        again = World(tmp_path, db=tmp_path / "state.db")
        again.controller.restore()
        await ready_all(again)
        assert by_revision(again, ReplicaState.READY) == {1: 2, 2: 1}
        assert again.gateway.canaries["api"] == (1, 2, 20)
        again.close()

    run(main())


@pytest.mark.parametrize(
    ("setup", "deploy", "expected"),
    [
        ("none", {"code": "v2"}, "is not deployed: a canary starts beside a serving revision"),
        ("serving", {"code": "v1"}, "nothing to canary: the code and spec match revision 1"),
        ("rolling", {"code": "v3"}, "revision 2 is still rolling out"),
        ("serving", {"code": "v2", "kind": "async"}, "canaries are for realtime APIs"),
    ],
)
def test_canaries_that_cannot_start_are_refused(
    world: World, setup: str, deploy: dict[str, Any], expected: str
) -> None:
    async def main() -> None:
        if setup != "none":
            await serving_v1(world, 1)
        if setup == "rolling":
            world.controller.deploy([world.deployment(code="v2", **scaled(1))])
            await world.reconcile()
        revisions = len(world.store.revisions("api"))
        with pytest.raises(DeployRefused, match=expected):
            world.controller.deploy([world.deployment(**scaled(1), **deploy)], canary=10)
        assert len(world.store.revisions("api")) == revisions  # nothing recorded

    run(main())


def test_a_canary_share_must_be_a_percent(world: World) -> None:
    async def main() -> None:
        await serving_v1(world, 1)
        for percent in (0, 100, -5):
            with pytest.raises(DeployRefused, match="between 0 and 100"):
                world.controller.deploy([world.deployment(code="v2", **scaled(1))], canary=percent)

    run(main())


def splitter(world: World, **fields: Any) -> Deployment:
    [spec] = parse_specs({"name": "front", "kind": "splitter", **fields})
    return Deployment(spec=spec, project_dir=str(world.tmp_path / "project"))


def test_a_splitter_runs_nothing_and_needs_its_apis_deployed(world: World) -> None:
    async def main() -> None:
        targets = [{"name": "api", "weight": 50}, {"name": "other", "weight": 50}]
        with pytest.raises(DeployRefused, match="splitter 'front': API 'other' is not deployed"):
            world.controller.deploy([world.deployment(code="v1"), splitter(world, apis=targets)])
        assert world.store.get("api") is None  # nothing recorded
        world.controller.deploy(
            [world.deployment(code="v1"), world.deployment(name="other", code="v1"), splitter(world, apis=targets)]
        )
        await world.reconcile()
        assert all(launch.api != "front" for launch in world.runtime.launches)
        assert all(api != "front" for api, _ in world.runtime.prepared)
        split = world.gateway.splits["front"]
        assert split is not None and [t.name for t in split] == ["api", "other"]
        assert world.status("front") is ApiStatusName.LIVE
        with pytest.raises(DeployRefused, match="'front' is a splitter API"):
            world.controller.deploy([splitter(world, name="outer", apis=[{"name": "front", "weight": 100}])])

    run(main())
