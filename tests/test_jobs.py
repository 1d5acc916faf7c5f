"""Batch jobs without processes: items parsing and splitting, request validation, the job state
machine on an injected clock, result encoding and sinks, the job manager over each queue store
backend (workers played by the test), and the controller sizing a batch API from its job."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Collection
from pathlib import Path
from typing import Any

import pytest
from store_backends import store_fixtures

from cirrus.control.controller import Controller
from cirrus.control.jobs import JobManager, JobNotFound, JobStore, failed_items, remove_parts
from cirrus.control.store import Store
from cirrus.jobs import (
    HOOK_ID,
    MAX_BATCHES,
    FailedBatch,
    Job,
    JobError,
    JobRequest,
    JobStatus,
    Progress,
    advance,
    finish,
    job_queue,
    observe,
    parse_items,
    parse_request,
    settle,
    split,
    start,
    stop,
    to_start,
)
from cirrus.replica.job import BatchFailed, encode_results
from cirrus.spec import ApiSpec, Deployment, parse_specs
from cirrus.store.base import Counts, NewRequest, QueueStore
from cirrus.store.files import FileError, part_name, prepare_dir, read_bytes, remove_temporaries, write_file
from cirrus.testing import FakeGateway, FakeRuntime
from cirrus.types import ReplicaState

store_target, store = store_fixtures()


# --- items and requests ---------------------------------------------------------------------------


def test_jsonl_items_one_value_per_line() -> None:
    data = b'{"a": 1}\n\n"text"\n[1, 2]\n3.5\nnull\n'
    assert parse_items(data, "items.jsonl") == [{"a": 1}, "text", [1, 2], 3.5, None]
    assert parse_items(b"[1, 2]\n", "items.jsonl") == [[1, 2]]  # a JSONL line holding an array is one item
    assert parse_items(b"\xef\xbb\xbf1\n2", "items.txt") == [1, 2]  # a BOM is tolerated


def test_json_items_must_be_one_array() -> None:
    assert parse_items(b'[1, {"b": 2}]', "items.JSON") == [1, {"b": 2}]
    with pytest.raises(JobError, match="must hold a JSON array, not a dict"):
        parse_items(b'{"a": 1}', "items.json")
    with pytest.raises(JobError, match="not valid JSON"):
        parse_items(b"[1,", "items.json")


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"1\n{oops\n", "line 2 is not a JSON value"),
        (b"", "no items"),
        (b"\n \n", "no items"),
        (b"\xff\xfe", "not UTF-8"),
    ],
)
def test_bad_items(data: bytes, message: str) -> None:
    with pytest.raises(JobError, match=message):
        parse_items(data, "items.jsonl")


def test_split_keeps_order_and_bounds_the_batch_count() -> None:
    assert split(list(range(7)), 3) == [[0, 1, 2], [3, 4, 5], [6]]
    assert split([1], 10) == [[1]]
    with pytest.raises(JobError, match="batch_size must be at least 1"):
        split([1], 0)
    with pytest.raises(JobError, match="use a larger batch_size"):
        split([0] * (MAX_BATCHES + 1), 1)


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"items": [1], "batch_size": 0}, "batch_size: Input should be greater than or equal to 1"),
        ({"items": [1], "batch_size": 1, "workers": 0}, "workers: Input should be greater than or equal to 1"),
        ({"items": [1], "items_url": "x.jsonl", "batch_size": 1}, "not both"),
        ({"batch_size": 1}, "either inline"),
        ({"items_url": " ", "batch_size": 1}, "items_url is empty"),
        ({"items": [1]}, "batch_size: Field required"),
        ({"items": [1], "batch_size": 1, "timeout_s": 0}, "timeout_s: Input should be greater than 0"),
        ({"items": [1], "batch_size": 1, "max_attempts": 0}, "max_attempts:"),
        ({"items": [1], "batch_size": 1, "typo": 1}, "typo: unknown field; allowed: items, items_url"),
        ("not an object", "must be a JSON object"),
    ],
)
def test_bad_job_requests(raw: Any, message: str) -> None:
    with pytest.raises(JobError, match=message):
        parse_request(raw)


def test_good_job_request_defaults() -> None:
    request = parse_request({"items": [1, 2], "batch_size": 2})
    assert (request.workers, request.timeout_s, request.max_attempts, request.config, request.sink) == (
        1,
        None,
        None,
        {},
        None,
    )


# --- the state machine ------------------------------------------------------------------------


def _job(**fields: Any) -> Job:
    values: dict[str, Any] = {
        "id": "j1",
        "api": "crunch",
        "status": JobStatus.RUNNING,
        "created_at": 100.0,
        "started_at": 100.0,
        "batch_size": 10,
        "workers": 2,
        "max_attempts": 3,
        "sink": "/tmp/sink",
        "total_items": 95,
        "total_batches": 10,
    }
    values.update(fields)
    return Job(**values)


def test_to_start_runs_one_job_per_api_oldest_first() -> None:
    jobs = [
        _job(id="b", status=JobStatus.PENDING, created_at=2.0),
        _job(id="a", status=JobStatus.PENDING, created_at=1.0),
        _job(id="c", api="other", status=JobStatus.PENDING, created_at=3.0),
        _job(id="d", api="busy", status=JobStatus.RUNNING),
        _job(id="e", api="busy", status=JobStatus.PENDING),
        _job(id="f", api="done", status=JobStatus.SUCCEEDED),
    ]
    assert [j.id for j in to_start(jobs)] == ["a", "c"]
    started = start(jobs[1], 50.0)
    assert (started.status, started.started_at) == (JobStatus.RUNNING, 50.0)


def test_progress_rate_and_eta() -> None:
    job = observe(_job(), Progress(in_queue=5, in_progress=1, completed=4, failed=0), 0, now=104.0)
    assert (job.batches_done, job.batches_in_progress, job.items_done) == (4, 1, 40)
    assert job.items_per_s == 10.0 and job.eta_s == 5.5
    assert advance(job, 104.0, False, None, 60) == job  # still running


def test_all_batches_done_waits_for_the_hook_then_succeeds() -> None:
    job = observe(_job(), Progress(in_queue=0, in_progress=0, completed=10, failed=0), 0, now=110.0)
    assert job.items_done == 95  # the last batch is short: exact once everything finished
    waiting = advance(job, 110.0, False, None, 60)
    assert (waiting.status, waiting.outcome, waiting.hook_started_at) == (JobStatus.RUNNING, JobStatus.SUCCEEDED, 110)
    assert waiting.summary()["status"] == "succeeded"
    # Counts are frozen while the hook runs (its request sits in the same queue).
    assert observe(waiting, Progress(in_queue=1, in_progress=0, completed=10, failed=0), 0, 111.0) == waiting
    done = advance(waiting, 112.0, True, None, 60)
    assert (done.status, done.finished_at, done.error, done.hook_error) == (JobStatus.SUCCEEDED, 112.0, None, None)


def test_failures_and_hook_problems() -> None:
    some = observe(_job(), Progress(in_queue=0, in_progress=0, completed=8, failed=2), 15, now=110.0)
    assert some.items_done == 80
    ended = advance(advance(some, 110.0, False, None, 60), 111.0, False, "on_job_complete raised X", 60)
    assert ended.status is JobStatus.COMPLETED_WITH_FAILURES and ended.hook_error == "on_job_complete raised X"
    assert ended.error == "2 of 10 batches failed (see failed_batches)"
    every = observe(_job(), Progress(in_queue=0, in_progress=0, completed=0, failed=10), 95, now=110.0)
    waiting = advance(every, 110.0, False, None, 60)
    assert advance(waiting, 169.0, False, None, 60).status is JobStatus.RUNNING
    gave_up = advance(waiting, 170.0, False, None, 60)
    assert gave_up.status is JobStatus.FAILED and "did not finish within 60s" in (gave_up.hook_error or "")


def test_timeout_and_finish() -> None:
    job = _job(timeout_s=30.0, batches_done=3)
    assert advance(job, 129.9, False, None, 60).status is JobStatus.RUNNING
    stopping = advance(job, 130.0, False, None, 60)  # first the batches in flight end ...
    assert (stopping.status, stopping.outcome, stopping.stop_requested_at) == (
        JobStatus.STOPPING,
        JobStatus.TIMED_OUT,
        130.0,
    )
    assert "timeout of 30s" in (stopping.error or "") and not stopping.status.finished
    assert stop(stopping, JobStatus.CANCELLED, 131.0, "cancelled") == stopping  # stopped once
    # ... then the job is counted from the batches that did not complete: 5 completed (the short
    # last one, 5 items, among them), 1 failed on its own, 4 never ran.
    failed = [FailedBatch(index=1, start=10, size=10, error="boom")] + [
        FailedBatch(index=i, start=10 * i, size=10, error="not run") for i in (2, 3, 4, 5)
    ]
    timed_out = settle(stopping, failed, "not run", 140.0)
    assert (timed_out.status, timed_out.finished_at, timed_out.error) == (
        JobStatus.TIMED_OUT,
        140.0,
        stopping.error,
    )
    assert (timed_out.batches_done, timed_out.batches_failed, timed_out.items_done) == (5, 1, 45)
    assert [b.index for b in timed_out.failed_batches] == [1]
    assert finish(timed_out, JobStatus.CANCELLED, 200.0) == timed_out  # an ended job stays ended
    assert all(s.finished for s in JobStatus if s not in (JobStatus.PENDING, JobStatus.RUNNING, JobStatus.STOPPING))


# --- results and sinks --------------------------------------------------------------------------


def test_encode_results_one_line_per_item() -> None:
    data = encode_results(10, ["a", "b"], [{"n": 1}, 2])
    assert [json.loads(line) for line in data.splitlines()] == [
        {"index": 10, "item": "a", "result": {"n": 1}},
        {"index": 11, "item": "b", "result": 2},
    ]
    with pytest.raises(BatchFailed, match="returned 1 results for 2 items"):
        encode_results(0, [1, 2], [1])
    with pytest.raises(BatchFailed, match="not a list"):
        encode_results(0, [1], {"a": 1})

    # An exception in the list fails that item only: its line carries the error instead of a result.
    data = encode_results(0, [1, 2, 3], [10, ValueError("bad"), 30])
    assert [json.loads(line) for line in data.splitlines()] == [
        {"index": 0, "item": 1, "result": 10},
        {"index": 1, "item": 2, "error": "ValueError: bad"},
        {"index": 2, "item": 3, "result": 30},
    ]
    # A retry's batch keeps each item's index in the original job.
    data = encode_results(0, ["x", "y"], [1, 2], indexes=[7, 42])
    assert [json.loads(line)["index"] for line in data.splitlines()] == [7, 42]


def test_local_sink_writes_whole_files(tmp_path: Path) -> None:
    sink = prepare_dir(str(tmp_path / "deep" / "sink"))
    write_file(sink, part_name(3), b"old\n")
    write_file(sink, part_name(3), b"new\n")  # a batch delivered again replaces its file
    assert (Path(sink) / "part-000003.jsonl").read_bytes() == b"new\n"
    (Path(sink) / ".part-000004.jsonl.dead.tmp").write_bytes(b"half")  # a killed writer's leftover
    assert remove_temporaries(sink) == 1
    assert sorted(p.name for p in Path(sink).iterdir()) == ["part-000003.jsonl"]
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(FileError, match="cannot create the results directory"):
        prepare_dir(str(blocker / "sub"))


def test_fsspec_urls_read_and_write() -> None:
    import fsspec

    with fsspec.open("memory://cirrus-test/items.jsonl", "wb") as handle:
        handle.write(b"1\n2\n")
    assert read_bytes("memory://cirrus-test/items.jsonl", 100) == b"1\n2\n"
    sink = prepare_dir("memory://cirrus-test/out/")
    write_file(sink, part_name(0), b"x\n")
    assert read_bytes(f"{sink}/part-000000.jsonl", 100) == b"x\n"
    with pytest.raises(FileError, match="no such file"):
        read_bytes("memory://cirrus-test/missing.jsonl", 100)
    with pytest.raises(FileError, match="larger than the limit of 3 bytes"):
        read_bytes("memory://cirrus-test/items.jsonl", 3)


@pytest.mark.parametrize("remote", [False, True])
def test_sink_parts_are_read_for_failed_items_and_removed(tmp_path: Path, remote: bool) -> None:
    sink = prepare_dir("memory://cirrus-parts/out" if remote else str(tmp_path / "out"))
    write_file(sink, part_name(0), b'{"index": 0, "item": "a", "result": 1}\n{"index": 1, "item": "b", "error": "E"}\n')
    write_file(sink, part_name(1), b'{"index": 2, "item": "c", "error": "E"}\n')
    assert failed_items(sink) == {1: "b", 2: "c"}
    assert remove_parts(sink, {1, 7}) == 1
    assert failed_items(sink) == {1: "b"}


def test_a_remote_filesystem_s_own_errors_are_file_errors() -> None:
    """A filesystem's errors that are no OSError (botocore's EndpointConnectionError for an S3 endpoint
    it cannot reach) are bad input too: FileError (a 400 saying why), not an internal error."""
    import fsspec
    from fsspec.implementations.memory import MemoryFileSystem

    class Unreachable(Exception):
        pass

    class UnreachableFileSystem(MemoryFileSystem):
        protocol = "cirrus-unreachable"

        def makedirs(self, path: str, exist_ok: bool = False) -> None:
            raise Unreachable('Could not connect to the endpoint URL: "https://bucket.example/"')

        def _open(self, path: str, mode: str = "rb", **kwargs: Any) -> Any:
            raise Unreachable("Could not connect")

    fsspec.register_implementation("cirrus-unreachable", UnreachableFileSystem, clobber=True)
    with pytest.raises(FileError, match="cannot create the results location: Unreachable: Could not connect to"):
        prepare_dir("cirrus-unreachable://bucket/out")
    with pytest.raises(FileError, match=r"bucket/items\.jsonl: cannot read: Unreachable"):
        read_bytes("cirrus-unreachable://bucket/items.jsonl", 100)


# --- the queue store's counts ---------------------------------------------------------------------


def test_counts_by_status(store: QueueStore) -> None:
    requests = [NewRequest(api="q.job-1", id=str(i), body=b"{}", content_type="application/json") for i in range(4)]
    store.submit_many([*requests, NewRequest(api="other", id="0", body=b"", content_type="x")], 1.0)
    assert store.counts("q.job-1") == Counts(in_queue=4, in_progress=0, completed=0, failed=0)
    first, second, _ = store.lease("q.job-1", "w", 3, 30.0, 2.0)
    assert store.complete(first, b"", "application/json", 200, 3.0)
    assert store.fail(second, "boom", False, 3.0)
    assert store.counts("q.job-1") == Counts(in_queue=1, in_progress=1, completed=1, failed=1)
    assert store.counts("nothing") == Counts(in_queue=0, in_progress=0, completed=0, failed=0)


# --- the job manager, workers played by the test ------------------------------------------------


def _spec(**fields: Any) -> ApiSpec:
    [spec] = parse_specs({"name": "crunch", "kind": "batch", "predictor": {"path": "p.py"}, **fields})
    return spec


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _work(store: QueueStore, job: Job, clock: Clock, fail: Collection[int] = ()) -> list[int]:
    """Play a worker: lease everything of the job's queue, complete it (or fail `fail` batches)."""
    seen = []
    for lease in store.lease(job.queue, "w", 1000, 30.0, clock.now):
        if lease.id == HOOK_ID:
            seen.append(-1)
        elif int(lease.id) in fail:
            store.fail(lease, f"batch {lease.id} broke", True, clock.now)
        else:
            seen.append(json.loads(lease.body)["index"])
            store.complete(lease, b"", "application/json", 200, clock.now)
    return seen


