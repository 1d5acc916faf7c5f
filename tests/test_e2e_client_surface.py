"""The Python clients against a real daemon, beyond deploy/get/predict: one exception hierarchy
with HTTP statuses, streams read as they arrive (and failing visibly midway), async APIs (submit,
wait, result), the asyncio client, and a package namespace of public names only."""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import ECHO_PREDICTOR, Cirrus, module_daemon, write_project

import cirrus
from cirrus import (
    AsyncClient,
    AsyncRequest,
    CirrusError,
    Client,
    DaemonNotRunningError,
    InvalidSpecError,
    NotFoundError,
    RequestFailedError,
    RequestPendingError,
    StreamError,
)
from cirrus.client_common import SseDecoder
from cirrus.jobs import DEFAULT_BATCH_SIZE
from cirrus.spec import SpecError
from cirrus.store.base import Status

PREDICTORS = {
    "predictor.py": ECHO_PREDICTOR,
    "streamers.py": """
        import time


        class Tokens:
            def predict(self, payload):
                for i in range(payload["n"]):
                    time.sleep(payload["delay"])
                    yield {"token": i}


        class Broken:
            def predict(self, payload):
                yield "one "
                time.sleep(0.2)
                raise RuntimeError("the model fell over")
    """,
    "worker.py": """
        import time


        class Worker:
            def predict(self, payload):
                if payload.get("explode"):
                    raise RuntimeError("boom")
                time.sleep(payload.get("delay", 0))
                return {"double": payload["x"] * 2}
    """,
}


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cirrus]:
    root = tmp_path_factory.mktemp("client-surface")
    project = write_project(
        root / "project",
        PREDICTORS,
        apis=[
            {"name": "echo"},
            {"name": "tokens", "predictor": {"path": "streamers.py", "class": "Tokens"}},
            {"name": "broken", "predictor": {"path": "streamers.py", "class": "Broken"}},
            {
                "name": "jobs",
                "kind": "async",
                "predictor": {"path": "worker.py", "class": "Worker"},
                "queue": {"max_attempts": 1, "lease_s": 5.0},
            },
        ],
    )
    with module_daemon(root / "home") as env:
        env.client().deploy(project)
        yield env


# --- exceptions -----------------------------------------------------------------------------------


def test_a_bad_path_raises_a_cirrus_error_that_is_still_a_spec_error(gateway: Cirrus, tmp_path: Path) -> None:
    client = gateway.client()
    with pytest.raises(InvalidSpecError, match="no such file or directory") as excinfo:
        client.deploy(tmp_path / "nowhere")
    assert isinstance(excinfo.value, CirrusError) and isinstance(excinfo.value, SpecError)
    assert isinstance(excinfo.value, ValueError) and excinfo.value.status is None
    (tmp_path / "cirrus.yaml").write_text("- name: x\n  predictor: {path: p.py}\n  surprise: 1\n")
    with pytest.raises(InvalidSpecError, match="surprise"):
        client.deploy(tmp_path)


def test_an_unknown_api_is_a_404(gateway: Cirrus) -> None:
    client = gateway.client()
    with pytest.raises(NotFoundError, match="no API named 'nope'") as excinfo:
        client.get("nope")
    assert excinfo.value.status == 404 and isinstance(excinfo.value, CirrusError)
    with pytest.raises(NotFoundError) as excinfo:
        list(client.stream("nope", {}))
    assert excinfo.value.status == 404
    with pytest.raises(NotFoundError):
        client.status("jobs", "0" * 32)


def test_a_refused_deploy_carries_its_status(gateway: Cirrus, tmp_path: Path) -> None:
    project = write_project(tmp_path / "p", ECHO_PREDICTOR, name="fresh")
    with pytest.raises(CirrusError, match="not deployed") as excinfo:
        gateway.client().deploy(project, canary=10)  # a canary needs a serving revision
    assert excinfo.value.status == 409


def test_no_daemon_is_a_daemon_not_running_error(cirrus: Cirrus) -> None:
    with Client(cirrus.settings) as client, pytest.raises(DaemonNotRunningError, match="cirrus up"):
        client.get()


def test_jobs_default_to_the_cli_batch_size() -> None:
    from cirrus.cli_jobs import jobs_submit

    cli_default = inspect.signature(jobs_submit).parameters["batch_size"].default
    client_default = inspect.signature(Client.submit_job).parameters["batch_size"].default
    assert cli_default == client_default == DEFAULT_BATCH_SIZE


# --- streams --------------------------------------------------------------------------------------


