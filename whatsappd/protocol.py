"""The private channel between the supervisor and a worker: every message as a type, exit codes.

Newline-delimited JSON on a socketpair (docs/INTERNALS.md has the walk-through). Shared by both
sides so that neither can drift, and parsed once where a message enters a process:

- the worker parses each command with parse_command(): an invalid one is refused with an
  EngineError (invalid_argument, invalid_recipient, ...) before an engine sees it, so both
  engines receive typed, already-valid arguments;
- the supervisor parses each worker line with parse_worker_message(): anything malformed is a
  protocol violation (ValueError).

Every message names its company (the channel adds it), so a later shared-worker mode (several
companies per process) needs no protocol change. The wire stays plain JSON: `to_wire()` gives
each message's exact JSON object.
"""

from __future__ import annotations

import enum
import json
import math
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, ClassVar, Literal, NotRequired, TypedDict, cast

from whatsappd.errors import ErrorCode, Failure
from whatsappd.recipients import is_phone_digits, split_send_jid

__all__ = [
    "MAX_BURST",
    "MAX_CLOCK_SKEW",
    "MAX_LINE",
    "MAX_RAW_CHARS",
    "MAX_REPLAY",
    "MAX_STATUS_IDS",
    "MAX_TEXT",
    "MAX_TYPING",
    "RECEIPTS",
    "SEND_KINDS",
    "SIMULATE_ACTIONS",
    "ZYGOTE_GO",
    "ZYGOTE_MAX_REQUEST",
    "CheckNumber",
    "Command",
    "CommandMessage",
    "ConnectGrant",
    "Fence",
    "ConnectRequest",
    "Disconnect",
    "Download",
    "EngineError",
    "EventMessage",
    "ExitCode",
    "Heartbeat",
    "Hello",
    "IncomingEvent",
    "IncomingMedia",
    "Logout",
    "Op",
    "PairPhone",
    "Paired",
    "Qr",
    "ReceiptEvent",
    "Recipient",
    "Replay",
    "Reply",
    "ReplyError",
    "Send",
    "SendStatus",
    "ServerTime",
    "Simulate",
    "SimulateAction",
    "StateReport",
    "Stop",
    "UnknownMessage",
    "WorkerMessage",
    "WorkerState",
    "decode",
    "encode",
    "parse_command",
    "parse_recipient",
    "parse_worker_message",
]

#: A line longer than this is a protocol violation (the worker is killed): it bounds memory.
MAX_LINE = 16 * 1024 * 1024
#: The longest text (or caption) a message may carry, in characters.
MAX_TEXT = 65536
#: How many outbox ids one send_status may ask about.
MAX_STATUS_IDS = 100_000
#: An incoming media event's raw is a few hundred bytes; download refuses anything over this.
MAX_RAW_CHARS = 1024 * 1024
#: The most events one `simulate burst` may emit.
MAX_BURST = 100_000
#: The longest "typing…" presence a send may ask for (pacing.typing_max's bound).
MAX_TYPING = 30.0
#: What `send` can send.
SEND_KINDS = ("text", "image", "document", "audio")
#: The receipts a message.receipt event reports, in the order they happen.
RECEIPTS = ("delivered", "read", "played")

# The supervisor <-> zygote channel (supervisor/launcher.py, worker/zygote.py): one JSON object
# per SOCK_SEQPACKET message; the gate socket of a fork request carries the worker's pid line,
# then this byte once the supervisor has adopted the worker.
#: The largest fork request (a worker's arguments and environment).
ZYGOTE_MAX_REQUEST = 1024 * 1024
#: The byte the supervisor writes on a worker's gate once it has adopted the worker.
ZYGOTE_GO = b"g"


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
    # Several hosts ([cluster]).
    FENCED = 19  # its fence deadline passed unrefreshed: its host may have lost the company's lease


class EngineError(Failure):
    """A command refused (by parse_command) or failed (by the engine); the worker sends its code,
    message and `permanent` (for `send`: True if retrying cannot help, e.g. a bad recipient)
    back in the reply."""


def encode(message: Mapping[str, Any]) -> bytes:
    """One message as one line of UTF-8 JSON."""
    return json.dumps(message, separators=(",", ":"), ensure_ascii=False).encode() + b"\n"


