"""The Grafana dashboard (deploy/grafana/cirrus.json) and the metric table of docs/observability.md
against what a real daemon's `/metrics` exports: every query names only exported metrics, and the
table lists exactly those. The daemon serves a batched realtime API, an async API and a batch API
with a job running, so every family with series only under load has them when scraped.
The GPU metrics come from NVML, which this machine lacks: they are taken from the GPU collector over
a fake NVML (tests/test_telemetry.py), and the daemon's page must have none of them."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import re
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import Cirrus, module_daemon, write_project
from prometheus_client.parser import text_string_to_metric_families
from test_e2e_gateways import join
from test_telemetry import fake_nvml, names, scrape

from cirrus.runtimes.gpu_metrics import GpuCollector

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "deploy" / "grafana" / "cirrus.json"
DOC = ROOT / "docs" / "observability.md"
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")

PREDICTORS = {
    "batched.py": """
        import time


        class Predictor:
            def predict(self, payload):
                return payload

            def predict_batch(self, payloads):
                time.sleep(0.02)
                return payloads
    """,
    "worker.py": """
        import time


        class Predictor:
            def predict(self, payload):
                return {"done": payload}

            def predict_batch(self, payloads):
                time.sleep(0.3)
                return payloads
    """,
}

APIS: list[dict[str, Any]] = [
    {
        "name": "batched",
        "predictor": {"path": "batched.py"},
        "concurrency": {"max_concurrency": 16},
        "batching": {"max_batch_size": 8, "max_wait_ms": 5},
    },
    {"name": "queued", "kind": "async", "predictor": {"path": "worker.py"}},
    {"name": "crunch", "kind": "batch", "predictor": {"path": "worker.py"}},
]


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Cirrus, str]]:
    """A real daemon, and one scrape of its `/metrics` under load with a job running."""
    root = tmp_path_factory.mktemp("observability")
    with module_daemon(root / "home") as cirrus:
        client = cirrus.client()
        client.deploy(write_project(root / "project", PREDICTORS, apis=APIS), timeout=60)
        _load(cirrus.gateway_url)
        job = client.submit_job("crunch", list(range(40)), batch_size=1)
        try:
            text = _scrape_until(cirrus, f'cirrus_job_items{{api="crunch",job="{job.id}",state="total"}}')
        finally:
            client.cancel_job(job.id)
        yield cirrus, text


@pytest.fixture(scope="module")
def exported(served: tuple[Cirrus, str]) -> str:
    return served[1]


def _load(url: str) -> None:
    async def run() -> None:
        async with httpx.AsyncClient(base_url=url, timeout=30) as http:
            answers = await asyncio.gather(*(http.post("/batched", json={"i": i}) for i in range(16)))
            assert [a.status_code for a in answers] == [200] * 16
            assert (await http.post("/nowhere", json={})).status_code == 404
            for i in range(3):
                assert (await http.post("/queued", json={"i": i})).status_code == 202

    asyncio.run(run())


def _scrape_until(cirrus: Cirrus, line: str, timeout: float = 20.0) -> str:
    deadline = time.monotonic() + timeout
    while True:
        text = httpx.get(cirrus.url("/metrics"), timeout=10).text
        if line in text or time.monotonic() > deadline:
            return text
        time.sleep(0.2)


def families(text: str) -> dict[str, str]:
    """Metric name as queried (counters with `_total`) -> type, of a `/metrics` page."""
    found = {}
    for family in text_string_to_metric_families(text):
        name = f"{family.name}_total" if family.type == "counter" else family.name
        found[name] = family.type
    return found


def gpu_families() -> dict[str, str]:
    """The GPU collector's families, over a fake NVML."""
    saved = sys.modules.get("pynvml")
    sys.modules["pynvml"] = fake_nvml()
    try:
        return {name: "gauge" for name in names(scrape(GpuCollector()))}
    finally:
        if saved is None:
            del sys.modules["pynvml"]
        else:
            sys.modules["pynvml"] = saved


