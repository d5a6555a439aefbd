"""``python -m anrat.recipes.mnist_prune``: one tiny real run end to end (train, prune, fine-tune,
export), its outputs checked against the checkpoints and onnxruntime; help and bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import matplotlib.image
import numpy as np
import onnxruntime as ort
import pytest
import torch

from anrat.batched import BatchedTrainer, Member
from anrat.checkpoint import load_checkpoint, model_from_checkpoint
from anrat.data import Split, load_dataset
from anrat.errors import InputError
from anrat.models import build_model
from anrat.recipes.mnist_prune import FIGURES, build_parser, main, resolve_config
from anrat.run import grid_configs
from anrat.run import run as train_run
from anrat.trainer import evaluate
from pruning.masks import count_nonzero, count_total
from pruning.pruned_checkpoint import load_pruned

pytestmark = pytest.mark.slow  # end-to-end runs on MNIST

TEST_IMAGES = 2000
QUICK_ENGINE = "loop"  # recipes/configs/quick.toml: one configuration, faster as a plain loop on the CPU


def tiny_argv(mnist_dir: Path, out: Path) -> list[str]:
    """A few thousand images and one pruning round, ANRAT (not the preset's ess). lambda0 = 1 (not 10) so that two
    short epochs already learn something, and a switch to the plain loss once lambda < 2, that is
    after epoch 1; a target of 80% of the weights keeps the pruning round whatever it costs, so that
    the exported network is the smaller one."""
    return [
        "--data-dir",
        str(mnist_dir),
        "--out",
        str(out),
        "--train-subset",
        "3000",
        "--val-size",
        "1000",
        "--test-subset",
        str(TEST_IMAGES),
        "--epochs",
        "2",
        "--schedule",
        "adaptive",
        "--lambda0",
        "1",
        "--seed",
        "3",
        "--set",
        "run.schedule.switch_below=2.0",
        "--set",
        "prune.max_rounds=1",
        "--set",
        "prune.max_samples=500",
        "--set",
        "prune.target.params=0.8",
        "--set",
        "prune.fine_tune.epochs=1",
        "--set",
        "prune.fine_tune.final_epochs=0",
        "--set",
        "report.latency_repeats=2",
        "--set",
        "report.latency_batch_sizes=[1, 32]",
        "--quantize",
        "int8",
        "--quantize-tolerance",
        "0.02",
        "--calibration-images",
        "256",
        "--no-progress",
    ]


@pytest.fixture(scope="module")
def tiny_run(mnist_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("mnist_prune")
    assert main(tiny_argv(mnist_dir, out)) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    data = load_dataset("mnist", mnist_dir, val_size=1000, seed=3, train_subset=3000, test_subset=TEST_IMAGES)
    return out, metrics, data


def test_the_int8_model_is_written_scored_and_reported(tiny_run):
    out, metrics, data = tiny_run
    int8 = metrics["export"]["int8"]
    assert int8["written"] and (out / "model.int8.onnx").is_file() and metrics["files"]["int8_onnx"]
    assert int8["bytes"]["int8"] == (out / "model.int8.onnx").stat().st_size < int8["bytes"]["float"] / 2.5
    assert int8["quantization"]["calibration_inputs"] == 256
    # its test error, recomputed here under onnxruntime on the same images
    session = ort.InferenceSession(str(out / "model.int8.onnx"), providers=["CPUExecutionProvider"])
    scores = session.run(None, {"input": data.test.x.numpy()})[0]
    assert int8["error"]["test"]["int8"] == pytest.approx(float((scores.argmax(1) != data.test.y.numpy()).mean()))
    assert int8["error"]["test"]["float"] == pytest.approx(metrics["test_error"]["onnx"])
    meta = session.get_modelmeta().custom_metadata_map
    assert json.loads(meta["anrat.input_norm"])["mean"] == data.input_norm.as_dict()["mean"]
    report = (out / "report.md").read_text()
    assert "### int8" in report and f"{int8['bytes']['int8']:,}" in report and int8["cpu"] in report


def test_every_output_file_is_written_and_described(tiny_run):
    out, metrics, _ = tiny_run
    for name in (
        "config.json",
        "metrics.json",
        "report.md",
        "model.onnx",
        "pruned.pt",
        "train/model.pt",
        "train/metrics.jsonl",
        "train/result.json",
        "onnx/dense.onnx",
        "onnx/pruned.onnx",
    ):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    report = (out / "report.md").read_text()
    for figure in FIGURES.values():
        image = matplotlib.image.imread(out / figure)  # a real PNG
        assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
        assert f"]({figure})" in report
    te = metrics["test_error"]
    assert f"{100 * te['trained']:.2f}%" in report and f"{100 * te['pruned']:.2f}%" in report
    assert te["images"] == TEST_IMAGES
    # the training the report draws is the one in metrics.jsonl
    lines = [json.loads(line) for line in (out / "train/metrics.jsonl").read_text().splitlines()]
    assert [r["val_error"] for r in lines] == [r["val_error"] for r in metrics["training"]["history"]]
    # ANRAT in epoch 1 (lambda traced), the plain loss from epoch 2 on (switch_epoch counts the epochs
    # before the switch), as the report says
    assert [r["criterion"] for r in lines] == ["adaptive", "plain"] and lines[-1]["switch_epoch"] == 1
    assert lines[0]["lam_trace"] and not lines[1]["lam_trace"]
    assert "switched to the plain loss from epoch 2" in report
    # the sizes table comes from compare_models, both exports checked
    compare = metrics["export"]["compare"]
    assert compare["checks_passed"] and set(compare["dense"]["latency_s"]) == {"1", "32"}
    assert compare["pruned"]["parameters"] == metrics["pruning"]["params_after"]
    assert compare["dense"]["parameters"] == metrics["pruning"]["params_before"] == 431_080


def test_pruned_checkpoint_is_the_smaller_network_reported(tiny_run):
    out, metrics, _ = tiny_run
    pruned = load_pruned(out / "pruned.pt")
    p = metrics["pruning"]
    assert count_total(pruned) == p["params_after"] < p["params_before"]
    assert count_nonzero(pruned) == p["nonzero_after"]
    assert sum(c["nonzero"] for c in p["layers"].values()) == p["nonzero_after"]
    assert {
        k: getattr(pruned, k).out_features if k == "fc1" else getattr(pruned, k).out_channels for k in p["widths_after"]
    } == p["widths_after"]


def test_onnx_model_predicts_what_the_pruned_checkpoint_predicts(tiny_run):
    out, metrics, data = tiny_run
    pruned = load_pruned(out / "pruned.pt").eval()
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    x = data.test.x
    onnx_scores = np.concatenate(
        [session.run(None, {session.get_inputs()[0].name: x[i : i + 500].numpy()})[0] for i in range(0, len(x), 500)]
    )
    with torch.no_grad():
        torch_scores = pruned(x).numpy()
    assert onnx_scores.shape == (TEST_IMAGES, 10)
    np.testing.assert_allclose(onnx_scores, torch_scores, atol=1e-4, rtol=0)
    assert (onnx_scores.argmax(1) == torch_scores.argmax(1)).all()
    onnx_error = float((onnx_scores.argmax(1) != data.test.y.numpy()).mean())
    # metrics.json's test error of the pruned network is what the deployed ONNX model scores
    assert metrics["test_error"]["pruned"] == pytest.approx(onnx_error, abs=0.5 / TEST_IMAGES)
    assert metrics["test_error"]["onnx"] == pytest.approx(onnx_error, abs=0.5 / TEST_IMAGES)
    assert onnx_error < 0.5  # it learned something in two short epochs (chance: 0.9)


def test_trained_checkpoint_scores_the_reported_test_error(tiny_run):
    out, metrics, data = tiny_run
    trained = model_from_checkpoint(load_checkpoint(out / "train/model.pt"))
    assert evaluate(trained, data.test)["error"] == pytest.approx(
        metrics["test_error"]["trained"], abs=0.5 / TEST_IMAGES
    )
    assert metrics["training"]["selected"]["best_epoch"] in (0, 1, 2)


def test_config_json_repeats_the_options(tiny_run):
    out, metrics, _ = tiny_run
    saved = json.loads((out / "config.json").read_text())
    again = resolve_config(build_parser().parse_args(["--config", str(out / "config.json")]))
    assert asdict(again) == saved == metrics["config"]
    # every option of pruning.prune.prune is recorded, not only the ones set
    assert {"alpha", "method", "estimator", "step", "min_step", "structured", "unstructured"} <= set(saved["prune"])
    assert saved["run"]["train"]["seed"] == saved["prune"]["fine_tune"]["seed"] == 3
    assert saved["run"]["schedule"]["lam0"] == 1.0 and saved["prune"]["max_rounds"] == 1


def test_resuming_with_other_training_options_is_refused(tiny_run, mnist_dir, run_cli):
    out, _, _ = tiny_run
    argv = tiny_argv(mnist_dir, out)
    argv[argv.index("--epochs") + 1] = "3"
    code, captured = run_cli(main, argv)
    assert code == 2
    assert captured.err.strip().splitlines() == [
        f"python -m anrat.recipes.mnist_prune: error: {out} holds a training started with other options "
        "(run.train.epochs differs); pass --no-resume to start it afresh or choose another --out"
    ]


def test_the_paper_preset_trains_its_nine_grid_points_as_one_batched_stack():
    cfg = resolve_config(build_parser().parse_args(["--preset", "paper"]))
    assert cfg.run.engine == "batched" and cfg.run.train.epochs == 100
    configs = grid_configs(cfg.run)
    assert [(c.train.lr, c.schedule.a) for c in configs] == [
        (lr, a) for lr in (1.0, 0.5, 0.1) for a in (1.0, 0.1, 0.001)
    ]
    members = [Member(c.train, c.schedule) for c in configs]
    images = Split(torch.zeros(4, 1, 28, 28), torch.zeros(4, dtype=torch.long))
    stack = BatchedTrainer(lambda: build_model(cfg.run.model), members, images, None)  # one stack accepts them
    assert len(stack.members) == 9 and stack.params["conv1.weight"].shape[0] == 9
    assert resolve_config(build_parser().parse_args(["--preset", "paper", "--engine", "loop"])).run.engine == "loop"
    assert resolve_config(build_parser().parse_args(["--preset", "quick"])).run.engine == QUICK_ENGINE


def test_a_tiny_paper_run_prunes_and_exports_the_selected_member(mnist_dir, tmp_path):
    """The paper preset's nine members for one epoch on a few hundred images. Its learning rates
    {1, 0.5, 0.1} blow a ConvNet up this early (and the fine-tuning of the selected member after
    it), so the grid keeps its shape (3 x 3) with smaller rates: this checks the plumbing."""
    out = tmp_path / "paper"
    argv = ["--preset", "paper", "--data-dir", str(mnist_dir), "--out", str(out), "--epochs", "1", "--no-progress"]
    argv += ["--lambda0", "1", "--set", "run.grid_lr=[0.1, 0.05, 0.02]"]
    argv += ["--train-subset", "300", "--val-size", "200", "--test-subset", "200", "--set", "prune.max_rounds=1"]
    argv += ["--set", "prune.max_samples=100", "--set", "prune.fine_tune.epochs=1", "--set", "report.latency_repeats=1"]
    assert main(argv) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    trials, selected = metrics["training"]["trials"], metrics["training"]["selected"]
    assert [t["member"] for t in trials] == list(range(9))
    ranked = [t for t in trials if "diverged" not in t]
    assert selected["val"]["error"] == min(t["val"]["error"] for t in ranked)
    assert selected == next(t for t in ranked if t["val"]["error"] == selected["val"]["error"])
    assert (out / "train" / "batched" / "last.pt").is_file() and not (out / "train" / "grid").exists()
    trained = load_checkpoint(out / "train" / "model.pt")
    assert trained["run_config"]["train"]["lr"] == selected["lr"]
    assert trained["run_config"]["schedule"]["a"] == selected["a"]
    assert metrics["pruning"]["params_before"] == count_total(model_from_checkpoint(trained))
    for name in ("model.onnx", "pruned.pt", "report.md", *FIGURES.values()):
        assert (out / name).is_file(), name


def test_help_explains_every_option(assert_help_explains_every_option):
    assert_help_explains_every_option(build_parser())
    proc = subprocess.run(
        [sys.executable, "-m", "anrat.recipes.mnist_prune", "--help"], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0 and "--preset" in proc.stdout and "--data-dir" in proc.stdout


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--preset", "huge"], "invalid choice: 'huge'"),
        (["--model", "mlp"], "invalid choice: 'mlp'"),
        (["--epochs", "-1"], "expected an integer >= 0"),
        (["--set", "prune"], "expected KEY=VALUE"),
        (["--set", "prune.bogus=1"], "unknown option 'prune.bogus'"),
        (["--set", "run.train.epoch=1"], "unknown option 'run.train.epoch'"),
        (["--set", "run.train.epochs='three'"], "option 'run.train.epochs' must be of type"),
        (["--lambda0", "0"], "lam0 must be a finite number > 0"),
        (["--set", "run.train.compile='fast'"], "unknown compile mode 'fast'"),
        (["--val-size", "1", "--set", "run.val_size=0"], "needs a validation split"),
        (["--config", "nowhere.toml"], "cannot read config file 'nowhere.toml'"),
        (["--schedule", "adaptive", "--prune-by-training-criterion"], "needs estimator 'full' or 'diagonal'"),
        (
            ["--prune-by-training-criterion", "--schedule", "anneal", "--set", 'run.schedule.switch_to="rae"'],
            "cannot hold RAE",
        ),
    ],
)
def test_bad_options_exit_2_with_one_clear_line(argv, message, run_cli, tmp_path):
    code, out = run_cli(main, argv + ["--out", str(tmp_path / "o"), "--data-dir", str(tmp_path)])
    assert code == 2
    lines = out.err.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], out.err


def test_missing_data_says_how_to_provide_it(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "anrat.recipes.mnist_prune",
            "--data-dir",
            str(tmp_path / "none"),
            "--out",
            str(tmp_path / "o"),
            "--no-progress",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    [line] = proc.stderr.strip().splitlines()
    assert str(tmp_path / "none") in line and "ANRAT_DATA_DIR" in line and "--data-dir" in line
    assert not (tmp_path / "o").exists()  # nothing written before the data is found


@pytest.mark.parametrize("engine", ["loop", "batched"])
def test_the_excursions_schedule_is_reachable_from_the_recipe(engine, mnist_dir, tmp_path):
    """Lo et al.'s NRAE-MSE excursions through the recipe's flags: the resolved training runs them
    (here the training stage alone, on a few hundred images), with either engine."""
    argv = ["--data-dir", str(mnist_dir), "--out", str(tmp_path / "out"), "--schedule", "excursions"]
    argv += ["--lambda0", "2", "--period", "4", "--plain-steps", "1", "--epochs", "1", "--train-subset", "320"]
    argv += ["--val-size", "100", "--test-subset", "100", "--no-progress", "--set", f"run.engine='{engine}'"]
    cfg = resolve_config(build_parser().parse_args(argv))
    schedule = cfg.run.schedule
    assert (schedule.name, schedule.period, schedule.plain_steps, cfg.run.engine) == ("excursions", 4, 1, engine)
    result = train_run(cfg.run)
    assert [r["criterion"] for r in result["history"]] == ["excursions"]
    assert result["config"]["schedule"]["period"] == 4
    with pytest.raises(InputError, match="excursions need period >= 1 and 0 <= plain_steps < period"):
        resolve_config(build_parser().parse_args([*argv, "--plain-steps", "4"]))


def test_a_model_trained_on_the_true_class_error_is_pruned_exported_and_scored(mnist_dir, tmp_path):
    """The original code's loss (1 - p_y)^2 through the whole main job: the exported model.onnx is
    scored as a classifier (its test error equals the pruned network's) and the report is written."""
    out = tmp_path / "out"
    argv = [
        "--data-dir",
        str(mnist_dir),
        "--out",
        str(out),
        "--no-progress",
        "--set",
        'run.schedule.kind="true_class_sq"',
    ]
    argv += ["--epochs", "1", "--train-subset", "500", "--val-size", "200", "--test-subset", "200"]
    assert main([*argv, "--set", "prune.max_rounds=1"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["config"]["run"]["schedule"]["kind"] == "true_class_sq"
    assert metrics["test_error"]["onnx"] == pytest.approx(metrics["test_error"]["pruned"], abs=1 / 200)
    assert "`model.onnx` under onnxruntime" in (out / "report.md").read_text()


def test_an_anrat_model_is_pruned_by_its_own_criterion_with_the_sandwich(mnist_dir, tmp_path):
    """--prune-by-training-criterion: the fine-tuning minimises NRAE at the selected epoch's lambda
    and the Wald tests use the sandwich covariance at t = lambda^2 (issue 15, claim 4)."""
    out = tmp_path / "out"
    argv = ["--data-dir", str(mnist_dir), "--out", str(out), "--no-progress", "--schedule", "adaptive"]
    argv += ["--epochs", "2", "--train-subset", "400", "--val-size", "200", "--test-subset", "200"]
    argv += ["--prune-by-training-criterion", "--set", 'prune.estimator="diagonal"', "--set", "prune.max_rounds=1"]
    argv += ["--set", "prune.max_samples=100", "--set", "report.latency_repeats=1"]
    assert main(argv) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    best = metrics["training"]["selected"]["best_epoch"]
    lam = next(h["lam"] for h in metrics["training"]["history"] if h["epoch"] == best)
    pruned_by = metrics["pruning"]["config"]
    assert metrics["config"]["prune_by_training_criterion"] is True
    assert metrics["config"]["prune"]["covariance"] == "fisher"  # as configured; resolved after training:
    assert (pruned_by["covariance"], pruned_by["tilt"]) == ("sandwich", pytest.approx(lam**2))
    fine_tune = pruned_by["fine_tune"]["schedule"]
    assert (fine_tune["name"], fine_tune["lam0"], fine_tune["switch_below"]) == ("fixed", lam, 0.0)
    assert lam < 10.0  # ANRAT moved lambda from lambda0: the tilt is the trained one, not the initial
