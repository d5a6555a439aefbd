"""``benchmarks/mnist_anrat_vs_ce.py``: each unit's learning-rate grid as one batched stack selects
and scores what the loop selects (the unit's RunConfig, trained on a few hundred images)."""

from __future__ import annotations

from dataclasses import replace

import pytest

from anrat.train import run as train_run


@pytest.fixture(scope="module")
def bench(load_benchmark):
    return load_benchmark("mnist_anrat_vs_ce")


def test_engine_flag_defaults_to_batched_and_reaches_the_run_config(bench, tmp_path):
    args = bench.build_parser().parse_args([])
    assert args.engine == "batched"
    args = bench.build_parser().parse_args(["--engine", "loop"])
    cfg = bench.run_config("lenet5", "anrat", 1, bench.DEFAULT, args, tmp_path)
    assert cfg.engine == "loop" and cfg.grid_lr == bench.DEFAULT["grid_lr"] and cfg.train.seed == 1


@pytest.mark.parametrize("method", ["ce", "anrat"])
def test_both_engines_select_the_same_learning_rate_and_test_error(bench, method, mnist_dir, tmp_path):
    budget = {**bench.DEFAULT, "train_subset": 400, "epochs": 1}
    results = {}
    for engine in ("batched", "loop"):
        args = bench.build_parser().parse_args(["--data-dir", str(mnist_dir), "--engine", engine, "--no-progress"])
        cfg = bench.run_config("lenet5", method, 0, budget, args, tmp_path / engine)
        assert cfg.engine == engine and len(cfg.grid_lr) == 2
        results[engine] = train_run(replace(cfg, val_size=300, test_subset=300))  # smaller than the benchmark's
    batched, loop = results["batched"], results["loop"]
    for key in ("lr", "best_epoch"):
        assert batched["selected"][key] == loop["selected"][key]
    # float rounding (~1e-7 relative on the weights after these 7 steps) may move an image that
    # sits on a decision boundary: the errors agree to one image of the 300
    one_image = 1 / 300 + 1e-12
    for ours, theirs in zip(batched["trials"], loop["trials"]):
        assert ours["lr"] == theirs["lr"] and ours["best_epoch"] == theirs["best_epoch"]
        assert ours["val"]["error"] == pytest.approx(theirs["val"]["error"], abs=one_image)
        assert ours["val"]["loss"] == pytest.approx(theirs["val"]["loss"], rel=1e-4)
    assert batched["test"]["error"] == pytest.approx(loop["test"]["error"], abs=one_image)
    assert batched["test"]["loss"] == pytest.approx(loop["test"]["loss"], rel=1e-4)
