"""Atomic file writes: readers see the old file or the new one, never half of one.

Every file the toolkit writes for a user (checkpoints, ONNX models, reports, caches) goes through
:func:`atomic_path`: the content is written to a temporary file beside the target, flushed to
disk, given the permissions a plain ``open(path, "w")`` would give (``0o666`` less the umask;
``tempfile.mkstemp`` alone makes files readable by their owner only), and renamed over the target
(``os.replace``, atomic on POSIX and Windows). A crash or an exception leaves the previous file
intact and removes the temporary one; a write the machine refuses (a full disk) is reported as
:class:`~anrat.errors.WriteFailed`, one line at the command line and exit status 1.
"""

from __future__ import annotations

import errno
import os
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from anrat.errors import InputError, WriteFailed


def _umask() -> int:
    # The only portable way to read the umask is to set it and put it back.
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _temporary_prefix(name: str) -> str:
    return f".{name}."


# The errors by which a machine refuses a write; any other OSError in the block (a corrupt gzip
# being unpacked into the file, say) is the caller's and passes through unchanged.
_CAUSES = {
    errno.ENOSPC: "no space left on device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EIO: "I/O error",
    errno.EFBIG: "file too large",
    errno.EROFS: "read-only file system",
}


def refused_write(exc: BaseException) -> bool:
    """Whether ``exc`` is the machine refusing a write (a full disk, a quota, an I/O error, a
    read-only file system), which :func:`atomic_path` reports as :class:`~anrat.errors.WriteFailed`."""
    return isinstance(exc, OSError) and not isinstance(exc, WriteFailed) and exc.errno in _CAUSES


def _write_failed(path: Path, existed: bool, exc: OSError) -> WriteFailed:
    cause = _CAUSES.get(exc.errno, exc.strerror or str(exc))
    left = f"the previous {path.name} is intact" if existed else f"{path.name} was not written"
    return WriteFailed(exc.errno, f"{cause} while writing {path}; {left}")


@contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; when the block ends without an exception, the file
    written there is synced, given the umask's permissions and renamed to ``path``.

    An ``OSError`` by which the machine refuses the write (no space left, quota, I/O, read-only) becomes a
    :class:`~anrat.errors.WriteFailed` that names the file and the cause and says whether the
    previous file is intact (it always is: the temporary file is removed)."""
    path = Path(path)
    existed = path.exists()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=_temporary_prefix(path.name), suffix=".tmp", dir=path.parent)
        os.close(fd)
    except OSError as exc:
        if not refused_write(exc):
            raise
        raise _write_failed(path, existed, exc) from exc
    tmp = Path(tmp_name)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except OSError as exc:
        if not refused_write(exc):
            raise
        raise _write_failed(path, existed, exc) from exc
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomic(path: str | os.PathLike[str], text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically; return the path."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def remove_stale_temporaries(folder: str | os.PathLike[str], names: Iterable[str]) -> list[Path]:
    """Remove the temporary files :func:`atomic_path` left beside ``folder/NAME`` when a writer was
    killed mid-write (a kill skips its clean-up); return the paths removed. Only the folder's one
    writer may call this, before it writes: it cannot tell a leftover from a write in progress."""
    folder, removed = Path(folder), []
    for name in names:
        for tmp in folder.glob(f"{_temporary_prefix(name)}*.tmp"):
            if tmp.is_file():
                tmp.unlink(missing_ok=True)
                removed.append(tmp)
    return removed


def make_output_folder(path: str | os.PathLike[str], what: str = "output folder") -> Path:
    """Create the folder ``path`` (and its parents) or refuse it in one line (a file is in the way,
    no permission)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise InputError(f"{what} {str(path)!r} is an existing file, not a folder; choose another")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"cannot create {what} {str(path)!r}: {exc.strerror or exc}") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise InputError(f"cannot write into {what} {str(path)!r}: permission denied")
    return path


def check_output_file(path: str | os.PathLike[str], what: str = "output file") -> Path:
    """Refuse, before any work, an output file that cannot be written: ``path`` is a folder, or its
    folder cannot be created or written."""
    path = Path(path)
    if path.is_dir():
        raise InputError(
            f"{what} {str(path)!r} is an existing folder; give a file name such as {str(path / 'model.onnx')!r}"
        )
    folder = path.parent
    for parent in (folder, *folder.parents):
        if parent.exists():
            if not parent.is_dir():
                raise InputError(f"cannot write {what} {str(path)!r}: {str(parent)!r} is a file, not a folder")
            if not os.access(parent, os.W_OK | os.X_OK):
                raise InputError(f"cannot write {what} {str(path)!r}: {str(parent)!r} is not writable")
            break
    return path


__all__ = [
    "atomic_path",
    "refused_write",
    "check_output_file",
    "make_output_folder",
    "remove_stale_temporaries",
    "write_text_atomic",
]
