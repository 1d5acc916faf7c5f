#!/usr/bin/env python3
"""Async accept benchmark: how fast the gateway answers `202 Accepted` once a request is durable.

For each queue store it starts a local daemon (`cirrus up`, throw-away ``CIRRUS_HOME``, ports 0, the
URLs from ``$CIRRUS_HOME/daemon.json``) with ``CIRRUS_STORE`` set:

* ``sqlite``: the default store, ``$CIRRUS_HOME/queue.db`` (WAL, ``synchronous=NORMAL``);
* ``redis``: a ``redis-server`` this script starts on a free 127.0.0.1 port in a temporary
  directory, with ``--appendonly yes --appendfsync everysec`` and no RDB snapshots.

It deploys the no-op async API of ``bench/projects/async-noop`` in one or both modes:

* ``0`` replicas (``cirrus.yaml``): the replica asks for more CPU than any node has, so it stays
  ``pending`` ("never fits") and only the gateway runs while the accepts are measured; every
  accepted request stays queued. (``min_replicas: 0`` alone does not keep it at zero: the first
  202 at zero replicas makes the controller start one.)
* ``1`` replica (``one-replica.yaml``): one replica leases, runs ``predict`` and writes results into
  the same store while the gateway accepts.

Then, as ``bench/realtime.py`` does: the first 202 (cold), a settle, a wrk warm-up, and
``wrk -t1 -cN -dDs --latency`` with a POST of ``{"x": 1}`` per connection count: the 202's latency
(p50/p99), the sustained accept rate (req/s), non-2xx responses (the only 2xx an async API's POST
answers is 202) and socket errors, and the CPU of the daemon, its replica processes, redis-server,
wrk and the rest of the machine (from /proc). Around every wrk run it counts the API's requests in
the store (all states, in one consistent read; with 0 replicas that is ``backlog().in_queue``) to
show that what was accepted was stored: the store may hold a few more than wrk counted (requests
whose 202 was on the wire when wrk stopped: at most one per connection), never fewer. Finally a
sample of ``--verify`` accepts from a Python client is looked up one by one in the store by id.

``--profile`` adds, per store, one more wrk run at the highest connection count with
``py-spy record --gil`` attached to the daemon (not in the table: sampling slows the daemon) and
prints where the daemon's Python time goes.

Every process it starts carries a marker variable; on the way out (also on Ctrl-C / SIGTERM) it
runs ``cirrus down``, kills any marked process left and stops redis-server.

    python bench/async.py                               # both stores, 0 and 1 replica (~4-5 minutes)
    python bench/async.py --only sqlite --replicas 0 --duration 5 --warmup 2
    python bench/async.py --profile --json /tmp/async.json
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures
import contextlib
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import procs
import report
from wrk import Wrk, add_load_args, find_wrk

from cirrus.store import open_store

ROOT = procs.ROOT
PROJECT = ROOT / "bench" / "projects" / "async-noop"
MODES = {  # replicas -> (spec file, API name, label)
    0: (PROJECT / "cirrus.yaml", "async-noop", "0 replicas (accepts only)"),
    1: (PROJECT / "one-replica.yaml", "async-noop-1", "1 replica draining"),
}
BODY = '{"x": 1}'
STORES = ("sqlite", "redis")
VERSIONS_OF = ("uvicorn", "fastapi", "starlette", "uvloop", "httptools", "pydantic")  # in --json


log = procs.logger("async")

# redis-server ---------------------------------------------------------------------------------


def redis_ping(port: int, timeout: float = 1.0) -> bool:
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(b"PING\r\n")
        return sock.recv(64).startswith(b"+PONG")
    return False


class RedisServer:
    """One redis-server on 127.0.0.1 with the append-only file (fsync every second), files in `directory`."""

    def __init__(self, directory: Path, tag: str) -> None:
        executable = shutil.which("redis-server")
        if executable is None:
            raise procs.BenchError("redis-server is not installed: apt-get install redis-server (or --only sqlite)")
        self.executable = executable
        self.directory = directory
        self.directory.mkdir(parents=True, exist_ok=True)
        self.tag = tag
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def log_path(self) -> Path:
        return self.directory / "redis.log"

    def start(self) -> str:
        for _ in range(3):  # a free port may be taken by someone else before redis binds it
            self.port = procs.free_port()
            self.proc = subprocess.Popen(
                [
                    self.executable,
                    "--bind", "127.0.0.1",
                    "--port", str(self.port),
                    "--dir", str(self.directory),
                    "--save", "",
                    "--appendonly", "yes",
                    "--appendfsync", "everysec",
                    "--daemonize", "no",
                    "--logfile", str(self.log_path),
                ],
                env={**os.environ, procs.TAG_ENV: self.tag},
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,
            )  # fmt: skip
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and self.proc.poll() is None:
                if redis_ping(self.port):
                    version = subprocess.run(
                        [self.executable, "--version"], capture_output=True, text=True, check=False
                    ).stdout.strip()
                    log(f"redis-server pid {self.proc.pid} on {self.url} ({version.split(' sha')[0]})")
                    return self.url
                time.sleep(0.02)
            tail = self.log_tail()
            self.stop()
            if "Address already in use" not in tail:
                raise procs.BenchError(f"redis-server did not start:\n{tail}")
        raise procs.BenchError("redis-server found no free port")

    def log_tail(self) -> str:
        with contextlib.suppress(OSError):
            return self.log_path.read_text(errors="replace")[-1500:]
        return "(no log)"

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), timeout=2) as sock:
            sock.sendall(b"SHUTDOWN NOSAVE\r\n")
        for sig in (None, signal.SIGTERM, signal.SIGKILL):
            if sig is not None:
                with contextlib.suppress(OSError):
                    proc.send_signal(sig)
            try:
                proc.wait(5)
                return
            except subprocess.TimeoutExpired:
                continue


# What the store holds -------------------------------------------------------------------------


def stored(url: str, api: str) -> dict[str, int]:
    """The API's requests in the store: `backlog()` (in_queue, in_progress) and, in one consistent
    read, every request of the API whatever its state (`total`: queued, leased and finished)."""
    store = open_store(url)
    try:
        backlog = store.backlog(api, time.time())
    finally:
        store.close()
    if url.startswith("sqlite://"):  # the schema of cirrus/store/sqlite.py
        with contextlib.closing(sqlite3.connect(f"file:{url.removeprefix('sqlite://')}?mode=ro", uri=True)) as db:
            (total,) = db.execute("SELECT COUNT(*) FROM requests WHERE api = ?", (api,)).fetchone()
    else:  # the key layout of cirrus/store/redis.py; MULTI/EXEC: a request is in exactly one of these
        import redis

        with contextlib.closing(redis.Redis.from_url(url)) as client, client.pipeline(transaction=True) as pipe:
            for name in ("queue", "inflight", "done"):
                pipe.zcard(f"cirrus:{{{api}}}:{name}")
            total = sum(int(n) for n in pipe.execute())
    return {"in_queue": backlog.in_queue, "in_progress": backlog.in_progress, "total": int(total)}


def verify_ids(gateway: str, url: str, api: str, count: int, workers: int = 16) -> dict[str, Any]:
    """`count` accepts from a thread pool; each 202's id is then looked up in the store."""
    target = f"{gateway}/{api}"
    with httpx.Client(timeout=30, limits=httpx.Limits(max_connections=workers)) as http:

        def one(_: int) -> tuple[int, str | None]:
            reply = http.post(target, content=BODY, headers={"content-type": "application/json"})
            return reply.status_code, reply.json().get("id") if reply.status_code == 202 else None

        with concurrent.futures.ThreadPoolExecutor(workers) as pool:
            answers = list(pool.map(one, range(count)))
    ids = [i for status, i in answers if status == 202 and i]
    store = open_store(url)
    try:
        missing = [i for i in ids if store.get(api, i) is None]
    finally:
        store.close()
    return {"sent": count, "accepted": len(ids), "found": len(ids) - len(missing), "missing": missing[:10]}


