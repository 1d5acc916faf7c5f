"""A real S3 API for tests: `moto_server` on a free loopback port, in memory, stopped after.

    with s3_server() as s3:                       # a context manager, for any fixture scope
        fs = s3.filesystem()                      # an s3fs.S3FileSystem talking to it
        fs.mkdir("my-bucket")
        cache = ModelCache(root, storage_options=s3.storage_options)

or ask for the module-scoped `s3` fixture (import `s3_fixture` into a test module or conftest).
While a server runs, the process's environment holds test credentials (`AWS_ACCESS_KEY_ID` and
`AWS_SECRET_ACCESS_KEY` = `testing`, `AWS_DEFAULT_REGION` = `us-east-1`), restored on exit.
`requests_since(mark)` reads the server's request log, to prove what was (not) downloaded. Tests
that need it are skipped loudly when moto's server or s3fs is not installed (`tests/backends.py`).
"""

from __future__ import annotations

import contextlib
import http.client
import os
import re
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import backends
import pytest
from backends import moto_server_binary

START_TIMEOUT_S = 20.0
STOP_TIMEOUT_S = 10.0
TEST_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",  # never wait for an instance-metadata endpoint
}
_LOG_LINE = re.compile(r'"(?P<method>[A-Z]+) (?P<target>\S+) HTTP/[\d.]+" (?P<status>\d{3})')
# Werkzeug's development server colours some request lines (a 206 is `"\x1b[35m\x1b[1mGET ... HTTP/1.1\x1b[0m" 206`,
# errors red, redirects cyan): its styles are dropped before a line is parsed.
_ANSI_STYLE = re.compile(r"\x1b\[[0-9;]*m")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass(frozen=True)
class Request:
    """One request the server logged."""

    method: str
    target: str  # path and query, e.g. /bucket/key or /bucket?list-type=2&prefix=...
    status: int

    @property
    def path(self) -> str:
        return self.target.partition("?")[0]

    @property
    def query(self) -> str:
        return self.target.partition("?")[2]


def parse_request_log(text: str) -> list[Request]:
    """The requests in a Werkzeug request log, in order; colour styles and other lines are ignored."""
    plain = _ANSI_STYLE.sub("", text)
    return [Request(m["method"], m["target"], int(m["status"])) for m in _LOG_LINE.finditer(plain)]


class MotoServer:
    """One `moto_server` process on `host` (127.0.0.1 unless another address of this machine is given,
    e.g. a test cluster's bridge), all state in memory, logging to `directory`."""

    def __init__(self, directory: Path, env: Mapping[str, str] | None = None, host: str = "127.0.0.1") -> None:
        self.host = host
        self.executable = moto_server_binary()
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.extra_env = dict(env or {})
        self.port = _free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def endpoint_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def storage_options(self) -> dict[str, dict[str, Any]]:
        """Per-protocol fsspec options, as `ModelCache(storage_options=...)` takes them."""
        return {"s3": {"endpoint_url": self.endpoint_url}}

    @property
    def log_path(self) -> Path:
        return self.directory / f"moto-{self.port}.log"

    def filesystem(self, **options: Any) -> Any:
        """A fresh `s3fs.S3FileSystem` on this server (not shared through fsspec's instance cache)."""
        s3fs = backends.module("s3fs", "s3")
        return s3fs.S3FileSystem(endpoint_url=self.endpoint_url, skip_instance_cache=True, **options)

    def start(self) -> str:
        """Start the server; returns its endpoint URL. A port taken meanwhile is picked again."""
        for attempt in range(3):
            try:
                return self._start()
            except RuntimeError:
                if attempt == 2 or "Address already in use" not in self._log_tail():
                    raise
                self.port = _free_port()
        raise AssertionError("unreachable")

    def _start(self) -> str:
        env = {**os.environ, **TEST_ENV, **self.extra_env, "PYTHONUNBUFFERED": "1"}
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [self.executable, "-H", self.host, "-p", str(self.port)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
            )
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"moto_server exited with {self.process.returncode}:\n{self._log_tail()}")
            with contextlib.suppress(OSError, http.client.HTTPException):
                if self._get("/moto-api/data.json") == 200:
                    return self.endpoint_url
            if time.monotonic() >= deadline:
                self.stop()
                raise RuntimeError(f"moto_server did not answer in {START_TIMEOUT_S}s:\n{self._log_tail()}")
            time.sleep(0.05)

    def _get(self, target: str, method: str = "GET") -> int:
        connection = http.client.HTTPConnection(self.host, self.port, timeout=5)
        try:
            connection.request(method, target)
            response = connection.getresponse()
            response.read()
            return response.status
        finally:
            connection.close()

    def stop(self) -> None:
        if self.process is None:
            return
        self.process.terminate()
        try:
            self.process.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.process = None

    # --- the request log ------------------------------------------------------------------------

    def mark(self) -> int:
        """A position in the request log: every request answered before this call is logged before it."""
        return len(self._requests())

    def requests_since(self, mark: int) -> list[Request]:
        """The requests logged after `mark` (excluding this helper's own)."""
        return self._requests()[mark:]

    def _requests(self) -> list[Request]:
        # The server logs a request after answering it; a request of our own that shows up in the log
        # means every earlier answered request has been logged too (one log, written in order).
        sentinel = f"/moto-api/data.json?sentinel={uuid.uuid4().hex}"
        self._get(sentinel, method="HEAD")
        deadline = time.monotonic() + 5.0
        while True:
            text = self.log_path.read_text(errors="replace")
            if sentinel in text or time.monotonic() >= deadline:
                break
            time.sleep(0.01)
        return [r for r in parse_request_log(text) if "sentinel=" not in r.target]

    def _log_tail(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-2000:]
        except OSError:
            return "(no log)"


@contextlib.contextmanager
def aws_test_credentials() -> Iterator[None]:
    """The test credentials in `os.environ` (s3fs reads them there), restored on exit."""
    saved = {name: os.environ.get(name) for name in TEST_ENV}
    os.environ.update(TEST_ENV)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@contextlib.contextmanager
def s3_server(directory: Path | None = None, env: Mapping[str, str] | None = None) -> Iterator[MotoServer]:
    """A started `MotoServer` (logging into `directory`, a temporary one when none is given), with the
    test credentials in the environment; stopped on exit. `env` adds variables for the server only,
    e.g. `{"INITIAL_NO_AUTH_ACTION_COUNT": "0"}` makes it check credentials."""
    backends.module("s3fs", "s3")
    with contextlib.ExitStack() as stack:
        if directory is None:
            directory = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="cirrus-moto-")))
        stack.enter_context(aws_test_credentials())
        server = MotoServer(directory, env)
        stack.callback(server.stop)
        server.start()
        yield server


@pytest.fixture(scope="module", name="s3")
def s3_fixture(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MotoServer]:
    """One server per test module; tests sharing it should use buckets of their own."""
    with s3_server(tmp_path_factory.mktemp("moto")) as server:
        yield server
