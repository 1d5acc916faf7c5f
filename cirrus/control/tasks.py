"""Task runs on the control plane: their records (in the state database) and the task runner.

Each run of a `kind: task` API (`cirrus tasks submit`) starts as `pending`; the runner starts it once
the revision may start (`Controller.start_gate`: models fetched, environment built) and the runtime
finds room for its `compute` (until then its `reason` says why it waits), as one replica that makes
the run and exits. The replica's end settles the run (`cirrus.tasks.settle`): succeeded, failed,
retried as a new attempt within its `retries`, or stopped (cancelled, timed out).

Every change is written before it takes effect, so a daemon restart finds each run where it was. A
run `running` when the daemon died is re-attached when its process still lives and is provably the
same one (pid, start time, boot: `cirrus/control/task_procs.py`); otherwise what it left (its result
file, or nothing: a failure) settles it. A daemon that stops cleanly stops its runs first and runs
them again when it starts (not counted against their retries). No attempt starts while anything of
the previous one still lives: every attempt runs as the same replica id, one after another, and what
is left of the last one is killed (by pid, identity checked) before the next one starts.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from collections import Counter
from collections.abc import Coroutine
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgspec

from cirrus.control.statedb import StateTables
from cirrus.control.task_procs import (
    attempt_state_path,
    end_attempt,
    group_members,
    read_outcome,
    read_pid_file,
    remove_state,
    same_process,
    signal_attempt,
)
from cirrus.runtimes.base import ReplicaExit, Unplaceable
from cirrus.settings import DEFAULT_TASK_RUNS_KEPT, DEFAULT_TASK_RUNS_WAITING
from cirrus.tasks import (
    Outcome,
    TaskError,
    TaskRequest,
    TaskRun,
    TaskStatus,
    boot_id,
    cancelled_pending,
    new_run,
    proc_stat,
    settle,
    timed_out,
)
from cirrus.wire import ReplicaReady, TaskLaunch

if TYPE_CHECKING:
    from cirrus.control.controller import Controller
    from cirrus.control.store import StoredApi

log = logging.getLogger("cirrus.tasks")

STEP_S = 0.25  # runs are started, timed and watched this often
STOP_GRACE_S = 10.0  # a run told to stop (cancel, timeout, the daemon stopping) is killed after this long
LOST_WHILE_DOWN = "it ended while the daemon was not running, leaving no exit status"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS task_runs (
    id TEXT PRIMARY KEY,
    api TEXT NOT NULL,
    status TEXT NOT NULL,
    created_at REAL NOT NULL,
    data TEXT NOT NULL              -- the whole TaskRun as JSON
);
CREATE INDEX IF NOT EXISTS task_runs_by_api ON task_runs (api, created_at);
CREATE INDEX IF NOT EXISTS task_runs_unfinished ON task_runs (status) WHERE status IN ('pending', 'running');
"""


class TaskNotFound(LookupError):
    pass


class TaskConflict(Exception):
    """The run cannot do that now (e.g. cancel a run that has ended)."""


class TooManyRuns(Exception):
    """An API has as many runs pending or running as it may (`TaskRunner.max_waiting`)."""


class TaskStore(StateTables):
    """Task runs in the control plane's state database (beside the APIs, revisions and jobs)."""

    SCHEMA = _SCHEMA

    def save(self, run: TaskRun) -> None:
        self._db.execute(
            "INSERT INTO task_runs (id, api, status, created_at, data) VALUES (?, ?, ?, ?, ?) "
            "ON CONFLICT(id) DO UPDATE SET status = excluded.status, data = excluded.data",
            (run.id, run.api, run.status.value, run.created_at, run.model_dump_json()),
        )

    def get(self, run_id: str) -> TaskRun | None:
        rows = self._db.fetchall("SELECT data FROM task_runs WHERE id = ?", (run_id,))
        return None if not rows else TaskRun.model_validate_json(str(rows[0][0]))

    def recent(self, api: str | None = None, limit: int = 1000) -> list[TaskRun]:
        """Newest first."""
        if api is None:
            rows = self._db.fetchall("SELECT data FROM task_runs ORDER BY created_at DESC LIMIT ?", (limit,))
        else:
            rows = self._db.fetchall(
                "SELECT data FROM task_runs WHERE api = ? ORDER BY created_at DESC LIMIT ?", (api, limit)
            )
        return [TaskRun.model_validate_json(str(data)) for (data,) in rows]

    def prune(self, api: str, keep: int) -> list[TaskRun]:
        """Remove the API's ended runs but the newest `keep`; the runs removed."""
        rows = self._db.fetchall(
            "SELECT data FROM task_runs WHERE api = ? AND status NOT IN ('pending', 'running') "
            "ORDER BY created_at DESC LIMIT -1 OFFSET ?",
            (api, keep),
        )
        runs = [TaskRun.model_validate_json(str(data)) for (data,) in rows]
        for run in runs:
            self._db.execute("DELETE FROM task_runs WHERE id = ?", (run.id,))
        return runs

    def unfinished(self) -> list[TaskRun]:
        rows = self._db.fetchall(
            "SELECT data FROM task_runs WHERE status IN ('pending', 'running') ORDER BY created_at"
        )
        return [TaskRun.model_validate_json(str(data)) for (data,) in rows]


