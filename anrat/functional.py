"""Risk-averting errors as functions: per-sample losses, RAE, NRAE (the tilted mean).

Notation. For per-sample losses ``l_i >= 0`` (i = 1..m) and risk-sensitivity index ``lam > 0``,
``t = lam ** p``:

    RAE  = (1/m) sum_i exp(t * l_i)
    NRAE = log(RAE) / t                      (the tilted empirical risk with tilt t)

NRAE rises monotonically from mean(l) (t -> 0) to max(l) (t -> inf).

Numerics. The textbook ``(logsumexp(t*l) - log m) / t`` is exact in real arithmetic but in float32
it returns rounding noise divided by a tiny t when t is small: at t = 1e-8 the sum of exp(t*l_i)
is m * (1 + O(1e-8)), below float32's resolution. :func:`tilted_mean` centres the losses on their
mean c and shifts by the largest ``x_i = t (l_i - c)``, m:

    NRAE = c + (m + log1p(mean_i expm1(x_i - m))) / t

``expm1(x - m)`` lies in [-1, 0] (no overflow for any t), and the correction is computed directly,
never as a difference of two large numbers. The gradient is written in closed form (the tilted
softmax weights), exact and several times cheaper than differentiating the formula op by op.
The scalar work is done in float64 (see :func:`tilted_stats`), outside autocast, and the result
is returned in the losses' dtype (float32 at least).

Two implementations of that one formula: :func:`tilted_cpu` (NumPy on the host) and
:func:`tilted_stats` (torch ops on the device). The ``backend`` argument chooses between them
(:data:`TiltedBackend`; :func:`numpy_path` says which one runs), and a test checks that they agree.
"""

from __future__ import annotations

import math
from typing import Literal, get_args

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from anrat.errors import InputError

LossKind = Literal["ce", "lp", "true_class_sq"]
KINDS: tuple[LossKind, ...] = get_args(LossKind)

# Where the tilted mean is computed (:func:`numpy_path`): "numpy" on the host, "torch" in torch ops
# on the tensor's device, "auto" the toolkit's choice, which is NumPy on every device. On the CPU:
# a minibatch holds tens of losses, and each torch op costs ~10 us of dispatch against ~1 us for
# NumPy. On accelerators, after copying the losses to the host: one small transfer and one wait per
# step, against the ~30 launches of the torch-ops path (:func:`tilted_stats`, which never waits on
# the device), which made an ANRAT step of lenet5 1.55 times a cross-entropy step on an H100 (1.36
# on the host) (docs/results/step-overhead.md).
TiltedBackend = Literal["auto", "numpy", "torch"]
TILTED_BACKENDS: tuple[TiltedBackend, ...] = get_args(TiltedBackend)


def _check_positive(name: str, value: float | Tensor) -> None:
    if isinstance(value, Tensor):
        # Checking a tensor would force a device sync on every step; tensors come from our own
        # parameterisations (exp of a parameter), which are positive by construction.
        return
    if not math.isfinite(value) or value <= 0:
        raise InputError(f"{name} must be a finite number > 0, got {value!r}")


def error_exponent(kind: str, p: float | Tensor, r: float | Tensor | None = None) -> float | Tensor:
    """The exponent of the error in the per-sample loss: ``r`` when given, else the default of ``kind``.

    ``kind="lp"``: ``p``, the exponent of ``t = lam ** p`` (the project's historical tie of the two,
    kept as the default so that existing configurations compute what they did). ``kind="true_class_sq"``:
    2, the original ANRAT code's ``(1 - p_y) ** 2``. ``kind="ce"`` has no such exponent (returns ``p``,
    unused).
    """
    if r is not None:
        return r
    return 2.0 if kind == "true_class_sq" else p


