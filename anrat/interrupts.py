"""Ctrl-C and SIGTERM: a run stops, says where it stopped and how to go on, and exits 130 or 143.

Every file the toolkit writes goes through :func:`anrat.atomic_files.atomic_path`, so an interrupt
at any moment leaves each file whole (the old one or the new one) and no temporary behind. What
this module adds is the words and the status: :func:`anrat.cli.run_command` turns SIGTERM (what a
scheduler sends before it kills a job) into :class:`Interrupted` the way Python turns SIGINT into
``KeyboardInterrupt``, and prints one line instead of a traceback, with the position the running
loop last reported (:func:`report_position`): "interrupted at epoch 7, step 312; last.pt holds
epoch 6 and 40 steps of epoch 7: run the same command to resume". A training defers the signal to
the end of its current step (:func:`signals_deferred`) and writes its checkpoint there; a resumed
training starts from its last checkpoint and is bit-identical to one never interrupted, as after
kill -9.
"""

from __future__ import annotations

import signal
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import FrameType

EXIT_STATUS = {signal.SIGINT: 130, signal.SIGTERM: 143}  # 128 + the signal's number, as shells report
_position: dict[str, Callable[[], tuple[str, str]]] = {}


class Interrupted(BaseException):
    """SIGTERM arrived (a ``BaseException``, as ``KeyboardInterrupt``: no ``except Exception``
    swallows it)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def report_position(describe: Callable[[], tuple[str, str]]) -> None:
    """Register how to say where the running loop is and how it goes on from there, e.g.
    ``("at epoch 7, step 312", "last.pt holds epoch 6: run the same command to resume")``; called
    only when an interrupt arrives, so a loop registers once, not every step."""
    _position["describe"] = describe


def clear_position(describe: Callable[[], tuple[str, str]] | None = None) -> None:
    """Forget the registered position; with ``describe``, only if it is the one registered (a loop
    that ends leaves an enclosing loop's position in place)."""
    if describe is None or _position.get("describe") == describe:
        _position.clear()


def interrupt_line(signum: int) -> str:
    where, resume = _position["describe"]() if "describe" in _position else ("", "")
    resume = resume or "every file written so far is whole; run the same command to start again"
    return f"interrupted by {signal.Signals(signum).name}" + (f" {where}" if where else "") + f"; {resume}"


@contextmanager
def sigterm_raises() -> Iterator[None]:
    """Within the block, SIGTERM raises :class:`Interrupted` (where signals can be set: the main thread)."""

    def handler(signum: int, frame: FrameType | None) -> None:
        raise Interrupted(signum)

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextmanager
def signals_deferred() -> Iterator[Callable[[], int | None]]:
    """Within the block, SIGINT and SIGTERM are noted, not raised: the loop asks the function this
    yields after each step (the signal's number, or None) and stops there itself, at a safe point
    (a training step done, a checkpoint written). A second signal raises :class:`Interrupted` at
    once, and a signal noted but not yet acted upon when the block ends is raised there. Outside
    the main thread, where signals cannot be set, nothing is deferred."""
    pending: list[int] = []

    def handler(signum: int, frame: FrameType | None) -> None:
        if pending:  # asked twice: stop now
            raise Interrupted(signum)
        pending.append(signum)

    try:
        previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    except ValueError:  # not the main thread
        yield lambda: None
        return
    try:
        yield lambda: pending[0] if pending else None
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
    if pending:
        raise Interrupted(pending[0])


__all__ = [
    "EXIT_STATUS",
    "Interrupted",
    "clear_position",
    "interrupt_line",
    "report_position",
    "sigterm_raises",
    "signals_deferred",
]