# py-spy ---------------------------------------------------------------------------------------


def profile(pid: int, seconds: int, out: Path) -> dict[str, Any]:
    """`py-spy record --gil` on the daemon: samples of the thread holding the GIL, i.e. where the daemon's
    Python time goes (time in C with the GIL released, such as SQLite's commit, is not sampled)."""
    spy = shutil.which("py-spy")
    if spy is None:
        raise procs.BenchError("--profile needs py-spy: pip install py-spy")
    cmd = [spy, "record", "-p", str(pid), "-d", str(seconds), "-r", "200", "--gil", "--nonblocking", "--function"]
    cmd += ["--threads", "-f", "raw", "-o", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 60, check=False)
    if done.returncode != 0 or not out.exists():
        raise procs.BenchError(f"py-spy failed ({done.returncode}): {(done.stdout + done.stderr)[-800:]}")
    return summarize_profile(out)


# Frames every sample of a thread passes through: left out of the "total" column.
WRAPPERS = ["<frozen runpy>", "threading.py", "asyncio/runners.py", "uvloop/__init__.py", "cirrus/loop.py"]
WRAPPERS += ["cirrus/daemon.py", "concurrent/futures/thread.py"]


def summarize_profile(path: Path, top: int = 15) -> dict[str, Any]:
    by_thread: collections.Counter[str] = collections.Counter()
    leaf: collections.Counter[str] = collections.Counter()
    total: collections.Counter[str] = collections.Counter()
    samples = 0
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = stack.split(";")
        thread, frames = frames[0], frames[1:]
        samples += count
        by_thread[thread.split(" ")[-1].strip('"') if thread.startswith("thread") else thread] += count
        if frames:
            leaf[frames[-1]] += count
        for frame in set(frames):
            if not any(w in frame for w in WRAPPERS):
                total[frame] += count

    def share(counter: collections.Counter[str]) -> list[tuple[str, float]]:
        return [(name, round(100 * n / samples, 1)) for name, n in counter.most_common(top)] if samples else []

    return {"samples": samples, "threads": share(by_thread), "self": share(leaf), "total": share(total)}


