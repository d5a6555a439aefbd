"""Lambda schedules: which loss each step minimises, and when the run deconvexifies."""

import pytest
import torch

from anrat.data import Split
from anrat.errors import InputError
from anrat.losses import ANRATLoss, NRAELoss, PlainLoss, RAELoss
from anrat.models import build_model
from anrat.schedules import LambdaSchedule, ScheduleConfig, criterion_at_epoch, fixed_tilt, hyper_at
from anrat.trainer import TrainConfig, Trainer


def test_fixed_keeps_lambda_and_uses_nrae():
    s = LambdaSchedule(ScheduleConfig(name="fixed", lam0=5.0))
    assert isinstance(s.criterion(0), NRAELoss)
    for epoch in range(3):
        s.end_epoch(epoch, max_loss=2.0)
    assert s.lam == 5.0 and not s.switched


def test_adaptive_exposes_lambda_parameter_for_the_optimizer():
    s = LambdaSchedule(ScheduleConfig(name="adaptive", lam0=10.0))
    assert isinstance(s.criterion(0), ANRATLoss)
    assert len(s.parameters()) == 1 and s.parameters()[0].requires_grad
    assert s.lam == pytest.approx(10.0, rel=1e-6)


def test_anneal_follows_the_geometric_rule_and_switches_below_threshold():
    s = LambdaSchedule(ScheduleConfig(name="anneal", lam0=10.0, gamma=0.5, lam_min=0.1, switch_below=1.0))
    lams = []
    for epoch in range(6):
        lams.append(s.lam)
        s.end_epoch(epoch, max_loss=2.0)
    assert lams[:4] == pytest.approx([10.0, 5.0, 2.5, 1.25])
    # after epoch index 3, lambda = 0.625 < 1: the 5th epoch (index 4) trains with the plain loss
    assert s.switch_epoch == 4
    assert isinstance(s.criterion(10_000), PlainLoss)
    assert s.lam is None


def test_excursions_alternate_nrae_with_short_plain_phases():
    s = LambdaSchedule(ScheduleConfig(name="excursions", lam0=20.0, period=10, plain_steps=3))
    kinds = [type(s.criterion(step)).__name__ for step in range(20)]
    assert kinds == (["NRAELoss"] * 7 + ["PlainLoss"] * 3) * 2


def test_switch_when_rae_becomes_feasible():
    s = LambdaSchedule(ScheduleConfig(name="fixed", lam0=3.0, p=2.0, switch_when_feasible=True))
    s.end_epoch(0, max_loss=20.0)  # t * max = 180 > 88.7: RAE would overflow float32
    assert not s.switched
    s.end_epoch(1, max_loss=5.0)  # t * max = 45: representable
    assert s.switch_epoch == 2


def test_state_round_trip_restores_lambda_and_switch():
    cfg = ScheduleConfig(name="anneal", lam0=8.0, gamma=0.5)
    a = LambdaSchedule(cfg)
    a.end_epoch(0, 1.0)
    b = LambdaSchedule(cfg)
    b.load_state_dict(a.state_dict())
    assert b.lam == a.lam == 4.0


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("name", "cosine", "unknown lambda schedule"),
        ("lam0", 0.0, "lam0 must be a finite number > 0"),
        ("lam0", -3.0, "lam0 must be a finite number > 0"),
        ("a", -0.1, "a \\(lambda penalty weight\\) must be >= 0"),
        ("q", 0.0, "q must be a finite number > 0"),
        ("gamma", 1.5, "gamma"),
        ("plain_steps", 500, "excursions need"),
        ("switch_to", "mse", "unknown switch_to 'mse'; expected one of \\('plain', 'rae'\\)"),
        ("r", 0.0, "r \\(the error's exponent\\) must be a finite number > 0 or None"),
        ("r", float("nan"), "r \\(the error's exponent\\) must be a finite number > 0 or None"),
        ("r", 2.0, "r \\(the error's exponent\\) applies to kind 'lp' and 'true_class_sq' only"),
        ("kind", "hinge", "unknown loss kind 'hinge'"),
        ("parameterization", "identity", "unknown lambda parameterization 'identity'"),
    ],
)
def test_bad_schedule_values_are_refused(field, value, message):
    with pytest.raises(InputError, match=message):
        LambdaSchedule(ScheduleConfig(**{field: value}))


