"""Is the scale-free tilt (``anrat.ESSLoss``) a better drop-in than what users already pick? (issue 28)

Criteria, each dropped into the same plain PyTorch loop (no ``Trainer``): cross-entropy (the
baseline, ``ce``); label smoothing 0.1 (``ls``); focal loss with gamma 2 (``focal``, written below);
``ess``, the main job's schedule (``anrat.ESSLoss`` with ``anrat.ESSSchedule``: rho from 0.5 to 1
over the run's epochs); ``ess_ls``, the same with label smoothing 0.1.

Studies (dataset, model, budget): MNIST and Fashion-MNIST with lenet5 at the main job's budget (10
epochs) and Fashion-MNIST at three times it (30 epochs); MNIST-1D (generated locally by the
``mnist1d`` package's ``make_dataset``, its default arguments: 4,000 training and 1,000 test
sequences of 40 values) with an MLP (40-100-100-10) and a small 1-D CNN, at 10 epochs. The loop is
the main job's: plain SGD (momentum 0), batch 64, the learning rate annealed to 0 by a cosine over
the epochs, the last epoch kept; lenet5 with the main job's L2 of 0.05 on its last layer.

Protocol, declared in docs/results/criteria.md before any run:
1. Each criterion's learning rate is chosen from {0.03, 0.1, 0.3, 1} on validation error (10,000
   held-out training images; 500 for MNIST-1D), the median over selection seeds 100 and 101,
   disjoint from the reported seeds. The 30-epoch Fashion-MNIST study reuses the 10-epoch study's
   selection (amended before any of its runs: its own would cost 40 trainings of 30 epochs).
2. Seeds 0-4 are trained at the chosen rate and scored once on the test set.
3. Per study: median [min, max] test error per criterion; paired over seeds, ess and ess_ls against
   cross-entropy and against label smoothing: the median difference, how many seeds are lower, and
   the paired t-test and Wilcoxon signed-rank p-values (scipy.stats).

The plain loop, not the batched engine: the engine's members are ``ScheduleConfig`` criteria, which
cannot express label smoothing or focal loss, and one loop for every criterion keeps the comparison
fair. lenet5 trains in the channels-last memory layout (the same maths, faster on the CPU;
each record names its layout). A run whose loss becomes non-finite stops and scores 100% error.
Each run's record goes to ``OUT/<study>/<criterion>/lr<lr>_seed<s>.json`` as it finishes, so an
interrupted study resumes where it stopped; each study's summary to ``OUT/<study>/summary.json``.

    python benchmarks/criteria.py --data-dir ../shared/data/mnist \\
        --fashion-dir ../shared/data/fashion-mnist [--studies mnist1d_mlp,mnist1d_cnn]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from scipy import stats
from torch import nn

import anrat
from anrat.atomic_files import write_text_atomic
from anrat.cli import OneLineErrorParser, run_command
from anrat.data import Split, load_dataset
from anrat.errors import InputError
from anrat.machine import machine_line
from anrat.models import build_model, mlp

CRITERIA = ("ce", "ls", "focal", "ess", "ess_ls")
LRS = (0.03, 0.1, 0.3, 1.0)
SELECTION_SEEDS = (100, 101)
REPORTED_SEEDS = (0, 1, 2, 3, 4)
BATCH = 64


@dataclass(frozen=True)
class Study:
    dataset: str  # "mnist", "fashion_mnist" or "mnist1d"
    model: str  # "lenet5", "mlp" or "cnn1d"
    epochs: int
    # The study whose learning-rate selection this one reuses (same data and model), or None to select
    # its own. The 30-epoch study reuses the 10-epoch one's: its own would cost 40 runs of 30 epochs.
    select_from: str | None = None


STUDIES = {
    "mnist_lenet5": Study("mnist", "lenet5", 10),
    "fashion_lenet5": Study("fashion_mnist", "lenet5", 10),
    "fashion_lenet5_30": Study("fashion_mnist", "lenet5", 30, select_from="fashion_lenet5"),
    "mnist1d_mlp": Study("mnist1d", "mlp", 10),
    "mnist1d_cnn": Study("mnist1d", "cnn1d", 10),
}


def focal_loss(logits: torch.Tensor, target: torch.Tensor, gamma: float = 2.0) -> torch.Tensor:
    """Lin et al.'s focal loss, mean over the batch: ``-(1 - p_y) ** gamma * log p_y``."""
    log_p = F.log_softmax(logits.float(), dim=1).gather(1, target[:, None]).squeeze(1)
    return (-((1 - log_p.exp()) ** gamma) * log_p).mean()


def criterion(name: str, epochs: int, rho0: float, rho_final: float, label_smoothing: float):
    """``(loss function, per-epoch schedule or None)`` of one criterion."""
    if name == "ce":
        return nn.CrossEntropyLoss(), None
    if name == "ls":
        return nn.CrossEntropyLoss(label_smoothing=label_smoothing), None
    if name == "focal":
        return focal_loss, None
    loss = anrat.ESSLoss(rho=rho0, label_smoothing=label_smoothing if name == "ess_ls" else 0.0)
    return loss, anrat.ESSSchedule(rho0, rho_final, epochs, loss=loss)


