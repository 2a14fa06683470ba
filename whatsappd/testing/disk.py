"""A real small disk for tests: a tmpfs of a few MiB, mounted, filled to the last byte, freed.

Mounting needs root; `SmallDisk.mount` says why it could not, so a test can skip saying so.
"""

from __future__ import annotations

import errno
import os
import subprocess
from pathlib import Path

__all__ = ["SmallDisk"]


class SmallDisk:
    """A tmpfs of a few MiB mounted at `path`; fill() takes every free byte, free() gives them back."""

    def __init__(self, path: Path, size: str = "4m", inodes: int | None = None) -> None:
        self.path = path
        self.size = size
        self.inodes = inodes  # the tmpfs's nr_inodes; None: the kernel's default
        self.filler = path / "filler"

    def mount(self) -> str | None:
        """Mount it (path is created); None when done, else why it cannot be."""
        if os.geteuid() != 0:
            return "needs root, to mount a small tmpfs and fill it"
        self.path.mkdir(parents=True, exist_ok=True)
        options = f"size={self.size},mode=0700" + (f",nr_inodes={self.inodes}" if self.inodes else "")
        mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(self.path)],
                                 capture_output=True, text=True)
        return None if mounted.returncode == 0 else f"cannot mount a tmpfs here: {mounted.stderr.strip()}"

    def umount(self) -> None:
        subprocess.run(["umount", "-l", str(self.path)], check=True)

    def fill(self) -> None:
        fd = os.open(self.filler, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            for size in (1 << 20, 1 << 16, 1 << 12, 1):
                try:
                    while True:
                        os.write(fd, b"\0" * size)
                except OSError as exc:
                    assert exc.errno == errno.ENOSPC, exc
        finally:
            os.close(fd)
        assert os.statvfs(self.path).f_bavail == 0

    def free(self) -> None:
        self.filler.unlink(missing_ok=True)
