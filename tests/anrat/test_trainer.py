"""The trainer: resume equality, model selection, metrics, and a short real MNIST run."""

import json
import math
import os
import shutil
import signal

import pytest
import torch

from anrat.checkpoint import load_checkpoint, model_from_checkpoint
from anrat.data import Split, load_dataset
from anrat.errors import InputError
from anrat.interrupts import Interrupted
from anrat.models import build_model
from anrat.schedules import LambdaSchedule, ScheduleConfig
from anrat.trainer import TrainConfig, Trainer, evaluate, lr_factor

ARCH = {"name": "convnet_dropout", "kwargs": {"conv1": 4, "conv2": 4, "fc1": 16}}


def synthetic_split(n: int, seed: int) -> Split:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 28, 28, generator=g)
    y = (x[:, 0, 10:18, 10:18].mean(dim=(1, 2)) > 0).long() + 2 * (x[:, 0, :8, :8].mean(dim=(1, 2)) > 0).long()
    return Split(x, y)


def make_trainer(out_dir, seed_init: int, epochs: int = 3, lr_decay: str = "none") -> Trainer:
    torch.manual_seed(seed_init)
    model = build_model(ARCH["name"], **ARCH["kwargs"])  # has dropout: the global RNG matters
    schedule = LambdaSchedule(ScheduleConfig(name="adaptive", lam0=3.0))
    config = TrainConfig(epochs=epochs, batch_size=32, lr=0.05, lambda_lr=0.05, momentum=0.9, seed=7, lr_decay=lr_decay)
    return Trainer(
        model,
        schedule,
        synthetic_split(256, 0),
        synthetic_split(128, 1),
        config,
        out_dir=out_dir,
        arch=ARCH,
        progress=False,
    )


class Interrupt(Exception):
    pass


@pytest.mark.parametrize("lr_decay", ["none", "cosine"])
def test_interrupted_run_resumes_to_the_same_weights(tmp_path, lr_decay):
    straight = make_trainer(tmp_path / "straight", seed_init=0, lr_decay=lr_decay)
    straight.fit()
    final_straight = load_checkpoint(tmp_path / "straight" / "last.pt")

    interrupted = make_trainer(tmp_path / "interrupted", seed_init=0, lr_decay=lr_decay)
    calls = {"n": 0}

    def crash(module, inputs):
        calls["n"] += 1
        if calls["n"] == 8 * 2 + 5:  # in the middle of the third epoch (8 batches per epoch)
            raise Interrupt

    handle = interrupted.model.register_forward_pre_hook(crash)
    with pytest.raises(Interrupt):
        interrupted.fit()
    handle.remove()
    assert load_checkpoint(tmp_path / "interrupted" / "last.pt")["epoch"] == 2

    # a fresh process: different initial weights, everything comes from last.pt
    resumed = make_trainer(tmp_path / "interrupted", seed_init=123, lr_decay=lr_decay)
    result = resumed.fit()
    final_resumed = load_checkpoint(tmp_path / "interrupted" / "last.pt")
    for key, value in final_straight["state_dict"].items():
        assert torch.equal(value, final_resumed["state_dict"][key]), key
    assert final_resumed["lam"] == final_straight["lam"]
    assert result.best_epoch == straight.best_epoch
    for key, value in straight.model.state_dict().items():  # the selected (best) weights too
        assert torch.equal(value, resumed.model.state_dict()[key]), key
    lines = (tmp_path / "interrupted" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2, 3]


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_stops_the_training_after_its_step_and_the_run_resumes_from_there_bit_identically(tmp_path, signum):
    straight = make_trainer(tmp_path / "straight", seed_init=0, lr_decay="cosine_step")
    straight.fit()
    interrupted = make_trainer(tmp_path / "interrupted", seed_init=0, lr_decay="cosine_step")
    calls = {"n": 0}

    def signal_during_a_forward_pass(module, inputs):
        calls["n"] += 1
        if calls["n"] == 8 * 2 + 5:  # in the third epoch (8 batches and one validation pass per epoch)
            os.kill(os.getpid(), signum)

    handle = interrupted.model.register_forward_pre_hook(signal_during_a_forward_pass)
    with pytest.raises(Interrupted) as stopped:
        interrupted.fit()
    handle.remove()
    assert stopped.value.signum == signum
    saved = load_checkpoint(tmp_path / "interrupted" / "last.pt")
    steps = saved["in_epoch"]["steps"]
    assert saved["epoch"] == 2 and 1 <= steps < 8 and saved["step"] == 2 * 8 + steps  # the signal's step, done
    where, resume = interrupted._position()
    assert where == f"at epoch 3, step {saved['step']}"
    assert resume.endswith(f"holds epoch 2 and {steps} steps of epoch 3: run the same command to resume")
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handlers given back

    resumed = make_trainer(tmp_path / "interrupted", seed_init=123, lr_decay="cosine_step")  # a fresh process
    resumed.fit()
    final_straight = load_checkpoint(tmp_path / "straight" / "last.pt")
    final_resumed = load_checkpoint(tmp_path / "interrupted" / "last.pt")
    assert "in_epoch" not in final_resumed
    for key, value in final_straight["state_dict"].items():
        assert torch.equal(value, final_resumed["state_dict"][key]), key
    timing = {"seconds", "train_seconds"}
    assert [{k: v for k, v in r.items() if k not in timing} for r in resumed.history] == [
        {k: v for k, v in r.items() if k not in timing} for r in straight.history
    ]


