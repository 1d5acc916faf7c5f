"""Revisions are snapshots, through the real CLI and the real gateway.

A deploy packs the project directory into an immutable snapshot that replicas run from: edits to
the working tree change nothing until the next deploy (not after a replica crash, not after a
daemon restart). Scale-only changes apply in place; `--force` makes a revision of an unchanged
project; `cirrus rollback` serves an older snapshot again as a new revision; the revision that
served last is the one a crashed daemon brings back; a revision that cannot load is refused at
deploy time and the gateway says so at once.

Tests that restart a daemon or kill processes own theirs; the others share one module daemon,
each with its own API.
"""

from __future__ import annotations

import json
import os
import re
import signal
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import Cirrus, module_daemon, pid_alive, processes_of, wait_gone, write_project

from cirrus.types import ApiStatus, ApiStatusName, ReplicaState

VERSIONED = """
    VERSION = {version!r}


    class Predictor:
        def predict(self, payload):
            return {{"version": VERSION}}
"""

BROKEN = """
    class Predictor:
        def __init__(self, config):
            raise RuntimeError("weights are corrupt: {marker}")

        def predict(self, payload):
            return {{"never": True}}
"""

SINGLE = {"min_replicas": 1, "max_replicas": 1}


# --- helpers -------------------------------------------------------------------------


def _deploy(cirrus: Cirrus, project: Path, *flags: str) -> tuple[int, list[dict[str, Any]], str]:
    """`cirrus deploy PROJECT -o json FLAGS`: (exit code, the results printed, stderr)."""
    code, out, err = cirrus.cli("deploy", str(project), "-o", "json", "--timeout", "30", *flags)
    return code, (json.loads(out) if code == 0 else []), err


def _deployed(cirrus: Cirrus, project: Path, *flags: str) -> dict[str, Any]:
    """The one result of a deploy that must succeed."""
    code, results, err = _deploy(cirrus, project, *flags)
    assert code == 0, err + cirrus.daemon_log()[-3000:]
    [result] = results
    return result


def _cli_json(cirrus: Cirrus, *args: str) -> Any:
    code, out, err = cirrus.cli(*args, "-o", "json")
    assert code == 0, err
    return json.loads(out)


def _replica_pids(cirrus: Cirrus, api: str) -> set[int]:
    """The pids `cirrus get API -o json` shows."""
    return {r["pid"] for r in _cli_json(cirrus, "get", api)["replicas"] if r["pid"] is not None}


def _post(cirrus: Cirrus, api: str, payload: Any = None, timeout: float = 30) -> httpx.Response:
    return httpx.post(cirrus.url(api), json={} if payload is None else payload, timeout=timeout)


def _ready(api_revision: int, count: int = 1) -> Callable[[ApiStatus], bool]:
    """A `wait_for` check: exactly `count` replicas, all ready and of `api_revision`."""

    def check(status: ApiStatus) -> bool:
        replicas = status.replicas
        return (
            status.status == ApiStatusName.LIVE
            and len(replicas) == count
            and all(r.state == ReplicaState.READY and r.revision == api_revision for r in replicas)
        )

    return check


def _kill_everything(cirrus: Cirrus) -> None:
    """A machine crash: SIGKILL to the daemon and to every process of the state directory."""
    daemon_pid = cirrus.info.pid
    os.kill(daemon_pid, signal.SIGKILL)
    for pid in processes_of(cirrus.home):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert not wait_gone(cirrus.processes, timeout=5), "processes survived SIGKILL"


