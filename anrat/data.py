"""MNIST and Fashion-MNIST as whole tensors on the training device.

The four IDX files come from a folder the user names (``data_dir``, else ``$ANRAT_DATA_DIR``),
compressed (``.gz``) or not. They are decompressed into a cache folder in the layout that
``torchvision.datasets.MNIST`` / ``FashionMNIST`` read (``<cache>/<name>-<hash>/MNIST/raw/``), never
into the source folder, and torchvision reads them from there. Only ``download=True`` lets
torchvision download, into the cache root.

Images are float32 of shape (N, 1, 28, 28): by default ``x = (pixel / 255 - mean) / std`` with the
dataset's training-set mean and standard deviation (:data:`DATASET_NORMS`), or any other
:class:`anrat.input_norm.InputNorm` (``input_norm="none"``: ``pixel / 255`` as it is). Labels are
int64 class indices of shape (N,). A validation set of ``val_size`` training images is held out by
a permutation seeded with ``seed``.

:func:`as_split` turns the data a user already has (a ``DataLoader``, a ``Dataset``, an ``(x, y)``
pair) into a :class:`Split`; :mod:`anrat.data_files` reads tensor files and image folders.
"""

from __future__ import annotations

import gzip
import hashlib
import math
import os
import shutil
import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from anrat.atomic_files import atomic_path
from anrat.devices import resolve_device
from anrat.errors import InputError
from anrat.input_norm import InputNorm

DATASETS = ("mnist", "fashion_mnist")
# name -> (torchvision.datasets class name, training-set pixel mean and std on the [0, 1] scale)
_SPECS: dict[str, tuple[str, float, float]] = {
    "mnist": ("MNIST", 0.1307, 0.3081),
    "fashion_mnist": ("FashionMNIST", 0.2860, 0.3530),
}


def _dataset_class(name: str) -> type:
    """The ``torchvision.datasets`` class of ``name``, imported on first use: importing
    torchvision costs ~1-2 s (it loads torch._dynamo), which every worker process of the
    function-fitting study, which reads no images, would otherwise pay."""
    from torchvision import datasets

    return getattr(datasets, _SPECS[name][0])


# name -> the normalisation the toolkit trains with by default (the training set's mean and std)
DATASET_NORMS: dict[str, InputNorm] = {name: InputNorm.of(mean, std) for name, (_, mean, std) in _SPECS.items()}
# file name (without .gz) -> number of dimensions in its IDX header
IDX_FILES: dict[str, int] = {
    "train-images-idx3-ubyte": 3,
    "train-labels-idx1-ubyte": 1,
    "t10k-images-idx3-ubyte": 3,
    "t10k-labels-idx1-ubyte": 1,
}
_HOW_TO_PROVIDE = (
    "pass --data-dir DIR (data_dir=DIR) or set ANRAT_DATA_DIR to a folder holding the four files "
    + ", ".join(f"{n}[.gz]" for n in IDX_FILES)
)


@dataclass
class Split:
    """Inputs ``x`` (float32, (N, ...)) and targets ``y`` ((N,) int64 class indices, or floats)."""

    x: Tensor
    y: Tensor

    def __post_init__(self) -> None:
        if self.x.shape[0] != self.y.shape[0]:
            raise InputError(
                f"Split needs as many targets as inputs, got {self.x.shape[0]} inputs and {self.y.shape[0]} targets"
            )

    def __len__(self) -> int:
        return self.x.shape[0]

    def to(self, device: str | torch.device) -> Split:
        return Split(self.x.to(device), self.y.to(device))

    def batches(
        self,
        batch_size: int,
        shuffle: bool = False,
        generator: torch.Generator | None = None,
        drop_last: bool = False,
    ) -> Iterator[tuple[Tensor, Tensor]]:
        """Yield ``(x, y)`` mini-batches of ``batch_size`` samples; the last one may be smaller.

        With ``shuffle`` the order is a permutation drawn on the CPU from ``generator`` (a CPU
        generator, or the global RNG when None), so a seeded run gives the same batches on any
        device and resumes from a saved generator state.
        """
        if batch_size < 1:
            raise InputError(f"batch_size must be a positive integer, got {batch_size}")
        n = len(self)
        stop = n - n % batch_size if drop_last else n
        if not shuffle:
            for start in range(0, stop, batch_size):
                yield self.x[start : start + batch_size], self.y[start : start + batch_size]
            return
        order = torch.randperm(n, generator=generator).to(self.x.device)
        for start in range(0, stop, batch_size):
            index = order[start : start + batch_size]
            yield self.x[index], self.y[index]

    def num_batches(self, batch_size: int, drop_last: bool = False) -> int:
        """How many batches :meth:`batches` yields."""
        return len(self) // batch_size if drop_last else math.ceil(len(self) / batch_size)


