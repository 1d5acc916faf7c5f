"""The dashboard's backend end to end: a real daemon, its login, the JSON the page polls, the history.

The page itself (cirrus/dashboard/static) is tested in a browser elsewhere; here every request is made
the way the page makes it: with the session cookie only, never the admin token.
"""

from __future__ import annotations

import json
import stat
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import ECHO_PREDICTOR, Cirrus, write_project

from cirrus.admin_dashboard import COOKIE

BROKEN_PREDICTOR = """
    class Predictor:
        def __init__(self, config):
            raise RuntimeError("weights file is corrupt")

        def predict(self, payload):
            return payload
"""


_opened: list[httpx.Client] = []


@pytest.fixture(autouse=True)
def _close_clients() -> Iterator[None]:
    yield
    while _opened:
        _opened.pop().close()


def _login(cirrus: Cirrus) -> tuple[httpx.Client, str]:
    """An HTTP client of the admin API with no token, and a fresh session cookie's value."""
    login = cirrus.client().dashboard_login()
    admin_url = cirrus.info.admin_url
    assert login["url"] == f"{admin_url}/dashboard/login?code={login['code']}"
    assert login["expires_at"] > time.time() + 50
    http = httpx.Client(base_url=admin_url, timeout=10)
    _opened.append(http)
    answer = http.get(login["url"], follow_redirects=False)
    assert answer.status_code == 303 and answer.headers["location"] == "/dashboard/"
    set_cookie = answer.headers["set-cookie"]
    assert set_cookie.startswith(f"{COOKIE}=")
    assert "HttpOnly" in set_cookie and "SameSite=strict" in set_cookie and "Path=/" in set_cookie
    http.cookies.clear()
    return http, answer.cookies[COOKIE]


