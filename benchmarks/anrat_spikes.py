"""What makes ANRAT spike at cross-entropy's learning rate: per-step diagnostics on MNIST.

At plain SGD lr 0.1 (cross-entropy's best rate) ANRAT trainings had sudden spikes and 4 of 10
diverged on an H100 (docs/results/mnist-anrat-vs-ce.md). This script trains lenet5 with the benchmark's settings
(plain SGD, batch 64, L2 0.05 on fc2, the 10,000-image validation split) under each method and
records, at every step:

- ``t`` (lambda^p, or the ess schedule's solved tilt), the largest per-sample cross-entropy of
  the batch ``max_loss`` (spikes are judged on cross-entropy whatever loss a method trains);
- the tilted weights w = softmax(t * l) of the batch's trained per-sample losses
  (w_i = d NRAE / d l_i; 1/m for the plain loss): the largest, as ``w_max * m`` (how many times
  cross-entropy's weight the worst sample gets), and the effective sample size ESS = 1 / sum_i w_i^2 as a fraction of m;
- the norm of the weights' gradient, and the mean cross-entropy of the batch.

A *spike* is a step whose batch mean cross-entropy exceeds ``--spike-factor`` times the median of
the previous 200 steps' (and 1.0). For each method the script prints the number of spikes, whether
the run diverged, and, over the steps just before each spike (``--lookback``), the median
``w_max * m``, ESS / m, ``t`` and gradient norm against the same figures over all steps.

    python benchmarks/anrat_spikes.py --data-dir ../shared/data/mnist --methods ce,anrat \\
        --seeds 0,1 --epochs 5 --train-subset 20000 --out runs/spikes

Writes ``<out>/spikes.json`` (per method and seed: the summary and the per-step trace).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from anrat.data import load_dataset
from anrat.ess import ESSLoss
from anrat.functional import per_sample_loss
from anrat.losses import ANRATLoss, NRAELoss
from anrat.models import build_model
from anrat.schedules import LambdaSchedule, ScheduleConfig
from anrat.trainer import TrainConfig, evaluate, make_optimizer, param_groups

# The methods compared; each a ScheduleConfig. Declared before any run.
METHODS: dict[str, ScheduleConfig] = {
    "ce": ScheduleConfig(name="plain"),
    "anrat": ScheduleConfig(name="adaptive", lam0=10.0, p=2.0, a=0.01, q=1.0),
    # NRAE at the lambda ANRAT settles at after two epochs at lr 0.1 (0.3-0.4): is the tilt alone
    # (without lambda moving) enough to spike?
    "nrae_lam0.4": ScheduleConfig(name="fixed", lam0=0.4, p=2.0),
    # the same tilt on the original code's bounded loss (1 - p_y)^2 (anrat.functional, true_class_sq)
    "nrae_lam0.4_tcsq": ScheduleConfig(name="fixed", lam0=0.4, p=2.0, kind="true_class_sq"),
    "anrat_tcsq": ScheduleConfig(name="adaptive", lam0=10.0, p=2.0, a=0.01, q=1.0, kind="true_class_sq"),
    # the scale-free tilt: ESS / m held at rho, rho from 0.5 to 1 over 10 epochs
    "ess": ScheduleConfig(name="ess", rho0=0.5, rho_final=1.0, rho_epochs=10),
}


def tilt_weights(losses: torch.Tensor, t: float) -> torch.Tensor:
    """softmax(t * l) in float64: the weights NRAE's gradient gives each sample."""
    return torch.softmax(losses.detach().double() * t, dim=0)


