"""The admin API's task routes: submit a run of a `kind: task` API, list, get and cancel runs, and a
run's log (every attempt, in order). Registered by `cirrus/admin.py`; described in `cirrus.admin_openapi.OPERATIONS`."""

from __future__ import annotations

from functools import partial
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from cirrus.admin_common import error, log_response
from cirrus.admin_openapi import BodyError, parse_body
from cirrus.control.controller import Controller
from cirrus.control.tasks import TaskConflict, TaskNotFound, TaskRunner, TooManyRuns
from cirrus.tasks import TaskError, TaskRequest

MAX_LISTED_TASKS = 1000
NO_TASKS = "this daemon runs no task runs"


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
            return error(400, "the body must be a JSON object: {config, timeout_s, retries} (each optional)")
        try:
            task_request = parse_body(TaskRequest, body, "task request")
            run = self.runner.submit(name, task_request)
        except TaskNotFound as exc:
            return error(404, str(exc))
        except (BodyError, TaskError) as exc:
            return error(400, str(exc))
        except TooManyRuns as exc:
            return error(429, str(exc))
        except TaskConflict as exc:
            return error(503, str(exc))
        return JSONResponse(run.model_dump(mode="json"), status_code=201)

    async def list_runs(self, request: Request) -> Response:
        api = request.query_params.get("api") or None
        runs = [] if self.controller.tasks is None else self.controller.tasks.recent(api)
        return JSONResponse({"tasks": [run.model_dump(mode="json") for run in runs[:MAX_LISTED_TASKS]]})

    async def get(self, request: Request) -> Response:
        try:
            run = self.runner.get(request.path_params["id"])
        except (TaskNotFound, TaskConflict) as exc:
            return error(404, str(exc))
        return JSONResponse(run.model_dump(mode="json"))

    async def cancel(self, request: Request) -> Response:
        try:
            run = self.runner.cancel(request.path_params["id"])
        except TaskNotFound as exc:
            return error(404, str(exc))
        except TaskConflict as exc:
            return error(409, str(exc))
        return JSONResponse(run.model_dump(mode="json"))

    async def logs(self, request: Request) -> Response:
        try:
            run = self.runner.get(request.path_params["id"])
        except (TaskNotFound, TaskConflict) as exc:
            return error(404, str(exc))
        return await log_response(request, partial(self.controller.runtime.logs, run.api, run.replica_id))


def task_routes(controller: Controller) -> list[Route]:
    routes = TaskRoutes(controller)
    return [
        Route("/v1/apis/{name}/tasks", routes.submit, methods=["POST"]),
        Route("/v1/tasks", routes.list_runs),
        Route("/v1/tasks/{id}", routes.get),
        Route("/v1/tasks/{id}/cancel", routes.cancel, methods=["POST"]),
        Route("/v1/tasks/{id}/logs", routes.logs),
    ]
