#!/usr/bin/env python3
"""Model memory benchmark: N replicas of a ~2 GB safetensors model on one host, and how fast they start.

Generates a safetensors file of random float32 layers (4096 x 4096, 64 MiB each; ``--size-gb``,
default 2) in a temporary directory, then two parts:

* **replicas**: `bench/projects/big-model` (copied next to the file, its `cirrus.yaml` adjusted)
  deployed through a `cirrus up` daemon (throw-away ``CIRRUS_HOME``, ports 0), once per way of
  loading: ``shared`` (`cirrus.models.weights.load_safetensors`: views of the file's memory
  mapping, every page read in `__init__`) and ``copy`` (`np.fromfile`: the whole file in the
  process's own memory, as pickle / `torch.load` / `np.load` hold it). Each is deployed at 1
  replica, with a cold page cache (``echo 3 > /proc/sys/vm/drop_caches`` after a `sync`, when
  permitted), then redeployed with only its autoscaling bounds raised to 4 (a scale-only change,
  applied in place: action `scaled`, the same revision, the first replica untouched, 3 replicas
  forked from the revision's running template, the file now in the page cache; the weights live
  outside the project directory, so its snapshot differs by `cirrus.yaml` alone). The script polls
  `cirrus get` every 20 ms from the deploy call until 4 replicas are ready. After each step, one
  request, then the PSS and RSS of every replica and of the template from
  ``/proc/PID/smaps_rollup``. Targets: summed PSS of 4 shared replicas (with their template) <= 1.3x
  that of 1; a further replica (warm cache) ready < 1 s, from the controller starting it to its
  ready report; the scale-only change: 4 ready < 3 s after the deploy call, action `scaled`, the
  revision and the first replica's pid unchanged.
* **loaders**: on a smaller file (``--loader-mb``, default 512), two plain processes load it the same
  way at once (and touch every value); their summed PSS vs the file size, per loader: this module,
  `safetensors.numpy.load_file`, `safetensors.torch.load_file`, `torch.load` of the same weights
  saved with `torch.save` (with and without ``mmap=True``), and `np.fromfile`.

Every process the run starts is stopped on the way out (also on Ctrl-C / SIGTERM): the daemon with
`cirrus down`, then any process carrying the run's marker variable; the temporary directory and its
files go with it. Dropping the page cache slows other work on the machine for a moment; pass
``--no-drop-caches`` to measure with a warm cache only.

    python bench/models.py                      # both parts (~1-2 minutes)
    python bench/models.py --only replicas --json /tmp/models.json
    python bench/models.py --size-gb 0.5 --only replicas --variant shared
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import procs
import report
import yaml

from cirrus.types import ApiStatus, ReplicaState

ROOT = procs.ROOT
PROJECT = ROOT / "bench" / "projects" / "big-model"
LAYER_SHAPE = (4096, 4096)  # float32: 64 MiB per layer
MB = 1024 * 1024
GB = 1024 * MB
VARIANTS = ("shared", "copy")

TARGET_PSS_RATIO = 1.3  # summed PSS, 4 replicas vs 1 (with the template)
TARGET_WARM_READY_S = 1.0  # a further replica, page cache warm: started -> ready
TARGET_SCALE_READY_S = 3.0  # autoscaling bounds 1 -> 4 (scale-only): the deploy call -> 4 replicas ready


@dataclass(frozen=True)
class Targets:
    pss_4_vs_1: float = TARGET_PSS_RATIO
    warm_replica_ready_s: float = TARGET_WARM_READY_S
    scale_only_ready_s: float = TARGET_SCALE_READY_S
    scale_only_action: str = "scaled"
    scale_only_revision_unchanged: bool = True
    scale_only_first_pid_unchanged: bool = True


log = procs.logger("models")


# The model file ---------------------------------------------------------------------------------


def write_model(path: Path, size_bytes: int, seed: int = 0) -> dict[str, Any]:
    """A safetensors file of random float32 layers, written 64 MiB at a time; then flushed to disk."""
    layer_bytes = LAYER_SHAPE[0] * LAYER_SHAPE[1] * 4
    count = max(1, round(size_bytes / layer_bytes))
    header: dict[str, Any] = {"__metadata__": {"generator": "bench/models.py"}}
    for i in range(count):
        begin = i * layer_bytes
        header[f"layers.{i}.weight"] = {
            "dtype": "F32",
            "shape": list(LAYER_SHAPE),
            "data_offsets": [begin, begin + layer_bytes],
        }
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    rng = np.random.default_rng(seed)
    t0 = time.perf_counter()
    with path.open("wb") as handle:
        handle.write(len(raw).to_bytes(8, "little") + raw)
        for _ in range(count):
            handle.write(rng.random(LAYER_SHAPE, dtype=np.float32).data)
        written = time.perf_counter() - t0
        handle.flush()
        os.fsync(handle.fileno())
    return {
        "path": str(path),
        "bytes": path.stat().st_size,
        "tensors": count,
        "write_s": round(written, 2),
        "with_fsync_s": round(time.perf_counter() - t0, 2),
    }


def drop_caches() -> str | None:
    """Sync, then drop the page cache (as root); None when done, else why not."""
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    except OSError as exc:
        return f"cannot drop the page cache ({exc.strerror or exc}); cold-cache figures are warm"
    return None


def filesystem_of(path: Path) -> str:
    """The type of the filesystem holding `path` (from /proc/mounts; the longest matching mount point)."""
    best, kind = "", "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/mounts").read_text().splitlines():
            fields = line.split()
            if len(fields) > 2 and str(path).startswith(fields[1]) and len(fields[1]) > len(best):
                best, kind = fields[1], fields[2]
    return kind


def mem_available() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0


# Memory of processes ------------------------------------------------------------------------------


def smaps(pid: int) -> dict[str, float]:
    """Rss, Pss and its anonymous / file-backed parts, in MB, from /proc/PID/smaps_rollup."""
    out: dict[str, float] = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[2] == "kB":
            out[parts[0].rstrip(":")] = int(parts[1]) / 1024
    return {k: round(out.get(k, 0.0), 1) for k in ("Rss", "Pss", "Pss_Anon", "Pss_File", "Pss_Shmem")}


def total(items: list[dict[str, float]], key: str) -> float:
    return round(sum(m[key] for m in items), 1)


# Replicas through a daemon ------------------------------------------------------------------------

LOG_LINE = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) \S+ \S+: (.*)$")
READY = re.compile(r"^replica (\S+) of (\S+) is ready \(pid (\d+), loaded in ([\d.]+)s\)")
TEMPLATE_READY = re.compile(r"^template of (\S+) revision (\d+) ready \(pid (\d+), imported in ([\d.]+)s\)")


def log_events(daemon: procs.Daemon, api: str, since: float) -> tuple[dict[str, tuple[float, float]], list[float]]:
    """From daemon.log after `since`: {replica id: (ready at, load s)} and the template import times of `api`."""
    ready: dict[str, tuple[float, float]] = {}
    imports: list[float] = []
    with contextlib.suppress(OSError):
        for line in daemon.settings.daemon_log.read_text(errors="replace").splitlines():
            m = LOG_LINE.match(line)
            if not m:
                continue
            at = datetime.datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
            if at < since - 0.002:  # log timestamps have millisecond resolution
                continue
            if (r := READY.match(m.group(2))) and r.group(2) == api:
                ready[r.group(1)] = (at, float(r.group(4)))
            elif (t := TEMPLATE_READY.match(m.group(2))) and t.group(1) == api:
                imports.append(float(t.group(4)))
    return ready, imports


def write_project(dest: Path, variant: str, weights: Path, replicas: int, populate: bool) -> Path:
    """bench/projects/big-model copied to `dest`, its spec named big-VARIANT, loading `weights` that way."""
    dest.mkdir(exist_ok=True)
    shutil.copy2(PROJECT / "predictor.py", dest / "predictor.py")
    spec = yaml.safe_load((PROJECT / "cirrus.yaml").read_text())
    api = spec[0]
    api["name"] = f"big-{variant}"
    api["predictor"]["config"] = {"weights": str(weights), "load": variant, "populate": populate}
    api["autoscaling"].update(min_replicas=replicas, init_replicas=replicas, max_replicas=max(4, replicas))
    (dest / "cirrus.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    return dest


def only_revision(revision: int) -> Any:
    """A check for `Daemon.wait`: live, and no replica of an older revision left running."""

    def check(status: ApiStatus) -> bool:
        running = [r for r in status.replicas if r.state is not ReplicaState.STOPPED]
        return status.status == "live" and all(r.revision == revision for r in running)

    return check


def measure(daemon: procs.Daemon, api: str, revision: int) -> dict[str, Any]:
    """smaps of the ready replicas of `revision` and of the template(s) they were forked from."""
    status = daemon.client.get(api)
    replica_pids = sorted(r.pid for r in status.replicas if r.state is ReplicaState.READY and r.pid is not None)
    templates = []
    for pid in procs.tagged_pids(daemon.tag):
        cmd = procs.cmdline(pid, limit=1000).split()
        if pid in replica_pids or "cirrus.replica.template" not in cmd:
            continue
        with contextlib.suppress(ValueError, IndexError):
            if cmd[cmd.index("--api") + 1] == api and cmd[cmd.index("--revision") + 1] == str(revision):
                templates.append(pid)
    replicas = [smaps(pid) for pid in replica_pids]
    template = [smaps(pid) for pid in templates]
    return {
        "replica_memory": replicas,
        "template_memory": template,
        "replicas_pss_mb": total(replicas, "Pss"),
        "template_pss_mb": total(template, "Pss"),
        "total_pss_mb": round(total(replicas, "Pss") + total(template, "Pss"), 1),
        "rss_per_replica_mb": round(statistics.mean(m["Rss"] for m in replicas), 1) if replicas else None,
        "pss_anon_mb": total(replicas + template, "Pss_Anon"),
        "pss_file_mb": total(replicas + template, "Pss_File"),
    }


def ask(daemon: procs.Daemon, api: str) -> float:
    """One request that reads a few rows of every layer; its latency in s."""
    t0 = time.perf_counter()
    reply = json.loads(procs.post(f"{daemon.gateway_url}/{api}", json.dumps({"rows": [0, 1, 2047]}), timeout=60))
    if not isinstance(reply, dict) or "sum" not in reply:
        raise procs.BenchError(f"{api}: unexpected reply {reply!r}")
    return round(time.perf_counter() - t0, 4)


def deploy_step(
    daemon: procs.Daemon, project: Path, api: str, replicas: int, args: argparse.Namespace, cache: str
) -> dict[str, Any]:
    """Deploy `project` (at `replicas`), wait until only its revision runs; times, a request, memory."""
    since = time.time()
    t0 = time.monotonic()
    result = daemon.client.deploy(project, wait=False)[0]
    daemon.wait("live", only_revision(result.revision), api, args.timeout)
    step = {
        "replicas": replicas,
        "revision": result.revision,
        "action": result.action,
        "page_cache": cache,
        "deploy_to_live_s": round(time.monotonic() - t0, 3),
    }
    step.update(after_deploy(daemon, api, result.revision, since, args))
    del step["last_ready_at"]
    log_step(api, step)
    return step


def scale_step(
    daemon: procs.Daemon, project: Path, api: str, first: dict[str, Any], args: argparse.Namespace
) -> dict[str, Any]:
    """Redeploy `project`, whose autoscaling bounds alone were raised to 4 (a scale-only change), polling
    `cirrus get` every 20 ms from the deploy call until 4 replicas are ready; then whether it was applied in
    place: action `scaled`, the same revision, and the first replica still serving under the same pid."""
    since = time.time()
    t0 = time.monotonic()
    result = daemon.client.deploy(project, wait=False)[0]
    all_ready_s, seen = wait_ready(daemon, api, result.revision, 4, t0, args.timeout)
    step: dict[str, Any] = {
        "replicas": 4,
        "revision": result.revision,
        "action": result.action,
        "page_cache": "warm",
        "deploy_to_live_s": round(all_ready_s, 3),
        "ready_polled_s": seen,
    }
    step.update(after_deploy(daemon, api, result.revision, since, args))
    first_id, first_pid = next(iter(first["replica_pids"].items()))
    last_ready_at = step.pop("last_ready_at")
    step["scale_only"] = {
        "action": result.action,
        "revision_before": first["revision"],
        "revision_after": result.revision,
        "revision_unchanged": result.revision == first["revision"],
        "first_replica": first_id,
        "first_pid_before": first_pid,
        "first_pid_after": step["replica_pids"].get(first_id),
        "first_pid_unchanged": step["replica_pids"].get(first_id) == first_pid,
        "all_ready_s": round(all_ready_s, 3),
        "all_ready_log_s": round(last_ready_at - since, 3) if last_ready_at else None,
    }
    log_step(api, step)
    if result.action != "scaled" or not step["scale_only"]["first_pid_unchanged"]:
        log(f"{api}: the scale-only change was NOT applied in place: {step['scale_only']}")
    return step


def wait_ready(
    daemon: procs.Daemon, api: str, revision: int, count: int, t0: float, timeout: float
) -> tuple[float, dict[str, float]]:
    """Poll `cirrus get` every 20 ms until `count` replicas of `revision` are ready: the seconds since `t0`
    (monotonic), and per replica when it was first seen ready; BenchError after `timeout` s."""
    seen: dict[str, float] = {}
    while True:
        status = daemon.client.get(api)
        now = time.monotonic()
        ready = [r for r in status.replicas if r.revision == revision and r.state is ReplicaState.READY]
        for r in ready:
            seen.setdefault(r.id, round(now - t0, 3))
        if len(ready) >= count:
            return now - t0, seen
        if now - t0 > timeout:
            raise procs.BenchError(
                f"{api}: {len(ready)}/{count} replicas of revision {revision} ready after {timeout:g} s; "
                f"{status.status}, {status.message or ''}; logs: {daemon.logdir / daemon.label}"
            )
        time.sleep(0.02)


def after_deploy(
    daemon: procs.Daemon, api: str, revision: int, since: float, args: argparse.Namespace
) -> dict[str, Any]:
    """Once `revision` serves: a first request, the replicas' start times from daemon.log (those ready after
    `since`), their pids, then (after `--settle` s and 3 more requests) the memory of the replicas."""
    first_request_s = ask(daemon, api)
    status = daemon.client.get(api)
    ready, imports = log_events(daemon, api, since)
    started = {r.id: r.started_at for r in status.replicas if r.revision == revision}
    starts = [
        {
            "replica": rid,
            "load_s": load_s,
            "start_to_ready_s": round(at - begun, 3) if (begun := started.get(rid)) else None,
        }
        for rid, (at, load_s) in ready.items()
        if rid in started
    ]
    pids = {r.id: r.pid for r in status.replicas if r.revision == revision and r.state is ReplicaState.READY and r.pid}
    time.sleep(args.settle)
    for _ in range(3):
        ask(daemon, api)
    return {
        "template_import_s": imports[-1] if imports else None,
        "starts": starts,
        "last_ready_at": max((at for rid, (at, _) in ready.items() if rid in started), default=None),
        "replica_pids": pids,
        "first_request_s": first_request_s,
        **measure(daemon, api, revision),
    }


def log_step(api: str, step: dict[str, Any]) -> None:
    loads = ", ".join(f"{s['load_s']:.2f}" for s in step["starts"])
    log(
        f"{api} x{step['replicas']} ({step['page_cache']} cache, {step['action']}, revision {step['revision']}): "
        f"ready in {step['deploy_to_live_s']:.2f} s (replica load {loads} s), PSS replicas "
        f"{step['replicas_pss_mb']:.0f} MB + template {step['template_pss_mb']:.0f} MB, "
        f"RSS per replica {step['rss_per_replica_mb']} MB"
    )


def run_variant(
    daemon: procs.Daemon, variant: str, weights: Path, tmp: Path, args: argparse.Namespace
) -> dict[str, Any]:
    api = f"big-{variant}"
    project = tmp / f"project-{variant}"  # the weights stay outside it: only cirrus.yaml changes between steps
    out: dict[str, Any] = {"variant": variant, "api": api, "steps": []}
    cache = "warm"
    if not args.no_drop_caches:
        why = drop_caches()
        cache = "cold" if why is None else "warm"
        if why:
            log(why)
            out["drop_caches"] = why
    write_project(project, variant, weights, 1, populate=True)
    out["steps"].append(deploy_step(daemon, project, api, 1, args, cache))
    needed = 4 * weights.stat().st_size * 1.2 if variant == "copy" else 0
    if needed and mem_available() < needed:
        out["skipped_4"] = f"{mem_available() / GB:.1f} GB available, 4 copies need ~{needed / GB:.1f} GB"
        log(f"{api}: not scaling to 4: {out['skipped_4']}")
    else:
        write_project(project, variant, weights, 4, populate=True)  # the autoscaling bounds, nothing else
        out["steps"].append(scale_step(daemon, project, api, out["steps"][0], args))
    daemon.client.delete(api)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and any(
        "cirrus.replica" in procs.cmdline(pid, 200) for pid in procs.tagged_pids(daemon.tag)
    ):
        time.sleep(0.2)
    return out


# Loaders in plain processes -----------------------------------------------------------------------

LOADER_CODE = """
import sys, time
path, pt_path, how = sys.argv[1:4]
import numpy
if how.startswith(("cirrus", "safetensors", "torch")):
    import torch
    import cirrus.models.weights
    import safetensors.numpy, safetensors.torch
