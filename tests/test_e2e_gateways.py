"""More gateways: `cirrus gateway --join ADMIN_URL` runs another gateway for a daemon's APIs.

Real processes over real sockets: a daemon, and a second gateway process started with the real CLI
on a port of its own. It serves what the daemon's gateway serves (an API deployed after it joined
too, and no longer one deleted), switches to a new revision's replicas without failing a request,
reports its load so that load arriving only there scales the API, and refuses to start with a
wrong token. Async APIs are accepted there when the daemon's queue store is Redis; with SQLite they
answer 503, saying why.
"""

from __future__ import annotations

import json
import os
import selectors
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import ECHO_PREDICTOR, Cirrus, module_daemon, write_project

from cirrus.types import ApiStatus

JOIN_TIMEOUT_S = 20.0
STOP_TIMEOUT_S = 15.0

VERSIONED = """
    import os, time

    VERSION = {version!r}


    class Predictor:
        def predict(self, payload):
            time.sleep(0.02)
            return {{"version": VERSION, "pid": os.getpid()}}
"""

SLOW = """
    import os, time


    class Predictor:
        def predict(self, payload):
            time.sleep(0.5)
            return {"pid": os.getpid()}
"""

ASYNC_WORKER = """
    class Predictor:
        def predict(self, payload):
            return {"double": payload["x"] * 2}
"""


@dataclass
class Joined:
    """A `cirrus gateway --join` process and where it serves."""

    process: subprocess.Popen[str]
    url: str
    id: str

    def api(self, name: str) -> str:
        return f"{self.url}/{name}"

    def stop(self) -> str:
        """SIGTERM, wait for the exit; its stderr (the log)."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            _, err = self.process.communicate(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.process.kill()
            _, err = self.process.communicate()
            why = f"the joined gateway did not stop within {STOP_TIMEOUT_S:g}s"
            raise AssertionError(f"{why}:\n{err[-3000:]}") from None
        assert self.process.returncode == 0, err[-3000:]
        return err


def join(cirrus: Cirrus, *args: str) -> Joined:
    """Start `cirrus gateway --join ADMIN --token-file HOME/token ARGS` and wait until it serves."""
    admin = cirrus.info.admin_url
    argv = [sys.executable, "-m", "cirrus.cli", "gateway", "--join", admin, "--token-file", str(cirrus.home / "token")]
    pipes = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE}
    process = subprocess.Popen([*argv, *args], env=cirrus.env, stdin=subprocess.DEVNULL, text=True, **pipes)
    assert process.stdout is not None
    selector = selectors.DefaultSelector()
    selector.register(process.stdout, selectors.EVENT_READ)
    deadline = time.monotonic() + JOIN_TIMEOUT_S
    line = ""
    while time.monotonic() < deadline and process.poll() is None:
        if selector.select(timeout=0.1):
            line = process.stdout.readline()
            break
    selector.close()
    if " serving " not in line:
        process.kill()
        _, err = process.communicate()
        raise AssertionError(f"the joined gateway did not start: {line!r}\n{err[-3000:]}")
    # "gateway <id> joined <admin>: serving <url>"
    return Joined(process, line.rsplit(" serving ", 1)[1].strip(), line.split()[1])


def until(check: Callable[[], Any], timeout: float = 15.0, what: str = "") -> Any:
    """Poll `check()` until it returns something true; that value."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out waiting for {what or check}")
        time.sleep(0.05)


def status(cirrus: Cirrus, name: str) -> ApiStatus:
    """`cirrus get NAME -o json`, through the real CLI."""
    code, out, err = cirrus.cli("get", name, "-o", "json")
    assert code == 0, err
    return ApiStatus.model_validate(json.loads(out))


@pytest.fixture(scope="module")
def cirrus(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cirrus]:
    """A daemon with `echo` deployed before any gateway joins it."""
    home = tmp_path_factory.mktemp("gateways") / "home"
    with module_daemon(home) as daemon:
        project = write_project(home.parent / "echo", ECHO_PREDICTOR, name="echo")
        daemon.client().deploy(project)
        yield daemon


@pytest.fixture(scope="module")
def joined(cirrus: Cirrus) -> Iterator[Joined]:
    gateway = join(cirrus)
    try:
        yield gateway
    finally:
        log = gateway.stop()
        assert "Traceback" not in log, log[-4000:]


