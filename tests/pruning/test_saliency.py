"""Baseline scores (magnitude, OBD) and masks at a target sparsity, next to the Wald scores."""

from __future__ import annotations

import math
from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from anrat.errors import InputError
from anrat.models import mlp
from pruning.saliency import magnitude_scores, masks_at_sparsity, obd_scores
from pruning.significance import wald_test


def test_magnitude_masks_remove_exactly_the_smallest_weights(fitted_mlp):
    model, _, _ = fitted_mlp
    scores = magnitude_scores(model)
    assert set(scores) == {"fc1.weight", "fc2.weight"}
    torch.testing.assert_close(scores["fc1.weight"], model.fc1.weight.detach().abs())
    masks = masks_at_sparsity(scores, 0.4)
    weights = torch.cat([model.fc1.weight.detach().ravel(), model.fc2.weight.detach().ravel()]).abs()
    keep = torch.cat([masks["fc1.weight"].ravel(), masks["fc2.weight"].ravel()])
    assert int((~keep).sum()) == round(0.4 * weights.numel())  # 14 of 32
    assert float(weights[~keep].max()) < float(weights[keep].min())
    assert masks["fc1.weight"].dtype == torch.bool and masks["fc1.weight"].shape == (4, 5)


@pytest.mark.parametrize("sparsity", [0.0, 0.1, 0.5, 0.9, 0.99])
def test_masks_hit_the_requested_fraction_globally_and_per_layer(sparsity):
    g = torch.Generator().manual_seed(1)
    scores = {"a.weight": torch.rand(7, 11, generator=g), "b.weight": torch.rand(3, 2, 5, 5, generator=g)}
    total = 77 + 150
    removed = sum(int((~m).sum()) for m in masks_at_sparsity(scores, sparsity).values())
    assert removed == math.floor(sparsity * total + 0.5)
    for name, mask in masks_at_sparsity(scores, sparsity, scope="layer").items():
        assert int((~mask).sum()) == math.floor(sparsity * scores[name].numel() + 0.5)
        if not bool(mask.all()):
            assert float(scores[name][~mask].max()) < float(scores[name][mask].min())


def test_ties_are_broken_so_exactly_the_requested_count_is_removed():
    masks = masks_at_sparsity({"w": torch.ones(10)}, 0.3)
    assert masks["w"].tolist() == [False] * 3 + [True] * 7


def test_obd_is_half_the_diagonal_fisher_times_the_squared_weight(fitted_mlp):
    """F_jj from its definition, sum_k pi_k (d(-log pi_k)/dw_j)^2 averaged over samples, by autograd."""
    model, x, y = fitted_mlp
    scores = obd_scores(model, (x, y), max_samples=None)
    params = dict(model.named_parameters())
    fisher = {name: torch.zeros_like(params[name]) for name in scores}
    for i in range(x.shape[0]):
        z = model(x[i : i + 1])
        pi = torch.softmax(z.detach()[0], 0)
        for k in range(3):
            grads = torch.autograd.grad(
                F.cross_entropy(z, torch.tensor([k])), [params[n] for n in fisher], retain_graph=True
            )
            for name, g in zip(fisher, grads):
                fisher[name] += pi[k] * g**2
    for name in scores:
        expected = 0.5 * fisher[name] / x.shape[0] * params[name].detach() ** 2
        torch.testing.assert_close(scores[name], expected, rtol=1e-9, atol=1e-15)
    # OBD ranks differently from magnitude here: the two inputs that matter carry the curvature.
    magnitude = magnitude_scores(model)
    assert not all(torch.equal(masks_at_sparsity(scores, 0.5)[n], masks_at_sparsity(magnitude, 0.5)[n]) for n in scores)


def test_three_methods_reach_the_same_sparsity(fitted_mlp):
    model, x, y = fitted_mlp
    wald = wald_test(model, (x, y))
    assert wald.scores().keys() == magnitude_scores(model).keys()
    for scores in (magnitude_scores(model), obd_scores(model, (x, y)), wald.scores()):
        masks = masks_at_sparsity(scores, 0.25)
        assert sum(int((~m).sum()) for m in masks.values()) == 8
    # Holm rejects a prefix of the p-values in increasing order, i.e. the largest |z|: cutting the
    # |z| ranking at the tested sparsity gives back the Wald masks.
    pruned = sum(int((~keep).sum()) for keep in wald.significant.values())
    assert 0 < pruned < 32
    cut = masks_at_sparsity(wald.scores(), pruned / 32)
    assert all(torch.equal(cut[name], wald.masks()[name]) for name in cut)


def test_layers_option_restricts_scores(fitted_mlp):
    model, x, y = fitted_mlp
    assert set(magnitude_scores(model, ["fc2"])) == {"fc2.weight"}
    assert set(obd_scores(model, (x, y), layers=["fc1"], fisher="empirical")) == {"fc1.weight"}


def test_bad_input():
    scores = {"w": torch.rand(4)}
    with pytest.raises(InputError, match=r"sparsity must be a fraction in \[0, 1\), got 1.0"):
        masks_at_sparsity(scores, 1.0)
    with pytest.raises(InputError, match=r"sparsity must be a fraction in \[0, 1\), got -0.1"):
        masks_at_sparsity(scores, -0.1)
    with pytest.raises(InputError, match=r"unknown scope 'net'; expected one of \['global', 'layer'\]"):
        masks_at_sparsity(scores, 0.5, scope="net")
    with pytest.raises(InputError, match=r"scores\['w'\] must be a tensor of finite numbers"):
        masks_at_sparsity({"w": torch.tensor([1.0, float("nan")])}, 0.5)
    with pytest.raises(InputError, match="has no nn.Linear or nn.Conv2d layer"):
        magnitude_scores(nn.Sequential(OrderedDict(act=nn.ReLU())))
    with pytest.raises(InputError, match=r"unknown or untestable layer name\(s\) \['fc3'\]"):
        obd_scores(mlp(5, (4,), 3), (torch.randn(4, 5), torch.zeros(4, dtype=torch.long)), layers=["fc3"])
