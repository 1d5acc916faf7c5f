#!/usr/bin/env python3
"""Autoscaling benchmark: how fast Cirrus adds replicas under a step in load, and cold starts from zero.

Each part runs against its own local daemon (`cirrus up` with a throw-away ``CIRRUS_HOME`` and
ports 0; the URLs come from ``$CIRRUS_HOME/daemon.json``); APIs come from ``bench/projects/``.

* **reaction** (``bench/projects/sleep50``): a predictor that holds its only inference slot for
  50 ms (``time.sleep``), ``max_concurrency 4``, ``target_concurrency 1``, 1-32 replicas, no CPU
  reservation, deployed at 1 replica. A closed-loop asyncio + httpx client in this process runs 1
  client for ``--base`` s, then 32 clients for ``--step`` s. Every 0.5 s it records the
  completions and polls the admin API (``Client.get``) for replicas desired / ready. From
  ``daemon.log`` (millisecond timestamps) it takes the time from the step until desired first
  rises, until the first added replica is ready, and until ready reaches 50 % / 100 % of the
  final count. Target: first added replica ready < 5 s after the step.
* **cold** (``bench/projects/cold-noop``, ``bench/projects/cold-minilm``): examples/noop's and
  examples/sentence-embeddings' predictors with ``min_replicas 0``, ``init_replicas 0``,
  ``scale_to_zero_after_s 1``. Deployed, left idle at zero, then ``--tries`` times: one POST and
  the time to its response, ``last_cold_start_s`` from ``cirrus get``, a breakdown from
  ``daemon.log`` (request -> controller demand -> replica ready), and a wait until the API is back
  at zero. Targets: < 1 s no-op, < 2 s MiniLM.

Replicas are forked from a per-revision template when the local runtime has one; ``--no-fork``
sets ``CIRRUS_FORK_REPLICAS=0`` in the daemon's environment (it inherits ``cirrus up``'s) to
compare with fresh processes. Every process the run starts carries a marker variable in its
environment; on the way out (also on Ctrl-C / SIGTERM) the daemon is asked to stop and any
marked process left is sent SIGTERM, then SIGKILL. The daemon's and replicas' logs are copied to
``--logdir``.

    python bench/autoscale.py                          # both parts (~1 minute)
    python bench/autoscale.py --no-fork --json /tmp/autoscale-nofork.json
    python bench/autoscale.py --only cold --tries 5
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import json
import math
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import procs
import report

from cirrus.spec import load_deployments
from cirrus.types import ApiStatus, ReplicaState

ROOT = procs.ROOT
PROJECTS = ROOT / "bench" / "projects"
POLL_S = 0.5
BIN_S = 0.5

# Targets (see docs/benchmarks.md).
TARGET_CAPACITY_S = 5.0  # first added replica serving, from the step
TARGET_COLD_NOOP_S = 1.0  # first request's response, from zero replicas
TARGET_COLD_MINILM_S = 2.0
FASTAPI_MINILM_COLD_S = "~6-7"  # single-process FastAPI + MiniLM, launch to first response (docs, DESIGN.md)


@dataclass(frozen=True)
class Targets:
    first_added_replica_ready_s: float = TARGET_CAPACITY_S
    cold_noop_s: float = TARGET_COLD_NOOP_S
    cold_minilm_s: float = TARGET_COLD_MINILM_S


@dataclass(frozen=True)
class ColdApi:
    key: str
    label: str
    project: str
    name: str
    payload: dict[str, Any]
    check: Callable[[Any], bool]
    target_s: float


COLD_APIS = [
    ColdApi(
        "noop",
        "no-op (examples/noop)",
        "cold-noop",
        "cold-noop",
        {"x": 1},
        lambda body: body == {"y": 1},
        TARGET_COLD_NOOP_S,
    ),
    ColdApi(
        "minilm",
        "MiniLM (examples/sentence-embeddings)",
        "cold-minilm",
        "cold-minilm",
        {"text": "a cold start from zero replicas"},
        lambda body: isinstance(body, dict) and len(body.get("embedding", [])) == 384,
        TARGET_COLD_MINILM_S,
    ),
]


log = procs.logger("autoscale")


# daemon.log -----------------------------------------------------------------------------------

LOG_LINE = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) \S+ \S+: (.*)$")
SCALED = re.compile(r"^(\S+): (\d+) -> (\d+) replicas \((.*)\)$")
DEMAND = re.compile(r"^(\S+): a request arrived at zero replicas; scaling to (\d+)")
READY = re.compile(r"^replica (\S+) of (\S+) is ready \(pid (\d+), loaded in ([\d.]+)s\)")
TEMPLATE_READY = re.compile(r"^template of (\S+) revision (\d+) ready \(pid (\d+), imported in ([\d.]+)s\)")
TEMPLATE_FAILED = re.compile(r"^(?:could not start (?:a|the) template (?:for|of) (\S+)|replicas of (\S+) revision)")


@dataclass
class Event:
    at: float  # time.time()
    kind: str  # scaled | demand | ready | template_ready | template_failed
    api: str
    data: dict[str, Any]


def parse_daemon_log(path: Path) -> list[Event]:
    events: list[Event] = []
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return events
    for line in text.splitlines():
        m = LOG_LINE.match(line)
        if not m:
            continue
        at = datetime.datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()  # local time, like asctime
        msg = m.group(2)
        if s := SCALED.match(msg):
            events.append(Event(at, "scaled", s.group(1), {"from": int(s.group(2)), "to": int(s.group(3))}))
        elif s := DEMAND.match(msg):
            events.append(Event(at, "demand", s.group(1), {"to": int(s.group(2))}))
        elif s := READY.match(msg):
            data = {"replica": s.group(1), "pid": int(s.group(3)), "load_s": float(s.group(4))}
            events.append(Event(at, "ready", s.group(2), data))
        elif s := TEMPLATE_READY.match(msg):
            data = {"revision": int(s.group(2)), "pid": int(s.group(3)), "import_s": float(s.group(4))}
            events.append(Event(at, "template_ready", s.group(1), data))
        elif s := TEMPLATE_FAILED.match(msg):
            events.append(Event(at, "template_failed", s.group(1) or s.group(2), {"line": msg}))
    return events


def daemon_events(daemon: procs.Daemon, api: str | None = None, since: float = 0.0) -> list[Event]:
    return [e for e in parse_daemon_log(daemon.settings.daemon_log) if e.at >= since and (api is None or e.api == api)]


def replica_start_mode(daemon: procs.Daemon, api: str, replica_id: str) -> str:
    """'forked' or 'fresh', from the header the runtime writes at the top of the replica's log."""
    return start_mode(daemon.settings.logs_dir / api / f"{replica_id}.log")


