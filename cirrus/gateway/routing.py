"""Routing: least-loaded choice among ready replicas, and the bounded per-API FIFO queue.

A multi-model API routes a request for a model to a replica that already holds it when one has
room (its replies report what it holds), so a model is not loaded on every replica in turn.
`choose_replica` is the pure decision; `ApiRoute` holds one API's replicas and waiters and hands a
freed replica straight to the oldest waiter, so queued requests are served in arrival order.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from cirrus.gateway.cors import CorsPolicy
from cirrus.gateway.metrics import ApiMetrics
from cirrus.gateway.split import Split, WeightedPicker
from cirrus.kinds import Kind, kind_of

if TYPE_CHECKING:
    from cirrus.spec import ProtocolSpec


class Overloaded(Exception):
    """Every replica is at max_concurrency and the queue is full."""


class QueueTimeout(Exception):
    """A queued request found no free replica before its deadline."""


class Unavailable(Exception):
    """The API has no revision that can serve (its code does not load); the message says why."""


def choose_replica(
    in_flight: Sequence[int], capacity: int, start: int = 0, preferred: Sequence[bool] | None = None
) -> int | None:
    """Index of the least-loaded replica with room (`in_flight < capacity`), or None.

    Ties go to the first one at or after `start`, so callers can rotate `start` to spread
    equal load instead of always picking the first replica. With `preferred` (one flag per
    replica, e.g. "holds the requested model"), the least-loaded preferred replica with room wins
    over any other; only when no preferred one has room does the choice fall back to all.
    """
    if preferred is not None and any(preferred):
        masked = [load if wanted else capacity for load, wanted in zip(in_flight, preferred, strict=True)]
        index = choose_replica(masked, capacity, start)
        if index is not None:
            return index
    count = len(in_flight)
    best: int | None = None
    best_load = capacity
    for step in range(count):
        index = (start + step) % count
        load = in_flight[index]
        if load < best_load:
            best, best_load = index, load
            if load == 0:
                break
    return best


@dataclass(eq=False)
class ReplicaSlot:
    """The gateway's view of one ready replica."""

    replica_id: str
    conn: Any  # ReplicaConnection; Any so routing can be tested with stand-ins
    in_flight: int = 0
    completed: int = 0
    draining: bool = False
    held: frozenset[str] = frozenset()  # a multi-model API: the models it reported holding last
    revision: str = ""  # the revision it runs (a label of the metrics of the requests it answers)
    owner: ApiRoute | None = field(
        default=None, repr=False
    )  # the route it serves in now (a promoted canary's replicas move)