print("imported", flush=True)
sys.stdin.readline()  # the parent measures both processes here: the baseline
t0 = time.perf_counter()
if how == "cirrus-numpy":
    w = cirrus.models.weights.load_safetensors(path)
elif how == "cirrus-pt":
    w = cirrus.models.weights.load_safetensors(path, framework="pt")
elif how == "safetensors-numpy":
    w = safetensors.numpy.load_file(path)
elif how == "safetensors-pt":
    w = safetensors.torch.load_file(path)
elif how == "torch-load":
    w = torch.load(pt_path, weights_only=True)
elif how == "torch-load-mmap":
    w = torch.load(pt_path, weights_only=True, mmap=True)
elif how == "np-fromfile":
    w = {"all": numpy.fromfile(path, dtype=numpy.uint8)}
loaded = time.perf_counter() - t0
touched = sum(float(v.sum()) for v in w.values())  # every value read once
print(f"{loaded:.4f} {time.perf_counter() - t0:.4f}", flush=True)
sys.stdin.readline()
"""

LOADERS = [
    ("cirrus-numpy", "`cirrus.models.weights.load_safetensors(path)` (numpy)", False),
    ("cirrus-pt", "`load_safetensors(path, framework='pt')`", True),
    ("safetensors-numpy", "`safetensors.numpy.load_file`", False),
    ("safetensors-pt", "`safetensors.torch.load_file`", True),
    ("torch-load", "`torch.load(weights_only=True)` of a `torch.save` file", True),
    ("torch-load-mmap", "`torch.load(weights_only=True, mmap=True)`", True),
    ("np-fromfile", "`np.fromfile` (the file read into memory)", False),
]


def run_loaders(tmp: Path, args: argparse.Namespace, tag: str, started: list[subprocess.Popen[str]]) -> dict[str, Any]:
    path = tmp / "loaders.safetensors"
    info = write_model(path, args.loader_mb * MB, seed=1)
    pt_path = tmp / "loaders.pt"
    have_torch = importable("torch")
    have_safetensors = importable("safetensors")
    if have_torch:
        code = (
            "import sys, torch; from cirrus.models.weights import load_safetensors; "
            "torch.save({k: v.clone() for k, v in load_safetensors(sys.argv[1], framework='pt').items()}, sys.argv[2])"
        )
        subprocess.run([sys.executable, "-c", code, str(path), str(pt_path)], cwd=ROOT, check=True, timeout=300)
    size_mb = info["bytes"] / MB
    rows: list[dict[str, Any]] = []
    env = {**os.environ, procs.TAG_ENV: tag}
    for key, label, needs_torch in LOADERS:
        if (needs_torch and not have_torch) or (key.startswith("safetensors") and not have_safetensors):
            rows.append({"loader": key, "label": label, "skipped": "torch or safetensors not installed"})
            continue
        pair: list[subprocess.Popen[str]] = []
        times = []
        try:
            for _ in range(2):
                proc = subprocess.Popen(
                    [sys.executable, "-c", LOADER_CODE, str(path), str(pt_path), key],
                    cwd=ROOT,
                    env=env,
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    text=True,
                )
                started.append(proc)
                pair.append(proc)
                expect(proc, key, 1)
            before = [smaps(p.pid) for p in pair]
            for proc in pair:  # one after the other: the second finds the file in the page cache
                assert proc.stdin is not None
                proc.stdin.write("\n")
                proc.stdin.flush()
                times.append([float(x) for x in expect(proc, key, 2)])
            mems = [smaps(p.pid) for p in pair]
        finally:
            for proc in pair:
                with contextlib.suppress(OSError, ValueError, subprocess.SubprocessError):
                    proc.communicate("\n", timeout=30)
        pss = round(total(mems, "Pss") - total(before, "Pss"), 1)
        rows.append(
            {
                "loader": key,
                "label": label,
                "load_s": times[1][0],
                "load_and_touch_s": times[1][1],
                "rss_added_mb": [round(m["Rss"] - b["Rss"], 1) for m, b in zip(mems, before, strict=True)],
                "pss_sum_mb": pss,
                "pss_anon_sum_mb": round(total(mems, "Pss_Anon") - total(before, "Pss_Anon"), 1),
                "baseline_pss_sum_mb": total(before, "Pss"),
                "pss_sum_per_file": round(pss / size_mb, 2),
            }
        )
        log(f"loader {key}: 2 processes, PSS {pss:.0f} MB for a {size_mb:.0f} MB file")
    for p in (path, pt_path):
        p.unlink(missing_ok=True)
    return {"file": info, "rows": rows}


def expect(proc: subprocess.Popen[str], key: str, words: int) -> list[str]:
    """The loader's next line, of `words` words; BenchError when it died instead."""
    assert proc.stdout is not None
    line = proc.stdout.readline().split()
    if len(line) != words:
        raise procs.BenchError(f"loader {key} failed (exit {proc.wait(30)})")
    return line


