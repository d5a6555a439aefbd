"""Train a network with NRAE/ANRAT from the command line: ``python -m anrat.train`` (``anrat-train``).

The command line of :func:`anrat.run.run`: a run loads the data (held-out validation split chosen
by seed), builds the model by name, trains with a lambda schedule, selects the best epoch on
validation, evaluates the test set once on the selected model, and writes ``model.pt``,
``metrics.jsonl``, ``last.pt`` / ``best.pt`` and ``result.json`` to ``--out`` (:mod:`anrat.run`).

With ``--grid-lr`` / ``--grid-a`` every combination is trained in ``OUT/grid/...`` and the one
with the best validation error is selected; only that one sees the test set. With ``--engine
batched`` the combinations are trained at once, as the members of one
:class:`~anrat.batched.BatchedTrainer` stack (in ``OUT/batched``), and selected the same way.

Under ``torchrun`` (WORLD_SIZE > 1) the same command trains data-parallel on all the processes
(nccl on cuda:LOCAL_RANK, gloo on the CPU); rank 0 writes the files. See docs/distributed.md.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from anrat.cli import (
    OneLineErrorParser,
    add_data_dir_option,
    add_device_option,
    add_no_progress_option,
    add_out_option,
    add_seed_option,
    run_command,
)
from anrat.config import add_config_arguments, flag, resolve_from_args
from anrat.data import DATASETS
from anrat.distributed import env_is_main
from anrat.errors import InputError
from anrat.ess import RHO_GROWTHS
from anrat.functional import KINDS
from anrat.losses import LAMBDA_PARAMETERIZATIONS
from anrat.models import MODELS
from anrat.run import ENGINES, RunConfig, run
from anrat.schedules import SCHEDULES, SWITCH_TARGETS
from anrat.trainer import COMPILE_MODES, LR_DECAYS

__all__ = ["build_parser", "config_from_args", "main"]


# --- command line ----------------------------------------------------------------------------
def _floats(text: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def _ints(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


class _LayerL2(argparse.Action):
    """``--l2 LAYER=COEFF``, repeatable, into one dict ``{layer: coeff}``."""

    def __call__(self, parser, namespace, text, option_string=None):  # type: ignore[override]
        layer, sep, value = text.partition("=")
        try:
            if not sep or not layer:
                raise ValueError
            coeff = float(value)
        except ValueError:
            parser.error(f"argument --l2: expected LAYER=COEFF such as fc2=0.05, got {text!r}")
        setattr(namespace, self.dest, {**getattr(namespace, self.dest, {}), layer: coeff})


def build_parser(prog: str = "anrat-train") -> argparse.ArgumentParser:
    """Every flag is bound to one key of :class:`RunConfig` (``anrat.config.flag``); the defaults
    shown are that dataclass's. ``--config FILE`` and ``--set KEY=VALUE`` reach every key."""
    d = RunConfig()
    ap = OneLineErrorParser(
        prog=prog,
        description=__doc__.split("\n\n")[0],
        epilog="Options resolve as: RunConfig defaults < --config file < --set < flags.",
    )
    g = ap.add_argument_group("data")
    flag(g, "--dataset", key="dataset", defaults=d, choices=DATASETS, help="dataset to train on")
    add_data_dir_option(g, key="data_dir")
    flag(
        g,
        "--download",
        key="download",
        action="store_const",
        const=True,
        help="download the dataset through torchvision if missing",
    )
    flag(
        g,
        "--val-size",
        key="val_size",
        defaults=d,
        type=int,
        help="training images held out for validation (chosen by --seed)",
    )
    flag(g, "--train-subset", key="train_subset", type=int, help="train on the first N remaining training images only")
    flag(g, "--test-subset", key="test_subset", type=int, help="evaluate on the first N test images only")
    g = ap.add_argument_group("model")
    flag(g, "--model", key="model", defaults=d, choices=sorted(MODELS), help="architecture")
    flag(g, "--hidden", key="model_kwargs.hidden", type=_ints, help="hidden widths for --model mlp, e.g. 500,300")
    g = ap.add_argument_group("optimisation")
    flag(g, "--epochs", key="train.epochs", defaults=d, type=int, help="training epochs")
    flag(g, "--batch-size", key="train.batch_size", defaults=d, type=int, help="minibatch size")
    flag(g, "--lr", key="train.lr", defaults=d, type=float, help="learning rate of the weights")
    flag(
        g,
        "--lambda-lr",
        key="train.lambda_lr",
        type=float,
        help="learning rate of lambda's parameter (ANRAT); default: lr * 0.1 (lr with --lambda-param direct)",
    )
    flag(g, "--optimizer", key="train.optimizer", defaults=d, help="torch.optim class name (sgd, adam, adamw, ...)")
    flag(g, "--momentum", key="train.momentum", defaults=d, type=float, help="SGD momentum (the paper: 0)")
    flag(
        g,
        "--lr-decay",
        key="train.lr_decay",
        defaults=d,
        choices=list(LR_DECAYS),
        help="the weights' learning rate over the epochs: none (constant) or cosine (annealed to 0 by the last epoch)",
    )
    flag(
        g,
        "--l2",
        key="train.l2",
        action=_LayerL2,
        metavar="LAYER=COEFF",
        help="weight decay on one layer's weight, repeatable (the paper: fc2=0.05)",
    )
    flag(
        g,
        "--amp",
        key="train.amp",
        action="store_const",
        const=True,
        help="bfloat16 autocast for the forward pass (losses stay float32)",
    )
    flag(
        g,
        "--compile",
        key="train.compile",
        nargs="?",
        const="default",
        choices=COMPILE_MODES,
        metavar="MODE",
        help="torch.compile the forward pass and the loss; MODE is torch.compile's mode, one of "
        f"{', '.join(COMPILE_MODES)} (without MODE: default; reduce-overhead adds CUDA "
        "graphs). Slow first steps, fewer and fused kernels after",
    )
    add_seed_option(g, of="initialisation, split and shuffling", key="train.seed", defaults=d)
    flag(g, "--grid-lr", key="grid_lr", type=_floats, help="comma-separated learning rates to grid-search")
    flag(g, "--grid-a", key="grid_a", type=_floats, help="comma-separated penalty weights a to grid-search")
    flag(
        g,
        "--engine",
        key="engine",
        defaults=d,
        choices=ENGINES,
        help="loop: train the grid's configurations one after another; batched: all at once as one "
        "vectorised stack (anrat.batched: SGD or Adam; no amp, compile, torchrun)",
    )
    g = ap.add_argument_group("lambda schedule")
    flag(
        g,
        "--schedule",
        key="schedule.name",
        defaults=d,
        choices=SCHEDULES,
        help="fixed: constant lambda; adaptive: ANRAT; anneal: lam0*gamma^epoch; "
        "excursions: fixed lambda with periodic plain-loss phases; plain: cross-entropy only; "
        "ess: each step the tilt at which the weights' effective sample size is rho * batch size",
    )
    flag(g, "--lambda0", key="schedule.lam0", defaults=d, type=float, help="initial (or fixed) lambda, > 0")
    flag(
        g, "--p", key="schedule.p", defaults=d, type=float, help="t = lambda^p (and the Lp norm exponent for --loss lp)"
    )
    flag(
        g,
        "--loss",
        key="schedule.kind",
        defaults=d,
        choices=KINDS,
        help="per-sample loss: ce (cross-entropy), lp (Lp error; with class labels, of the softmax over all "
        "classes), true_class_sq ((1 - p_y)^r on the true class, the original ANRAT code's)",
    )
    flag(g, "--a", key="schedule.a", defaults=d, type=float, help="ANRAT penalty weight a in a*lambda^(-q), >= 0")
    flag(g, "--q", key="schedule.q", defaults=d, type=float, help="ANRAT penalty exponent q, > 0")
    flag(
        g,
        "--lambda-param",
        key="schedule.parameterization",
        defaults=d,
        choices=LAMBDA_PARAMETERIZATIONS,
        help="ANRAT parameterisation of lambda: log (lambda = exp(theta)), softplus, or direct (lambda "
        "itself, the paper's SGD update, projected back onto [1e-4, 1e4] after each step; its learning "
        "rate defaults to --lr)",
    )
    flag(g, "--gamma", key="schedule.gamma", defaults=d, type=float, help="anneal: lambda factor per epoch")
    flag(g, "--lambda-min", key="schedule.lam_min", defaults=d, type=float, help="anneal: lower bound of lambda")
    flag(g, "--period", key="schedule.period", defaults=d, type=int, help="excursions: steps per cycle")
    flag(
        g,
        "--plain-steps",
        key="schedule.plain_steps",
        defaults=d,
        type=int,
        help="excursions: plain-loss steps per cycle",
    )
    flag(
        g,
        "--normalizer",
        key="schedule.normalizer",
        defaults=d,
        choices=("batch", "running"),
        help="NRAE normaliser: per batch (paper) or running estimate across batches",
    )
    flag(
        g,
        "--switch-below",
        key="schedule.switch_below",
        defaults=d,
        type=float,
        help="deconvexify (switch to the plain loss) once lambda falls below this",
    )
    flag(
        g,
        "--switch-when-feasible",
        key="schedule.switch_when_feasible",
        action="store_const",
        const=True,
        help="deconvexify once RAE at the current lambda is representable in float32",
    )
    flag(
        g,
        "--switch-to",
        key="schedule.switch_to",
        defaults=d,
        choices=SWITCH_TARGETS,
        help="what deconvexification switches to: plain (the plain loss) or rae (RAE, mean exp(t*l), "
        "at the lambda of the switch)",
    )
    flag(
        g,
        "--error-exponent",
        key="schedule.r",
        type=float,
        metavar="R",
        help="exponent r of the error for --loss lp (||f - y||_r^r; default: p) and --loss true_class_sq "
        "((1 - p_y)^r, default 2, the original ANRAT code's); independent of --p",
    )
    flag(
        g,
        "--rho0",
        key="schedule.rho0",
        defaults=d,
        type=float,
        help="ess: effective sample size / batch size in the first epoch, in (0, 1]",
    )
    flag(
        g,
        "--rho-final",
        key="schedule.rho_final",
        defaults=d,
        type=float,
        help="ess: rho reached after --rho-epochs epochs, in [rho0, 1]; 1 deconvexifies (plain loss from then on)",
    )
    flag(g, "--rho-epochs", key="schedule.rho_epochs", defaults=d, type=int, help="ess: epochs from rho0 to rho_final")
    flag(
        g,
        "--rho-growth",
        key="schedule.rho_growth",
        defaults=d,
        choices=RHO_GROWTHS,
        help="ess: rho rises by the same factor every epoch (geometric) or by the same amount (linear)",
    )
    g = ap.add_argument_group("run")
    add_device_option(g, key="device", defaults=d)
    add_out_option(g, key="out_dir", defaults=d)
    flag(
        g,
        "--no-resume",
        key="resume",
        action="store_const",
        const=False,
        help="start afresh even if OUT/last.pt exists",
    )
    add_no_progress_option(g, key="progress", what="progress lines (one per epoch) or bars")
    add_config_arguments(g, "train.lr=0.05")
    return ap


def config_from_args(args: argparse.Namespace) -> RunConfig:
    """The run's :class:`RunConfig`: defaults < ``--config`` < ``--set`` < flags, validated."""
    cfg = resolve_from_args(RunConfig(), args)
    if cfg.model_kwargs.get("hidden") is not None and cfg.model != "mlp":
        raise InputError("--hidden applies to --model mlp only")
    cfg.validate()
    return cfg


def main(argv: Sequence[str] | None = None) -> int:
    def body(args: argparse.Namespace) -> int:
        cfg = config_from_args(args)
        result = run(cfg)
        if not env_is_main():  # under torchrun, rank 0 reports
            return 0
        sel = result["selected"]
        err = result["test"].get("error")
        print(
            f"selected epoch {sel['best_epoch']} (lr={sel['lr']:g}, a={sel['a']:g}); "
            f"validation {sel['val']}; test error {err:.4%}"
            if err is not None
            else f"test {result['test']}"
        )
        print(f"wrote {Path(cfg.out_dir) / 'model.pt'}")
        return 0

    return run_command(build_parser(), body, argv)


if __name__ == "__main__":
    sys.exit(main())
