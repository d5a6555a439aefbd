"""Structured surgery removes units and keeps the function of the units that stay.

The reference for each check is the original network with the removed units silenced by hand
(their outgoing weights zeroed, indexed independently of torch-pruning): the surgered network
must compute the same outputs.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from anrat.errors import InputError
from anrat.models import build_model, count_parameters, lenet5, mlp
from pruning.masks import apply_masks
from pruning.surgery import HISTORY_ATTR, prune_units, pruning_history, widths_of


class ConvBNNet(nn.Module):
    """A plain nn.Module (not nn.Sequential): conv-BN-ReLU twice, global average pool, classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 12, 3, padding=1, bias=False)
        self.stem_bn = nn.BatchNorm2d(12)
        self.body = nn.Conv2d(12, 16, 3, padding=1, bias=False)
        self.body_bn = nn.BatchNorm2d(16)
        self.head = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.stem_bn(self.stem(x)))
        x = F.relu(self.body_bn(self.body(x)))
        return self.head(x.mean(dim=(2, 3)))


class TinyResidual(nn.Module):
    """Two convolutions whose outputs are added, so torch-pruning couples their channels."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d(8, 8, 3, padding=1)
        self.head = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.a(x)
        y = y + self.b(F.relu(y))
        return self.head(y.mean(dim=(2, 3)))


def _randomise_batchnorm(model: nn.Module) -> None:
    """Non-trivial BatchNorm statistics, so dropping the wrong channel would show."""
    gen = torch.Generator().manual_seed(7)
    for bn in model.modules():
        if isinstance(bn, nn.BatchNorm2d):
            bn.running_mean.copy_(torch.randn(bn.num_features, generator=gen))
            bn.running_var.copy_(torch.rand(bn.num_features, generator=gen) + 0.5)
            bn.weight.data.copy_(torch.randn(bn.num_features, generator=gen))
            bn.bias.data.copy_(torch.randn(bn.num_features, generator=gen))


def test_lenet5_surgery_keeps_the_function_of_kept_units():
    torch.manual_seed(0)
    model = lenet5().eval()
    reference = copy.deepcopy(model)
    conv1_out, conv2_out, fc1_out = [0, 7, 19], torch.tensor([3, 4, 40, 49]), list(range(0, 500, 2))
    x = torch.randn(8, 1, 28, 28)
    prune_units(model, {"conv1": conv1_out, "conv2": conv2_out, "fc1": fc1_out}, x[:1])

    side = 4  # 28 -conv5-> 24 -pool-> 12 -conv5-> 8 -pool-> 4
    flat_cols = [c * side * side + k for c in conv2_out.tolist() for k in range(side * side)]
    with torch.no_grad():
        reference.conv2.weight[:, conv1_out] = 0
        reference.fc1.weight[:, flat_cols] = 0
        reference.fc2.weight[:, fc1_out] = 0
        torch.testing.assert_close(model(x), reference(x), rtol=0, atol=1e-5)

    assert (model.conv1.out_channels, model.conv2.in_channels) == (17, 17)
    assert (model.conv2.out_channels, model.fc1.in_features) == (46, 46 * 16)
    assert (model.fc1.out_features, model.fc2.in_features, model.fc2.out_features) == (250, 250, 10)
    widths = widths_of(model, "lenet5")
    assert widths == {"conv1": 17, "conv2": 46, "fc1": 250}
    rebuilt = build_model("lenet5", **widths)
    rebuilt.load_state_dict(model.state_dict())  # strict: same names and shapes
    assert count_parameters(rebuilt) == count_parameters(model) < count_parameters(reference)
    assert [e["module"] for e in pruning_history(model)] == ["conv1", "conv2", "fc1"]
    assert pruning_history(model)[1]["units"] == [3, 4, 40, 49]


def test_mlp_surgery_keeps_the_function_of_kept_units():
    torch.manual_seed(1)
    model = mlp(in_features=30, hidden=(64, 32), out_features=4, activation="tanh")
    reference = copy.deepcopy(model)
    fc1_out, fc2_out = list(range(10, 60)), [0, 31]
    x = torch.randn(16, 30)
    prune_units(model, {"fc1": fc1_out, "fc2": fc2_out}, x[:1])

    with torch.no_grad():
        reference.fc2.weight[:, fc1_out] = 0
        reference.fc3.weight[:, fc2_out] = 0
        torch.testing.assert_close(model(x), reference(x), rtol=0, atol=1e-6)
    assert widths_of(model, "mlp") == {"hidden": [14, 30]}
    build_model("mlp", in_features=30, out_features=4, activation="tanh", **widths_of(model, "mlp")).load_state_dict(
        model.state_dict()
    )


def test_custom_module_with_batchnorm_is_shrunk_consistently():
    torch.manual_seed(2)
    model = ConvBNNet()
    _randomise_batchnorm(model)
    model.train()
    reference = copy.deepcopy(model).eval()
    stem_out, body_out = [1, 2, 11], [0, 5, 6, 15]
    x = torch.randn(6, 3, 10, 10)
    prune_units(model, {"stem": stem_out, "body": body_out}, x[:2])

    assert model.training  # torch-pruning's trace switches to eval; the mode is restored
    model.eval()
    assert (model.stem.out_channels, model.stem_bn.num_features, model.body.in_channels) == (9, 9, 9)
    assert (model.body.out_channels, model.body_bn.running_mean.numel(), model.head.in_features) == (12, 12, 12)
    with torch.no_grad():
        reference.body.weight[:, stem_out] = 0  # stem channels reach the output only through body
        reference.head.weight[:, body_out] = 0
        torch.testing.assert_close(model(x), reference(x), rtol=0, atol=1e-5)


def test_output_layer_and_emptying_a_layer_are_refused():
    model = lenet5()
    x = torch.randn(1, 1, 28, 28)
    with pytest.raises(InputError, match="'fc2': they are outputs of the model"):
        prune_units(model, {"fc2": [0]}, x)
    with pytest.raises(InputError, match="all 20 units of 'conv1'"):
        prune_units(model, {"conv1": list(range(20))}, x)
    with pytest.raises(InputError, match=r"in \[0, 500\)"):
        prune_units(model, {"fc1": [500]}, x)
    with pytest.raises(InputError, match="no module 'fc7'"):
        prune_units(model, {"fc7": [0]}, x)
    with pytest.raises(InputError, match="ReLU; only Linear and Conv"):
        prune_units(model, {"relu1": [0]}, x)
    with pytest.raises(InputError, match="LongTensor"):
        prune_units(model, {"fc1": torch.tensor([0.5])}, x)
    assert count_parameters(model) == 431_080  # nothing was removed by the refused calls
    assert not hasattr(model, HISTORY_ATTR)


def test_masked_and_coupled_requests_are_refused():
    model = mlp(in_features=6, hidden=(5,), out_features=2)
    apply_masks(model, {"fc1.weight": torch.ones(5, 6, dtype=torch.bool)})
    with pytest.raises(InputError, match="make_permanent"):
        prune_units(model, {"fc1": [0]}, torch.randn(1, 6))

    residual = TinyResidual()
    x = torch.randn(1, 3, 6, 6)
    with pytest.raises(InputError, match="coupled"):
        prune_units(residual, {"a": [0], "b": [1]}, x)
    prune_units(residual, {"b": [1, 2]}, x)  # one of them prunes both
    assert residual.a.out_channels == residual.b.out_channels == residual.head.in_features == 6


def test_every_registered_model_has_a_width_rule_that_rebuilds_it():
    from anrat.models import MODELS, WIDTH_RULES

    assert set(WIDTH_RULES) == set(MODELS)
    for name in MODELS:
        model = build_model(name)
        build_model(name, **widths_of(model, name)).load_state_dict(model.state_dict())


def test_widths_of_rejects_unknown_architectures():
    with pytest.raises(InputError, match="no width rule for architecture 'resnet'"):
        widths_of(lenet5(), "resnet")
    with pytest.raises(InputError, match="no layer 'conv1'"):
        widths_of(mlp(), "lenet5")