def decode(line: bytes) -> dict[str, Any]:
    """Parse one line; raise ValueError for anything that is not a JSON object with a type."""
    message = json.loads(line)
    if not isinstance(message, dict) or not isinstance(message.get("type"), str):
        raise ValueError("a protocol message must be a JSON object with a string 'type'")
    return message


# ============================================================== supervisor -> worker


class Op(enum.StrEnum):
    """The commands a worker carries out (each answered by a `reply` of the same id)."""

    SEND = "send"
    SEND_STATUS = "send_status"
    CHECK_NUMBER = "check_number"
    DOWNLOAD = "download"
    PAIR_PHONE = "pair_phone"
    LOGOUT = "logout"
    DISCONNECT = "disconnect"  # the neonize engine's: stop, like the `stop` message
    SIMULATE = "simulate"  # the simulator's: drive the fake WhatsApp (SIMULATE_ACTIONS)
    REPLAY = "replay"  # neonize's, for benchmarks only ($WHATSAPPD_NEONIZE_REPLAY=1): incoming messages


@dataclass(frozen=True)
class Recipient:
    """A JID a message can be sent to: a phone JID without a device part, or a group JID."""

    jid: str
    user: str  # the phone digits, or the group id
    server: str  # "s.whatsapp.net" or "g.us"

    @property
    def phone(self) -> str | None:
        """The phone digits of a person's JID; None for a group."""
        return self.user if self.server == "s.whatsapp.net" else None


@dataclass(frozen=True)
class Send:
    """Send one message, at most once per outbox id (docs/INTERNALS.md, "Messaging")."""

    op: ClassVar[Op] = Op.SEND
    outbox_id: str
    to: Recipient
    kind: str  # one of SEND_KINDS
    text: str | None = None  # kind text: the text (never empty)
    caption: str | None = None  # media kinds
    filename: str | None = None
    mimetype: str | None = None
    media_path: str | None = None  # media kinds: a 0600 file the supervisor wrote with the bytes
    typing: float = 0.0  # kind text: seconds of "typing…" presence shown to the recipient first (pacing)

    def to_args(self) -> dict[str, Any]:
        args: dict[str, Any] = {"outbox_id": self.outbox_id, "to": self.to.jid, "kind": self.kind,
                                "text": self.text, "caption": self.caption, "filename": self.filename,
                                "mimetype": self.mimetype}
        if self.media_path is not None:
            args["media_path"] = self.media_path
        if self.typing:
            args["typing"] = self.typing
        return args


@dataclass(frozen=True)
class SendStatus:
    """What the send log knows of each outbox id (asked after a crash)."""

    op: ClassVar[Op] = Op.SEND_STATUS
    outbox_ids: tuple[str, ...]

    def to_args(self) -> dict[str, Any]:
        return {"outbox_ids": list(self.outbox_ids)}


@dataclass(frozen=True)
class CheckNumber:
    op: ClassVar[Op] = Op.CHECK_NUMBER
    phone: str  # PHONE_DIGITS_PATTERN

    def to_args(self) -> dict[str, Any]:
        return {"phone": self.phone}


@dataclass(frozen=True)
class Download:
    op: ClassVar[Op] = Op.DOWNLOAD
    message: str  # the `raw` of an incoming media event (each engine decodes its own)
    path: str  # where to write the bytes, 0600

    def to_args(self) -> dict[str, Any]:
        return {"message": self.message, "path": self.path}


@dataclass(frozen=True)
class PairPhone:
    op: ClassVar[Op] = Op.PAIR_PHONE
    phone: str  # PHONE_DIGITS_PATTERN

    def to_args(self) -> dict[str, Any]:
        return {"phone": self.phone}


@dataclass(frozen=True)
class Logout:
    op: ClassVar[Op] = Op.LOGOUT

    def to_args(self) -> dict[str, Any]:
        return {}


@dataclass(frozen=True)
class Disconnect:
    op: ClassVar[Op] = Op.DISCONNECT

    def to_args(self) -> dict[str, Any]:
        return {}


@dataclass(frozen=True)
class Simulate:
    """One simulate action (a key of SIMULATE_ACTIONS). Its arguments are checked by the action
    itself, after the state it needs: a `scan` while connected is not_pairing, whatever its jid."""

    op: ClassVar[Op] = Op.SIMULATE
    action: str
    args: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))  # "action" included

    def to_args(self) -> dict[str, Any]:
        return {**self.args, "action": self.action}


