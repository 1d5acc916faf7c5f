"""The model disk cache: each model fetched once, verified, and kept under a key of what it is.

Layout under `root` (normally `$CIRRUS_HOME/models`):

    <key[:2]>/<key>/          the model's files (what `fetch` returns, or the file inside it for a
                              single-file source); never written again once there
    <key[:2]>/<key>.json      its manifest (the listing, checksums, when fetched); present only for a
                              complete entry; its mtime is the entry's last use (LRU)
    .partial/<key>/           a download in progress, file by file; kept across interruptions
    .locks/<key>.lock         flock(2) per key: one fetch (thread or process) downloads, others wait

The key is the SHA-256 of the source's canonical URL, the version label and the sorted listing
(relative path, size, identity: the ETag for S3, the mtime for a local file), so a changed object
is a new entry and an unchanged one is a hit without reading a byte of it.

A download resumes: a file in `.partial/` continues from its current size with ranged reads, in
chunks, and is verified once complete (size; the MD5 for an S3 object with a plain single-part
ETag; the SHA-256 of the source for a local file). A file that fails verification is deleted and
the fetch raises. The complete directory is renamed into place in one step, and its manifest after
it (an entry without a manifest is incomplete and is fetched again).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cirrus.models.sources import ModelError, ModelSource, ModelSourceError, SourceFile, describe_source

ProgressCallback = Callable[[int, int], None]  # (bytes done, bytes total)

DEFAULT_CHUNK_BYTES = 8 * 2**20
DEFAULT_MARGIN_BYTES = 64 * 2**20  # kept free beyond the model itself
DEFAULT_LOCK_TIMEOUT_S = 6 * 3600.0  # how long a fetch waits for another fetch of the same model
MANIFEST_FORMAT = 1
_PARTIAL = ".partial"
_LOCKS = ".locks"


class ModelCacheError(ModelError, RuntimeError):
    """A model that could not be fetched into the cache; the message says which and why."""


def disk_free_bytes(path: Path) -> int:
    """Bytes available to this user on the file system holding `path`."""
    return shutil.disk_usage(path).free


def format_bytes(count: float) -> str:
    for unit, size in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if count >= size:
            value = count / size
            return f"{value:.1f} {unit}" if value < 10 else f"{value:.0f} {unit}"
    return f"{int(count)} bytes"


def cache_key(source: ModelSource) -> str:
    listing = sorted([f.path, f.size, f.identity] for f in source.files)
    blob = json.dumps({"url": source.url, "version": source.version, "files": listing}, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()


@dataclass(frozen=True)
class CacheEntry:
    """A complete model in the cache."""

    key: str
    url: str
    version: str | None
    directory: Path  # the entry's directory
    path: Path  # what `fetch` returns: the directory, or the one file of a single-file source
    size: int  # bytes of model files
    last_used: float  # epoch seconds (the manifest's mtime)


class ModelCache:
    """Fetches model sources into `root`, once each; see the module docstring for the layout.

    `storage_options` maps a protocol to its fsspec filesystem's keyword arguments, e.g.
    `{"s3": {"endpoint_url": settings.s3_endpoint_url}}`; `free_bytes` is injectable for tests.
    `fetch` blocks (run it in a thread from async code)."""

    def __init__(
        self,
        root: Path,
        free_bytes: Callable[[Path], int] = disk_free_bytes,
        *,
        storage_options: Mapping[str, Mapping[str, Any]] | None = None,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        margin_bytes: int = DEFAULT_MARGIN_BYTES,
        lock_timeout_s: float = DEFAULT_LOCK_TIMEOUT_S,
    ) -> None:
        if chunk_bytes <= 0:
            raise ValueError("chunk_bytes must be positive")
        self.root = Path(root)
        self.free_bytes = free_bytes
        self.storage_options = {k: dict(v) for k, v in (storage_options or {}).items()}
        self.chunk_bytes = chunk_bytes
        self.margin_bytes = margin_bytes
        self.lock_timeout_s = lock_timeout_s

    # --- paths ------------------------------------------------------------------------------

    def entry_dir(self, key: str) -> Path:
        return self.root / key[:2] / key

    def manifest_file(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.json"

    def partial_dir(self, key: str) -> Path:
        return self.root / _PARTIAL / key

    # --- fetching ---------------------------------------------------------------------------

    def describe(self, source_url: str, version: str | None = None) -> ModelSource:
        """List a source (raises `ModelSourceError` with a clear message)."""
        return describe_source(source_url, version, self.storage_options)

    def identity(self, source_url: str, version: str | None = None) -> str:
        """The cache key of what the source holds now: it changes when the source's content does."""
        return cache_key(self.describe(source_url, version))

    def fetch(
        self,
        source_url: str,
        version: str | None = None,
        progress: ProgressCallback | None = None,
        *,
        name: str | None = None,
    ) -> Path:
        """The local path of the model at `source_url`, downloading what the cache lacks.

        `progress(done, total)` is called with bytes (including those already present from an
        interrupted fetch) as the download goes on, and once with `(total, total)` on a hit; an
        exception it raises stops the fetch, keeping what was downloaded for the next one.
        `name` (the spec's model name) only labels error messages."""
        source = self.describe(source_url, version)
        key = cache_key(source)
        label = f"{name!r} ({source.url})" if name else source.url
        with self._locked(key, label):
            path = self._hit(source, key)
            if path is None:
                path = self._download(source, key, label, progress)
            elif progress is not None:
                progress(source.total_bytes, source.total_bytes)
            return path

    def _result_path(self, source: ModelSource, key: str) -> Path:
        directory = self.entry_dir(key)
        return directory / source.files[0].path if source.kind == "file" else directory

    def _hit(self, source: ModelSource, key: str) -> Path | None:
        """The entry's path when it is complete (sizes checked); a broken one is removed."""
        manifest = self.manifest_file(key)
        directory = self.entry_dir(key)
        if manifest.exists():
            try:
                for f in source.files:
                    if (directory / f.path).stat().st_size != f.size:
                        raise FileNotFoundError(f.path)
            except OSError:
                pass  # damaged (a file removed or truncated by hand): fetched again below
            else:
                with contextlib.suppress(OSError):
                    os.utime(manifest)  # last use, for LRU eviction
                return self._result_path(source, key)
        self._remove_entry(key)
        return None

    def _download(self, source: ModelSource, key: str, label: str, progress: ProgressCallback | None) -> Path:
        partial = self.partial_dir(key)
        partial.mkdir(parents=True, exist_ok=True)
        present: dict[str, int] = {}
        for f in source.files:
            target = partial / f.path
            size = target.stat().st_size if target.is_file() else 0
            if size > f.size:  # cannot be a prefix of this file
                target.unlink()
                size = 0
            present[f.path] = size
        total = source.total_bytes
        done = sum(present.values())
        self._check_space(label, total - done, done)
        if progress is not None:
            progress(done, total)
        checksums: dict[str, dict[str, str]] = {}
        for f in source.files:
            target = partial / f.path
            target.parent.mkdir(parents=True, exist_ok=True)

            def advance(count: int) -> None:
                nonlocal done
                done += count
                if progress is not None:
                    progress(done, total)

            try:
                checksums[f.path] = self._fetch_file(source, f, target, present[f.path], advance)
            except OSError as exc:
                if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
                    raise
                raise ModelCacheError(
                    f"model {label}: the disk under {self.root} filled up during the download; free some space "
                    "and fetch again (it resumes)"
                ) from None
        return self._publish(source, key, checksums)

    def _check_space(self, label: str, needed: int, present: int) -> None:
        free = self.free_bytes(self.root)
        if needed + self.margin_bytes <= free:
            return
        resumed = f" (after the {format_bytes(present)} already downloaded)" if present else ""
        raise ModelCacheError(
            f"model {label} needs {format_bytes(needed)}{resumed} but only {format_bytes(free)} are free under "
            f"{self.root} (plus a margin of {format_bytes(self.margin_bytes)}); free some space, or point "
            "CIRRUS_HOME at a larger disk"
        )

    def _fetch_file(
        self, source: ModelSource, f: SourceFile, target: Path, offset: int, advance: Callable[[int], None]
    ) -> dict[str, str]:
        """Download (the rest of) one file into `target` and verify it; returns its checksums."""
        expected: tuple[str, str] | None = None
        if f.etag_md5 is not None:
            expected = ("md5", f.etag_md5)
        elif source.is_local:
            expected = ("sha256", source.sha256(f))
        digest = hashlib.new(expected[0]) if expected else None
        if digest is not None and offset:
            with target.open("rb") as existing:
                remaining = offset
                while remaining > 0 and (chunk := existing.read(min(self.chunk_bytes, remaining))):
                    digest.update(chunk)
                    remaining -= len(chunk)
        with target.open("ab") as out:
            position = offset
            while position < f.size:
                end = min(position + self.chunk_bytes, f.size)
                data = source.read(f, position, end)
                if len(data) != end - position:
                    out.close()
                    target.unlink()
                    raise ModelCacheError(
                        f"{source.url}: {f.path}: the source returned {len(data)} bytes at offset {position} "
                        f"where {end - position} were expected (did it change during the fetch?); fetch again"
                    )
                out.write(data)
                out.flush()
                if digest is not None:
                    digest.update(data)
                position = end
                advance(len(data))
            os.fsync(out.fileno())
        size = target.stat().st_size
        if size != f.size:
            target.unlink()
            raise ModelCacheError(f"{source.url}: {f.path}: downloaded {size} bytes, expected {f.size}; fetch again")
        if digest is not None and expected is not None:
            got = digest.hexdigest()
            if got != expected[1]:
                target.unlink()
                raise ModelCacheError(
                    f"{source.url}: {f.path}: the downloaded content does not match its {expected[0]} "
                    f"({got}, expected {expected[1]}); the file was deleted, fetch again"
                )
        source.check_unchanged(f)
        return {expected[0]: expected[1]} if expected else {}

    def _publish(self, source: ModelSource, key: str, checksums: dict[str, dict[str, str]]) -> Path:
        """Move a complete download into place: the directory, then its manifest."""
        partial = self.partial_dir(key)
        manifest = {
            "format": MANIFEST_FORMAT,
            "key": key,
            "url": source.url,
            "version": source.version,
            "kind": source.kind,
            "total_bytes": source.total_bytes,
            "fetched_at": time.time(),
            "files": [
                {"path": f.path, "size": f.size, "identity": f.identity, **checksums.get(f.path, {})}
                for f in source.files
            ],
        }
        pending_manifest = partial.with_name(f"{key}.json")
        _write_durably(pending_manifest, json.dumps(manifest, indent=1).encode())
        directory = self.entry_dir(key)
        directory.parent.mkdir(parents=True, exist_ok=True)
        if directory.exists():
            shutil.rmtree(directory)  # an incomplete leftover: no manifest (checked by _hit)
        os.rename(partial, directory)
        os.replace(pending_manifest, self.manifest_file(key))
        _fsync_dir(directory.parent)
        return self._result_path(source, key)

    # --- inspecting and evicting ----------------------------------------------------------------

    def entries(self) -> list[CacheEntry]:
        """Every complete entry, least recently used first."""
        found = []
        if not self.root.is_dir():
            return []
        for manifest in self.root.glob("??/*.json"):
            entry = self._entry(manifest)
            if entry is not None:
                found.append(entry)
        return sorted(found, key=lambda e: (e.last_used, e.key))

    def _entry(self, manifest: Path) -> CacheEntry | None:
        try:
            data = json.loads(manifest.read_bytes())
            last_used = manifest.stat().st_mtime
            key = str(data["key"])
            files = data["files"]
            directory = self.entry_dir(key)
            path = directory / files[0]["path"] if data["kind"] == "file" else directory
            return CacheEntry(
                key=key,
                url=str(data["url"]),
                version=data.get("version"),
                directory=directory,
                path=path,
                size=sum(int(f["size"]) for f in files),
                last_used=last_used,
            )
        except (OSError, ValueError, KeyError, TypeError, IndexError):
            return None

    def evict(
        self, keep_bytes: int | None = None, in_use: Iterable[Path] = (), *, keep_entries: int | None = None
    ) -> list[CacheEntry]:
        """Remove least recently used entries until at most `keep_bytes` of models and at most
        `keep_entries` entries remain (None: no limit of that kind).

        Entries holding a path in `in_use` (what `fetch` returned to running replicas) and entries
        being fetched right now are kept (and still counted). Returns the removed entries. Partial
        downloads are not counted or removed."""
        busy = {Path(p).resolve() for p in in_use}
        entries = self.entries()
        total = sum(e.size for e in entries)
        count = len(entries)
        removed = []
        for entry in entries:
            if (keep_bytes is None or total <= keep_bytes) and (keep_entries is None or count <= keep_entries):
                break
            directory = entry.directory.resolve()
            if any(p == directory or p.is_relative_to(directory) for p in busy):
                continue
            with self._try_locked(entry.key) as locked:
                if not locked:
                    continue
                self._remove_entry(entry.key)
            total -= entry.size
            count -= 1
            removed.append(entry)
        return removed

    def _remove_entry(self, key: str) -> None:
        """The manifest first (the entry is incomplete from then on), then the files."""
        with contextlib.suppress(FileNotFoundError):
            self.manifest_file(key).unlink()
        shutil.rmtree(self.entry_dir(key), ignore_errors=True)

    # --- locking ------------------------------------------------------------------------------

    def _lock_fd(self, key: str) -> int:
        locks = self.root / _LOCKS
        locks.mkdir(parents=True, exist_ok=True)
        return os.open(locks / f"{key}.lock", os.O_RDWR | os.O_CREAT, 0o644)

    @contextlib.contextmanager
    def _locked(self, key: str, label: str) -> Iterator[None]:
        fd = self._lock_fd(key)
        try:
            deadline = time.monotonic() + self.lock_timeout_s
            delay = 0.01
            while not _try_flock(fd):
                if time.monotonic() >= deadline:
                    raise ModelCacheError(
                        f"model {label}: waited {self.lock_timeout_s:g}s for another fetch of it to finish"
                    )
                time.sleep(delay)
                delay = min(delay * 2, 0.5)
            yield
        finally:
            os.close(fd)  # releases the lock

    @contextlib.contextmanager
    def _try_locked(self, key: str) -> Iterator[bool]:
        fd = self._lock_fd(key)
        try:
            yield _try_flock(fd)
        finally:
            os.close(fd)


def _try_flock(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
            return False
        raise
    return True


def _write_durably(path: Path, data: bytes) -> None:
    with path.open("wb") as out:
        out.write(data)
        out.flush()
        os.fsync(out.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


__all__ = [
    "CacheEntry",
    "ModelCache",
    "ModelCacheError",
    "ModelError",
    "ModelSourceError",
    "cache_key",
    "disk_free_bytes",
    "format_bytes",
]
