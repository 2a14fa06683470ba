"""Where a company's WhatsApp credentials live, and the supervisor's questions about them:
paired / none / corrupt, wipe, quarantine, discover. The one seam runner.py and core.py use.

Two places:

- **Files** (the default, and every simulator company): the session directory, as sessions.py
  reads it (whatsmeow's SQLite `store.db`, or `simulator.json`). A stat-stamped cache makes
  the question cheap enough to ask on every status call.
- **PostgreSQL** (`[store] backend = "postgresql"`, neonize companies): whatsmeow's tables in
  one shared schema, a device per company selected by its JID. whatsmeow cannot say which
  device is whose (without a JID neonize loads the FIRST device of the database, another
  company's), so whatsappd records it: `whatsappd_devices (company, jid)`, written when a
  pairing succeeds, before anything else of it is handled. Paired = a recorded JID whose
  `whatsmeow_device` row exists; a JID without its row (the phone unlinked it and whatsmeow
  deleted it, or an operator did) is "not paired". Wipe deletes the device row (whatsmeow's
  other tables cascade) and the mapping; quarantine never deletes credentials: it moves the
  mapping aside to `whatsappd_devices_quarantine` with a reason.

Status calls must not wait for the database: the PostgreSQL answers come from a cache, filled
off the event loop (one thread, its own connections) at daemon start, before every worker
start, and on paired / logout / wipe / quarantine. The session directory still exists in both
places: it holds the worker's lock and its send log.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import enum
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from whatsappd import sessions
from whatsappd.ids import session_dir
from whatsappd.logs import get_logger
from whatsappd.sessionstore import SessionState
from whatsappd.store.pg_devices_sql import DEVICE_EXISTS, DEVICES_MIGRATION, SELECT_JID
from whatsappd.supervisor.simdevice import SharedDevice, shared_device

__all__ = ["DEVICES_MIGRATION", "DEVICE_EXISTS", "SELECT_JID", "Device", "Devices", "Place", "PgDevices", "place"]

log = get_logger()
T = TypeVar("T")



class Place(enum.StrEnum):
    FILES = "files"
    POSTGRESQL = "postgresql"


@dataclass(frozen=True)
class Device:
    """What the PostgreSQL place knows of one company's device."""

    state: SessionState
    jid: str | None = None  # the recorded JID (also when its row is gone)


NOT_PAIRED = Device(SessionState.NONE)

#: Seconds between attempts to record a paired JID while the database does not answer (about
#: 30 s in all): a database restarting or failing over must not turn a successful pairing into
#: a failed company whose new device nobody can find.
RECORD_RETRIES = (0.5, 1.0, 2.0, 4.0, 8.0, 15.0)


def place(whatsmeow_dsn: str | None, engine: str) -> Place:
    """Where a company of engine keeps its session, whatsmeow_dsn being the config's (None: not
    PostgreSQL). The one rule: the daemon (Devices), the doctor and the Baileys import ask it."""
    return Place.POSTGRESQL if whatsmeow_dsn and engine == "neonize" else Place.FILES


def _undefined_table(exc: BaseException) -> bool:
    return getattr(exc, "sqlstate", None) == "42P01"


