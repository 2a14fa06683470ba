"""The whatsmeow store in a session directory: where it is, how neonize opens it, and whether
it can be used before the client is made (the format itself is read in whatsappd/sessionstore.py)."""

from __future__ import annotations

import sqlite3
import urllib.parse
from pathlib import Path

from whatsappd.sessionstore import NEONIZE_STORE, NEONIZE_STORE_FILES, count_devices

__all__ = ["STORE_FILE", "STORE_FILES", "StoreUnusable", "inspect_store", "store_dsn"]

STORE_FILE = NEONIZE_STORE
STORE_FILES = NEONIZE_STORE_FILES


class StoreUnusable(Exception):
    """The session's SQLite store cannot be opened or read."""


def store_dsn(session_dir: Path) -> str:
    """The ``NewClient(name=...)`` string for a session directory: SQLite in WAL mode.

    neonize opens ``file:{name}?_foreign_keys=on``; the trailing ``_pad=`` swallows that second
    ``?...`` so our parameters hold. The path is percent-encoded because SQLite decodes URIs.
    """
    path = urllib.parse.quote(str(Path(session_dir) / STORE_FILE), safe="/")
    return f"{path}?_journal_mode=WAL&_busy_timeout=10000&_foreign_keys=on&_pad="


def inspect_store(path: Path) -> int | None:
    """Count the device rows of a whatsmeow store; None if the file does not exist.

    Raises StoreUnusable if SQLite cannot open it for writing or read it. Never creates the file.
    """
    try:
        return count_devices(Path(path), writable=True, timeout=10)
    except sqlite3.Error as exc:
        raise StoreUnusable(f"{path}: {exc}") from exc
