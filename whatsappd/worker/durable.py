"""Durable small files for the engines' send logs: fsync'ed JSON-lines appends, 0600, read back
without the torn line a crash in the middle of an append leaves."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from whatsappd.fsutil import fsync_dir
from whatsappd.simfiles import parse_records  # the reader, shared with the files' readers elsewhere

__all__ = ["append_record", "fsync_dir", "parse_records", "write_private"]


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


def write_private(path: Path, chunks: Iterable[bytes], durable_name: bool = False) -> int:
    """Write chunks to path as a 0600 file, atomically (temp file, fsync, rename); the size.

    durable_name: also fsync the directory, so the new name survives a power cut (a store).
    """
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)  # 0600
    size = 0
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), 0o600)
            for chunk in chunks:
                f.write(chunk)
                size += len(chunk)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    if durable_name:
        fsync_dir(path.parent)
    return size
