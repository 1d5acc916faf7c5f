#!/usr/bin/env python3
"""Overload cost benchmark: does turning a request away with 503 cost the server less CPU than serving it?

One ``cirrus up`` daemon (throw-away ``CIRRUS_HOME``, ports 0, its processes marked as in
``procs.Daemon``) serves two APIs, one replica each:

* ``noop``: ``predict`` returns ``{"y": x}`` (``max_concurrency: 64``): every request is a 200;
* ``busy``: the same reply after ``time.sleep(--sleep)`` (1 s), with ``max_concurrency: 1`` and
  ``max_queue_length: 0``: while its one request sleeps in the replica, every other request finds
  the replica full and no room in the queue, and the gateway answers 503 with Retry-After at once.

wrk (``-t1 -cN``, closed loop, keep-alive, a POST of ``{"x": 1}``; not one of the measured processes)
drives each API after a warm-up. Around each run the script reads the CPU time of the daemon process
(gateway + controller) and of every other process of the daemon (replicas and their template) from
``/proc/PID/stat``, and the API's answers by status from the gateway's ``/metrics`` (read outside
the measured window). CPU per request is that CPU over the answers counted. For ``busy`` it is per
503: the few 200s it served (about one per ``--sleep`` seconds) are charged at ``noop``'s cost per 200
and taken off first. Before the runs the idle CPU of the same processes is measured for reference
(it is included in both cases' figures, not subtracted).

    python bench/overload_cost.py                          # ~45 s
    python bench/overload_cost.py --conns 64 --duration 20 --json /tmp/overload.json --check

It prints a markdown table (req/s, p50, answers by status, CPU us per answer: daemon, replicas,
total; CPU % of one core of the daemon, replicas, wrk and the rest of the machine) and the ratio 503
cost / 200 cost, daemon, replicas and total; ``--check`` exits 1 when the total ratio is above 1.
"""

from __future__ import annotations

import argparse
import re
import tempfile
import textwrap
import time
from collections import Counter
from pathlib import Path
from typing import Any

import procs
import report
from wrk import Wrk, add_load_args, find_wrk

BODY = '{"x": 1}'
TARGET_RATIO = 1.0  # CPU per 503 / CPU per served 200 (total) must be below this

PREDICTOR = """
    import time


    class Noop:
        def predict(self, payload):
            return {"y": payload["x"]}


    class Busy:
        def __init__(self, config):
            self.sleep_s = float(config["sleep_s"])

        def predict(self, payload):
            time.sleep(self.sleep_s)  # holds the only slot: everything else is turned away
            return {"y": payload["x"]}
"""

SPEC = """
    - name: noop
      kind: realtime
      predictor: {{path: predictor.py, class: Noop}}
      compute: {{cpu: 0.25, mem: 128Mi}}
      concurrency: {{max_concurrency: 64, inference_slots: 1}}
      autoscaling: {{min_replicas: 1, max_replicas: 1}}
    - name: busy
      kind: realtime
      predictor: {{path: predictor.py, class: Busy, config: {{sleep_s: {sleep_s}}}}}
      compute: {{cpu: 0.25, mem: 128Mi}}
      concurrency: {{max_concurrency: 1, inference_slots: 1, max_queue_length: 0, timeout_s: {timeout_s}}}
      autoscaling: {{min_replicas: 1, max_replicas: 1}}
"""

CASES = {
    "served": ("noop", "served: no-op, all 200"),
    "rejected": ("busy", "overload: slot busy, queue 0, 503s"),
}

log = procs.logger("overload_cost")


def write_project(directory: Path, sleep_s: float) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "predictor.py").write_text(textwrap.dedent(PREDICTOR))
    spec = SPEC.format(sleep_s=sleep_s, timeout_s=max(10.0, 4 * sleep_s))
    (directory / "cirrus.yaml").write_text(textwrap.dedent(spec))


_REQUESTS_RE = re.compile(r'^cirrus_requests_total\{api="([^"]*)",code="(\d+)",revision="\d*"\} ([0-9.e+]+)$', re.M)


def answered(gateway_url: str, api: str) -> Counter[int]:
    """The API's answers so far by HTTP status, from the gateway's /metrics (loopback may read it)."""
    text = procs.get_text(f"{gateway_url}/metrics")
    answers: Counter[int] = Counter()
    for name, status, n in _REQUESTS_RE.findall(text):
        if name == api:  # (summed over revisions)
            answers[int(status)] += int(float(n))
    return answers


