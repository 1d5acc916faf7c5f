"""The Open Inference Protocol v2 over gRPC as its REST twin (cirrus/protocols/v2_grpc.py), and the
gRPC port (cirrus/gateway/grpc.py) over a stand-in v2 REST app, driven by the real tritonclient.grpc."""

from __future__ import annotations

import asyncio
import contextlib
import json
import struct
import threading
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

from cirrus.protocols import grpc_service_pb2 as pb
from cirrus.protocols import v2_grpc
from cirrus.protocols.v2_grpc import RestReply, RpcError


def _header_and_binary(request: v2_grpc.RestRequest) -> tuple[dict[str, Any], bytes]:
    length = dict(request.headers).get(v2_grpc.HEADER_LENGTH)
    cut = len(request.body) if length is None else int(length)
    return json.loads(request.body[:cut]), request.body[cut:]


def test_raw_inputs_become_the_binary_extension() -> None:
    request = pb.ModelInferRequest(model_name="double", id="r1")
    request.inputs.add(name="x", datatype="FP32", shape=[2, 2])
    request.inputs.add(name="s", datatype="BYTES", shape=[1])
    raw_x = np.arange(4, dtype="<f4").tobytes()
    raw_s = struct.pack("<I", 2) + b"hi"
    request.raw_input_contents.extend([raw_x, raw_s])
    request.parameters["priority"].int64_param = 3
    rest = v2_grpc.infer_request(request)
    assert rest.method == "POST" and rest.path == "/v2/models/double/infer"
    assert dict(rest.headers)[b"content-type"] == b"application/octet-stream"
    header, binary = _header_and_binary(rest)
    assert binary == raw_x + raw_s  # the tensors' bytes as they came: no JSON
    assert header["id"] == "r1"
    assert header["parameters"] == {"priority": 3, "binary_data_output": True}
    assert header["inputs"] == [
        {"name": "x", "datatype": "FP32", "shape": [2, 2], "parameters": {"binary_data_size": 16}},
        {"name": "s", "datatype": "BYTES", "shape": [1], "parameters": {"binary_data_size": 6}},
    ]
    assert "outputs" not in header


def test_typed_contents_become_json_data_and_bytes_stay_binary() -> None:
    request = pb.ModelInferRequest(model_name="m", model_version="2")
    request.inputs.add(name="a", datatype="INT64", shape=[3]).contents.int64_contents.extend([1, -2, 3])
    request.inputs.add(name="b", datatype="BOOL", shape=[2]).contents.bool_contents.extend([True, False])
    request.inputs.add(name="c", datatype="BYTES", shape=[2]).contents.bytes_contents.extend([b"\xff", b"ok"])
    wanted = request.outputs.add(name="y")
    wanted.parameters["classification"].int64_param = 2
    rest = v2_grpc.infer_request(request)
    assert rest.path == "/v2/models/m/versions/2/infer"
    header, binary = _header_and_binary(rest)
    assert header["inputs"][0]["data"] == [1, -2, 3]
    assert header["inputs"][1]["data"] == [True, False]
    assert header["inputs"][2]["parameters"] == {"binary_data_size": 11}  # not UTF-8: binary, exactly
    assert binary == struct.pack("<I", 1) + b"\xff" + struct.pack("<I", 2) + b"ok"
    assert header["outputs"] == [{"name": "y", "parameters": {"classification": 2, "binary_data": True}}]
    assert header["parameters"] == {}  # binary outputs asked for by name


def test_plain_json_request_has_no_binary_header() -> None:
    request = pb.ModelInferRequest(model_name="m")
    request.inputs.add(name="a", datatype="FP64", shape=[1]).contents.fp64_contents.append(0.5)
    rest = v2_grpc.infer_request(request)
    assert dict(rest.headers) == {b"content-type": b"application/json"}
    assert json.loads(rest.body)["inputs"][0]["data"] == [0.5]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda r: r.raw_input_contents.append(b"x"), "raw_input_contents has 1 entries for 2 inputs"),
        (lambda r: setattr(r.inputs[0], "datatype", "FP16"), "FP16 tensors must be sent in raw_input_contents"),
        (lambda r: setattr(r.inputs[0], "datatype", "COMPLEX"), "unknown datatype 'COMPLEX'"),
        (lambda r: setattr(r, "model_name", "../admin"), "is not valid"),
        (lambda r: setattr(r, "model_name", ""), "names no model"),
    ],
)
def test_bad_requests_are_invalid_argument(change: Any, message: str) -> None:
    request = pb.ModelInferRequest(model_name="m")
    request.inputs.add(name="a", datatype="FP32", shape=[1])
    request.inputs.add(name="b", datatype="FP32", shape=[1])
    change(request)
    with pytest.raises(RpcError, match=message) as raised:
        v2_grpc.infer_request(request)
    assert raised.value.code == "INVALID_ARGUMENT"


