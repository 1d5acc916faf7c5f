"""Batch jobs: the job request, the job record, and the pure decisions about them.

A job runs a list of items through a `kind: batch` API's `predict_batch`, `batch_size` items per
call, on `workers` replicas. This module is shared vocabulary (the admin API, the client, the CLI
and the controller's job manager all use it) and holds no I/O: parsing items, splitting them into
batches and advancing a job's state are functions of their inputs and a given clock, tested on
their own.

States: `pending` (another job of the same API runs) -> `running` -> `succeeded` (every batch
done) | `completed_with_failures` (some batches failed after their retries; listed) | `failed`
(every batch failed, or the workers cannot start) | `cancelled` | `timed_out`.

Cancel and timeout go through `stopping`: the job's workers are stopped, the batches they have in
flight finish and write their results, and only once the job's workers are gone are
the batches that did not complete failed and its final counts taken, so a cancelled job's
`items_done` is the number of result lines in its sink.

A finished job whose batches or items failed can be retried: a new job (`retry_of`: the first
one's id) runs exactly those items again, each keeping its index in the original list.
"""

from __future__ import annotations

import json
from enum import StrEnum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

MAX_ITEMS = 10_000_000
DEFAULT_BATCH_SIZE = 32  # items per predict_batch call when the client or the CLI is not told
MAX_BATCHES = 100_000
MAX_FAILED_LISTED = 1000  # failed batches kept in the job record
HOOK_ID = "on-job-complete"  # the queue request that runs the predictor's `on_job_complete`


class JobError(ValueError):
    """A job request that cannot be run; the message says what is wrong."""


class JobStatus(StrEnum):
    PENDING = "pending"
    RUNNING = "running"
    STOPPING = "stopping"  # cancelled or timed out: waits for the batches in flight, then ends
    SUCCEEDED = "succeeded"
    COMPLETED_WITH_FAILURES = "completed_with_failures"
    FAILED = "failed"
    CANCELLED = "cancelled"
    TIMED_OUT = "timed_out"

    @property
    def finished(self) -> bool:
        return self not in (JobStatus.PENDING, JobStatus.RUNNING, JobStatus.STOPPING)


class JobRequest(BaseModel):
    """What `cirrus jobs submit` / `Client.submit_job` / `POST /v1/apis/{name}/jobs` sends."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    items: list[Any] | None = Field(None, description="the items, inline (one JSON value each)")
    items_url: str | None = Field(
        None, description="a JSONL file (one JSON value per line) or a .json array: a path or an fsspec URL"
    )
    batch_size: int = Field(ge=1, le=100_000, description="items per predict_batch call")
    workers: int = Field(1, ge=1, le=1000, description="worker replicas running the batches")
    timeout_s: float | None = Field(None, gt=0, le=30 * 86_400, description="time limit of the whole job")
    max_attempts: int | None = Field(
        None, ge=1, le=100, description="deliveries of a batch before it fails (default: the API's queue.max_attempts)"
    )
    config: dict[str, Any] = Field(default_factory=dict, description="merged over predictor.config for this job")
    sink: str | None = Field(None, description="results directory or fsspec URL (default $CIRRUS_HOME/jobs/<id>/)")

    @model_validator(mode="after")
    def _one_source(self) -> JobRequest:
        if (self.items is None) == (self.items_url is None):
            raise ValueError("give the items either inline (items) or as a file or URL (items_url), not both")
        if self.items_url is not None and not self.items_url.strip():
            raise ValueError("items_url is empty")
        return self


def parse_request(data: Any) -> JobRequest:
    """A job request from JSON-like data; JobError naming each bad field."""
    if not isinstance(data, dict):
        raise JobError("a job request must be a JSON object with items or items_url, batch_size, workers, ...")
    try:
        return JobRequest.model_validate(data)
    except ValidationError as exc:
        problems = []
        for error in exc.errors(include_url=False):
            where = ".".join(str(part) for part in error["loc"])
            message = error["msg"].removeprefix("Value error, ")
            if error["type"] == "extra_forbidden":
                message = f"unknown field; allowed: {', '.join(JobRequest.model_fields)}"
            problems.append(f"{where}: {message}" if where else message)
        raise JobError("invalid job: " + "; ".join(problems)) from None


class FailedBatch(BaseModel):
    index: int
    start: int  # index of its first item
    size: int
    error: str | None = None


class Job(BaseModel):
    """A job as the daemon records it and `cirrus jobs get` shows it."""

    model_config = ConfigDict(extra="ignore")

    id: str
    api: str
    status: JobStatus
    created_at: float
    started_at: float | None = None
    finished_at: float | None = None
    batch_size: int
    workers: int
    timeout_s: float | None = None
    max_attempts: int
    config: dict[str, Any] = Field(default_factory=dict)
    sink: str
    total_items: int
    total_batches: int
    batches_done: int = 0
    batches_failed: int = 0
    batches_in_progress: int = 0
    items_done: int = 0
    items_per_s: float | None = None
    eta_s: float | None = None
    failed_batches: list[FailedBatch] = Field(default_factory=list)
    error: str | None = None
    # After the last batch: the status the job ends with once `on_job_complete` has run.
    outcome: JobStatus | None = None
    hook_started_at: float | None = None
    hook_error: str | None = None
    stop_requested_at: float | None = None  # when it was cancelled or timed out (status `stopping`)
    retry_of: str | None = None  # the job whose failed batches and items this one runs again

    @property
    def queue(self) -> str:
        return job_queue(self.api, self.id)

    def summary(self) -> dict[str, Any]:
        """What the predictor's `on_job_complete(job)` receives."""
        return {
            "id": self.id,
            "api": self.api,
            "status": (self.outcome or self.status).value,
            "total_items": self.total_items,
            "total_batches": self.total_batches,
            "batches_done": self.batches_done,
            "batches_failed": self.batches_failed,
            "items_done": self.items_done,
            "failed_batches": [b.model_dump() for b in self.failed_batches],
            "sink": self.sink,
            "config": self.config,
            "started_at": self.started_at,
            "retry_of": self.retry_of,
        }


