"""A small HTTP/1.1 client for the proxy (cirrus/gateway/proxy.py): keep-alive connections to one
replica's web app, responses parsed with httptools, bodies streamed both ways.

httpx served a trivial app through the proxy at about a sixth of the rate of the realtime path, and
fell further with concurrency (its pool); this client does what the proxy needs and no more: one
request at a time per connection, no redirects, no decoding, no proxies from the environment.

A kept-alive connection the app closed while idle is dropped from the pool when its close arrives;
one that fails before any byte of an answer came is retried once on a new connection when the
request's body is replayable (bytes), as the app cannot have acted on a request it never answered
on a connection it was closing.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from typing import cast

import httptools

CONNECT_TIMEOUT_S = 5.0
IDLE_S = 4.0  # a kept-alive connection idle this long is not reused (servers close theirs after ~5 s)
HIGH_WATER = 1 << 20  # response bytes buffered before reading from the app pauses
LOW_WATER = 1 << 18
MAX_HEADERS = 256  # in an answer's head, and their bytes: past these the answer is refused (502)
MAX_HEAD_BYTES = 256 * 1024

Headers = list[tuple[bytes, bytes]]


class UpstreamError(Exception):
    """The app could not be reached, reset the connection or answered something that is not HTTP."""


class ConnectFailed(UpstreamError):
    """Nothing listens at the replica's address (or it did not accept in time)."""


class _Conn(asyncio.Protocol):
    """One connection to the app; one request on it at a time."""

    def __init__(self, pool: HttpUpstream) -> None:
        self.pool = pool
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.head: asyncio.Future[tuple[int, Headers]] | None = None
        self.headers: Headers = []
        self.head_bytes = 0
        self.chunks: deque[bytes] = deque()
        self.buffered = 0
        self.paused = False
        self.data = asyncio.Event()
        self.writable = asyncio.Event()
        self.writable.set()
        self.headers_done = self.complete = self.keep_alive = self.closed = False
        self.received_any = False
        self.head_only = False  # a HEAD request: its answer has no body, whatever its Content-Length
        self.error: UpstreamError | None = None
        self.idle_since: float | None = None

    def start(self, head_only: bool) -> asyncio.Future[tuple[int, Headers]]:
        self.parser = httptools.HttpResponseParser(self)
        self.head = asyncio.get_running_loop().create_future()
        self.headers, self.chunks, self.buffered, self.head_bytes = [], deque(), 0, 0
        self.headers_done = self.complete = self.keep_alive = self.received_any = False
        self.head_only, self.idle_since = head_only, None
        return self.head

    # --- asyncio.Protocol ----------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # (uvloop's is not a subclass)

    def data_received(self, data: bytes) -> None:
        self.received_any = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(UpstreamError(f"the app answered something that is not HTTP: {exc}"))
            self.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.writable.set()
        self.pool.forget(self)
        if self.headers_done and not self.complete and not _framed(self.headers):
            self.complete = True  # a body that runs until the connection closes
            self.data.set()
            return
        if not self.complete:
            self._fail(UpstreamError("the app closed the connection" + (f" ({exc})" if exc else "")))

    def pause_writing(self) -> None:
        self.writable.clear()

    def resume_writing(self) -> None:
        self.writable.set()

    # --- httptools callbacks -------------------------------------------------------------
    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name.lower(), value))
        self.head_bytes += len(name) + len(value)
        if self.head_bytes > MAX_HEAD_BYTES or len(self.headers) > MAX_HEADERS:
            self._fail(
                UpstreamError(f"the app's answer has over {MAX_HEADERS} headers or {MAX_HEAD_BYTES} bytes of them")
            )
            self.close()

    def on_headers_complete(self) -> None:
        status = self.parser.get_status_code()
        if status < 200:  # an interim answer (103 Early Hints): the real one follows
            self.headers = []
            return
        self.headers_done = True
        if self.head is not None and not self.head.done():
            self.head.set_result((status, self.headers))
        if self.head_only:
            self._completed(keep_alive=False)

    def on_body(self, body: bytes) -> None:
        if self.head_only:
            return
        self.chunks.append(bytes(body))
        self.buffered += len(body)
        self.data.set()
        if self.buffered > HIGH_WATER and not self.paused and self.transport is not None:
            self.paused = True
            self.transport.pause_reading()

    def on_message_complete(self) -> None:
        if self.headers_done and not self.complete:
            self._completed(self.parser.should_keep_alive())

    # --- the request ---------------------------------------------------------------------
    def _completed(self, keep_alive: bool) -> None:
        self.complete, self.keep_alive = True, keep_alive
        self.data.set()

    def _fail(self, error: UpstreamError) -> None:
        if self.error is None:
            self.error = error
        if self.head is not None and not self.head.done():
            self.head.set_exception(error)
        self.data.set()

    def write(self, data: bytes) -> None:
        if self.transport is None or self.closed:
            raise self.error or UpstreamError("the app closed the connection")
        self.transport.write(data)

    async def body(self) -> AsyncIterator[bytes]:
        """The answer's body as it arrives."""
        while True:
            if self.chunks:
                chunk = self.chunks.popleft()
                self.buffered -= len(chunk)
                if self.paused and self.buffered < LOW_WATER and self.transport is not None:
                    self.paused = False
                    self.transport.resume_reading()
                yield chunk
            elif self.complete:
                return
            elif self.error is not None:
                raise self.error
            else:
                self.data.clear()
                await self.data.wait()

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()
        self.closed = True


