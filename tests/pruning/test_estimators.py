"""The estimator objects: names map to them, and each inverts its Fisher estimate as defined."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from anrat.errors import InputError
from anrat.models import mlp
from pruning.estimators import (
    ESTIMATORS,
    DiagonalEstimator,
    FisherEstimator,
    FullEstimator,
    KfacEstimator,
    fisher_estimator,
)
from pruning.fisher import KroneckerFactors
from pruning.significance import wald_test


def spd(size: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    root = torch.randn(size, size, generator=g, dtype=torch.float64)
    return root @ root.T + 0.5 * torch.eye(size, dtype=torch.float64)


def weight(out: int, fan_in: int) -> torch.Tensor:
    return torch.randn(out, fan_in, generator=torch.Generator().manual_seed(7), dtype=torch.float64)


def test_names_map_to_one_object_each():
    assert ESTIMATORS == ("kfac", "full", "diagonal")
    for name, cls in zip(ESTIMATORS, (KfacEstimator, FullEstimator, DiagonalEstimator)):
        estimator = fisher_estimator(name)
        assert type(estimator) is cls and estimator.name == name
    custom = FullEstimator(max_params=10)
    assert fisher_estimator(custom) is custom
    for bad in ("exact", None, 3):
        with pytest.raises(InputError, match=r"unknown estimator .*; expected one of \['kfac', 'full', 'diagonal'\]"):
            fisher_estimator(bad)


def test_full_estimator_inverts_the_dense_block():
    """se_j = sqrt([F^-1]_jj / n); chi2_i = w_i^T Cov_ii^-1 w_i with Cov = F^-1 / n, the bias part
    of F^-1 left out of the unit's covariance."""
    w, n = weight(3, 4), 50
    block = spd(3 * 4 + 3, seed=1)  # [W.flatten(), b]
    tests = FullEstimator().layer_tests("fc", w, block, n=n, damping=0.0, free=None)
    cov = torch.linalg.inv(block)[:12, :12] / n
    torch.testing.assert_close(tests.se, cov.diagonal().sqrt().reshape(3, 4), rtol=1e-10, atol=0)
    for i in range(3):
        rows = slice(4 * i, 4 * i + 4)
        expected = w[i] @ torch.linalg.solve(cov[rows, rows], w[i])
        torch.testing.assert_close(tests.unit_chi2[i], expected, rtol=1e-10, atol=0)


def test_kfac_estimator_inverts_the_kronecker_factors():
    """Var W[i, j] = [G^-1]_ii [A^-1]_jj / n, and unit i's covariance is [G^-1]_ii [A^-1]_ww / n."""
    w, n = weight(3, 4), 50
    factors = KroneckerFactors(A=spd(5, seed=2), G=spd(3, seed=3), has_bias=True)
    tests = KfacEstimator().layer_tests("fc", w, factors, n=n, damping=0.0, free=None)
    a_inv, g_inv = torch.linalg.inv(factors.A), torch.linalg.inv(factors.G)
    expected_se = (torch.outer(g_inv.diagonal(), a_inv.diagonal()[:4]) / n).sqrt()
    torch.testing.assert_close(tests.se, expected_se, rtol=1e-10, atol=0)
    # the same as the dense inverse of G (x) A restricted to the unit's weights
    dense_cov = torch.linalg.inv(torch.kron(factors.G, factors.A)) / n
    for i in range(3):
        rows = [5 * i + j for j in range(4)]  # row-major [W | b]: unit i's weights, bias skipped
        cov = dense_cov[rows][:, rows]
        torch.testing.assert_close(tests.unit_chi2[i], w[i] @ torch.linalg.solve(cov, w[i]), rtol=1e-9, atol=0)


def test_diagonal_estimator_divides_by_the_diagonal():
    w, n = weight(3, 4), 50
    diag = spd(12, seed=4).diagonal().reshape(3, 4)
    tests = DiagonalEstimator().layer_tests("fc", w, diag, n=n, damping=0.0, free=None)
    torch.testing.assert_close(tests.se, 1 / (n * diag).sqrt(), rtol=1e-12, atol=0)
    torch.testing.assert_close(tests.unit_chi2, (w / tests.se).square().sum(dim=1), rtol=1e-12, atol=0)


