"""Train the paper's ConvNet on MNIST with a risk-averting criterion, prune it by statistical significance, export ONNX.

``python -m anrat.recipes.mnist_prune`` runs the whole pipeline of the toolkit in one command,
:func:`pruning.pipeline.train_prune_export`: **train** (:func:`anrat.run.run`; the quick preset:
lenet5 with the scale-free tilt ``ess``, its last epoch kept; the paper preset: ANRAT over a grid,
selected on validation, trained as one batched stack), **prune** (:func:`pruning.prune.prune`: Wald
tests rank what goes, the network recovers distilling from the unpruned one, and a round is kept
only when a paired non-inferiority test on the validation images shows it within the margin),
**export** (one ONNX file checked by ``onnx.checker`` and onnxruntime, timed against the dense
network; with ``--quantize int8`` an int8 copy kept only within ``--quantize-tolerance``), and a
report with figures. This file holds only the presets and the command line.

Options: a preset (``recipes/configs/<preset>.toml``: ``quick``, the default, or ``paper``) or a
``--config`` file (TOML, or the ``config.json`` of an earlier run), then the flags, then ``--set
KEY=VALUE``. The resolved options go to ``OUT/config.json`` before anything runs, so ``--config
OUT/config.json`` repeats the run. The outputs, the input contract of the ONNX model and every
option: docs/usage.md.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from anrat.cli import (
    OneLineErrorParser,
    add_data_dir_option,
    add_device_option,
    add_no_progress_option,
    add_out_option,
    add_seed_option,
    int_at_least,
    run_command,
)
from anrat.config import add_config_arguments, flag, flag_values, read_config_file, resolve, set_dotted
from anrat.errors import InputError
from anrat.run import ENGINES
from anrat.schedules import SCHEDULES
from anrat.trainer import LR_DECAYS
from pruning.pipeline import PipelineConfig, train_prune_export, upgrade_config_values
from pruning.quantize import QUANTIZE_CHOICES
from pruning.report import FIGURES  # noqa: F401  (re-exported: the figure files a run writes)

PROG = "python -m anrat.recipes.mnist_prune"
PRESETS_DIR = Path(__file__).resolve().parent / "configs"
PRESETS = tuple(sorted(p.stem for p in PRESETS_DIR.glob("*.toml")))
MODELS = ("lenet5", "convnet_dropout")


@dataclass
class RecipeConfig(PipelineConfig):
    """The pipeline's options and the preset they started from; written resolved to ``OUT/config.json``."""

    preset: str = "quick"


def resolve_config(args: argparse.Namespace) -> RecipeConfig:
    """Preset or ``--config`` file, then ``--set``, then the flags, into a validated :class:`RecipeConfig`."""
    values = read_config_file(args.config if args.config else PRESETS_DIR / f"{args.preset}.toml")
    seed = [("run.train.seed", args.seed), ("prune.fine_tune.seed", args.seed)] if args.seed is not None else []
    for key, value in [*seed, *flag_values(args), *args.set]:  # flags, then --set (anrat.config)
        set_dotted(values, key, value)
    cfg = resolve(RecipeConfig(), upgrade_config_values(values))
    if cfg.run.data_dir is None and os.environ.get("ANRAT_DATA_DIR"):
        # record where the data came from, so that config.json repeats the run without the variable
        cfg = replace(cfg, run=replace(cfg.run, data_dir=os.environ["ANRAT_DATA_DIR"]))
    cfg = replace(cfg, run=replace(cfg.run, out_dir=str(Path(cfg.out_dir) / "train")))
    if cfg.run.model not in MODELS:
        raise InputError(f"model {cfg.run.model!r} is not an MNIST ConvNet; expected 'lenet5' or 'convnet_dropout'")
    cfg.validate()
    return cfg


