"""Per-API Python environments without a daemon: the cache key, the eviction choice (a pure function),
the installer's message, the requirements path rules, the on-disk listing and pruning of the
controller's builder, a real uv build of one small package, and Ray's runtime_env."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import pytest

from cirrus import envs
from cirrus.control.envs import EnvBuilder
from cirrus.spec import Deployment, SpecError, load_deployments
from cirrus.spec_sections import PythonEnvSpec


def _info(key: str, size: int, last_used: float, complete: bool = True) -> envs.EnvInfo:
    return envs.EnvInfo(key=key, path=Path("/nowhere") / key, complete=complete, size_bytes=size, last_used=last_used)


# --- the eviction choice --------------------------------------------------------------------------


def test_eviction_removes_least_recently_used_until_under_the_budget() -> None:
    found = [_info("old", 40, 1.0), _info("mid", 40, 2.0), _info("new", 40, 3.0)]
    assert [e.key for e in envs.choose_evictions(found, set(), 80)] == ["old"]
    assert [e.key for e in envs.choose_evictions(found, set(), 40)] == ["old", "mid"]
    assert envs.choose_evictions(found, set(), 120) == []


def test_eviction_never_removes_an_environment_in_use() -> None:
    found = [_info("old", 40, 1.0), _info("mid", 40, 2.0), _info("new", 40, 3.0)]
    assert [e.key for e in envs.choose_evictions(found, {"old"}, 80)] == ["mid"]
    # everything in use: over the budget, nothing removed
    assert envs.choose_evictions(found, {"old", "mid", "new"}, 0) == []


def test_eviction_leaves_unfinished_builds_alone() -> None:
    found = [_info("building", 500, 0.5, complete=False), _info("done", 40, 2.0)]
    assert envs.choose_evictions(found, set(), 50) == []  # the unfinished one does not count, nor go


# --- the cache key, the message, the request ------------------------------------------------------


def test_the_key_is_the_resolved_pins_python_and_host_sites() -> None:
    key = envs.env_key("b==2\na==1\n", "cpython-3.11-linux-x86_64", ["/site"])
    assert key == envs.env_key("a==1\n\nb==2\n", "cpython-3.11-linux-x86_64", ["/site"])  # order, blank lines
    assert key != envs.env_key("a==1\nb==3\n", "cpython-3.11-linux-x86_64", ["/site"])
    assert key != envs.env_key("a==1\nb==2\n", "cpython-3.12-linux-x86_64", ["/site"])
    assert key != envs.env_key("a==1\nb==2\n", "cpython-3.11-linux-x86_64", ["/other"])


def test_the_installer_message_is_the_part_naming_the_failure() -> None:
    output = (
        "Resolved nothing\nerror: No solution found when resolving dependencies:\n"
        "  cause: Because there is no version of tabulate==99.0.0 and you require tabulate==99.0.0, "
        "we can conclude that your requirements are unsatisfiable.\n"
    )
    message = envs.installer_message(output)
    assert message.startswith("No solution found when resolving dependencies: Because there is no version of")
    assert "tabulate==99.0.0" in message and "Resolved nothing" not in message
    assert len(envs.installer_message("error: " + "x" * 5000)) == envs.MAX_MESSAGE_CHARS


def test_requirements_must_lie_inside_the_project(tmp_path: Path) -> None:
    (tmp_path / "requirements.txt").write_text("-r base.txt\ntabulate==0.9.0\n")
    (tmp_path / "base.txt").write_text("six==1.16.0\n")
    request = envs.request_of(PythonEnvSpec(requirements="requirements.txt", packages=["wcwidth==0.2.13"]), tmp_path)
    assert request.input_text() == f"-r {tmp_path / 'requirements.txt'}\nwcwidth==0.2.13\n"
    assert request.requirements == "-r base.txt\ntabulate==0.9.0\n"  # (what the request's digest covers)
    resolved = envs.resolve(request, tmp_path / ".work", tmp_path / "log")  # -r base.txt: beside the file
    assert resolved == "six==1.16.0\ntabulate==0.9.0\nwcwidth==0.2.13\n"
    assert list((tmp_path / ".work").iterdir()) == []  # the request file is gone
    with pytest.raises(envs.EnvError, match="outside the project directory"):
        envs.request_of(PythonEnvSpec(requirements="../elsewhere.txt"), tmp_path / "sub")
    with pytest.raises(envs.EnvError, match="cannot be read"):
        envs.request_of(PythonEnvSpec(requirements="missing.txt"), tmp_path)


def test_the_spec_checks_the_requirements_path(tmp_path: Path) -> None:
    (tmp_path / "predictor.py").write_text("class Predictor:\n    def predict(self, payload):\n        return 1\n")
    spec = "- name: a\n  predictor: {path: predictor.py, class: Predictor}\n  python: {requirements: %s}\n"
    (tmp_path / "cirrus.yaml").write_text(spec % "../outside.txt")
    with pytest.raises(SpecError, match=r"python\.requirements: .* points outside the project directory"):
        load_deployments(tmp_path)
    (tmp_path / "cirrus.yaml").write_text(spec % "nope.txt")
    with pytest.raises(SpecError, match=r"python\.requirements: .*nope\.txt is no file"):
        load_deployments(tmp_path)
    (tmp_path / "nope.txt").write_text("six\n")
    assert load_deployments(tmp_path)[0].spec.python is not None


def test_another_python_version_is_refused_saying_why() -> None:
    ours = f"{sys.version_info.major}.{sys.version_info.minor}"
    envs.check_version(ours)
    envs.check_version(None)
    with pytest.raises(envs.EnvError, match=rf"python.version 3.99 is not the daemon's Python \({ours}\)"):
        envs.check_version("3.99")


# --- on disk: listing, pruning, the builder's index --------------------------------------------------


def _fake_env(root: Path, key: str, complete: bool = True, size: int = 1000) -> Path:
    env_dir = root / key
    (env_dir / "bin").mkdir(parents=True)
    (env_dir / "payload").write_bytes(b"x" * size)
    if complete:
        (env_dir / envs.MARKER).write_text(json.dumps({"key": key, "requirements": ["a==1"], "build_s": 1.5}))
    envs.touch(env_dir)
    return env_dir


def test_prune_removes_what_no_revision_uses_and_unfinished_builds(tmp_path: Path) -> None:
    root = tmp_path / "envs"
    _fake_env(root, "used")
    _fake_env(root, "unused")
    _fake_env(root, "halfbuilt", complete=False)
    (root / "revisions.json").write_text(json.dumps({"api/1": "used"}))
    builder = EnvBuilder(root)
    listing = {u.info.key: u for u in builder.listing()}
    assert listing["used"].used_by == ["api/1"] and listing["used"].info.complete
    assert listing["used"].info.requirements == ("a==1",) and listing["used"].info.build_s == 1.5
    assert not listing["halfbuilt"].info.complete
    assert {e.key for e in builder.prune(dry_run=True)} == {"unused", "halfbuilt"}
    assert (root / "unused").exists()
    assert {e.key for e in builder.prune()} == {"unused", "halfbuilt"}
    assert sorted(p.name for p in root.iterdir()) == ["revisions.json", "used"]


def test_evict_spares_what_is_in_use_even_over_the_budget(tmp_path: Path) -> None:
    root = tmp_path / "envs"
    for key in ("a", "b", "c"):
        _fake_env(root, key, size=64 * 1024)
    (root / "revisions.json").write_text(json.dumps({"x/1": "a"}))
    builder = EnvBuilder(root, max_bytes=1)
    assert {e.key for e in builder.evict()} == {"b", "c"}
    assert [p.name for p in root.iterdir() if p.is_dir()] == ["a"]
    builder.forget("x")  # the API is deleted: its environment is no longer in use
    assert {e.key for e in builder.evict()} == {"a"}


# --- a real build (uv, the package index) -----------------------------------------------------------


def test_a_real_environment_sees_its_own_package_and_cirrus(tmp_path: Path) -> None:
    root = tmp_path / "envs"
    root.mkdir()
    log = root / "build.log"
    request = envs.request_of(PythonEnvSpec(packages=["tabulate==0.8.10"]), tmp_path)
    resolved = envs.resolve(request, root / ".work", log)
    assert resolved == "tabulate==0.8.10\n"
    env_dir = envs.build(root, envs.env_key(resolved), resolved, log)
    assert envs.is_complete(env_dir) and (env_dir / "build.log").is_file()
    code = "import cirrus, msgspec, uvicorn, tabulate, sys; print(tabulate.__version__, sys.prefix, cirrus.__file__)"
    out = subprocess.run([str(envs.python_of(env_dir)), "-c", code], capture_output=True, text=True, check=True)
    version, prefix, cirrus_file = out.stdout.split()
    assert version == "0.8.10" and prefix == str(env_dir)
    import cirrus

    assert cirrus_file == cirrus.__file__  # the daemon's Cirrus (an editable install works too), not a copy
    assert envs.build(root, envs.env_key(resolved), resolved, log) == env_dir  # complete: nothing rebuilt
    bad = envs.request_of(PythonEnvSpec(packages=["tabulate==99.0.0"]), tmp_path)
    with pytest.raises(envs.EnvError, match=r"resolving the requirements failed: .*tabulate==99\.0\.0"):
        envs.resolve(bad, root / ".work", log)


def test_the_builder_reuses_a_complete_environment_after_a_restart(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    project = tmp_path / "project"
    project.mkdir()
    spec = {"name": "a", "predictor": {"path": "p.py", "class": "P"}, "python": {"packages": ["tabulate==0.8.10"]}}
    deployment = Deployment.model_validate({"spec": spec, "project_dir": str(project)})

    async def build_revision(builder: EnvBuilder, revision: int = 1) -> None:
        for _ in range(600):
            if builder.ready(("a", revision), deployment, lambda: str(project)):
                return
            await asyncio.sleep(0.05)
        raise AssertionError(builder.status(("a", revision)))

    first = EnvBuilder(tmp_path / "envs")
    asyncio.run(build_revision(first))
    status = first.status(("a", 1))
    assert status is not None and not status.reused and status.key is not None
    again = EnvBuilder(tmp_path / "envs")  # a restarted daemon: the index gives the revision its environment
    assert again.ready(("a", 1), deployment, lambda: str(project))
    restored = again.status(("a", 1))
    assert restored is not None and restored.reused and restored.key == status.key
    assert again.interpreter(("a", 1)) == str(envs.python_of(tmp_path / "envs" / status.key))

    # A new revision while the package index cannot be reached: the same request's last pins are used.
    monkeypatch.setenv("UV_INDEX_URL", "http://127.0.0.1:9/simple")
    monkeypatch.setenv("UV_NO_CACHE", "1")
    asyncio.run(build_revision(again, 2))
    offline = again.status(("a", 2))
    assert offline is not None and offline.reused and offline.key == status.key
    assert "using the pins this same request resolved to before" in again.log_path(("a", 2)).read_text()


# --- Ray --------------------------------------------------------------------------------------------


def test_ray_actors_get_the_environment_as_runtime_env(tmp_path: Path) -> None:
    ray = pytest.importorskip("cirrus.runtimes.ray")
    env_dir = tmp_path / "envs" / "k"
    (env_dir / "bin").mkdir(parents=True)
    (env_dir / "requirements.txt").write_text("tabulate==0.9.0\nsix==1.16.0\n")
    pins = ray.env_pins(str(env_dir / "bin" / "python"))
    assert pins == ["tabulate==0.9.0", "six==1.16.0"]
    assert ray.runtime_env(pins) == {"uv": {"packages": ["tabulate==0.9.0", "six==1.16.0"]}}
    assert ray.env_pins(None) is None


def test_the_disk_budget_is_a_setting() -> None:
    from cirrus.settings import DEFAULT_ENVS_MAX_BYTES, Settings

    assert Settings.from_env({}).envs_max_bytes == DEFAULT_ENVS_MAX_BYTES == 20 * 2**30
    settings = Settings.from_env({"CIRRUS_ENVS_MAX_BYTES": "1000"})
    assert settings.envs_max_bytes == 1000 and settings.daemon_env()["CIRRUS_ENVS_MAX_BYTES"] == "1000"
    with pytest.raises(ValueError, match="CIRRUS_ENVS_MAX_BYTES=0 must be greater than 0"):
        Settings.from_env({"CIRRUS_ENVS_MAX_BYTES": "0"})
    with pytest.raises(ValueError, match="must be an integer"):
        Settings.from_env({"CIRRUS_ENVS_MAX_BYTES": "lots"})
