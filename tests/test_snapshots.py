"""Snapshots on real files: deterministic packing, ignore rules, symlinks, the size cap, hostile
archives given to `put`, read-only unpacking (also by two processes at once) and removal."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import stat
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from cirrus.snapshots import DEFAULT_MAX_BYTES, Snapshot, SnapshotError, SnapshotStore, pack

AS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0
needs_non_root = pytest.mark.skipif(AS_ROOT, reason="root ignores file permissions")

PROJECT = {
    "predictor.py": b"from helpers.util import double\n\nclass Predictor: ...\n",
    "helpers/__init__.py": b"",
    "helpers/util.py": b"def double(x):\n    return 2 * x\n",
    "data/labels.txt": b"cat\ndog\n",
    "run.sh": b"#!/bin/sh\necho hi\n",
}


def write_tree(root: Path, files: dict[str, bytes], order: Callable[[list[str]], list[str]] = sorted) -> Path:
    for name in order(list(files)):
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(files[name])
    if "run.sh" in files:
        (root / "run.sh").chmod(0o755)
    return root


def names(data: bytes) -> list[str]:
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
        return tar.getnames()


def tree(root: Path) -> dict[str, tuple[bytes, bool]]:
    """Each file under `root`: its bytes and whether it is executable."""
    return {
        p.relative_to(root).as_posix(): (p.read_bytes(), bool(p.stat().st_mode & 0o100))
        for p in root.rglob("*")
        if p.is_file()
    }


def hostile(*members: tuple[tarfile.TarInfo, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for info, content in members:
            info.size = len(content) if info.isreg() else 0
            tar.addfile(info, io.BytesIO(content) if info.isreg() else None)
    return gzip.compress(buffer.getvalue())


def member(name: str, kind: bytes = tarfile.REGTYPE, link: str = "", mode: int = 0o644) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname, info.mode = kind, link, mode
    return info


class Zeros(io.RawIOBase):
    def __init__(self, size: int) -> None:
        self.left = size

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        count = min(len(buffer), self.left)
        buffer[:count] = bytes(count)
        self.left -= count
        return count


def gzip_stream(header: bytes, zeros: int) -> bytes:
    """gzip of `header` followed by `zeros` zero bytes, built without holding them in memory."""
    out = io.BytesIO()
    with gzip.GzipFile(fileobj=out, mode="wb", mtime=0) as gz:
        gz.write(header)
        chunk = bytes(2**20)
        for _ in range(zeros // len(chunk)):
            gz.write(chunk)
    return out.getvalue()


# --- packing ---------------------------------------------------------------------------


def test_same_content_packs_to_the_same_bytes_whatever_the_mtimes_order_and_umask(tmp_path: Path) -> None:
    first_data, first = pack(write_tree(tmp_path / "a", PROJECT))
    old_umask = os.umask(0o077)
    try:
        second_root = write_tree(tmp_path / "b", PROJECT, order=lambda keys: sorted(keys, reverse=True))
    finally:
        os.umask(old_umask)
    for i, path in enumerate(sorted(second_root.rglob("*"))):
        os.utime(path, (1_000_000 + i, 2_000_000 + 7 * i))
    second_data, second = pack(second_root)
    assert second_data == first_data
    assert second == first == Snapshot(hashlib.sha256(first_data).hexdigest(), len(first_data), len(PROJECT))
    with tarfile.open(fileobj=io.BytesIO(first_data), mode="r:gz") as tar:
        members = tar.getmembers()
    assert [m.name for m in members] == sorted(PROJECT)
    assert {(m.mtime, m.uid, m.gid, m.uname, m.gname) for m in members} == {(0, 0, 0, "", "")}
    assert {m.name: m.mode for m in members}["run.sh"] == 0o755
    assert {m.mode for m in members if m.name != "run.sh"} == {0o644}


def _edit_byte(root: Path) -> None:
    (root / "data/labels.txt").write_bytes(b"cat\ndoh\n")


def _edit_helper(root: Path) -> None:
    (root / "helpers/util.py").write_bytes(b"def double(x):\n    return x + x\n")


def _clear_exec_bit(root: Path) -> None:
    (root / "run.sh").chmod(0o644)


def _set_exec_bit(root: Path) -> None:
    (root / "predictor.py").chmod(0o744)


def _rename(root: Path) -> None:
    (root / "data/labels.txt").rename(root / "data/label.txt")


def _add_empty_file(root: Path) -> None:
    (root / "helpers/extra.py").touch()


@pytest.mark.parametrize("change", [_edit_byte, _edit_helper, _clear_exec_bit, _set_exec_bit, _rename, _add_empty_file])
def test_any_change_to_a_packed_file_changes_the_digest(tmp_path: Path, change: Callable[[Path], None]) -> None:
    root = write_tree(tmp_path / "api", PROJECT)
    _, before = pack(root)
    change(root)
    _, after = pack(root)
    assert after.digest != before.digest


def test_cirrusignore_patterns_negation_and_directories(tmp_path: Path) -> None:
    files = {
        ".cirrusignore": b"# weights go through models:\n*.bin\n!keep.bin\ncheckpoints/\nnotes-*.md\n",
        "predictor.py": b"x = 1\n",
        "big.bin": b"\0" * 100,
        "sub/also.bin": b"\0" * 10,
        "keep.bin": b"kept",
        "checkpoints/step1/model.pt": b"w",
        "sub/checkpoints/x.pt": b"w",
        "notes-today.md": b"n",
        "README.md": b"r",
    }
    data, snapshot = pack(write_tree(tmp_path / "api", files))
    assert names(data) == [".cirrusignore", "README.md", "keep.bin", "predictor.py"]
    assert snapshot.files == 4


def test_tools_caches_and_vcs_are_always_ignored(tmp_path: Path) -> None:
    ignored = [".git/config", "__pycache__/m.cpython-311.pyc", "pkg/__pycache__/x.pyc", "old.pyc", ".venv/bin/py"]
    ignored += [
        "venv/lib/site.py",
        ".mypy_cache/x.json",
        ".pytest_cache/v",
        ".ruff_cache/c",
        ".DS_Store",
        "pkg/.DS_Store",
    ]
    root = write_tree(tmp_path / "api", {name: b"junk" for name in ignored} | {"main.py": b"", "pkg/mod.py": b""})
    data, _ = pack(root)
    assert names(data) == ["main.py", "pkg/mod.py"]


@needs_non_root
def test_an_ignored_directory_is_not_descended_into(tmp_path: Path) -> None:
    root = write_tree(tmp_path / "api", {"main.py": b"", ".venv/locked/x": b"", "cache/locked/y": b""})
    (root / ".cirrusignore").write_text("cache/\n")
    (root / ".venv/locked").chmod(0)
    (root / "cache/locked").chmod(0)
    try:
        assert names(pack(root)[0]) == [".cirrusignore", "main.py"]
    finally:
        (root / ".venv/locked").chmod(0o755)
        (root / "cache/locked").chmod(0o755)


def test_a_symlink_to_a_file_inside_is_packed_as_a_copy(tmp_path: Path) -> None:
    root = write_tree(tmp_path / "api", PROJECT)
    (root / "labels.txt").symlink_to("data/labels.txt")
    data, _ = pack(root)
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
        info = tar.getmember("labels.txt")
        copy = tar.extractfile(info)
        assert info.isreg() and copy is not None and copy.read() == PROJECT["data/labels.txt"]


def test_a_symlink_leaving_the_directory_is_an_error_naming_it(tmp_path: Path) -> None:
    (tmp_path / "secret.txt").write_text("s")
    root = write_tree(tmp_path / "api", PROJECT)
    (root / "data/link.txt").symlink_to(tmp_path / "secret.txt")
    with pytest.raises(SnapshotError, match=r"data/link\.txt.*outside.*copy the file.*\.cirrusignore"):
        pack(root)


def test_a_dangling_symlink_is_an_error_naming_it(tmp_path: Path) -> None:
    root = write_tree(tmp_path / "api", PROJECT)
    (root / "gone.txt").symlink_to("nowhere.txt")
    with pytest.raises(SnapshotError, match=r"gone\.txt is a dangling symlink.*\.cirrusignore"):
        pack(root)


def test_special_files_are_an_error(tmp_path: Path) -> None:
    root = write_tree(tmp_path / "api", PROJECT)
    os.mkfifo(root / "pipe")
    with pytest.raises(SnapshotError, match=r"pipe is not a regular file"):
        pack(root)


@needs_non_root
def test_an_unreadable_file_is_an_error_naming_it(tmp_path: Path) -> None:
    root = write_tree(tmp_path / "api", PROJECT)
    (root / "helpers/util.py").chmod(0)
    with pytest.raises(SnapshotError, match=r"cannot read .*helpers/util\.py"):
        pack(root)


def test_an_empty_directory_or_a_file_cannot_be_packed(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(SnapshotError, match="no files to pack"):
        pack(tmp_path / "empty")
    (tmp_path / "file.py").touch()
    with pytest.raises(SnapshotError, match="not a directory"):
        pack(tmp_path / "file.py")


def test_over_the_size_cap_names_the_largest_files_and_points_to_models(tmp_path: Path) -> None:
    root = write_tree(tmp_path / "api", {"a.py": b"x" * 1000, "tokenizer/vocab.txt": b"v" * 300_000})
    with (root / "model.safetensors").open("wb") as f:
        f.truncate(8 * 2**30)  # sparse: reading it would take a long while
    os.mkfifo(root / "z_pipe")  # after the big file, like the subdirectory: the walk stops before them
    started = time.monotonic()
    with pytest.raises(SnapshotError) as caught:
        pack(root, max_bytes=2**20)
    assert time.monotonic() - started < 5
    message = str(caught.value)
    assert "model.safetensors (8.0 GiB)" in message
    assert message.index("model.safetensors") < message.index("a.py (1000 bytes)")
    assert "1.0 MiB" in message and ".cirrusignore" in message and "`models:`" in message
    assert "s3://" in message and "z_pipe" not in message and "vocab.txt" not in message  # not walked


def test_the_size_cap_counts_file_content_and_a_project_at_the_cap_packs(tmp_path: Path) -> None:
    root = write_tree(tmp_path / "api", {"a.txt": b"a" * 600, "b.txt": b"b" * 400})
    assert pack(root, max_bytes=1000)[1].files == 2
    with pytest.raises(SnapshotError, match=r"a\.txt"):
        pack(root, max_bytes=999)


# --- the store -------------------------------------------------------------------------


def test_unpacked_is_exactly_the_packed_files_read_only(tmp_path: Path) -> None:
    files = PROJECT | {"empty.txt": b"", "d/é ü.txt": "ünï".encode(), "x" * 60 + "/" + "y" * 80 + ".py": b"long"}
    root = write_tree(tmp_path / "api", files)
    (root / "link.txt").symlink_to("data/labels.txt")
    store = SnapshotStore(tmp_path / "home/snapshots")
    assert stat.S_IMODE((tmp_path / "home/snapshots").stat().st_mode) & 0o077 == 0
    snapshot = store.add(root)
    assert store.has(snapshot.digest) and store.digests() == [snapshot.digest]
    assert store.read(snapshot.digest) == pack(root)[0] == store.path(snapshot.digest).read_bytes()
    unpacked = store.unpacked(snapshot.digest)
    assert unpacked == tmp_path / "home/snapshots" / snapshot.digest
    assert tree(unpacked) == tree(root)
    for path in [unpacked, *unpacked.rglob("*")]:
        mode = stat.S_IMODE(path.stat().st_mode)
        assert mode == (0o555 if path.is_dir() or path.name == "run.sh" else 0o444), path
    assert store.unpacked(snapshot.digest) == unpacked
    if not AS_ROOT:
        with pytest.raises(PermissionError):
            (unpacked / "predictor.py").write_text("changed")


def test_put_is_idempotent(tmp_path: Path) -> None:
    data, packed = pack(write_tree(tmp_path / "api", PROJECT))
    store = SnapshotStore(tmp_path / "snapshots")
    assert store.put(data) == packed
    assert store.put(data) == packed
    assert sorted(p.name for p in store.root.iterdir()) == [f"{packed.digest}.tar.gz"]


HOSTILE: dict[str, Callable[[], bytes]] = {
    "garbage": lambda: b"this is not a gzip file",
    "gzip of garbage": lambda: gzip.compress(b"not a tar archive" * 100),
    "truncated": lambda: hostile((member("predictor.py"), os.urandom(4000)))[:-200],
    "parent": lambda: hostile((member("ok.py"), b""), (member("../evil.py"), b"x")),
    "nested parent": lambda: hostile((member("a/../../evil.py"), b"x")),
    "absolute": lambda: hostile((member("/etc/cron.d/evil"), b"x")),
    "symlink": lambda: hostile((member("link", tarfile.SYMTYPE, "/etc/passwd"), b"")),
    "inner symlink": lambda: hostile((member("a.py"), b"x"), (member("b.py", tarfile.SYMTYPE, "a.py"), b"")),
    "hardlink": lambda: hostile((member("a.py"), b"x"), (member("b.py", tarfile.LNKTYPE, "a.py"), b"")),
    "fifo": lambda: hostile((member("pipe", tarfile.FIFOTYPE), b"")),
    "device": lambda: hostile((member("dev", tarfile.CHRTYPE), b"")),
    "directory": lambda: hostile((member("d", tarfile.DIRTYPE, mode=0o755), b"")),
    "setuid": lambda: hostile((member("a.py", mode=0o4755), b"x")),
    "duplicate": lambda: hostile((member("a.py"), b"x"), (member("a.py"), b"y")),
    "file then dir": lambda: hostile((member("a"), b"x"), (member("a/b"), b"y")),
    "empty": lambda: gzip.compress(bytes(10240)),
}


@pytest.mark.parametrize("kind", list(HOSTILE))
def test_put_refuses_hostile_archives_and_leaves_nothing(tmp_path: Path, kind: str) -> None:
    store = SnapshotStore(tmp_path / "snapshots")
    with pytest.raises(SnapshotError):
        store.put(HOSTILE[kind]())
    assert list(store.root.iterdir()) == []


def test_put_refuses_a_gzip_bomb_without_expanding_it(tmp_path: Path) -> None:
    store = SnapshotStore(tmp_path / "snapshots")
    assert store.max_bytes == DEFAULT_MAX_BYTES == 64 * 2**20
    big = member("weights.bin")
    big.size = 200 * 2**20
    bomb = gzip_stream(big.tobuf(tarfile.PAX_FORMAT), 200 * 2**20)
    assert len(bomb) < 2**20
    with pytest.raises(SnapshotError, match="more than 64 MiB"):
        store.put(bomb)
    # a header that lies: tarfile reads a pax header's records whole, so only the byte cap stops this
    pax = member("././@PaxHeader", tarfile.XHDTYPE)
    pax.size = 200 * 2**20
    started = time.monotonic()
    with pytest.raises(SnapshotError, match="expands past the snapshot cap"):
        store.put(gzip_stream(pax.tobuf(tarfile.USTAR_FORMAT), 200 * 2**20))
    assert time.monotonic() - started < 10
    assert list(store.root.iterdir()) == []


UNPACK_AND_LIST = """
import hashlib, json, sys
from pathlib import Path
from cirrus.snapshots import SnapshotStore
path = SnapshotStore(Path(sys.argv[1])).unpacked(sys.argv[2])
print(json.dumps({p.relative_to(path).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
                  for p in sorted(path.rglob("*")) if p.is_file()}))
