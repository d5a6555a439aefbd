"""Structured surgery: physically remove output units and shrink the layers that read them.

Removing unit ``j`` of a layer deletes row ``j`` of a Linear weight (or output channel ``j`` of a
convolution) with its bias entry, and the matching inputs of every layer that consumes it: the
next convolution's input channel, the ``H*W`` columns a Flatten maps that channel to in the next
Linear, a BatchNorm's statistics, and so on. torch-pruning's :class:`DependencyGraph` traces the
model once and works out these coupled slices for any ``nn.Module`` (not only ``nn.Sequential``),
so this module only validates the request and hands each layer to it.

For a network whose removed units carry no signal (their outgoing weights are zero), surgery does
not change the function; in general the smaller network computes what the original computes with
the removed units' activations dropped.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch_pruning as tp
from torch import nn
from torch.nn.utils import prune

from anrat.errors import InputError
from anrat.models import WIDTH_RULES
from pruning.layers import is_convolution, num_units

#: Attribute of a model where :func:`prune_units` appends what it removed (see :func:`pruning_history`).
HISTORY_ATTR = "anrat_pruning_history"

ExampleInputs = torch.Tensor | Sequence[torch.Tensor]


def _out_pruning_fn(name: str, module: nn.Module) -> Any:
    """torch-pruning's function that removes output units of a prunable ``module``."""
    if isinstance(module, nn.Linear):
        return tp.prune_linear_out_channels
    if is_convolution(module):
        return tp.prune_conv_out_channels
    raise InputError(
        f"module {name!r} is a {type(module).__name__}; only Linear and Conv2d layers have units to remove"
    )


def _unit_list(name: str, units: Any, num_units: int) -> list[int]:
    """Sorted distinct unit indices, checked to lie in ``[0, num_units)`` and to leave one unit."""
    tensor = torch.as_tensor(units)
    if tensor.dim() != 1 or (tensor.numel() and (tensor.dtype.is_floating_point or tensor.dtype == torch.bool)):
        raise InputError(
            f"units for {name!r} must be a 1-D list or LongTensor of indices, got {tensor.dtype} {tuple(tensor.shape)}"
        )
    idxs = sorted({int(i) for i in tensor.tolist()})
    if idxs and (idxs[0] < 0 or idxs[-1] >= num_units):
        raise InputError(f"units for {name!r} must lie in [0, {num_units}), got {idxs[0]}..{idxs[-1]}")
    if len(idxs) >= num_units:
        raise InputError(f"refusing to remove all {num_units} units of {name!r}: a layer must keep at least one")
    return idxs


def _reaches_output(graph: tp.DependencyGraph, group: Any) -> bool:
    """True when the removed units would be removed from the model's output itself.

    A group item that shrinks the output dimension of a node with no successors (the output
    layer, or an op such as ReLU/mean/flatten whose result is returned) changes what the model
    returns; shrinking the input dimension of a last Linear layer does not.
    """
    return any(not dep.target.outputs and graph.is_out_channel_pruning_fn(dep.handler) for dep, _ in group)


def _trace(model: nn.Module, example_inputs: ExampleInputs) -> tp.DependencyGraph:
    """torch-pruning's dependency graph of ``model``; its trace switches to eval, so restore the mode."""
    was_training = model.training
    try:
        with torch.enable_grad():  # the trace follows autograd's graph
            return tp.DependencyGraph().build_dependency(model, example_inputs=example_inputs)
    finally:
        model.train(was_training)


def _input_specs(example_inputs: ExampleInputs) -> list[dict[str, Any]]:
    """Shapes and dtypes of the example inputs, enough to rebuild stand-ins for a later trace."""
    tensors = [example_inputs] if isinstance(example_inputs, torch.Tensor) else list(example_inputs)
    return [{"shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch.")} for t in tensors]


def _example_inputs(specs: Sequence[Mapping[str, Any]], device: torch.device | str = "cpu") -> ExampleInputs:
    """Zero tensors shaped as recorded by :func:`prune_units`; a single one is returned bare."""
    tensors = []
    for spec in specs:
        dtype = getattr(torch, str(spec["dtype"]), None)
        if not isinstance(dtype, torch.dtype):
            raise InputError(f"unknown input dtype {spec['dtype']!r} in pruning history")
        tensors.append(torch.zeros([int(s) for s in spec["shape"]], dtype=dtype, device=device))
    return tensors[0] if len(tensors) == 1 else tuple(tensors)


