"""The Open Inference Protocol (KServe v2, Triton's HTTP protocol) as pure functions: an infer
request's body -> numpy arrays by input name, and a predictor's outputs -> the response body.

Both the JSON form and the binary tensor data extension are read and written: with the header
`Inference-Header-Content-Length: N`, the first N bytes of a body are the JSON header and the rest
holds the tensors whose `parameters.binary_data_size` says how many bytes they take, in order.
Fixed-size types are little-endian; a BYTES element is a 4-byte little-endian length, then its bytes.

numpy has no bfloat16: BF16 tensors arrive as float32 arrays (the bfloat16 values, exactly), and a
BF16 output is a float32 array cut to its upper 16 bits (truncated, as tritonclient does).

numpy is imported inside the functions: `import cirrus` stays light.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import msgspec

HEADER_LENGTH = "inference-header-content-length"  # the binary extension's header (lower case)
EXTENSIONS = ("binary_tensor_data",)
OPENAPI_KEY = "x-cirrus-v2"  # a replica's OpenAPI document reports its predictor's tensors to the gateway here
# datatype -> numpy dtype of its binary form (BF16 and BYTES are converted by hand)
_DTYPES = {
    "BOOL": "?",
    "UINT8": "u1",
    "UINT16": "<u2",
    "UINT32": "<u4",
    "UINT64": "<u8",
    "INT8": "i1",
    "INT16": "<i2",
    "INT32": "<i4",
    "INT64": "<i8",
    "FP16": "<f2",
    "FP32": "<f4",
    "FP64": "<f8",
    "BF16": "<u2",
}
DATATYPES = (*_DTYPES, "BYTES")  # = cirrus.spec.V2_DATATYPES (not imported: it brings pydantic)
# datatype -> the numpy kinds of JSON `data` it takes (BF16's binary form is an integer; its JSON data are numbers)
_JSON_KINDS = {t: "b" if t == "BOOL" else "iuf" if t.startswith(("FP", "BF")) else "iu" for t in _DTYPES}
_native: dict[str, Any] = {}  # datatype -> numpy dtype in native byte order (filled on first use)


def _native_dtype(datatype: str) -> Any:
    dtype = _native.get(datatype)
    if dtype is None:
        import numpy as np

        dtype = _native[datatype] = np.dtype(_DTYPES[datatype]).newbyteorder("=")
    return dtype


class DeclaredTensor(Protocol):
    """A declared input or output: `cirrus.spec.TensorSpec`, or `cirrus.wire.TensorDecl` in a replica."""

    @property
    def name(self) -> str: ...
    @property
    def datatype(self) -> str: ...
    @property
    def shape(self) -> Sequence[int]: ...


class V2Error(Exception):
    """A request (400) or an answer (`status`) the protocol cannot carry; the message says why."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.message = message
        self.status = status


class InferInputs(dict[str, Any]):
    """What `predict(payload)` receives for a v2 request: the tensors by input name (numpy arrays;
    BYTES as object arrays of `bytes`), plus the request's `parameters` (a dict), its `id` (or None)
    and `input_parameters` (each input's own `parameters`, by name)."""

    parameters: dict[str, Any]
    id: str | None
    input_parameters: dict[str, dict[str, Any]]

    def __init__(self) -> None:
        super().__init__()
        self.parameters = {}
        self.id = None
        self.input_parameters = {}


@dataclass
class RequestedOutput:
    name: str
    binary: bool | None = None  # None: as the request's `binary_data_output` says


@dataclass
class DecodedRequest:
    inputs: InferInputs
    outputs: list[RequestedOutput] | None = None  # None: every output the predictor returns
    binary_output: bool = False  # the request's `parameters.binary_data_output`
    parameters: dict[str, Any] = field(default_factory=dict)

    @property
    def id(self) -> str | None:
        return self.inputs.id


# --- decoding ---------------------------------------------------------------------------------


