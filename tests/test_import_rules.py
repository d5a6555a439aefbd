"""Data flows one way: the core never imports what is built on it (docs/architecture.md).

- ``anrat/`` imports nothing from ``pruning``, the recipes or the benchmarks;
- ``pruning/`` nothing from the recipes or the benchmarks;
- ``benchmarks/`` nothing from the recipes (they use the library's pipeline, as the recipes do);
- no library module and no benchmark imports a command line (``anrat.train``, ``pruning.__main__``):
  what a command runs lives in a library module it calls.

The recipes live in ``recipes/`` and are installed as ``anrat.recipes``; both names count.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
RECIPES = ("recipes", "anrat.recipes")
COMMAND_LINES = ("anrat.train", "pruning.__main__")  # argparse front ends: nothing imports them as a library
FORBIDDEN = {
    "anrat": ("pruning", "benchmarks", *RECIPES, "anrat.train"),
    "pruning": ("benchmarks", *RECIPES, *COMMAND_LINES),
    "benchmarks": (*RECIPES, *COMMAND_LINES),
}


def imported_modules(path: Path) -> set[str]:
    """Absolute module names a file imports (relative imports stay inside its own package)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def violations(folder: str) -> list[str]:
    found = []
    for path in sorted((REPO / folder).rglob("*.py")):
        for name in imported_modules(path):
            for banned in FORBIDDEN[folder]:
                if name == banned or name.startswith(banned + "."):
                    found.append(f"{path.relative_to(REPO)} imports {name}")
    return found


@pytest.mark.parametrize("folder", sorted(FORBIDDEN))
def test_packages_import_only_what_lies_below_them(folder):
    assert (REPO / folder).is_dir()
    assert violations(folder) == []


def test_the_check_sees_a_forbidden_import(tmp_path):
    sample = tmp_path / "sample.py"
    sample.write_text("import os\nfrom recipes.mnist_prune import main\nfrom anrat.recipes import function_fit\n")
    assert imported_modules(sample) >= {"recipes.mnist_prune", "anrat.recipes", "anrat.recipes.function_fit"}
