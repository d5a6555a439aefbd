"""Risk-averting losses as ``nn.Module``s, shaped like ``nn.CrossEntropyLoss``.

Each module computes per-sample losses (:func:`anrat.functional.per_sample_loss`) and reduces them
with :meth:`~BatchLoss.aggregate`; ``forward(input, target)`` is the two together. The trainer
calls :meth:`~BatchLoss.aggregate` on per-sample losses directly.

- :class:`PlainLoss`: ``mean(l)`` (the deconvexified loss; for kind="ce" it equals
  ``nn.CrossEntropyLoss``).
- :class:`NRAELoss`: NRAE at a given lambda (settable, for schedules).
- :class:`ANRATLoss`: NRAE + ``a * lam**(-q)`` with lambda a learned parameter.
- :class:`RAELoss`: RAE itself, ``mean_i exp(t * l_i)`` at a fixed lambda (what deconvexification
  may switch to when it is representable, ``ScheduleConfig.switch_to="rae"``).

Two normalisers. The paper takes the log-mean-exp over each minibatch ("batch"). That is a biased
estimate of the dataset NRAE: as t grows it tends to the *batch* maximum, and the per-sample
weights softmax(t*l) are normalised within the batch, so a hard sample's weight depends on which
other samples share its batch. ``normalizer="running"`` keeps, as stochastic solvers of tilted ERM
do, a running estimate ``r`` of the dataset NRAE, updated each step as the tilted average
``r <- tilted_mean([r, nrae_batch], t, weights=[1 - momentum, momentum])`` (all in log space, so
it is stable for every t), and weights each sample's gradient by ``exp(t * (l_i - r)) / m``. Over
a fixed dataset those weights approach the full-batch tilted weights ``softmax(t * l)`` times the
number of batches; the value reported is ``r``.

What the batch is. :meth:`~BatchLoss.aggregate` takes a :class:`~anrat.reductions.BatchReduction`
that computes the means, tilted means, sums and counts the objective is made of: by default over
the tensor given (:data:`~anrat.reductions.LOCAL_BATCH`). Under ``torch.distributed``,
:class:`anrat.distributed.GlobalBatchLoss` wraps a loss and passes the reduction over all ranks'
shards of the global batch, so the objective and its gradients are those of one process holding
the whole batch; the losses themselves never communicate.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from anrat.errors import InputError
from anrat.functional import (
    KINDS,
    LossKind,
    TiltedBackend,
    check_backend,
    host_array,
    numpy_path,
    per_sample_loss,
    scaled_weights,
    tilted_cpu,
    tilted_mean,
    tilted_stats,
    working_dtype,
)
from anrat.objective import (
    LAMBDA_PARAMETERIZATIONS,
    anrat_penalty,
    anrat_theta_gradient,
    lambda_of_theta,
    running_pair,
    theta_of_lambda,
)
from anrat.reductions import LOCAL_BATCH, BatchReduction, LocalBatch

NORMALIZERS = ("batch", "running")


def _check_kind_p(kind: str, p: float) -> None:
    if kind not in KINDS:
        raise InputError(f"unknown loss kind {kind!r}; expected one of {KINDS}")
    if not (math.isfinite(p) and p > 0):
        raise InputError(f"p must be a finite number > 0, got {p!r}")


def _check_tilted_args(kind: str, p: float, r: float | None, backend: str) -> float | None:
    """The checks every tilted loss makes of its per-sample loss and backend; returns ``r``."""
    _check_kind_p(kind, p)
    check_backend(backend)
    return _check_r(kind, r)


def _check_r(kind: str, r: float | None) -> float | None:
    """``r`` (the error's exponent, independent of t's p) as a float, or None; refused for "ce"."""
    if r is None:
        return None
    if kind == "ce":
        raise InputError(f"r (the error's exponent) applies to kind 'lp' and 'true_class_sq' only, got kind {kind!r}")
    if isinstance(r, bool) or not isinstance(r, (int, float)) or not (math.isfinite(r) and r > 0):
        raise InputError(f"r (the error's exponent) must be a finite number > 0 or None, got {r!r}")
    return float(r)


def _r_repr(r: float | None) -> str:
    return "" if r is None else f", r={r:g}"


class BatchLoss(nn.Module):
    """A loss made of per-sample losses ``l_i`` (``kind``, ``p``, ``r``) and an aggregate of them.

    ``forward(input, target) = aggregate(per_sample(input, target))``.
    """

    kind: LossKind
    p: float
    r: float | None = None  # the error's exponent (None: the kind's default, see error_exponent)

    def per_sample(self, input: Tensor, target: Tensor) -> Tensor:
        """The per-sample losses ``l_i``, shape (N,): :func:`~anrat.functional.per_sample_loss`."""
        return per_sample_loss(input, target, self.kind, self.p, r=self.r)

    def aggregate(self, losses: Tensor, reduction: BatchReduction = LOCAL_BATCH) -> Tensor:
        """The objective from the per-sample losses, over the batch that ``reduction`` defines."""
        raise NotImplementedError

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return self.aggregate(self.per_sample(input, target))


class PlainLoss(BatchLoss):
    """Mean of the per-sample losses: the loss NRAE tends to as lambda -> 0."""

    def __init__(self, kind: LossKind = "ce", p: float = 2.0, *, r: float | None = None) -> None:
        super().__init__()
        _check_kind_p(kind, p)
        self.kind, self.p = kind, float(p)
        self.r = _check_r(kind, r)

    def aggregate(self, losses: Tensor, reduction: BatchReduction = LOCAL_BATCH) -> Tensor:
        """``mean_i l_i``."""
        return reduction.mean(losses)


class NRAELoss(BatchLoss):
    """``log(mean_i exp(t * l_i)) / t`` with ``t = lam ** p`` (see :mod:`anrat.functional`).

    Args:
        lam: risk-sensitivity index lambda > 0 (mutable: schedules set ``loss.lam``).
        p: exponent; ``t = lam ** p``, and for kind="lp" also the norm exponent of the error
            ``||output - target||_p^p`` unless ``r`` is given. Default 2 (squared error; the
            paper's MNIST setting).
        kind: "ce" (cross-entropy from logits), "lp" or "true_class_sq" (the original code's
            ``(1 - p_y) ** r``).
        normalizer: "batch" (the paper's per-minibatch NRAE) or "running" (see module docstring).
        momentum: weight of the newest batch in the running normaliser.
        backend: where the tilted mean is computed, NumPy on the host or torch ops
            (:func:`anrat.functional.tilted_mean`); "auto" (default) chooses.
        r: the error's exponent for "lp" and "true_class_sq", independent of p (None: the kind's
            default, :func:`anrat.functional.error_exponent`).
    """

    def __init__(
        self,
        lam: float = 10.0,
        p: float = 2.0,
        kind: LossKind = "ce",
        normalizer: str = "batch",
        momentum: float = 0.1,
        *,
        backend: TiltedBackend = "auto",
        r: float | None = None,
    ) -> None:
        super().__init__()
        self.r = _check_tilted_args(kind, p, r, backend)
        if normalizer not in NORMALIZERS:
            raise InputError(f"unknown normalizer {normalizer!r}; expected one of {NORMALIZERS}")
        if not 0 < momentum <= 1:
            raise InputError(f"momentum must be in (0, 1], got {momentum!r}")
        self.kind, self.p, self.normalizer, self.momentum = kind, float(p), normalizer, float(momentum)
        self.backend = backend
        # lambda as a tensor too, read only under torch.compile: a traced float would be a constant
        # of the graph, and every new lambda (an annealing schedule) a recompilation.
        self.register_buffer("lam_tensor", torch.tensor(1.0), persistent=False)
        self.lam = lam
        # Running estimate of the dataset NRAE (units of the loss); NaN = no batch seen yet.
        self.register_buffer("running_nrae", torch.tensor(float("nan")))

    @property
    def lam(self) -> float:
        return self._lam

    @lam.setter
    def lam(self, value: float) -> None:
        value = float(value)
        if not (math.isfinite(value) and value > 0):
            raise InputError(f"lambda must be a finite number > 0, got {value!r}")
        self._lam = value
        self.lam_tensor.fill_(value)

    def t(self) -> float | Tensor:
        if torch.compiler.is_compiling():
            return self.lam_tensor**self.p
        return self._lam**self.p

    def aggregate(self, losses: Tensor, reduction: BatchReduction = LOCAL_BATCH) -> Tensor:
        """NRAE of the batch (``normalizer="batch"``) or the running NRAE (module docstring)."""
        if self.normalizer == "batch":
            return reduction.tilted_mean(losses, self.t(), self.backend)
        return self._running_aggregate(losses, self.t(), reduction)

    def _running_aggregate(self, losses: Tensor, t: float | Tensor, reduction: BatchReduction) -> Tensor:
        """Value: the updated running NRAE. Gradient: sum_i exp(t*(l_i - r)) / m * grad l_i."""
        l = losses.reshape(-1).float()
        t_detached = t.detach() if isinstance(t, Tensor) else t
        batch = reduction.tilted_mean(l.detach(), t_detached, self.backend)
        if self.training:
            pair, mix = running_pair(self.running_nrae.to(batch), batch, self.momentum)
            r = tilted_mean(pair, t_detached, weights=mix, backend=self.backend)
            self.running_nrae = r.detach().to(self.running_nrae)
        else:
            r = batch
        weights = torch.exp(t_detached * (l.detach() - r)) / reduction.count(l)
        surrogate = reduction.sum(weights * l)
        return r + (surrogate - surrogate.detach())

    def extra_repr(self) -> str:
        return (
            f"lam={self._lam:g}, p={self.p:g}, kind={self.kind!r}, normalizer={self.normalizer!r}"
            + _backend_repr(self.backend)
            + _r_repr(self.r)
        )


class RAELoss(BatchLoss):
    """The risk-averting error itself, ``mean_i exp(t * l_i)`` with ``t = lam ** p`` (dimensionless, >= 1).

    Its gradient is ``(t / m) sum_i exp(t l_i) grad l_i``: the tilted weights of NRAE scaled by
    ``t * RAE``, so steps grow with the error. Computed in float64 and returned in the losses' dtype:
    it overflows float32 (inf, which the trainer reports as a divergence) once ``t * max(l)`` exceeds
    about 88.7 (:func:`anrat.functional.rae_feasible`). The deconvexification switch may hand
    training over to it at the lambda of the switch (``ScheduleConfig.switch_to="rae"``), as the
    source paper words it: RAE is used once it is numerically feasible.
    """

    def __init__(self, lam: float, p: float = 2.0, kind: LossKind = "ce", *, r: float | None = None) -> None:
        super().__init__()
        _check_kind_p(kind, p)
        if not (math.isfinite(lam) and lam > 0):
            raise InputError(f"lambda must be a finite number > 0, got {lam!r}")
        self.kind, self.p, self.lam = kind, float(p), float(lam)
        self.r = _check_r(kind, r)

    def t(self) -> float:
        return self.lam**self.p

    def aggregate(self, losses: Tensor, reduction: BatchReduction = LOCAL_BATCH) -> Tensor:
        """``mean_i exp(t * l_i)``, in float64, returned in the losses' dtype (float32 at least)."""
        dtype = losses.dtype if losses.dtype in (torch.float32, torch.float64) else torch.float32
        return reduction.mean(torch.exp(self.t() * losses.to(working_dtype(losses)))).to(dtype)

    def extra_repr(self) -> str:
        return f"lam={self.lam:g}, p={self.p:g}, kind={self.kind!r}" + _r_repr(self.r)


class _StraightThroughClamp(torch.autograd.Function):
    """Clamp in value, identity in gradient: a bound can stop lambda but never trap it."""

    @staticmethod
    def forward(ctx, x: Tensor, lo: float, hi: float) -> Tensor:  # type: ignore[override]
        return x.clamp(lo, hi)

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        return grad, None, None


class _ANRATObjective(torch.autograd.Function):
    """``tilted_mean(l, lam**p) + a * lam**(-q)``, lam = exp(theta), softplus(theta) or theta itself
    ("direct") with theta clamped straight-through, in one node with closed-form gradients (the same value and
    gradients as composing the ops; several times cheaper on small batches):

        d/dl_i = softmax(t l)_i,
        d/dtheta = [p t / lam * dNRAE/dt - a q lam^(-q-1)] * dlam/dtheta.

    On the host path (:func:`~anrat.functional.numpy_path`) lambda is a Python float and the tilted
    mean is :func:`~anrat.functional.tilted_cpu`; otherwise all is torch ops with no device sync.
    """

    @staticmethod
    def forward(
        ctx,
        losses: Tensor,
        theta: Tensor,
        lo: float,
        hi: float,
        p: float,
        a: float,
        q: float,
        parameterization: str,
        backend: TiltedBackend,
    ) -> Tensor:  # type: ignore[override]
        log, direct = parameterization == "log", parameterization == "direct"
        if numpy_path(losses, backend):
            l_host = host_array(losses)  # the one wait for the device, if any
            lam, dlam_dtheta = lambda_of_theta(min(max(theta.item(), lo), hi), log, direct)
            t = lam**p
            value, s, dnrae_dt = tilted_cpu(l_host, t)
            ctx.host = True
            ctx.stats = (s, anrat_theta_gradient(t, lam, dnrae_dt, dlam_dtheta, p, a, q))
            return torch.full((), value + anrat_penalty(lam, a, q), dtype=losses.dtype, device=losses.device)
        lam, dlam_dtheta = lambda_of_theta(theta.clamp(lo, hi).to(working_dtype(losses)), log, direct)
        t = lam.pow(p)
        value, s, dnrae_dt = tilted_stats(losses, t)
        ctx.host = False
        ctx.save_for_backward(s, anrat_theta_gradient(t, lam, dnrae_dt, dlam_dtheta, p, a, q))
        return (value + anrat_penalty(lam, a, q)).to(losses.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        s, dloss_dtheta = ctx.stats if ctx.host else ctx.saved_tensors
        grad_theta = (grad * dloss_dtheta).to(grad.dtype) if ctx.needs_input_grad[1] else None
        if ctx.host:
            return scaled_weights(s, grad), grad_theta, None, None, None, None, None, None, None
        return (s * grad).to(grad.dtype), grad_theta, None, None, None, None, None, None, None


class ANRATLoss(BatchLoss):
    """Adaptive NRAE: ``nrae(l; lam) + a * lam ** (-q)`` with lambda learned by the optimizer.

    lambda is parameterised so that it stays strictly positive whatever the step:
    ``"log"`` (default): ``lam = exp(theta)``; a gradient step changes lambda by a *factor*, so one
    learning rate behaves the same at lambda = 100 and lambda = 0.1. ``"softplus"``:
    ``lam = softplus(theta)``, close to the paper's direct update of lambda for lambda >> 1.
    ``"direct"``: ``lam = theta``, the paper's plain-SGD update of lambda itself (its eq. 6, with the
    sign of the NRAE term as derived below); after every optimizer step the trainer projects theta
    back onto ``[min_lambda, max_lambda]`` (:meth:`project_`), which is what keeps lambda > 0, and
    lambda's learning rate defaults to the weights' (:func:`anrat.trainer.lambda_learning_rate`).

    d/d lam of the loss = (p / lam) * (sum_i w_i l_i - nrae) - a * q * lam ** (-q - 1),
    ``w = softmax(t * l)``. The first term is >= 0 (NRAE rises with lambda), so without the
    penalty lambda only falls; ``a`` and ``q`` set where it settles.

    lambda is confined to ``[min_lambda, max_lambda]`` (default [1e-4, 1e4], i.e. t in [1e-8, 1e8]
    for p = 2) by a straight-through clamp of theta: the value is clamped, the gradient is not, so a
    huge step can neither drive lambda to 0 or infinity nor leave it stuck at a bound.

    The optimizer must see ``loss.parameters()`` (give them their own learning rate: lambda's
    learning rate decides whether ANRAT convexifies at all; see the trainer's ``lambda_lr``).
    ``backend``: where the tilted mean is computed, and ``r`` the error's exponent, as in
    :class:`NRAELoss`.

    Under torch.distributed, wrap the loss in :class:`anrat.distributed.GlobalBatchLoss`; theta is
    not a DDP parameter: average its gradient over the ranks
    (:func:`anrat.distributed.average_gradients`) as the trainer does.
    """

    def __init__(
        self,
        init_lambda: float = 10.0,
        p: float = 2.0,
        a: float = 0.01,
        q: float = 1.0,
        kind: LossKind = "ce",
        parameterization: str = "log",
        min_lambda: float = 1e-4,
        max_lambda: float = 1e4,
        *,
        backend: TiltedBackend = "auto",
        r: float | None = None,
    ) -> None:
        super().__init__()
        self.r = _check_tilted_args(kind, p, r, backend)
        if not (math.isfinite(init_lambda) and init_lambda > 0):
            raise InputError(f"init_lambda must be a finite number > 0, got {init_lambda!r}")
        if not (math.isfinite(a) and a >= 0):
            raise InputError(f"a (penalty weight) must be >= 0, got {a!r}")
        if not (math.isfinite(q) and q > 0):
            raise InputError(f"q (penalty exponent) must be > 0, got {q!r}")
        if parameterization not in LAMBDA_PARAMETERIZATIONS:
            raise InputError(
                f"unknown lambda parameterization {parameterization!r}; expected one of {LAMBDA_PARAMETERIZATIONS}"
            )
        if not 0 < min_lambda <= init_lambda <= max_lambda < math.inf:
            raise InputError(
                f"expected 0 < min_lambda <= init_lambda <= max_lambda, got "
                f"{min_lambda!r}, {init_lambda!r}, {max_lambda!r}"
            )
        self.kind, self.p, self.a, self.q, self.parameterization = kind, float(p), float(a), float(q), parameterization
        self.backend = backend
        self.theta_bounds = (
            theta_of_lambda(min_lambda, parameterization),
            theta_of_lambda(max_lambda, parameterization),
        )
        self.theta = nn.Parameter(torch.tensor(theta_of_lambda(init_lambda, parameterization), dtype=torch.float32))

    def lambda_tensor(self) -> Tensor:
        """Current lambda as a differentiable 0-d tensor in [min_lambda, max_lambda]."""
        theta = _StraightThroughClamp.apply(self.theta, *self.theta_bounds)
        return lambda_of_theta(theta, self.parameterization == "log", self.parameterization == "direct")[0]

    @torch.no_grad()
    def project_(self) -> None:
        """After an optimizer step: with ``parameterization="direct"``, clamp theta (= lambda) in
        place to ``[min_lambda, max_lambda]`` (projected gradient descent; a step that would take
        lambda to 0 or below leaves it at min_lambda). The other parameterisations keep lambda in
        range by construction (straight-through clamp) and are left alone."""
        if self.parameterization == "direct":
            self.theta.clamp_(*self.theta_bounds)

    @property
    def lam(self) -> float:
        """Current lambda as a float (read-only; lambda changes through the optimizer)."""
        return float(self.lambda_tensor().detach())

    def penalty(self) -> Tensor:
        return anrat_penalty(self.lambda_tensor(), self.a, self.q)

    def aggregate(self, losses: Tensor, reduction: BatchReduction = LOCAL_BATCH) -> Tensor:
        """``nrae(l; lam) + a * lam ** (-q)``; over the tensor given in one autograd node
        (:class:`_ANRATObjective`), over another batch composed from ``reduction``'s tilted mean,
        with the same value and gradients."""
        if not isinstance(reduction, LocalBatch):
            lam = self.lambda_tensor()
            return reduction.tilted_mean(losses, lam.pow(self.p), self.backend) + anrat_penalty(lam, self.a, self.q)
        l = losses if losses.dim() == 1 else losses.reshape(-1)
        if l.dtype not in (torch.float32, torch.float64):
            l = l.float()
        if l.shape[0] == 0:
            raise InputError("cannot take the NRAE of an empty batch")
        lo, hi = self.theta_bounds
        return _ANRATObjective.apply(l, self.theta, lo, hi, self.p, self.a, self.q, self.parameterization, self.backend)

    def extra_repr(self) -> str:
        return (
            f"lam={self.lam:g}, p={self.p:g}, a={self.a:g}, q={self.q:g}, kind={self.kind!r}, "
            f"parameterization={self.parameterization!r}" + _backend_repr(self.backend) + _r_repr(self.r)
        )


def _backend_repr(backend: TiltedBackend) -> str:
    return "" if backend == "auto" else f", backend={backend!r}"
