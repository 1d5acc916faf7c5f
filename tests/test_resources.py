"""Resource discovery: probes, the node config file, CIRRUS_NODE_RESOURCES and their errors."""

from __future__ import annotations

import json
import os
import stat
import sys
from pathlib import Path

import pytest

from cirrus.runtimes import resources
from cirrus.runtimes.resources import Inventory, describe, discover, format_memory, parse_meminfo

GI = 2**30


@pytest.fixture(autouse=True)
def no_nvml(monkeypatch: pytest.MonkeyPatch) -> None:
    """Whatever this machine has installed, pynvml is not importable in these tests."""
    monkeypatch.setitem(sys.modules, "pynvml", None)


def bare_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """An environment whose PATH holds no nvidia-smi and whose CIRRUS_HOME holds no node.yaml."""
    (tmp_path / "bin").mkdir(exist_ok=True)
    (tmp_path / "home").mkdir(exist_ok=True)
    return {"PATH": str(tmp_path / "bin"), "CIRRUS_HOME": str(tmp_path / "home"), **extra}


def fake_nvidia_smi(tmp_path: Path, script: str) -> None:
    (tmp_path / "bin").mkdir(exist_ok=True)
    exe = tmp_path / "bin" / "nvidia-smi"
    exe.write_text(f"#!/bin/sh\n{script}\n")
    exe.chmod(exe.stat().st_mode | stat.S_IXUSR)


# --- discovery -----------------------------------------------------------------------------------


def test_discovers_this_machine_without_gpus(tmp_path: Path) -> None:
    inventory = discover(bare_env(tmp_path), None)
    assert inventory.cpu == len(os.sched_getaffinity(0))
    assert inventory.mem is not None and inventory.mem > 0
    assert inventory.gpus == ()
    assert inventory.accelerators == {}


def test_discover_with_the_real_environment_does_not_fail() -> None:
    inventory = discover({**os.environ, "CIRRUS_HOME": "/nonexistent-cirrus-home"}, None)
    assert inventory.cpu >= 1
    assert all(capacity == 1.0 for capacity in inventory.gpus)


def test_nvidia_smi_counts_gpus(tmp_path: Path) -> None:
    env = bare_env(tmp_path)
    fake_nvidia_smi(tmp_path, 'echo 0; echo 1; echo "2"')
    assert discover(env, None).gpus == (1.0, 1.0, 1.0)


@pytest.mark.parametrize(
    "script",
    ["echo 'NVIDIA-SMI has failed' >&2; exit 9", "echo 'No devices were found'", "exec sleep 5"],
    ids=["fails", "garbage", "hangs"],
)
def test_a_broken_nvidia_smi_means_no_gpus(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, script: str) -> None:
    monkeypatch.setattr(resources, "NVIDIA_SMI_TIMEOUT_S", 0.2)
    fake_nvidia_smi(tmp_path, script)
    assert discover(bare_env(tmp_path), None).gpus == ()


def test_nvml_is_used_when_importable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []

    class FakeNvml:
        @staticmethod
        def nvmlInit() -> None:
            calls.append("init")

        @staticmethod
        def nvmlDeviceGetCount() -> int:
            return 2

        @staticmethod
        def nvmlShutdown() -> None:
            calls.append("shutdown")

    monkeypatch.setitem(sys.modules, "pynvml", FakeNvml)
    assert discover(bare_env(tmp_path), None).gpus == (1.0, 1.0)
    assert calls == ["init", "shutdown"]