def test_criterion_objective_is_what_the_trainer_minimises():
    s = LambdaSchedule(ScheduleConfig(name="fixed", lam0=1e-4))
    losses = torch.rand(32)
    assert s.criterion(0).aggregate(losses).item() == pytest.approx(losses.mean().item(), rel=1e-6)


@pytest.mark.parametrize("name", ["fixed", "anneal", "adaptive", "excursions"])
def test_deconvexification_can_switch_to_rae_at_the_lambda_of_the_switch(name):
    s = LambdaSchedule(ScheduleConfig(name=name, lam0=3.0, p=2.0, switch_when_feasible=True, switch_to="rae"))
    s.end_epoch(0, max_loss=20.0)  # t * max = 180 (anneal: 92 at lambda 2.4): not representable
    assert not s.switched and s.criterion_name == name
    s.end_epoch(1, max_loss=5.0)
    lam = s.nrae.lam  # the lambda the switch was decided at (anneal: after the epoch's decay)
    assert s.switch_epoch == 2 and s.criterion_name == "rae"
    for step in range(10_000, 10_300):  # for good, excursions' plain steps included
        assert s.criterion(step) is s.rae
    assert isinstance(s.rae, RAELoss) and s.rae.lam == pytest.approx(lam) and s.lam == pytest.approx(lam)
    losses = torch.rand(32, dtype=torch.float64)
    assert s.criterion(0).aggregate(losses).item() == pytest.approx(torch.exp(lam**2 * losses).mean().item())
    restored = LambdaSchedule(s.config)  # a resumed run trains RAE at the same lambda
    restored.load_state_dict(s.state_dict())
    assert isinstance(restored.criterion(0), RAELoss) and restored.rae.lam == s.rae.lam


def test_switch_to_plain_is_the_default_and_older_states_load():
    s = LambdaSchedule(ScheduleConfig(name="fixed", lam0=3.0, switch_when_feasible=True))
    s.end_epoch(0, max_loss=1.0)
    assert isinstance(s.criterion(0), PlainLoss) and s.rae is None and s.lam is None
    assert s.criterion_name == "plain"
    state = s.state_dict()
    assert "rae_lam" not in state  # what a checkpoint written before switch_to holds
    again = LambdaSchedule(ScheduleConfig(name="fixed", lam0=3.0, switch_when_feasible=True))
    again.load_state_dict(state)
    assert again.switched and isinstance(again.criterion(0), PlainLoss)


def test_rae_needs_a_schedule_with_a_lambda():
    with pytest.raises(InputError, match="switch_to='rae' needs a schedule with a lambda"):
        LambdaSchedule(ScheduleConfig(name="plain", switch_to="rae"))


def test_the_errors_exponent_reaches_every_loss_of_the_schedule():
    out, y = torch.randn(16, 2, dtype=torch.float64), torch.randn(16, 2, dtype=torch.float64)
    s = LambdaSchedule(ScheduleConfig(name="excursions", kind="lp", p=3.0, r=2.0, lam0=1.0, period=4, plain_steps=1))
    squared = ((out - y) ** 2).sum(1)
    assert s.criterion(3)(out, y).item() == pytest.approx(squared.mean().item())  # plain step
    assert s.criterion(0).per_sample(out, y).tolist() == pytest.approx(squared.tolist())
    assert s.nrae.p == 3.0 and s.nrae.r == 2.0


