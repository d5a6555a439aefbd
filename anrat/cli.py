"""How every command line of the toolkit refuses: one line on stderr, never a traceback.

``python -m anrat.train``, ``python -m pruning`` and the recipes build their parsers from
:class:`OneLineErrorParser` and run their work through :func:`run_command`:

- a usage error (unknown flag, bad value) is ``PROG: error: ...`` and exit status 2;
- an :class:`~anrat.errors.InputError` (a value, file or option the user supplied is wrong) is the
  same line and status 2;
- a :class:`~anrat.trainer.TrainingDiverged` (the objective became non-finite) is ``PROG: ...``
  and status 1: the input was acceptable, the run failed;
- a :class:`~anrat.errors.WriteFailed` (a full disk, a quota, an I/O error) is ``PROG: ...``, the
  file and what is left of it, and status 1;
- Ctrl-C (SIGINT) and SIGTERM are ``PROG: interrupted ...``, where the run stopped and how to go
  on (:mod:`anrat.interrupts`), and status 130 or 143.

Anything else is a bug of ours and keeps its traceback.

The options every command shares (``--out``, ``--data-dir``, ``--device``, ``--seed``,
``--no-progress``; ``--config`` and ``--set`` are :func:`anrat.config.add_config_arguments`) are
declared here once, by the ``add_*_option`` functions, so that their spelling and help agree across
commands. Each binds its flag to a dotted configuration key (``key=``, :func:`anrat.config.flag`)
or, without one, is a plain argparse option with the given default.
"""

from __future__ import annotations

import argparse
import signal
import sys
from collections.abc import Callable, Sequence
from typing import Any

from anrat.config import flag
from anrat.errors import InputError, WriteFailed
from anrat.interrupts import EXIT_STATUS, Interrupted, clear_position, interrupt_line, sigterm_raises
from anrat.run_lock import release_all
from anrat.trainer import TrainingDiverged


class OneLineErrorParser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose usage errors are one line on stderr and exit status 2."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message}\n")

    def report(self, exc: InputError | TrainingDiverged, prog: str | None = None) -> int:
        """Print one line for a refused input (returns 2) or a diverged run (returns 1)."""
        return report(exc, prog or self.prog)


def report(exc: InputError | TrainingDiverged | WriteFailed, prog: str) -> int:
    """One line on stderr for ``exc``; the exit status (2 refused input, 1 diverged run or failed write)."""
    if isinstance(exc, WriteFailed):
        print(f"{prog}: {exc.strerror}", file=sys.stderr)
        return 1
    if isinstance(exc, TrainingDiverged):
        print(f"{prog}: {exc}", file=sys.stderr)
        return 1
    print(f"{prog}: error: {exc}", file=sys.stderr)
    return 2


def run_command(
    parser: argparse.ArgumentParser,
    body: Callable[[argparse.Namespace], int | None],
    argv: Sequence[str] | None = None,
    prog: Callable[[argparse.Namespace], str] | None = None,
) -> int:
    """Parse ``argv`` and run ``body(args)``; a refusal or a divergence becomes one line (module
    docstring). ``prog`` names the command in that line (e.g. with its subcommand)."""
    args = parser.parse_args(argv)
    clear_position()
    try:
        with sigterm_raises():
            status = body(args)
    except (InputError, TrainingDiverged, WriteFailed) as exc:
        return report(exc, prog(args) if prog else parser.prog)
    except (KeyboardInterrupt, Interrupted) as exc:  # Ctrl-C, SIGTERM: one line, 130 or 143
        signum = exc.signum if isinstance(exc, Interrupted) else signal.SIGINT
        print(f"{prog(args) if prog else parser.prog}: {interrupt_line(signum)}", file=sys.stderr)
        return EXIT_STATUS[signum]
    finally:
        release_all()  # the output folders this command locked (anrat.run_lock)
        clear_position()
    return 0 if status is None else status


# --- the options every command shares -------------------------------------------------------------
Parser = argparse.ArgumentParser | argparse._ArgumentGroup


def _option(parser: Parser, name: str, key: str | None, defaults: Any, default: Any, help: str, **kwargs: Any) -> None:
    if key is not None:
        flag(parser, name, key=key, defaults=defaults, help=help, **kwargs)
    else:
        parser.add_argument(name, default=default, help=f"{help} (default: %(default)s)" if default else help, **kwargs)


def add_out_option(
    parser: Parser, *, key: str | None = None, defaults: Any = None, default: str | None = None, what: str = "folder"
) -> None:
    """``--out``: the output ``what`` (a folder, or the file a command writes)."""
    _option(parser, "--out", key, defaults, default, f"output {what}", metavar="OUT")


def add_data_dir_option(parser: Parser, *, key: str | None = None, of: str = "the dataset's", use: str = "") -> None:
    """``--data-dir``: the folder of ``of`` IDX files; ``use`` says what the command reads there."""
    help = f"folder holding {of} four IDX files (.gz or not)" + (f"; {use}" if use else "")
    _option(parser, "--data-dir", key, None, None, f"{help}; default: $ANRAT_DATA_DIR", metavar="DIR")


def add_device_option(parser: Parser, *, key: str | None = None, defaults: Any = None) -> None:
    """``--device``: where the command computes."""
    _option(parser, "--device", key, defaults, "auto", "auto (CUDA when present), cpu, cuda, cuda:N")


def add_seed_option(
    parser: Parser, *, of: str, key: str | None = None, defaults: Any = None, default: int = 0, type: Any = int
) -> None:
    """``--seed``: ``of`` says what it seeds (initialisation, the validation split, ...)."""
    _option(parser, "--seed", key, defaults, default, f"seed of {of}", type=type)


def add_no_progress_option(parser: Parser, *, key: str | None = None, what: str = "progress lines or bars") -> None:
    """``--no-progress``: no ``what`` on stderr (bound to a boolean key set to False, or
    ``args.no_progress``)."""
    if key is not None:
        flag(parser, "--no-progress", key=key, action="store_const", const=False, help=f"no {what}")
    else:
        parser.add_argument("--no-progress", action="store_true", help=f"no {what}")


def int_at_least(low: int) -> Callable[[str], int]:
    """An argparse ``type``: an integer >= ``low`` (else a usage error naming the value)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = low - 1
        if value < low:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {text!r}")
        return value

    return parse


__all__ = [
    "OneLineErrorParser",
    "add_data_dir_option",
    "add_device_option",
    "add_no_progress_option",
    "add_out_option",
    "add_seed_option",
    "int_at_least",
    "report",
    "run_command",
]
