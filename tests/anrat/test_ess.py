"""The effective sample size of the tilted weights and the tilt that sets it (issue 14, part 2).

References in 50-digit arithmetic (mpmath). The solve is checked without solving again: by
monotonicity of ESS in t, ``ESS(t (1 - eps)) > rho m > ESS(t (1 + eps))`` in exact arithmetic
proves that the true root lies within ``eps`` (relative) of the returned t.
"""

from __future__ import annotations

import math

import mpmath
import numpy as np
import pytest
import torch

from anrat.errors import InputError
from anrat.functional import ESS_T_MAX, effective_sample_size, tilt_for_ess

mpmath.mp.dps = 50
T_GRID = [0.0] + [10.0**e for e in range(-8, 9)]


def reference_ess(losses, t) -> mpmath.mpf:
    """``(sum e)^2 / sum e^2``, ``e_i = exp(t (l_i - max l))``, in 50 digits (t = inf: the maxima)."""
    values = [mpmath.mpf(float(v)) for v in losses]
    top = max(values)
    if math.isinf(t):
        return mpmath.mpf(sum(1 for v in values if v == top))
    e = [mpmath.exp(mpmath.mpf(t) * (v - top)) for v in values]
    return mpmath.fsum(e) ** 2 / mpmath.fsum(x * x for x in e)


