"""The Open Inference Protocol (v2) codec (cirrus/protocols/v2.py), as pure functions, and the
gateway's `/v2` front (cirrus/gateway/v2.py) on an in-process gateway: no daemon, no sockets."""

from __future__ import annotations

import asyncio
import json
import re
from typing import Any

import msgspec
import numpy as np
import pytest

from cirrus.gateway.app import Gateway
from cirrus.gateway.v2 import serving, versions_of
from cirrus.protocols.v2 import (
    DATATYPES,
    DecodedRequest,
    InferInputs,
    RequestedOutput,
    V2Error,
    checked_tensors,
    decode_request,
    encode_response,
)
from cirrus.spec import V2_DATATYPES, ApiSpec, TensorSpec

SAMPLES: dict[str, Any] = {
    "BOOL": np.array([[True, False, True], [False, False, True]]),
    "UINT8": np.array([0, 7, 255], dtype=np.uint8),
    "UINT16": np.array([0, 65535], dtype=np.uint16),
    "UINT32": np.array([1, 2**32 - 1], dtype=np.uint32),
    "UINT64": np.array([1, 2**64 - 1], dtype=np.uint64),
    "INT8": np.array([-128, 127], dtype=np.int8),
    "INT16": np.array([-(2**15), 2**15 - 1], dtype=np.int16),
    "INT32": np.array([[-(2**31)], [2**31 - 1]], dtype=np.int32),
    "INT64": np.array([-(2**63), 2**63 - 1], dtype=np.int64),
    "FP16": np.array([0.5, -1.25], dtype=np.float16),
    "FP32": np.array([[1.5, -2.0], [3.25, 1e30]], dtype=np.float32),
    "FP64": np.array([1e-300, 2.5], dtype=np.float64),
    "BF16": np.array([1.5, -3.0, 256.0], dtype=np.float32),  # (bfloat16 values: exact)
    "BYTES": np.array([[b"abc", b""], ["é".encode(), b"\x00\xff"]], dtype=object),
}


def json_request(inputs: list[dict[str, Any]], **extra: Any) -> bytes:
    return json.dumps({"inputs": inputs, **extra}).encode()


def binary_request(tensors: dict[str, tuple[str, np.ndarray[Any, Any]]], **extra: Any) -> tuple[bytes, int]:
    """A request in the binary extension: (body, header length)."""
    entries, blobs = [], []
    for name, (datatype, array) in tensors.items():
        blob = raw_bytes(datatype, array)
        entries.append(
            {
                "name": name,
                "shape": list(array.shape),
                "datatype": datatype,
                "parameters": {"binary_data_size": len(blob)},
            }
        )
        blobs.append(blob)
    header = json_request(entries, **extra)
    return header + b"".join(blobs), len(header)


def raw_bytes(datatype: str, array: np.ndarray[Any, Any]) -> bytes:
    if datatype == "BYTES":
        return b"".join(len(e).to_bytes(4, "little") + e for e in array.reshape(-1))
    if datatype == "BF16":
        return (array.astype(np.float32).view(np.uint32) >> 16).astype("<u2").tobytes()
    return array.astype(array.dtype.newbyteorder("<")).tobytes()


def json_data(datatype: str, array: np.ndarray[Any, Any]) -> list[Any]:
    flat = array.reshape(-1).tolist()
    return [e.decode() for e in flat] if datatype == "BYTES" else flat


def test_the_codec_knows_every_datatype_of_the_spec() -> None:
    assert DATATYPES == V2_DATATYPES
    assert set(SAMPLES) == set(DATATYPES)


@pytest.mark.parametrize("datatype", list(SAMPLES))
def test_every_datatype_round_trips_as_json(datatype: str) -> None:
    array = SAMPLES[datatype]
    if datatype == "BYTES":
        array = np.array([[b"abc", b""], ["é".encode(), b"z"]], dtype=object)  # (JSON strings: UTF-8 only)
    entry = {"name": "t", "shape": list(array.shape), "datatype": datatype, "data": json_data(datatype, array)}
    decoded = decode_request(json_request([entry]))
    got = decoded.inputs["t"]
    assert got.shape == array.shape and got.tolist() == array.tolist()
    body, content_type, headers = encode_response({"t": got}, decoded, "m", "3", [FakeTensor("t", datatype)])
    assert content_type == "application/json" and headers == []
    answer = json.loads(body)
    assert answer == {
        "model_name": "m",
        "model_version": "3",
        "outputs": [
            {"name": "t", "datatype": datatype, "shape": list(array.shape), "data": json_data(datatype, array)}
        ],
    }


