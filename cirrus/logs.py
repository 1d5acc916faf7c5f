"""Reading replica log files (the local runtime's): tails, and following them as they grow."""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections import deque
from collections.abc import AsyncIterator
from pathlib import Path

TAIL_READ_BYTES = 1 << 20  # a tail reads at most this much of the end of a file
FOLLOW_POLL_S = 0.25


def tail_lines(path: Path, count: int) -> list[str]:
    """The last `count` lines of a file (reads at most its last 1 MiB)."""
    if count <= 0:
        return []
    try:
        with path.open("rb") as handle:
            handle.seek(0, os.SEEK_END)
            size = handle.tell()
            handle.seek(max(0, size - TAIL_READ_BYTES))
            data = handle.read()
    except OSError:
        return []
    return list(deque(data.decode("utf-8", "replace").splitlines(), maxlen=count))


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


def log_files(logs_dir: Path, api: str) -> list[Path]:
    """An API's replica logs, oldest first (its templates' logs are not among them)."""
    folder = logs_dir / api
    if not folder.is_dir():
        return []
    return sorted(folder.glob("*.log"), key=_mtime)


def replica_log_files(logs_dir: Path, api: str | None, replica_id: str | None) -> list[Path]:
    """The logs of one replica of `api`, or of all of them (`replica_id` None), or of every API's
    replicas (`api` None too); each API's oldest first."""
    if api is not None and replica_id is not None:
        path = logs_dir / api / f"{replica_id}.log"
        return [path] if path.is_file() else []
    apis = [api] if api is not None else sorted(p.name for p in logs_dir.glob("*") if p.is_dir())
    files = [path for name in apis for path in log_files(logs_dir, name)]
    return files if replica_id is None else [path for path in files if path.stem == replica_id]


def _tail_to_end(path: Path, count: int) -> tuple[list[str], int]:
    """The last `count` complete lines of a file and the offset just past them (a line still
    being written is left for the follower)."""
    try:
        with path.open("rb") as handle:
            handle.seek(0, os.SEEK_END)
            size = handle.tell()
            start = max(0, size - TAIL_READ_BYTES)
            handle.seek(start)
            data = handle.read(size - start)
    except OSError:
        return [], 0
    complete = data.rfind(b"\n") + 1
    body = data[:complete]
    if start > 0:  # the read began inside a line
        body = body[body.find(b"\n") + 1 :]
    lines = body.decode("utf-8", "replace").splitlines()
    return (lines[-count:] if count > 0 else []), start + complete


def _line(path: Path, text: str) -> bytes:
    return f"[{path.stem}] {text}\n".encode()


async def read_logs(
    logs_dir: Path,
    api: str | None,
    replica_id: str | None,
    lines: int,
    follow: bool,
    poll_s: float = FOLLOW_POLL_S,
) -> AsyncIterator[bytes]:
    """The newest `lines` lines of the chosen replica logs (`replica_log_files`), then, when
    `follow`, every new line as it is written (polled every `poll_s`), each as `[replica-id] text`.

    The newest lines are counted over all the chosen files together, taken file by file, oldest
    file first. Following never ends on its own: the caller stops iterating."""
    offsets: dict[Path, int] = {}
    tail: list[bytes] = []
    for path in replica_log_files(logs_dir, api, replica_id):
        if follow:
            texts, offsets[path] = _tail_to_end(path, lines)
        else:
            texts = tail_lines(path, lines)
        tail.extend(_line(path, text) for text in texts)
    for chunk in tail[-lines:] if lines > 0 else []:
        yield chunk
    if not follow:
        return
    while True:
        await asyncio.sleep(poll_s)
        for path in replica_log_files(logs_dir, api, replica_id):
            for text in _read_new(path, offsets):
                yield _line(path, text)


def _read_new(path: Path, offsets: dict[Path, int]) -> list[str]:
    """Complete lines written to `path` since `offsets[path]` (a file new to `offsets` is read from
    its start; one that shrank, from its start again); advances the offset past them."""
    start = offsets.get(path, 0)
    data = b""
    with contextlib.suppress(OSError), path.open("rb") as handle:
        size = handle.seek(0, os.SEEK_END)
        if size < start:  # truncated or replaced
            start = 0
        if size > start:
            handle.seek(start)
            data = handle.read(size - start)
    complete = data.rfind(b"\n") + 1
    offsets[path] = start + complete
    return data[:complete].decode("utf-8", "replace").splitlines()


def follow_logs(logs_dir: Path, api: str | None, lines: int, poll_s: float = FOLLOW_POLL_S) -> AsyncIterator[bytes]:
    """`read_logs` of every replica of `api` (of every API when None), following.

    Kept for the admin API and the daemon until they read logs through `Runtime.logs`."""
    return read_logs(logs_dir, api, None, lines, True, poll_s)
