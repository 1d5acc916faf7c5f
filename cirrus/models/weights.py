"""Model weights that the replicas on one host share: safetensors files, memory-mapped.

`load_safetensors` maps the file and returns arrays (numpy) or tensors (torch) that point into the
mapping: nothing is read until a page is touched, and every process that maps the same file reads
the same page-cache pages, so N replicas of a model cost about one copy of its weights, not N
(docs/models.md has the measurements). Pickle-based checkpoints (`torch.save`, `pickle.dump`)
cannot work this way: unpickling builds every tensor in the process's own memory.
`convert_to_safetensors` turns such a state dict into a safetensors file once.

The safetensors format is small enough to read here: 8 bytes (little-endian u64) giving the
header's length, a JSON header naming each tensor's dtype, shape and ``[begin, end)`` byte range
in the data that follows. (`safetensors.numpy.load_file` copies every array into process memory,
which is why this module does not use it; torch, numpy and safetensors are imported only by the
functions that need them.)
"""

from __future__ import annotations

import json
import math
import mmap
import os
import pickle
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

Framework = Literal["numpy", "pt"]

MAX_HEADER_BYTES = 100 * 1024 * 1024  # safetensors' own limit
PAGE_BYTES = mmap.PAGESIZE

# safetensors dtype code -> (bytes per element, numpy dtype or None, torch dtype attribute or None)
DTYPES: dict[str, tuple[int, str | None, str | None]] = {
    "BOOL": (1, "?", "bool"),
    "U8": (1, "u1", "uint8"),
    "I8": (1, "i1", "int8"),
    "F8_E5M2": (1, None, "float8_e5m2"),
    "F8_E4M3": (1, None, "float8_e4m3fn"),
    "I16": (2, "<i2", "int16"),
    "U16": (2, "<u2", "uint16"),
    "F16": (2, "<f2", "float16"),
    "BF16": (2, None, "bfloat16"),
    "I32": (4, "<i4", "int32"),
    "U32": (4, "<u4", "uint32"),
    "F32": (4, "<f4", "float32"),
    "I64": (8, "<i8", "int64"),
    "U64": (8, "<u8", "uint64"),
    "F64": (8, "<f8", "float64"),
}


class WeightsError(ValueError):
    """A weights file or checkpoint that cannot be read or converted; the message says why."""


@dataclass(frozen=True)
class TensorInfo:
    """One tensor of a safetensors file, as its header declares it."""

    name: str
    dtype: str  # safetensors' code, e.g. "F32"
    shape: tuple[int, ...]
    offset: int  # absolute byte offset of the first element in the file
    nbytes: int


@dataclass(frozen=True)
class Header:
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str]
    data_offset: int  # where the tensor data starts in the file (8 + the header's length)


def read_header(path: str | os.PathLike[str]) -> Header:
    """Parse and check a safetensors header (reads only the header, not the data)."""
    path = Path(path)
    try:
        with path.open("rb") as handle:
            size = os.fstat(handle.fileno()).st_size
            prefix = handle.read(8)
            if len(prefix) < 8:
                raise WeightsError(f"{path}: not a safetensors file (only {size} bytes)")
            length = int.from_bytes(prefix, "little")
            if length > MAX_HEADER_BYTES or 8 + length > size:
                raise WeightsError(f"{path}: not a safetensors file (header length {length}, file {size} bytes)")
            raw = handle.read(length)
    except OSError as exc:
        raise WeightsError(f"cannot read weights file {path}: {exc.strerror or exc}") from exc
    try:
        entries = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise WeightsError(f"{path}: not a safetensors file (header is not JSON: {exc})") from None
    if not isinstance(entries, dict):
        raise WeightsError(f"{path}: not a safetensors file (header is not a JSON object)")
    data_offset = 8 + length
    data_bytes = size - data_offset
    metadata = entries.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict):
        raise WeightsError(f"{path}: __metadata__ must be a JSON object of strings")
    tensors = {}
    for name, entry in entries.items():
        tensors[name] = _tensor_info(path, name, entry, data_offset, data_bytes)
    return Header(tensors, {str(k): str(v) for k, v in metadata.items()}, data_offset)


def _tensor_info(path: Path, name: str, entry: Any, data_offset: int, data_bytes: int) -> TensorInfo:
    try:
        dtype, shape, (begin, end) = entry["dtype"], tuple(int(d) for d in entry["shape"]), entry["data_offsets"]
        begin, end = int(begin), int(end)
    except (TypeError, KeyError, ValueError) as exc:
        raise WeightsError(f"{path}: tensor {name!r} has a malformed header entry ({exc!r})") from None
    if dtype not in DTYPES:
        raise WeightsError(f"{path}: tensor {name!r} has dtype {dtype!r}, which this loader does not support")
    expected = math.prod(shape) * DTYPES[dtype][0]
    if not 0 <= begin <= end <= data_bytes or end - begin != expected or min(shape, default=0) < 0:
        raise WeightsError(
            f"{path}: tensor {name!r} ({dtype}, shape {list(shape)}) declares bytes [{begin}, {end}) "
            f"but needs {expected} within the file's {data_bytes} data bytes (truncated or corrupt file?)"
        )
    return TensorInfo(name, dtype, shape, data_offset + begin, end - begin)


