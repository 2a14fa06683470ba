"""Durable state in SQLite (WAL): the event journal and the outbox.

One writer thread owns the write connection, so a slow fsync never blocks the event loop and
writes are serialised in the order they were asked for. Events are appended in batches (group
commit): everything published during one loop tick goes into one transaction, and readers see
an event only after its transaction committed, so a `seq` a reader saw is never lost.

An outbox status change and its `message.status` event are one transaction (the operations
that change a message insert the event themselves), so a crash can never leave a status the
journal does not tell. They are delivered in seq order with the batches: every write runs on
the one writer thread, and deliveries happen in the order the writes finished.

Outbox enqueues are group-committed too: the messages that arrive while a commit is under way
share the next transaction (one fsync), and each caller gets its answer only once that
transaction committed, so a 202 still means the message is on disk.

Reads (event backlog, message lookups) use their own connections from worker threads; WAL lets
them run beside the writer.

Every write runs through `Store._write`, which classifies what fails: a full disk is
`StorageFull` (the transaction rolled back whole; the store says it is full in `health()` until a
write succeeds again, and probes once a second meanwhile), a damaged file is `StoreCorrupt`.
Every transaction is opened and closed by `_transaction`, so a failed COMMIT (which SQLite may
already have rolled back) never leaves a transaction open or masks its error.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import errno
import hashlib
import json
import os
import secrets
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from whatsappd.logs import get_logger
from whatsappd.timefmt import iso, iso_or_none

__all__ = ["EVENT_TYPES", "STATUSES", "IdempotencyConflict", "StorageFull", "Store", "StoreCorrupt", "StoreError",
           "check_database", "corrupt_fix", "new_message_id"]

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
"""

#: What the journal records (and a stream reader may filter on).
EVENT_TYPES = (
    "company.state", "company.pairing", "company.paired",
    "message.incoming", "message.receipt", "message.status",
)

#: Statuses of an outgoing message, and which may follow which (receipts only move forward).
STATUSES = ("queued", "sending", "sent", "delivered", "read", "failed", "expired")
_RANK = {"sent": 1, "delivered": 2, "read": 3}


class StoreError(Exception):
    """The store cannot be opened or used; the message says which file and what to do."""


class StorageFull(StoreError):
    """The disk (or quota) holding the store is full: the write was rolled back, nothing of it stored."""


class StoreCorrupt(StoreError):
    """The database file is damaged: restarting cannot help; restore it or move it aside."""

    def __init__(self, path: Path, problem: str) -> None:
        self.path = path
        self.problem = problem
        self.fix = corrupt_fix(path)
        super().__init__(f"the store {path} is damaged ({problem}); {self.fix}")


def corrupt_fix(path: Path) -> str:
    """What to do about a damaged store at path (one sentence, for logs and check-store)."""
    return (f"restore {path.name} from a backup (README: Backups), or move it aside with its -wal and -shm "
            f"files (mv {path} {path}.damaged): the daemon then starts with an empty journal and outbox, and "
            "messages still queued in the old file are not sent; `whatsappd check-store` lists the damage")


def check_database(path: Path) -> list[str]:
    """What PRAGMA integrity_check finds wrong in the SQLite file at path ([]: nothing).

    Read-only, and leaves no file behind: without a -wal file beside it (no daemon has it
    open) it is opened immutable; with one (a daemon may be writing) read-only through the WAL.
    """
    mode = "ro" if Path(f"{path}-wal").exists() else "ro&immutable=1"
    try:
        db = sqlite3.connect(f"{path.absolute().as_uri()}?mode={mode}", uri=True, timeout=30)
    except sqlite3.Error as exc:
        return [f"cannot open it: {exc}"]
    try:
        found = [line for (text,) in db.execute("PRAGMA integrity_check") for line in str(text).splitlines()]
    except sqlite3.Error as exc:
        return [str(exc)]
    finally:
        db.close()
    return [] if found == ["ok"] else found


def _sqlite_code(exc: BaseException) -> int | None:
    """The primary SQLite result code of an sqlite3 error (SQLITE_FULL, ...), None for others."""
    code = getattr(exc, "sqlite_errorcode", None)
    return code & 0xFF if isinstance(exc, sqlite3.Error) and isinstance(code, int) else None


def _is_full(exc: BaseException) -> bool:
    return (_sqlite_code(exc) == sqlite3.SQLITE_FULL
            or (isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)))


