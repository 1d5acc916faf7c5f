"""The CLI's output for scripts and pipes, end to end: piped output has no escape codes, no spinner
frames and no wrapped cells; `get -w` prints (NDJSON with `-o json`) as it polls; `predict` prints a
stream as it arrives and exits 1 when it fails midway; an async API shows its backlog."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import httpx
import pytest
from conftest import Cirrus, write_project

PREDICTORS = """
import time


class Echo:
    def predict(self, payload):
        return {"echo": payload}


class Slow:
    def predict(self, payload):
        yield "first\\n"
        time.sleep(2)
        yield "second\\n"


class Broken:
    def predict(self, payload):
        yield "one\\n"
        raise RuntimeError("the model fell over")


class Worker:
    def predict(self, payload):
        time.sleep(payload.get("sleep", 0.5))
        return {"done": payload}
"""

LONG = "a-very-long-api-name-that-would-not-fit-a-narrow-terminal"  # an endpoint wider than 80 columns
SPINNER_FRAMES = "⠋⠙⠹⠸⠼⠴⠦⠧⠇⠏"


@pytest.fixture(scope="module")
def deployed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Cirrus, str]]:
    """A daemon with every API deployed by a piped `cirrus deploy`; its stderr for the spinner check."""
    root = tmp_path_factory.mktemp("cli-output")
    streams = {"inference_slots": 1, "max_concurrency": 4, "timeout_s": 30}
    project = write_project(
        root / "project",
        PREDICTORS,
        apis=[
            {"name": LONG, "predictor": {"class": "Echo"}},
            {"name": "slow", "predictor": {"class": "Slow"}, "concurrency": streams},
            {"name": "broken", "predictor": {"class": "Broken"}},
            {
                "name": "worker",
                "kind": "async",
                "predictor": {"class": "Worker"},
                "concurrency": {"max_concurrency": 1, "timeout_s": 30},
            },
        ],
    )
    cirrus = Cirrus(root / "home", COLUMNS="80")  # a narrow terminal's width: piped output ignores it
    try:
        code, _, err = cirrus.cli("deploy", str(project))
        assert code == 0, err
        yield cirrus, err
    finally:
        assert cirrus.shutdown() == {}


def test_piped_output_has_no_escape_codes_spinners_or_wrapped_cells(deployed: tuple[Cirrus, str]) -> None:
    cirrus, deploy_err = deployed
    assert "\x1b" not in deploy_err
    assert not set(SPINNER_FRAMES) & set(deploy_err), deploy_err
    code, out, err = cirrus.cli("get")
    assert code == 0, err
    assert "\x1b" not in out
    [row] = [line.strip() for line in out.splitlines() if line.strip().startswith(LONG)]
    assert row.split()[:4] == [LONG, "realtime", "live", "1/1"]
    assert row.rstrip().endswith(f"{cirrus.gateway_url}/{LONG}")  # the whole endpoint, on the row's line
    code, out, _ = cirrus.cli("get", LONG)
    assert code == 0 and "\x1b" not in out
    assert f"{cirrus.gateway_url}/{LONG}" in out


def test_get_watch_prints_ndjson_as_it_polls(deployed: tuple[Cirrus, str]) -> None:
    cirrus, _ = deployed
    proc = subprocess.Popen(
        [sys.executable, "-m", "cirrus.cli", "get", "-w", "-o", "json", "--interval", "0.2"],
        env=cirrus.env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        lines = _read_lines(proc, 2, timeout=10)
        assert proc.poll() is None  # still watching
        for line in lines:
            assert {status["name"] for status in json.loads(line)} == {LONG, "slow", "broken", "worker"}
    finally:
        proc.kill()
        proc.wait()
        for stream in (proc.stdout, proc.stderr):
            assert stream is not None
            stream.close()


def test_predict_prints_a_stream_as_it_arrives(deployed: tuple[Cirrus, str]) -> None:
    cirrus, _ = deployed
    proc = subprocess.Popen(
        [sys.executable, "-m", "cirrus.cli", "predict", "slow", "{}"],
        env=cirrus.env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert _read_lines(proc, 1, timeout=10) == ["first\n"]
        assert proc.poll() is None, "the first chunk came only once the stream had ended"
        assert proc.wait(timeout=10) == 0
        assert proc.stdout is not None and proc.stdout.read() == "second\n"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for stream in (proc.stdout, proc.stderr):
            assert stream is not None
            stream.close()


def test_predict_exits_1_when_a_stream_fails_midway(deployed: tuple[Cirrus, str]) -> None:
    cirrus, _ = deployed
    code, out, err = cirrus.cli("predict", "broken", "{}")
    assert (code, out) == (1, "one\n"), err
    assert "stream failed" in err and "cut short" in err
    code, out, err = cirrus.cli("predict", "broken", "{}", "-H", "Accept: text/event-stream")
    assert (code, out) == (1, "data: one\n\n"), err
    assert "stream failed" in err and "the predictor failed" in err
    code, out, _ = cirrus.cli("predict", "broken", "{}", "-o", "json")
    answer = json.loads(out)
    assert code == 1 and answer["status"] == 200 and answer["body"] == "" and "cut short" in answer["error"]
    code, out, err = cirrus.cli("predict", LONG, '{"x": 1}', "-o", "json")
    answer = json.loads(out)
    assert code == 0, err
    assert answer["status"] == 200 and answer["body"] == {"echo": {"x": 1}} and "error" not in answer
    assert answer["headers"]["content-type"] == "application/json"


def test_dead_letters_of_a_realtime_api_is_an_error(deployed: tuple[Cirrus, str]) -> None:
    cirrus, _ = deployed
    code, out, err = cirrus.cli("dead-letters", LONG)
    assert code == 1 and not out
    assert "is realtime, not async" in err
    code, out, err = cirrus.cli("dead-letters", "worker")
    assert (code, out.strip()) == (0, "no dead letters in worker"), err


def test_an_async_api_shows_its_backlog(deployed: tuple[Cirrus, str]) -> None:
    cirrus, _ = deployed
    for _ in range(6):
        response = httpx.post(cirrus.url("worker"), json={"sleep": 0.5}, timeout=10)
        assert response.status_code == 202, response.text
    code, out, err = cirrus.cli("get", "worker", "-o", "json")
    assert code == 0, err
    status = json.loads(out)
    assert status["backlog_in_queue"] + status["backlog_in_progress"] >= 4, status
    assert status["backlog_in_queue"] >= 1 and status["backlog_oldest_age_s"] >= 0, status
    code, out, _ = cirrus.cli("get", "worker")
    assert code == 0 and "backlog" in out and "queued" in out and "the oldest waiting" in out
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        status = cirrus.client().get("worker").model_dump()
        if status["backlog_in_queue"] == 0 and status["backlog_in_progress"] == 0:
            break
        time.sleep(0.2)
    assert status["backlog_in_queue"] == 0 and status["backlog_oldest_age_s"] is None, status
    assert status["result_latency_p50_s"] is not None and status["result_latency_p50_s"] >= 0.5, status
    assert cirrus.client().get(LONG).backlog_in_queue is None  # a realtime API has none


def _read_lines(proc: subprocess.Popen[str], count: int, timeout: float) -> list[str]:
    """The next `count` lines of proc's stdout, failing when they do not come within `timeout`."""
    lines: list[str] = []

    def read() -> None:
        assert proc.stdout is not None
        while len(lines) < count:
            line = proc.stdout.readline()
            if not line:
                return
            lines.append(line)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(timeout)
    assert len(lines) == count, f"{len(lines)} of {count} lines within {timeout}s: {lines}"
    return lines
