"""Batch jobs on the control plane: the job records (in the state database) and the job manager.

Submitting a job validates the request, reads and splits the items, and only then writes: every
batch in one `submit_many` (one transaction: all or nothing) into the job's own queue
(`<api>.job-<id>`), then the job record. A bad request leaves no record and no batch.

The controller calls `JobManager.step` on every tick. It starts the oldest pending job of each
batch API that runs none (one job per API at a time), counts each running job's batches in the
queue store, stops jobs that time out or are cancelled (settled once their workers are gone: see
`_settle`), and once every batch has finished queues one more request,
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
from collections.abc import Callable, Collection, Iterator, Mapping
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
    batch_size_of,
    check_items,
    finish,
    job_queue,
    observe,
    parse_items,
    settle,
    split,
    start,
    stop,
    to_start,
)
from cirrus.kinds import kind_of
from cirrus.spec import ApiSpec
from cirrus.store.base import NewRequest, QueueStore, Status
from cirrus.store.files import _fs, is_local, local_path, part_name, prepare_dir, read_bytes, remove_temporaries
from cirrus.wire import JobConfig, QueueConfig

log = logging.getLogger("cirrus.jobs")

MAX_ITEMS_BYTES = 1 << 30  # an items file larger than this is refused
HOOK_GRACE_S = 60.0  # extra time on_job_complete may take beyond the API's timeout_s
NOT_RUN = "not run: the job was stopped"  # the error of a stopped job's batches that never ran

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    api TEXT NOT NULL,
    status TEXT NOT NULL,
    created_at REAL NOT NULL,
    data TEXT NOT NULL              -- the whole Job as JSON
);
CREATE INDEX IF NOT EXISTS jobs_by_api ON jobs (api, created_at);
CREATE INDEX IF NOT EXISTS jobs_unfinished ON jobs (status) WHERE status IN ('pending', 'running', 'stopping');
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
        rows = self._db.fetchall(
            "SELECT data FROM jobs WHERE status IN ('pending', 'running', 'stopping') ORDER BY created_at"
        )
        return [Job.model_validate_json(str(data)) for (data,) in rows]


def remove_parts(sink: str, indexes: Collection[int]) -> int:
    """Delete the part files of batches `indexes` that a sink holds (one listing, then a delete
    per file found); returns how many. Errors are logged."""
    names = {part_name(index) for index in indexes}
    removed = 0
    try:
        if is_local(sink):
            for path in local_path(sink).glob("part-*.jsonl"):
                if path.name in names:
                    path.unlink(missing_ok=True)
                    removed += 1
            return removed
        fs, path_in_fs = _fs(sink)
        for name in fs.glob(f"{path_in_fs.rstrip('/')}/part-*.jsonl"):
            if name.rsplit("/", 1)[-1] in names:
                fs.rm(name)
                removed += 1
    except Exception:
        log.exception("removing the part files of unfinished batches from %s failed", sink)
    return removed


def _parts(sink: str) -> Iterator[bytes]:
    """The content of each part file in a job's sink, in order."""
    if is_local(sink):
        for path in sorted(local_path(sink).glob("part-*.jsonl")):
            yield path.read_bytes()
        return
    fs, path_in_fs = _fs(sink)
    for name in sorted(fs.glob(f"{path_in_fs.rstrip('/')}/part-*.jsonl")):
        yield fs.cat_file(name)


def failed_items(sink: str) -> dict[int, Any]:
    """{index: item} of the result lines with an `error` in a job's part files (the items that
    failed alone, in a batch that completed)."""
    failed: dict[int, Any] = {}
    for data in _parts(sink):
        for line in data.splitlines():
            row = json.loads(line) if line.strip() else {}
            if "error" in row and "index" in row:
                failed[int(row["index"])] = row.get("item")
    return failed


def new_job_id() -> str:
    return secrets.token_hex(6)


