"""Fixtures for the anrat tests."""

from __future__ import annotations

import pytest

from anrat.functional import TiltedBackend


@pytest.fixture(params=["numpy", "torch"])
def tilted_backend(request: pytest.FixtureRequest) -> TiltedBackend:
    """Run a test on both implementations of the tilted mean: NumPy on the host (what "auto"
    takes) and torch ops (here on CPU tensors), passed as ``backend=``."""
    return request.param
