"""Export to ONNX, checked by ``onnx.checker`` and verified against onnxruntime; latency and size reports.

Exporter choice (torch 2.14): ``torch.onnx.export(..., dynamo=True, dynamic_shapes=...)``. It is
the default and maintained path since torch 2.9; the TorchScript exporter (``dynamo=False`` with
``dynamic_axes``) still works but warns that it will be removed. Both give the same graph for our
models (Conv/MaxPool/Relu/Reshape/Gemm), the same weight bytes (the dynamo file carries ~10 KB more
node metadata) and both match PyTorch to ~1e-7. The dynamo path costs ~2 s per export instead of
~0.2 s, which is nothing next to training. ``external_data=False`` keeps one self-contained file.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import helper, numpy_helper
from torch import nn

from anrat.atomic_files import atomic_path, refused_write
from anrat.errors import InputError
from pruning.masks import count_nonzero, count_total, permanent_copy

DEFAULT_ATOL = 1e-4
VERIFY_BATCH_SIZES = (1, 64)
INPUT_NAME = "input"
_PROVIDERS = ["CPUExecutionProvider"]
_INDEX_BYTES = 8  # ONNX sparse tensors index with int64


class ExportVerificationError(InputError):
    """The exported file fails ``onnx.checker`` or onnxruntime disagrees with PyTorch."""


@dataclass(frozen=True)
class ExportReport:
    """What :func:`export_onnx` wrote and checked.

    ``max_abs_diff`` maps a batch size to max |onnxruntime - PyTorch| over all outputs (output
    units); every value is <= ``atol``, or the export would have raised.
    """

    path: str
    onnx_bytes: int
    opset: int
    exporter: str
    atol: float
    max_abs_diff: dict[int, float]
    sparse_initializers: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form (batch sizes become string keys)."""
        out = asdict(self)
        out["max_abs_diff"] = {str(b): d for b, d in self.max_abs_diff.items()}
        return out


def _outputs(result: Any) -> list[torch.Tensor]:
    """A model's output(s) as a flat list, in the order ONNX lists them."""
    if isinstance(result, torch.Tensor):
        return [result]
    if isinstance(result, (tuple, list)) and all(isinstance(r, torch.Tensor) for r in result):
        return list(result)
    raise InputError(f"model must return a tensor or a tuple of tensors to be exported, got {type(result).__name__}")


def _batch_of(inputs: torch.Tensor, size: int) -> torch.Tensor:
    """``size`` rows of ``inputs``, cycling through them when there are fewer."""
    return inputs[torch.arange(size) % inputs.shape[0]]


def _export_dynamo(model: nn.Module, example: torch.Tensor, path: Path, opset: int | None, n_outputs: int) -> None:
    """``torch.onnx.export`` through torch.export, with a dynamic first (batch) dimension."""
    output_names = ["output"] if n_outputs == 1 else [f"output_{i}" for i in range(n_outputs)]
    try:
        torch.onnx.export(
            model,
            (example,),
            str(path),
            dynamo=True,
            external_data=False,
            opset_version=opset,
            input_names=[INPUT_NAME],
            output_names=output_names,
            dynamic_shapes=({0: torch.export.Dim("batch")},),
            verbose=False,
        )
    except Exception as exc:  # the exporter raises many types; say which step failed, keep the cause
        if refused_write(exc):  # a full disk is the machine's refusal, not the model's: atomic_path says so
            raise
        raise ExportVerificationError(
            f"torch.onnx.export failed: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
        ) from exc


def _store_sparse(path: Path) -> list[str]:
    """Rewrite float initializers that are smaller sparse as ``Constant(sparse_value=...)`` nodes.

    A ``Constant`` with a ``sparse_value`` outputs a dense tensor, so the graph's types do not
    change and ``onnx.checker``'s full check still passes (a ``sparse_initializer`` would not: its
    type is a sparse tensor, which Conv/Gemm do not accept). Values are stored with int64 linear
    indices, so an initializer of ``n`` entries with ``k`` nonzeros of ``b`` bytes is converted only
    when ``k * (b + 8) < n * b``. Returns the names converted.
    """
    model = onnx.load(str(path))
    dense, constants, names = [], [], []
    for init in model.graph.initializer:
        array = numpy_helper.to_array(init)
        nonzero = np.flatnonzero(array)
        if (
            not np.issubdtype(array.dtype, np.floating)
            or nonzero.size * (array.itemsize + _INDEX_BYTES) >= array.nbytes
        ):
            dense.append(init)
            continue
        values = numpy_helper.from_array(array.reshape(-1)[nonzero], name=init.name)
        indices = numpy_helper.from_array(nonzero.astype(np.int64), name=f"{init.name}__indices")
        sparse = helper.make_sparse_tensor(values, indices, list(array.shape))
        constants.append(
            helper.make_node("Constant", [], [init.name], name=f"{init.name}__sparse", sparse_value=sparse)
        )
        names.append(init.name)
    if names:
        nodes = constants + list(model.graph.node)  # constants first keeps the nodes topologically sorted
        del model.graph.initializer[:]
        model.graph.initializer.extend(dense)
        del model.graph.node[:]
        model.graph.node.extend(nodes)
        onnx.save(model, str(path))
    return names


