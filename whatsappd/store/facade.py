"""The async face every store backend shows (`StoreBackend`), written once over its SQL.

`StoreFacade` holds the journal buffer, the enqueue group commit and every `StoreBackend`
method as a one-line binding of an `SqlFunctions` entry to the backend's `run` (a write on its
writer thread), `_run_journaled` (a write whose inserted events are delivered in seq order) or
`read` (a reader connection). A backend (store/sqlite.py, store/postgresql.py) supplies those
three, its open/close/health, and its SQL: a module of functions on one connection type that is
an `SqlFunctions`, which mypy checks against the signature the facade calls each with.
"""

from __future__ import annotations

import abc
import time
from collections.abc import Callable, Iterable
from typing import Any, Generic, Protocol, TypeVar

from whatsappd.store.backend import IncomingMedia, StoredWebhook
from whatsappd.store.core import GroupCommit
from whatsappd.store.journal import CommitListener, Event, JournalBuffer, NewEvent, Secret
from whatsappd.store.outbox import MessageStatus, OutboxMessage, OutgoingMessage

__all__ = ["SqlFunctions", "StoreFacade"]

C = TypeVar("C")
C_contra = TypeVar("C_contra", contravariant=True)
T = TypeVar("T")
#: What a write returns, with the events it inserted (delivered by `_run_journaled`).
Journaled = tuple[T, list[Event]]
Enqueued = tuple[bool, OutboxMessage]


class SqlFunctions(Protocol[C_contra]):
    """A backend's SQL, each a function taking its connection (C_contra) first.

    A backend hands its own module (store/sqlite.py, store/postgresql.py) as one: mypy checks the
    module's functions against these members (parameters positional-only: names are free), and
    only names in the module's `__all__` count."""

    # journal
    def insert_events(self, db: C_contra, batch: list[NewEvent], /) -> list[Event]: ...
    def select_events(self, db: C_contra, since: int, limit: int, companies: list[str], types: list[str],
                      until: int | None, /) -> list[Event]: ...
    def oldest_seq(self, db: C_contra, /) -> int | None: ...
    def prune(self, db: C_contra, cutoff: float, max_events: int, /) -> int: ...
    # outbox
    def enqueue_batch(self, db: C_contra, batch: list[tuple[OutgoingMessage, float]], /
                      ) -> Journaled[list[Enqueued | Exception]]: ...
    def select_message(self, db: C_contra, company: str, message_id: str, /) -> OutboxMessage | None: ...
    def next_pending(self, db: C_contra, company: str, /) -> OutboxMessage | None: ...
    def set_status(self, db: C_contra, message_id: str, status: MessageStatus, wa_id: str | None,
                   error_code: str | None, error: str | None, sent_at: float | None, /
                   ) -> Journaled[OutboxMessage | None]: ...
    def receipt(self, db: C_contra, company: str, wa_ids: list[str], status: MessageStatus, /
                ) -> Journaled[tuple[list[OutboxMessage], list[str]]]: ...
    def in_flight(self, db: C_contra, company: str, /) -> list[OutboxMessage]: ...
    def expire(self, db: C_contra, now: float, /) -> Journaled[list[OutboxMessage]]: ...
    def fail_stale_sending(self, db: C_contra, now: float, busy: frozenset[str], /) -> Journaled[list[OutboxMessage]]: ...
    def counts(self, db: C_contra, /) -> dict[str, int]: ...
    def counts_by_company(self, db: C_contra, /) -> dict[tuple[str, str], tuple[int, float]]: ...
    # media
    def select_media(self, db: C_contra, message_id: str, /) -> bytes | None: ...
    def store_incoming_media(self, db: C_contra, company: str, wa_id: str, kind: str, mimetype: str | None,
                             raw: str, /) -> None: ...
    def select_incoming_media(self, db: C_contra, company: str, wa_id: str, /) -> IncomingMedia | None: ...
    # pacing
    def record_contact(self, db: C_contra, company: str, jid: str, now: float, /) -> None: ...
    def is_known_contact(self, db: C_contra, company: str, jid: str, /) -> bool: ...
    def first_contacts(self, db: C_contra, company: str, now: float, /) -> dict[str, float]: ...
    def record_first_contact(self, db: C_contra, company: str, jid: str, now: float, /) -> None: ...
    def recent_sends(self, db: C_contra, company: str, limit: int, /) -> list[float]: ...
    def set_pause(self, db: C_contra, company: str, until: float | None, reason: str | None, /) -> None: ...
    def pauses(self, db: C_contra, /) -> dict[str, tuple[float, str]]: ...
    # webhooks
    def webhooks(self, db: C_contra, /) -> list[StoredWebhook]: ...
    def put_webhook(self, db: C_contra, webhook_id: str, definition: dict[str, Any] | None, cursor: int, /) -> int: ...
    def set_webhook_cursor(self, db: C_contra, webhook_id: str, cursor: int, /) -> None: ...
    def delete_webhook(self, db: C_contra, webhook_id: str, /) -> None: ...


