"""Fisher information of a trained network, estimated on data, for the pruning stage's Wald tests.

Likelihoods (``loss``)
----------------------
``loss`` is anrat's loss kind (:data:`anrat.functional.LossKind`, what the network was trained
with); :meth:`Likelihood.of` derives the likelihood from it. The network maps an input x to
outputs z = f(x; theta) of shape (N, K). The per-sample negative log-likelihood l(theta; x, y) is

- ``"ce"``, K >= 2: softmax cross-entropy, l = -log pi_y with pi = softmax(z), y a class index;
- ``"ce"``, K == 1: logistic cross-entropy, l = -y log p - (1 - y) log(1 - p), p = sigmoid(z),
  y in [0, 1] (0/1 labels or probabilities);
- ``"lp"``: Gaussian regression y ~ N(z, sigma^2 I), l = ||y - z||^2 / (2 sigma^2) + const (the
  likelihood behind the p = 2 loss; ``"mse"``, this module's earlier name, is read as ``"lp"``), with
  sigma^2 the maximum-likelihood residual mean square mean_{i,k} (y_ik - z_ik)^2 over the samples
  used (no degrees-of-freedom correction: standard errors are sqrt((n - p) / n) times those of an
  OLS table that divides the residual sum of squares by n - p).

Which Fisher (``fisher``)
-------------------------
All estimates are of the *per-sample* Fisher information F (units: 1 / parameter^2 per sample), so
that Var(theta_hat) ~= F^-1 / n for a model fitted on n samples.

- ``"model"`` (the default): F = E_x E_{y ~ p(y | x, theta)} [grad l grad l^T] = E_x [J^T M J] with
  J = dz/dtheta and M the Fisher information of the output distribution in z: diag(pi) - pi pi^T
  (softmax), p (1 - p) (sigmoid), I / sigma^2 (Gaussian). The expectation over y is taken exactly,
  not by sampling labels. For these canonical links M does not depend on y, so F is the expected
  Hessian of l and, for a single Linear layer, also the observed Hessian: the covariance that
  ``statsmodels`` reports for ``Logit``/``MNLogit``/``OLS``.
- ``"empirical"``: F_emp = mean_i grad l_i grad l_i^T at the observed y_i (the outer product of
  gradients). It equals the model Fisher in expectation only when the model is correctly specified
  and is noisier; it does not reproduce the standard maximum-likelihood standard errors.

Both are computed as F = mean_i sum_m (J_i^T v_im)(J_i^T v_im)^T from output-space "cotangents"
v_im (:meth:`Likelihood.cotangents`): for the model Fisher the rows of a square root B of M
(B^T B = M) -- for softmax B_k = sqrt(pi_k) (pi - e_k), K rows, since
sum_k pi_k (pi - e_k)(pi - e_k)^T = diag(pi) - pi pi^T; for sigmoid sqrt(p (1 - p)); for Gaussian
e_k / sigma -- and for the empirical Fisher the one observed output gradient dl/dz. Each J^T v is
one vector-Jacobian product, so the model Fisher costs K backward passes per sample and the
empirical Fisher one.

Estimators
----------
The computations behind the estimator objects of :mod:`pruning.estimators`. All three are
block-diagonal across layers (cross-layer correlations are ignored); parameters of
layers not tested are held at their fitted values.

- :func:`diagonal_fisher`: F_jj for every tested parameter, from per-sample gradients
  (``torch.func``: ``functional_call`` + ``vmap`` + ``grad``). Time O(N K P), memory O(P) plus one
  chunk of per-sample gradients, P the number of tested parameters.
- :func:`dense_fisher`: the dense per-layer block over (weight, bias), from the same per-sample
  gradients. Time O(N K sum_l P_l^2), memory O(sum_l P_l^2); only for small layers.
- :func:`kfac_factors`: the Kronecker factors of KFAC (Martens & Grosse 2015) and, for Conv2d,
  KFC (Grosse & Martens 2016): with a_t the layer input at location t (for Conv2d the unfolded
  receptive-field patch, ``torch.nn.functional.unfold``), extended by a 1 for the bias, and g_t the
  gradient of the cotangent-contracted output w.r.t. the layer output at t,

      A = E_x[(1/T) sum_t a_t a_t^T],   G = E_x[sum_m sum_t g_mt g_mt^T],   F_layer ~= G (x) A

  for the weight matrix W~ = [W | b] (Conv2d weights flattened to (out, in * kh * kw)) flattened
  row by row. For a Linear layer on (N, in) inputs T = 1 and this is plain KFAC; with extra
  dimensions (N, ..., in) each position counts as a location, as for Conv2d. It needs no
  per-sample parameter gradients: one forward and K backward passes to the layer outputs per
  batch, then time O(N sum_l T_l (d_in,l^2 + K d_out,l^2)) and memory O(sum_l d_in,l^2 + d_out,l^2).
  It covers Linear layers and Conv2d layers with groups=1 and zero, numeric padding
  (:meth:`pruning.estimators.KfacEstimator.check_layers` refuses the others).

Gradients and forward passes run on the model's device in the model's dtype; the sums are
accumulated in float64 (the products for KFAC's A are formed in float64) and returned on the CPU.
The model is put in eval mode while the Fisher is estimated (dropout off, batch-norm statistics
fixed, samples independent) and restored afterwards.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from anrat.data import as_split
from anrat.errors import InputError
from anrat.functional import KINDS, LossKind
from pruning.layers import bias_name, eval_mode, output_layer, weight_name

FISHERS: tuple[str, ...] = ("model", "empirical")
# The loss name this module took for "lp" before the pruning API spoke anrat's loss kinds.
_LOSS_ALIASES: dict[str, LossKind] = {"mse": "lp"}

# Upper bound on one chunk of per-sample gradients (chunk * cotangents * parameters * item size).
# The per-sample-gradient estimators split each batch into chunks no larger than this, which keeps
# memory bounded on a 431k-parameter LeNet-5 with 10 cotangents per sample (~14 samples a chunk).
GRAD_MEMORY_BYTES = 256 * 2**20


# ---- inputs ---------------------------------------------------------------------------------------


def as_tensors(data: Any) -> tuple[Tensor, Tensor]:
    """``(x, y)`` from a pair of tensors, an object with ``.x`` and ``.y`` (``anrat.data.Split``), or
    a ``Dataset`` / ``DataLoader`` (read into memory by :func:`anrat.data.as_split`)."""
    if isinstance(data, (tuple, list)) and len(data) == 2:
        x, y = data
    elif hasattr(data, "x") and hasattr(data, "y"):
        x, y = data.x, data.y
    elif isinstance(data, (Dataset, DataLoader)):
        split = as_split(data)
        x, y = split.x, split.y
    else:
        raise InputError(
            f"data must be a pair of tensors (x, y), an object with .x and .y like anrat.data.Split, a Dataset "
            f"or a DataLoader, got {type(data).__name__}"
        )
    if not isinstance(x, Tensor) or not isinstance(y, Tensor):
        raise InputError(f"data x and y must be torch tensors, got {type(x).__name__} and {type(y).__name__}")
    if x.ndim == 0 or y.ndim == 0 or x.shape[0] != y.shape[0]:
        raise InputError(
            f"data needs one target per input, got x of shape {tuple(x.shape)} and y of shape {tuple(y.shape)}"
        )
    if x.shape[0] == 0:
        raise InputError("data is empty")
    if not x.is_floating_point():
        raise InputError(f"data x must be a floating-point tensor (normalised inputs), got dtype {x.dtype}")
    return x, y


def _positive_int(name: str, value: int | None, allow_none: bool) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InputError(f"{name} must be a positive integer{' or None' if allow_none else ''}, got {value!r}")


def model_device_dtype(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    for parameter in model.parameters():
        if parameter.is_floating_point():
            return parameter.device, parameter.dtype
    raise InputError(f"model {type(model).__name__} has no floating-point parameters")


def _expected_input(module: nn.Module) -> str:
    if isinstance(module, nn.Conv2d):
        return f"(N, {module.in_channels}, H, W)"
    if isinstance(module, nn.Linear):
        return f"(N, ..., {module.in_features})"
    return f"what {type(module).__name__} accepts"


def _probe_forward(model: nn.Module, x: Tensor) -> Tensor:
    """Forward ``x`` once (no grad), returning the outputs; a shape mismatch becomes an
    InputError naming the layer that failed and the input the model expects."""
    entered: list[tuple[str, nn.Module, tuple[int, ...]]] = []
    handles = []
    for name, module in model.named_modules():
        if next(module.children(), None) is not None:
            continue  # containers: only leaves say which computation failed

        def pre_hook(mod: nn.Module, inputs: tuple[Any, ...], name: str = name) -> None:
            shape = tuple(inputs[0].shape) if inputs and isinstance(inputs[0], Tensor) else ()
            entered.append((name, mod, shape))

        handles.append(module.register_forward_pre_hook(pre_hook))
    try:
        with torch.no_grad():
            z = model(x)
    except RuntimeError as exc:
        first = next((e for e in entered if any(True for _ in e[1].parameters())), entered[0] if entered else None)
        where = ""
        if entered:
            name, module, shape = entered[-1]
            where = f"; layer {name!r} ({type(module).__name__}, expects {_expected_input(module)}) received {shape}"
        failed_first = bool(entered) and first is not None and entered[-1][0] == first[0]
        expects = (
            ""
            if first is None or failed_first
            else f"; the first layer {first[0]!r} expects input of shape {_expected_input(first[1])}"
        )
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise InputError(
            f"data x of shape {tuple(x.shape)} does not fit the model{where}{expects} (torch: {reason})"
        ) from None
    finally:
        for handle in handles:
            handle.remove()
    if not isinstance(z, Tensor) or z.ndim != 2:
        shape = tuple(z.shape) if isinstance(z, Tensor) else type(z).__name__
        raise InputError(f"the model must return a (N, K) tensor of outputs, got {shape}")
    return z


# ---- the likelihood -------------------------------------------------------------------------------


def _loss_kind(loss: str) -> LossKind:
    """anrat's loss kind named by ``loss`` (``"mse"`` is read as ``"lp"``)."""
    kind = _LOSS_ALIASES.get(loss, loss) if isinstance(loss, str) else loss
    if kind not in KINDS:
        raise InputError(f"unknown loss {loss!r}; expected one of {list(KINDS)} (anrat's loss kinds)")
    return kind


