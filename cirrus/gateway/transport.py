"""The gateway's end of a replica connection: requests multiplexed over one stream socket.

A connection authenticates when it opens (`cirrus.wire`: the replica's nonce, the gateway's HMAC of
it under the replica's secret). A connection lost for any reason (the replica closed it, a frame
that does not decode or is over the limit) fails the requests in flight on it once and calls
`on_lost`, so that the replica leaves routing at once; closing it on purpose (`close`) does not.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable
from typing import Any

from cirrus.wire import (
    DEFAULT_MAX_BODY_BYTES,
    FRAME_HEADER_BYTES,
    WIRE_VERSION,
    Auth,
    Cancel,
    FrameBuffer,
    Hello,
    InferRequest,
    InferResponse,
    StreamChunk,
    StreamCredit,
    Welcome,
    auth_mac,
    encode_frame,
    frame_limit,
)


class ReplicaGone(Exception):
    """The replica's connection closed while a request was in flight."""


class RequestTooLarge(Exception):
    """A request (body and headers) does not fit in one frame to the replica."""


class ReplicaConnection(asyncio.Protocol):
    def __init__(self, max_frame_bytes: int = frame_limit(DEFAULT_MAX_BODY_BYTES)) -> None:
        self._buffer = FrameBuffer(max_frame_bytes)
        self._pending: dict[int, asyncio.Future[InferResponse]] = {}
        self._streams: dict[int, asyncio.Queue[StreamChunk]] = {}
        self._next_id = 0
        self._transport: asyncio.Transport | None = None
        loop = asyncio.get_running_loop()
        self._hello: asyncio.Future[Hello] = loop.create_future()
        self._welcome: asyncio.Future[None] = loop.create_future()
        self.closed = False
        self._closing = False  # closed on purpose: not a lost connection
        self._lost_reported = False
        self.on_lost: Callable[[str], None] | None = None  # the connection was lost (called once)

    @classmethod
    async def open(
        cls, address: str, secret: bytes, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, timeout_s: float = 5.0
    ) -> ReplicaConnection:
        """Connect to `tcp:HOST:PORT` or `unix:PATH`, prove we know the replica's `secret` and wait for
        its welcome. `max_body_bytes`: bodies the gateway accepts; frames may be that plus headroom."""
        loop = asyncio.get_running_loop()
        scheme, _, rest = address.partition(":")

        def factory() -> ReplicaConnection:
            return cls(frame_limit(max_body_bytes))

        protocol: ReplicaConnection
        async with asyncio.timeout(timeout_s):
            if scheme == "unix":
                _, protocol = await loop.create_unix_connection(factory, rest)
            elif scheme == "tcp":
                host, _, port = rest.rpartition(":")
                _, protocol = await loop.create_connection(factory, host, int(port))
            else:
                raise ValueError(f"unknown replica address {address!r}")
            try:
                hello = await protocol._hello
                if hello.version != WIRE_VERSION:
                    raise ConnectionError(f"replica speaks wire version {hello.version}, the gateway {WIRE_VERSION}")
                protocol._send(Auth(mac=auth_mac(secret, hello.nonce), max_body_bytes=max_body_bytes))
                await protocol._welcome
            except BaseException:
                protocol.close()
                raise
        return protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        try:
            frames = self._buffer.feed(data)
        except Exception as exc:
            self._lose(f"bad frame from the replica: {exc}")
            self.close()
            return
        for frame in frames:
            if isinstance(frame, StreamChunk):
                queue = self._streams.get(frame.id)
                if queue is not None:
                    queue.put_nowait(frame)  # at most STREAM_WINDOW queued: the replica waits for credit
            elif isinstance(frame, InferResponse):
                future = self._pending.pop(frame.id, None)
                if future is not None and not future.done():
                    if frame.stream:  # chunks may follow in this very read: have their queue ready
                        self._streams[frame.id] = asyncio.Queue()
                    future.set_result(frame)
            elif isinstance(frame, Hello) and not self._hello.done():
                self._hello.set_result(frame)
            elif isinstance(frame, Welcome) and not self._welcome.done():
                self._welcome.set_result(None)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._transport = None
        for opening, why in ((self._hello, "before its hello"), (self._welcome, "on the gateway's authentication")):
            if not opening.done():
                opening.set_exception(ConnectionError(f"the replica closed the connection {why}"))
                opening.exception()  # retrieved: `open` may not be waiting on it any more
        if self._closing:
            self._fail(ReplicaGone("the replica connection was closed"))
        else:
            self._lose(f"the replica closed its connection{f' ({exc})' if exc else ''}")

    def _lose(self, reason: str) -> None:
        """The connection is lost: fail what is in flight on it (once) and report it (once)."""
        self._fail(ReplicaGone(f"{reason} while handling the request"))
        if not self._lost_reported:
            self._lost_reported = True
            if self.on_lost is not None:
                self.on_lost(reason)

    def _fail(self, error: Exception) -> None:
        pending, self._pending = self._pending, {}
        for future in pending.values():
            if not future.done():
                future.set_exception(error)
        streams, self._streams = self._streams, {}
        for request_no, queue in streams.items():
            queue.put_nowait(StreamChunk(id=request_no, data=b"", last=True, error=str(error), status=502))

    def call(self, **fields: Any) -> tuple[int, asyncio.Future[InferResponse]]:
        """Send one request: (its number on this connection, a future of its response or ReplicaGone).
        A streamed response's chunks then come from `stream(number)`."""
        transport = self._transport
        if transport is None:
            raise ReplicaGone("the replica connection is closed")
        self._next_id += 1
        request_no = self._next_id
        frame = encode_frame(InferRequest(id=request_no, **fields))
        if len(frame) - FRAME_HEADER_BYTES > self._buffer.limit:  # the replica would drop the connection for it
            raise RequestTooLarge(f"the request with its headers exceeds the limit of {self._buffer.limit} bytes")
        future: asyncio.Future[InferResponse] = asyncio.get_running_loop().create_future()
        self._pending[request_no] = future
        transport.write(frame)
        return request_no, future

    def stream(self, request_no: int) -> asyncio.Queue[StreamChunk]:
        """The chunks of a streamed response (the last one has `last`; a broken stream an `error`)."""
        queue = self._streams.get(request_no)
        if queue is None:
            raise ReplicaGone("the stream is gone")
        return queue

    def end_stream(self, request_no: int) -> None:
        """The gateway delivered the whole stream."""
        self._streams.pop(request_no, None)

    def credit(self, request_no: int, chunks: int = 1) -> None:
        if self._transport is not None:
            self._transport.write(encode_frame(StreamCredit(id=request_no, chunks=chunks)))

    def forget(self, request_no: int) -> None:
        """Drop a request the gateway gave up on (timeout, client gone) and tell the replica to stop it."""
        self._pending.pop(request_no, None)
        self._streams.pop(request_no, None)
        if self._transport is not None:
            self._transport.write(encode_frame(Cancel(id=request_no)))

    def _send(self, frame: Auth) -> None:
        if self._transport is None:
            raise ConnectionError("the replica closed the connection")
        self._transport.write(encode_frame(frame))

    def close(self) -> None:
        """Close on purpose (a drained or deleted replica): `on_lost` is not called."""
        self._closing = True
        if self._transport is not None:
            self._transport.close()
