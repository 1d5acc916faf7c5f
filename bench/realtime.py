#!/usr/bin/env python3
"""Realtime overhead benchmark: Cirrus's full data path against the floor of a Python stack.

In one run, one server at a time, this script launches

* ``fastapi``: a single-process FastAPI no-op on uvicorn (uvloop + httptools, one worker, no
  access log), ``bench/fastapi_noop.py``: the floor of a Python web stack;
* ``cirrus``: ``cirrus serve examples/noop`` (gateway process + one replica process) on a free port
  with a throw-away ``CIRRUS_HOME``;
* ``asgi`` (only with ``--asgi``): a bare ASGI callable on the same uvicorn, ``bench/asgi_noop.py``.

For each server it waits for the first HTTP 200 on ``POST {"x": 1}`` (cold start), lets it settle,
warms up with wrk, then runs ``wrk -t1 -cN -dDs --latency`` (closed loop, keep-alive) per
concurrency and records req/s, p50/p99, non-2xx responses, socket errors and the CPU time of the
server's whole process tree (from /proc), then stops it (SIGINT to its process group, then
SIGTERM/SIGKILL to every process of its tree). The method follows the peer harness's bench.py
(../shared/peers/ beside a checkout).

    python bench/realtime.py                                   # ~2-3 minutes
    python bench/realtime.py --conns 1,16,64 --duration 15 --warmup 5 --asgi --json /tmp/rt.json

It prints a markdown table and the ratios the project's targets are set on:
Cirrus/FastAPI throughput at 16 connections (target >= 0.6), Cirrus at 64 vs 16 connections
(no collapse), and Cirrus p50 minus FastAPI p50 at 1 connection (target <= 0.5 ms).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
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


@dataclass(frozen=True)
class Targets:
    cirrus_over_fastapi_rps_c16: float = TARGET_RATIO_C16
    cirrus_rps_c64_over_c16: float = TARGET_SCALE_64
    cirrus_minus_fastapi_p50_ms_c1: float = TARGET_P50_DELTA_MS


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
        "runs": [],
    }
    if args.warmup > 0:
        warm = wrk.run(spec.url, max(args.conns), args.warmup, server.tree)
        log(f"{spec.name}: warm-up {warm['rps']:.0f} req/s")
    for conns in args.conns:
        res = wrk.run(spec.url, conns, args.duration, server.tree)
        record["runs"].append(res)
        log(
            f"{spec.name}: c={conns}: {res['rps']:.0f} req/s, p50 {res['p50_ms']} ms, p99 {res['p99_ms']} ms, "
            f"errors {res['non2xx']}/{res['socket_errors']}, server CPU {res['server_cpu_us_per_req']} us/req, "
            f"other CPU {res['other_cpu_pct']} %"
        )
        if not server.alive():
            raise procs.BenchError(f"{spec.name} died during the run; log: {server.log_path}\n{server.log_tail()}")
    return record


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
    return out


RATIO_NAMES = {
    "cirrus_over_fastapi_rps_c16": "Cirrus / FastAPI req/s at 16 connections",
    "cirrus_rps_c64_over_c16": "Cirrus req/s at 64 / at 16 connections",
    "cirrus_minus_fastapi_p50_ms_c1": "Cirrus p50 - FastAPI p50 at 1 connection (ms)",
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
        choices=["fastapi", "cirrus", "asgi"],
        action="append",
        help="run only these servers (repeatable); default: fastapi and cirrus (and asgi with --asgi)",
    )
    ap.add_argument("--example", type=Path, default=ROOT / "examples" / "noop", help="the Cirrus no-op API")
    report.add_output_args(
        ap,
        report.LOGDIR,
        "servers' stdout/stderr go to LOGDIR/NAME.log (default: $TMPDIR/cirrus-bench-logs)",
    )
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if (binary := find_wrk()) is None:
        return 2
    names = args.only or ["fastapi", "cirrus", *(["asgi"] if args.asgi else [])]
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="cirrus-bench-") as tmp, procs.sigterm_as_interrupt():
        workdir = Path(tmp)
        wrk = Wrk.posting(binary, workdir, BODY)
        specs = {
            "fastapi": lambda: uvicorn_spec("fastapi", "FastAPI + uvicorn", "fastapi_noop:app"),
            "cirrus": lambda: procs.cirrus_serve(
                "cirrus", "Cirrus (`cirrus serve`, gateway + replica)", args.example, workdir, path="/noop"
            ),
            "asgi": lambda: uvicorn_spec("asgi", "bare ASGI + uvicorn", "asgi_noop:app"),
        }
        for name in names:
            server = procs.Server(specs[name](), args.logdir)
            try:
                results.append(bench_server(server, wrk, args))
            finally:
                if procs.stop_and_report(server, log, name):
                    log(f"{name}: stopped ({len(server.tree.known)} processes)")
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
