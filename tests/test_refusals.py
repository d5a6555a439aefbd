"""Every refusal is one clear line, and nothing a user already has is lost.

One row per malformed input, across ``python -m anrat.train``, ``python -m pruning prune|export``
and ``python -m anrat.recipes.mnist_prune``: exit status 2, exactly one line on stderr naming the
problem, no traceback, and an output folder that already held files is byte-identical afterwards.
Inputs are tiny and synthetic (a 28x28 IDX dataset of a few dozen images, an 8-unit MLP).
"""

from __future__ import annotations

import gzip
import json
import os
import struct
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from anrat.checkpoint import FORMAT
from anrat.models import build_model
from anrat.train import main as train_main
from pruning.__main__ import main as prune_main
from recipes.mnist_prune import main as recipe_main

REPO_ROOT = Path(__file__).resolve().parent.parent
EARLIER = {
    "rounds.jsonl": '{"round": 1}\n',
    "report.json": '{"earlier": true}',
    "config.json": '{"earlier": 1}',
    "metrics.json": "{}",
    "result.json": "{}",
    "metrics.jsonl": "{}\n",
    "notes.txt": "keep me",
}
USER_MODULE = """
import torch
from torch import nn

def build(width=8):
    return nn.Sequential(nn.Flatten(), nn.Linear(784, width), nn.ReLU(), nn.Linear(width, 10))

def broken():
    raise RuntimeError("the factory itself is broken")

def needs(width):
    return build(width)

def number():
    return 3
"""


# --- tiny inputs -------------------------------------------------------------------------------
def _idx(data: bytes, dims: tuple[int, ...]) -> bytes:
    return struct.pack(f">{len(dims) + 1}I", 0x0800 + len(dims), *dims) + data


def write_idx_folder(folder: Path, train: int = 60, test: int = 20, label_max: int = 9) -> Path:
    """A synthetic MNIST-shaped IDX folder (uncompressed)."""
    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    for prefix, n in (("train", train), ("t10k", test)):
        images = torch.randint(0, 256, (n, 28, 28), dtype=torch.uint8, generator=g)
        labels = torch.arange(n, dtype=torch.uint8) % (label_max + 1)
        (folder / f"{prefix}-images-idx3-ubyte").write_bytes(_idx(images.numpy().tobytes(), (n, 28, 28)))
        (folder / f"{prefix}-labels-idx1-ubyte").write_bytes(_idx(labels.numpy().tobytes(), (n,)))
    return folder


