"""The Open Inference Protocol v2 over gRPC through a real daemon (`CIRRUS_GRPC_PORT`), driven by the
real `tritonclient.grpc`: health, metadata, FP32 / INT64 / BYTES tensors, requested outputs, errors,
and concurrent requests batched (gRPC with REST in the same batches).

One daemon serves the module.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from typing import Any

import httpx
import numpy as np
import pytest
import tritonclient.grpc as tritonclient_grpc
from conftest import Cirrus, module_daemon, write_project
from tritonclient.utils import InferenceServerException

PREDICTORS = {
    "double.py": """
        import numpy as np


        def doubled(value, times):
            if value.dtype == object:  # BYTES: each element twice over
                return np.array([bytes(v) * times for v in value.ravel()], dtype=object).reshape(value.shape)
            return value * times


        class Predictor:
            def predict(self, payload):
                times = payload.parameters.get("times", 2)
                return {name + "_doubled": doubled(value, times) for name, value in payload.items()}
    """,
    "batched.py": """
        import time

        import numpy as np


        class Predictor:
            def predict(self, payload):
                return {"y": payload["x"] * 2, "batch": np.array([1], dtype=np.int64)}

            def predict_batch(self, payloads):
                time.sleep(0.05)
                size = np.array([len(payloads)], dtype=np.int64)
                return [{"y": p["x"] * 2, "batch": size} for p in payloads]
    """,
}

MAX_BODY_BYTES = 4 * 1024 * 1024
APIS: list[dict[str, Any]] = [
    {"name": "double", "predictor": {"path": "double.py"}, "protocol": "v2"},
    {"name": "guarded", "predictor": {"path": "double.py"}, "protocol": "v2", "auth": "required"},
    {
        "name": "batched",
        "predictor": {"path": "batched.py"},
        "protocol": {
            "name": "v2",
            "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1]}],
            "outputs": [
                {"name": "y", "datatype": "FP32", "shape": [-1]},
                {"name": "batch", "datatype": "INT64", "shape": [1]},
            ],
        },
        "concurrency": {"max_concurrency": 32},
        "batching": {"max_batch_size": 32, "max_wait_ms": 5},
    },
]


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cirrus]:
    root = tmp_path_factory.mktemp("v2grpc")
    with module_daemon(root / "home", CIRRUS_GRPC_PORT="0", CIRRUS_MAX_BODY_BYTES=str(MAX_BODY_BYTES)) as cirrus:
        project = write_project(root / "project", PREDICTORS, apis=APIS)
        cirrus.client().deploy(project, timeout=60)
        yield cirrus


@pytest.fixture
def address(gw: Cirrus) -> str:
    address = gw.info.grpc_address
    assert address is not None, "daemon.json records no gRPC address"
    return address


@pytest.fixture
def client(address: str) -> Iterator[Any]:
    client = tritonclient_grpc.InferenceServerClient(address)
    yield client
    client.close()


def _input(name: str, array: np.ndarray, datatype: str) -> Any:
    tensor = tritonclient_grpc.InferInput(name, list(array.shape), datatype)
    tensor.set_data_from_numpy(array)
    return tensor


def test_health_and_metadata(client: Any) -> None:
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("double") and not client.is_model_ready("nope")
    server = client.get_server_metadata()
    assert server.name and "binary_tensor_data" in server.extensions
    model = client.get_model_metadata("batched")
    assert model.name == "batched" and model.versions
    assert [(t.name, t.datatype, list(t.shape)) for t in model.inputs] == [("x", "FP32", [-1])]
    assert [t.name for t in model.outputs] == ["y", "batch"]


def test_fp32_int64_and_bytes_tensors_and_requested_outputs(client: Any) -> None:
    x = np.array([[1.5, -2.0], [3.25, 4.0]], dtype=np.float32)
    n = np.array([2**40, -7, 0], dtype=np.int64)
    s = np.array([b"ab", b"\xffz"], dtype=np.object_)
    inputs = [_input("x", x, "FP32"), _input("n", n, "INT64"), _input("s", s, "BYTES")]
    result = client.infer("double", inputs, request_id="req-7")
    np.testing.assert_array_equal(result.as_numpy("x_doubled"), x * 2)
    assert result.as_numpy("x_doubled").dtype == np.float32
    np.testing.assert_array_equal(result.as_numpy("n_doubled"), n * 2)
    assert result.as_numpy("s_doubled").tolist() == [b"abab", b"\xffz\xffz"]
    assert result.get_response().id == "req-7"
    only = client.infer("double", inputs, outputs=[tritonclient_grpc.InferRequestedOutput("n_doubled")])
    assert [o.name for o in only.get_response().outputs] == ["n_doubled"]
    assert only.as_numpy("x_doubled") is None
    tripled = client.infer("double", inputs[1:2], parameters={"times": 3})  # request parameters reach predict
    np.testing.assert_array_equal(tripled.as_numpy("n_doubled"), n * 3)


def test_typed_contents_travel_as_json(address: str) -> None:
    """A client that sends `contents` (typed fields) rather than raw bytes gets the same answer."""
    import grpc

    from cirrus.protocols import grpc_service_pb2 as pb
    from cirrus.protocols import grpc_service_pb2_grpc as pb_grpc

    request = pb.ModelInferRequest(model_name="double")
    request.inputs.add(name="n", datatype="INT64", shape=[3]).contents.int64_contents.extend([1, 2, 3])
    with grpc.insecure_channel(address) as channel:
        response = pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=30)
    assert response.outputs[0].name == "n_doubled" and list(response.outputs[0].shape) == [3]
    assert np.frombuffer(response.raw_output_contents[0], "<i8").tolist() == [2, 4, 6]


def test_errors_carry_the_status_and_message(client: Any) -> None:
    bad = _input("x", np.array([1.0, 2.0], dtype=np.float32), "FP32")
    bad.set_shape([3])  # two values for a shape of three
    with pytest.raises(InferenceServerException) as raised:
        client.infer("double", [bad])
    assert raised.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert "'x'" in raised.value.message()
    with pytest.raises(InferenceServerException) as raised:
        client.infer("nope", [_input("x", np.ones(2, np.float32), "FP32")])
    assert raised.value.status() == "StatusCode.NOT_FOUND" and "nope" in raised.value.message()
    with pytest.raises(InferenceServerException) as raised:
        client.get_model_metadata("nope")
    assert raised.value.status() == "StatusCode.NOT_FOUND"


def test_a_message_past_the_body_limit_is_refused(client: Any) -> None:
    big = _input("x", np.zeros(MAX_BODY_BYTES // 4 + 1024, np.float32), "FP32")  # past the limit, framing aside
    with pytest.raises(InferenceServerException) as raised:
        client.infer("double", [big])
    assert raised.value.status() == "StatusCode.RESOURCE_EXHAUSTED"
    fits = _input("x", np.ones(MAX_BODY_BYTES // 8, np.float32), "FP32")
    assert client.infer("double", [fits]).as_numpy("x_doubled").sum() == MAX_BODY_BYTES // 4


def test_api_keys_come_in_the_metadata(gw: Cirrus, client: Any) -> None:
    x = [_input("x", np.ones(2, np.float32), "FP32")]
    with pytest.raises(InferenceServerException) as raised:
        client.infer("guarded", x)
    assert raised.value.status() == "StatusCode.UNAUTHENTICATED" and "key" in raised.value.message()
    key, _ = gw.client().create_key(apis=["guarded"])
    for headers in ({"authorization": f"Bearer {key}"}, {"x-api-key": key}):
        result = client.infer("guarded", x, headers=headers)
        np.testing.assert_array_equal(result.as_numpy("x_doubled"), [2, 2])
    with pytest.raises(InferenceServerException) as raised:
        client.infer("guarded", x, headers={"x-api-key": key + "x"})
    assert raised.value.status() in ("StatusCode.UNAUTHENTICATED", "StatusCode.PERMISSION_DENIED")


def test_concurrent_grpc_requests_are_batched(address: str) -> None:
    import tritonclient.grpc.aio as triton_aio

    async def run() -> list[Any]:
        client = triton_aio.InferenceServerClient(address)
        try:
            calls = []
            for i in range(16):
                x = np.full(3, i, dtype=np.float32)
                calls.append(client.infer("batched", [_input("x", x, "FP32")]))
            return list(await asyncio.gather(*calls))
        finally:
            await client.close()

    results = asyncio.run(run())
    for i, result in enumerate(results):
        np.testing.assert_array_equal(result.as_numpy("y"), np.full(3, 2 * i, dtype=np.float32))  # each its own
    sizes = [int(r.as_numpy("batch")[0]) for r in results]
    assert max(sizes) > 1, sizes


def test_grpc_and_rest_requests_share_batches(gw: Cirrus, address: str) -> None:
    """8 gRPC and 8 REST requests at once: a batch larger than 8 holds both."""
    import tritonclient.grpc.aio as triton_aio

    async def grpc_call(client: Any, i: int) -> tuple[list[float], int]:
        result = await client.infer("batched", [_input("x", np.full(2, i, dtype=np.float32), "FP32")])
        return result.as_numpy("y").tolist(), int(result.as_numpy("batch")[0])

    async def rest_call(http: httpx.AsyncClient, i: int) -> tuple[list[float], int]:
        body = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [2], "data": [i, i]}]}
        response = await http.post("/v2/models/batched/infer", json=body)
        assert response.status_code == 200, response.text
        outputs = {o["name"]: o["data"] for o in json.loads(response.content)["outputs"]}
        return outputs["y"], int(outputs["batch"][0])

    async def run() -> list[tuple[list[float], int]]:
        client = triton_aio.InferenceServerClient(address)
        limits = httpx.Limits(max_connections=8)
        try:
            async with httpx.AsyncClient(base_url=gw.gateway_url, timeout=30, limits=limits) as http:
                calls = [grpc_call(client, i) if i % 2 else rest_call(http, i) for i in range(16)]
                return list(await asyncio.gather(*calls))
        finally:
            await client.close()

    answers = asyncio.run(run())
    assert [y for y, _ in answers] == [[2.0 * i, 2.0 * i] for i in range(16)]
    sizes = [size for _, size in answers]
    assert max(sizes) > 8, sizes


def test_a_joined_gateway_serves_grpc_too(gw: Cirrus) -> None:
    from test_e2e_gateways import join

    joined = join(gw, "--port", "0", "--grpc-port", "0")
    try:
        assert joined.process.stdout is not None
        line = joined.process.stdout.readline()  # after the "serving" line
        address = line.rsplit(": ", 1)[1].strip()
        client = tritonclient_grpc.InferenceServerClient(address)
        result = client.infer("double", [_input("n", np.array([21], np.int64), "INT64")])
        assert result.as_numpy("n_doubled").tolist() == [42]
        client.close()
    finally:
        joined.stop()
