"""The pruning frontier: test error against nonzero weights and onnxruntime latency, per ranking.

Does significance rank what to remove better than magnitude? Every ranking takes the same trained
model through the same rounds with the same recovery (:class:`pruning.FineTune` defaults, one
epoch a round): at each round the ``--step`` share of the nonzero weights and of each layer's
units with the lowest rank goes, the network recovers, and the round is kept whatever it costs
(``PruneConfig.target`` at ``--down-to`` of the weights, so no acceptance test intervenes). After
every round the point is measured: nonzero weights, validation and test error, and the batch-1
onnxruntime latency against the unpruned model's (:func:`pruning.export.paired_latency`, timed in
alternation). The test set only scores the points; nothing is chosen on it.

Rankings (``PruneConfig.ranking``): ``wald`` (the KFAC Wald tests' p-values, units by their
joint tests), ``magnitude`` (|w|, units by L1), ``taylor`` (first-order Taylor, Molchanov et al.
2019) and ``obd`` (Optimal Brain Damage, diagonal Fisher on ``--obd-samples`` images).

Models:

- ``lenet5``: the main job's trained LeNet-5 (``--lenet5 OUT/train/model.pt ...``, one per seed;
  ``python -m anrat.recipes.mnist_prune --seed K`` writes them), judged on the validation images its
  training held out;
- ``user_cnn``: issue 11's raw-pixel CNN on Fashion-MNIST (``benchmarks/user_cnn.py``; ``--cnn
  DIR ...`` with the ``my.pt`` and ``val.pt`` that ``benchmarks/prune_user_model.py`` writes per
  seed).

    python benchmarks/prune_frontier.py --data-dir ../shared/data/mnist \\
        --lenet5 runs/main_s0/train/model.pt runs/main_s1/train/model.pt runs/main_s2/train/model.pt \\
        --out runs/prune_frontier

Writes ``OUT/points.json`` (every point, resumable per model, seed and ranking) and
``OUT/frontier.png``, and prints per ranking the median over seeds of the test error at each round.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

from anrat.checkpoint import load_checkpoint, model_from_checkpoint
from anrat.data import Split, load_dataset
from anrat.trainer import evaluate
from pruning import PruneConfig, Target, prune
from pruning.export import export_onnx, paired_latency
from pruning.prune import RANKINGS, count_nonzero_weights
from pruning.removable import removable_set
from pruning.significance import wald_test

HERE = Path(__file__).resolve().parent


def lenet5_case(path: str, data_dir: str | None) -> dict:
    ckpt = load_checkpoint(path)
    run = ckpt["run_config"]
    data = load_dataset(run["dataset"], data_dir, val_size=run["val_size"], seed=run["train"]["seed"])
    return {"model": model_from_checkpoint(ckpt), "train": data.train, "val": data.val, "test": data.test}


def cnn_case(folder: str, data_dir: str | None) -> dict:
    sys.path.insert(0, str(HERE))
    from user_cnn import build  # the user's module, beside this script

    model = build()
    model.load_state_dict(torch.load(Path(folder) / "my.pt", weights_only=True))
    val = torch.load(Path(folder) / "val.pt", weights_only=True)
    seed = int(Path(folder).name.removeprefix("seed"))
    data = load_dataset("fashion_mnist", data_dir, val_size=10_000, seed=seed, input_norm="none")
    return {"model": model, "train": data.train, "val": Split(val["x"], val["y"]), "test": data.test}


def laplace_removable(model: torch.nn.Module, train: Split, args: argparse.Namespace) -> dict:
    """A candidate not adopted: a Laplace posterior per weight, the diagonal Fisher of the
    training images plus a Gaussian prior whose precision is 1 / (mean square of the layer's
    weights) (the simplest empirical-Bayes choice; the main job's training had no weight decay on
    most layers to take it from): posterior sd_j = (n F_jj + tau)^(-1/2), removable where
    |w_j| / sd_j < 1.96 (posterior mean within two posterior sds of 0)."""
    result = wald_test(model, train, estimator="diagonal", max_samples=args.max_samples)
    params = dict(model.named_parameters())
    removable = {}
    for name, se in result.se.items():
        w = params[name].detach().double().cpu()
        tau = w.numel() / float(w.square().sum())
        sd = (1.0 / (1.0 / se.double().square() + tau)).sqrt()  # se^-2 = n (F_jj + damping)
        removable[name] = (w.abs() / sd) < 1.96
    return removable


def calibration(case: dict, args: argparse.Namespace) -> dict:
    """Issue 24's calibration: each test's removable set removed at once, without fine-tuning;
    the fraction of the weights removed and the test error change (the test images played no part
    in training or selection). Tests: the Wald tests one by one (KFAC, Holm at 0.05: the weights
    not significant), a Laplace posterior one by one (:func:`laplace_removable`) and the held-out
    deletion test of ``pruning test`` (on the validation images,
    margin 0.2 points at 0.05, sets in the Wald tests' |z| order)."""
    model = case["model"].eval()
    result = wald_test(model, case["train"], max_samples=args.max_samples)
    tested = copy.deepcopy(model)
    result.center_layers(tested)
    base = evaluate(tested, case["test"])["error"]
    sets = {
        "wald, one by one": result.removable(),
        "laplace, one by one": laplace_removable(tested, case["train"], args),
        "deletion test": removable_set(tested, result.scores(), case["val"]).masks,
    }
    rows = {}
    for name, masks in sets.items():
        pruned = copy.deepcopy(tested)
        with torch.no_grad():
            for param, mask in masks.items():
                dict(pruned.named_parameters())[param].mul_(~mask)
        total = sum(m.numel() for m in masks.values())
        rows[name] = {
            "fraction": sum(int(m.sum()) for m in masks.values()) / total,
            "test_before": base,
            "test_after": evaluate(pruned, case["test"])["error"],
        }
        rows[name]["delta_points"] = 100 * (rows[name]["test_after"] - base)
    return rows


def frontier(case: dict, ranking: str, args: argparse.Namespace, scratch: Path) -> list[dict]:
    """The points of one ranking on one model: the unpruned model, then one per round."""
    dense = case["model"].eval()
    example = case["train"].x[:2]
    export_onnx(copy.deepcopy(dense), scratch / "dense.onnx", example)
    weights = count_nonzero_weights(dense)

    def point(round_: int, model: torch.nn.Module, seconds: float) -> dict:
        export_onnx(copy.deepcopy(model).eval(), scratch / "point.onnx", example)
        times = paired_latency(
            {"dense": scratch / "dense.onnx", "pruned": scratch / "point.onnx"},
            1,
            repeats=args.repeats,
            warmup=20,
            threads=1,  # one onnxruntime thread: steadier on a shared machine, as prune_user_model.py
        )
        return {
            "round": round_,
            "nonzero_weights": count_nonzero_weights(model),
            "compression": weights / max(1, count_nonzero_weights(model)),
            "val_error": evaluate(model, case["val"])["error"],
            "test_error": evaluate(model, case["test"])["error"],
            "speedup_batch1": times["dense"] / times["pruned"],
            "seconds": seconds,
        }

    points = [point(0, dense, 0.0)]
    started = time.perf_counter()
    config = PruneConfig(
        ranking=ranking,
        step=args.step,
        max_rounds=args.rounds,
        max_samples=args.obd_samples if ranking == "obd" else args.max_samples,
        channel_multiple=1,
        target=Target(params=args.down_to),
        fine_tune=replace(PruneConfig().fine_tune, final_epochs=0),  # every point: the same per-round recovery
    )
    prune(
        copy.deepcopy(dense),
        case["train"],
        case["val"],
        config,
        inspect=lambda record, model: points.append(point(record["round"], model, time.perf_counter() - started)),
    )
    return points


def _median(runs: list[list[dict]], i: int, key: str) -> float:
    """The median over seeds of point ``i``'s ``key``."""
    return statistics.median(run[i][key] for run in runs)


def plot(points: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = sorted({key.split("/")[0] for key in points})
    fig, axes = plt.subplots(len(models), 2, figsize=(11, 4 * len(models)), squeeze=False)
    for row, model in enumerate(models):
        for ranking_index, ranking in enumerate(RANKINGS):
            runs = [v for k, v in points.items() if k.startswith(f"{model}/") and k.endswith(f"/{ranking}")]
            if not runs:
                continue
            rounds = min(len(r) for r in runs)
            x_w = [_median(runs, i, "compression") for i in range(rounds)]
            x_s = [_median(runs, i, "speedup_batch1") for i in range(rounds)]
            y = [100 * _median(runs, i, "test_error") for i in range(rounds)]
            color = f"C{ranking_index}"
            axes[row][0].plot(x_w, y, "o-", color=color, label=ranking)
            axes[row][1].plot(x_s, y, "o-", color=color, label=ranking)
        axes[row][0].set_xscale("log")
        axes[row][0].set_xlabel("fewer nonzero weights (x, log scale)")
        axes[row][1].set_xlabel("onnxruntime speed-up at batch 1 (x)")
        for ax in axes[row]:
            ax.set_ylabel(f"{model}: test error (%)")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
    fig.suptitle(f"Pruning frontier: median over seeds, same recovery for every ranking ({len(points)} runs)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data-dir", default=None, help="MNIST folder (LeNet-5) or Fashion-MNIST folder (CNN)")
    ap.add_argument("--lenet5", nargs="*", default=[], help="the main job's OUT/train/model.pt, one per seed")
    ap.add_argument("--cnn", nargs="*", default=[], help="prune_user_model.py's OUT/seed<k> folders")
    ap.add_argument("--rankings", nargs="+", default=list(RANKINGS), choices=RANKINGS)
    ap.add_argument("--step", type=float, default=0.3, help="share of weights and units removed per round")
    ap.add_argument("--rounds", type=int, default=10, help="rounds at most")
    ap.add_argument("--down-to", type=float, default=0.01, help="stop at this fraction of the weights")
    ap.add_argument("--max-samples", type=int, default=2000, help="images for the Wald tests and Taylor")
    ap.add_argument("--obd-samples", type=int, default=256, help="images for OBD's per-sample diagonal Fisher")
    ap.add_argument("--repeats", type=int, default=200, help="alternating onnxruntime calls per point")
    ap.add_argument("--out", default="runs/prune_frontier")
    ap.add_argument(
        "--calibration",
        action="store_true",
        help="instead of the frontier: each test's removable set removed at once, no fine-tuning (issue 24)",
    )
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    store = out / "points.json"
    points = json.loads(store.read_text()) if store.exists() else {}
    cases = [("lenet5", i, p, lenet5_case) for i, p in enumerate(args.lenet5)]
    cases += [("user_cnn", i, p, cnn_case) for i, p in enumerate(args.cnn)]
    if args.calibration:
        run_calibration(cases, args, out)
        return
    with tempfile.TemporaryDirectory() as scratch:
        # every seed of a ranking before the next ranking: an interrupted run still compares the first ones
        for ranking in args.rankings:
            for model_name, seed, source, load in cases:
                key = f"{model_name}/{seed}/{ranking}"
                if key in points:
                    continue
                case = load(source, args.data_dir)
                points[key] = frontier(case, ranking, args, Path(scratch))
                store.write_text(json.dumps(points, indent=1))
                last = points[key][-1]
                print(
                    f"{key}: {len(points[key]) - 1} rounds, {last['compression']:.1f}x fewer weights, "
                    f"{last['speedup_batch1']:.2f}x faster, test error {points[key][0]['test_error']:.2%} -> "
                    f"{last['test_error']:.2%}, {last['seconds']:.0f} s",
                    flush=True,
                )
    plot(points, out / "frontier.png")
    for model_name in sorted({k.split("/")[0] for k in points}):
        print(f"\n{model_name}: median test error (%) [fewer weights x, speed-up x] by round")
        for ranking in RANKINGS:
            runs = [v for k, v in points.items() if k.startswith(f"{model_name}/") and k.endswith(f"/{ranking}")]
            if not runs:
                continue
            rounds = min(len(r) for r in runs)
            cells = []
            for i in range(rounds):
                error, fewer, faster = (_median(runs, i, k) for k in ("test_error", "compression", "speedup_batch1"))
                cells.append(f"{100 * error:.2f} [{fewer:.1f}, {faster:.2f}]")
            print(f"  {ranking:9s} " + " | ".join(cells))
        print_verdicts(points, model_name)
    print(f"\nwrote {store} and {out / 'frontier.png'}")


def run_calibration(cases: list, args: argparse.Namespace, out: Path) -> None:
    store = out / "calibration.json"
    rows = json.loads(store.read_text()) if store.exists() else {}
    for model_name, seed, source, load in cases:
        key = f"{model_name}/{seed}"
        if key not in rows:
            rows[key] = calibration(load(source, args.data_dir), args)
            store.write_text(json.dumps(rows, indent=1))
        for test, r in rows[key].items():
            print(
                f"{key} {test}: {r['fraction']:.1%} of the weights removable, test error {r['test_before']:.2%} -> "
                f"{r['test_after']:.2%} ({r['delta_points']:+.2f} points) removed at once",
                flush=True,
            )
    for model_name in sorted({k.split("/")[0] for k in rows}):
        for test in ("wald, one by one", "laplace, one by one", "deletion test"):
            runs = [r[test] for k, r in rows.items() if k.startswith(f"{model_name}/")]
            fr = [r["fraction"] for r in runs]
            dp = [r["delta_points"] for r in runs]
            print(
                f"{model_name}, {test}: median {statistics.median(fr):.1%} [{min(fr):.1%}, {max(fr):.1%}] removable, "
                f"{statistics.median(dp):+.2f} points [{min(dp):+.2f}, {max(dp):+.2f}] removed at once"
            )
    print(f"wrote {store}")


def print_verdicts(points: dict, model_name: str) -> None:
    """The declared verdict rule (docs/results/pruning-frontier.md): at rounds 3 to 8 that both rankings reached, the
    median over seeds of the paired test-error difference (wald - other, same seed and round);
    wald ranks better if it is negative at more rounds than positive, worse if the reverse."""
    for other in RANKINGS[1:]:
        seeds = sorted({k.split("/")[1] for k in points if k.startswith(f"{model_name}/")})
        pairs = [
            (points[f"{model_name}/{s}/wald"], points[f"{model_name}/{s}/{other}"])
            for s in seeds
            if f"{model_name}/{s}/wald" in points and f"{model_name}/{s}/{other}" in points
        ]
        if not pairs:
            continue
        reached = min(min(len(w), len(o)) for w, o in pairs)
        cells, signs = [], []
        for i in range(3, min(9, reached)):
            diffs = [100 * (w[i]["test_error"] - o[i]["test_error"]) for w, o in pairs]
            median = statistics.median(diffs)
            signs.append((median > 0) - (median < 0))
            cells.append(f"round {i}: {median:+.2f} [{min(diffs):+.2f}, {max(diffs):+.2f}]")
        better, worse = signs.count(-1), signs.count(1)
        verdict = "wald ranks better" if better > worse else "wald ranks worse" if worse > better else "no difference"
        print(f"  wald - {other}: " + "; ".join(cells) + f" -> {verdict}")


if __name__ == "__main__":
    main()
