"""Per-API request counters and latency histograms, cheap enough for the hot path.

The last minute is kept as 60 one-second buckets of a log-spaced histogram, from which
`cirrus get` reads requests per minute and p50/p99, and the autoscaler will read load.

Replicas also measure each request's time waiting for an inference slot, its predict call and the
size of the batch it ran in; they come back on the `InferResponse` and are kept the same way.
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
class ReplicaTotals:
    """Histograms (totals since start) of what replicas measured: for `/metrics`."""

    batch_counts: list[int] = field(default_factory=lambda: [0] * (len(BATCH_BOUNDS) + 1))
    batch_sum: int = 0
    slot_wait_counts: list[int] = field(default_factory=_new_counts)
    slot_wait_seconds: float = 0.0
    predict_counts: list[int] = field(default_factory=_new_counts)
    predict_seconds: float = 0.0


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
    by_status: Counter[int] = field(default_factory=Counter)
    total_counts: list[int] = field(default_factory=_new_counts)
    total_seconds: float = 0.0
    replica: ReplicaTotals = field(default_factory=ReplicaTotals)
    _ring: list[_Second] = field(default_factory=lambda: [_Second() for _ in range(WINDOW_S)])
    _replica_ring: list[_ReplicaSecond] = field(default_factory=lambda: [_ReplicaSecond() for _ in range(WINDOW_S)])

    def observe(self, status: int, seconds: float, now: float) -> None:
        self.by_status[status] += 1
        index = bisect.bisect_left(BUCKET_BOUNDS, seconds)
        self.total_counts[index] += 1
        self.total_seconds += seconds
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

    def observe_replica(self, response: InferResponse, now: float) -> None:
        """Record the replica's measurements of one answered request (none when predict did not run)."""
        size = response.batch_size
        if size <= 0:
            return
        wait_index = bisect.bisect_left(BUCKET_BOUNDS, response.slot_wait_s)
        predict_index = bisect.bisect_left(BUCKET_BOUNDS, response.predict_s)
        totals = self.replica
        totals.batch_counts[bisect.bisect_left(BATCH_BOUNDS, size)] += 1
        totals.batch_sum += size
        totals.slot_wait_counts[wait_index] += 1
        totals.slot_wait_seconds += response.slot_wait_s
        totals.predict_counts[predict_index] += 1
        totals.predict_seconds += response.predict_s
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
