"""The Open Inference Protocol v2 over gRPC, as its REST twin: each RPC of `GRPCInferenceService`
becomes the v2 REST request that means the same, and the REST answer becomes the RPC's response.

The gateway's gRPC server (cirrus/gateway/grpc.py) runs the REST request through the gateway itself,
so both transports share one path: routing, keys, slots, batching, metrics and errors. Tensor data
never goes through JSON when the client sends it raw: `raw_input_contents` become the binary tensor
data extension (`Inference-Header-Content-Length`), and the outputs are asked for as binary and come
back as `raw_output_contents`. Typed `contents` go as JSON `data` (BYTES as binary: it may not be UTF-8).

Pure conversion, no I/O; status codes are named as in `grpc.StatusCode` (this module needs only protobuf).
"""

from __future__ import annotations

import functools
import json
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

import msgspec

from cirrus.protocols import grpc_service_pb2 as pb

HEADER_LENGTH = b"inference-header-content-length"
JSON = b"application/json"
OCTETS = b"application/octet-stream"
_encode_json = msgspec.json.Encoder().encode  # the JSON header (UTF-8, compact: what json.dumps means, faster)
_decode_json = msgspec.json.Decoder().decode  # ValueError (msgspec.DecodeError) when not JSON

# v2 datatype -> (struct code, InferTensorContents field); FP16 and BF16 travel raw only.
_PACKING: dict[str, tuple[str, str | None]] = {
    "BOOL": ("?", "bool_contents"),
    "UINT8": ("B", "uint_contents"),
    "UINT16": ("H", "uint_contents"),
    "UINT32": ("I", "uint_contents"),
    "UINT64": ("Q", "uint64_contents"),
    "INT8": ("b", "int_contents"),
    "INT16": ("h", "int_contents"),
    "INT32": ("i", "int_contents"),
    "INT64": ("q", "int64_contents"),
    "FP16": ("e", None),
    "FP32": ("f", "fp32_contents"),
    "FP64": ("d", "fp64_contents"),
    "BF16": ("f", None),  # packed as FP32, then the high half of each element kept
}

# REST status -> gRPC status code name (https://github.com/grpc/grpc/blob/master/doc/http-grpc-status-mapping.md,
# and what each Cirrus status means: 413 a body past the limit, 429 a key's rate, 502 a replica that failed).
_STATUS_CODES = {
    400: "INVALID_ARGUMENT",
    401: "UNAUTHENTICATED",
    403: "PERMISSION_DENIED",
    404: "NOT_FOUND",
    405: "UNIMPLEMENTED",
    408: "DEADLINE_EXCEEDED",
    413: "RESOURCE_EXHAUSTED",
    429: "RESOURCE_EXHAUSTED",
    499: "CANCELLED",
    500: "INTERNAL",
    501: "UNIMPLEMENTED",
    502: "UNAVAILABLE",
    503: "UNAVAILABLE",
    504: "DEADLINE_EXCEEDED",
}


