"""What `cirrus serve` counts as a change worth a reload (cirrus/reload.py), with no processes."""

from __future__ import annotations

from pathlib import Path

from watchfiles import Change

from cirrus.reload import changed_files
from cirrus.snapshots import ignore_spec


def _changed(root: Path, *changes: tuple[Change, str], state_dir: Path | None = None) -> list[str]:
    return changed_files(root, [(c, str(root / p)) for c, p in changes], ignore_spec(root), state_dir)


def test_what_a_snapshot_packs_counts_and_what_it_leaves_out_does_not(tmp_path: Path) -> None:
    (tmp_path / ".cirrusignore").write_text("data/\n*.ckpt\n!keep.ckpt\n")
    for name in ("predictor.py", "cirrus.yaml", "keep.ckpt", "sub/util.py"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("x")
    changes = [
        (Change.modified, "predictor.py"),
        (Change.modified, "cirrus.yaml"),
        (Change.added, "sub/util.py"),
        (Change.modified, "keep.ckpt"),
        (Change.modified, "sub/util.py"),
        (Change.added, "data/big.bin"),
        (Change.added, "data"),
        (Change.modified, "model.ckpt"),
        (Change.added, "__pycache__/predictor.cpython-311.pyc"),
        (Change.modified, ".git/index"),
        (Change.deleted, "gone.py"),  # a deleted file is a change
    ]
    assert _changed(tmp_path, *changes) == ["cirrus.yaml", "gone.py", "keep.ckpt", "predictor.py", "sub/util.py"]


def test_temporary_files_paths_outside_and_the_state_directory_are_no_change(tmp_path: Path) -> None:
    assert _changed(tmp_path, (Change.added, "sedAb12Cd"), (Change.deleted, "sedAb12Cd")) == []
    (tmp_path / "kept.py").write_text("x")  # added and deleted, then written again: it is there now
    assert _changed(tmp_path, (Change.added, "kept.py"), (Change.deleted, "kept.py")) == ["kept.py"]
    outside = changed_files(tmp_path, [(Change.modified, "/elsewhere/x.py")], ignore_spec(tmp_path))
    assert outside == []
    state = tmp_path / ".state"
    assert _changed(tmp_path, (Change.modified, ".state/daemon.log"), state_dir=state) == []
