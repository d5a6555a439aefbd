"""One configuration layer for every command: dataclasses, a TOML (or JSON) file, ``--set`` and flags.

A command's options are a dataclass (``anrat.run.RunConfig``, ``pruning.prune.PruneConfig``, the
recipe's ``RecipeConfig``), nested where one object owns another (``RunConfig.train`` is a
``TrainConfig``). Its defaults are written once, in the dataclass. A run's values are resolved in
this order, each overriding the one before:

1. the dataclass defaults;
2. a config file (``--config FILE``): a TOML table per nested object, or the ``config.json`` an
   earlier run wrote;
3. the command's own flags (``--lr 0.05``), each bound to one dotted key by :func:`flag`;
4. ``--set KEY=VALUE`` (dotted key, value in TOML syntax: ``--set train.lr=0.05``), which reaches
   every key, flags or not, and so has the last word.

Values are checked against the dataclass field types as they are merged (an int is accepted for a
float); an unknown key or a value of the wrong type is an :class:`~anrat.errors.InputError` that
names the dotted key. Range checks stay with the objects themselves (``TrainConfig.validate``).

It is a small module of our own, not a dependency. The libraries that build command lines from
dataclasses (tyro, simple-parsing, jsonargparse) name flags after field paths (``--train.lr``),
which would rename every flag users already type, and OmegaConf's structured configs do not take
``Literal`` fields and raise their own multi-line errors; wrapping either to keep our flags and
one-line refusals would not remove the ~100 lines below.
"""

from __future__ import annotations

import argparse
import json
import os
import types
import typing
from collections.abc import Iterable, Sequence
from dataclasses import fields, is_dataclass, replace
from pathlib import Path
from typing import Any, TypeVar

import tomllib

from anrat.errors import InputError

T = TypeVar("T")


# --- reading ------------------------------------------------------------------------------------
def read_config_file(path: str | os.PathLike[str]) -> dict[str, Any]:
    """A config file as a nested dict: TOML (``.toml``) or JSON (anything else)."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise InputError(f"cannot read config file {str(path)!r}: {exc.strerror or exc}") from None
    try:
        values = tomllib.loads(text) if path.suffix == ".toml" else json.loads(text)
    except (tomllib.TOMLDecodeError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        kind = "TOML" if path.suffix == ".toml" else "JSON"
        raise InputError(f"config file {str(path)!r} is not valid {kind}: {exc}") from None
    if not isinstance(values, dict):
        raise InputError(f"config file {str(path)!r} must hold a table of options, got {type(values).__name__}")
    return values


def parse_setting(text: str) -> tuple[str, Any]:
    """``KEY=VALUE`` of ``--set``: a dotted key and a TOML value (``prune.max_rounds=2``,
    ``grid_lr=[0.1, 0.5]``); a bare word is a string (``device=cpu``). An argparse ``type``."""
    key, sep, value = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE such as prune.max_rounds=2, got {text!r}")
    try:
        return key, tomllib.loads(f"v = {value.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        return key, value.strip()


def set_dotted(values: dict[str, Any], dotted: str, value: Any) -> None:
    """``values["a"]["b"] = value`` for ``dotted = "a.b"``, creating the tables on the way."""
    keys = dotted.split(".")
    for key in keys[:-1]:
        values = values.setdefault(key, {})
        if not isinstance(values, dict):
            raise InputError(f"{dotted}: {key!r} is not a table of options")
    values[keys[-1]] = value


def flatten(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"run": {"train": {"epochs": 3}}}`` -> ``{"run.train.epochs": 3}`` (empty tables are values)."""
    flat: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


# --- merging into dataclasses ----------------------------------------------------------------------
def type_ok(value: Any, hint: Any) -> bool:
    """Whether a value read from TOML, JSON or a flag fits a field's type hint."""
    if hint is Any:
        return True
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(type_ok(value, a) for a in args)
    if origin is typing.Literal:
        return value in args
    if hint is type(None):
        return value is None
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if origin in (list, tuple):
        return isinstance(value, (list, tuple)) and (not args or all(type_ok(v, args[0]) for v in value))
    if origin is dict:
        return isinstance(value, dict) and (not args or all(type_ok(v, args[1]) for v in value.values()))
    return isinstance(value, origin or hint)


