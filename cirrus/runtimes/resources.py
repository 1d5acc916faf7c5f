"""What a node has to give: CPU, memory, GPUs and named accelerators, discovered or configured.

This module owns the side effects of resource discovery (reading `/proc/meminfo`, asking NVML or
`nvidia-smi`, reading the node config); placement (`cirrus.runtimes.placement`, pure) only computes
with the `Inventory` returned here, which the daemon hands to the local runtime. Placement
re-exports `Inventory`.

Discovered values can be overridden, in increasing priority, by a node config file
(`$CIRRUS_HOME/node.yaml` by default) and by the `CIRRUS_NODE_RESOURCES` environment variable
holding the same keys as JSON. docs/resources.md describes both.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, StrictInt, ValidationError, field_validator

from cirrus.spec import parse_memory

NODE_RESOURCES_ENV = "CIRRUS_NODE_RESOURCES"
NODE_CONFIG_FILENAME = "node.yaml"
NVIDIA_SMI_TIMEOUT_S = 5.0
MEMINFO = Path("/proc/meminfo")
_ACCELERATOR_NAME_RE = re.compile(r"[a-z][a-z0-9_]{0,31}")
_KI, _MI, _GI = 2**10, 2**20, 2**30


@dataclass(frozen=True)
class Inventory:
    """A node's capacity (or, from `free_capacity`, what of it is free).

    `mem` is in bytes; None means unknown, which placement treats as unlimited. `gpus` and each
    entry of `accelerators` hold one capacity per device, indexed by device number (normally 1.0
    each; a free inventory holds the unused share of each device).
    """

    cpu: float
    mem: int | None
    gpus: tuple[float, ...] = ()
    accelerators: Mapping[str, tuple[float, ...]] = field(default_factory=dict)


# --- formatting ----------------------------------------------------------------------------------


def format_number(value: float) -> str:
    """1.0 -> '1', 0.30000000000000004 -> '0.3': at most 3 decimals, no float noise."""
    return f"{round(value, 3) + 0.0:g}"


def format_memory(n_bytes: float) -> str:
    """Bytes as Gi, Mi or Ki with at most one decimal: 1.5Gi, 512Mi."""
    for unit, size in (("Gi", _GI), ("Mi", _MI), ("Ki", _KI)):
        if n_bytes >= size:
            return f"{round(n_bytes / size, 1):g}{unit}"
    return f"{round(n_bytes / _KI, 1):g}Ki" if n_bytes else "0"


def describe(inventory: Inventory) -> str:
    """One line for logs: '2 cpu, 23.4Gi mem, 0 gpu' (then ', 2 neuron' per accelerator)."""
    mem = "unlimited" if inventory.mem is None else format_memory(inventory.mem)
    parts = [f"{format_number(inventory.cpu)} cpu", f"{mem} mem", f"{_devices(inventory.gpus)} gpu"]
    parts += [f"{_devices(units)} {name}" for name, units in sorted(inventory.accelerators.items())]
    return ", ".join(parts)


def _devices(capacities: tuple[float, ...]) -> str:
    if all(c == 1.0 for c in capacities):
        return str(len(capacities))
    return format_number(sum(capacities))  # a free inventory: shares left


# --- overrides -----------------------------------------------------------------------------------


class NodeOverrides(BaseModel):
    """The node config / `CIRRUS_NODE_RESOURCES` keys; each key given replaces the discovered value."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    cpu: float | None = Field(None, gt=0, le=65_536, description="CPU cores the node offers")
    mem: int | None = Field(None, description="memory the node offers, e.g. 16Gi (null: don't account memory)")
    gpus: StrictInt | None = Field(None, ge=0, le=64, description="number of GPUs (devices 0..gpus-1)")
    accelerators: dict[str, StrictInt] | None = Field(
        None, description="named accelerators and their unit counts, e.g. {neuron: 2}"
    )

    @field_validator("cpu", mode="before")
    @classmethod
    def _cpu(cls, value: Any) -> Any:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError(f"{value!r} is not a number of CPU cores")
        return value

    @field_validator("gpus", "accelerators", mode="before")
    @classmethod
    def _not_null(cls, value: Any) -> Any:
        if value is None:
            raise ValueError("must not be null; leave the key out to discover it")
        return value

    @field_validator("mem", mode="before")
    @classmethod
    def _mem(cls, value: Any) -> int | None:
        size = parse_memory(value)
        if size == 0:
            raise ValueError("memory must be positive")
        return size

    @field_validator("accelerators")
    @classmethod
    def _accelerators(cls, value: dict[str, int] | None) -> dict[str, int] | None:
        for name, units in (value or {}).items():
            if not _ACCELERATOR_NAME_RE.fullmatch(name):
                raise ValueError(f"{name!r} is not an accelerator name (lowercase letters, digits, '_')")
            if name == "gpu" or name == "gpus":
                raise ValueError("declare GPUs with the gpus key, not under accelerators")
            if not 0 <= units <= 64:
                raise ValueError(f"{name}: {units} units is out of range (0-64)")
        return value

    def apply(self, inventory: Inventory) -> Inventory:
        given = self.model_fields_set
        return Inventory(
            cpu=self.cpu if self.cpu is not None else inventory.cpu,
            mem=self.mem if "mem" in given else inventory.mem,
            gpus=(1.0,) * self.gpus if self.gpus is not None else inventory.gpus,
            accelerators=(
                {name: (1.0,) * units for name, units in sorted(self.accelerators.items()) if units}
                if self.accelerators is not None
                else inventory.accelerators
            ),
        )


