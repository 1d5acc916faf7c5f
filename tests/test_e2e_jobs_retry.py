"""Batch jobs through the real daemon: a job cancelled while several batches are in flight reports
exactly the items its sink holds; `cirrus jobs retry` runs only the failed batches and items of an
ended job, and the two jobs' results together cover every item once."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import Cirrus, write_project

from cirrus.async_client import AsyncClient
from cirrus.client import CirrusError, NotFoundError
from cirrus.jobs import Job, JobStatus

FLAKY = """
import json, os, time


class Predictor:
    def __init__(self, config):
        self.config = config

    def predict_batch(self, payloads):
        time.sleep(self.config.get("sleep", 0))
        if os.path.exists(self.config["explode_flag"]) and self.config["explode_at"] in payloads:
            raise RuntimeError("boom")
        with open(self.config["bad_file"]) as f:
            bad = set(json.load(f))
        return [ValueError(f"bad item {p}") if p in bad else {"double": p * 2} for p in payloads]
"""


def _project(tmp_path: Path, **config: Any) -> Path:
    return write_project(
        tmp_path / "project",
        FLAKY,
        apis=[
            {
                "name": "flaky",
                "kind": "batch",
                "predictor": {"config": config},
                "concurrency": {"timeout_s": 10},
                "queue": {"lease_s": 1.0, "max_attempts": 2},
            }
        ],
    )


def _results(sink: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for part in sorted(sink.glob("part-*.jsonl")) for line in part.read_text().splitlines()]


def test_a_cancelled_job_reports_what_its_sink_holds(daemon: Cirrus, tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text("[]")
    client = daemon.client()
    client.deploy(_project(tmp_path, explode_flag=str(tmp_path / "no"), explode_at=-1, bad_file=str(bad)), wait=True)
    job = client.submit_job("flaky", list(range(500)), batch_size=5, workers=3, config={"sleep": 0.6})
    deadline = time.monotonic() + 30
    while (current := client.job(job.id)).batches_done < 3 or current.batches_in_progress < 2:
        assert time.monotonic() < deadline, current
        time.sleep(0.05)
    stopping = client.cancel_job(job.id)  # several batches are in flight: they finish, then it ends
    assert stopping.status is JobStatus.STOPPING
    cancelled = client.wait_job(job.id, timeout=30)
    assert cancelled.status is JobStatus.CANCELLED and cancelled.batches_failed == 0
    daemon.wait_for("flaky", lambda s: not s.replicas, timeout=30)  # nothing can write any more
    rows = _results(Path(cancelled.sink))
    assert cancelled.items_done == len(rows) == 5 * cancelled.batches_done
    assert len({r["index"] for r in rows}) == len(rows) and 0 < len(rows) < 500


def test_retry_runs_only_the_failed_batches_and_items(daemon: Cirrus, tmp_path: Path) -> None:
    bad, flag = tmp_path / "bad.json", tmp_path / "explode"
    bad.write_text(json.dumps([3, 17, 18]))
    flag.write_text("")
    client = daemon.client()
    client.deploy(_project(tmp_path, explode_flag=str(flag), explode_at=25, bad_file=str(bad)), wait=True)
    items = list(range(40))
    first = client.wait_job(client.submit_job("flaky", items, batch_size=10, workers=2).id, timeout=30)
    assert first.status is JobStatus.COMPLETED_WITH_FAILURES
    assert (first.batches_done, first.batches_failed, first.items_done) == (3, 1, 30)
    rows = _results(Path(first.sink))
    assert sorted(r["index"] for r in rows if "error" in r) == [3, 17, 18]
    bad.write_text("[]")  # the causes are gone
    flag.unlink()
    code, out, err = daemon.cli("jobs", "retry", first.id, "--follow", "-o", "json")
    assert code == 0, err
    retry = Job.model_validate_json(out)
    assert (retry.status, retry.retry_of) == (JobStatus.SUCCEEDED, first.id)
    assert retry.total_items == retry.items_done == 13  # batch 2 (items 20-29) and items 3, 17, 18
    retried = _results(Path(retry.sink))
    assert sorted(r["index"] for r in retried) == [3, 17, 18, *range(20, 30)]
    assert all(r["result"] == {"double": 2 * r["item"]} and r["item"] == r["index"] for r in retried)
    succeeded = [r["index"] for r in rows if "result" in r] + [r["index"] for r in retried]
    assert sorted(succeeded) == items  # every item once, between the two jobs

    code, _, err = daemon.cli("jobs", "retry", retry.id)
    assert code == 1 and "nothing to retry" in err
    code, _, err = daemon.cli("jobs", "retry", "000000000000")
    assert code == 1 and "no job with id" in err

    async def from_asyncio() -> None:
        async with AsyncClient(daemon.settings) as aclient:
            assert (await aclient.job(retry.id)).retry_of == first.id
            with pytest.raises(CirrusError, match="nothing to retry") as info:
                await aclient.retry_job(retry.id)
            assert info.value.status == 400
            with pytest.raises(NotFoundError):
                await aclient.retry_job("000000000000")

    asyncio.run(from_asyncio())
    with pytest.raises(CirrusError, match="retry it once it has ended") as info:
        client.retry_job(client.submit_job("flaky", [1], batch_size=1).id)
    assert info.value.status == 400