@dataclass(frozen=True)
class Likelihood:
    """The output distribution behind a loss kind (an implementation detail of the Fisher
    estimate): ``kind`` is "softmax", "sigmoid" or "gaussian"; ``sigma2`` the Gaussian noise
    variance (maximum-likelihood estimate), else None."""

    kind: str
    num_outputs: int
    sigma2: float | None = None

    @classmethod
    def of(cls, loss: LossKind, num_outputs: int, sigma2: float | None = None) -> Likelihood:
        """The likelihood of a network with ``num_outputs`` outputs trained with anrat's loss
        kind ``loss``: "ce" is softmax (K >= 2) or sigmoid (K = 1), "lp" Gaussian; "true_class_sq"
        ((1 - p_y)^r, another criterion on the same softmax outputs) is read as "ce"'s softmax."""
        kind = "gaussian" if loss == "lp" else ("sigmoid" if num_outputs == 1 else "softmax")
        return cls(kind, num_outputs, sigma2)

    def num_cotangents(self, fisher: str) -> int:
        return 1 if fisher == "empirical" or self.kind == "sigmoid" else self.num_outputs

    def cotangents(self, z: Tensor, y: Tensor, fisher: str) -> Tensor:
        """Cotangents v of shape (B, m, K) such that the per-sample Fisher is
        sum_m (J^T v_m)(J^T v_m)^T (see the module docstring), in ``z``'s dtype and device."""
        z64 = z.detach().to(torch.float64)
        if self.kind == "softmax":
            pi = torch.softmax(z64, dim=1)
            if fisher == "model":  # rows sqrt(pi_k) (pi - e_k)
                eye = torch.eye(self.num_outputs, dtype=z64.dtype, device=z.device)
                v = pi.sqrt().unsqueeze(2) * (pi.unsqueeze(1) - eye)
            else:
                v = (pi - F.one_hot(y.long(), self.num_outputs).to(z64.dtype)).unsqueeze(1)
        elif self.kind == "sigmoid":
            p = torch.sigmoid(z64)
            v = (p * (1 - p)).sqrt() if fisher == "model" else p - y.to(z64.dtype).reshape(p.shape)
            v = v.unsqueeze(1)
        else:
            assert self.sigma2 is not None
            if fisher == "model":  # rows e_k / sigma
                eye = torch.eye(self.num_outputs, dtype=z64.dtype, device=z.device)
                v = eye.expand(z.shape[0], -1, -1) / math.sqrt(self.sigma2)
            else:
                v = ((z64 - y.to(z64.dtype).reshape(z64.shape)) / self.sigma2).unsqueeze(1)
        return v.to(z.dtype)