# One store, one mode ---------------------------------------------------------------------------


def cpu_split(
    daemon_pid: int, before: dict[int, float], after: dict[int, float], elapsed: float
) -> tuple[float, float]:
    """CPU % of one core: the daemon process itself (gateway, controller) and its children (replicas)."""
    own = after.get(daemon_pid, 0.0) - before.get(daemon_pid, 0.0)
    rest = sum(c - before.get(pid, 0.0) for pid, c in after.items() if pid != daemon_pid)
    return round(100 * own / elapsed, 1), round(100 * rest / elapsed, 1)


def measured_run(
    wrk: Wrk, url: str, conns: int, seconds: int, daemon_pid: int, tree: procs.Tree, redis_tree: procs.Tree | None
) -> dict[str, Any]:
    before = tree.cpu()
    redis_before = redis_tree.cpu() if redis_tree else {}
    t0 = time.monotonic()
    res = wrk.run(url, conns, seconds, tree)
    elapsed = time.monotonic() - t0
    after = tree.cpu()
    res["daemon_cpu_pct"], res["replicas_cpu_pct"] = cpu_split(daemon_pid, before, after, elapsed)
    res["redis_cpu_pct"] = None
    if redis_tree:
        redis_after = redis_tree.cpu()
        redis_s = sum(c - redis_before.get(pid, 0.0) for pid, c in redis_after.items())
        res["redis_cpu_pct"] = round(100 * redis_s / elapsed, 1)
        res["other_cpu_pct"] = round(res["other_cpu_pct"] - res["redis_cpu_pct"], 1)
    res["accepted"] = (res["requests"] or 0) - res["non2xx"]
    daemon_s = res["daemon_cpu_pct"] * elapsed / 100
    res["daemon_cpu_us_per_accept"] = round(1e6 * daemon_s / res["accepted"], 1) if res["accepted"] else None
    return res


