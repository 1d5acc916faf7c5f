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
import contextlib
import datetime
import json
import os
import platform
import shutil
import sys
import tempfile
import textwrap
import time
import urllib.error
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import realtime as rt  # bench/realtime.py: servers, wrk, CPU accounting

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


def wait_ok(server: rt.Server, urls: list[str], timeout_s: float) -> float:
    assert server.proc is not None and server.tree is not None
    t0 = time.monotonic()
    pending = list(urls)
    last = "no answer"
    while pending and time.monotonic() - t0 < timeout_s:
        server.tree.pids()
        if server.proc.poll() is not None:
            raise rt.BenchError(f"cirrus serve exited with {server.proc.returncode}\n{server.log_tail()}")
        try:
            rt.post(pending[0], BODY)
            pending.pop(0)
            continue
        except (OSError, urllib.error.HTTPError) as exc:
            last = str(exc)
        time.sleep(0.1)
    if pending:
        raise rt.BenchError(f"{pending[0]} did not answer within {timeout_s:.0f} s ({last})\n{server.log_tail()}")
    return time.monotonic() - t0


def log(msg: str) -> None:
    print(f"[hooks] {msg}", file=sys.stderr, flush=True)


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| API | conns | req/s | p50 ms | p99 ms | non-2xx / socket errors | server CPU % | other CPU % |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['label']} | {row['conns']} | {row['rps']:.1f} | {rt.fmt_ms(row.get('p50_ms'))} "
            f"| {rt.fmt_ms(row.get('p99_ms'))} | {row['non2xx']} / {row['socket_errors']} "
            f"| {row['server_cpu_pct']:.0f} | {row['other_cpu_pct']:.0f} |"
        )
    return "\n".join(lines)


def targets(rows: list[dict[str, Any]]) -> dict[str, Any]:
    by = {row["name"]: row for row in rows}
    out: dict[str, Any] = {}
    if "cirrus" in by and "lambda" in by and by["lambda"]["rps"]:
        value = by["cirrus"]["rps"] / by["lambda"]["rps"]
        out["Cirrus / Lambda-style req/s"] = {
            "value": round(value, 2),
            "target": f">= {TARGET_OVER_LAMBDA:g}",
            "met": value >= TARGET_OVER_LAMBDA,
        }
    if "cirrus" in by:
        value = by["cirrus"]["rps"] / SLOT_LIMIT_RPS
        out["Cirrus req/s / slot limit (100 req/s)"] = {
            "value": round(value, 3),
            "target": f">= {TARGET_OF_LIMIT}",
            "met": value >= TARGET_OF_LIMIT,
        }
    return out


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--conns", type=int, default=32, help="wrk connections (default 32)")
    ap.add_argument("--duration", type=int, default=15, help="seconds per wrk run (default 15)")
    ap.add_argument("--warmup", type=int, default=3, help="warm-up seconds per API (default 3)")
    ap.add_argument("--json", type=Path, metavar="OUT", help="write the raw numbers here")
    ap.add_argument(
        "--logdir", type=Path, default=Path(tempfile.gettempdir()) / "cirrus-bench-logs", help="server output"
    )
    ap.add_argument("--check", action="store_true", help="exit 1 when a target is missed")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    wrk = shutil.which("wrk")
    if wrk is None:
        print("error: wrk is not installed; install it with `apt-get install wrk` (Debian/Ubuntu)", file=sys.stderr)
        return 2
    args.logdir.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="cirrus-bench-hooks-") as tmp, rt.sigterm_as_interrupt():
        workdir = Path(tmp)
        project = workdir / "project"
        write_project(project)
        lua = workdir / "post.lua"
        lua.write_text(
            f'wrk.method = "POST"\nwrk.body = {json.dumps(BODY)}\nwrk.headers["Content-Type"] = "application/json"\n'
        )
        home = workdir / "cirrus-home"
        home.mkdir(mode=0o700)
        port = rt.free_port()
        spec = rt.ServerSpec(
            "cirrus-hooks",
            "cirrus serve (hooks)",
            [sys.executable, "-m", "cirrus.cli", "serve", str(project), "--port", str(port)],
            f"http://127.0.0.1:{port}",
            env={"CIRRUS_HOME": str(home)},
        )
        server = rt.Server(spec, args.logdir)
        try:
            server.start()
            assert server.tree is not None
            ready = wait_ok(server, [f"{spec.url}/{api}" for api, _, _ in APIS.values()], 60)
            log(f"both APIs answer after {ready:.2f} s")
            for name, (api, _, label) in APIS.items():
                url = f"{spec.url}/{api}"
                if args.warmup:
                    rt.run_wrk(wrk, url, str(lua), args.conns, args.warmup, server.tree)
                time.sleep(0.5)
                res = rt.run_wrk(wrk, url, str(lua), args.conns, args.duration, server.tree)
                res.update(name=name, label=label)
                rows.append(res)
                log(f"{label}: {res['rps']:.1f} req/s, p50 {res['p50_ms']} ms, p99 {res['p99_ms']} ms")
        except rt.BenchError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            print("interrupted; stopping the server", file=sys.stderr)
            return 130
        finally:
            left = server.stop()
            if left:
                log(f"processes still alive after SIGKILL: {left}")
    found = targets(rows)
    print(markdown(rows))
    print()
    print("| ratio | value | target | met |\n|---|---|---|---|")
    for key, item in found.items():
        print(f"| {key} | {item['value']} | {item['target']} | {'yes' if item['met'] else 'NO'} |")
    if args.json:
        meta = {
            "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "host": platform.node(),
            "cpus": os.cpu_count(),
            "git": rt.git_describe(),
            "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        }
        args.json.write_text(json.dumps({**meta, "runs": rows, "targets": found}, indent=2) + "\n")
    if args.check and not all(item["met"] for item in found.values()):
        return 1
    return 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
    sys.exit(130)