def test_manager_runs_a_job_to_its_end(store: QueueStore, tmp_path: Path) -> None:
    clock = Clock()
    jobs = JobManager(JobStore(tmp_path / "state.db"), store, tmp_path / "jobs", clock=clock)
    spec = _spec(queue={"max_attempts": 2})
    job = jobs.submit(spec, JobRequest(items=list(range(25)), batch_size=10, workers=5))
    jobs.track(job)
    assert (job.status, job.total_batches, job.max_attempts, job.sink) == (
        JobStatus.PENDING,
        3,
        2,
        str((tmp_path / "jobs" / job.id).resolve()),
    )
    assert json.loads(store.lease(job.queue, "peek", 1, 0.5, 0.0)[0].body) == {
        "job": job.id,
        "index": 0,
        "start": 0,
        "items": list(range(10)),
    }
    clock.now += 1
    jobs.step({"crunch": spec})
    running = jobs.running("crunch")
    assert running is not None and running.started_at == clock.now
    queue_config, config = jobs.launch(job.id, spec, "sqlite:///q.db")
    assert queue_config.queue_name == job_queue("crunch", job.id) and queue_config.job is not None
    assert queue_config.max_concurrency == spec.concurrency.inference_slots and config == {}

    clock.now += 40  # the peeked lease expired: it comes back
    assert sorted(_work(store, job, clock, fail={2})) == [0, 1]
    _work(store, job, clock, fail={2})  # second and last attempt of batch 2
    jobs.step({"crunch": spec})
    waiting = jobs.get(job.id)
    assert (waiting.status, waiting.outcome, waiting.batches_done, waiting.batches_failed) == (
        JobStatus.RUNNING,
        JobStatus.COMPLETED_WITH_FAILURES,
        2,
        1,
    )
    assert [(b.index, b.start, b.size, b.error) for b in waiting.failed_batches] == [(2, 20, 5, "batch 2 broke")]
    assert waiting.items_done == 20
    hook = store.lease(job.queue, "w", 10, 30.0, clock.now)
    assert [lease.id for lease in hook] == [HOOK_ID] and hook[0].attempt == 1
    assert json.loads(hook[0].body)["status"] == "completed_with_failures"
    jobs.step({"crunch": spec})
    assert jobs.get(job.id).status is JobStatus.RUNNING  # the hook has not answered yet
    store.complete(hook[0], b"", "application/json", 200, clock.now)
    jobs.step({"crunch": spec})
    ended = jobs.get(job.id)
    assert ended.status is JobStatus.COMPLETED_WITH_FAILURES and ended.finished_at == clock.now
    assert jobs.running("crunch") is None and jobs.active == {}
    # The record survives a restart of the daemon.
    reopened = JobManager(JobStore(tmp_path / "state.db"), store, tmp_path / "jobs", clock=clock)
    assert reopened.get(job.id) == ended and reopened.active == {}


