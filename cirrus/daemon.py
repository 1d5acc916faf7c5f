"""The local daemon: gateway, controller and admin API in one process.

`python -m cirrus.daemon` runs in the background (started by `cirrus up` / `cirrus deploy`);
`serve_foreground` is `cirrus serve PATH`: the same daemon in the foreground, on the same state
directory and ports (so every CLI command finds it), with replica logs printed to the terminal, a
new revision rolled out on each edit of the project (cirrus/reload.py), and Ctrl-C stopping everything.

The daemon's files are private: it runs with umask 077 (so do its replicas), and a state directory
readable by others is tightened to 0700 at start. Both servers are bounded at the edge
(`cirrus/gateway/edge.py`); the descriptor limit is raised to the hard limit for their connections.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import fcntl
import logging
import os
import re
import secrets
import signal
import socket
import stat
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cirrus.settings import Settings, is_loopback
from cirrus.types import ApiKey, DaemonInfo

if TYPE_CHECKING:
    import ssl

    from cirrus.control.controller import Controller
    from cirrus.control.gateways import Gateways
    from cirrus.control.statedb import StateDB
    from cirrus.gateway.app import Gateway
    from cirrus.history import History
    from cirrus.runtimes.base import Runtime
    from cirrus.store.base import QueueStore

log = logging.getLogger("cirrus.daemon")
VERSION = "0.1.0"
SHUTDOWN_GRACE_S = 10  # how long requests in flight may take to finish when the daemon stops
PRIVATE_UMASK = 0o077  # every file the daemon and its replicas create is the owner's only
ADMIN_MAX_CONNECTIONS = 64  # the admin API's connection cap (loopback, one user's CLI and scripts)
ADMIN_KEEP_ALIVE_S = 30.0
DESCRIPTORS_PER_CONNECTION = 1
DESCRIPTOR_RESERVE = 256  # descriptors kept for replicas' connections, logs, databases
LOG_ROTATE_EVERY_S = 5.0  # how often log sizes are checked


class DaemonError(Exception):
    pass


def ensure_token(settings: Settings) -> str:
    """The admin token, created once with mode 0600."""
    path = settings.token_file
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        os.chmod(path, 0o600)
        return path.read_text().strip()
    token = secrets.token_urlsafe(32)
    with os.fdopen(fd, "w") as handle:
        handle.write(token + "\n")
    return token


def make_private(home: Path) -> None:
    """Create the state directory 0700, or tighten an existing one (and the files at its top) that
    others could read or write."""
    home.mkdir(parents=True, exist_ok=True, mode=0o700)
    mode = home.stat().st_mode & 0o777
    if mode & 0o077:
        os.chmod(home, 0o700)
        log.warning("the state directory %s was readable by others (mode %04o); it is 0700 now", home, mode)
    tightened = []
    for entry in home.iterdir():
        with contextlib.suppress(OSError):
            info = entry.lstat()
            if stat.S_ISLNK(info.st_mode) or not info.st_mode & 0o077:
                continue
            os.chmod(entry, info.st_mode & 0o700)
            tightened.append(entry.name)
    if tightened:
        log.warning("made %s in %s private to their owner", ", ".join(sorted(tightened)), home)


@contextlib.contextmanager
def home_lock(settings: Settings) -> Iterator[None]:
    """One daemon per state directory."""
    make_private(settings.home)
    handle = (settings.home / "daemon.lock").open("w")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise DaemonError(f"another Cirrus daemon already runs with the state directory {settings.home}") from None
    try:
        yield
    finally:
        handle.close()


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen(2048)  # fails, not bind, when the port's holder bound it with SO_REUSEADDR too
    except OSError as exc:
        sock.close()
        raise DaemonError(f"cannot listen on {host}:{port}: {exc.strerror or exc}; pick another port") from None
    sock.set_inheritable(False)
    return sock


def _url(sock: socket.socket, scheme: str = "http") -> str:
    host, port = sock.getsockname()[:2]
    if host in ("0.0.0.0", "::"):
        host = "127.0.0.1"
    elif ":" in host:
        host = f"[{host}]"
    return f"{scheme}://{host}:{port}"


def _no_password() -> bytes:
    raise DaemonError("the TLS key is encrypted; give an unencrypted key (e.g. `openssl pkey -in KEY -out NEW`)")


def tls_context(settings: Settings) -> ssl.SSLContext | None:
    """The gateway's TLS, from its certificate and key files (None: plain HTTP), loaded now so that a
    bad pair is one clear line at start rather than a traceback from the server."""
    import ssl

    cert, key = settings.tls_cert, settings.tls_key
    if not cert and not key:
        return None
    if not cert or not key:
        given, missing = ("--tls-cert", "--tls-key") if cert else ("--tls-key", "--tls-cert")
        raise DaemonError(f"{given} needs {missing} too (CIRRUS_TLS_CERT and CIRRUS_TLS_KEY): give both or neither")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_cert_chain(cert, key, password=_no_password)
    except OSError as exc:
        if isinstance(exc, ssl.SSLError):
            if exc.reason == "KEY_VALUES_MISMATCH":
                raise DaemonError(f"the TLS key {key} does not match the certificate {cert}") from None
            raise DaemonError(
                f"cannot load the TLS certificate {cert} and key {key}: {exc.reason or exc} (both must be PEM files)"
            ) from None
        what = exc.filename or f"{cert}, {key}"
        raise DaemonError(f"cannot read the TLS certificate or key {what}: {exc.strerror or exc}") from None
    return context


def _edge_limits(settings: Settings, max_connections: int) -> Any:
    from cirrus.gateway.edge import EdgeLimits

    return EdgeLimits(
        max_url_bytes=settings.max_url_bytes,
        max_header_bytes=settings.max_header_bytes,
        max_headers=settings.max_headers,
        header_timeout_s=settings.header_timeout_s,
        body_timeout_s=settings.body_timeout_s,
        max_connections=max_connections,
    )


def _server(app: Any, name: str, limits: Any, keep_alive_s: float, tls: ssl.SSLContext | None = None) -> Any:
    import uvicorn

    from cirrus.gateway.edge import edge_protocol

    class _Server(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:  # the daemon handles signals itself
            yield

    config = uvicorn.Config(
        app,
        http=edge_protocol(name, limits, tls),  # httptools, bounded; TLS done there too (no `ssl` here)
        ws="none",
        loop="none",
        lifespan="off",
        access_log=False,
        log_level="warning",
        timeout_keep_alive=keep_alive_s,  # type: ignore[arg-type]  # uvicorn takes seconds as an int but any number works
        timeout_graceful_shutdown=SHUTDOWN_GRACE_S,
        server_header=False,
        date_header=False,
    )
    return _Server(config)


@dataclass
class _Parts:
    """What one daemon runs: the control plane over its state, the gateway, the admin API."""

    state_db: StateDB
    queue_store: QueueStore
    runtime: Runtime
    gateway: Gateway
    controller: Controller
    admin: Any
    gateways: Gateways  # the controller's view of the gateways: its own, and the joined ones
    history: History | None = None  # the dashboard's samples of every API (cirrus/history.py)


def _build(settings: Settings, gateway_url: str, info: Callable[[], DaemonInfo], stop: Callable[[], None]) -> _Parts:
    from cirrus.admin import build_admin_app
    from cirrus.control.controller import Controller
    from cirrus.control.envs import EnvBuilder
    from cirrus.control.gateways import Gateways
    from cirrus.control.jobs import JobManager, JobStore
    from cirrus.control.keys import KeyStore
    from cirrus.control.models import ModelFetcher
    from cirrus.control.statedb import StateDB
    from cirrus.control.store import Store
    from cirrus.control.tasks import TaskRunner, TaskStore
    from cirrus.control.telemetry import ControlPlaneCollector
    from cirrus.gateway.app import Gateway
    from cirrus.gateway.async_api import AsyncFront
    from cirrus.gateway.control import GatewayController
    from cirrus.gateway.prometheus import render
    from cirrus.history import History
    from cirrus.runtimes.gpu_metrics import GpuCollector
    from cirrus.runtimes.local import LocalRuntime
    from cirrus.runtimes.resources import describe, discover
    from cirrus.snapshots import SnapshotStore
    from cirrus.store import open_store

    inventory = discover({**os.environ, "CIRRUS_HOME": str(settings.home)})  # reads $CIRRUS_HOME/node.yaml if any
    log.info("node capacity: %s", describe(inventory))
    state_db = StateDB(settings.db_file)
    queue_store = open_store(settings.store_url)
    snapshots = SnapshotStore(settings.home / "snapshots")
    runtime: Runtime
    if settings.runtime == "ray":
        runtime = _ray_runtime(settings, snapshots)
    else:
        runtime = LocalRuntime(
            settings.logs_dir,
            python=settings.python,
            inventory=inventory,
            models_dir=settings.models_dir,
            log_max_bytes=settings.log_max_bytes,
        )
    gateway = Gateway(settings.max_body_bytes)
    gateways = Gateways(GatewayController(gateway), queue_store=settings.store_url)
    controller = Controller(
        Store(state_db),
        runtime,
        gateways,
        endpoint=lambda name: f"{gateway_url}/{name}",
        queue_store=queue_store,
        queue_url=settings.store_url,
        jobs=JobManager(JobStore(state_db), queue_store, settings.home / "jobs"),
        models=ModelFetcher(lambda: _model_cache(settings, runtime.model_cache_dir()), time.monotonic),
        snapshots=snapshots,
        keys=KeyStore(state_db),
        debug_errors=settings.debug_errors,
        envs=EnvBuilder(settings.envs_dir, time.monotonic, settings.envs_max_bytes),
    )
    _check_keys(settings, controller.keys.list())
    controller.tasks = TaskRunner(  # task APIs' runs
        controller, TaskStore(state_db), settings.home / "tasks", settings.task_runs_waiting, settings.task_runs_kept
    )
    telemetry = (ControlPlaneCollector(controller), GpuCollector())
    gateway.metrics_app = lambda: render(gateway, extra=telemetry)
    gateway.record_requests(settings.access_log, settings.log_max_bytes, settings.otel_endpoint)
    gateway.require_keys = settings.keys_required
    gateway.on_cold = controller.demand
    gateway.async_front = AsyncFront(queue_store, queue_spec=controller.queue_spec)
    gateways.queue_spec = controller.queue_spec
    history = History(settings.home / "history.db")
    admin = build_admin_app(
        controller, token=ensure_token(settings), info=info, shutdown=stop, gateways=gateways, history=history
    )
    return _Parts(state_db, queue_store, runtime, gateway, controller, admin, gateways, history)


def _check_keys(settings: Settings, keys: list[ApiKey]) -> None:
    """A gateway other machines can reach must not start open unless told so (`--insecure-no-auth`)."""
    now = time.time()
    live = [k for k in keys if k.revoked_at is None and (k.expires_at is None or k.expires_at > now)]
    if settings.keys_required and not is_loopback(settings.host) and not live:
        raise DaemonError(
            f"the gateway would listen on {settings.host}, which other machines can reach, and no API key exists: "
            "start on 127.0.0.1 first, `cirrus keys create`, then restart on this host; or pass "
            "--insecure-no-auth to serve every API without keys (trusted networks only)"
        )
    if settings.insecure_no_auth and not is_loopback(settings.host):
        log.warning(
            "serving %s without API keys (--insecure-no-auth): anyone who reaches it may call every API", settings.host
        )


async def run(
    settings: Settings,
    *,
    deploy_path: str | None = None,
    on_ready: Callable[[DaemonInfo], None] | None = None,
    stream_logs: bool = False,
    reload: bool = False,
) -> None:
    """Run the daemon until SIGTERM/SIGINT or an admin shutdown (`reload`: roll out a new revision of
    the spec at `deploy_path` whenever its directory changes)."""
    from cirrus.spec import find_spec_file, load_deployments

    deployments = load_deployments(deploy_path) if deploy_path else []
    tls = tls_context(settings)
    _raise_descriptor_limit(settings)
    gateway_sock = _bind(settings.host, settings.gateway_port)
    try:
        admin_sock = _bind(settings.admin_host, settings.admin_port)
    except DaemonError:
        gateway_sock.close()
        raise
    if not is_loopback(settings.admin_host):
        log.warning(
            "the admin API listens on %s (CIRRUS_ADMIN_HOST): whoever reaches it with the token controls this "
            "daemon, over plain HTTP; trusted networks only",
            settings.admin_host,
        )
    gateway_url, admin_url = _url(gateway_sock, "https" if tls is not None else "http"), _url(admin_sock)
    info = DaemonInfo(
        pid=os.getpid(), version=VERSION, gateway_url=gateway_url, admin_url=admin_url, started_at=time.time()
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    parts = _build(settings, gateway_url, lambda: info, stop.set)
    try:
        grpc = await _start_grpc(settings, parts.gateway)
    except DaemonError:
        gateway_sock.close()
        admin_sock.close()
        _close_stores(parts)
        raise
    if grpc is not None:
        info = info.model_copy(update={"grpc_address": grpc.address})
    for sig in (signal.SIGTERM, signal.SIGINT):  # after _build: `ray.init` (the Ray runtime) sets its own
        loop.add_signal_handler(sig, stop.set)
    servers = [
        _server(parts.gateway, "gateway", _edge_limits(settings, settings.max_connections), settings.keep_alive_s, tls),
        _server(parts.admin, "admin API", _edge_limits(settings, ADMIN_MAX_CONNECTIONS), ADMIN_KEEP_ALIVE_S),
    ]
    tasks = [loop.create_task(s.serve(sockets=[k])) for s, k in zip(servers, (gateway_sock, admin_sock), strict=True)]
    parts.controller.restore()
    if parts.controller.tasks is not None:
        parts.controller.tasks.restore()  # runs a stopped or crashed daemon left: re-attached or run again
    if deployments:
        spec_file = find_spec_file(deploy_path or ".").resolve().name
        parts.controller.deploy([parts.controller.snapshot(d, spec_file) for d in deployments])
    background = [
        loop.create_task(parts.controller.run()),
        *([loop.create_task(parts.controller.tasks.run())] if parts.controller.tasks is not None else []),
        loop.create_task(_sample_history(parts)),
        loop.create_task(_purge_results(parts.queue_store, settings.result_ttl_s)),
        loop.create_task(_rotate_logs(parts.runtime, settings.daemon_log, settings.log_max_bytes)),
    ]
    if stream_logs:
        background.append(loop.create_task(_print_logs(parts.runtime)))
    if reload and deploy_path:
        from cirrus.reload import Reloader

        background.append(loop.create_task(Reloader(parts.controller, deploy_path, settings.home).run(stop)))
    settings.daemon_file.write_text(info.model_dump_json())
    log.info("Cirrus daemon %s: gateway %s, admin %s, state %s", VERSION, gateway_url, admin_url, settings.home)
    if grpc is not None:
        log.info("gRPC (Open Inference Protocol v2): %s", grpc.address)
    if on_ready is not None:
        on_ready(info)
    try:
        await stop.wait()
    finally:
        await _stop(settings, parts, servers, tasks, background, grpc)


async def _start_grpc(settings: Settings, gateway: Any) -> Any:
    """The v2 gRPC service beside the gateway (cirrus/gateway/grpc.py) when a gRPC port is set; else None."""
    if settings.grpc_port is None:
        return None
    try:
        from cirrus.gateway.grpc import GrpcError, GrpcTls, start_grpc
    except ImportError as exc:
        raise DaemonError(str(exc)) from None
    tls = GrpcTls(settings.tls_cert, settings.tls_key) if settings.tls_cert and settings.tls_key else None
    try:
        return await start_grpc(
            gateway,
            settings.host,
            settings.grpc_port,
            max_message_bytes=settings.max_body_bytes,
            max_concurrent_rpcs=settings.max_connections,
            tls=tls,
        )
    except GrpcError as exc:
        raise DaemonError(str(exc)) from None


async def _stop(
    settings: Settings,
    parts: _Parts,
    servers: list[Any],
    tasks: list[asyncio.Task[Any]],
    background: list[asyncio.Task[Any]],
    grpc: Any = None,
) -> None:
    log.info("stopping")
    with contextlib.suppress(FileNotFoundError):
        settings.daemon_file.unlink()
    parts.gateways.close()  # joined gateways' long polls answer now
    if grpc is not None:  # RPCs in flight finish (in the grace) while the HTTP servers drain theirs
        tasks = [*tasks, asyncio.ensure_future(grpc.stop(SHUTDOWN_GRACE_S))]
    for server in servers:
        server.should_exit = True
    # Requests in flight finish first (async accepts need the acceptor still running).
    await asyncio.wait(tasks, timeout=SHUTDOWN_GRACE_S + 1)
    if parts.gateway.async_front is not None:
        await parts.gateway.async_front.close()
    if parts.controller.tasks is not None:
        await parts.controller.tasks.shutdown()  # task runs stop before the runtime closes (they run again at start)
    await parts.controller.shutdown()
    for task in background:
        task.cancel()
    await asyncio.gather(*tasks, *background, return_exceptions=True)
    parts.gateway.close_records()
    _close_stores(parts)


def _close_stores(parts: _Parts) -> None:
    if parts.history is not None:
        parts.history.close()
    parts.state_db.close()
    parts.queue_store.close()


async def _sample_history(parts: _Parts) -> None:
    """Every API every 2 s into the dashboard's history (cirrus/history.py), beside the controller loop."""
    from cirrus.history import read_apis, sample

    if parts.history is not None:
        await sample(parts.history, lambda: read_apis(parts.controller, parts.gateway))


