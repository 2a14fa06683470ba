"""What the daemon needs from a store, whichever database is behind it.

`StoreBackend` lists every operation the daemon, the messaging layer and the control API use;
`whatsappd.store.sqlite.Store` implements it on one SQLite file, and a PostgreSQL store would
implement the same (callers type against this protocol, never against the SQLite class). The
errors below are part of the contract: every backend raises them for the same situations.

The guarantees every backend keeps (docs/INTERNALS.md, "The store"):
- an event reaches commit listeners only after its transaction committed, in seq order, and a
  seq is never reused;
- an outbox status change and its `message.status` event are one transaction;
- `enqueue` answers only once its message is committed (a 202 means on disk);
- a full disk is `StorageFull` with nothing half-written, and the store says so in `health()`
  until a write succeeds again.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Protocol, TypedDict

from whatsappd.store.journal import CommitListener, Event, Secret
from whatsappd.store.outbox import MessageStatus, OutboxMessage, OutgoingMessage

__all__ = ["IncomingMedia", "StorageFull", "StoreBackend", "StoreCorrupt", "StoreError", "StoredWebhook"]


class StoreError(Exception):
    """The store cannot be opened or used; the message says which file and what to do."""


class StorageFull(StoreError):
    """The disk (or quota) holding the store is full: the write was rolled back, nothing of it stored."""


class StoreCorrupt(StoreError):
    """The database is damaged: restarting cannot help; `fix` says what to do."""

    def __init__(self, path: Path, problem: str, fix: str) -> None:
        self.path = path
        self.problem = problem
        self.fix = fix
        super().__init__(f"the store {path} is damaged ({problem}); {fix}")


class IncomingMedia(TypedDict):
    """An incoming message's media reference, kept for a later download."""

    kind: str
    mimetype: str | None
    raw: str  # what the engine needs to download it


class StoredWebhook(TypedDict):
    """A webhook's row: its delivery cursor, and its definition if it was added through the API."""

    id: str
    cursor: int  # the newest seq delivered, or passed over by its filters
    definition: dict[str, Any] | None  # None: the webhook comes from the config file