def start_mode(path: Path) -> str:
    """'forked' or 'fresh' from a replica's log (its last header line), '?' without one."""
    with contextlib.suppress(OSError):
        headers = [line for line in path.read_text(errors="replace").splitlines() if line.startswith("---")]
        if headers:
            return "forked" if "forked from template" in headers[-1] else "fresh"
    return "?"


def at_zero(status: ApiStatus) -> bool:
    return status.replicas_desired == 0 and all(r.state is ReplicaState.STOPPED for r in status.replicas)


# Statistics -----------------------------------------------------------------------------------


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q / 100 * len(ordered)) - 1))]


def window(records: list[tuple[float, float, int]], start: float, end: float) -> dict[str, Any]:
    inside = [r for r in records if start <= r[0] < end]
    ok = [r[1] * 1000 for r in inside if r[2] == 200]
    p50, p99 = pct(ok, 50), pct(ok, 99)
    return {
        "seconds": round(end - start, 2),
        "requests": len(inside),
        "errors": len(inside) - len(ok),
        "rps": round(len(ok) / (end - start), 1) if end > start else None,
        "p50_ms": None if p50 is None else round(p50, 1),
        "p99_ms": None if p99 is None else round(p99, 1),
    }


def rel(at: float | None, origin: float) -> float | None:
    return None if at is None else round(at - origin, 3)


# Part 1: reaction -----------------------------------------------------------------------------