def _ray_runtime(settings: Settings, snapshots: Any) -> Runtime:
    """The Ray runtime (`--runtime ray`): a driver of the cluster at `--ray-address`."""
    try:
        from cirrus.runtimes.ray import RayRuntime
    except ImportError as exc:
        raise ValueError(f"--runtime ray needs Ray: pip install 'cirrus-serve[ray]' ({exc})") from None
    if not settings.ray_address:
        raise ValueError("--runtime ray needs the cluster's address: --ray-address HOST:PORT (or RAY_ADDRESS)")
    options = {"s3": {"endpoint_url": settings.s3_endpoint_url}} if settings.s3_endpoint_url else None
    return RayRuntime(
        settings.ray_address,
        snapshots,
        log_max_bytes=settings.log_max_bytes,
        storage_options=options,
        agent_idle_s=settings.ray_agent_idle_s,
        replica_env={"CIRRUS_S3_ENDPOINT_URL": settings.s3_endpoint_url} if settings.s3_endpoint_url else None,
    )


def _model_cache(settings: Settings, directory: Path | None) -> Any:
    """The node's disk cache of fetched models (created on the first model that needs fetching)."""
    from cirrus.models.cache import ModelCache

    options = {"s3": {"endpoint_url": settings.s3_endpoint_url}} if settings.s3_endpoint_url else None
    return ModelCache(directory or settings.models_dir, storage_options=options)