def per_sample_loss(
    input: Tensor,
    target: Tensor,
    kind: LossKind = "ce",
    p: float = 2.0,
    weight: Tensor | None = None,
    label_smoothing: float = 0.0,
    *,
    r: float | Tensor | None = None,
) -> Tensor:
    """Per-sample losses ``l_i`` of shape (N,), in float32 (or float64 for float64 input).

    kind="ce": softmax cross-entropy from logits ``input`` (N, C) or (N, C, d1, ...) with class
    indices ``target`` (N,) or (N, d1, ...) as in :class:`torch.nn.CrossEntropyLoss`; extra dims
    are summed per sample. One output column, (N,) or (N, 1), is binary logistic regression with a
    sigmoid and 0/1 (or probability) targets.

    kind="lp": ``||output_i - target_i||_p^p`` summed over all non-batch dims (regression). With
    integer class-index targets and (N, C) ``input``, the output is first mapped to class
    probabilities by a softmax and compared with one-hot targets (summed over all C classes).

    kind="true_class_sq": ``(1 - p_{i,y_i}) ** r`` with ``p_i = softmax(input_i)`` over (N, C) logits
    and class-index targets (N,): the bounded loss, in [0, 1], of the original ANRAT code
    (cauchyturing/ANRAT, ``MNIST_lasagne.py``, r = 2), on the true class only. It is computed in log
    space, ``exp(r * (logsumexp_{k != y} z_k - logsumexp_k z_k))``, which is ``(1 - p_y) ** r``
    exactly and stays accurate (never a rounded-off 0) when p_y is within float32's resolution of 1;
    its gradient is finite for every r > 0.

    ``r``: the exponent of the error for "lp" and "true_class_sq", independent of the ``p`` of
    ``t = lam ** p``; None: :func:`error_exponent`'s default (``p`` for "lp", 2 for
    "true_class_sq"). Ignored for "ce".
    """
    if kind not in KINDS:
        raise InputError(f"unknown loss kind {kind!r}; expected one of {KINDS}")
    if r is not None and not isinstance(r, Tensor) and not (math.isfinite(r) and r > 0):
        raise InputError(f"r (the error's exponent) must be a finite number > 0, got {r!r}")
    if input.dim() == 0 or input.shape[0] != target.shape[0]:
        raise InputError(
            f"input and target must have the same batch size, got shapes {tuple(input.shape)} and {tuple(target.shape)}"
        )
    x = input if input.dtype == torch.float64 else input.float()
    if kind == "ce":
        if x.dim() == 1 or (x.dim() == 2 and x.shape[1] == 1):
            x = x.reshape(-1)
            y = target.reshape(-1).to(x.dtype)
            return F.binary_cross_entropy_with_logits(x, y, reduction="none")
        if target.is_floating_point() and target.shape == input.shape:
            y = target.to(x.dtype)  # class probabilities, as nn.CrossEntropyLoss accepts
        elif target.dtype in (torch.int64, torch.int32, torch.uint8):
            y = target.long()
        else:
            raise InputError(
                f"kind='ce' expects class-index targets (int64) of shape "
                f"{tuple(input.shape[:1]) + tuple(input.shape[2:])} "
                f"or class probabilities of shape {tuple(input.shape)}, got {target.dtype} {tuple(target.shape)}"
            )
        w = None if weight is None else weight.to(x.dtype)
        losses = F.cross_entropy(x, y, weight=w, reduction="none", label_smoothing=label_smoothing)
        return _sum_per_sample(losses)
    if kind == "true_class_sq":
        return _true_class_error(x, target, error_exponent(kind, p, r))
    # kind == "lp"
    p = error_exponent(kind, p, r)
    if not target.is_floating_point():
        if x.dim() != 2:
            raise InputError(f"kind='lp' with class-index targets expects (N, C) outputs, got {tuple(input.shape)}")
        probs = torch.softmax(x, dim=1)
        y = F.one_hot(target.long(), num_classes=x.shape[1]).to(x.dtype)
        return (probs - y).abs().pow(p).sum(dim=1)
    y = target.to(x.dtype)
    if y.shape != x.shape:
        if y.numel() == x.numel():
            y = y.reshape(x.shape)
        else:
            raise InputError(f"kind='lp' expects target of shape {tuple(input.shape)}, got {tuple(target.shape)}")
    return _sum_per_sample((x - y).abs().pow(p))


