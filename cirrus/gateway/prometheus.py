"""`GET /metrics`: the gateway's counters in the Prometheus text format, built at scrape time."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from cirrus.gateway.app import Gateway
from cirrus.gateway.metrics import BUCKET_BOUNDS


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
            for name, route in sorted(gateway.routes.items()):
                m = route.metrics
                for status, count in sorted(m.by_status.items()):
                    requests.add_metric([name, str(status)], count)
                cumulative, buckets = 0, []
                for bound, count in zip(BUCKET_BOUNDS, m.total_counts, strict=False):
                    cumulative += count
                    buckets.append((f"{bound:.6g}", cumulative))
                buckets.append(("+Inf", sum(m.total_counts)))
                latency.add_metric([name], buckets, m.total_seconds)
                in_flight.add_metric([name], m.in_flight)
                queued.add_metric([name], m.queued)
                ready.add_metric([name], len(route.replicas))
            yield from (requests, latency, in_flight, queued, ready)

    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Collector())
    return generate_latest(registry)
