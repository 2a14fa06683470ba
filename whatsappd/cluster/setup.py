"""The daemon's one entry into cluster mode, importing nothing of it (nor psycopg) on a single host."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from whatsappd.cluster.node import ClusterNode
    from whatsappd.config import Config
    from whatsappd.messaging import OutboxSender
    from whatsappd.store import StoreBackend
    from whatsappd.supervisor import Supervisor

__all__ = ["cluster_node"]


def cluster_node(config: Config, supervisor: Supervisor, store: StoreBackend, sender: OutboxSender) -> ClusterNode | None:
    """A ClusterNode wired to the daemon's supervisor, store and sender with [cluster] enabled; else None."""
    if not config.cluster_enabled:
        return None
    from whatsappd.cluster.node import ClusterNode
    from whatsappd.store.postgresql import PostgresStore

    assert isinstance(store, PostgresStore)  # config.py refuses [cluster] without the PostgreSQL store
    return ClusterNode(config, supervisor, store, sender.fail_in_flight)
