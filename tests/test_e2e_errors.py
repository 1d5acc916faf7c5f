"""Every bad-input and failure status, through real HTTP to the gateway of a real daemon.

One daemon (with a small body limit) serves the whole module; each behaviour has its own API so
that a crash, a hang or an overload in one test cannot disturb another.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from conftest import Cirrus, module_daemon, wait_gone, write_project

MAX_BODY_BYTES = 4096

PREDICTORS = {
    "echo.py": """
        import cirrus


        class Predictor:
            def predict(self, payload, query_params, headers, request_id):
                if isinstance(payload, dict) and "respond" in payload:
                    spec = payload["respond"]
                    return cirrus.Response(spec["body"], status=spec["status"], headers=spec.get("headers"))
                if isinstance(payload, dict) and "http_error" in payload:
                    raise cirrus.HTTPError(payload["http_error"], "you asked for it")
                if isinstance(payload, bytes):
                    return {"type": "bytes", "len": len(payload), "head": list(payload[:4])}
                return {
                    "type": type(payload).__name__,
                    "payload": payload,
                    "query_params": query_params,
                    "headers": headers,
                    "request_id": request_id,
                }
    """,
    "binary.py": """
        class Predictor:
            def predict(self, payload):
                return bytes(reversed(payload))
    """,
    "typed.py": """
        from pydantic import BaseModel, Field


        class House(BaseModel):
            rooms: int = Field(ge=1)
            area_m2: float
            city: str = "Lyon"


        class Price(BaseModel):
            euros: float


        class Predictor:
            \"\"\"Prices a house.\"\"\"

            def predict(self, payload: House) -> Price:
                return Price(euros=1000.0 * payload.area_m2 + 5000 * payload.rooms)
    """,
    "raises.py": """
        class Predictor:
            def predict(self, payload, request_id):
                if payload.get("fail"):
                    raise ValueError(f"cannot score {payload['fail']!r}")
                return {"ok": True, "request_id": request_id}
    """,
    "hangs.py": """
        import time


        class Predictor:
            def predict(self, payload):
                time.sleep(payload.get("sleep", 0))
                return {"slept": payload.get("sleep", 0)}
    """,
    "slow.py": """
        import time


        class Predictor:
            def predict(self, payload):
                time.sleep(1.0)
                return {"done": payload}
    """,
    "suicide.py": """
        import os
        import signal


        class Predictor:
            def predict(self, payload):
                if payload.get("kill"):
                    os.kill(os.getpid(), signal.SIGKILL)
                if payload.get("exit") is not None:
                    os._exit(payload["exit"])
                return {"alive": os.getpid()}
    """,
}

APIS = [
    {"name": "echo", "predictor": {"path": "echo.py"}},
    {"name": "binary", "predictor": {"path": "binary.py"}},
    {"name": "typed", "predictor": {"path": "typed.py"}},
    {"name": "raises", "predictor": {"path": "raises.py"}},
    {
        "name": "hangs",
        "predictor": {"path": "hangs.py"},
        "concurrency": {"timeout_s": 0.5, "max_concurrency": 4, "inference_slots": 2},
    },
    {
        "name": "slow",
        "predictor": {"path": "slow.py"},
        "concurrency": {"max_concurrency": 1, "max_queue_length": 1, "inference_slots": 1, "timeout_s": 10},
    },
    {"name": "suicide", "predictor": {"path": "suicide.py"}},
]


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cirrus]:
    """The module's daemon, with every API of APIS deployed and live."""
    root = tmp_path_factory.mktemp("errors")
    with module_daemon(root / "home", CIRRUS_MAX_BODY_BYTES=str(MAX_BODY_BYTES)) as cirrus:
        project = write_project(root / "project", PREDICTORS, apis=APIS)
        cirrus.client().deploy(project, timeout=60)
        yield cirrus


@pytest.fixture
def http(gw: Cirrus) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=gw.gateway_url, timeout=30) as client:
        yield client


def _error(response: httpx.Response) -> str:
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert set(body) >= {"error", "request_id"}, body
    assert body["request_id"] == response.headers["x-request-id"]
    return str(body["error"])


def test_unknown_api_is_404(http: httpx.Client) -> None:
    response = http.post("/nope", json={})
    assert response.status_code == 404
    assert response.json()["error"] == "no API at '/nope'"  # it names no other API
    assert "echo" in http.get("/").json()["apis"]  # the list is at GET /
    assert http.get("/nope/openapi.json").status_code == 404


