"""The Python client: finds (or starts) the local daemon and talks to its admin API and gateway.

The CLI is a thin layer over this class, so scripts and notebooks get the same behaviour:

    client = Client()
    client.deploy("examples/iris")
    client.predict("iris", {"sepal_length": 5.1, ...}).json()

Every error it raises is a `CirrusError` (the hierarchy is in `cirrus/client_common.py`, shared with
the asyncio client of `cirrus/async_client.py`).
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, overload

import httpx
from pydantic import ValidationError

from cirrus.client_common import (
    ADMIN_TIMEOUT,
    NOT_RUNNING,
    POLL_INTERVAL_S,
    AsyncRequest,
    CirrusError,
    CirrusTimeoutError,
    DaemonNotRunningError,
    InvalidSettingsError,
    InvalidSpecError,
    NotFoundError,
    RequestFailedError,
    RequestPendingError,
    SseDecoder,
    StreamError,
    encode_payload,
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
from cirrus.jobs import DEFAULT_BATCH_SIZE, Job, JobError, JobRequest, parse_request
from cirrus.settings import Settings
from cirrus.spec import SpecError, find_spec_file, load_deployments
from cirrus.tasks import TaskRun
from cirrus.types import ApiKey, ApiStatus, ApiStatusName, DaemonInfo, DeployResult, EnvEntry, RevisionInfo

__all__ = [
    "NOT_RUNNING",
    "AsyncRequest",
    "CirrusError",
    "CirrusTimeoutError",
    "Client",
    "DaemonNotRunningError",
    "InvalidSettingsError",
    "InvalidSpecError",
    "NotFoundError",
    "RequestFailedError",
    "RequestPendingError",
    "StreamError",
    "encode_payload",
]

PROBE_TIMEOUT = httpx.Timeout(2.0)
STREAM_TIMEOUT = httpx.Timeout(10.0, connect=2.0, read=None)  # a followed log may stay quiet for long
LOG_TAIL_LINES = 20

# Daemons this process spawned: kept referenced so they are reaped (no zombies, no ResourceWarning).
_children: list[subprocess.Popen[bytes]] = []


class Client:
    """Talks to the Cirrus daemon of one state directory (`settings.home`)."""

    def __init__(self, settings: Settings | None = None, *, transport: httpx.BaseTransport | None = None):
        if settings is None:
            try:
                settings = Settings.from_env()
            except ValueError as exc:
                raise InvalidSettingsError(str(exc)) from None
        self.settings = settings
        self._http = httpx.Client(transport=transport, timeout=ADMIN_TIMEOUT, verify=tls_verify(self.settings.tls_ca))

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # The daemon's life.

    def ping(self) -> DaemonInfo | None:
        """The running daemon's info, or None when none answers (a stale daemon.json is ignored)."""
        info = self._read_daemon_file()
        if info is None or not _pid_alive(info.pid):
            return None
        try:
            response = self._http.get(join(info.admin_url, "/v1/health"), headers=self._auth(), timeout=PROBE_TIMEOUT)
        except httpx.HTTPError:
            return None
        if response.status_code == 401:
            raise CirrusError(
                f"the Cirrus daemon (pid {info.pid}) rejects the token in {self.settings.token_file}", status=401
            )
        if response.status_code != 200:
            return None
        try:
            return DaemonInfo.model_validate_json(response.content)
        except ValidationError:
            return None

    def up(self, timeout: float = 30) -> DaemonInfo:
        """Return the running daemon's info, starting a detached daemon first if none answers."""
        info = self.ping()
        if info is not None:
            return info
        proc, log_offset = self._spawn_daemon()
        deadline = time.monotonic() + timeout
        while True:
            info = self.ping()
            if info is not None and info.pid == proc.pid:
                return info
            code = proc.poll()
            if code is not None:
                other = self.ping()  # another `cirrus up` may have won the race for the ports
                if other is not None:
                    return other
                raise CirrusError(
                    f"the Cirrus daemon exited with code {code} while starting" + self._log_tail(log_offset)
                )
            if time.monotonic() >= deadline:
                proc.terminate()
                raise CirrusTimeoutError(
                    f"the Cirrus daemon did not become ready within {timeout:g}s" + self._log_tail(log_offset)
                )
            time.sleep(POLL_INTERVAL_S)

    def down(self, timeout: float = 30) -> bool:
        """Stop the daemon; True if one was running. Asks politely first, then sends SIGTERM."""
        info = self._read_daemon_file()
        if info is None or not _pid_alive(info.pid):
            return False
        try:
            asked = (
                self._http.post(
                    join(info.admin_url, "/v1/shutdown"), headers=self._auth(), timeout=PROBE_TIMEOUT
                ).status_code
                < 400
            )
        except httpx.HTTPError:
            asked = False
        if not asked and not _is_cirrus_process(info.pid):
            return False  # a stale daemon.json whose pid now belongs to another program
        grace = timeout / 2 if asked else 0.0
        if _wait_for_exit(info.pid, grace):
            return True
        try:
            os.kill(info.pid, signal.SIGTERM)
        except ProcessLookupError:
            return True
        if _wait_for_exit(info.pid, timeout - grace):
            return True
        raise CirrusTimeoutError(f"the Cirrus daemon (pid {info.pid}) did not stop within {timeout:g}s")

    def daemon_info(self) -> DaemonInfo:
        """What `daemon.json` says (without checking that the daemon answers)."""
        info = self._read_daemon_file()
        if info is None:
            raise DaemonNotRunningError(NOT_RUNNING)
        return info

    # APIs.

    def deploy(
        self,
        path: str | Path,
        wait: bool = True,
        timeout: float = 300,
        on_poll: Callable[[list[ApiStatus]], None] | None = None,
        force: bool = False,
        canary: float | None = None,
    ) -> list[DeployResult]:
        """Validate the spec at `path`, snapshot its directory, start the daemon if needed, deploy,
        and if `wait` wait until live. `force`: a new revision even if nothing changed; `canary`: the
        new revision takes that percent of requests beside the serving one until `promote` (or
        `rollback` aborts it). A path it cannot deploy raises InvalidSpecError (a SpecError too)."""
        from cirrus.snapshots import SnapshotError, pack

        try:
            deployments = load_deployments(path)
            spec_file = find_spec_file(path).resolve().name  # the revision records the spec itself
            archives = {d.project_dir: pack(Path(d.project_dir), leave_out=(spec_file,)) for d in deployments}
        except (SpecError, SnapshotError) as exc:
            raise InvalidSpecError(str(exc)) from exc
        self.up()
        digests = {}
        for project_dir, (data, snapshot) in archives.items():
            headers = {"content-type": "application/gzip"}
            digests[project_dir] = self._admin("POST", "/v1/snapshots", content=data, headers=headers).json()["digest"]
            if digests[project_dir] != snapshot.digest:
                raise CirrusError(f"the daemon stored the snapshot of {project_dir} under another digest")
        deployments = [d.model_copy(update={"snapshot": digests[d.project_dir]}) for d in deployments]
        body: dict[str, Any] = {
            "deployments": [d.model_dump(mode="json", by_alias=True) for d in deployments],
            "force": force,
        }
        if canary is not None:
            body["canary"] = canary
        data = self._admin("POST", "/v1/apis", json=body).json()
        results = parse_list(DeployResult, data, "results")
        if wait:
            self.wait_until_live(results, timeout=timeout, on_poll=on_poll)
        return results

    def wait_until_live(
        self,
        results: Sequence[DeployResult],
        timeout: float = 300,
        on_poll: Callable[[list[ApiStatus]], None] | None = None,
    ) -> list[ApiStatus]:
        """Poll until every deployed revision is live; CirrusError if one fails or time runs out."""
        deadline = time.monotonic() + timeout
        while True:
            statuses = [self.get(result.name) for result in results]
            if on_poll is not None:
                on_poll(statuses)
            pending = []
            for result, status in zip(results, statuses, strict=True):
                if status.revision < result.revision:  # the controller has not picked the deploy up yet
                    pending.append(status)
                elif status.status == ApiStatusName.ERROR:
                    raise CirrusError(f"API {status.name!r} failed to start: {_failure(status)}")
                elif status.status not in (ApiStatusName.LIVE, ApiStatusName.CANARY):
                    pending.append(status)
            if not pending:
                return statuses
            if time.monotonic() >= deadline:
                waiting = "; ".join(_describe(status) for status in pending)
                raise CirrusTimeoutError(f"timed out after {timeout:g}s waiting for APIs to become live: {waiting}")
            time.sleep(min(POLL_INTERVAL_S, max(0.0, deadline - time.monotonic())))

    def revisions(self, name: str) -> list[RevisionInfo]:
        """Every revision of an API, oldest first, with the one serving and the one rolling out marked."""
        return parse_list(RevisionInfo, self._admin("GET", f"/v1/apis/{name}/revisions").json(), "revisions")

    def rollback(self, name: str, to: int | None = None) -> DeployResult:
        """Abort a running canary (without `to`), or serve an older revision's snapshot again (default:
        the one before the revision serving now) as a new revision, through the ordinary rolling
        update; `wait_until_live` waits for it."""
        data = self._admin("POST", f"/v1/apis/{name}/rollback", json={} if to is None else {"to": to}).json()
        return DeployResult.model_validate(data)

    def promote(self, name: str) -> DeployResult:
        """A canary revision takes every request; the revision that served drains once it has its replicas."""
        return DeployResult.model_validate(self._admin("POST", f"/v1/apis/{name}/promote").json())

    @overload
    def get(self, name: None = None) -> list[ApiStatus]: ...
    @overload
    def get(self, name: str) -> ApiStatus: ...

    def get(self, name: str | None = None) -> list[ApiStatus] | ApiStatus:
        """All APIs, or one API with its replicas."""
        if name is None:
            return parse_list(ApiStatus, self._admin("GET", "/v1/apis").json(), "apis")
        return parse(ApiStatus, self._admin("GET", f"/v1/apis/{name}").json())

    def delete(self, name: str) -> None:
        self._admin("DELETE", f"/v1/apis/{name}")

    def logs(self, name: str, lines: int = 100) -> str:
        """The last `lines` log lines of the API's replicas, each `[replica-id] text`."""
        return self._admin("GET", f"/v1/apis/{name}/logs", params={"lines": lines, "follow": "false"}).text

    def dead_letters(self, name: str, limit: int = 100) -> list[dict[str, Any]]:
        """An async API's failed requests (delivered `max_attempts` times, or rejected), newest first."""
        answer = self._admin("GET", f"/v1/apis/{name}/dead-letters", params={"limit": limit}).json()
        records: list[dict[str, Any]] = answer["dead_letters"]
        return records

    def requeue_dead_letters(self, name: str, ids: Sequence[str] | None = None) -> dict[str, list[str]]:
        """Put dead letters (`ids`; None: all, up to 1000) back in the queue: `{"requeued", "not_dead_letters"}`."""
        body = {} if ids is None else {"ids": list(ids)}
        return dict(self._admin("POST", f"/v1/apis/{name}/dead-letters/requeue", json=body).json())

    def requests(self, name: str, status: str | None = None, limit: int = 100) -> list[dict[str, Any]]:
        """An async API's queued and in-progress requests (`status`: only those), oldest first."""
        params: dict[str, str | int] = {"limit": limit} | ({"status": status} if status else {})
        answer = self._admin("GET", f"/v1/apis/{name}/requests", params=params).json()
        records: list[dict[str, Any]] = answer["requests"]
        return records

    def cancel_request(self, request_id: str, name: str | None = None) -> dict[str, Any]:
        """Cancel a queued or in-progress async request (of API `name`, else found among all): its record."""
        params = {} if name is None else {"api": name}
        return dict(self._admin("POST", f"/v1/requests/{request_id}/cancel", params=params).json())

    def follow_logs(self, name: str, lines: int = 10) -> Iterator[str]:
        """The last `lines` log lines, then new ones as they come, until the daemon ends the stream."""
        return self._follow(f"/v1/apis/{name}/logs", lines)

    def _follow(self, path: str, lines: int) -> Iterator[str]:
        info = self.daemon_info()
        url = join(info.admin_url, path)
        params: dict[str, str | int] = {"lines": lines, "follow": "true"}
        with (
            translate_errors(info.admin_url),
            self._http.stream("GET", url, params=params, headers=self._auth(), timeout=STREAM_TIMEOUT) as response,
        ):
            if response.status_code >= 400:
                response.read()
                raise_for_error(response)
            yield from response.iter_lines()

    def predict(
        self, name: str, payload: Any, headers: Mapping[str, str] | None = None, timeout: float = 60.0
    ) -> httpx.Response:
        """POST `payload` to the API through the gateway; the response is returned whatever its status.

        bytes go as application/octet-stream, str as text/plain, anything else as JSON; a
        Content-Type in `headers` wins.
        """
        info = self.daemon_info()
        content, request_headers = request_parts(payload, headers)
        with gateway_errors(name, timeout):
            return self._http.post(
                join(info.gateway_url, f"/{name}"),
                content=content,
                headers=request_headers,
                timeout=httpx.Timeout(timeout, connect=2.0),
            )

    def stream(
        self, name: str, payload: Any, headers: Mapping[str, str] | None = None, timeout: float = 60.0
    ) -> Iterator[bytes]:
        """POST `payload` to a streaming API and yield the body's chunks as they arrive (network
        chunks: they need not match the predictor's `yield`s; `stream_events` keeps those apart).

        CirrusError (with `status`) when the API answers an error; StreamError when the stream fails
        midway (the gateway then cuts the body short); `timeout` bounds each wait for a chunk.
        """
        with (
            self._open_stream(name, payload, headers, timeout, events=False) as response,
            gateway_errors(name, timeout, streaming=True),
        ):
            yield from response.iter_bytes()

    def stream_events(
        self, name: str, payload: Any, headers: Mapping[str, str] | None = None, timeout: float = 60.0
    ) -> Iterator[str]:
        """Like `stream`, as server-sent events: one str per chunk the predictor yielded (a dict as
        its JSON); an `error` event, or a stream that ends before its last event, raises StreamError."""
        decoder = SseDecoder()
        with (
            self._open_stream(name, payload, headers, timeout, events=True) as response,
            gateway_errors(name, timeout, streaming=True),
        ):
            for line in response.iter_lines():
                data = event_data(name, decoder.line(line))
                if data is not None:
                    yield data

    @contextmanager
    def _open_stream(
        self, name: str, payload: Any, headers: Mapping[str, str] | None, timeout: float, events: bool
    ) -> Iterator[httpx.Response]:
        info = self.daemon_info()
        content, request_headers = request_parts(payload, stream_headers(headers, events))
        url = join(info.gateway_url, f"/{name}")
        with gateway_errors(name, timeout):
            request = self._http.build_request(
                "POST", url, content=content, headers=request_headers, timeout=httpx.Timeout(timeout, connect=2.0)
            )
            response = self._http.send(request, stream=True)
        try:
            if response.status_code >= 400:
                with gateway_errors(name, timeout):
                    response.read()
                raise_for_error(response)
            yield response
        finally:
            response.close()

    # Async APIs.

    def submit(self, name: str, payload: Any, headers: Mapping[str, str] | None = None, timeout: float = 60.0) -> str:
        """Queue `payload` on an async API (`kind: async`); returns the request's id once it is stored."""
        return submitted_id(name, self.predict(name, payload, headers, timeout))

    def status(self, name: str, request_id: str, timeout: float = 10.0) -> AsyncRequest:
        """An async request's record: its status, attempts, and result or error once it has finished."""
        info = self.daemon_info()
        url = join(info.gateway_url, f"/{name}/{request_id}")
        with gateway_errors(name, timeout):
            response = self._http.get(url, timeout=httpx.Timeout(timeout, connect=2.0))
        raise_for_error(response)
        return parse(AsyncRequest, response.json())

    def wait(
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
            request = self.status(name, request_id)
            if on_poll is not None:
                on_poll(request)
            if request.finished:
                return request
            if time.monotonic() >= deadline:
                raise CirrusTimeoutError(
                    f"request {request_id} of API {name!r} is still {request.status.value} after {timeout:g}s"
                )
            time.sleep(min(POLL_INTERVAL_S, max(0.0, deadline - time.monotonic())))

    def result(self, name: str, request_id: str) -> Any:
        """The result of a completed async request (bytes when neither JSON nor text); RequestFailedError
        when it failed, RequestPendingError while it is queued or running."""
        return self.status(name, request_id).value()

    # Batch jobs.

    def submit_job(
        self,
        api: str,
        items: Sequence[Any] | None = None,
        *,
        items_url: str | Path | None = None,
        batch_size: int = DEFAULT_BATCH_SIZE,
        workers: int = 1,
        timeout_s: float | None = None,
        max_attempts: int | None = None,
        config: Mapping[str, Any] | None = None,
        sink: str | Path | None = None,
    ) -> Job:
        """Run `items` (or the JSONL / .json file at `items_url`: a path or an fsspec URL, read by the
        daemon) through a batch API's predict_batch; returns the job (pending or running)."""
        request = _job_request(
            items=None if items is None else list(items),
            items_url=_location(items_url),
            batch_size=batch_size,
            workers=workers,
            timeout_s=timeout_s,
            max_attempts=max_attempts,
            config=dict(config or {}),
            sink=_location(sink),
        )
        body = request.model_dump(mode="json", exclude_none=True)
        return parse(Job, self._admin("POST", f"/v1/apis/{api}/jobs", json=body).json())

    def jobs(self, api: str | None = None) -> list[Job]:
        """Jobs, newest first (of one API, or all)."""
        params = {"api": api} if api else None
        return parse_list(Job, self._admin("GET", "/v1/jobs", params=params).json(), "jobs")

    def job(self, job_id: str) -> Job:
        return parse(Job, self._admin("GET", f"/v1/jobs/{job_id}").json())

    def create_key(
        self,
        apis: Sequence[str] | None = None,
        rate: float | None = None,
        burst: float | None = None,
        expires_in_s: float | None = None,
        name: str | None = None,
    ) -> tuple[str, ApiKey]:
        """A new API key (returned only now: it is stored hashed) and its record."""
        body: dict[str, Any] = {"apis": list(apis) if apis else None, "rate": rate, "burst": burst}
        body |= {"expires_in_s": expires_in_s, "name": name}
        data = self._admin("POST", "/v1/keys", json=body).json()
        return str(data["key"]), parse(ApiKey, data["record"])

    def keys(self) -> list[ApiKey]:
        return parse_list(ApiKey, self._admin("GET", "/v1/keys").json(), "keys")

    def revoke_key(self, key_id: str) -> ApiKey:
        return parse(ApiKey, self._admin("DELETE", f"/v1/keys/{key_id}").json())

    def envs(self) -> list[EnvEntry]:
        """The cached Python environments of APIs (`python:` in a spec): size, last use, users."""
        return parse_list(EnvEntry, self._admin("GET", "/v1/envs").json(), "envs")

    def prune_envs(self, dry_run: bool = False) -> list[EnvEntry]:
        """Remove every cached environment no revision uses (`dry_run`: only list them); those removed."""
        answer = self._admin("POST", "/v1/envs/prune", json={"dry_run": dry_run}).json()
        return parse_list(EnvEntry, answer, "removed")

    def cancel_job(self, job_id: str) -> Job:
        """Cancel a job: `stopping` until its batches in flight end (`wait_job` for its final counts)."""
        return parse(Job, self._admin("POST", f"/v1/jobs/{job_id}/cancel").json())

    def retry_job(self, job_id: str) -> Job:
        """A new job (`retry_of` = job_id) running the ended job's failed batches and items again."""
        return parse(Job, self._admin("POST", f"/v1/jobs/{job_id}/retry").json())

    def wait_job(self, job_id: str, timeout: float | None = None, on_poll: Callable[[Job], None] | None = None) -> Job:
        """Poll until the job has ended (any final status); CirrusError when `timeout` runs out first."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            job = self.job(job_id)
            if on_poll is not None:
                on_poll(job)
            if job.status.finished:
                return job
            if deadline is not None and time.monotonic() >= deadline:
                raise CirrusTimeoutError(f"job {job_id} is still {job.status.value} after {timeout:g}s")
            time.sleep(POLL_INTERVAL_S)

    # Task runs (`kind: task` APIs).

    def submit_task(
        self,
        api: str,
        config: Mapping[str, Any] | None = None,
        *,
        timeout_s: float | None = None,
        retries: int | None = None,
    ) -> TaskRun:
        """One run of a task API (`run(config)` or its command); returns the run (pending). `timeout_s`
        and `retries` default to the spec's `task:` section."""
        body = task_body(config, timeout_s, retries)
        return parse(TaskRun, self._admin("POST", f"/v1/apis/{api}/tasks", json=body).json())

    def tasks(self, api: str | None = None) -> list[TaskRun]:
        """Task runs, newest first (of one API, or all)."""
        params = {"api": api} if api else None
        return parse_list(TaskRun, self._admin("GET", "/v1/tasks", params=params).json(), "tasks")

    def task(self, run_id: str) -> TaskRun:
        return parse(TaskRun, self._admin("GET", f"/v1/tasks/{run_id}").json())

    def cancel_task(self, run_id: str) -> TaskRun:
        """Cancel a run (a running one is `cancelled` once its process is gone: `wait_task`)."""
        return parse(TaskRun, self._admin("POST", f"/v1/tasks/{run_id}/cancel").json())

    def wait_task(self, run_id: str, timeout: float | None = None) -> TaskRun:
        """Poll until the run has ended (any final status); CirrusTimeoutError when `timeout` runs out first."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            run = self.task(run_id)
            if run.status.finished:
                return run
            if deadline is not None and time.monotonic() >= deadline:
                raise CirrusTimeoutError(f"task run {run_id} is still {run.status.value} after {timeout:g}s")
            time.sleep(POLL_INTERVAL_S)

    def task_logs(self, run_id: str, lines: int = 100) -> str:
        """The last `lines` log lines of a run (all its attempts, oldest first)."""
        return self._admin("GET", f"/v1/tasks/{run_id}/logs", params={"lines": lines, "follow": "false"}).text

    def follow_task_logs(self, run_id: str, lines: int = 10) -> Iterator[str]:
        """A run's last `lines` log lines, then new ones as they come, until the stream is closed."""
        return self._follow(f"/v1/tasks/{run_id}/logs", lines)

    # Plumbing.

    def dashboard_login(self) -> dict[str, Any]:
        """A one-time login to the dashboard: `{"code", "url", "expires_at"}`; opening `url` (within 60 s,
        once) in a browser logs it in for 12 hours, read-only."""
        return dict(self._admin("POST", "/v1/dashboard/login-codes").json())

    def _admin(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        params: Mapping[str, str | int] | None = None,
        content: bytes | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> httpx.Response:
        info = self.daemon_info()
        with translate_errors(info.admin_url, f"{method} {path}"):
            response = self._http.request(
                method,
                join(info.admin_url, path),
                json=json,
                params=params,
                content=content,
                headers={**self._auth(), **(headers or {})},
            )
        raise_for_error(response)
        return response

    def _auth(self) -> dict[str, str]:
        try:
            token = self.settings.token_file.read_text().strip()
        except OSError:
            return {}
        return {"authorization": f"Bearer {token}"}

    def _read_daemon_file(self) -> DaemonInfo | None:
        try:
            return DaemonInfo.model_validate_json(self.settings.daemon_file.read_bytes())
        except (OSError, ValidationError):
            return None

    def _spawn_daemon(self) -> tuple[subprocess.Popen[bytes], int]:
        s = self.settings
        s.home.mkdir(parents=True, exist_ok=True, mode=0o700)  # private: the daemon tightens an older one
        command = [
            s.python,
            "-m",
            "cirrus.daemon",
            "--home",
            str(s.home),
            "--host",
            s.host,
            "--port",
            str(s.gateway_port),
            "--admin-port",
            str(s.admin_port),
        ]
        env = {**os.environ, **s.daemon_env()}
        fd = os.open(s.daemon_log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)  # O_APPEND: it is rotated
        with os.fdopen(fd, "ab") as log:
            log_offset = log.tell()
            try:
                proc = subprocess.Popen(
                    command,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=log,
                    env=env,
                    start_new_session=True,
                    close_fds=True,
                )
            except OSError as exc:
                raise CirrusError(f"cannot start the Cirrus daemon with {s.python!r}: {exc}") from None
        _children.append(proc)
        return proc, log_offset

    def _log_tail(self, offset: int) -> str:
        try:
            with self.settings.daemon_log.open("rb") as log:
                log.seek(offset)
                text = log.read().decode(errors="replace")
        except OSError:
            return ""
        lines = text.strip().splitlines()[-LOG_TAIL_LINES:]
        if not lines:
            return f" (nothing in {self.settings.daemon_log})"
        return f"; the end of {self.settings.daemon_log}:\n" + "\n".join(f"  {line}" for line in lines)


def _job_request(**fields: Any) -> JobRequest:
    try:
        return parse_request({k: v for k, v in fields.items() if v is not None})
    except JobError as exc:
        raise CirrusError(str(exc), status=400) from None


def _location(target: str | Path | None) -> str | None:
    """A local path made absolute (the daemon reads it from its own directory); URLs as they are."""
    if target is None:
        return None
    text = str(target)
    if "://" in text:
        return text
    return str(Path(text).expanduser().resolve())


def _failure(status: ApiStatus) -> str:
    reasons = [status.message] + [r.last_error for r in status.replicas if r.revision == status.revision]
    seen = list(dict.fromkeys(reason for reason in reasons if reason))
    return "\n".join(seen) if seen else "no reason given (see `cirrus logs " + status.name + "`)"


def _describe(status: ApiStatus) -> str:
    ready = f"{status.replicas_ready}/{status.replicas_desired} replicas ready"
    text = f"{status.name} is {status.status} ({ready})"
    errors = [r.last_error for r in status.replicas if r.last_error and r.revision == status.revision]
    return f"{text}, last error: {errors[-1]}" if errors else text


def _pid_alive(pid: int) -> bool:
    for proc in list(_children):
        if proc.pid == pid:  # our own child: poll() reaps it, so a dead one is not a zombie
            if proc.poll() is None:
                return True
            _children.remove(proc)
            return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return not _is_zombie(pid)


def _is_zombie(pid: int) -> bool:
    """A process that exited but was not reaped yet (e.g. a daemon whose `cirrus up` has exited,
    reparented to an init that reaps late or never) is gone, though `kill(pid, 0)` still succeeds."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return False
    return stat.rpartition(b")")[2].split()[:1] == [b"Z"]


def _is_cirrus_process(pid: int) -> bool:
    try:
        return b"cirrus" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def _wait_for_exit(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while _pid_alive(pid):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)
    return True
