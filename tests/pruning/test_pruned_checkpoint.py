"""Pruned checkpoints load as data and rebuild the smaller network, registered or from elsewhere."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch.nn.utils import prune

from anrat.checkpoint import model_from_checkpoint
from anrat.errors import InputError
from anrat.models import count_parameters, lenet5, mlp
from pruning.masks import apply_masks, count_nonzero
from pruning.pruned_checkpoint import FORMAT, import_factory, load_pruned, save_pruned
from pruning.surgery import prune_units

SQUEEZENET = "torchvision.models:squeezenet1_1"  # a model from elsewhere: Fire modules with concatenation

UNPICKLED: list[str] = []


def _record_unpickling(tag: str) -> str:
    UNPICKLED.append(tag)
    return tag


class Payload:
    """Stands in for a hostile object: unpickling it would call _record_unpickling."""

    def __reduce__(self):
        return (_record_unpickling, ("payload ran",))


def test_registered_model_round_trip_with_new_widths(tmp_path: Path):
    torch.manual_seed(0)
    model = lenet5()
    x = torch.randn(4, 1, 28, 28)
    prune_units(model, {"conv2": list(range(25)), "fc1": list(range(0, 500, 3))}, x[:1])
    gen = torch.Generator().manual_seed(1)
    apply_masks(model, {"fc1.weight": torch.rand(model.fc1.weight.shape, generator=gen) < 0.5})
    path = save_pruned(
        model,
        tmp_path / "lenet.pt",
        arch={"name": "lenet5", "kwargs": {"num_classes": 10}},
        metrics={"val_error": 0.0123},
    )

    raw = torch.load(path, weights_only=True)
    assert raw["format"] == FORMAT
    assert raw["arch"] == {"name": "lenet5", "kwargs": {"num_classes": 10, "conv1": 20, "conv2": 25, "fc1": 333}}
    assert raw["metrics"] == {"val_error": 0.0123}
    assert "fc1.weight_mask" not in raw["state_dict"]  # masks were baked in
    assert prune.is_pruned(model)  # ... into a copy: the caller's model still has its hooks

    loaded = load_pruned(path).eval()
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)
    assert count_nonzero(loaded) == count_nonzero(model)
    assert count_parameters(loaded) == count_parameters(model_from_checkpoint(raw)) < 431_080


def test_model_from_elsewhere_round_trip_replays_the_history(tmp_path: Path):
    torch.manual_seed(2)
    model = import_factory(SQUEEZENET)(num_classes=10)
    x = torch.randn(3, 3, 64, 64)
    prune_units(model, {"features.3.expand1x1": [0, 5, 9], "features.3.expand3x3": [1, 2]}, x[:1])
    prune_units(model, {"features.9.squeeze": list(range(20))}, x[:1])  # a second round, new numbering
    path = save_pruned(model, tmp_path / "squeeze.pt", factory=SQUEEZENET, factory_kwargs={"num_classes": 10})

    raw = torch.load(path, weights_only=True)
    assert [e["module"] for e in raw["history"]] == [
        "features.3.expand1x1",
        "features.3.expand3x3",
        "features.9.squeeze",
    ]
    with pytest.raises(InputError, match=r"runs code; pass allow_factories=\['torchvision.models:squeezenet1_1'\]"):
        load_pruned(path)

    loaded = load_pruned(path, allow_factories=[SQUEEZENET]).eval()
    model.eval()
    assert loaded.features[4].squeeze.in_channels == 128 - 5
    assert loaded.features[9].squeeze.out_channels == 48 - 20
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)


def test_a_file_with_pickled_code_is_refused_without_running_it(tmp_path: Path):
    path = tmp_path / "hostile.pt"
    torch.save({"format": FORMAT, "state_dict": {}, "arch": {"name": "mlp"}, "payload": Payload()}, path)
    with pytest.raises(InputError, match="holds pickled Python objects"):
        load_pruned(path)
    assert UNPICKLED == []

    whole_module = tmp_path / "module.pt"
    torch.save(mlp(in_features=4, hidden=(3,), out_features=2), whole_module)  # pickles the classes
    with pytest.raises(InputError, match="pickled"):
        load_pruned(whole_module)


def test_save_refuses_what_could_not_be_loaded_back(tmp_path: Path):
    model = lenet5()
    with pytest.raises(InputError, match="exactly one of arch"):
        save_pruned(model, tmp_path / "a.pt")
    with pytest.raises(InputError, match="do not fit"):
        save_pruned(model, tmp_path / "b.pt", arch={"name": "mlp", "kwargs": {}})
    with pytest.raises(InputError, match=r"metrics\['accuracy'\] is a numpy.float32"):
        save_pruned(model, tmp_path / "c.pt", arch={"name": "lenet5"}, metrics={"accuracy": np.float32(0.99)})
    with pytest.raises(InputError, match="cannot import module"):
        save_pruned(model, tmp_path / "d.pt", factory="no_such_package.models:net")
    assert list(tmp_path.iterdir()) == []


def test_import_factory_names_what_is_missing():
    assert import_factory("anrat.models:lenet5") is lenet5
    with pytest.raises(InputError, match="cannot import module 'no_such_package.sub'"):
        import_factory("no_such_package.sub:build")
    with pytest.raises(InputError, match="module 'anrat.models' has no attribute 'resnet'"):
        import_factory("anrat.models:resnet")
    with pytest.raises(InputError, match="must look like 'package.module:function'"):
        import_factory("anrat.models.lenet5")
    with pytest.raises(InputError, match="is a dict, not a callable"):
        import_factory("anrat.models:MODELS")