async def drive(
    daemon: procs.Daemon, name: str, base_s: float, step_s: float, clients: int
) -> tuple[float, float, float, list[tuple[float, float, int]], list[dict[str, Any]]]:
    """Closed loop: 1 client from t0, `clients` from the step; returns (t0, step, end, records, polls)."""
    url = f"{daemon.gateway_url}/{name}"
    body = json.dumps({"x": 1}).encode()
    headers = {"content-type": "application/json"}
    records: list[tuple[float, float, int]] = []  # (end time, latency s, HTTP status or -1)
    polls: list[dict[str, Any]] = []
    t0 = time.time() + 0.2
    step = t0 + base_s
    end = step + step_s
    limits = httpx.Limits(max_connections=clients + 8, max_keepalive_connections=clients + 8)

    async with httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(60.0)) as http:

        async def client(start: float) -> None:
            await asyncio.sleep(max(0.0, start - time.time()))
            while time.time() < end:
                begin = time.perf_counter()
                try:
                    status = (await http.post(url, content=body, headers=headers)).status_code
                except httpx.HTTPError:
                    status = -1
                records.append((time.time(), time.perf_counter() - begin, status))
                if status != 200:
                    await asyncio.sleep(0.05)  # do not spin on errors

        async def poller() -> None:
            while time.time() < end + POLL_S:
                try:
                    s = await asyncio.to_thread(daemon.client.get, name)
                    polls.append(
                        {
                            "at": time.time(),
                            "desired": s.replicas_desired,
                            "ready": s.replicas_ready,
                            "in_flight": s.in_flight,
                            "queued": s.queued,
                        }
                    )
                except Exception as exc:
                    log(f"admin poll failed: {exc}")
                await asyncio.sleep(POLL_S)

        tasks = [client(t0)] + [client(step) for _ in range(clients - 1)] + [poller()]
        await asyncio.gather(*tasks)
    return t0, step, end, records, polls


def run_reaction(daemon: procs.Daemon, args: argparse.Namespace) -> dict[str, Any]:
    name = "sleep50"
    project = PROJECTS / "sleep50"
    log(f"reaction: deploying {project.relative_to(ROOT)}")
    daemon.client.deploy(project, wait=True, timeout=120)
    # A few requests so that the path (gateway connection, slot thread) is warm before t0.
    with httpx.Client(timeout=10) as http:
        for _ in range(5):
            http.post(f"{daemon.gateway_url}/{name}", json={"x": 1}).raise_for_status()
    start = daemon.client.get(name)
    log(
        f"reaction: {start.replicas_ready}/{start.replicas_desired} ready; 1 client for {args.base:g} s, "
        f"then {args.clients} for {args.step:g} s"
    )
    t0, step, end, records, polls = asyncio.run(drive(daemon, name, args.base, args.step, args.clients))
    final = daemon.client.get(name)
    events = daemon_events(daemon, name, since=step)
    ups = [e for e in events if e.kind == "scaled" and e.data["to"] > e.data["from"]]
    readies = [e for e in events if e.kind == "ready" and e.at < end]
    before = [p for p in polls if p["at"] <= step]
    ready_at_step = before[-1]["ready"] if before else start.replicas_ready
    final_ready = final.replicas_ready
    # Ready count over time from daemon.log: the replicas ready at the step plus each "is ready" line after it.
    reach: dict[str, float | None] = {"50": None, "100": None}
    for share in (50, 100):
        need = max(ready_at_step + 1, math.ceil(final_ready * share / 100))
        count = ready_at_step
        for e in readies:
            count += 1
            if count >= need:
                reach[str(share)] = e.at
                break

    def ready_by(decision: Event) -> float | None:
        """When the ready count (from daemon.log) first reached this decision's target."""
        count = ready_at_step
        for e in readies:
            count += 1
            if count >= decision.data["to"] and e.at >= decision.at:
                return e.at
        return None

    first_poll_up = next((p["at"] for p in polls if p["at"] > step and p["desired"] > ready_at_step), None)
    modes: dict[str, int] = {}
    for e in readies:
        mode = replica_start_mode(daemon, name, e.data["replica"])
        modes[mode] = modes.get(mode, 0) + 1
    timeline = []
    nbins = round((end - t0) / BIN_S)
    for i in range(nbins):
        lo, hi = t0 + i * BIN_S, t0 + (i + 1) * BIN_S
        done = [r for r in records if lo <= r[0] < hi]
        seen = [p for p in polls if p["at"] < hi]
        last = seen[-1] if seen else None
        timeline.append(
            {
                "t_s": round(lo - step, 1),
                "rps": round(sum(1 for r in done if r[2] == 200) / BIN_S, 1),
                "errors": sum(1 for r in done if r[2] != 200),
                "desired": last["desired"] if last else None,
                "ready": last["ready"] if last else None,
                "in_flight": last["in_flight"] if last else None,
                "queued": last["queued"] if last else None,
            }
        )
    result = {
        "api": name,
        "clients": args.clients,
        "base_s": args.base,
        "step_s": args.step,
        "ideal_rps_after": round(args.clients / 0.05, 1),
        "replicas_at_step": ready_at_step,
        "replicas_final_ready": final_ready,
        "replicas_final_desired": final.replicas_desired,
        "desired_first_up_s": rel(ups[0].at if ups else None, step),
        "desired_first_up": f"{ups[0].data['from']} -> {ups[0].data['to']}" if ups else None,
        "desired_first_up_polled_s": rel(first_poll_up, step),
        "scale_steps": [
            {"t_s": rel(e.at, step), "from": e.data["from"], "to": e.data["to"], "ready_s": rel(ready_by(e), step)}
            for e in events
            if e.kind == "scaled" and e.at < end
        ],
        "first_added_ready_s": rel(readies[0].at if readies else None, step),
        "ready_50pct_s": rel(reach["50"], step),
        "ready_100pct_s": rel(reach["100"], step),
        "replica_load_s": [e.data["load_s"] for e in readies],
        "replica_start_modes": modes,
        "before": window(records, t0 + 1.0, step),  # the first second warms the client's connection
        "after": window(records, step, end),
        "last5": window(records, end - 5.0, end),
        "timeline": timeline,
        "autoscaler_reason": final.autoscaler,
    }
    log(
        f"reaction: desired up at +{result['desired_first_up_s']} s ({result['desired_first_up']}), first added "
        f"replica ready at +{result['first_added_ready_s']} s, all {final_ready} at +{result['ready_100pct_s']} s; "
        f"{result['last5']['rps']} req/s in the last 5 s"
    )
    return result


