"""A user's own data: tensor files, image folders, Datasets and DataLoaders, and the splits built from them."""

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader, TensorDataset

from anrat.data import Split, as_split
from anrat.data_files import load_data_file, load_splits
from anrat.errors import InputError
from anrat.input_norm import InputNorm


def _image_folder(root, classes=("cat", "dog"), per_class=3, mode="L", size=(6, 5), seed=0):
    rng = np.random.default_rng(seed)
    pixels = {}
    for c in classes:
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            shape = (size[1], size[0]) if mode == "L" else (size[1], size[0], 3)
            array = rng.integers(0, 256, shape, dtype=np.uint8)
            Image.fromarray(array, mode).save(root / c / f"{i}.png")
            pixels[(c, i)] = array
    return pixels


def test_image_folder_gives_pixels_over_255_and_sorted_classes(tmp_path):
    pixels = _image_folder(tmp_path / "imgs")
    data = load_data_file(tmp_path / "imgs")
    assert data.classes == ["cat", "dog"]
    assert data.split.x.shape == (6, 1, 5, 6) and data.split.y.tolist() == [0, 0, 0, 1, 1, 1]
    expected = torch.from_numpy(pixels[("dog", 1)]).float() / 255
    torch.testing.assert_close(data.split.x[4, 0], expected)


def test_image_folder_rgb_and_mode_conversion(tmp_path):
    _image_folder(tmp_path / "rgb", mode="RGB")
    assert load_data_file(tmp_path / "rgb").split.x.shape[1] == 3
    assert load_data_file(tmp_path / "rgb", image_mode="L").split.x.shape[1] == 1


def test_tensor_file(tmp_path):
    x = torch.randint(0, 256, (5, 1, 4, 4), dtype=torch.uint8)
    torch.save({"x": x, "y": torch.tensor([0, 1, 2, 1, 0])}, tmp_path / "d.pt")
    split = load_data_file(tmp_path / "d.pt").split
    torch.testing.assert_close(split.x, x.float() / 255)
    torch.save({"inputs": x}, tmp_path / "bad.pt")
    with pytest.raises(InputError, match="must hold a dict with tensors 'x'"):
        load_data_file(tmp_path / "bad.pt")
    with pytest.raises(InputError, match="does not exist"):
        load_data_file(tmp_path / "nowhere.pt")


def test_as_split_takes_what_users_have():
    x, y = torch.rand(10, 3), torch.arange(10) % 2
    for data in ((x, y), TensorDataset(x, y), DataLoader(TensorDataset(x, y), batch_size=3), Split(x, y)):
        split = as_split(data)
        assert torch.equal(split.x, x) and torch.equal(split.y, y)
    with pytest.raises(InputError, match="must be an anrat.data.Split"):
        as_split({"x": x})
    with pytest.raises(InputError, match="inputs must be floating point"):
        as_split((y.reshape(10, 1), y))


def test_load_splits_from_files_applies_the_norm_and_holds_out_validation(tmp_path):
    x, y = torch.rand(20, 1, 4, 4), torch.arange(20) % 3
    torch.save({"x": x, "y": y}, tmp_path / "train.pt")
    torch.save({"x": x[:5], "y": y[:5]}, tmp_path / "test.pt")
    norm = InputNorm.of(0.5, 0.25)
    data = load_splits(input_norm=norm, train_data=tmp_path / "train.pt", test_data=tmp_path / "test.pt", val_size=4)
    assert (len(data.train), len(data.val), len(data.test)) == (16, 4, 5)
    torch.testing.assert_close(data.test.x, norm.apply(x[:5]))
    assert "held out of the training data" in data.sources["val"] and data.num_classes == 3


def test_the_test_data_is_refused_as_validation(tmp_path):
    torch.save({"x": torch.rand(4, 2), "y": torch.arange(4) % 2}, tmp_path / "t.pt")
    for val in ("test", tmp_path / "t.pt"):
        with pytest.raises(InputError, match="test split cannot serve as validation"):
            load_splits(
                input_norm=InputNorm.none(), train_data=tmp_path / "t.pt", val_data=val, test_data=tmp_path / "t.pt"
            )


def test_image_folders_must_name_the_same_classes(tmp_path):
    _image_folder(tmp_path / "train", classes=("a", "b"))
    _image_folder(tmp_path / "test", classes=("a", "c"))
    with pytest.raises(InputError, match="different classes"):
        load_splits(input_norm=InputNorm.none(), train_data=tmp_path / "train", test_data=tmp_path / "test", val_size=2)
