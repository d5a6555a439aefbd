"""One vector from a dict of tensors, and back: for decisions taken over all layers at once.

A global ranking (masks at a sparsity, a capped pruning round) or one multiple-testing family over
every tested weight needs the per-parameter tensors as one vector, and its result split back into
tensors of the original shapes, keyed as before. The entries are laid out key after key in the
dict's order, each tensor in ``reshape(-1)`` (row-major) order.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor


def flatten(tensors: Mapping[str, Tensor]) -> Tensor:
    """The entries of all ``tensors`` as one 1-D tensor, key by key in the mapping's order.

    The tensors must share a device; dtypes are promoted as ``torch.cat`` promotes them.
    """
    return torch.cat([tensor.reshape(-1) for tensor in tensors.values()])


def unflatten(flat: Tensor, like: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Split a 1-D ``flat`` laid out as :func:`flatten` lays out ``like`` back into tensors of the
    shapes of ``like``'s, under the same keys (views of ``flat``, not copies)."""
    total = sum(tensor.numel() for tensor in like.values())
    if flat.dim() != 1 or flat.numel() != total:
        raise ValueError(
            f"flat must be 1-D with {total} entries to split like these tensors, got shape {tuple(flat.shape)}"
        )
    out, start = {}, 0
    for key, tensor in like.items():
        out[key] = flat[start : start + tensor.numel()].reshape(tensor.shape)
        start += tensor.numel()
    return out


__all__ = ["flatten", "unflatten"]
