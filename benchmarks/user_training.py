"""A user's own training loop in plain PyTorch (not anrat's trainer), for the benchmarks that prune
models trained elsewhere (``prune_user_model.py``, ``prune_user_mlp.py``)."""

from __future__ import annotations

import torch
from torch import nn

from anrat.data import Split


def fit_plain(
    model: nn.Module,
    train: Split,
    optimizer: torch.optim.Optimizer,
    epochs: int,
    seed: int,
    *,
    batch_size: int = 128,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
) -> nn.Module:
    """Mean cross-entropy, ``epochs`` passes over shuffled batches (epoch e shuffled by seed
    ``1000 * seed + e``), the scheduler stepped after every step; returns the model in eval mode."""
    for epoch in range(epochs):
        model.train()
        order = torch.Generator().manual_seed(1000 * seed + epoch)
        for x, y in train.batches(batch_size, shuffle=True, generator=order):
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()
            if scheduler is not None:
                scheduler.step()
    return model.eval()
