"""The simulate actions' arguments and what they make: incoming messages, receipts, bursts.

The engine carries each action out (engine.py, dispatched from protocol.SIMULATE_ACTIONS,
after the state the action needs was checked); here its arguments are read, each bad one an
invalid_argument, and the events it emits are built.
"""

from __future__ import annotations

import base64
import math
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from whatsappd.errors import ErrorCode
from whatsappd.protocol import MAX_BURST, MAX_TEXT, RECEIPTS, EngineError, IncomingEvent, parse_recipient
from whatsappd.recipients import is_group_jid, is_phone_digits
from whatsappd.worker.simulator import server

__all__ = [
    "DEFAULT_CONTACT",
    "DEFAULT_GROUP",
    "UNLOCKED",
    "Burst",
    "Receipts",
    "burst_event",
    "contact_jid",
    "incoming_event",
    "optional_bool",
    "optional_seconds",
    "optional_str",
    "parse_burst",
    "parse_rate_limit",
    "parse_receipts",
]

#: Who `simulate incoming` comes from by default, and the group `group=true` means.
DEFAULT_CONTACT = "5511987654321"
DEFAULT_GROUP = "120363000000000001@g.us"
#: Actions run outside the engine's lock, in any phase: crash and hang act on the whole process,
#: stats reads the send log even after the end, burst emits outside the lock (it takes it only to
#: check the phase) so that stop() stays prompt during a long burst.
UNLOCKED = frozenset({"crash", "hang", "stats", "burst"})

_INCOMING_KINDS = ("text", "image", "video", "audio", "document")
DEFAULT_MIMETYPES = {
    "image": "image/jpeg",
    "video": "video/mp4",
    "audio": "audio/ogg; codecs=opus",
    "document": "application/octet-stream",
}
_DEFAULT_CONTACT_NAME = "Simulated Contact"
_DEFAULT_INCOMING_SIZE = 1024
_MAX_INCOMING_MEDIA = 100 * 1024 * 1024


def _invalid(message: str) -> EngineError:
    return EngineError(ErrorCode.INVALID_ARGUMENT, message)


def optional_str(args: Mapping[str, Any], key: str, *, max_len: int = 256) -> str | None:
    value = args.get(key)
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip() or len(value) > max_len:
        raise _invalid(f"'{key}' must be a non-empty string of at most {max_len} characters")
    return value


def optional_seconds(args: Mapping[str, Any], key: str, default: float) -> float:
    value = args.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
        raise _invalid(f"'{key}' must be a number of seconds >= 0")
    return float(value)


def optional_bool(args: Mapping[str, Any], key: str, default: bool) -> bool:
    value = args.get(key, default)
    if not isinstance(value, bool):
        raise _invalid(f"'{key}' must be true or false")
    return value


def contact_jid(value: Any, key: str) -> str:
    """A person's JID from phone digits (a leading "+" allowed) or a …@s.whatsapp.net JID."""
    if isinstance(value, str):
        digits = value.removeprefix("+")
        if is_phone_digits(digits):
            return f"{digits}@s.whatsapp.net"
        try:
            if parse_recipient(value).phone is not None:
                return value
        except EngineError:
            pass
    raise _invalid(f"'{key}' must be phone digits or a …@s.whatsapp.net JID")


def incoming_event(args: Mapping[str, Any], session_dir: Path) -> IncomingEvent:
    """The message.incoming event `simulate incoming` describes (media bytes stored if big)."""
    sender = contact_jid(args.get("from", DEFAULT_CONTACT), "from")
    group = args.get("group", False)
    if group is None or group is False:
        chat, is_group = sender, False
    elif group is True:
        chat, is_group = DEFAULT_GROUP, True
    elif is_group_jid(group):
        chat, is_group = group, True
    else:
        raise _invalid("'group' must be true, false or a group JID (…@g.us)")
    push_name = optional_str(args, "push_name", max_len=64) or _DEFAULT_CONTACT_NAME
    message_id = optional_str(args, "id", max_len=128) or server.wa_id()
    kind = args.get("kind", "text")
    if kind not in _INCOMING_KINDS:
        raise _invalid(f"'kind' must be one of {', '.join(_INCOMING_KINDS)}")
    event: IncomingEvent = {
        "type": "message.incoming", "id": message_id, "chat": chat, "sender": sender,
        "push_name": push_name, "timestamp": server.iso(server.now()), "is_group": is_group, "from_me": False,
        "kind": kind, "text": None, "media": None,
    }
    if kind == "text":
        text = args.get("text", "hello")
        if not isinstance(text, str) or not text or len(text) > MAX_TEXT:
            raise _invalid(f"'text' must be a string of 1 to {MAX_TEXT} characters")
        event["text"] = text
        return event
    caption = optional_str(args, "caption", max_len=MAX_TEXT)
    filename = optional_str(args, "filename", max_len=255)
    mimetype = optional_str(args, "mimetype", max_len=255) or DEFAULT_MIMETYPES[kind]
    doc: dict[str, Any] = {"sim_media": 1, "kind": kind, "mimetype": mimetype}
    data_arg, size = args.get("data"), args.get("size")
    if size is not None and (isinstance(size, bool) or not isinstance(size, int)
                             or not 1 <= size <= _MAX_INCOMING_MEDIA):
        raise _invalid(f"'size' must be a whole number of bytes from 1 to {_MAX_INCOMING_MEDIA}")
    if data_arg is not None:
        try:
            data = base64.b64decode(data_arg, validate=True) if isinstance(data_arg, str) else b""
        except ValueError:
            data = b""
        if not data:
            raise _invalid("'data' must be non-empty base64")
        if size is not None and size != len(data):
            raise _invalid(f"'size' is {size} but 'data' holds {len(data)} bytes")
        doc["size"] = len(data)
        if len(data) <= server.MAX_INLINE_MEDIA:
            doc["data_b64"] = base64.b64encode(data).decode("ascii")
        else:  # too big for the event line: kept in the session, like media on a CDN
            doc["file"] = server.store_media(session_dir, data)
    else:  # reproducible bytes made up on download
        doc["size"] = _DEFAULT_INCOMING_SIZE if size is None else size
        doc["seed"] = secrets.randbits(62)
    event["media"] = {"mimetype": mimetype, "size": doc["size"], "caption": caption, "filename": filename}
    event["raw"] = server.encode_raw(doc)
    return event


