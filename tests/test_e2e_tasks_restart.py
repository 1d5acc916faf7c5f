"""A task run survives a daemon restart, and never runs twice at once.

The task appends a line to a file, sleeps, appends another, holding an exclusive lock all the while
(a second attempt running beside the first would fail to take it and write DOUBLE). Through a
graceful `cirrus down` the run is stopped and run again when the daemon starts (not counted as a
failure); through SIGKILL of the daemon its process goes on and the next daemon re-attaches to it;
a process that died while no daemon watched is a failure its retries decide about.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path
from typing import Any

from conftest import Cirrus, pid_alive, wait_gone
from test_e2e_tasks import write_tasks_project

from cirrus.tasks import TaskStatus

SLOW = """
import fcntl, json, os, time


def note(path, text):
    with open(path, "a") as f:
        f.write(json.dumps({"at": time.time(), "pid": os.getpid(), "what": text,
                            "attempt": int(os.environ["CIRRUS_TASK_ATTEMPT"])}) + "\\n")


class Slow:
    def run(self, config):
        lock = open(config["lock"], "a")
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            note(config["out"], "DOUBLE")
            raise
        note(config["out"], "start")
        time.sleep(config["sleep"])
        note(config["out"], "end")
"""

COMMAND = """
import os, subprocess, sys
sys.exit(subprocess.call([sys.executable, "-c", "from slow import Slow, json; import os; "
                          "Slow().run(json.loads(os.environ['CIRRUS_TASK_CONFIG']))"]))
