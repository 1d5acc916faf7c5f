"""The pure decisions of task runs (cirrus/tasks.py), their store, and the process identity checks
(cirrus/control/task_procs.py) on real processes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cirrus.control.task_procs import (
    attempt_state_path,
    end_attempt,
    group_members,
    read_outcome,
    read_pid_file,
    same_process,
)
from cirrus.control.tasks import TaskStore
from cirrus.tasks import (
    MAX_CONFIG_BYTES,
    MAX_INTERRUPTIONS,
    Outcome,
    TaskError,
    TaskRequest,
    TaskRun,
    TaskStatus,
    boot_id,
    cancelled_pending,
    new_run,
    parse_outcome,
    proc_stat,
    settle,
    timed_out,
)

NOW = 1_000.0


def _running(**fields: object) -> TaskRun:
    run = new_run("train", 3, TaskRequest(config={"epochs": 2}), 60.0, 2, NOW)
    update = {"status": TaskStatus.RUNNING, "attempts": 1, "attempt_started_at": NOW, "pid": 42, **fields}
    return run.model_copy(update=update)


def test_a_new_run_takes_the_spec_defaults_unless_the_request_says() -> None:
    run = new_run("train", 3, TaskRequest(), 60.0, 2, NOW)
    assert (run.status, run.timeout_s, run.retries, run.attempts) == (TaskStatus.PENDING, 60.0, 2, 0)
    assert run.replica_id == f"train-{run.id}" and run.id.startswith("task-")
    run = new_run("train", 3, TaskRequest(timeout_s=5, retries=0), 60.0, 2, NOW)
    assert (run.timeout_s, run.retries) == (5, 0)
    with pytest.raises(TaskError, match=f"at most {MAX_CONFIG_BYTES}"):
        new_run("train", 3, TaskRequest(config={"x": "y" * MAX_CONFIG_BYTES}), None, 0, NOW)


def test_success_ends_the_run() -> None:
    run = settle(_running(), Outcome(code=0), NOW + 5)
    assert run.status is TaskStatus.SUCCEEDED and run.reason == "exited with code 0" and run.ended_at == NOW + 5
    assert run.pid is None and run.attempt_started_at is None and run.exit_code == 0


def test_failures_are_retried_within_the_budget_then_fail() -> None:
    run = settle(_running(), Outcome(code=1, error="ValueError: boom"), NOW)
    assert run.status is TaskStatus.PENDING and run.failures == 1 and run.ended_at is None
    assert run.reason == "attempt 1 failed (ValueError: boom (exit code 1)); retry 1 of 2"
    run = settle(run.model_copy(update={"status": TaskStatus.RUNNING, "attempts": 2}), Outcome(signal=9), NOW)
    assert (
        run.status is TaskStatus.PENDING and run.failures == 2 and "killed by signal 9 (SIGKILL)" in (run.reason or "")
    )
    run = settle(run.model_copy(update={"status": TaskStatus.RUNNING, "attempts": 3}), Outcome(code=3), NOW)
    assert run.status is TaskStatus.FAILED and run.failures == 3 and run.reason == "exited with code 3"
    assert run.exit_code == 3 and run.ended_at == NOW


def test_a_stop_asked_for_decides_unless_the_attempt_succeeded_first() -> None:
    cancelled = settle(_running(stopping=TaskStatus.CANCELLED), Outcome(signal=15), NOW)
    assert cancelled.status is TaskStatus.CANCELLED and cancelled.reason == "cancelled" and cancelled.failures == 0
    late = settle(_running(stopping=TaskStatus.CANCELLED), Outcome(code=0), NOW)
    assert late.status is TaskStatus.SUCCEEDED
    timed = settle(_running(stopping=TaskStatus.TIMED_OUT, timeout_s=5.0), Outcome(signal=15), NOW)
    assert timed.status is TaskStatus.TIMED_OUT and timed.reason == "timed out after 5s"
    # Not retried, even with retries left.
    assert timed.retries == 2 and timed.status.finished


def test_an_attempt_the_daemon_stopped_runs_again_without_counting_as_a_failure() -> None:
    run = settle(_running(), Outcome(signal=15, interrupted=True), NOW)
    assert run.status is TaskStatus.PENDING and run.failures == 0 and run.interruptions == 1
    assert "stopped with the daemon" in (run.reason or "")
    worn = _running(interruptions=MAX_INTERRUPTIONS, retries=0)
    assert settle(worn, Outcome(signal=15, interrupted=True), NOW).status is TaskStatus.FAILED


def test_a_lost_attempt_is_a_failure() -> None:
    run = settle(_running(retries=0), Outcome(lost="it ended unseen"), NOW)
    assert run.status is TaskStatus.FAILED and run.reason == "lost: it ended unseen"


def test_timed_out_only_when_running_past_the_timeout_with_no_stop_asked() -> None:
    run = _running(timeout_s=5.0)
    assert not timed_out(run, NOW + 5.0) and timed_out(run, NOW + 5.1)
    assert not timed_out(run.model_copy(update={"stopping": TaskStatus.CANCELLED}), NOW + 10)
    assert not timed_out(run.model_copy(update={"timeout_s": None}), NOW + 1e6)
    assert not timed_out(run.model_copy(update={"status": TaskStatus.PENDING}), NOW + 10)


def test_cancelling_a_pending_run_ends_it() -> None:
    run = cancelled_pending(new_run("train", 1, TaskRequest(), None, 0, NOW), NOW + 1)
    assert run.status is TaskStatus.CANCELLED and run.attempts == 0 and run.ended_at == NOW + 1


def test_result_files_are_checked() -> None:
    assert parse_outcome({"code": 1, "signal": None, "error": "E: x"}) == Outcome(code=1, error="E: x")
    assert parse_outcome({"code": 0}) == Outcome(code=0)
    for bad in (None, [], {"code": "1"}, {"code": True}, {}):
        assert parse_outcome(bad) is None


def test_the_store_keeps_runs_and_finds_the_unfinished(tmp_path: Path) -> None:
    store = TaskStore(tmp_path / "state.db")
    first = new_run("a", 1, TaskRequest(config={"k": [1]}), None, 0, NOW)
    second = new_run("b", 1, TaskRequest(), None, 0, NOW + 1)
    store.save(first)
    store.save(second)
    store.save(settle(second.model_copy(update={"status": TaskStatus.RUNNING}), Outcome(code=0), NOW + 2))
    store.close()
    reopened = TaskStore(tmp_path / "state.db")
    assert [r.id for r in reopened.recent()] == [second.id, first.id]
    assert [r.id for r in reopened.recent("a")] == [first.id]
    assert [r.id for r in reopened.unfinished()] == [first.id]
    assert reopened.get(first.id) == first and reopened.get("task-nope") is None
    reopened.close()


def test_the_store_keeps_the_newest_ended_runs_of_an_api(tmp_path: Path) -> None:
    store = TaskStore(tmp_path / "state.db")
    ended = [
        settle(
            new_run("a", 1, TaskRequest(), None, 0, NOW + i).model_copy(update={"status": TaskStatus.RUNNING}),
            Outcome(code=0),
            NOW + i,
        )
        for i in range(5)
    ]
    waiting = new_run("a", 1, TaskRequest(), None, 0, NOW - 10)  # the oldest, but not ended: kept
    other = settle(
        new_run("b", 1, TaskRequest(), None, 0, NOW - 20).model_copy(update={"status": TaskStatus.RUNNING}),
        Outcome(code=1),
        NOW,
    )
    for run in [*ended, waiting, other]:
        store.save(run)
    assert [r.id for r in store.prune("a", 2)] == [r.id for r in reversed(ended[:3])]
    assert [r.id for r in store.recent("a")] == [ended[4].id, ended[3].id, waiting.id]
    assert [r.id for r in store.recent("b")] == [other.id] and store.prune("a", 2) == []
    store.close()


def test_a_process_is_known_by_pid_start_time_and_boot(tmp_path: Path) -> None:
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True)
    try:
        stat = proc_stat(child.pid)
        assert stat is not None and stat.pgid == child.pid
        assert same_process(child.pid, stat.start, boot_id())
        assert not same_process(child.pid, stat.start + 1, boot_id())  # a reused pid: another process
        assert not same_process(child.pid, stat.start, "another-boot")
        assert group_members(child.pid, stat.start) == [child.pid]
        assert group_members(child.pid, stat.start + 1) == []  # older than the attempt: not its own
        assert end_attempt(child.pid, stat.start, boot_id(), 5.0)
        assert child.wait(5) == -signal.SIGTERM
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert not same_process(child.pid, stat.start, boot_id())


def test_end_attempt_kills_what_ignores_sigterm_and_leaves_others_alone(tmp_path: Path) -> None:
    stubborn = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(60)"
    child = subprocess.Popen([sys.executable, "-c", stubborn], start_new_session=True)
    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True)
    try:
        time.sleep(0.3)  # SIGTERM ignored from here on
        stat = proc_stat(child.pid)
        assert stat is not None
        assert end_attempt(child.pid, stat.start, boot_id(), 0.5)
        assert child.wait(5) == -signal.SIGKILL
        assert bystander.poll() is None
    finally:
        for proc in (child, bystander):
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def test_state_files_of_an_attempt(tmp_path: Path) -> None:
    state = attempt_state_path(tmp_path, "task-abc", 2)
    assert read_pid_file(state) is None and read_outcome(state) is None
    state.with_suffix(".pid").write_text(f'{{"pid": {os.getpid()}, "start": 5, "boot_id": "b"}}')
    state.with_suffix(".json").write_text('{"code": 0, "signal": null, "error": null}')
    assert read_pid_file(state) == (os.getpid(), 5, "b") and read_outcome(state) == Outcome(code=0)
    state.with_suffix(".json").write_text("x" * 100_000)
    assert read_outcome(state) is None
