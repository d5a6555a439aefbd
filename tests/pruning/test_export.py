"""ONNX export: one checked file, onnxruntime parity, dynamic batch, smaller after surgery."""

from __future__ import annotations

import copy
import errno
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx.external_data_helper import uses_external_data

from anrat.errors import WriteFailed
from anrat.models import count_parameters, lenet5, mlp
from pruning import export as export_module
from pruning.export import ExportVerificationError, compare_models, export_onnx, onnx_latency
from pruning.masks import apply_masks
from pruning.surgery import prune_units

FLOAT32_BYTES = 4


@pytest.fixture(scope="module")
def lenet_pair(tmp_path_factory: pytest.TempPathFactory):
    """A dense lenet5 and a copy keeping half the filters of each convolution and 10% of fc1's
    units, exported side by side by compare_models (each export is verified on the way)."""
    torch.manual_seed(0)
    dense = lenet5()
    inputs = torch.randn(80, 1, 28, 28)
    pruned = copy.deepcopy(dense)
    prune_units(pruned, {"conv1": range(10), "conv2": range(0, 50, 2), "fc1": range(50, 500)}, inputs[:1])
    out_dir = tmp_path_factory.mktemp("lenet")
    figures = compare_models(dense, pruned, inputs[:1], out_dir, verify_inputs=inputs, repeats=3, warmup=1)
    return dense, pruned, inputs, figures, out_dir


def _run(path: str, batch: torch.Tensor) -> np.ndarray:
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: batch.numpy()})[0]


def test_lenet5_export_matches_pytorch_at_batch_1_and_64(lenet_pair):
    dense, pruned, inputs, figures, _ = lenet_pair
    assert dense.training  # the caller's model was not switched to eval
    for model, kind in ((dense.eval(), "dense"), (pruned.eval(), "pruned")):
        assert set(figures[kind]["max_abs_diff"]) == {"1", "64"}
        assert max(figures[kind]["max_abs_diff"].values()) <= 1e-4
        with torch.no_grad():
            for size in (1, 64):
                expected = model(inputs[:size]).numpy()
                np.testing.assert_allclose(_run(figures[kind]["onnx_path"], inputs[:size]), expected, rtol=0, atol=1e-4)


def test_export_is_one_self_contained_file(lenet_pair):
    _, _, _, figures, out_dir = lenet_pair
    assert sorted(p.name for p in out_dir.iterdir()) == [
        "dense.onnx",
        "pruned.onnx",
    ]  # no external data, no temporaries
    loaded = onnx.load(figures["dense"]["onnx_path"])
    assert not any(uses_external_data(t) for t in loaded.graph.initializer)
    assert (
        sum(int(np.prod(t.dims)) for t in loaded.graph.initializer if t.data_type == onnx.TensorProto.FLOAT) == 431_080
    )
    onnx.checker.check_model(loaded, full_check=True)


def test_batch_dimension_is_dynamic(lenet_pair):
    dense, _, inputs, figures, _ = lenet_pair
    dense.eval()
    path = figures["dense"]["onnx_path"]
    dim = onnx.load(path).graph.input[0].type.tensor_type.shape.dim[0]
    assert dim.dim_param and not dim.dim_value
    for size in (3, 17):
        with torch.no_grad():
            np.testing.assert_allclose(_run(path, inputs[:size]), dense(inputs[:size]).numpy(), rtol=0, atol=1e-4)


