"""The toolkit's path as two functions: train -> prune -> save -> export -> compare.

- :func:`prune_save_export` takes a trained model and its data: prunes it by significance
  (:func:`pruning.prune.prune`), saves ``pruned.pt``, exports and verifies ``model.onnx``, scores
  it under onnxruntime, and times the dense and pruned networks side by side
  (:func:`pruning.export.compare_models`). ``python -m pruning prune`` is this function.
- :func:`train_prune_export` trains first (:func:`anrat.run.run`, the best epoch selected on
  validation) and then runs the above; it writes ``config.json``, ``metrics.json`` and
  ``report.md`` with figures (:mod:`pruning.report`). The MNIST recipe and the benchmarks are it.
"""

from __future__ import annotations

import copy
import json
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import onnxruntime as ort
import torch
from torch import nn

from anrat.atomic_files import atomic_path, make_output_folder, write_text_atomic
from anrat.checkpoint import load_checkpoint, model_from_checkpoint
from anrat.config import flatten
from anrat.data import DataSplits, Split, load_dataset
from anrat.devices import resolve_device
from anrat.errors import InputError
from anrat.input_norm import InputNorm
from anrat.interrupts import report_position
from anrat.machine import describe_machine
from anrat.models import build_model
from anrat.run import RunConfig, model_kwargs
from anrat.run import run as train_run
from anrat.run_lock import lock_output_folder
from anrat.schedules import ScheduleConfig, criterion_at_epoch, fixed_tilt
from anrat.trainer import TrainingDiverged, evaluate
from pruning.export import compare_models, onnx_test_error
from pruning.masks import layer_counts
from pruning.prune import PruneConfig, PruneResult, prune, round_line
from pruning.pruned_checkpoint import save_pruned
from pruning.quantize import check_quantize_options, write_int8
from pruning.report import FIGURES, write_report
from pruning.significance import check_covariance
from pruning.surgery import widths_of


@dataclass
class ReportOptions:
    """How the dense and pruned ONNX models are checked and timed (:func:`compare_models`)."""

    latency_repeats: int = 50
    latency_warmup: int = 5
    latency_batch_sizes: list[int] = field(default_factory=lambda: [1, 256])
    # onnxruntime intra-op threads (None: its default, one per physical core). One thread is how a
    # small model is served at batch 1, and its timing holds on a shared machine: the main job's
    # pruned LeNet-5 read 2.2x-4.0x with 2 threads, idle or beside a busy core, and 4.2x every time
    # with 1 thread (docs/results/main-job.md)
    latency_threads: int | None = 1
    verify_images: int = 256  # test inputs the exports are checked on against PyTorch

    def validate(self) -> None:
        if (
            self.latency_repeats < 1
            or self.latency_warmup < 0
            or (self.latency_threads is not None and self.latency_threads < 1)
            or self.verify_images < 1
            or not self.latency_batch_sizes
            or min(self.latency_batch_sizes) < 1
        ):
            raise InputError(
                "report needs latency_repeats >= 1, latency_warmup >= 0, latency_threads >= 1 (or None), "
                "verify_images >= 1 and "
                f"batch sizes >= 1, got {asdict(self)}"
            )


@dataclass
class ExportOptions:
    """The deployable files written beside ``model.onnx``."""

    quantize: str = "none"  # "int8": also model.int8.onnx (pruning.quantize, onnxruntime static QDQ)
    calibration_images: int = 512  # validation inputs the int8 activation ranges are calibrated on
    quantize_tolerance: float = 0.001  # largest rise of validation error the int8 model may add (0.1 point)

    def validate(self) -> None:
        check_quantize_options(self.quantize, self.calibration_images, self.quantize_tolerance)


def check_int8_labels(export: ExportOptions, val: Split, source: str = "the validation data") -> None:
    """An int8 model is judged by its classification error: refuse it for validation data without
    class labels, before anything is written."""
    if export.quantize != "none" and val.y.is_floating_point():
        raise InputError(
            f"quantize={export.quantize!r} judges the quantised model by its classification error, and "
            f"{source} holds no class labels; export without --quantize"
        )