# Part 2: cold starts --------------------------------------------------------------------------


def wait_template(daemon: procs.Daemon, api: str, timeout: float) -> dict[str, Any] | None:
    """If the runtime started a template for the API, wait until it is ready (or failed); its record."""
    if not (daemon.settings.logs_dir / api / "templates").exists():
        return None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for e in daemon_events(daemon, api):
            if e.kind == "template_ready":
                return {"state": "ready", **e.data}
            if e.kind == "template_failed":
                return {"state": "failed", **e.data}
        time.sleep(0.2)
    return {"state": f"not ready after {timeout:g} s"}


def one_cold_start(daemon: procs.Daemon, api: ColdApi, attempt: int) -> dict[str, Any]:
    daemon.wait("at zero", at_zero, api.name, 90)
    time.sleep(0.5)
    url = f"{daemon.gateway_url}/{api.name}"
    body = json.dumps(api.payload).encode()
    with httpx.Client(timeout=120, headers={"content-type": "application/json"}) as http:  # built before the clock
        sent = time.time()
        begin = time.perf_counter()
        response = http.post(url, content=body)  # a new connection, as a client's first request
        took = time.perf_counter() - begin
        received = time.time()
    if response.status_code != 200 or not api.check(response.json()):
        raise procs.BenchError(f"{api.name}: unexpected answer {response.status_code}: {response.text[:200]}")
    status = daemon.client.get(api.name)
    events = daemon_events(daemon, api.name, since=sent - 0.01)
    demand = next((e for e in events if e.kind == "demand"), None)
    ready = next((e for e in events if e.kind == "ready"), None)
    record: dict[str, Any] = {
        "try": attempt,
        "response_s": round(took, 3),
        "last_cold_start_s": status.last_cold_start_s,
        "cold_starts": status.cold_starts,
        "to_demand_s": rel(demand.at if demand else None, sent),
        "demand_to_ready_s": round(ready.at - demand.at, 3) if demand and ready else None,
        "load_s": ready.data["load_s"] if ready else None,
        "ready_to_response_s": rel(received, ready.at) if ready else None,
        "start_mode": replica_start_mode(daemon, api.name, ready.data["replica"]) if ready else "?",
    }
    log(
        f"cold {api.key} try {attempt}: {took:.3f} s (last_cold_start_s {status.last_cold_start_s}, "
        f"replica {record['start_mode']}, load {record['load_s']} s)"
    )
    daemon.wait("back at zero", at_zero, api.name, 90)
    return record


