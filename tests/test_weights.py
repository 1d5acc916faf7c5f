"""cirrus.models.weights: safetensors loaded as views of a shared mapping, and pickle checkpoints converted.

The sharing test runs real processes on a ~200 MB file and reads their memory from
/proc/PID/smaps_rollup: two processes that load it with the helper hold one copy between them
(summed PSS), while two that read it into memory hold two.
"""

from __future__ import annotations

import json
import mmap
import os
import pickle
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import backends
import numpy as np
import pytest

from cirrus.models.weights import WeightsError, convert_to_safetensors, load_safetensors, read_header, total_bytes

MB = 1024 * 1024
BIG_BYTES = 200 * MB


def write_safetensors(path: Path, tensors: dict[str, Any]) -> None:
    """A safetensors file written by hand (the format is a length, a JSON header and the bytes)."""
    codes = {"float32": "F32", "float16": "F16", "int64": "I64", "uint8": "U8", "int32": "I32", "bool": "BOOL"}
    header: dict[str, Any] = {"__metadata__": {"by": "test"}}
    offset = 0
    for name, array in tensors.items():
        header[name] = {
            "dtype": codes[array.dtype.name],
            "shape": list(array.shape),
            "data_offsets": [offset, offset + array.nbytes],
        }
        offset += array.nbytes
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with path.open("wb") as handle:
        handle.write(len(raw).to_bytes(8, "little") + raw)
        for array in tensors.values():
            handle.write(np.ascontiguousarray(array).tobytes())


def small_tensors() -> dict[str, Any]:
    rng = np.random.default_rng(0)
    return {
        "embed.weight": rng.standard_normal((17, 8)).astype(np.float32),
        "norm.bias": rng.standard_normal(5).astype(np.float16),  # 10 bytes: the next tensor is unaligned
        "ids": np.arange(7, dtype=np.int64),
        "mask": np.array([True, False, True]),
        "empty": np.zeros((0, 3), dtype=np.int32),
    }


def mapped_ranges(path: Path) -> list[tuple[int, int]]:
    """Address ranges of this process's mappings of `path`."""
    ranges = []
    with open("/proc/self/maps") as maps:
        for line in maps:
            if line.rstrip().endswith(str(path)):
                lo, hi = line.split()[0].split("-")
                ranges.append((int(lo, 16), int(hi, 16)))
    return ranges


def inside(address: int, ranges: list[tuple[int, int]]) -> bool:
    return any(lo <= address < hi for lo, hi in ranges)


# Loading ----------------------------------------------------------------------------------------


def test_numpy_views_of_a_read_only_mapping(tmp_path: Path) -> None:
    tensors = small_tensors()
    path = tmp_path / "small.safetensors"
    write_safetensors(path, tensors)
    loaded = load_safetensors(path)
    assert sorted(loaded) == sorted(tensors)
    ranges = mapped_ranges(path)
    assert ranges, "the file is not mapped"
    for name, expected in tensors.items():
        array = loaded[name]
        assert array.dtype == expected.dtype and array.shape == expected.shape
        np.testing.assert_array_equal(array, expected)
        assert not array.flags.writeable
        if array.size:
            assert not array.flags.owndata
            assert inside(array.__array_interface__["data"][0], ranges), f"{name} is not in the mapping"
            base = array
            while isinstance(base, np.ndarray | memoryview):  # array -> ... -> memoryview -> mmap
                base = base.obj if isinstance(base, memoryview) else base.base
            assert isinstance(base, mmap.mmap)
    with pytest.raises(ValueError, match="read-only"):
        loaded["embed.weight"][0, 0] = 1.0
    assert total_bytes(path) == sum(a.nbytes for a in tensors.values())
    assert read_header(path).metadata == {"by": "test"}