def build_parser() -> argparse.ArgumentParser:
    ap = OneLineErrorParser(
        prog=PROG,
        description=__doc__.split("\n\n")[0],
        epilog="Options left out keep the value of the preset or --config file (see recipes/configs/*.toml).",
    )
    ap.add_argument(
        "--preset",
        choices=PRESETS,
        default="quick",
        help="quick: 10 epochs on the full training split, ~3.5 min on 2 idle CPU cores; paper: the "
        "paper's grid over lr and a, 100 epochs each (a GPU is recommended). Default: quick",
    )
    add_config_arguments(ap, "prune.max_rounds=2 --set prune.fine_tune.epochs=2 --set run.grid_lr=[0.1,0.5]")
    add_out_option(ap, key="out_dir", what="folder (quick: runs/mnist_prune)")
    add_data_dir_option(ap, key="run.data_dir", of="MNIST's")
    flag(
        ap,
        "--download",
        key="run.download",
        action="store_const",
        const=True,
        help="download MNIST through torchvision if no folder is given",
    )
    add_device_option(ap, key="run.device")
    add_seed_option(
        ap, of="initialisation, validation split, shuffling and fine-tuning", default=None, type=int_at_least(0)
    )
    flag(
        ap,
        "--model",
        key="run.model",
        choices=MODELS,
        help="lenet5: the paper's ConvNet; convnet_dropout: the ConvNet with dropout",
    )
    flag(
        ap,
        "--schedule",
        key="run.schedule.name",
        choices=SCHEDULES,
        help="lambda schedule: ess (the scale-free tilt, quick's default), adaptive (ANRAT), fixed, anneal, "
        "excursions, or plain (cross-entropy)",
    )
    flag(ap, "--lambda0", key="run.schedule.lam0", type=float, help="initial (or fixed) lambda")
    flag(
        ap,
        "--period",
        key="run.schedule.period",
        type=int_at_least(1),
        help="excursions (Lo et al.'s NRAE-MSE): steps per cycle of NRAE and plain-loss steps",
    )
    flag(
        ap,
        "--plain-steps",
        key="run.schedule.plain_steps",
        type=int_at_least(0),
        help="excursions: plain-loss steps closing each cycle (fewer than --period)",
    )
    flag(
        ap,
        "--engine",
        key="run.engine",
        choices=ENGINES,
        help="how a grid over lr and a is trained: batched, all configurations at once as one "
        "vectorised stack (the paper preset); loop, one after another (quick: a single configuration)",
    )
    flag(ap, "--epochs", key="run.train.epochs", type=int_at_least(0), help="training epochs (per grid point)")
    flag(
        ap,
        "--lr-decay",
        key="run.train.lr_decay",
        choices=list(LR_DECAYS),
        help="the weights' learning rate over the epochs: none (constant) or cosine (annealed to 0)",
    )
    flag(
        ap,
        "--train-subset",
        key="run.train_subset",
        type=int_at_least(1),
        help="train on the first N training images after the validation split",
    )
    flag(ap, "--val-size", key="run.val_size", type=int_at_least(1), help="training images held out for validation")
    flag(ap, "--test-subset", key="run.test_subset", type=int_at_least(1), help="test on the first N test images")
    flag(
        ap,
        "--no-resume",
        key="run.resume",
        action="store_const",
        const=False,
        help="train afresh even if OUT/train holds a started run",
    )
    add_no_progress_option(ap, key="run.progress", what="progress bars")
    flag(
        ap,
        "--quantize",
        key="export.quantize",
        choices=QUANTIZE_CHOICES,
        help="int8: also write model.int8.onnx (onnxruntime static quantisation, calibrated on validation "
        "images), kept only within --quantize-tolerance of model.onnx's validation error",
    )
    flag(
        ap,
        "--quantize-tolerance",
        key="export.quantize_tolerance",
        type=float,
        help="largest rise of validation error the int8 model may add, a fraction (0.001 = 0.1 point)",
    )
    flag(
        ap,
        "--calibration-images",
        key="export.calibration_images",
        type=int,
        help="validation images the int8 activation ranges are calibrated on",
    )
    flag(
        ap,
        "--prune-by-training-criterion",
        key="prune_by_training_criterion",
        action="store_const",
        const=True,
        help="fine-tune each pruning round by the criterion the selected model was trained with, and test "
        'NRAE-trained models with the sandwich covariance at their t (needs --set prune.estimator="diagonal" '
        "for a lambda schedule)",
    )
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    def body(args: argparse.Namespace) -> int:
        cfg = resolve_config(args)
        command = " ".join([PROG, *(sys.argv[1:] if argv is None else argv)])
        metrics = train_prune_export(
            cfg,
            command,
            PROG,
            progress=cfg.run.progress and sys.stderr.isatty(),
            log=lambda line: print(line, file=sys.stderr, flush=True),
        )
        te, p = metrics["test_error"], metrics["pruning"]
        pct = lambda v: "-" if v is None else f"{100 * v:.2f}%"  # noqa: E731
        print(
            f"test error {pct(te['trained'])} trained, {pct(te['pruned'])} pruned "
            f"({pct(te['onnx'])} with model.onnx under onnxruntime), {te['images']} images; "
            f"{p['nonzero_after']:,} of {p['params_before']:,} parameters kept; {metrics['seconds']['total']:.0f} s"
        )
        print(f"wrote {Path(cfg.out_dir) / 'report.md'}")
        int8 = metrics["export"]["int8"]
        if int8 is not None:
            print(int8["line"], file=None if int8["written"] else sys.stderr)
            if not int8["written"]:  # the float files stand; the int8 model the user asked for does not
                return 1
        return 0

    return run_command(build_parser(), body, argv)


if __name__ == "__main__":
    sys.exit(main())
