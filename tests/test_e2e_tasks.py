"""Task runs (`kind: task`) through the real daemon and CLI: run(config) (sync and async) and a command
run once to completion with their exit reasons; failed runs retried as new attempts; timeouts and
cancels stop the process; a run that does not fit waits as `pending` with the reason; every attempt's
log under `cirrus logs API --task ID`; bad input gets clear errors with the right status."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from conftest import Cirrus, module_daemon, pid_alive

from cirrus.async_client import AsyncClient
from cirrus.client import CirrusError
from cirrus.tasks import TaskRun, TaskStatus

TASKS = """
import asyncio, json, os, sys, time


class Predictor:
    def __init__(self, config):
        self.greeting = config["greeting"]

    def run(self, config):
        out = config.get("out")
        attempt = int(os.environ["CIRRUS_TASK_ATTEMPT"])
        print(f"{self.greeting} from attempt {attempt} of {os.environ['CIRRUS_TASK_ID']}", flush=True)
        if out:
            with open(out, "a") as f:
                f.write(json.dumps({"attempt": attempt, "pid": os.getpid(), "config": config}) + "\\n")
        if attempt < config.get("succeed_at", 1):
            raise ValueError(f"not yet: attempt {attempt}")
        time.sleep(config.get("sleep", 0))


class AsyncTask:
    async def run(self, config):
        await asyncio.sleep(0.01)
        with open(config["out"], "w") as f:
            f.write("async ran")


class NoRun:
    def predict(self, payload):
        return payload
