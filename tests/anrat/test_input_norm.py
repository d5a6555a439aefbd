"""The input contract: parsing, applying, recording and baking in a per-channel normalisation."""

import json

import pytest
import torch
from torchvision.transforms import Normalize

from anrat.errors import InputError
from anrat.input_norm import METADATA_KEY, InputNorm, with_preprocessing

DATASET = InputNorm.of(0.286, 0.353)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("none", InputNorm()),
        ("dataset", DATASET),
        ("0.5,0.25", InputNorm((0.5,), (0.25,))),
        ("0.485,0.456,0.406:0.229,0.224,0.225", InputNorm((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))),
    ],
)
def test_parse(text, expected):
    assert InputNorm.parse(text, DATASET) == expected


@pytest.mark.parametrize(
    "text, message",
    [
        ("abc", "not understood"),
        ("0.5", "1 numbers"),
        ("0.5,0,", "not understood"),
        ("0.5,0", "stds must be > 0"),
        ("0.5,nan", "finite"),
        ("0.1,0.2:0.3", "as many means as stds"),
    ],
)
def test_parse_refuses(text, message):
    with pytest.raises(InputError, match=message):
        InputNorm.parse(text, DATASET)


def test_dataset_needs_a_dataset():
    with pytest.raises(InputError, match="needs a named dataset"):
        InputNorm.parse("dataset", None)


def test_apply_and_module_agree_with_torchvision_normalize():
    x = torch.rand(4, 3, 5, 5)
    norm = InputNorm((0.1, 0.2, 0.3), (0.5, 0.6, 0.7))
    expected = Normalize([0.1, 0.2, 0.3], [0.5, 0.6, 0.7])(x)
    torch.testing.assert_close(norm.apply(x), expected)
    torch.testing.assert_close(norm.module()(x), expected)
    one = InputNorm.of(0.5, 0.25)  # one value broadcasts over every channel
    torch.testing.assert_close(one.apply(x), (x - 0.5) / 0.25)
    assert InputNorm.none().apply(x) is x
    with pytest.raises(InputError, match="3 channels"):
        norm.apply(torch.rand(2, 1, 5, 5))


def test_with_preprocessing_feeds_the_model_normalised_inputs():
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 2))
    norm = InputNorm.of(0.3, 0.2)
    x = torch.rand(3, 1, 2, 2)
    torch.testing.assert_close(with_preprocessing(model, norm)(x), model(norm.apply(x)))
    assert with_preprocessing(model, InputNorm.none()) is model


def test_record_round_trip_and_metadata():
    norm = InputNorm((0.1, 0.2), (0.3, 0.4))
    assert InputNorm.from_dict(json.loads(json.dumps(norm.as_dict())), "here") == norm
    meta = norm.onnx_metadata(in_graph=False)
    record = json.loads(meta[METADATA_KEY])
    assert record["mean"] == [0.1, 0.2] and record["in_graph"] is False
    assert "does not normalise" in meta["anrat.input"]
    assert json.loads(norm.onnx_metadata(in_graph=True)[METADATA_KEY])["in_graph"] is True
    with pytest.raises(InputError, match="no readable input normalisation"):
        InputNorm.from_dict({"mean": 1}, "the file")