@pytest.mark.parametrize("datatype", list(SAMPLES))
def test_every_datatype_round_trips_in_binary(datatype: str) -> None:
    array = SAMPLES[datatype]
    body, length = binary_request({"t": (datatype, array)}, parameters={"binary_data_output": True})
    decoded = decode_request(body, length)
    got = decoded.inputs["t"]
    assert got.shape == array.shape and got.tolist() == array.tolist()
    if datatype not in ("BYTES", "BF16"):
        assert got.dtype == array.dtype and got.flags.writeable
    if datatype == "BF16":
        assert got.dtype == np.float32
    body, content_type, headers = encode_response({"t": got}, decoded, "m", outputs=[FakeTensor("t", datatype)])
    assert content_type == "application/octet-stream"
    ((name, value),) = headers
    assert name == "Inference-Header-Content-Length"
    header = json.loads(body[: int(value)])
    blob = raw_bytes(datatype, array)
    assert header["outputs"] == [
        {"name": "t", "datatype": datatype, "shape": list(array.shape), "parameters": {"binary_data_size": len(blob)}}
    ]
    assert body[int(value) :] == blob


class FakeTensor:
    def __init__(self, name: str, datatype: str, shape: list[int] | None = None) -> None:
        self.name, self.datatype, self.shape = name, datatype, shape or [-1]


def test_several_binary_inputs_take_their_bytes_in_order_and_json_ones_mix_in() -> None:
    body, length = binary_request(
        {"a": ("INT32", np.array([1, 2], dtype=np.int32)), "b": ("BYTES", np.array([b"xy"], dtype=object))}
    )
    header = json.loads(body[:length])
    header["inputs"].insert(1, {"name": "c", "shape": [1], "datatype": "FP64", "data": [0.5]})
    new_header = json.dumps(header).encode()
    decoded = decode_request(new_header + body[length:], len(new_header))
    assert list(decoded.inputs) == ["a", "c", "b"]
    assert decoded.inputs["a"].tolist() == [1, 2]
    assert decoded.inputs["b"].tolist() == [b"xy"]
    assert decoded.inputs["c"].tolist() == [0.5]


def test_nested_data_is_accepted_and_flat_data_is_reshaped() -> None:
    nested = {"name": "n", "shape": [2, 2], "datatype": "INT64", "data": [[1, 2], [3, 4]]}
    flat = {"name": "f", "shape": [2, 2], "datatype": "INT64", "data": [1, 2, 3, 4]}
    words = {"name": "w", "shape": [2, 1], "datatype": "BYTES", "data": [["a"], ["b"]]}
    inputs = decode_request(json_request([nested, flat, words])).inputs
    assert inputs["n"].tolist() == inputs["f"].tolist() == [[1, 2], [3, 4]]
    assert inputs["w"].tolist() == [[b"a"], [b"b"]]


def test_the_request_id_and_parameters_reach_the_predictor() -> None:
    entry = {"name": "t", "shape": [1], "datatype": "FP32", "data": [1], "parameters": {"note": "x"}}
    decoded = decode_request(json_request([entry], id="r-7", parameters={"temperature": 0.5}))
    inputs = decoded.inputs
    assert isinstance(inputs, InferInputs) and isinstance(inputs, dict)
    assert inputs.id == "r-7" and inputs.parameters == {"temperature": 0.5}
    assert inputs.input_parameters == {"t": {"note": "x"}}
    assert json.loads(encode_response({"y": [1.0]}, decoded, "m")[0])["id"] == "r-7"


