"""The gateway's side of async APIs: accept a request durably (202 + id), answer status queries.

`POST /<api>` stores the request in the queue store and answers `202 {"id", "status"}` as soon as
it is durable; `GET /<api>/<id>` returns `{id, status, result?, error?, timestamps}`. Replicas
pull the work from the store themselves (cirrus/replica/worker.py).
"""

from __future__ import annotations

import asyncio
import re
import uuid
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any
from urllib.parse import parse_qs, urlsplit

from cirrus.gateway.accept import Acceptor, AcceptQueueFull
from cirrus.store.base import NewRequest, QueueStore
from cirrus.store.view import describe

_ID_RE = re.compile(r"^[0-9a-f]{32}$")
MAX_WEBHOOK_LENGTH = 2048

Send = Callable[[dict[str, Any]], Awaitable[None]]


class BadRequest(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def webhook_of(headers: list[tuple[str, str]], query_string: bytes) -> str | None:
    """The per-request webhook: header `X-Cirrus-Webhook` or query parameter `webhook`."""
    url = next((v for k, v in headers if k == "x-cirrus-webhook"), None)
    if url is None and query_string:
        found = parse_qs(query_string.decode("latin-1")).get("webhook")
        url = found[0] if found else None
    if url is None:
        return None
    parts = urlsplit(url)
    if len(url) > MAX_WEBHOOK_LENGTH or parts.scheme not in ("http", "https") or not parts.netloc:
        raise BadRequest(400, f"webhook {url[:100]!r} is not an http(s) URL (at most {MAX_WEBHOOK_LENGTH} chars)")
    return url


class AsyncFront:
    def __init__(self, store: QueueStore, max_attempts: Callable[[str], int]) -> None:
        self.store = store
        self.acceptor = Acceptor(store)
        self.max_attempts = max_attempts
        self._readers = ThreadPoolExecutor(max_workers=2, thread_name_prefix="cirrus-status")

    async def accept(
        self,
        api: str,
        body: bytes,
        content_type: str,
        headers: list[tuple[str, str]],
        query_string: bytes,
    ) -> tuple[int, dict[str, Any]]:
        """(HTTP status, JSON body) for `POST /<api>`."""
        try:
            webhook = webhook_of(headers, query_string)
        except BadRequest as exc:
            return exc.status, {"error": str(exc)}
        request_id = uuid.uuid4().hex
        request = NewRequest(
            api=api,
            id=request_id,
            body=body,
            content_type=content_type,
            headers=headers,
            query_string=query_string,
            webhook=webhook,
            max_attempts=self.max_attempts(api),
        )
        try:
            await self.acceptor.submit(request)
        except AcceptQueueFull:
            return 503, {"error": "too many requests are waiting to be stored; retry later"}
        return 202, {"id": request_id, "status": "in_queue", "api": api}

    async def status(self, api: str, request_id: str) -> tuple[int, dict[str, Any]]:
        if not _ID_RE.match(request_id):
            return 404, {"error": f"no request {request_id!r} in {api!r}"}
        loop = asyncio.get_running_loop()
        record = await loop.run_in_executor(self._readers, self.store.get, api, request_id)
        if record is None:
            return 404, {"error": f"no request {request_id!r} in {api!r} (results are kept for a limited time)"}
        return 200, describe(record)

    async def close(self) -> None:
        await self.acceptor.close()
        self._readers.shutdown(wait=False)
