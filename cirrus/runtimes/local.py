"""The local runtime: each replica is a process of its own with its own log file.

A replica is forked from its revision's *template* when one is ready (`prepare` starts it; see
`cirrus/replica/template.py`), which skips the imports that dominate a cold start; otherwise, or
with `CIRRUS_FORK_REPLICAS=0`, it is a fresh `python -m cirrus.replica` process. Either way the
replica reports `ReplicaReady`/`ReplicaFailed` on a status pipe, logs to the same file, and its
end comes back as the same `replica_exited` event.

Placement is the runtime's too: `reserve` places a replica on the node's `Inventory` (the pure
`cirrus.runtimes.placement.place` over the reservations held), and `start` gives the replica the
device environment of its reservation (CUDA_VISIBLE_DEVICES and the like).

A template that dies while its revision is current is started again at once (at most
`TEMPLATE_RESTARTS` times in `TEMPLATE_RESTART_WINDOW_S`; past that its replicas start fresh), and
the logs of the replicas it had forked, which exit with it, say so.

Logs stay bounded: `rotate_logs` (the daemon calls it every few seconds) rotates a live replica's
or template's log past `log_max_bytes`, keeping one previous file (`<name>.log.1`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import sys
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from cirrus.logs import FOLLOW_POLL_S, read_logs, rotate_all, tail_lines
from cirrus.runtimes.base import Placement, ReplicaExit, Reservation, RuntimeEvents
from cirrus.runtimes.placement import Assignment, Inventory, Unplaceable, place
from cirrus.spec import ComputeSpec
from cirrus.wire import (
    TEMPLATE_MESSAGE_MAX_BYTES,
    ChildExited,
    Forked,
    ForkFailed,
    ForkRequest,
    ReplicaFailed,
    ReplicaLaunch,
    ReplicaReady,
    Retire,
    TemplateFailed,
    TemplateMessage,
    TemplateReady,
    decode_startup,
    decode_template_message,
    encode_launch,
    encode_template_message,
)

log = logging.getLogger("cirrus.runtime")
LOG_TAIL_LINES = 20
TEMPLATE_READY_TIMEOUT_S = 120.0  # a start waits this long for a template still importing
FORK_REPLY_TIMEOUT_S = 10.0
TEMPLATE_EXIT_GRACE_S = 5.0
FORK_REPLICAS_ENV = "CIRRUS_FORK_REPLICAS"
TEMPLATE_RESTARTS = 3  # a template that dies is started again at most this many times ...
TEMPLATE_RESTART_WINDOW_S = 60.0  # ... within this long; past that its replicas start fresh
TEMPLATE_DEATH_WAIT_S = 2.0  # a start that finds its template lost waits this long for it to be replaced
DEFAULT_LOG_MAX_BYTES = 16 * 1024 * 1024


@dataclass
class _Replica:
    launch: ReplicaLaunch
    pid: int
    send_signal: Callable[[int], None]
    watcher: asyncio.Task[None]
    stopping: bool = False
    address: str | None = None  # from its ReplicaReady
    forked_from: _Template | None = None


class TemplateUnavailable(Exception):
    """A replica cannot be forked from its template (the runtime then starts a fresh process)."""


class LocalRuntime:
    """Replicas as processes of this node.

    `inventory` is what the node offers replicas (None: no limits, and no device environment);
    `models_dir` is where its model cache lives; `log_poll_s` is how often followed logs are read;
    `log_max_bytes` is the size past which `rotate_logs` rotates a log.
    """

    def __init__(
        self,
        logs_dir: Path,
        python: str = sys.executable,
        env: Mapping[str, str] | None = None,
        inventory: Inventory | None = None,
        models_dir: Path | None = None,
        log_poll_s: float = FOLLOW_POLL_S,
        log_max_bytes: int = DEFAULT_LOG_MAX_BYTES,
    ) -> None:
        self.logs_dir = logs_dir
        self.python = python
        self.inventory = inventory
        self.models_dir = models_dir
        self.log_poll_s = log_poll_s
        self.log_max_bytes = log_max_bytes
        environ = os.environ if env is None else env
        self.fork_replicas = environ.get(FORK_REPLICAS_ENV, "1").strip().lower() not in ("0", "false", "no", "off")
        self._events: RuntimeEvents | None = None
        self._processes: dict[str, _Replica] = {}
        self._templates: dict[tuple[str, int], _Template] = {}
        self._retired: set[_Template] = set()  # released, reaping the replicas they forked
        self._reservations: dict[str, Reservation] = {}  # replica id -> what it holds (started or not)
        self._starting: set[str] = set()  # replica ids whose start is in flight
        self._template_deaths: dict[tuple[str, int], deque[float]] = {}  # when each key's templates died
        self._exited_logs: set[Path] = set()  # logs of replicas that exited since the last rotation

    def subscribe(self, events: RuntimeEvents) -> None:
        self._events = events

    def model_cache_dir(self) -> Path | None:
        return self.models_dir

    def replica_store_url(self, store_url: str) -> str:
        return store_url  # replicas run on this node: the daemon's SQLite file or Redis URL as they are

    # --- placement -------------------------------------------------------------------------

    def _live(self, replica_id: str) -> bool:
        return replica_id in self._processes or replica_id in self._starting

    def reserve(self, replica_id: str, compute: ComputeSpec) -> Reservation | Unplaceable:
        if self._live(replica_id):
            raise RuntimeError(f"replica {replica_id} is running; its reservation cannot change")
        self._reservations.pop(replica_id, None)
        if self.inventory is None:
            reservation = Reservation()
        else:
            placed = place(compute, self.inventory, self.held())
            if isinstance(placed, Unplaceable):
                return placed
            reservation = Reservation(devices=placed.devices(), detail=placed)
        self._reservations[replica_id] = reservation
        return reservation

    def unreserve(self, replica_id: str) -> None:
        if not self._live(replica_id):
            self._reservations.pop(replica_id, None)

    def held(self) -> list[Assignment]:
        """The assignments reserved now, started or not."""
        return [r.detail for r in self._reservations.values() if isinstance(r.detail, Assignment)]

    # --- logs ------------------------------------------------------------------------------

    def log_path(self, api: str, replica_id: str) -> Path:
        return self.logs_dir / api / f"{replica_id}.log"

    def logs(self, api: str | None, replica_id: str | None, lines: int, follow: bool) -> AsyncIterator[bytes]:
        return read_logs(self.logs_dir, api, replica_id, lines, follow, self.log_poll_s)

    def has_logs(self, api: str) -> bool:
        return (self.logs_dir / api).is_dir()

    async def rotate_logs(self, also: tuple[Path, ...] = ()) -> list[Path]:
        """Rotate each log still written to (live replicas', templates', and `also`) that is over
        `log_max_bytes` (in a thread); the files rotated."""
        files = {self.log_path(e.launch.api, e.launch.replica_id) for e in self._processes.values()}
        files.update(t.log_path for t in (*self._templates.values(), *self._retired))
        files.update(self._exited_logs, also)
        self._exited_logs.clear()
        rotated = await asyncio.to_thread(rotate_all, sorted(files), self.log_max_bytes)
        for path in rotated:
            log.info("rotated %s (over %d bytes; the previous part is %s.1)", path, self.log_max_bytes, path.name)
        return rotated

    def template_log_path(self, api: str, revision: int) -> Path:
        return self.logs_dir / api / "templates" / f"revision-{revision}.log"

    def template_pid(self, api: str, revision: int) -> int | None:
        """The pid of the revision's running template, if one is up (starting or ready)."""
        template = self._templates.get((api, revision))
        if template is None or not template.alive or template.failed:
            return None
        return template.pid

    # --- templates -------------------------------------------------------------------------

    async def prepare(self, launch: ReplicaLaunch, env: dict[str, str]) -> None:
        if not self.fork_replicas:
            return
        key = (launch.api, launch.revision)
        current = self._templates.get(key)
        if current is not None and (current.alive or current.failed):
            return  # running, or its module does not import: replicas start fresh and say why
        try:
            # is_available() through NVML leaves CUDA uninitialised in the template, so replicas can use it
            template_env = {"PYTORCH_NVML_BASED_CUDA_CHECK": "1", **self._full_env(env)}
            self._templates[key] = _Template(
                launch,
                template_env,
                launch.python or self.python,  # the API's own environment's, where it has one
                self.template_log_path(launch.api, launch.revision),
                self._template_died,
            )
        except Exception as exc:
            log.warning("could not start a template for %s revision %d: %s", launch.api, launch.revision, exc)

    async def release(self, api: str, revision: int) -> None:
        template = self._templates.pop((api, revision), None)
        self._template_deaths.pop((api, revision), None)
        if template is None:
            return
        self._retired.add(template)
        template.retire(on_exit=lambda: self._retired.discard(template))

    # --- replicas --------------------------------------------------------------------------

    async def start(self, launch: ReplicaLaunch, env: dict[str, str]) -> int | None:
        if self._live(launch.replica_id):
            raise RuntimeError(f"replica {launch.replica_id} is already running")
        reservation = self._reservations.get(launch.replica_id)
        if reservation is not None and isinstance(reservation.detail, Assignment):
            env = {**env, **reservation.detail.env()}
        self._starting.add(launch.replica_id)  # its reservation stays held while it starts
        try:
            key = (launch.api, launch.revision)
            template = self._templates.get(key) if self.fork_replicas else None
            if template is not None and not template.alive and not template.failed:
                await template.finished(TEMPLATE_DEATH_WAIT_S)  # a dead one is replaced as it is reaped
                template = self._templates.get(key)
            if template is not None:
                try:
                    return await self._fork(template, launch, env)
                except TemplateUnavailable as exc:
                    log.info("replica %s of %s starts as a fresh process: %s", launch.replica_id, launch.api, exc)
            return await self._spawn(launch, env)
        except BaseException:
            self._starting.discard(launch.replica_id)
            self.unreserve(launch.replica_id)
            raise
        finally:
            self._starting.discard(launch.replica_id)

    def address(self, replica_id: str) -> str | None:
        entry = self._processes.get(replica_id)
        return entry.address if entry is not None else None

    def placement(self, replica_id: str) -> Placement | None:
        return None  # this node; its devices are in the reservation

    def _full_env(self, env: dict[str, str]) -> dict[str, str]:
        return {**os.environ, **env, "PYTHONUNBUFFERED": "1"}

    def _open_log(self, launch: ReplicaLaunch, how: str) -> Path:
        path = self.log_path(launch.api, launch.replica_id)
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("ab") as log_file:
            log_file.write(
                f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} starting replica {launch.replica_id} "
                f"(revision {launch.revision}{how})\n".encode()
            )
        return path

    async def _fork(self, template: _Template, launch: ReplicaLaunch, env: dict[str, str]) -> int:
        await template.wait_ready(TEMPLATE_READY_TIMEOUT_S)
        if not template.matches(launch):
            raise TemplateUnavailable("its template was made for another predictor file")
        path = self._open_log(launch, f", forked from template pid {template.pid}")
        read_fd, write_fd = os.pipe()
        try:
            with path.open("ab") as log_file:
                reply = template.send_fork(launch, self._full_env(env), [write_fd, log_file.fileno()])
        except BaseException:
            os.close(read_fd)
            raise
        finally:
            os.close(write_fd)
        try:
            pid = await template.wait_forked(launch.replica_id, reply, FORK_REPLY_TIMEOUT_S)
        except BaseException:
            os.close(read_fd)
            raise
        exited = template.exit_of(pid)
        watcher = asyncio.get_running_loop().create_task(self._watch(launch, read_fd, exited))
        self._processes[launch.replica_id] = _Replica(
            launch, pid, lambda sig: os.kill(pid, sig), watcher, forked_from=template
        )
        return pid

    async def _spawn(self, launch: ReplicaLaunch, env: dict[str, str]) -> int:
        path = self._open_log(launch, "")
        read_fd, write_fd = os.pipe()
        # The launch (its secret included) goes through a pipe, not the command line `ps` shows.
        launch_read, launch_write = os.pipe()
        with path.open("ab") as log_file:
            try:
                proc = await asyncio.create_subprocess_exec(
                    launch.python or self.python,
                    "-m",
                    "cirrus.replica",
                    "--launch-fd",
                    str(launch_read),
                    "--status-fd",
                    str(write_fd),
                    stdin=asyncio.subprocess.DEVNULL,
                    stdout=log_file,
                    stderr=asyncio.subprocess.STDOUT,
                    pass_fds=(write_fd, launch_read),
                    env=self._full_env(env),
                    cwd=launch.project_dir,
                    start_new_session=True,
                )
            except BaseException:
                os.close(read_fd)
                os.close(launch_write)
                raise
            finally:
                os.close(write_fd)
                os.close(launch_read)
        await asyncio.to_thread(_write_and_close, launch_write, encode_launch(launch).encode())
        watcher = asyncio.get_running_loop().create_task(self._watch(launch, read_fd, proc.wait()))
        self._processes[launch.replica_id] = _Replica(launch, proc.pid, proc.send_signal, watcher)
        return proc.pid

    async def _watch(self, launch: ReplicaLaunch, read_fd: int, exited: Awaitable[int | None]) -> None:
        """Report readiness, then the exit. `exited` gives the exit code as `subprocess` does
        (negative: the signal), or None when it is unknown."""
        report = await _read_report(read_fd)
        error, stage = None, "load the predictor"
        if isinstance(report, ReplicaReady):
            running = self._processes.get(launch.replica_id)
            if running is not None:
                running.address = report.address
            if self._events is not None:
                self._events.replica_ready(launch.replica_id, report)
        elif isinstance(report, ReplicaFailed):
            error, stage = report.error, report.stage
        code = await exited
        entry = self._processes.pop(launch.replica_id, None)
        self._reservations.pop(launch.replica_id, None)  # freed before anyone hears of the exit
        exit = ReplicaExit(
            code=code if code is not None and code >= 0 else None,
            signal=-code if code is not None and code < 0 else None,
            error=error,
            stage=stage,
            log_tail=await asyncio.to_thread(tail_lines, self.log_path(launch.api, launch.replica_id), LOG_TAIL_LINES),
        )
        self._exited_logs.add(self.log_path(launch.api, launch.replica_id))
        if entry is not None and not entry.stopping:
            ended = launch.task is not None and exit.code == 0  # a task run that succeeded: no warning
            log.log(
                logging.INFO if ended else logging.WARNING,
                "replica %s of %s %s",
                launch.replica_id,
                launch.api,
                exit.describe().splitlines()[0],
            )
        if self._events is not None:
            self._events.replica_exited(launch.replica_id, exit)

    async def stop(self, replica_id: str, grace_s: float) -> None:
        entry = self._processes.get(replica_id)
        if entry is None:
            self.unreserve(replica_id)  # not while a start is in flight: that replica will hold it
            return
        entry.stopping = True
        with contextlib.suppress(ProcessLookupError):
            entry.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(asyncio.shield(entry.watcher), grace_s)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                entry.send_signal(signal.SIGKILL)
            await entry.watcher

    def _template_died(self, template: _Template, code: int | None) -> None:
        """A template exited on its own: tell its replicas' logs, and start another one (within budget)."""
        launch = template.launch
        key = (launch.api, launch.revision)
        how = ReplicaExit(code=code if code is None or code >= 0 else None, signal=-code if code and code < 0 else None)
        what = how.describe() if code is not None else "exited"
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        for entry in self._processes.values():
            if entry.forked_from is template:
                with contextlib.suppress(OSError), self.log_path(launch.api, entry.launch.replica_id).open("ab") as f:
                    f.write(
                        f"--- {stamp} the template this replica was forked from (pid {template.pid}) {what}; "
                        "the replica exits with it\n".encode()
                    )
        if self._templates.get(key) is not template:
            return  # released, or the runtime is closing
        deaths = self._template_deaths.setdefault(key, deque())
        now = time.monotonic()
        deaths.append(now)
        while deaths and deaths[0] < now - TEMPLATE_RESTART_WINDOW_S:
            deaths.popleft()
        if len(deaths) > TEMPLATE_RESTARTS:
            del self._templates[key]
            log.error(
                "the template of %s revision %d (pid %s) %s, the %dth time within %.0fs; not starting another: "
                "its replicas start as fresh processes (see %s)",
                launch.api,
                launch.revision,
                template.pid,
                what,
                len(deaths),
                TEMPLATE_RESTART_WINDOW_S,
                template.log_path,
            )
            return
        log.warning(
            "the template of %s revision %d (pid %s) %s; starting another",
            launch.api,
            launch.revision,
            template.pid,
            what,
        )
        try:
            self._templates[key] = _Template(
                launch, template.env, template.python, template.log_path, self._template_died
            )
        except Exception as exc:
            del self._templates[key]
            log.warning("could not start a template for %s revision %d: %s", launch.api, launch.revision, exc)

    async def close(self) -> None:
        """Stop every replica, then every template."""
        await asyncio.gather(*(self.stop(rid, 10.0) for rid in list(self._processes)), return_exceptions=True)
        self._reservations.clear()
        templates = [*self._templates.values(), *self._retired]
        self._templates.clear()
        self._retired.clear()
        await asyncio.gather(*(t.close(TEMPLATE_EXIT_GRACE_S) for t in templates), return_exceptions=True)


