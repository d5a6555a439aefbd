"""Wald tests of the weights of a trained network: which connections and units are significant.

The tests
---------
For each weight w_j of the tested ``nn.Linear`` / ``nn.Conv2d`` layers (biases are not tested),
H0: w_j = 0 is tested with the Wald statistic

    z_j = w_j / se_j,   se_j = sqrt([F^-1]_jj / n),   p_j = 2 * scipy.stats.norm.sf(|z_j|),

where F is the per-sample Fisher information of the likelihood behind ``loss`` (anrat's loss kind:
"ce" softmax or logistic, "lp" Gaussian; :mod:`pruning.fisher`) estimated on the
training data (default: the model Fisher) and n the number of samples the
model was fitted on (``n_fit``; default: all samples in ``data``, even when the Fisher itself is
estimated on a subsample of ``max_samples``). That is, Var(w_hat) = F^-1 / n. ``norm.sf`` keeps
small p-values accurate where ``1 - cdf`` would round to 0.

A unit -- a row of a Linear weight (a neuron's incoming weights) or an output channel of a Conv2d
weight (a filter) -- is tested with H0: all its weights are 0, by the Wald chi-square

    chi2_g = w_g^T Cov_g^-1 w_g,   df = number of weights in the unit,   p_g = scipy.stats.chi2.sf(chi2_g, df),

with Cov_g the unit's block of the estimated covariance F^-1 / n. A unit whose incoming weights
are all zero outputs a constant (its bias through the activation), which the next layer's bias can
absorb, so such a unit is redundant.

Each family -- all tested weights together, and all tested units together -- is corrected for
multiple testing with ``statsmodels.stats.multitest.multipletests`` using ``method`` (default
Holm, which controls the family-wise error rate at ``alpha``). A weight or unit is kept
(``significant``) when its H0 is rejected and pruned when it is not.

Estimators of the covariance (``estimator``)
--------------------------------------------
Each is an object of :mod:`pruning.estimators` (``estimator`` takes its name or the object).
All are block-diagonal across layers: each layer's block is inverted on its own (cross-layer
correlations are ignored; this also keeps the tests well posed under the rescaling symmetry of
ReLU networks, whose null directions of the Fisher span two layers). P_l is a layer's parameter
count, d_in its fan-in (+1 for the bias), d_out its units, K the number of outputs, N the samples
used.

- ``"kfac"`` (the default): F_layer ~= G (x) A (Kronecker factors, :func:`pruning.fisher.kfac_factors`),
  so F_layer^-1 ~= G^-1 (x) A^-1 and the variance of W[i, j] is [G^-1]_ii [A^-1]_jj / n: the exact
  diagonal of the approximate inverse, cheap as the outer product of the two inverses' diagonals.
  A unit's block is [G^-1]_ii [A^-1]_ww / n (ww: the weight part, bias excluded), so every unit
  of a layer shares one d_in x d_in matrix. Time O(N K (forward + backward) + N sum_l T_l (d_in^2 +
  K d_out^2) + sum_l (d_in^3 + d_out^3)), memory O(sum_l d_in^2 + d_out^2): seconds to minutes for
  LeNet-5 (fc1 has 400,000 weights but factors of 801^2 and 500^2). It is the default because it
  scales to such layers, where ``"full"`` cannot, and unlike ``"diagonal"`` it accounts for the
  correlations among a layer's inputs and among its outputs. It is exact when the output-side
  factor does not vary with the input, e.g. a single Linear layer with Gaussian ("lp") loss or a
  logistic layer whose predictions do not depend on x, and an approximation otherwise.
- ``"full"``: the dense per-layer Fisher over (weight, bias), inverted exactly (a Cholesky
  factorisation). For a model that is a single Linear layer this reproduces the maximum-likelihood
  standard errors of ``statsmodels`` Logit/MNLogit/OLS. Time O(N K sum_l P_l^2 + sum_l P_l^3),
  memory O(sum_l P_l^2); refused for layers with more than ``DENSE_MAX_PARAMS`` parameters.
- ``"diagonal"``: se_j = 1 / sqrt(n F_jj). Time O(N K P), memory O(P). Note 1 / F_jj <= [F^-1]_jj
  (equality only when parameter j is uncorrelated with the others in the layer): this estimator
  understates the standard errors and so keeps too many weights; it is offered as the cheapest
  and for comparison. The unit statistic is sum_g z_j^2. For the softmax output layer (below) it
  is the pseudo-inverse of the diagonal on the identified subspace, which for that layer errs the
  other way (it drops the negative coupling -E[pi_k pi_k' x_j^2] between classes).

Damping and the singular Fisher
-------------------------------
Each matrix M that is inverted (the dense block, or each of A and G) gets Tikhonov damping
M + lambda I with lambda = ``damping`` * mean(diag M), relative so that it does not depend on the
scale of the data; ``"diagonal"`` adds lambda = ``damping`` * mean_j F_jj of the layer to F_jj.
The default 1e-6 changes well-determined standard errors by about 1e-6 relative, while directions
the data do not determine (a dead ReLU unit, an input that is always zero) get variances of order
1 / lambda, so their weights are not significant and are pruned, as they should be. A layer whose
Fisher is exactly zero (it cannot affect the output) gets se = inf, z = 0, p = 1.

The softmax over-parameterisation is handled explicitly, not by damping: with K >= 2 classes,
adding the same number to every class's weight from input j (W[:, j] += c), or to every bias,
leaves all predictions unchanged, so the output layer's Fisher is exactly singular along these
directions (for KFAC: G 1 = 0). A weight of such a "free" column is identified only after a
choice of representative; we take the sum-to-zero one: the weights tested are the centred
W[k, j] - mean_k' W[k', j], and the covariance is the damped Moore-Penrose pseudo-inverse on the
orthogonal complement of the shift directions (the generalised inverse that corresponds to that
constraint). Predictions are unchanged by centring; call :func:`center_softmax_layer` on that
layer before applying its masks so that the pruned weights are the ones that were tested.

A column that already holds an exact zero (a pruned weight, or statsmodels' reference class) is
identified by it: it is neither centred nor projected, its zero entries are treated as fixed (not
parameters; se = inf, z = 0) and the other entries are tested as they are. ``"full"`` then
inverts the Fisher block of the remaining parameters (exact); ``"diagonal"`` uses 1 / F_jj;
``"kfac"`` uses [A^-1]_jj [(G_SS)^-1]_kk with S the column's non-zero classes (exact for the
Kronecker model only when A is diagonal; the output layer's unit statistics keep the free-column
form). Exact zeros in other layers are not treated specially: they are free parameters estimated
at 0 (z = 0). Biases are not tested and keep their values.

The sandwich covariance (``covariance="sandwich"``)
---------------------------------------------------
F^-1 / n is the covariance of a maximum-likelihood fit of a correctly specified model: the
Hessian of the expected loss (the "bread") equals the variance of the per-sample scores (the
"meat"), and both are F. It is valid when the network was trained to minimise the plain loss
(``ce`` or ``lp``: mean cross-entropy or squared error; NRAE as t -> 0, an ESS schedule that has
reached rho = 1) *and* the likelihood is right. A network trained to minimise NRAE at t > 0 is
not a likelihood fit but an M-estimator: it solves sum_i psi_i = 0 with psi_i = exp(t L_i) grad L_i
(L the training loss), whose covariance is the sandwich A^-1 B A^-1 / n with
A = E[d psi / d theta] and B = E[psi psi^T]. With self-normalised weights
w_i = exp(t L_i) / mean_j exp(t L_j) (the scale cancels), this module estimates

    bread = mean_i w_i (F_i + t' g_i g_i^T),   meat = mean_i w_i^2 g_i g_i^T,

where F_i is sample i's model Fisher (the Gauss-Newton part of the Hessian of its loss: exact for
a single layer, the usual approximation for a network), g_i its likelihood score (the empirical
Fisher's gradient), and t' = t for cross-entropy, 2 sigma^2 t for the squared error (L = 2 sigma^2
times the Gaussian negative log-likelihood). At t = 0 this is the heteroscedasticity-robust (HC0)
covariance F^-1 F_emp F^-1 / n, which stays valid when the likelihood is misspecified (it
reproduces ``statsmodels``' ``cov_type="HC0"``). ``tilt`` is the t the network ended its training
at (ANRAT's final lambda^p; 0 after a switch to the plain loss). The population tilted risk is
what the sandwich describes; a network trained on minibatches minimised the mean of per-batch
NRAEs, which it approximates for large batches. Supported with ``"full"`` and ``"diagonal"``
(the diagonal estimator takes the diagonals of bread and meat); KFAC's factorisation does not
carry per-sample weights. Not for ``true_class_sq``, whose scores are not the likelihood's.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from scipy import stats
from statsmodels.stats.multitest import multipletests, multitest_alias
from torch import Tensor, nn

from anrat.errors import InputError
from anrat.functional import LossKind, per_sample_loss
from pruning.estimators import DENSE_MAX_PARAMS, ESTIMATORS, FisherEstimator, LayerTests, Sandwich, fisher_estimator
from pruning.fisher import FISHERS, FisherData, model_device_dtype, prepare
from pruning.flat import flatten, unflatten
from pruning.layers import eval_mode, select_layers, weight_name

# statsmodels' Hommel procedure takes O(m^2) time (2.4 s for 20,000 p-values, ~20 min for LeNet-5).
HOMMEL_MAX_TESTS = 20_000


@dataclass
class WaldResult:
    """Outcome of :func:`wald_test`, on the CPU.

    Per weight, keyed by parameter name as in ``model.named_parameters()`` (``"fc1.weight"``),
    tensors of the weight's shape: ``z`` (Wald statistics), ``se`` (standard errors, in the
    weight's units), ``pvalues`` (raw two-sided p-values), ``significant`` (bool, H0 rejected
    after the multiple-testing correction: True = keep).

    Per unit, keyed by module name (``"fc1"``), tensors of length out_features / out_channels:
    ``unit_chi2``, ``unit_pvalues`` (raw), ``unit_significant`` (after correction), and
    ``unit_df`` (weights per unit).

    ``n`` is the sample size in Var = F^-1 / n, ``n_fisher`` the samples the Fisher was estimated
    on; ``output_layer`` the tested layer that produces the network output (None if not tested),
    ``centered`` the layers whose weights were tested in centred (softmax-identified) form: for
    those the masks refer to the weights after :func:`center_softmax_layer`.
    """

    z: dict[str, Tensor]
    se: dict[str, Tensor]
    pvalues: dict[str, Tensor]
    significant: dict[str, Tensor]
    unit_chi2: dict[str, Tensor]
    unit_df: dict[str, int]
    unit_pvalues: dict[str, Tensor]
    unit_significant: dict[str, Tensor]
    estimator: str
    method: str
    alpha: float
    n: int
    fisher: str = "model"
    n_fisher: int = 0
    damping: float = 0.0
    output_layer: str | None = None
    centered: tuple[str, ...] = field(default_factory=tuple)

    def masks(self) -> dict[str, Tensor]:
        """Unstructured pruning decision: parameter name -> bool keep-mask of the weight's shape
        (True = significant, keep), as used with ``torch.nn.utils.prune.custom_from_mask``."""
        return {name: keep.clone() for name, keep in self.significant.items()}

    def redundant_units(self, include_output: bool = False) -> dict[str, Tensor]:
        """Module name -> LongTensor of the units (rows / filters) whose weights are jointly not
        significant. The output layer is left out unless ``include_output`` (its units are the
        model's outputs)."""
        return {
            layer: torch.nonzero(~keep).flatten()
            for layer, keep in self.unit_significant.items()
            if include_output or layer != self.output_layer
        }

    def scores(self) -> dict[str, Tensor]:
        """|z| per weight: a ranking score for :func:`pruning.saliency.masks_at_sparsity`."""
        return {name: z.abs() for name, z in self.z.items()}

    def removable(self) -> dict[str, Tensor]:
        """Parameter name -> bool mask of the weights the tests call removable at level ``alpha``
        (H0: w = 0 not rejected after the correction): the complement of :meth:`masks`."""
        return {name: ~keep for name, keep in self.significant.items()}

    def summary(self, weights: dict[str, Tensor] | None = None, units: int | None = 10) -> str:
        """A statsmodels-style summary in Markdown: the test's settings; per layer, how many weights
        and units are significant and the spread of |z|; per layer, its units ordered by p-value
        (at most ``units`` of them; None: all) with their estimate (the L2 norm of the unit's
        weights, from ``weights``, parameter name -> tensor, if given), its standard error by the
        delta method on the diagonal of Cov (sqrt(sum_j (w_j / norm)^2 se_j^2), in the weights'
        units), Wald chi2 = w' Cov^-1 w on df degrees of freedom, raw p-value and significance
        after the correction."""
        lines = [
            f"Wald tests: estimator {self.estimator}, Fisher of the {self.fisher} on {self.n_fisher:,} samples "
            f"(n = {self.n:,}, damping {self.damping:g}), {self.method} correction at alpha = {self.alpha:g}"
            + (f"; {', '.join(self.centered)} tested in centred (softmax-identified) form" if self.centered else "")
            + ".",
            "",
            "| layer | weights | significant | median abs(z) | max abs(z) | units | significant units |",
            "| --- | --- | --- | --- | --- | --- | --- |",
        ]
        for name, z in self.z.items():
            layer = name.rsplit(".", 1)[0]
            a = z.abs().flatten()
            u = self.unit_significant.get(layer)
            lines.append(
                f"| {layer} | {a.numel():,} | {int(self.significant[name].sum()):,} | {float(a.median()):.3g} | "
                f"{float(a.max()):.3g} | {'-' if u is None else u.numel()} | {'-' if u is None else int(u.sum())} |"
            )
        for name in self.z:
            layer = name.rsplit(".", 1)[0]
            if layer not in self.unit_pvalues:
                continue
            p = self.unit_pvalues[layer]
            # by chi2, largest first: the same order as by p-value (one df per layer), and p-values
            # that round to exactly 1 keep their order
            order = torch.argsort(self.unit_chi2[layer], descending=True)[: units if units is not None else p.numel()]
            shown = "all" if order.numel() == p.numel() else f"the {order.numel()} with the smallest p-values"
            lines += [
                "",
                f"{layer}: units (H0: all {self.unit_df[layer]} weights of the unit are 0), {shown} of {p.numel()}",
                "",
                "| unit | estimate: L2 norm | standard error | chi2 | df | p-value | significant |",
                "| --- | --- | --- | --- | --- | --- | --- |",
            ]
            w = None if weights is None else weights.get(name)
            se = self.se[name].double()
            for k in order.tolist():
                norm, sd = "-", "-"
                if w is not None:
                    wk = w[k].detach().double().cpu()
                    length = float(wk.norm())
                    norm = f"{length:.4g}"
                    if length > 0:
                        sd = f"{float(((wk / length).square() * se[k].square()).sum().sqrt()):.4g}"
                lines.append(
                    f"| {k} | {norm} | {sd} | {float(self.unit_chi2[layer][k]):.4g} | {self.unit_df[layer]} | "
                    f"{float(p[k]):.4g} | {'yes' if bool(self.unit_significant[layer][k]) else 'no'} |"
                )
        return "\n".join(lines) + "\n"

    def center_layers(self, model: nn.Module) -> None:
        """Put the ``centered`` layers of ``model`` (the tested model) in the sum-to-zero form
        their weights were tested in, in place (:func:`center_softmax_layer`; same predictions),
        so that masks and scores refer to the weights the model holds."""
        modules = dict(model.named_modules())
        for name in self.centered:
            center_softmax_layer(modules[name])


def center_softmax_layer(layer: nn.Linear) -> None:
    """Shift a softmax output layer to the form :func:`wald_test` tests, in place: every column
    W[:, j] without an exact zero is centred (W[k, j] -= mean_k' W[k', j]) and the bias is
    centred. Softmax predictions are unchanged; columns with a zero (pruned) entry are left as
    they are, so pruned weights stay zero."""
    with torch.no_grad():
        free = (layer.weight != 0).all(dim=0)
        layer.weight[:, free] -= layer.weight[:, free].mean(dim=0, keepdim=True)
        if layer.bias is not None:
            layer.bias -= layer.bias.mean()


def _identified_softmax_weights(w: Tensor) -> tuple[Tensor, Tensor]:
    """The tested form of a softmax layer's weights (module docstring) and the bool mask of its
    free columns (no exact zero)."""
    free = (w != 0).all(dim=0)
    centred = w.clone()
    centred[:, free] -= w[:, free].mean(dim=0, keepdim=True)
    return centred, free


def check_test_options(
    alpha: float,
    estimator: str | FisherEstimator,
    method: str,
    damping: float = 1e-6,
    n_fit: int | None = None,
    fisher: str = "model",
) -> None:
    """Refuse (:class:`InputError`) options of :func:`wald_test` that are not valid, before any work."""
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 < alpha < 1:
        raise InputError(f"alpha must be a number in (0, 1), got {alpha!r}")
    fisher_estimator(estimator)
    if method not in multitest_alias:
        raise InputError(
            f"unknown multiple-testing method {method!r}; expected a statsmodels multipletests method such as "
            f"'holm', 'bonferroni', 'fdr_bh', 'fdr_by' (all: {sorted(multitest_alias)})"
        )
    if isinstance(damping, bool) or not isinstance(damping, (int, float)) or not math.isfinite(damping) or damping < 0:
        raise InputError(f"damping must be a finite number >= 0, got {damping!r}")
    if n_fit is not None and (isinstance(n_fit, bool) or not isinstance(n_fit, int) or n_fit < 1):
        raise InputError(f"n_fit must be a positive integer or None, got {n_fit!r}")
    if fisher not in FISHERS:
        raise InputError(f"unknown fisher {fisher!r}; expected one of {list(FISHERS)}")


COVARIANCES = ("fisher", "sandwich")


def check_covariance(covariance: str, tilt: float, estimator: str | FisherEstimator, loss: str | None = None) -> None:
    """Refuse (:class:`InputError`) a covariance option :func:`wald_test` cannot honour, before any work."""
    if covariance not in COVARIANCES:
        raise InputError(f"unknown covariance {covariance!r}; expected one of {list(COVARIANCES)}")
    if isinstance(tilt, bool) or not isinstance(tilt, (int, float)) or not (math.isfinite(tilt) and tilt >= 0):
        raise InputError(f"tilt (t = lambda^p of the NRAE trained) must be a finite number >= 0, got {tilt!r}")
    if covariance == "fisher":
        if tilt:
            raise InputError("tilt is used by covariance='sandwich' only; the Fisher covariance assumes the plain loss")
        return
    name = fisher_estimator(estimator).name
    if name not in ("full", "diagonal"):
        raise InputError(f"covariance 'sandwich' needs estimator 'full' or 'diagonal', not {name!r}")
    if loss == "true_class_sq":
        raise InputError(
            "covariance 'sandwich' covers models trained on 'ce' or 'lp' (r = 2); the scores of 'true_class_sq' "
            "are not the likelihood's"
        )


def sandwich_estimates(
    strategy: FisherEstimator,
    model: nn.Module,
    fd: FisherData,
    layers: dict[str, nn.Module],
    tilt: float,
    *,
    batch_size: int = 256,
    progress: bool = False,
) -> dict[str, Sandwich]:
    """Each layer's bread and meat (module docstring, "The sandwich covariance") on the samples of
    ``fd``: w_i = exp(t L_i) / mean_j exp(t L_j) with L the training loss, bread = mean_i w_i
    (F_i + t' g_i g_i^T) (F_i the sample's model Fisher, g_i its likelihood score, t' = t for
    cross-entropy and 2 sigma^2 t for the squared error), meat = mean_i w_i^2 g_i g_i^T."""
    weights = None
    t_scores = tilt
    if tilt:
        device, dtype = model_device_dtype(model)
        kind: LossKind = "lp" if fd.likelihood.kind == "gaussian" else "ce"
        with torch.no_grad(), eval_mode(model):
            losses = torch.cat(
                [
                    per_sample_loss(model(xb.to(device=device, dtype=dtype)), yb.to(device), kind, 2.0)
                    .double()
                    .reshape(-1)
                    for xb, yb in fd.batches(batch_size)
                ]
            )
        weights = torch.softmax(tilt * losses, dim=0).cpu() * fd.n_used  # mean 1
        if fd.likelihood.kind == "gaussian":  # L = ||z - y||^2 = 2 sigma^2 * the Gaussian NLL (+ const)
            t_scores = 2 * fd.likelihood.sigma2 * tilt
    kwargs = {"batch_size": batch_size, "progress": progress}
    weighted = replace(fd, weights=weights)
    bread = strategy.estimate(model, weighted, layers, fisher="model", **kwargs)
    scores = strategy.estimate(model, weighted, layers, fisher="empirical", **kwargs)
    meat = scores
    if tilt:
        bread = {name: bread[name] + t_scores * scores[name] for name in layers}
        meat = strategy.estimate(model, replace(fd, weights=weights.square()), layers, fisher="empirical", **kwargs)
    return {name: Sandwich(bread[name], meat[name]) for name in layers}


def _correct(pvalues: dict[str, Tensor], alpha: float, method: str) -> dict[str, Tensor]:
    """multipletests over all entries of ``pvalues`` as one family; bool rejections per key."""
    reject = multipletests(flatten(pvalues).numpy(), alpha=alpha, method=method)[0]
    return unflatten(torch.from_numpy(reject.astype(bool)), pvalues)


def wald_test(
    model: nn.Module,
    data: Any,
    *,
    loss: LossKind = "ce",
    estimator: str | FisherEstimator = "kfac",
    fisher: str = "model",
    layers: Sequence[str] | None = None,
    alpha: float = 0.05,
    method: str = "holm",
    max_samples: int | None = 10_000,
    batch_size: int = 256,
    damping: float = 1e-6,
    n_fit: int | None = None,
    seed: int = 0,
    progress: bool = False,
    covariance: str = "fisher",
    tilt: float = 0.0,
) -> WaldResult:
    """Wald tests of H0: w_j = 0 for every weight, and H0: w_g = 0 for every unit, of the tested
    layers (module docstring for the statistics, estimators and damping).

    Args:
        model: the trained network; its parameters are not changed (it is put in eval mode while
            the Fisher is estimated and restored afterwards).
        data: the training data, ``(x, y)`` tensors or an object with ``.x`` and ``.y``.
        loss: anrat's loss kind the model was trained with: ``"ce"`` (class indices for K >= 2
            outputs; one output is binary logistic with 0/1 targets) or ``"lp"`` (Gaussian
            regression; ``"mse"`` is accepted as another name for it).
        estimator: ``"kfac"``, ``"full"`` or ``"diagonal"``, or an estimator object
            (:mod:`pruning.estimators`).
        fisher: ``"model"`` (expected over y ~ the model) or ``"empirical"`` (observed y).
        layers: module names to test; default every ``nn.Linear`` and ``nn.Conv2d``.
        alpha: family-wise level (or false discovery rate for the ``fdr_*`` methods), in (0, 1).
        method: ``statsmodels.stats.multitest.multipletests`` method, e.g. ``"holm"``,
            ``"bonferroni"``, ``"fdr_bh"``.
        max_samples: the Fisher is estimated on at most this many samples drawn at random (seeded
            by ``seed``); None uses all. 10,000 MNIST images give the LeNet-5 factors in minutes on
            two CPU cores; the standard errors still use ``n_fit``.
        batch_size: samples per forward pass (per-sample gradients are further chunked to bound
            memory, see ``pruning.fisher.GRAD_MEMORY_BYTES``).
        damping: relative Tikhonov damping (module docstring), >= 0.
        n_fit: samples the model was fitted on; default ``len(data)``.
        progress: show a tqdm progress bar.
        covariance: ``"fisher"`` (F^-1 / n, the maximum-likelihood covariance) or ``"sandwich"``
            (the M-estimator's bread^-1 meat bread^-1 / n; module docstring), with ``"full"`` or
            ``"diagonal"``; ``fisher`` is then not used.
        tilt: the t = lambda^p of the NRAE the model was trained to minimise (``covariance="sandwich"``
            only; 0: the plain loss, the robust covariance of maximum likelihood).
    """
    check_test_options(alpha, estimator, method, damping, n_fit, fisher)
    check_covariance(covariance, tilt, estimator, loss)
    strategy = fisher_estimator(estimator)
    modules = select_layers(model, layers)
    strategy.check_layers(modules)
    n_tests = sum(module.weight.numel() for module in modules.values())
    if multitest_alias[method] == "ho" and n_tests > HOMMEL_MAX_TESTS:
        raise InputError(
            f"method {method!r} takes O(m^2) time and is limited to {HOMMEL_MAX_TESTS} tests; "
            f"these layers have {n_tests} weights (use 'holm' or 'fdr_bh')"
        )
    fd: FisherData = prepare(
        model, data, loss=loss, layers=modules, max_samples=max_samples, batch_size=batch_size, seed=seed
    )
    n = n_fit if n_fit is not None else fd.n_data
    softmax_layer = fd.output_layer if fd.likelihood.kind == "softmax" else None
    weights, free = {}, {}
    for name, module in modules.items():
        weights[name] = module.weight.detach().to(device="cpu", dtype=torch.float64)
        free[name] = None
        if name == softmax_layer:
            weights[name], free[name] = _identified_softmax_weights(weights[name])

    if covariance == "sandwich":
        estimates = sandwich_estimates(strategy, model, fd, modules, tilt, batch_size=batch_size, progress=progress)
    else:
        estimates = strategy.estimate(model, fd, modules, fisher=fisher, batch_size=batch_size, progress=progress)
    tests: dict[str, LayerTests] = {
        name: strategy.layer_tests(name, weights[name], estimates[name], n=n, damping=damping, free=free[name])
        for name in modules
    }

    z, se, pvalues, unit_chi2, unit_df, unit_pvalues = {}, {}, {}, {}, {}, {}
    for name, (layer_se, chi2) in tests.items():
        key = weight_name(name)
        z[key] = weights[name] / layer_se
        se[key] = layer_se
        pvalues[key] = torch.from_numpy(2 * stats.norm.sf(z[key].abs().numpy()))
        unit_df[name] = weights[name][0].numel()
        unit_chi2[name] = chi2
        unit_pvalues[name] = torch.from_numpy(stats.chi2.sf(chi2.numpy(), unit_df[name]))
    return WaldResult(
        z=z,
        se=se,
        pvalues=pvalues,
        significant=_correct(pvalues, alpha, method),
        unit_chi2=unit_chi2,
        unit_df=unit_df,
        unit_pvalues=unit_pvalues,
        unit_significant=_correct(unit_pvalues, alpha, method),
        estimator=strategy.name,
        method=method,
        alpha=float(alpha),
        n=n,
        fisher=fisher,
        n_fisher=fd.n_used,
        damping=float(damping),
        output_layer=fd.output_layer,
        centered=(softmax_layer,) if softmax_layer is not None else (),
    )


__all__ = [
    "COVARIANCES",
    "DENSE_MAX_PARAMS",
    "ESTIMATORS",
    "WaldResult",
    "center_softmax_layer",
    "check_covariance",
    "check_test_options",
    "sandwich_estimates",
    "wald_test",
]