def test_nvml_without_a_driver_falls_back_to_nvidia_smi(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    class BrokenNvml:
        @staticmethod
        def nvmlInit() -> None:
            raise RuntimeError("NVML Shared Library Not Found")

    monkeypatch.setitem(sys.modules, "pynvml", BrokenNvml)
    env = bare_env(tmp_path)
    assert discover(env, None).gpus == ()
    fake_nvidia_smi(tmp_path, "echo 0")
    assert discover(env, None).gpus == (1.0,)


def test_parse_meminfo() -> None:
    text = "MemTotal:       24576000 kB\nMemFree:         1000 kB\n"
    assert parse_meminfo(text) == 24576000 * 1024
    assert parse_meminfo("MemFree: 1 kB\n") is None


# --- overrides -----------------------------------------------------------------------------------


def test_node_yaml_in_cirrus_home_overrides(tmp_path: Path) -> None:
    env = bare_env(tmp_path)
    (tmp_path / "home" / "node.yaml").write_text("{cpu: 8, mem: 16Gi, gpus: 2, accelerators: {neuron: 2}}\n")
    assert discover(env, None) == Inventory(cpu=8, mem=16 * GI, gpus=(1.0, 1.0), accelerators={"neuron": (1.0, 1.0)})


def test_explicit_node_config_and_partial_keys(tmp_path: Path) -> None:
    config = tmp_path / "custom.yaml"
    config.write_text("gpus: 1\n")
    inventory = discover(bare_env(tmp_path), config)
    assert inventory.gpus == (1.0,)
    assert inventory.cpu == len(os.sched_getaffinity(0))  # not given: discovered
    assert inventory.mem is not None and inventory.mem > 0


def test_an_empty_node_config_changes_nothing(tmp_path: Path) -> None:
    env = bare_env(tmp_path)
    (tmp_path / "home" / "node.yaml").write_text("# nothing yet\n")
    assert discover(env, None) == discover(bare_env(tmp_path), tmp_path / "home" / "node.yaml")


def test_env_json_overrides_the_file(tmp_path: Path) -> None:
    env = bare_env(tmp_path, CIRRUS_NODE_RESOURCES=json.dumps({"cpu": 4.5, "mem": "512Mi", "accelerators": {}}))
    (tmp_path / "home" / "node.yaml").write_text("{cpu: 8, mem: 16Gi, gpus: 2, accelerators: {neuron: 2}}\n")
    assert discover(env, None) == Inventory(cpu=4.5, mem=512 * 2**20, gpus=(1.0, 1.0), accelerators={})


def test_mem_null_means_unlimited(tmp_path: Path) -> None:
    env = bare_env(tmp_path, CIRRUS_NODE_RESOURCES='{"mem": null}')
    assert discover(env, None).mem is None
    assert discover(bare_env(tmp_path, CIRRUS_NODE_RESOURCES="  "), None).mem is not None


def test_overridden_gpus_are_not_probed(tmp_path: Path) -> None:
    env = bare_env(tmp_path, CIRRUS_NODE_RESOURCES='{"gpus": 0}')
    fake_nvidia_smi(tmp_path, "touch " + str(tmp_path / "probed") + "; echo 0")
    assert discover(env, None).gpus == ()
    assert not (tmp_path / "probed").exists()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("{cpus: 8}", "cpus: unknown key; allowed: cpu, mem, gpus, accelerators"),
        ("cpu: 0", "cpu: Input should be greater than 0"),
        ("cpu: eight", "cpu: 'eight' is not a number of CPU cores"),
        ("cpu: true", "cpu: True is not a number of CPU cores"),
        ("mem: 16 gigs", "mem: '16 gigs' is not a memory size"),
        ("mem: 0", "mem: memory must be positive"),
        ("gpus: 1.5", "gpus: Input should be a valid integer"),
        ("gpus: -1", "gpus: Input should be greater than or equal to 0"),
        ("gpus: null", "gpus: must not be null"),
        ("accelerators: {Neuron: 2}", "accelerators: 'Neuron' is not an accelerator name"),
        ("accelerators: {gpu: 2}", "declare GPUs with the gpus key"),
        ("accelerators: {neuron: 0.5}", "accelerators.neuron: Input should be a valid integer"),
        ("accelerators: {neuron: 65}", "neuron: 65 units is out of range (0-64)"),
        ("[8]", "expected a mapping"),
        ("cpu: [", "not valid YAML"),
    ],
)
def test_bad_node_config_names_the_file_and_key(tmp_path: Path, text: str, message: str) -> None:
    config = tmp_path / "node.yaml"
    config.write_text(text + "\n")
    with pytest.raises(ValueError) as caught:
        discover(bare_env(tmp_path), config)
    assert str(config) in str(caught.value)
    assert message in str(caught.value)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ('{"cpus": 8}', "cpus: unknown key"),
        ('{"gpus": "two"}', "gpus: Input should be a valid integer"),
        ("{cpu: 8}", "not valid JSON"),
        ("8", "expected a mapping"),
    ],
)
def test_bad_env_json_names_the_variable(tmp_path: Path, value: str, message: str) -> None:
    with pytest.raises(ValueError) as caught:
        discover(bare_env(tmp_path, CIRRUS_NODE_RESOURCES=value), None)
    assert "environment variable CIRRUS_NODE_RESOURCES" in str(caught.value)
    assert message in str(caught.value)


def test_an_explicit_node_config_must_exist(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="node config file does not exist"):
        discover(bare_env(tmp_path), tmp_path / "missing.yaml")


# --- describe ------------------------------------------------------------------------------------


def test_describe() -> None:
    inventory = Inventory(cpu=2, mem=int(23.4 * GI), gpus=(), accelerators={})
    assert describe(inventory) == "2 cpu, 23.4Gi mem, 0 gpu"
    full = Inventory(cpu=0.5, mem=None, gpus=(1.0, 1.0), accelerators={"tpu": (1.0,), "neuron": (1.0, 1.0)})
    assert describe(full) == "0.5 cpu, unlimited mem, 2 gpu, 2 neuron, 1 tpu"


def test_format_memory() -> None:
    assert [format_memory(n) for n in (0, 512, 512 * 2**20, int(1.5 * GI), 2**40)] == [
        "0",
        "0.5Ki",
        "512Mi",
        "1.5Gi",
        "1024Gi",
    ]
