"""The parts of the daemon that once assumed a session is files in sessions/session-<id>/, now
asking the session place (supervisor/devices.py, supervisor/simdevice.py): recording a paired
JID through a database blink, the doctor, check-store and the Baileys import.

Real PostgreSQL (the session's test server); a database is made unreachable for real by
refusing new connections to it (ALLOW_CONNECTIONS false) and ending its open ones.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
import structlog

from whatsappd.supervisor.devices import Devices
from whatsappd.testing.postgres import PostgresServer

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
