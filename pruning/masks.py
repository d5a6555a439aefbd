"""Unstructured pruning masks, applied the way ``torch.nn.utils.prune`` applies them.

A keep-mask is a bool tensor shaped like the parameter it belongs to: ``True`` keeps a weight,
``False`` prunes it. :func:`apply_masks` hands each mask to :func:`torch.nn.utils.prune.custom_from_mask`,
so a pruned module carries the usual reparametrisation: the trainable ``<name>_orig`` parameter,
the ``<name>_mask`` buffer and a forward pre-hook that recomputes ``<name> = <name>_orig * <name>_mask``
before every forward pass. Consequences PyTorch users expect:

- masks combine across rounds (PyTorch's ``PruningContainer`` multiplies them), so a weight pruned
  once stays pruned whatever later masks say;
- fine-tuning updates ``<name>_orig`` only; the effective weight stays exactly zero where the mask
  is zero, whatever the optimizer (momentum, weight decay) does to ``<name>_orig``;
- :func:`make_permanent` calls ``prune.remove`` to bake the zeros into a plain parameter, which
  is what checkpoints and ONNX export want.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping

import torch
from torch import nn
from torch.nn.utils import prune

from anrat.errors import InputError

_ORIG_SUFFIX = "_orig"
_MASK_SUFFIX = "_mask"


def _split_name(model: nn.Module, param_name: str) -> tuple[nn.Module, str]:
    """Module owning ``param_name`` ("fc1.weight") and the attribute name within it ("weight")."""
    module_name, _, attr = param_name.rpartition(".")
    try:
        module = model.get_submodule(module_name)
    except AttributeError:
        raise InputError(f"mask names parameter {param_name!r}, but the model has no module {module_name!r}") from None
    if attr not in module._parameters and attr + _ORIG_SUFFIX not in module._parameters:
        own = sorted(n.removesuffix(_ORIG_SUFFIX) for n in module._parameters)
        raise InputError(f"mask names parameter {param_name!r}, but {module_name or 'the model'!r} has only {own}")
    return module, attr


def _pruned_attrs(module: nn.Module) -> list[str]:
    """Names of the parameters of ``module`` reparametrised by a ``torch.nn.utils.prune`` hook."""
    return [
        hook._tensor_name for hook in module._forward_pre_hooks.values() if isinstance(hook, prune.BasePruningMethod)
    ]


def apply_masks(model: nn.Module, masks: Mapping[str, torch.Tensor]) -> nn.Module:
    """Prune ``model`` in place with bool keep-masks keyed by parameter name ("fc1.weight").

    Each mask goes through :func:`torch.nn.utils.prune.custom_from_mask`; on a parameter that is
    already pruned the new mask is multiplied into the old one, so the kept set only shrinks.
    Returns ``model``.
    """
    checked: list[tuple[nn.Module, str, torch.Tensor]] = []
    for name, mask in masks.items():  # validate everything before touching the model
        module, attr = _split_name(model, name)
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
            got = mask.dtype if isinstance(mask, torch.Tensor) else type(mask).__name__
            raise InputError(f"mask for {name!r} must be a bool tensor (True = keep), got {got}")
        param = getattr(module, attr)
        if mask.shape != param.shape:
            raise InputError(f"mask for {name!r} has shape {tuple(mask.shape)}, parameter has {tuple(param.shape)}")
        checked.append((module, attr, mask.to(param.device)))
    for module, attr, mask in checked:
        prune.custom_from_mask(module, attr, mask)
    return model


def make_permanent(model: nn.Module) -> nn.Module:
    """Remove every pruning reparametrisation in place (``prune.remove``): ``<name>_orig * <name>_mask``
    becomes the plain parameter ``<name>``, zeros included. Returns ``model``.

    Call it before saving or exporting; fine-tuning after it no longer holds pruned weights at zero.
    """
    for module in model.modules():
        for attr in _pruned_attrs(module):
            prune.remove(module, attr)
    return model


def permanent_copy(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` with its masks made permanent; ``model`` itself is left as it is."""
    # The pruned attribute ``<name>`` is a non-leaf tensor (orig * mask), which deepcopy refuses;
    # seed the memo with a detached copy of it. prune.remove recomputes it on the copy anyway.
    memo: dict[int, object] = {}
    for module in model.modules():
        for attr in _pruned_attrs(module):
            derived = getattr(module, attr)
            memo[id(derived)] = derived.detach().clone()
    return make_permanent(copy.deepcopy(model, memo))


def effective_parameters(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter as the forward pass sees it, keyed by its logical name ("fc1.weight").

    A pruned parameter is ``<name>_orig * <name>_mask``, computed afresh (the ``<name>`` attribute
    is only refreshed by the next forward pass, so it can be stale after an optimizer step).
    """
    tensors: dict[str, torch.Tensor] = {}
    for module_name, module in model.named_modules():
        prefix = f"{module_name}." if module_name else ""
        pruned = set(_pruned_attrs(module))
        for attr, param in module.named_parameters(recurse=False):
            base = attr.removesuffix(_ORIG_SUFFIX)
            if attr.endswith(_ORIG_SUFFIX) and base in pruned:
                tensors[prefix + base] = param.detach() * getattr(module, base + _MASK_SUFFIX)
            else:
                tensors[prefix + attr] = param.detach()
    return tensors


def count_nonzero(model: nn.Module) -> int:
    """Number of scalar parameters that are not zero (masks applied)."""
    return sum(int(torch.count_nonzero(t)) for t in effective_parameters(model).values())


def count_total(model: nn.Module) -> int:
    """Number of scalar parameters, pruned or not (masks and ``_orig`` copies counted once)."""
    return sum(t.numel() for t in effective_parameters(model).values())


def sparsity(model: nn.Module) -> float:
    """Fraction of scalar parameters that are zero (masks applied), in [0, 1]."""
    total = count_total(model)
    if total == 0:
        raise InputError("model has no parameters")
    return 1.0 - count_nonzero(model) / total


def layer_counts(dense: nn.Module, pruned: nn.Module) -> dict[str, dict[str, int]]:
    """Per layer (weights and bias together): parameters of the dense network, parameters and
    nonzero parameters of the pruned one."""

    def by_layer(model: nn.Module) -> dict[str, tuple[int, int]]:
        counts: dict[str, tuple[int, int]] = {}
        for name, tensor in effective_parameters(model).items():
            layer = name.rpartition(".")[0]
            total, nonzero = counts.get(layer, (0, 0))
            counts[layer] = (total + tensor.numel(), nonzero + int(torch.count_nonzero(tensor)))
        return counts

    before, after = by_layer(dense), by_layer(pruned)
    return {
        layer: {
            "dense": before[layer][0],
            "pruned": after.get(layer, (0, 0))[0],
            "nonzero": after.get(layer, (0, 0))[1],
        }
        for layer in before
    }


__all__ = [
    "apply_masks",
    "count_nonzero",
    "count_total",
    "effective_parameters",
    "make_permanent",
    "permanent_copy",
    "sparsity",
]
