"""Per-API Python environments through the real daemon, uv and the package index: two APIs with
conflicting pins of a package the daemon does not have, each answering with its own version from a
replica forked from a template running its environment's interpreter; a cached deploy that builds
nothing; a bad requirement that leaves the old revision serving with the installer's message;
`cirrus envs list|prune`; eviction that keeps what is in use; reuse across a daemon restart."""

from __future__ import annotations

import json
import time
from pathlib import Path

import httpx
import yaml
from conftest import Cirrus, write_project

from cirrus.client import Client
from cirrus.types import ApiStatusName

VERSION_PREDICTOR = """
import sys

import cirrus
import msgspec
import tabulate


class Predictor:
    def __init__(self, config):
        pass

    def predict(self, payload):
        return {"tabulate": tabulate.__version__, "prefix": sys.prefix, "cirrus": cirrus.__file__,
                "msgspec": msgspec.__version__}
"""


def _project(root: Path, name: str, packages: list[str] | None = None, requirements: str | None = None) -> Path:
    python: dict[str, object] = {}
    if packages:
        python["packages"] = packages
    if requirements is not None:
        python["requirements"] = "requirements.txt"
    project = write_project(root / name, VERSION_PREDICTOR, name=name, python=python)
    if requirements is not None:
        (project / "requirements.txt").write_text(requirements)
    return project


def _replica_log(cirrus: Cirrus, api: str) -> str:
    return "".join(p.read_text() for p in (cirrus.home / "logs" / api).glob("*.log"))


def test_two_apis_with_conflicting_pins_each_run_their_own(daemon: Cirrus, tmp_path: Path) -> None:
    old = _project(tmp_path, "old", packages=["tabulate==0.8.10"])
    new = _project(tmp_path, "new", requirements="tabulate==0.9.0\n")
    code, out, err = daemon.cli("deploy", str(old), timeout=300)
    assert code == 0, err
    assert "environment (old)" in err  # the build shows in `cirrus deploy` (piped: a line per change)
    client = daemon.client()
    client.deploy(new, timeout=300)
    answers = {name: client.predict(name, {}).json() for name in ("old", "new")}
    assert answers["old"]["tabulate"] == "0.8.10" and answers["new"]["tabulate"] == "0.9.0"
    import msgspec

    import cirrus

    for name, answer in answers.items():
        status = client.get(name)
        env = status.environment
        assert env is not None and env.state == "ready" and not env.reused and env.key
        assert answer["prefix"] == str(daemon.home / "envs" / env.key)  # the replica runs the env's Python
        assert answer["cirrus"] == cirrus.__file__ and answer["msgspec"] == msgspec.__version__
        assert "forked from template" in _replica_log(daemon, name)  # ... forked from its env's template
        assert Path(env.log or "").is_file()
    code, out, _ = daemon.cli("get", "old")
    assert code == 0 and "environment" in out and "ready (built in" in out

    # The same set again (another API, same pins): nothing is built.
    same = _project(tmp_path, "same", packages=["tabulate==0.8.10"])
    client.deploy(same, timeout=120)
    reused = client.get("same").environment
    assert reused is not None and reused.reused and reused.key == client.get("old").environment.key  # type: ignore[union-attr]
    assert "nothing to build" in Path(reused.log or "").read_text()
    assert client.predict("same", {}).json()["tabulate"] == "0.8.10"

    code, out, _ = daemon.cli("envs", "list", "-o", "json")
    listed = {e["key"]: e for e in json.loads(out)}
    assert code == 0 and len(listed) == 2
    assert sorted(listed[reused.key]["used_by"]) == ["old/1", "same/1"]
    assert all(e["state"] == "ready" and e["size_bytes"] > 0 for e in listed.values())

    # A restart: each revision takes its environment again from the cache, nothing resolved or built.
    client.down(timeout=20)
    daemon.up()
    client = daemon.client()
    status = daemon.wait_for("new", lambda s: s.status == ApiStatusName.LIVE, timeout=60)
    assert status.environment is not None and status.environment.reused
    assert client.predict("new", {}).json()["tabulate"] == "0.9.0"


