"""How good can issue 11's CNN be at the widths a 2x speed-up needs? Trained from scratch, the user's way.

``--target-speedup 2`` on the CNN of ``benchmarks/user_cnn.py`` needs its first convolution at 4-8
filters (``lenet5_width_latency.py --user-cnn --threads 1``). This trains the CNN at given widths
(conv1, conv2, hidden) from scratch exactly as ``prune_user_model.py`` trains the unpruned one
(Adam 1e-3, batch 128, 6 epochs, raw Fashion-MNIST pixels, 10,000 training images held out by the
seed) and prints validation and test error per width, median [min, max] over the seeds, beside the
unpruned widths (16, 32, 128), the baseline. Per-run records go to ``OUT/<widths>_seed<k>.json``,
so an interrupted run resumes.

    python benchmarks/user_cnn_from_scratch.py --data-dir ../shared/data/fashion-mnist --seeds 3 \\
        --widths 16,32,128 8,16,32 4,16,32 4,8,16
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from anrat.atomic_files import write_text_atomic
from anrat.data import load_dataset
from anrat.machine import machine_line

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from user_cnn import build  # noqa: E402  (issue 11's CNN, beside this script)
from user_training import fit_plain  # noqa: E402


def one_run(data_dir: str, widths: tuple[int, int, int], seed: int, epochs: int) -> dict:
    data = load_dataset("fashion_mnist", data_dir, val_size=10_000, seed=seed, input_norm="none")
    torch.manual_seed(seed)
    model = build(widths[:2], widths[2])
    start = time.perf_counter()
    fit_plain(model, data.train, torch.optim.Adam(model.parameters(), 1e-3), epochs, seed)
    with torch.no_grad():
        errors = {
            name: float((model(split.x).argmax(1) != split.y).double().mean())
            for name, split in (("val", data.val), ("test", data.test))
        }
    return {"widths": list(widths), "seed": seed, **errors, "seconds": time.perf_counter() - start}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data-dir", required=True, help="folder with the Fashion-MNIST IDX files")
    ap.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 (initialisation, batches, split)")
    ap.add_argument("--only-seed", type=int, default=None, help="run this seed alone (e.g. in a second process)")
    ap.add_argument("--epochs", type=int, default=6, help="the user's training epochs")
    ap.add_argument("--widths", nargs="+", default=["16,32,128", "8,16,32", "4,16,32", "4,8,16"])
    ap.add_argument("--out", default="runs/bench_user_cnn_from_scratch", help="output folder")
    args = ap.parse_args()
    shapes = [tuple(int(v) for v in w.split(",")) for w in args.widths]
    seeds = range(args.seeds) if args.only_seed is None else [args.only_seed]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    print(machine_line(), flush=True)
    records: dict[tuple, list[dict]] = {}
    for seed in seeds:
        for widths in shapes:
            path = out / f"{'-'.join(map(str, widths))}_seed{seed}.json"
            if not path.exists():
                write_text_atomic(path, json.dumps(one_run(args.data_dir, widths, seed, args.epochs)))
            record = json.loads(path.read_text())
            records.setdefault(widths, []).append(record)
            print(f"{widths} seed {seed}: validation {record['val']:.2%}, test {record['test']:.2%}", flush=True)

    def stat(values: list[float]) -> str:
        return f"{statistics.median(values):.2%} [{min(values):.2%}, {max(values):.2%}]"

    base = records.get(shapes[0], [])
    print(f"\nmedian [min, max] over seeds {list(seeds)}; the first widths are the baseline")
    for widths, runs in records.items():
        line = f"{widths}: validation {stat([r['val'] for r in runs])}, test {stat([r['test'] for r in runs])}"
        if base and widths != shapes[0]:
            diff = [100 * (r["test"] - b["test"]) for r, b in zip(runs, base)]
            spread = f"{statistics.median(diff):+.2f} points [{min(diff):+.2f}, {max(diff):+.2f}]"
            line += f"; test error vs {shapes[0]}: {spread}"
        print(line)


if __name__ == "__main__":
    main()
