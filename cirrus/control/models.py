"""Models before replicas: each revision's `models:` are fetched once into the disk cache (in a
thread, with progress) before any of its replicas start; the replicas get local paths.

A local path is used where it lies (nothing to fetch); a URL goes through the cache, which
resumes interrupted downloads and verifies what it fetched. A failed fetch marks the API failed
with the reason and is retried after `RETRY_S`.

After each completed fetch the disk cache keeps at most `max_entries` entries (least recently used
go first): the largest `multi_model.disk_cache_size` among the APIs deployed (DEFAULT_DISK_ENTRIES
for an API without `multi_model`). An entry that a known revision's replicas use is never removed.

A URL model with `reload_s` is listed again that often while its revision is current; when what
its source holds has changed (another cache key), `check_sources` reports the API once, and the
controller makes a new revision of it (a rolling update that fetches the new content).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from cirrus.spec import Deployment, ModelSpec

log = logging.getLogger("cirrus.controller")
RETRY_S = 30.0
DEFAULT_DISK_ENTRIES = 16  # models kept in the disk cache when no API says (multi_model.disk_cache_size)
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

    def identity(self, source_url: str, version: str | None = None) -> str: ...

    def evict(
        self, keep_bytes: int | None = None, in_use: Iterable[Path] = (), *, keep_entries: int | None = None
    ) -> Sequence[object]: ...


@dataclass
class ModelFetch:
    name: str
    source: str
    state: str = "pending"  # pending | fetching | ready | failed
    done_bytes: int = 0
    total_bytes: int = 0
    path: str | None = None
    error: str | None = None
    identity: str | None = None  # the source's cache key when fetched (models with reload_s only)
    checked_at: float = 0.0  # when the source was last listed for a reload

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
    deployment: Deployment
    task: asyncio.Task[None] | None = None
    retry_at: float = 0.0
    paths: dict[str, str] | None = None  # set once every model is ready
    checking: asyncio.Task[None] | None = None  # a re-listing of sources with reload_s
    changed: bool = False  # a source changed: reported once, no more checks


def _local_path(model: ModelSpec, project_dir: str) -> Path:
    path = Path(model.path).expanduser()
    return path if path.is_absolute() else Path(project_dir) / path


@dataclass
class ModelFetcher:
    cache_factory: Callable[[], Cache] | None  # None: URLs cannot be fetched (no cache configured)
    clock: Callable[[], float]
    _revisions: dict[Key, _Revision] = field(default_factory=dict)
    _cache: Cache | None = None
    _changed: list[tuple[str, str]] = field(default_factory=list)  # (API, reason), for check_sources
    _pool: ThreadPoolExecutor = field(default_factory=lambda: ThreadPoolExecutor(2, thread_name_prefix="cirrus-fetch"))

    def paths(self, key: Key, deployment: Deployment) -> dict[str, str] | None:
        """The local paths of the revision's models once all are fetched; until then None (and the
        fetch is started, or retried after a failure)."""
        models = deployment.spec.models
        if not models:
            return {}
        revision = self._revisions.get(key)
        if revision is None:
            revision = _Revision([ModelFetch(m.name, m.path) for m in models], deployment)
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
            self.release(key)

    def release(self, key: Key) -> None:
        """A revision that runs no replica any more: its models may be evicted from now on."""
        revision = self._revisions.pop(key, None)
        if revision is None:
            return
        for task in (revision.task, revision.checking):
            if task is not None:
                task.cancel()

    @property
    def max_entries(self) -> int:
        """Entries the disk cache keeps: the largest disk_cache_size among the deployed APIs."""
        sizes = [
            DEFAULT_DISK_ENTRIES
            if r.deployment.spec.multi_model is None
            else r.deployment.spec.multi_model.disk_cache_size
            for r in self._revisions.values()
        ]
        return max(sizes, default=DEFAULT_DISK_ENTRIES)

    def check_sources(self, current: Iterable[Key]) -> list[tuple[str, str]]:
        """List again the sources (with reload_s, when due) of the current revisions `current`, in the
        background; returns (API, reason) for each API found changed since the last call."""
        found, self._changed = self._changed, []
        now = self.clock()
        for key in current:
            revision = self._revisions.get(key)
            if revision is None or revision.paths is None or revision.changed or revision.checking is not None:
                continue
            due = [
                (model, fetch)
                for model, fetch in zip(revision.deployment.spec.models, revision.fetches, strict=True)
                if model.reload_s is not None
                and fetch.identity is not None
                and now >= fetch.checked_at + model.reload_s
            ]
            if due:
                revision.checking = asyncio.get_running_loop().create_task(self._check(key, revision, due))
        return found

    async def _check(self, key: Key, revision: _Revision, due: list[tuple[ModelSpec, ModelFetch]]) -> None:
        loop = asyncio.get_running_loop()
        try:
            for model, fetch in due:
                try:
                    identity = await loop.run_in_executor(self._pool, self._identity, model)
                except Exception as exc:
                    log.warning("%s: listing model %r for a reload failed: %s", key[0], model.name, exc)
                    continue
                finally:
                    fetch.checked_at = self.clock()
                if identity != fetch.identity and not revision.changed and key in self._revisions:
                    revision.changed = True
                    reason = f"model {model.name!r} changed at {model.path}"
                    log.info("%s revision %d: %s; reloading", key[0], key[1], reason)
                    self._changed.append((key[0], reason))
        finally:
            revision.checking = None

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
        if self._cache is not None and any(m.is_url for m in deployment.spec.models):
            await self._evict()

    async def _evict(self) -> None:
        """Keep at most `max_entries` in the disk cache, sparing every model a known revision uses."""
        cache = self._cache
        if cache is None:
            return
        in_use = [Path(p) for r in self._revisions.values() if r.paths is not None for p in r.paths.values()]
        try:
            removed = await asyncio.get_running_loop().run_in_executor(
                self._pool, lambda: cache.evict(None, in_use, keep_entries=self.max_entries)
            )
        except Exception:
            log.exception("evicting models from the disk cache failed")
            return
        if removed:
            log.info("evicted %d model(s) from the disk cache (keeping %d)", len(removed), self.max_entries)

    def _fetch_one(self, model: ModelSpec, fetch: ModelFetch, deployment: Deployment) -> Path:
        if not model.is_url:
            path = _local_path(model, deployment.project_dir)
            if not path.exists():
                raise FileNotFoundError(f"{path} does not exist")
            return path

        def progress(done: int, total: int) -> None:
            fetch.done_bytes, fetch.total_bytes = done, total

        cache = self._cache_now()
        if model.reload_s is not None:  # what a reload compares with (listed before: a change meanwhile reloads)
            fetch.identity, fetch.checked_at = cache.identity(model.path, model.version), self.clock()
        return cache.fetch(model.path, model.version, progress, name=model.name)

    def _identity(self, model: ModelSpec) -> str:
        return self._cache_now().identity(model.path, model.version)

    def _cache_now(self) -> Cache:
        if self._cache is None:
            if self.cache_factory is None:
                raise RuntimeError("this daemon has no model cache")
            self._cache = self.cache_factory()
        return self._cache