def importable(module: str) -> bool:
    done = subprocess.run([sys.executable, "-c", f"import {module}"], capture_output=True, check=False)
    return done.returncode == 0


# Output -------------------------------------------------------------------------------------------


def fmt(v: Any, digits: int = 2) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def targets(results: dict[str, Any]) -> dict[str, dict[str, Any]]:
    found: dict[str, dict[str, Any]] = {}
    shared = next((v for v in results.get("replicas", []) if v["variant"] == "shared"), None)
    if shared and len(shared["steps"]) == 2:
        one, four = shared["steps"]
        found["pss_4_vs_1"] = report.at_most(four["total_pss_mb"] / one["total_pss_mb"], TARGET_PSS_RATIO)
        warm = [s["start_to_ready_s"] for s in four["starts"] if s["start_to_ready_s"] is not None]
        if warm:
            found["warm_replica_ready_s"] = report.at_most(max(warm), TARGET_WARM_READY_S, note=" s")
        scale = four["scale_only"]
        found["scale_only_ready_s"] = report.at_most(scale["all_ready_s"], TARGET_SCALE_READY_S, note=" s")
        found["scale_only_action"] = {"value": scale["action"], "target": "scaled", "met": scale["action"] == "scaled"}
        found["scale_only_revision_unchanged"] = holds(scale["revision_unchanged"])
        found["scale_only_first_pid_unchanged"] = holds(scale["first_pid_unchanged"])
    return found


