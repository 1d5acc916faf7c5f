"""The admin API's environment routes: `GET /v1/envs` lists the cached Python environments of APIs
(cirrus/envs.py), `POST /v1/envs/prune` removes those no revision uses (`cirrus envs list|prune`)."""

from __future__ import annotations

import asyncio
import json
from typing import TYPE_CHECKING

from pydantic import BaseModel, ConfigDict, Field
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from cirrus.admin_common import error
from cirrus.types import EnvEntry

if TYPE_CHECKING:
    from cirrus import envs
    from cirrus.control.controller import Controller
    from cirrus.control.envs import EnvUse

MAX_PRUNE_BODY_BYTES = 1024


class PruneRequest(BaseModel):
    """`POST /v1/envs/prune` (or an empty body)."""

    model_config = ConfigDict(extra="forbid")

    dry_run: bool = Field(False, strict=True, description="only say what would be removed")


class EnvList(BaseModel):
    envs: list[EnvEntry]


class PruneAnswer(BaseModel):
    removed: list[EnvEntry] = Field(description="the environments removed (or, with dry_run, that would be)")
    freed_bytes: int
    dry_run: bool


def entry(info: envs.EnvInfo, used_by: list[str] | None = None, building: bool = False) -> EnvEntry:
    state = "ready" if info.complete else ("building" if building else "incomplete")
    return EnvEntry(
        key=info.key,
        path=str(info.path),
        state=state,
        size_bytes=info.size_bytes,
        last_used=info.last_used,
        created_at=info.created_at,
        build_s=info.build_s,
        requirements=list(info.requirements),
        used_by=used_by or [],
    )


class EnvsAdmin:
    def __init__(self, controller: Controller) -> None:
        self.controller = controller

    async def list_envs(self, request: Request) -> Response:
        uses: list[EnvUse] = await asyncio.to_thread(self.controller.envs.listing)
        found = [entry(u.info, u.used_by, u.building) for u in uses]
        return JSONResponse(EnvList(envs=found).model_dump(mode="json"))

    async def prune(self, request: Request) -> Response:
        body = b""
        async for chunk in request.stream():
            body += chunk
            if len(body) > MAX_PRUNE_BODY_BYTES:
                return error(413, f"the prune request is over {MAX_PRUNE_BODY_BYTES} bytes")
        try:
            data = json.loads(body) if body.strip() else {}
            if not isinstance(data, dict):
                raise ValueError("not an object")
            asked = PruneRequest.model_validate(data)
        except ValueError as exc:
            return error(400, f'invalid prune request ({{"dry_run": true}} or empty): {exc}')
        removed = await asyncio.to_thread(self.controller.envs.prune, asked.dry_run)
        answer = PruneAnswer(
            removed=[entry(info) for info in removed],
            freed_bytes=sum(info.size_bytes for info in removed),
            dry_run=asked.dry_run,
        )
        return JSONResponse(answer.model_dump(mode="json"))


def env_routes(controller: Controller) -> list[Route]:
    admin = EnvsAdmin(controller)
    return [Route("/v1/envs", admin.list_envs), Route("/v1/envs/prune", admin.prune, methods=["POST"])]
