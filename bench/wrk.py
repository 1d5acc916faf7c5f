"""Load from wrk: one closed-loop POST run, its parsed output and the CPU spent around it.

Shared by the scripts in bench/. A run is ``wrk -t1 -cN -dDs --latency`` with a Lua script that
POSTs one JSON body; besides wrk's figures it records the CPU of the server's process tree, of wrk
and of the rest of the machine ("other": noise from unrelated processes), all from /proc.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from procs import BenchError, CpuWindow, Tree, cmdline

UNIT_MS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 6e4}


def find_wrk() -> str | None:
    """The wrk binary; None (and the way to install it, on stderr) when it is missing."""
    binary = shutil.which("wrk")
    if binary is None:
        print("error: wrk is not installed; install it with `apt-get install wrk` (Debian/Ubuntu)", file=sys.stderr)
    return binary


def parse_conns(text: str) -> list[int]:
    """`--conns 1,16,64`: comma-separated positive integers."""
    try:
        conns = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--conns wants comma-separated integers, not {text!r}") from None
    if not conns or min(conns) < 1:
        raise argparse.ArgumentTypeError("--conns wants positive integers")
    return conns


def add_load_args(
    ap: argparse.ArgumentParser,
    conns: int | list[int],
    duration_s: int,
    warmup_s: int,
    warmup_what: str,
    first_answer: str | None = None,
) -> None:
    """--conns (one count when `conns` is an int, else a list), --duration and --warmup; with
    `first_answer` (the status that counts as ready) also --settle and --ready-timeout."""
    shown = str(conns) if isinstance(conns, int) else ",".join(str(c) for c in conns)
    conns_type = int if isinstance(conns, int) else parse_conns
    ap.add_argument("--conns", type=conns_type, default=conns, help=f"wrk connections (default {shown})")
    ap.add_argument("--duration", type=int, default=duration_s, help=f"seconds per wrk run (default {duration_s})")
    ap.add_argument("--warmup", type=int, default=warmup_s, help=f"warm-up seconds {warmup_what} (default {warmup_s})")
    if first_answer is not None:
        ap.add_argument(
            "--settle", type=float, default=2.0, help=f"seconds to wait after the first {first_answer} (default 2)"
        )
        ap.add_argument(
            "--ready-timeout", type=float, default=60.0, help=f"seconds to wait for the first {first_answer}"
        )


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


@dataclass(frozen=True)
class Wrk:
    """The wrk binary and the Lua script that makes each request a POST of one JSON body."""

    binary: str
    lua: str

    @classmethod
    def posting(cls, binary: str, directory: Path, body: str) -> Wrk:
        path = directory / "post.lua"
        path.write_text(
            f'wrk.method = "POST"\nwrk.body = {json.dumps(body)}\nwrk.headers["Content-Type"] = "application/json"\n'
        )
        return cls(binary, str(path))

    def run(self, url: str, conns: int, duration_s: int, tree: Tree) -> dict[str, Any]:
        """One wrk run; adds the server tree's, wrk's and the rest of the machine's CPU over it."""
        window = CpuWindow(tree)
        cmd = [self.binary, "-t1", f"-c{conns}", f"-d{duration_s}s", "--latency", "--timeout", "10s"]
        cmd += ["-s", self.lua, url]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=duration_s + 60, check=False)
        cpu = window.stop()
        res = parse_wrk(done.stdout)
        if res["rps"] is None:
            raise BenchError(f"wrk gave no result (exit {done.returncode}): {(done.stdout + done.stderr)[-500:]}")
        requests = res["requests"] or 0
        # CPU percentages are of one core; "other" = machine busy time used by neither the server, wrk nor
        # this script (noise from unrelated processes, plus loopback softirq).
        res.update(
            conns=conns,
            duration_s=duration_s,
            server_cpu_pct=cpu.pct(cpu.tree_s),
            server_cpu_us_per_req=round(1e6 * cpu.tree_s / requests, 1) if requests else None,
            wrk_cpu_pct=cpu.pct(cpu.children_s),
            other_cpu_pct=cpu.pct(cpu.other_s),
            server_procs=len(cpu.tree_by_pid),
            server_cpu_pct_by_proc={f"{pid} {cmdline(pid)}": cpu.pct(c) for pid, c in cpu.tree_by_pid.items()},
        )
        return res

    def version(self) -> str | None:
        try:
            done = subprocess.run([self.binary, "--version"], capture_output=True, text=True, timeout=5, check=False)
        except (OSError, subprocess.SubprocessError):
            return None
        return (done.stdout + done.stderr).split("[")[0].strip()