@dataclass(frozen=True)
class Replay:
    """Benchmarks only: `count` incoming messages through neonize's real event path, then (with
    `collect`) a full garbage collection, as a long-running worker eventually has."""

    op: ClassVar[Op] = Op.REPLAY
    count: int = 1000
    collect: bool = False

    def to_args(self) -> dict[str, Any]:
        return {"count": self.count, "collect": self.collect}


#: The most messages one `replay` may deliver.
MAX_REPLAY = 1_000_000

Command = Send | SendStatus | CheckNumber | Download | PairPhone | Logout | Disconnect | Simulate | Replay


@dataclass(frozen=True)
class CommandMessage:
    """`{"type": "command", "id", "op", "args"}`: one command, answered by the reply of that id."""

    id: int
    command: Command

    def to_wire(self) -> dict[str, Any]:
        return {"type": "command", "id": self.id, "op": str(self.command.op), "args": self.command.to_args()}


@dataclass(frozen=True)
class Stop:
    """Disconnect and exit 0 (SIGKILL follows after workers.stop_grace)."""

    def to_wire(self) -> dict[str, Any]:
        return {"type": "stop"}


@dataclass(frozen=True)
class Fence:
    """The worker's new fence deadline (absolute CLOCK_MONOTONIC seconds), sent after each
    successful lease renewal ([cluster]): past it, unrefreshed, the worker exits FENCED by itself."""

    deadline: float

    def to_wire(self) -> dict[str, Any]:
        return {"type": "fence", "deadline": self.deadline}

    @classmethod
    def parse(cls, message: Mapping[str, Any]) -> Fence:
        deadline = message.get("deadline")
        if isinstance(deadline, bool) or not isinstance(deadline, (int, float)) or not math.isfinite(deadline):
            raise ValueError("a fence message needs a finite number 'deadline'")
        return cls(float(deadline))


@dataclass(frozen=True)
class ConnectGrant:
    """The answer to a connect_request: one token of the global connect-rate limiter."""

    def to_wire(self) -> dict[str, Any]:
        return {"type": "connect_grant"}


# ---------------------------------------------------------------- parsing a command (worker side)

_ALL_OPS = frozenset(Op)


def _invalid(message: str, permanent: bool = False) -> EngineError:
    return EngineError(ErrorCode.INVALID_ARGUMENT, message, permanent=permanent)


def _string(args: Mapping[str, Any], key: str, *, max_len: int | None, required: bool = False) -> str | None:
    """A string argument of `send` (None if absent); a bad one is a permanent invalid_argument."""
    value = args.get(key)
    if value is None and not required:
        return None
    if not isinstance(value, str) or not value or (max_len is not None and len(value) > max_len):
        limit = "" if max_len is None else f" of at most {max_len} characters"
        raise _invalid(f"'{key}' must be a non-empty string{limit}", permanent=True)
    return value


def parse_recipient(to: Any) -> Recipient:
    """The Recipient of a JID given to `send`; invalid_recipient (permanent) for anything else."""
    parts = split_send_jid(to)
    if parts is None:
        raise EngineError(
            ErrorCode.INVALID_RECIPIENT,
            f"{to!r} is not a recipient JID (<phone digits>@s.whatsapp.net or <group id>@g.us)",
            permanent=True,
        )
    return Recipient(jid=to, user=parts[0], server=parts[1])


def _text(value: str | None, what: str) -> str | None:
    if value is not None and len(value) > MAX_TEXT:
        raise EngineError(ErrorCode.TOO_LARGE, f"{what} has at most {MAX_TEXT} characters", permanent=True)
    return value