def _poll(fetch: Callable[[], Any], check: Callable[[Any], bool], timeout: float = 20.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        data = fetch()
        if check(data):
            return data
        assert time.monotonic() < deadline, f"timed out; last answer: {data}"
        time.sleep(0.25)


def _load(cirrus: Cirrus, api: str, stop: threading.Event) -> None:
    with httpx.Client(timeout=10) as http:
        while not stop.is_set():
            http.post(cirrus.url(api), json={"x": 1})


def test_login_overview_series_events_and_read_only_cookie(cirrus: Cirrus, tmp_path: Path) -> None:
    cirrus.up()
    echo = write_project(tmp_path / "echo", ECHO_PREDICTOR, name="echo")
    broken = write_project(tmp_path / "broken", BROKEN_PREDICTOR, name="broken")
    client = cirrus.client()
    client.deploy(echo)
    client.deploy(broken, wait=False)
    http, session = _login(cirrus)
    cookie = {"cookie": f"{COOKIE}={session}"}

    # Without a credential: nothing. A used code: a page saying what to do.
    assert http.get("/v1/dashboard/overview").status_code == 401
    assert http.get("/dashboard/").status_code == 401
    used = cirrus.client().dashboard_login()
    assert http.get(used["url"], follow_redirects=False).status_code == 303
    again = http.get(used["url"], follow_redirects=False)
    assert again.status_code == 401 and "cirrus dashboard" in again.text and "set-cookie" not in again.headers
    assert http.get("/dashboard/login?code=wrong").status_code == 401

    # The cookie reads the dashboard and nothing else.
    assert http.post("/v1/apis", json={"deployments": []}, headers=cookie).status_code == 401
    assert http.delete("/v1/apis/echo", headers=cookie).status_code == 401
    assert http.get("/v1/apis", headers=cookie).status_code == 401
    assert http.post("/v1/dashboard/login-codes", headers=cookie).status_code == 401
    assert http.post("/v1/shutdown", headers=cookie).status_code == 401
    assert http.get("/dashboard/../v1/apis", headers=cookie).status_code in (401, 404)
    assert client.get("echo").replicas_ready == 1  # still there
    page = http.get("/dashboard/", headers=cookie)
    assert page.status_code in (200, 404)  # 404: this checkout has no page built yet
    assert page.headers["cache-control"] == "no-cache"

    def overview() -> dict[str, Any]:
        answer = http.get("/v1/dashboard/overview", headers=cookie)
        assert answer.status_code == 200 and answer.headers["cache-control"] == "no-store"
        return dict(answer.json())

    def api(name: str) -> dict[str, Any]:
        answer = http.get(f"/v1/dashboard/apis/{name}", params={"window_s": 600}, headers=cookie)
        assert answer.status_code == 200 and answer.headers["cache-control"] == "no-store"
        return dict(answer.json())

    rows = {row["name"]: row for row in overview()["apis"]}
    assert set(rows) == {"echo", "broken"}
    assert set(rows["echo"]) == {
        "name", "kind", "status", "revision", "replicas_ready", "replicas_desired", "replicas_pending",
        "rps", "p50_ms", "p99_ms", "error_rate", "in_flight", "queued", "backlog_in_queue", "backlog_in_progress",
    }  # fmt: skip
    assert rows["echo"]["status"] == "live" and rows["echo"]["replicas_ready"] == 1

    stop = threading.Event()
    loader = threading.Thread(target=_load, args=(cirrus, "echo", stop), daemon=True)
    loader.start()
    try:
        moving = _poll(
            lambda: overview()["apis"],
            lambda apis: any(a["name"] == "echo" and a["rps"] and a["error_rate"] is not None for a in apis),
        )
        assert next(a for a in moving if a["name"] == "echo")["error_rate"] == 0.0
        first = _poll(lambda: api("echo"), lambda d: any(v for v in d["series"]["rps_2xx"] if v))
        later = _poll(lambda: api("echo"), lambda d: len(d["series"]["t"]) > len(first["series"]["t"]))
    finally:
        stop.set()
        loader.join(timeout=15)
    series = later["series"]
    assert {len(values) for values in series.values()} == {len(series["t"])}
    assert series["t"] == sorted(series["t"]) and series["t"][-1] <= later["time"]
    assert any(v and v > 0 for v in series["p99_ms"]) and any(v == 1 for v in series["replicas_ready"])
    assert later["status"]["name"] == "echo" and later["status"]["replicas"][0]["state"] == "ready"
    assert [r["revision"] for r in later["revisions"]] == [1]
    assert later["dead_letters"] == [] and later["jobs"] == []
    assert any("echo-print got {'x': 1}" in line and line.startswith("[echo-") for line in later["logs"])
    assert len(later["logs"]) <= 50

    failing = _poll(lambda: api("broken"), lambda d: any(e["kind"] == "error" for e in d["events"]))
    [event] = [e for e in failing["events"] if e["kind"] == "error"][:1]
    assert "weights file is corrupt" in event["message"] and event["message"].startswith("[broken-")
    assert http.get("/v1/dashboard/apis/nothing", headers=cookie).status_code == 404
    assert http.get("/v1/dashboard/apis/echo?window_s=x", headers=cookie).status_code == 400
    assert stat.S_IMODE((cirrus.home / "history.db").stat().st_mode) == 0o600


def test_history_survives_a_daemon_restart_and_the_session_does_not(cirrus: Cirrus, tmp_path: Path) -> None:
    cirrus.up()
    cirrus.client().deploy(write_project(tmp_path / "echo", ECHO_PREDICTOR, name="echo"))
    http, session = _login(cirrus)
    cookie = {"cookie": f"{COOKIE}={session}"}

    def series() -> dict[str, Any]:
        answer = http.get("/v1/dashboard/apis/echo", headers=cookie)
        assert answer.status_code == 200, answer.text
        return dict(answer.json()["series"])

    _poll(series, lambda s: len(s["t"]) >= 1)  # sampled once: the requests below are a rise of its counters
    for _ in range(5):
        cirrus.client().predict("echo", {"x": 1})
    before = _poll(series, lambda s: any(v for v in s["rps_2xx"] if v))
    cirrus.shutdown()
    cirrus.up()
    code, out, err = cirrus.cli("dashboard")  # piped: prints the link, opens no browser
    assert code == 0, err
    url = out.strip()
    assert url.startswith(f"{cirrus.info.admin_url}/dashboard/login?code=") and "within 60 s" in err
    assert httpx.get(url, follow_redirects=False).status_code == 303
    code, out, err = cirrus.cli("dashboard", "--no-browser", "-o", "json")
    assert code == 0 and set(json.loads(out)) == {"code", "url", "expires_at"}, err
    http, session = _login(cirrus)
    stale = http.get("/v1/dashboard/apis/echo", headers=cookie)  # the old session: logged out, log in again
    assert stale.status_code == 401 and "cirrus dashboard" in stale.json()["error"]
    cookie = {"cookie": f"{COOKIE}={session}"}
    cirrus.wait_for("echo", lambda s: s.replicas_ready == 1)
    after = _poll(series, lambda s: s["t"][-1] > before["t"][-1])
    assert set(before["t"]) <= set(after["t"])  # the points from before the restart are still there
    sent = [v for t, v in zip(after["t"], after["rps_2xx"], strict=True) if t <= before["t"][-1] and v]
    assert sent, after
