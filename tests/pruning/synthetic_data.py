"""Synthetic data shared by the pruning tests (a helper module, not a test file)."""

import torch
from torch import nn

from anrat.data import Split
from anrat.models import build_model
from anrat.schedules import LambdaSchedule, ScheduleConfig
from anrat.trainer import TrainConfig, Trainer

RELEVANT = 3  # of 10 input features, only the first 3 decide the class


def make_split(n: int, seed: int) -> Split:
    """``n`` samples of 10 standard-normal features whose class (of 3) depends on the first 3 only."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 10, generator=g)
    score = torch.stack([x[:, 0] + x[:, 1], x[:, 1] - x[:, 2], x[:, 2] - x[:, 0]], dim=1)
    return Split(x, score.argmax(dim=1))


def trained_mlp(train: Split, val: Split | None, hidden: int, epochs: int) -> nn.Module:
    """An MLP (10 -> ``hidden`` -> 3, initialised under seed 0) trained on ``train`` by the plain
    loss (SGD 0.2, batch 64), its best epoch on ``val`` selected (the last one without ``val``)."""
    torch.manual_seed(0)
    model = build_model("mlp", in_features=10, hidden=[hidden], out_features=3)
    config = TrainConfig(epochs=epochs, lr=0.2, batch_size=64)
    Trainer(model, LambdaSchedule(ScheduleConfig(name="plain")), train, val, config, progress=False).fit()
    return model