class StoreBackend(Protocol):
    """The store as the daemon uses it: lifecycle, journal, outbox, media."""

    # ---------------------------------------------------------------------------- lifecycle

    def open(self) -> None:
        """Create or open the store (blocking, before the loop serves); StoreCorrupt if damaged."""

    async def close(self) -> None:
        """Commit what is pending and close."""

    def health(self) -> dict[str, Any]:
        """{"state": "ok", ...} or, while the disk is full, {"state": "full", "since", "message", ...}."""

    @property
    def full_since(self) -> float | None:
        """When the disk was first found full (None: it is not)."""

    @property
    def full_refusals(self) -> int:
        """Writes refused because the disk was full, since start (a metric)."""

    # ------------------------------------------------------------------------------ journal

    @property
    def last_seq(self) -> int:
        """The newest committed and delivered seq."""

    def subscribe(self, listener: CommitListener) -> Callable[[], None]:
        """listener(event, secret) for each committed event, in seq order; returns an unsubscribe."""

    def append(self, company: str | None, type_: str, data: dict[str, Any], secret: Secret = None) -> None:
        """Journal an event (group-committed; delivered after its commit)."""

    async def flush(self) -> None:
        """Wait until every appended event is committed and delivered."""

    async def events_after(self, since: int, limit: int, companies: Iterable[str] = (),
                           types: Iterable[str] = (), until: int | None = None) -> list[Event]:
        """Committed events with seq > since (and <= until), filtered, oldest first."""

    async def oldest_seq(self) -> int | None:
        """The oldest seq still kept (None: the journal is empty)."""

    async def prune(self, max_age: float, max_events: int) -> int:
        """Delete events older than max_age seconds or beyond the newest max_events; how many went."""

    # ------------------------------------------------------------------------------- outbox

    async def enqueue(self, message: OutgoingMessage, idem_window: float) -> tuple[bool, OutboxMessage]:
        """Store a message `queued` (with its event). (created, message); a replayed key gives the first.

        Raises IdempotencyConflict for a key reused with another body within idem_window seconds.
        """

    async def message(self, company: str, message_id: str) -> OutboxMessage | None:
        """One message of company, as the API shows it."""

    async def next_pending(self, company: str) -> OutboxMessage | None:
        """The company's oldest `queued` message within its ttl, with its text (the next to send)."""

    async def set_status(self, message_id: str, status: MessageStatus, *, wa_id: str | None = None,
                         error_code: str | None = None, error: str | None = None,
                         sent_at: float | None = None) -> OutboxMessage | None:
        """Move a message to status, with its event; None if that move is not allowed (see ALLOWED)."""

    async def receipt(self, company: str, wa_ids: list[str],
                      status: MessageStatus) -> tuple[list[OutboxMessage], list[str]]:
        """Apply a delivered/read receipt (forward moves only): the messages changed, the unknown wa ids."""

    async def in_flight(self, company: str) -> list[OutboxMessage]:
        """The company's messages left `sending`, in send order."""

    async def expire(self) -> list[OutboxMessage]:
        """Queued messages past their ttl become `expired` (with their events)."""

    async def fail_stale_sending(self, now: float, busy: frozenset[str]) -> list[OutboxMessage]:
        """`sending` messages past their ttl, not in busy, become `failed` (send_interrupted)."""

    async def counts(self) -> dict[str, int]:
        """How many messages are in each status."""

    async def counts_by_company(self) -> dict[tuple[str, str], tuple[int, float]]:
        """(company, status) -> (how many messages, the oldest one's created_at): the metrics' outbox series."""

    # -------------------------------------------------------------------------------- media

    async def media(self, message_id: str) -> bytes | None:
        """The bytes of an outgoing message's media (kept until it is sent, failed or expired)."""

    async def store_incoming_media(self, company: str, wa_id: str, kind: str, mimetype: str | None,
                                   raw: str) -> None:
        """Keep an incoming message's media reference, for a later download (pruned with the journal)."""

    async def incoming_media(self, company: str, wa_id: str) -> IncomingMedia | None:
        """An incoming message's media reference, None if not kept (or pruned)."""

    # ------------------------------------------------------------------------------- pacing

    async def record_contact(self, company: str, jid: str) -> None:
        """jid wrote to company's number: it is no first contact any more."""

    async def is_known_contact(self, company: str, jid: str) -> bool:
        """Whether jid ever wrote to company's number (as far as the store knows)."""

    async def first_contacts(self, company: str, now: float) -> dict[str, float]:
        """{jid: first send} of the company's first-contact recipients in the 24 hours before now."""

    async def record_first_contact(self, company: str, jid: str, now: float) -> None:
        """Count jid against the first-contact budget (once within the window)."""

    async def recent_sends(self, company: str, limit: int) -> list[float]:
        """The company's last limit send times, oldest first."""

    async def set_pacing_pause(self, company: str, until: float | None, reason: str | None) -> None:
        """Keep (until: Unix time) or end (None) the company's rate-limit pause."""

    async def pacing_pauses(self) -> dict[str, tuple[float, str]]:
        """Every kept pause: {company: (until, reason)}."""

    # ----------------------------------------------------------------------------- webhooks
    # One row per webhook (whatsappd/webhooks/): its cursor in the journal, and for a webhook
    # added with PUT /v1/webhooks/{id} its definition (secret included). Cursor writes come often
    # (coalesced by the caller: one in flight at a time per webhook) and need not be group-committed
    # with anything else; losing the last ones in a crash only re-delivers those events.

    async def webhooks(self) -> list[StoredWebhook]:
        """Every webhook row, by id."""

    async def put_webhook(self, webhook_id: str, definition: dict[str, Any] | None, cursor: int) -> int:
        """Create the row at cursor, or replace the definition of an existing one keeping its cursor;
        returns the row's cursor (committed when it returns)."""

    async def set_webhook_cursor(self, webhook_id: str, cursor: int) -> None:
        """Move a webhook's cursor (committed when it returns; no row: nothing happens)."""

    async def delete_webhook(self, webhook_id: str) -> None:
        """Forget a webhook's row (definition and cursor)."""
