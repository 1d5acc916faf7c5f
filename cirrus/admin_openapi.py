"""The admin API's contract: the models its request bodies are validated with, what each route
answers, and the OpenAPI 3.1 document (`GET /v1/openapi.json`) built from both.

The handlers in `cirrus/admin.py` validate bodies with the models below, and the document takes
its schemas from the same models, so the two cannot drift. `openapi_document` walks the Starlette
app's routes and refuses a route that has no entry in `OPERATIONS` (and an entry with no route):
a new route without docs fails its tests.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Annotated, Any, TypeVar

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError
from pydantic.json_schema import JsonSchemaMode
from starlette.routing import BaseRoute, Route

from cirrus.admin_common import MAX_LOG_LINES
from cirrus.admin_envs import EnvList, PruneAnswer, PruneRequest
from cirrus.jobs import Job, JobRequest
from cirrus.routes import GatewayList, LoadAccepted, LoadReport, RouteTable
from cirrus.spec import API_NAME_RE, RESERVED_NAMES, Deployment
from cirrus.store.base import CANCELLED, REQUEUE_LIMIT
from cirrus.tasks import TaskRequest, TaskRun
from cirrus.types import ApiKey, ApiStatus, DaemonInfo, DeployResult, RevisionInfo

MAX_DEAD_LETTERS = 10_000
MAX_LISTED_REQUESTS = 10_000
REQUEST_ID_RE = re.compile(r"^[0-9a-f]{32}$")  # an async request's id, as the gateway makes them
MAX_REVISION = 2**53  # far beyond any real revision; keeps `to` inside what the stores hold
REPLICA_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")  # `<api>-<hex>`: no path separators

# --- request bodies -------------------------------------------------------------------------------


class KeyRequest(BaseModel):
    """`POST /v1/keys`: what `cirrus keys create` asks for."""

    model_config = ConfigDict(extra="forbid")

    apis: list[str] | None = Field(None, description="the APIs it may call (absent: all)")
    rate: float | None = Field(None, gt=0, description="requests per second (absent: unlimited)")
    burst: float | None = Field(None, ge=1, description="bucket size (default: max(1, rate))")
    expires_in_s: float | None = Field(None, gt=0, description="seconds until it expires (absent: never)")
    name: str | None = Field(None, max_length=200, description="a label for people")


class DeployRequest(BaseModel):
    """`POST /v1/apis`: what `cirrus deploy` sends."""

    model_config = ConfigDict(extra="forbid")

    deployments: list[Deployment] = Field(
        description="the APIs to deploy: spec, project directory, snapshot digest (without one the daemon "
        "packs the project directory itself)"
    )
    force: bool = Field(False, strict=True, description="a new revision even if nothing changed")
    canary: float | None = Field(
        None,
        strict=True,
        gt=0,
        lt=100,
        description="percent of requests the new revision takes beside the serving one, until promoted",
    )


class RollbackRequest(BaseModel):
    """`POST /v1/apis/{name}/rollback` (or an empty body)."""

    model_config = ConfigDict(extra="forbid")

    to: int | None = Field(
        None,
        strict=True,
        ge=1,
        le=MAX_REVISION,
        description="the revision to serve again (absent: abort a running canary, else the revision before "
        "the one serving)",
    )


class BodyError(ValueError):
    """A request body that does not fit its model; the message names each bad field."""


Body = TypeVar("Body", bound=BaseModel)


def parse_body(model: type[Body], data: Any, what: str) -> Body:
    """`data` validated by `model`; BodyError saying what was wrong (`what`: e.g. "deploy request")."""
    if not isinstance(data, dict):
        raise BodyError(f"the {what} must be a JSON object")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        problems = []
        for error in exc.errors(include_url=False):
            where = ".".join(str(part) for part in error["loc"])
            message = error["msg"].removeprefix("Value error, ")
            if error["type"] == "extra_forbidden":
                message = "unknown field"
            problems.append(f"{where}: {message}" if where else message)
        raise BodyError(f"invalid {what}: " + "; ".join(problems)) from None


# --- answers --------------------------------------------------------------------------------------


class ApiList(BaseModel):
    apis: list[ApiStatus]


class DeployAnswer(BaseModel):
    results: list[DeployResult]


class Deleted(BaseModel):
    deleted: str


class RevisionList(BaseModel):
    revisions: list[RevisionInfo]


class StoredSnapshot(BaseModel):
    digest: str
    size: int
    files: int


PREVIEWED = (
    "request records as `GET /<api>/<id>` shows them, with the start of each request's body: `payload` "
    "(text or JSON as text; else base64, with `payload_encoding`), `payload_type`, `payload_bytes` (the "
    "whole body's size) and `truncated`"
)


class DeadLetters(BaseModel):
    dead_letters: list[dict[str, Any]] = Field(description=PREVIEWED)


class RequeueRequest(BaseModel):
    """`POST /v1/apis/{name}/dead-letters/requeue` (or an empty body: every dead letter)."""

    model_config = ConfigDict(extra="forbid")

    ids: list[Annotated[str, Field(pattern=REQUEST_ID_RE.pattern)]] | None = Field(
        None,
        max_length=REQUEUE_LIMIT,
        description=f"the dead letters to requeue (absent: every one, oldest failure first, at most {REQUEUE_LIMIT})",
    )


class Requeued(BaseModel):
    requeued: list[str] = Field(description="the ids back in the queue")
    not_dead_letters: list[str] = Field(description="ids asked for that were not dead letters of the API")


class RequestList(BaseModel):
    requests: list[dict[str, Any]] = Field(description=PREVIEWED)


class RequestView(BaseModel):
    """An async request's record, as `GET /<api>/<id>` shows it."""

    model_config = ConfigDict(extra="allow")

    id: str
    api: str
    status: str
    attempts: int