def test_body_over_the_limit_is_413(http: httpx.Client) -> None:
    big = json.dumps({"text": "x" * MAX_BODY_BYTES})
    response = http.post("/echo", content=big, headers={"content-type": "application/json"})
    assert response.status_code == 413
    assert f"limit of {MAX_BODY_BYTES} bytes" in _error(response)

    def chunks() -> Iterator[bytes]:  # no Content-Length: the limit is enforced while reading
        for _ in range(8):
            yield b"y" * 1024

    response = http.post("/echo", content=chunks(), headers={"content-type": "text/plain"})
    assert response.status_code == 413
    assert response.request.headers["transfer-encoding"] == "chunked"

    small = http.post("/echo", content=b"z" * (MAX_BODY_BYTES - 10), headers={"content-type": "text/plain"})
    assert small.status_code == 200
    assert small.json()["type"] == "str"


def test_malformed_json_is_400(http: httpx.Client) -> None:
    response = http.post("/echo", content=b'{"a": ', headers={"content-type": "application/json"})
    assert response.status_code == 400
    assert "malformed JSON" in _error(response)


def test_typed_payload_is_validated_and_published(http: httpx.Client) -> None:
    ok = http.post("/typed", json={"rooms": 3, "area_m2": 80})
    assert ok.status_code == 200, ok.text
    assert ok.json() == {"euros": 95000.0}

    response = http.post("/typed", json={"rooms": 0, "area_m2": "big"})
    assert response.status_code == 422
    body = response.json()
    assert body["error"] == "payload failed validation"
    fields = {tuple(item["loc"]): item for item in body["detail"]}
    assert set(fields) == {("rooms",), ("area_m2",)}
    assert fields[("rooms",)]["type"] == "greater_than_equal"
    assert "number" in fields[("area_m2",)]["msg"]
    missing = http.post("/typed", json={"area_m2": 10})
    assert missing.status_code == 422
    assert [(tuple(e["loc"]), e["type"]) for e in missing.json()["detail"]] == [(("rooms",), "missing")]

    doc = http.get("/typed/openapi.json")
    assert doc.status_code == 200
    spec = doc.json()
    assert spec["info"]["title"] == "typed" and "Prices a house" in spec["info"]["description"]
    schemas = spec["components"]["schemas"]
    assert set(schemas["House"]["properties"]) == {"rooms", "area_m2", "city"}
    assert schemas["House"]["required"] == ["rooms", "area_m2"]
    assert "euros" in schemas["Price"]["properties"]
    operation = spec["paths"]["/typed"]["post"]
    assert operation["requestBody"]["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/House"}
    assert "422" in operation["responses"]

    docs = http.get("/typed/docs")
    assert docs.status_code == 200
    assert docs.headers["content-type"].startswith("text/html")
    assert "<html" in docs.text.lower() and "/typed/openapi.json" in docs.text


def test_request_id_is_echoed_or_generated(http: httpx.Client) -> None:
    given = http.post("/echo", json={}, headers={"x-request-id": "trace-42.a"})
    assert given.status_code == 200
    assert given.headers["x-request-id"] == "trace-42.a"
    assert given.json()["request_id"] == "trace-42.a"

    generated = http.post("/echo", json={})
    rid = generated.headers["x-request-id"]
    assert re.fullmatch(r"[0-9a-f]{32}", rid)
    assert generated.json()["request_id"] == rid
    assert http.post("/echo", json={}).headers["x-request-id"] != rid

    bogus = http.post("/echo", json={}, headers={"x-request-id": "no spaces allowed"})
    assert re.fullmatch(r"[0-9a-f]{32}", bogus.headers["x-request-id"])

    error = http.post("/nope", json={}, headers={"x-request-id": "rid-404"})
    assert error.status_code == 404
    too_big = http.post("/echo", content=b"x" * (MAX_BODY_BYTES + 1), headers={"x-request-id": "rid-413"})
    assert too_big.headers["x-request-id"] == "rid-413"


