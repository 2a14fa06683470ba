"""What send pacing and webhooks keep in the PostgreSQL store (schema version 2), and its SQL.

The PostgreSQL twin of pacing_sql.py and of sqlite.py's webhook functions, with the same
semantics (their docstrings are the contract; `StoreBackend` in backend.py lists them):

- `whatsappd_contacts`: who wrote to a company's number (a recipient not in it is a first
  contact). Migration 2 fills it from the journal's `message.incoming` events still kept, as
  the SQLite store's one-time backfill does, so people who wrote before the upgrade are known.
- `whatsappd_first_contacts`: when each first-contact recipient was first sent to within the
  rolling window, per company (the budget counts these rows, so it holds across a restart).
- `whatsappd_pacing_pauses`: a company paused after a rate-limit error, until when and why.
- `whatsappd_webhooks`: one row per webhook, its journal cursor and, for one added through the
  API, its definition.

Every function takes the store's connection (autocommit; `db.transaction()` where a write is
more than one statement) and runs on the store's writer or a reader thread.
"""

from __future__ import annotations

import json
import time
from typing import Any

import psycopg
from psycopg.rows import DictRow

from whatsappd.pacing import FIRST_CONTACT_WINDOW
from whatsappd.store.backend import StoredWebhook

__all__ = [
    "MIGRATION",
    "delete_webhook",
    "first_contacts",
    "is_known_contact",
    "pauses",
    "put_webhook",
    "record_contact",
    "record_first_contact",
    "recent_sends",
    "set_pause",
    "set_webhook_cursor",
    "webhooks",
]

Db = psycopg.Connection[DictRow]

#: Schema version 2 (postgresql.MIGRATIONS[1]): released with the pacing and webhook methods.
MIGRATION = """
CREATE TABLE whatsappd_contacts (
    company text NOT NULL,
    jid text NOT NULL,
    at double precision NOT NULL,             -- when they first wrote (as far as we know)
    PRIMARY KEY (company, jid)
);
INSERT INTO whatsappd_contacts (company, jid, at)
    SELECT company, data->>'chat', MIN(at) FROM whatsappd_events
    WHERE type = 'message.incoming' AND company IS NOT NULL AND data->>'is_group' = 'false'
    AND data->>'from_me' = 'false' AND data->>'chat' IS NOT NULL
    GROUP BY company, data->>'chat';
CREATE TABLE whatsappd_first_contacts (
    company text NOT NULL,
    jid text NOT NULL,
    at double precision NOT NULL,             -- the first send to jid within the window
    PRIMARY KEY (company, jid, at)
);
CREATE TABLE whatsappd_pacing_pauses (
    company text PRIMARY KEY,
    until double precision NOT NULL,
    reason text NOT NULL
);
CREATE TABLE whatsappd_webhooks (
    id text PRIMARY KEY,
    cursor bigint NOT NULL,                   -- the last seq delivered (or skipped by its filters)
    definition json,                          -- webhooks added with PUT; NULL: from the config file
    updated_at double precision NOT NULL
);
"""


# ------------------------------------------------------------------------------------ pacing


def record_contact(db: Db, company: str, jid: str, now: float) -> None:
    db.execute("INSERT INTO whatsappd_contacts (company, jid, at) VALUES (%s, %s, %s) ON CONFLICT DO NOTHING",
               (company, jid, now))


def is_known_contact(db: Db, company: str, jid: str) -> bool:
    return db.execute("SELECT 1 FROM whatsappd_contacts WHERE company = %s AND jid = %s",
                      (company, jid)).fetchone() is not None


def first_contacts(db: Db, company: str, now: float) -> dict[str, float]:
    """{jid: when first sent to} of the company's first contacts within the window."""
    return {row["jid"]: row["at"] for row in db.execute(
        "SELECT jid, MIN(at) AS at FROM whatsappd_first_contacts WHERE company = %s AND at > %s GROUP BY jid",
        (company, now - FIRST_CONTACT_WINDOW))}


def record_first_contact(db: Db, company: str, jid: str, now: float) -> None:
    """Count jid in the window (once: a second message to it within the window is free)."""
    with db.transaction():
        db.execute("DELETE FROM whatsappd_first_contacts WHERE company = %s AND at <= %s",
                   (company, now - 2 * FIRST_CONTACT_WINDOW))
        if db.execute("SELECT 1 FROM whatsappd_first_contacts WHERE company = %s AND jid = %s AND at > %s",
                      (company, jid, now - FIRST_CONTACT_WINDOW)).fetchone() is None:
            db.execute("INSERT INTO whatsappd_first_contacts (company, jid, at) VALUES (%s, %s, %s) "
                       "ON CONFLICT DO NOTHING", (company, jid, now))


def recent_sends(db: Db, company: str, limit: int) -> list[float]:
    """The company's last `limit` send times, oldest first (to restore its token bucket)."""
    rows = db.execute("SELECT sent_at FROM whatsappd_messages WHERE company = %s AND sent_at IS NOT NULL "
                      "ORDER BY sent_at DESC LIMIT %s", (company, limit)).fetchall()
    return sorted(float(row["sent_at"]) for row in rows)


def set_pause(db: Db, company: str, until: float | None, reason: str | None) -> None:
    if until is None:
        db.execute("DELETE FROM whatsappd_pacing_pauses WHERE company = %s", (company,))
    else:
        db.execute("INSERT INTO whatsappd_pacing_pauses (company, until, reason) VALUES (%s, %s, %s) "
                   "ON CONFLICT (company) DO UPDATE SET until = EXCLUDED.until, reason = EXCLUDED.reason",
                   (company, until, reason or ""))


def pauses(db: Db) -> dict[str, tuple[float, str]]:
    return {row["company"]: (row["until"], row["reason"])
            for row in db.execute("SELECT company, until, reason FROM whatsappd_pacing_pauses")}


# ---------------------------------------------------------------------------------- webhooks


def webhooks(db: Db) -> list[StoredWebhook]:
    """Every webhook row, by id (a json column comes back parsed)."""
    return [{"id": r["id"], "cursor": int(r["cursor"]), "definition": r["definition"]}
            for r in db.execute("SELECT id, cursor, definition FROM whatsappd_webhooks ORDER BY id")]


def put_webhook(db: Db, webhook_id: str, definition: dict[str, Any] | None, cursor: int) -> int:
    """Insert (at cursor) or update a webhook's row, its cursor kept; the cursor it has now."""
    text = None if definition is None else json.dumps(definition, separators=(",", ":"))
    row = db.execute("INSERT INTO whatsappd_webhooks (id, cursor, definition, updated_at) "
                     "VALUES (%s, %s, %s::json, %s) ON CONFLICT (id) DO UPDATE SET "
                     "definition = EXCLUDED.definition, updated_at = EXCLUDED.updated_at RETURNING cursor",
                     (webhook_id, cursor, text, time.time())).fetchone()
    assert row is not None
    return int(row["cursor"])


def set_webhook_cursor(db: Db, webhook_id: str, cursor: int) -> None:
    db.execute("UPDATE whatsappd_webhooks SET cursor = %s, updated_at = %s WHERE id = %s",
               (cursor, time.time(), webhook_id))


def delete_webhook(db: Db, webhook_id: str) -> None:
    db.execute("DELETE FROM whatsappd_webhooks WHERE id = %s", (webhook_id,))
