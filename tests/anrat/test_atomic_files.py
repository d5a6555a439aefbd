"""Atomic writes keep the old file on failure and give new files the umask's permissions."""

import os
import stat

import pytest
import torch

from anrat.atomic_files import atomic_path, remove_stale_temporaries, write_text_atomic
from anrat.checkpoint import save_atomic


def test_permissions_follow_the_umask(tmp_path):
    old = os.umask(0o027)
    try:
        write_text_atomic(tmp_path / "a.json", "{}")
        save_atomic({"x": torch.zeros(1)}, tmp_path / "b.pt")
    finally:
        os.umask(old)
    for name in ("a.json", "b.pt"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o640, name


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "report.json"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("crash")
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.json"]


def test_stale_temporaries_of_the_named_files_only_are_removed(tmp_path):
    left = [tmp_path / ".last.pt.x1y2.tmp", tmp_path / ".best.pt.z3.tmp"]
    kept = [tmp_path / "last.pt", tmp_path / ".notes.txt.a1.tmp", tmp_path / "other.tmp"]
    for path in left + kept:
        path.write_text("x")
    assert sorted(remove_stale_temporaries(tmp_path, ("last.pt", "best.pt"))) == sorted(left)
    assert all(path.exists() for path in kept) and not any(path.exists() for path in left)
