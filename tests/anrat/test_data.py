"""anrat.data on the real MNIST files, on Fashion-MNIST where installed, and on small IDX files
written here for the error cases."""

from __future__ import annotations

import gzip
import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch

from anrat.data import IDX_FILES, DataSplits, Split, load_dataset
from anrat.devices import resolve_device
from anrat.errors import InputError

# ---- helpers -------------------------------------------------------------------------------------


def _idx_bytes(folder: Path, name: str) -> bytes:
    """The uncompressed bytes of IDX file ``name`` in ``folder``, read with gzip alone (an oracle
    independent of torchvision and anrat)."""
    plain = folder / name
    return plain.read_bytes() if plain.is_file() else gzip.decompress((folder / f"{name}.gz").read_bytes())


def _reference(folder: Path, prefix: str) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 images (N, 28, 28) and int64 labels (N,) of the ``prefix`` ("train" or "t10k") files."""
    images = np.frombuffer(_idx_bytes(folder, f"{prefix}-images-idx3-ubyte"), np.uint8, offset=16)
    labels = np.frombuffer(_idx_bytes(folder, f"{prefix}-labels-idx1-ubyte"), np.uint8, offset=8)
    return torch.from_numpy(images.reshape(-1, 28, 28).copy()), torch.from_numpy(labels.astype(np.int64))


def _pixels(split: Split, data: DataSplits) -> torch.Tensor:
    """Undo the normalisation into uint8 (N, 28, 28), asserting each value sits on the 0..255
    integer grid (float32 rounding leaves about 3e-5)."""
    chunks = []
    for x in split.x.squeeze(1).split(10_000):
        pixels = (x * data.input_norm.std[0]).add_(data.input_norm.mean[0]).mul_(255)
        rounded = pixels.round()
        assert (pixels - rounded).abs().max() < 1e-3
        chunks.append(rounded.to(torch.uint8))
    return torch.cat(chunks)


def _keys(pixels: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """An exact key per (image, label): integer-weighted pixel sums stay below 2**53 in float64,
    so equal images give equal keys whatever the summation order."""
    weights = torch.randint(0, 2**20, (28 * 28,), generator=torch.Generator().manual_seed(0)).double()
    sums = torch.cat([chunk.flatten(1).double() @ weights for chunk in pixels.split(10_000)])
    return sums * 16 + labels.double()


def _write_idx(path: Path, array: np.ndarray, magic: int | None = None) -> None:
    """Write ``array`` as unsigned bytes in IDX format, gzipped when ``path`` ends in .gz."""
    header = np.array([0x0800 + array.ndim if magic is None else magic, *array.shape], dtype=">u4")
    data = header.tobytes() + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(data) if path.suffix == ".gz" else data)


def _fake_mnist(folder: Path, n_train: int = 40, n_test: int = 10, gz: bool = True, first_label: int = 0) -> Path:
    """A tiny dataset in the MNIST file layout: random 28x28 images, labels cycling from ``first_label``."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    suffix = ".gz" if gz else ""
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        _write_idx(folder / f"{prefix}-images-idx3-ubyte{suffix}", rng.integers(0, 256, (n, 28, 28)))
        _write_idx(folder / f"{prefix}-labels-idx1-ubyte{suffix}", (np.arange(n) + first_label) % 10)
    return folder