@pytest.mark.parametrize(
    ("body", "header_length", "message"),
    [
        (b"{not json", None, "the request is not valid JSON"),
        (b"[1, 2]", None, "the request must be a JSON object"),
        (b"{}", None, "the request needs `inputs`"),
        (
            json_request([{"name": "t", "shape": [3], "datatype": "FP32", "data": [1, 2]}]),
            None,
            "input 't': shape [3] holds 3 elements, but `data` has 2",
        ),
        (
            json_request([{"name": "t", "shape": [1], "datatype": "FP128", "data": [1]}]),
            None,
            "input 't': unknown datatype 'FP128'",
        ),
        (
            json_request([{"name": "t", "shape": [-1], "datatype": "FP32", "data": [1]}]),
            None,
            "input 't': `shape` must be a list of dimensions",
        ),
        (
            json_request([{"name": "t", "shape": [2], "datatype": "INT32", "data": [1, 2.5]}]),
            None,
            "input 't': INT32 data must be integers",
        ),
        (
            json_request([{"name": "t", "shape": [1], "datatype": "UINT8", "data": [256]}]),
            None,
            "input 't': a value does not fit in UINT8",
        ),
        (
            json_request([{"name": "t", "shape": [1], "datatype": "BOOL", "data": [1]}]),
            None,
            "input 't': BOOL data must be booleans",
        ),
        (
            json_request([{"name": "t", "shape": [1], "datatype": "FP32", "data": ["x"]}]),
            None,
            "input 't': FP32 data must be numbers",
        ),
        (
            json_request([{"name": "t", "shape": [1], "datatype": "BYTES", "data": [1]}]),
            None,
            "input 't': BYTES data must be strings",
        ),
        (
            json_request([{"name": "t", "shape": [2, 2], "datatype": "INT8", "data": [[1, 2], [3]]}]),
            None,
            "input 't': `data` is a ragged nested list",
        ),
        (json_request([{"name": "t", "shape": [1], "datatype": "FP32"}]), None, "input 't' has no `data`"),
        (
            json_request([{"name": "t", "shape": [1], "datatype": "FP32", "data": [1]}] * 2),
            None,
            "input 't' appears twice",
        ),
        (b"{}", 10, "Inference-Header-Content-Length is 10, but the body has 2 bytes"),
        (b"{}", "two", "Inference-Header-Content-Length must be a number"),
        (json_request([]) + b"\x00", len(json_request([])), "the body has 1 bytes of binary data after its JSON"),
        (
            json_request([{"name": "t", "shape": [1], "datatype": "FP32", "parameters": {"binary_data_size": 8}}])
            + b"\x00" * 4,
            len(json_request([{"name": "t", "shape": [1], "datatype": "FP32", "parameters": {"binary_data_size": 8}}])),
            "input 't': binary_data_size 8 goes past the binary data",
        ),
        (
            json_request([{"name": "t", "shape": [1], "datatype": "FP32", "parameters": {"binary_data_size": 2}}])
            + b"\x00" * 2,
            len(json_request([{"name": "t", "shape": [1], "datatype": "FP32", "parameters": {"binary_data_size": 2}}])),
            "input 't': shape [1] of FP32 takes 4 bytes, but binary_data_size is 2",
        ),
        (
            json_request([{"name": "t", "shape": [2], "datatype": "BYTES", "parameters": {"binary_data_size": 5}}])
            + b"\x01\x00\x00\x00a",
            len(
                json_request([{"name": "t", "shape": [2], "datatype": "BYTES", "parameters": {"binary_data_size": 5}}])
            ),
            "input 't': its BYTES data end after 1 of 2 elements",
        ),
        (
            json_request(
                [
                    {
                        "name": "t",
                        "shape": [1],
                        "datatype": "FP32",
                        "data": [1],
                        "parameters": {"shared_memory_region": "r"},
                    }
                ]
            ),
            None,
            "shared memory is not supported",
        ),
        (
            json_request([{"name": "t", "shape": [1], "datatype": "FP32", "parameters": {"binary_data_size": 4}}]),
            None,
            "input 't' has a binary_data_size, but the request has no binary data: send the Inference-Header",
        ),
        (
            json_request([], outputs=[{"name": "y", "parameters": {"classification": 3}}]),
            None,
            "the classification extension is not supported",
        ),
    ],
)
def test_bad_requests_are_400s_that_say_why(body: bytes, header_length: int | str | None, message: str) -> None:
    with pytest.raises(V2Error) as error:
        decode_request(body, header_length)
    assert error.value.status == 400
    assert message in error.value.message


