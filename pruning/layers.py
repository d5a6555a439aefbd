"""Which layers of a network the pruning stage works on, and which one produces its output.

The prunable layers are the ``nn.Linear`` and ``nn.Conv2d`` modules (:data:`PRUNABLE_TYPES`): their
weights are tested (:mod:`pruning.significance`), scored (:mod:`pruning.importance`), masked while
fine-tuning and their units removed (:mod:`pruning.surgery`). A *unit* is a row of a Linear
weight (a neuron's incoming weights) or an output channel of a Conv2d weight (a filter). Every
module of :mod:`pruning` asks this one for these facts.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence

import torch
from torch import Tensor, nn

from anrat.errors import InputError

PRUNABLE_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv2d)


def is_prunable(module: nn.Module) -> bool:
    """True for a module whose weights and units the pruning stage handles (:data:`PRUNABLE_TYPES`)."""
    return isinstance(module, PRUNABLE_TYPES)


def is_convolution(module: nn.Module) -> bool:
    """True for a prunable convolution: its units are channels, which run fastest in blocks."""
    return isinstance(module, nn.Conv2d)


def prunable_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Every prunable layer of ``model`` by module name, in ``named_modules`` order (may be empty)."""
    return {name: module for name, module in model.named_modules() if is_prunable(module)}


def num_units(module: nn.Module) -> int:
    """Units of a prunable layer: ``out_features`` of a Linear, ``out_channels`` of a Conv2d."""
    return module.out_features if isinstance(module, nn.Linear) else module.out_channels


def select_layers(model: nn.Module, layers: Sequence[str] | str | None = None) -> dict[str, nn.Module]:
    """The prunable layers of ``model`` (in ``named_modules`` order), or the ones named in
    ``layers``; an :class:`InputError` when there are none or a name is not a prunable layer."""
    available = prunable_layers(model)
    if not available:
        raise InputError(
            f"model {type(model).__name__} has no nn.Linear or nn.Conv2d layer; only their weights can be tested"
        )
    if layers is None:
        return available
    names = [layers] if isinstance(layers, str) else list(layers)
    if not names:
        raise InputError(f"layers is empty; name at least one of {list(available)} or pass None for all")
    unknown = [name for name in names if name not in available]
    if unknown:
        raise InputError(f"unknown or untestable layer name(s) {unknown}; testable layers are {list(available)}")
    return {name: available[name] for name in dict.fromkeys(names)}


def weight_name(layer: str) -> str:
    """Parameter name of a layer's weight as in ``model.named_parameters()`` (``"fc1.weight"``)."""
    return f"{layer}.weight" if layer else "weight"


def bias_name(layer: str) -> str:
    """Parameter name of a layer's bias as in ``model.named_parameters()`` (``"fc1.bias"``)."""
    return f"{layer}.bias" if layer else "bias"


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Put every submodule in eval mode for the block and restore each one's flag afterwards."""
    flags = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in flags:
            module.training = training


def output_layer(model: nn.Module, example_input: Tensor) -> str | None:
    """Name of the prunable layer whose output *is* the model's output (the logits layer), found
    by one forward pass of ``example_input`` (eval mode, no gradients); None when no prunable
    layer produces the output directly (e.g. the model ends in an activation or a sum).

    Its units are the model's outputs, so they are never removed. Tracing rather than taking the
    last Linear layer also covers models that end in a convolution or define their layers out of
    call order.
    """
    outputs: dict[str, Tensor] = {}

    def capture(name: str) -> Callable[..., None]:
        def hook(module: nn.Module, inputs: object, output: object) -> None:
            if isinstance(output, Tensor):
                outputs[name] = output

        return hook

    handles = [module.register_forward_hook(capture(name)) for name, module in prunable_layers(model).items()]
    try:
        with eval_mode(model), torch.no_grad():
            z = model(example_input)
    finally:
        for handle in handles:
            handle.remove()
    return _producer(outputs, z)


def _producer(outputs: dict[str, Tensor], z: object) -> str | None:
    """The name whose captured output is the tensor ``z`` itself (same storage and shape); the
    last one in call order if several are (a module called twice keeps its last output)."""
    if not isinstance(z, Tensor):
        return None
    found = None
    for name, out in outputs.items():
        if out.shape == z.shape and out.data_ptr() == z.data_ptr():
            found = name
    return found


__all__ = [
    "PRUNABLE_TYPES",
    "bias_name",
    "eval_mode",
    "is_convolution",
    "is_prunable",
    "num_units",
    "output_layer",
    "prunable_layers",
    "select_layers",
    "weight_name",
]