class TaskRunner:
    """Starts, watches, stops and retries task runs; hears their replicas' runtime events through the
    controller (`Controller.tasks`). `results_dir` is where attempts record themselves."""

    def __init__(
        self,
        controller: Controller,
        store: TaskStore,
        results_dir: Path,
        max_waiting: int = DEFAULT_TASK_RUNS_WAITING,
        keep_ended: int = DEFAULT_TASK_RUNS_KEPT,
    ) -> None:
        self.controller = controller
        self.store = store
        self.results_dir = results_dir
        self.max_waiting = max_waiting  # runs of one API pending or running at most (more: TooManyRuns)
        self.keep_ended = keep_ended  # ended runs of one API kept, with their logs
        self.active: dict[str, TaskRun] = {}  # unfinished runs, by id
        self._by_replica: dict[str, str] = {}  # replica id -> run id, while an attempt runs
        self._reattached: set[str] = set()  # runs whose process an earlier daemon started (watched by pid)
        self._leftovers: dict[str, tuple[int, int]] = {}  # run id -> (pgid, start) of an ended attempt's orphans
        self._stopping = False
        self._background: set[asyncio.Task[None]] = set()
        self._wake = asyncio.Event()

    # --- requests ---------------------------------------------------------------------------
    def submit(self, api: str, request: TaskRequest) -> TaskRun:
        """A new pending run of `api`'s current revision. LookupError: no such API; TaskError: not a
        task API, or a bad request."""
        state = self.controller.apis.get(api)
        if state is None or state.deleted:
            raise TaskNotFound(f"no API named {api!r}")
        spec = state.stored.deployment.spec
        if spec.kind != "task":
            raise TaskError(f"{api} is a {spec.kind} API, not a task API: only `kind: task` APIs take task runs")
        waiting = sum(1 for r in self.active.values() if r.api == api)
        if waiting >= self.max_waiting:
            raise TooManyRuns(
                f"{api} has {waiting} runs pending or running, the most it may have; "
                "wait for some to end, or cancel some (cirrus tasks list / cancel)"
            )
        task = spec.task
        run = new_run(
            api,
            state.stored.revision,
            request,
            task.timeout_s if task is not None else None,
            task.retries if task is not None else 0,
            time.time(),
        )
        self.store.save(run)
        self.active[run.id] = run
        log.info("%s: task run %s submitted", api, run.id)
        self._wake.set()
        return run

    def get(self, run_id: str) -> TaskRun:
        run = self.active.get(run_id) or self.store.get(run_id)
        if run is None:
            raise TaskNotFound(f"no task run with id {run_id!r}")
        return run

    def summary(self, api: str) -> str:
        """`cirrus get` of a task API: its runs going now, and how the last one ended."""
        runs = self.store.recent(api, limit=100)
        going = Counter(r.status.value for r in runs if not r.status.finished)
        parts = [f"{n} {status}" for status, n in sorted(going.items())]
        last = next((r for r in runs if r.status.finished), None)
        if last is not None:
            parts.append(f"last run {last.id} {last.status.value}" + (f" ({last.reason})" if last.reason else ""))
        return "; ".join(parts) if parts else f"no runs yet; run it with `cirrus tasks submit {api}`"

    def recent(self, api: str | None = None) -> list[TaskRun]:
        return self.store.recent(api)

    def cancel(self, run_id: str) -> TaskRun:
        """Cancel a run: a pending one at once; a running one is stopped (SIGTERM, then SIGKILL) and
        is `cancelled` once its process is gone. TaskConflict: it has ended."""
        run = self.get(run_id)
        if run.status.finished:
            raise TaskConflict(f"task run {run_id} already ended: {run.status.value}")
        if run.status is TaskStatus.PENDING:
            self.controller.runtime.unreserve(run.replica_id)
            self._save(cancelled_pending(run, time.time()))
            return self.get(run_id)
        self._stop(run, TaskStatus.CANCELLED)
        return self.get(run_id)

    # --- the loop ---------------------------------------------------------------------------
    async def run(self) -> None:
        while not self._stopping:
            self._wake.clear()
            try:
                self.step()
            except Exception:
                log.exception("stepping the task runs failed")
            try:
                await asyncio.wait_for(self._wake.wait(), STEP_S)
            except TimeoutError:
                pass

    def step(self) -> None:
        """Start what may start, stop what ran too long, notice re-attached runs that ended."""
        now = time.time()
        for run in list(self.active.values()):
            if run.status is TaskStatus.PENDING:
                self._try_start(run)
            elif run.status is TaskStatus.RUNNING:
                if timed_out(run, now):
                    log.info("%s: task run %s timed out after %gs; stopping it", run.api, run.id, run.timeout_s)
                    self._stop(run, TaskStatus.TIMED_OUT)
                elif run.stopping is None and self._stored(run) is None:
                    log.info("%s: the API was deleted; cancelling its task run %s", run.api, run.id)
                    self._stop(run, TaskStatus.CANCELLED)
                if run.id in self._reattached and not same_process(run.pid, run.pid_start, run.boot_id):
                    self._reattached.discard(run.id)
                    self._ended(run, None)

    def _save(self, run: TaskRun) -> None:
        self.store.save(run)
        if run.status.finished:
            self.active.pop(run.id, None)
        else:
            self.active[run.id] = run

    def _stored(self, run: TaskRun) -> StoredApi | None:
        state = self.controller.apis.get(run.api)
        if state is None or state.deleted:
            return None
        if state.stored.revision == run.revision:
            return state.stored
        return self.controller.store.revision(run.api, run.revision)

    def _try_start(self, run: TaskRun) -> None:
        left = self._leftovers.get(run.id)
        if left is not None:
            if group_members(*left):  # killed already; an attempt never starts beside them
                self._wait(run, "waiting for the processes of the previous attempt to exit")
                return
            del self._leftovers[run.id]
        stored = self._stored(run)
        if stored is None:
            update = {"status": TaskStatus.FAILED, "reason": "the API was deleted", "ended_at": time.time()}
            self._save(run.model_copy(update=update))
            return
        paths, waiting = self.controller.start_gate(stored)
        if paths is None:
            self._wait(run, waiting or "waiting to start")
            return
        placed = self.controller.runtime.reserve(run.replica_id, stored.deployment.spec.compute)
        if isinstance(placed, Unplaceable):
            self._wait(run, placed.reason)
            return
        attempt = run.attempts + 1
        now = time.time()
        started = run.model_copy(
            update={
                "status": TaskStatus.RUNNING,
                "attempts": attempt,
                "attempt_started_at": now,
                "started_at": run.started_at or now,
                "reason": None,
            }
        )
        self._save(started)  # before the process exists: a restart then looks for it
        self._by_replica[run.replica_id] = run.id
        self._spawn(self._start(started, stored, paths))

    def _forget_old_runs(self, api: str) -> None:
        """Keep the newest `keep_ended` ended runs of an API, and their logs."""
        for old in self.store.prune(api, self.keep_ended):
            log_path = self.controller.runtime.log_path(api, old.replica_id)
            for path in (log_path, log_path.with_name(log_path.name + ".1")):
                with contextlib.suppress(OSError):
                    path.unlink()

    def _wait(self, run: TaskRun, reason: str) -> None:
        if run.reason != reason:
            self._save(run.model_copy(update={"reason": reason}))

    async def _start(self, run: TaskRun, stored: StoredApi, models: dict[str, str]) -> None:
        spec = stored.deployment.spec
        state = attempt_state_path(self.results_dir, run.id, run.attempts)
        try:
            self.results_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            remove_state(state)
            launch, env = self.controller._launch_for(stored, run.replica_id, models=models)
            command = spec.task.command if spec.task is not None else None
            task = TaskLaunch(task_id=run.id, attempt=run.attempts, config=run.config, command=command)
            launch = msgspec.structs.replace(launch, task=task)
            env = {
                **env,
                "CIRRUS_TASK_STATE": str(state),
                "CIRRUS_TASK_ID": run.id,
                "CIRRUS_TASK_ATTEMPT": str(run.attempts),
            }
            pid = await self.controller.runtime.start(launch, env)
        except Exception as exc:
            log.exception("%s: cannot start task run %s", run.api, run.id)
            self._ended(self.active.get(run.id, run), Outcome(error=f"the runtime could not start it: {exc}"))
            return
        current = self.active.get(run.id)
        if current is None or current.status is not TaskStatus.RUNNING or pid is None:
            return
        if current.stopping is not None:  # cancelled (or timed out) while it started: the stop found no process
            self._spawn(self.controller.runtime.stop(run.replica_id, STOP_GRACE_S))
        stat = proc_stat(pid)
        self._save(
            current.model_copy(update={"pid": pid, "pid_start": stat.start if stat else None, "boot_id": boot_id()})
        )
        log.info("%s: task run %s attempt %d started (pid %d)", run.api, run.id, run.attempts, pid)

    def _stop(self, run: TaskRun, why: TaskStatus) -> None:
        """Ask a running attempt to stop (`why`: cancelled, timed_out); it settles when its process is gone."""
        if run.stopping is not None:
            return
        run = run.model_copy(update={"stopping": why})
        self._save(run)
        if run.id in self._reattached:
            self._spawn(asyncio.to_thread(end_attempt, run.pid, run.pid_start, run.boot_id, STOP_GRACE_S))
        else:
            self._spawn(self.controller.runtime.stop(run.replica_id, STOP_GRACE_S))

    def _ended(self, run: TaskRun, outcome: Outcome | None) -> None:
        """The running attempt's process is gone: settle the run with what it left (`outcome`: what the
        runtime saw, when it saw it)."""
        state = attempt_state_path(self.results_dir, run.id, run.attempts)
        written = read_outcome(state)
        if written is not None:
            outcome = written  # its own record says more (the exception's last line)
        elif outcome is None:
            outcome = Outcome(lost=LOST_WHILE_DOWN)
        if self._stopping and not outcome.ok:  # stopped with the daemon (a command's own exit on SIGTERM too)
            outcome = Outcome(code=outcome.code, signal=outcome.signal, error=outcome.error, interrupted=True)
        pid, start = run.pid, run.pid_start  # whatever the attempt left in its group is killed
        if pid is not None and start is not None and signal_attempt(pid, start, run.boot_id, signal.SIGKILL):
            self._leftovers[run.id] = (pid, start)
        self._by_replica.pop(run.replica_id, None)
        self._reattached.discard(run.id)
        settled = settle(run, outcome, time.time())
        self._save(settled)
        remove_state(state)
        if settled.status.finished:
            self._forget_old_runs(run.api)
        log.info(
            "%s: task run %s attempt %d: %s -> %s",
            run.api,
            run.id,
            run.attempts,
            outcome.describe().splitlines()[0],
            settled.status.value,
        )
        self._wake.set()

    # --- runtime events (forwarded by the controller) -------------------------------------
    def replica_ready(self, replica_id: str, report: ReplicaReady) -> None:
        run_id = self._by_replica.get(replica_id)
        if run_id is not None:
            log.info("task run %s is running (pid %d)", run_id, report.pid)

    def replica_exited(self, replica_id: str, exit: ReplicaExit) -> None:
        run = self.active.get(self._by_replica.get(replica_id, ""))
        if run is None or run.status is not TaskStatus.RUNNING:
            return
        error = exit.error and f"the predictor failed to load: {exit.error}"
        self._ended(run, Outcome(code=exit.code, signal=exit.signal, error=error, lost=exit.lost))

    # --- restarts -------------------------------------------------------------------------
    def restore(self) -> None:
        """After a daemon restart: re-attach each run whose process still lives; settle the others."""
        for run in self.store.unfinished():
            self.active[run.id] = run
            if run.status is not TaskStatus.RUNNING:
                continue
            if run.pid is None:  # the daemon died as it started it: the replica may have recorded itself
                recorded = read_pid_file(attempt_state_path(self.results_dir, run.id, run.attempts))
                if recorded is not None:
                    run = run.model_copy(update={"pid": recorded[0], "pid_start": recorded[1], "boot_id": recorded[2]})
                    self._save(run)
            if same_process(run.pid, run.pid_start, run.boot_id):
                log.info("%s: task run %s re-attached (attempt %d, pid %s)", run.api, run.id, run.attempts, run.pid)
                self._reattached.add(run.id)
                self._by_replica[run.replica_id] = run.id
                if run.stopping is not None:
                    self._spawn(asyncio.to_thread(end_attempt, run.pid, run.pid_start, run.boot_id, STOP_GRACE_S))
            else:
                self._ended(run, None)
        self._wake.set()

    async def shutdown(self) -> None:
        """Stop every running attempt (they run again when the daemon starts) before the runtime closes."""
        self._stopping = True
        self._wake.set()
        stops: list[Coroutine[Any, Any, Any]] = []
        for run in list(self.active.values()):
            if run.status is not TaskStatus.RUNNING:
                continue
            if run.id in self._reattached:
                stops.append(asyncio.to_thread(end_attempt, run.pid, run.pid_start, run.boot_id, STOP_GRACE_S))
            else:
                stops.append(self.controller.runtime.stop(run.replica_id, STOP_GRACE_S))
        await asyncio.gather(*stops, return_exceptions=True)
        for run_id in list(self._reattached):
            left = self.active.get(run_id)
            if left is not None:
                self._ended(left, None)
        for task in list(self._background):
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)

    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
