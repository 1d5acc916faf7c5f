"""The gateway's control side: what the controller calls to add APIs and replicas."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from functools import partial

from cirrus.gateway.app import Gateway
from cirrus.gateway.cors import CorsPolicy
from cirrus.gateway.metrics import ApiMetrics, last_minute_of
from cirrus.gateway.routing import ReplicaSlot, Unavailable
from cirrus.gateway.split import Split
from cirrus.gateway.transport import ReplicaConnection
from cirrus.gateway.upstream import HttpUpstream
from cirrus.spec import ConcurrencySpec, CorsSpec, ProtocolSpec, SplitTarget
from cirrus.types import ApiKey, TrafficShare
from cirrus.wire import ReplicaReady

log = logging.getLogger("cirrus.gateway")


class GatewayController:
    """Implements `cirrus.control.controller.GatewayControl` over a running `Gateway`."""

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway
        self._slots: dict[str, ReplicaSlot] = {}

    def set_api(
        self,
        name: str,
        concurrency: ConcurrencySpec,
        kind: str = "realtime",
        multi_model: bool = False,
        auth_required: bool = False,
        cors: CorsSpec | None = None,
        split: list[SplitTarget] | None = None,
        sticky_header: str | None = None,
        protocol: ProtocolSpec | None = None,
        access_log: bool = False,
    ) -> None:
        self.gateway.set_api(
            name,
            kind=kind,
            multi_model=multi_model,
            max_concurrency=concurrency.max_concurrency,
            max_queue_length=concurrency.max_queue_length,
            timeout_s=concurrency.timeout_s,
            auth_required=auth_required,
            cors=None if cors is None else cors_policy(cors),
            split=None if split is None else split_of(split, sticky_header),
            protocol=protocol,
            access_log=access_log,
        )

    def remove_api(self, name: str) -> None:
        self.gateway.remove_api(name)

    def set_canary(self, name: str, serving: int | None, canary: int | None, percent: float) -> None:
        route = self.gateway.routes.get(name)
        if route is not None:
            route.set_canary(serving, canary, percent)

    def promote_canary(self, name: str) -> None:
        route = self.gateway.routes.get(name)
        if route is not None:
            route.promote_canary()

    def traffic(self, name: str, now: float) -> list[TrafficShare]:
        route = self.gateway.routes.get(name)
        if route is None:
            return []
        if route.split is not None:
            split = route.split
            weights = dict(zip(split.targets, split.weights, strict=True))
            return [
                _share(target, "shadow" if target in split.shadows else "split", weights.get(target), (sent,), now)
                for target, sent in split.sent.items()
            ]
        canary = route.canary
        if canary is None:
            return []
        percent = route.canary_percent
        return [
            _share(
                f"revision {route.revision}", "serving", 100.0 - percent, (route.metrics,), now, len(route.replicas)
            ),
            _share(f"revision {canary.revision}", "canary", percent, (canary.metrics,), now, len(canary.replicas)),
        ]

    def set_keys(self, keys: list[ApiKey]) -> None:
        self.gateway.keys.set_keys(keys)

    def set_unavailable(self, name: str, reason: str | None) -> None:
        route = self.gateway.routes.get(name)
        if route is None:
            return
        route.unavailable = reason
        if reason is not None and not route.replicas:
            route.fail_waiters(Unavailable(reason))  # those already waiting hear it now too

    async def add_replica(
        self,
        api: str,
        replica_id: str,
        report: ReplicaReady,
        secret: bytes,
        on_lost: Callable[[str], None] | None = None,
        revision: int = 0,
    ) -> None:
        """Connect to a ready replica (proving we know its `secret`) and route to it. Should the
        connection be lost, the replica leaves routing at once and `on_lost(reason)` is called."""
        conn: ReplicaConnection | HttpUpstream
        if report.address.startswith("http://"):  # kind server: the replica's own web app (cirrus/gateway/proxy.py)
            known = self.gateway.routes.get(api)
            conn = HttpUpstream(report.address, secret, known.max_concurrency if known is not None else 1)
        else:
            conn = await ReplicaConnection.open(report.address, secret, self.gateway.max_body_bytes)
        route = self.gateway.routes.get(api)  # (again: the API may have gone while connecting)
        if route is None:
            conn.close()
            raise LookupError(f"the API {api!r} is gone")
        if report.openapi:
            route.openapi = report.openapi
        slot = ReplicaSlot(replica_id, conn, revision=str(revision))
        self._slots[replica_id] = slot
        conn.on_lost = partial(self._lost, api, slot, on_lost)
        canary = route.canary
        (canary if canary is not None and canary.revision == revision else route).add_replica(slot, time.perf_counter())

    def _lost(self, api: str, slot: ReplicaSlot, on_lost: Callable[[str], None] | None, reason: str) -> None:
        """A replica's connection was lost: route no more requests to it (those in flight got 502)."""
        log.info("lost the connection to replica %s of %s: %s", slot.replica_id, api, reason)  # (the controller acts)
        route = slot.owner
        if route is not None and slot in route.replicas:  # (a restarted replica keeps its id: not by id alone)
            route.remove_replica(slot.replica_id)
        slot.draining = True
        if self._slots.get(slot.replica_id) is slot:
            del self._slots[slot.replica_id]
        if on_lost is not None:
            on_lost(reason)

    def drain_replica(self, api: str, replica_id: str) -> None:
        route = self.gateway.routes.get(api)
        if route is not None:
            route.remove_replica(replica_id)
        slot = self._slots.get(replica_id)
        if slot is not None:
            slot.draining = True
            if slot.conn.closed:
                self._slots.pop(replica_id, None)

    async def wait_drained(self, api: str, replica_id: str, timeout_s: float) -> None:
        slot = self._slots.get(replica_id)
        if slot is None:
            return
        try:
            async with asyncio.timeout(timeout_s):
                while slot.in_flight > 0 and not slot.conn.closed:
                    await asyncio.sleep(0.02)
        except TimeoutError:
            pass
        slot.conn.close()
        self._slots.pop(replica_id, None)

    def load(self, name: str) -> float:
        route = self.gateway.routes.get(name)
        if route is None:
            return 0.0
        return float(route.metrics.in_flight + (0 if route.canary is None else route.canary.metrics.in_flight))

    def cold_starts(self, name: str) -> tuple[int, float | None]:
        route = self.gateway.routes.get(name)
        return (0, None) if route is None else (route.cold_starts, route.last_cold_start_s)

    def inference_metrics(self, name: str, now: float) -> tuple[float | None, float | None, float | None]:
        route = self.gateway.routes.get(name)
        return (None, None, None) if route is None else route.metrics.replica_last_minute(now)

    def api_metrics(self, name: str, now: float) -> tuple[int, float | None, float | None, int, int, dict[str, int]]:
        route = self.gateway.routes.get(name)
        if route is None:
            return 0, None, None, 0, 0, {}
        routes = (route,) if route.canary is None else (route, route.canary)
        requests, _, p50, p99 = last_minute_of([r.metrics for r in routes], now)
        load = {s.replica_id: s.in_flight for s in self._slots.values()}
        in_flight = sum(r.metrics.in_flight for r in routes)
        return requests, p50, p99, in_flight, sum(r.metrics.queued for r in routes), load


