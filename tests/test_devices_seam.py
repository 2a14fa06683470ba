"""The parts of the daemon that once assumed a session is files in sessions/session-<id>/, now
asking the session place (supervisor/devices.py, supervisor/simdevice.py): recording a paired
JID through a database blink, the doctor, check-store and the Baileys import.

Real PostgreSQL (the session's test server); a database is made unreachable for real by
refusing new connections to it (ALLOW_CONNECTIONS false) and ending its open ones.
"""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg
import pytest
import structlog
from baileys_fixture import JID as BAILEYS_JID
from baileys_fixture import assert_restored_never_paired, baileys_copy

from whatsappd.baileys import import_company
from whatsappd.baileys.pgstore import PgTarget
from whatsappd.supervisor.devices import Devices
from whatsappd.testing.postgres import PostgresServer
from whatsappd.testing.scenario import SimDaemon, daemon_pool
from whatsappd.testing.socks5 import Socks5FaultProxy
from whatsappd.testing.whatsmeow_pg import neonize_pg_daemon, wait_started

JID = "5511900000001:11@s.whatsapp.net"


@contextlib.contextmanager
def _unreachable(server: PostgresServer, dsn: str) -> Iterator[None]:
    """The database of dsn refuses every connection (its open ones are ended) until the block ends."""
    name = dsn.split("@/", 1)[1].split("?", 1)[0]
    with psycopg.connect(server.dsn(), autocommit=True) as admin:
        admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false')
        admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", (name,))
        try:
            yield
        finally:
            admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true')


def _mappings(dsn: str) -> dict[str, str]:
    with psycopg.connect(dsn) as db:
        return {c: j for c, j in db.execute("SELECT company, jid FROM whatsappd_devices")}


# ============================================================================ item 4: recording a paired JID


def test_a_paired_jid_is_recorded_once_a_briefly_unreachable_database_answers_again(
        tmp_path: Path, postgres: PostgresServer, wm_dsn: str) -> None:
    """Recording a paired JID retries while the database refuses connections, and succeeds once it answers."""
    async def run() -> float:
        devices = Devices(tmp_path, wm_dsn, wm_dsn, record_retries=(0.2, 0.4, 0.8, 1.6))
        try:
            await devices.load()  # a live connection, which the blink below ends
            with _unreachable(postgres, wm_dsn):
                recording = asyncio.ensure_future(devices.record("acme", JID))
                await asyncio.sleep(1.0)
                assert not recording.done()
            started = time.monotonic()
            await recording
            return time.monotonic() - started
        finally:
            devices.close()

    assert asyncio.run(run()) < 5
    assert _mappings(wm_dsn) == {"acme": JID}


def test_a_jid_that_cannot_be_recorded_is_logged_with_how_to_record_it_by_hand(
        tmp_path: Path, postgres: PostgresServer, wm_dsn: str) -> None:
    """After the bounded retries the failure is raised and logged as an error naming the company and JID."""
    async def run() -> None:
        devices = Devices(tmp_path, wm_dsn, wm_dsn, record_retries=(0.1, 0.1))
        try:
            await devices.record("acme", JID)
        finally:
            devices.close()

    with (_unreachable(postgres, wm_dsn), structlog.testing.capture_logs() as logs,
          pytest.raises(psycopg.OperationalError)):
        asyncio.run(run())
    retries = [e for e in logs if e["log_level"] == "warning" and e.get("jid") == JID]
    errors = [e for e in logs if e["log_level"] == "error"]
    assert len(retries) == 2
    assert len(errors) == 1 and errors[0]["jid"] == JID and errors[0]["company"] == "acme"
    assert f"VALUES ('acme', '{JID}')" in errors[0]["event"]
    assert _mappings(wm_dsn) == {}


# ============================================================================ item 2: import-baileys into PostgreSQL


@pytest.fixture
def daemons(tmp_path: Path) -> Iterator[Callable[..., SimDaemon]]:
    with daemon_pool(tmp_path) as make:
        yield make


def _import_cli(config: Path, source: Path, company: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "whatsappd", "import-baileys", "--config", str(config), "--from",
                           str(source), "--company", company, "--min-idle", "60"],
                          capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)


def _table_counts(dsn: str) -> dict[str, int]:
    with psycopg.connect(dsn) as db:
        tables = [r[0] for r in db.execute("SELECT table_name FROM information_schema.tables WHERE table_schema = "
                                           "current_schema() AND table_name LIKE 'whats%%' ORDER BY 1")]
        return {t: db.execute(f"SELECT count(*) FROM {t}").fetchone()[0] for t in tables}  # type: ignore[index]


@pytest.mark.neonize
def test_import_baileys_with_the_postgresql_store_puts_the_device_there_and_it_restores_without_a_qr(
        tmp_path: Path, wm_dsn: str, daemons: Callable[..., SimDaemon]) -> None:
    """import-baileys on a PostgreSQL config copies the device into whatsmeow's tables and records its JID; it restores, no QR."""
    with Socks5FaultProxy(mode="refuse") as proxy:
        d = neonize_pg_daemon(daemons, proxy, wm_dsn, "seven")
        assert d.config_path is not None
        done = _import_cli(d.config_path, baileys_copy(tmp_path / "crm"), "seven")
        assert done.returncode == 0, done.stdout + done.stderr
        assert _mappings(wm_dsn) == {"seven": BAILEYS_JID}
        rows = _table_counts(wm_dsn)
        assert rows["whatsmeow_device"] == 1 and rows["whatsmeow_pre_keys"] > 0 and rows["whatsmeow_sessions"] > 0
        assert not (d.state_dir / "sessions" / "session-seven" / "store.db").exists()
        d.start()
        wait_started(d)
        assert d.post("seven", "connect").status in (200, 202)
        assert_restored_never_paired(d, "seven", proxy)
        assert d.stop() == 0


def test_an_import_into_postgresql_never_replaces_a_recorded_device_and_changes_nothing(
        tmp_path: Path, wm_dsn: str) -> None:
    """A company with a recorded JID, or a JID already in whatsmeow's tables, is refused with session_exists; no row changes."""
    pg = PgTarget(wm_dsn, wm_dsn)
    first = import_company(baileys_copy(tmp_path / "a"), "seven", tmp_path / "sessions", min_idle=60, pg=pg)
    assert first.ok, first.error
    before = _table_counts(wm_dsn)
    again = import_company(baileys_copy(tmp_path / "b"), "seven", tmp_path / "sessions", min_idle=60, pg=pg)
    other = import_company(baileys_copy(tmp_path / "c"), "eight", tmp_path / "sessions", min_idle=60, pg=pg)
    dry = import_company(baileys_copy(tmp_path / "d"), "seven", tmp_path / "sessions", min_idle=60, pg=pg,
                         dry_run=True)
    for report in (again, other, dry):
        assert not report.ok and report.error is not None and report.error["code"] == "session_exists", report.error
    assert "already has a device" in again.error["message"]  # type: ignore[index]
    assert "already in whatsmeow" in other.error["message"]  # type: ignore[index]
    assert _table_counts(wm_dsn) == before
    assert _mappings(wm_dsn) == {"seven": BAILEYS_JID}
