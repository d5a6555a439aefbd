"""Wald tests against statsmodels' maximum-likelihood fits, on fitted models with known structure."""

from __future__ import annotations

import math
from collections import OrderedDict

import numpy as np
import pytest
import statsmodels.api as sm
import torch
import torch.nn.functional as F
from scipy import stats
from statsmodels.stats.multitest import multipletests
from torch import nn

from anrat.errors import InputError
from anrat.models import lenet5, mlp
from pruning.significance import WaldResult, center_softmax_layer, wald_test

ESTIMATORS = ["full", "kfac", "diagonal"]


def linear_model(weight: np.ndarray, bias: np.ndarray, dtype=torch.float64) -> nn.Sequential:
    """nn.Sequential(out=Linear) holding the given (K, d) weight and (K,) bias."""
    layer = nn.Linear(weight.shape[1], weight.shape[0]).to(dtype)
    with torch.no_grad():
        layer.weight.copy_(torch.as_tensor(weight))
        layer.bias.copy_(torch.as_tensor(bias))
    return nn.Sequential(OrderedDict(out=layer))


@pytest.fixture(scope="module")
def logit_fit():
    """Binary logistic data with correlated features (n = 2000, d = 5) and statsmodels' MLE."""
    rng = np.random.default_rng(0)
    n, d = 2000, 5
    X = rng.normal(size=(n, d)) @ np.linalg.cholesky(0.5 * np.eye(d) + 0.5).T
    beta = np.array([0.8, -0.5, 0.0, 0.25, 0.0])
    y = (rng.random(n) < 1 / (1 + np.exp(-(0.3 + X @ beta)))).astype(float)
    result = sm.Logit(y, sm.add_constant(X)).fit(disp=0, method="newton", tol=1e-12, maxiter=100)
    return X, y, result


# ---- agreement with statsmodels -------------------------------------------------------------------


@pytest.mark.parametrize("dtype, z_rtol", [(torch.float64, 1e-12), (torch.float32, 1e-6)])
def test_full_estimator_reproduces_statsmodels_logit(logit_fit, dtype, z_rtol):
    """Model Fisher of a logistic layer = X~^T W X~ / n: statsmodels' z and p-values, to rounding
    (float32: the Fisher is summed from float32 gradients)."""
    X, y, res = logit_fit
    model = linear_model(res.params[None, 1:], res.params[:1], dtype)
    data = (torch.tensor(X, dtype=dtype), torch.tensor(y))
    exact = wald_test(model, data, estimator="full", max_samples=None, damping=0.0)
    z = exact.z["out.weight"].numpy().ravel()
    np.testing.assert_allclose(z, res.tvalues[1:], rtol=z_rtol)
    np.testing.assert_allclose(exact.se["out.weight"].numpy().ravel(), res.bse[1:], rtol=z_rtol)
    np.testing.assert_allclose(exact.pvalues["out.weight"].numpy().ravel(), res.pvalues[1:], rtol=200 * z_rtol)
    # The default relative damping of 1e-6 moves z by about 1e-6.
    damped = wald_test(model, data, estimator="full", max_samples=None)
    np.testing.assert_allclose(damped.z["out.weight"].numpy().ravel(), res.tvalues[1:], rtol=2e-6)


def test_empirical_fisher_reproduces_the_outer_product_of_statsmodels_scores(logit_fit):
    X, y, res = logit_fit
    scores = res.model.score_obs(res.params)  # per-observation gradients of the log-likelihood
    z_opg = res.params / np.sqrt(np.diag(np.linalg.inv(scores.T @ scores)))
    model = linear_model(res.params[None, 1:], res.params[:1])
    result = wald_test(
        model, (torch.tensor(X), torch.tensor(y)), estimator="full", fisher="empirical", max_samples=None, damping=0.0
    )
    np.testing.assert_allclose(result.z["out.weight"].numpy().ravel(), z_opg[1:], rtol=1e-12)


