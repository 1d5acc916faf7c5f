"""Open Inference Protocol (v2) requests on the replica: `POST /v2/models/<api>/infer` as the
gateway forwards it (`X-Cirrus-Protocol: v2.infer`).

The body is decoded into numpy arrays by input name (cirrus/protocols/v2.py; a large body off the
event loop), checked against the inputs the spec declares, and handed to `predict(payload)` (or,
with batching, to `predict_batch` with other requests' payloads) through the same slots, hooks and
timeouts as `POST /<api>`. The outputs the predictor returns ({name: array}) are encoded as the
request asked (JSON or the binary extension); every error is the protocol's `{"error": "..."}`.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any

import msgspec

from cirrus.predictor import Call, HTTPError, LoadedPredictor, PredictorFailed, PredictorLoadError
from cirrus.protocols.v2 import (
    HEADER_LENGTH,
    OPENAPI_KEY,
    DecodedRequest,
    V2Error,
    checked_tensors,
    decode_request,
    encode_response,
    error_body,
)
from cirrus.replica.server import _ValidationFailed
from cirrus.replica.streaming import StreamSource
from cirrus.wire import InferRequest, InferResponse, ReplicaLaunch, TensorDecl

if TYPE_CHECKING:
    from cirrus.replica.server import RequestHandler

log = logging.getLogger("cirrus.replica")
INLINE_BYTES = 64 * 1024  # a body or an answer up to this size is decoded / encoded on the event loop


def declare(
    launch: ReplicaLaunch, predictor: LoadedPredictor, openapi: dict[str, Any]
) -> tuple[ReplicaLaunch, dict[str, Any]]:
    """The launch and OpenAPI document of a `protocol: v2` replica, with the tensors its predictor
    declares where the spec declares none: `get_input_types()` / `get_output_types()` (the names of
    KServe's Model methods), each returning `[{"name", "datatype", "shape"}]`. The gateway's model
    metadata shows them (from the OpenAPI document) and requests are checked against them."""
    instance = predictor.instance
    changes: dict[str, list[TensorDecl]] = {}
    for field, method in (("tensor_inputs", "get_input_types"), ("tensor_outputs", "get_output_types")):
        fn = getattr(instance, method, None)
        if getattr(launch, field) or fn is None:
            continue
        try:
            tensors = checked_tensors(fn(), f"{type(instance).__name__}.{method}()")
        except V2Error as exc:
            raise PredictorLoadError(exc.message) from None
        changes[field] = [TensorDecl(**tensor) for tensor in tensors]
    launch = msgspec.structs.replace(launch, **changes)
    declared = {"inputs": launch.tensor_inputs, "outputs": launch.tensor_outputs}
    return launch, {**openapi, OPENAPI_KEY: msgspec.to_builtins(declared)}


def _error(req: InferRequest, status: int, message: str) -> InferResponse:
    return InferResponse(id=req.id, status=status, body=error_body(message))


async def handle(
    handler: RequestHandler, req: InferRequest, operation: str
) -> tuple[InferResponse | StreamSource, Call | None, Any]:
    """`RequestHandler.handle` for a v2 request (the same contract)."""
    if operation != "infer":
        return _error(req, 404, f"no v2 operation {operation!r}"), None, None
    launch = handler.launch
    inputs = [] if launch is None else launch.tensor_inputs
    outputs = [] if launch is None else launch.tensor_outputs
    headers = dict(req.headers)
    encoding = headers.get("content-encoding", "identity")
    if encoding != "identity":
        return (
            _error(req, 415, f"Content-Encoding {encoding} is not supported: send the request uncompressed"),
            None,
            None,
        )
    try:
        decoded = await _off_loop_if_large(
            len(req.body), decode_request, req.body, headers.get(HEADER_LENGTH), inputs, outputs
        )
    except V2Error as exc:
        return _error(req, exc.status, exc.message), None, None
    call = Call(payload=decoded.inputs, query_params={}, headers=headers, request_id=req.request_id)
    try:
        async with asyncio.timeout(req.timeout_s):
            result = await handler._run(call)
        if isinstance(result, StreamSource):
            await _close(result)
            raise V2Error("predict streamed its answer (a generator); a v2 answer is whole tensors", 500)
        body, content_type, extra = await _encode(result, decoded, handler)
    except V2Error as exc:
        return _error(req, exc.status, exc.message), None, None
    except PredictorFailed as exc:  # (before HTTPError: it is one) a batch that failed
        return _error(req, 500, handler.failure(req, exc.message)), None, None
    except HTTPError as exc:
        return _error(req, exc.status, exc.message), None, None
    except _ValidationFailed as exc:  # a pydantic `payload` annotation
        return _error(req, 422, f"payload failed validation: {exc.errors}"), None, None
    except TimeoutError:
        log.warning("request %s timed out after %.3gs", req.request_id, req.timeout_s)
        return _error(req, 504, f"the predictor did not answer within {req.timeout_s:.3g}s"), None, None
    except Exception as exc:
        log.exception("request %s: the predictor raised", req.request_id)
        return _error(req, 500, handler.failure(req, str(PredictorFailed.raised(exc)))), None, None
    response = InferResponse(
        id=req.id,
        status=200,
        body=body,
        content_type=content_type,
        headers=extra,
        pre_s=call.pre_s,
        slot_wait_s=call.slot_wait_s,
        predict_s=call.predict_s,
        batch_size=call.batch_size,
    )
    return response, call, result


async def _encode(
    result: Any, decoded: DecodedRequest, handler: RequestHandler
) -> tuple[bytes, str, list[tuple[str, str]]]:
    launch = handler.launch
    name = "" if launch is None else launch.api
    version = "" if launch is None else str(launch.revision)
    outputs = [] if launch is None else launch.tensor_outputs
    size = sum(getattr(value, "nbytes", 0) for value in result.values()) if isinstance(result, dict) else 0
    return await _off_loop_if_large(size, encode_response, result, decoded, name, version, outputs)


async def _off_loop_if_large(size: int, fn: Any, *args: Any) -> Any:
    """`fn(*args)`, on a worker thread when it handles more than INLINE_BYTES (the loop serves others)."""
    if size <= INLINE_BYTES:
        return fn(*args)
    return await asyncio.get_running_loop().run_in_executor(None, fn, *args)


async def _close(source: StreamSource) -> None:
    """Close the generator a `predict` returned (one not started yet needs nothing)."""
    generator = source.generator
    try:
        if hasattr(generator, "aclose"):
            await generator.aclose()
        elif hasattr(generator, "close"):
            generator.close()
    except Exception:
        log.exception("closing a stream that a v2 request cannot carry")