def _is_corrupt(exc: BaseException) -> bool:
    return _sqlite_code(exc) in (sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB)


def _free_bytes(path: Path) -> int | None:
    """Bytes an unprivileged writer may still use on the filesystem holding path."""
    try:
        st = os.statvfs(path)
    except OSError:
        return None
    return st.f_bavail * st.f_frsize


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


class IdempotencyConflict(Exception):
    """The same Idempotency-Key was used with a different body."""


def new_message_id() -> str:
    return "msg_" + secrets.token_hex(12)


def body_hash(body: Any) -> str:
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


@dataclass(frozen=True)
class Event:
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


def _connect(path: Path, readonly: bool = False) -> sqlite3.Connection:
    uri = f"file:{path}?mode=ro" if readonly else f"file:{path}"
    db = sqlite3.connect(uri, uri=True, timeout=30, isolation_level=None, check_same_thread=False)
    db.execute("PRAGMA busy_timeout = 30000")
    if not readonly:
        db.execute("PRAGMA journal_mode = WAL")
        # FULL: a transaction that returned is on disk, even across a power cut; group commit
        # keeps the fsync count low.
        db.execute("PRAGMA synchronous = FULL")
        db.execute("PRAGMA foreign_keys = ON")
    return db


class Store:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="store-writer")
        self._db: sqlite3.Connection | None = None
        self._local = threading.local()
        # Event batching
        self._pending: list[tuple[float, str | None, str, dict[str, Any]]] = []
        self._pending_secrets: list[dict[str, Any] | None] = []
        self._flush_scheduled = False
        self._flushing: asyncio.Task[None] | None = None
        self._listeners: list[Callable[[Event, dict[str, Any] | None], None]] = []
        # Outbox enqueues waiting for the next group commit, and the task committing them
        self._enqueues: list[tuple[tuple[Any, ...], asyncio.Future[tuple[bool, dict[str, Any]]]]] = []
        self._enqueuing: asyncio.Task[None] | None = None
        self.last_seq = 0
        self._checkpointer: threading.Thread | None = None
        self._stop_checkpoints = threading.Event()
        #: While the disk is full: when that was first seen, and the last refusal's message.
        self.full_since: float | None = None
        self.full_message = ""
        #: Writes refused because the disk was full, since the daemon started (a metric).
        self.full_refusals = 0
        self._probing = False

    # ------------------------------------------------------------------------ open / close

    def open(self) -> None:
        """Create or open the database (blocking; call before the loop serves).

        A damaged file is StoreCorrupt (PRAGMA quick_check, a fraction of a second even for a
        few hundred MB): found at start, named, with what to do, rather than as errors later.
        """
        new = not self.path.exists()
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        old_umask = os.umask(0o077)
        try:
            self._db = _connect(self.path)
            version = self._db.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise StoreError(f"{self.path} was written by a newer whatsappd (schema {version}); "
                                 "upgrade whatsappd or restore a matching backup")
            damage = [row[0] for row in self._db.execute("PRAGMA quick_check(10)")]
            if damage != ["ok"]:
                raise StoreCorrupt(self.path, "; ".join(damage))
            self._db.executescript(SCHEMA)
            self._db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            row = self._db.execute("SELECT seq FROM sqlite_sequence WHERE name = 'events'").fetchone()
            if new:
                self._db.execute("INSERT OR REPLACE INTO meta VALUES ('created_at', ?)", (str(time.time()),))
        except (sqlite3.Error, StoreError) as exc:
            if self._db is not None:
                self._db.close()
                self._db = None
            if isinstance(exc, StoreError):
                raise
            if _is_corrupt(exc):
                raise StoreCorrupt(self.path, str(exc)) from exc
            raise StoreError(f"cannot open the store {self.path}: {exc}; check that the daemon's user may read "
                             "and write it and its directory") from exc
        finally:
            os.umask(old_umask)
        for suffix in ("", "-wal", "-shm"):
            p = Path(f"{self.path}{suffix}")
            if p.exists():
                os.chmod(p, 0o600)
        self.last_seq = row[0] if row else 0
        # Checkpoints leave the commit path: an automatic one runs inside the COMMIT that crosses
        # the WAL threshold and stalls every event behind it for tens of milliseconds. A thread
        # with its own connection checkpoints passively (never blocking the writer) instead.
        self._db.execute("PRAGMA wal_autocheckpoint = 0")
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
                if self.full_since is not None and not self._probing:
                    # Nothing else may write for a while (no client, no event): find out
                    # whether space came back, so health and metrics do not stay stale.
                    self._probing = True
                    self._executor.submit(self._probe)
        finally:
            db.close()

    async def close(self) -> None:
        if self._db is None:
            return
        await self.flush()
        self._stop_checkpoints.set()
        if self._checkpointer is not None:
            await asyncio.to_thread(self._checkpointer.join, 10)
        await self.run(self._close)
        self._executor.shutdown(wait=True)

    def _close(self, db: sqlite3.Connection) -> None:
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        db.close()
        self._db = None

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """Run fn(db, *args) on the writer thread."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self._write, fn, *args)

    def _write(self, fn: Callable[..., T], *args: Any) -> T:
        """fn(db, *args) on the writer thread, every write's one way in: what fails is classified.

        A full disk raises StorageFull (and the store is `full` until a write succeeds), a
        damaged file StoreCorrupt; both say which file and what to do.
        """
        try:
            result = fn(self._writer(), *args)
        except (sqlite3.Error, OSError) as exc:
            if _is_full(exc):
                raise self._refuse_full(exc) from exc
            if _is_corrupt(exc):
                raise StoreCorrupt(self.path, str(exc)) from exc
            raise
        if self.full_since is not None:
            self._writable_again()
        return result

    def _writable_again(self) -> None:
        assert self.full_since is not None
        log.info("storage writable again", path=str(self.path),
                 full_for_seconds=round(time.time() - self.full_since, 1), refused=self.full_refusals)
        self.full_since = None

    def _refuse_full(self, exc: BaseException) -> StorageFull:
        free = _free_bytes(self.path.parent)
        message = (f"the disk holding {self.path} is full ({'?' if free is None else free} bytes free): nothing "
                   "was stored; free space there (whatsappd carries on by itself once there is room)")
        self.full_refusals += 1
        self.full_message = message
        if self.full_since is None:
            self.full_since = time.time()
            log.error("storage full: writes are refused until there is room", path=str(self.path),
                      free_bytes=free, error=str(exc))
        return StorageFull(message)

    def _probe(self) -> None:
        """A tiny write while the disk is full: its success clears `full` (see _write)."""
        try:
            self._writer().execute("INSERT OR REPLACE INTO meta VALUES ('writable_at', ?)", (str(time.time()),))
        except (StoreError, sqlite3.Error, OSError):
            pass  # still full (or worse): the next write or probe says so
        else:
            if self.full_since is not None:
                self._writable_again()
        finally:
            self._probing = False

    def health(self) -> dict[str, Any]:
        """{"state": "ok"} or, while the disk is full, "full" with since, path and message."""
        if self.full_since is None:
            return {"state": "ok", "path": str(self.path)}
        return {"state": "full", "path": str(self.path), "since": iso(self.full_since), "message": self.full_message}

    def _writer(self) -> sqlite3.Connection:
        if self._db is None:
            raise StoreError("the store is closed")
        return self._db

    def _reader(self) -> sqlite3.Connection:
        db = getattr(self._local, "db", None)
        if db is None:
            db = _connect(self.path, readonly=True)
            self._local.db = db
        return db

    async def read(self, fn: Callable[..., T], *args: Any) -> T:
        """Run fn(read_connection, *args) on a worker thread."""
        return await asyncio.to_thread(lambda: fn(self._reader(), *args))

    # ------------------------------------------------------------------------------ events

    def subscribe(self, listener: Callable[[Event, dict[str, Any] | None], None]) -> Callable[[], None]:
        """listener(event, secret) is called, in the loop, for each committed event."""
        self._listeners.append(listener)
        return lambda: self._listeners.remove(listener) if listener in self._listeners else None

    def append(self, company: str | None, type_: str, data: dict[str, Any],
               secret: dict[str, Any] | None = None) -> None:
        """Queue an event; it is committed with the others of this tick, then delivered."""
        self._pending.append((time.time(), company, type_, data))
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
            batch, secrets_ = self._pending, self._pending_secrets
            self._pending, self._pending_secrets = [], []
            self._flush_scheduled = False
            try:
                events = await self.run(_insert_events, batch)
            except (StoreError, sqlite3.Error, OSError) as exc:
                # Disk full, I/O error: keep the batch (ahead of newer events) and try again,
                # rather than lose it. Readers simply see nothing new until it commits.
                self._pending, self._pending_secrets = batch + self._pending, secrets_ + self._pending_secrets
                failures += 1
                log.error("cannot write events to the journal; kept in memory, retrying", error=str(exc),
                          attempt=failures, events=len(self._pending), path=str(self.path))
                await asyncio.sleep(min(30.0, 0.5 * 2 ** min(failures, 6)))
                continue
            failures = 0
            self._deliver(events, secrets_)
        self._flush_scheduled = False

    def _deliver(self, events: list[Event], secrets_: list[dict[str, Any] | None] | None = None) -> None:
        if not events:
            return
        self.last_seq = max(self.last_seq, events[-1].seq)
        for n, event in enumerate(events):
            secret = secrets_[n] if secrets_ is not None else None
            for listener in list(self._listeners):
                listener(event, secret)

    async def _run_journaled(self, fn: Callable[..., tuple[T, list[Event]]], *args: Any) -> T:
        """Run fn(db, *args) -> (result, events it inserted) on the writer thread; return result.

        The events are delivered from the future's done callback, so they reach listeners in
        seq order (futures of the one writer thread complete in order) even if the caller is
        cancelled meanwhile.
        """
        loop = asyncio.get_running_loop()
        future = loop.run_in_executor(self._executor, self._write, fn, *args)

        def deliver(done: asyncio.Future[tuple[T, list[Event]]]) -> None:
            if not done.cancelled() and done.exception() is None:
                self._deliver(done.result()[1])

        future.add_done_callback(deliver)
        result, _ = await asyncio.shield(future)
        return result

    async def flush(self) -> None:
        """Wait until every appended event is committed and delivered."""
        while self._pending or (self._flushing is not None and not self._flushing.done()):
            if self._flushing is None or self._flushing.done():
                self._start_flush()
            assert self._flushing is not None
            await asyncio.shield(self._flushing)

    async def events_after(self, since: int, limit: int, companies: Iterable[str] = (),
                           types: Iterable[str] = (), until: int | None = None) -> list[Event]:
        return await self.read(_select_events, since, limit, tuple(companies), tuple(types), until)

    async def oldest_seq(self) -> int | None:
        return await self.read(lambda db: db.execute("SELECT MIN(seq) FROM events").fetchone()[0])

    async def prune(self, max_age: float, max_events: int) -> int:
        return await self.run(_prune, time.time() - max_age, max_events)

    # ------------------------------------------------------------------------------ outbox

    async def enqueue(self, company: str, idem_key: str | None, body: Any, recipient: str, to_input: str,
                      kind: str, payload: dict[str, Any], media: bytes | None, ttl: float,
                      idem_window: float) -> tuple[bool, dict[str, Any]]:
        """Store a message durably. Returns (created, message); a replayed key gives the first.

        Group commit: the messages that arrive while a commit is under way go into the next
        transaction together (one fsync for all of them); each still returns only once the
        transaction holding it committed, and one that fails alone is rolled back alone.
        """
        loop = asyncio.get_running_loop()
        future: asyncio.Future[tuple[bool, dict[str, Any]]] = loop.create_future()
        self._enqueues.append(((company, idem_key, body_hash(body), recipient, to_input, kind, payload, media,
                                ttl, idem_window), future))
        if self._enqueuing is None or self._enqueuing.done():
            self._enqueuing = loop.create_task(self._enqueue_loop())
        # shield: a caller that goes away does not take the others' commit with it
        return await asyncio.shield(future)

    async def _enqueue_loop(self) -> None:
        while self._enqueues:
            batch, self._enqueues = self._enqueues, []
            try:
                outcomes = await self._run_journaled(_enqueue_batch, [args for args, _ in batch])
            except BaseException as exc:  # nothing of this batch committed
                for _, future in batch:
                    if not future.done():
                        future.set_exception(exc)
                if isinstance(exc, asyncio.CancelledError):
                    raise
                continue
            for (_, future), outcome in zip(batch, outcomes, strict=True):
                if future.done():
                    continue
                if isinstance(outcome, BaseException):
                    future.set_exception(outcome)
                else:
                    future.set_result(outcome)

    async def message(self, company: str, message_id: str) -> dict[str, Any] | None:
        return await self.read(_select_message, company, message_id)

    async def next_pending(self, company: str) -> dict[str, Any] | None:
        return await self.read(_next_pending, company)

    async def media(self, message_id: str) -> bytes | None:
        return await self.read(
            lambda db: (r[0] if (r := db.execute("SELECT data FROM media WHERE message_id = ?",
                                                  (message_id,)).fetchone()) else None))

    async def set_status(self, message_id: str, status: str, **fields: Any) -> dict[str, Any] | None:
        """Move a message to a status; None if that move is not allowed (e.g. read -> sent)."""
        return await self._run_journaled(_set_status, message_id, status, fields)

    async def receipt(self, company: str, wa_ids: list[str], status: str) -> tuple[list[dict[str, Any]], list[str]]:
        return await self._run_journaled(_receipt, company, wa_ids, status)

    async def in_flight(self, company: str) -> list[dict[str, Any]]:
        return await self.read(lambda db: [_row_message(r) for r in db.execute(
            "SELECT * FROM messages WHERE company = ? AND status = 'sending' ORDER BY n", (company,))])

    async def expire(self) -> list[dict[str, Any]]:
        return await self._run_journaled(_expire, time.time())

    async def fail_stale_sending(self, now: float, busy: frozenset[str]) -> list[dict[str, Any]]:
        return await self._run_journaled(_fail_stale_sending, now, busy)

    async def counts(self) -> dict[str, int]:
        return await self.read(lambda db: dict(db.execute(
            "SELECT status, count(*) FROM messages GROUP BY status").fetchall()))

    async def store_incoming_media(self, company: str, wa_id: str, kind: str, mimetype: str | None,
                                   raw: str) -> None:
        await self.run(lambda db: db.execute(
            "INSERT OR REPLACE INTO incoming_media VALUES (?, ?, ?, ?, ?, ?)",
            (company, wa_id, time.time(), kind, mimetype, raw)))

    async def incoming_media(self, company: str, wa_id: str) -> dict[str, Any] | None:
        def q(db: sqlite3.Connection) -> dict[str, Any] | None:
            row = db.execute("SELECT kind, mimetype, raw FROM incoming_media WHERE company = ? AND wa_id = ?",
                             (company, wa_id)).fetchone()
            return {"kind": row[0], "mimetype": row[1], "raw": row[2]} if row else None

        return await self.read(q)


# ------------------------------------------------------------------ functions on a connection


def _insert_events(db: sqlite3.Connection, batch: list[tuple[float, str | None, str, dict[str, Any]]]) -> list[Event]:
    out = []
    with _transaction(db):
        for at, company, type_, data in batch:
            cur = db.execute("INSERT INTO events (at, company, type, data) VALUES (?, ?, ?, ?)",
                             (at, company, type_, json.dumps(data, separators=(",", ":"))))
            out.append(Event(int(cur.lastrowid or 0), at, company, type_, data))
    return out


def _select_events(db: sqlite3.Connection, since: int, limit: int, companies: tuple[str, ...],
                   types: tuple[str, ...], until: int | None) -> list[Event]:
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
    return [Event(r[0], r[1], r[2], r[3], json.loads(r[4])) for r in db.execute(sql, args)]


def _prune(db: sqlite3.Connection, cutoff: float, max_events: int) -> int:
    with _transaction(db):
        n = db.execute("DELETE FROM events WHERE at < ?", (cutoff,)).rowcount
        top = db.execute("SELECT MAX(seq) FROM events").fetchone()[0]
        if top is not None:
            n += db.execute("DELETE FROM events WHERE seq <= ?", (top - max_events,)).rowcount
        db.execute("DELETE FROM incoming_media WHERE at < ?", (cutoff,))
    return n


def _insert_status_event(db: sqlite3.Connection, message: dict[str, Any]) -> Event:
    """The message.status event for message's new status, inside the caller's transaction."""
    data: dict[str, Any] = {"message_id": message["id"], "status": message["status"],
                            "wa_id": message.get("wa_id"), "to": message.get("to")}
    if message.get("error"):
        data["error"] = message["error"]
    at = time.time()
    cur = db.execute("INSERT INTO events (at, company, type, data) VALUES (?, ?, 'message.status', ?)",
                     (at, message["company"], json.dumps(data, separators=(",", ":"))))
    return Event(int(cur.lastrowid or 0), at, message["company"], "message.status", data)


def _row_message(row: sqlite3.Row | tuple[Any, ...]) -> dict[str, Any]:
    (n, mid, company, idem_key, _idem_at, _hash, recipient, to_input, kind, payload, status, wa_id,
     error_code, error, attempts, created, updated, expires, sent, delivered, read) = row
    out: dict[str, Any] = {
        "id": mid, "company": company, "to": to_input, "jid": recipient, "kind": kind, "status": status,
        "wa_id": wa_id, "attempts": attempts, "created_at": iso_or_none(created), "updated_at": iso_or_none(updated),
        "expires_at": iso_or_none(expires), "sent_at": iso_or_none(sent), "delivered_at": iso_or_none(delivered),
        "read_at": iso_or_none(read), "error": {"code": error_code, "message": error} if error_code else None,
        "idempotency_key": idem_key,
    }
    out.update({k: v for k, v in json.loads(payload).items() if k != "text"})
    return out


def _select_message(db: sqlite3.Connection, company: str, message_id: str) -> dict[str, Any] | None:
    row = db.execute("SELECT * FROM messages WHERE id = ? AND company = ?", (message_id, company)).fetchone()
    return _row_message(row) if row else None


def _next_pending(db: sqlite3.Connection, company: str) -> dict[str, Any] | None:
    row = db.execute("SELECT * FROM messages WHERE company = ? AND status = 'queued' AND expires_at > ? "
                     "ORDER BY n LIMIT 1", (company, time.time())).fetchone()
    if row is None:
        return None
    message = _row_message(row)
    message["text"] = json.loads(row[9]).get("text")
    return message


def _enqueue_batch(db: sqlite3.Connection, batch: list[tuple[Any, ...]]
                   ) -> tuple[list[tuple[bool, dict[str, Any]] | Exception], list[Event]]:
    """Enqueue each message of batch in one transaction (one fsync); each in its own savepoint,
    so that one that fails (IdempotencyConflict, ...) is undone alone and its exception returned
    in its place. If the transaction itself fails, nothing is committed and it raises."""
    outcomes: list[tuple[bool, dict[str, Any]] | Exception] = []
    events: list[Event] = []
    with _transaction(db):
        for args in batch:
            db.execute("SAVEPOINT enqueue")
            try:
                outcome, inserted = _enqueue(db, *args)
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


def _enqueue(db: sqlite3.Connection, company: str, idem_key: str | None, digest: str, recipient: str,
             to_input: str, kind: str, payload: dict[str, Any], media: bytes | None, ttl: float,
             idem_window: float) -> tuple[tuple[bool, dict[str, Any]], list[Event]]:
    """One message, inside the caller's transaction (see _enqueue_batch)."""
    now = time.time()
    if idem_key is not None:
        row = db.execute("SELECT * FROM messages WHERE company = ? AND idem_key = ?",
                         (company, idem_key)).fetchone()
        if row is not None:
            if now - row[4] < idem_window:
                if row[5] != digest:
                    raise IdempotencyConflict(row[1])
                return (False, _row_message(row)), []
            # The key is older than the window: it may be used again for a new message.
            db.execute("UPDATE messages SET idem_key = NULL WHERE n = ?", (row[0],))
    mid = new_message_id()
    db.execute(
        "INSERT INTO messages (id, company, idem_key, idem_at, body_hash, recipient, to_input, kind, payload, "
        "status, created_at, updated_at, expires_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, 'queued', ?, ?, ?)",
        (mid, company, idem_key, now if idem_key else None, digest, recipient, to_input, kind,
         json.dumps(payload), now, now, now + ttl))
    if media is not None:
        db.execute("INSERT INTO media VALUES (?, ?)", (mid, media))
    message = _row_message(db.execute("SELECT * FROM messages WHERE id = ?", (mid,)).fetchone())
    return (True, message), [_insert_status_event(db, message)]