def parse_overrides(raw: Any, source: str) -> NodeOverrides:
    """Validate already-parsed YAML/JSON; errors name `source` (a file or a variable) and the key."""
    if raw is None:
        return NodeOverrides()
    if not isinstance(raw, dict):
        raise ValueError(f"{source}: expected a mapping such as {{cpu: 8, mem: 16Gi, gpus: 2}}, got {raw!r}")
    try:
        return NodeOverrides.model_validate(raw)
    except ValidationError as exc:
        lines = [f"{source}: invalid node resources"]
        for item in exc.errors():
            where = ".".join(str(part) for part in item["loc"]) or "(top level)"
            if item["type"] == "extra_forbidden":
                message = f"unknown key; allowed: {', '.join(NodeOverrides.model_fields)}"
            else:
                message = item["msg"].removeprefix("Value error, ")
            lines.append(f"  {where}: {message}")
        raise ValueError("\n".join(lines)) from None


def node_config_path(env: Mapping[str, str]) -> Path:
    """`$CIRRUS_HOME/node.yaml` (CIRRUS_HOME defaults to ~/.cirrus, as in cirrus.settings)."""
    home = Path(env.get("CIRRUS_HOME") or Path.home() / ".cirrus").expanduser()
    return home / NODE_CONFIG_FILENAME


def read_node_config(path: Path, required: bool) -> NodeOverrides:
    try:
        text = path.read_text()
    except FileNotFoundError:
        if required:
            raise ValueError(f"{path}: node config file does not exist") from None
        return NodeOverrides()
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: cannot read the node config: {exc}") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ValueError(f"{path}: not valid YAML: {exc}") from None
    return parse_overrides(raw, str(path))


def env_overrides(env: Mapping[str, str]) -> NodeOverrides:
    text = env.get(NODE_RESOURCES_ENV, "")
    if not text.strip():
        return NodeOverrides()
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(
            f"environment variable {NODE_RESOURCES_ENV}: not valid JSON ({exc}); "
            'use e.g. {"cpu": 8, "mem": "16Gi", "gpus": 2}'
        ) from None
    return parse_overrides(raw, f"environment variable {NODE_RESOURCES_ENV}")


# --- discovery -----------------------------------------------------------------------------------


def detect_cpu() -> float:
    """CPUs this process may run on (its affinity mask), else the machine's count, else 1."""
    try:
        return float(len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return float(os.cpu_count() or 1)


def parse_meminfo(text: str) -> int | None:
    """MemTotal of /proc/meminfo, in bytes (the file says kB, meaning KiB)."""
    for line in text.splitlines():
        name, _, rest = line.partition(":")
        if name == "MemTotal":
            fields = rest.split()
            if fields and fields[0].isdigit():
                return int(fields[0]) * _KI
    return None


def detect_memory(meminfo: Path = MEMINFO) -> int | None:
    try:
        return parse_meminfo(meminfo.read_text())
    except OSError:
        return None


def detect_gpus(env: Mapping[str, str]) -> int:
    """NVIDIA GPUs: NVML through pynvml when it is installed, else `nvidia-smi` on PATH; else 0."""
    count = _nvml_gpu_count()
    if count is not None:
        return count
    return _nvidia_smi_gpu_count(env) or 0


def _nvml_gpu_count() -> int | None:
    try:
        import pynvml  # optional: never a dependency
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
    except Exception:  # no driver, no library: NVML raises its own error types
        return None
    try:
        return int(pynvml.nvmlDeviceGetCount())
    except Exception:
        return None
    finally:
        try:
            pynvml.nvmlShutdown()
        except Exception:
            pass


def _nvidia_smi_gpu_count(env: Mapping[str, str]) -> int | None:
    exe = shutil.which("nvidia-smi", path=env.get("PATH", os.defpath))
    if exe is None:
        return None
    try:
        result = subprocess.run(
            [exe, "--query-gpu=index", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=NVIDIA_SMI_TIMEOUT_S,
            check=False,
            stdin=subprocess.DEVNULL,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if result.returncode != 0:
        return None
    lines = [line.strip() for line in result.stdout.splitlines() if line.strip()]
    if not all(line.isdigit() for line in lines):
        return None
    return len(lines)


def discover(env: Mapping[str, str], node_config: Path | None = None) -> Inventory:
    """The node's inventory: discovered, then the node config file, then `CIRRUS_NODE_RESOURCES`.

    `node_config` None means `$CIRRUS_HOME/node.yaml`, which may be absent; a path given
    explicitly must exist. Invalid overrides raise ValueError naming the file or variable and key.
    Overrides are validated before anything is probed, and a value they set is not probed at all.
    """
    path = node_config if node_config is not None else node_config_path(env)
    from_file = read_node_config(path, required=node_config is not None)
    from_env = env_overrides(env)
    given = from_file.model_fields_set | from_env.model_fields_set
    discovered = Inventory(
        cpu=detect_cpu() if "cpu" not in given else 0.0,
        mem=detect_memory() if "mem" not in given else None,
        gpus=(1.0,) * detect_gpus(env) if "gpus" not in given else (),
        accelerators={},  # named accelerators come only from configuration
    )
    return from_env.apply(from_file.apply(discovered))
