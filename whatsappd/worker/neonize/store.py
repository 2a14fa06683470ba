"""The whatsmeow store: where it is, how neonize opens it, and whether it can be used before the
client is made (the SQLite format itself is read in whatsappd/sessionstore.py).

Two places (the supervisor's side is supervisor/devices.py): the session directory's SQLite
`store.db`, or whatsmeow's tables in PostgreSQL, shared by every company of the database. There
neonize must be given the device: without a JID it loads the FIRST device of the database
(another company's credentials), and with a JID whose row is missing the Go side crashes
(SIGABRT, exit 134). So pairing always asks for a new device, and restoring passes the recorded
JID only after checking its row exists (else the worker ends NOT_PAIRED, before any Go call).
"""

from __future__ import annotations

import sqlite3
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from whatsappd.sessionstore import NEONIZE_STORE, NEONIZE_STORE_FILES, count_devices

__all__ = ["STORE_FILE", "STORE_FILES", "StorePlace", "StoreUnusable", "device_exists", "inspect_store", "parse_jid",
           "store_dsn"]

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


def parse_jid(text: str) -> Any:
    """whatsmeow's JID text (``user[.agent][:device]@server``) as neonize's JID message; ValueError."""
    from whatsappd.worker.neonize.lib import JID

    user, at, server = text.partition("@")
    user, colon, device = user.partition(":")
    user, dot, agent = user.partition(".")
    if not (at and user and server) or (colon and not device.isdigit()) or (dot and not agent.isdigit()):
        raise ValueError(f"not a device JID: {text!r}")
    return JID(User=user, RawAgent=int(agent or 0), Device=int(device or 0), Integrator=0, IsEmpty=False,
               Server=server)


def device_exists(dsn: str, jid: str) -> bool:
    """Whether whatsmeow's PostgreSQL store holds the device row of jid (psycopg.Error if the
    database cannot be asked). No prepared statements: the DSN may name PgBouncer."""
    import psycopg

    with psycopg.connect(dsn, autocommit=True, connect_timeout=30, prepare_threshold=None) as db:
        try:
            return db.execute("SELECT 1 FROM whatsmeow_device WHERE jid = %s", (jid,)).fetchone() is not None
        except psycopg.errors.UndefinedTable:
            return False  # whatsmeow's tables not created yet: no device anywhere


@dataclass(frozen=True)
class StorePlace:
    """Where this worker's client keeps its credentials: the session directory, or PostgreSQL."""

    session_dir: Path
    dsn: str | None = None  # whatsmeow's PostgreSQL store (never logged: it may hold a password)
    jid: str | None = None  # the device to restore there
    pair: bool = False

    def client(self, company: str) -> Any:
        """The neonize client on this store: by JID, or a new device, never the database's first."""
        from whatsappd.worker.neonize.lib import NewClient

        if self.dsn is None:
            return NewClient(store_dsn(self.session_dir), uuid=company)
        if self.pair:
            return NewClient(self.dsn, uuid=company, new_device=True)
        if self.jid is None:  # check() ends the worker first; never let neonize pick a device
            raise RuntimeError("restoring from PostgreSQL needs the device's JID")
        return NewClient(self.dsn, jid=parse_jid(self.jid), uuid=company)