_ALLOWED = {
    "queued": {"sending", "failed", "expired"},
    "sending": {"sent", "queued", "failed"},
    "sent": {"delivered", "read"},
    "delivered": {"read"},
    "read": set(),
    "failed": set(),
    "expired": set(),
}


def _set_status(db: sqlite3.Connection, message_id: str, status: str,
                fields: dict[str, Any]) -> tuple[dict[str, Any] | None, list[Event]]:
    now = time.time()
    with _transaction(db):
        row = db.execute("SELECT status FROM messages WHERE id = ?", (message_id,)).fetchone()
        if row is None or status not in _ALLOWED[row[0]]:
            return None, []
        sets = {"status": status, "updated_at": now}
        if status == "sending":
            db.execute("UPDATE messages SET attempts = attempts + 1 WHERE id = ?", (message_id,))
        if status == "sent":
            sets["sent_at"] = fields.get("sent_at", now)
            sets["wa_id"] = fields["wa_id"]
            sets["error_code"] = sets["error"] = None  # an earlier transient failure is history
        if status in ("failed", "expired", "queued"):
            sets["error_code"] = fields.get("error_code")
            sets["error"] = fields.get("error")
        if status in ("failed", "expired", "sent"):
            db.execute("DELETE FROM media WHERE message_id = ?", (message_id,))
        db.execute(f"UPDATE messages SET {', '.join(f'{k} = ?' for k in sets)} WHERE id = ?",
                   (*sets.values(), message_id))
        message = _row_message(db.execute("SELECT * FROM messages WHERE id = ?", (message_id,)).fetchone())
        event = _insert_status_event(db, message)
    return message, [event]


