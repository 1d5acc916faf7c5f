"""The admin API's task routes: submit a run of a `kind: task` API, list, get and cancel runs, and a
run's log (every attempt, in order). Registered by `cirrus/admin.py`; described in `cirrus.admin_openapi.OPERATIONS`."""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from cirrus.admin_openapi import MAX_LOG_LINES, BodyError, parse_body
from cirrus.control.controller import Controller
from cirrus.control.tasks import TaskConflict, TaskNotFound, TaskRunner, TooManyRuns
from cirrus.tasks import TaskError, TaskRequest

MAX_LISTED_TASKS = 1000
NO_TASKS = "this daemon runs no task runs"


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


class TaskRoutes:
    def __init__(self, controller: Controller) -> None:
        self.controller = controller

    @property
    def runner(self) -> TaskRunner:
        if self.controller.tasks is None:
            raise TaskConflict(NO_TASKS)
        return self.controller.tasks

    async def submit(self, request: Request) -> Response:
        name = request.path_params["name"]
        try:
            body: Any = await request.json() if await request.body() else {}
        except ValueError:
            return _error(400, "the body must be a JSON object: {config, timeout_s, retries} (each optional)")
        try:
            task_request = parse_body(TaskRequest, body, "task request")
            run = self.runner.submit(name, task_request)
        except TaskNotFound as exc:
            return _error(404, str(exc))
        except (BodyError, TaskError) as exc:
            return _error(400, str(exc))
        except TooManyRuns as exc:
            return _error(429, str(exc))
        except TaskConflict as exc:
            return _error(503, str(exc))
        return JSONResponse(run.model_dump(mode="json"), status_code=201)

    async def list_runs(self, request: Request) -> Response:
        api = request.query_params.get("api") or None
        runs = [] if self.controller.tasks is None else self.controller.tasks.recent(api)
        return JSONResponse({"tasks": [run.model_dump(mode="json") for run in runs[:MAX_LISTED_TASKS]]})

    async def get(self, request: Request) -> Response:
        try:
            run = self.runner.get(request.path_params["id"])
        except (TaskNotFound, TaskConflict) as exc:
            return _error(404, str(exc))
        return JSONResponse(run.model_dump(mode="json"))

    async def cancel(self, request: Request) -> Response:
        try:
            run = self.runner.cancel(request.path_params["id"])
        except TaskNotFound as exc:
            return _error(404, str(exc))
        except TaskConflict as exc:
            return _error(409, str(exc))
        return JSONResponse(run.model_dump(mode="json"))

    async def logs(self, request: Request) -> Response:
        try:
            run = self.runner.get(request.path_params["id"])
        except (TaskNotFound, TaskConflict) as exc:
            return _error(404, str(exc))
        try:
            lines = int(request.query_params.get("lines", "100"))
        except ValueError:
            return _error(400, "lines must be an integer")
        lines = max(0, min(lines, MAX_LOG_LINES))
        runtime = self.controller.runtime
        if request.query_params.get("follow", "false").lower() in ("1", "true", "yes"):
            stream = runtime.logs(run.api, run.replica_id, lines, True)
            return StreamingResponse(stream, media_type="text/plain; charset=utf-8")
        text = b"".join([chunk async for chunk in runtime.logs(run.api, run.replica_id, lines, False)])
        return Response(text, media_type="text/plain; charset=utf-8")


def task_routes(controller: Controller) -> list[Route]:
    routes = TaskRoutes(controller)
    return [
        Route("/v1/apis/{name}/tasks", routes.submit, methods=["POST"]),
        Route("/v1/tasks", routes.list_runs),
        Route("/v1/tasks/{id}", routes.get),
        Route("/v1/tasks/{id}/cancel", routes.cancel, methods=["POST"]),
        Route("/v1/tasks/{id}/logs", routes.logs),
    ]