def _snapshot(folder: Path) -> dict[str, tuple[int, int, str]]:
    return {
        p.name: (p.stat().st_size, p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
        for p in sorted(folder.iterdir())
    }


# ---- real MNIST ----------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def mnist(mnist_dir: Path) -> DataSplits:
    return load_dataset("mnist", mnist_dir, seed=0)


@pytest.fixture(scope="session")
def mnist_reference(mnist_dir: Path) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    return {prefix: _reference(mnist_dir, prefix) for prefix in ("train", "t10k")}


def test_mnist_shapes_dtypes_and_labels(mnist: DataSplits) -> None:
    assert (mnist.name, mnist.num_classes, mnist.input_shape) == ("mnist", 10, (1, 28, 28))
    assert (len(mnist.train), len(mnist.val), len(mnist.test)) == (50_000, 10_000, 10_000)
    for split in (mnist.train, mnist.val, mnist.test):
        assert split.x.dtype == torch.float32 and split.x.shape[1:] == (1, 28, 28)
        assert split.y.dtype == torch.int64 and split.y.shape == (len(split),)
        assert split.x.device.type == "cpu"
        assert torch.equal(split.y.unique(), torch.arange(10))


def test_mnist_training_split_is_normalised(mnist: DataSplits) -> None:
    # Measured on the shared copy, seeds 0..5: mean within 4e-4 of 0, std 1.0002 to 1.0008. A
    # normalising constant off by 0.001 moves one of them by 3e-3.
    assert abs(mnist.train.x.mean().item()) < 2e-3
    assert abs(mnist.train.x.std().item() - 1) < 2e-3


def test_mnist_test_split_is_the_t10k_files_in_order(mnist: DataSplits, mnist_reference) -> None:
    images, labels = mnist_reference["t10k"]
    assert torch.equal(_pixels(mnist.test, mnist), images)
    assert torch.equal(mnist.test.y, labels)


def test_mnist_train_and_val_partition_the_training_files(mnist: DataSplits, mnist_reference) -> None:
    images, labels = mnist_reference["train"]
    train_keys = _keys(_pixels(mnist.train, mnist), mnist.train.y)
    val_keys = _keys(_pixels(mnist.val, mnist), mnist.val.y)
    assert len(train_keys) + len(val_keys) == len(labels) == 60_000
    assert torch.equal(torch.cat([train_keys, val_keys]).sort().values, _keys(images, labels).sort().values)
    assert not np.isin(val_keys.numpy(), train_keys.numpy()).any()


def test_mnist_split_depends_on_the_seed_only(mnist: DataSplits, mnist_dir: Path) -> None:
    again = load_dataset("mnist", mnist_dir, seed=0, test_subset=1)
    other = load_dataset("mnist", mnist_dir, seed=1, test_subset=1)
    assert torch.equal(again.val.x, mnist.val.x) and torch.equal(again.val.y, mnist.val.y)
    assert not torch.equal(other.val.y, mnist.val.y)


def test_mnist_cache_is_filled_and_reused_and_the_source_untouched(mnist_dir: Path, tmp_path: Path) -> None:
    before = _snapshot(mnist_dir)
    cache = tmp_path / "cache"
    load_dataset("mnist", mnist_dir, cache_dir=cache, train_subset=10, test_subset=10)
    (root,) = cache.iterdir()
    assert root.name.startswith("mnist-")
    raw = root / "MNIST" / "raw"
    assert sorted(p.name for p in raw.iterdir()) == sorted(IDX_FILES)
    for name in IDX_FILES:
        assert (raw / name).read_bytes() == _idx_bytes(mnist_dir, name)
    cached = {p.name: p.stat().st_mtime_ns for p in raw.iterdir()}

    load_dataset("mnist", mnist_dir, cache_dir=cache, train_subset=10, test_subset=10)
    assert [p.name for p in cache.iterdir()] == [root.name]
    assert {p.name: p.stat().st_mtime_ns for p in raw.iterdir()} == cached
    assert _snapshot(mnist_dir) == before


def test_mnist_from_uncompressed_files(mnist: DataSplits, mnist_dir: Path, tmp_path: Path) -> None:
    for name in IDX_FILES:
        (tmp_path / name).write_bytes(_idx_bytes(mnist_dir, name))
    plain = load_dataset("mnist", tmp_path, seed=0)
    for ours, theirs in ((plain.train, mnist.train), (plain.val, mnist.val), (plain.test, mnist.test)):
        assert torch.equal(ours.x, theirs.x) and torch.equal(ours.y, theirs.y)


def test_shuffled_batches_cover_mnist_train_once(mnist: DataSplits) -> None:
    xs, ys = zip(*mnist.train.batches(4096, shuffle=True, generator=torch.Generator().manual_seed(0)))
    assert len(xs) == mnist.train.num_batches(4096) == 13
    keys = _keys(_pixels(Split(torch.cat(xs), torch.cat(ys)), mnist), torch.cat(ys))
    assert torch.equal(keys.sort().values, _keys(_pixels(mnist.train, mnist), mnist.train.y).sort().values)


# ---- Fashion-MNIST -------------------------------------------------------------------------------


def test_fashion_mnist(fashion_mnist_dir) -> None:
    data = load_dataset("fashion_mnist", fashion_mnist_dir, val_size=0)
    assert (data.name, data.num_classes, data.input_shape, data.val) == ("fashion_mnist", 10, (1, 28, 28), None)
    for split, prefix in ((data.train, "train"), (data.test, "t10k")):
        images, labels = _reference(fashion_mnist_dir, prefix)
        assert torch.equal(_pixels(split, data), images) and torch.equal(split.y, labels)
    assert torch.equal(torch.bincount(data.train.y), torch.full((10,), 6_000))
    # Measured: mean 1e-4, std 1.00007 over the 60,000 training images.
    assert abs(data.train.x.mean().item()) < 2e-3 and abs(data.train.x.std().item() - 1) < 2e-3


# ---- small synthetic files -----------------------------------------------------------------------


def test_split_sizes_and_subsets(tmp_path: Path) -> None:
    folder = _fake_mnist(tmp_path / "d")
    full = load_dataset("mnist", folder, val_size=10, seed=3)
    assert (len(full.train), len(full.val), len(full.test)) == (30, 10, 10)
    small = load_dataset("mnist", folder, val_size=10, seed=3, train_subset=5, test_subset=4)
    assert torch.equal(small.train.x, full.train.x[:5]) and torch.equal(small.train.y, full.train.y[:5])
    assert torch.equal(small.test.y, full.test.y[:4]) and torch.equal(small.val.x, full.val.x)
    no_val = load_dataset("mnist", folder, val_size=0)
    assert no_val.val is None and torch.equal(no_val.train.y, torch.arange(40) % 10)


def test_gzip_found_by_content_and_plain_file_preferred(tmp_path: Path) -> None:
    folder = _fake_mnist(tmp_path / "d", first_label=4)
    (folder / "t10k-labels-idx1-ubyte.gz").rename(folder / "t10k-labels-idx1-ubyte")  # gzip, no .gz
    _write_idx(folder / "train-labels-idx1-ubyte", np.full(40, 9))  # beside the .gz, which says 4, 5, ...
    data = load_dataset("mnist", folder, val_size=0)
    assert torch.equal(data.test.y, (torch.arange(10) + 4) % 10)
    assert torch.equal(data.train.y, torch.full((40,), 9))


def test_folder_from_environment_and_dataset_subfolders(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_mnist(tmp_path / "a" / "mnist", first_label=1)
    _fake_mnist(tmp_path / "b" / "MNIST" / "raw", first_label=2)
    _fake_mnist(tmp_path / "c" / "fashion-mnist", first_label=3)
    monkeypatch.setenv("ANRAT_DATA_DIR", str(tmp_path / "a"))
    assert load_dataset("mnist", val_size=0).train.y[0] == 1
    assert load_dataset("mnist", tmp_path / "b", val_size=0).train.y[0] == 2
    assert load_dataset("fashion_mnist", tmp_path / "c", val_size=0).train.y[0] == 3


def test_two_source_folders_never_share_a_cache(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    first = load_dataset("mnist", _fake_mnist(tmp_path / "a", first_label=0), val_size=0, cache_dir=cache)
    second = load_dataset("mnist", _fake_mnist(tmp_path / "b", first_label=5), val_size=0, cache_dir=cache)
    assert len(list(cache.iterdir())) == 2
    assert torch.equal(first.train.y, torch.arange(40) % 10)
    assert torch.equal(second.train.y, (torch.arange(40) + 5) % 10)


def test_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(InputError, match=r"nowhere.*does not exist"):
        load_dataset("mnist", tmp_path / "nowhere")


def test_no_folder_and_no_download_says_how_to_provide_one(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ANRAT_DATA_DIR", raising=False)
    with pytest.raises(InputError, match=r"--data-dir.*ANRAT_DATA_DIR.*train-images-idx3-ubyte") as info:
        load_dataset("mnist")
    assert all(name in str(info.value) for name in IDX_FILES)


@pytest.mark.parametrize("name", list(IDX_FILES))
def test_missing_file_is_named(tmp_path: Path, name: str) -> None:
    folder = _fake_mnist(tmp_path / "d")
    (folder / f"{name}.gz").unlink()
    with pytest.raises(InputError, match=rf"has no {name}\[\.gz\]"):
        load_dataset("mnist", folder, val_size=10)


def test_not_gzip_is_named(tmp_path: Path) -> None:
    folder = _fake_mnist(tmp_path / "d")
    (folder / "train-labels-idx1-ubyte.gz").write_bytes(b"this is not gzip data")
    with pytest.raises(InputError, match=r"train-labels-idx1-ubyte\.gz is corrupt"):
        load_dataset("mnist", folder, val_size=10)


def test_truncated_gzip_is_named_and_not_cached(tmp_path: Path) -> None:
    folder = _fake_mnist(tmp_path / "d")
    path = folder / "t10k-images-idx3-ubyte.gz"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    cache = tmp_path / "cache"
    with pytest.raises(InputError, match=r"t10k-images-idx3-ubyte\.gz is corrupt or truncated"):
        load_dataset("mnist", folder, val_size=10, cache_dir=cache)
    cached = sorted(p.name for p in cache.glob("*/MNIST/raw/*"))
    assert "t10k-images-idx3-ubyte" not in cached and not [n for n in cached if n.endswith(".tmp")]


def test_truncated_idx_is_named(tmp_path: Path) -> None:
    folder = _fake_mnist(tmp_path / "d", gz=False)
    path = folder / "train-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(InputError, match=r"train-images-idx3-ubyte is truncated or corrupt.*40x28x28"):
        load_dataset("mnist", folder, val_size=10)


def test_wrong_magic_is_named(tmp_path: Path) -> None:
    folder = _fake_mnist(tmp_path / "d", gz=False)
    _write_idx(folder / "t10k-labels-idx1-ubyte", np.zeros(10), magic=0x0803)
    with pytest.raises(InputError, match=r"t10k-labels-idx1-ubyte is not an IDX file.*0x00000803"):
        load_dataset("mnist", folder, val_size=10)


def test_labels_out_of_range(tmp_path: Path) -> None:
    folder = _fake_mnist(tmp_path / "d")
    _write_idx(folder / "train-labels-idx1-ubyte.gz", np.full(40, 12))
    with pytest.raises(InputError, match=r"train-labels holds labels outside 0\.\.9"):
        load_dataset("mnist", folder, val_size=10)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"name": "cifar10"}, "unknown dataset 'cifar10'"),
        ({"val_size": -1}, "val_size"),
        ({"val_size": 40}, "val_size for 40 training images"),
        ({"train_subset": 0}, "train_subset"),
        ({"train_subset": 31}, "train_subset for 30 training images"),
        ({"test_subset": 11}, "test_subset for 10 test images"),
        ({"device": "toaster"}, "unknown device 'toaster'"),
    ],
)
def test_bad_arguments(tmp_path: Path, kwargs: dict, message: str) -> None:
    folder = _fake_mnist(tmp_path / "d")
    with pytest.raises(InputError, match=message):
        load_dataset(data_dir=folder, **{"val_size": 10, **kwargs})


