"""Does ANRAT beat cross-entropy on MNIST under the same budget, and does pruning improve test error?

Baseline: the same ConvNet trained with the cross-entropy (schedule ``plain``). For each model
(``lenet5``, the paper's ConvNet, and ``convnet_dropout``) and each seed, the methods
(:data:`METHODS`, ``--methods``) are trained side by side in one run with the same budget: ANRAT
as the paper states it (schedule ``adaptive`` from lambda = 10), the project's scale-free tilt
(``ess``, ESS / m from 0.5 to 1 over the run) and cross-entropy; the same initial weights,
validation split and minibatch order (all from the seed), the same epochs, the same
learning-rate grid (ANRAT's crossed with its penalty weights ``--grid-a``), the best epoch and
configuration selected on the same 10,000 validation images, the test set evaluated once on the
selected model. Plain SGD, no momentum, L2 0.05 on the softmax layer fc2, as in the paper.

Reported per model: test error mean and standard deviation over seeds for each method, and the
paired difference of each method against cross-entropy (percentage points) with
``scipy.stats.ttest_rel`` and ``scipy.stats.wilcoxon`` (two-sided; with 5 seeds the smallest exact
Wilcoxon p-value is 0.0625). Then every selected model goes through
``python -m anrat.recipes.mnist_prune``'s pipeline (:func:`pruning_config`: Wald tests and
fine-tuning by the criterion the model was trained with, the sandwich covariance for ANRAT), and
its test error before and after pruning is compared the same way. ``--fine-tune-control``
afterwards fine-tunes each unpruned model exactly as its pruned model was (:func:`add_control`),
so that pruning is told apart from the extra epochs of training that came with it.

Default (38 minutes on 2 idle CPU cores for two methods, about an hour for three: ~11 s per
20,000-image lenet5 epoch with validation): 5 seeds, the first 20,000 training images after the 10,000-image
validation split, 5 epochs, the learning-rate grid {0.1, 0.03} (ANRAT's a = 0.01), pruning at most
2 rounds with a Fisher on 1,000 images and 1 fine-tuning epoch. The grid has two points because
one is not enough for a fair comparison: on an H100 with 20 epochs of 50,000 images, lr 0.1 suits
cross-entropy but made ANRAT diverge in 4 of 10 runs, and lr 0.03 the other way round
(docs/results/mnist-anrat-vs-ce.md). ``--full``: the paper's protocol, for a GPU: 10 seeds, all 50,000 training
images, 100 epochs, the paper's grid {1, 0.5, 0.1} x a {1, 0.1, 0.001} with lr 0.03 added for
the same reason, pruning as in the recipe's ``paper`` preset; with ``--jobs 10`` on one GPU
(docs/usage.md has the command).

    python benchmarks/mnist_anrat_vs_ce.py --data-dir /work/shared/data/mnist [--full] [--out runs/bench_mnist]

Each (model, method, seed) trains its learning-rate grid as one batched stack
(``--engine batched``, the default: the grid's configurations are the members of one
:class:`anrat.batched.BatchedTrainer`, in ``.../train/batched``) or one configuration after
another (``--engine loop``, in ``.../train/grid``); both select the same learning rate and epoch
by the same rule and write the same figures. The seeds are not
stacked: a seed also draws the validation split, and the members of one stack share their data.

Runs go to ``OUT/<model>/<method>/seed<k>`` and each finished unit's figures to
``OUT/units/<model>_<method>_seed<k>.json`` (a rerun skips finished units); the table is printed and
written with every per-seed figure to ``OUT/results.json`` and ``OUT/results.md``. ``--jobs N``
runs N units at once in separate processes (worth it on a GPU, which one small ConvNet leaves
mostly idle); ``--collect`` trains nothing and tabulates the units finished so far; ``--select-from`` tabulates,
from several such runs that differ only in ``--grid-lr``, the unit each grid search would select
on validation.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import math
import multiprocessing
import os
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from scipy import stats

from anrat.atomic_files import write_text_atomic
from anrat.checkpoint import load_checkpoint, model_from_checkpoint
from anrat.cli import OneLineErrorParser
from anrat.data import load_dataset
from anrat.devices import resolve_device
from anrat.errors import InputError
from anrat.machine import describe_machine
from anrat.run import ENGINES, RunConfig
from anrat.run import run as train_run
from anrat.schedules import ScheduleConfig
from anrat.trainer import TrainConfig, TrainingDiverged, evaluate
from pruning.pipeline import PipelineConfig, ReportOptions, train_prune_export
from pruning.prune import FineTune, PruneConfig, fine_tune

MODELS = ("lenet5", "convnet_dropout")
# The criteria compared, cross-entropy first (the baseline every other is paired against):
# ANRAT as the paper states it (adaptive lambda from 10), and the project's scale-free tilt with
# ESS / m rising from 0.5 to 1 (the plain loss) over the run, the main job's default criterion.
METHODS = ("ce", "anrat", "ess")
DEFAULT = {
    "seeds": 5,
    "train_subset": 20_000,
    "epochs": 5,
    "grid_lr": [0.1, 0.03],
    "grid_a": [0.01],
    "prune": {"max_rounds": 2, "max_samples": 1000, "tolerance": 0.002},
    "fine_tune_epochs": 1,
}
FULL = {
    "seeds": 10,
    "train_subset": None,
    "epochs": 100,
    "grid_lr": [1.0, 0.5, 0.1, 0.03],
    "grid_a": [1.0, 0.1, 0.001],
    "prune": {"max_rounds": 10, "max_samples": 10_000, "tolerance": 0.001},
    "fine_tune_epochs": 2,
}


def schedule(method: str, budget: dict[str, Any]) -> ScheduleConfig:
    """The training criterion of ``method`` (ANRAT's penalty weight a: the first of ``grid_a``)."""
    if method == "ce":
        return ScheduleConfig(name="plain")
    if method == "anrat":
        return ScheduleConfig(name="adaptive", lam0=10.0, a=budget["grid_a"][0])
    return ScheduleConfig(name="ess", rho0=0.5, rho_final=1.0, rho_epochs=budget["epochs"])


def run_config(
    model: str, method: str, seed: int, budget: dict[str, Any], args: argparse.Namespace, out: Path
) -> RunConfig:
    """The training of one (model, method, seed); everything but the criterion is shared by the methods.

    Each method's grid is the learning rates ``grid_lr``; ANRAT's is ``grid_lr x grid_a``.
    """
    return RunConfig(
        dataset="mnist",
        data_dir=args.data_dir,
        model=model,
        val_size=10_000,
        train_subset=budget["train_subset"],
        device=args.device,
        out_dir=str(out),
        progress=not args.no_progress,
        train=TrainConfig(
            epochs=budget["epochs"], lr=budget["grid_lr"][0], optimizer="sgd", momentum=0.0, l2={"fc2": 0.05}, seed=seed
        ),
        schedule=schedule(method, budget),
        grid_lr=list(budget["grid_lr"]) if len(budget["grid_lr"]) > 1 else [],
        grid_a=list(budget["grid_a"]) if method == "anrat" and len(budget["grid_a"]) > 1 else [],
        engine=args.engine,
    )


def pruning_config(method: str, budget: dict[str, Any], seed: int) -> PruneConfig:
    """How a trained model of ``method`` is pruned (issue 15, claim 4). The pipeline then sets the
    criterion (``prune_by_training_criterion``): fine-tuning by what the model minimised at its
    selected epoch, and for ANRAT (NRAE at one t, not a likelihood) the sandwich covariance at that
    t, which needs ``estimator="diagonal"`` here (it has no KFAC form); cross-entropy and ess
    (whose t moves every batch) keep the Fisher, by KFAC. Every fine-tuning is plain SGD at 0.05
    for ``fine_tune_epochs``, the same for all methods.
    """
    fine_tune = FineTune.constant_rate(epochs=budget["fine_tune_epochs"], seed=seed, optimizer="sgd", lr=0.05)
    estimator = "diagonal" if method == "anrat" else "kfac"
    return PruneConfig(**budget["prune"], estimator=estimator, fine_tune=fine_tune)


def paired(a: Sequence[float], b: Sequence[float]) -> dict[str, Any]:
    """Paired comparison of a - b: mean, sample sd, ttest_rel and wilcoxon p-values (None where undefined)."""
    diffs = [x - y for x, y in zip(a, b)]
    result: dict[str, Any] = {
        "n": len(diffs),
        "mean_diff": statistics.fmean(diffs) if diffs else None,
        "sd_diff": statistics.stdev(diffs) if len(diffs) > 1 else None,
        "better": sum(d < 0 for d in diffs),
        "worse": sum(d > 0 for d in diffs),
        "tied": sum(d == 0 for d in diffs),
        "ttest_p": None,
        "wilcoxon_p": None,
    }
    if len(diffs) > 1 and any(d != 0 for d in diffs):
        t = stats.ttest_rel(a, b)
        result["ttest_p"] = None if math.isnan(t.pvalue) else float(t.pvalue)
        result["wilcoxon_p"] = float(stats.wilcoxon(a, b).pvalue)
    return result


def _mean_sd(values: Sequence[float]) -> str:
    if not values:
        return "-"
    sd = statistics.stdev(values) if len(values) > 1 else float("nan")
    return f"{100 * statistics.fmean(values):.3f}% ± {100 * sd:.3f}"


def _p(value: float | None) -> str:
    return "-" if value is None else f"{value:.3g}"


def _diff_row(label: str, comparison: dict[str, Any]) -> str:
    c = comparison
    mean = "-" if c["mean_diff"] is None else f"{100 * c['mean_diff']:+.3f}"
    sd = "-" if c["sd_diff"] is None else f"{100 * c['sd_diff']:.3f}"
    return (
        f"| {label} | {mean} | {sd} | {c['better']} / {c['worse']} / {c['tied']} | {_p(c['ttest_p'])} "
        f"| {_p(c['wilcoxon_p'])} |"
    )


def markdown(results: dict[str, Any]) -> str:
    lines = [
        "| model | method | seeds | test error (mean ± sd, points) | mean / CE's mean | diverged |",
        "|---|---|---|---|---|---|",
    ]
    for model, r in results["models"].items():
        ce = [e for e in r["test_error"].get("ce", []) if e is not None]
        for method, all_errors in r["test_error"].items():
            errors = [e for e in all_errors if e is not None]
            ratio = f"{statistics.fmean(errors) / statistics.fmean(ce):.3f}" if errors and ce and any(ce) else "-"
            lines.append(
                f"| {model} | {method.upper()} | {len(errors)} | {_mean_sd(errors)} | {ratio} | "
                f"{sum(e is None for e in all_errors)} |"
            )
    lines += [
        "",
        "| paired difference | mean (points) | sd (points) | seeds lower / higher / tied | ttest_rel p | wilcoxon p |",
        "|---|---|---|---|---|---|",
    ]
    for model, r in results["models"].items():
        for method, comparison in r["minus_ce"].items():
            lines.append(_diff_row(f"{model}: {method.upper()} - CE", comparison))
    for model, r in results["models"].items():
        for method, p in r["pruning"].items():
            lines.append(_diff_row(f"{model}: {method.upper()} pruned - unpruned", p["after_minus_before"]))
            if "control" in p:
                lines.append(
                    _diff_row(f"{model}: {method.upper()} unpruned fine-tuned - unpruned", p["control_minus_before"])
                )
                lines.append(
                    _diff_row(f"{model}: {method.upper()} pruned - unpruned fine-tuned", p["after_minus_control"])
                )
    if any(r["pruning"] for r in results["models"].values()):
        lines += [
            "",
            "| model | method | test error before pruning | after pruning | parameters kept (nonzero / dense) |",
            "|---|---|---|---|---|",
        ]
        for model, r in results["models"].items():
            for method, p in r["pruning"].items():
                kept = p["kept_fraction"]
                lines.append(
                    f"| {model} | {method.upper()} | {_mean_sd(p['before'])} | {_mean_sd(p['after'])} | "
                    f"{100 * statistics.fmean(kept):.1f}% (range {100 * min(kept):.1f}-{100 * max(kept):.1f}%) |"
                )
    return "\n".join(lines) + "\n"


def unit_record(out: str | Path, model: str, method: str, seed: int) -> Path:
    """Where a finished unit's figures are written: ``OUT/units/<model>_<method>_seed<k>.json``."""
    return Path(out) / "units" / f"{model}_{method}_seed{seed}.json"


def run_unit(
    model: str, method: str, seed: int, budget: dict[str, Any], args: argparse.Namespace, command: str
) -> dict[str, Any]:
    """Train one (model, method, seed) and prune it; the figures go to ``OUT/units/*.json``.

    A finished unit is read back instead of run again, so an interrupted benchmark resumes and
    ``--collect`` can tabulate whatever has finished.
    """
    out = Path(args.out)
    record = unit_record(out, model, method, seed)
    if record.exists():
        return json.loads(record.read_text())
    if args.jobs > 1:  # share the CPU cores between the workers
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // args.jobs))
    started = time.perf_counter()
    folder = out / model / method / f"seed{seed}"
    cfg = run_config(model, method, seed, budget, args, folder / "train")
    info: dict[str, Any] = {"model": model, "method": method, "seed": seed, "engine": args.engine}
    try:
        trained = train_run(cfg)
        info["test_error"] = trained["test"]["error"]
        info["selected"] = trained["selected"]
    except TrainingDiverged as exc:  # every grid point diverged: recorded, not hidden
        trained = None
        info["test_error"] = None
        info["diverged"] = str(exc)
    if trained is not None and not args.no_prune:  # the recipe's pipeline; its training is the one above, read back
        report = ReportOptions(latency_repeats=5)
        pipeline = PipelineConfig(
            out_dir=str(folder),
            run=cfg,
            prune=pruning_config(method, budget, seed),
            report=report,
            prune_by_training_criterion=True,
        )
        try:
            metrics = train_prune_export(pipeline, command, "python -m anrat.recipes.mnist_prune")
        except TrainingDiverged as exc:  # the fine-tuning diverged: the trained figures stand
            info["pruning"] = {"diverged": str(exc)}
        else:
            info["pruned_test_error"] = metrics["test_error"]["pruned"]
            info["kept_fraction"] = metrics["pruning"]["nonzero_after"] / metrics["pruning"]["params_before"]
            pruned_by = metrics["pruning"]["config"]
            info["pruning"] = {
                "covariance": pruned_by["covariance"],
                "tilt": pruned_by["tilt"],
                "estimator": pruned_by["estimator"],
                "fine_tune_schedule": pruned_by["fine_tune"]["schedule"],
                "rounds": metrics["pruning"]["rounds"],
                "test_error_trained_again": metrics["test_error"]["trained"],
            }
    info["seconds"] = time.perf_counter() - started
    info["machine"] = machine_description(args.device)
    record.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(record, json.dumps(info, indent=1))  # a unit is either finished or absent
    test = info["test_error"]
    print(
        f"{model} seed {seed} {method}: test error {'diverged' if test is None else f'{100 * test:.2f}%'} "
        f"({info['seconds']:.0f} s)",
        file=sys.stderr,
        flush=True,
    )
    return info


def add_control(model: str, method: str, seed: int, budget: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """Claim 4's control: the unit's unpruned model fine-tuned exactly as its pruned model was
    (the same :class:`FineTune`, criterion and seed, once per pruning round that was kept), then
    tested; recorded in the unit's record as ``control``. The pruned model had those extra epochs
    of training, so "pruned against unpruned" alone cannot tell pruning from training longer.
    """
    path = unit_record(args.out, model, method, seed)
    unit = json.loads(path.read_text())
    if "control" in unit or unit.get("pruned_test_error") is None:
        return unit
    started = time.perf_counter()
    folder = Path(args.out) / model / method / f"seed{seed}"
    pruning = unit["pruning"]
    criterion = ScheduleConfig(**pruning["fine_tune_schedule"])
    ft = replace(pruning_config(method, budget, seed).fine_tune, schedule=criterion)
    rounds = sum(1 for r in pruning["rounds"] if "params" in r and not r.get("rolled_back"))
    cfg = run_config(model, method, seed, budget, args, folder / "train")
    device = resolve_device(args.device)
    data = load_dataset(
        "mnist", cfg.data_dir, val_size=cfg.val_size, seed=seed, device=device, train_subset=cfg.train_subset
    )
    net = model_from_checkpoint(load_checkpoint(folder / "train" / "model.pt")).to(device)
    kind = cfg.schedule.kind
    for _ in range(rounds):
        fine_tune(net, data.train, ft, kind)  # no zero weights: no mask holds anything
    unit["control"] = {
        "fine_tune_rounds": rounds,
        "test_error": evaluate(net, data.test, kind)["error"],
        "val_error": evaluate(net, data.val, kind)["error"],
        "seconds": time.perf_counter() - started,
    }
    write_text_atomic(path, json.dumps(unit, indent=1))
    print(
        f"{model} seed {seed} {method}: control (unpruned, {rounds} fine-tunings) test error "
        f"{100 * unit['control']['test_error']:.2f}%, pruned {100 * unit['pruned_test_error']:.2f}%",
        file=sys.stderr,
        flush=True,
    )
    return unit


def validation_error(unit: dict[str, Any]) -> float:
    """Validation error of a unit's selected model (inf if it diverged): the rule by which the
    learning-rate grid inside one run picks its trial (anrat.train), used across runs by --select-from."""
    if unit.get("test_error") is None or not unit.get("selected"):
        return math.inf
    val = unit["selected"].get("val") or {}
    return val.get("error", math.inf)


def collect(
    args: argparse.Namespace, budget: dict[str, Any], units: dict[tuple[str, str, int], dict[str, Any]]
) -> dict[str, Any]:
    """The table's figures from the finished units: per model, each method's test errors, each
    other method paired against cross-entropy on the seeds both finished, and each method's pruned
    against unpruned test error."""
    results: dict[str, Any] = {"budget": budget, "methods": args.methods, "models": {}}
    for model in args.models:
        found = {(m, s): units.get((model, m, s)) for m in args.methods for s in range(budget["seeds"])}
        errors = {m: [found[m, s]["test_error"] for s in range(budget["seeds"]) if found[m, s]] for m in args.methods}
        entry: dict[str, Any] = {
            "test_error": errors,
            "seeds": [
                {"seed": s, **{m: found[m, s] for m in args.methods if found[m, s] is not None}}
                for s in range(budget["seeds"])
            ],
            "minus_ce": {},
            "pruning": {},
        }
        for method in args.methods:
            if method != "ce" and "ce" in args.methods:
                pairs = [
                    (found[method, s]["test_error"], found["ce", s]["test_error"])
                    for s in range(budget["seeds"])
                    if found[method, s] and found["ce", s]
                    if found[method, s]["test_error"] is not None and found["ce", s]["test_error"] is not None
                ]
                entry["minus_ce"][method] = paired([a for a, _ in pairs], [c for _, c in pairs])
            pruned = [u for (m, _), u in found.items() if m == method and u and u.get("pruned_test_error") is not None]
            if pruned:
                before = [u["test_error"] for u in pruned]
                after = [u["pruned_test_error"] for u in pruned]
                entry["pruning"][method] = {
                    "before": before,
                    "after": after,
                    "kept_fraction": [u["kept_fraction"] for u in pruned],
                    "after_minus_before": paired(after, before),
                }
                controlled = [u for u in pruned if "control" in u]
                if controlled:
                    control = [u["control"]["test_error"] for u in controlled]
                    entry["pruning"][method].update(
                        control=control,
                        after_minus_control=paired([u["pruned_test_error"] for u in controlled], control),
                        control_minus_before=paired(control, [u["test_error"] for u in controlled]),
                    )
        results["models"][model] = entry
    return results


def benchmark(args: argparse.Namespace, budget: dict[str, Any], command: str) -> dict[str, Any]:
    """Run (or, with ``--collect``, only read) every unit, seed by seed, ``--jobs`` at a time."""
    started = time.perf_counter()
    todo = [(model, m, seed) for seed in range(budget["seeds"]) for model in args.models for m in args.methods]
    units: dict[tuple[str, str, int], dict[str, Any]] = {}
    if args.collect or args.select_from or args.fine_tune_control:
        for key in todo:
            records = [unit_record(folder, *key) for folder in args.select_from or [args.out]]
            found = [json.loads(r.read_text()) for r in records if r.exists()]
            if found:
                units[key] = min(found, key=validation_error)
    elif args.jobs == 1:
        units = {key: run_unit(*key, budget, args, command) for key in todo}
    else:
        # Small ConvNets leave a GPU mostly idle between kernel launches: several processes keep it busy.
        spawn = multiprocessing.get_context("spawn")  # CUDA cannot be used in forked children
        with concurrent.futures.ProcessPoolExecutor(args.jobs, mp_context=spawn) as pool:
            futures = {pool.submit(run_unit, *key, budget, args, command): key for key in todo}
            for future in concurrent.futures.as_completed(futures):
                try:
                    units[futures[future]] = future.result()
                except Exception as exc:  # one failed unit is reported and left out, not the whole run
                    print("{} {} seed {}: failed: {!r}".format(*futures[future], exc), file=sys.stderr, flush=True)
    if args.fine_tune_control:
        for key in todo:
            if key in units:
                units[key] = add_control(*key, budget, args)
    results = collect(args, budget, units)
    machines = []  # where the units ran (several, when --select-from combines runs)
    for unit in units.values():
        if "machine" in unit and unit["machine"] not in machines:
            machines.append(unit["machine"])
    results.update(
        command=command,
        wall_seconds=time.perf_counter() - started,
        units_finished=len(units),
        units_planned=len(todo),
        machine=machines,
    )
    return results


def machine_description(device: str) -> dict[str, Any]:
    return describe_machine(resolve_device(device))


def build_parser() -> argparse.ArgumentParser:
    """The command line (:func:`main` checks the values and fills in the budget)."""
    ap = OneLineErrorParser(prog="python benchmarks/mnist_anrat_vs_ce.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("--data-dir", default=None, help="folder holding the MNIST IDX files; default: $ANRAT_DATA_DIR")
    ap.add_argument("--out", default="runs/bench_mnist", help="folder for the runs and results")
    ap.add_argument(
        "--full",
        action="store_true",
        help="the paper's protocol, for a GPU (10 seeds, 50k images, 100 epochs, lr {1,.5,.1,.03} x a {1,.1,.001})",
    )
    ap.add_argument("--seeds", type=int, default=None, help="seeds 0..N-1 (default 5; 10 with --full)")
    ap.add_argument("--epochs", type=int, default=None, help="training epochs (default 5; 100 with --full)")
    ap.add_argument(
        "--train-subset",
        type=int,
        default=None,
        help="training images after the validation split (default 20000; all with --full)",
    )
    ap.add_argument(
        "--grid-lr", default=None, help="comma-separated learning rates (default 0.1,0.03; 1,0.5,0.1,0.03 with --full)"
    )
    ap.add_argument(
        "--grid-a",
        default=None,
        help="comma-separated penalty weights a of ANRAT's grid, crossed with --grid-lr "
        "(default 0.01; 1,0.1,0.001 with --full)",
    )
    ap.add_argument(
        "--methods", default=",".join(METHODS), help=f"comma-separated, from {', '.join(METHODS)} (default: all)"
    )
    ap.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, from {', '.join(MODELS)}")
    ap.add_argument("--no-prune", action="store_true", help="train only: prune no model")
    ap.add_argument("--prune-rounds", type=int, default=None, help="pruning rounds at most (default 2; 10 with --full)")
    ap.add_argument(
        "--prune-step",
        type=float,
        default=None,
        help="largest fraction of the remaining weights removed per round (PruneConfig.step; default 0.5)",
    )
    ap.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    ap.add_argument(
        "--engine",
        choices=ENGINES,
        default="batched",
        help="batched: each unit's learning-rate grid trained at once as one vectorised stack; "
        "loop: one configuration after another (same selection rule and outputs). Default: batched",
    )
    ap.add_argument("--no-progress", action="store_true", help="no progress bars")
    ap.add_argument(
        "--jobs",
        type=int,
        default=1,
        help="trainings run at once in separate processes (on a GPU, several keep it busy; default 1)",
    )
    ap.add_argument(
        "--collect", action="store_true", help="train nothing: tabulate the units already finished under --out"
    )
    ap.add_argument(
        "--fine-tune-control",
        action="store_true",
        help="train nothing: fine-tune each finished unit's unpruned model as its pruned model was "
        "fine-tuned, test it, record it in the unit, and tabulate (pruning against training longer)",
    )
    ap.add_argument(
        "--select-from",
        default=None,
        metavar="DIR,DIR,...",
        help="train nothing: from these benchmark folders (runs with the same seeds and budget but "
        "different --grid-lr), take for each model, method and seed the unit with the lowest "
        "validation error, as a grid over their learning rates would, and tabulate into --out",
    )
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    budget = json.loads(json.dumps(FULL if args.full else DEFAULT))
    try:
        for key in ("seeds", "epochs", "train_subset"):
            if getattr(args, key) is not None:
                budget[key] = getattr(args, key)
        if args.grid_lr is not None:
            budget["grid_lr"] = [float(v) for v in args.grid_lr.split(",") if v.strip()]
        if args.grid_a is not None:
            budget["grid_a"] = [float(v) for v in args.grid_a.split(",") if v.strip()]
        if args.prune_rounds is not None:
            budget["prune"]["max_rounds"] = args.prune_rounds
        if args.prune_step is not None:
            budget["prune"]["step"] = args.prune_step
        PruneConfig(**budget["prune"]).validate()  # a bad round count or step is refused before any training
        if not budget["grid_lr"] or not budget["grid_a"]:
            raise InputError("--grid-lr and --grid-a each need at least one value")
        args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
        if not set(args.methods) <= set(METHODS) or not args.methods:
            raise InputError(f"--methods must name some of {', '.join(METHODS)}, got {','.join(args.methods)!r}")
        args.models = [m.strip() for m in args.models.split(",") if m.strip()]
        if not set(args.models) <= set(MODELS) or not args.models:
            raise InputError(f"--models must name some of {', '.join(MODELS)}, got {','.join(args.models)!r}")
        args.select_from = [d.strip() for d in args.select_from.split(",") if d.strip()] if args.select_from else []
        for folder in args.select_from:
            if not (Path(folder) / "units").is_dir():
                raise InputError(f"--select-from: {folder!r} holds no units/ folder of a benchmark run")
        if args.jobs < 1:
            raise InputError(f"--jobs must be >= 1, got {args.jobs}")
        if args.jobs > 1:
            args.no_progress = True  # bars from several processes would interleave
        if budget["seeds"] < 2:
            raise InputError("a paired comparison needs --seeds >= 2")
    except ValueError as exc:  # InputError included
        ap.error(str(exc))
    command = " ".join(["python benchmarks/mnist_anrat_vs_ce.py", *(sys.argv[1:] if argv is None else argv)])
    try:
        results = benchmark(args, budget, command)
    except InputError as exc:
        print(f"{ap.prog}: error: {exc}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    table = markdown(results)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    (out / "results.md").write_text(
        f"# MNIST: ANRAT against cross-entropy\n\nCommand: `{command}`\n\n"
        f"Budget: {json.dumps(budget)}\n\nMachine: {json.dumps(results['machine'])}\n\n"
        f"Units finished: {results['units_finished']} of {results['units_planned']}\n\n"
        f"{table}"
    )
    print(table, end="")
    print(
        f"budget {json.dumps(budget)}; {results['units_finished']} of {results['units_planned']} units; "
        f"{results['wall_seconds']:.0f} s; wrote {out.resolve()}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
