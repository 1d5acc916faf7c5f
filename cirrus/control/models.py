"""Models before replicas: each revision's `models:` are fetched once into the disk cache (in a
thread, with progress) before any of its replicas start; the replicas get local paths.

A local path is used where it lies (nothing to fetch); a URL goes through the cache, which
resumes interrupted downloads and verifies what it fetched. A failed fetch marks the API failed
with the reason and is retried after `RETRY_S`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from cirrus.spec import Deployment, ModelSpec

log = logging.getLogger("cirrus.controller")
RETRY_S = 30.0
Key = tuple[str, int]  # (API, revision)


class Cache(Protocol):
    def fetch(
        self,
        source_url: str,
        version: str | None = None,
        progress: Callable[[int, int], None] | None = None,
        *,
        name: str | None = None,
    ) -> Path: ...


@dataclass
class ModelFetch:
    name: str
    source: str
    state: str = "pending"  # pending | fetching | ready | failed
    done_bytes: int = 0
    total_bytes: int = 0
    path: str | None = None
    error: str | None = None

    def describe(self) -> str:
        if self.state == "failed":
            return f"model {self.name!r} could not be fetched: {self.error}"
        if self.state == "fetching" and self.total_bytes:
            gib = self.total_bytes / 2**30
            return f"fetching model {self.name!r}: {100 * self.done_bytes / self.total_bytes:.0f}% of {gib:.2f} GiB"
        return f"fetching model {self.name!r}"


@dataclass
class _Revision:
    fetches: list[ModelFetch]
    task: asyncio.Task[None] | None = None
    retry_at: float = 0.0
    paths: dict[str, str] | None = None  # set once every model is ready


def _local_path(model: ModelSpec, project_dir: str) -> Path:
    path = Path(model.path).expanduser()
    return path if path.is_absolute() else Path(project_dir) / path


@dataclass
class ModelFetcher:
    cache_factory: Callable[[], Cache] | None  # None: URLs cannot be fetched (no cache configured)
    clock: Callable[[], float]
    _revisions: dict[Key, _Revision] = field(default_factory=dict)
    _cache: Cache | None = None
    _pool: ThreadPoolExecutor = field(default_factory=lambda: ThreadPoolExecutor(2, thread_name_prefix="cirrus-fetch"))

    def paths(self, key: Key, deployment: Deployment) -> dict[str, str] | None:
        """The local paths of the revision's models once all are fetched; until then None (and the
        fetch is started, or retried after a failure)."""
        models = deployment.spec.models
        if not models:
            return {}
        revision = self._revisions.get(key)
        if revision is None:
            revision = _Revision([ModelFetch(m.name, m.path) for m in models])
            self._revisions[key] = revision
        if revision.paths is not None:
            return revision.paths
        if revision.task is None and self.clock() >= revision.retry_at:
            revision.task = asyncio.get_running_loop().create_task(self._fetch_all(key, revision, deployment))
        return None

    def status(self, key: Key) -> list[ModelFetch]:
        revision = self._revisions.get(key)
        return [] if revision is None else revision.fetches

    def waiting_reason(self, key: Key) -> str | None:
        for fetch in self.status(key):
            if fetch.state != "ready":
                return fetch.describe()
        return None

    def failure(self, key: Key) -> str | None:
        return next((f.describe() for f in self.status(key) if f.state == "failed"), None)

    def forget(self, api: str) -> None:
        for key in [k for k in self._revisions if k[0] == api]:
            revision = self._revisions.pop(key)
            if revision.task is not None:
                revision.task.cancel()

    async def _fetch_all(self, key: Key, revision: _Revision, deployment: Deployment) -> None:
        loop = asyncio.get_running_loop()
        try:
            for model, fetch in zip(deployment.spec.models, revision.fetches, strict=True):
                if fetch.state == "ready":
                    continue
                fetch.state, fetch.error = "fetching", None
                try:
                    path = await loop.run_in_executor(self._pool, self._fetch_one, model, fetch, deployment)
                except Exception as exc:
                    fetch.state, fetch.error = "failed", str(exc) or type(exc).__name__
                    revision.retry_at = self.clock() + RETRY_S
                    log.error("%s revision %d: %s (retrying in %.0fs)", key[0], key[1], fetch.describe(), RETRY_S)
                    return
                fetch.state, fetch.path = "ready", str(path)
                fetch.done_bytes = fetch.total_bytes = max(fetch.total_bytes, fetch.done_bytes)
                log.info("%s revision %d: model %r ready at %s", key[0], key[1], fetch.name, path)
            revision.paths = {f.name: f.path for f in revision.fetches if f.path is not None}
        finally:
            revision.task = None

    def _fetch_one(self, model: ModelSpec, fetch: ModelFetch, deployment: Deployment) -> Path:
        if not model.is_url:
            path = _local_path(model, deployment.project_dir)
            if not path.exists():
                raise FileNotFoundError(f"{path} does not exist")
            return path

        def progress(done: int, total: int) -> None:
            fetch.done_bytes, fetch.total_bytes = done, total

        if self._cache is None:
            if self.cache_factory is None:
                raise RuntimeError("this daemon has no model cache")
            self._cache = self.cache_factory()
        return self._cache.fetch(model.path, model.version, progress, name=model.name)
