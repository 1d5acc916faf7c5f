"""Server-side batching: the pure batch decision on traces, and the `Batcher` on a fake slot."""

from __future__ import annotations

import asyncio
import heapq
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cirrus.predictor import Call, HTTPError, Method
from cirrus.replica.batcher import NEVER, Batcher, BatchPolicy, Decision, QueueState, decide

ADAPTIVE = BatchPolicy(max_batch_size=32, max_wait_s=0.005, mode="adaptive")
FIXED = BatchPolicy(max_batch_size=8, max_wait_s=0.2, mode="fixed")


# --- the decision ---------------------------------------------------------------------------------


def test_nothing_waits_or_no_slot_free_means_no_batch_and_no_timer() -> None:
    for policy in (ADAPTIVE, FIXED):
        assert decide(policy, QueueState(waiting=0, oldest_at=0.0, free_slots=1), 5.0) == Decision(0)
        busy = QueueState(waiting=40, oldest_at=0.0, free_slots=0, freed_at=1.0, expected=8)
        assert decide(policy, busy, 5.0) == Decision(0)  # the batch that ends decides again


def test_adaptive_starts_a_lone_request_on_an_idle_replica_at_once() -> None:
    fresh = QueueState(waiting=1, oldest_at=10.0, free_slots=1)
    assert decide(ADAPTIVE, fresh, 10.0) == Decision(1)
    # idle for a while after a big batch: no wait either, even with a long max_wait
    patient = BatchPolicy(max_batch_size=32, max_wait_s=0.5)
    idle = QueueState(waiting=1, oldest_at=20.0, free_slots=1, freed_at=19.0, expected=32)
    assert decide(patient, idle, 20.0) == Decision(1)


def test_a_freed_slot_takes_everything_waiting_up_to_max() -> None:
    # requests gathered while the slot was busy (at least as many as the batch that just ended)
    queued = QueueState(waiting=5, oldest_at=1.0, free_slots=1, freed_at=1.08, expected=5)
    assert decide(ADAPTIVE, queued, 1.08) == Decision(5)
    crowded = QueueState(waiting=40, oldest_at=1.0, free_slots=1, freed_at=1.08, expected=32)
    assert decide(ADAPTIVE, crowded, 1.08) == Decision(32)
    assert decide(FIXED, crowded, 1.08) == Decision(8)


def test_adaptive_gathers_the_clients_of_the_batch_that_just_ended_for_at_most_max_wait() -> None:
    ended = 100.0
    first = 100.001  # the first newcomer after a batch of 8 ended with nothing waiting

    def state(waiting: int, oldest_at: float = first) -> QueueState:
        return QueueState(waiting=waiting, oldest_at=oldest_at, free_slots=1, freed_at=ended, expected=8)

    assert decide(ADAPTIVE, state(1), first) == Decision(0, wake_at=ended + 0.005)
    assert decide(ADAPTIVE, state(7), first + 0.002) == Decision(0, wake_at=ended + 0.005)
    assert decide(ADAPTIVE, state(8), first + 0.002) == Decision(8)  # as many as came back: go
    assert decide(ADAPTIVE, state(3), ended + 0.005) == Decision(3)  # max_wait is up: go with what is there
    # one request that waited through the batch joins the clients coming back
    assert decide(ADAPTIVE, state(1, oldest_at=99.97), ended) == Decision(0, wake_at=ended + 0.005)


def test_adaptive_merges_half_and_half() -> None:
    """16 requests waited through a batch of 16: 32 are in play, so they wait (max_wait at most) for the
    other 16 to come back instead of settling into batches of 16 and 16."""
    halves = QueueState(waiting=16, oldest_at=0.01, free_slots=1, freed_at=0.05, expected=32)
    assert decide(ADAPTIVE, halves, 0.05) == Decision(0, wake_at=0.055)
    assert decide(ADAPTIVE, halves, 0.055) == Decision(16)


def test_adaptive_after_a_lone_request_does_not_wait() -> None:
    after_one = QueueState(waiting=1, oldest_at=5.0001, free_slots=1, freed_at=5.0, expected=1)
    assert decide(ADAPTIVE, after_one, 5.0001) == Decision(1)


def test_fixed_waits_for_a_full_batch_or_max_wait() -> None:
    def state(waiting: int) -> QueueState:
        return QueueState(waiting=waiting, oldest_at=1.0, free_slots=1)

    assert decide(FIXED, state(1), 1.0) == Decision(0, wake_at=1.2)
    assert decide(FIXED, state(2), 1.1) == Decision(0, wake_at=1.2)
    assert decide(FIXED, state(2), 1.2) == Decision(2)
    assert decide(FIXED, state(8), 1.05) == Decision(8)  # full: no wait
    assert decide(FIXED, state(9), 1.05) == Decision(8)


