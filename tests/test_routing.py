"""Routing: the least-loaded choice (pure) and the per-API FIFO queue, with stand-in connections."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Coroutine
from typing import Any, TypeVar

import pytest

from cirrus.gateway.routing import ApiRoute, Overloaded, QueueTimeout, ReplicaSlot, choose_replica

T = TypeVar("T")


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


async def settle(rounds: int = 5) -> None:
    for _ in range(rounds):
        await asyncio.sleep(0)


def route(*replicas: str, max_concurrency: int = 1, max_queue_length: int = 8, timeout_s: float = 5.0) -> ApiRoute:
    r = ApiRoute("api", max_concurrency=max_concurrency, max_queue_length=max_queue_length, timeout_s=timeout_s)
    for replica_id in replicas:
        r.add_replica(ReplicaSlot(replica_id, conn=object()))
    return r


def loads(r: ApiRoute) -> dict[str, int]:
    return {s.replica_id: s.in_flight for s in r.replicas}


# --- choose_replica ------------------------------------------------------------------------------


def test_choose_empty() -> None:
    assert choose_replica([], capacity=4) is None
    assert choose_replica([], capacity=4, start=3) is None


def test_choose_least_loaded() -> None:
    assert choose_replica([3, 1, 2], capacity=4) == 1
    assert choose_replica([3, 2, 0, 1], capacity=4) == 2


def test_choose_respects_capacity() -> None:
    assert choose_replica([4, 4, 4], capacity=4) is None
    assert choose_replica([4, 5, 3], capacity=4) == 2
    assert choose_replica([0], capacity=0) is None


def test_ties_go_to_the_first_at_or_after_start() -> None:
    assert choose_replica([1, 1, 1], capacity=4, start=0) == 0
    assert choose_replica([1, 1, 1], capacity=4, start=1) == 1
    assert choose_replica([1, 1, 1], capacity=4, start=2) == 2
    assert choose_replica([1, 1, 1], capacity=4, start=5) == 2  # start wraps
    assert choose_replica([2, 1, 2, 1], capacity=4, start=2) == 3
    assert choose_replica([2, 1, 2, 1], capacity=4, start=0) == 1


def test_rotating_start_spreads_equal_load() -> None:
    picks = [choose_replica([0, 0, 0], capacity=4, start=s) for s in range(6)]
    assert picks == [0, 1, 2, 0, 1, 2]


def test_lower_load_beats_rotation() -> None:
    assert all(choose_replica([2, 2, 0, 2], capacity=4, start=s) == 2 for s in range(4))


# --- ApiRoute ------------------------------------------------------------------------------------


def test_try_acquire_spreads_and_fills() -> None:
    r = route("a", "b", max_concurrency=2)
    taken = [r.try_acquire() for _ in range(4)]
    assert all(taken)
    assert loads(r) == {"a": 2, "b": 2}
    assert r.try_acquire() is None


def test_acquire_and_release_without_waiting() -> None:
    async def main() -> None:
        r = route("a")
        slot = await r.acquire(1.0)
        assert slot.replica_id == "a" and slot.in_flight == 1
        r.release(slot)
        assert slot.in_flight == 0 and r.metrics.queued == 0

    run(main())


def test_fifo_handover_on_release() -> None:
    async def main() -> None:
        r = route("a")
        first = await r.acquire(1.0)
        order: list[int] = []

        async def waiter(n: int) -> ReplicaSlot:
            slot = await r.acquire(5.0)
            order.append(n)
            return slot

        tasks = [asyncio.create_task(waiter(n)) for n in range(3)]
        await settle()
        assert len(r.waiters) == 3 and r.metrics.queued == 3
        # A newcomer may not overtake the queue even when a slot is momentarily free.
        r.release(first)
        assert r.try_acquire() is None
        for _ in range(3):
            await settle()
            slot = r.replicas[0]
            assert slot.in_flight == 1  # the freed slot went straight to the next waiter
            r.release(slot)
        await asyncio.gather(*tasks)
        assert order == [0, 1, 2]
        assert r.replicas[0].in_flight == 0 and r.metrics.queued == 0 and not r.waiters

    run(main())


def test_queue_limit_raises_overloaded() -> None:
    async def main() -> None:
        r = route("a", max_queue_length=2)
        await r.acquire(1.0)
        tasks = [asyncio.create_task(r.acquire(5.0)) for _ in range(2)]
        await settle()
        with pytest.raises(Overloaded):
            await r.acquire(5.0)
        assert len(r.waiters) == 2
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        assert not r.waiters and r.metrics.queued == 0

    run(main())


def test_zero_queue_length_overloads_at_once() -> None:
    async def main() -> None:
        r = route("a", max_queue_length=0)
        await r.acquire(1.0)
        with pytest.raises(Overloaded):
            await r.acquire(5.0)

    run(main())


def test_queue_timeout_when_nothing_frees() -> None:
    async def main() -> None:
        r = route("a")
        slot = await r.acquire(1.0)
        started = time.monotonic()
        with pytest.raises(QueueTimeout):
            await r.acquire(0.05)
        assert time.monotonic() - started >= 0.04
        assert not r.waiters and r.metrics.queued == 0
        # The timed-out waiter is gone: a release does not hand the slot to it.
        r.release(slot)
        assert slot.in_flight == 0

    run(main())


def test_waiter_timing_out_as_it_is_handed_a_replica_gives_the_slot_back() -> None:
    async def main() -> None:
        r = route("a")
        slot = await r.acquire(1.0)
        task = asyncio.create_task(r.acquire(0.05))
        await settle()
        assert len(r.waiters) == 1
        # Let the deadline pass without running the loop, so that in the next loop iteration the
        # release below hands the slot over and then the timeout fires, before the waiter resumes.
        time.sleep(0.1)
        await asyncio.sleep(0)
        r.release(slot)
        assert slot.in_flight == 1  # handed to the waiter
        with pytest.raises(QueueTimeout):
            await task
        assert slot.in_flight == 0  # given back
        assert not r.waiters and r.metrics.queued == 0
        again = r.try_acquire()
        assert again is slot

    run(main())


def test_waiter_cancelled_as_it_is_handed_a_replica_gives_the_slot_back() -> None:
    async def main() -> None:
        r = route("a")
        slot = await r.acquire(1.0)
        task = asyncio.create_task(r.acquire(5.0))
        await settle()
        r.release(slot)  # hands over ...
        task.cancel()  # ... and the client goes away before the waiter runs
        with pytest.raises(asyncio.CancelledError):
            await task
        assert slot.in_flight == 0
        assert not r.waiters and r.metrics.queued == 0

    run(main())


def test_slot_given_back_goes_to_the_next_waiter() -> None:
    async def main() -> None:
        r = route("a")
        slot = await r.acquire(1.0)
        doomed = asyncio.create_task(r.acquire(5.0))
        patient = asyncio.create_task(r.acquire(5.0))
        await settle()
        r.release(slot)
        doomed.cancel()
        await asyncio.gather(doomed, return_exceptions=True)
        assert await asyncio.wait_for(patient, 1.0) is slot
        assert slot.in_flight == 1

    run(main())


def test_removed_replica_gets_no_new_requests() -> None:
    async def main() -> None:
        r = route("a", "b", max_concurrency=4)
        a_slot = next(s for s in r.replicas if s.replica_id == "a")
        a_slot.in_flight = 1
        removed = r.remove_replica("a")
        assert removed is a_slot and removed.draining
        assert r.remove_replica("a") is None
        for _ in range(4):
            assert (await r.acquire(1.0)).replica_id == "b"
        # b is full: the next request queues rather than going to the draining replica ...
        task = asyncio.create_task(r.acquire(5.0))
        await settle()
        assert not task.done()
        # ... and a request finishing on the draining replica does not hand it over either.
        r.release(a_slot)
        await settle()
        assert not task.done() and a_slot.in_flight == 0
        r.release(r.replicas[0])
        assert (await task).replica_id == "b"

    run(main())


def test_add_replica_drains_the_queue() -> None:
    async def main() -> None:
        r = route(max_concurrency=2)  # no replicas yet: requests wait (cold start)
        tasks = [asyncio.create_task(r.acquire(5.0)) for _ in range(5)]
        await settle()
        assert len(r.waiters) == 5
        r.add_replica(ReplicaSlot("a", conn=object()))
        await settle()
        assert sum(t.done() for t in tasks) == 2 and len(r.waiters) == 3
        r.add_replica(ReplicaSlot("b", conn=object()))
        r.add_replica(ReplicaSlot("c", conn=object()))
        slots = await asyncio.gather(*tasks)
        assert [s.replica_id for s in slots] == ["a", "a", "b", "b", "c"]
        assert loads(r) == {"a": 2, "b": 2, "c": 1}
        assert not r.waiters and r.metrics.queued == 0

    run(main())


def test_fail_waiters() -> None:
    async def main() -> None:
        r = route()
        tasks = [asyncio.create_task(r.acquire(5.0)) for _ in range(2)]
        await settle()
        r.fail_waiters(LookupError("gone"))
        results = await asyncio.gather(*tasks, return_exceptions=True)
        assert all(isinstance(e, LookupError) for e in results)
        assert not r.waiters and r.metrics.queued == 0

    run(main())


# --- model-aware routing (multi-model APIs) ---------------------------------------------------------


def test_choose_replica_prefers_a_replica_holding_the_model() -> None:
    # the preferred replica wins even when another is less loaded
    assert choose_replica([0, 3, 1], capacity=4, preferred=[False, True, False]) == 1
    # among preferred ones, the least loaded (ties rotate with start)
    assert choose_replica([0, 3, 2, 2], capacity=4, preferred=[False, True, True, True]) == 2
    assert choose_replica([0, 2, 2], capacity=4, start=2, preferred=[False, True, True]) == 2
    # a preferred replica without room falls back to the least loaded of all
    assert choose_replica([2, 4, 1], capacity=4, preferred=[False, True, False]) == 2
    # no preference (none holds it, or no flags): plain least-loaded
    assert choose_replica([2, 1, 3], capacity=4, preferred=[False, False, False]) == 1
    assert choose_replica([2, 1, 3], capacity=4, preferred=None) == 1
    assert choose_replica([4, 4], capacity=4, preferred=[True, True]) is None


def test_try_acquire_sticks_to_the_replica_holding_the_model() -> None:
    r = route("a", "b", "c", max_concurrency=2)
    r.multi_model = True
    r.replicas[1].held = frozenset({"m1"})
    picks = []
    for _ in range(4):
        slot = r.try_acquire("m1")
        assert slot is not None
        picks.append(slot.replica_id)
        r.release(slot)
    assert picks == ["b"] * 4  # idle replicas: always the one holding m1
    first, second = r.try_acquire("m1"), r.try_acquire("m1")
    assert first is not None and second is not None
    assert [first.replica_id, second.replica_id] == ["b", "b"]
    third = r.try_acquire("m1")  # b is full: another replica (it will load m1 too)
    assert third is not None and third.replica_id != "b"
    # an API that is not multi-model ignores the model
    plain = route("a", "b", max_concurrency=2)
    plain.replicas[1].held = frozenset({"m1"})
    assert {plain.try_acquire("m1").replica_id for _ in range(2)} == {"a", "b"}  # type: ignore[union-attr]
