"""Which torch device a run uses, from the name a user gives (``"auto"``, ``"cpu"``, ``"cuda:1"``)."""

from __future__ import annotations

import torch

from anrat.errors import InputError


def resolve_device(device: str | torch.device) -> torch.device:
    """``"auto"`` -> CUDA when available, else CPU; any other name must parse and be usable here."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise InputError(f"unknown device {device!r}: expected 'auto', 'cpu', 'cuda' or 'cuda:N'") from e
    try:
        torch.empty(0, device=resolved)
    except (RuntimeError, AssertionError) as e:
        reason = str(e).split(". ")[0].splitlines()[0] if str(e) else type(e).__name__
        raise InputError(f"device {device!r} is not available on this machine ({reason}); use 'cpu' or 'auto'") from e
    return resolved


__all__ = ["resolve_device"]
