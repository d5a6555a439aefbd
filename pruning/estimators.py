"""The Fisher estimators behind the Wald tests, one object each: ``"kfac"``, ``"full"``, ``"diagonal"``.

An estimator does three things for the tested layers of a network (:mod:`pruning.significance`
has the tests and the statistics; :mod:`pruning.fisher` the Fisher computations):

1. :meth:`FisherEstimator.check_layers` refuses, before any data is read, layers it cannot handle;
2. :meth:`FisherEstimator.estimate` estimates each layer's block of the per-sample Fisher F
   (units: 1 / parameter^2 per sample) on the prepared samples;
3. :meth:`FisherEstimator.layer_tests` inverts a layer's block into the standard errors
   se_j = sqrt([F^-1]_jj / n) of its weights (in the weight's units) and the Wald chi-square
   chi2_g = w_g^T Cov_g^-1 w_g of each unit g, with Cov = F^-1 / n.

Every estimator is block-diagonal across layers; each layer's block is inverted on its own.
Damping, the softmax output layer's identification (``free`` columns: centred, tested on the
sum-to-zero subspace) and the columns identified by an exact zero are described in
:mod:`pruning.significance`. :func:`fisher_estimator` maps the user-facing names to the objects.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple

import torch
from torch import Tensor, nn

from anrat.errors import InputError
from pruning.fisher import FisherData, KroneckerFactors, dense_fisher, diagonal_fisher, kfac_factors
from pruning.layers import weight_name

# A dense block of 4096^2 float64 is 128 MiB; larger layers need "kfac" or "diagonal".
DENSE_MAX_PARAMS = 4096


class LayerTests(NamedTuple):
    """A layer's Wald statistics before the weight is divided in: ``se`` (float64, the weight's
    shape; inf for a weight the data do not identify) and ``unit_chi2`` (float64, one per unit)."""

    se: Tensor
    unit_chi2: Tensor


class Sandwich(NamedTuple):
    """A layer's sandwich estimate (:func:`pruning.significance.wald_test` with
    ``covariance="sandwich"``): Cov = bread^-1 meat bread^-1 / n, each of the estimator's form
    (a dense block for ``"full"``, a diagonal for ``"diagonal"``)."""

    bread: Tensor
    meat: Tensor


class FisherEstimator(ABC):
    """One way to estimate a layer's Fisher information and invert it into Wald statistics."""

    #: The name ``wald_test(estimator=...)`` and the command line take.
    name: ClassVar[str]

    def check_layers(self, layers: Mapping[str, nn.Module]) -> None:  # noqa: B027 (a no-op unless overridden)
        """Refuse (:class:`InputError`) tested layers this estimator cannot handle (by default it handles all)."""

    #: The function of :mod:`pruning.fisher` that estimates each layer's Fisher (estimate, below).
    fisher_function: ClassVar[Callable[..., dict[str, Any]]]

    def estimate(
        self,
        model: nn.Module,
        fd: FisherData,
        layers: Mapping[str, nn.Module],
        *,
        fisher: str = "model",
        batch_size: int = 256,
        progress: bool = False,
    ) -> dict[str, Any]:
        """Each tested layer's Fisher estimate on the samples of ``fd``, keyed by layer name."""
        return type(self).fisher_function(model, fd, layers, fisher=fisher, batch_size=batch_size, progress=progress)

    @abstractmethod
    def layer_tests(
        self, name: str, weight: Tensor, estimate: Any, *, n: int, damping: float, free: Tensor | None
    ) -> LayerTests:
        """Standard errors and unit chi-squares of layer ``name`` from its ``estimate``.

        ``weight`` is the tested weight (float64, CPU; centred for the softmax output layer),
        ``n`` the sample size in Cov = F^-1 / n, ``damping`` the relative Tikhonov damping, and
        ``free`` the bool mask of the softmax layer's shift-invariant columns (None elsewhere).
        """