@dataclass(frozen=True)
class Receipts:
    """What `simulate receipt` asks for; ids are looked up in the send log by the engine."""

    receipt: str
    ids: list[str]
    chat: str | None  # for ids not in the send log
    sender: str | None


def parse_receipts(args: Mapping[str, Any]) -> Receipts:
    receipt = args.get("receipt", "delivered")
    if receipt not in RECEIPTS:
        raise _invalid(f"'receipt' must be one of {', '.join(RECEIPTS)}")
    ids = args.get("ids")
    if (not isinstance(ids, list) or not ids or len(ids) > 1000
            or not all(isinstance(i, str) and i for i in ids)):
        raise _invalid("'ids' must be a list of 1 to 1000 message ids")
    chat = args.get("chat")
    sender = args.get("sender")
    return Receipts(receipt, ids, None if chat is None else parse_recipient(chat).jid,
                    None if sender is None else contact_jid(sender, "sender"))


@dataclass(frozen=True)
class Burst:
    count: int
    text: str
    sender: str
    push_name: str
    rate: float | None  # events per second; None: as fast as they go


def parse_burst(args: Mapping[str, Any]) -> Burst:
    count = args.get("count")
    if isinstance(count, bool) or not isinstance(count, int) or not 0 <= count <= MAX_BURST:
        raise _invalid(f"'count' must be a whole number from 0 to {MAX_BURST}")
    if args.get("kind", "text") != "text":
        raise _invalid("a burst is made of text messages ('kind': 'text')")
    text = args.get("text", "burst")
    if not isinstance(text, str) or not text or len(text) > MAX_TEXT:
        raise _invalid("'text' must be a non-empty string")
    sender = contact_jid(args.get("from", DEFAULT_CONTACT), "from")
    push_name = optional_str(args, "push_name", max_len=64) or _DEFAULT_CONTACT_NAME
    rate = args.get("rate")
    if rate is not None and (isinstance(rate, bool) or not isinstance(rate, (int, float))
                             or not 0 < rate <= 1_000_000 or not math.isfinite(rate)):
        raise _invalid("'rate' must be a number of events per second (0 < rate <= 1e6)")
    return Burst(count, text, sender, push_name, rate)


def burst_event(burst: Burst, message_id: str, n: int, emitted_at_ns: int) -> IncomingEvent:
    """The n-th (0-based) text event of a burst; emitted_at_ns: the wall clock (time.time_ns) just
    before it is written to the channel, for a latency finer than `timestamp`'s milliseconds."""
    return {"type": "message.incoming", "id": message_id, "chat": burst.sender, "sender": burst.sender,
            "push_name": burst.push_name, "timestamp": server.iso(server.now()), "is_group": False,
            "from_me": False, "kind": "text", "text": f"{burst.text} {n + 1}", "media": None,
            "emitted_at_ns": emitted_at_ns}


def parse_rate_limit(args: Mapping[str, Any]) -> tuple[int, int]:
    """(count, code) of `simulate rate_limit`."""
    count = args.get("count", 1)
    if isinstance(count, bool) or not isinstance(count, int) or not 0 <= count <= 1000:
        raise _invalid("'count' must be a whole number from 0 to 1000")
    code = args.get("code", 463)
    if code not in (463, 429) or isinstance(code, bool):
        raise _invalid("'code' must be 463 (a restriction) or 429 (rate-overlimit)")
    return count, int(code)
