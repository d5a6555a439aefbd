"""int8 ONNX models by onnxruntime's static quantisation, checked like the float export.

Route (onnxruntime's quantisation guide): export float32 first (:func:`pruning.export.export_onnx`),
then ``quant_pre_process`` (shape inference and graph optimisation), then ``quantize_static`` in
the QDQ format with per-channel int8 weights and int8 activations (S8S8), calibrated by MinMax on
inputs fed exactly as the model expects them. Two routes are avoided on purpose: dynamic
quantisation turns Conv into ``ConvInteger``, which onnxruntime's CPU provider cannot run with
int8 weights, and exporting ``torch.ao`` quantised modules is fragile and being retired.

An int8 model computes ``x_q = clip(round(x / s) + z, -128, 127)`` per tensor for activations
and per output channel for weights, so its outputs differ from the float model's by up to about
half a quantisation step per layer: it is judged by its error on labelled data, not by a tolerance
on its outputs (:func:`int8_verdict`).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import numpy_helper
from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_static
from onnxruntime.quantization.shape_inference import quant_pre_process

from anrat.atomic_files import atomic_path
from anrat.data import Split
from anrat.errors import InputError
from anrat.machine import cpu_model, int8_dot_product
from pruning.export import ExportVerificationError, onnx_test_error, paired_latency, strip_debug_info

QUANTIZE_CHOICES = ("none", "int8")
CALIBRATION_BATCH = 64


@dataclass(frozen=True)
class QuantizeReport:
    """What :func:`quantize_onnx` wrote: bytes of both files, the calibration and the format."""

    path: str
    float_path: str
    onnx_bytes: int
    float_bytes: int
    calibration_inputs: int
    quant_format: str = "QDQ"
    weights: str = "int8, per output channel"
    activations: str = "int8, per tensor"
    calibration: str = "MinMax"

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class _Batches(CalibrationDataReader):
    """The calibration inputs, fed to onnxruntime's calibrator in batches under the graph's input name."""

    def __init__(self, name: str, inputs: np.ndarray, batch_size: int = CALIBRATION_BATCH) -> None:
        self.name, self.inputs, self.batch_size = name, inputs, batch_size
        self._iter: Iterator[dict[str, np.ndarray]] | None = None

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self._iter is None:
            self._iter = (
                {self.name: self.inputs[i : i + self.batch_size]} for i in range(0, len(self.inputs), self.batch_size)
            )
        return next(self._iter, None)

    def rewind(self) -> None:
        self._iter = None


def check_calibration(float_path: str | os.PathLike[str], inputs: torch.Tensor | np.ndarray) -> np.ndarray:
    """The calibration inputs as float32 numpy, after checking them against the model's one input:
    at least one row, the rank and every fixed dimension but the batch. Raises :class:`InputError`."""
    session = ort.InferenceSession(str(float_path), providers=["CPUExecutionProvider"])
    graph_inputs = session.get_inputs()
    if len(graph_inputs) != 1:
        raise InputError(f"int8 quantisation takes models with one input; {float_path} has {len(graph_inputs)}")
    expected = graph_inputs[0].shape
    array = inputs.detach().cpu().numpy() if isinstance(inputs, torch.Tensor) else np.asarray(inputs)
    if array.ndim < 1 or array.shape[0] < 1:
        raise InputError(f"calibration data must hold at least one input, got shape {tuple(array.shape)}")
    fixed = [d if isinstance(d, int) else None for d in expected]
    if array.ndim != len(expected) or any(f is not None and f != a for f, a in zip(fixed[1:], array.shape[1:])):
        shown = ", ".join("batch" if i == 0 else str(d) for i, d in enumerate(expected))
        raise InputError(
            f"calibration data have shape {tuple(array.shape)}; the model takes ({shown}), "
            "inputs fed as in training (the same normalisation)"
        )
    if not np.issubdtype(array.dtype, np.floating) or not np.isfinite(array).all():
        raise InputError("calibration data must be finite floating-point inputs")
    return np.ascontiguousarray(array, dtype=np.float32)


def _with_dense_weights(path: Path, out: Path) -> None:
    """A copy of the model whose sparse ``Constant`` weights (``export_onnx(sparse_initializers=True)``)
    are dense initializers again: the quantiser quantises initializers only."""
    model = onnx.load(str(path))
    nodes, dense = [], []
    for node in model.graph.node:
        is_constant = node.op_type == "Constant"
        sparse = next((a for a in node.attribute if a.name == "sparse_value"), None) if is_constant else None
        if sparse is None:
            nodes.append(node)
            continue
        values = numpy_helper.to_array(sparse.sparse_tensor.values)
        flat = np.zeros(int(np.prod(sparse.sparse_tensor.dims)), dtype=values.dtype)
        flat[numpy_helper.to_array(sparse.sparse_tensor.indices).reshape(-1)] = values
        dense.append(numpy_helper.from_array(flat.reshape(tuple(sparse.sparse_tensor.dims)), name=node.output[0]))
    if dense:
        del model.graph.node[:]
        model.graph.node.extend(nodes)
        model.graph.initializer.extend(dense)
    onnx.save(model, str(out))


def compact_names(model: onnx.ModelProto) -> onnx.ModelProto:
    """Rename, in place, every tensor but the graph's inputs and outputs to a short id (``t0``,
    ``t1``, ...) and leave nodes unnamed (ONNX names are labels, not semantics). The quantiser's
    names, such as ``conv2.weight_DequantizeLinear_Output``, are repeated at every use: on a pruned
    LeNet-5 they were 3.7 KB of a 46 KB int8 file."""
    graph = model.graph
    if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for n in graph.node for a in n.attribute):
        return model  # subgraphs may refer to outer names: left as they are
    keep = {v.name for v in graph.input} | {v.name for v in graph.output}
    names: dict[str, str] = {}

    def short(name: str) -> str:
        if not name or name in keep:
            return name
        return names.setdefault(name, f"t{len(names)}")

    for init in graph.initializer:
        init.name = short(init.name)
    for node in graph.node:
        node.name = ""
        node.input[:] = [short(n) for n in node.input]
        node.output[:] = [short(n) for n in node.output]
    for info in graph.value_info:
        info.name = short(info.name)
    return model


def quantize_onnx(
    float_path: str | os.PathLike[str],
    calibration: torch.Tensor | np.ndarray,
    out_path: str | os.PathLike[str],
) -> QuantizeReport:
    """Write an int8 copy of the float ONNX model at ``float_path`` to ``out_path``.

    ``calibration`` holds N model inputs (batch first), fed exactly as the model takes them (for a
    model exported without its normalisation, normalised inputs), typically a few hundred
    validation images. Steps: ``quant_pre_process``; ``quantize_static`` (QDQ, per-channel int8
    weights, int8 activations, MinMax ranges over the calibration inputs); the float model's
    ``metadata_props`` (its input contract) copied over; the exporter's debugging records dropped and
    the internal names shortened (:func:`compact_names`); ``onnx.checker.check_model(full_check=True)``
    and an onnxruntime load. ``out_path`` appears only when all of that passed.
    """
    float_path, out_path = Path(float_path), Path(out_path)
    if not float_path.is_file():
        raise InputError(f"no ONNX model at {float_path}")
    inputs = check_calibration(float_path, calibration)
    source = onnx.load(str(float_path))
    name = source.graph.input[0].name
    with tempfile.TemporaryDirectory(prefix="anrat-int8-") as folder:
        dense, pre = Path(folder) / "dense.onnx", Path(folder) / "pre.onnx"
        _with_dense_weights(float_path, dense)
        quant_pre_process(str(dense), str(pre))
        with atomic_path(out_path) as tmp:
            quantize_static(
                str(pre),
                str(tmp),
                _Batches(name, inputs),
                quant_format=QuantFormat.QDQ,
                per_channel=True,
                activation_type=QuantType.QInt8,
                weight_type=QuantType.QInt8,
                calibrate_method=CalibrationMethod.MinMax,
            )
            model = compact_names(strip_debug_info(onnx.load(str(tmp))))
            props = {p.key: p.value for p in model.metadata_props}
            props.update({p.key: p.value for p in source.metadata_props})
            onnx.helper.set_model_props(model, props)
            onnx.save(model, str(tmp))
            try:
                onnx.checker.check_model(str(tmp), full_check=True)
                ort.InferenceSession(str(tmp), providers=["CPUExecutionProvider"])
            except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
                raise ExportVerificationError(f"int8 model fails onnx.checker: {str(exc).splitlines()[0]}") from None
            except Exception as exc:  # onnxruntime raises its own exception types on load
                raise ExportVerificationError(f"onnxruntime cannot load the int8 model: {exc}") from None
    return QuantizeReport(
        path=str(out_path),
        float_path=str(float_path),
        onnx_bytes=out_path.stat().st_size,
        float_bytes=float_path.stat().st_size,
        calibration_inputs=len(inputs),
    )


def int8_verdict(float_error: float, int8_error: float, tolerance: float) -> tuple[bool, str]:
    """Whether an int8 model's validation error (fractions) is within ``tolerance`` of the float
    model's, and one line that says so."""
    rise = int8_error - float_error
    line = (
        f"int8 validation error {int8_error:.2%} against the float model's {float_error:.2%} "
        f"({100 * rise:+.2f} points, tolerance {100 * tolerance:.2f})"
    )
    return rise <= tolerance, line


