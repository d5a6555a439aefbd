"""The batched trainer: members equal to single-model runs, isolation, chunks, resume, export."""

from dataclasses import replace

import pytest
import torch
from torch import nn

from anrat.batched import BatchedTrainer, Member, grid
from anrat.checkpoint import load_checkpoint, model_from_checkpoint, save_atomic
from anrat.data import Split
from anrat.errors import InputError
from anrat.functional import per_sample_loss, tilted_mean
from anrat.losses import ANRATLoss
from anrat.objective import objective
from anrat.schedules import ScheduleConfig
from anrat.trainer import TrainConfig
from pruning.prune import FineTune, prune

ARCH = {"name": "mlp", "kwargs": {"in_features": 6, "hidden": [12], "out_features": 3}}
N_TRAIN, BATCH, EPOCHS = 320, 32, 10  # 10 steps per epoch: 100 steps


def dropout_factory() -> nn.Module:
    return nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, 3))


def members(kind: str, optimizer: str) -> list[Member]:
    """Plain, fixed NRAE, ANRAT and annealed NRAE with a switch, each with its own seed and settings
    (two with the cosine learning-rate decay)."""
    base = TrainConfig(epochs=EPOCHS, batch_size=BATCH, optimizer=optimizer)
    lr = 0.01 if optimizer == "adam" else 0.1 if kind == "ce" else 0.005
    return [
        Member(replace(base, seed=0, lr=lr, momentum=0.9, l2={"fc2": 0.01}), ScheduleConfig(name="plain", kind=kind)),
        Member(
            replace(base, seed=1, lr=lr / 2, momentum=0.5), ScheduleConfig(name="fixed", kind=kind, lam0=2.0, p=2.0)
        ),
        Member(
            replace(base, seed=2, lr=lr, lambda_lr=0.05, momentum=0.9, l2={"fc1": 0.001}, lr_decay="cosine"),
            ScheduleConfig(name="adaptive", kind=kind, lam0=3.0, a=0.1, q=1.0),
        ),
        Member(
            replace(base, seed=3, lr=lr, lambda_lr=0.02),
            ScheduleConfig(name="adaptive", kind=kind, lam0=1.5, p=1.5, a=0.05, q=2.0, parameterization="softplus"),
        ),
        Member(
            replace(base, seed=4, lr=lr, lr_decay="cosine"),
            ScheduleConfig(name="anneal", kind=kind, lam0=2.0, gamma=0.7, lam_min=0.1, switch_below=0.5),
        ),
    ]


def assert_relatively_close(actual: torch.Tensor, expected: torch.Tensor, rtol: float = 1e-5) -> None:
    error = ((actual - expected).norm() / expected.norm()).item()
    assert error <= rtol, f"relative error {error:.3g} > {rtol:g}"


def members_and_single_runs(batched: BatchedTrainer, result, train: Split, val: Split, tmp_path, single_run):
    """Yield ``(k, member, single)`` after checking what every member shares with its single-model
    run: the last weights (to 1e-5), the selected epoch, the switch epoch and lambda."""
    assert result.diverged == {}
    for k, member in enumerate(batched.members):
        single = single_run(member, train, val, tmp_path / str(k))
        last = load_checkpoint(tmp_path / str(k) / "last.pt")
        for name, value in batched.member_state_dict(k, best=False).items():
            assert_relatively_close(value, last["state_dict"][name])
        assert result.best_epoch[k] == single.best_epoch
        assert result.switch_epoch[k] == single.schedule.switch_epoch
        if single.schedule.lam is not None:
            assert batched.schedules[k].lam == pytest.approx(single.schedule.lam, rel=1e-5)
        yield k, member, single


