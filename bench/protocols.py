#!/usr/bin/env python3
"""What the standard protocols cost: the same predictors through `POST /<api>`, the Open Inference
Protocol v2 (REST and gRPC) and the OpenAI-compatible `/v1/embeddings`.

One `cirrus serve --grpc-port` process serves two APIs, one replica each:

* ``noop`` (`protocol: v2`): returns its input `x` as `y`. It is driven through the plain path
  (`POST /noop`, JSON `{"x": [4 floats]}`) and through v2 REST (`POST /v2/models/noop/infer`, one FP32
  tensor of 4) by wrk, and through v2 gRPC (`ModelInfer`, the tensor in `raw_input_contents`) by a
  Python asyncio client (grpc.aio: no tritonclient-free gRPC load generator such as ghz is installable
  here). For a like-for-like gRPC ratio the plain path is also driven by a Python asyncio HTTP client
  (aiohttp) with the same concurrency, and the same gRPC client drives a grpc.aio server that answers
  ModelInfer with a canned reply and nothing else: what any Python gRPC server costs here.
* ``minilm`` (`examples/sentence-embeddings`, `protocol: openai`, adaptive batching up to 32):
  one sentence per request at 32 clients through `POST /minilm` and through `/v1/embeddings`, beside
  the bare model encoding batches of 32 in a plain process (sentences/s).

Targets: each protocol layer keeps >= 85 % of the plain path's throughput (v2 REST vs plain with
wrk; gRPC vs plain with the Python clients; OpenAI embeddings vs plain embeddings), and OpenAI
embeddings at 32 clients reach >= 0.8x the raw batch-32 throughput.

    python bench/protocols.py                    # ~3 minutes; run it on a quiet machine
    python bench/protocols.py --duration 15 --json /tmp/protocols.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import procs
import report
from batching import EXAMPLE, SENTENCE, THREADS, raw_throughput
from wrk import Wrk, add_load_args, find_wrk

log = procs.logger("protocols")
TARGET_KEPT = 0.85  # a protocol layer keeps this share of the plain path's req/s
TARGET_OF_RAW_32 = 0.8

NOOP = """
class Predictor:
    def __init__(self, config):
        pass

    def predict(self, payload):
        return {"y": payload["x"]}
"""
PLAIN_BODY = json.dumps({"x": [1.0, 2.0, 3.0, 4.0]})
V2_BODY = json.dumps({"inputs": [{"name": "x", "shape": [4], "datatype": "FP32", "data": [1.0, 2.0, 3.0, 4.0]}]})
PLAIN_EMBED = json.dumps({"text": SENTENCE})
OPENAI_EMBED = json.dumps({"model": "minilm", "input": SENTENCE})

# A Python asyncio load generator, run as its own process: `grpc HOST:PORT` or `http URL BODY`,
# CONNS concurrent callers for SECONDS; prints {"requests", "errors", "seconds", "p50_ms", "p99_ms"}.
LOAD_SCRIPT = r"""
import asyncio, json, struct, sys, time

kind, target, conns, seconds = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
latencies, errors = [], 0


async def run(call):
    global errors
    end = time.perf_counter() + seconds

    async def caller():
        global errors
        while time.perf_counter() < end:
            t0 = time.perf_counter()
            try:
                await call()
                latencies.append(time.perf_counter() - t0)
            except Exception:
                errors += 1

    t0 = time.perf_counter()
    await asyncio.gather(*(caller() for _ in range(conns)))
    return time.perf_counter() - t0


async def grpc_load():
    import grpc
    from cirrus.protocols import grpc_service_pb2 as pb, grpc_service_pb2_grpc as pb_grpc

    request = pb.ModelInferRequest(model_name="noop")
    tensor = request.inputs.add(name="x", datatype="FP32", shape=[4])
    request.raw_input_contents.append(struct.pack("<4f", 1.0, 2.0, 3.0, 4.0))
    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        await stub.ModelInfer(request)
        return await run(lambda: stub.ModelInfer(request))


