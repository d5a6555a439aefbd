"""Prune a user's own model through the command line, as a new user would (issue 11's targets).

For each seed: train the small CNN of ``benchmarks/user_cnn.py`` with plain PyTorch (Adam, the
user's choice, not anrat's trainer) on raw Fashion-MNIST pixels in [0, 1], on 50,000 training
images; keep the other 10,000 as a held-out validation tensor file. Then run, each as a separate
process exactly as a user types it,

- ``python -m pruning prune --factory user_cnn:build --weights my.pt --val-data val.pt`` with every
  other option at its default (the "default" run),
- the same with ``--structured-only``, and
- the same with ``--target-speedup 2`` (issue 23: prune until the ONNX model is twice as fast at
  batch 1, whatever it costs).

Measured side by side in one run, per seed, against the dense model (the baseline):

- whether the dense test error the command reports equals an independent evaluation of the
  original model on the inputs it was trained on (exactly);
- the fraction of weights removed, the test error of the pruned model (PyTorch and the exported
  ONNX file, on raw pixels) and its change against the dense model;
- onnxruntime latency of the dense and the pruned ONNX files at batch 1 and 256, timed in
  alternation (``pruning.export.paired_latency``), as speed-ups dense / pruned;
- the wall-clock seconds of each command.

Medians and ranges over the seeds, and the targets, are printed at the end; per-seed records go
to ``OUT/seed<k>.json`` as they finish, so an interrupted run resumes where it stopped.

    python benchmarks/prune_user_model.py --data-dir ../shared/data/fashion-mnist --seeds 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from anrat.data import load_dataset
from anrat.machine import machine_line
from pruning.export import paired_latency

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from user_cnn import build  # noqa: E402  (the user's module, beside this script)
from user_training import fit_plain  # noqa: E402

TARGETS = {
    "removed_default": 0.80,
    "delta_default_points": 0.3,
    "speedup_structured_b1": 2.0,
    "delta_structured_points": 0.5,
    "speedup_target_b1": 2.0,
    "delta_target_points": 0.5,
    "seconds_default": 600,
}


RUNS = {"default": [], "structured": ["--structured-only"], "speedup2": ["--target-speedup", "2"]}


def train_user_model(data_dir: str, seed: int, epochs: int, folder: Path) -> dict:
    """The user's own training: Adam, batch 128, raw pixels; returns the dense test error."""
    data = load_dataset("fashion_mnist", data_dir, val_size=10_000, seed=seed, input_norm="none")
    torch.manual_seed(seed)
    model = build()
    optimizer = torch.optim.Adam(model.parameters(), 1e-3)
    start = time.perf_counter()
    fit_plain(model, data.train, optimizer, epochs, seed)
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), folder / "my.pt")
    torch.save({"x": data.val.x, "y": data.val.y}, folder / "val.pt")
    with torch.no_grad():
        error = float((model(data.test.x).argmax(1) != data.test.y).double().mean())
    return {"dense_test_error": error, "train_seconds": time.perf_counter() - start}


