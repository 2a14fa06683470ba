"""The neonize engine's durable send log: what this session handed to WhatsApp, exactly once.

``outbox-log.jsonl`` in the session directory: ``attempted`` is appended and fsync'ed right
before the one network call that can deliver the message (``send_message``), ``sent`` with
WhatsApp's id right after it. An outbox id already ``sent`` is answered from the log; one left
``attempted`` by a previous process is never sent again (``send_interrupted``). A failure that
provably happened before the message node left the client appends ``not_sent``, so a retry may
send it; one that may have reached WhatsApp (no acknowledgement) leaves ``attempted``, exactly
like a crash.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import threading
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import structlog

from whatsappd.errors import ErrorCode
from whatsappd.protocol import EngineError
from whatsappd.timefmt import iso
from whatsappd.worker.durable import append_record, fsync_dir, parse_records

__all__ = [
    "SEND_LOG_COMPACT_BYTES",
    "SEND_LOG_FILE",
    "SEND_LOG_RETENTION_SECONDS",
    "SendLog",
    "SendLogCorrupt",
    "read_send_log",
]

#: The engine's durable send log, in the session directory (0600, one JSON object a line).
SEND_LOG_FILE = "outbox-log.jsonl"
#: At start-up a log bigger than this is rewritten with one line per outbox id, and without
#: the ids whose last line is older than SEND_LOG_RETENTION_SECONDS. The supervisor asks about
#: an interrupted send at the worker's next start, long before that.
SEND_LOG_COMPACT_BYTES = 4 * 1024 * 1024
SEND_LOG_RETENTION_SECONDS = 30 * 86400
_SEND_STATES = frozenset({"attempted", "sent", "not_sent"})


class SendLogCorrupt(Exception):
    """A complete line of the send log is not a send record: nothing can be decided from it."""


def _parse_time(value: Any) -> float | None:
    if not isinstance(value, str):
        return None
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def _is_send_record(record: dict[str, Any]) -> bool:
    return (
        isinstance(record.get("outbox_id"), str)
        and record.get("state") in _SEND_STATES
        and (record["state"] != "sent" or isinstance(record.get("wa_id"), str))
    )


def _parse_send_log(data: bytes, path: Path) -> tuple[list[dict[str, Any]], int]:
    """The records of a send log and the length of its complete lines (a torn tail is left out)."""
    return parse_records(data, path, _is_send_record, SendLogCorrupt)


def read_send_log(session_dir: Path) -> list[dict[str, Any]]:
    """Every complete record of a session's send log, oldest first ([] if none). SendLogCorrupt."""
    path = Path(session_dir) / SEND_LOG_FILE
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return []
    return _parse_send_log(data, path)[0]


def _status_of(record: dict[str, Any] | None) -> dict[str, Any]:
    if record is None or record["state"] == "not_sent":
        return {"state": "unknown"}
    if record["state"] == "sent":
        return {"state": "sent", "wa_id": record["wa_id"], "timestamp": record.get("timestamp")}
    return {"state": "attempted"}


