"""Data from a user's own files: a tensor file or an image folder, read into a :class:`anrat.data.Split`.

- **Tensor file** (``.pt``): a dict with an ``"x"`` tensor of inputs (batch first) and a ``"y"``
  tensor of targets, written with ``torch.save`` and read with ``torch.load(weights_only=True)``.
  Float inputs are taken as they are; uint8 inputs are pixels and are scaled by 1/255.
- **Image folder**: ``torchvision.datasets.ImageFolder`` (``root/<class>/<image>``, classes in
  sorted folder order), each image turned into [0, 1] pixels by ``ToTensor``. All images must have
  one size. ``image_mode`` converts them (``"L"`` grey, ``"RGB"``); by default the mode of the
  first image decides (grey stays one channel).

Either way the inputs are on the [0, 1] pixel scale (or the user's own float scale) before any
:class:`anrat.input_norm.InputNorm` is applied.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor
from torchvision import datasets, transforms

from anrat.checkpoint import load_checkpoint
from anrat.data import DataSplits, Split, as_split, hold_out_indices, load_dataset
from anrat.devices import resolve_device
from anrat.errors import InputError
from anrat.input_norm import InputNorm

IMAGE_MODES = ("L", "RGB")
_GREY_MODES = ("1", "L", "I", "I;16", "F")


@dataclass
class FileData:
    """One split read from a file, with the class names where the file has them (image folders)."""

    split: Split
    classes: list[str] | None
    source: str


def load_tensor_file(path: str | os.PathLike[str], what: str = "data") -> FileData:
    """A ``{"x": inputs, "y": targets}`` tensor file (module docstring)."""
    obj = load_checkpoint(path)
    if not isinstance(obj, dict) or not isinstance(obj.get("x"), Tensor) or not isinstance(obj.get("y"), Tensor):
        keys = sorted(map(str, obj)) if isinstance(obj, dict) else type(obj).__name__
        raise InputError(
            f"{what} file {str(path)!r} must hold a dict with tensors 'x' (inputs) and 'y' (targets); it holds {keys}"
        )
    x, y = obj["x"], obj["y"]
    if x.dtype == torch.uint8:
        x = x.float().div_(255)
    if y.is_floating_point() and y.dim() == 1 and torch.equal(y, y.round()):
        y = y.long()
    return FileData(as_split((x, y), f"{what} file {str(path)!r}"), None, f"tensor file {path}")


def _grey(path: str) -> bool:
    with Image.open(path) as image:
        return image.mode in _GREY_MODES


def load_image_folder(path: str | os.PathLike[str], what: str = "data", image_mode: str | None = None) -> FileData:
    """Every image under ``path/<class>/`` as [0, 1] pixels (module docstring)."""
    if image_mode is not None and image_mode not in IMAGE_MODES:
        raise InputError(f"image mode must be one of {', '.join(IMAGE_MODES)}, got {image_mode!r}")
    try:
        folder = datasets.ImageFolder(str(path))
    except (FileNotFoundError, OSError) as exc:
        raise InputError(
            f"{what} folder {str(path)!r} is not an image folder (root/<class>/<image>): {str(exc).splitlines()[0]}"
        ) from None
    mode = image_mode or ("L" if _grey(folder.samples[0][0]) else "RGB")
    folder.loader = lambda file: Image.open(file).convert(mode)
    folder.transform = transforms.ToTensor()
    try:
        split = as_split(folder, f"{what} folder {str(path)!r}")
    except (UnidentifiedImageError, OSError) as exc:
        raise InputError(
            f"{what} folder {str(path)!r} holds a file that is not a readable image: {str(exc).splitlines()[0]}"
        ) from None
    return FileData(split, list(folder.classes), f"image folder {path} ({mode})")


def load_data_file(path: str | os.PathLike[str], what: str = "data", image_mode: str | None = None) -> FileData:
    """A folder is read as an image folder, a file as a tensor file."""
    p = Path(path).expanduser()
    if p.is_dir():
        return load_image_folder(p, what, image_mode)
    if p.is_file():
        return load_tensor_file(p, what)
    raise InputError(
        f"{what} {str(path)!r} does not exist: expected a tensor file (.pt with 'x' and 'y') "
        "or an image folder (root/<class>/<image>)"
    )


def _hold_out(split: Split, val_size: int, seed: int, what: str) -> tuple[Split, Split]:
    """``val_size`` samples held out as :func:`load_dataset` holds them out of IDX data."""
    if not 0 < val_size < len(split):
        raise InputError(
            f"--val-size must be from 1 to {len(split) - 1} for the {len(split)} samples of {what}, got {val_size}"
        )
    val_index, train_index = hold_out_indices(len(split), val_size, seed)
    return Split(split.x[train_index], split.y[train_index]), Split(split.x[val_index], split.y[val_index])


def _first(split: Split, n: int | None, what: str) -> Split:
    if n is None:
        return split
    if not 1 <= n <= len(split):
        raise InputError(f"{what} must be from 1 to {len(split)}, got {n}")
    return Split(split.x[:n], split.y[:n])


def load_splits(
    *,
    input_norm: InputNorm,
    dataset: str | None = None,
    data_dir: str | os.PathLike[str] | None = None,
    train_data: str | os.PathLike[str] | None = None,
    val_data: str | os.PathLike[str] | None = None,
    test_data: str | os.PathLike[str] | None = None,
    val_size: int = 10_000,
    seed: int = 0,
    train_subset: int | None = None,
    test_subset: int | None = None,
    image_mode: str | None = None,
    device: str | torch.device = "cpu",
) -> DataSplits:
    """Training, validation and test data from a named dataset (IDX files, :func:`load_dataset`)
    and/or the user's own files, with ``input_norm`` applied to every input.

    ``train_data`` / ``val_data`` / ``test_data`` (a tensor file or an image folder) replace the
    dataset's split of that name; the dataset (``dataset``, default ``"mnist"``, from ``data_dir``)
    is read only for the splits no file gives. Without ``val_data``, ``val_size`` training samples
    are held out (seeded by ``seed``). ``val_data`` must not be the test data: the rollback rule
    and the fine-tuning select on validation data, and a test figure selected on is no longer an
    unbiased estimate. ``sources`` of the result says where each split came from.
    """
    if val_data is not None and (
        str(val_data) == "test"
        or (test_data is not None and Path(val_data).expanduser().resolve() == Path(test_data).expanduser().resolve())
    ):
        raise InputError(
            "the test split cannot serve as validation data: pruning rolls back and selects epochs on "
            "the validation data, so a test error measured on the same images would be biased; give "
            "held-out images that are neither training nor test data"
        )
    device = resolve_device(device)
    files = {
        name: load_data_file(path, f"--{name}-data", image_mode) if path is not None else None
        for name, path in (("train", train_data), ("val", val_data), ("test", test_data))
    }
    named = None
    if files["train"] is None or files["test"] is None:
        named = load_dataset(dataset or "mnist", data_dir, val_size=0, seed=seed, input_norm=InputNorm.none())
    classes = [f.classes for f in files.values() if f is not None and f.classes is not None]
    if any(c != classes[0] for c in classes):
        raise InputError(f"the image folders name different classes: {classes}; each needs the same class folders")
    sources = {name: f.source for name, f in files.items() if f is not None}
    train = files["train"].split if files["train"] is not None else named.train
    test = files["test"].split if files["test"] is not None else named.test
    if named is not None:
        for name in ("train", "test"):
            sources.setdefault(name, f"{named.name} {name} images from {data_dir or '$ANRAT_DATA_DIR'}")
    if files["val"] is not None:
        val = files["val"].split
    else:
        train, val = _hold_out(train, val_size, seed, "the training data")
        sources["val"] = (
            f"{val_size} samples held out of the training data (seed {seed}); the model must not "
            "have been trained on them"
        )
    train, test = _first(train, train_subset, "--train-subset"), _first(test, test_subset, "--test-subset")
    shapes = {name: tuple(s.x.shape[1:]) for name, s in (("train", train), ("val", val), ("test", test))}
    if len(set(shapes.values())) != 1:
        raise InputError(f"the splits' inputs differ in shape: {shapes}")
    num_classes = (
        len(classes[0])
        if classes
        else (named.num_classes if named is not None else int(max(int(s.y.max()) for s in (train, val, test))) + 1)
    )
    normalise = lambda s: Split(input_norm.apply(s.x).to(device), s.y.to(device))  # noqa: E731
    return DataSplits(
        train=normalise(train),
        val=normalise(val),
        test=normalise(test),
        name=named.name if named is not None else "files",
        num_classes=num_classes,
        input_shape=shapes["train"],
        input_norm=input_norm,
        sources=sources,
    )


__all__ = ["IMAGE_MODES", "FileData", "load_data_file", "load_image_folder", "load_splits", "load_tensor_file"]