def merge(obj: T, values: Any, where: str = "") -> T:
    """A copy of dataclass ``obj`` with the entries of the mapping ``values`` set, recursively
    (a nested dataclass takes a table); ``where`` is the dotted path of ``obj``, for messages."""
    if not isinstance(values, dict):
        raise InputError(f"{where or 'the configuration'} must be a table of options, got {values!r}")
    hints = typing.get_type_hints(type(obj))
    names = [f.name for f in fields(obj)]  # type: ignore[arg-type]
    changes = {}
    for key, value in values.items():
        path = f"{where}.{key}" if where else key
        if key not in names:
            raise InputError(f"unknown option {path!r}; expected one of {', '.join(names)}")
        current = getattr(obj, key)
        if is_dataclass(current):
            changes[key] = merge(current, value, path)
        elif not type_ok(value, hints[key]):
            expected = _type_name(hints[key])
            expected = expected if expected.startswith("one of") else f"of type {expected}"
            raise InputError(f"option {path!r} must be {expected}, got {value!r}")
        else:
            changes[key] = value
    return replace(obj, **changes)  # type: ignore[type-var]


def _type_name(hint: Any) -> str:
    if typing.get_origin(hint) is typing.Literal:
        return "one of " + ", ".join(repr(v) for v in typing.get_args(hint))
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


def resolve(
    defaults: T,
    file: str | os.PathLike[str] | dict[str, Any] | None = None,
    flags: Iterable[tuple[str, Any]] = (),
    sets: Iterable[tuple[str, Any]] = (),
) -> T:
    """``defaults`` overridden by a config file (path or its dict), then flag pairs, then ``--set``
    pairs (dotted key, value), in that order (module docstring)."""
    values = dict(file) if isinstance(file, dict) else read_config_file(file) if file is not None else {}
    for key, value in [*flags, *sets]:
        set_dotted(values, key, value)
    return merge(defaults, values)


def default_of(obj: Any, dotted: str) -> Any:
    """The value at a dotted key of a dataclass instance (for help texts)."""
    for key in dotted.split("."):
        obj = getattr(obj, key)
    return obj


# --- command lines ---------------------------------------------------------------------------------
_FLAG_PREFIX = "config:"  # argparse dests of flags bound to dotted keys (see flag)


def flag(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup,
    *names: str,
    key: str,
    defaults: Any = None,
    help: str = "",
    **kwargs: Any,
) -> argparse.Action:
    """Add a flag bound to the dotted ``key``: it is absent from the parsed arguments unless given
    (so the file and ``--set`` values stand), and its help shows the default read off ``defaults``
    (a dataclass instance) when one is given."""
    if "action" not in kwargs or kwargs.get("nargs") is not None:  # a flag that takes a value
        kwargs.setdefault("metavar", names[0].lstrip("-").upper().replace("-", "_"))
    if defaults is not None and "default" not in help:
        help = f"{help} (default: {default_of(defaults, key)!r})" if help else f"default: {default_of(defaults, key)!r}"
    return parser.add_argument(*names, dest=_FLAG_PREFIX + key, default=argparse.SUPPRESS, help=help, **kwargs)


def flag_values(args: argparse.Namespace) -> list[tuple[str, Any]]:
    """The (dotted key, value) pairs of the :func:`flag` flags given on the command line."""
    return [(dest[len(_FLAG_PREFIX) :], value) for dest, value in vars(args).items() if dest.startswith(_FLAG_PREFIX)]


def add_config_arguments(parser: argparse.ArgumentParser | argparse._ArgumentGroup, example: str) -> None:
    """``--config FILE`` and ``--set KEY=VALUE`` (repeatable); ``example`` is a dotted key for the help."""
    parser.add_argument(
        "--config",
        default=None,
        metavar="FILE",
        help="options from a TOML file (a table per nested object) or the config.json of an "
        "earlier run; flags and --set override it",
    )
    parser.add_argument(
        "--set",
        type=parse_setting,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="set any option by its dotted key, value in TOML syntax; overrides the flags; repeatable "
        f"(e.g. --set {example})",
    )


def resolve_from_args(defaults: T, args: argparse.Namespace, extra: Sequence[tuple[str, Any]] = ()) -> T:
    """:func:`resolve` with the ``--config``, :func:`flag` and ``--set`` values of parsed ``args``;
    ``extra`` pairs (settings a command derives from its other flags) go with the flags."""
    return resolve(defaults, getattr(args, "config", None), [*extra, *flag_values(args)], getattr(args, "set", ()))


__all__ = [
    "add_config_arguments",
    "default_of",
    "flag",
    "flag_values",
    "flatten",
    "merge",
    "parse_setting",
    "read_config_file",
    "resolve",
    "resolve_from_args",
    "set_dotted",
    "type_ok",
]
