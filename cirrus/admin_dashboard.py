"""The dashboard's side of the admin API: its login, its page and the JSON the page polls.

`cirrus dashboard` asks for a one-time login code (`POST /v1/dashboard/login-codes`, admin token) and
opens `/dashboard/login?code=CODE`, which trades the code for a session cookie (`cirrus_dashboard`:
HttpOnly, SameSite=Strict, 12 hours, kept in this process's memory, so a daemon restart logs the page
out). The cookie authorizes GET on `/dashboard/...` and `/v1/dashboard/...` only: the page reads,
it never changes anything; every other route still needs the bearer token (`cirrus/admin.py`'s
`TokenAuth` asks `session_allows`).

Routes: `/dashboard/` (the page: `cirrus/dashboard/static/index.html`), `/dashboard/static/<file>`
(its assets, only files of that directory), `/v1/dashboard/overview` (every API, one row each) and
`/v1/dashboard/apis/{name}?window_s=3600` (one API: status, history series, events, revisions, dead
letters, jobs, logs). JSON answers are `Cache-Control: no-store`.
"""

from __future__ import annotations

import asyncio
import hmac
import html
import mimetypes
import secrets
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import FileResponse, HTMLResponse, JSONResponse, RedirectResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from cirrus.store.view import with_payload

if TYPE_CHECKING:
    from cirrus.control.controller import Controller
    from cirrus.history import History

STATIC_DIR = Path(__file__).parent / "dashboard" / "static"
COOKIE = "cirrus_dashboard"
CODE_TTL_S = 60.0
SESSION_TTL_S = 12 * 3600.0
MAX_CODES = 32  # unredeemed login codes kept (the oldest is dropped)
MAX_SESSIONS = 64
DEFAULT_WINDOW_S = 3600
MAX_WINDOW_S = 24 * 3600
MIN_WINDOW_S = 60
OVERVIEW_RATE_S = 60.0  # the overview's error rate: over this long
DEAD_LETTERS_SHOWN = 20
JOBS_SHOWN = 20
LOG_LINES_SHOWN = 50
MAX_LOG_LINE_CHARS = 2000
RUN_AGAIN = "run `cirrus dashboard` again for a new login link"
NO_STORE = {"Cache-Control": "no-store"}
# The page loads its scripts from this origin only (no inline script); styles may be inline (charts set them).
PAGE_HEADERS = {
    "Cache-Control": "no-cache",
    "Content-Security-Policy": "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
    "img-src 'self' data:; connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}
CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".mjs": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".json": "application/json",
    ".map": "application/json",
    ".svg": "image/svg+xml",
    ".png": "image/png",
    ".ico": "image/x-icon",
    ".woff2": "font/woff2",
    ".txt": "text/plain; charset=utf-8",
}


