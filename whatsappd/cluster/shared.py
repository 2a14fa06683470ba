"""What the hosts sharing one PostgreSQL store tell each other through it: schema v6 and NOTIFY channels.

Every host answers the API for every company (issue 13). The journal table is the truth for
events; NOTIFY only wakes (a notification is lost while a listener is away). Three things ride
on NOTIFY alone, because they must never be stored: a journal event's secret (a pairing QR
code, channel `whatsappd_secret`), and a routed act's answer (a pair code, channel
`whatsappd_commands`); the third, `whatsappd_outbox`, wakes the owner's sender for a message
queued on another host.

Tables (migration v6, `MIGRATION`):
- `whatsappd_company_status`: each company's snapshot as its owner sees it (state, last_error,
  since, jid...), upserted by the owner on each change, fenced with its lease token in cluster
  mode; the other hosts show it.
- `whatsappd_commands`: an act (connect, logout, pair code...) asked on a host that does not own
  the company, for its owner to execute; deleted when answered (the answer travels in the
  NOTIFY), or by the asker when it gives up.
"""

from __future__ import annotations

__all__ = ["COMMANDS_CHANNEL", "JOURNAL_CHANNEL", "MAX_PAYLOAD", "MIGRATION", "OUTBOX_CHANNEL", "SECRET_CHANNEL"]

#: NOTIFY channels (payloads must stay under 8000 bytes: `MAX_PAYLOAD`).
JOURNAL_CHANNEL = "whatsappd_journal"  # newest committed seq (store/postgresql.py sends it)
SECRET_CHANNEL = "whatsappd_secret"  # {"seq", "secret"}: sent in the transaction inserting the event
OUTBOX_CHANNEL = "whatsappd_outbox"  # a company: a message was queued for it
COMMANDS_CHANNEL = "whatsappd_commands"  # {"host"}: commands wait for it; {"id", "status", "body"}: an answer
#: PostgreSQL refuses a NOTIFY payload of 8000 bytes or more; leave room for the framing.
MAX_PAYLOAD = 7900

#: Schema version 6 (store/postgresql.py MIGRATIONS).
MIGRATION = """
    CREATE TABLE whatsappd_company_status (
        company text PRIMARY KEY,
        host text NOT NULL,                     -- the owner that wrote it
        token bigint,                           -- its lease token (NULL: no leases, single-owner PG mode)
        snapshot json NOT NULL,                 -- GET /v1/companies/{id} as the owner answers it
        updated_at timestamptz NOT NULL DEFAULT now()
    );
    CREATE TABLE whatsappd_commands (
        id bigserial PRIMARY KEY,
        company text NOT NULL,
        host text NOT NULL,                     -- the owner asked to run it
        asker text NOT NULL,                    -- the host waiting for the answer
        act text NOT NULL,
        args json NOT NULL,                     -- never secret
        created_at timestamptz NOT NULL DEFAULT now(),
        claimed_at timestamptz                  -- the owner took it (it runs at most once)
    );
    CREATE INDEX whatsappd_commands_waiting ON whatsappd_commands (host, id) WHERE claimed_at IS NULL;
"""
