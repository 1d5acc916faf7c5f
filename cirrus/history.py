"""The dashboard's history: every API sampled every 2 s, kept in `$CIRRUS_HOME/history.db`.

`History.record(readings, now)` turns what the daemon read of each API (cumulative counters and
histograms, gauges, the controller's view) into one point per API: rates from the counters' deltas
since the last reading, latency percentiles from the delta of the gateway's latency histogram, and
gauges as read. It also notes events: scale changes (with the autoscaler's reason), new replica
errors, deploys (a new revision) and cold starts. `series(api, since, until)` and `events(api, since)`
read them back for the page.

Bounded: the last hour is kept at 2 s resolution, the last 24 hours at 1 minute (minutes are
coarsened from the 2 s points as they complete), the newest `MAX_EVENTS_PER_API` events of the last
24 hours, and at most `MAX_APIS` APIs sampled. One SQLite file, WAL, mode 0600; one transaction per
sampling pass. The last reading of each API is stored too, so a restarted daemon neither repeats an
event nor misses a change across the restart.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cirrus.control.statedb import BUSY_TIMEOUT_S, connect_private

if TYPE_CHECKING:
    from cirrus.control.controller import Controller
    from cirrus.gateway.app import Gateway

log = logging.getLogger("cirrus.history")

SAMPLE_EVERY_S = 2.0
FINE_S = 2  # resolution of the recent points
COARSE_S = 60  # resolution of the older points
FINE_KEEP_S = 3600 + 120  # at least the last hour at 2 s
COARSE_KEEP_S = 24 * 3600
MAX_APIS = 200  # APIs sampled per pass (the first by name); bounds the file with the retention above
MAX_EVENTS_PER_API = 1000
MAX_MESSAGE_CHARS = 500
MAX_GAP_S = 20.0  # readings further apart give no rates (a gap in the charts: the daemon was down)
MAX_LOOP_SHARE = 0.02  # of the event loop's time that reading the APIs may take
MAINTAIN_EVERY_S = 60.0  # coarsening and deleting old rows

SERIES = (
    "rps_2xx",
    "rps_4xx",
    "rps_5xx",
    "p50_ms",
    "p90_ms",
    "p99_ms",
    "in_flight",
    "queued",
    "replicas_ready",
    "replicas_desired",
    "batch_size_mean",
    "slot_wait_ms",
    "predict_ms",
    "cold_starts",
    "backlog_in_queue",
    "backlog_in_progress",
)
# How a minute's 2 s points become one point: cold starts add up, p99 keeps the worst, the rest average.
_COARSEN = {name: "SUM" if name == "cold_starts" else "MAX" if name == "p99_ms" else "AVG" for name in SERIES}

_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS points (
    api TEXT NOT NULL, t REAL NOT NULL, resolution INTEGER NOT NULL,
    {", ".join(f"{name} REAL" for name in SERIES)}
);
CREATE INDEX IF NOT EXISTS points_by_api ON points (api, resolution, t);
CREATE INDEX IF NOT EXISTS points_by_time ON points (resolution, t);
CREATE TABLE IF NOT EXISTS events (
    api TEXT NOT NULL, t REAL NOT NULL, kind TEXT NOT NULL, message TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS events_by_api ON events (api, t);
CREATE TABLE IF NOT EXISTS last_reading (api TEXT PRIMARY KEY, reading TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value REAL NOT NULL);
"""


@dataclass
class Reading:
    """What the daemon read of one API at one moment. Counters and histograms are cumulative (since the
    gateway started: a smaller value than the last reading's is a reset, as after a restart)."""

    api: str
    revision: int = 0
    answers: dict[str, int] = field(default_factory=dict)  # "2xx" | "4xx" | "5xx" -> answers so far
    latency_counts: list[int] = field(default_factory=list)  # the gateway's latency histogram, so far
    latency_bounds: list[float] = field(default_factory=list)  # its buckets' upper bounds, in seconds
    in_flight: int = 0
    queued: int = 0
    replicas_ready: int = 0
    replicas_desired: int = 0
    batch_size_mean: float | None = None
    slot_wait_ms: float | None = None
    predict_ms: float | None = None
    cold_starts: int = 0
    last_cold_start_s: float | None = None
    backlog_in_queue: int | None = None
    backlog_in_progress: int | None = None
    autoscaler: str | None = None
    replica_errors: dict[str, str] = field(default_factory=dict)  # replica id -> its last error
    t: float = 0.0  # when it was read (set by `record`)


def status_class(code: int) -> str | None:
    """The answer class a status code counts in ("2xx", "4xx", "5xx"); 1xx and 3xx count as 2xx."""
    if code >= 500:
        return "5xx"
    if code >= 400:
        return "4xx"
    return "2xx" if code >= 100 else None