def _binary_reply(header: dict[str, Any], binary: bytes) -> RestReply:
    encoded = json.dumps(header).encode()
    return RestReply(200, [(b"Inference-Header-Content-Length", str(len(encoded)).encode())], encoded + binary)


def test_binary_outputs_become_raw_output_contents() -> None:
    y = np.array([[1.5, 2.5]], dtype="<f4").tobytes()
    header = {
        "model_name": "m",
        "model_version": "1",
        "id": "r1",
        "parameters": {"sequence_end": True},
        "outputs": [
            {"name": "y", "datatype": "FP32", "shape": [1, 2], "parameters": {"binary_data_size": len(y)}},
            {"name": "n", "datatype": "INT64", "shape": [2], "data": [7, -8]},  # JSON: packed here
        ],
    }
    response = v2_grpc.infer_response(_binary_reply(header, y))
    assert (response.model_name, response.model_version, response.id) == ("m", "1", "r1")
    assert response.parameters["sequence_end"].bool_param is True
    assert [(o.name, o.datatype, list(o.shape)) for o in response.outputs] == [
        ("y", "FP32", [1, 2]),
        ("n", "INT64", [2]),
    ]
    assert response.outputs[0].parameters == {}  # binary_data_size is the REST framing, not a parameter
    assert response.raw_output_contents[0] == y
    assert np.frombuffer(response.raw_output_contents[1], "<i8").tolist() == [7, -8]


@pytest.mark.parametrize(
    ("datatype", "data", "expected"),
    [
        ("BYTES", ["a", "bc"], struct.pack("<I", 1) + b"a" + struct.pack("<I", 2) + b"bc"),
        ("BOOL", [[True], [False]], b"\x01\x00"),
        ("UINT8", [1, 255], b"\x01\xff"),
        ("FP16", [1.0], np.array([1.0], "<f2").tobytes()),
        ("BF16", [1.0, -2.0], b"\x80\x3f\x00\xc0"),
        ("FP64", [[0.25]], np.array([0.25], "<f8").tobytes()),
    ],
)
def test_json_output_data_packs_to_raw(datatype: str, data: Any, expected: bytes) -> None:
    assert v2_grpc.pack(datatype, data) == expected


@pytest.mark.parametrize(
    ("status", "body", "code", "message"),
    [
        (400, {"error": "input 'x': shape [3] needs 3 elements, data has 2"}, "INVALID_ARGUMENT", "shape [3]"),
        (404, {"error": "no model 'nope'", "request_id": "r"}, "NOT_FOUND", "no model 'nope'"),
        (401, {"error": "send an API key"}, "UNAUTHENTICATED", "send an API key"),
        (403, {"error": "this key may not call 'm'"}, "PERMISSION_DENIED", "may not call"),
        (429, {"error": "rate limit"}, "RESOURCE_EXHAUSTED", "rate limit"),
        (503, {"error": "at capacity"}, "UNAVAILABLE", "at capacity"),
        (504, {"error": "no answer within 1s"}, "DEADLINE_EXCEEDED", "no answer"),
        (500, {"error": "predictor failed"}, "INTERNAL", "predictor failed"),
        (413, {"error": "too large"}, "RESOURCE_EXHAUSTED", "too large"),
        (418, "not json", "INVALID_ARGUMENT", "not json"),
    ],
)
def test_rest_errors_map_to_grpc_status(status: int, body: Any, code: str, message: str) -> None:
    encoded = body.encode() if isinstance(body, str) else json.dumps(body).encode()
    with pytest.raises(RpcError) as raised:
        v2_grpc.infer_response(RestReply(status, [], encoded))
    assert raised.value.code == code and message in raised.value.message


