"""Streaming responses: a `predict` that is a generator (sync or async) sends its items as they
are produced.

The slot is held for the whole generation (the model is busy producing). A sync generator's
`next()` runs on the slot's thread; an async one on the loop. The replica sends at most
`STREAM_WINDOW` chunks ahead of what the gateway has delivered to its client (credit-based
backpressure), and a `Cancel` from the gateway (the client went away) closes the generator and
frees the slot at once. A gateway that grants no credit for the request's `timeout_s` (its client
stopped reading) gets the stream ended the same way, so a stalled client holds the slot no longer.
A generator that raises ends the stream with an error (worded as a 500 is: the exception's message
only with `debug_errors`).
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from cirrus.predictor import HTTPError, PredictorFailed, encode_json
from cirrus.wire import FRAME_HEADER_BYTES, STREAM_WINDOW, InferRequest, InferResponse, StreamChunk, encode_frame

log = logging.getLogger("cirrus.replica")
_DONE = object()


def is_stream_function(fn: Any) -> bool:
    return inspect.isgeneratorfunction(fn) or inspect.isasyncgenfunction(fn)


def is_stream_object(value: Any) -> bool:
    return inspect.isgenerator(value) or inspect.isasyncgen(value)


@dataclass
class StreamSource:
    """A stream to run once the head is due: a generator function and its arguments, or an
    already-made generator (a `predict` that returned one)."""

    fn: Any = None
    kwargs: dict[str, Any] = field(default_factory=dict)
    generator: Any = None
    pre_s: float = 0.0  # the pre_predict hook's time, for the head (0: none ran)


def encode_chunk(item: Any) -> tuple[bytes, str]:
    """An item -> (bytes, the media type a stream of such items has)."""
    if isinstance(item, bytes | bytearray | memoryview):
        return bytes(item), "application/octet-stream"
    if isinstance(item, str):
        return item.encode(), "text/plain; charset=utf-8"
    return encode_json(item) + b"\n", "application/x-ndjson"


class StreamState:
    """Per-stream flow control: credits granted by the gateway, and cancellation."""

    def __init__(self) -> None:
        self.credit = STREAM_WINDOW
        self.wakeup = asyncio.Event()
        self.cancelled = False

    def grant(self, chunks: int) -> None:
        self.credit += chunks
        self.wakeup.set()

    def cancel(self) -> None:
        self.cancelled = True
        self.wakeup.set()

    async def wait_for_credit(self) -> None:
        while self.credit <= 0 and not self.cancelled:
            self.wakeup.clear()
            await self.wakeup.wait()


class _Iterator:
    """Steps a sync generator on the slot's thread, or an async one on the loop."""

    def __init__(self, source: StreamSource, run_in_slot: Callable[[Any], Any]) -> None:
        self.run_in_slot = run_in_slot
        self.source = source
        self.gen: Any = source.generator
        self.in_thread: Any = None  # the thread call in progress: it cannot be interrupted

    async def _on_thread(self, fn: Callable[[], Any]) -> Any:
        self.in_thread = self.run_in_slot(fn)
        return await asyncio.shield(self.in_thread)

    async def start(self) -> None:
        if self.gen is None:
            fn = self.source.fn
            if inspect.isasyncgenfunction(fn):
                self.gen = fn(**self.source.kwargs)
            else:
                self.gen = await self._on_thread(lambda: fn(**self.source.kwargs))

    async def next(self) -> Any:
        gen = self.gen
        if inspect.isasyncgen(gen):
            try:
                return await gen.__anext__()
            except StopAsyncIteration:
                return _DONE
        return await self._on_thread(lambda: next(gen, _DONE))

    async def close(self) -> None:
        if self.in_thread is not None and not self.in_thread.done():
            await asyncio.wait([self.in_thread])  # a cancelled stream: let the step in progress end
        gen = self.gen
        if gen is None:
            return
        try:
            if inspect.isasyncgen(gen):
                await gen.aclose()
            else:
                await self._on_thread(gen.close)
        except Exception:
            log.exception("closing a stream's generator raised")


