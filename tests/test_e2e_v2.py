"""The Open Inference Protocol (v2) over REST, driven by the real `tritonclient.http` against a real
daemon: health, metadata, FP32 / INT64 / BYTES tensors as JSON and in the binary extension,
requested outputs, request parameters, errors, and concurrent requests batched together.

One daemon serves the module: `tensors` declares its inputs and outputs in its spec (and batches),
`declares` in its predictor, `echo` declares nothing and returns its inputs, `plain` does not speak v2.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from typing import Any

import httpx
import numpy as np
import pytest
import tritonclient.http as triton
import tritonclient.http.aio as triton_aio
from conftest import Cirrus, module_daemon, write_project
from tritonclient.utils import InferenceServerException

PREDICTORS = {
    "tensors.py": """
        import time

        import numpy as np


        class Predictor:
            def predict(self, payload):
                return self.answer(payload, 1)

            def predict_batch(self, payloads):
                time.sleep(0.02)
                return [self.answer(p, len(payloads)) for p in payloads]

            def answer(self, payload, batch):  # (docs/protocols.md shows this predictor)
                scale = payload.parameters.get("scale", 2)
                return {
                    "doubled": payload["x"] * scale,
                    "next": payload["ids"] + 1,
                    "upper": np.array([w.upper() for w in payload["words"]], dtype=object),
                    "batch": [batch],
                }
    """,
    "echo.py": """
        import cirrus


        class Predictor:
            def predict(self, payload):
                if payload.parameters.get("refuse"):
                    raise cirrus.HTTPError(422, "refused as asked")
                return dict(payload)
    """,
    "declares.py": """
        class Predictor:
            def get_input_types(self):
                return [{"name": "a", "datatype": "INT32", "shape": [-1]}]

            def get_output_types(self):
                return [{"name": "a", "datatype": "FP64", "shape": [-1]}]

            def predict(self, payload):
                return {"a": payload["a"]}
    """,
    "plain.py": """
        class Predictor:
            def predict(self, payload):
                return payload
    """,
}

TENSORS = {
    "name": "tensors",
    "predictor": {"path": "tensors.py"},
    "concurrency": {"max_concurrency": 64},
    "batching": {"max_batch_size": 32, "max_wait_ms": 20},
    "protocol": {
        "name": "v2",
        "inputs": [
            {"name": "x", "datatype": "FP32", "shape": [-1, 4]},
            {"name": "ids", "datatype": "INT64", "shape": [-1]},
            {"name": "words", "datatype": "BYTES", "shape": [-1]},
        ],
        "outputs": [
            {"name": "doubled", "datatype": "FP32", "shape": [-1, 4]},
            {"name": "next", "datatype": "INT64", "shape": [-1]},
            {"name": "upper", "datatype": "BYTES", "shape": [-1]},
            {"name": "batch", "datatype": "INT32", "shape": [1]},
        ],
    },
}
APIS: list[dict[str, Any]] = [
    TENSORS,
    {"name": "echo", "predictor": {"path": "echo.py"}, "protocol": "v2"},
    {"name": "declares", "predictor": {"path": "declares.py"}, "protocol": "v2"},
    {"name": "plain", "predictor": {"path": "plain.py"}},
]


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cirrus]:
    root = tmp_path_factory.mktemp("v2")
    with module_daemon(root / "home") as cirrus:
        project = write_project(root / "project", PREDICTORS, apis=APIS)
        cirrus.client().deploy(project, timeout=60)
        yield cirrus


@pytest.fixture
def client(gw: Cirrus) -> Iterator[triton.InferenceServerClient]:
    with triton.InferenceServerClient(url=gw.gateway_url.removeprefix("http://").rstrip("/")) as client:
        yield client


def tensors_request(binary: bool, rows: int = 2) -> list[triton.InferInput]:
    x = triton.InferInput("x", [rows, 4], "FP32")
    x.set_data_from_numpy(np.arange(rows * 4, dtype=np.float32).reshape(rows, 4), binary_data=binary)
    ids = triton.InferInput("ids", [3], "INT64")
    ids.set_data_from_numpy(np.array([1, 2, 2**40], dtype=np.int64), binary_data=binary)
    words = triton.InferInput("words", [2], "BYTES")
    words.set_data_from_numpy(np.array([b"hello", "wörld".encode()], dtype=object), binary_data=binary)
    return [x, ids, words]


def test_health_and_server_metadata(client: triton.InferenceServerClient) -> None:
    assert client.is_server_live()
    assert client.is_server_ready()
    metadata = client.get_server_metadata()
    assert metadata["name"] == "cirrus"
    assert "binary_tensor_data" in metadata["extensions"]


def test_model_metadata_lists_the_declared_tensors(client: triton.InferenceServerClient) -> None:
    metadata = client.get_model_metadata("tensors")
    assert metadata["name"] == "tensors" and metadata["platform"] == "cirrus"
    assert metadata["versions"] == ["1"]
    assert metadata["inputs"] == TENSORS["protocol"]["inputs"]
    assert metadata["outputs"] == TENSORS["protocol"]["outputs"]
    assert client.get_model_metadata("echo")["inputs"] == []


def test_a_predictor_may_declare_the_tensors(client: triton.InferenceServerClient) -> None:
    metadata = client.get_model_metadata("declares")
    assert metadata["inputs"] == [{"name": "a", "datatype": "INT32", "shape": [-1]}]
    assert metadata["outputs"] == [{"name": "a", "datatype": "FP64", "shape": [-1]}]
    a = triton.InferInput("a", [2], "INT32")
    a.set_data_from_numpy(np.array([3, 4], dtype=np.int32))
    result = client.infer("declares", [a])
    assert result.get_response()["outputs"][0]["datatype"] == "FP64"  # converted to the declared datatype
    assert result.as_numpy("a").tolist() == [3.0, 4.0]
    wrong = triton.InferInput("a", [2], "FP32")
    wrong.set_data_from_numpy(np.array([3, 4], dtype=np.float32))
    with pytest.raises(InferenceServerException, match="input 'a' is FP32, but the model takes INT32"):
        client.infer("declares", [wrong])


def test_model_readiness(client: triton.InferenceServerClient) -> None:
    assert client.is_model_ready("tensors")
    assert client.is_model_ready("tensors", "1")
    assert not client.is_model_ready("tensors", "7")  # no such version
    assert not client.is_model_ready("missing")
    assert not client.is_model_ready("plain")  # deployed, but it does not speak v2


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
def test_fp32_int64_and_bytes_tensors(client: triton.InferenceServerClient, binary: bool) -> None:
    outputs = [triton.InferRequestedOutput(name, binary_data=binary) for name in ("doubled", "next", "upper")]
    result = client.infer("tensors", tensors_request(binary), outputs=outputs, request_id="req-1")
    assert result.get_response()["id"] == "req-1"
    assert result.get_response()["model_name"] == "tensors"
    doubled = result.as_numpy("doubled")
    assert doubled.dtype == np.float32 and doubled.shape == (2, 4)
    assert doubled.tolist() == (np.arange(8, dtype=np.float32).reshape(2, 4) * 2).tolist()
    assert result.as_numpy("next").tolist() == [2, 3, 2**40 + 1]
    upper = [w if isinstance(w, bytes) else w.encode() for w in result.as_numpy("upper").tolist()]
    assert upper == [b"HELLO", "WöRLD".encode()]
    for output in result.get_response()["outputs"]:
        assert ("parameters" in output) == binary  # binary_data_size, with the binary extension only


def test_only_the_requested_outputs_come_back_in_their_order(client: triton.InferenceServerClient) -> None:
    outputs = [triton.InferRequestedOutput("next", binary_data=False), triton.InferRequestedOutput("doubled")]
    result = client.infer("tensors", tensors_request(True), outputs=outputs)
    assert [o["name"] for o in result.get_response()["outputs"]] == ["next", "doubled"]
    assert result.get_output("upper") is None
    everything = client.infer("tensors", tensors_request(False))  # none named: all of them, binary
    assert [o["name"] for o in everything.get_response()["outputs"]] == ["doubled", "next", "upper", "batch"]


def test_request_parameters_reach_the_predictor(client: triton.InferenceServerClient) -> None:
    result = client.infer("tensors", tensors_request(False), parameters={"scale": 3})
    assert result.as_numpy("doubled").tolist() == (np.arange(8).reshape(2, 4) * 3).tolist()


@pytest.mark.parametrize(
    ("datatype", "values"),
    [
        ("BOOL", np.array([[True, False], [False, True]])),
        ("UINT8", np.array([0, 255], dtype=np.uint8)),
        ("UINT16", np.array([0, 65535], dtype=np.uint16)),
        ("UINT32", np.array([0, 2**32 - 1], dtype=np.uint32)),
        ("UINT64", np.array([0, 2**64 - 1], dtype=np.uint64)),
        ("INT8", np.array([-128, 127], dtype=np.int8)),
        ("INT16", np.array([-(2**15), 2**15 - 1], dtype=np.int16)),
        ("INT32", np.array([-(2**31), 2**31 - 1], dtype=np.int32)),
        ("INT64", np.array([-(2**63), 2**63 - 1], dtype=np.int64)),
        ("FP16", np.array([0.5, -2.0], dtype=np.float16)),
        ("FP32", np.array([[0.25, 1e30]], dtype=np.float32)),
        ("FP64", np.array([1e-300, 3.5], dtype=np.float64)),
        ("BYTES", np.array([b"\x00\xffraw", b""], dtype=object)),
    ],
)
def test_every_datatype_round_trips_in_binary(
    client: triton.InferenceServerClient, datatype: str, values: np.ndarray[Any, Any]
) -> None:
    tensor = triton.InferInput("t", list(values.shape), datatype)
    tensor.set_data_from_numpy(values, binary_data=True)
    result = client.infer("echo", [tensor], outputs=[triton.InferRequestedOutput("t", binary_data=True)])
    assert result.get_response()["outputs"][0]["datatype"] == datatype
    echoed = result.as_numpy("t")
    assert echoed.shape == values.shape and echoed.tolist() == values.tolist()


def test_a_large_tensor_round_trips_in_binary(client: triton.InferenceServerClient) -> None:
    values = np.random.default_rng(0).random((512, 1024), dtype=np.float32)  # 2 MiB: decoded off the event loop
    tensor = triton.InferInput("t", list(values.shape), "FP32")
    tensor.set_data_from_numpy(values, binary_data=True)
    result = client.infer("echo", [tensor], outputs=[triton.InferRequestedOutput("t", binary_data=True)])
    assert np.array_equal(result.as_numpy("t"), values)


def test_bf16_arrives_as_float32(client: triton.InferenceServerClient) -> None:
    tensor = triton.InferInput("t", [2], "BF16")
    tensor.set_data_from_numpy(np.array([1.5, -3.0], dtype=np.float32), binary_data=True)
    result = client.infer("echo", [tensor])
    assert result.get_response()["outputs"][0]["datatype"] == "FP32"  # (an undeclared output: numpy's dtype)
    assert result.as_numpy("t").tolist() == [1.5, -3.0]


def test_bad_requests_raise_the_servers_message(client: triton.InferenceServerClient) -> None:
    x = triton.InferInput("x", [2, 3], "FP32")  # the model takes [-1, 4]
    x.set_data_from_numpy(np.zeros((2, 3), dtype=np.float32))
    with pytest.raises(InferenceServerException) as bad_shape:
        client.infer("tensors", [x, *tensors_request(False)[1:]])
    assert bad_shape.value.status() == "400"
    assert "input 'x' has shape [2, 3], but the model takes [-1, 4]" in bad_shape.value.message()
    with pytest.raises(InferenceServerException, match="missing input 'words'"):
        client.infer("tensors", tensors_request(False)[:2])
    with pytest.raises(InferenceServerException, match="no model named 'missing'") as unknown:
        client.infer("missing", tensors_request(False))
    assert unknown.value.status() == "404"
    with pytest.raises(InferenceServerException, match="does not speak the Open Inference Protocol"):
        client.infer("plain", tensors_request(False))
    with pytest.raises(InferenceServerException, match="has no version '7'"):
        client.infer("tensors", tensors_request(False), model_version="7")
    with pytest.raises(InferenceServerException, match="refused as asked") as refused:
        client.infer("echo", tensors_request(False), parameters={"refuse": True})
    assert refused.value.status() == "422"
    with pytest.raises(InferenceServerException, match="unknown output 'nope'"):
        client.infer("echo", tensors_request(False), outputs=[triton.InferRequestedOutput("nope")])
    with pytest.raises(InferenceServerException, match="Content-Encoding gzip is not supported") as compressed:
        client.infer("echo", tensors_request(False), request_compression_algorithm="gzip")
    assert compressed.value.status() == "415"


def test_concurrent_requests_batch_together(gw: Cirrus) -> None:
    async def run() -> list[Any]:
        url = gw.gateway_url.removeprefix("http://").rstrip("/")
        async with triton_aio.InferenceServerClient(url=url, conn_limit=64) as client:
            requests = [client.infer("tensors", tensors_request(i % 2 == 0, rows=1 + i % 3)) for i in range(64)]
            return list(await asyncio.gather(*requests))

    results = asyncio.run(run())
    for i, result in enumerate(results):  # each its own answer
        rows = 1 + i % 3
        assert result.as_numpy("doubled").tolist() == (np.arange(rows * 4).reshape(rows, 4) * 2).tolist()
    sizes = [int(result.as_numpy("batch")[0]) for result in results]
    assert max(sizes) > 1, sizes


def test_the_raw_json_and_binary_shapes(gw: Cirrus) -> None:
    request = {
        "id": "raw",
        "inputs": [
            {"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [[1, 2, 3, 4]]},  # nested, as Triton allows
            {"name": "ids", "shape": [1], "datatype": "INT64", "data": [7]},
            {"name": "words", "shape": [1], "datatype": "BYTES", "data": ["a"]},
        ],
        "outputs": [{"name": "next"}],
    }
    with httpx.Client(base_url=gw.gateway_url, timeout=30) as http:
        answer = http.post("/v2/models/tensors/infer", json=request)
        assert answer.status_code == 200 and answer.headers["content-type"] == "application/json"
        assert answer.json() == {
            "model_name": "tensors",
            "model_version": "1",
            "id": "raw",
            "outputs": [{"name": "next", "datatype": "INT64", "shape": [1], "data": [8]}],
        }
        request["inputs"][0]["data"] = [1, 2, 3]  # type: ignore[index]
        bad = http.post("/v2/models/tensors/infer", json=request)
        assert bad.status_code == 400
        assert bad.json() == {"error": "input 'x': shape [1, 4] holds 4 elements, but `data` has 3"}
        header = json.dumps(
            {
                "inputs": [
                    {"name": "t", "shape": [2], "datatype": "INT32", "parameters": {"binary_data_size": 8}},
                ],
                "outputs": [{"name": "t", "parameters": {"binary_data": True}}],
            }
        ).encode()
        body = header + np.array([5, -6], dtype="<i4").tobytes()
        binary = http.post(
            "/v2/models/echo/infer",
            content=body,
            headers={"Inference-Header-Content-Length": str(len(header)), "Content-Type": "application/octet-stream"},
        )
        assert binary.status_code == 200, binary.text
        assert binary.headers["content-type"] == "application/octet-stream"
        length = int(binary.headers["inference-header-content-length"])
        head = json.loads(binary.content[:length])
        assert head["outputs"] == [
            {"name": "t", "datatype": "INT32", "shape": [2], "parameters": {"binary_data_size": 8}}
        ]
        assert np.frombuffer(binary.content[length:], dtype="<i4").tolist() == [5, -6]
        assert http.get("/v2/health/live").status_code == 200
        assert http.get("/v2/models/plain").json() == {
            "error": "API 'plain' does not speak the Open Inference Protocol: add `protocol: v2` to its spec"
        }
