"""What the two clients share: their exceptions, and the pure pieces of talking HTTP to Cirrus.

`Client` (`cirrus/client.py`) and `AsyncClient` (`cirrus/async_client.py`) raise only
`CirrusError` and its subclasses. A subclass that replaces a standard error also derives from it,
so code that caught the older exception keeps working:

    CirrusError                  any failure of a client; `status` is the HTTP status when there is one
    ├── DaemonNotRunningError    no daemon answers for this state directory
    ├── NotFoundError            HTTP 404: no such API, job, key or async request
    ├── InvalidSpecError         `deploy` was given a path whose spec or files cannot be deployed
    │                            (also a `cirrus.spec.SpecError`, hence a ValueError)
    ├── InvalidSettingsError     a CIRRUS_* environment variable is wrong (also a ValueError)
    ├── CirrusTimeoutError       a wait or a request ran out of time (also a TimeoutError)
    ├── StreamError              a streamed answer failed after it began
    ├── RequestFailedError       an async request ended `failed`; `request` is its record
    └── RequestPendingError      the result of an async request that has not finished
"""

from __future__ import annotations

import base64
import json
import ssl
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any, TypeVar

import httpx
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from cirrus.spec import SpecError
from cirrus.store.base import Status

ADMIN_TIMEOUT = httpx.Timeout(10.0, connect=2.0)
NOT_RUNNING = "the Cirrus daemon is not running; start it with `cirrus up`"
POLL_INTERVAL_S = 0.25

M = TypeVar("M", bound=BaseModel)


class CirrusError(Exception):
    """Any failure of the client; `status` is the HTTP status when the daemon or an API answered with an error."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class DaemonNotRunningError(CirrusError):
    """No daemon answers for this state directory (`cirrus up` starts one; `Client.deploy` too)."""


class NotFoundError(CirrusError):
    """HTTP 404: no API, job, key or async request of that name or id."""


class InvalidSpecError(CirrusError, SpecError):
    """`deploy` got a path it cannot deploy: no spec there, an invalid spec, or project files that
    cannot be packed. Also a `SpecError` (a ValueError), as `deploy` raised before."""


class InvalidSettingsError(CirrusError, ValueError):
    """A CIRRUS_* environment variable the client reads is wrong (also a ValueError, as before)."""


class CirrusTimeoutError(CirrusError, TimeoutError):
    """A wait (`wait_until_live`, `wait_job`, `wait`) or a request ran out of time."""


class StreamError(CirrusError):
    """A streamed answer that failed midway: the body was cut short, or an SSE `error` event came."""


class RequestFailedError(CirrusError):
    """An async request that ended `failed`; `request` is its record (with `error` and `attempts`)."""

    def __init__(self, message: str, request: AsyncRequest) -> None:
        super().__init__(message, status=request.result_status)
        self.request = request


class RequestPendingError(CirrusError):
    """`result` of an async request still queued or in progress (`wait` for it first)."""


class AsyncRequest(BaseModel):
    """An async API's request as `GET /<api>/<id>` describes it."""

    model_config = ConfigDict(extra="ignore", frozen=True)  # a newer daemon may say more

    id: str
    api: str
    status: Status
    attempts: int = 0
    result: Any = None
    result_encoding: str | None = None  # "base64" when the result is not JSON or text
    result_type: str | None = None
    result_status: int | None = None
    error: str | None = None
    timestamps: dict[str, str | None] = Field(default_factory=dict)

    @property
    def finished(self) -> bool:
        return self.status in (Status.COMPLETED, Status.FAILED)

    def value(self) -> Any:
        """The result of a completed request (bytes when it was neither JSON nor text)."""
        if self.status is Status.FAILED:
            raise RequestFailedError(f"request {self.id} of API {self.api!r} failed: {self.error}", self)
        if self.status is not Status.COMPLETED:
            raise RequestPendingError(f"request {self.id} of API {self.api!r} is still {self.status.value}")
        if self.result_encoding == "base64" and isinstance(self.result, str):
            return base64.b64decode(self.result)
        return self.result


class SseDecoder:
    """Server-sent events, fed one line at a time: `line` returns (event, data) at the blank line
    that ends an event, else None."""

    def __init__(self) -> None:
        self._event = "message"
        self._data: list[str] = []

    def line(self, text: str) -> tuple[str, str] | None:
        text = text.rstrip("\r\n")
        if not text:
            if not self._data:
                self._event = "message"
                return None
            event = (self._event, "\n".join(self._data))
            self._event, self._data = "message", []
            return event
        if text.startswith(":"):  # a comment
            return None
        field, _, value = text.partition(":")
        value = value.removeprefix(" ")
        if field == "event":
            self._event = value
        elif field == "data":
            self._data.append(value)
        return None


def tls_verify(ca_file: str) -> ssl.SSLContext | bool:
    """How the gateway's certificate is verified over HTTPS: with `CIRRUS_TLS_CA`, else the system's trust."""
    if not ca_file:
        return True
    try:
        return ssl.create_default_context(cafile=ca_file)
    except (OSError, ssl.SSLError) as exc:
        raise CirrusError(f"CIRRUS_TLS_CA={ca_file}: not a readable PEM CA file ({exc})") from None


