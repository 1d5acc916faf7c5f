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
SIGTERM/SIGKILL to every process of its tree). The method follows /work/shared/peers/bench.py.

    python bench/realtime.py                                   # ~2-3 minutes
    python bench/realtime.py --conns 1,16,64 --duration 15 --warmup 5 --asgi --json /tmp/rt.json

It prints a markdown table and the ratios the project's targets are set on:
Cirrus/FastAPI throughput at 16 connections (target >= 0.6), Cirrus at 64 vs 16 connections
(no collapse), and Cirrus p50 minus FastAPI p50 at 1 connection (target <= 0.5 ms).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
BODY = '{"x": 1}'
TCK = os.sysconf("SC_CLK_TCK")

# Targets (see docs/benchmarks.md).
TARGET_RATIO_C16 = 0.6  # Cirrus req/s >= 60 % of FastAPI's at 16 connections
TARGET_SCALE_64 = 0.9  # Cirrus req/s at 64 connections >= 90 % of its req/s at 16 ("no collapse")
TARGET_P50_DELTA_MS = 0.5  # Cirrus p50 - FastAPI p50 at 1 connection


@dataclass(frozen=True)
class Targets:
    cirrus_over_fastapi_rps_c16: float = TARGET_RATIO_C16
    cirrus_rps_c64_over_c16: float = TARGET_SCALE_64
    cirrus_minus_fastapi_p50_ms_c1: float = TARGET_P50_DELTA_MS


class BenchError(Exception):
    """A failure that ends the run with a clear message."""


# /proc helpers -------------------------------------------------------------------------------


@dataclass
class ProcStat:
    comm: str
    state: str
    ppid: int
    sid: int
    cpu_s: float


def read_stat(pid: int) -> ProcStat:
    with open(f"/proc/{pid}/stat") as handle:
        text = handle.read()
    close = text.rfind(")")
    fields = text[close + 2 :].split()
    return ProcStat(
        comm=text[text.find("(") + 1 : close],
        state=fields[0],
        ppid=int(fields[1]),
        sid=int(fields[3]),
        cpu_s=(int(fields[11]) + int(fields[12])) / TCK,
    )


def snapshot() -> dict[int, ProcStat]:
    out: dict[int, ProcStat] = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                out[int(name)] = read_stat(int(name))
    return out


def machine_busy_s() -> float:
    """Busy CPU seconds of the whole machine (all cores), from /proc/stat."""
    with open("/proc/stat") as handle:
        v = [int(x) for x in handle.readline().split()[1:]]
    return (v[0] + v[1] + v[2] + v[5] + v[6] + v[7]) / TCK  # user nice system irq softirq steal


class Tree:
    """Every process of one server: the root's descendants and its session; remembers each PID seen.

    Cirrus starts replicas in sessions of their own, so they are found as descendants; calling
    `pids()` often (while waiting for the first response) catches them before anything re-parents.
    """

    def __init__(self, root: int) -> None:
        self.root = root
        self.known = {root}

    def pids(self) -> dict[int, ProcStat]:
        snap = snapshot()
        changed = True
        while changed:
            changed = False
            for pid, st in snap.items():
                if pid not in self.known and (st.ppid in self.known or st.sid == self.root):
                    self.known.add(pid)
                    changed = True
        return {p: snap[p] for p in self.known if p in snap and snap[p].state != "Z"}

    def cpu(self) -> dict[int, float]:
        return {pid: st.cpu_s for pid, st in self.pids().items()}


# Servers -------------------------------------------------------------------------------------


@dataclass
class ServerSpec:
    name: str
    label: str
    cmd: list[str]
    url: str
    env: dict[str, str] = field(default_factory=dict)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def uvicorn_spec(name: str, label: str, app: str) -> ServerSpec:
    port = free_port()
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
    return ServerSpec(name, label, cmd, f"http://127.0.0.1:{port}/predict")


def cirrus_spec(home: str, example: Path) -> ServerSpec:
    port = free_port()
    cmd = [sys.executable, "-m", "cirrus.cli", "serve", str(example), "--port", str(port)]
    return ServerSpec(
        "cirrus",
        "Cirrus (`cirrus serve`, gateway + replica)",
        cmd,
        f"http://127.0.0.1:{port}/noop",
        env={"CIRRUS_HOME": home},
    )


