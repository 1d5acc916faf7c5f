"""Processes the benchmarks start: servers, `cirrus up` daemons, their process trees and their end.

Shared by the scripts in bench/ (not a test helper, not part of Cirrus). Every process a script
starts is either a `Server` (its own session; found again as the tree below its PID) or belongs to
a `Daemon` (marked with ``TAG_ENV`` in its environment). Both are stopped by escalating signals
until nothing of theirs is left, and report what survived SIGKILL.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Protocol

from cirrus.client import Client
from cirrus.settings import Settings
from cirrus.types import ApiStatus

ROOT = Path(__file__).resolve().parent.parent
TAG_ENV = "CIRRUS_BENCH_TAG"
TCK = os.sysconf("SC_CLK_TCK")

Log = Callable[[str], None]


class BenchError(Exception):
    """A failure that ends the run with a clear message."""


def logger(script: str) -> Log:
    """`log(msg)` that writes ``[script] msg`` to stderr."""

    def log(msg: str) -> None:
        print(f"[{script}] {msg}", file=sys.stderr, flush=True)

    return log


def run_main(main: Callable[[], int]) -> None:
    """`sys.exit(main())`, with a `BenchError` as ``error: ...`` (exit 1) and Ctrl-C / SIGTERM as exit 130.

    Whatever the script started is stopped by its own `finally` before the exception gets here."""
    try:
        code = main()
    except BenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        code = 1
    except KeyboardInterrupt:
        print("interrupted; everything the run started is stopped", file=sys.stderr)
        code = 130
    sys.exit(code)


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Turn SIGTERM/SIGHUP into KeyboardInterrupt so that servers and daemons are stopped on the way out."""

    def handler(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    old = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for sig, prev in old.items():
            signal.signal(sig, prev)


class Stoppable(Protocol):
    def stop(self) -> list[int]: ...


def stop_and_report(thing: Stoppable, log: Log, name: str) -> bool:
    """`thing.stop()`; logs the processes that outlived SIGKILL, if any. True when none is left."""
    left = thing.stop()
    if left:
        log(f"{name}: processes still alive after SIGKILL: {left}")
    return not left


# /proc ----------------------------------------------------------------------------------------


@dataclass
class ProcStat:
    comm: str
    state: str
    ppid: int
    sid: int
    cpu_s: float


def read_stat(pid: int) -> ProcStat:
    with open(f"/proc/{pid}/stat") as handle:
        text = handle.read()
    close = text.rfind(")")
    fields = text[close + 2 :].split()
    return ProcStat(
        comm=text[text.find("(") + 1 : close],
        state=fields[0],
        ppid=int(fields[1]),
        sid=int(fields[3]),
        cpu_s=(int(fields[11]) + int(fields[12])) / TCK,
    )


def snapshot() -> dict[int, ProcStat]:
    out: dict[int, ProcStat] = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                out[int(name)] = read_stat(int(name))
    return out


def machine_busy_s() -> float:
    """Busy CPU seconds of the whole machine (all cores), from /proc/stat."""
    with open("/proc/stat") as handle:
        v = [int(x) for x in handle.readline().split()[1:]]
    return (v[0] + v[1] + v[2] + v[5] + v[6] + v[7]) / TCK  # user nice system irq softirq steal


def cmdline(pid: int, limit: int = 60) -> str:
    with contextlib.suppress(OSError), open(f"/proc/{pid}/cmdline", "rb") as handle:
        return handle.read().replace(b"\0", b" ").decode(errors="replace").strip()[:limit]
    return "?"


def stats_of(pids: Iterable[int]) -> dict[int, ProcStat]:
    """`read_stat` of each of `pids` still there."""
    out = {}
    for pid in pids:
        with contextlib.suppress(OSError, IndexError, ValueError):
            out[pid] = read_stat(pid)
    return out


class Tree:
    """Every process of one server: the root's descendants and its session; remembers each PID seen.

    Cirrus starts replicas in sessions of their own, so they are found as descendants; calling
    `pids()` often (while waiting for the first response) catches them before anything re-parents.
    """

    def __init__(self, root: int) -> None:
        self.root = root
        self.known = {root}

    def pids(self) -> dict[int, ProcStat]:
        snap = snapshot()
        changed = True
        while changed:
            changed = False
            for pid, st in snap.items():
                if pid not in self.known and (st.ppid in self.known or st.sid == self.root):
                    self.known.add(pid)
                    changed = True
        return {p: snap[p] for p in self.known if p in snap and snap[p].state != "Z"}

    def cpu(self) -> dict[int, float]:
        return {pid: st.cpu_s for pid, st in self.pids().items()}


@dataclass(frozen=True)
class CpuSplit:
    """Where a machine's CPU went over `elapsed_s` seconds (all in CPU seconds): `tree` (by PID, those alive at
    the end), this process (`own_s`), its children reaped meanwhile (`children_s`: wrk, CLI calls) and the rest
    (`other_s`: unrelated processes, loopback softirq, and what processes that ended meanwhile used)."""

    elapsed_s: float
    tree_by_pid: dict[int, float]
    own_s: float
    children_s: float
    busy_s: float

    @property
    def tree_s(self) -> float:
        return sum(self.tree_by_pid.values())

    @property
    def other_s(self) -> float:
        return self.busy_s - self.tree_s - self.children_s - self.own_s

    def pct(self, cpu_s: float) -> float:
        """`cpu_s` in % of one core over the window."""
        return round(100 * cpu_s / self.elapsed_s, 1) if self.elapsed_s > 0 else 0.0


class CpuWindow:
    """Measures from its creation to `stop()` where the CPU went (`CpuSplit`), from /proc."""

    def __init__(self, tree: Tree) -> None:
        self.tree = tree
        self.cpu0 = tree.cpu()
        self.busy0 = machine_busy_s()
        self.own0 = time.process_time()
        self.children0 = self._children()
        self.t0 = time.monotonic()

    @staticmethod
    def _children() -> float:
        usage = resource.getrusage(resource.RUSAGE_CHILDREN)
        return usage.ru_utime + usage.ru_stime

    def stop(self) -> CpuSplit:
        elapsed = time.monotonic() - self.t0
        children = self._children() - self.children0
        cpu1 = self.tree.cpu()
        busy = machine_busy_s() - self.busy0
        own = time.process_time() - self.own0
        by_pid = {pid: c - self.cpu0.get(pid, 0.0) for pid, c in cpu1.items()}
        return CpuSplit(elapsed, by_pid, own, children, busy)


def tagged_pids(tag: str) -> list[int]:
    """Every live process whose environment carries TAG_ENV=tag (a daemon, its templates and replicas)."""
    marker = f"{TAG_ENV}={tag}".encode()
    out = []
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == os.getpid():
            continue
        with contextlib.suppress(OSError):
            with open(f"/proc/{name}/environ", "rb") as handle:
                if marker not in handle.read().split(b"\0"):
                    continue
            with open(f"/proc/{name}/stat") as handle:
                text = handle.read()
            if text[text.rfind(")") + 2] != "Z":
                out.append(int(name))
    return sorted(out)


Escalation = Sequence[tuple[signal.Signals | None, float]]


def terminate(
    live: Callable[[], Collection[int]],
    steps: Escalation = ((signal.SIGTERM, 5.0), (signal.SIGKILL, 2.0)),
    announce: Callable[[signal.Signals, Collection[int]], None] | None = None,
) -> list[int]:
    """For each (signal, seconds) step: send the signal (None: none) to every live PID, wait up to the
    seconds for `live()` to be empty; stop at the first step that finds nothing left. Returns survivors."""
    for sig, wait_s in steps:
        left = live()
        if not left:
            break
        if sig is not None:
            if announce is not None:
                announce(sig, left)
            for pid in left:
                with contextlib.suppress(OSError):
                    os.kill(pid, sig)
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline and live():
            time.sleep(0.1)
    return sorted(live())


# HTTP -----------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def post(url: str, body: str, timeout: float = 5.0) -> bytes:
    request = urllib.request.Request(url, data=body.encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        data: bytes = response.read()
        return data


def get_text(url: str, timeout: float = 10.0) -> str:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return str(response.read().decode())


# Servers --------------------------------------------------------------------------------------


@dataclass
class ServerSpec:
    name: str
    label: str
    cmd: list[str]
    url: str
    env: dict[str, str] = field(default_factory=dict)


def cirrus_serve(name: str, label: str, project: Path, workdir: Path, path: str = "") -> ServerSpec:
    """`cirrus serve PROJECT` on a free port with ``CIRRUS_HOME`` = WORKDIR/cirrus-home; url = base + path."""
    home = workdir / "cirrus-home"
    home.mkdir(mode=0o700, exist_ok=True)
    port = free_port()
    cmd = [sys.executable, "-m", "cirrus.cli", "serve", str(project), "--port", str(port)]
    return ServerSpec(name, label, cmd, f"http://127.0.0.1:{port}{path}", env={"CIRRUS_HOME": str(home)})


class Server:
    """A launched server: its process, its process tree and its log file."""

    def __init__(self, spec: ServerSpec, logdir: Path) -> None:
        self.spec = spec
        logdir.mkdir(parents=True, exist_ok=True)
        self.log_path = logdir / f"{spec.name}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.tree = Tree(0)

    def start(self) -> None:
        env = {**os.environ, **self.spec.env}
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                self.spec.cmd,
                cwd=ROOT,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,  # its own process group: Ctrl-C in our terminal does not reach it
            )
        self.tree = Tree(self.proc.pid)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def wait_answers(
        self,
        urls: Sequence[str],
        body: str,
        timeout_s: float,
        ok: Callable[[bytes], bool] = lambda reply: True,
        poll_s: float = 0.05,
        post_timeout_s: float = 5.0,
    ) -> float:
        """POST `body` to each URL in turn until it answers 200 with a reply `ok` accepts (every `poll_s`);
        return the seconds since the call. Follows the process tree meanwhile (see `Tree`)."""
        assert self.proc is not None
        t0 = time.monotonic()
        pending = list(urls)
        last = "no answer"
        while pending and time.monotonic() - t0 < timeout_s:
            self.tree.pids()
            if self.proc.poll() is not None:
                raise BenchError(
                    f"{self.spec.name} exited with {self.proc.returncode} before answering; "
                    f"log: {self.log_path}\n{self.log_tail()}"
                )
            try:
                reply = post(pending[0], body, timeout=post_timeout_s)
                if ok(reply):
                    pending.pop(0)
                    continue
                last = f"unexpected reply {reply[:80]!r}"
            except (OSError, ValueError) as exc:
                last = str(exc)
            time.sleep(poll_s)
        if pending:
            raise BenchError(
                f"{self.spec.name}: {pending[0]} did not answer 200 within {timeout_s:.0f} s ({last}); "
                f"log: {self.log_path}\n{self.log_tail()}"
            )
        return time.monotonic() - t0

    def log_tail(self, lines: int = 15) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        return ""

    def live(self) -> dict[int, ProcStat]:
        if self.proc is not None:
            self.proc.poll()  # reaps our direct child once it exits
        return self.tree.pids()

    def stop(self) -> list[int]:
        """SIGINT to the process groups, then SIGTERM and SIGKILL to every process left; return survivors."""
        if self.proc is None:
            return []
        groups = {self.proc.pid}
        for pid in self.tree.pids():
            with contextlib.suppress(OSError):
                groups.add(os.getpgid(pid))
        for pgid in groups:
            with contextlib.suppress(OSError):
                os.killpg(pgid, signal.SIGINT)
        return terminate(self.live, ((None, 10.0), (signal.SIGTERM, 5.0), (signal.SIGKILL, 2.0)))


# Daemons --------------------------------------------------------------------------------------


class Daemon:
    """One `cirrus up` daemon with a throw-away CIRRUS_HOME; `stop()` ends it and everything it started."""

    def __init__(
        self, label: str, workdir: Path, logdir: Path, log: Log, fork: bool = True, env: Mapping[str, str] | None = None
    ) -> None:
        """`env`: more variables for the daemon's environment (a runtime and its settings)."""
        self.label = label
        self.home = workdir / f"home-{label}"
        self.home.mkdir(mode=0o700)
        self.logdir = logdir
        self.log = log
        self.tag = uuid.uuid4().hex
        self.env = {
            **os.environ,
            "CIRRUS_HOME": str(self.home),
            "CIRRUS_PORT": "0",
            "CIRRUS_ADMIN_PORT": "0",
            TAG_ENV: self.tag,
            **(env or {}),
        }
        if not fork:
            self.env["CIRRUS_FORK_REPLICAS"] = "0"
        self.settings = Settings.from_env(self.env)
        self.client = Client(self.settings)
        self.gateway_url = ""
        self.pid: int | None = None

    def start(self) -> None:
        """`cirrus up`, then the gateway's URL and the daemon's PID from daemon.json."""
        cmd = [sys.executable, "-m", "cirrus.cli", "up", "--timeout", "60"]
        t0 = time.monotonic()
        done = subprocess.run(cmd, cwd=ROOT, env=self.env, capture_output=True, text=True, timeout=90, check=False)
        if done.returncode != 0:
            raise BenchError(f"`cirrus up` failed ({done.returncode}):\n{done.stdout}{done.stderr}")
        info = json.loads(self.settings.daemon_file.read_text())
        self.gateway_url, self.pid = info["gateway_url"], info["pid"]
        self.log(f"{self.label}: daemon pid {self.pid} up in {time.monotonic() - t0:.2f} s, gateway {self.gateway_url}")

    def stop(self) -> list[int]:
        """Ask the daemon to stop, then SIGTERM / SIGKILL every marked process left; return survivors."""
        with contextlib.suppress(Exception):
            self.client.down(timeout=20)

        def announce(sig: signal.Signals, left: Collection[int]) -> None:
            self.log(f"{self.label}: {len(left)} processes left after `down`; sending {sig.name}")

        left = terminate(lambda: tagged_pids(self.tag), announce=announce)
        self.client.close()
        self.save_logs()
        return left

    def save_logs(self) -> None:
        dest = self.logdir / self.label
        shutil.rmtree(dest, ignore_errors=True)
        dest.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(OSError):
            shutil.copy2(self.settings.daemon_log, dest / "daemon.log")
        if self.settings.logs_dir.is_dir():
            with contextlib.suppress(OSError, shutil.Error):
                shutil.copytree(self.settings.logs_dir, dest / "logs", dirs_exist_ok=True)

    def wait(self, what: str, check: Callable[[ApiStatus], bool], name: str, timeout: float) -> ApiStatus:
        """Poll `cirrus get NAME` every 0.1 s until `check` accepts it; BenchError after `timeout` s."""
        deadline = time.monotonic() + timeout
        while True:
            status = self.client.get(name)
            if check(status):
                return status
            if time.monotonic() > deadline:
                raise BenchError(
                    f"{name}: not {what} within {timeout:g} s: {status.status}, "
                    f"{status.replicas_ready}/{status.replicas_desired} ready, {status.message or ''}; "
                    f"logs: {self.logdir / self.label}"
                )
            time.sleep(0.1)