def bench_mode(
    store: str, replicas: int, url: str, redis_tree: procs.Tree | None, workdir: Path, wrk: Wrk, args: Any
) -> dict[str, Any]:
    spec_file, api, label = MODES[replicas]
    daemon = procs.Daemon(f"{store}-{replicas}", workdir, args.logdir, log)
    if url:
        daemon.env["CIRRUS_STORE"] = url
    store_url = url or daemon.settings.store_url
    record: dict[str, Any] = {"store": store, "store_url": store_url, "replicas": replicas, "label": label, "api": api}
    try:
        daemon.start()
        assert daemon.pid is not None
        tree = procs.Tree(daemon.pid)
        log(f"{store}/{replicas}: deploying {spec_file.relative_to(ROOT)}")
        daemon.client.deploy(spec_file, wait=True, timeout=120)
        target = f"{daemon.gateway_url}/{api}"
        t0 = time.monotonic()
        while True:
            tree.pids()
            try:
                reply = httpx.post(target, content=BODY, headers={"content-type": "application/json"}, timeout=10)
                if reply.status_code == 202:
                    break
                last = f"{reply.status_code} {reply.text[:200]}"
            except httpx.HTTPError as exc:
                last = str(exc)
            if time.monotonic() - t0 > args.ready_timeout:
                raise procs.BenchError(f"{store}/{replicas}: no 202 within {args.ready_timeout:g} s ({last})")
            time.sleep(0.05)
        record["first_202_s"] = round(time.monotonic() - t0, 3)
        time.sleep(args.settle)
        status = daemon.client.get(api)
        record["api_status"] = {
            "status": str(status.status),
            "ready": status.replicas_ready,
            "desired": status.replicas_desired,
            "message": status.message,
        }
        log(f"{store}/{replicas}: {status.replicas_ready} ready / {status.replicas_desired} desired ({status.message})")
        if args.warmup > 0:
            warm = wrk.run(target, max(args.conns), args.warmup, tree)
            log(f"{store}/{replicas}: warm-up {warm['rps']:.0f} req/s")
        record["runs"] = []
        for conns in args.conns:
            time.sleep(0.5)  # accepts still being committed land before the count
            before = stored(store_url, api)
            res = measured_run(wrk, target, conns, args.duration, daemon.pid, tree, redis_tree)
            time.sleep(0.5)
            after = stored(store_url, api)
            res["stored"] = after["total"] - before["total"]
            res["stored_minus_accepted"] = res["stored"] - res["accepted"]
            res["store_after"] = after
            record["runs"].append(res)
            log(
                f"{store}/{replicas}: c={conns}: {res['rps']:.0f} req/s, p50/p99 {res['p50_ms']}/{res['p99_ms']} ms, "
                f"non-2xx {res['non2xx']}, socket errors {res['socket_errors']}, accepted {res['accepted']}, "
                f"stored {res['stored']} (+{res['stored_minus_accepted']}), daemon CPU {res['daemon_cpu_pct']} %, "
                f"redis {res['redis_cpu_pct']} %, wrk {res['wrk_cpu_pct']} %, other {res['other_cpu_pct']} %"
            )
            if not tree.pids().get(daemon.pid):
                raise procs.BenchError(f"{store}/{replicas}: the daemon died; logs: {args.logdir / daemon.label}")
        if args.verify:
            record["verify"] = verify_ids(daemon.gateway_url, store_url, api, args.verify)
            log(f"{store}/{replicas}: id check: {record['verify']}")
        time.sleep(0.5)
        record["store_final"] = stored(store_url, api)
        if args.profile and replicas == min(args.replicas):
            out = args.logdir / f"py-spy-{store}-{replicas}.txt"
            log(f"{store}/{replicas}: py-spy on the daemon during {args.profile_s} s of wrk -c{max(args.conns)}")
            with concurrent.futures.ThreadPoolExecutor(1) as pool:
                spied = pool.submit(profile, daemon.pid, args.profile_s, out)
                time.sleep(1.0)  # py-spy attached
                res = wrk.run(target, max(args.conns), args.profile_s, tree)
                record["profile"] = {"rps_while_profiled": res["rps"], "raw": str(out), **spied.result()}
        return record
    finally:
        procs.stop_and_report(daemon, log, f"{store}/{replicas}")


# Output ---------------------------------------------------------------------------------------


