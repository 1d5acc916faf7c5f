"""The replica's request path: decode -> pre_predict -> inference slot -> predict -> reply -> post_predict.

An *inference slot* is held only while `predict` runs. A sync `predict` runs on a slot thread; an
async one on the event loop. Hooks and request I/O never hold a slot, and `post_predict` runs
after the reply frame has been written.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from cirrus.predictor import (
    Call,
    HTTPError,
    LoadedPredictor,
    PayloadError,
    decode_payload,
    encode_json,
    encode_result,
)
from cirrus.wire import WIRE_VERSION, FrameBuffer, Hello, InferRequest, InferResponse, encode_frame

log = logging.getLogger("cirrus.replica")


def _error(req: InferRequest, status: int, message: str, **extra: Any) -> InferResponse:
    body = encode_json({"error": message, "request_id": req.request_id, **extra})
    return InferResponse(id=req.id, status=status, body=body)


class Slots:
    """`n` inference slots. A slot taken by a sync call is given back only when its thread returns,
    even if the request already timed out, so a stuck predict keeps its slot busy; `overdue_since`
    tells the replica's watchdog when every slot is held by a call that outlived its request."""

    def __init__(self, n: int) -> None:
        self.size = n
        self._free = asyncio.Semaphore(n)
        self._pool = ThreadPoolExecutor(max_workers=n, thread_name_prefix="cirrus-slot")
        self._overdue: dict[asyncio.Future[Any], float] = {}

    async def run_sync(self, fn: Any, kwargs: dict[str, Any]) -> Any:
        await self._free.acquire()
        loop = asyncio.get_running_loop()
        try:
            future = loop.run_in_executor(self._pool, lambda: fn(**kwargs))
        except BaseException:
            self._free.release()
            raise
        future.add_done_callback(self._done)
        try:
            return await asyncio.shield(future)
        except asyncio.CancelledError:
            if not future.done():
                self._overdue[future] = time.monotonic()
            raise

    def _done(self, future: asyncio.Future[Any]) -> None:
        self._overdue.pop(future, None)
        self._free.release()

    async def run_async(self, fn: Any, kwargs: dict[str, Any]) -> Any:
        async with self._free:
            return await fn(**kwargs)

    def all_stuck_for(self, now: float) -> float:
        """Seconds during which every slot has been held by an abandoned (timed-out) sync call."""
        if len(self._overdue) < self.size:
            return 0.0
        return now - max(self._overdue.values())

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


class RequestHandler:
    """Turns one `InferRequest` into one `InferResponse` using the loaded predictor."""

    def __init__(self, predictor: LoadedPredictor, inference_slots: int) -> None:
        self.predictor = predictor
        self.slots = Slots(inference_slots)
        self.background: set[asyncio.Task[None]] = set()

    async def handle(self, req: InferRequest) -> tuple[InferResponse, Call | None, Any]:
        """The reply, and (call, result) for `post_predict` when the request succeeded."""
        try:
            call = Call(
                payload=decode_payload(req.body, req.content_type),
                query_params=_query_params(req.query_string),
                headers=dict(req.headers),
                request_id=req.request_id,
            )
        except PayloadError as exc:
            return _error(req, 400, str(exc)), None, None
        try:
            async with asyncio.timeout(req.timeout_s):
                result = await self._run(call)
            status, content_type, body, headers = encode_result(result)
        except HTTPError as exc:
            return _error(req, exc.status, exc.message), None, None
        except _ValidationFailed as exc:
            return _error(req, 422, "payload failed validation", detail=exc.errors), None, None
        except TimeoutError:
            log.warning("request %s timed out after %.3gs", req.request_id, req.timeout_s)
            return _error(req, 504, f"the predictor did not answer within {req.timeout_s:.3g}s"), None, None
        except Exception as exc:
            log.exception("request %s: the predictor raised", req.request_id)
            return _error(req, 500, f"the predictor raised {type(exc).__name__}: {exc}"), None, None
        return (
            InferResponse(id=req.id, status=status, body=body, content_type=content_type, headers=headers),
            call,
            result,
        )

    async def _run(self, call: Call) -> Any:
        predictor = self.predictor
        pre = predictor.pre_predict
        if pre is not None:
            replaced = await pre.fn(**pre.kwargs(call))
            if replaced is not None:
                call.payload = replaced
        predict = predictor.predict
        if predict.payload_model is not None:
            call.payload = _validate(predict.payload_model, call.payload)
        kwargs = predict.kwargs(call)
        if predict.is_async:
            result = await self.slots.run_async(predict.fn, kwargs)
        else:
            result = await self.slots.run_sync(predict.fn, kwargs)
        if predict.return_model is not None and not isinstance(result, predict.return_model):
            result = predict.return_model.model_validate(result)
        return result

    def after_reply(self, call: Call, result: Any) -> None:
        post = self.predictor.post_predict
        if post is None:
            return
        task = asyncio.get_running_loop().create_task(self._post(call, result))
        self.background.add(task)
        task.add_done_callback(self.background.discard)

    async def _post(self, call: Call, result: Any) -> None:
        post = self.predictor.post_predict
        assert post is not None
        try:
            await post.fn(**post.kwargs(call, response=result))
        except Exception:
            log.exception("request %s: post_predict raised", call.request_id)


class _ValidationFailed(Exception):
    def __init__(self, errors: list[dict[str, Any]]) -> None:
        super().__init__("validation failed")
        self.errors = errors


def _validate(model: Any, payload: Any) -> Any:
    from pydantic import ValidationError

    try:
        return model.model_validate(payload)
    except ValidationError as exc:
        errors = exc.errors(include_url=False, include_context=False, include_input=False)
        raise _ValidationFailed([{"loc": list(e["loc"]), "msg": e["msg"], "type": e["type"]} for e in errors]) from None


def _query_params(raw: bytes) -> dict[str, str]:
    if not raw:
        return {}
    from urllib.parse import parse_qsl

    return dict(parse_qsl(raw.decode("latin-1"), keep_blank_values=True))


class ReplicaProtocol(asyncio.Protocol):
    """One gateway connection: frames in, a task per request, frames out."""

    def __init__(self, handler: RequestHandler, replica_id: str, connections: set[ReplicaProtocol]) -> None:
        self.handler = handler
        self.replica_id = replica_id
        self.connections = connections
        self.buffer = FrameBuffer()
        self.transport: asyncio.Transport | None = None
        self.tasks: set[asyncio.Task[None]] = set()

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self.transport = transport
        self.connections.add(self)
        transport.write(encode_frame(Hello(version=WIRE_VERSION, replica_id=self.replica_id, pid=os.getpid())))

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self.connections.discard(self)

    def data_received(self, data: bytes) -> None:
        try:
            frames = self.buffer.feed(data)
        except Exception as exc:
            log.error("closing a connection that sent a bad frame: %s", exc)
            if self.transport is not None:
                self.transport.close()
            return
        loop = asyncio.get_running_loop()
        for frame in frames:
            if isinstance(frame, InferRequest):
                task = loop.create_task(self._serve(frame))
                self.tasks.add(task)
                task.add_done_callback(self.tasks.discard)

    async def _serve(self, req: InferRequest) -> None:
        response, call, result = await self.handler.handle(req)
        if self.transport is not None:
            self.transport.write(encode_frame(response))
        if call is not None:
            self.handler.after_reply(call, result)
