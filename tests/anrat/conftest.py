"""Fixtures and shared helpers of the anrat tests: the small synthetic problem the trainers are
compared on (:func:`tiny_mlp`, :func:`synthetic_split`, :func:`single_run`)."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from torch import nn

from anrat.batched import Member
from anrat.data import Split
from anrat.functional import TiltedBackend
from anrat.models import build_model
from anrat.schedules import LambdaSchedule
from anrat.trainer import Trainer


@pytest.fixture(params=["numpy", "torch"])
def tilted_backend(request: pytest.FixtureRequest) -> TiltedBackend:
    """Run a test on both implementations of the tilted mean: NumPy on the host (what "auto"
    takes) and torch ops (here on CPU tensors), passed as ``backend=``."""
    return request.param


def tiny_mlp() -> nn.Module:
    """The small network the trainer tests share: an MLP of 6 inputs, 12 hidden units, 3 outputs."""
    return build_model("mlp", in_features=6, hidden=[12], out_features=3)


def synthetic_split(kind: str, n: int, seed: int) -> Split:
    """``n`` samples of 6 standard-normal features (generator seeded by ``seed``): 3 classes from
    a nonlinear rule for ``kind="ce"``, else 3 smooth regression targets."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=g)
    if kind == "ce":
        y = (x[:, 0] + x[:, 1] * x[:, 2] > 0).long() + (x[:, 3] > 0.5).long()
    else:
        y = torch.stack([torch.sin(x[:, 0]), x[:, 1] * x[:, 2], 0.5 * x[:, 3]], dim=1)
    return Split(x, y)


def single_run(member: Member, train: Split, val: Split | None, out_dir=None, factory=tiny_mlp) -> Trainer:
    """``member`` trained alone by :class:`Trainer` (seeded as :class:`BatchedTrainer` seeds it),
    the reference a batched member is compared with."""
    torch.manual_seed(member.train.seed)
    trainer = Trainer(
        factory(), LambdaSchedule(replace(member.schedule)), train, val, member.train, out_dir=out_dir, progress=False
    )
    trainer.fit()
    return trainer


@pytest.fixture(name="tiny_mlp")
def tiny_mlp_fixture():
    """:func:`tiny_mlp`, the factory itself."""
    return tiny_mlp


@pytest.fixture(name="synthetic_split")
def synthetic_split_fixture():
    """:func:`synthetic_split`, the function itself."""
    return synthetic_split


@pytest.fixture(name="single_run")
def single_run_fixture():
    """:func:`single_run`, the function itself."""
    return single_run
