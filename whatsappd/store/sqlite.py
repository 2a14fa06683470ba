"""The SQLite store (WAL): the event journal, the outbox and media in one file, and all their SQL.

`Store` implements `StoreBackend` (store/backend.py) through the shared facade (store/facade.py,
over this module's SQL functions) on the writer core (store/core.py): events
are group-committed by the journal buffer (store/journal.py), outbox enqueues by `GroupCommit`,
and every other write runs on the one writer thread. An outbox status change and its
`message.status` event are one transaction (the functions that change a message insert the
event themselves), so a crash can never leave a status the journal does not tell; they are
delivered in seq order with the batches, as every write runs on the one writer thread and
deliveries happen in the order the writes finished.

Reads (event backlog, message lookups) use their own connections from worker threads; WAL lets
them run beside the writer. Every transaction is opened and closed by `_transaction`, so a
failed COMMIT (which SQLite may already have rolled back) never leaves a transaction open or
masks its error. Rows are read by column name (sqlite3.Row), never by position. Enum values
are bound as `.value`: sqlite3 binds a str subclass only after a slow search for an adapter.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from whatsappd.errors import ErrorCode
from whatsappd.logs import get_logger
from whatsappd.store import pacing_sql
from whatsappd.store.backend import IncomingMedia, StoreCorrupt, StoredWebhook, StoreError
from whatsappd.store.core import Writer, is_corrupt
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
from whatsappd.store.pacing_sql import (
    first_contacts,
    is_known_contact,
    pauses,
    recent_sends,
    record_contact,
    record_first_contact,
    set_pause,
)

__all__ = ["Store", "check_database", "corrupt_fix"]
# The facade's SQL (`SqlFunctions`, store/facade.py): this module is handed to it whole.
__all__ += ["counts", "counts_by_company", "delete_webhook", "enqueue_batch", "expire", "fail_stale_sending", "first_contacts",
            "in_flight", "insert_events", "is_known_contact", "next_pending", "oldest_seq", "pauses", "prune", "put_webhook",
            "receipt", "recent_sends", "record_contact", "record_first_contact", "select_events", "select_incoming_media",
            "select_media", "select_message", "set_pause", "set_status", "set_webhook_cursor", "store_incoming_media", "webhooks"]

T = TypeVar("T")
log = get_logger()

SCHEMA_VERSION = 1
#: Seconds between two passive WAL checkpoints (see Store.open).
CHECKPOINT_INTERVAL = 1.0
SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    at REAL NOT NULL,
    company TEXT,
    type TEXT NOT NULL,
    data TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS events_at ON events (at);
CREATE TABLE IF NOT EXISTS messages (
    n INTEGER PRIMARY KEY AUTOINCREMENT,      -- send order within a company
    id TEXT NOT NULL UNIQUE,                  -- msg_..., what the API hands out
    company TEXT NOT NULL,
    idem_key TEXT,
    idem_at REAL,
    body_hash TEXT NOT NULL,
    recipient TEXT NOT NULL,                  -- the JID
    to_input TEXT NOT NULL,                   -- what the client wrote
    kind TEXT NOT NULL,
    payload TEXT NOT NULL,                    -- JSON: text, caption, filename, mimetype, size
    status TEXT NOT NULL,
    wa_id TEXT,
    error_code TEXT,
    error TEXT,
    attempts INTEGER NOT NULL DEFAULT 0,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    expires_at REAL NOT NULL,
    sent_at REAL,
    delivered_at REAL,
    read_at REAL
);
CREATE UNIQUE INDEX IF NOT EXISTS messages_idem ON messages (company, idem_key) WHERE idem_key IS NOT NULL;
CREATE INDEX IF NOT EXISTS messages_pending ON messages (company, status, n);
CREATE INDEX IF NOT EXISTS messages_wa ON messages (company, wa_id);
CREATE TABLE IF NOT EXISTS media (message_id TEXT PRIMARY KEY, data BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS incoming_media (
    company TEXT NOT NULL,
    wa_id TEXT NOT NULL,
    at REAL NOT NULL,
    kind TEXT NOT NULL,
    mimetype TEXT,
    raw TEXT NOT NULL,
    PRIMARY KEY (company, wa_id)
);
CREATE TABLE IF NOT EXISTS webhooks (         -- one row per webhook ever delivered to (issue 12)
    id TEXT PRIMARY KEY,
    cursor INTEGER NOT NULL,                  -- the last seq delivered (or skipped by its filters)
    definition TEXT,                          -- JSON, for webhooks added with PUT; NULL: from the config file
    updated_at REAL NOT NULL
);
"""


