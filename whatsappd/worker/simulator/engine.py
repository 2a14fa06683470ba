"""A fake WhatsApp: an engine with no network, for tests and for CRM developers without a phone.

From the supervisor's side it behaves like the real neonize engine: the same messages on the
channel, the same exit codes. It is driven with the `simulate` command, args {"action": A, ...}:

    scan [jid] [push_name] [connect=true]  pairing -> paired, session saved, connected
    drop [reason] [down=true] / restore    connected -> reconnecting -> connected (see below)
    logged_out | replaced | outdated       run() returns LOGGED_OUT | REPLACED | OUTDATED
    ban [seconds=3600] [reason]            state banned with until, then BANNED
    fail_connect                           run() returns TRANSIENT (before run(): its connect fails)
    crash [after=0]                        os._exit(70), no reply
    hang [after=0]                         SIGSTOP to the whole process: heartbeats stop too

    incoming [from] [text="hello"] [kind] [caption] [filename] [mimetype] [size | data]
             [group] [push_name] [id]      emit a message.incoming event; {"id"}
    receipt ids [receipt="delivered"] [chat] [sender]
                                           emit message.receipt (ids: WhatsApp or outbox ids)
    stats                                  {"sent", "duplicate_requests", "by_recipient"}
    burst count [text] [from] [rate]       count incoming text events at full speed, or paced at
                                           `rate` events/s; each carries emitted_at_ns; {"emitted"}

plus the real commands `pair_phone` {"phone"} and `logout` {}, and the messaging commands of
docs/INTERNALS.md: `send`, `send_status`, `check_number`, `download`.

Life of one engine (one worker process):

    starting --run()--> connecting --(connect delay)--+-- stored device --> connected
                                                      +-- no device ------> pairing
    pairing: QR codes rotate (first 60 s, then 20 s each, 6 in all), then PAIRING_TIMEOUT;
             `simulate scan` -> paired, session saved -> connecting (the 515 reconnect)
             -> connected
    connected --drop--> reconnecting --(a reconnect attempt succeeds)--> connected
    any phase: logged_out / replaced / ban / outdated / fail_connect / stop() end run()

Connection attempts, modelled on whatsmeow: every attempt (the first, the reconnect after
pairing, each reconnect after a drop) first passes the worker's connect gate, which asks the
supervisor for a token of its global connect-rate limiter (see whatsappd/worker/gate.py), then
takes WHATSAPPD_SIM_CONNECT_DELAY. After `drop` the engine reconnects by itself, like
whatsmeow: the first attempt at once, then after 1, 2, 3... times WHATSAPPD_SIM_RECONNECT_DELAY.
With `down=true` (the default) the network is down: attempts fail until `restore`, which brings
it back and starts the next attempt at once (still through the gate). `down=false` drops only
the connection: the first reconnect attempt succeeds. The state stays `reconnecting` during
attempts, as with whatsmeow.

Choices (documented for the worker main and the supervisor):

* The store decides, not `options.pair`, exactly like whatsmeow (which pairs whenever the store
  has no device): with `pair=False` and no stored device the simulator starts pairing rather
  than returning LOGGED_OUT; with `pair=True` and a stored device it restores the session.
* Terminal outcomes are told by the exit code only. The single exception is a ban: a
  `state` message `banned` with `until` precedes ExitCode.BANNED (the expiry is not in the code).
* Logging out (the phone unlinks, or the `logout` command) clears the device from the store
  but leaves the file in place, as whatsmeow deletes its device rows: the supervisor removes
  the session files; if it does not, the next start pairs anew instead of "restoring".
* A store that cannot be parsed makes run() return ExitCode.STORE_UNUSABLE.
* Environment variables (read when the engine is created) tune the timings; a bad value makes
  run() return ExitCode.BAD_INVOCATION:
    WHATSAPPD_SIM_QR_FIRST       seconds the first QR code is valid (60)
    WHATSAPPD_SIM_QR_NEXT        seconds every later code is valid (20)
    WHATSAPPD_SIM_QR_COUNT       codes before the pairing times out (6)
    WHATSAPPD_SIM_CONNECT_DELAY  seconds "connecting" takes (0.05); "inf" never connects,
                                 like a proxy that accepts and stays silent (stop() still works)
    WHATSAPPD_SIM_RECONNECT_DELAY  seconds added to the wait after each failed reconnect
                                 attempt (2, whatsmeow's)
    WHATSAPPD_SIM_FAIL_CONNECT_FILE  a path ("{company}" is replaced by the company id): while
                                 that file exists every connect attempt fails (TRANSIENT). It is
                                 checked at each attempt, so a test can let a company fail a few
                                 times, remove the file, and watch it connect.
    WHATSAPPD_SIM_SEND_DELAY     seconds each `send` takes (0); a drop or stop during it makes
                                 the send fail with not_connected, nothing sent
    WHATSAPPD_SIM_SEND_FAIL_FILE a path ("{company}" replaced): while it exists every `send`
                                 fails with send_failed (transient), nothing sent
    WHATSAPPD_SIM_AUTO_RECEIPTS  e.g. "delivered,read": after each successful send, these
                                 message.receipt events follow, always in the order delivered,
                                 read, played, each RECEIPT_DELAY after the one before
    WHATSAPPD_SIM_RECEIPT_DELAY  seconds between automatic receipts (0.05)
    WHATSAPPD_SIM_RECEIPTS_FIRST  "1": the automatic receipts go out before the send's reply
                                 (a receipt overtaking its send, which a real network can do)

Messaging (issue 4):

* The send log is the simulator's "server". Sending is one append + fsync of a JSON line
  {"outbox_id", "wa_id", "to", "kind", "text", "caption", "filename", "mimetype", "size",
  "timestamp"} to SEND_LOG_FILE (0600) in the session directory: once the line is there, the
  message was sent; if it is not, it was not. So `send_status` never answers "attempted".
  A `send` for an outbox id already in the log sends nothing and returns the first wa_id and
  timestamp; the request is noted in DUPLICATES_FILE, so `stats` (and send_log_stats() with
  no worker running) show duplicates across worker restarts. A torn last line (a crash in the
  middle of an append) is cut off when the engine starts; any other corrupt line makes run()
  return STORE_UNUSABLE, like a corrupt store.
* Phone numbers whose digits end in 0000 are not on WhatsApp (send: not_on_whatsapp,
  check_number: on_whatsapp false). Every well-formed group JID exists.
* `send` checks, in order: its arguments (permanent invalid_argument / invalid_recipient /
  too_large), the connection (not_connected), the send delay, the send-fail file (send_failed),
  duplicates, the recipient (not_on_whatsapp), the media file (permanent media_invalid /
  too_large, see MEDIA_LIMITS); then it sends.
* Incoming media: the event's `raw` is base64 of a small JSON document ({"sim_media": 1, ...})
  that `download` understands: the bytes inline (up to MAX_INLINE_MEDIA), a file in
  MEDIA_DIR in the session directory (bigger `data`), or a seed from which reproducible bytes
  of the given `size` are made up. Anything else is media_unavailable (permanent).
* Text events carry no `raw` key; media events always do.
* Receipts (automatic or `simulate receipt`) are emitted only while connected; an automatic
  one that falls due while the connection is down is lost.
"""

from __future__ import annotations

import base64
import heapq
import itertools
import json
import logging
import math
import os
import random
import re
import secrets
import signal
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from whatsappd.errors import ErrorCode
from whatsappd.protocol import ExitCode
from whatsappd.worker.durable import append_record, write_private
from whatsappd.worker.engine import Emit, Engine, EngineError, EngineOptions
from whatsappd.worker.media import MEDIA_LIMITS, media_chunks