class PgDevices:
    """The PostgreSQL place's SQL, blocking; run on PgDevices' own thread (Devices does).

    dsn: the store's database (whatsappd_devices); whatsmeow_dsn: the workers' (whatsmeow's
    tables), possibly the same database through PgBouncer: its connection uses no prepared
    statements.
    """

    def __init__(self, dsn: str, whatsmeow_dsn: str) -> None:
        self.dsn, self.whatsmeow_dsn = dsn, whatsmeow_dsn
        self._db: Any = None
        self._wm: Any = None

    def _connect(self, dsn: str) -> Any:
        import psycopg

        return psycopg.connect(dsn, autocommit=True, connect_timeout=30, prepare_threshold=None)

    def _conns(self) -> tuple[Any, Any]:
        if self._db is None:
            self._db = self._connect(self.dsn)
        if self._wm is None:
            self._wm = self._db if self.whatsmeow_dsn == self.dsn else self._connect(self.whatsmeow_dsn)
        return self._db, self._wm

    def close(self) -> None:
        for db in {id(c): c for c in (self._db, self._wm) if c is not None}.values():
            with contextlib.suppress(Exception):
                db.close()
        self._db = self._wm = None

    def _guarded(self, fn: Callable[[Any, Any], T]) -> T:
        """fn(db, wm); a failed connection is dropped, so the next call reconnects."""
        try:
            return fn(*self._conns())
        except BaseException:
            self.close()
            raise

    @staticmethod
    def _row_exists(wm: Any, jid: str) -> bool:
        try:
            return wm.execute(DEVICE_EXISTS, (jid,)).fetchone() is not None
        except Exception as exc:
            if _undefined_table(exc):
                return False  # whatsmeow's tables not created yet: no device anywhere
            raise

    def device(self, company: str) -> Device:
        def run(db: Any, wm: Any) -> Device:
            row = db.execute(SELECT_JID, (company,)).fetchone()
            if row is None:
                return NOT_PAIRED
            jid = str(row[0])
            return Device(SessionState.PAIRED if self._row_exists(wm, jid) else SessionState.NONE, jid)

        return self._guarded(run)

    def all(self) -> dict[str, Device]:
        def run(db: Any, wm: Any) -> dict[str, Device]:
            rows = db.execute("SELECT company, jid FROM whatsappd_devices").fetchall()
            return {str(c): Device(SessionState.PAIRED if self._row_exists(wm, str(j)) else SessionState.NONE, str(j))
                    for c, j in rows}

        return self._guarded(run)

    def quarantined(self) -> list[tuple[str, str, str, Any]]:
        """(company, jid, reason, moved_at) of every mapping moved aside, newest first."""
        def run(db: Any, wm: Any) -> list[tuple[str, str, str, Any]]:
            return [(str(c), str(j), str(r), m) for c, j, r, m in db.execute(
                "SELECT company, jid, reason, moved_at FROM whatsappd_devices_quarantine ORDER BY moved_at DESC")]

        return self._guarded(run)

    def record(self, company: str, jid: str) -> None:
        def run(db: Any, wm: Any) -> None:
            db.execute("INSERT INTO whatsappd_devices (company, jid) VALUES (%s, %s) ON CONFLICT (company) "
                       "DO UPDATE SET jid = EXCLUDED.jid, paired_at = now()", (company, jid))

        self._guarded(run)

    def wipe(self, company: str) -> bool:
        """Delete the company's device (whatsmeow's rows cascade) and its mapping; True if any was there."""
        def run(db: Any, wm: Any) -> bool:
            row = db.execute(SELECT_JID, (company,)).fetchone()
            if row is None:
                return False
            try:
                wm.execute("DELETE FROM whatsmeow_device WHERE jid = %s", (str(row[0]),))
            except Exception as exc:
                if not _undefined_table(exc):
                    raise
            db.execute("DELETE FROM whatsappd_devices WHERE company = %s AND jid = %s", (company, str(row[0])))
            return True

        return self._guarded(run)

    def quarantine(self, company: str, reason: str) -> str | None:
        """Move the mapping aside (the device rows stay); the JID moved, or None if none was recorded."""
        def run(db: Any, wm: Any) -> str | None:
            with db.transaction():
                row = db.execute("DELETE FROM whatsappd_devices WHERE company = %s RETURNING jid, paired_at",
                                 (company,)).fetchone()
                if row is None:
                    return None
                db.execute("INSERT INTO whatsappd_devices_quarantine (company, jid, reason, paired_at) "
                           "VALUES (%s, %s, %s, %s)", (company, row[0], reason, row[1]))
            return str(row[0])

        return self._guarded(run)


