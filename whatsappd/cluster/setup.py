"""The daemon's entries into the code of several hosts, importing none of it (nor psycopg) on a
single host on SQLite: `cluster_node` ([cluster] enabled: leases) and `crosshost` (the PostgreSQL
store: the API on every host)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from whatsappd.store import Event, Secret, StoreBackend

if TYPE_CHECKING:
    from whatsappd.cluster.hosts import CrossHost
    from whatsappd.cluster.node import ClusterNode
    from whatsappd.config import Config
    from whatsappd.messaging import OutboxSender
    from whatsappd.supervisor import Runner, Supervisor

__all__ = ["cluster_node", "crosshost"]


def cluster_node(config: Config, supervisor: Supervisor, store: StoreBackend, sender: OutboxSender) -> ClusterNode | None:
    """A ClusterNode wired to the daemon's supervisor, store and sender with [cluster] enabled; else None."""
    if not config.cluster_enabled:
        return None
    from whatsappd.cluster.node import ClusterNode
    from whatsappd.store.postgresql import PostgresStore

    assert isinstance(store, PostgresStore)  # config.py refuses [cluster] without the PostgreSQL store
    return ClusterNode(config, supervisor, store, sender.fail_in_flight)


def crosshost(config: Config, store: StoreBackend, supervisor: Supervisor, deliver: Callable[[Event, Secret], None],
              wake_sender: Callable[[str], None], snapshot: Callable[[Runner], dict[str, Any]]) -> CrossHost | None:
    """The API on every host (cluster/hosts.py) for a PostgreSQL store; None for SQLite (one host)."""
    if config.store_backend != "postgresql":
        return None
    from whatsappd.cluster.hosts import CrossHost
    from whatsappd.store.postgresql import PostgresStore

    assert isinstance(store, PostgresStore)
    return CrossHost(config, store, supervisor, deliver, wake_sender, snapshot)
