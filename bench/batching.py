#!/usr/bin/env python3
"""Server-side batching benchmark: sentence embeddings (all-MiniLM-L6-v2) through Cirrus.

One `cirrus serve` process serves `examples/sentence-embeddings/predictor.py` as three APIs, one
replica and one inference slot each, `torch_threads: 2`:

* ``unbatched``: no `batching`: one `predict` (one forward pass) per request;
* ``fixed``: `batching: {max_batch_size: 32, max_wait_ms: 5, mode: fixed}`;
* ``adaptive``: `batching: {max_batch_size: 32, max_wait_ms: 5}` (the default mode).

wrk drives each with 1, 8 and 32 closed-loop connections (one sentence per request). Beside them,
the physical limit: the same model in a plain process with the same thread count, encoding
batches of 1, 8 and 32 sentences back to back (sentences/s). The targets: at 32 clients the best
batched API reaches >= 80 % of the raw batch-32 figure of the same run, and at 1 client adaptive
batching's p50 is within 10 % of unbatched.

    python bench/batching.py                      # ~4 minutes
    python bench/batching.py --conns 1,8,32 --duration 15 --json /tmp/batching.json
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import procs
import report
from wrk import Wrk, add_load_args, find_wrk

ROOT = procs.ROOT
EXAMPLE = ROOT / "examples" / "sentence-embeddings"
SENTENCE = "Cirrus serves machine-learning models behind an autoscaling HTTP API."
BODY = json.dumps({"text": SENTENCE})
THREADS = 2
TARGET_OF_RAW_32 = 0.8
TARGET_P50_C1 = 1.10

MODES: dict[str, tuple[str | None, str]] = {
    "unbatched": (None, "unbatched (predict per request)"),
    "fixed": ("{max_batch_size: 32, max_wait_ms: 5, mode: fixed}", "batching: fixed, max_wait 5 ms"),
    "adaptive": ("{max_batch_size: 32, max_wait_ms: 5}", "batching: adaptive (default), max_wait 5 ms"),
}

RAW_SCRIPT = """
import json, os, sys, time
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, sys.argv[1])
from predictor import Predictor

