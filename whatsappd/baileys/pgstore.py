"""Putting an imported device into whatsmeow's PostgreSQL store (`[store] backend = "postgresql"`).

There a neonize company's session is not the session directory's store.db but a device row of
whatsmeow's shared tables, selected by the JID recorded in `whatsappd_devices`
(supervisor/devices.py); a store.db written into the session directory would be ignored (the
company would pair again, and the import would have been lost). So the import builds and
verifies the SQLite store exactly as for the files place, then copies that one device's rows
into whatsmeow's PostgreSQL tables (the same schema: the column lists are read from both sides,
and blob/integer values are given the PostgreSQL column's type: bytea, boolean, bigint) and
records the JID, in one transaction when both live in one database.

Never replaces anything: a company that already has a recorded JID, or a JID that already has a
device row (this company's or another's), is refused with session_exists and nothing changes.
"""

from __future__ import annotations

import contextlib
import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from whatsappd.baileys.report import Refused
from whatsappd.config import Config
from whatsappd.errors import ErrorCode

__all__ = ["PgTarget", "check_target", "copy_device"]

#: whatsmeow's own bookkeeping, not the device's (the PostgreSQL side has its own).
_SKIPPED_TABLES = {"whatsmeow_version"}
#: Tables shared by every device of the database (not keyed by our JID): an entry already there is kept.
_SHARED_TABLES = {"whatsmeow_lid_map"}


@dataclass(frozen=True)
class PgTarget:
    """Where the import goes: whatsappd's store (the JID mapping) and whatsmeow's tables."""

    dsn: str
    whatsmeow_dsn: str

    @classmethod
    def of(cls, config: Config) -> PgTarget | None:
        """The config's place for an imported (neonize) company: PostgreSQL, or None (files)."""
        from whatsappd.supervisor.devices import Place, place

        if place(config.whatsmeow_dsn, "neonize") is Place.FILES or config.whatsmeow_dsn is None:
            return None
        return cls(config.store_dsn, config.whatsmeow_dsn)

    def where(self) -> str:
        from whatsappd.store.postgresql import redact

        return f"whatsmeow's PostgreSQL store ({redact(self.whatsmeow_dsn)})"


def _connect(dsn: str) -> Any:
    import psycopg

    return psycopg.connect(dsn, autocommit=True, connect_timeout=30, prepare_threshold=None)


def _unreachable(target: PgTarget, exc: Exception) -> Refused:
    from whatsappd.store.postgresql import redact

    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    for dsn in (target.dsn, target.whatsmeow_dsn):
        text = text.replace(dsn, redact(dsn))
    return Refused(ErrorCode.WRITE_FAILED, f"{target.where()} could not be used ({text}); nothing was imported")


def _taken(db: Any, wm: Any, company: str, jid: str) -> str | None:
    """Why company/jid cannot receive the import, or None."""
    import psycopg

    from whatsappd.store.pg_devices_sql import DEVICE_EXISTS, SELECT_JID

    row = db.execute(SELECT_JID, (company,)).fetchone()
    if row is not None:
        return (f"company {company!r} already has a device in PostgreSQL (JID {row[0]}); an import never replaces one: "
                f"log it out first (whatsappctl logout {company})")
    try:
        exists = wm.execute(DEVICE_EXISTS, (jid,)).fetchone() is not None
    except psycopg.errors.UndefinedTable:
        exists = False
    if exists:
        return (f"the device {jid} is already in whatsmeow's PostgreSQL store (another company's, or an earlier "
                "import); an import never replaces one")
    return None


def check_target(target: PgTarget, company: str, jid: str) -> None:
    """Refused(session_exists) if the company or the device is already there; read only."""
    import psycopg

    try:
        with contextlib.ExitStack() as stack:
            db = stack.enter_context(_connect(target.dsn))
            wm = db if target.whatsmeow_dsn == target.dsn else stack.enter_context(_connect(target.whatsmeow_dsn))
            reason = _taken(db, wm, company, jid)
    except psycopg.errors.UndefinedTable:
        reason = None  # whatsappd's schema not created yet: nothing recorded anywhere
    except psycopg.Error as exc:
        raise _unreachable(target, exc) from None
    if reason is not None:
        raise Refused(ErrorCode.SESSION_EXISTS, reason)


def _columns(wm: Any, table: str) -> dict[str, str]:
    rows = wm.execute("SELECT column_name, data_type FROM information_schema.columns "
                      "WHERE table_schema = current_schema() AND table_name = %s", (table,)).fetchall()
    return {str(name): str(kind) for name, kind in rows}


