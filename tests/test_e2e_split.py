"""Traffic splitting and canary rollouts through the real daemon, CLI and gateway.

A splitter sends each request to one of its APIs by weight (within 2 percentage points over
10,000 requests), a copy to its shadow (which is slow and fails, and never slows or fails the
caller), and the same caller to the same API when it names itself in the sticky header. A canary
takes its share beside the serving revision; `cirrus get` shows both revisions' requests, errors
and latencies; `cirrus promote` and `cirrus rollback` finish and abort it while requests flow,
with none dropped.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from conftest import Cirrus, module_daemon, write_project
from test_e2e_revisions import Traffic

VALUE = """
    class Predictor:
        def __init__(self, config):
            self.value = config["value"]

        def predict(self, payload):
            return {{"value": self.value}}
"""

SHADOW = """
    import time


    class Predictor:
        def predict(self, payload):
            time.sleep(3)
            raise RuntimeError("the shadow fails every request")
"""

VERSIONED = """
    class Predictor:
        def predict(self, payload):
            return {{"value": {version!r}}}
"""

REQUESTS = 10_000


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cirrus]:
    with module_daemon(tmp_path_factory.mktemp("split") / "home") as cirrus:
        yield cirrus


def _cli_json(cirrus: Cirrus, *args: str) -> Any:
    code, out, err = cirrus.cli(*args, "-o", "json")
    assert code == 0, err + cirrus.daemon_log()[-3000:]
    return json.loads(out)


def _splitter_project(directory: Path) -> Path:
    """APIs `blue` (70 %) and `green` (30 %) behind `front`, with `slow-shadow` getting copies."""
    one = {"min_replicas": 1, "max_replicas": 1}
    write_project(
        directory,
        {"predictor.py": VALUE.format(), "shadow.py": SHADOW},
        apis=[
            {"name": "blue", "predictor": {"config": {"value": "blue"}}, "concurrency": {"max_concurrency": 64}},
            {"name": "green", "predictor": {"config": {"value": "green"}}, "concurrency": {"max_concurrency": 64}},
            {"name": "slow-shadow", "predictor": {"path": "shadow.py"}, "autoscaling": one},
        ],
    )
    apis = yaml.safe_load((directory / "cirrus.yaml").read_text())
    apis.append(
        {
            "name": "front",
            "kind": "splitter",
            "apis": [
                {"name": "blue", "weight": 70},
                {"name": "green", "weight": 30},
                {"name": "slow-shadow", "shadow": True},
            ],
            "sticky_header": "X-User",
        }
    )
    (directory / "cirrus.yaml").write_text(yaml.safe_dump(apis, sort_keys=False))
    return directory


async def _fire(url: str, count: int, headers: list[dict[str, str]] | None = None) -> list[tuple[int, Any, float]]:
    """POST `count` requests, 32 at a time: (status, body, seconds) of each."""
    results: list[tuple[int, Any, float]] = []
    limits = httpx.Limits(max_connections=32, max_keepalive_connections=32)
    async with httpx.AsyncClient(timeout=30, limits=limits) as http:
        queue = list(range(count))

        async def worker() -> None:
            while queue:
                n = queue.pop()
                started = time.perf_counter()
                response = await http.post(url, json={}, headers=headers[n % len(headers)] if headers else None)
                body = response.json() if response.is_success else response.text
                results.append((response.status_code, body, time.perf_counter() - started))

        await asyncio.gather(*(worker() for _ in range(32)))
    return results


def test_a_splitter_honours_weights_shadows_and_sticky_callers(shared: Cirrus, tmp_path: Path) -> None:
    code, _, err = shared.cli("deploy", str(_splitter_project(tmp_path / "split")), "--timeout", "60")
    assert code == 0, err + shared.daemon_log()[-3000:]
    url = shared.url("/front")

    results = asyncio.run(_fire(url, REQUESTS))
    statuses = Counter(status for status, _, _ in results)
    assert statuses == {200: REQUESTS}, [r for r in results if r[0] != 200][:3]  # the failing shadow fails nobody
    shares = Counter(body["value"] for _, body, _ in results)
    assert abs(shares["blue"] / REQUESTS - 0.70) <= 0.02 and abs(shares["green"] / REQUESTS - 0.30) <= 0.02, shares
    assert max(seconds for _, _, seconds in results) < 3.0  # nobody waited for the 3 s shadow

    status = _cli_json(shared, "get", "front")
    traffic = {t["target"]: t for t in status["traffic"]}
    assert traffic["blue"]["requests"] == shares["blue"] and traffic["blue"]["weight"] == 70
    assert traffic["green"]["requests"] == shares["green"]
    shadow = traffic["slow-shadow"]
    assert shadow["role"] == "shadow" and shadow["weight"] is None

    # The shadow got copies (one replica at a time: most copies find it busy and are dropped) and
    # each one it answered failed: its errors count there, not against the splitter.
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and not shadow["requests"]:
        time.sleep(0.5)
        shadow = {t["target"]: t for t in _cli_json(shared, "get", "front")["traffic"]}["slow-shadow"]
    assert shadow["requests"] >= 1 and shadow["errors"] == shadow["requests"]
    assert status["requests_last_minute"] == REQUESTS

    # A caller that names itself always lands on the same API.
    users = [{"X-User": f"user-{n}"} for n in range(40)]
    landed = {user: set(values) for user, values in asyncio.run(_fire_each(url, users)).items()}
    assert all(len(values) == 1 for values in landed.values()), landed
    assert {next(iter(v)) for v in landed.values()} == {"blue", "green"}  # 40 callers spread over both


async def _fire_each(url: str, users: list[dict[str, str]]) -> dict[str, list[str]]:
    """Each user's answers to 10 requests of theirs."""
    out: dict[str, list[str]] = {}
    async with httpx.AsyncClient(timeout=30) as http:
        for headers in users:
            for _ in range(10):
                response = await http.post(url, json={}, headers=headers)
                assert response.status_code == 200
                out.setdefault(headers["X-User"], []).append(response.json()["value"])
    return out


