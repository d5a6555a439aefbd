"""``python -m pruning``: prune a trainer checkpoint or a factory model, export, refuse bad input."""

import copy
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
from pruning.removable import removable_set
from pruning.significance import wald_test

SUBSETS = ["--train-subset", "1500", "--val-size", "1000", "--test-subset", "500"]


@pytest.fixture(scope="module")
def trained_checkpoint(mnist_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("train")
    code = train_main(
        [
            "--data-dir",
            str(mnist_dir),
            "--out",
            str(out),
            "--model",
            "mlp",
            "--hidden",
            "24",
            "--schedule",
            "plain",
            "--epochs",
            "3",
            "--lr",
            "0.1",
            "--no-progress",
            *SUBSETS,
        ]
    )
    assert code == 0
    return out / "model.pt"


def test_prune_a_trainer_checkpoint_end_to_end(trained_checkpoint, mnist_dir, tmp_path, run_cli):
    out = tmp_path / "pruned"
    code, io = run_cli(
        main,
        [
            "prune",
            "--checkpoint",
            str(trained_checkpoint),
            "--data-dir",
            str(mnist_dir),
            "--out",
            str(out),
            "--max-samples",
            "1000",
            "--max-rounds",
            "2",
            "--tolerance",
            "0.02",
            "--quiet",
            *SUBSETS,
        ],
    )
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


def test_prune_to_a_weight_target_reports_the_cost_with_its_bound(trained_checkpoint, mnist_dir, tmp_path, run_cli):
    out = tmp_path / "target"
    argv = ["prune", "--checkpoint", str(trained_checkpoint), "--data-dir", str(mnist_dir), "--out", str(out)]
    code, io = run_cli(
        main, argv + ["--max-samples", "500", "--max-rounds", "8", "--target-params", "0.2", "--step", "0.5", *SUBSETS]
    )
    assert code == 0, io.err
    report = json.loads((out / "report.json").read_text())
    rounds = report["rounds"]
    assert rounds[-1]["stopped"] == "target reached" and not any(r.get("rolled_back") for r in rounds)
    pruned = load_pruned(out / "pruned.pt")  # the delivered model holds no more weights than asked
    weights = [m.weight for m in pruned.modules() if isinstance(m, torch.nn.Linear)]
    assert sum(int((w != 0).sum()) for w in weights) <= rounds[-1]["target_params"]
    assert rounds[-1]["target_params"] == int(0.2 * (784 * 24 + 24 * 10))  # a fraction of the dense mlp's weights
    a = report["acceptance"]  # the delivered model's cost, with its bound, whatever it is
    assert a["n"] == 1000 and a["upper"] >= a["estimate"] and "upper bound" in io.out


def test_the_test_command_summarises_and_writes_the_removable_masks(trained_checkpoint, mnist_dir, tmp_path, run_cli):
    """``pruning test`` on a small MLP: its removable masks are the held-out deletion test's, run on
    the same images through the library, and the weights they mark can go at once."""
    out = tmp_path / "test"
    argv = ["test", "--checkpoint", str(trained_checkpoint), "--data-dir", str(mnist_dir), "--out", str(out)]
    options = ["--max-samples", "800", "--estimator", "diagonal", "--tolerance", "0.02", "--quiet", *SUBSETS]
    code, io = run_cli(main, argv + options)  # 1,000 held-out images: a margin of 2 points
    assert code == 0, io.err
    removable = torch.load(out / "removable.pt", weights_only=True)
    model = load_pruned(trained_checkpoint).eval()
    assert set(removable) == {"fc1.weight", "fc2.weight"}
    assert all(removable[n].dtype == torch.bool and removable[n].shape == p.shape for n, p in removable.items())
    # the same tests through the library, on the images the command used (the trainer's held-out 1,000)
    data = load_dataset("mnist", mnist_dir, val_size=1000, train_subset=1500)
    direct = wald_test(model, data.train, estimator="diagonal", max_samples=800)
    tested = copy.deepcopy(model)
    direct.center_layers(tested)
    at_once = removable_set(tested, direct.scores(), data.val, margin=0.02)
    for name, mask in at_once.masks.items():
        assert torch.equal(mask, removable[name])
    assert 0 < at_once.fraction < 1 and at_once.line() in io.out
    # what it marks can go at once: zeroed together, the model stays within the margin on those images
    with torch.no_grad():
        for name, mask in removable.items():
            dict(tested.named_parameters())[name].mul_(~mask)
    last = [t for t in at_once.tests if t["accepted"]][-1]
    assert last["upper"] < 0.02 and last["fraction"] == pytest.approx(at_once.fraction, abs=1e-3)
    singly = sum(int(m.sum()) for m in direct.removable().values())
    assert f"not significant one by one at alpha = 0.05: {singly:,} of {784 * 24 + 24 * 10:,} weights" in io.out
    summary = (out / "summary.md").read_text()
    fc1_significant = int(direct.significant["fc1.weight"].sum())
    assert f"| fc1 | {784 * 24:,} | {fc1_significant:,} |" in summary
    assert summary.count("| unit | estimate: L2 norm | standard error | chi2 | df | p-value | significant |") == 2
    assert len([line for line in summary.splitlines() if line.startswith("| ") and "| 784 |" in line]) == 24
    assert summary.count("| weights removed at once |") == 1
    # the row of fc1's strongest unit: its norm, delta-method standard error, chi2 and p-value
    k = int(torch.argmax(direct.unit_chi2["fc1"]))
    w, se = model.fc1.weight[k].detach().double(), direct.se["fc1.weight"][k].double()
    norm = float(w.norm())
    sd = float(((w / norm).square() * se.square()).sum().sqrt())
    row = f"| {k} | {norm:.4g} | {sd:.4g} | {float(direct.unit_chi2['fc1'][k]):.4g} | 784 | "
    assert row in summary


def test_export_any_checkpoint(trained_checkpoint, mnist_dir, tmp_path, run_cli):
    code, io = run_cli(
        main, ["export", str(trained_checkpoint), "--out", str(tmp_path / "m.onnx"), "--data-dir", str(mnist_dir)]
    )
    assert code == 0, io.err
    assert (tmp_path / "m.onnx").stat().st_size > 0 and "onnxruntime" in io.out


def test_factory_model_and_its_weights(trained_checkpoint, mnist_dir, tmp_path, run_cli):
    weights = tmp_path / "weights.pt"
    torch.save(load_checkpoint(trained_checkpoint)["state_dict"], weights)
    out = tmp_path / "factory"
    code, io = run_cli(
        main,
        [
            "prune",
            "--factory",
            "anrat.models:mlp",
            "--factory-kwargs",
            '{"hidden": [24]}',
            "--weights",
            str(weights),
            "--data-dir",
            str(mnist_dir),
            "--out",
            str(out),
            "--max-samples",
            "500",
            "--max-rounds",
            "1",
            "--tolerance",
            "0.05",
            "--quiet",
            *SUBSETS,
        ],
    )
    assert code == 0, io.err
    with pytest.raises(InputError, match="runs code"):
        load_pruned(out / "pruned.pt")  # a factory is only called when the caller trusts it
    model = load_pruned(out / "pruned.pt", allow_factories=["anrat.models:mlp"])
    assert model.fc1.out_features <= 24


class Gadget:
    """Any class: pickling it makes a file that needs code to load."""


@pytest.mark.parametrize(
    "argv, message",
    [
        (["prune", "--factory", "no_such_module_xyz:build", "--weights", "w.pt"], "cannot import module"),
        (["prune", "--checkpoint", "missing.pt"], "does not exist"),
        (["prune", "--alpha", "0", "--checkpoint", "x.pt"], "alpha must be a number in (0, 1), got 0.0"),
        (["prune", "--factory", "anrat.models:mlp", "--factory-kwargs", "{bad", "--weights", "w.pt"], "not valid JSON"),
    ],
)
def test_bad_input_exits_2_with_one_line(argv, message, tmp_path, run_cli, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, io = run_cli(main, argv + ["--out", str(tmp_path / "o")])
    assert code == 2
    lines = io.err.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], io.err


def test_pickled_code_is_refused(tmp_path, run_cli, mnist_dir):
    bad = tmp_path / "evil.pt"
    torch.save({"state_dict": {}, "payload": Gadget()}, bad)
    code, io = run_cli(
        main,
        [
            "prune",
            "--factory",
            "anrat.models:mlp",
            "--weights",
            str(bad),
            "--data-dir",
            str(mnist_dir),
            "--out",
            str(tmp_path / "o"),
        ],
    )
    assert code == 2 and "pickled" in io.err and len(io.err.strip().splitlines()) == 1


def test_model_that_does_not_fit_the_data(trained_checkpoint, tmp_path, run_cli, mnist_dir):
    weights = tmp_path / "w.pt"
    torch.save(
        {
            "fc1.weight": torch.zeros(8, 100),
            "fc1.bias": torch.zeros(8),
            "fc2.weight": torch.zeros(10, 8),
            "fc2.bias": torch.zeros(10),
        },
        weights,
    )
    code, io = run_cli(
        main,
        [
            "prune",
            "--factory",
            "anrat.models:mlp",
            "--factory-kwargs",
            '{"in_features": 100, "hidden": [8]}',
            "--weights",
            str(weights),
            "--data-dir",
            str(mnist_dir),
            "--out",
            str(tmp_path / "o"),
            *SUBSETS,
        ],
    )
    assert code == 2 and "does not accept inputs from mnist" in io.err, io.err


# --- a user's own model on raw pixels: the input contract ------------------------------------
USER_MODULE = """
from torch import nn

def build(width=8):
    return nn.Sequential(nn.Conv2d(1, width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(4), nn.Flatten(),
                         nn.Linear(width * 49, 32), nn.ReLU(), nn.Linear(32, 10))
"""
FASHION_SUBSETS = ["--train-subset", "3000", "--test-subset", "1000"]


def _idx_images_over_255(path):
    """Test images read straight from the IDX file (independent of anrat), as pixel / 255."""
    import gzip

    raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    return torch.from_numpy(np.frombuffer(raw, np.uint8, offset=16).reshape(-1, 1, 28, 28).copy()).float() / 255


@pytest.fixture(scope="module")
def user_model(fashion_mnist_dir, tmp_path_factory):
    """A small CNN trained by plain PyTorch on raw [0, 1] Fashion-MNIST pixels, importable as a factory."""
    folder = tmp_path_factory.mktemp("user")
    (folder / "my_cnn.py").write_text(USER_MODULE)
    with pytest.MonkeyPatch.context() as patch:
        patch.syspath_prepend(str(folder))
        from my_cnn import build

        data = load_dataset("fashion_mnist", fashion_mnist_dir, val_size=1000, input_norm="none", train_subset=3000)
        torch.manual_seed(0)
        model = build()
        optimizer = torch.optim.Adam(model.parameters(), 3e-3)
        for epoch in range(4):
            for x, y in data.train.batches(64, shuffle=True, generator=torch.Generator().manual_seed(epoch)):
                optimizer.zero_grad()
                torch.nn.functional.cross_entropy(model(x), y).backward()
                optimizer.step()
        torch.save(model.state_dict(), folder / "my.pt")
        torch.save({"x": data.val.x, "y": data.val.y}, folder / "val.pt")
        yield folder, model.eval()


def test_a_user_model_keeps_its_input_contract(user_model, fashion_mnist_dir, tmp_path, run_cli, monkeypatch):
    folder, model = user_model
    monkeypatch.syspath_prepend(str(folder))
    out = tmp_path / "pruned"
    code, io = run_cli(
        main,
        [
            "prune",
            "--factory",
            "my_cnn:build",
            "--weights",
            str(folder / "my.pt"),
            "--dataset",
            "fashion_mnist",
            "--data-dir",
            str(fashion_mnist_dir),
            "--val-data",
            str(folder / "val.pt"),
            "--out",
            str(out),
            "--max-samples",
            "500",
            "--max-rounds",
            "2",
            "--tolerance",
            "0.1",
            "--fine-tune-lr",
            "3e-3",
            "--fine-tune-epochs",
            "2",
            "--quiet",
            *FASHION_SUBSETS,
        ],
    )
    assert code == 0, io.err
    report = json.loads((out / "report.json").read_text())
    # the dense error the command reports is the original model's on the inputs it was trained on
    images = _idx_images_over_255(next(fashion_mnist_dir.glob("t10k-images-idx3-ubyte*")))[:1000]
    labels = load_dataset("fashion_mnist", fashion_mnist_dir, val_size=0, test_subset=1000).test.y
    with torch.no_grad():
        independent = float((model(images).argmax(1) != labels).double().mean())
    assert report["test_before"]["error"] == independent
    assert report["input_norm"]["mean"] == [] and "factory" in report["input_norm"]["origin"]
    assert report["data"]["val"].startswith("tensor file")
    assert report["nonzero_after"] < report["params_before"]
    # the ONNX model takes the same raw inputs and scores what the report says, and says what it takes
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    logits = session.run(None, {session.get_inputs()[0].name: images.numpy()})[0]
    assert float((logits.argmax(1) != labels.numpy()).mean()) == pytest.approx(report["test_after"]["error"])
    meta = json.loads(session.get_modelmeta().custom_metadata_map["anrat.input_norm"])
    assert meta["mean"] == [] and meta["in_graph"] is False
    assert load_checkpoint(out / "pruned.pt")["input_norm"]["mean"] == []
    # honest deployment figures are in the report and in the summary line
    assert set(report["deployment"]["by_batch_size"]) == {"1", "256"}
    assert report["deployment"]["summary"] in io.out


def test_export_a_plain_state_dict_with_its_factory(user_model, tmp_path, run_cli, monkeypatch):
    folder, model = user_model
    monkeypatch.syspath_prepend(str(folder))
    code, io = run_cli(
        main,
        ["export", "--factory", "my_cnn:build", "--weights", str(folder / "my.pt"), "--out", str(tmp_path / "m.onnx")],
    )
    assert code == 0, io.err
    x = torch.rand(5, 1, 28, 28)
    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        np.testing.assert_allclose(session.run(None, {"input": x.numpy()})[0], model(x).numpy(), atol=1e-4)


def test_export_with_preprocessing_takes_raw_pixels(trained_checkpoint, mnist_dir, tmp_path, run_cli):
    code, io = run_cli(
        main,
        [
            "export",
            str(trained_checkpoint),
            "--out",
            str(tmp_path / "raw.onnx"),
            "--include-preprocessing",
            "--data-dir",
            str(mnist_dir),
        ],
    )
    assert code == 0, io.err
    assert "normalisation in the graph" in io.out
    pixels = load_dataset("mnist", mnist_dir, val_size=0, test_subset=64, input_norm="none").test.x
    model = load_pruned(trained_checkpoint).eval()
    session = ort.InferenceSession(str(tmp_path / "raw.onnx"), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        expected = model((pixels - 0.1307) / 0.3081).numpy()  # what anrat-train fed the model
    np.testing.assert_allclose(session.run(None, {"input": pixels.numpy()})[0], expected, atol=1e-4)
    meta = json.loads(session.get_modelmeta().custom_metadata_map["anrat.input_norm"])
    assert meta["in_graph"] is True and meta["mean"] == [0.1307]


def test_export_an_int8_model_beside_the_float_one(trained_checkpoint, mnist_dir, tmp_path, run_cli):
    argv = ["export", str(trained_checkpoint), "--out", str(tmp_path / "raw.onnx"), "--include-preprocessing"]
    code, io = run_cli(
        main, argv + ["--data-dir", str(mnist_dir), "--quantize", "int8", "--quantize-tolerance", "0.01"]
    )
    assert code == 0, io.err
    assert "wrote" in io.out and "int8 validation error" in io.out
    float_bytes, int8_bytes = (tmp_path / "raw.onnx").stat().st_size, (tmp_path / "raw.int8.onnx").stat().st_size
    assert int8_bytes < float_bytes / 3  # int8 weights of a 784-24-10 MLP, a quarter of float32's plus overheads
    # it takes raw pixels too (the normalisation is in the graph) and classifies as the float model does
    pixels = load_dataset("mnist", mnist_dir, val_size=0, test_subset=500, input_norm="none").test.x.numpy()
    scores = {
        name: ort.InferenceSession(str(tmp_path / name), providers=["CPUExecutionProvider"]).run(
            None, {"input": pixels}
        )[0]
        for name in ("raw.onnx", "raw.int8.onnx")
    }
    assert (scores["raw.onnx"].argmax(1) == scores["raw.int8.onnx"].argmax(1)).mean() >= 0.97
    session = ort.InferenceSession(str(tmp_path / "raw.int8.onnx"), providers=["CPUExecutionProvider"])
    assert json.loads(session.get_modelmeta().custom_metadata_map["anrat.input_norm"])["in_graph"] is True


def test_an_int8_model_over_the_tolerance_is_not_written_and_exits_1(trained_checkpoint, mnist_dir, tmp_path, run_cli):
    """Calibrated on one blank image, the activation ranges are far too narrow for real digits: the
    int8 model's validation error rises past the tolerance, so only the float file is written."""
    pixels = load_dataset("mnist", mnist_dir, val_size=0, test_subset=300, input_norm="none").test
    blank_first = {"x": torch.cat([torch.zeros(1, 1, 28, 28), pixels.x]), "y": torch.cat([pixels.y[:1], pixels.y])}
    torch.save(blank_first, tmp_path / "val.pt")
    argv = [
        "export",
        str(trained_checkpoint),
        "--out",
        str(tmp_path / "m.onnx"),
        "--val-data",
        str(tmp_path / "val.pt"),
    ]
    code, io = run_cli(main, argv + ["--quantize", "int8", "--calibration-images", "1"])
    assert code == 1, io.out + io.err
    assert (tmp_path / "m.onnx").is_file() and not (tmp_path / "m.int8.onnx").exists()
    assert len(io.err.strip().splitlines()) == 1 and "m.int8.onnx not written" in io.err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "val.pt"]  # no temporary left behind


def test_a_trainer_checkpoint_records_its_normalisation(trained_checkpoint):
    ckpt = load_checkpoint(trained_checkpoint)
    assert ckpt["input_norm"]["mean"] == [0.1307] and ckpt["input_norm"]["std"] == [0.3081]


def test_a_plain_state_dict_given_as_checkpoint_points_to_factory(tmp_path, run_cli):
    torch.save({"fc.weight": torch.zeros(2, 2)}, tmp_path / "sd.pt")
    code, io = run_cli(main, ["export", str(tmp_path / "sd.pt"), "--out", str(tmp_path / "m.onnx")])
    assert code == 2 and len(io.err.strip().splitlines()) == 1 and "--factory" in io.err, io.err
    assert not (tmp_path / "m.onnx").exists()


@pytest.mark.parametrize("bad", [["--method", "nosuch"], ["--fine-tune-optimizer", "nosuch"], ["--step", "-0.5"]])
def test_a_refused_prune_leaves_the_folder_as_it_was(bad, trained_checkpoint, mnist_dir, tmp_path, run_cli):
    out = tmp_path / "earlier"
    out.mkdir()
    before = {name: f"earlier {name}".encode() for name in ("rounds.jsonl", "report.json", "model.onnx", "pruned.pt")}
    for name, content in before.items():
        (out / name).write_bytes(content)
    code, io = run_cli(
        main,
        [
            "prune",
            "--checkpoint",
            str(trained_checkpoint),
            "--data-dir",
            str(mnist_dir),
            "--out",
            str(out),
            "--quiet",
            *SUBSETS,
            *bad,
        ],
    )
    assert code == 2 and len(io.err.strip().splitlines()) == 1 and "Traceback" not in io.err, io.err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
