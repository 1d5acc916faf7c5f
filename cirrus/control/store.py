"""Durable state of the control plane: APIs and their revisions, in SQLite."""

from __future__ import annotations

import hashlib
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

from cirrus.spec import Deployment

_SCHEMA = """
CREATE TABLE IF NOT EXISTS revisions (
    api TEXT NOT NULL,
    revision INTEGER NOT NULL,
    deployment TEXT NOT NULL,
    fingerprint TEXT NOT NULL,
    created_at REAL NOT NULL,
    PRIMARY KEY (api, revision)
);
CREATE TABLE IF NOT EXISTS apis (
    name TEXT PRIMARY KEY,
    revision INTEGER NOT NULL,
    updated_at REAL NOT NULL
);
"""


def fingerprint(deployment: Deployment) -> str:
    """Identifies a spec plus the content of its predictor file: equal fingerprints need no redeploy."""
    digest = hashlib.sha256(deployment.model_dump_json(by_alias=True).encode())
    try:
        digest.update(deployment.predictor_file.read_bytes())
    except OSError:
        pass
    return digest.hexdigest()


@dataclass(frozen=True)
class StoredApi:
    name: str
    revision: int
    deployment: Deployment
    fingerprint: str


class Store:
    def __init__(self, path: Path | str) -> None:
        self._db = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_SCHEMA)

    def close(self) -> None:
        self._db.close()

    def apis(self) -> list[StoredApi]:
        rows = self._db.execute(
            "SELECT a.name, a.revision, r.deployment, r.fingerprint FROM apis a "
            "JOIN revisions r ON r.api = a.name AND r.revision = a.revision ORDER BY a.name"
        ).fetchall()
        return [StoredApi(name, rev, Deployment.model_validate_json(dep), fp) for name, rev, dep, fp in rows]

    def get(self, name: str) -> StoredApi | None:
        return next((api for api in self.apis() if api.name == name), None)

    def put(self, deployment: Deployment, force: bool = False) -> tuple[StoredApi, str]:
        """Record a deployment; returns the stored API and 'created', 'updated' or 'unchanged'.
        `force` makes a new revision of an unchanged deployment too (its models changed at their source)."""
        name = deployment.spec.name
        print_ = fingerprint(deployment)
        current = self.get(name)
        if current is not None and current.fingerprint == print_ and not force:
            return current, "unchanged"
        now = time.time()
        with self._db:
            self._db.execute("BEGIN IMMEDIATE")
            (last,) = self._db.execute(
                "SELECT COALESCE(MAX(revision), 0) FROM revisions WHERE api = ?", (name,)
            ).fetchone()
            revision = last + 1
            self._db.execute(
                "INSERT INTO revisions (api, revision, deployment, fingerprint, created_at) VALUES (?, ?, ?, ?, ?)",
                (name, revision, deployment.model_dump_json(by_alias=True), print_, now),
            )
            self._db.execute(
                "INSERT INTO apis (name, revision, updated_at) VALUES (?, ?, ?) "
                "ON CONFLICT(name) DO UPDATE SET revision = excluded.revision, updated_at = excluded.updated_at",
                (name, revision, now),
            )
        return StoredApi(name, revision, deployment, print_), ("created" if current is None else "updated")

    def delete(self, name: str) -> bool:
        cursor = self._db.execute("DELETE FROM apis WHERE name = ?", (name,))
        return cursor.rowcount > 0
