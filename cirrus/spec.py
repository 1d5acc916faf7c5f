"""The API spec: pydantic models of `cirrus.yaml`, YAML loading and clear errors.

Every model forbids unknown fields, so a typo is an error that names the file, the API and the
field path instead of a silently ignored key.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from cirrus.spec_sections import PythonEnvSpec, ServerSpec, TaskSpec, check_env_names
from cirrus.spec_sections import Strict as _Strict

API_NAME_RE = re.compile(r"^[a-z][a-z0-9-]{0,62}$")
# "v1" and "v2": the paths of the OpenAI and Open Inference protocols (`protocol:`) on the gateway.
RESERVED_NAMES = frozenset({"healthz", "metrics", "docs", "openapi-json", "admin", "v1", "v2", "static"})
SPEC_FILENAMES = ("cirrus.yaml", "cirrus.yml")
_MEM_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(Ki|Mi|Gi|Ti|K|M|G|T)?\s*$")
_MEM_UNITS = {
    None: 1,
    "K": 10**3,
    "M": 10**6,
    "G": 10**9,
    "T": 10**12,
    "Ki": 2**10,
    "Mi": 2**20,
    "Gi": 2**30,
    "Ti": 2**40,
}


class SpecError(ValueError):
    """A spec that cannot be used; the message says where and why."""


def parse_memory(value: int | float | str | None) -> int | None:
    """`2Gi`, `512Mi`, `1G` or a plain number of bytes -> bytes."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ValueError(f"{value!r} is not a memory size; use e.g. 512Mi, 2Gi or a number of bytes")
    if isinstance(value, int | float):
        if value < 0:
            raise ValueError("memory must not be negative")
        return int(value)
    match = _MEM_RE.match(value)
    if not match:
        raise ValueError(f"{value!r} is not a memory size; use e.g. 512Mi, 2Gi or a number of bytes")
    return int(float(match.group(1)) * _MEM_UNITS[match.group(2)])


class PredictorSpec(_Strict):
    path: str = Field(description="Python file (relative to the spec file) that defines the predictor class")
    class_name: str = Field("Predictor", alias="class", description="name of the predictor class")
    config: dict[str, Any] = Field(default_factory=dict, description="passed to the predictor's __init__")
    env: dict[str, str] = Field(default_factory=dict, description="environment variables of each replica")

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    @field_validator("path")
    @classmethod
    def _python_file(cls, value: str) -> str:
        if not value.endswith(".py"):
            raise ValueError("must be a .py file")
        return value

    @field_validator("class_name")
    @classmethod
    def _identifier(cls, value: str) -> str:
        if not value.isidentifier():
            raise ValueError(f"{value!r} is not a Python class name")
        return value

    @field_validator("env")
    @classmethod
    def _env_names(cls, value: dict[str, str]) -> dict[str, str]:
        return check_env_names(value)


def _check_units(what: str, value: float) -> float:
    """Device counts: a fraction below 1 shares one device; 1 or more must be whole devices."""
    if value > 1 and value != int(value):
        raise ValueError(f"{what}: {value:g} is neither a fraction of one device nor a whole number of devices")
    return value


class ComputeSpec(_Strict):
    cpu: float = Field(0.0, ge=0, le=4096, description="CPU cores reserved per replica (0: best effort)")
    mem: int | None = Field(None, description="memory reserved per replica, e.g. 2Gi")
    gpu: float = Field(0, ge=0, le=64, description="GPUs per replica (a fraction below 1 shares one device)")
    accelerators: dict[str, float] = Field(
        default_factory=dict, description="other named accelerators per replica, e.g. {neuron: 2}"
    )

    @field_validator("mem", mode="before")
    @classmethod
    def _mem(cls, value: Any) -> int | None:
        return parse_memory(value)

    @field_validator("gpu")
    @classmethod
    def _gpu(cls, value: float) -> float:
        return _check_units("gpu", value)

    @field_validator("accelerators")
    @classmethod
    def _accelerators(cls, value: dict[str, float]) -> dict[str, float]:
        for name, units in value.items():
            if not re.fullmatch(r"[a-z][a-z0-9_]{0,31}", name):
                raise ValueError(f"{name!r} is not an accelerator name (lowercase letters, digits, '_')")
            if name == "gpu":
                raise ValueError("declare GPUs with compute.gpu, not under accelerators")
            if units < 0 or units > 64:
                raise ValueError(f"{name}: {units:g} units is out of range (0-64)")
            _check_units(name, units)
        return value