def strip_debug_info(model: onnx.ModelProto) -> onnx.ModelProto:
    """Drop the exporter's per-node debugging records in place (``metadata_props`` such as
    ``pkg.torch.onnx.stack_trace``, and doc strings): about 10 KB on LeNet-5, more than a pruned
    network's int8 weights would need, and they name source files of the machine that exported it."""
    for node in model.graph.node:
        del node.metadata_props[:]
        node.doc_string = ""
    return model


def _set_metadata(path: Path, metadata: Mapping[str, str]) -> None:
    """Add ``metadata`` to the model's ``metadata_props`` (what onnxruntime's
    ``get_modelmeta().custom_metadata_map`` reads back)."""
    model = onnx.load(str(path))
    props = {p.key: p.value for p in model.metadata_props}
    props.update({str(k): str(v) for k, v in metadata.items()})
    onnx.helper.set_model_props(model, props)
    onnx.save(model, str(path))


def _verify(path: Path, model: nn.Module, inputs: torch.Tensor, atol: float) -> dict[int, float]:
    """Run onnxruntime and PyTorch on the same batches; max |difference| per batch size."""
    session = ort.InferenceSession(str(path), providers=_PROVIDERS)
    diffs: dict[int, float] = {}
    for size in VERIFY_BATCH_SIZES:
        batch = _batch_of(inputs, size)
        with torch.no_grad():
            expected = [t.numpy() for t in _outputs(model(batch))]
        got = session.run(None, {INPUT_NAME: batch.numpy()})
        if [e.shape for e in expected] != [g.shape for g in got]:
            raise ExportVerificationError(
                f"onnxruntime output shapes {[g.shape for g in got]} differ from PyTorch's "
                f"{[e.shape for e in expected]} at batch {size}"
            )
        diff = max(float(np.max(np.abs(e.astype(np.float64) - g))) if e.size else 0.0 for e, g in zip(expected, got))
        if not diff <= atol:  # also catches NaN
            raise ExportVerificationError(
                f"onnxruntime disagrees with PyTorch at batch {size}: max |difference| = {diff:.3g} > tolerance "
                f"{atol:g}"
            )
        diffs[size] = diff
    return diffs


def export_onnx(
    model: nn.Module,
    path: str | os.PathLike[str],
    example_input: torch.Tensor,
    *,
    verify_inputs: torch.Tensor | None = None,
    opset: int | None = None,
    sparse_initializers: bool = False,
    atol: float = DEFAULT_ATOL,
    metadata: Mapping[str, str] | None = None,
) -> ExportReport:
    """Export ``model`` to one self-contained ONNX file with a dynamic batch dimension, then check it.

    The model exported is an eval-mode CPU copy with ``torch.nn.utils.prune`` masks made
    permanent; ``model`` itself is not changed. ``example_input`` is one input batch (batch first).
    After export the file must pass ``onnx.checker.check_model(full_check=True)`` and onnxruntime
    (CPUExecutionProvider) must match PyTorch within ``atol`` (absolute, output units) at batch
    sizes 1 and 64, built from the rows of ``verify_inputs`` (real inputs, default
    ``example_input``; rows are cycled when there are fewer). The file appears at ``path`` only
    when every check passed; otherwise :class:`ExportVerificationError` says which failed.

    ``metadata`` is written to the file's ``metadata_props`` (string keys and values), e.g. the
    input normalisation the model expects (:data:`anrat.input_norm.METADATA_KEY`).

    ``sparse_initializers=True`` stores weights that are mostly zero (unstructured pruning) as
    ONNX sparse tensors. This is a disk-size format only: onnxruntime densifies them when it loads
    the model, so memory use and latency are those of the dense model.
    """
    if not isinstance(example_input, torch.Tensor) or example_input.dim() < 1 or example_input.shape[0] < 1:
        raise InputError("example_input must be a tensor with a batch dimension first")
    inputs = (example_input if verify_inputs is None else verify_inputs).detach().cpu()
    if inputs.shape[1:] != example_input.shape[1:]:
        raise InputError(
            f"verify_inputs rows have shape {tuple(inputs.shape[1:])}, example_input rows "
            f"{tuple(example_input.shape[1:])}"
        )
    exported = permanent_copy(model).cpu().eval()
    # torch.export specialises a dimension whose example size is 1, so trace a batch of at least 2
    example = _batch_of(example_input.detach().cpu(), max(2, example_input.shape[0]))
    with torch.no_grad():
        n_outputs = len(_outputs(exported(example)))

    path = Path(path)
    with atomic_path(path) as tmp:
        _export_dynamo(exported, example, tmp, opset, n_outputs)
        onnx.save(strip_debug_info(onnx.load(str(tmp))), str(tmp))
        sparse_names = _store_sparse(tmp) if sparse_initializers else []
        if metadata:
            _set_metadata(tmp, metadata)
        try:
            onnx.checker.check_model(str(tmp), full_check=True)
        except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
            raise ExportVerificationError(f"exported model fails onnx.checker: {str(exc).splitlines()[0]}") from None
        diffs = _verify(tmp, exported, inputs, atol)
    opset_used = next(
        o.version for o in onnx.load(str(path), load_external_data=False).opset_import if o.domain in ("", "ai.onnx")
    )
    return ExportReport(
        path=str(path),
        onnx_bytes=path.stat().st_size,
        opset=opset_used,
        exporter="torch.onnx.export(dynamo=True)",
        atol=atol,
        max_abs_diff=diffs,
        sparse_initializers=sparse_names,
    )


