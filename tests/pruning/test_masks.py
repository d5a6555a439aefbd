"""Unstructured masks follow torch.nn.utils.prune: reparametrisation, combination, exact zeros."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.utils import prune

from anrat.errors import InputError
from anrat.models import lenet5, mlp
from pruning.masks import apply_masks, count_nonzero, count_total, make_permanent, permanent_copy, sparsity


def _random_masks(model: nn.Module, keep: float, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """A bool keep-mask for every weight matrix/kernel, keeping about ``keep`` of the entries."""
    return {
        name: torch.rand(p.shape, generator=generator) < keep
        for name, p in model.named_parameters()
        if name.endswith("weight")
    }


def test_masks_reparametrise_like_torch_prune():
    torch.manual_seed(0)
    model = lenet5()
    fc1_before = model.fc1.weight.detach().clone()
    masks = _random_masks(model, keep=0.3, generator=torch.Generator().manual_seed(1))
    apply_masks(model, masks)

    assert prune.is_pruned(model)
    names = dict(model.named_parameters())
    buffers = dict(model.named_buffers())
    assert "fc1.weight_orig" in names and "fc1.weight" not in names
    assert torch.equal(buffers["fc1.weight_mask"], masks["fc1.weight"].float())
    assert torch.equal(model.fc1.weight_orig.detach(), fc1_before)  # the trainable copy is untouched
    assert torch.equal(model.fc1.weight, fc1_before * masks["fc1.weight"])
    assert "fc1.bias" in names  # parameters without a mask stay plain


def test_masks_combine_across_rounds():
    model = mlp(in_features=20, hidden=(16,), out_features=4)
    gen = torch.Generator().manual_seed(2)
    first = torch.rand(16, 20, generator=gen) < 0.6
    second = torch.rand(16, 20, generator=gen) < 0.6
    apply_masks(model, {"fc1.weight": first})
    apply_masks(model, {"fc1.weight": second})

    combined = first & second
    assert torch.equal(model.fc1.weight_mask.bool(), combined)
    # a weight pruned in the first round stays pruned even though the second mask keeps it
    revived = ~first & second
    assert revived.any()
    assert torch.all(model.fc1.weight[revived] == 0)
    assert count_nonzero(model) == int(combined.sum()) + sum(
        int(torch.count_nonzero(p)) for n, p in model.named_parameters() if not n.startswith("fc1.weight")
    )


def test_fine_tuning_keeps_pruned_weights_exactly_zero():
    torch.manual_seed(3)
    model = lenet5()
    masks = _random_masks(model, keep=0.2, generator=torch.Generator().manual_seed(4))
    apply_masks(model, masks)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-2)
    x, y = torch.randn(16, 1, 28, 28), torch.randint(0, 10, (16,))
    fc1_orig_start = model.fc1.weight_orig.detach().clone()
    for _ in range(4):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()

    assert not torch.equal(model.fc1.weight_orig.detach(), fc1_orig_start)  # training did move the weights
    model(x)  # the pre-hook refreshes the effective weights
    for name, mask in masks.items():
        module = model.get_submodule(name.rpartition(".")[0])
        assert torch.all(module.weight[~mask] == 0), name
        assert torch.all(module.weight[mask] != 0), name  # kept weights trained, not zeroed

    make_permanent(model)
    assert not prune.is_pruned(model)
    assert "fc1.weight_orig" not in dict(model.named_parameters())
    for name, mask in masks.items():
        param = model.get_parameter(name)
        assert isinstance(param, nn.Parameter)
        assert torch.all(param[~mask] == 0), name


def test_count_nonzero_and_sparsity_match_the_masks():
    torch.manual_seed(5)
    model = lenet5()
    masks = _random_masks(model, keep=0.1, generator=torch.Generator().manual_seed(6))
    apply_masks(model, masks)
    biases = sum(p.numel() for n, p in model.named_parameters() if n.endswith("bias"))
    expected_nonzero = sum(int(m.sum()) for m in masks.values()) + biases  # random init: no zero biases

    assert count_total(model) == 431_080
    assert count_nonzero(model) == expected_nonzero
    assert sparsity(model) == pytest.approx(1 - expected_nonzero / 431_080)
    copy = permanent_copy(model)
    assert prune.is_pruned(model) and not prune.is_pruned(copy)
    assert count_nonzero(copy) == expected_nonzero


def test_bad_masks_are_refused_before_anything_is_pruned():
    model = mlp(in_features=8, hidden=(4,), out_features=2)
    good = torch.ones(4, 8, dtype=torch.bool)
    with pytest.raises(InputError, match="no module 'fc9'"):
        apply_masks(model, {"fc1.weight": good, "fc9.weight": good})
    with pytest.raises(InputError, match="has only"):
        apply_masks(model, {"fc1.kernel": good})
    with pytest.raises(InputError, match="bool tensor"):
        apply_masks(model, {"fc1.weight": good.float()})
    with pytest.raises(InputError, match=r"shape \(8, 4\)"):
        apply_masks(model, {"fc1.weight": good.T})
    assert not prune.is_pruned(model)
