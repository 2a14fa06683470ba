"""What a session directory's credential files say: "is this session paired?", for both engines.

The one place that knows the two store formats by their file names: the whatsmeow SQLite store
of the real engine (`store.db`) and the simulator's JSON store (`simulator.json`). The
supervisor side (sessions.py: discovery, restore, import-baileys) and the engines inside the
workers read them through here, so neither can drift from the other; this module imports
nothing from whatsappd.worker, so asking the question never loads an engine.
"""

from __future__ import annotations

import contextlib
import enum
import json
import sqlite3
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "NEONIZE_STORE",
    "NEONIZE_STORE_FILES",
    "SIMULATOR_FILE",
    "SessionState",
    "SimulatorDevice",
    "count_devices",
    "engine_of",
    "read_simulator_store",
    "session_state",
    "simulator_session_state",
    "simulator_store_bytes",
]

#: The whatsmeow store inside a session directory, and every file SQLite keeps beside it (WAL).
NEONIZE_STORE = "store.db"
NEONIZE_STORE_FILES = (NEONIZE_STORE, f"{NEONIZE_STORE}-wal", f"{NEONIZE_STORE}-shm")
#: The simulator's whole "store": the fake device, inside the company's session directory.
SIMULATOR_FILE = "simulator.json"
_SIMULATOR_FORMAT = "whatsappd-simulator"
_SIMULATOR_VERSION = 1


class SessionState(enum.StrEnum):
    PAIRED = "paired"  # credentials of a linked device
    NONE = "none"  # no store, or a store without a device (never paired, or logged out)
    CORRUPT = "corrupt"  # a store that exists but cannot be read: still a session (it gets quarantined)


def count_devices(store: Path, *, writable: bool = False, timeout: float = 2.0) -> int | None:
    """The device rows of a whatsmeow store; None if the file does not exist. Never creates it.

    Raises sqlite3.Error when SQLite cannot open or read it (DatabaseError: not a database).
    writable: open it read-write, so a store the worker could not write is found now.
    """
    store = Path(store)
    if not store.exists() and not store.is_symlink():
        return None
    uri = f"file:{urllib.parse.quote(str(store), safe='/')}?mode={'rw' if writable else 'ro'}"
    # Read-only unless asked: this never changes anything; WAL readers do not block the worker.
    with contextlib.closing(sqlite3.connect(uri, uri=True, timeout=timeout)) as db:
        (has_table,) = db.execute(
            "SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name = 'whatsmeow_device'"
        ).fetchone()
        if not has_table:
            return 0  # created but never initialised by the library
        (devices,) = db.execute("SELECT count(*) FROM whatsmeow_device").fetchone()
        return int(devices)


@dataclass(frozen=True)
class SimulatorDevice:
    jid: str
    push_name: str


def read_simulator_store(path: Path) -> SimulatorDevice | None:
    """The simulator's stored device, None if there is no store or no device; ValueError if corrupt."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path} is not valid JSON: {exc}") from None
    if (
        not isinstance(data, dict)
        or data.get("format") != _SIMULATOR_FORMAT
        or data.get("version") != _SIMULATOR_VERSION
    ):
        raise ValueError(f"{path} is not a version {_SIMULATOR_VERSION} simulator store")
    device = data.get("device")
    if device is None:
        return None
    if (
        not isinstance(device, dict)
        or not isinstance(device.get("jid"), str)
        or not isinstance(device.get("push_name"), str)
    ):
        raise ValueError(f"{path} holds a malformed device")
    return SimulatorDevice(jid=device["jid"], push_name=device["push_name"])


def simulator_store_bytes(device: SimulatorDevice | None, paired_at: str) -> bytes:
    """The content of a simulator store holding device (None: the device was logged out)."""
    data: dict[str, Any] = {"format": _SIMULATOR_FORMAT, "version": _SIMULATOR_VERSION, "device": None}
    if device is not None:
        data["device"] = {"jid": device.jid, "push_name": device.push_name, "paired_at": paired_at}
    return json.dumps(data, indent=2, ensure_ascii=False).encode() + b"\n"


def simulator_session_state(directory: Path) -> SessionState:
    """The state of the simulator store in directory (NONE if there is none). Never raises."""
    try:
        device = read_simulator_store(directory / SIMULATOR_FILE)
    except (OSError, ValueError):
        return SessionState.CORRUPT
    return SessionState.PAIRED if device is not None else SessionState.NONE


def session_state(directory: Path) -> SessionState:
    """Whether a session directory holds paired credentials, of either engine. Never raises.

    A corrupt store still counts as a session: the company is started, its worker reports the
    store unusable, and the session is quarantined with a clear `failed` state, instead of the
    company silently looking as if it had never been paired.
    """
    if (directory / SIMULATOR_FILE).exists():
        return simulator_session_state(directory)
    try:
        devices = count_devices(directory / NEONIZE_STORE)
    except sqlite3.DatabaseError:
        return SessionState.CORRUPT
    except sqlite3.Error:
        return SessionState.NONE  # locked or similar: not evidence of damage
    return SessionState.PAIRED if devices else SessionState.NONE


def engine_of(directory: Path) -> str:
    """The engine whose store is in directory: "simulator" if its file is there, else "neonize"."""
    return "simulator" if (directory / SIMULATOR_FILE).exists() else "neonize"
