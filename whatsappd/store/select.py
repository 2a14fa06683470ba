"""Which store the configuration names: SQLite in the state directory (the default), or PostgreSQL.

The PostgreSQL module (and psycopg) is imported only when it is chosen, so a SQLite daemon
neither loads nor needs it.
"""

from __future__ import annotations

import asyncio

from whatsappd.config import Config
from whatsappd.store.backend import StoreBackend
from whatsappd.store.sqlite import Store

__all__ = ["make_store", "migrate_store"]

#: The SQLite store's file, in the state directory.
SQLITE_FILE = "whatsappd.sqlite"


def make_store(config: Config) -> StoreBackend:
    """The store `[store] backend` names (not opened yet)."""
    if config.store_backend == "postgresql":
        from whatsappd.store.postgresql import PostgresStore

        return PostgresStore(config.store_dsn)
    return Store(config.daemon_state_dir / SQLITE_FILE)


def migrate_store(config: Config) -> str:
    """Create or upgrade the configured store's schema now; one line saying what was done.

    Raises StoreError (StoreCorrupt for a damaged SQLite file) when it cannot.
    """
    if config.store_backend == "postgresql":
        from whatsappd.store.postgresql import migrate, redact

        done = migrate(config.store_dsn, whatsmeow=True, whatsmeow_dsn=config.whatsmeow_dsn)
        ours = "up to date" if done.before == done.now else f"upgraded from schema {done.before}"
        theirs = f"created or upgraded by {done.whatsmeow_by}" if done.whatsmeow_by else "up to date"
        return f"PostgreSQL store {redact(config.store_dsn)}: schema {done.now}, {ours}; whatsmeow's tables {theirs}"
    store = Store(config.daemon_state_dir / SQLITE_FILE)
    store.open()  # creates or upgrades the schema
    asyncio.run(store.close())
    return f"SQLite store {store.path}: schema up to date"
