"""Lambda schedules: which loss the trainer minimises at each step, and when it deconvexifies.

A schedule hands the trainer a criterion per step (:meth:`LambdaSchedule.criterion`) — an
:class:`~anrat.losses.NRAELoss`, an :class:`~anrat.losses.ANRATLoss` or the
:class:`~anrat.losses.PlainLoss` — and is told at the end of each epoch the largest per-sample loss
seen (:meth:`LambdaSchedule.end_epoch`), from which it may switch to the plain loss for good
(deconvexification). Decisions are made at epoch boundaries so that the training step never waits
on the device.

- ``fixed``: NRAE at a constant lambda.
- ``adaptive`` (ANRAT): lambda is a parameter trained with the weights.
- ``anneal``: ``lam_e = max(lam_min, lam0 * gamma ** e)`` at epoch e (geometric decay).
- ``excursions`` (Lo's NRAE-MSE method): NRAE at a large fixed lambda, interrupted every
  ``period`` steps by ``plain_steps`` steps of the plain loss.
- ``ess`` (the scale-free tilt, :mod:`anrat.ess`): every step, NRAE at the tilt t at which the
  batch's tilted weights have effective sample size ``rho * m``; rho rises once per epoch from
  ``rho0`` to ``rho_final`` over ``rho_epochs`` epochs (``rho_growth``: geometric or linear), and
  the schedule deconvexifies (switches to the plain loss for good) when rho reaches 1.

Deconvexification (all schedules but ``ess``): after an epoch, switch to the plain loss when lambda <
``switch_below`` or, if ``switch_when_feasible``, when RAE at the current lambda is representable
in float32 for the largest per-sample loss of the epoch (``t * max(l) < log(float32 max)``).
With ``switch_to="rae"`` the switch hands over to RAE itself, ``mean_i exp(t * l_i)`` at the lambda
of the switch (:class:`~anrat.losses.RAELoss`), instead of the plain loss: the source paper's
wording, "RAE once it is numerically feasible".
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch
from torch import nn

from anrat.errors import InputError
from anrat.ess import ESSLoss, check_rho_schedule, ess_rho
from anrat.functional import KINDS, LossKind, TiltedBackend, losses_rae_feasible
from anrat.losses import ANRATLoss, BatchLoss, NRAELoss, PlainLoss, RAELoss

SCHEDULES = ("fixed", "adaptive", "anneal", "excursions", "plain", "ess")
SWITCH_TARGETS = ("plain", "rae")  # what deconvexification switches to


@dataclass
class ScheduleConfig:
    """Everything that defines a schedule (stored in checkpoints and run configs)."""

    name: str = "adaptive"
    lam0: float = 10.0  # initial (or fixed) lambda
    p: float = 2.0  # t = lam ** p
    kind: LossKind = "ce"  # the per-sample loss: cross-entropy or the Lp error
    # adaptive (ANRAT)
    a: float = 0.01  # penalty weight in a * lam ** (-q)
    q: float = 1.0
    parameterization: str = "log"
    # anneal
    gamma: float = 0.8
    lam_min: float = 1e-2
    # excursions
    period: int = 200
    plain_steps: int = 20
    # NRAE normaliser for fixed/anneal/excursions: "batch" (paper) or "running"
    normalizer: str = "batch"
    # deconvexification
    switch_below: float = 0.0  # switch to the plain loss once lambda < this (0: never by value)
    switch_when_feasible: bool = False
    # the error's exponent for kind "lp" / "true_class_sq", independent of p (None: p for "lp", 2
    # for "true_class_sq"; see anrat.functional.error_exponent)
    r: float | None = None
    switch_to: str = "plain"  # what deconvexification switches to: "plain" or "rae" (RAE at the switch's lambda)
    # ess (the scale-free tilt): ESS / m = rho each step; rho from rho0 to rho_final over rho_epochs
    # epochs, geometric or linear in the epoch; rho = 1 deconvexifies (anrat.ess.ess_rho)
    rho0: float = 0.2
    rho_final: float = 1.0
    rho_epochs: int = 10
    rho_growth: str = "geometric"
    # per-class weights of the per-sample loss, w[y_i] * l_i, as nn.CrossEntropyLoss(weight=w,
    # reduction="none") (None: unweighted); the criterion then aggregates the weighted losses
    class_weight: list[float] | None = None

    def validate(self) -> None:
        if self.name not in SCHEDULES:
            raise InputError(f"unknown lambda schedule {self.name!r}; expected one of {SCHEDULES}")
        for field in ("lam0", "p", "q", "gamma", "lam_min"):
            value = getattr(self, field)
            if not (math.isfinite(value) and value > 0):
                raise InputError(f"{field} must be a finite number > 0, got {value!r}")
        if not (math.isfinite(self.a) and self.a >= 0):
            raise InputError(f"a (lambda penalty weight) must be >= 0, got {self.a!r}")
        if self.gamma > 1:
            raise InputError(f"gamma (anneal factor per epoch) must be in (0, 1], got {self.gamma!r}")
        if self.period < 1 or not 0 <= self.plain_steps < self.period:
            raise InputError(
                f"excursions need period >= 1 and 0 <= plain_steps < period, got {self.period}, {self.plain_steps}"
            )
        if not self.switch_below >= 0:  # NaN included
            raise InputError(f"switch_below must be >= 0, got {self.switch_below!r}")
        if self.kind not in KINDS:
            raise InputError(f"unknown loss kind {self.kind!r}; expected one of {KINDS}")
        if self.r is not None:
            if (
                isinstance(self.r, bool)
                or not isinstance(self.r, (int, float))
                or not (math.isfinite(self.r) and self.r > 0)
            ):
                raise InputError(f"r (the error's exponent) must be a finite number > 0 or None, got {self.r!r}")
            if self.kind == "ce":
                raise InputError("r (the error's exponent) applies to kind 'lp' and 'true_class_sq' only, not 'ce'")
        if self.switch_to not in SWITCH_TARGETS:
            raise InputError(f"unknown switch_to {self.switch_to!r}; expected one of {SWITCH_TARGETS}")
        if self.switch_to == "rae" and self.name == "plain":
            raise InputError("switch_to='rae' needs a schedule with a lambda; the plain schedule has none")
        self._validate_ess()
        if self.class_weight is not None:
            w = self.class_weight
            if (
                not isinstance(w, (list, tuple))
                or not w
                or any(
                    isinstance(v, bool) or not isinstance(v, (int, float)) or not (math.isfinite(v) and v >= 0)
                    for v in w
                )
                or not any(v > 0 for v in w)
            ):
                raise InputError(
                    f"class_weight must be a list of finite numbers >= 0, one per class, not all 0; got {w!r}"
                )
            if self.kind == "lp":
                raise InputError("class_weight applies to the classification losses ('ce', 'true_class_sq'), not 'lp'")

    def _validate_ess(self) -> None:
        check_rho_schedule(self.rho0, self.rho_final, self.rho_epochs, self.rho_growth, ("rho_epochs", "rho_growth"))
        if self.name == "ess" and self.switch_to != "plain":
            raise InputError("the ess schedule deconvexifies to the plain loss (rho = 1); switch_to must be 'plain'")
        if self.name == "ess" and (self.switch_below > 0 or self.switch_when_feasible):
            raise InputError(
                "switch_below and switch_when_feasible do not apply to the ess schedule "
                "(it deconvexifies when rho reaches 1); leave them unset"
            )

    def rho_at(self, epoch: int) -> float:
        """The ess schedule's rho in (0-based) epoch ``epoch`` (:func:`anrat.ess.ess_rho`)."""
        return ess_rho(self.rho0, self.rho_final, self.rho_epochs, self.rho_growth, epoch)


