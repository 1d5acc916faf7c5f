"""The Python client for asyncio: the calls of `Client` that talk to a running daemon, on httpx.AsyncClient.

    async with AsyncClient() as client:
        status = await client.get("iris")
        answer = await client.predict("iris", {...})
        async for token in client.stream_events("llm", {"prompt": "hi"}):
            ...
        request_id = await client.submit("transcribe", audio)
        record = await client.wait("transcribe", request_id, timeout=60)

It raises what `Client` raises (`CirrusError` and its subclasses, in `cirrus/client_common.py`). It
does not start a daemon: `Client().up()` (or `cirrus up`) does; nor does it deploy.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import Any, overload

import httpx
from pydantic import ValidationError

from cirrus.client_common import (
    ADMIN_TIMEOUT,
    NOT_RUNNING,
    POLL_INTERVAL_S,
    AsyncRequest,
    CirrusTimeoutError,
    DaemonNotRunningError,
    InvalidSettingsError,
    SseDecoder,
    event_data,
    gateway_errors,
    join,
    parse,
    parse_list,
    raise_for_error,
    request_parts,
    stream_headers,
    submitted_id,
    task_body,
    tls_verify,
    translate_errors,
)
from cirrus.jobs import Job
from cirrus.settings import Settings
from cirrus.tasks import TaskRun
from cirrus.types import ApiStatus, DaemonInfo, EnvEntry

__all__ = ["AsyncClient"]


class AsyncClient:
    """Talks, from asyncio, to the running Cirrus daemon of one state directory (`settings.home`)."""

    def __init__(self, settings: Settings | None = None, *, transport: httpx.AsyncBaseTransport | None = None):
        if settings is None:
            try:
                settings = Settings.from_env()
            except ValueError as exc:
                raise InvalidSettingsError(str(exc)) from None
        self.settings = settings
        self._http = httpx.AsyncClient(
            transport=transport, timeout=ADMIN_TIMEOUT, verify=tls_verify(self.settings.tls_ca)
        )

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    def daemon_info(self) -> DaemonInfo:
        """What `daemon.json` says (without checking that the daemon answers)."""
        try:
            return DaemonInfo.model_validate_json(self.settings.daemon_file.read_bytes())
        except (OSError, ValidationError):
            raise DaemonNotRunningError(NOT_RUNNING) from None

    # APIs.

    @overload
    async def get(self, name: None = None) -> list[ApiStatus]: ...
    @overload
    async def get(self, name: str) -> ApiStatus: ...

    async def get(self, name: str | None = None) -> list[ApiStatus] | ApiStatus:
        """All APIs, or one API with its replicas."""
        if name is None:
            return parse_list(ApiStatus, (await self._admin("GET", "/v1/apis")).json(), "apis")
        return parse(ApiStatus, (await self._admin("GET", f"/v1/apis/{name}")).json())

    async def delete(self, name: str) -> None:
        await self._admin("DELETE", f"/v1/apis/{name}")

    async def predict(
        self, name: str, payload: Any, headers: Mapping[str, str] | None = None, timeout: float = 60.0
    ) -> httpx.Response:
        """POST `payload` to the API through the gateway; the response is returned whatever its status."""
        info = self.daemon_info()
        content, request_headers = request_parts(payload, headers)
        with gateway_errors(name, timeout):
            return await self._http.post(
                join(info.gateway_url, f"/{name}"),
                content=content,
                headers=request_headers,
                timeout=httpx.Timeout(timeout, connect=2.0),
            )

    async def stream(
        self, name: str, payload: Any, headers: Mapping[str, str] | None = None, timeout: float = 60.0
    ) -> AsyncIterator[bytes]:
        """The body's chunks as they arrive; raises as `Client.stream` does."""
        async with self._open_stream(name, payload, headers, timeout, events=False) as response:
            with gateway_errors(name, timeout, streaming=True):
                async for chunk in response.aiter_bytes():
                    yield chunk

    async def stream_events(
        self, name: str, payload: Any, headers: Mapping[str, str] | None = None, timeout: float = 60.0
    ) -> AsyncIterator[str]:
        """One str per chunk the predictor yielded, as server-sent events; raises as `Client.stream_events`."""
        decoder = SseDecoder()
        async with self._open_stream(name, payload, headers, timeout, events=True) as response:
            with gateway_errors(name, timeout, streaming=True):
                async for line in response.aiter_lines():
                    data = event_data(name, decoder.line(line))
                    if data is not None:
                        yield data

    @asynccontextmanager
    async def _open_stream(
        self, name: str, payload: Any, headers: Mapping[str, str] | None, timeout: float, events: bool
    ) -> AsyncIterator[httpx.Response]:
        info = self.daemon_info()
        content, request_headers = request_parts(payload, stream_headers(headers, events))
        url = join(info.gateway_url, f"/{name}")
        with gateway_errors(name, timeout):
            request = self._http.build_request(
                "POST", url, content=content, headers=request_headers, timeout=httpx.Timeout(timeout, connect=2.0)
            )
            response = await self._http.send(request, stream=True)
        try:
            if response.status_code >= 400:
                with gateway_errors(name, timeout):
                    await response.aread()
                raise_for_error(response)
            yield response
        finally:
            await response.aclose()

    # Async APIs.

    async def submit(
        self, name: str, payload: Any, headers: Mapping[str, str] | None = None, timeout: float = 60.0
    ) -> str:
        """Queue `payload` on an async API (`kind: async`); returns the request's id once it is stored."""
        return submitted_id(name, await self.predict(name, payload, headers, timeout))

    async def status(self, name: str, request_id: str, timeout: float = 10.0) -> AsyncRequest:
        """An async request's record: its status, attempts, and result or error once it has finished."""
        info = self.daemon_info()
        url = join(info.gateway_url, f"/{name}/{request_id}")
        with gateway_errors(name, timeout):
            response = await self._http.get(url, timeout=httpx.Timeout(timeout, connect=2.0))
        raise_for_error(response)
        return parse(AsyncRequest, response.json())

    async def wait(
        self,
        name: str,
        request_id: str,
        timeout: float = 60.0,
        on_poll: Callable[[AsyncRequest], None] | None = None,
    ) -> AsyncRequest:
        """Poll until the async request has finished (completed or failed) and return its record;
        CirrusTimeoutError when `timeout` runs out first."""
        deadline = time.monotonic() + timeout
        while True:
            request = await self.status(name, request_id)
            if on_poll is not None:
                on_poll(request)
            if request.finished:
                return request
            if time.monotonic() >= deadline:
                raise CirrusTimeoutError(
                    f"request {request_id} of API {name!r} is still {request.status.value} after {timeout:g}s"
                )
            await asyncio.sleep(min(POLL_INTERVAL_S, max(0.0, deadline - time.monotonic())))

    async def result(self, name: str, request_id: str) -> Any:
        """The result of a completed async request; RequestFailedError / RequestPendingError otherwise."""
        return (await self.status(name, request_id)).value()

    # Queue tools (async APIs).

    async def dead_letters(self, name: str, limit: int = 100) -> list[dict[str, Any]]:
        """An async API's failed requests, newest first, with the start of each payload."""
        answer = (await self._admin("GET", f"/v1/apis/{name}/dead-letters", params={"limit": limit})).json()
        records: list[dict[str, Any]] = answer["dead_letters"]
        return records

    async def requeue_dead_letters(self, name: str, ids: Sequence[str] | None = None) -> dict[str, list[str]]:
        """Put dead letters (`ids`; None: all, up to 1000) back in the queue: `{"requeued", "not_dead_letters"}`."""
        body = {} if ids is None else {"ids": list(ids)}
        return dict((await self._admin("POST", f"/v1/apis/{name}/dead-letters/requeue", json=body)).json())

    async def requests(self, name: str, status: str | None = None, limit: int = 100) -> list[dict[str, Any]]:
        """An async API's queued and in-progress requests (`status`: only those), oldest first."""
        params: dict[str, str | int] = {"limit": limit} | ({"status": status} if status else {})
        answer = (await self._admin("GET", f"/v1/apis/{name}/requests", params=params)).json()
        records: list[dict[str, Any]] = answer["requests"]
        return records

    async def cancel_request(self, request_id: str, name: str | None = None) -> dict[str, Any]:
        """Cancel a queued or in-progress async request (of API `name`, else found among all): its record."""
        params = {} if name is None else {"api": name}
        return dict((await self._admin("POST", f"/v1/requests/{request_id}/cancel", params=params)).json())

    # Batch jobs.

    async def job(self, job_id: str) -> Job:
        return parse(Job, (await self._admin("GET", f"/v1/jobs/{job_id}")).json())

    async def envs(self) -> list[EnvEntry]:
        """The cached Python environments of APIs (`python:` in a spec): size, last use, users."""
        return parse_list(EnvEntry, (await self._admin("GET", "/v1/envs")).json(), "envs")

    async def retry_job(self, job_id: str) -> Job:
        """A new job (`retry_of` = job_id) running the ended job's failed batches and items again."""
        return parse(Job, (await self._admin("POST", f"/v1/jobs/{job_id}/retry")).json())

    # Task runs (`kind: task` APIs).

    async def submit_task(
        self,
        api: str,
        config: Mapping[str, Any] | None = None,
        *,
        timeout_s: float | None = None,
        retries: int | None = None,
    ) -> TaskRun:
        """One run of a task API; returns the run (pending). `timeout_s`, `retries`: default the spec's."""
        body = task_body(config, timeout_s, retries)
        return parse(TaskRun, (await self._admin("POST", f"/v1/apis/{api}/tasks", json=body)).json())

    async def tasks(self, api: str | None = None) -> list[TaskRun]:
        """Task runs, newest first (of one API, or all)."""
        params = {"api": api} if api else None
        return parse_list(TaskRun, (await self._admin("GET", "/v1/tasks", params=params)).json(), "tasks")

    async def task(self, run_id: str) -> TaskRun:
        return parse(TaskRun, (await self._admin("GET", f"/v1/tasks/{run_id}")).json())

    async def cancel_task(self, run_id: str) -> TaskRun:
        return parse(TaskRun, (await self._admin("POST", f"/v1/tasks/{run_id}/cancel")).json())

    async def wait_task(self, run_id: str, timeout: float | None = None) -> TaskRun:
        """Poll until the run has ended; CirrusTimeoutError when `timeout` runs out first."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            run = await self.task(run_id)
            if run.status.finished:
                return run
            if deadline is not None and time.monotonic() >= deadline:
                raise CirrusTimeoutError(f"task run {run_id} is still {run.status.value} after {timeout:g}s")
            await asyncio.sleep(POLL_INTERVAL_S)

    # Plumbing.

    async def _admin(
        self, method: str, path: str, *, json: Any = None, params: Mapping[str, str | int] | None = None
    ) -> httpx.Response:
        info = self.daemon_info()
        with translate_errors(info.admin_url, f"{method} {path}"):
            response = await self._http.request(
                method, join(info.admin_url, path), json=json, params=params, headers=self._auth()
            )
        raise_for_error(response)
        return response

    def _auth(self) -> dict[str, str]:
        try:
            token = self.settings.token_file.read_text().strip()
        except OSError:
            return {}
        return {"authorization": f"Bearer {token}"}
