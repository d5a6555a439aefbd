"""``python -m anrat.train --engine batched``: the grid as one stack, selected and written as the loop's."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from anrat.checkpoint import load_checkpoint, model_from_checkpoint
from anrat.train import main
from pruning.__main__ import main as prune_main

SMALL = ["--model", "mlp", "--hidden", "16", "--train-subset", "400", "--val-size", "200", "--test-subset", "200"]
GRID = ["--grid-lr", "0.05,0.1", "--grid-a", "0.1,0.01", "--epochs", "2", "--batch-size", "50", "--no-progress"]


def train(run_cli, mnist_dir: Path, out: Path, *argv: str) -> dict:
    code, io = run_cli(main, ["--data-dir", str(mnist_dir), "--out", str(out), *SMALL, *argv])
    assert code == 0, io.err
    return json.loads((out / "result.json").read_text())


def relative_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b).clamp_min(1e-12))


@pytest.fixture(scope="module", params=["adaptive", "plain"])
def both_engines(request, mnist_dir, tmp_path_factory) -> tuple[Path, Path]:
    """The same 2x2 grid (lr x a) trained by each engine: the loop's and the batched run's folders."""
    root = tmp_path_factory.mktemp(f"grid_{request.param}")
    schedule = ["--schedule", request.param, "--lambda0", "1"]
    for engine in ("loop", "batched"):
        argv = ["--data-dir", str(mnist_dir), "--out", str(root / engine), *SMALL, *GRID, *schedule]
        assert main([*argv, "--engine", engine]) == 0
    return root / "loop", root / "batched"


def test_batched_grid_selects_and_writes_what_the_loop_does(both_engines):
    loop_dir, batched_dir = both_engines
    loop, batched = (json.loads((d / "result.json").read_text()) for d in both_engines)
    assert set(batched) == set(loop)
    assert loop["selected"]["lr"] == 0.1  # not the first grid point (lr 0.05 comes first)
    for key in ("lr", "a", "best_epoch", "switch_epoch"):
        assert batched["selected"][key] == loop["selected"][key]
    assert batched["selected"]["val"]["error"] == loop["selected"]["val"]["error"]
    assert batched["test"]["error"] == loop["test"]["error"]
    assert batched["test"]["loss"] == pytest.approx(loop["test"]["loss"], rel=1e-5)
    assert [(t["lr"], t["a"], t["best_epoch"], t["val"]["error"]) for t in batched["trials"]] == [
        (t["lr"], t["a"], t["best_epoch"], t["val"]["error"]) for t in loop["trials"]
    ]
    assert [r["val_error"] for r in batched["history"]] == [r["val_error"] for r in loop["history"]]
    assert [r["train_loss"] for r in batched["history"]] == pytest.approx(
        [r["train_loss"] for r in loop["history"]], rel=1e-5
    )
    for ours, theirs in zip(batched["history"], loop["history"]):  # what the report's figures read
        assert set(ours) == set(theirs)
        assert [s for s, _ in ours["lam_trace"]] == [s for s, _ in theirs["lam_trace"]]
        assert [v for _, v in ours["lam_trace"]] == pytest.approx([v for _, v in theirs["lam_trace"]], rel=1e-5)
    assert batched["config"]["engine"] == "batched" and loop["config"]["engine"] == "loop"
    assert (batched_dir / "batched" / "last.pt").is_file() and not (batched_dir / "grid").exists()

    ours, theirs = load_checkpoint(batched_dir / "model.pt"), load_checkpoint(loop_dir / "model.pt")
    assert set(ours) == set(theirs)
    for key in ("format", "arch", "schedule", "train", "best_epoch", "input_norm"):
        assert ours[key] == theirs[key], key
    differing = {k for k in ours["run_config"] if ours["run_config"][k] != theirs["run_config"][k]}
    assert differing == {"engine", "out_dir"}
    assert (
        ours["metrics"]["test"] == batched["test"] and ours["metrics"]["best_epoch"] == loop["selected"]["best_epoch"]
    )
    assert ours["lam"] == theirs["lam"] is None or ours["lam"] == pytest.approx(theirs["lam"], rel=1e-5)
    assert list(ours["state_dict"]) == list(theirs["state_dict"])
    for name, weight in theirs["state_dict"].items():
        assert relative_difference(ours["state_dict"][name], weight) <= 1e-5, name
    model_from_checkpoint(ours)


def test_the_selected_member_goes_through_pruning(both_engines, mnist_dir, tmp_path, run_cli):
    _, batched_dir = both_engines
    out = tmp_path / "pruned"
    argv = ["prune", "--checkpoint", str(batched_dir / "model.pt"), "--data-dir", str(mnist_dir), "--out", str(out)]
    argv += ["--train-subset", "400", "--test-subset", "200", "--max-samples", "200", "--max-rounds", "1", "--quiet"]
    code, io = run_cli(prune_main, argv)
    assert code == 0, io.err
    report = json.loads((out / "report.json").read_text())
    assert report["params_before"] == 784 * 16 + 16 + 16 * 10 + 10
    assert (out / "pruned.pt").is_file() and (out / "model.onnx").is_file()


def test_a_finished_grid_resumed_with_more_epochs_is_the_longer_run(mnist_dir, tmp_path, run_cli):
    grid = [*GRID[: GRID.index("--epochs")], "--batch-size", "50", "--no-progress", "--engine", "batched"]
    straight = train(run_cli, mnist_dir, tmp_path / "straight", *grid, "--epochs", "3")
    train(run_cli, mnist_dir, tmp_path / "extended", *grid, "--epochs", "1")
    extended = train(run_cli, mnist_dir, tmp_path / "extended", *grid, "--epochs", "3")
    assert extended["selected"] == {**straight["selected"], "out_dir": extended["selected"]["out_dir"]}
    assert extended["test"] == straight["test"]
    assert [r["val_error"] for r in extended["history"]] == [r["val_error"] for r in straight["history"]]
    assert len(extended["history"]) == 3
    ours, theirs = (load_checkpoint(d / "model.pt") for d in (tmp_path / "extended", tmp_path / "straight"))
    for name, weight in theirs["state_dict"].items():
        assert torch.equal(ours["state_dict"][name], weight), name


def test_resuming_a_batched_grid_with_other_options_is_refused(mnist_dir, tmp_path, run_cli):
    out = tmp_path / "out"
    train(run_cli, mnist_dir, out, *GRID[:4], "--epochs", "1", "--no-progress", "--engine", "batched")
    argv = ["--data-dir", str(mnist_dir), "--out", str(out), *SMALL, *GRID[:4], "--epochs", "2", "--no-progress"]
    code, io = run_cli(main, [*argv, "--engine", "batched", "--train-subset", "300"])
    assert code == 2
    lines = io.err.strip().splitlines()
    assert len(lines) == 1 and "train_subset: 400 there, 300 now" in lines[0], io.err


def test_the_batched_grid_prints_one_progress_line_per_epoch(mnist_dir, tmp_path, run_cli):
    argv = ["--data-dir", str(mnist_dir), *SMALL, "--grid-lr", "0.1,1e6", "--epochs", "2", "--batch-size", "50"]
    code, io = run_cli(main, [*argv, "--out", str(tmp_path / "shown"), "--engine", "batched"])
    assert code == 0, io.err
    lines = [line for line in io.err.splitlines() if line.startswith("epoch ")]
    result = json.loads((tmp_path / "shown" / "result.json").read_text())
    assert len(lines) == 2
    for epoch, (line, record) in enumerate(zip(lines, result["history"]), start=1):
        assert line.startswith(f"epoch {epoch}/2, 2 members; ")
        assert f"validation error best {record['val_error']:.2%} (member 0)" in line  # lr 1e6 diverged
        assert "; 1 training, 1 frozen; " in line
    code, io = run_cli(main, [*argv, "--out", str(tmp_path / "quiet"), "--engine", "batched", "--no-progress"])
    assert code == 0 and io.err == "", io.err


def test_a_diverged_member_is_a_diverged_trial(mnist_dir, tmp_path, run_cli):
    argv = ["--grid-lr", "0.1,1e6", "--epochs", "1", "--batch-size", "50", "--no-progress", "--schedule", "plain"]
    loop = train(run_cli, mnist_dir, tmp_path / "loop", *argv)
    batched = train(run_cli, mnist_dir, tmp_path / "batched", *argv, "--engine", "batched")
    for result in (loop, batched):
        assert result["selected"]["lr"] == 0.1
        assert [("diverged" in t) for t in result["trials"]] == [False, True]
    assert "diverged in epoch 1" in batched["trials"][1]["diverged"]


def test_a_single_configuration_that_diverges_exits_1_as_the_loop(mnist_dir, tmp_path, run_cli):
    argv = ["--data-dir", str(mnist_dir), "--model", "mlp", "--hidden", "16", "--train-subset", "500"]
    argv += ["--val-size", "100", "--test-subset", "100", "--epochs", "1", "--lr", "1e6", "--no-progress"]
    for engine in ("loop", "batched"):
        code, io = run_cli(main, [*argv, "--out", str(tmp_path / engine), "--engine", engine])
        assert code == 1, engine
        lines = io.err.strip().splitlines()
        assert len(lines) == 1 and "training diverged in epoch 1" in lines[0], io.err
        assert "lower the learning rate" in lines[0]
    assert not (tmp_path / "batched" / "model.pt").exists()


@pytest.mark.parametrize(
    "argv, option",
    [
        (["--amp"], "amp (train.amp=True)"),
        (["--compile"], "compile (train.compile='default')"),
        (["--optimizer", "rmsprop"], "the optimizer 'rmsprop'"),
    ],
)
def test_what_batched_cannot_train_is_refused_in_one_line(argv, option, tmp_path, run_cli):
    out = tmp_path / "out"
    code, io = run_cli(main, ["--out", str(out), "--grid-lr", "0.1,0.05", "--engine", "batched", *argv])
    assert code == 2
    lines = io.err.strip().splitlines()
    assert len(lines) == 1 and f"--engine batched cannot train {option}" in lines[0], io.err
    assert lines[0].endswith("; use --engine loop")
    assert not out.exists()


@pytest.mark.parametrize(
    "argv",
    [
        # Lo et al.'s excursions with the running normaliser, on the original code's (1 - p_y)^r
        ["--schedule", "excursions", "--lambda0", "2", "--period", "5", "--plain-steps", "2"]
        + ["--normalizer", "running", "--loss", "true_class_sq", "--error-exponent", "1.5"],
        # lambda updated directly, deconvexified to RAE once it is representable
        ["--schedule", "adaptive", "--lambda0", "1", "--lambda-param", "direct", "--loss", "true_class_sq"]
        + ["--switch-when-feasible", "--switch-to", "rae"],
    ],
    ids=["excursions-running", "direct-rae"],
)
def test_the_faithful_variants_train_alike_in_both_engines(argv, mnist_dir, tmp_path, run_cli):
    common = ["--grid-lr", "0.05,0.1", "--epochs", "2", "--batch-size", "50", "--no-progress", *argv]
    loop = train(run_cli, mnist_dir, tmp_path / "loop", *common)
    batched = train(run_cli, mnist_dir, tmp_path / "batched", *common, "--engine", "batched")
    for key in ("lr", "best_epoch", "switch_epoch"):
        assert batched["selected"][key] == loop["selected"][key], key
    assert batched["test"]["error"] == loop["test"]["error"]
    assert batched["test"]["loss"] == pytest.approx(loop["test"]["loss"], rel=1e-5)
    assert [r["criterion"] for r in batched["history"]] == [r["criterion"] for r in loop["history"]]
    assert [r["train_objective"] for r in batched["history"]] == pytest.approx(
        [r["train_objective"] for r in loop["history"]], rel=1e-5
    )
    schedule = loop["config"]["schedule"]
    if schedule["switch_to"] == "rae":
        assert [r["criterion"] for r in loop["history"]] == ["adaptive", "rae"]
        assert schedule["parameterization"] == "direct"
    else:
        assert schedule["r"] == 1.5 and schedule["kind"] == "true_class_sq"
