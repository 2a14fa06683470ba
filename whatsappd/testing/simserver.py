"""Read the shared simulator server (`[simulator] server_dir`) from outside: which workers are
connected as each company, how each connection ended, and what was sent.

For checkers and benchmarks (an independent double-owner checker samples `live()` every 100 ms).
Everything comes from the files under server_dir (whatsappd/worker/simulator/connections.py
describes the connection log) plus /proc for pid liveness; nothing talks to a daemon.
"""

from __future__ import annotations

from pathlib import Path

from whatsappd.worker.simulator.connections import CONNECTION_LOG_FILE, Connection, read_connections
from whatsappd.worker.simulator.server import DUPLICATES_FILE, SEND_LOG_FILE, SendLogStats, send_log_stats

__all__ = ["Connection", "companies", "connections", "live", "send_stats"]


def companies(server_dir: Path) -> list[str]:
    """The companies with a directory on the server, sorted."""
    try:
        return sorted(p.name for p in server_dir.iterdir() if p.is_dir())
    except FileNotFoundError:
        return []


def connections(server_dir: Path) -> dict[str, list[Connection]]:
    """Per company, every connection of its log in the order they connected: host, pid, when
    (wall and CLOCK_MONOTONIC), how it ended (`ended`: "disconnect", "replaced" or None) and
    whether it is `live` now (no end logged and its worker process still runs)."""
    return {company: list(read_connections(server_dir / company).values())
            for company in companies(server_dir) if (server_dir / company / CONNECTION_LOG_FILE).exists()}


def live(server_dir: Path) -> dict[str, list[tuple[str, int]]]:
    """Per company, the (host, pid) of each live connection: more than one is two owners."""
    return {company: [(c.host, c.pid) for c in conns if c.live] for company, conns in connections(server_dir).items()}


def send_stats(server_dir: Path) -> dict[str, SendLogStats]:
    """Per company that sent or was asked to: unique sends, duplicate requests, sends per JID."""
    return {company: send_log_stats(server_dir / company) for company in companies(server_dir)
            if (server_dir / company / SEND_LOG_FILE).exists() or (server_dir / company / DUPLICATES_FILE).exists()}