def test_manager_queues_jobs_per_api_cancels_and_forgets_deleted_apis(store: QueueStore, tmp_path: Path) -> None:
    clock = Clock()
    jobs = JobManager(JobStore(tmp_path / "state.db"), store, tmp_path / "jobs", clock=clock)
    spec = _spec()
    first = jobs.submit(spec, JobRequest(items=[1, 2], batch_size=1))
    clock.now += 1
    second = jobs.submit(spec, JobRequest(items=[3], batch_size=1))
    for job in (first, second):
        jobs.track(job)
    jobs.step({"crunch": spec})
    assert [(j.id, j.status) for j in jobs.recent()] == [
        (second.id, JobStatus.PENDING),
        (first.id, JobStatus.RUNNING),
    ]
    stopping = jobs.cancel(first.id)
    assert stopping.status is JobStatus.STOPPING and stopping.error == "cancelled"
    assert jobs.running("crunch") is None  # its workers are stopped
    jobs.step({"crunch": spec}, working={first.id})  # one is still finishing its batch
    assert [j.status for j in jobs.recent()] == [JobStatus.PENDING, JobStatus.STOPPING]
    jobs.step({"crunch": spec})  # its workers are gone
    cancelled = jobs.get(first.id)
    assert cancelled.status is JobStatus.CANCELLED and cancelled.error == "cancelled"
    assert (cancelled.batches_done, cancelled.batches_failed, cancelled.items_done) == (0, 0, 0)
    with pytest.raises(JobError, match="already ended: cancelled"):
        jobs.cancel(first.id)
    with pytest.raises(JobNotFound):
        jobs.get("nope")
    jobs.step({"crunch": spec})
    assert jobs.get(second.id).status is JobStatus.RUNNING  # the next job of the API starts
    jobs.step({})  # the API was deleted
    gone = jobs.get(second.id)
    assert gone.status is JobStatus.FAILED and "was deleted" in (gone.error or "")


