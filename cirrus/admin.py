"""The daemon's admin REST API (bearer token; 127.0.0.1 unless CIRRUS_ADMIN_HOST says otherwise): deploy,
get, delete, logs, jobs, keys, joined gateways' route table and load reports, shutdown.

What each route takes and answers, and the OpenAPI document (`GET /v1/openapi.json`), live in
`cirrus/admin_openapi.py`; the handlers here validate bodies with its models.
"""

from __future__ import annotations

import asyncio
import hmac
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from cirrus import __version__
from cirrus.admin_common import error, log_response
from cirrus.admin_dashboard import Dashboard, DashboardRoutes, Sessions, is_dashboard_path, refusal, session_allows
from cirrus.admin_envs import env_routes
from cirrus.admin_openapi import (
    MAX_DEAD_LETTERS,
    MAX_LISTED_REQUESTS,
    REPLICA_ID_RE,
    REQUEST_ID_RE,
    BodyError,
    DeployRequest,
    KeyRequest,
    RequeueRequest,
    RollbackRequest,
    openapi_document,
    parse_body,
)
from cirrus.admin_tasks import task_routes
from cirrus.control.controller import Controller
from cirrus.control.gateways import Gateways, TooManyGateways
from cirrus.control.jobs import JobNotFound
from cirrus.control.keys import KeyNotFound
from cirrus.control.rollouts import DeployRefused
from cirrus.jobs import JobError, parse_request
from cirrus.routes import GATEWAY_ID_RE, LoadReport
from cirrus.snapshots import ARCHIVE_OVERHEAD_BYTES, SnapshotError, SnapshotStore
from cirrus.spec import (
    API_NAME_RE,
    Deployment,
    SpecError,
    check_model_paths,
    check_predictor_path,
    check_requirements_path,
)
from cirrus.store.base import RequestRecord, Status, StoreUnavailable
from cirrus.store.files import FileError
from cirrus.store.view import describe, with_payload
from cirrus.types import DaemonInfo

if TYPE_CHECKING:
    from cirrus.history import History

LONG_POLL_S = 20.0  # GET /v1/gateways/routes?version=V waits this long at most for a change
NO_GATEWAYS = "this daemon takes no joined gateways"


class TokenAuth:
    """The admin token on every request; or, for GET of the dashboard only, its session cookie."""

    def __init__(self, app: ASGIApp, token: str, sessions: Sessions | None = None) -> None:
        self.app = app
        self.expected = f"Bearer {token}".encode()
        self.sessions = sessions

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not hmac.compare_digest(given, self.expected):
                if self.sessions is not None and session_allows(scope, self.sessions):
                    await self.app(scope, receive, send)
                    return
                dashboard = self.sessions is not None and is_dashboard_path(scope["path"]) and scope["method"] == "GET"
                response = (
                    refusal(scope) if dashboard else error(401, "missing or wrong admin token (see $CIRRUS_HOME/token)")
                )
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


def check_paths(deployment: Deployment) -> None:
    """The predictor file and the local model paths exist; SpecError saying which does not, or which
    path no file can have (a NUL byte; a model path under `~user` of no such user)."""
    spec, where = deployment.spec, f"deploy: API {deployment.spec.name!r}"
    paths = {"project_dir": deployment.project_dir}
    if spec.predictor is not None:
        paths["predictor.path"] = spec.predictor.path
    paths |= {f"models.{index}.path": model.path for index, model in enumerate(spec.models) if not model.is_url}
    for field, path in paths.items():
        if "\x00" in path:
            raise SpecError(f"{where}: {field} holds a NUL byte")
        if field.startswith("models.") and path.startswith("~"):
            try:
                Path(path).expanduser()
            except RuntimeError:  # pathlib: no home directory for that ~user
                raise SpecError(f"{where}: {field}: {path.partition('/')[0]} is no known user's home") from None
    check_predictor_path(deployment, "deploy")
    check_model_paths(deployment, "deploy")
    check_requirements_path(deployment, "deploy")


