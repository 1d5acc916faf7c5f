"""The daemon's admin REST API (127.0.0.1 only, bearer token): deploy, get, delete, logs, jobs, shutdown."""

from __future__ import annotations

import asyncio
import hmac
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import TypeAdapter, ValidationError
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from cirrus.control.controller import Controller
from cirrus.control.jobs import JobNotFound
from cirrus.jobs import JobError, parse_request
from cirrus.logs import follow_logs, log_files, tail_lines
from cirrus.spec import Deployment, SpecError, check_model_paths, check_predictor_path
from cirrus.store.files import FileError
from cirrus.store.view import describe
from cirrus.types import DaemonInfo

_deployments = TypeAdapter(list[Deployment])
MAX_LOG_LINES = 100_000


def error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


class TokenAuth:
    def __init__(self, app: ASGIApp, token: str) -> None:
        self.app = app
        self.expected = f"Bearer {token}".encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not hmac.compare_digest(given, self.expected):
                response = error(401, "missing or wrong admin token (see $CIRRUS_HOME/token)")
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


def build_admin_app(
    controller: Controller,
    token: str,
    info: Callable[[], DaemonInfo],
    logs_dir: Path,
    shutdown: Callable[[], None],
) -> ASGIApp:
    async def health(request: Request) -> Response:
        return JSONResponse(info().model_dump(mode="json"))

    async def list_apis(request: Request) -> Response:
        return JSONResponse({"apis": [s.model_dump(mode="json") for s in controller.statuses()]})

    async def get_api(request: Request) -> Response:
        name = request.path_params["name"]
        status = controller.status(name)
        if status is None:
            return error(404, f"no API named {name!r}")
        return JSONResponse(status.model_dump(mode="json"))

    async def deploy(request: Request) -> Response:
        try:
            body: Any = await request.json()
        except ValueError:
            return error(400, 'the body must be JSON: {"deployments": [...]}')
        if not isinstance(body, dict) or "deployments" not in body:
            return error(400, "the body must be a JSON object with a 'deployments' list")
        try:
            deployments = _deployments.validate_python(body["deployments"])
            for deployment in deployments:
                check_predictor_path(deployment, "deploy")
                check_model_paths(deployment, "deploy")
        except ValidationError as exc:
            return error(400, f"invalid deployment: {exc}")
        except SpecError as exc:
            return error(400, str(exc))
        names = [d.spec.name for d in deployments]
        if len(set(names)) != len(names):
            return error(400, "an API name appears twice in one deploy")
        results = controller.deploy(deployments)
        return JSONResponse({"results": [r.model_dump(mode="json") for r in results]})

    async def delete_api(request: Request) -> Response:
        name = request.path_params["name"]
        if not controller.delete(name):
            return error(404, f"no API named {name!r}")
        return JSONResponse({"deleted": name})

    async def logs(request: Request) -> Response:
        name = request.path_params["name"]
        if controller.status(name) is None and not (logs_dir / name).is_dir():
            return error(404, f"no API named {name!r}")
        try:
            lines = int(request.query_params.get("lines", "100"))
        except ValueError:
            return error(400, "lines must be an integer")
        lines = max(0, min(lines, MAX_LOG_LINES))
        if request.query_params.get("follow", "false").lower() in ("1", "true", "yes"):
            return StreamingResponse(follow_logs(logs_dir, name, lines), media_type="text/plain; charset=utf-8")
        out: list[str] = []
        for path in log_files(logs_dir, name):
            out.extend(f"[{path.stem}] {line}" for line in tail_lines(path, lines))
        text = "\n".join(out[-lines:]) + ("\n" if out and lines else "")
        return Response(text, media_type="text/plain; charset=utf-8")

    async def dead_letters(request: Request) -> Response:
        name = request.path_params["name"]
        if controller.status(name) is None:
            return error(404, f"no API named {name!r}")
        store = controller.queue_store
        if store is None:
            return JSONResponse({"dead_letters": []})
        try:
            limit = max(1, min(int(request.query_params.get("limit", "100")), 10_000))
        except ValueError:
            return error(400, "limit must be an integer")
        records = await asyncio.get_running_loop().run_in_executor(None, store.dead_letters, name, limit)
        return JSONResponse({"dead_letters": [describe(r) for r in records]})

    async def submit_job(request: Request) -> Response:
        name = request.path_params["name"]
        state = controller.apis.get(name)
        if state is None or state.deleted:
            return error(404, f"no API named {name!r}")
        if controller.jobs is None:
            return error(503, "this daemon runs no jobs")
        try:
            body: Any = await request.json()
        except ValueError:
            return error(400, "the body must be a JSON job request: {items | items_url, batch_size, workers, ...}")
        try:
            job_request = parse_request(body)
            job = await asyncio.get_running_loop().run_in_executor(
                None, controller.jobs.submit, state.stored.deployment.spec, job_request
            )
        except (JobError, FileError) as exc:
            return error(400, str(exc))
        controller.jobs.track(job)
        return JSONResponse(job.model_dump(mode="json"), status_code=201)

    async def list_jobs(request: Request) -> Response:
        jobs = [] if controller.jobs is None else controller.jobs.recent(request.query_params.get("api"))
        return JSONResponse({"jobs": [job.model_dump(mode="json") for job in jobs]})

    async def get_job(request: Request) -> Response:
        try:
            if controller.jobs is None:
                raise JobNotFound("this daemon runs no jobs")
            job = controller.jobs.get(request.path_params["id"])
        except JobNotFound as exc:
            return error(404, str(exc))
        return JSONResponse(job.model_dump(mode="json"))

    async def cancel_job(request: Request) -> Response:
        try:
            if controller.jobs is None:
                raise JobNotFound("this daemon runs no jobs")
            job = controller.jobs.cancel(request.path_params["id"])
        except JobNotFound as exc:
            return error(404, str(exc))
        except JobError as exc:
            return error(409, str(exc))
        return JSONResponse(job.model_dump(mode="json"))

    async def stop(request: Request) -> Response:
        asyncio.get_running_loop().call_later(0.05, shutdown)
        return JSONResponse({"stopping": True})

    app = Starlette(
        routes=[
            Route("/v1/health", health),
            Route("/v1/apis", list_apis),
            Route("/v1/apis", deploy, methods=["POST"]),
            Route("/v1/apis/{name}", get_api),
            Route("/v1/apis/{name}", delete_api, methods=["DELETE"]),
            Route("/v1/apis/{name}/logs", logs),
            Route("/v1/apis/{name}/dead-letters", dead_letters),
            Route("/v1/apis/{name}/jobs", submit_job, methods=["POST"]),
            Route("/v1/jobs", list_jobs),
            Route("/v1/jobs/{id}", get_job),
            Route("/v1/jobs/{id}/cancel", cancel_job, methods=["POST"]),
            Route("/v1/shutdown", stop, methods=["POST"]),
        ],
        middleware=[Middleware(TokenAuth, token=token)],
    )
    return app