def batch_requests(job: Job, batches: list[list[Any]], indexes: list[list[int]] | None = None) -> list[NewRequest]:
    """The queue requests of a job's batches: id = the batch's index, body = {job, index, start,
    items} and, in a retry, `indexes`: each item's index in the original job's items."""

    def body(index: int, batch: list[Any]) -> dict[str, Any]:
        fields = {"job": job.id, "index": index, "start": index * job.batch_size, "items": batch}
        return fields if indexes is None else {**fields, "indexes": indexes[index]}

    return [
        NewRequest(
            api=job.queue,
            id=str(index),
            body=json.dumps(body(index, batch), separators=(",", ":")).encode(),
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
        return self._record(job, batches, None, default_sink)

    def _record(self, job: Job, batches: list[list[Any]], indexes: list[list[int]] | None, own_sink: bool) -> Job:
        """Write every batch of a new job at once, then its record (the sink is removed on failure
        when the job made it)."""
        try:
            self.queue_store.submit_many(batch_requests(job, batches, indexes), self.clock())
        except Exception:
            if own_sink:
                shutil.rmtree(job.sink, ignore_errors=True)
            raise
        self.store.save(job)
        return job

    def retry(self, spec: ApiSpec, job_id: str) -> Job:
        """A new job (`retry_of` = job_id) that runs again every batch of a finished job that did not
        complete (failed, or never ran because it was cancelled or timed out) and every item that
        failed alone, each with its index in the original items; its results go to
        `<sink>/retry-<new id>/`. Blocking (it reads the sink): call it off the event loop. JobError
        if the job has not ended or nothing failed."""
        job = self.get(job_id)
        if not job.status.finished:
            raise JobError(f"job {job_id} is {job.status.value}: retry it once it has ended")
        if not kind_of(spec.kind).runs_jobs:
            raise JobError(f"API {spec.name!r} is now kind {spec.kind}: jobs run on `kind: batch` APIs")
        again = self._failed_batch_items(job)
        if not again and job.items_done < job.total_items:
            raise JobError(f"job {job_id}'s failed batches are no longer in the queue store: it cannot be retried")
        again.update((i, item) for i, item in failed_items(job.sink).items() if i not in again)
        if not again:
            raise JobError(f"job {job_id} has no failed batches or items: nothing to retry")
        order = sorted(again)
        batches = split([again[i] for i in order], job.batch_size)
        indexes = [order[start : start + job.batch_size] for start in range(0, len(order), job.batch_size)]
        new_id = new_job_id()
        retry = Job(
            id=new_id,
            api=job.api,
            status=JobStatus.PENDING,
            created_at=self.clock(),
            batch_size=job.batch_size,
            workers=job.workers,
            timeout_s=job.timeout_s,
            max_attempts=job.max_attempts,
            config=job.config,
            sink=prepare_dir(f"{job.sink}/retry-{new_id}"),
            total_items=len(order),
            total_batches=len(batches),
            retry_of=job.id,
        )
        return self._record(retry, batches, indexes, True)

    def _failed_batch_items(self, job: Job) -> dict[int, Any]:
        """{index in the original items: item} of every batch of `job` that did not complete."""
        found: dict[int, Any] = {}
        for record in self.queue_store.dead_letters(job.queue, limit=job.total_batches + 1):
            if not record.id.isdigit() or record.body is None:
                continue
            batch = json.loads(record.body)
            items = list(batch["items"])
            indexes = batch.get("indexes") or range(batch["start"], batch["start"] + len(items))
            found.update(zip(indexes, items, strict=True))
        return found

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
        """Cancel a pending or running job; JobError if it already ended. A running job is `stopping`
        until its workers have finished the batches in flight (`step` then settles it); a pending
        one, which ran nothing, ends at once."""
        job = self.get(job_id)
        if job.status.finished:
            raise JobError(f"job {job_id} already ended: {job.status.value}")
        if job.status is JobStatus.RUNNING and job.outcome is not None:
            return self._end(job, JobStatus.CANCELLED, "cancelled")  # every batch ran: only the hook waits
        stopping = stop(job, JobStatus.CANCELLED, self.clock(), "cancelled")
        self._save(stopping)
        return self._settle(stopping) if job.status is JobStatus.PENDING else stopping

    def fail(self, job_id: str, error: str) -> None:
        job = self.active.get(job_id)
        if job is not None:
            log.warning("job %s of %s failed: %s", job.id, job.api, error)
            self.queue_store.fail_all(job.queue, error, self.clock())  # so a retry finds its batches
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

    def step(self, apis: Mapping[str, ApiSpec], working: Collection[str] = ()) -> None:
        """Advance every pending, running and stopping job; `apis`: the deployed batch APIs;
        `working`: the ids of the jobs that have worker replicas (stopping ones included)."""
        now = self.clock()
        for job in list(self.active.values()):
            if job.api not in apis:
                self._end(job, JobStatus.FAILED, f"the API {job.api!r} was deleted or is no longer kind batch")
        for job in to_start(list(self.active.values())):
            log.info("job %s of %s starts: %d batches, %d workers", job.id, job.api, job.total_batches, job.workers)
            self._save(start(job, now))
        for job in list(self.active.values()):
            try:
                if job.status is JobStatus.RUNNING:
                    self._advance(job, apis[job.api], now)
                elif job.status is JobStatus.STOPPING and self._stopped(job, apis[job.api], working, now):
                    self._settle(job)
            except Exception:
                log.exception("job %s: checking its progress failed", job.id)

    def _stopped(self, job: Job, spec: ApiSpec, working: Collection[str], now: float) -> bool:
        """Whether no batch of a stopping job can still write: its workers are gone (or, should one
        never go, its batches' time is up)."""
        grace = spec.concurrency.timeout_s + spec.queue.lease_s + HOOK_GRACE_S
        return job.id not in working or now - (job.stop_requested_at or now) >= grace

    def _settle(self, job: Job) -> Job:
        """End a stopping job: fail the batches that did not complete, remove any part file one of
        them left (a worker may write, then lose its lease), and count what completed."""
        now = self.clock()
        self.queue_store.fail_all(job.queue, NOT_RUN, now)
        failed = [
            FailedBatch(index=int(r.id), start=int(r.id) * job.batch_size, size=0, error=r.error)
            for r in self.queue_store.dead_letters(job.queue, limit=job.total_batches + 1)
            if r.id.isdigit()
        ]
        failed = [b.model_copy(update={"size": batch_size_of(job, b.index)}) for b in failed]
        if remove_parts(job.sink, {batch.index for batch in failed}):
            log.info("job %s: removed the part files of batches that did not complete", job.id)
        ended = settle(job, failed, NOT_RUN, now)
        self._save(ended)
        return ended

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