__all__ = [
    "CRASH_EXIT_STATUS",
    "DEFAULT_CONTACT",
    "DEFAULT_GROUP",
    "DUPLICATES_FILE",
    "MAX_BURST",
    "MEDIA_DIR",
    "MEDIA_LIMITS",
    "PAIRING_CODE_ALPHABET",
    "RECEIPTS",
    "SEND_LOG_FILE",
    "SESSION_FILE",
    "SendLogStats",
    "SimulatorConfig",
    "SimulatorEngine",
    "has_session",
    "session_state",
    "read_send_log",
    "send_log_stats",
]

log = logging.getLogger(__name__)

#: The simulator's whole "store": the fake device, inside the company's session directory.
SESSION_FILE = "simulator.json"
_STORE_FORMAT = "whatsappd-simulator"
_STORE_VERSION = 1

#: whatsmeow's linking-code base32 alphabet (no 0, O, I, U).
PAIRING_CODE_ALPHABET = "123456789ABCDEFGHJKLMNPQRSTVWXYZ"

#: Exit status of `simulate crash` (EX_SOFTWARE): not an ExitCode, so the supervisor sees a crash.
CRASH_EXIT_STATUS = 70

_PHONE = re.compile(r"[1-9][0-9]{6,14}")  # E.164 digits, no "+", no leading zero
_DEFAULT_PUSH_NAME = "Simulator"

# Messaging (issue 4).
#: The "server" side of sending: one JSON line per unique outbox id sent, fsync'ed.
SEND_LOG_FILE = "simulator-sent.jsonl"
#: One JSON line per send request for an outbox id that was already sent (nothing sent again).
DUPLICATES_FILE = "simulator-duplicates.jsonl"
#: Bytes of incoming media too big to ride inline in the event's `raw`.
MEDIA_DIR = "simulator-media"
#: Receipt kinds, in the order they happen.
RECEIPTS = ("delivered", "read", "played")
#: The largest file `send` accepts per kind (WhatsApp's classic limits); bigger -> too_large.
#: Who `simulate incoming` comes from by default, and the group `group=true` means.
DEFAULT_CONTACT = "5511987654321"
DEFAULT_GROUP = "120363000000000001@g.us"
MAX_BURST = 100_000
#: Phone numbers whose digits end so are "not on WhatsApp" (send, check_number).
_NOT_ON_WHATSAPP = "0000"
_SEND_KINDS = ("text", "image", "document", "audio")
_INCOMING_KINDS = ("text", "image", "video", "audio", "document")
_DEFAULT_MIMETYPES = {
    "image": "image/jpeg",
    "video": "video/mp4",
    "audio": "audio/ogg; codecs=opus",
    "document": "application/octet-stream",
}
_DEFAULT_CONTACT_NAME = "Simulated Contact"
_DEFAULT_INCOMING_SIZE = 1024
_MAX_INCOMING_MEDIA = 100 * 1024 * 1024
MAX_INLINE_MEDIA = 64 * 1024  # incoming media up to this size rides inside `raw`
_MAX_TEXT = 65536
_MAX_IDS = 100_000
_CHUNK = 1024 * 1024
_USER_JID = re.compile(r"([1-9][0-9]{6,14})@s\.whatsapp\.net")
_GROUP_JID = re.compile(r"[0-9]{1,20}(?:-[0-9]{1,20})?@g\.us")
_MEDIA_NAME = re.compile(r"[0-9a-f]{32}\.bin")


def has_session(session_dir: Path) -> bool:
    """True if session_dir holds a simulator store with a paired device (never raises)."""
    return session_state(session_dir) == "paired"


def session_state(session_dir: Path) -> str:
    """'paired', 'none' (no store, or no device in it) or 'corrupt' (never raises)."""
    try:
        return "paired" if _read_store(session_dir / SESSION_FILE) is not None else "none"
    except (OSError, ValueError):
        return "corrupt"


# --------------------------------------------------------------------------- configuration


@dataclass(frozen=True)
class SimulatorConfig:
    """Timings and fault injection, from WHATSAPPD_SIM_* environment variables."""

    qr_first: float = 60.0
    qr_next: float = 20.0
    qr_count: int = 6
    connect_delay: float = 0.05
    reconnect_delay: float = 2.0
    fail_connect_file: str | None = None
    send_delay: float = 0.0
    send_fail_file: str | None = None
    auto_receipts: tuple[str, ...] = ()
    receipt_delay: float = 0.05
    receipts_first: bool = False

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> SimulatorConfig:
        """Parse the environment; raise ValueError naming the bad variable."""
        default = cls()
        fail_file = env.get("WHATSAPPD_SIM_FAIL_CONNECT_FILE") or None
        return cls(
            qr_first=_env_seconds(env, "WHATSAPPD_SIM_QR_FIRST", default.qr_first, allow_inf=False),
            qr_next=_env_seconds(env, "WHATSAPPD_SIM_QR_NEXT", default.qr_next, allow_inf=False),
            qr_count=_env_count(env, "WHATSAPPD_SIM_QR_COUNT", default.qr_count),
            connect_delay=_env_seconds(
                env, "WHATSAPPD_SIM_CONNECT_DELAY", default.connect_delay, allow_inf=True
            ),
            reconnect_delay=_env_seconds(
                env, "WHATSAPPD_SIM_RECONNECT_DELAY", default.reconnect_delay, allow_inf=False
            ),
            fail_connect_file=fail_file,
            send_delay=_env_seconds(env, "WHATSAPPD_SIM_SEND_DELAY", default.send_delay, allow_inf=False),
            send_fail_file=env.get("WHATSAPPD_SIM_SEND_FAIL_FILE") or None,
            auto_receipts=_env_receipts(env, "WHATSAPPD_SIM_AUTO_RECEIPTS"),
            receipt_delay=_env_seconds(
                env, "WHATSAPPD_SIM_RECEIPT_DELAY", default.receipt_delay, allow_inf=False
            ),
            receipts_first=env.get("WHATSAPPD_SIM_RECEIPTS_FIRST", "") == "1",
        )

    @property
    def pairing_window(self) -> float:
        """Seconds from the first QR code to the pairing timeout (160 with the defaults)."""
        return self.qr_first + self.qr_next * (self.qr_count - 1)


def _env_seconds(env: Mapping[str, str], name: str, default: float, *, allow_inf: bool) -> float:
    raw = env.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"{name}={raw!r} is not a number of seconds") from None
    if math.isnan(value) or value < 0 or (math.isinf(value) and not allow_inf):
        raise ValueError(f"{name}={raw!r} must be a finite number of seconds >= 0")
    return value


def _env_count(env: Mapping[str, str], name: str, default: int) -> int:
    raw = env.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"{name}={raw!r} is not a whole number") from None
    if value < 1:
        raise ValueError(f"{name}={raw!r} must be at least 1")
    return value


def _env_receipts(env: Mapping[str, str], name: str) -> tuple[str, ...]:
    """A comma-separated subset of RECEIPTS, returned in RECEIPTS order (delivered first)."""
    raw = env.get(name)
    if raw is None or raw.strip() == "":
        return ()
    wanted = {part.strip() for part in raw.split(",") if part.strip()}
    unknown = wanted - set(RECEIPTS)
    if unknown:
        raise ValueError(f"{name}={raw!r}: unknown receipt {min(unknown)!r}; known: {', '.join(RECEIPTS)}")
    return tuple(r for r in RECEIPTS if r in wanted)