def corrupt_fix(path: Path) -> str:
    """What to do about a damaged store at path (one sentence, for logs and check-store)."""
    return (f"restore {path.name} from a backup (README: Backups), or move it aside with its -wal and -shm "
            f"files (mv {path} {path}.damaged): the daemon then starts with an empty journal and outbox, and "
            "messages still queued in the old file are not sent; `whatsappd check-store` lists the damage")


def _is_wal(path: Path) -> bool:
    """Whether the database file's header says WAL mode (file format versions 2 at bytes 18-19)."""
    try:
        with open(path, "rb") as f:
            header = f.read(20)
    except OSError:
        return False
    return header[18:20] == b"\x02\x02"


def check_database(path: Path, timeout: float = 30.0) -> list[str]:
    """What PRAGMA integrity_check finds wrong in the SQLite file at path ([]: nothing).
    timeout: seconds to wait for a writer's lock before giving up with "database is locked".

    Read-only, and leaves no file behind: a WAL database without a -wal file beside it (no
    daemon has it open) is opened immutable; with one (a daemon may be writing) read-only through
    the WAL. A rollback-journal database (whatsmeow's store.db) is opened read-only with its
    locks honoured: read immutable while its worker writes, it could look damaged when it is not.
    """
    mode = "ro&immutable=1" if _is_wal(path) and not Path(f"{path}-wal").exists() else "ro"
    try:
        db = sqlite3.connect(f"{path.absolute().as_uri()}?mode={mode}", uri=True, timeout=timeout)
    except sqlite3.Error as exc:
        return [f"cannot open it: {exc}"]
    db.row_factory = sqlite3.Row
    try:
        found = [line for row in db.execute("PRAGMA integrity_check")
                 for line in str(row["integrity_check"]).splitlines()]
    except sqlite3.Error as exc:
        return [str(exc)]
    finally:
        db.close()
    return [] if found == ["ok"] else found


@contextlib.contextmanager
def _transaction(db: sqlite3.Connection) -> Iterator[None]:
    """BEGIN IMMEDIATE ... COMMIT; on any error ROLLBACK if one is still open, and re-raise.

    A COMMIT that fails for a full disk may already have been rolled back by SQLite: a blind
    ROLLBACK would then fail ("no transaction is active") and hide the real error.
    """
    db.execute("BEGIN IMMEDIATE")
    try:
        yield
        db.execute("COMMIT")
    except BaseException:
        if db.in_transaction:
            try:
                db.execute("ROLLBACK")
            except sqlite3.Error as exc:
                log.warning("rollback failed after a failed write", error=str(exc))
        raise


def _connect(path: Path, readonly: bool = False) -> sqlite3.Connection:
    uri = f"file:{path}?mode=ro" if readonly else f"file:{path}"
    db = sqlite3.connect(uri, uri=True, timeout=30, isolation_level=None, check_same_thread=False)
    db.row_factory = sqlite3.Row
    db.execute("PRAGMA busy_timeout = 30000")
    if not readonly:
        db.execute("PRAGMA journal_mode = WAL")
        # FULL: a transaction that returned is on disk, even across a power cut; group commit
        # keeps the fsync count low.
        db.execute("PRAGMA synchronous = FULL")
        db.execute("PRAGMA foreign_keys = ON")
    return db


