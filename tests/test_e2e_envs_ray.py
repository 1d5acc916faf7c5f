"""An API's own Python environment on the Ray runtime: the replica's actor gets the resolved pins as
its `runtime_env` (Ray's uv support builds the environment on the node) and the replica runs that
environment's interpreter, seeing its own package version and Cirrus from the node's base packages."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import netns_cluster
import pytest
from conftest import Cirrus, write_project
from netns_cluster import NetnsCluster

PREDICTOR = """
import sys

import tabulate


class Predictor:
    def predict(self, payload):
        return {"tabulate": tabulate.__version__, "executable": sys.executable}
"""


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cirrus]:
    netns_cluster.require()
    workdir = tmp_path_factory.mktemp("ray-envs")
    with NetnsCluster(workdir) as made:
        made.start_head(num_cpus=2)  # replicas run on the head, which reaches the package index
        env = {k: v for k, v in made.env().items() if k.startswith(("RAY_", netns_cluster.MARKER_ENV))}
        cirrus = Cirrus(workdir / "home", CIRRUS_RUNTIME="ray", **env)
        cirrus.up()
        try:
            yield cirrus
        finally:
            leftovers = cirrus.shutdown()
            assert not leftovers, leftovers


def test_a_ray_replica_runs_in_its_runtime_env(daemon: Cirrus, tmp_path: Path) -> None:
    project = write_project(tmp_path / "old", PREDICTOR, name="old", python={"packages": ["tabulate==0.8.10"]})
    client = daemon.client()
    started = time.monotonic()
    client.deploy(project, timeout=600)
    print(f"live on Ray with its runtime_env in {time.monotonic() - started:.1f} s")
    answer = client.predict("old", {}).json()
    assert answer["tabulate"] == "0.8.10"
    env = client.get("old").environment
    assert env is not None and env.python is not None
    assert answer["executable"] != env.python  # the node's runtime_env interpreter, not the daemon's path
    assert "runtime_resources" in answer["executable"] or "virtualenv" in answer["executable"], answer
