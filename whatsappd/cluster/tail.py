"""Every host's live streams see every host's events: the journal tail and the LISTEN connection.

    this host's commits ---------------------------> JournalTail.local ---\\
    LISTEN (whatsappd_journal: a seq; _secret) ----> JournalTail.announce   > deliver(event, secret)
    SELECT seq > next-1 (the journal table) -------> JournalTail (its task) /   in seq order, once each

`JournalTail` hands the EventBus every committed event of the shared journal in seq order, once
each. Seqs are gapless and in commit order across hosts (store/postgresql.py: the head row and
JOURNAL_LOCK), so "the next seq" is always known: an event of this host's own commit that is the
next goes out at once (a single host is as fast as before); one that comes after a seq not seen
yet (another host's) waits for it, and the tail reads it from the table. Notifications are only
wake-ups: after the LISTEN connection is made again, the tail reads whatever it missed.

A secret (a QR code) reaches other hosts in a `whatsappd_secret` notification sent in the
inserting transaction, before that transaction's `whatsappd_journal` one; so the tail reads rows
only up to the newest seq announced (while listening), and every secret sent with them has
arrived. A seq missing below the first row read is one the retention policy pruned.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections.abc import Callable
from typing import Any

import psycopg

from whatsappd.cluster.shared import COMMANDS_CHANNEL, JOURNAL_CHANNEL, OUTBOX_CHANNEL, SECRET_CHANNEL
from whatsappd.logs import get_logger
from whatsappd.store import Event, Secret
from whatsappd.store.postgresql import PostgresStore, redact

__all__ = ["CHANNELS", "JournalTail", "Listener", "listener_name"]

log = get_logger()

#: What the LISTEN connection listens to.
CHANNELS = (JOURNAL_CHANNEL, SECRET_CHANNEL, OUTBOX_CHANNEL, COMMANDS_CHANNEL)
#: Rows read from the journal per query.
_BATCH = 1000
#: How long an event of this host waits for the other hosts' events before it, not yet announced,
#: before they are read without waiting for their notification (a LISTEN connection being made again).
_GAP_GRACE = 0.2
#: A listener that hears nothing this long checks its connection.
_PING = 30.0
_BACKOFF = (0.2, 10.0)


def listener_name(host: str) -> str:
    """The application_name of a host's LISTEN connection (pg_stat_activity shows it)."""
    return f"whatsappd-listen {host}"[:63]


class JournalTail:
    """Delivers the shared journal's events in seq order, once each, whichever host committed them."""

    def __init__(self, store: PostgresStore, deliver: Callable[[Event, Secret], None]) -> None:
        self._store = store
        self._deliver = deliver
        self._next = 0  # the next seq to deliver (set at start)
        self._pending: dict[int, tuple[Event, Secret]] = {}  # this host's events waiting for earlier seqs
        self._secrets: dict[int, dict[str, Any]] = {}  # from whatsappd_secret, until their row is read
        self._announced = 0  # the newest seq a notification announced
        self.listening = False  # while False, rows are read without waiting to be announced
        self._gap_since: float | None = None
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Once the store is open: everything after its newest seq is delivered from now on."""
        self._next = self._store.last_seq + 1
        self._announced = self._store.last_seq
        self._task = asyncio.get_running_loop().create_task(self._run(), name="journal tail")

    async def close(self) -> None:
        """Stop tailing; this host's last commits (the shutdown's flush) then go on directly."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        for event, secret in [self._pending.pop(seq) for seq in sorted(self._pending)]:
            self.local(event, secret)

    # ---------------------------------------------------------------------------------- in

    def local(self, event: Event, secret: Secret) -> None:
        """An event this host committed (the store's commit listener)."""
        if self._task is None:  # not tailing yet (the daemon is starting): as on a single host
            self._store.advance(event.seq)
            self._deliver(event, secret)
        elif event.seq == self._next and not self._pending:
            self._hand(event, secret)  # the usual case, and the only one on a single host
        elif event.seq > self._next:
            self._pending[event.seq] = (event, secret)
            if self._gap_since is None:
                self._gap_since = time.monotonic()
            self._wake.set()

    def announce(self, seq: int) -> None:
        """A whatsappd_journal notification: seq and every seq before it are committed."""
        if seq > self._announced:
            self._announced = seq
            if seq >= self._next:
                self._wake.set()

    def secret(self, seq: int, secret: dict[str, Any]) -> None:
        """A whatsappd_secret notification (it comes before its seq's announcement)."""
        if seq >= self._next:
            self._secrets[seq] = secret

    def reconnected(self, head: int) -> None:
        """LISTEN is (again) in place and the journal head was head then: read what was missed."""
        self.listening = True
        self.announce(head)
        self._wake.set()

    # --------------------------------------------------------------------------------- out

    def _hand(self, event: Event, secret: Secret) -> None:
        self._next = event.seq + 1
        self._secrets.pop(event.seq, None)
        self._store.advance(event.seq)
        self._deliver(event, secret)

    def _drain(self) -> None:
        """Hand on this host's waiting events that are next now."""
        while (item := self._pending.pop(self._next, None)) is not None:
            self._hand(*item)
        for seq in [s for s in self._pending if s < self._next]:
            del self._pending[seq]
        self._gap_since = time.monotonic() if self._pending else None

    def _bound(self) -> int | None:
        """Read rows up to here (None: all): the announced ones, or more for a gap waited on too long."""
        if not self.listening:
            return None
        bound = self._announced
        if self._pending and self._gap_since is not None and time.monotonic() - self._gap_since >= _GAP_GRACE:
            bound = max(bound, min(self._pending) - 1)
        return bound

    async def _run(self) -> None:
        failures = 0
        while True:
            timeout = None
            if self._pending and self._gap_since is not None:
                timeout = max(0.0, self._gap_since + _GAP_GRACE - time.monotonic()) + 0.001
            try:
                await asyncio.wait_for(self._wake.wait(), timeout)
            except TimeoutError:
                pass
            self._wake.clear()
            try:
                await self._catch_up()
                failures = 0
            except Exception as exc:  # a store error: try again, the table keeps everything
                failures += 1
                log.warning("cannot read the shared journal; retrying", error=str(exc), attempt=failures)
                await asyncio.sleep(min(_BACKOFF[1], _BACKOFF[0] * 2 ** failures))
                self._wake.set()

    async def _catch_up(self) -> None:
        while True:
            bound = self._bound()
            if bound is not None and bound < self._next:
                return
            # This host's events already waiting when the read starts: the read's snapshot has
            # their rows (unless pruned). One committed here DURING the read is not in it, so an
            # empty read says nothing about the seqs below that one.
            known = set(self._pending)
            rows = await self._store.events_after(self._next - 1, _BATCH, until=bound)
            for event in rows:
                if event.seq < self._next:
                    continue  # delivered meanwhile (this host's own commit)
                local = self._pending.pop(event.seq, None)
                self._hand(event, local[1] if local else self._secrets.get(event.seq))
                self._drain()
            if len(rows) < _BATCH:
                waiting = [seq for seq in self._pending if seq in known]
                if bound is None and not rows and waiting:
                    # Nothing to read below an event that was waiting before the read: the gap
                    # was pruned (or is the next seq).
                    self._next = min(waiting)
                    self._drain()
                return


