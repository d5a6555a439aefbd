"""Masks at a target sparsity from per-weight scores, and the baseline scores as functions.

Scores are per weight, keyed by parameter name as in ``model.named_parameters()``
(``"fc1.weight"``), tensors of the weight's shape; a higher score means a more important weight.
They come from an importance criterion of :mod:`pruning.importance` (magnitude, Optimal Brain
Damage, Wald); :func:`magnitude_scores` and :func:`obd_scores` are the functional forms of the
first two, and :meth:`pruning.significance.WaldResult.scores` gives the Wald scores of a test.
:func:`masks_at_sparsity` brings any of them to the same sparsity.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from anrat.errors import InputError
from anrat.functional import LossKind
from pruning.flat import flatten, unflatten
from pruning.importance import MagnitudeImportance, OBDImportance

SCOPES: tuple[str, ...] = ("global", "layer")


def magnitude_scores(model: nn.Module, layers: Sequence[str] | None = None) -> dict[str, Tensor]:
    """|w| for the weights of the tested layers (default every ``nn.Linear`` and ``nn.Conv2d``):
    :class:`pruning.importance.MagnitudeImportance` as a function."""
    return MagnitudeImportance(layers)(model)


def obd_scores(
    model: nn.Module,
    data: Any,
    *,
    loss: LossKind = "ce",
    fisher: str = "model",
    layers: Sequence[str] | None = None,
    max_samples: int | None = 10_000,
    batch_size: int = 256,
    seed: int = 0,
    progress: bool = False,
) -> dict[str, Tensor]:
    """Optimal Brain Damage saliencies 0.5 * F_jj * w_j^2, F the per-sample Fisher (the Hessian
    of the mean loss in the Gauss-Newton approximation) estimated on at most ``max_samples`` of
    ``data``: :class:`pruning.importance.OBDImportance` as a function; arguments as for
    :func:`pruning.significance.wald_test`.
    """
    return OBDImportance(
        loss=loss,
        fisher=fisher,
        layers=layers,
        max_samples=max_samples,
        batch_size=batch_size,
        seed=seed,
        progress=progress,
    )(model, data)


def masks_at_sparsity(scores: dict[str, Tensor], sparsity: float, scope: str = "global") -> dict[str, Tensor]:
    """Bool keep-masks (True = keep) that remove the lowest-scoring fraction ``sparsity`` of weights.

    ``scope="global"`` ranks all weights together and removes round(sparsity * total) of them;
    ``scope="layer"`` removes round(sparsity * size) from each tensor. Ties are broken by position
    (a stable sort), so exactly that many are removed.
    """
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or not 0 <= sparsity < 1:
        raise InputError(f"sparsity must be a fraction in [0, 1), got {sparsity!r}")
    if scope not in SCOPES:
        raise InputError(f"unknown scope {scope!r}; expected one of {list(SCOPES)}")
    if not scores:
        raise InputError("scores is empty; nothing to prune")
    for name, score in scores.items():
        if not isinstance(score, Tensor) or not bool(torch.isfinite(score).all()):
            raise InputError(f"scores[{name!r}] must be a tensor of finite numbers")

    def keep_mask(flat: Tensor) -> Tensor:
        removed = math.floor(sparsity * flat.numel() + 0.5)
        order = torch.sort(flat, stable=True).indices
        keep = torch.ones(flat.numel(), dtype=torch.bool, device=flat.device)
        keep[order[:removed]] = False
        return keep

    if scope == "layer":
        return {name: keep_mask(score.reshape(-1)).reshape(score.shape) for name, score in scores.items()}
    ranked = {name: score.detach().to(device="cpu", dtype=torch.float64) for name, score in scores.items()}
    masks = unflatten(keep_mask(flatten(ranked)), ranked)
    return {name: mask.to(scores[name].device) for name, mask in masks.items()}


__all__ = ["magnitude_scores", "masks_at_sparsity", "obd_scores"]