class _Template:
    """The runtime's end of one template process: its control socket, its forks and their exits."""

    def __init__(
        self,
        launch: ReplicaLaunch,
        env: dict[str, str],
        python: str,
        log_path: Path,
        on_death: Callable[[_Template, int | None], None] | None = None,
    ) -> None:
        loop = asyncio.get_running_loop()
        self.launch = launch
        self.env = env
        self.python = python
        self.log_path = log_path
        self._on_death = on_death
        self.closing = False
        self.pid: int | None = None
        self.failed = False
        self.retired = False
        self.ready: asyncio.Future[bool] = loop.create_future()
        self._exits: dict[int, asyncio.Future[int | None]] = {}  # pid -> exit code (None: unknown)
        self._forks: dict[str, asyncio.Future[int]] = {}  # replica id -> pid, while a fork is in flight
        self._lost = False
        self._on_exit: Callable[[], None] | None = None
        self._sock, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 2 * TEMPLATE_MESSAGE_MAX_BYTES)
            self._sock.setblocking(False)
            loop.add_reader(self._sock.fileno(), self._readable)
        except BaseException:
            self._sock.close()
            child.close()
            raise
        self._process = loop.create_task(self._run(env, python, log_path, child))

    @property
    def alive(self) -> bool:
        return not self._lost

    def matches(self, launch: ReplicaLaunch) -> bool:
        return (launch.project_dir, launch.predictor_path) == (self.launch.project_dir, self.launch.predictor_path)

    async def _run(self, env: dict[str, str], python: str, log_path: Path, child: socket.socket) -> None:
        launch = self.launch
        try:
            log_path.parent.mkdir(parents=True, exist_ok=True)
            with log_path.open("ab") as log_file:
                log_file.write(
                    f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} starting the template of revision "
                    f"{launch.revision}\n".encode()
                )
                log_file.flush()
                proc = await asyncio.create_subprocess_exec(
                    python,
                    "-m",
                    "cirrus.replica.template",
                    "--api",
                    launch.api,
                    "--revision",
                    str(launch.revision),
                    "--predictor-path",
                    launch.predictor_path,
                    "--control-fd",
                    str(child.fileno()),
                    stdin=asyncio.subprocess.DEVNULL,
                    stdout=log_file,
                    stderr=asyncio.subprocess.STDOUT,
                    pass_fds=(child.fileno(),),
                    env=env,
                    cwd=launch.project_dir,
                    start_new_session=True,
                )
        except Exception as exc:
            log.warning("could not start the template of %s revision %d: %s", launch.api, launch.revision, exc)
            self._lose()
            return
        finally:
            child.close()
        self.pid = proc.pid
        try:
            code = await proc.wait()
        except asyncio.CancelledError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            raise
        finally:
            self._lose()
            if self._on_exit is not None:
                self._on_exit()
        if self.failed or self.retired or self.closing:
            return
        if self._on_death is not None:
            self._on_death(self, code)  # it logs the death
        elif code != 0:
            log.warning(
                "the template of %s revision %d (pid %d) exited with %d", launch.api, launch.revision, proc.pid, code
            )

    # --- messages from the template ----------------------------------------------------------

    def _readable(self) -> None:
        while not self._lost:
            try:
                data = self._sock.recv(TEMPLATE_MESSAGE_MAX_BYTES)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                data = b""
            if not data:
                self._lose()
                return
            try:
                message = decode_template_message(data)
            except Exception as exc:
                log.error("a bad message from the template of %s: %s", self.launch.api, exc)
                continue
            self._handle(message)

    def _handle(self, message: TemplateMessage) -> None:
        launch = self.launch
        if isinstance(message, TemplateReady):
            log.info(
                "template of %s revision %d ready (pid %d, imported in %.2fs)",
                launch.api,
                launch.revision,
                message.pid,
                message.import_s,
            )
            _resolve(self.ready, True)
        elif isinstance(message, TemplateFailed):
            self.failed = True
            log.warning(
                "replicas of %s revision %d cannot be forked from a template (%s: %s); they start as fresh processes",
                launch.api,
                launch.revision,
                launch.predictor_path,
                message.error,
            )
            _resolve(self.ready, False)
        elif isinstance(message, Forked):
            self._exits[message.pid] = asyncio.get_running_loop().create_future()
            waiter = self._forks.get(message.replica_id)
            if waiter is None or waiter.done():  # the start gave up waiting: nobody tracks this one
                log.warning("killing replica %s (pid %d): forked too late", message.replica_id, message.pid)
                with contextlib.suppress(ProcessLookupError):
                    os.kill(message.pid, signal.SIGKILL)
            else:
                waiter.set_result(message.pid)
        elif isinstance(message, ForkFailed):
            waiter = self._forks.get(message.replica_id)
            if waiter is not None and not waiter.done():
                waiter.set_exception(TemplateUnavailable(message.error))
        elif isinstance(message, ChildExited):
            exited = self._exits.get(message.pid)  # `exit_of` drops it once claimed and resolved
            if exited is not None:
                _resolve(exited, message.code)

    def _lose(self) -> None:
        """The template is gone (or its socket is): fail what waits on it, watch its orphans."""
        if self._lost:
            return
        self._lost = True
        with contextlib.suppress(Exception):
            asyncio.get_running_loop().remove_reader(self._sock.fileno())
        self._sock.close()
        _resolve(self.ready, False)
        for waiter in self._forks.values():
            if not waiter.done():
                waiter.set_exception(TemplateUnavailable("the template exited"))
        for pid, exited in self._exits.items():
            _watch_orphan(pid, exited)  # they exit on their own once they see their parent gone

    # --- requests to the template ----------------------------------------------------------

    async def wait_ready(self, timeout_s: float) -> None:
        try:
            ok = await asyncio.wait_for(asyncio.shield(self.ready), timeout_s)
        except TimeoutError:
            raise TemplateUnavailable(f"its template is not ready after {timeout_s:g}s") from None
        if not ok:
            why = "its template failed (see its log)" if self.failed else "its template is not running"
            raise TemplateUnavailable(why)
        if self.retired or self._lost:
            raise TemplateUnavailable("its template is retired or gone")

    def send_fork(self, launch: ReplicaLaunch, env: dict[str, str], fds: list[int]) -> asyncio.Future[int]:
        """Send a fork request with its descriptors (the caller closes its own copies afterwards)."""
        if self._lost:
            raise TemplateUnavailable("its template is gone")
        waiter: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        try:
            data = encode_template_message(ForkRequest(launch=launch, env=env))
            socket.send_fds(self._sock, [data], fds)
        except (OSError, ValueError) as exc:
            raise TemplateUnavailable(f"the fork request could not be sent: {exc}") from None
        self._forks[launch.replica_id] = waiter
        return waiter

    async def wait_forked(self, replica_id: str, waiter: asyncio.Future[int], timeout_s: float) -> int:
        try:
            return await asyncio.wait_for(waiter, timeout_s)
        except TimeoutError:
            raise TemplateUnavailable(f"its template did not fork it within {timeout_s:g}s") from None
        finally:
            self._forks.pop(replica_id, None)

    def exit_of(self, pid: int) -> asyncio.Future[int | None]:
        """The exit code of a replica this template forked (it may have exited already)."""
        exited = self._exits.get(pid)
        if exited is None:  # cannot happen: Forked registers it before the start resumes
            exited = asyncio.get_running_loop().create_future()
            exited.set_result(None)
        exited.add_done_callback(lambda _: self._exits.pop(pid, None))
        return exited

    def retire(self, on_exit: Callable[[], None]) -> None:
        """Fork no more; the template exits once its replicas have (`on_exit` runs then)."""
        self.retired = True
        if self._process.done():
            on_exit()
            return
        self._on_exit = on_exit
        if not self._lost:
            with contextlib.suppress(OSError, ValueError):
                self._sock.send(encode_template_message(Retire()))

    async def finished(self, timeout_s: float) -> None:
        """Wait until the template's process has been reaped (at most `timeout_s`)."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(self._process), timeout_s)

    async def close(self, grace_s: float) -> None:
        """Close the control socket (the template exits on it) and wait; kill it after `grace_s`."""
        self.closing = True
        importing = not self.ready.done()
        self._lose()
        if importing and self.pid is not None:  # it would notice the closed socket only after the import
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGTERM)
        try:
            await asyncio.wait_for(asyncio.shield(self._process), grace_s)
        except TimeoutError:
            if self.pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.pid, signal.SIGKILL)
            await self._process


def _resolve(future: asyncio.Future[bool] | asyncio.Future[int | None], value: object) -> None:
    if not future.done():
        future.set_result(value)  # type: ignore[arg-type]


def _watch_orphan(pid: int, exited: asyncio.Future[int | None]) -> None:
    """Resolve `exited` (with None: its status went to whoever adopted it) when `pid` ends."""
    if exited.done():
        return
    loop = asyncio.get_running_loop()
    try:
        pidfd = os.pidfd_open(pid)
    except (ProcessLookupError, OSError):
        exited.set_result(None)
        return

    def gone() -> None:
        loop.remove_reader(pidfd)
        os.close(pidfd)
        _resolve(exited, None)

    loop.add_reader(pidfd, gone)


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


def _write_and_close(fd: int, data: bytes) -> None:
    """Write all of `data` to a pipe (the reader may be slow to start), then close it."""
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
    except BrokenPipeError:
        pass  # the replica died before reading its launch: its exit is reported as usual
    finally:
        os.close(fd)
