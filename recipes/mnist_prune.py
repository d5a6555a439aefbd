"""Train the paper's ConvNet on MNIST with ANRAT, prune it by statistical significance, export a verified ONNX model.

``python -m anrat.recipes.mnist_prune`` runs the whole pipeline of the toolkit in one command and
reports what happened and what it cost:

1. **Train** (:func:`anrat.train.run`): lenet5 (or ``convnet_dropout``) with a lambda schedule
   (ANRAT by default), the best epoch (and, with a grid, the best learning rate and penalty
   weight a) selected on a held-out validation split; the test set is evaluated once, on the
   selected model.
2. **Prune** (:func:`pruning.prune.prune`): Wald tests of every weight and unit, removal of the
   insignificant ones, fine-tuning, round by round with rollback when validation error rises.
3. **Export** (:func:`pruning.export.export_onnx`, :func:`pruning.export.compare_models`): the
   pruned network as one ONNX file, checked by ``onnx.checker`` and against onnxruntime; sizes and
   onnxruntime latencies of the dense and the pruned network side by side.

Options come from a preset (``recipes/configs/<preset>.toml``: ``quick``, the default, or
``paper``) or a ``--config`` file (TOML, or the ``config.json`` of an earlier run), then from the
command-line options, which override it. The resolved options are written to ``OUT/config.json``
before anything runs, so ``--config OUT/config.json`` repeats the run (give another ``--out`` to
keep both; in the same folder the finished training is resumed, not repeated).

Outputs in ``OUT``: ``config.json``; ``train/`` (``model.pt``: the trained checkpoint,
``metrics.jsonl``, ``result.json``, ``last.pt``/``best.pt`` for resuming); ``pruned.pt`` (the pruned
checkpoint, :func:`pruning.pruned_checkpoint.load_pruned`); ``model.onnx`` (the pruned network);
``onnx/dense.onnx`` and ``onnx/pruned.onnx`` (the files timed); ``metrics.json`` (every figure of
the report); ``report.md`` with ``training.png``, ``lambda.png``, ``pruning.png``, ``layers.png``.

The ONNX model takes normalised images, ``x = (pixel / 255 - mean) / std`` with the mean and std
recorded in ``metrics.json`` (``data.input_norm``), in ``pruned.pt`` and in the ONNX file's
``metadata_props``, of shape (N, 1, 28, 28), and returns class scores (N, 10).
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import os
import platform
import sys
import time
import tomllib
import types
import typing
from dataclasses import asdict, dataclass, field, fields, is_dataclass, replace
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import onnxruntime as ort
import torch
from torch import nn

from anrat.atomic_files import write_text_atomic
from anrat.checkpoint import load_checkpoint, model_from_checkpoint
from anrat.data import DataSplits, load_dataset
from anrat.devices import resolve_device
from anrat.errors import InputError
from anrat.schedules import SCHEDULES
from anrat.train import OneLineErrorParser, RunConfig
from anrat.train import run as train_run
from anrat.trainer import TrainingDiverged, evaluate
from pruning.export import compare_models, export_onnx
from pruning.masks import effective_parameters
from pruning.prune import FineTune, PruneResult, prune, round_line
from pruning.pruned_checkpoint import save_pruned
from pruning.surgery import widths_of

PROG = "python -m anrat.recipes.mnist_prune"
PRESETS_DIR = Path(__file__).resolve().parent / "configs"
PRESETS = tuple(sorted(p.stem for p in PRESETS_DIR.glob("*.toml")))
# Keyword arguments of pruning.prune.prune that the recipe itself supplies.
_PRUNE_WIRED = {"fine_tune_config", "kind", "progress", "log"}
FIGURES = {
    "training": "training.png",
    "lambda": "lambda.png",
    "pruning": "pruning.png",
    "layers": "layers.png",
}


@dataclass
class ReportOptions:
    """How the dense and pruned ONNX models are timed and checked (:func:`pruning.export.compare_models`)."""

    latency_repeats: int = 50
    latency_warmup: int = 5
    latency_batch_sizes: list[int] = field(default_factory=lambda: [1, 256])
    latency_threads: int | None = None   # onnxruntime intra-op threads; None: its default
    verify_images: int = 256              # test images the exports are checked on against PyTorch


@dataclass
class RecipeConfig:
    """Everything that defines a run of the recipe; written resolved to ``OUT/config.json``.

    ``prune`` holds keyword arguments of :func:`pruning.prune.prune`; the resolved config lists all
    of them, with that function's defaults for those not given.
    """

    preset: str = "quick"
    out_dir: str = "runs/mnist_prune"
    run: RunConfig = field(default_factory=RunConfig)
    prune: dict[str, Any] = field(default_factory=dict)
    fine_tune: FineTune = field(default_factory=FineTune)
    report: ReportOptions = field(default_factory=ReportOptions)


# --- configuration: preset / file -> dataclasses, command-line overrides ---------------------------
def _prune_defaults() -> dict[str, Any]:
    """The keyword options of :func:`pruning.prune.prune` with their defaults (read off its signature)."""
    return {name: p.default for name, p in inspect.signature(prune).parameters.items()
            if p.kind is inspect.Parameter.KEYWORD_ONLY and name not in _PRUNE_WIRED}


def _type_ok(value: Any, hint: Any) -> bool:
    """Whether a value read from TOML/JSON fits a field's type hint (int is accepted for float)."""
    if hint is Any:
        return True
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, a) for a in args)
    if hint is type(None):
        return value is None
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if origin in (list, tuple):
        return isinstance(value, (list, tuple)) and all(_type_ok(v, args[0]) for v in value) if args else True
    if origin is dict:
        return isinstance(value, dict) and all(_type_ok(v, args[1]) for v in value.values()) if args else True
    return isinstance(value, origin or hint)


