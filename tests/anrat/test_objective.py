"""anrat.objective, the criterion written once: its pieces against autograd and against each other."""

from __future__ import annotations

import math

import pytest
import torch

from anrat.functional import tilted_mean
from anrat.objective import (
    LAMBDA_PARAMETERIZATIONS,
    anrat_penalty,
    anrat_theta_gradient,
    lambda_of_theta,
    theta_of_lambda,
)


@pytest.mark.parametrize("kind", LAMBDA_PARAMETERIZATIONS)
@pytest.mark.parametrize("lam", [1e-3, 0.5, 10.0, 1e3])
def test_lambda_of_theta_inverts_theta_of_lambda_and_its_slope_is_autograds(kind, lam):
    log, direct = kind == "log", kind == "direct"
    theta = theta_of_lambda(lam, kind)
    assert lambda_of_theta(theta, log, direct)[0] == pytest.approx(lam, rel=1e-12)
    th = torch.tensor(theta, dtype=torch.float64, requires_grad=True)
    value, slope = lambda_of_theta(th, log, direct)
    (autograd_slope,) = torch.autograd.grad(value, th)
    value, slope = value.detach(), slope.detach()
    assert float(slope) == pytest.approx(float(autograd_slope), rel=1e-12)
    assert float(slope) == pytest.approx(lambda_of_theta(theta, log, direct)[1], rel=1e-12)
    # per-member flags as tensors (the vmapped form) select the same branch
    flagged = lambda_of_theta(th.detach(), torch.tensor(log), torch.tensor(direct))
    assert [float(v) for v in flagged] == [float(value), float(slope)]


@pytest.mark.parametrize("kind", LAMBDA_PARAMETERIZATIONS)
def test_the_closed_form_theta_gradient_is_autograds(kind):
    g = torch.Generator().manual_seed(0)
    losses = torch.rand(64, generator=g, dtype=torch.float64) * 3
    p, a, q = 2.0, 0.01, 1.0
    theta = torch.tensor(theta_of_lambda(0.7, kind), dtype=torch.float64, requires_grad=True)
    lam, slope = lambda_of_theta(theta, kind == "log", kind == "direct")
    t = lam**p
    value = tilted_mean(losses, t, backend="torch") + anrat_penalty(lam, a, q)
    (expected,) = torch.autograd.grad(value, theta)
    lam, slope, t = lam.detach(), slope.detach(), t.detach()
    h = 1e-6 * float(t)  # dNRAE/dt by a central difference, in float64
    lo, hi = (float(tilted_mean(losses, float(t) + s, backend="torch")) for s in (-h, h))
    closed = anrat_theta_gradient(float(t), float(lam), (hi - lo) / (2 * h), float(slope), p, a, q)
    assert closed == pytest.approx(float(expected), rel=1e-6)
    assert anrat_penalty(2.0, 0.5, 2.0) == 0.125 and math.isfinite(anrat_penalty(1e-4, 0.01, 1.0))