def cpu_by_part(daemon_pid: int, before: dict[int, float], after: dict[int, float]) -> dict[str, float]:
    """CPU seconds between two `Tree.cpu()` readings: the daemon process itself and all the others."""
    daemon_s = after.get(daemon_pid, 0.0) - before.get(daemon_pid, 0.0)
    others_s = sum(c - before.get(pid, 0.0) for pid, c in after.items() if pid != daemon_pid)
    return {"daemon": daemon_s, "replicas": others_s, "total": daemon_s + others_s}


def idle_cpu(daemon_pid: int, tree: procs.Tree, seconds: float) -> dict[str, float]:
    """CPU % of one core that the daemon and its replicas use with no requests (controller ticks, health checks)."""
    before, t0 = tree.cpu(), time.monotonic()
    time.sleep(seconds)
    spent = cpu_by_part(daemon_pid, before, tree.cpu())
    elapsed = time.monotonic() - t0
    return {part: round(100 * s / elapsed, 2) for part, s in spent.items()}


def measure(
    case: str, url: str, gateway_url: str, daemon_pid: int, wrk: Wrk, tree: procs.Tree, args: argparse.Namespace
) -> dict[str, Any]:
    """Warm-up, then one measured wrk run: wrk's figures, CPU seconds by part, answers by status."""
    api, label = CASES[case]
    if args.warmup > 0:
        wrk.run(url, args.conns, args.warmup, tree)
    time.sleep(0.5)  # the warm-up's last answers are counted before the run starts
    counts0 = answered(gateway_url, api)
    cpu0, t0 = tree.cpu(), time.monotonic()
    res = wrk.run(url, args.conns, args.duration, tree)
    elapsed = time.monotonic() - t0
    cpu1 = tree.cpu()
    time.sleep(0.2)
    counts = answered(gateway_url, api)
    counts.subtract(counts0)
    spent = cpu_by_part(daemon_pid, cpu0, cpu1)
    res.update(
        case=case,
        api=api,
        label=label,
        elapsed_s=round(elapsed, 3),
        by_status={str(k): v for k, v in sorted(counts.items()) if v},
        cpu_s={part: round(s, 4) for part, s in spent.items()},
        cpu_pct={part: round(100 * s / elapsed, 1) for part, s in spent.items()},
    )
    if not tree.pids().get(daemon_pid):
        raise procs.BenchError(f"the daemon died during {case}; logs: {args.logdir}")
    return res


def per_answer(served: dict[str, Any], rejected: dict[str, Any]) -> None:
    """CPU us per 200 (served) and per 503 (rejected, its 200s charged at the served cost and taken off)."""
    n200 = served["by_status"].get("200", 0)
    if n200 == 0 or set(served["by_status"]) != {"200"}:
        raise procs.BenchError(f"the served case should answer only 200s, got {served['by_status']}")
    served["cpu_us_per_answer"] = {part: 1e6 * s / n200 for part, s in served["cpu_s"].items()}
    n503 = rejected["by_status"].get("503", 0)
    if n503 == 0:
        raise procs.BenchError(f"the overload case gave no 503s: {rejected['by_status']}; is --sleep long enough?")
    extra = sum(n for status, n in rejected["by_status"].items() if status not in ("200", "503"))
    if extra:
        log(f"overload case: {extra} answers neither 200 nor 503 ({rejected['by_status']}); left in the 503s' cost")
    ok = rejected["by_status"].get("200", 0)
    rejected["cpu_us_per_answer"] = {
        part: (1e6 * s - ok * served["cpu_us_per_answer"][part]) / n503 for part, s in rejected["cpu_s"].items()
    }


def ratios(served: dict[str, Any], rejected: dict[str, Any]) -> dict[str, Any]:
    cost200, cost503 = served["cpu_us_per_answer"], rejected["cpu_us_per_answer"]
    out: dict[str, Any] = {}
    for part in ("daemon", "replicas"):
        out[part] = {"value": round(cost503[part] / cost200[part], 3) + 0.0 if cost200[part] else None}
    out["total"] = report.at_most(cost503["total"] / cost200["total"], TARGET_RATIO, note=" (503 cheaper)")
    return out


