"""A model's input contract: the per-channel normalisation its inputs receive before the first layer.

Images enter the toolkit as pixels scaled to [0, 1] (``pixel / 255``, what
``torchvision.transforms.ToTensor`` gives). A model then takes either those values as they are
(:meth:`InputNorm.none`) or ``(x - mean[c]) / std[c]`` per channel ``c``, as
``torchvision.transforms.Normalize`` computes it. The trainer records the normalisation it trained
with in every checkpoint; the pruning stage evaluates, fine-tunes and exports with exactly the one
in force and writes it beside the model (report, pruned checkpoint, ONNX ``metadata_props``), so a
user's input contract is never changed behind their back.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from anrat.errors import InputError

# The scale every normalisation applies to; stated in files so a deployment knows what to feed.
PIXEL_SCALE = "pixel / 255, in [0, 1]"
# Key of the ONNX metadata_props entry (and of checkpoints) that records the contract.
METADATA_KEY = "anrat.input_norm"


@dataclass(frozen=True)
class InputNorm:
    """``x_model[:, c] = (x[:, c] - mean[c]) / std[c]`` for ``x`` in [0, 1]; empty tuples: no change.

    A single mean and std apply to every channel (broadcast), as in ``Normalize``.
    """

    mean: tuple[float, ...] = ()
    std: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        if len(self.mean) != len(self.std):
            raise InputError(
                f"input normalisation needs as many means as stds, got {len(self.mean)} and {len(self.std)}"
            )
        for value in (*self.mean, *self.std):
            if not math.isfinite(value):
                raise InputError(f"input normalisation values must be finite numbers, got {value!r}")
        if any(s <= 0 for s in self.std):
            raise InputError(f"input normalisation stds must be > 0, got {list(self.std)}")

    @classmethod
    def none(cls) -> InputNorm:
        """The identity: the model takes [0, 1] pixels as they are."""
        return cls()

    @classmethod
    def of(cls, mean: float | tuple[float, ...], std: float | tuple[float, ...]) -> InputNorm:
        as_tuple = lambda v: tuple(float(x) for x in v) if isinstance(v, (tuple, list)) else (float(v),)  # noqa: E731
        return cls(as_tuple(mean), as_tuple(std))

    @classmethod
    def parse(cls, text: str, dataset_norm: InputNorm | None = None) -> InputNorm:
        """``"none"``, ``"dataset"`` (``dataset_norm``), ``"MEAN,STD"``, or per channel
        ``"M1,M2,M3:S1,S2,S3"`` (the command-line form of ``--input-norm``)."""
        text = text.strip()
        if text == "none":
            return cls.none()
        if text == "dataset":
            if dataset_norm is None:
                raise InputError("--input-norm dataset needs a named dataset (--dataset) whose statistics to use")
            return dataset_norm
        expected = "expected none, dataset, MEAN,STD or per channel M1,M2,...:S1,S2,..."
        try:
            if ":" in text:
                means, _, stds = text.partition(":")
                mean, std = tuple(float(v) for v in means.split(",")), tuple(float(v) for v in stds.split(","))
            else:
                values = [float(v) for v in text.split(",")]
        except ValueError:
            raise InputError(f"--input-norm {text!r} is not understood; {expected}") from None
        if ":" in text:
            return cls(mean, std)
        if len(values) != 2:
            raise InputError(f"--input-norm {text!r} has {len(values)} numbers; {expected}")
        return cls((values[0],), (values[1],))

    @classmethod
    def from_dict(cls, record: Mapping[str, Any] | None, where: str) -> InputNorm:
        """Read back :meth:`as_dict` (from a checkpoint or ONNX metadata)."""
        if (
            not isinstance(record, Mapping)
            or not isinstance(record.get("mean"), (list, tuple))
            or not isinstance(record.get("std"), (list, tuple))
        ):
            raise InputError(
                f"{where} holds no readable input normalisation (expected mean and std lists), got {record!r}"
            )
        return cls(tuple(float(v) for v in record["mean"]), tuple(float(v) for v in record["std"]))

    @property
    def is_identity(self) -> bool:
        return not self.mean

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready: the input scale, mean, std and the formula, for reports and metadata."""
        return {"input": PIXEL_SCALE, "mean": list(self.mean), "std": list(self.std), "formula": self.describe()}

    def onnx_metadata(self, in_graph: bool) -> dict[str, str]:
        """``metadata_props`` for an ONNX file: the contract as JSON under :data:`METADATA_KEY`
        (``in_graph``: whether the normalisation is the graph's first operation) and in words."""
        record = {**self.as_dict(), "in_graph": in_graph}
        if in_graph or self.is_identity:
            words = f"feed x = {PIXEL_SCALE}" + ("; the normalisation is part of the graph" if in_graph else "")
        else:
            words = f"feed {self.describe()}; the graph does not normalise"
        return {METADATA_KEY: json.dumps(record), "anrat.input": words}

    def describe(self) -> str:
        if self.is_identity:
            return "none: the model takes x = pixel / 255 in [0, 1] as it is"
        fmt = lambda v: ", ".join(f"{x:g}" for x in v)  # noqa: E731
        return f"(x - [{fmt(self.mean)}]) / [{fmt(self.std)}] per channel, x = pixel / 255 in [0, 1]"

    def module(self) -> nn.Module:
        """``torchvision.transforms.Normalize`` (an ``nn.Module``) or ``nn.Identity``, to put in front
        of a model so that it takes [0, 1] pixels."""
        if self.is_identity:
            return nn.Identity()
        from torchvision.transforms import Normalize  # on first use: importing torchvision costs ~1-2 s

        return Normalize(list(self.mean), list(self.std))

    def apply(self, x: Tensor) -> Tensor:
        """Normalise a batch ``(N, C, ...)`` of [0, 1] pixels (a new tensor)."""
        if self.is_identity:
            return x
        # torchvision's normalize (behind module()) needs an image (..., C, H, W); tensor files may
        # hold (N, features) rows, so the same broadcast is written out here for any rank >= 2.
        shape = (1, -1) + (1,) * (x.dim() - 2)
        mean = torch.tensor(self.mean, dtype=x.dtype, device=x.device).reshape(shape)
        std = torch.tensor(self.std, dtype=x.dtype, device=x.device).reshape(shape)
        if x.dim() < 2 or mean.numel() not in (1, x.shape[1]):
            raise InputError(
                f"input normalisation has {mean.numel()} channels; inputs of shape {tuple(x.shape)} have "
                f"{x.shape[1] if x.dim() > 1 else 'no'} channels"
            )
        return (x - mean) / std


def with_preprocessing(model: nn.Module, norm: InputNorm) -> nn.Module:
    """``model`` preceded by ``norm``: the result takes [0, 1] pixels (the model is shared, not copied)."""
    return model if norm.is_identity else nn.Sequential(norm.module(), model)


__all__ = ["METADATA_KEY", "PIXEL_SCALE", "InputNorm", "with_preprocessing"]
