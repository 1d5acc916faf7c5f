"""Server-side batching through a real daemon: HTTP in, frames to the replica, predict_batch, back.

One daemon serves the module; each behaviour has its own API.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import Cirrus, module_daemon, write_project

PREDICTORS = {
    "batched.py": """
        import time

        import cirrus


        class Predictor:
            def predict(self, payload):
                return {"i": payload["i"], "batch": 0}

            def predict_batch(self, payloads):
                time.sleep(0.05)
                return [
                    cirrus.HTTPError(400, f"request {p['i']} asked to be rejected") if p.get("reject")
                    else {"i": p["i"], "batch": len(payloads)}
                    for p in payloads
                ]
    """,
    "typed.py": """
        from pydantic import BaseModel


        class Item(BaseModel):
            i: int


        class Predictor:
            async def pre_predict(self, payload):
                return {"i": payload["i"] * 10} if isinstance(payload.get("i"), int) else payload

            def predict(self, payload: Item) -> dict:
                return {"i": payload.i}

            async def predict_batch(self, payloads):
                assert all(isinstance(p, Item) for p in payloads)
                return [{"i": p.i, "batch": len(payloads)} for p in payloads]
    """,
    "mismatch.py": """
        class Predictor:
            def predict(self, payload):
                return payload

            def predict_batch(self, payloads):
                return payloads[1:]
    """,
    "explodes.py": """
        import time


        class Predictor:
            def predict(self, payload):
                return payload

            def predict_batch(self, payloads):
                time.sleep(0.02)
                if any(p.get("fail") for p in payloads):
                    raise RuntimeError("the model fell over")
                return [{"ok": p["i"]} for p in payloads]
    """,
    "nobatch.py": """
        class Predictor:
            def predict(self, payload):
                return payload
    """,
}

APIS: list[dict[str, Any]] = [
    {
        "name": "batched",
        "predictor": {"path": "batched.py"},
        "concurrency": {"max_concurrency": 32},
        "batching": {"max_batch_size": 32, "max_wait_ms": 5},
    },
    {
        "name": "typed",
        "predictor": {"path": "typed.py"},
        "concurrency": {"max_concurrency": 16},
        "batching": {},
    },
    {"name": "mismatch", "predictor": {"path": "mismatch.py"}, "batching": {}, "debug_errors": True},
    {"name": "explodes", "predictor": {"path": "explodes.py"}, "batching": {}},
    {
        "name": "patient",
        "predictor": {"path": "batched.py"},
        "batching": {"max_batch_size": 8, "max_wait_ms": 500, "mode": "adaptive"},
    },
    {
        "name": "fixed",
        "predictor": {"path": "batched.py"},
        "batching": {"max_batch_size": 8, "max_wait_ms": 200, "mode": "fixed"},
    },
]


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cirrus]:
    root = tmp_path_factory.mktemp("batching")
    with module_daemon(root / "home") as cirrus:
        project = write_project(root / "project", PREDICTORS, apis=APIS)
        cirrus.client().deploy(project, timeout=60)
        yield cirrus


@pytest.fixture
def http(gw: Cirrus) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=gw.gateway_url, timeout=30) as client:
        yield client


def concurrently(url: str, api: str, payloads: list[Any]) -> list[httpx.Response]:
    async def run() -> list[httpx.Response]:
        limits = httpx.Limits(max_connections=len(payloads), max_keepalive_connections=len(payloads))
        async with httpx.AsyncClient(base_url=url, timeout=30, limits=limits) as client:
            return list(await asyncio.gather(*(client.post(f"/{api}", json=p) for p in payloads)))

    return asyncio.run(run())


def test_concurrent_requests_are_batched_and_each_gets_its_own_answer(gw: Cirrus) -> None:
    responses = concurrently(gw.gateway_url, "batched", [{"i": i} for i in range(16)])
    assert [r.status_code for r in responses] == [200] * 16, [r.text for r in responses]
    bodies = [r.json() for r in responses]
    assert [b["i"] for b in bodies] == list(range(16))  # each its own answer
    sizes = [b["batch"] for b in bodies]
    assert sum(1 for size in sizes if size > 1) >= 12, sizes  # the first may run alone; the rest gather
    assert max(sizes) <= 16


def test_an_exception_in_the_result_list_fails_only_that_request(gw: Cirrus) -> None:
    payloads = [{"i": i, "reject": i == 3} for i in range(6)]
    responses = concurrently(gw.gateway_url, "batched", payloads)
    assert [r.status_code for r in responses] == [200, 200, 200, 400, 200, 200]
    assert responses[3].json()["error"] == "request 3 asked to be rejected"


def test_validation_and_hooks_still_run_per_request(gw: Cirrus, http: httpx.Client) -> None:
    responses = concurrently(gw.gateway_url, "typed", [{"i": i} for i in range(8)])
    assert [r.status_code for r in responses] == [200] * 8
    assert [r.json()["i"] for r in responses] == [i * 10 for i in range(8)]  # pre_predict ran on each
    invalid = http.post("/typed", json={"i": "seven"})
    assert invalid.status_code == 422
    assert invalid.json()["error"] == "payload failed validation"


def test_a_result_list_of_the_wrong_length_fails_the_batch_with_a_clear_message(gw: Cirrus) -> None:
    responses = concurrently(gw.gateway_url, "mismatch", [{"i": i} for i in range(4)])
    assert [r.status_code for r in responses] == [500] * 4
    for response in responses:
        error = response.json()["error"]
        assert "predict_batch returned" in error and "results for a batch of" in error, error
        assert "exactly one result per payload" in error


def test_an_exception_fails_its_batch_and_later_requests_are_fine(gw: Cirrus, http: httpx.Client) -> None:
    failed = http.post("/explodes", json={"i": 0, "fail": True})
    assert failed.status_code == 500
    # Only the request id: the message stays in the replica's log (the mismatch API shows it: debug_errors).
    assert (
        failed.json()["error"]
        == f"the predictor failed; see the replica log (request id {failed.json()['request_id']})"
    )
    later = concurrently(gw.gateway_url, "explodes", [{"i": i} for i in range(8)])
    assert [r.status_code for r in later] == [200] * 8
    assert [r.json() for r in later] == [{"ok": i} for i in range(8)]


def test_adaptive_answers_a_lone_request_without_waiting_for_a_batch(http: httpx.Client) -> None:
    assert http.post("/patient", json={"i": 0}).status_code == 200  # warm
    for i in range(3):
        time.sleep(0.6)  # idle for longer than max_wait
        started = time.perf_counter()
        response = http.post("/patient", json={"i": i})
        elapsed = time.perf_counter() - started
        assert response.status_code == 200 and response.json() == {"i": i, "batch": 1}
        assert elapsed < 0.25, f"a lone request took {elapsed:.3f}s with max_wait_ms 500"
    # back to back: the previous batch held one request, so nothing is expected back
    started = time.perf_counter()
    assert http.post("/patient", json={"i": 9}).status_code == 200
    assert time.perf_counter() - started < 0.25


def test_fixed_mode_waits_to_batch_requests_together(gw: Cirrus) -> None:
    responses = concurrently(gw.gateway_url, "fixed", [{"i": 1}, {"i": 2}])
    assert [r.json() for r in responses] == [{"i": 1, "batch": 2}, {"i": 2, "batch": 2}]


def test_metrics_and_status_show_batching(gw: Cirrus, http: httpx.Client) -> None:
    concurrently(gw.gateway_url, "batched", [{"i": i} for i in range(16)])
    text = http.get("/metrics").text
    assert 'cirrus_batch_size_bucket{api="batched",le="1",revision="1"}' in text
    assert 'cirrus_batch_size_count{api="batched",revision="1"}' in text
    assert 'cirrus_stage_duration_seconds_count{api="batched",revision="1",stage="slot_wait"}' in text
    assert 'cirrus_stage_duration_seconds_count{api="batched",revision="1",stage="predict"}' in text
    count = next(
        float(line.split()[-1])
        for line in text.splitlines()
        if line.startswith('cirrus_batch_size_count{api="batched",revision="1"}')
    )
    total = next(
        float(line.split()[-1])
        for line in text.splitlines()
        if line.startswith('cirrus_batch_size_sum{api="batched",revision="1"}')
    )
    assert count >= 16 and total / count > 1.5  # requests mostly ran in batches

    status = gw.client().get("batched")
    assert status.batch_size_mean is not None and status.batch_size_mean > 1
    assert status.predict_p50_ms is not None and status.predict_p50_ms >= 40  # the 50 ms sleep
    assert status.slot_wait_p50_ms is not None
    code, out, err = gw.cli("get", "batched")
    assert code == 0, err
    assert "inference" in out and "batch size" in out and "predict p50" in out


def test_batching_without_predict_batch_fails_to_load_with_a_clear_error(gw: Cirrus, tmp_path: Path) -> None:
    project = write_project(
        tmp_path / "nobatch",
        {"nobatch.py": PREDICTORS["nobatch.py"]},
        apis=[{"name": "nobatch", "predictor": {"path": "nobatch.py"}, "batching": {"max_batch_size": 4}}],
    )
    gw.client().deploy(project, wait=False)
    status = gw.wait_for("nobatch", lambda s: s.message is not None and "predict_batch" in s.message, timeout=30)
    assert "has no predict_batch method" in (status.message or "")
    code, out, _ = gw.cli("get", "nobatch")
    assert code == 0 and "no predict_batch method" in out
    gw.client().delete("nobatch")