def _probe(db: sqlite3.Connection) -> None:
    """The writer core's probe while the disk is full: the smallest write there is."""
    db.execute("INSERT OR REPLACE INTO meta VALUES ('writable_at', ?)", (str(time.time()),))


class Store(StoreFacade[sqlite3.Connection]):
    """The SQLite backend: one file, one writer thread, group-committed events and enqueues."""

    def __init__(self, path: Path) -> None:
        from whatsappd.store import sqlite  # this module: its SQL functions are the facade's SqlFunctions

        super().__init__(sqlite, (StoreError, sqlite3.Error, OSError), str(path))
        self.path = path
        self._writer = Writer(path, corrupt_fix(path), _probe)
        self._local = threading.local()
        self._checkpointer: threading.Thread | None = None
        self._stop_checkpoints = threading.Event()

    # ------------------------------------------------------------------------ open / close

    def open(self) -> None:
        """Create or open the database (blocking; call before the loop serves).

        A damaged file is StoreCorrupt (PRAGMA quick_check, a fraction of a second even for a
        few hundred MB): found at start, named, with what to do, rather than as errors later.
        """
        new = not self.path.exists()
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        old_umask = os.umask(0o077)
        db: sqlite3.Connection | None = None
        try:
            db = _connect(self.path)
            version = db.execute("PRAGMA user_version").fetchone()["user_version"]
            if version > SCHEMA_VERSION:
                raise StoreError(f"{self.path} was written by a newer whatsappd (schema {version}); "
                                 "upgrade whatsappd or restore a matching backup")
            damage = [row["quick_check"] for row in db.execute("PRAGMA quick_check(10)")]
            if damage != ["ok"]:
                raise StoreCorrupt(self.path, "; ".join(damage), corrupt_fix(self.path))
            db.executescript(SCHEMA + pacing_sql.SCHEMA)
            db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            pacing_sql.backfill_contacts(db)
            row = db.execute("SELECT seq FROM sqlite_sequence WHERE name = 'events'").fetchone()
            if new:
                db.execute("INSERT OR REPLACE INTO meta VALUES ('created_at', ?)", (str(time.time()),))
        except (sqlite3.Error, StoreError) as exc:
            if db is not None:
                db.close()
            if isinstance(exc, StoreError):
                raise
            if is_corrupt(exc):
                raise StoreCorrupt(self.path, str(exc), corrupt_fix(self.path)) from exc
            raise StoreError(f"cannot open the store {self.path}: {exc}; check that the daemon's user may read "
                             "and write it and its directory") from exc
        finally:
            os.umask(old_umask)
        for suffix in ("", "-wal", "-shm"):
            p = Path(f"{self.path}{suffix}")
            if p.exists():
                os.chmod(p, 0o600)
        self._journal.last_seq = row["seq"] if row else 0
        # Checkpoints leave the commit path: an automatic one runs inside the COMMIT that crosses
        # the WAL threshold and stalls every event behind it for tens of milliseconds. A thread
        # with its own connection checkpoints passively (never blocking the writer) instead.
        assert db is not None
        db.execute("PRAGMA wal_autocheckpoint = 0")
        self._writer.db = db
        self._checkpointer = threading.Thread(target=self._checkpoint_loop, name="store-checkpoint", daemon=True)
        self._checkpointer.start()

    def _checkpoint_loop(self) -> None:
        db = _connect(self.path)
        try:
            while not self._stop_checkpoints.wait(CHECKPOINT_INTERVAL):
                try:
                    db.execute("PRAGMA wal_checkpoint(PASSIVE)")
                except sqlite3.Error:
                    pass  # busy or similar: the next round catches up
                self._writer.probe_if_full()
        finally:
            db.close()

    async def close(self) -> None:
        if self._writer.db is None:
            return
        await self.flush()
        self._stop_checkpoints.set()
        if self._checkpointer is not None:
            await asyncio.to_thread(self._checkpointer.join, 10)
        await self._writer.close(_close)

    def health(self) -> dict[str, Any]:
        return self._writer.health()

    @property
    def full_since(self) -> float | None:
        return self._writer.full_since

    @property
    def full_refusals(self) -> int:
        return self._writer.full_refusals

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """Run fn(db, *args) on the writer thread."""
        return await self._writer.run(fn, *args)

    async def _run_journaled(self, fn: Callable[..., tuple[T, list[Event]]], *args: Any) -> T:
        return await self._writer.run_journaled(self._journal.deliver, fn, *args)

    def _reader(self) -> sqlite3.Connection:
        db = getattr(self._local, "db", None)
        if db is None:
            db = _connect(self.path, readonly=True)
            self._local.db = db
        return db

    async def read(self, fn: Callable[..., T], *args: Any) -> T:
        """Run fn(read_connection, *args) on a worker thread."""
        return await asyncio.to_thread(lambda: fn(self._reader(), *args))


