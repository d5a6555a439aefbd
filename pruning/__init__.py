"""Statistical pruning: significance tests, masks, layer surgery, fine-tuning, compact ONNX export.

Data may be a :class:`Split`, an ``(x, y)`` pair of tensors, a ``Dataset`` or a ``DataLoader``
(:func:`as_split`); inputs reach the model exactly as given. :func:`evaluate` scores a model on
any of them; :class:`InputNorm` describes (and :func:`with_preprocessing` bakes in) an input
normalisation.

The path a model takes: :func:`wald_test` (which connections and units are significant) ->
:func:`prune` (iterative test / prune / fine-tune with rollback; masks via
``torch.nn.utils.prune``, unit removal via torch-pruning) -> :func:`save_pruned` ->
:func:`export_onnx` (checked with ``onnx.checker`` and onnxruntime). The standard errors come from a
:class:`FisherEstimator` (:class:`KfacEstimator`, :class:`FullEstimator`, :class:`DiagonalEstimator`;
``estimator="kfac"`` etc. by name); :func:`prune_to_sparsity` ranks weights by an :class:`Importance`
(:class:`MagnitudeImportance`, :class:`OBDImportance`, :class:`WaldImportance`; or by name).
"""

from anrat.data import Split, as_split
from anrat.input_norm import InputNorm, with_preprocessing
from anrat.trainer import evaluate
from pruning.acceptance import NonInferiority, paired_noninferiority
from pruning.estimators import DiagonalEstimator, FisherEstimator, FullEstimator, KfacEstimator, fisher_estimator
from pruning.export import (
    ExportReport,
    ExportVerificationError,
    compare_models,
    export_onnx,
    onnx_latency,
    speedup_summary,
)
from pruning.importance import Importance, MagnitudeImportance, OBDImportance, WaldImportance, make_importance
from pruning.layers import output_layer, prunable_layers
from pruning.masks import apply_masks, count_nonzero, count_total, make_permanent, permanent_copy, sparsity
from pruning.prune import FineTune, PruneConfig, PruneResult, Target, prune, prune_to_sparsity, round_line
from pruning.pruned_checkpoint import import_factory, load_pruned, save_pruned
from pruning.saliency import magnitude_scores, masks_at_sparsity, obd_scores
from pruning.significance import WaldResult, center_softmax_layer, wald_test
from pruning.surgery import prune_units, widths_of

__all__ = [
    "DiagonalEstimator",
    "ExportReport",
    "ExportVerificationError",
    "FineTune",
    "FisherEstimator",
    "FullEstimator",
    "Importance",
    "InputNorm",
    "KfacEstimator",
    "MagnitudeImportance",
    "NonInferiority",
    "OBDImportance",
    "PruneConfig",
    "PruneResult",
    "Split",
    "Target",
    "WaldImportance",
    "WaldResult",
    "apply_masks",
    "as_split",
    "center_softmax_layer",
    "compare_models",
    "count_nonzero",
    "count_total",
    "evaluate",
    "export_onnx",
    "fisher_estimator",
    "import_factory",
    "load_pruned",
    "magnitude_scores",
    "make_importance",
    "make_permanent",
    "masks_at_sparsity",
    "obd_scores",
    "onnx_latency",
    "output_layer",
    "paired_noninferiority",
    "permanent_copy",
    "prunable_layers",
    "prune",
    "prune_to_sparsity",
    "prune_units",
    "round_line",
    "save_pruned",
    "sparsity",
    "speedup_summary",
    "wald_test",
    "widths_of",
    "with_preprocessing",
]