def test_a_joined_gateway_serves_the_same_apis_and_follows_deploys_and_deletes(
    cirrus: Cirrus, joined: Joined, tmp_path: Path
) -> None:
    with httpx.Client(timeout=10) as http:
        here = http.post(cirrus.url("echo"), json={"n": 1})
        there = http.post(joined.api("echo"), json={"n": 1})
        assert here.status_code == there.status_code == 200, there.text
        assert here.json() == there.json() == {"greeting": "hello", "echo": {"n": 1}}
        assert http.get(joined.api("echo/openapi.json")).status_code == 200

        # An API deployed after the gateway joined: served there as soon as it is live.
        late = write_project(tmp_path / "late", ECHO_PREDICTOR, name="late", predictor={"config": {"greeting": "hi"}})
        cirrus.client().deploy(late)
        answer = until(lambda: (r := http.post(joined.api("late"), json="x")).status_code == 200 and r, what="late")
        assert answer.json() == {"greeting": "hi", "echo": "x"}
        assert set(http.get(f"{joined.url}/").json()["apis"]) >= {"echo", "late"}

        # Deleted: no longer served there either (404, as at the daemon's gateway).
        cirrus.client().delete("late")
        until(lambda: http.post(joined.api("late"), json="x").status_code == 404, what="late deleted")
        assert http.post(cirrus.url("late"), json="x").status_code == 404
        assert http.post(joined.api("echo"), json={"n": 2}).status_code == 200

    # The daemon lists it, as its last load report tells.
    admin = cirrus.info.admin_url
    token = (cirrus.home / "token").read_text().strip()
    listed = httpx.get(f"{admin}/v1/gateways", headers={"authorization": f"Bearer {token}"}).json()["gateways"]
    assert [(g["id"], g["url"]) for g in listed] == [(joined.id, joined.url)]
    assert listed[0]["seen_s_ago"] < 3


def test_a_new_revision_rolls_out_through_a_joined_gateway_without_a_failed_request(
    cirrus: Cirrus, joined: Joined, tmp_path: Path
) -> None:
    project = tmp_path / "roll"
    spec = {"name": "roll", "autoscaling": {"min_replicas": 2, "max_replicas": 2}}
    write_project(project, VERSIONED.format(version="v1"), **spec)
    cirrus.client().deploy(project)
    url = joined.api("roll")
    until(lambda: httpx.post(url, json={}).status_code == 200, what="roll at the joined gateway")

    answers: Counter[tuple[int, str]] = Counter()
    stop = threading.Event()

    def load() -> None:
        with httpx.Client(timeout=30) as http:
            while not stop.is_set():
                response = http.post(url, json={})
                version = response.json().get("version", "") if response.status_code == 200 else response.text
                answers[(response.status_code, version)] += 1

    threads = [threading.Thread(target=load) for _ in range(4)]
    for thread in threads:
        thread.start()
    try:
        until(lambda: answers[(200, "v1")] >= 20, what="v1 answers")
        write_project(project, VERSIONED.format(version="v2"), **spec)
        code, _, err = cirrus.cli("deploy", str(project), "--timeout", "60")
        assert code == 0, err
        until(lambda: answers[(200, "v2")] >= 20, timeout=30, what="v2 answers")
        # The old replicas drain and stop (only once the joined gateway has let go of them too) ...
        until(lambda: {r.revision for r in status(cirrus, "roll").replicas} == {2}, timeout=30, what="v1 stopped")
        old = answers[(200, "v1")]
        time.sleep(0.5)
        assert answers[(200, "v1")] == old  # ... and only v2 answers now
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=30)
    assert set(answers) == {(200, "v1"), (200, "v2")}, answers
    ready = status(cirrus, "roll")
    assert ready.revision == 2 and ready.replicas_ready == 2


def test_load_at_a_joined_gateway_alone_scales_the_api_up(cirrus: Cirrus, joined: Joined, tmp_path: Path) -> None:
    project = write_project(
        tmp_path / "busy",
        SLOW,
        name="busy",
        concurrency={"max_concurrency": 16, "inference_slots": 1, "max_queue_length": 64, "timeout_s": 30},
        autoscaling={
            "min_replicas": 1,
            "max_replicas": 3,
            "target_concurrency": 1,
            "window_s": 4,
            "panic_window_s": 2,
            "downscale_stabilization_s": 60,
        },
    )
    cirrus.client().deploy(project)
    url = joined.api("busy")
    statuses: Counter[int] = Counter()
    stop = threading.Event()

    def load() -> None:
        with httpx.Client(timeout=60) as http:
            while not stop.is_set():
                statuses[http.post(url, json={}).status_code] += 1

    threads = [threading.Thread(target=load) for _ in range(8)]
    for thread in threads:
        thread.start()
    try:
        scaled = until(lambda: (s := status(cirrus, "busy")).replicas_desired > 1 and s, timeout=30, what="scale-up")
        assert scaled.autoscaler is not None and "in flight" in scaled.autoscaler, scaled.autoscaler
        until(lambda: status(cirrus, "busy").replicas_ready == 3, timeout=30, what="3 replicas ready")
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=60)
    assert set(statuses) == {200}, statuses
    assert status(cirrus, "busy").requests_last_minute == 0  # none came through the daemon's own gateway
    assert "busy: 1 ->" in cirrus.daemon_log()