def _finish_batch(store: QueueStore, job: Job, lease: Any, clock: Clock, complete: bool = True) -> None:
    """A worker's part: write the batch's part file (every third item fails alone), then complete."""
    batch = json.loads(lease.body)
    rows = [
        {"index": i, "item": item, **({"error": "ValueError: bad"} if item % 3 == 0 else {"result": item})}
        for i, item in zip(batch.get("indexes") or range(batch["start"], 99), batch["items"], strict=False)
    ]
    write_file(job.sink, part_name(batch["index"]), "".join(json.dumps(r) + "\n" for r in rows).encode())
    if complete:
        store.complete(lease, b"", "application/json", 200, clock.now)


def _sink_rows(sink: str) -> list[dict[str, Any]]:
    return [
        json.loads(line) for part in sorted(Path(sink).glob("part-*.jsonl")) for line in part.read_text().splitlines()
    ]


def test_a_cancelled_job_counts_what_its_sink_holds_and_a_retry_runs_the_rest(
    store: QueueStore, tmp_path: Path
) -> None:
    clock = Clock()
    jobs = JobManager(JobStore(tmp_path / "state.db"), store, tmp_path / "jobs", clock=clock)
    spec = _spec()
    job = jobs.submit(spec, JobRequest(items=list(range(1, 13)), batch_size=2, workers=3))
    jobs.track(job)
    jobs.step({"crunch": spec})
    [first] = store.lease(job.queue, "w1", 1, 30.0, clock.now)
    _finish_batch(store, job, first, clock)
    in_flight = store.lease(job.queue, "w2", 2, 30.0, clock.now)
    assert jobs.cancel(job.id).status is JobStatus.STOPPING
    with pytest.raises(JobError, match="is stopping: retry it once it has ended"):
        jobs.retry(spec, job.id)
    jobs.step({"crunch": spec}, working={job.id})
    assert jobs.get(job.id).status is JobStatus.STOPPING  # its batches in flight may still write
    _finish_batch(store, job, in_flight[0], clock)  # finished after the cancel: counted
    _finish_batch(store, job, in_flight[1], clock, complete=False)  # its worker died before completing
    clock.now += 1
    jobs.step({"crunch": spec})
    cancelled = jobs.get(job.id)
    assert cancelled.status is JobStatus.CANCELLED and cancelled.finished_at == clock.now
    assert (cancelled.batches_done, cancelled.batches_failed, cancelled.items_done) == (2, 0, 4)
    assert len(_sink_rows(job.sink)) == cancelled.items_done  # the dead worker's part was removed

    # The retry runs the batches that never ran and the items that failed alone (3 of the 4 done).
    retry = jobs.retry(spec, job.id)
    jobs.track(retry)
    assert (retry.retry_of, retry.status, retry.batch_size) == (job.id, JobStatus.PENDING, 2)
    assert retry.sink == f"{job.sink}/retry-{retry.id}" and Path(retry.sink).is_dir()
    assert retry.total_items == 9 and retry.total_batches == 5
    jobs.step({"crunch": spec})
    leases = store.lease(retry.queue, "w", 10, 30.0, clock.now)
    bodies = [json.loads(lease.body) for lease in leases]
    assert [i for b in bodies for i in b["indexes"]] == [2, *range(4, 12)]
    assert [i for b in bodies for i in b["items"]] == [3, *range(5, 13)]
    with pytest.raises(JobError, match="has no failed batches or items"):
        jobs.retry(spec, _ended_job_without_failures(jobs, store, spec, clock).id)
    with pytest.raises(JobNotFound):
        jobs.retry(spec, "nope")


