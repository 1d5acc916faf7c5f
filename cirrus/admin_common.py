"""What every part of the admin API answers with: a JSON error, and a log read (or followed)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

MAX_LOG_LINES = 100_000  # ?lines= at most, per replica
TEXT = "text/plain; charset=utf-8"


def error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


async def log_response(request: Request, read: Callable[[int, bool], AsyncIterator[bytes]]) -> Response:
    """`?lines=N` (the newest N, 100 by default) of a log, `&follow=true` to stream what comes after;
    `read(lines, follow)` reads it (the runtime's logs of an API, a replica or a task run)."""
    try:
        lines = int(request.query_params.get("lines", "100"))
    except ValueError:
        return error(400, "lines must be an integer")
    lines = max(0, min(lines, MAX_LOG_LINES))
    if request.query_params.get("follow", "false").lower() in ("1", "true", "yes"):
        return StreamingResponse(read(lines, True), media_type=TEXT)
    return Response(b"".join([chunk async for chunk in read(lines, False)]), media_type=TEXT)