# ------------------------------------------------------------------ functions on a connection
# Those named as `SqlFunctions` (store/facade.py) members are the facade's SQL: mypy checks each
# against its member (this module is handed to the facade whole; pacing's are imported above).


def _close(db: sqlite3.Connection) -> None:
    db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    db.close()


def webhooks(db: sqlite3.Connection) -> list[StoredWebhook]:
    return [{"id": r["id"], "cursor": r["cursor"],
             "definition": None if r["definition"] is None else json.loads(r["definition"])}
            for r in db.execute("SELECT id, cursor, definition FROM webhooks ORDER BY id")]


def set_webhook_cursor(db: sqlite3.Connection, webhook_id: str, cursor: int) -> None:
    db.execute("UPDATE webhooks SET cursor = ?, updated_at = ? WHERE id = ?", (cursor, time.time(), webhook_id))


def delete_webhook(db: sqlite3.Connection, webhook_id: str) -> None:
    db.execute("DELETE FROM webhooks WHERE id = ?", (webhook_id,))


def put_webhook(db: sqlite3.Connection, webhook_id: str, definition: dict[str, Any] | None, cursor: int) -> int:
    """Insert (at cursor) or update a webhook's row, its cursor kept; the cursor it has now."""
    text = None if definition is None else json.dumps(definition, separators=(",", ":"))
    with _transaction(db):
        db.execute("INSERT INTO webhooks (id, cursor, definition, updated_at) VALUES (?, ?, ?, ?) "
                   "ON CONFLICT (id) DO UPDATE SET definition = excluded.definition, updated_at = excluded.updated_at",
                   (webhook_id, cursor, text, time.time()))
        return int(db.execute("SELECT cursor FROM webhooks WHERE id = ?", (webhook_id,)).fetchone()["cursor"])


def insert_events(db: sqlite3.Connection, batch: list[NewEvent]) -> list[Event]:
    out = []
    with _transaction(db):
        for new in batch:
            cur = db.execute("INSERT INTO events (at, company, type, data) VALUES (?, ?, ?, ?)",
                             (new.at, new.company, new.type, json.dumps(new.data, separators=(",", ":"))))
            out.append(Event(int(cur.lastrowid or 0), new.at, new.company, new.type, new.data))
    return out


def select_events(db: sqlite3.Connection, since: int, limit: int, companies: list[str], types: list[str],
                  until: int | None) -> list[Event]:
    sql = "SELECT seq, at, company, type, data FROM events WHERE seq > ?"
    args: list[Any] = [since]
    if until is not None:
        sql += " AND seq <= ?"
        args.append(until)
    if companies:
        sql += f" AND company IN ({','.join('?' * len(companies))})"
        args.extend(companies)
    if types:
        sql += f" AND type IN ({','.join('?' * len(types))})"
        args.extend(types)
    sql += " ORDER BY seq LIMIT ?"
    args.append(limit)
    return [Event(r["seq"], r["at"], r["company"], r["type"], json.loads(r["data"])) for r in db.execute(sql, args)]


def oldest_seq(db: sqlite3.Connection) -> int | None:
    seq: int | None = db.execute("SELECT MIN(seq) AS seq FROM events").fetchone()["seq"]
    return seq


