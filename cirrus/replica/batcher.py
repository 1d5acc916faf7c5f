"""Server-side batching: which waiting requests start together, and the queue that runs them.

`decide` is the whole policy, a pure function of the queue, the slots and the time (tested on
traces with an injected clock). `Batcher` owns the bounded queue of requests waiting for a batch,
asks `decide` whenever something changes (a request arrives, a batch ends, a wait runs out) and
runs each batch as one `predict_batch(payloads)` call on the replica's inference `Slots`.

Requests gather while every slot is busy; a slot that frees takes everything waiting, up to
`max_batch_size`. In `adaptive` mode a request that finds an idle replica starts at once. The one
wait adaptive mode allows is within `max_wait_s` of a batch's end, while fewer requests wait than
were in play then (that batch's requests plus those already waiting): the clients it just
answered are likely to send again within moments, so the slot waits (at most `max_wait_s` after it
freed) for as many, instead of running a lone request and leaving the rest to queue behind it (a
closed loop of N clients would otherwise settle into batches of 1 and N-1, or N/2 and N/2).
In `fixed` mode every batch waits up to `max_wait_s`, from its oldest request, to fill.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any, Literal, Protocol

from cirrus.predictor import Call, HTTPError, Method, PredictorFailed

log = logging.getLogger("cirrus.replica")

Clock = Callable[[], float]
NEVER = float("-inf")


@dataclass(frozen=True, slots=True)
class BatchPolicy:
    max_batch_size: int
    max_wait_s: float
    mode: Literal["adaptive", "fixed"] = "adaptive"

    def __post_init__(self) -> None:
        if self.max_batch_size < 1:
            raise ValueError("max_batch_size must be at least 1")
        if self.max_wait_s < 0:
            raise ValueError("max_wait_s must not be negative")
        if self.mode not in ("adaptive", "fixed"):
            raise ValueError(f"unknown batching mode {self.mode!r}; use adaptive or fixed")


@dataclass(frozen=True, slots=True)
class QueueState:
    waiting: int  # requests waiting for a batch
    oldest_at: float  # when the oldest of them arrived (any value when none waits)
    free_slots: int  # slots with no batch running
    freed_at: float = NEVER  # when a batch last ended (NEVER: none has)
    # Requests to expect right after the last batch ended: its own clients, likely to send again, plus
    # those already waiting then (an estimate of the replica's concurrency; 0: no batch yet).
    expected: int = 0


@dataclass(frozen=True, slots=True)
class Decision:
    take: int  # start one batch of this many of the oldest waiting requests now (0: none)
    wake_at: float | None = None  # nothing starts: decide again at this time unless something happens first


def decide(policy: BatchPolicy, state: QueueState, now: float) -> Decision:
    """Whether a batch starts now, and of how many requests; or until when to wait."""
    if state.free_slots <= 0 or state.waiting <= 0:
        return Decision(0)  # the next arrival or the next batch to end decides again
    if state.waiting >= policy.max_batch_size:
        return Decision(policy.max_batch_size)
    if policy.mode == "fixed":
        deadline = state.oldest_at + policy.max_wait_s
        return Decision(state.waiting) if now >= deadline else Decision(0, deadline)
    # Adaptive: hold back only within max_wait of a batch's end, and only while fewer requests wait
    # than expected then: the clients of that batch are on their way back. Idle longer: start at once.
    deadline = state.freed_at + policy.max_wait_s
    if state.waiting < min(policy.max_batch_size, state.expected) and now < deadline:
        return Decision(0, deadline)
    return Decision(state.waiting)


# --- running batches -----------------------------------------------------------------------------


class SlotRunner(Protocol):
    """What the batcher needs from the replica's `Slots` (a fake in tests)."""

    size: int

    async def run_sync(self, fn: Any, kwargs: dict[str, Any]) -> Any: ...

    async def run_async(self, fn: Any, kwargs: dict[str, Any]) -> Any: ...


class Measured(Protocol):
    """Where a timed call records itself (a `Call`, or a batch's `_Timing`)."""

    slot_wait_s: float
    predict_s: float
    batch_size: int


@dataclass(slots=True)
class _Timing:
    slot_wait_s: float = 0.0
    predict_s: float = 0.0
    batch_size: int = 0


@dataclass(slots=True)
class _Waiter:
    call: Call
    future: asyncio.Future[Any]
    arrived: float


def timed_sync(fn: Any, into: Measured, clock: Clock) -> Any:
    """`fn` wrapped to record, `into` a call, how long it waited for its slot thread and how long it ran."""
    ready = clock()

    def run(**kwargs: Any) -> Any:
        started = clock()
        try:
            return fn(**kwargs)
        finally:
            into.slot_wait_s = started - ready
            into.predict_s = clock() - started
            into.batch_size = 1

    return run


def timed_async(fn: Any, into: Measured, clock: Clock) -> Any:
    """`timed_sync` for an `async def` predict."""
    ready = clock()

    async def run(**kwargs: Any) -> Any:
        started = clock()
        try:
            return await fn(**kwargs)
        finally:
            into.slot_wait_s = started - ready
            into.predict_s = clock() - started
            into.batch_size = 1

    return run


