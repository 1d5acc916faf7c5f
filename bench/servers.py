#!/usr/bin/env python3
"""What the gateway costs a web app served as an API (`kind: server`), next to the app served directly
and to a predictor API doing the same nothing.

Three servers, one after the other, each driven by wrk (POST of `{"x": 1}`, every `--conns`):

* ``direct``: a no-op ASGI app on uvicorn (uvloop, httptools), one process, no Cirrus;
* ``server``: the same app as a `kind: server` API of `cirrus serve` (one replica): the gateway
  proxies each request to the replica's uvicorn over a kept-alive HTTP/1.1 connection;
* ``predictor``: a no-op predictor API of the same `cirrus serve` (one replica), through the
  gateway's own replica protocol.

Target: the proxied app keeps >= 85 % of the predictor API's throughput at the largest `--conns`
(a web app costs no more to serve than a predictor).

    python bench/servers.py                  # ~1 minute; run it on a quiet machine
    python bench/servers.py --conns 1,16,64 --json /tmp/servers.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import procs
import report
from wrk import Wrk, add_load_args, find_wrk

log = procs.logger("servers")
TARGET_KEPT = 0.85
BODY = json.dumps({"x": 1})

APP = """
async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    more = True
    while more:
        more = (await receive()).get("more_body", False)
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": b'{"ok":true}'})
"""
NOOP = """
class Predictor:
    def __init__(self, config):
        pass

    def predict(self, payload):
        return {"ok": True}
"""


def write_project(directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "app.py").write_text(APP)
    (directory / "noop.py").write_text(NOOP)
    one = "  autoscaling: {min_replicas: 1, max_replicas: 1}\n  concurrency: {max_concurrency: 256}\n"
    (directory / "cirrus.yaml").write_text(
        "- name: app\n  kind: server\n  server: {app: 'app:app'}\n"
        + one
        + "- name: noop\n  predictor: {path: noop.py}\n"
        + one
    )


def direct_spec(project: Path) -> procs.ServerSpec:
    port = procs.free_port()
    cmd = [sys.executable, "-m", "uvicorn", "app:app", "--app-dir", str(project), "--port", str(port)]
    cmd += ["--loop", "uvloop", "--http", "httptools", "--no-access-log", "--log-level", "warning"]
    return procs.ServerSpec("direct", "uvicorn, the app directly", cmd, f"http://127.0.0.1:{port}")


def drive(binary: str, workdir: Path, name: str, url: str, args: argparse.Namespace, tree: procs.Tree) -> list[dict]:
    (workdir / name).mkdir()
    runner = Wrk.posting(binary, workdir / name, BODY)
    rows = []
    for conns in args.conns:
        if args.warmup:
            runner.run(url, conns, args.warmup, tree)
        time.sleep(0.5)
        res = runner.run(url, conns, args.duration, tree)
        res.update(name=name)
        rows.append(res)
        log(f"{name} at {conns}: {res['rps']:.0f} req/s, p50 {res['p50_ms']} ms, other CPU {res['other_cpu_pct']} %")
    return rows


def markdown(rows: list[dict[str, Any]]) -> str:
    labels = {
        "direct": "the app on uvicorn, directly",
        "server": "the same app as `kind: server`, through the gateway",
        "predictor": "a no-op predictor API, through the gateway",
    }
    lines = ["| path | conns | req/s | p50 ms | p99 ms | errors | server CPU µs/req | other CPU % |"]
    lines.append("|---|---|---|---|---|---|---|---|")
    for r in rows:
        lines.append(
            f"| {labels[r['name']]} | {r['conns']} | {r['rps']:.0f} | {report.fmt_ms(r.get('p50_ms'))} "
            f"| {report.fmt_ms(r.get('p99_ms'))} | {r['non2xx'] + r['socket_errors']} "
            f"| {r.get('server_cpu_us_per_req')} | {r['other_cpu_pct']:.0f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    add_load_args(ap, [1, 16], 5, 2, "per path and connection count")
    report.add_output_args(ap)
    args = ap.parse_args(argv)
    if (binary := find_wrk()) is None:
        return 2
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="cirrus-bench-servers-") as tmp, procs.sigterm_as_interrupt():
        workdir = Path(tmp)
        project = workdir / "project"
        write_project(project)
        direct = procs.Server(direct_spec(project), args.logdir)
        try:
            direct.start()
            direct.wait_answers([direct.spec.url], BODY, 30)
            rows += drive(binary, workdir, "direct", direct.spec.url, args, direct.tree)
        finally:
            procs.stop_and_report(direct, log, "direct")
        spec = procs.cirrus_serve("cirrus-servers", "cirrus serve (servers)", project, workdir)
        served = procs.Server(spec, args.logdir)
        try:
            served.start()
            served.wait_answers([f"{spec.url}/app/", f"{spec.url}/noop"], BODY, 120)
            rows += drive(binary, workdir, "server", f"{spec.url}/app/", args, served.tree)
            rows += drive(binary, workdir, "predictor", f"{spec.url}/noop", args, served.tree)
        finally:
            procs.stop_and_report(served, log, spec.name)
    top = max(args.conns)
    by = {(r["name"], r["conns"]): r["rps"] for r in rows}
    found = {
        f"kind server / predictor API, {top} conns": report.at_least(
            by[("server", top)] / by[("predictor", top)], TARGET_KEPT
        ),
        f"kind server / the app directly, {top} conns (informative)": report.at_least(
            by[("server", top)] / by[("direct", top)], 0.0
        ),
    }
    text = markdown(rows) + "\n\n" + "\n".join(report.targets_table(found))
    versions = report.versions(["uvicorn", "httptools"], Wrk(binary, ""))
    return report.conclude(args, text, {"runs": rows}, found, versions, None, log)


if __name__ == "__main__":
    procs.run_main(main)
