"""Read the shared simulator server (`[simulator] server_dir`) from outside: which workers are
connected as each company, how each connection ended, and what was sent.

For checkers and benchmarks (an independent double-owner checker samples `live()` every 100 ms).
Everything comes from the files under server_dir (whatsappd/worker/simulator/connections.py
describes the connection log) plus /proc for pid liveness; nothing talks to a daemon.
"""

from __future__ import annotations

from pathlib import Path

from whatsappd.simfiles import (
    CONNECTION_LOG_FILE,
    DUPLICATES_FILE,
    SEND_LOG_FILE,
    Connection,
    SendLogStats,
    read_connections,
    send_log_stats,
)

__all__ = ["Connection", "companies", "connections", "live", "replacements", "send_stats"]


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


def replacements(server_dir: Path) -> dict[str, list[tuple[Connection, Connection]]]:
    """Per company, each (older, newer) pair where a connection replaced one whose worker was
    still running (the `replaced` line is written only then): two workers of the company were
    alive at once. Across hosts that is a double owner, whatever `live()` shows at any instant
    (the replacement and the new connection are recorded in one step, so `live()` never lists
    two); within one host (the same `host`) it is a restart that overlapped its predecessor."""
    out: dict[str, list[tuple[Connection, Connection]]] = {}
    for company, conns in connections(server_dir).items():
        by_id = {c.conn: c for c in conns}
        pairs = [(c, by_id[c.by]) for c in conns if c.ended == "replaced" and c.by in by_id]
        if pairs:
            out[company] = pairs
    return out


def send_stats(server_dir: Path) -> dict[str, SendLogStats]:
    """Per company that sent or was asked to: unique sends, duplicate requests, sends per JID."""
    return {company: send_log_stats(server_dir / company) for company in companies(server_dir)
            if (server_dir / company / SEND_LOG_FILE).exists() or (server_dir / company / DUPLICATES_FILE).exists()}
