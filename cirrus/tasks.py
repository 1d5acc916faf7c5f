"""Task runs (`kind: task`): the record of one run, the request that submits it, and the pure
decisions of its life: how an attempt's end settles the run (succeeded, retried, failed, cancelled,
timed out, or run again after the daemon stopped it), and when it has run too long.

The task runner (`cirrus/control/tasks.py`) owns the processes and the store; everything here is a
function of its inputs, tested without processes.
"""

from __future__ import annotations

import json
import secrets
import signal
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

MAX_CONFIG_BYTES = 1 << 20  # a run's config, as JSON, is at most this large
MAX_INTERRUPTIONS = 10  # a run the daemon's stops interrupted this often fails instead of running again
MAX_TIMEOUT_S = 30 * 86400.0
MAX_RETRIES = 100


class TaskError(ValueError):
    """A task request that cannot be run; the message says what is wrong."""


class TaskStatus(StrEnum):
    PENDING = "pending"  # waiting for its models, its environment, or room on the node (see `reason`)
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"
    TIMED_OUT = "timed_out"

    @property
    def finished(self) -> bool:
        return self not in (TaskStatus.PENDING, TaskStatus.RUNNING)


class TaskRequest(BaseModel):
    """POST /v1/apis/{name}/tasks: one run of a task API."""

    model_config = ConfigDict(extra="forbid")

    config: dict[str, Any] = Field(
        default_factory=dict, description="given to run(config) (or as $CIRRUS_TASK_CONFIG to the command)"
    )
    timeout_s: float | None = Field(
        None, gt=0, le=MAX_TIMEOUT_S, description="stop an attempt running longer (default: the spec's task.timeout_s)"
    )
    retries: int | None = Field(
        None, ge=0, le=MAX_RETRIES, description="run a failed run again this many times at most (default: the spec's)"
    )


class TaskRun(BaseModel):
    """One run of a task API, as stored and as the admin API answers."""

    id: str
    api: str
    revision: int
    config: dict[str, Any] = Field(default_factory=dict)
    status: TaskStatus = TaskStatus.PENDING
    reason: str | None = None  # why it is pending, or how it ended (exit code, signal, error, timeout ...)
    attempts: int = 0  # attempts started
    failures: int = 0  # attempts that failed (each failure within `retries` starts another attempt)
    retries: int = 0
    timeout_s: float | None = None  # of each attempt
    interruptions: int = 0  # attempts the daemon's own stop interrupted (they run again, not counted as failures)
    exit_code: int | None = None  # of the last attempt that ended with one
    created_at: float
    started_at: float | None = None  # the first attempt's start
    attempt_started_at: float | None = None
    ended_at: float | None = None
    stopping: TaskStatus | None = None  # cancelled / timed_out: asked for, until its process is gone
    replica_id: str  # the replica every attempt runs as, one after another (its log holds them all)
    pid: int | None = None  # of the running attempt's replica process
    pid_start: int | None = None  # that process's start time (/proc/PID/stat, clock ticks since boot)
    boot_id: str | None = None  # the boot that start time counts from


def new_run(
    api: str, revision: int, request: TaskRequest, default_timeout_s: float | None, default_retries: int, now: float
) -> TaskRun:
    """A pending run of `api` at `revision`; TaskError when its config is too large to store."""
    size = len(json.dumps(request.config, separators=(",", ":")))
    if size > MAX_CONFIG_BYTES:
        raise TaskError(f"config is {size} bytes as JSON; at most {MAX_CONFIG_BYTES} (pass large inputs by URL)")
    run_id = f"task-{secrets.token_hex(6)}"
    return TaskRun(
        id=run_id,
        api=api,
        revision=revision,
        config=request.config,
        retries=default_retries if request.retries is None else request.retries,
        timeout_s=default_timeout_s if request.timeout_s is None else request.timeout_s,
        created_at=now,
        replica_id=f"{api}-{run_id}",
        reason="waiting to start",
    )


