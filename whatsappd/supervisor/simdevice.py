"""A simulator company's device on a shared simulator server (`[simulator] server_dir`).

With server_dir set, the company's paired device is server_dir/<company>/simulator.json,
shared by every daemon of the machine; the company's own session directory keeps only the
worker's session lock. The company is paired iff that file holds a device; a logout wipes the
device there, and a store found unusable is moved aside there. The server's memory of what was
sent and of connections (send log, duplicates, connection log) stays: it is the "server's", not
the device's, and forgetting it would let a message be sent twice.

supervisor/devices.py asks `shared_device()` first (the `Place.SIMULATOR_SERVER` of the session
seam): None means the company's session is where it always is (its session directory, see
sessions.py, or PostgreSQL).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from whatsappd.sessionstore import SIMULATOR_FILE, SessionState, simulator_session_state

__all__ = ["SharedDevice", "shared_device"]


@dataclass(frozen=True)
class SharedDevice:
    """One simulator company's directory on the shared server."""

    directory: Path  # server_dir/<company>

    @property
    def path(self) -> Path:
        return self.directory / SIMULATOR_FILE

    def state(self) -> SessionState:
        """Paired, none or corrupt (never raises)."""
        return simulator_session_state(self.directory)

    def wipe(self) -> bool:
        """Remove the device (a logout); True if there was a file."""
        try:
            self.path.unlink()
        except FileNotFoundError:
            return False
        return True

    def quarantine(self) -> Path | None:
        """Move an unusable device file aside, beside it and timestamped; where, or None."""
        if not self.path.exists():
            return None
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        target = self.directory / f"{SIMULATOR_FILE}.quarantine-{stamp}"
        n = 1
        while target.exists():
            n += 1
            target = self.directory / f"{SIMULATOR_FILE}.quarantine-{stamp}-{n}"
        self.path.rename(target)
        return target


def shared_device(server_dir: Path | None, company: str, engine: str) -> SharedDevice | None:
    """The company's device on the shared simulator server (server_dir: `[simulator] server_dir`,
    None when unset); None when it has none (not a simulator company, or no shared server): its
    session directory holds it."""
    if engine != "simulator" or server_dir is None:
        return None
    return SharedDevice(server_dir / company)