def test_files_written_by_safetensors(tmp_path: Path) -> None:
    save_file = backends.module("safetensors.numpy").save_file
    tensors = small_tensors()
    path = tmp_path / "lib.safetensors"
    save_file(tensors, str(path))
    loaded = load_safetensors(path, populate=True)
    for name, expected in tensors.items():
        np.testing.assert_array_equal(loaded[name], expected)
    assert total_bytes(path) == sum(a.nbytes for a in tensors.values())


def test_torch_tensors_over_a_copy_on_write_mapping(tmp_path: Path) -> None:
    torch = backends.module("torch")
    save_file = backends.module("safetensors.torch").save_file
    tensors = {
        "w": torch.randn(6, 4),
        "b": torch.randn(3, dtype=torch.float16),
        "bf": torch.randn(5, dtype=torch.bfloat16),
        "n": torch.arange(4, dtype=torch.int64),
    }
    path = tmp_path / "pt.safetensors"
    save_file(tensors, str(path))
    before = path.read_bytes()
    loaded = load_safetensors(path, framework="pt")
    ranges = mapped_ranges(path)
    for name, expected in tensors.items():
        assert torch.equal(loaded[name], expected), name
        assert inside(loaded[name].data_ptr(), ranges), f"{name} is not in the mapping"
    loaded["w"][0, 0] = 1234.0  # copy-on-write: this process's page only
    assert loaded["w"][0, 0].item() == 1234.0
    assert path.read_bytes() == before
    assert torch.equal(load_safetensors(path, framework="pt")["w"], tensors["w"])


def test_load_errors(tmp_path: Path) -> None:
    good = tmp_path / "good.safetensors"
    write_safetensors(good, {"x": np.ones(4, dtype=np.float32)})
    with pytest.raises(WeightsError, match="framework must be"):
        load_safetensors(good, framework="jax")  # type: ignore[arg-type]
    with pytest.raises(WeightsError, match="device must be 'cpu'"):
        load_safetensors(good, device="cuda")
    with pytest.raises(WeightsError, match="cannot read weights file"):
        load_safetensors(tmp_path / "missing.safetensors")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x05\x00\x00\x00\x00\x00\x00\x00hello")
    with pytest.raises(WeightsError, match="not JSON"):
        load_safetensors(junk)
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(good.read_bytes()[:-4])
    with pytest.raises(WeightsError, match="truncated or corrupt"):
        load_safetensors(truncated)
    bf16 = tmp_path / "bf16.safetensors"
    raw = json.dumps({"h": {"dtype": "BF16", "shape": [2], "data_offsets": [0, 4]}}).encode()
    bf16.write_bytes(len(raw).to_bytes(8, "little") + raw + b"\0" * 4)
    with pytest.raises(WeightsError, match="framework='pt'"):
        load_safetensors(bf16)


# Sharing between processes ----------------------------------------------------------------------

HOLDER = textwrap.dedent(
    """
    import sys
    import numpy as np
    from cirrus.models.weights import load_safetensors

    path, mode = sys.argv[1], sys.argv[2]
    if mode == "shared":
        weights = load_safetensors(path, populate=True)
    else:  # what pickle / np.load / reading the file does: the bytes in this process's own memory
        weights = {"all": np.fromfile(path, dtype=np.uint8)}
    print(sum(int(a.size) for a in weights.values()), flush=True)
    sys.stdin.readline()
    """
)


def memory_mb(pid: int) -> dict[str, float]:
    """Rss and Pss of a process, in MB, from /proc/PID/smaps_rollup."""
    out = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[0] in ("Rss:", "Pss:"):
            out[parts[0][:-1]] = int(parts[1]) / 1024
    return out


def two_holders(path: Path, mode: str) -> list[dict[str, float]]:
    """Start two processes that hold the file's weights (`mode`), measure both while both hold them."""
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", HOLDER, str(path), mode],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    try:
        for proc in procs:
            assert proc.stdout is not None
            assert int(proc.stdout.readline()) > 0
        return [memory_mb(proc.pid) for proc in procs]
    finally:
        for proc in procs:
            proc.communicate("\n", timeout=30)


