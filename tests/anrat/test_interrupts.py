"""Ctrl-C and SIGTERM at a random moment of a training: one line, status 130 or 143, every file
whole, and the same command resumes to a result bit-identical to an uninterrupted run."""

import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from anrat.checkpoint import load_checkpoint

pytestmark = [
    pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals"),
    pytest.mark.slow,  # every test here runs commands in subprocesses and interrupts them
]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from tests.test_refusals import write_idx_folder

    return write_idx_folder(tmp_path_factory.mktemp("idx"), train=1200, test=100)


def train_command(data: Path, out: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "anrat.train",
        "--data-dir",
        str(data),
        "--out",
        str(out),
        "--model",
        "mlp",
        "--hidden",
        "16",
        "--val-size",
        "200",
        "--epochs",
        "150",
        "--no-progress",
    ]


def weights(out: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(out / "model.pt")["state_dict"]


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory):
    """The uninterrupted run's selected weights."""
    out = tmp_path_factory.mktemp("reference")
    assert subprocess.run(train_command(data, out), capture_output=True).returncode == 0
    return weights(out)


def interrupt_and_resume(data: Path, out: Path, signum: int, delay: float) -> tuple[int, str, dict]:
    """Start the training, send ``signum`` ``delay`` seconds after its first checkpoint, then run
    the same command again; returns the interrupted run's status and stderr, and what last.pt held."""
    proc = subprocess.Popen(train_command(data, out), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not (out / "last.pt").exists() and time.monotonic() < deadline:  # an epoch in
        time.sleep(0.01)
    time.sleep(delay)
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=60)
    held = load_checkpoint(out / "last.pt")
    assert not list(out.glob(".*.tmp"))  # every file whole, no temporary left
    assert subprocess.run(train_command(data, out), capture_output=True).returncode == 0
    return proc.returncode, err, held


@pytest.mark.parametrize("signum, status", [(signal.SIGINT, 130), (signal.SIGTERM, 143)] * 2)
def test_an_interrupted_training_says_where_and_resumes_bit_identically(data, reference, tmp_path, signum, status):
    delay = random.uniform(0.0, 1.0)  # a random moment, printed on failure
    code, err, held = interrupt_and_resume(data, tmp_path / "run", signum, delay)
    lines = err.strip().splitlines()
    assert code == status, (delay, err)
    assert "Traceback" not in err and len(lines) == 1, (delay, err)
    name = signal.Signals(signum).name
    assert f"interrupted by {name} at epoch " in lines[0] or f"interrupted by {name} at the end of epoch " in lines[0]
    epoch, steps = held["epoch"], held.get("in_epoch", {}).get("steps")
    assert 1 <= epoch < 150 and "run the same command to resume" in lines[0], lines[0]
    if steps is None:  # between two epochs
        assert f"holds epoch {epoch}:" in lines[0], lines[0]
    else:  # after the step the signal arrived in
        assert f"holds epoch {epoch} and {steps} steps of epoch {epoch + 1}:" in lines[0], lines[0]
    resumed = weights(tmp_path / "run")  # the same command resumed and ended where the reference ended
    assert resumed.keys() == reference.keys()
    assert all(torch.equal(resumed[k], reference[k]) for k in resumed), delay


def test_an_interrupted_pruning_writes_nothing_and_says_so(data, tmp_path):
    from tests.test_refusals import mlp_checkpoint

    ckpt = mlp_checkpoint(tmp_path / "model.pt")
    out = tmp_path / "pruned"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    command = [sys.executable, "-m", "pruning", "prune", "--checkpoint", str(ckpt), "--data-dir", str(data)]
    command += ["--val-size", "200", "--out", str(out), "--max-rounds", "50", "--step", "0.05"]
    command += ["--target-params", "10", "--tolerance", "0.5"]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    first = ""
    while not first.startswith("round 1/"):  # the first round is done: the loop is running
        first = proc.stderr.readline()
        assert first or proc.poll() is None, "the pruning ended before it could be interrupted"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    last = err.strip().splitlines()[-1]
    assert "Traceback" not in err and last.startswith("anrat-prune prune: interrupted by SIGTERM in the pruning, after")
    assert "only when it ends, so it wrote none" in last
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]  # no file of this run, whole or half