def test_ctrl_c_in_an_epochs_validation_says_so_and_the_epoch_is_redone_bit_identically(tmp_path):
    straight = make_trainer(tmp_path / "straight", seed_init=0)
    straight.fit()
    interrupted = make_trainer(tmp_path / "interrupted", seed_init=0)
    seen = {"eval": 0}

    def ctrl_c_in_the_second_validation(module, inputs):
        if not module.training:
            seen["eval"] += 1
            if seen["eval"] == 3:  # the initial evaluation, epoch 1's, then epoch 2's
                os.kill(os.getpid(), signal.SIGINT)

    handle = interrupted.model.register_forward_pre_hook(ctrl_c_in_the_second_validation)
    with pytest.raises(KeyboardInterrupt):
        interrupted.fit()
    handle.remove()
    where, resume = interrupted._position()
    assert where == "at the end of epoch 2" and resume.endswith("holds epoch 1: run the same command to resume")
    resumed = make_trainer(tmp_path / "interrupted", seed_init=123)
    resumed.fit()
    for key, value in straight.model.state_dict().items():
        assert torch.equal(value, resumed.model.state_dict()[key]), key


def test_cosine_decay_anneals_the_weights_learning_rate_and_not_lambdas():
    assert [lr_factor(TrainConfig(epochs=4, lr_decay="cosine"), e) for e in range(6)] == pytest.approx(
        [1.0, (1 + math.cos(math.pi / 4)) / 2, 0.5, (1 + math.cos(3 * math.pi / 4)) / 2, 0.0, 0.0]
    )
    assert lr_factor(TrainConfig(epochs=4), 3) == 1.0
    trainer = make_trainer(None, seed_init=0, epochs=4, lr_decay="cosine")
    seen = []  # (weights' lr, lambda's lr) during each epoch's training steps

    def record(module, inputs):
        if module.training:
            seen.append((trainer.optimizer.param_groups[0]["lr"], trainer.optimizer.param_groups[-1]["lr"]))

    trainer.model.register_forward_pre_hook(record)
    trainer.fit()
    per_epoch = sorted(set(seen), reverse=True)
    assert [w for w, _ in per_epoch] == pytest.approx([0.05 * lr_factor(trainer.config, e) for e in range(4)])
    assert {lam for _, lam in per_epoch} == {0.05}  # lambda_lr, constant
    assert [r["lr"] for r in trainer.history] == pytest.approx([w for w, _ in per_epoch])
    with pytest.raises(InputError, match="unknown lr_decay 'step'"):
        TrainConfig(lr_decay="step").validate()


def test_metrics_and_checkpoints_describe_the_run(tmp_path):
    trainer = make_trainer(tmp_path, seed_init=0, epochs=2)
    result = trainer.fit()
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 2
    for r in records:
        for key in ("train_objective", "train_loss", "lam", "val_error", "seconds", "lam_trace"):
            assert key in r, key
        assert len(r["lam_trace"]) >= 2  # lambda logged within the epoch, not only at its end
    best = load_checkpoint(tmp_path / "best.pt")
    model = model_from_checkpoint(best)
    assert best["epoch"] == result.best_epoch
    val_error = evaluate(model, synthetic_split(128, 1))["error"]
    assert val_error == pytest.approx(result.best_val["error"])


def test_l2_prior_applies_to_the_named_layer_only():
    torch.manual_seed(0)
    model = build_model("mlp", in_features=4, hidden=[8], out_features=3)
    schedule = LambdaSchedule(ScheduleConfig(name="plain"))
    trainer = Trainer(
        model,
        schedule,
        Split(torch.randn(64, 4), torch.randint(0, 3, (64,))),
        None,
        TrainConfig(l2={"fc2": 0.05}),
        progress=False,
    )
    groups = {g["name"]: g for g in trainer.optimizer.param_groups}
    assert groups["l2=0.05"]["params"] == [model.fc2.weight]
    assert groups["weights"]["weight_decay"] == 0.0
    with pytest.raises(InputError, match="unknown layers"):
        Trainer(
            model,
            schedule,
            Split(torch.randn(8, 4), torch.randint(0, 3, (8,))),
            None,
            TrainConfig(l2={"softmax": 0.05}),
            progress=False,
        )


