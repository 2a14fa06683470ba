"""Writing a `Conversion` as a whatsmeow SQLite store (schema version 15, as neonize 0.5.2 makes it)."""

from __future__ import annotations

import contextlib
import sqlite3

from whatsappd.baileys._schema import COMPAT, SCHEMA, VERSION
from whatsappd.baileys.convert import Conversion
from whatsappd.baileys.report import Refused
from whatsappd.errors import ErrorCode

__all__ = ["check_store", "write_store"]


def write_store(db: sqlite3.Connection, conversion: Conversion) -> None:
    """Create the schema and insert every row in one transaction (foreign keys enforced)."""
    d = conversion.device
    db.execute("PRAGMA foreign_keys = ON")
    with db:
        db.executescript("BEGIN;" + SCHEMA + "COMMIT;")
    with db:
        db.execute("INSERT INTO whatsmeow_version (version, compat) VALUES (?, ?)", (VERSION, COMPAT))
        db.execute(
            "INSERT INTO whatsmeow_device (jid, lid, registration_id, noise_key, identity_key, signed_pre_key,"
            " signed_pre_key_id, signed_pre_key_sig, adv_key, adv_details, adv_account_sig, adv_account_sig_key,"
            " adv_device_sig, platform, business_name, push_name) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, '', ?)",
            (d.jid, d.lid, d.registration_id, d.noise_key, d.identity_key, d.signed_pre_key, d.signed_pre_key_id,
             d.signed_pre_key_sig, d.adv_key, d.adv_details, d.adv_account_sig, d.adv_account_sig_key, d.adv_device_sig,
             d.platform, d.push_name),
        )
        db.executemany("INSERT INTO whatsmeow_pre_keys (jid, key_id, key, uploaded) VALUES (?, ?, ?, ?)",
                       [(d.jid, key_id, key, uploaded) for key_id, key, uploaded in conversion.pre_keys])
        db.executemany("INSERT INTO whatsmeow_identity_keys (our_jid, their_id, identity) VALUES (?, ?, ?)",
                       [(d.jid, their_id, key) for their_id, key in sorted(conversion.identities.items())])
        db.executemany("INSERT INTO whatsmeow_sessions (our_jid, their_id, session) VALUES (?, ?, ?)",
                       [(d.jid, their_id, record) for their_id, record in sorted(conversion.sessions.items())])
        db.executemany("INSERT INTO whatsmeow_sender_keys (our_jid, chat_id, sender_id, sender_key) VALUES (?, ?, ?, ?)",
                       [(d.jid, chat, sender, record) for chat, sender, record in conversion.sender_keys])
        db.executemany("INSERT INTO whatsmeow_app_state_sync_keys (jid, key_id, key_data, timestamp, fingerprint)"
                       " VALUES (?, ?, ?, ?, ?)", [(d.jid, *row) for row in conversion.app_state_sync_keys])
        for name, version, hash_, macs in conversion.app_state_versions:
            db.execute("INSERT INTO whatsmeow_app_state_version (jid, name, version, hash) VALUES (?, ?, ?, ?)",
                       (d.jid, name, version, hash_))
            db.executemany("INSERT INTO whatsmeow_app_state_mutation_macs (jid, name, version, index_mac, value_mac)"
                           " VALUES (?, ?, ?, ?, ?)", [(d.jid, name, version, index, value) for index, value in macs])
        db.executemany("INSERT INTO whatsmeow_lid_map (lid, pn) VALUES (?, ?)", sorted(conversion.lid_map.items()))
        db.executemany("INSERT INTO whatsmeow_privacy_tokens (our_jid, their_jid, token, timestamp, sender_timestamp)"
                       " VALUES (?, ?, ?, ?, ?)", [(d.jid, *row) for row in conversion.privacy_tokens])


def check_store(db: sqlite3.Connection) -> None:
    """SQLite's integrity and foreign key checks; Refused(store_check_failed) on any finding."""
    integrity = [r[0] for r in db.execute("PRAGMA integrity_check")]
    if integrity != ["ok"]:
        raise Refused(ErrorCode.STORE_CHECK_FAILED, f"the converted store failed SQLite's integrity check: {integrity[0]}")
    violation = db.execute("PRAGMA foreign_key_check").fetchone()
    if violation is not None:
        raise Refused(ErrorCode.STORE_CHECK_FAILED, f"the converted store breaks a foreign key in table {violation[0]}")


def build_in_memory(conversion: Conversion) -> None:
    """Write and check the store without touching the disk (for --dry-run)."""
    with contextlib.closing(sqlite3.connect(":memory:")) as db:
        write_store(db, conversion)
        check_store(db)