def _ended_job_without_failures(jobs: JobManager, store: QueueStore, spec: ApiSpec, clock: Clock) -> Job:
    job = jobs.submit(spec, JobRequest(items=[1, 2], batch_size=2))
    for lease in store.lease(job.queue, "w", 1, 30.0, clock.now):
        store.complete(lease, b"", "application/json", 200, clock.now)
    ended = finish(job.model_copy(update={"batches_done": 1, "items_done": 2}), JobStatus.SUCCEEDED, clock.now)
    jobs.store.save(ended)
    return ended


def test_manager_refuses_bad_jobs_before_writing_anything(store: QueueStore, tmp_path: Path) -> None:
    jobs = JobManager(JobStore(tmp_path / "state.db"), store, tmp_path / "jobs")
    with pytest.raises(JobError, match="kind realtime"):
        jobs.submit(_spec(kind="realtime"), JobRequest(items=[1], batch_size=1))
    with pytest.raises(FileError, match="no such file"):
        jobs.submit(_spec(), JobRequest(items_url=str(tmp_path / "missing.jsonl"), batch_size=1))
    with pytest.raises(JobError, match="no items"):
        jobs.submit(_spec(), JobRequest(items=[], batch_size=1))
    blocker = tmp_path / "blocker"
    blocker.write_text("")
    with pytest.raises(FileError, match="cannot create the results directory"):
        jobs.submit(_spec(), JobRequest(items=[1], batch_size=1, sink=str(blocker / "out")))
    assert jobs.recent() == [] and not (tmp_path / "jobs").exists()