def job_queue(api: str, job_id: str) -> str:
    """The queue-store name of a job's batches (a name no API can have: API names have no dots)."""
    return f"{api}.job-{job_id}"


# --- items --------------------------------------------------------------------------------------


def parse_items(data: bytes, source: str) -> list[Any]:
    """A `.json` file must hold one JSON array; anything else is JSONL (one JSON value per line;
    blank lines are skipped)."""
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise JobError(f"{source}: not UTF-8 text: {exc}") from None
    if source.lower().endswith(".json"):
        try:
            value = json.loads(text)
        except json.JSONDecodeError as exc:
            raise JobError(f"{source}: not valid JSON: {exc}") from None
        if not isinstance(value, list):
            raise JobError(f"{source}: a .json items file must hold a JSON array, not a {type(value).__name__}")
        items = value
    else:
        items = []
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                items.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise JobError(
                    f"{source}: line {number} is not a JSON value ({exc.msg}); "
                    "items files are JSONL (one JSON value per line) or a .json array"
                ) from None
    return check_items(items, source)


def check_items(items: list[Any], source: str = "items") -> list[Any]:
    if not items:
        raise JobError(f"{source}: no items")
    if len(items) > MAX_ITEMS:
        raise JobError(f"{source}: {len(items)} items exceed the limit of {MAX_ITEMS} per job")
    return items


def split(items: list[Any], batch_size: int) -> list[list[Any]]:
    """Consecutive batches of `batch_size` items (the last one may be shorter)."""
    if batch_size < 1:
        raise JobError(f"batch_size must be at least 1, not {batch_size}")
    batches = [items[start : start + batch_size] for start in range(0, len(items), batch_size)]
    if len(batches) > MAX_BATCHES:
        raise JobError(
            f"{len(items)} items in batches of {batch_size} make {len(batches)} batches, over the limit of "
            f"{MAX_BATCHES}: use a larger batch_size"
        )
    return batches


# --- the state machine ------------------------------------------------------------------------


class Progress(BaseModel):
    """A job's batches as the queue store counts them."""

    model_config = ConfigDict(frozen=True)

    in_queue: int
    in_progress: int
    completed: int
    failed: int


def to_start(jobs: list[Job]) -> list[Job]:
    """The pending jobs that may start now: the oldest one of each API that runs no job."""
    busy = {job.api for job in jobs if job.status in (JobStatus.RUNNING, JobStatus.STOPPING)}
    starting: list[Job] = []
    for job in sorted(jobs, key=lambda j: (j.created_at, j.id)):
        if job.status is JobStatus.PENDING and job.api not in busy:
            busy.add(job.api)
            starting.append(job)
    return starting


def start(job: Job, now: float) -> Job:
    return job.model_copy(update={"status": JobStatus.RUNNING, "started_at": now})


def finish(job: Job, status: JobStatus, now: float, error: str | None = None) -> Job:
    """End a job (cancel, timeout, failure, or its outcome once the hook ran)."""
    if job.status.finished:
        return job
    update: dict[str, Any] = {"status": status, "finished_at": now, "batches_in_progress": 0, "eta_s": None}
    if error is not None:
        update["error"] = error
    return job.model_copy(update=update)