def _delta(now: int, before: int) -> int:
    return now if now < before else now - before  # a counter that went down was reset


def quantile_ms(counts: Sequence[int], bounds: Sequence[float], q: float) -> float | None:
    """The q-quantile of a bucketed histogram in ms: the upper bound of the bucket it falls in (the
    last, open bucket answers its lower bound)."""
    total = sum(counts)
    if total <= 0 or not bounds:
        return None
    rank, seen = max(1, math.ceil(q * total)), 0
    for index, count in enumerate(counts):
        seen += count
        if seen >= rank:
            return round(bounds[min(index, len(bounds) - 1)] * 1000, 3)
    return None


def point(reading: Reading, before: Reading | None) -> dict[str, float | None]:
    """One chart point of `reading`: rates and percentiles over the time since `before` (None when
    there is no reading before it, or it is older than MAX_GAP_S), gauges as read."""
    values: dict[str, float | None] = {
        "in_flight": reading.in_flight,
        "queued": reading.queued,
        "replicas_ready": reading.replicas_ready,
        "replicas_desired": reading.replicas_desired,
        "batch_size_mean": reading.batch_size_mean,
        "slot_wait_ms": reading.slot_wait_ms,
        "predict_ms": reading.predict_ms,
        "backlog_in_queue": reading.backlog_in_queue,
        "backlog_in_progress": reading.backlog_in_progress,
    }
    elapsed = None if before is None else reading.t - before.t
    if before is None or elapsed is None or not 0 < elapsed <= MAX_GAP_S:
        return values | dict.fromkeys(("rps_2xx", "rps_4xx", "rps_5xx", "p50_ms", "p90_ms", "p99_ms", "cold_starts"))
    for name in ("2xx", "4xx", "5xx"):
        values[f"rps_{name}"] = round(_delta(reading.answers.get(name, 0), before.answers.get(name, 0)) / elapsed, 3)
    counts = reading.latency_counts
    if (
        before.latency_counts
        and len(before.latency_counts) == len(counts)
        and all(a >= b for a, b in zip(counts, before.latency_counts, strict=True))
    ):
        counts = [a - b for a, b in zip(counts, before.latency_counts, strict=True)]
    for q in (50, 90, 99):
        values[f"p{q}_ms"] = quantile_ms(counts, reading.latency_bounds, q / 100)
    values["cold_starts"] = _delta(reading.cold_starts, before.cold_starts)
    return values


def changes(reading: Reading, before: Reading | None) -> list[tuple[str, str]]:
    """The events between two readings of an API: (kind, message) with kind scale | error | deploy | cold_start.
    With no reading before (a new API), its revision and the replicas' errors are new."""
    events: list[tuple[str, str]] = []
    if before is None:
        events.append(("deploy", f"revision {reading.revision}"))
    elif reading.revision != before.revision:
        events.append(("deploy", f"revision {before.revision} -> {reading.revision}"))
    if before is not None and reading.replicas_desired != before.replicas_desired:
        why = f": {reading.autoscaler}" if reading.autoscaler else ""
        events.append(("scale", f"replicas {before.replicas_desired} -> {reading.replicas_desired}{why}"))
    seen = {} if before is None else before.replica_errors
    for replica, error in sorted(reading.replica_errors.items()):
        if seen.get(replica) != error:
            events.append(("error", f"[{replica}] {error}"))
    if before is not None and reading.cold_starts > before.cold_starts:
        took = "" if reading.last_cold_start_s is None else f" ({reading.last_cold_start_s:g} s to the first replica)"
        events.append(("cold_start", f"cold start{took}"))
    return [(kind, message[:MAX_MESSAGE_CHARS]) for kind, message in events]


def _open(path: Path | str) -> sqlite3.Connection:
    """The history database, private to its owner, with its tables."""
    db = connect_private(path, BUSY_TIMEOUT_S)
    try:
        db.executescript(_SCHEMA)
    except sqlite3.DatabaseError:
        db.close()
        raise
    return db


