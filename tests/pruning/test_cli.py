"""``python -m pruning``: prune a trainer checkpoint or a factory model, export, refuse bad input."""

import json

import numpy as np
import onnxruntime as ort
import pytest
import torch

from anrat.checkpoint import load_checkpoint
from anrat.data import load_dataset
from anrat.errors import InputError
from anrat.train import main as train_main
from pruning.__main__ import main
from pruning.pruned_checkpoint import load_pruned

SUBSETS = ["--train-subset", "1500", "--val-size", "1000", "--test-subset", "500"]


@pytest.fixture(scope="module")
def trained_checkpoint(mnist_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("train")
    code = train_main(["--data-dir", str(mnist_dir), "--out", str(out), "--model", "mlp", "--hidden", "24",
                       "--schedule", "plain", "--epochs", "3", "--lr", "0.1", "--no-progress", *SUBSETS])
    assert code == 0
    return out / "model.pt"


def test_prune_a_trainer_checkpoint_end_to_end(trained_checkpoint, mnist_dir, tmp_path, run_cli):
    out = tmp_path / "pruned"
    code, io = run_cli(main, ["prune", "--checkpoint", str(trained_checkpoint), "--data-dir", str(mnist_dir),
                              "--out", str(out), "--max-samples", "1000", "--max-rounds", "2", "--tolerance", "0.02",
                              "--quiet", *SUBSETS])
    assert code == 0, io.err
    report = json.loads((out / "report.json").read_text())
    assert report["nonzero_after"] < report["params_before"]
    assert report["onnx"]["pruned"]["onnx_bytes"] < report["onnx"]["dense"]["onnx_bytes"]
    model = load_pruned(out / "pruned.pt")  # weights_only, rebuilt from the new widths
    assert load_checkpoint(out / "pruned.pt")["arch"]["kwargs"]["hidden"][0] == model.fc1.out_features
    # the ONNX file computes what the checkpoint computes, and scores what the report says
    test = load_dataset("mnist", mnist_dir, val_size=1000, train_subset=1500, test_subset=500).test
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    logits = session.run(None, {session.get_inputs()[0].name: test.x.numpy()})[0]
    with torch.no_grad():
        reference = model.eval()(test.x).numpy()
    assert np.abs(logits - reference).max() <= 1e-4
    error = float((logits.argmax(1) != test.y.numpy()).mean())
    assert error == pytest.approx(report["test_after"]["error"])


def test_export_any_checkpoint(trained_checkpoint, mnist_dir, tmp_path, run_cli):
    code, io = run_cli(main, ["export", str(trained_checkpoint), "--out", str(tmp_path / "m.onnx"),
                              "--data-dir", str(mnist_dir)])
    assert code == 0, io.err
    assert (tmp_path / "m.onnx").stat().st_size > 0 and "onnxruntime" in io.out


def test_factory_model_and_its_weights(trained_checkpoint, mnist_dir, tmp_path, run_cli):
    weights = tmp_path / "weights.pt"
    torch.save(load_checkpoint(trained_checkpoint)["state_dict"], weights)
    out = tmp_path / "factory"
    code, io = run_cli(main, ["prune", "--factory", "anrat.models:mlp", "--factory-kwargs", '{"hidden": [24]}',
                              "--weights", str(weights), "--data-dir", str(mnist_dir), "--out", str(out),
                              "--max-samples", "500", "--max-rounds", "1", "--tolerance", "0.05", "--quiet", *SUBSETS])
    assert code == 0, io.err
    with pytest.raises(InputError, match="runs code"):
        load_pruned(out / "pruned.pt")  # a factory is only called when the caller trusts it
    model = load_pruned(out / "pruned.pt", allow_factories=["anrat.models:mlp"])
    assert model.fc1.out_features <= 24


class Gadget:
    """Any class: pickling it makes a file that needs code to load."""


@pytest.mark.parametrize("argv, message", [
    (["prune", "--factory", "no_such_module_xyz:build", "--weights", "w.pt"], "cannot import module"),
    (["prune", "--checkpoint", "missing.pt"], "does not exist"),
    (["prune", "--alpha", "0", "--checkpoint", "x.pt"], "--alpha must be in (0, 1)"),
    (["prune", "--factory", "anrat.models:mlp", "--factory-kwargs", "{bad", "--weights", "w.pt"], "not valid JSON"),
])
def test_bad_input_exits_2_with_one_line(argv, message, tmp_path, run_cli, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, io = run_cli(main, argv + ["--out", str(tmp_path / "o")])
    assert code == 2
    lines = io.err.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], io.err


def test_pickled_code_is_refused(tmp_path, run_cli, mnist_dir):
    bad = tmp_path / "evil.pt"
    torch.save({"state_dict": {}, "payload": Gadget()}, bad)
    code, io = run_cli(main, ["prune", "--factory", "anrat.models:mlp", "--weights", str(bad),
                              "--data-dir", str(mnist_dir), "--out", str(tmp_path / "o")])
    assert code == 2 and "pickled" in io.err and len(io.err.strip().splitlines()) == 1


def test_model_that_does_not_fit_the_data(trained_checkpoint, tmp_path, run_cli, mnist_dir):
    weights = tmp_path / "w.pt"
    torch.save({"fc1.weight": torch.zeros(8, 100), "fc1.bias": torch.zeros(8),
                "fc2.weight": torch.zeros(10, 8), "fc2.bias": torch.zeros(10)}, weights)
    code, io = run_cli(main, ["prune", "--factory", "anrat.models:mlp",
                              "--factory-kwargs", '{"in_features": 100, "hidden": [8]}', "--weights", str(weights),
                              "--data-dir", str(mnist_dir), "--out", str(tmp_path / "o"), *SUBSETS])
    assert code == 2 and "does not accept mnist inputs" in io.err, io.err