def markdown(results: list[dict[str, Any]]) -> str:
    out: list[str] = []
    for store in STORES:
        records = [r for r in results if r["store"] == store]
        if not records:
            continue
        title = "SQLite (WAL, synchronous=NORMAL)" if store == "sqlite" else "Redis (appendonly yes, everysec)"
        out += [
            f"### {title}",
            "",
            "| mode | conns | accepts/s | p50 ms | p99 ms | non-2xx / socket errors | 202s counted | stored "
            "| daemon CPU % | daemon us/accept | replica CPU % | redis CPU % | wrk CPU % | other CPU % |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for rec in records:
            for run in rec["runs"]:
                redis_cpu = "-" if run["redis_cpu_pct"] is None else f"{run['redis_cpu_pct']:.0f}"
                out.append(
                    f"| {rec['label']} | {run['conns']} | {run['rps']:.0f} | {report.fmt_ms(run.get('p50_ms'))} "
                    f"| {report.fmt_ms(run.get('p99_ms'))} | {run['non2xx']} / {run['socket_errors']} "
                    f"| {run['accepted']} | {run['stored']} (+{run['stored_minus_accepted']}) "
                    f"| {run['daemon_cpu_pct']:.0f} | {run['daemon_cpu_us_per_accept']} "
                    f"| {run['replicas_cpu_pct']:.0f} | {redis_cpu} "
                    f"| {run['wrk_cpu_pct']:.0f} | {run['other_cpu_pct']:.0f} |"
                )
        out.append("")
        for rec in records:
            final, check = rec.get("store_final", {}), rec.get("verify")
            line = (
                f"- {rec['label']}: the store holds {final.get('total')} requests of `{rec['api']}` "
                f"(backlog: in_queue {final.get('in_queue')}, in_progress {final.get('in_progress')}; "
                f"the rest finished)"
            )
            if check:
                line += f"; id check: {check['found']} of {check['accepted']} accepted ids found in the store"
            out.append(line)
        for rec in records:
            prof = rec.get("profile")
            if not prof:
                continue
            out += [
                "",
                f"py-spy, {rec['label']}, wrk -c{max(r['conns'] for r in rec['runs'])} "
                f"({prof['rps_while_profiled']:.0f} accepts/s while sampled, {prof['samples']} samples of the "
                f"thread holding the GIL, `--function`):",
                "",
                "threads: " + ", ".join(f"{name} {p} %" for name, p in prof["threads"][:6]),
                "",
                "| self % | function | | total % | function (wrappers left out) |",
                "|---|---|---|---|---|",
            ]
            for (s_name, s_pct), (t_name, t_pct) in zip(prof["self"], prof["total"], strict=False):
                out.append(f"| {s_pct} | `{s_name}` | | {t_pct} | `{t_name}` |")
        out.append("")
    return "\n".join(out)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    add_load_args(ap, [1, 16, 64], 15, 5, "at the highest --conns", first_answer="202")
    ap.add_argument("--only", choices=STORES, action="append", help="only this store (repeatable)")
    ap.add_argument(
        "--replicas",
        type=lambda text: sorted({int(x) for x in text.split(",")} & set(MODES)) or [0],
        default=[0, 1],
        help="modes: 0 (accepts only), 1 (one replica draining); default 0,1",
    )
    ap.add_argument("--verify", type=int, default=500, help="accepts whose ids are checked in the store (0: skip)")
    ap.add_argument("--profile", action="store_true", help="one more run per store under py-spy (see above)")
    ap.add_argument("--profile-s", type=int, default=10, help="seconds of py-spy sampling (default 10)")
    report.add_output_args(
        ap,
        report.LOGDIR / "async",
        "daemon and replica logs, redis log and profiles (default: $TMPDIR/cirrus-bench-logs/async)",
        check=False,
    )
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if (binary := find_wrk()) is None:
        return 2
    args.logdir.mkdir(parents=True, exist_ok=True)
    stores = args.only or list(STORES)
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="cirrus-async-") as tmp, procs.sigterm_as_interrupt():
        workdir = Path(tmp)
        wrk = Wrk.posting(binary, workdir, BODY)
        for store in stores:
            redis_server = (
                RedisServer(workdir / "redis", tag=f"async-bench-{os.getpid()}") if store == "redis" else None
            )
            try:
                url, redis_tree = "", None
                if redis_server is not None:
                    url = redis_server.start()
                    assert redis_server.proc is not None
                    redis_tree = procs.Tree(redis_server.proc.pid)
                for replicas in args.replicas:
                    results.append(bench_mode(store, replicas, url, redis_tree, workdir, wrk, args))
            finally:
                if redis_server is not None:
                    with contextlib.suppress(OSError):
                        shutil.copy2(redis_server.log_path, args.logdir / "redis.log")
                    redis_server.stop()
    print(markdown(results))
    if args.json:
        versions = report.versions(VERSIONS_OF, wrk)
        report.write_json(args.json, args, {"results": results}, versions=versions, log=log)
    return 0


if __name__ == "__main__":
    procs.run_main(main)