# --- the controller sizes a batch API by its running job ----------------------------------------


def test_controller_runs_the_jobs_workers_and_stops_them(tmp_path: Path) -> None:
    async def scenario() -> None:
        from cirrus.store.sqlite import SqliteQueueStore

        queue = SqliteQueueStore(tmp_path / "queue.db")
        jobs = JobManager(JobStore(tmp_path / "state.db"), queue, tmp_path / "jobs")
        runtime, gateway = FakeRuntime(tmp_path / "logs"), FakeGateway()
        store = Store(tmp_path / "state.db")
        controller = Controller(
            store, runtime, gateway, lambda n: f"http://x/{n}", queue_store=queue, queue_url="sqlite:///q", jobs=jobs
        )
        project = tmp_path / "project"
        project.mkdir()
        (project / "p.py").write_text(
            "class Predictor:\n    def predict_batch(self, payloads):\n        return payloads\n"
        )
        spec = _spec(predictor={"path": "p.py", "config": {"a": 1}})
        controller.deploy([Deployment(spec=spec, project_dir=str(project))])
        controller.step_jobs()
        controller.reconcile()
        await asyncio.sleep(0)
        assert controller.apis["crunch"].desired == 0 and runtime.launches == []  # no job, no workers

        job = jobs.submit(spec, JobRequest(items=list(range(10)), batch_size=5, workers=3, config={"b": 2}))
        jobs.track(job)
        controller.step_jobs()
        controller.reconcile()
        for _ in range(5):
            await asyncio.sleep(0)
        assert controller.apis["crunch"].desired == 2  # no more workers than batches
        assert len(runtime.launches) == 2
        launch = runtime.launches[0]
        assert launch.queue is not None and launch.queue.queue_name == job.queue
        assert launch.queue.job is not None and launch.queue.job.job_id == job.id
        assert launch.config == {"a": 1, "b": 2}

        jobs.cancel(job.id)
        controller.step_jobs()
        controller.reconcile()
        await asyncio.sleep(0)
        assert controller.apis["crunch"].desired == 0
        assert all(
            r.state in (ReplicaState.DRAINING, ReplicaState.STOPPED)
            for r in controller.apis["crunch"].replicas.values()
        )
        await controller.shutdown()
        store.close()
        queue.close()

    asyncio.run(scenario())


