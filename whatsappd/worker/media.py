"""The media file a `send` command points at: checked once, for every engine, the same way."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator

from whatsappd.worker.engine import EngineError

__all__ = ["MEDIA_LIMITS", "media_chunks"]

#: WhatsApp's size limits per kind of media, in bytes.
MEDIA_LIMITS = {"image": 16 * 1024 * 1024, "audio": 16 * 1024 * 1024, "document": 100 * 1024 * 1024}
_CHUNK = 1024 * 1024


def media_chunks(media_path: str, kind: str) -> Iterator[bytes]:
    """The file's bytes in chunks; media_invalid / too_large (permanent) if it cannot be sent.

    O_NONBLOCK: a FIFO must not hang the worker (it is refused as not a regular file). A file
    that grows past the limit while it is read is refused too.
    """
    limit = MEDIA_LIMITS[kind]
    too_large = EngineError("too_large", f"a {kind} may be at most {limit} bytes", permanent=True)
    try:
        fd = os.open(media_path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise EngineError("media_invalid", f"cannot read the media file: {exc.strerror}", permanent=True) from None
    size = 0
    try:
        with os.fdopen(fd, "rb") as f:
            st = os.fstat(f.fileno())
            if not stat.S_ISREG(st.st_mode):
                raise EngineError("media_invalid", "the media path is not a regular file", permanent=True)
            if st.st_size > limit:
                raise too_large
            while chunk := f.read(_CHUNK):
                size += len(chunk)
                if size > limit:
                    raise too_large
                yield chunk
    except OSError as exc:
        raise EngineError("media_invalid", f"cannot read the media file: {exc.strerror}", permanent=True) from None
    if size == 0:
        raise EngineError("media_invalid", "the media file is empty", permanent=True)
