"""Prune a trained network and export it: ``python -m pruning`` (``anrat-prune``).

Subcommands:

``prune``
    Takes a checkpoint of our trainer (``--checkpoint model.pt``) or any model from a factory
    (``--factory package.module:function --weights state_dict.pt``), and a dataset (MNIST or
    Fashion-MNIST, as for training). Tests every connection's significance, prunes, fine-tunes,
    and writes to ``--out``: ``pruned.pt`` (loads with ``weights_only=True`` and rebuilds the
    smaller network), ``model.onnx`` (verified against PyTorch), ``report.json``.

``export``
    Turns any checkpoint (trainer or pruned) into a verified ONNX file.

Weights files are read with ``torch.load(weights_only=True)``: a file holding pickled code is
refused. Bad input exits with status 2 and one line.
"""

from __future__ import annotations

import argparse
import copy
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from anrat.checkpoint import load_checkpoint, model_from_checkpoint
from anrat.data import DATASETS, load_dataset, resolve_device
from anrat.errors import InputError
from anrat.train import OneLineErrorParser
from anrat.trainer import evaluate
from pruning.export import compare_models, export_onnx
from pruning.masks import count_nonzero, count_total
from pruning.prune import FineTune, prune
from pruning.pruned_checkpoint import import_factory, load_pruned, save_pruned
from pruning.significance import ESTIMATORS


def load_model(args: argparse.Namespace) -> tuple[nn.Module, dict[str, Any]]:
    """The model to prune, and how to describe it in the pruned checkpoint."""
    if bool(args.checkpoint) == bool(args.factory):
        raise InputError("give either --checkpoint (a model.pt of anrat-train) or --factory with --weights")
    if args.checkpoint:
        ckpt = load_checkpoint(args.checkpoint)
        return model_from_checkpoint(ckpt), {"arch": ckpt["arch"]}
    if not args.weights:
        raise InputError("--factory needs --weights, a state_dict saved with torch.save")
    try:
        factory_kwargs = json.loads(args.factory_kwargs) if args.factory_kwargs else {}
    except json.JSONDecodeError as exc:
        raise InputError(f"--factory-kwargs is not valid JSON: {exc}") from None
    if not isinstance(factory_kwargs, dict):
        raise InputError(f"--factory-kwargs must be a JSON object, got {args.factory_kwargs!r}")
    model = import_factory(args.factory)(**factory_kwargs)
    weights = load_checkpoint(args.weights)
    state = weights.get("state_dict", weights) if isinstance(weights, dict) else weights
    try:
        model.load_state_dict(state)
    except (RuntimeError, TypeError, AttributeError) as exc:
        raise InputError(f"weights in {args.weights!r} do not fit the model of {args.factory!r}: "
                         f"{str(exc).splitlines()[0]}") from None
    return model, {"factory": args.factory, "factory_kwargs": factory_kwargs}


def check_fits(model: nn.Module, x: torch.Tensor, dataset: str) -> None:
    """One forward pass, so that a model/data mismatch is one clear line and not a deep traceback."""
    model.eval()
    try:
        with torch.no_grad():
            out = model(x[:2])
    except RuntimeError as exc:
        raise InputError(f"the model does not accept {dataset} inputs of shape {tuple(x.shape[1:])}: "
                         f"{str(exc).splitlines()[0]}") from None
    if out.dim() != 2:
        raise InputError(f"the model's output has shape {tuple(out.shape)}; expected (batch, classes)")


def cmd_prune(args: argparse.Namespace) -> dict[str, Any]:
    if not 0 < args.alpha < 1:
        raise InputError(f"--alpha must be in (0, 1), got {args.alpha}")
    device = resolve_device(args.device)
    model, description = load_model(args)
    data = load_dataset(args.dataset, args.data_dir, val_size=args.val_size, seed=args.seed, device=device,
                        train_subset=args.train_subset, test_subset=args.test_subset)
    if data.val is None:
        raise InputError("pruning needs a validation split (--val-size > 0) for its rollback rule")
    model.to(device)
    check_fits(model, data.train.x, args.dataset)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    dense = copy.deepcopy(model)
    test_before = evaluate(model, data.test)
    rounds_log = out / "rounds.jsonl"
    rounds_log.write_text("")

    def log(record: dict[str, Any]) -> None:
        with rounds_log.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if not args.quiet:
            print(json.dumps(record), file=sys.stderr)

    start = time.perf_counter()
    result = prune(model, data.train, data.val, alpha=args.alpha, method=args.method, estimator=args.estimator,
                   max_samples=args.max_samples, structured=not args.no_structured,
                   unstructured=not args.no_unstructured,
                   fine_tune_config=FineTune(epochs=args.fine_tune_epochs, lr=args.fine_tune_lr, seed=args.seed),
                   tolerance=args.tolerance, max_rounds=args.max_rounds, step=args.step,
                   progress=not args.quiet and sys.stderr.isatty(), log=log)
    test_after = evaluate(result.model, data.test)
    pruned = result.model.cpu()
    dense.cpu()
    metrics = {"test_before": test_before, "test_after": test_after, "val_before": result.base_val,
               "val_after": result.final_val}
    save_pruned(pruned, out / "pruned.pt", metrics=metrics, arch=description.get("arch"),
                factory=description.get("factory"), factory_kwargs=description.get("factory_kwargs"))
    verify = data.test.x[:256].cpu()
    sizes = compare_models(dense, pruned, verify[:2], out / "onnx", verify_inputs=verify)
    shutil.copyfile(out / "onnx" / "pruned.onnx", out / "model.onnx")  # exported and verified just above
    report = {"params_before": result.params_before, "params_after": result.params_after,
              "nonzero_after": result.nonzero_after,
              "fraction_removed": 1 - result.nonzero_after / result.params_before,
              **metrics, "rounds": result.rounds, "onnx": sizes, "seconds": time.perf_counter() - start,
              "options": {k: v for k, v in vars(args).items() if k != "func"}}
    (out / "report.json").write_text(json.dumps(report, indent=2))
    print(f"removed {report['fraction_removed']:.1%} of {result.params_before} weights; test error "
          f"{test_before['error']:.4%} -> {test_after['error']:.4%}; ONNX {sizes['dense']['onnx_bytes']} -> "
          f"{sizes['pruned']['onnx_bytes']} bytes; wrote {out / 'pruned.pt'}, {out / 'model.onnx'}, {out / 'report.json'}")
    return report