def prune(db: sqlite3.Connection, cutoff: float, max_events: int) -> int:
    with _transaction(db):
        n = db.execute("DELETE FROM events WHERE at < ?", (cutoff,)).rowcount
        # The newest max_events events by count: seqs need not be contiguous (a restore moves the
        # next seq forward, whatsappd/backup/restore.py). There can be too many only if the seq
        # span is wider than max_events, which two index lookups tell; only then is it counted.
        span = db.execute("SELECT MIN(seq) AS lo, MAX(seq) AS hi FROM events").fetchone()
        if span["hi"] is not None and span["hi"] - span["lo"] + 1 > max_events:
            row = db.execute("SELECT seq FROM events ORDER BY seq DESC LIMIT 1 OFFSET ?", (max_events,)).fetchone()
            if row is not None:
                n += db.execute("DELETE FROM events WHERE seq <= ?", (row["seq"],)).rowcount
        db.execute("DELETE FROM incoming_media WHERE at < ?", (cutoff,))
    return n


def _insert_status_event(db: sqlite3.Connection, message: OutboxMessage) -> Event:
    """The message.status event for message's new status, inside the caller's transaction."""
    data = status_event_data(message)
    at = time.time()
    cur = db.execute("INSERT INTO events (at, company, type, data) VALUES (?, ?, 'message.status', ?)",
                     (at, message["company"], json.dumps(data, separators=(",", ":"))))
    return Event(int(cur.lastrowid or 0), at, message["company"], "message.status", data)


_row_message = message_from_row


def _message_by_id(db: sqlite3.Connection, message_id: str) -> OutboxMessage:
    return _row_message(db.execute("SELECT * FROM messages WHERE id = ?", (message_id,)).fetchone())


def select_message(db: sqlite3.Connection, company: str, message_id: str) -> OutboxMessage | None:
    row = db.execute("SELECT * FROM messages WHERE id = ? AND company = ?", (message_id, company)).fetchone()
    return _row_message(row) if row else None


def next_pending(db: sqlite3.Connection, company: str) -> OutboxMessage | None:
    row = db.execute("SELECT * FROM messages WHERE company = ? AND status = ? AND expires_at > ? "
                     "ORDER BY n LIMIT 1", (company, MessageStatus.QUEUED.value, time.time())).fetchone()
    if row is None:
        return None
    message = _row_message(row)
    message["text"] = json.loads(row["payload"]).get("text")
    return message


def in_flight(db: sqlite3.Connection, company: str) -> list[OutboxMessage]:
    return [_row_message(r) for r in db.execute("SELECT * FROM messages WHERE company = ? AND status = ? ORDER BY n",
                                                (company, MessageStatus.SENDING.value))]


def counts(db: sqlite3.Connection) -> dict[str, int]:
    return {row["status"]: row["n"] for row in db.execute("SELECT status, count(*) AS n FROM messages GROUP BY status")}


def counts_by_company(db: sqlite3.Connection) -> dict[tuple[str, str], tuple[int, float]]:
    return {(row["company"], row["status"]): (row["n"], row["oldest"]) for row in db.execute(
        "SELECT company, status, count(*) AS n, min(created_at) AS oldest FROM messages GROUP BY company, status")}


def select_media(db: sqlite3.Connection, message_id: str) -> bytes | None:
    row = db.execute("SELECT data FROM media WHERE message_id = ?", (message_id,)).fetchone()
    return row["data"] if row else None


def store_incoming_media(db: sqlite3.Connection, company: str, wa_id: str, kind: str, mimetype: str | None,
                         raw: str) -> None:
    db.execute("INSERT OR REPLACE INTO incoming_media (company, wa_id, at, kind, mimetype, raw) "
               "VALUES (?, ?, ?, ?, ?, ?)", (company, wa_id, time.time(), kind, mimetype, raw))


