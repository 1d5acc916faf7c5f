"""`kind: server` APIs with the realtime kind's fleet: a command-started server, requests spread over
replicas, scale from zero and back, a readiness probe that fails, a rolling update that drops nothing,
and a replica whose app dies. Real daemons, real replica processes, real sockets."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
from conftest import Cirrus, replica_pids, wait_gone
from test_e2e_server import server_project

from cirrus.types import ApiStatusName

FAST = {"window_s": 2, "panic_window_s": 1, "downscale_stabilization_s": 1, "scale_to_zero_after_s": 2}
PLAIN = {"command": ["python", "serve.py"], "readiness": {"path": "/ready", "timeout_s": 20}}


def shop(name: str = "shop", replicas: int = 1, **extra: object) -> dict:
    return {
        "name": name,
        "kind": "server",
        "server": {"app": "main:app", "readiness": {"path": "/healthz", "period_s": 0.5}},
        "concurrency": {"max_concurrency": 4, "max_queue_length": 64, "timeout_s": 20},
        "autoscaling": {"min_replicas": replicas, "max_replicas": replicas},
        **extra,
    }


def test_command_started_server(daemon: Cirrus, tmp_path: Path) -> None:
    api = {"name": "plain", "kind": "server", "server": PLAIN, "autoscaling": {"min_replicas": 1, "max_replicas": 1}}
    daemon.client().deploy(server_project(tmp_path / "plain", "plain_server", [api]))
    got = httpx.get(daemon.url("plain/some/where?x=1&y=2"), timeout=10)
    assert got.status_code == 200, got.text
    assert got.json()["path"] == "/some/where?x=1&y=2" and got.json()["prefix"] == "/plain"
    posted = httpx.post(daemon.url("plain/echo"), content=b"hello there", timeout=10)
    assert posted.status_code == 201 and posted.json() == {"echo": "hello there", "path": "/echo"}
    # The command runs as the replica's child in its own process group; it goes when the replica goes.
    [replica_pid] = replica_pids(daemon.client().get("plain"))
    app_pid = got.json()["pid"]
    assert app_pid != replica_pid and os.getpgid(app_pid) == app_pid
    daemon.client().delete("plain")
    assert wait_gone({replica_pid, app_pid}) == {}


def test_app_that_dies_is_restarted(daemon: Cirrus, tmp_path: Path) -> None:
    api = {"name": "plain", "kind": "server", "server": PLAIN, "autoscaling": {"min_replicas": 1, "max_replicas": 1}}
    daemon.client().deploy(server_project(tmp_path / "plain", "plain_server", [api]))
    app_pid = httpx.get(daemon.url("plain/"), timeout=10).json()["pid"]
    answers: list[httpx.Response] = []
    caller = threading.Thread(target=lambda: answers.append(httpx.get(daemon.url("plain/sleep?5"), timeout=20)))
    caller.start()
    time.sleep(0.5)
    os.kill(app_pid, signal.SIGKILL)  # with a request in flight: it gets 502, not a hang
    caller.join()
    [cut] = answers
    assert cut.status_code == 502 and "failed" in cut.json()["error"], cut.text
    status = daemon.wait_for("plain", lambda s: any(r.restarts for r in s.replicas) and s.replicas_ready == 1, 30)
    assert "the command exited with" in (status.replicas[0].last_error or ""), status
    assert httpx.get(daemon.url("plain/"), timeout=10).json()["pid"] != app_pid


def test_failing_readiness_restarts_a_ready_replica(daemon: Cirrus, tmp_path: Path) -> None:
    unready = tmp_path / "unready"
    server = {**PLAIN, "env": {"PLAIN_UNREADY_FILE": str(unready)}}
    server["readiness"] = {"path": "/ready", "timeout_s": 30, "period_s": 0.2, "failure_threshold": 2}
    api = {"name": "plain", "kind": "server", "server": server, "autoscaling": {"min_replicas": 1, "max_replicas": 1}}
    daemon.client().deploy(server_project(tmp_path / "plain", "plain_server", [api]))
    app_pid = httpx.get(daemon.url("plain/"), timeout=10).json()["pid"]
    unready.touch()
    status = daemon.wait_for("plain", lambda s: any(r.restarts for r in s.replicas), 30)
    assert "2 readiness probes failed in a row (GET /ready answered 500)" in (status.replicas[0].last_error or "")
    assert wait_gone({app_pid}) == {}
    unready.unlink()  # the restarted replica becomes ready once its app is
    daemon.wait_for("plain", lambda s: s.replicas_ready == 1, 30)
    assert httpx.get(daemon.url("plain/"), timeout=10).status_code == 200


def test_requests_spread_over_two_replicas(daemon: Cirrus, tmp_path: Path) -> None:
    daemon.client().deploy(server_project(tmp_path / "shop", "fastapi_app", [shop(replicas=2)]))
    pids: Counter[int] = Counter()

    def call() -> None:
        response = httpx.get(daemon.url("shop/slow?s=0.3"), timeout=20)
        assert response.status_code == 200, response.text
        pids[response.json()["pid"]] += 1

    threads = [threading.Thread(target=call) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sum(pids.values()) == 8 and len(pids) == 2, pids
    assert set(pids) == replica_pids(daemon.client().get("shop"))  # an `app:` runs in the replica itself


def test_scale_from_zero_and_back(daemon: Cirrus, tmp_path: Path) -> None:
    spec = shop(autoscaling={"min_replicas": 0, "max_replicas": 2, **FAST})
    client = daemon.client()
    client.deploy(server_project(tmp_path / "shop", "fastapi_app", [spec]))
    daemon.wait_for("shop", lambda s: not s.replicas, timeout=30)  # (a deploy proves the app starts, then drains it)
    response = httpx.get(daemon.url("shop/items/1"), timeout=30)  # held while a replica starts
    assert response.status_code == 200, response.text
    status = client.get("shop")
    assert status.cold_starts == 1
    [pid] = replica_pids(status)
    daemon.wait_for("shop", lambda s: s.replicas_desired == 0 and not s.replicas, timeout=30)
    assert wait_gone({pid}) == {}


def test_readiness_failure_is_a_clear_error(daemon: Cirrus, tmp_path: Path) -> None:
    broken = {
        "name": "never",
        "kind": "server",
        "server": {**PLAIN, "readiness": {"path": "/ready", "timeout_s": 1.5}, "env": {"PLAIN_READY": "no"}},
        "autoscaling": {"min_replicas": 1, "max_replicas": 1},
    }
    code, _, err = daemon.cli(
        "deploy", str(server_project(tmp_path / "never", "plain_server", [broken])), "--timeout", "60"
    )
    assert code == 1
    assert "not ready within 1.5s: GET /ready answered 500" in err, err
    status = daemon.client().get("never")
    assert status.status is ApiStatusName.ERROR
    assert status.message is not None and "GET /ready answered 500" in status.message
    assert "failed to start the app: not ready within" in status.message  # (not "failed to load the predictor")
    refused = httpx.get(daemon.url("never/"), timeout=10)
    assert refused.status_code == 503 and "GET /ready answered 500" in refused.json()["error"]

    exits = {**broken, "name": "exits", "server": {"command": ["python", "-c", "import sys; sys.exit(3)"]}}
    missing = {**broken, "name": "missing", "server": {"app": "serve:nope"}}
    for api, why in (
        (exits, "the command exited with 3 before it was ready"),
        (missing, "AttributeError: module 'serve' has no attribute 'nope'"),
    ):
        project = server_project(tmp_path / str(api["name"]), "plain_server", [api])
        code, _, err = daemon.cli("deploy", str(project), "--timeout", "60")
        assert code == 1 and why in err, err


def test_rolling_update_answers_every_request(daemon: Cirrus, tmp_path: Path) -> None:
    project = server_project(tmp_path / "shop", "fastapi_app", [shop(replicas=2)])
    client = daemon.client()
    client.deploy(project)
    statuses: Counter[int] = Counter()
    versions: Counter[str] = Counter()
    stop = threading.Event()

    def hammer() -> None:
        with httpx.Client(timeout=30) as http:
            while not stop.is_set():
                response = http.get(daemon.url("shop/"))
                statuses[response.status_code] += 1
                if response.status_code == 200:
                    versions[response.json()["version"]] += 1

    threads = [threading.Thread(target=hammer) for _ in range(3)]
    for thread in threads:
        thread.start()
    try:
        time.sleep(0.5)
        main = project / "main.py"
        main.write_text(main.read_text().replace('"SHOP_VERSION", "1"', '"SHOP_VERSION", "2"'))
        client.deploy(project)  # (returns once revision 2 is deployed; the replicas roll over after)
        daemon.wait_for(
            "shop",
            lambda s: len(s.replicas) == 2 and all(r.revision == 2 and r.state == "ready" for r in s.replicas),
            timeout=60,
        )
        time.sleep(0.5)
    finally:
        stop.set()
        for thread in threads:
            thread.join()
    assert set(statuses) == {200}, statuses
    assert versions["1"] > 0 and versions["2"] > 0, versions
    assert httpx.get(daemon.url("shop/"), timeout=10).json()["version"] == "2"


def test_the_fastapi_example(daemon: Cirrus) -> None:
    example = Path(__file__).resolve().parent.parent / "examples" / "fastapi-app"
    daemon.client().deploy(example)
    with httpx.Client(base_url=daemon.gateway_url, timeout=30) as http:
        assert http.get("/todo/todos/1").json() == {"id": 1, "text": "deploy to Cirrus"}  # from zero
        assert http.post("/todo/todos", json={"text": "try it"}).json()["text"] == "try it"
        assert http.get("/todo/todos/99").status_code == 404
        assert http.get("/todo/count", params={"to": 3}).text == "1\n2\n3\n"
        assert "/todo/openapi.json" in http.get("/todo/docs").text
        assert "/todos/{todo_id}" in http.get("/todo/openapi.json").json()["paths"]


def test_a_joined_gateway_proxies_to_the_app_too(daemon: Cirrus, tmp_path: Path) -> None:
    from test_e2e_gateways import join

    daemon.client().deploy(server_project(tmp_path / "shop", "fastapi_app", [shop()]))
    joined = join(daemon)
    try:
        deadline = time.monotonic() + 20
        while (there := httpx.get(joined.api("shop/items/1?q=x"), timeout=10)).status_code != 200:
            assert time.monotonic() < deadline, there.text
            time.sleep(0.1)
        assert there.json() == {"id": 1, "name": "apple", "q": "x"}
        assert httpx.get(joined.api("shop/headers"), timeout=10).json()["x-forwarded-prefix"] == "/shop"
    finally:
        log = joined.stop()
    assert "Traceback" not in log, log[-3000:]
