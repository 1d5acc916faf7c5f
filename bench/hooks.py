#!/usr/bin/env python3
"""Async hooks benchmark: does I/O in pre/post hooks leave the inference slot free?

One `cirrus serve` process serves two APIs of the same predictor, one replica each, one inference
slot each: an async `pre_predict` that awaits 50 ms (a feature fetch), a sync `predict` that holds
the slot for 10 ms (`time.sleep(0.01)`) and an async `post_predict` that awaits 20 ms (a log write,
after the reply). The slot alone allows 100 req/s.

* ``cirrus``: `max_concurrency: 64`: requests overlap in their hooks and queue only for the slot.
* ``lambda``: `max_concurrency: 1` ("Lambda-style", one request per instance at a time): each
  request holds the replica through its pre hook and predict, ~60 ms, so ~16 req/s.

wrk drives each API with N closed-loop connections (default 32) for D seconds after a warm-up, and
the script prints a markdown table (req/s, p50/p99, errors, server CPU) and the targets: Cirrus
>= 5x the Lambda-style throughput and >= 85 % of the slot's limit.

    python bench/hooks.py                          # ~1 minute
    python bench/hooks.py --duration 20 --json /tmp/hooks.json
"""

from __future__ import annotations

import argparse
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Any

import procs
import report
from wrk import Wrk, add_load_args, find_wrk

PRE_S, PREDICT_S, POST_S = 0.05, 0.01, 0.02
SLOT_LIMIT_RPS = 1 / PREDICT_S
TARGET_OVER_LAMBDA = 5.0
TARGET_OF_LIMIT = 0.85
BODY = '{"x": 1}'

PREDICTOR = f"""
    import asyncio
    import time


    class Predictor:
        async def pre_predict(self, payload):
            await asyncio.sleep({PRE_S})  # I/O before predict: no slot held
            return payload

        def predict(self, payload):
            time.sleep({PREDICT_S})  # the model: holds the inference slot
            return {{"y": 1}}

        async def post_predict(self, response, payload):
            await asyncio.sleep({POST_S})  # I/O after the reply: no slot held
"""

APIS = {
    "cirrus": ("hooks", 64, "Cirrus (max_concurrency 64, 1 slot)"),
    "lambda": ("lambda", 1, "Lambda-style (max_concurrency 1)"),
}


def write_project(directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "predictor.py").write_text(textwrap.dedent(PREDICTOR))
    entries = []
    for api, max_concurrency, _ in APIS.values():
        entries.append(
            f"""
            - name: {api}
              kind: realtime
              predictor: {{path: predictor.py, class: Predictor}}
              concurrency: {{max_concurrency: {max_concurrency}, inference_slots: 1, max_queue_length: 256}}
              autoscaling: {{min_replicas: 1, max_replicas: 1}}
            """
        )
    (directory / "cirrus.yaml").write_text("".join(textwrap.dedent(e) for e in entries))


log = procs.logger("hooks")


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| API | conns | req/s | p50 ms | p99 ms | non-2xx / socket errors | server CPU % | other CPU % |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['label']} | {row['conns']} | {row['rps']:.1f} | {report.fmt_ms(row.get('p50_ms'))} "
            f"| {report.fmt_ms(row.get('p99_ms'))} | {row['non2xx']} / {row['socket_errors']} "
            f"| {row['server_cpu_pct']:.0f} | {row['other_cpu_pct']:.0f} |"
        )
    return "\n".join(lines)


def targets(rows: list[dict[str, Any]]) -> dict[str, Any]:
    by = {row["name"]: row for row in rows}
    out: dict[str, Any] = {}
    if "cirrus" in by and "lambda" in by and by["lambda"]["rps"]:
        value = by["cirrus"]["rps"] / by["lambda"]["rps"]
        out["Cirrus / Lambda-style req/s"] = report.at_least(value, TARGET_OVER_LAMBDA, digits=2)
    if "cirrus" in by:
        value = by["cirrus"]["rps"] / SLOT_LIMIT_RPS
        out["Cirrus req/s / slot limit (100 req/s)"] = report.at_least(value, TARGET_OF_LIMIT)
    return out


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    add_load_args(ap, 32, 15, 3, "per API")
    report.add_output_args(ap)
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if (binary := find_wrk()) is None:
        return 2
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="cirrus-bench-hooks-") as tmp, procs.sigterm_as_interrupt():
        workdir = Path(tmp)
        project = workdir / "project"
        write_project(project)
        wrk = Wrk.posting(binary, workdir, BODY)
        server = procs.Server(procs.cirrus_serve("cirrus-hooks", "cirrus serve (hooks)", project, workdir), args.logdir)
        try:
            server.start()
            ready = server.wait_answers(
                [f"{server.spec.url}/{api}" for api, _, _ in APIS.values()], BODY, 60, poll_s=0.1
            )
            log(f"both APIs answer after {ready:.2f} s")
            for name, (api, _, label) in APIS.items():
                url = f"{server.spec.url}/{api}"
                if args.warmup:
                    wrk.run(url, args.conns, args.warmup, server.tree)
                time.sleep(0.5)
                res = wrk.run(url, args.conns, args.duration, server.tree)
                res.update(name=name, label=label)
                rows.append(res)
                log(f"{label}: {res['rps']:.1f} req/s, p50 {res['p50_ms']} ms, p99 {res['p99_ms']} ms")
        finally:
            procs.stop_and_report(server, log, server.spec.name)
    found = targets(rows)
    print(markdown(rows))
    print()
    print("\n".join(report.targets_table(found)))
    if args.json:
        report.write_json(args.json, args, {"runs": rows, "targets": found})
    if args.check and not report.all_met(found):
        return 1
    return 0


if __name__ == "__main__":
    procs.run_main(main)
