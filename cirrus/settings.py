"""Settings: the one place that reads Cirrus's environment variables.

`Settings.from_env()` is called at start-up by the CLI, the daemon and the client, never at
import time; flags override what it returns.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, replace
from pathlib import Path

DEFAULT_GATEWAY_PORT = 8888
DEFAULT_ADMIN_PORT = 8889
DEFAULT_MAX_BODY_BYTES = 32 * 1024 * 1024
DEFAULT_RESULT_TTL_S = 7 * 24 * 3600
# The edge (cirrus/gateway/edge.py): what a client may send before its request is complete.
DEFAULT_MAX_URL_BYTES = 8 * 1024
DEFAULT_MAX_HEADER_BYTES = 64 * 1024
DEFAULT_MAX_HEADERS = 100
DEFAULT_HEADER_TIMEOUT_S = 10.0
DEFAULT_BODY_TIMEOUT_S = 10.0
DEFAULT_KEEP_ALIVE_S = 5.0
DEFAULT_MAX_CONNECTIONS = 1000
DEFAULT_LOG_MAX_BYTES = 16 * 1024 * 1024  # a log file past this is rotated (one previous file kept)
DEFAULT_TASK_RUNS_WAITING = 1000  # runs of one task API pending or running at most (more: 429)
DEFAULT_TASK_RUNS_KEPT = 1000  # ended runs of one task API kept with their logs (older ones removed)
DEFAULT_ENVS_MAX_BYTES = 20 * 2**30  # APIs' cached Python environments past this: least recently used go


def _int_env(env: dict[str, str], name: str, default: int) -> int:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"environment variable {name}={raw!r} must be an integer") from None


def _port_env(env: dict[str, str], name: str) -> int | None:
    """A port that is off unless set ("": off; 0: any free port)."""
    if not env.get(name):
        return None
    value = _int_env(env, name, 0)
    if not 0 <= value <= 65535:
        raise ValueError(f"environment variable {name}={value} must be a port, 0 to 65535")
    return value


def _positive_int_env(env: dict[str, str], name: str, default: int) -> int:
    value = _int_env(env, name, default)
    if value <= 0:
        raise ValueError(f"environment variable {name}={value} must be greater than 0")
    return value


def _bool_env(env: dict[str, str], name: str) -> bool | None:
    raw = env.get(name, "").strip().lower()
    if raw == "":
        return None
    if raw in ("1", "true", "yes", "on"):
        return True
    if raw in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"environment variable {name}={raw!r} must be 1 or 0")


RUNTIMES = ("local", "ray")


def _runtime(name: str) -> str:
    if name not in RUNTIMES:
        raise ValueError(f"CIRRUS_RUNTIME={name!r}: the runtimes are {', '.join(RUNTIMES)}")
    return name


def is_loopback(host: str) -> bool:
    return host in ("localhost", "::1") or host.startswith("127.")


def _positive_float_env(env: dict[str, str], name: str, default: float) -> float:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"environment variable {name}={raw!r} must be a number of seconds") from None
    if not value > 0:
        raise ValueError(f"environment variable {name}={raw!r} must be greater than 0")
    return value


@dataclass(frozen=True)
class Settings:
    home: Path
    host: str = "127.0.0.1"
    gateway_port: int = DEFAULT_GATEWAY_PORT
    admin_port: int = DEFAULT_ADMIN_PORT
    grpc_port: int | None = None  # the Open Inference Protocol v2 over gRPC on this port (None: off; 0: any free)
    admin_host: str = "127.0.0.1"  # the admin API's address: another is for trusted networks only (the token guards it)
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    python: str = sys.executable
    store: str = ""  # the async queue store URL; "" = SQLite at $CIRRUS_HOME/queue.db
    result_ttl_s: int = DEFAULT_RESULT_TTL_S
    s3_endpoint_url: str = ""  # an S3-compatible server for model sources (e.g. MinIO, moto)
    max_url_bytes: int = DEFAULT_MAX_URL_BYTES  # a longer URL gets 414
    max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES  # more header bytes in all get 431
    max_headers: int = DEFAULT_MAX_HEADERS  # more headers get 431
    header_timeout_s: float = DEFAULT_HEADER_TIMEOUT_S  # a request head must be complete within this
    body_timeout_s: float = DEFAULT_BODY_TIMEOUT_S  # a request body may not go longer without a byte (408)
    keep_alive_s: float = DEFAULT_KEEP_ALIVE_S  # an idle kept-alive gateway connection is closed after this
    max_connections: int = DEFAULT_MAX_CONNECTIONS  # open gateway connections; past it a new one gets 503
    log_max_bytes: int = DEFAULT_LOG_MAX_BYTES  # replica, template and daemon logs are rotated past this
    require_keys: bool | None = None  # every API needs a key; None: when the gateway binds a non-loopback host
    insecure_no_auth: bool = False  # serve a non-loopback host with no keys at all (trusted networks only)
    debug_errors: bool = False  # 500s show the predictor's exception where a spec does not say (cirrus serve: on)
    tls_cert: str = ""  # the gateway serves HTTPS with this PEM certificate (chain) ...
    tls_key: str = ""  # ... and this PEM private key; both or neither (the admin API stays plain HTTP on loopback)
    tls_ca: str = ""  # clients verify the gateway's certificate with this CA file ("": the system's trust store)
    runtime: str = "local"  # where replicas run: "local" (processes of this machine) or "ray" (a Ray cluster)
    ray_address: str = ""  # the Ray cluster's HOST:PORT (runtime "ray"; "": Ray's own RAY_ADDRESS, else a local one)
    ray_agent_idle_s: float = 60.0  # a Ray node without replicas keeps its Cirrus agent (warm templates) this long
    otel_endpoint: str = ""  # OTLP/HTTP base URL the gateway exports spans to ("": none; needs the otel extra)
    envs_max_bytes: int = DEFAULT_ENVS_MAX_BYTES  # disk for APIs' own Python environments (unused ones evicted)
    task_runs_waiting: int = DEFAULT_TASK_RUNS_WAITING  # runs of one task API pending or running at most
    task_runs_kept: int = DEFAULT_TASK_RUNS_KEPT  # ended runs of one task API kept, with their logs

    @property
    def keys_required(self) -> bool:
        """Whether every API needs a key at this gateway."""
        if self.insecure_no_auth:
            return False
        return self.require_keys if self.require_keys is not None else not is_loopback(self.host)

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> Settings:
        env = dict(os.environ if env is None else env)
        home = Path(env.get("CIRRUS_HOME") or Path.home() / ".cirrus").expanduser()
        return cls(
            home=home,
            host=env.get("CIRRUS_HOST") or "127.0.0.1",
            gateway_port=_int_env(env, "CIRRUS_PORT", DEFAULT_GATEWAY_PORT),
            admin_port=_int_env(env, "CIRRUS_ADMIN_PORT", DEFAULT_ADMIN_PORT),
            grpc_port=_port_env(env, "CIRRUS_GRPC_PORT"),
            admin_host=env.get("CIRRUS_ADMIN_HOST") or "127.0.0.1",
            max_body_bytes=_int_env(env, "CIRRUS_MAX_BODY_BYTES", DEFAULT_MAX_BODY_BYTES),
            python=env.get("CIRRUS_PYTHON") or sys.executable,
            store=env.get("CIRRUS_STORE") or "",
            result_ttl_s=_int_env(env, "CIRRUS_RESULT_TTL_S", DEFAULT_RESULT_TTL_S),
            s3_endpoint_url=env.get("CIRRUS_S3_ENDPOINT_URL") or "",
            max_url_bytes=_positive_int_env(env, "CIRRUS_MAX_URL_BYTES", DEFAULT_MAX_URL_BYTES),
            max_header_bytes=_positive_int_env(env, "CIRRUS_MAX_HEADER_BYTES", DEFAULT_MAX_HEADER_BYTES),
            max_headers=_positive_int_env(env, "CIRRUS_MAX_HEADERS", DEFAULT_MAX_HEADERS),
            header_timeout_s=_positive_float_env(env, "CIRRUS_HEADER_TIMEOUT_S", DEFAULT_HEADER_TIMEOUT_S),
            body_timeout_s=_positive_float_env(env, "CIRRUS_BODY_TIMEOUT_S", DEFAULT_BODY_TIMEOUT_S),
            keep_alive_s=_positive_float_env(env, "CIRRUS_KEEP_ALIVE_S", DEFAULT_KEEP_ALIVE_S),
            max_connections=_positive_int_env(env, "CIRRUS_MAX_CONNECTIONS", DEFAULT_MAX_CONNECTIONS),
            log_max_bytes=_positive_int_env(env, "CIRRUS_LOG_MAX_BYTES", DEFAULT_LOG_MAX_BYTES),
            require_keys=_bool_env(env, "CIRRUS_REQUIRE_KEYS"),
            insecure_no_auth=bool(_bool_env(env, "CIRRUS_INSECURE_NO_AUTH")),
            debug_errors=bool(_bool_env(env, "CIRRUS_DEBUG_ERRORS")),
            tls_cert=env.get("CIRRUS_TLS_CERT") or "",
            tls_key=env.get("CIRRUS_TLS_KEY") or "",
            tls_ca=env.get("CIRRUS_TLS_CA") or "",
            runtime=_runtime(env.get("CIRRUS_RUNTIME") or "local"),
            ray_address=env.get("CIRRUS_RAY_ADDRESS") or env.get("RAY_ADDRESS") or "",
            ray_agent_idle_s=_positive_float_env(env, "CIRRUS_RAY_AGENT_IDLE_S", 60.0),
            otel_endpoint=env.get("CIRRUS_OTEL_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_ENDPOINT") or "",
            envs_max_bytes=_positive_int_env(env, "CIRRUS_ENVS_MAX_BYTES", DEFAULT_ENVS_MAX_BYTES),
            task_runs_waiting=_positive_int_env(env, "CIRRUS_TASK_RUNS_WAITING", DEFAULT_TASK_RUNS_WAITING),
            task_runs_kept=_positive_int_env(env, "CIRRUS_TASK_RUNS_KEPT", DEFAULT_TASK_RUNS_KEPT),
        )

    def daemon_env(self) -> dict[str, str]:
        """The environment that gives a daemon started by this process these settings (its home,
        ports and python come as flags)."""
        env = {
            "CIRRUS_HOME": str(self.home),
            "CIRRUS_ADMIN_HOST": self.admin_host,
            "CIRRUS_MAX_BODY_BYTES": str(self.max_body_bytes),
            "CIRRUS_RESULT_TTL_S": str(self.result_ttl_s),
            "CIRRUS_MAX_URL_BYTES": str(self.max_url_bytes),
            "CIRRUS_MAX_HEADER_BYTES": str(self.max_header_bytes),
            "CIRRUS_MAX_HEADERS": str(self.max_headers),
            "CIRRUS_HEADER_TIMEOUT_S": repr(self.header_timeout_s),
            "CIRRUS_BODY_TIMEOUT_S": repr(self.body_timeout_s),
            "CIRRUS_KEEP_ALIVE_S": repr(self.keep_alive_s),
            "CIRRUS_MAX_CONNECTIONS": str(self.max_connections),
            "CIRRUS_LOG_MAX_BYTES": str(self.log_max_bytes),
            "CIRRUS_ENVS_MAX_BYTES": str(self.envs_max_bytes),
            "CIRRUS_TASK_RUNS_WAITING": str(self.task_runs_waiting),
            "CIRRUS_TASK_RUNS_KEPT": str(self.task_runs_kept),
        }
        if self.require_keys is not None:
            env["CIRRUS_REQUIRE_KEYS"] = "1" if self.require_keys else "0"
        if self.insecure_no_auth:
            env["CIRRUS_INSECURE_NO_AUTH"] = "1"
        if self.debug_errors:
            env["CIRRUS_DEBUG_ERRORS"] = "1"
        if self.store:
            env["CIRRUS_STORE"] = self.store
        if self.grpc_port is not None:
            env["CIRRUS_GRPC_PORT"] = str(self.grpc_port)
        if self.s3_endpoint_url:
            env["CIRRUS_S3_ENDPOINT_URL"] = self.s3_endpoint_url
        if self.tls_cert:
            env["CIRRUS_TLS_CERT"] = os.path.abspath(self.tls_cert)
        if self.tls_key:
            env["CIRRUS_TLS_KEY"] = os.path.abspath(self.tls_key)
        if self.runtime != "local":
            env["CIRRUS_RUNTIME"] = self.runtime
        if self.ray_address:
            env["CIRRUS_RAY_ADDRESS"] = self.ray_address
        env["CIRRUS_RAY_AGENT_IDLE_S"] = repr(self.ray_agent_idle_s)
        if self.otel_endpoint:
            env["CIRRUS_OTEL_ENDPOINT"] = self.otel_endpoint
        return env

    def with_overrides(self, **changes: object) -> Settings:
        return replace(self, **{k: v for k, v in changes.items() if v is not None})  # type: ignore[arg-type]

    # Files under the state directory.
    @property
    def token_file(self) -> Path:
        return self.home / "token"

    @property
    def daemon_file(self) -> Path:
        return self.home / "daemon.json"

    @property
    def db_file(self) -> Path:
        return self.home / "state.db"

    @property
    def logs_dir(self) -> Path:
        return self.home / "logs"

    @property
    def store_url(self) -> str:
        return self.store or f"sqlite://{self.home.resolve() / 'queue.db'}"

    @property
    def models_dir(self) -> Path:
        return self.home / "models"

    @property
    def envs_dir(self) -> Path:
        return self.home / "envs"

    @property
    def access_log(self) -> Path:
        return self.logs_dir / "access.log"

    @property
    def daemon_log(self) -> Path:
        return self.home / "daemon.log"