def decode_request(
    body: bytes,
    header_length: int | str | None = None,
    inputs: Sequence[DeclaredTensor] = (),
    outputs: Sequence[DeclaredTensor] = (),
) -> DecodedRequest:
    """An infer request's body -> its tensors. `header_length`: the `Inference-Header-Content-Length`
    header (None: the body is all JSON); `inputs`/`outputs`: what the spec declares (empty: anything)."""
    header, binary = _split_body(body, header_length)
    try:
        request = msgspec.json.decode(header)
    except msgspec.DecodeError as exc:
        raise V2Error(f"the request is not valid JSON: {exc}") from None
    except RecursionError:
        raise V2Error("the request's JSON is nested too deeply") from None
    if not isinstance(request, dict):
        raise V2Error("the request must be a JSON object with `inputs`")
    parameters = _parameters(request.get("parameters"), "the request")
    if "shared_memory_region" in parameters:
        raise V2Error("shared memory is not supported: send the tensors in the body")
    decoded = DecodedRequest(inputs=InferInputs(), parameters=parameters)
    decoded.binary_output = bool(parameters.get("binary_data_output", False))
    decoded.inputs.parameters = parameters
    request_id = request.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise V2Error("`id` must be a string")
    decoded.inputs.id = request_id
    _decode_inputs(request.get("inputs"), binary, decoded.inputs)
    _check_declared(decoded.inputs, request["inputs"], inputs)
    decoded.outputs = _requested_outputs(request.get("outputs"), outputs)
    return decoded


def _split_body(body: bytes, header_length: int | str | None) -> tuple[bytes, memoryview]:
    if header_length is None or header_length == "":
        return body, memoryview(b"")
    try:
        length = int(header_length)
    except ValueError:
        raise V2Error(f"Inference-Header-Content-Length must be a number, not {header_length!r}") from None
    if not 0 < length <= len(body):
        raise V2Error(
            f"Inference-Header-Content-Length is {length}, but the body has {len(body)} bytes: "
            "it must be the length of the JSON header at the start of the body"
        )
    view = memoryview(body)
    return bytes(view[:length]), view[length:]


