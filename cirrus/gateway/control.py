"""The gateway's control side: what the controller calls to add APIs and replicas."""

from __future__ import annotations

import asyncio
import time

from cirrus.gateway.app import Gateway
from cirrus.gateway.routing import ReplicaSlot, Unavailable
from cirrus.gateway.transport import ReplicaConnection
from cirrus.spec import ConcurrencySpec
from cirrus.wire import ReplicaReady


class GatewayController:
    """Implements `cirrus.control.controller.GatewayControl` over a running `Gateway`."""

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway
        self._slots: dict[str, ReplicaSlot] = {}

    def set_api(
        self, name: str, concurrency: ConcurrencySpec, kind: str = "realtime", multi_model: bool = False
    ) -> None:
        self.gateway.set_api(
            name,
            kind=kind,
            multi_model=multi_model,
            max_concurrency=concurrency.max_concurrency,
            max_queue_length=concurrency.max_queue_length,
            timeout_s=concurrency.timeout_s,
        )

    def remove_api(self, name: str) -> None:
        self.gateway.remove_api(name)

    def set_unavailable(self, name: str, reason: str | None) -> None:
        route = self.gateway.routes.get(name)
        if route is None:
            return
        route.unavailable = reason
        if reason is not None and not route.replicas:
            route.fail_waiters(Unavailable(reason))  # those already waiting hear it now too

    async def add_replica(self, api: str, replica_id: str, report: ReplicaReady) -> None:
        conn = await ReplicaConnection.open(report.address)
        route = self.gateway.routes.get(api)
        if route is None:
            conn.close()
            raise LookupError(f"the API {api!r} is gone")
        if report.openapi:
            route.openapi = report.openapi
        slot = ReplicaSlot(replica_id, conn)
        self._slots[replica_id] = slot
        route.add_replica(slot, time.perf_counter())

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
        return 0.0 if route is None else float(route.metrics.in_flight)

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
        requests, p50, p99 = route.metrics.last_minute(now)
        load = {s.replica_id: s.in_flight for s in self._slots.values()}
        return requests, p50, p99, route.metrics.in_flight, route.metrics.queued, load
