"""`GET /metrics`: the gateway's counters in the Prometheus text format, built at scrape time."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from cirrus.gateway.app import Gateway
from cirrus.gateway.metrics import BATCH_BOUNDS, BUCKET_BOUNDS


def render(gateway: Gateway) -> bytes:
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

    class _Collector:
        def collect(self) -> Iterator[Any]:
            requests = CounterMetricFamily("cirrus_requests", "Requests answered", labels=["api", "status"])
            latency = HistogramMetricFamily("cirrus_request_duration_seconds", "Gateway latency", labels=["api"])
            in_flight = GaugeMetricFamily("cirrus_in_flight", "Requests being served", labels=["api"])
            queued = GaugeMetricFamily("cirrus_queued", "Requests waiting in the gateway queue", labels=["api"])
            ready = GaugeMetricFamily("cirrus_replicas_ready", "Replicas receiving requests", labels=["api"])
            batch_size = HistogramMetricFamily(
                "cirrus_batch_size", "Requests by the size of the predict batch they ran in", labels=["api"]
            )
            slot_wait = HistogramMetricFamily(
                "cirrus_slot_wait_seconds", "Time a request waited for an inference slot (or its batch)", labels=["api"]
            )
            predict = HistogramMetricFamily(
                "cirrus_predict_seconds", "Time of the predict (or predict_batch) call per request", labels=["api"]
            )
            for name, route in sorted(gateway.routes.items()):
                m = route.metrics
                for status, count in sorted(m.by_status.items()):
                    requests.add_metric([name, str(status)], count)
                latency.add_metric([name], _buckets(BUCKET_BOUNDS, m.total_counts), m.total_seconds)
                r = m.replica
                batch_size.add_metric([name], _buckets(BATCH_BOUNDS, r.batch_counts), float(r.batch_sum))
                slot_wait.add_metric([name], _buckets(BUCKET_BOUNDS, r.slot_wait_counts), r.slot_wait_seconds)
                predict.add_metric([name], _buckets(BUCKET_BOUNDS, r.predict_counts), r.predict_seconds)
                in_flight.add_metric([name], m.in_flight)
                queued.add_metric([name], m.queued)
                ready.add_metric([name], len(route.replicas))
            yield from (requests, latency, in_flight, queued, ready, batch_size, slot_wait, predict)

    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Collector())
    return generate_latest(registry)


def _buckets(bounds: tuple[float, ...] | tuple[int, ...], counts: list[int]) -> list[tuple[str, float]]:
    """Cumulative Prometheus buckets from per-bucket counts (the last count is above every bound)."""
    cumulative, buckets = 0, []
    for bound, count in zip(bounds, counts, strict=False):
        cumulative += count
        buckets.append((f"{bound:.6g}", float(cumulative)))
    buckets.append(("+Inf", float(sum(counts))))
    return buckets
