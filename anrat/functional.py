"""Risk-averting errors as functions: per-sample losses, RAE, NRAE (the tilted mean).

Notation. For per-sample losses ``l_i >= 0`` (i = 1..m) and risk-sensitivity index ``lam > 0``,
``t = lam ** p``:

    RAE  = (1/m) sum_i exp(t * l_i)
    NRAE = log(RAE) / t                      (the tilted empirical risk with tilt t)

NRAE rises monotonically from mean(l) (t -> 0) to max(l) (t -> inf).

Numerics. The textbook ``(logsumexp(t*l) - log m) / t`` is exact in real arithmetic but in float32
it returns rounding noise divided by a tiny t when t is small: at t = 1e-8 the sum of exp(t*l_i)
is m * (1 + O(1e-8)), below float32's resolution. :func:`tilted_mean` centres the losses on their
mean first, ``NRAE = mean(l) + log(mean exp(t * (l_i - mean(l)))) / t``, and evaluates the log of
the mean with ``log1p(mean(expm1(x)))`` while ``x = t * (l - mean(l))`` stays small (no overflow
possible, and no cancellation: the correction term is computed directly, never as a difference of
two large numbers), and as ``max + log(mean(exp(x - max)))`` otherwise. The gradient is written
in closed form (the tilted softmax weights), which is both exact and several times cheaper than
differentiating the formula op by op. All of this runs in float32 at least, outside autocast.

Two implementations of that one formula. On accelerators, torch ops that never wait on the device
(both branches evaluated, joined by ``torch.where``). On the CPU, float64 NumPy on the loss vector
(:func:`tilted_cpu`): a minibatch has tens of losses, and there each torch op costs ~10 us of
dispatch against ~1 us for NumPy, which kept ANRAT's step well above cross-entropy's on small
networks (``benchmarks/step_overhead.py``). Both agree to float32 rounding (a test checks it).
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from anrat.errors import InputError

LossKind = Literal["ce", "lp"]
KINDS: tuple[str, ...] = ("ce", "lp")

# Below this value of max_i t*(l_i - mean(l)) the expm1/log1p branch is used; above it, logsumexp.
# Any value of order 1 works: the expm1 branch is exact for small arguments and cannot overflow
# below ~80; logsumexp loses nothing once the correction is of order 1/t or more.
_SMALL_SPREAD = 1.0


def _check_positive(name: str, value: float | Tensor) -> None:
    if isinstance(value, Tensor):
        # Checking a tensor would force a device sync on every step; tensors come from our own
        # parameterisations (exp of a parameter), which are positive by construction.
        return
    if not math.isfinite(value) or value <= 0:
        raise InputError(f"{name} must be a finite number > 0, got {value!r}")


def per_sample_loss(input: Tensor, target: Tensor, kind: LossKind = "ce", p: float = 2.0,
                    weight: Tensor | None = None, label_smoothing: float = 0.0) -> Tensor:
    """Per-sample losses ``l_i`` of shape (N,), in float32 (or float64 for float64 input).

    kind="ce": softmax cross-entropy from logits ``input`` (N, C) or (N, C, d1, ...) with class
    indices ``target`` (N,) or (N, d1, ...) as in :class:`torch.nn.CrossEntropyLoss`; extra dims
    are summed per sample. One output column, (N,) or (N, 1), is binary logistic regression with a
    sigmoid and 0/1 (or probability) targets.

    kind="lp": ``||output_i - target_i||_p^p`` summed over all non-batch dims (regression). With
    integer class-index targets and (N, C) ``input``, the output is first mapped to class
    probabilities by a softmax and compared with one-hot targets, as the original ANRAT code did.
    """
    if kind not in KINDS:
        raise InputError(f"unknown loss kind {kind!r}; expected one of {KINDS}")
    if input.dim() == 0 or input.shape[0] != target.shape[0]:
        raise InputError(
            f"input and target must have the same batch size, got shapes {tuple(input.shape)} "
            f"and {tuple(target.shape)}")
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
                f"kind='ce' expects class-index targets (int64) of shape {tuple(input.shape[:1]) + tuple(input.shape[2:])} "
                f"or class probabilities of shape {tuple(input.shape)}, got {target.dtype} {tuple(target.shape)}")
        w = None if weight is None else weight.to(x.dtype)
        losses = F.cross_entropy(x, y, weight=w, reduction="none", label_smoothing=label_smoothing)
        return _sum_per_sample(losses)
    # kind == "lp"
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


def _sum_per_sample(values: Tensor) -> Tensor:
    """Sum over all dims but the first: (N, ...) -> (N,). Unlike ``reshape(N, -1)`` this also
    takes an empty batch (N = 0: a rank's empty shard of a small global batch)."""
    if values.dim() == 1:
        return values
    return values.reshape(values.shape[0], math.prod(values.shape[1:])).sum(dim=1)


def _log_mean_exp_centred(x: Tensor, w: Tensor | None) -> Tensor:
    """``log(sum_i w_i exp(x_i))`` (w_i = 1/m by default) for x with weighted mean 0, so >= 0.

    Small spread (max x <= 1): ``log1p(mean(expm1(x)))`` — exact for tiny x, cannot overflow.
    Otherwise: ``max + log(mean(exp(x - max)))``. Both are evaluated and joined by ``torch.where``,
    so that the step never waits on the device.
    """
    m = x.max()

    def average(v: Tensor) -> Tensor:
        return v.mean() if w is None else (w * v).sum()

    small = torch.log1p(average(torch.expm1(x.clamp(max=_SMALL_SPREAD))))
    large = m + torch.log(average(torch.exp(x - m)))
    return torch.where(m <= _SMALL_SPREAD, small, large)


def working_dtype(losses: Tensor) -> torch.dtype:
    """float64 for the scalar work of the tilted mean, except on devices without it (Apple's MPS)."""
    return torch.float32 if losses.device.type == "mps" else torch.float64


def tilted_forward(losses: Tensor, t: float | Tensor, weights: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    """The value of :func:`tilted_mean` in torch ops, without autograd: ``(value, x, centre)`` with
    ``x = t * (l - centre)``, kept for :func:`tilted_backward`. Shared with ANRAT's fused loss.

    Computed in :func:`working_dtype` (float64 where the device has it), whatever the losses'
    dtype: d value / d t at small t is a difference of two O(t * var(l)) terms, and float32's
    rounding of the mean alone would swamp it (a test shows it). Callers cast the results back.
    """
    losses = losses.to(working_dtype(losses))
    if weights is not None:
        weights = weights.to(losses.dtype)
    if isinstance(t, Tensor):
        t = t.to(losses.dtype)
    centre = losses.mean() if weights is None else (weights * losses).sum()
    x = (losses - centre).mul_(t)
    correction = _log_mean_exp_centred(x, weights).clamp_(min=0)  # >= 0 by Jensen
    return centre + correction / t, x, centre


def tilted_backward(losses: Tensor, x: Tensor, centre: Tensor, value: Tensor, t: float | Tensor,
                    weights: Tensor | None, need_t: bool) -> tuple[Tensor, Tensor | None]:
    """Closed-form gradients of the tilted mean: ``(d value / d l, d value / d t or None)``.

    d/dl_i = s_i with s = softmax(t*l + log w); d/dt = (sum_i s_i (l_i - c) - (value - c)) / t,
    c the (weighted) mean of l — written with c subtracted so that it stays accurate at small t.
    The results are in :func:`working_dtype`, as :func:`tilted_forward`'s.
    """
    losses = losses.to(working_dtype(losses))
    if weights is not None:
        weights = weights.to(losses.dtype)
    if isinstance(t, Tensor):
        t = t.to(losses.dtype)
    s = torch.softmax(x if weights is None else x + torch.log(weights), dim=0)
    dt = ((s * (losses - centre)).sum() - (value - centre)) / t if need_t else None
    return s, dt


def tilted_cpu(losses: np.ndarray, t: float, weights: np.ndarray | None = None) -> tuple[float, np.ndarray, float]:
    """The tilted mean of a loss vector in float64 NumPy, with its gradients in closed form.

    Returns ``(value, s, dvalue_dt)``: the value as :func:`tilted_mean`, the tilted weights
    ``s = softmax(t*l + log w)`` (= d value / d l) and d value / d t, by the same centred formulas
    as :func:`tilted_forward` and :func:`tilted_backward`; only the branch that applies is computed.
    """
    l = losses.astype(np.float64)
    n = l.shape[0]
    w = None if weights is None else weights.astype(np.float64, copy=False)
    # (sum / n, not .mean(): NumPy's mean costs three times as much on a vector this short)
    centre = float(l.sum()) / n if w is None else float(w @ l)
    l -= centre
    x = l * t
    m = float(x.max())
    e = np.exp(x - m)
    if m <= _SMALL_SPREAD:
        small = np.expm1(x)
        correction = math.log1p(float(small.sum()) / n if w is None else float(w @ small))
    else:
        correction = m + math.log(float(e.sum()) / n if w is None else float(w @ e))
    correction = max(correction, 0.0)  # >= 0 by Jensen
    if w is not None:
        e *= w
    e /= e.sum()  # s, the tilted weights
    dt = (float(e @ l) - correction / t) / t
    return centre + correction / t, e, dt


def cpu_gradient(s: np.ndarray, grad: Tensor, like: Tensor) -> Tensor:
    """``s * grad`` as a tensor of ``like``'s dtype (CPU; ``grad`` is 0-d)."""
    return torch.from_numpy((s * float(grad)).astype(_NUMPY_DTYPES[like.dtype], copy=False))


_NUMPY_DTYPES = {torch.float32: np.float32, torch.float64: np.float64}

# Whether CPU tensors take the NumPy path (:func:`tilted_cpu`). Tests turn it off to run the
# accelerators' torch-ops path on the CPU.
NUMPY_ON_CPU = True


def numpy_path(tensor: Tensor) -> bool:
    """Whether the tilted mean of ``tensor`` is computed by :func:`tilted_cpu`."""
    return NUMPY_ON_CPU and tensor.device.type == "cpu"


class _TiltedMean(torch.autograd.Function):
    """Value as in :func:`tilted_mean`; gradients in closed form (one softmax), not op by op."""

    @staticmethod
    def forward(ctx, losses: Tensor, t: float | Tensor, weights: Tensor | None) -> Tensor:  # type: ignore[override]
        ctx.t_is_tensor = isinstance(t, Tensor)
        if numpy_path(losses):
            value, s, dt = tilted_cpu(losses.detach().numpy(), float(t),
                                      None if weights is None else weights.detach().numpy())
            ctx.cpu = (s, dt)
            return torch.full((), value, dtype=losses.dtype)
        value, x, centre = tilted_forward(losses, t, weights)
        ctx.cpu = None
        ctx.save_for_backward(losses, x, centre, value, weights, t if ctx.t_is_tensor else None)
        ctx.t = None if ctx.t_is_tensor else t
        return value.to(losses.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        if ctx.cpu is not None:
            s, dt = ctx.cpu
            grad_t = grad * dt if ctx.needs_input_grad[1] else None
            return cpu_gradient(s, grad, grad), grad_t, None
        losses, x, centre, value, weights, t_tensor = ctx.saved_tensors
        t = t_tensor if t_tensor is not None else ctx.t
        s, dt = tilted_backward(losses, x, centre, value, t, weights, ctx.needs_input_grad[1])
        grad_t = (grad * dt).to(t_tensor.dtype) if dt is not None and t_tensor is not None else None
        return (s * grad).to(losses.dtype), grad_t, None


def tilted_mean(losses: Tensor, t: float | Tensor, weights: Tensor | None = None) -> Tensor:
    """``(1/t) * log(sum_i w_i * exp(t * l_i))`` over a 1-D tensor, stable for any t in [1e-8, 1e8].

    ``weights`` are nonnegative and sum to 1 (default: uniform 1/m); this is NRAE of the losses.
    Differentiable in ``losses`` (gradient: the tilted weights ``softmax(t*l + log w)``) and in
    ``t`` when it is a tensor. Computed in float32 at least, whatever the input dtype or autocast.
    """
    _check_positive("t", t)
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
            return _TiltedMean.apply(l, t, w)
    return _TiltedMean.apply(l, t, w)


def _lam_to_t(lam: float | Tensor, p: float) -> float | Tensor:
    _check_positive("lam", lam)
    if not (math.isfinite(p) and p > 0):
        raise InputError(f"p must be a finite number > 0, got {p!r}")
    return lam ** p


def nrae(input: Tensor, target: Tensor, lam: float | Tensor, p: float = 2.0, kind: LossKind = "ce",
         **loss_kwargs) -> Tensor:
    """Normalized risk-averting error ``log(mean_i exp(t * l_i)) / t`` with ``t = lam ** p``.

    Scalar tensor; finite for every t from 1e-8 to 1e8 in float32 and float64; equals mean(l) as
    t -> 0 and max(l) as t -> inf, and never falls below mean(l). ``loss_kwargs`` go to
    :func:`per_sample_loss` (``weight``, ``label_smoothing``).
    """
    return tilted_mean(per_sample_loss(input, target, kind, p, **loss_kwargs), _lam_to_t(lam, p))


def rae(input: Tensor, target: Tensor, lam: float | Tensor, p: float = 2.0, kind: LossKind = "ce",
        **loss_kwargs) -> Tensor:
    """Risk-averting error ``mean_i exp(t * l_i)``, ``t = lam ** p``.

    Overflows to inf once ``t * max(l)`` exceeds log of the dtype's largest value (about 88.7 in
    float32): that is its nature, and why training uses :func:`nrae`; see :func:`rae_feasible`.
    """
    t = _lam_to_t(lam, p)
    losses = per_sample_loss(input, target, kind, p, **loss_kwargs)
    return torch.exp(t * losses).mean()


def rae_feasible(input: Tensor, target: Tensor, lam: float | Tensor, p: float = 2.0, kind: LossKind = "ce",
                 dtype: torch.dtype | None = None, **loss_kwargs) -> bool:
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


__all__ = ["KINDS", "losses_rae_feasible", "nrae", "per_sample_loss", "rae", "rae_feasible", "tilted_mean"]