@dataclass
class FisherData:
    """Validated data for a Fisher estimate: the ``x``/``y`` used (a seeded random subsample of at
    most ``max_samples``, kept on the data's device), ``n_data`` (samples in the data given),
    the ``likelihood``, and ``output_layer``: the tested layer whose output is the network's
    output (None if no tested layer is)."""

    x: Tensor
    y: Tensor
    n_data: int
    likelihood: Likelihood
    output_layer: str | None
    # Per-sample weights of the outer products (float64, one per sample used; None: all 1): the
    # sandwich covariance weights each sample's terms by its tilted weight (pruning.significance).
    weights: Tensor | None = None

    @property
    def n_used(self) -> int:
        return self.x.shape[0]

    def batches(self, batch_size: int) -> Iterator[tuple[Tensor, Tensor]]:
        for start in range(0, self.n_used, batch_size):
            yield self.x[start : start + batch_size], self.y[start : start + batch_size]

    def weight_batches(self, batch_size: int) -> Iterator[Tensor | None]:
        """The weights of the samples of each of :meth:`batches` (None when unweighted)."""
        for start in range(0, self.n_used, batch_size):
            yield None if self.weights is None else self.weights[start : start + batch_size]


def prepare(
    model: nn.Module,
    data: Any,
    *,
    loss: LossKind = "ce",
    layers: Mapping[str, nn.Module] | None = None,
    max_samples: int | None = 10_000,
    batch_size: int = 256,
    seed: int = 0,
) -> FisherData:
    """Check ``data`` against ``model`` and ``loss`` (anrat's loss kind, "ce" or "lp") and draw
    the samples for the Fisher estimate.

    When ``data`` holds more than ``max_samples`` samples, ``max_samples`` of them are drawn
    without replacement by a CPU generator seeded with ``seed`` (None: use all). For ``"lp"`` the
    noise variance sigma^2 is estimated here on the samples drawn. ``output_layer`` is the one of
    ``layers`` that :func:`pruning.layers.output_layer` finds, if any.
    """
    loss = _loss_kind(loss)
    _positive_int("max_samples", max_samples, allow_none=True)
    _positive_int("batch_size", batch_size, allow_none=False)
    x, y = as_tensors(data)
    device, dtype = model_device_dtype(model)
    n_data = x.shape[0]
    probe = x[:batch_size].to(device=device, dtype=dtype)
    with eval_mode(model):
        z = _probe_forward(model, probe)
    likelihood = Likelihood.of(loss, z.shape[1])
    y = _check_targets(y, likelihood.kind, likelihood.num_outputs, n_data)
    if max_samples is not None and n_data > max_samples:
        generator = torch.Generator().manual_seed(seed)
        index = torch.randperm(n_data, generator=generator)[:max_samples].to(x.device)
        x, y = x[index], y[index]
    produced_by = output_layer(model, probe)
    tested_output = produced_by if produced_by in (layers or {}) else None
    if likelihood.kind == "gaussian":
        likelihood = replace(likelihood, sigma2=_residual_variance(model, x, y, batch_size, device, dtype))
    return FisherData(x, y, n_data, likelihood, tested_output)


