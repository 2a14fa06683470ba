"""The converted store against the real neonize 0.5.2: same schema, and the daemon logs in with it.

Nothing leaves the machine: the store is opened without a client (`whatsappd.baileys.verify`),
and the daemon's company dials only a refusing SOCKS5 listener on 127.0.0.1.
"""

from __future__ import annotations

import contextlib
import re
import sqlite3
from collections.abc import Callable
from pathlib import Path

import pytest
from baileys_fixture import JID, baileys_copy

from whatsappd.baileys import import_company
from whatsappd.baileys._schema import SCHEMA
from whatsappd.baileys.verify import listed_jids
from whatsappd.testing.daemon import wait_until
from whatsappd.testing.scenario import SimDaemon
from whatsappd.testing.socks5 import Socks5FaultProxy

pytestmark = [pytest.mark.neonize]


def _statements(sql: str) -> list[str]:
    return [re.sub(r"\s+", " ", s).strip() for s in sql.split(";") if s.strip()]


def test_the_schema_written_is_the_one_neonize_creates(tmp_path: Path) -> None:
    """A store neonize 0.5.2 creates from nothing has exactly our statements (and version 15, compat 8)."""
    fresh = tmp_path / "fresh.db"
    fresh.touch()
    assert listed_jids(fresh) == []  # neonize upgrades the empty file to its schema, lists no device
    with contextlib.closing(sqlite3.connect(f"file:{fresh}?mode=ro", uri=True)) as db:
        created = ";".join(r[0] for r in db.execute("SELECT sql FROM sqlite_master WHERE sql IS NOT NULL"))
        version = db.execute("SELECT version, compat FROM whatsmeow_version").fetchall()
    assert _statements(created) == _statements(SCHEMA)
    assert version == [(15, 8)]


def test_a_store_neonize_cannot_read_is_reported_not_trusted(tmp_path: Path) -> None:
    """The neonize check fails loudly on a file that is not a store, rather than listing nothing."""
    bad = tmp_path / "store.db"
    bad.write_bytes(b"this is not SQLite" * 100)
    with pytest.raises(RuntimeError, match="neonize could not open the store"):
        listed_jids(bad)


@pytest.mark.slow
def test_an_imported_company_dials_to_log_in_under_the_daemon_and_never_pairs(
        tmp_path: Path, daemons: Callable[..., SimDaemon]) -> None:
    """Imported, then connected under the daemon through a refusing 127.0.0.1 proxy: it dials WhatsApp to log in, never `pairing`."""
    with Socks5FaultProxy(mode="refuse") as proxy:
        d = daemons('[reconnect]\ninitial_delay = "200ms"\nmax_delay = "1s"\n'
                    f'[[companies]]\nid = "seven"\nengine = "neonize"\nproxy = "{proxy.url}"\n')
        report = import_company(baileys_copy(tmp_path / "crm"), "seven", d.state_dir / "sessions", min_idle=60)
        assert report.ok and report.neonize_jid == JID, report.error
        d.start()
        assert d.post("seven", "connect").status in (200, 202)
        wait_until(lambda: len(proxy.requests) >= 2, 40, what="two login attempts through the proxy")
        states = [line.get("new") for line in d.log_lines("state changed", company="seven")]
        assert "reconnecting" in states and "pairing" not in states, states
        starts = d.log_lines("worker started", company="seven")
        assert starts and {s["mode"] for s in starts} == {"restore"}  # the supervisor saw a paired session
        dials = d.log_lines("dialing", company="seven")
        assert dials and not any(line["pair"] for line in dials)  # the worker dialed to log in
        assert not d.log_lines("no_session_to_restore") and not d.log_lines("qr_issued")
        snap = d.snapshot("seven")
        assert snap["state"] != "pairing" and not snap.get("qr_available")
        assert set(proxy.requests) == {("web.whatsapp.com", 443)}
        assert d.stop() == 0