@dataclass(frozen=True)
class KfacEstimator(FisherEstimator):
    """KFAC/KFC: F_layer ~= G (x) A (:func:`pruning.fisher.kfac_factors`), so the variance of
    W[i, j] is [G^-1]_ii [A^-1]_jj / n and a unit's covariance is [G^-1]_ii [A^-1]_ww / n (ww:
    the weight part of A^-1, bias excluded). Scales to large layers: memory O(d_in^2 + d_out^2)."""

    name: ClassVar[str] = "kfac"
    fisher_function = staticmethod(kfac_factors)

    def check_layers(self, layers: Mapping[str, nn.Module]) -> None:
        """KFC as implemented covers Conv2d with groups=1, zero padding and numeric padding."""
        for name, module in layers.items():
            if not isinstance(module, nn.Conv2d):
                continue
            if module.groups != 1:
                raise InputError(
                    f"estimator 'kfac' supports Conv2d with groups=1; layer {name!r} has groups={module.groups} (use "
                    f"'diagonal')"
                )
            if module.padding_mode != "zeros":
                raise InputError(
                    f"estimator 'kfac' supports zero padding; layer {name!r} has "
                    f"padding_mode={module.padding_mode!r} (use 'diagonal')"
                )
            if isinstance(module.padding, str) and module.padding != "valid":
                raise InputError(
                    f"estimator 'kfac' needs numeric padding; layer {name!r} has padding={module.padding!r} (use "
                    f"'diagonal')"
                )

    def layer_tests(
        self, name: str, weight: Tensor, estimate: KroneckerFactors, *, n: int, damping: float, free: Tensor | None
    ) -> LayerTests:
        """For the softmax layer G is inverted on the complement of its null direction 1 (the
        class shift); a column identified by its zeros uses [(G_SS)^-1]_kk over its non-zero
        classes S instead."""
        a_inv = _damped_inverse(estimate.A, damping, f"layer {name!r} (KFAC factor A)")
        classes = estimate.G.shape[0]
        null = torch.ones(classes, 1, dtype=torch.float64) / math.sqrt(classes) if free is not None else None
        g_inv = _damped_inverse(estimate.G, damping, f"layer {name!r} (KFAC factor G)", null)
        if a_inv is None or g_inv is None:
            return _uninformative(weight)
        rows = weight.reshape(weight.shape[0], -1)
        fan_in = rows.shape[1]
        a_inv_w = a_inv[:fan_in, :fan_in]
        g_var = g_inv.diagonal()[:, None].expand(classes, fan_in).clone()
        if free is not None and not bool(free.all()):
            patterns, which = torch.unique((rows != 0).T[~free], dim=0, return_inverse=True)
            columns = torch.nonzero(~free).flatten()
            for index, kept in enumerate(patterns):
                sub = _damped_inverse(estimate.G[kept][:, kept], damping, f"layer {name!r} (KFAC factor G)")
                block = torch.full((classes,), math.inf, dtype=torch.float64)
                if sub is not None:
                    block[kept] = sub.diagonal()
                g_var[:, columns[which == index]] = block[:, None]
        se = (g_var * a_inv_w.diagonal() / n).sqrt().reshape(weight.shape)
        # Unit i: Cov = [G^-1]_ii [A^-1]_ww / n, so chi2_i = n w_i^T ([A^-1]_ww)^-1 w_i / [G^-1]_ii.
        quad = (rows * torch.linalg.solve(a_inv_w, rows.T).T).sum(dim=1)
        return LayerTests(se, n * quad / g_inv.diagonal())