SPLIT_CODE = """
import json, sys, time
start = time.time()
t0 = time.perf_counter()
import cirrus.replica.__main__  # what `python -m cirrus.replica` imports before it loads the predictor
from cirrus.predictor import import_predictor_file
t1 = time.perf_counter()
project, path, class_name, config, payload = sys.argv[1:6]
module = import_predictor_file(project, path)
t2 = time.perf_counter()
predictor = getattr(module, class_name)(config=json.loads(config))
t3 = time.perf_counter()
predictor.predict(json.loads(payload))
t4 = time.perf_counter()
split = {"cirrus_imports_s": t1 - t0, "module_import_s": t2 - t1, "init_s": t3 - t2, "first_predict_s": t4 - t3}
print(json.dumps({**split, "start": start, "end": time.time()}))
"""


def fresh_split(api: ColdApi, tag: str) -> dict[str, Any] | None:
    """In a fresh interpreter: interpreter start, Cirrus's replica imports, the predictor module's import
    (what a template saves), `__init__` and the first predict, each timed on its own."""
    project = PROJECTS / api.project
    predictor = load_deployments(project)[0].spec.predictor
    env = {**os.environ, **predictor.env, procs.TAG_ENV: tag}
    args = [str(project), predictor.path, predictor.class_name, json.dumps(predictor.config), json.dumps(api.payload)]
    cmd = [sys.executable, "-c", SPLIT_CODE, *args]
    begin = time.time()
    done = subprocess.run(cmd, cwd=project, env=env, capture_output=True, text=True, timeout=120, check=False)
    finish = time.time()
    if done.returncode != 0:
        log(f"cold {api.key}: the fresh-process split failed: {done.stderr[-300:]}")
        return None
    split = json.loads(done.stdout.strip().splitlines()[-1])
    start, end = split.pop("start"), split.pop("end")
    out = {"interpreter_start_s": round(start - begin, 3), **{k: round(v, 3) for k, v in split.items()}}
    out["exit_s"] = round(finish - end, 3)
    out["to_first_response_s"] = round(end - begin, 3)
    return out


def run_cold(daemon: procs.Daemon, api: ColdApi, args: argparse.Namespace) -> dict[str, Any]:
    project = PROJECTS / api.project
    log(f"cold {api.key}: deploying {project.relative_to(ROOT)} at zero replicas")
    results = daemon.client.deploy(project, wait=False)
    revision = results[0].revision
    daemon.wait("deployed at zero", lambda s: s.revision >= revision and at_zero(s), api.name, 60)
    time.sleep(args.idle)
    template = wait_template(daemon, api.name, 120)
    if template is not None:
        log(f"cold {api.key}: template {template}")
    tries = [one_cold_start(daemon, api, i + 1) for i in range(args.tries)]
    split = None if args.no_split else fresh_split(api, daemon.tag)
    if split is not None:
        log(f"cold {api.key}: fresh-process split {split}")
    times = [t["response_s"] for t in tries]
    median = statistics.median(times)
    return {
        "key": api.key,
        "label": api.label,
        "api": api.name,
        "template": template,
        "tries": tries,
        "fresh_split": split,
        "median_s": round(median, 3),
        "target_s": api.target_s,
        "met": median < api.target_s,
    }


# Output ---------------------------------------------------------------------------------------


def fmt(v: Any, unit: str = "") -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.3f}{unit}" if abs(v) < 1 else f"{v:.2f}{unit}" if abs(v) < 100 else f"{v:.0f}{unit}"
    return f"{v}{unit}"