def distillation_loss(input: Tensor, teacher: Tensor, temperature: float = 1.0) -> Tensor:
    """Per-sample knowledge-distillation loss (Hinton et al. 2015) of shape (N,), float32:

        T^2 * KL(softmax(teacher / T) || softmax(input / T)),

    the divergence of the student's logits ``input`` (N, C) from the teacher's (N, C) at
    temperature ``T`` (> 0), scaled by T^2 so that its gradient keeps the size of the hard-target
    loss's as T changes. It is 0 where the student's softened predictions equal the teacher's.
    ``torch.nn.functional.kl_div`` (log-space targets) computes it; this only fixes the scaling
    and keeps one value per sample, so that the tilted criteria can weigh samples."""
    if input.dim() != 2 or tuple(teacher.shape) != tuple(input.shape):
        raise InputError(
            f"distillation needs (N, C) logits from the student and the teacher, got {tuple(input.shape)} "
            f"and {tuple(teacher.shape)}"
        )
    if not temperature > 0:
        raise InputError(f"the distillation temperature must be > 0, got {temperature!r}")
    student = F.log_softmax(input.float() / temperature, dim=1)
    target = F.log_softmax(teacher.detach().float() / temperature, dim=1)
    kl = F.kl_div(student, target, reduction="none", log_target=True).sum(dim=1)
    return kl * temperature**2


def _true_class_error(x: Tensor, target: Tensor, r: float | Tensor) -> Tensor:
    """``(1 - softmax(x)_y) ** r`` per row of (N, C) logits ``x``, in log space (see
    :func:`per_sample_loss`): ``1 - p_y = sum_{k != y} p_k = exp(lse_{k != y} x_k - lse_k x_k)``."""
    if x.dim() != 2 or x.shape[1] < 2 or target.is_floating_point() or tuple(target.shape) != tuple(x.shape[:1]):
        raise InputError(
            f"kind='true_class_sq' expects (N, C >= 2) logits and (N,) class-index targets, "
            f"got {tuple(x.shape)} and {target.dtype} {tuple(target.shape)}"
        )
    true_class = torch.arange(x.shape[1], device=x.device) == target.long()[:, None]  # (N, C); vmappable
    log_miss = torch.logsumexp(x.masked_fill(true_class, -math.inf), dim=1) - torch.logsumexp(x, dim=1)
    return torch.exp(r * log_miss.clamp(max=0.0))  # log(1 - p_y) <= 0; the clamp takes off rounding


def _sum_per_sample(values: Tensor) -> Tensor:
    """Sum over all dims but the first: (N, ...) -> (N,). Unlike ``reshape(N, -1)`` this also
    takes an empty batch (N = 0: a rank's empty shard of a small global batch)."""
    if values.dim() == 1:
        return values
    return values.reshape(values.shape[0], math.prod(values.shape[1:])).sum(dim=1)


def working_dtype(losses: Tensor) -> torch.dtype:
    """float64 for the scalar work of the tilted mean, except on devices without it (Apple's MPS)."""
    return torch.float32 if losses.device.type == "mps" else torch.float64


def tilted_stats(
    losses: Tensor, t: float | Tensor, weights: Tensor | None = None, need_t: bool = True
) -> tuple[Tensor, Tensor, Tensor | None]:
    """The tilted mean in torch ops with its gradients in closed form: ``(value, s, dvalue_dt)``
    (``dvalue_dt`` None unless ``need_t``).

    ``value = c + (m + log1p(sum_i w_i expm1(x_i - m))) / t`` with ``x = t (l - c)``, c the
    weighted mean of l and m = max x; ``s = softmax(x + log w)`` (= d value / d l) and
    ``d value / d t = (sum_i s_i (l_i - c) - (value - c)) / t``. One formula for every t, with no
    branch, so nothing waits on the device. In :func:`working_dtype` (float64 where the device has
    it) whatever the losses' dtype: at t = 1e-8 the correction is ~t^2 var(l), and d/dt is a
    difference of two O(t var(l)) terms, both far below float32's resolution of the mean.
    """
    l = losses.to(working_dtype(losses))
    w = None if weights is None else weights.to(l.dtype)
    if w is not None:
        w = w / w.sum()  # exactly 1 in the working dtype, or sum_i w_i x_i != 0 swamps small t
    if isinstance(t, Tensor):
        t = t.to(l.dtype)
    centre = l.mean() if w is None else (w * l).sum()
    d = l - centre
    x = d * t
    if w is not None:  # weight-0 entries (empty shards) take no part, even when largest
        x = torch.where(w > 0, x, -math.inf)
    m = x.max()
    e = torch.expm1(x - m)
    correction = (m + torch.log1p(e.mean() if w is None else (w * e).sum())).clamp(min=0)  # >= 0 by Jensen
    e += 1  # exp(x - m)
    if w is not None:
        e *= w
    s = e / e.sum()
    dt = ((s * d).sum() - correction / t) / t if need_t else None
    return centre + correction / t, s, dt