def test_metadata_and_health() -> None:
    described = {
        "name": "m",
        "versions": ["1"],
        "platform": "cirrus",
        "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 3]}],
        "outputs": [{"name": "y", "datatype": "FP32", "shape": [-1, 3]}],
    }
    response = v2_grpc.model_metadata(RestReply(200, [], json.dumps(described).encode()))
    assert response.name == "m" and list(response.versions) == ["1"] and response.platform == "cirrus"
    assert [(t.name, t.datatype, list(t.shape)) for t in response.inputs] == [("x", "FP32", [-1, 3])]
    server = v2_grpc.server_metadata(RestReply(200, [], b'{"name":"cirrus","version":"0.1.0","extensions":["a"]}'))
    assert (server.name, server.version, list(server.extensions)) == ("cirrus", "0.1.0", ["a"])
    assert v2_grpc.is_ready(RestReply(200, [], b""))
    assert not v2_grpc.is_ready(RestReply(404, [], b'{"error": "no model"}'))
    with pytest.raises(RpcError, match="key"):
        v2_grpc.is_ready(RestReply(401, [], b'{"error": "send a key"}'))


# --- the gRPC port over a stand-in v2 REST app, with the real tritonclient.grpc -------------------


class FakeV2App:
    """Answers v2 REST as the protocol describes: infer doubles each input (binary outputs when asked)."""

    def __init__(self) -> None:
        self.scopes: list[dict[str, Any]] = []

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        self.scopes.append(scope)
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        path = scope["path"]
        if path == "/v2/health/live" or path == "/v2/models/double/ready":
            await _send(send, 200, {})
        elif path == "/v2":
            await _send(send, 200, {"name": "cirrus", "version": "0.1.0", "extensions": ["binary_tensor_data"]})
        elif path == "/v2/models/double/infer":
            await self._infer(dict(scope["headers"]), body, send)
        else:
            await _send(send, 404, {"error": f"no model at {path}"})

    async def _infer(self, headers: dict[bytes, bytes], body: bytes, send: Any) -> None:
        cut = int(headers.get(b"inference-header-content-length", len(body)))
        header, binary = json.loads(body[:cut]), body[cut:]
        outputs, parts = [], []
        for tensor in header["inputs"]:
            size = tensor.get("parameters", {}).get("binary_data_size")
            dtype = {"FP32": "<f4", "INT64": "<i8"}[tensor["datatype"]]
            if size is None:
                values = np.array(tensor["data"], dtype)
            else:
                values = np.frombuffer(binary[:size], dtype)
                binary = binary[size:]
            if values.size != int(np.prod(tensor["shape"])):
                await _send(send, 400, {"error": f"input {tensor['name']!r}: shape and data disagree"})
                return
            raw = (values * 2).astype(dtype).tobytes()
            parts.append(raw)
            name = tensor["name"] + "_doubled"
            params = {"binary_data_size": len(raw)}
            outputs.append(
                {"name": name, "datatype": tensor["datatype"], "shape": tensor["shape"], "parameters": params}
            )
        encoded = json.dumps({"model_name": "double", "outputs": outputs}).encode()
        extra = [(b"inference-header-content-length", str(len(encoded)).encode())]
        await send({"type": "http.response.start", "status": 200, "headers": extra})
        await send({"type": "http.response.body", "body": encoded + b"".join(parts)})


async def _send(send: Any, status: int, value: Any) -> None:
    await send({"type": "http.response.start", "status": status, "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": json.dumps(value).encode()})


