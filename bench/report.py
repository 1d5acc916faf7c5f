"""What a benchmark prints and saves: target checks, markdown rows, and the ``--json`` file.

Shared by the scripts in bench/. A target check is ``{"value", "target", "met"}``; the ``--json``
file starts with the same metadata everywhere (date, host, CPUs, versions, git commit, arguments).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import subprocess
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any

from procs import ROOT, Log
from wrk import Wrk

LOGDIR = Path(tempfile.gettempdir()) / "cirrus-bench-logs"  # --logdir's default, below which each script writes


def fmt_ms(v: float | None) -> str:
    if v is None:
        return "-"
    return f"{v:.3f}" if v < 1 else f"{v:.2f}" if v < 10 else f"{v:.1f}"


def at_least(value: float, bound: float, digits: int = 3, note: str = "") -> dict[str, Any]:
    """A target met when value >= bound."""
    return {"value": round(value, digits), "target": f">= {bound:g}{note}", "met": value >= bound}


def at_most(value: float, bound: float, digits: int = 3, note: str = "") -> dict[str, Any]:
    """A target met when value <= bound."""
    return {"value": round(value, digits), "target": f"<= {bound:g}{note}", "met": value <= bound}


def targets_table(found: Mapping[str, Mapping[str, Any]], names: Mapping[str, str] | None = None) -> list[str]:
    """Markdown rows: one per target check, named by `names` (default: its key)."""
    lines = ["| ratio | value | target | met |", "|---|---|---|---|"]
    for key, item in found.items():
        name = names[key] if names else key
        lines.append(f"| {name} | {item['value']} | {item['target']} | {'yes' if item['met'] else 'NO'} |")
    return lines


def all_met(found: Mapping[str, Mapping[str, Any]]) -> bool:
    return all(item["met"] for item in found.values())


def add_output_args(
    ap: argparse.ArgumentParser, logdir: Path = LOGDIR, logdir_help: str = "server output", check: bool = True
) -> None:
    """--json OUT, --logdir DIR and (with `check`) --check."""
    ap.add_argument("--json", type=Path, metavar="OUT", help="write the raw numbers here")
    ap.add_argument("--logdir", type=Path, default=logdir, help=logdir_help)
    if check:
        ap.add_argument("--check", action="store_true", help="exit 1 when a target is missed")


def versions(modules: Iterable[str], wrk: Wrk | None = None) -> dict[str, str]:
    out = {"python": platform.python_version()}
    for mod in modules:
        with contextlib.suppress(Exception):
            out[mod] = __import__(mod).__version__
    if wrk is not None and (version := wrk.version()) is not None:
        out["wrk"] = version
    return out


def git_describe() -> str | None:
    """The commit the Cirrus code was measured at, with `-dirty` when the working tree has changes."""
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        done = subprocess.run(
            ["git", "describe", "--always", "--dirty"], cwd=ROOT, capture_output=True, text=True, timeout=5, check=False
        )
        return done.stdout.strip() or None
    return None


def write_json(
    path: Path,
    args: argparse.Namespace,
    results: Mapping[str, Any],
    versions: dict[str, str] | None = None,
    targets: Any = None,
    log: Log | None = None,
) -> None:
    """The run's metadata (and `versions`, `targets`: a dataclass of the target values), then `results`."""
    meta: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "host": platform.node(),
        "cpus": os.cpu_count(),
    }
    if versions is not None:
        meta["versions"] = versions
    meta["git"] = git_describe()
    meta["args"] = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    if targets is not None:
        meta["targets"] = asdict(targets)
    path.write_text(json.dumps({**meta, **results}, indent=2) + "\n")
    if log is not None:
        log(f"raw numbers written to {path}")


def conclude(
    args: argparse.Namespace,
    text: str,
    results: Mapping[str, Any],
    found: Mapping[str, Mapping[str, Any]],
    versions: dict[str, str],
    targets: Any,
    log: Log,
) -> int:
    """The end of a run: print `text`; with --json, write `results` and the target checks `found`; the exit
    status (1 with --check when a target is missed)."""
    print(text)
    if args.json:
        write_json(args.json, args, {**results, "targets": found}, versions=versions, targets=targets, log=log)
    return 1 if getattr(args, "check", False) and not all_met(found) else 0