class ConcurrencySpec(_Strict):
    max_concurrency: int = Field(16, ge=1, le=100_000, description="requests in flight per replica")
    inference_slots: int = Field(1, ge=1, le=1024, description="concurrent predict calls per replica")
    max_queue_length: int = Field(128, ge=0, le=1_000_000, description="requests queued in the gateway per API")
    timeout_s: float = Field(30.0, gt=0, le=86_400, description="time limit of one request")

    @model_validator(mode="after")
    def _slots_fit(self) -> ConcurrencySpec:
        if self.inference_slots > self.max_concurrency:
            raise ValueError(
                f"inference_slots ({self.inference_slots}) must not exceed max_concurrency ({self.max_concurrency})"
            )
        return self


class BatchingSpec(_Strict):
    """Server-side batching: requests gather while the inference slot is busy and the predictor's
    `predict_batch(payloads)` answers them together. `adaptive` (the default) never holds a request
    on an idle replica: a freed slot takes everything waiting, and waits (at most `max_wait_ms`)
    only right after a batch, while fewer requests wait than were in play then (its clients are on
    their way back). `fixed` waits up to `max_wait_ms` for a full batch."""

    max_batch_size: int = Field(32, ge=1, le=1024, description="requests in one predict_batch call at most")
    max_wait_ms: float = Field(5.0, ge=0, le=10_000, description="longest a request waits for a batch to fill")
    mode: Literal["adaptive", "fixed"] = Field(
        "adaptive", description="adaptive: no wait on an idle replica; fixed: always wait up to max_wait_ms"
    )


