"""The one configuration layer: defaults < config file < --set < flags, typed, with named errors."""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass, field
from typing import Literal

import pytest

from anrat.config import (
    add_config_arguments,
    flag,
    flatten,
    merge,
    parse_setting,
    read_config_file,
    resolve,
    resolve_from_args,
)
from anrat.errors import InputError
from anrat.run import RunConfig
from anrat.train import build_parser, config_from_args


@dataclass
class Inner:
    lr: float = 0.1
    name: Literal["a", "b"] = "a"
    sizes: list[int] = field(default_factory=lambda: [1, 2])


@dataclass
class Outer:
    seed: int = 0
    limit: int | None = None
    inner: Inner = field(default_factory=Inner)


def test_values_resolve_in_order_defaults_file_flags_set(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('seed = 1\n[inner]\nlr = 0.5\nname = "b"\n')
    assert resolve(Outer(), path) == Outer(seed=1, inner=Inner(lr=0.5, name="b"))
    assert resolve(Outer(), path, flags=[("inner.lr", 0.25)]) == Outer(seed=1, inner=Inner(lr=0.25, name="b"))
    got = resolve(Outer(), path, flags=[("inner.lr", 0.25), ("limit", 7)], sets=[("inner.lr", 2)])
    assert got == Outer(seed=1, limit=7, inner=Inner(lr=2, name="b"))  # an int is accepted for a float
    json_path = tmp_path / "c.json"
    json_path.write_text(json.dumps(asdict(got)))  # what a run records repeats it
    assert resolve(Outer(), json_path) == got


@pytest.mark.parametrize(
    "values, message",
    [
        ({"sead": 1}, "unknown option 'sead'; expected one of seed, limit, inner"),
        ({"inner": {"lr": "fast"}}, "option 'inner.lr' must be of type float, got 'fast'"),
        ({"inner": {"name": "c"}}, "option 'inner.name' must be one of 'a', 'b', got 'c'"),
        ({"inner": {"sizes": [1, "x"]}}, "option 'inner.sizes' must be of type"),
        ({"seed": True}, "option 'seed' must be of type int"),
        ({"inner": 3}, "inner must be a table of options, got 3"),
    ],
)
def test_wrong_keys_and_types_are_refused_by_their_dotted_name(values, message):
    with pytest.raises(InputError, match=message.replace("(", r"\(").replace(")", r"\)")):
        merge(Outer(), values)


def test_set_takes_toml_values_and_bare_words():
    assert parse_setting("inner.sizes=[3, 4]") == ("inner.sizes", [3, 4])
    assert parse_setting("device=cpu") == ("device", "cpu")
    assert parse_setting(" inner.lr = 1e-3 ") == ("inner.lr", 0.001)
    with pytest.raises(argparse.ArgumentTypeError, match="expected KEY=VALUE"):
        parse_setting("inner.lr")


def test_unreadable_or_malformed_files_are_one_clear_error(tmp_path):
    with pytest.raises(InputError, match="cannot read config file"):
        read_config_file(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("seed = = 1")
    with pytest.raises(InputError, match="is not valid TOML"):
        read_config_file(bad)
    listed = tmp_path / "list.json"
    listed.write_text("[1, 2]")
    with pytest.raises(InputError, match="must hold a table of options"):
        read_config_file(listed)


def test_flags_given_override_and_flags_not_given_leave_the_file_alone(tmp_path):
    parser = argparse.ArgumentParser()
    flag(parser, "--lr", key="inner.lr", defaults=Outer(), type=float, help="learning rate")
    flag(parser, "--seed", key="seed", defaults=Outer(), type=int, help="seed")
    add_config_arguments(parser, "inner.lr=0.5")
    path = tmp_path / "c.toml"
    path.write_text("seed = 5\n[inner]\nlr = 0.5\n")
    args = parser.parse_args(["--config", str(path), "--lr", "0.01", "--set", "limit=3"])
    assert resolve_from_args(Outer(), args) == Outer(seed=5, limit=3, inner=Inner(lr=0.01))
    args = parser.parse_args(["--lr", "0.01", "--set", "inner.lr=0.02"])  # --set has the last word
    assert resolve_from_args(Outer(), args).inner.lr == 0.02
    assert "(default: 0.1)" in parser.format_help()


def test_the_training_command_is_one_run_config(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('model = "mlp"\n[train]\nepochs = 3\nlr = 0.5\n[schedule]\nname = "plain"\n')
    args = build_parser().parse_args(
        [
            "--config",
            str(path),
            "--lr",
            "0.2",
            "--hidden",
            "8,4",
            "--l2",
            "fc2=0.05",
            "--set",
            "schedule.lam0=3",
            "--no-resume",
        ]
    )
    cfg = config_from_args(args)
    assert (cfg.model, cfg.train.epochs, cfg.train.lr, cfg.schedule.name, cfg.schedule.lam0) == (
        "mlp",
        3,
        0.2,
        "plain",
        3.0,
    )
    assert cfg.model_kwargs == {"hidden": [8, 4]} and cfg.train.l2 == {"fc2": 0.05} and cfg.resume is False
    # nothing given: exactly the dataclass defaults
    assert config_from_args(build_parser().parse_args([])) == RunConfig()
    assert flatten({"a": {"b": 1, "c": {}}, "d": 2}) == {"a.b": 1, "a.c": {}, "d": 2}