def test_diagonal_understates_and_kfac_approximates_the_full_standard_errors(logit_fit):
    """1/F_jj <= [F^-1]_jj, strictly with correlated features; KFAC replaces E[p(1-p) x x^T] by
    E[p(1-p)] E[x x^T], not exact here, but it must not be off by more than the spread of p(1-p)."""
    X, y, res = logit_fit
    model = linear_model(res.params[None, 1:], res.params[:1])
    data = (torch.tensor(X), torch.tensor(y))
    se = {
        est: wald_test(model, data, estimator=est, max_samples=None, damping=0.0).se["out.weight"].ravel()
        for est in ESTIMATORS
    }
    assert bool((se["diagonal"] < se["full"] * (1 - 1e-3)).all())
    p = 1 / (1 + np.exp(-(res.params[0] + X @ res.params[1:])))
    spread = math.sqrt((p * (1 - p)).max() / (p * (1 - p)).min())
    ratio = se["kfac"] / se["full"]
    assert bool((ratio > 1 / spread).all() and (ratio < spread).all())
    assert not torch.allclose(se["kfac"], se["full"], rtol=1e-3)


def test_kfac_is_exact_for_a_logistic_layer_whose_predictions_do_not_depend_on_x(logit_fit):
    """With w = 0, p(1-p) is constant and the Fisher is exactly p(1-p) E[x~ x~^T] = G (x) A."""
    X, y, _ = logit_fit
    model = linear_model(np.zeros((1, X.shape[1])), np.array([0.4]))
    data = (torch.tensor(X), torch.tensor(y))
    full = wald_test(model, data, estimator="full", max_samples=None, damping=0.0)
    kfac = wald_test(model, data, estimator="kfac", max_samples=None, damping=0.0)
    torch.testing.assert_close(kfac.se["out.weight"], full.se["out.weight"], rtol=1e-10, atol=0)


def test_kfac_and_full_reproduce_statsmodels_ols_up_to_the_variance_convention():
    """Gaussian likelihood with sigma^2 = RSS / n (maximum likelihood), statsmodels RSS / (n - p):
    z = t * sqrt(n / (n - p)). KFAC is exact for one Linear layer with Gaussian noise."""
    rng = np.random.default_rng(1)
    n, d = 500, 4
    X = rng.normal(size=(n, d))
    y = 1.0 + X @ np.array([0.5, 0.0, -0.3, 0.1]) + rng.normal(size=n)
    res = sm.OLS(y, sm.add_constant(X)).fit()
    model = linear_model(res.params[None, 1:], res.params[:1])
    expected = res.tvalues[1:] * math.sqrt(n / (n - d - 1))
    for estimator in ("full", "kfac"):
        result = wald_test(
            model,
            (torch.tensor(X), torch.tensor(y[:, None])),
            loss="lp",
            estimator=estimator,
            max_samples=None,
            damping=0.0,
        )
        np.testing.assert_allclose(result.z["out.weight"].numpy().ravel(), expected, rtol=1e-10)


# ---- multi-class softmax: the singular Fisher --------------------------------------------------------


@pytest.fixture(scope="module")
def mnlogit_fit():
    """3-class data and statsmodels' MNLogit MLE (class 0 is its reference, coefficients 0)."""
    rng = np.random.default_rng(2)
    n, d = 1500, 3
    X = rng.normal(size=(n, d))
    logits = X @ np.array([[0.0, 1.0, 0.5], [0.0, -0.5, 0.0], [0.0, 0.0, -1.0]])
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    y = (rng.random((n, 1)) > p.cumsum(1)).sum(1)
    res = sm.MNLogit(y, sm.add_constant(X)).fit(disp=0, method="newton", tol=1e-12, maxiter=100)
    coef = np.concatenate([np.zeros((d + 1, 1)), np.asarray(res.params)], axis=1)  # (d + 1, K)
    return X, y, res, coef


def centred_reference(res, coef, d, K):
    """Centred weights W[k, j] - mean_k W[., j] and their covariance from statsmodels' cov_params:
    centred = C beta with beta the K - 1 non-reference coefficients of a feature."""
    cov = np.asarray(res.cov_params())  # ordered equation by equation, d + 1 coefficients each
    C = np.vstack([np.full((1, K - 1), -1.0 / K), np.eye(K - 1) - 1.0 / K])

    def index(j):  # positions of feature j's coefficients (after the constant) in cov
        return [e * (d + 1) + j + 1 for e in range(K - 1)]

    weights = (coef[1:] - coef[1:].mean(1, keepdims=True)).T  # (K, d)
    cov_w = np.zeros((K, d, K, d))
    for j in range(d):
        for jj in range(d):
            cov_w[:, j, :, jj] = C @ cov[np.ix_(index(j), index(jj))] @ C.T
    return weights, cov_w


