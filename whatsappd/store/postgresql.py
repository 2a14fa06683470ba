"""The PostgreSQL store: the event journal, the outbox and media in one database, and all their SQL.

`PostgresStore` implements `StoreBackend` (store/backend.py) through the shared facade
(store/facade.py, over this module's SQL functions), with the SQLite store's semantics:
events are group-committed by the journal buffer (store/journal.py), outbox enqueues by
`GroupCommit` (store/core.py), every other write runs on one writer thread with its own
connection, and an outbox status change and its `message.status` event are one transaction.
Reads use one connection per reader thread. The tables carry a `whatsappd_` prefix: they share
a schema with whatsmeow's (one shared schema, devices selected by JID: see the cluster notes).

Schema: `migrate()` creates or upgrades it, in order, under a session advisory lock on a fixed
key (`MIGRATE_LOCK`), so daemons starting at once never race (the second waits, then finds
nothing to do). `whatsappd migrate` runs it; so does `open()`, before anything else.

Seqs come from a one-row counter (`whatsappd_journal_head`) updated in the inserting
transaction, not from a sequence: a sequence is not transactional, so a daemon killed mid-
transaction would leave a gap a reader cannot tell from a lost event. Seq order is commit
order: every transaction that inserts events first takes the transaction advisory lock
`JOURNAL_LOCK`, so seqs are handed out and committed one transaction at a time, even with
several writers on one database (taken first, it also keeps them from deadlocking over message
rows and the counter), and a reader tailing `seq > last` never skips one that commits late.
The same transaction sends NOTIFY `whatsappd_journal` with its newest seq: a wake-up for
readers on other connections only (it is lost while a listener is away, and does not pass
PgBouncer's transaction pooling); the journal table is the truth.

Fencing ([cluster] enabled; cluster/node.py sets `tokens`, the lease token this host holds for a
company, or None): the claim `queued -> sending` and every move out of `sending` in `set_status`,
and each journal insert of a supervisor event for a company, run `leases.check_token` in their
own transaction: a stale token (or none) refuses the write. `set_status` raises StaleLease to its
caller; a refused event is dropped from its batch with a warning and the others commit. The
claim records its token (`claim`), so a new owner knows a previous owner's claims. Enqueue and
cancel (the API's writes) are not an owner's and are not fenced.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import importlib.metadata
import json
import threading
import time
from collections.abc import Callable
from typing import Any, NamedTuple, TypeVar
from urllib.parse import urlsplit, urlunsplit

import psycopg
from psycopg.rows import DictRow, dict_row

from whatsappd.baileys.verify import listed_jids
from whatsappd.cluster import registry as cluster_registry
from whatsappd.cluster import shared
from whatsappd.cluster.fence import NO_TOKEN, StaleLease
from whatsappd.cluster.leases import check_token
from whatsappd.errors import ErrorCode
from whatsappd.logs import get_logger
from whatsappd.store import pg_pacing_sql
from whatsappd.store.backend import IncomingMedia, StorageFull, StoreError
from whatsappd.store.core import delivered_in_order
from whatsappd.store.facade import StoreFacade
from whatsappd.store.journal import Event, NewEvent
from whatsappd.store.outbox import (
    ALLOWED,
    RECEIPT_RANK,
    IdempotencyConflict,
    MessageStatus,
    OutboxMessage,
    OutgoingMessage,
    message_from_row,
    new_message_id,
    status_event_data,
)
from whatsappd.store.pg_devices_sql import DEVICES_MIGRATION
from whatsappd.store.pg_pacing_sql import (
    delete_webhook,
    first_contacts,
    is_known_contact,
    pauses,
    put_webhook,
    recent_sends,
    record_contact,
    record_first_contact,
    set_pause,
    set_webhook_cursor,
    webhooks,
)
from whatsappd.timefmt import iso

__all__ = ["JOURNAL_LOCK", "MIGRATE_LOCK", "NOTIFY_CHANNEL", "SCHEMA_VERSION", "Migration", "PostgresStore",
           "migrate", "redact"]
# The facade's SQL (`SqlFunctions`, store/facade.py): this module is handed to it whole.
__all__ += ["counts", "counts_by_company", "delete_webhook", "enqueue_batch", "expire", "fail_stale_sending", "first_contacts",
            "in_flight", "insert_events", "is_known_contact", "next_pending", "oldest_seq", "pauses", "prune", "put_webhook",
            "receipt", "recent_sends", "record_contact", "record_first_contact", "select_events", "select_incoming_media",
            "select_media", "select_message", "set_pause", "set_status", "set_webhook_cursor", "store_incoming_media", "webhooks"]

T = TypeVar("T")
Db = psycopg.Connection[DictRow]
Tokens = Callable[[str], int | None]
log = get_logger()

#: Advisory lock keys (one bigint each): schema migration; the journal's seq order.
MIGRATE_LOCK = 0x77_68_61_74_73_61_01  # "whatsa" + 1
JOURNAL_LOCK = 0x77_68_61_74_73_61_02
#: The channel NOTIFY wakes journal readers on (payload: the newest committed seq).
NOTIFY_CHANNEL = "whatsappd_journal"
#: Reader threads (each with its own connection) per store.
READERS = 4
#: SQLSTATE of a full disk on the server (class 53: insufficient resources).
DISK_FULL = "53100"

#: The schema, one script per version: version N is MIGRATIONS[N - 1]. Never edit a released
#: one; append the next.
MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE whatsappd_journal_head (
        one boolean PRIMARY KEY DEFAULT true CHECK (one),
        seq bigint NOT NULL                       -- the newest seq handed out (and committed)
    );
    INSERT INTO whatsappd_journal_head (seq) VALUES (0);
    CREATE TABLE whatsappd_events (
        seq bigint PRIMARY KEY,
        at double precision NOT NULL,
        company text,
        type text NOT NULL,
        data json NOT NULL
    );
    CREATE INDEX whatsappd_events_at ON whatsappd_events (at);
    CREATE TABLE whatsappd_messages (
        n bigserial PRIMARY KEY,                  -- send order within a company
        id text NOT NULL UNIQUE,                  -- msg_..., what the API hands out
        company text NOT NULL,
        idem_key text,
        idem_at double precision,
        body_hash text NOT NULL,
        recipient text NOT NULL,                  -- the JID
        to_input text NOT NULL,                   -- what the client wrote
        kind text NOT NULL,
        payload text NOT NULL,                    -- JSON: text, caption, filename, mimetype, size
        status text NOT NULL,
        wa_id text,
        error_code text,
        error text,
        attempts integer NOT NULL DEFAULT 0,
        created_at double precision NOT NULL,
        updated_at double precision NOT NULL,
        expires_at double precision NOT NULL,
        sent_at double precision,
        delivered_at double precision,
        read_at double precision
    );
    CREATE UNIQUE INDEX whatsappd_messages_idem ON whatsappd_messages (company, idem_key) WHERE idem_key IS NOT NULL;
    CREATE INDEX whatsappd_messages_pending ON whatsappd_messages (company, status, n);
    CREATE INDEX whatsappd_messages_due ON whatsappd_messages (status, expires_at);
    CREATE INDEX whatsappd_messages_wa ON whatsappd_messages (company, wa_id);
    CREATE TABLE whatsappd_media (message_id text PRIMARY KEY, data bytea NOT NULL);
    CREATE TABLE whatsappd_incoming_media (
        company text NOT NULL,
        wa_id text NOT NULL,
        at double precision NOT NULL,
        kind text NOT NULL,
        mimetype text,
        raw text NOT NULL,
        PRIMARY KEY (company, wa_id)
    );
    """,
    pg_pacing_sql.MIGRATION,  # 2: send pacing's contacts, first contacts and pauses; webhooks' cursors
    # 3: company leases for several hosts (whatsappd/cluster/leases.py, issue 13).
    """
    CREATE SEQUENCE whatsappd_lease_tokens;     -- tokens: one sequence, so they only ever grow
    CREATE TABLE whatsappd_company_leases (
        company text PRIMARY KEY,
        owner text,                             -- host id; NULL: never owned, or released
        token bigint NOT NULL DEFAULT 0,        -- the fencing token of the latest acquisition
        expires_at timestamptz NOT NULL DEFAULT '-infinity',   -- database time
        acquired_at timestamptz
    );
    CREATE INDEX whatsappd_company_leases_owner ON whatsappd_company_leases (owner);
    CREATE TABLE whatsappd_cluster_hosts (
        host text PRIMARY KEY,
        max_companies integer NOT NULL,
        expires_at timestamptz NOT NULL         -- live while in the future (renewed with its leases)
    );
    """,
    DEVICES_MIGRATION,  # 4: which whatsmeow device is whose (store/pg_devices_sql.py, issue 13)
    cluster_registry.MIGRATION,  # 5: the cluster's company registry; the outbox claim token (cluster/registry.py)
    shared.MIGRATION,  # 6: what the hosts tell each other: company status, routed acts (cluster/shared.py)
)
SCHEMA_VERSION = len(MIGRATIONS)


