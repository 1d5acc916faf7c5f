"""A bare ASGI no-op (no framework) for reference: the ceiling of uvicorn + uvloop + httptools.

POST (any path) {"x": 1} -> {"y": 1}. Same as the peer benchmark's `asgi_app.py`.

    uvicorn asgi_noop:app --app-dir bench --host 127.0.0.1 --port PORT \
        --loop uvloop --http httptools --workers 1 --no-access-log --log-level warning
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any

Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


async def app(scope: dict[str, Any], receive: Receive, send: Send) -> None:
    if scope["type"] != "http":
        return
    body = b""
    more = True
    while more:
        message = await receive()
        body += message.get("body", b"")
        more = message.get("more_body", False)
    out = json.dumps({"y": json.loads(body)["x"]}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(out)).encode())]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": out})
