"""How important each weight is, one class per criterion: magnitude, Optimal Brain Damage, Wald.

An :class:`Importance` is called on a model (and the training data, for the criteria that need
it) and returns a score per weight of the prunable layers (:mod:`pruning.layers`): keyed by
parameter name as in ``model.named_parameters()`` (``"fc1.weight"``), float64 tensors of the
weight's shape on the CPU. A higher score means a more important weight; scores of different
criteria are not comparable with each other, only their rankings are. :func:`pruning.saliency.masks_at_sparsity`
turns any of them into keep-masks at a target sparsity, and :func:`pruning.prune_to_sparsity`
takes one (or its name, :func:`make_importance`).

- :class:`MagnitudeImportance`: |w_j|;
- :class:`OBDImportance` (LeCun, Denker & Solla 1990): 0.5 * F_jj * w_j^2, the second-order
  increase of the mean training loss when w_j is set to zero, with the Hessian's diagonal
  approximated by the Fisher's (:func:`pruning.fisher.diagonal_fisher`; for cross-entropy the
  model Fisher is the Gauss-Newton matrix, the usual OBD approximation; for ``"lp"`` it is the
  Gauss-Newton matrix divided by sigma^2, which rescales every score alike);
- :class:`TaylorImportance` (Molchanov et al. 2019): sum over minibatches b of (g_bj * w_j)^2, the
  squared first-order change of the minibatch loss when w_j is set to zero;
- :class:`WaldImportance`: |z_j| = |w_j| / se_j (:func:`pruning.significance.wald_test`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from anrat.errors import InputError
from anrat.functional import LossKind, per_sample_loss
from pruning.estimators import FisherEstimator
from pruning.fisher import diagonal_fisher, prepare
from pruning.layers import eval_mode, select_layers, weight_name
from pruning.significance import wald_test


class Importance(ABC):
    """A per-weight importance score (higher = more important) of a model's prunable layers.

    A criterion that tests the weights in an equivalent form of the model may put the model in
    that form in place (same predictions) so that the scores refer to the weights it then holds:
    only :class:`WaldImportance` does, for a softmax output layer.
    """

    #: The name :func:`make_importance` and ``prune_to_sparsity(criterion=...)`` take.
    name: ClassVar[str]

    @abstractmethod
    def __call__(self, model: nn.Module, data: Any = None) -> dict[str, Tensor]:
        """Scores per weight name; ``data`` (the training data, any form :func:`pruning.fisher.as_tensors`
        takes) is needed by the criteria that estimate a Fisher information."""


def _weights(layers: Mapping[str, nn.Module]) -> dict[str, Tensor]:
    """The weights of ``layers``, float64 on the CPU, by parameter name."""
    return {
        weight_name(name): module.weight.detach().to(device="cpu", dtype=torch.float64)
        for name, module in layers.items()
    }


@dataclass(frozen=True)
class MagnitudeImportance(Importance):
    """|w_j| for the weights of ``layers`` (default every prunable layer); needs no data."""

    name: ClassVar[str] = "magnitude"
    layers: Sequence[str] | None = None

    def __call__(self, model: nn.Module, data: Any = None) -> dict[str, Tensor]:
        return {name: weight.abs() for name, weight in _weights(select_layers(model, self.layers)).items()}


@dataclass(frozen=True)
class OBDImportance(Importance):
    """Optimal Brain Damage saliency 0.5 * F_jj * w_j^2 (units: the loss's, per sample), F the
    per-sample Fisher estimated on at most ``max_samples`` of the data; the options are those of
    :func:`pruning.significance.wald_test`.

    Cost: per-sample gradients of all scored weights, O(N K P) time for K outputs (one backward
    pass per output per sample with the model Fisher, one with ``fisher="empirical"``).
    """

    name: ClassVar[str] = "obd"
    loss: LossKind = "ce"
    fisher: str = "model"
    layers: Sequence[str] | None = None
    max_samples: int | None = 10_000
    batch_size: int = 256
    seed: int = 0
    progress: bool = False

    def __call__(self, model: nn.Module, data: Any = None) -> dict[str, Tensor]:
        modules = select_layers(model, self.layers)
        fd = prepare(
            model,
            data,
            loss=self.loss,
            layers=modules,
            max_samples=self.max_samples,
            batch_size=self.batch_size,
            seed=self.seed,
        )
        weights = _weights(modules)
        diagonal = diagonal_fisher(
            model, fd, list(weights), fisher=self.fisher, batch_size=self.batch_size, progress=self.progress
        )
        return {name: 0.5 * diagonal[name] * weight.square() for name, weight in weights.items()}


@dataclass(frozen=True)
class TaylorImportance(Importance):
    """First-order Taylor importance (Molchanov, Mallya, Tyree, Frosio & Kautz 2019, "Importance
    estimation for neural network pruning"): sum_b (g_bj * w_j)^2 over minibatches b of
    ``batch_size`` samples drawn from at most ``max_samples`` of the data, g_b the gradient of the
    minibatch's mean loss. At a minimum of the full-data loss the mean gradient vanishes, so the
    squares of minibatch gradients carry the signal. Cost: one forward and backward pass per
    minibatch (the model in eval mode, so dropout is off)."""

    name: ClassVar[str] = "taylor"
    loss: LossKind = "ce"
    layers: Sequence[str] | None = None
    max_samples: int | None = 10_000
    batch_size: int = 64
    seed: int = 0

    def __call__(self, model: nn.Module, data: Any = None) -> dict[str, Tensor]:
        modules = select_layers(model, self.layers)
        fd = prepare(model, data, loss=self.loss, layers=modules, max_samples=self.max_samples, seed=self.seed)
        params = {weight_name(name): module.weight for name, module in modules.items()}
        sums = {name: torch.zeros(p.shape, dtype=torch.float64) for name, p in params.items()}
        device = next(model.parameters()).device
        with eval_mode(model):
            for x, y in fd.batches(self.batch_size):
                out = model(x.to(device))
                mean = per_sample_loss(out, y.to(device), self.loss).mean()
                grads = torch.autograd.grad(mean, list(params.values()))
                for (name, p), g in zip(params.items(), grads):
                    sums[name] += (g.detach() * p.detach()).double().cpu().square()
        return sums


@dataclass(frozen=True)
class WaldImportance(Importance):
    """|z_j|, the Wald statistic of H0: w_j = 0 (:func:`pruning.significance.wald_test` with
    these options). A tested softmax output layer is then centred in place
    (:meth:`pruning.significance.WaldResult.center_layers`: predictions unchanged), because its
    weights are tested in that form."""

    name: ClassVar[str] = "wald"
    loss: LossKind = "ce"
    estimator: str | FisherEstimator = "kfac"
    fisher: str = "model"
    layers: Sequence[str] | None = None
    max_samples: int | None = 10_000
    batch_size: int = 256
    damping: float = 1e-6
    n_fit: int | None = None
    seed: int = 0
    progress: bool = False

    def __call__(self, model: nn.Module, data: Any = None) -> dict[str, Tensor]:
        test = wald_test(
            model,
            data,
            loss=self.loss,
            estimator=self.estimator,
            fisher=self.fisher,
            layers=self.layers,
            max_samples=self.max_samples,
            batch_size=self.batch_size,
            damping=self.damping,
            n_fit=self.n_fit,
            seed=self.seed,
            progress=self.progress,
        )
        test.center_layers(model)
        return test.scores()


#: The criterion names and their classes: the one place a name becomes an importance.
IMPORTANCES: dict[str, type[Importance]] = {
    cls.name: cls for cls in (MagnitudeImportance, OBDImportance, TaylorImportance, WaldImportance)
}


def make_importance(criterion: str | Importance, **options: Any) -> Importance:
    """The importance object for a criterion name (``"magnitude"``, ``"obd"``, ``"wald"``), built
    with those of ``options`` that the criterion takes (e.g. ``loss``, ``max_samples``; the
    others are ignored: magnitude needs neither); an object is returned as is."""
    if isinstance(criterion, Importance):
        return criterion
    if not isinstance(criterion, str) or criterion not in IMPORTANCES:
        raise InputError(f"unknown pruning criterion {criterion!r}; expected one of {sorted(IMPORTANCES)}")
    cls = IMPORTANCES[criterion]
    accepted = {f.name for f in fields(cls)}
    return cls(**{key: value for key, value in options.items() if key in accepted})


__all__ = [
    "IMPORTANCES",
    "Importance",
    "MagnitudeImportance",
    "OBDImportance",
    "TaylorImportance",
    "WaldImportance",
    "make_importance",
]
