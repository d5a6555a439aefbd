"""The training criterion, written once: from per-sample losses to the value and its gradients.

For per-sample losses l (B,) the criteria of the toolkit are

    plain:     mean_i l_i
    NRAE:      tilted_mean(l, t) = log(mean_i exp(t l_i)) / t,   t = lam ** p
    ANRAT:     tilted_mean(l, t) + a * lam ** (-q),   lam = lambda_of_theta(theta), learned
    running:   r' = tilted_mean([r, NRAE], t, weights=[1 - momentum, momentum])  (r carried over)
    RAE:       mean_i exp(t l_i)   (after a switch to it, t at the switch's lambda)

with the closed-form gradients every trainer uses: d/dl_i = softmax(t l)_i (1/B for the plain
loss; exp(t (l_i - r')) / B for the running normaliser; t exp(t l_i) / B for RAE) and, for ANRAT's
theta,

    d/dtheta = [p t / lam * dNRAE/dt - a q lam^(-q-1)] * dlam/dtheta     (:func:`anrat_theta_gradient`).

The pieces here are pure functions of numbers or tensors: :func:`lambda_of_theta` (the three
parameterisations), :func:`theta_of_lambda`, :func:`anrat_penalty`, :func:`anrat_theta_gradient`,
:func:`running_pair` (the running normaliser's two-point tilted mean) and :func:`rae_and_weights`.
:func:`objective` composes them into one member's whole criterion, with every branch computed and
selected by flags, so that :func:`torch.func.vmap` can run it over members of different criteria.
Their users: the ``nn.Module`` losses of :mod:`anrat.losses` (and so the :class:`~anrat.trainer.Trainer`)
and the :class:`~anrat.batched.BatchedTrainer`, which vmaps :func:`objective`.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, overload

import torch
from torch import Tensor, nn

from anrat.functional import tilted_stats

if TYPE_CHECKING:  # anrat.schedules imports the losses, which import this module
    from anrat.schedules import LambdaSchedule

LAMBDA_PARAMETERIZATIONS = ("log", "softplus", "direct")


def _softplus(x: float) -> float:
    """``log(1 + exp(x))`` without overflow."""
    return x + math.log1p(math.exp(-x)) if x > 0 else math.log1p(math.exp(x))


@overload
def lambda_of_theta(theta: float, log: bool, direct: bool) -> tuple[float, float]: ...
@overload
def lambda_of_theta(theta: Tensor, log: bool | Tensor, direct: bool | Tensor) -> tuple[Tensor, Tensor]: ...
def lambda_of_theta(theta, log, direct):
    """ANRAT's lambda and ``dlam/dtheta`` from its parameter theta: ``exp(theta)`` (``log``),
    ``theta`` itself (``direct``), else ``softplus(theta)``.

    A float theta is computed in ``math``; a tensor in torch ops; with ``log`` / ``direct`` given
    as bool tensors (one member's flags under vmap), all three are computed and selected."""
    if not isinstance(theta, Tensor):
        if direct:
            return theta, 1.0
        if log:
            lam = math.exp(theta)
            return lam, lam
        return _softplus(theta), 1.0 / (1.0 + math.exp(-theta))
    if isinstance(log, Tensor) or isinstance(direct, Tensor):
        log, direct = torch.as_tensor(log), torch.as_tensor(direct)
        curved = torch.where(log, theta.exp(), nn.functional.softplus(theta))
        slope = torch.where(direct, torch.ones_like(theta), torch.where(log, curved, torch.sigmoid(theta)))
        return torch.where(direct, theta, curved), slope
    if direct:
        return theta, torch.ones_like(theta)
    if log:
        lam = theta.exp()
        return lam, lam
    return nn.functional.softplus(theta), torch.sigmoid(theta)


def theta_of_lambda(lam: float, parameterization: str) -> float:
    """The theta whose :func:`lambda_of_theta` is ``lam`` (inverse softplus stable for large lambda)."""
    if parameterization == "direct":
        return lam
    if parameterization == "log":
        return math.log(lam)
    return lam + math.log(-math.expm1(-lam))


def anrat_penalty(lam, a, q):
    """``a * lam ** (-q)``: ANRAT's penalty, which keeps lambda from falling to 0."""
    return a * lam**-q


def anrat_theta_gradient(t, lam, dnrae_dt, dlam_dtheta, p, a, q):
    """``d/dtheta [tilted_mean(l, lam^p) + a lam^(-q)] = [p t / lam * dNRAE/dt - a q lam^(-q-1)] * dlam/dtheta``
    (floats or tensors; ``t = lam ** p``, ``dnrae_dt`` from :func:`anrat.functional.tilted_stats`)."""
    return (p * t / lam * dnrae_dt - a * q * lam ** (-q - 1)) * dlam_dtheta


def running_pair(old: Tensor, batch: Tensor, momentum) -> tuple[Tensor, Tensor]:
    """The running normaliser's two points and weights: ``r' = tilted_mean(pair, t, weights)`` with
    ``pair = [r, NRAE_batch]`` (the batch itself before any batch was seen, r NaN) and weights
    ``[1 - momentum, momentum]`` (``1 - momentum`` taken in the precision ``momentum`` comes in)."""
    pair = torch.stack([torch.where(torch.isnan(old), batch, old), batch])
    if isinstance(momentum, Tensor):
        mix = torch.stack([1.0 - momentum, momentum]).to(batch.dtype)
    else:
        mix = torch.tensor([1.0 - momentum, momentum], dtype=batch.dtype, device=batch.device)
    return pair, mix


def rae_and_weights(losses: Tensor, t: Tensor | float) -> tuple[Tensor, Tensor]:
    """RAE ``mean_i exp(t l_i)`` and its gradient ``t exp(t l_i) / B``, in the dtype of ``t``
    (float64 where it matters: RAE overflows float32 once t max(l) > 88.7)."""
    e = torch.exp(t * losses.to(t.dtype if isinstance(t, Tensor) else torch.float64))
    return e.mean(), t * e / losses.shape[0]


def objective(
    losses: Tensor, theta: Tensor, hyper: dict[str, Tensor], *, with_running: bool = True, with_rae: bool = True
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """One member's criterion on per-sample losses ``losses`` (B,): ``(value, w, g_theta, r_new)``.

    ``value`` (float32), ``w = d value / d l`` (B,), ``g_theta = d value / d theta`` and the updated
    running NRAE ``r_new`` (meaningful for members with ``running``). ``hyper`` holds the member's
    0-d tensors: ``plain``, ``anrat``, ``log`` (bools), ``t`` (t of a fixed lambda, float64), ``p``,
    ``a``, ``q``, ``lo``, ``hi`` (theta's bounds), and optionally ``direct`` (lambda = theta),
    ``rae`` (RAE at ``t`` after the switch), ``running`` with ``momentum`` and ``running_nrae``.
    Vmappable: every branch is computed and selected. ``with_running=False`` / ``with_rae=False``
    skip those branches when no member uses them (a second tilted mean and an exponential per
    sample at every step).
    """
    l = losses.detach()
    no = torch.zeros_like(hyper["plain"])
    direct, rae, running = hyper.get("direct", no), hyper.get("rae", no), hyper.get("running", no)
    th = theta.detach().double().clamp(hyper["lo"], hyper["hi"])
    lam_learned, dlam_dtheta = lambda_of_theta(th, hyper["log"], direct)
    p, a, q = hyper["p"], hyper["a"], hyper["q"]
    learned = hyper["anrat"] & ~rae
    t = torch.where(learned, lam_learned.pow(p), hyper["t"])
    tilted, s, dtilted_dt = tilted_stats(l, t)
    lam = torch.where(learned, lam_learned, torch.ones_like(lam_learned))
    penalty = torch.where(learned, anrat_penalty(lam, a, q), torch.zeros_like(lam))
    g_theta = anrat_theta_gradient(t, lam, dtilted_dt, dlam_dtheta, p, a, q)
    value = (tilted + penalty).to(l.dtype)
    w = s.to(l.dtype)
    batch = tilted.to(l.dtype)
    r_new = batch
    if with_running:  # in the order of operations of NRAELoss's running normaliser
        old = hyper.get("running_nrae", batch)
        pair, mix = running_pair(old, batch, hyper.get("momentum", torch.ones_like(t)))
        r_new = tilted_stats(pair, t, mix, need_t=False)[0].to(l.dtype)
        value = torch.where(running, r_new, value)
        w = torch.where(running, torch.exp(t.to(l.dtype) * (l - r_new)) / l.shape[0], w)
    if with_rae:  # RAE at the switch's t, in float64 as RAELoss computes it
        rae_value, rae_w = rae_and_weights(l, hyper["t"])
        value = torch.where(rae, rae_value.to(l.dtype), value)
        w = torch.where(rae, rae_w.to(l.dtype), w)
    value = torch.where(hyper["plain"], l.mean(), value)
    w = torch.where(hyper["plain"], torch.full_like(l, 1.0 / l.shape[0]), w)
    g_theta = torch.where(learned & ~hyper["plain"], g_theta, torch.zeros_like(g_theta))
    return value, w, g_theta.to(theta.dtype), r_new


# The settings :func:`objective` reads, with the dtype of their (K,) tensors in a batched run.
SETTING_DTYPES: dict[str, torch.dtype] = {
    **dict.fromkeys(("plain", "anrat", "log", "direct", "rae", "running", "excursions", "ess"), torch.bool),
    **dict.fromkeys(("t", "p", "a", "q", "lo", "hi", "momentum", "r", "rho"), torch.float64),
    **dict.fromkeys(("period", "plain_steps"), torch.int64),
}


def objective_settings(schedule: LambdaSchedule, exponent: float) -> dict[str, Any]:
    """What :func:`objective` needs of one run's schedule as it stands (its current lambda or
    theta bounds, whether it switched, to what), as plain numbers keyed as :data:`SETTING_DTYPES`;
    ``exponent``: the per-sample error's (``r``). ``ess`` and ``rho``: the tilt solved from each
    batch (an ess schedule not yet switched) and its rho this epoch. Read again after every epoch:
    a schedule may anneal lambda or switch."""
    from anrat.ess import ESSLoss  # here: anrat.ess and anrat.losses import this module
    from anrat.losses import ANRATLoss, NRAELoss

    c, nrae = schedule.config, schedule.nrae
    anrat = isinstance(nrae, ANRATLoss)
    rae = schedule.rae is not None
    t = schedule.rae.t() if rae else nrae.lam**c.p if isinstance(nrae, NRAELoss) else 1.0
    lo, hi = nrae.theta_bounds if anrat else (0.0, 0.0)
    return {
        "plain": (schedule.switched and not rae) or nrae is None,
        "anrat": anrat,
        "log": c.parameterization == "log",
        "direct": c.parameterization == "direct",
        "rae": rae,
        "running": isinstance(nrae, NRAELoss) and nrae.normalizer == "running" and not schedule.switched,
        "excursions": c.name == "excursions" and not schedule.switched,
        "ess": isinstance(nrae, ESSLoss) and not schedule.switched,
        **{"t": t, "p": c.p, "a": c.a, "q": c.q, "lo": lo, "hi": hi},
        "momentum": nrae.momentum if isinstance(nrae, NRAELoss) else 1.0,
        "r": exponent,
        "rho": nrae.rho if isinstance(nrae, ESSLoss) else 1.0,
        "period": c.period,
        "plain_steps": c.plain_steps,
    }


__all__ = [
    "SETTING_DTYPES",
    "objective_settings",
    "LAMBDA_PARAMETERIZATIONS",
    "anrat_penalty",
    "anrat_theta_gradient",
    "lambda_of_theta",
    "objective",
    "rae_and_weights",
    "running_pair",
    "theta_of_lambda",
]
