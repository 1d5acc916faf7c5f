"""Joined gateways (`cirrus gateway --join`): the route table they follow and the load they report.

`Gateways` is the `GatewayControl` the daemon hands its controller: it passes every call on to the
daemon's own gateway and records what that gateway was told (each API's settings, canary and
unavailability, the API keys, the replicas added and not yet drained). The recording is the route
table (`cirrus/routes.py`), served to joined gateways by `GET /v1/gateways/routes`: they route
exactly as the daemon's gateway does, to the same replicas.

Each joined gateway reports its load about twice a second (`POST /v1/gateways/{id}/load`). `load`
is what the autoscaler sees: the local gateway's in-flight and queued requests plus those of every
report fresher than `REPORT_FRESH_S`; a gateway that stops reporting stops counting. A replica the
controller retires is stopped only once no fresh gateway holds it any more (`wait_drained`): each
has applied a table without it and finished the requests it had in flight there.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from cirrus.kinds import kind_of
from cirrus.routes import ApiRoute, JoinedGateway, LoadReport, RouteReplica, RouteTable, parse_version
from cirrus.spec import ConcurrencySpec, CorsSpec, ProtocolSpec, QueueSpec, SplitTarget
from cirrus.types import ApiKey, TrafficShare
from cirrus.wire import ReplicaReady

if TYPE_CHECKING:
    from cirrus.control.controller import GatewayControl

log = logging.getLogger("cirrus.gateways")

REPORT_FRESH_S = 3.0  # a load report older than this no longer counts (its gateway may be gone)
REPORT_FORGET_S = 60.0  # a gateway silent this long is no longer listed
MAX_GATEWAYS = 256  # gateways reporting at once; a report from one more is refused
POLL_CHECK_S = 0.15  # how often a long poll looks for a change of the table
DRAIN_CHECK_S = 0.05  # how often a retiring replica's holders are looked at


class TooManyGateways(Exception):
    pass


@dataclass
class _Api:
    """What the daemon's gateway was told about one API."""

    route: ApiRoute
    replicas: dict[str, RouteReplica] = field(default_factory=dict)


@dataclass(frozen=True)
class _Report:
    at: float  # clock() when it came
    report: LoadReport
    version: tuple[str, int] | None
    replicas: frozenset[str]


def is_redis(url: str | None) -> bool:
    return bool(url) and str(url).startswith(("redis://", "rediss://"))


