"""API keys on the control plane: issued, listed and revoked in the state database.

A key is `cirrus_<id>_<secret>` (the id public, the secret 32 random bytes): only its SHA-256 is
stored, so the key is shown once, when it is created. The gateway gets the records (`ApiKey`) and
checks requests against them (`cirrus/gateway/keys.py`).
"""

from __future__ import annotations

import hashlib
import json
import secrets
import time

from cirrus.control.statedb import StateTables
from cirrus.types import ApiKey

_SCHEMA = """
CREATE TABLE IF NOT EXISTS api_keys (
    id TEXT PRIMARY KEY,
    data TEXT NOT NULL              -- the ApiKey record as JSON (the key's digest, never the key)
);
"""


class KeyNotFound(LookupError):
    pass


class KeyStore(StateTables):
    SCHEMA = _SCHEMA

    def create(
        self,
        apis: list[str] | None = None,
        rate: float | None = None,
        burst: float | None = None,
        expires_in_s: float | None = None,
        name: str | None = None,
    ) -> tuple[str, ApiKey]:
        """A new key (shown only now) and its stored record."""
        if rate is not None and rate <= 0:
            raise ValueError("rate must be a positive number of requests per second")
        if burst is not None and burst < 1:
            raise ValueError("burst must be at least 1")
        if expires_in_s is not None and expires_in_s <= 0:
            raise ValueError("expires must be a positive duration")
        ident = secrets.token_hex(6)
        key = f"cirrus_{ident}_{secrets.token_urlsafe(32)}"
        now = time.time()
        record = ApiKey(
            id=ident,
            digest=hashlib.sha256(key.encode()).hexdigest(),
            apis=sorted(set(apis)) if apis else None,
            rate=rate,
            burst=burst,
            expires_at=None if expires_in_s is None else now + expires_in_s,
            created_at=now,
            name=name,
        )
        self._db.execute("INSERT INTO api_keys (id, data) VALUES (?, ?)", (ident, record.model_dump_json()))
        return key, record

    def list(self) -> list[ApiKey]:
        rows = self._db.fetchall("SELECT data FROM api_keys")
        return sorted((ApiKey.model_validate(json.loads(str(data))) for (data,) in rows), key=lambda k: k.created_at)

    def revoke(self, ident: str) -> ApiKey:
        rows = self._db.fetchall("SELECT data FROM api_keys WHERE id = ?", (ident,))
        if not rows:
            raise KeyNotFound(f"no API key with id {ident!r} (see `cirrus keys list`)")
        record = ApiKey.model_validate(json.loads(str(rows[0][0])))
        if record.revoked_at is None:
            record = record.model_copy(update={"revoked_at": time.time()})
            self._db.execute("UPDATE api_keys SET data = ? WHERE id = ?", (record.model_dump_json(), ident))
        return record