def _check_targets(y: Tensor, kind: str, num_outputs: int, n: int) -> Tensor:
    if kind == "softmax":
        if y.shape != (n,) or y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
            raise InputError(
                f"loss 'ce' with {num_outputs} outputs needs y of integer class indices with shape ({n},), "
                f"got dtype {y.dtype} and shape {tuple(y.shape)}"
            )
        if int(y.min()) < 0 or int(y.max()) >= num_outputs:
            raise InputError(f"class indices in y must lie in 0..{num_outputs - 1}, got {int(y.min())}..{int(y.max())}")
        return y.long()
    if kind == "sigmoid":
        if y.shape not in ((n,), (n, 1)):
            raise InputError(
                f"loss 'ce' with one output (binary logistic) needs y of shape ({n},) or ({n}, 1), got {tuple(y.shape)}"
            )
        y = y.reshape(n).to(torch.float64)
        if not bool(((y >= 0) & (y <= 1)).all()):
            raise InputError("loss 'ce' with one output (binary logistic) needs targets y in [0, 1]")
        return y
    if y.shape != (n, num_outputs) and not (num_outputs == 1 and y.shape == (n,)):
        raise InputError(
            f"loss 'lp' (Gaussian) needs y of shape ({n}, {num_outputs}) like the model's output, got {tuple(y.shape)}"
        )
    if not y.is_floating_point() or not bool(torch.isfinite(y).all()):
        raise InputError("loss 'lp' (Gaussian) needs finite floating-point targets y")
    return y.reshape(n, num_outputs)


