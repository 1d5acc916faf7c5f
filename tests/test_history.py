"""The dashboard's history (cirrus/history.py): sampling math, events, retention, coarsening, reopening,
bounds; and the dashboard's login sessions and static files (cirrus/admin_dashboard.py), without a daemon."""

from __future__ import annotations

import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
from starlette.applications import Starlette
from starlette.testclient import TestClient

from cirrus import history as history_module
from cirrus.admin_dashboard import CODE_TTL_S, SESSION_TTL_S, Dashboard, Sessions, session_allows
from cirrus.history import COARSE_S, FINE_KEEP_S, History, Reading, changes, point, quantile_ms, status_class

BOUNDS = [0.001, 0.01, 0.1, 1.0]


def reading(api: str = "echo", t: float = 0.0, **fields: object) -> Reading:
    base: dict[str, object] = {"answers": {}, "latency_counts": [0] * 5, "latency_bounds": BOUNDS}
    r = Reading(api=api, **(base | fields))  # type: ignore[arg-type]
    r.t = t
    return r


@pytest.fixture
def store(tmp_path: Path) -> Iterator[History]:
    h = History(tmp_path / "history.db")
    yield h
    h.close()


def test_status_classes() -> None:
    assert [status_class(c) for c in (200, 204, 302, 400, 429, 500, 503, 0)] == [
        "2xx",
        "2xx",
        "2xx",
        "4xx",
        "4xx",
        "5xx",
        "5xx",
        None,
    ]


def test_quantiles_of_a_bucketed_histogram() -> None:
    assert quantile_ms([0, 0, 0, 0, 0], BOUNDS, 0.5) is None
    assert quantile_ms([10, 0, 0, 0, 0], BOUNDS, 0.99) == 1.0
    counts = [50, 40, 9, 1, 0]  # 100 answers
    assert quantile_ms(counts, BOUNDS, 0.5) == 1.0
    assert quantile_ms(counts, BOUNDS, 0.9) == 10.0
    assert quantile_ms(counts, BOUNDS, 0.99) == 100.0
    assert quantile_ms([0, 0, 0, 0, 3], BOUNDS, 0.5) == 1000.0  # the open bucket answers its lower bound


def test_rates_and_percentiles_come_from_deltas() -> None:
    before = reading(t=100.0, answers={"2xx": 10, "5xx": 1}, latency_counts=[10, 1, 0, 0, 0])
    now = reading(t=102.0, answers={"2xx": 30, "4xx": 4, "5xx": 3}, latency_counts=[10, 21, 5, 0, 0], in_flight=3)
    values = point(now, before)
    assert (values["rps_2xx"], values["rps_4xx"], values["rps_5xx"]) == (10.0, 2.0, 1.0)
    # The delta histogram is [0, 20, 5, 0, 0]: the older fast answers do not count any more.
    assert (values["p50_ms"], values["p90_ms"], values["p99_ms"]) == (10.0, 100.0, 100.0)
    assert values["in_flight"] == 3 and values["cold_starts"] == 0


def test_no_rates_without_a_recent_reading_and_resets_count_from_zero() -> None:
    first = point(reading(t=10.0, answers={"2xx": 5}), None)
    assert first["rps_2xx"] is None and first["p50_ms"] is None and first["replicas_ready"] == 0
    stale = point(reading(t=100.0, answers={"2xx": 5}), reading(t=10.0))
    assert stale["rps_2xx"] is None  # the daemon was down: a gap, not an average over it
    reset = point(
        reading(t=12.0, answers={"2xx": 4}, latency_counts=[4, 0, 0, 0, 0], cold_starts=1),
        reading(t=10.0, answers={"2xx": 500}, latency_counts=[400, 100, 0, 0, 0], cold_starts=3),
    )
    assert reset["rps_2xx"] == 2.0 and reset["p50_ms"] == 1.0 and reset["cold_starts"] == 1


def test_events_between_readings() -> None:
    before = reading(revision=1, replicas_desired=1, cold_starts=0, replica_errors={"echo-a": "boom"})
    after = reading(
        revision=2,
        replicas_desired=3,
        autoscaler="in flight 9.0 over target 3 per replica: 3 replicas",
        cold_starts=1,
        last_cold_start_s=1.25,
        replica_errors={"echo-a": "boom", "echo-b": "ImportError: no module named torch"},
    )
    assert changes(after, before) == [
        ("deploy", "revision 1 -> 2"),
        ("scale", "replicas 1 -> 3: in flight 9.0 over target 3 per replica: 3 replicas"),
        ("error", "[echo-b] ImportError: no module named torch"),
        ("cold_start", "cold start (1.25 s to the first replica)"),
    ]
    assert changes(after, after) == []
    new = reading(revision=1, replica_errors={"echo-a": "boom"})
    assert changes(new, None) == [("deploy", "revision 1"), ("error", "[echo-a] boom")]
    long = changes(reading(replica_errors={"x": "e" * 5000}), None)
    assert len(long[-1][1]) == history_module.MAX_MESSAGE_CHARS