class Devices:
    """The supervisor's answers about sessions, for both places; cheap to ask on the event loop.

    whatsmeow_dsn None: every company's session is files. Otherwise neonize companies are in
    PostgreSQL (simulator companies stay files). With simulator_server_dir (`[simulator]
    server_dir`), a simulator company's device is on that shared server (supervisor/simdevice.py).
    """

    def __init__(self, sessions_root: Path, dsn: str | None = None, whatsmeow_dsn: str | None = None, *,
                 simulator_server_dir: Path | None = None,
                 record_retries: tuple[float, ...] = RECORD_RETRIES) -> None:
        self.sessions_root = sessions_root
        self.simulator_server_dir = simulator_server_dir
        self.record_retries = record_retries
        self._pg = PgDevices(dsn or whatsmeow_dsn or "", whatsmeow_dsn) if whatsmeow_dsn else None
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="devices") \
            if self._pg else None
        self._known: dict[str, Device] = {}
        self._schema_ready = False
        self._schema_lock = asyncio.Lock()
        self._files: dict[str, tuple[tuple[int, int, int], SessionState]] = {}

    def place(self, engine: str) -> Place:
        return place(self.whatsmeow_dsn, engine)

    @property
    def whatsmeow_dsn(self) -> str | None:
        return self._pg.whatsmeow_dsn if self._pg else None

    # ------------------------------------------------------------------ cheap, on the loop

    def _shared(self, company: str, engine: str) -> SharedDevice | None:
        return shared_device(self.simulator_server_dir, company, engine)

    def state(self, company: str, engine: str) -> SessionState:
        """Paired, none or corrupt: the files' state (cached until they change), the cached row, or
        the shared simulator device (a small JSON file: no cache needed)."""
        if (shared := self._shared(company, engine)) is not None:
            return shared.state()
        if self.place(engine) is Place.POSTGRESQL:
            return self._known.get(company, NOT_PAIRED).state
        directory = session_dir(self.sessions_root, company)
        key = sessions.stamp(directory)
        cached = self._files.get(company)
        if cached is None or cached[0] != key:
            cached = self._files[company] = (key, sessions.session_state(directory))
        return cached[1]

    def jid(self, company: str, engine: str) -> str | None:
        """The JID a restoring worker selects its device by (PostgreSQL place; None otherwise)."""
        if self.place(engine) is not Place.POSTGRESQL:
            return None
        return self._known.get(company, NOT_PAIRED).jid

    # ------------------------------------------------------------------ off the loop

    async def _off_loop(self, fn: Callable[[], T]) -> T:
        assert self._pool is not None
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn)

    async def ensure_schema(self) -> None:
        """whatsmeow's tables, created or upgraded once (per daemon; across daemons the migration
        lock makes it once): whatsmeow's own upgrade takes no lock, and workers cold-starting
        together on an empty database failed it ("failed to upgrade database"). Raises StoreError."""
        if self._pg is None or self._schema_ready:
            return
        async with self._schema_lock:
            if self._schema_ready:
                return
            from whatsappd.store.postgresql import migrate

            pg = self._pg
            await self._off_loop(lambda: migrate(pg.dsn, whatsmeow=True, whatsmeow_dsn=pg.whatsmeow_dsn))
            self._schema_ready = True

    async def refresh(self, company: str, engine: str) -> SessionState:
        """Read the company's state again now (PostgreSQL: from the database, off the loop; the
        first time, whatsmeow's schema is migrated first: see ensure_schema).

        A database error keeps what was known (a status call must not see a paired company as
        unpaired because the database blinked) and is logged; so does a failed migration (the
        worker's own store error is then transient, and retried)."""
        if self.place(engine) is Place.POSTGRESQL:
            pg = self._pg
            assert pg is not None
            try:
                await self.ensure_schema()
                self._known[company] = await self._off_loop(lambda: pg.device(company))
            except Exception as exc:
                log.warning("cannot read the company's device from PostgreSQL; keeping what was known",
                            company=company, error=str(exc))
        # files: the stat stamp already says whether they changed since they were last read
        return self.state(company, engine)

    async def load(self) -> None:
        """Every recorded device at once (daemon start)."""
        if self._pg is not None:
            pg = self._pg
            self._known = await self._off_loop(pg.all)

    async def record(self, company: str, jid: str) -> None:
        """A pairing succeeded: remember which device is the company's (PostgreSQL place)."""
        if self._pg is None:
            return
        pg = self._pg
        for attempt, delay in enumerate((*self.record_retries, None), 1):
            try:
                await self._off_loop(lambda: pg.record(company, jid))
                break
            except Exception as exc:
                if delay is None:
                    log.error("could not record the company's new device: it is in the whatsmeow store, but no "
                              "whatsappd_devices row says it is this company's; once the database answers, record "
                              f"it by hand: INSERT INTO whatsappd_devices (company, jid) VALUES ('{company}', "
                              f"'{jid}'), then whatsappctl restart {company}",
                              company=company, jid=jid, attempts=attempt, error=str(exc))
                    raise
                log.warning("cannot record the company's new device yet; retrying", company=company, jid=jid,
                            attempt=attempt, retry_in=delay, error=str(exc))
                await asyncio.sleep(delay)
        self._known[company] = Device(SessionState.PAIRED, jid)
        log.info("device recorded", company=company, jid=jid)

    async def wipe(self, company: str, engine: str) -> bool:
        """Remove every trace of the session (files, and the PostgreSQL device with its mapping, or
        the shared simulator device; never the shared server's send and connection logs)."""
        wiped = False
        if (shared := self._shared(company, engine)) is not None:
            wiped = shared.wipe()
        elif self.place(engine) is Place.POSTGRESQL:
            pg = self._pg
            assert pg is not None
            wiped = await self._off_loop(lambda: pg.wipe(company))
            self._known[company] = NOT_PAIRED
        wiped = sessions.wipe(self.sessions_root, company) or wiped
        self._files.pop(company, None)
        return wiped

    async def quarantine(self, company: str, engine: str, reason: str) -> str | None:
        """Move an unusable session aside; where to (a path, or the JID whose mapping moved). With a
        shared simulator device, that file is what is moved (the session directory holds only the
        worker's lock then, and is wiped)."""
        if (shared := self._shared(company, engine)) is not None:
            sessions.wipe(self.sessions_root, company)
            self._files.pop(company, None)
            moved_shared = shared.quarantine()
            return str(moved_shared) if moved_shared is not None else None
        where: str | None = None
        if self.place(engine) is Place.POSTGRESQL:
            pg = self._pg
            assert pg is not None
            jid = await self._off_loop(lambda: pg.quarantine(company, reason))
            self._known[company] = NOT_PAIRED
            if jid is not None:
                where = f"whatsappd_devices_quarantine (device {jid} kept)"
        moved = sessions.quarantine(self.sessions_root, company)
        self._files.pop(company, None)
        return where or (str(moved) if moved is not None else None)

    def discover(self) -> list[sessions.Discovered]:
        """Companies with a session: directories (today's discovery) and recorded devices (after load())."""
        found = {d.company: d for d in sessions.discover(self.sessions_root)
                 if self.place(d.engine) is Place.FILES}
        for company, device in sorted(self._known.items()):
            if device.state is not SessionState.NONE and company not in found:
                found[company] = sessions.Discovered(company, "neonize")
        return [found[c] for c in sorted(found)]

    def close(self) -> None:
        if self._pool is not None:
            pg = self._pg
            assert pg is not None
            self._pool.submit(pg.close)
            self._pool.shutdown(wait=False)
