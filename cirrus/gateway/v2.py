"""The Open Inference Protocol (KServe v2, Triton's HTTP/REST protocol) on the gateway: `/v2/...`.

`GET /v2` (server metadata), `GET /v2/health/live` and `/v2/health/ready` (200 while the gateway
serves), `GET /v2/models/<api>[/versions/<v>]` (model metadata, from the spec's `protocol.inputs`
and `outputs`), `GET .../ready` (200, or 400 while the API cannot serve), `POST .../infer` (the
request goes to a replica through the realtime path, which decodes it: cirrus/replica/v2.py) and
`POST /v2/repository/index` (the APIs that speak v2; loopback or key holders only, like `GET /`).

An API answers here only with `protocol: v2` in its spec. A model's versions are the revisions its
replicas run: the serving one, and a canary's while one runs (a canary's version pins requests to
it; the serving revision's number, or none, lets the canary take its share). Errors are the
protocol's `{"error": "..."}`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from cirrus import __version__
from cirrus.gateway.cors import cors_front
from cirrus.predictor import encode_json
from cirrus.protocols.v2 import OPENAPI_KEY, DeclaredTensor, model_metadata, server_metadata
from cirrus.wire import TensorDecl

if TYPE_CHECKING:
    from cirrus.gateway.app import Gateway, Receive, Scope, Send
    from cirrus.gateway.routing import ApiRoute

log = logging.getLogger("cirrus.gateway")
_NOT_V2 = "API {name!r} does not speak the Open Inference Protocol: add `protocol: v2` to its spec"


async def _send(send: Send, status: int, value: Any = None) -> None:
    """A JSON answer (None: an empty body, as the health endpoints answer)."""
    body = b"" if value is None else encode_json(value)
    headers = [(b"content-length", str(len(body)).encode())]
    if value is not None:
        headers.append((b"content-type", b"application/json"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def versions_of(route: ApiRoute) -> list[str]:
    """The model's versions: the revision it serves, and a canary's while one runs ([]: not known)."""
    versions = [] if route.revision is None else [str(route.revision)]
    if route.canary is not None and route.canary.revision is not None:
        versions.append(str(route.canary.revision))
    return versions


def serving(route: ApiRoute, version: str | None) -> ApiRoute | None:
    """Where requests for `version` go (the canary's version: its replicas only); None: no such version."""
    if version is None or version == "":
        return route
    canary = route.canary
    if canary is not None and canary.revision is not None and version == str(canary.revision):
        return canary
    versions = versions_of(route)
    if not versions or version in versions:  # (not known yet: any)
        return route
    return None


def declared(route: ApiRoute) -> tuple[Sequence[DeclaredTensor], Sequence[DeclaredTensor]]:
    """The model's inputs and outputs: as its spec declares them, else as its predictor does (its
    replicas report them in their OpenAPI document)."""
    protocol = route.protocol
    assert protocol is not None
    inputs: Sequence[DeclaredTensor] = protocol.inputs
    outputs: Sequence[DeclaredTensor] = protocol.outputs
    reported = (route.openapi or {}).get(OPENAPI_KEY)
    if isinstance(reported, dict):
        try:
            inputs = inputs or [TensorDecl(**t) for t in reported.get("inputs", [])]
            outputs = outputs or [TensorDecl(**t) for t in reported.get("outputs", [])]
        except TypeError:
            log.warning("API %s: its replicas reported malformed tensors: %r", route.name, reported)
    return inputs, outputs


class V2Front:
    """The `/v2/...` paths (`Gateway.fronts["v2"]`)."""

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway

    async def serve(self, scope: Scope, receive: Receive, send: Send) -> None:
        path: str = scope["path"]
        method: str = scope["method"]
        parts = [p for p in path.split("/")[2:] if p]  # after "/v2"
        if not parts:
            await self._only(method, "GET", send, server_metadata(__version__))
        elif parts[0] == "health" and len(parts) == 2 and parts[1] in ("live", "ready"):
            await self._only(method, "GET", send)
        elif parts == ["repository", "index"]:
            await self._index(scope, method, send)
        elif parts[0] == "models" and len(parts) >= 2:
            await self._model(parts[1], parts[2:], scope, receive, send)
        else:
            await _send(send, 404, {"error": f"no Open Inference Protocol endpoint at {path!r}"})

    async def _only(self, method: str, allowed: str, send: Send, value: Any = None) -> None:
        if method == allowed or (allowed == "GET" and method == "HEAD"):
            await _send(send, 200, value)
        else:
            await _send(send, 405, {"error": f"use {allowed}"})

    async def _index(self, scope: Scope, method: str, send: Send) -> None:
        """The APIs that speak v2 (Triton's repository index), for loopback clients and key holders."""
        if method != "POST":
            await _send(send, 405, {"error": "use POST /v2/repository/index"})
            return
        if not self.gateway._trusted(scope):
            await _send(send, 401, {"error": "send an API key (`Authorization: Bearer <key>`) to see this"})
            return
        models = []
        for name, route in sorted(self.gateway.routes.items()):
            if route.protocol is not None and route.protocol.name == "v2":
                state = "READY" if route.unavailable is None else "UNAVAILABLE"
                for version in versions_of(route) or [""]:
                    models.append({"name": name, "version": version, "state": state})
        await _send(send, 200, models)

    async def _model(self, name: str, rest: list[str], scope: Scope, receive: Receive, send: Send) -> None:
        """`/v2/models/<name>[/versions/<v>][/ready|/infer]`."""
        version = None
        if rest[:1] == ["versions"]:
            if len(rest) < 2:
                await _send(send, 404, {"error": "name a version: /v2/models/<name>/versions/<version>"})
                return
            version, rest = rest[1], rest[2:]
        gateway = self.gateway
        route = gateway.routes.get(name)
        if route is None:
            await _send(send, 404, {"error": f"no model named {name!r} (no API of that name is deployed)"})
            return
        if route.cors is not None:  # before the key check: browsers send preflights without credentials
            marked = await cors_front(route.cors, scope, send)
            if marked is None:
                return
            send = marked
        if (route.auth_required or gateway.require_keys) and await gateway._refused(route, scope, send):
            return
        if route.protocol is None or route.protocol.name != "v2":
            await _send(send, 404, {"error": _NOT_V2.format(name=name)})
            return
        target = serving(route, version)
        if target is None:
            served = ", ".join(versions_of(route))
            await _send(send, 404, {"error": f"model {name!r} has no version {version!r}; it serves {served}"})
            return
        await self._action(route, target, rest, scope, receive, send)

    async def _action(
        self, route: ApiRoute, target: ApiRoute, rest: list[str], scope: Scope, receive: Receive, send: Send
    ) -> None:
        """`rest`: what follows the model (and version) in the path: "infer", "ready" or nothing (metadata)."""
        method: str = scope["method"]
        action = "/".join(rest)
        if action == "infer":
            if method != "POST":
                await _send(send, 405, {"error": f"use POST /v2/models/{route.name}/infer"})
                return
            await self.gateway._predict(target, scope, receive, send, protocol="v2.infer")
        elif action == "":
            inputs, outputs = declared(route)
            metadata = model_metadata(route.name, versions_of(route), inputs, outputs)
            await self._only(method, "GET", send, metadata)
        elif action == "ready":
            if route.unavailable is not None:
                await _send(send, 400, {"error": f"model {route.name!r} is not ready: {route.unavailable}"})
            else:
                await self._only(method, "GET", send)
        else:
            await _send(send, 404, {"error": f"no Open Inference Protocol endpoint at {scope['path']!r}"})