def test_structurally_pruned_lenet5_is_smaller_in_proportion(lenet_pair):
    dense, pruned, _, figures, _ = lenet_pair
    dense_params, pruned_params = count_parameters(dense), count_parameters(pruned)
    assert figures["dense"]["parameters"] == dense_params == 431_080
    assert figures["pruned"]["parameters"] == pruned_params == 260 + 6_275 + 20_050 + 510
    dense_bytes, pruned_bytes = figures["dense"]["onnx_bytes"], figures["pruned"]["onnx_bytes"]
    # the weights take 4 bytes each; the rest of the file (graph, names) is the same for both
    overhead = dense_bytes - FLOAT32_BYTES * dense_params
    assert 0 < overhead < 32_768
    assert FLOAT32_BYTES * pruned_params < pruned_bytes <= FLOAT32_BYTES * pruned_params + overhead + 1_024
    assert figures["ratio_pruned_to_dense"]["onnx_bytes"] == pytest.approx(pruned_bytes / dense_bytes)
    assert figures["checks_passed"] is True
    for kind in ("dense", "pruned"):
        assert set(figures[kind]["latency_s"]) == {"1", "256"}
        assert all(0 < t < 1 for t in figures[kind]["latency_s"].values())


def test_mlp_export_and_a_failed_verification(tmp_path: Path):
    torch.manual_seed(1)
    model = mlp(hidden=(128, 64))
    x = torch.rand(64, 1, 28, 28)
    report = export_onnx(model, tmp_path / "mlp.onnx", x[:1], verify_inputs=x)
    assert set(report.max_abs_diff) == {1, 64} and max(report.max_abs_diff.values()) <= 1e-4
    with torch.no_grad():
        for size in (1, 64):
            np.testing.assert_allclose(_run(report.path, x[:size]), model(x[:size]).numpy(), rtol=0, atol=1e-4)

    # float32 ONNX and PyTorch kernels round differently, so a tolerance of 1e-12 cannot be met
    with pytest.raises(
        ExportVerificationError, match=r"disagrees with PyTorch at batch 1: max \|difference\| = .* > tolerance 1e-12"
    ):
        export_onnx(lenet5(), tmp_path / "strict.onnx", torch.randn(1, 1, 28, 28), atol=1e-12)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mlp.onnx"]  # the failed file never appeared


def test_sparse_initializers_shrink_the_file_and_still_verify(lenet_pair, tmp_path: Path):
    _, _, inputs, figures, _ = lenet_pair
    torch.manual_seed(2)
    model = lenet5()
    gen = torch.Generator().manual_seed(3)
    apply_masks(
        model,
        {n: torch.rand(p.shape, generator=gen) < 0.1 for n, p in model.named_parameters() if n.endswith("weight")},
    )
    report = export_onnx(model, tmp_path / "sparse.onnx", inputs[:1], verify_inputs=inputs, sparse_initializers=True)

    assert sorted(report.sparse_initializers) == ["conv1.weight", "conv2.weight", "fc1.weight", "fc2.weight"]
    graph = onnx.load(report.path).graph
    assert sum(1 for node in graph.node if any(a.name == "sparse_value" for a in node.attribute)) == 4
    # ~10% of the weights kept, 4 value bytes + 8 index bytes each: about 30% of the dense file
    assert report.onnx_bytes < 0.4 * figures["dense"]["onnx_bytes"]
    assert max(report.max_abs_diff.values()) <= 1e-4


def test_onnx_latency_is_a_median_in_seconds(lenet_pair):
    path = lenet_pair[3]["dense"]["onnx_path"]
    single = onnx_latency(path, 1, repeats=5, warmup=1, threads=1)
    batch = onnx_latency(path, 128, repeats=5, warmup=1, threads=1)
    assert 0 < single < batch < 5  # 128 images cost more than one on one thread


def test_a_full_disk_during_export_is_a_failed_write_not_a_bad_model(tmp_path, monkeypatch):
    """ENOSPC from the exporter's own write reaches the command line as a failed write (exit 1,
    the file named), not as an export the model failed; the earlier file stays."""
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 2)).eval()
    path = tmp_path / "m.onnx"
    path.write_bytes(b"an earlier model")

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(export_module.torch.onnx, "export", full_disk)
    with pytest.raises(
        WriteFailed, match=r"no space left on device while writing .*m\.onnx; the previous m\.onnx is intact"
    ):
        export_module.export_onnx(model, path, torch.rand(2, 4))
    assert path.read_bytes() == b"an earlier model" and sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]
