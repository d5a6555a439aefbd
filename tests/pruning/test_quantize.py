"""int8 models by onnxruntime static quantisation: format, size, accuracy, the tolerance guard, refusals."""

import copy
import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import numpy_helper

from anrat.data import Split
from anrat.errors import InputError
from anrat.schedules import LambdaSchedule, ScheduleConfig
from anrat.trainer import TrainConfig, Trainer
from pruning.export import export_onnx
from pruning.quantize import check_calibration, check_quantize_options, quantize_onnx, write_int8
from pruning.report import _int8_lines


def make_images(n: int, seed: int) -> Split:
    """12x12 one-channel images whose class (of 3) is the quadrant holding a bright blob."""
    g = torch.Generator().manual_seed(seed)
    x = 0.3 * torch.randn(n, 1, 12, 12, generator=g)
    y = torch.randint(0, 3, (n,), generator=g)
    for i, c in enumerate(y.tolist()):
        r, col = (c // 2) * 6, (c % 2) * 6
        x[i, 0, r + 1 : r + 5, col + 1 : col + 5] += 1.5
    return Split(x, y)


@pytest.fixture(scope="module")
def trained_cnn(tmp_path_factory):
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(1, 16, 3),
        torch.nn.ReLU(),
        torch.nn.MaxPool2d(2),
        torch.nn.Conv2d(16, 16, 3),
        torch.nn.ReLU(),
        torch.nn.Flatten(),
        torch.nn.Linear(16 * 3 * 3, 64),
        torch.nn.ReLU(),
        torch.nn.Linear(64, 3),
    )
    train, val, test = make_images(1200, 0), make_images(400, 1), make_images(400, 2)
    Trainer(
        model, LambdaSchedule(ScheduleConfig(name="plain")), train, None, TrainConfig(epochs=4, lr=0.05), progress=False
    ).fit()
    folder = tmp_path_factory.mktemp("int8")
    path = folder / "model.onnx"
    export_onnx(model.eval(), path, val.x[:2], metadata={"anrat.input": "feed x as given"})
    return model, path, train, val, test


def _int8_weights(model: onnx.ModelProto) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """The int8 weight tensors (rank >= 2) that DequantizeLinear nodes read, and their scales."""
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    weights, scales = [], []
    for node in model.graph.node:
        x = inits.get(node.input[0]) if node.op_type == "DequantizeLinear" else None
        if x is not None and x.ndim >= 2:
            weights.append(x)
            scales.append(inits[node.input[1]])
    return weights, scales


def test_the_int8_model_is_qdq_per_channel_checked_and_keeps_the_input_contract(trained_cnn, tmp_path):
    model, path, _, val, _ = trained_cnn
    report = quantize_onnx(path, val.x[:200], tmp_path / "model.int8.onnx")
    int8 = onnx.load(str(tmp_path / "model.int8.onnx"))
    onnx.checker.check_model(int8, full_check=True)
    ops = [n.op_type for n in int8.graph.node]
    assert ops.count("QuantizeLinear") >= 4 and ops.count("DequantizeLinear") >= 8
    weights, scales = _int8_weights(int8)
    assert len(weights) == 4 and all(a.dtype == np.int8 for a in weights)
    # one scale per output channel: 16 filters, 16 filters, 64 and 3 units
    assert sorted(s.size for s in scales) == [3, 16, 16, 64]
    props = {p.key: p.value for p in int8.metadata_props}
    assert props["anrat.input"] == "feed x as given"
    assert all(not n.metadata_props and not n.name for n in int8.graph.node)  # no stack traces, no labels
    names = [i.name for i in int8.graph.initializer] + [o for n in int8.graph.node for o in n.output]
    assert max(map(len, names)) <= len("output") and [o.name for o in int8.graph.output] == ["output"]
    assert report.calibration_inputs == 200 and report.onnx_bytes == (tmp_path / "model.int8.onnx").stat().st_size
    assert report.onnx_bytes < report.float_bytes / 2.5  # int8 weights: a quarter of float32's, plus overheads
    # the int8 model classifies as the float one does on held-out images
    session = ort.InferenceSession(str(tmp_path / "model.int8.onnx"), providers=["CPUExecutionProvider"])
    int8_scores = session.run(None, {"input": val.x.numpy()})[0]
    with torch.no_grad():
        float_scores = model(val.x).numpy()
    agree = float((int8_scores.argmax(1) == float_scores.argmax(1)).mean())
    assert agree >= 0.98
    assert np.abs(int8_scores - float_scores).max() < 0.1 * np.abs(float_scores).max()