_ORT_DTYPES = {
    "tensor(float)": np.float32,
    "tensor(double)": np.float64,
    "tensor(float16)": np.float16,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
}


def _random_feed(session: ort.InferenceSession, batch_size: int) -> dict[str, np.ndarray]:
    """Random inputs for every graph input, with the first (dynamic) dimension set to ``batch_size``."""
    rng = np.random.default_rng(0)
    feed = {}
    for arg in session.get_inputs():
        shape = [batch_size, *arg.shape[1:]]
        if not all(isinstance(d, int) for d in shape):
            raise InputError(f"input {arg.name!r} has dynamic dimensions besides the batch: {arg.shape}")
        if arg.type not in _ORT_DTYPES:
            raise InputError(f"input {arg.name!r} has type {arg.type}; expected one of {sorted(_ORT_DTYPES)}")
        feed[arg.name] = rng.standard_normal(shape).astype(_ORT_DTYPES[arg.type])
    return feed


def _session(path: str | os.PathLike[str], threads: int | None) -> ort.InferenceSession:
    options = ort.SessionOptions()
    if threads is not None:
        options.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), sess_options=options, providers=_PROVIDERS)


def paired_latency(
    paths: Mapping[str, str | os.PathLike[str]],
    batch_size: int,
    *,
    repeats: int = 50,
    warmup: int = 5,
    threads: int | None = None,
) -> dict[str, float]:
    """Median wall-clock seconds of one onnxruntime (CPUExecutionProvider) call on a batch, for
    each named model, timed in alternation (call i of every model, then call i + 1, ...) so that a
    machine's drifting speed affects all of them alike.

    ``warmup`` untimed calls per model come first; ``threads`` sets onnxruntime's intra-op thread
    count (``None``: onnxruntime's default, one per physical core).
    """
    if batch_size < 1 or repeats < 1 or warmup < 0:
        raise InputError(f"need batch_size >= 1, repeats >= 1, warmup >= 0; got {batch_size}, {repeats}, {warmup}")
    sessions = {name: _session(path, threads) for name, path in paths.items()}
    feeds = {name: _random_feed(session, batch_size) for name, session in sessions.items()}
    for name, session in sessions.items():
        for _ in range(warmup):
            session.run(None, feeds[name])
    times: dict[str, list[float]] = {name: [] for name in sessions}
    for _ in range(repeats):
        for name, session in sessions.items():
            start = time.perf_counter()
            session.run(None, feeds[name])
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def onnx_latency(
    path: str | os.PathLike[str],
    batch_size: int,
    *,
    repeats: int = 50,
    warmup: int = 5,
    threads: int | None = None,
) -> float:
    """Median wall-clock seconds of one onnxruntime call on a batch (:func:`paired_latency` of one model)."""
    return paired_latency({"model": path}, batch_size, repeats=repeats, warmup=warmup, threads=threads)["model"]


def _model_figures(model: nn.Module, report: ExportReport) -> dict[str, Any]:
    return {
        "parameters": count_total(model),
        "nonzero_parameters": count_nonzero(model),
        "onnx_path": report.path,
        "onnx_bytes": report.onnx_bytes,
        "opset": report.opset,
        "max_abs_diff": report.as_dict()["max_abs_diff"],
        "latency_s": {},
    }


