"""Data-parallel training on ``torch.distributed`` with the exact NRAE of the global batch.

Under ``torchrun`` every process (rank r of W) holds a copy of the model and the whole dataset,
and takes its shard of every global minibatch. NRAE is not a mean of per-sample terms, so the
per-rank losses cannot simply be averaged; the global one is assembled from two numbers per rank.

The global tilted mean from per-rank statistics. For a global batch of M = sum_r m_r losses split
into shards S_r, with each shard's own NRAE ``n_r = log(mean_{i in S_r} exp(t*l_i)) / t`` (computed
stably by :func:`anrat.functional.tilted_mean`):

    sum_i exp(t * l_i) = sum_r m_r * exp(t * n_r)
    NRAE(all)          = log(sum_r (m_r / M) * exp(t * n_r)) / t = tilted_mean(n, t, weights=m/M)

so the ranks exchange ``(m_r, n_r)`` and every rank evaluates the same weighted tilted mean, again
with ``tilted_mean``'s centred expm1/log1p-or-logsumexp formulation (no textbook logsumexp at small
t; an empty shard has weight 0).

The losses. Every loss of :mod:`anrat.losses` builds its objective from a mean, a tilted mean, a
sum and a count of its per-sample losses over "the batch" (:mod:`anrat.reductions`).
``GlobalBatchLoss(loss)`` hands it :class:`GlobalBatch`, whose reductions run over the global
batch: the tilted mean as above, ``mean = sum_r sum(l_r) / M``, ``sum`` and ``count`` summed over
ranks. So the plain loss, NRAE (batch or running normaliser) and ANRAT are all exact, and the
losses themselves hold no distributed code.

Gradients. The exchange is a sum over ranks (:func:`sum_over_ranks`: each rank writes its row of
a (W, 2) table, zeros elsewhere, and the table is all-reduced) whose backward is again a sum over
ranks. Rank s computes its copy L_s of the global loss; backward carries dL_s/dn_r from every rank
s to rank r, so rank r's parameters receive ``sum_s dL_s/dtheta|_{S_r} = W * dL/dtheta|_{S_r}``
(all copies are the same function). DDP then averages over ranks, which divides by W: the
gradient applied is ``sum_r dL/dtheta|_{S_r} = dL/dtheta``, the single-process gradient on the
concatenated batch. Said otherwise, DDP optimises ``(1/W) sum_s L_s = L``.

lambda (ANRAT's theta) is not a DDP parameter and its gradient differs between ranks: rank r
holds the direct terms (penalty, the combination above) plus W times its own shard's term
``dL/dn_r * dn_r/dtheta``. The mean over ranks is the exact gradient, so the trainer averages it
(:func:`average_gradients`) just as DDP does for the weights.

Process groups come from torchrun's environment (``env://``: RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR, MASTER_PORT); the backend is nccl on CUDA (device cuda:LOCAL_RANK) and gloo on the CPU.
See docs/distributed.md for launch commands and what is and is not exact.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from anrat.data import Split
from anrat.devices import resolve_device
from anrat.errors import InputError
from anrat.functional import TiltedBackend, tilted_mean
from anrat.losses import BatchLoss

_TORCHRUN_VARS = ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class World:
    """This process's place in the default process group: ``rank`` in ``0..size-1``."""

    rank: int
    size: int

    @property
    def is_main(self) -> bool:
        """Rank 0 writes the files (metrics, checkpoints, results)."""
        return self.rank == 0


def current_world() -> World | None:
    """The default process group as a :class:`World`, or None for a single process."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return None
    return World(dist.get_rank(), dist.get_world_size())


def _env_int(name: str, default: int) -> int:
    text = os.environ.get(name)
    if text is None:
        return default
    try:
        return int(text)
    except ValueError:
        raise InputError(f"environment variable {name} must be an integer, got {text!r}") from None


def env_world_size() -> int:
    """WORLD_SIZE as set by torchrun (1 when unset)."""
    size = _env_int("WORLD_SIZE", 1)
    if size < 1:
        raise InputError(f"environment variable WORLD_SIZE must be >= 1, got {size}")
    return size


def env_is_main() -> bool:
    """Whether this process is rank 0 according to torchrun's RANK (True when unset)."""
    return _env_int("RANK", 0) == 0