# --- traces: a simulated replica driven by decide ----------------------------------------------


def simulate(
    policy: BatchPolicy,
    arrivals: list[float],
    service_s: float,
    slots: int = 1,
    resend_after: float | None = None,
    max_requests: int = 0,
) -> tuple[list[tuple[float, list[int]]], list[float]]:
    """Feed `arrivals` through `decide` with `slots` slots, each batch taking `service_s`. With
    `resend_after` the clients are a closed loop: each sends again that long after its answer, until
    `max_requests` requests were made. Returns the batches started, as (time, request indexes), and
    every request's arrival time."""
    arrivals = list(arrivals)
    events: list[tuple[float, int, str]] = [(t, i, "arrive") for i, t in enumerate(arrivals)]
    heapq.heapify(events)
    waiting: list[int] = []
    running: dict[int, list[int]] = {}
    freed_at, last = NEVER, 0
    batches: list[tuple[float, list[int]]] = []
    timers = 0
    while events:
        now, index, kind = heapq.heappop(events)
        if kind == "arrive":
            waiting.append(index)
        elif kind == "end":
            members = running.pop(index)
            freed_at, last = now, len(members) + len(waiting)
            for _ in members:
                if resend_after is not None and len(arrivals) < max_requests:
                    arrivals.append(now + resend_after + len(arrivals) * 1e-6)
                    heapq.heappush(events, (arrivals[-1], len(arrivals) - 1, "arrive"))
        while True:
            state = QueueState(
                waiting=len(waiting),
                oldest_at=arrivals[waiting[0]] if waiting else 0.0,
                free_slots=slots - len(running),
                freed_at=freed_at,
                expected=last,
            )
            decision = decide(policy, state, now)
            if decision.take == 0:
                if decision.wake_at is not None:
                    assert decision.wake_at > now
                    timers += 1
                    heapq.heappush(events, (decision.wake_at, -timers, "timer"))
                break
            taken, waiting = waiting[: decision.take], waiting[decision.take :]
            batches.append((now, taken))
            running[len(batches)] = taken
            heapq.heappush(events, (now + service_s, len(batches), "end"))
    return batches, arrivals


def test_trace_closed_loop_clients_fill_batches() -> None:
    """32 clients, each sending again 1 ms after its answer: after the first request the batches hold
    all 32. Taking whatever waits when the slot frees would settle into 1 + 31: the first client back
    runs alone while the others queue behind it."""
    start = [i * 0.0001 for i in range(32)]
    batches, _ = simulate(ADAPTIVE, start, 0.05, resend_after=0.001, max_requests=32 * 20)
    sizes = [len(members) for _, members in batches]
    assert sizes[0] == 1  # an idle replica starts the first request at once
    assert sizes[1:-1] == [32] * (len(sizes) - 2)  # the last is what is left of the 640 requests
    eager = BatchPolicy(max_batch_size=32, max_wait_s=0.0)  # no gathering
    eager_batches, _ = simulate(eager, start, 0.05, resend_after=0.001, max_requests=32 * 20)
    eager_sizes = [len(members) for _, members in eager_batches]
    assert eager_sizes.count(1) >= len(eager_sizes) // 2 - 1


def test_trace_one_client_never_waits() -> None:
    batches, arrivals = simulate(ADAPTIVE, [0.0], 0.01, resend_after=0.0005, max_requests=50)
    assert [len(m) for _, m in batches] == [1] * 50
    assert all(start == arrivals[members[0]] for start, members in batches)


@settings(max_examples=200, deadline=None)
@given(
    gaps=st.lists(st.floats(0.0, 0.05), min_size=1, max_size=60),
    service=st.floats(0.001, 0.03),
    mode=st.sampled_from(["adaptive", "fixed"]),
    slots=st.integers(1, 3),
)
def test_trace_invariants(gaps: list[float], service: float, mode: str, slots: int) -> None:
    policy = BatchPolicy(max_batch_size=4, max_wait_s=0.01, mode=mode)  # type: ignore[arg-type]
    arrivals: list[float] = []
    t = 0.0
    for gap in gaps:
        t += gap
        arrivals.append(t)
    batches, _ = simulate(policy, arrivals, service, slots)
    started = sorted(i for _, members in batches for i in members)
    assert started == list(range(len(arrivals)))  # everyone served once
    for start, members in batches:
        assert 1 <= len(members) <= policy.max_batch_size
        assert members == sorted(members)  # first come, first served
        assert all(arrivals[m] <= start for m in members)
    # A batch starts at most max_wait after its oldest request arrived or after a slot last freed,
    # whichever is later (a decision is only ever put off that long).
    ends = sorted(start + service for start, _ in batches)
    for start, members in batches:
        freed = max((end for end in ends if end <= start + 1e-12), default=float("-inf"))
        assert start <= max(arrivals[members[0]], freed) + policy.max_wait_s + 1e-9
    if mode == "adaptive":
        # A request that finds a free slot, nothing waiting and no batch ended within max_wait starts at once.
        for start, members in batches:
            arrived = arrivals[members[0]]
            running = sum(1 for s, b in batches if b is not members and s <= arrived < s + service)
            recent_end = any(arrived - policy.max_wait_s - 1e-9 <= end <= arrived + 1e-9 for end in ends)
            waiting_before = any(arrivals[m] < arrived and s > arrived for s, b in batches for m in b)
            if running < slots and not recent_end and not waiting_before:
                assert start == arrived