async def _purge_results(queue_store: QueueStore, ttl_s: int, every_s: float = 600.0) -> None:
    """Delete async results older than the TTL, now and then."""
    loop = asyncio.get_running_loop()
    while True:
        try:
            purged = await loop.run_in_executor(None, queue_store.purge, time.time() - ttl_s)
            if purged:
                log.info("purged %d async results older than %ds", purged, ttl_s)
        except Exception:
            log.exception("purging old async results failed")
        await asyncio.sleep(every_s)


def _raise_descriptor_limit(settings: Settings) -> None:
    """Raise the soft limit on open descriptors to the hard one; warn when the connection cap does not fit."""
    from cirrus.gateway.edge import raise_open_files_limit

    limit = raise_open_files_limit()
    needed = (settings.max_connections + ADMIN_MAX_CONNECTIONS) * DESCRIPTORS_PER_CONNECTION + DESCRIPTOR_RESERVE
    if limit < needed:
        log.warning(
            "the open files limit is %d, too low for CIRRUS_MAX_CONNECTIONS=%d (needs about %d): "
            "raise the hard limit (ulimit -Hn, LimitNOFILE=) or lower CIRRUS_MAX_CONNECTIONS",
            limit,
            settings.max_connections,
            needed,
        )


async def _rotate_logs(runtime: Runtime, daemon_log: Path, max_bytes: int, every_s: float = LOG_ROTATE_EVERY_S) -> None:
    """Keep the replicas', the templates' and the daemon's own logs bounded (a cluster's nodes keep theirs)."""
    from cirrus.logs import rotate_all
    from cirrus.runtimes.local import LocalRuntime

    while True:
        await asyncio.sleep(every_s)
        try:
            if isinstance(runtime, LocalRuntime):
                await runtime.rotate_logs(also=(daemon_log,))
            else:
                await asyncio.to_thread(rotate_all, [daemon_log], max_bytes)
        except Exception:
            log.exception("rotating logs failed")


