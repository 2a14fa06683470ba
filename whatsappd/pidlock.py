"""Files held with an exclusive flock for a process's life, naming its pid.

Three users, one implementation: the daemon's lock on its whole state directory, the pid file
of `whatsappd run --daemonize`, and each worker's lock on its session. A lock left by a
process that died (even by kill -9) is no obstacle: the kernel drops it with the process.
"""

from __future__ import annotations

import errno
import fcntl
import os
from pathlib import Path

__all__ = ["Held", "acquire", "holder"]


class Held(Exception):
    """Another live process holds the lock; `pid` is its pid (None if it has not written it yet)."""

    def __init__(self, path: Path, pid: int | None) -> None:
        super().__init__(f"{path} is locked by {'pid ' + str(pid) if pid else 'another process'}")
        self.path = path
        self.pid = pid


def _read_pid(fd: int) -> int | None:
    text = os.pread(fd, 32, 0).decode(errors="replace").strip()
    return int(text) if text.isdigit() else None


def acquire(path: Path, mode: int = 0o600) -> int:
    """Lock path (created if missing) without waiting and write our pid into it.

    Returns the descriptor (close-on-exec, so no child inherits the lock); closing it, or the
    process ending, releases the lock. Raises Held naming the holder if it is taken.
    """
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, mode)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        pid = _read_pid(fd) if exc.errno in (errno.EAGAIN, errno.EACCES) else None
        os.close(fd)
        if exc.errno in (errno.EAGAIN, errno.EACCES):
            raise Held(path, pid) from None
        raise
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def holder(path: Path) -> int | None:
    """The pid of a live process holding path's lock (-1 if it has not written it yet), or None."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        pid = _read_pid(fd)
        return -1 if pid is None else pid
    finally:
        os.close(fd)
    return None