def write_int8(
    float_path: str | os.PathLike[str],
    out_path: str | os.PathLike[str],
    calibration: torch.Tensor,
    val: Split,
    test: Split | None = None,
    *,
    tolerance: float = 0.001,
    batch_sizes: tuple[int, ...] = (1, 256),
    repeats: int = 200,
    warmup: int = 5,
    threads: int | None = None,
) -> dict[str, Any]:
    """Quantise the classifier at ``float_path`` (:func:`quantize_onnx`), score the float and int8
    models under onnxruntime on ``val`` (and ``test``), and write ``out_path`` only if the int8
    validation error is at most ``tolerance`` (a fraction: 0.001 = 0.1 point) above the float one;
    otherwise a file already at ``out_path`` (an int8 copy of an earlier float model) is removed.

    Also times both files in alternation at each batch size (median of ``repeats`` calls,
    :func:`pruning.export.paired_latency`). Returns a JSON-ready dict: ``written``, ``line`` (the
    verdict in words), bytes, errors, latencies, ``slower_at`` (batch sizes where int8 was slower:
    CPUs without int8 dot-product instructions, VNNI on x86, can run it slower than float32) and
    the hardware.
    """
    out_path = Path(out_path)
    with tempfile.TemporaryDirectory(prefix="anrat-int8-") as folder:
        candidate = Path(folder) / out_path.name
        report = quantize_onnx(float_path, calibration, candidate)
        files = {"float": Path(float_path), "int8": candidate}
        splits = {"val": val} if test is None else {"val": val, "test": test}
        errors = {
            name: {kind: onnx_test_error(path, split.x.cpu(), split.y.cpu()) for kind, path in files.items()}
            for name, split in splits.items()
        }
        ok, line = int8_verdict(errors["val"]["float"], errors["val"]["int8"], tolerance)
        latency: dict[str, dict[str, float]] = {"float": {}, "int8": {}}
        for size in batch_sizes:
            times = paired_latency(files, size, repeats=repeats, warmup=warmup, threads=threads)
            for kind in latency:
                latency[kind][str(size)] = times[kind]
        stale = not ok and out_path.exists()
        if ok:
            with atomic_path(out_path) as tmp:
                shutil.copyfile(candidate, tmp)
        elif stale:  # an int8 copy of an earlier float model: it must not pass for this one's
            out_path.unlink()
    speedup = {size: latency["float"][size] / latency["int8"][size] for size in latency["float"]}
    return {
        "written": ok,
        "path": str(out_path) if ok else None,
        "line": line
        + (
            f"; wrote {out_path}"
            if ok
            else f"; {out_path.name} not written" + (" (the earlier one removed)" if stale else "")
        ),
        "tolerance": tolerance,
        "bytes": {"float": report.float_bytes, "int8": report.onnx_bytes},
        "bytes_ratio": report.float_bytes / report.onnx_bytes,
        "error": errors,
        "latency_s": latency,
        "speedup": speedup,
        "slower_at": [int(size) for size, v in speedup.items() if v < 1],
        "latency": f"median of {repeats} calls after {warmup} warm-up calls, float and int8 alternating, "
        f"onnxruntime threads={threads or 'default (one per physical core)'}",
        "cpu": cpu_model(),
        "int8_instructions": int8_dot_product(),
        "quantization": report.as_dict(),
    }


def check_quantize_options(quantize: str, calibration_images: int, tolerance: float) -> None:
    """Refuse an unknown format, a calibration count < 1 or a negative tolerance (:class:`InputError`)."""
    if quantize not in QUANTIZE_CHOICES:
        raise InputError(f"unknown quantize {quantize!r}; expected one of {', '.join(QUANTIZE_CHOICES)}")
    if isinstance(calibration_images, bool) or not isinstance(calibration_images, int) or calibration_images < 1:
        raise InputError(f"calibration_images must be an integer >= 1, got {calibration_images!r}")
    if not tolerance >= 0 or tolerance >= 1:  # NaN fails both
        raise InputError(f"quantize_tolerance must be in [0, 1) (a fraction: 0.001 = 0.1 point), got {tolerance!r}")


__all__ = [
    "QUANTIZE_CHOICES",
    "QuantizeReport",
    "check_calibration",
    "check_quantize_options",
    "compact_names",
    "int8_verdict",
    "quantize_onnx",
    "write_int8",
]
