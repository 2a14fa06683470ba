"""What send pacing keeps in the SQLite store, and its SQL (sqlite.py's `Store` calls these).

- `contacts`: who wrote to a company's number (a recipient not in it is a first contact).
  Filled from incoming messages; at the first start with this table, from the journal's
  `message.incoming` events still kept, so people who wrote before the upgrade are known.
- `first_contacts`: when each first-contact recipient was first sent to within the rolling
  window, per company: the budget counts these rows, so it holds across a restart.
- `pacing_pauses`: a company paused after a rate-limit error, until when and why (a restart
  keeps the pause).
"""

from __future__ import annotations

import sqlite3

from whatsappd.pacing import FIRST_CONTACT_WINDOW

__all__ = [
    "SCHEMA",
    "backfill_contacts",
    "first_contacts",
    "is_known_contact",
    "pauses",
    "record_contact",
    "record_first_contact",
    "recent_sends",
    "set_pause",
]

SCHEMA = """
CREATE TABLE IF NOT EXISTS contacts (
    company TEXT NOT NULL,
    jid TEXT NOT NULL,
    at REAL NOT NULL,                          -- when they first wrote (as far as we know)
    PRIMARY KEY (company, jid)
);
CREATE TABLE IF NOT EXISTS first_contacts (
    company TEXT NOT NULL,
    jid TEXT NOT NULL,
    at REAL NOT NULL,                          -- the first send to jid within the window
    PRIMARY KEY (company, jid, at)
);
CREATE TABLE IF NOT EXISTS pacing_pauses (
    company TEXT PRIMARY KEY,
    until REAL NOT NULL,
    reason TEXT NOT NULL
);
"""

_BACKFILLED = "contacts_backfilled_at"


def backfill_contacts(db: sqlite3.Connection) -> None:
    """Once per store: everyone who wrote in the journal's kept events becomes a contact."""
    if db.execute("SELECT 1 FROM meta WHERE key = ?", (_BACKFILLED,)).fetchone():
        return
    db.execute("BEGIN IMMEDIATE")
    try:
        db.execute(
            "INSERT OR IGNORE INTO contacts (company, jid, at) "
            "SELECT company, json_extract(data, '$.chat'), MIN(at) FROM events "
            "WHERE type = 'message.incoming' AND company IS NOT NULL AND json_valid(data) "
            "AND json_extract(data, '$.is_group') = 0 AND json_extract(data, '$.from_me') = 0 "
            "AND json_extract(data, '$.chat') IS NOT NULL GROUP BY company, json_extract(data, '$.chat')")
        db.execute("INSERT INTO meta VALUES (?, strftime('%s', 'now'))", (_BACKFILLED,))
        db.execute("COMMIT")
    except BaseException:
        if db.in_transaction:
            db.execute("ROLLBACK")
        raise


def record_contact(db: sqlite3.Connection, company: str, jid: str, now: float) -> None:
    db.execute("INSERT OR IGNORE INTO contacts (company, jid, at) VALUES (?, ?, ?)", (company, jid, now))


def is_known_contact(db: sqlite3.Connection, company: str, jid: str) -> bool:
    return db.execute("SELECT 1 FROM contacts WHERE company = ? AND jid = ?", (company, jid)).fetchone() is not None


def first_contacts(db: sqlite3.Connection, company: str, now: float) -> dict[str, float]:
    """{jid: when first sent to} of the company's first contacts within the window."""
    return {row["jid"]: row["at"] for row in db.execute(
        "SELECT jid, MIN(at) AS at FROM first_contacts WHERE company = ? AND at > ? GROUP BY jid",
        (company, now - FIRST_CONTACT_WINDOW))}


def record_first_contact(db: sqlite3.Connection, company: str, jid: str, now: float) -> None:
    """Count jid in the window (once: a second message to it within the window is free)."""
    with_tx = not db.in_transaction
    if with_tx:
        db.execute("BEGIN IMMEDIATE")
    try:
        db.execute("DELETE FROM first_contacts WHERE company = ? AND at <= ?", (company, now - 2 * FIRST_CONTACT_WINDOW))
        if db.execute("SELECT 1 FROM first_contacts WHERE company = ? AND jid = ? AND at > ?",
                      (company, jid, now - FIRST_CONTACT_WINDOW)).fetchone() is None:
            db.execute("INSERT OR IGNORE INTO first_contacts (company, jid, at) VALUES (?, ?, ?)", (company, jid, now))
        if with_tx:
            db.execute("COMMIT")
    except BaseException:
        if with_tx and db.in_transaction:
            db.execute("ROLLBACK")
        raise


def recent_sends(db: sqlite3.Connection, company: str, limit: int) -> list[float]:
    """The company's last `limit` send times, oldest first (to restore its token bucket)."""
    rows = db.execute("SELECT sent_at FROM messages WHERE company = ? AND sent_at IS NOT NULL "
                      "ORDER BY sent_at DESC LIMIT ?", (company, limit)).fetchall()
    return sorted(row["sent_at"] for row in rows)


def set_pause(db: sqlite3.Connection, company: str, until: float | None, reason: str | None) -> None:
    if until is None:
        db.execute("DELETE FROM pacing_pauses WHERE company = ?", (company,))
    else:
        db.execute("INSERT OR REPLACE INTO pacing_pauses (company, until, reason) VALUES (?, ?, ?)",
                   (company, until, reason or ""))


def pauses(db: sqlite3.Connection) -> dict[str, tuple[float, str]]:
    return {row["company"]: (row["until"], row["reason"]) for row in db.execute("SELECT * FROM pacing_pauses")}