class ModelSpec(_Strict):
    """A model the API's replicas need: fetched once into the disk cache before they start."""

    name: str = Field(description="how the predictor refers to it (`models[name]`)")
    path: str = Field(description="a local file or directory (relative to the spec), or an fsspec URL (s3://...)")
    version: str | None = Field(None, description="a label; a new version is fetched anew")
    reload_s: float | None = Field(
        None,
        ge=1,
        le=86_400,
        description="a URL model: list its source this often and, when it changed, roll out a new revision "
        "that fetches it (off when absent)",
    )

    @field_validator("name")
    @classmethod
    def _model_name(cls, value: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}", value):
            raise ValueError(f"{value!r} is not a model name (letters, digits, '.', '_', '-')")
        return value

    @field_validator("path")
    @classmethod
    def _model_path(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must not be empty")
        return value

    @property
    def is_url(self) -> bool:
        return "://" in self.path

    @model_validator(mode="after")
    def _reload_needs_url(self) -> ModelSpec:
        if self.reload_s is not None and not self.is_url:
            raise ValueError("reload_s applies to a model fetched from a URL (s3://...); a local path is read in place")
        return self


class MultiModelSpec(_Strict):
    """One API serving many models: the predictor's `load_model(path)` loads the model a request
    names (`POST /<api>/<model>` or the `X-Cirrus-Model` header) from the API's `models:`, and
    each replica keeps the `cache_size` most recently used ones in memory."""

    cache_size: int = Field(4, ge=1, le=1024, description="models held in memory per replica at most")
    disk_cache_size: int = Field(
        16,
        ge=1,
        le=100_000,
        description="models kept in the local disk cache at most (the daemon keeps the largest value among its APIs)",
    )


_HOST_PATTERN_RE = re.compile(r"^(\*|(\*\.)?[a-z0-9]([a-z0-9-]*[a-z0-9])?(\.[a-z0-9]([a-z0-9-]*[a-z0-9])?)*)$")
_FORWARD_HEADER_RE = re.compile(r"^x-[a-z0-9][a-z0-9-]*$")
_CREDENTIAL_HEADERS = frozenset({"x-api-key"})  # Cirrus's own API keys: never stored


class WebhooksSpec(_Strict):
    """Webhooks of an async API (`queue.webhooks`): off unless given. A request may name a webhook
    only on an allowed host, and the replica refuses to call an address that is not public."""

    allowed_hosts: list[str] = Field(
        min_length=1,
        description='hosts a webhook may name: "hooks.example.com", "*.example.org" (its subdomains), '
        '"*" (any host; the address check still applies)',
    )
    allow_private: bool = Field(
        False,
        description="also call hosts that resolve to loopback, link-local, private or reserved addresses "
        "(for trusted networks only: any client of the API can then make the replica POST inside it)",
    )

    @field_validator("allowed_hosts")
    @classmethod
    def _hosts(cls, hosts: list[str]) -> list[str]:
        normalized = [host.strip().lower().rstrip(".") for host in hosts]
        for host in normalized:
            if not _HOST_PATTERN_RE.match(host):
                raise ValueError(
                    f"{host!r} is not a host name: use e.g. hooks.example.com, *.example.org or * "
                    "(no scheme, port or path)"
                )
        return normalized


HttpMethod = Literal["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD"]
_ORIGIN_RE = re.compile(r"^https?://(\[[0-9a-f:.]+\]|[a-z0-9]([a-z0-9.-]*[a-z0-9])?)(:[0-9]{1,5})?$")
_HEADER_NAME_RE = re.compile(r"^[a-z0-9!#$%&'*+.^_`|~-]+$")


class CorsSpec(_Strict):
    """Cross-origin requests from browsers (`cors`): which web pages' scripts may call the API."""

    allow_origins: list[str] = Field(
        min_length=1,
        description='origins whose pages may call the API: "https://app.example.com" (scheme, host and '
        'port only), or "*" for any',
    )
    allow_methods: list[HttpMethod] = Field(
        default_factory=lambda: list[HttpMethod](["POST", "GET"]), min_length=1, description="methods a page may use"
    )
    allow_headers: list[str] = Field(
        default_factory=lambda: ["content-type", "authorization", "x-api-key", "x-request-id"],
        description="request headers a page may send",
    )
    max_age_s: int = Field(600, ge=0, le=86400, description="how long a browser may cache a preflight's answer")
    allow_credentials: bool = Field(
        False, description="let pages send cookies and HTTP authentication (not with the origin *)"
    )

    @field_validator("allow_origins")
    @classmethod
    def _origins(cls, origins: list[str]) -> list[str]:
        normalized = [origin.strip().lower().rstrip("/") for origin in origins]
        for origin in normalized:
            if origin != "*" and not _ORIGIN_RE.match(origin):
                raise ValueError(
                    f"{origin!r} is not an origin: use e.g. https://app.example.com or http://localhost:3000 "
                    '(scheme, host and port only), or "*"'
                )
        return normalized

    @field_validator("allow_methods", mode="before")
    @classmethod
    def _methods(cls, methods: object) -> object:
        return [m.upper() if isinstance(m, str) else m for m in methods] if isinstance(methods, list) else methods

    @field_validator("allow_headers")
    @classmethod
    def _headers(cls, names: list[str]) -> list[str]:
        normalized = [name.strip().lower() for name in names]
        for name in normalized:
            if name == "*" or not _HEADER_NAME_RE.match(name):
                raise ValueError(f"{name!r} is not a header name (list each header a page may send)")
        return normalized

    @model_validator(mode="after")
    def _credentials(self) -> CorsSpec:
        if self.allow_credentials and "*" in self.allow_origins:
            raise ValueError(
                'allow_credentials cannot be combined with the origin "*" (browsers refuse it): list the origins'
            )
        return self


class QueueSpec(_Strict):
    """How an async API's requests are delivered to its replicas (at least once)."""

    max_attempts: int = Field(3, ge=1, le=100, description="deliveries before a request is failed (a dead letter)")
    lease_s: float = Field(
        30.0, ge=0.5, le=3600, description="a replica holds a request this long, renewed while it works"
    )
    forward_headers: list[str] = Field(
        default_factory=list,
        description="X- headers stored with a request and passed to the predictor, besides content-type, "
        "accept, user-agent and x-request-id (every other header, credentials included, is dropped)",
    )
    webhooks: WebhooksSpec | None = Field(None, description="let requests name a webhook (off when absent)")
    durability: Literal["normal", "fsync"] = Field(
        "normal",
        description="normal: an accepted request survives any process crash; fsync: also a power loss "
        "(each accept waits for the disk; see docs/architecture.md)",
    )

    @field_validator("forward_headers")
    @classmethod
    def _forward_headers(cls, names: list[str]) -> list[str]:
        normalized = [name.strip().lower() for name in names]
        for name in normalized:
            if not _FORWARD_HEADER_RE.match(name):
                raise ValueError(f"{name!r}: only X- headers can be forwarded (e.g. x-trace-id)")
            if name in _CREDENTIAL_HEADERS:
                raise ValueError(f"{name!r} carries an API key: it is never stored with a request")
        return normalized


class AutoscalingSpec(_Strict):
    """Request-based autoscaling. Defaults react faster than Cortex's (window 60 s, upscale
    stabilization 60 s, downscale 300 s, factors 1.5/0.75): a spike is met by panic mode within
    seconds, and downscaling stays cautious, because a replica removed too early costs a cold
    start while one kept too long costs only idle memory (docs/autoscaling.md says more)."""

    min_replicas: int = Field(1, ge=0, le=1000, description="lower bound; 0 allows scale to zero")
    max_replicas: int = Field(100, ge=1, le=1000, description="upper bound")
    init_replicas: int | None = Field(None, ge=0, le=1000, description="replicas at deploy (default min)")
    target_concurrency: float | None = Field(
        None, gt=0, le=100_000, description="in-flight requests per replica to aim for (default: inference_slots)"
    )
    window_s: float = Field(30.0, gt=0, le=3600, description="averaging window of the in-flight metric")
    upscale_stabilization_s: float = Field(
        0.0, ge=0, le=3600, description="scale up only to the lowest recommendation over this window"
    )
    downscale_stabilization_s: float = Field(
        60.0, ge=0, le=3600, description="scale down only to the highest recommendation over this window"
    )
    max_upscale_factor: float = Field(4.0, gt=1, le=1000, description="at most this many times the replicas per step")
    max_downscale_factor: float = Field(
        0.5, ge=0, lt=1, description="at least this fraction of the replicas is kept per step"
    )
    tolerance: float = Field(0.05, ge=0, lt=1, description="no change while load is within this fraction of target")
    scale_to_zero_after_s: float = Field(
        300.0, ge=0, le=86_400, description="idle time before going to zero (min_replicas: 0 only)"
    )
    panic_window_s: float = Field(6.0, gt=0, le=600, description="short window that detects a spike")
    panic_threshold: float = Field(
        2.0, gt=1, le=100, description="panic when short-window demand exceeds this multiple of capacity"
    )

    @model_validator(mode="after")
    def _bounds(self) -> AutoscalingSpec:
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas ({self.min_replicas}) exceeds max_replicas ({self.max_replicas})")
        init = self.init_replicas
        if init is not None and not self.min_replicas <= init <= self.max_replicas:
            raise ValueError(
                f"init_replicas ({init}) must lie between min_replicas ({self.min_replicas}) "
                f"and max_replicas ({self.max_replicas})"
            )
        if self.panic_window_s > self.window_s:
            raise ValueError(f"panic_window_s ({self.panic_window_s}) must not exceed window_s ({self.window_s})")
        return self

    @property
    def initial(self) -> int:
        return self.min_replicas if self.init_replicas is None else self.init_replicas


class SplitTarget(_Strict):
    """One API a splitter sends requests to (`weight`), or copies them to (`shadow: true`)."""

    name: str = Field(description="the API's name")
    weight: float | None = Field(
        None, ge=0, le=100, description="percent of the splitter's requests it answers (the weights add up to 100)"
    )
    shadow: bool = Field(
        False,
        description="gets a copy of every request; its answer is discarded and it never slows or fails the caller",
    )

    @model_validator(mode="after")
    def _weight_or_shadow(self) -> SplitTarget:
        if self.shadow and self.weight:
            raise ValueError(f"{self.name!r}: a shadow gets a copy of every request; give it no weight")
        if not self.shadow and self.weight is None:
            raise ValueError(f"{self.name!r}: give it a weight (percent of requests) or `shadow: true`")
        return self


V2Datatype = Literal[
    "BOOL",
    "UINT8",
    "UINT16",
    "UINT32",
    "UINT64",
    "INT8",
    "INT16",
    "INT32",
    "INT64",
    "FP16",
    "FP32",
    "FP64",
    "BF16",
    "BYTES",
]
V2_DATATYPES: tuple[str, ...] = get_args(V2Datatype)


class TensorSpec(_Strict):
    """One input or output of an Open Inference Protocol (v2) model, as its metadata declares it."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.:/-]{1,128}$", description="the tensor's name")
    datatype: V2Datatype = Field(
        description="a v2 datatype: BOOL, UINT8..UINT64, INT8..INT64, FP16, FP32, FP64, BF16 or BYTES"
    )
    shape: list[Annotated[int, Field(ge=-1)]] = Field(
        max_length=32, description="its dimensions; -1 for a dimension of any size (e.g. [-1, 4])"
    )


class ProtocolSpec(_Strict):
    """A standard protocol the API also speaks (besides `POST /<api>`). `protocol: v2` is short for
    `protocol: {name: v2}`."""

    name: Literal["v2", "openai"] = Field(
        description="v2: the Open Inference Protocol (KServe v2, Triton) under /v2/models/<api> and over gRPC; "
        "openai: OpenAI-compatible /v1/models, /v1/embeddings, /v1/chat/completions and /v1/completions"
    )
    inputs: list[TensorSpec] = Field(default_factory=list, max_length=256, description="v2: the model's inputs")
    outputs: list[TensorSpec] = Field(default_factory=list, max_length=256, description="v2: the model's outputs")

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, value: Any) -> Any:
        return {"name": value} if isinstance(value, str) else value

    @model_validator(mode="after")
    def _declared(self) -> ProtocolSpec:
        if self.name != "v2" and (self.inputs or self.outputs):
            raise ValueError("inputs and outputs are declared for protocol v2 only")
        for what, tensors in (("inputs", self.inputs), ("outputs", self.outputs)):
            names = [t.name for t in tensors]
            repeated = sorted({n for n in names if names.count(n) > 1})
            if repeated:
                raise ValueError(f"{what}: each name once; repeated: {', '.join(repeated)}")
        return self


class ApiSpec(_Strict):
    name: str = Field(description="URL-safe API name: lowercase letters, digits and '-'")
    kind: Literal["realtime", "async", "batch", "splitter", "server", "task"] = Field(
        "realtime",
        description="realtime: answer in the HTTP request; async: 202 + id, result fetched later; "
        "batch: runs jobs (cirrus jobs submit) through predict_batch; "
        "splitter: sends each request to one of `apis` by weight (no predictor of its own); "
        "server: a web app (`server:`) gets every request under /<api>/; "
        "task: runs once per `cirrus tasks submit`, to completion",
    )
    predictor: PredictorSpec | None = Field(
        None, description="the code that answers (every kind but splitter and server; a task may run a command)"
    )
    compute: ComputeSpec = Field(default_factory=lambda: ComputeSpec())
    concurrency: ConcurrencySpec = Field(default_factory=lambda: ConcurrencySpec())
    autoscaling: AutoscalingSpec = Field(default_factory=lambda: AutoscalingSpec())
    batching: BatchingSpec | None = Field(
        None, description="server-side batching (the predictor needs predict_batch); off when absent"
    )
    queue: QueueSpec = Field(default_factory=lambda: QueueSpec(), description="async APIs: delivery settings")
    models: list[ModelSpec] = Field(
        default_factory=list, description="models fetched into the disk cache before replicas start"
    )
    multi_model: MultiModelSpec | None = Field(
        None, description="serve `models:` by name through the predictor's load_model(path), cached in memory"
    )
    auth: Literal["none", "required"] = Field(
        "none",
        description="required: every request needs an API key (`cirrus keys create`); a gateway started with "
        "--require-keys (the default when it binds a non-loopback address) requires one for every API",
    )
    cors: CorsSpec | None = Field(
        None, description="let web pages of other origins call the API from a browser; off when absent"
    )
    debug_errors: bool | None = Field(
        None,
        description="500 bodies show the predictor's exception message (it may carry paths, hosts or secrets); "
        "default: false, and true under `cirrus serve`. The message and traceback always go to the replica log",
    )
    apis: list[SplitTarget] | None = Field(
        None, description="a splitter: the APIs it sends requests to, by weight, and its shadows"
    )
    sticky_header: str | None = Field(
        None,
        pattern=r"^[A-Za-z0-9-]{1,64}$",
        description="a splitter: requests with the same value of this header go to the same API",
    )
    protocol: ProtocolSpec | None = Field(
        None,
        description="a realtime API also speaks a standard protocol: `v2` (Open Inference Protocol, REST and "
        "gRPC) or `openai` (OpenAI-compatible endpoints); see docs/protocols.md",
    )
    access_log: bool = Field(
        False,
        description="write one JSON line per request (request id, revision, replica, status, stage timings, "
        "batch size, trace id) to the access log, $CIRRUS_HOME/logs/access.log; see docs/observability.md",
    )

    python: PythonEnvSpec | None = Field(
        None, description="the API's own Python environment (packages, a requirements file); see docs/environments.md"
    )
    server: ServerSpec | None = Field(None, description="kind server: the ASGI app or command each replica serves")
    task: TaskSpec | None = Field(
        None, description="kind task: its command (else the predictor's run), timeout, retries"
    )

    @field_validator("models")
    @classmethod
    def _unique_models(cls, value: list[ModelSpec]) -> list[ModelSpec]:
        names = [m.name for m in value]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"model names must be unique; repeated: {', '.join(duplicates)}")
        return value

    @property
    def target_concurrency(self) -> float:
        """In-flight requests per replica the autoscaler aims for (default: one per inference slot)."""
        return self.autoscaling.target_concurrency or float(self.concurrency.inference_slots)

    @property
    def required_predictor(self) -> PredictorSpec:
        """The predictor of a kind that runs one (every kind but a splitter, which the spec checks)."""
        if self.predictor is None:
            raise SpecError(f"API {self.name!r} ({self.kind}) runs no predictor")
        return self.predictor

    @model_validator(mode="after")
    def _splitter(self) -> ApiSpec:
        self._check_sections()
        if self.kind != "splitter":
            if self.apis is not None or self.sticky_header is not None:
                raise ValueError("`apis` and `sticky_header` belong to a splitter (`kind: splitter`)")
            return self
        given = [n for n in ("predictor", "batching", "multi_model", "python") if getattr(self, n) is not None]
        if self.models:
            given.append("models")
        if given:
            raise ValueError(f"a splitter runs no code of its own; remove {', '.join(given)}")
        targets = self.apis or []
        if not any(not t.shadow for t in targets):
            raise ValueError("a splitter needs `apis`: at least one API with a weight")
        names = [t.name for t in targets]
        if self.name in names:
            raise ValueError("a splitter cannot send requests to itself")
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise ValueError(f"apis: each API once; repeated: {', '.join(repeated)}")
        total = sum(t.weight or 0 for t in targets if not t.shadow)
        if abs(total - 100) > 1e-6:
            raise ValueError(f"apis: the weights add up to {total:g}, not 100")
        return self

    def _check_sections(self) -> None:
        """Which sections each kind takes: a predictor, or a server, or a task's command."""
        if self.server is not None and self.kind != "server":
            raise ValueError("`server` belongs to a web app API (`kind: server`)")
        if self.task is not None and self.kind != "task":
            raise ValueError("`task` belongs to a task API (`kind: task`)")
        if self.kind == "server":
            if self.server is None:
                raise ValueError("a server API needs `server`: an ASGI `app` (module:attribute) or a `command`")
            given = [n for n in ("predictor", "batching", "multi_model", "protocol") if getattr(self, n) is not None]
            if given:
                raise ValueError(f"a server API runs its `server` app; remove {', '.join(given)}")
        elif self.kind == "task":
            if self.predictor is None and (self.task is None or self.task.command is None):
                raise ValueError("a task API needs a `predictor` with run(config), or `task: {command: [...]}`")
            given = [n for n in ("batching", "multi_model", "protocol") if getattr(self, n) is not None]
            if given:
                raise ValueError(f"a task API runs once per submission; remove {', '.join(given)}")
        elif self.kind != "splitter" and self.predictor is None:
            raise ValueError("`predictor` is required (a `path` to the Python file and its `class`)")

    @model_validator(mode="after")
    def _batch_kind(self) -> ApiSpec:
        if self.kind == "batch" and self.batching is not None:
            raise ValueError(
                "batching applies to realtime and async APIs; a batch job already calls predict_batch "
                "with batch_size items: remove `batching`"
            )
        if self.protocol is not None:
            if self.kind != "realtime":
                raise ValueError(f"protocol {self.protocol.name} applies to realtime APIs, not to {self.kind} APIs")
            if self.protocol.name == "v2" and self.multi_model is not None:
                raise ValueError("protocol v2 serves one model per API; multi_model APIs can use protocol openai")
        if self.multi_model is not None:
            if self.kind == "batch":
                raise ValueError("multi_model applies to realtime and async APIs, not to batch APIs")
            if self.batching is not None:
                raise ValueError("multi_model and batching cannot be combined yet: a batch would mix models")
            if not self.models:
                raise ValueError("multi_model serves the API's `models:`; list at least one model")
        return self

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not API_NAME_RE.fullmatch(value):
            raise ValueError(
                f"{value!r} is not a valid API name: use 1-63 lowercase letters, digits and '-', starting with a letter"
            )
        if value in RESERVED_NAMES:
            raise ValueError(f"{value!r} is reserved; pick another name")
        return value


SpecList = Annotated[list[ApiSpec], Field(min_length=1)]


class Deployment(_Strict):
    """One API as the daemon keeps it: the spec plus the directory its paths are relative to."""

    spec: ApiSpec
    project_dir: str
    snapshot: str | None = Field(
        None, pattern=r"^[0-9a-f]{64}$", description="digest of the project directory's snapshot (cirrus/snapshots.py)"
    )

    @property
    def predictor_file(self) -> Path:
        return Path(self.project_dir) / self.spec.required_predictor.path


def _format_error(source: str, raw: Any, error: ValidationError) -> str:
    lines = [f"{source}: invalid spec"]
    for item in error.errors():
        loc = list(item["loc"])
        api = None
        if loc and isinstance(loc[0], int) and isinstance(raw, list) and loc[0] < len(raw):
            entry = raw[loc[0]]
            api = entry.get("name") if isinstance(entry, dict) else None
            loc = loc[1:]
        where = ".".join(str(part) for part in loc) or "(top level)"
        prefix = f"API {api!r}: " if api else ""
        message = item["msg"].removeprefix("Value error, ")
        if item["type"] == "extra_forbidden":
            message = "unknown field"
            allowed = _allowed_fields(loc)
            if allowed:
                message += f"; allowed here: {', '.join(allowed)}"
        lines.append(f"  {prefix}{where}: {message}")
    return "\n".join(lines)


def _allowed_fields(loc: list[Any]) -> list[str]:
    model: type[BaseModel] = ApiSpec
    for part in loc[:-1]:
        field = model.model_fields.get(str(part))
        annotation = getattr(field, "annotation", None)
        # `X | None` (an optional section such as `batching`): the model inside
        annotation = next((a for a in get_args(annotation) if a is not type(None)), annotation)
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return []
        model = annotation
    return [(f.alias or name) for name, f in model.model_fields.items()]


def parse_specs(raw: Any, source: str = "<spec>") -> list[ApiSpec]:
    """Validate already-parsed YAML/JSON (a list of APIs, or one API mapping)."""
    if isinstance(raw, dict):
        raw = [raw]
    if not isinstance(raw, list) or not raw:
        raise SpecError(f"{source}: expected a list of APIs (each a mapping with name, kind, predictor, ...)")
    from pydantic import TypeAdapter

    try:
        specs = TypeAdapter(SpecList).validate_python(raw)
    except ValidationError as exc:
        raise SpecError(_format_error(source, raw, exc)) from None
    seen: set[str] = set()
    for spec in specs:
        if spec.name in seen:
            raise SpecError(f"{source}: API {spec.name!r} is defined twice")
        seen.add(spec.name)
    return specs


def find_spec_file(path: str | Path) -> Path:
    """A spec file itself, or the `cirrus.yaml` inside a directory."""
    target = Path(path).expanduser()
    if target.is_dir():
        for name in SPEC_FILENAMES:
            if (target / name).is_file():
                return target / name
        raise SpecError(f"{target}: no {SPEC_FILENAMES[0]} in this directory")
    if not target.is_file():
        raise SpecError(f"{target}: no such file or directory")
    return target


def load_deployments(path: str | Path) -> list[Deployment]:
    """Read and validate a spec file (or a directory holding `cirrus.yaml`), checking predictor paths."""
    spec_file = find_spec_file(path).resolve()
    try:
        raw = yaml.safe_load(spec_file.read_text())
    except yaml.YAMLError as exc:
        raise SpecError(f"{spec_file}: not valid YAML: {exc}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise SpecError(f"{spec_file}: cannot read: {exc}") from None
    specs = parse_specs(raw, str(spec_file))
    project_dir = spec_file.parent
    deployments = []
    for spec in specs:
        deployment = Deployment(spec=spec, project_dir=str(project_dir))
        check_predictor_path(deployment, str(spec_file))
        check_model_paths(deployment, str(spec_file))
        check_requirements_path(deployment, str(spec_file))
        deployments.append(deployment)
    return deployments


def check_model_paths(deployment: Deployment, source: str) -> None:
    """Local model paths (relative to the spec, or absolute) must exist; URLs are checked when fetched."""
    for index, model in enumerate(deployment.spec.models):
        if model.is_url:
            continue
        path = Path(model.path).expanduser()
        if not path.is_absolute():
            path = Path(deployment.project_dir) / path
        if not path.exists():
            raise SpecError(
                f"{source}: API {deployment.spec.name!r}: models.{index}.path: {path} does not exist "
                "(a local file or directory, relative to the spec, or a URL such as s3://bucket/prefix/)"
            )


def check_requirements_path(deployment: Deployment, source: str) -> None:
    """`python.requirements` must be a file inside the project directory (it travels in the snapshot)."""
    python, project = deployment.spec.python, Path(deployment.project_dir).resolve()
    if python is None or python.requirements is None:
        return
    target = (project / python.requirements).resolve()
    if not target.is_relative_to(project) or not target.is_file():
        where = "points outside the project directory" if not target.is_relative_to(project) else "is no file"
        raise SpecError(f"{source}: API {deployment.spec.name!r}: python.requirements: {target} {where}")


def check_predictor_path(deployment: Deployment, source: str) -> None:
    """The predictor file must exist inside the project directory (no `..` or absolute escapes)."""
    spec = deployment.spec
    if spec.predictor is None:  # a splitter
        return
    project = Path(deployment.project_dir).resolve()
    target = (project / spec.predictor.path).resolve()
    if not target.is_relative_to(project):
        raise SpecError(
            f"{source}: API {spec.name!r}: predictor.path: {spec.predictor.path!r} points outside the "
            f"project directory {project}"
        )
    if not target.is_file():
        raise SpecError(f"{source}: API {spec.name!r}: predictor.path: {target} does not exist")
