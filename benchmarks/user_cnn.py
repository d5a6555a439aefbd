"""A model of a user's own, for the pruning benchmark: the kind of small CNN people train on
Fashion-MNIST themselves (two 3x3 conv layers, one hidden layer), on raw pixels in [0, 1].

Importable as a factory: ``python -m pruning prune --factory user_cnn:build`` with this folder on
``PYTHONPATH``. It is deliberately not one of anrat's registered models.
"""

from __future__ import annotations

from torch import nn


def build(channels: tuple[int, int] = (16, 32), hidden: int = 128, num_classes: int = 10) -> nn.Module:
    """(N, 1, 28, 28) -> (N, num_classes) logits."""
    c1, c2 = channels
    return nn.Sequential(
        nn.Conv2d(1, c1, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(c1, c2, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(c2 * 7 * 7, hidden),
        nn.ReLU(),
        nn.Linear(hidden, num_classes),
    )
