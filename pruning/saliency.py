"""Baseline pruning scores behind the same interface as the Wald test, and masks at a target sparsity.

Scores are per weight, keyed by parameter name as in ``model.named_parameters()``
(``"fc1.weight"``), float64 tensors of the weight's shape on the CPU; a higher score means a more
important weight. The three methods are brought to the same sparsity by
:func:`masks_at_sparsity`:

- magnitude: |w_j|;
- Optimal Brain Damage (LeCun, Denker & Solla 1990): 0.5 * H_jj * w_j^2, the second-order
  increase of the mean training loss when w_j is set to zero, with the diagonal of the Hessian
  approximated by the diagonal of the Fisher (:func:`pruning.fisher.diagonal_fisher`; for
  cross-entropy the model Fisher is the Gauss-Newton matrix, the usual OBD approximation; for
  ``"lp"`` it is the Gauss-Newton matrix divided by sigma^2, which rescales every score alike);
- Wald: |z_j| (:meth:`pruning.significance.WaldResult.scores`).
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch
from torch import Tensor, nn

from anrat.errors import InputError
from anrat.functional import LossKind
from pruning import fisher as fisher_mod
from pruning.flat import flatten, unflatten
from pruning.layers import select_layers, weight_name

SCOPES: tuple[str, ...] = ("global", "layer")


def magnitude_scores(model: nn.Module, layers: Sequence[str] | None = None) -> dict[str, Tensor]:
    """|w| for the weights of the tested layers (default every ``nn.Linear`` and ``nn.Conv2d``)."""
    modules = select_layers(model, layers)
    return {weight_name(name): module.weight.detach().to(device="cpu", dtype=torch.float64).abs() for name, module in modules.items()}


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
    ``data``; arguments as for :func:`pruning.significance.wald_test`.

    Cost: per-sample gradients of all tested weights, O(N K P) time for K outputs (one backward
    pass per output per sample with the model Fisher, one with ``fisher="empirical"``).
    """
    modules = select_layers(model, layers)
    fd = fisher_mod.prepare(model, data, loss=loss, layers=modules, max_samples=max_samples, batch_size=batch_size, seed=seed)
    names = [weight_name(name) for name in modules]
    diagonal = fisher_mod.diagonal_fisher(model, fd, names, fisher=fisher, batch_size=batch_size, progress=progress)
    params = dict(model.named_parameters())
    return {name: 0.5 * diagonal[name] * params[name].detach().to(device="cpu", dtype=torch.float64).square() for name in names}


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
