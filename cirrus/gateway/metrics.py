"""Per-API request counters and latency histograms, cheap enough for the hot path.

The last minute is kept as 60 one-second buckets of a log-spaced histogram, from which
`cirrus get` reads requests per minute and p50/p99, and the autoscaler will read load.

Replicas also measure each request's pre_predict hook, its time waiting for an inference slot, its
predict call and the size of the batch it ran in; they come back on the `InferResponse` and are
kept the same way. Totals since start (for `/metrics`) are kept per revision: `RevisionTotals`.
"""

from __future__ import annotations

import bisect
import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from cirrus.wire import InferResponse

# Upper bounds in seconds: 50 us .. ~30 h (the longest timeout_s), 12 buckets per decade (about 21% apart).
BUCKET_BOUNDS: tuple[float, ...] = tuple(5e-5 * 10 ** (i / 12) for i in range(12 * 9 + 4))
WINDOW_S = 60
# Upper bounds of the batch-size histogram (the spec allows batches of up to 1024).
BATCH_BOUNDS: tuple[int, ...] = tuple(2**i for i in range(11))
# The stages of a request that `cirrus_stage_duration_seconds` and `Server-Timing` name, in order.
STAGES = ("queue", "pre_predict", "slot_wait", "predict")


def _new_counts() -> list[int]:
    return [0] * (len(BUCKET_BOUNDS) + 1)


@dataclass
class _Second:
    second: int = -1
    count: int = 0
    errors: int = 0  # answered 5xx
    counts: list[int] = field(default_factory=_new_counts)


def quantile(counts: list[int], q: float) -> float | None:
    """The q-quantile (seconds) of a bucketed histogram: the upper bound of the bucket it falls in."""
    total = sum(counts)
    if total == 0:
        return None
    rank = max(1, math.ceil(q * total))
    seen = 0
    for index, count in enumerate(counts):
        seen += count
        if seen >= rank:
            return BUCKET_BOUNDS[index] if index < len(BUCKET_BOUNDS) else float("inf")
    return None


@dataclass
class _ReplicaSecond:
    second: int = -1
    requests: int = 0
    batches: float = 0.0  # each request adds 1/(its batch's size): a whole batch adds 1
    slot_wait: list[int] = field(default_factory=_new_counts)
    predict: list[int] = field(default_factory=_new_counts)


@dataclass
class RevisionTotals:
    """One revision's totals since start, for `/metrics`: answers by status, the gateway's total
    latency, each stage's time (`STAGES` order) and the batch sizes predict ran with."""

    codes: Counter[int] = field(default_factory=Counter)
    duration_counts: list[int] = field(default_factory=_new_counts)
    duration_seconds: float = 0.0
    stage_counts: tuple[list[int], ...] = field(default_factory=lambda: tuple(_new_counts() for _ in STAGES))
    stage_seconds: list[float] = field(default_factory=lambda: [0.0] * len(STAGES))
    batch_counts: list[int] = field(default_factory=lambda: [0] * (len(BATCH_BOUNDS) + 1))
    batch_sum: int = 0

    def stage(self, index: int, seconds: float) -> None:
        self.stage_counts[index][bisect.bisect_left(BUCKET_BOUNDS, seconds)] += 1
        self.stage_seconds[index] += seconds


def last_minute_of(metrics: Sequence[ApiMetrics], now: float) -> tuple[int, int, float | None, float | None]:
    """(requests, 5xx answers, p50 seconds, p99 seconds) of some routes together, over the last 60 seconds."""
    oldest = int(now) - WINDOW_S + 1
    merged = _new_counts()
    requests = errors = 0
    for each in metrics:
        for bucket in each._ring:
            if bucket.second >= oldest:
                requests += bucket.count
                errors += bucket.errors
                for i, c in enumerate(bucket.counts):
                    if c:
                        merged[i] += c
    return requests, errors, quantile(merged, 0.5), quantile(merged, 0.99)


