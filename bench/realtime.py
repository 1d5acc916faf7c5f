#!/usr/bin/env python3
"""Realtime overhead benchmark: Cirrus's full data path against the floor of a Python stack.

In one run, one server at a time, this script launches

* ``fastapi``: a single-process FastAPI no-op on uvicorn (uvloop + httptools, one worker, no
  access log), ``bench/fastapi_noop.py``: the floor of a Python web stack;
* ``cirrus``: ``cirrus serve examples/noop`` (gateway process + one replica process) on a free port
  with a throw-away ``CIRRUS_HOME``;
* ``asgi`` (only with ``--asgi``): a bare ASGI callable on the same uvicorn, ``bench/asgi_noop.py``;
* ``cirrus-keys`` (only with ``--keys``): a ``cirrus up --require-keys`` daemon (throw-away
  ``CIRRUS_HOME``) serving the same API, every request carrying a valid ``X-API-Key`` that the
  gateway checks; before the runs it checks that a request without the key gets 401.

For each server it waits for the first HTTP 200 on ``POST {"x": 1}`` (cold start), lets it settle,
warms up with wrk, then runs ``wrk -t1 -cN -dDs --latency`` (closed loop, keep-alive) per
concurrency and records req/s, p50/p99, non-2xx responses, socket errors and the CPU time of the
server's whole process tree (from /proc), then stops it (SIGINT to its process group, then
SIGTERM/SIGKILL to every process of its tree). The method follows the peer harness's bench.py
(../shared/peers/ beside a checkout).

    python bench/realtime.py                                   # ~2-3 minutes
    python bench/realtime.py --conns 1,16,64 --duration 15 --warmup 5 --asgi --json /tmp/rt.json
    python bench/realtime.py --only cirrus --access-log   # the same API with `access_log: true`

It prints a markdown table and the ratios the project's targets are set on:
Cirrus/FastAPI throughput at 16 connections (target >= 0.6), Cirrus at 64 vs 16 connections
(no collapse), Cirrus p50 minus FastAPI p50 at 1 connection (target <= 0.5 ms) and, with ``--keys``,
Cirrus with a key required vs without, req/s at 16 and at 64 connections (target >= 0.95).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import procs
import report
from wrk import Wrk, add_load_args, find_wrk

ROOT = procs.ROOT
BENCH = ROOT / "bench"
BODY = '{"x": 1}'

# Targets (see docs/benchmarks.md).
TARGET_RATIO_C16 = 0.6  # Cirrus req/s >= 60 % of FastAPI's at 16 connections
TARGET_SCALE_64 = 0.9  # Cirrus req/s at 64 connections >= 90 % of its req/s at 16 ("no collapse")
TARGET_P50_DELTA_MS = 0.5  # Cirrus p50 - FastAPI p50 at 1 connection
TARGET_KEYS = 0.95  # Cirrus req/s with an API key required >= 95 % of without, at 16 and at 64 connections


@dataclass(frozen=True)
class Targets:
    cirrus_over_fastapi_rps_c16: float = TARGET_RATIO_C16
    cirrus_rps_c64_over_c16: float = TARGET_SCALE_64
    cirrus_minus_fastapi_p50_ms_c1: float = TARGET_P50_DELTA_MS
    keys_over_nokeys_rps_c16: float = TARGET_KEYS
    keys_over_nokeys_rps_c64: float = TARGET_KEYS


log = procs.logger("realtime")


def uvicorn_spec(name: str, label: str, app: str) -> procs.ServerSpec:
    port = procs.free_port()
    cmd = [
        sys.executable,
        "-m",
        "uvicorn",
        app,
        "--app-dir",
        str(BENCH),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--loop",
        "uvloop",
        "--http",
        "httptools",
        "--workers",
        "1",
        "--no-access-log",
        "--log-level",
        "warning",
    ]
    return procs.ServerSpec(name, label, cmd, f"http://127.0.0.1:{port}/predict")


# Running -------------------------------------------------------------------------------------


def is_noop_reply(reply: bytes) -> bool:
    return bool(json.loads(reply) == {"y": 1})


def bench_server(server: procs.Server, wrk: Wrk, args: argparse.Namespace) -> dict[str, Any]:
    spec = server.spec
    log(f"{spec.name}: starting: {' '.join(spec.cmd)}")
    server.start()
    cold = server.wait_answers([spec.url], BODY, args.ready_timeout, ok=is_noop_reply)
    log(f"{spec.name}: first 200 after {cold:.2f} s; {len(server.tree.pids())} processes")
    time.sleep(args.settle)
    record: dict[str, Any] = {
        "name": spec.name,
        "label": spec.label,
        "cmd": spec.cmd,
        "url": spec.url,
        "cold_start_s": round(cold, 3),
    }

    def died() -> str | None:
        return None if server.alive() else f"log: {server.log_path}\n{server.log_tail()}"

    record["runs"] = load_runs(spec.name, spec.url, wrk, server.tree, args, died)
    return record


def load_runs(
    name: str, url: str, wrk: Wrk, tree: procs.Tree, args: argparse.Namespace, died: Callable[[], str | None]
) -> list[dict[str, Any]]:
    """The warm-up, then one wrk run per --conns; `died()` says why the server is gone (None: alive)."""
    if args.warmup > 0:
        warm = wrk.run(url, max(args.conns), args.warmup, tree)
        log(f"{name}: warm-up {warm['rps']:.0f} req/s")
    runs = []
    for conns in args.conns:
        res = wrk.run(url, conns, args.duration, tree)
        runs.append(res)
        log(
            f"{name}: c={conns}: {res['rps']:.0f} req/s, p50 {res['p50_ms']} ms, p99 {res['p99_ms']} ms, "
            f"errors {res['non2xx']}/{res['socket_errors']}, server CPU {res['server_cpu_us_per_req']} us/req, "
            f"other CPU {res['other_cpu_pct']} %"
        )
        if (why := died()) is not None:
            raise procs.BenchError(f"{name} died during the run; {why}")
    return runs


# Cirrus with API keys: a `cirrus up --require-keys` daemon -----------------------------------


class TaggedTree(procs.Tree):
    """The processes of a `procs.Daemon` (daemon, templates, replicas), found by its marker variable."""

    def __init__(self, tag: str) -> None:
        super().__init__(0)
        self.tag = tag

    def pids(self) -> dict[int, procs.ProcStat]:
        out = procs.stats_of(procs.tagged_pids(self.tag))
        self.known.update(out)
        return out


def cirrus_cli(daemon: procs.Daemon, *argv: str, timeout: float = 180) -> str:
    """`python -m cirrus.cli ARGV` in the daemon's environment; its stdout, BenchError when it fails."""
    cmd = [sys.executable, "-m", "cirrus.cli", *argv]
    done = subprocess.run(cmd, cwd=ROOT, env=daemon.env, capture_output=True, text=True, timeout=timeout, check=False)
    if done.returncode != 0:
        raise procs.BenchError(f"`cirrus {' '.join(argv)}` failed ({done.returncode}):\n{done.stdout}{done.stderr}")
    return done.stdout


