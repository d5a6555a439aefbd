"""One plain line per epoch, for a terminal and a log file alike: the
:class:`~anrat.trainer.Trainer`'s (:func:`epoch_line`) and the
:class:`~anrat.batched.BatchedTrainer`'s, which summarises its members (:func:`stack_epoch_line`)."""

from __future__ import annotations

import statistics
from typing import Any


def _epoch_time(record: dict[str, Any], epochs: int) -> str:
    """The epoch's seconds and the time the remaining epochs would take at that rate
    (``"12.3 s, ~42 s left"``, ``"~3.5 min left"`` above a minute)."""
    left = record["seconds"] * (epochs - record["epoch"])
    if left <= 0:
        return f"{record['seconds']:.1f} s"
    return f"{record['seconds']:.1f} s, ~" + (f"{left / 60:.1f} min" if left >= 60 else f"{left:.0f} s") + " left"


def epoch_line(record: dict[str, Any], epochs: int) -> str:
    """One plain line for an epoch's record: losses, validation, time, and the time left."""
    parts = [f"epoch {record['epoch']}/{epochs}: training loss {record['train_loss']:.4g}"]
    if record.get("lam") is not None and not record.get("switched"):
        parts.append(f"lambda {record['lam']:.3g}")
    if "val_error" in record:
        parts.append(f"validation error {record['val_error']:.2%}")
    elif "val_loss" in record:
        parts.append(f"validation loss {record['val_loss']:.4g}")
    parts.append(_epoch_time(record, epochs))
    return "; ".join(parts)


def stack_epoch_line(record: dict[str, Any], epochs: int) -> str:
    """One plain line for a batched epoch's ``record`` (per-member lists), the stack's counterpart
    of :func:`epoch_line`: the best member's validation error (or loss, when the
    task has no error rate) and the median over the members still training, the median training
    loss, how many members train and how many are frozen (diverged), the epoch's wall-clock seconds
    and the time the remaining ``epochs`` would take at that rate."""
    frozen = set(record["frozen"])
    k = len(record["train_loss"])
    alive = [i for i in range(k) if i not in frozen]
    parts = [f"epoch {record['epoch']}/{epochs}, {k} member{'s' if k != 1 else ''}"]
    vals = record.get("val")
    if alive:
        parts.append(f"training loss median {statistics.median(record['train_loss'][i] for i in alive):.4g}")
    if vals is not None and alive:
        key = "error" if "error" in vals[alive[0]] else "loss"
        scores = {i: vals[i][key] for i in alive}
        best = min(scores, key=scores.__getitem__)
        show = (lambda v: f"{v:.2%}") if key == "error" else (lambda v: f"{v:.4g}")  # noqa: E731
        parts.append(
            f"validation {key} best {show(scores[best])} (member {best}), "
            f"median {show(statistics.median(scores.values()))}"
        )
    parts.append(f"{len(alive)} training, {len(frozen)} frozen")
    parts.append(_epoch_time(record, epochs))
    return "; ".join(parts)


__all__ = ["epoch_line", "stack_epoch_line"]