def test_declared_inputs_are_checked() -> None:
    declared = [TensorSpec(name="x", datatype="FP32", shape=[-1, 2]), TensorSpec(name="k", datatype="INT64", shape=[1])]
    x = {"name": "x", "shape": [3, 2], "datatype": "FP32", "data": [0] * 6}
    k = {"name": "k", "shape": [1], "datatype": "INT64", "data": [1]}
    assert set(decode_request(json_request([x, k]), inputs=declared).inputs) == {"x", "k"}
    cases = {
        "missing input 'k' (INT64 [1])": [x],
        "unexpected input 'z'; the model's inputs are: x, k": [x, k, {**k, "name": "z"}],
        "input 'k' is INT32, but the model takes INT64": [x, {**k, "datatype": "INT32"}],
        "input 'x' has shape [2, 3], but the model takes [-1, 2] (-1: any size)": [{**x, "shape": [2, 3]}, k],
        "input 'x' has shape [6], but the model takes [-1, 2]": [{**x, "shape": [6]}, k],
    }
    for message, inputs in cases.items():
        with pytest.raises(V2Error, match=re.escape(message)):
            decode_request(json_request(inputs), inputs=declared)
    outputs = [TensorSpec(name="y", datatype="FP32", shape=[-1])]
    with pytest.raises(V2Error, match="unknown output 'z'; the model's outputs are: y"):
        decode_request(json_request([x, k], outputs=[{"name": "z"}]), inputs=declared, outputs=outputs)


def request(
    outputs: list[RequestedOutput] | None = None, binary: bool = False, id: str | None = None
) -> DecodedRequest:
    inputs = InferInputs()
    inputs.id = id
    return DecodedRequest(inputs=inputs, outputs=outputs, binary_output=binary)


def test_requested_outputs_come_back_alone_in_their_order_binary_as_asked() -> None:
    result = {"a": np.array([1, 2]), "b": ["x"], "c": 2.5}
    wanted = [RequestedOutput("c", binary=True), RequestedOutput("a")]
    body, _, headers = encode_response(result, request(wanted), "m")
    length = int(dict(headers)["Inference-Header-Content-Length"])
    header = json.loads(body[:length])
    assert header["outputs"] == [
        {"name": "c", "datatype": "FP64", "shape": [], "parameters": {"binary_data_size": 8}},
        {"name": "a", "datatype": "INT64", "shape": [2], "data": [1, 2]},
    ]
    assert np.frombuffer(body[length:], "<f8").tolist() == [2.5]
    # the request's binary_data_output applies to outputs that do not say otherwise
    body, _, headers = encode_response(result, request([RequestedOutput("b", binary=False)], binary=True), "m")
    assert headers == [] and json.loads(body)["outputs"] == [
        {"name": "b", "datatype": "BYTES", "shape": [1], "data": ["x"]}
    ]
    with pytest.raises(V2Error, match="unknown output 'z'; the model's outputs are: a, b, c") as unknown:
        encode_response(result, request([RequestedOutput("z")]), "m")
    assert unknown.value.status == 400


def test_output_datatypes_come_from_the_spec_else_from_numpy() -> None:
    result = {"f": [1, 2], "s": np.array(["é", "b"]), "o": np.array([b"\xff"], dtype=object), "b": np.array([True])}
    declared = [FakeTensor("f", "FP32")]
    body, _, headers = encode_response(result, request(binary=True), "m", outputs=declared)
    header = json.loads(body[: int(dict(headers)["Inference-Header-Content-Length"])])
    assert [o["datatype"] for o in header["outputs"]] == ["FP32", "BYTES", "BYTES", "BOOL"]
    with pytest.raises(V2Error, match="output 'o' holds bytes that are not UTF-8: request it with binary_data"):
        encode_response(result, request(), "m")


def test_what_a_v2_answer_cannot_carry_is_a_500() -> None:
    with pytest.raises(V2Error, match="predict returned a list; for a v2 request it must return a dict") as error:
        encode_response([1, 2], request(), "m")
    assert error.value.status == 500
    with pytest.raises(V2Error, match="output 'c' has dtype complex128, which no v2 datatype carries"):
        encode_response({"c": np.array([1j])}, request(), "m")


# --- the gateway's /v2 front -----------------------------------------------------------------


def call(gateway: Gateway, method: str, path: str, body: bytes = b"") -> tuple[int, Any]:
    """One request through the gateway's ASGI callable: (status, JSON body or None)."""
    sent: list[dict[str, Any]] = []
    scope = {
        "type": "http",
        "method": method,
        "path": path,
        "headers": [],
        "query_string": b"",
        "client": ("127.0.0.1", 1),
    }

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message: Any) -> None:
        sent.append(message)

    asyncio.run(gateway(scope, receive, send))
    payload = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return sent[0]["status"], msgspec.json.decode(payload) if payload else None


