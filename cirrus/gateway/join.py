"""A joined gateway (`cirrus gateway --join ADMIN_URL`): one more gateway serving a daemon's APIs.

It runs the same `Gateway` as the daemon (the same routing, queues, keys, canaries and splitters) and
drives it through the same `GatewayController`, following the daemon's route table instead of a
controller of its own: `Joiner` long-polls `GET /v1/gateways/routes` and applies each new version
(APIs set and removed, canaries, unavailability, API keys, replicas connected and drained), and
reports its load every `REPORT_EVERY_S` to `POST /v1/gateways/{id}/load`, which the daemon's
autoscaler adds to its own gateway's. A request that finds an API at zero replicas is reported at
once (`cold`), so the daemon starts one as it would for its own gateway.

When the admin API cannot be reached, the gateway keeps serving what it has (the replicas it holds
go on answering) and retries with backoff, saying so once in its log. Async APIs need the queue
store: the table names it when it is Redis, and the gateway opens it; a daemon on SQLite keeps its
queue in a file only its node has, so async APIs answer 503 here, saying why.
"""

from __future__ import annotations

import asyncio
import base64
import logging
from collections.abc import Coroutine
from functools import partial
from typing import TYPE_CHECKING, Any

import httpx
from pydantic import ValidationError

from cirrus.gateway.app import REPLY_GRACE_S, Gateway
from cirrus.gateway.async_api import AsyncFront
from cirrus.gateway.control import GatewayController
from cirrus.kinds import kind_of
from cirrus.routes import ApiRoute, LoadReport, RouteReplica, RouteTable
from cirrus.wire import ReplicaReady

if TYPE_CHECKING:
    from cirrus.spec import QueueSpec
    from cirrus.store.base import QueueStore

log = logging.getLogger("cirrus.gateway.join")

ROUTES_PATH = "/v1/gateways/routes"
POLL_TIMEOUT_S = 30.0  # the admin API answers a long poll within 20 s
REPORT_EVERY_S = 0.5
REPORT_TIMEOUT_S = 2.0
SYNC_EVERY_S = 1.0  # replicas whose connection failed or was lost are tried again this often at most
BACKOFF_MIN_S, BACKOFF_MAX_S = 0.2, 5.0  # between tries to reach the admin API
CONNECT_BACKOFF_MAX_S = 5.0  # between tries to connect to one replica
JOIN_TIMEOUT_S = 10.0  # at start: how long an admin API that does not answer is tried
REPORT_GAP_S = 0.05  # reports woken early by cold starts come no closer together than this
NO_STORE = (
    "this gateway accepts no async requests: the daemon's queue store is SQLite, which only the daemon's "
    "node reaches; run the daemon with a Redis store (CIRRUS_STORE=redis://...) to accept them here"
)
STORE_FAILED = "this gateway accepts no async requests: it cannot open the daemon's queue store ({error})"


class JoinError(Exception):
    """The admin API refused this gateway, or is not a Cirrus admin API; the message says what to do."""


class _Outage:
    """Trouble reaching the admin API, logged once when it starts and once when it ends."""

    def __init__(self, admin_url: str) -> None:
        self.admin_url = admin_url
        self.since: str | None = None

    def failed(self, what: str, exc: Exception) -> None:
        if self.since is None:
            self.since = what
            why = str(exc) or type(exc).__name__
            log.warning("cannot %s at %s: %s; serving what this gateway has, retrying", what, self.admin_url, why)

    def ok(self) -> None:
        if self.since is not None:
            log.info("the admin API at %s answers again", self.admin_url)
            self.since = None


