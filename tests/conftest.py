"""Fixtures for the end-to-end tests: a state directory, a real daemon, the real CLI, tiny projects.

Everything runs as real processes over real sockets. A test's processes are found by their
environment (`CIRRUS_HOME=<the test's home>` is inherited by the daemon, `cirrus serve` and every
replica), so teardown can prove that nothing outlived the test.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import backends
import pytest
import yaml

from cirrus.client import Client
from cirrus.settings import Settings
from cirrus.types import ApiStatus, DaemonInfo

CLI_TIMEOUT_S = 60.0
EXIT_GRACE_S = 10.0


# --- the backends a session did not test ---------------------------------------------


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """A loud section listing every backend whose tests were skipped (see tests/backends.py)."""
    skipped: dict[str, tuple[int, str]] = {}
    for report in terminalreporter.stats.get("skipped", []):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        _, found, rest = reason.partition(f"{backends.MARK}: ")
        if not found:
            continue
        backend, _, why = rest.partition(": ")
        count, _ = skipped.get(backend, (0, why))
        skipped[backend] = (count + 1, why)
    if not skipped:
        return
    terminalreporter.section("BACKENDS NOT TESTED", sep="!", red=True, bold=True)
    for backend, (count, why) in sorted(skipped.items()):
        terminalreporter.line(f"{backend}: {count} test(s) skipped: {why}", red=True, bold=True)
    terminalreporter.line(
        f"Install them ({backends.INSTALL}); {backends.REQUIRE_ENV}=1 (as .ci/run sets) makes these failures.",
        red=True,
    )


# --- processes -------------------------------------------------------------------------


def _proc_state(pid: int) -> str:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return "?"
    return stat.rpartition(")")[2].split()[0]


def pid_alive(pid: int) -> bool:
    """True while `pid` runs (a zombie, dead but not yet reaped, counts as gone)."""
    return _proc_state(pid) not in ("?", "Z", "X")


def processes_of(home: Path) -> dict[int, str]:
    """pid -> command line of every live process started for the state directory `home`."""
    marker = f"CIRRUS_HOME={home}".encode()
    found: dict[int, str] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        pid = int(entry.name)
        if pid == os.getpid():
            continue
        try:
            environ = (entry / "environ").read_bytes()
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if marker in environ.split(b"\0") and pid_alive(pid):
            found[pid] = cmdline.replace(b"\0", b" ").decode(errors="replace").strip()
    return found


def wait_gone(pids: Callable[[], dict[int, str]] | set[int], timeout: float = EXIT_GRACE_S) -> dict[int, str]:
    """Wait until the given processes have exited; returns those still alive after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        alive = pids() if callable(pids) else {pid: "" for pid in pids if pid_alive(pid)}
        if not alive or time.monotonic() >= deadline:
            return alive
        time.sleep(0.05)


def replica_pids(status: ApiStatus) -> set[int]:
    return {r.pid for r in status.replicas if r.pid is not None}


def _reap_spawned_daemons() -> None:
    """Reap daemons `Client.up()` spawned from this process, so they leave no zombies."""
    from cirrus import client as client_module

    for proc in list(client_module._children):
        if proc.poll() is not None:
            client_module._children.remove(proc)


# --- one state directory ---------------------------------------------------------------


