"""Sections of the spec for what runs besides a predictor: the API's own Python environment
(`python:`), a web app served as the API (`kind: server`, `server:`) and one-off runs
(`kind: task`, `task:`). `cirrus.spec` assembles them into `ApiSpec`.
"""

from __future__ import annotations

import re

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

ENV_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_DOTTED = r"[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*"
_ASGI_APP_RE = re.compile(rf"^{_DOTTED}:{_DOTTED}$")


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def check_env_names(value: dict[str, str]) -> dict[str, str]:
    for name in value:
        if not ENV_NAME_RE.fullmatch(name):
            raise ValueError(f"{name!r} is not a valid environment variable name")
    return value


class PythonEnvSpec(Strict):
    requirements: str | None = Field(
        None, description="a requirements file, relative to the spec file, installed into the API's own environment"
    )
    packages: list[str] = Field(
        default_factory=list, description="requirement strings (e.g. scikit-learn==1.4.2) installed with it"
    )
    version: str | None = Field(
        None,
        pattern=r"^3\.\d{1,2}(\.\d{1,3})?$",
        description="the Python version of the environment, e.g. 3.11: it must be the daemon's (the default), "
        "whose compiled packages the environment reuses",
    )

    @field_validator("packages")
    @classmethod
    def _packages(cls, value: list[str]) -> list[str]:
        for item in value:
            if not item.strip() or item.lstrip().startswith("-") or "\n" in item:
                raise ValueError(f"{item!r} is not a requirement (a name with an optional version, e.g. six==1.16.0)")
        return value

    @model_validator(mode="after")
    def _something(self) -> PythonEnvSpec:
        if self.requirements is None and not self.packages:
            raise ValueError("give `requirements` (a file) or `packages` (a list), or both")
        return self


class ReadinessSpec(Strict):
    path: str = Field("/", pattern=r"^/[^\s]*$", description="the path probed with GET until it answers 2xx or 3xx")
    timeout_s: float = Field(60.0, gt=0, le=3600, description="a replica not ready by then fails to start")
    period_s: float = Field(5.0, gt=0, le=600, description="how often a ready replica is probed again")
    failure_threshold: int = Field(3, ge=1, le=100, description="failed probes in a row that restart a replica")


class ServerSpec(Strict):
    app: str | None = Field(
        None, description="an ASGI app, `module:attribute` (e.g. main:app), run by Cirrus's uvicorn in each replica"
    )
    command: list[str] | None = Field(
        None, min_length=1, description="a command that serves HTTP on $CIRRUS_PORT (run in the project directory)"
    )
    readiness: ReadinessSpec = Field(default_factory=lambda: ReadinessSpec())
    env: dict[str, str] = Field(default_factory=dict, description="environment variables of each replica")

    @field_validator("env")
    @classmethod
    def _env(cls, value: dict[str, str]) -> dict[str, str]:
        return check_env_names(value)

    @field_validator("app")
    @classmethod
    def _app(cls, value: str | None) -> str | None:
        if value is not None and not _ASGI_APP_RE.fullmatch(value):
            raise ValueError(f"{value!r} is not `module:attribute` (e.g. main:app)")
        return value

    @model_validator(mode="after")
    def _one(self) -> ServerSpec:
        if (self.app is None) == (self.command is None):
            raise ValueError("give exactly one of `app` (an ASGI app, module:attribute) and `command`")
        return self


class TaskSpec(Strict):
    command: list[str] | None = Field(
        None,
        min_length=1,
        description="run this command instead of the predictor's run(config); it reads $CIRRUS_TASK_CONFIG (JSON)",
    )
    timeout_s: float | None = Field(
        None, gt=0, le=30 * 86400, description="a run still going after this long is stopped (timed_out)"
    )
    retries: int = Field(0, ge=0, le=100, description="a failed run is run again this many times at most")
    env: dict[str, str] = Field(default_factory=dict, description="environment variables of each run")

    @field_validator("env")
    @classmethod
    def _env(cls, value: dict[str, str]) -> dict[str, str]:
        return check_env_names(value)