@pytest.mark.parametrize("damping", [0.0, 1e-6])
def test_softmax_layer_is_tested_in_centred_form_and_matches_mnlogit(mnlogit_fit, damping):
    """The shift null space is removed explicitly (not by damping), so even with damping = 0 the
    pseudo-inverse gives the statsmodels covariance of the identified, centred weights; the
    per-unit chi-square uses the same covariance block."""
    X, y, res, coef = mnlogit_fit
    d, K = X.shape[1], 3
    weights, cov_w = centred_reference(res, coef, d, K)
    model = linear_model(weights, coef[0] - coef[0].mean())  # the same predictions, no zeros
    result = wald_test(model, (torch.tensor(X), torch.tensor(y)), estimator="full", max_samples=None, damping=damping)
    assert result.centered == ("out",) and result.output_layer == "out"
    se = np.sqrt(np.einsum("kjkj->kj", cov_w))
    tol = 1e-9 if damping == 0 else 1e-5
    np.testing.assert_allclose(result.z["out.weight"].numpy(), weights / se, rtol=tol)
    for k in range(K):
        chi2 = weights[k] @ np.linalg.solve(cov_w[k, :, k, :], weights[k])
        assert float(result.unit_chi2["out"][k]) == pytest.approx(chi2, rel=tol)
        assert float(result.unit_pvalues["out"][k]) == pytest.approx(stats.chi2.sf(chi2, d), rel=100 * tol)
    assert result.unit_df["out"] == d


def test_columns_with_a_zero_are_identified_by_it_like_statsmodels_reference_class(mnlogit_fit):
    """MNLogit's form has class 0's weights fixed at 0: every column is identified by its zero, the
    zeros are not parameters, and the other weights have statsmodels' standard errors."""
    X, y, res, coef = mnlogit_fit
    model = linear_model(coef[1:].T, coef[0])
    result = wald_test(model, (torch.tensor(X), torch.tensor(y)), estimator="full", max_samples=None, damping=0.0)
    z = result.z["out.weight"].numpy()
    np.testing.assert_allclose(z[1:].T, np.asarray(res.tvalues)[1:], rtol=1e-9)
    assert (z[0] == 0).all() and bool(torch.isinf(result.se["out.weight"][0]).all())
    assert not result.significant["out.weight"][0].any()
    # Pruning keeps working on such a layer: centring leaves columns with a zero alone.
    before = model.out.weight.detach().clone()
    center_softmax_layer(model.out)
    assert torch.equal(model.out.weight, before)


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_softmax_estimators_are_finite_without_damping_and_close_to_full(mnlogit_fit, estimator):
    X, y, _, coef = mnlogit_fit
    model = linear_model(coef[1:].T - coef[1:].mean(1), coef[0])
    data = (torch.tensor(X), torch.tensor(y))
    result = wald_test(model, data, estimator=estimator, max_samples=None, damping=0.0)
    full = wald_test(model, data, estimator="full", max_samples=None, damping=0.0)
    for values in (result.z, result.se, result.pvalues):
        assert bool(torch.isfinite(values["out.weight"]).all())
    assert bool(torch.isfinite(result.unit_chi2["out"]).all())
    # The same weights are significant here: the approximations differ by well under 2x in se.
    ratio = result.se["out.weight"] / full.se["out.weight"]
    assert bool(((ratio > 0.5) & (ratio < 2)).all())


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_unit_test_of_one_weight_is_the_weight_test(estimator):
    """chi2 with 1 degree of freedom of z^2 has the two-sided normal p-value of z."""
    rng = np.random.default_rng(3)
    X = rng.normal(size=(600, 1))
    y = np.clip(np.round(1 + X[:, 0] + rng.normal(size=600)), 0, 2).astype(int)
    torch.manual_seed(0)
    model = nn.Sequential(OrderedDict(out=nn.Linear(1, 3))).double()
    fit(model, torch.tensor(X), torch.tensor(y), F.cross_entropy)
    result = wald_test(model, (torch.tensor(X), torch.tensor(y)), estimator=estimator, max_samples=None)
    assert result.unit_df["out"] == 1
    torch.testing.assert_close(result.unit_chi2["out"], result.z["out.weight"].ravel() ** 2, rtol=1e-10, atol=0)
    torch.testing.assert_close(result.unit_pvalues["out"], result.pvalues["out.weight"].ravel(), rtol=1e-10, atol=0)


