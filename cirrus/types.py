"""Shared vocabulary: status records that cross module and process boundaries.

These pydantic models are what the admin API returns and what `cirrus get` prints; every layer
imports them from here, so no layer has to import another one upward.
"""

from __future__ import annotations

from enum import StrEnum

from pydantic import BaseModel, ConfigDict, Field


class ReplicaState(StrEnum):
    PENDING = "pending"  # wanted, but its compute does not fit yet (see `reason`)
    STARTING = "starting"  # process spawned, predictor loading
    READY = "ready"  # serving requests
    DRAINING = "draining"  # gets no new requests, finishing those in flight
    BACKOFF = "backoff"  # crashed or failed to load; restarts after a delay
    STOPPED = "stopped"


class ApiStatusName(StrEnum):
    STARTING = "starting"  # no replica ready yet
    LIVE = "live"  # every desired replica ready
    UPDATING = "updating"  # some replicas starting, or an older revision still serving
    DEGRADED = "degraded"  # some ready, some failing
    ERROR = "error"  # no replica ready and the last start failed
    CANARY = "canary"  # a new revision takes a share of requests beside the serving one


class _Record(BaseModel):
    model_config = ConfigDict(extra="ignore")


class ReplicaStatus(_Record):
    id: str
    revision: int
    state: ReplicaState
    pid: int | None = None
    restarts: int = 0
    in_flight: int = 0
    last_error: str | None = None
    started_at: float | None = None
    reason: str | None = None  # why a pending replica waits, e.g. "needs gpu: 1, 0 free"
    devices: dict[str, str] = Field(default_factory=dict)  # assigned devices, e.g. {"gpu": "0"}
    node: str | None = None  # the node it runs on (a cluster runtime's; None: this machine)


class ModelStatus(_Record):
    name: str
    source: str
    state: str  # pending | fetching | ready | failed
    done_bytes: int = 0
    total_bytes: int = 0
    path: str | None = None  # the local path replicas get
    error: str | None = None


class EnvStatus(_Record):
    """An API's own Python environment (`python:` in its spec), as `cirrus get` shows it."""

    state: str  # pending | resolving | building | ready | failed
    key: str | None = None  # the cached environment ($CIRRUS_HOME/envs/<key>)
    python: str | None = None  # its interpreter, once ready
    error: str | None = None  # the installer's message, when failed
    log: str | None = None  # the build log
    reused: bool = False  # a complete environment with the same pins was there: nothing was built
    build_s: float | None = None


class EnvEntry(_Record):
    """One cached environment, as `cirrus envs list` shows it."""

    key: str
    path: str
    state: str  # ready | building | incomplete
    size_bytes: int
    last_used: float
    created_at: float | None = None
    build_s: float | None = None
    requirements: list[str] = Field(default_factory=list)
    used_by: list[str] = Field(default_factory=list)  # "api/revision"


class TrafficShare(_Record):
    """Where an API's requests went over the last minute: a revision of a canary rollout, or one of a
    splitter's APIs, with how it answered."""

    target: str  # "revision 3", or an API's name
    role: str  # serving | canary | split | shadow
    weight: float | None = None  # percent of requests it is meant to get (None: a shadow's copy of all)
    requests: int = 0
    errors: int = 0  # answered 5xx
    p50_ms: float | None = None
    p99_ms: float | None = None
    replicas_ready: int | None = None  # a revision's

    @property
    def error_rate(self) -> float | None:
        return None if not self.requests else self.errors / self.requests


class ApiStatus(_Record):
    name: str
    kind: str = "realtime"
    status: ApiStatusName
    revision: int
    replicas_ready: int
    replicas_desired: int
    replicas_pending: int = 0
    requests_last_minute: int = 0
    p50_ms: float | None = None
    p99_ms: float | None = None
    in_flight: int = 0
    queued: int = 0
    # An async API's stored requests (None for other kinds): waiting, being worked on, how long the
    # oldest waiting one has waited, and the median arrival-to-result time over the last minute.
    backlog_in_queue: int | None = None
    backlog_in_progress: int | None = None
    backlog_oldest_age_s: float | None = None
    result_latency_p50_s: float | None = None
    endpoint: str
    message: str | None = None
    autoscaler: str | None = None  # the autoscaler's last reasoning
    cold_starts: int = 0
    batch_size_mean: float | None = None  # requests per predict call, last minute
    slot_wait_p50_ms: float | None = None  # time waiting for an inference slot (or a batch), last minute
    predict_p50_ms: float | None = None  # time in predict (or predict_batch), last minute
    last_cold_start_s: float | None = None  # first queued request -> first replica serving, from zero
    replicas: list[ReplicaStatus] = Field(default_factory=list)
    models: list[ModelStatus] = Field(default_factory=list)
    environment: EnvStatus | None = None  # the API's own Python environment (`python:`), if it has one
    canary_percent: float | None = None  # a canary rollout runs: its revision's share of requests
    traffic: list[TrafficShare] = Field(default_factory=list)  # a canary's revisions, or a splitter's APIs


class DeployResult(_Record):
    name: str
    action: str  # created | updated (a new revision) | scaled (scale settings, in place) | unchanged
    revision: int
    endpoint: str


class RevisionInfo(_Record):
    """One revision of an API, as `cirrus revisions API` lists it."""

    revision: int
    created_at: float
    note: str | None  # deploy, a model changed, rollback to N
    snapshot: str | None  # the digest of its code snapshot
    role: str  # "serving", "rolling out", "serving, rolling out" ... or "" for history


class DaemonInfo(_Record):
    """Written to `$CIRRUS_HOME/daemon.json` by a running daemon; clients find it there."""

    pid: int
    version: str
    gateway_url: str
    admin_url: str
    started_at: float
    grpc_address: str | None = None  # HOST:PORT of the v2 gRPC service, when the daemon serves one


class ApiKey(_Record):
    """An API key as the gateway checks it (never the key itself: its SHA-256)."""

    id: str  # the public part of the key: `cirrus_<id>_<secret>`
    digest: str  # hex SHA-256 of the whole key
    apis: list[str] | None = None  # the APIs it may call (None: every API)
    rate: float | None = None  # requests per second (None: unlimited)
    burst: float | None = None  # bucket size (default: max(1, rate))
    expires_at: float | None = None
    created_at: float = 0.0
    revoked_at: float | None = None
    name: str | None = None  # a label for people
