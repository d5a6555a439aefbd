"""The README's Python examples run as written."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.DOTALL)


def test_the_drop_in_loop_runs_as_written_and_ends_on_cross_entropy():
    block = next(b for b in python_blocks() if "anrat.ESSLoss" in b)
    namespace: dict = {}
    exec(compile(block, "README.md", "exec"), namespace)  # noqa: S102  (our own README)
    loss_fn, schedule, model = namespace["loss_fn"], namespace["schedule"], namespace["model"]
    assert schedule.epoch == 5 and loss_fn.rho == 1.0  # rho rose to 1: cross-entropy from here on
    x, y = namespace["x"], namespace["y"]
    with torch.no_grad():
        assert float(loss_fn(model(x), y)) == pytest.approx(
            float(torch.nn.functional.cross_entropy(model(x), y)), rel=1e-6
        )
        error = float((model(x).argmax(1) != y).float().mean())
    assert error < 0.6  # it trained: chance is 2/3 on these random labels, memorised in part
