"""Shared fixtures: the one place tests find MNIST (and mark the tests that read it ``slow``), a
private cache folder for the session, and the command-line helpers."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from anrat.data import IDX_FILES

REPO_ROOT = Path(__file__).resolve().parent.parent


def _holds_idx_files(folder: Path) -> bool:
    return all((folder / n).is_file() or (folder / f"{n}.gz").is_file() for n in IDX_FILES)


DATA_FIXTURES = {"mnist_dir", "fashion_mnist_dir"}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Every test that reads MNIST or Fashion-MNIST is ``slow``: ``pytest -m "not slow"`` is the
    inner loop of synthetic tests, CI runs them all."""
    for item in items:
        if DATA_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session", autouse=True)
def anrat_cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """``ANRAT_CACHE_DIR`` points into pytest's temporary folder, so tests never write to ``~``."""
    cache = tmp_path_factory.mktemp("anrat-cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("ANRAT_CACHE_DIR", str(cache))
        yield cache


def _find_idx_folder(name: str, variable: str, candidates: list[Path]) -> Path:
    if os.environ.get(variable):
        candidates = [Path(os.environ[variable]), *candidates]
    for folder in candidates:
        if _holds_idx_files(folder):
            return folder
    pytest.skip(
        f"{name} not found: none of {', '.join(map(str, candidates))} holds {', '.join(IDX_FILES)} "
        f"(.gz or not); set {variable} to such a folder"
    )


@pytest.fixture(scope="session")
def mnist_dir() -> Path:
    """The folder holding the four MNIST IDX files (``.gz`` or not): ``$ANRAT_MNIST_DIR``, else
    ``<repo>/../shared/data/mnist``; the test is skipped when neither holds them."""
    return _find_idx_folder("MNIST", "ANRAT_MNIST_DIR", [REPO_ROOT.parent / "shared" / "data" / "mnist"])


@pytest.fixture(scope="session")
def fashion_mnist_dir() -> Path:
    """The Fashion-MNIST IDX files: ``$ANRAT_FASHION_MNIST_DIR``, else
    ``<repo>/../shared/data/fashion-mnist``, else Debian's ``dataset-fashion-mnist`` package."""
    return _find_idx_folder(
        "Fashion-MNIST",
        "ANRAT_FASHION_MNIST_DIR",
        [REPO_ROOT.parent / "shared" / "data" / "fashion-mnist", Path("/usr/share/datasets/fashion-mnist")],
    )


@pytest.fixture
def run_cli(capsys: pytest.CaptureFixture[str]):
    """Call a command line's ``main(argv)``: returns ``(exit status, captured output)``, argparse's
    own exits (usage errors) included."""

    def run(main, argv):
        try:
            code = main(argv)
        except SystemExit as exc:
            code = exc.code
        return code, capsys.readouterr()

    return run


@pytest.fixture
def assert_help_explains_every_option():
    """Check that an argparse parser lists every flag in its help and gives each a help text."""

    def check(parser) -> None:
        text = parser.format_help()
        for action in parser._actions:
            for flag in action.option_strings:
                assert flag in text
            if action.option_strings and action.dest != "help":
                assert action.help, f"{action.option_strings} has no help text"

    return check


@pytest.fixture(scope="session", autouse=True)
def sigint_raises() -> Iterator[None]:
    """SIGINT raises KeyboardInterrupt in this process and its children, as at a terminal.

    A shell starts a background job (``pytest &``) with SIGINT ignored, and a child inherits an
    ignored signal through exec: the tests of Ctrl-C would then see no signal at all. A Python-level
    handler is not inherited (the child starts with the default), so installing Python's own one
    here gives every test and every subprocess the terminal's behaviour."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)
