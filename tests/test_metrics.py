"""Latency histograms: quantiles on known counts, and the sliding last-minute window."""

from __future__ import annotations

import bisect
import itertools
import math

import pytest

from cirrus.gateway.metrics import BUCKET_BOUNDS, WINDOW_S, ApiMetrics, quantile


def counts_with(**at: int) -> list[int]:
    """A histogram with `count` observations in bucket `b<index>`."""
    counts = [0] * (len(BUCKET_BOUNDS) + 1)
    for key, count in at.items():
        counts[int(key.removeprefix("b"))] = count
    return counts


def bucket_of(seconds: float) -> float:
    """The upper bound that `seconds` is reported as."""
    return BUCKET_BOUNDS[bisect.bisect_left(BUCKET_BOUNDS, seconds)]


def test_bounds_are_log_spaced_and_cover_50us_to_the_longest_timeout() -> None:
    assert BUCKET_BOUNDS[0] == pytest.approx(5e-5)
    assert BUCKET_BOUNDS[-1] >= 86_400  # timeout_s may be a day: no finite latency lands in overflow
    ratios = {round(b / a, 6) for a, b in itertools.pairwise(BUCKET_BOUNDS)}
    assert ratios == {round(10 ** (1 / 12), 6)}


def test_quantile_of_empty_histogram() -> None:
    assert quantile(counts_with(), 0.5) is None


def test_quantile_single_bucket() -> None:
    counts = counts_with(b10=5)
    for q in (0.0, 0.01, 0.5, 0.99, 1.0):
        assert quantile(counts, q) == BUCKET_BOUNDS[10]


def test_quantile_known_split() -> None:
    counts = counts_with(b0=50, b12=49, b24=1)  # 100 observations
    assert quantile(counts, 0.5) == BUCKET_BOUNDS[0]  # rank 50 is the last in b0
    assert quantile(counts, 0.51) == BUCKET_BOUNDS[12]
    assert quantile(counts, 0.99) == BUCKET_BOUNDS[12]  # rank 99
    assert quantile(counts, 0.991) == BUCKET_BOUNDS[24]
    assert quantile(counts, 1.0) == BUCKET_BOUNDS[24]


def test_quantile_overflow_bucket_is_infinite() -> None:
    counts = counts_with(b0=1, **{f"b{len(BUCKET_BOUNDS)}": 1})
    assert quantile(counts, 0.5) == BUCKET_BOUNDS[0]
    assert quantile(counts, 1.0) == math.inf


def test_observe_counts_and_buckets() -> None:
    metrics = ApiMetrics()
    for seconds in (0.001, 0.001, 0.002, 0.2):
        metrics.observe(200, seconds, now=1000.0)
    metrics.observe(500, 0.05, now=1000.5)
    totals = metrics.revisions[""]
    assert totals.codes == {200: 4, 500: 1}
    assert sum(totals.duration_counts) == 5
    assert totals.duration_seconds == pytest.approx(0.254)
    requests, p50, p99 = metrics.last_minute(now=1000.9)
    assert requests == 5
    assert p50 == bucket_of(0.002)
    assert p99 == bucket_of(0.2)
    assert 0.002 <= p50 < 0.002 * 1.22  # a bucket's bound is within ~21% of its values


def test_value_on_a_bound_falls_in_that_bucket() -> None:
    metrics = ApiMetrics()
    metrics.observe(200, BUCKET_BOUNDS[5], now=0.0)
    assert metrics.last_minute(now=0.0)[1] == BUCKET_BOUNDS[5]


def test_last_minute_drops_old_seconds() -> None:
    metrics = ApiMetrics()
    metrics.observe(200, 0.001, now=100.0)
    metrics.observe(200, 0.001, now=100.7)
    metrics.observe(200, 1.0, now=130.2)
    assert metrics.last_minute(now=130.5)[0] == 3
    # Second 100 is inside the window until now reaches 160 (the window is seconds 101..160).
    assert metrics.last_minute(now=159.99) == (3, bucket_of(0.001), bucket_of(1.0))
    assert metrics.last_minute(now=160.0) == (1, bucket_of(1.0), bucket_of(1.0))
    assert metrics.last_minute(now=189.99)[0] == 1
    assert metrics.last_minute(now=190.0) == (0, None, None)
    # Lifetime totals are kept.
    assert sum(metrics.revisions[""].duration_counts) == 3


def test_ring_slot_is_reused_for_a_new_second() -> None:
    metrics = ApiMetrics()
    metrics.observe(200, 0.001, now=5.0)
    metrics.observe(200, 0.5, now=5.0 + WINDOW_S)  # same ring slot, a minute later
    requests, p50, p99 = metrics.last_minute(now=5.0 + WINDOW_S)
    assert requests == 1
    assert p50 == p99 == bucket_of(0.5)


def test_steady_traffic_keeps_a_minute() -> None:
    metrics = ApiMetrics()
    for second in range(300):
        for _ in range(2):
            metrics.observe(200, 0.01, now=second + 0.5)
        assert metrics.last_minute(now=second + 0.9)[0] == 2 * min(second + 1, WINDOW_S)