def test_center_softmax_layer_keeps_predictions_and_pruned_zeros():
    torch.manual_seed(1)
    layer = nn.Linear(4, 3).double()
    with torch.no_grad():
        layer.weight[1, 2] = 0.0  # a pruned weight
    x = torch.randn(10, 4, dtype=torch.float64)
    before, column = torch.softmax(layer(x), 1), layer.weight[:, 2].detach().clone()
    center_softmax_layer(layer)
    torch.testing.assert_close(torch.softmax(layer(x), 1), before)
    torch.testing.assert_close(layer.weight.sum(0)[[0, 1, 3]], torch.zeros(3, dtype=torch.float64), atol=1e-15, rtol=0)
    assert torch.equal(layer.weight[:, 2], column)


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_a_pruned_softmax_weight_stays_untested_and_the_masks_match_the_centred_layer(mnlogit_fit, estimator):
    X, y, _, coef = mnlogit_fit
    weights = coef[1:].T - coef[1:].mean(1)
    weights[2, 0] = 0.0  # pruned in an earlier round
    model = linear_model(weights, coef[0])
    result = wald_test(model, (torch.tensor(X), torch.tensor(y)), estimator=estimator, max_samples=None)
    assert float(result.z["out.weight"][2, 0]) == 0 and not bool(result.significant["out.weight"][2, 0])
    assert math.isinf(float(result.se["out.weight"][2, 0]))  # a fixed zero, not a parameter
    assert bool(torch.isfinite(result.z["out.weight"]).all())
    center_softmax_layer(model.out)
    assert torch.equal(model.out.weight.detach() == 0, result.z["out.weight"] == 0)


# ---- pruning decisions on fitted models -------------------------------------------------------------


def fit(model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss_fn) -> None:
    """Full-batch L-BFGS to a stationary point."""
    opt = torch.optim.LBFGS(
        model.parameters(),
        lr=1,
        max_iter=1000,
        tolerance_grad=1e-12,
        tolerance_change=1e-15,
        history_size=50,
        line_search_fn="strong_wolfe",
    )

    def closure():
        opt.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward()
        return loss

    for _ in range(3):
        opt.step(closure)


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_irrelevant_inputs_of_a_logistic_regression_are_pruned(estimator):
    g = torch.Generator().manual_seed(4)
    X = torch.randn(3000, 10, generator=g, dtype=torch.float64)
    y = (
        torch.rand(3000, generator=g, dtype=torch.float64)
        < torch.sigmoid(1.0 * X[:, 0] - 0.6 * X[:, 1] + 0.3 * X[:, 2])
    ).double()
    torch.manual_seed(0)
    model = nn.Sequential(OrderedDict(out=nn.Linear(10, 1))).double()
    fit(model, X, y[:, None], F.binary_cross_entropy_with_logits)
    keep = wald_test(model, (X, y), estimator=estimator).masks()["out.weight"][0]
    assert keep.tolist() == [True] * 3 + [False] * 7


@pytest.fixture(scope="module")
def two_unit_network():
    """y = 1.5 tanh(x0 + 0.8 x1) - tanh(x2 - 0.5 x0) + noise, x in R^10, fitted by a 10-2-1 tanh MLP."""
    g = torch.Generator().manual_seed(0)
    X = torch.randn(2000, 10, generator=g, dtype=torch.float64)
    signal = 1.5 * torch.tanh(X[:, 0] + 0.8 * X[:, 1]) - torch.tanh(X[:, 2] - 0.5 * X[:, 0])
    y = (signal + 0.3 * torch.randn(2000, generator=g, dtype=torch.float64))[:, None]
    torch.manual_seed(0)
    model = mlp(10, (2,), 1, "tanh").double()
    fit(model, X, y, F.mse_loss)
    return model, X, y


@pytest.mark.parametrize("estimator", ["full", "kfac"])
def test_hidden_layer_keeps_exactly_the_true_connections(two_unit_network, estimator):
    """Each hidden unit keeps the connections of its true input combination ({0, 1} and {0, 2},
    in some order) and drops every other one, including all seven irrelevant inputs."""
    model, X, y = two_unit_network
    result = wald_test(model, (X, y), loss="lp", estimator=estimator)
    keep = result.masks()["fc1.weight"]
    assert not bool(keep[:, 3:].any())
    rows = sorted(tuple(row) for row in keep[:, :3].int().tolist())
    assert rows == [(1, 0, 1), (1, 1, 0)]
    assert result.unit_significant["fc1"].tolist() == [True, True]
    redundant = result.redundant_units()
    assert set(redundant) == {"fc1"} and redundant["fc1"].numel() == 0