def test_a_wrong_or_missing_token_is_refused_with_one_clear_line(cirrus: Cirrus) -> None:
    admin = cirrus.info.admin_url
    code, out, err = cirrus.cli("gateway", "--join", admin, "--token", "not-the-token")
    assert code == 1 and out == ""
    assert err.strip().splitlines() == [
        f"error: the admin API at {admin} refused the token (401): give the daemon's admin token"
    ], err
    code, _, err = cirrus.cli("gateway", "--join", admin)
    assert code == 1 and err.strip().splitlines() == [
        "error: give the daemon's admin token: --token-file FILE (or --token TOKEN), one of them"
    ], err
    code, _, err = cirrus.cli("gateway", "--join", "127.0.0.1:1", "--token", "x")
    assert code == 1 and "give the daemon's admin API URL" in err, err


def test_async_apis_answer_503_at_a_joined_gateway_of_a_sqlite_daemon(
    cirrus: Cirrus, joined: Joined, tmp_path: Path
) -> None:
    project = write_project(tmp_path / "later", ASYNC_WORKER, name="later", kind="async")
    cirrus.client().deploy(project)
    assert httpx.post(cirrus.url("later"), json={"x": 1}).status_code == 202

    def refused() -> httpx.Response | None:
        response = httpx.post(joined.api("later"), json={"x": 1})
        return response if response.status_code == 503 else None

    answer = until(refused, what="503 from the joined gateway")
    assert "queue store is SQLite" in answer.json()["error"] and "CIRRUS_STORE=redis" in answer.json()["error"]


def test_async_apis_are_accepted_at_a_joined_gateway_of_a_redis_daemon(tmp_path: Path) -> None:
    import backends

    backends.module("redis")
    from redis_server import redis_url

    with redis_url(tmp_path / "redis") as store, module_daemon(tmp_path / "home", CIRRUS_STORE=store) as cirrus:
        cirrus.client().deploy(write_project(tmp_path / "later", ASYNC_WORKER, name="later", kind="async"))
        gateway = join(cirrus)
        try:
            with httpx.Client(timeout=10) as http:
                accepted = http.post(gateway.api("later"), json={"x": 21})
                assert accepted.status_code == 202, accepted.text
                request_id = accepted.json()["id"]

                def done() -> dict[str, Any] | None:
                    record = http.get(gateway.api(f"later/{request_id}")).json()
                    return record if record["status"] == "completed" else None

                assert until(done, what="the async result")["result"] == {"double": 42}
                here = http.get(cirrus.url(f"later/{request_id}")).json()  # the same store, read at the daemon
                assert here["status"] == "completed"
        finally:
            log = gateway.stop()
            assert "Traceback" not in log, log[-4000:]


def test_a_joined_gateway_keeps_serving_while_the_admin_api_is_away(tmp_path: Path) -> None:
    """The daemon's admin API stops answering (SIGSTOP, as a network blip would look): requests go on
    through the joined gateway to the replicas it holds; it says so once, and catches up after."""
    with module_daemon(tmp_path / "home") as cirrus:
        cirrus.client().deploy(write_project(tmp_path / "echo", ECHO_PREDICTOR, name="echo"))
        gateway = join(cirrus)
        daemon_pid = cirrus.info.pid
        try:
            os.kill(daemon_pid, signal.SIGSTOP)
            try:
                time.sleep(4.0)  # its report times out (2 s), the long poll too, later
                for _ in range(20):
                    assert httpx.post(gateway.api("echo"), json=1, timeout=10).status_code == 200
            finally:
                os.kill(daemon_pid, signal.SIGCONT)
            cirrus.client().deploy(write_project(tmp_path / "late", ECHO_PREDICTOR, name="late"))
            until(lambda: httpx.post(gateway.api("late"), json=1).status_code == 200, timeout=40, what="late")
        finally:
            log = gateway.stop()
        assert log.count("serving what this gateway has, retrying") == 1, log
        assert "answers again" in log and "Traceback" not in log, log