# ---- device and batches --------------------------------------------------------------------------


def test_load_on_auto_device(tmp_path: Path) -> None:
    data = load_dataset("mnist", _fake_mnist(tmp_path / "d"), val_size=10, device="auto")
    assert data.train.x.device.type == data.test.y.device.type == resolve_device("auto").type
    assert data.train.to("cpu").x.device.type == "cpu"


def _numbered_split(n: int = 103) -> Split:
    """x[i] = 2 i, y[i] = i, so a batch's pairing and coverage are easy to check."""
    return Split(torch.arange(n, dtype=torch.float32).unsqueeze(1) * 2, torch.arange(n))


def test_batches_in_order() -> None:
    batches = list(_numbered_split().batches(10))
    assert [len(y) for _, y in batches] == [10] * 10 + [3] == [10] * (_numbered_split().num_batches(10) - 1) + [3]
    assert torch.equal(torch.cat([y for _, y in batches]), torch.arange(103))


@pytest.mark.parametrize("drop_last", [False, True])
def test_shuffled_batches_cover_every_sample_once(drop_last: bool) -> None:
    split = _numbered_split()
    batches = list(split.batches(10, shuffle=True, generator=torch.Generator().manual_seed(0), drop_last=drop_last))
    assert len(batches) == split.num_batches(10, drop_last=drop_last) == (10 if drop_last else 11)
    x, y = torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])
    assert torch.equal(x.squeeze(1), 2 * y.float())
    assert len(y.unique()) == len(y) == (100 if drop_last else 103)
    assert not torch.equal(y, torch.arange(len(y)))