def _history(config: ScheduleConfig, epochs: int = 2) -> list[dict]:
    """The history of a short real training with ``config`` (a small MLP on separable data)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 1, 28, 28, generator=g)
    split = Split(x, (x[:, 0, 10:18, 10:18].mean(dim=(1, 2)) > 0).long())
    torch.manual_seed(0)
    trainer = Trainer(
        build_model("mlp", hidden=[16]),
        LambdaSchedule(config),
        split,
        None,
        TrainConfig(epochs=epochs, batch_size=32, lr=0.1, lambda_lr=0.5),
        progress=False,
    )
    trainer.fit()
    return trainer.history


def test_criterion_at_epoch_holds_anrats_lambda_at_the_epochs_end_fixed():
    config = ScheduleConfig(name="adaptive", lam0=3.0, a=0.01)
    history = _history(config)
    criterion = criterion_at_epoch(config, history[0])
    assert criterion.name == "fixed" and criterion.lam0 == history[0]["lam"] != history[1]["lam"]
    assert criterion.lam0 == pytest.approx(history[0]["lam_trace"][-1][1], rel=1e-6)  # lambda at the end of epoch 1
    losses = torch.rand(64) * 3
    held = LambdaSchedule(criterion)
    assert float(held.criterion(0).aggregate(losses)) == pytest.approx(
        float(NRAELoss(history[0]["lam"], 2.0).aggregate(losses)), rel=1e-6
    )
    assert fixed_tilt(criterion) == pytest.approx(history[0]["lam"] ** 2)
    held.end_epoch(0, max_loss=0.0)
    assert not held.switched and held.lam == criterion.lam0  # held fixed: it neither moves nor switches


def test_criterion_at_epoch_for_anneal_ess_and_after_a_switch():
    anneal = ScheduleConfig(name="anneal", lam0=4.0, gamma=0.5, lam_min=0.1)
    history = _history(anneal, epochs=3)
    assert [criterion_at_epoch(anneal, h).lam0 for h in history] == [4.0, 2.0, 1.0]  # the lambda each epoch used
    ess = ScheduleConfig(name="ess", rho0=0.25, rho_final=1.0, rho_epochs=2)
    history = _history(ess, epochs=3)
    held = [criterion_at_epoch(ess, h) for h in history]
    assert (held[0].name, held[0].rho0, held[0].rho_final) == ("ess", 0.25, 0.25)
    assert [h.name for h in held[1:]] == ["ess", "plain"]  # rho 0.5, then 1: the plain loss
    assert fixed_tilt(held[0]) is None and fixed_tilt(held[2]) is None
    switching = ScheduleConfig(name="anneal", lam0=1.0, gamma=0.5, switch_below=0.7)
    history = _history(switching, epochs=2)
    assert [criterion_at_epoch(switching, h).name for h in history] == ["fixed", "plain"]
    to_rae = ScheduleConfig(name="anneal", lam0=1.0, gamma=0.5, switch_below=0.7, switch_to="rae")
    with pytest.raises(InputError, match="RAE"):
        criterion_at_epoch(to_rae, _history(to_rae, epochs=2)[1])


@pytest.mark.parametrize(
    "config",
    [
        ScheduleConfig(name="anneal", lam0=10.0, gamma=0.5, lam_min=0.3),
        ScheduleConfig(name="ess", rho0=0.1, rho_final=1.0, rho_epochs=3),
        ScheduleConfig(name="ess", rho0=0.2, rho_final=0.8, rho_epochs=2, rho_growth="linear"),
        ScheduleConfig(name="excursions", lam0=5.0, period=4, plain_steps=1),
        ScheduleConfig(name="fixed", lam0=2.0),
        ScheduleConfig(name="plain"),
    ],
)
def test_hyper_at_is_what_the_running_schedule_does_epoch_by_epoch_and_step_by_step(config):
    schedule, steps_per_epoch = LambdaSchedule(config), 5
    for epoch in range(5):
        h = hyper_at(config, epoch)
        assert h.rho == schedule.rho
        if h.criterion == "plain" or schedule.switched:
            assert h.criterion == "plain" and schedule.switched
        else:
            assert h.lam == pytest.approx(schedule.lam, rel=1e-12) if config.name != "ess" else h.lam is None
        for step in range(epoch * steps_per_epoch, (epoch + 1) * steps_per_epoch):
            plain_step = hyper_at(config, epoch, step).criterion == "plain"
            assert plain_step == isinstance(schedule.criterion(step), PlainLoss)
        schedule.end_epoch(epoch, max_loss=1.0)


def test_criterion_at_epoch_without_a_record_is_the_criterion_the_schedule_starts_with():
    assert criterion_at_epoch(ScheduleConfig(name="adaptive", lam0=3.0)).lam0 == 3.0
    assert criterion_at_epoch(ScheduleConfig(name="ess", rho0=1.0, rho_final=1.0)).name == "plain"
    held = criterion_at_epoch(ScheduleConfig(name="ess", rho0=0.3, rho_final=1.0, rho_epochs=4))
    assert (held.name, held.rho0, held.rho_final) == ("ess", 0.3, 0.3)
    assert criterion_at_epoch(ScheduleConfig(name="anneal", lam0=4.0, gamma=0.5)).lam0 == 4.0
