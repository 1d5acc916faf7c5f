#!/usr/bin/env python3
"""Per-API Python environments: what a build costs, what the cache saves, what an environment weighs.

Starts a `cirrus up` daemon on a throw-away `CIRRUS_HOME` (ports 0) and deploys, one after the other,
tiny APIs whose predictor returns the version of a package the daemon does not have:

* **baseline**: no `python:` section (the daemon's interpreter): the deploy-to-live time of any API;
* **first build, cold**: `python: {packages: [PKGS]}` with uv's cache empty (the daemon gets a fresh
  `UV_CACHE_DIR`): resolve, download, install;
* **first build, warm uv cache**: the same packages plus a harmless extra pin, so the environment's
  key differs but uv's download cache has the files (what a second environment of a machine costs);
* **cached redeploy**: another API asking exactly the first set: the environment is taken from the
  cache (`reused: true`), nothing resolved for the build, nothing installed.

For each: seconds from the deploy call to live (`Client.deploy(wait=True)`), the environment's build
time as the daemon measured it, and its size on disk (`cirrus envs list`: each inode once, so files
uv hard-linked from its cache count in full). Prints a markdown table; `--json OUT` saves the rows.
Every process is stopped on the way out (`cirrus down`), and the temporary directory removed.

    python bench/envs.py                                   # tabulate==0.9.0 (~10-30 s)
    python bench/envs.py --packages requests==2.32.3 --json /tmp/envs.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Any

import yaml

from cirrus.client import Client
from cirrus.settings import Settings

PREDICTOR = """
import sys


class Predictor:
    def __init__(self, config):
        pass

    def predict(self, payload):
        return {"prefix": sys.prefix}
"""


def _project(root: Path, name: str, packages: list[str] | None) -> Path:
    project = root / name
    project.mkdir(parents=True)
    (project / "predictor.py").write_text(textwrap.dedent(PREDICTOR))
    api: dict[str, Any] = {
        "name": name,
        "predictor": {"path": "predictor.py", "class": "Predictor"},
        "autoscaling": {"min_replicas": 1, "max_replicas": 1},
    }
    if packages:
        api["python"] = {"packages": packages}
    (project / "cirrus.yaml").write_text(yaml.safe_dump([api]))
    return project


def _deploy(client: Client, root: Path, name: str, packages: list[str] | None, what: str) -> dict[str, Any]:
    project = _project(root, name, packages)
    started = time.perf_counter()
    client.deploy(project, timeout=1800)
    live_s = time.perf_counter() - started
    client.predict(name, {}).raise_for_status()
    env = client.get(name).environment
    size = None
    if env is not None:
        size = next((e.size_bytes for e in client.envs() if e.key == env.key), None)
    return {
        "case": what,
        "live_s": round(live_s, 2),
        "build_s": None if env is None else env.build_s,
        "reused": None if env is None else env.reused,
        "size_mb": None if size is None else round(size / 2**20, 2),
        "key": None if env is None else env.key,
    }


def _table(rows: list[dict[str, Any]]) -> str:
    lines = ["| case | deploy to live (s) | build (s) | reused | env size (MB) |", "| --- | ---: | ---: | --- | ---: |"]
    for row in rows:
        build = "-" if row["build_s"] is None else f"{row['build_s']:.2f}"
        size = "-" if row["size_mb"] is None else f"{row['size_mb']:.2f}"
        reused = "-" if row["reused"] is None else ("yes" if row["reused"] else "no")
        lines.append(f"| {row['case']} | {row['live_s']:.2f} | {build} | {reused} | {size} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--packages", default="tabulate==0.9.0", help="comma-separated requirements")
    parser.add_argument("--extra", default="six==1.16.0", help="the extra pin of the warm-cache case")
    parser.add_argument("--json", type=Path, help="save the rows here")
    args = parser.parse_args()
    packages = [p.strip() for p in args.packages.split(",") if p.strip()]
    with tempfile.TemporaryDirectory(prefix="cirrus-bench-envs-") as tmp:
        root = Path(tmp)
        os.environ["UV_CACHE_DIR"] = str(root / "uv-cache")  # the daemon (and its uv) inherit it: a cold cache
        env = {**os.environ, "CIRRUS_HOME": str(root / "home"), "CIRRUS_PORT": "0", "CIRRUS_ADMIN_PORT": "0"}
        client = Client(Settings.from_env(env))
        client.up()
        try:
            rows = [
                _deploy(client, root, "baseline", None, "no environment (baseline)"),
                _deploy(client, root, "first", packages, "first build, cold uv cache"),
                _deploy(client, root, "second", [*packages, args.extra], "first build, warm uv cache"),
                _deploy(client, root, "cached", packages, "cached redeploy (same pins)"),
            ]
        finally:
            client.down(timeout=30)
            client.close()
    print(f"packages: {', '.join(packages)}; Python {sys.version.split()[0]}")
    print(_table(rows))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