def test_a_noise_output_of_a_linear_regression_is_a_redundant_unit():
    """Three outputs of a Linear(10, 3) least-squares fit; output 2 is unrelated to x."""
    g = torch.Generator().manual_seed(5)
    X = torch.randn(1000, 10, generator=g, dtype=torch.float64)
    Y = torch.stack([X[:, 0] - X[:, 1], 0.5 * X[:, 2], torch.zeros(1000, dtype=torch.float64)], 1)
    Y = Y + 0.5 * torch.randn(1000, 3, generator=g, dtype=torch.float64)
    solution = torch.linalg.lstsq(torch.cat([X, torch.ones(1000, 1, dtype=torch.float64)], 1), Y).solution
    model = linear_model(solution[:10].T.numpy(), solution[10].numpy())
    for estimator in ESTIMATORS:
        result = wald_test(model, (X, Y), loss="lp", estimator=estimator)
        assert result.unit_significant["out"].tolist() == [True, True, False]
        assert result.redundant_units(include_output=True)["out"].tolist() == [2]
        assert result.redundant_units() == {}
        assert result.masks()["out.weight"][2].sum() == 0
    # "mse", the name the pruning API used before it took anrat's loss kinds, still means "lp"
    earlier = wald_test(model, (X, Y), loss="mse", estimator=estimator)
    assert torch.equal(earlier.pvalues["out.weight"], result.pvalues["out.weight"])
    assert torch.equal(earlier.unit_chi2["out"], result.unit_chi2["out"])


# ---- conventions and options ---------------------------------------------------------------------------


def test_sample_size_convention_and_subsampling(logit_fit):
    """se = sqrt([F^-1]_jj / n) with n = n_fit, default len(data), even when the Fisher uses a subsample."""
    X, y, res = logit_fit
    model = linear_model(res.params[None, 1:], res.params[:1])
    data = (torch.tensor(X), torch.tensor(y))
    base = wald_test(model, data, estimator="full", max_samples=None)
    assert (base.n, base.n_fisher) == (2000, 2000)
    quadruple = wald_test(model, data, estimator="full", max_samples=None, n_fit=8000)
    torch.testing.assert_close(quadruple.se["out.weight"], base.se["out.weight"] / 2, rtol=1e-12, atol=0)
    sub = wald_test(model, data, estimator="full", max_samples=1000)
    assert (sub.n, sub.n_fisher) == (2000, 1000)
    # Half the data estimates the same per-sample Fisher: se within sampling error (~10%).
    ratio = sub.se["out.weight"] / base.se["out.weight"]
    assert bool(((ratio > 0.8) & (ratio < 1.25)).all())


def test_corrections_are_statsmodels_multipletests_over_all_weights(two_unit_network):
    model, X, y = two_unit_network
    names = ("fc1.weight", "fc2.weight")
    sets = {}
    for method in ("bonferroni", "holm", "fdr_bh"):
        result = wald_test(model, (X, y), loss="lp", method=method, alpha=0.1)
        raw = np.concatenate([result.pvalues[name].numpy().ravel() for name in names])
        expected = multipletests(raw, alpha=0.1, method=method)[0]
        got = np.concatenate([result.significant[name].numpy().ravel() for name in names])
        assert np.array_equal(got, expected)
        assert result.method == method and result.alpha == 0.1
        sets[method] = got
    # Bonferroni rejects a subset of Holm's rejections, Holm a subset of Benjamini-Hochberg's.
    assert not (sets["bonferroni"] & ~sets["holm"]).any() and not (sets["holm"] & ~sets["fdr_bh"]).any()
    assert sets["holm"].any() and not sets["fdr_bh"].all()