def _parameters(value: Any, where: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise V2Error(f"`parameters` of {where} must be an object")
    return value


def _decode_inputs(entries: Any, binary: memoryview, into: InferInputs) -> None:
    if not isinstance(entries, list):
        raise V2Error("the request needs `inputs`: a list of {name, shape, datatype, data}")
    offset = 0
    for entry in entries:
        name, datatype, shape, parameters = _input_header(entry)
        if name in into:
            raise V2Error(f"input {name!r} appears twice")
        if "shared_memory_region" in parameters:
            raise V2Error(f"input {name!r}: shared memory is not supported: send the tensor in the body")
        size = parameters.get("binary_data_size")
        if size is not None:
            if not isinstance(size, int) or isinstance(size, bool) or size < 0:
                raise V2Error(f"input {name!r}: binary_data_size must be a byte count")
            if not binary and size:
                raise V2Error(
                    f"input {name!r} has a binary_data_size, but the request has no binary data: send the "
                    "Inference-Header-Content-Length header with the length of the JSON before it"
                )
            if offset + size > len(binary):
                raise V2Error(
                    f"input {name!r}: binary_data_size {size} goes past the binary data "
                    f"({len(binary)} bytes after the JSON header; {offset} used by earlier inputs)"
                )
            into[name] = from_binary(name, datatype, shape, binary[offset : offset + size])
            offset += size
        elif "data" in entry:
            into[name] = from_json(name, datatype, shape, entry["data"])
        else:
            raise V2Error(f"input {name!r} has no `data` (nor a binary_data_size)")
        into.input_parameters[name] = parameters
    if offset != len(binary):
        raise V2Error(
            f"the body has {len(binary)} bytes of binary data after its JSON header, but the inputs' "
            f"binary_data_size add up to {offset}"
        )


def _input_header(entry: Any) -> tuple[str, str, list[int], dict[str, Any]]:
    if not isinstance(entry, dict):
        raise V2Error("each input must be an object with name, shape, datatype and data")
    name = entry.get("name")
    if not isinstance(name, str) or not name:
        raise V2Error("each input needs a `name` (a string)")
    datatype = entry.get("datatype")
    if datatype not in DATATYPES:
        raise V2Error(f"input {name!r}: unknown datatype {datatype!r}; use one of {', '.join(DATATYPES)}")
    shape = entry.get("shape")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise V2Error(f"input {name!r}: `shape` must be a list of dimensions (integers >= 0), not {shape!r}")
    return name, datatype, shape, _parameters(entry.get("parameters"), f"input {name!r}")


def from_json(name: str, datatype: str, shape: list[int], data: Any) -> Any:
    """An input's JSON `data` (row-major, flat or nested lists) -> a numpy array of `shape`."""
    import numpy as np

    count = math.prod(shape)
    if datatype == "BYTES":
        flat = _flatten(data if isinstance(data, list) else [data])
        array = np.empty(len(flat), dtype=object)
        for i, element in enumerate(flat):
            if isinstance(element, str):
                array[i] = element.encode()
            else:
                raise V2Error(f"input {name!r}: BYTES data must be strings, not {type(element).__name__}")
    else:
        array = _numbers(name, datatype, data)
    if array.size != count:
        raise V2Error(f"input {name!r}: shape {shape} holds {count} elements, but `data` has {array.size}")
    return array.reshape(shape)


def _numbers(name: str, datatype: str, data: Any) -> Any:
    """JSON numbers (booleans for BOOL) -> a flat array of `datatype`, refusing values it cannot hold."""
    import numpy as np

    try:
        raw = np.asarray(data).reshape(-1)
    except ValueError:
        raise V2Error(f"input {name!r}: `data` is a ragged nested list; send it flat, in row-major order") from None
    accepted = _JSON_KINDS[datatype]
    if raw.dtype.kind in "fO" and accepted == "iu":  # (numpy makes floats or objects of ints past int64's range)
        values = _flatten(data if isinstance(data, list) else [data])
        if all(type(value) is int for value in values):
            try:
                return np.array(values, dtype=_native_dtype(datatype))
            except OverflowError:
                raise V2Error(f"input {name!r}: a value does not fit in {datatype}") from None
    if raw.size and raw.dtype.kind not in accepted:
        wanted = "booleans" if datatype == "BOOL" else "integers" if accepted == "iu" else "numbers"
        raise V2Error(f"input {name!r}: {datatype} data must be {wanted}")
    return _cast(name, datatype, raw)


def _cast(name: str, datatype: str, raw: Any) -> Any:
    import numpy as np

    if datatype == "BF16":
        return _bf16_round(raw.astype(np.float32))
    dtype = _native_dtype(datatype)
    array = raw.astype(dtype, copy=False)
    if dtype.kind in "iu" and raw.size and not np.array_equal(array, raw):
        raise V2Error(f"input {name!r}: a value does not fit in {datatype}")
    return array


def _flatten(data: list[Any]) -> list[Any]:
    flat: list[Any] = []
    stack = [iter(data)]
    while stack:
        for element in stack[-1]:
            if isinstance(element, list):
                stack.append(iter(element))
                break
            flat.append(element)
        else:
            stack.pop()
    return flat


def from_binary(name: str, datatype: str, shape: list[int], raw: memoryview | bytes) -> Any:
    """An input's bytes in the binary extension -> a (writable) numpy array of `shape`."""
    import numpy as np

    count = math.prod(shape)
    if datatype == "BYTES":
        return _bytes_elements(name, raw, count).reshape(shape)
    dtype = np.dtype(_DTYPES[datatype])
    if len(raw) != count * dtype.itemsize:
        raise V2Error(
            f"input {name!r}: shape {shape} of {datatype} takes {count * dtype.itemsize} bytes, "
            f"but binary_data_size is {len(raw)}"
        )
    flat = np.frombuffer(raw, dtype=dtype)
    if datatype == "BF16":
        array = (flat.astype(np.uint32) << 16).view(np.float32)
    elif datatype == "BOOL":
        array = flat.view(np.uint8) != 0  # (any byte but 0 is true)
    else:
        array = flat.astype(dtype.newbyteorder("="))  # a copy: writable, in native order
    return array.reshape(shape)


def _bytes_elements(name: str, raw: memoryview | bytes, count: int) -> Any:
    import numpy as np

    view = memoryview(raw)
    array = np.empty(count, dtype=object)
    offset = 0
    for i in range(count):
        if offset + 4 > len(view):
            raise V2Error(f"input {name!r}: its BYTES data end after {i} of {count} elements")
        length = int.from_bytes(view[offset : offset + 4], "little")
        offset += 4
        if offset + length > len(view):
            raise V2Error(f"input {name!r}: BYTES element {i} of {length} bytes goes past its data")
        array[i] = bytes(view[offset : offset + length])
        offset += length
    if offset != len(view):
        raise V2Error(f"input {name!r}: {len(view) - offset} bytes are left after its {count} BYTES elements")
    return array


def _bf16_round(array: Any) -> Any:
    """float32 values cut to bfloat16's precision (the upper 16 bits)."""
    import numpy as np

    return (np.ascontiguousarray(array, dtype=np.float32).view(np.uint32) & np.uint32(0xFFFF0000)).view(np.float32)


def _check_declared(got: InferInputs, entries: list[dict[str, Any]], declared: Sequence[DeclaredTensor]) -> None:
    """The inputs against the spec's `protocol.inputs` (names, datatypes, shapes with -1 for any size)."""
    if not declared:
        return
    by_name = {tensor.name: tensor for tensor in declared}
    for entry in entries:
        name, datatype, shape = entry["name"], entry["datatype"], entry["shape"]
        tensor = by_name.get(name)
        if tensor is None:
            raise V2Error(f"unexpected input {name!r}; the model's inputs are: {', '.join(by_name)}")
        if datatype != tensor.datatype:
            raise V2Error(f"input {name!r} is {datatype}, but the model takes {tensor.datatype}")
        if len(shape) != len(tensor.shape) or any(d != w and w != -1 for d, w in zip(shape, tensor.shape, strict=True)):
            raise V2Error(f"input {name!r} has shape {shape}, but the model takes {tensor.shape} (-1: any size)")
    for tensor in declared:
        if tensor.name not in got:
            raise V2Error(f"missing input {tensor.name!r} ({tensor.datatype} {tensor.shape})")


def _requested_outputs(entries: Any, declared: Sequence[DeclaredTensor]) -> list[RequestedOutput] | None:
    if entries is None:
        return None
    if not isinstance(entries, list):
        raise V2Error("`outputs` must be a list of {name, parameters}")
    known = {tensor.name for tensor in declared}
    requested: list[RequestedOutput] = []
    for entry in entries:
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
            raise V2Error("each requested output must be an object with a `name`")
        name = entry["name"]
        parameters = _parameters(entry.get("parameters"), f"output {name!r}")
        if parameters.get("classification"):
            raise V2Error(f"output {name!r}: the classification extension is not supported")
        if "shared_memory_region" in parameters:
            raise V2Error(f"output {name!r}: shared memory is not supported")
        if known and name not in known:
            raise V2Error(f"unknown output {name!r}; the model's outputs are: {', '.join(sorted(known))}")
        binary = parameters.get("binary_data")
        requested.append(RequestedOutput(name, None if binary is None else bool(binary)))
    return requested


# --- encoding ---------------------------------------------------------------------------------


def encode_response(
    result: Any,
    request: DecodedRequest,
    model_name: str,
    model_version: str = "",
    outputs: Sequence[DeclaredTensor] = (),
) -> tuple[bytes, str, list[tuple[str, str]]]:
    """A predictor's outputs ({name: array-like}) -> (body, content type, headers). Requested
    outputs only, in their order; `binary_data` ones in the binary extension. `outputs`: the
    spec's declared outputs, whose datatypes the tensors are converted to."""
    if not isinstance(result, Mapping):
        raise V2Error(
            f"predict returned a {type(result).__name__}; for a v2 request it must return a dict of "
            "output name -> tensor (a numpy array, a list or a number)",
            500,
        )
    declared = {tensor.name: tensor.datatype for tensor in outputs}
    wanted = request.outputs
    if wanted is None:
        wanted = [RequestedOutput(str(name)) for name in result]
    tensors: list[dict[str, Any]] = []
    blobs: list[bytes] = []
    for output in wanted:
        if output.name not in result:
            raise V2Error(f"unknown output {output.name!r}; the model's outputs are: {', '.join(map(str, result))}")
        binary = request.binary_output if output.binary is None else output.binary
        tensor, blob = encode_tensor(output.name, result[output.name], declared.get(output.name), binary)
        tensors.append(tensor)
        if blob is not None:
            blobs.append(blob)
    answer: dict[str, Any] = {"model_name": model_name, "model_version": model_version}
    if request.id is not None:
        answer["id"] = request.id
    answer["outputs"] = tensors
    header = msgspec.json.encode(answer)
    if not blobs:
        return header, "application/json", []
    return header + b"".join(blobs), "application/octet-stream", [("Inference-Header-Content-Length", str(len(header)))]


def encode_tensor(name: str, value: Any, datatype: str | None, binary: bool) -> tuple[dict[str, Any], bytes | None]:
    """One output -> its JSON entry and, in binary, its bytes (None: its data are in the entry)."""
    import numpy as np

    array = value if isinstance(value, np.ndarray) else np.asarray(value)
    datatype = datatype or datatype_of(name, array)
    shape = list(array.shape)
    entry: dict[str, Any] = {"name": name, "datatype": datatype, "shape": shape}
    flat = array.reshape(-1)
    if datatype == "BYTES":
        elements = [_as_bytes(element) for element in flat.tolist()]
        if not binary:
            entry["data"] = [_as_text(name, element) for element in elements]
            return entry, None
        blob = b"".join(len(e).to_bytes(4, "little") + e for e in elements)
    elif datatype == "BF16":
        rounded = _bf16_round(flat.astype(np.float32))
        if not binary:
            entry["data"] = rounded.tolist()
            return entry, None
        blob = (rounded.view(np.uint32) >> 16).astype("<u2").tobytes()
    else:
        try:
            typed = flat.astype(_DTYPES[datatype], copy=False)  # (a copy only to convert it)
        except (TypeError, ValueError):
            raise V2Error(f"output {name!r} ({array.dtype}) cannot be converted to {datatype}", 500) from None
        if not binary:
            entry["data"] = typed.tolist()
            return entry, None
        blob = typed.tobytes()
    entry["parameters"] = {"binary_data_size": len(blob)}
    return entry, blob


def datatype_of(name: str, array: Any) -> str:
    """The v2 datatype of a numpy array (strings and objects: BYTES)."""
    kind, size = array.dtype.kind, array.dtype.itemsize
    if kind == "b":
        return "BOOL"
    if kind in "iu" and size in (1, 2, 4, 8):
        return f"{'UINT' if kind == 'u' else 'INT'}{size * 8}"
    if kind == "f" and size in (2, 4, 8):
        return f"FP{size * 8}"
    if kind in "OUS":
        return "BYTES"
    raise V2Error(f"output {name!r} has dtype {array.dtype}, which no v2 datatype carries", 500)


def _as_bytes(element: Any) -> bytes:
    if isinstance(element, bytes):
        return element
    if isinstance(element, str):
        return element.encode()
    return str(element).encode()


def _as_text(name: str, element: bytes) -> str:
    try:
        return element.decode()
    except UnicodeDecodeError:
        raise V2Error(f"output {name!r} holds bytes that are not UTF-8: request it with binary_data") from None


def error_body(message: str) -> bytes:
    """The protocol's error body."""
    return msgspec.json.encode({"error": message})


# --- metadata ---------------------------------------------------------------------------------


def server_metadata(version: str) -> dict[str, Any]:
    return {"name": "cirrus", "version": version, "extensions": list(EXTENSIONS)}


def model_metadata(
    name: str, versions: list[str], inputs: Sequence[DeclaredTensor], outputs: Sequence[DeclaredTensor]
) -> dict[str, Any]:
    return {
        "name": name,
        "versions": versions,
        "platform": "cirrus",
        "inputs": [tensor_dict(t) for t in inputs],
        "outputs": [tensor_dict(t) for t in outputs],
    }


def tensor_dict(tensor: DeclaredTensor) -> dict[str, Any]:
    return {"name": tensor.name, "datatype": tensor.datatype, "shape": list(tensor.shape)}


def checked_tensors(value: Any, where: str) -> list[dict[str, Any]]:
    """Tensors a predictor declares (`[{"name", "datatype", "shape"}]`), checked; V2Error says what is wrong."""
    if not isinstance(value, list | tuple):
        raise V2Error(f"{where} must return a list of {{name, datatype, shape}}, not {type(value).__name__}")
    tensors = []
    for tensor in value:
        if not isinstance(tensor, Mapping) or set(tensor) != {"name", "datatype", "shape"}:
            raise V2Error(f"{where}: each tensor is a dict of exactly name, datatype and shape, not {tensor!r}")
        name, datatype, shape = tensor["name"], tensor["datatype"], tensor["shape"]
        if not isinstance(name, str) or not name:
            raise V2Error(f"{where}: a tensor's name must be a string, not {name!r}")
        if datatype not in DATATYPES:
            raise V2Error(f"{where}: tensor {name!r} has datatype {datatype!r}; use one of {', '.join(DATATYPES)}")
        if not isinstance(shape, list | tuple) or not all(
            isinstance(d, int) and not isinstance(d, bool) and d >= -1 for d in shape
        ):
            raise V2Error(f"{where}: tensor {name!r} needs a shape of integers >= -1 (-1: any size), not {shape!r}")
        tensors.append({"name": name, "datatype": datatype, "shape": list(shape)})
    return tensors