class StoreFacade(abc.ABC, Generic[C]):
    """`StoreBackend`'s journal, outbox, media, pacing and webhook methods over a backend's SQL."""

    def __init__(self, sql: SqlFunctions[C], retry_on: tuple[type[BaseException], ...], where: str) -> None:
        """retry_on: the errors a failed event batch is kept and retried on; where: the store, for logs."""
        self._sql = sql
        self._journal = JournalBuffer(self._commit_events, retry_on, where)
        self._enqueues: GroupCommit[tuple[OutgoingMessage, float], Enqueued] = GroupCommit(self._commit_enqueues)

    # ------------------------------------------------------------- what a backend provides

    @abc.abstractmethod
    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """Run fn(db, *args) on the writer thread."""

    @abc.abstractmethod
    async def _run_journaled(self, fn: Callable[..., tuple[T, list[Event]]], *args: Any) -> T:
        """Run fn(db, *args) -> (result, events it inserted) on the writer; deliver the events in seq order."""

    @abc.abstractmethod
    async def read(self, fn: Callable[..., T], *args: Any) -> T:
        """Run fn(read_connection, *args) on a reader thread."""

    # ------------------------------------------------------------------------------ journal

    @property
    def last_seq(self) -> int:
        return self._journal.last_seq

    def advance(self, seq: int) -> None:
        """An event committed by another host (seq) was delivered: the newest known is at least seq."""
        self._journal.last_seq = max(self._journal.last_seq, seq)

    def subscribe(self, listener: CommitListener) -> Callable[[], None]:
        """listener(event, secret) is called, in the loop, for each committed event."""
        return self._journal.subscribe(listener)

    def append(self, company: str | None, type_: str, data: dict[str, Any], secret: Secret = None) -> None:
        """Queue an event; it is committed with the others of this tick, then delivered."""
        self._journal.append(company, type_, data, secret)

    async def _commit_events(self, batch: list[NewEvent]) -> list[Event]:
        return await self.run(self._sql.insert_events, batch)

    async def flush(self) -> None:
        """Wait until every appended event is committed and delivered."""
        await self._journal.flush()

    async def events_after(self, since: int, limit: int, companies: Iterable[str] = (),
                           types: Iterable[str] = (), until: int | None = None) -> list[Event]:
        return await self.read(self._sql.select_events, since, limit, list(companies), list(types), until)

    async def oldest_seq(self) -> int | None:
        return await self.read(self._sql.oldest_seq)

    async def prune(self, max_age: float, max_events: int) -> int:
        return await self.run(self._sql.prune, time.time() - max_age, max_events)

    # ------------------------------------------------------------------------------- outbox

    async def enqueue(self, message: OutgoingMessage, idem_window: float) -> tuple[bool, OutboxMessage]:
        """Store a message durably. Returns (created, message); a replayed key gives the first.

        Group commit: the messages that arrive while a commit is under way go into the next
        transaction together (one fsync for all of them); each still returns only once the
        transaction holding it committed, and one that fails alone is rolled back alone.
        """
        return await self._enqueues.submit((message, idem_window))

    async def _commit_enqueues(self, batch: list[tuple[OutgoingMessage, float]]) -> list[Enqueued | Exception]:
        return await self._run_journaled(self._sql.enqueue_batch, batch)

    async def message(self, company: str, message_id: str) -> OutboxMessage | None:
        return await self.read(self._sql.select_message, company, message_id)

    async def next_pending(self, company: str) -> OutboxMessage | None:
        return await self.read(self._sql.next_pending, company)

    async def set_status(self, message_id: str, status: MessageStatus, *, wa_id: str | None = None,
                         error_code: str | None = None, error: str | None = None,
                         sent_at: float | None = None) -> OutboxMessage | None:
        """Move a message to a status; None if that move is not allowed (e.g. read -> sent)."""
        return await self._run_journaled(self._sql.set_status, message_id, MessageStatus(status), wa_id, error_code,
                                         error, sent_at)

    async def receipt(self, company: str, wa_ids: list[str],
                      status: MessageStatus) -> tuple[list[OutboxMessage], list[str]]:
        return await self._run_journaled(self._sql.receipt, company, wa_ids, MessageStatus(status))

    async def in_flight(self, company: str) -> list[OutboxMessage]:
        return await self.read(self._sql.in_flight, company)

    async def expire(self) -> list[OutboxMessage]:
        return await self._run_journaled(self._sql.expire, time.time())

    async def fail_stale_sending(self, now: float, busy: frozenset[str]) -> list[OutboxMessage]:
        return await self._run_journaled(self._sql.fail_stale_sending, now, busy)

    async def counts(self) -> dict[str, int]:
        return await self.read(self._sql.counts)

    async def counts_by_company(self) -> dict[tuple[str, str], tuple[int, float]]:
        return await self.read(self._sql.counts_by_company)

    # -------------------------------------------------------------------------------- media

    async def media(self, message_id: str) -> bytes | None:
        return await self.read(self._sql.select_media, message_id)

    async def store_incoming_media(self, company: str, wa_id: str, kind: str, mimetype: str | None,
                                   raw: str) -> None:
        await self.run(self._sql.store_incoming_media, company, wa_id, kind, mimetype, raw)

    async def incoming_media(self, company: str, wa_id: str) -> IncomingMedia | None:
        return await self.read(self._sql.select_incoming_media, company, wa_id)

    # ------------------------------------------------------------------------------- pacing

    async def record_contact(self, company: str, jid: str) -> None:
        await self.run(self._sql.record_contact, company, jid, time.time())

    async def is_known_contact(self, company: str, jid: str) -> bool:
        return await self.read(self._sql.is_known_contact, company, jid)

    async def first_contacts(self, company: str, now: float) -> dict[str, float]:
        return await self.read(self._sql.first_contacts, company, now)

    async def record_first_contact(self, company: str, jid: str, now: float) -> None:
        await self.run(self._sql.record_first_contact, company, jid, now)

    async def recent_sends(self, company: str, limit: int) -> list[float]:
        return await self.read(self._sql.recent_sends, company, limit)

    async def set_pacing_pause(self, company: str, until: float | None, reason: str | None) -> None:
        await self.run(self._sql.set_pause, company, until, reason)

    async def pacing_pauses(self) -> dict[str, tuple[float, str]]:
        return await self.read(self._sql.pauses)

    # ----------------------------------------------------------------------------- webhooks

    async def webhooks(self) -> list[StoredWebhook]:
        return await self.read(self._sql.webhooks)

    async def put_webhook(self, webhook_id: str, definition: dict[str, Any] | None, cursor: int) -> int:
        return await self.run(self._sql.put_webhook, webhook_id, definition, cursor)

    async def set_webhook_cursor(self, webhook_id: str, cursor: int) -> None:
        await self.run(self._sql.set_webhook_cursor, webhook_id, cursor)

    async def delete_webhook(self, webhook_id: str) -> None:
        await self.run(self._sql.delete_webhook, webhook_id)
