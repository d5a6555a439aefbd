"""benchmarks/criteria.py: its criteria are what they claim, and bad settings exit 2 before anything is written."""

from __future__ import annotations

import pytest
import torch
from torch import nn


@pytest.mark.parametrize(
    "argv, words",
    [
        (["--rho0", "0"], "rho0"),
        (["--rho0", "0.8", "--rho-final", "0.5"], "rho_final must be >= rho0"),
        (["--epochs", "0"], "epochs must be an integer >= 1"),
        (["--label-smoothing", "1.0"], "label_smoothing must be in [0, 1)"),
        (["--studies", "cifar"], "unknown studies"),
        (["--criteria", "ce,mse"], "unknown criteria ['mse']"),
        (["--studies", "fashion_lenet5"], "needs --fashion-dir"),
    ],
)
def test_bad_settings_exit_2_in_one_line_and_write_nothing(load_benchmark, run_cli, tmp_path, argv, words):
    criteria = load_benchmark("criteria")
    code, captured = run_cli(criteria.main, [*argv, "--out", str(tmp_path / "out")])
    assert code == 2 and words in captured.err and len(captured.err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_the_criteria_are_the_losses_they_name(load_benchmark):
    criteria = load_benchmark("criteria")
    g = torch.Generator().manual_seed(0)
    logits, y = torch.randn(32, 10, generator=g) * 3, torch.randint(0, 10, (32,), generator=g)
    ce = nn.functional.cross_entropy(logits, y)
    focal, _ = criteria.criterion("focal", 10, 0.5, 1.0, 0.1)
    p = torch.softmax(logits, 1)[torch.arange(32), y]
    assert float(focal(logits, y)) == pytest.approx(float((-((1 - p) ** 2) * p.log()).mean()), rel=1e-5)
    assert float(focal(logits, y)) < float(ce)  # down-weights the easy samples
    ess, schedule = criteria.criterion("ess_ls", 10, 0.5, 1.0, 0.1)
    assert ess.rho == 0.5 and ess.label_smoothing == 0.1 and schedule.rho_at(10) == 1.0
    ls, none = criteria.criterion("ls", 10, 0.5, 1.0, 0.1)
    assert none is None and float(ls(logits, y)) == float(nn.CrossEntropyLoss(label_smoothing=0.1)(logits, y))