def select_incoming_media(db: sqlite3.Connection, company: str, wa_id: str) -> IncomingMedia | None:
    row = db.execute("SELECT kind, mimetype, raw FROM incoming_media WHERE company = ? AND wa_id = ?",
                     (company, wa_id)).fetchone()
    return {"kind": row["kind"], "mimetype": row["mimetype"], "raw": row["raw"]} if row else None


def enqueue_batch(db: sqlite3.Connection, batch: list[tuple[OutgoingMessage, float]]
                   ) -> tuple[list[tuple[bool, OutboxMessage] | Exception], list[Event]]:
    """Enqueue each (message, idempotency window) of batch in one transaction (one fsync); each in
    its own savepoint, so that one that fails (IdempotencyConflict, ...) is undone alone and its
    exception returned in its place. If the transaction itself fails, nothing is committed and it
    raises."""
    outcomes: list[tuple[bool, OutboxMessage] | Exception] = []
    events: list[Event] = []
    with _transaction(db):
        for message, idem_window in batch:
            db.execute("SAVEPOINT enqueue")
            try:
                outcome, inserted = _enqueue(db, message, idem_window)
            except Exception as exc:
                if isinstance(exc, sqlite3.Error) and not isinstance(exc, sqlite3.IntegrityError):
                    raise  # the database failed (full disk, I/O), not this message: the batch goes
                db.execute("ROLLBACK TO enqueue")
                db.execute("RELEASE enqueue")
                outcomes.append(exc)
                continue
            db.execute("RELEASE enqueue")
            outcomes.append(outcome)
            events.extend(inserted)
    return outcomes, events


def _enqueue(db: sqlite3.Connection, message: OutgoingMessage,
             idem_window: float) -> tuple[tuple[bool, OutboxMessage], list[Event]]:
    """One message, inside the caller's transaction (see enqueue_batch)."""
    now = time.time()
    digest = message.body_hash
    key = message.idempotency_key
    if key is not None:
        row = db.execute("SELECT * FROM messages WHERE company = ? AND idem_key = ?", (message.company, key)).fetchone()
        if row is not None:
            if now - row["idem_at"] < idem_window:
                if row["body_hash"] != digest:
                    raise IdempotencyConflict(row["id"])
                return (False, _row_message(row)), []
            # The key is older than the window: it may be used again for a new message.
            db.execute("UPDATE messages SET idem_key = NULL WHERE n = ?", (row["n"],))
    mid = new_message_id()
    db.execute(
        "INSERT INTO messages (id, company, idem_key, idem_at, body_hash, recipient, to_input, kind, payload, "
        "status, created_at, updated_at, expires_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (mid, message.company, key, now if key else None, digest, message.recipient, message.to, message.kind,
         json.dumps(message.payload), MessageStatus.QUEUED.value, now, now, now + message.ttl))
    if message.media is not None:
        db.execute("INSERT INTO media (message_id, data) VALUES (?, ?)", (mid, message.media))
    stored = _message_by_id(db, mid)
    return (True, stored), [_insert_status_event(db, stored)]


def set_status(db: sqlite3.Connection, message_id: str, status: MessageStatus, wa_id: str | None,
                error_code: str | None, error: str | None,
                sent_at: float | None) -> tuple[OutboxMessage | None, list[Event]]:
    now = time.time()
    with _transaction(db):
        row = db.execute("SELECT status FROM messages WHERE id = ?", (message_id,)).fetchone()
        if row is None or status not in ALLOWED[MessageStatus(row["status"])]:
            return None, []
        sets: dict[str, Any] = {"status": status.value, "updated_at": now}
        if status is MessageStatus.SENDING:
            db.execute("UPDATE messages SET attempts = attempts + 1 WHERE id = ?", (message_id,))
        if status is MessageStatus.SENT:
            sets["sent_at"] = now if sent_at is None else sent_at
            sets["wa_id"] = wa_id
            sets["error_code"] = sets["error"] = None  # an earlier transient failure is history
        if status in (MessageStatus.FAILED, MessageStatus.EXPIRED, MessageStatus.QUEUED):
            sets["error_code"] = error_code
            sets["error"] = error
        if status in (MessageStatus.FAILED, MessageStatus.EXPIRED, MessageStatus.SENT):
            db.execute("DELETE FROM media WHERE message_id = ?", (message_id,))
        db.execute(f"UPDATE messages SET {', '.join(f'{k} = ?' for k in sets)} WHERE id = ?",
                   (*sets.values(), message_id))
        message = _message_by_id(db, message_id)
        event = _insert_status_event(db, message)
    return message, [event]