def test_result_helpers_and_model_left_unchanged():
    torch.manual_seed(7)
    model = mlp(4, (3,), 2, "relu").double().train()
    X = torch.randn(200, 4, dtype=torch.float64)
    y = (torch.rand(200, dtype=torch.float64) < torch.sigmoid(X[:, 0])).long()
    fit(model, X, y, F.cross_entropy)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    result = wald_test(model, (X, y), layers=["fc1"], estimator="diagonal")
    assert isinstance(result, WaldResult)
    assert model.training and all(torch.equal(before[n], p) for n, p in model.named_parameters())
    assert set(result.z) == {"fc1.weight"} and set(result.unit_chi2) == {"fc1"}
    assert result.output_layer is None and result.centered == ()
    assert torch.equal(result.masks()["fc1.weight"], result.significant["fc1.weight"])
    assert torch.equal(result.scores()["fc1.weight"], result.z["fc1.weight"].abs())
    redundant = result.redundant_units()["fc1"]
    assert redundant.dtype == torch.long
    assert redundant.tolist() == [i for i, keep in enumerate(result.unit_significant["fc1"].tolist()) if not keep]
    assert result.se["fc1.weight"].device.type == "cpu"


def test_lenet5_smoke_default_estimator():
    torch.manual_seed(0)
    model = lenet5()
    x = torch.randn(512, 1, 28, 28)
    y = torch.randint(0, 10, (512,))
    result = wald_test(model, (x, y))
    assert result.estimator == "kfac" and result.n == 512
    shapes = {name: tuple(p.shape) for name, p in model.named_parameters() if name.endswith("weight")}
    assert {name: tuple(z.shape) for name, z in result.z.items()} == shapes
    for name in shapes:
        assert bool(torch.isfinite(result.z[name]).all()) and bool((result.se[name] > 0).all())
    assert {name: v.numel() for name, v in result.unit_chi2.items()} == {
        "conv1": 20,
        "conv2": 50,
        "fc1": 500,
        "fc2": 10,
    }
    assert result.unit_df == {"conv1": 25, "conv2": 500, "fc1": 800, "fc2": 500}
    assert result.centered == ("fc2",)


# ---- bad input ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small():
    torch.manual_seed(8)
    return mlp(4, (3,), 2), (torch.randn(20, 4), torch.randint(0, 2, (20,)))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(alpha=0.0), r"alpha must be a number in \(0, 1\), got 0.0"),
        (dict(alpha=1), r"alpha must be a number in \(0, 1\), got 1"),
        (dict(alpha=float("nan")), r"alpha must be a number in \(0, 1\)"),
        (dict(alpha="0.05"), r"alpha must be a number in \(0, 1\)"),
        (dict(estimator="exact"), r"unknown estimator 'exact'; expected one of \['kfac', 'full', 'diagonal'\]"),
        (dict(method="tukey"), r"unknown multiple-testing method 'tukey'.*'holm'"),
        (
            dict(layers=["fc9"]),
            r"unknown or untestable layer name\(s\) \['fc9'\]; testable layers are \['fc1', 'fc2'\]",
        ),
        (dict(layers=["act1"]), r"untestable layer name\(s\) \['act1'\]"),
        (dict(layers=[]), r"layers is empty"),
        (dict(loss="nll"), r"unknown loss 'nll'; expected one of \['ce', 'lp', 'true_class_sq'\]"),
        (dict(fisher="observed"), r"unknown fisher 'observed'"),
        (dict(damping=-1.0), r"damping must be a finite number >= 0"),
        (dict(n_fit=0), r"n_fit must be a positive integer or None"),
        (dict(max_samples=0), r"max_samples must be a positive integer or None"),
        (dict(batch_size=0), r"batch_size must be a positive integer"),
    ],
)
def test_bad_options_raise_input_error(small, kwargs, message):
    model, data = small
    with pytest.raises(InputError, match=message):
        wald_test(model, data, **kwargs)


def test_bad_models_and_data_raise_input_error(small):
    model, (x, y) = small
    with pytest.raises(InputError, match="has no nn.Linear or nn.Conv2d layer"):
        wald_test(nn.Sequential(nn.ReLU()), (x, y))
    with pytest.raises(InputError, match=r"data must be a pair of tensors \(x, y\), an object with .x and .y"):
        wald_test(model, x)
    with pytest.raises(InputError, match=r"data x must be a floating-point tensor"):
        wald_test(model, (torch.zeros(20, 4, dtype=torch.uint8), y))
    with pytest.raises(
        InputError,
        match=r"data x of shape \(20, 5\) does not fit the model; layer 'fc1' \(Linear, expects \(N, \.\.\., 4\)\)",
    ):
        wald_test(model, (torch.randn(20, 5), y))
    with pytest.raises(
        InputError,
        match=r"estimator 'full' .* limited to 4096 parameters per layer; too large: "
        r"\{'conv2': 25050, 'fc1': 400500, 'fc2': 5010\}",
    ):
        wald_test(lenet5(), (torch.randn(2, 1, 28, 28), torch.zeros(2, dtype=torch.long)), estimator="full")
    with pytest.raises(InputError, match=r"method 'hommel' takes O\(m\^2\) time"):
        wald_test(lenet5(), (torch.randn(2, 1, 28, 28), torch.zeros(2, dtype=torch.long)), method="hommel")


