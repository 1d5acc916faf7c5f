"""Reading replica log files: tails, and following them as they grow."""

from __future__ import annotations

import asyncio
import os
from collections import deque
from collections.abc import AsyncIterator
from pathlib import Path


def tail_lines(path: Path, count: int) -> list[str]:
    """The last `count` lines of a file (reads at most its last 1 MiB)."""
    if count <= 0:
        return []
    try:
        with path.open("rb") as handle:
            handle.seek(0, os.SEEK_END)
            size = handle.tell()
            handle.seek(max(0, size - (1 << 20)))
            data = handle.read()
    except OSError:
        return []
    return list(deque(data.decode("utf-8", "replace").splitlines(), maxlen=count))


def log_files(logs_dir: Path, api: str) -> list[Path]:
    """An API's replica logs, oldest first."""
    folder = logs_dir / api
    if not folder.is_dir():
        return []
    return sorted(folder.glob("*.log"), key=lambda p: p.stat().st_mtime)


async def follow_logs(logs_dir: Path, api: str | None, lines: int, poll_s: float = 0.25) -> AsyncIterator[bytes]:
    """The last `lines` lines of each log, then every new line as it is written, as
    `[replica-id] text` (`api=None` follows every API)."""
    offsets: dict[Path, int] = {}

    def files() -> list[Path]:
        if api is not None:
            return log_files(logs_dir, api)
        return [f for folder in sorted(logs_dir.glob("*")) for f in log_files(logs_dir, folder.name)]

    for path in files():
        for line in tail_lines(path, lines):
            yield f"[{path.stem}] {line}\n".encode()
        offsets[path] = path.stat().st_size
    while True:
        await asyncio.sleep(poll_s)
        for path in files():
            start = offsets.get(path, 0)
            size = path.stat().st_size
            if size <= start:
                continue
            with path.open("rb") as handle:
                handle.seek(start)
                data = handle.read(size - start)
            complete = data.rfind(b"\n") + 1
            offsets[path] = start + complete
            for line in data[:complete].decode("utf-8", "replace").splitlines():
                yield f"[{path.stem}] {line}\n".encode()