class Batcher:
    """The queue of requests waiting for a batch (at most `max_queue`), run on `slots`."""

    def __init__(
        self,
        policy: BatchPolicy,
        predict_batch: Method,
        slots: SlotRunner,
        max_queue: int,
        clock: Clock = time.monotonic,
    ) -> None:
        self.policy = policy
        self.predict_batch = predict_batch
        self.slots = slots
        self.max_queue = max_queue
        self.clock = clock
        self._waiting: deque[_Waiter] = deque()
        self._running = 0  # batches started and not yet ended
        self._freed_at = NEVER
        self._expected = 0
        self._timer: asyncio.TimerHandle | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    async def submit(self, call: Call) -> Any:
        """The result for `call.payload` from the batch it joins; raises what failed it."""
        if len(self._waiting) >= self.max_queue:
            raise HTTPError(503, f"the replica's batch queue is full ({self.max_queue} requests); retry later")
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._waiting.append(_Waiter(call, future, self.clock()))
        self._dispatch()
        return await future  # a timed-out request cancels its future: the batcher drops it

    def _state(self) -> QueueState:
        return QueueState(
            waiting=len(self._waiting),
            oldest_at=self._waiting[0].arrived if self._waiting else 0.0,
            free_slots=self.slots.size - self._running,
            freed_at=self._freed_at,
            expected=self._expected,
        )

    def _dispatch(self) -> None:
        """Start every batch `decide` allows now; set a timer when it says to wait."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        waiting = self._waiting
        while True:
            while waiting and waiting[0].future.done():  # abandoned (timed out) while waiting
                waiting.popleft()
            if any(w.future.done() for w in waiting):
                self._waiting = waiting = deque(w for w in waiting if not w.future.done())
            now = self.clock()
            decision = decide(self.policy, self._state(), now)
            if decision.take == 0:
                if decision.wake_at is not None:
                    loop = asyncio.get_running_loop()
                    self._timer = loop.call_later(max(0.0, decision.wake_at - now), self._dispatch)
                return
            batch = [waiting.popleft() for _ in range(decision.take)]
            self._running += 1
            task = asyncio.get_running_loop().create_task(self._run(batch, now))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
            for waiter in batch:
                waiter.future.add_done_callback(partial(_abandon_if_all_gone, batch, task))

    async def _run(self, batch: list[_Waiter], formed: float) -> None:
        method = self.predict_batch
        kwargs = {"payloads": [w.call.payload for w in batch]}
        timing = _Timing()
        try:
            try:
                if method.is_async:
                    results = await self.slots.run_async(timed_async(method.fn, timing, self.clock), kwargs)
                else:
                    results = await self.slots.run_sync(timed_sync(method.fn, timing, self.clock), kwargs)
            except Exception as exc:
                log.exception("predict_batch raised on a batch of %d requests", len(batch))
                for waiter in batch:
                    _settle(waiter.future, error=PredictorFailed.raised(exc))
                return
            started = formed + timing.slot_wait_s
            self._answer(batch, results, started, timing.predict_s)
        finally:
            self._running -= 1
            self._freed_at = self.clock()
            self._expected = len(batch) + sum(1 for w in self._waiting if not w.future.done())
            self._dispatch()

    def _answer(self, batch: list[_Waiter], results: Any, started: float, predict_s: float) -> None:
        size = len(batch)
        problem = _length_problem(results, size)
        if problem is not None:
            log.error("%s", problem)
            for waiter in batch:
                _settle(waiter.future, error=PredictorFailed(problem))
            return
        for waiter, result in zip(batch, results, strict=True):
            call = waiter.call
            call.slot_wait_s = started - waiter.arrived
            call.predict_s = predict_s
            call.batch_size = size
            if isinstance(result, Exception):  # this request's own failure (e.g. an HTTPError 400)
                _settle(waiter.future, error=result)
            else:
                _settle(waiter.future, result=result)


def _length_problem(results: Any, size: int) -> str | None:
    """Why `results` cannot answer a batch of `size` requests, or None."""
    if isinstance(results, str | bytes | bytearray | dict) or not hasattr(results, "__len__"):
        got = f"a {type(results).__name__}"
    elif len(results) != size:
        got = f"{len(results)} results"
    else:
        return None
    return (
        f"predict_batch returned {got} for a batch of {size} requests; "
        "it must return a list with exactly one result per payload, in order"
    )


def _settle(future: asyncio.Future[Any], result: Any = None, error: BaseException | None = None) -> None:
    if future.done():  # the request timed out meanwhile
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


def _abandon_if_all_gone(batch: list[_Waiter], task: asyncio.Task[None], _: asyncio.Future[Any]) -> None:
    """Every request of a running batch timed out: cancel it, so that a stuck sync call shows up in the
    slots' watchdog (`Slots.all_stuck_for`) as it does without batching."""
    if not task.done() and all(w.future.cancelled() for w in batch):
        task.cancel()