class JobList(BaseModel):
    jobs: list[Job]


class TaskList(BaseModel):
    tasks: list[TaskRun]


class KeyList(BaseModel):
    keys: list[ApiKey]


class NewKey(BaseModel):
    key: str = Field(description="the key itself, shown only now")
    record: ApiKey


class Stopping(BaseModel):
    stopping: bool


class OpenApiDocument(BaseModel):
    model_config = ConfigDict(extra="allow")

    openapi: str


# --- the operations -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Query:
    name: str
    schema: dict[str, Any]
    description: str


@dataclass(frozen=True)
class Operation:
    summary: str
    answer: type[BaseModel] | None  # the JSON body of the success status; None: `text`
    errors: dict[int, str] = field(default_factory=dict)  # status -> when
    status: int = 200
    body: type[BaseModel] | None = None  # the JSON request body's model
    body_required: bool = True
    binary_body: bool = False  # an archive (POST /v1/snapshots)
    query: tuple[Query, ...] = ()
    text: str = ""  # a text/plain answer: what it holds


NO_API = {404: "no API of that name"}
BAD = {400: "a malformed or invalid request; the error says what was wrong"}
STORE_DOWN = {503: "the queue store cannot take writes now (full, or its server down): retry later"}
NO_TASK_RUN = {404: "no task run with that id"}

