"""`cirrus predict`: send one request and print the answer as it arrives.

A streamed answer (chunked, or server-sent events when the request asks for `text/event-stream`)
is printed chunk by chunk, flushed. A stream that fails midway (a chunked body cut short, or an SSE
`event: error`) exits 1 after what came before it, with the error on stderr.

With `-o json` the whole answer is printed as one JSON document once it has ended:

    {"status": 200, "headers": {"content-type": "application/json", ...}, "body": ...}

`body` is the parsed JSON for a JSON answer, else the text; an answer that is not UTF-8 text comes
as `body_base64` instead. A stream that failed midway adds `"error"`. Non-2xx or an error exits 1.
"""

from __future__ import annotations

import base64
import json
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import httpx
import typer

if TYPE_CHECKING:
    from cirrus.client import Client


class StreamError(Exception):
    """The answer began but did not finish: the gateway cut the body short, or sent an SSE error."""


def predict(client: Client, api: str, payload: Any, headers: Mapping[str, str], timeout: float, json_out: bool) -> int:
    """Send `payload` to `api` and print the answer; the exit code (0: a 2xx that finished)."""
    from cirrus.client import encode_payload

    content, content_type = encode_payload(payload)
    request_headers = httpx.Headers(headers)
    request_headers.setdefault("content-type", content_type)
    url = f"{client.daemon_info().gateway_url.rstrip('/')}/{api}"
    http: httpx.Client = client._http
    with (
        _gateway_errors(api, timeout),
        http.stream(
            "POST", url, content=content, headers=request_headers, timeout=httpx.Timeout(timeout, connect=2.0)
        ) as response,
    ):
        if json_out:
            return _print_json_answer(response)
        if not response.is_success:
            response.read()
            _red(f"HTTP {response.status_code} {response.reason_phrase}")
            _print_body(response.content, response.headers.get("content-type", ""), to_stderr=True)
            return 1
        try:
            _print_answer(response)
        except StreamError as exc:
            _red(f"error: the answer stream failed: {exc}")
            return 1
    return 0


def _print_answer(response: httpx.Response) -> None:
    content_type = response.headers.get("content-type", "")
    if "text/event-stream" in content_type:
        _relay_events(response)
    elif "content-length" in response.headers:  # not a stream: print it whole (JSON pretty-printed)
        _print_body(_read(response), content_type)
    else:
        ended_with_newline = True
        sys.stdout.flush()
        for chunk in _chunks(response):
            sys.stdout.buffer.write(chunk)
            sys.stdout.buffer.flush()
            ended_with_newline = chunk.endswith(b"\n")
        if not ended_with_newline:
            sys.stdout.write("\n")


def _relay_events(response: httpx.Response) -> None:
    """Server-sent events printed line by line as they come; an `error` event raises StreamError."""
    error: list[str] | None = None
    for line in _lines(response):
        if line == "event: error":
            error = []
        elif error is not None and line.startswith("data:"):
            error.append(line[5:].strip())
        elif error is not None and not line:
            raise StreamError("\n".join(error) or "the API failed")
        elif error is None:
            sys.stdout.write(line + "\n")
            sys.stdout.flush()
    if error is not None:
        raise StreamError("\n".join(error) or "the API failed")


def _chunks(response: httpx.Response) -> Iterator[bytes]:
    try:
        yield from response.iter_bytes()
    except httpx.RemoteProtocolError as exc:
        raise StreamError(f"the body was cut short ({exc})") from None


def _lines(response: httpx.Response) -> Iterator[str]:
    try:
        yield from response.iter_lines()
    except httpx.RemoteProtocolError as exc:
        raise StreamError(f"the body was cut short ({exc})") from None


def _read(response: httpx.Response) -> bytes:
    return b"".join(_chunks(response))


def _print_json_answer(response: httpx.Response) -> int:
    error = None
    try:
        body = _read(response)
    except StreamError as exc:
        body, error = b"", str(exc)
    content_type = response.headers.get("content-type", "")
    answer: dict[str, Any] = {"status": response.status_code, "headers": dict(response.headers)}
    try:
        text = body.decode()
    except UnicodeDecodeError:
        answer["body_base64"] = base64.b64encode(body).decode()
    else:
        answer["body"] = text
        if "json" in content_type:
            try:
                answer["body"] = json.loads(text)
            except ValueError:
                pass
    if "text/event-stream" in content_type and "\nevent: error" in "\n" + answer.get("body", ""):
        error = "the API sent an error event"
    if error is not None:
        answer["error"] = error
    typer.echo(json.dumps(answer, indent=2, ensure_ascii=False))
    return 0 if response.is_success and error is None else 1


@contextmanager
def _gateway_errors(api: str, timeout: float) -> Iterator[None]:
    """httpx's failures as the messages `Client.predict` gives."""
    from cirrus.client import NOT_RUNNING, CirrusError

    try:
        yield
    except httpx.ConnectError as exc:
        if "CERTIFICATE_VERIFY_FAILED" in str(exc):
            raise CirrusError(
                f"the gateway's TLS certificate is not trusted ({exc}): set CIRRUS_TLS_CA to the file of "
                "the CA that signed it (for a self-signed certificate, the certificate itself)"
            ) from None
        raise CirrusError(NOT_RUNNING) from None
    except httpx.TimeoutException:
        raise CirrusError(f"API {api!r} did not answer within {timeout:g}s") from None
    except httpx.HTTPError as exc:
        raise CirrusError(f"request to API {api!r} failed: {exc}") from None


def _red(text: str) -> None:
    from cirrus.cli_common import _stderr

    _stderr().print(text, style="red", markup=False, highlight=False, soft_wrap=True)


def _print_body(body: bytes, content_type: str, to_stderr: bool = False) -> None:
    if "json" in content_type:
        try:
            typer.echo(json.dumps(json.loads(body), indent=2, ensure_ascii=False), err=to_stderr)
            return
        except ValueError:
            pass
    try:
        text = body.decode()
    except UnicodeDecodeError:
        stream = sys.stderr if to_stderr else sys.stdout
        stream.flush()
        stream.buffer.write(body)
        stream.buffer.flush()
        return
    typer.echo(text, nl=bool(text) and not text.endswith("\n"), err=to_stderr)