def onnx_test_error(path: Path, x: torch.Tensor, y: torch.Tensor, batch_size: int = 1000) -> float:
    """Fraction of ``(x, y)`` that the ONNX model at ``path`` misclassifies under onnxruntime (CPU)."""
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    wrong = 0
    for start in range(0, len(x), batch_size):
        scores = session.run(None, {name: x[start : start + batch_size].numpy()})[0]
        wrong += int((np.argmax(scores, axis=1) != y[start : start + batch_size].numpy()).sum())
    return wrong / len(x)


def compare_models(
    dense_model: nn.Module,
    pruned_model: nn.Module,
    example_input: torch.Tensor,
    out_dir: str | os.PathLike[str],
    *,
    verify_inputs: torch.Tensor | None = None,
    batch_sizes: tuple[int, ...] = (1, 256),
    repeats: int = 50,
    warmup: int = 5,
    threads: int | None = None,
    metadata: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """Export both models to ``out_dir`` (``dense.onnx``, ``pruned.onnx``) and report, side by side:
    parameters and nonzero parameters, ONNX file bytes, onnxruntime median latency in seconds per
    call at each batch size (dense and pruned measured alternately), and the ratios pruned/dense.

    Both exports pass the checks of :func:`export_onnx` (``metadata`` goes into both files) or
    this raises; ``"checks_passed"`` is then True and ``"checks"`` says what was checked.
    ``"speedup"`` is :func:`speedup_summary`. The result is JSON-ready.
    """
    out_dir = Path(out_dir)
    reports = {
        kind: export_onnx(
            model, out_dir / f"{kind}.onnx", example_input, verify_inputs=verify_inputs, metadata=metadata
        )
        for kind, model in (("dense", dense_model), ("pruned", pruned_model))
    }
    figures = {
        kind: _model_figures(model, reports[kind]) for kind, model in (("dense", dense_model), ("pruned", pruned_model))
    }
    for size in batch_sizes:
        latency = paired_latency(
            {kind: reports[kind].path for kind in ("dense", "pruned")},
            size,
            repeats=repeats,
            warmup=warmup,
            threads=threads,
        )
        for kind in ("dense", "pruned"):
            figures[kind]["latency_s"][str(size)] = latency[kind]
    dense, pruned = figures["dense"], figures["pruned"]
    ratios = {key: pruned[key] / dense[key] for key in ("parameters", "nonzero_parameters", "onnx_bytes")}
    ratios.update(
        {f"latency_s@{size}": pruned["latency_s"][str(size)] / dense["latency_s"][str(size)] for size in batch_sizes}
    )
    return {
        "dense": dense,
        "pruned": pruned,
        "ratio_pruned_to_dense": ratios,
        "speedup": speedup_summary(ratios, batch_sizes),
        "checks": [
            "onnx.checker.check_model(full_check=True)",
            f"onnxruntime CPUExecutionProvider matches PyTorch within {DEFAULT_ATOL:g} at batch sizes "
            f"{list(VERIFY_BATCH_SIZES)}",
        ],
        "checks_passed": True,
        "latency": f"median of {repeats} calls after {warmup} warm-up calls, dense and pruned calls alternating, "
        f"onnxruntime threads={threads or 'default'}",
        "versions": {"torch": torch.__version__, "onnx": onnx.__version__, "onnxruntime": ort.__version__},
        "exporter": reports["dense"].exporter,
    }


# Below this speed-up (dense latency / pruned latency) a pruned model is not called faster: the
# median of 50 onnxruntime calls moves by several percent between runs on a busy machine.
MIN_SPEEDUP = 1.1


def speedup_summary(ratios: Mapping[str, float], batch_sizes: tuple[int, ...]) -> dict[str, Any]:
    """onnxruntime speed-ups (dense latency / pruned latency) per batch size and a one-line verdict
    that says plainly when pruning made the deployed model no faster."""
    speedups = {str(b): 1 / ratios[f"latency_s@{b}"] for b in batch_sizes}
    shown = ", ".join(f"{v:.2f}x at batch {b}" for b, v in speedups.items())
    if max(speedups.values()) < MIN_SPEEDUP:
        verdict = (
            f"no speed-up in onnxruntime ({shown}): zeroed weights stay in dense tensors and are multiplied "
            "like any other; a model gets faster only as whole units go (--structured-only prunes units "
            "alone)"
        )
    else:
        verdict = f"onnxruntime speed-up {shown}"
    return {"by_batch_size": speedups, "faster": max(speedups.values()) >= MIN_SPEEDUP, "summary": verdict}


__all__ = [
    "DEFAULT_ATOL",
    "MIN_SPEEDUP",
    "ExportReport",
    "ExportVerificationError",
    "compare_models",
    "export_onnx",
    "onnx_latency",
    "paired_latency",
    "speedup_summary",
    "strip_debug_info",
]
