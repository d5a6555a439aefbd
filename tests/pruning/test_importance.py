"""The importance objects: one formula each, one registry of names, and prune_to_sparsity takes them."""

from __future__ import annotations

import copy

import pytest
import torch

from anrat.data import Split
from anrat.errors import InputError
from anrat.models import mlp
from pruning.fisher import diagonal_fisher, prepare
from pruning.importance import (
    IMPORTANCES,
    Importance,
    MagnitudeImportance,
    OBDImportance,
    TaylorImportance,
    WaldImportance,
    make_importance,
)
from pruning.layers import select_layers
from pruning.prune import FineTune, prune_to_sparsity
from pruning.saliency import magnitude_scores, obd_scores
from pruning.significance import wald_test


def test_magnitude_is_the_absolute_weight(fitted_mlp):
    model, _, _ = fitted_mlp
    scores = MagnitudeImportance()(model)
    assert list(scores) == ["fc1.weight", "fc2.weight"]
    for name, param in model.named_parameters():
        if name in scores:
            assert scores[name].dtype == torch.float64 and torch.equal(scores[name], param.detach().abs())
    assert list(MagnitudeImportance(layers=["fc2"])(model)) == ["fc2.weight"]
    assert all(torch.equal(scores[n], s) for n, s in magnitude_scores(model).items())  # the functional twin


@pytest.mark.parametrize("fisher", ["model", "empirical"])
def test_obd_is_half_the_diagonal_fisher_times_the_squared_weight(fitted_mlp, fisher):
    model, x, y = fitted_mlp
    scores = OBDImportance(fisher=fisher, max_samples=200, seed=3)(model, (x, y))
    layers = select_layers(model)
    fd = prepare(model, (x, y), layers=layers, max_samples=200, seed=3)
    diagonal = diagonal_fisher(model, fd, ["fc1.weight", "fc2.weight"], fisher=fisher)
    params = dict(model.named_parameters())
    for name in ("fc1.weight", "fc2.weight"):
        torch.testing.assert_close(scores[name], 0.5 * diagonal[name] * params[name].detach() ** 2, rtol=0, atol=0)
    twin = obd_scores(model, (x, y), fisher=fisher, max_samples=200, seed=3)
    assert all(torch.equal(twin[n], scores[n]) for n in scores)


def test_wald_is_the_absolute_z_and_puts_the_softmax_layer_in_its_tested_form(fitted_mlp):
    model, x, y = fitted_mlp
    model = copy.deepcopy(model)
    expected = wald_test(model, (x, y), estimator="full")
    before = model(x).detach()
    scores = WaldImportance(estimator="full")(model, (x, y))
    assert all(torch.equal(scores[n], expected.z[n].abs()) for n in expected.z)
    torch.testing.assert_close(model(x).detach().softmax(1), before.softmax(1), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(
        model.fc2.weight.detach().sum(0), torch.zeros(4, dtype=torch.float64), rtol=0, atol=1e-12
    )
    # the scores now describe the weights the model holds: testing it again gives the same |z|
    again = wald_test(model, (x, y), estimator="full")
    torch.testing.assert_close(again.z["fc2.weight"].abs(), scores["fc2.weight"], rtol=1e-8, atol=0)


def test_names_map_to_the_classes_with_the_options_each_takes():
    assert IMPORTANCES == {
        "magnitude": MagnitudeImportance,
        "obd": OBDImportance,
        "taylor": TaylorImportance,
        "wald": WaldImportance,
    }
    assert make_importance("magnitude", loss="lp", max_samples=5) == MagnitudeImportance()
    assert make_importance("obd", loss="lp", max_samples=5) == OBDImportance(loss="lp", max_samples=5)
    assert make_importance("wald", loss="lp", max_samples=5) == WaldImportance(loss="lp", max_samples=5)
    custom = OBDImportance(fisher="empirical")
    assert make_importance(custom, loss="lp") is custom
    assert all(isinstance(make_importance(name), Importance) for name in IMPORTANCES)
    with pytest.raises(
        InputError,
        match=r"unknown pruning criterion 'random'; expected one of \['magnitude', 'obd', 'taylor', 'wald'\]",
    ):
        make_importance("random")


def test_prune_to_sparsity_takes_an_importance_or_its_name():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(400, 6, generator=g)
    split = Split(x, (x[:, 0] > x[:, 1]).long())
    torch.manual_seed(0)
    model = mlp(6, (5,), 2)
    no_tuning = FineTune(epochs=0)
    by_name = prune_to_sparsity(
        copy.deepcopy(model),
        split,
        split,
        criterion="obd",
        fraction_removed=0.5,
        fine_tune_config=no_tuning,
        max_samples=100,
    )
    by_object = prune_to_sparsity(
        copy.deepcopy(model),
        split,
        split,
        criterion=OBDImportance(max_samples=100),
        fraction_removed=0.5,
        fine_tune_config=no_tuning,
    )
    assert by_name.rounds[0]["criterion"] == by_object.rounds[0]["criterion"] == "obd"
    for key, value in by_name.model.state_dict().items():
        assert torch.equal(by_object.model.state_dict()[key], value), key
    with pytest.raises(InputError, match="unknown pruning criterion 'random'"):
        prune_to_sparsity(copy.deepcopy(model), split, split, criterion="random", fraction_removed=0.5)


def test_taylor_scores_are_the_summed_squares_of_minibatch_gradient_times_weight():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(64, 3, generator=g)
    x[:, 2] = 0.0  # an input that is always zero: its weights change nothing, their score is 0
    y = (x[:, 0] > 0).long()
    model = torch.nn.Sequential(torch.nn.Linear(3, 2))
    scores = TaylorImportance(batch_size=16, max_samples=None)(model, (x, y))
    expected = torch.zeros(2, 3, dtype=torch.float64)
    w = model[0].weight
    for start in range(0, 64, 16):
        loss = torch.nn.functional.cross_entropy(model(x[start : start + 16]), y[start : start + 16])
        (grad,) = torch.autograd.grad(loss, [w])
        expected += (grad * w).detach().double().square()
    assert torch.allclose(scores["0.weight"], expected, rtol=1e-5, atol=1e-12)
    assert (scores["0.weight"][:, 2] == 0).all() and (scores["0.weight"][:, :2] > 0).all()
