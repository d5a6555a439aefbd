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
    per_sample_loss,
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


def check_rho_schedule(
    rho0: float, rho_final: float, epochs: int, growth: str, names: tuple[str, str] = ("epochs", "growth")
) -> None:
    """Refuse, in one line each, a rho schedule :func:`ess_rho` cannot follow: rho0 or rho_final
    outside (0, 1], rho_final < rho0 (rho only rises), fewer than 1 epoch, an unknown growth
    (``names``: what the caller calls the epochs and the growth)."""
    check_rho("rho0", rho0)
    check_rho("rho_final", rho_final)
    if rho_final < rho0:
        raise InputError(f"rho_final must be >= rho0 (rho only rises), got {rho_final!r} < {rho0!r}")
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise InputError(f"{names[0]} must be an integer >= 1, got {epochs!r}")
    if growth not in RHO_GROWTHS:
        raise InputError(f"unknown {names[1]} {growth!r}; expected one of {RHO_GROWTHS}")


class ESSLoss(BatchLoss):
    """NRAE at the tilt t at which the batch's tilted weights have ``ESS / m = rho``; a drop-in for
    :class:`torch.nn.CrossEntropyLoss` (``ESSLoss(rho=0.5)(logits, target)``; at rho = 1 it is
    cross-entropy itself).

    Value: ``tilted_mean(l, t)`` with ``t = tilt_for_ess(l.detach(), rho)``; at rho = 1, t = 0 and
    the value is mean(l). Gradient in the losses: the tilted weights ``softmax(t * l)`` (t is a
    detached control variable, chosen anew for every batch; nothing flows through its solve).

    Args:
        rho: the effective sample size as a fraction of the batch, in (0, 1] (mutable: a schedule
            raises it, :class:`ESSSchedule`).
        weight: a weight per class, as ``nn.CrossEntropyLoss``'s: sample i counts ``w_i =
            weight[y_i]`` times in the tilted mean, ``log(sum_i w_i exp(t l_i) / sum_i w_i) / t``
            with ``l_i = L_i / w_i`` and ``L_i`` ``nn.CrossEntropyLoss``'s weighted per-sample loss,
            so that at rho = 1 it is that loss's weighted mean exactly (label smoothing included).
            t is solved on those ``l_i``. Samples of a class of weight 0 take no part (with label
            smoothing ``nn.CrossEntropyLoss`` still counts their smoothing term in its numerator).
        label_smoothing: as ``nn.CrossEntropyLoss``'s, in [0, 1).
        reduction: ``"mean"`` (the tilted mean) or ``"sum"`` (the tilted mean times the batch's
            total weight, ``nn.CrossEntropyLoss``'s sum at rho = 1). There is no ``"none"``: the
            tilt is a property of the whole batch.
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
        weight: Tensor | None = None,
        label_smoothing: float = 0.0,
        reduction: str = "mean",
        backend: TiltedBackend = "auto",
        r: float | None = None,
    ) -> None:
        super().__init__()
        self.r = _check_tilted_args(kind, p, r, backend)
        if not (t_max > 0 and math.isfinite(t_max)):
            raise InputError(f"t_max must be a finite number > 0, got {t_max!r}")
        if reduction not in ("mean", "sum"):
            raise InputError(
                f"reduction must be 'mean' or 'sum', got {reduction!r} (the tilt is chosen per batch, so no 'none')"
            )
        if isinstance(label_smoothing, bool) or not isinstance(label_smoothing, int | float):
            raise InputError(f"label_smoothing must be a number in [0, 1), got {label_smoothing!r}")
        if not 0 <= label_smoothing < 1:
            raise InputError(f"label_smoothing must be in [0, 1), got {label_smoothing!r}")
        if weight is not None:
            weight = torch.as_tensor(weight, dtype=torch.float32)
            if weight.dim() != 1 or not bool(torch.isfinite(weight).all()) or bool((weight < 0).any()):
                raise InputError("weight must be a 1-D tensor of finite numbers >= 0, one per class")
            if kind != "ce":
                raise InputError(f"weight applies to kind='ce' (cross-entropy), not {kind!r}")
        self.register_buffer("weight", weight)
        self.kind, self.p, self.t_max, self.backend = kind, float(p), float(t_max), backend
        self.label_smoothing, self.reduction = float(label_smoothing), reduction
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

    def per_sample(self, input: Tensor, target: Tensor) -> Tensor:
        """Per-sample cross-entropy (or the kind's loss) with label smoothing, unweighted: the class
        weights enter the tilted mean as sample weights (:meth:`forward`)."""
        return per_sample_loss(input, target, self.kind, self.p, label_smoothing=self.label_smoothing, r=self.r)

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        if self.weight is None:
            losses = self.per_sample(input, target)
            value = self.aggregate(losses)
            return value if self.reduction == "mean" else value * losses.shape[0]
        if target.dtype not in (torch.int64, torch.int32, torch.uint8) or target.dim() != 1:
            raise InputError(
                f"weight needs class-index targets of shape (N,), got {target.dtype} {tuple(target.shape)}"
            )
        weight = self.weight.to(device=input.device, dtype=torch.float64 if input.dtype == torch.float64 else None)
        weighted = per_sample_loss(
            input, target, self.kind, self.p, weight=weight, label_smoothing=self.label_smoothing, r=self.r
        )
        w = weight.to(weighted.dtype)[target.long()]
        keep = w > 0
        w, weighted = w[keep], weighted[keep]
        value = self._tilted(weighted / w, w)
        return value if self.reduction == "mean" else value * w.sum()

    def aggregate(self, losses: Tensor, reduction: BatchReduction = LOCAL_BATCH) -> Tensor:
        """NRAE of the batch at the tilt that makes its weights' ESS ``rho * m``."""
        if not isinstance(reduction, LocalBatch):
            raise InputError("the ess schedule is not supported under torch.distributed yet; train on one process")
        return self._tilted(losses)

    def _tilted(self, losses: Tensor, w: Tensor | None = None) -> Tensor:
        """The tilted mean of ``losses`` (sample weights ``w``, or none) at the solved tilt."""
        l = losses.reshape(-1)
        if l.dtype not in (torch.float32, torch.float64):
            l = l.float()  # bfloat16/float16 under autocast: compute in float32
        if l.shape[0] == 0:
            raise InputError("cannot take the NRAE of an empty batch")
        if self._rho >= 1:
            self.last_t = 0.0
            return l.mean() if w is None else (w * l).sum() / w.sum()
        t = tilt_for_ess(l, self._rho, t_max=self.t_max, backend=self.backend)
        self.last_t = float(t) if numpy_path(l, self.backend) else t
        return tilted_mean(l, self.last_t, weights=w, backend=self.backend)

    def extra_repr(self) -> str:
        backend = "" if self.backend == "auto" else f", backend={self.backend!r}"
        extra = f", label_smoothing={self.label_smoothing:g}" if self.label_smoothing else ""
        extra += f", reduction={self.reduction!r}" if self.reduction != "mean" else ""
        return f"rho={self._rho:g}, p={self.p:g}, kind={self.kind!r}" + extra + backend


class ESSSchedule:
    """rho of an :class:`ESSLoss` over a training, for any loop: from ``rho0`` in epoch 0 to
    ``rho_final`` in epoch ``epochs`` and after (:func:`ess_rho`; ``growth`` geometric or linear).

    Use it as a function of the epoch (``schedule.rho_at(epoch)``), or like a
    ``torch.optim.lr_scheduler``: given the ``loss``, it sets ``loss.rho`` at construction and
    :meth:`step` (called once per epoch, after it) moves it on; ``state_dict`` /
    ``load_state_dict`` resume it. To move rho every step instead, give the number of steps as
    ``epochs`` and call :meth:`step` after every optimizer step. Bad values are refused with
    one-line :class:`~anrat.errors.InputError` s."""

    def __init__(
        self,
        rho0: float = 0.5,
        rho_final: float = 1.0,
        epochs: int = 10,
        growth: str = "geometric",
        loss: ESSLoss | None = None,
    ) -> None:
        check_rho_schedule(rho0, rho_final, epochs, growth)
        self.rho0, self.rho_final, self.epochs, self.growth = float(rho0), float(rho_final), epochs, growth
        self.loss, self.epoch = loss, 0
        if loss is not None:
            loss.rho = self.rho

    def rho_at(self, epoch: int) -> float:
        """rho in (0-based) ``epoch``."""
        return ess_rho(self.rho0, self.rho_final, self.epochs, self.growth, epoch)

    @property
    def rho(self) -> float:
        """rho of the current epoch."""
        return self.rho_at(self.epoch)

    def step(self) -> float:
        """The epoch is done: move to the next one's rho (set on the loss, if any) and return it."""
        self.epoch += 1
        if self.loss is not None:
            self.loss.rho = self.rho
        return self.rho

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch = int(state["epoch"])
        if self.loss is not None:
            self.loss.rho = self.rho


__all__ = ["RHO_GROWTHS", "ESSLoss", "ESSSchedule", "check_rho", "check_rho_schedule", "ess_rho"]
