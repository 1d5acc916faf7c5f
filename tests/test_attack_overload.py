"""Overload: ten times an API's capacity for a while; right answers or 503s, bounded memory.

The echo API holds 2 requests in flight and 8 in its queue, and each prediction sleeps 20 ms; 100
closed-loop clients (ten httpx async clients, ten workers each) send it unique payloads for
CIRRUS_OVERLOAD_S seconds (15 by default; the issue's full run is 60). Every 200 must echo its own
request's value, every other answer must be a 503 with Retry-After, connection errors must be rare,
the daemon's resident memory must stay bounded, and it must serve normally afterwards.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from conftest import Cirrus, module_daemon, write_project

from cirrus.types import ApiStatusName

DURATION_S = float(os.environ.get("CIRRUS_OVERLOAD_S", "15"))
CLIENTS = 10
WORKERS_PER_CLIENT = 10  # 100 in all: ten times the 2 in flight + 8 queued the API holds
MAX_RSS_MIB = 300.0
MAX_CONNECTION_ERROR_FRACTION = 0.001

SLOW_ECHO = """
    import time


    class Predictor:
        def predict(self, payload):
            time.sleep(0.02)
            return {"echo": payload}
"""


@pytest.fixture(scope="module")
def slow_echo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cirrus]:
    home = tmp_path_factory.mktemp("attack-overload") / "home"
    with module_daemon(home) as cirrus:
        project = write_project(
            home.parent / "slow-echo",
            SLOW_ECHO,
            concurrency={"max_concurrency": 2, "inference_slots": 2, "max_queue_length": 8, "timeout_s": 10},
        )
        cirrus.client().deploy(project)
        cirrus.wait_for("echo", lambda s: s.status == ApiStatusName.LIVE)
        yield cirrus


def _kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} in /proc/{pid}/status")


class RssSampler:
    """The largest VmRSS of `pid` seen, sampled every 50 ms from a thread."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.peak_kib = _kib(pid, "VmRSS")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            self.peak_kib = max(self.peak_kib, _kib(self.pid, "VmRSS"))

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


async def _drive(url: str, deadline: float) -> tuple[Counter[str], list[str]]:
    """Closed-loop workers until `deadline`: counts by outcome, and the wrong answers seen."""
    outcomes: Counter[str] = Counter()
    wrong: list[str] = []
    limits = httpx.Limits(max_connections=WORKERS_PER_CLIENT, max_keepalive_connections=WORKERS_PER_CLIENT)

    async def worker(client: httpx.AsyncClient, name: str) -> None:
        sequence = 0
        while time.monotonic() < deadline:
            sequence += 1
            unique = f"{name}-{sequence}"
            try:
                response = await client.post(url, json={"id": unique})
            except httpx.HTTPError as error:
                outcomes[f"error:{type(error).__name__}"] += 1
                continue
            if response.status_code == 200:
                if response.json() != {"echo": {"id": unique}}:
                    wrong.append(f"{unique}: {response.text[:200]}")
                outcomes["200"] += 1
            elif response.status_code == 503 and response.headers.get("retry-after"):
                outcomes["503"] += 1
            else:
                outcomes[f"{response.status_code}:{response.headers.get('retry-after')}"] += 1
                wrong.append(f"{unique}: {response.status_code} {response.text[:200]}")

    clients = [httpx.AsyncClient(timeout=15, limits=limits) for _ in range(CLIENTS)]
    try:
        await asyncio.gather(
            *(worker(client, f"c{c}w{w}") for c, client in enumerate(clients) for w in range(WORKERS_PER_CLIENT))
        )
    finally:
        for client in clients:
            await client.aclose()
    return outcomes, wrong


def test_ten_times_capacity_gets_right_answers_or_503(slow_echo: Cirrus) -> None:
    cirrus = slow_echo
    pid = cirrus.info.pid
    url = cirrus.url("echo")
    with RssSampler(pid) as rss:
        started = time.monotonic()
        outcomes, wrong = asyncio.run(_drive(url, started + DURATION_S))
        elapsed = time.monotonic() - started
    total = sum(outcomes.values())
    errors = sum(count for outcome, count in outcomes.items() if outcome.startswith("error:"))
    peak_mib = rss.peak_kib / 1024
    hwm_mib = _kib(pid, "VmHWM") / 1024
    summary = (
        f"overload {elapsed:.1f}s: {total} requests ({total / elapsed:.0f}/s), {dict(outcomes)}; "
        f"daemon peak VmRSS {peak_mib:.1f} MiB (VmHWM {hwm_mib:.1f} MiB)"
    )
    print(summary)
    assert not wrong, f"{summary}; wrong answers: {wrong[:5]}"
    assert outcomes["200"] > 0 and outcomes["503"] > 0, summary
    assert set(outcomes) <= {"200", "503"} | {o for o in outcomes if o.startswith("error:")}, summary
    assert errors <= MAX_CONNECTION_ERROR_FRACTION * total, summary
    assert peak_mib < MAX_RSS_MIB, summary
    # The 503s are counted in the metrics; the log gets a line a second with a count, not one each
    # (a line per refusal cost ~19 us of a 51 us 503 and flushed the rest of daemon.log out by rotation).
    logged = cirrus.daemon_log().count("answered 503")
    assert logged <= elapsed + 5, f"{logged} log lines for {outcomes['503']} 503s"

    assert cirrus.info.pid == pid
    with httpx.Client(timeout=10) as client:
        response = client.post(url, json={"id": "afterwards"})
    assert response.status_code == 200 and response.json() == {"echo": {"id": "afterwards"}}, response.text
    assert cirrus.client().get("echo").status == ApiStatusName.LIVE