def _receipt(db: sqlite3.Connection, company: str, wa_ids: list[str],
             status: str) -> tuple[tuple[list[dict[str, Any]], list[str]], list[Event]]:
    """Apply a delivered/read receipt; only forward moves (a late 'delivered' after 'read' is dropped).

    Returns the messages changed and the WhatsApp ids no message carries (yet)."""
    now = time.time()
    changed = []
    unknown = []
    events = []
    column = {"delivered": "delivered_at", "read": "read_at"}[status]
    with _transaction(db):
        for wa_id in wa_ids:
            row = db.execute("SELECT id, status FROM messages WHERE company = ? AND wa_id = ?",
                             (company, wa_id)).fetchone()
            if row is None:
                unknown.append(wa_id)
                continue
            if _RANK.get(row[1], 0) >= _RANK[status] or row[1] not in _RANK:
                continue
            extra = ", delivered_at = COALESCE(delivered_at, ?)" if status == "read" else ""
            args: tuple[Any, ...] = (status, now, now, now, row[0]) if extra else (status, now, now, row[0])
            db.execute(f"UPDATE messages SET status = ?, updated_at = ?, {column} = ?{extra} WHERE id = ?", args)
            changed.append(_row_message(db.execute("SELECT * FROM messages WHERE id = ?", (row[0],)).fetchone()))
            events.append(_insert_status_event(db, changed[-1]))
    return (changed, unknown), events


