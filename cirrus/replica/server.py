"""The replica's request path: decode -> pre_predict -> inference slot -> predict -> reply -> post_predict.

An *inference slot* is held only while `predict` runs. A sync `predict` runs on a slot thread; an
async one on the event loop. Hooks and request I/O never hold a slot, and `post_predict` runs
after the reply frame has been written.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

from cirrus.predictor import (
    Call,
    HTTPError,
    LoadedPredictor,
    PayloadError,
    decode_payload,
    encode_json,
    encode_result,
)
from cirrus.replica.batcher import Batcher, BatchPolicy, timed_async, timed_sync
from cirrus.replica.streaming import StreamSource, StreamState, is_stream_function, is_stream_object, pump
from cirrus.wire import (
    WIRE_VERSION,
    BatchConfig,
    Cancel,
    FrameBuffer,
    Hello,
    InferRequest,
    InferResponse,
    StreamCredit,
    encode_frame,
)

if TYPE_CHECKING:
    from cirrus.models.lru import ModelLRU

log = logging.getLogger("cirrus.replica")
MODEL_HEADER = "x-cirrus-model"  # names the model of a multi-model API (the gateway sets it from the path)


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

    @contextlib.asynccontextmanager
    async def held(self) -> AsyncIterator[None]:
        """Hold one slot for a while (a stream's whole generation)."""
        async with self._free:
            yield

    def in_thread(self, fn: Any) -> asyncio.Future[Any]:
        """Run `fn` on a slot thread; the caller holds the slot (see `held`)."""
        return asyncio.get_running_loop().run_in_executor(self._pool, fn)

    def all_stuck_for(self, now: float) -> float:
        """Seconds during which every slot has been held by an abandoned (timed-out) sync call."""
        if len(self._overdue) < self.size:
            return 0.0
        return now - max(self._overdue.values())

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


class RequestHandler:
    """Turns one `InferRequest` into one `InferResponse` using the loaded predictor."""

    def __init__(
        self,
        predictor: LoadedPredictor,
        inference_slots: int,
        batching: BatchConfig | None = None,
        models: ModelLRU | None = None,
    ) -> None:
        self.predictor = predictor
        self.models = models  # a multi-model API: the models by name, loaded on first use
        self.slots = Slots(inference_slots)
        self.background: set[asyncio.Task[None]] = set()
        self.batcher: Batcher | None = None  # with `batching`, predict_batch answers requests in groups
        if batching is not None and predictor.predict_batch is not None:
            policy = BatchPolicy(batching.max_batch_size, batching.max_wait_s, batching.mode)
            self.batcher = Batcher(policy, predictor.predict_batch, self.slots, batching.max_queue)

    async def handle(self, req: InferRequest) -> tuple[InferResponse | StreamSource, Call | None, Any]:
        """The reply (or a stream to pump), and (call, result) for `post_predict` when it succeeded."""
        try:
            call = Call(
                payload=decode_payload(req.body, req.content_type),
                query_params=_query_params(req.query_string),
                headers=dict(req.headers),
                request_id=req.request_id,
            )
        except PayloadError as exc:
            return _error(req, 400, str(exc)), None, None
        model_name = None
        if self.models is not None:  # a multi-model API: the request must name one of its models
            model_name = call.headers.get(MODEL_HEADER)
            if not model_name:
                message = "this API serves several models: name one as POST /<api>/<model> or in X-Cirrus-Model"
                return _error(req, 400, message, models=self.models.names), None, None
            if model_name not in self.models.paths:
                message = f"no model named {model_name!r}; available models: {', '.join(self.models.names)}"
                return _error(req, 404, message, models=self.models.names), None, None
        try:
            async with asyncio.timeout(req.timeout_s):
                result = await self._run(call, model_name)
            if isinstance(result, StreamSource):
                return result, call, None
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
            InferResponse(
                id=req.id,
                status=status,
                body=body,
                content_type=content_type,
                headers=headers,
                slot_wait_s=call.slot_wait_s,
                predict_s=call.predict_s,
                batch_size=call.batch_size,
                held=None if self.models is None else self.models.held(),
            ),
            call,
            result,
        )

    async def _run(self, call: Call, model_name: str | None = None) -> Any:
        predictor = self.predictor
        pre = predictor.pre_predict
        if pre is not None:
            replaced = await pre.fn(**pre.kwargs(call))
            if replaced is not None:
                call.payload = replaced
        predict = predictor.predict
        if predict.payload_model is not None:
            call.payload = _validate(predict.payload_model, call.payload)
        if self.models is not None and model_name is not None:  # a load can take long: off the event loop
            call.model = await asyncio.to_thread(self.models.get, model_name)
            call.get_model = self.models.get  # any other model, by name and version (loads on the caller's thread)
        if self.batcher is not None:  # server-side batching: answered by predict_batch with other payloads
            result = await self.batcher.submit(call)
            if predict.return_model is not None and not isinstance(result, predict.return_model):
                result = predict.return_model.model_validate(result)
            return result
        kwargs = predict.kwargs(call)
        if is_stream_function(predict.fn):
            return StreamSource(fn=predict.fn, kwargs=kwargs)  # runs holding a slot, item by item
        if predict.is_async:
            result = await self.slots.run_async(timed_async(predict.fn, call, time.monotonic), kwargs)
        else:
            result = await self.slots.run_sync(timed_sync(predict.fn, call, time.monotonic), kwargs)
        if is_stream_object(result):
            return StreamSource(generator=result)
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
        self.by_id: dict[int, asyncio.Task[None]] = {}
        self.streams: dict[int, StreamState] = {}

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
                self.by_id[frame.id] = task
                task.add_done_callback(self.tasks.discard)
            elif isinstance(frame, StreamCredit):
                stream = self.streams.get(frame.id)
                if stream is not None:
                    stream.grant(frame.chunks)
            elif isinstance(frame, Cancel):
                stream = self.streams.get(frame.id)
                if stream is not None:
                    stream.cancel()
                running = self.by_id.get(frame.id)
                if running is not None:
                    running.cancel()

    def _write(self, data: bytes) -> None:
        if self.transport is not None:
            self.transport.write(data)

    async def _serve(self, req: InferRequest) -> None:
        try:
            reply, call, result = await self.handler.handle(req)
            if isinstance(reply, StreamSource):
                await self._stream(req, reply, call)
                return
            self._write(encode_frame(reply))
            if call is not None:
                self.handler.after_reply(call, result)
        except asyncio.CancelledError:
            log.info("request %s cancelled: the client went away", req.request_id)
        finally:
            self.by_id.pop(req.id, None)

    async def _stream(self, req: InferRequest, source: StreamSource, call: Call | None) -> None:
        state = StreamState()
        self.streams[req.id] = state
        slots = self.handler.slots
        try:
            done = await pump(req, source, state, self._write, slots.held, slots.in_thread, _error)
        finally:
            del self.streams[req.id]
        if done and call is not None:
            self.handler.after_reply(call, None)
