"""Atomic writes: the final name holds either nothing or a whole file, with the umask's permissions."""
from __future__ import annotations

import os
import stat

import pytest

from hpcvid.fileio import atomic_path, atomic_write_json, read_json, remove_stale_partials


def test_atomic_write_replaces_whole_file_and_leaves_no_partial(tmp_path):
    target = tmp_path / "record.json"
    atomic_write_json(target, {"a": 1})
    atomic_write_json(target, {"a": 2})
    assert read_json(target) == {"a": 2}
    assert [p.name for p in tmp_path.iterdir()] == ["record.json"]


def test_failed_write_keeps_old_file_and_removes_temporary(tmp_path):
    target = tmp_path / "record.json"
    atomic_write_json(target, {"old": True})
    with pytest.raises(RuntimeError):
        with atomic_path(target) as temporary:
            temporary.write_text("half")
            raise RuntimeError("killed mid-write")
    assert read_json(target) == {"old": True}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["record.json"]


def test_files_get_the_umask_permissions_not_0600(tmp_path):
    old = os.umask(0o022)
    try:
        atomic_write_json(tmp_path / "r.json", {})
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "r.json").stat().st_mode) == 0o644


def test_stale_partials_are_removed(tmp_path):
    (tmp_path / ".shard.h5.abc.partial").write_bytes(b"x")
    (tmp_path / "shard.h5").write_bytes(b"y")
    removed = remove_stale_partials(tmp_path)
    assert [p.name for p in removed] == [".shard.h5.abc.partial"]
    assert (tmp_path / "shard.h5").exists()
