"""Batch jobs on the control plane: the job records (in the state database) and the job manager.

Submitting a job validates the request, reads and splits the items, and only then writes: every
batch in one `submit_many` (one transaction: all or nothing) into the job's own queue
(`<api>.job-<id>`), then the job record. A bad request leaves no record and no batch.

The controller calls `JobManager.step` on every tick. It starts the oldest pending job of each
batch API that runs none (one job per API at a time), counts each running job's batches in the
queue store, ends jobs that time out, and once every batch has finished queues one more request,
`on-job-complete`, which a worker answers by calling the predictor's `on_job_complete(job)`. That
request is queued once (its id is fixed, so a second submit is refused) and delivered at most once
(`max_attempts: 1`), so the hook runs once, or not at all when its worker dies during it (then the
job records the hook's error). The controller asks `running(api)` how many workers an API needs,
and `launch` what they pull from.
"""

from __future__ import annotations

import json
import logging
import secrets
import shutil
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from cirrus.control.statedb import StateTables
from cirrus.jobs import (
    HOOK_ID,
    MAX_FAILED_LISTED,
    FailedBatch,
    Job,
    JobError,
    JobRequest,
    JobStatus,
    Progress,
    advance,
    check_items,
    finish,
    job_queue,
    observe,
    parse_items,
    split,
    start,
    to_start,
)
from cirrus.kinds import kind_of
from cirrus.spec import ApiSpec
from cirrus.store.base import NewRequest, QueueStore, Status
from cirrus.store.files import prepare_dir, read_bytes, remove_temporaries
from cirrus.wire import JobConfig, QueueConfig

log = logging.getLogger("cirrus.jobs")

MAX_ITEMS_BYTES = 1 << 30  # an items file larger than this is refused
HOOK_GRACE_S = 60.0  # extra time on_job_complete may take beyond the API's timeout_s

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    api TEXT NOT NULL,
    status TEXT NOT NULL,
    created_at REAL NOT NULL,
    data TEXT NOT NULL              -- the whole Job as JSON
);
CREATE INDEX IF NOT EXISTS jobs_by_api ON jobs (api, created_at);
CREATE INDEX IF NOT EXISTS jobs_unfinished ON jobs (status) WHERE status IN ('pending', 'running');
"""


class JobNotFound(LookupError):
    pass


class JobStore(StateTables):
    """Job records in the control plane's state database (beside the APIs and revisions)."""

    SCHEMA = _SCHEMA

    def save(self, job: Job) -> None:
        self._db.execute(
            "INSERT INTO jobs (id, api, status, created_at, data) VALUES (?, ?, ?, ?, ?) "
            "ON CONFLICT(id) DO UPDATE SET status = excluded.status, data = excluded.data",
            (job.id, job.api, job.status.value, job.created_at, job.model_dump_json()),
        )

    def get(self, job_id: str) -> Job | None:
        rows = self._db.fetchall("SELECT data FROM jobs WHERE id = ?", (job_id,))
        return None if not rows else Job.model_validate_json(str(rows[0][0]))

    def recent(self, api: str | None = None, limit: int = 1000) -> list[Job]:
        """Newest first."""
        if api is None:
            rows = self._db.fetchall("SELECT data FROM jobs ORDER BY created_at DESC LIMIT ?", (limit,))
        else:
            rows = self._db.fetchall(
                "SELECT data FROM jobs WHERE api = ? ORDER BY created_at DESC LIMIT ?", (api, limit)
            )
        return [Job.model_validate_json(str(data)) for (data,) in rows]

    def unfinished(self) -> list[Job]:
        rows = self._db.fetchall("SELECT data FROM jobs WHERE status IN ('pending', 'running') ORDER BY created_at")
        return [Job.model_validate_json(str(data)) for (data,) in rows]


def new_job_id() -> str:
    return secrets.token_hex(6)