def test_wrong_image_size_names_the_layer_and_the_expected_input():
    x = torch.randn(4, 1, 32, 32)
    with pytest.raises(InputError) as info:
        wald_test(lenet5(), (x, torch.zeros(4, dtype=torch.long)))
    message = str(info.value)
    assert "data x of shape (4, 1, 32, 32) does not fit the model" in message
    assert "layer 'fc1' (Linear, expects (N, ..., 800)) received (4, 1250)" in message
    assert "the first layer 'conv1' expects input of shape (N, 1, H, W)" in message
    with pytest.raises(InputError, match=r"layer 'conv1' \(Conv2d, expects \(N, 1, H, W\)\) received \(4, 3, 28, 28\)"):
        wald_test(lenet5(), (torch.randn(4, 3, 28, 28), torch.zeros(4, dtype=torch.long)))


def test_wald_test_takes_a_dataloader():
    from torch.utils.data import DataLoader, TensorDataset

    from pruning.significance import wald_test

    torch.manual_seed(0)
    x = torch.randn(300, 4)
    y = (x[:, 0] > 0).long()
    model = torch.nn.Sequential(torch.nn.Linear(4, 2))
    a = wald_test(model, (x, y), max_samples=None)
    b = wald_test(model, DataLoader(TensorDataset(x, y), batch_size=64), max_samples=None)
    for key in a.z:
        torch.testing.assert_close(a.z[key], b.z[key])


# ---- the sandwich covariance ------------------------------------------------------------------------


@pytest.mark.parametrize("estimator", ["full", "diagonal"])
def test_sandwich_at_tilt_0_is_statsmodels_robust_hc0_covariance(logit_fit, estimator):
    """bread^-1 meat bread^-1 / n with the model Fisher as bread and the outer product of scores as
    meat: statsmodels' heteroscedasticity-robust (HC0) standard errors of the logistic fit; the
    diagonal estimator takes the diagonals of both."""
    X, y, res = logit_fit
    robust = sm.Logit(y, sm.add_constant(X)).fit(disp=0, method="newton", tol=1e-12, maxiter=100, cov_type="HC0")
    model = linear_model(res.params[None, 1:], res.params[:1])
    data = (torch.tensor(X), torch.tensor(y))
    result = wald_test(model, data, estimator=estimator, covariance="sandwich", max_samples=None, damping=0.0)
    se = result.se["out.weight"].numpy().ravel()
    if estimator == "full":
        np.testing.assert_allclose(se, robust.bse[1:], rtol=1e-10)
    else:
        Xc = sm.add_constant(X)
        p = 1 / (1 + np.exp(-(Xc @ res.params)))
        bread = (Xc**2 * (p * (1 - p))[:, None]).mean(0)
        meat = (Xc**2 * ((y - p) ** 2)[:, None]).mean(0)
        np.testing.assert_allclose(se, np.sqrt(meat / bread**2 / len(y))[1:], rtol=1e-10)
    assert not np.allclose(se, res.bse[1:], rtol=1e-3)  # not the Fisher's


