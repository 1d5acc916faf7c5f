"""The gateway's HTTP front: a plain ASGI callable (no framework route on the hot path).

`POST /<api>` predicts (`POST /<api>/<model>` on a realtime multi-model API); `GET /<api>` describes
the API; `GET /<api>/openapi.json` and `GET /<api>/docs` publish its schema; `GET /healthz` and
`GET /metrics` serve operators.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
import uuid
from collections.abc import Awaitable, Callable, MutableMapping
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from cirrus.gateway.access import AccessLog, RequestRecord, log_line
from cirrus.gateway.async_api import AsyncFront
from cirrus.gateway.cors import CorsPolicy, cors_front
from cirrus.gateway.docs import docs_page
from cirrus.gateway.edge import EdgeLog
from cirrus.gateway.keys import KeyRing, presented_key
from cirrus.gateway.openai import OpenAIFront
from cirrus.gateway.routing import ApiRoute, Overloaded, QueueTimeout, ReplicaSlot, Unavailable
from cirrus.gateway.split import Split
from cirrus.gateway.streams import relay_stream
from cirrus.gateway.timing import child_traceparent, server_timing, total_timing, valid_traceparent
from cirrus.gateway.transport import ReplicaGone, RequestTooLarge
from cirrus.gateway.v2 import V2Front
from cirrus.kinds import kind_of
from cirrus.predictor import encode_json
from cirrus.wire import InferResponse

if TYPE_CHECKING:
    from cirrus.gateway.tracing import Tracer
    from cirrus.spec import ProtocolSpec

log = logging.getLogger("cirrus.gateway")

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]

_REQUEST_ID_RE = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")
_MODEL_HEADER = b"x-cirrus-model"  # names the model of a multi-model API (or POST /<api>/<model>)
PROTOCOL_HEADER = "x-cirrus-protocol"  # set by the gateway only: how the replica reads and answers a request
_SKIP_HEADERS = frozenset(
    {b"host", b"connection", b"keep-alive", b"content-length", b"transfer-encoding", PROTOCOL_HEADER.encode()}
)
_TRACEPARENT = b"traceparent"  # the client's is replaced by one naming the gateway's span (cirrus/gateway/timing.py)


class ProtocolFront(Protocol):
    """A standard protocol's paths on the gateway (`/v2/...`, `/v1/...`)."""

    async def serve(self, scope: Scope, receive: Receive, send: Send) -> None: ...


_RETRY_AFTER_S = 1
_RETRY_AFTER = [(b"retry-after", str(_RETRY_AFTER_S).encode())]
REPLY_GRACE_S = 2.0  # the replica enforces timeout_s; the gateway waits this much longer at most


class BodyTooLarge(Exception):
    pass


def _json_headers(length: int, request_id: str | None, extra: list[tuple[bytes, bytes]] = []) -> list[Any]:  # noqa: B006
    headers = [(b"content-type", b"application/json"), (b"content-length", str(length).encode())]
    if request_id:
        headers.append((b"x-request-id", request_id.encode()))
    headers.extend(extra)
    return headers


async def send_json(
    send: Send,
    status: int,
    value: Any,
    request_id: str | None = None,
    extra: list[tuple[bytes, bytes]] = [],  # noqa: B006
) -> None:
    body = encode_json(value)
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": _json_headers(len(body), request_id, extra),
        }
    )
    await send({"type": "http.response.body", "body": body})


