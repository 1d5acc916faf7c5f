"""Replica log files (the local runtime's): tails, following them as they grow, and rotation.

Log files are written by other processes through descriptors opened with O_APPEND (a replica's
stdout and stderr, the daemon's when `cirrus up` started it), so they are rotated by copying their
tail to `<name>.1` and truncating them in place (`rotate`): every writer goes on at the new end.
Reading happens in a thread (`read_logs`), never on the event loop.
"""

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
    tail = await asyncio.to_thread(read_tails, logs_dir, api, replica_id, lines, offsets if follow else None)
    for chunk in tail[-lines:] if lines > 0 else []:
        yield chunk
    if not follow:
        return
    while True:
        await asyncio.sleep(poll_s)
        for chunk in await asyncio.to_thread(read_all_new, logs_dir, api, replica_id, offsets):
            yield chunk


def read_tails(
    logs_dir: Path, api: str | None, replica_id: str | None, lines: int, offsets: dict[Path, int] | None
) -> list[bytes]:
    """The last `lines` lines of each chosen file; with `offsets` (following), where each tail ends."""
    tail: list[bytes] = []
    for path in replica_log_files(logs_dir, api, replica_id):
        if offsets is not None:
            texts, offsets[path] = _tail_to_end(path, lines)
        else:
            texts = tail_lines(path, lines)
        tail.extend(_line(path, text) for text in texts)
    return tail


def read_all_new(logs_dir: Path, api: str | None, replica_id: str | None, offsets: dict[Path, int]) -> list[bytes]:
    return [
        _line(path, text) for path in replica_log_files(logs_dir, api, replica_id) for text in _read_new(path, offsets)
    ]


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


ROTATED_SUFFIX = ".1"


def rotated_path(path: Path) -> Path:
    return path.with_name(path.name + ROTATED_SUFFIX)


def rotate(path: Path, max_bytes: int) -> bool:
    """If `path` is over `max_bytes`: its last `max_bytes` (from a line's start) replace `<path>.1`,
    and `path` is truncated to nothing. True when it was rotated.

    For files written through O_APPEND descriptors of other processes: they write on at the new end.
    What is written between the copy and the truncation is lost (a few lines at most)."""
    try:
        size = path.stat().st_size
        if size <= max_bytes:
            return False
        with path.open("rb") as source:
            source.seek(size - max_bytes)
            data = source.read(max_bytes)
        newline = data.find(b"\n")
        if 0 <= newline < len(data) - 1:
            data = data[newline + 1 :]
        partial = path.with_name(path.name + ROTATED_SUFFIX + ".partial")
        fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as target:
            target.write(data)
        os.replace(partial, rotated_path(path))
        os.truncate(path, 0)
    except FileNotFoundError:
        return False
    return True


def rotate_all(paths: list[Path], max_bytes: int) -> list[Path]:
    """`rotate` each of `paths`; those rotated."""
    return [path for path in paths if rotate(path, max_bytes)]
