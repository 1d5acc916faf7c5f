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


def _int_env(env: dict[str, str], name: str, default: int) -> int:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"environment variable {name}={raw!r} must be an integer") from None


@dataclass(frozen=True)
class Settings:
    home: Path
    host: str = "127.0.0.1"
    gateway_port: int = DEFAULT_GATEWAY_PORT
    admin_port: int = DEFAULT_ADMIN_PORT
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    python: str = sys.executable
    store: str = ""  # the async queue store URL; "" = SQLite at $CIRRUS_HOME/queue.db
    result_ttl_s: int = DEFAULT_RESULT_TTL_S
    s3_endpoint_url: str = ""  # an S3-compatible server for model sources (e.g. MinIO, moto)

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> Settings:
        env = dict(os.environ if env is None else env)
        home = Path(env.get("CIRRUS_HOME") or Path.home() / ".cirrus").expanduser()
        return cls(
            home=home,
            host=env.get("CIRRUS_HOST") or "127.0.0.1",
            gateway_port=_int_env(env, "CIRRUS_PORT", DEFAULT_GATEWAY_PORT),
            admin_port=_int_env(env, "CIRRUS_ADMIN_PORT", DEFAULT_ADMIN_PORT),
            max_body_bytes=_int_env(env, "CIRRUS_MAX_BODY_BYTES", DEFAULT_MAX_BODY_BYTES),
            python=env.get("CIRRUS_PYTHON") or sys.executable,
            store=env.get("CIRRUS_STORE") or "",
            result_ttl_s=_int_env(env, "CIRRUS_RESULT_TTL_S", DEFAULT_RESULT_TTL_S),
            s3_endpoint_url=env.get("CIRRUS_S3_ENDPOINT_URL") or "",
        )

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
    def daemon_log(self) -> Path:
        return self.home / "daemon.log"
