"""The local runtime: each replica is a subprocess with its own log file."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from cirrus.logs import tail_lines
from cirrus.runtimes.base import ReplicaExit, RuntimeEvents
from cirrus.wire import ReplicaFailed, ReplicaLaunch, ReplicaReady, decode_startup, encode_launch

log = logging.getLogger("cirrus.runtime")
LOG_TAIL_LINES = 20


@dataclass
class _Process:
    launch: ReplicaLaunch
    proc: asyncio.subprocess.Process
    watcher: asyncio.Task[None]
    stopping: bool = False


class LocalRuntime:
    def __init__(self, logs_dir: Path, python: str = sys.executable) -> None:
        self.logs_dir = logs_dir
        self.python = python
        self._events: RuntimeEvents | None = None
        self._processes: dict[str, _Process] = {}

    def subscribe(self, events: RuntimeEvents) -> None:
        self._events = events

    def log_path(self, api: str, replica_id: str) -> Path:
        return self.logs_dir / api / f"{replica_id}.log"

    async def start(self, launch: ReplicaLaunch, env: dict[str, str]) -> int | None:
        if launch.replica_id in self._processes:
            raise RuntimeError(f"replica {launch.replica_id} is already running")
        path = self.log_path(launch.api, launch.replica_id)
        path.parent.mkdir(parents=True, exist_ok=True)
        read_fd, write_fd = os.pipe()
        full_env = {**os.environ, **env, "PYTHONUNBUFFERED": "1"}
        with path.open("ab") as log_file:
            log_file.write(
                f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} starting replica {launch.replica_id} "
                f"(revision {launch.revision})\n".encode()
            )
            log_file.flush()
            try:
                proc = await asyncio.create_subprocess_exec(
                    self.python,
                    "-m",
                    "cirrus.replica",
                    "--launch",
                    encode_launch(launch),
                    "--status-fd",
                    str(write_fd),
                    stdin=asyncio.subprocess.DEVNULL,
                    stdout=log_file,
                    stderr=asyncio.subprocess.STDOUT,
                    pass_fds=(write_fd,),
                    env=full_env,
                    cwd=launch.project_dir,
                    start_new_session=True,
                )
            finally:
                os.close(write_fd)
        watcher = asyncio.get_running_loop().create_task(self._watch(launch, proc, read_fd))
        self._processes[launch.replica_id] = _Process(launch, proc, watcher)
        return proc.pid

    async def _watch(self, launch: ReplicaLaunch, proc: asyncio.subprocess.Process, read_fd: int) -> None:
        report = await _read_report(read_fd)
        error = None
        if isinstance(report, ReplicaReady):
            if self._events is not None:
                self._events.replica_ready(launch.replica_id, report)
        elif isinstance(report, ReplicaFailed):
            error = report.error
        code = await proc.wait()
        entry = self._processes.pop(launch.replica_id, None)
        exit = ReplicaExit(
            code=code if code >= 0 else None,
            signal=-code if code < 0 else None,
            error=error,
            log_tail=tail_lines(self.log_path(launch.api, launch.replica_id), LOG_TAIL_LINES),
        )
        if entry is not None and not entry.stopping:
            log.warning("replica %s of %s %s", launch.replica_id, launch.api, exit.describe().splitlines()[0])
        if self._events is not None:
            self._events.replica_exited(launch.replica_id, exit)

    async def stop(self, replica_id: str, grace_s: float) -> None:
        entry = self._processes.get(replica_id)
        if entry is None:
            return
        entry.stopping = True
        with contextlib.suppress(ProcessLookupError):
            entry.proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(asyncio.shield(entry.watcher), grace_s)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                entry.proc.kill()
            await entry.watcher

    async def close(self) -> None:
        await asyncio.gather(*(self.stop(rid, 10.0) for rid in list(self._processes)), return_exceptions=True)


async def _read_report(fd: int) -> ReplicaReady | ReplicaFailed | None:
    """Wait until the replica writes its start-up report, or closes the pipe (it exited)."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=16 * 1024 * 1024)
    transport, _ = await loop.connect_read_pipe(
        lambda: asyncio.StreamReaderProtocol(reader), os.fdopen(fd, "rb", buffering=0)
    )
    try:
        line = await reader.readline()
    except (ValueError, asyncio.LimitOverrunError):
        line = b""
    finally:
        transport.close()
    if not line.strip():
        return None
    try:
        return decode_startup(line.strip())
    except Exception:
        return None