@contextlib.contextmanager
def serving(app: FakeV2App, **options: Any) -> Iterator[Any]:
    """A gRPC port over `app`, on an event loop in a thread."""
    from cirrus.gateway.grpc import start_grpc

    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    options = {"max_message_bytes": 1024 * 1024, "max_concurrent_rpcs": 100, **options}
    server = asyncio.run_coroutine_threadsafe(start_grpc(app, "127.0.0.1", 0, **options), loop).result(10)
    try:
        yield server
    finally:
        asyncio.run_coroutine_threadsafe(server.stop(1), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


@pytest.fixture(scope="module")
def grpc_port() -> Iterator[tuple[int, FakeV2App]]:
    app = FakeV2App()
    with serving(app) as server:
        yield server.port, app


def test_tritonclient_over_the_grpc_port(grpc_port: tuple[int, FakeV2App]) -> None:
    import tritonclient.grpc as triton
    from tritonclient.utils import InferenceServerException

    port, app = grpc_port
    client = triton.InferenceServerClient(f"127.0.0.1:{port}")
    try:
        assert client.is_server_live()
        assert client.is_model_ready("double") and not client.is_model_ready("nope")
        assert client.get_server_metadata().name == "cirrus"
        x = triton.InferInput("x", [2, 2], "FP32")
        x.set_data_from_numpy(np.array([[1, 2], [3, 4]], dtype=np.float32))
        result = client.infer("double", [x], headers={"authorization": "Bearer k1", "x-request-id": "req-1"})
        np.testing.assert_array_equal(result.as_numpy("x_doubled"), [[2, 4], [6, 8]])
        scope = app.scopes[-1]
        headers = dict(scope["headers"])
        assert headers[b"authorization"] == b"Bearer k1" and headers[b"x-request-id"] == b"req-1"
        assert scope["client"][0] == "127.0.0.1" and scope["method"] == "POST"
        bad = triton.InferInput("x", [2], "INT64")
        bad.set_data_from_numpy(np.array([1, 2], dtype=np.int64))
        bad.set_shape([3])  # 2 values for a shape of 3
        with pytest.raises(InferenceServerException, match="shape and data disagree") as raised:
            client.infer("double", [bad])
        assert raised.value.status() == "StatusCode.INVALID_ARGUMENT"
        with pytest.raises(InferenceServerException, match="no model") as raised:
            client.get_model_metadata("nope")
        assert raised.value.status() == "StatusCode.NOT_FOUND"
    finally:
        client.close()


def test_a_taken_port_is_a_clear_error(grpc_port: tuple[int, FakeV2App]) -> None:
    from cirrus.gateway.grpc import GrpcError, start_grpc

    async def start_again() -> None:
        await start_grpc(FakeV2App(), "127.0.0.1", grpc_port[0], max_message_bytes=1024, max_concurrent_rpcs=1)

    with pytest.raises(GrpcError, match=r"cannot serve gRPC on 127\.0\.0\.1:"):
        asyncio.run(start_again())


def test_the_grpc_port_setting() -> None:
    from cirrus.settings import Settings

    assert Settings.from_env({}).grpc_port is None  # off unless set
    assert Settings.from_env({"CIRRUS_GRPC_PORT": "0"}).grpc_port == 0
    settings = Settings.from_env({"CIRRUS_GRPC_PORT": "8001"})
    assert settings.grpc_port == 8001 and settings.daemon_env()["CIRRUS_GRPC_PORT"] == "8001"
    assert "CIRRUS_GRPC_PORT" not in Settings.from_env({}).daemon_env()
    with pytest.raises(ValueError, match="CIRRUS_GRPC_PORT=70000 must be a port"):
        Settings.from_env({"CIRRUS_GRPC_PORT": "70000"})


def test_import_cirrus_does_not_import_grpc() -> None:
    import subprocess
    import sys

    code = (
        "import sys, cirrus, cirrus.daemon, cirrus.gateway.app, cirrus.cli; "
        "print(sorted(m for m in sys.modules if 'grpc' in m or 'protobuf' in m))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_the_grpc_port_serves_tls(tmp_path: Any) -> None:
    import tritonclient.grpc as triton
    from test_e2e_tls import self_signed

    from cirrus.gateway.grpc import GrpcTls

    cert_file, key_file = self_signed(tmp_path)
    app = FakeV2App()
    with serving(app, tls=GrpcTls(str(cert_file), str(key_file))) as server:
        client = triton.InferenceServerClient(f"127.0.0.1:{server.port}", ssl=True, root_certificates=str(cert_file))
        assert client.is_server_live()
        client.close()
    assert app.scopes[-1]["scheme"] == "https"
