"""One run per output folder: an advisory lock held for the run's life.

A command that writes into a folder first takes ``fcntl.flock(LOCK_EX | LOCK_NB)`` on the folder
itself (a descriptor of the directory: no lock file is written into the user's folder). The kernel
releases a ``flock`` when the process exits, however it exits (kill -9 included), so a killed run
never blocks the next: only a live process holds the lock. A second command on the same folder is
refused before it writes anything: "OUT is in use by another run (pid 1234)", the pid read from
``/proc/locks`` where the system has it.

Within one process a folder is locked once: taking it again is a no-op, so a library caller may
run twice into the same folder. The command lines release their locks when they end
(:func:`release_all`, from :func:`anrat.cli.run_command`); a library caller (``anrat.run.run``,
``pruning.pipeline.train_prune_export``) holds them until it calls :func:`release_all` or exits,
so another process cannot write into a folder it may still be using. Where ``fcntl`` does not
exist (Windows), no lock is taken.
"""

from __future__ import annotations

import os
from pathlib import Path

from anrat.errors import InputError

try:
    import fcntl
except ImportError:  # pragma: no cover (Windows)
    fcntl = None  # type: ignore[assignment]

_held: dict[Path, int] = {}  # resolved folder -> descriptor of the folder, holding its lock


def _holder(folder: Path) -> str:
    """The pid holding a flock on ``folder``, from /proc/locks (Linux); "unknown" elsewhere."""
    try:
        st = folder.stat()
        with open("/proc/locks", encoding="ascii") as f:
            for line in f:
                fields = line.split()
                if len(fields) < 6 or fields[1] != "FLOCK":
                    continue
                major, minor, inode = fields[5].split(":")
                if (int(inode), int(major, 16), int(minor, 16)) == (
                    st.st_ino,
                    os.major(st.st_dev),
                    os.minor(st.st_dev),
                ):
                    return fields[4]
    except (OSError, ValueError):
        pass
    return "unknown"


def lock_output_folder(folder: str | os.PathLike[str]) -> None:
    """Take the lock of ``folder`` (which must exist) for this process, or refuse with
    :class:`InputError` naming the pid that holds it."""
    if fcntl is None:
        return
    key = Path(folder).resolve()
    if key in _held:
        return
    try:
        fd = os.open(key, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError as exc:
        raise InputError(f"cannot open the output folder {str(folder)!r} to lock it: {exc.strerror or exc}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise InputError(
            f"{str(folder)!r} is in use by another run (pid {_holder(key)}); "
            "wait for it to end or choose another folder"
        ) from None
    _held[key] = fd


def release_all() -> None:
    """Release every lock this process holds."""
    while _held:
        _, fd = _held.popitem()
        os.close(fd)  # closing the descriptor releases its flock


__all__ = ["lock_output_folder", "release_all"]
