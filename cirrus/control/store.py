"""Durable state of the control plane: APIs and their revisions, in the state database.

A revision is an immutable snapshot of an API's project directory (its digest, `cirrus/snapshots.py`)
plus the spec fields that shape a replica (code, `predictor`, `compute`, `models`, `batching`, ...).
A change to those makes a new revision; a change to scale-only fields (`autoscaling`, the gateway's
`max_queue_length` and `timeout_s`) is applied to the current revision in place, restarting nothing.

Each API row records the revision the controller rolls to (`revision`) and the last one that served
in full (`serving`), so a restart restores exactly what served, even while a newer revision fails,
and the share of requests the revision rolled to takes while it is a canary (`canary`).
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from typing import Any, Literal

from cirrus.control.statedb import StateTables
from cirrus.kinds import kind_of
from cirrus.spec import ApiSpec, Deployment

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
_COLUMNS = {"apis": {"serving": "INTEGER", "canary": "REAL"}, "revisions": {"note": "TEXT"}}

Action = Literal["created", "updated", "scaled", "unchanged"]


def _scale_only(spec: ApiSpec) -> dict[str, Any]:
    """The fields a running replica does not depend on: changing them restarts nothing."""
    fields: dict[str, Any] = {"autoscaling": spec.autoscaling.model_dump(mode="json")}
    fields["max_queue_length"] = spec.concurrency.max_queue_length
    if not kind_of(spec.kind).replica_timeout:  # else replicas enforce timeout_s themselves
        fields["timeout_s"] = spec.concurrency.timeout_s
    return fields


def _with_scale(spec: ApiSpec, scale: dict[str, Any]) -> ApiSpec:
    data = spec.model_dump(mode="json", by_alias=True)
    data["autoscaling"] = scale["autoscaling"]
    data["concurrency"]["max_queue_length"] = scale["max_queue_length"]
    if "timeout_s" in scale:
        data["concurrency"]["timeout_s"] = scale["timeout_s"]
    return ApiSpec.model_validate(data)


def fingerprint(deployment: Deployment) -> str:
    """Identifies what a replica runs: the snapshot of the code plus every field that is not scale-only."""
    data = deployment.model_dump(mode="json", by_alias=True)
    scale = _scale_only(deployment.spec)
    data["spec"]["autoscaling"] = None
    for name in ("max_queue_length", "timeout_s"):
        if name in scale:
            data["spec"]["concurrency"][name] = None
    digest = hashlib.sha256(json.dumps(data, sort_keys=True).encode())
    if (
        deployment.snapshot is None and deployment.spec.predictor is not None
    ):  # no snapshot (an embedding that runs from project_dir): the predictor file
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


@dataclass(frozen=True)
class RevisionRecord:
    """One row of `cirrus revisions API`."""

    api: StoredApi
    created_at: float
    note: str | None  # how it came to be: "deploy", "model changed", "rollback of 2", ...


class Store(StateTables):
    SCHEMA = _SCHEMA
    COLUMNS = _COLUMNS

    def apis(self) -> list[StoredApi]:
        """Every API at the revision it rolls to."""
        rows = self._db.fetchall(
            "SELECT a.name, a.revision, r.deployment, r.fingerprint FROM apis a "
            "JOIN revisions r ON r.api = a.name AND r.revision = a.revision ORDER BY a.name"
        )
        return [_stored(row) for row in rows]

    def get(self, name: str) -> StoredApi | None:
        return next((api for api in self.apis() if api.name == name), None)

    def revision(self, name: str, revision: int) -> StoredApi | None:
        rows = self._db.fetchall(
            "SELECT api, revision, deployment, fingerprint FROM revisions WHERE api = ? AND revision = ?",
            (name, revision),
        )
        return _stored(rows[0]) if rows else None

    def revisions(self, name: str) -> list[RevisionRecord]:
        rows = self._db.fetchall(
            "SELECT api, revision, deployment, fingerprint, created_at, note FROM revisions "
            "WHERE api = ? ORDER BY revision",
            (name,),
        )
        return [RevisionRecord(_stored(row[:4]), float(str(row[4])), _text(row[5])) for row in rows]

    def serving(self, name: str) -> int | None:
        """The last revision that served in full (None: none yet)."""
        rows = self._db.fetchall("SELECT serving FROM apis WHERE name = ?", (name,))
        return int(str(rows[0][0])) if rows and rows[0][0] is not None else None

    def set_serving(self, name: str, revision: int) -> None:
        self._db.execute("UPDATE apis SET serving = ? WHERE name = ?", (revision, name))

    def canary(self, name: str) -> float | None:
        """The percent of requests the revision rolled to takes as a canary (None: no canary)."""
        rows = self._db.fetchall("SELECT canary FROM apis WHERE name = ?", (name,))
        return float(str(rows[0][0])) if rows and rows[0][0] is not None else None

    def set_canary(self, name: str, percent: float | None) -> None:
        self._db.execute("UPDATE apis SET canary = ? WHERE name = ?", (percent, name))

    def set_target(self, name: str, revision: int) -> None:
        """Roll to an existing revision again (an aborted canary's API goes back to the serving one)."""
        self._db.execute("UPDATE apis SET revision = ?, updated_at = ? WHERE name = ?", (revision, time.time(), name))

    def put(self, deployment: Deployment, force: bool = False, note: str = "deploy") -> tuple[StoredApi, Action]:
        """Record a deployment: a new revision when what replicas run changed (or `force`), the current
        revision updated in place when only scale-only fields did ('scaled'), else 'unchanged'."""
        name = deployment.spec.name
        print_ = fingerprint(deployment)
        current = self.get(name)
        if current is not None and current.fingerprint == print_ and not force:
            if current.deployment == deployment:
                return current, "unchanged"
            self._db.execute(
                "UPDATE revisions SET deployment = ? WHERE api = ? AND revision = ?",
                (deployment.model_dump_json(by_alias=True), name, current.revision),
            )
            return StoredApi(name, current.revision, deployment, print_), "scaled"
        stored = self._insert(deployment, print_, note)
        return stored, ("created" if current is None else "updated")

    def rollback(self, name: str, to: int) -> StoredApi:
        """A new revision running revision `to`'s snapshot and spec, with today's scale-only fields."""
        current, old = self.get(name), self.revision(name, to)
        if current is None or old is None:
            raise KeyError(f"API {name!r} has no revision {to}")
        spec = _with_scale(old.deployment.spec, _scale_only(current.deployment.spec))
        deployment = old.deployment.model_copy(update={"spec": spec})
        return self._insert(deployment, fingerprint(deployment), f"rollback to {to}")

    def _insert(self, deployment: Deployment, print_: str, note: str) -> StoredApi:
        name, now = deployment.spec.name, time.time()
        with self._db.transaction() as db:
            (last,) = db.execute("SELECT COALESCE(MAX(revision), 0) FROM revisions WHERE api = ?", (name,)).fetchone()
            revision = last + 1
            db.execute(
                "INSERT INTO revisions (api, revision, deployment, fingerprint, created_at, note) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (name, revision, deployment.model_dump_json(by_alias=True), print_, now, note),
            )
            db.execute(
                "INSERT INTO apis (name, revision, updated_at) VALUES (?, ?, ?) "
                "ON CONFLICT(name) DO UPDATE SET revision = excluded.revision, updated_at = excluded.updated_at",
                (name, revision, now),
            )
        return StoredApi(name, revision, deployment, print_)

    def delete(self, name: str) -> bool:
        """Stop tracking the API; its revisions stay, so a later deploy of the name numbers on."""
        cursor = self._db.execute("DELETE FROM apis WHERE name = ?", (name,))
        return cursor.rowcount > 0

    def snapshots(self) -> set[str]:
        """Every snapshot digest a stored revision refers to."""
        rows = self._db.fetchall("SELECT deployment FROM revisions")
        found = {json.loads(str(row[0])).get("snapshot") for row in rows}
        return {digest for digest in found if digest}


def _text(value: object) -> str | None:
    return None if value is None else str(value)


def _stored(row: tuple[object, ...]) -> StoredApi:
    name, revision, deployment, print_ = row[:4]
    return StoredApi(str(name), int(str(revision)), Deployment.model_validate_json(str(deployment)), str(print_))
