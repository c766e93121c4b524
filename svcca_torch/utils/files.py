"""Writing a file inside a run's folder without ever writing through a link (store files,
figures, the summary JSON)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, BinaryIO, Callable

__all__ = ["atomic_write"]


def atomic_write(path: Path, write: Callable[[BinaryIO], Any]) -> None:
    """Write via ``write(file)`` to a new temporary sibling, flush to disk, then rename
    (which replaces ``path``'s directory entry: a link there is replaced, never written through)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        if os.path.lexists(tmp):  # this PID's leftover; unlinking a link leaves its target alone
            os.unlink(tmp)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o644)
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.lexists(tmp):
            os.unlink(tmp)
    try:  # make the rename itself durable (POSIX; directories cannot be opened on Windows)
        fd = os.open(path.parent, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
