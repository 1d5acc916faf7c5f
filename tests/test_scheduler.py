"""Placement (pure, `cirrus.runtimes.placement`): cpu/mem limits, GPU packing and whole devices, accelerators,
reasons, env(), devices()."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cirrus.runtimes.placement import EPSILON, Assignment, Inventory, Unplaceable, free_capacity, place
from cirrus.spec import ComputeSpec

GI = 2**30


def spec(**fields: Any) -> ComputeSpec:
    fields.setdefault("cpu", 0)
    return ComputeSpec.model_validate(fields)


def node(cpu: float = 8, mem: int | None = 16 * GI, gpus: int = 0, **accelerators: int) -> Inventory:
    return Inventory(
        cpu=cpu, mem=mem, gpus=(1.0,) * gpus, accelerators={k: (1.0,) * v for k, v in accelerators.items()}
    )


def placed(request: ComputeSpec, inventory: Inventory, held: list[Assignment]) -> Assignment:
    result = place(request, inventory, held)
    assert isinstance(result, Assignment), result
    held.append(result)
    return result


def reason(request: ComputeSpec, inventory: Inventory, held: list[Assignment] | None = None) -> str:
    result = place(request, inventory, held or [])
    assert isinstance(result, Unplaceable), result
    return result.reason


# --- cpu and memory ------------------------------------------------------------------------------


def test_cpu_and_mem_are_divisible_until_full() -> None:
    inventory = node(cpu=2, mem=4 * GI)
    held: list[Assignment] = []
    first = placed(spec(cpu=1.5, mem="1Gi"), inventory, held)
    assert first == Assignment(cpu=1.5, mem=GI)
    placed(spec(cpu=0.5, mem="2Gi"), inventory, held)
    assert reason(spec(cpu=0.5), inventory, held) == "needs cpu: 0.5, 0 free"
    assert free_capacity(inventory, held) == Inventory(cpu=0.0, mem=GI, gpus=(), accelerators={})
    assert reason(spec(mem="1.5Gi"), inventory, held) == "needs mem: 1.5Gi, 1Gi free"


def test_cpu_reason_and_epsilon() -> None:
    inventory = node(cpu=1)
    held: list[Assignment] = []
    for _ in range(10):
        placed(spec(cpu=0.1), inventory, held)  # 10 x 0.1 == 0.9999999999999999 fills 1 cpu
    assert reason(spec(cpu=0.1), inventory, held) == "needs cpu: 0.1, 0 free"
    assert reason(spec(cpu=2), node(cpu=4), [Assignment(cpu=3.5)]) == "needs cpu: 2, 0.5 free"


def test_mem_reason_formats_gi_and_mi() -> None:
    inventory = node(mem=4 * GI)
    assert reason(spec(mem="4Gi"), inventory, [Assignment(mem=int(2.5 * GI))]) == "needs mem: 4Gi, 1.5Gi free"
    assert reason(spec(mem="512Mi"), inventory, [Assignment(mem=4 * GI - 256 * 2**20)]) == (
        "needs mem: 512Mi, 256Mi free"
    )


def test_unknown_node_memory_is_unlimited_and_unset_request_holds_none() -> None:
    inventory = node(mem=None)
    held: list[Assignment] = []
    assert placed(spec(mem="1Ti"), inventory, held).mem == 2**40
    assert placed(spec(), node(), []).mem == 0


def test_zero_request_holds_nothing() -> None:
    inventory = node(cpu=0, mem=0)
    assert place(spec(cpu=0, gpu=0, accelerators={"neuron": 0}), inventory, []) == Assignment()


# --- GPUs ----------------------------------------------------------------------------------------


def test_two_halves_pack_one_device() -> None:
    inventory = node(gpus=2)
    held: list[Assignment] = []
    assert placed(spec(gpu=0.5), inventory, held).gpus == ((0, 0.5),)
    assert placed(spec(gpu=0.5), inventory, held).gpus == ((0, 0.5),)
    assert free_capacity(inventory, held).gpus == (0.0, 1.0)
    assert placed(spec(gpu=1), inventory, held).gpus == ((1, 1.0),)
    assert reason(spec(gpu=0.5), inventory, held) == "needs gpu: 0.5 on one device, 0 free"


def test_half_whole_half_fits_two_devices() -> None:
    inventory = node(gpus=2)
    held: list[Assignment] = []
    assert placed(spec(gpu=0.5), inventory, held).gpus == ((0, 0.5),)
    assert placed(spec(gpu=1.0), inventory, held).gpus == ((1, 1.0),)
    assert placed(spec(gpu=0.5), inventory, held).gpus == ((0, 0.5),)
    assert free_capacity(inventory, held).gpus == (0.0, 0.0)


def test_fraction_takes_the_best_fit() -> None:
    inventory = node(gpus=3)
    held = [Assignment(gpus=((0, 0.25),)), Assignment(gpus=((1, 0.75),))]
    # free: 0.75, 0.25, 1.0 -> 0.25 goes to device 1 (least free that fits), 0.5 to device 0
    assert place(spec(gpu=0.25), inventory, held) == Assignment(gpus=((1, 0.25),))
    assert place(spec(gpu=0.5), inventory, held) == Assignment(gpus=((0, 0.5),))
    assert place(spec(gpu=0.8), inventory, held) == Assignment(gpus=((2, 0.8),))
    # a tie goes to the lowest index
    assert place(spec(gpu=0.5), node(gpus=3), []) == Assignment(gpus=((0, 0.5),))


def test_ten_tenths_fill_one_device() -> None:
    inventory = node(gpus=1)
    held: list[Assignment] = []
    for _ in range(10):
        assert placed(spec(gpu=0.1), inventory, held).gpus == ((0, 0.1),)
    assert reason(spec(gpu=0.1), inventory, held) == "needs gpu: 0.1 on one device, 0 free"


def test_whole_devices_lowest_first_and_never_a_shared_one() -> None:
    inventory = node(gpus=4)
    held = [Assignment(gpus=((1, 0.1),))]
    assert place(spec(gpu=2), inventory, held) == Assignment(gpus=((0, 1.0), (2, 1.0)))
    assert place(spec(gpu=3), inventory, held) == Assignment(gpus=((0, 1.0), (2, 1.0), (3, 1.0)))
    assert reason(spec(gpu=4), inventory, held) == "needs gpu: 4, 3 free"
    assert reason(spec(gpu=1), node(gpus=2), [Assignment(gpus=((0, 0.5),)), Assignment(gpus=((1, 0.5),))]) == (
        "needs gpu: 1, 0 free"
    )


def test_never_fits_reasons() -> None:
    assert reason(spec(gpu=2), node(gpus=1)) == "never fits: needs gpu: 2, the node has 1"
    assert reason(spec(gpu=0.5), node(gpus=0)) == "never fits: needs gpu: 0.5, the node has 0"
    assert reason(spec(accelerators={"neuron": 2}), node(neuron=1)) == "never fits: needs neuron: 2, the node has 1"
    assert reason(spec(accelerators={"tpu": 1}), node()) == "never fits: needs tpu: 1, the node has 0"
    assert reason(spec(cpu=16), node(cpu=8)) == "never fits: needs cpu: 16, the node has 8"
    assert reason(spec(mem="32Gi"), node(mem=16 * GI)) == "never fits: needs mem: 32Gi, the node has 16Gi"
    # never-fits wins over a resource that is merely busy now
    busy = [Assignment(gpus=((0, 1.0),))]
    result = place(spec(gpu=1, cpu=16), node(cpu=8, gpus=1), busy)
    assert isinstance(result, Unplaceable) and result.never_fits
    assert not Unplaceable("needs gpu: 1, 0 free").never_fits


def test_reason_names_the_first_missing_resource_in_order() -> None:
    inventory = node(cpu=1, mem=GI, gpus=1, neuron=1)
    full = [Assignment(cpu=1, mem=GI, gpus=((0, 1.0),), accelerators={"neuron": ((0, 1.0),)})]
    request = spec(cpu=1, mem="1Gi", gpu=1, accelerators={"neuron": 1})
    assert reason(request, inventory, full) == "needs gpu: 1, 0 free"
    assert reason(spec(cpu=1, mem="1Gi", accelerators={"neuron": 1}), inventory, full) == "needs neuron: 1, 0 free"
    assert reason(spec(cpu=1, mem="1Gi"), inventory, full) == "needs cpu: 1, 0 free"
    assert reason(spec(mem="1Gi"), inventory, full) == "needs mem: 1Gi, 0 free"


# --- named accelerators --------------------------------------------------------------------------


def test_named_accelerators_follow_the_gpu_rules() -> None:
    inventory = node(neuron=4, tpu=1)
    held: list[Assignment] = []
    a = placed(spec(accelerators={"neuron": 2}), inventory, held)
    assert a.accelerators == {"neuron": ((0, 1.0), (1, 1.0))}
    b = placed(spec(accelerators={"neuron": 0.5, "tpu": 1}), inventory, held)
    assert b.accelerators == {"neuron": ((2, 0.5),), "tpu": ((0, 1.0),)}
    c = placed(spec(accelerators={"neuron": 0.5}), inventory, held)
    assert c.accelerators == {"neuron": ((2, 0.5),)}
    assert free_capacity(inventory, held).accelerators == {"neuron": (0.0, 0.0, 0.0, 1.0), "tpu": (0.0,)}
    assert reason(spec(accelerators={"neuron": 2}), inventory, held) == "needs neuron: 2, 1 free"


# --- release -------------------------------------------------------------------------------------


def test_release_is_passing_fewer_held_assignments() -> None:
    inventory = node(cpu=2, gpus=1)
    held: list[Assignment] = []
    first = placed(spec(cpu=1, gpu=1), inventory, held)
    placed(spec(cpu=1), inventory, held)
    assert isinstance(place(spec(cpu=1, gpu=1), inventory, held), Unplaceable)
    held.remove(first)
    assert place(spec(cpu=1, gpu=1), inventory, held) == first


def test_free_capacity_ignores_devices_the_node_no_longer_has() -> None:
    stale = [Assignment(cpu=4, mem=32 * GI, gpus=((5, 1.0),), accelerators={"gone": ((0, 1.0),)})]
    assert free_capacity(node(cpu=2, mem=GI, gpus=1), stale) == Inventory(cpu=0, mem=0, gpus=(1.0,), accelerators={})


def test_placement_is_deterministic() -> None:
    inventory = node(gpus=4, neuron=2)
    held = [Assignment(gpus=((2, 0.5),)), Assignment(gpus=((0, 0.25),))]
    request = spec(cpu=1, gpu=0.25, accelerators={"neuron": 1})
    results = {repr(place(request, inventory, order)) for order in (held, held[::-1], tuple(held), iter(held))}
    assert len(results) == 1


# --- env -----------------------------------------------------------------------------------------


def test_env_without_gpus_hides_every_gpu() -> None:
    assert Assignment(cpu=1).env() == {"CUDA_VISIBLE_DEVICES": ""}


def test_env_of_gpus_and_accelerators() -> None:
    inventory = node(gpus=2, neuron=4, tpu=2)
    whole = place(spec(gpu=2, accelerators={"neuron": 2, "tpu": 0.5}), inventory, [])
    assert isinstance(whole, Assignment)
    assert whole.env() == {
        "CUDA_VISIBLE_DEVICES": "0,1",
        "CUDA_DEVICE_ORDER": "PCI_BUS_ID",
        "CIRRUS_ACCELERATOR_NEURON": "0,1",
        "NEURON_RT_VISIBLE_CORES": "0,1",
        "CIRRUS_ACCELERATOR_TPU": "0",
    }
    half = place(spec(gpu=0.5), inventory, [whole])
    assert half == Unplaceable("needs gpu: 0.5 on one device, 0 free")
    shared = place(spec(gpu=0.5, accelerators={"neuron": 1}), inventory, [])
    assert isinstance(shared, Assignment)
    assert shared.env() == {
        "CUDA_VISIBLE_DEVICES": "0",
        "CUDA_DEVICE_ORDER": "PCI_BUS_ID",
        "CIRRUS_ACCELERATOR_NEURON": "0",
        "NEURON_RT_VISIBLE_CORES": "0",
    }


def test_env_of_an_accelerator_held_with_no_units() -> None:
    assert Assignment(accelerators={"neuron": ()}).env() == {
        "CUDA_VISIBLE_DEVICES": "",
        "CIRRUS_ACCELERATOR_NEURON": "",
    }


# --- devices (what `cirrus get` shows) -----------------------------------------------------------


def test_devices_of_whole_and_shared_devices() -> None:
    inventory = node(gpus=3, neuron=4, tpu=2)
    held: list[Assignment] = []
    whole = placed(spec(gpu=2, accelerators={"neuron": 2, "tpu": 0.5}), inventory, held)
    assert whole.devices() == {"gpu": "0,1", "neuron": "0,1", "tpu": "0:0.5"}
    half = placed(spec(gpu=0.5), inventory, held)
    assert half.devices() == {"gpu": "2:0.5"}
    assert placed(spec(gpu=0.25), inventory, held).devices() == {"gpu": "2:0.25"}


def test_devices_of_an_assignment_without_devices_is_empty() -> None:
    assert Assignment(cpu=1, mem=GI).devices() == {}
    assert Assignment(accelerators={"neuron": ()}).devices() == {}


# --- property: placements never overcommit -------------------------------------------------------

_units = st.one_of(
    st.just(0.0),
    st.sampled_from([0.1, 0.2, 0.25, 0.3, 0.5, 0.7, 0.75]),
    st.floats(min_value=0.01, max_value=0.99),
    st.integers(min_value=1, max_value=3).map(float),
)
_requests = st.builds(
    lambda cpu, mem, gpu, neuron: spec(cpu=cpu, mem=mem, gpu=gpu, accelerators={"neuron": neuron}),
    cpu=st.sampled_from([0, 0.1, 0.25, 0.5, 1, 2]),
    mem=st.sampled_from([None, 0, 2**20, GI, 3 * GI]),
    gpu=_units,
    neuron=_units,
)
# each step places a request, or releases the held assignment at an index (modulo the count)
_steps = st.lists(st.one_of(_requests, st.integers(min_value=0, max_value=50)), max_size=40)


@settings(max_examples=300, deadline=None)
@given(
    cpu=st.sampled_from([1, 2, 3.5, 8]),
    mem=st.sampled_from([None, 4 * GI]),
    gpus=st.integers(0, 4),
    neuron=st.integers(0, 3),
    steps=_steps,
)
def test_placements_never_exceed_capacity(
    cpu: float, mem: int | None, gpus: int, neuron: int, steps: list[ComputeSpec | int]
) -> None:
    inventory = node(cpu=cpu, mem=mem, gpus=gpus, neuron=neuron)
    held: list[Assignment] = []
    for step in steps:
        if isinstance(step, int):
            if held:
                held.pop(step % len(held))
            continue
        result = place(step, inventory, held)
        assert result == place(step, inventory, held)  # deterministic
        if isinstance(result, Unplaceable):
            continue
        assert result.cpu == step.cpu and result.mem == (step.mem or 0)
        assert sum(share for _, share in result.gpus) == pytest.approx(step.gpu if step.gpu < 1 else int(step.gpu))
        held.append(result)
        tolerance = EPSILON * len(held)
        assert sum(a.cpu for a in held) <= cpu + tolerance
        if mem is not None:
            assert sum(a.mem for a in held) <= mem
        for name, capacities, pick in [("gpu", inventory.gpus, lambda a: a.gpus)] + [
            (name, caps, lambda a, n=name: a.accelerators.get(n, ())) for name, caps in inventory.accelerators.items()
        ]:
            for index, capacity in enumerate(capacities):
                shares = [share for a in held for i, share in pick(a) if i == index]
                assert sum(shares) <= capacity + tolerance, (name, index, shares)
                if any(share >= 1 for share in shares):
                    assert len(shares) == 1, f"{name} {index}: a whole device is shared: {shares}"