def _merge(obj: Any, values: Any, where: str) -> Any:
    """A copy of dataclass ``obj`` with the entries of the mapping ``values`` set, recursively."""
    if not isinstance(values, dict):
        raise InputError(f"{where} must be a table of options, got {values!r}")
    hints = typing.get_type_hints(type(obj))
    names = [f.name for f in fields(obj)]
    changes = {}
    for key, value in values.items():
        path = f"{where}.{key}" if where else key
        if key not in names:
            raise InputError(f"unknown option {path!r}; expected one of {', '.join(names)}")
        current = getattr(obj, key)
        if is_dataclass(current):
            changes[key] = _merge(current, value, path)
        elif key == "prune" and obj.__class__ is RecipeConfig:
            changes[key] = prune_options({**current, **value} if isinstance(value, dict) else value)
        elif not _type_ok(value, hints[key]):
            raise InputError(f"option {path!r} must be of type {hints[key]}, got {value!r}")
        else:
            changes[key] = value
    return replace(obj, **changes)


def prune_options(values: Any) -> dict[str, Any]:
    """Keyword options for :func:`pruning.prune.prune`: ``values`` over that function's defaults."""
    if not isinstance(values, dict):
        raise InputError(f"prune must be a table of options, got {values!r}")
    defaults = _prune_defaults()
    unknown = sorted(set(values) - set(defaults))
    if unknown:
        raise InputError(f"unknown option 'prune.{unknown[0]}'; pruning.prune.prune takes {', '.join(defaults)}")
    return {**defaults, **values}