def stop(job: Job, status: JobStatus, now: float, error: str) -> Job:
    """Cancel or time out a running job: `stopping` until its batches in flight have ended, then
    `status` (see `settle`). A pending job (no batch ran) settles at once too, in the same way."""
    if job.status.finished or job.status is JobStatus.STOPPING:
        return job
    update = {"status": JobStatus.STOPPING, "outcome": status, "error": error, "stop_requested_at": now}
    return job.model_copy(update={**update, "eta_s": None})


def batch_size_of(job: Job, index: int) -> int:
    return max(0, min(job.batch_size, job.total_items - index * job.batch_size))


def settle(job: Job, failed: list[FailedBatch], not_run_error: str, now: float) -> Job:
    """End a stopping job once none of its batches can still run: `failed` lists every batch that
    did not complete (those that never ran carry `not_run_error`); every other batch wrote its part
    file, so the counts are exact and match the sink."""
    if job.status is not JobStatus.STOPPING:
        return job
    real = sorted((b for b in failed if b.error != not_run_error), key=lambda b: b.index)
    failed_items = sum(batch_size_of(job, b.index) for b in failed)
    stopped = job.model_copy(
        update={
            "batches_done": job.total_batches - len(failed),
            "batches_failed": len(real),
            "items_done": job.total_items - failed_items,
            "failed_batches": real[:MAX_FAILED_LISTED],
        }
    )
    ended = finish(stopped, job.outcome or JobStatus.CANCELLED, now)
    return ended.model_copy(update={"outcome": None})


def outcome(done: int, failed: int) -> JobStatus:
    if failed == 0:
        return JobStatus.SUCCEEDED
    return JobStatus.FAILED if done == 0 else JobStatus.COMPLETED_WITH_FAILURES


def observe(job: Job, progress: Progress, failed_sizes: int, now: float) -> Job:
    """Record a running job's counts (`failed_sizes`: the items in failed batches), with its rate
    and ETA. Counts are not taken once the job has an outcome (the hook's request is in the queue too)."""
    if job.status is not JobStatus.RUNNING or job.outcome is not None:
        return job
    done = progress.completed
    finished = done + progress.failed == job.total_batches
    if finished:
        items_done = job.total_items - failed_sizes
    else:  # every batch but the last holds batch_size items
        items_done = min(done * job.batch_size, job.total_items - failed_sizes)
    elapsed = now - (job.started_at or now)
    rate = items_done / elapsed if elapsed > 0 and items_done else None
    remaining = job.total_items - items_done - failed_sizes
    eta = remaining / rate if rate and not finished else None
    return job.model_copy(
        update={
            "batches_done": done,
            "batches_failed": progress.failed,
            "batches_in_progress": progress.in_progress,
            "items_done": items_done,
            "items_per_s": None if rate is None else round(rate, 3),
            "eta_s": None if eta is None else round(eta, 1),
        }
    )


def advance(job: Job, now: float, hook_done: bool, hook_error: str | None, hook_grace_s: float) -> Job:
    """The next state of a running job after `observe`: timed out, waiting for its hook, or ended.

    Once every batch has finished the job gets its outcome and waits for `on_job_complete` to run
    (`hook_done`), at most `hook_grace_s`; then it ends with that outcome."""
    if job.status is not JobStatus.RUNNING:
        return job
    if job.outcome is None:
        if job.timeout_s is not None and job.started_at is not None and now - job.started_at >= job.timeout_s:
            return stop(
                job,
                JobStatus.TIMED_OUT,
                now,
                f"the job did not finish within its timeout of {job.timeout_s:g}s",
            )
        if job.batches_done + job.batches_failed < job.total_batches:
            return job
        job = job.model_copy(update={"outcome": outcome(job.batches_done, job.batches_failed), "hook_started_at": now})
    if hook_done or hook_error is not None:
        job = job.model_copy(update={"hook_error": hook_error})
    elif now - (job.hook_started_at or now) < hook_grace_s:
        return job
    else:
        job = job.model_copy(update={"hook_error": f"on_job_complete did not finish within {hook_grace_s:g}s"})
    assert job.outcome is not None
    error = None
    if job.outcome is JobStatus.FAILED:
        error = "every batch failed" + (
            f"; the last error: {job.failed_batches[0].error}" if job.failed_batches else ""
        )
    elif job.outcome is JobStatus.COMPLETED_WITH_FAILURES:
        error = f"{job.batches_failed} of {job.total_batches} batches failed (see failed_batches)"
    return finish(job, job.outcome, now, error)