def test_record_and_read_back(store: History) -> None:
    t0 = 1_000_000.0
    for i in range(5):
        store.record(
            [reading(answers={"2xx": 4 * i}, latency_counts=[4 * i, 0, 0, 0, 0], replicas_ready=1), reading("other")],
            t0 + 2 * i,
        )
    series = store.series("echo", t0 - 10, t0 + 100)
    assert series["t"] == [t0 + 2 * i for i in range(5)]
    assert series["rps_2xx"] == [0.0, 2.0, 2.0, 2.0, 2.0]  # a new API starts from zero
    assert series["p50_ms"] == [None, 1.0, 1.0, 1.0, 1.0]
    assert series["replicas_ready"] == [1, 1, 1, 1, 1]
    assert set(series) == {"t", *history_module.SERIES}
    assert all(len(values) == 5 for values in series.values())
    assert store.series("nothing", t0 - 10, t0 + 100)["t"] == []
    recent = store.recent(t0)
    assert recent["echo"] == {"rps": 2.0, "error_rate": 0.0} and recent["other"] == {"rps": 0.0, "error_rate": None}


def test_a_gap_is_a_null_point(store: History) -> None:
    store.record([reading()], 1000.0)
    store.record([reading()], 1002.0)
    store.record([reading()], 1100.0)  # the daemon was down
    series = store.series("echo", 0, 2000)
    assert series["t"] == [1000.0, 1002.0, 1004.0, 1100.0]
    assert series["in_flight"] == [0, 0, None, 0]


def test_history_survives_reopening_without_repeating_events(tmp_path: Path) -> None:
    path = tmp_path / "history.db"
    first = History(path)
    first.record([reading(replicas_desired=1, replica_errors={"echo-a": "boom"})], 1000.0)
    first.record([reading(replicas_desired=2, replica_errors={"echo-a": "boom"})], 1002.0)
    first.close()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    again = History(path)
    again.record([reading(replicas_desired=2, replica_errors={"echo-a": "boom"})], 1005.0)
    assert again.series("echo", 0, 2000)["t"] == [1000.0, 1002.0, 1005.0]
    assert [e["kind"] for e in again.events("echo", 0)] == ["deploy", "error", "scale"]
    again.record([reading(replicas_desired=0)], 1007.0)
    events = again.events("echo", 0)
    assert events[-1] == {"t": 1007.0, "kind": "scale", "message": "replicas 2 -> 0"}
    again.close()


def test_old_points_are_coarsened_then_deleted(store: History, monkeypatch: pytest.MonkeyPatch) -> None:
    t0 = 600_000.0  # a whole minute
    for i in range(90):  # three minutes at 2 s
        store.record([reading(answers={"2xx": 2 * i}, in_flight=i % 2)], t0 + 2 * i)
    coarse_end = t0 + 180 + FINE_KEEP_S + 60
    store.record([reading(in_flight=0)], coarse_end)  # much later: the old 2 s points go, minutes stay
    series = store.series("echo", t0 - 60, coarse_end)
    assert series["t"][:3] == [t0, t0 + COARSE_S, t0 + 2 * COARSE_S]
    assert series["in_flight"][:3] == [0.5, 0.5, 0.5]  # averaged
    assert series["rps_2xx"][1] == 1.0
    fine = [t for t in series["t"] if t > t0 + 3 * COARSE_S]
    assert fine[-1] == coarse_end
    store.record([reading()], coarse_end + history_module.COARSE_KEEP_S + 120)
    assert store.series("echo", 0, t0 + 1000)["t"] == []  # past 24 h: gone