def read_config_file(path: str | os.PathLike[str]) -> dict[str, Any]:
    """A preset or config file as a nested dict: TOML (``.toml``) or JSON (anything else)."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise InputError(f"cannot read config file {str(path)!r}: {exc.strerror or exc}") from None
    try:
        return tomllib.loads(text) if path.suffix == ".toml" else json.loads(text)
    except (tomllib.TOMLDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"config file {str(path)!r} is not valid {'TOML' if path.suffix == '.toml' else 'JSON'}: {exc}") from None


def _set_path(values: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    for key in keys[:-1]:
        values = values.setdefault(key, {})
        if not isinstance(values, dict):
            raise InputError(f"--set {dotted}: {key!r} is not a table of options")
    values[keys[-1]] = value


def _setting(text: str) -> tuple[str, Any]:
    """``--set KEY=VALUE``: a dotted key and a TOML value (``prune.max_rounds=2``, ``run.grid_lr=[0.1, 0.5]``)."""
    key, sep, value = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE such as prune.max_rounds=2, got {text!r}")
    try:
        return key, tomllib.loads(f"v = {value.strip()}")["v"]
    except tomllib.TOMLDecodeError:  # a bare word is a string: run.device=cpu
        return key, value.strip()


def resolve_config(args: argparse.Namespace) -> RecipeConfig:
    """Preset or ``--config`` file, then the command-line options, into a :class:`RecipeConfig`."""
    values = read_config_file(args.config if args.config else PRESETS_DIR / f"{args.preset}.toml")
    overrides: list[tuple[str, Any]] = [
        ("out_dir", args.out), ("run.data_dir", args.data_dir), ("run.device", args.device),
        ("run.model", args.model), ("run.schedule.name", args.schedule), ("run.schedule.lam0", args.lambda0),
        ("run.train.epochs", args.epochs), ("run.train_subset", args.train_subset),
        ("run.val_size", args.val_size), ("run.test_subset", args.test_subset),
        ("run.train.seed", args.seed), ("fine_tune.seed", args.seed),
        ("run.download", True if args.download else None),
        ("run.progress", False if args.no_progress else None), ("run.resume", False if args.no_resume else None),
    ]
    for key, value in [*overrides, *args.set]:
        if value is not None:
            _set_path(values, key, value)
    cfg = _merge(RecipeConfig(prune=_prune_defaults()), values, "")
    if cfg.run.data_dir is None and os.environ.get("ANRAT_DATA_DIR"):
        # record where the data came from, so that config.json repeats the run without the variable
        cfg = replace(cfg, run=replace(cfg.run, data_dir=os.environ["ANRAT_DATA_DIR"]))
    cfg = replace(cfg, run=replace(cfg.run, out_dir=str(Path(cfg.out_dir) / "train")))
    validate(cfg)
    return cfg


def validate(cfg: RecipeConfig) -> None:
    """Refuse what the pipeline cannot run, before any work is done."""
    if cfg.run.model not in ("lenet5", "convnet_dropout"):
        raise InputError(f"model {cfg.run.model!r} is not an MNIST ConvNet; expected 'lenet5' or 'convnet_dropout'")
    if cfg.run.val_size < 1:
        raise InputError("the recipe needs a validation split (val_size >= 1): selection and the pruning rollback use it")
    cfg.run.train.validate()
    cfg.run.schedule.validate()
    if cfg.fine_tune.epochs < 0 or cfg.fine_tune.lr <= 0:
        raise InputError(f"fine_tune needs epochs >= 0 and lr > 0, got {cfg.fine_tune.epochs}, {cfg.fine_tune.lr}")
    r = cfg.report
    if r.latency_repeats < 1 or r.latency_warmup < 0 or r.verify_images < 1 or not r.latency_batch_sizes \
            or min(r.latency_batch_sizes) < 1:
        raise InputError("report needs latency_repeats >= 1, latency_warmup >= 0, verify_images >= 1 and "
                         f"batch sizes >= 1, got {asdict(r)}")


def config_dict(cfg: RecipeConfig) -> dict[str, Any]:
    return asdict(cfg)


def _flatten(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"run": {"train": {"epochs": 3}}}`` -> ``{"run.train.epochs": 3}``."""
    flat: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, dict) and value:
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _check_resume(cfg: RecipeConfig, out: Path) -> None:
    """Refuse to resume a training in ``out`` that was started with other training options."""
    saved_path = out / "config.json"
    if not (cfg.run.resume and saved_path.is_file() and (Path(cfg.run.out_dir) / "last.pt").exists()):
        return
    ignore = ("run.progress", "run.resume")
    saved = _flatten({"run": json.loads(saved_path.read_text()).get("run", {})})
    new = _flatten({"run": asdict(cfg.run)})
    differing = sorted(k for k in set(saved) | set(new) if k not in ignore and saved.get(k) != new.get(k))
    if differing:
        raise InputError(f"{out} holds a training started with other options ({differing[0]} differs); "
                         "pass --no-resume to start it afresh or choose another --out")