@dataclass(frozen=True)
class StreamIO:
    """How a stream reaches the gateway: the connection's write, and how errors are worded."""

    write: Callable[[bytes], None]
    error_response: Callable[[InferRequest, int, str], InferResponse]
    failure: Callable[[InferRequest, str], str]  # how a predictor's failure is told (its detail: in debug only)
    max_frame_bytes: int  # the gateway's frame limit: an item whose frame is over it ends the stream as failed


async def pump(
    req: InferRequest,
    source: StreamSource,
    state: StreamState,
    io: StreamIO,
    hold_slot: Any,
    run_in_slot: Callable[[Any], Any],
) -> bool:
    """Run one stream to its end; True when it completed (post_predict may run). Its head reports the
    pre_predict time and the wait for the slot (predict's time is not known until the stream ends)."""
    iterator = _Iterator(source, run_in_slot)
    ready = time.perf_counter()
    async with hold_slot():
        slot_wait_s = time.perf_counter() - ready
        try:
            try:
                async with asyncio.timeout(req.timeout_s):  # the head: time to the first item
                    await iterator.start()
                    first = await iterator.next()
            except TimeoutError:
                io.write(encode_frame(io.error_response(req, 504, f"no stream output within {req.timeout_s:.3g}s")))
                return False
            except Exception as exc:
                if isinstance(exc, HTTPError) and not isinstance(exc, PredictorFailed):
                    # refused before its first item: an answer like any predict's (status, message)
                    io.write(encode_frame(io.error_response(req, exc.status, exc.message)))
                    return False
                log.exception("request %s: the stream raised before its first item", req.request_id)
                message = io.failure(req, f"the predictor raised {type(exc).__name__}: {exc}")
                io.write(encode_frame(io.error_response(req, 500, message)))
                return False
            if first is _DONE:
                io.write(encode_frame(InferResponse(id=req.id, status=200, body=b"", content_type="text/plain")))
                return True
            data, media_type = encode_chunk(first)
            head = InferResponse(
                id=req.id,
                status=200,
                body=b"",
                content_type=media_type,
                stream=True,
                pre_s=source.pre_s,
                slot_wait_s=slot_wait_s,
            )
            io.write(encode_frame(head))
            return await _rest(req, iterator, state, io, data)
        finally:
            await iterator.close()


async def _rest(req: InferRequest, iterator: _Iterator, state: StreamState, io: StreamIO, data: bytes) -> bool:
    """The stream after its head: `data` (the first item's) and every item after it, as the gateway
    grants credit. A gateway that grants none for the request's timeout_s (its client reads nothing)
    stops the stream. True when it completed."""
    while True:
        frame = encode_frame(StreamChunk(id=req.id, data=data))
        if len(frame) - FRAME_HEADER_BYTES > io.max_frame_bytes:
            detail = f"a stream item of {len(data)} bytes exceeds the limit of {io.max_frame_bytes} bytes"
            log.error("request %s: %s; the stream ends here", req.request_id, detail)
            _end(req, io, error=io.failure(req, detail), status=502)
            return False
        io.write(frame)
        state.credit -= 1
        if state.credit <= 0 and not state.cancelled:
            try:
                async with asyncio.timeout(req.timeout_s):  # a client that stops reading holds the slot no longer
                    await state.wait_for_credit()
            except TimeoutError:
                why = f"the client read nothing for {req.timeout_s:.3g}s"
                log.warning("request %s: %s; stream stopped", req.request_id, why)
                _end(req, io, error=why, status=499)
                return False
        if state.cancelled:
            log.info("request %s: the client went away; stream stopped", req.request_id)
            return False
        try:
            async with asyncio.timeout(req.timeout_s):  # between items
                item = await iterator.next()
        except TimeoutError:
            _end(req, io, error="timed out between items", status=504)
            return False
        except Exception as exc:
            log.exception("request %s: the stream raised", req.request_id)
            detail = f"the predictor raised {type(exc).__name__}: {exc}"
            _end(req, io, error=io.failure(req, detail), status=500)
            return False
        if item is _DONE:
            _end(req, io)
            return True
        data = encode_chunk(item)[0]


def _end(req: InferRequest, io: StreamIO, error: str | None = None, status: int = 500) -> None:
    io.write(encode_frame(StreamChunk(id=req.id, data=b"", last=True, error=error, status=status)))
