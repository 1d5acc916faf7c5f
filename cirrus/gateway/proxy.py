"""Proxying `kind: server` APIs: every method and path under `/<api>/...` goes to a ready replica's app.

A replica of such an API is reached over HTTP (`HttpUpstream` in cirrus/gateway/upstream.py, its
`ReplicaSlot.conn`), with the realtime kind's slots: least-loaded choice, the bounded queue (503 +
Retry-After when full), a request held while a replica starts from zero, and the in-flight count
the autoscaler reads.

The request goes on with its method, the path after `/<api>` ("/" when none), its query string and
its headers, less hop-by-hop ones and any `X-Cirrus-*`, plus `X-Forwarded-For/-Proto/-Host/-Prefix`
and `X-Request-Id`. Its body is streamed to the replica (at most the gateway's body limit: 413; all
of it within the API's `timeout_s`: 408). The response is streamed back chunk by chunk; its head must
come within `timeout_s` (else 504); a replica that cannot be reached or resets answers 502. A client
that goes away cancels the request in the replica. Websocket upgrades are refused (501); another
`Upgrade` (h2c) is dropped and the request proxied as HTTP/1.1.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, MutableMapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from cirrus.gateway.access import RequestRecord
from cirrus.gateway.app import _new_record, _request_id
from cirrus.gateway.routing import ApiRoute, Overloaded, QueueTimeout, ReplicaSlot, Unavailable
from cirrus.gateway.streams import deliver
from cirrus.gateway.timing import child_traceparent
from cirrus.gateway.transport import ReplicaGone
from cirrus.gateway.upstream import ConnectFailed, HttpUpstream, UpstreamError

if TYPE_CHECKING:
    from cirrus.gateway.app import Gateway

log = logging.getLogger("cirrus.gateway")

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]

SECRET_HEADER = b"x-cirrus-replica-secret"  # = cirrus.replica.app_server.SECRET_HEADER (an `app:` replica checks it)
CLIENT_GONE = 499  # the status a request counts as when its client went away
HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"te",
        b"trailers",
        b"transfer-encoding",
        b"upgrade",
        b"proxy-connection",
        b"proxy-authenticate",
        b"proxy-authorization",
    }
)
# Set by the gateway (a client's own are dropped); content-length and expect too: the gateway frames
# the body it sends, and its server already answered any `Expect: 100-continue`.
_REPLACED = frozenset(
    {
        b"x-forwarded-for",
        b"x-forwarded-proto",
        b"x-forwarded-host",
        b"x-forwarded-prefix",
        b"x-request-id",
        b"traceparent",
        b"content-length",
        b"expect",
    }
)


CLOSE = [(b"connection", b"close")]  # an answer before the whole body was read: the connection cannot go on


def late_body(timeout_s: float) -> str:
    return f"the request body did not arrive within {timeout_s:g}s (the API's timeout_s)"


class _BodyError(Exception):
    """The client's body broke a limit (status 413 or 408), or the client went (499)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class _Body:
    """The request body, read from the client as the replica takes it, within the limits."""

    def __init__(
        self,
        receive: Receive,
        first: MutableMapping[str, Any],
        limit: int,
        timeout_s: float,
        declared: bytes | None = None,
    ) -> None:
        self.receive, self.first, self.limit, self.timeout_s = receive, first, limit, timeout_s
        self.declared = declared  # the client's Content-Length, checked (None: chunked, or none)
        self.finished = asyncio.Event()  # all of it came: `receive` now only says when the client goes
        self.error: _BodyError | None = None
        if not first.get("more_body", False):
            self.finished.set()

    def content(self) -> bytes | AsyncIterator[bytes]:
        return self.first.get("body", b"") if self.finished.is_set() else self._chunks()

    async def _chunks(self) -> AsyncIterator[bytes]:
        message, size = self.first, 0
        deadline = asyncio.get_running_loop().time() + self.timeout_s
        while True:
            chunk: bytes = message.get("body", b"")
            size += len(chunk)
            if size > self.limit:
                self._fail(413, f"request body exceeds the limit of {self.limit} bytes")
            if chunk:
                yield chunk
            if not message.get("more_body", False):
                self.finished.set()
                return
            try:
                async with asyncio.timeout_at(deadline):
                    message = await self.receive()
            except TimeoutError:
                self._fail(408, late_body(self.timeout_s))
            if message["type"] == "http.disconnect":
                self._fail(CLIENT_GONE, "the client went away before its body was complete")

    def _fail(self, status: int, message: str) -> None:
        self.error = _BodyError(status, message)
        raise self.error