class Traffic:
    """A thread that POSTs to one API back to back and records (status, body) of every answer;
    `paused()` holds it between two requests."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.seen: list[tuple[int, Any]] = []
        self.phase = "start"  # what the test is doing, recorded with each failure
        self.failed: list[tuple[str, int, Any]] = []
        self._stop = threading.Event()
        self._go = threading.Event()
        self._go.set()
        self._idle = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with httpx.Client(timeout=30) as http:
            while not self._stop.is_set():
                if not self._go.is_set():
                    self._idle.set()
                    self._go.wait(0.05)
                    continue
                self._idle.clear()
                phase = self.phase
                try:
                    response = http.post(self.url, json={})
                    status, body = response.status_code, (response.json() if response.is_success else response.text)
                except httpx.HTTPError as exc:
                    status, body = 0, repr(exc)
                self.seen.append((status, body))
                if status != 200:
                    self.failed.append((phase, status, body))

    def __enter__(self) -> Traffic:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._go.set()
        self._thread.join(timeout=30)

    def pause(self) -> None:
        self._idle.clear()
        self._go.clear()
        assert self._idle.wait(30), "the traffic thread did not pause"

    def resume(self) -> None:
        self._go.set()

    def values(self) -> list[Any]:
        return [body["value"] for status, body in list(self.seen) if status == 200]

    def failures(self) -> list[tuple[str, int, Any]]:
        """(phase, status, body) of every answer but 200."""
        return list(self.failed)

    def wait_for_value(self, value: str, timeout: float = 10) -> None:
        deadline = time.monotonic() + timeout
        start = len(self.seen)
        while time.monotonic() < deadline:
            if value in [body["value"] for status, body in self.seen[start:] if status == 200]:
                return
            time.sleep(0.02)
        raise AssertionError(f"no answer {value!r} within {timeout}s; the last answers: {self.seen[-5:]}")


# --- a shared daemon ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cirrus]:
    with module_daemon(tmp_path_factory.mktemp("revisions") / "home") as cirrus:
        yield cirrus


# --- 1. the snapshot, not the working tree; updates and rollbacks drop nothing -----------

HELPER_PREDICTOR = """
    import os

    import helper


    class Predictor:
        def predict(self, payload):
            return {"value": helper.VALUE, "pid": os.getpid(), "code_dir": os.path.dirname(os.path.abspath(__file__))}
