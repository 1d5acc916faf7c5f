"""The new kinds in their own Python environments, and a canary of a web app: a `kind: server` ASGI app
and a command-started server, and a `kind: task` run, each importing a package only their
environment has (built by uv from the package index); a server API's canary gets its share."""

from __future__ import annotations

import textwrap
import time
from collections import Counter
from pathlib import Path

import httpx
import yaml
from conftest import Cirrus
from test_e2e_server import server_project

ASGI_APP = """
import json
import sys

import tabulate


async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    body = json.dumps({"tabulate": tabulate.__version__, "prefix": sys.prefix, "path": scope["path"]}).encode()
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": body})
"""

PLAIN_SERVER = """
import json
import os
import sys
from http.server import BaseHTTPRequestHandler, HTTPServer

import tabulate


class Handler(BaseHTTPRequestHandler):
    def do_GET(self):
        body = json.dumps({"tabulate": tabulate.__version__, "prefix": sys.prefix}).encode()
        self.send_response(200)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


HTTPServer((os.environ["CIRRUS_HOST"], int(os.environ["CIRRUS_PORT"])), Handler).serve_forever()
"""

TASK = """
import json
import sys

import tabulate


class Task:
    def __init__(self, config):
        pass

    def run(self, config):
        with open(config["out"], "w") as f:
            json.dump({"tabulate": tabulate.__version__, "prefix": sys.prefix}, f)
"""

ENV = {"packages": ["tabulate==0.8.10"]}


def _project(directory: Path, files: dict[str, str], api: dict) -> Path:
    directory.mkdir(parents=True)
    for name, source in files.items():
        (directory / name).write_text(textwrap.dedent(source))
    (directory / "cirrus.yaml").write_text(yaml.safe_dump([api], sort_keys=False))
    return directory


def test_servers_and_tasks_run_in_their_own_environment(daemon: Cirrus, tmp_path: Path) -> None:
    one = {"min_replicas": 1, "max_replicas": 1}
    client = daemon.client()
    client.deploy(
        _project(
            tmp_path / "asgi",
            {"main.py": ASGI_APP},
            {"name": "asgi", "kind": "server", "server": {"app": "main:app"}, "python": ENV, "autoscaling": one},
        ),
        timeout=300,
    )
    command = {"command": ["python", "serve.py"]}  # the environment's `python`, first on $PATH
    client.deploy(
        _project(
            tmp_path / "plain",
            {"serve.py": PLAIN_SERVER},
            {"name": "plain", "kind": "server", "server": command, "python": ENV, "autoscaling": one},
        ),
        timeout=300,
    )
    client.deploy(
        _project(
            tmp_path / "train",
            {"predictor.py": TASK},
            {"name": "train", "kind": "task", "predictor": {"path": "predictor.py", "class": "Task"}, "python": ENV},
        ),
        timeout=300,
    )
    env = client.get("asgi").environment
    assert env is not None and env.key
    prefix = str(daemon.home / "envs" / env.key)  # one environment for the three: the same pins
    for api in ("asgi", "plain"):
        answer = httpx.get(daemon.url(f"{api}/x"), timeout=30).json()
        assert answer["tabulate"] == "0.8.10" and answer["prefix"] == prefix, (api, answer)
    out = tmp_path / "ran.json"
    run = client.wait_task(client.submit_task("train", {"out": str(out)}).id, timeout=120)
    assert run.status.value == "succeeded", run
    assert yaml.safe_load(out.read_text()) == {"tabulate": "0.8.10", "prefix": prefix}
    script = (
        "import json, os, sys, tabulate; json.dump([tabulate.__version__, sys.prefix], open(os.environ['OUT'], 'w'))"
    )
    client.deploy(
        _project(
            tmp_path / "script",
            {"train.py": script},
            {
                "name": "script",
                "kind": "task",
                "task": {"command": ["python", "train.py"], "env": {"OUT": str(out)}},
                "python": ENV,
            },
        ),
        timeout=300,
    )
    run = client.wait_task(client.submit_task("script").id, timeout=120)
    assert run.status.value == "succeeded", run
    assert yaml.safe_load(out.read_text()) == ["0.8.10", prefix]


def test_a_web_apps_canary_gets_its_share(daemon: Cirrus, tmp_path: Path) -> None:
    api = {
        "name": "shop",
        "kind": "server",
        "server": {"app": "main:app", "readiness": {"path": "/healthz"}},
        "autoscaling": {"min_replicas": 1, "max_replicas": 1},
    }
    project = server_project(tmp_path / "shop", "fastapi_app", [api])
    client = daemon.client()
    client.deploy(project)
    main = project / "main.py"
    main.write_text(main.read_text().replace('"SHOP_VERSION", "1"', '"SHOP_VERSION", "2"'))
    client.deploy(project, canary=30)
    daemon.wait_for("shop", lambda s: sum(r.state == "ready" for r in s.replicas) == 2, timeout=60)
    time.sleep(0.3)
    with httpx.Client(timeout=10) as http:
        versions = Counter(http.get(daemon.url("shop/")).json()["version"] for _ in range(200))
    assert set(versions) == {"1", "2"} and 25 <= versions["2"] <= 110, versions
    client.promote("shop")
    daemon.wait_for("shop", lambda s: all(r.revision == 2 for r in s.replicas if r.state == "ready"), timeout=60)
    assert httpx.get(daemon.url("shop/"), timeout=10).json()["version"] == "2"
