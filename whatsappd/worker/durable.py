"""Durable small files for the engines' send logs: fsync'ed JSON-lines appends, 0600."""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any

__all__ = ["append_record", "fsync_dir"]


def fsync_dir(directory: Path) -> None:
    """Make a new directory entry (a created or renamed file) durable."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def append_record(path: Path, record: dict[str, Any]) -> None:
    """Append one JSON line and fsync it (and the directory when the file is new); 0600.

    A failed write is cut back off, so the file never keeps half a line that the next append
    would glue itself to.
    """
    line = json.dumps(record, separators=(",", ":"), ensure_ascii=False).encode() + b"\n"
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        size = os.fstat(fd).st_size
        if size == 0:
            os.fchmod(fd, 0o600)
        try:
            view = memoryview(line)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        except BaseException:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, size)
            raise
    finally:
        os.close(fd)
    if size == 0:
        fsync_dir(path.parent)