def test_sandwich_of_a_tilted_fit_is_the_m_estimators_covariance(logit_fit):
    """A logistic layer fitted to the tilted risk mean_i exp(t l_i) (NRAE's minimiser): its estimating
    equation sum_i psi_i = 0, psi_i = grad exp(t l_i) = t exp(t l_i) grad l_i, gives Cov = A^-1 B A^-1 / n
    with A the Hessian of mean_i exp(t l_i) and B = mean_i psi_i psi_i^T, both computed here directly."""
    X, y, res = logit_fit
    t = 0.7
    Xc = torch.tensor(sm.add_constant(X))
    yt = torch.tensor(y)

    def losses(beta):
        return F.binary_cross_entropy_with_logits(Xc @ beta, yt, reduction="none")

    def risk(beta):
        return torch.exp(t * losses(beta)).mean()

    beta = torch.tensor(res.params).clone().requires_grad_(True)
    optimizer = torch.optim.LBFGS([beta], lr=1, max_iter=500, tolerance_grad=1e-14, tolerance_change=1e-16)

    def closure():
        optimizer.zero_grad()
        value = risk(beta)
        value.backward()
        return value

    optimizer.step(closure)
    beta = beta.detach()
    assert float(torch.autograd.functional.jacobian(risk, beta).norm()) < 1e-7  # a stationary point
    A = torch.autograd.functional.hessian(risk, beta)
    p = torch.sigmoid(Xc @ beta)
    scores = (p - yt)[:, None] * Xc  # grad l_i
    psi = t * torch.exp(t * losses(beta))[:, None] * scores
    B = (psi[:, :, None] * psi[:, None, :]).mean(0)
    cov = torch.linalg.solve(A, torch.linalg.solve(A, B).T) / len(y)
    model = linear_model(beta[None, 1:].numpy(), beta[:1].numpy())
    result = wald_test(
        model, (torch.tensor(X), yt), estimator="full", covariance="sandwich", tilt=t, max_samples=None, damping=0.0
    )
    np.testing.assert_allclose(result.se["out.weight"].numpy().ravel(), cov.diagonal().sqrt()[1:].numpy(), rtol=1e-8)
    plain = wald_test(model, (torch.tensor(X), yt), estimator="full", covariance="sandwich", max_samples=None)
    assert not torch.allclose(plain.se["out.weight"], result.se["out.weight"], rtol=1e-3)  # the tilt matters


def test_sandwich_on_a_softmax_layer_is_finite_and_the_diagonal_projection_matches_the_dense_one(mnlogit_fit):
    """On the centred softmax layer the diagonal sandwich takes P diag(meat) P with P the bread's
    pseudo-inverse on the sum-to-zero subspace: for a layer with one input (no cross-input terms)
    and a diagonal meat it must equal the dense computation on that subspace."""
    X, y, res, coef = mnlogit_fit
    weights = (coef[1:] - coef[1:].mean(1, keepdims=True)).T
    model = linear_model(weights, coef[0] - coef[0].mean())
    data = (torch.tensor(X), torch.tensor(y))
    for estimator in ("full", "diagonal"):
        result = wald_test(model, data, estimator=estimator, covariance="sandwich", tilt=0.3, max_samples=None)
        assert torch.isfinite(result.se["out.weight"]).all() and (result.se["out.weight"] > 0).all()
    bread, meat = torch.tensor([2.0, 0.5, 1.0]), torch.tensor([0.3, 1.2, 0.7])
    from pruning.estimators import DiagonalEstimator, Sandwich

    weight = torch.tensor([[0.2], [-0.5], [0.3]], dtype=torch.float64)
    tests = DiagonalEstimator().layer_tests(
        "out", weight, Sandwich(bread[:, None], meat[:, None]), n=1, damping=0.0, free=torch.tensor([True])
    )
    inv = 1 / bread.double()
    P = torch.diag(inv) - torch.outer(inv, inv) / inv.sum()
    expected = (P @ torch.diag(meat.double()) @ P).diagonal().sqrt()
    torch.testing.assert_close(tests.se.flatten(), expected)


def test_sandwich_options_are_refused_where_they_do_not_apply(logit_fit):
    X, y, res = logit_fit
    model = linear_model(res.params[None, 1:], res.params[:1])
    data = (torch.tensor(X), torch.tensor(y))
    with pytest.raises(InputError, match="needs estimator 'full' or 'diagonal', not 'kfac'"):
        wald_test(model, data, estimator="kfac", covariance="sandwich")
    with pytest.raises(InputError, match="unknown covariance 'robust'"):
        wald_test(model, data, covariance="robust")
    with pytest.raises(InputError, match="tilt is used by covariance='sandwich' only"):
        wald_test(model, data, tilt=1.0)
    with pytest.raises(InputError, match="tilt .* must be a finite number >= 0"):
        wald_test(model, data, estimator="full", covariance="sandwich", tilt=-1.0)
    with pytest.raises(InputError, match="'true_class_sq'"):
        wald_test(model, data, loss="true_class_sq", estimator="full", covariance="sandwich")