def _parse_send(args: Mapping[str, Any]) -> Send:
    """Checked in this order, each failure permanent: outbox_id, to, kind, then what the kind needs."""
    outbox_id = _string(args, "outbox_id", max_len=256, required=True)
    assert outbox_id is not None
    to = parse_recipient(args.get("to"))
    kind = args.get("kind", "text")
    if kind not in SEND_KINDS:
        raise _invalid(f"'kind' must be one of {', '.join(SEND_KINDS)}", permanent=True)
    if kind == "text":
        typing = args.get("typing", 0.0)
        if isinstance(typing, bool) or not isinstance(typing, int | float) or not 0 <= typing <= MAX_TYPING:
            raise _invalid(f"'typing' must be a number of seconds from 0 to {MAX_TYPING}", permanent=True)
        return Send(outbox_id, to, kind, text=_text(_string(args, "text", max_len=None, required=True),
                                                    "a text message"), typing=float(typing))
    caption = _text(_string(args, "caption", max_len=None), "a caption")
    filename = _string(args, "filename", max_len=255)
    mimetype = _string(args, "mimetype", max_len=255)
    media_path = args.get("media_path")
    if not isinstance(media_path, str) or not media_path:
        raise EngineError(ErrorCode.MEDIA_INVALID, f"a {kind} message needs 'media_path'", permanent=True)
    return Send(outbox_id, to, kind, caption=caption, filename=filename, mimetype=mimetype, media_path=media_path)


def _phone(args: Mapping[str, Any], *, permanent: bool) -> str:
    phone = args.get("phone")
    if not is_phone_digits(phone):
        raise EngineError(ErrorCode.INVALID_PHONE, "the phone number must be digits only in international format, "
                          "no '+' and no leading zero (e.g. 5511999999999)", permanent=permanent)
    assert isinstance(phone, str)
    return phone


def _parse_send_status(args: Mapping[str, Any]) -> SendStatus:
    ids = args.get("outbox_ids")
    if not isinstance(ids, list) or len(ids) > MAX_STATUS_IDS or not all(isinstance(i, str) for i in ids):
        raise _invalid(f"'outbox_ids' must be a list of at most {MAX_STATUS_IDS} strings")
    return SendStatus(tuple(ids))


def _parse_download(args: Mapping[str, Any]) -> Download:
    raw = args.get("message")
    if not isinstance(raw, str) or not raw or len(raw) > MAX_RAW_CHARS:
        raise EngineError(ErrorCode.MEDIA_UNAVAILABLE, "'message' is not the raw of an incoming media message",
                          permanent=True)
    path = args.get("path")
    if not isinstance(path, str) or not path:
        raise _invalid("'path' must be a file path")
    return Download(raw, path)


def _parse_simulate(args: Mapping[str, Any]) -> Simulate:
    action = args.get("action")
    if not isinstance(action, str):
        raise _invalid("'action' must be a string")
    if action not in SIMULATE_ACTIONS:
        raise EngineError(ErrorCode.UNKNOWN_ACTION,
                          f"unknown simulate action {action!r}; known: {', '.join(sorted(SIMULATE_ACTIONS))}")
    return Simulate(action, MappingProxyType(dict(args)))


def parse_command(message: Mapping[str, Any], ops: Collection[Op] = _ALL_OPS, engine: str = "worker") -> Command:
    """The typed command of a decoded `command` message; EngineError if it cannot be carried out.

    ops: what the engine offers (anything else is unknown_op, before its arguments are looked
    at); engine names it in that error. Argument errors keep the codes (and `permanent`) the
    engines have always answered with: invalid_argument, invalid_recipient, invalid_phone,
    too_large, media_invalid, media_unavailable, unknown_action.
    """
    name = message.get("op")
    try:
        op = Op(name) if isinstance(name, str) else None
    except ValueError:
        op = None
    if op is None or op not in ops:
        raise EngineError(ErrorCode.UNKNOWN_OP, f"the {engine} engine has no operation {name!r}")
    args = message.get("args")
    if args is None:
        args = {}
    if not isinstance(args, dict):
        raise _invalid("command arguments must be a JSON object")
    match op:
        case Op.SEND:
            return _parse_send(args)
        case Op.SEND_STATUS:
            return _parse_send_status(args)
        case Op.CHECK_NUMBER:
            return CheckNumber(_phone(args, permanent=True))
        case Op.DOWNLOAD:
            return _parse_download(args)
        case Op.PAIR_PHONE:
            return PairPhone(_phone(args, permanent=False))
        case Op.LOGOUT:
            return Logout()
        case Op.DISCONNECT:
            return Disconnect()
        case Op.SIMULATE:
            return _parse_simulate(args)
        case Op.REPLAY:
            count = args.get("count", 1000)
            if isinstance(count, bool) or not isinstance(count, int) or not 0 < count <= MAX_REPLAY:
                raise _invalid(f"count must be an integer from 1 to {MAX_REPLAY}")
            return Replay(count, bool(args.get("collect")))