def test_sparse_stored_weights_are_quantised_too(trained_cnn, tmp_path):
    model, _, _, val, _ = trained_cnn
    sparse = copy.deepcopy(model)
    with torch.no_grad():
        w = sparse[6].weight
        w.mul_(w.abs() > w.abs().median() * 2)  # mostly zero: stored as a sparse constant
    path = tmp_path / "sparse.onnx"
    assert export_onnx(sparse.eval(), path, val.x[:2], sparse_initializers=True).sparse_initializers
    quantize_onnx(path, val.x[:100], tmp_path / "sparse.int8.onnx")
    weights, _ = _int8_weights(onnx.load(str(tmp_path / "sparse.int8.onnx")))
    assert len(weights) == 4  # the sparse one as well, densified before quantisation
    assert max((w == 0).mean() for w in weights) > 0.5  # its zeros stay zero


def test_write_int8_scores_both_models_and_writes_within_the_tolerance(trained_cnn, tmp_path):
    _, path, _, val, test = trained_cnn
    out = tmp_path / "model.int8.onnx"
    record = write_int8(path, out, val.x[:200], val, test, tolerance=0.01, repeats=5, batch_sizes=(1, 8))
    assert record["written"] and out.is_file() and record["path"] == str(out)
    errors = record["error"]
    assert set(errors) == {"val", "test"} and errors["val"]["int8"] - errors["val"]["float"] <= 0.01
    assert errors["test"]["float"] < 0.2  # the model learned the task
    assert set(record["latency_s"]["int8"]) == {"1", "8"} and record["bytes"]["int8"] == out.stat().st_size
    assert (
        record["cpu"]
        and "wrote" in record["line"]
        and record["int8_instructions"] in ("VNNI", "dot-product", "none", "unknown")
    )
    json.dumps(record)  # JSON-ready
    # the report's section: the same figures, and a plain word wherever int8 was slower
    text = "\n".join(_int8_lines(record))
    assert f"| ONNX file (bytes) | {record['bytes']['float']:,} | {record['bytes']['int8']:,} |" in text
    assert ("ran **slower**" in text) == bool(record["slower_at"])
    slower = {**record, "slower_at": [1], "int8_instructions": "none"}
    assert "ran **slower** than the float one at batch 1 on this CPU (it has no int8" in "\n".join(_int8_lines(slower))


def test_a_badly_calibrated_int8_model_is_not_written(trained_cnn, tmp_path):
    """Calibrated on inputs 100 times too small, the activation ranges are far too narrow: every
    real input saturates, the validation error rises beyond the tolerance, and no file appears."""
    _, path, _, val, test = trained_cnn
    out = tmp_path / "model.int8.onnx"
    out.write_bytes(b"an int8 copy of an earlier float model")
    record = write_int8(path, out, val.x[:200] * 0.01, val, test, tolerance=0.01, repeats=2, batch_sizes=(1,))
    assert record["error"]["val"]["int8"] > record["error"]["val"]["float"] + 0.01
    assert not record["written"] and not out.exists() and record["path"] is None
    assert record["line"].endswith("not written (the earlier one removed)") and list(tmp_path.iterdir()) == []


def test_calibration_data_must_fit_the_model(trained_cnn):
    _, path, _, val, _ = trained_cnn
    with pytest.raises(InputError, match=r"calibration data have shape \(4, 1, 10, 10\); the model takes"):
        check_calibration(path, val.x[:4, :, :10, :10])
    with pytest.raises(InputError, match="at least one input"):
        check_calibration(path, val.x[:0])
    with pytest.raises(InputError, match="finite"):
        check_calibration(path, torch.full((2, 1, 12, 12), float("nan")))
    assert check_calibration(path, val.x[:3].double()).dtype == np.float32


@pytest.mark.parametrize(
    "args, message",
    [
        (("int4", 10, 0.001), "unknown quantize 'int4'"),
        (("int8", 0, 0.001), "calibration_images must be an integer >= 1"),
        (("int8", True, 0.001), "calibration_images must be an integer >= 1"),
        (("int8", 10, -0.001), "quantize_tolerance must be in"),
        (("int8", 10, float("nan")), "quantize_tolerance must be in"),
    ],
)
def test_bad_quantize_options_are_refused(args, message):
    with pytest.raises(InputError, match=message):
        check_quantize_options(*args)