@pytest.mark.parametrize("estimator", [KfacEstimator(), FullEstimator(), DiagonalEstimator()])
def test_a_layer_whose_fisher_is_zero_is_uninformative(estimator):
    w = weight(2, 3)
    estimate = {
        "kfac": KroneckerFactors(torch.zeros(4, 4, dtype=torch.float64), torch.zeros(2, 2, dtype=torch.float64), True),
        "full": torch.zeros(8, 8, dtype=torch.float64),
        "diagonal": torch.zeros(2, 3, dtype=torch.float64),
    }[estimator.name]
    tests = estimator.layer_tests("fc", w, estimate, n=10, damping=1e-6, free=None)
    assert bool(torch.isinf(tests.se).all()) and tests.unit_chi2.tolist() == [0.0, 0.0]


# Standard errors and unit chi-squares that wald_test gave on this model before the estimators were
# objects (the if/elif over estimator names in pruning.significance, commit cf7f0dd).
BEFORE = {
    "kfac": (
        [1.5581472002092365, 1.7317031575662905, 1.6532804790181128, 1.5517176733393292],
        [1.8416000117443103, 1.6315672156509917, 1.619417958720794],
        [0.11795955316923769, 0.24113579629973747, 0.0012935093235140888],
        [0.33651897260086355, 0.8914847015003081, 1.306722404204482],
    ),
    "full": (
        [1.7241225276448722, 1.869186119438986, 1.856825668910861, 1.7380069417559973],
        [1.8446072735177583, 1.6425995359118812, 1.6401717047423932],
        [0.08649998721702966, 0.1244099168318724, 0.0011449447473383667],
        [0.34253306689139523, 0.8337253053861157, 1.2979879185824075],
    ),
    "diagonal": (
        [0.4306891310005052, 0.3905660046959609, 0.4672626609499274, 0.38286975615805924],
        [0.4272229185405186, 0.3995861266267174, 0.409237178624559],
        [2.171032072155884, 0.257164263045688, 0.028253315386824383],
        [0.3468134185441818, 1.38857899245679, 1.2156031040260054],
    ),
}


@pytest.mark.parametrize("name", ESTIMATORS)
def test_each_estimator_object_reproduces_the_earlier_wald_tests(name):
    torch.manual_seed(0)
    model = mlp(4, (3,), 3, "tanh").double()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(64, 4, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (64,), generator=g)
    by_name = wald_test(model, (x, y), estimator=name)
    by_object = wald_test(model, (x, y), estimator=fisher_estimator(name))
    assert by_object.estimator == by_name.estimator == name
    for key in by_name.se:
        assert torch.equal(by_object.se[key], by_name.se[key]) and torch.equal(
            by_object.pvalues[key], by_name.pvalues[key]
        )
    se_row, se_column, chi2_hidden, chi2_output = BEFORE[name]
    rtol = 1e-9
    torch.testing.assert_close(
        by_name.se["fc1.weight"][0], torch.tensor(se_row, dtype=torch.float64), rtol=rtol, atol=0
    )
    torch.testing.assert_close(
        by_name.se["fc2.weight"][:, 0], torch.tensor(se_column, dtype=torch.float64), rtol=rtol, atol=0
    )
    torch.testing.assert_close(
        by_name.unit_chi2["fc1"], torch.tensor(chi2_hidden, dtype=torch.float64), rtol=rtol, atol=0
    )
    torch.testing.assert_close(
        by_name.unit_chi2["fc2"], torch.tensor(chi2_output, dtype=torch.float64), rtol=rtol, atol=0
    )


def test_layer_checks_run_before_any_data_is_read():
    model = nn.Sequential(nn.Conv2d(2, 4, 3, groups=2), nn.Flatten(), nn.Linear(4, 2))
    unreadable = (torch.randn(3, 5), torch.zeros(3, dtype=torch.long))  # does not fit the model
    with pytest.raises(InputError, match=r"estimator 'kfac' supports Conv2d with groups=1; layer '0' has groups=2"):
        wald_test(model, unreadable)
    with pytest.raises(InputError, match=r"limited to 10 parameters per layer; too large: \{'0': 40\}"):
        wald_test(model, unreadable, estimator=FullEstimator(max_params=10))
    assert isinstance(fisher_estimator("diagonal"), FisherEstimator)
    KfacEstimator().check_layers({"fc": nn.Linear(3, 2), "conv": nn.Conv2d(1, 2, 3, padding=1)})  # supported
    with pytest.raises(InputError, match="needs numeric padding"):
        KfacEstimator().check_layers({"conv": nn.Conv2d(1, 2, 3, padding="same")})
    with pytest.raises(InputError, match="supports zero padding"):
        KfacEstimator().check_layers({"conv": nn.Conv2d(1, 2, 3, padding=1, padding_mode="reflect")})
