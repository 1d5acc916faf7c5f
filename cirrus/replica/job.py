"""A batch job's worker: one leased queue request is one batch for `predict_batch`.

The batch's results are written to the job's sink as `part-<index>.jsonl` (one JSON line per
item, in order: `{"index", "item", "result"}`, or `{"index", "item", "error"}` for an item whose
place in `predict_batch`'s list holds an exception) *before* the lease is completed. A batch delivered
again (its worker died, or its lease ran out) rewrites the same file whole, so the sink holds
every item's result exactly once however often a batch ran. A retry's batch carries `indexes`, each
item's index in the original job's items, and its lines keep those.

The request with id `on-job-complete` (queued by the job manager once every batch has finished)
runs the predictor's `on_job_complete(job)` instead.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import msgspec

from cirrus.predictor import HTTPError, LoadedPredictor, Method, encode_json
from cirrus.replica.server import Slots
from cirrus.store.files import part_name, write_file
from cirrus.wire import JobConfig

log = logging.getLogger("cirrus.replica")


class BatchFailed(Exception):
    """A batch that did not produce its results; `retry` says whether another delivery may help."""

    def __init__(self, message: str, retry: bool = True) -> None:
        super().__init__(message)
        self.retry = retry


async def _call(method: Method, slots: Slots, kwargs: dict[str, Any]) -> Any:
    if method.is_async:
        return await slots.run_async(method.fn, kwargs)
    return await slots.run_sync(method.fn, kwargs)


def encode_results(start: int, items: list[Any], results: Any, indexes: list[int] | None = None) -> bytes:
    """The part file's content; BatchFailed when `results` is not one result per item. `indexes`:
    each item's index in the original job's items (a retry's batch), else `start` onwards."""
    if not isinstance(results, list | tuple):
        raise BatchFailed(f"predict_batch returned a {type(results).__name__}, not a list (one result per item)")
    if len(results) != len(items):
        raise BatchFailed(f"predict_batch returned {len(results)} results for {len(items)} items")
    lines = []
    places = indexes if indexes is not None and len(indexes) == len(items) else range(start, start + len(items))
    for place, item, result in zip(places, items, results, strict=True):
        if isinstance(result, BaseException):
            # As with realtime batching: an exception in the list fails that item only, recorded
            # with its error in place of a result (the sink is the job owner's, so the message stays).
            error = f"{type(result).__name__}: {result}"
            lines.append(encode_json({"index": place, "item": item, "error": error}))
            continue
        try:
            lines.append(encode_json({"index": place, "item": item, "result": result}))
        except TypeError as exc:
            raise BatchFailed(f"item {place}: {exc}", retry=False) from None
    return b"\n".join(lines) + b"\n"


async def run_batch(
    predictor: LoadedPredictor, slots: Slots, job: JobConfig, body: bytes, timeout_s: float, io: Any
) -> None:
    """Run one batch and write its part file; raises BatchFailed (the lease is then failed)."""
    try:
        batch = msgspec.json.decode(body)
        index, start, items = int(batch["index"]), int(batch["start"]), list(batch["items"])
        indexes = None if batch.get("indexes") is None else [int(i) for i in batch["indexes"]]
    except (msgspec.DecodeError, KeyError, TypeError, ValueError) as exc:
        raise BatchFailed(f"malformed batch: {exc}", retry=False) from None
    method = predictor.predict_batch
    if method is None:
        raise BatchFailed("the predictor has no predict_batch", retry=False)
    try:
        async with asyncio.timeout(timeout_s):
            results = await _call(method, slots, {"payloads": items})
    except TimeoutError:
        raise BatchFailed(f"predict_batch did not finish within {timeout_s:g}s") from None
    except HTTPError as exc:
        raise BatchFailed(exc.message, retry=exc.status >= 500) from None
    except Exception as exc:
        log.exception("job %s, batch %d: predict_batch raised", job.job_id, index)
        raise BatchFailed(f"predict_batch raised {type(exc).__name__}: {exc}") from None
    data = encode_results(start, items, results, indexes)
    loop = asyncio.get_running_loop()
    try:
        await loop.run_in_executor(io, write_file, job.sink, part_name(index), data)
    except Exception as exc:
        log.exception("job %s, batch %d: writing its results failed", job.job_id, index)
        raise BatchFailed(f"writing the results to {job.sink} failed: {type(exc).__name__}: {exc}") from None


async def run_hook(predictor: LoadedPredictor, slots: Slots, body: bytes, timeout_s: float) -> None:
    """Call `on_job_complete(job)` with the job's summary, if the predictor has it."""
    method = predictor.on_job_complete
    if method is None:
        return
    summary = msgspec.json.decode(body)
    try:
        async with asyncio.timeout(timeout_s):
            await _call(method, slots, {"job": summary} if "job" in method.wants else {})
    except TimeoutError:
        raise BatchFailed(f"on_job_complete did not finish within {timeout_s:g}s", retry=False) from None
    except Exception as exc:
        log.exception("job %s: on_job_complete raised", summary.get("id"))
        raise BatchFailed(f"on_job_complete raised {type(exc).__name__}: {exc}", retry=False) from None
