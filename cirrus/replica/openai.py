"""OpenAI-compatible requests on the replica's side (`X-Cirrus-Protocol: openai.<operation>`):
validate the body (cirrus/protocols/openai.py), call the predictor's `embed`, `chat` or `complete`
on the replica's inference slots, and answer in OpenAI's shapes.

* Embeddings batch across requests when the API has `batching`: a second `Batcher` on the same slots
  calls `embed` once with the texts of every request in the batch, and splits the vectors back.
* `chat` / `complete` may return a str or a dict, or be generators (sync or async) of str pieces.
  With `stream: true` the reply is a stream of server-sent events (a `StreamSource`, pumped as any
  stream: the slot is held for the whole generation, a client gone closes the generator). An
  exception mid-stream becomes an SSE error event, and the stream ends.
* `pre_predict` sees the request body as its `payload` (its return value replaces the body);
  `post_predict` gets the response body.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
import weakref
from collections.abc import AsyncGenerator, AsyncIterator, Iterator
from typing import TYPE_CHECKING, Any

import msgspec

from cirrus.predictor import Call, HTTPError, Method, PredictorFailed, encode_json
from cirrus.protocols.openai import (
    ENDPOINTS,
    BadReply,
    OpenAIError,
    Reply,
    StreamShaper,
    chat_response,
    completion_response,
    embeddings_of,
    embeddings_response,
    joined,
    parse_request,
    reply_of,
)
from cirrus.replica.batcher import Batcher, BatchPolicy, timed_async, timed_sync
from cirrus.replica.streaming import StreamSource, is_stream_object
from cirrus.wire import InferRequest, InferResponse

if TYPE_CHECKING:
    from cirrus.replica.server import RequestHandler

log = logging.getLogger("cirrus.replica")
MODEL_HEADER = "x-cirrus-model"
_embed_batchers: weakref.WeakKeyDictionary[Any, Batcher] = weakref.WeakKeyDictionary()


def _answer(
    req: InferRequest, status: int, body: Any, call: Call | None = None, held: list[str] | None = None
) -> InferResponse:
    return InferResponse(
        id=req.id,
        status=status,
        body=encode_json(body),
        content_type="application/json",
        pre_s=0.0 if call is None else call.pre_s,
        slot_wait_s=0.0 if call is None else call.slot_wait_s,
        predict_s=0.0 if call is None else call.predict_s,
        batch_size=0 if call is None else call.batch_size,
        held=held,  # a multi-model replica: the models it holds now, for the gateway's routing
    )


def _failure(handler: RequestHandler, req: InferRequest, exc: BaseException) -> OpenAIError:
    """How a predictor's failure is told: an HTTPError as it says, anything else as a 500."""
    if isinstance(exc, BadReply):
        exc = PredictorFailed(str(exc))
    if isinstance(exc, PredictorFailed):
        log.error("request %s: %s", req.request_id, exc.message)
        return OpenAIError(500, handler.failure(req, exc.message))
    if isinstance(exc, HTTPError):
        return OpenAIError(exc.status, exc.message)
    log.error("request %s: the predictor raised", req.request_id, exc_info=exc)
    return OpenAIError(500, handler.failure(req, str(PredictorFailed.raised(exc))))


async def handle(
    handler: RequestHandler, req: InferRequest, operation: str
) -> tuple[InferResponse | StreamSource, Call | None, Any]:
    """`RequestHandler.handle` for one OpenAI request: (reply or stream, call, result for post_predict)."""
    try:
        return await _handle(handler, req, operation)
    except OpenAIError as exc:
        return _answer(req, exc.status, exc.body()), None, None
    except TimeoutError:
        log.warning("request %s timed out after %.3gs", req.request_id, req.timeout_s)
        error = OpenAIError(504, f"the predictor did not answer within {req.timeout_s:.3g}s", code="timeout")
        return _answer(req, 504, error.body()), None, None
    except Exception as exc:
        error = _failure(handler, req, exc)
        return _answer(req, error.status, error.body()), None, None


