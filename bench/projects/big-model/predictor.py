"""A predictor over a large safetensors file, for bench/models.py (memory of N replicas, replica start).

config:
  weights: path of the safetensors file (relative paths are relative to this directory)
  load: "shared" (default): `cirrus.models.weights.load_safetensors`, arrays that are views of the
        file's memory mapping, whose pages every replica on the host shares;
        "copy": the file read into the process's own memory (`np.fromfile`), the way pickle,
        `torch.load` or `np.load` hold weights: one private copy per replica.
  populate: read every page in __init__ (default true), so that a replica is ready only once its
        weights are in memory, as it is with "copy"; false leaves them to the first requests.

`predict({"rows": [0, 5]})` reads those rows of every layer and returns their sums.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from cirrus.models.weights import DTYPES, load_safetensors, read_header


class Predictor:
    def __init__(self, config: dict[str, Any]) -> None:
        path = Path(config["weights"])
        if not path.is_absolute():
            path = Path(__file__).resolve().parent / path
        mode = config.get("load", "shared")
        if mode == "shared":
            self.layers = load_safetensors(path, populate=bool(config.get("populate", True)))
        elif mode == "copy":
            data = np.fromfile(path, dtype=np.uint8)  # every byte, in this process's own memory
            self.layers = {
                name: data[info.offset : info.offset + info.nbytes]
                .view(np.dtype(DTYPES[info.dtype][1]))
                .reshape(info.shape)
                for name, info in read_header(path).tensors.items()
            }
        else:
            raise ValueError(f"config.load must be 'shared' or 'copy', not {mode!r}")

    def predict(self, payload: dict[str, Any]) -> dict[str, Any]:
        rows = payload.get("rows", [0])
        sums = {name: float(layer[rows].sum()) for name, layer in self.layers.items()}
        return {"layers": len(sums), "sum": sum(sums.values())}