class Sessions:
    """Login codes (single use, CODE_TTL_S) and the sessions they opened (SESSION_TTL_S), in memory,
    each bounded; secrets compared in constant time."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self.clock = clock
        self._codes: dict[str, float] = {}  # code -> expires at
        self._sessions: dict[str, float] = {}  # session id -> expires at

    def new_code(self) -> tuple[str, float]:
        now = self.clock()
        self._codes = {c: at for c, at in self._codes.items() if at > now}
        while len(self._codes) >= MAX_CODES:
            del self._codes[next(iter(self._codes))]
        code, expires_at = secrets.token_urlsafe(32), now + CODE_TTL_S
        self._codes[code] = expires_at
        return code, expires_at

    def redeem(self, code: str) -> str | None:
        """A new session for a live code (which is used up now); None for a used, expired or wrong one."""
        now = self.clock()
        found = _find(self._codes, code)
        if found is None:
            return None
        expires_at = self._codes.pop(found)
        if expires_at <= now:
            return None
        self._sessions = {s: at for s, at in self._sessions.items() if at > now}
        while len(self._sessions) >= MAX_SESSIONS:
            del self._sessions[next(iter(self._sessions))]
        session = secrets.token_urlsafe(32)
        self._sessions[session] = now + SESSION_TTL_S
        return session

    def valid(self, session: str) -> bool:
        found = _find(self._sessions, session)
        return found is not None and self._sessions[found] > self.clock()


def _find(secrets_: dict[str, float], given: str) -> str | None:
    """The key of `secrets_` equal to `given`, compared with each in constant time."""
    given_bytes = given.encode()
    found = None
    for key in secrets_:
        if hmac.compare_digest(key.encode(), given_bytes):
            found = key
    return found


def is_dashboard_path(path: str) -> bool:
    return path == "/dashboard" or path.startswith(("/dashboard/", "/v1/dashboard/"))


def _cookie(scope: Scope) -> str | None:
    from starlette.requests import cookie_parser

    for name, value in scope["headers"]:
        if name == b"cookie":
            found = cookie_parser(value.decode("latin-1")).get(COOKIE)
            if found:
                return found
    return None


def session_allows(scope: Scope, sessions: Sessions) -> bool:
    """Whether a request without the admin token may pass: the login page, or a GET of the dashboard
    with a live session cookie."""
    if scope["method"] not in ("GET", "HEAD") or not is_dashboard_path(scope["path"]):
        return False
    if scope["path"] == "/dashboard/login":
        return True
    cookie = _cookie(scope)
    return cookie is not None and sessions.valid(cookie)


def refusal(scope: Scope) -> Response:
    """The 401 for a dashboard request with neither the token nor a live session."""
    if scope["path"].startswith("/v1/"):
        return JSONResponse({"error": f"not logged in to the dashboard (or the daemon restarted): {RUN_AGAIN}"}, 401)
    return _page(401, "Not logged in", f"This page needs a login link: {RUN_AGAIN}.")


def _page(status: int, title: str, text: str) -> HTMLResponse:
    body = (
        f"<!doctype html><meta charset=utf-8><title>Cirrus: {html.escape(title)}</title>"
        f"<h1>{html.escape(title)}</h1><p>{html.escape(text)}</p>"
    )
    return HTMLResponse(body, status, headers=PAGE_HEADERS)


def _json(body: Any, status: int = 200) -> JSONResponse:
    return JSONResponse(body, status, headers=NO_STORE)


class Dashboard:
    """The dashboard's handlers, over the controller and the history store."""

    def __init__(
        self,
        controller: Controller,
        history: History | None,
        sessions: Sessions | None = None,
        static_dir: Path = STATIC_DIR,
    ) -> None:
        self.controller = controller
        self.history = history
        self.sessions = sessions or Sessions()
        self.static_dir = static_dir

    async def login_code(self, request: Request) -> Response:
        code, expires_at = self.sessions.new_code()
        url = f"{str(request.base_url).rstrip('/')}/dashboard/login?code={code}"
        return _json({"code": code, "url": url, "expires_at": expires_at}, 201)

    async def login(self, request: Request) -> Response:
        session = self.sessions.redeem(request.query_params.get("code", ""))
        if session is None:
            return _page(401, "Login link used or expired", f"A login link works once, for 60 s: {RUN_AGAIN}.")
        response = RedirectResponse("/dashboard/", 303, headers={"Cache-Control": "no-store"})
        response.set_cookie(COOKIE, session, max_age=int(SESSION_TTL_S), path="/", httponly=True, samesite="strict")
        return response

    async def to_index(self, request: Request) -> Response:
        return RedirectResponse("/dashboard/", 308)

    async def index(self, request: Request) -> Response:
        return self._file("index.html")

    async def static(self, request: Request) -> Response:
        return self._file(request.path_params["file"])

    def _file(self, name: str) -> Response:
        """A file of the static directory, by its name there (nothing else: the names are listed, not joined)."""
        files = {p.relative_to(self.static_dir).as_posix(): p for p in self.static_dir.rglob("*") if p.is_file()}
        path = files.get(name)
        if path is None:
            if name == "index.html":
                return _page(404, "No dashboard page", f"this install has no {self.static_dir / name}")
            return Response("no such file", 404, media_type="text/plain", headers=PAGE_HEADERS)
        kind = CONTENT_TYPES.get(path.suffix) or mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        return FileResponse(path, media_type=kind, headers=PAGE_HEADERS)

    async def overview(self, request: Request) -> Response:
        now = time.time()
        statuses = self.controller.statuses()
        recent = {} if self.history is None else await asyncio.to_thread(self.history.recent, now - OVERVIEW_RATE_S)
        apis = []
        for s in statuses:
            rates = recent.get(s.name, {})
            rps = rates.get("rps")
            apis.append(
                {
                    "name": s.name,
                    "kind": s.kind,
                    "status": s.status.value,
                    "revision": s.revision,
                    "replicas_ready": s.replicas_ready,
                    "replicas_desired": s.replicas_desired,
                    "replicas_pending": s.replicas_pending,
                    "rps": round(s.requests_last_minute / 60, 3) if rps is None else rps,
                    "p50_ms": s.p50_ms,
                    "p99_ms": s.p99_ms,
                    "error_rate": rates.get("error_rate"),
                    "in_flight": s.in_flight,
                    "queued": s.queued,
                    "backlog_in_queue": s.backlog_in_queue,
                    "backlog_in_progress": s.backlog_in_progress,
                }
            )
        return _json({"time": now, "apis": apis})

    async def api(self, request: Request) -> Response:
        name = request.path_params["name"]
        try:
            window_s = int(request.query_params.get("window_s", DEFAULT_WINDOW_S))
        except ValueError:
            return _json({"error": "window_s must be an integer (seconds)"}, 400)
        window_s = max(MIN_WINDOW_S, min(window_s, MAX_WINDOW_S))
        status = self.controller.status(name)
        if status is None:
            return _json({"error": f"no API named {name!r}"}, 404)
        now = time.time()
        since = now - window_s
        history = self.history
        series = {} if history is None else await asyncio.to_thread(history.series, name, since, now)
        events = [] if history is None else await asyncio.to_thread(history.events, name, since)
        return _json(
            {
                "time": now,
                "status": status.model_dump(mode="json"),
                "series": series,
                "events": events,
                "revisions": [r.model_dump(mode="json") for r in self.controller.rollouts.revisions(name)],
                "dead_letters": await self._dead_letters(name) if status.kind == "async" else [],
                "jobs": await self._jobs(name) if status.kind == "batch" else [],
                "logs": await self._logs(name),
            }
        )

    async def _dead_letters(self, name: str) -> list[dict[str, Any]]:
        store = self.controller.queue_store
        if store is None:
            return []
        try:
            records = await asyncio.to_thread(store.dead_letters, name, DEAD_LETTERS_SHOWN)
        except Exception:
            return []  # the store is down: the page shows the rest
        return [with_payload(r) for r in records]

    async def _jobs(self, name: str) -> list[dict[str, Any]]:
        jobs = self.controller.jobs
        if jobs is None:
            return []
        stored = await asyncio.to_thread(jobs.store.recent, name, JOBS_SHOWN)
        return [jobs.active.get(job.id, job).model_dump(mode="json") for job in stored]

    async def _logs(self, name: str) -> list[str]:
        lines: list[str] = []
        async for chunk in self.controller.runtime.logs(name, None, LOG_LINES_SHOWN, False):
            lines.extend(line[:MAX_LOG_LINE_CHARS] for line in chunk.decode("utf-8", "replace").splitlines())
        return lines[-LOG_LINES_SHOWN:]

    def app(self) -> Starlette:
        return Starlette(
            routes=[
                Route("/v1/dashboard/login-codes", self.login_code, methods=["POST"]),
                Route("/v1/dashboard/overview", self.overview),
                Route("/v1/dashboard/apis/{name}", self.api),
                Route("/dashboard/login", self.login),
                Route("/dashboard", self.to_index),
                Route("/dashboard/", self.index),
                Route("/dashboard/static/{file:path}", self.static),
            ]
        )


class DashboardRoutes:
    """Admin app middleware (inside `TokenAuth`): the dashboard's paths go to the dashboard's routes,
    every other path to the admin API's."""

    def __init__(self, app: ASGIApp, dashboard: Dashboard) -> None:
        self.app = app
        self.dashboard = dashboard.app()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and is_dashboard_path(scope["path"]):
            await self.dashboard(scope, receive, send)
            return
        await self.app(scope, receive, send)