@pytest.mark.parametrize(
    "kind, optimizer",
    [
        ("ce", "sgd"),
        pytest.param("lp", "sgd", marks=pytest.mark.slow),
        pytest.param("ce", "adam", marks=pytest.mark.slow),
    ],
)
def test_each_member_is_the_single_model_run(kind, optimizer, tmp_path, single_run, synthetic_split, tiny_mlp):
    train, val = synthetic_split(kind, N_TRAIN, 0), synthetic_split(kind, 96, 1)
    grid_members = members(kind, optimizer)
    batched = BatchedTrainer(tiny_mlp, grid_members, train, val)
    result = batched.fit()
    for k, _member, single in members_and_single_runs(batched, result, train, val, tmp_path, single_run):
        for name, value in batched.member_state_dict(k).items():  # the selected weights
            assert_relatively_close(value, single.model.state_dict()[name])
        assert batched.history[-1]["train_loss"][k] == pytest.approx(single.history[-1]["train_loss"], rel=1e-4)
        for ours, theirs in zip(batched.history, single.history):  # lambda sampled within the epochs
            assert [s for s, _ in ours["lam_trace"][k]] == [s for s, _ in theirs["lam_trace"]]
            assert [v for _, v in ours["lam_trace"][k]] == pytest.approx([v for _, v in theirs["lam_trace"]], rel=1e-5)
            assert ours["switched"][k] == theirs["switched"]
    assert result.switch_epoch[4] is not None  # the annealed member did switch to the plain loss


def faithful_members(kind: str, optimizer: str) -> list[Member]:
    """Excursions, the running normaliser, lambda updated directly (with and without hitting its
    bound) and a switch to RAE, each with its own seed; for "true_class_sq" and "lp" also an error
    exponent r apart from p (so members differ in it)."""
    base = TrainConfig(epochs=EPOCHS, batch_size=BATCH, optimizer=optimizer)
    lr = 0.01 if optimizer == "adam" else 0.005 if kind == "lp" else 0.1
    s = dict(kind=kind)
    members = [
        Member(
            replace(base, seed=0, lr=lr, momentum=0.5),
            ScheduleConfig(name="excursions", lam0=2.0, period=7, plain_steps=2, **s),
        ),
        Member(replace(base, seed=1, lr=lr), ScheduleConfig(name="fixed", lam0=1.5, normalizer="running", **s)),
        Member(
            replace(base, seed=2, lr=lr),
            ScheduleConfig(name="excursions", lam0=1.5, period=6, plain_steps=1, normalizer="running", **s),
        ),
        Member(
            replace(base, seed=3, lr=lr),
            ScheduleConfig(name="anneal", lam0=2.0, gamma=0.7, lam_min=0.1, switch_below=0.5, switch_to="rae", **s),
        ),
        Member(
            replace(base, seed=4, lr=lr),
            ScheduleConfig(name="adaptive", lam0=3.0, a=0.1, parameterization="direct", **s),
        ),
        Member(  # a = 0 and a huge step: lambda is projected onto its lower bound and stays there
            replace(base, seed=7, lr=lr, lambda_lr=1e6),  # (seed 5: a validation sample within 6e-8 of a tie)
            ScheduleConfig(name="adaptive", lam0=3.0, a=0.0, parameterization="direct", **s),
        ),
    ]
    if kind != "ce":
        members.append(Member(replace(base, seed=6, lr=lr), ScheduleConfig(name="fixed", lam0=1.2, p=3.0, r=1.0, **s)))
    return members


@pytest.mark.parametrize(
    "kind, optimizer",
    [
        ("ce", "sgd"),
        pytest.param("true_class_sq", "sgd", marks=pytest.mark.slow),
        pytest.param("lp", "adam", marks=pytest.mark.slow),
    ],
)
def test_the_faithful_variants_are_the_single_model_runs(
    kind, optimizer, tmp_path, single_run, synthetic_split, tiny_mlp
):
    train, val = (
        synthetic_split("lp" if kind == "lp" else "ce", N_TRAIN, 0),
        synthetic_split("lp" if kind == "lp" else "ce", 96, 1),
    )
    grid_members = faithful_members(kind, optimizer)
    batched = BatchedTrainer(tiny_mlp, grid_members, train, val)
    result = batched.fit()
    for k, member, single in members_and_single_runs(batched, result, train, val, tmp_path, single_run):
        assert batched.history[-1]["criterion"][k] == single.history[-1]["criterion"]
        for epoch in (0, EPOCHS - 1):
            assert batched.history[epoch]["train_objective"][k] == pytest.approx(
                single.history[epoch]["train_objective"], rel=1e-5
            ), (k, epoch)
            assert batched.history[epoch]["train_ess"][k] == pytest.approx(single.history[epoch]["train_ess"], rel=1e-4)
        if member.schedule.normalizer == "running":
            running = batched.schedules[k].nrae.running_nrae
            assert running.item() == pytest.approx(single.schedule.nrae.running_nrae.item(), rel=1e-5)
    assert result.switch_epoch[3] is not None and batched.history[-1]["criterion"][3] == "rae"
    assert batched.schedules[5].lam == pytest.approx(1e-4)  # held at min_lambda by the projection
    assert batched.schedules[4].lam != pytest.approx(3.0, rel=1e-3)  # lambda did move