def redact(dsn: str) -> str:
    """The DSN with any password (in the user part or a `password=` parameter) replaced by ***,
    for logs, errors and health."""
    parts = urlsplit(dsn)
    netloc = parts.netloc
    if parts.password is not None:
        netloc = f"{parts.username or ''}:***@{netloc.rpartition('@')[2]}"
    query = "&".join(f"{key}=***" if key.lower() == "password" else f"{key}={value}" if sep else key
                     for key, sep, value in (item.partition("=") for item in parts.query.split("&") if item))
    return urlunsplit(parts._replace(netloc=netloc, query=query))


def connect(dsn: str) -> Db:
    """An autocommit connection with dict rows (transactions are explicit: `db.transaction()`)."""
    try:
        return psycopg.connect(dsn, autocommit=True, row_factory=dict_row, connect_timeout=30)
    except psycopg.Error as exc:
        raise StoreError(f"cannot connect to the PostgreSQL store {redact(dsn)}: {exc}; check store.dsn, "
                         "that the server runs and that the role may log in") from exc


class Migration(NamedTuple):
    """What `migrate` found and did."""

    before: int  # whatsappd's schema version found
    now: int  # and left
    whatsmeow_by: str | None  # who created or upgraded whatsmeow's tables just now (None: nobody)


def migrate(dsn: str, whatsmeow: bool = False, whatsmeow_dsn: str | None = None) -> Migration:
    """Create or upgrade the schema under the migration lock.

    With whatsmeow, also whatsmeow's own schema (its tables share the database), still under the
    lock: whatsmeow's upgrade takes no lock of its own, and two clients cold-starting on an
    empty database failed it ("failed to upgrade database") most of the time. It runs neonize in
    a subprocess (whatsappd.baileys.verify), once per neonize version. Whoever first starts
    workers on this database must have done this: `whatsappd migrate`, or the daemon before its
    first neonize worker starts (supervisor/devices.py, ensure_schema).

    whatsmeow_dsn: where whatsmeow's tables are (`[store] whatsmeow_dsn`; default: dsn).

    A database written by a newer whatsappd (a version this one does not know) is a StoreError
    and is left untouched.
    """
    with connect(dsn) as db:
        try:
            db.execute("SELECT pg_advisory_lock(%s)", (MIGRATE_LOCK,))
            try:
                with db.transaction():
                    db.execute("CREATE TABLE IF NOT EXISTS whatsappd_meta (key text PRIMARY KEY, value text NOT NULL)")
                    row = db.execute("SELECT value FROM whatsappd_meta WHERE key = 'schema_version'").fetchone()
                    before = int(row["value"]) if row else 0
                    if before > SCHEMA_VERSION:
                        raise StoreError(f"the PostgreSQL store {redact(dsn)} was written by a newer whatsappd "
                                         f"(schema {before}, this one knows {SCHEMA_VERSION}); upgrade whatsappd")
                    for version in range(before + 1, SCHEMA_VERSION + 1):
                        db.execute(MIGRATIONS[version - 1])
                        log.info("store schema upgraded", backend="postgresql", version=version)
                    db.execute("INSERT INTO whatsappd_meta VALUES ('schema_version', %s) "
                               "ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value", (str(SCHEMA_VERSION),))
                whatsmeow_by = _migrate_whatsmeow(db, whatsmeow_dsn or dsn) if whatsmeow else None
            finally:
                db.execute("SELECT pg_advisory_unlock(%s)", (MIGRATE_LOCK,))
        except psycopg.Error as exc:
            raise StoreError(f"cannot migrate the PostgreSQL store {redact(dsn)}: {exc}") from exc
    return Migration(before, SCHEMA_VERSION, whatsmeow_by)