async def http_load():
    import aiohttp

    body = sys.argv[5].encode()
    connector = aiohttp.TCPConnector(limit=conns)
    async with aiohttp.ClientSession(connector=connector) as session:
        async def call():
            async with session.post(target, data=body, headers={"content-type": "application/json"}) as r:
                await r.read()
                if r.status != 200:
                    raise RuntimeError(r.status)
        await call()
        return await run(call)


elapsed = asyncio.run(grpc_load() if kind == "grpc" else http_load())
latencies.sort()
pick = lambda q: round(1e3 * latencies[min(len(latencies) - 1, int(q * len(latencies)))], 3) if latencies else None
print(json.dumps({"requests": len(latencies), "errors": errors, "seconds": elapsed,
                  "p50_ms": pick(0.5), "p99_ms": pick(0.99)}))
"""


# The floor of any Python gRPC server here: grpc.aio on uvloop answering ModelInfer with a canned
# response (no Cirrus), driven by the same client. Run as its own process: `PORT`.
ECHO_SCRIPT = r"""
import sys, grpc, uvloop
from cirrus.protocols import grpc_service_pb2 as pb, grpc_service_pb2_grpc as pb_grpc


class Echo(pb_grpc.GRPCInferenceServiceServicer):
    async def ModelInfer(self, request, context):
        reply = pb.ModelInferResponse(model_name=request.model_name)
        reply.outputs.add(name="y", datatype="FP32", shape=[4])
        reply.raw_output_contents.append(request.raw_input_contents[0])
        return reply


async def main():
    server = grpc.aio.server()
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(Echo(), server)
    server.add_insecure_port("127.0.0.1:" + sys.argv[1])
    await server.start()
    print("ready", flush=True)
    await server.wait_for_termination()