OPERATIONS: dict[tuple[str, str], Operation] = {
    ("GET", "/v1/openapi.json"): Operation("this document", OpenApiDocument),
    ("GET", "/v1/health"): Operation("the daemon's pid, version and URLs", DaemonInfo),
    ("GET", "/v1/apis"): Operation("every API's status", ApiList),
    ("POST", "/v1/apis"): Operation(
        "deploy APIs (a new revision of each whose code or spec changed)",
        DeployAnswer,
        {**BAD, 409: "a canary of an API not deployed, or still rolling out"},
        body=DeployRequest,
    ),
    ("GET", "/v1/apis/{name}"): Operation("one API's status: replicas, models, traffic", ApiStatus, NO_API),
    ("DELETE", "/v1/apis/{name}"): Operation("delete an API and stop its replicas", Deleted, NO_API),
    ("GET", "/v1/apis/{name}/logs"): Operation(
        "an API's replica logs",
        None,
        {**BAD, **NO_API},
        query=(
            Query("lines", {"type": "integer", "default": 100}, f"newest lines per replica (0 to {MAX_LOG_LINES})"),
            Query("follow", {"type": "boolean", "default": False}, "stream new lines as they are written"),
            Query("replica", {"type": "string", "pattern": REPLICA_ID_RE.pattern}, "one replica's id (absent: all)"),
        ),
        text="`[replica-id] line` per line",
    ),
    ("GET", "/v1/apis/{name}/revisions"): Operation("an API's revisions", RevisionList, NO_API),
    ("POST", "/v1/apis/{name}/rollback"): Operation(
        "abort a running canary, or serve an earlier revision's snapshot again",
        DeployResult,
        {**BAD, 404: "no API or revision of that name", 409: "no earlier revision"},
        body=RollbackRequest,
        body_required=False,
    ),
    ("POST", "/v1/apis/{name}/promote"): Operation(
        "the canary revision takes every request", DeployResult, {**NO_API, 409: "no canary runs"}
    ),
    ("POST", "/v1/snapshots"): Operation(
        "store a snapshot archive (cirrus.snapshots.pack: a gzip tar of regular files)",
        StoredSnapshot,
        {400: "not a valid snapshot archive", 413: "too large"},
        status=201,
        binary_body=True,
    ),
    ("GET", "/v1/apis/{name}/dead-letters"): Operation(
        "an async API's requests that failed every attempt",
        DeadLetters,
        {**BAD, **NO_API},
        query=(Query("limit", {"type": "integer", "default": 100}, f"at most this many (1 to {MAX_DEAD_LETTERS})"),),
    ),
    ("POST", "/v1/apis/{name}/dead-letters/requeue"): Operation(
        "put an async API's dead letters back in its queue, as new requests (same id, body, headers, webhook)",
        Requeued,
        {**BAD, **NO_API, **STORE_DOWN},
        body=RequeueRequest,
        body_required=False,
    ),
    ("GET", "/v1/apis/{name}/requests"): Operation(
        "an async API's queued and in-progress requests, oldest first",
        RequestList,
        {400: "not an async API, or a bad status or limit", **NO_API},
        query=(
            Query("status", {"type": "string", "enum": ["in_queue", "in_progress"]}, "only these (absent: both)"),
            Query("limit", {"type": "integer", "default": 100}, f"at most this many (1 to {MAX_LISTED_REQUESTS})"),
        ),
    ),
    ("POST", "/v1/requests/{id}/cancel"): Operation(
        "cancel a queued or in-progress async request: it fails with the error "
        f"{CANCELLED!r} (a dead letter, which requeue takes back)",
        RequestView,
        {
            400: "not a request id (32 lowercase hex digits), or `api` is not an async API",
            404: "no such request (or API)",
            409: "it already finished",
            **STORE_DOWN,
        },
        query=(Query("api", {"type": "string"}, "the request's API (absent: every async API is searched)"),),
    ),
    ("POST", "/v1/apis/{name}/jobs"): Operation(
        "submit a batch job",
        Job,
        {**BAD, **NO_API, 503: "this daemon runs no jobs"},
        status=201,
        body=JobRequest,
    ),
    ("GET", "/v1/jobs"): Operation(
        "recent jobs, newest first", JobList, query=(Query("api", {"type": "string"}, "only this API's jobs"),)
    ),
    ("GET", "/v1/jobs/{id}"): Operation("one job's progress", Job, {404: "no job with that id"}),
    ("POST", "/v1/jobs/{id}/cancel"): Operation(
        "cancel a job: `stopping` until its batches in flight end, then `cancelled`",
        Job,
        {404: "no job with that id", 409: "the job already ended"},
    ),
    ("POST", "/v1/jobs/{id}/retry"): Operation(
        "a new job (`retry_of`) that runs again the failed (or never run) batches and failed items of an ended job",
        Job,
        {400: "the job has not ended, or nothing failed", 404: "no job with that id"},
        status=201,
    ),
    ("GET", "/v1/envs"): Operation("the cached Python environments of APIs, their sizes and users", EnvList),
    ("POST", "/v1/envs/prune"): Operation(
        "remove every cached Python environment no revision uses",
        PruneAnswer,
        {**BAD, 413: "the body is too large"},
        body=PruneRequest,
        body_required=False,
    ),
    ("POST", "/v1/apis/{name}/tasks"): Operation(
        "submit a run of a `kind: task` API (pending until it starts)",
        TaskRun,
        {
            400: "not a task API, or a malformed or invalid request",
            **NO_API,
            429: "the API has CIRRUS_TASK_RUNS_WAITING runs pending or running already",
            503: "this daemon runs no task runs",
        },
        status=201,
        body=TaskRequest,
        body_required=False,
    ),
    ("GET", "/v1/tasks"): Operation(
        "recent task runs, newest first",
        TaskList,
        query=(Query("api", {"type": "string"}, "only this API's runs"),),
    ),
    ("GET", "/v1/tasks/{id}"): Operation("one task run: status, attempts, exit reason, times", TaskRun, NO_TASK_RUN),
    ("POST", "/v1/tasks/{id}/cancel"): Operation(
        "cancel a run: a pending one at once, a running one once its process is stopped (SIGTERM, then SIGKILL)",
        TaskRun,
        {**NO_TASK_RUN, 409: "the run already ended"},
    ),
    ("GET", "/v1/tasks/{id}/logs"): Operation(
        "the run's log: every attempt, oldest first (`follow`: then new lines as they are written)",
        None,
        {**NO_TASK_RUN, 400: "lines is not an integer"},
        query=(
            Query("lines", {"type": "integer"}, "how many of the newest lines"),
            Query("follow", {"type": "boolean"}, "keep streaming new lines"),
        ),
        text="log lines, each `[replica-id] text`",
    ),
    ("GET", "/v1/keys"): Operation("the API keys (their records, never the keys)", KeyList),
    ("POST", "/v1/keys"): Operation("create an API key", NewKey, BAD, status=201, body=KeyRequest, body_required=False),
    ("DELETE", "/v1/keys/{id}"): Operation("revoke an API key", ApiKey, {404: "no key with that id"}),
    ("GET", "/v1/gateways"): Operation(
        "the joined gateways (`cirrus gateway --join`) and their last reports", GatewayList
    ),
    ("GET", "/v1/gateways/routes"): Operation(
        "the route table joined gateways follow: every API's settings and ready replicas (their secrets "
        "included), the API keys' digests, the queue store; a long poll",
        RouteTable,
        {**BAD, 503: "this daemon takes no joined gateways"},
        query=(
            Query(
                "version",
                {"type": "string", "maxLength": 200},
                "the version the caller has: the answer waits (up to 20 s) until the table's differs",
            ),
        ),
    ),
    ("POST", "/v1/gateways/{id}/load"): Operation(
        "a joined gateway's load report (the autoscaler adds it to the daemon gateway's)",
        LoadAccepted,
        {**BAD, 429: "too many gateways report already", 503: "this daemon takes no joined gateways"},
        body=LoadReport,
    ),
    ("POST", "/v1/shutdown"): Operation("drain and stop every replica, then the daemon", Stopping),
}


