"""The shared simulator server's connection log: who is connected to the fake WhatsApp as each
company, so that a second connection replaces the first, as WhatsApp does (`<stream:error>
<conflict/>`: the older client ends `replaced`).

With `[simulator] server_dir` set, the simulator's "server" of a company is the directory
server_dir/<company>/, shared by every daemon on the machine. CONNECTION_LOG_FILE there holds
one JSON line per event, appended under an exclusive flock of the file and fsync'ed:

    {"event": "connect",    "conn", "host", "pid", "pid_start", "wall", "mono"}
    {"event": "disconnect", "conn", "reason", "host", "pid", "wall", "mono"}
    {"event": "replaced",   "conn", "by", "host", "pid", "wall", "mono"}

`conn` names one connection; `host` is the daemon's state directory (one per daemon on one
machine); `pid` and `pid_start` (its start time in clock ticks, /proc/PID/stat field 22) name
the worker process, so a reused pid is not mistaken for it; `wall` is ISO-8601 UTC, `mono`
CLOCK_MONOTONIC seconds (one clock for every process on Linux). A `replaced` line is written by
the connecting worker, in the same locked step as its own `connect`, for each older connection
still live; a `disconnect` with reason "gone" likewise for one whose worker has died. A
connection is live from its `connect` until its first `disconnect` or `replaced`, and only while
its worker process exists (a SIGKILLed worker writes nothing).

The replaced worker notices by reading the log's new lines every WATCH_SECONDS (so within
~50-100 ms; a frozen one when it is resumed), and no send of a replaced connection reaches the
send log: the engine checks under this log's lock (`locked()`) before it sends.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import secrets
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from whatsappd.simfiles import (  # the log's name and reader, shared with checkers and tests
    CONNECTION_LOG_FILE,
    Connection,
    fold,
    parse_connections,
    process_start,
    read_connections,
)
from whatsappd.worker.durable import append_record
from whatsappd.worker.simulator.server import iso, now

__all__ = [
    "CONNECTION_LOG_FILE",
    "WATCH_SECONDS",
    "Connection",
    "ConnectionLog",
    "fold",
    "process_start",
    "read_connections",
]

#: How often a connected worker looks for its replacement in the log.
WATCH_SECONDS = 0.05


class ConnectionLog:
    """One worker's side of a company's connection log (see the module docstring)."""

    def __init__(self, directory: Path, host: str) -> None:
        self.path = directory / CONNECTION_LOG_FILE
        self.host = host
        self.pid = os.getpid()
        self.conn: str | None = None  # the live connection of this worker, if any
        self._replaced = False  # its last connection was replaced (sticky until the next connect)
        self._offset = 0  # the log is read up to here (by replaced())
        # conn and _offset change in the engine's, the watcher's and a send's threads. Lock
        # order: the file's flock first, then this (never the other way).
        self._mutex = threading.Lock()

    def _record(self, event: str, conn: str, **fields: Any) -> dict[str, Any]:
        return {"event": event, "conn": conn, **fields, "host": self.host, "pid": self.pid,
                "wall": _iso_now(), "mono": time.monotonic()}

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """The log's exclusive flock: no connection is recorded (nor replaced) while held."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the lock

    def _read_locked(self) -> tuple[list[dict[str, Any]], int]:
        """Every record; a torn last line (a writer died in mid-append) is cut off. Lock held."""
        data = self.path.read_bytes()
        records, complete = parse_connections(data, self.path)
        if complete < len(data):
            os.truncate(self.path, complete)
        return records, complete

    def connect(self) -> str:
        """Record a new connection of this worker, replacing every other live one; its id.
        OSError/ValueError if the log cannot be used."""
        conn = f"{self.pid}-{secrets.token_hex(4)}"
        with self.locked():
            records, _ = self._read_locked()
            for old in fold(records).values():
                if old.ended is not None or old.conn == self.conn:
                    continue
                if old.process_alive():
                    append_record(self.path, self._record("replaced", old.conn, by=conn))
                else:
                    append_record(self.path, self._record("disconnect", old.conn, reason="gone"))
            append_record(self.path, self._record("connect", conn, pid_start=process_start(self.pid)))
            with self._mutex:
                self._offset = self.path.stat().st_size
                self.conn, self._replaced = conn, False
        return conn

    def disconnect(self, reason: str) -> None:
        """Record the end of this worker's connection (nothing if it has none). OSError."""
        with self._mutex:
            conn, self.conn = self.conn, None
        if conn is None:
            return
        with self.locked():
            append_record(self.path, self._record("disconnect", conn, reason=reason))

    def replaced(self) -> bool:
        """Whether this worker's last connection was replaced (reads the lines appended since
        the last look)."""
        with self._mutex:
            conn = self.conn
            if conn is None:
                return self._replaced
            try:
                with open(self.path, "rb") as f:
                    f.seek(self._offset)
                    data = f.read()
            except FileNotFoundError:
                return False
            records, complete = parse_connections(data, self.path)
            self._offset += complete
            if any(r["event"] == "replaced" and r["conn"] == conn for r in records):
                self.conn, self._replaced = None, True  # the replacer's line ended it: nothing more to record
                return True
            return False


def _iso_now() -> str:
    return iso(now())