def _us(value: float) -> str:
    """One decimal, without the "-0.0" a correction a hair too large would show."""
    return f"{round(value, 1) + 0.0:.1f}"


def markdown(runs: list[dict[str, Any]], found: dict[str, Any], idle: dict[str, float], args: Any) -> str:
    lines = [
        f"wrk -t1 -c{args.conns} -d{args.duration}s per case; CPU us per answer (the overload row: per 503, "
        "its 200s charged at the served cost); CPU % of one core",
        "",
        "| case | req/s | p50 ms | answers by status | socket errors | daemon us | replicas us | total us "
        "| daemon % | replicas % | wrk % | other % |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for run in runs:
        us, pct = run["cpu_us_per_answer"], run["cpu_pct"]
        statuses = ", ".join(f"{k}: {v}" for k, v in run["by_status"].items())
        lines.append(
            f"| {run['label']} | {run['rps']:.0f} | {report.fmt_ms(run.get('p50_ms'))} | {statuses} "
            f"| {run['socket_errors']} | {_us(us['daemon'])} | {_us(us['replicas'])} | {_us(us['total'])} "
            f"| {pct['daemon']:.0f} | {pct['replicas']:.0f} | {run['wrk_cpu_pct']:.0f} | {run['other_cpu_pct']:.0f} |"
        )
    lines += [
        "",
        f"Idle, no requests: daemon {idle['daemon']:.2f} %, replicas {idle['replicas']:.2f} % of a core "
        "(included in the figures above).",
        "",
        "| 503 cost / 200 cost | ratio |",
        "|---|---|",
    ]
    lines += [f"| {part} | {item['value']} |" for part, item in found.items()]
    total = found["total"]
    verdict = "less" if total["met"] else "NOT less"
    lines += ["", f"A 503 costs {verdict} CPU than a served 200 (total ratio {total['value']})."]
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    add_load_args(ap, 16, 15, 3, "per case", first_answer="200")
    ap.add_argument(
        "--sleep", type=float, default=1.0, help="seconds the busy API's predict holds its only slot (default 1)"
    )
    ap.add_argument("--idle", type=float, default=2.0, help="seconds of idle CPU measured first (default 2)")
    report.add_output_args(
        ap,
        report.LOGDIR / "overload_cost",
        "daemon and replica logs (default: $TMPDIR/cirrus-bench-logs/overload_cost)",
    )
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if (binary := find_wrk()) is None:
        return 2
    runs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="cirrus-bench-overload-") as tmp, procs.sigterm_as_interrupt():
        workdir = Path(tmp)
        project = workdir / "project"
        write_project(project, args.sleep)
        wrk = Wrk.posting(binary, workdir, BODY)
        daemon = procs.Daemon("overload-cost", workdir, args.logdir, log)
        try:
            daemon.start()
            assert daemon.pid is not None
            tree = procs.Tree(daemon.pid)
            daemon.client.deploy(project, wait=True, timeout=120)
            for api, _ in CASES.values():
                procs.post(f"{daemon.gateway_url}/{api}", BODY, timeout=args.ready_timeout)
            tree.pids()
            log(f"both APIs answer; {len(tree.pids())} processes")
            time.sleep(args.settle)
            idle = idle_cpu(daemon.pid, tree, args.idle)
            for case, (api, label) in CASES.items():
                res = measure(case, f"{daemon.gateway_url}/{api}", daemon.gateway_url, daemon.pid, wrk, tree, args)
                runs.append(res)
                log(
                    f"{label}: {res['rps']:.0f} req/s, {res['by_status']}, CPU s {res['cpu_s']}, "
                    f"other CPU {res['other_cpu_pct']} %"
                )
        finally:
            procs.stop_and_report(daemon, log, daemon.label)
    served, rejected = runs
    per_answer(served, rejected)
    found = ratios(served, rejected)
    print(markdown(runs, found, idle, args))
    if args.json:
        report.write_json(args.json, args, {"idle_cpu_pct": idle, "runs": runs, "ratios": found}, log=log)
    if args.check and not found["total"]["met"]:
        return 1
    return 0


if __name__ == "__main__":
    procs.run_main(main)
