"""Placement through the real daemon on a declared inventory (2 GPUs, 2 neuron units): each
replica sees only its devices, a replica that does not fit stays pending with the reason, and
starts when capacity frees."""

from __future__ import annotations

from pathlib import Path

from conftest import Cirrus, write_project

from cirrus.types import ReplicaState

ENV_PREDICTOR = """
import os


class Predictor:
    def predict(self, payload):
        return {
            "cuda": os.environ.get("CUDA_VISIBLE_DEVICES"),
            "neuron": os.environ.get("CIRRUS_ACCELERATOR_NEURON"),
        }
"""

NODE_YAML = "cpu: 8\nmem: 16Gi\ngpus: 2\naccelerators: {neuron: 2}\n"


def test_gpu_replicas_get_their_devices_and_the_rest_wait(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    (home / "node.yaml").write_text(NODE_YAML)  # the node's declared inventory
    cirrus = Cirrus(home)
    try:
        cirrus.up()
        client = cirrus.client()
        trainer = write_project(
            tmp_path / "trainer",
            ENV_PREDICTOR,
            name="trainer",
            compute={"gpu": 1, "cpu": 1},
            autoscaling={"min_replicas": 3, "max_replicas": 3},
        )
        client.deploy(trainer, wait=False)
        status = cirrus.wait_for("trainer", lambda s: s.replicas_ready == 2 and s.replicas_pending == 1)
        ready = [r for r in status.replicas if r.state is ReplicaState.READY]
        [pending] = [r for r in status.replicas if r.state is ReplicaState.PENDING]
        assert pending.reason == "needs gpu: 1, 0 free"
        assert pending.pid is None
        assert sorted(r.devices["gpu"] for r in ready) == ["0", "1"]
        assert status.message is not None and "needs gpu: 1, 0 free" in status.message
        code, out, _ = cirrus.cli("get")
        assert code == 0 and "trainer" in out
        code, out, _ = cirrus.cli("get", "trainer")
        assert "pending" in out and "needs gpu: 1, 0 free" in out

        seen = {client.predict("trainer", {}).json()["cuda"] for _ in range(20)}
        assert seen == {"0", "1"}  # each replica sees exactly its own GPU

        # Two half-GPU replicas and a neuron replica wait until the trainer frees its GPUs.
        sharer = write_project(
            tmp_path / "sharer",
            ENV_PREDICTOR,
            apis=[
                {"name": "half", "compute": {"gpu": 0.5}, "autoscaling": {"min_replicas": 2, "max_replicas": 2}},
                {"name": "inferentia", "compute": {"accelerators": {"neuron": 2}}},
            ],
        )
        client.deploy(sharer, wait=False)
        cirrus.wait_for("inferentia", lambda s: s.replicas_ready == 1)
        assert client.predict("inferentia", {}).json() == {"cuda": "", "neuron": "0,1"}
        half = cirrus.wait_for("half", lambda s: s.replicas_pending == 2)
        assert {r.reason for r in half.replicas} == {"needs gpu: 0.5 on one device, 0 free"}

        client.delete("trainer")
        half = cirrus.wait_for("half", lambda s: s.replicas_ready == 2, timeout=30)
        [device] = {r.devices["gpu"] for r in half.replicas}  # both packed on one device
        assert device in ("0:0.5", "1:0.5")
        assert {client.predict("half", {}).json()["cuda"] for _ in range(10)} == {device[0]}
    finally:
        leftovers = cirrus.shutdown()
        assert leftovers == {}