def rank_device(device: str | torch.device, local_rank: int) -> torch.device:
    """The device of the process with ``local_rank`` on its node: ``cuda:LOCAL_RANK`` for "auto"
    (with CUDA present) or "cuda", the CPU for "cpu" or "auto" without CUDA."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise InputError(f"unknown device {device!r}: expected 'auto', 'cpu' or 'cuda'") from e
    if resolved.type == "cuda":
        if resolved.index is not None:
            raise InputError(
                f"under torchrun each process uses cuda:LOCAL_RANK; pass --device cuda or auto, not {device!r}"
            )
        count = torch.cuda.device_count()
        if local_rank >= count:
            raise InputError(
                f"LOCAL_RANK={local_rank} but this node has {count} CUDA device(s); "
                f"start at most {count} processes per node (--nproc_per_node)"
            )
        resolved = torch.device("cuda", local_rank)
        torch.cuda.set_device(resolved)
    elif resolved.type != "cpu":
        raise InputError(f"distributed training runs on 'cpu' (gloo) or 'cuda' (nccl), got {device!r}")
    return resolve_device(resolved)


def backend_for(device: torch.device) -> str:
    """nccl for CUDA tensors, gloo for CPU tensors."""
    return "nccl" if device.type == "cuda" else "gloo"


@contextmanager
def process_group_from_env(device: str | torch.device = "auto") -> Iterator[torch.device]:
    """Yield the device this process trains on, inside the process group when there is one.

    - A single process (WORLD_SIZE unset or 1, no group): ``resolve_device(device)``.
    - Under torchrun (WORLD_SIZE > 1): joins the default group from torchrun's environment
      (``env://``), with nccl on ``cuda:LOCAL_RANK`` or gloo on the CPU, and leaves it on exit.
    - A group the caller initialised already is used as it is and left open.
    """
    if dist.is_available() and dist.is_initialized():
        yield rank_device(device, _env_int("LOCAL_RANK", 0)) if dist.get_world_size() > 1 else resolve_device(device)
        return
    size = env_world_size()
    if size == 1:
        yield resolve_device(device)
        return
    if not dist.is_available():
        raise InputError(f"WORLD_SIZE={size} but this PyTorch build has no torch.distributed")
    missing = [name for name in _TORCHRUN_VARS if name not in os.environ]
    if missing:
        raise InputError(
            f"WORLD_SIZE={size} but {', '.join(missing)} not set; launch with torchrun "
            "(torchrun --standalone --nproc_per_node=N -m anrat.train ...)"
        )
    resolved = rank_device(device, _env_int("LOCAL_RANK", 0))
    backend = backend_for(resolved)
    dist.init_process_group(backend, device_id=resolved if resolved.type == "cuda" else None)
    try:
        yield resolved
    finally:
        dist.destroy_process_group()


# --- collectives with gradients ----------------------------------------------------------------
class _SumOverRanks(torch.autograd.Function):
    """``y = sum_r x_r`` (all-reduce); backward: ``dx_r = sum_s dy_s`` (all-reduce of the grads).

    torch.distributed.nn.functional has the same operation, but it is deprecated (a FutureWarning
    at every call) in favour of a private module; an all-reduce with an all-reduce as backward is
    all we need, on gloo and nccl alike.
    """

    @staticmethod
    def forward(ctx, tensor: Tensor) -> Tensor:  # type: ignore[override]
        out = tensor.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(out)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor) -> Tensor:  # type: ignore[override]
        grad = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(grad)
        return grad


def sum_over_ranks(tensor: Tensor) -> Tensor:
    """Elementwise sum of ``tensor`` over the ranks of the default group, differentiable: the
    gradient reaching each rank's input is the sum of the gradients of every rank's output."""
    return _SumOverRanks.apply(tensor)


@torch.no_grad()
def max_over_ranks(tensor: Tensor) -> Tensor:
    """Elementwise maximum over the ranks (no gradient)."""
    out = tensor.clone(memory_format=torch.contiguous_format)
    dist.all_reduce(out, op=dist.ReduceOp.MAX)
    return out


class GlobalBatch:
    """The batch is the global one: the concatenation, in rank order, of the shards that the ranks
    of the default process group hold. A :class:`~anrat.reductions.BatchReduction` whose every
    method is a collective (all ranks call it at the same point) and returns the same value on
    every rank; with no process group of more than one rank, the local reductions.

    Gradients flow back to every rank's own shard through :func:`sum_over_ranks` (module docstring).
    """

    def mean(self, losses: Tensor) -> Tensor:
        """``sum_r sum(l_r) / sum_r m_r`` (exact for unequal shards)."""
        if current_world() is None:
            return losses.mean()
        pair = torch.stack([losses.sum(), losses.new_full((), float(losses.numel()))])
        total = sum_over_ranks(pair)
        return total[0] / total[1].detach()

    def tilted_mean(self, losses: Tensor, t: float | Tensor, backend: TiltedBackend = "auto") -> Tensor:
        """NRAE ``log(mean_i exp(t * l_i)) / t`` of the global batch: ``tilted_mean(n, t, weights=m / M)``
        over the per-rank NRAEs ``n_r`` and counts ``m_r`` (module docstring); differentiable in the
        losses and in ``t``. ``losses`` (this rank's shard) may be empty; the global batch may not.
        ``backend``: as in :func:`anrat.functional.tilted_mean`, for both levels."""
        world = current_world()
        if world is None:
            return tilted_mean(losses, t, backend=backend)
        dtype = torch.promote_types(losses.dtype, torch.float32)
        with torch.autocast(device_type=losses.device.type, enabled=False):
            l = losses.reshape(-1).to(dtype)
            # An empty shard contributes weight 0; l.sum() (= 0) keeps it attached to the graph so
            # that DDP sees every parameter take part in the backward pass on every rank.
            local = tilted_mean(l, t, backend=backend) if l.numel() else l.sum()
            row = torch.stack([l.new_full((), float(l.numel())), local])
            table = sum_over_ranks(F.pad(row[None], (0, 0, world.rank, world.size - world.rank - 1)))
            counts = table[:, 0].detach()
            return tilted_mean(table[:, 1], t, weights=counts / counts.sum(), backend=backend)

    def sum(self, values: Tensor) -> Tensor:
        """``sum_i v_i`` over all ranks' shards, differentiable."""
        return values.sum() if current_world() is None else sum_over_ranks(values.sum())

    def count(self, values: Tensor) -> Tensor:
        """Number of elements of ``values`` over all ranks, as a 0-d tensor of ``values``' dtype."""
        count = values.new_full((), float(values.numel()))
        if current_world() is not None:
            dist.all_reduce(count)
        return count


class GlobalBatchLoss(nn.Module):
    """``loss`` over the global batch: ``forward(input, target)`` and ``aggregate(losses)`` take this
    rank's shard and return ``loss``'s objective on all ranks' shards together, the same on every
    rank, with gradients that DDP's averaging turns into the single-process gradient (module
    docstring). A collective: every rank calls it at the same step. ``loss`` (a
    :class:`~anrat.losses.BatchLoss`) is held as a submodule, so its lambda, buffers and parameters
    are the wrapped loss's own. Without a process group of more than one rank the wrapper computes
    what ``loss`` computes.
    """

    def __init__(self, loss: BatchLoss) -> None:
        super().__init__()
        self.loss = loss
        self.reduction = GlobalBatch()

    def aggregate(self, losses: Tensor) -> Tensor:
        """The objective of the global batch from this rank's per-sample losses."""
        return self.loss.aggregate(losses, self.reduction)

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return self.aggregate(self.loss.per_sample(input, target))


def average_gradients(parameters: Iterable[Tensor]) -> None:
    """``p.grad <- mean over ranks of p.grad`` for parameters DDP does not manage (lambda's theta).

    Parameters without a gradient are skipped; they must be the same on every rank (they are: all
    ranks run the same criterion at every step).
    """
    world = current_world()
    if world is None:
        return
    for p in parameters:
        if p.grad is not None:
            dist.all_reduce(p.grad)
            p.grad.div_(world.size)


# --- data ------------------------------------------------------------------------------------
def shard_bounds(n: int, world: World) -> tuple[int, int]:
    """This rank's part ``[start, stop)`` of ``n`` items in a row, as ``torch.tensor_split``: the
    first ``n % W`` ranks take ``n // W + 1`` items, the others ``n // W`` (possibly 0)."""
    q, extra = divmod(n, world.size)
    start = world.rank * q + min(world.rank, extra)
    return start, start + q + (world.rank < extra)


def shard_batches(batches: Iterable[tuple[Tensor, Tensor]], world: World) -> Iterator[tuple[Tensor, Tensor]]:
    """This rank's shard of each global minibatch ``(x, y)``.

    Every rank iterates the same global batches (``Split.batches`` with the same seeded CPU
    generator draws the same permutation everywhere) and keeps its contiguous slice, so the
    concatenation of the shards in rank order is the batch a single process would use.
    """
    for x, y in batches:
        start, stop = shard_bounds(x.shape[0], world)
        yield x[start:stop], y[start:stop]


def shard(split: Split, world: World) -> Split:
    """This rank's contiguous part of ``split`` (views, no copy), e.g. for evaluation."""
    start, stop = shard_bounds(len(split), world)
    return Split(split.x[start:stop], split.y[start:stop])


# --- model and state -------------------------------------------------------------------------
def data_parallel(model: nn.Module) -> nn.Module:
    """``DistributedDataParallel(model)`` on the model's device; broadcasts rank 0's weights."""
    device = next(model.parameters()).device
    return nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)


def seed_rank(seed: int, world: World) -> None:
    """Seed the global RNG (dropout) differently on every rank: ``seed * 65537 + rank + 1``."""
    torch.manual_seed(seed * 65_537 + world.rank + 1)


def _rng_bytes(device: torch.device) -> Tensor:
    state = [torch.get_rng_state()]
    if device.type == "cuda":
        state.append(torch.cuda.get_rng_state(device))
    return torch.cat(state)


def gather_rng_states(device: torch.device) -> list[Tensor]:
    """Every rank's global RNG state (CPU generator, then ``device``'s CUDA generator), in rank
    order, on every rank. A collective. Restore one with :func:`set_rng_state`."""
    world = current_world() or World(0, 1)
    mine = _rng_bytes(device).to(device)
    states = [torch.empty_like(mine) for _ in range(world.size)]
    dist.all_gather(states, mine)
    return [s.cpu() for s in states]


def set_rng_state(state: Tensor, device: torch.device) -> None:
    """Restore a state from :func:`gather_rng_states` for this process."""
    cpu_size = torch.get_rng_state().numel()
    torch.set_rng_state(state[:cpu_size].cpu())
    if device.type == "cuda":
        torch.cuda.set_rng_state(state[cpu_size:].cpu(), device)


def require_agreement(value: int, what: str, device: torch.device) -> None:
    """Raise InputError on every rank unless all ranks hold the same integer ``value``."""
    both = torch.tensor([value, -value], dtype=torch.int64, device=device)
    dist.all_reduce(both, op=dist.ReduceOp.MAX)
    high, low = int(both[0]), -int(both[1])
    if high != low:
        raise InputError(f"the ranks disagree on {what} (from {low} to {high})")


__all__ = [
    "GlobalBatch",
    "GlobalBatchLoss",
    "World",
    "average_gradients",
    "backend_for",
    "current_world",
    "data_parallel",
    "env_is_main",
    "env_world_size",
    "gather_rng_states",
    "max_over_ranks",
    "process_group_from_env",
    "rank_device",
    "require_agreement",
    "seed_rank",
    "set_rng_state",
    "shard",
    "shard_batches",
    "shard_bounds",
    "sum_over_ranks",
]