def test_a_diverging_member_is_frozen_and_the_others_go_on(synthetic_split, tiny_mlp):
    train = synthetic_split("lp", 128, 0)
    base = TrainConfig(epochs=3, batch_size=32)
    good = [
        Member(replace(base, seed=0, lr=0.05), ScheduleConfig(name="fixed", kind="lp", lam0=1.0)),
        Member(replace(base, seed=1, lr=0.05), ScheduleConfig(name="adaptive", kind="lp", lam0=1.0)),
    ]
    bad = Member(replace(base, seed=2, lr=1e30), ScheduleConfig(name="plain", kind="lp"))
    run = BatchedTrainer(tiny_mlp, [good[0], bad, good[1]], train, None)
    result = run.fit()
    assert list(result.diverged) == [1]
    assert "diverged in epoch 1" in result.diverged[1] and result.diverged_epoch == {1: 1}
    assert all(torch.isfinite(v).all() for v in run.member_state_dict(1).values())
    alone = BatchedTrainer(tiny_mlp, good, train, None)
    alone.fit()
    for k_run, k_alone in ((0, 0), (2, 1)):
        for name, value in run.member_state_dict(k_run).items():
            torch.testing.assert_close(value, alone.member_state_dict(k_alone)[name], rtol=1e-6, atol=1e-7)


def test_chunked_and_unchunked_runs_give_the_same_members(synthetic_split, tiny_mlp):
    train, val = synthetic_split("ce", 160, 0), synthetic_split("ce", 64, 1)
    grid_members = members("ce", "sgd")
    for m in grid_members:
        m.train.epochs = 3
    whole = BatchedTrainer(tiny_mlp, grid_members, train, val)
    chunked = BatchedTrainer(tiny_mlp, grid_members, train, val, max_members=2)
    whole_result, chunked_result = whole.fit(), chunked.fit()
    assert whole_result.best_epoch == chunked_result.best_epoch
    for k in range(len(grid_members)):
        for name, value in whole.member_state_dict(k).items():
            torch.testing.assert_close(chunked.member_state_dict(k)[name], value, rtol=1e-6, atol=1e-7)


class Interrupt(Exception):
    pass


def dropout_members() -> list[Member]:
    base = TrainConfig(epochs=4, batch_size=32, momentum=0.9)
    return [
        Member(replace(base, seed=0), ScheduleConfig(name="adaptive", lam0=2.0)),
        Member(replace(base, seed=1, lr=0.05), ScheduleConfig(name="plain")),
    ]