def _framed(headers: Headers) -> bool:
    """Whether the answer says where its body ends (else it runs until the connection closes)."""
    return any(k in (b"content-length", b"transfer-encoding") for k, _ in headers)


class Response:
    """An answer's status and headers; its body (`body()`) is read after; `release()` always."""

    def __init__(self, upstream: HttpUpstream, conn: _Conn, status: int, headers: Headers) -> None:
        self.upstream, self.conn, self.status, self.headers = upstream, conn, status, headers

    def body(self) -> AsyncIterator[bytes]:
        return self.conn.body()

    def release(self) -> None:
        """Back to the pool when the answer was read to its end on a kept-alive connection, else closed."""
        self.upstream.put_back(self.conn)


class HttpUpstream:
    """One replica of a proxied API: kept-alive HTTP/1.1 connections to its app (`ReplicaSlot.conn`)."""

    def __init__(self, address: str, secret: bytes, max_connections: int) -> None:
        host, _, port = address.removeprefix("http://").rstrip("/").rpartition(":")
        self.host, self.port = host.strip("[]"), int(port)
        self.authority = f"{host}:{port}".encode()
        self.secret = secret.hex().encode()
        self.max_idle = max(1, max_connections)
        self.idle: list[_Conn] = []
        self.closed = False
        # Called when nothing listens at the address any more (the runtime also reports the replica's exit).
        self.on_lost: Callable[[str], None] | None = None

    async def request(
        self, method: str, target: bytes, headers: Headers, body: bytes | AsyncIterator[bytes], declared: bytes | None
    ) -> Response:
        """Send a request; its answer's head (UpstreamError when none came)."""
        conn = self._reuse()
        if conn is not None:
            try:
                return await self._exchange(conn, method, target, headers, body, declared)
            except UpstreamError:
                if conn.received_any or not isinstance(body, bytes):
                    raise
                conn.close()  # closed by the app while it was idle: once more on a new connection
        conn = await self._connect()
        return await self._exchange(conn, method, target, headers, body, declared)

    async def _exchange(
        self,
        conn: _Conn,
        method: str,
        target: bytes,
        headers: Headers,
        body: bytes | AsyncIterator[bytes],
        declared: bytes | None,
    ) -> Response:
        head = conn.start(head_only=method == "HEAD")
        try:
            lines = [method.encode() + b" " + target + b" HTTP/1.1\r\n"]
            if not any(k == b"host" for k, _ in headers):
                lines.append(b"host: " + self.authority + b"\r\n")
            lines.extend(k + b": " + v + b"\r\n" for k, v in headers)
            chunked = False
            if isinstance(body, bytes):
                if body or declared is not None:
                    lines.append(b"content-length: " + str(len(body)).encode() + b"\r\n")
            elif declared is not None:
                lines.append(b"content-length: " + declared + b"\r\n")
            else:
                chunked = True
                lines.append(b"transfer-encoding: chunked\r\n")
            lines.append(b"\r\n")
            conn.write(b"".join(lines) + (body if isinstance(body, bytes) else b""))
            if not isinstance(body, bytes):
                await _write_body(conn, body, chunked)
            status, answer = await head
        except BaseException:
            conn.close()
            raise
        return Response(self, conn, status, answer)

    def _reuse(self) -> _Conn | None:
        now = time.monotonic()
        while self.idle:
            conn = self.idle.pop()
            if not conn.closed and conn.idle_since is not None and now - conn.idle_since < IDLE_S:
                return conn
            conn.close()
        return None

    async def _connect(self) -> _Conn:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(CONNECT_TIMEOUT_S):
                _, conn = await loop.create_connection(lambda: _Conn(self), self.host, self.port)
        except (OSError, TimeoutError) as exc:
            raise ConnectFailed(f"cannot connect to {self.host}:{self.port}: {exc or 'timed out'}") from None
        return conn

    def put_back(self, conn: _Conn) -> None:
        if self.closed or conn.closed or not (conn.complete and conn.keep_alive) or len(self.idle) >= self.max_idle:
            conn.close()
            return
        conn.idle_since = time.monotonic()
        self.idle.append(conn)

    def forget(self, conn: _Conn) -> None:
        if conn in self.idle:
            self.idle.remove(conn)

    def close(self) -> None:
        """No more requests; idle connections close now, busy ones when their answer is done."""
        self.closed = True
        for conn in self.idle:
            conn.close()
        self.idle.clear()


async def _write_body(conn: _Conn, body: AsyncIterator[bytes], chunked: bool) -> None:
    async for chunk in body:
        if conn.error is not None:
            raise conn.error
        if chunk:
            conn.write(b"%x\r\n%s\r\n" % (len(chunk), chunk) if chunked else chunk)
        await conn.writable.wait()
    if chunked:
        conn.write(b"0\r\n\r\n")