def test_size_is_bounded(store: History, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(history_module, "MAX_APIS", 3)
    monkeypatch.setattr(history_module, "MAX_EVENTS_PER_API", 5)
    monkeypatch.setattr(history_module, "FINE_KEEP_S", 20)
    monkeypatch.setattr(history_module, "COARSE_KEEP_S", 200)
    for i in range(400):  # 800 s, 10 APIs (3 sampled), a scale event at each reading
        store.record([reading(f"api{n}", replicas_desired=i % 2) for n in range(10)], 1_000_000.0 + 2 * i)
    size = store.size()
    assert size["last_reading"] == 3
    assert size["events"] <= 3 * (5 + 60 / 2)  # trimmed once a minute
    assert size["points"] <= 3 * (20 / 2 + 60 / 2 + 200 / 60 + 2)  # 2 s points, one minute in wait, minutes


def test_a_damaged_file_starts_a_new_history(tmp_path: Path) -> None:
    path = tmp_path / "history.db"
    path.write_bytes(b"not a database at all" * 100)
    h = History(path)
    h.record([reading()], 10.0)
    assert h.series("echo", 0, 20)["t"] == [10.0]
    h.close()


# --- the dashboard's login and static files -------------------------------------------------------


def test_login_codes_are_single_use_and_expire() -> None:
    now = [1000.0]
    sessions = Sessions(clock=lambda: now[0])
    code, expires_at = sessions.new_code()
    assert expires_at == 1000.0 + CODE_TTL_S and len(code) >= 43
    assert sessions.redeem("wrong") is None
    session = sessions.redeem(code)
    assert session is not None and sessions.valid(session)
    assert sessions.redeem(code) is None  # used
    late, _ = sessions.new_code()
    now[0] += CODE_TTL_S + 1
    assert sessions.redeem(late) is None  # expired
    now[0] += SESSION_TTL_S
    assert not sessions.valid(session)


def _scope(method: str, path: str, cookie: str | None = None) -> dict[str, object]:
    headers = [] if cookie is None else [(b"cookie", f"cirrus_dashboard={cookie}".encode())]
    return {"type": "http", "method": method, "path": path, "headers": headers}


def test_the_cookie_opens_only_gets_of_the_dashboard() -> None:
    sessions = Sessions()
    code, _ = sessions.new_code()
    session = sessions.redeem(code)
    assert session is not None
    assert session_allows(_scope("GET", "/dashboard/login"), sessions)  # no credential needed
    for path in ("/dashboard/", "/dashboard/static/app.js", "/v1/dashboard/overview", "/v1/dashboard/apis/x"):
        assert session_allows(_scope("GET", path, session), sessions), path
        assert not session_allows(_scope("GET", path), sessions), path
        assert not session_allows(_scope("GET", path, "forged"), sessions), path
    for method, path in (
        ("POST", "/v1/dashboard/login-codes"),
        ("POST", "/v1/apis"),
        ("DELETE", "/v1/apis/x"),
        ("GET", "/v1/apis"),
        ("GET", "/v1/dashboardx"),
        ("GET", "/dashboardx"),
        ("POST", "/dashboard/login"),
    ):
        assert not session_allows(_scope(method, path, session), sessions), (method, path)


def test_static_files_are_served_by_name_only(tmp_path: Path) -> None:
    static = tmp_path / "static"
    (static / "vendor").mkdir(parents=True)
    (static / "index.html").write_text("<!doctype html><title>placeholder</title>")
    (static / "app.js").write_text("console.log(1)")
    (static / "style.css").write_text("body{}")
    (static / "vendor" / "uPlot.iife.min.js").write_text("var uPlot")
    (tmp_path / "secret.txt").write_text("not for the page")
    dashboard = Dashboard(controller=None, history=None, static_dir=static)  # type: ignore[arg-type]
    app = Starlette(routes=dashboard.app().routes)
    with TestClient(app) as http:
        index = http.get("/dashboard/")
        assert index.status_code == 200 and "placeholder" in index.text
        assert index.headers["content-type"] == "text/html; charset=utf-8"
        assert index.headers["cache-control"] == "no-cache"
        assert "default-src 'self'" in index.headers["content-security-policy"]
        assert http.get("/dashboard/static/app.js").headers["content-type"] == "text/javascript; charset=utf-8"
        assert http.get("/dashboard/static/style.css").headers["content-type"] == "text/css; charset=utf-8"
        assert http.get("/dashboard/static/vendor/uPlot.iife.min.js").text == "var uPlot"
        for bad in ("../secret.txt", "..%2Fsecret.txt", "vendor/../../secret.txt", "/etc/passwd", "nope.js"):
            assert http.get(f"/dashboard/static/{bad}").status_code == 404, bad
        assert http.get("/dashboard", follow_redirects=False).headers["location"] == "/dashboard/"
    (static / "index.html").unlink()
    with TestClient(app) as http:
        assert http.get("/dashboard/").status_code == 404


def test_the_packaged_page_is_found() -> None:
    from cirrus.admin_dashboard import STATIC_DIR

    if not (STATIC_DIR / "index.html").is_file():
        pytest.skip("the dashboard page is not built into this checkout yet")
    assert (STATIC_DIR / "app.js").is_file()