def train_traced(method: str, seed: int, splits: Any, epochs: int, lr: float, batch_size: int) -> dict[str, Any]:
    """One training with the per-step trace; stops at the first non-finite objective."""
    torch.manual_seed(seed)
    model = build_model("lenet5")
    schedule = LambdaSchedule(replace(METHODS[method]))
    config = TrainConfig(epochs=epochs, lr=lr, optimizer="sgd", momentum=0.0, l2={"fc2": 0.05}, seed=seed)
    optimizer = make_optimizer(param_groups(model, schedule, config), config)
    generator = torch.Generator().manual_seed(seed)
    trace: list[dict[str, float]] = []
    val_errors: list[float] = []
    diverged_at: int | None = None
    step = 0
    for _ in range(epochs):
        model.train()
        for x, y in splits.train.batches(batch_size, shuffle=True, generator=generator):
            criterion = schedule.criterion(step)
            out = model(x)
            losses = criterion.per_sample(out, y)
            seen = per_sample_loss(out.detach(), y, "ce")  # spikes are judged on cross-entropy, whatever the loss
            objective = criterion.aggregate(losses)
            if isinstance(criterion, (ANRATLoss, NRAELoss)):
                t = criterion.lam**criterion.p
            elif isinstance(criterion, ESSLoss):
                t = float(criterion.last_t)
            else:
                t = 0.0
            w = tilt_weights(losses, t)  # of the trained losses (after the ESS solve: in aggregate)
            m = losses.shape[0]
            optimizer.zero_grad(set_to_none=True)
            objective.backward()
            grad_norm = math.sqrt(sum(float(p.grad.double().pow(2).sum()) for p in model.parameters()))
            optimizer.step()
            trace.append(
                {
                    "step": step,
                    "t": t,
                    "mean_loss": float(seen.mean()),
                    "max_loss": float(seen.max()),
                    "trained_max_loss": float(losses.detach().max()),
                    "w_max_m": float(w.max()) * m,
                    "ess_frac": float(1.0 / w.pow(2).sum()) / m,
                    "grad_norm": grad_norm,
                }
            )
            step += 1
            if not math.isfinite(float(objective.detach())) or not math.isfinite(grad_norm):
                diverged_at = step
                break
        if diverged_at is not None:
            break
        epoch_max = max(r["trained_max_loss"] for r in trace[-splits.train.num_batches(batch_size) :])
        schedule.end_epoch(len(val_errors), epoch_max)
        val_errors.append(evaluate(model, splits.val)["error"])
    return {"trace": trace, "val_errors": val_errors, "diverged_at_step": diverged_at}


def spikes(trace: list[dict[str, float]], factor: float, window: int = 200) -> list[int]:
    """Steps whose batch mean loss exceeds ``factor`` x the median of the previous ``window`` (and 1.0)."""
    found = []
    for i in range(window, len(trace)):
        before = statistics.median(r["mean_loss"] for r in trace[i - window : i])
        if trace[i]["mean_loss"] > max(1.0, factor * before):
            found.append(i)
    return found


def summarise(run: dict[str, Any], factor: float, lookback: int) -> dict[str, Any]:
    trace = run["trace"]
    found = spikes(trace, factor)
    before = sorted({j for i in found for j in range(max(0, i - lookback), i)})
    keys = ("w_max_m", "ess_frac", "t", "grad_norm", "max_loss")

    def medians(rows: list[int]) -> dict[str, float | None]:
        return {k: (statistics.median(trace[j][k] for j in rows) if rows else None) for k in keys}

    return {
        "steps": len(trace),
        "diverged_at_step": run["diverged_at_step"],
        "spikes": len(found),
        "spike_steps": found[:50],
        "before_spikes": medians(before),
        "all_steps": medians(list(range(len(trace)))),
        "val_errors": run["val_errors"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", default=None, help="MNIST folder (default: $ANRAT_DATA_DIR)")
    ap.add_argument("--methods", default="ce,anrat", help=f"comma-separated, from {', '.join(METHODS)}")
    ap.add_argument("--seeds", default="0,1", help="comma-separated seeds")
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--train-subset", type=int, default=20_000)
    ap.add_argument("--lr", type=float, default=0.1)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--spike-factor", type=float, default=5.0)
    ap.add_argument("--lookback", type=int, default=10)
    ap.add_argument("--out", default="runs/spikes")
    args = ap.parse_args()
    methods = [m for m in args.methods.split(",") if m]
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        ap.error(f"unknown methods {unknown}; expected some of {', '.join(METHODS)}")
    seeds = [int(s) for s in args.seeds.split(",") if s]
    splits = load_dataset("mnist", args.data_dir, val_size=10_000, train_subset=args.train_subset)
    results: dict[str, Any] = {"settings": vars(args), "runs": {}}
    start = time.perf_counter()
    for method in methods:
        for seed in seeds:
            run = train_traced(method, seed, splits, args.epochs, args.lr, args.batch_size)
            summary = summarise(run, args.spike_factor, args.lookback)
            results["runs"][f"{method}/{seed}"] = {**summary, "trace": run["trace"]}
            b, a = summary["before_spikes"], summary["all_steps"]
            print(
                f"{method:>12} seed {seed}: {summary['steps']} steps, diverged at {summary['diverged_at_step']}, "
                f"{summary['spikes']} spikes; val errors {[round(e * 100, 2) for e in summary['val_errors']]}"
            )
            for key in ("w_max_m", "ess_frac", "t", "grad_norm", "max_loss"):
                print(f"{'':>14}{key:>10}: before spikes {b[key]!s:>22}  all steps {a[key]!s:>22}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "spikes.json").write_text(json.dumps(results))
    print(f"{time.perf_counter() - start:.0f} s; wrote {out / 'spikes.json'}")


if __name__ == "__main__":
    main()
