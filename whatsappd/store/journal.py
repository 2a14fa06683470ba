"""The event journal's rows and its append path, whatever database holds it.

`Event` is a committed journal row (it has its `seq`); `NewEvent` one waiting to be committed.
`JournalBuffer` is the append path: events appended during one loop tick are committed as one
batch (group commit), then delivered to the commit listeners in seq order, so a listener (and a
stream reader behind it) never sees an event that could still be lost. A batch that cannot be
written (a full disk) is kept in memory ahead of newer events and tried again: nothing is lost.
The backend supplies only the function that commits a batch.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

from whatsappd.logs import get_logger
from whatsappd.timefmt import iso_or_none

__all__ = ["EVENT_TYPES", "CommitListener", "Event", "JournalBuffer", "NewEvent", "Secret"]

log = get_logger()

#: What the journal records (and a stream reader may filter on).
EVENT_TYPES = (
    "company.state", "company.pairing", "company.paired", "company.sending",
    "message.incoming", "message.receipt", "message.status",
)

#: What an event carries to live readers only, never to disk (a pairing QR code).
Secret = dict[str, Any] | None


class NewEvent(NamedTuple):
    """An event appended but not committed yet: it has no seq (a tuple: one is made per event)."""

    at: float
    company: str | None
    type: str
    data: dict[str, Any]
    #: What goes to live readers only (a QR code): a backend shared by several hosts sends it
    #: to the others in the inserting transaction, never stores it.
    secret: Secret = None


@dataclass(frozen=True)
class Event:
    """A committed journal row."""

    seq: int
    at: float
    company: str | None
    type: str
    data: dict[str, Any]

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"seq": self.seq, "at": iso_or_none(self.at), "type": self.type}
        if self.company is not None:
            out["company"] = self.company
        out.update(self.data)
        return out

    def line(self, extra: dict[str, Any] | None = None) -> bytes:
        """The event as one NDJSON line (encoded once, shared by every reader)."""
        item = self.as_dict()
        if extra:
            item.update(extra)
        return json.dumps(item, separators=(",", ":"), ensure_ascii=False).encode() + b"\n"


#: Called, in the loop, for each committed event with its secret (None for most).
CommitListener = Callable[[Event, Secret], None]


class JournalBuffer:
    """Appends batched per loop tick, committed by `commit`, delivered after their commit in seq order."""

    def __init__(self, commit: Callable[[list[NewEvent]], Awaitable[list[Event]]],
                 retry_on: tuple[type[BaseException], ...], where: str) -> None:
        self._commit = commit
        self._retry_on = retry_on  # a batch failing with one of these is kept and retried
        self._where = where  # names the store in logs
        self._pending: list[NewEvent] = []
        self._pending_secrets: list[Secret] = []
        self._flush_scheduled = False
        self._flushing: asyncio.Task[None] | None = None
        self._listeners: list[CommitListener] = []
        #: The newest seq delivered (or found at open).
        self.last_seq = 0

    def subscribe(self, listener: CommitListener) -> Callable[[], None]:
        """listener(event, secret) is called, in the loop, for each committed event; returns an unsubscribe."""
        self._listeners.append(listener)
        return lambda: self._listeners.remove(listener) if listener in self._listeners else None

    def append(self, company: str | None, type_: str, data: dict[str, Any], secret: Secret = None) -> None:
        """Queue an event; it is committed with the others of this tick, then delivered."""
        self._pending.append(NewEvent(time.time(), company, type_, data, secret))
        self._pending_secrets.append(secret)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._start_flush)

    def _start_flush(self) -> None:
        if self._flushing is None or self._flushing.done():
            self._flushing = asyncio.get_running_loop().create_task(self._flush_loop())

    async def _flush_loop(self) -> None:
        failures = 0
        while self._pending:
            batch, secrets = self._pending, self._pending_secrets
            self._pending, self._pending_secrets = [], []
            self._flush_scheduled = False
            try:
                events = await self._commit(batch)
            except self._retry_on as exc:
                # Disk full, I/O error: keep the batch (ahead of newer events) and try again,
                # rather than lose it. Readers simply see nothing new until it commits.
                self._pending, self._pending_secrets = batch + self._pending, secrets + self._pending_secrets
                failures += 1
                log.error("cannot write events to the journal; kept in memory, retrying", error=str(exc),
                          attempt=failures, events=len(self._pending), path=self._where)
                await asyncio.sleep(min(30.0, 0.5 * 2 ** min(failures, 6)))
                continue
            failures = 0
            self.deliver(events, secrets)
        self._flush_scheduled = False

    def deliver(self, events: list[Event], secrets: list[Secret] | None = None) -> None:
        """Hand committed events to the listeners, in order (also those a backend journaled itself)."""
        if not events:
            return
        self.last_seq = max(self.last_seq, events[-1].seq)
        for n, event in enumerate(events):
            secret = secrets[n] if secrets is not None else None
            for listener in list(self._listeners):
                listener(event, secret)

    async def flush(self) -> None:
        """Wait until every appended event is committed and delivered."""
        while self._pending or (self._flushing is not None and not self._flushing.done()):
            if self._flushing is None or self._flushing.done():
                self._start_flush()
            assert self._flushing is not None
            await asyncio.shield(self._flushing)
