"""Batch jobs through the real daemon: a 10,000-item job survives kill -9 of a worker with every
item's result in the sink exactly once and `on_job_complete` run once; failed batches are retried
then listed; cancel and timeout stop the workers; bad input gets clear errors and leaves nothing."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import Cirrus, pid_alive, write_project

from cirrus.client import CirrusError
from cirrus.jobs import Job, JobStatus

CRUNCHER = """
import json, os, time


class Predictor:
    def __init__(self, config):
        self.config = config

    def predict_batch(self, payloads):
        time.sleep(self.config.get("sleep", 0))
        if self.config.get("explode_at") in payloads:
            raise RuntimeError("boom")
        return [{"double": item * 2, "pid": os.getpid()} for item in payloads]

    def on_job_complete(self, job):
        with open(self.config["hook_log"], "a") as f:
            f.write(json.dumps(job) + "\\n")
"""

NO_BATCH = """
class Predictor:
    def predict(self, payload):
        return payload
"""


def _project(tmp_path: Path) -> Path:
    return write_project(
        tmp_path / "project",
        {"predictor.py": CRUNCHER, "plain.py": NO_BATCH},
        apis=[
            {
                "name": "crunch",
                "kind": "batch",
                "predictor": {"config": {"hook_log": str(tmp_path / "hook.log")}},
                "concurrency": {"timeout_s": 10},
                "queue": {"lease_s": 1.0, "max_attempts": 3},
            },
            {"name": "plain", "kind": "batch", "predictor": {"path": "plain.py"}},
            {"name": "realtime", "predictor": {"path": "plain.py"}},
        ],
    )


def _results(sink: Path) -> list[dict[str, Any]]:
    lines = []
    for part in sorted(sink.glob("part-*.jsonl")):
        lines += [json.loads(line) for line in part.read_text().splitlines()]
    return lines


def _hook_calls(tmp_path: Path) -> list[dict[str, Any]]:
    log = tmp_path / "hook.log"
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def _wait(cirrus: Cirrus, job_id: str, until: Any, timeout: float = 30.0) -> Job:
    client = cirrus.client()
    deadline = time.monotonic() + timeout
    while True:
        job = client.job(job_id)
        if until(job):
            return job
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting on job {job_id}: {job.model_dump_json(indent=1)}")
        time.sleep(0.05)


def _workers_gone(cirrus: Cirrus, api: str) -> None:
    cirrus.wait_for(api, lambda s: s.replicas_desired == 0 and not s.replicas, timeout=30)


def test_a_job_survives_a_worker_kill_with_every_result_once(daemon: Cirrus, tmp_path: Path) -> None:
    client = daemon.client()
    client.deploy(_project(tmp_path), wait=True)
    assert client.get("crunch").replicas_desired == 0  # a batch API idles at zero workers
    items = list(range(10_000))
    job = client.submit_job("crunch", items, batch_size=50, workers=3, config={"sleep": 0.05})
    assert (job.total_items, job.total_batches) == (10_000, 200)
    running = _wait(daemon, job.id, lambda j: j.batches_done >= 20)
    assert running.status is JobStatus.RUNNING and running.items_per_s and running.eta_s is not None
    workers = daemon.wait_for("crunch", lambda s: sum(r.pid is not None for r in s.replicas) == 3).replicas
    victim = next(r.pid for r in workers if r.pid is not None)
    os.kill(victim, signal.SIGKILL)  # a worker dies mid-job, holding a leased batch

    done = client.wait_job(job.id, timeout=60)
    assert done.status is JobStatus.SUCCEEDED, done
    assert (done.batches_done, done.batches_failed, done.items_done) == (200, 0, 10_000)
    assert not pid_alive(victim)
    sink = Path(done.sink)
    assert sink == daemon.home.resolve() / "jobs" / job.id
    results = _results(sink)
    assert [r["index"] for r in results] == items  # every item exactly once, in order
    assert all(r["item"] == r["index"] and r["result"]["double"] == 2 * r["index"] for r in results)
    assert len({r["result"]["pid"] for r in results}) >= 3  # the killed worker's successor took over
    assert not list(sink.glob(".*")), "temporary files were left behind"
    calls = _hook_calls(tmp_path)
    assert len(calls) == 1 and calls[0]["id"] == job.id and calls[0]["status"] == "succeeded"
    assert calls[0]["items_done"] == 10_000
    _workers_gone(daemon, "crunch")


def test_failed_batches_cancel_and_timeout(daemon: Cirrus, tmp_path: Path) -> None:
    client = daemon.client()
    client.deploy(_project(tmp_path), wait=True)

    # A batch that always raises is retried max_attempts times, then listed; the rest succeed.
    items_file = tmp_path / "items.jsonl"
    items_file.write_text("".join(f"{n}\n" for n in range(20)))
    code, out, err = daemon.cli(
        "jobs", "submit", "crunch", "--items", str(items_file), "--batch-size", "5", "--workers", "2",
        "--max-attempts", "2", "--config", '{"explode_at": 7}', "-f", "-o", "json",
    )  # fmt: skip
    assert code == 1, err  # followed to the end: not succeeded
    job = Job.model_validate_json(out)
    assert job.status is JobStatus.COMPLETED_WITH_FAILURES
    assert (job.batches_done, job.batches_failed, job.items_done) == (3, 1, 15)
    [failed] = job.failed_batches
    assert (failed.index, failed.start, failed.size) == (1, 5, 5)
    assert failed.error is not None and "RuntimeError: boom" in failed.error
    assert [r["index"] for r in _results(Path(job.sink))] == [*range(5), *range(10, 20)]
    assert [c["status"] for c in _hook_calls(tmp_path)] == ["completed_with_failures"]
    code, out, _ = daemon.cli("jobs", "get", job.id)
    assert code == 0 and "completed_with_failures" in out and "RuntimeError: boom" in out

    # Cancel: its workers stop once the batches in flight end; the hook does not run.
    slow = client.submit_job("crunch", list(range(40)), batch_size=1, config={"sleep": 0.5})
    _wait(daemon, slow.id, lambda j: j.batches_done >= 1)
    code, out, err = daemon.cli("jobs", "cancel", slow.id)
    assert code == 0 and f"cancelling job {slow.id}" in out, err
    cancelled = client.wait_job(slow.id, timeout=30)
    assert cancelled.status is JobStatus.CANCELLED and cancelled.finished_at is not None
    assert cancelled.items_done == len(_results(Path(cancelled.sink)))
    _workers_gone(daemon, "crunch")
    with pytest.raises(CirrusError, match="already ended: cancelled") as info:
        client.cancel_job(slow.id)
    assert info.value.status == 409

    # Timeout: the job is stopped after --timeout seconds.
    late = client.submit_job("crunch", list(range(40)), batch_size=1, timeout_s=1.5, config={"sleep": 0.5})
    ended = client.wait_job(late.id, timeout=30)
    assert ended.status is JobStatus.TIMED_OUT and ended.error and "timeout of 1.5s" in ended.error
    assert 0 < ended.batches_done < 40 and ended.items_done == len(_results(Path(ended.sink)))
    _workers_gone(daemon, "crunch")
    assert len(_hook_calls(tmp_path)) == 1  # neither cancel nor timeout ran on_job_complete

    # A predictor without predict_batch cannot run jobs: the job fails with the load error.
    broken = client.submit_job("plain", [1, 2, 3], batch_size=2)
    failed_job = client.wait_job(broken.id, timeout=30)
    assert failed_job.status is JobStatus.FAILED and "predict_batch" in (failed_job.error or "")

    code, out, _ = daemon.cli("jobs", "list", "crunch", "-o", "json")
    assert code == 0 and [j["id"] for j in json.loads(out)] == [late.id, slow.id, job.id]
    code, out, _ = daemon.cli("jobs", "list")
    assert code == 0 and all(j in out for j in (job.id, slow.id, late.id, broken.id))


def _queue_rows(cirrus: Cirrus) -> int:
    with sqlite3.connect(cirrus.home / "queue.db") as db:
        (count,) = db.execute("SELECT COUNT(*) FROM requests").fetchone()
    return int(count)


def test_bad_jobs_get_clear_errors_and_leave_nothing(daemon: Cirrus, tmp_path: Path) -> None:
    client = daemon.client()
    client.deploy(_project(tmp_path), wait=True)
    admin = daemon.info.admin_url
    token = daemon.settings.token_file.read_text().strip()
    good = tmp_path / "good.jsonl"
    good.write_text("1\n2\n")
    bad_line = tmp_path / "bad.jsonl"
    bad_line.write_text('1\n{"oops": \n3\n')
    not_array = tmp_path / "object.json"
    not_array.write_text('{"a": 1}')
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")

    with httpx.Client(headers={"authorization": f"Bearer {token}"}, timeout=10) as http:

        def submit(api: str, body: Any) -> httpx.Response:
            return http.post(f"{admin}/v1/apis/{api}/jobs", json=body)

        cases: list[tuple[str, Any, int, str]] = [
            ("nope", {"items": [1], "batch_size": 1}, 404, "no API named 'nope'"),
            ("realtime", {"items": [1], "batch_size": 1}, 400, "kind realtime"),
            ("crunch", {"items": [1], "batch_size": 0}, 400, "batch_size: Input should be greater than or equal to 1"),
            ("crunch", {"items": [1], "batch_size": 1, "workers": 0}, 400, "workers:"),
            ("crunch", {"items": [1], "items_url": str(good), "batch_size": 1}, 400, "not both"),
            ("crunch", {"batch_size": 1}, 400, "either inline"),
            ("crunch", {"items": {"a": 1}, "batch_size": 1}, 400, "items: Input should be a valid list"),
            ("crunch", {"items": [], "batch_size": 1}, 400, "no items"),
            ("crunch", {"items": [1], "batch_size": 1, "colour": "red"}, 400, "colour: unknown field"),
            ("crunch", [1, 2], 400, "must be a JSON object"),
            ("crunch", {"items_url": str(tmp_path / "missing.jsonl"), "batch_size": 1}, 400, "no such file"),
            ("crunch", {"items_url": str(bad_line), "batch_size": 1}, 400, "line 2 is not a JSON value"),
            ("crunch", {"items_url": str(not_array), "batch_size": 1}, 400, "must hold a JSON array"),
            ("crunch", {"items_url": str(empty), "batch_size": 1}, 400, "no items"),
            ("crunch", {"items_url": str(tmp_path), "batch_size": 1}, 400, "is a directory"),
        ]
        for api, body, status, message in cases:
            response = submit(api, body)
            assert response.status_code == status, (body, response.text)
            assert message in response.json()["error"], (body, response.text)
        assert http.post(f"{admin}/v1/jobs/000000000000/cancel").status_code == 404
        assert http.get(f"{admin}/v1/jobs/000000000000").status_code == 404

    with httpx.Client(timeout=10) as http:  # a batch API has no predict route
        response = http.post(daemon.url("crunch"), json=1)
        assert response.status_code == 405 and "cirrus jobs submit crunch" in response.json()["error"]

    cli_cases: list[tuple[list[str], str]] = [
        (["nope", "--items-json", "[1]"], "no API named 'nope'"),
        (["crunch", "--items-json", "[1]", "--batch-size", "0"], "batch_size: Input should be greater than or equal"),
        (["crunch", "--items-json", "[1]", "--workers", "0"], "workers: Input should be greater than or equal"),
        (["crunch", "--items-json", "[1]", "--items", str(good)], "either --items"),
        (["crunch"], "either --items"),
        (["crunch", "--items-json", "{not json"], "--items-json is not valid JSON"),
        (["crunch", "--items-json", '{"a": 1}'], "--items-json must be a JSON array"),
        (["crunch", "--items", str(tmp_path / "missing.jsonl")], "no such file"),
        (["crunch", "--items", str(bad_line)], "line 2 is not a JSON value"),
        (["crunch", "--items-json", "[1]", "--config", "[1]"], "--config must be a JSON object"),
    ]
    for args, message in cli_cases:
        code, out, err = daemon.cli("jobs", "submit", *args)
        assert code == 1, (args, out, err)
        assert message in err, (args, err)
    code, _, err = daemon.cli("jobs", "get", "000000000000")
    assert code == 1 and "no job with id" in err

    assert client.jobs() == []  # nothing half-created: no job record ...
    assert _queue_rows(daemon) == 0  # ... and no batch
    assert not (daemon.home / "jobs").exists() or not any((daemon.home / "jobs").iterdir())