def _migrate_whatsmeow(db: Db, dsn: str) -> str | None:
    """whatsmeow's schema, by neonize itself, unless this neonize version already did it here:
    who did it now, or None."""
    done_by = f"neonize {importlib.metadata.version('neonize')}"
    row = db.execute("SELECT value FROM whatsappd_meta WHERE key = 'whatsmeow_schema'").fetchone()
    if row is not None and row["value"] == done_by:
        return None
    try:
        listed_jids(dsn)  # opening the store creates or upgrades whatsmeow's tables
    except RuntimeError as exc:
        raise StoreError(f"cannot create whatsmeow's tables in {redact(dsn)}: {exc}") from exc
    db.execute("INSERT INTO whatsappd_meta VALUES ('whatsmeow_schema', %s) "
               "ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value", (done_by,))
    log.info("whatsmeow schema created or upgraded", backend="postgresql", by=done_by)
    return done_by


class PostgresStore(StoreFacade[Db]):
    """The PostgreSQL backend: one writer connection on one thread, group-committed events and enqueues."""

    def __init__(self, dsn: str) -> None:
        from whatsappd.store import postgresql  # this module: its SQL functions are the facade's SqlFunctions

        super().__init__(postgresql, (StoreError, psycopg.Error), redact(dsn))
        self.dsn = dsn
        self.where = redact(dsn)
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="store-writer")
        # Readers on threads of their own, each with its connection: a fixed number, so a daemon
        # holds READERS + 1 connections whatever the machine's size (the cluster's budget).
        self._reading = concurrent.futures.ThreadPoolExecutor(max_workers=READERS, thread_name_prefix="store-reader")
        self._db: Db | None = None  # the writer thread's connection; None: connect on next use
        self._readers: list[Db] = []
        self._readers_lock = threading.Lock()
        self._local = threading.local()
        self._closed = True
        self._full_since: float | None = None
        self._full_message = ""
        self._full_refusals = 0
        #: [cluster] company -> the lease token held here (None: not held); None: no fencing (one host).
        self.tokens: Tokens | None = None
        self.stale_refusals = 0  # [cluster] writes refused for a stale token (or none)

    # ------------------------------------------------------------------------ open / close

    def open(self) -> None:
        """Migrate (under the lock), then connect the writer (blocking; before the loop serves)."""
        migrate(self.dsn)
        self._db = connect(self.dsn)
        try:
            row = self._db.execute("SELECT seq FROM whatsappd_journal_head").fetchone()
        except psycopg.Error as exc:
            raise StoreError(f"cannot read the PostgreSQL store {self.where}: {exc}") from exc
        self._journal.last_seq = int(row["seq"] or 0) if row else 0
        self._closed = False

    async def close(self) -> None:
        if self._closed:
            return
        await self.flush()
        self._closed = True
        await asyncio.get_running_loop().run_in_executor(self._executor, self._close_writer)
        self._executor.shutdown(wait=True)
        self._reading.shutdown(wait=True)
        with self._readers_lock:
            readers, self._readers = self._readers, []
        for db in readers:
            db.close()

    def _close_writer(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None

    def health(self) -> dict[str, Any]:
        if self._full_since is None:
            return {"state": "ok", "backend": "postgresql", "path": self.where}
        return {"state": "full", "backend": "postgresql", "path": self.where, "since": iso(self._full_since),
                "message": self._full_message}

    @property
    def full_since(self) -> float | None:
        return self._full_since

    @property
    def full_refusals(self) -> int:
        return self._full_refusals

    # ------------------------------------------------------------------ the writer, readers

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """Run fn(db, *args) on the writer thread."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, self._write, fn, *args)

    async def _run_journaled(self, fn: Callable[..., tuple[T, list[Event]]], *args: Any) -> T:
        """Run fn(db, *args) -> (result, events it inserted) on the writer; deliver the events in seq order."""
        future = asyncio.get_running_loop().run_in_executor(self._executor, self._write, fn, *args)
        return await delivered_in_order(future, self._journal.deliver)

    def _write(self, fn: Callable[..., T], *args: Any) -> T:
        """fn(db, *args) on the writer thread, every write's one way in: what fails is classified.

        A full disk on the server raises StorageFull (and the store says `full` until a write
        succeeds); a lost connection is dropped and made again on the next write.
        """
        if self._closed and self._db is None:
            raise StoreError("the store is closed")
        if self._db is None or self._db.closed or self._db.broken:
            if self._db is not None:
                self._db.close()
            self._db = connect(self.dsn)
        try:
            result = fn(self._db, *args)
        except psycopg.Error as exc:
            if exc.sqlstate == DISK_FULL:
                raise self._refuse_full(exc) from exc
            if self._db.broken:
                self._db.close()
                self._db = None
                raise StoreError(f"lost the connection to the PostgreSQL store {self.where}: {exc}") from exc
            raise
        if self._full_since is not None:
            log.info("storage writable again", path=self.where,
                     full_for_seconds=round(time.time() - self._full_since, 1), refused=self._full_refusals)
            self._full_since = None
        return result

    def _refuse_full(self, exc: BaseException) -> StorageFull:
        message = (f"the disk of the PostgreSQL server holding {self.where} is full: nothing was stored; free "
                   "space there (whatsappd carries on by itself once there is room)")
        self._full_refusals += 1
        self._full_message = message
        if self._full_since is None:
            self._full_since = time.time()
            log.error("storage full: writes are refused until there is room", path=self.where, error=str(exc))
        return StorageFull(message)

    def _reader(self) -> Db:
        db: Db | None = getattr(self._local, "db", None)
        if db is None or db.closed or db.broken:
            db = connect(self.dsn)
            self._local.db = db
            with self._readers_lock:
                self._readers.append(db)
        return db

    async def read(self, fn: Callable[..., T], *args: Any) -> T:
        """Run fn(read_connection, *args) on a reader thread."""
        return await asyncio.get_running_loop().run_in_executor(self._reading, lambda: fn(self._reader(), *args))

    # ----------------------------------------------------------------- fenced ([cluster])

    async def _commit_events(self, batch: list[NewEvent]) -> list[Event]:
        if self.tokens is None:
            return await super()._commit_events(batch)
        events, refused = await self.run(insert_fenced_events, batch, self.tokens)
        for new, exc in refused:
            self.stale_refusals += 1
            log.warning("journal event dropped: stale lease", company=new.company, type=new.type, error=str(exc))
        return events

    async def fail_stale_sending(self, now: float, busy: frozenset[str]) -> list[OutboxMessage]:
        if self.tokens is None:
            return await super().fail_stale_sending(now, busy)
        try:
            return await self._run_journaled(fenced_fail_stale_sending, self.tokens, now, busy)
        except StaleLease as exc:
            self.stale_refusals += 1
            log.warning("outbox write refused: stale lease", error=str(exc))
            return []

    async def set_status(self, message_id: str, status: MessageStatus, *, wa_id: str | None = None,
                         error_code: str | None = None, error: str | None = None,
                         sent_at: float | None = None) -> OutboxMessage | None:
        if self.tokens is None:
            return await super().set_status(message_id, status, wa_id=wa_id, error_code=error_code, error=error,
                                            sent_at=sent_at)
        try:
            return await self._run_journaled(fenced_set_status, self.tokens, message_id, MessageStatus(status),
                                             wa_id, error_code, error, sent_at)
        except StaleLease as exc:
            self.stale_refusals += 1
            log.warning("outbox write refused: stale lease", message_id=message_id, status=str(status), error=str(exc))
            raise


# ------------------------------------------------------------------ functions on a connection
# Those named as `SqlFunctions` (store/facade.py) members are the facade's SQL: mypy checks each
# against its member (this module is handed to the facade whole; pacing's are imported above).


def _journal_order(db: Db) -> None:
    """First statement of a transaction that inserts events: seqs are then handed out and
    committed one transaction at a time (seq order is commit order)."""
    db.execute("SELECT pg_advisory_xact_lock(%s)", (JOURNAL_LOCK,))


def _notify(db: Db, events: list[Event]) -> None:
    """Wake journal readers on other connections (sent at COMMIT; a hint, not the stream)."""
    if events:
        db.execute("SELECT pg_notify(%s, %s)", (NOTIFY_CHANNEL, str(events[-1].seq)))


def _insert_event(db: Db, at: float, company: str | None, type_: str, data: dict[str, Any]) -> Event:
    """One journal row with the next seq from the head row: unlike a sequence, the head is
    transactional, so a transaction that never commits (a killed daemon's) leaves no gap."""
    row = db.execute("WITH head AS (UPDATE whatsappd_journal_head SET seq = seq + 1 RETURNING seq) "
                     "INSERT INTO whatsappd_events (seq, at, company, type, data) "
                     "SELECT seq, %s, %s, %s, %s::json FROM head RETURNING seq",
                     (at, company, type_, json.dumps(data, separators=(",", ":")))).fetchone()
    assert row is not None
    return Event(int(row["seq"]), at, company, type_, data)


def insert_events(db: Db, batch: list[NewEvent]) -> list[Event]:
    with db.transaction():
        _journal_order(db)
        out = [_insert_event(db, new.at, new.company, new.type, new.data) for new in batch]
        for new, event in zip(batch, out, strict=True):
            if new.secret is not None:
                _notify_secret(db, event, new.secret)
        _notify(db, out)
    return out


def _notify_secret(db: Db, event: Event, secret: dict[str, Any]) -> None:
    """Hand event's secret (a QR code) to the other hosts' live readers, never to the table: sent
    at COMMIT, before the journal's wake-up of the same transaction, so a host reading the row
    after that wake-up has the secret already (cluster/tail.py)."""
    payload = json.dumps({"seq": event.seq, "secret": secret}, separators=(",", ":"))
    if len(payload.encode()) > shared.MAX_PAYLOAD:
        log.warning("an event's secret is too large for NOTIFY; other hosts' live readers get the event without it",
                    seq=event.seq, type=event.type, bytes=len(payload.encode()))
        return
    db.execute("SELECT pg_notify(%s, %s)", (shared.SECRET_CHANNEL, payload))


def select_events(db: Db, since: int, limit: int, companies: list[str], types: list[str],
                  until: int | None) -> list[Event]:
    sql = "SELECT seq, at, company, type, data FROM whatsappd_events WHERE seq > %s"
    args: list[Any] = [since]
    if until is not None:
        sql += " AND seq <= %s"
        args.append(until)
    if companies:
        sql += " AND company = ANY(%s)"
        args.append(companies)
    if types:
        sql += " AND type = ANY(%s)"
        args.append(types)
    sql += " ORDER BY seq LIMIT %s"
    args.append(limit)
    return [Event(r["seq"], r["at"], r["company"], r["type"], r["data"]) for r in db.execute(sql, args)]


def oldest_seq(db: Db) -> int | None:
    row = db.execute("SELECT MIN(seq) AS seq FROM whatsappd_events").fetchone()
    assert row is not None
    seq: int | None = row["seq"]
    return seq


def prune(db: Db, cutoff: float, max_events: int) -> int:
    with db.transaction():
        n = db.execute("DELETE FROM whatsappd_events WHERE at < %s", (cutoff,)).rowcount
        top = db.execute("SELECT MAX(seq) AS seq FROM whatsappd_events").fetchone()
        if top is not None and top["seq"] is not None:
            n += db.execute("DELETE FROM whatsappd_events WHERE seq <= %s", (top["seq"] - max_events,)).rowcount
        db.execute("DELETE FROM whatsappd_incoming_media WHERE at < %s", (cutoff,))
    return n


def _insert_status_event(db: Db, message: OutboxMessage) -> Event:
    """The message.status event for message's new status, inside the caller's transaction."""
    return _insert_event(db, time.time(), message["company"], "message.status", status_event_data(message))


def _message_by_id(db: Db, message_id: str) -> OutboxMessage:
    row = db.execute("SELECT * FROM whatsappd_messages WHERE id = %s", (message_id,)).fetchone()
    assert row is not None
    return message_from_row(row)


def select_message(db: Db, company: str, message_id: str) -> OutboxMessage | None:
    row = db.execute("SELECT * FROM whatsappd_messages WHERE id = %s AND company = %s",
                     (message_id, company)).fetchone()
    return message_from_row(row) if row else None


def next_pending(db: Db, company: str) -> OutboxMessage | None:
    row = db.execute("SELECT * FROM whatsappd_messages WHERE company = %s AND status = %s AND expires_at > %s "
                     "ORDER BY n LIMIT 1", (company, MessageStatus.QUEUED.value, time.time())).fetchone()
    if row is None:
        return None
    message = message_from_row(row)
    message["text"] = json.loads(row["payload"]).get("text")
    return message


def in_flight(db: Db, company: str) -> list[OutboxMessage]:
    out = []
    for row in db.execute("SELECT * FROM whatsappd_messages WHERE company = %s AND status = %s ORDER BY n",
                          (company, MessageStatus.SENDING.value)):
        message = message_from_row(row)
        message["claim"] = row["claim"]  # the lease token of its claim ([cluster]; None on one host)
        out.append(message)
    return out


def counts(db: Db) -> dict[str, int]:
    return {row["status"]: row["n"] for row in db.execute(
        "SELECT status, count(*) AS n FROM whatsappd_messages GROUP BY status")}


def counts_by_company(db: Db) -> dict[tuple[str, str], tuple[int, float]]:
    return {(row["company"], row["status"]): (row["n"], row["oldest"]) for row in db.execute(
        "SELECT company, status, count(*) AS n, min(created_at) AS oldest FROM whatsappd_messages "
        "GROUP BY company, status")}


def select_media(db: Db, message_id: str) -> bytes | None:
    row = db.execute("SELECT data FROM whatsappd_media WHERE message_id = %s", (message_id,)).fetchone()
    return bytes(row["data"]) if row else None


def store_incoming_media(db: Db, company: str, wa_id: str, kind: str, mimetype: str | None, raw: str) -> None:
    db.execute("INSERT INTO whatsappd_incoming_media (company, wa_id, at, kind, mimetype, raw) "
               "VALUES (%s, %s, %s, %s, %s, %s) ON CONFLICT (company, wa_id) DO UPDATE SET at = EXCLUDED.at, "
               "kind = EXCLUDED.kind, mimetype = EXCLUDED.mimetype, raw = EXCLUDED.raw",
               (company, wa_id, time.time(), kind, mimetype, raw))


def select_incoming_media(db: Db, company: str, wa_id: str) -> IncomingMedia | None:
    row = db.execute("SELECT kind, mimetype, raw FROM whatsappd_incoming_media WHERE company = %s AND wa_id = %s",
                     (company, wa_id)).fetchone()
    return {"kind": row["kind"], "mimetype": row["mimetype"], "raw": row["raw"]} if row else None


def enqueue_batch(db: Db, batch: list[tuple[OutgoingMessage, float]]
                   ) -> tuple[list[tuple[bool, OutboxMessage] | Exception], list[Event]]:
    """Enqueue each (message, idempotency window) of batch in one transaction, each in its own
    savepoint: one that fails (IdempotencyConflict, a unique key taken meanwhile) is undone alone
    and its exception returned in its place. If the transaction itself fails, nothing is
    committed and it raises."""
    outcomes: list[tuple[bool, OutboxMessage] | Exception] = []
    events: list[Event] = []
    with db.transaction():
        _journal_order(db)
        for message, idem_window in batch:
            try:
                with db.transaction():  # a savepoint
                    outcome, inserted = _enqueue(db, message, idem_window)
            except (IdempotencyConflict, psycopg.IntegrityError) as exc:
                outcomes.append(exc)
                continue
            outcomes.append(outcome)
            events.extend(inserted)
        # Wake the owner's sender, whichever host it is on (its own sender is woken directly).
        for company in sorted({message.company for message, _ in batch}):
            db.execute("SELECT pg_notify(%s, %s)", (shared.OUTBOX_CHANNEL, company))
        _notify(db, events)
    return outcomes, events


def _enqueue(db: Db, message: OutgoingMessage, idem_window: float) -> tuple[tuple[bool, OutboxMessage], list[Event]]:
    """One message, inside the caller's transaction (see enqueue_batch)."""
    now = time.time()
    digest = message.body_hash
    key = message.idempotency_key
    if key is not None:
        row = db.execute("SELECT * FROM whatsappd_messages WHERE company = %s AND idem_key = %s",
                         (message.company, key)).fetchone()
        if row is not None:
            if now - row["idem_at"] < idem_window:
                if row["body_hash"] != digest:
                    raise IdempotencyConflict(row["id"])
                return (False, message_from_row(row)), []
            # The key is older than the window: it may be used again for a new message.
            db.execute("UPDATE whatsappd_messages SET idem_key = NULL WHERE n = %s", (row["n"],))
    mid = new_message_id()
    db.execute(
        "INSERT INTO whatsappd_messages (id, company, idem_key, idem_at, body_hash, recipient, to_input, kind, "
        "payload, status, created_at, updated_at, expires_at) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, "
        "%s, %s)",
        (mid, message.company, key, now if key else None, digest, message.recipient, message.to, message.kind,
         json.dumps(message.payload), MessageStatus.QUEUED.value, now, now, now + message.ttl))
    if message.media is not None:
        db.execute("INSERT INTO whatsappd_media (message_id, data) VALUES (%s, %s)", (mid, message.media))
    stored = _message_by_id(db, mid)
    return (True, stored), [_insert_status_event(db, stored)]


def _check_held(db: Db, tokens: Tokens, company: str) -> int:
    """Inside the caller's transaction: the token this host holds for company, if it is the live
    lease (StaleLease otherwise, or when it holds none)."""
    token = tokens(company)
    check_token(db, company, NO_TOKEN if token is None else token)
    assert token is not None  # NO_TOKEN is never a live lease's
    return token


def insert_fenced_events(db: Db, batch: list[NewEvent], tokens: Tokens
                         ) -> tuple[list[Event], list[tuple[NewEvent, StaleLease]]]:
    """insert_events, each company's events only while this host holds its live lease (checked
    once per company per batch); the others are returned refused."""
    refused: list[tuple[NewEvent, StaleLease]] = []
    verdict: dict[str, StaleLease | None] = {}
    with db.transaction():
        _journal_order(db)
        out = []
        for new in batch:
            if new.company is not None:
                if new.company not in verdict:
                    try:
                        _check_held(db, tokens, new.company)
                        verdict[new.company] = None
                    except StaleLease as exc:
                        verdict[new.company] = exc
                stale = verdict[new.company]
                if stale is not None:
                    refused.append((new, stale))
                    continue
            out.append(_insert_event(db, new.at, new.company, new.type, new.data))
        _notify(db, out)
    return out, refused


def set_status(db: Db, message_id: str, status: MessageStatus, wa_id: str | None, error_code: str | None,
               error: str | None, sent_at: float | None) -> tuple[OutboxMessage | None, list[Event]]:
    return fenced_set_status(db, None, message_id, status, wa_id, error_code, error, sent_at)


def fenced_set_status(db: Db, tokens: Tokens | None, message_id: str, status: MessageStatus, wa_id: str | None,
                      error_code: str | None, error: str | None, sent_at: float | None
                      ) -> tuple[OutboxMessage | None, list[Event]]:
    """set_status; with tokens ([cluster]), a claim or a settle only under this host's live lease."""
    now = time.time()
    with db.transaction():
        _journal_order(db)
        row = db.execute("SELECT status, company FROM whatsappd_messages WHERE id = %s FOR UPDATE",
                         (message_id,)).fetchone()
        if row is None or status not in ALLOWED[MessageStatus(row["status"])]:
            return None, []
        claim = None
        if tokens is not None and MessageStatus.SENDING in (status, MessageStatus(row["status"])):
            claim = _check_held(db, tokens, row["company"])
        sets: dict[str, Any] = {"status": status.value, "updated_at": now}
        if status is MessageStatus.SENDING:
            db.execute("UPDATE whatsappd_messages SET attempts = attempts + 1, claim = %s WHERE id = %s",
                       (claim, message_id))
        if status is MessageStatus.SENT:
            sets["sent_at"] = now if sent_at is None else sent_at
            sets["wa_id"] = wa_id
            sets["error_code"] = sets["error"] = None  # an earlier transient failure is history
        if status in (MessageStatus.FAILED, MessageStatus.EXPIRED, MessageStatus.QUEUED):
            sets["error_code"] = error_code
            sets["error"] = error
        if status in (MessageStatus.FAILED, MessageStatus.EXPIRED, MessageStatus.SENT):
            db.execute("DELETE FROM whatsappd_media WHERE message_id = %s", (message_id,))
        # The column names are ours (the keys above), never input.
        db.execute(f"UPDATE whatsappd_messages SET {', '.join(f'{k} = %s' for k in sets)} WHERE id = %s",
                   (*sets.values(), message_id))
        message = _message_by_id(db, message_id)
        events = [_insert_status_event(db, message)]
        _notify(db, events)
    return message, events


def receipt(db: Db, company: str, wa_ids: list[str],
             status: MessageStatus) -> tuple[tuple[list[OutboxMessage], list[str]], list[Event]]:
    """Apply a delivered/read receipt; only forward moves. The messages changed, the unknown wa ids."""
    now = time.time()
    changed: list[OutboxMessage] = []
    unknown = []
    events = []
    column = {MessageStatus.DELIVERED: "delivered_at", MessageStatus.READ: "read_at"}[status]
    with db.transaction():
        _journal_order(db)
        for wa_id in wa_ids:
            row = db.execute("SELECT id, status FROM whatsappd_messages WHERE company = %s AND wa_id = %s FOR UPDATE",
                             (company, wa_id)).fetchone()
            if row is None:
                unknown.append(wa_id)
                continue
            current = MessageStatus(row["status"])
            if current not in RECEIPT_RANK or RECEIPT_RANK[current] >= RECEIPT_RANK[status]:
                continue
            extra = ", delivered_at = COALESCE(delivered_at, %s)" if status is MessageStatus.READ else ""
            args: tuple[Any, ...] = (status.value, now, now, now, row["id"]) if extra else (status.value, now, now, row["id"])
            db.execute(f"UPDATE whatsappd_messages SET status = %s, updated_at = %s, {column} = %s{extra} "
                       "WHERE id = %s", args)
            changed.append(_message_by_id(db, row["id"]))
            events.append(_insert_status_event(db, changed[-1]))
        _notify(db, events)
    return (changed, unknown), events


def fail_stale_sending(db: Db, now: float, busy: frozenset[str]) -> tuple[list[OutboxMessage], list[Event]]:
    return fenced_fail_stale_sending(db, None, now, busy)


def fenced_fail_stale_sending(db: Db, tokens: Tokens | None, now: float, busy: frozenset[str]
                              ) -> tuple[list[OutboxMessage], list[Event]]:
    """fail_stale_sending; with tokens ([cluster]), only for companies this host owns: another
    host's sends are its owner's to settle (`busy` names only this host's)."""
    stale = [(row["id"], row["company"]) for row in db.execute(
        "SELECT id, company FROM whatsappd_messages WHERE status = %s AND expires_at <= %s",
        (MessageStatus.SENDING.value, now)) if row["id"] not in busy]
    if tokens is not None:
        stale = [(mid, company) for mid, company in stale if tokens(company) is not None]
    with db.transaction():
        _journal_order(db)  # first, as in every transaction that inserts events
        if tokens is not None:
            for company in {company for _, company in stale}:
                _check_held(db, tokens, company)  # StaleLease: this round settles nothing; the next looks again
        return _finish(db, [mid for mid, _ in stale], MessageStatus.SENDING, MessageStatus.FAILED,
                       ErrorCode.SEND_INTERRUPTED.value, "its send was interrupted and could not be settled before "
                       "its ttl ran out; it may or may not have been delivered", now)


def expire(db: Db, now: float) -> tuple[list[OutboxMessage], list[Event]]:
    due = [row["id"] for row in db.execute("SELECT id FROM whatsappd_messages WHERE status = %s AND expires_at <= %s",
                                           (MessageStatus.QUEUED.value, now))]
    return _finish(db, due, MessageStatus.QUEUED, MessageStatus.EXPIRED, "ttl_expired",
                   "not sent before its ttl ran out", now)


def _finish(db: Db, ids: list[str], from_status: MessageStatus, status: MessageStatus, code: str,
            error: str, now: float) -> tuple[list[OutboxMessage], list[Event]]:
    """Move messages still in from_status to a final status, with their events, in one transaction."""
    if not ids:
        return [], []
    with db.transaction():
        _journal_order(db)
        out = []
        for mid in ids:
            changed = db.execute("UPDATE whatsappd_messages SET status = %s, updated_at = %s, error_code = %s, "
                                 "error = %s WHERE id = %s AND status = %s",
                                 (status.value, now, code, error, mid, from_status.value)).rowcount
            if changed:
                db.execute("DELETE FROM whatsappd_media WHERE message_id = %s", (mid,))
                out.append(_message_by_id(db, mid))
        events = [_insert_status_event(db, message) for message in out]
        _notify(db, events)
    return out, events
