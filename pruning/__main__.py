"""Prune a trained network and export it: ``python -m pruning`` (``anrat-prune``).

Subcommands:

``prune``
    Takes a checkpoint of our trainer (``--checkpoint model.pt``) or any model from a factory
    (``--factory package.module:function --weights state_dict.pt``), and data: a named dataset
    (MNIST or Fashion-MNIST IDX files) and/or the user's own files (``--train-data``,
    ``--val-data``, ``--test-data``: a tensor file or an image folder). Tests every connection's
    significance, prunes, fine-tunes, and writes to ``--out``: ``pruned.pt`` (loads with
    ``weights_only=True`` and rebuilds the smaller network), ``model.onnx`` (verified against
    PyTorch), ``report.json``, ``rounds.jsonl``.

``test``
    The same model and data options; runs the Wald tests alone and writes ``summary.md`` (a
    statsmodels-style summary per layer and unit) and ``removable.pt`` (``{parameter name: bool
    mask}``, True for the weights a held-out deletion test shows can go at once,
    :mod:`pruning.removable`).

``export``
    Turns any checkpoint (trainer or pruned) or a plain state_dict with its factory into a
    verified ONNX file; ``--include-preprocessing`` makes the graph take [0, 1] pixels.

**The input contract.** Inputs reach the model exactly as it was trained to take them: images are
read as ``pixel / 255`` in [0, 1], then normalised by ``--input-norm`` (``none``, ``dataset``,
``MEAN,STD``, or per channel ``M1,M2,M3:S1,S2,S3``). The default is the normalisation recorded in
our checkpoints, and ``none`` for a model from a factory. The normalisation in force goes into
``report.json``, ``pruned.pt`` and the ONNX file's ``metadata_props``.

Weights files are read with ``torch.load(weights_only=True)``: a file holding pickled code is
refused. Bad input exits with status 2 and one line.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from collections.abc import Sequence
from dataclasses import asdict
from typing import Any

import torch

from anrat.atomic_files import check_output_file, make_output_folder, write_text_atomic
from anrat.checkpoint import save_atomic
from anrat.cli import (
    OneLineErrorParser,
    add_data_dir_option,
    add_device_option,
    add_out_option,
    add_seed_option,
    run_command,
)
from anrat.config import add_config_arguments, flag, resolve_from_args
from anrat.data import DATASETS, Split, load_dataset
from anrat.data_files import IMAGE_MODES, load_data_file
from anrat.devices import resolve_device
from anrat.errors import InputError
from anrat.input_norm import InputNorm, with_preprocessing
from anrat.interrupts import report_position
from anrat.run_lock import lock_output_folder
from anrat.trainer import evaluate
from pruning.export import export_onnx
from pruning.loading import (
    DEFAULT_VAL_SIZE,
    DataSource,
    LoadedData,
    LoadedModel,
    ModelSource,
    check_fits,
    load_model,
    load_model_and_data,
    resolve_input_norm,
    split_defaults,
)
from pruning.masks import count_nonzero, count_total
from pruning.pipeline import ExportOptions, ReportOptions, check_int8_labels, prune_save_export
from pruning.prune import PruneConfig, paired_line, round_line, validation_warning
from pruning.quantize import QUANTIZE_CHOICES, write_int8
from pruning.removable import removable_set
from pruning.significance import COVARIANCES, ESTIMATORS


def model_source(args: argparse.Namespace, allow_factories: bool = False) -> ModelSource:
    """The model the flags name (``allow_factories``: ``--allow-factory`` counts, for export)."""
    allowed = (args.allow_factory or ()) if allow_factories else ()
    return ModelSource(args.checkpoint, args.factory, args.factory_kwargs, args.weights, allowed)


def data_source(args: argparse.Namespace) -> DataSource:
    """The data the flags name, for ``prune`` and ``test``."""
    return DataSource(
        dataset=args.dataset,
        data_dir=args.data_dir,
        train_data=args.train_data,
        val_data=args.val_data,
        test_data=args.test_data,
        val_size=args.val_size,
        seed=args.seed,
        train_subset=args.train_subset,
        test_subset=args.test_subset,
        image_mode=args.image_mode,
        input_norm=args.input_norm,
    )


def load_inputs(args: argparse.Namespace, device: torch.device) -> LoadedData:
    """:func:`pruning.loading.load_model_and_data` of the flags; prints its normalisation warning."""
    inputs = load_model_and_data(model_source(args), data_source(args), device)
    if inputs.norm.warning:
        print(inputs.norm.warning, file=sys.stderr)
    return inputs


def prune_config(args: argparse.Namespace) -> PruneConfig:
    """The pruning options: :class:`PruneConfig` defaults < ``--config`` < flags < ``--set``,
    checked before anything is read or written."""
    config = resolve_from_args(PruneConfig(), args, extra=[("fine_tune.seed", args.seed)])
    config.validate()
    return config


def export_options(args: argparse.Namespace) -> ExportOptions:
    """``--quantize``, ``--calibration-images``, ``--quantize-tolerance``, checked."""
    options = ExportOptions(args.quantize, args.calibration_images, args.quantize_tolerance)
    options.validate()
    return options


def _int8_status(int8: dict[str, Any] | None) -> int:
    """Print the int8 verdict; 1 if the int8 model asked for was not written (the float files stand)."""
    if int8 is None:
        return 0
    print(int8["line"], file=sys.stdout if int8["written"] else sys.stderr)
    return 0 if int8["written"] else 1


def warn_if_not_held_out(args: argparse.Namespace, inputs: LoadedData, consequence: str) -> None:
    """One line when the validation images may be ones the model was trained on."""
    if not inputs.held_out_by_training and not args.val_data and not args.quiet:
        print(
            f"warning: validation data is {inputs.data.sources['val']}: if the model was trained on them, "
            f"{consequence}; give held-out images the model never saw with --val-data",
            file=sys.stderr,
        )


def cmd_prune(args: argparse.Namespace) -> int:
    config = prune_config(args)
    export = export_options(args)
    device = resolve_device(args.device)
    inputs = load_inputs(args, device)
    loaded, model, data = inputs.loaded, inputs.loaded.model, inputs.data
    norm, norm_origin = inputs.norm.norm, inputs.norm.origin
    config.target.validate_for(model)
    check_int8_labels(export, data.val, data.sources["val"])
    warn_if_not_held_out(args, inputs, "pruning cannot be judged there")
    out = make_output_folder(args.out)
    lock_output_folder(out)  # one run per folder, before anything is written

    def log(record: dict[str, Any]) -> None:
        if not args.quiet:
            print(round_line(record), file=sys.stderr, flush=True)

    if not args.quiet:
        print(
            f"pruning {count_total(model):,} parameters of {loaded.source}; input normalisation: {norm.describe()} "
            f"({norm_origin})",
            file=sys.stderr,
            flush=True,
        )
    test_before = evaluate(model, data.test)
    if not args.quiet:
        print(f"test error before pruning: {test_before['error']:.2%}", file=sys.stderr, flush=True)
        val_before = evaluate(model, data.val)
        warning = validation_warning(val_before["error"], len(data.val), test_before["error"], "the test images")
        if warning:
            print(warning, file=sys.stderr, flush=True)
    # 200 alternating calls: with 50, the batch-1 speed-up of one model moved between 0.93x and 1.46x
    done = prune_save_export(
        model,
        data,
        config,
        out,
        description=loaded.description,
        input_norm=norm,
        test_before=test_before,
        report=ReportOptions(latency_repeats=200),
        export=export,
        progress=not args.quiet and sys.stderr.isatty(),
        log=log,
    )
    result, sizes = done.result, done.comparison
    report = {
        "params_before": result.params_before,
        "params_after": result.params_after,
        "nonzero_after": result.nonzero_after,
        "fraction_removed": 1 - result.nonzero_after / result.params_before,
        "test_before": done.test_before,
        "test_after": done.test_after,
        "val_before": result.base_val,
        "val_after": result.final_val,
        "acceptance": result.acceptance,
        "final_recovery": result.final_recovery,
        "warning": result.warning,
        "onnx_test_error": done.onnx_test_error,
        "input_norm": {**norm.as_dict(), "origin": norm_origin},
        "data": data.sources,
        "deployment": sizes["speedup"],
        "rounds": result.rounds,
        "onnx": sizes,
        "int8": done.int8,
        "seconds": done.seconds["prune"],
        "config": asdict(config),
        "options": {k: v for k, v in vars(args).items() if k != "func"},
    }
    # Written at the end, like the report: a refused or failed run leaves a folder's earlier files whole.
    write_text_atomic(out / "rounds.jsonl", "".join(json.dumps(r) + "\n" for r in result.rounds))
    write_text_atomic(out / "report.json", json.dumps(report, indent=2))
    print(
        f"removed {report['fraction_removed']:.1%} of {result.params_before:,} weights "
        f"({result.params_after:,} parameters left after unit removal); test error "
        f"{done.test_before['error']:.2%} -> {done.test_after['error']:.2%}; ONNX {sizes['dense']['onnx_bytes']:,} -> "
        f"{sizes['pruned']['onnx_bytes']:,} bytes; {sizes['speedup']['summary']}"
    )
    if result.acceptance is not None:
        print(f"on validation the pruned model is {paired_line(result.acceptance)}")
    print(
        f"input normalisation: {norm.describe()}; wrote {out / 'pruned.pt'}, {out / 'model.onnx'}, "
        f"{out / 'report.json'}"
    )
    return _int8_status(done.int8)


def cmd_test(args: argparse.Namespace) -> int:
    """Test every weight and unit; print and write the summary and the removable masks."""
    config = prune_config(args)
    device = resolve_device(args.device)
    inputs = load_inputs(args, device)
    model = inputs.loaded.model.eval()
    warn_if_not_held_out(args, inputs, "the deletion test is optimistic there")
    out = make_output_folder(args.out)
    lock_output_folder(out)  # one run per folder, before anything is written
    result = config.significance(model, inputs.data.train, progress=not args.quiet and sys.stderr.isatty())
    tested = copy.deepcopy(model)
    result.center_layers(tested)  # the masks refer to the weights as tested
    weights = {name: p.detach().cpu() for name, p in tested.named_parameters()}
    singly = result.removable()
    total, insignificant = sum(m.numel() for m in singly.values()), sum(int(m.sum()) for m in singly.values())
    # what can go at once: the held-out deletion test over the sets the tests' |z| order gives
    at_once = removable_set(
        tested, result.scores(), inputs.data.val, margin=config.tolerance, alpha=config.acceptance_alpha
    )
    blind = (
        "; on a network that fits its training data the likelihood is flat around the fit, so these tests see "
        "(almost) nothing (docs/pruning.md)"
        if insignificant >= 0.99 * total
        else ""
    )
    lines = [
        f"not significant one by one at alpha = {config.alpha:g}: {insignificant:,} of {total:,} weights "
        f"({insignificant / max(1, total):.1%}){blind}",
        f"{at_once.line()}, on {inputs.data.sources['val']}",
    ]
    text = (
        f"# Significance of {inputs.loaded.source}\n\nFisher estimated on {inputs.data.sources['train']}.\n\n"
        + result.summary(weights, units=None)
        + "\n"
        + "\n\n".join(lines)
        + "\n\n| weights removed at once | difference [95% upper bound], points | worse / better |\n"
        + "| --- | --- | --- |\n"
        + "".join(
            f"| {t['fraction']:.0%} | {100 * t['estimate']:+.2f} [{100 * t['upper']:+.2f}] | "
            f"{t['worse']} / {t['better']} |\n"
            for t in at_once.tests
        )
    )
    save_atomic({name: mask.cpu() for name, mask in at_once.masks.items()}, out / "removable.pt")
    write_text_atomic(out / "summary.md", text)
    print(result.summary(weights, units=args.units), end="")
    print("\n".join(lines))
    print(f"wrote {out / 'removable.pt'} (the set that can go at once) and {out / 'summary.md'}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    check_output_file(args.out, "--out")
    export = export_options(args)
    loaded = load_model(model_source(args, allow_factories=True))
    model = loaded.model.eval()
    resolved = resolve_input_norm(args.input_norm, loaded, args.dataset)
    if resolved.warning:
        print(resolved.warning, file=sys.stderr)
    norm, norm_origin = resolved.norm, resolved.origin
    # The verification inputs are what the exported graph takes: raw pixels when it normalises itself.
    feed_norm = InputNorm.none() if args.include_preprocessing else norm
    if args.test_data:
        verify = feed_norm.apply(load_data_file(args.test_data, "--test-data", args.image_mode).split.x[:256])
        source = f"inputs from {args.test_data}"
    elif args.data_dir:
        # the first 256 test images (or all, when the set is smaller)
        verify = load_dataset(args.dataset or "mnist", args.data_dir, val_size=0, input_norm=feed_norm).test.x[:256]
        source = f"{args.dataset or 'mnist'} test images"
    else:
        try:
            shape = tuple(int(v) for v in args.input_shape.split(","))
        except ValueError:
            shape = ()
        if not shape or min(shape) < 1:
            raise InputError(f"--input-shape must be positive integers such as 1,28,28, got {args.input_shape!r}")
        verify = torch.rand(256, *shape, generator=torch.Generator().manual_seed(0))
        source = "uniform [0, 1] inputs (give --data-dir or --test-data to verify on real images)"
        if not args.include_preprocessing:
            verify = norm.apply(verify)
    exported = with_preprocessing(model, norm) if args.include_preprocessing else model
    check_fits(exported, verify, source)
    data = None
    if export.quantize != "none":  # read and checked before anything is written
        data = _quantize_data(args, loaded, feed_norm)
        check_fits(exported, data[0].x[:2], f"calibration inputs from {data[2]}")
        check_int8_labels(export, data[0], data[2])
    report_position(
        lambda: (f"while writing {args.out}", f"{args.out} is the earlier file or none; run the same command")
    )
    report = export_onnx(
        exported,
        args.out,
        verify[:2],
        verify_inputs=verify,
        metadata=norm.onnx_metadata(in_graph=args.include_preprocessing),
    )
    feed = (
        f"x = pixel / 255 in [0, 1] (normalisation in the graph: {norm.describe()})"
        if args.include_preprocessing and not norm.is_identity
        else norm.describe()
    )
    print(
        f"wrote {args.out} ({report.onnx_bytes:,} bytes, {count_nonzero(model):,}/{count_total(model):,} nonzero "
        f"parameters); checked with onnx.checker and onnxruntime on {source}: max |diff| "
        f"{max(report.max_abs_diff.values()):.2e}; input: {feed} ({norm_origin})"
    )
    if data is None:
        return 0
    val, test, source = data
    int8_path = _int8_path(args.out)
    report_position(lambda: (f"while writing {int8_path}", f"{args.out} was written, {int8_path} was not"))
    calibration = val.x[: export.calibration_images]
    int8 = write_int8(args.out, int8_path, calibration, val, test, tolerance=export.quantize_tolerance)
    tested = (
        f"; test error {int8['error']['test']['float']:.2%} float, {int8['error']['test']['int8']:.2%} int8"
        if "test" in int8["error"]
        else ""
    )
    print(
        f"int8: {int8['bytes']['int8']:,} bytes ({int8['bytes_ratio']:.1f}x smaller); calibrated on "
        f"{int8['quantization']['calibration_inputs']} inputs of {source}{tested}"
    )
    return _int8_status(int8)


def _int8_path(out: str) -> str:
    """``model.onnx`` -> ``model.int8.onnx``, beside it."""
    return out[: -len(".onnx")] + ".int8.onnx" if out.endswith(".onnx") else out + ".int8.onnx"


def _quantize_data(args: argparse.Namespace, loaded: LoadedModel, norm: InputNorm) -> tuple[Split, Split | None, str]:
    """Labelled validation data (calibration, the tolerance check), test data if any, and where
    the validation data came from, for ``export --quantize``, fed as the exported graph takes them."""
    if not (args.val_data or args.data_dir):
        raise InputError(
            "--quantize needs labelled validation data to calibrate on and to check the int8 model: "
            "give --val-data FILE (held-out images) or --data-dir (the dataset's held-out training images)"
        )
    dataset = args.dataset or loaded.run_config.get("dataset") or "mnist"
    named = None
    if args.data_dir:  # the images a training of ours held out, else 10,000 chosen by seed 0
        val_size, seed, _ = split_defaults(loaded, dataset)
        named = load_dataset(dataset, args.data_dir, val_size=val_size, seed=seed, input_norm=norm)
    if args.val_data:
        split = load_data_file(args.val_data, "--val-data", args.image_mode).split
        val, source = Split(norm.apply(split.x), split.y), args.val_data
    else:
        val, source = named.val, f"{len(named.val):,} held-out {dataset} training images"
    if args.test_data:
        split = load_data_file(args.test_data, "--test-data", args.image_mode).split
        test = Split(norm.apply(split.x), split.y)
    else:
        test = named.test if named is not None else None
    return val, test, source


def _add_model_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model from a factory (instead of a checkpoint)")
    g.add_argument(
        "--factory", help="'package.module:function' that builds the (unpruned) model; naming it here trusts its code"
    )
    g.add_argument("--factory-kwargs", help="JSON keyword arguments for --factory, e.g. '{\"width\": 64}'")
    g.add_argument("--weights", help="state_dict for --factory (torch.save; loaded with weights_only=True)")


def _add_input_norm_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--input-norm",
        default=None,
        metavar="NORM",
        help="normalisation the model expects on [0, 1] pixels: none, dataset (its training-set mean "
        "and std), MEAN,STD, or per channel M1,M2,M3:S1,S2,S3. Default: recorded in our "
        "checkpoints; none for --factory models (inputs used as given)",
    )


def _add_quantize_options(p: argparse.ArgumentParser, where: str) -> None:
    g = p.add_argument_group("int8 model (onnxruntime static quantisation)")
    g.add_argument(
        "--quantize",
        choices=QUANTIZE_CHOICES,
        default="none",
        help=f"int8: also write an int8 copy ({where}), calibrated on validation inputs; if its validation "
        "error rises more than --quantize-tolerance, it is not written and the command exits 1",
    )
    g.add_argument(
        "--quantize-tolerance",
        type=float,
        default=ExportOptions.quantize_tolerance,
        help="largest rise of validation error the int8 model may add (a fraction: 0.001 = 0.1 point)",
    )
    g.add_argument(
        "--calibration-images",
        type=int,
        default=ExportOptions.calibration_images,
        help="validation inputs the int8 activation ranges are calibrated on",
    )


def _add_data_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group(
        "data (a named dataset, and/or files: a tensor file .pt with 'x' and 'y', or an image "
        "folder root/<class>/<image>)"
    )
    g.add_argument(
        "--dataset",
        choices=DATASETS,
        default=None,
        help="dataset for the splits no file gives; default: the checkpoint's, else mnist",
    )
    add_data_dir_option(g)
    g.add_argument("--train-data", default=None, help="training data (Fisher information, fine-tuning)")
    g.add_argument(
        "--val-data",
        default=None,
        help="held-out validation data for the rollback rule and fine-tuning selection; never the test "
        "data. Default: --val-size samples held out of the training data",
    )
    g.add_argument("--test-data", default=None, help="test data, evaluated before and after pruning")
    g.add_argument(
        "--image-mode",
        choices=IMAGE_MODES,
        default=None,
        help="convert image-folder images to this mode; default: grey stays grey, else RGB",
    )
    _add_input_norm_option(g)
    g.add_argument(
        "--val-size",
        type=int,
        default=None,
        help="without --val-data: training samples held out for validation; default: the images "
        f"anrat-train held out for a checkpoint of ours, else {DEFAULT_VAL_SIZE}",
    )
    g.add_argument("--train-subset", type=int, default=None, help="use the first N remaining training images")
    g.add_argument("--test-subset", type=int, default=None, help="use the first N test images")


def _add_statistics_options(p: argparse.ArgumentParser, d: PruneConfig) -> None:
    g = p.add_argument_group("statistics")
    flag(g, "--alpha", key="alpha", defaults=d, type=float, help="level of the tests, in (0, 1)")
    flag(
        g, "--method", key="method", defaults=d, help="statsmodels multipletests method: holm, bonferroni, fdr_bh, ..."
    )
    flag(
        g,
        "--estimator",
        key="estimator",
        defaults=d,
        choices=ESTIMATORS,
        help="standard errors from the Fisher information",
    )
    flag(
        g, "--max-samples", key="max_samples", defaults=d, type=int, help="training samples the Fisher is estimated on"
    )
    flag(
        g,
        "--covariance",
        key="covariance",
        defaults=d,
        choices=COVARIANCES,
        help="fisher (maximum likelihood) or sandwich (robust; for NRAE-trained models, with --tilt; "
        "needs --estimator full or diagonal)",
    )
    flag(
        g,
        "--tilt",
        key="tilt",
        defaults=d,
        type=float,
        help="t = lambda^p of the NRAE trained (with --covariance sandwich)",
    )


def build_parser() -> argparse.ArgumentParser:
    ap = OneLineErrorParser(
        prog="anrat-prune", description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    sub = ap.add_subparsers(dest="command", required=True, parser_class=OneLineErrorParser)
    p = sub.add_parser(
        "prune",
        help="test significance, prune, fine-tune, export",
        description="Test significance, prune, fine-tune, export. "
        + __doc__.split("\n\n")[5].replace("``", "").replace("**", ""),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.set_defaults(func=cmd_prune)
    p.add_argument("--checkpoint", help="model.pt written by anrat-train")
    _add_model_options(p)
    d = PruneConfig()
    _add_data_options(p)
    _add_statistics_options(p, d)
    g = p.add_argument_group("pruning (pruning.prune.PruneConfig; --config and --set reach every option)")
    flag(
        g,
        "--structured-only",
        "--no-unstructured",
        key="unstructured",
        action="store_const",
        const=False,
        help="remove whole units only (unit tests): layers shrink, so the ONNX model gets smaller and "
        "faster; individual zeroed weights bring no speed-up in onnxruntime",
    )
    flag(g, "--no-structured", key="structured", action="store_const", const=False, help="do not remove whole units")
    flag(
        g,
        "--channel-multiple",
        key="channel_multiple",
        defaults=d,
        type=int,
        help="a convolution is left with a multiple of this many filters, rounded to the nearest "
        "(onnxruntime's CPU convolutions work in blocks of 8 or 16 channels; other widths ran no "
        "faster than the unpruned layer); 1: off",
    )
    flag(
        g,
        "--final-channel-multiple",
        key="final_channel_multiple",
        defaults=d,
        type=int,
        help="after the last kept round, narrow each convolution to a multiple of this many filters "
        "(rounded down, weakest filters first), then the final recovery; undone if the acceptance "
        "test then fails; 1: off",
    )
    flag(
        g, "--step", key="step", defaults=d, type=float, help="largest fraction of remaining weights removed per round"
    )
    flag(g, "--max-rounds", key="max_rounds", defaults=d, type=int, help="test/prune/fine-tune rounds at most")
    flag(
        g,
        "--tolerance",
        key="tolerance",
        defaults=d,
        type=float,
        help="the margin: the largest rise of validation error you accept (0.001 = 0.1 points); a round is kept "
        "when a paired non-inferiority test shows its rise below it, in (0, 1)",
    )
    flag(
        g,
        "--acceptance-alpha",
        key="acceptance_alpha",
        defaults=d,
        type=float,
        help="level of that test: a round truly costing the margin or more is kept at most this often, in (0, 1)",
    )
    flag(
        g,
        "--target-params",
        key="target.params",
        type=float,
        help="prune until at most N nonzero weights (an integer) or this fraction of them (in (0, 1)) remain, "
        "whatever it costs; the cost is reported with its confidence bound",
    )
    flag(
        g,
        "--target-speedup",
        key="target.speedup",
        type=float,
        help="prune until model.onnx runs this many times faster than the unpruned model in onnxruntime at "
        "batch 1 (> 1, measured each round), whatever it costs",
    )
    flag(g, "--fine-tune-epochs", key="fine_tune.epochs", defaults=d, type=int, help="fine-tuning epochs per round")
    flag(g, "--fine-tune-lr", key="fine_tune.lr", defaults=d, type=float, help="fine-tuning learning rate")
    flag(
        g,
        "--distill",
        key="fine_tune.distill",
        defaults=d,
        type=float,
        help="weight in [0, 1] of distillation from the unpruned model in each recovery (0: off)",
    )
    flag(
        g,
        "--distill-temperature",
        key="fine_tune.temperature",
        defaults=d,
        type=float,
        help="temperature (> 0) of the distillation's soft targets",
    )
    flag(
        g,
        "--final-epochs",
        key="fine_tune.final_epochs",
        defaults=d,
        type=int,
        help="recovery epochs after the last kept round",
    )
    flag(
        g,
        "--fine-tune-optimizer",
        key="fine_tune.optimizer",
        defaults=d,
        help="torch.optim class name for fine-tuning (adam, sgd, adamw, ...)",
    )
    add_config_arguments(g, "fine_tune.batch_size=128")
    g = p.add_argument_group("run")
    add_device_option(g)
    add_seed_option(g, of="fine-tuning and of the validation split")
    _add_quantize_options(p, "model.int8.onnx beside model.onnx")
    add_out_option(g, default="runs/prune")
    g.add_argument("--quiet", action="store_true", help="no per-round lines on stderr, no progress bars")

    t = sub.add_parser(
        "test",
        help="test every weight's and unit's significance; write removable.pt and summary.md",
        description="Wald tests of every weight and unit, a statsmodels-style summary per layer, and "
        "OUT/removable.pt: {parameter name: bool mask}, True for the weights that can go at once: the largest "
        "of nested sets (ordered by the tests' |z|) that a paired test on the validation images shows to raise "
        "the error by less than --tolerance at --acceptance-alpha (loads with torch.load(weights_only=True)).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    t.set_defaults(func=cmd_test)
    t.add_argument("--checkpoint", help="model.pt written by anrat-train, or pruned.pt")
    _add_model_options(t)
    _add_data_options(t)
    _add_statistics_options(t, d)
    flag(
        t,
        "--tolerance",
        key="tolerance",
        defaults=d,
        type=float,
        help="the removable set raises held-out error by less than this (0.002 = 0.2 points), in (0, 1)",
    )
    flag(
        t,
        "--acceptance-alpha",
        key="acceptance_alpha",
        defaults=d,
        type=float,
        help="level of the held-out deletion test, in (0, 1)",
    )
    add_config_arguments(t, "max_samples=5000")
    g = t.add_argument_group("run")
    add_device_option(g)
    add_seed_option(g, of="the validation split")
    g.add_argument("--units", type=int, default=10, help="units per layer printed (summary.md lists all)")
    add_out_option(g, default="runs/test")
    g.add_argument("--quiet", action="store_true", help="no progress bars")

    e = sub.add_parser(
        "export",
        help="turn a checkpoint or a state_dict into a verified ONNX file",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    e.set_defaults(func=cmd_export)
    e.add_argument("checkpoint", nargs="?", help="model.pt of anrat-train or pruned.pt of anrat-prune")
    _add_model_options(e)
    add_out_option(e, default="model.onnx", what="ONNX file")
    _add_input_norm_option(e)
    e.add_argument(
        "--include-preprocessing",
        action="store_true",
        help="put the input normalisation into the graph, so the ONNX model takes pixel / 255 in [0, 1]",
    )
    e.add_argument(
        "--input-shape",
        default="1,28,28",
        help="shape of one input, without the batch dimension (for verification inputs when no data is given)",
    )
    e.add_argument("--dataset", choices=DATASETS, default=None, help="dataset for verification inputs (default mnist)")
    add_data_dir_option(e, use="verify on its test images (else on random inputs)")
    e.add_argument("--test-data", default=None, help="verify on inputs from this tensor file or image folder")
    e.add_argument("--image-mode", choices=IMAGE_MODES, default=None, help="mode for --test-data image folders")
    e.add_argument(
        "--val-data",
        default=None,
        help="--quantize: held-out labelled data to calibrate on and check the int8 model with (else the "
        "--data-dir dataset's held-out training images)",
    )
    _add_quantize_options(e, "OUT with .int8.onnx for .onnx")
    e.add_argument(
        "--allow-factory",
        action="append",
        default=[],
        help="trust this 'package.module:function' to rebuild a factory checkpoint (it runs code)",
    )
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    def body(args: argparse.Namespace) -> int:
        return args.func(args)

    return run_command(build_parser(), body, argv, prog=lambda args: f"anrat-prune {args.command}")


if __name__ == "__main__":
    sys.exit(main())