uvloop.run(main())
"""


def grpc_floor(conns: int, seconds: int, warmup: int, logdir: Path) -> dict[str, Any]:
    """The Python load generator against ECHO_SCRIPT: what grpc.aio alone costs per request."""
    port = procs.free_port()
    spec = procs.ServerSpec("grpc-echo", "grpc.aio echo", [sys.executable, "-c", ECHO_SCRIPT, str(port)], "")
    server = procs.Server(spec, logdir)
    try:
        server.start()
        deadline = time.monotonic() + 30
        while "ready" not in server.log_tail() and time.monotonic() < deadline:
            time.sleep(0.1)
        server.tree.pids()
        if warmup:
            python_load("grpc", f"127.0.0.1:{port}", conns, warmup, server.tree)
        return python_load("grpc", f"127.0.0.1:{port}", conns, seconds, server.tree)
    finally:
        procs.stop_and_report(server, log, spec.name)


def python_load(kind: str, target: str, conns: int, seconds: int, tree: procs.Tree, body: str = "") -> dict[str, Any]:
    """One run of the Python asyncio load generator; its figures in wrk's shape, with the server's CPU."""
    window = procs.CpuWindow(tree)
    done = subprocess.run(
        [sys.executable, "-c", LOAD_SCRIPT, kind, target, str(conns), str(seconds), body],
        capture_output=True,
        text=True,
        timeout=seconds + 120,
        check=False,
        cwd=procs.ROOT,
    )
    cpu = window.stop()
    if done.returncode != 0:
        raise procs.BenchError(f"the {kind} load generator failed:\n{done.stderr[-2000:]}")
    out = json.loads(done.stdout.strip().splitlines()[-1])
    requests = out["requests"]
    return {
        "rps": requests / out["seconds"],
        "p50_ms": out["p50_ms"],
        "p99_ms": out["p99_ms"],
        "requests": requests,
        "non2xx": out["errors"],
        "socket_errors": 0,
        "conns": conns,
        "server_cpu_pct": cpu.pct(cpu.tree_s),
        "server_cpu_us_per_req": round(1e6 * cpu.tree_s / requests, 1) if requests else None,
        "other_cpu_pct": cpu.pct(cpu.other_s),
    }


def write_project(directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "noop.py").write_text(NOOP)
    (directory / "predictor.py").write_text((EXAMPLE / "predictor.py").read_text())
    (directory / "cirrus.yaml").write_text(
        "- name: noop\n"
        "  predictor: {path: noop.py, class: Predictor}\n"
        "  protocol:\n"
        "    name: v2\n"
        "    inputs: [{name: x, datatype: FP32, shape: [-1]}]\n"
        "    outputs: [{name: y, datatype: FP32, shape: [-1]}]\n"
        "  concurrency: {max_concurrency: 256, max_queue_length: 1024}\n"
        "  autoscaling: {min_replicas: 1, max_replicas: 1}\n"
        "- name: minilm\n"
        "  predictor:\n"
        "    path: predictor.py\n"
        "    class: Predictor\n"
        f"    config: {{torch_threads: {THREADS}, normalize: true, device: cpu}}\n"
        "    env: {HF_HUB_OFFLINE: '1', TRANSFORMERS_OFFLINE: '1', TOKENIZERS_PARALLELISM: 'false'}\n"
        "  protocol: openai\n"
        "  batching: {max_batch_size: 32, max_wait_ms: 5}\n"
        "  concurrency: {max_concurrency: 64, inference_slots: 1, max_queue_length: 256}\n"
        "  autoscaling: {min_replicas: 1, max_replicas: 1}\n"
    )


def markdown(rows: list[dict[str, Any]], raw: dict[int, float]) -> str:
    lines = [
        "| path | load generator | clients | req/s | p50 ms | p99 ms | errors | server CPU µs/req | other CPU % |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        errors = r["non2xx"] + r["socket_errors"]
        lines.append(
            f"| {r['label']} | {r['client']} | {r['conns']} | {r['rps']:.0f} | {report.fmt_ms(r.get('p50_ms'))} "
            f"| {report.fmt_ms(r.get('p99_ms'))} | {errors} | {r.get('server_cpu_us_per_req')} "
            f"| {r['other_cpu_pct']:.0f} |"
        )
    lines += ["", f"| raw model, in-process, torch threads {THREADS} | sentences/s |", "|---|---|"]
    lines += [f"| batch {size} | {value:.0f} |" for size, value in sorted(raw.items())]
    return "\n".join(lines)


def targets(rows: list[dict[str, Any]], raw: dict[int, float]) -> dict[str, Any]:
    by = {r["name"]: r for r in rows}
    out: dict[str, Any] = {}
    pairs = [
        ("v2 REST / plain (wrk)", "v2-rest", "plain"),
        ("v2 gRPC / plain (Python asyncio clients)", "v2-grpc", "plain-py"),
        ("OpenAI /v1/embeddings / plain embeddings, 32 clients", "openai-embed", "plain-embed"),
    ]
    for label, layer, plain in pairs:
        if layer in by and plain in by and by[plain]["rps"]:
            out[label] = report.at_least(by[layer]["rps"] / by[plain]["rps"], TARGET_KEPT)
    if "openai-embed" in by and raw.get(32):
        value = by["openai-embed"]["rps"] / raw[32]
        out["OpenAI embeddings req/s at 32 clients / raw batch-32 sentences/s"] = report.at_least(
            value, TARGET_OF_RAW_32
        )
    return out


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    add_load_args(ap, 32, 10, 3, "per path")
    ap.add_argument("--raw-seconds", type=float, default=8.0, help="seconds per raw batch size (default 8)")
    report.add_output_args(ap)
    return ap.parse_args(argv)


def measure(
    binary: str, workdir: Path, base: str, grpc: str, args: argparse.Namespace, tree: procs.Tree
) -> list[dict[str, Any]]:
    """Every row of the table, one path after the other."""
    runs: list[tuple[str, str, str, Any]] = [
        ("plain", "noop: POST /noop", "wrk", (f"{base}/noop", PLAIN_BODY)),
        ("v2-rest", "noop: v2 REST infer", "wrk", (f"{base}/v2/models/noop/infer", V2_BODY)),
        ("plain-py", "noop: POST /noop", "Python asyncio (aiohttp)", ("http", f"{base}/noop", PLAIN_BODY)),
        ("v2-grpc", "noop: v2 gRPC ModelInfer", "Python asyncio (grpc.aio)", ("grpc", grpc, "")),
        ("plain-embed", "MiniLM: POST /minilm (batching)", "wrk", (f"{base}/minilm", PLAIN_EMBED)),
        ("openai-embed", "MiniLM: POST /v1/embeddings (batching)", "wrk", (f"{base}/v1/embeddings", OPENAI_EMBED)),
    ]
    rows = []
    for name, label, client, how in runs:
        if client == "wrk":
            url, body = how
            (workdir / name).mkdir()
            runner = Wrk.posting(binary, workdir / name, body)

            def once(seconds: int, runner: Wrk = runner, url: str = url) -> dict[str, Any]:
                return runner.run(url, args.conns, seconds, tree)
        else:
            kind, target, body = how

            def once(seconds: int, kind: str = kind, target: str = target, body: str = body) -> dict[str, Any]:
                return python_load(kind, target, args.conns, seconds, tree, body)

        if args.warmup:
            once(args.warmup)
        time.sleep(0.5)
        res = once(args.duration)
        res.update(name=name, label=label, client=client)
        rows.append(res)
        log(f"{label} ({client}): {res['rps']:.0f} req/s, p50 {res['p50_ms']} ms, other CPU {res['other_cpu_pct']} %")
    res = grpc_floor(args.conns, args.duration, args.warmup, args.logdir)
    floor = "grpc.aio echo server, no Cirrus (the floor)"
    res.update(name="grpc-floor", label=floor, client="Python asyncio (grpc.aio)")
    rows.insert(4, res)
    log(f"grpc.aio floor: {res['rps']:.0f} req/s, {res['server_cpu_us_per_req']} µs of server CPU per request")
    return rows


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if (binary := find_wrk()) is None:
        return 2
    log(f"raw model: batches of 1, 8, 32 for {args.raw_seconds:g} s each")
    raw = raw_throughput(args.raw_seconds)
    with tempfile.TemporaryDirectory(prefix="cirrus-bench-protocols-") as tmp, procs.sigterm_as_interrupt():
        workdir = Path(tmp)
        project = workdir / "project"
        write_project(project)
        grpc_port = procs.free_port()
        spec = procs.cirrus_serve("cirrus-protocols", "cirrus serve (protocols)", project, workdir)
        spec.cmd.extend(["--grpc-port", str(grpc_port)])
        server = procs.Server(spec, args.logdir)
        try:
            server.start()
            base = spec.url
            ready = server.wait_answers([f"{base}/noop"], PLAIN_BODY, 120)
            ready += server.wait_answers([f"{base}/minilm"], PLAIN_EMBED, 180, poll_s=0.2, post_timeout_s=30)
            log(f"both APIs answer after {ready:.1f} s")
            rows = measure(binary, workdir, base, f"127.0.0.1:{grpc_port}", args, server.tree)
        finally:
            procs.stop_and_report(server, log, spec.name)
    found = targets(rows, raw)
    text = markdown(rows, raw) + "\n\n" + "\n".join(report.targets_table(found))
    versions = report.versions(["grpc", "aiohttp"], Wrk(binary, ""))
    return report.conclude(args, text, {"raw": raw, "runs": rows}, found, versions, None, log)


if __name__ == "__main__":
    procs.run_main(main)
