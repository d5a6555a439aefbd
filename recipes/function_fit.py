"""Does convexification escape poor local minima? Function fitting with known global minima, seed by seed.

``python -m anrat.recipes.function_fit`` runs the study of :mod:`anrat.function_study`: the small
MLPs of :mod:`anrat.function_problems`, each with a known global minimum of 0, trained from many
initial seeds by each method (``mse``, ``nrae``, ``anrat``, ``deconvex``; ``excursions`` on
request) under the same optimizer and budget of full-batch steps, paired seed by seed. It writes
``results.json``, ``results.md``, ``errors.png`` and ``curves.png`` to ``--out`` and prints the
table.

Options resolve as :class:`FunctionFitConfig` defaults < ``--config`` file < flags < ``--set
KEY=VALUE``; a bad value is one line and exit status 2.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from anrat.cli import OneLineErrorParser, add_no_progress_option, add_out_option, run_command
from anrat.config import add_config_arguments, flag, resolve_from_args
from anrat.errors import InputError
from anrat.function_problems import PROBLEMS, make_problem
from anrat.function_study import (
    DEFAULT_METHODS,
    DEFAULT_SEEDS,
    DEFAULT_STEPS,
    FULL_SEEDS,
    FULL_STEPS,
    METHODS,
    PROBLEM_SEED,
    markdown_table,
    run,
)
from anrat.run import ENGINES  # the same two ways to train a grid as anrat.train

PROG = "python -m anrat.recipes.function_fit"


@dataclass
class FunctionFitConfig:
    """The study's options (``--set KEY=VALUE`` takes these keys)."""

    seeds: int | None = None  # initial seeds 0..N-1; None: DEFAULT_SEEDS, FULL_SEEDS with full
    steps: int | None = None  # full-batch steps per run; None: DEFAULT_STEPS, FULL_STEPS with full
    problems: list[str] = field(default_factory=lambda: list(PROBLEMS))
    methods: list[str] = field(default_factory=lambda: list(DEFAULT_METHODS))
    out_dir: str = "runs/function_fit"
    workers: int = field(default_factory=lambda: min(2, os.cpu_count() or 1))
    engine: str = "batched"
    full: bool = False
    progress: bool = True

    def validate(self) -> None:
        """Refuse what the study cannot run, before anything is written."""
        for name in ("seeds", "steps", "workers"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise InputError(f"{name} must be an integer >= 1, got {value!r}")
        for name, choices in (("problems", PROBLEMS), ("methods", METHODS)):
            names = getattr(self, name)
            unknown = [n for n in names if n not in choices]
            if unknown or not names:
                raise InputError(f"{name} must be a non-empty list from {', '.join(choices)}, got {names!r}")
        if self.engine not in ENGINES:
            raise InputError(f"unknown engine {self.engine!r}; expected one of {', '.join(ENGINES)}")

    @property
    def resolved_seeds(self) -> int:
        return self.seeds or (FULL_SEEDS if self.full else DEFAULT_SEEDS)

    @property
    def resolved_steps(self) -> int:
        return self.steps or (FULL_STEPS if self.full else DEFAULT_STEPS)


def _names(text: str) -> list[str]:
    """A comma-separated list, duplicates dropped (checked against its choices by ``validate``)."""
    return list(dict.fromkeys(n.strip() for n in text.split(",") if n.strip()))


def build_parser() -> argparse.ArgumentParser:
    d = FunctionFitConfig()
    ap = OneLineErrorParser(
        prog=PROG,
        description=__doc__.split("\n\n")[0],
        epilog="Options resolve as: defaults < --config file < flags < --set.",
    )
    flag(
        ap,
        "--seeds",
        key="seeds",
        type=int,
        help=f"initial seeds per problem and method (0..N-1); default {DEFAULT_SEEDS}, {FULL_SEEDS} with --full",
    )
    flag(
        ap,
        "--steps",
        key="steps",
        type=int,
        help=f"full-batch gradient steps per run; default {DEFAULT_STEPS}, {FULL_STEPS} with --full",
    )
    flag(
        ap,
        "--problems",
        key="problems",
        type=_names,
        help=f"comma-separated problems from {', '.join(PROBLEMS)} (default: all)",
    )
    flag(
        ap,
        "--methods",
        key="methods",
        type=_names,
        help=f"comma-separated methods from {', '.join(METHODS)} (default: {','.join(DEFAULT_METHODS)})",
    )
    add_out_option(ap, key="out_dir", defaults=d)
    flag(
        ap,
        "--workers",
        key="workers",
        defaults=d,
        type=int,
        help="worker processes, one thread each (the loop "
        "engine spreads the runs over them, the batched engine the problems); results do not depend on it",
    )
    flag(
        ap,
        "--engine",
        key="engine",
        defaults=d,
        choices=ENGINES,
        help="loop: one training loop per run (the "
        "reference); batched: the runs of each problem as one vectorised model (anrat.batched), in one process",
    )
    flag(
        ap,
        "--full",
        key="full",
        action="store_const",
        const=True,
        help=f"the large run: {FULL_SEEDS} seeds and {FULL_STEPS} steps unless --seeds/--steps say otherwise",
    )
    add_no_progress_option(ap, key="progress", what="progress bar over the runs")
    add_config_arguments(ap, "methods=['mse','anrat']")
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    def body(args: argparse.Namespace) -> int:
        cfg = resolve_from_args(FunctionFitConfig(), args)
        cfg.validate()
        command = " ".join([PROG, *(sys.argv[1:] if argv is None else argv)])
        result = run(
            cfg.problems,
            cfg.methods,
            cfg.resolved_seeds,
            cfg.resolved_steps,
            cfg.out_dir,
            workers=cfg.workers,
            progress=cfg.progress,
            command=command,
            engine=cfg.engine,
        )
        print(markdown_table(result["summary"], {n: make_problem(n, PROBLEM_SEED) for n in cfg.problems}), end="")
        print(f"{len(result['runs'])} runs in {result['wall_seconds']:.0f} s; wrote {Path(cfg.out_dir).resolve()}")
        return 0

    return run_command(build_parser(), body, argv)


if __name__ == "__main__":
    sys.exit(main())
