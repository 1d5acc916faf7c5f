"""Placement: which of a node's CPU, memory, GPUs and accelerators one replica gets (pure).

`place(request, inventory, held)` is a function of the replica's `ComputeSpec`, the node's
`Inventory` and the `Assignment`s its running replicas hold; nothing is remembered between calls,
so releasing a replica's resources is passing one fewer held assignment. The local runtime keeps
the held assignments (`LocalRuntime.reserve`); other runtimes may place with their own scheduler.

Rules (docs/resources.md says more):

- cpu and mem are divisible; a request fits while the sum held stays within the total. A node
  whose memory is unknown (`mem=None`) never runs out of it.
- A fractional gpu (< 1) goes on ONE device with that share free, best fit: the device with the
  least free share that still fits (ties: the lowest index), so fractions pack onto devices that
  are already shared and whole devices stay free for whole requests.
- A gpu of 1 or more takes that many wholly free devices, lowest indices first.
- Each named accelerator follows the same rules as gpu, per unit.
- A request for 0 of something holds nothing of it.
- When nothing fits, `Unplaceable.reason` names the first missing resource in the order gpu,
  accelerators (by name), cpu, mem; a request larger than the whole node says "never fits: ..."
  (checked first, since waiting cannot help it).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from cirrus.runtimes.resources import Inventory, format_memory, format_number
from cirrus.spec import ComputeSpec

__all__ = ["EPSILON", "Assignment", "Inventory", "Unplaceable", "free_capacity", "place"]

EPSILON = 1e-9  # shares within this of fitting fit: 0.5 + 0.5 and ten times 0.1 fill one device

Shares = tuple[tuple[int, float], ...]  # (device index, share held), sorted by index


@dataclass(frozen=True)
class Assignment:
    """What one replica holds: cpu cores, bytes of memory, and (device index, share) pairs."""

    cpu: float = 0.0
    mem: int = 0
    gpus: Shares = ()
    accelerators: Mapping[str, Shares] = field(default_factory=dict)

    def env(self) -> dict[str, str]:
        """Environment variables that restrict the replica to its devices.

        CUDA_VISIBLE_DEVICES is always set: to the held device indices ("0,1"), or to "" when the
        replica holds no GPU, so that it sees none rather than all. With GPUs, CUDA_DEVICE_ORDER
        is PCI_BUS_ID so CUDA numbers devices as NVML and nvidia-smi do. Each accelerator the
        replica asked for gets CIRRUS_ACCELERATOR_<NAME> with its unit indices, and 'neuron'
        also NEURON_RT_VISIBLE_CORES (only when it holds some: that runtime reads an empty value
        differently across versions).
        """
        env = {"CUDA_VISIBLE_DEVICES": _indices(self.gpus)}
        if self.gpus:
            env["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"
        for name, shares in sorted(self.accelerators.items()):
            env[f"CIRRUS_ACCELERATOR_{name.upper()}"] = _indices(shares)
            if name == "neuron" and shares:
                env["NEURON_RT_VISIBLE_CORES"] = _indices(shares)
        return env

    def devices(self) -> dict[str, str]:
        """The devices held, as `cirrus get` shows them: {"gpu": "0,1"}, {"gpu": "0:0.5"} (a share
        of device 0), one entry per kind held (GPUs first, then accelerators by name)."""
        devices = {"gpu": _describe(self.gpus)} if self.gpus else {}
        for name, shares in sorted(self.accelerators.items()):
            if shares:
                devices[name] = _describe(shares)
        return devices


@dataclass(frozen=True)
class Unplaceable:
    """Why a request does not fit now (or, when `reason` starts with "never fits", ever)."""

    reason: str

    @property
    def never_fits(self) -> bool:
        return self.reason.startswith("never fits")


def _indices(shares: Shares) -> str:
    return ",".join(str(index) for index, _ in shares)


def _describe(shares: Shares) -> str:
    return ",".join(f"{index}" if share >= 1 else f"{index}:{share:g}" for index, share in shares)


# --- free capacity -------------------------------------------------------------------------------


def _free_devices(capacities: tuple[float, ...], held: Iterable[Shares]) -> tuple[float, ...]:
    used: list[list[float]] = [[] for _ in capacities]
    for shares in held:
        for index, share in shares:
            if 0 <= index < len(used):  # a device that no longer exists frees nothing
                used[index].append(share)
    return tuple(max(0.0, cap - math.fsum(u)) for cap, u in zip(capacities, used, strict=True))


def free_capacity(inventory: Inventory, held: Iterable[Assignment]) -> Inventory:
    """What is left of `inventory` once `held` is taken (never below zero)."""
    held = tuple(held)
    mem = None if inventory.mem is None else max(0, inventory.mem - sum(a.mem for a in held))
    return Inventory(
        cpu=max(0.0, inventory.cpu - math.fsum(a.cpu for a in held)),
        mem=mem,
        gpus=_free_devices(inventory.gpus, (a.gpus for a in held)),
        accelerators={
            name: _free_devices(capacities, (a.accelerators.get(name, ()) for a in held))
            for name, capacities in sorted(inventory.accelerators.items())
        },
    )


# --- placement -----------------------------------------------------------------------------------


def _never_fits_devices(name: str, units: float, capacities: tuple[float, ...]) -> str | None:
    if units <= 0:
        return None
    if units > 1 and units != int(units):
        return f"never fits: {name}: {format_number(units)} is neither a fraction of one device nor whole devices"
    if units < 1:
        if not capacities:
            return f"never fits: needs {name}: {format_number(units)}, the node has 0"
        if not any(units <= cap + EPSILON for cap in capacities):
            largest = format_number(max(capacities))
            return f"never fits: needs {name}: {format_number(units)}, the largest device has {largest}"
        return None
    if int(units) > len(capacities):
        return f"never fits: needs {name}: {format_number(units)}, the node has {len(capacities)}"
    return None


def _take_devices(
    name: str, units: float, capacities: tuple[float, ...], free: tuple[float, ...]
) -> Shares | Unplaceable:
    if units <= 0:
        return ()
    if units < 1:
        fitting = [(f, i) for i, f in enumerate(free) if units <= f + EPSILON]
        if not fitting:
            most = max(free, default=0.0)
            return Unplaceable(f"needs {name}: {format_number(units)} on one device, {format_number(most)} free")
        _, best = min(fitting)  # least free share that fits; ties go to the lowest index
        return ((best, units),)
    whole = [i for i, (cap, f) in enumerate(zip(capacities, free, strict=True)) if f >= cap - EPSILON]
    wanted = int(units)
    if len(whole) < wanted:
        return Unplaceable(f"needs {name}: {wanted}, {len(whole)} free")
    return tuple((i, capacities[i]) for i in whole[:wanted])


def place(request: ComputeSpec, inventory: Inventory, held: Iterable[Assignment]) -> Assignment | Unplaceable:
    """Where one replica with `request` fits on a node with `inventory` whose replicas hold `held`."""
    wanted_mem = request.mem or 0
    accelerators = sorted((name, units) for name, units in request.accelerators.items() if units > 0)

    # A request bigger than the node can never be placed; say so before any "not free now".
    never = _never_fits_devices("gpu", request.gpu, inventory.gpus)
    for name, units in accelerators:
        never = never or _never_fits_devices(name, units, inventory.accelerators.get(name, ()))
    if never:
        return Unplaceable(never)
    if request.cpu > inventory.cpu + EPSILON:
        return Unplaceable(
            f"never fits: needs cpu: {format_number(request.cpu)}, the node has {format_number(inventory.cpu)}"
        )
    if inventory.mem is not None and wanted_mem > inventory.mem:
        return Unplaceable(
            f"never fits: needs mem: {format_memory(wanted_mem)}, the node has {format_memory(inventory.mem)}"
        )

    free = free_capacity(inventory, held)
    gpus = _take_devices("gpu", request.gpu, inventory.gpus, free.gpus)
    if isinstance(gpus, Unplaceable):
        return gpus
    taken: dict[str, Shares] = {}
    for name, units in accelerators:
        shares = _take_devices(name, units, inventory.accelerators[name], free.accelerators[name])
        if isinstance(shares, Unplaceable):
            return shares
        taken[name] = shares
    if request.cpu > free.cpu + EPSILON:
        return Unplaceable(f"needs cpu: {format_number(request.cpu)}, {format_number(free.cpu)} free")
    if free.mem is not None and wanted_mem > free.mem:
        return Unplaceable(f"needs mem: {format_memory(wanted_mem)}, {format_memory(free.mem)} free")
    return Assignment(cpu=request.cpu, mem=wanted_mem, gpus=gpus, accelerators=taken)
