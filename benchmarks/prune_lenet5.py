"""LeNet-5 on MNIST through the pruning stage: Wald-test pruning against magnitude and OBD.

1. A lenet5 trained on MNIST (``--checkpoint model.pt`` of ``anrat-train``, or trained here with
   ANRAT for ``--epochs``).
2. Statistical pruning (:func:`pruning.prune`): test / prune / fine-tune rounds with rollback at
   ``--tolerance`` over the unpruned validation error.
3. Baselines at the same fraction of weights removed and the same total fine-tuning epochs:
   magnitude |w| and Optimal Brain Damage 0.5*F_jj*w^2 (:func:`pruning.prune_to_sparsity`).
4. For each: test error (the test set is used once per model, for this table only), parameters
   left, ONNX bytes (dense storage; and with sparse initializers, a disk format onnxruntime
   densifies at load), onnxruntime latency at batch 1 and 256 against the dense model.

Targets (issue 3): >= 90% of weights removed, test error <= unpruned + 0.1 points, ONNX <= 1/5 of
the dense file, batch-1 latency >= 2x better. The script prints whether each held.

    python benchmarks/prune_lenet5.py --data-dir ../shared/data/mnist [--checkpoint model.pt]
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from dataclasses import replace
from pathlib import Path

import torch

from anrat.checkpoint import load_checkpoint, model_from_checkpoint
from anrat.data import load_dataset
from anrat.devices import resolve_device
from anrat.machine import machine_line
from anrat.run import RunConfig, run
from anrat.schedules import ScheduleConfig
from anrat.trainer import TrainConfig, evaluate
from pruning import FineTune, compare_models, export_onnx, prune, prune_to_sparsity


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data-dir", default=None, help="MNIST folder (default $ANRAT_DATA_DIR)")
    ap.add_argument("--checkpoint", default=None, help="a trained lenet5 model.pt; default: train one here")
    ap.add_argument("--epochs", type=int, default=8, help="training epochs when no checkpoint is given")
    ap.add_argument("--out", default="runs/bench_prune_lenet5", help="output folder")
    ap.add_argument("--tolerance", type=float, default=0.001, help="allowed validation error rise (0.001 = 0.1 points)")
    ap.add_argument("--fine-tune-epochs", type=int, default=1, help="fine-tuning epochs per round")
    ap.add_argument("--max-rounds", type=int, default=8, help="pruning rounds at most")
    ap.add_argument("--max-samples", type=int, default=10_000, help="samples for the Fisher information (KFAC)")
    ap.add_argument(
        "--obd-samples",
        type=int,
        default=1_000,
        help="samples for OBD's diagonal Fisher (per-sample gradients: ~0.1 CPU-s each for lenet5)",
    )
    ap.add_argument("--device", default="auto", help="auto, cpu or cuda")
    ap.add_argument("--seed", type=int, default=0, help="seed of training, split and fine-tuning")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = resolve_device(args.device)
    started = time.perf_counter()

    if args.checkpoint is None:
        cfg = RunConfig(
            data_dir=args.data_dir,
            model="lenet5",
            device=str(device),
            out_dir=str(out / "train"),
            progress=False,
            train=TrainConfig(epochs=args.epochs, lr=0.1, seed=args.seed),
            schedule=ScheduleConfig(name="adaptive", lam0=10.0),
        )
        run(cfg)
        args.checkpoint = str(out / "train" / "model.pt")
    dense = model_from_checkpoint(load_checkpoint(args.checkpoint)).to(device)
    data = load_dataset("mnist", args.data_dir, val_size=10_000, seed=args.seed, device=device)
    # plain SGD at a constant 0.05, no distillation: the recovery issue 3's figures were measured with
    ft = FineTune.constant_rate(epochs=args.fine_tune_epochs, seed=args.seed, optimizer="sgd", lr=0.05)

    rows = {"unpruned": {"model": dense, "val": evaluate(dense, data.val), "seconds": 0.0}}
    t = time.perf_counter()
    wald = prune(
        copy.deepcopy(dense),
        data.train,
        data.val,
        tolerance=args.tolerance,
        max_rounds=args.max_rounds,
        max_samples=args.max_samples,
        fine_tune=ft,
        log=lambda r: print(json.dumps(r), flush=True),
    )
    rows["wald (ours)"] = {
        "model": wald.model,
        "val": wald.final_val,
        "seconds": time.perf_counter() - t,
        "rounds": wald.rounds,
    }
    ft_epochs = ft.epochs * sum(1 for r in wald.rounds if "params" in r)  # rounds that fine-tuned
    for criterion in ("magnitude", "obd"):
        t = time.perf_counter()
        # the same fraction of the tested weights: Linear/Conv weights, biases not counted
        weights = sum(m.weight.numel() for m in dense.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)))
        target = min(0.999, 1 - (wald.nonzero_after - _biases(wald.model)) / weights)
        base = prune_to_sparsity(
            copy.deepcopy(dense),
            data.train,
            data.val,
            criterion=criterion,
            fraction_removed=target,
            fine_tune_config=replace(ft, epochs=ft_epochs),
            max_samples=args.obd_samples,
        )
        rows[criterion] = {"model": base.model, "val": base.final_val, "seconds": time.perf_counter() - t}

    example = data.test.x[:2].cpu()
    verify = data.test.x[:256].cpu()
    table = []
    for name, row in rows.items():
        model = row["model"]
        test = evaluate(model, data.test)
        figures = compare_models(
            dense.cpu(), model.cpu(), example, out / "onnx" / name.split()[0], verify_inputs=verify, repeats=100
        )
        sparse = export_onnx(
            model.cpu(),
            out / "onnx" / f"{name.split()[0]}_sparse.onnx",
            example,
            verify_inputs=verify,
            sparse_initializers=True,
        )
        model.to(device)
        dense.to(device)
        table.append(
            {
                "method": name,
                "test_error": test["error"],
                "val_error": row["val"]["error"],
                "params": figures["pruned"]["parameters"],
                "nonzero": figures["pruned"]["nonzero_parameters"],
                "removed": 1 - figures["pruned"]["nonzero_parameters"] / figures["dense"]["parameters"],
                "onnx_bytes": figures["pruned"]["onnx_bytes"],
                "onnx_bytes_sparse": sparse.onnx_bytes,
                "onnx_ratio": figures["ratio_pruned_to_dense"]["onnx_bytes"],
                "latency1_s": figures["pruned"]["latency_s"]["1"],
                "latency256_s": figures["pruned"]["latency_s"]["256"],
                "speedup1": 1 / figures["ratio_pruned_to_dense"]["latency_s@1"],
                "speedup256": 1 / figures["ratio_pruned_to_dense"]["latency_s@256"],
                "seconds": row["seconds"],
            }
        )
    print(
        f"\nLeNet-5 on MNIST; {device}, {machine_line(device)}; "
        f"fine-tuning budget {ft_epochs} epoch(s) for each method; total {time.perf_counter() - started:.0f} s"
    )
    head = (
        f"{'method':<13}{'test err':>9}{'removed':>9}{'params':>9}{'nonzero':>9}{'ONNX B':>10}{'sparse B':>10}"
        f"{'ONNX x':>8}{'lat@1 ms':>9}{'x@1':>6}{'lat@256':>9}{'x@256':>7}{'prune s':>9}"
    )
    print(head)
    for r in table:
        print(
            f"{r['method']:<13}{r['test_error']:>9.4%}{r['removed']:>9.2%}{r['params']:>9}{r['nonzero']:>9}"
            f"{r['onnx_bytes']:>10}{r['onnx_bytes_sparse']:>10}{r['onnx_ratio']:>8.3f}{r['latency1_s'] * 1e3:>9.3f}"
            f"{r['speedup1']:>6.2f}{r['latency256_s'] * 1e3:>9.2f}{r['speedup256']:>7.2f}{r['seconds']:>9.0f}"
        )
    ours, unpruned = table[1], table[0]
    checks = {
        ">= 90% of weights removed": ours["removed"] >= 0.90,
        "test error <= unpruned + 0.1 points": ours["test_error"] <= unpruned["test_error"] + 0.001,
        "ONNX <= 1/5 of dense": ours["onnx_ratio"] <= 0.2,
        "batch-1 latency >= 2x better": ours["speedup1"] >= 2.0,
    }
    for name, held in checks.items():
        print(f"target {name}: {'held' if held else 'NOT met'}")
    best = min(table[1:], key=lambda r: r["test_error"])
    print(f"lowest test error at this sparsity: {best['method']}")
    (out / "results.json").write_text(
        json.dumps(
            {"table": table, "checks": checks, "wald_rounds": wald.rounds, "fine_tune_epochs": ft_epochs}, indent=2
        )
    )


def _biases(model: torch.nn.Module) -> int:
    return sum(
        m.bias.numel()
        for m in model.modules()
        if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)) and m.bias is not None
    )


if __name__ == "__main__":
    main()