@pytest.mark.skipif(not Path("/proc/self/smaps_rollup").exists(), reason="needs /proc/PID/smaps_rollup (Linux)")
def test_two_processes_share_the_pages(tmp_path: Path) -> None:
    path = tmp_path / "big.safetensors"
    count = BIG_BYTES // 4 // 4
    write_safetensors(path, {f"layer{i}": np.full(count, i, dtype=np.float32) for i in range(4)})
    size_mb = path.stat().st_size / MB

    shared = two_holders(path, "shared")
    for m in shared:
        assert m["Rss"] > 0.95 * size_mb, shared  # each process sees the whole file...
    assert sum(m["Pss"] for m in shared) < 1.5 * size_mb, shared  # ...and they pay for it once

    copied = two_holders(path, "copy")  # the control: the same measure tells copies apart
    assert sum(m["Pss"] for m in copied) > 1.9 * size_mb, copied


# Converting -------------------------------------------------------------------------------------


def test_convert_a_torch_checkpoint(tmp_path: Path) -> None:
    torch = backends.module("torch")
    backends.module("safetensors")
    state = {"w": torch.randn(4, 3), "b": torch.zeros(3, dtype=torch.float16), "steps": torch.tensor(7)}
    state["tied"] = state["w"]  # shared storage (tied weights)
    state["row"] = state["w"][1]  # a view into a larger storage
    src, dst = tmp_path / "model.pt", tmp_path / "model.safetensors"
    torch.save({"state_dict": state, "epoch": 3}, src)

    with pytest.raises(WeightsError, match=r"'epoch' \(builtins.int\).*pass key='state_dict'"):
        convert_to_safetensors(src, dst)
    assert not dst.exists()
    assert convert_to_safetensors(src, dst, key="state_dict", metadata={"from": "model.pt"}) == dst
    loaded = load_safetensors(dst, framework="pt")
    assert sorted(loaded) == sorted(state)
    for name, tensor in state.items():
        assert torch.equal(loaded[name], tensor), name
    assert read_header(dst).metadata == {"from": "model.pt"}
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary file left


def test_convert_refuses_non_tensor_entries(tmp_path: Path) -> None:
    torch = backends.module("torch")
    backends.module("safetensors")
    src, dst = tmp_path / "mixed.pt", tmp_path / "mixed.safetensors"
    torch.save({"w": torch.ones(2), "name": "resnet", "lr": 0.1}, src)
    with pytest.raises(WeightsError, match=r"these entries are not: 'name' \(builtins.str\), 'lr' \(builtins.float\)"):
        convert_to_safetensors(src, dst)
    assert not dst.exists()
    torch.save([torch.ones(2)], src)
    with pytest.raises(WeightsError, match="expected a mapping of names to tensors"):
        convert_to_safetensors(src, dst)


def test_convert_a_plain_pickle_only_when_trusted(tmp_path: Path) -> None:
    backends.module("safetensors")
    src, dst = tmp_path / "weights.pkl", tmp_path / "weights.safetensors"
    state = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.ones(2, dtype=np.int64)}
    src.write_bytes(pickle.dumps(state))
    with pytest.raises(WeightsError, match="trusted=True"):
        convert_to_safetensors(src, dst)
    convert_to_safetensors(src, dst, trusted=True)
    loaded = load_safetensors(dst)
    for name, expected in state.items():
        np.testing.assert_array_equal(loaded[name], expected)
    with pytest.raises(WeightsError, match="no entry 'model'"):
        convert_to_safetensors(src, dst, key="model", trusted=True)
    with pytest.raises(WeightsError, match="does not exist"):
        convert_to_safetensors(tmp_path / "nope.pkl", dst, trusted=True)


def test_no_heavy_imports() -> None:
    """Importing the module costs nothing: numpy, torch and safetensors load only when a function needs them."""
    code = (
        "import sys, cirrus.models.weights; "
        "print(sorted(m for m in ('numpy', 'torch', 'safetensors') if m in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=os.environ)
    assert done.stdout.strip() == "[]"