def _residual_variance(
    model: nn.Module, x: Tensor, y: Tensor, batch_size: int, device: torch.device, dtype: torch.dtype
) -> float:
    total = torch.zeros((), dtype=torch.float64, device=device)
    with eval_mode(model), torch.no_grad():
        for start in range(0, x.shape[0], batch_size):
            z = model(x[start : start + batch_size].to(device=device, dtype=dtype))
            residual = z.to(torch.float64) - y[start : start + batch_size].to(device=device, dtype=torch.float64)
            total += residual.square().sum()
    sigma2 = float(total) / y.numel()
    if not sigma2 > 0 or not math.isfinite(sigma2):
        raise InputError(
            f"loss 'lp' (Gaussian): the residual variance is {sigma2}; the Gaussian likelihood needs residuals that "
            f"are not all zero"
        )
    return sigma2


def _check_fisher(fisher: str) -> None:
    if fisher not in FISHERS:
        raise InputError(f"unknown fisher {fisher!r}; expected one of {list(FISHERS)}")


def _progress(total: int, progress: bool, what: str) -> tqdm:
    return tqdm(total=total, unit="sample", desc=what, disable=not progress, leave=False)


# ---- per-sample gradients ---------------------------------------------------------------------------


def per_sample_grads(model: nn.Module, x: Tensor, cotangents: Tensor, names: Sequence[str]) -> dict[str, Tensor]:
    """J_i^T v_im for every sample i and cotangent m: the gradient of <v_im, f(x_i; theta)> w.r.t.
    the parameters ``names``, of shape (B, m, *parameter.shape), by ``torch.func``
    (``functional_call`` + ``vmap`` over cotangents and samples + ``grad``).

    ``x`` is (B, ...) on the model's device, ``cotangents`` (B, m, K). The model should be in eval
    mode (``vmap`` refuses random dropout). Other parameters and buffers are held fixed.
    """
    params = dict(model.named_parameters())
    tested = {name: params[name].detach() for name in names}
    fixed = {name: p.detach() for name, p in params.items() if name not in tested}
    buffers = dict(model.named_buffers())

    def contracted_output(tested_params: dict[str, Tensor], x_i: Tensor, v_im: Tensor) -> Tensor:
        z = functional_call(model, (tested_params, fixed, buffers), (x_i.unsqueeze(0),))
        return (z.squeeze(0) * v_im).sum()

    over_cotangents = vmap(grad(contracted_output), in_dims=(None, None, 0))
    over_samples = vmap(over_cotangents, in_dims=(None, 0, 0))
    return over_samples(tested, x, cotangents)