# ============================================================== simulate actions


@dataclass(frozen=True)
class SimulateAction:
    """One action of `simulate`: what it does, its arguments (name -> what it takes), and whether
    the worker answers it (crash and hang end or freeze the process: no reply ever comes)."""

    description: str
    args: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    replies: bool = True


#: The largest skew `simulate clock` takes (ten years), in seconds either way.
MAX_CLOCK_SKEW = 10 * 365 * 86400

#: Every simulate action: the simulator dispatches from this table, its unknown_action error
#: lists it, and the OpenAPI document's action enum is made from it.
SIMULATE_ACTIONS: Mapping[str, SimulateAction] = MappingProxyType({
    "scan": SimulateAction(
        "the QR code is scanned: paired, session saved, then connected",
        {"jid": "string: the device's JID (default: made up)", "push_name": "string, at most 64 characters",
         "connect": "boolean (true): false leaves it connecting, as if the 515 reconnect were lost"}),
    "drop": SimulateAction(
        "the live connection drops: reconnecting, then reconnect attempts through the connect gate",
        {"reason": "string", "down": "boolean (true): the network stays down until restore"}),
    "restore": SimulateAction("the network is back: the next reconnect attempt starts at once"),
    "logged_out": SimulateAction("the phone unlinks the device: the worker exits LOGGED_OUT"),
    "replaced": SimulateAction("another client takes over the session: the worker exits REPLACED"),
    "ban": SimulateAction(
        "a temporary ban: state banned with until, then the worker exits BANNED",
        {"seconds": "number >= 0 (3600): the ban's length", "reason": "string"}),
    "outdated": SimulateAction("WhatsApp refuses the client as too old: the worker exits OUTDATED"),
    "fail_connect": SimulateAction("the connection attempt (or the live connection) fails: the worker exits TRANSIENT"),
    "crash": SimulateAction("the worker dies (status 70)", {"after": "number of seconds >= 0 (0)"}, replies=False),
    "hang": SimulateAction("the worker freezes (SIGSTOP): no heartbeat, no reply",
                           {"after": "number of seconds >= 0 (0)"}, replies=False),
    "incoming": SimulateAction(
        "someone writes: a message.incoming event; answers its id",
        {"from": "phone digits or …@s.whatsapp.net", "group": "true, false or a group JID", "push_name": "string",
         "id": "string", "kind": "text, image, video, audio or document (text)", "text": "string (hello)",
         "caption": "string", "filename": "string", "mimetype": "string", "data": "the media bytes, base64",
         "size": "whole number of bytes (without data: made-up bytes of that size)"}),
    "receipt": SimulateAction(
        "receipts for sent messages: message.receipt events",
        {"ids": "1 to 1000 outbox ids (msg_…) or WhatsApp ids", "receipt": "delivered, read or played (delivered)",
         "chat": "JID, for ids not in the send log", "sender": "phone digits or …@s.whatsapp.net"}),
    "stats": SimulateAction("what the simulator has sent: sent, duplicate_requests, by_recipient"),
    "clock": SimulateAction(
        "the server's clock runs skew seconds ahead of this machine's (negative: behind); the worker reports "
        "the server time it sees now if connected, and at every connect",
        {"skew": f"number of seconds from -{MAX_CLOCK_SKEW} to {MAX_CLOCK_SKEW} (0)"}),

    "rate_limit": SimulateAction(
        "WhatsApp answers the next sends with a rate-limit error (nothing is sent); answers how many are armed",
        {"count": "whole number from 0 to 1000 (1): how many sends fail; 0 disarms",
         "code": "463 (a restriction, the default) or 429 (rate-overlimit)"}),
    "burst": SimulateAction(
        "count incoming text messages at full speed, or paced at rate per second",
        {"count": f"whole number from 0 to {MAX_BURST}", "text": "string (burst)",
         "from": "phone digits or …@s.whatsapp.net", "push_name": "string", "rate": "events per second"}),
})


# ============================================================== worker -> supervisor


class WorkerState(enum.StrEnum):
    """What a `state` message reports (the supervisor maps it onto its own states)."""

    CONNECTING = "connecting"
    PAIRING = "pairing"
    CONNECTED = "connected"
    RECONNECTING = "reconnecting"
    BANNED = "banned"  # the last message before ExitCode.BANNED: the exit code cannot carry `until`