def holds(value: bool) -> dict[str, Any]:
    return {"value": yes(value), "target": "yes", "met": value}


def yes(value: bool) -> str:
    return "yes" if value else "no"


NAMES = {
    "pss_4_vs_1": "shared: summed PSS, 4 replicas vs 1 (with the template)",
    "warm_replica_ready_s": "shared: a further replica, warm cache, started -> ready (slowest of 3), s",
    "scale_only_ready_s": "shared: autoscaling 1 -> 4 only: deploy call -> 4 replicas ready, s",
    "scale_only_action": "shared: autoscaling 1 -> 4 only: the deploy's action",
    "scale_only_revision_unchanged": "shared: autoscaling 1 -> 4 only: revision unchanged",
    "scale_only_first_pid_unchanged": "shared: autoscaling 1 -> 4 only: the first replica's pid unchanged",
}


def scale_only_lines(variants: list[dict[str, Any]]) -> list[str]:
    """One line per variant on the redeploy that raised only the autoscaling bounds, 1 -> 4."""
    lines = ["", "### Scale-only change: the autoscaling bounds alone raised from 1 to 4", ""]
    for v in variants:
        if len(v["steps"]) < 2:
            continue
        scale = v["steps"][1]["scale_only"]
        ready = f"{scale['all_ready_s']:.2f} s (target < {TARGET_SCALE_READY_S:g} s)"
        pid = f"{scale['first_pid_before']} -> {fmt(scale['first_pid_after'])}"
        revision = f"{scale['revision_before']} -> {scale['revision_after']}"
        lines.append(
            f"- {v['variant']}: 3 more replicas ready after a scale-only change: {ready}; "
            f"pid of the first replica unchanged: {yes(scale['first_pid_unchanged'])} ({pid}); "
            f"revision unchanged: {yes(scale['revision_unchanged'])} ({revision}); action `{scale['action']}`; "
            f"last ready report in daemon.log {fmt(scale['all_ready_log_s'])} s after the deploy call"
        )
    lines.append("")
    return lines


