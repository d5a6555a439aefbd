"""Whether a pruned model may replace its reference: a non-inferiority test on paired outcomes.

Both models classify the same n held-out images. Per image the outcomes pair up; only the
discordant pairs carry information about the difference:

    b = images the reference gets right and the candidate gets wrong (errors the candidate added)
    c = images the reference gets wrong and the candidate gets right (errors it removed)

The candidate's error rate minus the reference's is D = p_b - p_c, estimated by D_hat = (b - c) / n.
The candidate is **accepted** when the data show it is no worse than the reference by the margin
delta (the pruning ``tolerance``), i.e. when H0: D >= delta is rejected in favour of H1: D < delta
at level alpha. A round that truly costs delta or more is then accepted with probability at most
alpha (up to the test's asymptotic approximation, checked exactly by :func:`acceptance_rate`).

The test is the score test for paired proportions with a non-zero margin (Nam 1997; Tango 1998,
"Equivalence test and confidence interval for the difference in proportions for the paired-sample
design", Stat. Med. 17: 891-908). Under H0 at D = delta the variance of D_hat is
(p_b + p_c - delta^2) / n, with p_c replaced by its maximum-likelihood estimate under the
constraint p_b = p_c + delta, the positive root of

    2n x^2 + [delta (2n - b + c) - (b + c)] x - c delta (1 - delta) = 0,

and Z(delta) = (D_hat - delta) / sqrt((2 x + delta - delta^2) / n), p = Phi(Z(delta)). The
one-sided upper confidence bound of D at level 1 - alpha is the delta at which Z(delta) =
-z_{1-alpha} (found with ``scipy.optimize.brentq``; Z decreases in delta); the candidate is
accepted exactly when that bound is below the margin. Unlike the Wald interval, whose variance
(b + c) / n^2 - D_hat^2 / n vanishes with the discordant pairs, the score test stays calibrated
when few pairs disagree, which is the usual case between a network and its pruned copy.

Written here because ``statsmodels`` has McNemar's test of D = 0 (``mcnemar``) and margins only for
independent samples (``test_proportions_2indep``), not a paired test against a margin.

How many images a margin needs: the test's power depends on n, delta, alpha and the discordance
p_b + p_c (how often the two models disagree). :func:`acceptance_rate` computes the probability of
acceptance exactly (a sum over the binomial laws of b and c); :func:`images_needed` inverts it.
docs/pruning.md tabulates both.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from scipy import optimize, stats
from torch import Tensor

from anrat.errors import InputError


def check_margin_alpha(margin: float, alpha: float) -> None:
    """Refuse a margin outside (0, 1) or a level outside (0, 1) (NaN fails every comparison)."""
    if not (isinstance(margin, int | float) and 0 < margin < 1):
        raise InputError(
            f"the margin (tolerance) must be in (0, 1) in error-rate units (0.001 = 0.1 points), got {margin!r}"
        )
    if not (isinstance(alpha, int | float) and 0 < alpha < 1):
        raise InputError(f"the acceptance level alpha must be in (0, 1), got {alpha!r}")


def _restricted_pc(b: np.ndarray, c: np.ndarray, n: int, delta: float) -> np.ndarray:
    """The maximum-likelihood p_c under p_b - p_c = delta (module docstring), elementwise."""
    a2 = 2.0 * n
    bb = delta * (2.0 * n - b + c) - (b + c)
    cc = -c * delta * (1.0 - delta)
    disc = np.maximum(bb * bb - 4.0 * a2 * cc, 0.0)
    root = (-bb + np.sqrt(disc)) / (2.0 * a2)
    return np.clip(root, max(0.0, -delta), (1.0 - delta) / 2.0)


def score_statistic(b: Any, c: Any, n: int, delta: float) -> np.ndarray:
    """Z(delta) of the module docstring for discordant counts ``b``, ``c`` (scalars or arrays) out
    of ``n`` pairs; negative values favour D < delta."""
    b, c = np.asarray(b, dtype=float), np.asarray(c, dtype=float)
    x = _restricted_pc(b, c, n, delta)
    var = (2.0 * x + delta - delta * delta) / n
    diff = (b - c) / n - delta
    with np.errstate(divide="ignore", invalid="ignore"):
        z = np.where(var > 0, diff / np.sqrt(np.maximum(var, 1e-300)), np.sign(diff) * np.inf)
    return np.where(diff == 0, 0.0, z)


@dataclass
class NonInferiority:
    """One paired non-inferiority test (module docstring); rates in error-rate units (0.001 =
    0.1 percentage point of error)."""

    n: int  # paired images
    worse: int  # b: right under the reference, wrong under the candidate
    better: int  # c: wrong under the reference, right under the candidate
    estimate: float  # D_hat = (b - c) / n
    upper: float  # one-sided upper confidence bound of D at level 1 - alpha
    margin: float
    alpha: float
    pvalue: float  # of H0: D >= margin
    accepted: bool  # upper < margin

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def line(self) -> str:
        """The decision in words: estimate, bound and margin in percentage points."""
        verdict = "no worse than" if self.accepted else "not shown to be within"
        return (
            f"{verdict} the reference by {100 * self.margin:.2g} points: difference {100 * self.estimate:+.2f} points "
            f"({self.worse} worse, {self.better} better of {self.n:,}), {100 * (1 - self.alpha):.0f}% upper bound "
            f"{100 * self.upper:+.2f} points, p = {self.pvalue:.3g}"
        )


def upper_bound(b: int, c: int, n: int, alpha: float) -> float:
    """The one-sided upper confidence bound of D = p_b - p_c at level 1 - alpha (score interval)."""
    z = float(stats.norm.ppf(1.0 - alpha))
    estimate = (b - c) / n
    top = 1.0 - 1e-12
    f = lambda delta: float(score_statistic(b, c, n, delta)) + z  # noqa: E731
    if f(top) > 0:  # no root below 1: the bound is the whole range
        return top
    return float(optimize.brentq(f, estimate, top, xtol=1e-10))


def paired_noninferiority(
    reference_wrong: Tensor | np.ndarray, candidate_wrong: Tensor | np.ndarray, margin: float, alpha: float = 0.05
) -> NonInferiority:
    """Test H0: err(candidate) - err(reference) >= ``margin`` on paired per-image outcomes
    (boolean vectors, True = misclassified), at level ``alpha`` (module docstring)."""
    check_margin_alpha(margin, alpha)
    ref = torch.as_tensor(reference_wrong).bool().flatten().cpu()
    cand = torch.as_tensor(candidate_wrong).bool().flatten().cpu()
    if ref.shape != cand.shape or ref.numel() == 0:
        raise InputError(
            f"paired outcomes need two non-empty vectors of one length, got {ref.numel()} and {cand.numel()}"
        )
    n = ref.numel()
    b, c = int((~ref & cand).sum()), int((ref & ~cand).sum())
    z = float(score_statistic(b, c, n, margin))
    return NonInferiority(
        n=n,
        worse=b,
        better=c,
        estimate=(b - c) / n,
        upper=upper_bound(b, c, n, alpha),
        margin=margin,
        alpha=alpha,
        pvalue=float(stats.norm.cdf(z)),
        accepted=bool(z < -stats.norm.ppf(1.0 - alpha)),
    )


def acceptance_rate(n: int, margin: float, alpha: float, discordance: float, difference: float = 0.0) -> float:
    """The exact probability that :func:`paired_noninferiority` accepts, when the two models
    disagree on a fraction ``discordance`` = p_b + p_c of images and the candidate's true cost is
    ``difference`` = p_b - p_c. At ``difference >= margin`` this is the test's size (at most about
    alpha); at ``difference = 0`` its power. A sum over b ~ Binomial(n, p_b) and
    c | b ~ Binomial(n - b, p_c / (1 - p_b)), truncated where the remaining mass is below 1e-12."""
    check_margin_alpha(margin, alpha)
    p_b, p_c = (discordance + difference) / 2, (discordance - difference) / 2
    if not (0 <= p_c and 0 <= p_b and p_b + p_c <= 1):
        raise InputError(f"need |difference| <= discordance <= 1, got {difference!r} and {discordance!r}")
    z = stats.norm.ppf(1.0 - alpha)
    b_lo, b_hi = (int(v) for v in stats.binom.ppf([1e-13, 1 - 1e-13], n, p_b))
    bs = np.arange(b_lo, b_hi + 1)
    total = 0.0
    q = p_c / (1 - p_b) if p_b < 1 else 0.0
    for b, weight in zip(bs, stats.binom.pmf(bs, n, p_b)):
        c_lo, c_hi = (int(v) for v in stats.binom.ppf([1e-13, 1 - 1e-13], n - b, q))
        cs = np.arange(c_lo, c_hi + 1)
        accept = score_statistic(np.full(cs.shape, b), cs, n, margin) < -z
        total += weight * float(stats.binom.pmf(cs[accept], n - b, q).sum())
    return total


def images_needed(margin: float, alpha: float, discordance: float, power: float = 0.8) -> int:
    """The fewest paired images at which a candidate that is truly as good as its reference
    (difference 0) is accepted with probability ``power``, for two models disagreeing on a
    fraction ``discordance`` of images. From the normal approximation, then checked and raised with
    :func:`acceptance_rate`."""
    check_margin_alpha(margin, alpha)
    z_a, z_b = stats.norm.ppf(1 - alpha), stats.norm.ppf(power)
    sd0 = math.sqrt(max(discordance + margin - margin**2, 1e-12))  # the restricted SD at D = margin, roughly
    sd1 = math.sqrt(discordance)
    n = max(1, math.ceil(((z_a * sd0 + z_b * sd1) / margin) ** 2))
    while acceptance_rate(n, margin, alpha, discordance) < power:
        n = math.ceil(n * 1.05)
    return n
