"""Whether a daemon's store is shared by several hosts: a CrossHost for the PostgreSQL backend only
(kept apart so the SQLite default imports none of it)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from whatsappd.store import Event, Secret, StoreBackend

if TYPE_CHECKING:
    from whatsappd.cluster.hosts import CrossHost
    from whatsappd.config import Config
    from whatsappd.supervisor import Runner, Supervisor

__all__ = ["crosshost"]


def crosshost(config: Config, store: StoreBackend, supervisor: Supervisor, deliver: Callable[[Event, Secret], None],
              wake_sender: Callable[[str], None], snapshot: Callable[[Runner], dict[str, Any]]) -> CrossHost | None:
    """The API on every host (cluster/hosts.py) for a PostgreSQL store; None for SQLite (one host)."""
    if config.store_backend != "postgresql":
        return None
    from whatsappd.cluster.hosts import CrossHost
    from whatsappd.store.postgresql import PostgresStore

    assert isinstance(store, PostgresStore)
    return CrossHost(config, store, supervisor, deliver, wake_sender, snapshot)
