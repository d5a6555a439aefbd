"""Atomic writes keep the old file on failure and give new files the umask's permissions."""

import errno
import os
import stat
import subprocess
from pathlib import Path

import pytest
import torch

from anrat.atomic_files import atomic_path, remove_stale_temporaries, write_text_atomic
from anrat.checkpoint import save_atomic
from anrat.errors import WriteFailed


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


def _enospc_on(name_prefix: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Writes of bytes to temporaries of ``name_prefix`` fail as on a full disk."""
    original = Path.write_bytes

    def write_bytes(self: Path, data) -> int:
        if self.name.startswith(f".{name_prefix}."):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return original(self, data)

    monkeypatch.setattr(Path, "write_bytes", write_bytes)


def test_a_full_disk_is_named_with_the_file_and_the_old_file_stays(tmp_path, monkeypatch):
    save_atomic({"epoch": torch.tensor(1)}, tmp_path / "last.pt")
    before = (tmp_path / "last.pt").read_bytes()
    _enospc_on("last.pt", monkeypatch)
    with pytest.raises(WriteFailed) as failed:
        save_atomic({"epoch": torch.tensor(2)}, tmp_path / "last.pt")
    assert failed.value.errno == errno.ENOSPC
    assert (
        failed.value.strerror
        == f"no space left on device while writing {tmp_path / 'last.pt'}; the previous last.pt is intact"
    )
    assert (tmp_path / "last.pt").read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]
    with pytest.raises(WriteFailed, match="new.pt was not written"):
        _enospc_on("new.pt", monkeypatch)
        save_atomic({}, tmp_path / "new.pt")


def test_a_training_that_meets_a_full_disk_exits_1_with_one_line(tmp_path, tmp_path_factory, monkeypatch, capsys):
    from anrat.train import main as train_main
    from tests.test_refusals import write_idx_folder

    data = write_idx_folder(tmp_path_factory.mktemp("idx"))
    argv = ["--data-dir", str(data), "--out", str(tmp_path), "--model", "mlp", "--hidden", "8", "--val-size", "10"]
    _enospc_on("last.pt", monkeypatch)
    assert train_main([*argv, "--epochs", "2", "--no-progress"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"no space left on device while writing {tmp_path / 'last.pt'}" in err[0]
    assert not list(tmp_path.glob(".*.tmp"))  # no temporary left behind


def test_a_really_full_folder(tmp_path, tmp_path_factory, capsys):
    """Where the machine lets us mount a 48 KiB tmpfs: a training whose checkpoint does not fit."""
    from anrat.train import main as train_main
    from tests.test_refusals import write_idx_folder

    data = write_idx_folder(tmp_path_factory.mktemp("idx"))
    small = tmp_path / "small"
    small.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=48k", "tmpfs", str(small)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip("cannot mount a size-limited tmpfs here")
    try:
        argv = ["--data-dir", str(data), "--out", str(small), "--model", "mlp", "--hidden", "64", "--val-size", "10"]
        code = train_main([*argv, "--epochs", "1", "--no-progress"])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 1 and len(err) == 1 and "no space left on device while writing" in err[0], err
        assert not list(small.glob(".*.tmp"))
    finally:
        subprocess.run(["umount", str(small)], capture_output=True)