def total_bytes(path: str | os.PathLike[str]) -> int:
    """The bytes of tensor data in a safetensors file (what one loaded copy of it occupies)."""
    return sum(info.nbytes for info in read_header(path).tensors.values())


def load_safetensors(
    path: str | os.PathLike[str],
    framework: Framework = "numpy",
    device: str = "cpu",
    *,
    populate: bool = False,
) -> dict[str, Any]:
    """Map a safetensors file and return its tensors by name, without copying them.

    ``framework="numpy"``: read-only `numpy.ndarray`s over a read-only mapping (writing raises
    ``ValueError``; `.copy()` one to change it). ``framework="pt"``: `torch.Tensor`s over a
    copy-on-write mapping: a write changes that process's copy of the touched pages only, never
    the file or another replica. With a ``device`` other than ``"cpu"`` (torch only) each tensor
    is copied to the device, and the mapping only serves that copy.

    Nothing is read at load time; pages come in when first touched. ``populate=True`` reads
    every page once before returning, so that the first requests do not pay for the disk.
    """
    if framework not in ("numpy", "pt"):
        raise WeightsError(f"framework must be 'numpy' or 'pt', not {framework!r}")
    if framework == "numpy" and device != "cpu":
        raise WeightsError(f"numpy arrays live in host memory: device must be 'cpu', not {device!r}")
    header = read_header(path)
    mapping = _map(Path(path), read_only=framework == "numpy")
    if populate and mapping is not None:
        _touch_pages(mapping)
    if framework == "numpy":
        return {name: _numpy_view(mapping, info, path) for name, info in header.tensors.items()}
    tensors = {name: _torch_view(mapping, info) for name, info in header.tensors.items()}
    if device != "cpu":
        tensors = {name: tensor.to(device) for name, tensor in tensors.items()}
    return tensors


def _map(path: Path, read_only: bool) -> mmap.mmap | None:
    """The whole file, mapped (None for an empty file); the arrays made from it keep it alive."""
    access = mmap.ACCESS_READ if read_only else mmap.ACCESS_COPY  # ACCESS_COPY: MAP_PRIVATE, copy-on-write
    with path.open("rb") as handle:
        if os.fstat(handle.fileno()).st_size == 0:
            return None
        return mmap.mmap(handle.fileno(), 0, access=access)


def _touch_pages(mapping: mmap.mmap) -> None:
    """Fault in every page (one byte each, in file order so that the kernel reads ahead)."""
    with memoryview(mapping) as whole, whole[::PAGE_BYTES] as pages:
        sum(pages)


def _numpy_view(mapping: mmap.mmap | None, info: TensorInfo, path: str | os.PathLike[str]) -> Any:
    import numpy as np

    code = DTYPES[info.dtype][1]
    if code is None:
        raise WeightsError(
            f"{path}: tensor {info.name!r} is {info.dtype}, which numpy has no dtype for; load it with framework='pt'"
        )
    dtype = np.dtype(code)
    count = info.nbytes // dtype.itemsize
    if count == 0 or mapping is None:
        empty = np.empty(info.shape, dtype)
        empty.flags.writeable = False
        return empty
    return np.frombuffer(mapping, dtype=dtype, count=count, offset=info.offset).reshape(info.shape)


def _torch_view(mapping: mmap.mmap | None, info: TensorInfo) -> Any:
    import torch

    name = DTYPES[info.dtype][2]
    dtype = getattr(torch, name) if name else None
    if dtype is None:
        raise WeightsError(f"tensor {info.name!r} is {info.dtype}, which this torch {torch.__version__} lacks")
    if info.nbytes == 0 or mapping is None:
        return torch.empty(info.shape, dtype=dtype)
    count = info.nbytes // DTYPES[info.dtype][0]
    return torch.frombuffer(mapping, dtype=dtype, count=count, offset=info.offset).reshape(info.shape)


# Converting pickle checkpoints ------------------------------------------------------------------


