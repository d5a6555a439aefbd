"""Statistical pruning: significance tests, masks, layer surgery, fine-tuning, compact ONNX export.

The path a model takes: :func:`wald_test` (which connections and units are significant) ->
:func:`prune` (iterative test / prune / fine-tune with rollback; masks via
``torch.nn.utils.prune``, unit removal via torch-pruning) -> :func:`save_pruned` ->
:func:`export_onnx` (checked with ``onnx.checker`` and onnxruntime).
"""

from pruning.export import ExportReport, ExportVerificationError, compare_models, export_onnx, onnx_latency
from pruning.masks import apply_masks, count_nonzero, count_total, make_permanent, permanent_copy, sparsity
from pruning.prune import FineTune, PruneResult, prune, prune_to_sparsity
from pruning.pruned_checkpoint import import_factory, load_pruned, save_pruned
from pruning.saliency import magnitude_scores, masks_at_sparsity, obd_scores
from pruning.significance import WaldResult, center_softmax_layer, wald_test
from pruning.surgery import prune_units, widths_of

__all__ = [
    "ExportReport", "ExportVerificationError", "FineTune", "PruneResult", "WaldResult", "apply_masks", "center_softmax_layer",
    "compare_models", "count_nonzero", "count_total", "export_onnx", "import_factory", "load_pruned",
    "magnitude_scores", "make_permanent", "masks_at_sparsity", "obd_scores", "onnx_latency",
    "permanent_copy", "prune", "prune_to_sparsity", "prune_units", "save_pruned", "sparsity",
    "wald_test", "widths_of",
]
