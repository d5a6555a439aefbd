"""Which layers pruning works on, and which one produces the model's output."""

from collections import OrderedDict

import pytest
import torch
from torch import nn

from anrat.errors import InputError
from anrat.models import lenet5, mlp
from pruning.layers import eval_mode, num_units, output_layer, prunable_layers, select_layers


class HeadFirst(nn.Module):
    """The output layer is defined before the hidden one: the last Linear in definition order is
    not the output layer."""

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(6, 3)
        self.body = nn.Conv1d(2, 2, 1)
        self.hidden = nn.Linear(4, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.hidden(x)))


def test_prunable_layers_are_the_linear_and_conv2d_modules_in_module_order():
    assert list(prunable_layers(lenet5())) == ["conv1", "conv2", "fc1", "fc2"]
    assert list(prunable_layers(HeadFirst())) == ["head", "hidden"]  # Conv1d is not tested nor pruned
    assert prunable_layers(nn.Sequential(nn.ReLU())) == {}
    model = lenet5()
    assert [num_units(m) for m in prunable_layers(model).values()] == [20, 50, 500, 10]


def test_output_layer_is_traced_not_guessed():
    assert output_layer(lenet5(), torch.randn(2, 1, 28, 28)) == "fc2"
    assert output_layer(mlp(5, (4, 3), 2), torch.randn(2, 5)) == "fc3"
    assert output_layer(HeadFirst(), torch.randn(2, 4)) == "head"
    ends_in_activation = nn.Sequential(OrderedDict(fc=nn.Linear(3, 2), act=nn.Tanh()))
    assert output_layer(ends_in_activation, torch.randn(2, 3)) is None


def test_output_layer_leaves_the_model_as_it_was():
    model = nn.Sequential(OrderedDict(fc=nn.Linear(3, 4), bn=nn.BatchNorm1d(4), out=nn.Linear(4, 2))).train()
    before = model.bn.running_mean.clone()
    assert output_layer(model, torch.randn(8, 3) + 5) == "out"
    assert model.training and model.bn.training
    assert torch.equal(model.bn.running_mean, before)  # evaluated in eval mode: statistics untouched
    assert not any(m._forward_hooks for m in model.modules())


def test_eval_mode_restores_each_module_s_own_flag():
    model = nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.5))
    model[1].eval()
    with eval_mode(model):
        assert not any(m.training for m in model.modules())
    assert model.training and model[0].training and not model[1].training


def test_select_layers_names_the_prunable_layers_or_refuses():
    model = mlp(5, (4,), 3)
    assert list(select_layers(model)) == ["fc1", "fc2"]
    assert list(select_layers(model, ["fc2", "fc1", "fc2"])) == ["fc2", "fc1"]
    assert list(select_layers(model, "fc2")) == ["fc2"]
    with pytest.raises(
        InputError, match=r"untestable layer name\(s\) \['act1'\]; testable layers are \['fc1', 'fc2'\]"
    ):
        select_layers(model, ["act1"])
    with pytest.raises(InputError, match="has no nn.Linear or nn.Conv2d layer"):
        select_layers(nn.Sequential(nn.Conv1d(1, 1, 1)))
