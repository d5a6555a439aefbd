"""The networks the toolkit trains, built by name from plain arguments.

A model is described by ``(name, kwargs)`` with JSON-able kwargs, so a checkpoint can rebuild it
without pickled code. Structured pruning changes the widths; each model's width rule
(:data:`WIDTH_RULES`, next to its builder) reads the new widths off the pruned network as keyword
arguments, the pruned checkpoint stores them and :func:`build_model` rebuilds the smaller network.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from anrat.errors import InputError

#: Reads the width keyword arguments of a registered model off a (pruned) network of that model.
WidthRule = Callable[[nn.Module], dict[str, Any]]


def _layer_units(model: nn.Module, arch: str, layers: Mapping[str, type[nn.Module]]) -> dict[str, int]:
    """``{name: units}`` of the named layers (out_channels of a Conv2d, out_features of a Linear),
    each checked to be of the given type."""
    modules = dict(model.named_modules())
    widths = {}
    for name, kind in layers.items():
        layer = modules.get(name)
        if not isinstance(layer, kind):
            raise InputError(f"model has no layer {name!r}, so it is not a {arch}")
        widths[name] = layer.out_channels if isinstance(layer, nn.Conv2d) else layer.out_features
    return widths


def _conv_out(size: int, kernel: int) -> int:
    """Spatial size after a valid 'kernel'x'kernel' convolution and a 2x2 max-pool."""
    return (size - kernel + 1) // 2


def _two_conv_net(
    conv1: int, conv2: int, fc1: int, num_classes: int, in_channels: int, image_size: int, dropout: float | None
) -> nn.Sequential:
    """conv 5x5 -> pool 2 -> ReLU -> conv 5x5 -> pool 2 -> ReLU -> Linear -> ReLU [-> Dropout] -> Linear."""
    side = _conv_out(_conv_out(image_size, 5), 5)
    layers: OrderedDict[str, nn.Module] = OrderedDict(
        conv1=nn.Conv2d(in_channels, conv1, 5),
        pool1=nn.MaxPool2d(2),
        relu1=nn.ReLU(),
        conv2=nn.Conv2d(conv1, conv2, 5),
        pool2=nn.MaxPool2d(2),
        relu2=nn.ReLU(),
        flatten=nn.Flatten(),
        fc1=nn.Linear(conv2 * side * side, fc1),
        relu3=nn.ReLU(),
    )
    if dropout is not None:
        layers["dropout"] = nn.Dropout(dropout)
    layers["fc2"] = nn.Linear(fc1, num_classes)
    return nn.Sequential(layers)


def lenet5(
    conv1: int = 20,
    conv2: int = 50,
    fc1: int = 500,
    num_classes: int = 10,
    in_channels: int = 1,
    image_size: int = 28,
) -> nn.Sequential:
    """The paper's LeNet-5-like ConvNet: 20 and 50 5x5 filters, 2x2 max-pooling, 500 hidden units.

    With the defaults it has 431,080 parameters. The last Linear layer is named ``fc2`` (the
    "softmax layer" that the paper's L2 prior applies to).
    """
    return _two_conv_net(conv1, conv2, fc1, num_classes, in_channels, image_size, dropout=None)


def lenet5_widths(model: nn.Module) -> dict[str, int]:
    """Width arguments of a (pruned) :func:`lenet5`: ``{"conv1": filters, "conv2": filters, "fc1": units}``."""
    return _layer_units(model, "lenet5", {"conv1": nn.Conv2d, "conv2": nn.Conv2d, "fc1": nn.Linear})


def convnet_dropout(
    conv1: int = 32,
    conv2: int = 32,
    fc1: int = 256,
    num_classes: int = 10,
    in_channels: int = 1,
    image_size: int = 28,
    dropout: float = 0.5,
) -> nn.Sequential:
    """The original ANRAT code's ConvNet: 32 and 32 5x5 filters, 256 hidden units, dropout 0.5."""
    return _two_conv_net(conv1, conv2, fc1, num_classes, in_channels, image_size, dropout=dropout)


def convnet_dropout_widths(model: nn.Module) -> dict[str, int]:
    """Width arguments of a (pruned) :func:`convnet_dropout`: as :func:`lenet5_widths`."""
    return _layer_units(model, "convnet_dropout", {"conv1": nn.Conv2d, "conv2": nn.Conv2d, "fc1": nn.Linear})


_ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {"relu": nn.ReLU, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid}


def mlp(
    in_features: int = 784,
    hidden: Sequence[int] = (500,),
    out_features: int = 10,
    activation: str = "relu",
) -> nn.Sequential:
    """A fully connected network ``in -> hidden[0] -> ... -> out``; inputs are flattened first.

    Layers are named ``fc1``, ``fc2``, ...; the last one is the output layer.
    """
    if activation not in _ACTIVATIONS:
        raise InputError(f"unknown activation {activation!r}; expected one of {sorted(_ACTIVATIONS)}")
    widths = [in_features, *hidden, out_features]
    layers: OrderedDict[str, nn.Module] = OrderedDict(flatten=nn.Flatten())
    for i, (fan_in, fan_out) in enumerate(zip(widths[:-1], widths[1:]), start=1):
        layers[f"fc{i}"] = nn.Linear(fan_in, fan_out)
        if i < len(widths) - 1:
            layers[f"act{i}"] = _ACTIVATIONS[activation]()
    return nn.Sequential(layers)


def mlp_widths(model: nn.Module) -> dict[str, list[int]]:
    """Width arguments of a (pruned) :func:`mlp`: ``{"hidden": [units of each hidden layer]}``."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise InputError("model has no Linear layers, so it is not an mlp")
    return {"hidden": [m.out_features for m in linears[:-1]]}


class ReLUSum(nn.Module):
    """``x -> scale * sum_j relu(w_j . x) + shift``: Safran & Shamir's two-layer network, whose
    output weights are fixed at 1 and which has no biases; only ``fc1.weight`` (the rows ``w_j``)
    is trained. ``scale`` and ``shift`` are constants (buffers), so a standardised target of such a
    network is fitted exactly by its rows."""

    def __init__(self, in_features: int, hidden: int, scale: float = 1.0, shift: float = 0.0) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden, bias=False)
        self.register_buffer("scale", torch.tensor(float(scale)))
        self.register_buffer("shift", torch.tensor(float(shift)))

    def forward(self, x: Tensor) -> Tensor:
        return torch.relu(self.fc1(x.flatten(1))).sum(dim=1, keepdim=True) * self.scale + self.shift


def relu_sum(in_features: int = 10, hidden: int = 10, scale: float = 1.0, shift: float = 0.0) -> ReLUSum:
    """:class:`ReLUSum` with ``hidden`` units on ``in_features`` inputs."""
    return ReLUSum(in_features, hidden, scale, shift)


def relu_sum_widths(model: nn.Module) -> dict[str, int]:
    """Width arguments of a (pruned) :func:`relu_sum`: ``{"hidden": units}``."""
    return {"hidden": _layer_units(model, "relu_sum", {"fc1": nn.Linear})["fc1"]}


MODELS: dict[str, Callable[..., nn.Module]] = {
    "lenet5": lenet5,
    "convnet_dropout": convnet_dropout,
    "mlp": mlp,
    "relu_sum": relu_sum,
}

#: Each registered model's width rule: merged into its kwargs, the widths read off a pruned
#: network rebuild it with :func:`build_model`.
WIDTH_RULES: dict[str, WidthRule] = {
    "lenet5": lenet5_widths,
    "convnet_dropout": convnet_dropout_widths,
    "mlp": mlp_widths,
    "relu_sum": relu_sum_widths,
}


def build_model(name: str, **kwargs: Any) -> nn.Module:
    """Build a registered model from its name and keyword arguments (as stored in checkpoints)."""
    if name not in MODELS:
        raise InputError(f"unknown model {name!r}; expected one of {sorted(MODELS)}")
    try:
        return MODELS[name](**kwargs)
    except TypeError as exc:  # wrong keyword for this architecture
        raise InputError(f"bad arguments for model {name!r}: {exc}") from None


def count_parameters(model: nn.Module) -> int:
    """Number of scalar parameters."""
    return sum(p.numel() for p in model.parameters())


__all__ = [
    "MODELS",
    "WIDTH_RULES",
    "WidthRule",
    "build_model",
    "convnet_dropout",
    "convnet_dropout_widths",
    "count_parameters",
    "lenet5",
    "lenet5_widths",
    "mlp",
    "mlp_widths",
    "ReLUSum",
    "relu_sum",
    "relu_sum_widths",
]