"""


def test_two_processes_unpacking_at_once_both_see_the_whole_tree(tmp_path: Path) -> None:
    files = {f"pkg{i % 10}/mod{i}.py": os.urandom(2000) for i in range(400)}
    store = SnapshotStore(tmp_path / "snapshots")
    snapshot = store.add(write_tree(tmp_path / "api", files))
    command = [sys.executable, "-c", UNPACK_AND_LIST, str(store.root), snapshot.digest]
    processes = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(2)]
    outputs = [process.communicate(timeout=60) for process in processes]
    assert [process.returncode for process in processes] == [0, 0], outputs
    expected = {name: hashlib.sha256(content).hexdigest() for name, content in files.items()}
    assert [json.loads(out) for out, _ in outputs] == [expected, expected]
    assert sorted(p.name for p in store.root.iterdir()) == sorted([snapshot.digest, f"{snapshot.digest}.tar.gz"])


def test_remove_deletes_the_archive_and_the_read_only_tree(tmp_path: Path) -> None:
    store = SnapshotStore(tmp_path / "snapshots")
    kept = store.add(write_tree(tmp_path / "kept", {"a.py": b"a"}))
    snapshot = store.add(write_tree(tmp_path / "api", PROJECT))
    store.unpacked(snapshot.digest)
    store.remove(snapshot.digest)
    assert not store.has(snapshot.digest) and store.digests() == [kept.digest]
    assert sorted(p.name for p in store.root.iterdir()) == [f"{kept.digest}.tar.gz"]
    store.remove(snapshot.digest)  # already gone: nothing to do
    with pytest.raises(SnapshotError, match="no snapshot"):
        store.unpacked(snapshot.digest)


@pytest.mark.parametrize("digest", ["abc", "../" + "a" * 61, "A" * 64, "g" * 64, "a" * 65, ""])
def test_an_invalid_digest_is_refused(tmp_path: Path, digest: str) -> None:
    store = SnapshotStore(tmp_path / "snapshots")
    for method in (store.unpacked, store.has, store.path, store.read, store.remove):
        with pytest.raises(SnapshotError, match="not a snapshot digest"):
            method(digest)


def test_the_spec_file_left_out_does_not_change_the_digest(tmp_path: Path) -> None:
    project = tmp_path / "p"
    project.mkdir()
    (project / "predictor.py").write_text("class Predictor: ...\n")
    (project / "cirrus.yaml").write_text("- name: a\n  autoscaling: {max_replicas: 1}\n")
    _, before = pack(project, leave_out=("cirrus.yaml",))
    (project / "cirrus.yaml").write_text("- name: a\n  autoscaling: {max_replicas: 4}\n")
    _, after = pack(project, leave_out=("cirrus.yaml",))
    assert before.digest == after.digest and before.files == 1
    assert pack(project)[1].digest != before.digest  # packed when not left out