def run_prune(data_dir: str, folder: Path, name: str, extra: list[str]) -> dict:
    out = folder / name
    command = [
        sys.executable,
        "-m",
        "pruning",
        "prune",
        "--factory",
        "user_cnn:build",
        "--weights",
        str(folder / "my.pt"),
        "--dataset",
        "fashion_mnist",
        "--data-dir",
        data_dir,
        "--val-data",
        str(folder / "val.pt"),
        "--out",
        str(out),
        *extra,
    ]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(HERE), os.environ.get("PYTHONPATH")]))}
    start = time.perf_counter()
    proc = subprocess.run(command, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed ({proc.returncode}): {proc.stderr[-2000:]}")
    report = json.loads((out / "report.json").read_text())
    return {"report": report, "seconds": seconds, "command": " ".join(command[1:]), "out": out}


def onnx_test_error(path: Path, x: torch.Tensor, y: torch.Tensor) -> float:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    logits = np.concatenate([session.run(None, {"input": x[i : i + 1000].numpy()})[0] for i in range(0, len(x), 1000)])
    return float((logits.argmax(1) != y.numpy()).mean())


def one_seed(args: argparse.Namespace, seed: int) -> dict:
    folder = Path(args.out) / f"seed{seed}"
    record = {"seed": seed, **train_user_model(args.data_dir, seed, args.epochs, folder)}
    test = load_dataset("fashion_mnist", args.data_dir, val_size=0, input_norm="none").test
    for name, extra in RUNS.items():
        if name not in args.runs:
            continue
        run = run_prune(args.data_dir, folder, name, extra)
        report, onnx_dir = run["report"], run["out"] / "onnx"
        latency = {
            b: paired_latency(
                {"dense": onnx_dir / "dense.onnx", "pruned": onnx_dir / "pruned.onnx"},
                b,
                repeats=args.latency_repeats,
                warmup=20,
                threads=1,
            )
            for b in (1, 256)
        }
        record[name] = {
            "command": run["command"],
            "seconds": run["seconds"],
            "prune_seconds": report["seconds"],
            "reported_dense_error": report["test_before"]["error"],
            "reported_equals_independent": report["test_before"]["error"] == record["dense_test_error"],
            "removed": report["fraction_removed"],
            "params_after": report["params_after"],
            "nonzero_after": report["nonzero_after"],
            "params_before": report["params_before"],
            "test_error": report["test_after"]["error"],
            "onnx_test_error": onnx_test_error(run["out"] / "model.onnx", test.x, test.y),
            "delta_points": 100 * (report["test_after"]["error"] - record["dense_test_error"]),
            "speedup": {str(b): t["dense"] / t["pruned"] for b, t in latency.items()},
            "command_speedup": report["deployment"]["by_batch_size"],
            "summary": report["deployment"]["summary"],
            "rounds": len(report["rounds"]),
            "kept_rounds": sum(1 for r in report["rounds"] if "params" in r and not r.get("rolled_back")),
        }
    return record


def summarise(records: list[dict]) -> str:
    def stat(values: list[float], fmt: str) -> str:
        return f"{format(statistics.median(values), fmt)} [{format(min(values), fmt)}, {format(max(values), fmt)}]"

    names = [n for n in RUNS if all(n in r for r in records)]
    header = {"default": "default", "structured": "--structured-only", "speedup2": "--target-speedup 2"}
    lines = [
        f"{len(records)} seeds: median [min, max]",
        "",
        "| | " + " | ".join(header[n] for n in names) + " |",
        "| --- |" + " --- |" * len(names),
    ]
    rows = [
        ("weights removed", "removed", ".1%"),
        ("test error change (points)", "delta_points", "+.2f"),
        ("pruned test error", "test_error", ".2%"),
        ("ONNX test error (raw pixels)", "onnx_test_error", ".2%"),
        ("onnxruntime speed-up, batch 1", ("speedup", "1"), ".2f"),
        ("onnxruntime speed-up, batch 256", ("speedup", "256"), ".2f"),
        ("command wall-clock (s)", "seconds", ".0f"),
    ]
    for label, key, fmt in rows:
        cells = []
        for name in names:
            values = [r[name][key[0]][key[1]] if isinstance(key, tuple) else r[name][key] for r in records]
            cells.append(stat(values, fmt))
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    dense = [r["dense_test_error"] for r in records]
    lines += [
        "",
        f"dense test error: {stat(dense, '.2%')}",
        "reported dense error equals the independent evaluation: "
        f"{sum(r[n]['reported_equals_independent'] for r in records for n in names)} of "
        f"{len(names) * len(records)} runs",
    ]
    med = lambda name, key: statistics.median(  # noqa: E731
        [r[name][key[0]][key[1]] if isinstance(key, tuple) else r[name][key] for r in records]
    )
    checks = {}
    if "default" in names:
        checks[f"default removes >= {TARGETS['removed_default']:.0%}"] = (
            med("default", "removed") >= TARGETS["removed_default"]
        )
        checks[f"default costs <= +{TARGETS['delta_default_points']} points"] = (
            med("default", "delta_points") <= TARGETS["delta_default_points"]
        )
        checks[f"default prune finishes in <= {TARGETS['seconds_default']} s"] = (
            med("default", "seconds") <= TARGETS["seconds_default"]
        )
    if "structured" in names:
        checks[f"--structured-only speed-up at batch 1 >= {TARGETS['speedup_structured_b1']}x"] = (
            med("structured", ("speedup", "1")) >= TARGETS["speedup_structured_b1"]
        )
        checks[f"--structured-only costs <= +{TARGETS['delta_structured_points']} points"] = (
            med("structured", "delta_points") <= TARGETS["delta_structured_points"]
        )
    if "speedup2" in names:
        checks[f"--target-speedup 2 reaches >= {TARGETS['speedup_target_b1']}x at batch 1"] = (
            med("speedup2", ("speedup", "1")) >= TARGETS["speedup_target_b1"]
        )
        checks[f"--target-speedup 2 costs <= +{TARGETS['delta_target_points']} points"] = (
            med("speedup2", "delta_points") <= TARGETS["delta_target_points"]
        )
    lines += ["", "targets (on the medians):"] + [f"- {k}: {'met' if ok else 'NOT met'}" for k, ok in checks.items()]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data-dir", required=True, help="folder with the Fashion-MNIST IDX files")
    ap.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 (model initialisation, batches, split)")
    ap.add_argument("--only-seed", type=int, default=None, help="run this seed alone (e.g. in a second process)")
    ap.add_argument("--epochs", type=int, default=6, help="the user's training epochs")
    ap.add_argument("--latency-repeats", type=int, default=300, help="alternating onnxruntime calls per model")
    ap.add_argument("--out", default="runs/bench_prune_user_model", help="output folder")
    ap.add_argument(
        "--runs", nargs="+", choices=list(RUNS), default=list(RUNS), help="which commands to run (default: all)"
    )
    args = ap.parse_args()
    records = []
    for seed in range(args.seeds) if args.only_seed is None else [args.only_seed]:
        path = Path(args.out) / f"seed{seed}.json"
        if path.exists():
            records.append(json.loads(path.read_text()))
            continue
        record = one_seed(args, seed)
        path.write_text(json.dumps(record, indent=1))
        records.append(record)
        runs = "; ".join(
            f"{name} removed {record[name]['removed']:.1%}, {record[name]['delta_points']:+.2f} points, "
            f"{record[name]['seconds']:.0f} s, batch-1 speed-up {record[name]['speedup']['1']:.2f}"
            for name in RUNS
            if name in record
        )
        print(f"seed {seed}: dense {record['dense_test_error']:.2%}; {runs}", flush=True)
    machine = machine_line(onnxruntime=ort.__version__)
    print(f"\nmachine: {machine}\n" + summarise(records))


if __name__ == "__main__":
    main()
