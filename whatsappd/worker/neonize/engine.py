"""The real engine: one neonize (whatsmeow) client in this worker process.

This is the only module of whatsappd that imports neonize. The worker main imports it only when
the engine is neonize, after configuring logging. docs/neonize-notes.md lists the facts about
neonize 0.5.2 this code relies on; the important ones:

- ``NewClient.connect()`` blocks until the Go side is stopped. It runs here in a daemon thread;
  run() waits on an Event in the caller's thread, so signals keep working and run() can return
  even when the Go call never does.
- While the first dial is in progress (and during whatsmeow's own reconnect dials) any Go call
  that takes whatsmeow's socket lock (``stop()``, ``disconnect()``) blocks the caller for as
  long as the dial lasts, which is forever against a silent peer. So stop() never calls Go:
  run() does, from a helper thread, with a bounded wait, and only once the socket was up.
- In the QR flow, neonize delivers no event to Python until the QR loop ends; QR codes come
  through the QR callback and the loop's outcome ("success", "timeout", "err-...") through the
  login-status callback, which neonize only print()s. The engine installs its own.
- After a QR timeout, a pairing error, or a stop() during pairing, neonize's ``Neonize()`` Go
  call never returns and its thread is not a daemon: the worker must leave with ``os._exit``.

- whatsmeow's proxy is always the worker's SOCKS5 relay (relay.py), never the company's proxy
  directly: the relay holds every connect to the chat server at the connect gate (gate.py), so
  whatsmeow's own reconnects after a live drop are paced by the supervisor's global limiter
  like any worker start (neonize 0.5.2 offers no hook on them). Deciding the end closes the
  gate: a reconnect held there then fails at once.

Every handler takes the real neonize event object, so the decisions (messages and exit code)
are testable without a network: ``engine.on_logged_out(client, LoggedOutEv())``.

Never log QR codes, pairing codes, keys or message bodies at info or above: whatsmeow's own
debug log prints QR codes, so its level is held at INFO unless ``whatsmeow_debug`` is set.

Messaging (issue 4; contract in docs/INTERNALS.md, facts in docs/neonize-notes.md):

- ``send`` keeps a durable send log, ``outbox-log.jsonl`` in the session directory (see SendLog):
  ``attempted`` is appended and fsync'ed right before the one network call that can deliver the
  message (``send_message``), ``sent`` with WhatsApp's id right after it. An outbox id already
  ``sent`` is answered from the log; one left ``attempted`` by a previous process is never sent
  again (``send_interrupted``). A failure that provably happened before the message node left
  the client appends ``not_sent``, so a retry may send it; one that may have reached WhatsApp
  (no acknowledgement) leaves ``attempted``, exactly like a crash.
- Incoming messages and receipts are turned into ``event`` messages by incoming_event() and
  receipt_event(), pure functions of the real neonize event objects.
- Every call into Go goes through a gate: messaging calls share it, and ``Stop()`` (which
  removes the client from Go's unlocked map), ``Logout`` and ``PairPhone`` take it alone, so no
  messaging call ever runs on a client id Go has already forgotten.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import ctypes
import io
import json
import logging
import os
import re
import shutil
import sqlite3
import subprocess
import tempfile
import threading
import time
import urllib.parse
import warnings
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import structlog

from whatsappd.errors import ErrorCode
from whatsappd.protocol import ExitCode
from whatsappd.timefmt import iso
from whatsappd.worker.durable import append_record, fsync_dir, write_private
from whatsappd.worker.engine import Emit, Engine, EngineError, EngineOptions
from whatsappd.worker.media import MEDIA_LIMITS, media_chunks
from whatsappd.worker.relay import Relay


def _import_neonize() -> None:
    """Import neonize without letting its import side effects leak into the process.

    ``import neonize`` calls ``logging.basicConfig(level=INFO)`` (a no-op once the worker main
    configured logging, but not in tests) and runs ``os.popen("uname -a").read()`` twice without
    closing the pipe (a ResourceWarning, and a zombie reaped later). Both are undone here: the
    root logger is restored, and os.popen is replaced for the import by a version that waits.
    """
    root = logging.getLogger()
    saved_level, saved_handlers = root.level, list(root.handlers)
    saved_popen = os.popen

    def closing_popen(cmd: str, mode: str = "r", buffering: int = -1) -> io.StringIO:
        result = subprocess.run(cmd, shell=True, capture_output=True, text=True, check=False)  # noqa: S602
        return io.StringIO(result.stdout)

    try:
        os.popen = closing_popen  # type: ignore[assignment]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ResourceWarning)
            import neonize.client  # noqa: F401  (loads the Go library)
    finally:
        os.popen = saved_popen
        root.setLevel(saved_level)
        for handler in list(root.handlers):
            if handler not in saved_handlers:
                root.removeHandler(handler)


_import_neonize()

import magic as _magic  # noqa: E402  (python-magic, a neonize dependency: its builders sniff with it)
import neonize.utils.ffmpeg as _neonize_ffmpeg  # noqa: E402
from google.protobuf.message import DecodeError  # noqa: E402
from neonize._binder import ProxySettings  # noqa: E402
from neonize.client import NewClient  # noqa: E402
from neonize.events import (  # noqa: E402
    ClientOutdatedEv,
    ConnectedEv,
    ConnectFailureEv,
    DisconnectedEv,
    KeepAliveRestoredEv,
    KeepAliveTimeoutEv,
    LoggedOutEv,
    MessageEv,
    PairStatusEv,
    ReceiptEv,
    StreamErrorEv,
    StreamReplacedEv,
    TemporaryBanEv,
)
from neonize.exc import (  # noqa: E402
    DownloadError,
    IsOnWhatsAppError,
    LogoutError,
    NeonizeError,
    PairPhoneError,
    SendMessageError,
    UploadError,
)
from neonize.proto.Neonize_pb2 import (  # noqa: E402
    JID,
    ConnectFailureReason,
    MessageSource,
    PairStatus,
    Receipt,
    TemporaryBan,
)
from neonize.proto.waE2E.WAWebProtobufsE2E_pb2 import AudioMessage  # noqa: E402
from neonize.proto.waE2E.WAWebProtobufsE2E_pb2 import Message as WAMessage  # noqa: E402
from neonize.utils.enum import ClientName, MediaType  # noqa: E402
from neonize.utils.jid import Jid2String  # noqa: E402
from neonize.utils.log import log as _neonize_go_level  # noqa: E402

# neonize warns on every connect that ffmpeg is missing. The engine needs none: it builds audio
# messages itself and asks ffprobe (when it is on PATH) only for the duration.
_neonize_ffmpeg._ffmpeg_checked = True

__all__ = [
    "MEDIA_LIMITS",
    "SEND_LOG_FILE",
    "STORE_FILE",
    "STORE_FILES",
    "NeonizeEngine",
    "SendLog",
    "SendLogCorrupt",
    "StoreUnusable",
    "classify_download_error",
    "classify_send_error",
    "connect_failure_exit",
    "incoming_event",
    "inspect_store",
    "is_store_error",
    "read_send_log",
    "receipt_event",
    "store_dsn",
]

#: The whatsmeow store inside a session directory, and every file SQLite keeps beside it (WAL).
STORE_FILE = "store.db"
STORE_FILES = (STORE_FILE, f"{STORE_FILE}-wal", f"{STORE_FILE}-shm")

FIRST_QR_SECONDS = 60  # whatsmeow: the first of 6 codes lives 60 s ...
NEXT_QR_SECONDS = 20  # ... the 5 others 20 s each
QR_WINDOW_SECONDS = FIRST_QR_SECONDS + 5 * NEXT_QR_SECONDS  # 160 s, then the socket is closed
PAIRING_DEADLINE_SECONDS = 170  # our own deadline in case the "timeout" status never comes
CONNECTED_AFTER_PAIR_SECONDS = 30  # pairing succeeded but no Connected: restart the worker
SHUTDOWN_SECONDS = 3.0  # how long run() waits for the Go side to stop before returning anyway

_PHONE = re.compile(r"[1-9][0-9]{6,14}")

# A NeonizeError from connect() that names the database, not the network.
_STORE_ERROR = re.compile(
    r"upgrade database|open database|not a database|malformed|unable to open|no such table|"
    r"failed to scan|database corrupt|disk I/O error",
    re.IGNORECASE,
)

_REASON = ConnectFailureReason
_LOGGED_OUT_REASONS = frozenset(
    {_REASON.Value("LOGGED_OUT"), _REASON.Value("MAIN_DEVICE_GONE"), _REASON.Value("UNKNOWN_LOGOUT")}
)
_BANNED_REASONS = frozenset({_REASON.Value("TEMP_BANNED")})
_OUTDATED_REASONS = frozenset({_REASON.Value("CLIENT_OUTDATED")})

# Exit codes a server event can force even after stop() or a transient failure was decided:
# they change what the supervisor must do with the session.
_SESSION_FATAL = frozenset({ExitCode.LOGGED_OUT, ExitCode.REPLACED, ExitCode.BANNED, ExitCode.OUTDATED})

# Terminal outcomes are told by the exit code alone, except a ban, whose expiry the code cannot
# carry: a `state` message `banned` with `until` comes first (as the simulator does).
_TERMINAL_STATE = {ExitCode.BANNED: "banned"}


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

    Raises StoreUnusable if SQLite cannot open or read it. Never creates the file.
    """
    path = Path(path)
    if not path.exists() and not path.is_symlink():
        return None
    uri = f"file:{urllib.parse.quote(str(path), safe='/')}?mode=rw"
    try:
        connection = sqlite3.connect(uri, uri=True, timeout=10)
        try:
            (has_table,) = connection.execute(
                "SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name = 'whatsmeow_device'"
            ).fetchone()
            if not has_table:
                return 0
            (devices,) = connection.execute("SELECT count(*) FROM whatsmeow_device").fetchone()
            return int(devices)
        finally:
            connection.close()
    except sqlite3.Error as exc:
        raise StoreUnusable(f"{path}: {exc}") from exc


