"""Environments before replicas: a revision whose spec has `python:` gets its own environment
(cirrus/envs.py builds it with uv, in a thread) before any of its replicas or its template start;
they run its interpreter.

Each revision's request is resolved once per daemon (`uv pip compile`); its pins name the cached
environment, built only when no complete one has that key. Which environment each revision got is
recorded in `<root>/revisions.json`, so after a daemon restart a revision takes its environment
again without resolving (no index needed), and eviction knows what it must keep.

A failed resolve or build marks the revision failed with the installer's message (the controller's
status shows it; an older revision keeps serving) and is tried again after a backoff starting at
`RETRY_S` (doubling up to `RETRY_MAX_S`); a redeploy with a fixed requirement is a new revision,
built at once. After each build, complete environments past `max_bytes` are evicted, least recently
used first, sparing every one a known revision uses (running, rolling out or recorded).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from cirrus import envs
from cirrus.spec import Deployment

log = logging.getLogger("cirrus.controller")
RETRY_S = 60.0
RETRY_MAX_S = 900.0
DEFAULT_MAX_BYTES = 20 * 2**30
INDEX = "revisions.json"
Key = tuple[str, int]  # (API, revision)


@dataclass
class EnvBuild:
    """One revision's environment, as `cirrus get` shows it."""

    state: str = "pending"  # pending | resolving | building | ready | failed
    key: str | None = None
    python: str | None = None
    error: str | None = None
    log: str | None = None  # the build log
    reused: bool = False  # a complete environment with its key was there: nothing was built
    build_s: float | None = None
    started_at: float | None = None
    failures: int = 0

    def describe(self) -> str:
        if self.state == "failed":
            return f"the API's Python environment could not be built: {self.error} (log: {self.log})"
        if self.state == "building":
            return f"building the API's Python environment {self.key} (log: {self.log})"
        return "resolving the API's Python requirements"


@dataclass
class _Revision:
    build: EnvBuild
    task: asyncio.Task[None] | None = None
    retry_at: float = 0.0


@dataclass
class EnvUse:
    """One environment on disk and the revisions that use it (`cirrus envs list`)."""

    info: envs.EnvInfo
    used_by: list[str]
    building: bool