class Cirrus:
    """A Cirrus state directory with its environment: runs the CLI, makes clients, starts the daemon."""

    def __init__(self, home: Path, **env: str) -> None:
        self.home = home
        self.env = {
            **os.environ,
            "CIRRUS_HOME": str(home),
            "CIRRUS_PORT": "0",
            "CIRRUS_ADMIN_PORT": "0",
            "COLUMNS": "200",  # rich tables on one line each
            "NO_COLOR": "1",
            **env,
        }
        self.env.pop("CIRRUS_PYTHON", None)
        self._clients: list[Client] = []

    @property
    def settings(self) -> Settings:
        return Settings.from_env(self.env)

    def client(self) -> Client:
        client = Client(self.settings)
        self._clients.append(client)
        return client

    def cli(self, *args: str, timeout: float = CLI_TIMEOUT_S, input: str | None = None) -> tuple[int, str, str]:
        """Run `python -m cirrus.cli ARGS` with this environment: (exit code, stdout, stderr)."""
        result = subprocess.run(
            [sys.executable, "-m", "cirrus.cli", *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            input=input,
            stdin=None if input is not None else subprocess.DEVNULL,
        )
        return result.returncode, result.stdout, result.stderr

    # The daemon.

    def up(self) -> DaemonInfo:
        return self.client().up()

    @property
    def info(self) -> DaemonInfo:
        return self.client().daemon_info()

    @property
    def gateway_url(self) -> str:
        return self.info.gateway_url

    def url(self, path: str) -> str:
        return self.gateway_url.rstrip("/") + "/" + path.lstrip("/")

    def processes(self) -> dict[int, str]:
        return processes_of(self.home)

    def daemon_log(self) -> str:
        try:
            return self.settings.daemon_log.read_text(errors="replace")
        except OSError:
            return ""

    def wait_for(self, name: str, check: Callable[[ApiStatus], bool], timeout: float = 30.0) -> ApiStatus:
        """Poll `get(name)` until `check` holds."""
        client = self.client()
        deadline = time.monotonic() + timeout
        while True:
            status = client.get(name)
            if check(status):
                return status
            if time.monotonic() >= deadline:
                raise AssertionError(f"timed out waiting on {name}: {status.model_dump_json(indent=1)}")
            time.sleep(0.1)

    def shutdown(self) -> dict[int, str]:
        """Stop the daemon (if any) and everything it started; returns the processes that outlived it
        (already killed with SIGKILL)."""
        with contextlib.suppress(Exception):
            self.client().down(timeout=20)
        for client in self._clients:
            client.close()
        self._clients.clear()
        leftovers = wait_gone(self.processes)
        for pid in leftovers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        wait_gone(self.processes, 5.0)
        _reap_spawned_daemons()
        return leftovers


def _check_no_orphans(cirrus: Cirrus) -> None:
    leftovers = cirrus.shutdown()
    if leftovers:
        pytest.fail(
            "processes outlived the test (killed now):\n"
            + "\n".join(f"  {pid}: {cmd}" for pid, cmd in leftovers.items())
            + "\n--- daemon.log ---\n"
            + cirrus.daemon_log()[-4000:]
        )


# --- fixtures --------------------------------------------------------------------------


@pytest.fixture
def cirrus_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh state directory, also exported (with ports 0) for any subprocess the test starts."""
    home = tmp_path / "cirrus-home"
    monkeypatch.setenv("CIRRUS_HOME", str(home))
    monkeypatch.setenv("CIRRUS_PORT", "0")
    monkeypatch.setenv("CIRRUS_ADMIN_PORT", "0")
    monkeypatch.delenv("CIRRUS_PYTHON", raising=False)
    monkeypatch.delenv("CIRRUS_MAX_BODY_BYTES", raising=False)
    return home


@pytest.fixture
def cirrus(cirrus_home: Path) -> Iterator[Cirrus]:
    """The test's state directory; whatever the test started there is stopped (and checked) after it."""
    env = Cirrus(cirrus_home)
    yield env
    _check_no_orphans(env)


@pytest.fixture
def daemon(cirrus: Cirrus) -> Cirrus:
    """A running daemon (started with `Client(settings).up()`), stopped after the test."""
    cirrus.up()
    return cirrus


@pytest.fixture
def cli(cirrus: Cirrus) -> Callable[..., tuple[int, str, str]]:
    """`cli("get", "-o", "json")` -> (exit code, stdout, stderr) of the real CLI in a subprocess."""
    return cirrus.cli


@contextlib.contextmanager
def module_daemon(home: Path, **env: str) -> Iterator[Cirrus]:
    """A daemon shared by a module's tests (for module-scoped fixtures)."""
    cirrus = Cirrus(home, **env)
    cirrus.up()
    try:
        yield cirrus
    finally:
        _check_no_orphans(cirrus)


# --- tiny projects ---------------------------------------------------------------------


def write_project(
    directory: Path,
    predictors: dict[str, str] | str,
    apis: list[dict[str, Any]] | None = None,
    **spec: Any,
) -> Path:
    """Write predictor file(s) and a cirrus.yaml into `directory`; returns the directory.

    `predictors` is the source of `predictor.py`, or {file name: source}. Without `apis`, one API
    is written from `spec` (name defaults to "echo", predictor to predictor.py:Predictor, one
    replica); each entry of `apis` is completed the same way.
    """
    directory.mkdir(parents=True, exist_ok=True)
    files = {"predictor.py": predictors} if isinstance(predictors, str) else predictors
    for name, source in files.items():
        (directory / name).write_text(textwrap.dedent(source))
    entries = apis if apis is not None else [spec]
    (directory / "cirrus.yaml").write_text(yaml.safe_dump([_api(entry) for entry in entries], sort_keys=False))
    return directory


def _api(entry: dict[str, Any]) -> dict[str, Any]:
    api = {"name": "echo", "kind": "realtime", **entry}
    predictor = api.get("predictor", {})
    api["predictor"] = {"path": "predictor.py", "class": "Predictor", **predictor}
    api.setdefault("autoscaling", {"min_replicas": 1, "max_replicas": 1})
    return api


ECHO_PREDICTOR = """
    import logging

    log = logging.getLogger("echo")


    class Predictor:
        def __init__(self, config):
            self.greeting = config.get("greeting", "hello")

        def predict(self, payload):
            print(f"echo-print got {payload!r}", flush=True)
            log.warning("echo-log answering %r", payload)
            return {"greeting": self.greeting, "echo": payload}
"""