#: The fields a `state` message carries for each state (always present, null when unknown).
_STATE_FIELDS: Mapping[WorkerState, tuple[str, ...]] = {
    WorkerState.CONNECTING: (),
    WorkerState.PAIRING: (),
    WorkerState.CONNECTED: ("jid", "push_name"),
    WorkerState.RECONNECTING: ("reason",),
    WorkerState.BANNED: ("reason", "until"),
}


@dataclass(frozen=True)
class Hello:
    """The worker's first message."""

    pid: int
    engine: str

    def to_wire(self) -> dict[str, Any]:
        return {"type": "hello", "pid": self.pid, "engine": self.engine}


@dataclass(frozen=True)
class Heartbeat:
    def to_wire(self) -> dict[str, Any]:
        return {"type": "heartbeat"}


@dataclass(frozen=True)
class StateReport:
    """`{"type": "state", "state", ...}` with the fields of that state (see _STATE_FIELDS)."""

    state: WorkerState
    reason: str | None = None
    jid: str | None = None
    push_name: str | None = None
    until: str | None = None  # banned: ISO 8601 expiry, or null when WhatsApp gave none

    def to_wire(self) -> dict[str, Any]:
        return {"type": "state", "state": str(self.state),
                **{name: getattr(self, name) for name in _STATE_FIELDS[self.state]}}


@dataclass(frozen=True)
class Qr:
    """A QR code to show (the code never reaches a log or the disk)."""

    code: str
    expires_at: str

    def to_wire(self) -> dict[str, Any]:
        return {"type": "qr", "code": self.code, "expires_at": self.expires_at}


@dataclass(frozen=True)
class Paired:
    jid: str | None

    def to_wire(self) -> dict[str, Any]:
        return {"type": "paired", "jid": self.jid}


@dataclass(frozen=True)
class ReplyError:
    code: ErrorCode
    message: str
    permanent: bool | None = None  # None: not said (an engine bug), which counts as transient

    def to_wire(self) -> dict[str, Any]:
        wire: dict[str, Any] = {"code": str(self.code), "message": self.message}
        if self.permanent is not None:
            wire["permanent"] = self.permanent
        return wire


@dataclass(frozen=True)
class Reply:
    """The answer to the command of the same id: its result, or its error."""

    id: int | None
    result: Mapping[str, Any] | None = None
    error: ReplyError | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    def to_wire(self) -> dict[str, Any]:
        if self.error is None:
            return {"type": "reply", "id": self.id, "ok": True, "result": dict(self.result or {})}
        return {"type": "reply", "id": self.id, "ok": False, "error": self.error.to_wire()}

    def failure(self) -> Failure:
        """The error as a Failure to raise (call only when not ok)."""
        assert self.error is not None
        return Failure(self.error.code, self.error.message, permanent=bool(self.error.permanent))


class IncomingMedia(TypedDict):
    mimetype: str | None
    size: int | None
    caption: str | None
    filename: str | None


class IncomingEvent(TypedDict):
    """A message someone wrote (or the company's phone sent): journaled as message.incoming."""

    type: Literal["message.incoming"]
    id: str  # WhatsApp's message id
    chat: str  # JID
    sender: str  # JID
    push_name: str | None
    timestamp: str  # ISO 8601 UTC
    is_group: bool
    from_me: bool
    kind: str  # text, image, video, audio, document, sticker, other
    text: str | None
    media: IncomingMedia | None
    raw: NotRequired[str]  # media only: what `download` needs (kept out of the journal)
    emitted_at_ns: NotRequired[int]  # simulate burst only: when the worker wrote it


class ReceiptEvent(TypedDict):
    """Delivered / read / played for messages the company sent: journaled as message.receipt."""

    type: Literal["message.receipt"]
    ids: list[str]  # WhatsApp ids
    chat: str
    sender: str
    receipt: str  # one of RECEIPTS
    timestamp: str


@dataclass(frozen=True)
class EventMessage:
    """`{"type": "event", "event": {...}}`: an event for the journal."""

    event: IncomingEvent | ReceiptEvent

    def to_wire(self) -> dict[str, Any]:
        return {"type": "event", "event": self.event}


