"""What "the batch" is when a loss combines its per-sample losses.

Every loss of :mod:`anrat.losses` is built from four reductions of the per-sample losses
``l_1..l_M`` of a batch (and of values ``v_i`` derived from them):

    mean(l)           = (1/M) sum_i l_i
    tilted_mean(l, t) = log((1/M) sum_i exp(t * l_i)) / t     (NRAE, t = lam ** p)
    sum(v)            = sum_i v_i
    count(v)          = M

A :class:`BatchReduction` computes them. :class:`LocalBatch` (the default) takes the batch to be
the tensor it is given. :class:`anrat.distributed.GlobalBatch` takes it to be the concatenation
of the shards that the ranks of a process group hold, so that a loss's objective and gradients
over all ranks are those of one process holding the whole batch; the losses never know which.
"""

from __future__ import annotations

from typing import Protocol

from torch import Tensor

from anrat.functional import TiltedBackend, tilted_mean


class BatchReduction(Protocol):
    """The four reductions over a batch of per-sample values (module docstring), differentiable."""

    def mean(self, losses: Tensor) -> Tensor:
        """``(1/M) sum_i l_i``."""
        ...

    def tilted_mean(self, losses: Tensor, t: float | Tensor, backend: TiltedBackend = "auto") -> Tensor:
        """``log((1/M) sum_i exp(t * l_i)) / t``, differentiable in the losses and in a tensor ``t``;
        ``backend`` as in :func:`anrat.functional.tilted_mean`."""
        ...

    def sum(self, values: Tensor) -> Tensor:
        """``sum_i v_i``."""
        ...

    def count(self, values: Tensor) -> Tensor | int:
        """``M``, the number of values in the batch."""
        ...


class LocalBatch:
    """The batch is the tensor given: the reductions are plain tensor operations."""

    def mean(self, losses: Tensor) -> Tensor:
        return losses.mean()

    def tilted_mean(self, losses: Tensor, t: float | Tensor, backend: TiltedBackend = "auto") -> Tensor:
        return tilted_mean(losses, t, backend=backend)

    def sum(self, values: Tensor) -> Tensor:
        return values.sum()

    def count(self, values: Tensor) -> int:
        return values.numel()


LOCAL_BATCH = LocalBatch()

__all__ = ["LOCAL_BATCH", "BatchReduction", "LocalBatch"]
