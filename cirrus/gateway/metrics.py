"""Per-API request counters and latency histograms, cheap enough for the hot path.

The last minute is kept as 60 one-second buckets of a log-spaced histogram, from which
`cirrus get` reads requests per minute and p50/p99, and the autoscaler will read load.
"""

from __future__ import annotations

import bisect
import math
from collections import Counter
from dataclasses import dataclass, field

# Upper bounds in seconds: 50 us .. ~30 h (the longest timeout_s), 12 buckets per decade (about 21% apart).
BUCKET_BOUNDS: tuple[float, ...] = tuple(5e-5 * 10 ** (i / 12) for i in range(12 * 9 + 4))
WINDOW_S = 60


def _new_counts() -> list[int]:
    return [0] * (len(BUCKET_BOUNDS) + 1)


@dataclass
class _Second:
    second: int = -1
    count: int = 0
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
class ApiMetrics:
    in_flight: int = 0
    queued: int = 0
    by_status: Counter[int] = field(default_factory=Counter)
    total_counts: list[int] = field(default_factory=_new_counts)
    total_seconds: float = 0.0
    _ring: list[_Second] = field(default_factory=lambda: [_Second() for _ in range(WINDOW_S)])

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
            bucket.counts = _new_counts()
        bucket.count += 1
        bucket.counts[index] += 1

    def last_minute(self, now: float) -> tuple[int, float | None, float | None]:
        """(requests, p50 seconds, p99 seconds) over the last 60 seconds."""
        oldest = int(now) - WINDOW_S + 1
        merged = _new_counts()
        requests = 0
        for bucket in self._ring:
            if bucket.second >= oldest:
                requests += bucket.count
                for i, c in enumerate(bucket.counts):
                    if c:
                        merged[i] += c
        return requests, quantile(merged, 0.5), quantile(merged, 0.99)