@dataclass(frozen=True)
class FullEstimator(FisherEstimator):
    """The dense per-layer Fisher block over ``[W.flatten(), b]`` (:func:`pruning.fisher.dense_fisher`),
    inverted exactly; a unit's covariance is its diagonal block of F^-1 / n. For a single Linear
    layer this reproduces the maximum-likelihood standard errors of statsmodels. Memory
    O(P_l^2): layers of more than ``max_params`` parameters are refused."""

    name: ClassVar[str] = "full"
    fisher_function = staticmethod(dense_fisher)
    max_params: int = DENSE_MAX_PARAMS

    def check_layers(self, layers: Mapping[str, nn.Module]) -> None:
        sizes = {name: sum(p.numel() for p in module.parameters(recurse=False)) for name, module in layers.items()}
        too_big = {name: size for name, size in sizes.items() if size > self.max_params}
        if too_big:
            raise InputError(
                f"estimator 'full' inverts a dense Fisher block per layer and is limited to {self.max_params} "
                f"parameters per layer; too large: {too_big}. Use estimator 'kfac' or 'diagonal', or restrict layers"
            )

    def layer_tests(
        self, name: str, weight: Tensor, estimate: Tensor, *, n: int, damping: float, free: Tensor | None
    ) -> LayerTests:
        """The zeros of identified softmax columns are fixed, not parameters: their rows and columns
        are dropped from the block before it is inverted, and their se is inf."""
        sandwich = estimate if isinstance(estimate, Sandwich) else None
        if sandwich is not None:
            estimate = sandwich.bread
        rows = weight.reshape(weight.shape[0], -1)
        out, fan_in = rows.shape
        size = out * fan_in
        has_bias = estimate.shape[0] > size  # the block covers [W.flatten(), b]
        kept = torch.ones(estimate.shape[0], dtype=torch.bool)
        null = None
        if free is not None:
            kept[:size] = (rows != 0).reshape(-1) | free.repeat(out)
            null = _softmax_null_dense(out, fan_in, has_bias)[kept][
                :, torch.cat([free, torch.ones(int(has_bias), dtype=torch.bool)])
            ]
            null = null if null.shape[1] else None
        inverse = _damped_inverse(estimate[kept][:, kept], damping, f"layer {name!r}", null)
        if inverse is None:
            return _uninformative(weight)
        if sandwich is not None:  # over the whole block (bias included) before the weights are read off
            inverse = inverse @ sandwich.meat.to(torch.float64)[kept][:, kept] @ inverse
        kept_w = kept[:size]
        cov = torch.zeros(size, size, dtype=torch.float64)
        cov[kept_w.nonzero(), kept_w.nonzero().T] = inverse[: int(kept_w.sum()), : int(kept_w.sum())] / n
        variance = cov.diagonal().clone()
        variance[~kept_w] = math.inf
        se = variance.sqrt().reshape(weight.shape)
        if bool(kept_w.all()):
            unit_blocks = cov.reshape(out, fan_in, out, fan_in).diagonal(dim1=0, dim2=2).permute(2, 0, 1)
            chi2 = (rows * torch.linalg.solve(unit_blocks, rows.unsqueeze(-1)).squeeze(-1)).sum(dim=1)
        else:  # rows with fixed zeros: the quadratic form over their remaining weights
            chi2 = torch.zeros(out, dtype=torch.float64)
            for r in range(out):
                index = torch.nonzero(kept_w[r * fan_in : (r + 1) * fan_in]).flatten()
                if index.numel():
                    sub = cov[r * fan_in + index][:, r * fan_in + index]
                    chi2[r] = rows[r, index] @ torch.linalg.solve(sub, rows[r, index])
        return LayerTests(se, chi2)


@dataclass(frozen=True)
class DiagonalEstimator(FisherEstimator):
    """se_j = 1 / sqrt(n (F_jj + lambda)) from the Fisher's diagonal (:func:`pruning.fisher.diagonal_fisher`);
    the unit statistic is sum_g z_j^2. Cheapest (memory O(P)) but 1 / F_jj <= [F^-1]_jj, so it
    understates the standard errors."""

    name: ClassVar[str] = "diagonal"

    def estimate(
        self,
        model: nn.Module,
        fd: FisherData,
        layers: Mapping[str, nn.Module],
        *,
        fisher: str = "model",
        batch_size: int = 256,
        progress: bool = False,
    ) -> dict[str, Tensor]:
        diagonals = diagonal_fisher(
            model, fd, [weight_name(name) for name in layers], fisher=fisher, batch_size=batch_size, progress=progress
        )
        return {name: diagonals[weight_name(name)] for name in layers}

    def layer_tests(
        self, name: str, weight: Tensor, estimate: Tensor, *, n: int, damping: float, free: Tensor | None
    ) -> LayerTests:
        """Free softmax columns take the pseudo-inverse of diag(f_1j..f_Kj) on the sum-to-zero
        subspace, 1/f_kj - (1/f_kj)^2 / sum_k' 1/f_k'j; zeros of identified columns get se = inf.
        A :class:`Sandwich` gives meat_j / bread_j^2, and on a free column the diagonal of
        P diag(meat) P with P that pseudo-inverse of the bread."""
        meat = None
        if isinstance(estimate, Sandwich):
            estimate, meat = estimate.bread, estimate.meat.to(torch.float64)
        scale = float(estimate.mean())
        if not scale > 0:
            return _uninformative(weight)
        inverse = 1.0 / (estimate + damping * scale)
        variance = inverse if meat is None else meat * inverse.square()
        if free is not None:
            total = inverse.sum(dim=0, keepdim=True)
            if meat is None:
                projected = inverse - inverse.square() / total
            else:  # [P diag(m) P]_kk, P = diag(inv) - inv inv^T / total, per column
                projected = (
                    meat * inverse.square() * (1 - 2 * inverse / total)
                    + inverse.square() * (meat * inverse.square()).sum(dim=0, keepdim=True) / total.square()
                )
            projected = torch.nan_to_num(projected, nan=math.inf)
            variance = torch.where(free, projected, torch.where(weight != 0, variance, math.inf))
        se = (variance / n).sqrt()
        return LayerTests(se, (weight / se).square().reshape(weight.shape[0], -1).sum(dim=1))