def encode_payload(payload: Any) -> tuple[bytes, str]:
    """A predict payload as (body, content type)."""
    if isinstance(payload, bytes | bytearray | memoryview):
        return bytes(payload), "application/octet-stream"
    if isinstance(payload, str):
        return payload.encode(), "text/plain; charset=utf-8"
    if isinstance(payload, BaseModel):
        return payload.model_dump_json().encode(), "application/json"
    try:
        return json.dumps(payload).encode(), "application/json"
    except (TypeError, ValueError) as exc:
        raise CirrusError(f"the payload cannot be sent as JSON: {exc}") from None


def request_parts(payload: Any, headers: Mapping[str, str] | None) -> tuple[bytes, httpx.Headers]:
    """The body and headers of a request to an API; a Content-Type in `headers` wins."""
    content, content_type = encode_payload(payload)
    request_headers = httpx.Headers(headers or {})
    request_headers.setdefault("content-type", content_type)
    return content, request_headers


@contextmanager
def translate_errors(url: str, what: str = "the request") -> Iterator[None]:
    """Turn httpx transport errors into CirrusError with a message a user can act on."""
    try:
        yield
    except httpx.ConnectError:
        raise DaemonNotRunningError(NOT_RUNNING) from None
    except httpx.TimeoutException:
        raise CirrusTimeoutError(f"the Cirrus daemon at {url} did not answer {what} in time") from None
    except httpx.HTTPError as exc:
        raise CirrusError(f"cannot talk to the Cirrus daemon at {url}: {exc}") from None


@contextmanager
def gateway_errors(name: str, timeout: float, streaming: bool = False) -> Iterator[None]:
    """Transport errors of a request to an API (and, `streaming`, of reading its answer) as CirrusError."""
    try:
        yield
    except httpx.ConnectError as exc:
        if "CERTIFICATE_VERIFY_FAILED" in str(exc):
            raise CirrusError(
                f"the gateway's TLS certificate is not trusted ({exc}): set CIRRUS_TLS_CA to the file of "
                "the CA that signed it (for a self-signed certificate, the certificate itself)"
            ) from None
        raise DaemonNotRunningError(NOT_RUNNING) from None
    except httpx.TimeoutException:
        raise CirrusTimeoutError(f"API {name!r} did not answer within {timeout:g}s") from None
    except httpx.HTTPError as exc:
        if streaming:  # the head came: a body cut short (no last chunk) is how a failed stream ends
            raise StreamError(f"the stream from API {name!r} failed midway ({exc}); see `cirrus logs {name}`") from None
        raise CirrusError(f"request to API {name!r} failed: {exc}") from None


def raise_for_error(response: httpx.Response) -> None:
    """CirrusError (NotFoundError for a 404) with the answer's `error` when its status is 400 or above;
    the body must have been read."""
    if response.status_code < 400:
        return
    try:
        message = str(response.json()["error"])
    except (ValueError, KeyError, TypeError):
        message = response.text.strip() or response.reason_phrase
    kind = NotFoundError if response.status_code == 404 else CirrusError
    raise kind(f"{message} (HTTP {response.status_code})", status=response.status_code)


def submitted_id(name: str, response: httpx.Response) -> str:
    """The id in an async API's `202` answer to a submit."""
    raise_for_error(response)
    try:
        data = response.json()
        if response.status_code == 202 and isinstance(data["id"], str):
            return data["id"]
    except (ValueError, KeyError, TypeError):
        pass
    raise CirrusError(
        f"API {name!r} answered {response.status_code}, not 202 with a request id: is it a `kind: async` API?",
        status=response.status_code,
    )


def stream_headers(headers: Mapping[str, str] | None, events: bool) -> dict[str, str]:
    """Headers of a streamed request: `events` asks the gateway for server-sent events."""
    merged = dict(headers or {})
    if events:
        merged = {k: v for k, v in merged.items() if k.lower() != "accept"} | {"accept": "text/event-stream"}
    return merged


def event_data(name: str, event: tuple[str, str] | None) -> str | None:
    """The data of one server-sent event of a stream; StreamError for an `error` event."""
    if event is None:
        return None
    kind, data = event
    if kind == "error":
        raise StreamError(f"API {name!r} failed mid-stream: {data}")
    return data


def parse(model: type[M], data: Any) -> M:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise CirrusError(f"unexpected answer from the Cirrus daemon: {exc}") from None


def parse_list(model: type[M], data: Any, key: str) -> list[M]:
    if not isinstance(data, dict) or not isinstance(data.get(key), list):
        raise CirrusError(f"unexpected answer from the Cirrus daemon: no {key!r} list in {data!r:.200}")
    return [parse(model, item) for item in data[key]]


def task_body(config: Mapping[str, Any] | None, timeout_s: float | None, retries: int | None) -> dict[str, Any]:
    """The body of `POST /v1/apis/{name}/tasks`: what the caller gave (the rest defaults to the spec's)."""
    body: dict[str, Any] = {"config": dict(config or {})}
    if timeout_s is not None:
        body["timeout_s"] = timeout_s
    if retries is not None:
        body["retries"] = retries
    return body


def join(base: str, path: str) -> str:
    return base.rstrip("/") + path