threads, seconds, sentence = int(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
model = Predictor({"torch_threads": threads, "normalize": True, "device": "cpu"})
out = {}
for size in (1, 8, 32):
    texts = [sentence] * size
    model._encode(texts)  # warm
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        model._encode(texts)
        n += size
    out[size] = n / (time.perf_counter() - t0)
print(json.dumps(out))
"""


def raw_throughput(seconds: float) -> dict[int, float]:
    """Sentences/s of the bare model at batch sizes 1, 8 and 32, in a fresh process."""
    done = subprocess.run(
        [sys.executable, "-c", RAW_SCRIPT, str(EXAMPLE), str(THREADS), str(seconds), SENTENCE],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    if done.returncode != 0:
        raise procs.BenchError(f"the raw model run failed:\n{done.stderr[-2000:]}")
    return {int(k): v for k, v in json.loads(done.stdout.strip().splitlines()[-1]).items()}


def write_project(directory: Path, max_concurrency: int) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    shutil.copy(EXAMPLE / "predictor.py", directory / "predictor.py")
    parts = []
    for api, (batching, _) in MODES.items():
        parts.append(
            f"- name: {api}\n"
            "  kind: realtime\n"
            "  predictor:\n"
            "    path: predictor.py\n"
            "    class: Predictor\n"
            f"    config: {{torch_threads: {THREADS}, normalize: true, device: cpu}}\n"
            "    env: {HF_HUB_OFFLINE: '1', TRANSFORMERS_OFFLINE: '1', TOKENIZERS_PARALLELISM: 'false'}\n"
            f"  concurrency: {{max_concurrency: {max_concurrency}, inference_slots: 1, max_queue_length: 256}}\n"
            "  autoscaling: {min_replicas: 1, max_replicas: 1}\n" + (f"  batching: {batching}\n" if batching else "")
        )
    (directory / "cirrus.yaml").write_text("".join(parts))


def is_embedding(reply: bytes) -> bool:
    return len(json.loads(reply).get("embedding", [])) == 384


log = procs.logger("batching")


def batch_mean(metrics_text: str, api: str) -> tuple[float, float]:
    """(requests, sum of batch sizes) of an API from the gateway's /metrics (summed over revisions)."""
    values = dict.fromkeys(("count", "sum"), 0.0)
    for line in metrics_text.splitlines():
        for key in values:
            if line.startswith(f'cirrus_batch_size_{key}{{api="{api}",'):
                values[key] += float(line.split()[-1])
    return values["count"], values["sum"]


def markdown(rows: list[dict[str, Any]], raw: dict[int, float]) -> str:
    lines = [
        "| API | clients | req/s | p50 ms | p99 ms | mean batch (per request) | non-2xx / errors | server CPU % "
        "| other CPU % |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['label']} | {row['conns']} | {row['rps']:.0f} | {report.fmt_ms(row.get('p50_ms'))} "
            f"| {report.fmt_ms(row.get('p99_ms'))} | {row['batch_per_request']:.1f} "
            f"| {row['non2xx']} / {row['socket_errors']} | {row['server_cpu_pct']:.0f} | {row['other_cpu_pct']:.0f} |"
        )
    lines += ["", "| raw model, in-process, torch threads 2 | sentences/s |", "|---|---|"]
    for size, value in sorted(raw.items()):
        lines.append(f"| batch {size} | {value:.0f} |")
    return "\n".join(lines)


def targets(rows: list[dict[str, Any]], raw: dict[int, float]) -> dict[str, Any]:
    def find(name: str, conns: int) -> dict[str, Any] | None:
        return next((r for r in rows if r["name"] == name and r["conns"] == conns), None)

    out: dict[str, Any] = {}
    for name in ("adaptive", "fixed"):
        row = find(name, 32)
        if row and raw.get(32):
            value = row["rps"] / raw[32]
            out[f"{name} req/s at 32 clients / raw batch-32 sentences/s"] = report.at_least(value, TARGET_OF_RAW_32)
    adaptive, unbatched = find("adaptive", 1), find("unbatched", 1)
    if adaptive and unbatched and unbatched.get("p50_ms"):
        value = adaptive["p50_ms"] / unbatched["p50_ms"]
        out["adaptive p50 / unbatched p50 at 1 client"] = report.at_most(value, TARGET_P50_C1)
    return out


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    add_load_args(ap, [1, 8, 32], 10, 3, "per API and count")
    ap.add_argument("--raw-seconds", type=float, default=8.0, help="seconds per raw batch size (default 8)")
    ap.add_argument("--only", choices=list(MODES), action="append", help="run only these APIs (repeatable)")
    report.add_output_args(ap)
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if (binary := find_wrk()) is None:
        return 2
    names = args.only or list(MODES)
    rows: list[dict[str, Any]] = []
    log(f"raw model: batches of 1, 8, 32 for {args.raw_seconds:g} s each")
    raw = raw_throughput(args.raw_seconds)
    log("raw model: " + ", ".join(f"batch {k}: {v:.0f}/s" for k, v in raw.items()))
    with tempfile.TemporaryDirectory(prefix="cirrus-bench-batching-") as tmp, procs.sigterm_as_interrupt():
        workdir = Path(tmp)
        project = workdir / "project"
        write_project(project, max_concurrency=max(64, max(args.conns)))
        wrk = Wrk.posting(binary, workdir, BODY)
        spec = procs.cirrus_serve("cirrus-batching", "cirrus serve (sentence embeddings)", project, workdir)
        base = spec.url
        server = procs.Server(spec, args.logdir)
        try:
            server.start()
            urls = [f"{base}/{api}" for api in names]
            ready = server.wait_answers(urls, BODY, 180, ok=is_embedding, poll_s=0.2, post_timeout_s=30)
            log(f"every API answers after {ready:.1f} s")
            for name in names:
                url = f"{base}/{name}"
                for conns in args.conns:
                    if args.warmup:
                        wrk.run(url, conns, args.warmup, server.tree)
                    time.sleep(0.5)
                    count0, sum0 = batch_mean(procs.get_text(f"{base}/metrics"), name)
                    res = wrk.run(url, conns, args.duration, server.tree)
                    count1, sum1 = batch_mean(procs.get_text(f"{base}/metrics"), name)
                    res.update(
                        name=name,
                        label=MODES[name][1],
                        batch_per_request=(sum1 - sum0) / (count1 - count0) if count1 > count0 else 0.0,
                    )
                    rows.append(res)
                    log(
                        f"{name} c={conns}: {res['rps']:.0f} req/s, p50 {res['p50_ms']} ms, p99 {res['p99_ms']} ms, "
                        f"batch {res['batch_per_request']:.1f}, other CPU {res['other_cpu_pct']} %"
                    )
        finally:
            procs.stop_and_report(server, log, spec.name)
    found = targets(rows, raw)
    print(markdown(rows, raw))
    print()
    print("\n".join(report.targets_table(found)))
    if args.json:
        report.write_json(args.json, args, {"raw": raw, "runs": rows, "targets": found})
    if args.check and not report.all_met(found):
        return 1
    return 0


if __name__ == "__main__":
    procs.run_main(main)