# --------------------------------------------------------------------------- the store


@dataclass(frozen=True)
class _Device:
    jid: str
    push_name: str


def _read_store(path: Path) -> _Device | None:
    """The stored device, None if there is no store or no device; ValueError if corrupt."""
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
        or data.get("format") != _STORE_FORMAT
        or data.get("version") != _STORE_VERSION
    ):
        raise ValueError(f"{path} is not a version {_STORE_VERSION} simulator store")
    device = data.get("device")
    if device is None:
        return None
    if (
        not isinstance(device, dict)
        or not isinstance(device.get("jid"), str)
        or not isinstance(device.get("push_name"), str)
    ):
        raise ValueError(f"{path} holds a malformed device")
    return _Device(jid=device["jid"], push_name=device["push_name"])


def _write_store(path: Path, device: _Device | None) -> None:
    """Replace the store atomically (temp file, fsync, rename, fsync dir); the file is 0600."""
    data: dict[str, Any] = {"format": _STORE_FORMAT, "version": _STORE_VERSION, "device": None}
    if device is not None:
        data["device"] = {"jid": device.jid, "push_name": device.push_name, "paired_at": _iso(_now())}
    body = json.dumps(data, indent=2, ensure_ascii=False).encode() + b"\n"
    write_private(path, (body,), durable_name=True)


# --------------------------------------------------------------------------- the send log


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
    records, _ = _parse_jsonl(session_dir / SEND_LOG_FILE)
    return records


def send_log_stats(session_dir: Path) -> SendLogStats:
    """The send log's counts, read from disk: usable with no worker running (tests, benchmarks)."""
    records = read_send_log(session_dir)
    duplicates, _ = _parse_jsonl(session_dir / DUPLICATES_FILE)
    by_recipient: dict[str, int] = {}
    for record in records:
        by_recipient[record["to"]] = by_recipient.get(record["to"], 0) + 1
    return SendLogStats(len(records), len(duplicates), by_recipient)


def _parse_jsonl(path: Path) -> tuple[list[dict[str, Any]], int]:
    """The records of a JSON-lines file and the length of its complete lines (a torn tail is ignored)."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return [], 0
    complete = data.rfind(b"\n") + 1
    records: list[dict[str, Any]] = []
    for number, line in enumerate(data[:complete].splitlines(), 1):
        try:
            record = json.loads(line)
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise ValueError(f"{path} line {number} is not valid JSON") from None
        if not isinstance(record, dict) or not isinstance(record.get("outbox_id"), str):
            raise ValueError(f"{path} line {number} is not a send record")
        records.append(record)
    return records, complete


class _SendLog:
    """The simulator's "server": one fsync'ed JSON line per unique outbox id it sent.

    Recording a send and sending it are one step (append + fsync, under one lock), so the log
    is the truth about what "WhatsApp" received. Loaded once, then kept as an in-memory index.
    Requests for an outbox id already in the log append nothing here; each is noted in
    DUPLICATES_FILE instead, so a duplicate stays visible across worker restarts.
    """

    def __init__(self, session_dir: Path) -> None:
        self.path = session_dir / SEND_LOG_FILE
        self.duplicates_path = session_dir / DUPLICATES_FILE
        self._lock = threading.Lock()
        self._loaded = False
        self._by_outbox: dict[str, dict[str, Any]] = {}
        self._by_wa: dict[str, dict[str, Any]] = {}
        self._by_recipient: dict[str, int] = {}
        self._duplicates = 0

    def load(self) -> None:
        """Read the log once (cutting off a torn last line); ValueError/OSError if unusable."""
        with self._lock:
            self._load_locked()

    def _load_locked(self) -> None:
        if self._loaded:
            return
        records, complete = _parse_jsonl(self.path)
        if self.path.exists() and self.path.stat().st_size > complete:
            log.warning("simulator: cutting a torn last line off the send log %s", self.path)
            os.truncate(self.path, complete)
        duplicates, dup_complete = _parse_jsonl(self.duplicates_path)
        if self.duplicates_path.exists() and self.duplicates_path.stat().st_size > dup_complete:
            os.truncate(self.duplicates_path, dup_complete)
        for record in records:
            self._index(record)
        self._duplicates = len(duplicates)
        self._loaded = True

    def _ensure(self) -> None:
        try:
            self._load_locked()
        except (OSError, ValueError) as exc:
            raise EngineError(ErrorCode.STORE_FAILED, f"the simulator's send log is unusable: {exc}") from None

    def _index(self, record: dict[str, Any]) -> None:
        self._by_outbox[record["outbox_id"]] = record
        self._by_wa[record["wa_id"]] = record
        self._by_recipient[record["to"]] = self._by_recipient.get(record["to"], 0) + 1

    def by_outbox(self, outbox_id: str) -> dict[str, Any] | None:
        with self._lock:
            self._ensure()
            return self._by_outbox.get(outbox_id)

    def by_wa(self, wa_id: str) -> dict[str, Any] | None:
        with self._lock:
            self._ensure()
            return self._by_wa.get(wa_id)

    def duplicate(self, outbox_id: str) -> dict[str, Any] | None:
        """If outbox_id was sent already: note the duplicate request, return the original."""
        with self._lock:
            self._ensure()
            return self._duplicate_locked(outbox_id)

    def _duplicate_locked(self, outbox_id: str) -> dict[str, Any] | None:
        original = self._by_outbox.get(outbox_id)
        if original is None:
            return None
        try:
            append_record(self.duplicates_path, {"outbox_id": outbox_id, "wa_id": original["wa_id"],
                                                "timestamp": _iso(_now())})
        except OSError as exc:  # the send itself is answered correctly; only the count suffers
            log.warning("simulator: could not note a duplicate send request: %s", exc)
        self._duplicates += 1
        log.warning("simulator: duplicate send request for %s (nothing sent again)", outbox_id)
        return original

    def send(self, record: dict[str, Any]) -> tuple[dict[str, Any], bool]:
        """Record (= send) record unless its outbox id is there already; (record, was_duplicate)."""
        with self._lock:
            self._ensure()
            original = self._duplicate_locked(record["outbox_id"])
            if original is not None:
                return original, True
            try:
                append_record(self.path, record)
            except OSError as exc:
                raise EngineError(ErrorCode.SEND_FAILED, f"could not record the send: {exc}") from None
            self._index(record)
            return record, False

    def stats(self) -> SendLogStats:
        with self._lock:
            self._ensure()
            return SendLogStats(len(self._by_outbox), self._duplicates, dict(self._by_recipient))


# --------------------------------------------------------------------------- JIDs and media


def _user_jid(phone: str) -> str:
    return f"{phone}@s.whatsapp.net"


def _parse_recipient(to: Any) -> tuple[str, str | None]:
    """(jid, phone digits or None for a group); invalid_recipient (permanent) if malformed."""
    if isinstance(to, str):
        user = _USER_JID.fullmatch(to)
        if user is not None:
            return to, user.group(1)
        if _GROUP_JID.fullmatch(to) is not None:
            return to, None
    raise EngineError(
        ErrorCode.INVALID_RECIPIENT,
        f"{to!r} is not a recipient JID (<phone digits>@s.whatsapp.net or <group id>@g.us)",
        permanent=True,
    )


def _wa_id() -> str:
    """A WhatsApp-web-like message id: 3EB0 and 16 uppercase hex digits."""
    return "3EB0" + secrets.token_hex(8).upper()


def _encode_raw(doc: dict[str, Any]) -> str:
    return base64.b64encode(json.dumps(doc, separators=(",", ":")).encode()).decode("ascii")


def _decode_raw(raw: Any) -> dict[str, Any] | None:
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


def _media_chunks(doc: dict[str, Any], session_dir: Path) -> Iterator[bytes]:
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


# --------------------------------------------------------------------------- small helpers


def _now() -> datetime:
    return datetime.now(UTC)


def _iso(moment: datetime) -> str:
    """ISO-8601 UTC with milliseconds and a Z, e.g. 2025-01-31T12:00:00.000Z."""
    return moment.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _b64(nbytes: int) -> str:
    return base64.b64encode(secrets.token_bytes(nbytes)).decode("ascii")


def _pairing_code() -> str:
    chars = "".join(secrets.choice(PAIRING_CODE_ALPHABET) for _ in range(8))
    return f"{chars[:4]}-{chars[4:]}"


def _fake_jid(phone: str | None) -> str:
    number = phone or "5511" + "".join(secrets.choice("0123456789") for _ in range(9))
    return f"{number}:{secrets.randbelow(90) + 10}@s.whatsapp.net"


def _optional_str(args: dict[str, Any], key: str, *, max_len: int = 256) -> str | None:
    value = args.get(key)
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip() or len(value) > max_len:
        raise EngineError(ErrorCode.INVALID_ARGUMENT, f"'{key}' must be a non-empty string of at most {max_len} characters")
    return value


def _optional_seconds(args: dict[str, Any], key: str, default: float) -> float:
    value = args.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
        raise EngineError(ErrorCode.INVALID_ARGUMENT, f"'{key}' must be a number of seconds >= 0")
    return float(value)


def _send_arg(args: dict[str, Any], key: str, *, max_len: int | None, required: bool = False) -> str | None:
    """A string argument of `send` (None if absent); a bad one is a permanent invalid_argument."""
    value = args.get(key)
    if value is None and not required:
        return None
    if not isinstance(value, str) or not value or (max_len is not None and len(value) > max_len):
        limit = "" if max_len is None else f" of at most {max_len} characters"
        raise EngineError(ErrorCode.INVALID_ARGUMENT, f"'{key}' must be a non-empty string{limit}", permanent=True)
    return value


def _contact_jid(value: Any, key: str) -> str:
    """A person's JID from phone digits (a leading "+" allowed) or a …@s.whatsapp.net JID."""
    if isinstance(value, str):
        digits = value.removeprefix("+")
        if _PHONE.fullmatch(digits):
            return _user_jid(digits)
        if _USER_JID.fullmatch(value):
            return value
    raise EngineError(ErrorCode.INVALID_ARGUMENT, f"'{key}' must be phone digits or a …@s.whatsapp.net JID")