def _value(value: Any, kind: str) -> Any:
    if value is None:
        return None
    if kind == "boolean":
        return bool(value)
    if kind == "bytea" and isinstance(value, str):
        return value.encode()
    return value


def _copy_rows(store: Path, wm: Any) -> int:
    """Insert every row of the SQLite store's whatsmeow tables (its one device) through wm, in
    the caller's transaction; the rows copied. Refused if the schemas differ in a column."""
    with contextlib.closing(sqlite3.connect(f"{store.absolute().as_uri()}?mode=ro", uri=True)) as src:
        tables = [str(r[0]) for r in src.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table' AND name LIKE 'whatsmeow%' ORDER BY rowid")]
        copied = 0
        for table in tables:  # creation order: a referenced table (whatsmeow_device) comes first
            if table in _SKIPPED_TABLES:
                continue
            pg = _columns(wm, table)
            names = [str(r[1]) for r in src.execute(f'PRAGMA table_info("{table}")')]
            missing = [n for n in names if n not in pg]
            if not pg or missing:
                raise Refused(ErrorCode.STORE_CHECK_FAILED,
                              f"whatsmeow's PostgreSQL table {table} has no column {(missing or ['(no table)'])[0]} of the "
                              "converted store (another whatsmeow schema version); nothing was imported: run "
                              "whatsappd migrate with this whatsappd, then import again")
            rows = src.execute(f'SELECT {", ".join(f"{chr(34)}{n}{chr(34)}" for n in names)} FROM "{table}"').fetchall()
            if not rows:
                continue
            conflict = " ON CONFLICT DO NOTHING" if table in _SHARED_TABLES else ""
            sql = (f"INSERT INTO {table} ({', '.join(names)}) VALUES ({', '.join(['%s'] * len(names))}){conflict}")
            with wm.cursor() as cur:
                cur.executemany(sql, [tuple(_value(v, pg[n]) for v, n in zip(row, names, strict=True)) for row in rows])
            copied += len(rows)
    return copied


def copy_device(store: Path, target: PgTarget, company: str, jid: str) -> int:
    """Copy the verified SQLite store's device into PostgreSQL and record it as company's; the
    rows copied. All or nothing: one transaction (two, undone together, when whatsmeow's tables
    are in another database). Refused(session_exists) if anything is already there."""
    import psycopg

    from whatsappd.store import StoreError
    from whatsappd.store.postgresql import migrate

    try:  # whatsappd's and whatsmeow's tables, as the daemon makes them before its first worker
        migrate(target.dsn, whatsmeow=True, whatsmeow_dsn=target.whatsmeow_dsn)
    except StoreError as exc:
        raise Refused(ErrorCode.WRITE_FAILED, f"{exc}; nothing was imported") from None
    record = "INSERT INTO whatsappd_devices (company, jid) VALUES (%s, %s)"
    try:
        with contextlib.ExitStack() as stack:
            db = stack.enter_context(_connect(target.dsn))
            same = target.whatsmeow_dsn == target.dsn
            wm = db if same else stack.enter_context(_connect(target.whatsmeow_dsn))
            with db.transaction():
                # Serialises imports and pairings of this company: the mapping check holds until commit.
                db.execute("SELECT pg_advisory_xact_lock(hashtext('whatsappd_devices:' || %s))", (company,))
                reason = _taken(db, wm, company, jid)
                if reason is not None:
                    raise Refused(ErrorCode.SESSION_EXISTS, reason)
                if same:
                    copied = _copy_rows(store, wm)
                    db.execute(record, (company, jid))
                    return copied
                with wm.transaction():
                    copied = _copy_rows(store, wm)
                # whatsmeow's rows are committed; the mapping's transaction commits next, or they go.
                try:
                    db.execute(record, (company, jid))
                except BaseException:
                    wm.execute("DELETE FROM whatsmeow_device WHERE jid = %s", (jid,))  # the rest cascades
                    raise
                return copied
    except psycopg.errors.UniqueViolation as exc:
        raise Refused(ErrorCode.SESSION_EXISTS, f"the device or the company appeared in PostgreSQL during the import "
                      f"({exc.diag.table_name or 'a table'}); it was left alone and nothing was imported") from None
    except psycopg.Error as exc:
        raise _unreachable(target, exc) from None