# --- the pipeline ------------------------------------------------------------------------------
def run(cfg: RecipeConfig, command: str = PROG) -> dict[str, Any]:
    """Train, prune, fine-tune, export and report; returns what ``metrics.json`` holds."""
    started = time.perf_counter()
    seconds: dict[str, float] = {}
    # The splits the training will use (same name, seed, sizes), loaded first so that missing data
    # stops the run before anything is written; pruning and testing use them afterwards.
    device = resolve_device(cfg.run.device)
    data = load_dataset(cfg.run.dataset, cfg.run.data_dir, val_size=cfg.run.val_size, seed=cfg.run.train.seed,
                        device=device, download=cfg.run.download, train_subset=cfg.run.train_subset,
                        test_subset=cfg.run.test_subset)
    out = Path(cfg.out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"cannot create output folder {str(out)!r}: {exc.strerror or exc}") from None
    _check_resume(cfg, out)
    write_text_atomic(out / "config.json", json.dumps(config_dict(cfg), indent=2))

    # 1. train (and select on validation); the test set is evaluated once inside
    t0 = time.perf_counter()
    trained = train_run(cfg.run)
    seconds["train"] = time.perf_counter() - t0

    ckpt = load_checkpoint(Path(cfg.run.out_dir) / "model.pt")
    dense = model_from_checkpoint(ckpt).to(device)
    model = model_from_checkpoint(ckpt).to(device)

    # 2. prune by significance, fine-tune, roll back past the tolerance
    t0 = time.perf_counter()
    pruned: PruneResult = prune(model, data.train, data.val, **cfg.prune, fine_tune_config=cfg.fine_tune,
                                kind=cfg.run.schedule.kind, progress=cfg.run.progress and sys.stderr.isatty(),
                                log=lambda record: print(round_line(record), file=sys.stderr, flush=True))
    seconds["prune"] = time.perf_counter() - t0
    test_trained = trained["test"]
    test_pruned = evaluate(pruned.model, data.test, cfg.run.schedule.kind)
    save_pruned(pruned.model, out / "pruned.pt", arch=ckpt["arch"],
                metrics={"val": pruned.final_val, "test": test_pruned, "base_val": pruned.base_val,
                         "test_before_pruning": test_trained}, input_norm=data.input_norm)

    # 3. export the pruned network, check it, and time it against the dense one
    t0 = time.perf_counter()
    cpu_dense, cpu_pruned = dense.cpu().eval(), pruned.model.cpu().eval()
    example = data.test.x[:2].cpu()
    verify = data.test.x[: cfg.report.verify_images].cpu()
    metadata = data.input_norm.onnx_metadata(in_graph=False)
    exported = export_onnx(cpu_pruned, out / "model.onnx", example, verify_inputs=verify, metadata=metadata)
    onnx_test = onnx_test_error(out / "model.onnx", data.test.x.cpu(), data.test.y.cpu())
    seconds["export"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    r = cfg.report
    comparison = compare_models(cpu_dense, cpu_pruned, example, out / "onnx", verify_inputs=verify,
                                batch_sizes=tuple(r.latency_batch_sizes), repeats=r.latency_repeats,
                                warmup=r.latency_warmup, threads=r.latency_threads, metadata=metadata)
    seconds["compare"] = time.perf_counter() - t0
    seconds["total"] = time.perf_counter() - started

    arch_name = ckpt["arch"]["name"]
    metrics = {
        "command": command,
        "preset": cfg.preset,
        "config": config_dict(cfg),
        "machine": _machine(device),
        "data": _data_figures(data),
        "training": {
            "selected": trained["selected"], "trials": trained["trials"], "history": trained["history"],
            "val": trained["selected"]["val"], "test": test_trained,
            "steps_per_epoch": data.train.num_batches(cfg.run.train.batch_size),
        },
        "pruning": {
            "rounds": pruned.rounds, "base_val": pruned.base_val, "final_val": pruned.final_val,
            "params_before": pruned.params_before, "params_after": pruned.params_after,
            "nonzero_after": pruned.nonzero_after,
            "widths_before": widths_of(cpu_dense, arch_name), "widths_after": widths_of(cpu_pruned, arch_name),
            "layers": layer_counts(cpu_dense, cpu_pruned),
        },
        "test_error": {
            "trained": test_trained.get("error"), "pruned": test_pruned.get("error"), "onnx": onnx_test,
            "images": len(data.test),
        },
        "export": {"model_onnx": exported.as_dict(), "compare": comparison},
        "seconds": seconds,
        "files": {
            "config": "config.json", "trained_checkpoint": "train/model.pt", "pruned_checkpoint": "pruned.pt",
            "onnx": "model.onnx", "report": "report.md", "figures": dict(FIGURES),
        },
    }
    write_text_atomic(out / "metrics.json", json.dumps(metrics, indent=1))
    write_report(metrics, out)
    return metrics


def onnx_test_error(path: Path, x: torch.Tensor, y: torch.Tensor, batch_size: int = 1000) -> float:
    """Fraction of ``(x, y)`` that the ONNX model at ``path`` misclassifies under onnxruntime (CPU)."""
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    wrong = 0
    for start in range(0, len(x), batch_size):
        scores = session.run(None, {name: x[start:start + batch_size].numpy()})[0]
        wrong += int((np.argmax(scores, axis=1) != y[start:start + batch_size].numpy()).sum())
    return wrong / len(x)


def layer_counts(dense: nn.Module, pruned: nn.Module) -> dict[str, dict[str, int]]:
    """Per layer (weights and bias together): parameters of the dense network, parameters and
    nonzero parameters of the pruned one."""
    def by_layer(model: nn.Module) -> dict[str, tuple[int, int]]:
        counts: dict[str, tuple[int, int]] = {}
        for name, tensor in effective_parameters(model).items():
            layer = name.rpartition(".")[0]
            total, nonzero = counts.get(layer, (0, 0))
            counts[layer] = (total + tensor.numel(), nonzero + int(torch.count_nonzero(tensor)))
        return counts

    before, after = by_layer(dense), by_layer(pruned)
    return {layer: {"dense": before[layer][0], "pruned": after.get(layer, (0, 0))[0],
                    "nonzero": after.get(layer, (0, 0))[1]} for layer in before}


def _data_figures(data: DataSplits) -> dict[str, Any]:
    return {"dataset": data.name, "train": len(data.train), "val": len(data.val) if data.val is not None else 0,
            "test": len(data.test), "input_norm": data.input_norm.as_dict(), "input_shape": list(data.input_shape)}


def _machine(device: torch.device) -> dict[str, Any]:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or platform.machine())
    return {"device": str(device), "device_name": name, "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "onnxruntime": ort.__version__, "python": platform.python_version()}


# --- report --------------------------------------------------------------------------------------
def _pct(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{100 * value:.{digits}f}%"


def _figure(panels: int) -> tuple[Any, list[Any]]:
    """A matplotlib figure (Agg backend, no display needed) with ``panels`` axes side by side."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, panels, figsize=(3 + 3.5 * panels, 3.8), squeeze=False)
    return fig, list(axes[0])


def _save(fig: Any, path: Path, title: str | None = None) -> None:
    import matplotlib.pyplot as plt

    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _axes_style(ax: Any, values: Sequence[float]) -> None:
    """Integer ticks on x (epochs, rounds); a log scale on y only where the values span a decade."""
    from matplotlib.ticker import FuncFormatter, MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    positive = [v for v in values if v is not None and v > 0]
    if positive and max(positive) > 10 * min(positive):
        ax.set_yscale("log")
        # plain numbers, and only at 1, 2 and 5 times a power of ten
        label = FuncFormatter(lambda v, _: f"{v:g}" if round(v / 10 ** math.floor(math.log10(v)), 6) in (1, 2, 5) else "")
        ax.yaxis.set_major_formatter(label)
        ax.yaxis.set_minor_formatter(label)


def _switch(metrics: dict[str, Any]) -> int | None:
    """Epochs trained before the schedule switched to the plain loss for good (the schedule's
    ``switch_epoch``; epoch ``switch + 1`` of metrics.jsonl is the first plain one); None when it
    never switched or trained on the plain loss throughout."""
    history = metrics["training"]["history"]
    switch = history[-1]["switch_epoch"] if history else None
    return None if metrics["config"]["run"]["schedule"]["name"] == "plain" else switch


def plot_training(metrics: dict[str, Any], path: Path) -> None:
    """Training loss and objective, and validation error, per epoch; selected epoch and switch marked."""
    history = metrics["training"]["history"]
    epochs = [h["epoch"] for h in history]
    fig, (ax_loss, ax_err) = _figure(2)
    ax_loss.plot(epochs, [h["train_loss"] for h in history], "o-", label="training loss (mean cross-entropy)")
    ax_loss.plot(epochs, [h["train_objective"] for h in history], "s--",
                 label="training objective (the schedule's criterion)")
    ax_loss.plot(epochs, [h["val_loss"] for h in history], "^-", label="validation loss")
    _axes_style(ax_loss, [h[k] for h in history for k in ("train_loss", "train_objective", "val_loss")])
    ax_loss.set_xlabel("epoch")
    ax_loss.set_ylabel("loss (nats)")
    ax_err.plot(epochs, [100 * h["val_error"] for h in history], "o-", color="C3", label="validation error")
    best = metrics["training"]["selected"]["best_epoch"]
    if best:
        ax_err.axvline(best, color="grey", linestyle=":", label=f"selected epoch {best}")
    _axes_style(ax_err, [h["val_error"] for h in history])
    ax_err.set_xlabel("epoch")
    ax_err.set_ylabel("validation error (%)")
    switch = _switch(metrics)
    for ax in (ax_loss, ax_err):
        if switch is not None:
            ax.axvline(switch + 0.5, color="k", linestyle="--", linewidth=1,
                       label=f"plain loss from epoch {switch + 1}")
        ax.legend(fontsize=7)
    _save(fig, path, "Training (selected configuration)")


def plot_lambda(metrics: dict[str, Any], path: Path) -> None:
    """lambda against training progress (epochs), sampled within epochs; the deconvexification switch marked."""
    history = metrics["training"]["history"]
    per_epoch = metrics["training"]["steps_per_epoch"]
    schedule = metrics["config"]["run"]["schedule"]["name"]
    fig, (ax,) = _figure(1)
    points = [(step / per_epoch, lam) for h in history for step, lam in h["lam_trace"]]
    points += [(h["epoch"], h["lam"]) for h in history if h["lam"] is not None and h["criterion"] != "plain"]
    points.sort()
    if points:
        ax.plot(*zip(*points), ".-", markersize=3, label="lambda (t = lambda^p)")
    else:
        ax.text(0.5, 0.5, f"no lambda: schedule {schedule!r} trains on the plain loss", ha="center",
                va="center", transform=ax.transAxes)
    _axes_style(ax, [lam for _, lam in points])
    switch = _switch(metrics)
    if switch is not None:
        ax.axvline(switch, color="k", linestyle="--", linewidth=1,
                   label=f"deconvexification: plain loss from epoch {switch + 1}")
    ax.set_xlabel("epoch")
    ax.set_ylabel("lambda")
    ax.set_title(f"Risk-sensitivity index over training (schedule {schedule!r})", fontsize=10)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    _save(fig, path)


def plot_pruning(metrics: dict[str, Any], path: Path) -> None:
    """Validation error and nonzero parameters after each pruning round (kept and rolled back)."""
    p = metrics["pruning"]
    tolerance = metrics["config"]["prune"]["tolerance"]
    rounds = [r for r in p["rounds"] if "val_error" in r]
    fig, (ax_err, ax_nz) = _figure(2)
    kept = [r for r in rounds if not r.get("rolled_back")]
    back = [r for r in rounds if r.get("rolled_back")]
    base = p["base_val"]["error"]
    ax_err.plot([0] + [r["round"] for r in kept], [100 * base] + [100 * r["val_error"] for r in kept], "o-",
                label="kept round")
    if back:
        ax_err.plot([r["round"] for r in back], [100 * r["val_error"] for r in back], "x", color="C3",
                    markersize=9, label="rolled back")
    ax_err.axhline(100 * (base + tolerance), color="grey", linestyle="--", linewidth=1,
                   label=f"unpruned + tolerance ({100 * tolerance:g} points)")
    _axes_style(ax_err, [])
    ax_err.set_xlabel("pruning round (0: unpruned)")
    ax_err.set_ylabel("validation error (%)")
    ax_err.legend(fontsize=7)
    ax_nz.plot([0] + [r["round"] for r in kept], [p["params_before"]] + [r["nonzero"] for r in kept], "o-",
               label="nonzero parameters")
    ax_nz.plot([0] + [r["round"] for r in kept], [p["params_before"]] + [r["params"] for r in kept], "s--",
               label="parameters (after unit removal)")
    if back:
        ax_nz.plot([r["round"] for r in back], [r["nonzero"] for r in back], "x", color="C3", markersize=9,
                   label="rolled back")
    _axes_style(ax_nz, [p["params_before"]] + [r["nonzero"] for r in rounds])
    ax_nz.set_xlabel("pruning round (0: unpruned)")
    ax_nz.set_ylabel("weights kept")
    ax_nz.legend(fontsize=7)
    _save(fig, path, "Pruning by significance, round by round")


def plot_layers(metrics: dict[str, Any], path: Path) -> None:
    """Parameters per layer: dense, after unit removal, and nonzero after pruning (log scale)."""
    layers = metrics["pruning"]["layers"]
    names = list(layers)
    xs = np.arange(len(names))
    fig, (ax,) = _figure(1)
    for offset, key, label in ((-0.27, "dense", "dense"), (0.0, "pruned", "after unit removal"),
                               (0.27, "nonzero", "nonzero after pruning")):
        ax.bar(xs + offset, [max(layers[n][key], 1) for n in names], width=0.27, label=label)
    for x, n in zip(xs, names):
        ax.annotate(f"{layers[n]['nonzero'] / layers[n]['dense']:.1%}", (x + 0.27, max(layers[n]["nonzero"], 1)),
                    ha="center", va="bottom", fontsize=7)
    ax.set_xticks(xs, names)
    ax.set_yscale("log")
    ax.set_ylabel("parameters (weights and bias)")
    ax.set_title("Weights kept per layer (label: nonzero / dense)", fontsize=10)
    ax.legend(fontsize=8)
    _save(fig, path)


def write_report(metrics: dict[str, Any], out: Path) -> None:
    """Draw the figures and write ``report.md`` from ``metrics`` (what ``metrics.json`` holds)."""
    plot_training(metrics, out / FIGURES["training"])
    plot_lambda(metrics, out / FIGURES["lambda"])
    plot_pruning(metrics, out / FIGURES["pruning"])
    plot_layers(metrics, out / FIGURES["layers"])
    write_text_atomic(out / "report.md", report_markdown(metrics))


def report_markdown(m: dict[str, Any]) -> str:
    cfg, t, p, te, d = m["config"], m["training"], m["pruning"], m["test_error"], m["data"]
    run, sel = cfg["run"], t["selected"]
    cmp = m["export"]["compare"]
    dense, pruned, ratio = cmp["dense"], cmp["pruned"], cmp["ratio_pruned_to_dense"]
    n = te["images"]
    delta = te["pruned"] - te["trained"]
    verdict = ("improved" if delta < 0 else "worsened" if delta > 0 else "left unchanged")
    switch = _switch(m)
    lines = [
        f"# MNIST: {run['model']} trained with {run['schedule']['name']!r}, pruned by significance, exported to ONNX",
        "",
        f"Command: `{m['command']}` (preset `{m['preset']}`; resolved options in `config.json`, repeat with "
        f"`{PROG} --config {Path(cfg['out_dir']) / 'config.json'} --out OTHER`).",
        f"Device: {m['machine']['device']} ({m['machine']['device_name']}, {m['machine']['torch_threads']} torch threads); "
        f"torch {m['machine']['torch']}, onnxruntime {m['machine']['onnxruntime']}.",
        f"Data: {d['train']} training, {d['val']} validation, {d['test']} test images.",
        "",
        "## Result",
        "",
        "| | test error | test images misclassified |",
        "|---|---|---|",
        f"| trained (selected on validation) | {_pct(te['trained'])} | {round(te['trained'] * n)} of {n} |",
        f"| pruned and fine-tuned (PyTorch) | {_pct(te['pruned'])} | {round(te['pruned'] * n)} of {n} |",
        f"| `model.onnx` under onnxruntime | {_pct(te['onnx'])} | {round(te['onnx'] * n)} of {n} |",
        "",
        f"Pruning {verdict} the test error ({100 * delta:+.2f} percentage points, {round(delta * n):+d} images "
        f"of {n}). The source paper claims that pruning improves generalisation; one run on {n} images is "
        "weak evidence either way (`benchmarks/mnist_anrat_vs_ce.py` repeats it over seeds).",
        "",
        f"Parameters: {p['params_before']:,} -> {p['params_after']:,} after unit removal, "
        f"{p['nonzero_after']:,} nonzero ({p['nonzero_after'] / p['params_before']:.1%} of the dense network). "
        "Widths: " + ", ".join(f"{k} {p['widths_before'][k]} -> {p['widths_after'][k]}" for k in p["widths_before"]) + ".",
        "",
        "## Training",
        "",
        f"Selected epoch {sel['best_epoch']} of {run['train']['epochs']} (lr {sel['lr']:g}"
        + (")" if run["schedule"]["name"] == "plain" else f", a {sel['a']:g})")
        + f"; validation error {_pct(sel['val'].get('error'))}. "
        + ("Schedule 'plain': the plain loss (cross-entropy) throughout." if run["schedule"]["name"] == "plain" else
           f"Schedule {run['schedule']['name']!r} from lambda {run['schedule']['lam0']:g}; "
           + (f"switched to the plain loss from epoch {switch + 1}." if switch is not None else
              "no switch to the plain loss."))
        + f" Training took {m['seconds']['train']:.0f} s.",
        "",
    ]
    if len(t["trials"]) > 1:
        lines += ["Grid (selected on validation error; only the selected model saw the test set):", "",
                  "| lr | a | best epoch | validation error |", "|---|---|---|---|"]
        for trial in t["trials"]:
            val = "diverged" if "diverged" in trial else _pct((trial["val"] or {}).get("error"))
            lines.append(f"| {trial['lr']:g} | {trial['a']:g} | {trial.get('best_epoch', '-')} | {val} |")
        lines.append("")
    lines += [
        f"![training curves]({FIGURES['training']})",
        "",
        f"![lambda]({FIGURES['lambda']})",
        "",
        "## Pruning",
        "",
        f"Wald tests ({cfg['prune']['estimator']} Fisher on up to {cfg['prune']['max_samples']} training images, "
        f"{cfg['prune']['method']} at alpha {cfg['prune']['alpha']:g}), at most {cfg['prune']['step']:g} of the "
        f"remaining weights per round, {cfg['fine_tune']['epochs']} fine-tuning epoch(s) per round, rollback above "
        f"validation error {_pct(p['base_val']['error'])} + {100 * cfg['prune']['tolerance']:g} points. "
        f"Validation error {_pct(p['base_val']['error'])} -> {_pct(p['final_val']['error'])}. "
        f"Pruning took {m['seconds']['prune']:.0f} s.",
        "",
        "| round | weights zeroed | units removed | nonzero | parameters | validation error | step | outcome |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in p["rounds"]:
        units = ", ".join(f"{k} {v}" for k, v in (r.get("units_removed") or {}).items()) or "-"
        outcome = "rolled back" if r.get("rolled_back") else "kept" if "val_error" in r else "-"
        if r.get("stopped"):
            outcome += f"; stopped: {r['stopped']}"
        lines.append(f"| {r['round']} | {r['weights_zeroed']:,} | {units} | {r.get('nonzero', '-')} | "
                     f"{r.get('params', '-')} | {_pct(r.get('val_error'))} | {r.get('step', '-')} | {outcome} |")
    lines += [
        "",
        f"![pruning rounds]({FIGURES['pruning']})",
        "",
        "| layer | dense | after unit removal | nonzero | kept |",
        "|---|---|---|---|---|",
    ]
    for name, c in p["layers"].items():
        lines.append(f"| {name} | {c['dense']:,} | {c['pruned']:,} | {c['nonzero']:,} | {c['nonzero'] / c['dense']:.1%} |")
    lines += [
        "",
        f"![weights kept per layer]({FIGURES['layers']})",
        "",
        "## Deployment: sizes and onnxruntime latency",
        "",
        f"`model.onnx` is the pruned network ({m['export']['model_onnx']['onnx_bytes']:,} bytes, opset "
        f"{m['export']['model_onnx']['opset']}). Checks passed: " + "; ".join(cmp["checks"]) + ". "
        f"Latency: {cmp['latency']}, on {m['machine']['cpus']} CPU(s) shared with whatever else ran.",
        "",
        "| | dense | pruned | pruned / dense |",
        "|---|---|---|---|",
        f"| parameters | {dense['parameters']:,} | {pruned['parameters']:,} | {ratio['parameters']:.3f} |",
        f"| nonzero parameters | {dense['nonzero_parameters']:,} | {pruned['nonzero_parameters']:,} | "
        f"{ratio['nonzero_parameters']:.3f} |",
        f"| ONNX file (bytes) | {dense['onnx_bytes']:,} | {pruned['onnx_bytes']:,} | {ratio['onnx_bytes']:.3f} |",
    ]
    for size in dense["latency_s"]:
        lines.append(f"| latency, batch {size} (ms) | {1e3 * dense['latency_s'][size]:.3f} | "
                     f"{1e3 * pruned['latency_s'][size]:.3f} | {ratio[f'latency_s@{size}']:.3f} |")
    lines += [
        "",
        f"The ONNX model takes images normalised as {d['input_norm']['formula']} (also in its metadata_props), "
        f"shape (N, {', '.join(map(str, d['input_shape']))}), and returns class scores; "
        "`python -m pruning export pruned.pt --include-preprocessing` puts the normalisation into the graph.",
        "",
        "## Cost",
        "",
        "| stage | seconds |",
        "|---|---|",
    ] + [f"| {stage} | {secs:.1f} |" for stage, secs in m["seconds"].items()] + [""]
    return "\n".join(lines)


# --- command line --------------------------------------------------------------------------------
def _int_at_least(low: int):
    """An argparse type: an integer >= ``low``."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = low - 1
        if value < low:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {text!r}")
        return value
    return parse


def build_parser() -> argparse.ArgumentParser:
    ap = OneLineErrorParser(prog=PROG, description=__doc__.split("\n\n")[0],
                            epilog="Options left out keep the value of the preset or --config file "
                                   "(see recipes/configs/*.toml).")
    g = ap
    g.add_argument("--preset", choices=PRESETS, default="quick",
                   help="quick: 4 epochs on the full training split, ~3 min on 2 idle CPU cores; paper: the "
                        "paper's grid over lr and a, 100 epochs each (a GPU is recommended). Default: quick")
    g.add_argument("--config", default=None, metavar="FILE",
                   help="a TOML preset or the config.json of an earlier run; replaces --preset")
    g.add_argument("--out", default=None, metavar="DIR", help="output folder (quick: runs/mnist_prune)")
    g.add_argument("--data-dir", default=None, metavar="DIR",
                   help="folder holding the four MNIST IDX files (.gz or not); default: $ANRAT_DATA_DIR")
    g.add_argument("--download", action="store_true", help="download MNIST through torchvision if no folder is given")
    g.add_argument("--device", default=None, help="auto (CUDA when present), cpu, cuda, cuda:N")
    g.add_argument("--seed", type=_int_at_least(0), default=None,
                   help="seed of initialisation, validation split, shuffling and fine-tuning")
    g.add_argument("--model", choices=("lenet5", "convnet_dropout"), default=None,
                   help="lenet5: the paper's ConvNet; convnet_dropout: the ConvNet with dropout")
    g.add_argument("--schedule", choices=SCHEDULES, default=None,
                   help="lambda schedule: adaptive (ANRAT), fixed, anneal, excursions, or plain (cross-entropy)")
    g.add_argument("--lambda0", type=float, default=None, help="initial (or fixed) lambda")
    g.add_argument("--epochs", type=_int_at_least(0), default=None, help="training epochs (per grid point)")
    g.add_argument("--train-subset", type=_int_at_least(1), default=None,
                   help="train on the first N training images after the validation split")
    g.add_argument("--val-size", type=_int_at_least(1), default=None, help="training images held out for validation")
    g.add_argument("--test-subset", type=_int_at_least(1), default=None, help="test on the first N test images")
    g.add_argument("--set", type=_setting, action="append", default=[], metavar="KEY=VALUE",
                   help="set any option of the config file by its dotted key, value in TOML syntax; repeatable "
                        "(e.g. --set prune.max_rounds=2 --set fine_tune.epochs=2 --set run.grid_lr=[0.1,0.5])")
    g.add_argument("--no-resume", action="store_true", help="train afresh even if OUT/train holds a started run")
    g.add_argument("--no-progress", action="store_true", help="no progress bars")
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    command = " ".join([PROG, *(sys.argv[1:] if argv is None else argv)])
    try:
        cfg = resolve_config(args)
        metrics = run(cfg, command)
    except (InputError, TrainingDiverged) as exc:
        return parser.report(exc)
    te, p = metrics["test_error"], metrics["pruning"]
    print(f"test error {_pct(te['trained'])} trained, {_pct(te['pruned'])} pruned "
          f"({_pct(te['onnx'])} with model.onnx under onnxruntime), {te['images']} images; "
          f"{p['nonzero_after']:,} of {p['params_before']:,} parameters kept; {metrics['seconds']['total']:.0f} s")
    print(f"wrote {Path(cfg.out_dir) / 'report.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