async def proxy(gateway: Gateway, route: ApiRoute, rest: str, scope: Scope, receive: Receive, send: Send) -> None:
    """Serve one request to a proxied API (`rest`: the path after `/<api>/`); its access log line and
    span where the API or the gateway asks for them."""
    started = time.perf_counter()
    request_id = _request_id(scope)
    inbound = next((v.decode("latin-1") for k, v in scope["headers"] if k == b"traceparent"), "")
    traceparent = child_traceparent(inbound, gateway.tracer is not None)
    record = None
    if route.access_log or gateway.tracer is not None:
        record = _new_record(route, scope, request_id, traceparent, inbound, started)
        send = record.wrap(send)
    try:
        await _proxy(gateway, route, rest, scope, receive, send, _Request(request_id, traceparent, started, record))
    finally:
        if record is not None:
            gateway._finish(route, record)


@dataclass
class _Request:
    request_id: str
    traceparent: str  # the one the app gets: the gateway's span in the request's trace
    started: float
    record: RequestRecord | None


async def _proxy(
    gateway: Gateway, route: ApiRoute, rest: str, scope: Scope, receive: Receive, send: Send, request: _Request
) -> None:
    started, request_id = request.started, request.request_id
    headers = scope["headers"]
    if any(k == b"upgrade" and b"websocket" in v.lower() for k, v in headers):  # (another upgrade is dropped)
        why = "websocket requests are not proxied to kind server APIs"
        await gateway._reply_error(send, route, started, 501, why, request_id)
        return
    limit = gateway.max_body_bytes
    declared = next((v for k, v in headers if k == b"content-length"), None)
    if declared is not None and (not declared.isdigit() or int(declared) > limit):
        why = f"request body exceeds the limit of {limit} bytes" if declared.isdigit() else "bad Content-Length"
        await gateway._reply_error(send, route, started, 413 if declared.isdigit() else 400, why, request_id)
        return
    try:
        async with asyncio.timeout(route.timeout_s):
            first = await receive()
    except TimeoutError:
        await gateway._reply_error(send, route, started, 408, late_body(route.timeout_s), request_id, CLOSE)
        return
    if first["type"] == "http.disconnect":
        route.metrics.observe(CLIENT_GONE, time.perf_counter() - started, time.time())
        return
    body = _Body(receive, first, limit, route.timeout_s, declared)
    target = route.pick()  # a canary revision gets its share
    target.metrics.in_flight += 1
    try:
        await _serve(gateway, target, rest, scope, receive, send, body, request)
    finally:
        target.metrics.in_flight -= 1


async def _serve(
    gateway: Gateway,
    route: ApiRoute,
    rest: str,
    scope: Scope,
    receive: Receive,
    send: Send,
    body: _Body,
    request: _Request,
) -> None:
    """Take a replica slot (queueing, or starting one from zero), exchange, give the slot back."""
    started, request_id = request.started, request.request_id
    timeout_s = route.timeout_s
    slot: ReplicaSlot | None = route.try_acquire()
    if slot is None:
        gateway._note_waiting(route, started)
        try:
            slot = await _acquire(route, timeout_s, receive, body)
        except (Overloaded, QueueTimeout, ReplicaGone, Unavailable) as exc:
            await gateway._reply_no_replica(send, route, started, exc, timeout_s, request_id)
            return
        if slot is None:  # the client went while queued
            route.metrics.observe(CLIENT_GONE, time.perf_counter() - started, time.time())
            return
    queue_s = time.perf_counter() - started
    if request.record is not None:
        request.record.queue_s, request.record.replica, request.record.revision = (
            queue_s,
            slot.replica_id,
            slot.revision,
        )
    status = CLIENT_GONE
    try:
        exchange = _exchange(gateway, route, slot, rest, scope, send, body, request, queue_s)
        status = await _unless_client_goes(exchange, receive, body)
    finally:
        route.release(slot)
        if 0 < status < 500:
            slot.completed += 1
        if status > 0:  # (a negated status was counted where it was answered)
            route.metrics.observe(status, time.perf_counter() - started, time.time(), slot.revision, queue_s)


