"""Whole files at a local path or an fsspec URL: a batch job's items in, its results out.

A local path (or `file://`) needs nothing beyond the standard library; any other URL (`s3://`,
`gs://`, `memory://`, ...) goes through fsspec, imported only then.

Results are written whole: locally to a hidden temporary name in the same directory, then renamed,
so a worker killed mid-write never leaves half a part file (only a `.part-*.tmp` that the job
manager removes at the end); through fsspec as one `open(..., "wb")` (object stores such as S3
publish an object only when its upload completes).
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import Any


class FileError(ValueError):
    """A file or URL that cannot be read or written; the message says which and why."""


def is_local(url: str) -> bool:
    return "://" not in url or url.startswith("file://")


def local_path(url: str) -> Path:
    """The file-system path of a local URL; FileError for one no file can have: a NUL byte, or
    `~user` of no such user."""
    raw = url.removeprefix("file://")
    if "\x00" in raw:
        raise FileError(f"{url!r}: a path cannot hold a NUL byte")
    try:
        return Path(raw).expanduser()
    except RuntimeError:  # pathlib: no home directory for that ~user
        raise FileError(f"{url}: {raw.partition('/')[0]} is not the home directory of a known user") from None


def _fs(url: str) -> tuple[Any, str]:
    try:
        import fsspec
    except ImportError:
        raise FileError(f"{url}: reading or writing URLs needs fsspec: pip install fsspec") from None
    try:
        fs, path = fsspec.core.url_to_fs(url, **_options(url))
    except (ImportError, ValueError) as exc:
        raise FileError(f"{url}: {exc}") from None
    return fs, path


def _options(url: str) -> dict[str, Any]:
    """The filesystem's options: an S3-compatible server's endpoint (CIRRUS_S3_ENDPOINT_URL) for s3://,
    as model sources use (the daemon passes it to its replicas, on every node)."""
    if not url.startswith(("s3://", "s3a://")):
        return {}
    from cirrus.settings import Settings

    endpoint = Settings.from_env().s3_endpoint_url
    return {"endpoint_url": endpoint} if endpoint else {}


def _reason(exc: Exception) -> str:
    """What went wrong, for a message: an OSError's text; another error (a filesystem's own, e.g.
    botocore's EndpointConnectionError, which is no OSError) with its type."""
    if isinstance(exc, OSError):
        return exc.strerror or str(exc) or type(exc).__name__
    return f"{type(exc).__name__}: {exc}"


def read_bytes(url: str, limit: int) -> bytes:
    """The whole content of a file or URL, at most `limit` bytes."""
    try:
        if is_local(url):
            path = local_path(url)
            if path.is_dir():
                raise FileError(f"{url}: is a directory, not an items file")
            with path.open("rb") as handle:
                data = handle.read(limit + 1)
        else:
            fs, path_in_fs = _fs(url)
            with fs.open(path_in_fs, "rb") as handle:
                data = handle.read(limit + 1)
    except FileError:
        raise
    except FileNotFoundError:
        raise FileError(f"{url}: no such file") from None
    except Exception as exc:  # OSError, or a remote filesystem's own error (unreachable endpoint, ...)
        raise FileError(f"{url}: cannot read: {_reason(exc)}") from None
    if len(data) > limit:
        raise FileError(f"{url}: larger than the limit of {limit} bytes")
    return data


def prepare_dir(url: str) -> str:
    """Make sure a results directory exists and is writable; returns its normalised URL."""
    if is_local(url):
        path = local_path(url).resolve()
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise FileError(f"{url}: cannot create the results directory: {_reason(exc)}") from None
        if not os.access(path, os.W_OK | os.X_OK):
            raise FileError(f"{url}: the results directory is not writable")
        return str(path)
    fs, path_in_fs = _fs(url)
    try:
        fs.makedirs(path_in_fs, exist_ok=True)
    except Exception as exc:  # OSError, or a remote filesystem's own error (unreachable endpoint, ...)
        raise FileError(f"{url}: cannot create the results location: {_reason(exc)}") from None
    return url.rstrip("/")


def write_file(directory: str, name: str, data: bytes) -> None:
    """Write `directory/name` whole: readers see the old file or the new one, never a part."""
    if is_local(directory):
        target = local_path(directory) / name
        temporary = target.with_name(f".{name}.{secrets.token_hex(4)}.tmp")
        try:
            with temporary.open("wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(temporary, target)
        except BaseException:
            temporary.unlink(missing_ok=True)
            raise
        return
    fs, path_in_fs = _fs(directory)
    with fs.open(f"{path_in_fs.rstrip('/')}/{name}", "wb") as handle:
        handle.write(data)


def remove_temporaries(directory: str) -> int:
    """Delete the temporary files killed writers left in a local results directory."""
    if not is_local(directory):
        return 0
    removed = 0
    for leftover in local_path(directory).glob(".part-*.tmp"):
        leftover.unlink(missing_ok=True)
        removed += 1
    return removed


def part_name(index: int) -> str:
    """The results file of batch `index`."""
    return f"part-{index:06d}.jsonl"
