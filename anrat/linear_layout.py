"""Narrow linear layers under vmap on the CPU: the batched trainer's one speed workaround."""

from __future__ import annotations

import contextlib

import torch
from torch import nn
from torch.overrides import TorchFunctionMode


class NarrowLinearLayout(TorchFunctionMode):
    """Inside it, ``F.linear(x, W, b)`` of a 2-D ``x`` and a layer with at most ``max_out`` outputs
    is computed as ``(W @ x^T)^T + b``: the same product, in the other orientation.

    Why: under ``vmap`` a linear layer becomes ``torch.bmm(x, W^T)``, and on the CPU MKL's batched
    product is several times slower in that orientation when the output is narrow. Measured with
    ``python benchmarks/batched_linear_layout.py`` (one thread): 80 members, 1000 rows, 4 -> 4 runs
    8x faster the other way, lenet5's 500 -> 10 at batch 64 1.9x; 16 -> 16 and wider layers run
    2-20% slower, hence ``max_out = 10``. The results are the same products summed in another
    order (float rounding).
    """

    def __init__(self, max_out: int = 10) -> None:
        super().__init__()
        self.max_out = max_out

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        kwargs = kwargs or {}
        if func is nn.functional.linear:
            x, weight = args[0], args[1]
            bias = args[2] if len(args) > 2 else kwargs.get("bias")
            if x.dim() == 2 and weight.shape[0] <= self.max_out:
                out = torch.matmul(weight, x.mT).mT
                return out if bias is None else out + bias
        return func(*args, **kwargs)


def layout_mode(device: torch.device) -> TorchFunctionMode | contextlib.nullcontext:
    """:class:`NarrowLinearLayout` on the CPU; nothing elsewhere (cuBLAS has no such cliff)."""
    return NarrowLinearLayout() if device.type == "cpu" else contextlib.nullcontext()


__all__ = ["NarrowLinearLayout", "layout_mode"]