def loss_cases() -> list[np.ndarray]:
    """Random and adversarial per-sample losses, from 1e-8 to 1e3."""
    rng = np.random.default_rng(0)
    cases = []
    for m in (2, 3, 16, 64):
        cases += [
            rng.exponential(1.0, m),  # cross-entropy-like
            10 ** rng.uniform(-8, 3, m),  # spanning 1e-8 .. 1e3
            1 + 1e-8 * rng.random(m),  # tiny spread
            1e-6 * rng.random(m),  # tiny losses
            np.round(rng.exponential(1.0, m), 1),  # ties everywhere
            np.concatenate([np.full(m - 1, 0.5), [0.5 + 1e-3]]),  # one near-tie above a plateau
            np.concatenate([rng.random(m - 1), [1e3]]),  # a single outlier
            np.concatenate([np.full(max(1, m // 4), 2.0), rng.random(m - max(1, m // 4))]),  # tied maxima
            np.concatenate([rng.random(m // 2) * 1e-3, 5 + 1e-6 * rng.random(m - m // 2)]),  # two clusters
        ]
    return cases


def ties_at_max(losses) -> int:
    return int(np.sum(np.asarray(losses) == np.max(losses)))


def test_effective_sample_size_matches_the_50_digit_reference_for_t_from_0_to_inf():
    worst = 0.0
    for losses in loss_cases():
        for t in T_GRID + [math.inf]:
            ess = effective_sample_size(torch.tensor(losses), t).item()
            ref = reference_ess(losses, t)
            worst = max(worst, float(abs(ess - ref) / ref))
    assert worst <= 1e-12, worst


def test_effective_sample_size_limits_and_monotonicity():
    losses = torch.tensor([0.3, 1.2, 1.2, 0.7, 0.1], dtype=torch.float64)
    assert effective_sample_size(losses, 0.0).item() == 5.0
    assert effective_sample_size(losses, math.inf).item() == 2.0  # the two tied maxima
    values = [effective_sample_size(losses, t).item() for t in T_GRID]
    assert all(a >= b for a, b in zip(values, values[1:])) and values[-1] == pytest.approx(2.0)
    assert effective_sample_size(torch.full((7,), 3.0), 1e8).item() == 7.0  # all equal: always m


def check_tilt(losses, rho: float, t: float, eps: float) -> bool:
    """``t`` solves ESS/m = rho to ``eps`` relative (the root is bracketed by t (1 -+ eps)), or,
    where ESS is flat in t (a plateau of ESS at a cluster of tied losses, where t is not determined
    to eps by float64 data), ESS(t) = rho m to 1e-13 relative. Returns False in the second case."""
    target = mpmath.mpf(rho) * len(losses)
    if reference_ess(losses, t * (1 - eps)) >= target >= reference_ess(losses, t * (1 + eps)):
        return True
    residual = abs(reference_ess(losses, t) / target - 1)
    assert residual <= 1e-13, (losses, rho, t, residual)
    return False


RHOS = [1e-3, 0.01, 0.1, 0.3, 0.5, 0.9, 0.99, 1 - 1e-6, 1 - 1e-12]


@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_tilt_for_ess_solves_to_1e_8_relative_on_random_and_adversarial_losses(backend):
    solved, flat = 0, 0
    for losses in loss_cases():
        m, k = len(losses), ties_at_max(losses)
        for rho in RHOS:
            t = tilt_for_ess(torch.tensor(losses), rho, t_max=math.inf, backend=backend).item()
            if rho * m <= k or k == m:  # not attainable at any finite t
                assert t == math.inf
                continue
            assert 0 < t < math.inf
            flat += not check_tilt(losses, rho, t, 1e-8)
            solved += int(t <= 1e8)
    assert solved > 150 and flat <= 3, (solved, flat)  # most cases are well conditioned and t <= 1e8


def test_tilt_for_ess_in_float32_losses_solves_for_their_float64_values():
    g = torch.Generator().manual_seed(3)
    losses = torch.rand(64, generator=g) * 3
    for rho in (0.05, 0.5, 0.95):
        t = tilt_for_ess(losses, rho)
        assert t.dtype == torch.float64
        check_tilt(losses.double().numpy(), rho, t.item(), 1e-8)


def test_rho_one_is_the_plain_mean_and_unattainable_rho_gives_t_max():
    losses = torch.tensor([0.2, 0.9, 0.9, 0.9, 0.4, 0.1, 0.5, 0.3])  # k = 3 tied maxima of m = 8
    assert tilt_for_ess(losses, 1.0).item() == 0.0
    assert tilt_for_ess(losses, 3 / 8).item() == ESS_T_MAX  # the minimax limit itself
    assert tilt_for_ess(losses, 0.1).item() == ESS_T_MAX  # below it
    assert tilt_for_ess(losses, 0.1, t_max=math.inf).item() == math.inf
    assert tilt_for_ess(losses, 0.1, t_max=50.0).item() == 50.0
    just_above = tilt_for_ess(losses, 3 / 8 * (1 + 1e-6)).item()
    assert 0 < just_above < ESS_T_MAX
    check_tilt(losses.double().numpy(), 3 / 8 * (1 + 1e-6), just_above, 1e-8)
    equal = torch.full((5,), 0.7)
    assert tilt_for_ess(equal, 1.0).item() == 0.0 and tilt_for_ess(equal, 0.5).item() == ESS_T_MAX
    assert tilt_for_ess(torch.tensor([1.5]), 0.3).item() == ESS_T_MAX  # one sample: ESS = 1 always


def test_a_root_beyond_t_max_gives_t_max():
    losses = torch.tensor([1.0, 1.0 + 1e-8, 1.0 + 2e-8, 1.0 + 3e-8], dtype=torch.float64)
    beyond = tilt_for_ess(losses, 0.3, t_max=math.inf).item()
    assert beyond > 1e8
    assert tilt_for_ess(losses, 0.3).item() == ESS_T_MAX
    assert effective_sample_size(losses, ESS_T_MAX).item() > 0.3 * 4  # ESS/m has not yet fallen to rho


def test_the_tilt_is_scale_free_and_shift_invariant():
    g = torch.Generator().manual_seed(1)
    losses = torch.rand(32, generator=g, dtype=torch.float64) * 2
    t = tilt_for_ess(losses, 0.25).item()
    for scale in (1e-6, 1e-3, 10.0, 1e3):
        assert tilt_for_ess(losses * scale, 0.25).item() == pytest.approx(t / scale, rel=1e-9)
    assert tilt_for_ess(losses + 100.0, 0.25).item() == pytest.approx(t, rel=1e-9)


def test_rows_are_solved_independently_and_the_paths_agree():
    g = torch.Generator().manual_seed(2)
    rows = torch.rand(5, 40, generator=g, dtype=torch.float64) * torch.tensor([[0.1], [1.0], [10.0], [1e-4], [1e2]])
    rows[3] = 0.5  # all equal
    rho = torch.tensor([0.2, 0.5, 0.9, 0.5, 1.0], dtype=torch.float64)
    host = tilt_for_ess(rows, rho)
    device_path = tilt_for_ess(rows, rho, backend="torch")
    assert host.shape == (5,)
    for k in range(5):
        assert host[k].item() == tilt_for_ess(rows[k], rho[k].item()).item()
    torch.testing.assert_close(device_path, host, rtol=1e-10, atol=0)
    assert host[3].item() == ESS_T_MAX and host[4].item() == 0.0
    vmapped = torch.func.vmap(lambda l, r: tilt_for_ess(l, r, backend="torch"))(rows, rho)
    torch.testing.assert_close(vmapped, device_path, rtol=1e-12, atol=0)
    scalar = tilt_for_ess(rows, 0.5)
    assert scalar[1].item() == host[1].item()
    ess = effective_sample_size(rows, host)
    torch.testing.assert_close(ess[:3] / 40, rho[:3], rtol=1e-10, atol=0)
    assert ess[3].item() == 40.0


def test_nothing_is_differentiated_through_the_solve():
    losses = torch.rand(16, dtype=torch.float64).requires_grad_()
    assert not tilt_for_ess(losses, 0.5).requires_grad
    assert not effective_sample_size(losses, 2.0).requires_grad


@pytest.mark.parametrize("rho", [0.0, -0.5, 1.5, math.nan, math.inf])
def test_bad_rho_is_refused_in_one_line(rho):
    with pytest.raises(InputError, match=r"rho .* must be in \(0, 1\]"):
        tilt_for_ess(torch.rand(8), rho)


def test_bad_t_and_shapes_are_refused():
    with pytest.raises(InputError, match="t must be >= 0"):
        effective_sample_size(torch.rand(8), -1.0)
    with pytest.raises(InputError, match="t_max must be > 0"):
        tilt_for_ess(torch.rand(8), 0.5, t_max=0.0)
    with pytest.raises(InputError, match="expected losses of shape"):
        tilt_for_ess(torch.rand(0), 0.5)
    with pytest.raises(InputError, match="expected losses of shape"):
        effective_sample_size(torch.rand(2, 3, 4), 1.0)
