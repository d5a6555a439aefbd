"""Fixtures shared by the pruning tests."""

import gc

import pytest
import torch
import torch.nn.functional as F

from anrat.models import mlp


@pytest.fixture(autouse=True, scope="module")
def frozen_gc():
    """statsmodels' Holm procedure calls gc.collect(), ~0.5 s per call in a process holding torch,
    scipy and statsmodels; freezing the objects alive now makes those collections cheap. Only
    speed changes: nothing a test module creates is frozen."""
    gc.freeze()
    yield
    gc.unfreeze()


@pytest.fixture(scope="module")
def fitted_mlp():
    """A 5-4-3 tanh MLP (float64) fitted by L-BFGS to 3-class data that depends on x0 and x1:
    ``(model, x, y)``."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, 5, generator=g, dtype=torch.float64)
    logits = torch.stack([x[:, 0], x[:, 1], -x[:, 0] - x[:, 1]], 1)
    y = torch.multinomial(torch.softmax(2 * logits, 1), 1, generator=g).squeeze(1)
    torch.manual_seed(0)
    model = mlp(5, (4,), 3, "tanh").double()
    opt = torch.optim.LBFGS(model.parameters(), max_iter=50, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss

    opt.step(closure)
    return model, x, y
