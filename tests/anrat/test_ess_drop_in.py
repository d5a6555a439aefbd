"""anrat.ESSLoss as a drop-in for nn.CrossEntropyLoss, and anrat.ESSSchedule for any loop (issue 28)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import anrat
from anrat.errors import InputError
from anrat.functional import per_sample_loss
from anrat.schedules import ScheduleConfig


def batch(n: int = 64, classes: int = 5, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, classes, generator=g) * 2).requires_grad_(), torch.randint(0, classes, (n,), generator=g)


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"label_smoothing": 0.1},
        {"weight": torch.tensor([1.0, 2.0, 0.5, 0.0, 3.0])},
        {"weight": torch.tensor([1.0, 2.0, 0.5, 1.0, 3.0]), "label_smoothing": 0.2, "reduction": "sum"},
        {"reduction": "sum"},
    ],
    ids=["plain", "label_smoothing", "weight", "all", "sum"],
)
def test_at_rho_1_it_is_cross_entropy_in_value_and_gradient(options):
    logits, target = batch()
    ours = anrat.ESSLoss(rho=1.0, **options)(logits, target)
    theirs = nn.CrossEntropyLoss(**options)(logits, target)
    assert float(ours.detach()) == pytest.approx(float(theirs.detach()), rel=1e-6, abs=0)
    (g_ours,) = torch.autograd.grad(ours, logits)
    (g_theirs,) = torch.autograd.grad(theirs, logits)
    torch.testing.assert_close(g_ours, g_theirs, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("rho", [0.1, 0.5, 0.9])
def test_below_rho_1_it_is_nrae_at_the_tilt_whose_weights_have_that_ess(rho):
    logits, target = batch(seed=1)
    loss = anrat.ESSLoss(rho=rho)
    value = float(loss(logits, target).detach())
    l = per_sample_loss(logits.detach(), target).double()
    t = float(loss.last_t)
    w = torch.softmax(t * l, 0)
    assert float(1 / (w**2).sum()) == pytest.approx(rho * len(l), rel=1e-6)  # ESS = rho m
    assert value == pytest.approx(float(torch.logsumexp(t * l, 0) - math.log(len(l))) / t, rel=1e-6)
    assert float(l.mean()) < value < float(l.max())


def test_class_weights_count_each_sample_in_the_tilted_mean():
    logits, target = batch(seed=2)
    weight = torch.tensor([1.0, 2.0, 0.5, 1.5, 3.0])
    loss = anrat.ESSLoss(rho=0.3, weight=weight)
    value = float(loss(logits, target).detach())
    l, w = per_sample_loss(logits.detach(), target).double(), weight[target].double()
    t = float(loss.last_t)
    expected = math.log(float((w * torch.exp(t * (l - l.max()))).sum() / w.sum())) / t + float(l.max())
    assert value == pytest.approx(expected, rel=1e-6)
    summed = anrat.ESSLoss(rho=0.3, weight=weight, reduction="sum")(logits, target)
    assert float(summed.detach()) == pytest.approx(value * float(w.sum()), rel=1e-6)


def test_the_schedule_is_the_trainers_rho_and_drives_the_loss_like_an_lr_scheduler():
    config = ScheduleConfig(name="ess", rho0=0.2, rho_final=1.0, rho_epochs=4)
    for growth in ("geometric", "linear"):
        schedule = anrat.ESSSchedule(0.2, 1.0, 4, growth=growth)
        expected = [ScheduleConfig(**{**config.__dict__, "rho_growth": growth}).rho_at(e) for e in range(6)]
        assert [schedule.rho_at(e) for e in range(6)] == expected
    loss = anrat.ESSLoss()
    schedule = anrat.ESSSchedule(0.25, 1.0, 2, loss=loss)
    assert loss.rho == 0.25
    assert schedule.step() == loss.rho == 0.5
    state = schedule.state_dict()
    assert schedule.step() == loss.rho == 1.0
    again = anrat.ESSSchedule(0.25, 1.0, 2, loss=loss)
    again.load_state_dict(state)
    assert again.epoch == 1 and loss.rho == 0.5


def test_the_schedule_moves_rho_per_step_when_given_the_steps_as_epochs():
    loss = anrat.ESSLoss()
    schedule = anrat.ESSSchedule(0.25, 1.0, epochs=100, loss=loss)  # 100 optimizer steps
    rhos = [schedule.step() for _ in range(100)]
    assert rhos[49] == pytest.approx(0.5)  # after 50 of 100 steps: halfway, geometrically, from 0.25 to 1
    assert all(a < b for a, b in zip(rhos[:-1], rhos[1:])) and rhos[-1] == loss.rho == 1.0


@pytest.mark.parametrize(
    "make, words",
    [
        (lambda: anrat.ESSLoss(rho=0.0), "rho"),
        (lambda: anrat.ESSLoss(rho=1.5), "rho"),
        (lambda: anrat.ESSLoss(label_smoothing=1.0), "label_smoothing must be in [0, 1)"),
        (lambda: anrat.ESSLoss(label_smoothing=-0.1), "label_smoothing must be in [0, 1)"),
        (lambda: anrat.ESSLoss(reduction="none"), "reduction must be 'mean' or 'sum'"),
        (lambda: anrat.ESSLoss(weight=torch.tensor([1.0, -1.0])), "weight"),
        (lambda: anrat.ESSSchedule(rho0=0.0), "rho0"),
        (lambda: anrat.ESSSchedule(rho0=0.5, rho_final=1.2), "rho_final"),
        (lambda: anrat.ESSSchedule(rho0=0.8, rho_final=0.5), "rho_final must be >= rho0"),
        (lambda: anrat.ESSSchedule(epochs=0), "epochs must be an integer >= 1"),
        (lambda: anrat.ESSSchedule(growth="cubic"), "unknown growth"),
    ],
)
def test_bad_values_are_refused_in_one_line(make, words):
    with pytest.raises(InputError) as refused:
        make()
    assert words in str(refused.value) and "\n" not in str(refused.value)


@pytest.mark.slow  # torch.compile takes seconds
def test_it_compiles_into_one_graph_and_agrees_with_eager():
    logits, target = batch(seed=3)
    eager, traced = anrat.ESSLoss(rho=0.4, label_smoothing=0.1), anrat.ESSLoss(rho=0.4, label_smoothing=0.1)
    compiled = torch.compile(traced, backend="aot_eager", fullgraph=True)  # fullgraph: a break is an error
    expected, value = eager(logits, target), compiled(logits, target)
    torch.testing.assert_close(value, expected, rtol=1e-5, atol=0)
    (g_value,) = torch.autograd.grad(value, logits)
    (g_expected,) = torch.autograd.grad(expected, logits)
    torch.testing.assert_close(g_value, g_expected, rtol=1e-5, atol=1e-8)


def test_under_autocast_it_stays_finite_and_close_to_float32():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 5))
    x, y = torch.randn(128, 20), torch.randint(0, 5, (128,))
    loss = anrat.ESSLoss(rho=0.3)
    full = loss(model(x), y)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = loss(model(x), y)
    assert low.dtype == torch.float32 and torch.isfinite(low)
    assert float(low.detach()) == pytest.approx(float(full.detach()), rel=2e-2)
    low.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