@dataclass
class DataSplits:
    """Train, optional validation and test splits of one dataset, all on one device.

    ``input_norm`` is the normalisation applied to every image (on the [0, 1] pixel scale); a
    deployed model needs its input normalised the same way.
    """

    train: Split
    val: Split | None
    test: Split
    name: str
    num_classes: int
    input_shape: tuple[int, ...]
    input_norm: InputNorm
    sources: dict[str, str] | None = None  # where each split came from, for reports


def _check_count(what: str, value: int, low: int, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise InputError(f"{what} must be an integer from {low} to {high}, got {value!r}")


def _check_idx(path: Path, source: Path, ndim: int) -> None:
    """Raise InputError unless ``path`` is an IDX file of unsigned bytes with ``ndim`` dimensions
    whose length matches its header.

    torchvision's reader checks this with asserts (gone under ``python -O``) and reads images and
    labels together, so its errors cannot say which file is bad; this check names ``source``.
    """
    with open(path, "rb") as f:
        header = f.read(4 * (ndim + 1))
    size = path.stat().st_size
    if len(header) < 4 * (ndim + 1):
        raise InputError(f"{source} is truncated: {size} bytes, shorter than an IDX header")
    magic, *dims = struct.unpack(f">{ndim + 1}I", header)
    if magic != 0x0800 + ndim:
        raise InputError(
            f"{source} is not an IDX file of {ndim}-D unsigned bytes: magic number 0x{magic:08x}, "
            f"expected 0x{0x0800 + ndim:08x}"
        )
    expected = len(header) + math.prod(dims)
    if size != expected:
        raise InputError(
            f"{source} is truncated or corrupt: its header announces {'x'.join(map(str, dims))} bytes "
            f"of data ({expected} bytes in all), the file holds {size}"
        )


def _find_sources(name: str, folder: Path, origin: str) -> dict[str, Path]:
    """The four source files by their uncompressed name, in ``folder`` or in a subfolder named
    after the dataset (``mnist/``, ``fashion-mnist/``) or laid out for torchvision (``MNIST/raw/``)."""
    if not folder.is_dir():
        raise InputError(
            f"{name} data folder {folder} (from {origin}) does not exist or is not a folder; {_HOW_TO_PROVIDE}"
        )
    for candidate in (
        folder,
        folder / name,
        folder / name.replace("_", "-"),
        folder / _SPECS[name][0] / "raw",
    ):
        # The uncompressed file wins over its .gz when both are there (later keys overwrite).
        found = {n: p for n in IDX_FILES for p in (candidate / f"{n}.gz", candidate / n) if p.is_file()}
        if found:
            folder = candidate
            break
    missing = [n for n in IDX_FILES if n not in found]
    if missing:
        raise InputError(
            f"{name} data folder {folder} has no {', no '.join(f'{n}[.gz]' for n in missing)}; {_HOW_TO_PROVIDE}"
        )
    return found


def _fill_cache(name: str, sources: dict[str, Path], cache_root: Path) -> Path:
    """Decompress or copy ``sources`` into ``<cache_root>/<name>-<hash>/<Class>/raw/`` unless there
    already; return the torchvision root. The hash covers the absolute source paths, sizes and
    modification times, so different or changed source folders never share a cache folder."""
    stats = [(str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns) for p in sources.values()]
    root = cache_root / f"{name}-{hashlib.sha256(repr(stats).encode()).hexdigest()[:12]}"
    raw = root / _SPECS[name][0] / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for file_name, source in sources.items():
        target = raw / file_name
        if target.is_file():
            continue
        try:
            with atomic_path(target) as tmp:  # a crash never leaves a half-written file in the cache
                with open(source, "rb") as f:
                    compressed = source.suffix == ".gz" or f.read(2) == b"\x1f\x8b"  # gzip magic
                with gzip.open(source) if compressed else open(source, "rb") as src, open(tmp, "wb") as out:
                    shutil.copyfileobj(src, out, 1 << 20)
                _check_idx(Path(tmp), source, IDX_FILES[file_name])
        except (gzip.BadGzipFile, EOFError, zlib.error) as e:
            raise InputError(f"{source} is corrupt or truncated: cannot decompress it ({e})") from e
    return root


def _read(name: str, root: Path, train: bool, download: bool) -> tuple[Tensor, Tensor]:
    """uint8 images (N, H, W) and int64 labels (N,) read by torchvision from ``root``."""
    try:
        dataset = _dataset_class(name)(root, train=train, download=download)
    except (RuntimeError, OSError) as e:
        if download:
            raise InputError(f"could not download {name} into {root} ({e}); without network, {_HOW_TO_PROVIDE}") from e
        raise InputError(f"torchvision could not read {name} from {root}: {e}") from e
    except (AssertionError, ValueError, TypeError, KeyError) as e:
        raise InputError(f"torchvision could not read {name} from {root}: {e!r}") from e
    return dataset.data, dataset.targets


def _to_split(images: Tensor, labels: Tensor, norm: InputNorm, device: torch.device) -> Split:
    # Move uint8 first: a quarter of the bytes of float32 cross to the device.
    x = images.to(device).unsqueeze(1).float().div_(255)
    if not norm.is_identity:
        x = norm.apply(x)
    return Split(x, labels.to(device))


def hold_out_indices(n: int, val_size: int, seed: int) -> tuple[Tensor, Tensor]:
    """Validation and training indices of ``n`` samples: ``val_size`` chosen by ``torch.randperm``
    with a CPU generator seeded with ``seed``, both sorted (each part keeps the file's order). The
    pruning stage calls this with a training run's ``val_size`` and seed to get the very images
    that training held out."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return order[:val_size].sort().values, order[val_size:].sort().values


def load_dataset(
    name: str = "mnist",
    data_dir: str | os.PathLike[str] | None = None,
    *,
    val_size: int = 10_000,
    seed: int = 0,
    device: str | torch.device = "cpu",
    download: bool = False,
    cache_dir: str | os.PathLike[str] | None = None,
    train_subset: int | None = None,
    test_subset: int | None = None,
    input_norm: InputNorm | str = "dataset",
) -> DataSplits:
    """Load ``name`` ("mnist" or "fashion_mnist") whole onto ``device`` as normalised tensors.

    ``input_norm`` is ``"dataset"`` (the training set's mean and std, :data:`DATASET_NORMS`),
    ``"none"`` (``pixel / 255`` in [0, 1]) or an :class:`~anrat.input_norm.InputNorm`.

    Files come from ``data_dir``, else ``$ANRAT_DATA_DIR``; with neither, ``download=True`` lets
    torchvision download into the cache root. The cache is ``cache_dir``, else
    ``$ANRAT_CACHE_DIR``, else ``~/.cache/anrat``.

    ``val_size`` training images (0 for none) are held out for validation, chosen by
    ``torch.randperm`` with a CPU generator seeded with ``seed``; both parts keep the file's order.
    ``train_subset`` keeps the first k remaining training images, ``test_subset`` the first k test
    images (for quick runs).
    """
    if name not in _SPECS:
        raise InputError(f"unknown dataset {name!r}: expected one of {', '.join(DATASETS)}")
    dataset_cls = _dataset_class(name)
    norm = input_norm if isinstance(input_norm, InputNorm) else InputNorm.parse(str(input_norm), DATASET_NORMS[name])
    _check_count("val_size", val_size, 0, 10**9)
    for what, subset in (("train_subset", train_subset), ("test_subset", test_subset)):
        if subset is not None:
            _check_count(what, subset, 1, 10**9)
    device = resolve_device(device)
    cache_root = Path(cache_dir or os.environ.get("ANRAT_CACHE_DIR") or Path.home() / ".cache" / "anrat").expanduser()

    origin = "data_dir" if data_dir is not None else "ANRAT_DATA_DIR"
    folder = data_dir if data_dir is not None else os.environ.get("ANRAT_DATA_DIR") or None
    if folder is not None:
        root = _fill_cache(name, _find_sources(name, Path(folder).expanduser(), origin), cache_root)
        download = False
    elif download:
        root = cache_root
    else:
        raise InputError(
            f"no {name} data given and download=False: {_HOW_TO_PROVIDE}, or pass download=True (--download on the "
            f"command line) on a machine with internet"
        )

    (train_images, train_labels), (test_images, test_labels) = (_read(name, root, t, download) for t in (True, False))
    num_classes = len(dataset_cls.classes)
    for images, labels, kind in ((train_images, train_labels, "train"), (test_images, test_labels, "t10k")):
        if len(images) != len(labels):
            raise InputError(
                f"{name}: {kind}-images holds {len(images)} images but {kind}-labels holds {len(labels)} labels"
            )
        if len(labels) and not 0 <= int(labels.min()) <= int(labels.max()) < num_classes:
            raise InputError(f"{name}: {kind}-labels holds labels outside 0..{num_classes - 1}")
    if train_images.shape[1:] != test_images.shape[1:]:
        raise InputError(
            f"{name}: training images are {tuple(train_images.shape[1:])}, test images {tuple(test_images.shape[1:])}"
        )

    n_train = len(train_images)
    _check_count(f"val_size for {n_train} training images", val_size, 0, n_train - 1)
    val_index, train_index = hold_out_indices(n_train, val_size, seed)
    if train_subset is not None:
        _check_count(f"train_subset for {len(train_index)} training images", train_subset, 1, len(train_index))
        train_index = train_index[:train_subset]
    if test_subset is not None:
        _check_count(f"test_subset for {len(test_images)} test images", test_subset, 1, len(test_images))
        test_images, test_labels = test_images[:test_subset], test_labels[:test_subset]

    return DataSplits(
        train=_to_split(train_images[train_index], train_labels[train_index], norm, device),
        val=_to_split(train_images[val_index], train_labels[val_index], norm, device) if val_size else None,
        test=_to_split(test_images, test_labels, norm, device),
        name=name,
        num_classes=num_classes,
        input_shape=(1, *train_images.shape[1:]),
        input_norm=norm,
    )


def as_split(data: Any, what: str = "data", device: str | torch.device | None = None) -> Split:
    """The data a user already has as one :class:`Split` of whole tensors.

    Accepts a :class:`Split` (returned as is unless ``device`` differs), an ``(x, y)`` pair of
    tensors, a ``torch.utils.data.Dataset`` whose items are ``(input tensor, target)`` pairs (a
    ``TensorDataset``, or a torchvision dataset with ``transform=ToTensor()``), or a ``DataLoader``
    over such items. A dataset or loader is read once, in its own order, and held in memory: the
    pruning stage samples and reshuffles it many times. ``what`` names the data in error messages.
    """
    if isinstance(data, Split):
        split = data
    elif isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(t, Tensor) for t in data):
        split = Split(data[0], data[1])
    elif isinstance(data, DataLoader):
        split = _collect(data, what)
    elif isinstance(data, Dataset):
        split = _collect(DataLoader(data, batch_size=1024, shuffle=False), what)
    else:
        raise InputError(
            f"{what} must be an anrat.data.Split, an (x, y) pair of tensors, a torch Dataset of "
            f"(input, target) items or a DataLoader over them; got {type(data).__name__}"
        )
    if split.x.dim() < 2 or len(split) == 0:
        raise InputError(
            f"{what} must hold at least one sample with a batch dimension first; inputs have shape "
            f"{tuple(split.x.shape)}"
        )
    if not split.x.is_floating_point():
        raise InputError(f"{what} inputs must be floating point (e.g. pixel / 255), got {split.x.dtype}")
    if not isinstance(data, Split):  # a Split was checked when it was made
        _check_finite(split, what)
    return split.to(device) if device is not None and split.x.device != torch.device(device) else split


def _check_finite(split: Split, what: str) -> None:
    """Refuse NaN or infinite inputs (or float targets): no model can be trained or tested on them."""
    for name, tensor in (("inputs", split.x), ("targets", split.y)):
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise InputError(f"{what} {name} are not finite: they hold NaN or infinite values")


def _collect(loader: DataLoader, what: str) -> Split:
    xs, ys = [], []
    try:
        for item in loader:
            if not (isinstance(item, (tuple, list)) and len(item) == 2):
                raise InputError(
                    f"{what}: each batch must be an (inputs, targets) pair, got {type(item).__name__}"
                    f"{f' of {len(item)}' if isinstance(item, (tuple, list)) else ''}"
                )
            x, y = item
            if not isinstance(x, Tensor):
                raise InputError(
                    f"{what}: inputs are {type(x).__name__}, not tensors; give the dataset a "
                    "transform such as torchvision.transforms.ToTensor()"
                )
            xs.append(x)
            ys.append(torch.as_tensor(y))
    except TypeError as exc:  # default_collate refuses PIL images and ragged items with a TypeError
        raise InputError(
            f"{what} could not be batched ({str(exc).splitlines()[0]}); items must be (tensor, target) "
            "pairs of one shape, e.g. a torchvision dataset with transform=ToTensor()"
        ) from None
    if not xs:
        raise InputError(f"{what} is empty")
    return Split(torch.cat(xs), torch.cat(ys))
