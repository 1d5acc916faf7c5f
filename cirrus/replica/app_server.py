"""A `kind: server` replica: runs the API's web app and reports it ready once its readiness probe passes.

`app: module:attr` (an ASGI app) is imported with the project directory first on `sys.path` and
served in this process by uvicorn, with `root_path` set to `/<api>` so the app's own links (FastAPI's
`/docs`) name the gateway's paths. `command: [...]` runs as a child process (cwd: the project
directory, `$CIRRUS_HOST:$CIRRUS_PORT`: where to serve, its own process group, killed with the replica).

Readiness: `GET readiness.path` every `PROBE_EVERY_S` until it answers 2xx or 3xx (then
`ReplicaReady`, address `http://HOST:PORT`) or `readiness.timeout_s` passes (`ReplicaFailed`, with
the last answer). Once ready it is probed every `readiness.period_s`; `failure_threshold` failures in
a row make the replica exit (the controller restarts it), as does a command that exits.

An ASGI app run here only answers requests that carry the replica's secret (`SECRET_HEADER`, sent by
the gateway), as a predictor replica only talks to a gateway that proves it knows the secret; a
command's server cannot be made to check it (it listens on loopback, or the node's address on Ray).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import hmac
import importlib
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import httpx

from cirrus.replica import path_with_our_bin
from cirrus.wire import ReplicaFailed, ReplicaLaunch, ReplicaReady, ServerLaunch

log = logging.getLogger("cirrus.replica")

SECRET_HEADER = "x-cirrus-replica-secret"  # hex of the launch's secret; the gateway sends it, the app never sees it
PROBE_EVERY_S = 0.05  # while waiting for readiness
PROBE_TIMEOUT_S = 5.0  # one probe's answer, at most
STOP_GRACE_S = 30.0  # SIGTERM: requests in flight get this long; a command then gets SIGKILL
PR_SET_PDEATHSIG = 1


class AppExited(Exception):
    """The app (its uvicorn, or the command) stopped by itself; the message says how, `code` the exit code."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


def _bind(listen: str) -> socket.socket:
    """A listening socket on the launch's host (loopback unless a cluster node's address) and a free port."""
    scheme, _, rest = listen.partition(":")
    host = rest.rpartition(":")[0] if scheme == "tcp" else "127.0.0.1"
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, 0))
    sock.listen(2048)
    return sock


def _url_host(sock: socket.socket) -> tuple[str, int]:
    host, port = sock.getsockname()[:2]
    return (f"[{host}]" if ":" in host else host), port


def import_app(project_dir: str, target: str) -> Any:
    """`module:attr` from the project directory (first on sys.path)."""
    if project_dir not in sys.path:
        sys.path.insert(0, project_dir)
    module_name, _, attrs = target.partition(":")
    value: Any = importlib.import_module(module_name)
    for attr in attrs.split("."):
        value = getattr(value, attr)
    if not callable(value):
        raise TypeError(f"{target} is a {type(value).__name__}, not an ASGI app")
    return value


def guarded(app: Any, secret: bytes) -> Any:
    """The app, answering 403 to an HTTP request without the replica's secret (lifespan passes through)."""
    expected = secret.hex().encode()
    key = SECRET_HEADER.encode()

    async def guard(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] in ("http", "websocket"):
            presented = next((v for k, v in scope.get("headers", ()) if k == key), b"")
            if not hmac.compare_digest(presented, expected):
                if scope["type"] == "websocket":
                    await send({"type": "websocket.close", "code": 1008})
                    return
                body = b'{"error":"this replica only answers its gateway"}'
                head = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
                await send({"type": "http.response.start", "status": 403, "headers": head})
                await send({"type": "http.response.body", "body": body})
                return
            scope = {**scope, "headers": [(k, v) for k, v in scope["headers"] if k != key]}
        await app(scope, receive, send)

    return guard