def _grad_chunks(
    model: nn.Module, fd: FisherData, names: Sequence[str], fisher: str, batch_size: int, progress: bool, what: str
) -> Iterator[dict[str, Tensor]]:
    """Per-sample gradients (:func:`per_sample_grads`) over the samples of ``fd``, chunk by chunk,
    each chunk within ``GRAD_MEMORY_BYTES``."""
    _check_fisher(fisher)
    device, dtype = model_device_dtype(model)
    params = dict(model.named_parameters())
    m = fd.likelihood.num_cotangents(fisher)
    per_sample_bytes = m * sum(params[name].numel() for name in names) * params[names[0]].element_size()
    chunk = max(1, min(batch_size, GRAD_MEMORY_BYTES // max(per_sample_bytes, 1)))
    with eval_mode(model), _progress(fd.n_used, progress, what) as bar:
        for (xb, yb), wb in zip(fd.batches(batch_size), fd.weight_batches(batch_size)):
            xb = xb.to(device=device, dtype=dtype)
            with torch.no_grad():
                v = fd.likelihood.cotangents(model(xb), yb.to(device), fisher)
            if wb is not None:  # w_i (J^T v)(J^T v)^T = (J^T sqrt(w_i) v)(...)^T
                v = v * wb.to(device=device, dtype=torch.float64).sqrt().to(v.dtype)[:, None, None]
            for start in range(0, xb.shape[0], chunk):
                yield per_sample_grads(model, xb[start : start + chunk], v[start : start + chunk], names)
                bar.update(min(chunk, xb.shape[0] - start))


def diagonal_fisher(
    model: nn.Module,
    fd: FisherData,
    names: Sequence[str],
    *,
    fisher: str = "model",
    batch_size: int = 256,
    progress: bool = False,
) -> dict[str, Tensor]:
    """Diagonal of the per-sample Fisher, F_jj = mean_i w_i sum_m (J_i^T v_im)_j^2 (w_i: ``fd.weights``,
    else 1), for the parameters ``names``: float64 tensors of the parameters' shapes, on the CPU."""
    sums: dict[str, Tensor] = {}
    for grads in _grad_chunks(model, fd, names, fisher, batch_size, progress, "diagonal Fisher"):
        for name, g in grads.items():
            square = g.to(torch.float64).square().sum(dim=(0, 1))
            sums[name] = sums[name] + square if name in sums else square
    return {name: (total / fd.n_used).cpu() for name, total in sums.items()}


def dense_fisher(
    model: nn.Module,
    fd: FisherData,
    layers: Mapping[str, nn.Module],
    *,
    fisher: str = "model",
    batch_size: int = 256,
    progress: bool = False,
) -> dict[str, Tensor]:
    """Dense per-sample Fisher block of each layer, mean_i w_i sum_m (J_i^T v_im)(J_i^T v_im)^T (w_i:
    ``fd.weights``, else 1), over its parameters in the order ``[weight.flatten(), bias]`` (bias
    omitted when the layer has none): float64 (P_l, P_l) on the CPU."""
    layer_params = {
        layer: [weight_name(layer)] + ([bias_name(layer)] if getattr(module, "bias", None) is not None else [])
        for layer, module in layers.items()
    }
    names = [name for group in layer_params.values() for name in group]
    sums: dict[str, Tensor] = {}
    for grads in _grad_chunks(model, fd, names, fisher, batch_size, progress, "dense Fisher"):
        for layer, group in layer_params.items():
            scores = torch.cat([grads[name].flatten(2) for name in group], dim=2).flatten(0, 1).to(torch.float64)
            block = scores.T @ scores
            sums[layer] = sums[layer] + block if layer in sums else block
    return {layer: (total / fd.n_used).cpu() for layer, total in sums.items()}


# ---- Kronecker factors ----------------------------------------------------------------------------


@dataclass(frozen=True)
class KroneckerFactors:
    """KFAC/KFC factors of one layer (see the module docstring): ``A`` over the layer input
    extended by a 1 when ``has_bias`` ((d_in + 1) square, d_in = in_channels * kh * kw for Conv2d),
    ``G`` over the output units (d_out square), float64 on the CPU; F_layer ~= G (x) A."""

    A: Tensor
    G: Tensor
    has_bias: bool


def layer_input_patches(module: nn.Module, inputs: Tensor) -> Tensor:
    """The layer's input as (B, T, d_in) locations x features, extended by a column of ones when
    the layer has a bias: Linear (B, ..., in) -> T = prod(...); Conv2d (B, C, H, W) -> the
    receptive-field patches of the T = H' W' output locations, features in the order of
    ``weight[o].flatten()`` (channel, kernel row, kernel column), as ``torch.nn.functional.unfold``
    orders them."""
    if isinstance(module, nn.Conv2d):
        # Strided views instead of F.unfold: the same patches, but im2col on the CPU is ~50x slower.
        (kh, kw), (sh, sw), (dh, dw) = module.kernel_size, module.stride, module.dilation
        ph, pw = (0, 0) if isinstance(module.padding, str) else module.padding
        padded = F.pad(inputs, (pw, pw, ph, ph))
        windows = padded.unfold(2, dh * (kh - 1) + 1, sh).unfold(3, dw * (kw - 1) + 1, sw)[..., ::dh, ::dw]
        patches = windows.permute(0, 2, 3, 1, 4, 5).reshape(inputs.shape[0], -1, inputs.shape[1] * kh * kw)
    else:
        patches = inputs.reshape(inputs.shape[0], -1, inputs.shape[-1])
    if module.bias is not None:
        patches = torch.cat([patches, patches.new_ones(patches.shape[:2] + (1,))], dim=2)
    return patches


def _output_locations(module: nn.Module, grad_output: Tensor) -> Tensor:
    """Gradient w.r.t. the layer output as (B * T, d_out)."""
    if isinstance(module, nn.Conv2d):
        grad_output = grad_output.movedim(1, -1)
    return grad_output.reshape(-1, grad_output.shape[-1])


def kfac_factors(
    model: nn.Module,
    fd: FisherData,
    layers: Mapping[str, nn.Module],
    *,
    fisher: str = "model",
    batch_size: int = 256,
    progress: bool = False,
) -> dict[str, KroneckerFactors]:
    """KFAC/KFC factors A and G of each layer (module docstring), estimated on the samples of ``fd``;
    the layers must pass :meth:`pruning.estimators.KfacEstimator.check_layers`.

    The gradients g w.r.t. layer outputs come from one batched backward pass per cotangent: the
    model treats samples independently in eval mode, so the gradient of sum_i <v_im, z_i> w.r.t.
    the output of sample i is that sample's own gradient.
    """
    _check_fisher(fisher)
    if fd.weights is not None:
        raise InputError(
            "the KFAC factors take no per-sample weights (the sandwich covariance needs 'full' or 'diagonal')"
        )
    device, dtype = model_device_dtype(model)
    m = fd.likelihood.num_cotangents(fisher)
    A: dict[str, Tensor] = {}
    G: dict[str, Tensor] = {}
    captured: dict[str, tuple[Tensor, Tensor]] = {}

    def make_hook(name: str) -> Callable[..., None]:
        def hook(module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
            captured[name] = (inputs[0].detach(), output)

        return hook

    handles = [module.register_forward_hook(make_hook(name)) for name, module in layers.items()]
    try:
        with eval_mode(model), torch.enable_grad(), _progress(fd.n_used, progress, "KFAC factors") as bar:
            for xb, yb in fd.batches(batch_size):
                # Inputs that require grad make every layer output part of the graph even when the
                # parameters are frozen.
                xb = xb.to(device=device, dtype=dtype).requires_grad_(True)
                captured.clear()
                z = model(xb)
                v = fd.likelihood.cotangents(z, yb.to(device), fisher)
                names = [name for name in layers if name in captured]
                for name in names:
                    patches = layer_input_patches(layers[name], captured[name][0])
                    # float64 products: A is often rank-deficient (fewer samples than inputs, or
                    # collinear inputs), and float32 rounding would leave it indefinite.
                    flat = patches.reshape(-1, patches.shape[-1]).to(torch.float64)
                    a_block = (flat.T @ flat) / patches.shape[1]
                    A[name] = A[name] + a_block if name in A else a_block
                outputs = [captured[name][1] for name in names]
                for k in range(m):
                    grads = torch.autograd.grad(
                        z, outputs, grad_outputs=v[:, k], retain_graph=k < m - 1, allow_unused=True
                    )
                    for name, g in zip(names, grads):
                        if g is None:  # the layer does not reach the output
                            g = torch.zeros_like(captured[name][1])
                        flat = _output_locations(layers[name], g)
                        g_block = (flat.T @ flat).to(torch.float64)
                        G[name] = G[name] + g_block if name in G else g_block
                bar.update(xb.shape[0])
    finally:
        for handle in handles:
            handle.remove()
    missing = [name for name in layers if name not in A]
    if missing:
        raise InputError(f"layer(s) {missing} are never called in the model's forward pass; nothing to test there")
    return {
        name: KroneckerFactors((A[name] / fd.n_used).cpu(), (G[name] / fd.n_used).cpu(), layers[name].bias is not None)
        for name in layers
    }


__all__ = [
    "FISHERS",
    "FisherData",
    "KroneckerFactors",
    "as_tensors",
    "dense_fisher",
    "diagonal_fisher",
    "kfac_factors",
    "layer_input_patches",
    "per_sample_grads",
    "prepare",
]
