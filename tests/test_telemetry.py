"""The control plane's and the GPUs' Prometheus collectors, scraped the way `/metrics` renders them:
the controller over the fake runtime and real stores (tests/test_kinds.py's world), and NVML faked
or absent (this machine has no GPU)."""

from __future__ import annotations

import sys
import time
import types
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from test_kinds import KindWorld, run

from cirrus.control.telemetry import BACKLOG_TTL_S, ControlPlaneCollector
from cirrus.jobs import JobRequest
from cirrus.runtimes.gpu_metrics import GpuCollector
from cirrus.store.base import NewRequest

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(collector: Any) -> Samples:
    """Every sample of one scrape: (name, labels) -> value, parsed back from the text format."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    text = generate_latest(registry).decode()
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


def names(samples: Samples) -> set[str]:
    return {name for name, _ in samples}


class Clock:
    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def world(tmp_path: Path) -> Iterator[KindWorld]:
    w = KindWorld(tmp_path)
    yield w
    w.close()


def test_replicas_by_revision_and_state_desired_and_restarts_that_never_go_down(world: KindWorld) -> None:
    collector = ControlPlaneCollector(world.controller)

    async def main() -> None:
        world.controller.deploy([world.deployment(autoscaling={"min_replicas": 2, "max_replicas": 2})])
        await world.reconcile()
        first, second = world.runtime.running()
        world.runtime.make_ready(first)
        await world.settle()
        samples = scrape(collector)
        assert value(samples, "cirrus_replicas", api="api", revision="1", state="ready") == 1
        assert value(samples, "cirrus_replicas", api="api", revision="1", state="starting") == 1
        assert value(samples, "cirrus_replicas", api="api", revision="1", state="backoff") == 0  # every state
        assert value(samples, "cirrus_replicas_desired", api="api") == 2
        assert value(samples, "cirrus_replica_restarts_total", api="api") == 0

        world.runtime.crash(first)
        world.runtime.crash(second)
        samples = scrape(collector)
        assert value(samples, "cirrus_replicas", api="api", revision="1", state="backoff") == 2
        assert value(samples, "cirrus_replica_restarts_total", api="api") == 2
        # The API scales down to one: the removed replica's restarts stay counted.
        world.controller.deploy([world.deployment(autoscaling={"min_replicas": 1, "max_replicas": 1})])
        world.clock.advance(1)
        for _ in range(3):
            await world.reconcile()
        assert len(world.controller.apis["api"].replicas) == 1
        samples = scrape(collector)
        assert value(samples, "cirrus_replicas_desired", api="api") == 1
        assert value(samples, "cirrus_replica_restarts_total", api="api") == 2

    run(main())


def deploy(world: KindWorld, **fields: Any) -> None:
    """Deploy one API named `api` (the controller starts its work on a running loop)."""

    async def main() -> None:
        world.controller.deploy([world.deployment(**fields)])
        await world.reconcile()

    run(main())


def test_a_realtime_api_has_no_backlog_or_job_series(world: KindWorld) -> None:
    deploy(world)
    samples = scrape(ControlPlaneCollector(world.controller))
    assert {"cirrus_replicas", "cirrus_replicas_desired", "cirrus_replica_restarts_total"} <= names(samples)
    assert not names(samples) & {"cirrus_async_backlog_requests", "cirrus_job_items"}


def test_async_backlog_and_oldest_age_read_the_store_at_most_once_a_second(world: KindWorld) -> None:
    clock = Clock()
    collector = ControlPlaneCollector(world.controller, clock=clock)
    deploy(world, kind="async")
    samples = scrape(collector)
    assert value(samples, "cirrus_async_backlog_requests", api="api", status="in_queue") == 0
    assert value(samples, "cirrus_async_oldest_queued_age_seconds", api="api") == 0

    requests = [NewRequest("api", uuid.uuid4().hex, b"{}", "application/json") for _ in range(3)]
    world.queue.submit_many(requests, clock.now - 5)
    assert value(scrape(collector), "cirrus_async_backlog_requests", api="api", status="in_queue") == 0  # cached
    clock.now += BACKLOG_TTL_S
    samples = scrape(collector)
    assert value(samples, "cirrus_async_backlog_requests", api="api", status="in_queue") == 3
    assert value(samples, "cirrus_async_backlog_requests", api="api", status="in_progress") == 0
    assert value(samples, "cirrus_async_oldest_queued_age_seconds", api="api") == pytest.approx(5 + BACKLOG_TTL_S)

    world.queue.lease("api", "worker", 1, 30.0, clock.now)
    clock.now += BACKLOG_TTL_S
    samples = scrape(collector)
    assert value(samples, "cirrus_async_backlog_requests", api="api", status="in_queue") == 2
    assert value(samples, "cirrus_async_backlog_requests", api="api", status="in_progress") == 1


def test_a_failing_queue_store_leaves_the_backlog_out_and_the_rest_in(world: KindWorld) -> None:
    clock = Clock()
    collector = ControlPlaneCollector(world.controller, clock=clock)
    deploy(world, kind="async")

    def broken(api: str, now: float, detail: bool = False) -> Any:
        raise ConnectionError("the store is down")

    world.queue.backlog = broken  # type: ignore[method-assign]
    samples = scrape(collector)
    assert "cirrus_async_backlog_requests" not in names(samples)
    assert value(samples, "cirrus_replicas_desired", api="api") == 1


def test_running_jobs_report_their_items(world: KindWorld) -> None:
    async def main() -> None:
        world.controller.deploy([world.deployment(kind="batch", autoscaling={"min_replicas": 0})])
        await world.reconcile()
        collector = ControlPlaneCollector(world.controller)
        assert "cirrus_job_items" not in names(scrape(collector))  # no job running

        spec = world.controller.apis["api"].stored.deployment.spec
        job = world.jobs.submit(spec, JobRequest(items=list(range(30)), batch_size=10, workers=2))
        world.jobs.track(job)
        world.controller.step_jobs()
        await world.reconcile()
        samples = scrape(collector)
        assert value(samples, "cirrus_job_items", api="api", job=job.id, state="total") == 30
        assert value(samples, "cirrus_job_items", api="api", job=job.id, state="done") == 0
        assert value(samples, "cirrus_job_items", api="api", job=job.id, state="failed") == 0

    run(main())


# --- GPUs -----------------------------------------------------------------------------------------


def test_no_gpu_metrics_and_no_error_without_pynvml(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", None)  # `import pynvml` raises ImportError
    collector = GpuCollector()
    assert scrape(collector) == {}
    assert scrape(collector) == {}


def fake_nvml(init_error: Exception | None = None, broken: frozenset[int] = frozenset()) -> types.ModuleType:
    """pynvml's calls that the collector makes, over two devices (the second half busy)."""
    nvml = types.ModuleType("pynvml")

    def init() -> None:
        if init_error is not None:
            raise init_error

    def handle(index: int) -> int:
        if index in broken:
            raise RuntimeError("GPU is lost")
        return index

    nvml.nvmlInit = init  # type: ignore[attr-defined]
    nvml.nvmlDeviceGetCount = lambda: 2  # type: ignore[attr-defined]
    nvml.nvmlDeviceGetHandleByIndex = handle  # type: ignore[attr-defined]
    nvml.nvmlDeviceGetUtilizationRates = lambda h: types.SimpleNamespace(gpu=50 * h, memory=0)  # type: ignore[attr-defined]
    nvml.nvmlDeviceGetMemoryInfo = lambda h: types.SimpleNamespace(  # type: ignore[attr-defined]
        used=(h + 1) * 2**30, total=80 * 2**30, free=0
    )
    return nvml


def test_no_gpu_metrics_when_nvml_does_not_start(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", fake_nvml(init_error=RuntimeError("NVML Shared Library Not Found")))
    assert scrape(GpuCollector()) == {}


def test_gpu_utilization_and_memory_per_device_through_nvml(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", fake_nvml())
    samples = scrape(GpuCollector())
    assert value(samples, "cirrus_gpu_utilization_ratio", gpu="0") == 0.0
    assert value(samples, "cirrus_gpu_utilization_ratio", gpu="1") == 0.5
    assert value(samples, "cirrus_gpu_memory_used_bytes", gpu="1") == 2 * 2**30
    assert value(samples, "cirrus_gpu_memory_total_bytes", gpu="0") == 80 * 2**30


def test_a_device_nvml_cannot_read_is_left_out(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", fake_nvml(broken=frozenset({0})))
    samples = scrape(GpuCollector())
    assert value(samples, "cirrus_gpu_utilization_ratio", gpu="0") is None
    assert value(samples, "cirrus_gpu_utilization_ratio", gpu="1") == 0.5
