"""anrat.devices: device names as users give them."""

from __future__ import annotations

import pytest
import torch

from anrat.devices import resolve_device
from anrat.errors import InputError


def test_resolve_device() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(InputError, match="not available"):
        resolve_device("cuda:99")
    if not torch.cuda.is_available():
        with pytest.raises(InputError, match="not available"):
            resolve_device("cuda")


def test_unknown_device_names_are_refused() -> None:
    with pytest.raises(InputError, match="unknown device 'gpu0'"):
        resolve_device("gpu0")