def status_of(url: str, headers: dict[str, str], timeout: float = 5.0) -> tuple[int, bytes]:
    """POST BODY with these extra headers: the HTTP status and the reply (also for 4xx/5xx)."""
    request = urllib.request.Request(url, data=BODY.encode(), headers={"Content-Type": "application/json", **headers})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return int(response.status), bytes(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def wait_keyed(daemon: procs.Daemon, url: str, key: str, timeout_s: float) -> None:
    """Poll with the key until a no-op reply (200); then check that a request without the key gets 401."""
    deadline = time.monotonic() + timeout_s
    last = "no answer"
    while True:
        try:
            code, reply = status_of(url, {"X-API-Key": key})
            if code == 200 and is_noop_reply(reply):
                break
            last = f"HTTP {code} {reply[:80]!r}"
        except (OSError, ValueError) as exc:
            last = str(exc)
        if time.monotonic() > deadline:
            raise procs.BenchError(f"{url} did not answer 200 with the key within {timeout_s:.0f} s ({last})")
        time.sleep(0.05)
    code, reply = status_of(url, {})
    log(f"{daemon.label}: without a key: HTTP {code} {reply[:80]!r}; with the key: HTTP 200")
    if code != 401:
        raise procs.BenchError(f"{daemon.label}: a request without a key got HTTP {code}, not 401: keys not checked")


def keyed_wrk(wrk: Wrk, workdir: Path, key: str) -> Wrk:
    """The same POST script as `wrk`'s, plus an ``X-API-Key`` header on every request."""
    directory = workdir / "keyed"
    directory.mkdir(exist_ok=True)
    keyed = Wrk.posting(wrk.binary, directory, BODY)
    with open(keyed.lua, "a") as handle:
        handle.write(f'wrk.headers["X-API-Key"] = {json.dumps(key)}\n')
    return keyed


def bench_keys(daemon: procs.Daemon, wrk: Wrk, workdir: Path, args: argparse.Namespace) -> dict[str, Any]:
    """`cirrus up --require-keys`, deploy --example, `cirrus keys create`, check 401 without it, then wrk."""
    name = daemon.label
    up = ["up", "--port", str(procs.free_port()), "--admin-port", "0", "--require-keys", "--timeout", "60"]
    log(f"{name}: starting: cirrus {' '.join(up)} (CIRRUS_HOME={daemon.home})")
    t0 = time.monotonic()
    cirrus_cli(daemon, *up, timeout=90)
    info = json.loads(daemon.settings.daemon_file.read_text())
    daemon.gateway_url, daemon.pid = info["gateway_url"], info["pid"]
    cirrus_cli(daemon, "deploy", str(args.example), "--timeout", str(args.ready_timeout))
    key = cirrus_cli(daemon, "keys", "create", "--name", "bench").strip()
    url = f"{daemon.gateway_url}/noop"
    wait_keyed(daemon, url, key, args.ready_timeout)
    cold = time.monotonic() - t0
    tree = TaggedTree(daemon.tag)
    log(f"{name}: first 200 with the key {cold:.2f} s after `up`; {len(tree.pids())} processes")
    time.sleep(args.settle)
    record: dict[str, Any] = {
        "name": name,
        "label": "Cirrus, API key required (`cirrus up --require-keys`, daemon + replica)",
        "cmd": [sys.executable, "-m", "cirrus.cli", *up],
        "url": url,
        "cold_start_s": round(cold, 3),
        "no_key_status": 401,
    }

    def died() -> str | None:
        alive = daemon.pid in tree.pids()
        return None if alive else f"daemon.log: {daemon.settings.daemon_log}"

    record["runs"] = load_runs(name, url, keyed_wrk(wrk, workdir, key), tree, args, died)
    return record


def stop_keys(daemon: procs.Daemon) -> bool:
    """`cirrus down`, then every marked process left (`procs.Daemon.stop`); True when none is left."""
    with contextlib.suppress(procs.BenchError, OSError, subprocess.SubprocessError):
        cirrus_cli(daemon, "down", timeout=60)
    return procs.stop_and_report(daemon, log, daemon.label)


def find(results: list[dict[str, Any]], name: str, conns: int) -> dict[str, Any] | None:
    for rec in results:
        if rec["name"] == name:
            for run in rec["runs"]:
                if run["conns"] == conns:
                    return dict(run)
    return None


def ratios(results: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    c16, f16 = find(results, "cirrus", 16), find(results, "fastapi", 16)
    if c16 and f16 and f16["rps"]:
        out["cirrus_over_fastapi_rps_c16"] = report.at_least(c16["rps"] / f16["rps"], TARGET_RATIO_C16)
    c64 = find(results, "cirrus", 64)
    if c16 and c64 and c16["rps"]:
        value = c64["rps"] / c16["rps"]
        out["cirrus_rps_c64_over_c16"] = report.at_least(value, TARGET_SCALE_64, note=" (no collapse)")
    c1, f1 = find(results, "cirrus", 1), find(results, "fastapi", 1)
    if c1 and f1:
        value = c1["p50_ms"] - f1["p50_ms"]
        out["cirrus_minus_fastapi_p50_ms_c1"] = report.at_most(value, TARGET_P50_DELTA_MS, note=" ms")
    for conns in (16, 64):
        keyed, plain = find(results, "cirrus-keys", conns), find(results, "cirrus", conns)
        if keyed and plain and plain["rps"]:
            out[f"keys_over_nokeys_rps_c{conns}"] = report.at_least(keyed["rps"] / plain["rps"], TARGET_KEYS)
    return out


RATIO_NAMES = {
    "cirrus_over_fastapi_rps_c16": "Cirrus / FastAPI req/s at 16 connections",
    "cirrus_rps_c64_over_c16": "Cirrus req/s at 64 / at 16 connections",
    "cirrus_minus_fastapi_p50_ms_c1": "Cirrus p50 - FastAPI p50 at 1 connection (ms)",
    "keys_over_nokeys_rps_c16": "Cirrus keys / no keys req/s at 16 connections",
    "keys_over_nokeys_rps_c64": "Cirrus keys / no keys req/s at 64 connections",
}


def markdown(results: list[dict[str, Any]], found: dict[str, Any]) -> str:
    fmt_ms = report.fmt_ms
    lines = [
        "| server | conns | req/s | p50 ms | p99 ms | non-2xx / socket errors | server CPU us/req | server CPU % "
        "| wrk CPU % | other CPU % | cold start s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for rec in results:
        for run in rec["runs"]:
            lines.append(
                f"| {rec['label']} | {run['conns']} | {run['rps']:.0f} | {fmt_ms(run.get('p50_ms'))} "
                f"| {fmt_ms(run.get('p99_ms'))} | {run['non2xx']} / {run['socket_errors']} "
                f"| {run['server_cpu_us_per_req']} | {run['server_cpu_pct']:.0f} | {run['wrk_cpu_pct']:.0f} "
                f"| {run['other_cpu_pct']:.0f} | {rec['cold_start_s']:.2f} |"
            )
    for rec in results:
        if "no_key_status" in rec:
            lines += ["", f"{rec['label']}: a request without the key got HTTP {rec['no_key_status']}."]
    if found:
        lines += ["", *report.targets_table(found, RATIO_NAMES)]
    return "\n".join(lines)


VERSIONS_OF = ("uvicorn", "fastapi", "starlette", "uvloop", "httptools", "pydantic")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    add_load_args(ap, [1, 16, 64], 15, 5, "at the highest --conns", first_answer="200")
    ap.add_argument("--asgi", action="store_true", help="also run a bare ASGI callable on uvicorn, for reference")
    ap.add_argument(
        "--only",
        choices=["fastapi", "cirrus", "cirrus-keys", "asgi"],
        action="append",
        help="run only these servers (repeatable); default: fastapi and cirrus (and asgi with --asgi)",
    )
    ap.add_argument(
        "--keys",
        action="store_true",
        help="also run cirrus-keys (a `cirrus up --require-keys` daemon, every request with a valid X-API-Key), "
        "right after cirrus",
    )
    ap.add_argument("--example", type=Path, default=ROOT / "examples" / "noop", help="the Cirrus no-op API")
    ap.add_argument(
        "--access-log",
        action="store_true",
        help="serve the example with `access_log: true` (a JSON line per request to $CIRRUS_HOME/logs/access.log)",
    )
    report.add_output_args(
        ap,
        report.LOGDIR,
        "servers' stdout/stderr go to LOGDIR/NAME.log (default: $TMPDIR/cirrus-bench-logs)",
    )
    return ap.parse_args(argv)


def server_names(args: argparse.Namespace) -> list[str]:
    """--only's servers, or the default set; with --keys, cirrus-keys right after cirrus."""
    names = list(args.only or ["fastapi", "cirrus", *(["asgi"] if args.asgi else [])])
    if args.keys and "cirrus-keys" not in names:
        names.insert(names.index("cirrus") + 1 if "cirrus" in names else len(names), "cirrus-keys")
    return list(dict.fromkeys(names))


def run_one(name: str, wrk: Wrk, workdir: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Start one server, measure it, and stop everything it started (also on errors and Ctrl-C)."""
    if name == "cirrus-keys":
        daemon = procs.Daemon(name, workdir, args.logdir, log)
        try:
            return bench_keys(daemon, wrk, workdir, args)
        finally:
            if stop_keys(daemon):
                log(f"{name}: stopped; logs in {args.logdir / name}")
    specs = {
        "fastapi": lambda: uvicorn_spec("fastapi", "FastAPI + uvicorn", "fastapi_noop:app"),
        "cirrus": lambda: procs.cirrus_serve(
            "cirrus",
            "Cirrus (`cirrus serve`, gateway + replica)" + (", access log on" if args.access_log else ""),
            with_access_log(args.example, workdir) if args.access_log else args.example,
            workdir,
            path="/noop",
        ),
        "asgi": lambda: uvicorn_spec("asgi", "bare ASGI + uvicorn", "asgi_noop:app"),
    }
    server = procs.Server(specs[name](), args.logdir)
    try:
        return bench_server(server, wrk, args)
    finally:
        if procs.stop_and_report(server, log, name):
            log(f"{name}: stopped ({len(server.tree.known)} processes)")


def with_access_log(example: Path, workdir: Path) -> Path:
    """A copy of the example project whose APIs say `access_log: true`."""
    import shutil

    import yaml

    copy = workdir / "example-access-log"
    shutil.copytree(example, copy, dirs_exist_ok=True)
    spec = copy / "cirrus.yaml"
    apis = yaml.safe_load(spec.read_text())
    for api in apis if isinstance(apis, list) else [apis]:
        api["access_log"] = True
    spec.write_text(yaml.safe_dump(apis, sort_keys=False))
    return copy


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if (binary := find_wrk()) is None:
        return 2
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="cirrus-bench-") as tmp, procs.sigterm_as_interrupt():
        workdir = Path(tmp)
        wrk = Wrk.posting(binary, workdir, BODY)
        for name in server_names(args):
            results.append(run_one(name, wrk, workdir, args))
    found = ratios(results)
    print(markdown(results, found))
    if args.json:
        versions = report.versions(VERSIONS_OF, wrk)
        results_json = {"servers": results, "ratios": found}
        report.write_json(args.json, args, results_json, versions=versions, targets=Targets(), log=log)
    if args.check and not report.all_met(found):
        return 1
    return 0


if __name__ == "__main__":
    procs.run_main(main)