def test_an_interrupted_run_resumes_bit_for_bit(tmp_path, synthetic_split):
    train, val = synthetic_split("ce", 128, 0), synthetic_split("ce", 64, 1)
    torch.manual_seed(0)  # dropout masks come from the global RNG, as in the single-model Trainer
    straight = BatchedTrainer(dropout_factory, dropout_members(), train, val, out_dir=tmp_path / "straight")
    straight.fit()

    torch.manual_seed(0)
    interrupted = BatchedTrainer(dropout_factory, dropout_members(), train, val, out_dir=tmp_path / "interrupted")
    calls = {"n": 0}

    def crash(module, inputs):
        calls["n"] += 1
        if calls["n"] == 1 + 2 * (4 + 1) + 2:  # in the third epoch (4 steps and 1 evaluation per epoch)
            raise Interrupt

    handle = interrupted.base.register_forward_pre_hook(crash)
    with pytest.raises(Interrupt):
        interrupted.fit()
    handle.remove()
    assert load_checkpoint(tmp_path / "interrupted" / "last.pt")["epoch"] == 2
    torch.manual_seed(123)  # a fresh process: everything comes from last.pt
    resumed = BatchedTrainer(dropout_factory, dropout_members(), train, val, out_dir=tmp_path / "interrupted")
    result = resumed.fit()
    for k in range(2):
        for best in (True, False):
            for name, value in straight.member_state_dict(k, best).items():
                assert torch.equal(value, resumed.member_state_dict(k, best)[name]), (k, best, name)
    assert torch.equal(straight.theta, resumed.theta)
    assert result.best_epoch == straight.best_epoch
    assert len((tmp_path / "interrupted" / "metrics.jsonl").read_text().splitlines()) == 4


def test_faithful_members_resume_bit_for_bit_and_older_checkpoints_load(tmp_path, synthetic_split, tiny_mlp):
    """The running NRAE, lambda's direct value and the RAE switch come back from last.pt; a
    checkpoint written before r, switch_to and the running normaliser existed still resumes."""
    train, val = synthetic_split("ce", 128, 0), synthetic_split("ce", 64, 1)
    grid_members = faithful_members("ce", "sgd")
    for m in grid_members:
        m.train.epochs = 6
        m.train.batch_size = 16  # 8 steps per epoch: excursions' plain phases fall in both halves
    straight = BatchedTrainer(tiny_mlp, grid_members, train, val)
    straight.fit()
    first = BatchedTrainer(tiny_mlp, grid_members, train, val, out_dir=tmp_path / "run")
    first.fit(epochs=3)
    resumed = BatchedTrainer(tiny_mlp, grid_members, train, val, out_dir=tmp_path / "run")
    resumed.fit()
    assert resumed.history[2]["epoch"] == 3 and len(resumed.history) == 6
    assert [s.switch_epoch for s in resumed.schedules] == [s.switch_epoch for s in straight.schedules]
    assert straight.schedules[3].switch_epoch is not None  # the switch to RAE came before the interruption
    assert torch.equal(resumed.running_nrae.nan_to_num(-1.0), straight.running_nrae.nan_to_num(-1.0))  # NaN: none
    assert torch.equal(resumed.theta, straight.theta)
    for k in range(len(grid_members)):
        for name, value in straight.member_state_dict(k, best=False).items():
            assert torch.equal(value, resumed.member_state_dict(k, best=False)[name]), (k, name)

    plain = [Member(TrainConfig(epochs=2, batch_size=32, seed=s), ScheduleConfig(name="fixed")) for s in (0, 1)]
    old = BatchedTrainer(tiny_mlp, plain, train, val, out_dir=tmp_path / "old")
    old.fit(epochs=1)
    state = load_checkpoint(tmp_path / "old" / "last.pt")
    for m in state["members"]:
        del m["schedule"]["r"], m["schedule"]["switch_to"]
    del state["running_nrae"]
    save_atomic(state, tmp_path / "old" / "last.pt")
    again = BatchedTrainer(tiny_mlp, plain, train, val, out_dir=tmp_path / "old")
    assert again.fit().best_epoch is not None and again.epoch == 2 and len(again.history) == 2