def _check_requests(
    graph: tp.DependencyGraph, modules: Mapping[str, nn.Module], requests: Mapping[str, list[int]]
) -> None:
    """Refuse removals that reach the model's output, empty a coupled layer, or couple two requests."""
    own_modules = {id(m) for m in modules.values()}
    removes_outputs_of: dict[str, set[int]] = {}  # request -> model layers whose outputs it removes
    for name, idxs in requests.items():
        group = graph.get_pruning_group(modules[name], _out_pruning_fn(name, modules[name]), idxs)
        if _reaches_output(graph, group):
            raise InputError(f"refusing to remove units of {name!r}: they are outputs of the model")
        if not graph.check_pruning_group(group):
            raise InputError(f"removing {len(idxs)} units of {name!r} would empty a layer coupled to it")
        removes_outputs_of[name] = {
            id(dep.target.module)
            for dep, _ in group
            if id(dep.target.module) in own_modules
            and graph.is_out_channel_pruning_fn(dep.handler)
            and not graph.is_in_channel_pruning_fn(dep.handler)
        }
    for name, touched in removes_outputs_of.items():
        for other in requests:
            if other != name and id(modules[other]) in touched:
                raise InputError(
                    f"units of {name!r} and {other!r} are coupled (removed together); name only one of them"
                )


def prune_units(model: nn.Module, units: Mapping[str, Any], example_inputs: ExampleInputs) -> nn.Module:
    """Remove output units of named Linear/Conv modules in place and shrink their consumers.

    ``units`` maps a module name ("conv2", "features.3.squeeze") to the indices of the units to
    remove, numbered as in the model passed in (a list or LongTensor). ``example_inputs`` is a
    tensor (or tuple of tensors) the model accepts, on the model's device; torch-pruning runs it
    through the model once to trace which layers read which units.

    Refused with :class:`InputError`: a model that still has ``torch.nn.utils.prune`` masks (call
    :func:`pruning.masks.make_permanent` first), an unknown or non-Linear/Conv module, indices out
    of range, removing every unit of a layer, removing units of an output layer (they are the
    model's outputs), and naming two modules whose units torch-pruning couples (e.g. two
    convolutions added by a residual connection: name one of them).

    Each removal is appended to ``getattr(model, HISTORY_ATTR)`` as
    ``{"module": name, "units": [ints], "inputs": [{"shape", "dtype"}]}`` so that it can be
    replayed on a freshly built model. Returns ``model``; its train/eval mode is kept.
    """
    if prune.is_pruned(model):
        raise InputError(
            "model still has torch.nn.utils.prune masks; call pruning.masks.make_permanent(model) before surgery"
        )
    modules = dict(model.named_modules())
    requests: dict[str, list[int]] = {}
    for name, idxs in units.items():
        if name not in modules:
            raise InputError(f"model has no module {name!r}")
        _out_pruning_fn(name, modules[name])  # refuses layers without units
        requests[name] = _unit_list(name, idxs, num_units(modules[name]))
    requests = {name: idxs for name, idxs in requests.items() if idxs}
    if not requests:
        return model

    graph = _trace(model, example_inputs)
    _check_requests(graph, modules, requests)
    # Groups are recomputed after each removal: a layer reading from two pruned layers (after a
    # concatenation) must see the input numbering left by the previous removal. The root layer's
    # own numbering is untouched by the others, as _check_requests ruled out coupled requests.
    for name, idxs in requests.items():
        module = modules[name]
        graph.get_pruning_group(module, _out_pruning_fn(name, module), idxs).prune()
    history = getattr(model, HISTORY_ATTR, [])
    specs = _input_specs(example_inputs)
    history.extend({"module": name, "units": idxs, "inputs": specs} for name, idxs in requests.items())
    setattr(model, HISTORY_ATTR, history)
    return model


def pruning_history(model: nn.Module) -> list[dict[str, Any]]:
    """A copy of the removals :func:`prune_units` recorded on ``model``, oldest first."""
    return [dict(entry) for entry in getattr(model, HISTORY_ATTR, [])]


def replay_history(model: nn.Module, history: Sequence[Mapping[str, Any]]) -> nn.Module:
    """Apply recorded removals to a freshly built model, one entry at a time, in order."""
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    for step, entry in enumerate(history):
        try:
            name, idxs, specs = entry["module"], entry["units"], entry["inputs"]
        except (KeyError, TypeError):
            raise InputError(
                f"pruning history entry {step} must hold 'module', 'units' and 'inputs', got {entry!r}"
            ) from None
        prune_units(model, {name: idxs}, _example_inputs(specs, device))
    return model


def widths_of(model: nn.Module, arch_name: str) -> dict[str, Any]:
    """Width keyword arguments of a registered architecture, read off a (pruned) model by the
    architecture's rule in :data:`anrat.models.WIDTH_RULES` (e.g. ``lenet5``: ``{"conv1": out
    channels, "conv2": out channels, "fc1": hidden units}``; ``mlp``: ``{"hidden": [units of each
    hidden layer]}``). Merged into the original ``arch["kwargs"]``, they let
    :func:`anrat.models.build_model` rebuild the smaller network.
    """
    rule = WIDTH_RULES.get(arch_name)
    if rule is None:
        raise InputError(f"no width rule for architecture {arch_name!r}; expected one of {sorted(WIDTH_RULES)}")
    return rule(model)


__all__ = [
    "HISTORY_ATTR",
    "prune_units",
    "pruning_history",
    "replay_history",
    "widths_of",
]