def mlp_checkpoint(path: Path, poison: float | None = None) -> Path:
    model = build_model("mlp", hidden=[8], in_features=784, out_features=10)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    if poison is not None:
        state["fc1.weight"][0, 0] = poison
    torch.save(
        {
            "format": FORMAT,
            "arch": {"name": "mlp", "kwargs": {"hidden": [8], "in_features": 784, "out_features": 10}},
            "state_dict": state,
            "input_norm": {"mean": [0.0], "std": [1.0]},
        },
        path,
    )
    return path


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Paths the rows refer to by name (``{data}``, ``{ckpt}``...)."""
    torch.manual_seed(0)  # the same weights every run: whether a pruning round fine-tunes depends on them
    root = tmp_path_factory.mktemp("inputs")
    data = write_idx_folder(root / "idx")
    (root / "user_models.py").write_text(USER_MODULE)
    (root / "raises_at_import.py").write_text("raise RuntimeError('module is broken')\n")
    weights = root / "weights.pt"
    torch.save(build_model("mlp", hidden=[8], in_features=784, out_features=10).state_dict(), weights)
    seq_weights = root / "seq_weights.pt"
    torch.save(
        {
            k: torch.zeros_like(v)
            for k, v in torch.nn.Sequential(
                torch.nn.Flatten(), torch.nn.Linear(784, 8), torch.nn.ReLU(), torch.nn.Linear(8, 10)
            )
            .state_dict()
            .items()
        },
        seq_weights,
    )
    (root / "empty.pt").write_bytes(b"")
    (root / "text.pt").write_text("these are my notes, not a checkpoint\n")
    (root / "a_file").write_text("x")
    (root / "bad.toml").write_text("[run\nlr = = 1\n")
    full = (root / "weights.pt").read_bytes()
    (root / "truncated.pt").write_bytes(full[: len(full) // 2])
    g = torch.Generator().manual_seed(1)
    x = torch.rand(40, 1, 28, 28, generator=g)
    torch.save({"x": x, "y": torch.arange(40) % 13}, root / "labels13.pt")
    torch.save({"x": x.clone().fill_(float("nan")), "y": torch.arange(40) % 10}, root / "nan_inputs.pt")
    torch.save({"x": x, "y": torch.arange(40) % 10}, root / "good_data.pt")
    torch.save({"x": torch.rand(40, 3, 32, 32, generator=g), "y": torch.arange(40) % 10}, root / "rgb32.pt")
    paths = {
        "data": data,
        "ckpt": mlp_checkpoint(root / "model.pt"),
        "nan_ckpt": mlp_checkpoint(root / "nan.pt", float("nan")),
        "inf_ckpt": mlp_checkpoint(root / "inf.pt", float("inf")),
        "weights": weights,
        "seq_weights": seq_weights,
        "empty": root / "empty.pt",
        "text": root / "text.pt",
        "a_file": root / "a_file",
        "root": root,
        "bad_toml": root / "bad.toml",
        "truncated": root / "truncated.pt",
        "labels13": root / "labels13.pt",
        "nan_inputs": root / "nan_inputs.pt",
        "good_data": root / "good_data.pt",
        "rgb32": root / "rgb32.pt",
    }
    # broken datasets, one defect each
    for name, damage in {
        "idx_corrupt": lambda f: (f / "train-labels-idx1-ubyte").write_bytes(b"not an IDX file at all"),
        "idx_truncated": lambda f: (f / "train-images-idx3-ubyte").write_bytes(
            (f / "train-images-idx3-ubyte").read_bytes()[:1000]
        ),
        "idx_missing": lambda f: (f / "t10k-labels-idx1-ubyte").unlink(),
        "idx_gz_corrupt": lambda f: (
            (f / "t10k-images-idx3-ubyte").unlink(),
            (f / "t10k-images-idx3-ubyte.gz").write_bytes(gzip.compress(b"0123456789" * 50)[:40]),
        ),
    }.items():
        damage(write_idx_folder(root / name))
        paths[name] = root / name
    paths["idx_labels"] = write_idx_folder(root / "idx_labels", label_max=12)
    return {k: str(v) for k, v in paths.items()}


@pytest.fixture
def user_modules(inputs: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(inputs["root"])
    for name in ("user_models", "raises_at_import"):
        sys.modules.pop(name, None)


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def earlier_results(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in EARLIER.items():
        (folder / name).write_text(text)
    return folder


def refuse(main: Callable, argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, list[str]]:
    try:
        code = main(argv)
    except SystemExit as exc:
        code = exc.code
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    return code, err.strip().splitlines()


# --- the table ---------------------------------------------------------------------------------
TRAIN = [
    "--data-dir",
    "{data}",
    "--model",
    "mlp",
    "--hidden",
    "8",
    "--val-size",
    "10",
    "--epochs",
    "1",
    "--no-progress",
]
PRUNE = ["prune", "--checkpoint", "{ckpt}", "--data-dir", "{data}", "--val-size", "10", "--quiet", "--max-rounds", "1"]
FACTORY = ["prune", "--data-dir", "{data}", "--val-size", "10", "--quiet", "--weights", "{seq_weights}"]
EXPORT = ["export", "{ckpt}"]
TEST = ["test", "--checkpoint", "{ckpt}", "--data-dir", "{data}", "--val-size", "10", "--quiet"]
RECIPE = ["--data-dir", "{data}", "--val-size", "10", "--epochs", "1", "--no-progress"]
MAINS = {"train": train_main, "prune": prune_main, "export": prune_main, "test": prune_main, "recipe": recipe_main}

CASES = [
    # anrat.train: numbers that are not numbers, and values out of range
    ("train", TRAIN + ["--lr", "nan"], "lr must be a finite number > 0"),
    ("train", TRAIN + ["--lr", "inf"], "lr must be a finite number > 0"),
    ("train", TRAIN + ["--lambda-lr", "nan"], "lambda_lr must be a finite number > 0"),
    ("train", TRAIN + ["--lambda0", "nan"], "lam0 must be a finite number > 0"),
    ("train", TRAIN + ["--a", "inf"], "a (lambda penalty weight) must be >= 0"),
    ("train", TRAIN + ["--p", "nan"], "p must be a finite number > 0"),
    ("train", TRAIN + ["--gamma", "nan"], "gamma must be a finite number > 0"),
    ("train", TRAIN + ["--lambda-min=-inf"], "lam_min must be a finite number > 0"),
    ("train", TRAIN + ["--switch-below", "nan"], "switch_below must be"),
    ("train", TRAIN + ["--momentum", "nan"], "momentum must be"),
    ("train", TRAIN + ["--lr-decay", "step"], "--lr-decay: invalid choice: 'step'"),
    ("train", TRAIN + ["--l2", "fc2=nan"], "L2 coefficient for layer 'fc2'"),
    ("train", TRAIN + ["--grid-lr", "0.1,nan"], "grid_lr"),
    ("train", TRAIN + ["--grid-a=-1"], "grid_a"),
    ("train", TRAIN + ["--epochs", "-1"], "epochs must be >= 0"),
    ("train", TRAIN + ["--batch-size", "0"], "batch_size must be >= 1"),
    ("train", TRAIN + ["--val-size", "-1"], "val_size"),
    ("train", TRAIN + ["--train-subset", "0"], "train_subset"),
    ("train", TRAIN + ["--period", "0"], "period >= 1"),
    ("train", TRAIN + ["--error-exponent", "0"], "r (the error's exponent) must be a finite number > 0"),
    ("train", TRAIN + ["--error-exponent", "nan", "--loss", "lp"], "r (the error's exponent) must be a finite"),
    ("train", TRAIN + ["--error-exponent", "2"], "r (the error's exponent) applies to kind 'lp' and 'true_class_sq'"),
    ("train", TRAIN + ["--set", "schedule.r=true", "--loss", "lp"], "'schedule.r' must be of type float | None"),
    ("train", TRAIN + ["--switch-to", "mse"], "--switch-to: invalid choice: 'mse'"),
    ("train", TRAIN + ["--set", "schedule.switch_to=mse"], "unknown switch_to 'mse'; expected one of ('plain', 'rae')"),
    ("train", TRAIN + ["--schedule", "plain", "--switch-to", "rae"], "switch_to='rae' needs a schedule with a lambda"),
    ("train", TRAIN + ["--lambda-param", "identity"], "--lambda-param: invalid choice: 'identity'"),
    ("train", TRAIN + ["--schedule", "ess", "--rho0", "0"], "rho0 (effective sample size / batch size)"),
    ("train", TRAIN + ["--schedule", "ess", "--rho0", "0.5", "--rho-final", "0.2"], "rho_final must be >= rho0"),
    ("train", TRAIN + ["--schedule", "ess", "--rho-epochs", "0"], "rho_epochs must be an integer >= 1"),
    ("train", TRAIN + ["--schedule", "ess", "--switch-below", "1"], "do not apply to the ess schedule"),
    ("train", TRAIN + ["--schedule", "ess", "--switch-to", "rae"], "the ess schedule deconvexifies to the plain loss"),
    ("train", TRAIN + ["--loss", "hinge"], "--loss: invalid choice: 'hinge'"),
    ("train", TRAIN + ["--set", "schedule.kind=hinge"], "'schedule.kind' must be one of 'ce', 'lp', 'true_class_sq'"),
    ("train", TRAIN + ["--optimizer", "Optimizer"], "unknown optimizer 'Optimizer'"),
    ("train", TRAIN + ["--optimizer", "nosuch"], "unknown optimizer 'nosuch'"),
    ("train", TRAIN + ["--set", "train.lr=nan"], "lr must be a finite number > 0"),
    ("train", TRAIN + ["--set", "nosuch=1"], "nosuch"),
    ("train", TRAIN + ["--hidden", "0"], "hidden widths must be integers >= 1"),
    ("train", TRAIN + ["--set", "model_kwargs.nosuch=1"], "nosuch"),
    ("train", TRAIN + ["--set", "train.eval_batch_size=0"], "eval_batch_size must be >= 1"),
    ("train", TRAIN + ["--device", "bogus"], "bogus"),
    ("train", TRAIN + ["--config", "{text}"], "text.pt"),
    ("train", TRAIN + ["--engine", "batched", "--amp"], "; use --engine loop"),
    # anrat.train: data
    ("train", TRAIN + ["--data-dir", "{idx_corrupt}"], "train-labels-idx1-ubyte"),
    ("train", TRAIN + ["--data-dir", "{idx_truncated}"], "truncated"),
    ("train", TRAIN + ["--data-dir", "{idx_missing}"], "t10k-labels-idx1-ubyte"),
    ("train", TRAIN + ["--data-dir", "{idx_gz_corrupt}"], "t10k-images-idx3-ubyte"),
    ("train", TRAIN + ["--data-dir", "{idx_labels}"], "labels outside 0..9"),
    ("train", TRAIN + ["--data-dir", "{root}/nowhere"], "nowhere"),
    # anrat.train: output
    ("train", TRAIN + ["--out", "{a_file}"], "a_file"),
    ("train", TRAIN + ["--out", "{a_file}/run"], "a_file"),
    # pruning prune: options
    ("prune", PRUNE + ["--step", "-0.5"], "step"),
    ("prune", PRUNE + ["--step", "nan"], "step"),
    ("prune", PRUNE + ["--step", "2"], "step"),
    ("prune", PRUNE + ["--max-rounds", "0"], "max_rounds >= 1"),
    ("prune", PRUNE + ["--covariance", "sandwich"], "needs estimator 'full' or 'diagonal', not 'kfac'"),
    ("prune", PRUNE + ["--tilt", "1"], "tilt is used by covariance='sandwich' only"),
    ("prune", PRUNE + ["--covariance", "sandwich", "--estimator", "diagonal", "--tilt", "nan"], "tilt"),
    ("prune", PRUNE + ["--tolerance", "-1"], "margin (tolerance) must be in (0, 1)"),
    ("prune", PRUNE + ["--tolerance", "0"], "margin (tolerance) must be in (0, 1)"),
    ("prune", PRUNE + ["--tolerance", "1"], "margin (tolerance) must be in (0, 1)"),
    ("prune", PRUNE + ["--tolerance", "nan"], "margin (tolerance) must be in (0, 1)"),
    ("prune", PRUNE + ["--acceptance-alpha", "0"], "acceptance level alpha must be in (0, 1)"),
    ("prune", PRUNE + ["--acceptance-alpha", "1.5"], "acceptance level alpha must be in (0, 1)"),
    ("prune", PRUNE + ["--target-params", "1e12"], "is not below the model's"),
    ("prune", PRUNE + ["--target-params", "-3"], "target params must be"),
    ("prune", PRUNE + ["--target-speedup", "0.5"], "target speedup must be a number in (1, 1000)"),
    ("prune", PRUNE + ["--distill", "1.5"], "distillation weight must be in [0, 1]"),
    ("prune", PRUNE + ["--distill", "-0.5"], "distillation weight must be in [0, 1]"),
    ("prune", PRUNE + ["--distill-temperature", "0"], "distillation temperature must be a finite number > 0"),
    ("prune", PRUNE + ["--final-epochs", "-1"], "final_epochs must be an integer >= 0"),
    ("prune", PRUNE + ["--fine-tune-lr", "0"], "lr must be a finite number > 0"),
    ("prune", PRUNE + ["--fine-tune-lr", "nan"], "lr must be a finite number > 0"),
    ("prune", PRUNE + ["--fine-tune-epochs", "-1"], "epochs must be >= 0"),
    ("prune", PRUNE + ["--fine-tune-optimizer", "Optimizer"], "unknown optimizer 'Optimizer'"),
    ("prune", PRUNE + ["--max-samples", "0"], "max_samples must be >= 1"),
    ("prune", PRUNE + ["--method", "nosuch"], "nosuch"),
    ("prune", PRUNE + ["--alpha", "nan"], "alpha must be a number in (0, 1)"),
    ("prune", PRUNE + ["--set", "step=nan"], "step"),
    ("prune", PRUNE + ["--set", "fine_tune.momentum=nan"], "momentum"),
    ("prune", PRUNE + ["--val-size", "-5"], "--val-size"),
    ("prune", PRUNE + ["--set", "fine_tune.schedule.lam0=nan"], "lam0 must be a finite number > 0"),
    ("prune", PRUNE + ["--set", "min_step=nan"], "min_step"),
    ("prune", PRUNE + ["--set", "channel_multiple=0"], "channel_multiple"),
    ("prune", PRUNE + ["--set", "final_channel_multiple=0"], "final_channel_multiple"),
    ("prune", PRUNE + ["--quantize", "int4"], "--quantize: invalid choice: 'int4'"),
    (
        "prune",
        PRUNE + ["--quantize", "int8", "--calibration-images", "0"],
        "calibration_images must be an integer >= 1",
    ),
    ("prune", PRUNE + ["--quantize", "int8", "--quantize-tolerance", "-0.1"], "quantize_tolerance must be in [0, 1)"),
    ("prune", PRUNE + ["--quantize-tolerance", "nan"], "quantize_tolerance must be in [0, 1)"),
    ("prune", PRUNE + ["--quantize", "int8", "--val-data", "{rgb32}"], "3, 32, 32"),
    ("prune", PRUNE + ["--train-subset", "0"], "--train-subset"),
    ("prune", PRUNE + ["--val-data", "test"], "test split cannot serve as validation data"),
    # pruning prune: the model and its data
    ("prune", PRUNE + ["--checkpoint", "{empty}"], "empty"),
    ("prune", PRUNE + ["--checkpoint", "{text}"], "not a checkpoint"),
    ("prune", PRUNE + ["--checkpoint", "{nan_ckpt}"], "not finite"),
    ("prune", PRUNE + ["--checkpoint", "{inf_ckpt}"], "not finite"),
    ("prune", PRUNE + ["--data-dir", "{idx_labels}"], "labels outside 0..9"),
    ("prune", PRUNE + ["--data-dir", "{idx_truncated}"], "truncated"),
    ("prune", FACTORY + ["--factory", "raises_at_import:build"], "raises_at_import"),
    ("prune", FACTORY + ["--factory", "user_models:broken"], "user_models:broken"),
    ("prune", FACTORY + ["--factory", "user_models:needs"], "user_models:needs"),
    ("prune", FACTORY + ["--factory", "user_models:build", "--factory-kwargs", '{{"nosuch": 1}}'], "user_models:build"),
    ("prune", FACTORY + ["--factory", "user_models:number"], "user_models:number"),
    ("prune", PRUNE + ["--checkpoint", "{truncated}"], "truncated"),
    ("prune", PRUNE + ["--checkpoint", "{root}"], "does not exist"),
    ("prune", PRUNE + ["--train-data", "{labels13}", "--test-data", "{good_data}"], "class labels 0..12"),
    ("prune", PRUNE + ["--train-data", "{nan_inputs}", "--test-data", "{good_data}"], "not finite"),
    ("prune", PRUNE + ["--train-data", "{good_data}", "--test-data", "{root}/missing.pt"], "missing.pt"),
    ("prune", PRUNE + ["--input-norm", "abc"], "--input-norm"),
    ("prune", PRUNE + ["--input-norm", "0.5,0"], "std"),
    ("prune", PRUNE + ["--input-norm", "nan,1"], "finite"),
    ("prune", FACTORY + ["--factory", "user_models:build", "--factory-kwargs", "[1]"], "JSON object"),
    ("prune", FACTORY + ["--factory", "user_models"], "package.module:function"),
    ("prune", PRUNE + ["--config", "{bad_toml}"], "bad.toml"),
    ("prune", PRUNE + ["--set", "step=abc"], "step"),
    # pruning prune: output
    ("prune", PRUNE + ["--out", "{a_file}"], "a_file"),
    ("prune", PRUNE + ["--out", "{a_file}/run"], "a_file"),
    # pruning export
    ("export", EXPORT + ["--input-shape", "abc"], "--input-shape"),
    ("export", EXPORT + ["--input-shape=-1,28,28"], "--input-shape"),
    ("export", ["export", "{empty}"], "empty"),
    ("export", ["export", "{text}"], "not a checkpoint"),
    ("export", ["export", "{nan_ckpt}"], "not finite"),
    ("export", ["export", "--factory", "user_models:broken", "--weights", "{weights}"], "user_models:broken"),
    ("export", ["export", "--factory", "raises_at_import:build", "--weights", "{weights}"], "raises_at_import"),
    ("export", EXPORT + ["--out", "{out}"], "folder"),
    ("export", EXPORT + ["--out", "{a_file}/m.onnx"], "a_file"),
    ("export", ["export", "--factory", "user_models:build"], "--weights"),
    ("export", EXPORT + ["--input-shape", "3,32,32"], "does not accept"),
    ("export", EXPORT + ["--test-data", "{root}/missing.pt"], "missing.pt"),
    ("export", EXPORT + ["--input-norm", "0.5,-1"], "std"),
    ("export", EXPORT + ["--quantize", "int4"], "--quantize: invalid choice: 'int4'"),
    ("export", EXPORT + ["--quantize", "int8", "--calibration-images", "-3"], "calibration_images must be"),
    ("export", EXPORT + ["--quantize", "int8", "--quantize-tolerance", "-1"], "quantize_tolerance must be in [0, 1)"),
    ("export", EXPORT + ["--quantize", "int8"], "--quantize needs labelled validation data"),
    ("export", EXPORT + ["--quantize", "int8", "--val-data", "{rgb32}"], "does not accept calibration inputs"),
    # pruning test
    ("test", TEST + ["--alpha", "2"], "alpha must be a number in (0, 1)"),
    ("test", TEST + ["--alpha", "nan"], "alpha must be a number in (0, 1)"),
    ("test", TEST + ["--estimator", "nosuch"], "--estimator: invalid choice: 'nosuch'"),
    ("test", TEST + ["--method", "nosuch"], "nosuch"),
    ("test", TEST + ["--max-samples", "0"], "max_samples must be >= 1"),
    ("test", TEST + ["--covariance", "sandwich"], "needs estimator 'full' or 'diagonal', not 'kfac'"),
    ("test", TEST + ["--data-dir", "{idx_labels}"], "labels outside 0..9"),
    ("test", TEST + ["--data-dir", "{idx_truncated}"], "truncated"),
    ("test", TEST + ["--train-data", "{nan_inputs}", "--test-data", "{good_data}"], "not finite"),
    ("test", TEST + ["--train-data", "{rgb32}", "--test-data", "{good_data}"], "inputs differ in shape"),
    ("test", TEST + ["--checkpoint", "{text}"], "not a checkpoint"),
    ("test", TEST + ["--out", "{a_file}"], "a_file"),
    # the recipe
    ("recipe", RECIPE + ["--config", "{bad_toml}"], "bad.toml"),
    ("recipe", RECIPE + ["--config", "{root}/missing.toml"], "missing.toml"),
    ("recipe", RECIPE + ["--set", "prune.fine_tune.lr=inf"], "lr must be a finite number > 0"),
    ("recipe", RECIPE + ["--set", "prune.target.params=1e9"], "is not below the model's"),
    ("recipe", RECIPE + ["--set", "prune.tolerance=0"], "margin (tolerance) must be in (0, 1)"),
    ("recipe", RECIPE + ["--quantize", "int4"], "--quantize: invalid choice: 'int4'"),
    ("recipe", RECIPE + ["--calibration-images", "0"], "calibration_images must be"),
    ("recipe", RECIPE + ["--quantize-tolerance", "-1"], "quantize_tolerance must be in [0, 1)"),
    ("recipe", RECIPE + ["--set", "prune.fine_tune.distill=2"], "distillation weight must be in [0, 1]"),
    ("recipe", RECIPE + ["--set", "run.nosuch=1"], "nosuch"),
    ("recipe", RECIPE + ["--set", 'run.train.lr_decay="linear"'], "unknown lr_decay 'linear'"),
    ("recipe", RECIPE + ["--set", "run.grid_lr=[nan]"], "grid_lr"),
    ("recipe", RECIPE + ["--set", "run.train.optimizer=Optimizer"], "unknown optimizer 'Optimizer'"),
    ("recipe", RECIPE + ["--set", "prune.fine_tune.schedule.lam0=0"], "lam0"),
    ("recipe", RECIPE + ["--set", "run.model=mlp"], "not an MNIST ConvNet"),
    ("recipe", RECIPE + ["--set", "run.val_size=0"], "val_size"),
    ("recipe", RECIPE + ["--set", "prune.alpha=0"], "alpha"),
    ("recipe", RECIPE + ["--set", "prune.step=nan"], "step"),
    ("recipe", RECIPE + ["--set", "prune.max_rounds=0"], "max_rounds"),
    ("recipe", RECIPE + ["--set", "run.train.lr=nan"], "lr must be a finite number > 0"),
    ("recipe", RECIPE + ["--set", "run.schedule.lam0=inf"], "lam0"),
    ("recipe", RECIPE + ["--set", "report.latency_repeats=0"], "latency_repeats"),
    ("recipe", RECIPE + ["--lambda0", "nan"], "lam0"),
    ("recipe", RECIPE + ["--set", "run.schedule.switch_to=mse"], "unknown switch_to 'mse'"),
    ("recipe", RECIPE + ["--set", "run.schedule.r=2"], "r (the error's exponent) applies to kind 'lp'"),
    ("recipe", RECIPE + ["--data-dir", "{idx_missing}"], "t10k-labels-idx1-ubyte"),
    ("recipe", RECIPE + ["--out", "{a_file}"], "a_file"),
]


def _ids() -> list[str]:
    seen: dict[str, int] = {}
    ids = []
    for command, argv, _ in CASES:
        base = f"{command}:{' '.join(a for a in argv[-2:] if a)}"
        seen[base] = seen.get(base, 0) + 1
        ids.append(base if seen[base] == 1 else f"{base}#{seen[base]}")
    return ids


@pytest.mark.parametrize("command, argv, message", CASES, ids=_ids())
def test_refused_with_one_line_and_nothing_lost(command, argv, message, inputs, user_modules, tmp_path, capsys):
    out = earlier_results(tmp_path / "out")
    before = snapshot(out)
    names = {**inputs, "out": str(out)}
    argv = [a.format(**names) for a in argv]
    if "--out" not in argv:
        argv += ["--out", str(out / "m.onnx") if command == "export" else str(out)]
    code, lines = refuse(MAINS[command], argv, capsys)
    assert code == 2 and len(lines) == 1 and message in lines[0], lines
    assert snapshot(out) == before


# --- a folder holding a started training ---------------------------------------------------------
@pytest.fixture(scope="module")
def trained_folder(inputs: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("trained") / "run"
    argv = [a.format(**inputs) for a in TRAIN] + ["--out", str(out), "--lr", "0.05"]
    assert train_main(argv) == 0
    return out


def copy_folder(source: Path, target: Path) -> Path:
    target.mkdir(parents=True)
    for path in source.iterdir():
        (target / path.name).write_bytes(path.read_bytes())
    return target


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--model", "lenet5"], "holds a mlp run, not lenet5; pass --no-resume"),
        (["--hidden", "8", "--lr", "0.2"], "train.lr: 0.05 there, 0.2 now"),
        (["--hidden", "8", "--lr", "0.05", "--loss", "lp"], "schedule.kind"),
    ],
    ids=["other-model", "other-lr", "other-loss"],
)
def test_resuming_with_other_options_is_refused(argv, message, trained_folder, inputs, tmp_path, capsys):
    out = copy_folder(trained_folder, tmp_path / "run")
    before = snapshot(out)
    base = [a.format(**inputs) for a in TRAIN if a not in ("--hidden", "8")]
    code, lines = refuse(train_main, base + argv + ["--out", str(out)], capsys)
    assert code == 2 and len(lines) == 1 and message in lines[0], lines
    assert snapshot(out) == before


def test_no_resume_starts_afresh_and_a_resume_removes_stale_temporaries(trained_folder, inputs, tmp_path, capsys):
    out = copy_folder(trained_folder, tmp_path / "run")
    stale = [out / ".last.pt.k1ll3d.tmp", out / ".model.pt.k1ll3d.tmp"]
    for path in stale:
        path.write_bytes(b"half a checkpoint")
    argv = [a.format(**inputs) for a in TRAIN] + ["--out", str(out), "--lr", "0.05", "--epochs", "2"]
    assert train_main(argv) == 0  # a resume with more epochs continues the run
    assert not any(path.exists() for path in stale)
    assert train_main(argv[:-4] + ["--lr", "0.2", "--no-resume"]) == 0
    assert json.loads((out / "result.json").read_text())["config"]["train"]["lr"] == 0.2


# --- runs that start correctly and then fail ---------------------------------------------------
def test_fine_tuning_that_diverges_exits_1_and_keeps_earlier_results(inputs, tmp_path, capsys):
    out = earlier_results(tmp_path / "out")
    before = snapshot(out)
    argv = [a.format(**inputs) for a in PRUNE] + [
        "--out",
        str(out),
        "--fine-tune-optimizer",
        "sgd",
        "--fine-tune-lr",
        "1e30",
        "--target-params",
        "0.5",  # a round that surely prunes, and so fine-tunes, whatever the tests find
        "--set",
        "fine_tune.batch_size=4",
    ]
    code, lines = refuse(prune_main, argv, capsys)
    assert code == 1 and len(lines) == 1, lines
    assert "fine-tuning diverged" in lines[0] and f"nothing was written to {out}" in lines[0], lines
    assert snapshot(out) == before


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
@pytest.mark.parametrize("command, argv", [("train", TRAIN), ("prune", PRUNE), ("export", EXPORT)])
def test_a_read_only_output_folder_is_refused(command, argv, inputs, tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        target = locked / ("m.onnx" if command == "export" else "run")
        code, lines = refuse(MAINS[command], [a.format(**inputs) for a in argv] + ["--out", str(target)], capsys)
    finally:
        locked.chmod(0o700)
    assert code == 2 and len(lines) == 1 and str(locked) in lines[0], lines


@pytest.mark.slow  # one subprocess per refusal
def test_the_command_line_itself_prints_no_traceback(inputs, tmp_path):
    """One real process (the rows above call ``main`` in-process): one line, status 2."""
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    proc = subprocess.run(
        [sys.executable, "-m", "pruning", "prune", "--checkpoint", inputs["text"], "--out", str(tmp_path / "o")],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO_ROOT,
        env=env,
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "is not a checkpoint" in proc.stderr