class RpcError(Exception):
    """The RPC fails with this status (`code`: a `grpc.StatusCode` name) and message."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True, slots=True)
class RestRequest:
    """A v2 REST request: `path` decoded (as an ASGI scope's), headers lower-case."""

    method: str
    path: str
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    body: bytes = b""

    @property
    def raw_path(self) -> bytes:
        return _raw_path(self.path)


@functools.lru_cache(maxsize=1024)
def _raw_path(path: str) -> bytes:
    """A path as an ASGI scope's `raw_path` (the few model paths recur: quoted once each)."""
    return quote(path).encode("ascii")


@dataclass(frozen=True, slots=True)
class RestReply:
    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes

    def header(self, name: bytes) -> bytes | None:
        for key, value in self.headers:
            if key.lower() == name:
                return value
        return None


def status_code(status: int) -> str:
    """The gRPC status code name for a REST status that is not a success."""
    if status in _STATUS_CODES:
        return _STATUS_CODES[status]
    return "INVALID_ARGUMENT" if 400 <= status < 500 else "INTERNAL"


def rpc_error(reply: RestReply) -> RpcError:
    """A failed REST answer as the RPC's error, its `error` message as the details."""
    message = reply.body.decode("utf-8", "replace")
    try:
        decoded = json.loads(reply.body)
    except ValueError:
        decoded = None
    if isinstance(decoded, dict) and isinstance(decoded.get("error"), str):
        message = decoded["error"]
    elif isinstance(decoded, dict) and isinstance(decoded.get("error"), dict):  # {"error": {"message": ...}}
        message = str(decoded["error"].get("message", message))
    return RpcError(status_code(reply.status), message or f"HTTP {reply.status}")


# --- paths ----------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1024)  # the few model names recur on every RPC: checked and built once each
def model_path(name: str, version: str = "") -> str:
    """`/v2/models/{name}[/versions/{version}]`; a name or version that is not one path segment is refused."""
    for what, value in (("model name", name), ("model version", version)):
        if "/" in value or value in (".", ".."):
            raise RpcError("INVALID_ARGUMENT", f"the {what} {value!r} is not valid")
    if not name:
        raise RpcError("INVALID_ARGUMENT", "the request names no model")
    return f"/v2/models/{name}" + (f"/versions/{version}" if version else "")


def get(path: str) -> RestRequest:
    return RestRequest("GET", path)


# --- parameters -----------------------------------------------------------------------------


def parameter_value(parameter: pb.InferParameter) -> Any:
    choice = parameter.WhichOneof("parameter_choice")
    return None if choice is None else getattr(parameter, choice)


def parameters_json(parameters: Mapping[str, pb.InferParameter]) -> dict[str, Any]:
    return {key: parameter_value(value) for key, value in parameters.items()}


def set_parameters(target: Any, values: Mapping[str, Any]) -> None:
    """Fill a protobuf `map<string, InferParameter>` from JSON values (nested values become JSON text)."""
    for key, value in values.items():
        parameter = target[key]
        if isinstance(value, bool):
            parameter.bool_param = value
        elif isinstance(value, int) and value >= 2**63:
            parameter.uint64_param = value
        elif isinstance(value, int):
            parameter.int64_param = value
        elif isinstance(value, float):
            parameter.double_param = value
        elif isinstance(value, str):
            parameter.string_param = value
        elif value is not None:
            parameter.string_param = json.dumps(value)


# --- ModelInfer -> POST /v2/models/{name}/infer ------------------------------------------------


def infer_request(request: pb.ModelInferRequest) -> RestRequest:
    """The REST request for a ModelInfer: a JSON header, then each binary input's bytes."""
    raw = request.raw_input_contents
    if raw and len(raw) != len(request.inputs):
        raise RpcError(
            "INVALID_ARGUMENT",
            f"raw_input_contents has {len(raw)} entries for {len(request.inputs)} inputs: give one per input, in order",
        )
    inputs: list[dict[str, Any]] = []
    binary: list[bytes] = []
    for index, tensor in enumerate(request.inputs):
        described: dict[str, Any] = {"name": tensor.name, "datatype": tensor.datatype, "shape": list(tensor.shape)}
        parameters = parameters_json(tensor.parameters) if tensor.parameters else {}
        data = raw[index] if raw else _contents_data(tensor)
        if isinstance(data, bytes):
            parameters["binary_data_size"] = len(data)
            binary.append(data)
        else:
            described["data"] = data
        if parameters:
            described["parameters"] = parameters
        inputs.append(described)
    header: dict[str, Any] = {
        "inputs": inputs,
        "parameters": parameters_json(request.parameters) if request.parameters else {},
    }
    if request.id:
        header["id"] = request.id
    if not request.outputs:
        header["parameters"]["binary_data_output"] = True  # every output comes back raw
    else:
        header["outputs"] = [
            {"name": output.name, "parameters": {**parameters_json(output.parameters), "binary_data": True}}
            for output in request.outputs
        ]
    encoded = _encode_json(header)
    path = model_path(request.model_name, request.model_version) + "/infer"
    if not binary:
        return RestRequest("POST", path, [(b"content-type", JSON)], encoded)
    headers = [(b"content-type", OCTETS), (HEADER_LENGTH, str(len(encoded)).encode())]
    return RestRequest("POST", path, headers, b"".join([encoded, *binary]))


def _contents_data(tensor: pb.ModelInferRequest.InferInputTensor) -> list[Any] | bytes:
    """An input's typed `contents`: a JSON `data` list, or (BYTES) the binary extension's bytes."""
    if tensor.datatype == "BYTES":
        return serialize_bytes(tensor.contents.bytes_contents)
    packing = _PACKING.get(tensor.datatype)
    if packing is None:
        raise RpcError("INVALID_ARGUMENT", f"input {tensor.name!r}: unknown datatype {tensor.datatype!r}")
    if packing[1] is None:
        raise RpcError(
            "INVALID_ARGUMENT", f"input {tensor.name!r}: {tensor.datatype} tensors must be sent in raw_input_contents"
        )
    return list(getattr(tensor.contents, packing[1]))


def serialize_bytes(elements: Iterable[bytes]) -> bytes:
    """BYTES elements as the protocol's raw form: each a 4-byte little-endian length, then its bytes."""
    parts: list[bytes] = []
    for element in elements:
        parts.append(struct.pack("<I", len(element)))
        parts.append(element)
    return b"".join(parts)


# --- the REST answer -> ModelInferResponse ---------------------------------------------------------


def infer_response(reply: RestReply) -> pb.ModelInferResponse:
    """The ModelInferResponse for a REST answer; RpcError when it is an error."""
    if reply.status != 200:
        raise rpc_error(reply)
    header, offset = _split(reply)
    body = reply.body
    response = pb.ModelInferResponse(
        model_name=str(header.get("model_name", "")),
        model_version=str(header.get("model_version") or ""),
        id=str(header.get("id") or ""),
    )
    if header.get("parameters"):
        set_parameters(response.parameters, header["parameters"])
    for output in header.get("outputs") or []:
        parameters = output.get("parameters")
        size = None
        if parameters:
            parameters = dict(parameters)
            size = parameters.pop("binary_data_size", None)
        datatype = str(output.get("datatype", ""))
        if size is not None:
            end = offset + int(size)
            if end > len(body):
                raise RpcError("INTERNAL", f"output {output.get('name')!r}: the answer's binary data is cut short")
            raw = body[offset:end]
            offset = end
        else:
            raw = pack(datatype, output.get("data"), str(output.get("name", "")))
        tensor = response.outputs.add(
            name=str(output.get("name", "")), datatype=datatype, shape=output.get("shape") or []
        )
        if parameters:
            set_parameters(tensor.parameters, parameters)
        response.raw_output_contents.append(raw)
    return response


def split_binary(reply: RestReply) -> tuple[dict[str, Any], bytes]:
    """The JSON header of a v2 answer and the binary data after it (none without the extension's header)."""
    header, cut = _split(reply)
    return header, reply.body[cut:]


def _split(reply: RestReply) -> tuple[dict[str, Any], int]:
    """The JSON header of a v2 answer, and where its binary data starts in the body."""
    body = reply.body
    length = reply.header(HEADER_LENGTH)
    cut = len(body) if length is None else int(length)
    try:
        header = _decode_json(body if length is None else memoryview(body)[:cut])
    except ValueError:
        raise RpcError("INTERNAL", "the inference answer is not v2 JSON") from None
    if not isinstance(header, dict):
        raise RpcError("INTERNAL", "the inference answer is not a v2 response object")
    return header, min(cut, len(body))


def pack(datatype: str, data: Any, name: str = "") -> bytes:
    """A JSON `data` value (nested or flat, row-major) as raw tensor bytes of `datatype`."""
    elements = list(_flatten(data))
    if datatype == "BYTES":
        return serialize_bytes(e.encode() if isinstance(e, str) else bytes(e) for e in elements)
    packing = _PACKING.get(datatype)
    if packing is None:
        raise RpcError("INTERNAL", f"output {name!r}: unknown datatype {datatype!r}")
    try:
        packed = struct.pack(f"<{len(elements)}{packing[0]}", *elements)
    except struct.error as exc:
        raise RpcError("INTERNAL", f"output {name!r}: data does not fit {datatype}: {exc}") from None
    if datatype == "BF16":  # the high 16 bits of each little-endian float32
        packed = b"".join(packed[i + 2 : i + 4] for i in range(0, len(packed), 4))
    return packed


def _flatten(data: Any) -> Iterable[Any]:
    if isinstance(data, list):
        for item in data:
            yield from _flatten(item)
    elif data is not None:
        yield data


# --- health and metadata ------------------------------------------------------------------------


def is_ready(reply: RestReply) -> bool:
    """A health or readiness GET: 200 is yes, any other answer no (a refused key is an error)."""
    if reply.status in (401, 403):
        raise rpc_error(reply)
    return reply.status == 200


def server_metadata(reply: RestReply) -> pb.ServerMetadataResponse:
    described = _json_object(reply)
    return pb.ServerMetadataResponse(
        name=str(described.get("name", "")),
        version=str(described.get("version", "")),
        extensions=[str(e) for e in described.get("extensions") or []],
    )


def model_metadata(reply: RestReply) -> pb.ModelMetadataResponse:
    described = _json_object(reply)
    response = pb.ModelMetadataResponse(
        name=str(described.get("name", "")),
        versions=[str(v) for v in described.get("versions") or []],
        platform=str(described.get("platform", "")),
    )
    for target, tensors in ((response.inputs, described.get("inputs")), (response.outputs, described.get("outputs"))):
        for tensor in tensors or []:
            target.add(
                name=str(tensor.get("name", "")),
                datatype=str(tensor.get("datatype", "")),
                shape=tensor.get("shape") or [],
            )
    return response


def _json_object(reply: RestReply) -> dict[str, Any]:
    if reply.status != 200:
        raise rpc_error(reply)
    try:
        decoded = json.loads(reply.body)
    except ValueError:
        decoded = None
    if not isinstance(decoded, dict):
        raise RpcError("INTERNAL", "the metadata answer is not a JSON object")
    return decoded
