"""The gateway's side of async APIs: accept a request durably (202 + id), answer status queries.

`POST /<api>` stores the request in the queue store and answers `202 {"id", "status"}` as soon as
it is durable; `GET /<api>/<id>` returns `{id, status, result?, error?, timestamps}`. Replicas
pull the work from the store themselves (cirrus/replica/worker.py).

What an accept checks and keeps, from the API's `queue` spec:

* headers: only `STORED_HEADERS` and the `X-` headers listed in `queue.forward_headers` are stored
  (and so reach the predictor); `Authorization`, `Cookie` and every other header are dropped here;
* a webhook (`X-Cirrus-Webhook` or `?webhook=`): 400 unless the API has `queue.webhooks` and the
  host is in its `allowed_hosts` (the replica checks the resolved address: cirrus/webhooks.py);
* the body: a JSON body that does not parse gets the 400 a realtime API gives;
* the store: a store that cannot write (disk full, Redis out of memory) gives 503 with
  Retry-After, and what it accepted before is untouched.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
import uuid
from collections.abc import Awaitable, Callable, Collection
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs

from cirrus.gateway.accept import Acceptor, AcceptQueueFull
from cirrus.predictor import JSON_TOO_DEEP, PayloadError, decode_payload
from cirrus.store.base import API_DELETED, Durability, NewRequest, QueueStore, StoreFull, StoreUnavailable
from cirrus.store.view import describe
from cirrus.webhooks import WebhookRefused, check_at_accept

if TYPE_CHECKING:
    from cirrus.spec import QueueSpec

log = logging.getLogger("cirrus.gateway")

_ID_RE = re.compile(r"^[0-9a-f]{32}$")
# Stored with every request (and so passed to the predictor); others only when the spec lists them.
STORED_HEADERS = frozenset({"content-type", "accept", "user-agent", "x-request-id"})
RETRY_AFTER_FULL_S = 30  # the store is full: space comes back when results are purged or disk freed
RETRY_AFTER_BUSY_S = 1  # the writer is behind, or the store is briefly unavailable
INLINE_DECODE_BYTES = 256 * 1024  # JSON bodies larger than this are checked off the event loop

Send = Callable[[dict[str, Any]], Awaitable[None]]
Headers = list[tuple[bytes, bytes]]
Answer = tuple[int, dict[str, Any], Headers]  # HTTP status, JSON body, extra response headers


class BadRequest(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def stored_headers(headers: list[tuple[str, str]], forward: Collection[str]) -> list[tuple[str, str]]:
    """The headers kept with a request: `STORED_HEADERS` and the spec's `forward_headers`."""
    return [(name, value) for name, value in headers if name in STORED_HEADERS or name in forward]


def webhook_of(headers: list[tuple[str, str]], query_string: bytes, spec: QueueSpec | None) -> str | None:
    """The per-request webhook (header `X-Cirrus-Webhook` or query parameter `webhook`), checked
    against the API's `queue.webhooks`; BadRequest when the API sends none or not to that host."""
    url = next((v for k, v in headers if k == "x-cirrus-webhook"), None)
    if url is None and query_string:
        found = parse_qs(query_string.decode("latin-1")).get("webhook")
        url = found[0] if found else None
    if url is None:
        return None
    webhooks = None if spec is None else spec.webhooks
    if webhooks is None:
        raise BadRequest(400, "this API does not send webhooks (its spec has no queue.webhooks)")
    try:
        check_at_accept(url, webhooks.allowed_hosts, webhooks.allow_private)
    except WebhookRefused as exc:
        raise BadRequest(400, str(exc)) from None
    return url


def _check_body(body: bytes, content_type: str) -> str | None:
    """The realtime API's 400 message for a body that does not decode (None: it decodes)."""
    try:
        decode_payload(body, content_type)
    except PayloadError as exc:
        return str(exc)
    except RecursionError:
        return JSON_TOO_DEEP
    return None


def _retry_after(seconds: int) -> Headers:
    return [(b"retry-after", str(seconds).encode())]


class AsyncFront:
    """`queue_spec(api)`: the API's `queue` spec (None: unknown, the defaults apply)."""

    def __init__(
        self,
        store: QueueStore,
        max_attempts: Callable[[str], int] | None = None,
        queue_spec: Callable[[str], QueueSpec | None] | None = None,
    ) -> None:
        self.store = store
        self.acceptor = Acceptor(store)
        self.max_attempts = max_attempts
        self.queue_spec = queue_spec or (lambda api: None)
        self._readers = ThreadPoolExecutor(max_workers=2, thread_name_prefix="cirrus-status")

    async def accept(
        self,
        api: str,
        body: bytes,
        content_type: str,
        headers: list[tuple[str, str]],
        query_string: bytes,
        request_id: str | None = None,
    ) -> Answer:
        """(HTTP status, JSON body, extra headers) for `POST /<api>`; `request_id`: the id to store
        it under (default: a new uuid4 hex)."""
        spec = self.queue_spec(api)
        try:
            webhook = webhook_of(headers, query_string, spec)
        except BadRequest as exc:
            return exc.status, {"error": str(exc)}, []
        if len(body) <= INLINE_DECODE_BYTES:
            problem = _check_body(body, content_type)
        else:
            problem = await asyncio.get_running_loop().run_in_executor(self._readers, _check_body, body, content_type)
        if problem is not None:
            return 400, {"error": problem}, []
        if spec is not None:
            max_attempts = spec.max_attempts
        else:
            max_attempts = self.max_attempts(api) if self.max_attempts is not None else 3
        durability: Durability = "normal" if spec is None else spec.durability
        request_id = request_id or uuid.uuid4().hex
        request = NewRequest(
            api=api,
            id=request_id,
            body=body,
            content_type=content_type,
            headers=stored_headers(headers, () if spec is None else spec.forward_headers),
            query_string=query_string,
            webhook=webhook,
            max_attempts=max_attempts,
            durability=durability,
        )
        try:
            await self.acceptor.submit(request)
        except AcceptQueueFull:
            message = "too many requests are waiting to be stored; retry later"
            return 503, {"error": message}, _retry_after(RETRY_AFTER_BUSY_S)
        except StoreFull as exc:
            log.error("%s: refused a request: %s", api, exc)
            message = "the queue store is full: this request was not stored; retry later"
            return 503, {"error": message}, _retry_after(RETRY_AFTER_FULL_S)
        except StoreUnavailable as exc:
            log.error("%s: refused a request: %s", api, exc)
            message = "the queue store cannot take requests right now: this request was not stored; retry later"
            return 503, {"error": message}, _retry_after(RETRY_AFTER_BUSY_S)
        except Exception:  # an error of the store we did not foresee: still not a bare 500
            log.exception("%s: storing a request failed", api)
            message = "storing the request failed: it was not stored; retry later"
            return 503, {"error": message}, _retry_after(RETRY_AFTER_BUSY_S)
        if spec is not None and self.queue_spec(api) is None:
            # The API was deleted while this request was written: the controller failed what the
            # store held then; fail this one too, or it would run for an API of this name deployed later.
            loop = asyncio.get_running_loop()
            try:
                await loop.run_in_executor(self._readers, self.store.fail_all, api, API_DELETED, time.time())
            except Exception:
                log.exception("%s: failing the requests of the deleted API failed", api)
            return 404, {"error": f"the API {api!r} was deleted while this request was stored; it will not run"}, []
        location = f"/{api}/{request_id}".encode()
        return 202, {"id": request_id, "status": "in_queue", "api": api}, [(b"location", location)]

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
