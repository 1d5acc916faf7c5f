"""Task processes this daemon may not have started (Linux /proc): is the process recorded for an
attempt still that very process (pid + its start time + the boot), and stopping it and whatever it
left behind in its process group, so that an attempt is never run while an older one still lives.

A task replica runs in a session (and process group) of its own, whose id is its pid; the command a
command task runs is in that group too. A pid is never reused while a process group of that id
exists, and members that started before the leader cannot belong to its attempt, so the group's
members that started no earlier than the leader are the attempt's own processes.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import time
from pathlib import Path

from cirrus.tasks import Outcome, boot_id, parse_outcome, proc_stat

MAX_RECORD_BYTES = 64 * 1024  # a result or pid file larger than this is not one


def same_process(pid: int | None, start: int | None, boot: str | None) -> bool:
    """Whether `pid` still runs and is the process that started at `start` in boot `boot` (a zombie
    is gone)."""
    if pid is None or start is None or boot is None or boot != boot_id():
        return False
    stat = proc_stat(pid)
    return stat is not None and stat.start == start and stat.state not in ("Z", "X")


def group_members(pgid: int, not_before: int) -> list[int]:
    """Live processes of process group `pgid` that started at `not_before` or later."""
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        stat = proc_stat(int(entry.name))
        if stat is not None and stat.pgid == pgid and stat.start >= not_before and stat.state not in ("Z", "X"):
            members.append(int(entry.name))
    return members


def signal_attempt(pid: int, start: int, boot: str | None, sig: int) -> int:
    """Send `sig` to what is left of the attempt whose replica was `pid` started at `start`: the
    group's members of this boot that started with it or later. Returns how many got it."""
    if boot is None or boot != boot_id():
        return 0  # the machine restarted: nothing of the attempt is left
    sent = 0
    for member in group_members(pid, start):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(member, sig)
            sent += 1
    return sent


def end_attempt(pid: int | None, start: int | None, boot: str | None, grace_s: float) -> bool:
    """SIGTERM what is left of an attempt, SIGKILL it after `grace_s`, and wait until it is gone
    (blocking: run in a thread). True when it is gone."""
    if pid is None or start is None:
        return True
    if not signal_attempt(pid, start, boot, signal.SIGTERM):
        return True
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        if not group_members(pid, start):
            return True
        time.sleep(0.05)
    signal_attempt(pid, start, boot, signal.SIGKILL)
    deadline = time.monotonic() + 5.0
    while time.monotonic() < deadline:
        if not group_members(pid, start):
            return True
        time.sleep(0.05)
    return False


def attempt_state_path(results_dir: Path, run_id: str, attempt: int) -> Path:
    """Where an attempt's replica records itself: `<this>.pid` at its start, `<this>.json` at its end."""
    return results_dir / f"{run_id}-{attempt}"


def read_pid_file(state: Path) -> tuple[int, int, str | None] | None:
    """(pid, start, boot id) the attempt's replica recorded when it started; None: none (yet)."""
    data = _read_json(state.with_suffix(".pid"))
    if not isinstance(data, dict):
        return None
    pid, start, boot = data.get("pid"), data.get("start"), data.get("boot_id")
    if not isinstance(pid, int) or not isinstance(start, int):
        return None
    return pid, start, boot if isinstance(boot, str) else None


def read_outcome(state: Path) -> Outcome | None:
    """The outcome the attempt's replica wrote when it ended; None: it wrote none."""
    return parse_outcome(_read_json(state.with_suffix(".json")))


def _read_json(path: Path) -> object:
    try:
        with path.open("rb") as handle:
            data = handle.read(MAX_RECORD_BYTES + 1)
    except OSError:
        return None
    if len(data) > MAX_RECORD_BYTES:
        return None
    try:
        return json.loads(data)
    except ValueError:
        return None


def remove_state(state: Path) -> None:
    for suffix in (".pid", ".json"):
        with contextlib.suppress(OSError):
            state.with_suffix(suffix).unlink()