def markdown(results: dict[str, Any]) -> str:
    lines: list[str] = []
    model = results.get("model")
    if model:
        lines += [
            f"Model: {model['bytes'] / GB:.2f} GiB safetensors, {model['tensors']} float32 tensors of "
            f"{LAYER_SHAPE[0]}x{LAYER_SHAPE[1]}, generated in {model['write_s']:.1f} s "
            f"({model['with_fsync_s']:.1f} s with fsync) on {results.get('filesystem', '?')}.",
            "",
        ]
    variants = results.get("replicas", [])
    if variants:
        lines += [
            "### Memory of the replicas (PSS and RSS from /proc/PID/smaps_rollup, MB)",
            "",
            "| loading | replicas | replicas PSS | template PSS | total PSS | RSS per replica | PSS anon / file "
            "| vs 1 replica (total) |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for v in variants:
            base = v["steps"][0]["total_pss_mb"]
            for s in v["steps"]:
                lines.append(
                    f"| {v['variant']} | {s['replicas']} | {s['replicas_pss_mb']:.0f} | {s['template_pss_mb']:.0f} "
                    f"| {s['total_pss_mb']:.0f} | {fmt(s['rss_per_replica_mb'], 0)} | {s['pss_anon_mb']:.0f} / "
                    f"{s['pss_file_mb']:.0f} | {s['total_pss_mb'] / base:.2f}x |"
                )
            if v.get("skipped_4"):
                lines.append(f"| {v['variant']} | 4 | skipped: {v['skipped_4']} | | | | | |")
        lines += [
            "",
            "### Start (s): deploy -> all ready, and per replica its load (`__init__`) and started -> ready",
            "",
            "| loading | replicas | page cache | deploy -> all ready | template import | replica load | "
            "started -> ready | first request |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for v in variants:
            for s in v["steps"]:
                loads = ", ".join(fmt(x["load_s"]) for x in s["starts"])
                readies = ", ".join(fmt(x["start_to_ready_s"]) for x in s["starts"])
                lines.append(
                    f"| {v['variant']} | {s['replicas']} | {s['page_cache']} | {s['deploy_to_live_s']:.2f} "
                    f"| {fmt(s['template_import_s'])} | {loads} | {readies} | {s['first_request_s']:.3f} |"
                )
        lines += scale_only_lines(variants)
        notes = {v["drop_caches"] for v in variants if v.get("drop_caches")}
        lines += [f"Note: {n}" for n in sorted(notes)]
        lines.append("")
    loaders = results.get("loaders")
    if loaders:
        size = loaders["file"]["bytes"] / MB
        lines += [
            f"### Loaders: two plain processes load the same {size:.0f} MB file and read every value",
            "",
            "PSS added by the weights: both processes measured after their imports, then after loading "
            "(the second process finds the file in the page cache; its times are shown).",
            "",
            "| loader | load s | load + read all s | RSS added, each MB | summed PSS added MB (anon) "
            "| PSS added / file |",
            "|---|---|---|---|---|---|",
        ]
        for r in loaders["rows"]:
            if "skipped" in r:
                lines.append(f"| {r['label']} | skipped: {r['skipped']} | | | | |")
                continue
            rss = " / ".join(f"{x:.0f}" for x in r["rss_added_mb"])
            lines.append(
                f"| {r['label']} | {r['load_s']:.3f} | {r['load_and_touch_s']:.3f} | {rss} "
                f"| {r['pss_sum_mb']:.0f} ({r['pss_anon_sum_mb']:.0f}) | {r['pss_sum_per_file']:.2f} |"
            )
        lines.append("")
    found = targets(results)
    if found:
        lines += report.targets_table(found, NAMES)
    return "\n".join(lines)


# Running ------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--only", choices=["replicas", "loaders"], action="append", help="run only this part (repeatable)")
    ap.add_argument(
        "--variant", choices=VARIANTS, action="append", help="replicas part: only this loading (repeatable)"
    )
    ap.add_argument("--size-gb", type=float, default=2.0, help="size of the generated model (default 2)")
    ap.add_argument("--loader-mb", type=int, default=512, help="size of the loaders part's file (default 512)")
    ap.add_argument("--dir", type=Path, default=None, help="where to write the files (default: $TMPDIR)")
    ap.add_argument("--no-drop-caches", action="store_true", help="do not drop the page cache before a first deploy")
    ap.add_argument("--settle", type=float, default=1.0, help="seconds after a deploy before measuring (default 1)")
    ap.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for a deploy (default 300)")
    report.add_output_args(ap, report.LOGDIR / "models", "daemon.log and replica logs (default $TMPDIR/...)")
    args = ap.parse_args(argv)
    if args.size_gb <= 0 or args.loader_mb <= 0:
        ap.error("--size-gb and --loader-mb must be positive")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    parts = args.only or ["replicas", "loaders"]
    results: dict[str, Any] = {}
    started: list[subprocess.Popen[str]] = []
    t_start = time.monotonic()
    with (
        tempfile.TemporaryDirectory(prefix="cirrus-bench-models-", dir=args.dir) as tmp,
        procs.sigterm_as_interrupt(),
    ):
        workdir = Path(tmp)
        results["filesystem"] = filesystem_of(workdir)
        if results["filesystem"] in ("tmpfs", "ramfs"):
            log(f"{workdir} is on {results['filesystem']}: the file lives in memory; pass --dir on a disk")
        daemon = procs.Daemon("models", workdir, args.logdir, log)
        daemon_started = False
        try:
            if "replicas" in parts:
                weights = workdir / "model.safetensors"
                log(f"writing a {args.size_gb:g} GB model to {weights}")
                results["model"] = write_model(weights, int(args.size_gb * GB))
                log(f"written in {results['model']['write_s']} s ({results['model']['with_fsync_s']} s with fsync)")
                daemon_started = True
                daemon.start()
                results["replicas"] = [
                    run_variant(daemon, v, weights, workdir, args) for v in (args.variant or list(VARIANTS))
                ]
                weights.unlink()
            if "loaders" in parts:
                results["loaders"] = run_loaders(workdir, args, daemon.tag, started)
        finally:
            for proc in started:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
            if daemon_started and procs.stop_and_report(daemon, log, "models"):
                log(f"daemon and replicas stopped; logs in {args.logdir / 'models'}")
    results["run_s"] = round(time.monotonic() - t_start, 1)
    log(f"run took {results['run_s']} s; temporary files removed")
    versions = report.versions(("numpy", "torch", "safetensors"))
    return report.conclude(args, markdown(results), results, targets(results), versions, Targets(), log)


if __name__ == "__main__":
    procs.run_main(main)
