"""Train a network with NRAE/ANRAT from the command line: ``python -m anrat.train`` (``anrat-train``).

A run loads the data (held-out validation split chosen by seed), builds the model by name, trains
with a lambda schedule, selects the best epoch on validation, evaluates the test set once on the
selected model, and writes to ``--out``:

- ``model.pt``: the selected model, self-describing (architecture, weights, lambda, metrics); the
  pruning stage takes it;
- ``metrics.jsonl``: one line per epoch; ``last.pt`` / ``best.pt``: for resuming and inspection;
- ``result.json``: the selected epoch, validation and test figures, and the resolved options.

With ``--grid-lr`` / ``--grid-a`` every combination is trained in ``OUT/grid/...`` and the one
with the best validation error is selected; only that one sees the test set. With ``--engine
batched`` the combinations are trained at once, as the members of one
:class:`~anrat.batched.BatchedTrainer` stack (in ``OUT/batched``), and selected the same way.

Under ``torchrun`` (WORLD_SIZE > 1) the same command trains data-parallel on all the processes
(nccl on cuda:LOCAL_RANK, gloo on the CPU); rank 0 writes the files. See docs/distributed.md.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import torch

from anrat.atomic_files import make_output_folder, remove_stale_temporaries, write_text_atomic
from anrat.batched import BatchedTrainer, Member, unsupported_option
from anrat.checkpoint import load_checkpoint, save_atomic
from anrat.cli import OneLineErrorParser, run_command
from anrat.config import add_config_arguments, flag, flatten, resolve_from_args
from anrat.data import DATASETS, DataSplits, load_dataset
from anrat.distributed import current_world, env_is_main, process_group_from_env
from anrat.errors import InputError
from anrat.ess import RHO_GROWTHS
from anrat.functional import KINDS
from anrat.losses import LAMBDA_PARAMETERIZATIONS
from anrat.models import MODELS, build_model
from anrat.run_lock import lock_output_folder
from anrat.schedules import SCHEDULES, SWITCH_TARGETS, LambdaSchedule, ScheduleConfig
from anrat.trainer import COMPILE_MODES, LR_DECAYS, TrainConfig, Trainer, TrainingDiverged, evaluate

ENGINES = ("loop", "batched")


@dataclass
class RunConfig:
    """Everything that defines a training run; saved with its results so it can be repeated."""

    dataset: str = "mnist"
    data_dir: str | None = None
    download: bool = False
    model: str = "lenet5"
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    val_size: int = 10_000
    train_subset: int | None = None
    test_subset: int | None = None
    device: str = "auto"
    out_dir: str = "runs/train"
    progress: bool = True
    resume: bool = True
    train: TrainConfig = field(default_factory=TrainConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    grid_lr: list[float] = field(default_factory=list)
    grid_a: list[float] = field(default_factory=list)
    engine: Literal["loop", "batched"] = "loop"

    def validate(self) -> None:
        """Refuse what :func:`run` cannot run, before anything is read or written."""
        if isinstance(self.val_size, bool) or not isinstance(self.val_size, int) or self.val_size < 0:
            raise InputError(f"val_size must be an integer >= 0, got {self.val_size!r}")
        for name in ("train_subset", "test_subset"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise InputError(f"{name} must be an integer >= 1 (or None: all), got {value!r}")
        hidden = self.model_kwargs.get("hidden")
        if hidden is not None and (
            not isinstance(hidden, list)
            or not hidden
            or any(isinstance(w, bool) or not isinstance(w, int) or w < 1 for w in hidden)
        ):
            raise InputError(f"hidden widths must be integers >= 1, such as [500, 300]; got {hidden!r}")
        if any(not (math.isfinite(lr) and lr > 0) for lr in self.grid_lr):
            raise InputError(f"grid_lr must hold finite numbers > 0, got {self.grid_lr}")
        if any(not (math.isfinite(a) and a >= 0) for a in self.grid_a):
            raise InputError(f"grid_a must hold finite numbers >= 0, got {self.grid_a}")
        self.train.validate()
        self.schedule.validate()
        if self.engine == "batched":
            option = unsupported_option(self.train, self.schedule)
            if option is not None:
                raise InputError(f"--engine batched cannot train {option}; use --engine loop")


# Options a resumed run may change: where and how it runs, and how long (more epochs continue it).
RESUMABLE = (
    "progress",
    "resume",
    "out_dir",
    "device",
    "download",
    "data_dir",
    "grid_lr",
    "grid_a",
    "engine",
    "train.epochs",
    "train.compile",
)


def check_resume(cfg: RunConfig, out_dir: Path) -> None:
    """Refuse to resume the training in ``out_dir`` (its ``last.pt``) with other options than it
    was started with: the run would go on with the old ones while its files recorded the new."""
    last = out_dir / "last.pt"
    if not (cfg.resume and last.is_file()):
        return
    saved = load_checkpoint(last).get("run_config") or {}
    if not isinstance(saved, dict) or not saved:
        return
    if saved.get("model") != cfg.model:
        raise InputError(
            f"{out_dir} holds a {saved.get('model')} run, not {cfg.model}; pass --no-resume to start "
            "it afresh or choose another --out"
        )
    old, new = flatten(saved), flatten(asdict(cfg))
    # keys the saved run lacks are options added since: they cannot differ from what it did
    differing = sorted(k for k in old if k not in RESUMABLE and old[k] != new.get(k))
    if differing:
        key = differing[0]
        raise InputError(
            f"{out_dir} holds a training started with other options ({key}: {old.get(key)!r} there, "
            f"{new.get(key)!r} now); pass --no-resume to start it afresh or choose another --out"
        )


def model_kwargs(cfg: RunConfig, data: DataSplits) -> dict[str, Any]:
    """The keyword arguments of ``build_model(cfg.model, ...)``: the run's, with the data's input
    size and number of classes filled in."""
    kwargs = dict(cfg.model_kwargs)
    if cfg.model == "mlp":
        kwargs.setdefault("in_features", int(torch.tensor(data.input_shape).prod()))
    kwargs.setdefault("num_classes" if cfg.model != "mlp" else "out_features", data.num_classes)
    return kwargs


def train_once(cfg: RunConfig, data: DataSplits, out_dir: Path) -> tuple[Trainer, dict[str, Any]]:
    """Train one configuration; return the trainer (best weights loaded) and its summary."""
    torch.manual_seed(cfg.train.seed)
    kwargs = model_kwargs(cfg, data)
    model = build_model(cfg.model, **kwargs).to(data.train.x.device)
    schedule = LambdaSchedule(replace(cfg.schedule))
    trainer = Trainer(
        model,
        schedule,
        data.train,
        data.val,
        cfg.train,
        out_dir=out_dir,
        arch={"name": cfg.model, "kwargs": kwargs},
        progress=cfg.progress,
        run_config=asdict(cfg),
        input_norm=data.input_norm,
    )
    result = trainer.fit(resume=cfg.resume)
    summary = {
        "best_epoch": result.best_epoch,
        "val": result.best_val,
        "switch_epoch": result.switch_epoch,
        "lr": cfg.train.lr,
        "a": cfg.schedule.a,
        "out_dir": str(out_dir),
    }
    return trainer, summary


def run(cfg: RunConfig) -> dict[str, Any]:
    """Train (or grid-search), test the selected model once, and write ``model.pt`` and ``result.json``."""
    cfg.validate()
    with process_group_from_env(cfg.device) as device:  # joins torchrun's group when WORLD_SIZE > 1
        return _run(cfg, device)


def _run(cfg: RunConfig, device: torch.device) -> dict[str, Any]:
    data = load_dataset(
        cfg.dataset,
        cfg.data_dir,
        val_size=cfg.val_size,
        seed=cfg.train.seed,
        device=device,
        download=cfg.download,
        train_subset=cfg.train_subset,
        test_subset=cfg.test_subset,
    )
    configs = grid_configs(cfg)
    if len(configs) > 1 and data.val is None:
        raise InputError("a grid search needs a validation split (--val-size > 0)")
    out = make_output_folder(cfg.out_dir)
    trial_cfgs = [
        (c, out if len(configs) == 1 else out / "grid" / f"lr={c.train.lr:g}_a={c.schedule.a:g}") for c in configs
    ]
    if cfg.engine == "loop":
        for trial_cfg, trial_dir in trial_cfgs:
            check_resume(trial_cfg, trial_dir)
    else:  # the stack's last.pt records the options of its first configuration
        check_resume(configs[0], out / "batched")
    if env_is_main():  # one run per folder, locked before anything is written; under torchrun rank 0 holds it
        lock_output_folder(out)
        remove_stale_temporaries(out, ("model.pt", "result.json"))
    chosen = (grid_batched if cfg.engine == "batched" else grid_loop)(trial_cfgs, data, out)
    summary = chosen.summary
    result = {
        "selected": summary,
        "test": chosen.test,
        "trials": chosen.trials,
        "history": chosen.history,
        "device": str(device),
        "config": asdict(cfg),
    }
    if chosen.writes_files:  # rank 0 under torch.distributed
        metrics = {"val": summary["val"], "test": chosen.test, "best_epoch": summary["best_epoch"]}
        save_atomic(chosen.checkpoint(metrics), out / "model.pt")
        write_text_atomic(out / "result.json", json.dumps(result, indent=2))
    return result


def grid_configs(cfg: RunConfig) -> list[RunConfig]:
    """The configurations a run trains: one per (lr, a) of ``grid_lr x grid_a`` (lr slowest; an
    empty grid stands for the run's own ``train.lr`` or ``schedule.a``), each ``cfg`` with those
    two values. The batched engine trains them as the members of one stack, in this order."""
    grid = itertools.product(cfg.grid_lr or [cfg.train.lr], cfg.grid_a or [cfg.schedule.a])
    return [replace(cfg, train=replace(cfg.train, lr=lr), schedule=replace(cfg.schedule, a=a)) for lr, a in grid]


@dataclass
class Selection:
    """What a grid search hands back: the selected configuration's summary, every trial, the
    selected model's history and test figures, and its ``model.pt`` content (given its metrics)."""

    summary: dict[str, Any]
    trials: list[dict[str, Any]]
    history: list[dict[str, Any]]
    test: dict[str, float]
    checkpoint: Callable[[dict[str, Any]], dict[str, Any]]
    writes_files: bool = True


def grid_loop(trial_cfgs: list[tuple[RunConfig, Path]], data: DataSplits, out: Path) -> Selection:
    """The loop engine: train the configurations one after another, each in its folder; select
    the best on validation and test it."""
    best: tuple[Trainer, dict[str, Any]] | None = None
    trials = []
    for trial_cfg, trial_dir in trial_cfgs:
        lr, a = trial_cfg.train.lr, trial_cfg.schedule.a
        try:
            trainer, summary = train_once(trial_cfg, data, trial_dir)
        except TrainingDiverged as exc:
            if len(trial_cfgs) == 1:
                raise
            trials.append({"lr": lr, "a": a, "diverged": str(exc), "out_dir": str(trial_dir)})
            continue
        trials.append(summary)
        if best is None or _selection_score(summary) < _selection_score(best[1]):
            best = (trainer, summary)
    if best is None:
        raise TrainingDiverged("every configuration of the grid diverged; lower the learning rates")
    trainer, summary = best
    test = trainer.evaluate(data.test)
    return Selection(summary, trials, trainer.history, test, trainer.model_checkpoint, trainer.writes_files)


def grid_batched(trial_cfgs: list[tuple[RunConfig, Path]], data: DataSplits, out: Path) -> Selection:
    """The batched engine: train every configuration as one member of a :class:`BatchedTrainer`
    stack in ``out/batched``; select the best on validation as :func:`grid_loop` does, test it."""
    if current_world() is not None:
        raise InputError("--engine batched does not run under torch.distributed (WORLD_SIZE > 1); use --engine loop")
    cfg = trial_cfgs[0][0]
    kwargs = model_kwargs(cfg, data)
    stack_dir = make_output_folder(out / "batched")
    remove_stale_temporaries(stack_dir, ("last.pt", "metrics.jsonl"))
    trainer = BatchedTrainer(
        lambda: build_model(cfg.model, **kwargs),
        [Member(c.train, c.schedule) for c, _ in trial_cfgs],
        data.train,
        data.val,
        out_dir=stack_dir,
        arch={"name": cfg.model, "kwargs": kwargs},
        progress=cfg.progress,
        run_config=asdict(cfg),
    )
    result = trainer.fit(resume=cfg.resume)
    trials = [_member_trial(trainer, k, c, stack_dir) for k, (c, _) in enumerate(trial_cfgs)]
    ranked = [(k, t) for k, t in enumerate(trials) if "diverged" not in t]
    if not ranked:
        raise TrainingDiverged(_all_diverged(trials, result.diverged_epoch))
    k, summary = min(ranked, key=lambda kt: _selection_score(kt[1]))  # the first of equals, as grid_loop
    model = trainer.member_model(k).to(data.train.x.device)
    selected_cfg = trial_cfgs[k][0]
    sc = selected_cfg.schedule
    test = evaluate(model, data.test, sc.kind, sc.p, cfg.train.eval_batch_size, sc.r)

    def checkpoint(metrics: dict[str, Any]) -> dict[str, Any]:
        ckpt = trainer.member_checkpoint(k)
        ckpt.update(metrics=metrics, run_config=asdict(selected_cfg))
        if data.input_norm is not None:
            ckpt["input_norm"] = data.input_norm.as_dict()
        return ckpt

    return Selection(summary, trials, _member_history(result.history, k), test, checkpoint)


def _member_trial(trainer: BatchedTrainer, k: int, cfg: RunConfig, stack_dir: Path) -> dict[str, Any]:
    """Member ``k``'s trial record, in the keys of :func:`train_once`'s summary (or diverged)."""
    lr, a = cfg.train.lr, cfg.schedule.a
    if k in trainer.diverged:
        return {"lr": lr, "a": a, "diverged": trainer.diverged[k], "out_dir": str(stack_dir), "member": k}
    return {
        "best_epoch": trainer.best_epoch[k],
        "val": trainer.best_val[k],
        "switch_epoch": trainer.schedules[k].switch_epoch,
        "lr": lr,
        "a": a,
        "out_dir": str(stack_dir),
        "member": k,
    }


def _all_diverged(trials: list[dict[str, Any]], epochs: dict[int, int]) -> str:
    """The message when no member survived; a single configuration's reads as the loop engine's."""
    if len(trials) > 1:
        return "every configuration of the grid diverged; lower the learning rates"
    return (
        f"training diverged in epoch {epochs[0]}: the objective or the weights became non-finite "
        f"(lr={trials[0]['lr']:g}); lower the learning rate"
    )


_MEMBER_KEYS = (
    "criterion",
    "train_objective",
    "train_loss",
    "train_max_loss",
    "lam_trace",
    "lam",
    "switched",
    "switch_epoch",
    "rho",
    "train_ess",
    "train_ess_fraction",
    "lr",
)
_STACK_KEYS = ("train_seconds", "seconds")  # the whole stack's time, not the member's share


def _member_history(history: list[dict[str, Any]], k: int) -> list[dict[str, Any]]:
    """Member ``k``'s epochs of a batched history, one value per key as the loop engine's (keys
    a record of an older checkpoint lacks are left out; the times are the whole stack's)."""
    records = []
    for r in history:
        record = {"epoch": r["epoch"], **{key: r[key][k] for key in _MEMBER_KEYS if key in r}}
        record.update({key: r[key] for key in _STACK_KEYS if key in r})
        vals = r.get("val")
        if vals is not None and vals[k] is not None:
            record.update({f"val_{name}": v for name, v in vals[k].items()})
        records.append(record)
    return records


def _selection_score(summary: dict[str, Any]) -> float:
    val = summary["val"] or {}
    return val.get("error", val.get("loss", float("inf")))


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
    flag(
        g, "--data-dir", key="data_dir", help="folder holding the four IDX files (.gz or not); default: $ANRAT_DATA_DIR"
    )
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
    flag(g, "--seed", key="train.seed", defaults=d, type=int, help="seed of initialisation, split and shuffling")
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
    flag(g, "--device", key="device", defaults=d, help="auto (CUDA when present), cpu, cuda, cuda:N")
    flag(g, "--out", key="out_dir", defaults=d, help="output folder")
    flag(
        g,
        "--no-resume",
        key="resume",
        action="store_const",
        const=False,
        help="start afresh even if OUT/last.pt exists",
    )
    flag(
        g,
        "--no-progress",
        key="progress",
        action="store_const",
        const=False,
        help="no progress lines (one per epoch) or bars",
    )
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
