"""The control plane's durable state, one SQLite file (`$CIRRUS_HOME/state.db`) opened one way.

APIs and revisions (`control/store.py`) and batch jobs (`control/jobs.py`) keep their tables here,
on one connection: WAL, `synchronous=NORMAL`, a busy timeout, and a file only its owner can read.
A file that is not a database, or a damaged one (`PRAGMA quick_check` at open), raises
`StateCorrupt`, whose message says what to do.
"""

from __future__ import annotations

import os
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

BUSY_TIMEOUT_S = 30.0


class StateCorrupt(Exception):
    """The state database cannot be used as it is."""

    def __init__(self, path: Path, error: str) -> None:
        backup = path.with_name(path.name + ".bak")
        super().__init__(
            f"the state database {path} is corrupt: {error}; move it aside (mv {path} {backup}) "
            "to start with no APIs, or restore a backup of it"
        )
        self.path = path


def connect_private(path: Path | str, timeout_s: float) -> sqlite3.Connection:
    """A SQLite connection (WAL, synchronous NORMAL, usable from any thread) to a file only its owner
    may read: its directory is made 0700 and the file created 0600 before SQLite opens it."""
    if str(path) != ":memory:":
        Path(path).parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.close(os.open(path, os.O_CREAT | os.O_RDWR, 0o600))
        os.chmod(path, 0o600)
    db = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False, timeout=timeout_s)
    try:
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
    except sqlite3.DatabaseError:
        db.close()
        raise
    return db


class StateDB:
    """One connection shared by the stores of the control plane (thread-safe through one lock)."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        try:
            self._db = connect_private(path, BUSY_TIMEOUT_S)
        except sqlite3.DatabaseError as exc:
            raise StateCorrupt(self.path, str(exc)) from None
        try:
            problems = [str(row[0]) for row in self._db.execute("PRAGMA quick_check(3)")]
        except sqlite3.DatabaseError as exc:
            self._db.close()
            raise StateCorrupt(self.path, str(exc)) from None
        if problems != ["ok"]:
            self._db.close()
            raise StateCorrupt(self.path, "; ".join(problems))
        self.lock = threading.RLock()
        self._closed = False

    def schema(self, script: str, columns: dict[str, dict[str, str]] | None = None) -> None:
        """Create tables (`CREATE ... IF NOT EXISTS` script), then add `columns` ({table: {name: type}})
        missing from a state file written by an older version."""
        with self.lock:
            try:
                self._db.executescript(script)
                for table, wanted in (columns or {}).items():
                    have = {row[1] for row in self._db.execute(f"PRAGMA table_info({table})")}
                    for name, kind in wanted.items():
                        if name not in have:
                            self._db.execute(f"ALTER TABLE {table} ADD COLUMN {name} {kind}")
            except sqlite3.DatabaseError as exc:
                if isinstance(exc, sqlite3.OperationalError) and "locked" in str(exc):
                    raise
                raise StateCorrupt(self.path, str(exc)) from None

    def execute(self, sql: str, params: tuple[object, ...] = ()) -> sqlite3.Cursor:
        with self.lock:
            return self._db.execute(sql, params)

    def fetchall(self, sql: str, params: tuple[object, ...] = ()) -> list[tuple[object, ...]]:
        with self.lock:
            return self._db.execute(sql, params).fetchall()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """`BEGIN IMMEDIATE` ... `COMMIT` (or `ROLLBACK` on an exception), holding the lock."""
        with self.lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def close(self) -> None:
        with self.lock:
            if not self._closed:
                self._closed = True
                self._db.close()


class StateTables:
    """A store of the control plane with tables in the state database: given the daemon's shared
    `StateDB`, or a path it opens (and closes) itself, as tests do. Subclasses set `SCHEMA` (and
    `COLUMNS` added to older files)."""

    SCHEMA = ""
    COLUMNS: dict[str, dict[str, str]] | None = None

    def __init__(self, db: StateDB | Path | str) -> None:
        self._owned = not isinstance(db, StateDB)
        self._db = db if isinstance(db, StateDB) else StateDB(db)
        self._db.schema(self.SCHEMA, self.COLUMNS)

    def close(self) -> None:
        if self._owned:
            self._db.close()
