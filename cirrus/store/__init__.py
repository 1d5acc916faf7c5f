"""Durable queues for async APIs and batch jobs: SQLite (default, embedded) and Redis (optional)."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from cirrus.store.base import QueueStore


def open_store(url: str) -> QueueStore:
    """`sqlite:///abs/path.db` (the default, embedded) or `redis://host:port/db` (the `redis` extra)."""
    if url.startswith("sqlite://"):
        from cirrus.store.sqlite import SqliteQueueStore

        return SqliteQueueStore(url.removeprefix("sqlite://"))
    if url.startswith(("redis://", "rediss://", "unix://")):
        try:
            from cirrus.store.redis import RedisQueueStore
        except ImportError as exc:
            raise ValueError(
                f"the Redis queue store needs the redis extra: pip install 'cirrus-serve[redis]' ({exc})"
            ) from None
        return RedisQueueStore(url)
    raise ValueError(f"unknown queue store {url!r}: use sqlite:///PATH or redis://HOST:PORT/DB")
