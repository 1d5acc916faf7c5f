"""A `kind: task` replica: one attempt of one run, then exit (0: succeeded).

It reports on the status pipe as every replica does (`ReplicaReady` once it runs, `ReplicaFailed`
when the predictor does not load), then calls the predictor's `run(config)` (sync or async; the
class is constructed like any predictor's, with `config`, `models`, `model_path` as it asks), or runs
the spec's `task.command` as a child with $CIRRUS_TASK_CONFIG (JSON) and $CIRRUS_TASK_ID, passing
its exit code through. A failure's traceback goes to the log.

Because the daemon may be restarted while a run goes on, the replica records itself where the daemon
finds it again ($CIRRUS_TASK_STATE): `<state>.pid` (pid, start time, boot) at its start, and
`<state>.json` (exit code, signal, error) just before it exits. It does not exit when the daemon
goes away: the next daemon re-attaches to it.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
import os
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from cirrus.replica import path_with_our_bin, report_startup
from cirrus.wire import ReplicaFailed, ReplicaLaunch, ReplicaReady, TaskLaunch

log = logging.getLogger("cirrus.task")
STATE_ENV = "CIRRUS_TASK_STATE"
CHILD_STOP_GRACE_S = 10.0  # a command told to stop (SIGTERM) is killed after this long


def _write_json(path: Path, data: dict[str, Any]) -> None:
    """Atomically (a reader never sees half of it)."""
    partial = path.with_name(path.name + ".partial")
    try:
        partial.write_text(json.dumps(data))
        os.replace(partial, path)
    except OSError as exc:
        log.warning("cannot write %s: %s", path, exc)


def _record_start(state: Path | None) -> None:
    if state is None:
        return
    from cirrus.tasks import boot_id, proc_stat

    stat = proc_stat(os.getpid())
    _write_json(
        state.with_suffix(".pid"),
        {"pid": os.getpid(), "start": stat.start if stat else None, "boot_id": boot_id()},
    )


def _record_end(state: Path | None, code: int, sig: int | None = None, error: str | None = None) -> None:
    if state is not None:
        _write_json(state.with_suffix(".json"), {"code": code, "signal": sig, "error": error})


def _last_line(exc: BaseException) -> str:
    lines = traceback.format_exception_only(type(exc), exc)
    return (lines[-1] if lines else type(exc).__name__).strip()


def _load(launch: ReplicaLaunch) -> Any:
    """The predictor's instance; it must have a `run` method."""
    from cirrus.predictor import PredictorLoadError, _init_kwargs, import_predictor_file

    module = import_predictor_file(launch.project_dir, launch.predictor_path)
    cls = getattr(module, launch.class_name, None)
    if not isinstance(cls, type):
        raise PredictorLoadError(f"{launch.predictor_path} defines no class named {launch.class_name!r}")
    if not callable(getattr(cls, "run", None)):
        raise PredictorLoadError(
            f"a task API calls run(config), but {launch.class_name} has none: define `def run(self, config)` "
            "(or give the spec a task.command)"
        )
    return cls(**_init_kwargs(cls, launch.config, dict(launch.models)))


def _run_predictor(launch: ReplicaLaunch, task: TaskLaunch, status_fd: int, state: Path | None) -> int:
    started = time.perf_counter()
    try:
        instance = _load(launch)
    except BaseException as exc:
        log.error("the predictor failed to load:\n%s", traceback.format_exc())
        error = f"{type(exc).__name__}: {exc}"
        report_startup(status_fd, ReplicaFailed(error=error))
        _record_end(state, 1, error=f"the predictor failed to load: {_last_line(exc)}")
        return 1
    report_startup(status_fd, ReplicaReady(address="", pid=os.getpid(), load_s=time.perf_counter() - started))
    log.info(
        "task %s attempt %d of %s: running %s.run(config)", task.task_id, task.attempt, launch.api, launch.class_name
    )
    try:
        result = instance.run(task.config)
        if inspect.isawaitable(result):
            result = asyncio.run(_awaited(result))
    except BaseException as exc:
        log.error("run(config) failed:\n%s", traceback.format_exc())
        _record_end(state, 1, error=_last_line(exc))
        return 1
    if result is not None:
        log.info("run(config) returned: %.2000s", repr(result))
    log.info("task %s attempt %d succeeded", task.task_id, task.attempt)
    _record_end(state, 0)
    return 0


async def _awaited(awaitable: Any) -> Any:
    return await awaitable


def _run_command(launch: ReplicaLaunch, task: TaskLaunch, status_fd: int, state: Path | None) -> int:
    command = list(task.command or [])
    env = {**os.environ, "CIRRUS_TASK_CONFIG": json.dumps(task.config), "CIRRUS_TASK_ID": task.task_id}
    env["CIRRUS_TASK_ATTEMPT"] = str(task.attempt)
    env["PATH"] = path_with_our_bin()  # `python` in the command is the API's own environment's
    try:
        child = subprocess.Popen(command, cwd=launch.project_dir, env=env, stdin=subprocess.DEVNULL)
    except OSError as exc:
        error = f"cannot run {command[0]!r}: {exc.strerror or exc}"
        log.error("%s", error)
        report_startup(status_fd, ReplicaFailed(error=error, stage="start the command"))
        _record_end(state, 127, error=error)
        return 127
    report_startup(status_fd, ReplicaReady(address="", pid=os.getpid(), load_s=0.0))
    log.info(
        "task %s attempt %d of %s: running %s (pid %d)", task.task_id, task.attempt, launch.api, command, child.pid
    )

    def forward(signum: int, _frame: Any) -> None:
        try:
            child.send_signal(signum)
        except ProcessLookupError:
            pass

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, forward)
    code = child.wait()
    if code < 0:
        log.error("the command was killed by signal %d", -code)
        _record_end(state, 128 - code, sig=-code)
        return 128 - code
    (log.info if code == 0 else log.error)("the command exited with code %d", code)
    _record_end(state, code)
    return code


def run_task(launch: ReplicaLaunch, status_fd: int) -> int:
    """Make the launch's one attempt; the exit code (0: succeeded)."""
    task = launch.task
    if task is None:
        raise ValueError("not a task launch")
    raw_state = os.environ.get(STATE_ENV)
    state = Path(raw_state) if raw_state else None
    _record_start(state)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # the daemon going away does not end the run
    if task.command:
        code = _run_command(launch, task, status_fd, state)
    else:
        code = _run_predictor(launch, task, status_fd, state)
    sys.stdout.flush()
    sys.stderr.flush()
    return code