class History:
    """The history store: one SQLite connection, used from any thread (one lock)."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        try:
            self._db = _open(path)
        except sqlite3.DatabaseError:  # not a database, or damaged: history is disposable
            log.warning("the history database %s is damaged; starting a new one", self.path)
            for suffix in ("", "-wal", "-shm"):
                Path(f"{self.path}{suffix}").unlink(missing_ok=True)
            self._db = _open(path)
        self._last: dict[str, Reading] = {}
        for api, text in self._db.execute("SELECT api, reading FROM last_reading"):
            try:
                self._last[api] = Reading(**json.loads(text))
            except (TypeError, ValueError):
                continue
        row = self._db.execute("SELECT value FROM meta WHERE key = 'maintained_at'").fetchone()
        self._maintained_at = float(row[0]) if row else 0.0

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def record(self, readings: Sequence[Reading], now: float) -> None:
        """Store one point (and the events) per reading taken at `now`, in one transaction; coarsen
        completed minutes and delete old rows about once a minute."""
        readings = list(readings)[:MAX_APIS]
        rows: list[tuple[Any, ...]] = []
        events: list[tuple[str, float, str, str]] = []
        for reading in readings:
            reading.t = now
            before = self._last.get(reading.api)
            # An API not seen before is new (a restarted daemon remembers the others): it started from zero.
            values = point(reading, before or Reading(reading.api, t=now - FINE_S))
            rows.append((reading.api, now, FINE_S, *(values[name] for name in SERIES)))
            events.extend((reading.api, now, kind, message) for kind, message in changes(reading, before))
        columns = ", ".join(SERIES)
        marks = ", ".join("?" * (len(SERIES) + 3))
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.executemany(f"INSERT INTO points (api, t, resolution, {columns}) VALUES ({marks})", rows)
                self._db.executemany("INSERT INTO events (api, t, kind, message) VALUES (?, ?, ?, ?)", events)
                self._db.executemany(
                    "INSERT OR REPLACE INTO last_reading (api, reading) VALUES (?, ?)",
                    [(r.api, json.dumps(asdict(r))) for r in readings],
                )
                if now - self._maintained_at >= MAINTAIN_EVERY_S or now < self._maintained_at:
                    self._maintain(now)
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")
        self._last.update((r.api, r) for r in readings)

    def _maintain(self, now: float) -> None:
        """Coarsen the 2 s points of completed minutes not yet coarsened; delete what is past keeping."""
        minute = int(now // COARSE_S) * COARSE_S
        row = self._db.execute("SELECT value FROM meta WHERE key = 'coarsened_until'").fetchone()
        since = float(row[0]) if row else 0.0
        aggregates = ", ".join(f"{how}({name})" for name, how in _COARSEN.items())
        self._db.execute(
            f"INSERT INTO points (api, t, resolution, {', '.join(SERIES)}) "
            f"SELECT api, CAST(t / {COARSE_S} AS INTEGER) * {COARSE_S}, {COARSE_S}, {aggregates} FROM points "
            f"WHERE resolution = {FINE_S} AND t >= ? AND t < ? GROUP BY api, CAST(t / {COARSE_S} AS INTEGER)",
            (since, minute),
        )
        self._db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('coarsened_until', ?)", (minute,))
        self._db.execute("DELETE FROM points WHERE resolution = ? AND t < ?", (FINE_S, now - FINE_KEEP_S))
        self._db.execute("DELETE FROM points WHERE t < ?", (now - COARSE_KEEP_S,))
        self._db.execute("DELETE FROM events WHERE t < ?", (now - COARSE_KEEP_S,))
        self._db.execute(
            "DELETE FROM events WHERE rowid IN (SELECT rowid FROM (SELECT rowid, ROW_NUMBER() OVER "
            "(PARTITION BY api ORDER BY t DESC, rowid DESC) AS n FROM events) WHERE n > ?)",
            (MAX_EVENTS_PER_API,),
        )
        self._db.execute("DELETE FROM last_reading WHERE api NOT IN (SELECT DISTINCT api FROM points)")
        self._db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('maintained_at', ?)", (now,))
        self._maintained_at = now

    def series(self, api: str, since: float, until: float) -> dict[str, list[Any]]:
        """The points of `api` in [since, until]: 2 s points where they are kept, 1 minute ones (each at
        its minute's start) before them; a null point marks each gap (the daemon was down), so charts
        break there."""
        with self._lock:
            first_fine = self._db.execute(
                "SELECT MIN(t) FROM points WHERE api = ? AND resolution = ? AND t >= ?", (api, FINE_S, since)
            ).fetchone()[0]
            fine_from = until if first_fine is None else float(first_fine)
            rows = self._db.execute(
                f"SELECT t, resolution, {', '.join(SERIES)} FROM points WHERE api = ? AND ("
                "(resolution = ? AND t >= ? AND t <= ?) OR (resolution = ? AND t >= ? AND t <= ?)) ORDER BY t",
                (api, COARSE_S, since, fine_from - COARSE_S, FINE_S, since, until),
            ).fetchall()
        out: dict[str, list[Any]] = {"t": [], **{name: [] for name in SERIES}}
        last_t = None
        for t, resolution, *values in rows:
            if last_t is not None and t - last_t > 2.5 * resolution + MAX_GAP_S / 2:
                out["t"].append(round(last_t + resolution, 3))
                for name in SERIES:
                    out[name].append(None)
            out["t"].append(round(t, 3))
            for name, value in zip(SERIES, values, strict=True):
                out[name].append(value)
            last_t = t
        return out

    def events(self, api: str, since: float, limit: int = 200) -> list[dict[str, Any]]:
        """The newest `limit` events of `api` since `since`, oldest first."""
        with self._lock:
            rows = self._db.execute(
                "SELECT t, kind, message FROM events WHERE api = ? AND t >= ? ORDER BY t DESC, rowid DESC LIMIT ?",
                (api, since, limit),
            ).fetchall()
        return [{"t": round(t, 3), "kind": kind, "message": message} for t, kind, message in reversed(rows)]

    def recent(self, since: float) -> dict[str, dict[str, float | None]]:
        """Per API: `rps` (answers per second at its newest 2 s point since `since`) and `error_rate`
        (the share of 5xx answers since `since`; None without answers)."""
        with self._lock:
            rows = self._db.execute(
                "SELECT api, SUM(rps_2xx), SUM(rps_4xx), SUM(rps_5xx), MAX(t) FROM points "
                "WHERE resolution = ? AND t >= ? GROUP BY api",
                (FINE_S, since),
            ).fetchall()
            newest = self._db.execute(
                "SELECT p.api, p.rps_2xx + p.rps_4xx + p.rps_5xx FROM points p JOIN (SELECT api, MAX(t) AS t "
                "FROM points WHERE resolution = ? AND t >= ? GROUP BY api) m ON p.api = m.api AND p.t = m.t "
                "WHERE p.resolution = ?",
                (FINE_S, since, FINE_S),
            ).fetchall()
        rps = {api: None if total is None else round(total, 3) for api, total in newest}
        out: dict[str, dict[str, float | None]] = {}
        for api, ok, client, server, _ in rows:
            answered = (ok or 0) + (client or 0) + (server or 0)
            out[api] = {"rps": rps.get(api), "error_rate": round((server or 0) / answered, 4) if answered else None}
        return out

    def size(self) -> dict[str, int]:
        """Rows per table (for tests and the curious)."""
        with self._lock:
            return {
                table: int(self._db.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0])
                for table in ("points", "events", "last_reading")
            }


# --- reading the daemon's APIs --------------------------------------------------------------------


def read_apis(controller: Controller, gateway: Gateway) -> list[Reading]:
    """A reading of every API: the controller's status, the gateway route's counters and histogram."""
    readings = []
    for status in controller.statuses()[:MAX_APIS]:
        route = gateway.routes.get(status.name)
        answers: dict[str, int] = {}
        counts: list[int] = []
        bounds: list[float] = []
        routes = [] if route is None else [route] if route.canary is None else [route, route.canary]
        for totals in (t for each in routes for t in each.metrics.revisions.values()):
            for code, count in totals.codes.items():
                if (name := status_class(code)) is not None:
                    answers[name] = answers.get(name, 0) + count
            total = list(totals.duration_counts)
            counts = [a + b for a, b in zip(counts, total, strict=True)] if counts else total
        if routes:
            from cirrus.gateway.metrics import BUCKET_BOUNDS

            bounds = list(BUCKET_BOUNDS)
        readings.append(
            Reading(
                api=status.name,
                revision=status.revision,
                answers=answers,
                latency_counts=counts,
                latency_bounds=bounds,
                in_flight=status.in_flight,
                queued=status.queued,
                replicas_ready=status.replicas_ready,
                replicas_desired=status.replicas_desired,
                batch_size_mean=status.batch_size_mean,
                slot_wait_ms=status.slot_wait_p50_ms,
                predict_ms=status.predict_p50_ms,
                cold_starts=status.cold_starts,
                last_cold_start_s=status.last_cold_start_s,
                backlog_in_queue=status.backlog_in_queue,
                backlog_in_progress=status.backlog_in_progress,
                autoscaler=status.autoscaler,
                replica_errors={r.id: r.last_error for r in status.replicas if r.last_error},
            )
        )
    return readings


async def sample(history: History, read: Callable[[], list[Reading]], every_s: float = SAMPLE_EVERY_S) -> None:
    """Every `every_s`: read every API (on the event loop, where the controller lives) and record the
    readings (in a thread: SQLite writes must not hold the loop). Reading holds the loop that serves
    requests, so it takes at most MAX_LOOP_SHARE of it: with very many APIs, the samples thin out."""
    while True:
        started = time.monotonic()
        took = 0.0
        try:
            readings = read()
            took = time.monotonic() - started
            await asyncio.to_thread(history.record, readings, time.time())
        except Exception:
            log.exception("sampling the dashboard's history failed")
        elapsed = time.monotonic() - started
        await asyncio.sleep(max(0.1, every_s - elapsed, took / MAX_LOOP_SHARE - elapsed))