def batch_requests(job: Job, batches: list[list[Any]]) -> list[NewRequest]:
    """The queue requests of a job's batches: id = the batch's index, body = {job, index, start, items}."""
    return [
        NewRequest(
            api=job.queue,
            id=str(index),
            body=json.dumps(
                {"job": job.id, "index": index, "start": index * job.batch_size, "items": batch},
                separators=(",", ":"),
            ).encode(),
            content_type="application/json",
            max_attempts=job.max_attempts,
        )
        for index, batch in enumerate(batches)
    ]


class JobManager:
    def __init__(
        self,
        store: JobStore,
        queue_store: QueueStore,
        results_dir: Path,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.queue_store = queue_store
        self.results_dir = results_dir  # default sinks: <results_dir>/<job id>/
        self.clock = clock
        self.active: dict[str, Job] = {job.id: job for job in store.unfinished()}
        self._failed_items: dict[str, int] = {}  # job id -> items in its failed batches

    # --- submitting ----------------------------------------------------------------------

    def submit(self, spec: ApiSpec, request: JobRequest) -> Job:
        """Validate, read and split the items, write every batch at once, then record the job.
        Blocking (it reads files and writes the stores): call it off the event loop. JobError or
        FileError on bad input, with nothing written."""
        if not kind_of(spec.kind).runs_jobs:
            raise JobError(f"API {spec.name!r} is kind {spec.kind}: jobs run on `kind: batch` APIs")
        if request.items is not None:
            items = check_items(request.items)
        else:
            assert request.items_url is not None
            items = parse_items(read_bytes(request.items_url, MAX_ITEMS_BYTES), request.items_url)
        batches = split(items, request.batch_size)
        job_id = new_job_id()
        default_sink = request.sink is None
        sink = prepare_dir(str(self.results_dir / job_id) if request.sink is None else request.sink)
        job = Job(
            id=job_id,
            api=spec.name,
            status=JobStatus.PENDING,
            created_at=self.clock(),
            batch_size=request.batch_size,
            workers=request.workers,
            timeout_s=request.timeout_s,
            max_attempts=request.max_attempts or spec.queue.max_attempts,
            config=request.config,
            sink=sink,
            total_items=len(items),
            total_batches=len(batches),
        )
        try:
            self.queue_store.submit_many(batch_requests(job, batches), self.clock())
        except Exception:
            if default_sink:
                shutil.rmtree(sink, ignore_errors=True)
            raise
        self.store.save(job)
        return job

    def track(self, job: Job) -> None:
        """Start watching a submitted job (on the event loop, after `submit`)."""
        self.active[job.id] = job

    # --- reading and cancelling ------------------------------------------------------------

    def get(self, job_id: str) -> Job:
        job = self.active.get(job_id) or self.store.get(job_id)
        if job is None:
            raise JobNotFound(f"no job with id {job_id!r}")
        return job

    def recent(self, api: str | None = None) -> list[Job]:
        """Jobs, newest first."""
        return [self.active.get(job.id, job) for job in self.store.recent(api)]

    def running(self, api: str) -> Job | None:
        return next((j for j in self.active.values() if j.api == api and j.status is JobStatus.RUNNING), None)

    def cancel(self, job_id: str) -> Job:
        """Cancel a pending or running job (its workers stop); JobError if it already ended."""
        job = self.get(job_id)
        if job.status.finished:
            raise JobError(f"job {job_id} already ended: {job.status.value}")
        return self._end(job, JobStatus.CANCELLED, "cancelled")

    def fail(self, job_id: str, error: str) -> None:
        job = self.active.get(job_id)
        if job is not None:
            log.warning("job %s of %s failed: %s", job.id, job.api, error)
            self._end(job, JobStatus.FAILED, error)

    def _end(self, job: Job, status: JobStatus, error: str) -> Job:
        ended = finish(job, status, self.clock(), error)
        self._save(ended)
        return ended

    def _save(self, job: Job) -> None:
        self.store.save(job)
        if job.status.finished:
            self.active.pop(job.id, None)
            self._failed_items.pop(job.id, None)
            remove_temporaries(job.sink)
            log.info("job %s of %s ended: %s", job.id, job.api, job.status.value)
        else:
            self.active[job.id] = job

    # --- what the workers run ------------------------------------------------------------

    def launch(self, job_id: str, spec: ApiSpec, store_url: str) -> tuple[QueueConfig, dict[str, Any]]:
        """A worker's queue settings, and the job's config (merged over the predictor's)."""
        job = self.get(job_id)
        queue = QueueConfig(
            store_url=store_url,
            lease_s=spec.queue.lease_s,
            timeout_s=spec.concurrency.timeout_s,
            max_concurrency=spec.concurrency.inference_slots,  # lease only what can run now
            queue_name=job_queue(job.api, job.id),
            job=JobConfig(job_id=job.id, sink=job.sink),
        )
        return queue, dict(job.config)

    # --- the loop --------------------------------------------------------------------------

    def step(self, apis: Mapping[str, ApiSpec]) -> None:
        """Advance every pending and running job; `apis`: the deployed batch APIs."""
        now = self.clock()
        for job in list(self.active.values()):
            if job.api not in apis:
                self._end(job, JobStatus.FAILED, f"the API {job.api!r} was deleted or is no longer kind batch")
        for job in to_start(list(self.active.values())):
            log.info("job %s of %s starts: %d batches, %d workers", job.id, job.api, job.total_batches, job.workers)
            self._save(start(job, now))
        for job in list(self.active.values()):
            if job.status is JobStatus.RUNNING:
                try:
                    self._advance(job, apis[job.api], now)
                except Exception:
                    log.exception("job %s: checking its progress failed", job.id)

    def _advance(self, job: Job, spec: ApiSpec, now: float) -> None:
        queue = self.queue_store
        hook_done, hook_error = False, None
        if job.outcome is None:
            counts = queue.counts(job.queue)
            progress = Progress(
                in_queue=counts.in_queue,
                in_progress=counts.in_progress,
                completed=counts.completed,
                failed=counts.failed,
            )
            if counts.failed != job.batches_failed or job.id not in self._failed_items:
                job = self._record_failures(job, counts.failed)
            job = observe(job, progress, self._failed_items.get(job.id, 0), now)
        else:
            record = queue.get(job.queue, HOOK_ID)
            if record is not None and record.status is Status.COMPLETED:
                hook_done = True
            elif record is not None and record.status is Status.FAILED:
                hook_error = record.error or "on_job_complete failed"
        grace = spec.concurrency.timeout_s + spec.queue.lease_s + HOOK_GRACE_S
        advanced = advance(job, now, hook_done, hook_error, grace)
        if advanced.outcome is not None and job.outcome is None:
            hook = NewRequest(
                api=job.queue,
                id=HOOK_ID,
                body=json.dumps(advanced.summary()).encode(),
                content_type="application/json",
                max_attempts=1,
            )
            try:
                queue.submit(hook, now)
            except ValueError:
                pass  # queued already (before a daemon restart): it runs once
        if advanced != self.active.get(job.id):
            self._save(advanced)

    def _record_failures(self, job: Job, failed: int) -> Job:
        records = self.queue_store.dead_letters(job.queue, limit=max(failed, 1))
        listed: list[FailedBatch] = []
        failed_items = 0
        for record in records:
            if record.id == HOOK_ID or not record.id.isdigit():
                continue
            index = int(record.id)
            start_at = index * job.batch_size
            size = min(job.batch_size, job.total_items - start_at)
            failed_items += size
            if len(listed) < MAX_FAILED_LISTED:
                listed.append(FailedBatch(index=index, start=start_at, size=size, error=record.error))
        self._failed_items[job.id] = failed_items
        return job.model_copy(update={"failed_batches": sorted(listed, key=lambda b: b.index)})