@dataclass(frozen=True)
class Hyper:
    """What a schedule prescribes at one epoch and step, before any data-dependent decision (the
    deconvexification switch; ANRAT's learned lambda, of which only the start is known).

    ``criterion``: the schedule's name, or ``"plain"`` on an excursion's plain step and for an ess
    schedule at rho = 1; ``lam``: the lambda of the step (``adaptive``: lambda0; ``ess`` and
    ``plain``: None); ``rho``: the ess schedule's rho (else None)."""

    criterion: str
    lam: float | None
    rho: float | None


def excursion_plain_step(step, period, plain_steps):
    """Whether global step ``step`` (0-based) is one of an excursion's plain steps: the last
    ``plain_steps`` of every ``period``. Integers or tensors (per-member, under vmap) alike."""
    return step % period >= period - plain_steps


def hyper_at(config: ScheduleConfig, epoch: int, step: int = 0) -> Hyper:
    """:class:`Hyper` of ``config`` in (0-based) ``epoch`` at global ``step``: pure, no history.
    ``anneal``: ``max(lam_min, lam0 * gamma ** epoch)``; ``ess``: :meth:`ScheduleConfig.rho_at`."""
    name = config.name
    if name == "plain":
        return Hyper("plain", None, None)
    if name == "ess":
        rho = config.rho_at(epoch)
        return Hyper("plain" if rho >= 1 else "ess", None, rho)
    if name == "anneal":
        return Hyper(name, max(config.lam_min, config.lam0 * config.gamma**epoch), None)
    if name == "excursions" and excursion_plain_step(step, config.period, config.plain_steps):
        return Hyper("plain", config.lam0, None)
    return Hyper(name, config.lam0, None)


