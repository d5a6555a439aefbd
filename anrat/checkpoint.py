"""Checkpoints: atomic writes, and safe loads that never run code from the file.

A checkpoint is a plain dict of tensors, numbers, strings, lists and dicts. Its ``"format"`` key
names the layout; ``"arch"`` holds ``{"name": ..., "kwargs": {...}}`` so that
:func:`anrat.models.build_model` rebuilds the network without pickled classes. Loading uses
``torch.load(weights_only=True)``: a file that needs arbitrary unpickling is refused.
"""

from __future__ import annotations

import io
import os
import pickle
from pathlib import Path
from typing import Any

import torch
from torch import nn

from anrat.atomic_files import atomic_path
from anrat.data import DATASET_NORMS
from anrat.errors import InputError
from anrat.input_norm import InputNorm
from anrat.models import build_model

FORMAT = "anrat.checkpoint/1"


def save_atomic(obj: dict[str, Any], path: str | os.PathLike[str]) -> Path:
    """Write ``obj`` with ``torch.save`` to a temporary file beside ``path``, fsync, then rename
    (:func:`anrat.atomic_files.atomic_path`).

    A crash mid-write leaves the previous file intact: readers see the old or the new file, never
    half of one.
    """
    # Serialised in memory first: torch.save reports a full disk as a RuntimeError from its zip
    # writer ("unexpected pos"), a plain write reports ENOSPC, which atomic_path puts in words.
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    with atomic_path(path) as tmp:
        tmp.write_bytes(buffer.getbuffer())
    return Path(path)


def load_checkpoint(path: str | os.PathLike[str], map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint as data with ``torch.load(weights_only=True)``.

    Raises :class:`InputError` for a missing file, a corrupt file, or a file that holds pickled
    code (classes or functions other than tensors and containers).
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"checkpoint {str(path)!r} does not exist")
    _check_torch_file(path)
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        if "Unsupported global" not in str(exc):
            raise InputError(f"cannot read checkpoint {str(path)!r}: it is corrupt ({_first_line(exc)})") from None
        raise InputError(
            f"refusing {str(path)!r}: it holds pickled Python objects, not only tensors and plain "
            "data, and loading it could run code. Save a state_dict (or one of our checkpoints) "
            f"instead. ({_first_line(exc)})"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError, IndexError, KeyError, TypeError) as exc:
        # torch's unpickler reports a damaged file with whatever error the bytes lead it to
        raise InputError(
            f"cannot read checkpoint {str(path)!r}: it is truncated or corrupt "
            f"({type(exc).__name__}: {_first_line(exc)})"
        ) from None
    return obj


def global_rng_state() -> dict[str, Any]:
    """The global random streams a resumed run must continue (torch's CPU and every CUDA
    device's), as data a ``weights_only`` checkpoint holds."""
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_global_rng_state(state: dict[str, Any]) -> None:
    """Restore :func:`global_rng_state` (its CUDA streams where this process has CUDA)."""
    torch.set_rng_state(state["torch"].cpu())
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


def _first_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return next((line for line in lines if "Unsupported global" in line), lines[0] if lines else "no detail")


def _check_torch_file(path: Path) -> None:
    """Refuse a file ``torch.save`` cannot have written (a zip archive, or a pickle in the legacy format)."""
    with open(path, "rb") as f:
        head = f.read(4)
    if not head:
        raise InputError(f"checkpoint {str(path)!r} is empty (0 bytes); was its writing interrupted?")
    if head != b"PK\x03\x04" and head[:1] != b"\x80":
        raise InputError(
            f"{str(path)!r} is not a checkpoint: torch.save writes a zip archive, this file starts with {head!r}"
        )


def model_from_checkpoint(ckpt: dict[str, Any]) -> nn.Module:
    """Rebuild the network described by ``ckpt["arch"]`` and load ``ckpt["state_dict"]``."""
    if not isinstance(ckpt, dict) or "arch" not in ckpt or "state_dict" not in ckpt:
        raise InputError("not an anrat checkpoint: expected a dict with 'arch' and 'state_dict'")
    arch = ckpt["arch"]
    model = build_model(arch["name"], **arch.get("kwargs", {}))
    try:
        model.load_state_dict(ckpt["state_dict"])
    except RuntimeError as exc:
        raise InputError(f"checkpoint weights do not fit architecture {arch}: {str(exc).splitlines()[0]}") from None
    return model


def recorded_input_norm(ckpt: dict[str, Any]) -> InputNorm | None:
    """The input normalisation a checkpoint's model was trained (or pruned) with, None when unknown.

    Checkpoints record it under ``"input_norm"``. Trainer checkpoints written before that key
    existed are read as their dataset's normalisation: ``anrat-train`` always applied it.
    """
    if not isinstance(ckpt, dict):
        return None
    if "input_norm" in ckpt:
        return InputNorm.from_dict(ckpt["input_norm"], "the checkpoint's 'input_norm'")
    run_config = ckpt.get("run_config")
    if ckpt.get("format") == FORMAT and isinstance(run_config, dict) and run_config.get("dataset") in DATASET_NORMS:
        return DATASET_NORMS[run_config["dataset"]]
    return None
