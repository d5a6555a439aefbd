"""Atomic file writes: readers see the old file or the new one, never half of one.

Every file the toolkit writes for a user (checkpoints, ONNX models, reports, caches) goes through
:func:`atomic_path`: the content is written to a temporary file beside the target, flushed to
disk, given the permissions a plain ``open(path, "w")`` would give (``0o666`` less the umask;
``tempfile.mkstemp`` alone makes files readable by their owner only), and renamed over the target
(``os.replace``, atomic on POSIX and Windows). A crash or an exception leaves the previous file
intact and removes the temporary one.
"""

from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


def _umask() -> int:
    # The only portable way to read the umask is to set it and put it back.
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; when the block ends without an exception, the file
    written there is synced, given the umask's permissions and renamed to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomic(path: str | os.PathLike[str], text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically; return the path."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


__all__ = ["atomic_path", "write_text_atomic"]