def test_a_bad_requirement_leaves_the_old_revision_serving(daemon: Cirrus, tmp_path: Path) -> None:
    project = _project(tmp_path, "pinned", packages=["tabulate==0.8.10"])
    client = daemon.client()
    client.deploy(project, timeout=300)
    spec = yaml.safe_load((project / "cirrus.yaml").read_text())
    spec[0]["python"]["packages"] = ["tabulate==99.0.0"]
    (project / "cirrus.yaml").write_text(yaml.safe_dump(spec))
    code, _, err = daemon.cli("deploy", str(project), timeout=120)
    assert code == 1
    assert "API 'pinned' failed to start" in err and "tabulate==99.0.0" in err
    status = client.get("pinned")
    assert status.status == ApiStatusName.ERROR and status.revision == 2
    assert status.message is not None and "no version of tabulate==99.0.0" in status.message
    env = status.environment
    assert env is not None and env.state == "failed" and "tabulate==99.0.0" in (env.error or "")
    assert "tabulate==99.0.0" in Path(env.log or "").read_text()
    assert client.predict("pinned", {}).json()["tabulate"] == "0.8.10"  # revision 1 still serves
    code, out, _ = daemon.cli("get", "pinned")
    assert code == 0 and "failed" in out and "tabulate==99.0.0" in out


def test_prune_refuses_a_bad_body_saying_why(daemon: Cirrus) -> None:
    url = daemon.info.admin_url.rstrip("/") + "/v1/envs/prune"
    auth = {"authorization": f"Bearer {daemon.settings.token_file.read_text().strip()}"}
    for body, status, says in [
        (b'{"dry_run": "yes"}', 400, "dry_run"),
        (b'{"all": true}', 400, "all"),
        (b"[1]", 400, "invalid prune request"),
        (b"x" * 4096, 413, "over 1024 bytes"),
    ]:
        answer = httpx.post(url, content=body, headers=auth)
        assert answer.status_code == status and says in answer.json()["error"], answer.text
    answer = httpx.post(url, headers=auth)  # no body: prune for real (nothing cached here)
    assert answer.status_code == 200 and answer.json() == {"removed": [], "freed_bytes": 0, "dry_run": False}


def _wait_unused(client: Client, key: str | None, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while any(e.key == key and e.used_by for e in client.envs()):
        assert time.monotonic() < deadline, f"environment {key} still in use"
        time.sleep(0.1)


def test_eviction_keeps_what_is_in_use(cirrus: Cirrus, tmp_path: Path) -> None:
    small = Cirrus(cirrus.home, CIRRUS_ENVS_MAX_BYTES="1")  # every environment is over the budget
    small.up()
    try:
        client = small.client()
        client.deploy(_project(tmp_path, "a", packages=["tabulate==0.8.10"]), timeout=300)
        client.deploy(_project(tmp_path, "b", packages=["tabulate==0.9.0"]), timeout=300)
        key_a = client.get("a").environment.key  # type: ignore[union-attr]
        key_b = client.get("b").environment.key  # type: ignore[union-attr]
        envs_dir = small.home / "envs"
        assert (envs_dir / key_a).is_dir() and (envs_dir / key_b).is_dir()  # both in use: both kept
        client.delete("a")
        _wait_unused(client, key_a)  # once its replicas have stopped
        client.deploy(_project(tmp_path, "c", packages=["tabulate==0.8.9"]), timeout=300)
        key_c = client.get("c").environment.key  # type: ignore[union-attr]
        assert not (envs_dir / key_a).exists()  # unused since `a` was deleted: evicted after c's build
        assert (envs_dir / key_b).is_dir() and (envs_dir / key_c).is_dir()
        assert client.predict("b", {}).json()["tabulate"] == "0.9.0"
        client.delete("b")
        _wait_unused(client, key_b)
        code, out, _ = small.cli("envs", "prune")
        assert code == 0 and f"removed {key_b}" in out and "freed" in out
        assert not (envs_dir / key_b).exists() and (envs_dir / key_c).is_dir()
    finally:
        small.shutdown()
