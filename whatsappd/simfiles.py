"""The simulator's "server" files, read from either side: a worker writes them, checkers,
benchmarks and tests read them (with no worker running, and while workers append).

JSON-lines files appended with fsync by the worker (whatsappd/worker/durable.py): the send log
and its duplicates (whatsappd/worker/simulator/server.py) and, on a shared server
(`[simulator] server_dir`), the connection log (whatsappd/worker/simulator/connections.py, which
describes its lines). This module holds their names and their readers, so that reading them
never loads the worker's code into another process.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "CONNECTION_LOG_FILE",
    "DUPLICATES_FILE",
    "SEND_LOG_FILE",
    "Connection",
    "SendLogStats",
    "fold",
    "parse_connections",
    "parse_records",
    "parse_send_records",
    "process_start",
    "read_connections",
    "read_send_log",
    "send_log_stats",
]

#: The "server" side of sending: one JSON line per unique outbox id sent, fsync'ed.
SEND_LOG_FILE = "simulator-sent.jsonl"
#: One JSON line per send request for an outbox id that was already sent (nothing sent again).
DUPLICATES_FILE = "simulator-duplicates.jsonl"
#: On a shared server: who is connected as the company (connect / disconnect / replaced).
CONNECTION_LOG_FILE = "simulator-connections.jsonl"
_EVENTS = ("connect", "disconnect", "replaced")


def parse_records(data: bytes, path: Path, is_record: Callable[[dict[str, Any]], bool],
                  corrupt: type[Exception] = ValueError) -> tuple[list[dict[str, Any]], int]:
    """The records of a JSON-lines file's content and the length of its complete lines.

    A torn last line (no newline yet) is left out; a complete line that is not JSON, or that
    is_record refuses, raises corrupt naming the file and the line.
    """
    complete = data.rfind(b"\n") + 1
    records: list[dict[str, Any]] = []
    for number, line in enumerate(data[:complete].splitlines(), 1):
        try:
            record = json.loads(line)
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise corrupt(f"{path} line {number} is not JSON") from None
        if not isinstance(record, dict) or not is_record(record):
            raise corrupt(f"{path} line {number} is not a send record")
        records.append(record)
    return records, complete


def process_start(pid: int) -> int | None:
    """The start time (clock ticks since boot) of a running process; None if there is no such
    process or only its zombie is left."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rpartition(")")[2].split()  # the command name may hold spaces and parentheses
    if len(fields) < 20 or fields[0] in ("Z", "X"):
        return None
    return int(fields[19])


@dataclass
class Connection:
    """One connection of the log, from its `connect` to how it ended (if it did)."""

    conn: str
    host: str
    pid: int
    pid_start: int | None
    wall: str
    mono: float
    ended: str | None = None  # "disconnect" or "replaced"; None: the log says it is still on
    reason: str | None = None  # of a disconnect
    by: str | None = None  # the connection that replaced it
    ended_wall: str | None = None
    ended_mono: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def process_alive(self) -> bool:
        """Whether its worker process still runs (the same process, not a reused pid)."""
        start = process_start(self.pid)
        return start is not None and (self.pid_start is None or start == self.pid_start)

    @property
    def live(self) -> bool:
        """Connected now: no end in the log, and its worker still runs."""
        return self.ended is None and self.process_alive()

    def as_dict(self) -> dict[str, Any]:
        return {"conn": self.conn, "host": self.host, "pid": self.pid, "wall": self.wall, "mono": self.mono,
                "ended": self.ended, "reason": self.reason, "by": self.by, "ended_wall": self.ended_wall,
                "ended_mono": self.ended_mono, "live": self.live}


def fold(records: list[dict[str, Any]]) -> dict[str, Connection]:
    """The connections the log's records describe, in the order they connected (the first end
    of a connection counts; later ones, e.g. a replaced worker's own disconnect, are ignored)."""
    out: dict[str, Connection] = {}
    for record in records:
        event, conn = record["event"], record["conn"]
        if event == "connect":
            out[conn] = Connection(conn, str(record.get("host")), int(record.get("pid", 0)),
                                   record.get("pid_start"), str(record.get("wall")), float(record.get("mono", 0)))
        elif conn in out and out[conn].ended is None:
            c = out[conn]
            c.ended, c.reason, c.by = event, record.get("reason"), record.get("by")
            c.ended_wall, c.ended_mono = record.get("wall"), record.get("mono")
    return out


def _is_record(record: dict[str, Any]) -> bool:
    return record.get("event") in _EVENTS and isinstance(record.get("conn"), str)


def parse_connections(data: bytes, path: Path) -> tuple[list[dict[str, Any]], int]:
    return parse_records(data, path, _is_record)


def read_connections(directory: Path) -> dict[str, Connection]:
    """The connections of one company's server directory ({} without a log); ValueError if the
    log is corrupt. Safe while workers append: a line still being written is left out."""
    try:
        data = (directory / CONNECTION_LOG_FILE).read_bytes()
    except FileNotFoundError:
        return {}
    return fold(parse_connections(data, directory / CONNECTION_LOG_FILE)[0])


@dataclass(frozen=True)
class SendLogStats:
    """What the simulator's "server" was asked to send (see send_log_stats)."""

    sent: int  # unique outbox ids sent
    duplicate_requests: int  # sends of an outbox id that was already sent (nothing sent again)
    by_recipient: dict[str, int]  # JID -> unique sends

    def as_dict(self) -> dict[str, Any]:
        return {"sent": self.sent, "duplicate_requests": self.duplicate_requests,
                "by_recipient": dict(self.by_recipient)}


def read_send_log(session_dir: Path) -> list[dict[str, Any]]:
    """Every record of session_dir's send log, oldest first ([] if none); ValueError if corrupt.

    Safe while a worker appends: a last line still being written is left out.
    """
    records, _ = parse_send_records(session_dir / SEND_LOG_FILE)
    return records


def send_log_stats(session_dir: Path) -> SendLogStats:
    """The send log's counts, read from disk: usable with no worker running (tests, benchmarks)."""
    records = read_send_log(session_dir)
    duplicates, _ = parse_send_records(session_dir / DUPLICATES_FILE)
    by_recipient: dict[str, int] = {}
    for record in records:
        by_recipient[record["to"]] = by_recipient.get(record["to"], 0) + 1
    return SendLogStats(len(records), len(duplicates), by_recipient)


def parse_send_records(path: Path) -> tuple[list[dict[str, Any]], int]:
    """The records of a JSON-lines file and the length of its complete lines (a torn tail is ignored)."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return [], 0
    return parse_records(data, path, lambda record: isinstance(record.get("outbox_id"), str))
