"""Model sources: what a spec's `models[].path` points at, listed file by file.

A source is a local file or directory (a plain path or `file://`), read with the standard library,
or any fsspec URL (`s3://bucket/prefix/`, `gs://...`, `memory://...`), read through fsspec, which is
imported only then (and s3fs only for `s3://`). `describe_source` lists the files once: each with
its path relative to the source, its size and an identity (the ETag for S3, mtime and size for a
local file), from which the cache derives its key. Reading is by byte range, so a download can
resume where it stopped.

Everything that can go wrong with a path the user wrote is a `ModelSourceError` whose message
names the source and says what to do.
"""

from __future__ import annotations

import hashlib
import os
import posixpath
import re
import stat
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

S3_EXTRA_HINT = "pip install 'cirrus-serve[s3]'"
HASH_CHUNK_BYTES = 8 * 2**20
_PLAIN_MD5_ETAG = re.compile(r"^[0-9a-f]{32}$")
# keys of an fsspec `info` dict that change when an object's content does, best first
_IDENTITY_KEYS = ("ETag", "etag", "md5Hash", "crc32c", "checksum", "mtime", "LastModified", "last_modified", "updated")


class ModelError(Exception):
    """A model that cannot be made available to replicas (a bad source, or a failed fetch)."""


class ModelSourceError(ModelError, ValueError):
    """A model source that cannot be listed or read; the message says which and why."""


@dataclass(frozen=True)
class SourceFile:
    """One file of a model source."""

    path: str  # relative to the source, '/'-separated; for a single-file source, its name
    size: int
    identity: str  # 'etag:<hex>' (S3), 'mtime:<ns>' (local), or another '<kind>:<value>'
    location: str  # where the reader finds it: an absolute local path, or the path inside the filesystem

    @property
    def etag_md5(self) -> str | None:
        """The MD5 of the content when the identity is a plain (single-part upload) S3 ETag."""
        kind, _, value = self.identity.partition(":")
        if kind == "etag" and _PLAIN_MD5_ETAG.fullmatch(value):
            return value
        return None


@dataclass(frozen=True)
class ModelSource:
    """A listed source: its canonical URL, whether it is one file or a directory, and its files."""

    url: str  # canonical: an absolute local path, or '<protocol>://<path>' without a trailing '/'
    protocol: str  # 'file' for local paths
    kind: Literal["file", "directory"]
    files: tuple[SourceFile, ...]
    version: str | None = None
    storage_options: Mapping[str, Any] | None = None
    filesystem: Any = field(default=None, compare=False, repr=False)  # the fsspec filesystem of a URL

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)

    @property
    def is_local(self) -> bool:
        return self.protocol == "file"

    def read(self, file: SourceFile, start: int, end: int) -> bytes:
        """Bytes `[start, end)` of `file` (a ranged GET for object stores)."""
        if end <= start:
            return b""
        try:
            if self.is_local:
                with open(file.location, "rb") as handle:
                    handle.seek(start)
                    return handle.read(end - start)
            fs = self.filesystem or _filesystem(self.url, self.protocol, self.storage_options)
            data: bytes = fs.cat_file(file.location, start=start, end=end)
            return data
        except Exception as exc:
            raise _source_error(f"{self.url}: reading {file.path}", exc) from exc

    def sha256(self, file: SourceFile) -> str:
        """The SHA-256 of a local file's content (read whole; used to verify a local copy)."""
        digest = hashlib.sha256()
        try:
            with open(file.location, "rb") as handle:
                while chunk := handle.read(HASH_CHUNK_BYTES):
                    digest.update(chunk)
        except OSError as exc:
            raise _source_error(f"{self.url}: reading {file.path}", exc) from exc
        return digest.hexdigest()

    def check_unchanged(self, file: SourceFile) -> None:
        """A local file must not change while it is copied (its identity is its mtime and size)."""
        if not self.is_local:
            return
        try:
            st = os.stat(file.location)
        except OSError as exc:
            raise _source_error(f"{self.url}: {file.path}", exc) from exc
        if st.st_size != file.size or f"mtime:{st.st_mtime_ns}" != file.identity:
            raise ModelSourceError(f"{self.url}: {file.path} changed while it was being copied; fetch it again")


def is_local(url: str) -> bool:
    return "://" not in url or url.startswith("file://")


def describe_source(
    url: str, version: str | None = None, storage_options: Mapping[str, Mapping[str, Any]] | None = None
) -> ModelSource:
    """List a model source. `storage_options` maps a protocol ('s3') to the keyword arguments of
    its fsspec filesystem, e.g. `{"s3": {"endpoint_url": "http://127.0.0.1:9000"}}`."""
    if not url or not url.strip():
        raise ModelSourceError("a model path must not be empty")
    if is_local(url):
        return _describe_local(url, version)
    protocol = url.split("://", 1)[0].lower()
    options = dict((storage_options or {}).get(protocol, {}))
    return _describe_fsspec(url, protocol, version, options)


# --- local --------------------------------------------------------------------------------------