#: The user-facing estimator names and their classes: the one place a name becomes an object.
FISHER_ESTIMATORS: dict[str, type[FisherEstimator]] = {
    cls.name: cls for cls in (KfacEstimator, FullEstimator, DiagonalEstimator)
}
ESTIMATORS: tuple[str, ...] = tuple(FISHER_ESTIMATORS)


def fisher_estimator(estimator: str | FisherEstimator) -> FisherEstimator:
    """The estimator object for a name (``"kfac"``, ``"full"``, ``"diagonal"``); an object is returned as is."""
    if isinstance(estimator, FisherEstimator):
        return estimator
    if not isinstance(estimator, str) or estimator not in FISHER_ESTIMATORS:
        raise InputError(f"unknown estimator {estimator!r}; expected one of {list(ESTIMATORS)}")
    return FISHER_ESTIMATORS[estimator]()


# ---- inversion ----------------------------------------------------------------------------------------


def _damped_inverse(M: Tensor, damping: float, what: str, null: Tensor | None = None) -> Tensor | None:
    """(M + lambda I)^-1, lambda = damping * mean(diag M), in float64. With ``null`` (orthonormal
    columns spanning a known null space of M) the inverse is taken on the orthogonal complement
    and is zero on span(null): the damped Moore-Penrose pseudo-inverse. None when M is zero."""
    M = M.to(torch.float64)
    scale = float(M.diagonal().mean())
    if not scale > 0:
        return None
    eye = torch.eye(M.shape[0], dtype=M.dtype)
    target = (M + M.T) / 2
    projector = None
    if null is not None:
        projector = eye - null @ null.T
        # Block-diagonal in (complement, null): inverting it inverts the complement block exactly.
        target = projector @ target @ projector + scale * (null @ null.T)
    factor, info = torch.linalg.cholesky_ex(target + damping * scale * eye)
    if int(info) == 0:
        # (L L^T)^-1 = L^-T L^-1; torch.cholesky_inverse is ~20x slower than this on the CPU.
        factor_inverse = torch.linalg.solve_triangular(factor, eye, upper=False)
        inverse = factor_inverse.T @ factor_inverse
    else:
        # Sums of float32 products can leave a positive semi-definite M with eigenvalues slightly
        # below zero, more than the damping covers: project onto the PSD cone, then damp.
        eigenvalues, eigenvectors = torch.linalg.eigh(target)
        eigenvalues = eigenvalues.clamp_min(0) + damping * scale
        if not bool((eigenvalues > 0).all()):
            raise InputError(f"the Fisher information of {what} is singular; use damping > 0 (e.g. 1e-6)")
        inverse = (eigenvectors / eigenvalues) @ eigenvectors.T
    return projector @ inverse @ projector if projector is not None else inverse


def _softmax_null_dense(num_classes: int, fan_in: int, has_bias: bool) -> Tensor:
    """Orthonormal basis of the shift directions of a softmax layer in ``[W.flatten(), b]`` order."""
    size = num_classes * fan_in + (num_classes if has_bias else 0)
    null = torch.zeros(size, fan_in + int(has_bias), dtype=torch.float64)
    rows = torch.arange(num_classes)
    for j in range(fan_in):
        null[rows * fan_in + j, j] = 1.0
    if has_bias:
        null[num_classes * fan_in + rows, fan_in] = 1.0
    return null / math.sqrt(num_classes)


def _uninformative(weight: Tensor) -> LayerTests:
    """A layer whose Fisher is zero (it cannot affect the output): se = inf, chi2 = 0."""
    return LayerTests(torch.full_like(weight, math.inf), torch.zeros(weight.shape[0], dtype=torch.float64))


__all__ = [
    "DENSE_MAX_PARAMS",
    "ESTIMATORS",
    "FISHER_ESTIMATORS",
    "DiagonalEstimator",
    "FisherEstimator",
    "FullEstimator",
    "KfacEstimator",
    "LayerTests",
    "fisher_estimator",
]
