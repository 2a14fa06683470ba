"""The fake WhatsApp's memory: the paired device (the session file), the send log that is the
"server" side of sending, and the "CDN" that incoming media is downloaded from.

Sending is one append + fsync of a JSON line {"outbox_id", "wa_id", "to", "kind", "text",
"caption", "filename", "mimetype", "size", "timestamp"} to SEND_LOG_FILE (0600) in the session
directory: once the line is there, the message was sent; if it is not, it was not. A send for
an outbox id already in the log sends nothing; the request is noted in DUPLICATES_FILE, so
duplicates stay visible across worker restarts (send_log_stats() reads them with no worker).
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import json
import logging
import os
import random
import re
import secrets
import threading
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from whatsappd.errors import ErrorCode
from whatsappd.protocol import EngineError
from whatsappd.sessionstore import (
    SIMULATOR_FILE,
    SimulatorDevice,
    read_simulator_store,
    simulator_session_state,
    simulator_store_bytes,
)
from whatsappd.simfiles import (  # the files' names and readers, shared with checkers and tests
    DUPLICATES_FILE,
    SEND_LOG_FILE,
    SendLogStats,
    parse_records,
    read_send_log,
    send_log_stats,
)
from whatsappd.worker.durable import append_record, write_private

__all__ = [
    "DUPLICATES_FILE",
    "MAX_INLINE_MEDIA",
    "MEDIA_DIR",
    "PRESENCE_LOG_FILE",
    "SEND_LOG_FILE",
    "SESSION_FILE",
    "SendLog",
    "SendLogStats",
    "SimulatorDevice",
    "decode_raw",
    "encode_raw",
    "has_session",
    "iso",
    "log_presence",
    "media_chunks",
    "now",
    "on_whatsapp",
    "read_send_log",
    "read_store",
    "send_log_stats",
    "session_state",
    "store_media",
    "wa_id",
    "write_store",
]

log = logging.getLogger("whatsappd.worker.simulator.engine")

#: The simulator's whole "store": the fake device, inside the company's session directory.
SESSION_FILE = SIMULATOR_FILE
#: One JSON line per chat presence ("typing…") shown before a send: {"to", "outbox_id", "state", "seconds", "timestamp"}.
PRESENCE_LOG_FILE = "simulator-presence.jsonl"
#: Bytes of incoming media too big to ride inline in the event's `raw`.
MEDIA_DIR = "simulator-media"
MAX_INLINE_MEDIA = 64 * 1024  # incoming media up to this size rides inside `raw`
#: Phone numbers whose digits end so are "not on WhatsApp" (send, check_number).
_NOT_ON_WHATSAPP = "0000"
_CHUNK = 1024 * 1024
_MEDIA_NAME = re.compile(r"[0-9a-f]{32}\.bin")


def now() -> datetime:
    return datetime.now(UTC)


def iso(moment: datetime) -> str:
    """ISO-8601 UTC with milliseconds and a Z, e.g. 2025-01-31T12:00:00.000Z."""
    return moment.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def wa_id() -> str:
    """A WhatsApp-web-like message id: 3EB0 and 16 uppercase hex digits."""
    return "3EB0" + secrets.token_hex(8).upper()


def log_presence(session_dir: Path, record: dict[str, Any]) -> None:
    """Note a chat presence the "server" was shown (fsync'ed: tests and benchmarks read it)."""
    append_record(session_dir / PRESENCE_LOG_FILE, record)


def on_whatsapp(phone: str) -> bool:
    """Whether the simulated WhatsApp has an account for phone (digits ending in 0000: no)."""
    return not phone.endswith(_NOT_ON_WHATSAPP)


# --------------------------------------------------------------------------- the device


def has_session(session_dir: Path) -> bool:
    """True if session_dir holds a simulator store with a paired device (never raises)."""
    return session_state(session_dir) == "paired"


def session_state(session_dir: Path) -> str:
    """'paired', 'none' (no store, or no device in it) or 'corrupt' (never raises)."""
    return str(simulator_session_state(session_dir))


def read_store(session_dir: Path) -> SimulatorDevice | None:
    """The stored device, None if there is none; ValueError if the store is corrupt."""
    return read_simulator_store(session_dir / SESSION_FILE)


def write_store(session_dir: Path, device: SimulatorDevice | None) -> None:
    """Replace the store atomically (temp file, fsync, rename, fsync dir); the file is 0600."""
    write_private(session_dir / SESSION_FILE, (simulator_store_bytes(device, iso(now())),), durable_name=True)


# --------------------------------------------------------------------------- the send log

class SendLog:
    """The simulator's "server": one fsync'ed JSON line per unique outbox id it sent.

    Recording a send and sending it are one step (append + fsync, under one lock), so the log
    is the truth about what "WhatsApp" received. Requests for an outbox id already in the log
    append nothing here; each is noted in DUPLICATES_FILE instead, so a duplicate stays visible
    across worker restarts.

    Several processes may share one log (`[simulator] server_dir`: the daemons of a cluster, and
    a replaced worker beside its successor): every look and every append holds an exclusive
    flock (of the log's directory), and first reads what other processes appended since (the index in
    memory grows by the new lines only). So "an outbox id already in the log" holds across them.
    """

    def __init__(self, session_dir: Path) -> None:
        self.path = session_dir / SEND_LOG_FILE
        self.duplicates_path = session_dir / DUPLICATES_FILE
        self._lock = threading.Lock()  # this process's threads; the flock is for other processes
        self._offset = 0  # bytes of the send log indexed
        self._dup_offset = 0  # bytes of the duplicates file counted
        self._by_outbox: dict[str, dict[str, Any]] = {}
        self._by_wa: dict[str, dict[str, Any]] = {}
        self._by_recipient: dict[str, int] = {}
        self._duplicates = 0

    def load(self) -> None:
        """Read the log (cutting off a torn last line); ValueError/OSError if unusable."""
        with self._lock, self._flocked():
            self._refresh()

    @contextlib.contextmanager
    def _flocked(self) -> Iterator[None]:
        """An exclusive flock of the log's directory (a lock that needs no file of its own)."""
        fd = os.open(self.path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the lock

    def _refresh(self) -> None:
        """Index what was appended since the last look (both locks held). A torn last line can
        only be a crashed writer's (appends hold the flock): it is cut off."""
        self._offset = self._read_new(self.path, self._offset, self._index)
        self._dup_offset = self._read_new(self.duplicates_path, self._dup_offset, self._count_duplicate)

    @staticmethod
    def _read_new(path: Path, offset: int, take: Callable[[dict[str, Any]], None]) -> int:
        try:
            with open(path, "rb") as f:
                f.seek(offset)
                data = f.read()
        except FileNotFoundError:
            return 0
        records, complete = parse_records(data, path, lambda record: isinstance(record.get("outbox_id"), str))
        if complete < len(data):
            log.warning("simulator: cutting a torn last line off %s", path)
            os.truncate(path, offset + complete)
        for record in records:
            take(record)
        return offset + complete

    @contextlib.contextmanager
    def _current(self) -> Iterator[None]:
        """Both locks, the index up to date; STORE_FAILED if the log is unusable."""
        with self._lock, self._flocked():
            try:
                self._refresh()
            except (OSError, ValueError) as exc:
                raise EngineError(ErrorCode.STORE_FAILED, f"the simulator's send log is unusable: {exc}") from None
            yield

    def _index(self, record: dict[str, Any]) -> None:
        self._by_outbox[record["outbox_id"]] = record
        self._by_wa[record["wa_id"]] = record
        self._by_recipient[record["to"]] = self._by_recipient.get(record["to"], 0) + 1

    def _count_duplicate(self, record: dict[str, Any]) -> None:
        self._duplicates += 1

    def by_outbox(self, outbox_id: str) -> dict[str, Any] | None:
        with self._current():
            return self._by_outbox.get(outbox_id)

    def by_wa(self, wa_id: str) -> dict[str, Any] | None:
        with self._current():
            return self._by_wa.get(wa_id)

    def duplicate(self, outbox_id: str) -> dict[str, Any] | None:
        """If outbox_id was sent already: note the duplicate request, return the original."""
        with self._current():
            return self._duplicate_locked(outbox_id)

    def _duplicate_locked(self, outbox_id: str) -> dict[str, Any] | None:
        original = self._by_outbox.get(outbox_id)
        if original is None:
            return None
        try:
            append_record(self.duplicates_path, {"outbox_id": outbox_id, "wa_id": original["wa_id"],
                                                "timestamp": iso(now())})
            self._dup_offset = self.duplicates_path.stat().st_size
        except OSError as exc:  # the send itself is answered correctly; only the count suffers
            log.warning("simulator: could not note a duplicate send request: %s", exc)
        self._duplicates += 1
        log.warning("simulator: duplicate send request for %s (nothing sent again)", outbox_id)
        return original

    def send(self, record: dict[str, Any]) -> tuple[dict[str, Any], bool]:
        """Record (= send) record unless its outbox id is there already; (record, was_duplicate)."""
        with self._current():
            original = self._duplicate_locked(record["outbox_id"])
            if original is not None:
                return original, True
            try:
                append_record(self.path, record)
                self._offset = self.path.stat().st_size
            except OSError as exc:
                raise EngineError(ErrorCode.SEND_FAILED, f"could not record the send: {exc}") from None
            self._index(record)
            return record, False

    def stats(self) -> SendLogStats:
        with self._current():
            return SendLogStats(len(self._by_outbox), self._duplicates, dict(self._by_recipient))


# --------------------------------------------------------------------------- the media "CDN"


def encode_raw(doc: dict[str, Any]) -> str:
    return base64.b64encode(json.dumps(doc, separators=(",", ":")).encode()).decode("ascii")


def decode_raw(raw: Any) -> dict[str, Any] | None:
    """The media document behind an incoming event's raw, None if the simulator did not make it."""
    if not isinstance(raw, str) or len(raw) > 4 * MAX_INLINE_MEDIA:
        return None
    try:
        doc = json.loads(base64.b64decode(raw, validate=True))
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(doc, dict) or doc.get("sim_media") != 1:
        return None
    size, mimetype = doc.get("size"), doc.get("mimetype")
    if isinstance(size, bool) or not isinstance(size, int) or size < 0 or not isinstance(mimetype, str):
        return None
    sources = [key for key in ("data_b64", "file", "seed") if key in doc]
    if len(sources) != 1:
        return None
    if "file" in doc and (not isinstance(doc["file"], str) or _MEDIA_NAME.fullmatch(doc["file"]) is None):
        return None
    if "seed" in doc and (isinstance(doc["seed"], bool) or not isinstance(doc["seed"], int)):
        return None
    if "data_b64" in doc and not isinstance(doc["data_b64"], str):
        return None
    return doc


def _generated_chunks(seed: int, size: int) -> Iterator[bytes]:
    """size reproducible pseudo-random bytes (the same seed always gives the same bytes)."""
    rng = random.Random(seed)
    left = size
    while left > 0:
        n = min(left, _CHUNK)
        yield rng.randbytes(n)
        left -= n


def media_chunks(doc: dict[str, Any], session_dir: Path) -> Iterator[bytes]:
    """The bytes a media document stands for; media_unavailable if they are gone or altered."""
    unavailable = EngineError(ErrorCode.MEDIA_UNAVAILABLE, "the media of this message is no longer available",
                              permanent=True)
    if "seed" in doc:
        yield from _generated_chunks(doc["seed"], doc["size"])
        return
    if "data_b64" in doc:
        try:
            data = base64.b64decode(doc["data_b64"], validate=True)
        except ValueError:
            raise unavailable from None
        if len(data) != doc["size"]:
            raise unavailable
        yield data
        return
    try:
        with open(session_dir / MEDIA_DIR / doc["file"], "rb") as f:
            if os.fstat(f.fileno()).st_size != doc["size"]:
                raise unavailable
            while chunk := f.read(_CHUNK):
                yield chunk
    except OSError:
        raise unavailable from None




def store_media(session_dir: Path, data: bytes) -> str:
    """Keep incoming media too big for the event line in the session, like media on a CDN; its name."""
    directory = session_dir / MEDIA_DIR
    name = f"{secrets.token_hex(16)}.bin"
    try:
        directory.mkdir(mode=0o700, exist_ok=True)
        write_private(directory / name, iter((data,)))
    except OSError as exc:
        raise EngineError(ErrorCode.STORE_FAILED, f"could not keep the media: {exc}") from None
    return name
