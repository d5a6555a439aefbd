"""Which weights can go at once: a held-out deletion test over a fixed sequence of removal sets.

The Wald tests ask, weight by weight, whether w_j = 0 is compatible with the training data. On a
network that separates its training data the likelihood is flat around the fit (the Hauck-Donner
regime), every standard error is huge, and the tests call every weight removable, jointly and
singly; removing them all at once is a disaster. So the question is asked directly, of the set:

    H0(S): err(model without S) - err(model) >= delta        (S: a set of weights zeroed at once)

on held-out images that played no part in training or selection, with the paired
non-inferiority score test of :mod:`pruning.acceptance` (margin delta, level alpha). The sets are
nested and fixed in advance: S_k is the fraction f_k (a grid 0.05, 0.10, ..., 0.95) of the weights
with the smallest scores (by default the Wald tests' |z|: the order the tests give, not their
verdict). They are tested in order, smallest first, and the procedure stops at the first set not
shown removable; the removable set is the last one shown. Testing a pre-ordered sequence this way
(fixed-sequence testing) keeps the chance of calling any set removable that is not at level alpha,
without a multiplicity correction.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from anrat.data import Split
from anrat.errors import InputError
from pruning.acceptance import check_margin_alpha, paired_noninferiority
from pruning.flat import flatten, unflatten
from pruning.prune import wrong_outcomes

GRID = tuple(round(0.05 * k, 2) for k in range(1, 20))  # 0.05, 0.10, ..., 0.95


@dataclass
class RemovableSet:
    """Outcome of :func:`removable_set`: ``masks`` (parameter name -> bool, True = removable),
    ``fraction`` (of the scored weights), and one record per tested set (its fraction and its
    paired test against the unpruned model)."""

    masks: dict[str, Tensor]
    fraction: float
    margin: float
    alpha: float
    tests: list[dict[str, Any]] = field(default_factory=list)

    def line(self) -> str:
        shown = [t for t in self.tests if t["accepted"]]
        last = self.tests[-1] if self.tests else None
        stop = (
            f"; the next set ({last['fraction']:.0%}) was not shown within the margin (upper bound "
            f"{100 * last['upper']:+.2f} points)"
            if last is not None and not last["accepted"]
            else ""
        )
        return (
            f"removable at once: {self.fraction:.0%} of the weights, the last of {len(shown)} nested sets shown "
            f"to raise held-out error by less than {100 * self.margin:.2f} points at level {self.alpha:g}{stop}"
        )


def removable_set(
    model: nn.Module,
    scores: dict[str, Tensor],
    held_out: Split,
    *,
    margin: float = 0.002,
    alpha: float = 0.05,
    grid: Sequence[float] = GRID,
) -> RemovableSet:
    """The largest of the nested sets (the ``grid`` fractions of the weights named in ``scores``
    with the smallest scores, over all those weights) whose removal at once, without retraining,
    is shown by the paired non-inferiority test on ``held_out`` to raise the error by less than
    ``margin`` (a fraction: 0.002 = 0.2 point) at level ``alpha`` (module docstring). Weights
    already zero count as removed from the start. ``model`` is not changed."""
    check_margin_alpha(margin, alpha)
    fractions = list(grid)
    if not fractions or any(not 0 < f < 1 for f in fractions) or fractions != sorted(set(fractions)):
        raise InputError(f"grid must be increasing fractions in (0, 1), got {list(grid)}")
    params = dict(model.named_parameters())
    unknown = sorted(set(scores) - set(params))
    if unknown:
        raise InputError(f"scores name {unknown[0]!r}, which is not a parameter of the model")
    flat = flatten({name: s.detach().float().cpu() for name, s in scores.items()})
    order = torch.argsort(flat, stable=True)
    reference = wrong_outcomes(model, held_out)
    original = {name: params[name].detach().clone() for name in scores}
    tests: list[dict[str, Any]] = []
    best = torch.zeros_like(flat, dtype=torch.bool)
    try:
        for fraction in fractions:
            drop = torch.zeros_like(flat, dtype=torch.bool)
            drop[order[: int(fraction * flat.numel())]] = True
            with torch.no_grad():
                for name, mask in unflatten(drop, scores).items():
                    params[name].copy_(original[name] * (~mask).to(original[name].device, original[name].dtype))
            test = paired_noninferiority(reference, wrong_outcomes(model, held_out), margin, alpha)
            tests.append({"fraction": fraction, **test.as_dict()})
            if not test.accepted:
                break
            best = drop
    finally:
        with torch.no_grad():
            for name, value in original.items():
                params[name].copy_(value)
    return RemovableSet(unflatten(best, scores), float(best.float().mean()), margin, alpha, tests)


__all__ = ["GRID", "RemovableSet", "removable_set"]