@dataclass
class PipelineConfig:
    """Everything :func:`train_prune_export` needs; written resolved to ``OUT/config.json``."""

    out_dir: str = "runs/mnist_prune"
    run: RunConfig = field(default_factory=RunConfig)
    prune: PruneConfig = field(default_factory=PruneConfig)
    report: ReportOptions = field(default_factory=ReportOptions)
    export: ExportOptions = field(default_factory=ExportOptions)
    # prune by the criterion the selected model was trained with (PruneConfig.for_criterion): the
    # fine-tuning minimises it, and NRAE at one t is tested with the sandwich covariance at that t.
    # Off: prune.fine_tune.schedule and prune.covariance as configured (the plain loss, the Fisher)
    prune_by_training_criterion: bool = False

    def validate(self) -> None:
        if self.run.val_size < 1:
            raise InputError(
                "the pipeline needs a validation split (val_size >= 1): selection and the pruning rollback use it"
            )
        self.run.validate()
        self.prune.validate()
        self.report.validate()
        self.export.validate()
        if self.prune_by_training_criterion:  # refused now, not after the training
            schedule = self.run.schedule
            if schedule.switch_to == "rae":
                raise InputError(
                    "prune_by_training_criterion cannot hold RAE (switch_to='rae') fixed for the fine-tuning; "
                    "set prune.fine_tune.schedule yourself"
                )
            if fixed_tilt(criterion_at_epoch(schedule)) is not None:
                try:
                    check_covariance("sandwich", 0.0, self.prune.estimator, loss=schedule.kind)
                except InputError as exc:
                    raise InputError(
                        f"prune_by_training_criterion tests a model trained by NRAE at one t ({schedule.name!r} "
                        f"schedule) with the sandwich covariance: {exc}"
                    ) from None


def upgrade_config_values(values: dict[str, Any]) -> dict[str, Any]:
    """A config file's values in today's layout: files written before fine-tuning became part of
    the pruning options hold it at the top level (``[fine_tune]``); it is ``[prune.fine_tune]`` now."""
    if "fine_tune" not in values:
        return values
    values = dict(values)
    moved = values.pop("fine_tune")
    prune = dict(values.get("prune") or {})
    prune["fine_tune"] = {**moved, **prune.get("fine_tune", {})} if isinstance(moved, dict) else moved
    values["prune"] = prune
    return values


def training_criterion(schedule: ScheduleConfig, trained: dict[str, Any]) -> ScheduleConfig:
    """The criterion a training (:func:`anrat.run.run`'s result, ``schedule`` its schedule)
    minimised at its selected epoch, held fixed (:func:`anrat.schedules.criterion_at_epoch`)."""
    best = trained["selected"]["best_epoch"]
    record = next((h for h in trained["history"] if h["epoch"] == best), None)  # None: before any epoch
    return criterion_at_epoch(schedule, record)


@dataclass
class PrunedModel:
    """What :func:`prune_save_export` produced (the files are in its ``out`` folder)."""

    result: PruneResult
    dense: nn.Module  # the unpruned model, on the CPU
    test_before: dict[str, float]
    test_after: dict[str, float]
    onnx_test_error: float | None  # model.onnx under onnxruntime on the test inputs (classification)
    export: dict[str, Any]  # model.onnx: path, bytes, opset, max |diff| against PyTorch
    comparison: dict[str, Any]  # compare_models: sizes, latencies, speed-ups
    seconds: dict[str, float] = field(default_factory=dict)
    int8: dict[str, Any] | None = None  # pruning.quantize.write_int8's record, if asked for

    @property
    def model(self) -> nn.Module:
        return self.result.model


