"""Joined gateways without processes: the route table the control plane records and serves
(`cirrus/control/gateways.py`), the load it sums over fresh reports (a fake clock), the wait before a
retired replica is stopped, and a joined gateway (`cirrus/gateway/join.py`) applying tables to a real
`Gateway` from a fake admin API. The real processes are in tests/test_e2e_gateways.py."""

from __future__ import annotations

import asyncio
import base64
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.testclient import TestClient

from cirrus.admin import build_admin_app
from cirrus.control.controller import Controller
from cirrus.control.gateways import REPORT_FRESH_S, Gateways, TooManyGateways
from cirrus.control.store import Store
from cirrus.gateway.app import Gateway
from cirrus.gateway.join import NO_STORE, Joiner, JoinError
from cirrus.routes import ApiRoute, LoadReport, RouteTable, parse_version
from cirrus.snapshots import SnapshotStore
from cirrus.spec import ConcurrencySpec, QueueSpec
from cirrus.testing import FakeGateway, FakeRuntime
from cirrus.types import ApiKey, DaemonInfo
from cirrus.wire import ReplicaReady


class Clock:
    def __init__(self, now: float = 100.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def recorded(clock: Clock | None = None, **kwargs: Any) -> tuple[Gateways, FakeGateway]:
    local = FakeGateway()
    return Gateways(local, clock=clock or Clock(), **kwargs), local


def serial(gateways: Gateways) -> int:
    parsed = parse_version(gateways.table().version)
    assert parsed is not None and parsed[0] == gateways.boot
    return parsed[1]


# --- the load the autoscaler sees ------------------------------------------------------------------


def test_load_is_the_local_gateways_plus_every_fresh_report() -> None:
    clock = Clock()
    gateways, local = recorded(clock)
    local.demand["api"] = 2.0
    assert gateways.load("api") == 2.0  # no joined gateway yet

    gateways.report("a", LoadReport(apis={"api": 3.0, "other": 1.0}))
    clock.now += 1.0
    assert gateways.report("b", LoadReport(apis={"api": 4.5})) == 2
    assert gateways.load("api") == 2.0 + 3.0 + 4.5
    assert gateways.load("other") == 1.0
    assert gateways.load("unknown") == 0.0

    clock.now += REPORT_FRESH_S - 0.5  # a's report is now REPORT_FRESH_S + 0.5 old: it no longer counts
    assert gateways.load("api") == 2.0 + 4.5
    gateways.report("a", LoadReport(apis={"api": 1.0}))  # a reports again: only its latest counts
    assert gateways.load("api") == 2.0 + 1.0 + 4.5
    clock.now += REPORT_FRESH_S + 0.1  # both silent: the local gateway alone
    assert gateways.load("api") == 2.0
    assert [g.id for g in gateways.joined()] == ["a", "b"]  # still listed, as seen a while ago
    clock.now += 120
    assert gateways.joined() == []


def test_reports_are_bounded_and_checked() -> None:
    gateways, _ = recorded(Clock())
    import cirrus.control.gateways as module

    for index in range(module.MAX_GATEWAYS):
        gateways.report(f"g{index}", LoadReport())
    with pytest.raises(TooManyGateways):
        gateways.report("one-more", LoadReport())
    gateways.report("g0", LoadReport())  # one already known may report again
    with pytest.raises(ValueError):
        LoadReport.model_validate({"apis": {"api": -1}})
    with pytest.raises(ValueError):
        LoadReport.model_validate({"apis": {}, "typo": 1})


# --- the route table -------------------------------------------------------------------------------


def ready(address: str = "tcp:127.0.0.1:5000", openapi: dict[str, Any] | None = None) -> ReplicaReady:
    return ReplicaReady(address=address, pid=1, load_s=0.0, openapi=openapi)


def test_the_table_is_what_the_local_gateway_was_told() -> None:
    queue = QueueSpec(max_attempts=7)
    gateways, local = recorded(queue_store="redis://cache:6379/0", queue_spec=lambda name: queue)
    first = serial(gateways)
    assert serial(gateways) == first  # nothing changed, same version

    gateways.set_api("api", ConcurrencySpec(max_concurrency=4), "realtime", auth_required=True)
    gateways.set_api("jobs", ConcurrencySpec(), "async")
    gateways.set_canary("api", 1, None, 0.0)
    lost: list[str] = []
    asyncio.run(gateways.add_replica("api", "api-1", ready(openapi={"paths": {}}), b"secret-1", lost.append, 1))
    asyncio.run(gateways.add_replica("api", "api-2", ready("tcp:127.0.0.1:5001"), b"secret-2", None, 2))
    gateways.set_canary("api", 1, 2, 25.0)
    gateways.set_unavailable("jobs", "does not load")
    key = ApiKey(id="k1", digest="00" * 32)
    gateways.set_keys([key])

    table = gateways.table()
    assert serial(gateways) == first + 1  # built once after the changes
    assert table.queue_store == "redis://cache:6379/0" and table.keys == [key]
    api, jobs = table.apis
    assert (api.name, api.kind, api.concurrency.max_concurrency, api.auth_required) == ("api", "realtime", 4, True)
    assert (api.serving, api.canary, api.canary_percent, api.queue) == (1, 2, 25.0, None)
    assert [(r.id, r.revision, r.address, base64.b64decode(r.secret)) for r in api.replicas] == [
        ("api-1", 1, "tcp:127.0.0.1:5000", b"secret-1"),
        ("api-2", 2, "tcp:127.0.0.1:5001", b"secret-2"),
    ]
    assert api.replicas[0].openapi == {"paths": {}}
    assert (jobs.kind, jobs.queue, jobs.unavailable) == ("async", queue, "does not load")
    assert local.canaries["api"] == (1, 2, 25.0) and local.unavailable["jobs"] == "does not load"  # passed on

    gateways.set_canary("api", 1, 2, 25.0)  # told again, the same: no new version
    assert serial(gateways) == first + 1
    gateways.promote_canary("api")
    assert local.promoted == ["api"]
    assert (gateways.table().apis[0].serving, gateways.table().apis[0].canary) == (2, None)
    gateways.drain_replica("api", "api-1")
    local.lose("api", "api-2")  # the local gateway lost it: it leaves the table, and the controller hears
    assert lost == [] and gateways.table().apis[0].replicas == []
    gateways.remove_api("jobs")
    assert [a.name for a in gateways.table().apis] == ["api"] and serial(gateways) == first + 4


def test_a_sqlite_store_is_not_handed_to_joined_gateways() -> None:
    gateways, _ = recorded(queue_store="sqlite:///home/me/.cirrus/queue.db")
    assert gateways.table().queue_store is None


def test_a_long_poll_answers_on_a_change_or_after_its_wait() -> None:
    async def main() -> None:
        gateways, _ = recorded()
        version = gateways.table().version
        assert (await gateways.changed("some-other-version", 5.0)).version == version  # at once

        async def later() -> None:
            await asyncio.sleep(0.2)
            gateways.set_api("api", ConcurrencySpec())

        loop = asyncio.get_running_loop()
        started = loop.time()
        change = loop.create_task(later())
        table = await gateways.changed(version, 5.0)
        await change
        assert table.version != version and [a.name for a in table.apis] == ["api"]
        assert 0.15 <= loop.time() - started < 1.0
        started = loop.time()
        assert (await gateways.changed(table.version, 0.3)).version == table.version  # no change: its wait
        assert loop.time() - started >= 0.3
        gateways.close()
        started = loop.time()
        await gateways.changed(table.version, 5.0)  # the daemon stops: at once
        assert loop.time() - started < 0.1

    asyncio.run(main())


def test_a_retired_replica_waits_for_every_fresh_gateway_to_let_go() -> None:
    async def main() -> None:
        clock = Clock()
        gateways, local = recorded(clock)
        gateways.set_api("api", ConcurrencySpec())
        await gateways.add_replica("api", "api-1", ready(), b"s")
        holding = gateways.table().version
        gateways.report("a", LoadReport(version=holding, replicas=["api-1"]))
        gateways.report("b", LoadReport(version=holding, replicas=[]))  # has not connected yet
        gateways.drain_replica("api", "api-1")
        wait = asyncio.get_running_loop().create_task(gateways.wait_drained("api", "api-1", 10.0))
        await asyncio.sleep(0.1)
        assert not wait.done()  # neither has applied the table without it yet
        current = gateways.table().version
        gateways.report("b", LoadReport(version=current, replicas=[]))
        gateways.report("a", LoadReport(version=current, replicas=["api-1"]))  # still finishing requests on it
        await asyncio.sleep(0.1)
        assert not wait.done()
        gateways.report("a", LoadReport(version=current, replicas=[]))
        await asyncio.wait_for(wait, 1.0)
        assert local.waited == [("api", "api-1")]

        # A gateway that stopped reporting is not waited for; nor for longer than the timeout.
        await gateways.add_replica("api", "api-2", ready(), b"s")
        gateways.report("a", LoadReport(version=gateways.table().version, replicas=["api-2"]))
        gateways.drain_replica("api", "api-2")
        clock.now += REPORT_FRESH_S + 1
        await asyncio.wait_for(gateways.wait_drained("api", "api-2", 10.0), 1.0)
        await gateways.add_replica("api", "api-3", ready(), b"s")
        gateways.report("a", LoadReport(version=gateways.table().version, replicas=["api-3"]))
        gateways.drain_replica("api", "api-3")
        await asyncio.wait_for(gateways.wait_drained("api", "api-3", 0.2), 1.0)

    asyncio.run(main())


# --- a joined gateway, from a fake admin API --------------------------------------------------------


class FakeAdmin:
    """The admin API's two gateway routes, answering the tables a test sets and keeping the reports."""

    def __init__(self, token: str = "t") -> None:
        self.token = token
        self.tables: list[RouteTable] = []
        self.reports: list[LoadReport] = []

    def handler(self, request: httpx.Request) -> httpx.Response:
        if request.headers.get("authorization") != f"Bearer {self.token}":
            return httpx.Response(401, json={"error": "missing or wrong admin token"})
        if request.url.path == "/v1/gateways/routes":
            return httpx.Response(200, content=self.tables[-1].model_dump_json())
        if request.url.path == "/v1/gateways/g1/load":
            self.reports.append(LoadReport.model_validate(json.loads(request.content)))
            return httpx.Response(200, json={"gateways": 1})
        return httpx.Response(404, json={"error": "no route"})


def route(name: str, **fields: Any) -> ApiRoute:
    return ApiRoute(name=name, concurrency=ConcurrencySpec(max_concurrency=3), **fields)


def joined(admin: FakeAdmin, token: str = "t") -> Joiner:
    return Joiner(Gateway(1024), "http://admin:8889", token, "g1", "http://me:8888", httpx.MockTransport(admin.handler))


def run(test: Callable[[], Any]) -> None:
    asyncio.run(test())


def test_a_joined_gateway_applies_each_table() -> None:
    async def main() -> None:
        admin = FakeAdmin()
        key = ApiKey(id="k1", digest="00" * 32)
        admin.tables.append(
            RouteTable(
                version="b-1",
                apis=[route("api", serving=1, auth_required=True), route("jobs", kind="async")],
                keys=[key],
            )
        )
        joiner = joined(admin)
        await joiner.join()
        routes = joiner.gateway.routes
        assert set(routes) == {"api", "jobs"}
        assert routes["api"].max_concurrency == 3 and routes["api"].auth_required and routes["api"].revision == 1
        assert routes["jobs"].unavailable == NO_STORE  # SQLite at the daemon: no async requests here
        assert joiner.gateway.keys.valid("nope", 0) is False

        await joiner.apply(RouteTable(version="b-2", apis=[route("api", serving=1, canary=2, canary_percent=10)]))
        canary = routes["api"].canary
        assert "jobs" not in routes and canary is not None and canary.revision == 2
        await joiner.apply(RouteTable(version="b-3", apis=[route("api", serving=2)]))
        assert routes["api"].canary is None and routes["api"].revision == 2  # promoted, not aborted
        assert canary.replicas == [] and routes["api"].canary_percent == 0.0

        assert joiner.gateway.on_cold is not None
        joiner.gateway.on_cold("api")  # a request found it at zero replicas: reported at once
        await joiner.report()
        [report] = admin.reports
        assert (report.cold, report.version, report.url) == (["api"], "b-3", "http://me:8888")
        await joiner.report()
        assert admin.reports[-1].cold == []  # sent once
        await joiner.close()

    run(main)


def test_a_wrong_token_is_a_join_error() -> None:
    async def main() -> None:
        admin = FakeAdmin()
        admin.tables.append(RouteTable(version="b-1"))
        joiner = joined(admin, token="wrong")
        with pytest.raises(JoinError, match="refused the token"):
            await joiner.join()
        await joiner.close()

    run(main)


# --- the admin API's gateway routes, in process ------------------------------------------------------


def test_the_admin_api_serves_the_table_and_takes_reports(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import cirrus.admin as admin_module

    monkeypatch.setattr(admin_module, "LONG_POLL_S", 0.3)
    project = tmp_path / "project"
    project.mkdir()
    (project / "predictor.py").write_text("class Predictor:\n    def predict(self, payload):\n        return payload\n")
    gateways = Gateways(FakeGateway())
    controller = Controller(
        Store(tmp_path / "state.db"),
        FakeRuntime(tmp_path / "logs"),
        gateways,
        endpoint=lambda name: f"http://gateway/{name}",
        snapshots=SnapshotStore(tmp_path / "snapshots"),
    )
    info = DaemonInfo(pid=1, version="0", gateway_url="http://gateway", admin_url="http://admin", started_at=0)
    app = build_admin_app(controller, token="t", info=lambda: info, shutdown=lambda: None, gateways=gateways)
    spec = {"name": "api", "predictor": {"path": "predictor.py"}, "autoscaling": {"min_replicas": 0}}
    with TestClient(app, headers={"authorization": "Bearer t"}) as http:
        assert http.post("/v1/apis", json={"deployments": [{"spec": spec, "project_dir": str(project)}]}).is_success
        table = RouteTable.model_validate(http.get("/v1/gateways/routes").json())
        assert [a.name for a in table.apis] == ["api"]
        started = time.monotonic()
        same = http.get("/v1/gateways/routes", params={"version": table.version})  # a long poll: its wait
        assert same.json()["version"] == table.version and time.monotonic() - started >= 0.3
        assert http.get("/v1/gateways/routes", headers={"authorization": "Bearer x"}).status_code == 401

        demanded: list[str] = []
        monkeypatch.setattr(controller, "demand", demanded.append)
        accepted = http.post("/v1/gateways/g1/load", json={"apis": {"api": 5}, "cold": ["api", "nope"]})
        assert accepted.json() == {"gateways": 1}, accepted.text
        assert controller.gateway_load("api") == 5.0  # what the autoscaler samples
        assert demanded == ["api", "nope"]  # a cold start there starts a replica now (an unknown name: nothing)
        [listed] = http.get("/v1/gateways").json()["gateways"]
        assert (listed["id"], listed["apis"]) == ("g1", {"api": 5.0})
        for path, body, message in [
            ("/v1/gateways/-dash/load", {}, "a gateway id is"),
            ("/v1/gateways/a%20b/load", {}, "a gateway id is"),
            ("/v1/gateways/g1/load", {"apis": {"api": "lots"}}, "apis.api"),
            ("/v1/gateways/g1/load", {"cold": "api"}, "cold"),
            ("/v1/gateways/g1/load", [1], "must be a JSON object"),
        ]:
            refused = http.post(path, json=body)
            assert refused.status_code == 400 and message in refused.json()["error"], refused.text
        assert http.post("/v1/gateways/g1/load", content=b"{").status_code == 400

    without = build_admin_app(controller, token="t", info=lambda: info, shutdown=lambda: None)
    with TestClient(without, headers={"authorization": "Bearer t"}) as http:
        assert http.get("/v1/gateways/routes").status_code == 503
        assert http.get("/v1/gateways").json() == {"gateways": []}
