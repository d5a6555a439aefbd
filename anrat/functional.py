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
# on the host) (docs/results.md).
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


__all__ = [
    "KINDS",
    "TILTED_BACKENDS",
    "LossKind",
    "TiltedBackend",
    "error_exponent",
    "losses_rae_feasible",
    "nrae",
    "per_sample_loss",
    "rae",
    "rae_feasible",
    "tilted_mean",
]