def criterion_at_epoch(config: ScheduleConfig, record: dict[str, Any] | None = None) -> ScheduleConfig:
    """The criterion ``config``'s schedule minimised in one epoch, held fixed from then on.

    ``record`` is that epoch's entry of a training's history (:meth:`anrat.trainer.Trainer.fit`):
    its ``epoch`` (1-based), ``criterion`` (what the epoch's steps minimised), ``lam`` (lambda at
    the epoch's end) and ``rho``; None: the criterion the schedule starts with (:func:`hyper_at`
    at epoch 0). The result trains a model further by the criterion it was trained with (pruning's
    fine-tuning, :class:`pruning.prune.FineTune`):

    - the plain loss, after a deconvexification switch or for ``plain``;
    - ``fixed`` NRAE at the epoch's lambda for ``adaptive`` (ANRAT's lambda at the epoch's end)
      and ``anneal`` (the lambda the epoch used, ``max(lam_min, lam0 * gamma ** (epoch - 1))``);
      ``fixed`` and ``excursions`` as they are (their lambda does not move);
    - ``ess`` at the epoch's ESS / m held constant (the plain loss at 1).

    The loss kind, exponents and class weights are kept; the switching rules are turned off, so
    the criterion stays what it was. RAE after a ``switch_to="rae"`` switch has no fixed schedule
    and is refused.
    """
    start = hyper_at(config, 0)
    if record is None:
        record = {"epoch": 1, "criterion": start.criterion, "lam": start.lam, "rho": start.rho}
    criterion = record.get("criterion", config.name)
    steady = replace(config, switch_below=0.0, switch_when_feasible=False, switch_to="plain")
    if criterion == "rae":
        raise InputError(
            "the model was trained by RAE after its switch (switch_to='rae'), which no schedule holds "
            "fixed; set the fine-tuning schedule explicitly"
        )
    if criterion == "plain":
        return replace(steady, name="plain")
    if criterion == "ess":
        rho = record.get("rho")
        if rho is None or rho >= 1:
            return replace(steady, name="plain")
        return replace(steady, rho0=float(rho), rho_final=float(rho), rho_epochs=1)
    if criterion == "adaptive":
        lam = record.get("lam")
        if lam is None or not math.isfinite(lam) or lam <= 0:
            raise InputError(f"epoch {record.get('epoch')}'s record holds no lambda (got {lam!r})")
        return replace(steady, name="fixed", lam0=float(lam))
    if criterion == "anneal":
        return replace(steady, name="fixed", lam0=hyper_at(config, int(record["epoch"]) - 1).lam)
    return steady  # fixed, excursions: the same lambda every epoch


def fixed_tilt(config: ScheduleConfig) -> float | None:
    """The tilt t = lambda^p of a criterion that is NRAE at one t for every step (``fixed``), for
    the sandwich covariance of :func:`pruning.significance.wald_test`; None for the others (the
    plain loss: t = 0 is the Fisher's case; ``ess``, ``adaptive``, ``anneal``, ``excursions``:
    their t moves)."""
    return config.lam0**config.p if config.name == "fixed" else None


