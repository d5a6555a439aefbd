"""The measurements behind two defaults of ``python -m pruning prune`` (docs/results/user-model.md, issue 11).

``--fine-tune``: on the user CNN of ``benchmarks/user_cnn.py`` trained with seed 100 (a seed the
benchmark ``prune_user_model.py`` never reports), remove 80% of the weights in one shot by Wald
score (``pruning.prune.prune_to_sparsity``) and fine-tune one epoch with each candidate optimizer;
print the validation error of each (the test set is not touched).

``--unit-tests``: the Wald unit tests of that model (the command's defaults: KFAC, Holm at 0.05,
10,000 training images) as its first pruning round sees them: per layer, how many units are
jointly insignificant and the sorted p-values (which filters the tests let the command remove).

``--widths``: onnxruntime latency of that CNN with other conv widths and hidden sizes against the
dense layout (16, 32 filters), one thread, dense and variants timed in alternation
(``pruning.export.paired_latency``); the speed-up is dense latency / variant latency.

    python benchmarks/prune_user_model_choices.py --data-dir ../shared/data/fashion-mnist --fine-tune --widths
    python benchmarks/prune_user_model_choices.py --data-dir ../shared/data/fashion-mnist --unit-tests
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
from pathlib import Path

import torch

from anrat.data import load_dataset
from anrat.trainer import evaluate
from pruning.export import export_onnx, paired_latency
from pruning.prune import FineTune, prune_to_sparsity
from pruning.significance import wald_test

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from prune_user_model import train_user_model  # noqa: E402
from user_cnn import build  # noqa: E402

SELECTION_SEED = 100
# as issue 11 measured them: a constant rate, no distillation, no final recovery
FINE_TUNES = {
    "no fine-tuning": FineTune.constant_rate(epochs=0),
    "SGD lr 0.05 (the earlier default)": FineTune.constant_rate(epochs=1, lr=0.05, optimizer="sgd"),
    "Adam lr 1e-3": FineTune.constant_rate(epochs=1, lr=1e-3, optimizer="adam"),
    "Adam lr 3e-4": FineTune.constant_rate(epochs=1, lr=3e-4, optimizer="adam"),
}
WIDTHS = [((16, 32), 128), ((16, 32), 15), ((16, 24), 15), ((16, 16), 15), ((8, 24), 15), ((8, 16), 15), ((15, 17), 15)]


def fine_tune_choice(data_dir: str, out: Path) -> None:
    folder = out / f"seed{SELECTION_SEED}"
    if not (folder / "my.pt").exists():
        train_user_model(data_dir, SELECTION_SEED, 6, folder)
    data = load_dataset("fashion_mnist", data_dir, val_size=10_000, seed=SELECTION_SEED, input_norm="none")
    dense = build()
    dense.load_state_dict(torch.load(folder / "my.pt", weights_only=True))
    print(f"seed {SELECTION_SEED}: dense validation error {evaluate(dense, data.val)['error']:.2%}")
    for name, ft in FINE_TUNES.items():
        result = prune_to_sparsity(
            copy.deepcopy(dense), data.train, data.val, criterion="wald", fraction_removed=0.8, fine_tune_config=ft
        )
        print(f"  80% removed by Wald score, {name}: validation error {result.final_val['error']:.2%}", flush=True)


def unit_tests(data_dir: str, out: Path) -> None:
    folder = out / f"seed{SELECTION_SEED}"
    if not (folder / "my.pt").exists():
        train_user_model(data_dir, SELECTION_SEED, 6, folder)
    data = load_dataset("fashion_mnist", data_dir, val_size=10_000, seed=SELECTION_SEED, input_norm="none")
    model = build()
    model.load_state_dict(torch.load(folder / "my.pt", weights_only=True))
    test = wald_test(model, data.train, max_samples=10_000)
    redundant = test.redundant_units()
    for layer, pvalues in test.unit_pvalues.items():
        count = int(redundant[layer].numel()) if layer in redundant else 0
        ordered = ", ".join(f"{p:.2g}" for p in pvalues.sort().values.tolist())
        print(f"layer {layer}: {count} of {pvalues.numel()} units jointly insignificant; p-values {ordered}")


def widths(repeats: int) -> None:
    x = torch.rand(4, 1, 28, 28)
    with tempfile.TemporaryDirectory() as tmp:
        paths = {}
        for channels, hidden in WIDTHS:
            name = f"conv {channels[0]}, {channels[1]}; hidden {hidden}"
            paths[name] = Path(tmp) / f"{channels[0]}_{channels[1]}_{hidden}.onnx"
            export_onnx(build(channels=channels, hidden=hidden).eval(), paths[name], x)
        dense = next(iter(paths))
        for batch in (1, 256):
            latency = paired_latency(
                paths, batch, repeats=repeats if batch == 1 else repeats // 5, warmup=20, threads=1
            )
            print(
                f"batch {batch}, one thread: "
                + "; ".join(f"{name}: {1e3 * t:.3f} ms, {latency[dense] / t:.2f}x" for name, t in latency.items()),
                flush=True,
            )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data-dir", required=True, help="folder with the Fashion-MNIST IDX files")
    ap.add_argument("--fine-tune", action="store_true", help="compare fine-tuning optimizers on validation data")
    ap.add_argument("--widths", action="store_true", help="time conv widths in onnxruntime")
    ap.add_argument("--unit-tests", action="store_true", help="print the seed-100 model's unit tests")
    ap.add_argument("--repeats", type=int, default=300, help="alternating onnxruntime calls per model at batch 1")
    ap.add_argument("--out", default="runs/bench_prune_choices", help="folder for the seed-100 model")
    args = ap.parse_args()
    if args.fine_tune:
        fine_tune_choice(args.data_dir, Path(args.out))
    if args.unit_tests:
        unit_tests(args.data_dir, Path(args.out))
    if args.widths:
        widths(args.repeats)


if __name__ == "__main__":
    main()