"""

COMMAND = """
import json, os, sys, time
config = json.loads(os.environ["CIRRUS_TASK_CONFIG"])
print("command got", config, "as", os.environ["CIRRUS_TASK_ID"], flush=True)
time.sleep(config.get("sleep", 0))
sys.exit(config.get("code", 0))
"""


def write_tasks_project(directory: Path, apis: list[dict[str, Any]], files: dict[str, str] | None = None) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for name, source in (files or {"tasks.py": TASKS, "command.py": COMMAND}).items():
        (directory / name).write_text(textwrap.dedent(source))
    (directory / "cirrus.yaml").write_text(yaml.safe_dump(apis, sort_keys=False))
    return directory


def _project(tmp_path: Path) -> Path:
    predictor = {"path": "tasks.py", "class": "Predictor", "config": {"greeting": "hello"}}
    return write_tasks_project(
        tmp_path / "project",
        [
            {"name": "train", "kind": "task", "predictor": predictor, "task": {"retries": 2}},
            {"name": "atrain", "kind": "task", "predictor": {"path": "tasks.py", "class": "AsyncTask"}},
            {"name": "norun", "kind": "task", "predictor": {"path": "tasks.py", "class": "NoRun"}},
            {"name": "cmd", "kind": "task", "task": {"command": ["python", "command.py"], "timeout_s": 60}},
            {"name": "huge", "kind": "task", "predictor": predictor, "compute": {"cpu": 512}},
            {"name": "echo", "predictor": {"path": "tasks.py", "class": "NoRun"}},
        ],
    )


def _deployed(daemon: Cirrus, tmp_path: Path) -> Any:
    client = daemon.client()
    client.deploy(_project(tmp_path), wait=True, timeout=60)
    return client


def _lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _wait_until(check: Any, timeout: float = 30.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError("timed out waiting")
        time.sleep(0.05)


def test_runs_succeed_or_fail_with_retries_and_show_their_logs(daemon: Cirrus, tmp_path: Path) -> None:
    client = _deployed(daemon, tmp_path)
    out = tmp_path / "out.jsonl"
    # Succeeds on the third attempt: two failures, both within retries: 2.
    code, stdout, stderr = daemon.cli(
        "tasks", "submit", "train", "--config", json.dumps({"out": str(out), "succeed_at": 3})
    )
    assert code == 0, stderr
    run_id = stdout.strip()
    run = client.wait_task(run_id, timeout=60)
    assert run.status is TaskStatus.SUCCEEDED and run.attempts == 3 and run.failures == 2, run
    assert run.reason == "exited with code 0" and run.exit_code == 0
    assert run.started_at is not None and run.ended_at is not None and run.created_at <= run.started_at <= run.ended_at
    attempts = _lines(out)
    assert [a["attempt"] for a in attempts] == [1, 2, 3] and len({a["pid"] for a in attempts}) == 3
    # The log holds every attempt, in order, with the failures' tracebacks.
    code, logs, _ = daemon.cli("logs", "train", "--task", run_id)
    assert code == 0
    assert [f"hello from attempt {n} of {run_id}" in logs for n in (1, 2, 3)] == [True] * 3
    assert logs.count("ValueError: not yet: attempt") == 2 and "Traceback" in logs
    assert logs.index("attempt 1 of") < logs.index("attempt 2 of") < logs.index("attempt 3 of")
    # -f follows the run's log as it is written.
    slow = client.submit_task("train", {"sleep": 30})
    follower = subprocess.Popen(
        [sys.executable, "-m", "cirrus.cli", "logs", "train", "--task", slow.id, "-f"],
        env=daemon.env,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert follower.stdout is not None
        seen = ""
        while f"hello from attempt 1 of {slow.id}" not in seen:
            line = follower.stdout.readline()
            assert line, seen
            seen += line
    finally:
        follower.kill()
        follower.wait()
        if follower.stdout is not None:
            follower.stdout.close()
    client.cancel_task(slow.id)
    # Out of retries: failed, with the exception's last line; --retries overrides the spec.
    code, stdout, _ = daemon.cli(
        "tasks", "submit", "train", "--config", json.dumps({"succeed_at": 5}), "--retries", "1", "--wait"
    )
    assert code == 1 and "failed" in stdout
    failed = client.tasks("train")[0]
    assert failed.status is TaskStatus.FAILED and failed.attempts == 2 and failed.failures == 2
    assert failed.reason == "ValueError: not yet: attempt 2 (exit code 1)" and failed.exit_code == 1
    code, stdout, _ = daemon.cli("tasks", "get", failed.id, "-o", "json")
    assert code == 0 and TaskRun.model_validate_json(stdout).status is TaskStatus.FAILED
    # `cirrus get` of a task API says how its last run ended.
    expected = f"last run {failed.id} failed (ValueError: not yet: attempt 2 (exit code 1))"
    assert client.get("train").message == expected
    # async def run(config) works too.
    marker = tmp_path / "async.txt"
    run = client.wait_task(client.submit_task("atrain", {"out": str(marker)}).id, timeout=60)
    assert run.status is TaskStatus.SUCCEEDED and marker.read_text() == "async ran"
    # A class without run(config): the load error, without retries.
    run = client.wait_task(client.submit_task("norun").id, timeout=60)
    assert run.status is TaskStatus.FAILED and "has none: define `def run(self, config)`" in (run.reason or "")


def test_a_command_task_passes_its_exit_code_and_config(daemon: Cirrus, tmp_path: Path) -> None:
    client = _deployed(daemon, tmp_path)
    ok = client.wait_task(client.submit_task("cmd", {"x": [1, 2]}).id, timeout=60)
    assert ok.status is TaskStatus.SUCCEEDED and ok.exit_code == 0 and ok.timeout_s == 60
    assert f"command got {{'x': [1, 2]}} as {ok.id}" in client.task_logs(ok.id)
    bad = client.wait_task(client.submit_task("cmd", {"code": 7}).id, timeout=60)
    assert bad.status is TaskStatus.FAILED and bad.exit_code == 7 and bad.reason == "exited with code 7"
    code, listing, _ = daemon.cli("tasks", "list", "cmd")
    assert code == 0 and ok.id in listing and bad.id in listing and "exited with code 7" in listing
    assert client.get("cmd").message == f"last run {bad.id} failed (exited with code 7)"

    async def through_the_async_client() -> TaskRun:
        async with AsyncClient(daemon.settings) as aclient:
            run = await aclient.submit_task("cmd", {"code": 0}, timeout_s=30, retries=0)
            assert run.id in [r.id for r in await aclient.tasks("cmd")]
            return await aclient.wait_task(run.id, timeout=60)

    ended = asyncio.run(through_the_async_client())
    assert ended.status is TaskStatus.SUCCEEDED and ended.timeout_s == 30
    # Deleting the API cancels its running runs.
    running = client.submit_task("cmd", {"sleep": 60})
    _wait_until(lambda: "command got" in client.task_logs(running.id))
    client.delete("cmd")
    assert client.wait_task(running.id, timeout=30).status is TaskStatus.CANCELLED


def test_timeout_and_cancel_stop_the_process(daemon: Cirrus, tmp_path: Path) -> None:
    client = _deployed(daemon, tmp_path)
    out = tmp_path / "out.jsonl"
    started = time.monotonic()
    code, stdout, _ = daemon.cli(
        "tasks", "submit", "train", "--config", json.dumps({"sleep": 60, "out": str(out)}), "--timeout", "1", "--wait"
    )
    assert code == 1 and "timed_out" in stdout
    run = client.tasks("train")[0]
    assert run.status is TaskStatus.TIMED_OUT and run.reason == "timed out after 1s" and run.attempts == 1
    assert time.monotonic() - started < 20
    assert not pid_alive(_lines(out)[0]["pid"])
    # Cancel a running command: SIGTERM reaches the command; the run is cancelled, not retried.
    run = client.submit_task("cmd", {"sleep": 60})
    _wait_until(lambda: "command got" in client.task_logs(run.id))
    pid = client.task(run.id).pid
    assert pid is not None and pid_alive(pid)
    code, stdout, stderr = daemon.cli("tasks", "cancel", run.id)
    assert code == 0, stderr
    ended = client.wait_task(run.id, timeout=30)
    assert ended.status is TaskStatus.CANCELLED and ended.reason == "cancelled" and ended.attempts == 1
    assert not pid_alive(pid)
    # A run that does not fit waits as pending with the reason; cancelled, it never starts.
    pending = client.submit_task("huge")
    waiting = _wait_until(lambda: (r := client.task(pending.id)).reason != "waiting to start" and r)
    assert waiting.status is TaskStatus.PENDING and "cpu" in (waiting.reason or ""), waiting
    cancelled = client.cancel_task(pending.id)
    assert cancelled.status is TaskStatus.CANCELLED and cancelled.attempts == 0
    with pytest.raises(CirrusError, match="already ended: cancelled"):
        client.cancel_task(pending.id)


def test_bad_input_gets_clear_errors(daemon: Cirrus, tmp_path: Path) -> None:
    client = _deployed(daemon, tmp_path)
    token = daemon.settings.token_file.read_text().strip()
    http = httpx.Client(base_url=daemon.info.admin_url, headers={"authorization": f"Bearer {token}"})
    cases: list[tuple[str, str, Any, int, str]] = [
        ("POST", "/v1/apis/nope/tasks", {}, 404, "no API named 'nope'"),
        ("POST", "/v1/apis/echo/tasks", {}, 400, "echo is a realtime API, not a task API"),
        ("POST", "/v1/apis/train/tasks", {"timeout_s": -1}, 400, "timeout_s: Input should be greater than 0"),
        ("POST", "/v1/apis/train/tasks", {"retries": -1}, 400, "retries: Input should be greater than or equal to 0"),
        ("POST", "/v1/apis/train/tasks", {"config": [1]}, 400, "config: Input should be a valid dictionary"),
        ("POST", "/v1/apis/train/tasks", {"confg": {}}, 400, "confg: unknown field"),
        ("POST", "/v1/apis/train/tasks", {"config": {"x": "y" * (1 << 20)}}, 400, "at most 1048576"),
        ("GET", "/v1/tasks/task-000000000000", None, 404, "no task run with id"),
        ("POST", "/v1/tasks/task-000000000000/cancel", None, 404, "no task run with id"),
        ("GET", "/v1/tasks/task-000000000000/logs", None, 404, "no task run with id"),
    ]
    for method, path, body, status, message in cases:
        answer = http.request(method, path, json=body)
        assert answer.status_code == status and message in answer.json()["error"], (path, body, answer.text)
    answer = http.post("/v1/apis/train/tasks", content=b"{not json")
    assert answer.status_code == 400 and "must be a JSON object" in answer.json()["error"]
    http.close()
    for args, message in [
        (("tasks", "submit", "train", "--config", "{oops"), "--config is not valid JSON"),
        (("tasks", "submit", "train", "--config", "[1]"), "--config must be a JSON object"),
        (("tasks", "submit", "train", "--timeout", "-5"), "--timeout must be a positive number"),
        (("tasks", "submit", "nope"), "no API named 'nope'"),
        (("tasks", "submit", "echo"), "not a task API"),
        (("tasks", "get", "task-000000000000"), "no task run with id"),
    ]:
        code, _, stderr = daemon.cli(*args)
        assert code == 1 and message in stderr, (args, stderr)
    assert client.tasks() == []  # nothing was recorded
    run = client.wait_task(client.submit_task("train").id, timeout=60)
    code, _, stderr = daemon.cli("logs", "cmd", "--task", run.id)
    assert code == 1 and f"a run of train, not cmd: cirrus logs train --task {run.id}" in stderr


def test_runs_waiting_and_runs_kept_are_bounded(tmp_path: Path) -> None:
    with module_daemon(tmp_path / "home", CIRRUS_TASK_RUNS_WAITING="2", CIRRUS_TASK_RUNS_KEPT="2") as daemon:
        client = _deployed(daemon, tmp_path)
        slow = [client.submit_task("train", {"sleep": 30}) for _ in range(2)]
        with pytest.raises(CirrusError, match="train has 2 runs pending or running, the most it may have") as info:
            client.submit_task("train")
        assert info.value.status == 429
        for run in slow:
            client.cancel_task(run.id)
        ended = [client.wait_task(run.id, timeout=30) for run in slow]  # (cancelled while starting, too)
        assert [r.status for r in ended] == [TaskStatus.CANCELLED] * 2
        quick = [client.wait_task(client.submit_task("train").id, timeout=30) for _ in range(2)]
        assert [r.status for r in quick] == [TaskStatus.SUCCEEDED] * 2
        # The two newest ended runs are kept; the older ones and their logs are gone.
        assert [r.id for r in client.tasks("train")] == [quick[1].id, quick[0].id]
        logs = daemon.home / "logs" / "train"
        assert {p.name for p in logs.glob("*.log")} == {f"{r.replica_id}.log" for r in quick}
        with pytest.raises(CirrusError, match="no task run with id"):
            client.task(ended[0].id)
