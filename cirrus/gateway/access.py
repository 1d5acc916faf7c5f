"""Access logs: one JSON line per request, for the APIs whose spec says `access_log: true`.

A `RequestRecord` is made only for a request that is logged or traced: it watches what the
gateway sends (status, bytes) and is told the replica's measurements, then becomes a JSON line
(`line()`) and, with OpenTelemetry configured, spans (cirrus/gateway/tracing.py).

`AccessLog` writes the lines off the event loop: `write` appends to a bounded in-memory queue, a
thread writes what has gathered every `FLUSH_EVERY_S` to `$CIRRUS_HOME/logs/access.log` (mode 0600),
rotated past `max_bytes` (`backups` older files kept: access.log.1, ...). Without one (an embedded
gateway), lines go to the `cirrus.access` logger.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import deque
from collections.abc import MutableMapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cirrus.predictor import encode_json
from cirrus.wire import InferResponse

access_logger = logging.getLogger("cirrus.access")
FLUSH_EVERY_S = 0.2
MAX_PENDING = 100_000  # lines waiting for the writer thread; past it the oldest are dropped (and counted)


@dataclass(slots=True, eq=False)
class RequestRecord:
    """What one logged or traced request did."""

    api: str
    method: str
    path: str
    client: str
    request_id: str
    traceparent: str  # the one the replica got: the gateway's span in the request's trace
    parent_span: str  # the client's span (from its valid traceparent), "" when the gateway started the trace
    started: float  # perf_counter at arrival
    started_ns: int  # wall clock at arrival
    status: int = 0
    sent_bytes: int = 0  # body bytes sent to the client
    replica: str = ""
    revision: str = ""
    queue_s: float | None = None  # None: it got no replica slot
    response: InferResponse | None = None  # the replica's answer (its measured stages)
    total_s: float = 0.0

    def wrap(self, send: Any) -> Any:
        """`send`, noting the status and the body's size on the way."""

        async def watched(message: MutableMapping[str, Any]) -> None:
            if message["type"] == "http.response.start":
                self.status = message["status"]
                for key, value in message["headers"]:
                    if key == b"x-request-id":  # (an async accept's is the queue's id, minted later)
                        self.request_id = value.decode("latin-1")
            elif message["type"] == "http.response.body":
                self.sent_bytes += len(message.get("body", b""))
            await send(message)

        return watched

    def stages_ms(self) -> dict[str, float]:
        """The stages that ran, in milliseconds (as in `Server-Timing`)."""
        stages: dict[str, float] = {}
        if self.queue_s is not None:
            stages["queue"] = round(self.queue_s * 1000, 3)
        response = self.response
        if response is not None:
            if response.pre_s:
                stages["pre_predict"] = round(response.pre_s * 1000, 3)
            if response.batch_size or response.stream:
                stages["slot_wait"] = round(response.slot_wait_s * 1000, 3)
            if response.batch_size:
                stages["predict"] = round(response.predict_s * 1000, 3)
        stages["total"] = round(self.total_s * 1000, 3)
        return stages

    def line(self) -> bytes:
        """The access log's JSON line (with its newline)."""
        seconds, ns = divmod(self.started_ns, 1_000_000_000)
        record = {
            "ts": f"{_utc_second(seconds)}.{ns // 1_000_000:03d}Z",
            "request_id": self.request_id,
            "api": self.api,
            "revision": self.revision,
            "replica": self.replica,
            "method": self.method,
            "path": self.path,
            "status": self.status,
            "bytes": self.sent_bytes,
            "timings_ms": self.stages_ms(),
            "batch_size": 0 if self.response is None else self.response.batch_size,
            "client": self.client,
            "trace_id": self.traceparent[3:35],
        }
        return encode_json(record) + b"\n"


_last_second: tuple[int, str] = (-1, "")


def _utc_second(seconds: int) -> str:
    """`seconds` (unix) as ISO 8601 UTC to the second, formatted once per second."""
    global _last_second
    if _last_second[0] != seconds:
        _last_second = (seconds, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)))
    return _last_second[1]


class AccessLog:
    """Writes access log lines from a thread, in batches, to a file it rotates."""

    def __init__(self, path: Path, max_bytes: int, backups: int = 3) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self.backups = backups
        self.dropped = 0
        self._pending: deque[bytes] = deque()
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._run, name="cirrus-access-log", daemon=True)
        self._thread.start()

    def write(self, line: bytes) -> None:
        if len(self._pending) >= MAX_PENDING:
            self.dropped += 1
            return
        self._pending.append(line)

    def close(self) -> None:
        self._closed.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        fd = -1  # opened at the first line: no file while no API logs
        try:
            while not self._closed.wait(FLUSH_EVERY_S):
                fd = self._flush(fd)
            fd = self._flush(fd)
        finally:
            if fd >= 0:
                os.close(fd)

    def _open(self) -> int:
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        os.fchmod(fd, 0o600)
        return fd

    def _flush(self, fd: int) -> int:
        """Write what has gathered; rotate first when the file is past its size. The open file."""
        pending = self._pending
        parts = []
        while pending:
            parts.append(pending.popleft())  # (deque: safe against the loop's appends)
        if not parts:
            return fd
        try:
            if fd < 0:
                fd = self._open()
            elif os.fstat(fd).st_size >= self.max_bytes:
                fd = self._rotate(fd)
            os.write(fd, b"".join(parts))
        except OSError as exc:
            access_logger.warning("writing the access log %s failed: %s", self.path, exc)
        return fd

    def _rotate(self, fd: int) -> int:
        os.close(fd)
        for index in range(self.backups - 1, 0, -1):
            older = self.path.with_name(f"{self.path.name}.{index}")
            if older.exists():
                older.replace(self.path.with_name(f"{self.path.name}.{index + 1}"))
        self.path.replace(self.path.with_name(f"{self.path.name}.1"))
        return self._open()


def log_line(line: bytes) -> None:
    """Where access lines go without an `AccessLog`: the `cirrus.access` logger."""
    access_logger.info("%s", line.decode().rstrip("\n"))
