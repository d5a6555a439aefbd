"""lenet5 on one device: a single model's epoch, a 9-member grid against nine single runs, memory.

The GPU targets of issue 13, measured side by side in one run (on the CPU it runs too, for a
smoke test, with ``--train-subset``):

1. **One model's epoch**: ``anrat.trainer.Trainer`` on lenet5 (MNIST training images on the
   device, batch 64, plain SGD), eager and with ``TrainConfig.compile`` (each mode in
   ``--compile-modes``, e.g. ``reduce-overhead``: CUDA graphs); seconds per epoch after one
   warm-up epoch.
2. **The paper's grid as one stack**: the nine members lr {1, 0.5, 0.1} x a {1, 0.1, 0.001}
   (ANRAT, lambda0 = 10) as one ``anrat.batched.BatchedTrainer`` epoch against the nine
   members' single-model epochs one after the other: the throughput ratio (target >= 6x), and the
   100-epoch grid's projected minutes (target <= 5).
3. **Memory**: peak device memory of one batched epoch for K in ``--members`` (CUDA only), the
   memory per member (slope) and the largest K that fits, from the device's total memory.

    python benchmarks/batched_gpu.py --data-dir ../shared/data/mnist --device cuda
    python benchmarks/batched_gpu.py --data-dir ../shared/data/mnist --device cpu --train-subset 640 \\
        --members 1,2 --compile-modes ""                                # smoke test on the CPU

Writes ``<out>/batched_gpu.json``.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from anrat.batched import BatchedTrainer, Member
from anrat.data import load_dataset
from anrat.devices import resolve_device
from anrat.machine import describe_machine
from anrat.models import build_model
from anrat.schedules import LambdaSchedule, ScheduleConfig
from anrat.trainer import TrainConfig, Trainer, TrainingDiverged

PAPER_LR = (1.0, 0.5, 0.1)
PAPER_A = (1.0, 0.1, 0.001)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def paper_members(seed: int = 0) -> list[Member]:
    """The paper's grid, nine ANRAT members (plain SGD, lambda0 = 10, p = 2, q = 1, L2 0.05 on fc2)."""
    base = TrainConfig(epochs=1, batch_size=64, optimizer="sgd", momentum=0.0, l2={"fc2": 0.05}, seed=seed)
    return [
        Member(replace(base, lr=lr), ScheduleConfig(name="adaptive", lam0=10.0, p=2.0, a=a, q=1.0))
        for lr in PAPER_LR
        for a in PAPER_A
    ]


def single_epoch_seconds(member: Member, splits: Any, device: torch.device, epochs: int = 2) -> float:
    """Seconds of the last of ``epochs`` epochs of one single-model training (the first warms up)."""
    torch.manual_seed(member.train.seed)
    model = build_model("lenet5").to(device)
    trainer = Trainer(model, LambdaSchedule(replace(member.schedule)), splits.train, None, member.train, progress=False)
    seconds = 0.0
    for _ in range(epochs):
        sync(device)
        start = time.perf_counter()
        try:
            trainer.train_epoch()
        except TrainingDiverged:  # lr = 1 may diverge: the epoch's work was done all the same
            trainer.epoch += 1
        sync(device)
        seconds = time.perf_counter() - start
    return seconds


def batched_epoch(members: list[Member], splits: Any, device: torch.device) -> tuple[float, int | None]:
    """Seconds of the second epoch of a BatchedTrainer of ``members`` and its peak memory (bytes, CUDA)."""
    trainer = BatchedTrainer(lambda: build_model("lenet5"), members, splits.train, None)
    trainer.train_epoch()  # warm-up
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    sync(device)
    start = time.perf_counter()
    trainer.train_epoch()
    sync(device)
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    del trainer
    return seconds, peak


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", default=None, help="MNIST folder (default: $ANRAT_DATA_DIR)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--train-subset", type=int, default=None, help="training images (default: all 50,000)")
    ap.add_argument("--compile-modes", default="reduce-overhead", help="comma-separated torch.compile modes")
    ap.add_argument("--members", default="1,9,18,36,72", help="K values for the memory measurement")
    ap.add_argument("--out", default="runs/batched_gpu")
    args = ap.parse_args()
    device = resolve_device(args.device)
    splits = load_dataset("mnist", args.data_dir, val_size=10_000, train_subset=args.train_subset, device=device)
    report: dict[str, Any] = {
        "machine": describe_machine(device),
        "train_images": len(splits.train),
    }
    members = paper_members()

    # 1. one model's epoch, eager and compiled
    single = {"eager": single_epoch_seconds(members[0], splits, device)}
    for mode in [m for m in args.compile_modes.split(",") if m]:
        compiled = Member(replace(members[0].train, compile=mode), members[0].schedule)
        single[mode] = single_epoch_seconds(compiled, splits, device)
    report["single_epoch_seconds"] = single
    print("one lenet5 epoch (s):", {k: round(v, 3) for k, v in single.items()})

    # 2. the nine-member grid: one stack against nine single runs
    sequential = sum(single_epoch_seconds(m, splits, device) for m in members)
    stacked, _ = batched_epoch(members, splits, device)
    report["grid"] = {
        "nine_single_epochs_seconds": sequential,
        "batched_epoch_seconds": stacked,
        "throughput_ratio": sequential / stacked,
        "projected_100_epochs_minutes": 100 * stacked / 60,
    }
    print(
        f"9-member grid, one epoch: nine single runs {sequential:.2f} s, one stack {stacked:.2f} s, "
        f"{sequential / stacked:.2f}x; 100 epochs ~ {100 * stacked / 60:.1f} min"
    )

    # 3. memory per member
    if device.type == "cuda":
        peaks = {}
        for k in [int(v) for v in args.members.split(",") if v]:
            try:
                _, peaks[k] = batched_epoch((members * (k // 9 + 1))[:k], splits, device)
            except torch.cuda.OutOfMemoryError:
                print(f"K = {k}: out of memory")
                break
            finally:
                torch.cuda.empty_cache()
            print(f"K = {k}: peak {peaks[k] / 2**20:.0f} MiB")
        ks = sorted(peaks)
        if len(ks) >= 2:
            per_member = (peaks[ks[-1]] - peaks[ks[0]]) / (ks[-1] - ks[0])
            total = torch.cuda.get_device_properties(device).total_memory
            largest = int(ks[0] + (0.9 * total - peaks[ks[0]]) / per_member) if per_member > 0 else None
            report["memory"] = {"peak_bytes": peaks, "bytes_per_member": per_member, "largest_k_at_90pct": largest}
            print(f"memory per member {per_member / 2**20:.1f} MiB; largest K within 90% of memory ~ {largest}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "batched_gpu.json").write_text(json.dumps(report, indent=2))
    print(f"wrote {out / 'batched_gpu.json'}")


if __name__ == "__main__":
    main()