# --------------------------------------------------------------------------- the engine

# Phases (the engine's own; the supervisor sees the `state` messages).
_STARTING = "starting"
_CONNECTING = "connecting"
_PAIRING = "pairing"
_CONNECTED = "connected"
_RECONNECTING = "reconnecting"
_DONE = "done"


class SimulatorEngine(Engine):
    """A fake WhatsApp client: same messages and exit codes as the real engine, no network.

    Thread model: run() in the main thread; command() and stop() from another. All state is
    guarded by one Condition. Commands that change the state emit their messages themselves,
    while holding it, so by the time command() returns (and the worker main sends the reply)
    those messages are already out and in order. Timed transitions (connect delay, QR
    rotation, pairing timeout) are carried out by run(), which sleeps on the Condition.
    """

    name = "simulator"
    session_files = (SESSION_FILE,)

    def __init__(self, options: EngineOptions, emit: Emit, env: Mapping[str, str] | None = None) -> None:
        super().__init__(options, emit)
        self._cond = threading.Condition()
        self._config_error: str | None = None
        try:
            self.config = SimulatorConfig.from_env(os.environ if env is None else env)
        except ValueError as exc:
            self._config_error = str(exc)
            self.config = SimulatorConfig()
        self._store_path = options.session_dir / SESSION_FILE
        self._phase = _STARTING
        self._exit: ExitCode | None = None
        self._device: _Device | None = None
        self._connect_due: float | None = None  # monotonic; None = no dial under way (or stalled)
        self._fail_next_connect = False
        # Connection attempts: each waits for the gate in a dialer thread (see _dial).
        self._dial_episode = 0  # bumped when the phase moves on: a dialer of an older one quits
        self._dial_now = False  # restore: the waiting dialer skips what is left of its delay
        self._reconnect_errors = 0  # failed reconnect attempts since the drop (whatsmeow's count)
        self._network_down = False  # drop: reconnect attempts fail until restore
        # pairing
        self._qr_keys = ""  # noise, identity, adv secret: fixed for one pairing, like whatsmeow
        self._qr_emitted = 0
        self._qr_due = 0.0  # monotonic expiry of the current code
        self._pairing_deadline: datetime | None = None
        self._pair_phone: str | None = None
        # messaging: the send log has its own lock; receipts are due on a heap, emitted by one
        # thread (lock order: self._cond before self._receipt_cond, never the other way)
        self._log = _SendLog(options.session_dir)
        self._receipt_cond = threading.Condition()
        self._receipts_due: list[tuple[float, int, dict[str, Any]]] = []
        self._receipt_seq = itertools.count()
        self._receipt_thread: threading.Thread | None = None

    # ----------------------------------------------------------------- Engine interface

    def run(self) -> int:
        with self._cond:
            if self._config_error is not None:
                log.error("simulator: bad environment: %s", self._config_error)
                self._finish(ExitCode.BAD_INVOCATION)
                return self._exit_code()
            if self._exit is not None:  # stopped (or failed) before run() began
                return self._exit_code()
        try:
            device = _read_store(self._store_path)
            self._log.load()  # the "server's" memory of what was sent: needed before any send
        except (OSError, ValueError) as exc:
            log.error("simulator: session store unusable: %s", exc)
            with self._cond:
                self._finish(ExitCode.STORE_UNUSABLE)
                return self._exit_code()
        with self._cond:
            if self._exit is not None:
                return self._exit_code()
            self._device = device
            self._start_connecting()
            while self._exit is None:
                self._run_due_timers()
                if self._exit is None:
                    self._cond.wait(self._time_to_next_timer())
            return self._exit_code()

    def command(self, op: str, args: dict[str, Any]) -> dict[str, Any]:
        handler = self._OPS.get(op)
        if handler is None:
            raise EngineError(ErrorCode.UNKNOWN_OP, f"the simulator engine has no command {op!r}")
        if not isinstance(args, dict):
            raise EngineError(ErrorCode.INVALID_ARGUMENT, "command arguments must be a JSON object")
        return handler(self, args)

    def stop(self) -> None:
        with self._cond:
            self._finish(ExitCode.STOPPED)

    # ----------------------------------------------------------------- commands

    def _cmd_simulate(self, args: dict[str, Any]) -> dict[str, Any]:
        action = args.get("action")
        if not isinstance(action, str):
            raise EngineError(ErrorCode.INVALID_ARGUMENT, "'action' must be a string")
        handler = self._ACTIONS.get(action)
        if handler is None:
            raise EngineError(
                ErrorCode.UNKNOWN_ACTION,
                f"unknown simulate action {action!r}; known: {', '.join(sorted(self._ACTIONS))}",
            )
        # crash and hang act on the whole process, outside the lock (a lock held by a
        # stopped process would not matter, but a crash needs no state at all).
        # stats reads the send log in any phase, even after the end; burst emits outside the
        # lock (it takes it only to check the phase), so stop() stays prompt during a long burst.
        if action in ("crash", "hang", "stats", "burst"):
            return handler(self, args)
        with self._cond:
            if self._phase == _DONE:
                raise EngineError(ErrorCode.NOT_RUNNING, "the engine has already ended")
            try:
                return handler(self, args)
            finally:
                self._cond.notify_all()  # run() recomputes its next timer from the new phase

    def _cmd_pair_phone(self, args: dict[str, Any]) -> dict[str, Any]:
        phone = args.get("phone")
        if not isinstance(phone, str) or _PHONE.fullmatch(phone) is None:
            raise EngineError(
                ErrorCode.INVALID_PHONE,
                "the phone number must be digits only in international format, "
                "country code first, no '+' and no leading zero (e.g. 5511999999999)",
            )
        with self._cond:
            if self._phase != _PAIRING:
                raise EngineError(ErrorCode.NOT_PAIRING, "a pairing code can only be requested while pairing")
            self._pair_phone = phone
            assert self._pairing_deadline is not None
            return {"code": _pairing_code(), "expires_at": _iso(self._pairing_deadline)}

    def _cmd_logout(self, args: dict[str, Any]) -> dict[str, Any]:
        with self._cond:
            if self._phase != _CONNECTED:
                raise EngineError(ErrorCode.NOT_CONNECTED, "logging out needs a live connection")
            self._forget_device()
            self._finish(ExitCode.LOGGED_OUT)
            return {"unlinked": True}

    # ----------------------------------------------------------------- messaging commands

    def _cmd_send(self, args: dict[str, Any]) -> dict[str, Any]:
        """Send one message: argument errors, then connection, delay, fault file, dedupe, send.

        Every check that a retry cannot fix raises a permanent EngineError. The send itself is
        one append + fsync to the send log: once it is there, it was sent.
        """
        outbox_id = _send_arg(args, "outbox_id", max_len=256, required=True)
        assert outbox_id is not None
        to, phone = _parse_recipient(args.get("to"))
        kind = args.get("kind", "text")
        if kind not in _SEND_KINDS:
            raise EngineError(ErrorCode.INVALID_ARGUMENT, f"'kind' must be one of {', '.join(_SEND_KINDS)}",
                              permanent=True)
        text = caption = filename = mimetype = media_path = None
        if kind == "text":
            text = _send_arg(args, "text", max_len=None, required=True)
            assert text is not None
            if len(text) > _MAX_TEXT:
                raise EngineError(ErrorCode.TOO_LARGE, f"a text message has at most {_MAX_TEXT} characters",
                                  permanent=True)
        else:
            caption = _send_arg(args, "caption", max_len=None)
            if caption is not None and len(caption) > _MAX_TEXT:
                raise EngineError(ErrorCode.TOO_LARGE, f"a caption has at most {_MAX_TEXT} characters", permanent=True)
            filename = _send_arg(args, "filename", max_len=255)
            mimetype = _send_arg(args, "mimetype", max_len=255) or _DEFAULT_MIMETYPES[kind]
            media_path = args.get("media_path")
            if not isinstance(media_path, str) or not media_path:
                raise EngineError(ErrorCode.MEDIA_INVALID, f"a {kind} message needs 'media_path'", permanent=True)

        with self._cond:
            self._require_connected("sending a message")
            if self.config.send_delay > 0:  # the time the network takes; a drop or stop ends it
                self._cond.wait_for(lambda: self._phase != _CONNECTED, self.config.send_delay)
                self._require_connected("sending a message")
        if self._file_exists(self.config.send_fail_file):
            raise EngineError(ErrorCode.SEND_FAILED, "the send failed (simulated: the send-fail file exists)")
        original = self._log.duplicate(outbox_id)
        if original is not None:
            return {"wa_id": original["wa_id"], "timestamp": original["timestamp"]}
        if phone is not None and phone.endswith(_NOT_ON_WHATSAPP):
            raise EngineError(ErrorCode.NOT_ON_WHATSAPP, f"{phone} is not on WhatsApp", permanent=True)
        size = None if media_path is None else sum(map(len, media_chunks(media_path, kind)))  # the "upload"
        record = {
            "outbox_id": outbox_id,
            "wa_id": _wa_id(),
            "to": to,
            "kind": kind,
            "text": text,
            "caption": caption,
            "filename": filename,
            "mimetype": mimetype,
            "size": size,
            "timestamp": _iso(_now()),
        }
        record, duplicate = self._log.send(record)
        if not duplicate:
            self._schedule_receipts(record["wa_id"], record["to"])
        return {"wa_id": record["wa_id"], "timestamp": record["timestamp"]}

    def _cmd_send_status(self, args: dict[str, Any]) -> dict[str, Any]:
        """What the send log says of each outbox id: sent (never "attempted": a send is atomic)."""
        ids = args.get("outbox_ids")
        if not isinstance(ids, list) or len(ids) > _MAX_IDS or not all(isinstance(i, str) for i in ids):
            raise EngineError(ErrorCode.INVALID_ARGUMENT, f"'outbox_ids' must be a list of at most {_MAX_IDS} strings")
        statuses: dict[str, dict[str, Any]] = {}
        for outbox_id in ids:
            record = self._log.by_outbox(outbox_id)
            statuses[outbox_id] = (
                {"state": "unknown"} if record is None
                else {"state": "sent", "wa_id": record["wa_id"], "timestamp": record["timestamp"]}
            )
        return {"statuses": statuses}

    def _cmd_check_number(self, args: dict[str, Any]) -> dict[str, Any]:
        phone = args.get("phone")
        if not isinstance(phone, str) or _PHONE.fullmatch(phone) is None:
            raise EngineError(ErrorCode.INVALID_PHONE, "the phone number must be digits only in international "
                              "format, no '+' and no leading zero (e.g. 5511999999999)", permanent=True)
        with self._cond:
            self._require_connected("checking a number")
        on_whatsapp = not phone.endswith(_NOT_ON_WHATSAPP)
        return {"phone": phone, "on_whatsapp": on_whatsapp, "jid": _user_jid(phone) if on_whatsapp else None}

    def _cmd_download(self, args: dict[str, Any]) -> dict[str, Any]:
        """Write the bytes of an incoming media message (its event's raw) to path, 0600."""
        doc = _decode_raw(args.get("message"))
        if doc is None:
            raise EngineError(ErrorCode.MEDIA_UNAVAILABLE, "'message' is not the raw of a media message",
                              permanent=True)
        path = args.get("path")
        if not isinstance(path, str) or not path:
            raise EngineError(ErrorCode.INVALID_ARGUMENT, "'path' must be a file path")
        with self._cond:
            self._require_connected("downloading media")
        try:
            size = write_private(Path(path), _media_chunks(doc, self.options.session_dir))
        except OSError as exc:
            raise EngineError(ErrorCode.DOWNLOAD_FAILED, f"could not write the media to {path}: {exc}") from None
        return {"path": path, "size": size, "mimetype": doc["mimetype"]}

    _OPS: dict[str, Callable[[SimulatorEngine, dict[str, Any]], dict[str, Any]]] = {
        "simulate": _cmd_simulate,
        "pair_phone": _cmd_pair_phone,
        "logout": _cmd_logout,
        "send": _cmd_send,
        "send_status": _cmd_send_status,
        "check_number": _cmd_check_number,
        "download": _cmd_download,
    }

    # ----------------------------------------------------------------- simulate actions
    # Called with the lock held (except crash and hang); the engine is not done.

    def _act_scan(self, args: dict[str, Any]) -> dict[str, Any]:
        if self._phase != _PAIRING:
            raise EngineError(ErrorCode.NOT_PAIRING, "there is no QR code to scan: the engine is not pairing")
        jid = _optional_str(args, "jid") or _fake_jid(self._pair_phone)
        push_name = _optional_str(args, "push_name", max_len=64) or _DEFAULT_PUSH_NAME
        reconnect = args.get("connect", True)
        if not isinstance(reconnect, bool):
            raise EngineError(ErrorCode.INVALID_ARGUMENT, "'connect' must be true or false")
        device = _Device(jid=jid, push_name=push_name)
        try:
            _write_store(self._store_path, device)
        except OSError as exc:
            raise EngineError(ErrorCode.STORE_FAILED, f"could not save the session: {exc}") from None
        self._device = device
        self.emit({"type": "paired", "jid": jid})
        # The server forces one reconnect after pairing (515). connect=false simulates the
        # library failing to come back: "connecting" then stays until the supervisor acts.
        self._start_connecting(stall=not reconnect)
        return {"action": "scan", "jid": jid, "push_name": push_name}

    def _act_drop(self, args: dict[str, Any]) -> dict[str, Any]:
        if self._phase != _CONNECTED:
            raise EngineError(ErrorCode.NOT_CONNECTED, "only a connected engine can drop its connection")
        reason = _optional_str(args, "reason") or "simulated connection drop"
        down = args.get("down", True)
        if not isinstance(down, bool):
            raise EngineError(ErrorCode.INVALID_ARGUMENT, "'down' must be true or false")
        self._phase = _RECONNECTING
        self._network_down = down
        self._reconnect_errors = 0
        self.emit({"type": "state", "state": "reconnecting", "reason": reason})
        # Like whatsmeow after a live drop: the first reconnect attempt goes at once (through
        # the gate), later ones after 1, 2, 3... times the reconnect delay.
        self._dial()
        return {"action": "drop", "state": "reconnecting", "down": down}

    def _act_restore(self, args: dict[str, Any]) -> dict[str, Any]:
        if self._phase != _RECONNECTING:
            raise EngineError(ErrorCode.NOT_RECONNECTING, "only a dropped connection can be restored")
        self._network_down = False
        self._dial_now = True  # the next attempt starts now, once the gate lets it
        self._cond.notify_all()
        return {"action": "restore", "state": "reconnecting"}

    def _act_logged_out(self, args: dict[str, Any]) -> dict[str, Any]:
        self._forget_device()
        return self._end("logged_out", ExitCode.LOGGED_OUT)

    def _act_replaced(self, args: dict[str, Any]) -> dict[str, Any]:
        return self._end("replaced", ExitCode.REPLACED)

    def _act_ban(self, args: dict[str, Any]) -> dict[str, Any]:
        seconds = _optional_seconds(args, "seconds", 3600.0)
        reason = _optional_str(args, "reason") or "temporary ban (simulated)"
        until = _iso(_now() + timedelta(seconds=seconds))
        self.emit({"type": "state", "state": "banned", "reason": reason, "until": until})
        result = self._end("ban", ExitCode.BANNED)
        result["until"] = until
        return result

    def _act_outdated(self, args: dict[str, Any]) -> dict[str, Any]:
        return self._end("outdated", ExitCode.OUTDATED)

    def _act_fail_connect(self, args: dict[str, Any]) -> dict[str, Any]:
        if self._phase == _STARTING:  # run() has not begun: its first connect attempt fails
            self._fail_next_connect = True
            return {"action": "fail_connect", "exit_code": int(ExitCode.TRANSIENT)}
        # connecting: this attempt fails; pairing, connected, reconnecting: the connection is
        # lost for good. Either way the supervisor retries with backoff in a fresh process.
        return self._end("fail_connect", ExitCode.TRANSIENT)

    def _act_crash(self, args: dict[str, Any]) -> dict[str, Any]:
        """The process dies at once (status 70), no reply; `after` seconds delays it."""
        after = _optional_seconds(args, "after", 0.0)
        if after == 0:
            os._exit(CRASH_EXIT_STATUS)
        _daemon_timer(after, lambda: os._exit(CRASH_EXIT_STATUS))
        return {"action": "crash", "after": after}

    def _act_hang(self, args: dict[str, Any]) -> dict[str, Any]:
        """The whole process stops (SIGSTOP): no heartbeat, no replies, until SIGKILL/SIGCONT.

        The worker main heart-beats from its own thread, so blocking an engine thread would
        not look hung; stopping the process does, like a wedged Go runtime would.
        """
        after = _optional_seconds(args, "after", 0.0)
        if after == 0:
            os.kill(os.getpid(), signal.SIGSTOP)
            return {"action": "hang", "after": 0.0}  # reached only after a SIGCONT
        _daemon_timer(after, lambda: os.kill(os.getpid(), signal.SIGSTOP))
        return {"action": "hang", "after": after}

    def _act_incoming(self, args: dict[str, Any]) -> dict[str, Any]:
        """Someone writes to us: emit a message.incoming event; {"id": its WhatsApp id}."""
        self._require_connected("a message can only arrive on a live connection")
        event = self._incoming_event(args)
        self.emit({"type": "event", "event": event})
        return {"id": event["id"]}

    def _act_receipt(self, args: dict[str, Any]) -> dict[str, Any]:
        """Receipts for messages we sent: ids are WhatsApp ids or outbox ids (via the send log)."""
        self._require_connected("a receipt can only arrive on a live connection")
        receipt = args.get("receipt", "delivered")
        if receipt not in RECEIPTS:
            raise EngineError(ErrorCode.INVALID_ARGUMENT, f"'receipt' must be one of {', '.join(RECEIPTS)}")
        ids = args.get("ids")
        if (not isinstance(ids, list) or not ids or len(ids) > 1000
                or not all(isinstance(i, str) and i for i in ids)):
            raise EngineError(ErrorCode.INVALID_ARGUMENT, "'ids' must be a list of 1 to 1000 message ids")
        chat_arg = args.get("chat")
        if chat_arg is not None:
            chat_arg = _parse_recipient(chat_arg)[0]
        sender_arg = args.get("sender")
        if sender_arg is not None:
            sender_arg = _contact_jid(sender_arg, "sender")
        by_chat: dict[str, list[str]] = {}  # one event per chat, in the order the ids came
        for some_id in ids:
            record = self._log.by_outbox(some_id) or self._log.by_wa(some_id)
            if record is not None:
                wa_id, chat = record["wa_id"], record["to"]
            elif some_id.startswith("msg_"):
                raise EngineError(ErrorCode.UNKNOWN_MESSAGE, f"{some_id!r} is not in the send log")
            elif chat_arg is None:
                raise EngineError(ErrorCode.INVALID_ARGUMENT,
                                  f"{some_id!r} is not in the send log: give its 'chat'")
            else:
                wa_id, chat = some_id, chat_arg
            by_chat.setdefault(chat, []).append(wa_id)
        timestamp = _iso(_now())
        for chat, wa_ids in by_chat.items():
            self.emit({"type": "event", "event": {
                "type": "message.receipt", "ids": wa_ids, "chat": chat, "sender": sender_arg or chat,
                "receipt": receipt, "timestamp": timestamp}})
        return {"ids": [wa_id for wa_ids in by_chat.values() for wa_id in wa_ids], "receipt": receipt}

    def _act_stats(self, args: dict[str, Any]) -> dict[str, Any]:
        """What the send log holds (any phase, even not connected): sent, duplicates, per JID."""
        return self._log.stats().as_dict()

    def _act_burst(self, args: dict[str, Any]) -> dict[str, Any]:
        """count incoming text events as fast as they go (the throughput benchmark's source)."""
        count = args.get("count")
        if isinstance(count, bool) or not isinstance(count, int) or not 0 <= count <= MAX_BURST:
            raise EngineError(ErrorCode.INVALID_ARGUMENT, f"'count' must be a whole number from 0 to {MAX_BURST}")
        if args.get("kind", "text") != "text":
            raise EngineError(ErrorCode.INVALID_ARGUMENT, "a burst is made of text messages ('kind': 'text')")
        text = args.get("text", "burst")
        if not isinstance(text, str) or not text or len(text) > _MAX_TEXT:
            raise EngineError(ErrorCode.INVALID_ARGUMENT, "'text' must be a non-empty string")
        sender = _contact_jid(args.get("from", DEFAULT_CONTACT), "from")
        push_name = _optional_str(args, "push_name", max_len=64) or _DEFAULT_CONTACT_NAME
        rate = args.get("rate")
        if rate is not None and (isinstance(rate, bool) or not isinstance(rate, (int, float))
                                 or not 0 < rate <= 1_000_000 or not math.isfinite(rate)):
            raise EngineError(ErrorCode.INVALID_ARGUMENT, "'rate' must be a number of events per second (0 < rate <= 1e6)")
        with self._cond:
            if self._phase == _DONE:
                raise EngineError(ErrorCode.NOT_RUNNING, "the engine has already ended")
            self._require_connected("a message can only arrive on a live connection")
        prefix = "3EB0" + secrets.token_hex(4).upper()  # + 8 hex digits of the counter: unique ids
        emitted = 0
        started = time.monotonic()
        for n in range(count):
            if n % 1024 == 0 and self._phase != _CONNECTED:  # dropped or stopped: the burst ends
                break
            if rate is not None:
                # Event n is due at started + n/rate; sleep only when more than 1 ms ahead, so the
                # schedule is kept to about a millisecond without a sleep per event. Sleeps are cut
                # into 0.1 s slices so that a drop or stop still ends a slow burst promptly.
                while (ahead := started + n / rate - time.monotonic()) > 0.001 and self._phase == _CONNECTED:
                    time.sleep(min(ahead, 0.1))
                if self._phase != _CONNECTED:
                    break
            # emitted_at_ns: the wall clock (time.time_ns) just before the event is written to the
            # channel, for a worker-to-reader latency finer than `timestamp`'s milliseconds.
            self.emit({"type": "event", "event": {
                "type": "message.incoming", "id": f"{prefix}{n:08X}", "chat": sender, "sender": sender,
                "push_name": push_name, "timestamp": _iso(_now()), "is_group": False, "from_me": False,
                "kind": "text", "text": f"{text} {n + 1}", "media": None, "emitted_at_ns": time.time_ns()}})
            emitted += 1
        return {"emitted": emitted}

    _ACTIONS: dict[str, Callable[[SimulatorEngine, dict[str, Any]], dict[str, Any]]] = {
        "incoming": _act_incoming,
        "receipt": _act_receipt,
        "stats": _act_stats,
        "burst": _act_burst,
        "scan": _act_scan,
        "drop": _act_drop,
        "restore": _act_restore,
        "logged_out": _act_logged_out,
        "replaced": _act_replaced,
        "ban": _act_ban,
        "outdated": _act_outdated,
        "fail_connect": _act_fail_connect,
        "crash": _act_crash,
        "hang": _act_hang,
    }

    # ----------------------------------------------------------------- transitions (lock held)

    def _finish(self, code: ExitCode) -> None:
        """Decide run()'s result (the first decision wins) and wake run()."""
        if self._exit is None:
            self._exit = code
            self._phase = _DONE
            self._dial_episode += 1
            self.options.gate.close()
        self._cond.notify_all()
        with self._receipt_cond:  # the receipt thread ends with the engine
            self._receipt_cond.notify_all()

    def _exit_code(self) -> int:
        assert self._exit is not None
        return int(self._exit)

    def _end(self, action: str, code: ExitCode) -> dict[str, Any]:
        self._finish(code)
        return {"action": action, "exit_code": int(code)}

    def _forget_device(self) -> None:
        """Drop the device from the store but keep the file, as whatsmeow does on logout."""
        self._device = None
        try:
            if self._store_path.exists():
                _write_store(self._store_path, None)
        except OSError as exc:  # the supervisor wipes the directory anyway
            log.warning("simulator: could not clear the device from the store: %s", exc)

    def _start_connecting(self, *, stall: bool = False) -> None:
        self._phase = _CONNECTING
        self.emit({"type": "state", "state": "connecting"})
        self._dial(stall=stall)

    def _dial(self, *, delay: float = 0.0, stall: bool = False) -> None:
        """Start one connection attempt: after `delay`, once the gate grants it (a token of the
        supervisor's connect-rate limiter), the dial takes connect_delay; run() then settles
        it. The wait is a thread's (whatsmeow's reconnect goroutine), so the lock stays free."""
        self._dial_episode += 1
        self._connect_due = None
        threading.Thread(target=self._dialer, args=(self._dial_episode, delay, stall),
                         name="simulator-dial", daemon=True).start()

    def _dialer(self, episode: int, delay: float, stall: bool) -> None:
        deadline = time.monotonic() + delay
        with self._cond:
            while self._dial_episode == episode and not self._dial_now:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._cond.wait(remaining)
            self._dial_now = False
            if self._dial_episode != episode:
                return
        if not self.options.gate.acquire("reconnect" if self._phase == _RECONNECTING else "connect"):
            return  # the engine is ending
        with self._cond:
            if self._dial_episode != episode or stall:
                return  # moved on meanwhile; or a dial that never completes (scan connect=false)
            delay = self.config.connect_delay
            self._connect_due = None if math.isinf(delay) else time.monotonic() + delay
            self._cond.notify_all()  # run() settles the dial when it is due

    def _enter_connected(self) -> None:
        assert self._device is not None
        self._dial_episode += 1
        self._connect_due = None
        self._reconnect_errors = 0
        self._phase = _CONNECTED
        self.emit(
            {
                "type": "state",
                "state": "connected",
                "jid": self._device.jid,
                "push_name": self._device.push_name,
            }
        )

    def _enter_pairing(self) -> None:
        self._phase = _PAIRING
        self._qr_keys = ",".join((_b64(32), _b64(32), _b64(32)))
        self._qr_emitted = 0
        self._pair_phone = None
        self._pairing_deadline = _now() + timedelta(seconds=self.config.pairing_window)
        self.emit({"type": "state", "state": "pairing"})
        self._emit_next_qr()

    def _emit_next_qr(self) -> None:
        lifetime = self.config.qr_first if self._qr_emitted == 0 else self.config.qr_next
        self._qr_emitted += 1
        self._qr_due = time.monotonic() + lifetime
        code = f"2@{_b64(72)},{self._qr_keys}"
        self.emit({"type": "qr", "code": code, "expires_at": _iso(_now() + timedelta(seconds=lifetime))})

    def _fail_file_exists(self) -> bool:
        return self._file_exists(self.config.fail_connect_file)

    def _file_exists(self, pattern: str | None) -> bool:
        """Whether a fault-injection file ("{company}" replaced) exists now."""
        if pattern is None:
            return False
        return Path(pattern.replace("{company}", self.options.company)).exists()

    def _require_connected(self, what: str) -> None:
        if self._phase != _CONNECTED:
            raise EngineError(ErrorCode.NOT_CONNECTED, f"{what} needs a live connection (the engine is {self._phase})")

    def _incoming_event(self, args: dict[str, Any]) -> dict[str, Any]:
        """The message.incoming event `simulate incoming` describes (media bytes stored if big)."""
        sender = _contact_jid(args.get("from", DEFAULT_CONTACT), "from")
        group = args.get("group", False)
        if group is None or group is False:
            chat, is_group = sender, False
        elif group is True:
            chat, is_group = DEFAULT_GROUP, True
        elif isinstance(group, str) and _GROUP_JID.fullmatch(group):
            chat, is_group = group, True
        else:
            raise EngineError(ErrorCode.INVALID_ARGUMENT, "'group' must be true, false or a group JID (…@g.us)")
        push_name = _optional_str(args, "push_name", max_len=64) or _DEFAULT_CONTACT_NAME
        message_id = _optional_str(args, "id", max_len=128) or _wa_id()
        kind = args.get("kind", "text")
        if kind not in _INCOMING_KINDS:
            raise EngineError(ErrorCode.INVALID_ARGUMENT, f"'kind' must be one of {', '.join(_INCOMING_KINDS)}")
        event: dict[str, Any] = {
            "type": "message.incoming", "id": message_id, "chat": chat, "sender": sender,
            "push_name": push_name, "timestamp": _iso(_now()), "is_group": is_group, "from_me": False,
            "kind": kind, "text": None, "media": None,
        }
        if kind == "text":
            text = args.get("text", "hello")
            if not isinstance(text, str) or not text or len(text) > _MAX_TEXT:
                raise EngineError(ErrorCode.INVALID_ARGUMENT, f"'text' must be a string of 1 to {_MAX_TEXT} characters")
            event["text"] = text
            return event
        caption = _optional_str(args, "caption", max_len=_MAX_TEXT)
        filename = _optional_str(args, "filename", max_len=255)
        mimetype = _optional_str(args, "mimetype", max_len=255) or _DEFAULT_MIMETYPES[kind]
        doc: dict[str, Any] = {"sim_media": 1, "kind": kind, "mimetype": mimetype}
        data_arg, size = args.get("data"), args.get("size")
        if size is not None and (isinstance(size, bool) or not isinstance(size, int)
                                 or not 1 <= size <= _MAX_INCOMING_MEDIA):
            raise EngineError(ErrorCode.INVALID_ARGUMENT,
                              f"'size' must be a whole number of bytes from 1 to {_MAX_INCOMING_MEDIA}")
        if data_arg is not None:
            try:
                data = base64.b64decode(data_arg, validate=True) if isinstance(data_arg, str) else b""
            except ValueError:
                data = b""
            if not data:
                raise EngineError(ErrorCode.INVALID_ARGUMENT, "'data' must be non-empty base64")
            if size is not None and size != len(data):
                raise EngineError(ErrorCode.INVALID_ARGUMENT, f"'size' is {size} but 'data' holds {len(data)} bytes")
            doc["size"] = len(data)
            if len(data) <= MAX_INLINE_MEDIA:
                doc["data_b64"] = base64.b64encode(data).decode("ascii")
            else:  # too big for the event line: kept in the session, like media on a CDN
                doc["file"] = self._store_media(data)
        else:  # reproducible bytes made up on download
            doc["size"] = _DEFAULT_INCOMING_SIZE if size is None else size
            doc["seed"] = secrets.randbits(62)
        event["media"] = {"mimetype": mimetype, "size": doc["size"], "caption": caption, "filename": filename}
        event["raw"] = _encode_raw(doc)
        return event

    def _store_media(self, data: bytes) -> str:
        directory = self.options.session_dir / MEDIA_DIR
        name = f"{secrets.token_hex(16)}.bin"
        try:
            directory.mkdir(mode=0o700, exist_ok=True)
            write_private(directory / name, iter((data,)))
        except OSError as exc:
            raise EngineError(ErrorCode.STORE_FAILED, f"could not keep the media: {exc}") from None
        return name

    def _schedule_receipts(self, wa_id: str, to: str) -> None:
        """WHATSAPPD_SIM_AUTO_RECEIPTS: each receipt RECEIPT_DELAY after the one before, in order."""
        if not self.config.auto_receipts:
            return
        if self.config.receipts_first:
            for receipt in self.config.auto_receipts:
                self.emit({"type": "event", "event": {"type": "message.receipt", "ids": [wa_id], "chat": to,
                                                      "sender": to, "receipt": receipt, "timestamp": _iso(_now())}})
            return
        with self._receipt_cond:
            due = time.monotonic()
            for receipt in self.config.auto_receipts:
                due += self.config.receipt_delay
                event = {"type": "message.receipt", "ids": [wa_id], "chat": to, "sender": to,
                         "receipt": receipt}
                heapq.heappush(self._receipts_due, (due, next(self._receipt_seq), event))
            if self._receipt_thread is None:
                self._receipt_thread = threading.Thread(target=self._emit_receipts,
                                                        name="sim-receipts", daemon=True)
                self._receipt_thread.start()
            self._receipt_cond.notify_all()

    def _emit_receipts(self) -> None:
        """The receipt thread: emit each due receipt while connected (one due otherwise is lost)."""
        while True:
            with self._receipt_cond:
                while True:
                    if self._phase == _DONE:
                        self._receipts_due.clear()
                        return
                    if self._receipts_due:
                        wait = self._receipts_due[0][0] - time.monotonic()
                        if wait <= 0:
                            event = heapq.heappop(self._receipts_due)[2]
                            break
                        self._receipt_cond.wait(wait)
                    else:
                        self._receipt_cond.wait()
            if self._phase == _CONNECTED:
                self.emit({"type": "event", "event": {**event, "timestamp": _iso(_now())}})

    def _run_due_timers(self) -> None:
        now = time.monotonic()
        if self._phase == _RECONNECTING and self._connect_due is not None and now >= self._connect_due:
            self._connect_due = None
            if self._network_down or self._fail_file_exists():
                self._reconnect_errors += 1
                log.info("simulator: reconnect attempt %d failed (simulated)", self._reconnect_errors)
                self._dial(delay=self._reconnect_errors * self.config.reconnect_delay)
            else:
                self._enter_connected()
        elif self._phase == _CONNECTING and self._connect_due is not None and now >= self._connect_due:
            self._connect_due = None
            if self._fail_next_connect or self._fail_file_exists():
                log.warning("simulator: connect failed (simulated)")
                self._finish(ExitCode.TRANSIENT)
            elif self._device is not None:
                self._enter_connected()
            else:
                self._enter_pairing()
        elif self._phase == _PAIRING and now >= self._qr_due:
            if self._qr_emitted < self.config.qr_count:
                self._emit_next_qr()
            else:
                log.info("simulator: pairing timed out, nobody scanned the QR code")
                self._finish(ExitCode.PAIRING_TIMEOUT)

    def _time_to_next_timer(self) -> float | None:
        """Seconds until the next timed transition; None to wait for a command or stop()."""
        if self._phase in (_CONNECTING, _RECONNECTING) and self._connect_due is not None:
            due = self._connect_due
        elif self._phase == _PAIRING:
            due = self._qr_due
        else:
            return None
        return min(max(due - time.monotonic(), 0.0), threading.TIMEOUT_MAX)


def _daemon_timer(seconds: float, action: Callable[[], None]) -> None:
    timer = threading.Timer(seconds, action)
    timer.daemon = True
    timer.start()
