"""Cost of the scale-free tilt next to a lenet5 training step: is it under 5% of the step?

Times, in the same process and alternating in rounds (so that drift of the machine enters both
sides of a ratio):

1. step: one lenet5 training step on a batch of 64 MNIST-shaped inputs (forward, per-sample
   cross-entropy, NRAE at a fixed tilt, backward, SGD step);
2. solve: :func:`anrat.functional.tilt_for_ess` on that step's 64 detached per-sample losses
   (host path: converged to 1e-11 in log t), and the same with ``backend="torch"`` (the fixed
   :data:`~anrat.functional.ESS_ITERATIONS` steps that the device path and the batched trainer take);
3. ess: :func:`anrat.functional.effective_sample_size` of those losses (what the trainers log
   every step, for every schedule).

Prints the median seconds of each and, per round, the ratio to the step; the reported ratio is the
median of the per-round ratios. Losses are those of the untrained network (spread ~0.3), for
several rho.

    python benchmarks/ess_cost.py [--rounds 15] [--steps 5] [--threads N]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from anrat.functional import ESS_ITERATIONS, effective_sample_size, per_sample_loss, tilt_for_ess, tilted_mean
from anrat.machine import machine_line
from anrat.models import build_model


def per_call(fn, n: int) -> float:
    start = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - start) / n


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=15, help="rounds of alternating timings (default 15)")
    ap.add_argument("--steps", type=int, default=5, help="lenet5 steps per round (default 5)")
    ap.add_argument("--calls", type=int, default=200, help="calls of each ESS function per round (default 200)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = ap.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = build_model("lenet5")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    x, y = torch.randn(64, 1, 28, 28), torch.randint(0, 10, (64,))

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        tilted_mean(per_sample_loss(model(x), y), 1.0).backward()
        optimizer.step()

    losses = per_sample_loss(model(x), y).detach()
    sides = {"lenet5 step": (step, args.steps)}
    for rho in (0.1, 0.5, 0.9):
        sides[f"tilt_for_ess rho={rho} (host)"] = (lambda rho=rho: tilt_for_ess(losses, rho), args.calls)
        sides[f"tilt_for_ess rho={rho} (torch, {ESS_ITERATIONS} steps)"] = (
            lambda rho=rho: tilt_for_ess(losses, rho, backend="torch"),
            args.calls,
        )
    sides["effective_sample_size"] = (lambda: effective_sample_size(losses, 3.0), args.calls)
    for fn, n in sides.values():  # warm-up
        per_call(fn, max(1, n // 5))
    times: dict[str, list[float]] = {name: [] for name in sides}
    for _ in range(args.rounds):
        for name, (fn, n) in sides.items():
            times[name].append(per_call(fn, n))
    print(machine_line())
    print(f"losses: m={losses.numel()}, mean {losses.mean():.3f}, max {losses.max():.3f}")
    base = times["lenet5 step"]
    print(f"{'':44s} {'median':>10s}   ratio to the step (median over rounds [min, max])")
    for name, ts in times.items():
        ratios = [t / b for t, b in zip(ts, base)]
        print(
            f"{name:44s} {statistics.median(ts) * 1e3:8.3f} ms   "
            f"{statistics.median(ratios):.4f} [{min(ratios):.4f}, {max(ratios):.4f}]"
        )


if __name__ == "__main__":
    main()