@dataclass
class ApiMetrics:
    in_flight: int = 0
    queued: int = 0
    revisions: dict[str, RevisionTotals] = field(default_factory=dict)  # by revision ("": not known)
    _ring: list[_Second] = field(default_factory=lambda: [_Second() for _ in range(WINDOW_S)])
    _replica_ring: list[_ReplicaSecond] = field(default_factory=lambda: [_ReplicaSecond() for _ in range(WINDOW_S)])

    def totals(self, revision: str) -> RevisionTotals:
        totals = self.revisions.get(revision)
        if totals is None:
            totals = self.revisions[revision] = RevisionTotals()
        return totals

    def observe(
        self,
        status: int,
        seconds: float,
        now: float,
        revision: str = "",
        queue_s: float | None = None,
        response: InferResponse | None = None,
    ) -> None:
        """One answered request: its status and total `seconds`; the time it queued for a replica
        (None: it got none) and the replica's answer (its stages) when it reached one."""
        index = bisect.bisect_left(BUCKET_BOUNDS, seconds)
        totals = self.totals(revision)
        totals.codes[status] += 1
        totals.duration_counts[index] += 1
        totals.duration_seconds += seconds
        if queue_s is not None:
            totals.stage(0, queue_s)
        if response is not None:
            if response.pre_s:
                totals.stage(1, response.pre_s)
            if response.batch_size > 0:
                self._observe_replica(totals, response, now)
        second = int(now)
        bucket = self._ring[second % WINDOW_S]
        if bucket.second != second:
            bucket.second = second
            bucket.count = 0
            bucket.errors = 0
            bucket.counts = _new_counts()
        bucket.count += 1
        if status >= 500:
            bucket.errors += 1
        bucket.counts[index] += 1

    def last_minute(self, now: float) -> tuple[int, float | None, float | None]:
        """(requests, p50 seconds, p99 seconds) over the last 60 seconds."""
        requests, _, p50, p99 = last_minute_of((self,), now)
        return requests, p50, p99

    def _observe_replica(self, totals: RevisionTotals, response: InferResponse, now: float) -> None:
        """The replica's measurements of a request that predict answered: slot wait, predict, batch size."""
        size = response.batch_size
        wait_index = bisect.bisect_left(BUCKET_BOUNDS, response.slot_wait_s)
        predict_index = bisect.bisect_left(BUCKET_BOUNDS, response.predict_s)
        totals.batch_counts[bisect.bisect_left(BATCH_BOUNDS, size)] += 1
        totals.batch_sum += size
        totals.stage_counts[2][wait_index] += 1
        totals.stage_seconds[2] += response.slot_wait_s
        totals.stage_counts[3][predict_index] += 1
        totals.stage_seconds[3] += response.predict_s
        second = int(now)
        bucket = self._replica_ring[second % WINDOW_S]
        if bucket.second != second:
            self._replica_ring[second % WINDOW_S] = bucket = _ReplicaSecond(second=second)
        bucket.requests += 1
        bucket.batches += 1.0 / size
        bucket.slot_wait[wait_index] += 1
        bucket.predict[predict_index] += 1

    def replica_last_minute(self, now: float) -> tuple[float | None, float | None, float | None]:
        """(mean batch size, p50 slot wait seconds, p50 predict seconds) over the last 60 seconds."""
        oldest = int(now) - WINDOW_S + 1
        requests, batches = 0, 0.0
        slot_wait, predict = _new_counts(), _new_counts()
        for bucket in self._replica_ring:
            if bucket.second >= oldest and bucket.requests:
                requests += bucket.requests
                batches += bucket.batches
                for i, c in enumerate(bucket.slot_wait):
                    if c:
                        slot_wait[i] += c
                for i, c in enumerate(bucket.predict):
                    if c:
                        predict[i] += c
        mean = requests / batches if batches else None
        return mean, quantile(slot_wait, 0.5), quantile(predict, 0.5)
