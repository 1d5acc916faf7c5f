"""The OpenAI-compatible paths on the gateway: `GET /v1/models[/{id}]`, `POST /v1/embeddings`,
`POST /v1/chat/completions` and `POST /v1/completions`, for the APIs whose spec says `protocol: openai`.

The request's `model` (in its JSON body) names the API, or `<api>/<model>` one model of a multi-model
API. The front reads the body to find it, applies the API's CORS policy and keys as `POST /<api>`
does, and hands the request to `Gateway._predict` (the whole realtime path: limits, routing,
queueing, metrics, streaming) with `X-Cirrus-Protocol: openai.<operation>`; the replica validates
and answers it (cirrus/replica/openai.py). Every error, the gateway's own included (401, 413, 429,
503, 504...), reaches the client in OpenAI's shape `{"error": {"message", "type", "param", "code"}}`,
so the `openai` SDK raises its typed exceptions.
"""

from __future__ import annotations

import time
from collections.abc import MutableMapping
from typing import TYPE_CHECKING, Any

import msgspec

from cirrus.gateway.cors import cors_front
from cirrus.gateway.keys import presented_key
from cirrus.predictor import encode_json
from cirrus.protocols.openai import (
    PATHS,
    OpenAIError,
    as_openai_error,
    model_entry,
    model_not_found,
    models_list,
)

if TYPE_CHECKING:
    from cirrus.gateway.app import Gateway, Receive, Scope, Send
    from cirrus.gateway.routing import ApiRoute

BODY_TIMEOUT_S = 30.0  # a body must arrive within this (the API, named in the body, is not known before)
_DROPPED = frozenset({b"accept", b"content-type"})  # the replica answers SSE itself; the body is JSON