def prune_save_export(
    model: nn.Module,
    data: DataSplits,
    config: PruneConfig,
    out: Path,
    *,
    kind: str = "ce",
    description: dict[str, Any],
    input_norm: InputNorm,
    report: ReportOptions | None = None,
    export: ExportOptions | None = None,
    test_before: dict[str, float] | None = None,
    progress: bool = False,
    log: Callable[[dict[str, Any]], None] | None = None,
) -> PrunedModel:
    """Prune ``model`` on ``data`` (its train and validation splits), then write ``out/pruned.pt``
    (``description``: ``{"arch": ...}`` or ``{"factory": ..., "factory_kwargs": ...}``),
    ``out/model.onnx`` (verified against PyTorch on up to ``report.verify_images`` test inputs),
    and ``out/onnx/{dense,pruned}.onnx`` (the files timed); with ``export.quantize = "int8"`` also
    ``out/model.int8.onnx``, calibrated on validation inputs and written only if its validation
    error is within ``export.quantize_tolerance`` of model.onnx's (:func:`pruning.quantize.write_int8`;
    the result's ``int8`` says which). ``model`` is pruned in place;
    ``test_before``, if given, is its test figures (else they are evaluated here)."""
    report = report or ReportOptions()
    export = export or ExportOptions()
    check_int8_labels(export, data.val)
    seconds: dict[str, float] = {}
    dense = copy.deepcopy(model).cpu().eval()
    test_before = test_before if test_before is not None else evaluate(model, data.test, kind)
    t0 = time.perf_counter()
    done = {"rounds": 0}  # for the interrupt line (anrat.interrupts)

    def log_round(record: dict[str, Any]) -> None:
        if isinstance(record["round"], int):
            done["rounds"] = max(done["rounds"], record["round"])
        if log:
            log(record)

    report_position(
        lambda: (
            f"in the pruning, after {done['rounds']} of at most {config.max_rounds} rounds",
            f"the pruning writes its files into {out} only when it ends, so it wrote none; run the same command again",
        )
    )
    try:
        result = prune(model, data.train, data.val, config, kind=kind, progress=progress, log=log_round)
    except TrainingDiverged as exc:
        raise TrainingDiverged(
            f"pruning stopped, fine-tuning diverged: {exc} (fine_tune.lr); nothing was written to {out}"
        ) from None
    seconds["prune"] = time.perf_counter() - t0
    report_position(
        lambda: (
            "while writing the pruned model's files",
            f"every file in {out} is whole, from this run or from before it (each is written atomically); "
            "run the same command again to write them all",
        )
    )
    test_after = evaluate(result.model, data.test, kind)
    pruned = result.model.cpu().eval()
    x_test, y_test = data.test.x.cpu(), data.test.y.cpu()
    verify = x_test[: report.verify_images]
    metadata = input_norm.onnx_metadata(in_graph=False)
    # The timed pair first (in onnx/), then model.onnx, then pruned.pt: an export that fails its
    # verification leaves the folder's earlier model.onnx and pruned.pt in place.
    t0 = time.perf_counter()
    comparison = compare_models(
        dense,
        pruned,
        verify[:2],
        out / "onnx",
        verify_inputs=verify,
        batch_sizes=tuple(report.latency_batch_sizes),
        repeats=report.latency_repeats,
        warmup=report.latency_warmup,
        threads=report.latency_threads,
        metadata=metadata,
    )
    compare_seconds = time.perf_counter() - t0
    t0 = time.perf_counter()
    # onnx/pruned.onnx was exported and verified above, with the same inputs and metadata
    with atomic_path(out / "model.onnx") as tmp:
        shutil.copyfile(comparison["pruned"]["onnx_path"], tmp)
    exported = {**comparison["pruned"], "onnx_path": str(out / "model.onnx")}
    # class labels: a classifier, whatever per-sample loss trained it (ce, true_class_sq, lp on labels)
    onnx_error = None if y_test.is_floating_point() else onnx_test_error(out / "model.onnx", x_test, y_test)
    seconds["export"] = time.perf_counter() - t0
    seconds["compare"] = compare_seconds
    int8 = None
    if export.quantize == "none":  # an int8 copy of the folder's earlier model.onnx would pass for this one's
        (out / "model.int8.onnx").unlink(missing_ok=True)
    if export.quantize == "int8":
        t0 = time.perf_counter()
        int8 = write_int8(
            out / "model.onnx",
            out / "model.int8.onnx",
            data.val.x[: export.calibration_images].cpu(),
            data.val,
            data.test,
            tolerance=export.quantize_tolerance,
            batch_sizes=tuple(report.latency_batch_sizes),
            repeats=report.latency_repeats,
            warmup=report.latency_warmup,
            threads=report.latency_threads,
        )
        seconds["int8"] = time.perf_counter() - t0
    save_pruned(
        pruned,
        out / "pruned.pt",
        arch=description.get("arch"),
        factory=description.get("factory"),
        factory_kwargs=description.get("factory_kwargs"),
        input_norm=input_norm,
        metrics={
            "test_before": test_before,
            "test_after": test_after,
            "val_before": result.base_val,
            "val_after": result.final_val,
        },
    )
    return PrunedModel(result, dense, test_before, test_after, onnx_error, exported, comparison, seconds, int8)


