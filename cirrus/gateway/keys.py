"""API keys and rate limits at the gateway: who may call an API, and how often.

`take` is the pure token bucket (tested on traces); `KeyRing` holds the keys the controller pushed
(`ApiKey` records: a key's id, the SHA-256 of the whole key, its scope, rate and expiry) and checks
a request's `Authorization: Bearer <key>` or `X-API-Key: <key>` in constant time. The key itself is
never stored: `cirrus keys create` prints it once.
"""

from __future__ import annotations

import hashlib
import hmac
import math
from dataclasses import dataclass

from cirrus.types import ApiKey

KEY_PREFIX = "cirrus_"


@dataclass(frozen=True)
class Bucket:
    """A token bucket: `tokens` left at time `at`."""

    tokens: float
    at: float


def take(bucket: Bucket | None, rate: float, burst: float, now: float) -> tuple[Bucket, float]:
    """Spend one token: (the bucket after, 0.0) when one was there, else (the bucket, seconds until
    one will be). A new bucket starts full; tokens refill at `rate` per second up to `burst`."""
    tokens = burst if bucket is None else min(burst, bucket.tokens + max(0.0, now - bucket.at) * rate)
    if tokens >= 1.0:
        return Bucket(tokens - 1.0, now), 0.0
    return Bucket(tokens, now), (1.0 - tokens) / rate


@dataclass(frozen=True)
class Denied:
    """Why a request is refused: 401 (no or bad key), 403 (not for this API), 429 (over its rate)."""

    status: int
    message: str
    retry_after_s: float | None = None


def key_id(key: str) -> str | None:
    """The public id of a well-formed key (`cirrus_<id>_<secret>`), else None."""
    if not key.startswith(KEY_PREFIX):
        return None
    ident, sep, secret = key[len(KEY_PREFIX) :].partition("_")
    return ident if sep and ident and secret else None


def digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def presented_key(headers: list[tuple[bytes, bytes]]) -> str | None:
    """The key a request carries: `X-API-Key`, or an `Authorization: Bearer` one."""
    for name, value in headers:
        if name == b"x-api-key":
            return value.decode("latin-1").strip()
        if name == b"authorization" and value[:7].lower() == b"bearer ":
            return value[7:].decode("latin-1").strip()
    return None


class KeyRing:
    """The keys the gateway accepts, and one token bucket per rate-limited key."""

    def __init__(self) -> None:
        self._keys: dict[str, ApiKey] = {}
        self._buckets: dict[str, Bucket] = {}

    def __len__(self) -> int:
        return len(self._keys)

    def set_keys(self, keys: list[ApiKey]) -> None:
        self._keys = {k.id: k for k in keys if k.revoked_at is None}
        self._buckets = {ident: b for ident, b in self._buckets.items() if ident in self._keys}

    def valid(self, key: str | None, now: float) -> bool:
        """Whether `key` is a live key (for any API; no rate is spent)."""
        ident = key_id(key) if key is not None else None
        record = self._keys.get(ident) if ident is not None else None
        return (
            record is not None
            and key is not None
            and hmac.compare_digest(record.digest, digest(key))
            and (record.expires_at is None or now < record.expires_at)
        )

    def check(self, key: str | None, api: str, now: float) -> Denied | None:
        """None when `key` may call `api` now; else why not. `now` is wall-clock time (expiry)."""
        if key is None:
            return Denied(401, "this API needs a key: send `Authorization: Bearer <key>` or `X-API-Key: <key>`")
        ident = key_id(key)
        record = self._keys.get(ident) if ident is not None else None
        if record is None or not hmac.compare_digest(record.digest, digest(key)):
            return Denied(401, "the API key is not valid (revoked, mistyped, or never issued)")
        if record.expires_at is not None and now >= record.expires_at:
            return Denied(401, "the API key has expired")
        if record.apis is not None and api not in record.apis:
            return Denied(403, f"the API key may not call {api!r}")
        if record.rate is None:
            return None
        burst = record.burst if record.burst is not None else max(1.0, record.rate)
        bucket, wait = take(self._buckets.get(record.id), record.rate, burst, now)
        self._buckets[record.id] = bucket
        if wait > 0:
            return Denied(429, f"over this key's rate of {record.rate:g} requests/s", math.ceil(wait))
        return None
