"""The model and the data a pruning command works on, loaded and checked against each other.

:func:`load_model` reads a checkpoint of ours (trainer or pruned) or builds a user's model from a
factory and loads its weights (``torch.load(weights_only=True)`` throughout); :func:`load_model_and_data`
adds the splits (a named dataset and/or the user's files), fed as the model was trained
(:func:`resolve_input_norm`), and refuses a model that does not fit them. What to load is said by
two plain records, :class:`ModelSource` and :class:`DataSource`; ``python -m pruning`` fills them
from its flags, which is why the refusals name the flags.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from anrat.checkpoint import load_checkpoint, model_from_checkpoint, recorded_input_norm
from anrat.data import DATASET_NORMS, DataSplits
from anrat.data_files import load_splits
from anrat.errors import InputError
from anrat.input_norm import InputNorm
from pruning.pruned_checkpoint import FORMAT as PRUNED_FORMAT
from pruning.pruned_checkpoint import build_from_factory, load_pruned

DEFAULT_VAL_SIZE = 10_000


@dataclass
class ModelSource:
    """Where a model comes from: a ``checkpoint`` of ours, or a ``factory``
    (``package.module:function``, called with ``factory_kwargs``, a JSON object) and its
    ``weights`` (a state_dict file). ``allow_factories``: factories a pruned checkpoint may name."""

    checkpoint: str | None = None
    factory: str | None = None
    factory_kwargs: str | None = None
    weights: str | None = None
    allow_factories: Sequence[str] = ()


@dataclass
class DataSource:
    """The data a model is tested and pruned on: a named ``dataset`` in ``data_dir`` and/or the
    user's files, ``val_size`` images held out of the training images by ``seed`` (None: the ones
    a training of ours held out, else 10,000), fed with ``input_norm`` (None: as recorded)."""

    dataset: str | None = None
    data_dir: str | None = None
    train_data: str | None = None
    val_data: str | None = None
    test_data: str | None = None
    val_size: int | None = None
    seed: int = 0
    train_subset: int | None = None
    test_subset: int | None = None
    image_mode: str | None = None  # image folders: None keeps grey, else RGB
    input_norm: str | None = None


@dataclass
class LoadedModel:
    """A model to prune or export, how to describe it in a pruned checkpoint, and what its
    checkpoint recorded (input normalisation, the training run's settings)."""

    model: nn.Module
    description: dict[str, Any]
    recorded_norm: InputNorm | None
    run_config: dict[str, Any]
    source: str
    from_factory: bool = False  # built by a factory named by the user (not read from a checkpoint)


def _factory_model(source: ModelSource) -> LoadedModel:
    if not source.weights:
        raise InputError("--factory needs --weights, a state_dict saved with torch.save")
    try:
        factory_kwargs = json.loads(source.factory_kwargs) if source.factory_kwargs else {}
    except json.JSONDecodeError as exc:
        raise InputError(f"--factory-kwargs is not valid JSON: {exc}") from None
    if not isinstance(factory_kwargs, dict):
        raise InputError(f"--factory-kwargs must be a JSON object, got {source.factory_kwargs!r}")
    model = build_from_factory(source.factory, factory_kwargs)
    weights = load_checkpoint(source.weights)
    state = weights.get("state_dict", weights) if isinstance(weights, dict) else weights
    try:
        model.load_state_dict(state)
    except (RuntimeError, TypeError, AttributeError) as exc:
        raise InputError(
            f"weights in {source.weights!r} do not fit the model of {source.factory!r}: {str(exc).splitlines()[0]}"
        ) from None
    recorded = recorded_input_norm(weights) if isinstance(weights, dict) and "input_norm" in weights else None
    description = {"factory": source.factory, "factory_kwargs": factory_kwargs}
    return LoadedModel(model, description, recorded, {}, f"factory {source.factory}", from_factory=True)


def _checkpoint_model(checkpoint: str, allow_factories: Sequence[str]) -> LoadedModel:
    ckpt = load_checkpoint(checkpoint)
    if not isinstance(ckpt, dict) or not ("arch" in ckpt or ckpt.get("format") == PRUNED_FORMAT):
        raise InputError(
            f"{checkpoint!r} is not a checkpoint of anrat (it does not describe its network); for a "
            f"plain state_dict give --factory package.module:function --weights {checkpoint}"
        )
    if ckpt.get("format") == PRUNED_FORMAT:
        model = load_pruned(checkpoint, allow_factories=allow_factories)
    else:
        model = model_from_checkpoint(ckpt)
    description = (
        {"arch": ckpt["arch"]}
        if "arch" in ckpt
        else {"factory": ckpt["factory"]["target"], "factory_kwargs": ckpt["factory"].get("kwargs", {})}
    )
    return LoadedModel(model, description, recorded_input_norm(ckpt), ckpt.get("run_config") or {}, checkpoint)


def load_model(source: ModelSource) -> LoadedModel:
    """The model ``source`` names: a checkpoint of ours (trainer or pruned), or a factory with its
    weights (naming the factory is trusting its code); refused if its weights are not finite."""
    if bool(source.checkpoint) == bool(source.factory):
        raise InputError(
            "give either a checkpoint (model.pt of anrat-train, pruned.pt of anrat-prune) or --factory with --weights"
        )
    if source.factory:
        loaded = _factory_model(source)
    else:
        loaded = _checkpoint_model(source.checkpoint, source.allow_factories)
    check_finite(loaded.model, loaded.source)
    return loaded


def check_finite(model: nn.Module, source: str) -> None:
    """Refuse a model with NaN or infinite weights: it cannot be evaluated, tested or exported."""
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise InputError(
                f"the weights of {source} are not finite ({name} holds NaN or infinite values); "
                "give a checkpoint of a run that did not diverge"
            )


@dataclass
class ResolvedNorm:
    """The input normalisation in force, why (``origin``), and a warning when the one asked for
    differs from the one the checkpoint recorded."""

    norm: InputNorm
    origin: str
    warning: str | None = None


def resolve_input_norm(input_norm: str | None, loaded: LoadedModel, dataset: str | None) -> ResolvedNorm:
    """The normalisation in force: ``input_norm`` as asked (``none``, ``dataset``, ``MEAN,STD``, or
    per channel), else what the checkpoint recorded, else ``none`` for a factory model (its inputs
    are used as given)."""
    if input_norm is not None:
        norm = InputNorm.parse(input_norm, DATASET_NORMS.get(dataset) if dataset else None)
        warning = None
        if loaded.recorded_norm is not None and norm != loaded.recorded_norm:
            warning = (
                f"warning: --input-norm {input_norm} differs from the normalisation recorded in "
                f"{loaded.source} ({loaded.recorded_norm.describe()})"
            )
        return ResolvedNorm(norm, "--input-norm", warning)
    if loaded.recorded_norm is not None:
        return ResolvedNorm(loaded.recorded_norm, f"recorded in {loaded.source}")
    if loaded.from_factory:
        return ResolvedNorm(InputNorm.none(), "default for a factory model: inputs used as given")
    raise InputError(
        f"{loaded.source} does not record which input normalisation its model expects; pass "
        "--input-norm none, dataset or MEAN,STD"
    )


def check_fits(model: nn.Module, x: torch.Tensor, source: str) -> int:
    """One forward pass, so that a model/data mismatch is one clear line and not a deep traceback;
    returns the number of class scores the model gives."""
    model.eval()
    try:
        with torch.no_grad():
            out = model(x[:2])
    except RuntimeError as exc:
        raise InputError(
            f"the model does not accept {source} of shape {tuple(x.shape[1:])}: {str(exc).splitlines()[0]}"
        ) from None
    if not isinstance(out, torch.Tensor) or out.dim() != 2:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise InputError(f"the model's output is {shape}; expected class scores of shape (batch, classes)")
    return out.shape[1]


def check_labels(classes: int, data: DataSplits) -> None:
    """Refuse class labels the model has no output for (they would fail deep inside the loss)."""
    for name, split in (("train", data.train), ("val", data.val), ("test", data.test)):
        if split is None or split.y.is_floating_point() or not len(split):
            continue
        low, high = int(split.y.min()), int(split.y.max())
        if low < 0 or high >= classes:
            raise InputError(
                f"{data.sources.get(name, name)} holds class labels {low}..{high}, but the model has "
                f"{classes} outputs; expected labels 0..{classes - 1}"
            )


def split_defaults(
    loaded: LoadedModel, dataset: str, val_size: int | None = None, seed: int = 0, own_train_data: bool = False
) -> tuple[int, int, bool]:
    """Validation size, split seed, and whether these are the images a training held out: as
    given; else, for a checkpoint of anrat-train on the same ``dataset`` (and no training file of
    the user's), the images its training held out; else 10,000 images chosen by ``seed``."""
    run = loaded.run_config
    if (
        val_size is None
        and run.get("dataset") == dataset
        and isinstance(run.get("val_size"), int)
        and run["val_size"] > 0
        and not own_train_data
    ):
        return run["val_size"], int(run.get("train", {}).get("seed", 0)), True
    return (DEFAULT_VAL_SIZE if val_size is None else val_size), seed, False


@dataclass
class LoadedData:
    """A model to test or prune, on its device, and its data, checked against each other."""

    loaded: LoadedModel
    data: DataSplits
    norm: ResolvedNorm
    held_out_by_training: bool  # the validation images are the ones our trainer held out


def load_model_and_data(model: ModelSource, data: DataSource, device: torch.device) -> LoadedData:
    """The model and its splits, fed as the model was trained and moved to ``device``; a model
    that does not fit its data (input shape, class labels) is refused here."""
    loaded = load_model(model)
    dataset = data.dataset or (loaded.run_config.get("dataset") if not (data.train_data and data.test_data) else None)
    norm = resolve_input_norm(data.input_norm, loaded, dataset)
    val_size, split_seed, held_out_by_training = split_defaults(
        loaded, dataset or "mnist", data.val_size, data.seed, bool(data.train_data)
    )
    splits = load_splits(
        input_norm=norm.norm,
        dataset=dataset,
        data_dir=data.data_dir,
        train_data=data.train_data,
        val_data=data.val_data,
        test_data=data.test_data,
        val_size=val_size,
        seed=split_seed,
        train_subset=data.train_subset,
        test_subset=data.test_subset,
        image_mode=data.image_mode,
        device=device,
    )
    if held_out_by_training:
        splits.sources["val"] = (
            f"the {val_size} training images {loaded.source} held out for validation (seed {split_seed})"
        )
    loaded.model.to(device)
    check_labels(check_fits(loaded.model, splits.train.x, f"inputs from {splits.sources['train']}"), splits)
    return LoadedData(loaded, splits, norm, held_out_by_training)