@dataclass(frozen=True)
class Outcome:
    """How one attempt ended."""

    code: int | None = None  # its exit status
    signal: int | None = None  # the signal that ended it
    error: str | None = None  # the exception's last line, or why it could not start
    lost: str | None = None  # it ended unseen: its exit status is unknown
    interrupted: bool = False  # the daemon stopped it because the daemon itself was stopping

    @property
    def ok(self) -> bool:
        return self.code == 0 and self.error is None and self.signal is None and self.lost is None

    def describe(self) -> str:
        if self.error:
            return self.error if self.code is None else f"{self.error} (exit code {self.code})"
        if self.signal is not None:
            try:
                name = signal.Signals(self.signal).name
            except ValueError:
                name = str(self.signal)
            return f"killed by signal {self.signal} ({name})"
        if self.lost:
            return f"lost: {self.lost}"
        if self.code is None:
            return "exited (exit status unknown)"
        return f"exited with code {self.code}"


def settle(run: TaskRun, outcome: Outcome, now: float) -> TaskRun:
    """The run once its running attempt has ended with `outcome`: final, or pending again (a retry, or
    a run the daemon's stop interrupted). A stop asked for (cancel, timeout) decides the status unless
    the attempt succeeded before it took effect."""
    ended = {
        "pid": None,
        "pid_start": None,
        "boot_id": None,
        "stopping": None,
        "attempt_started_at": None,
        "exit_code": outcome.code if outcome.code is not None else run.exit_code,
    }
    if outcome.ok:
        return run.model_copy(
            update={**ended, "status": TaskStatus.SUCCEEDED, "reason": "exited with code 0", "ended_at": now}
        )
    if run.stopping is TaskStatus.CANCELLED:
        return run.model_copy(update={**ended, "status": TaskStatus.CANCELLED, "reason": "cancelled", "ended_at": now})
    if run.stopping is TaskStatus.TIMED_OUT:
        reason = f"timed out after {run.timeout_s:g}s" if run.timeout_s is not None else "timed out"
        return run.model_copy(update={**ended, "status": TaskStatus.TIMED_OUT, "reason": reason, "ended_at": now})
    if outcome.interrupted and run.interruptions < MAX_INTERRUPTIONS:
        reason = f"attempt {run.attempts} was stopped with the daemon; it runs again"
        return run.model_copy(
            update={**ended, "status": TaskStatus.PENDING, "reason": reason, "interruptions": run.interruptions + 1}
        )
    failures = run.failures + 1
    what = outcome.describe()
    if failures <= run.retries:
        reason = f"attempt {run.attempts} failed ({what.splitlines()[0]}); retry {failures} of {run.retries}"
        return run.model_copy(update={**ended, "status": TaskStatus.PENDING, "reason": reason, "failures": failures})
    return run.model_copy(
        update={**ended, "status": TaskStatus.FAILED, "reason": what, "failures": failures, "ended_at": now}
    )


def timed_out(run: TaskRun, now: float) -> bool:
    """Whether the running attempt has run past the run's timeout (and no stop is asked for yet)."""
    return (
        run.status is TaskStatus.RUNNING
        and run.stopping is None
        and run.timeout_s is not None
        and run.attempt_started_at is not None
        and now - run.attempt_started_at > run.timeout_s
    )


def cancelled_pending(run: TaskRun, now: float) -> TaskRun:
    """A pending run cancelled: it never starts (again)."""
    return run.model_copy(update={"status": TaskStatus.CANCELLED, "reason": "cancelled", "ended_at": now})


def parse_outcome(data: Any) -> Outcome | None:
    """The outcome a task replica wrote to its result file (None: not one)."""
    if not isinstance(data, dict):
        return None
    code, sig, error = data.get("code"), data.get("signal"), data.get("error")
    if not isinstance(code, int) or isinstance(code, bool):
        return None
    return Outcome(
        code=code,
        signal=sig if isinstance(sig, int) and not isinstance(sig, bool) else None,
        error=error[:4000] if isinstance(error, str) and error else None,
    )


# --- processes (Linux /proc; read only) ---------------------------------------------------------


@dataclass(frozen=True)
class ProcStat:
    state: str
    pgid: int
    start: int  # clock ticks since boot


def boot_id() -> str | None:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip() or None
    except OSError:
        return None


def proc_stat(pid: int) -> ProcStat | None:
    """/proc/PID/stat's state, process group and start time (None: no such process)."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (OSError, ValueError):
        return None
    fields = text.rpartition(")")[2].split()
    try:
        return ProcStat(state=fields[0], pgid=int(fields[2]), start=int(fields[19]))
    except (IndexError, ValueError):
        return None