def test_shuffle_is_reproducible_and_resumable() -> None:
    split = _numbered_split()

    def epoch(generator: torch.Generator) -> torch.Tensor:
        return torch.cat([y for _, y in split.batches(10, shuffle=True, generator=generator)])

    generator = torch.Generator().manual_seed(7)
    first, state = epoch(generator), generator.get_state()
    second = epoch(generator)
    assert torch.equal(first, epoch(torch.Generator().manual_seed(7)))
    assert torch.equal(second, epoch(torch.Generator().set_state(state)))
    assert not torch.equal(first, second)
    assert not torch.equal(first, epoch(torch.Generator().manual_seed(8)))


def test_split_rejects_mismatched_lengths_and_bad_batch_size() -> None:
    with pytest.raises(InputError, match="3 inputs and 2 targets"):
        Split(torch.zeros(3, 1), torch.zeros(2))
    with pytest.raises(InputError, match="batch_size"):
        next(_numbered_split().batches(0))


def test_input_norm_none_gives_pixels_over_255(tmp_path: Path) -> None:
    folder = _fake_mnist(tmp_path / "d")
    raw = load_dataset("mnist", folder, val_size=0, input_norm="none")
    images, _ = _reference(folder, "t10k")
    assert torch.equal(raw.test.x.squeeze(1), images.float() / 255)
    assert raw.input_norm.is_identity
    normalised = load_dataset("mnist", folder, val_size=0)
    # the default is the dataset's normalisation, the same numbers torchvision's Normalize gives
    torch.testing.assert_close(normalised.test.x, (raw.test.x - 0.1307) / 0.3081)