def documented() -> dict[str, str]:
    """The table under `## Metrics` in docs/observability.md: name -> type."""
    section = DOC.read_text().split("## Metrics", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| `(cirrus_\w+)` \| (\w+) \|", section, re.M)
    assert rows, "no metric table under ## Metrics"
    return dict(rows)


def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def panels(board: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in board["panels"]:
        yield panel
        yield from panel.get("panels", [])


def expressions(board: dict[str, Any]) -> list[str]:
    exprs = [target["expr"] for panel in panels(board) for target in panel.get("targets", [])]
    exprs += [json.dumps(v.get("query")) for v in board["templating"]["list"] if v["type"] == "query"]
    return exprs


def queried(board: dict[str, Any], histograms: set[str]) -> set[str]:
    """Metric names in the dashboard's PromQL, a histogram's series under the histogram's name."""
    found = set()
    for expr in expressions(board):
        for name in re.findall(r"\bcirrus_[A-Za-z0-9_]+", expr):
            base = next((name.removesuffix(s) for s in HISTOGRAM_SUFFIXES if name.endswith(s)), name)
            found.add(base if base in histograms else name)
    return found


def test_the_dashboard_is_grafana_json_over_a_prometheus_variable() -> None:
    board = dashboard()
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["DS_PROMETHEUS"]["type"] == "datasource"
    assert variables["DS_PROMETHEUS"]["query"] == "prometheus"
    assert variables["api"]["query"]["query"] == "label_values(cirrus_requests_total, api)"
    ids = [panel["id"] for panel in panels(board)]
    assert len(ids) == len(set(ids))
    for panel in panels(board):
        assert set(panel["gridPos"]) == {"h", "w", "x", "y"}
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}, panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == panel["datasource"]
            assert target["expr"].count("(") == target["expr"].count(")"), target["expr"]
    titles = " / ".join(panel["title"] for panel in panels(board))
    for needed in ("status", "Error", "percentiles", "stage", "In flight", "Replicas", "batch", "Cold starts"):
        assert needed in titles
    for needed in ("backlog", "Oldest", "jobs", "GPU utilization", "GPU memory"):
        assert needed in titles
    text = "\n".join(expressions(board))
    for quantile in ("0.5", "0.9", "0.99"):
        assert f"histogram_quantile({quantile}, sum by (le) (rate(cirrus_request_duration_seconds_bucket" in text


def test_dashboard_queries_name_only_metrics_a_real_daemon_exports(exported: str) -> None:
    on_page = families(exported)
    gpus = gpu_families()
    assert not set(on_page) & set(gpus)  # no NVML here: no GPU series, and no error
    if importlib.util.find_spec("pynvml") is None:
        assert "cirrus_gpu" not in exported
    known = {**on_page, **gpus}
    histograms = {name for name, kind in known.items() if kind == "histogram"}
    board = queried(dashboard(), histograms)
    assert board - set(known) == set(), f"the dashboard queries metrics Cirrus does not export: {board - set(known)}"
    assert set(known) - board == set(), f"metrics no panel shows: {set(known) - board}"


def test_the_docs_table_lists_exactly_the_exported_metrics_with_their_types(exported: str) -> None:
    known = {**families(exported), **gpu_families()}
    assert documented() == known
    histograms = {name for name, kind in known.items() if kind == "histogram"}
    assert queried(dashboard(), histograms) <= set(documented())


def test_a_joined_gateway_exports_the_requests_it_answered_and_no_control_plane_metrics(
    served: tuple[Cirrus, str],
) -> None:
    cirrus, _ = served
    gateway = join(cirrus)
    try:
        with httpx.Client(timeout=10) as http:
            deadline = time.monotonic() + 15
            while http.post(gateway.api("batched"), json={"i": 1}).status_code != 200:
                assert time.monotonic() < deadline, "the joined gateway never served `batched`"
                time.sleep(0.1)
            text = http.get(f"{gateway.url}/metrics").text
    finally:
        log = gateway.stop()
        assert "Traceback" not in log, log[-4000:]
    on_page = families(text)
    assert 'cirrus_requests_total{api="batched",code="200",revision="1"}' in text
    assert "cirrus_stage_duration_seconds" in on_page
    assert not {name for name in on_page if name.startswith(("cirrus_replica", "cirrus_async", "cirrus_job"))}