async def _handle(
    handler: RequestHandler, req: InferRequest, operation: str
) -> tuple[InferResponse | StreamSource, Call | None, Any]:
    method_name = ENDPOINTS.get(operation)
    if method_name is None:
        raise OpenAIError(404, f"unknown OpenAI operation {operation!r}")
    try:
        body = msgspec.json.decode(req.body) if req.body else None
    except (msgspec.DecodeError, RecursionError) as exc:
        raise OpenAIError(400, f"malformed JSON body: {exc}") from None
    call = Call(payload=body, query_params={}, headers=dict(req.headers), request_id=req.request_id)
    predictor = handler.predictor
    method: Method | None = getattr(predictor, method_name)
    if method is None:
        raise OpenAIError(
            404,
            f"this model does not support /v1/{'chat/completions' if operation == 'chat' else operation}: "
            f"its predictor has no {method_name} method",
            code="unsupported_endpoint",
        )
    async with asyncio.timeout(req.timeout_s):
        await _prepare(handler, call)
        request = parse_request(operation, call.payload)
        if operation == "embeddings":
            result = await _embeddings(handler, method, call, request)
            return _answer(req, 200, result, call, _held(handler)), call, result
        kwargs = _kwargs(method, call, request, operation)
        if request.stream:
            shaper = StreamShaper(operation, request.model, request.include_usage, encode_json)
            source = StreamSource(fn=_stream_function(handler, req, method, kwargs, shaper), pre_s=call.pre_s)
            return source, call, None
        reply = await _generate(handler, method, call, kwargs)
    builder = chat_response if operation == "chat" else completion_response
    result = builder(request.model, reply)
    return _answer(req, 200, result, call, _held(handler)), call, result


def _held(handler: RequestHandler) -> list[str] | None:
    return None if handler.models is None else handler.models.held()


async def _prepare(handler: RequestHandler, call: Call) -> None:
    """pre_predict (its return value replaces the body) and, for a multi-model API, the model."""
    await handler.pre_predict(call)
    models = handler.models
    if models is None:
        return
    name = call.headers.get(MODEL_HEADER)
    if not name:
        raise OpenAIError(400, "this API serves several models: name one as '<api>/<model>'", "model")
    if name not in models.paths:
        raise OpenAIError(404, f"no model named {name!r}; available: {', '.join(models.names)}", "model")
    call.model = await asyncio.to_thread(models.get, name)
    call.get_model = models.get


def _kwargs(method: Method, call: Call, request: Any, operation: str) -> dict[str, Any]:
    values = {
        "headers": call.headers,
        "request_id": call.request_id,
        "model": call.model,
        "get_model": call.get_model,
    }
    if operation == "chat":
        values.update(messages=request.message_dicts(), params=request.params())
    elif operation == "completions":
        values.update(prompt=request.prompt, params=request.params())
    else:
        values["texts"] = request.input
    return {name: values[name] for name in method.wants}


# --- embeddings ------------------------------------------------------------------------------------


async def _embeddings(handler: RequestHandler, method: Method, call: Call, request: Any) -> dict[str, Any]:
    texts: list[str] = request.input
    batcher = _embed_batcher(handler, method) if call.model is None else None
    if batcher is not None:  # joins other requests' texts in one embed call
        part = Call(payload=texts, query_params={}, headers={}, request_id=call.request_id)
        vectors, tokens = await batcher.submit(part)
        call.slot_wait_s, call.predict_s, call.batch_size = part.slot_wait_s, part.predict_s, part.batch_size
    else:
        kwargs = _kwargs(method, call, request, "embeddings")
        if method.is_async:
            value = await handler.slots.run_async(timed_async(method.fn, call, time.monotonic), kwargs)
        else:
            value = await handler.slots.run_sync(timed_sync(method.fn, call, time.monotonic), kwargs)
        vectors, tokens = embeddings_of(value, len(texts))
    return embeddings_response(request.model, vectors, tokens, request.encoding_format)


def _embed_batcher(handler: RequestHandler, method: Method) -> Batcher | None:
    """The handler's batcher of embed calls (the spec's `batching`), made on first use."""
    config = handler.batching
    if config is None:
        return None
    batcher = _embed_batchers.get(handler)
    if batcher is None:
        policy = BatchPolicy(config.max_batch_size, config.max_wait_s, config.mode)
        batched = Method(fn=_embed_batch(method), wants=("payloads",), is_async=method.is_async)
        batcher = Batcher(policy, batched, handler.slots, config.max_queue)
        _embed_batchers[handler] = batcher
    return batcher


def _split(value: Any, payloads: list[list[str]]) -> list[Any]:
    """One embed call's answer for the texts of several requests -> (vectors, tokens) per request."""
    vectors, tokens = embeddings_of(value, sum(len(p) for p in payloads))
    answers: list[Any] = []
    start = 0
    for texts in payloads:
        end = start + len(texts)
        answers.append((vectors[start:end], None if tokens is None else tokens[start:end]))
        start = end
    return answers