class Listener:
    """The host's one LISTEN connection (direct to PostgreSQL: PgBouncer's transaction pooling
    cannot carry LISTEN), made again with backoff; every (re)connection catches up by SELECT."""

    def __init__(self, dsn: str, host: str, tail: JournalTail,
                 on_outbox: Callable[[str], None], on_commands: Callable[[dict[str, Any]], None],
                 on_connected: Callable[[], None]) -> None:
        self._dsn = dsn
        self._host = host
        self._tail = tail
        self._on_outbox = on_outbox
        self._on_commands = on_commands
        self._on_connected = on_connected
        self._task: asyncio.Task[None] | None = None
        self.connected = asyncio.Event()

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="listener")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _run(self) -> None:
        failures = 0
        while True:
            try:
                async with await psycopg.AsyncConnection.connect(
                        self._dsn, autocommit=True, connect_timeout=10, application_name=listener_name(self._host),
                        keepalives=1, keepalives_idle=30, keepalives_interval=10, keepalives_count=3) as db:
                    for channel in CHANNELS:
                        await db.execute(f"LISTEN {channel}")  # our constants, never input
                    cur = await db.execute("SELECT seq FROM whatsappd_journal_head")
                    row = await cur.fetchone()
                    self._tail.reconnected(int(row[0]) if row else 0)
                    self.connected.set()
                    if failures:
                        log.info("LISTEN connection made again; catching up from the journal", attempts=failures)
                    failures = 0
                    self._on_connected()
                    while True:
                        async for note in db.notifies(timeout=_PING):
                            self._dispatch(note.channel, note.payload)
                        await db.execute("SELECT 1")  # quiet for a while: is the connection still there?
            except asyncio.CancelledError:
                raise
            except (psycopg.Error, OSError) as exc:
                self._tail.listening = False
                self.connected.clear()
                failures += 1
                delay = min(_BACKOFF[1], _BACKOFF[0] * 2 ** min(failures, 8)) * random.uniform(0.5, 1.0)
                log.warning("LISTEN connection lost; reconnecting", error=str(exc).replace(self._dsn, redact(self._dsn)),
                            attempt=failures, retry_in=round(delay, 2))
                await asyncio.sleep(delay)

    def _dispatch(self, channel: str, payload: str) -> None:
        try:
            if channel == JOURNAL_CHANNEL:
                self._tail.announce(int(payload))
            elif channel == SECRET_CHANNEL:
                note = json.loads(payload)
                self._tail.secret(int(note["seq"]), dict(note["secret"]))
            elif channel == OUTBOX_CHANNEL:
                self._on_outbox(payload)
            elif channel == COMMANDS_CHANNEL:
                self._on_commands(json.loads(payload))
        except (ValueError, KeyError, TypeError) as exc:  # not ours: say so, carry on
            log.warning("ignored a notification", channel=channel, error=str(exc))