@dataclass
class EnvBuilder:
    root: Path = field(default_factory=lambda: Path(tempfile.gettempdir()) / "cirrus-envs")  # the daemon's: its home
    clock: Callable[[], float] = time.monotonic
    max_bytes: int = DEFAULT_MAX_BYTES
    on_change: Callable[[], None] | None = None  # a build ended (the controller reconciles at once)
    _revisions: dict[Key, _Revision] = field(default_factory=dict)
    _building: set[str] = field(default_factory=set)  # keys being built now
    _locks: dict[str, threading.Lock] = field(default_factory=dict)
    _guard: threading.Lock = field(default_factory=threading.Lock)
    _pool: ThreadPoolExecutor = field(default_factory=lambda: ThreadPoolExecutor(2, thread_name_prefix="cirrus-env"))

    def ready(self, key: Key, deployment: Deployment, code_dir: Callable[[], str]) -> bool:
        """Whether the revision's replicas may start (no `python:`, or its environment is built); until
        then its build is started (or retried after a failure). `code_dir()`: where its code lies."""
        if deployment.spec.python is None:
            return True
        revision = self._revisions.get(key)
        if revision is None:
            revision = self._revisions[key] = _Revision(EnvBuild(log=str(self.log_path(key))))
            recorded = self._index().get(_name(key))
            if recorded is not None and envs.is_complete(self.root / recorded):
                self._done(revision.build, recorded, reused=True)  # after a restart: no resolve, no build
                envs.touch(self.root / recorded)
        if revision.build.state == "ready":
            return True
        if revision.task is None and self.clock() >= revision.retry_at:
            try:
                where = code_dir()
            except Exception as exc:  # its snapshot cannot be unpacked: said like a failed build
                revision.build.state, revision.build.error = "failed", f"its code cannot be unpacked: {exc}"
                revision.retry_at = self.clock() + RETRY_S
                return False
            revision.task = asyncio.get_running_loop().create_task(self._build(key, revision, deployment, where))
        return False

    def interpreter(self, key: Key) -> str | None:
        """The revision's environment's python once built (None: it has none, or not yet)."""
        revision = self._revisions.get(key)
        return revision.build.python if revision is not None else None

    def status(self, key: Key) -> EnvBuild | None:
        revision = self._revisions.get(key)
        return None if revision is None else revision.build

    def waiting_reason(self, key: Key) -> str | None:
        build = self.status(key)
        return None if build is None or build.state == "ready" else build.describe()

    def failure(self, key: Key) -> str | None:
        build = self.status(key)
        return build.describe() if build is not None and build.state == "failed" else None

    def forget(self, api: str) -> None:
        for key in [k for k in self._revisions if k[0] == api]:
            self.release(key)
        index = self._index()
        stale = [name for name in index if name.rsplit("/", 1)[0] == api]
        if stale:
            self._save_index({k: v for k, v in index.items() if k not in stale})

    def release(self, key: Key) -> None:
        """A revision that runs no replica any more: its environment may be evicted from now on."""
        revision = self._revisions.pop(key, None)
        if revision is not None and revision.task is not None:
            revision.task.cancel()
        if revision is not None and revision.build.key is not None and (self.root / revision.build.key).is_dir():
            envs.touch(self.root / revision.build.key)  # its last use: least recently used go first
        index = self._index()
        if index.pop(_name(key), None) is not None:
            self._save_index(index)
        self.log_path(key).unlink(missing_ok=True)

    def log_path(self, key: Key) -> Path:
        return self.root / envs.LOGS / f"{key[0]}.{key[1]}.log"

    def in_use(self) -> set[str]:
        keys = {r.build.key for r in list(self._revisions.values()) if r.build.key is not None}
        return keys | set(self._index().values()) | set(self._building)

    async def _build(self, key: Key, revision: _Revision, deployment: Deployment, code_dir: str) -> None:
        build = revision.build
        loop = asyncio.get_running_loop()
        build.state, build.error, build.started_at = "resolving", None, time.time()
        try:
            env_key = await loop.run_in_executor(self._pool, self._resolve_and_build, key, build, deployment, code_dir)
        except Exception as exc:
            build.state, build.error = "failed", str(exc) or type(exc).__name__
            build.failures += 1
            delay = min(RETRY_MAX_S, RETRY_S * 2 ** (build.failures - 1))
            revision.retry_at = self.clock() + delay
            log.error("%s revision %d: %s (retrying in %.0fs)", key[0], key[1], build.describe(), delay)
            return
        finally:
            revision.task = None
            if self.on_change is not None:
                self.on_change()
        if self._revisions.get(key) is not revision:
            return  # released meanwhile
        self._done(build, env_key, reused=build.reused)
        index = self._index()
        index[_name(key)] = env_key
        self._save_index(index)
        what = "reused" if build.reused else f"built in {build.build_s:.1f}s"
        log.info("%s revision %d: Python environment %s %s", key[0], key[1], env_key, what)
        if not build.reused:
            await loop.run_in_executor(self._pool, self.evict)

    def _done(self, build: EnvBuild, env_key: str, reused: bool) -> None:
        build.key, build.reused = env_key, reused
        build.python = str(envs.python_of(self.root / env_key))
        build.state, build.error = "ready", None

    def _resolve_and_build(self, key: Key, build: EnvBuild, deployment: Deployment, code_dir: str) -> str:
        """In a thread: resolve the request, then build its environment unless a complete one is there."""
        python = deployment.spec.python
        assert python is not None
        log_file = self.log_path(key)
        log_file.parent.mkdir(parents=True, exist_ok=True)
        log_file.write_text(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} {key[0]} revision {key[1]}\n")
        request = envs.request_of(python, code_dir)
        last = self.root / ".work" / f"request-{request.digest}.resolved"  # its last resolution
        try:
            resolved = envs.resolve(request, self.root / ".work", log_file)
        except envs.EnvError as exc:
            if not last.is_file():
                raise
            resolved = last.read_text()  # the index is unreachable: the same request resolved before
            with log_file.open("a") as out:
                out.write(f"{exc}\nusing the pins this same request resolved to before:\n{resolved}")
        last.write_text(resolved)
        env_key = envs.env_key(resolved)
        build.key = env_key
        with self._lock(env_key):
            if envs.is_complete(self.root / env_key):
                build.reused = True
                envs.touch(self.root / env_key)
                with log_file.open("a") as out:
                    out.write(f"reusing the complete environment {env_key}: nothing to build\n")
                return env_key
            build.state = "building"
            self._building.add(env_key)
            started = time.monotonic()
            try:
                envs.build(self.root, env_key, resolved, log_file)
            finally:
                self._building.discard(env_key)
            build.build_s = round(time.monotonic() - started, 3)
        return env_key

    def _lock(self, env_key: str) -> threading.Lock:
        with self._guard:
            return self._locks.setdefault(env_key, threading.Lock())

    def evict(self) -> list[envs.EnvInfo]:
        """Remove least recently used environments past `max_bytes`, none in use (in a thread)."""
        with self._guard:
            in_use = self.in_use()
        chosen = envs.choose_evictions(envs.list_envs(self.root), in_use, self.max_bytes)
        for env in chosen:
            log.info("evicting the Python environment %s (%d MB, unused)", env.key, env.size_bytes // 2**20)
            envs.remove(env)
        return chosen

    def listing(self) -> list[EnvUse]:
        """Every environment on disk with the revisions using it (in a thread: sizes walk the disk)."""
        users: dict[str, list[str]] = {}
        for name, env_key in self._index().items():
            users.setdefault(env_key, []).append(name)
        for key, revision in list(self._revisions.items()):  # (in a thread: a copy)
            if revision.build.key is not None and _name(key) not in users.get(revision.build.key, []):
                users.setdefault(revision.build.key, []).append(_name(key))
        return [
            EnvUse(info, sorted(users.get(info.key, [])), info.key in self._building)
            for info in envs.list_envs(self.root)
        ]

    def prune(self, dry_run: bool = False) -> list[envs.EnvInfo]:
        """Remove every environment no known revision uses, and unfinished builds (in a thread)."""
        in_use = self.in_use()
        chosen = [e for e in envs.list_envs(self.root) if e.key not in in_use]
        if not dry_run:
            for env in chosen:
                envs.remove(env)
        return chosen

    # --- the index of which revision uses which environment ------------------------------------
    def _index(self) -> dict[str, str]:
        try:
            data = json.loads((self.root / INDEX).read_text())
        except (OSError, ValueError):
            return {}
        return {str(k): str(v) for k, v in data.items()} if isinstance(data, dict) else {}

    def _save_index(self, index: dict[str, str]) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.root / f".{INDEX}.{os.getpid()}.{threading.get_ident()}"
        tmp.write_text(json.dumps(index, indent=1, sort_keys=True))
        os.replace(tmp, self.root / INDEX)


def _name(key: Key) -> str:
    return f"{key[0]}/{key[1]}"
