"""How a pruning round should recover: candidates compared on validation data (issue 23).

Each candidate takes the same trained model (``--checkpoint``, the main job's ``OUT/train/model.pt``)
through the same pruning rounds (Wald ranking, ``--step``, ``--rounds`` rounds kept whatever they
cost) with its own recovery (:class:`pruning.FineTune`), and is scored on the validation images
the checkpoint's training held out: error, and the paired acceptance test against the unpruned
model at ``--margin`` (discordant pairs, estimate and 95% upper bound). The test set is not read.

    python benchmarks/prune_recovery.py --checkpoint runs/mnist_prune/train/model.pt \\
        --data-dir ../shared/data/mnist --out runs/prune_recovery

Candidates (declared here, before any run):

- ``constant``: SGD at 0.05 for one epoch, no momentum, no decay, no distillation (the quick
  preset's recovery before issue 23);
- ``cosine``: SGD with momentum 0.9 from 0.01, annealed to 0 within the round;
- ``cosine_distill``: ``cosine`` plus distillation from the unpruned model (weight 0.5, T = 4);
- ``cosine_distill_lr03``: the same from 0.03;
- ``distill_only``: ``cosine_distill`` with weight 1 (soft targets alone).

Declared after the first five had run (``cosine_distill_lr03`` led), to find the rate and length:

- ``cosine_distill_lr05``: ``cosine_distill`` from 0.05;
- ``cosine_distill_lr03_2ep``: ``cosine_distill_lr03`` for two epochs a round;
- ``cosine_distill_lr05_2ep``: ``cosine_distill_lr05`` for two epochs a round.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from dataclasses import replace
from pathlib import Path

from anrat.checkpoint import load_checkpoint, model_from_checkpoint
from anrat.data import load_dataset
from anrat.devices import resolve_device
from anrat.trainer import evaluate
from pruning import FineTune, PruneConfig, Target, prune

BASE = FineTune(epochs=1, lr=0.01, momentum=0.9, optimizer="sgd", lr_decay="cosine_step", distill=0.0, final_epochs=0)
CANDIDATES = {
    "constant": replace(BASE, lr=0.05, momentum=0.0, lr_decay="none"),
    "cosine": BASE,
    "cosine_distill": replace(BASE, distill=0.5, temperature=4.0),
    "cosine_distill_lr03": replace(BASE, lr=0.03, distill=0.5, temperature=4.0),
    "distill_only": replace(BASE, distill=1.0, temperature=4.0),
    "cosine_distill_lr05": replace(BASE, lr=0.05, distill=0.5, temperature=4.0),
    "cosine_distill_lr03_2ep": replace(BASE, lr=0.03, epochs=2, distill=0.5, temperature=4.0),
    "cosine_distill_lr05_2ep": replace(BASE, lr=0.05, epochs=2, distill=0.5, temperature=4.0),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", required=True, help="a trained model.pt of anrat-train (its held-out images judge)")
    ap.add_argument("--data-dir", default=None, help="MNIST folder (default $ANRAT_DATA_DIR)")
    ap.add_argument("--out", default="runs/prune_recovery", help="output folder")
    ap.add_argument("--candidates", nargs="+", default=list(CANDIDATES), choices=list(CANDIDATES))
    ap.add_argument("--rounds", type=int, default=2, help="pruning rounds, each kept")
    ap.add_argument("--step", type=float, default=0.5, help="fraction removed per round")
    ap.add_argument("--margin", type=float, default=0.001, help="the acceptance test's margin (0.001 = 0.1 points)")
    ap.add_argument("--max-samples", type=int, default=2000, help="images the Fisher is estimated on")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = resolve_device(args.device)
    ckpt = load_checkpoint(args.checkpoint)
    run = ckpt["run_config"]
    data = load_dataset(
        run["dataset"], args.data_dir, val_size=run["val_size"], seed=run["train"]["seed"], device=device
    )
    dense = model_from_checkpoint(ckpt).to(device)
    base = evaluate(dense, data.val)["error"]
    print(f"unpruned validation error {base:.2%} on {len(data.val):,} images")
    rows = {}
    for name in args.candidates:
        config = PruneConfig(
            max_samples=args.max_samples,
            step=args.step,
            max_rounds=args.rounds,
            tolerance=args.margin,
            channel_multiple=1,
            fine_tune=CANDIDATES[name],
            target=Target(params=1),  # never reached: every round is kept
        )
        start = time.perf_counter()
        result = prune(copy.deepcopy(dense), data.train, data.val, config)
        acc = result.acceptance
        rows[name] = {
            "val_error": result.final_val["error"],
            "nonzero": result.nonzero_after,
            "compression": result.params_before / result.nonzero_after,
            "acceptance": acc,
            "seconds": time.perf_counter() - start,
        }
        print(
            f"{name:22s} val {result.final_val['error']:.2%} ({100 * (result.final_val['error'] - base):+.2f} points), "
            f"{result.params_before / result.nonzero_after:.1f}x fewer, discordant {acc['worse']}+{acc['better']}, "
            f"upper bound {100 * acc['upper']:+.2f} points, {rows[name]['seconds']:.0f} s",
            flush=True,
        )
    (out / "recovery.json").write_text(json.dumps({"args": vars(args), "base_val_error": base, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