class Gateways:
    """The local gateway's `GatewayControl`, recording the route table; the joined gateways' reports.

    `queue_store`: the daemon's queue store URL (joined gateways are told it only when it is Redis);
    `queue_spec(api)`: an async API's queue settings (the controller's `queue_spec`)."""

    def __init__(
        self,
        local: GatewayControl,
        clock: Callable[[], float] = time.monotonic,
        queue_store: str | None = None,
        queue_spec: Callable[[str], QueueSpec | None] | None = None,
    ) -> None:
        self.local = local
        self.clock = clock
        self.queue_store = queue_store if is_redis(queue_store) else None
        self.queue_spec = queue_spec or (lambda name: None)
        self.boot = secrets.token_hex(4)  # a restarted daemon's versions never equal this one's
        self._apis: dict[str, _Api] = {}
        self._keys: list[ApiKey] = []
        self._serial = 0
        self._digest = ""
        self._table: RouteTable | None = None  # None: something changed since it was built
        self._reports: dict[str, _Report] = {}
        self._closed = False

    # --- the route table -------------------------------------------------------------------
    def table(self) -> RouteTable:
        """The table now; its version's serial grows whenever its content changed."""
        if self._table is None:
            apis = [self._route(api) for _, api in sorted(self._apis.items())]
            body = RouteTable(version="", apis=apis, keys=self._keys, queue_store=self.queue_store)
            digest = hashlib.sha256(body.model_dump_json().encode()).hexdigest()
            if digest != self._digest:
                self._serial, self._digest = self._serial + 1, digest
            self._table = body.model_copy(update={"version": f"{self.boot}-{self._serial}"})
        return self._table

    @staticmethod
    def _route(api: _Api) -> ApiRoute:
        return api.route.model_copy(update={"replicas": [api.replicas[k] for k in sorted(api.replicas)]})

    async def changed(self, version: str | None, wait_s: float) -> RouteTable:
        """The table as soon as its version is not `version`, or after `wait_s` (a long poll)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait_s
        table = self.table()
        while table.version == version and not self._closed and loop.time() < deadline:
            await asyncio.sleep(POLL_CHECK_S)
            table = self.table()
        return table

    def close(self) -> None:
        """The daemon stops: long polls answer now."""
        self._closed = True

    def _changed(self) -> None:
        self._table = None

    # --- load reports ----------------------------------------------------------------------
    def report(self, gateway_id: str, report: LoadReport) -> int:
        """Keep a gateway's latest report; how many gateways report now. TooManyGateways: refused."""
        now = self.clock()
        self._forget_silent(now)
        if gateway_id not in self._reports and len(self._reports) >= MAX_GATEWAYS:
            raise TooManyGateways(f"{MAX_GATEWAYS} gateways report already")
        self._reports[gateway_id] = _Report(now, report, parse_version(report.version), frozenset(report.replicas))
        return len(self._fresh(now))

    def _fresh(self, now: float) -> list[_Report]:
        return [r for r in self._reports.values() if now - r.at <= REPORT_FRESH_S]

    def _forget_silent(self, now: float) -> None:
        for gateway_id in [g for g, r in self._reports.items() if now - r.at > REPORT_FORGET_S]:
            del self._reports[gateway_id]

    def remote_load(self, name: str) -> float:
        """In flight plus queued for an API at the joined gateways that reported lately."""
        return sum(r.report.apis.get(name, 0.0) for r in self._fresh(self.clock()))

    def joined(self) -> list[JoinedGateway]:
        now = self.clock()
        self._forget_silent(now)
        return [
            JoinedGateway(
                id=gateway_id,
                url=r.report.url,
                seen_s_ago=round(now - r.at, 3),
                version=r.report.version,
                apis=dict(r.report.apis),
            )
            for gateway_id, r in sorted(self._reports.items())
        ]

    def _holders(self, replica_id: str, serial: int) -> list[_Report]:
        """Fresh gateways that may still send requests to a replica the table lost at `serial`."""
        return [
            r
            for r in self._fresh(self.clock())
            if r.version is None or r.version[0] != self.boot or r.version[1] < serial or replica_id in r.replicas
        ]

    async def _remote_drained(self, replica_id: str, timeout_s: float) -> None:
        serial = int(self.table().version.rpartition("-")[2])  # the first table without the replica
        try:
            async with asyncio.timeout(timeout_s):
                while self._holders(replica_id, serial):
                    await asyncio.sleep(DRAIN_CHECK_S)
        except TimeoutError:
            log.warning("replica %s: a joined gateway still holds it after %.0fs; stopping it", replica_id, timeout_s)

    # --- GatewayControl: passed on to the local gateway, and recorded -------------------------
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
        self.local.set_api(
            name, concurrency, kind, multi_model, auth_required, cors, split, sticky_header, protocol, access_log
        )
        settings = {
            "kind": kind,
            "concurrency": concurrency,
            "multi_model": multi_model,
            "auth_required": auth_required,
            "cors": cors,
            "split": split,
            "sticky_header": sticky_header,
            "protocol": protocol,
            "access_log": access_log,
            "queue": self.queue_spec(name) if kind_of(kind).queued else None,
        }
        api = self._apis.get(name)
        if api is None:
            self._apis[name] = _Api(ApiRoute(name=name, **settings))
        else:
            api.route = api.route.model_copy(update=settings)
        self._changed()

    def remove_api(self, name: str) -> None:
        self.local.remove_api(name)
        if self._apis.pop(name, None) is not None:
            self._changed()

    def set_canary(self, name: str, serving: int | None, canary: int | None, percent: float) -> None:
        self.local.set_canary(name, serving, canary, percent)
        self._update(name, serving=serving, canary=canary, canary_percent=percent if canary is not None else 0.0)

    def promote_canary(self, name: str) -> None:
        self.local.promote_canary(name)
        api = self._apis.get(name)
        if api is not None and api.route.canary is not None:
            self._update(name, serving=api.route.canary, canary=None, canary_percent=0.0)

    def set_unavailable(self, name: str, reason: str | None) -> None:
        self.local.set_unavailable(name, reason)
        self._update(name, unavailable=reason)

    def _update(self, name: str, **changes: object) -> None:
        api = self._apis.get(name)
        if api is not None and any(getattr(api.route, k) != v for k, v in changes.items()):
            api.route = api.route.model_copy(update=changes)
            self._changed()

    def set_keys(self, keys: list[ApiKey]) -> None:
        self.local.set_keys(keys)
        self._keys = list(keys)
        self._changed()

    async def add_replica(
        self,
        api: str,
        replica_id: str,
        report: ReplicaReady,
        secret: bytes,
        on_lost: Callable[[str], None] | None = None,
        revision: int = 0,
    ) -> None:
        def lost(reason: str) -> None:
            self._forget_replica(api, replica_id)
            if on_lost is not None:
                on_lost(reason)

        await self.local.add_replica(api, replica_id, report, secret, lost, revision)
        recorded = self._apis.get(api)
        if recorded is not None:
            recorded.replicas[replica_id] = RouteReplica(
                id=replica_id,
                revision=revision,
                address=report.address,
                secret=base64.b64encode(secret).decode(),
                openapi=report.openapi,
            )
            self._changed()

    def _forget_replica(self, api: str, replica_id: str) -> None:
        recorded = self._apis.get(api)
        if recorded is not None and recorded.replicas.pop(replica_id, None) is not None:
            self._changed()

    def drain_replica(self, api: str, replica_id: str) -> None:
        self.local.drain_replica(api, replica_id)
        self._forget_replica(api, replica_id)

    async def wait_drained(self, api: str, replica_id: str, timeout_s: float) -> None:
        """Until the local gateway and every joined one have finished with the replica (or `timeout_s`)."""
        await asyncio.gather(
            self.local.wait_drained(api, replica_id, timeout_s), self._remote_drained(replica_id, timeout_s)
        )

    def load(self, name: str) -> float:
        """In flight plus queued for an API, at this gateway and the joined ones."""
        return self.local.load(name) + self.remote_load(name)

    def traffic(self, name: str, now: float) -> list[TrafficShare]:
        return self.local.traffic(name, now)

    def api_metrics(self, name: str, now: float) -> tuple[int, float | None, float | None, int, int, dict[str, int]]:
        return self.local.api_metrics(name, now)

    def cold_starts(self, name: str) -> tuple[int, float | None]:
        return self.local.cold_starts(name)

    def inference_metrics(self, name: str, now: float) -> tuple[float | None, float | None, float | None]:
        return self.local.inference_metrics(name, now)


if TYPE_CHECKING:  # mypy checks that it is what the controller takes

    def _check(gateways: Gateways) -> GatewayControl:
        return gateways