class Server:
    """A launched server: its process, its process tree and its log file."""

    def __init__(self, spec: ServerSpec, logdir: Path) -> None:
        self.spec = spec
        self.log_path = logdir / f"{spec.name}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.tree: Tree | None = None

    def start(self) -> None:
        env = {**os.environ, **self.spec.env}
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                self.spec.cmd,
                cwd=ROOT,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,  # its own process group: Ctrl-C in our terminal does not reach it
            )
        self.tree = Tree(self.proc.pid)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def wait_ready(self, timeout_s: float) -> float:
        """Poll POST every 50 ms until the first 200; return the seconds since launch."""
        assert self.proc is not None and self.tree is not None
        t0 = time.monotonic()
        last = "no answer"
        while time.monotonic() - t0 < timeout_s:
            self.tree.pids()
            if self.proc.poll() is not None:
                raise BenchError(
                    f"{self.spec.name} exited with {self.proc.returncode} before answering; "
                    f"log: {self.log_path}\n{self.log_tail()}"
                )
            try:
                reply = post(self.spec.url, BODY)
                if json.loads(reply) == {"y": 1}:
                    return time.monotonic() - t0
                last = f"unexpected reply {reply[:80]!r}"
            except (OSError, ValueError) as exc:
                last = str(exc)
            time.sleep(0.05)
        raise BenchError(
            f"{self.spec.name} did not answer 200 within {timeout_s:.0f} s ({last}); "
            f"log: {self.log_path}\n{self.log_tail()}"
        )

    def log_tail(self, lines: int = 15) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        return ""

    def stop(self) -> list[int]:
        """SIGINT to the process group, then SIGTERM and SIGKILL to every process left; return survivors."""
        if self.proc is None or self.tree is None:
            return []
        proc, tree = self.proc, self.tree
        groups = {proc.pid}
        for pid in tree.pids():
            with contextlib.suppress(OSError):
                groups.add(os.getpgid(pid))
        for pgid in groups:
            with contextlib.suppress(OSError):
                os.killpg(pgid, signal.SIGINT)
        for sig, wait_s in ((None, 10.0), (signal.SIGTERM, 5.0), (signal.SIGKILL, 2.0)):
            if sig is not None:
                for pid in tree.pids():
                    with contextlib.suppress(OSError):
                        os.kill(pid, sig)
            deadline = time.monotonic() + wait_s
            while time.monotonic() < deadline:
                proc.poll()
                if not tree.pids():
                    break
                time.sleep(0.1)
            if not tree.pids():
                break
        proc.poll()
        return sorted(tree.pids())


def post(url: str, body: str, timeout: float = 5.0) -> bytes:
    request = urllib.request.Request(url, data=body.encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        data: bytes = response.read()
        return data


# wrk -----------------------------------------------------------------------------------------

UNIT_MS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 6e4}


def parse_wrk(out: str) -> dict[str, Any]:
    res: dict[str, Any] = {}
    m = re.search(r"Requests/sec:\s+([\d.]+)", out)
    res["rps"] = float(m.group(1)) if m else None
    for pct, val, unit in re.findall(r"^\s+(50|75|90|99)%\s+([\d.]+)(us|ms|s|m)\s*$", out, re.M):
        res[f"p{pct}_ms"] = round(float(val) * UNIT_MS[unit], 3)
    m = re.search(r"(\d+) requests in", out)
    res["requests"] = int(m.group(1)) if m else None
    m = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    res["non2xx"] = int(m.group(1)) if m else 0
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    res["socket_errors"] = sum(int(g) for g in m.groups()) if m else 0
    return res


def cmdline(pid: int, limit: int = 60) -> str:
    with contextlib.suppress(OSError), open(f"/proc/{pid}/cmdline", "rb") as handle:
        return handle.read().replace(b"\0", b" ").decode(errors="replace").strip()[:limit]
    return "?"


def run_wrk(wrk: str, url: str, lua: str, conns: int, duration_s: int, tree: Tree) -> dict[str, Any]:
    """One wrk run; adds the server tree's, wrk's and the rest of the machine's CPU over it."""
    cpu0 = tree.cpu()
    busy0 = machine_busy_s()
    self0 = time.process_time()
    ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.monotonic()
    cmd = [wrk, "-t1", f"-c{conns}", f"-d{duration_s}s", "--latency", "--timeout", "10s", "-s", lua, url]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=duration_s + 60, check=False)
    elapsed = time.monotonic() - t0
    ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu1 = tree.cpu()
    busy = machine_busy_s() - busy0
    harness = time.process_time() - self0
    server_s = sum(c - cpu0.get(pid, 0.0) for pid, c in cpu1.items())
    wrk_s = (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)
    res = parse_wrk(done.stdout)
    if res["rps"] is None:
        raise BenchError(f"wrk gave no result (exit {done.returncode}): {(done.stdout + done.stderr)[-500:]}")
    requests = res["requests"] or 0
    # CPU percentages are of one core; "other" = machine busy time used by neither the server, wrk nor
    # this script (noise from unrelated processes, plus loopback softirq).
    res.update(
        conns=conns,
        duration_s=duration_s,
        server_cpu_pct=round(100 * server_s / elapsed, 1),
        server_cpu_us_per_req=round(1e6 * server_s / requests, 1) if requests else None,
        wrk_cpu_pct=round(100 * wrk_s / elapsed, 1),
        other_cpu_pct=round(100 * (busy - server_s - wrk_s - harness) / elapsed, 1),
        server_procs=len(cpu1),
        server_cpu_pct_by_proc={
            f"{pid} {cmdline(pid)}": round(100 * (c - cpu0.get(pid, 0.0)) / elapsed, 1) for pid, c in cpu1.items()
        },
    )
    return res


