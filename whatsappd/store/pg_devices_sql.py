"""What whatsappd keeps in PostgreSQL about whose whatsmeow device is whose (schema version 4),
and the two questions asked of it. The SQL alone, so the store (which applies the migration)
and its users (supervisor/devices.py, baileys/pgstore.py) import it without importing each other.
"""

from __future__ import annotations

__all__ = ["DEVICES_MIGRATION", "DEVICE_EXISTS", "SELECT_JID"]

#: Schema version 4 (store/postgresql.py MIGRATIONS): which whatsmeow device is whose.
DEVICES_MIGRATION = """
    CREATE TABLE whatsappd_devices (
        company text PRIMARY KEY,
        jid text NOT NULL,                      -- whatsmeow_device.jid of the company's device
        paired_at timestamptz NOT NULL DEFAULT now()
    );
    -- Mappings moved aside (the device rows stay: credentials are never deleted by a quarantine).
    CREATE TABLE whatsappd_devices_quarantine (
        company text NOT NULL,
        jid text NOT NULL,
        reason text NOT NULL,
        paired_at timestamptz NOT NULL,
        moved_at timestamptz NOT NULL DEFAULT now()
    );
"""

SELECT_JID = "SELECT jid FROM whatsappd_devices WHERE company = %s"
DEVICE_EXISTS = "SELECT 1 FROM whatsmeow_device WHERE jid = %s"