def cnn1d() -> nn.Module:
    """A small 1-D CNN for MNIST-1D's 40-value sequences: three strided convolutions of 25 channels."""
    return nn.Sequential(
        nn.Unflatten(1, (1, 40)),
        nn.Conv1d(1, 25, 5, stride=2, padding=1),
        nn.ReLU(),
        nn.Conv1d(25, 25, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Conv1d(25, 25, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(25 * 5, 10),
    )


def load(study: Study, args: argparse.Namespace) -> tuple[Split, Split, Split]:
    """Training, validation and test splits (the same split for every run of a study)."""
    if study.dataset == "mnist1d":
        from mnist1d.data import get_dataset_args, make_dataset  # generated locally, no download

        d = make_dataset(get_dataset_args())
        x, y = torch.tensor(d["x"], dtype=torch.float32), torch.tensor(d["y"], dtype=torch.int64)
        test = Split(torch.tensor(d["x_test"], dtype=torch.float32), torch.tensor(d["y_test"], dtype=torch.int64))
        return Split(x[:3500], y[:3500]), Split(x[3500:], y[3500:]), test
    folder = args.data_dir if study.dataset == "mnist" else args.fashion_dir
    data = load_dataset(study.dataset, folder, val_size=10_000, seed=0)
    return data.train, data.val, data.test


def build(study: Study) -> nn.Module:
    if study.model == "lenet5":
        return build_model("lenet5", num_classes=10)
    return mlp(40, (100, 100), 10) if study.model == "mlp" else cnn1d()


def error(model: nn.Module, split: Split) -> float:
    model.eval()
    with torch.no_grad():
        wrong = sum(int((model(x).argmax(1) != y).sum()) for x, y in split.batches(1000))
    return wrong / len(split)


def train_one(study: Study, splits, name: str, lr: float, seed: int, args: argparse.Namespace) -> dict[str, Any]:
    train, val, test = splits
    torch.manual_seed(seed)
    model = build(study)
    if study.model == "lenet5":
        # The same maths in another memory layout: oneDNN's channels-last convolutions make a lenet5
        # step faster on one CPU thread (see docs/results/criteria.md). A 1-channel image batch
        # is already channels-last, so only the weights move.
        model = model.to(memory_format=torch.channels_last)
    layout = "channels_last" if study.model == "lenet5" else "contiguous"
    loss_fn, schedule = criterion(name, study.epochs, args.rho0, args.rho_final, args.label_smoothing)
    groups = [{"params": [p for n, p in model.named_parameters() if n != "fc2.weight"]}]
    if study.model == "lenet5":  # the main job's L2 prior on the softmax layer
        groups.append({"params": [model.fc2.weight], "weight_decay": 0.05})
    optimizer = torch.optim.SGD(groups if study.model == "lenet5" else model.parameters(), lr=lr)
    decay = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=study.epochs)
    order = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    for _ in range(study.epochs):
        model.train()
        for x, y in train.batches(BATCH, shuffle=True, generator=order):
            optimizer.zero_grad()
            loss = loss_fn(model(x), y)
            if not torch.isfinite(loss):
                return {"diverged": True, "val_error": 1.0, "test_error": None, "layout": layout}
            loss.backward()
            optimizer.step()
        decay.step()
        if schedule is not None:
            schedule.step()
    return {
        "val_error": error(model, val),
        "test_error": error(model, test),
        "seconds": time.perf_counter() - start,
        "layout": layout,
    }


def record(out: Path, study_name: str, study: Study, splits, name: str, lr: float, seed: int, args) -> dict[str, Any]:
    """The run's record, read back if an earlier invocation wrote it, else trained and written."""
    path = out / study_name / name / f"lr{lr:g}_seed{seed}.json"
    if path.exists():
        return json.loads(path.read_text())
    result = {"criterion": name, "lr": lr, "seed": seed, **train_one(study, splits, name, lr, seed, args)}
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, json.dumps(result))  # a killed run leaves no half record for the resume to read
    return result


def paired(a: list[float], b: list[float]) -> str:
    d = [x - y for x, y in zip(a, b)]
    lower = sum(v < 0 for v in d)
    t_p = stats.ttest_rel(a, b).pvalue if any(d) else 1.0
    w_p = stats.wilcoxon(a, b).pvalue if any(d) else 1.0
    return (
        f"{100 * statistics.median(d):+.2f} points, lower on {lower} of {len(d)}, t-test p = {t_p:.3g}, "
        f"Wilcoxon p = {w_p:.3g}"
    )