# --- the Batcher on a fake slot ------------------------------------------------------------------


class FakeSlots:
    """One slot; `gate` holds every batch until the test opens it."""

    def __init__(self, size: int = 1) -> None:
        self.size = size
        self.gate = asyncio.Event()
        self.gate.set()

    async def run_sync(self, fn: Any, kwargs: dict[str, Any]) -> Any:
        await self.gate.wait()
        return fn(**kwargs)

    async def run_async(self, fn: Any, kwargs: dict[str, Any]) -> Any:
        await self.gate.wait()
        return await fn(**kwargs)


def method(fn: Any) -> Method:
    return Method(fn=fn, wants=("payloads",), is_async=asyncio.iscoroutinefunction(fn))


def call(payload: Any) -> Call:
    return Call(payload=payload, query_params={}, headers={}, request_id=f"r{payload}")


async def gather_results(batcher: Batcher, payloads: list[Any]) -> list[Any]:
    return await asyncio.gather(*(batcher.submit(call(p)) for p in payloads), return_exceptions=True)


def test_requests_gather_while_the_slot_is_busy_and_each_gets_its_own_answer() -> None:
    seen: list[list[Any]] = []

    def predict_batch(payloads: list[Any]) -> list[Any]:
        seen.append(list(payloads))
        return [p * 10 for p in payloads]

    async def scenario() -> tuple[list[Any], list[Call]]:
        slots = FakeSlots()
        batcher = Batcher(ADAPTIVE, method(predict_batch), slots, max_queue=64)
        slots.gate.clear()
        calls = [call(i) for i in range(6)]
        tasks = [asyncio.ensure_future(batcher.submit(c)) for c in calls]
        await asyncio.sleep(0.01)
        assert batcher.waiting == 5  # the first went alone to the idle slot; the rest gather
        slots.gate.set()
        return list(await asyncio.gather(*tasks)), calls

    results, calls = asyncio.run(scenario())
    assert results == [0, 10, 20, 30, 40, 50]
    assert seen == [[0], [1, 2, 3, 4, 5]]
    assert [c.batch_size for c in calls] == [1, 5, 5, 5, 5, 5]
    assert all(c.predict_s >= 0 and c.slot_wait_s >= 0 for c in calls)
    assert calls[-1].slot_wait_s >= 0.005  # it waited for the first batch


def test_async_predict_batch_and_max_batch_size() -> None:
    seen: list[int] = []

    async def predict_batch(payloads: list[Any]) -> list[Any]:
        seen.append(len(payloads))
        await asyncio.sleep(0)
        return payloads

    async def scenario() -> list[Any]:
        slots = FakeSlots()
        policy = BatchPolicy(max_batch_size=3, max_wait_s=0.0)
        batcher = Batcher(policy, method(predict_batch), slots, max_queue=64)
        slots.gate.clear()
        tasks = [asyncio.ensure_future(batcher.submit(call(i))) for i in range(8)]
        await asyncio.sleep(0.01)
        slots.gate.set()
        return list(await asyncio.gather(*tasks))

    assert asyncio.run(scenario()) == list(range(8))
    assert seen == [1, 3, 3, 1]


def test_a_result_list_of_the_wrong_length_fails_every_request_of_that_batch() -> None:
    def predict_batch(payloads: list[Any]) -> list[Any]:
        return payloads[:-1] if len(payloads) > 1 else payloads

    async def scenario() -> list[Any]:
        slots = FakeSlots()
        batcher = Batcher(ADAPTIVE, method(predict_batch), slots, max_queue=64)
        slots.gate.clear()
        tasks = [asyncio.ensure_future(batcher.submit(call(i))) for i in range(4)]
        await asyncio.sleep(0.01)
        slots.gate.set()
        return list(await asyncio.gather(*tasks, return_exceptions=True))

    results = asyncio.run(scenario())
    assert results[0] == 0  # the lone first batch was fine
    for error in results[1:]:
        assert isinstance(error, HTTPError) and error.status == 500
        assert "predict_batch returned 2 results for a batch of 3 requests" in error.message
        assert "exactly one result per payload" in error.message