class Joiner:
    """Keeps a `Gateway` in step with a daemon's route table and reports its load there."""

    def __init__(
        self,
        gateway: Gateway,
        admin_url: str,
        token: str,
        gateway_id: str,
        url: str | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.gateway = gateway
        self.control = GatewayController(gateway)
        self.admin_url = admin_url.rstrip("/")
        self.gateway_id = gateway_id
        self.url = url  # where this gateway serves, told to the daemon for people
        self.http = httpx.AsyncClient(
            base_url=self.admin_url,
            headers={"authorization": f"Bearer {token}"},
            timeout=httpx.Timeout(REPORT_TIMEOUT_S, connect=3.0),
            transport=transport,
        )
        self.table: RouteTable | None = None
        self.routes: dict[str, ApiRoute] = {}  # the settings applied, per API (replicas left out)
        self.store: QueueStore | None = None
        self.store_url: str | None = None
        self.store_error: str | None = None  # why the store the table names could not be opened
        self._held: dict[str, tuple[str, str]] = {}  # replica id -> (API, address): connected, routed to
        self._connecting: set[str] = set()
        self._draining: dict[str, str] = {}  # replica id -> API: no longer routed to, finishing its requests
        self._retry: dict[str, tuple[float, int]] = {}  # replica id -> (next try, failures in a row)
        self._cold: set[str] = set()
        self._report_now = asyncio.Event()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._outage = _Outage(self.admin_url)
        gateway.on_cold = self._on_cold

    # --- the route table -------------------------------------------------------------------
    async def fetch(self, version: str | None) -> RouteTable:
        """The table once its version is not `version` (a long poll). JoinError: refused; httpx errors."""
        params = {"version": version} if version else None
        response = await self.http.get(ROUTES_PATH, params=params, timeout=httpx.Timeout(POLL_TIMEOUT_S, connect=3.0))
        status = response.status_code
        if status == 401:
            raise JoinError(f"the admin API at {self.admin_url} refused the token (401): give the daemon's admin token")
        if status in (404, 405):
            raise JoinError(
                f"{self.admin_url} has no {ROUTES_PATH} ({status}): give the URL of a Cirrus daemon's admin API "
                "(`cirrus up` prints it), of this Cirrus version"
            )
        if status != 200:
            raise httpx.HTTPStatusError(f"{status}: {response.text[:200]}", request=response.request, response=response)
        try:
            return RouteTable.model_validate_json(response.content)
        except ValidationError as exc:
            raise JoinError(f"{self.admin_url} answered a route table this gateway cannot read: {exc}") from None

    async def join(self, timeout_s: float = JOIN_TIMEOUT_S) -> RouteTable:
        """Fetch and apply the first table. JoinError: refused, or unreachable for `timeout_s`."""
        loop = asyncio.get_running_loop()
        deadline, backoff = loop.time() + timeout_s, BACKOFF_MIN_S
        while True:
            try:
                table = await self.fetch(None)
                break
            except httpx.HTTPError as exc:
                if loop.time() + backoff > deadline:
                    why = str(exc) or type(exc).__name__
                    raise JoinError(f"cannot reach the admin API at {self.admin_url}: {why}") from None
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, BACKOFF_MAX_S)
        await self.apply(table)
        return table

    async def follow(self) -> None:
        """Apply each new version of the table, for ever; an admin API gone is retried with backoff."""
        backoff = BACKOFF_MIN_S
        while True:
            version = self.table.version if self.table is not None else None
            try:
                table = await self.fetch(version)
            except (httpx.HTTPError, JoinError) as exc:
                self._outage.failed("fetch the route table", exc)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, BACKOFF_MAX_S)
                continue
            self._outage.ok()
            backoff = BACKOFF_MIN_S
            if table.version != version:
                await self.apply(table)

    async def apply(self, table: RouteTable) -> None:
        await self._use_store(table.queue_store)
        if self.table is None or table.keys != self.table.keys:
            self.control.set_keys(table.keys)
        wanted = {api.name for api in table.apis}
        for name in [n for n in self.routes if n not in wanted]:
            del self.routes[name]
            self.control.remove_api(name)  # requests waiting for it get 404; its replicas drain below
        for api in table.apis:
            self._apply_api(api)
        self.table = table
        self.sync_replicas()

    def _apply_api(self, api: ApiRoute) -> None:
        control, name = self.control, api.name
        control.set_api(
            name,
            api.concurrency,
            api.kind,
            api.multi_model,
            api.auth_required,
            api.cors,
            api.split,
            api.sticky_header,
            api.protocol,
            api.access_log,
        )
        self.routes[name] = api.model_copy(update={"replicas": []})
        behaviour = kind_of(api.kind)
        if behaviour.runs_replicas and behaviour.takes_predictions and api.serving is not None:
            route = self.gateway.routes[name]
            canary = route.canary
            if canary is not None and api.canary is None and canary.revision == api.serving:
                control.promote_canary(name)  # its replicas and waiters move over: nothing is dropped
            else:
                control.set_canary(name, api.serving, api.canary, api.canary_percent)
        unavailable = api.unavailable
        if behaviour.queued and self.gateway.async_front is None:
            why = NO_STORE if self.store_error is None else STORE_FAILED.format(error=self.store_error)
            unavailable = unavailable or why
        control.set_unavailable(name, unavailable)

    def queue_spec(self, name: str) -> QueueSpec | None:
        route = self.routes.get(name)
        return None if route is None else route.queue

    async def _use_store(self, url: str | None) -> None:
        """Open the queue store the table names (Redis), for async APIs' accepts and status reads."""
        if url == self.store_url:
            return
        await self._close_store()
        self.store_url, self.store_error = url, None
        if url is None:
            return
        from cirrus.store import open_store

        try:
            self.store = await asyncio.to_thread(open_store, url)
        except Exception as exc:
            self.store_error = str(exc) or type(exc).__name__
            log.error("cannot open the queue store the daemon uses: %s; async APIs answer 503 here", exc)
            return
        self.gateway.async_front = AsyncFront(self.store, queue_spec=self.queue_spec)

    async def _close_store(self) -> None:
        front, store = self.gateway.async_front, self.store
        self.gateway.async_front, self.store = None, None
        if front is not None:
            await front.close()
        if store is not None:
            store.close()

    # --- replicas --------------------------------------------------------------------------
    def _wanted(self) -> dict[str, tuple[str, RouteReplica]]:
        table = self.table
        return {} if table is None else {r.id: (api.name, r) for api in table.apis for r in api.replicas}

    def sync_replicas(self) -> None:
        """Drain the replicas the table no longer has; connect to those it has and this gateway does not."""
        wanted = self._wanted()
        for replica_id, (api, address) in list(self._held.items()):
            if replica_id not in wanted or wanted[replica_id][1].address != address:
                self._drain(api, replica_id)
        now = asyncio.get_running_loop().time()
        for replica_id, (api, replica) in wanted.items():
            busy = replica_id in self._held or replica_id in self._connecting or replica_id in self._draining
            if busy or self._retry.get(replica_id, (0.0, 0))[0] > now:
                continue
            self._connecting.add(replica_id)
            self._spawn(self._connect(api, replica))
        for replica_id in [r for r in self._retry if r not in wanted]:
            del self._retry[replica_id]

    async def _connect(self, api: str, replica: RouteReplica) -> None:
        replica_id = replica.id
        report = ReplicaReady(address=replica.address, pid=0, load_s=0.0, openapi=replica.openapi)
        try:
            secret = base64.b64decode(replica.secret)
            await self.control.add_replica(
                api, replica_id, report, secret, partial(self._lost, api, replica_id), replica.revision
            )
        except Exception as exc:
            failures = self._retry.get(replica_id, (0.0, 0))[1] + 1
            delay = min(CONNECT_BACKOFF_MAX_S, 0.25 * 2**failures)
            self._retry[replica_id] = (asyncio.get_running_loop().time() + delay, failures)
            if failures == 1:
                log.warning("cannot connect to replica %s of %s at %s: %s", replica_id, api, replica.address, exc)
            return
        finally:
            self._connecting.discard(replica_id)
        self._retry.pop(replica_id, None)
        self._held[replica_id] = (api, replica.address)
        wanted = self._wanted().get(replica_id)
        if wanted is None or wanted[1].address != replica.address:  # the table changed meanwhile
            self._drain(api, replica_id)

    def _lost(self, api: str, replica_id: str, reason: str) -> None:
        """The connection to a replica was lost (the gateway routes no more to it): try again soon, if the
        table still has it (a replica that exited leaves the table as the daemon sees it go)."""
        if self._held.get(replica_id, (None, None))[0] == api:
            del self._held[replica_id]
            self._retry[replica_id] = (asyncio.get_running_loop().time() + SYNC_EVERY_S, 1)

    def _drain(self, api: str, replica_id: str) -> None:
        """No new requests to it; those in flight finish, then its connection closes."""
        del self._held[replica_id]
        self._draining[replica_id] = api
        self.control.drain_replica(api, replica_id)
        route = self.routes.get(api)
        timeout_s = (route.concurrency.timeout_s if route is not None else 30.0) + REPLY_GRACE_S
        self._spawn(self._wait_drained(api, replica_id, timeout_s))

    async def _wait_drained(self, api: str, replica_id: str, timeout_s: float) -> None:
        try:
            await self.control.wait_drained(api, replica_id, timeout_s)
        finally:
            self._draining.pop(replica_id, None)
            self._report_now.set()  # the daemon stops the replica once no gateway holds it

    async def keep_connected(self) -> None:
        while True:
            await asyncio.sleep(SYNC_EVERY_S)
            self.sync_replicas()

    # --- load reports ----------------------------------------------------------------------
    def _on_cold(self, name: str) -> None:
        self._cold.add(name)
        self._report_now.set()

    def load_report(self) -> LoadReport:
        """What this gateway carries now; takes the cold starts noted since the last report."""
        loads = {name: self.control.load(name) for name in self.gateway.routes}
        cold, self._cold = sorted(self._cold), set()
        holding = set(self._wanted()) | set(self._held) | self._connecting | set(self._draining)
        return LoadReport(
            apis={name: load for name, load in loads.items() if load > 0},
            cold=cold,
            version=None if self.table is None else self.table.version,
            replicas=sorted(holding),
            url=self.url,
        )

    async def report(self) -> None:
        """Send the load report now; the cold starts go back for the next one when it fails."""
        report = self.load_report()
        try:
            response = await self.http.post(
                f"/v1/gateways/{self.gateway_id}/load",
                content=report.model_dump_json(),
                headers={"content-type": "application/json"},
            )
            if response.status_code != 200:
                raise httpx.HTTPStatusError(
                    f"{response.status_code}: {response.text[:200]}", request=response.request, response=response
                )
        except httpx.HTTPError as exc:
            self._cold.update(report.cold)
            self._outage.failed("report this gateway's load", exc)
            return
        self._outage.ok()

    async def report_load(self) -> None:
        while True:
            try:
                await asyncio.wait_for(self._report_now.wait(), REPORT_EVERY_S)
            except TimeoutError:
                pass
            self._report_now.clear()
            await self.report()
            await asyncio.sleep(REPORT_GAP_S)

    # --- life ------------------------------------------------------------------------------
    def start(self) -> list[asyncio.Task[None]]:
        """Follow the table, keep replicas connected, report the load: the tasks (cancel them to stop)."""
        loop = asyncio.get_running_loop()
        return [loop.create_task(c) for c in (self.follow(), self.keep_connected(), self.report_load())]

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def close(self) -> None:
        """Close every replica connection and the queue store (once requests in flight have finished)."""
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        held = {replica_id: api for replica_id, (api, _) in self._held.items()} | self._draining
        for replica_id, api in held.items():
            self.control.drain_replica(api, replica_id)
            await self.control.wait_drained(api, replica_id, 0)
        self._held.clear()
        self._draining.clear()
        await self._close_store()
        await self.http.aclose()