def test_stream_yields_the_first_chunk_before_the_stream_ends(gateway: Cirrus) -> None:
    started = time.perf_counter()
    arrivals, body = [], b""
    for chunk in gateway.client().stream("tokens", {"n": 6, "delay": 0.15}):
        arrivals.append(time.perf_counter() - started)
        body += chunk
    assert arrivals[0] < 0.6 < arrivals[-1]
    assert body.decode().splitlines() == [f'{{"token":{i}}}' for i in range(6)]


def test_stream_events_are_the_predictors_chunks(gateway: Cirrus) -> None:
    events = list(gateway.client().stream_events("tokens", {"n": 3, "delay": 0.0}))
    assert events == [f'{{"token":{i}}}' for i in range(3)]


def test_a_stream_that_fails_midway_raises(gateway: Cirrus) -> None:
    client = gateway.client()
    received = []
    with pytest.raises(StreamError, match="failed midway"):
        for chunk in client.stream("broken", {}):
            received.append(chunk)
    assert b"".join(received) == b"one "
    events = []
    with pytest.raises(StreamError, match="the predictor failed") as excinfo:
        for event in client.stream_events("broken", {}):
            events.append(event)
    assert events == ["one "] and isinstance(excinfo.value, CirrusError)


def test_sse_decoder() -> None:
    decoder = SseDecoder()
    lines = [": comment", "data: a", "data:  b", "", "", "event: error", "data: x", ""]
    assert [e for e in map(decoder.line, lines) if e] == [("message", "a\n b"), ("error", "x")]


# --- async APIs -----------------------------------------------------------------------------------


def test_submit_wait_result(gateway: Cirrus) -> None:
    client = gateway.client()
    request_id = client.submit("jobs", {"x": 21, "delay": 1.0})
    with pytest.raises(RequestPendingError):
        client.result("jobs", request_id)
    record = client.wait("jobs", request_id, timeout=30)
    assert (record.status, record.result) == (Status.COMPLETED, {"double": 42})
    assert client.result("jobs", request_id) == {"double": 42}

    failing = client.submit("jobs", {"explode": True})
    assert client.wait("jobs", failing, timeout=30).status is Status.FAILED
    with pytest.raises(RequestFailedError) as excinfo:
        client.result("jobs", failing)
    assert isinstance(excinfo.value.request, AsyncRequest) and excinfo.value.request.error

    with pytest.raises(CirrusError, match="not 202"):
        client.submit("echo", {"x": 1})  # a realtime API answers at once


def test_wait_times_out(gateway: Cirrus) -> None:
    client = gateway.client()
    request_id = client.submit("jobs", {"x": 1, "delay": 3})
    with pytest.raises(TimeoutError, match="still"):
        client.wait("jobs", request_id, timeout=0.3)
    client.wait("jobs", request_id, timeout=30)


# --- the asyncio client ---------------------------------------------------------------------------


def test_async_client(gateway: Cirrus) -> None:
    async def scenario() -> None:
        async with AsyncClient(gateway.settings) as client:
            apis = await client.get()
            assert {api.name for api in apis} == {"echo", "tokens", "broken", "jobs"}
            assert (await client.get("echo")).name == "echo"
            with pytest.raises(NotFoundError):
                await client.get("nope")
            response = await client.predict("echo", {"q": 1})
            assert response.json()["echo"] == {"q": 1}

            started = time.perf_counter()
            arrivals = []
            async for _ in client.stream("tokens", {"n": 5, "delay": 0.15}):
                arrivals.append(time.perf_counter() - started)
            assert arrivals[0] < 0.5 < arrivals[-1]
            assert [e async for e in client.stream_events("tokens", {"n": 2, "delay": 0})] == [
                '{"token":0}',
                '{"token":1}',
            ]
            with pytest.raises(StreamError):
                async for _ in client.stream_events("broken", {}):
                    pass

            request_id = await client.submit("jobs", {"x": 5})
            assert (await client.wait("jobs", request_id, timeout=30)).finished
            assert await client.result("jobs", request_id) == {"double": 10}

    asyncio.run(scenario())


# --- the package ----------------------------------------------------------------------------------


def test_dir_cirrus_lists_public_names_only() -> None:
    names = dir(cirrus)
    assert names == sorted(cirrus.__all__)
    assert {"Client", "AsyncClient", "CirrusError", "HTTPError", "Response", "__version__"} <= set(names)
    assert not {"Any", "TYPE_CHECKING", "import_module"} & set(names)
    assert all(not name.startswith("_") or name == "__version__" for name in names)
    for name in cirrus.__all__:
        assert getattr(cirrus, name) is not None