def convert_to_safetensors(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    *,
    key: str | None = None,
    trusted: bool = False,
    metadata: Mapping[str, str] | None = None,
) -> Path:
    """Write the state dict in a `torch.save` / pickle checkpoint at `src` to a safetensors file at `dst`.

    `src` holds a mapping of names to tensors (torch tensors or numpy arrays); ``key`` picks one
    out of a larger checkpoint (``key="state_dict"`` for ``{"state_dict": ..., "epoch": 3}``).
    A `torch.save` file is read with ``torch.load(weights_only=True)``, which runs no code. A
    plain pickle can run arbitrary code when loaded, so it is read only with ``trusted=True``
    (and that also lets a `torch.save` file holding more than tensors load). The file is written
    under a temporary name and renamed, so `dst` is never half-written. Returns `dst`.
    """
    src, dst = Path(src), Path(dst)
    checkpoint = _load_checkpoint(src, trusted)
    if key is not None:
        if not isinstance(checkpoint, Mapping) or key not in checkpoint:
            keys = sorted(map(str, checkpoint)) if isinstance(checkpoint, Mapping) else []
            raise WeightsError(f"{src}: no entry {key!r} in the checkpoint (its keys: {keys[:10]})")
        checkpoint = checkpoint[key]
    tensors = _state_dict(src, checkpoint)
    tmp = dst.with_name(f".{dst.name}.tmp-{os.getpid()}")
    try:
        _save(tensors, tmp, dict(metadata or {}))
        tmp.replace(dst)
    finally:
        tmp.unlink(missing_ok=True)
    return dst


def _load_checkpoint(src: Path, trusted: bool) -> Any:
    if not src.is_file():
        raise WeightsError(f"checkpoint {src} does not exist or is not a file")
    if zipfile.is_zipfile(src):  # torch.save's format (since torch 1.6)
        try:
            import torch
        except ImportError:
            raise WeightsError(f"{src} is a torch.save archive: reading it needs torch (pip install torch)") from None
        try:
            return torch.load(src, map_location="cpu", weights_only=not trusted)
        except pickle.UnpicklingError as exc:
            raise WeightsError(
                f"{src}: torch.load(weights_only=True) refused it, it holds more than tensors "
                f"({str(exc).splitlines()[0]}); if you trust the file, pass trusted=True"
            ) from None
    if not trusted:
        raise WeightsError(
            f"{src} is not a torch.save archive; reading a plain pickle runs whatever code it contains, "
            "so pass trusted=True if you made it (or trust who did)"
        )
    with src.open("rb") as handle:
        try:
            checkpoint = pickle.load(handle)
        except Exception as exc:
            raise WeightsError(f"{src}: cannot unpickle it: {exc}") from exc
    if isinstance(checkpoint, int):  # torch.save's legacy (pre-1.6) format starts with a pickled magic number
        import torch

        return torch.load(src, map_location="cpu", weights_only=False)
    return checkpoint


def _state_dict(src: Path, checkpoint: Any) -> dict[str, Any]:
    """The checkpoint as {name: torch tensor or numpy array}; WeightsError naming the entries that are not."""
    if not isinstance(checkpoint, Mapping):
        raise WeightsError(f"{src}: expected a mapping of names to tensors (a state dict), got {type(checkpoint)}")
    tensors: dict[str, Any] = {}
    wrong: list[str] = []
    nested: list[str] = []
    for name, value in checkpoint.items():
        kind = type(value)
        if _is_tensor(value):
            tensors[str(name)] = value
        else:
            wrong.append(f"{name!r} ({kind.__module__}.{kind.__qualname__})")
            if isinstance(value, Mapping) and any(_is_tensor(v) for v in value.values()):
                nested.append(str(name))
    if wrong:
        hint = f"; the tensors seem to be under {nested[0]!r}: pass key={nested[0]!r}" if nested else ""
        more = f" and {len(wrong) - 5} more" if len(wrong) > 5 else ""
        raise WeightsError(
            f"{src}: safetensors holds only tensors, and these entries are not: {', '.join(wrong[:5])}{more}{hint}"
        )
    return tensors


def _is_tensor(value: Any) -> bool:
    kind = type(value)
    module = kind.__module__
    if module.startswith("torch"):
        import torch

        return isinstance(value, torch.Tensor)
    if module == "numpy":
        import numpy as np

        return isinstance(value, np.ndarray)
    return False


def _save(tensors: dict[str, Any], dst: Path, metadata: dict[str, str]) -> None:
    import numpy as np

    if any(not isinstance(t, np.ndarray) for t in tensors.values()):
        import torch
        from safetensors.torch import save_file as save_torch

        seen: set[int] = set()
        ready = {}
        for name, value in tensors.items():
            t = torch.from_numpy(np.ascontiguousarray(value)) if isinstance(value, np.ndarray) else value
            t = t.detach().to("cpu").contiguous()
            storage = t.untyped_storage()
            if storage.data_ptr() in seen or storage.nbytes() != t.nbytes:  # tied or a view: its own copy
                t = t.clone()
            seen.add(t.untyped_storage().data_ptr())
            ready[name] = t
        save_torch(ready, str(dst), metadata=metadata or None)
    else:
        from safetensors.numpy import save_file as save_numpy

        save_numpy({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(dst), metadata=metadata or None)