def write_lua(directory: Path) -> str:
    path = directory / "post.lua"
    path.write_text(
        f'wrk.method = "POST"\nwrk.body = {json.dumps(BODY)}\nwrk.headers["Content-Type"] = "application/json"\n'
    )
    return str(path)


# Running -------------------------------------------------------------------------------------


def log(msg: str) -> None:
    print(f"[realtime] {msg}", file=sys.stderr, flush=True)


def bench_server(server: Server, wrk: str, lua: str, args: argparse.Namespace) -> dict[str, Any]:
    spec = server.spec
    log(f"{spec.name}: starting: {' '.join(spec.cmd)}")
    server.start()
    assert server.tree is not None
    cold = server.wait_ready(args.ready_timeout)
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
        warm = run_wrk(wrk, spec.url, lua, max(args.conns), args.warmup, server.tree)
        log(f"{spec.name}: warm-up {warm['rps']:.0f} req/s")
    for conns in args.conns:
        res = run_wrk(wrk, spec.url, lua, conns, args.duration, server.tree)
        record["runs"].append(res)
        log(
            f"{spec.name}: c={conns}: {res['rps']:.0f} req/s, p50 {res['p50_ms']} ms, p99 {res['p99_ms']} ms, "
            f"errors {res['non2xx']}/{res['socket_errors']}, server CPU {res['server_cpu_us_per_req']} us/req, "
            f"other CPU {res['other_cpu_pct']} %"
        )
        if not server.alive():
            raise BenchError(f"{spec.name} died during the run; log: {server.log_path}\n{server.log_tail()}")
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
        value = c16["rps"] / f16["rps"]
        out["cirrus_over_fastapi_rps_c16"] = {
            "value": round(value, 3),
            "target": f">= {TARGET_RATIO_C16}",
            "met": value >= TARGET_RATIO_C16,
        }
    c64 = find(results, "cirrus", 64)
    if c16 and c64 and c16["rps"]:
        value = c64["rps"] / c16["rps"]
        out["cirrus_rps_c64_over_c16"] = {
            "value": round(value, 3),
            "target": f">= {TARGET_SCALE_64} (no collapse)",
            "met": value >= TARGET_SCALE_64,
        }
    c1, f1 = find(results, "cirrus", 1), find(results, "fastapi", 1)
    if c1 and f1:
        value = c1["p50_ms"] - f1["p50_ms"]
        out["cirrus_minus_fastapi_p50_ms_c1"] = {
            "value": round(value, 3),
            "target": f"<= {TARGET_P50_DELTA_MS} ms",
            "met": value <= TARGET_P50_DELTA_MS,
        }
    return out


def fmt_ms(v: float | None) -> str:
    if v is None:
        return "-"
    return f"{v:.3f}" if v < 1 else f"{v:.2f}" if v < 10 else f"{v:.1f}"


def markdown(results: list[dict[str, Any]], found: dict[str, Any]) -> str:
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
    names = {
        "cirrus_over_fastapi_rps_c16": "Cirrus / FastAPI req/s at 16 connections",
        "cirrus_rps_c64_over_c16": "Cirrus req/s at 64 / at 16 connections",
        "cirrus_minus_fastapi_p50_ms_c1": "Cirrus p50 - FastAPI p50 at 1 connection (ms)",
    }
    if found:
        lines += ["", "| ratio | value | target | met |", "|---|---|---|---|"]
        for key, item in found.items():
            lines.append(f"| {names[key]} | {item['value']} | {item['target']} | {'yes' if item['met'] else 'NO'} |")
    return "\n".join(lines)