@pytest.fixture
def gateway() -> Gateway:
    gateway = Gateway(max_body_bytes=1 << 20)
    spec = ApiSpec.model_validate(
        {
            "name": "m",
            "predictor": {"path": "p.py"},
            "protocol": {"name": "v2", "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 3]}]},
        }
    )
    gateway.set_api("m", max_concurrency=1, max_queue_length=1, timeout_s=1.0, protocol=spec.protocol)
    gateway.routes["m"].set_canary(4, None, 0.0)
    gateway.set_api("plain", max_concurrency=1, max_queue_length=1, timeout_s=1.0)
    return gateway


def test_the_front_answers_health_and_metadata(gateway: Gateway) -> None:
    assert call(gateway, "GET", "/v2/health/live") == (200, None)
    assert call(gateway, "GET", "/v2/health/ready") == (200, None)
    status, metadata = call(gateway, "GET", "/v2")
    assert status == 200 and metadata["name"] == "cirrus" and metadata["extensions"] == ["binary_tensor_data"]
    assert call(gateway, "GET", "/v2/models/m") == (
        200,
        {
            "name": "m",
            "versions": ["4"],
            "platform": "cirrus",
            "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 3]}],
            "outputs": [],
        },
    )
    assert call(gateway, "GET", "/v2/models/m/versions/4/ready") == (200, None)
    assert call(gateway, "POST", "/v2/repository/index") == (200, [{"name": "m", "version": "4", "state": "READY"}])


def test_the_front_refuses_what_it_does_not_serve(gateway: Gateway) -> None:
    assert call(gateway, "GET", "/v2/models/m/versions/3") == (
        404,
        {"error": "model 'm' has no version '3'; it serves 4"},
    )
    assert call(gateway, "GET", "/v2/models/nope/ready")[0] == 404
    status, body = call(gateway, "POST", "/v2/models/plain/infer", b"{}")
    assert status == 404 and "add `protocol: v2` to its spec" in body["error"]
    assert call(gateway, "GET", "/v2/models/m/infer")[0] == 405
    assert call(gateway, "GET", "/v2/models/m/stats")[0] == 404
    assert call(gateway, "GET", "/v2/somewhere")[0] == 404
    gateway.routes["m"].unavailable = "revision 4 does not load"
    assert call(gateway, "GET", "/v2/models/m/ready") == (
        400,
        {"error": "model 'm' is not ready: revision 4 does not load"},
    )


def test_tensors_a_predictor_declares_are_checked() -> None:
    good = [{"name": "a", "datatype": "INT32", "shape": [-1, 2]}]
    assert checked_tensors(good, "P.get_input_types()") == good
    assert checked_tensors((), "P.get_input_types()") == []
    for value, message in [
        ({"a": 1}, "P.get_input_types() must return a list of {name, datatype, shape}, not dict"),
        ([{"name": "a", "datatype": "INT32"}], "each tensor is a dict of exactly name, datatype and shape"),
        ([{"name": "a", "datatype": "INT31", "shape": []}], "tensor 'a' has datatype 'INT31'; use one of BOOL"),
        ([{"name": "a", "datatype": "INT32", "shape": [-2]}], "tensor 'a' needs a shape of integers >= -1"),
        ([{"name": 3, "datatype": "INT32", "shape": []}], "a tensor's name must be a string, not 3"),
    ]:
        with pytest.raises(V2Error, match=re.escape(message)):
            checked_tensors(value, "P.get_input_types()")


def test_the_front_asks_for_a_key_where_the_api_needs_one(gateway: Gateway) -> None:
    gateway.routes["m"].auth_required = True
    status, body = call(gateway, "GET", "/v2/models/m")
    assert status == 401 and "key" in body["error"]
    assert call(gateway, "GET", "/v2/health/live") == (200, None)  # (the server's own paths need none)


def test_a_canarys_version_pins_requests_to_it(gateway: Gateway) -> None:
    route = gateway.routes["m"]
    route.set_canary(4, 5, 10.0)
    assert versions_of(route) == ["4", "5"]
    assert serving(route, "5") is route.canary
    assert serving(route, "4") is route and serving(route, None) is route
    assert serving(route, "6") is None
    route.revision = None  # not known yet: any version is taken
    route.set_canary(None, None, 0.0)
    assert versions_of(route) == [] and serving(route, "9") is route


def test_any_binary_bool_byte_but_zero_is_true() -> None:
    header = json_request([{"name": "b", "shape": [3], "datatype": "BOOL", "parameters": {"binary_data_size": 3}}])
    decoded = decode_request(header + bytes([0, 1, 7]), len(header))
    assert decoded.inputs["b"].tolist() == [False, True, True]