def test_a_finished_run_resumed_with_more_epochs_is_the_longer_run(tmp_path, synthetic_split):
    train, val = synthetic_split("ce", 128, 0), synthetic_split("ce", 64, 1)

    def with_epochs(epochs: int) -> list[Member]:
        return [Member(replace(m.train, epochs=epochs), m.schedule) for m in dropout_members()]

    torch.manual_seed(0)
    straight = BatchedTrainer(dropout_factory, with_epochs(5), train, val, out_dir=tmp_path / "straight")
    straight.fit()
    torch.manual_seed(0)
    BatchedTrainer(dropout_factory, with_epochs(2), train, val, out_dir=tmp_path / "extended").fit()
    torch.manual_seed(123)  # a fresh process: everything comes from last.pt
    extended = BatchedTrainer(dropout_factory, with_epochs(5), train, val, out_dir=tmp_path / "extended")
    assert extended.fit().best_epoch == straight.best_epoch
    assert extended.epoch == 5 and extended.step == straight.step
    for k in range(2):
        for best in (True, False):
            for name, value in straight.member_state_dict(k, best).items():
                assert torch.equal(value, extended.member_state_dict(k, best)[name]), (k, best, name)
    assert torch.equal(straight.theta, extended.theta)
    seconds = ("seconds", "train_seconds")
    assert [{n: v for n, v in r.items() if n not in seconds} for r in extended.history] == [
        {n: v for n, v in r.items() if n not in seconds} for r in straight.history
    ]
    assert extended.member_checkpoint(0)["train"]["epochs"] == 5
    assert len((tmp_path / "extended" / "metrics.jsonl").read_text().splitlines()) == 5


def test_progress_prints_one_line_per_epoch_summarising_the_members(capsys, synthetic_split, tiny_mlp):
    train, val = synthetic_split("lp", 128, 0), synthetic_split("lp", 64, 1)
    base = TrainConfig(epochs=3, batch_size=32)
    grid_members = [
        Member(replace(base, seed=0, lr=0.05), ScheduleConfig(name="fixed", kind="lp", lam0=1.0)),
        Member(replace(base, seed=2, lr=1e30), ScheduleConfig(name="plain", kind="lp")),  # frozen in epoch 1
        Member(replace(base, seed=1, lr=0.02), ScheduleConfig(name="adaptive", kind="lp", lam0=1.0)),
    ]
    quiet = BatchedTrainer(tiny_mlp, grid_members, train, val)
    quiet.fit()
    assert capsys.readouterr().err == ""
    run = BatchedTrainer(tiny_mlp, grid_members, train, val, progress=True)
    run.fit()
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 3
    for epoch, (line, record) in enumerate(zip(lines, run.history), start=1):
        losses = {k: record["val"][k]["loss"] for k in (0, 2)}  # regression: no error rate
        best = min(losses, key=losses.__getitem__)
        assert line.startswith(f"epoch {epoch}/3, 3 members; ")
        assert f"validation loss best {losses[best]:.4g} (member {best}), " in line
        assert f"median {(losses[0] + losses[2]) / 2:.4g}" in line
        assert "; 2 training, 1 frozen; " in line
        assert line.endswith(" left") == (epoch < 3)


def test_a_checkpoint_of_other_members_is_refused(tmp_path, synthetic_split):
    train = synthetic_split("ce", 64, 0)
    BatchedTrainer(dropout_factory, dropout_members(), train, None, out_dir=tmp_path).fit(epochs=1)
    other = dropout_members()[:1]
    with pytest.raises(InputError, match="other members"):
        BatchedTrainer(dropout_factory, other, train, None, out_dir=tmp_path).fit()


def test_dropout_masks_are_drawn_per_member(synthetic_split, tiny_mlp):
    train = synthetic_split("ce", 128, 0)
    same = Member(TrainConfig(epochs=1, batch_size=32, seed=5), ScheduleConfig(name="plain"))
    with_dropout = BatchedTrainer(dropout_factory, [same, same], train, None)
    with_dropout.fit()
    a, b = (with_dropout.member_state_dict(k)["0.weight"] for k in range(2))
    assert not torch.equal(a, b)
    without = BatchedTrainer(tiny_mlp, [same, same], train, None)
    without.fit()
    a, b = (without.member_state_dict(k)["fc1.weight"] for k in range(2))
    assert torch.equal(a, b)


