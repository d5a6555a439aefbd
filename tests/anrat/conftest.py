"""Fixtures for the anrat tests."""

from __future__ import annotations

import pytest

import anrat.functional


@pytest.fixture(params=["numpy", "torch-ops"])
def tilted_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run a test on both implementations of the tilted mean: the CPU's NumPy path and, on CPU
    tensors here, the torch-ops path that accelerators take."""
    if request.param == "torch-ops":
        monkeypatch.setattr(anrat.functional, "NUMPY_ON_CPU", False)
    return request.param