def markdown(results: dict[str, Any]) -> str:
    lines: list[str] = [f"Replica start: {results['mode']}", ""]
    r = results.get("reaction")
    if r:
        met = r["first_added_ready_s"] is not None and r["first_added_ready_s"] < TARGET_CAPACITY_S
        modes = ", ".join(f"{n} {m}" for m, n in r["replica_start_modes"].items()) or "none"
        b, a, l5 = r["before"], r["after"], r["last5"]
        lines += [
            f"### Reaction: 1 -> {r['clients']} closed-loop clients, 50 ms predict, target_concurrency 1",
            "",
            "| measure | value |",
            "|---|---|",
            f"| replicas ready at the step / at the end (desired) | {r['replicas_at_step']} / "
            f"{r['replicas_final_ready']} ({r['replicas_final_desired']}) |",
            f"| step -> desired first increases | {fmt(r['desired_first_up_s'], ' s')} ({r['desired_first_up']}) |",
            f"| step -> first added replica ready | {fmt(r['first_added_ready_s'], ' s')} "
            f"(target < {TARGET_CAPACITY_S:g} s: {'met' if met else 'MISSED'}) |",
            f"| step -> ready >= 50 % of final | {fmt(r['ready_50pct_s'], ' s')} |",
            f"| step -> ready = final | {fmt(r['ready_100pct_s'], ' s')} |",
            "| scale decisions: s after step, from -> to (all ready at s) | "
            + ", ".join(f"{s['t_s']:+.2f}: {s['from']}->{s['to']} ({fmt(s['ready_s'])})" for s in r["scale_steps"])
            + " |",
            f"| added replicas started | {modes}; load (predictor import + init) median "
            f"{fmt(statistics.median(r['replica_load_s']) if r['replica_load_s'] else None, ' s')} |",
            "",
            "| phase | req/s | p50 ms | p99 ms | requests | errors |",
            "|---|---|---|---|---|---|",
            f"| before the step (1 client, {b['seconds']:g} s) | {fmt(b['rps'])} | {fmt(b['p50_ms'])} "
            f"| {fmt(b['p99_ms'])} | {b['requests']} | {b['errors']} |",
            f"| after the step (whole {a['seconds']:g} s) | {fmt(a['rps'])} | {fmt(a['p50_ms'])} "
            f"| {fmt(a['p99_ms'])} | {a['requests']} | {a['errors']} |",
            f"| last 5 s (ideal {r['ideal_rps_after']:g} req/s) | {fmt(l5['rps'])} | {fmt(l5['p50_ms'])} "
            f"| {fmt(l5['p99_ms'])} | {l5['requests']} | {l5['errors']} |",
            "",
            "| t from step (s) | req/s | desired | ready | in flight | queued | errors |",
            "|---|---|---|---|---|---|---|",
        ]
        for row in r["timeline"]:
            lines.append(
                f"| {row['t_s']:+.1f} | {row['rps']:.0f} | {fmt(row['desired'])} | {fmt(row['ready'])} "
                f"| {fmt(row['in_flight'])} | {fmt(row['queued'])} | {row['errors']} |"
            )
        lines.append("")
    cold = results.get("cold")
    if cold:
        ntries = max(len(c["tries"]) for c in cold)
        lines += [
            "### Cold start from zero replicas: first request -> its response",
            "",
            "| API | " + " | ".join(f"try {i + 1} s" for i in range(ntries)) + " | median s | `last_cold_start_s` "
            "(cirrus get) | replica start | target | met |",
            "|---|" + "---|" * ntries + "---|---|---|---|---|",
        ]
        for c in cold:
            cells = [fmt(t["response_s"]) for t in c["tries"]] + ["-"] * (ntries - len(c["tries"]))
            gets = ", ".join(fmt(t["last_cold_start_s"]) for t in c["tries"])
            starts = ", ".join(sorted({t["start_mode"] for t in c["tries"]}))
            lines.append(
                f"| {c['label']} | {' | '.join(cells)} | {fmt(c['median_s'])} | {gets} | {starts} "
                f"| < {c['target_s']:g} s | {'yes' if c['met'] else 'NO'} |"
            )
        lines += [
            "",
            f"For comparison (docs, DESIGN.md): a single-process FastAPI app with MiniLM takes "
            f"{FASTAPI_MINILM_COLD_S} s from launch to its first response.",
            "",
            "Where a cold start's time goes (from daemon.log, ms timestamps): request sent -> controller sees "
            "demand -> replica ready (process start + imports + predictor load) -> response.",
            "",
            "| API | try | response s | -> demand s | demand -> ready s | of which load s | ready -> response s "
            "| template |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for c in cold:
            tpl = c["template"]
            tpl_text = (
                "none"
                if tpl is None
                else f"{tpl['state']}" + (f" (imported in {tpl['import_s']:.2f} s)" if "import_s" in tpl else "")
            )
            for t in c["tries"]:
                lines.append(
                    f"| {c['key']} | {t['try']} | {fmt(t['response_s'])} | {fmt(t['to_demand_s'])} "
                    f"| {fmt(t['demand_to_ready_s'])} | {fmt(t['load_s'])} | {fmt(t['ready_to_response_s'])} "
                    f"| {tpl_text} |"
                )
        splits = [c for c in cold if c.get("fresh_split")]
        if splits:
            lines += [
                "",
                "The same predictor in a fresh interpreter outside Cirrus (what a replica started without a "
                "template pays), each stage timed (s); a forked replica skips the first three:",
                "",
                "| API | interpreter start | Cirrus replica imports | predictor module import | `__init__` "
                "| first predict | launch -> first prediction | (exit) |",
                "|---|---|---|---|---|---|---|---|",
            ]
            for c in splits:
                sp = c["fresh_split"]
                lines.append(
                    f"| {c['key']} | {fmt(sp['interpreter_start_s'])} | {fmt(sp['cirrus_imports_s'])} "
                    f"| {fmt(sp['module_import_s'])} | {fmt(sp['init_s'])} | {fmt(sp['first_predict_s'])} "
                    f"| {fmt(sp['to_first_response_s'])} | {fmt(sp['exit_s'])} |"
                )
    return "\n".join(lines)


VERSIONS_OF = ("httpx", "uvicorn", "uvloop", "torch", "sentence_transformers")


# Running --------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--only", choices=["reaction", "cold"], action="append", help="run only this part (repeatable)")
    ap.add_argument("--no-fork", action="store_true", help="CIRRUS_FORK_REPLICAS=0: every replica a fresh process")
    ap.add_argument("--clients", type=int, default=32, help="clients after the step (default 32)")
    ap.add_argument("--base", type=float, default=5.0, help="seconds of 1 client before the step (default 5)")
    ap.add_argument("--step", type=float, default=20.0, help="seconds of --clients after the step (default 20)")
    ap.add_argument("--tries", type=int, default=3, help="cold starts per API (default 3)")
    ap.add_argument(
        "--cold-api",
        choices=[a.key for a in COLD_APIS],
        action="append",
        help="cold-start only this API (repeatable; default: noop and minilm)",
    )
    ap.add_argument("--idle", type=float, default=2.0, help="seconds idle at zero after deploying (default 2)")
    ap.add_argument(
        "--no-split", action="store_true", help="skip timing a fresh process's imports / __init__ / first predict"
    )
    report.add_output_args(
        ap,
        report.LOGDIR / "autoscale",
        "daemon.log and replica logs of each part are copied to LOGDIR/PART/ (default: "
        "$TMPDIR/cirrus-bench-logs/autoscale)",
    )
    args = ap.parse_args(argv)
    if args.clients < 2 or args.tries < 1 or args.step < 6:
        ap.error("--clients must be >= 2, --tries >= 1 and --step >= 6")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    parts = args.only or ["reaction", "cold"]
    cold_apis = [a for a in COLD_APIS if not args.cold_api or a.key in args.cold_api]
    fork = not args.no_fork
    results: dict[str, Any] = {
        "mode": "fresh processes (--no-fork: CIRRUS_FORK_REPLICAS=0)"
        if args.no_fork
        else "default (forked from a template when the runtime has one)"
    }
    with tempfile.TemporaryDirectory(prefix="cirrus-autoscale-") as tmp, procs.sigterm_as_interrupt():
        for part in parts:
            daemon = procs.Daemon(part, Path(tmp), args.logdir, log, fork)
            try:
                daemon.start()
                if part == "reaction":
                    results["reaction"] = run_reaction(daemon, args)
                else:
                    results["cold"] = [run_cold(daemon, api, args) for api in cold_apis]
            finally:
                if procs.stop_and_report(daemon, log, part):
                    log(f"{part}: daemon and replicas stopped; logs in {args.logdir / part}")
    print(markdown(results))
    met = []
    if "reaction" in results:
        first = results["reaction"]["first_added_ready_s"]
        met.append(first is not None and first < TARGET_CAPACITY_S)
    met += [c["met"] for c in results.get("cold", [])]
    if args.json:
        versions = report.versions(VERSIONS_OF)
        report.write_json(args.json, args, results, versions=versions, targets=Targets(), log=log)
    if args.check and not all(met):
        return 1
    return 0


if __name__ == "__main__":
    procs.run_main(main)