"""


def test_replicas_run_the_snapshot_and_updates_and_rollbacks_drop_no_request(shared: Cirrus, tmp_path: Path) -> None:
    project = write_project(
        tmp_path / "project",
        {"predictor.py": HELPER_PREDICTOR, "helper.py": "VALUE = 'old'\n"},
        name="helped",
        autoscaling={"min_replicas": 2, "max_replicas": 2},
    )
    assert _deployed(shared, project)["revision"] == 1
    first = shared.wait_for("helped", _ready(1, count=2))
    answer = _post(shared, "helped").json()
    assert answer["value"] == "old"
    snapshots = (shared.home / "snapshots").resolve()
    assert Path(answer["code_dir"]).is_relative_to(snapshots), f"the replica runs from {answer['code_dir']}"

    with Traffic(shared.url("helped")) as traffic:
        traffic.wait_for_value("old")

        # An edit to a module the predictor imports, not deployed; then a replica crashes.
        (project / "helper.py").write_text("VALUE = 'new'\n")
        victim = min(_replica_pids(shared, "helped"))
        assert victim in {r.pid for r in first.replicas}
        traffic.pause()  # a request in flight to the victim when it dies is lost: not what this test is about
        os.kill(victim, signal.SIGKILL)
        assert not wait_gone({victim}, timeout=5)
        shared.wait_for(  # the daemon noticed: no request goes to the dead replica from here on
            "helped", lambda s: not any(r.pid == victim and r.state == ReplicaState.READY for r in s.replicas)
        )
        traffic.phase = "a replica restarts"
        traffic.resume()  # the other replica answers while the victim restarts
        restarted = shared.wait_for(
            "helped", lambda s: _ready(1, count=2)(s) and victim not in {r.pid for r in s.replicas}
        )
        new_pid = ({r.pid for r in restarted.replicas} - {r.pid for r in first.replicas}).pop()
        deadline = time.monotonic() + 10
        while not any(body["pid"] == new_pid for status, body in traffic.seen if status == 200):
            assert time.monotonic() < deadline, "the restarted replica never answered"
            time.sleep(0.02)
        from_restarted = {body["value"] for status, body in traffic.seen if status == 200 and body["pid"] == new_pid}
        assert from_restarted == {"old"}, "the restarted replica ran the edited working tree"

        # Deploying the edit makes revision 2.
        traffic.phase = "update to revision 2"
        result = _deployed(shared, project)
        assert (result["action"], result["revision"]) == ("updated", 2)
        traffic.wait_for_value("new")
        shared.wait_for("helped", _ready(2, count=2))

        # Rolling back makes revision 3, running revision 1's snapshot.
        traffic.phase = "rollback to revision 1"
        code, out, err = shared.cli("rollback", "helped", "--timeout", "30", "-o", "json")
        assert code == 0, err
        [result] = json.loads(out)
        assert result["revision"] == 3
        traffic.wait_for_value("old")
        shared.wait_for("helped", _ready(3, count=2))
        time.sleep(0.2)

    assert _post(shared, "helped").json()["value"] == "old"
    failures = traffic.failures()
    assert not failures, f"{len(failures)} of {len(traffic.seen)} requests failed: {failures[:5]}"
    values = traffic.values()
    first_new, last_new = values.index("new"), len(values) - 1 - values[::-1].index("new")
    assert set(values[:first_new]) == {"old"} and set(values[last_new + 1 :]) == {"old"}
    assert set(values[first_new : last_new + 1]) <= {"old", "new"}

    revisions = _cli_json(shared, "revisions", "helped")
    assert [r["revision"] for r in revisions] == [1, 2, 3]
    assert re.search(r"rollback\D*\b1\b", revisions[2]["note"] or ""), revisions[2]
    assert revisions[2]["role"] == "serving"
    assert [r["role"] for r in revisions[:2]] == ["", ""]
    assert revisions[2]["snapshot"] == revisions[0]["snapshot"] != revisions[1]["snapshot"]


# --- 2. a daemon restart serves the snapshot, not the working tree ------------------------


def test_a_restart_serves_the_deployed_code_not_the_edited_tree(cirrus: Cirrus, tmp_path: Path) -> None:
    project = write_project(tmp_path / "project", VERSIONED.format(version="deployed"), name="kept", autoscaling=SINGLE)
    assert _deployed(cirrus, project)["revision"] == 1
    assert _post(cirrus, "kept").json() == {"version": "deployed"}

    (project / "predictor.py").write_text(textwrap.dedent(VERSIONED.format(version="edited")))
    code, _, err = cirrus.cli("down")
    assert code == 0, err
    code, _, err = cirrus.cli("up")
    assert code == 0, err

    assert _post(cirrus, "kept").json() == {"version": "deployed"}
    status = _cli_json(cirrus, "get", "kept")
    assert (status["revision"], status["status"]) == (1, "live")
    assert [r["revision"] for r in _cli_json(cirrus, "revisions", "kept")] == [1]


# --- 3. a crash brings back the revision that served, not a newer broken one --------------


def test_a_crashed_daemon_restores_the_serving_revision_beside_a_broken_newer_one(
    cirrus: Cirrus, tmp_path: Path
) -> None:
    project = write_project(
        tmp_path / "project",
        VERSIONED.format(version=1),
        name="steady",
        autoscaling=SINGLE,
        concurrency={"timeout_s": 20},
    )
    assert _deployed(cirrus, project)["revision"] == 1
    assert _post(cirrus, "steady").json() == {"version": 1}

    (project / "predictor.py").write_text(textwrap.dedent(BROKEN.format(marker="rev2")))
    code, _, err = _deploy(cirrus, project)
    assert code == 1
    assert "weights are corrupt: rev2" in err
    status = _cli_json(cirrus, "get", "steady")
    assert (status["status"], status["revision"]) == ("error", 2)
    assert "an older revision still serves" in status["message"]
    assert "weights are corrupt: rev2" in status["message"]
    assert _post(cirrus, "steady").json() == {"version": 1}

    _kill_everything(cirrus)
    code, _, err = cirrus.cli("up")
    assert code == 0, err

    started = time.monotonic()
    response = _post(cirrus, "steady")  # waits (at most timeout_s) for the restored replica
    assert response.status_code == 200, response.text
    assert response.json() == {"version": 1}
    assert time.monotonic() - started < 15
    for _ in range(5):
        assert _post(cirrus, "steady").json() == {"version": 1}
    roles = {r["revision"]: r["role"] for r in _cli_json(cirrus, "revisions", "steady")}
    assert roles[1] == "serving"
    assert "serving" not in roles[2]
    # The broken revision is retried beside the serving one, and reported as such.
    cirrus.wait_for("steady", lambda s: "an older revision still serves" in (s.message or ""), timeout=15)


# --- 4. a revision that cannot load: the deploy fails, the gateway says why at once ------------


def test_an_unloadable_revision_fails_the_deploy_and_gets_503_at_once(shared: Cirrus, tmp_path: Path) -> None:
    zero = {"min_replicas": 0, "max_replicas": 1}
    project = write_project(
        tmp_path / "project",
        {"broken.py": BROKEN.format(marker="at-zero")},
        apis=[
            {
                "name": "cold-broken",
                "predictor": {"path": "broken.py"},
                "autoscaling": zero,
                "concurrency": {"timeout_s": 20},
            },
            {
                "name": "cold-broken-async",
                "kind": "async",
                "predictor": {"path": "broken.py"},
                "autoscaling": zero,
                "concurrency": {"timeout_s": 20},
            },
        ],
    )
    code, _, err = _deploy(shared, project)
    assert code == 1
    assert "weights are corrupt: at-zero" in err
    for api in ("cold-broken", "cold-broken-async"):
        shared.wait_for(api, lambda s: s.status == ApiStatusName.ERROR, timeout=20)

    for api, method in (("cold-broken", "realtime"), ("cold-broken-async", "async")):
        started = time.monotonic()
        response = _post(shared, api, {"x": 1})
        elapsed = time.monotonic() - started
        assert response.status_code == 503, (method, response.status_code, response.text)
        error = response.json()["error"]
        assert re.search(r"cannot serve: revision 1 does not load: .*weights are corrupt: at-zero", error), error
        assert elapsed < 10, f"the {method} 503 took {elapsed:.1f}s: it waited instead of answering at once"


# --- 5. scale-only changes apply in place -------------------------------------------------


def test_a_scale_only_change_keeps_the_revision_and_the_replica(shared: Cirrus, tmp_path: Path) -> None:
    project = write_project(tmp_path / "project", VERSIONED.format(version=1), name="scaling", autoscaling=SINGLE)
    assert _deployed(shared, project)["action"] == "created"
    [pid] = _replica_pids(shared, "scaling")

    write_project(
        project,
        VERSIONED.format(version=1),
        name="scaling",
        autoscaling={"min_replicas": 1, "max_replicas": 3},
        concurrency={"timeout_s": 7},
    )
    code, out, err = shared.cli("deploy", str(project), "--timeout", "30")
    assert code == 0, err
    assert re.search(r"^scaled\s+scaling\s+revision 1\b", out, re.MULTILINE), out
    status = _cli_json(shared, "get", "scaling")
    assert status["revision"] == 1
    assert [(r["pid"], r["revision"]) for r in status["replicas"]] == [(pid, 1)]
    assert pid_alive(pid)
    assert [r["revision"] for r in _cli_json(shared, "revisions", "scaling")] == [1]
    assert _post(shared, "scaling").json() == {"version": 1}


# --- 6. .cirrusignore and the size cap ----------------------------------------------------


def test_cirrusignore_keeps_big_files_out_and_the_cap_names_them(shared: Cirrus, tmp_path: Path) -> None:
    project = write_project(tmp_path / "project", VERSIONED.format(version=1), name="bigdir", autoscaling=SINGLE)
    with (project / "big.bin").open("wb") as big:
        big.truncate(70 * 2**20)  # sparse: 70 MiB of size, no disk
    (project / ".cirrusignore").write_text("# weights come from models:\nbig.bin\n")
    assert _deployed(shared, project)["revision"] == 1
    assert _post(shared, "bigdir").json() == {"version": 1}
    [revision] = _cli_json(shared, "revisions", "bigdir")
    unpacked = shared.home / "snapshots" / revision["snapshot"]
    assert (unpacked / "predictor.py").is_file()
    assert not (unpacked / "big.bin").exists()

    (project / ".cirrusignore").write_text("")
    (project / "predictor.py").write_text(textwrap.dedent(VERSIONED.format(version=2)))
    code, _, err = _deploy(shared, project)
    assert code == 1
    assert "big.bin" in err and "models:" in err, err
    assert [r["revision"] for r in _cli_json(shared, "revisions", "bigdir")] == [1]
    assert _post(shared, "bigdir").json() == {"version": 1}


# --- 7. --force -------------------------------------------------------------------------


def test_force_makes_a_revision_of_an_unchanged_project(shared: Cirrus, tmp_path: Path) -> None:
    project = write_project(tmp_path / "project", VERSIONED.format(version=1), name="forced", autoscaling=SINGLE)
    assert _deployed(shared, project)["action"] == "created"
    [pid] = _replica_pids(shared, "forced")

    again = _deployed(shared, project)
    assert (again["action"], again["revision"]) == ("unchanged", 1)
    assert _replica_pids(shared, "forced") == {pid}

    forced = _deployed(shared, project, "--force")
    assert (forced["action"], forced["revision"]) == ("updated", 2)
    status = shared.wait_for("forced", _ready(2))
    assert {r.pid for r in status.replicas} != {pid}
    assert _post(shared, "forced").json() == {"version": 1}
    assert [r["revision"] for r in _cli_json(shared, "revisions", "forced")] == [1, 2]
