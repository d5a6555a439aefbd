"""One run per output folder: a second command on a folder in use is refused before it writes
anything, and a killed run never blocks the next."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from anrat.errors import InputError
from anrat.run_lock import lock_output_folder, release_all
from anrat.train import main as train_main

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="fcntl.flock is POSIX")

HOLD = """
import sys, time
from anrat.run_lock import lock_output_folder
lock_output_folder(sys.argv[1])
print("locked", flush=True)
time.sleep(60)
"""


def hold_in_another_process(folder: Path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(folder)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.slow  # holds the lock in another process
def test_a_folder_in_use_is_refused_with_the_pid_that_holds_it(tmp_path):
    proc = hold_in_another_process(tmp_path)
    try:
        with pytest.raises(InputError, match=rf"is in use by another run \(pid {proc.pid}\)"):
            lock_output_folder(tmp_path)
    finally:
        proc.kill()
        proc.wait()
    lock_output_folder(tmp_path)  # its holder killed (-9), the folder is free at once
    lock_output_folder(tmp_path)  # within one process: taken once, a no-op after
    release_all()
    assert list(tmp_path.iterdir()) == []  # no lock file written into the user's folder


@pytest.mark.slow  # holds the lock in another process
def test_a_second_training_into_the_same_folder_writes_nothing(tmp_path, tmp_path_factory, capsys, monkeypatch):
    from tests.test_refusals import write_idx_folder

    data = write_idx_folder(tmp_path_factory.mktemp("idx"))
    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    before = snapshot(out)
    proc = hold_in_another_process(out)
    try:
        argv = ["--data-dir", str(data), "--out", str(out), "--model", "mlp", "--hidden", "8", "--val-size", "10"]
        code = train_main([*argv, "--epochs", "1", "--no-progress"])
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and f"is in use by another run (pid {proc.pid})" in err[0]
    assert snapshot(out) == before
    # the holder gone, the same command runs, and the command line releases the folder when it ends
    assert train_main([*argv, "--epochs", "1", "--no-progress"]) == 0
    assert (out / "model.pt").is_file()
    proc = hold_in_another_process(out)  # would fail to lock had the command kept it
    proc.kill()
    proc.wait()


@pytest.mark.slow  # holds the lock in another process
def test_pruning_into_a_folder_in_use_is_refused(tmp_path, tmp_path_factory, capsys):
    from pruning.__main__ import main as prune_main
    from tests.test_refusals import mlp_checkpoint, write_idx_folder

    data = write_idx_folder(tmp_path_factory.mktemp("idx"))
    ckpt = mlp_checkpoint(tmp_path / "model.pt")
    out = tmp_path / "pruned"
    out.mkdir()
    proc = hold_in_another_process(out)
    try:
        argv = ["prune", "--checkpoint", str(ckpt), "--data-dir", str(data), "--val-size", "10", "--out", str(out)]
        code = prune_main([*argv, "--quiet", "--max-rounds", "1"])
    finally:
        proc.kill()
        proc.wait()
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "is in use by another run" in err[0]
    assert list(out.iterdir()) == []