def is_store_error(message: str) -> bool:
    """Whether a NeonizeError from connect() is about the SQLite store rather than the network."""
    return _STORE_ERROR.search(message) is not None and "dial" not in message


def connect_failure_exit(reason: int | None) -> ExitCode:
    """The exit code for a ConnectFailure reason (neonize's enum; None when unset)."""
    if reason in _LOGGED_OUT_REASONS:
        return ExitCode.LOGGED_OUT
    if reason in _BANNED_REASONS:
        return ExitCode.BANNED
    if reason in _OUTDATED_REASONS:
        return ExitCode.OUTDATED
    return ExitCode.TRANSIENT


def _iso(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def _jid_string(jid: JID | None) -> str | None:
    """whatsmeow's own form, device included: ``5511999999999:12@s.whatsapp.net``."""
    if jid is None or not jid.User:
        return None
    return str(Jid2String(jid))


def _enum_name(enum: Any, message: Any, field: str) -> str | None:
    if not message.HasField(field):
        return None
    try:
        return str(enum.Name(getattr(message, field))).lower()
    except ValueError:
        return None


def _redact_proxy(url: str | None) -> str | None:
    if not url:
        return url
    parts = urllib.parse.urlsplit(url)
    if parts.username is None and parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"***@{host}" + (f":{parts.port}" if parts.port else "")
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


# ====================================================================== messaging (issue 4)

#: The engine's durable send log, in the session directory (0600, one JSON object a line).
SEND_LOG_FILE = "outbox-log.jsonl"
#: At start-up a log bigger than this is rewritten with one line per outbox id, and without
#: the ids whose last line is older than SEND_LOG_RETENTION_SECONDS. The supervisor asks about
#: an interrupted send at the worker's next start, long before that.
SEND_LOG_COMPACT_BYTES = 4 * 1024 * 1024
SEND_LOG_RETENTION_SECONDS = 30 * 86400
#: The largest file `send` accepts per kind (the simulator's limits); bigger -> too_large.
SEND_KINDS = ("text", "image", "document", "audio")
MAX_TEXT = 65536
MAX_STATUS_IDS = 100_000
MAX_RAW_CHARS = 1024 * 1024  # an incoming media event's raw is a few hundred bytes
GATE_WAIT_SECONDS = 30.0  # how long a messaging call waits while logout / pairing holds Go alone

_USER_JID = re.compile(r"([1-9][0-9]{6,14})@s\.whatsapp\.net")
_GROUP_JID = re.compile(r"([0-9]{1,20}(?:-[0-9]{1,20})?)@g\.us")
_SEND_STATES = frozenset({"attempted", "sent", "not_sent"})

# ---------------------------------------------------------------- the send log


class SendLogCorrupt(Exception):
    """A complete line of the send log is not a send record: nothing can be decided from it."""


def _parse_time(value: Any) -> float | None:
    if not isinstance(value, str):
        return None
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def _parse_send_log(data: bytes, path: Path) -> tuple[list[dict[str, Any]], int]:
    """The records of a send log and the length of its complete lines (a torn tail is left out)."""
    complete = data.rfind(b"\n") + 1
    records: list[dict[str, Any]] = []
    for number, line in enumerate(data[:complete].splitlines(), 1):
        try:
            record = json.loads(line)
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise SendLogCorrupt(f"{path} line {number} is not JSON") from None
        if (
            not isinstance(record, dict)
            or not isinstance(record.get("outbox_id"), str)
            or record.get("state") not in _SEND_STATES
            or (record["state"] == "sent" and not isinstance(record.get("wa_id"), str))
        ):
            raise SendLogCorrupt(f"{path} line {number} is not a send record")
        records.append(record)
    return records, complete


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


# ---------------------------------------------------------------- error mapping
# neonize hands whatsmeow's errors over as text only (SendMessageError(str)); the patterns below
# are whatsmeow's own wording, each found in the shipped .so (docs/neonize-notes.md).

#: (pattern, code, permanent, may_have_reached_whatsapp)
_SEND_ERRORS: tuple[tuple[re.Pattern[str], ErrorCode, bool, bool], ...] = tuple(
    (re.compile(pattern), code, permanent, reached)
    for pattern, code, permanent, reached in (
        # the node was written (or may have been) and no acknowledgement came back
        (r"timed out waiting for message send response", ErrorCode.SEND_INTERRUPTED, True, True),
        (r"websocket disconnected before message send returned response", ErrorCode.SEND_INTERRUPTED, True, True),
        (r"^websocket not connected$", ErrorCode.SEND_INTERRUPTED, True, True),  # retryFrame: resend impossible
        # rejected before anything was sent
        (r"^no LID found for \S+ from server", ErrorCode.NOT_ON_WHATSAPP, True, False),
        (r"^failed to get group members: (that group does not exist|you're not participating in that group)",
         ErrorCode.INVALID_RECIPIENT, True, False),
        (r"^(message recipient must be a user JID with no device part|can't send message to unknown server|"
         r"sending to non-status broadcast lists)", ErrorCode.INVALID_RECIPIENT, True, False),
        (r"^(client is nil|the store doesn't contain a device JID)", ErrorCode.NOT_CONNECTED, False, False),
        (r"^failed to [^:]+(: [^:]+)*: (websocket not connected|websocket disconnected before info query)",
         ErrorCode.NOT_CONNECTED, False, False),
        (r"^failed to (get|send|encrypt|create|marshal|prepare)\b|^can't encrypt message|^proto:",
         ErrorCode.SEND_FAILED, False, False),
        # the server answered with an error code: it received the message and refused it
        (r"^server returned error \d+", ErrorCode.SEND_FAILED, False, False),
    )
)


def classify_send_error(text: str) -> tuple[ErrorCode, bool, bool]:
    """(code, permanent, may_have_reached_whatsapp) for a SendMessageError's text.

    Anything not known to have happened before the message node left is treated as possibly
    delivered: the message then fails with send_interrupted rather than risk a duplicate.
    """
    for pattern, code, permanent, reached in _SEND_ERRORS:
        if pattern.search(text):
            return code, permanent, reached
    return ErrorCode.SEND_INTERRUPTED, True, True


_DOWNLOAD_GONE = re.compile(
    r"download failed with status code (403|404|410)|no url present|didn't find any attachments|"
    r"unknown media type|invalid media hmac|hash of media|hash of unencrypted media|file too short|"
    r"does not start with slash|failed to decrypt file|invalid checksum"
)
_NOT_CONNECTED = re.compile(r"websocket not connected|websocket disconnected before|client is nil|"
                            r"the store doesn't contain a device JID")


def classify_download_error(text: str) -> tuple[ErrorCode, bool]:
    """(code, permanent) for a DownloadError's text."""
    if _DOWNLOAD_GONE.search(text):
        return ErrorCode.MEDIA_UNAVAILABLE, True
    if _NOT_CONNECTED.search(text):
        return ErrorCode.NOT_CONNECTED, False
    return ErrorCode.DOWNLOAD_FAILED, False


# ---------------------------------------------------------------- incoming messages and receipts

_PN_SERVER = "s.whatsapp.net"
_LID_SERVERS = frozenset({"lid", "hosted.lid"})
#: Chats whose messages are not conversations: contacts' status updates, broadcast lists,
#: channels.
_SKIPPED_SERVERS = frozenset({"broadcast", "newsletter"})
#: Containers whatsmeow normally opens itself (UnwrapRaw); opened again here in case.
_WRAPPERS = (
    "deviceSentMessage", "botInvokeMessage", "ephemeralMessage", "viewOnceMessage", "viewOnceMessageV2",
    "viewOnceMessageV2Extension", "lottieStickerMessage", "documentWithCaptionMessage", "editedMessage",
)
#: Message fields that are protocol plumbing, not something a person wrote: a message made of
#: these alone (key distribution, edits and deletions, reactions, poll votes, pins, ...) is skipped.
_PLUMBING = frozenset({
    "senderKeyDistributionMessage", "fastRatchetKeySenderKeyDistributionMessage", "messageContextInfo",
    "protocolMessage", "reactionMessage", "encReactionMessage", "pollUpdateMessage", "keepInChatMessage",
    "pinInChatMessage", "stickerSyncRmrMessage", "encEventResponseMessage", "encCommentMessage",
    "secretEncryptedMessage", "groupRootKeyShare", "rootSecretDistributeMessage", "messageHistoryNotice",
    "callLogMesssage", "bcallMessage", "placeholderMessage",
})
#: Media fields, the event kind, and the field the media goes under in `raw` (whatsmeow's
#: DownloadAny looks only at these five; a round video "ptv" is a VideoMessage).
_MEDIA = (
    ("imageMessage", "image", "imageMessage"),
    ("videoMessage", "video", "videoMessage"),
    ("ptvMessage", "video", "videoMessage"),
    ("audioMessage", "audio", "audioMessage"),
    ("documentMessage", "document", "documentMessage"),
    ("stickerMessage", "sticker", "stickerMessage"),
)
_DOWNLOADABLE = ("imageMessage", "videoMessage", "audioMessage", "documentMessage", "stickerMessage")
#: Heavy fields left out of `raw` (download needs none of them).
_RAW_DROP = ("JPEGThumbnail", "contextInfo", "pngThumbnail")
#: Receipt types reported for messages we sent; all others (our own devices' read-self and
#: played-self, sender, retry, server-error, inactive, peer, history sync) are skipped.
_RECEIPT_NAMES = {
    Receipt.ReceiptType.Value("DELIVERED"): "delivered",
    Receipt.ReceiptType.Value("READ"): "read",
    Receipt.ReceiptType.Value("PLAYED"): "played",
}


def _has_jid(message: Any, field: str) -> bool:
    return bool(message.HasField(field) and getattr(message, field).User)


def _plain_jid(jid: JID) -> str:
    """``user@server`` without agent or device: the form the CRM stores and sends to."""
    return f"{jid.User}@{jid.Server}" if jid.User else jid.Server


def _phone_first(jid: JID, alt: JID | None) -> JID:
    """A LID (WhatsApp's hidden id) replaced by the phone-number JID whatsmeow gave beside it."""
    if jid.Server in _LID_SERVERS and alt is not None and alt.User and alt.Server == _PN_SERVER:
        return alt
    return jid


def _source_jids(source: MessageSource) -> tuple[str, str]:
    """(chat, sender) of a message or receipt: plain JIDs, phone numbers rather than LIDs."""
    sender_alt = source.SenderAlt if _has_jid(source, "SenderAlt") else None
    sender = _phone_first(source.Sender, sender_alt)
    chat = source.Chat
    if chat.Server in _LID_SERVERS and not source.IsGroup:
        if source.IsFromMe:
            chat = _phone_first(chat, source.RecipientAlt if _has_jid(source, "RecipientAlt") else None)
        elif chat.User == source.Sender.User:
            chat = _phone_first(chat, sender_alt)
    return _plain_jid(chat), _plain_jid(sender)


def _unwrap(message: WAMessage) -> WAMessage:
    for _ in range(len(_WRAPPERS)):
        for field in _WRAPPERS:
            if message.HasField(field) and getattr(message, field).HasField("message"):
                message = getattr(message, field).message
                break
        else:
            return message
    return message


def _kind_of(message: WAMessage) -> tuple[str, str | None] | None:
    """(kind, media field or None) of a message; None if it is protocol plumbing only."""
    present = [field.name for field, _ in message.ListFields()]
    if not [name for name in present if name not in _PLUMBING]:
        return None
    if "conversation" in present or "extendedTextMessage" in present:
        return "text", None
    for field, kind, _ in _MEDIA:
        if field in present:
            return kind, field
    return "other", None


def _raw_media(message: WAMessage, field: str) -> str:
    """base64 of a Message holding only the media (what download_any needs), thumbnails left out."""
    target = next(raw_field for name, _, raw_field in _MEDIA if name == field)
    media = type(getattr(message, field))()
    media.CopyFrom(getattr(message, field))
    for heavy in _RAW_DROP:
        if heavy in media.DESCRIPTOR.fields_by_name:
            media.ClearField(heavy)
    raw = WAMessage()
    getattr(raw, target).CopyFrom(media)
    return base64.b64encode(raw.SerializeToString()).decode("ascii")


def incoming_event(ev: MessageEv, now: float | None = None) -> dict[str, Any] | None:
    """The ``message.incoming`` event for a neonize MessageEv, or None for one that is skipped.

    Skipped: protocol plumbing (see _PLUMBING: edits, deletions, reactions, key distribution, ...),
    status updates, broadcast lists and channels. Messages sent from the company's phone are kept,
    with ``from_me`` true. ``raw`` is there only for media.
    """
    info = ev.Info
    source = info.MessageSource
    if source.Chat.Server in _SKIPPED_SERVERS:
        return None
    message = ev.Message if ev.HasField("Message") else (ev.Raw if ev.HasField("Raw") else WAMessage())
    message = _unwrap(message)
    kinded = _kind_of(message)
    if kinded is None:
        return None
    kind, field = kinded
    chat, sender = _source_jids(source)
    millis = info.Timestamp
    when = millis / 1000 if millis > 0 else (time.time() if now is None else now)
    event: dict[str, Any] = {
        "type": "message.incoming",
        "id": info.ID,
        "chat": chat,
        "sender": sender,
        "push_name": info.Pushname or None,
        "timestamp": iso(when),
        "is_group": bool(source.IsGroup),
        "from_me": bool(source.IsFromMe),
        "kind": kind,
        "text": None,
        "media": None,
    }
    if kind == "text":
        event["text"] = message.conversation if message.HasField("conversation") else message.extendedTextMessage.text
    elif field is not None:
        media = getattr(message, field)
        event["media"] = {
            "mimetype": media.mimetype or None,
            "size": int(media.fileLength) if media.HasField("fileLength") else None,
            "caption": getattr(media, "caption", "") or None,
            "filename": getattr(media, "fileName", "") or None,
        }
        event["raw"] = _raw_media(message, field)
    return event


def receipt_event(ev: ReceiptEv, now: float | None = None) -> dict[str, Any] | None:
    """The ``message.receipt`` event for a neonize ReceiptEv, or None for one that is skipped.

    Only delivered, read and played, from the other side (a receipt of our own devices is
    skipped). An unset type is skipped too: neonize leaves it unset for types it does not map,
    and reading it would give DELIVERED, the enum's first value.
    """
    if not ev.HasField("Type") or ev.Type not in _RECEIPT_NAMES or not ev.MessageIDs:
        return None
    source = ev.MessageSource
    if source.IsFromMe or source.Chat.Server in _SKIPPED_SERVERS:
        return None
    chat, sender = _source_jids(source)
    seconds = ev.Timestamp
    return {
        "type": "message.receipt",
        "ids": list(ev.MessageIDs),
        "chat": chat,
        "sender": sender,
        "receipt": _RECEIPT_NAMES[ev.Type],
        "timestamp": iso(seconds if seconds > 0 else (time.time() if now is None else now)),
    }


# ---------------------------------------------------------------- arguments and files


def _send_arg(args: dict[str, Any], key: str, *, max_len: int | None, required: bool = False) -> str | None:
    """A string argument of `send` (None if absent); a bad one is a permanent invalid_argument."""
    value = args.get(key)
    if value is None and not required:
        return None
    if not isinstance(value, str) or not value or (max_len is not None and len(value) > max_len):
        limit = "" if max_len is None else f" of at most {max_len} characters"
        raise EngineError(ErrorCode.INVALID_ARGUMENT, f"'{key}' must be a non-empty string{limit}", permanent=True)
    return value


def _recipient(to: Any) -> JID:
    """The JID to send to; invalid_recipient (permanent) unless a phone JID or a group JID."""
    if isinstance(to, str):
        user = _USER_JID.fullmatch(to)
        if user is not None:
            return JID(User=user.group(1), Server=_PN_SERVER, Device=0, RawAgent=0, Integrator=0, IsEmpty=False)
        group = _GROUP_JID.fullmatch(to)
        if group is not None:
            return JID(User=group.group(1), Server="g.us", Device=0, RawAgent=0, Integrator=0, IsEmpty=False)
    raise EngineError(
        ErrorCode.INVALID_RECIPIENT,
        f"{to!r} is not a recipient JID (<phone digits>@s.whatsapp.net or <group id>@g.us)",
        permanent=True,
    )


def _decode_media_raw(raw: Any) -> tuple[WAMessage, Any]:
    """The Message behind an incoming media event's raw and its media part; media_unavailable."""
    unavailable = EngineError(ErrorCode.MEDIA_UNAVAILABLE, "'message' is not the raw of an incoming media message",
                              permanent=True)
    if not isinstance(raw, str) or not raw or len(raw) > MAX_RAW_CHARS:
        raise unavailable
    try:
        message = WAMessage.FromString(base64.b64decode(raw, validate=True))
    except (binascii.Error, ValueError, DecodeError):
        raise unavailable from None
    for field in _DOWNLOADABLE:
        if message.HasField(field):
            media = getattr(message, field)
            if media.mediaKey and (media.directPath or media.URL):
                return message, media
    raise unavailable


def _neonize_magic_mime(data: bytes) -> str:
    """The MIME type libmagic sees, as neonize's builders and upload() sniff it."""
    try:
        return str(_magic.from_buffer(data, mime=True))
    except Exception:  # noqa: BLE001
        return "application/octet-stream"


def _audio_seconds(data: bytes) -> int | None:
    """The duration ffprobe reads (None without ffprobe, or when it cannot tell)."""
    if shutil.which("ffprobe") is None:
        return None
    try:
        with _neonize_ffmpeg.FFmpeg(data) as ffmpeg:
            duration = ffmpeg.extract_info().format.duration
        return max(0, int(float(duration))) if duration is not None else None
    except Exception:  # noqa: BLE001 - the duration is a nicety
        return None


# ---------------------------------------------------------------- the Go gate


class _GoGate:
    """Who may call into Go now: messaging calls together, Stop/Logout/PairPhone alone.

    Go keeps neonize's clients in maps without locks: ``Stop()`` deletes from them while any
    other call reads them, and a call on a removed id dereferences nil. A waiting exclusive
    holder keeps new shared holders out, so a stop is never starved by a stream of sends.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._shared = 0
        self._exclusive = False
        self._waiting = 0

    def acquire_shared(self, timeout: float | None = None) -> bool:
        with self._cond:
            if not self._cond.wait_for(lambda: not self._exclusive and not self._waiting, timeout):
                return False
            self._shared += 1
            return True

    def release_shared(self) -> None:
        with self._cond:
            self._shared -= 1
            self._cond.notify_all()

    def acquire_exclusive(self, timeout: float | None = None) -> bool:
        with self._cond:
            self._waiting += 1
            try:
                ok = self._cond.wait_for(lambda: not self._exclusive and not self._shared, timeout)
            finally:
                self._waiting -= 1
            if ok:
                self._exclusive = True
            self._cond.notify_all()
            return ok

    def release_exclusive(self) -> None:
        with self._cond:
            self._exclusive = False
            self._cond.notify_all()

    @contextlib.contextmanager
    def exclusive(self) -> Iterator[None]:
        self.acquire_exclusive()
        try:
            yield
        finally:
            self.release_exclusive()


class NeonizeEngine(Engine):
    """One neonize client; see the module docstring for the threading rules it follows."""

    session_files = (STORE_FILE,)

    def __init__(
        self,
        options: EngineOptions,
        emit: Emit,
        *,
        whatsmeow_debug: bool = False,
        connect_timeout: float | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        super().__init__(options, emit)
        self._log = structlog.get_logger("whatsappd.worker.neonize.engine").bind(company=options.company)
        self._whatsmeow_debug = whatsmeow_debug
        self._connect_timeout = connect_timeout
        self._clock = clock
        self._lock = threading.RLock()  # engine state
        self._gate = _GoGate()  # Go calls: messaging shared; Stop, Logout, PairPhone alone
        self._done = threading.Event()
        self._exit: ExitCode | None = None
        self._reason: str | None = None
        self._ran = False
        self._returned = False
        self._phase = "idle"  # idle starting dialing pairing paired connected reconnecting ended
        self._socket_up = False  # something came from the server: Go calls no longer block on the dial
        self._stop_requested = False
        self._client: NewClient | None = None
        self._relay: Relay | None = None
        self._connect_thread: threading.Thread | None = None
        self._dial_started: float | None = None  # monotonic
        self._qr_count = 0
        self._pairing_started: float | None = None  # monotonic
        self._pairing_window_end: float | None = None  # wall clock
        self._paired_at: float | None = None  # monotonic
        self._login_succeeded = False  # the QR loop ended in "success": neonize's event loop runs
        self._jid: str | None = None
        self._push_name: str | None = None
        self._send_log = SendLog(options.session_dir, clock=clock)

    # ------------------------------------------------------------------ public facts

    @property
    def phase(self) -> str:
        return self._phase

    @property
    def exit_code(self) -> ExitCode | None:
        """The decided exit code (None while undecided)."""
        return self._exit

    @property
    def reason(self) -> str | None:
        return self._reason

    # ------------------------------------------------------------------ Engine interface

    def run(self) -> int:
        with self._lock:
            if self._ran:
                raise RuntimeError("NeonizeEngine.run() may be called only once")
            self._ran = True
            if self._exit is None:
                self._phase = "starting"
        self._emit_state("connecting")
        if not self._done.is_set():
            self._prepare_store()
        try:  # cut a torn tail now; a log that cannot be read only stops sending (send_log_unusable)
            self._send_log.load()
        except (OSError, SendLogCorrupt) as exc:
            self._log.error("send_log_unusable", error=str(exc))
        if not self._done.is_set():
            # whatsmeow dials only through the relay, which holds every attempt to the chat
            # server at the connect gate: its own reconnects after a drop included (relay.py).
            try:
                self._relay = Relay(self.options.proxy, self.options.gate, self._log).start()
            except (OSError, ValueError) as exc:
                self._log.error("relay_failed", error=str(exc))
                self._decide(ExitCode.TRANSIENT, "relay_failed")
        if not self._done.is_set():
            client = self._make_client()
            with self._lock:
                if not self._done.is_set():
                    self._client = client
                    self._phase = "dialing"
                    self._dial_started = time.monotonic()
                    self._connect_thread = threading.Thread(
                        target=self._connect, args=(client,), name="neonize-connect", daemon=True
                    )
                    self._connect_thread.start()
        while not self._done.wait(0.25):
            self._check_deadlines()
        self._shutdown_client()
        if self._relay is not None:
            self._relay.close()  # no new connections; open tunnels end with the process
        with self._lock:
            self._returned = True
            code = self._exit if self._exit is not None else ExitCode.TRANSIENT
            self._log.info("engine_finished", exit_code=int(code), exit_name=code.name, reason=self._reason)
            return int(code)

    def command(self, op: str, args: dict[str, Any]) -> dict[str, Any]:
        if not isinstance(args, dict):
            raise EngineError(ErrorCode.INVALID_ARGUMENT, "command arguments must be a JSON object")
        if op == "pair_phone":
            return self._pair_phone(args)
        if op == "logout":
            return self._logout()
        if op == "disconnect":
            self.stop()
            return {"disconnected": True}
        if op == "send":
            return self._send(args)
        if op == "send_status":
            return self._send_status(args)
        if op == "check_number":
            return self._check_number(args)
        if op == "download":
            return self._download(args)
        raise EngineError(ErrorCode.UNKNOWN_OP, f"the neonize engine has no operation {op!r}")

    def stop(self) -> None:
        """Ask run() to return STOPPED. Never calls into Go, so it never blocks."""
        with self._lock:
            self._stop_requested = True
        self._decide(ExitCode.STOPPED, "stop_requested")

    # ------------------------------------------------------------------ event handlers
    # Each takes the neonize client and the real event object, as neonize calls them.

    def on_qr(self, client: Any, data: bytes | str) -> None:
        """A QR code to show (neonize's QR callback; codes never reach the log)."""
        code = data.decode("utf-8", "replace") if isinstance(data, bytes) else str(data)
        with self._lock:
            if self._exit is not None:
                return
            self._socket_up = True
            self._qr_count += 1
            now = self._clock()
            first = self._pairing_started is None
            if first:
                self._pairing_started = time.monotonic()
                self._pairing_window_end = now + QR_WINDOW_SECONDS
            expires_at = _iso(now + (FIRST_QR_SECONDS if self._qr_count == 1 else NEXT_QR_SECONDS))
            if self._phase in ("idle", "starting", "dialing"):
                self._phase = "pairing"
                self._emit_state("pairing")
            self.emit({"type": "qr", "code": code, "expires_at": expires_at})
            index = self._qr_count
        self._log.info("qr_issued", index=index, expires_at=expires_at)

    def on_login_status(self, status: str) -> None:
        """The outcome of neonize's QR loop: "success", "timeout", "err-..." (whatsmeow's names)."""
        self._log.info("pairing_status", status=status)
        with self._lock:
            self._socket_up = True
            if status == "success":
                self._login_succeeded = True
                if self._phase in ("starting", "dialing", "pairing"):
                    self._phase = "paired"
                if self._paired_at is None:
                    self._paired_at = time.monotonic()
                return
            stopping = self._stop_requested
            started = self._pairing_started
        if status == "timeout":
            if stopping:
                return
            elapsed = None if started is None else time.monotonic() - started
            if elapsed is not None and elapsed >= QR_WINDOW_SECONDS - 10:
                self._decide(ExitCode.PAIRING_TIMEOUT, "qr_timeout")
            else:  # the server closed the socket before the QR codes ran out
                self._decide(ExitCode.TRANSIENT, "disconnected_while_pairing")
        elif status == "err-client-outdated":
            self._decide(ExitCode.OUTDATED, "client_outdated")
        elif status == "err-unexpected-state":
            self._decide(ExitCode.TRANSIENT, "pairing_unexpected_state")
        elif status == "error":
            self._decide(ExitCode.TRANSIENT, "pairing_error")
        elif status == "err-scanned-without-multidevice":
            self._log.warning("qr_scanned_without_multidevice")
        # anything else (passkey-request, passkey-confirmation, ...) only gets logged above

    def on_pair_status(self, client: Any, ev: PairStatusEv) -> None:
        if ev.Status == PairStatus.SUCCESS:
            jid = _jid_string(ev.ID if ev.HasField("ID") else None)
            with self._lock:
                self._socket_up = True
                if self._exit is not None:
                    return
                if self._phase not in ("connected", "reconnecting"):
                    self._phase = "paired"
                if self._paired_at is None:
                    self._paired_at = time.monotonic()
                if jid:
                    self._jid = jid
                self.emit({"type": "paired", "jid": jid})
            self._log.info("paired", jid=jid, platform=ev.Platform or None)
        else:
            self._log.warning("pairing_failed", error=ev.Error or None)
            self._decide(ExitCode.TRANSIENT, "pair_error")

    def on_connected(self, client: Any, ev: ConnectedEv) -> None:
        jid, push_name = self._whoami(client)
        with self._lock:
            self._socket_up = True
            if self._exit is not None:
                return
            if jid:
                self._jid = jid
            if push_name:
                self._push_name = push_name
            self._phase = "connected"
            self._paired_at = None
            self._emit_state("connected", jid=self._jid, push_name=self._push_name)
        self._log.info("connected", jid=self._jid)

    def on_disconnected(self, client: Any, ev: DisconnectedEv) -> None:
        self._lost("disconnected")

    def on_keepalive_timeout(self, client: Any, ev: KeepAliveTimeoutEv) -> None:
        self._log.warning("keepalive_timeout", error_count=ev.ErrorCount, last_success=ev.LastSuccess or None)
        self._lost("keepalive_timeout")

    def on_keepalive_restored(self, client: Any, ev: KeepAliveRestoredEv) -> None:
        with self._lock:
            if self._exit is not None or self._phase != "reconnecting":
                return
            self._phase = "connected"
            self._emit_state("connected", jid=self._jid, push_name=self._push_name)
        self._log.info("keepalive_restored")

    def on_logged_out(self, client: Any, ev: LoggedOutEv) -> None:
        reason = _enum_name(ConnectFailureReason, ev, "Reason") or "logged_out"
        self._log.warning("logged_out", reason=reason, on_connect=ev.OnConnect)
        self._decide(ExitCode.LOGGED_OUT, reason)

    def on_stream_replaced(self, client: Any, ev: StreamReplacedEv) -> None:
        self._log.warning("stream_replaced")
        self._decide(ExitCode.REPLACED, "stream_replaced")

    def on_temporary_ban(self, client: Any, ev: TemporaryBanEv) -> None:
        reason = _enum_name(TemporaryBan.TempBanReason, ev, "Code") or "temporary_ban"
        # neonize sends Expire as the ban's remaining duration in seconds, not a timestamp
        until = _iso(self._clock() + ev.Expire) if ev.Expire > 0 else None
        self._log.warning("temporary_ban", reason=reason, until=until)
        self._decide(ExitCode.BANNED, reason, until=until)

    def on_client_outdated(self, client: Any, ev: ClientOutdatedEv) -> None:
        self._log.error("client_outdated")
        self._decide(ExitCode.OUTDATED, "client_outdated")

    def on_connect_failure(self, client: Any, ev: ConnectFailureEv) -> None:
        reason_value = ev.Reason if ev.HasField("Reason") else None
        name = _enum_name(ConnectFailureReason, ev, "Reason") or "unknown"
        code = connect_failure_exit(reason_value)
        self._log.warning("connect_failure", reason=name, message=ev.Message or None, exit_name=code.name)
        if code is ExitCode.TRANSIENT:
            self._decide(code, f"connect_failure_{name}")
        elif code is ExitCode.BANNED:
            self._decide(code, name, until=None)
        else:
            self._decide(code, name)

    def on_stream_error(self, client: Any, ev: StreamErrorEv) -> None:
        # whatsmeow reconnects by itself after an unknown stream error; a Disconnected follows
        self._log.warning("stream_error", stream_error_code=ev.Code or None)

    def on_message(self, client: Any, ev: MessageEv) -> None:
        """An incoming message (or one sent from the company's phone): a message.incoming event.

        Emitted whatever the phase, even after the end was decided: whatsmeow has taken the
        message off the server, and the channel still carries it until the process exits.
        """
        event = incoming_event(ev, now=self._clock())
        if event is None:
            self._log.debug("message_skipped", message_id=ev.Info.ID or None)
            return
        self.emit({"type": "event", "event": event})
        self._log.debug("message_incoming", message_id=event["id"], kind=event["kind"], from_me=event["from_me"])

    def on_receipt(self, client: Any, ev: ReceiptEv) -> None:
        """Delivered / read / played for messages we sent: a message.receipt event."""
        event = receipt_event(ev, now=self._clock())
        if event is None:
            return
        self.emit({"type": "event", "event": event})
        self._log.debug("message_receipt", receipt=event["receipt"], count=len(event["ids"]))

    # ------------------------------------------------------------------ internals

    def _emit_state(self, state: str, **fields: Any) -> None:
        self.emit({"type": "state", "state": state, **fields})

    def _decide(self, code: ExitCode, reason: str, **state_fields: Any) -> bool:
        """Settle run()'s exit code (first decision wins, but see _SESSION_FATAL) and wake it."""
        with self._lock:
            if self._returned:
                return False
            if self._exit is not None and not (code in _SESSION_FATAL and self._exit not in _SESSION_FATAL):
                return False
            self._exit = code
            self._reason = reason
            self._phase = "ended"
            state = _TERMINAL_STATE.get(code)
            if state is not None:
                self._emit_state(state, reason=reason, **state_fields)
            self._done.set()
            self.options.gate.close()  # a reconnect held at the relay now fails at once
        self._log.info("exit_decided", exit_code=int(code), exit_name=code.name, reason=reason)
        return True

    def _lost(self, reason: str) -> None:
        """The connection dropped or stalled: whatsmeow reconnects by itself."""
        with self._lock:
            self._socket_up = True
            if self._exit is not None or self._phase != "connected":
                return
            self._phase = "reconnecting"
            self._emit_state("reconnecting", reason=reason)
        self._log.warning("reconnecting", reason=reason)

    def _whoami(self, client: Any) -> tuple[str | None, str | None]:
        device = None
        if self._gate.acquire_shared(timeout=1):
            try:
                with self._lock:
                    usable = self._exit is None
                if usable:
                    device = client.get_me()
            except Exception:  # noqa: BLE001 - fall back on what neonize cached
                device = None
            finally:
                self._gate.release_shared()
        if device is None or not device.HasField("JID"):
            device = getattr(client, "me", None) or device
        if device is None:
            return None, None
        jid = _jid_string(device.JID) if device.HasField("JID") else None
        return jid, (device.PushName or None)

    def _prepare_store(self) -> None:
        store = self.options.session_dir / STORE_FILE
        try:
            devices = inspect_store(store)
        except StoreUnusable as exc:
            self._log.error("store_unusable", error=str(exc))
            self._decide(ExitCode.STORE_UNUSABLE, "store_unusable")
            return
        if not self.options.pair and not devices:
            # whatsmeow pairs whenever the store holds no device; so does the simulator
            self._log.warning("no_session_to_restore", store_exists=devices is not None)

    def _make_client(self) -> NewClient:
        if not self._whatsmeow_debug:
            # whatsmeow logs QR codes and node dumps at debug: never let them out of Go
            level = max(logging.INFO, logging.getLogger("whatsmeow").getEffectiveLevel())
            _neonize_go_level.setLevel(level)
        client = NewClient(store_dsn(self.options.session_dir), uuid=self.options.company)
        finalizer = getattr(client, "_stop_finalizer", None)
        if finalizer is not None:
            finalizer.atexit = False  # Stop() at exit would block while a dial is in progress
        client.event.qr(self._guard(self.on_qr))  # also keeps neonize from printing the QR
        if hasattr(client, "_NewClient__onLoginStatus"):
            client._NewClient__onLoginStatus = self._raw_login_status
        else:  # pragma: no cover - a neonize release that renamed it
            self._log.warning("neonize_login_status_hook_missing")
        handlers: list[tuple[type, Callable[[Any, Any], None]]] = [
            (PairStatusEv, self.on_pair_status),
            (ConnectedEv, self.on_connected),
            (DisconnectedEv, self.on_disconnected),
            (KeepAliveTimeoutEv, self.on_keepalive_timeout),
            (KeepAliveRestoredEv, self.on_keepalive_restored),
            (LoggedOutEv, self.on_logged_out),
            (StreamReplacedEv, self.on_stream_replaced),
            (TemporaryBanEv, self.on_temporary_ban),
            (ClientOutdatedEv, self.on_client_outdated),
            (ConnectFailureEv, self.on_connect_failure),
            (StreamErrorEv, self.on_stream_error),
        ]
        for event_type, handler in handlers:
            client.event(event_type)(self._guard(handler))
        # a message that cannot be turned into an event is logged, not a reason to reconnect
        client.event(MessageEv)(self._guard_event(self.on_message))
        client.event(ReceiptEv)(self._guard_event(self.on_receipt))
        return client

    def _guard(self, handler: Callable[..., None]) -> Callable[..., None]:
        """Wrap a handler called from Go: an exception must not vanish into ctypes."""

        def guarded(*args: Any) -> None:
            try:
                handler(*args)
            except Exception:
                self._log.exception("engine_handler_failed", handler=handler.__name__)
                self._decide(ExitCode.TRANSIENT, "engine_error")

        return guarded

    def _guard_event(self, handler: Callable[..., None]) -> Callable[..., None]:
        """Wrap a message/receipt handler called from Go: log a failure and carry on."""

        def guarded(*args: Any) -> None:
            try:
                handler(*args)
            except Exception:
                self._log.exception("event_handler_failed", handler=handler.__name__)

        return guarded

    def _raw_login_status(self, uuid: Any, status: Any) -> None:
        try:
            text = ctypes.string_at(status).decode("utf-8", "replace") if status else ""
            self.on_login_status(text)
        except Exception:
            self._log.exception("engine_handler_failed", handler="on_login_status")
            self._decide(ExitCode.TRANSIENT, "engine_error")

    def _connect(self, client: NewClient) -> None:
        assert self._relay is not None
        proxy = ProxySettings(proxy_address=self._relay.url)
        self._log.info("dialing", proxy=_redact_proxy(self.options.proxy), pair=self.options.pair)
        try:
            client.connect(proxy)
        except NeonizeError as exc:
            message = str(exc)
            if is_store_error(message):
                self._log.error("store_unusable", error=message)
                self._decide(ExitCode.STORE_UNUSABLE, "store_unusable")
            else:
                self._log.warning("connect_failed", error=message)
                self._decide(ExitCode.TRANSIENT, "connect_failed")
        except Exception:
            self._log.exception("connect_crashed")
            self._decide(ExitCode.TRANSIENT, "connect_crashed")
        else:
            self._decide(ExitCode.TRANSIENT, "client_ended")

    def _check_deadlines(self) -> None:
        now = time.monotonic()
        with self._lock:
            phase = self._phase
            dial_started, pairing_started, paired_at = self._dial_started, self._pairing_started, self._paired_at
        if (
            phase == "dialing"
            and self._connect_timeout is not None
            and dial_started is not None
            and now - dial_started > self._connect_timeout
        ):
            self._decide(ExitCode.TRANSIENT, "connect_timeout")
        elif phase == "pairing" and pairing_started is not None and now - pairing_started > PAIRING_DEADLINE_SECONDS:
            self._decide(ExitCode.PAIRING_TIMEOUT, "qr_timeout")
        elif phase == "paired" and paired_at is not None and now - paired_at > CONNECTED_AFTER_PAIR_SECONDS:
            self._decide(ExitCode.TRANSIENT, "no_connection_after_pairing")

    def _shutdown_client(self) -> None:
        """Stop the Go client, waiting at most SHUTDOWN_SECONDS; skip it while the first dial runs."""
        with self._lock:
            client, socket_up, connect_thread = self._client, self._socket_up, self._connect_thread
            # connect() can end only from neonize's event loop, which a QR loop that did not
            # succeed never reaches (it waits forever for a device ID): then do not wait for it
            connect_can_end = self._pairing_started is None or self._login_succeeded
        if client is None or connect_thread is None:
            return
        connect_thread.join(0.2)  # a failed connect() is usually finishing right now
        if not connect_thread.is_alive():
            return
        if not socket_up:
            self._log.info("dial_abandoned")  # Stop() would block until the dial ends
            return
        deadline = time.monotonic() + SHUTDOWN_SECONDS

        def stop_go() -> None:
            if not self._gate.acquire_exclusive(timeout=SHUTDOWN_SECONDS):
                return  # a send or download still runs in Go: the process ends with os._exit
            try:
                client.stop()
            except Exception:  # noqa: BLE001
                self._log.debug("neonize_stop_failed", exc_info=True)
            finally:
                self._gate.release_exclusive()

        stopper = threading.Thread(target=stop_go, name="neonize-stop", daemon=True)
        stopper.start()
        stopper.join(max(0.0, deadline - time.monotonic()))
        if connect_can_end:
            connect_thread.join(max(0.0, deadline - time.monotonic()))
        self._log.debug("client_shutdown", go_stopped=not stopper.is_alive(), connect_ended=not connect_thread.is_alive())

    # ------------------------------------------------------------------ commands

    def _pair_phone(self, args: dict[str, Any]) -> dict[str, Any]:
        phone = args.get("phone")
        if not isinstance(phone, str) or _PHONE.fullmatch(phone) is None:
            raise EngineError(
                ErrorCode.INVALID_PHONE,
                "phone must be the number in international format, digits only (7 to 15, no '+' or leading 0)",
            )
        with self._lock:
            self._require_pairing()
            client = self._client
            window_end = self._pairing_window_end
        assert client is not None and window_end is not None
        with self._gate.exclusive():
            with self._lock:
                self._require_pairing()
            try:
                code = client.PairPhone(phone, True, ClientName.LINUX)
            except PairPhoneError as exc:
                raise EngineError(ErrorCode.PAIR_PHONE_FAILED, f"WhatsApp refused the phone-code pairing: {exc}") from exc
        self._log.info("pair_code_issued", expires_at=_iso(window_end))
        return {"code": code, "expires_at": _iso(window_end)}

    def _require_pairing(self) -> None:
        if (
            self._phase != "pairing"
            or self._client is None
            or self._pairing_window_end is None
            or self._clock() >= self._pairing_window_end
        ):
            raise EngineError(
                ErrorCode.NOT_PAIRING,
                "no pairing is in progress: a phone code can be asked for only while a QR code is shown",
            )

    def _logout(self) -> dict[str, Any]:
        with self._lock:
            if self._phase != "connected" or self._client is None:
                raise EngineError(ErrorCode.NOT_CONNECTED, "logout needs a connected session")
            client = self._client
        with self._gate.exclusive():
            with self._lock:
                if self._phase != "connected" or self._exit is not None:
                    raise EngineError(ErrorCode.NOT_CONNECTED, "logout needs a connected session")
            try:
                client.logout()
            except LogoutError as exc:
                message = str(exc)
                # whatsmeow unlinks on the server first, then deletes its rows: a failure of the
                # second step still leaves the device unlinked
                if not message.startswith("error deleting data from store"):
                    raise EngineError(ErrorCode.LOGOUT_FAILED, f"WhatsApp did not confirm the logout: {message}") from exc
                self._log.warning("logout_store_cleanup_failed", error=message)
        self._log.info("logged_out_on_request")
        self._decide(ExitCode.LOGGED_OUT, "logout_requested")
        return {"unlinked": True}

    # ------------------------------------------------------------------ messaging commands

    @contextlib.contextmanager
    def _go_call(self, what: str) -> Iterator[Any]:
        """The connected client, for Go calls that may run side by side (not_connected if none)."""
        if not self._gate.acquire_shared(timeout=GATE_WAIT_SECONDS):
            raise EngineError(ErrorCode.NOT_CONNECTED, f"{what} must wait: the client is logging out, pairing or stopping")
        try:
            yield self._connected_client(what)
        finally:
            self._gate.release_shared()

    def _connected_client(self, what: str) -> Any:
        with self._lock:
            if self._exit is not None or self._phase != "connected" or self._client is None:
                phase = "ending" if self._exit is not None else self._phase
                raise EngineError(ErrorCode.NOT_CONNECTED, f"{what} needs a live connection (the engine is {phase})")
            return self._client

    def _send(self, args: dict[str, Any]) -> dict[str, Any]:
        """Send one message, at most once per outbox id (see SendLog and docs/INTERNALS.md).

        Order: arguments (permanent errors), the send log (an id already sent is answered from it,
        without a connection), the connection, the media file, building and uploading the media,
        then ``attempted`` (fsync'ed), ``send_message``, ``sent``.
        """
        outbox_id = _send_arg(args, "outbox_id", max_len=256, required=True)
        assert outbox_id is not None
        to = _recipient(args.get("to"))
        kind = args.get("kind", "text")
        if kind not in SEND_KINDS:
            raise EngineError(ErrorCode.INVALID_ARGUMENT, f"'kind' must be one of {', '.join(SEND_KINDS)}", permanent=True)
        text = caption = filename = mimetype = media_path = None
        if kind == "text":
            text = _send_arg(args, "text", max_len=None, required=True)
            assert text is not None
            if len(text) > MAX_TEXT:
                raise EngineError(ErrorCode.TOO_LARGE, f"a text message has at most {MAX_TEXT} characters", permanent=True)
        else:
            caption = _send_arg(args, "caption", max_len=None)
            if caption is not None and len(caption) > MAX_TEXT:
                raise EngineError(ErrorCode.TOO_LARGE, f"a caption has at most {MAX_TEXT} characters", permanent=True)
            filename = _send_arg(args, "filename", max_len=255)
            mimetype = _send_arg(args, "mimetype", max_len=255)
            media_path = args.get("media_path")
            if not isinstance(media_path, str) or not media_path:
                raise EngineError(ErrorCode.MEDIA_INVALID, f"a {kind} message needs 'media_path'", permanent=True)

        previous = self._send_log.reserve(outbox_id)
        if previous is not None:
            self._log.warning("send_deduplicated", outbox_id=outbox_id, wa_id=previous["wa_id"])
            return {"wa_id": previous["wa_id"], "timestamp": previous["timestamp"]}
        try:
            self._connected_client("sending a message")  # before reading a big file for nothing
            data = None if media_path is None else b"".join(media_chunks(media_path, kind))
            with self._go_call("sending a message") as client:
                message = self._build_message(client, kind, data, text, caption, filename, mimetype)
                self._connected_client("sending a message")  # a stop may have come during the upload
                self._send_log.attempted(outbox_id)
                try:
                    response = client.send_message(to, message)
                except SendMessageError as exc:
                    code, permanent, reached = classify_send_error(str(exc))
                    self._log.warning("send_failed", outbox_id=outbox_id, code=code, error=str(exc),
                                      may_have_reached_whatsapp=reached)
                    if reached:
                        raise EngineError(
                            ErrorCode.SEND_INTERRUPTED,
                            f"WhatsApp did not confirm the send ({exc}); it may have been delivered, so it is not "
                            "sent again",
                            permanent=True,
                        ) from None
                    self._send_log.not_sent(outbox_id, code)
                    raise EngineError(code, f"WhatsApp did not take the message: {exc}", permanent) from None
                except Exception as exc:
                    self._log.exception("send_crashed", outbox_id=outbox_id)
                    raise EngineError(
                        ErrorCode.SEND_INTERRUPTED, f"the send ended in an unexpected error ({exc!r}); it may have been "
                        "delivered, so it is not sent again", permanent=True,
                    ) from None
            wa_id = str(response.ID)
            seconds = response.Timestamp if response.Timestamp > 0 else self._clock()
            record = self._send_log.sent(outbox_id, wa_id, iso(seconds))
            self._log.info("message_sent", outbox_id=outbox_id, wa_id=wa_id, kind=kind)
            return {"wa_id": record["wa_id"], "timestamp": record["timestamp"]}
        finally:
            self._send_log.release(outbox_id)

    def _build_message(
        self,
        client: Any,
        kind: str,
        data: bytes | None,
        text: str | None,
        caption: str | None,
        filename: str | None,
        mimetype: str | None,
    ) -> WAMessage:
        """The waE2E Message to send; media is uploaded here (nothing is sent to anyone yet).

        Captions are set after neonize's builders run, so neonize does not scan them for
        "@digits" mentions or "@…@g.us" group mentions (each of those costs an IQ); text is a
        plain ``conversation`` for the same reason (neonize's str path always builds an
        extendedTextMessage and parses mentions).
        """
        if kind == "text":
            return WAMessage(conversation=text)
        assert data is not None
        try:
            if kind == "image":
                # neonize uploads with the media type libmagic sniffs: anything it does not call an
                # image would be encrypted with document keys under an imageMessage (undownloadable)
                sniffed = _neonize_magic_mime(data)
                if not sniffed.startswith("image/"):
                    raise EngineError(ErrorCode.MEDIA_INVALID, f"the image file is not an image (it looks like {sniffed})",
                                      permanent=True)
                message = client.build_image_message(data)
                media = message.imageMessage
            elif kind == "document":
                message = client.build_document_message(data, filename=filename, mimetype=mimetype)
                media = message.documentMessage
            else:  # audio: neonize's builder needs ffprobe and sniffs the upload type; built here
                upload = client.upload(data, MediaType.MediaAudio)
                media = AudioMessage(
                    URL=upload.url,
                    directPath=upload.DirectPath,
                    fileEncSHA256=upload.FileEncSHA256,
                    fileLength=upload.FileLength,
                    fileSHA256=upload.FileSHA256,
                    mediaKey=upload.MediaKey,
                    mimetype=mimetype or _neonize_magic_mime(data),
                    PTT=False,
                )
                seconds = _audio_seconds(data)
                if seconds is not None:
                    media.seconds = seconds
                message = WAMessage(audioMessage=media)
        except EngineError:
            raise
        except UploadError as exc:
            text_ = str(exc)
            if "status code 413" in text_:
                raise EngineError(ErrorCode.TOO_LARGE, f"WhatsApp refused the upload: {exc}", permanent=True) from None
            if _NOT_CONNECTED.search(text_):
                raise EngineError(ErrorCode.NOT_CONNECTED, f"the media upload needs a live connection: {exc}") from None
            raise EngineError(ErrorCode.SEND_FAILED, f"the media upload failed, nothing was sent: {exc}") from None
        except NeonizeError as exc:
            raise EngineError(ErrorCode.SEND_FAILED, f"the media could not be prepared, nothing was sent: {exc}") from None
        except Exception as exc:  # PIL cannot decode the image, and the like
            raise EngineError(ErrorCode.MEDIA_INVALID, f"the {kind} file cannot be sent: {exc}", permanent=True) from None
        if caption is not None and kind in ("image", "document"):
            media.caption = caption
        if media.HasField("contextInfo") and media.contextInfo.ByteSize() == 0:
            media.ClearField("contextInfo")  # the builders leave empty mention lists behind
        return message

    def _send_status(self, args: dict[str, Any]) -> dict[str, Any]:
        """What the send log says of each outbox id (a file read: works before connecting)."""
        ids = args.get("outbox_ids")
        if not isinstance(ids, list) or len(ids) > MAX_STATUS_IDS or not all(isinstance(i, str) for i in ids):
            raise EngineError(ErrorCode.INVALID_ARGUMENT, f"'outbox_ids' must be a list of at most {MAX_STATUS_IDS} strings")
        return {"statuses": self._send_log.statuses(ids)}

    def _check_number(self, args: dict[str, Any]) -> dict[str, Any]:
        phone = args.get("phone")
        if not isinstance(phone, str) or _PHONE.fullmatch(phone) is None:
            raise EngineError(ErrorCode.INVALID_PHONE, "the phone number must be digits only in international format, "
                              "no '+' and no leading zero (e.g. 5511999999999)", permanent=True)
        with self._go_call("checking a number") as client:
            try:
                # whatsmeow wants the number with its "+" (it becomes the usync <contact> query)
                responses = list(client.is_on_whatsapp("+" + phone))
            except IsOnWhatsAppError as exc:
                message = str(exc)
                if message == "Function returned nothing.":  # neonize's words for an empty answer
                    responses = []
                elif _NOT_CONNECTED.search(message):
                    raise EngineError(ErrorCode.NOT_CONNECTED, f"checking a number needs a live connection: {exc}") from None
                else:
                    raise EngineError(ErrorCode.CHECK_FAILED, f"WhatsApp did not answer the number check: {exc}") from None
            match = next((r for r in responses if r.Query.lstrip("+") == phone), None)
            if match is None and len(responses) == 1:
                match = responses[0]
            on_whatsapp = bool(match is not None and match.IsIn)
            jid = self._phone_jid(client, match.JID, phone) if on_whatsapp and match is not None else None
        return {"phone": phone, "on_whatsapp": on_whatsapp, "jid": jid}

    def _phone_jid(self, client: Any, jid: JID, phone: str) -> str:
        """The phone-number JID of a number check's answer (whatsmeow asks in LID addressing mode)."""
        if jid.User and jid.Server == _PN_SERVER:
            return f"{jid.User}@{_PN_SERVER}"
        if jid.User and jid.Server in _LID_SERVERS:
            try:
                pn = client.get_pn_from_lid(JID(User=jid.User, Server=jid.Server, Device=0, RawAgent=0,
                                                Integrator=0, IsEmpty=False))
                if pn.User and pn.Server == _PN_SERVER:
                    return f"{pn.User}@{_PN_SERVER}"
            except NeonizeError:
                pass
        return f"{phone}@{_PN_SERVER}"

    def _download(self, args: dict[str, Any]) -> dict[str, Any]:
        """Write the bytes of an incoming media message (its event's raw) to path, 0600."""
        message, media = _decode_media_raw(args.get("message"))
        path = args.get("path")
        if not isinstance(path, str) or not path:
            raise EngineError(ErrorCode.INVALID_ARGUMENT, "'path' must be a file path")
        with self._go_call("downloading media") as client:
            try:
                data = client.download_any(message)
            except DownloadError as exc:
                code, permanent = classify_download_error(str(exc))
                raise EngineError(code, f"the media could not be downloaded: {exc}", permanent) from None
        if not isinstance(data, bytes | bytearray):
            raise EngineError(ErrorCode.MEDIA_UNAVAILABLE, "WhatsApp returned no bytes for this media", permanent=True)
        try:
            size = write_private(Path(path), (bytes(data),))
        except OSError as exc:
            raise EngineError(ErrorCode.DOWNLOAD_FAILED, f"could not write the media to {path}: {exc}") from None
        return {"path": path, "size": size, "mimetype": media.mimetype or "application/octet-stream"}
