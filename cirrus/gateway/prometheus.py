"""`GET /metrics`: the gateway's counters in the Prometheus text format, built at scrape time.

`render(gateway, extra)` also collects `extra` (prometheus_client collectors: the daemon adds the
control plane's). Histograms are exported at every third internal bound (4 per decade, 50 us up).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

from cirrus.gateway.app import Gateway
from cirrus.gateway.metrics import BATCH_BOUNDS, BUCKET_BOUNDS, STAGES
from cirrus.gateway.routing import ApiRoute

_EXPORT_EVERY = 3  # internal buckets are 12 per decade; Prometheus gets 4 per decade


def render(gateway: Gateway, extra: Iterable[Any] = ()) -> bytes:
    from prometheus_client import CollectorRegistry, generate_latest

    registry = CollectorRegistry(auto_describe=False)
    registry.register(_GatewayCollector(gateway))
    for collector in extra:
        registry.register(collector)
    return generate_latest(registry)


class _GatewayCollector:
    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

        by_rev = ["api", "revision"]
        requests = CounterMetricFamily("cirrus_requests", "Requests answered, by HTTP status", labels=[*by_rev, "code"])
        duration = HistogramMetricFamily(
            "cirrus_request_duration_seconds", "The gateway's time for a request, arrival to answer", labels=by_rev
        )
        stages = HistogramMetricFamily(
            "cirrus_stage_duration_seconds",
            "Time in each stage: queue (gateway, until a replica slot), pre_predict, slot_wait, predict",
            labels=[*by_rev, "stage"],
        )
        batch_size = HistogramMetricFamily(
            "cirrus_batch_size", "Requests by the size of the predict batch they ran in", labels=by_rev
        )
        in_flight = GaugeMetricFamily("cirrus_in_flight_requests", "Requests being served", labels=["api"])
        queued = GaugeMetricFamily("cirrus_queued_requests", "Requests waiting in the gateway queue", labels=["api"])
        cold = CounterMetricFamily(
            "cirrus_cold_starts", "Cold starts: a request found no replica and waited for one to start", labels=["api"]
        )
        for name, route in sorted(self.gateway.routes.items()):
            routes: tuple[ApiRoute, ...] = (route,) if route.canary is None else (route, route.canary)
            for each in routes:
                for revision, totals in sorted(each.metrics.revisions.items()):
                    labels = [name, revision]
                    for code, count in sorted(totals.codes.items()):
                        requests.add_metric([*labels, str(code)], count)
                    duration.add_metric(labels, _buckets(totals.duration_counts), totals.duration_seconds)
                    for index, stage in enumerate(STAGES):
                        counts = totals.stage_counts[index]
                        if any(counts):
                            stages.add_metric([*labels, stage], _buckets(counts), totals.stage_seconds[index])
                    if totals.batch_sum:
                        batch = _buckets(totals.batch_counts, BATCH_BOUNDS, 1)
                        batch_size.add_metric(labels, batch, float(totals.batch_sum))
            in_flight.add_metric([name], sum(r.metrics.in_flight for r in routes))
            queued.add_metric([name], sum(r.metrics.queued for r in routes))
            cold.add_metric([name], route.cold_starts + (0 if route.canary is None else route.canary.cold_starts))
        yield from (requests, duration, stages, batch_size, in_flight, queued, cold)


def _buckets(
    counts: list[int], bounds: tuple[float, ...] | tuple[int, ...] = BUCKET_BOUNDS, every: int = _EXPORT_EVERY
) -> list[tuple[str, float]]:
    """Cumulative Prometheus buckets from per-bucket counts (the last count is above every bound),
    at every `every`-th bound."""
    cumulative, buckets = 0, []
    for index, (bound, count) in enumerate(zip(bounds, counts, strict=False)):
        cumulative += count
        if index % every == 0:
            buckets.append((f"{bound:.6g}", float(cumulative)))
    buckets.append(("+Inf", float(sum(counts))))
    return buckets