def versions(wrk: str) -> dict[str, str]:
    out = {"python": platform.python_version()}
    for mod in ("uvicorn", "fastapi", "starlette", "uvloop", "httptools", "pydantic"):
        with contextlib.suppress(Exception):
            out[mod] = __import__(mod).__version__
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        done = subprocess.run([wrk, "--version"], capture_output=True, text=True, timeout=5, check=False)
        out["wrk"] = (done.stdout + done.stderr).split("[")[0].strip()
    return out


def git_describe() -> str | None:
    """The commit the Cirrus code was measured at, with `-dirty` when the working tree has changes."""
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        done = subprocess.run(
            ["git", "describe", "--always", "--dirty"], cwd=ROOT, capture_output=True, text=True, timeout=5, check=False
        )
        return done.stdout.strip() or None
    return None


def parse_conns(text: str) -> list[int]:
    try:
        conns = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--conns wants comma-separated integers, not {text!r}") from None
    if not conns or min(conns) < 1:
        raise argparse.ArgumentTypeError("--conns wants positive integers")
    return conns


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--conns", type=parse_conns, default=[1, 16, 64], help="wrk connections (default 1,16,64)")
    ap.add_argument("--duration", type=int, default=15, help="seconds per wrk run (default 15)")
    ap.add_argument("--warmup", type=int, default=5, help="warm-up seconds at the highest --conns (default 5)")
    ap.add_argument("--settle", type=float, default=2.0, help="seconds to wait after the first 200 (default 2)")
    ap.add_argument("--ready-timeout", type=float, default=60.0, help="seconds to wait for the first 200")
    ap.add_argument("--asgi", action="store_true", help="also run a bare ASGI callable on uvicorn, for reference")
    ap.add_argument(
        "--only",
        choices=["fastapi", "cirrus", "asgi"],
        action="append",
        help="run only these servers (repeatable); default: fastapi and cirrus (and asgi with --asgi)",
    )
    ap.add_argument("--example", type=Path, default=ROOT / "examples" / "noop", help="the Cirrus no-op API")
    ap.add_argument("--json", type=Path, metavar="OUT", help="write the raw numbers here")
    ap.add_argument(
        "--logdir",
        type=Path,
        default=Path(tempfile.gettempdir()) / "cirrus-bench-logs",
        help="servers' stdout/stderr go to LOGDIR/NAME.log (default: $TMPDIR/cirrus-bench-logs)",
    )
    ap.add_argument("--check", action="store_true", help="exit 1 when a target is missed")
    return ap.parse_args(argv)


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Turn SIGTERM/SIGHUP into KeyboardInterrupt so that the servers are stopped on the way out."""

    def handler(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    old = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for sig, prev in old.items():
            signal.signal(sig, prev)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    wrk = shutil.which("wrk")
    if wrk is None:
        print("error: wrk is not installed; install it with `apt-get install wrk` (Debian/Ubuntu)", file=sys.stderr)
        return 2
    args.logdir.mkdir(parents=True, exist_ok=True)
    names = args.only or ["fastapi", "cirrus", *(["asgi"] if args.asgi else [])]
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="cirrus-bench-") as tmp, sigterm_as_interrupt():
        workdir = Path(tmp)
        lua = write_lua(workdir)
        home = workdir / "cirrus-home"
        home.mkdir(mode=0o700)
        specs = {
            "fastapi": lambda: uvicorn_spec("fastapi", "FastAPI + uvicorn", "fastapi_noop:app"),
            "cirrus": lambda: cirrus_spec(str(home), args.example),
            "asgi": lambda: uvicorn_spec("asgi", "bare ASGI + uvicorn", "asgi_noop:app"),
        }
        for name in names:
            server = Server(specs[name](), args.logdir)
            try:
                results.append(bench_server(server, wrk, lua, args))
            except BenchError as exc:
                print(f"error: {exc}", file=sys.stderr)
                return 1
            except KeyboardInterrupt:
                print("interrupted; stopping servers", file=sys.stderr)
                return 130
            finally:
                left = server.stop()
                if left:
                    log(f"{name}: processes still alive after SIGKILL: {left}")
                else:
                    log(f"{name}: stopped ({len(server.tree.known) if server.tree else 0} processes)")
    found = ratios(results)
    print(markdown(results, found))
    if args.json:
        meta = {
            "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "host": platform.node(),
            "cpus": os.cpu_count(),
            "versions": versions(wrk),
            "git": git_describe(),
            "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            "targets": asdict(Targets()),
        }
        args.json.write_text(json.dumps({**meta, "servers": results, "ratios": found}, indent=2) + "\n")
        log(f"raw numbers written to {args.json}")
    if args.check and not all(item["met"] for item in found.values()):
        return 1
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:  # between servers: nothing of ours is running
        print("interrupted", file=sys.stderr)
        sys.exit(130)