def tilted_cpu(losses: np.ndarray, t: float, weights: np.ndarray | None = None) -> tuple[float, np.ndarray, float]:
    """:func:`tilted_stats` in float64 NumPy on the host: ``(value, s, dvalue_dt)``, same formula."""
    l = losses.astype(np.float64)
    n = l.shape[0]
    w = None if weights is None else weights.astype(np.float64)
    if w is not None:
        w /= w.sum()  # exactly 1 in float64, or sum_i w_i x_i != 0 swamps small t
    # (sum / n, not .mean(): NumPy's mean costs three times as much on a vector this short)
    centre = float(l.sum()) / n if w is None else float(w @ l)
    l -= centre
    x = l * t
    if w is not None:  # weight-0 entries (empty shards) take no part, even when largest
        x[w == 0] = -math.inf
    m = float(x.max())
    e = np.expm1(x - m)
    correction = max(m + math.log1p(float(e.sum()) / n if w is None else float(w @ e)), 0.0)  # >= 0 by Jensen
    e += 1.0  # exp(x - m)
    if w is not None:
        e *= w
    e /= e.sum()  # s, the tilted weights
    dt = (float(e @ l) - correction / t) / t
    return centre + correction / t, e, dt


def check_backend(backend: str) -> None:
    """Raise InputError unless ``backend`` is one of :data:`TILTED_BACKENDS`."""
    if backend not in TILTED_BACKENDS:
        raise InputError(f"unknown tilted-mean backend {backend!r}; expected one of {TILTED_BACKENDS}")


def numpy_path(tensor: Tensor, backend: TiltedBackend = "auto") -> bool:
    """Whether the tilted mean of ``tensor`` is computed by :func:`tilted_cpu` on the host.

    ``backend``: ``"torch"`` never; ``"auto"`` and ``"numpy"`` always, except while torch.compile
    traces the code (it traces the torch-ops path into a few fused kernels: one graph, no host
    copy) or a CUDA graph is being captured (a graph cannot hold a copy to the host).
    """
    if backend == "torch" or torch.compiler.is_compiling():
        return False
    return not (tensor.device.type == "cuda" and torch.cuda.is_current_stream_capturing())


def host_array(tensor: Tensor) -> np.ndarray:
    """A detached tensor's values as a NumPy array on the host (waits for the device if not CPU)."""
    return tensor.detach().cpu().numpy()


def scaled_weights(s: np.ndarray, grad: Tensor) -> Tensor:
    """``s * grad`` as a tensor on ``grad``'s device, in its dtype (``grad`` is 0-d)."""
    dtype = _NUMPY_DTYPES[grad.dtype]
    if grad.device.type == "cpu":
        return torch.from_numpy((s * float(grad)).astype(dtype, copy=False))
    return torch.from_numpy(s.astype(dtype, copy=False)).to(grad.device).mul_(grad)


_NUMPY_DTYPES = {torch.float32: np.float32, torch.float64: np.float64}