# --- the document ---------------------------------------------------------------------------------

_REF = "#/components/schemas/{model}"
_ERROR_SCHEMA = {"type": "object", "properties": {"error": {"type": "string"}}, "required": ["error"]}
_ERROR = {"$ref": _REF.format(model="Error")}


def openapi_document(routes: Iterable[BaseRoute], version: str) -> dict[str, Any]:
    """The OpenAPI 3.1 document of the admin app with these routes. LookupError: a route with no
    entry in OPERATIONS, or an entry with no route."""
    documented: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for route in routes:
        if not isinstance(route, Route):
            raise LookupError(f"the admin app has a route OPERATIONS cannot describe: {route!r}")
        for method in sorted((route.methods or set()) - {"HEAD"}):
            if (method, route.path) not in OPERATIONS:
                raise LookupError(f"admin route {method} {route.path} has no entry in cirrus.admin_openapi.OPERATIONS")
            documented[(method, route.path)] = _path_parameters(route)
    if stale := set(OPERATIONS) - set(documented):
        raise LookupError(f"OPERATIONS describes routes the admin app lacks: {sorted(stale)}")
    schemas, components = _schemas()
    paths: dict[str, dict[str, Any]] = {}
    for (method, path), parameters in sorted(documented.items()):
        paths.setdefault(path, {})[method.lower()] = _operation(method, path, parameters, schemas)
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "Cirrus admin API",
            "version": version,
            "description": "The daemon's admin API (127.0.0.1 unless CIRRUS_ADMIN_HOST says otherwise); "
            "see docs/admin-api.md.",
        },
        "paths": paths,
        "components": {
            "schemas": {**components, "Error": _ERROR_SCHEMA},
            "securitySchemes": {
                "token": {"type": "http", "scheme": "bearer", "description": "the token in $CIRRUS_HOME/token"}
            },
        },
        "security": [{"token": []}],
    }