def test_a_member_exports_as_a_single_model_checkpoint(tmp_path, synthetic_split, tiny_mlp):
    train, val = synthetic_split("ce", 128, 0), synthetic_split("ce", 64, 1)
    run = BatchedTrainer(
        tiny_mlp,
        grid(TrainConfig(epochs=2, batch_size=32), [ScheduleConfig(name="adaptive")], seeds=[0, 1], lr=[0.1, 0.05]),
        train,
        val,
        arch=ARCH,
    )
    result = run.fit()
    assert [(m.train.seed, m.train.lr) for m in run.members] == [(0, 0.1), (0, 0.05), (1, 0.1), (1, 0.05)]
    path = save_atomic(run.member_checkpoint(3), tmp_path / "member.pt")
    ckpt = load_checkpoint(path)  # weights_only
    model = model_from_checkpoint(ckpt)
    assert ckpt["best_epoch"] == result.best_epoch[3]
    assert torch.equal(model(val.x), run.member_model(3)(val.x))
    error = (model(val.x).argmax(dim=1) != val.y).double().mean().item()
    assert error == pytest.approx(result.best_val[3]["error"])
    pruned = prune(model, train, val, max_samples=64, max_rounds=1, fine_tune=FineTune(epochs=1))  # unchanged stage
    assert pruned.model is not None


@pytest.mark.parametrize("lam", [1e-4, 1.0, 1e4])
def test_the_vmapped_objective_is_the_loss_modules_over_the_range_of_lambda(lam):
    g = torch.Generator().manual_seed(0)
    losses = per_sample_loss(torch.randn(64, 10, generator=g) * 3, torch.randint(0, 10, (64,), generator=g))
    anrat = ANRATLoss(lam, p=2.0, a=0.1, q=1.0, backend="numpy")
    hyper = {
        "plain": torch.tensor(False),
        "anrat": torch.tensor(True),
        "log": torch.tensor(True),
        "t": torch.tensor(1.0, dtype=torch.float64),
        "p": torch.tensor(2.0, dtype=torch.float64),
        "a": torch.tensor(0.1, dtype=torch.float64),
        "q": torch.tensor(1.0, dtype=torch.float64),
        "lo": torch.tensor(anrat.theta_bounds[0], dtype=torch.float64),
        "hi": torch.tensor(anrat.theta_bounds[1], dtype=torch.float64),
    }
    l = losses.clone().requires_grad_()
    expected = anrat.aggregate(l)
    expected.backward()
    value, w, g_theta = objective(losses, anrat.theta.detach(), hyper)[:3]
    assert torch.isfinite(value) and value.item() == pytest.approx(expected.item(), rel=1e-6)
    torch.testing.assert_close(w, l.grad, rtol=1e-5, atol=1e-8)
    assert g_theta.item() == pytest.approx(anrat.theta.grad.item(), rel=1e-4, abs=1e-7)
    fixed = dict(hyper, anrat=torch.tensor(False), t=torch.tensor(lam**2, dtype=torch.float64))
    value, _, g_theta = objective(losses, torch.tensor(0.0), fixed)[:3]
    assert value.item() == pytest.approx(tilted_mean(losses, lam**2, backend="numpy").item(), rel=1e-6)
    assert g_theta.item() == 0.0
    plain = dict(fixed, plain=torch.tensor(True))
    value, w, _ = objective(losses, torch.tensor(0.0), plain)[:3]
    assert value.item() == losses.mean().item() and torch.all(w == 1 / 64)


def test_members_that_cannot_share_a_run_are_refused(synthetic_split, tiny_mlp):
    train = synthetic_split("ce", 64, 0)
    a = Member(TrainConfig(batch_size=32), ScheduleConfig(name="plain"))
    with pytest.raises(InputError, match="batch_size"):
        BatchedTrainer(tiny_mlp, [a, Member(TrainConfig(batch_size=16), ScheduleConfig(name="plain"))], train, None)
    with pytest.raises(InputError, match="loss kind"):
        BatchedTrainer(
            tiny_mlp, [a, Member(TrainConfig(batch_size=32), ScheduleConfig(name="plain", kind="lp"))], train, None
        )
    with pytest.raises(InputError, match="unknown layers"):
        BatchedTrainer(tiny_mlp, [Member(TrainConfig(l2={"conv9": 0.1}), ScheduleConfig(name="plain"))], train, None)
    with pytest.raises(InputError, match="class_weight .* is not supported by the batched trainer"):
        BatchedTrainer(tiny_mlp, [Member(TrainConfig(), ScheduleConfig(class_weight=[1.0, 2.0, 1.0]))], train, None)
