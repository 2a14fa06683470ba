"""Reading a media file named by path: beneath a pinned directory, never through a symlink.

The daemon can read every company's session store, so a client may only name files inside
the directories the sysadmin chose (outbox.media_dirs). Checking a path string and then opening
it is a race: a directory swapped for a symlink in between makes the open land elsewhere. So a
path is never resolved. The allowed directory is opened (pinned), and the path below it is
walked one component at a time, each opened relative to the previous one's descriptor with
O_NOFOLLOW: no symlink is followed below the pinned directory, and a component that changes
during the walk is either the directory that was opened or refused. What was opened is then
checked through its descriptor (fstat: a regular file, its size; its directory not inside the
forbidden one), and its bytes are read from that descriptor; nothing re-opens it by name.

(openat2 with RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS would do the walk in one call, but the
walk is needed anyway for the directory the file lies in, works where a seccomp filter refuses
openat2, and one way of opening is one way to test.)

Both the API (files by path, under outbox.media_dirs) and the workers (the file the supervisor
wrote for a send) read media through `read_media`.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Literal

__all__ = ["MediaRefused", "Reason", "read_media"]

#: Why a media file was refused. `outside`: not beneath an allowed directory (or through a
#: symlink, or inside the forbidden directory); `too_large`: over the limit; the rest say what
#: is wrong with the path or the file.
Reason = Literal["invalid", "outside", "unreadable", "not_regular", "empty", "too_large"]

_CHUNK = 1024 * 1024
#: Directories below a pinned one: opened without following a symlink, O_PATH (search
#: permission is enough, as for a normal path lookup).
_DIR = os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
#: The file itself. O_NONBLOCK: a FIFO must not wait for a writer (it is refused by fstat).
_FILE = os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_NOCTTY | os.O_CLOEXEC
#: More levels above a directory than any real tree has: refuse rather than walk on.
_MAX_DEPTH = 4096


class MediaRefused(Exception):
    """A media file that cannot be used; `reason` lets each caller choose its error code."""

    def __init__(self, reason: Reason, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


def read_media(path: str, roots: Sequence[Path], limit: int, forbidden: Path | None = None) -> Iterator[bytes]:
    """The bytes of the regular file at `path`, in chunks; MediaRefused if it may not be read.

    `path` must be absolute and lie below one of `roots` (the roots' own paths may hold
    symlinks: the sysadmin wrote them); below a root no symlink is followed and no `.` or `..`
    is accepted. A file whose directory is `forbidden` or inside it is refused, however it
    was reached. A file over `limit` bytes, or one that grows past it while read, is
    `too_large`; an empty one is refused too.
    """
    fd = _open_beneath(path, roots, forbidden)
    size = 0
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise MediaRefused("not_regular", f"{path} is not a regular file")
        if st.st_size > limit:
            raise MediaRefused("too_large", f"{path} is {st.st_size} bytes, over the limit of {limit}")
        while chunk := os.read(fd, _CHUNK):
            size += len(chunk)
            if size > limit:
                raise MediaRefused("too_large", f"{path} grew past {limit} bytes while it was read")
            yield chunk
    except OSError as exc:
        raise MediaRefused("unreadable", f"cannot read {path}: {exc.strerror}") from None
    finally:
        os.close(fd)
    if size == 0:
        raise MediaRefused("empty", f"{path} is empty")


def _components(path: str) -> list[str]:
    if "\0" in path:
        raise MediaRefused("invalid", f"{path!r} contains a NUL byte")
    if not os.path.isabs(path):
        raise MediaRefused("invalid", f"{path} is not an absolute path")
    parts = [p for p in path.split("/") if p]
    if "." in parts or ".." in parts:
        raise MediaRefused("invalid", f"{path} contains '.' or '..'; give the file's plain absolute path")
    return parts


def _below(parts: list[str], roots: Sequence[Path]) -> tuple[Path, list[str]] | None:
    """(root, the components below it) for the first root that `parts` lies below."""
    for root in roots:
        # The root as written, or resolved: a client may name it either way.
        for spelling in dict.fromkeys((str(root), os.path.realpath(root))):
            prefix = [p for p in spelling.split("/") if p and p != "."]
            if len(parts) > len(prefix) and parts[:len(prefix)] == prefix:
                return root, parts[len(prefix):]
    return None


def _open_beneath(path: str, roots: Sequence[Path], forbidden: Path | None) -> int:
    parts = _components(path)
    found = _below(parts, roots)
    if found is None:
        raise MediaRefused("outside", f"{path} lies outside the allowed directories")
    root, below = found
    try:
        dir_fd = os.open(root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as exc:
        raise MediaRefused("unreadable", f"cannot open the directory {root}: {exc.strerror}") from None
    try:
        walked = str(root)
        for name in below[:-1]:
            walked = f"{walked}/{name}"
            try:
                next_fd = os.open(name, _DIR, dir_fd=dir_fd)
            except OSError as exc:
                raise _refusal(exc, dir_fd, name, walked, path) from None
            os.close(dir_fd)
            dir_fd = next_fd
        if forbidden is not None and _within(dir_fd, forbidden):
            raise MediaRefused("outside", f"{path} is inside the state directory {forbidden}")
        try:
            return os.open(below[-1], _FILE, dir_fd=dir_fd)
        except OSError as exc:
            raise _refusal(exc, dir_fd, below[-1], path, path) from None
    finally:
        os.close(dir_fd)


def _refusal(exc: OSError, dir_fd: int, name: str, walked: str, path: str) -> MediaRefused:
    """Say why `name` (in dir_fd; `walked` is its path) could not be opened."""
    try:
        is_link = stat.S_ISLNK(os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode)
    except OSError:
        is_link = False
    if is_link or exc.errno == errno.ELOOP:
        return MediaRefused("outside", f"{walked} is a symbolic link; links are not followed (for {path})")
    return MediaRefused("unreadable", f"cannot read {path}: {exc.strerror}")


def _within(dir_fd: int, target: Path) -> bool:
    """Whether the directory dir_fd is `target` or lies below it (walking '..' up to /).

    By identity (device, inode), not by name: however the directory was reached, its
    ancestors are what they are on disk.
    """
    try:
        st = os.stat(target)
    except OSError:
        return False  # no such directory: nothing lies inside it
    key = (st.st_dev, st.st_ino)
    fd = os.open(".", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=dir_fd)
    try:
        here = os.fstat(fd)
        for _ in range(_MAX_DEPTH):
            if (here.st_dev, here.st_ino) == key:
                return True
            parent = os.open("..", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=fd)
            os.close(fd)
            fd = parent
            up = os.fstat(fd)
            if (up.st_dev, up.st_ino) == (here.st_dev, here.st_ino):
                return False  # the root directory is its own parent
            here = up
        return True
    finally:
        os.close(fd)