# --- the example ----------------------------------------------------------------------------------


def test_the_batch_example(tmp_path: Path) -> None:
    from cirrus.predictor import load_predictor
    from cirrus.spec import load_deployments

    example = Path(__file__).resolve().parent.parent / "examples" / "batch"
    [deployment] = load_deployments(example)
    assert deployment.spec.kind == "batch" and (example / "README.md").is_file()
    items = parse_items((example / "items.jsonl").read_bytes(), "items.jsonl")
    assert len(items) == 1000
    loaded = load_predictor(str(example), "predictor.py", "Predictor", {"lowercase": True}, batch_job=True)
    assert loaded.predict_batch is not None and loaded.on_job_complete is not None
    assert loaded.predict_batch.fn(payloads=[{"id": 0, "text": "A a b"}, "x"]) == [
        {"words": 3, "chars": 5, "top_word": "a"},
        {"words": 1, "chars": 1, "top_word": "x"},
    ]
    loaded.on_job_complete.fn(job={"id": "j", "status": "succeeded", "items_done": 2, "sink": str(tmp_path)})
    assert json.loads((tmp_path / "summary.json").read_text())["id"] == "j"


def test_a_batch_worker_needs_predict_batch_only(tmp_path: Path) -> None:
    from cirrus.predictor import PredictorLoadError, load_predictor

    (tmp_path / "only_batch.py").write_text(
        "class Predictor:\n    def predict_batch(self, payloads):\n        return payloads\n"
    )
    (tmp_path / "only_predict.py").write_text("class Predictor:\n    def predict(self, payload):\n        return 1\n")
    loaded = load_predictor(str(tmp_path), "only_batch.py", "Predictor", {}, batch_job=True)
    assert loaded.predict_batch is not None and loaded.on_job_complete is None
    with pytest.raises(PredictorLoadError, match="a batch API calls predict_batch, but Predictor has none"):
        load_predictor(str(tmp_path), "only_predict.py", "Predictor", {}, batch_job=True)