def _describe_local(url: str, version: str | None) -> ModelSource:
    path = Path(url.removeprefix("file://")).expanduser().absolute()
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise ModelSourceError(f"{path}: no such file or directory") from None
    except OSError as exc:
        raise _source_error(str(path), exc) from None
    if stat.S_ISREG(st.st_mode):
        _check_readable(path, path)
        files: tuple[SourceFile, ...] = (_local_file(path, path.name, st),)
        return ModelSource(url=str(path), protocol="file", kind="file", files=files, version=version)
    if not stat.S_ISDIR(st.st_mode):
        raise ModelSourceError(f"{path}: neither a file nor a directory")
    found: list[SourceFile] = []

    def walk_error(exc: OSError) -> None:
        raise exc

    try:
        for dirpath, dirnames, filenames in os.walk(path, onerror=walk_error):
            dirnames.sort()
            for name in sorted(filenames):
                full = Path(dirpath) / name
                file_stat = os.stat(full)  # follows symlinks: a link to a file is that file
                if not stat.S_ISREG(file_stat.st_mode):
                    continue
                _check_readable(path, full)
                found.append(_local_file(full, full.relative_to(path).as_posix(), file_stat))
    except ModelSourceError:
        raise
    except OSError as exc:
        raise _source_error(str(path), exc) from None
    if not found:
        raise ModelSourceError(f"{path}: the directory holds no files")
    return ModelSource(url=str(path), protocol="file", kind="directory", files=tuple(found), version=version)


def _local_file(full: Path, relative: str, st: os.stat_result) -> SourceFile:
    return SourceFile(path=relative, size=st.st_size, identity=f"mtime:{st.st_mtime_ns}", location=str(full))


def _check_readable(source: Path, full: Path) -> None:
    if not os.access(full, os.R_OK):
        where = str(full) if full == source else f"{source}: {full.relative_to(source)}"
        raise ModelSourceError(f"{where}: permission denied (the Cirrus daemon's user cannot read it)")


# --- fsspec -------------------------------------------------------------------------------------


def _filesystem(url: str, protocol: str, options: Mapping[str, Any] | None) -> Any:
    if protocol in ("s3", "s3a"):
        try:
            import s3fs  # noqa: F401  (fsspec would import it; checked here for a clearer message)
        except ImportError:
            raise ModelSourceError(f"{url}: reading s3:// models needs s3fs: {S3_EXTRA_HINT}") from None
    try:
        import fsspec
    except ImportError:
        raise ModelSourceError(f"{url}: reading URLs needs fsspec: pip install fsspec") from None
    try:
        cls = fsspec.get_filesystem_class(protocol)
    except ValueError:
        raise ModelSourceError(
            f"{url}: unknown protocol {protocol!r}; use a local path, s3://, or another fsspec protocol"
        ) from None
    except ImportError as exc:
        raise ModelSourceError(f"{url}: the {protocol}:// protocol needs a package not installed: {exc}") from None
    return cls(**dict(options or {}))


def _describe_fsspec(url: str, protocol: str, version: str | None, options: dict[str, Any]) -> ModelSource:
    fs = _filesystem(url, protocol, options)
    root = fs._strip_protocol(url).rstrip("/")
    if not root:
        raise ModelSourceError(f"{url}: name a bucket or directory, not the root of the store")
    canonical = f"{protocol}://{root}"
    try:
        fs.invalidate_cache(root)  # fsspec instances are shared and cache listings
        listing: dict[str, dict[str, Any]] = fs.find(root, detail=True, withdirs=False)
    except Exception as exc:
        raise _source_error(canonical, exc) from exc
    entries = [
        (name, info)
        for name, info in sorted(listing.items())
        if info.get("type", "file") == "file" and not name.endswith("/")
    ]
    if not entries:
        raise ModelSourceError(f"{canonical}: nothing there (no object at this key or under this prefix)")
    single = len(entries) == 1 and entries[0][0].rstrip("/") == root
    files = []
    for name, info in entries:
        relative = posixpath.basename(root) if single else posixpath.relpath(name, root)
        _check_relative(canonical, relative)
        size = int(info.get("size") or 0)
        files.append(SourceFile(path=relative, size=size, identity=_identity(info), location=name))
    return ModelSource(
        url=canonical,
        protocol=protocol,
        kind="file" if single else "directory",
        files=tuple(files),
        version=version,
        storage_options=options,
        filesystem=fs,
    )


def _identity(info: Mapping[str, Any]) -> str:
    for key in _IDENTITY_KEYS:
        value = info.get(key)
        if value:
            text = str(value.isoformat() if hasattr(value, "isoformat") else value).strip('"')
            kind = "etag" if key.lower() == "etag" else key.lower()
            return f"{kind}:{text}"
    return "size-only:"


def _check_relative(source: str, relative: str) -> None:
    parts = relative.split("/")
    if relative.startswith("/") or any(part in ("", ".", "..") for part in parts):
        raise ModelSourceError(f"{source}: refusing a file whose name escapes the model directory: {relative!r}")


# --- errors -------------------------------------------------------------------------------------

_CREDENTIAL_ERRORS = ("NoCredentialsError", "PartialCredentialsError", "CredentialRetrievalError")


def _source_error(where: str, exc: BaseException) -> ModelSourceError:
    """A clear message for an exception raised while listing or reading a source."""
    if isinstance(exc, ModelSourceError):
        return exc
    name = type(exc).__name__
    text = str(exc) or name
    if name in _CREDENTIAL_ERRORS or "credential" in text.lower():
        return ModelSourceError(
            f"{where}: no usable credentials ({text}); set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, "
            "AWS_PROFILE, or an instance role for the daemon"
        )
    if isinstance(exc, FileNotFoundError):
        return ModelSourceError(f"{where}: nothing there ({text})")
    if isinstance(exc, PermissionError):
        return ModelSourceError(
            f"{where}: permission denied ({text}); check the credentials and that they may read this path"
        )
    if isinstance(exc, OSError):
        return ModelSourceError(f"{where}: {exc.strerror or text}")
    return ModelSourceError(f"{where}: {name}: {text}")
