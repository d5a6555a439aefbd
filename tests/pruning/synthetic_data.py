"""Synthetic data shared by the pruning tests (a helper module, not a test file)."""

import torch

from anrat.data import Split

RELEVANT = 3  # of 10 input features, only the first 3 decide the class


def make_split(n: int, seed: int) -> Split:
    """``n`` samples of 10 standard-normal features whose class (of 3) depends on the first 3 only."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 10, generator=g)
    score = torch.stack([x[:, 0] + x[:, 1], x[:, 1] - x[:, 2], x[:, 2] - x[:, 0]], dim=1)
    return Split(x, score.argmax(dim=1))
