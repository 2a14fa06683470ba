"""The outbox's values and rules, whatever database holds it.

- `OutgoingMessage`: what the control API accepted for sending, built once by its send handler
  and stored as it is.
- `OutboxMessage`: a stored message as the API shows it (`GET .../messages/{id}`, the 202).
- `MessageStatus` and `ALLOWED`: the statuses and which may follow which; receipts only move a
  message forward (`RECEIPT_RANK`).
"""

from __future__ import annotations

import hashlib
import json
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, NotRequired, TypedDict

from whatsappd.timefmt import iso_or_none

__all__ = ["ALLOWED", "RECEIPT_RANK", "STATUSES", "IdempotencyConflict", "MessageError", "MessageStatus",
           "OutboxMessage", "OutgoingMessage", "Payload", "body_hash", "message_from_row", "new_message_id",
           "status_event_data"]


class MessageStatus(StrEnum):
    """Where an outgoing message is (equal to its string: "queued" == MessageStatus.QUEUED)."""

    QUEUED = "queued"
    SENDING = "sending"
    SENT = "sent"
    DELIVERED = "delivered"
    READ = "read"
    FAILED = "failed"
    EXPIRED = "expired"


#: Every status, in their life's order (the OpenAPI enum, the metrics' labels).
STATUSES = tuple(MessageStatus)

#: Which status may follow which; anything else is refused (set_status answers None).
ALLOWED: dict[MessageStatus, frozenset[MessageStatus]] = {
    MessageStatus.QUEUED: frozenset({MessageStatus.SENDING, MessageStatus.FAILED, MessageStatus.EXPIRED}),
    MessageStatus.SENDING: frozenset({MessageStatus.SENT, MessageStatus.QUEUED, MessageStatus.FAILED}),
    MessageStatus.SENT: frozenset({MessageStatus.DELIVERED, MessageStatus.READ}),
    MessageStatus.DELIVERED: frozenset({MessageStatus.READ}),
    MessageStatus.READ: frozenset(),
    MessageStatus.FAILED: frozenset(),
    MessageStatus.EXPIRED: frozenset(),
}

#: How far a sent message has got: a receipt applies only if it moves the message forward.
RECEIPT_RANK = {MessageStatus.SENT: 1, MessageStatus.DELIVERED: 2, MessageStatus.READ: 3}


class IdempotencyConflict(Exception):
    """The same Idempotency-Key was used with a different body; args[0] is the first message's id."""


class Payload(TypedDict, total=False):
    """What is stored of a message's content: its text, or its media's description (bytes apart)."""

    text: str
    caption: str | None
    filename: str | None
    mimetype: str | None
    size: int


@dataclass(frozen=True)
class OutgoingMessage:
    """A message the control API accepted for sending, before it is stored."""

    company: str
    #: The recipient's JID, and what the client wrote for it.
    recipient: str
    to: str
    kind: str  # "text", "image", "document" or "audio"
    payload: Payload
    media: bytes | None
    ttl: float  # seconds
    idempotency_key: str | None
    #: The request body as sent: a replayed Idempotency-Key must come with the same one.
    body: Any

    @property
    def body_hash(self) -> str:
        return body_hash(self.body)


class MessageError(TypedDict):
    code: str
    message: str | None


class OutboxMessage(TypedDict):
    """A stored outgoing message, as the API shows it (times are ISO 8601 strings)."""

    id: str
    company: str
    to: str
    jid: str
    kind: str
    status: MessageStatus
    wa_id: str | None
    attempts: int
    created_at: str | None
    updated_at: str | None
    expires_at: str | None
    sent_at: str | None
    delivered_at: str | None
    read_at: str | None
    error: MessageError | None
    idempotency_key: str | None
    # The payload's description of media (not the text: only the sender reads it back).
    caption: NotRequired[str | None]
    filename: NotRequired[str | None]
    mimetype: NotRequired[str | None]
    size: NotRequired[int]
    text: NotRequired[str | None]
    # While queued (the API adds them, from the sender): until when pacing holds it back, and why.
    paced_until: NotRequired[str | None]
    paced_reason: NotRequired[str | None]
    # [cluster] In the sender's view of a `sending` message (in_flight): the lease token it was claimed under.
    claim: NotRequired[int | None]


def new_message_id() -> str:
    return "msg_" + secrets.token_hex(12)


def body_hash(body: Any) -> str:
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def message_from_row(row: Mapping[str, Any]) -> OutboxMessage:
    """A stored message row (every backend's columns have the same names) as the API shows it.

    The text stays out: only the sender reads it back (a backend's next_pending adds it).
    """
    out: OutboxMessage = {
        "id": row["id"], "company": row["company"], "to": row["to_input"], "jid": row["recipient"],
        "kind": row["kind"], "status": MessageStatus(row["status"]), "wa_id": row["wa_id"],
        "attempts": row["attempts"], "created_at": iso_or_none(row["created_at"]),
        "updated_at": iso_or_none(row["updated_at"]), "expires_at": iso_or_none(row["expires_at"]),
        "sent_at": iso_or_none(row["sent_at"]), "delivered_at": iso_or_none(row["delivered_at"]),
        "read_at": iso_or_none(row["read_at"]),
        "error": {"code": row["error_code"], "message": row["error"]} if row["error_code"] else None,
        "idempotency_key": row["idem_key"],
    }
    out.update({k: v for k, v in json.loads(row["payload"]).items() if k != "text"})  # type: ignore[typeddict-item]
    return out


def status_event_data(message: OutboxMessage) -> dict[str, Any]:
    """What the `message.status` event for a message's new status carries."""
    data: dict[str, Any] = {"message_id": message["id"], "status": message["status"],
                            "wa_id": message.get("wa_id"), "to": message.get("to")}
    if message.get("error"):
        data["error"] = message["error"]
    return data
