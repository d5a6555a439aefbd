"""The acceptance test of a pruning round: its error rates on synthetic paired outcomes, its
agreement with McNemar's test at margin 0, and its refusals."""

import math

import numpy as np
import pytest
from scipy import stats
from statsmodels.stats.contingency_tables import mcnemar

from anrat.errors import InputError
from pruning.acceptance import (
    acceptance_rate,
    images_needed,
    paired_noninferiority,
    score_statistic,
    upper_bound,
)


def _outcomes(n: int, worse: int, better: int, both: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Paired wrong-vectors with ``worse`` images only the candidate misses, ``better`` only the
    reference misses and ``both`` that both miss."""
    ref, cand = np.zeros(n, bool), np.zeros(n, bool)
    cand[:worse] = True
    ref[worse : worse + better] = True
    ref[worse + better : worse + better + both] = cand[worse + better : worse + better + both] = True
    return ref, cand


def test_at_margin_zero_the_statistic_is_mcnemars():
    for b, c in [(30, 12), (5, 9), (1, 0), (80, 80)]:
        table = [[1000, b], [c, 500]]
        chi2 = mcnemar(table, exact=False, correction=False).statistic
        assert float(score_statistic(b, c, 1000 + b + c + 500, 0.0)) ** 2 == pytest.approx(chi2, rel=1e-9)


def test_no_disagreement_bounds_the_difference_by_z_squared_over_n():
    n, alpha = 10_000, 0.05
    z = stats.norm.ppf(1 - alpha)
    result = paired_noninferiority(*_outcomes(n, 0, 0, both=70), margin=0.001, alpha=alpha)
    assert result.estimate == 0 and result.worse == result.better == 0
    assert result.upper == pytest.approx(z**2 / (n + z**2), rel=1e-6)  # Z(d) = -sqrt(n d / (1 - d))
    assert result.accepted


def test_the_decision_is_the_bound_below_the_margin():
    rng = np.random.default_rng(0)
    for _ in range(200):
        n = int(rng.integers(500, 20_000))
        b, c = (int(v) for v in rng.integers(0, 60, size=2))
        margin, alpha = float(rng.uniform(0.0005, 0.02)), float(rng.choice([0.05, 0.1, 0.2]))
        result = paired_noninferiority(*_outcomes(n, b, c), margin=margin, alpha=alpha)
        assert result.estimate == pytest.approx((b - c) / n)
        assert result.upper >= result.estimate
        assert result.accepted == (result.upper < margin) or math.isclose(result.upper, margin, rel_tol=1e-6)
        assert result.accepted == (result.pvalue < alpha) or math.isclose(result.pvalue, alpha, rel_tol=1e-6)


def _simulated_acceptance(n, margin, alpha, discordance, difference, draws, seed):
    p_b, p_c = (discordance + difference) / 2, (discordance - difference) / 2
    counts = np.random.default_rng(seed).multinomial(n, [p_b, p_c, 1 - p_b - p_c], size=draws)
    z = score_statistic(counts[:, 0], counts[:, 1], n, margin)
    return float(np.mean(z < -stats.norm.ppf(1 - alpha)))


@pytest.mark.parametrize("discordance", [0.003, 0.006, 0.02])
def test_a_round_worse_by_the_margin_is_accepted_at_most_at_the_level(discordance):
    n, margin, alpha, draws = 10_000, 0.001, 0.05, 20_000
    exact = acceptance_rate(n, margin, alpha, discordance, difference=margin)
    simulated = _simulated_acceptance(n, margin, alpha, discordance, margin, draws, seed=1)
    mc_se = math.sqrt(alpha * (1 - alpha) / draws)
    assert exact <= alpha + 0.005  # the score test's size, summed exactly
    assert simulated <= alpha + 4 * mc_se
    assert simulated == pytest.approx(exact, abs=4 * mc_se)
    # worse than the margin: accepted less often still
    assert acceptance_rate(n, margin, alpha, discordance, difference=2 * margin) < exact


@pytest.mark.parametrize("discordance, n", [(0.003, 10_000), (0.005, 10_000), (0.005, 40_000)])
def test_a_round_no_worse_is_accepted_at_the_stated_power(discordance, n):
    margin, alpha, draws = 0.001, 0.05, 20_000
    power = acceptance_rate(n, margin, alpha, discordance, difference=0.0)
    simulated = _simulated_acceptance(n, margin, alpha, discordance, 0.0, draws, seed=2)
    assert simulated == pytest.approx(power, abs=4 * math.sqrt(power * (1 - power) / draws))
    assert alpha < power < 1


def test_images_needed_reaches_the_power_and_grows_as_the_margin_shrinks():
    n = images_needed(0.002, 0.05, 0.005, power=0.8)
    assert acceptance_rate(n, 0.002, 0.05, 0.005) >= 0.8
    assert acceptance_rate(int(n * 0.8), 0.002, 0.05, 0.005) < 0.8
    assert images_needed(0.001, 0.05, 0.005, power=0.8) > 3 * n  # about 1 / margin^2


def test_bound_with_many_better_images_is_negative():
    assert upper_bound(2, 40, 5000, 0.05) < 0


@pytest.mark.parametrize(
    "margin, alpha, match",
    [
        (0.0, 0.05, "margin"),
        (-0.01, 0.05, "margin"),
        (1.0, 0.05, "margin"),
        (float("nan"), 0.05, "margin"),
        (0.001, 0.0, "alpha"),
        (0.001, 1.0, "alpha"),
    ],
)
def test_bad_margins_and_levels_are_refused(margin, alpha, match):
    with pytest.raises(InputError, match=match):
        paired_noninferiority(*_outcomes(100, 1, 1), margin=margin, alpha=alpha)


def test_unpaired_outcomes_are_refused():
    with pytest.raises(InputError, match="one length"):
        paired_noninferiority(np.zeros(10, bool), np.zeros(11, bool), margin=0.01)
