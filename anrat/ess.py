"""The scale-free tilt: NRAE at the tilt t whose tilted weights have effective sample size rho * m.

A fixed lambda means a fixed tilt t = lambda^p, and what t does depends on the scale of the losses:
the tilted weights ``softmax(t * l)`` depend on t only through ``t * (l_i - l_j)``, so the same t
that averages over the batch when the losses differ by 1e-3 follows a single sample when they
differ by 1 (ESS ~ 1 at t = 100 on every problem we measured). The ``"ess"`` schedule fixes instead
what the weights do: each step, t is chosen from the batch's detached per-sample losses so that
the weights' effective sample size is ``ESS = rho * m``
(:func:`anrat.functional.tilt_for_ess`), and NRAE at that t is minimised. Scaling all losses by c
divides t by c and leaves the weights unchanged: the criterion is scale-free.

rho, the fraction of the batch that the gradient effectively averages, is raised once per epoch
from ``rho0`` to ``rho_final`` over ``rho_epochs`` epochs (:func:`ess_rho`); when it reaches 1 the
tilt is 0 (the plain mean) and the schedule switches to the plain loss for good: that is the
deconvexification of this schedule.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from anrat.errors import InputError
from anrat.functional import (
    ESS_T_MAX,
    LossKind,
    TiltedBackend,
    numpy_path,
    tilt_for_ess,
    tilted_mean,
)
from anrat.losses import BatchLoss, _check_tilted_args
from anrat.reductions import LOCAL_BATCH, BatchReduction, LocalBatch

RHO_GROWTHS = ("geometric", "linear")


def ess_rho(rho0: float, rho_final: float, rho_epochs: int, growth: str, epoch: int) -> float:
    """rho in (0-based) epoch ``epoch``: from ``rho0`` at epoch 0 to ``rho_final`` at epoch
    ``rho_epochs`` and after, geometrically, ``rho0 * (rho_final / rho0) ** (epoch / rho_epochs)``
    (the same factor every epoch), or linearly, ``rho0 + (rho_final - rho0) * epoch / rho_epochs``.
    Exactly ``rho_final`` from epoch ``rho_epochs`` on."""
    if epoch >= rho_epochs:
        return rho_final
    fraction = epoch / rho_epochs
    if growth == "linear":
        return rho0 + (rho_final - rho0) * fraction
    return rho0 * (rho_final / rho0) ** fraction


def check_rho(name: str, value: float) -> None:
    """Raise a one-line InputError unless ``value`` is a number in (0, 1]."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
        raise InputError(f"{name} (effective sample size / batch size) must be in (0, 1], got {value!r}")


class ESSLoss(BatchLoss):
    """NRAE at the tilt t at which the batch's tilted weights have ``ESS / m = rho``.

    Value: ``tilted_mean(l, t)`` with ``t = tilt_for_ess(l.detach(), rho)``; at rho = 1, t = 0 and
    the value is mean(l). Gradient in the losses: the tilted weights ``softmax(t * l)`` (t is a
    detached control variable, chosen anew for every batch; nothing flows through its solve).

    Args:
        rho: the effective sample size as a fraction of the batch, in (0, 1] (mutable: the
            schedule raises it).
        p, kind, r: the per-sample loss, as for :class:`~anrat.losses.NRAELoss` (p plays no part
            in t here; ``lam`` reports ``t ** (1 / p)`` for comparison with the other schedules).
        t_max: the largest tilt (default 1e8): where ESS/m cannot fall to rho (losses tied at the
            maximum, rho <= ties / m) the loss is NRAE at t_max, the minimax end.
        backend: where t and the tilted mean are computed (:func:`anrat.functional.tilt_for_ess`).
    """

    def __init__(
        self,
        rho: float = 0.5,
        p: float = 2.0,
        kind: LossKind = "ce",
        t_max: float = ESS_T_MAX,
        *,
        backend: TiltedBackend = "auto",
        r: float | None = None,
    ) -> None:
        super().__init__()
        self.r = _check_tilted_args(kind, p, r, backend)
        if not (t_max > 0 and math.isfinite(t_max)):
            raise InputError(f"t_max must be a finite number > 0, got {t_max!r}")
        self.kind, self.p, self.t_max, self.backend = kind, float(p), float(t_max), backend
        self.rho = rho
        # The tilt of the last batch: a float on the host path, a 0-d device tensor on the torch
        # path (read without a sync); None before the first batch.
        self.last_t: float | Tensor | None = None

    @property
    def rho(self) -> float:
        return self._rho

    @rho.setter
    def rho(self, value: float) -> None:
        check_rho("rho", value)
        self._rho = float(value)

    @property
    def lam(self) -> float | None:
        """``t ** (1 / p)`` of the last batch (the lambda a fixed schedule would need), or None."""
        if self.last_t is None:
            return None
        return float(self.last_t) ** (1 / self.p)

    def last_lambda(self) -> float | Tensor | None:
        """:attr:`lam` without a device sync: a tensor on the torch path."""
        if isinstance(self.last_t, Tensor):
            return self.last_t.pow(1 / self.p)
        return self.lam

    def aggregate(self, losses: Tensor, reduction: BatchReduction = LOCAL_BATCH) -> Tensor:
        """NRAE of the batch at the tilt that makes its weights' ESS ``rho * m``."""
        if not isinstance(reduction, LocalBatch):
            raise InputError("the ess schedule is not supported under torch.distributed yet; train on one process")
        l = losses.reshape(-1)
        if l.dtype not in (torch.float32, torch.float64):
            l = l.float()  # bfloat16/float16 under autocast: compute in float32
        if l.shape[0] == 0:
            raise InputError("cannot take the NRAE of an empty batch")
        if self._rho >= 1:
            self.last_t = 0.0
            return reduction.mean(l)
        t = tilt_for_ess(l, self._rho, t_max=self.t_max, backend=self.backend)
        self.last_t = float(t) if numpy_path(l, self.backend) else t
        return tilted_mean(l, self.last_t, backend=self.backend)

    def extra_repr(self) -> str:
        backend = "" if self.backend == "auto" else f", backend={self.backend!r}"
        return f"rho={self._rho:g}, p={self.p:g}, kind={self.kind!r}" + backend


__all__ = ["RHO_GROWTHS", "ESSLoss", "check_rho", "ess_rho"]
