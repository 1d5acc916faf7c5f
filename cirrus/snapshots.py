"""Snapshots: an API revision's project directory, packed into an immutable, content-addressed archive.

    data, snapshot = pack(Path("my-api"))          # on the client
    snapshot = SnapshotStore(home / "snapshots").put(data)   # on the server, from untrusted bytes
    code_dir = store.unpacked(snapshot.digest)     # read-only tree of exactly the packed files

The archive is a PAX tar of regular files only, gzip-compressed (level 6, mtime 0, no file name).
Gzip rather than a bare tar: project directories are text that shrinks several times over, and the
bytes cross the network and stay on disk once per revision. The tar is canonical (sorted names,
mtime 0, uid/gid 0, no owner names, mode 0o644 or 0o755), so the same content packs to the same
bytes, and the SHA-256 of those bytes is the digest. A gzip built by another zlib may differ; that
only costs deduplication, as the store addresses whatever bytes it was given.

Store layout under `root`: `<digest>.tar.gz` (the archive, written once) and `<digest>/` (its
read-only unpacked tree); dot-names are work in progress.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import re
import shutil
import stat
import tarfile
import tempfile
import zlib
from collections.abc import Collection, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from pathspec import GitIgnoreSpec

from cirrus.models import format_bytes

if TYPE_CHECKING:
    from _typeshed import WriteableBuffer

DEFAULT_MAX_BYTES = 64 * 2**20  # uncompressed file content of one snapshot
ARCHIVE_OVERHEAD_BYTES = 16 * 2**20  # tar headers allowed beyond the content when reading an archive
IGNORE_FILE = ".cirrusignore"
ALWAYS_IGNORED = (
    *(".git/", "__pycache__/", "*.pyc", ".venv/", "venv/", ".mypy_cache/", ".pytest_cache/", ".ruff_cache/"),
    ".DS_Store",
)  # before the user's .cirrusignore lines, so a `!pattern` there can take one back
_SUFFIX = ".tar.gz"
_DIGEST = re.compile(r"[0-9a-f]{64}")
_CHUNK = 2**20


class SnapshotError(ValueError):
    """A directory that cannot be packed, or an archive that is not a valid snapshot; the message says why."""


@dataclass(frozen=True)
class Snapshot:
    digest: str  # SHA-256 hex of the archive bytes
    size: int  # archive bytes
    files: int  # files packed


@dataclass(frozen=True)
class _Entry:
    name: str  # POSIX path relative to the packed directory
    path: Path  # what to read (for a symlink, its target)
    size: int
    executable: bool


def pack(
    directory: Path, max_bytes: int = DEFAULT_MAX_BYTES, leave_out: Collection[str] = ()
) -> tuple[bytes, Snapshot]:
    """The canonical archive of `directory` (minus ignored files, and the root-relative paths in
    `leave_out`, e.g. the spec file, whose content the revision records itself) and its record."""
    root = directory.resolve()
    if not root.is_dir():
        raise SnapshotError(f"{directory} is not a directory; give the API's project directory")
    entries = _walk(root, ignore_spec(root), max_bytes, frozenset(leave_out))
    if not entries:
        raise SnapshotError(f"{directory} has no files to pack (all are ignored?); check {IGNORE_FILE}")
    buffer, total = io.BytesIO(), 0
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT, encoding="utf-8") as tar:
        for entry in entries:
            content = _read_file(entry, max_bytes - total)
            total += len(content)
            info = tarfile.TarInfo(entry.name)
            info.size, info.mode = len(content), 0o755 if entry.executable else 0o644
            tar.addfile(info, io.BytesIO(content))
    archive = buffer.getvalue()
    if len(archive) > max_bytes + ARCHIVE_OVERHEAD_BYTES:
        raise SnapshotError(f"{directory} has too many files ({len(entries)}); list generated ones in {IGNORE_FILE}")
    data = gzip.compress(archive, compresslevel=6, mtime=0)
    return data, Snapshot(hashlib.sha256(data).hexdigest(), len(data), len(entries))


def ignore_spec(root: Path) -> GitIgnoreSpec:
    """What a snapshot of `root` leaves out: ALWAYS_IGNORED, then its .cirrusignore (re-read on each call)."""
    lines = list(ALWAYS_IGNORED)
    ignore_file = root / IGNORE_FILE
    if ignore_file.is_file():
        try:
            lines += ignore_file.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise SnapshotError(f"cannot read {ignore_file}: {e}; it must be a UTF-8 text file") from e
    return GitIgnoreSpec.from_lines(lines)


def _walk(root: Path, ignore: GitIgnoreSpec, max_bytes: int, leave_out: frozenset[str]) -> list[_Entry]:
    """The files to pack, sorted by name; stops as soon as their sizes pass `max_bytes`."""
    entries: list[_Entry] = []
    total, pending = 0, [root]
    while pending:
        directory = pending.pop()
        try:
            items = sorted(os.scandir(directory), key=lambda item: item.name)
        except OSError as e:
            raise SnapshotError(f"cannot list {directory}: {e}; fix its permissions or list it in {IGNORE_FILE}") from e
        for item in items:
            path = Path(item.path)
            name = path.relative_to(root).as_posix()
            if item.is_dir(follow_symlinks=False):
                if not ignore.match_file(name + "/"):
                    pending.append(path)
            elif name not in leave_out and not ignore.match_file(name):
                entries.append(_entry(root, path, name))
                total += entries[-1].size
                if total > max_bytes:
                    raise _too_large(root, entries, max_bytes)
    return sorted(entries, key=lambda entry: entry.name)


def _entry(root: Path, path: Path, name: str) -> _Entry:
    fix = f"copy the file into the directory or list {name} in {IGNORE_FILE}"
    target = path
    if path.is_symlink():
        try:
            target = path.resolve(strict=True)
        except (OSError, RuntimeError) as e:
            raise SnapshotError(f"{path} is a dangling symlink; remove it, {fix}") from e
        if not target.is_relative_to(root):
            raise SnapshotError(f"{path} is a symlink to {target}, outside {root}; {fix}")
    try:
        info = target.stat()
    except OSError as e:
        raise SnapshotError(f"cannot read {path}: {e}; {fix}") from e
    if not stat.S_ISREG(info.st_mode):
        raise SnapshotError(f"{path} is not a regular file (a directory link, fifo, socket or device); {fix}")
    return _Entry(name, target, info.st_size, bool(info.st_mode & 0o111))


def _too_large(root: Path, entries: list[_Entry], max_bytes: int) -> SnapshotError:
    largest = sorted(entries, key=lambda entry: -entry.size)[:5]
    listing = ", ".join(f"{entry.name} ({format_bytes(entry.size)})" for entry in largest)
    return SnapshotError(
        f"{root} holds more than {format_bytes(max_bytes)} of files, the snapshot cap; largest: {listing}. "
        f"List large files in {IGNORE_FILE}, and ship model weights through the spec's `models:` field "
        "(a local path or an s3:// URL): they are fetched into the model cache instead of the snapshot"
    )


def _read_file(entry: _Entry, budget: int) -> bytes:
    try:
        with entry.path.open("rb") as file:
            content = file.read(budget + 1)
    except OSError as e:
        raise SnapshotError(f"cannot read {entry.path}: {e}; fix its permissions or list it in {IGNORE_FILE}") from e
    if len(content) > budget:
        raise SnapshotError(f"{entry.path} grew while being packed, past the snapshot cap; try again")
    return content


class _CappedReader(io.RawIOBase):
    """Reads a gzip stream, refusing to expand it past `limit` bytes (a gzip bomb stops there)."""

    def __init__(self, data: bytes, limit: int) -> None:
        super().__init__()
        self._stream, self._left = gzip.GzipFile(fileobj=io.BytesIO(data), mode="rb"), limit

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: WriteableBuffer) -> int:
        count = self._stream.readinto(memoryview(buffer)[: self._left + 1])
        self._left -= count
        if self._left < 0:
            raise SnapshotError("the archive expands past the snapshot cap; pack a smaller directory")
        return count

    def close(self) -> None:
        self._stream.close()
        super().close()


def _members(data: bytes, max_bytes: int) -> Iterator[tuple[str, bool, bytes]]:
    """(name, executable, content) of each file of an untrusted archive, checked as it is read."""
    seen: set[str] = set()
    parents: set[str] = set()
    total = 0
    try:
        source = _CappedReader(data, max_bytes + ARCHIVE_OVERHEAD_BYTES)
        with source, tarfile.open(fileobj=source, mode="r|") as tar:
            for member in tar:
                _check_member(member, seen, parents)
                total += member.size
                if total > max_bytes:
                    raise SnapshotError(f"the archive holds more than {format_bytes(max_bytes)} of files")
                file = tar.extractfile(member)
                content = file.read(member.size + 1) if file else b""
                if len(content) != member.size:
                    raise SnapshotError(f"the archive's {member.name!r} is truncated")
                yield member.name, member.mode == 0o755, content
    except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
        raise SnapshotError(f"not a valid snapshot archive ({e}); make it with cirrus.snapshots.pack") from e


def _check_member(member: tarfile.TarInfo, seen: set[str], parents: set[str]) -> None:
    name = member.name
    parts = name.split("/")
    if not member.isreg() or member.mode not in (0o644, 0o755):
        raise SnapshotError(f"the archive's {name!r} is not a plain 0o644 or 0o755 file (links, devices are refused)")
    if name.startswith("/") or any(part in ("", ".", "..") for part in parts) or "\\" in name or "\0" in name:
        raise SnapshotError(f"the archive's member name {name!r} is absolute or leaves the snapshot")
    tarfile.data_filter(member, "/snapshot")  # the standard library's checks too
    prefixes = {"/".join(parts[:i]) for i in range(1, len(parts))}
    if name in seen or name in parents or prefixes & seen:
        raise SnapshotError(f"the archive's {name!r} clashes with another member of the same name")
    seen.add(name)
    parents.update(prefixes)


class SnapshotStore:
    """Snapshots on disk under `root`, each archive written once and unpacked once."""

    def __init__(self, root: Path, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        self.root, self.max_bytes = root, max_bytes
        root.mkdir(mode=0o700, parents=True, exist_ok=True)

    def put(self, data: bytes) -> Snapshot:
        """Store untrusted archive bytes after checking every member; storing them again is a no-op."""
        files = sum(1 for _ in _members(data, self.max_bytes))
        if not files:
            raise SnapshotError("the archive holds no files; make it with cirrus.snapshots.pack")
        snapshot = Snapshot(hashlib.sha256(data).hexdigest(), len(data), files)
        target = self.path(snapshot.digest)
        if not target.exists():
            fd, tmp = tempfile.mkstemp(dir=self.root, prefix=".put-")
            try:
                with os.fdopen(fd, "wb") as file:
                    file.write(data)
                os.chmod(tmp, 0o444)
                os.replace(tmp, target)
            finally:
                Path(tmp).unlink(missing_ok=True)
        return snapshot

    def add(self, directory: Path, leave_out: Collection[str] = ()) -> Snapshot:
        """Pack `directory` (without `leave_out`) and store it."""
        return self.put(pack(directory, self.max_bytes, leave_out)[0])

    def has(self, digest: str) -> bool:
        return self.path(digest).is_file()

    def path(self, digest: str) -> Path:
        if not _DIGEST.fullmatch(digest):
            raise SnapshotError(f"{digest!r} is not a snapshot digest (64 lowercase hex characters)")
        return self.root / f"{digest}{_SUFFIX}"

    def read(self, digest: str) -> bytes:
        try:
            return self.path(digest).read_bytes()
        except FileNotFoundError as e:
            raise SnapshotError(f"no snapshot {digest} in {self.root}; upload it first") from e

    def unpacked(self, digest: str) -> Path:
        """`<root>/<digest>/`, the read-only tree of the snapshot's files, unpacked on first use."""
        target = self.root / digest
        data = self.read(digest)  # checks the digest and that the snapshot exists
        if target.is_dir():
            return target
        work = Path(tempfile.mkdtemp(dir=self.root, prefix=f".unpack-{digest[:12]}-"))
        try:
            for name, executable, content in _members(data, self.max_bytes):
                path = work / name
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(content)
                path.chmod(0o555 if executable else 0o444)
            for directory in sorted((p for p in work.rglob("*") if p.is_dir()), reverse=True):
                directory.chmod(0o555)
            work.chmod(0o555)
            os.replace(work, target)  # fails if another process got there first: theirs is the same tree
        except OSError:
            if not target.is_dir():
                raise
        finally:
            _remove_tree(work)
        return target

    def remove(self, digest: str) -> None:
        """Delete the archive and its unpacked tree, if present."""
        self.path(digest).unlink(missing_ok=True)
        target = self.root / digest
        if target.is_dir():
            doomed = Path(tempfile.mkdtemp(dir=self.root, prefix=".remove-")) / digest
            os.replace(target, doomed)
            _remove_tree(doomed.parent)

    def digests(self) -> list[str]:
        names = (path.name.removesuffix(_SUFFIX) for path in self.root.glob(f"*{_SUFFIX}"))
        return sorted(name for name in names if _DIGEST.fullmatch(name))


def _remove_tree(path: Path) -> None:
    """Delete a tree whose directories may be read-only."""
    if not path.exists():
        return
    for directory in [path, *(p for p in path.rglob("*") if p.is_dir() and not p.is_symlink())]:
        directory.chmod(0o700)
    shutil.rmtree(path)