async def _acquire(route: ApiRoute, timeout_s: float, receive: Receive, body: _Body) -> ReplicaSlot | None:
    """Wait for a slot; None when a client whose body has all come goes away first."""
    if not body.finished.is_set():  # (its `receive` is the body's: nothing else may read it)
        return await route.acquire(timeout_s)
    got = await _unless_client_goes(route.acquire(timeout_s), receive, body)
    return got if isinstance(got, ReplicaSlot) else None


async def _unless_client_goes(work: Coroutine[Any, Any, Any], receive: Receive, body: _Body) -> Any:
    """`work`'s result, or CLIENT_GONE once the client goes away (then `work` is cancelled)."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_wait_disconnect(receive, body))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            return task.result()
        task.cancel()
        with contextlib.suppress(BaseException):
            await task
        return CLIENT_GONE
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()


async def _wait_disconnect(receive: Receive, body: _Body) -> None:
    await body.finished.wait()  # until then the body's reader owns `receive`
    while (await receive())["type"] != "http.disconnect":
        pass


async def _exchange(
    gateway: Gateway,
    route: ApiRoute,
    slot: ReplicaSlot,
    rest: str,
    scope: Scope,
    send: Send,
    body: _Body,
    request: _Request,
    queue_s: float,
) -> int:
    """Send the request, relay the answer; the status it counts as."""
    started, request_id = request.started, request.request_id
    upstream: HttpUpstream = slot.conn
    target = _upstream_path(route.name, rest, scope)
    headers = upstream_headers(route.name, scope, request_id, upstream.secret, request.traceparent)
    remaining = max(0.001, route.timeout_s - queue_s)
    try:
        async with asyncio.timeout(remaining):
            response = await upstream.request(scope["method"], target, headers, body.content(), body.declared)
    except (_BodyError, TimeoutError, UpstreamError) as exc:
        return await _failed(gateway, route, slot, send, body, body.error or exc, request_id, started)
    try:
        head = response_headers(response.headers, request_id)
        await send({"type": "http.response.start", "status": response.status, "headers": head})
        chunks = response.body()
        while True:
            try:
                async with asyncio.timeout(route.timeout_s):
                    chunk = await anext(chunks)
            except StopAsyncIteration:
                break
            if not await deliver(send, chunk, route.timeout_s, request_id):
                return CLIENT_GONE
        await send({"type": "http.response.body", "body": b"", "more_body": False})
    except TimeoutError:  # the app stalled mid-body: the client sees it cut short
        log.warning("request %s: the answer of %s stalled for %gs", request_id, slot.replica_id, route.timeout_s)
        return 504
    except UpstreamError as exc:  # the head went out: the client sees a body cut short
        log.warning("request %s: the answer of %s broke off: %s", request_id, slot.replica_id, exc)
        return 502
    finally:
        response.release()
    if response.status >= 500:
        log.warning("request %s to %s/%s answered %d", request_id, route.name, slot.replica_id, response.status)
    return response.status


async def _failed(
    gateway: Gateway,
    route: ApiRoute,
    slot: ReplicaSlot,
    send: Send,
    body: _Body,
    exc: BaseException,
    request_id: str,
    started: float,
) -> int:
    """No answer came: 413/408 (the client's body), 504 (too slow), 502 (the replica failed); the
    status, negated when `_reply_error` already counted it in the metrics."""
    if isinstance(exc, _BodyError):
        if exc.status == CLIENT_GONE:
            return CLIENT_GONE
        # (what is left of the body is not read)
        await gateway._reply_error(send, route, started, exc.status, str(exc), request_id, CLOSE)
        return -exc.status
    if isinstance(exc, TimeoutError) and not body.finished.is_set():  # the client's body is the late part
        await gateway._reply_error(send, route, started, 408, late_body(route.timeout_s), request_id, CLOSE)
        return -408
    if isinstance(exc, TimeoutError):
        why = f"no answer within {route.timeout_s:g}s"
        await gateway._reply_error(send, route, started, 504, why, request_id)
        return -504
    why = f"replica {slot.replica_id} failed: {exc}"
    upstream: HttpUpstream = slot.conn
    if isinstance(exc, ConnectFailed) and upstream.on_lost is not None and not upstream.closed:
        upstream.on_lost(why)  # nothing listens there: no more requests go to it (the controller acts)
        upstream.close()
    await gateway._reply_error(send, route, started, 502, why, request_id)
    return -502


def _upstream_path(api: str, rest: str, scope: Scope) -> bytes:
    """The raw path after `/<api>` (as the client encoded it), with the query string."""
    raw: bytes = scope.get("raw_path") or scope["path"].encode()
    prefix = f"/{api}".encode()
    path = raw[len(prefix) :] if raw.startswith(prefix) else b"/" + rest.encode()
    path = path or b"/"
    query: bytes = scope.get("query_string", b"")
    return path + b"?" + query if query else path


def upstream_headers(
    api: str, scope: Scope, request_id: str, secret: bytes, traceparent: str = ""
) -> list[tuple[bytes, bytes]]:
    """The client's headers less hop-by-hop ones (and those its Connection header names) and any
    X-Cirrus-*; the X-Forwarded-* set; the request id; the gateway's traceparent; the replica's secret."""
    named: set[bytes] = set()
    forwarded_for = b""
    host = b""
    kept: list[tuple[bytes, bytes]] = []
    for key, value in scope["headers"]:
        if key == b"connection":
            named.update(token.strip().lower() for token in value.split(b","))
        elif key == b"x-forwarded-for":
            forwarded_for = value
        elif key not in HOP_BY_HOP and key not in _REPLACED and not key.startswith(b"x-cirrus-"):
            if key == b"host":
                host = value
            kept.append((key, value))
    headers = [(k, v) for k, v in kept if k not in named]
    client = scope.get("client")
    if client:
        address = str(client[0]).encode()
        if not forwarded_for:
            forwarded_for = address
        elif forwarded_for.rpartition(b",")[2].strip() != address:  # (else the gateway's server took it from there)
            forwarded_for += b", " + address
    if forwarded_for:
        headers.append((b"x-forwarded-for", forwarded_for))
    headers.append((b"x-forwarded-proto", scope.get("scheme", "http").encode()))
    if host:
        headers.append((b"x-forwarded-host", host))
    headers.append((b"x-forwarded-prefix", f"/{api}".encode()))
    headers.append((b"x-request-id", request_id.encode()))
    if traceparent:
        headers.append((b"traceparent", traceparent.encode()))
    headers.append((SECRET_HEADER, secret))
    return headers


def response_headers(raw: list[tuple[bytes, bytes]], request_id: str) -> list[tuple[bytes, bytes]]:
    """The app's response headers less hop-by-hop ones, with an X-Request-Id (the app's own, if it set one)."""
    named = {t.strip().lower() for k, v in raw if k.lower() == b"connection" for t in v.split(b",")}
    headers = [(k.lower(), v) for k, v in raw if k.lower() not in HOP_BY_HOP and k.lower() not in named]
    if not any(k == b"x-request-id" for k, _ in headers):
        headers.append((b"x-request-id", request_id.encode()))
    return headers