def test_lenet5_with_anrat_learns_mnist_quickly(mnist_dir, tmp_path):
    """A short real run: 4,000 MNIST images, two epochs of ANRAT from lambda = 10 on the CPU."""
    data = load_dataset("mnist", mnist_dir, val_size=10_000, seed=0, train_subset=4000, test_subset=2000)
    torch.manual_seed(0)
    model = build_model("lenet5")
    schedule = LambdaSchedule(ScheduleConfig(name="adaptive", lam0=10.0, a=0.01))
    trainer = Trainer(
        model,
        schedule,
        data.train,
        data.val,
        TrainConfig(epochs=2, lr=0.1, lambda_lr=0.3),
        out_dir=tmp_path,
        arch={"name": "lenet5", "kwargs": {}},
        progress=False,
    )
    result = trainer.fit()
    test_error = trainer.evaluate(data.test)["error"]
    # measured over seeds 0-2: test error 0.089-0.151 (chance: 0.9); lambda 10 -> 0.27-0.34
    assert test_error < 0.3
    assert schedule.lam < 1.0
    assert result.best_epoch == 2


needs_compiler = pytest.mark.skipif(
    not any(shutil.which(cc) for cc in ("g++", "c++", "clang++")),
    reason="torch.compile on the CPU needs a C++ compiler (g++, c++ or clang++ on PATH)",
)


@needs_compiler
@pytest.mark.parametrize("schedule", ["adaptive", "anneal"])
def test_compiled_training_follows_eager_training(schedule):
    """compile="default" traces the forward pass and the loss into one graph (torch-ops tilted mean): same
    trajectory as eager up to float rounding, and lambda changing between epochs (anneal) costs no
    recompilation."""

    def run(compile: str | None) -> Trainer:
        torch.manual_seed(0)
        model = build_model("mlp", hidden=[32])  # no dropout: compiled and eager RNG streams differ
        config = TrainConfig(epochs=3, batch_size=50, lr=0.1, lambda_lr=0.1, seed=3, compile=compile)
        sched = LambdaSchedule(ScheduleConfig(name=schedule, lam0=3.0, gamma=0.5))
        trainer = Trainer(model, sched, synthetic_split(200, 0), synthetic_split(100, 1), config, progress=False)
        trainer.fit()
        return trainer

    torch._dynamo.reset()
    with torch._dynamo.config.patch(error_on_recompile=True):
        compiled = run(compile="default")
    eager = run(compile=None)
    for a, b in zip(compiled.history, eager.history):
        assert a["train_objective"] == pytest.approx(b["train_objective"], rel=1e-4)
        assert a["lam"] == pytest.approx(b["lam"], rel=1e-4)
    assert eager.history[-1]["lam"] != pytest.approx(eager.history[0]["lam"], rel=1e-2)  # lambda moved
    for p, q in zip(compiled.model.parameters(), eager.model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5)


def test_progress_prints_one_plain_line_per_epoch_off_a_terminal(capsys):
    torch.manual_seed(0)
    model = build_model("mlp", in_features=784, hidden=[8], out_features=4)
    Trainer(
        model,
        LambdaSchedule(ScheduleConfig(name="plain")),
        synthetic_split(200, 0),
        synthetic_split(100, 1),
        TrainConfig(epochs=2, lr=0.1),
        progress=True,
    ).fit()
    lines = capsys.readouterr().err.strip().splitlines()
    assert [line.split(":")[0] for line in lines] == ["epoch 1/2", "epoch 2/2"]
    assert "validation error" in lines[0] and " left" in lines[0] and " left" not in lines[1]


@pytest.mark.parametrize("name", ["plain", "fixed"])
def test_class_weight_weights_each_sample_loss_as_torchs_cross_entropy_does(name):
    torch.manual_seed(0)
    model = build_model(ARCH["name"], **ARCH["kwargs"]).eval()  # no dropout: the same forward twice
    weight = [0.5, 2.0, 1.0, 4.0, 1.0, 1.0, 1.0, 1.0, 1.0, 3.0]
    schedule = LambdaSchedule(ScheduleConfig(name=name, lam0=1.5, class_weight=weight))
    train = synthetic_split(64, 0)
    trainer = Trainer(model, schedule, train, None, TrainConfig(epochs=1, batch_size=64), progress=False)
    objective, losses = trainer.objective(train.x, train.y, trainer.criterion())
    expected = torch.nn.functional.cross_entropy(model(train.x), train.y, weight=torch.tensor(weight), reduction="none")
    assert torch.allclose(losses, expected, rtol=1e-5)
    if name == "plain":
        assert float(objective.detach()) == pytest.approx(float(expected.detach().mean()), rel=1e-5)
    else:  # NRAE of the weighted losses: log(mean(exp(t l))) / t
        t = 1.5**2
        expected_nrae = (torch.logsumexp(t * expected.detach().double(), 0) - math.log(64)) / t
        assert float(objective.detach()) == pytest.approx(float(expected_nrae), rel=1e-5)
    # a class missing from the weights, a weight below 0, a regression loss: refused
    with pytest.raises(InputError, match="one weight per class"):
        Trainer(
            model, LambdaSchedule(ScheduleConfig(class_weight=[1.0, 1.0])), train, None, TrainConfig(), progress=False
        )
    with pytest.raises(InputError, match="class_weight must be a list of finite numbers >= 0"):
        ScheduleConfig(class_weight=[1.0, -1.0]).validate()
    with pytest.raises(InputError, match="not 'lp'"):
        ScheduleConfig(kind="lp", class_weight=[1.0]).validate()