@dataclass
class ApiRoute:
    name: str
    max_concurrency: int
    max_queue_length: int
    timeout_s: float
    kind: str = "realtime"
    behaviour: Kind = field(init=False)  # what the kind does with requests (cirrus/kinds)
    openapi: dict[str, Any] | None = None
    multi_model: bool = False  # serves `POST /<api>/<model>`; routes to a replica holding the model
    replicas: list[ReplicaSlot] = field(default_factory=list)
    waiters: deque[asyncio.Future[ReplicaSlot]] = field(default_factory=deque)
    metrics: ApiMetrics = field(default_factory=ApiMetrics)
    cold_since: float | None = None  # when a request first waited on zero replicas (perf_counter)
    cold_starts: int = 0
    last_cold_start_s: float | None = None
    unavailable: str | None = None  # set by the controller while no revision can serve: 503 at once
    auth_required: bool = False  # requests need an API key (the spec's `auth: required`)
    cors: CorsPolicy | None = None  # cross-origin requests from browsers (the spec's `cors`); None: no CORS
    protocol: ProtocolSpec | None = None  # a standard protocol it also speaks (the spec's `protocol`)
    access_log: bool = False  # a JSON line per request to the access log (the spec's `access_log`)
    split: Split | None = None  # a splitter: the APIs it sends requests to
    revision: int | None = None  # the revision its replicas run, while a canary runs beside it
    canary: ApiRoute | None = None  # a canary revision's replicas, waiters and metrics
    _canary_picker: WeightedPicker | None = None
    _turn: int = 0

    def __post_init__(self) -> None:
        self.behaviour = kind_of(self.kind)

    def try_acquire(self, model: str | None = None) -> ReplicaSlot | None:
        """A replica with room (one holding `model`, if any has room), taken; None when all are full."""
        if self.waiters:  # keep FIFO order: nobody overtakes a queued request
            return None
        replicas = self.replicas
        if not replicas:
            return None
        self._turn += 1
        preferred = [model in r.held for r in replicas] if model is not None and self.multi_model else None
        index = choose_replica(
            [r.in_flight for r in replicas], self.max_concurrency, self._turn % len(replicas), preferred
        )
        if index is None:
            return None
        slot = replicas[index]
        slot.in_flight += 1
        return slot

    async def acquire(self, timeout_s: float, model: str | None = None) -> ReplicaSlot:
        slot = self.try_acquire(model)
        if slot is not None:
            return slot
        if self.unavailable is not None and not self.replicas:
            raise Unavailable(self.unavailable)
        if len(self.waiters) >= self.max_queue_length:
            raise Overloaded(self.name)
        waiter: asyncio.Future[ReplicaSlot] = asyncio.get_running_loop().create_future()
        self.waiters.append(waiter)
        self.metrics.queued += 1
        try:
            async with asyncio.timeout(timeout_s):
                return await waiter
        except BaseException as exc:
            if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                self.release(waiter.result())  # handed a replica just as we gave up: give it back
            else:
                waiter.cancel()
                try:
                    self.waiters.remove(waiter)
                except ValueError:
                    pass
            if isinstance(exc, TimeoutError):
                raise QueueTimeout(self.name) from None
            raise
        finally:
            self.metrics.queued -= 1

    def release(self, slot: ReplicaSlot) -> None:
        slot.in_flight -= 1
        owner = slot.owner or self
        if not slot.draining and slot in owner.replicas:
            owner._hand_over(slot)

    # --- canaries -----------------------------------------------------------------------
    def pick(self) -> ApiRoute:
        """Where a request goes: this route, or its canary by the canary's share (once it has a replica)."""
        canary = self.canary
        if canary is None or not canary.replicas or self._canary_picker is None:
            return self
        return canary if self._canary_picker.pick() == 1 else self

    @property
    def canary_percent(self) -> float:
        """The share of requests its canary is set to get (0: no canary)."""
        return 0.0 if self._canary_picker is None else self._canary_picker.weights[1]

    def set_canary(self, serving: int | None, canary: int | None, percent: float) -> None:
        """Route `percent` of requests to revision `canary`'s replicas, the rest to `serving`'s (None:
        no canary; one that ran is aborted: its waiters come back here, its replicas drain)."""
        self.revision = serving
        current = self.canary
        if current is not None and current.revision == canary:
            if self._canary_picker is None or self._canary_picker.weights[1] != percent:
                self._canary_picker = WeightedPicker((100.0 - percent, percent))
            return
        if current is not None:
            self._end_canary(promote=False)
        if canary is None:
            return
        route = ApiRoute(
            self.name, self.max_concurrency, self.max_queue_length, self.timeout_s, self.kind, self.openapi
        )
        route.multi_model, route.revision = self.multi_model, canary
        self.canary, self._canary_picker = route, WeightedPicker((100.0 - percent, percent))

    def promote_canary(self) -> None:
        """The canary takes over: its replicas and waiters serve here, with no request dropped."""
        if self.canary is not None:
            self._end_canary(promote=True)

    def _end_canary(self, promote: bool) -> None:
        canary = self.canary
        assert canary is not None
        self.canary, self._canary_picker = None, None
        if promote:
            self.revision = canary.revision
        for slot in canary.replicas:
            if promote:
                slot.owner = self
                self.replicas.append(slot)
            else:
                slot.draining = True  # the controller stops it
        canary.replicas.clear()
        self.waiters.extend(canary.waiters)
        canary.waiters.clear()
        for slot in list(self.replicas):
            self._hand_over(slot)

    def _hand_over(self, slot: ReplicaSlot) -> None:
        """Give a replica with room to queued requests, oldest first."""
        waiters = self.waiters
        while waiters and slot.in_flight < self.max_concurrency:
            waiter = waiters.popleft()
            if waiter.done():
                continue
            slot.in_flight += 1
            waiter.set_result(slot)

    def add_replica(self, slot: ReplicaSlot, now: float | None = None) -> None:
        slot.owner = self
        self.replicas.append(slot)
        if self.cold_since is not None:
            now = time.perf_counter() if now is None else now
            self.cold_starts += 1
            self.last_cold_start_s = now - self.cold_since
            self.cold_since = None
        self._hand_over(slot)

    def note_cold(self, now: float) -> bool:
        """A request found no ready replica; True the first time since the API last had one."""
        if self.replicas or self.cold_since is not None:
            return False
        self.cold_since = now
        return True

    def remove_replica(self, replica_id: str) -> ReplicaSlot | None:
        """Stop routing to a replica; requests in flight on it go on (it drains)."""
        for slot in self.replicas:
            if slot.replica_id == replica_id:
                self.replicas.remove(slot)
                slot.draining = True
                return slot
        return None if self.canary is None else self.canary.remove_replica(replica_id)

    def fail_waiters(self, error: Exception) -> None:
        if self.canary is not None:
            self.canary.fail_waiters(error)
        while self.waiters:
            waiter = self.waiters.popleft()
            if not waiter.done():
                waiter.set_exception(error)