class _TiltedMean(torch.autograd.Function):
    """Value as in :func:`tilted_mean`; gradients in closed form (the tilted weights), not op by op."""

    @staticmethod
    def forward(
        ctx,
        losses: Tensor,
        t: float | Tensor,
        weights: Tensor | None,  # type: ignore[override]
        backend: TiltedBackend,
    ) -> Tensor:
        if numpy_path(losses, backend):
            value, s, dt = tilted_cpu(host_array(losses), float(t), None if weights is None else host_array(weights))
            ctx.host = True
            ctx.stats = (s, dt)
            return torch.full((), value, dtype=losses.dtype, device=losses.device)
        value, s, dt = tilted_stats(losses, t, weights, need_t=ctx.needs_input_grad[1])
        ctx.host = False
        ctx.save_for_backward(s, dt)
        return value.to(losses.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        s, dt = ctx.stats if ctx.host else ctx.saved_tensors
        grad_t = grad * dt if ctx.needs_input_grad[1] else None
        if ctx.host:
            return scaled_weights(s, grad), grad_t, None, None
        return (s * grad).to(grad.dtype), grad_t.to(grad.dtype) if grad_t is not None else None, None, None


def tilted_mean(
    losses: Tensor, t: float | Tensor, weights: Tensor | None = None, *, backend: TiltedBackend = "auto"
) -> Tensor:
    """``(1/t) * log(sum_i w_i * exp(t * l_i))`` over a 1-D tensor, stable for any t in [1e-8, 1e8].

    ``weights`` are nonnegative and sum to 1 (default: uniform 1/m); this is NRAE of the losses.
    Differentiable in ``losses`` (gradient: the tilted weights ``softmax(t*l + log w)``) and in
    ``t`` when it is a tensor. Computed in float32 at least, whatever the input dtype or autocast.
    ``backend`` chooses the implementation, NumPy on the host or torch ops (:func:`numpy_path`);
    both compute the same formula.
    """
    _check_positive("t", t)
    check_backend(backend)
    l = losses.reshape(-1)
    if l.dtype not in (torch.float32, torch.float64):
        l = l.float()  # bfloat16/float16 under autocast: compute in float32
    if l.numel() == 0:
        raise InputError("cannot take the NRAE of an empty batch")
    if isinstance(t, Tensor):
        t = t.to(l.dtype)
    w = None if weights is None else weights.reshape(-1).to(l.dtype)
    # Inside an autograd.Function's forward autocast does not apply to our own ops, but be explicit
    # only when it is on: entering the context costs as much as a small op.
    if torch.is_autocast_enabled(l.device.type):
        with torch.autocast(device_type=l.device.type, enabled=False):
            return _TiltedMean.apply(l, t, w, backend)
    return _TiltedMean.apply(l, t, w, backend)


def _lam_to_t(lam: float | Tensor, p: float) -> float | Tensor:
    _check_positive("lam", lam)
    if not (math.isfinite(p) and p > 0):
        raise InputError(f"p must be a finite number > 0, got {p!r}")
    return lam**p


def nrae(
    input: Tensor,
    target: Tensor,
    lam: float | Tensor,
    p: float = 2.0,
    kind: LossKind = "ce",
    *,
    backend: TiltedBackend = "auto",
    **loss_kwargs,
) -> Tensor:
    """Normalized risk-averting error ``log(mean_i exp(t * l_i)) / t`` with ``t = lam ** p``.

    Scalar tensor; finite for every t from 1e-8 to 1e8 in float32 and float64; equals mean(l) as
    t -> 0 and max(l) as t -> inf, and never falls below mean(l). ``backend``: as in
    :func:`tilted_mean`. ``loss_kwargs`` go to :func:`per_sample_loss` (``weight``,
    ``label_smoothing``, ``r``: the error's exponent for "lp" and "true_class_sq", independent of p).
    """
    return tilted_mean(per_sample_loss(input, target, kind, p, **loss_kwargs), _lam_to_t(lam, p), backend=backend)


def rae(
    input: Tensor, target: Tensor, lam: float | Tensor, p: float = 2.0, kind: LossKind = "ce", **loss_kwargs
) -> Tensor:
    """Risk-averting error ``mean_i exp(t * l_i)``, ``t = lam ** p``.

    Overflows to inf once ``t * max(l)`` exceeds log of the dtype's largest value (about 88.7 in
    float32): that is its nature, and why training uses :func:`nrae`; see :func:`rae_feasible`.
    """
    t = _lam_to_t(lam, p)
    losses = per_sample_loss(input, target, kind, p, **loss_kwargs)
    return torch.exp(t * losses).mean()


def rae_feasible(
    input: Tensor,
    target: Tensor,
    lam: float | Tensor,
    p: float = 2.0,
    kind: LossKind = "ce",
    dtype: torch.dtype | None = None,
    **loss_kwargs,
) -> bool:
    """Whether RAE at this lambda is representable (finite) in ``dtype`` (default: input's dtype).

    RAE is finite iff ``t * max(l) < log(finfo(dtype).max)``. Used to decide when the trainer may
    leave NRAE for the plain loss. Returns a Python bool (one host sync).
    """
    losses = per_sample_loss(input, target, kind, p, **loss_kwargs)
    return losses_rae_feasible(losses.detach().max(), lam, p, dtype or input.dtype)


def losses_rae_feasible(max_loss: float | Tensor, lam: float | Tensor, p: float, dtype: torch.dtype) -> bool:
    """:func:`rae_feasible` from the largest per-sample loss alone."""
    t = float(_lam_to_t(float(lam), p))
    if not dtype.is_floating_point:
        dtype = torch.float32
    return bool(t * float(max_loss) < math.log(torch.finfo(dtype).max))


# --- effective sample size of the tilted weights, and the tilt that sets it --------------------------
#
# For losses l (m,) and tilt t >= 0 the tilted weights are w = softmax(t l), and their effective
# sample size is ESS = 1 / sum_i w_i^2 = (sum_i e_i)^2 / sum_i e_i^2 for any e_i proportional to
# exp(t l_i). Shifted by the largest loss M: x_i = t (l_i - M) <= 0, a_i = expm1(x_i) in [-1, 0],
# e_i = 1 + a_i in [0, 1], and since var(e) = var(a),
#
#     m / ESS = mean(e^2) / mean(e)^2 = 1 + R,     R = var(a) / mean(e)^2.
#
# R rises from 0 (t = 0: ESS = m) to m/k - 1 (t -> inf: ESS -> k, the number of losses equal to M).
# Taking var(a) from the expm1 values keeps R accurate to rounding at every t: at small t,
# a_i ~ t (l_i - M) and R ~ t^2 var(l), with no difference of two numbers near 1; nothing overflows.
# ESS/m = rho is R = R* = (1 - rho) / rho. In u = log t, log R rises with slope
#
#     d log R / d u = 2 t D (1 + R) / R,   D = E_{w^2}[l] - E_w[l] = sum_i e_i (a_i - abar_w) l_i / sum_i e_i^2
#
# (w^2 normalised is softmax(2 t l); abar_w = sum_i e_i a_i / sum_i e_i; D >= 0, so ESS falls
# monotonically in t), which tends to 2 at small t. The root is bracketed in closed form:
#
# - from below by t_lo = log(1 / rho) / (M - mean l), since sum_i w_i^2 <= max_i w_i <= exp(t (M - mean l)) / m
#   (Jensen: sum_j exp(t l_j) >= m exp(t mean l));
# - from above by t_hi = log((m - k) / (sqrt(k rho m) - k)) / delta, delta = M - (largest loss below M),
#   since every maximum has weight >= 1 / (k + (m - k) exp(-t delta)), so ESS <= (k + (m - k) exp(-t delta))^2 / k;
#
# and found by safeguarded Newton steps in u (rtsafe's rule: the Newton step is taken when it lands
# inside the bracket and is at most half the step before last, else the bracket is bisected),
# started from the small-t solution t = sqrt(R* / var(l)) clipped into the bracket.
ESS_T_MAX = 1e8  # the largest tilt the toolkit uses (lambda = 1e4 at p = 2); "minimax" within log(m) / 1e8
ESS_ITERATIONS = 24  # steps of the device solve (fixed: no sync; at most 12 were needed in our tests)
_ESS_TOL = 1e-11  # convergence of the host solve: |step in log t| <= 1e-11
_ESS_MAX_ITERATIONS = 200  # the host solve's cap, never reached in the tests


def _check_rho(rho: float | Tensor) -> None:
    if isinstance(rho, Tensor):
        return  # checking would sync the device; tensors come from validated schedules
    if not (isinstance(rho, (int, float)) and 0 < rho <= 1):  # NaN fails too
        raise InputError(f"rho (effective sample size / batch size) must be in (0, 1], got {rho!r}")


def _rows(losses: Tensor) -> Tensor:
    """``losses`` (m,) or (K, m) as (K, m) in the working dtype, detached."""
    if losses.dim() not in (1, 2) or losses.shape[-1] == 0:
        raise InputError(f"expected losses of shape (m,) or (K, m) with m >= 1, got {tuple(losses.shape)}")
    l = losses.detach().to(working_dtype(losses))
    return l.reshape(1, -1) if l.dim() == 1 else l


def _per_row(value: float | Tensor, like: Tensor) -> Tensor:
    """A scalar or (K,) value as a (K,) tensor in ``like``'s dtype and device."""
    v = value.to(like) if isinstance(value, Tensor) else torch.tensor(value, dtype=like.dtype, device=like.device)
    return v.expand(like.shape[0]) if v.dim() == 0 else v.reshape(like.shape[0])


def _ess_ratio(d: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
    """``R = m / ESS - 1`` of rows ``d = l - max(l)`` (K, m) at finite tilts ``t`` (K,), and
    ``d log R / d log t``."""
    a = torch.expm1(t[:, None] * d)
    e = a + 1
    s1 = e.sum(dim=1)
    centred = a - a.mean(dim=1, keepdim=True)
    r = (centred * centred).sum(dim=1) * d.shape[1] / (s1 * s1)
    abar_w = (e * a).sum(dim=1) / s1
    slope = (e * (a - abar_w[:, None]) * d).sum(dim=1) / (e * e).sum(dim=1)
    return r, 2 * t * slope * (1 + r) / r


def effective_sample_size(losses: Tensor, t: float | Tensor) -> Tensor:
    """``ESS = 1 / sum_i w_i^2`` of the tilted weights ``w = softmax(t * l)`` of ``losses``.

    ``losses``: (m,) or (K, m) (K rows, e.g. the members of a batched run); ``t`` >= 0 (+inf
    allowed): a number, a 0-d tensor or one per row (K,). Returns the ESS, between k (the number of
    losses equal to the largest) and m, as a tensor of shape () or (K,) in :func:`working_dtype`
    (float64 where the device has it), on the losses' device, detached; ``ESS / m`` is the fraction
    of the batch that the tilted gradient effectively averages. Computed as ``m / (1 + R)`` (module
    notes above this function: stable for every t, accurate to rounding; ESS = m at t = 0 and k at
    t = inf exactly). Torch ops only, no sync: usable under ``torch.func.vmap``.
    """
    if not isinstance(t, Tensor) and not t >= 0:
        raise InputError(f"t must be >= 0, got {t!r}")
    l = _rows(losses)
    m = l.shape[1]
    tt = _per_row(t, l)
    d = l - l.amax(dim=1, keepdim=True)
    infinite = torch.isinf(tt)
    a = torch.expm1(torch.where(infinite, 0.0, tt)[:, None] * d)
    a = torch.where(infinite[:, None], torch.where(d == 0, 0.0, -1.0), a)  # t = inf: the maxima alone
    e = a + 1
    s1 = e.sum(dim=1)
    centred = a - a.mean(dim=1, keepdim=True)
    ess = m / (1 + (centred * centred).sum(dim=1) * m / (s1 * s1))
    return ess.reshape(()) if losses.dim() == 1 else ess


def tilt_for_ess(
    losses: Tensor,
    rho: float | Tensor,
    *,
    t_max: float = ESS_T_MAX,
    backend: TiltedBackend = "auto",
    iterations: int | None = None,
) -> Tensor:
    """The tilt ``t >= 0`` at which the tilted weights ``softmax(t * l)`` have ``ESS / m = rho``.

    ``losses``: (m,) or (K, m); ``rho``: a number in (0, 1] or a tensor, 0-d or one per row (K,).
    Returns t, shape () or (K,), in :func:`working_dtype` on the losses' device, detached (t is a
    control variable: nothing is differentiated through the solve).

    - ``rho = 1`` gives t = 0 (the plain mean);
    - the attainable fractions are (k/m, 1], k the number of losses tied at the maximum (ESS -> k
      as t -> inf; all losses equal: k = m). For ``rho <= k/m``, and whenever ESS/m stays above
      rho up to ``t_max``, the answer is ``t_max`` (default 1e8, the toolkit's largest tilt, at
      which NRAE is within log(m)/1e8 of the maximum loss); ``t_max=math.inf`` returns inf there.

    The solve (notes above :func:`effective_sample_size`): safeguarded Newton steps on log t
    inside a closed-form bracket, in float64, to 1e-11 relative in t where ESS is well
    conditioned in t. ``backend`` (as for :func:`tilted_mean`): the host path copies the losses to
    the CPU (one wait for an accelerator) and steps until converged, typically 4-8 steps; the
    torch path takes ``iterations`` steps (default :data:`ESS_ITERATIONS`) on the losses' device
    with no sync, and runs under ``torch.func.vmap``. ``iterations`` given: that many steps on
    either path.
    """
    _check_rho(rho)
    check_backend(backend)
    if not t_max > 0:  # NaN too; inf allowed
        raise InputError(f"t_max must be > 0 (or inf), got {t_max!r}")
    l = _rows(losses)
    host = numpy_path(l, backend) and (l.device.type == "cpu" or iterations is None)
    work = l.cpu() if host else l
    t = _solve_tilt(
        work, _per_row(rho, work), t_max, iterations if iterations is not None else (None if host else ESS_ITERATIONS)
    )
    t = t.to(l.device)
    return t.reshape(()) if losses.dim() == 1 else t


@torch.no_grad()
def _solve_tilt(l: Tensor, rho: Tensor, t_max: float, iterations: int | None) -> Tensor:
    """:func:`tilt_for_ess` on rows ``l`` (K, m), ``rho`` (K,): ``iterations`` steps, or (None)
    until every row has converged (a host check per step)."""
    m = l.shape[1]
    d = l - l.amax(dim=1, keepdim=True)
    k = (d == 0).sum(dim=1).to(l.dtype)
    mean_d = d.mean(dim=1)
    var = ((d - mean_d[:, None]) ** 2).mean(dim=1)
    delta = -torch.where(d < 0, d, -math.inf).amax(dim=1)
    r_star = (1 - rho) / rho
    # solved rows: the target lies strictly inside (0, m/k - 1), with a margin for rho's rounding
    solve = (r_star > 0) & (var > 0) & (r_star < (m - k) / k * (1 - 1e-12))
    one = torch.ones_like(r_star)
    r_star = torch.where(solve, r_star, one)  # placeholders keep the unsolved rows finite
    var, delta, spread = (torch.where(solve, v, one) for v in (var, delta, -mean_d))
    root = torch.sqrt(k * m / (1 + r_star)) - k
    t_lo = torch.log1p(r_star) / spread
    t_hi = torch.where(root > 0, torch.log((m - k) / torch.where(root > 0, root, one)) / delta, 2 * t_lo)
    t_hi = t_hi.clamp(max=t_max)
    t_lo = torch.minimum(t_lo, t_hi)
    log_target = torch.log(r_star)
    r_top, _ = _ess_ratio(d, t_hi)
    short = torch.log(r_top) <= log_target  # ESS/m > rho up to t_hi (= t_max here): answer t_hi
    u_lo, u_hi = torch.log(t_lo), torch.log(t_hi)
    u = torch.log(torch.sqrt(r_star / var).clamp(min=t_lo, max=t_hi))
    step_old = step = u_hi - u_lo
    active = solve & ~short
    for _ in range(iterations if iterations is not None else _ESS_MAX_ITERATIONS):
        r, slope = _ess_ratio(d, u.exp())
        f = torch.log(r) - log_target
        u_lo = torch.where(f < 0, u, u_lo)
        u_hi = torch.where(f > 0, u, u_hi)
        newton = f / slope
        candidate = u - newton
        # a Newton step is taken inside the bracket when it at least halves the step before last,
        # and always once it is below the tolerance (then it may not move u at all)
        inside = (candidate > u_lo) & (candidate < u_hi) & (2 * newton.abs() <= step_old.abs())
        take = torch.isfinite(candidate) & (inside | (newton.abs() <= _ESS_TOL))
        step_old, step = step, torch.where(take, newton, (u_hi - u_lo) / 2)
        u_next = torch.where(take, candidate, (u_lo + u_hi) / 2)
        done = ((u_next - u).abs() <= _ESS_TOL) | (f == 0) | (u_hi - u_lo <= _ESS_TOL)
        u = torch.where(active, u_next, u)  # a converged row stays where it converged
        active = active & ~done
        if iterations is None and not bool(active.any()):
            break
    solved = torch.where(short, t_hi, u.exp())
    return torch.where(solve, solved, torch.where(rho >= 1, 0.0, t_max))


__all__ = [
    "ESS_ITERATIONS",
    "ESS_T_MAX",
    "KINDS",
    "TILTED_BACKENDS",
    "LossKind",
    "TiltedBackend",
    "error_exponent",
    "effective_sample_size",
    "losses_rae_feasible",
    "nrae",
    "per_sample_loss",
    "rae",
    "rae_feasible",
    "tilt_for_ess",
    "tilted_mean",
]