def cmd_export(args: argparse.Namespace) -> dict[str, Any]:
    model = load_pruned(args.checkpoint, allow_factories=args.allow_factory or ())
    shape = tuple(int(v) for v in args.input_shape.split(","))
    if args.data_dir:
        verify = load_dataset(args.dataset, args.data_dir, val_size=0, test_subset=256).test.x
        source = f"{args.dataset} test images"
    else:
        verify = torch.randn(256, *shape, generator=torch.Generator().manual_seed(0))
        source = "standard-normal inputs (give --data-dir to verify on real images)"
    check_fits(model, verify, source)
    report = export_onnx(model, args.out, verify[:2], verify_inputs=verify)
    print(f"wrote {args.out} ({report.onnx_bytes} bytes, {count_nonzero(model)}/{count_total(model)} nonzero "
          f"parameters); checked with onnx.checker and onnxruntime on {source}: max |diff| "
          f"{max(report.max_abs_diff.values()):.2e}")
    return {"bytes": report.onnx_bytes}


def build_parser() -> argparse.ArgumentParser:
    ap = OneLineErrorParser(prog="anrat-prune", description=__doc__.split("\n\n")[0],
                            formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True, parser_class=OneLineErrorParser)
    p = sub.add_parser("prune", help="test significance, prune, fine-tune, export",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.set_defaults(func=cmd_prune)
    g = p.add_argument_group("model (one of)")
    g.add_argument("--checkpoint", help="model.pt written by anrat-train")
    g.add_argument("--factory", help="'package.module:function' that builds the (unpruned) model")
    g.add_argument("--factory-kwargs", help="JSON keyword arguments for --factory, e.g. '{\"width\": 64}'")
    g.add_argument("--weights", help="state_dict for --factory (torch.save; loaded with weights_only=True)")
    g = p.add_argument_group("data")
    g.add_argument("--dataset", choices=DATASETS, default="mnist", help="dataset the model was trained on")
    g.add_argument("--data-dir", default=None, help="folder with the four IDX files; default $ANRAT_DATA_DIR")
    g.add_argument("--val-size", type=int, default=10_000, help="training images held out for validation")
    g.add_argument("--train-subset", type=int, default=None, help="use the first N remaining training images")
    g.add_argument("--test-subset", type=int, default=None, help="use the first N test images")
    g = p.add_argument_group("statistics")
    g.add_argument("--alpha", type=float, default=0.05, help="level of the tests, in (0, 1)")
    g.add_argument("--method", default="holm", help="statsmodels multipletests method: holm, bonferroni, fdr_bh, ...")
    g.add_argument("--estimator", choices=ESTIMATORS, default="kfac", help="standard errors from the Fisher information")
    g.add_argument("--max-samples", type=int, default=10_000, help="training samples the Fisher is estimated on")
    g = p.add_argument_group("pruning")
    g.add_argument("--no-structured", action="store_true", help="do not remove whole units")
    g.add_argument("--no-unstructured", action="store_true", help="do not remove individual weights")
    g.add_argument("--step", type=float, default=0.5, help="largest fraction of remaining weights removed per round")
    g.add_argument("--max-rounds", type=int, default=10, help="test/prune/fine-tune rounds at most")
    g.add_argument("--tolerance", type=float, default=0.001,
                   help="largest allowed rise of validation error over the unpruned model (0.001 = 0.1 points)")
    g.add_argument("--fine-tune-epochs", type=int, default=1, help="fine-tuning epochs per round")
    g.add_argument("--fine-tune-lr", type=float, default=0.05, help="fine-tuning learning rate (SGD)")
    g = p.add_argument_group("run")
    g.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    g.add_argument("--seed", type=int, default=0, help="seed of the validation split and fine-tuning")
    g.add_argument("--out", default="runs/prune", help="output folder")
    g.add_argument("--quiet", action="store_true", help="no per-round log on stderr, no progress bars")
    e = sub.add_parser("export", help="turn a checkpoint into a verified ONNX file",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    e.set_defaults(func=cmd_export)
    e.add_argument("checkpoint", help="model.pt of anrat-train or pruned.pt of anrat-prune")
    e.add_argument("--out", default="model.onnx", help="ONNX file to write")
    e.add_argument("--input-shape", default="1,28,28", help="shape of one input, without the batch dimension")
    e.add_argument("--dataset", choices=DATASETS, default="mnist", help="dataset for verification inputs")
    e.add_argument("--data-dir", default=None, help="verify on this dataset's test images (else random inputs)")
    e.add_argument("--allow-factory", action="append", default=[],
                   help="trust this 'package.module:function' to rebuild a factory checkpoint (it runs code)")
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args.func(args)
    except InputError as exc:
        return parser.report(exc, prog=f"{parser.prog} {args.command}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
