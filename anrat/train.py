"""Train a network with NRAE/ANRAT from the command line: ``python -m anrat.train`` (``anrat-train``).

A run loads the data (held-out validation split chosen by seed), builds the model by name, trains
with a lambda schedule, selects the best epoch on validation, evaluates the test set once on the
selected model, and writes to ``--out``:

- ``model.pt``: the selected model, self-describing (architecture, weights, lambda, metrics); the
  pruning stage takes it;
- ``metrics.jsonl``: one line per epoch; ``last.pt`` / ``best.pt``: for resuming and inspection;
- ``result.json``: the selected epoch, validation and test figures, and the resolved options.

With ``--grid-lr`` / ``--grid-a`` every combination is trained in ``OUT/grid/...`` and the one
with the best validation error is selected; only that one sees the test set.

Under ``torchrun`` (WORLD_SIZE > 1) the same command trains data-parallel on all the processes
(nccl on cuda:LOCAL_RANK, gloo on the CPU); rank 0 writes the files. See docs/distributed.md.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Sequence

import torch

from anrat.atomic_files import write_text_atomic
from anrat.checkpoint import save_atomic
from anrat.data import DATASETS, DataSplits, load_dataset
from anrat.distributed import env_is_main, process_group_from_env
from anrat.errors import InputError
from anrat.models import MODELS, build_model
from anrat.schedules import SCHEDULES, LambdaSchedule, ScheduleConfig
from anrat.trainer import COMPILE_MODES, TrainConfig, Trainer, TrainingDiverged


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


def train_once(cfg: RunConfig, data: DataSplits, out_dir: Path) -> tuple[Trainer, dict[str, Any]]:
    """Train one configuration; return the trainer (best weights loaded) and its summary."""
    torch.manual_seed(cfg.train.seed)
    kwargs = dict(cfg.model_kwargs)
    if cfg.model == "mlp":
        kwargs.setdefault("in_features", int(torch.tensor(data.input_shape).prod()))
    kwargs.setdefault("num_classes" if cfg.model != "mlp" else "out_features", data.num_classes)
    model = build_model(cfg.model, **kwargs).to(data.train.x.device)
    schedule = LambdaSchedule(replace(cfg.schedule))
    trainer = Trainer(model, schedule, data.train, data.val, cfg.train, out_dir=out_dir,
                      arch={"name": cfg.model, "kwargs": kwargs}, progress=cfg.progress,
                      run_config=asdict(cfg), input_norm=data.input_norm)
    result = trainer.fit(resume=cfg.resume)
    summary = {"best_epoch": result.best_epoch, "val": result.best_val, "switch_epoch": result.switch_epoch,
               "lr": cfg.train.lr, "a": cfg.schedule.a, "out_dir": str(out_dir)}
    return trainer, summary


def run(cfg: RunConfig) -> dict[str, Any]:
    """Train (or grid-search), test the selected model once, and write ``model.pt`` and ``result.json``."""
    cfg.train.validate()
    cfg.schedule.validate()
    with process_group_from_env(cfg.device) as device:  # joins torchrun's group when WORLD_SIZE > 1
        return _run(cfg, device)


def _run(cfg: RunConfig, device: torch.device) -> dict[str, Any]:
    data = load_dataset(cfg.dataset, cfg.data_dir, val_size=cfg.val_size, seed=cfg.train.seed, device=device,
                        download=cfg.download, train_subset=cfg.train_subset, test_subset=cfg.test_subset)
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    grid = list(itertools.product(cfg.grid_lr or [cfg.train.lr], cfg.grid_a or [cfg.schedule.a]))
    if len(grid) > 1 and data.val is None:
        raise InputError("a grid search needs a validation split (--val-size > 0)")
    best: tuple[Trainer, dict[str, Any]] | None = None
    trials = []
    for lr, a in grid:
        trial_cfg = replace(cfg, train=replace(cfg.train, lr=lr), schedule=replace(cfg.schedule, a=a))
        trial_dir = out if len(grid) == 1 else out / "grid" / f"lr={lr:g}_a={a:g}"
        try:
            trainer, summary = train_once(trial_cfg, data, trial_dir)
        except TrainingDiverged as exc:
            if len(grid) == 1:
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
    result = {"selected": summary, "test": test, "trials": trials, "history": trainer.history,
              "device": str(device), "config": asdict(cfg)}
    if trainer.writes_files:  # rank 0 under torch.distributed
        save_atomic(trainer.model_checkpoint(metrics={"val": summary["val"], "test": test,
                                                       "best_epoch": summary["best_epoch"]}), out / "model.pt")
        write_text_atomic(out / "result.json", json.dumps(result, indent=2))
    return result


def _selection_score(summary: dict[str, Any]) -> float:
    val = summary["val"] or {}
    return val.get("error", val.get("loss", float("inf")))


# --- command line ----------------------------------------------------------------------------
def _floats(text: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def _l2(text: str) -> tuple[str, float]:
    layer, sep, value = text.partition("=")
    try:
        if not sep:
            raise ValueError
        return layer, float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected LAYER=COEFF such as fc2=0.05, got {text!r}") from None


class OneLineErrorParser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors are one line on stderr and exit status 2; command lines
    report their own refusals the same way with :meth:`report`."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message}\n")

    def report(self, exc: InputError | TrainingDiverged, prog: str | None = None) -> int:
        """One line on stderr for a refused input (exit status 2) or a diverged run (1)."""
        if isinstance(exc, TrainingDiverged):
            print(f"{prog or self.prog}: {exc}", file=sys.stderr)
            return 1
        print(f"{prog or self.prog}: error: {exc}", file=sys.stderr)
        return 2


def build_parser(prog: str = "anrat-train") -> argparse.ArgumentParser:
    d, t, s = RunConfig(), TrainConfig(), ScheduleConfig()
    ap = OneLineErrorParser(prog=prog, description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = ap.add_argument_group("data")
    g.add_argument("--dataset", choices=DATASETS, default=d.dataset, help="dataset to train on")
    g.add_argument("--data-dir", default=None,
                   help="folder holding the four IDX files (.gz or not); default: $ANRAT_DATA_DIR")
    g.add_argument("--download", action="store_true", help="download the dataset through torchvision if missing")
    g.add_argument("--val-size", type=int, default=d.val_size, help="training images held out for validation (chosen by --seed)")
    g.add_argument("--train-subset", type=int, default=None, help="train on the first N remaining training images only")
    g.add_argument("--test-subset", type=int, default=None, help="evaluate on the first N test images only")
    g = ap.add_argument_group("model")
    g.add_argument("--model", choices=sorted(MODELS), default=d.model, help="architecture")
    g.add_argument("--hidden", type=lambda v: [int(x) for x in v.split(",")], default=None,
                   help="hidden widths for --model mlp, e.g. 500,300")
    g = ap.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int, default=t.epochs, help="training epochs")
    g.add_argument("--batch-size", type=int, default=t.batch_size, help="minibatch size")
    g.add_argument("--lr", type=float, default=t.lr, help="learning rate of the weights")
    g.add_argument("--lambda-lr", type=float, default=None,
                   help="learning rate of lambda's parameter (ANRAT); default: lr * 0.1")
    g.add_argument("--optimizer", default=t.optimizer, help="torch.optim class name (sgd, adam, adamw, ...)")
    g.add_argument("--momentum", type=float, default=t.momentum, help="SGD momentum (the paper: 0)")
    g.add_argument("--l2", type=_l2, action="append", default=[], metavar="LAYER=COEFF",
                   help="weight decay on one layer's weight, repeatable (the paper: fc2=0.05)")
    g.add_argument("--amp", action="store_true", help="bfloat16 autocast for the forward pass (losses stay float32)")
    g.add_argument("--compile", nargs="?", const="default", choices=COMPILE_MODES, default=None, metavar="MODE",
                   help="torch.compile the forward pass and the loss; MODE is torch.compile's mode, one of "
                        f"{', '.join(COMPILE_MODES)} (without MODE: default; reduce-overhead adds CUDA "
                        "graphs). Slow first steps, fewer and fused kernels after")
    g.add_argument("--seed", type=int, default=t.seed, help="seed of initialisation, split and shuffling")
    g.add_argument("--grid-lr", type=_floats, default=[], help="comma-separated learning rates to grid-search")
    g.add_argument("--grid-a", type=_floats, default=[], help="comma-separated penalty weights a to grid-search")
    g = ap.add_argument_group("lambda schedule")
    g.add_argument("--schedule", choices=SCHEDULES, default=s.name,
                   help="fixed: constant lambda; adaptive: ANRAT; anneal: lam0*gamma^epoch; "
                        "excursions: fixed lambda with periodic plain-loss phases; plain: cross-entropy only")
    g.add_argument("--lambda0", type=float, default=s.lam0, help="initial (or fixed) lambda, > 0")
    g.add_argument("--p", type=float, default=s.p, help="t = lambda^p (and the Lp norm exponent for --loss lp)")
    g.add_argument("--loss", choices=("ce", "lp"), default=s.kind, help="per-sample loss")
    g.add_argument("--a", type=float, default=s.a, help="ANRAT penalty weight a in a*lambda^(-q), >= 0")
    g.add_argument("--q", type=float, default=s.q, help="ANRAT penalty exponent q, > 0")
    g.add_argument("--lambda-param", choices=("log", "softplus"), default=s.parameterization,
                   help="ANRAT parameterisation of lambda (both keep it > 0)")
    g.add_argument("--gamma", type=float, default=s.gamma, help="anneal: lambda factor per epoch")
    g.add_argument("--lambda-min", type=float, default=s.lam_min, help="anneal: lower bound of lambda")
    g.add_argument("--period", type=int, default=s.period, help="excursions: steps per cycle")
    g.add_argument("--plain-steps", type=int, default=s.plain_steps, help="excursions: plain-loss steps per cycle")
    g.add_argument("--normalizer", choices=("batch", "running"), default=s.normalizer,
                   help="NRAE normaliser: per batch (paper) or running estimate across batches")
    g.add_argument("--switch-below", type=float, default=s.switch_below,
                   help="deconvexify (switch to the plain loss) once lambda falls below this")
    g.add_argument("--switch-when-feasible", action="store_true",
                   help="deconvexify once RAE at the current lambda is representable in float32")
    g = ap.add_argument_group("run")
    g.add_argument("--device", default=d.device, help="auto (CUDA when present), cpu, cuda, cuda:N")
    g.add_argument("--out", default=d.out_dir, help="output folder")
    g.add_argument("--no-resume", action="store_true", help="start afresh even if OUT/last.pt exists")
    g.add_argument("--no-progress", action="store_true", help="no progress lines (one per epoch) or bars")
    return ap


def config_from_args(args: argparse.Namespace) -> RunConfig:
    model_kwargs: dict[str, Any] = {}
    if args.hidden is not None:
        if args.model != "mlp":
            raise InputError("--hidden applies to --model mlp only")
        model_kwargs["hidden"] = args.hidden
    train = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, lambda_lr=args.lambda_lr,
                        optimizer=args.optimizer, momentum=args.momentum, l2=dict(args.l2), seed=args.seed,
                        amp=args.amp, compile=args.compile)
    schedule = ScheduleConfig(name=args.schedule, lam0=args.lambda0, p=args.p, kind=args.loss, a=args.a, q=args.q,
                              parameterization=args.lambda_param, gamma=args.gamma, lam_min=args.lambda_min,
                              period=args.period, plain_steps=args.plain_steps, normalizer=args.normalizer,
                              switch_below=args.switch_below, switch_when_feasible=args.switch_when_feasible)
    return RunConfig(dataset=args.dataset, data_dir=args.data_dir, download=args.download, model=args.model,
                     model_kwargs=model_kwargs, val_size=args.val_size, train_subset=args.train_subset,
                     test_subset=args.test_subset, device=args.device, out_dir=args.out,
                     progress=not args.no_progress, resume=not args.no_resume, train=train, schedule=schedule,
                     grid_lr=args.grid_lr, grid_a=args.grid_a)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        cfg = config_from_args(args)
        cfg.train.validate()
        cfg.schedule.validate()
        result = run(cfg)
    except (InputError, TrainingDiverged) as exc:
        return parser.report(exc)
    if not env_is_main():  # under torchrun, rank 0 reports
        return 0
    sel = result["selected"]
    err = result["test"].get("error")
    print(f"selected epoch {sel['best_epoch']} (lr={sel['lr']:g}, a={sel['a']:g}); "
          f"validation {sel['val']}; test error {err:.4%}" if err is not None else f"test {result['test']}")
    print(f"wrote {Path(cfg.out_dir) / 'model.pt'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