class AdminApi:
    """The admin API's handlers, over the controller (and through it, the runtime and the stores)."""

    def __init__(
        self,
        controller: Controller,
        info: Callable[[], DaemonInfo],
        shutdown: Callable[[], None],
        gateways: Gateways | None = None,
    ) -> None:
        if controller.snapshots is None:
            raise ValueError("the admin API needs a controller with a snapshot store")
        self.controller = controller
        self.gateways = gateways  # joined gateways' route table and load reports (None: takes none)
        self.snapshots: SnapshotStore = controller.snapshots
        self.info = info
        self.shutdown = shutdown
        self.document: dict[str, Any] | None = None  # the OpenAPI document, built at its first request

    async def health(self, request: Request) -> Response:
        return JSONResponse(self.info().model_dump(mode="json"))

    async def list_apis(self, request: Request) -> Response:
        return JSONResponse({"apis": [s.model_dump(mode="json") for s in self.controller.statuses()]})

    async def get_api(self, request: Request) -> Response:
        name = request.path_params["name"]
        status = self.controller.status(name)
        if status is None:
            return error(404, f"no API named {name!r}")
        return JSONResponse(status.model_dump(mode="json"))

    async def deploy(self, request: Request) -> Response:
        try:
            body: Any = await request.json()
        except ValueError:
            return error(400, 'the body must be JSON: {"deployments": [...]}')
        if not isinstance(body, dict) or "deployments" not in body:
            return error(400, "the body must be a JSON object with a 'deployments' list")
        try:
            asked = parse_body(DeployRequest, body, "deploy request")
            deployments = asked.deployments
            for deployment in deployments:
                check_paths(deployment)
        except (BodyError, SpecError) as exc:
            return error(400, str(exc))
        names = [d.spec.name for d in deployments]
        if len(set(names)) != len(names):
            return error(400, "an API name appears twice in one deploy")
        try:
            deployments = await asyncio.get_running_loop().run_in_executor(None, self.with_snapshots, deployments)
        except (SnapshotError, SpecError) as exc:
            return error(400, str(exc))
        try:
            results = self.controller.deploy(deployments, force=asked.force, canary=asked.canary)
        except DeployRefused as exc:
            return error(exc.status, str(exc))
        return JSONResponse({"results": [r.model_dump(mode="json") for r in results]})

    def with_snapshots(self, deployments: list[Deployment]) -> list[Deployment]:
        """Each deployment with a stored snapshot (packed here when the client sent none), whose
        tree holds the predictor file."""
        out = []
        for deployment in deployments:
            predictor = deployment.spec.predictor
            if deployment.spec.kind == "splitter":  # no code to snapshot (a server or task API has code, no predictor)
                out.append(deployment.model_copy(update={"snapshot": None}))
                continue
            digest = deployment.snapshot
            if digest is None:
                digest = self.controller.snapshot(deployment).snapshot
                assert digest is not None
            elif not self.snapshots.has(digest):
                raise SnapshotError(
                    f"API {deployment.spec.name!r}: snapshot {digest} was not uploaded (POST /v1/snapshots)"
                )
            tree = self.snapshots.unpacked(digest)
            if predictor is not None and not (tree / predictor.path).is_file():
                raise SpecError(
                    f"API {deployment.spec.name!r}: predictor.path {predictor.path!r} is not in the "
                    f"deployed snapshot of {deployment.project_dir} (is it listed in .cirrusignore?)"
                )
            out.append(deployment.model_copy(update={"snapshot": digest}))
        return out

    async def upload_snapshot(self, request: Request) -> Response:
        limit = self.snapshots.max_bytes + ARCHIVE_OVERHEAD_BYTES
        declared = request.headers.get("content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > limit):
            return error(413, f"a snapshot archive may hold at most {limit} bytes")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                return error(413, f"a snapshot archive may hold at most {limit} bytes")
            chunks.append(chunk)
        try:
            snapshot = await asyncio.get_running_loop().run_in_executor(None, self.snapshots.put, b"".join(chunks))
        except SnapshotError as exc:
            return error(400, str(exc))
        return JSONResponse(
            {"digest": snapshot.digest, "size": snapshot.size, "files": snapshot.files}, status_code=201
        )

    async def list_revisions(self, request: Request) -> Response:
        name = request.path_params["name"]
        state = self.controller.apis.get(name)
        if state is None or state.deleted:
            return error(404, f"no API named {name!r}")
        return JSONResponse(
            {"revisions": [r.model_dump(mode="json") for r in self.controller.rollouts.revisions(name)]}
        )

    async def rollback(self, request: Request) -> Response:
        name = request.path_params["name"]
        try:
            body: Any = await request.json() if await request.body() else {}
            to = parse_body(RollbackRequest, body, 'rollback request ({"to": N} or empty)').to
        except BodyError as exc:
            return error(400, str(exc))
        except ValueError:
            return error(400, 'the body must be JSON: {"to": N} or empty')
        try:
            result = self.controller.rollouts.rollback(name, to)
        except KeyError as exc:
            return error(404, str(exc.args[0]))
        except ValueError as exc:
            return error(409, str(exc))
        return JSONResponse(result.model_dump(mode="json"))

    async def promote(self, request: Request) -> Response:
        name = request.path_params["name"]
        try:
            result = self.controller.rollouts.promote(name)
        except KeyError as exc:
            return error(404, str(exc.args[0]))
        except DeployRefused as exc:
            return error(exc.status, str(exc))
        return JSONResponse(result.model_dump(mode="json"))

    async def delete_api(self, request: Request) -> Response:
        name = request.path_params["name"]
        if not self.controller.delete(name):
            return error(404, f"no API named {name!r}")
        return JSONResponse({"deleted": name})

    async def logs(self, request: Request) -> Response:
        name = request.path_params["name"]
        runtime = self.controller.runtime
        if self.controller.status(name) is None and not (API_NAME_RE.fullmatch(name) and runtime.has_logs(name)):
            return error(404, f"no API named {name!r}")
        replica = request.query_params.get("replica") or None
        if replica is not None and not REPLICA_ID_RE.fullmatch(replica):
            return error(400, f"replica must be a replica id, such as {name}-0a1b2c (see cirrus get {name})")
        return await log_response(request, partial(runtime.logs, name, replica))

    async def dead_letters(self, request: Request) -> Response:
        name = request.path_params["name"]
        if self.controller.status(name) is None:
            return error(404, f"no API named {name!r}")
        store = self.controller.queue_store
        if store is None:
            return JSONResponse({"dead_letters": []})
        try:
            limit = max(1, min(int(request.query_params.get("limit", "100")), MAX_DEAD_LETTERS))
        except ValueError:
            return error(400, "limit must be an integer")
        records = await asyncio.get_running_loop().run_in_executor(None, store.dead_letters, name, limit)
        return JSONResponse({"dead_letters": [with_payload(r) for r in records]})

    def async_api(self, name: str) -> Response | None:
        """None when `name` is a live async API, else the error to answer (404: no such API; 400: another kind)."""
        state = self.controller.apis.get(name)
        if state is None or state.deleted:
            return error(404, f"no API named {name!r}")
        kind = state.stored.deployment.spec.kind
        if kind != "async":
            return error(400, f"API {name!r} is {kind}, not async: only an async API queues requests")
        return None

    async def requeue(self, request: Request) -> Response:
        name = request.path_params["name"]
        if (refused := self.async_api(name)) is not None:
            return refused
        try:
            body: Any = await request.json() if await request.body() else {}
            ids = parse_body(RequeueRequest, body, 'requeue request ({"ids": [...]} or empty)').ids
        except BodyError as exc:
            return error(400, str(exc))
        except ValueError:
            return error(400, 'the body must be JSON: {"ids": [request id, ...]} or empty')
        store, now = self.controller.queue_store, time.time()
        try:
            requeued = [] if store is None else await asyncio.to_thread(store.requeue, name, ids, now)
        except StoreUnavailable as exc:
            return error(503, str(exc))
        missing = [id_ for id_ in dict.fromkeys(ids or []) if id_ not in requeued]
        return JSONResponse({"requeued": requeued, "not_dead_letters": missing})

    async def list_requests(self, request: Request) -> Response:
        name = request.path_params["name"]
        if (refused := self.async_api(name)) is not None:
            return refused
        asked = request.query_params.get("status") or None
        if asked not in (None, Status.IN_QUEUE, Status.IN_PROGRESS):
            return error(400, f"status must be {Status.IN_QUEUE.value} or {Status.IN_PROGRESS.value}")
        try:
            limit = max(1, min(int(request.query_params.get("limit", "100")), MAX_LISTED_REQUESTS))
        except ValueError:
            return error(400, "limit must be an integer")
        store, status = self.controller.queue_store, None if asked is None else Status(asked)
        records = [] if store is None else await asyncio.to_thread(store.list_requests, name, status, limit)
        return JSONResponse({"requests": [with_payload(r) for r in records]})

    async def cancel_request(self, request: Request) -> Response:
        """Cancel an async request, found under `?api=` or among every async API."""
        request_id, api = request.path_params["id"], request.query_params.get("api") or None
        if not REQUEST_ID_RE.fullmatch(request_id):
            return error(400, "a request id is 32 lowercase hex digits (the id a submit answered)")
        if api is not None and (refused := self.async_api(api)) is not None:
            return refused
        names = [api] if api else [s.name for s in self.controller.apis.values() if self.async_api(s.name) is None]
        store = self.controller.queue_store
        try:
            found = None if store is None else await asyncio.to_thread(self._cancel, request_id, names)
        except StoreUnavailable as exc:
            return error(503, str(exc))
        if found is None:
            where = f"API {api!r}" if api else "any async API"
            return error(404, f"no request {request_id} in {where}")
        cancelled, record = found
        if not cancelled:
            return error(409, f"request {request_id} of API {record.api!r} already {record.status.value}")
        return JSONResponse(describe(record))

    def _cancel(self, request_id: str, names: list[str]) -> tuple[bool, RequestRecord] | None:
        """Whether the request was cancelled now, and its record: the first of `names` that holds it."""
        store = self.controller.queue_store
        assert store is not None
        for name in names:
            if store.get(name, request_id) is not None:
                cancelled, record = store.cancel(name, request_id, time.time())
                if record is not None:
                    return cancelled, record
        return None

    async def submit_job(self, request: Request) -> Response:
        name = request.path_params["name"]
        state = self.controller.apis.get(name)
        if state is None or state.deleted:
            return error(404, f"no API named {name!r}")
        if self.controller.jobs is None:
            return error(503, "this daemon runs no jobs")
        try:
            body: Any = await request.json()
        except ValueError:
            return error(400, "the body must be a JSON job request: {items | items_url, batch_size, workers, ...}")
        try:
            job_request = parse_request(body)
            job = await asyncio.get_running_loop().run_in_executor(
                None, self.controller.jobs.submit, state.stored.deployment.spec, job_request
            )
        except (JobError, FileError) as exc:
            return error(400, str(exc))
        self.controller.jobs.track(job)
        return JSONResponse(job.model_dump(mode="json"), status_code=201)

    async def list_jobs(self, request: Request) -> Response:
        jobs = [] if self.controller.jobs is None else self.controller.jobs.recent(request.query_params.get("api"))
        return JSONResponse({"jobs": [job.model_dump(mode="json") for job in jobs]})

    async def get_job(self, request: Request) -> Response:
        try:
            if self.controller.jobs is None:
                raise JobNotFound("this daemon runs no jobs")
            job = self.controller.jobs.get(request.path_params["id"])
        except JobNotFound as exc:
            return error(404, str(exc))
        return JSONResponse(job.model_dump(mode="json"))

    async def cancel_job(self, request: Request) -> Response:
        try:
            if self.controller.jobs is None:
                raise JobNotFound("this daemon runs no jobs")
            job = self.controller.jobs.cancel(request.path_params["id"])
        except JobNotFound as exc:
            return error(404, str(exc))
        except JobError as exc:
            return error(409, str(exc))
        return JSONResponse(job.model_dump(mode="json"))

    async def retry_job(self, request: Request) -> Response:
        jobs = self.controller.jobs
        try:
            if jobs is None:
                raise JobNotFound("this daemon runs no jobs")
            job = jobs.get(request.path_params["id"])
            state = self.controller.apis.get(job.api)
            if state is None or state.deleted:
                raise JobError(f"the API {job.api!r} of job {job.id} no longer exists")
            retry = await asyncio.to_thread(jobs.retry, state.stored.deployment.spec, job.id)
        except JobNotFound as exc:
            return error(404, str(exc))
        except (JobError, FileError) as exc:
            return error(400, str(exc))
        jobs.track(retry)
        return JSONResponse(retry.model_dump(mode="json"), status_code=201)

    async def create_key(self, request: Request) -> Response:
        try:
            body: Any = await request.json() if await request.body() else {}
        except ValueError:
            return error(400, "the body must be JSON: {apis, rate, burst, expires_in_s, name} or empty")
        try:
            asked = parse_body(KeyRequest, body, "key request")
            key, record = self.controller.keys.create(**asked.model_dump())
        except ValueError as exc:  # BodyError, or what the key store refuses
            return error(400, str(exc))
        self.controller.publish_keys()
        return JSONResponse({"key": key, "record": record.model_dump(mode="json")}, status_code=201)

    async def list_keys(self, request: Request) -> Response:
        return JSONResponse({"keys": [k.model_dump(mode="json") for k in self.controller.keys.list()]})

    async def revoke_key(self, request: Request) -> Response:
        try:
            record = self.controller.keys.revoke(request.path_params["id"])
        except KeyNotFound as exc:
            return error(404, str(exc.args[0]))
        self.controller.publish_keys()
        return JSONResponse(record.model_dump(mode="json"))

    async def gateway_routes(self, request: Request) -> Response:
        """The route table, once its version differs from `?version=` (at most LONG_POLL_S later)."""
        if self.gateways is None:
            return error(503, NO_GATEWAYS)
        version = request.query_params.get("version") or None
        if version is not None and len(version) > 200:
            return error(400, "version must be a route table version (at most 200 characters)")
        table = await self.gateways.changed(version, LONG_POLL_S)
        return JSONResponse(table.model_dump(mode="json"))

    async def gateway_load(self, request: Request) -> Response:
        gateway_id = request.path_params["id"]
        if not GATEWAY_ID_RE.fullmatch(gateway_id):
            return error(400, "a gateway id is 1-128 letters, digits, '.', '_' or '-', starting with a letter or digit")
        if self.gateways is None:
            return error(503, NO_GATEWAYS)
        try:
            report = parse_body(LoadReport, await request.json(), "load report")
        except BodyError as exc:
            return error(400, str(exc))
        except ValueError:
            return error(400, 'the body must be JSON: {"apis": {API: load}, "cold": [API, ...], ...}')
        try:
            count = self.gateways.report(gateway_id, report)
        except TooManyGateways as exc:
            return error(429, str(exc))
        for name in report.cold:
            self.controller.demand(name)  # a request waits at zero replicas there: start one now
        return JSONResponse({"gateways": count})

    async def list_gateways(self, request: Request) -> Response:
        joined = [] if self.gateways is None else self.gateways.joined()
        return JSONResponse({"gateways": [g.model_dump(mode="json") for g in joined]})

    async def openapi(self, request: Request) -> Response:
        if self.document is None:
            self.document = openapi_document(request.app.routes, __version__)
        return JSONResponse(self.document)

    async def stop(self, request: Request) -> Response:
        asyncio.get_running_loop().call_later(0.05, self.shutdown)
        return JSONResponse({"stopping": True})


def build_admin_app(
    controller: Controller,
    *,
    token: str,
    info: Callable[[], DaemonInfo],
    shutdown: Callable[[], None],
    gateways: Gateways | None = None,
    history: History | None = None,
) -> ASGIApp:
    api = AdminApi(controller, info, shutdown, gateways)
    dashboard = Dashboard(controller, history)  # /dashboard/... and /v1/dashboard/... (cirrus/admin_dashboard.py)
    return Starlette(
        routes=[
            Route("/v1/openapi.json", api.openapi),
            Route("/v1/health", api.health),
            Route("/v1/apis", api.list_apis),
            Route("/v1/apis", api.deploy, methods=["POST"]),
            Route("/v1/apis/{name}", api.get_api),
            Route("/v1/apis/{name}", api.delete_api, methods=["DELETE"]),
            Route("/v1/apis/{name}/logs", api.logs),
            Route("/v1/apis/{name}/revisions", api.list_revisions),
            Route("/v1/apis/{name}/rollback", api.rollback, methods=["POST"]),
            Route("/v1/apis/{name}/promote", api.promote, methods=["POST"]),
            Route("/v1/snapshots", api.upload_snapshot, methods=["POST"]),
            Route("/v1/apis/{name}/dead-letters", api.dead_letters),
            Route("/v1/apis/{name}/dead-letters/requeue", api.requeue, methods=["POST"]),
            Route("/v1/apis/{name}/requests", api.list_requests),
            Route("/v1/requests/{id}/cancel", api.cancel_request, methods=["POST"]),
            Route("/v1/apis/{name}/jobs", api.submit_job, methods=["POST"]),
            Route("/v1/jobs", api.list_jobs),
            Route("/v1/jobs/{id}", api.get_job),
            Route("/v1/jobs/{id}/cancel", api.cancel_job, methods=["POST"]),
            Route("/v1/jobs/{id}/retry", api.retry_job, methods=["POST"]),
            *task_routes(controller),  # cirrus/admin_tasks.py
            Route("/v1/keys", api.list_keys),
            Route("/v1/keys", api.create_key, methods=["POST"]),
            Route("/v1/keys/{id}", api.revoke_key, methods=["DELETE"]),
            Route("/v1/gateways", api.list_gateways),
            Route("/v1/gateways/routes", api.gateway_routes),
            Route("/v1/gateways/{id}/load", api.gateway_load, methods=["POST"]),
            Route("/v1/shutdown", api.stop, methods=["POST"]),
            *env_routes(controller),  # /v1/envs: APIs' cached Python environments (cirrus/admin_envs.py)
        ],
        middleware=[
            Middleware(TokenAuth, token=token, sessions=dashboard.sessions),
            Middleware(DashboardRoutes, dashboard=dashboard),
        ],
    )