class Gateway:
    """Routes requests for every API; the controller adds and removes APIs and replicas."""

    def __init__(
        self,
        max_body_bytes: int,
        metrics_app: Callable[[], bytes] | None = None,
        on_cold: Callable[[str], None] | None = None,
    ) -> None:
        self.max_body_bytes = max_body_bytes
        self.routes: dict[str, ApiRoute] = {}
        self.metrics_app = metrics_app
        self.on_cold = on_cold  # called when a request waits on an API with no ready replica
        self.async_front: AsyncFront | None = None  # async APIs: the queue store's front
        self.keys = KeyRing()  # the API keys requests may carry (checked where an API needs one)
        self.require_keys = False  # every API needs a key (`--require-keys`), not only `auth: required` ones
        self._shadow_tasks: set[asyncio.Task[None]] = set()  # copies of requests on their way to shadows
        self.refusals = EdgeLog("gateway")  # overload 503s, logged at most once a second per API
        self.access: AccessLog | None = None  # where `access_log: true` APIs' lines go (None: the cirrus.access logger)
        self.tracer: Tracer | None = None  # exports spans per request (OpenTelemetry configured)
        # The standard protocols' paths, by first segment: "v2" (Open Inference Protocol) and "v1"
        # (OpenAI-compatible). Each front finds the API a request names and calls `_predict` for it.
        self.fronts: dict[str, ProtocolFront] = {}
        self.fronts["v2"] = V2Front(self)
        self.fronts["v1"] = OpenAIFront(self)

    # --- control side -------------------------------------------------------------------
    def set_api(
        self,
        name: str,
        *,
        max_concurrency: int,
        max_queue_length: int,
        timeout_s: float,
        kind: str = "realtime",
        multi_model: bool = False,
        auth_required: bool = False,
        cors: CorsPolicy | None = None,
        split: Split | None = None,
        protocol: ProtocolSpec | None = None,
        access_log: bool = False,
    ) -> ApiRoute:
        route = self.routes.get(name)
        if route is None:
            route = ApiRoute(name, max_concurrency, max_queue_length, timeout_s, kind, multi_model=multi_model)
            self.routes[name] = route
        for each in (route,) if route.canary is None else (route, route.canary):
            each.kind = kind
            each.behaviour = kind_of(kind)
            each.multi_model = multi_model
            each.max_concurrency = max_concurrency
            each.max_queue_length = max_queue_length
            each.timeout_s = timeout_s
        route.auth_required = auth_required
        route.cors = cors
        route.protocol = protocol
        route.access_log = access_log
        if split is None or route.split is None or not route.split.same_as(split):
            route.split = split  # (an unchanged splitter keeps its counters and its place in the rotation)
        return route

    def record_requests(self, access_log: Path, max_bytes: int, otel_endpoint: str = "") -> None:
        """Write `access_log: true` APIs' lines to `access_log` (rotated past `max_bytes`); export spans
        to `otel_endpoint` when one is set (cirrus/gateway/tracing.py: needs the otel extra)."""
        self.access = AccessLog(access_log, max_bytes)
        if otel_endpoint:
            from cirrus.gateway.tracing import Tracer

            try:
                self.tracer = Tracer(otel_endpoint)
            except ImportError as exc:
                log.warning("no spans are exported to %s: %s", otel_endpoint, exc)

    def close_records(self) -> None:
        """Write out what the access log and the span exporter hold."""
        if self.access is not None:
            self.access.close()
        if self.tracer is not None:
            self.tracer.close()

    def remove_api(self, name: str) -> None:
        route = self.routes.pop(name, None)
        if route is not None:
            route.fail_waiters(ReplicaGone(f"the API {name!r} was deleted"))

    # --- data side ----------------------------------------------------------------------
    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "http":
            await self._http(scope, receive, send)
        elif kind == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        path: str = scope["path"]
        method: str = scope["method"]
        name, _, rest = path[1:].partition("/")
        front = self.fronts.get(name)
        if front is not None:
            await front.serve(scope, receive, send)
            return
        route = self.routes.get(name)
        if route is not None:
            if route.cors is not None:  # before the key check: browsers send preflights without credentials
                marked = await cors_front(route.cors, scope, send)
                if marked is None:
                    return
                send = marked
            if (route.auth_required or self.require_keys) and await self._refused(route, scope, send):
                return
            if route.behaviour.proxied:  # kind server: every method and path goes to the API's own app
                from cirrus.gateway.proxy import proxy

                await proxy(self, route, rest, scope, receive, send)
                return
            if not rest:
                if method == "POST" and route.split is not None:
                    await self._split(route, route.split, scope, receive, send)
                elif method == "POST" and route.behaviour.takes_predictions:
                    await self._predict(route, scope, receive, send)
                else:
                    await self._api_root(route, method, send)
                return
            if method == "POST" and route.multi_model and route.behaviour.model_paths and "/" not in rest:
                await self._predict(route, scope, receive, send, model=rest)
                return
            if await self._api_page(route, rest, method, send):
                return
        elif await self._operator_page(path, method, send, scope):
            return
        await self._not_found(scope, path, send)

    async def _api_root(self, route: ApiRoute, method: str, send: Send) -> None:
        """`/<api>` other than a prediction: describe it, or say how to use it."""
        name = route.name
        if method == "POST":  # a kind that takes no predictions
            await send_json(send, 405, {"error": route.behaviour.no_predictions_hint(name)})
        elif method == "GET":
            await send_json(send, 200, self.describe(route))
        else:
            await send_json(send, 405, {"error": f"use POST /{name} to predict"})

    async def _api_page(self, route: ApiRoute, rest: str, method: str, send: Send) -> bool:
        """`GET /<api>/<rest>`: an async request's status, the OpenAPI schema or the docs page; False: none."""
        if route.behaviour.queued and method == "GET" and rest not in ("openapi.json", "docs"):
            await self._async_status(route, rest, send)
            return True
        if method == "GET" and rest == "openapi.json":
            await send_json(send, 200, route.openapi or {"openapi": "3.1.0", "paths": {}})
            return True
        if method == "GET" and rest == "docs":
            await _send_text(send, docs_page(route.name).encode(), b"text/html; charset=utf-8")
            return True
        return False

    async def _refused(self, route: ApiRoute, scope: Scope, send: Send) -> bool:
        """Answer 401/403/429 unless the request carries a key that may call the API now."""
        denied = self.keys.check(presented_key(scope["headers"]), route.name, time.time())
        if denied is None:
            return False
        extra = [(b"retry-after", str(int(denied.retry_after_s)).encode())] if denied.retry_after_s else []
        if denied.status == 401:
            extra.append((b"www-authenticate", b'Bearer realm="cirrus"'))
        await self._reply_error(
            send, route, time.perf_counter(), denied.status, denied.message, _request_id(scope), extra
        )
        return True

    def _trusted(self, scope: Scope) -> bool:
        """Loopback, or a valid key: may see the list of APIs and the metrics."""
        client = scope.get("client")
        if client and (client[0] == "::1" or str(client[0]).startswith("127.")):
            return True
        return self.keys.valid(presented_key(scope["headers"]), time.time())

    async def _operator_page(self, path: str, method: str, send: Send, scope: Scope) -> bool:
        """`/healthz`, `/metrics` and `GET /` (the list of APIs); False: none of them. Only loopback
        clients and holders of a valid key see which APIs exist and their metrics."""
        if path == "/healthz":
            await send_json(
                send, 200, {"status": "ok", **({"apis": sorted(self.routes)} if self._trusted(scope) else {})}
            )
            return True
        if path in ("/metrics", "/") and not self._trusted(scope):
            await send_json(send, 401, {"error": "send an API key (`Authorization: Bearer <key>`) to see this"})
            return True
        if path == "/metrics" and self.metrics_app is not None:
            await _send_text(send, self.metrics_app(), b"text/plain; version=0.0.4")
            return True
        if path == "/" and method == "GET":
            await send_json(send, 200, {"apis": sorted(self.routes)})
            return True
        return False

    async def _not_found(self, scope: Scope, path: str, send: Send) -> None:
        request_id = _request_id(scope)
        await send_json(
            send,
            404,
            {"error": f"no API at {path!r}", "request_id": request_id},  # naming no other API (GET / lists them)
            request_id,
        )

    def describe(self, route: ApiRoute) -> dict[str, Any]:
        return {
            "api": route.name,
            "replicas_ready": len(route.replicas) + (0 if route.canary is None else len(route.canary.replicas)),
            "in_flight": route.metrics.in_flight,
            "queued": route.metrics.queued,
        }

    async def _read_body(self, scope: Scope, receive: Receive, declared: int | None, timeout_s: float) -> bytes:
        """The request body: BodyTooLarge past the limit; TimeoutError when it has not all arrived
        within `timeout_s` (a stalled or trickled body must not hold a connection and a request)."""
        limit = self.max_body_bytes
        if declared is not None and declared > limit:
            raise BodyTooLarge
        message = await receive()
        body: bytes = message.get("body", b"")
        if not message.get("more_body", False):
            if message["type"] == "http.disconnect":
                raise TimeoutError  # the client went before its body came
            if len(body) > limit:
                raise BodyTooLarge
            return body
        parts = [body]
        size = len(body)
        async with asyncio.timeout(timeout_s):
            while message.get("more_body", False):
                message = await receive()
                if message["type"] == "http.disconnect":
                    raise TimeoutError  # the client went before its body was complete: nothing to forward
                chunk = message.get("body", b"")
                size += len(chunk)
                if size > limit:
                    raise BodyTooLarge
                parts.append(chunk)
        return b"".join(parts)

    async def _predict(
        self,
        route: ApiRoute,
        scope: Scope,
        receive: Receive,
        send: Send,
        model: str | None = None,
        on_body: Callable[[bytes, str, list[tuple[str, str]], str], None] | None = None,
        protocol: str | None = None,
    ) -> None:
        """`model`: named in the path (`POST /<api>/<model>`); it overrides an `X-Cirrus-Model` header.
        `on_body(body, content_type, headers, request_id)`: told the request once its body has come.
        `protocol`: what the replica decodes the body as and encodes the answer to (e.g. "v2.infer"),
        sent in the `X-Cirrus-Protocol` header (a client's own is dropped)."""
        started = time.perf_counter()
        content_type, request_id, declared, forwarded, model, inbound = _request_head(route, scope, model)
        if protocol is not None:
            forwarded.append((PROTOCOL_HEADER, protocol))
        traceparent = child_traceparent(inbound, self.tracer is not None)
        forwarded.append(("traceparent", traceparent))  # the predictor's headers["traceparent"]
        record = None
        if route.access_log or self.tracer is not None:
            record = _new_record(route, scope, request_id, traceparent, inbound, started)
            send = record.wrap(send)
        try:
            try:
                body = await self._read_body(scope, receive, declared, route.timeout_s)
            except BodyTooLarge:
                why = f"request body exceeds the limit of {self.max_body_bytes} bytes"
                await self._reply_error(send, route, started, 413, why, request_id)
                return
            except TimeoutError:
                why = f"the request body did not arrive within {route.timeout_s:g}s (the API's timeout_s)"
                await self._reply_error(send, route, started, 408, why, request_id, [(b"connection", b"close")])
                return
            if on_body is not None:
                on_body(body, content_type, forwarded, request_id)
            if route.behaviour.queued:
                await self._accept(route, scope, send, body, content_type, forwarded, request_id, started)
                return
            target = route.pick()  # a canary revision gets its share
            metrics = target.metrics
            metrics.in_flight += 1
            try:
                await self._forward(
                    target, scope, receive, send, body, content_type, forwarded, request_id, started, model, record
                )
            finally:
                metrics.in_flight -= 1
        finally:
            if record is not None:
                self._finish(route, record)

    def _finish(self, route: ApiRoute, record: RequestRecord) -> None:
        """A logged or traced request has been answered: its access log line, its spans."""
        record.total_s = time.perf_counter() - record.started
        if not record.revision:
            record.revision = serving_revision(route)
        try:
            if route.access_log:
                line = record.line()
                if self.access is not None:
                    self.access.write(line)
                else:
                    log_line(line)
            if self.tracer is not None and int(record.traceparent[53:55], 16) & 1:
                self.tracer.export(record)
        except Exception:
            log.exception("request %s: recording it failed", record.request_id)

    async def _split(self, route: ApiRoute, split: Split, scope: Scope, receive: Receive, send: Send) -> None:
        """A splitter: send the request to one of its APIs (by weight, or by the sticky header) and a
        copy to each shadow, counting what each answered."""
        started = time.perf_counter()
        name = split.choose(scope["headers"])
        backend = self.routes.get(name)
        status = 0

        async def counted(message: MutableMapping[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        if backend is None or backend.split is not None or not backend.behaviour.takes_predictions:
            why = f"the splitter {route.name!r} sent this request to {name!r}, which is not deployed; retry later"
            await self._reply_error(counted, route, started, 503, why, _request_id(scope), _RETRY_AFTER)
        elif not (backend.auth_required and await self._refused(backend, scope, counted)):
            copy = partial(self._copy_to_shadows, split) if split.shadows else None
            await self._predict(backend, scope, receive, counted, on_body=copy)
            route.metrics.observe(status, time.perf_counter() - started, time.time())
        split.sent[name].observe(status, time.perf_counter() - started, time.time())

    def _copy_to_shadows(
        self, split: Split, body: bytes, content_type: str, forwarded: list[tuple[str, str]], request_id: str
    ) -> None:
        """Send a copy of a request to each shadow with room now; a shadow that is full, cold or gone
        gets none (it starts a replica when cold): a shadow never makes the caller wait."""
        for name in split.shadows:
            shadow = self.routes.get(name)
            slot = None
            if shadow is not None and shadow.behaviour.takes_predictions and not shadow.behaviour.queued:
                slot = shadow.try_acquire()
                if slot is None and not shadow.replicas:
                    self._note_waiting(shadow, time.perf_counter())
            if shadow is None or slot is None:
                split.shadows_dropped += 1
                continue
            call = self._shadow_call(split, shadow, slot, body, content_type, forwarded, request_id)
            task = asyncio.get_running_loop().create_task(call)
            self._shadow_tasks.add(task)
            task.add_done_callback(self._shadow_tasks.discard)

    async def _shadow_call(
        self,
        split: Split,
        shadow: ApiRoute,
        slot: ReplicaSlot,
        body: bytes,
        content_type: str,
        forwarded: list[tuple[str, str]],
        request_id: str,
    ) -> None:
        """One shadow copy: its answer only counts in the shadow's metrics; a stream is stopped at once."""
        started = time.perf_counter()
        shadow.metrics.in_flight += 1
        status = 502
        try:
            request_no, future = slot.conn.call(
                request_id=request_id,
                body=body,
                content_type=content_type,
                query_string=b"",
                headers=forwarded,
                timeout_s=shadow.timeout_s,
            )
            try:
                async with asyncio.timeout(shadow.timeout_s + REPLY_GRACE_S):
                    response = await future
            except BaseException:
                slot.conn.forget(request_no)
                raise
            status = response.status
            if response.stream:
                slot.conn.forget(request_no)  # nobody reads a shadow's stream: the replica stops generating it
        except (ReplicaGone, RequestTooLarge):
            status = 502
        except TimeoutError:
            status = 504
        finally:
            shadow.metrics.in_flight -= 1
            shadow.release(slot)
            elapsed, now = time.perf_counter() - started, time.time()
            shadow.metrics.observe(status, elapsed, now, slot.revision)
            split.sent[shadow.name].observe(status, elapsed, now)

    async def _accept(
        self,
        route: ApiRoute,
        scope: Scope,
        send: Send,
        body: bytes,
        content_type: str,
        forwarded: list[tuple[str, str]],
        request_id: str,
        started: float,
    ) -> None:
        """An async API: store the request durably, answer 202 with its id at once."""
        if self.async_front is None or (route.unavailable is not None and not route.replicas):
            why = route.unavailable or "this gateway has no queue store"
            await self._reply_error(send, route, started, 503, why, request_id)
            return
        # One id everywhere: the queue's id is the 202's `id` and `request_id`, its X-Request-Id,
        # and the predictor's `request_id`. It is always minted here: a client's X-Request-Id (kept
        # with the request's headers) could repeat, and a repeat would fail its whole group commit.
        queue_id = uuid.uuid4().hex
        status, answer, extra = await self.async_front.accept(
            route.name, body, content_type, forwarded, scope.get("query_string", b""), queue_id
        )
        if status == 202:
            request_id = queue_id
        total_s = time.perf_counter() - started
        await send_json(send, status, {**answer, "request_id": request_id}, request_id, [*extra, total_timing(total_s)])
        route.metrics.observe(status, total_s, time.time(), serving_revision(route))
        if status == 202 and not route.replicas and self.on_cold is not None:
            self.on_cold(route.name)  # at zero replicas: start one now, not at the next tick

    async def _async_status(self, route: ApiRoute, request_id: str, send: Send) -> None:
        if self.async_front is None:
            await send_json(send, 503, {"error": "this gateway has no queue store"})
            return
        status, answer = await self.async_front.status(route.name, request_id)
        await send_json(send, status, answer)

    async def _forward(
        self,
        route: ApiRoute,
        scope: Scope,
        receive: Receive,
        send: Send,
        body: bytes,
        content_type: str,
        forwarded: list[tuple[str, str]],
        request_id: str,
        started: float,
        model: str | None = None,
        record: RequestRecord | None = None,
    ) -> None:
        timeout_s = route.timeout_s
        slot: ReplicaSlot | None = route.try_acquire(model)
        if slot is None:
            self._note_waiting(route, started)
            try:
                slot = await route.acquire(timeout_s, model)
            except (Overloaded, QueueTimeout, ReplicaGone, Unavailable) as exc:
                await self._reply_no_replica(send, route, started, exc, timeout_s, request_id)
                return
        queue_s = time.perf_counter() - started
        if record is not None:
            record.queue_s, record.replica, record.revision = queue_s, slot.replica_id, slot.revision
        remaining = max(0.001, timeout_s - queue_s)
        streaming = False
        try:
            request_no, future = slot.conn.call(
                request_id=request_id,
                body=body,
                content_type=content_type,
                query_string=scope.get("query_string", b""),
                headers=forwarded,
                timeout_s=remaining,
            )
            try:
                async with asyncio.timeout(remaining + REPLY_GRACE_S):
                    response = await future
            except BaseException:
                slot.conn.forget(request_no)
                raise
            streaming = response.stream
            if record is not None:
                record.response = response
            if response.held is not None:  # a multi-model replica: what it holds now, for routing
                slot.held = frozenset(response.held)
        except ReplicaGone as exc:
            await self._reply_replica_failed(send, route, slot, started, exc, request_id)
            return
        except RequestTooLarge as exc:
            await self._reply_error(send, route, started, 413, str(exc), request_id)
            return
        except TimeoutError:
            await self._reply_error(send, route, started, 504, f"no answer within {timeout_s:g}s", request_id)
            return
        finally:
            if not streaming:
                route.release(slot)
        if streaming:
            sse = any(k == "accept" and "text/event-stream" in v for k, v in forwarded)
            timing = server_timing(queue_s, response, None)
            try:
                await relay_stream(
                    route, slot, request_no, response, receive, send, sse, request_id, started, timing, queue_s
                )
            finally:
                route.release(slot)
            return
        slot.completed += 1
        total_s = time.perf_counter() - started
        headers = _reply_headers(response, request_id, server_timing(queue_s, response, total_s))
        await send({"type": "http.response.start", "status": response.status, "headers": headers})
        await send({"type": "http.response.body", "body": response.body})
        self._observe_reply(route, slot, response, request_id, total_s, queue_s)

    def _note_waiting(self, route: ApiRoute, started: float) -> None:
        """No replica free: at zero replicas this is a cold start, so ask for one now, not at the next tick."""
        if not route.replicas:
            route.note_cold(started)
            if self.on_cold is not None:
                self.on_cold(route.name)

    async def _reply_no_replica(
        self, send: Send, route: ApiRoute, started: float, exc: Exception, timeout_s: float, request_id: str
    ) -> None:
        """Waiting for a replica failed: 503 (retry later) when overloaded or timed out, 404 when the API went."""
        if isinstance(exc, Overloaded):
            why = f"API {route.name!r} is at capacity and its queue is full; retry later"
        elif isinstance(exc, QueueTimeout):
            became = "free" if route.replicas else "ready"
            why = f"no replica of {route.name!r} became {became} within {timeout_s:g}s"
        elif isinstance(exc, Unavailable):
            why = str(exc)
        else:
            await self._reply_error(send, route, started, 404, str(exc), request_id)
            return
        await self._reply_error(send, route, started, 503, why, request_id, _RETRY_AFTER, logged=False)
        # Under overload these come by the thousand a second: a line per second (with a count), not per request.
        self.refusals.event(f"503 {route.name}", f"request {request_id} to {route.name} answered 503: {why}")

    async def _reply_replica_failed(
        self, send: Send, route: ApiRoute, slot: ReplicaSlot, started: float, exc: ReplicaGone, request_id: str
    ) -> None:
        log.warning("request %s to %s failed: %s", request_id, slot.replica_id, exc)
        await self._reply_error(send, route, started, 502, f"replica {slot.replica_id} failed: {exc}", request_id)

    def _observe_reply(
        self,
        route: ApiRoute,
        slot: ReplicaSlot,
        response: InferResponse,
        request_id: str,
        total_s: float,
        queue_s: float,
    ) -> None:
        """Metrics (and a warning on a 5xx) for a relayed, non-streamed reply."""
        status = response.status
        route.metrics.observe(status, total_s, time.time(), slot.revision, queue_s, response)
        if status >= 500:
            log.warning("request %s to %s/%s answered %d", request_id, route.name, slot.replica_id, status)

    async def _reply_error(
        self,
        send: Send,
        route: ApiRoute,
        started: float,
        status: int,
        message: str,
        request_id: str,
        extra: list[tuple[bytes, bytes]] = [],  # noqa: B006
        logged: bool = True,
    ) -> None:
        total_s = time.perf_counter() - started
        answer = {"error": message, "request_id": request_id}
        await send_json(send, status, answer, request_id, [*extra, total_timing(total_s)])
        route.metrics.observe(status, total_s, time.time(), serving_revision(route))
        if status >= 500 and logged:
            log.warning("request %s to %s answered %d: %s", request_id, route.name, status, message)


async def _send_text(send: Send, body: bytes, content_type: bytes) -> None:
    """A 200 whose body is already encoded: the docs page, the Prometheus metrics."""
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"content-type", content_type), (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})


