"""The media file a `send` command points at: checked once, for every engine, the same way."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

from whatsappd.errors import ErrorCode
from whatsappd.mediafile import MediaRefused, read_media
from whatsappd.worker.engine import EngineError

__all__ = ["MEDIA_LIMITS", "media_chunks"]

#: WhatsApp's size limits per kind of media, in bytes.
MEDIA_LIMITS = {"image": 16 * 1024 * 1024, "audio": 16 * 1024 * 1024, "document": 100 * 1024 * 1024}


def media_chunks(media_path: str, kind: str) -> Iterator[bytes]:
    """The file's bytes in chunks; media_invalid / too_large (permanent) if it cannot be sent.

    The supervisor wrote the file into its own directory for this send; it is read the one way
    every media file is (whatsappd/mediafile.py): beneath that directory, no symlink followed,
    checked through its descriptor. A FIFO or a file that grows past the limit is refused too.
    """
    path = os.path.abspath(media_path)
    try:
        yield from read_media(path, (Path(path).parent,), MEDIA_LIMITS[kind])
    except MediaRefused as exc:
        if exc.reason == "too_large":
            raise EngineError(ErrorCode.TOO_LARGE, f"a {kind} may be at most {MEDIA_LIMITS[kind]} bytes: {exc.message}",
                              permanent=True) from None
        raise EngineError(ErrorCode.MEDIA_INVALID, f"the media file cannot be sent: {exc.message}", permanent=True) from None
