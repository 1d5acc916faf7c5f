"""The default queue store: one SQLite file in WAL mode, shared by the gateway and the replicas.

Concurrency. Each thread gets its own connection (made on first use; a forked child makes fresh
ones). Every write is one `BEGIN IMMEDIATE` transaction, so it takes SQLite's single write lock
before it reads anything: a lease selects the oldest queued rows and marks them in progress with
no other writer in between, and two workers, in threads or in processes, never receive the same
delivery. Writers that find the lock taken wait up to `busy_timeout_s`. In WAL mode readers
(`get`, `backlog`, `dead_letters`) never wait for the writer.

Durability. `synchronous=NORMAL` (the default): a committed transaction is in the WAL file when
`submit` returns, so it survives a crash or kill of any process, the daemon's included. The WAL is
fsynced at checkpoints, not at every commit, so a power loss or kernel crash may lose the last
transactions before the checkpoint (the database itself stays consistent). `synchronous="FULL"`
fsyncs at every commit and closes that gap, at the price of one fsync per transaction (the gateway
groups its accepts with `submit_many`, which makes that price per batch, not per request).

The file is shared by every API, and `synchronous` is a setting of a connection, not of a table, so
a request's `durability` chooses it per transaction: a `submit_many` that holds any request with
`durability="fsync"` commits with FULL (one fsync for the whole batch; it also makes the NORMAL
commits before it durable, since they precede it in the WAL), and the others commit as the store
was opened. Leases, results and failures commit as the store was opened: after a power loss a
completion may be lost and the request runs again, which at-least-once delivery allows anyway.

A full disk fails the write with `StoreFull` (SQLite's SQLITE_FULL); the transaction is rolled
back whole, and every transaction committed before it is intact.

A lease is held while its token matches: `renew` and `complete` accept a lease whose time has run
out as long as no `lease` call has taken it back yet (nobody else can hold it then). Expired
leases of an API are taken back at the start of each `lease` call for that API.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import sqlite3
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

from cirrus.store.base import (
    CANCELLED,
    LATENCY_SAMPLE,
    LATENCY_WINDOW_S,
    REQUEUE_LIMIT,
    Backlog,
    Counts,
    Lease,
    NewRequest,
    RequestRecord,
    Status,
    StoreFull,
    StoreUnavailable,
    median,
    pending_statuses,
)

SCHEMA_VERSION = 2  # 2: webhook_result

# Status literals are spelled out in the SQL so that SQLite can use the partial indexes.
_SCHEMA = """
CREATE TABLE IF NOT EXISTS requests (
    seq INTEGER PRIMARY KEY,            -- arrival order, breaks ties between equal created_at
    api TEXT NOT NULL,
    id TEXT NOT NULL,
    status TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    max_attempts INTEGER NOT NULL,
    created_at REAL NOT NULL,
    started_at REAL,
    finished_at REAL,
    body BLOB NOT NULL,
    content_type TEXT NOT NULL,
    headers TEXT NOT NULL,              -- JSON list of [name, value]
    query_string BLOB NOT NULL,
    webhook TEXT,
    worker TEXT,
    lease_token TEXT,
    lease_expires_at REAL,
    result BLOB,
    result_type TEXT,
    result_status INTEGER,
    error TEXT,
    webhook_result TEXT,
    UNIQUE (api, id)
);
-- lease: the oldest queued requests of an API, and backlog: counts per (api, status)
CREATE INDEX IF NOT EXISTS requests_queue ON requests (api, status, created_at);
-- lease: the expired leases of an API
CREATE INDEX IF NOT EXISTS requests_expiry ON requests (api, lease_expires_at) WHERE status = 'in_progress';
-- dead_letters: failed requests of an API, newest first
CREATE INDEX IF NOT EXISTS requests_failed ON requests (api, finished_at) WHERE status = 'failed';
-- purge: finished requests past the results TTL
CREATE INDEX IF NOT EXISTS requests_finished ON requests (finished_at) WHERE finished_at IS NOT NULL;
"""

_RECORD_COLUMNS = (
    "api, id, status, attempts, max_attempts, created_at, started_at, finished_at, "
    "result, result_type, result_status, error, webhook, webhook_result"
)
_LISTED_COLUMNS = _RECORD_COLUMNS + ", body, content_type"  # the listings show the input too
_ADDED_COLUMNS = {"webhook_result": "TEXT"}  # columns added after schema 1, by the version that added them

# SQLite's primary result codes that mean "cannot write now, nothing was written": retry later.
_UNAVAILABLE = {5: "busy", 6: "locked", 7: "out of memory", 8: "read-only", 10: "I/O error", 14: "cannot open"}
_SQLITE_FULL = 13

_INSERT = (
    "INSERT INTO requests (api, id, status, max_attempts, created_at, body, content_type, headers, "
    "query_string, webhook) VALUES (?, ?, 'in_queue', ?, ?, ?, ?, ?, ?, ?)"
)


def _insert_row(request: NewRequest, now: float) -> tuple[Any, ...]:
    if request.max_attempts < 1:
        raise ValueError(f"request {request.id}: max_attempts must be at least 1, not {request.max_attempts}")
    return (
        request.api,
        request.id,
        request.max_attempts,
        now,
        request.body,
        request.content_type,
        json.dumps(request.headers),
        request.query_string,
        request.webhook,
    )


def _record(row: Sequence[Any]) -> RequestRecord:
    """A row of _RECORD_COLUMNS, or of _LISTED_COLUMNS (with the body)."""
    api, id_, status, attempts, max_attempts, created, started, finished = row[:8]
    result, result_type, result_status, error, webhook, webhook_result = row[8:14]
    body, content_type = row[14:] or (None, None)
    return RequestRecord(
        api=api,
        id=id_,
        status=Status(status),
        attempts=attempts,
        max_attempts=max_attempts,
        created_at=created,
        started_at=started,
        finished_at=finished,
        result=result,
        result_type=result_type,
        result_status=result_status,
        error=error,
        webhook=webhook,
        webhook_result=webhook_result,
        body=body,
        content_type=content_type,
    )


def _unavailable(exc: sqlite3.OperationalError, path: Path) -> StoreUnavailable | None:
    """The store error a write that failed this way is (None: a bug, not a condition to retry)."""
    code = getattr(exc, "sqlite_errorcode", None)
    if code is None:
        return None
    if code & 0xFF == _SQLITE_FULL:
        return StoreFull(f"the queue store {path} is full: {exc} (free disk space, or purge old results)")
    if code & 0xFF in _UNAVAILABLE:
        return StoreUnavailable(f"the queue store {path} cannot write now ({_UNAVAILABLE[code & 0xFF]}): {exc}")
    return None


class SqliteQueueStore:
    """`QueueStore` on one SQLite file; safe to share between threads and processes."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        synchronous: Literal["NORMAL", "FULL"] = "NORMAL",
        busy_timeout_s: float = 30.0,
    ) -> None:
        if str(path) in ("", ":memory:") or str(path).startswith("file::memory:"):
            raise ValueError("SqliteQueueStore needs a file path: an in-memory database is not shared between threads")
        if synchronous not in ("NORMAL", "FULL"):
            raise ValueError(f"synchronous must be 'NORMAL' or 'FULL', not {synchronous!r}")
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.synchronous = synchronous
        self.busy_timeout_s = busy_timeout_s
        self._closed = False
        self._reset_connections()
        conn = self._conn()
        conn.execute("PRAGMA journal_mode=WAL")  # persistent: recorded in the file
        with self._write() as db:
            (version,) = db.execute("PRAGMA user_version").fetchone()
            if version > SCHEMA_VERSION:
                raise RuntimeError(
                    f"{self.path} holds queue schema {version}, newer than this Cirrus ({SCHEMA_VERSION}): upgrade"
                )
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    db.execute(statement)
            present = {row[1] for row in db.execute("PRAGMA table_info(requests)")}
            for column, declaration in _ADDED_COLUMNS.items():
                if column not in present:  # a file of an older schema: add what it lacks
                    db.execute(f"ALTER TABLE requests ADD COLUMN {column} {declaration}")
            if version != SCHEMA_VERSION:  # no write when nothing changes: a full disk must not stop a restart
                db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    # --- connections -----------------------------------------------------------------

    def _reset_connections(self) -> None:
        self._pid = os.getpid()
        self._local = threading.local()
        self._lock = threading.Lock()
        self._connections: list[sqlite3.Connection] = []

    def _conn(self) -> sqlite3.Connection:
        if self._closed:
            raise RuntimeError(f"the queue store {self.path} is closed")
        if os.getpid() != self._pid:  # forked: the parent's connections must not be used (nor closed) here
            self._reset_connections()
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(
                self.path, timeout=self.busy_timeout_s, isolation_level=None, check_same_thread=False
            )
            conn.execute(f"PRAGMA synchronous={self.synchronous}")
            conn.execute("PRAGMA journal_size_limit=67108864")  # truncate the WAL back to 64 MiB after checkpoints
            self._local.conn = conn
            with self._lock:
                self._connections.append(conn)
        return conn

    @contextlib.contextmanager
    def _write(self, fsync: bool = False) -> Iterator[sqlite3.Connection]:
        """One write transaction that holds the database's write lock from its first statement;
        `fsync`: it commits with synchronous=FULL whatever the store's own setting."""
        conn = self._conn()
        switch = fsync and self.synchronous != "FULL"
        try:
            if switch:
                conn.execute("PRAGMA synchronous=FULL")
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:  # also when COMMIT itself failed (disk full, I/O error)
                    conn.execute("ROLLBACK")
                raise
        except sqlite3.OperationalError as exc:
            error = _unavailable(exc, self.path)
            if error is None:
                raise
            raise error from exc
        finally:
            if switch:
                conn.execute(f"PRAGMA synchronous={self.synchronous}")

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if os.getpid() != self._pid:
            return
        with self._lock:
            connections, self._connections = self._connections, []
        for conn in connections:
            conn.close()

    # --- writes ----------------------------------------------------------------------

    def submit(self, request: NewRequest, now: float) -> None:
        self.submit_many([request], now)

    def submit_many(self, requests: list[NewRequest], now: float) -> None:
        if not requests:
            return
        rows = [_insert_row(request, now) for request in requests]
        try:
            with self._write(fsync=any(request.durability == "fsync" for request in requests)) as db:
                db.executemany(_INSERT, rows)
        except sqlite3.IntegrityError as exc:
            ids = ", ".join(f"{r.api}/{r.id}" for r in requests[:5]) + (" ..." if len(requests) > 5 else "")
            raise ValueError(f"duplicate request id among {ids}: nothing of this batch was stored") from exc

    def _reclaim_expired(self, db: sqlite3.Connection, api: str, now: float) -> None:
        """Expired leases of `api` go back to the queue, or fail once they used up their attempts."""
        db.execute(
            "UPDATE requests SET status = 'in_queue', worker = NULL, lease_token = NULL, lease_expires_at = NULL "
            "WHERE api = ? AND status = 'in_progress' AND lease_expires_at <= ? AND attempts < max_attempts",
            (api, now),
        )
        db.execute(
            "UPDATE requests SET status = 'failed', finished_at = ?, worker = NULL, lease_token = NULL, "
            "lease_expires_at = NULL, error = 'lease expired after ' || attempts || "
            "' attempts: the replica died or hung' || COALESCE(' (last error: ' || error || ')', '') "
            "WHERE api = ? AND status = 'in_progress' AND lease_expires_at <= ?",
            (now, api, now),
        )

    def _has_work(self, api: str, now: float) -> bool:
        """A lock-free look before `lease` takes the write lock: idle replicas polling an empty queue
        must not queue up behind the gateway's writes."""
        (found,) = (
            self._conn()
            .execute(
                "SELECT EXISTS (SELECT 1 FROM requests WHERE api = ? AND status = 'in_queue') OR "
                "EXISTS (SELECT 1 FROM requests WHERE api = ? AND status = 'in_progress' AND lease_expires_at <= ?)",
                (api, api, now),
            )
            .fetchone()
        )
        return bool(found)

    def lease(self, api: str, worker: str, count: int, lease_s: float, now: float) -> list[Lease]:
        if count <= 0 or not self._has_work(api, now):
            return []
        expires_at = now + lease_s
        with self._write() as db:
            self._reclaim_expired(db, api, now)
            rows = db.execute(
                "SELECT seq, id, body, content_type, headers, query_string, attempts, webhook FROM requests "
                "WHERE api = ? AND status = 'in_queue' ORDER BY created_at, seq LIMIT ?",
                (api, count),
            ).fetchall()
            leases = [
                Lease(
                    api=api,
                    id=id_,
                    body=body,
                    content_type=content_type,
                    headers=[(name, value) for name, value in json.loads(headers)],
                    query_string=query_string,
                    attempt=attempts + 1,
                    token=secrets.token_hex(16),
                    expires_at=expires_at,
                    webhook=webhook,
                )
                for _, id_, body, content_type, headers, query_string, attempts, webhook in rows
            ]
            db.executemany(
                "UPDATE requests SET status = 'in_progress', attempts = attempts + 1, worker = ?, lease_token = ?, "
                "lease_expires_at = ?, started_at = ? WHERE seq = ?",
                [(worker, lease.token, expires_at, now, row[0]) for lease, row in zip(leases, rows, strict=True)],
            )
        return leases

    def renew(self, leases: list[Lease], lease_s: float, now: float) -> list[str]:
        if not leases:
            return []
        lost: list[str] = []
        with self._write() as db:
            for lease in leases:
                cursor = db.execute(
                    "UPDATE requests SET lease_expires_at = ? "
                    "WHERE api = ? AND id = ? AND status = 'in_progress' AND lease_token = ?",
                    (now + lease_s, lease.api, lease.id, lease.token),
                )
                if cursor.rowcount != 1:
                    lost.append(lease.id)
        return lost

    def complete(self, lease: Lease, result: bytes, result_type: str, result_status: int, now: float) -> bool:
        with self._write() as db:
            cursor = db.execute(
                "UPDATE requests SET status = 'completed', finished_at = ?, result = ?, result_type = ?, "
                "result_status = ?, worker = NULL, lease_token = NULL, lease_expires_at = NULL "
                "WHERE api = ? AND id = ? AND status = 'in_progress' AND lease_token = ?",
                (now, result, result_type, result_status, lease.api, lease.id, lease.token),
            )
            return cursor.rowcount == 1

    def fail(self, lease: Lease, error: str, retry: bool, now: float) -> bool:
        with self._write() as db:
            cursor = db.execute(
                "UPDATE requests SET "
                "status = CASE WHEN ? AND attempts < max_attempts THEN 'in_queue' ELSE 'failed' END, "
                "finished_at = CASE WHEN ? AND attempts < max_attempts THEN NULL ELSE ? END, "
                "error = ?, worker = NULL, lease_token = NULL, lease_expires_at = NULL "
                "WHERE api = ? AND id = ? AND status = 'in_progress' AND lease_token = ?",
                (retry, retry, now, error, lease.api, lease.id, lease.token),
            )
            return cursor.rowcount == 1

    def fail_all(self, api: str, error: str, now: float) -> int:
        with self._write() as db:
            cursor = db.execute(
                "UPDATE requests SET status = 'failed', finished_at = ?, error = ?, worker = NULL, "
                "lease_token = NULL, lease_expires_at = NULL "
                "WHERE api = ? AND status IN ('in_queue', 'in_progress')",
                (now, error, api),
            )
            return cursor.rowcount

    def requeue(self, api: str, ids: list[str] | None, now: float) -> list[str]:
        with self._write() as db:
            if ids is None:
                rows = db.execute(
                    "SELECT id FROM requests WHERE api = ? AND status = 'failed' ORDER BY finished_at, seq LIMIT ?",
                    (api, REQUEUE_LIMIT),
                )
                ids = [id_ for (id_,) in rows.fetchall()]
            requeued = []
            for id_ in dict.fromkeys(ids):  # once each, in the order given
                cursor = db.execute(
                    "UPDATE requests SET status = 'in_queue', attempts = 0, started_at = NULL, finished_at = NULL, "
                    "result = NULL, result_type = NULL, result_status = NULL, error = NULL, webhook_result = NULL "
                    "WHERE api = ? AND id = ? AND status = 'failed'",
                    (api, id_),
                )
                if cursor.rowcount == 1:
                    requeued.append(id_)
            return requeued

    def cancel(self, api: str, id: str, now: float) -> tuple[bool, RequestRecord | None]:
        with self._write() as db:
            cursor = db.execute(
                "UPDATE requests SET status = 'failed', finished_at = ?, error = ?, worker = NULL, "
                "lease_token = NULL, lease_expires_at = NULL "
                "WHERE api = ? AND id = ? AND status IN ('in_queue', 'in_progress')",
                (now, CANCELLED, api, id),
            )
            row = db.execute(f"SELECT {_RECORD_COLUMNS} FROM requests WHERE api = ? AND id = ?", (api, id)).fetchone()
        return cursor.rowcount == 1, None if row is None else _record(row)

    def record_webhook(self, api: str, id: str, outcome: str) -> bool:
        with self._write() as db:
            cursor = db.execute("UPDATE requests SET webhook_result = ? WHERE api = ? AND id = ?", (outcome, api, id))
            return cursor.rowcount == 1

    def purge(self, older_than: float) -> int:
        with self._write() as db:
            cursor = db.execute(
                "DELETE FROM requests WHERE finished_at IS NOT NULL AND finished_at < ? "
                "AND status IN ('completed', 'failed')",
                (older_than,),
            )
            return cursor.rowcount

    # --- reads -----------------------------------------------------------------------

    def get(self, api: str, id: str) -> RequestRecord | None:
        row = (
            self._conn()
            .execute(f"SELECT {_RECORD_COLUMNS} FROM requests WHERE api = ? AND id = ?", (api, id))
            .fetchone()
        )
        return None if row is None else _record(row)

    def backlog(self, api: str, now: float, detail: bool = False) -> Backlog:
        """An expired lease counts as queued (the next `lease` takes it back) unless it has no attempt left."""
        queued, running, expired = (
            self._conn()
            .execute(
                "SELECT "
                "(SELECT COUNT(*) FROM requests WHERE api = ? AND status = 'in_queue'), "
                "(SELECT COUNT(*) FROM requests WHERE api = ? AND status = 'in_progress' AND lease_expires_at > ?), "
                "(SELECT COUNT(*) FROM requests WHERE api = ? AND status = 'in_progress' AND lease_expires_at <= ? "
                "AND attempts < max_attempts)",
                (api, api, now, api, now),
            )
            .fetchone()
        )
        if not detail:
            return Backlog(queued + expired, running)
        oldest, *_ = (
            self._conn()
            .execute("SELECT MIN(created_at) FROM requests WHERE api = ? AND status = 'in_queue'", (api,))
            .fetchone()
        )
        took = self._conn().execute(
            "SELECT finished_at - created_at FROM requests WHERE api = ? AND status = 'completed' "
            "AND finished_at > ? ORDER BY finished_at DESC LIMIT ?",
            (api, now - LATENCY_WINDOW_S, LATENCY_SAMPLE),
        )
        latency = median([row[0] for row in took.fetchall()])
        return Backlog(queued + expired, running, oldest_queued_at=oldest, latency_p50_s=latency)

    def dead_letters(self, api: str, limit: int = 100) -> list[RequestRecord]:
        rows = (
            self._conn()
            .execute(
                f"SELECT {_LISTED_COLUMNS} FROM requests WHERE api = ? AND status = 'failed' "
                "ORDER BY finished_at DESC, seq DESC LIMIT ?",
                (api, limit),
            )
            .fetchall()
        )
        return [_record(row) for row in rows]

    def list_requests(self, api: str, status: Status | None = None, limit: int = 100) -> list[RequestRecord]:
        statuses = [s.value for s in pending_statuses(status)]
        marks = ", ".join("?" * len(statuses))
        rows = (
            self._conn()
            .execute(
                f"SELECT {_LISTED_COLUMNS} FROM requests WHERE api = ? AND status IN ({marks}) "
                "ORDER BY created_at, seq LIMIT ?",
                (api, *statuses, max(0, limit)),
            )
            .fetchall()
        )
        return [_record(row) for row in rows]

    def counts(self, api: str) -> Counts:
        rows = self._conn().execute("SELECT status, COUNT(*) FROM requests WHERE api = ? GROUP BY status", (api,))
        found = dict(rows.fetchall())
        return Counts(
            in_queue=found.get("in_queue", 0),
            in_progress=found.get("in_progress", 0),
            completed=found.get("completed", 0),
            failed=found.get("failed", 0),
        )