class OpenAIFront:
    """`/v1/...` on one gateway."""

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway
        self.first_seen: dict[str, int] = {}  # API -> when this gateway first listed it (a model's `created`)

    async def serve(self, scope: Scope, receive: Receive, send: Send) -> None:
        send = _errors_in_openai_shape(send)
        rest = scope["path"][len("/v1") :]
        method = scope["method"]
        try:
            if rest == "/models":
                self._allow(method, "GET")
                await send_json(send, 200, models_list(self._listed(scope)))
            elif rest.startswith("/models/"):
                self._allow(method, "GET")
                await self._retrieve(scope, send, rest[len("/models/") :])
            elif rest in PATHS:
                if method == "OPTIONS":
                    await self._preflight(scope, send)
                    return
                self._allow(method, "POST")
                await self._infer(scope, receive, send, PATHS[rest])
            else:
                raise OpenAIError(404, f"unknown endpoint /v1{rest}", code="unknown_url")
        except OpenAIError as exc:
            await send_json(send, exc.status, exc.body())

    @staticmethod
    def _allow(method: str, allowed: str) -> None:
        if method != allowed:
            raise OpenAIError(405, f"use {allowed} here", code="method_not_allowed")

    def _route(self, model: str) -> tuple[ApiRoute, str | None]:
        """The API (and the model of a multi-model one) that `model` names; OpenAIError 404 if none."""
        name, _, sub = model.partition("/")
        route = self.gateway.routes.get(name)
        if route is None or route.protocol is None or route.protocol.name != "openai":
            raise model_not_found(model)
        if sub and not route.multi_model:
            raise model_not_found(model)
        return route, sub or None

    def _needs_key(self, route: ApiRoute) -> bool:
        return route.auth_required or self.gateway.require_keys

    def _listed(self, scope: Scope) -> list[dict[str, Any]]:
        """The openai APIs, those that need a key only when the request carries a valid one."""
        now = time.time()
        valid = self.gateway.keys.valid(presented_key(scope["headers"]), now)
        entries = []
        for name, route in sorted(self.gateway.routes.items()):
            if route.protocol is None or route.protocol.name != "openai" or (self._needs_key(route) and not valid):
                continue
            entries.append(model_entry(name, self.first_seen.setdefault(name, int(now))))
        return entries

    async def _retrieve(self, scope: Scope, send: Send, model: str) -> None:
        route, _ = self._route(model)
        if self._needs_key(route) and await self.gateway._refused(route, scope, send):
            return
        created = self.first_seen.setdefault(route.name, int(time.time()))
        await send_json(send, 200, model_entry(model, created))

    async def _preflight(self, scope: Scope, send: Send) -> None:
        """A browser's preflight names no model: the first openai API whose CORS policy allows it answers."""
        for route in self.gateway.routes.values():
            if route.protocol is None or route.protocol.name != "openai" or route.cors is None:
                continue
            origin = next((v.decode("latin-1") for k, v in scope["headers"] if k == b"origin"), "")
            if route.cors.allow_origin(origin) is not None:
                if await cors_front(route.cors, scope, send) is None:
                    return  # answered: it was a preflight
                break
        raise OpenAIError(405, "no OpenAI-compatible API here allows cross-origin requests", code="cors")

    async def _infer(self, scope: Scope, receive: Receive, send: Send, operation: str) -> None:
        from cirrus.gateway.app import BodyTooLarge  # (app imports this module)

        gateway = self.gateway
        declared = next((_int(v) for k, v in scope["headers"] if k == b"content-length"), None)
        try:
            body = await gateway._read_body(scope, receive, declared, BODY_TIMEOUT_S)
        except BodyTooLarge:
            raise OpenAIError(413, f"request body exceeds the limit of {gateway.max_body_bytes} bytes") from None
        except TimeoutError:
            raise OpenAIError(408, f"the request body did not arrive within {BODY_TIMEOUT_S:g}s") from None
        model, stream = _model_and_stream(body)
        route, sub = self._route(model)
        if route.cors is not None:
            marked = await cors_front(route.cors, scope, send)
            if marked is None:
                return
            send = marked
        if self._needs_key(route) and await gateway._refused(route, scope, send):
            return
        headers = [(k, v) for k, v in scope["headers"] if k not in _DROPPED and k != b"content-length"]
        headers += [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        forwarded_scope = {**scope, "headers": headers}
        if stream:
            send = _as_event_stream(send)
        await gateway._predict(
            route, forwarded_scope, _replay(body, receive), send, model=sub, protocol=f"openai.{operation}"
        )


async def send_json(send: Send, status: int, value: Any) -> None:
    body = encode_json(value)
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def _int(value: bytes) -> int | None:
    try:
        return int(value)
    except ValueError:
        return None


def _model_and_stream(body: bytes) -> tuple[str, bool]:
    """The `model` and `stream` fields of a request body (the replica validates the rest)."""
    try:
        value = msgspec.json.decode(body) if body else None
    except (msgspec.DecodeError, RecursionError) as exc:
        raise OpenAIError(400, f"malformed JSON body: {exc}") from None
    if not isinstance(value, dict):
        raise OpenAIError(400, "the request body must be a JSON object")
    model = value.get("model")
    if not isinstance(model, str) or not model:
        raise OpenAIError(400, "model: Field required (the name of the API)", "model", "missing")
    return model, value.get("stream") is True


def _replay(body: bytes, receive: Receive) -> Receive:
    """A `receive` that gives the body read already, then the client's own messages (a disconnect)."""
    sent = False

    async def replay() -> MutableMapping[str, Any]:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


def _as_event_stream(send: Send) -> Send:
    """A streamed 200 (no content-length) is server-sent events, whatever the replica's item type."""

    async def marked(message: MutableMapping[str, Any]) -> None:
        if message["type"] == "http.response.start" and message["status"] == 200:
            headers = message.get("headers", [])
            if not any(k == b"content-length" for k, _ in headers):
                kept = [(k, v) for k, v in headers if k != b"content-type"]
                kept += [(b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache")]
                message = {**message, "headers": kept}
        await send(message)

    return marked


def _errors_in_openai_shape(send: Send) -> Send:
    """Rewrite JSON error answers (the gateway's `{"error": "..."}`) into OpenAI's error shape."""
    held: MutableMapping[str, Any] | None = None
    parts: list[bytes] = []

    async def rewriting(message: MutableMapping[str, Any]) -> None:
        nonlocal held
        if message["type"] == "http.response.start":
            headers = message.get("headers", [])
            is_json = any(k == b"content-type" and v.startswith(b"application/json") for k, v in headers)
            if message["status"] >= 400 and is_json:
                held = message
                return
            await send(message)
            return
        if held is None or message["type"] != "http.response.body":
            await send(message)
            return
        parts.append(message.get("body", b""))
        if message.get("more_body", False):
            return
        status = held["status"]
        try:
            original = msgspec.json.decode(b"".join(parts))
        except msgspec.DecodeError:
            original = None
        body = encode_json(as_openai_error(status, original))
        headers = [(k, v) for k, v in held.get("headers", []) if k != b"content-length"]
        headers.append((b"content-length", str(len(body)).encode()))
        await send({**held, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    return rewriting
