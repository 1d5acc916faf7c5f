"""The gateway's end of a replica connection: requests multiplexed over one stream socket."""

from __future__ import annotations

import asyncio
import socket
from typing import Any

from cirrus.wire import (
    WIRE_VERSION,
    Cancel,
    FrameBuffer,
    Hello,
    InferRequest,
    InferResponse,
    StreamChunk,
    StreamCredit,
    encode_frame,
)


class ReplicaGone(Exception):
    """The replica's connection closed while a request was in flight."""


class ReplicaConnection(asyncio.Protocol):
    def __init__(self) -> None:
        self._buffer = FrameBuffer()
        self._pending: dict[int, asyncio.Future[InferResponse]] = {}
        self._streams: dict[int, asyncio.Queue[StreamChunk]] = {}
        self._next_id = 0
        self._transport: asyncio.Transport | None = None
        self._hello: asyncio.Future[Hello] = asyncio.get_running_loop().create_future()
        self.closed = False

    @classmethod
    async def open(cls, address: str, timeout_s: float = 5.0) -> ReplicaConnection:
        """Connect to `tcp:HOST:PORT` or `unix:PATH` and wait for the replica's Hello."""
        loop = asyncio.get_running_loop()
        scheme, _, rest = address.partition(":")
        async with asyncio.timeout(timeout_s):
            if scheme == "unix":
                _, protocol = await loop.create_unix_connection(cls, rest)
            elif scheme == "tcp":
                host, _, port = rest.rpartition(":")
                _, protocol = await loop.create_connection(cls, host, int(port))
            else:
                raise ValueError(f"unknown replica address {address!r}")
            hello = await protocol._hello
        if hello.version != WIRE_VERSION:
            protocol.close()
            raise ConnectionError(f"replica speaks wire version {hello.version}, the gateway {WIRE_VERSION}")
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
            self._fail(ReplicaGone(f"bad frame from replica: {exc}"))
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

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._transport = None
        self._fail(ReplicaGone("the replica closed its connection while handling the request"))
        if not self._hello.done():
            self._hello.set_exception(ConnectionError("the replica closed the connection before its hello"))

    def _fail(self, error: Exception) -> None:
        pending, self._pending = self._pending, {}
        for future in pending.values():
            if not future.done():
                future.set_exception(error)
        streams, self._streams = self._streams, {}
        for request_no, queue in streams.items():
            queue.put_nowait(StreamChunk(id=request_no, data=b"", last=True, error=str(error)))

    def call(self, **fields: Any) -> tuple[int, asyncio.Future[InferResponse]]:
        """Send one request: (its number on this connection, a future of its response or ReplicaGone).
        A streamed response's chunks then come from `stream(number)`."""
        if self._transport is None:
            raise ReplicaGone("the replica connection is closed")
        self._next_id += 1
        request_no = self._next_id
        future: asyncio.Future[InferResponse] = asyncio.get_running_loop().create_future()
        self._pending[request_no] = future
        self._transport.write(encode_frame(InferRequest(id=request_no, **fields)))
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

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()