class LambdaSchedule:
    """Holds the losses of one run and decides which one each step minimises.

    ``backend`` is where the risk-averting losses compute the tilted mean
    (:func:`anrat.functional.tilted_mean`); it changes where the numbers are computed, not what
    they are, so it is not part of the :class:`ScheduleConfig` that checkpoints record.
    """

    def __init__(self, config: ScheduleConfig, *, backend: TiltedBackend = "auto") -> None:
        config.validate()
        self.config = config
        c = config
        self.plain = PlainLoss(c.kind, c.p, r=c.r)
        self.nrae: NRAELoss | ANRATLoss | ESSLoss | None = None
        if c.name == "adaptive":
            self.nrae = ANRATLoss(c.lam0, c.p, c.a, c.q, c.kind, c.parameterization, backend=backend, r=c.r)
        elif c.name == "ess":
            self.nrae = ESSLoss(c.rho_at(0), c.p, c.kind, backend=backend, r=c.r)
        elif c.name != "plain":
            self.nrae = NRAELoss(c.lam0, c.p, c.kind, normalizer=c.normalizer, backend=backend, r=c.r)
        self.switch_epoch: int | None = 0 if c.name == "plain" else None
        # with switch_to="rae": RAE at the lambda of the switch, once switched
        self.rae: RAELoss | None = None
        if c.name == "ess" and c.rho_at(0) >= 1:
            self.switch_epoch = 0  # rho = 1 from the start: the plain loss

    # --- what the trainer calls -------------------------------------------------------------
    def parameters(self) -> list[nn.Parameter]:
        """Trainable parameters of the schedule (lambda's theta for ANRAT), for the optimizer."""
        return list(self.nrae.parameters()) if self.nrae is not None else []

    @property
    def switched(self) -> bool:
        return self.switch_epoch is not None

    @property
    def lam(self) -> float | None:
        """Current lambda, or None once the plain loss has taken over (after a switch to RAE: the
        lambda RAE is taken at)."""
        if self.rae is not None:
            return self.rae.lam
        return None if self.switched or self.nrae is None else self.nrae.lam

    @property
    def after_switch(self) -> BatchLoss:
        """The loss trained after the deconvexification switch: the plain loss, or RAE."""
        return self.rae if self.rae is not None else self.plain

    @property
    def criterion_name(self) -> str:
        """What the steps of an epoch minimise (apart from excursions' plain steps): the schedule's
        name before the switch, ``switch_to`` ("plain" or "rae") after it."""
        return self.config.switch_to if self.switched else self.config.name

    @property
    def rho(self) -> float | None:
        """The ess schedule's current rho (1.0 once switched), None for the other schedules."""
        if not isinstance(self.nrae, ESSLoss):
            return None
        return 1.0 if self.switched else self.nrae.rho

    def criterion(self, step: int) -> BatchLoss:
        """The loss to minimise at global step ``step`` (0-based)."""
        if self.switched:
            return self.after_switch
        if self.config.name == "excursions" and excursion_plain_step(step, self.config.period, self.config.plain_steps):
            return self.plain
        return self.nrae

    def end_epoch(self, epoch: int, max_loss: float) -> None:
        """Advance epoch-wise rules after epoch ``epoch`` (0-based) and decide deconvexification."""
        if self.switched:
            return
        c = self.config
        following = hyper_at(c, epoch + 1)
        if c.name == "ess":  # rho for the next epoch; at 1 the tilt is 0: the plain loss for good
            self.nrae.rho = following.rho
            if following.criterion == "plain":
                self.switch_epoch = epoch + 1
            return
        if c.name == "anneal":
            self.nrae.lam = following.lam
        lam = self.nrae.lam
        if lam < c.switch_below or (
            c.switch_when_feasible
            and math.isfinite(max_loss)
            and losses_rae_feasible(max_loss, lam, c.p, torch.float32)
        ):
            self.switch_epoch = epoch + 1  # epochs trained before the switch = 0-based index of the first plain epoch
            if c.switch_to == "rae":
                self._make_rae(lam)

    def _make_rae(self, lam: float) -> None:
        c = self.config
        self.rae = RAELoss(lam, c.p, c.kind, r=c.r)

    # --- checkpointing -----------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"config": asdict(self.config), "switch_epoch": self.switch_epoch}
        if self.nrae is not None:
            state["loss"] = self.nrae.state_dict()
            state["lam"] = self.nrae.lam
        if self.rae is not None:
            state["rae_lam"] = self.rae.lam
        if isinstance(self.nrae, ESSLoss):
            state["rho"] = self.nrae.rho
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.switch_epoch = state["switch_epoch"]
        if self.nrae is not None:
            self.nrae.load_state_dict(state["loss"])
            if isinstance(self.nrae, NRAELoss):
                self.nrae.lam = state["lam"]
            if isinstance(self.nrae, ESSLoss):
                self.nrae.rho = state["rho"]
        self.rae = None
        if state.get("rae_lam") is not None:  # absent from checkpoints written before switch_to
            self._make_rae(state["rae_lam"])