"""


def _project(tmp_path: Path) -> Path:
    return write_tasks_project(
        tmp_path / "project",
        [
            {"name": "slow", "kind": "task", "predictor": {"path": "slow.py", "class": "Slow"}},
            {"name": "slowcmd", "kind": "task", "task": {"command": ["python", "command.py"]}},
        ],
        files={"slow.py": SLOW, "command.py": COMMAND},
    )


def _notes(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _wait_for_note(path: Path, what: str, count: int = 1, timeout: float = 30.0) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout
    while True:
        notes = _notes(path)
        if sum(1 for n in notes if n["what"] == what) >= count:
            return notes
        assert time.monotonic() < deadline, f"no {what!r} in {notes}"
        time.sleep(0.05)


def _config(tmp_path: Path, sleep: float) -> dict[str, Any]:
    return {"out": str(tmp_path / "notes.jsonl"), "lock": str(tmp_path / "lock"), "sleep": sleep}


def _kill_daemon(cirrus: Cirrus) -> None:
    pid = cirrus.info.pid
    os.kill(pid, signal.SIGKILL)
    assert not wait_gone({pid}, 10.0), "the daemon outlived SIGKILL"
    (cirrus.settings.daemon_file).unlink(missing_ok=True)


def _no_overlap(notes: list[dict[str, Any]]) -> None:
    """No DOUBLE, and each start is followed by its own attempt's end or by the next attempt's start."""
    assert all(n["what"] != "DOUBLE" for n in notes), notes
    assert notes[-1]["what"] == "end" and notes[-2]["what"] == "start", notes
    assert notes[-1]["pid"] == notes[-2]["pid"] and notes[-1]["attempt"] == notes[-2]["attempt"], notes


def test_a_graceful_restart_runs_the_task_again_once(daemon: Cirrus, tmp_path: Path) -> None:
    client = daemon.client()
    client.deploy(_project(tmp_path), wait=True, timeout=60)
    out = tmp_path / "notes.jsonl"
    run = client.submit_task("slow", _config(tmp_path, 3.0))
    first = _wait_for_note(out, "start")[0]
    assert client.down(timeout=30)
    assert not pid_alive(first["pid"]), "a clean stop stops the run's process"
    daemon.up()
    fresh = daemon.client()
    ended = fresh.wait_task(run.id, timeout=60)
    assert ended.status is TaskStatus.SUCCEEDED, ended
    assert ended.attempts == 2 and ended.interruptions == 1 and ended.failures == 0, ended
    notes = _notes(out)
    assert [(n["what"], n["attempt"]) for n in notes] == [("start", 1), ("start", 2), ("end", 2)], notes
    _no_overlap(notes)
    # A command task, whose command exits on the SIGTERM (143): interrupted too, not failed.
    out.unlink()
    run = fresh.submit_task("slowcmd", _config(tmp_path, 3.0))
    first = _wait_for_note(out, "start")[0]
    assert fresh.down(timeout=30)
    assert not pid_alive(first["pid"])
    daemon.up()
    ended = daemon.client().wait_task(run.id, timeout=60)
    assert (ended.status, ended.attempts, ended.interruptions, ended.failures) == (TaskStatus.SUCCEEDED, 2, 1, 0)
    notes = _notes(out)
    assert [(n["what"], n["attempt"]) for n in notes] == [("start", 1), ("start", 2), ("end", 2)], notes
    _no_overlap(notes)


def test_a_killed_daemon_re_attaches_to_the_running_task(daemon: Cirrus, tmp_path: Path) -> None:
    client = daemon.client()
    client.deploy(_project(tmp_path), wait=True, timeout=60)
    out = tmp_path / "notes.jsonl"
    run = client.submit_task("slow", _config(tmp_path, 4.0))
    first = _wait_for_note(out, "start")[0]
    _kill_daemon(daemon)
    assert pid_alive(first["pid"]), "the run goes on without the daemon"
    daemon.up()
    fresh = daemon.client()
    during = fresh.task(run.id)
    assert during.status is TaskStatus.RUNNING and during.pid == first["pid"], during
    ended = fresh.wait_task(run.id, timeout=60)
    assert ended.status is TaskStatus.SUCCEEDED and ended.attempts == 1 and ended.failures == 0, ended
    notes = _notes(out)
    assert [(n["what"], n["pid"]) for n in notes] == [("start", first["pid"]), ("end", first["pid"])], notes
    assert f"task run {run.id} re-attached" in daemon.daemon_log()
    # A command task too; cancelled after the re-attach, its whole process group is stopped.
    run = fresh.submit_task("slowcmd", _config(tmp_path, 60.0))
    command = _wait_for_note(out, "start", count=2)[-1]
    _kill_daemon(daemon)
    daemon.up()
    fresh = daemon.client()
    assert fresh.task(run.id).status is TaskStatus.RUNNING
    fresh.cancel_task(run.id)
    ended = fresh.wait_task(run.id, timeout=30)
    assert ended.status is TaskStatus.CANCELLED and not pid_alive(command["pid"]), ended


def test_a_task_that_died_with_no_daemon_watching_is_retried_as_its_policy_says(daemon: Cirrus, tmp_path: Path) -> None:
    client = daemon.client()
    client.deploy(_project(tmp_path), wait=True, timeout=60)
    out = tmp_path / "notes.jsonl"
    retried = client.submit_task("slow", _config(tmp_path, 30.0), retries=1)
    first = _wait_for_note(out, "start")[0]
    _kill_daemon(daemon)
    os.kill(first["pid"], signal.SIGKILL)
    assert not wait_gone({first["pid"]}, 10.0)
    # The lost attempt counts as a failure: within retries: 1, it runs again (then is cancelled here).
    daemon.up()
    fresh = daemon.client()
    notes = _wait_for_note(out, "start", count=2)
    assert notes[-1]["attempt"] == 2 and notes[-1]["pid"] != first["pid"]
    run = fresh.task(retried.id)
    assert run.status is TaskStatus.RUNNING and run.failures == 1, run
    fresh.cancel_task(retried.id)
    assert fresh.wait_task(retried.id, timeout=30).status is TaskStatus.CANCELLED
    # Without retries it fails, saying why.
    once = fresh.submit_task("slow", _config(tmp_path, 30.0))
    second = _wait_for_note(out, "start", count=3)[-1]
    _kill_daemon(daemon)
    os.kill(second["pid"], signal.SIGKILL)
    assert not wait_gone({second["pid"]}, 10.0)
    daemon.up()
    failed = daemon.client().wait_task(once.id, timeout=30)
    assert failed.status is TaskStatus.FAILED and failed.attempts == 1, failed
    assert failed.reason == "lost: it ended while the daemon was not running, leaving no exit status"