def test_predictor_exception_is_500_without_traceback(gw: Cirrus, http: httpx.Client) -> None:
    response = http.post("/raises", json={"fail": "item-7"}, headers={"x-request-id": "boom-1"})
    assert response.status_code == 500
    message = _error(response)
    assert message == "the predictor failed; see the replica log (request id boom-1)"  # no message: it may leak
    assert response.json()["request_id"] == "boom-1"
    assert "Traceback" not in response.text and "raises.py" not in response.text

    code, logs, err = gw.cli("logs", "raises")
    assert code == 0, err
    assert "request boom-1: the predictor raised" in logs
    assert "Traceback (most recent call last)" in logs
    assert "ValueError: cannot score 'item-7'" in logs

    after = http.post("/raises", json={"fail": None})
    assert after.status_code == 200
    assert after.json()["ok"] is True
    [replica] = gw.client().get("raises").replicas
    assert replica.restarts == 0  # an exception is not a crash


def test_http_error_and_custom_response(http: httpx.Client) -> None:
    teapot = http.post("/echo", json={"http_error": 418})
    assert teapot.status_code == 418
    assert _error(teapot) == "you asked for it"

    created = http.post(
        "/echo", json={"respond": {"body": {"id": 7}, "status": 201, "headers": {"X-Model-Version": "v2"}}}
    )
    assert created.status_code == 201
    assert created.json() == {"id": 7}
    assert created.headers["x-model-version"] == "v2"
    assert created.headers["content-type"] == "application/json"
    assert created.headers["x-request-id"]

    text = http.post("/echo", json={"respond": {"body": "accepted", "status": 202}})
    assert (text.status_code, text.text) == (202, "accepted")
    assert text.headers["content-type"].startswith("text/plain")


def test_hang_past_timeout_is_504(gw: Cirrus, http: httpx.Client) -> None:
    response = http.post("/hangs", json={"sleep": 3})
    assert response.status_code == 504
    assert re.search(r"did not answer within 0\.\d+s", _error(response))
    assert response.elapsed.total_seconds() < 2.5
    # The stuck call keeps its slot, but the other slot still serves.
    quick = http.post("/hangs", json={"sleep": 0})
    assert quick.status_code == 200


def test_overload_beyond_running_and_queued_is_503(http: httpx.Client, gw: Cirrus) -> None:
    async def burst() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=gw.gateway_url, timeout=30) as client:
            return await asyncio.gather(*(client.post("/slow", json=i) for i in range(5)))

    responses = asyncio.run(burst())
    statuses = sorted(r.status_code for r in responses)
    assert statuses == [200, 200, 503, 503, 503], [(r.status_code, r.text) for r in responses]
    for response in responses:
        if response.status_code == 503:
            assert response.headers["retry-after"] == "1"
            assert "queue is full" in _error(response)
        else:
            assert response.json()["done"] in range(5)
    assert http.post("/slow", json="later").status_code == 200  # capacity comes back


def _restarted(gw: Cirrus, api: str, restarts: int) -> tuple[int, str]:
    status = gw.wait_for(
        api, lambda s: s.status == "live" and s.replicas[0].restarts >= restarts and s.replicas[0].pid is not None
    )
    [replica] = status.replicas
    assert replica.pid is not None
    return replica.pid, replica.last_error or ""


def test_replica_that_kills_itself_is_restarted(gw: Cirrus, http: httpx.Client) -> None:
    before = http.post("/suicide", json={})
    assert before.status_code == 200
    first_pid = before.json()["alive"]

    killed = http.post("/suicide", json={"kill": True})
    assert 500 <= killed.status_code < 600
    assert "closed its connection" in _error(killed)
    assert not wait_gone({first_pid})
    pid, last_error = _restarted(gw, "suicide", 1)
    assert pid != first_pid
    assert "killed by signal 9 (SIGKILL)" in last_error
    recovered = http.post("/suicide", json={})
    assert recovered.status_code == 200 and recovered.json()["alive"] == pid

    exited = http.post("/suicide", json={"exit": 3})
    assert 500 <= exited.status_code < 600
    pid2, last_error = _restarted(gw, "suicide", 2)
    assert pid2 != pid
    assert "exited with code 3" in last_error
    assert http.post("/suicide", json={}).json()["alive"] == pid2
    code, out, _ = gw.cli("get", "suicide")
    assert code == 0 and "exited with code 3" in out


