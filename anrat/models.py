"""The networks the toolkit trains, built by name from plain arguments.

A model is described by ``(name, kwargs)`` with JSON-able kwargs, so a checkpoint can rebuild it
without pickled code. Structured pruning changes the widths; the pruned checkpoint stores the new
widths and :func:`build_model` rebuilds the smaller network from them.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Callable, Sequence


from torch import nn

from anrat.errors import InputError


def _conv_out(size: int, kernel: int) -> int:
    """Spatial size after a valid 'kernel'x'kernel' convolution and a 2x2 max-pool."""
    return (size - kernel + 1) // 2


def _two_conv_net(conv1: int, conv2: int, fc1: int, num_classes: int, in_channels: int, image_size: int,
                  dropout: float | None) -> nn.Sequential:
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


MODELS: dict[str, Callable[..., nn.Module]] = {
    "lenet5": lenet5,
    "convnet_dropout": convnet_dropout,
    "mlp": mlp,
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


def output_layer_name(model: nn.Module) -> str:
    """Name of the last Linear layer, the one the paper's L2 prior ("softmax layer") applies to."""
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not names:
        raise InputError("model has no Linear layer")
    return names[-1]


def num_outputs(model: nn.Module) -> int:
    layer = dict(model.named_modules())[output_layer_name(model)]
    assert isinstance(layer, nn.Linear)
    return layer.out_features


__all__ = [
    "MODELS",
    "build_model",
    "convnet_dropout",
    "count_parameters",
    "lenet5",
    "mlp",
    "num_outputs",
    "output_layer_name",
]

