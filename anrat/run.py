"""A training run as a library call: :func:`run` trains one configuration (or a grid of learning
rates and ``a`` values, one after another or as one batched stack), selects the best epoch and
configuration on validation, tests the selected model once, and writes ``model.pt`` and
``result.json``. :class:`RunConfig` holds every option; ``python -m anrat.train`` is its command
line (:mod:`anrat.train`), and the pruning pipeline and the benchmarks call :func:`run` directly.

Files written to ``cfg.out_dir``:

- ``model.pt``: the selected model, self-describing (architecture, weights, lambda, metrics); the
  pruning stage takes it;
- ``metrics.jsonl``: one line per epoch; ``last.pt`` / ``best.pt``: for resuming and inspection;
- ``result.json``: the selected epoch, validation and test figures, and the resolved options.

Under ``torchrun`` (WORLD_SIZE > 1) the same call trains data-parallel on all the processes
(nccl on cuda:LOCAL_RANK, gloo on the CPU); rank 0 writes the files. See docs/distributed.md.
"""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import torch

from anrat.atomic_files import make_output_folder, remove_stale_temporaries, write_text_atomic
from anrat.batched import BatchedTrainer
from anrat.checkpoint import load_checkpoint, save_atomic
from anrat.config import flatten
from anrat.data import DataSplits, load_dataset
from anrat.distributed import current_world, env_is_main, process_group_from_env
from anrat.errors import InputError
from anrat.members import Member, unsupported_option
from anrat.models import build_model
from anrat.run_lock import lock_output_folder
from anrat.schedules import LambdaSchedule, ScheduleConfig
from anrat.trainer import TrainConfig, Trainer, TrainingDiverged, evaluate

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
