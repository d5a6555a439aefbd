"""Checkpoints of pruned networks that rebuild the smaller architecture without pickled code.

A pruned checkpoint is a plain dict written with :func:`anrat.checkpoint.save_atomic` and read
with ``torch.load(weights_only=True)``. It describes the network in one of two ways:

- a registered model (:mod:`anrat.models`): ``"arch": {"name", "kwargs"}`` with the widths left
  by surgery merged into the kwargs, so :func:`anrat.models.build_model` builds the smaller network
  directly (and :func:`anrat.checkpoint.model_from_checkpoint` reads the file too);
- a model from elsewhere: ``"factory": {"target": "package.module:function", "kwargs"}`` plus the
  ``"history"`` of :func:`pruning.surgery.prune_units` calls, replayed on a freshly built model
  before the weights are loaded.

Importing and calling a factory runs code, so :func:`load_pruned` only does so for targets the
caller lists in ``allow_factories``; the file alone never decides what code runs.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.utils import prune

from anrat.checkpoint import FORMAT as PLAIN_FORMAT
from anrat.checkpoint import load_checkpoint, model_from_checkpoint, save_atomic
from anrat.errors import InputError
from anrat.input_norm import InputNorm
from anrat.models import build_model
from pruning.masks import permanent_copy
from pruning.surgery import pruning_history, replay_history, widths_of

FORMAT = "anrat.pruned/1"


def import_factory(target: str) -> Callable[..., nn.Module]:
    """The callable named by ``"package.module:function"`` (the attribute may be dotted: "mod:Cls.make")."""
    module_name, sep, attr_path = target.partition(":") if isinstance(target, str) else ("", "", "")
    if not sep or not module_name or not attr_path or ":" in attr_path:
        raise InputError(f"model factory must look like 'package.module:function', got {target!r}")
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise InputError(f"cannot import module {module_name!r} for model factory {target!r}: {exc}") from None
    except Exception as exc:  # the user's module failed while importing: report it as theirs
        raise InputError(
            f"importing module {module_name!r} of model factory {target!r} failed: {_describe(exc)}"
        ) from None
    for attr in attr_path.split("."):
        if not hasattr(obj, attr):
            raise InputError(f"module {module_name!r} has no attribute {attr_path!r} (model factory {target!r})")
        obj = getattr(obj, attr)
    if not callable(obj):
        raise InputError(f"model factory {target!r} is a {type(obj).__name__}, not a callable")
    return obj


def _describe(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__


def build_from_factory(target: str, kwargs: Mapping[str, Any] | None = None) -> nn.Module:
    """Import the factory ``target`` and call it with ``kwargs``; any failure of that user code, or
    a result that is not an ``nn.Module``, is an :class:`InputError` naming the factory."""
    factory = import_factory(target)
    try:
        model = factory(**dict(kwargs or {}))
    except Exception as exc:  # user code: whatever it raises is a problem of its input, not ours
        raise InputError(
            f"model factory {target!r} failed with kwargs {dict(kwargs or {})}: {_describe(exc)}"
        ) from None
    if not isinstance(model, nn.Module):
        raise InputError(f"model factory {target!r} returned a {type(model).__name__}, not a torch.nn.Module")
    return model


_PLAIN_SCALARS = (bool, int, float, str, type(None))


def _check_plain(value: Any, where: str) -> None:
    """Refuse values that ``torch.load(weights_only=True)`` could not read back (numpy scalars, paths...)."""
    if type(value) in _PLAIN_SCALARS or isinstance(value, torch.Tensor):
        return
    if type(value) in (list, tuple):
        for i, item in enumerate(value):
            _check_plain(item, f"{where}[{i}]")
        return
    if type(value) is dict:
        for key, item in value.items():
            if type(key) not in (str, int):
                raise InputError(f"{where} has key {key!r} of type {type(key).__name__}; use str keys")
            _check_plain(item, f"{where}[{key!r}]")
        return
    raise InputError(
        f"{where} is a {type(value).__module__}.{type(value).__name__}; a checkpoint holds only tensors, "
        "numbers, strings, None, lists and dicts (convert it, e.g. float(x) or str(path))"
    )


def _load_weights(model: nn.Module, state_dict: Mapping[str, torch.Tensor], described_as: str) -> nn.Module:
    try:
        model.load_state_dict(state_dict)
    except RuntimeError as exc:
        raise InputError(
            f"weights do not fit the model rebuilt from {described_as}: {str(exc).splitlines()[0]}"
        ) from None
    return model


def _rebuild_from_factory(
    target: str, kwargs: Mapping[str, Any], history: list[dict[str, Any]], state_dict: Mapping[str, torch.Tensor]
) -> nn.Module:
    model = build_from_factory(target, kwargs)
    replay_history(model, history)
    return _load_weights(model, state_dict, f"factory {target!r} and its pruning history")


def save_pruned(
    model: nn.Module,
    path: str | os.PathLike[str],
    *,
    arch: Mapping[str, Any] | None = None,
    factory: str | None = None,
    factory_kwargs: Mapping[str, Any] | None = None,
    history: list[dict[str, Any]] | None = None,
    metrics: Mapping[str, Any] | None = None,
    extra: Mapping[str, Any] | None = None,
    input_norm: InputNorm | None = None,
) -> Path:
    """Write a pruned ``model`` atomically to ``path`` and return the path.

    Give exactly one description of the unpruned network: ``arch={"name", "kwargs"}`` for a
    registered model (its widths are read off ``model`` with :func:`pruning.surgery.widths_of`),
    or ``factory="package.module:function"`` with JSON-like ``factory_kwargs`` for any other
    model. ``history`` defaults to what :func:`pruning.surgery.prune_units` recorded on ``model``;
    a factory model needs it to be rebuilt. ``metrics`` and ``extra`` are plain data stored as is.

    Masks still held as ``torch.nn.utils.prune`` hooks are baked into a copy before saving; the
    caller's model keeps them. Before anything is written, the smaller network is rebuilt from
    the description and the weights are loaded into it, so a file that could not be loaded back
    is refused here (InputError) rather than discovered later.
    """
    if (arch is None) == (factory is None):
        raise InputError(
            "describe the network by exactly one of arch={'name', 'kwargs'} or factory='package.module:function'"
        )
    plain = permanent_copy(model) if prune.is_pruned(model) else model
    state_dict = {name: t.detach().cpu() for name, t in plain.state_dict().items()}
    history = pruning_history(model) if history is None else [dict(entry) for entry in history]
    ckpt: dict[str, Any] = {"format": FORMAT, "state_dict": state_dict, "history": history}
    if arch is not None:
        if not isinstance(arch, Mapping) or not isinstance(arch.get("name"), str):
            raise InputError(f"arch must be {{'name': str, 'kwargs': dict}}, got {arch!r}")
        kwargs = {**arch.get("kwargs", {}), **widths_of(plain, arch["name"])}
        ckpt["arch"] = {"name": arch["name"], "kwargs": kwargs}
        _load_weights(build_model(arch["name"], **kwargs), state_dict, f"arch {ckpt['arch']}")
    else:
        ckpt["factory"] = {"target": factory, "kwargs": dict(factory_kwargs or {})}
        _rebuild_from_factory(factory, ckpt["factory"]["kwargs"], history, state_dict)
    ckpt["metrics"] = dict(metrics or {})
    ckpt["extra"] = dict(extra or {})
    if input_norm is not None:
        ckpt["input_norm"] = input_norm.as_dict()
    for key in ("arch", "factory", "history", "metrics", "extra", "input_norm"):
        if key in ckpt:
            _check_plain(ckpt[key], key)
    return save_atomic(ckpt, path)


def load_pruned(
    path: str | os.PathLike[str],
    *,
    allow_factories: Iterable[str] = (),
    map_location: str | torch.device = "cpu",
) -> nn.Module:
    """Rebuild the network saved by :func:`save_pruned` (or a plain anrat checkpoint) and load its weights.

    The file is read with ``torch.load(weights_only=True)``; one holding pickled code is refused.
    A checkpoint described by a factory is rebuilt only when its ``"package.module:function"``
    target is in ``allow_factories``: importing and calling it runs that code.
    """
    ckpt = load_checkpoint(path, map_location=map_location)
    fmt = ckpt.get("format") if isinstance(ckpt, dict) else None
    if fmt not in (FORMAT, PLAIN_FORMAT):
        raise InputError(f"{str(path)!r} is not an anrat checkpoint: format {fmt!r}, expected {FORMAT!r}")
    if "arch" in ckpt:
        return model_from_checkpoint(ckpt)
    factory = ckpt.get("factory")
    if not isinstance(factory, dict) or not isinstance(factory.get("target"), str):
        raise InputError(f"{str(path)!r} describes its network by neither 'arch' nor 'factory'")
    target = factory["target"]
    if target not in set(allow_factories):
        raise InputError(
            f"{str(path)!r} builds its network by calling {target!r}, which runs code; "
            f"pass allow_factories=[{target!r}] if you trust it"
        )
    return _rebuild_from_factory(target, factory.get("kwargs", {}), list(ckpt.get("history", [])), ckpt["state_dict"])


__all__ = ["FORMAT", "build_from_factory", "import_factory", "load_pruned", "save_pruned"]
