"""The ess schedule (the scale-free tilt) in both trainers, and the ESS logged for every schedule."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import pytest
import torch

from anrat.batched import BatchedTrainer, Member
from anrat.checkpoint import load_checkpoint
from anrat.errors import InputError
from anrat.ess import ESSLoss, ess_rho
from anrat.functional import effective_sample_size, per_sample_loss, tilt_for_ess, tilted_mean
from anrat.losses import PlainLoss
from anrat.schedules import LambdaSchedule, ScheduleConfig
from anrat.trainer import TrainConfig, Trainer

N_TRAIN, BATCH, EPOCHS = 320, 32, 6  # 10 steps per epoch


# --- the rho schedule ------------------------------------------------------------------------------
def test_rho_rises_geometrically_or_linearly_and_reaches_rho_final_exactly():
    geometric = [ess_rho(0.1, 1.0, 4, "geometric", e) for e in range(6)]
    assert geometric[:4] == pytest.approx([0.1, 0.1 * 10**0.25, 0.1 * 10**0.5, 0.1 * 10**0.75], rel=1e-12)
    assert geometric[4:] == [1.0, 1.0]
    linear = [ess_rho(0.2, 0.8, 3, "linear", e) for e in range(5)]
    assert linear == pytest.approx([0.2, 0.4, 0.6, 0.8, 0.8]) and linear[3] == 0.8


def test_the_ess_schedule_switches_to_the_plain_loss_when_rho_reaches_1():
    s = LambdaSchedule(ScheduleConfig(name="ess", rho0=0.25, rho_final=1.0, rho_epochs=2))
    assert isinstance(s.criterion(0), ESSLoss) and s.rho == 0.25
    s.end_epoch(0, max_loss=2.0)
    assert s.rho == pytest.approx(0.5) and not s.switched
    s.end_epoch(1, max_loss=2.0)
    assert s.switch_epoch == 2 and s.rho == 1.0 and isinstance(s.criterion(100), PlainLoss)
    restored = LambdaSchedule(ScheduleConfig(name="ess", rho0=0.25, rho_final=1.0, rho_epochs=2))
    half = LambdaSchedule(ScheduleConfig(name="ess", rho0=0.25, rho_final=1.0, rho_epochs=2))
    half.end_epoch(0, max_loss=2.0)
    restored.load_state_dict(half.state_dict())
    assert restored.rho == half.rho == pytest.approx(0.5)
    never = LambdaSchedule(ScheduleConfig(name="ess", rho0=0.1, rho_final=0.5, rho_epochs=2))
    for epoch in range(5):
        never.end_epoch(epoch, max_loss=2.0)
    assert not never.switched and never.rho == 0.5
    at_once = LambdaSchedule(ScheduleConfig(name="ess", rho0=1.0))
    assert at_once.switch_epoch == 0 and isinstance(at_once.criterion(0), PlainLoss)


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("rho0", 0.0, r"rho0 \(effective sample size / batch size\) must be in \(0, 1\], got 0.0"),
        ("rho0", 1.5, r"rho0 .* must be in \(0, 1\]"),
        ("rho0", math.nan, r"rho0 .* must be in \(0, 1\]"),
        ("rho_final", -0.1, r"rho_final .* must be in \(0, 1\]"),
        ("rho_final", 0.1, "rho_final must be >= rho0"),
        ("rho_epochs", 0, "rho_epochs must be an integer >= 1"),
        ("rho_growth", "cosine", "unknown rho_growth"),
        ("switch_below", 0.5, "do not apply to the ess schedule"),
        ("switch_when_feasible", True, "do not apply to the ess schedule"),
    ],
)
def test_bad_ess_values_are_refused_in_one_line(field, value, message):
    with pytest.raises(InputError, match=message) as info:
        LambdaSchedule(ScheduleConfig(name="ess", **{field: value}))
    assert "\n" not in str(info.value)


# --- the loss ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["numpy", "torch"])
def test_ess_loss_is_nrae_at_the_solved_tilt_with_the_tilted_weights_as_gradient(backend):
    g = torch.Generator().manual_seed(0)
    losses = per_sample_loss(torch.randn(64, 10, generator=g) * 3, torch.randint(0, 10, (64,), generator=g))
    loss = ESSLoss(rho=0.3, backend=backend)
    l = losses.clone().requires_grad_()
    value = loss.aggregate(l)
    value.backward()
    t = tilt_for_ess(losses, 0.3).item()
    assert float(loss.last_t) == pytest.approx(t, rel=1e-6)
    assert value.item() == pytest.approx(tilted_mean(losses, t, backend="numpy").item(), rel=1e-6)
    weights = torch.softmax(t * losses.double(), dim=0)
    torch.testing.assert_close(l.grad.double(), weights, rtol=1e-5, atol=1e-9)
    assert (1 / weights.square().sum()).item() == pytest.approx(0.3 * 64, rel=1e-5)
    assert loss.lam == pytest.approx(t**0.5, rel=1e-6)
    # scale-free: losses 1000 times larger give the same weights at a 1000 times smaller tilt
    big = (losses * 1000).requires_grad_()
    ESSLoss(rho=0.3, backend=backend).aggregate(big).backward()
    torch.testing.assert_close(big.grad.double(), weights, rtol=1e-4, atol=1e-8)


def test_ess_loss_is_the_plain_mean_at_rho_1():
    losses = torch.rand(16, requires_grad=True)
    value = ESSLoss(rho=1.0).aggregate(losses)
    assert value.item() == pytest.approx(losses.mean().item())


# --- both trainers -----------------------------------------------------------------------------------
def ess_members(kind: str) -> list[Member]:
    """ess members (geometric to 1 with a switch, linear short of 1), next to plain, fixed and ANRAT."""
    base = TrainConfig(epochs=EPOCHS, batch_size=BATCH)
    lr = 0.1 if kind == "ce" else 0.005
    return [
        Member(
            replace(base, seed=0, lr=lr, momentum=0.9), ScheduleConfig(name="ess", kind=kind, rho0=0.1, rho_epochs=4)
        ),
        Member(
            replace(base, seed=1, lr=lr / 2),
            ScheduleConfig(name="ess", kind=kind, rho0=0.05, rho_final=0.6, rho_epochs=3, rho_growth="linear"),
        ),
        Member(replace(base, seed=2, lr=lr), ScheduleConfig(name="plain", kind=kind)),
        Member(replace(base, seed=3, lr=lr), ScheduleConfig(name="fixed", kind=kind, lam0=3.0)),
        Member(replace(base, seed=4, lr=lr, lambda_lr=0.05), ScheduleConfig(name="adaptive", kind=kind, lam0=2.0)),
    ]


@pytest.mark.parametrize("kind", ["ce", "lp"])
def test_each_ess_member_is_the_single_model_run_and_both_log_the_same_ess(
    kind, tmp_path, single_run, synthetic_split, tiny_mlp
):
    train, val = synthetic_split(kind, N_TRAIN, 0), synthetic_split(kind, 96, 1)
    members = ess_members(kind)
    batched = BatchedTrainer(tiny_mlp, members, train, val)
    result = batched.fit()
    assert result.diverged == {}
    assert result.switch_epoch[0] == 4 and result.switch_epoch[1] is None
    for k, member in enumerate(members):
        single = single_run(member, train, val, tmp_path / str(k))
        last = load_checkpoint(tmp_path / str(k) / "last.pt")
        for name, value in batched.member_state_dict(k, best=False).items():
            expected = last["state_dict"][name]
            error = ((value - expected).norm() / expected.norm()).item()
            assert error <= 1e-5, (k, name, error)
        assert result.best_epoch[k] == single.best_epoch
        assert result.switch_epoch[k] == single.schedule.switch_epoch
        for epoch, record in enumerate(single.history):
            mine = batched.history[epoch]
            assert mine["rho"][k] == record["rho"]
            assert mine["train_ess"][k] == pytest.approx(record["train_ess"], rel=1e-5)
            assert mine["train_ess_fraction"][k] == pytest.approx(record["train_ess_fraction"], rel=1e-5)
        lines = [json.loads(line) for line in (tmp_path / str(k) / "metrics.jsonl").read_text().splitlines()]
        assert [r["train_ess"] for r in lines] == [r["train_ess"] for r in single.history]
    single_ess = [r["train_ess_fraction"] for r in batched.history]
    rho = [r["rho"] for r in batched.history]
    for epoch in range(EPOCHS):
        # ess members: ESS/m = rho at every step, so on average over the epoch
        for k in (0, 1):
            assert single_ess[epoch][k] == pytest.approx(rho[epoch][k], rel=1e-6)
        assert single_ess[epoch][2] == 1.0 and batched.history[epoch]["train_ess"][2] == BATCH  # plain: m
        assert 1 / BATCH <= single_ess[epoch][3] < 1 and 1 / BATCH <= single_ess[epoch][4] < 1
    assert rho[4][0] == 1.0 and batched.history[4]["criterion"][0] == "plain"


def test_logged_ess_is_the_mean_of_each_steps_ess(tmp_path, synthetic_split, tiny_mlp):
    """The Trainer's train_ess against an independent recomputation: the same run's batches, the
    weights before each step, and the ESS of softmax(t l) (t = lam^p fixed)."""
    train = synthetic_split("ce", 128, 0)
    config = TrainConfig(epochs=1, batch_size=32, lr=0.1, seed=7)
    torch.manual_seed(7)
    model = tiny_mlp()
    twin = tiny_mlp()
    twin.load_state_dict(model.state_dict())
    trainer = Trainer(
        model, LambdaSchedule(ScheduleConfig(name="fixed", lam0=2.0)), train, None, config, progress=False
    )
    trainer.fit()
    generator = torch.Generator().manual_seed(7)
    optimizer = torch.optim.SGD(twin.parameters(), lr=0.1)
    values = []
    for x, y in train.batches(32, shuffle=True, generator=generator):
        losses = per_sample_loss(twin(x), y)
        values.append(effective_sample_size(losses, 4.0).item())
        optimizer.zero_grad()
        tilted_mean(losses, 4.0).backward()
        optimizer.step()
    record = trainer.history[0]
    assert record["train_ess"] == pytest.approx(sum(values) / len(values), rel=1e-6)
    assert record["train_ess_fraction"] == pytest.approx(sum(values) / len(values) / 32, rel=1e-6)
    assert record["rho"] is None and 1 < record["train_ess"] < 32


def test_the_ess_schedule_is_refused_under_a_global_batch_reduction():
    from anrat.distributed import GlobalBatchLoss

    with pytest.raises(InputError, match="not supported under torch.distributed"):
        GlobalBatchLoss(ESSLoss(rho=0.5)).aggregate(torch.rand(8))


# --- the command line --------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "argv, message",
    [
        (["--rho0", "0"], "rho0 (effective sample size / batch size) must be in (0, 1], got 0.0"),
        (["--rho0", "1.2"], "rho0 (effective sample size / batch size) must be in (0, 1], got 1.2"),
        (["--rho-final", "nan"], "rho_final (effective sample size / batch size) must be in (0, 1]"),
        (["--schedule", "ess", "--rho0", "0.5", "--rho-final", "0.3"], "rho_final must be >= rho0"),
        (["--rho-epochs", "0"], "rho_epochs must be an integer >= 1"),
        (["--rho-growth", "cosine"], "invalid choice: 'cosine'"),
        (["--schedule", "ess", "--switch-below", "0.1"], "do not apply to the ess schedule"),
    ],
)
def test_bad_ess_flags_exit_2_with_one_clear_line(argv, message, run_cli, tmp_path):
    from anrat.train import main

    code, out = run_cli(main, argv + ["--out", str(tmp_path), "--data-dir", str(tmp_path)])
    assert code == 2
    lines = out.err.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], out.err


def test_ess_flags_set_the_schedule_config():
    from anrat.train import build_parser, config_from_args

    argv = ["--schedule", "ess", "--rho0", "0.05", "--rho-final", "0.9", "--rho-epochs", "7", "--rho-growth", "linear"]
    cfg = config_from_args(build_parser().parse_args(argv))
    s = cfg.schedule
    assert (s.name, s.rho0, s.rho_final, s.rho_epochs, s.rho_growth) == ("ess", 0.05, 0.9, 7, "linear")