def test_a_splitter_whose_api_is_gone_answers_503_and_says_which(shared: Cirrus, tmp_path: Path) -> None:
    project = write_project(tmp_path / "gone", VALUE.format(), name="lonely", predictor={"config": {"value": "x"}})
    apis = yaml.safe_load((project / "cirrus.yaml").read_text())
    apis.append({"name": "lonely-front", "kind": "splitter", "apis": [{"name": "lonely", "weight": 100}]})
    (project / "cirrus.yaml").write_text(yaml.safe_dump(apis, sort_keys=False))
    code, _, err = shared.cli("deploy", str(project), "--timeout", "60")
    assert code == 0, err
    assert httpx.post(shared.url("/lonely-front"), json={}).json() == {"value": "x"}
    code, _, err = shared.cli("delete", "lonely")
    assert code == 0, err
    response = httpx.post(shared.url("/lonely-front"), json={})
    assert response.status_code == 503 and "'lonely', which is not deployed" in response.json()["error"]
    assert response.headers["retry-after"] == "1"


def _versioned(directory: Path, version: str) -> Path:
    return write_project(
        directory,
        VERSIONED.format(version=version),
        name="canaried",
        autoscaling={"min_replicas": 2, "max_replicas": 2},
    )


def _deploy(cirrus: Cirrus, project: Path, *flags: str) -> dict[str, Any]:
    code, out, err = cirrus.cli("deploy", str(project), "-o", "json", "--timeout", "60", *flags)
    assert code == 0, err + cirrus.daemon_log()[-3000:]
    [result] = json.loads(out)
    return result


def _share_of(traffic: Traffic, value: str, answers: int) -> float:
    start = len(traffic.seen)
    deadline = time.monotonic() + 60
    while len(traffic.seen) - start < answers and time.monotonic() < deadline:
        time.sleep(0.05)
    window = [body["value"] for status, body in traffic.seen[start : start + answers] if status == 200]
    return window.count(value) / len(window)


def test_a_canary_is_promoted_and_another_aborted_with_no_request_dropped(shared: Cirrus, tmp_path: Path) -> None:
    project = tmp_path / "canary"
    assert _deploy(shared, _versioned(project, "v1"))["revision"] == 1
    with Traffic(shared.url("/canaried")) as traffic:
        traffic.wait_for_value("v1")
        traffic.phase = "canary v2"
        result = _deploy(shared, _versioned(project, "v2"), "--canary", "10")
        assert result["revision"] == 2
        traffic.wait_for_value("v2")
        assert abs(_share_of(traffic, "v2", 2000) - 0.10) <= 0.02

        status = _cli_json(shared, "get", "canaried")
        assert status["status"] == "canary" and status["canary_percent"] == 10
        roles = {t["role"]: t for t in status["traffic"]}
        assert roles["serving"]["target"] == "revision 1" and roles["canary"]["target"] == "revision 2"
        assert roles["canary"]["requests"] > 0 and roles["canary"]["errors"] == 0
        assert roles["canary"]["p50_ms"] is not None and roles["serving"]["p99_ms"] is not None
        code, table, _ = shared.cli("get", "canaried")
        assert code == 0 and "revision 2" in table and "canary" in table and "ERROR RATE" in table

        traffic.phase = "promote"
        code, _, err = shared.cli("promote", "canaried", "--timeout", "60")
        assert code == 0, err
        traffic.wait_for_value("v2")
        assert _share_of(traffic, "v2", 300) == 1.0

        traffic.phase = "canary v3, then abort"
        assert _deploy(shared, _versioned(project, "v3"), "--canary", "30")["revision"] == 3
        traffic.wait_for_value("v3")
        code, out, err = shared.cli("rollback", "canaried", "--timeout", "60")
        assert code == 0 and "canary 3 aborted" in out, err
        assert _share_of(traffic, "v2", 300) == 1.0
        traffic.phase = "done"
    assert traffic.failures() == []
    revisions = {r["revision"]: r["role"] for r in _cli_json(shared, "revisions", "canaried")}
    assert revisions == {1: "", 2: "serving", 3: ""}