@dataclass(frozen=True)
class ConnectRequest:
    """One more connection attempt wants a token (answered by connect_grant)."""

    def to_wire(self) -> dict[str, Any]:
        return {"type": "connect_request"}


@dataclass(frozen=True)
class ServerTime:
    """The WhatsApp server's clock as the worker last saw it: `server_time` when our own clock said
    `local_time` (Unix times). The daemon compares them (whatsappd doctor: clock_skew)."""

    server_time: float
    local_time: float

    def to_wire(self) -> dict[str, Any]:
        return {"type": "server_time", "server_time": self.server_time, "local_time": self.local_time}


@dataclass(frozen=True)
class UnknownMessage:
    """A type this supervisor does not know (a newer worker): ignored, never a violation."""

    type: str


WorkerMessage = (Hello | Heartbeat | StateReport | Qr | Paired | Reply | EventMessage | ConnectRequest
                 | ServerTime | UnknownMessage)


# ---------------------------------------------------------------- parsing a worker line (supervisor side)


def _field(message: Mapping[str, Any], key: str, kind: type | tuple[type, ...], *, optional: bool = False) -> Any:
    value = message.get(key)
    if value is None and optional:
        return None
    if not isinstance(value, kind) or isinstance(value, bool) and kind is int:
        raise ValueError(f"a {message.get('type')} message needs {key!r} of type {getattr(kind, '__name__', kind)}")
    return value


_INCOMING_KEYS = {"id": str, "chat": str, "sender": str, "timestamp": str, "is_group": bool, "from_me": bool,
                  "kind": str}
_RECEIPT_KEYS = {"ids": list, "chat": str, "sender": str, "receipt": str, "timestamp": str}


def _parse_event(event: Any) -> IncomingEvent | ReceiptEvent:
    if not isinstance(event, dict):
        raise ValueError("an event message needs an 'event' object")
    kind = event.get("type")
    keys = _INCOMING_KEYS if kind == "message.incoming" else _RECEIPT_KEYS if kind == "message.receipt" else None
    if keys is None:
        raise ValueError(f"unknown event type {kind!r}")
    for key, expected in keys.items():
        _field(event, key, expected)
    return cast("IncomingEvent | ReceiptEvent", event)  # its keys were checked above


def parse_worker_message(message: Mapping[str, Any]) -> WorkerMessage:
    """The typed form of a decoded worker line; ValueError for a malformed one (a protocol
    violation). A type this side does not know is an UnknownMessage, to be ignored."""
    kind = message.get("type")
    match kind:
        case "hello":
            return Hello(_field(message, "pid", int), _field(message, "engine", str))
        case "heartbeat":
            return Heartbeat()
        case "state":
            try:
                state = WorkerState(_field(message, "state", str))
            except ValueError:
                raise ValueError(f"unknown worker state {message.get('state')!r}") from None
            return StateReport(state, reason=_field(message, "reason", str, optional=True),
                               jid=_field(message, "jid", str, optional=True),
                               push_name=_field(message, "push_name", str, optional=True),
                               until=_field(message, "until", str, optional=True))
        case "qr":
            return Qr(_field(message, "code", str), _field(message, "expires_at", str))
        case "paired":
            return Paired(_field(message, "jid", str, optional=True))
        case "reply":
            request_id = _field(message, "id", int, optional=True)
            if message.get("ok") is True:
                return Reply(request_id, result=_field(message, "result", dict, optional=True) or {})
            error = _field(message, "error", dict, optional=True) or {}
            permanent = error.get("permanent")
            return Reply(request_id, error=ReplyError(ErrorCode.parse(error.get("code")),
                                                      str(error.get("message", "failed")),
                                                      None if permanent is None else bool(permanent)))
        case "event":
            return EventMessage(_parse_event(message.get("event")))
        case "connect_request":
            return ConnectRequest()
        case "server_time":
            times = [_field(message, key, (int, float)) for key in ("server_time", "local_time")]
            if any(isinstance(t, bool) or not math.isfinite(t) for t in times):
                raise ValueError("a server_time message needs finite Unix times")
            return ServerTime(float(times[0]), float(times[1]))
        case str():
            return UnknownMessage(kind)
        case _:
            raise ValueError("a protocol message must be a JSON object with a string 'type'")