def _fail_stale_sending(db: sqlite3.Connection, now: float,
                        busy: frozenset[str]) -> tuple[list[dict[str, Any]], list[Event]]:
    stale = [mid for (mid,) in db.execute(
        "SELECT id FROM messages WHERE status = 'sending' AND expires_at <= ?", (now,)) if mid not in busy]
    return _finish(db, stale, "sending", "failed", "send_interrupted",
                   "its send was interrupted and could not be settled before its ttl ran out; it may or may "
                   "not have been delivered", now)


def _expire(db: sqlite3.Connection, now: float) -> tuple[list[dict[str, Any]], list[Event]]:
    # Read first (no write transaction): the usual answer is "nothing".
    due = [mid for (mid,) in db.execute("SELECT id FROM messages WHERE status = 'queued' AND expires_at <= ?", (now,))]
    return _finish(db, due, "queued", "expired", "ttl_expired", "not sent before its ttl ran out", now)


def _finish(db: sqlite3.Connection, ids: list[str], from_status: str, status: str, code: str, error: str,
            now: float) -> tuple[list[dict[str, Any]], list[Event]]:
    """Move messages still in from_status to a final status, with their events, in one transaction."""
    if not ids:
        return [], []
    with _transaction(db):
        out = []
        for mid in ids:
            changed = db.execute("UPDATE messages SET status = ?, updated_at = ?, error_code = ?, error = ? "
                                 "WHERE id = ? AND status = ?", (status, now, code, error, mid, from_status)).rowcount
            if changed:
                db.execute("DELETE FROM media WHERE message_id = ?", (mid,))
                out.append(_row_message(db.execute("SELECT * FROM messages WHERE id = ?", (mid,)).fetchone()))
        events = [_insert_status_event(db, message) for message in out]
    return out, events
