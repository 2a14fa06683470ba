"""The event path, in one place: supervisor events -> journal -> live readers.

    Supervisor.publish(event, secret)        (wired to EventBus.publish in daemon.py)
      -> EventBus.publish
           1. the outbox sender reacts       (react: a receipt, an incoming media reference,
                                              a company's new state; see below why first)
           2. store.append                   (the journal; group-committed)
      -> the store commits the batch and calls EventBus.committed (wired in daemon.py)
      -> EventBus.committed
           - every live stream reader whose filters match (a Subscriber's bounded queue)
           - the callers waiting for a message's next status (?wait=sent)

A reader sees an event only once it is committed, so a seq it saw is never lost. The outbox
reacts before the journal append on purpose: an incoming message's media reference is then
stored before a reader can see the message (and ask for its media), and a receipt is applied
as soon as it arrives. Outbox status changes are journaled by the store itself, in the
transaction that makes them; they reach `committed` like every other event.

Live stream readers get bounded queues: a reader that falls behind is cut off and resumes from
its last seq; it never slows the daemon or other readers.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from whatsappd.store import Event, OutboxMessage, Secret, StoreBackend

__all__ = ["EventBus", "Published", "Subscriber"]


@dataclass(frozen=True)
class Published:
    """A supervisor event as the bus hands it on: what the journal records, and what it never does."""

    company: str | None
    type: str
    #: The event's fields as journaled (without type, company and at).
    data: dict[str, Any]
    #: An incoming message's media reference (what a download needs): stored aside, never journaled.
    raw: str | None = None


@dataclass(eq=False)  # identity semantics: each reader is its own subscriber
class Subscriber:
    """One live stream reader: its filters and a bounded queue."""

    companies: frozenset[str]
    types: frozenset[str]
    maxsize: int
    #: (seq, NDJSON line, time.monotonic() of its commit: the stream's lag metric); None ends
    queue: asyncio.Queue[tuple[int, bytes, float] | None] = field(init=False)
    overflowed: bool = False

    def __post_init__(self) -> None:
        self.queue = asyncio.Queue(self.maxsize)

    def wants(self, event: Event) -> bool:
        return ((not self.companies or event.company in self.companies)
                and (not self.types or event.type in self.types))

    def offer(self, item: tuple[int, bytes, float] | None) -> None:
        if self.overflowed:
            return
        try:
            self.queue.put_nowait(item)
        except asyncio.QueueFull:
            # Never wait for a slow reader: mark it; its stream ends with a "cut" line.
            self.overflowed = True


class EventBus:
    """Carries supervisor events to the journal, and committed events to live readers."""

    def __init__(self, store: StoreBackend, reader_buffer: Callable[[], int],
                 react: Callable[[Published], None]) -> None:
        self.store = store
        self._reader_buffer = reader_buffer  # events_reader_buffer, read at each subscribe (reloadable)
        self._react = react
        self.subscribers: set[Subscriber] = set()
        self._status_waiters: dict[str, list[asyncio.Future[None]]] = {}
        self.closed = False

    # ----------------------------------------------------------------- in: the supervisor

    def publish(self, event: dict[str, Any], secret: Secret = None) -> None:
        """A supervisor event ({"type", "company", "at", ...}); secret goes to live readers only."""
        if self.closed:
            return
        data = {k: v for k, v in event.items() if k not in ("type", "company", "at")}
        kind = event["type"]
        raw = data.pop("raw", None) if kind == "message.incoming" else None
        company = event.get("company")
        self._react(Published(company, kind, data, raw))
        self.store.append(company, kind, data, secret)

    # ------------------------------------------------------------------- in: the journal

    def committed(self, event: Event, secret: Secret) -> None:
        """A committed journal event (the store calls this, in seq order)."""
        encoded: tuple[int, bytes, float] | None = None
        for sub in list(self.subscribers):
            if sub.wants(event):
                if encoded is None:
                    # QR codes reach live readers only; the journal on disk never holds them.
                    encoded = (event.seq, event.line(secret), time.monotonic())
                sub.offer(encoded)
        if event.type == "message.status":
            for future in self._status_waiters.pop(str(event.data.get("message_id")), []):
                if not future.done():
                    future.set_result(None)

    # ---------------------------------------------------------------- out: live readers

    def subscribe(self, companies: frozenset[str], types: frozenset[str]) -> Subscriber:
        sub = Subscriber(companies, types, self._reader_buffer())
        self.subscribers.add(sub)
        return sub

    def unsubscribe(self, sub: Subscriber) -> None:
        self.subscribers.discard(sub)

    def end_streams(self) -> None:
        """End every live stream (its reader resumes from its last seq)."""
        for sub in list(self.subscribers):
            sub.offer(None)

    def close(self) -> None:
        """Take no more supervisor events; end the live streams."""
        self.closed = True
        self.end_streams()

    async def wait_status(self, company: str, message_id: str, done: Callable[[OutboxMessage], bool],
                          timeout: float) -> OutboxMessage | None:
        """The message once done(message) holds, or as it is when timeout seconds have passed."""
        deadline = time.monotonic() + timeout
        while True:
            future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            waiters = self._status_waiters.setdefault(message_id, [])
            waiters.append(future)
            try:
                message = await self.store.message(company, message_id)
                if message is None or done(message):
                    return message
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return message
                try:
                    await asyncio.wait_for(future, remaining)
                except TimeoutError:
                    return await self.store.message(company, message_id)
            finally:
                # Never leave a waiter behind: a message that is already final gets no event.
                if future in waiters:
                    waiters.remove(future)
                if not waiters and self._status_waiters.get(message_id) is waiters:
                    del self._status_waiters[message_id]