async def _print_logs(runtime: Runtime) -> None:
    async for line in runtime.logs(None, None, 0, True):
        sys.stdout.write(line.decode("utf-8", "replace"))
        sys.stdout.flush()


def _configure_logging() -> None:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def serve_foreground(settings: Settings, path: str) -> None:
    """`cirrus serve PATH`: the daemon in the foreground on `settings`' state directory and ports, the
    spec deployed, a new revision on each edit; Ctrl-C stops everything. DaemonError: it cannot start
    (a daemon already runs on that state directory, a port is taken ...)."""
    from cirrus.loop import run_loop
    from cirrus.spec import load_deployments

    deployments = load_deployments(path)  # fail fast on a bad spec, before anything starts
    tls_context(settings)  # ... and on a bad certificate or key
    _configure_logging()
    os.umask(PRIVATE_UMASK)
    local = settings.with_overrides(debug_errors=True)

    def ready(info: DaemonInfo) -> None:
        for deployment in deployments:
            print(f"{deployment.spec.name}: {info.gateway_url}/{deployment.spec.name}", flush=True)
        if info.grpc_address:
            print(f"gRPC (Open Inference Protocol v2): {info.grpc_address}", flush=True)
        print(f"serving (admin {info.admin_url}, state {local.home}); edits roll out; Ctrl-C stops", flush=True)

    with contextlib.ExitStack() as stack:
        try:
            stack.enter_context(home_lock(local))
        except DaemonError:
            raise DaemonError(
                f"a Cirrus daemon already runs with the state directory {local.home}: stop it (`cirrus down`) "
                "or give `cirrus serve` another --home"
            ) from None
        run_loop(run(local, deploy_path=path, on_ready=ready, stream_logs=True, reload=True))


