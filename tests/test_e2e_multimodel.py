"""Multi-model APIs through the real daemon: models named in the path or a header, loaded through the
predictor's `load_model(path)` into an LRU of `cache_size`, and routed to the replica that holds them."""

from __future__ import annotations

from pathlib import Path

import httpx
from conftest import Cirrus, write_project

MULTI = """
import os


class Predictor:
    def __init__(self, config):
        self.load_log = config["load_log"]

    def load_model(self, path):
        with open(self.load_log, "a") as f:
            f.write(f"{os.getpid()} {os.path.basename(path)}\\n")
        with open(path) as f:
            return f.read().strip()

    def predict(self, payload, model):
        return {"model": model, "pid": os.getpid(), "payload": payload}
"""

MODELS = [{"name": name, "path": f"{name}.txt"} for name in ("a", "b", "c")]


def loads(log: Path) -> list[tuple[int, str]]:
    if not log.exists():
        return []
    return [(int(pid), file) for pid, file in (line.split() for line in log.read_text().splitlines())]


def test_multi_model_api(daemon: Cirrus, tmp_path: Path) -> None:
    sticky_log, single_log = tmp_path / "sticky-loads.txt", tmp_path / "single-loads.txt"
    project = write_project(
        tmp_path / "project",
        MULTI,
        apis=[
            {
                "name": "sticky",
                "predictor": {"config": {"load_log": str(sticky_log)}},
                "models": MODELS,
                "multi_model": {"cache_size": 2},
                "autoscaling": {"min_replicas": 2, "max_replicas": 2},
            },
            {
                "name": "single",
                "predictor": {"config": {"load_log": str(single_log)}},
                "models": MODELS,
                "multi_model": {"cache_size": 2},
            },
        ],
    )
    for name in ("a", "b", "c"):
        (project / f"{name}.txt").write_text(f"weights-{name}\n")
    client = daemon.client()
    client.deploy(project)
    daemon.wait_for("sticky", lambda s: sum(r.state == "ready" for r in s.replicas) == 2)
    http = httpx.Client(base_url=daemon.gateway_url, timeout=30)

    # The right model answers, named in the path or in the header.
    for name in ("a", "b", "c"):
        by_path = http.post(f"/single/{name}", json={"x": 1})
        assert by_path.status_code == 200, by_path.text
        assert by_path.json()["model"] == f"weights-{name}" and by_path.json()["payload"] == {"x": 1}
        by_header = client.predict("single", {"x": 2}, headers={"X-Cirrus-Model": name})
        assert by_header.status_code == 200, by_header.text
        assert by_header.json()["model"] == f"weights-{name}"
    # The path wins over the header.
    both = http.post("/single/b", json={}, headers={"X-Cirrus-Model": "a"})
    assert both.json()["model"] == "weights-b"

    # cache_size 2 on one replica: a, b, c were loaded once each (each hit by the header loaded
    # nothing; c evicted a), and the replica holds c and b (b most recent). Then a -> b -> c -> a:
    # a is loaded (evicting c), b is a hit, c is loaded again (evicting a), a again (evicting b).
    assert [file for _, file in loads(single_log)] == ["a.txt", "b.txt", "c.txt"]
    for name in ("a", "b", "c", "a"):
        assert http.post(f"/single/{name}", json={}).status_code == 200
    assert [file for _, file in loads(single_log)][3:] == ["a.txt", "c.txt", "a.txt"]

    # Two idle replicas: once one holds a model, requests for that model stick to it.
    first = http.post("/sticky/a", json={}).json()["pid"]
    pids = {http.post("/sticky/a", json={}).json()["pid"] for _ in range(8)}
    assert pids == {first}
    assert [entry for entry in loads(sticky_log) if entry[1] == "a.txt"] == [(first, "a.txt")]  # loaded once
    # A different model goes anywhere the first time, then sticks too.
    second = http.post("/sticky/b", headers={"X-Cirrus-Model": "b"}, json={}).json()["pid"]
    assert {http.post("/sticky/b", json={}).json()["pid"] for _ in range(4)} == {second}
    assert {http.post("/sticky/a", json={}).json()["pid"] for _ in range(4)} == {first}

    # Unknown model: 404 naming the models; no model named: 400.
    unknown = http.post("/sticky/nope", json={})
    assert unknown.status_code == 404, unknown.text
    assert "no model named 'nope'" in unknown.json()["error"] and unknown.json()["models"] == ["a", "b", "c"]
    missing = http.post("/sticky", json={})
    assert missing.status_code == 400, missing.text
    assert "X-Cirrus-Model" in missing.json()["error"] and missing.json()["models"] == ["a", "b", "c"]

    # The API's other paths keep working.
    assert http.get("/sticky/openapi.json").status_code == 200
    assert http.get("/sticky/docs").status_code == 200
    assert http.get("/sticky").json()["replicas_ready"] == 2
    http.close()


MISSING_LOAD_MODEL = """
class Predictor:
    def predict(self, payload):
        return payload
"""


def test_multi_model_needs_load_model(daemon: Cirrus, tmp_path: Path) -> None:
    project = write_project(
        tmp_path / "p", MISSING_LOAD_MODEL, name="noload", models=MODELS[:1], multi_model={"cache_size": 1}
    )
    (project / "a.txt").write_text("a")
    code, _, _ = daemon.cli("deploy", str(project), "--timeout", "30")
    assert code == 1
    status = daemon.client().get("noload")
    assert status.message is not None and "has no load_model method" in status.message, status.message


GET_MODEL = """
class Predictor:
    def load_model(self, path):
        with open(path) as f:
            return f.read().strip()

    def predict(self, payload, model, get_model):
        other = get_model(payload["other"], payload.get("version"))
        return {"named": model, "other": other}
"""


def test_get_model_reaches_any_model_by_name_and_version(daemon: Cirrus, tmp_path: Path) -> None:
    project = write_project(
        tmp_path / "project",
        GET_MODEL,
        name="lookup",
        models=[{"name": "a", "path": "a.txt", "version": "2024-06"}, {"name": "b", "path": "b.txt"}],
        multi_model={"cache_size": 2},
        debug_errors=True,  # the 500 names the version that is not there
    )
    (project / "a.txt").write_text("weights-a")
    (project / "b.txt").write_text("weights-b")
    daemon.client().deploy(project)
    url = daemon.url("lookup")
    answer = httpx.post(f"{url}/b", json={"other": "a", "version": "2024-06"}, timeout=30)
    assert answer.json() == {"named": "weights-b", "other": "weights-a"}
    wrong = httpx.post(f"{url}/b", json={"other": "a", "version": "1999"}, timeout=30)
    assert wrong.status_code == 500 and "1999" in wrong.json()["error"]
