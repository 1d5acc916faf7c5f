"""API keys through the real daemon and CLI: `auth: required` APIs refuse requests without a valid key
(401), with a key scoped elsewhere (403) and over the key's rate (429 + Retry-After); a revoked key
stops working at once; APIs without `auth` stay open; keys are printed once and stored hashed."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import ECHO_PREDICTOR, Cirrus, module_daemon, write_project

from cirrus.types import ApiStatusName


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cirrus]:
    home = tmp_path_factory.mktemp("keys") / "home"
    with module_daemon(home) as cirrus:
        project = write_project(
            tmp_path_factory.mktemp("project"),
            ECHO_PREDICTOR,
            apis=[{"name": "secured", "auth": "required"}, {"name": "open"}],
        )
        code, out, err = cirrus.cli("deploy", str(project))
        assert code == 0, out + err
        for name in ("secured", "open"):
            cirrus.wait_for(name, lambda s: s.status == ApiStatusName.LIVE)
        yield cirrus


def create_key(gw: Cirrus, *args: str) -> str:
    code, out, err = gw.cli("keys", "create", *args)
    assert code == 0, err
    key = out.strip()
    assert key.startswith("cirrus_") and "shown only now" in err
    return key


def test_a_secured_api_needs_a_valid_key(gw: Cirrus) -> None:
    client = gw.client()
    refused = client.predict("secured", {"x": 1})
    assert refused.status_code == 401 and "needs a key" in refused.json()["error"]
    assert refused.headers["www-authenticate"].startswith("Bearer")
    assert client.predict("secured", {"x": 1}, headers={"x-api-key": "cirrus_abc_nope"}).status_code == 401
    assert client.predict("open", {"x": 1}).status_code == 200  # no `auth`: no key needed

    key = create_key(gw, "--api", "secured", "--name", "ci")
    answered = client.predict("secured", {"x": 1}, headers={"authorization": f"Bearer {key}"})
    assert answered.status_code == 200 and answered.json()["echo"] == {"x": 1}
    assert client.predict("secured", {"x": 2}, headers={"x-api-key": key}).status_code == 200


def test_scope_rate_and_revocation(gw: Cirrus) -> None:
    client = gw.client()
    elsewhere = create_key(gw, "--api", "open")
    assert client.predict("secured", {}, headers={"x-api-key": elsewhere}).status_code == 403

    limited = create_key(gw, "--rate", "1/m", "--burst", "2")
    statuses = [client.predict("secured", {}, headers={"x-api-key": limited}) for _ in range(3)]
    assert [r.status_code for r in statuses] == [200, 200, 429]
    assert int(statuses[2].headers["retry-after"]) >= 1

    code, out, _ = gw.cli("keys", "list", "-o", "json")
    assert code == 0
    listed = {k["id"]: k for k in json.loads(out)}
    key_id = limited.split("_")[1]
    assert listed[key_id]["rate"] == pytest.approx(1 / 60) and listed[key_id]["revoked_at"] is None
    assert all("digest" in k and limited not in json.dumps(k) for k in listed.values())
    assert gw.cli("keys", "revoke", key_id)[0] == 0
    assert client.predict("secured", {}, headers={"x-api-key": limited}).status_code == 401
    assert gw.cli("keys", "revoke", "nosuchkey")[0] == 1


def test_keys_survive_a_daemon_restart_and_are_stored_hashed(gw: Cirrus, tmp_path: Path) -> None:
    key = create_key(gw, "--api", "secured")
    state = b"".join(p.read_bytes() for p in gw.home.glob("state.db*"))
    assert key.encode() not in state
    code, _, err = gw.cli("down")
    assert code == 0, err
    gw.up()
    gw.wait_for("secured", lambda s: s.status == ApiStatusName.LIVE)
    assert gw.client().predict("secured", {}, headers={"x-api-key": key}).status_code == 200


def test_bad_key_requests_are_clear_errors(gw: Cirrus) -> None:
    for args, needle in [
        (("--rate", "fast"), "--rate 'fast'"),
        (("--expires", "soon"), "--expires 'soon'"),
        (("--burst", "0"), "burst"),
    ]:
        code, _, err = gw.cli("keys", "create", *args)
        assert code != 0 and needle in err, err


def test_require_keys_covers_every_api(tmp_path: Path) -> None:
    cirrus = Cirrus(tmp_path / "home")
    try:
        code, _, err = cirrus.cli("up", "--require-keys")
        assert code == 0, err
        project = write_project(tmp_path / "project", ECHO_PREDICTOR)  # no `auth:` in the spec
        assert cirrus.cli("deploy", str(project))[0] == 0
        client = cirrus.client()
        assert client.predict("echo", {}).status_code == 401
        key = create_key(cirrus)
        assert client.predict("echo", {}, headers={"x-api-key": key}).status_code == 200
    finally:
        cirrus.shutdown()


def test_a_reachable_gateway_without_keys_refuses_to_start(tmp_path: Path) -> None:
    cirrus = Cirrus(tmp_path / "home")
    try:
        code, _, err = cirrus.cli("up", "--host", "0.0.0.0")
        assert code != 0
        assert "no API key exists" in err and "--insecure-no-auth" in err and "Traceback" not in err
        code, _, err = cirrus.cli("up", "--host", "0.0.0.0", "--insecure-no-auth")
        assert code == 0, err
        assert "--insecure-no-auth" in cirrus.daemon_log()
    finally:
        cirrus.shutdown()


def test_only_loopback_or_a_key_sees_the_apis_and_metrics() -> None:
    import asyncio

    import httpx

    from cirrus.gateway.app import Gateway
    from cirrus.gateway.keys import digest
    from cirrus.types import ApiKey

    gateway = Gateway(1024, metrics_app=lambda: b"cirrus_requests_total 1\n")
    gateway.set_api("hidden", max_concurrency=1, max_queue_length=1, timeout_s=1.0)
    gateway.keys.set_keys([ApiKey(id="abc", digest=digest("cirrus_abc_s3cret"))])

    async def get(path: str, client: tuple[str, int], headers: dict[str, str] | None = None) -> httpx.Response:
        transport = httpx.ASGITransport(app=gateway, client=client)
        async with httpx.AsyncClient(transport=transport, base_url="http://gw") as http:
            return await http.get(path, headers=headers)

    async def main() -> None:
        remote = ("203.0.113.7", 40000)
        for path in ("/", "/metrics"):
            assert (await get(path, remote)).status_code == 401
            assert (await get(path, remote, {"x-api-key": "cirrus_abc_s3cret"})).status_code == 200
            assert (await get(path, ("127.0.0.1", 40000))).status_code == 200
        assert "apis" not in (await get("/healthz", remote)).json()
        missing = await get("/nope", remote)
        assert missing.status_code == 404 and "hidden" not in missing.text

    asyncio.run(main())