def run_study(
    study_name: str, args: argparse.Namespace, out: Path, criteria: tuple[str, ...] = CRITERIA
) -> dict[str, Any]:
    study = STUDIES[study_name]
    splits = load(study, args)
    selecting = study.select_from or study_name
    chosen, tests, diverged, records = {}, {}, {}, []
    for name in criteria:
        scores = {}
        for lr in LRS:
            runs = [record(out, selecting, STUDIES[selecting], splits, name, lr, s, args) for s in SELECTION_SEEDS]
            scores[lr] = statistics.median(r["val_error"] for r in runs)
            records += [{"study": selecting, **r} for r in runs]
        chosen[name] = min(LRS, key=lambda lr: (scores[lr], lr))  # ties: the smaller rate
        runs = [record(out, study_name, study, splits, name, chosen[name], s, args) for s in REPORTED_SEEDS]
        tests[name] = [1.0 if r.get("diverged") else r["test_error"] for r in runs]
        diverged[name] = sum(bool(r.get("diverged")) for r in runs)
        records += [{"study": study_name, **r} for r in runs]
        print(f"{study_name} {name}: lr {chosen[name]:g} (validation {scores}); test errors {tests[name]}", flush=True)
    lines = [f"\n{study_name} ({study.dataset}, {study.model}, {study.epochs} epochs), seeds {list(REPORTED_SEEDS)}:"]
    for name in criteria:
        t = tests[name]
        lines.append(f"  {name:<7} lr {chosen[name]:<5g} test error {100 * statistics.median(t):.2f}% "
                     f"[{100 * min(t):.2f}, {100 * max(t):.2f}]"
                     + (f", {diverged[name]} diverged (scored 100%)" if diverged[name] else ""))  # fmt: skip
    for ours, base in [(o, b) for o in ("ess", "ess_ls") for b in ("ce", "ls") if o in tests and b in tests]:
        lines.append(f"  {ours} - {base}: {paired(tests[ours], tests[base])}")
    print("\n".join(lines), flush=True)
    return {"study": study.__dict__, "chosen_lr": chosen, "test_errors": tests, "diverged": diverged, "runs": records}


def main(argv: list[str] | None = None) -> int:
    ap = OneLineErrorParser(prog="benchmarks/criteria.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("--data-dir", default=None, help="MNIST IDX folder")
    ap.add_argument("--fashion-dir", default=None, help="Fashion-MNIST IDX folder")
    ap.add_argument("--studies", default=",".join(STUDIES), help=f"comma-separated, from {', '.join(STUDIES)}")
    ap.add_argument(
        "--criteria",
        default=",".join(CRITERIA),
        help="comma-separated, from " + ", ".join(CRITERIA) + " (a subset: two invocations can share a study; "
        "the study's summary is written only for all of them)",
    )
    ap.add_argument("--rho0", type=float, default=0.5, help="ess: rho in the first epoch, in (0, 1]")
    ap.add_argument("--rho-final", type=float, default=1.0, help="ess: rho reached at the last epoch, >= rho0")
    ap.add_argument("--epochs", type=int, default=None, help="every study's epochs instead of its own (>= 1)")
    ap.add_argument("--label-smoothing", type=float, default=0.1, help="for ls and ess_ls, in [0, 1)")
    ap.add_argument("--out", default="runs/bench_criteria", help="output folder")

    def body(args: argparse.Namespace) -> int:
        names = [n.strip() for n in args.studies.split(",") if n.strip()]
        unknown = [n for n in names if n not in STUDIES]
        if unknown or not names:
            raise InputError(f"unknown studies {unknown}; expected some of {', '.join(STUDIES)}")
        criteria = tuple(n.strip() for n in args.criteria.split(",") if n.strip())
        if not criteria or set(criteria) - set(CRITERIA):
            raise InputError(
                f"unknown criteria {sorted(set(criteria) - set(CRITERIA))}; expected some of {', '.join(CRITERIA)}"
            )
        if args.epochs is not None:  # refused here, before anything is written, like the next two
            anrat.ESSSchedule(args.rho0, args.rho_final, args.epochs)
            for name in names:
                STUDIES[name] = Study(STUDIES[name].dataset, STUDIES[name].model, args.epochs)  # selects its own
        anrat.ESSSchedule(args.rho0, args.rho_final, 1)
        anrat.ESSLoss(label_smoothing=args.label_smoothing)  # and a bad label smoothing
        folders = {"mnist": ("--data-dir", args.data_dir), "fashion_mnist": ("--fashion-dir", args.fashion_dir)}
        for name in names:  # and what a study needs that is missing
            dataset = STUDIES[name].dataset
            if dataset in folders and folders[dataset][1] is None:
                raise InputError(f"study {name} needs {folders[dataset][0]}, the folder of its IDX files")
            if dataset == "mnist1d" and importlib.util.find_spec("mnist1d") is None:
                raise InputError(f"study {name} needs the mnist1d package: pip install -e '.[bench]'")
        out = Path(args.out)
        print(machine_line(), flush=True)
        for name in names:  # one summary per study: two invocations may run different studies at once
            summary = run_study(name, args, out, criteria)
            if set(criteria) == set(CRITERIA):
                write_text_atomic(out / name / "summary.json", json.dumps(summary, indent=1))
        return 0

    return run_command(ap, body, argv)


if __name__ == "__main__":
    sys.exit(main())
