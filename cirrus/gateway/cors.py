"""Cross-origin requests (an API's `cors:`): answering browsers' preflights and marking answers.

Only an API whose spec has `cors` gets here (the gateway checks one attribute of the route), and
only requests that carry an `Origin` header. A preflight (`OPTIONS` with `Access-Control-Request-Method`)
is answered before the API-key check, since browsers send preflights without credentials: 204 with
the allowed methods and headers when the origin, the method and the headers are allowed, 403 when
not. Other requests from an allowed origin get `Access-Control-Allow-Origin` on their answer.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from typing import Any

from cirrus.predictor import encode_json

Scope = MutableMapping[str, Any]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]

_VARY = (b"vary", b"origin")


@dataclass(frozen=True)
class CorsPolicy:
    """What one API allows (built from its spec's `cors`, cirrus/spec.py CorsSpec)."""

    allow_origins: frozenset[str]  # exact origins, lowercase; "*" means any
    allow_methods: tuple[str, ...] = ("POST", "GET")
    allow_headers: tuple[str, ...] = ("content-type", "authorization", "x-api-key", "x-request-id")
    max_age_s: int = 600
    allow_credentials: bool = False

    def allow_origin(self, origin: str) -> bytes | None:
        """The `Access-Control-Allow-Origin` value for a request from `origin`; None: not allowed."""
        if origin.lower() in self.allow_origins:
            return origin.encode("latin-1")
        if "*" in self.allow_origins:
            return b"*"
        return None

    def answer_headers(self, allowed: bytes) -> list[tuple[bytes, bytes]]:
        headers = [(b"access-control-allow-origin", allowed), _VARY]
        if self.allow_credentials:
            headers.append((b"access-control-allow-credentials", b"true"))
        return headers

    def preflight(self, origin: str, method: str, headers: str) -> tuple[int, list[tuple[bytes, bytes]], str]:
        """A preflight's answer: (status, headers, why it was refused or "")."""
        allowed = self.allow_origin(origin)
        if allowed is None:
            return 403, [_VARY], f"the origin {origin!r} may not call this API (its spec's cors.allow_origins)"
        if method.upper() not in self.allow_methods:
            return 403, [_VARY], f"the method {method!r} is not allowed (cors.allow_methods)"
        asked = [h.strip().lower() for h in headers.split(",") if h.strip()]
        refused = [h for h in asked if h not in self.allow_headers]
        if refused:
            return 403, [_VARY], f"the header(s) {', '.join(refused)} are not allowed (cors.allow_headers)"
        return (
            204,
            [
                *self.answer_headers(allowed),
                (b"access-control-allow-methods", ", ".join(self.allow_methods).encode()),
                (b"access-control-allow-headers", ", ".join(self.allow_headers).encode()),
                (b"access-control-max-age", str(self.max_age_s).encode()),
            ],
            "",
        )


async def cors_front(policy: CorsPolicy, scope: Scope, send: Send) -> Send | None:
    """The `send` for a request to an API with CORS: it marks the answer when the origin is allowed.
    None: the request was a preflight, answered here."""
    origin = method = asked = None
    for key, value in scope["headers"]:
        if key == b"origin":
            origin = value.decode("latin-1")
        elif key == b"access-control-request-method":
            method = value.decode("latin-1")
        elif key == b"access-control-request-headers":
            asked = value.decode("latin-1")
    if origin is None:
        return send
    if scope["method"] == "OPTIONS" and method is not None:
        status, headers, why = policy.preflight(origin, method, asked or "")
        body = encode_json({"error": why}) if why else b""
        if body:
            headers += [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})
        return None
    allowed = policy.allow_origin(origin)
    extra = policy.answer_headers(allowed) if allowed is not None else [_VARY]

    async def marked(message: MutableMapping[str, Any]) -> None:
        if message["type"] == "http.response.start":
            message = {**message, "headers": [*message.get("headers", ()), *extra]}
        await send(message)

    return marked
