"""How large should relu_sum be? Plain MSE alone at several k: from how many of 20 seeds it fails.

The size of ``relu_sum`` in ``benchmarks/function_fit_claims.py`` was chosen from this script's
output, before any NRAE run: the k where MSE fails from some seeds and succeeds from others, under
Adam (lr 1e-2) and plain full-batch gradient descent (lr 0.1), 20 seeds each, as one batched stack.

    python benchmarks/relu_sum_size.py --steps 2000 --samples 1000 --k 6,8,10,12
"""

from __future__ import annotations

import argparse
import time

import torch

from anrat.batched import BatchedTrainer, Member
from anrat.function_problems import SUCCESS_THRESHOLD, make_problem
from anrat.schedules import ScheduleConfig
from anrat.trainer import TrainConfig


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--samples", type=int, default=1000)
    ap.add_argument("--k", default="6,8,10,12", help="comma-separated sizes")
    ap.add_argument("--seeds", type=int, default=20)
    args = ap.parse_args()
    torch.set_num_threads(1)
    for k in [int(v) for v in args.k.split(",")]:
        problem = make_problem("relu_sum", 0, k=k, num_samples=args.samples)
        for optimizer, lr in (("adam", 1e-2), ("sgd", 0.1)):
            members = [
                Member(
                    TrainConfig(
                        epochs=args.steps,
                        batch_size=args.samples,
                        lr=lr,
                        optimizer=optimizer,
                        seed=s,
                        lam_samples_per_epoch=1,
                    ),
                    ScheduleConfig(name="plain", kind="lp"),
                )
                for s in range(args.seeds)
            ]
            started = time.perf_counter()
            trainer = BatchedTrainer(problem.build_model, members, problem.train, None, progress=False)
            while trainer.epoch < args.steps:  # no per-epoch history kept
                trainer.train_epoch()
            errors = sorted(r["loss"] for r in trainer.evaluate(problem.train))
            failed = sum(e >= SUCCESS_THRESHOLD for e in errors)
            print(
                f"k={k} {optimizer} lr {lr:g}: MSE failed from {failed} of {args.seeds} seeds "
                f"({time.perf_counter() - started:.0f} s); final errors {[round(e, 4) for e in errors]}",
                flush=True,
            )


if __name__ == "__main__":
    main()