def receipt(db: sqlite3.Connection, company: str, wa_ids: list[str],
             status: MessageStatus) -> tuple[tuple[list[OutboxMessage], list[str]], list[Event]]:
    """Apply a delivered/read receipt; only forward moves (a late 'delivered' after 'read' is dropped).

    Returns the messages changed and the WhatsApp ids no message carries (yet)."""
    now = time.time()
    changed: list[OutboxMessage] = []
    unknown = []
    events = []
    column = {MessageStatus.DELIVERED: "delivered_at", MessageStatus.READ: "read_at"}[status]
    with _transaction(db):
        for wa_id in wa_ids:
            row = db.execute("SELECT id, status FROM messages WHERE company = ? AND wa_id = ?",
                             (company, wa_id)).fetchone()
            if row is None:
                unknown.append(wa_id)
                continue
            current = MessageStatus(row["status"])
            if current not in RECEIPT_RANK or RECEIPT_RANK[current] >= RECEIPT_RANK[status]:
                continue
            extra = ", delivered_at = COALESCE(delivered_at, ?)" if status is MessageStatus.READ else ""
            args: tuple[Any, ...] = (status.value, now, now, now, row["id"]) if extra else (status.value, now, now, row["id"])
            db.execute(f"UPDATE messages SET status = ?, updated_at = ?, {column} = ?{extra} WHERE id = ?", args)
            changed.append(_message_by_id(db, row["id"]))
            events.append(_insert_status_event(db, changed[-1]))
    return (changed, unknown), events


def fail_stale_sending(db: sqlite3.Connection, now: float,
                        busy: frozenset[str]) -> tuple[list[OutboxMessage], list[Event]]:
    stale = [row["id"] for row in db.execute("SELECT id FROM messages WHERE status = ? AND expires_at <= ?",
                                             (MessageStatus.SENDING.value, now)) if row["id"] not in busy]
    return _finish(db, stale, MessageStatus.SENDING, MessageStatus.FAILED, ErrorCode.SEND_INTERRUPTED.value,
                   "its send was interrupted and could not be settled before its ttl ran out; it may or may "
                   "not have been delivered", now)


def expire(db: sqlite3.Connection, now: float) -> tuple[list[OutboxMessage], list[Event]]:
    # Read first (no write transaction): the usual answer is "nothing".
    due = [row["id"] for row in db.execute("SELECT id FROM messages WHERE status = ? AND expires_at <= ?",
                                           (MessageStatus.QUEUED.value, now))]
    return _finish(db, due, MessageStatus.QUEUED, MessageStatus.EXPIRED, "ttl_expired",
                   "not sent before its ttl ran out", now)


def _finish(db: sqlite3.Connection, ids: list[str], from_status: MessageStatus, status: MessageStatus, code: str,
            error: str, now: float) -> tuple[list[OutboxMessage], list[Event]]:
    """Move messages still in from_status to a final status, with their events, in one transaction."""
    if not ids:
        return [], []
    with _transaction(db):
        out = []
        for mid in ids:
            changed = db.execute("UPDATE messages SET status = ?, updated_at = ?, error_code = ?, error = ? "
                                 "WHERE id = ? AND status = ?", (status.value, now, code, error, mid, from_status.value)).rowcount
            if changed:
                db.execute("DELETE FROM media WHERE message_id = ?", (mid,))
                out.append(_message_by_id(db, mid))
        events = [_insert_status_event(db, message) for message in out]
    return out, events