def _path_parameters(route: Route) -> list[dict[str, Any]]:
    schemas = {"name": {"type": "string", "pattern": API_NAME_RE.pattern}}  # {id}: a job's, a key's or a gateway's
    return [
        {"name": name, "in": "path", "required": True, "schema": schemas.get(name, {"type": "string", "minLength": 1})}
        for name in route.param_convertors
    ]


def _schemas() -> tuple[dict[tuple[type[BaseModel], JsonSchemaMode], Any], dict[str, Any]]:
    """The JSON schema of every request model (validation) and answer model (serialization), with
    their shared definitions."""
    wanted: set[tuple[type[BaseModel], JsonSchemaMode]] = set()
    for op in OPERATIONS.values():
        if op.body is not None:
            wanted.add((op.body, "validation"))
        if op.answer is not None:
            wanted.add((op.answer, "serialization"))
    inputs = [(key, key[1], TypeAdapter(key[0])) for key in sorted(wanted, key=lambda k: (k[0].__name__, k[1]))]
    refs, definitions = TypeAdapter.json_schemas(inputs, ref_template=_REF)
    components = definitions.get("$defs", {})
    # ApiSpec checks its name in a validator, which JSON schema cannot see: state the rule here.
    components["ApiSpec"]["properties"]["name"].update(
        {"pattern": API_NAME_RE.pattern, "not": {"enum": sorted(RESERVED_NAMES)}}
    )
    return {key: schema for (key, _), schema in refs.items()}, components


def _operation(
    method: str,
    path: str,
    path_parameters: list[dict[str, Any]],
    schemas: dict[tuple[type[BaseModel], JsonSchemaMode], Any],
) -> dict[str, Any]:
    op = OPERATIONS[(method, path)]
    if op.answer is not None:
        answer = {"application/json": {"schema": schemas[(op.answer, "serialization")]}}
    else:
        answer = {"text/plain": {"schema": {"type": "string", "description": op.text}}}
    responses: dict[str, Any] = {str(op.status): {"description": op.summary, "content": answer}}
    for status, when in sorted({401: "a missing or wrong token", **op.errors}.items()):
        responses[str(status)] = {"description": when, "content": {"application/json": {"schema": _ERROR}}}
    operation: dict[str, Any] = {
        "operationId": _operation_id(method, path),
        "summary": op.summary,
        "parameters": path_parameters
        + [
            {"name": q.name, "in": "query", "required": False, "schema": q.schema, "description": q.description}
            for q in op.query
        ],
        "responses": responses,
    }
    if op.body is not None:
        body = {"schema": schemas[(op.body, "validation")]}
        operation["requestBody"] = {"required": op.body_required, "content": {"application/json": body}}
    elif op.binary_body:
        archive = {"schema": {"type": "string", "format": "binary"}}
        content = {"application/gzip": archive, "application/octet-stream": archive}
        operation["requestBody"] = {"required": True, "content": content}
    return operation


def _operation_id(method: str, path: str) -> str:
    words = [part.strip("{}").replace("-", "_").replace(".", "_") for part in path.split("/")[2:]]
    return "_".join([method.lower(), *words])