def test_a_result_that_is_not_a_list_fails_the_batch() -> None:
    async def scenario() -> list[Any]:
        batcher = Batcher(ADAPTIVE, method(lambda payloads: {"oops": 1}), FakeSlots(), max_queue=4)
        return await gather_results(batcher, [1])

    [error] = asyncio.run(scenario())
    assert isinstance(error, HTTPError) and "returned a dict for a batch of 1" in error.message


def test_an_exception_fails_only_its_batch() -> None:
    def predict_batch(payloads: list[Any]) -> list[Any]:
        if "bad" in payloads:
            raise ValueError("cannot embed 'bad'")
        return [f"ok {p}" for p in payloads]

    async def scenario() -> tuple[list[Any], list[Any]]:
        slots = FakeSlots()
        batcher = Batcher(ADAPTIVE, method(predict_batch), slots, max_queue=64)
        slots.gate.clear()
        first = asyncio.ensure_future(batcher.submit(call("a")))
        failing = [asyncio.ensure_future(batcher.submit(call(p))) for p in ("b", "bad", "c")]
        await asyncio.sleep(0.01)
        slots.gate.set()
        results = await asyncio.gather(first, *failing, return_exceptions=True)
        later = await gather_results(batcher, ["d", "e"])
        return list(results), later

    results, later = asyncio.run(scenario())
    assert results[0] == "ok a"
    for error in results[1:]:
        assert isinstance(error, HTTPError) and error.status == 500
        assert error.message == "the predictor raised ValueError: cannot embed 'bad'"
    assert later == ["ok d", "ok e"]


def test_an_exception_in_the_result_list_fails_only_that_request() -> None:
    def predict_batch(payloads: list[Any]) -> list[Any]:
        return [HTTPError(400, "not text") if p is None else p for p in payloads]

    async def scenario() -> list[Any]:
        slots = FakeSlots()
        batcher = Batcher(FIXED, method(predict_batch), slots, max_queue=64)
        return await gather_results(batcher, ["x", None, "y"])

    ok1, error, ok2 = asyncio.run(scenario())
    assert (ok1, ok2) == ("x", "y")
    assert isinstance(error, HTTPError) and error.status == 400 and error.message == "not text"


def test_the_queue_is_bounded() -> None:
    async def scenario() -> list[Any]:
        slots = FakeSlots()
        batcher = Batcher(ADAPTIVE, method(lambda payloads: payloads), slots, max_queue=2)
        slots.gate.clear()
        running = asyncio.ensure_future(batcher.submit(call(0)))  # takes the slot
        queued = [asyncio.ensure_future(batcher.submit(call(i))) for i in (1, 2)]
        await asyncio.sleep(0)
        with pytest.raises(HTTPError) as refused:
            await batcher.submit(call(3))
        assert refused.value.status == 503 and "batch queue is full" in refused.value.message
        slots.gate.set()
        return list(await asyncio.gather(running, *queued))

    assert asyncio.run(scenario()) == [0, 1, 2]


def test_a_request_that_times_out_while_waiting_leaves_the_batch() -> None:
    seen: list[list[Any]] = []

    def predict_batch(payloads: list[Any]) -> list[Any]:
        seen.append(list(payloads))
        return payloads

    async def scenario() -> list[Any]:
        slots = FakeSlots()
        batcher = Batcher(ADAPTIVE, method(predict_batch), slots, max_queue=8)
        slots.gate.clear()
        first = asyncio.ensure_future(batcher.submit(call("first")))
        await asyncio.sleep(0)
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.01):
                await batcher.submit(call("gone"))
        kept = asyncio.ensure_future(batcher.submit(call("kept")))
        await asyncio.sleep(0)
        slots.gate.set()
        return list(await asyncio.gather(first, kept))

    assert asyncio.run(scenario()) == ["first", "kept"]
    assert seen == [["first"], ["kept"]]


def test_fixed_mode_waits_then_runs_what_came() -> None:
    seen: list[int] = []

    def predict_batch(payloads: list[Any]) -> list[Any]:
        seen.append(len(payloads))
        return payloads

    async def scenario() -> float:
        policy = BatchPolicy(max_batch_size=8, max_wait_s=0.05, mode="fixed")
        batcher = Batcher(policy, method(predict_batch), FakeSlots(), max_queue=8)
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        await gather_results(batcher, [1, 2])
        return loop.time() - t0

    elapsed = asyncio.run(scenario())
    assert seen == [2]
    assert 0.04 <= elapsed < 1.0


def test_policy_rejects_nonsense() -> None:
    with pytest.raises(ValueError):
        BatchPolicy(max_batch_size=0, max_wait_s=0.0)
    with pytest.raises(ValueError):
        BatchPolicy(max_batch_size=1, max_wait_s=-1.0)