def test_content_types_reach_the_predictor(http: httpx.Client) -> None:
    text = http.post("/echo", content="héllo".encode(), headers={"content-type": "text/plain; charset=utf-8"})
    assert text.status_code == 200
    assert (text.json()["type"], text.json()["payload"]) == ("str", "héllo")

    raw = http.post("/echo", content=b"\x00\xffab\x01", headers={"content-type": "application/octet-stream"})
    assert raw.json() == {"type": "bytes", "len": 5, "head": [0, 255, 97, 98]}

    as_json = http.post("/echo", json=[1, "two", None])
    assert (as_json.json()["type"], as_json.json()["payload"]) == ("list", [1, "two", None])

    back = http.post("/binary", content=b"\x01\x02\x03", headers={"content-type": "application/octet-stream"})
    assert back.status_code == 200
    assert back.headers["content-type"] == "application/octet-stream"
    assert back.content == b"\x03\x02\x01"

    bad_text = http.post("/echo", content=b"\xff\xfe", headers={"content-type": "text/plain"})
    assert bad_text.status_code == 400
    assert "UTF-8" in _error(bad_text)


def test_query_params_headers_and_request_id_are_injected(http: httpx.Client) -> None:
    response = http.post(
        "/echo?limit=5&lang=fr&empty=",
        json={"k": 1},
        headers={"X-Custom-Thing": "abc", "x-request-id": "inj-1", "Authorization": "Bearer t"},
    )
    assert response.status_code == 200
    body = response.json()
    assert body["payload"] == {"k": 1}
    assert body["query_params"] == {"limit": "5", "lang": "fr", "empty": ""}
    assert body["request_id"] == "inj-1"
    headers = body["headers"]
    assert headers["x-custom-thing"] == "abc"
    assert headers["authorization"] == "Bearer t"
    assert headers["content-type"] == "application/json"
    assert all(key == key.lower() for key in headers)
    assert "host" not in headers and "content-length" not in headers


def test_bad_spec_is_rejected_and_nothing_deployed(gw: Cirrus, tmp_path: Path) -> None:
    project = write_project(
        tmp_path / "bad",
        "class Predictor:\n    def predict(self, payload):\n        return payload\n",
        name="typo",
        concurrency={"max_concurrancy": 4},
    )
    code, out, err = gw.cli("deploy", str(project))
    assert code == 1
    assert str(project / "cirrus.yaml") in err
    assert "API 'typo'" in err
    assert "concurrency.max_concurrancy: unknown field" in err
    assert "max_concurrency" in err  # it says what is allowed
    assert "Traceback" not in out + err

    (project / "cirrus.yaml").write_text("- name: typo\n  predictor: {path: missing.py}\n")
    code, _, err = gw.cli("deploy", str(project))
    assert code == 1
    assert "API 'typo': predictor.path" in err and "does not exist" in err

    code, out, _ = gw.cli("get", "-o", "json")
    assert code == 0
    assert "typo" not in {api["name"] for api in json.loads(out)}
    assert gw.cli("get", "typo")[0] == 1


def test_predictor_whose_init_raises_fails_the_deploy(gw: Cirrus, tmp_path: Path) -> None:
    project = write_project(
        tmp_path / "broken",
        """
        class Predictor:
            def __init__(self, config):
                raise RuntimeError("weights file is corrupt")

            def predict(self, payload):
                return payload
        """,
        name="broken",
        concurrency={"timeout_s": 1},
    )
    code, out, err = gw.cli("deploy", str(project), "--timeout", "30")
    try:
        assert code == 1, out + err
        assert "API 'broken' failed to start" in err
        assert "RuntimeError: weights file is corrupt" in err
        assert "Traceback" not in err

        code, out, _ = gw.cli("get", "broken", "-o", "json")
        assert code == 0
        status = json.loads(out)
        assert status["status"] == "error"
        assert "weights file is corrupt" in status["message"]
        assert status["replicas_ready"] == 0
        assert "weights file is corrupt" in gw.cli("logs", "broken")[1]
        # No revision can serve: the gateway answers at once, naming the load error (it used to hold the
        # request for timeout_s and then say only that no replica became ready).
        answered = gw.client().predict("broken", {}, timeout=10)
        assert answered.status_code == 503
        assert "revision 1 does not load" in _error(answered)
        assert "RuntimeError: weights file is corrupt" in _error(answered)
    finally:
        gw.cli("delete", "broken")
