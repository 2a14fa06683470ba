"""The private channel between the supervisor and a worker: newline-delimited JSON, exit codes.

Shared by both sides so that neither can drift. Every message names its company, so a later
shared-worker mode (several companies per process) needs no protocol change.
"""

from __future__ import annotations

import enum
import json
from typing import Any

__all__ = ["ExitCode", "MAX_LINE", "decode", "encode"]

#: A line longer than this is a protocol violation (the worker is killed): it bounds memory.
MAX_LINE = 16 * 1024 * 1024


class ExitCode(enum.IntEnum):
    """How a worker tells the supervisor why it ended."""

    STOPPED = 0  # asked to stop, and did
    TRANSIENT = 10  # connection failed or dropped: retry with backoff
    LOGGED_OUT = 11  # the phone unlinked the device: the supervisor wipes the session
    REPLACED = 12  # another client took over these credentials: wait for an operator
    BANNED = 13  # temporary ban: retry at its expiry (sent earlier in a `state` message)
    OUTDATED = 14  # client too old: never retried
    PAIRING_TIMEOUT = 15  # nobody scanned the QR in time
    STORE_UNUSABLE = 16  # the session store cannot be opened: quarantine it
    SESSION_LOCKED = 17  # another process holds this session's lock
    SESSION_DELETED = 18  # the session's files were deleted under the running worker
    BAD_INVOCATION = 64  # wrong arguments: a bug in the supervisor, never retried quickly


def encode(message: dict[str, Any]) -> bytes:
    """One message as one line of UTF-8 JSON."""
    return json.dumps(message, separators=(",", ":"), ensure_ascii=False).encode() + b"\n"


def decode(line: bytes) -> dict[str, Any]:
    """Parse one line; raise ValueError for anything that is not a JSON object with a type."""
    message = json.loads(line)
    if not isinstance(message, dict) or not isinstance(message.get("type"), str):
        raise ValueError("a protocol message must be a JSON object with a string 'type'")
    return message