def _reply_headers(response: InferResponse, request_id: str, timing: bytes) -> list[tuple[bytes, bytes]]:
    """The headers of a relayed, non-streamed reply: the replica's own, after ours."""
    headers = [
        (b"content-type", response.content_type.encode("latin-1")),
        (b"content-length", str(len(response.body)).encode()),
        (b"x-request-id", request_id.encode()),
        (b"server-timing", timing),
    ]
    for key, value in response.headers:
        headers.append((key.lower().encode("latin-1"), value.encode("latin-1")))
    return headers


def _request_head(
    route: ApiRoute, scope: Scope, model: str | None
) -> tuple[str, str, int | None, list[tuple[str, str]], str | None, str]:
    """From a request's headers: (content type, request id, declared length, the headers forwarded to
    the replica, the model named, the client's traceparent)."""
    content_type = request_id = inbound = ""
    declared: int | None = None
    forwarded: list[tuple[str, str]] = []
    for key, value in scope["headers"]:
        if key == b"content-type":
            content_type = value.decode("latin-1")
        elif key == b"x-request-id":
            candidate = value.decode("latin-1")
            if _REQUEST_ID_RE.match(candidate):
                request_id = candidate
        elif key == b"content-length":
            try:
                declared = int(value)
            except ValueError:
                declared = None
            continue
        elif key == _MODEL_HEADER and route.multi_model:
            if model is None:  # a model named in the path wins
                model = value.decode("latin-1")
            continue
        elif key == _TRACEPARENT:
            inbound = value.decode("latin-1")
            continue
        if key not in _SKIP_HEADERS:
            forwarded.append((key.decode("latin-1"), value.decode("latin-1")))
    if not request_id:
        request_id = uuid.uuid4().hex
    if model is not None:
        forwarded.append(("x-cirrus-model", model))  # the replica reads the model's name here
    return content_type, request_id, declared, forwarded, model, inbound


def _new_record(
    route: ApiRoute, scope: Scope, request_id: str, traceparent: str, inbound: str, started: float
) -> RequestRecord:
    client = scope.get("client")
    return RequestRecord(
        api=route.name,
        method=scope["method"],
        path=scope["path"],
        client=f"{client[0]}:{client[1]}" if client else "",
        request_id=request_id,
        traceparent=traceparent,
        parent_span=inbound[36:52] if inbound and valid_traceparent(inbound) else "",
        started=started,
        started_ns=time.time_ns() - int((time.perf_counter() - started) * 1e9),
    )


def serving_revision(route: ApiRoute) -> str:
    """The revision label of an answer no replica gave: the serving revision, as far as the gateway knows."""
    if route.revision is not None:
        return str(route.revision)
    return route.replicas[-1].revision if route.replicas else ""


def _request_id(scope: Scope) -> str:
    for key, value in scope["headers"]:
        if key == b"x-request-id":
            candidate = value.decode("latin-1")
            if _REQUEST_ID_RE.match(candidate):
                return candidate
    return uuid.uuid4().hex