def serve_joined(settings: Settings, admin_url: str, token: str) -> None:
    """`cirrus gateway --join ADMIN_URL`: one more gateway for that daemon's APIs (cirrus/gateway/join.py),
    in the foreground until SIGTERM or Ctrl-C. DaemonError: it cannot join or cannot serve."""
    from cirrus.loop import run_loop

    if not admin_url.startswith(("http://", "https://")):
        raise DaemonError(f"--join {admin_url!r}: give the daemon's admin API URL, e.g. http://10.0.0.1:8889")
    tls_context(settings)  # a bad certificate or key is one clear line, before anything starts
    _configure_logging()
    for noisy in ("httpx", "httpcore"):  # a line per load report otherwise
        logging.getLogger(noisy).setLevel(logging.WARNING)
    run_loop(_run_joined(settings, admin_url, token))


async def _run_joined(settings: Settings, admin_url: str, token: str) -> None:
    from cirrus.gateway.app import Gateway
    from cirrus.gateway.join import Joiner, JoinError
    from cirrus.gateway.prometheus import render
    from cirrus.runtimes.gpu_metrics import GpuCollector

    tls = tls_context(settings)
    gateway = Gateway(settings.max_body_bytes)
    gpus = (GpuCollector(),)  # this machine's GPUs; the control plane's metrics are the daemon's
    gateway.metrics_app = lambda: render(gateway, extra=gpus)
    gateway.record_requests(settings.access_log, settings.log_max_bytes, settings.otel_endpoint)
    gateway.require_keys = settings.keys_required
    sock = _bind(settings.host, settings.gateway_port)
    url = _url(sock, "https" if tls is not None else "http")
    joiner = Joiner(gateway, admin_url, token, _gateway_id(), url)
    try:
        table = await joiner.join()
        _check_keys(settings, table.keys)
    except (JoinError, DaemonError) as exc:
        await joiner.close()
        sock.close()
        raise DaemonError(str(exc)) from None
    _raise_descriptor_limit(settings)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        grpc = await _start_grpc(settings, gateway)
    except DaemonError:
        await joiner.close()
        sock.close()
        raise
    server = _server(gateway, "gateway", _edge_limits(settings, settings.max_connections), settings.keep_alive_s, tls)
    serving = loop.create_task(server.serve(sockets=[sock]))
    tasks = joiner.start()
    log.info("gateway %s joined %s (%d APIs): serving %s", joiner.gateway_id, admin_url, len(table.apis), url)
    print(f"gateway {joiner.gateway_id} joined {admin_url}: serving {url}", flush=True)
    if grpc is not None:
        print(f"gRPC (Open Inference Protocol v2): {grpc.address}", flush=True)
    try:
        await stop.wait()
    finally:
        log.info("stopping")
        server.should_exit = True
        draining = [serving] if grpc is None else [serving, asyncio.ensure_future(grpc.stop(SHUTDOWN_GRACE_S))]
        await asyncio.wait(draining, timeout=SHUTDOWN_GRACE_S + 1)  # requests in flight finish first
        for task in tasks:
            task.cancel()
        await asyncio.gather(serving, *tasks, return_exceptions=True)
        await joiner.close()
        gateway.close_records()


def _gateway_id() -> str:
    """This joined gateway's name in the daemon's reports: its host and pid."""
    host = re.sub(r"[^A-Za-z0-9._-]", "-", socket.gethostname()).strip("-._")[:100] or "gateway"
    return f"{host}-{os.getpid()}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m cirrus.daemon", description="The Cirrus local daemon")
    parser.add_argument("--home")
    parser.add_argument("--host")
    parser.add_argument("--port", type=int)
    parser.add_argument("--admin-port", type=int)
    args = parser.parse_args(argv)
    settings = Settings.from_env().with_overrides(
        home=Path(args.home).expanduser() if args.home else None,
        host=args.host,
        gateway_port=args.port,
        admin_port=args.admin_port,
    )
    _configure_logging()
    os.umask(PRIVATE_UMASK)
    from cirrus.control.statedb import StateCorrupt
    from cirrus.loop import run_loop

    try:
        with home_lock(settings):
            run_loop(run(settings))
    except (DaemonError, StateCorrupt) as exc:
        log.error("%s", exc)
        sys.exit(1)


if __name__ == "__main__":
    main()