def _share(
    target: str, role: str, weight: float | None, metrics: Sequence[ApiMetrics], now: float, ready: int | None = None
) -> TrafficShare:
    requests, errors, p50, p99 = last_minute_of(metrics, now)
    return TrafficShare(
        target=target,
        role=role,
        weight=weight,
        requests=requests,
        errors=errors,
        p50_ms=None if p50 is None else round(p50 * 1000, 3),
        p99_ms=None if p99 is None else round(p99 * 1000, 3),
        replicas_ready=ready,
    )


def split_of(targets: list[SplitTarget], sticky_header: str | None) -> Split:
    """A splitter's routing, from its spec."""
    weighted = [t for t in targets if not t.shadow]
    return Split(
        targets=tuple(t.name for t in weighted),
        weights=tuple(float(t.weight or 0) for t in weighted),
        shadows=tuple(t.name for t in targets if t.shadow),
        sticky_header=None if sticky_header is None else sticky_header.lower().encode("latin-1"),
    )


def cors_policy(spec: CorsSpec) -> CorsPolicy:
    return CorsPolicy(
        allow_origins=frozenset(spec.allow_origins),
        allow_methods=tuple(spec.allow_methods),
        allow_headers=tuple(spec.allow_headers),
        max_age_s=spec.max_age_s,
        allow_credentials=spec.allow_credentials,
    )
