"""Run one test suite against every queue store backend.

A test module asks for the fixtures once and then writes its tests against `store` (an open
`QueueStore`, closed after the test) or `store_target` (where the store lives, to open more
instances of it, in this process or in another):

    from store_backends import store_fixtures

    store_target, store = store_fixtures()

Each test then runs once per backend: "sqlite" (a fresh file in the test's tmp_path) and "redis"
(one real redis-server for the whole session, from `tests/redis_server.py`, flushed before each
test). The Redis runs are skipped loudly (`tests/backends.py`) when the `redis` package or a server
binary is missing.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import backends
import pytest

from cirrus.store.base import QueueStore

BACKENDS = ("sqlite", "redis")


def open_store(backend: str, location: str) -> QueueStore:
    """A new store instance of `backend` at `location` (an SQLite file or a Redis URL)."""
    if backend == "sqlite":
        from cirrus.store.sqlite import SqliteQueueStore

        return SqliteQueueStore(location)
    if backend == "redis":
        from cirrus.store.redis import RedisQueueStore

        return RedisQueueStore(location)
    raise ValueError(f"unknown queue store backend {backend!r}; known: {', '.join(BACKENDS)}")


@dataclass(frozen=True)
class StoreTarget:
    """Where a test's store lives; picklable, so a child process can open it too."""

    backend: str
    location: str

    def open(self) -> QueueStore:
        return open_store(self.backend, self.location)


# --- redis -------------------------------------------------------------------------------

_REDIS_URL = pytest.StashKey[str]()


def redis_url(request: pytest.FixtureRequest) -> str:
    """The URL of the session's redis-server (`redis_server.redis_url`), started on first use and
    stopped when the session ends; skips the test, with the reason, if Redis cannot be tested here."""
    backends.module("redis")
    stash = request.config.stash
    if _REDIS_URL not in stash:
        from redis_server import redis_url as start_redis

        directory = request.getfixturevalue("tmp_path_factory").mktemp("redis")
        stack = contextlib.ExitStack()
        stash[_REDIS_URL] = stack.enter_context(start_redis(directory))
        request.config.add_cleanup(stack.close)
    return stash[_REDIS_URL]


def _flush_redis(url: str) -> None:
    import redis

    client = redis.Redis.from_url(url)
    try:
        client.flushdb()
    finally:
        client.close()


# --- the fixtures ------------------------------------------------------------------------


def store_fixtures(backends: Sequence[str] = BACKENDS) -> tuple[Any, Any]:
    """The `store_target` and `store` fixtures, parametrized over `backends`."""

    @pytest.fixture(name="store_target", params=list(backends))
    def store_target(request: pytest.FixtureRequest, tmp_path: Path) -> StoreTarget:
        backend = request.param
        if backend == "sqlite":
            return StoreTarget("sqlite", str(tmp_path / "queue.db"))
        if backend == "redis":
            url = redis_url(request)
            _flush_redis(url)
            return StoreTarget("redis", url)
        raise ValueError(f"unknown queue store backend {backend!r}; known: {', '.join(BACKENDS)}")

    @pytest.fixture(name="store")
    def store(store_target: StoreTarget) -> Iterator[QueueStore]:
        opened = store_target.open()
        try:
            yield opened
        finally:
            opened.close()

    return store_target, store
