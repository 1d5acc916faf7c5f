"""The replica's request path: decode -> pre_predict -> inference slot -> predict -> reply -> post_predict.

An *inference slot* is held only while `predict` runs. A sync `predict` runs on a slot thread; an
async one on the event loop. Hooks and request I/O never hold a slot, and `post_predict` runs
after the reply frame has been written.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import os
import secrets
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

from cirrus.predictor import (
    JSON_TOO_DEEP,
    Call,
    HTTPError,
    LoadedPredictor,
    PayloadError,
    PredictorFailed,
    decode_payload,
    encode_json,
    encode_result,
)
from cirrus.replica.batcher import Batcher, BatchPolicy, timed_async, timed_sync
from cirrus.replica.protocols import handle_protocol, protocol_of
from cirrus.replica.streaming import (
    StreamIO,
    StreamSource,
    StreamState,
    is_stream_function,
    is_stream_object,
    pump,
)
from cirrus.wire import (
    AUTH_FRAME_BYTES,
    AUTH_TIMEOUT_S,
    FRAME_HEADER_BYTES,
    WIRE_VERSION,
    Auth,
    BatchConfig,
    Cancel,
    Frame,
    FrameBuffer,
    Hello,
    InferRequest,
    InferResponse,
    ReplicaLaunch,
    StreamCredit,
    Welcome,
    auth_mac,
    encode_frame,
    frame_limit,
)

if TYPE_CHECKING:
    from cirrus.models.lru import ModelLRU

log = logging.getLogger("cirrus.replica")
MODEL_HEADER = "x-cirrus-model"  # names the model of a multi-model API (the gateway sets it from the path)


def _error(req: InferRequest, status: int, message: str, **extra: Any) -> InferResponse:
    body = encode_json({"error": message, "request_id": req.request_id, **extra})
    return InferResponse(id=req.id, status=status, body=body)


def failure_message(request_id: str, detail: str, debug: bool) -> str:
    """What a client is told of a predictor's failure: `detail` (the exception) only with `debug_errors`,
    since messages carry paths, hosts and secrets; the replica's log always has it."""
    if debug:
        return detail
    return f"the predictor failed; see the replica log (request id {request_id})"


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
        debug_errors: bool = False,
    ) -> None:
        self.predictor = predictor
        self.debug_errors = debug_errors  # 500 bodies carry the exception's message
        self.launch: ReplicaLaunch | None = None  # how the replica was launched: API, revision, protocol (if known)
        self.models = models  # a multi-model API: the models by name, loaded on first use
        self.slots = Slots(inference_slots)
        self.background: set[asyncio.Task[None]] = set()
        self.batching = batching  # (the standard protocols' batchers use it too: cirrus/replica/openai.py)
        self.batcher: Batcher | None = None  # with `batching`, predict_batch answers requests in groups
        if batching is not None and predictor.predict_batch is not None:
            policy = BatchPolicy(batching.max_batch_size, batching.max_wait_s, batching.mode)
            self.batcher = Batcher(policy, predictor.predict_batch, self.slots, batching.max_queue)

    async def handle(self, req: InferRequest) -> tuple[InferResponse | StreamSource, Call | None, Any]:
        """The reply (or a stream to pump), and (call, result) for `post_predict` when it succeeded."""
        protocol = protocol_of(req)
        if protocol is not None:  # a standard protocol's request (cirrus/replica/protocols.py)
            return await handle_protocol(self, req, protocol)
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
                result.pre_s = call.pre_s  # (the stream's head reports it)
                return result, call, None
            status, content_type, body, headers = encode_result(result)
        except PredictorFailed as exc:  # (before HTTPError: it is one) a batch that failed
            return self.failed(req, exc.message), None, None
        except HTTPError as exc:
            return _error(req, exc.status, exc.message), None, None
        except _ValidationFailed as exc:
            return _error(req, 422, "payload failed validation", detail=exc.errors), None, None
        except TimeoutError:
            log.warning("request %s timed out after %.3gs", req.request_id, req.timeout_s)
            return _error(req, 504, f"the predictor did not answer within {req.timeout_s:.3g}s"), None, None
        except Exception as exc:
            log.exception("request %s: the predictor raised", req.request_id)
            return self.failed(req, str(PredictorFailed.raised(exc))), None, None
        return (
            InferResponse(
                id=req.id,
                status=status,
                body=body,
                content_type=content_type,
                headers=headers,
                pre_s=call.pre_s,
                slot_wait_s=call.slot_wait_s,
                predict_s=call.predict_s,
                batch_size=call.batch_size,
                held=None if self.models is None else self.models.held(),
            ),
            call,
            result,
        )

    def failure(self, req: InferRequest, detail: str) -> str:
        """How a client is told that the predictor failed (`detail`: how, shown only with debug_errors)."""
        return failure_message(req.request_id, detail, self.debug_errors)

    def failed(self, req: InferRequest, detail: str) -> InferResponse:
        """The 500 of a predictor that failed."""
        return _error(req, 500, self.failure(req, detail))

    async def pre_predict(self, call: Call) -> None:
        """Run `pre_predict`, if any, timed (`call.pre_s`); what it returns replaces the payload."""
        pre = self.predictor.pre_predict
        if pre is not None:
            began = time.perf_counter()
            replaced = await pre.fn(**pre.kwargs(call))
            call.pre_s = time.perf_counter() - began
            if replaced is not None:
                call.payload = replaced

    async def _run(self, call: Call, model_name: str | None = None) -> Any:
        predictor = self.predictor
        await self.pre_predict(call)
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
    except RecursionError:
        raise HTTPError(400, JSON_TOO_DEEP) from None
    except ValidationError as exc:
        errors = exc.errors(include_url=False, include_context=False, include_input=False)
        raise _ValidationFailed([{"loc": list(e["loc"]), "msg": e["msg"], "type": e["type"]} for e in errors]) from None