class AppProcess:
    """The app being served: an in-process uvicorn server, or a child process."""

    def __init__(self, launch: ReplicaLaunch, server: ServerLaunch, sock: socket.socket) -> None:
        self.launch = launch
        self.server_launch = server
        self.sock = sock
        self.uvicorn: Any = None
        self.task: asyncio.Task[None] | None = None
        self.child: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        os.chdir(self.launch.project_dir)
        host, port = self.sock.getsockname()[:2]
        os.environ["CIRRUS_PORT"], os.environ["CIRRUS_HOST"] = str(port), host
        if self.server_launch.app is not None:
            self._start_app(self.server_launch.app)
        else:
            assert self.server_launch.command is not None
            self.sock.close()  # the command binds the port itself
            self.child = subprocess.Popen(
                self.server_launch.command,
                cwd=self.launch.project_dir,
                env={**os.environ, "PATH": path_with_our_bin()},
                stdin=subprocess.DEVNULL,
                start_new_session=True,  # its own process group: stopped as a whole
                preexec_fn=_die_with_parent,
            )

    def _start_app(self, target: str) -> None:
        import uvicorn

        class _Server(uvicorn.Server):
            @contextlib.contextmanager
            def capture_signals(self) -> Iterator[None]:  # the replica handles signals itself
                yield

        app = guarded(import_app(self.launch.project_dir, target), self.launch.secret)
        config = uvicorn.Config(
            app,
            root_path=self.server_launch.root_path,
            http="httptools",
            loop="none",
            lifespan="auto",
            log_level="warning",
            log_config=None,  # (its own would replace the replica's logging)
            access_log=False,
            timeout_graceful_shutdown=int(STOP_GRACE_S),
        )
        self.uvicorn = _Server(config)
        self.task = asyncio.get_running_loop().create_task(self._serve())

    async def _serve(self) -> None:
        try:
            await self.uvicorn.serve(sockets=[self.sock])
        except SystemExit as exc:  # uvicorn exits like this when the app's lifespan startup fails
            raise AppExited(f"the app failed to start (its lifespan startup failed; exit {exc.code})", 3) from None

    def exited(self) -> AppExited | None:
        """How the app stopped, if it has."""
        if self.child is not None:
            code = self.child.poll()
            if code is None:
                return None
            return AppExited(f"the command exited with {code}", code if code > 0 else 1)
        task = self.task
        if task is None or not task.done():
            return None
        error = None if task.cancelled() else task.exception()
        if isinstance(error, AppExited):
            return error
        if error is not None:
            return AppExited(f"the app's server failed: {type(error).__name__}: {error}", 1)
        return AppExited("the app's server stopped", 1)

    async def stop(self) -> None:
        """Stop gracefully: uvicorn finishes requests in flight; a command gets SIGTERM, then SIGKILL."""
        if self.uvicorn is not None and self.task is not None:
            self.uvicorn.should_exit = True
            with contextlib.suppress(BaseException):
                await asyncio.wait_for(asyncio.shield(self.task), STOP_GRACE_S + 1)
        child = self.child
        if child is None or child.poll() is not None:
            return
        _signal_group(child.pid, signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE_S
        while child.poll() is None and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        _signal_group(child.pid, signal.SIGKILL)
        child.wait()


def _signal_group(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)


def _die_with_parent() -> None:
    """In the command's child: SIGKILL when the replica dies, even by SIGKILL (Linux)."""
    with contextlib.suppress(Exception):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


async def probe(client: httpx.AsyncClient, url: str, secret: bytes) -> str | None:
    """None when `GET url` answers 2xx or 3xx; else what it answered."""
    try:
        response = await client.get(url, headers={SECRET_HEADER: secret.hex()})
    except httpx.HTTPError as exc:
        return f"GET {httpx.URL(url).path} failed: {type(exc).__name__}: {exc}".rstrip(": ")
    if 200 <= response.status_code < 400:
        return None
    return f"GET {httpx.URL(url).path} answered {response.status_code}"


async def wait_ready(
    app: AppProcess, client: httpx.AsyncClient, url: str, timeout_s: float, stop: asyncio.Event
) -> str | None:
    """Probe until ready (None) or the reason it is not: timed out, the app stopped, or the replica was told to."""
    deadline = time.monotonic() + timeout_s
    last = "nothing answered yet"
    while True:
        if stop.is_set():
            return "stopped before it was ready"
        exited = app.exited()
        if exited is not None:
            return f"{exited} before it was ready (last probe: {last})"
        answer = await probe(client, url, app.launch.secret)
        if answer is None:
            return None
        last = answer
        if time.monotonic() >= deadline:
            return f"not ready within {timeout_s:g}s: {last}"
        await asyncio.sleep(PROBE_EVERY_S)


async def watch(app: AppProcess, client: httpx.AsyncClient, url: str, stop: asyncio.Event) -> int:
    """While ready: probe every period; the exit code (0: told to stop)."""
    server = app.server_launch
    parent = os.getppid()
    failures = 0
    next_probe = time.monotonic() + server.readiness_period_s
    while not stop.is_set():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=0.2)
        if stop.is_set():
            break
        exited = app.exited()
        if exited is not None:
            log.error("%s; the replica exits", exited)
            return exited.code
        if os.getppid() != parent:
            log.warning("its parent process (pid %d, the daemon) is gone; exiting", parent)
            return 0
        if time.monotonic() < next_probe:
            continue
        next_probe = time.monotonic() + server.readiness_period_s
        answer = await probe(client, url, app.launch.secret)
        failures = 0 if answer is None else failures + 1
        if answer is not None:
            log.warning("readiness probe failed (%d of %d in a row): %s", failures, server.failure_threshold, answer)
        if failures >= server.failure_threshold:
            log.error("%d readiness probes failed in a row (%s); the replica exits to be restarted", failures, answer)
            return 4
    return 0


async def serve_app(launch: ReplicaLaunch, status_fd: int, report: Any) -> int:
    """Run the app until told to stop; the exit code. `report(fd, ReplicaReady | ReplicaFailed)`."""
    server = launch.server
    assert server is not None
    started = time.perf_counter()
    logging.getLogger("httpx").setLevel(logging.WARNING)  # (not a line per readiness probe)
    sock = _bind(launch.listen)
    host, port = _url_host(sock)
    app = AppProcess(launch, server, sock)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    timeout = httpx.Timeout(PROBE_TIMEOUT_S)
    async with httpx.AsyncClient(timeout=timeout, trust_env=False, follow_redirects=False) as client:
        try:
            app.start()
            url = f"http://{host}:{port}{server.readiness_path}"
            reason = await wait_ready(app, client, url, server.readiness_timeout_s, stop)
        except Exception as exc:
            log.exception("the app failed to start")
            reason = f"{type(exc).__name__}: {exc}"
        if reason is not None:
            log.error("the app did not become ready: %s", reason)
            report(status_fd, ReplicaFailed(error=reason, stage="start the app"))
            await app.stop()
            return 1
        load_s = time.perf_counter() - started
        address = f"http://{host}:{port}"
        log.info(
            "replica %s of %s serving its app at %s (ready in %.2fs)", launch.replica_id, launch.api, address, load_s
        )
        report(status_fd, ReplicaReady(address=address, pid=os.getpid(), load_s=load_s))
        code = await watch(app, client, url, stop)
    await app.stop()
    return code
