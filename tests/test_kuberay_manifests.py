"""The deployment files under deploy/ (docs/cluster.md), checked offline, and the daemon container's
entrypoint run for real.

- **Core objects** of deploy/kuberay (ConfigMap, PersistentVolumeClaim, Deployment, Service):
  `kubernetes-validate --strict` (unknown fields are errors) against the schemas it bundles, for the
  newest Kubernetes it knows and for 1.30.
- **The RayCluster.** kubernetes-validate knows no custom resource: its CLI, even under `--strict`,
  prints "Couldn't find schema for kind RayCluster" as a warning and exits 0, and its `validate()`
  raises `SchemaNotFoundError` (both asserted here, so that a release that starts checking it is
  noticed). No PyPI package ships KubeRay's CRD, so the RayCluster is checked in two parts: its pod
  templates (most of the document) strictly as core `PodTemplate`s by kubernetes-validate, and the
  rest against RAYCLUSTER_SCHEMA below, a JSON schema written here from KubeRay's `ray.io/v1` Go
  types (RayClusterSpec, HeadGroupSpec, WorkerGroupSpec: field names, types, and the fields without
  `omitempty` as required). It is not KubeRay's CRD: it admits only the fields of those types, so a
  field a newer KubeRay added is refused here until it is added to the schema.
- **The pieces fit**: one image everywhere, built FROM the Ray that pyproject.toml pins, which is
  also the RayCluster's `rayVersion`; the daemon reaches the head through the Service KubeRay makes
  for it; the gateway's Service, port and probe meet the daemon's settings.
- **deploy/ray/cluster.yaml** against the JSON schema Ray's cluster launcher checks configs with
  (`ray/autoscaler/ray-schema.json`, in the installed Ray).
- **The entrypoint** (the ConfigMap's script) in a network namespace joined to a Ray cluster of
  namespaces (tests/netns_cluster.py): it makes the namespace a Ray node, makes the first API key,
  serves the gateway on the namespace's address with a replica on another node, and exits 0 on
  SIGTERM having stopped its replicas. Kubernetes itself is not run.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
import tomllib
from pathlib import Path
from typing import Any

import backends
import httpx
import netns_cluster
import pytest
import yaml
from conftest import write_project

ROOT = Path(__file__).resolve().parent.parent
KUBERAY = ROOT / "deploy" / "kuberay"
CORE_KINDS = {"ConfigMap", "PersistentVolumeClaim", "Deployment", "Service"}
KUBERNETES_VERSIONS = ("1.30.0", None)  # None: the newest kubernetes-validate bundles
GCS_PORT = "6379"  # `ray start --head`'s default, which KubeRay's head Service exposes

_STRING_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
_COUNT = {"type": "integer", "minimum": 0, "maximum": 2147483647}
RAYCLUSTER_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "additionalProperties": False,
    "properties": {
        "apiVersion": {"const": "ray.io/v1"},
        "kind": {"const": "RayCluster"},
        "metadata": {
            "type": "object",
            "required": ["name"],
            "additionalProperties": False,
            "properties": {
                "name": {"type": "string", "pattern": r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", "maxLength": 63},
                "namespace": {"type": "string"},
                "labels": _STRING_MAP,
                "annotations": _STRING_MAP,
            },
        },
        "spec": {
            "type": "object",
            "required": ["headGroupSpec"],
            "additionalProperties": False,
            "properties": {
                "rayVersion": {"type": "string"},
                "enableInTreeAutoscaling": {"type": "boolean"},
                "autoscalerOptions": {"type": "object"},
                "headServiceAnnotations": _STRING_MAP,
                "suspend": {"type": "boolean"},
                "headGroupSpec": {
                    "type": "object",
                    "required": ["rayStartParams", "template"],
                    "additionalProperties": False,
                    "properties": {
                        "serviceType": {"enum": ["ClusterIP", "NodePort", "LoadBalancer"]},
                        "headService": {"type": "object"},
                        "enableIngress": {"type": "boolean"},
                        "rayStartParams": _STRING_MAP,
                        "template": {"type": "object"},  # a PodTemplateSpec: checked by kubernetes-validate
                    },
                },
                "workerGroupSpecs": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "required": ["groupName", "minReplicas", "maxReplicas", "rayStartParams", "template"],
                        "additionalProperties": False,
                        "properties": {
                            "groupName": {"type": "string", "minLength": 1},
                            "replicas": _COUNT,
                            "minReplicas": _COUNT,
                            "maxReplicas": _COUNT,
                            "numOfHosts": {"type": "integer", "minimum": 1},
                            "rayStartParams": _STRING_MAP,
                            "template": {"type": "object"},
                            "scaleStrategy": {
                                "type": "object",
                                "additionalProperties": False,
                                "properties": {"workersToDelete": {"type": "array", "items": {"type": "string"}}},
                            },
                        },
                    },
                },
            },
        },
    },
}


def _documents(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def _manifests() -> dict[str, dict[str, Any]]:
    """Every object of deploy/kuberay/*.yaml by kind (each kind appears once)."""
    found: dict[str, dict[str, Any]] = {}
    for path in sorted(KUBERAY.glob("*.yaml")):
        for doc in _documents(path):
            assert doc["kind"] not in found, f"{path.name}: a second {doc['kind']}"
            found[doc["kind"]] = doc
    return found


def _kubernetes_validate() -> Any:
    return backends.module("kubernetes_validate", "kubernetes-validate")


def _errors(validator: Any, doc: dict[str, Any], version: str) -> str | None:
    try:
        validator.validate(doc, version, strict=True)
    except validator.ValidationError as exc:
        return f"{doc['kind']} {doc['metadata'].get('name')} against Kubernetes {version}: {exc}"
    return None


def test_the_core_objects_validate_strictly() -> None:
    kv = _kubernetes_validate()
    manifests = _manifests()
    assert CORE_KINDS | {"RayCluster"} == set(manifests)
    errors = []
    for version in KUBERNETES_VERSIONS:
        for kind in sorted(CORE_KINDS):
            errors.append(_errors(kv, manifests[kind], version or kv.latest_version()))
    assert not [e for e in errors if e], "\n".join(e for e in errors if e)


def test_kubernetes_validate_passes_a_raycluster_unchecked() -> None:
    """What kubernetes-validate does with the custom resource, as the module's docstring says: why
    the RayCluster needs the checks of the next test."""
    kv = _kubernetes_validate()
    with pytest.raises(kv.SchemaNotFoundError):
        kv.validate(_manifests()["RayCluster"], kv.latest_version(), strict=True)
    command = Path(sys.executable).parent / "kubernetes-validate"
    files = [str(path) for path in sorted(KUBERAY.glob("*.yaml"))]
    ran = subprocess.run([str(command), "--strict", *files], capture_output=True, text=True, timeout=120)
    output = ran.stdout + ran.stderr
    assert ran.returncode == 0, output
    assert "Couldn't find schema for kind RayCluster" in output, output


def test_the_raycluster_validates_against_kuberay_types_and_its_pod_templates_strictly() -> None:
    kv = _kubernetes_validate()
    import jsonschema

    cluster = _manifests()["RayCluster"]
    jsonschema.validate(cluster, RAYCLUSTER_SCHEMA)
    groups = [("head", cluster["spec"]["headGroupSpec"])]
    groups += [(group["groupName"], group) for group in cluster["spec"].get("workerGroupSpecs", [])]
    errors = []
    for name, group in groups:
        pod_template = {
            "apiVersion": "v1",
            "kind": "PodTemplate",
            "metadata": {"name": f"{cluster['metadata']['name']}-{name}"},
            "template": group["template"],
        }
        for version in KUBERNETES_VERSIONS:
            errors.append(_errors(kv, pod_template, version or kv.latest_version()))
        if "minReplicas" in group:
            assert group["minReplicas"] <= group.get("replicas", group["minReplicas"]) <= group["maxReplicas"], name
    assert not [e for e in errors if e], "\n".join(e for e in errors if e)


def test_the_checks_refuse_a_misspelt_field_and_a_number_for_a_ray_start_param() -> None:
    """The checks above are not vacuous: the mistakes they exist for are refused."""
    kv = _kubernetes_validate()
    import jsonschema

    manifests = _manifests()
    service = json.loads(json.dumps(manifests["Service"]))
    service["spec"]["selectr"] = service["spec"].pop("selector")
    assert _errors(kv, service, kv.latest_version()) is not None
    for mistake in ("misspelt", "number"):
        cluster = json.loads(json.dumps(manifests["RayCluster"]))
        if mistake == "misspelt":
            cluster["spec"]["workerGroupSpecs"][0]["maxReplica"] = 2
        else:
            cluster["spec"]["headGroupSpec"]["rayStartParams"]["num-cpus"] = 0  # KubeRay wants strings
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(cluster, RAYCLUSTER_SCHEMA)


def _ray_pin() -> str:
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    [pin] = [req for req in extras["ray"] if req.startswith("ray")]
    match = re.fullmatch(r"ray(\[[^]]*\])?==(\S+)", pin)
    assert match, f"pyproject.toml's ray extra should pin one version: {pin}"
    return match.group(2)


def _containers(pod_spec: dict[str, Any]) -> list[dict[str, Any]]:
    return list(pod_spec["containers"])


def test_the_pieces_fit_together() -> None:
    manifests = _manifests()
    cluster, deployment, service = manifests["RayCluster"], manifests["Deployment"], manifests["Service"]
    version = _ray_pin()
    assert cluster["spec"]["rayVersion"] == version
    dockerfile = (KUBERAY / "Dockerfile").read_text()
    assert f"FROM rayproject/ray:{version}-py311" in dockerfile  # Cirrus needs Python 3.11+

    # One image for the head, the workers and the daemon: the same Ray, Python and Cirrus.
    templates = [cluster["spec"]["headGroupSpec"]["template"]]
    templates += [group["template"] for group in cluster["spec"]["workerGroupSpecs"]]
    templates.append(deployment["spec"]["template"])
    images = {container["image"] for template in templates for container in _containers(template["spec"])}
    assert len(images) == 1, images

    # The head offers replicas no CPUs; the daemon reaches the head's GCS through KubeRay's Service.
    head_params = cluster["spec"]["headGroupSpec"]["rayStartParams"]
    assert head_params.get("num-cpus") == "0"
    [daemon] = _containers(deployment["spec"]["template"]["spec"])
    env = {item["name"]: item.get("value") for item in daemon["env"]}
    assert env["CIRRUS_RUNTIME"] == "ray"
    assert env["CIRRUS_RAY_ADDRESS"] == f"{cluster['metadata']['name']}-head-svc:{head_params.get('port', GCS_PORT)}"

    # One daemon per state directory, its state on the claim, its script from the ConfigMap.
    assert deployment["spec"]["replicas"] == 1 and deployment["spec"]["strategy"]["type"] == "Recreate"
    volumes = {volume["name"]: volume for volume in deployment["spec"]["template"]["spec"]["volumes"]}
    mounts = {mount["name"]: mount["mountPath"] for mount in daemon["volumeMounts"]}
    claim = volumes["home"]["persistentVolumeClaim"]["claimName"]
    assert claim == manifests["PersistentVolumeClaim"]["metadata"]["name"]
    assert Path(env["CIRRUS_HOME"]).is_relative_to(mounts["home"])
    config_map = manifests["ConfigMap"]
    assert volumes["entrypoint"]["configMap"]["name"] == config_map["metadata"]["name"]
    [script_name] = config_map["data"]
    assert daemon["command"] == ["bash", f"{mounts['entrypoint']}/{script_name}"]

    # The Service reaches the gateway, which the probe asks.
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    assert deployment["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    [port] = daemon["ports"]
    assert str(port["containerPort"]) == env["CIRRUS_PORT"] and env["CIRRUS_HOST"] == "0.0.0.0"
    assert service["spec"]["ports"][0]["targetPort"] == port["name"]
    assert daemon["readinessProbe"]["httpGet"] == {"path": "/healthz", "port": port["name"]}


def test_the_entrypoint_is_valid_bash() -> None:
    [script] = _manifests()["ConfigMap"]["data"].values()
    checked = subprocess.run(["bash", "-n"], input=script, capture_output=True, text=True, timeout=30)
    assert checked.returncode == 0, checked.stderr


def test_the_ray_up_config_validates_against_rays_schema() -> None:
    found = importlib.util.find_spec("ray")
    if found is None or found.origin is None:
        backends.missing("ray", "cannot import ray: pip install -e '.[ray]'")
    import jsonschema

    schema = json.loads((Path(found.origin).parent / "autoscaler" / "ray-schema.json").read_text())
    [config] = _documents(ROOT / "deploy" / "ray" / "cluster.yaml")
    jsonschema.validate(config, schema)
    assert config["available_node_types"][config["head_node_type"]]["resources"] == {"CPU": 0}
    assert any("cirrus-serve[ray" in command for command in config["setup_commands"])


# --- the entrypoint, run ---------------------------------------------------------------------------

WHERE = """
    import os


    class Predictor:
        def predict(self, payload):
            return {"netns": os.readlink("/proc/self/ns/net")}
"""


def _wait_healthy(url: str, container: subprocess.Popen[bytes], log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        assert container.poll() is None, f"the entrypoint exited ({container.returncode}):\n{log.read_text()[-4000:]}"
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, f"no gateway at {url} after {timeout:.0f} s:\n{log.read_text()[-4000:]}"
        time.sleep(0.5)


def test_the_entrypoint_joins_the_cluster_makes_a_key_serves_and_stops_on_sigterm(tmp_path: Path) -> None:
    netns_cluster.require()
    for command in ("unshare", "nsenter"):
        if shutil.which(command) is None:
            backends.missing(netns_cluster.BACKEND, f"the `{command}` command (util-linux) is not installed")
    [script] = _manifests()["ConfigMap"]["data"].values()
    entrypoint = tmp_path / "entrypoint.sh"
    entrypoint.write_text(script)
    home = tmp_path / "home"
    project = write_project(tmp_path / "where", WHERE, name="where", compute={"cpu": 0.5})
    with contextlib.ExitStack() as stack:
        cluster = stack.enter_context(netns_cluster.NetnsCluster(tmp_path / "cluster"))
        cluster.start_head(num_cpus=0)
        worker = cluster.add_node(num_cpus=2, wait=False)
        pod = cluster.add_node(ray=False)  # the daemon's pod: a bare host, until its entrypoint runs
        cluster.wait_joined(worker)
        ray_tmp = Path(tempfile.mkdtemp(prefix="ckr", dir="/tmp"))  # Ray's socket paths must be short
        stack.callback(shutil.rmtree, ray_tmp, ignore_errors=True)
        env = cluster.env(
            CIRRUS_RUNTIME="ray",
            CIRRUS_RAY_ADDRESS=cluster.address,
            CIRRUS_HOME=str(home),
            CIRRUS_HOST="0.0.0.0",
            CIRRUS_PORT="8888",
            RAY_TMPDIR=str(ray_tmp),
            PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        )
        log = tmp_path / "entrypoint.log"
        started = time.monotonic()
        # A container: its own network and PID namespaces, the script as PID 1 (Ray's driver finds its
        # node's raylet among the processes it sees, and PID 1's exit ends every process in it).
        container_argv = ["unshare", "--pid", "--kill-child", "--mount-proc", "bash", str(entrypoint)]
        with log.open("wb") as out:
            container = cluster.run_in(pod, container_argv, env=env, stdout=out, stderr=subprocess.STDOUT)
        gateway = f"http://{pod.ip}:8888"
        _wait_healthy(f"{gateway}/healthz", container, log, timeout=180)
        serving_s = time.monotonic() - started

        key_file = home / "bootstrap-key"
        assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
        key = key_file.read_text().strip()
        assert key.startswith("cirrus_"), key

        # The CLI in the pod (as `kubectl exec`, in its namespaces): the admin API listens on the pod's
        # loopback only, and the CLI checks the daemon's pid.
        [pid_1] = [pid for pid in pod.pids() if netns_cluster._cmdline(pid).startswith(f"bash {entrypoint}")]
        exec_in_pod = ["nsenter", f"--target={pid_1}", "--pid", "--mount", "--net", "--"]
        deploy = cluster.run_in(
            None,
            [*exec_in_pod, "cirrus", "deploy", str(project), "--timeout", "120"],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        out_text, err_text = deploy.communicate(timeout=180)
        assert deploy.returncode == 0, out_text + err_text + log.read_text()[-4000:]
        assert httpx.post(f"{gateway}/where", json={}, timeout=30).status_code == 401
        answer = httpx.post(f"{gateway}/where", json={}, headers={"Authorization": f"Bearer {key}"}, timeout=30)
        assert answer.status_code == 200, answer.text
        assert answer.json()["netns"] == worker.netns_id  # the replica ran on the worker, not in the pod

        # Kubernetes stops a pod with SIGTERM to its PID 1: the script stops the daemon, which stops its
        # replicas, and exits 0.
        os.kill(pid_1, signal.SIGTERM)
        status = container.wait(timeout=60)
        deadline = time.monotonic() + 30
        while left := [pid for pid in worker.pids() if "cirrus.replica" in netns_cluster._cmdline(pid)]:
            assert time.monotonic() < deadline, left
            time.sleep(0.5)
        assert status == 0, log.read_text()[-4000:]  # a clean stop (the daemon's own SIGTERM exit is 15)
        print(f"\nthe daemon's entrypoint: joined, made a key and served in {serving_s:.1f} s")
