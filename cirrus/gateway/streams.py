"""Relaying a streamed response: chunk by chunk (chunked encoding), or as server-sent events when
the client asks for `text/event-stream`, granting the replica one credit per chunk delivered.

A client that goes away, or reads nothing for the API's timeout_s, cancels the stream in the
replica. The `Server-Timing` header goes with the first bytes, so it names only the stages known
then (queue, pre_predict, slot_wait); the stream's total is in the metrics and the access log.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from cirrus.gateway.routing import ApiRoute, ReplicaSlot
from cirrus.wire import InferResponse, StreamChunk

log = logging.getLogger("cirrus.gateway")

Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]


async def relay_stream(
    route: ApiRoute,
    slot: ReplicaSlot,
    request_no: int,
    head: InferResponse,
    receive: Receive,
    send: Send,
    sse: bool,
    request_id: str,
    started: float,
    timing: bytes,
    queue_s: float,
) -> None:
    """Relay a stream until it ends, the client goes or it stalls; then count it in the metrics."""
    conn = slot.conn
    headers = _stream_headers(head, request_id, sse, timing)
    await send({"type": "http.response.start", "status": head.status, "headers": headers})
    queue = conn.stream(request_no)
    disconnect = asyncio.ensure_future(_wait_disconnect(receive))
    outcome, ended = 499, False  # the status it counts as (499: the client went away); the replica ended it
    try:
        while True:
            next_chunk = asyncio.ensure_future(queue.get())
            done, _ = await asyncio.wait({next_chunk, disconnect}, return_when=asyncio.FIRST_COMPLETED)
            if next_chunk not in done:
                next_chunk.cancel()
                log.info("request %s: the client went away mid-stream", request_id)
                return
            chunk = next_chunk.result()
            body = sse_event(chunk.data) if sse else chunk.data
            if chunk.data and not await deliver(send, body, route.timeout_s, request_id):
                return
            if chunk.last:
                ended = True
                outcome = await _end_of_stream(send, chunk, head, sse, route, slot, request_id)
                return
            conn.credit(request_no)
    finally:
        disconnect.cancel()
        if ended:
            conn.end_stream(request_no)
        else:
            conn.forget(request_no)  # tells the replica to stop generating
        if outcome < 400:
            slot.completed += 1
        route.metrics.observe(outcome, time.perf_counter() - started, time.time(), slot.revision, queue_s, head)


async def _end_of_stream(
    send: Send,
    last: StreamChunk,
    head: InferResponse,
    sse: bool,
    route: ApiRoute,
    slot: ReplicaSlot,
    request_id: str,
) -> int:
    """Finish a stream the replica ended; the status it counts as. One that failed midway must look
    failed: with SSE an `error` event precedes the end; without, the body stays unfinished (no last
    chunk: the server closes the connection, so the client sees a cut-short body)."""
    if last.error is None:
        await deliver(send, b"", route.timeout_s, request_id, more=False)
        return head.status
    log.warning("request %s: stream from %s ended early: %s", request_id, slot.replica_id, last.error)
    if sse and await deliver(send, b"event: error\n" + sse_event(last.error.encode()), route.timeout_s, request_id):
        await deliver(send, b"", route.timeout_s, request_id, more=False)
    return last.status


def _stream_headers(head: InferResponse, request_id: str, sse: bool, timing: bytes) -> list[tuple[bytes, bytes]]:
    """The headers of a streamed reply (no content-length); SSE replaces the replica's content type."""
    content_type = "text/event-stream; charset=utf-8" if sse else head.content_type
    headers = [
        (b"content-type", content_type.encode("latin-1")),
        (b"x-request-id", request_id.encode()),
        (b"server-timing", timing),
    ]
    if sse:
        headers.append((b"cache-control", b"no-cache"))
    headers.extend((k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in head.headers)
    return headers


async def deliver(send: Send, body: bytes, timeout_s: float, request_id: str, more: bool = True) -> bool:
    """Send a piece of a streamed body; False when the client read nothing for `timeout_s` (it stalls)."""
    try:
        async with asyncio.timeout(timeout_s):
            await send({"type": "http.response.body", "body": body, "more_body": more})
    except TimeoutError:
        log.warning("request %s: the client read nothing for %gs; stream stopped", request_id, timeout_s)
        return False
    return True


async def _wait_disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


def sse_event(data: bytes) -> bytes:
    """One server-sent event carrying `data` (a trailing newline is dropped; lines become data: lines)."""
    lines = data.decode("utf-8", "replace").removesuffix("\n").split("\n")
    return "".join(f"data: {line}\n" for line in lines).encode() + b"\n"