def _embed_batch(method: Method) -> Any:
    """A `predict_batch(payloads)` for embed: each payload is a request's texts. An HTTPError fails each
    request with it (not as a predictor failure); a malformed answer fails the batch."""
    fn = method.fn

    if method.is_async:

        async def run_async(payloads: list[list[str]]) -> list[Any]:
            try:
                value = await fn(texts=[t for p in payloads for t in p])
            except HTTPError as exc:
                return [exc] * len(payloads)
            return _checked_split(value, payloads)

        return run_async

    def run(payloads: list[list[str]]) -> list[Any]:
        try:
            value = fn(texts=[t for p in payloads for t in p])
        except HTTPError as exc:
            return [exc] * len(payloads)
        return _checked_split(value, payloads)

    return run


def _checked_split(value: Any, payloads: list[list[str]]) -> list[Any]:
    try:
        return _split(value, payloads)
    except BadReply as exc:
        return [PredictorFailed(str(exc))] * len(payloads)


# --- chat and completions --------------------------------------------------------------------------


def _collect(value: Any, name: str) -> Reply:
    """A sync call's answer as a reply (a generator is run to its end, here on the slot's thread)."""
    if inspect.isgenerator(value):
        return joined(list(value), name)
    return reply_of(value, name)


async def _collect_async(value: Any, name: str) -> Reply:
    if inspect.isasyncgen(value):
        return joined([item async for item in value], name)
    return _collect(value, name)


async def _generate(handler: RequestHandler, method: Method, call: Call, kwargs: dict[str, Any]) -> Reply:
    """A reply not streamed: the predictor's answer, or its pieces joined."""
    fn, name = method.fn, method.fn.__name__
    if inspect.isasyncgenfunction(fn) or method.is_async:

        async def run_async(**kw: Any) -> Reply:
            value = fn(**kw)
            return await _collect_async(await value if inspect.isawaitable(value) else value, name)

        return await handler.slots.run_async(timed_async(run_async, call, time.monotonic), kwargs)

    def run(**kw: Any) -> Reply:
        return _collect(fn(**kw), name)

    return await handler.slots.run_sync(timed_sync(run, call, time.monotonic), kwargs)


def _stream_function(
    handler: RequestHandler, req: InferRequest, method: Method, kwargs: dict[str, Any], shaper: StreamShaper
) -> Any:
    """A generator function of the SSE events (sync: steps on the slot's thread; async: on the loop)."""
    fn, name = method.fn, method.fn.__name__

    def failed(exc: BaseException) -> list[str]:
        error = _failure(handler, req, exc)
        return shaper.error(error.status, error.message)

    if inspect.isasyncgenfunction(fn) or method.is_async:

        async def events_async() -> AsyncIterator[str]:
            # As `events`: what the predictor raises before its first piece is the HTTP answer.
            value = fn(**kwargs)
            if inspect.isawaitable(value):
                value = await value
            pieces = _async_items(value, shaper, name)
            try:
                event = await anext(pieces, None)
            except BaseException:
                await pieces.aclose()
                raise
            first = shaper.start()
            if first:
                yield first
            try:
                if event:
                    yield event
                async for event in pieces:
                    yield event
            except Exception as exc:
                for event in failed(exc):
                    yield event
                return
            finally:
                await pieces.aclose()
            for event in shaper.end():
                yield event

        return events_async

    def events() -> Iterator[str]:
        # The predictor's first piece comes before any event: what it raises until then (an
        # HTTPError for a bad parameter) is the HTTP answer, not an event after a 200.
        value = fn(**kwargs)
        items = _items(value, shaper, name)
        try:
            event = next(items, None)
        except BaseException:
            if inspect.isgenerator(value):
                value.close()
            raise
        first = shaper.start()
        if first:
            yield first
        try:
            if event:
                yield event
            yield from items
        except Exception as exc:
            yield from failed(exc)
            return
        finally:
            if inspect.isgenerator(value):
                value.close()
        yield from shaper.end()

    return events


async def _async_items(value: Any, shaper: StreamShaper, name: str) -> AsyncGenerator[str, None]:
    """The events of an async answer: an async generator's items one by one (closed at the end), or
    those of a sync answer."""
    if not inspect.isasyncgen(value):
        for each in _items(value, shaper, name):
            yield each
        return
    try:
        async for item in value:
            event = shaper.item(item, name)
            if event:
                yield event
    finally:
        await value.aclose()


def _items(value: Any, shaper: StreamShaper, name: str) -> Iterator[str]:
    """The events of a sync answer: a generator's items one by one, or one str/dict reply."""
    items = value if is_stream_object(value) else [value]
    for item in items:
        event = shaper.item(item, name)
        if event:
            yield event