class SendLog:
    """What this session handed to WhatsApp, one fsync'ed JSON line per step.

    Records: ``{"outbox_id", "state": "attempted", "at"}`` right before ``send_message``,
    ``{"outbox_id", "state": "sent", "wa_id", "timestamp"}`` right after it, and
    ``{"outbox_id", "state": "not_sent", "code", "at"}`` when the call failed before the message
    node left the client. An outbox id's state is its ``sent`` record if it has one, else its
    last record. A torn last line (a crash in the middle of an append) is cut off when the log is
    first read: it can only be a record whose step is therefore undone, and the one before it
    ("attempted") still says what can be known. A corrupt complete line makes every send and
    status question fail (transient ``send_log_unusable``) rather than risk a duplicate.

    Thread-safe. Loaded on first use (a file read: it works before the client connects), then
    kept as an in-memory index.
    """

    def __init__(self, session_dir: Path, clock: Callable[[], float] = time.time) -> None:
        self.path = Path(session_dir) / SEND_LOG_FILE
        self._clock = clock
        self._lock = threading.Lock()
        self._loaded = False
        self._state: dict[str, dict[str, Any]] = {}
        self._in_flight: set[str] = set()
        self._log = structlog.get_logger("whatsappd.worker.neonize.engine")

    # -------------------------------------------------------------- reading

    def load(self) -> None:
        """Read the log once (cutting a torn tail, compacting a big log); SendLogCorrupt, OSError."""
        with self._lock:
            self._load_locked()

    def _load_locked(self) -> None:
        if self._loaded:
            return
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            data = b""
        records, complete = _parse_send_log(data, self.path)
        if len(data) > complete:
            self._log.warning("send_log_torn_tail_cut", path=str(self.path), bytes=len(data) - complete)
            os.truncate(self.path, complete)
        state: dict[str, dict[str, Any]] = {}
        for record in records:
            if state.get(record["outbox_id"], {}).get("state") != "sent":
                state[record["outbox_id"]] = record
        self._state = state
        if complete > SEND_LOG_COMPACT_BYTES:
            self._compact_locked()
        self._loaded = True

    def _compact_locked(self) -> None:
        """Rewrite the log: the deciding record of each outbox id younger than the retention."""
        horizon = self._clock() - SEND_LOG_RETENTION_SECONDS
        kept = {
            outbox_id: record
            for outbox_id, record in self._state.items()
            if (_parse_time(record.get("timestamp") or record.get("at")) or horizon) >= horizon
        }
        fd, tmp = tempfile.mkstemp(prefix=f".{SEND_LOG_FILE}.", suffix=".tmp", dir=self.path.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                os.fchmod(f.fileno(), 0o600)
                for record in kept.values():
                    f.write(json.dumps(record, separators=(",", ":"), ensure_ascii=False).encode() + b"\n")
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
            fsync_dir(self.path.parent)
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            self._log.warning("send_log_compaction_failed", error=str(exc))
            return
        self._log.info("send_log_compacted", kept=len(kept), dropped=len(self._state) - len(kept))
        self._state = kept

    def _ensure(self) -> None:
        try:
            self._load_locked()
        except (OSError, SendLogCorrupt) as exc:
            raise EngineError(
                ErrorCode.SEND_LOG_UNUSABLE, f"the session's send log cannot be read, so nothing is sent: {exc}"
            ) from None

    def status(self, outbox_id: str) -> dict[str, Any]:
        """``{"state": "sent", "wa_id", "timestamp"}``, ``{"state": "attempted"}`` or unknown."""
        with self._lock:
            self._ensure()
            return _status_of(self._state.get(outbox_id))

    def statuses(self, outbox_ids: list[str]) -> dict[str, dict[str, Any]]:
        with self._lock:
            self._ensure()
            return {outbox_id: _status_of(self._state.get(outbox_id)) for outbox_id in outbox_ids}

    # -------------------------------------------------------------- one send

    def reserve(self, outbox_id: str) -> dict[str, Any] | None:
        """Claim outbox_id for one send in this process.

        Returns the ``sent`` record if it was sent already (nothing is claimed). Raises
        ``send_interrupted`` (permanent) if a send of it was attempted and never confirmed, and
        ``send_in_progress`` (transient) if another thread is sending it right now.
        """
        with self._lock:
            self._ensure()
            record = self._state.get(outbox_id)
            if record is not None and record["state"] == "sent":
                return record
            if outbox_id in self._in_flight:  # (its "attempted" may be on disk already)
                raise EngineError(ErrorCode.SEND_IN_PROGRESS, "this message is being sent right now")
            if record is not None and record["state"] == "attempted":
                raise EngineError(
                    ErrorCode.SEND_INTERRUPTED,
                    "an earlier attempt to send this message was never confirmed (the worker stopped or "
                    "WhatsApp did not answer): it may have been delivered, so it is not sent again",
                    permanent=True,
                )
            self._in_flight.add(outbox_id)
            return None

    def release(self, outbox_id: str) -> None:
        with self._lock:
            self._in_flight.discard(outbox_id)

    def attempted(self, outbox_id: str) -> None:
        """Record (fsync'ed) that the network call is about to be made; send_failed if it cannot be."""
        record = {"outbox_id": outbox_id, "state": "attempted", "at": iso(self._clock())}
        with self._lock:
            try:
                append_record(self.path, record)
            except OSError as exc:
                raise EngineError(ErrorCode.SEND_FAILED, f"could not record the attempt; nothing was sent: {exc}") from None
            self._state[outbox_id] = record

    def sent(self, outbox_id: str, wa_id: str, timestamp: str) -> dict[str, Any]:
        """Record the confirmed send. A write failure is logged: the message is sent either way."""
        record = {"outbox_id": outbox_id, "state": "sent", "wa_id": wa_id, "timestamp": timestamp}
        with self._lock:
            self._state[outbox_id] = record
            try:
                append_record(self.path, record)
            except OSError as exc:
                self._log.error("send_log_write_failed", outbox_id=outbox_id, wa_id=wa_id, error=str(exc))
        return record

    def not_sent(self, outbox_id: str, code: str) -> None:
        """Record that the attempt provably failed before the message left (a retry may send it)."""
        record = {"outbox_id": outbox_id, "state": "not_sent", "code": code, "at": iso(self._clock())}
        with self._lock:
            try:
                append_record(self.path, record)
            except OSError as exc:  # "attempted" stays: a retry is refused rather than risked
                self._log.error("send_log_write_failed", outbox_id=outbox_id, error=str(exc))
                return
            self._state[outbox_id] = record


