"""``python -m anrat.train``: help, bad input (status 2, one line), and a tiny real run."""

import json
import subprocess
import sys

import pytest

from anrat.checkpoint import load_checkpoint, model_from_checkpoint
from anrat.train import build_parser, main


def test_help_explains_every_option(assert_help_explains_every_option):
    assert_help_explains_every_option(build_parser())


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--lambda0", "0"], "lam0 must be a finite number > 0"),
        (["--lambda0", "-1"], "lam0 must be a finite number > 0"),
        (["--a", "-0.5"], "a (lambda penalty weight) must be >= 0"),
        (["--q", "0"], "q must be a finite number > 0"),
        (["--model", "resnet"], "invalid choice: 'resnet'"),
        (["--lr", "nan"], "lr must be a finite number > 0"),
        (["--l2", "fc2"], "expected LAYER=COEFF"),
        (["--compile", "fast"], "invalid choice: 'fast'"),
    ],
)
def test_bad_values_exit_2_with_one_clear_line(argv, message, run_cli, tmp_path):
    code, out = run_cli(main, argv + ["--out", str(tmp_path), "--data-dir", str(tmp_path)])
    assert code == 2
    lines = out.err.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], out.err


def test_missing_and_corrupt_data_exit_2(tmp_path, run_cli):
    code, out = run_cli(main, ["--data-dir", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o")])
    assert code == 2 and len(out.err.strip().splitlines()) == 1 and "nowhere" in out.err
    bad = tmp_path / "bad"
    bad.mkdir()
    for name in (
        "train-images-idx3-ubyte",
        "train-labels-idx1-ubyte",
        "t10k-images-idx3-ubyte",
        "t10k-labels-idx1-ubyte",
    ):
        (bad / f"{name}.gz").write_bytes(b"this is not gzip")
    code, out = run_cli(main, ["--data-dir", str(bad), "--out", str(tmp_path / "o2")])
    assert code == 2 and len(out.err.strip().splitlines()) == 1, out.err


@pytest.mark.slow  # a subprocess
def test_subprocess_error_has_no_traceback(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "anrat.train", "--lambda0", "-2", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == ["anrat-train: error: lam0 must be a finite number > 0, got -2.0"]


def test_tiny_run_writes_a_self_describing_checkpoint(mnist_dir, tmp_path, run_cli):
    out = tmp_path / "run"
    code, _ = run_cli(
        main,
        [
            "--data-dir",
            str(mnist_dir),
            "--out",
            str(out),
            "--model",
            "mlp",
            "--hidden",
            "32",
            "--train-subset",
            "1000",
            "--val-size",
            "1000",
            "--test-subset",
            "500",
            "--schedule",
            "fixed",
            "--lambda0",
            "0.5",
            "--epochs",
            "3",
            "--no-progress",
        ],
    )
    assert code == 0
    ckpt = load_checkpoint(out / "model.pt")
    assert ckpt["arch"] == {"name": "mlp", "kwargs": {"hidden": [32], "in_features": 784, "out_features": 10}}
    model = model_from_checkpoint(ckpt)
    assert sum(p.numel() for p in model.parameters()) == 784 * 32 + 32 + 32 * 10 + 10
    result = json.loads((out / "result.json").read_text())
    assert result["test"]["error"] == ckpt["metrics"]["test"]["error"] < 0.5
    assert ckpt["lam"] == 0.5 and ckpt["schedule"]["name"] == "fixed"


def test_a_diverged_run_exits_1_with_one_line(mnist_dir, tmp_path, run_cli):
    code, out = run_cli(
        main,
        [
            "--data-dir",
            str(mnist_dir),
            "--out",
            str(tmp_path),
            "--model",
            "mlp",
            "--hidden",
            "16",
            "--train-subset",
            "500",
            "--val-size",
            "100",
            "--test-subset",
            "100",
            "--epochs",
            "1",
            "--lr",
            "1e6",
            "--no-progress",
        ],
    )
    assert code == 1
    lines = out.err.strip().splitlines()
    assert len(lines) == 1 and "training diverged" in lines[0] and "lower the learning rate" in lines[0], out.err
