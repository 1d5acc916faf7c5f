"""The gateway's weighted choices, as pure functions and on an `ApiRoute` with stand-in replicas:
a splitter's weights and sticky keys, and a canary's share, promotion and abort."""

from __future__ import annotations

import asyncio
from collections import Counter

import pytest

from cirrus.gateway.routing import ApiRoute, ReplicaSlot
from cirrus.gateway.split import Split, WeightedPicker, sticky_index


def test_weights_hold_within_one_request_at_every_point() -> None:
    picker = WeightedPicker((70, 20, 10))
    counts = Counter[int]()
    for n in range(1, 10_001):
        counts[picker.pick()] += 1
        for index, weight in enumerate((0.7, 0.2, 0.1)):
            assert abs(counts[index] - weight * n) < 1.0 + 1e-9
    assert counts == {0: 7000, 1: 2000, 2: 1000}


def test_smooth_weights_interleave_instead_of_bursting() -> None:
    picker = WeightedPicker((90, 10))
    picks = [picker.pick() for _ in range(100)]
    gaps = [j - i for i, j in zip(*[iter([n for n, p in enumerate(picks) if p == 1])] * 2, strict=False)]
    assert picks.count(1) == 10 and all(gap == 10 for gap in gaps)


@pytest.mark.parametrize("weights", [(), (0, 0), (1, -1)])
def test_bad_weights_are_refused(weights: tuple[float, ...]) -> None:
    with pytest.raises(ValueError, match="weights"):
        WeightedPicker(weights)


def test_sticky_keys_keep_their_target_and_spread_by_weight() -> None:
    weights = (80.0, 20.0)
    keys = [f"user-{n}".encode() for n in range(20_000)]
    first = [sticky_index(key, weights) for key in keys]
    assert first == [sticky_index(key, weights) for key in keys]  # the same key, the same target
    share = first.count(1) / len(keys)
    assert 0.18 < share < 0.22
    assert {sticky_index(key, (0.0, 100.0)) for key in keys[:500]} == {1}  # never a zero-weight target


def test_a_split_uses_the_sticky_header_when_present() -> None:
    split = Split(targets=("a", "b"), weights=(50.0, 50.0), sticky_header=b"x-user")
    sticky = [(b"x-user", b"alice")]
    assert len({split.choose(sticky) for _ in range(50)}) == 1
    assert Counter(split.choose([]) for _ in range(100)) == {"a": 50, "b": 50}


# --- a canary on a route -----------------------------------------------------------------------


def slot(replica_id: str) -> ReplicaSlot:
    return ReplicaSlot(replica_id, conn=object())


def canary_route(percent: float = 10.0) -> tuple[ApiRoute, ReplicaSlot, ReplicaSlot]:
    route = ApiRoute("api", max_concurrency=1, max_queue_length=8, timeout_s=5.0)
    old = slot("old")
    route.add_replica(old)
    route.set_canary(1, 2, percent)
    assert route.canary is not None
    new = slot("new")
    route.canary.add_replica(new)
    return route, old, new


def test_the_canary_gets_its_share_once_it_has_a_replica() -> None:
    route = ApiRoute("api", max_concurrency=1, max_queue_length=8, timeout_s=5.0)
    route.add_replica(slot("old"))
    route.set_canary(1, 2, 10.0)
    assert all(route.pick() is route for _ in range(50))  # no canary replica yet: everything to the old
    assert route.canary is not None
    route.canary.add_replica(slot("new"))
    picks = Counter("canary" if route.pick() is route.canary else "serving" for _ in range(10_000))
    assert picks == {"serving": 9000, "canary": 1000}
    assert route.canary_percent == 10.0


def test_promoting_moves_replicas_and_waiters_with_nothing_dropped() -> None:
    async def main() -> None:
        route, old, new = canary_route()
        canary = route.canary
        assert canary is not None
        held = canary.try_acquire()  # in flight on the canary
        assert held is new
        waiter = asyncio.ensure_future(canary.acquire(5.0))  # waiting for a canary replica
        await asyncio.sleep(0)
        route.promote_canary()
        assert route.canary is None and route.revision == 2
        assert route.replicas == [old, new] and new.owner is route
        assert await asyncio.wait_for(waiter, 1) is old  # the waiter is served at once by a free replica
        second = asyncio.ensure_future(route.acquire(5.0))
        await asyncio.sleep(0)
        canary.release(new)  # the request in flight on the canary finishes: its replica serves the next here
        assert await asyncio.wait_for(second, 1) is new

    asyncio.run(main())


def test_aborting_sends_waiters_to_the_serving_replicas() -> None:
    async def main() -> None:
        route, old, new = canary_route()
        canary = route.canary
        assert canary is not None
        canary.try_acquire()
        waiter = asyncio.ensure_future(canary.acquire(5.0))
        await asyncio.sleep(0)
        canary.remove_replica("new")  # the controller drains the aborted revision's replicas...
        route.set_canary(1, None, 0.0)  # ...and ends the canary
        assert route.canary is None and route.replicas == [old]
        assert await asyncio.wait_for(waiter, 1) is old  # served by the old revision, not dropped
        assert new.draining

    asyncio.run(main())


def test_a_removed_canary_replica_is_found_through_the_route() -> None:
    route, _, new = canary_route()
    assert route.remove_replica("new") is new and new.draining