def check_resume(cfg: PipelineConfig, out: Path) -> None:
    """Refuse to resume a training in ``out`` that was started with other training options."""
    saved_path = out / "config.json"
    if not (cfg.run.resume and saved_path.is_file() and (Path(cfg.run.out_dir) / "last.pt").exists()):
        return
    ignore = ("run.progress", "run.resume")
    saved = flatten({"run": json.loads(saved_path.read_text()).get("run", {})})
    new = flatten({"run": asdict(cfg.run)})
    differing = sorted(k for k in set(saved) | set(new) if k not in ignore and saved.get(k) != new.get(k))
    if differing:
        raise InputError(
            f"{out} holds a training started with other options ({differing[0]} differs); "
            "pass --no-resume to start it afresh or choose another --out"
        )


def machine(device: torch.device) -> dict[str, Any]:
    """The hardware and versions a run's figures were measured on."""
    described = describe_machine(device, onnxruntime=ort.__version__)
    return {**described, "device_name": described.get("gpu", described["cpu"])}


def train_prune_export(
    cfg: PipelineConfig,
    command: str,
    program: str,
    *,
    record: dict[str, Any] | None = None,
    progress: bool = False,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Train (selecting on validation), prune, save, export and compare; write ``config.json``
    (``record``: the dict to write there, default ``cfg`` itself), ``metrics.json`` and
    ``report.md`` into ``cfg.out_dir``; return what ``metrics.json`` holds. ``command`` is the
    command line that ran, ``program`` the one that repeats it with ``--config``. ``cfg.run.out_dir``
    is where the training writes (``OUT/train`` in the recipe). ``log`` gets one line per pruning
    round; ``progress`` shows progress bars."""
    cfg.validate()
    started = time.perf_counter()
    # The splits the training will use (same name, seed, sizes), loaded first so that missing data
    # stops the run before anything is written; pruning and testing use them afterwards.
    device = resolve_device(cfg.run.device)
    data = load_dataset(
        cfg.run.dataset,
        cfg.run.data_dir,
        val_size=cfg.run.val_size,
        seed=cfg.run.train.seed,
        device=device,
        download=cfg.run.download,
        train_subset=cfg.run.train_subset,
        test_subset=cfg.run.test_subset,
    )
    # a size target the model cannot reach, or an int8 copy without class labels to judge it by,
    # is refused now, not after the training
    cfg.prune.target.validate_for(build_model(cfg.run.model, **model_kwargs(cfg.run, data)))
    check_int8_labels(cfg.export, data.val)
    out = make_output_folder(cfg.out_dir)
    check_resume(cfg, out)
    lock_output_folder(out)  # one run per folder, before anything is written
    config_record = record if record is not None else asdict(cfg)
    write_text_atomic(out / "config.json", json.dumps(config_record, indent=2))

    t0 = time.perf_counter()
    trained = train_run(cfg.run)
    train_seconds = time.perf_counter() - t0
    ckpt = load_checkpoint(Path(cfg.run.out_dir) / "model.pt")
    model = model_from_checkpoint(ckpt).to(device)
    kind = cfg.run.schedule.kind
    prune_cfg = cfg.prune
    if cfg.prune_by_training_criterion:
        prune_cfg = cfg.prune.for_criterion(training_criterion(cfg.run.schedule, trained))
    try:
        done = prune_save_export(
            model,
            data,
            prune_cfg,
            out,
            kind=kind,
            description={"arch": ckpt["arch"]},
            input_norm=data.input_norm,
            report=cfg.report,
            export=cfg.export,
            test_before=trained["test"],  # the training evaluated the selected model once already
            progress=progress,
            log=(lambda record: log(round_line(record))) if log else None,
        )
    except TrainingDiverged as exc:
        raise TrainingDiverged(f"{exc}; the trained model is in {Path(cfg.run.out_dir) / 'model.pt'}") from None
    seconds = {"train": train_seconds, **done.seconds, "total": time.perf_counter() - started}
    arch_name, pruned = ckpt["arch"]["name"], done.model
    test_trained = trained["test"]
    acceptance_data = (
        f"the {len(data.val):,} validation images, which the training recorded but selected nothing on (select='last')"
        if cfg.run.train.select == "last" and not cfg.run.grid_lr and not cfg.run.grid_a
        else f"the {len(data.val):,} validation images that selected the trained model: its error there is "
        "optimistic, so the test is conservative (it refuses more rounds)"
    )
    metrics = {
        "command": command,
        "program": program,
        "config": config_record,
        "machine": machine(device),
        "data": {
            "dataset": data.name,
            "train": len(data.train),
            "val": len(data.val),
            "test": len(data.test),
            "input_norm": data.input_norm.as_dict(),
            "input_shape": list(data.input_shape),
        },
        "training": {
            "selected": trained["selected"],
            "trials": trained["trials"],
            "history": trained["history"],
            "val": trained["selected"]["val"],
            "test": test_trained,
            "steps_per_epoch": data.train.num_batches(cfg.run.train.batch_size),
        },
        "pruning": {
            "config": asdict(prune_cfg),  # as run: by the training criterion, if asked
            "rounds": done.result.rounds,
            "base_val": done.result.base_val,
            "final_val": done.result.final_val,
            "params_before": done.result.params_before,
            "params_after": done.result.params_after,
            "nonzero_after": done.result.nonzero_after,
            "acceptance": done.result.acceptance,
            "acceptance_data": acceptance_data,
            "final_recovery": done.result.final_recovery,
            "warning": done.result.warning,
            "widths_before": widths_of(done.dense, arch_name),
            "widths_after": widths_of(pruned, arch_name),
            "layers": layer_counts(done.dense, pruned),
        },
        "test_error": {
            "trained": test_trained.get("error"),
            "pruned": done.test_after.get("error"),
            "onnx": done.onnx_test_error,
            "images": len(data.test),
        },
        "export": {"model_onnx": done.export, "compare": done.comparison, "int8": done.int8},
        "seconds": seconds,
        "files": {
            "config": "config.json",
            "trained_checkpoint": "train/model.pt",
            "pruned_checkpoint": "pruned.pt",
            "onnx": "model.onnx",
            **({"int8_onnx": "model.int8.onnx"} if done.int8 and done.int8["written"] else {}),
            "report": "report.md",
            "figures": dict(FIGURES),
        },
    }
    write_text_atomic(out / "metrics.json", json.dumps(metrics, indent=1))
    write_report(metrics, out)
    return metrics


__all__ = [
    "ExportOptions",
    "check_int8_labels",
    "PipelineConfig",
    "PrunedModel",
    "ReportOptions",
    "check_resume",
    "machine",
    "prune_save_export",
    "train_prune_export",
]