def _query_params(raw: bytes) -> dict[str, str]:
    if not raw:
        return {}
    from urllib.parse import parse_qsl

    return dict(parse_qsl(raw.decode("latin-1"), keep_blank_values=True))


class ReplicaProtocol(asyncio.Protocol):
    """One gateway connection: frames in, a task per request, frames out.

    The connection must first prove it knows the replica's `secret` (`cirrus.wire`: an `Auth` frame
    with the HMAC of our Hello's nonce) within `AUTH_TIMEOUT_S`; until then frames are
    `AUTH_FRAME_BYTES` long at most, and anything else closes it unanswered. `Auth` sets the frame
    limit (the gateway's body limit plus headroom): a response over it is answered with a 502 instead."""

    def __init__(
        self,
        handler: RequestHandler,
        replica_id: str,
        connections: set[ReplicaProtocol],
        secret: bytes,
        auth_timeout_s: float = AUTH_TIMEOUT_S,
    ) -> None:
        self.handler = handler
        self.replica_id = replica_id
        self.connections = connections
        self.secret = secret
        self.auth_timeout_s = auth_timeout_s
        self.nonce = secrets.token_bytes(16)
        self.authenticated = False
        self._auth_timer: asyncio.TimerHandle | None = None
        self.buffer = FrameBuffer(AUTH_FRAME_BYTES)
        self.transport: asyncio.Transport | None = None
        self.tasks: set[asyncio.Task[None]] = set()
        self.by_id: dict[int, asyncio.Task[None]] = {}
        self.streams: dict[int, StreamState] = {}

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self.transport = transport
        self.connections.add(self)
        hello = Hello(version=WIRE_VERSION, replica_id=self.replica_id, pid=os.getpid(), nonce=self.nonce)
        transport.write(encode_frame(hello))
        self._auth_timer = asyncio.get_running_loop().call_later(self.auth_timeout_s, self._auth_expired)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self.connections.discard(self)
        if self._auth_timer is not None:
            self._auth_timer.cancel()

    def _refuse(self, why: str) -> None:
        """Close a connection that did not authenticate, answering nothing."""
        if self.transport is not None:
            peer = self.transport.get_extra_info("peername")
            log.warning("closing a connection from %s that %s", peer or "a local socket", why)
            self.transport.abort()
        self.transport = None

    def _auth_expired(self) -> None:
        if not self.authenticated:
            self._refuse(f"did not authenticate within {self.auth_timeout_s:g}s")

    def _authenticate(self, frame: Frame) -> bool:
        if not isinstance(frame, Auth) or not hmac.compare_digest(frame.mac, auth_mac(self.secret, self.nonce)):
            self._refuse(f"sent a {type(frame).__name__} frame instead of a valid Auth")
            return False
        self.authenticated = True
        if self._auth_timer is not None:
            self._auth_timer.cancel()
        self.buffer.limit = frame_limit(frame.max_body_bytes)  # both ways: what the gateway accepts
        self._write(encode_frame(Welcome()))
        return True

    def data_received(self, data: bytes) -> None:
        try:
            frames = self.buffer.feed(data)
        except Exception as exc:
            if not self.authenticated:
                self._refuse(f"sent a bad frame before authenticating ({exc})")
                return
            log.error("closing a connection that sent a bad frame: %s", exc)
            if self.transport is not None:
                self.transport.close()
            return
        if not self.authenticated and frames:
            if not self._authenticate(frames[0]):
                return
            frames = frames[1:]
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

    def _reply(self, req: InferRequest, reply: InferResponse) -> bool:
        """Send a reply; one whose frame is over the gateway's limit (its body limit plus headroom)
        becomes a 502 here, since the gateway would drop the whole connection for it. False: replaced so."""
        limit = self.buffer.limit
        if len(reply.body) <= limit:  # (else not even encoded: it may be huge)
            frame = encode_frame(reply)
            if len(frame) - FRAME_HEADER_BYTES <= limit:
                self._write(frame)
                return True
        what = f"the predictor's response of {len(reply.body)} bytes exceeds the limit of {limit} bytes"
        log.error("request %s: %s; answering 502", req.request_id, what)
        self._write(encode_frame(_error(req, 502, what)))
        return False

    async def _serve(self, req: InferRequest) -> None:
        try:
            reply, call, result = await self.handler.handle(req)
            if isinstance(reply, StreamSource):
                await self._stream(req, reply, call)
                return
            if self._reply(req, reply) and call is not None:
                self.handler.after_reply(call, result)
        except asyncio.CancelledError:
            log.info("request %s cancelled: the client went away", req.request_id)
        except Exception:  # a bug of ours: answer, rather than leave the gateway waiting until the timeout
            log.exception("request %s: the replica failed", req.request_id)
            self._write(encode_frame(_error(req, 500, f"the replica failed (request id {req.request_id})")))
        finally:
            self.by_id.pop(req.id, None)

    async def _stream(self, req: InferRequest, source: StreamSource, call: Call | None) -> None:
        state = StreamState()
        self.streams[req.id] = state
        slots = self.handler.slots
        io = StreamIO(self._write, _error, self.handler.failure, self.buffer.limit)
        try:
            done = await pump(req, source, state, io, slots.held, slots.in_thread)
        finally:
            del self.streams[req.id]
        if done and call is not None:
            self.handler.after_reply(call, None)
