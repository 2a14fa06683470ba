"""The parts of the daemon that once assumed a session is files in sessions/session-<id>/, now
asking the session place (supervisor/devices.py, supervisor/simdevice.py): recording a paired
JID through a database blink, the doctor, check-store and the Baileys import.

Real PostgreSQL (the session's test server); a database is made unreachable for real by
refusing new connections to it (ALLOW_CONNECTIONS false) and ending its open ones.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
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
from whatsappd.config import load_config
from whatsappd.doctor import Finding, inspect_state_dir
from whatsappd.supervisor.devices import Devices, PgDevices
from whatsappd.testing.postgres import PostgresServer
from whatsappd.testing.scenario import SimDaemon
from whatsappd.testing.socks5 import Socks5FaultProxy
from whatsappd.testing.whatsmeow_pg import insert_fake_device, record_device, wait_started

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
def test_the_api_import_with_the_postgresql_store_puts_the_device_there_and_it_restores_without_a_qr(
        tmp_path: Path, wm_dsn: str, daemons: Callable[..., SimDaemon]) -> None:
    """The API import on a PostgreSQL store copies the device into whatsmeow's tables and records its JID; it restores, no QR."""
    from whatsappd.testing.scenario import sim_config

    baileys_copy(tmp_path / "crm", "session-seven")
    with Socks5FaultProxy(mode="refuse") as proxy:
        d = daemons(sim_config() + f'[import]\nbaileys_root = "{tmp_path / "crm"}"\n'
                    f'[[companies]]\nid = "seven"\nengine = "neonize"\nproxy = "{proxy.url}"\n',
                    store={"backend": "postgresql", "dsn": wm_dsn})
        d.start()
        wait_started(d)
        response = d.client.post("/v1/companies/seven/import-baileys", {"dry_run": False})
        assert response.status == 201, response.body
        assert "PostgreSQL" in response.json()["target"]
        assert _mappings(wm_dsn) == {"seven": BAILEYS_JID}
        rows = _table_counts(wm_dsn)
        assert rows["whatsmeow_device"] == 1 and rows["whatsmeow_pre_keys"] > 0 and rows["whatsmeow_sessions"] > 0
        assert not (d.state_dir / "sessions" / "session-seven" / "store.db").exists()
        assert_restored_never_paired(d, "seven", proxy)
        assert d.stop() == 0


def test_an_import_into_postgresql_never_replaces_a_recorded_device_and_changes_nothing(
        tmp_path: Path, wm_dsn: str) -> None:
    """import-baileys on a PostgreSQL config records the device; again (same company or JID) is session_exists, no row changes."""
    state = tmp_path / "state"
    config = tmp_path / "whatsappd.toml"
    config.write_text(f'[daemon]\nstate_dir = "{state}"\n[store]\nbackend = "postgresql"\ndsn = "{wm_dsn}"\n')
    done = _import_cli(config, baileys_copy(tmp_path / "a"), "seven")
    assert done.returncode == 0, done.stdout + done.stderr
    assert _mappings(wm_dsn) == {"seven": BAILEYS_JID}
    assert not (state / "sessions" / "session-seven" / "store.db").exists()
    before = _table_counts(wm_dsn)
    pg = PgTarget(wm_dsn, wm_dsn)
    again = import_company(baileys_copy(tmp_path / "b"), "seven", state / "sessions", min_idle=60, pg=pg)
    other = import_company(baileys_copy(tmp_path / "c"), "eight", state / "sessions", min_idle=60, pg=pg)
    dry = import_company(baileys_copy(tmp_path / "d"), "seven", state / "sessions", min_idle=60, pg=pg, dry_run=True)
    for report in (again, other, dry):
        assert not report.ok and report.error is not None and report.error["code"] == "session_exists", report.error
    assert "already has a device" in again.error["message"]  # type: ignore[index]
    assert "already in whatsmeow" in other.error["message"]  # type: ignore[index]
    assert _table_counts(wm_dsn) == before
    assert _mappings(wm_dsn) == {"seven": BAILEYS_JID}


# ============================================================================ item 1: the doctor


def _doctor(tmp_path: Path, body: str) -> list[Finding]:
    """inspect_state_dir on a fresh state directory, the config being body."""
    state = tmp_path / "state"
    (state / "sessions").mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(state, 0o700)
    path = tmp_path / "whatsappd.toml"
    path.write_text(f'[daemon]\nstate_dir = "{state}"\n[control]\nsocket_path = "{tmp_path / "ctl.sock"}"\n{body}')
    return inspect_state_dir(load_config(path))


def _by_check(findings: list[Finding]) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for f in findings:
        out.setdefault(f.check, set()).add(f.subject)
    return out


def test_the_doctor_asks_postgresql_for_neonize_sessions_there(tmp_path: Path, wm_dsn: str) -> None:
    """PostgreSQL place: a device with its row is a session, a rowless JID device_missing, a moved mapping named, a stray an orphan."""
    for company, jid in (("paired", "5511900000001:1@s.whatsapp.net"), ("stray", "5511900000002:2@s.whatsapp.net"),
                         ("moved", "5511900000003:3@s.whatsapp.net")):
        insert_fake_device(wm_dsn, jid)
        record_device(wm_dsn, company, jid)
    record_device(wm_dsn, "gone", "5511900000004:4@s.whatsapp.net")  # no row
    devices = PgDevices(wm_dsn, wm_dsn)
    try:
        devices.quarantine("moved", "store_unusable")
    finally:
        devices.close()
    companies = "".join(f'[[companies]]\nid = "{c}"\nengine = "neonize"\nproxy = "socks5://127.0.0.1:9"\n'
                        for c in ("paired", "gone", "moved", "never"))
    found = _doctor(tmp_path, f'[store]\nbackend = "postgresql"\ndsn = "{wm_dsn}"\n{companies}')
    by_check = _by_check(found)
    assert by_check.get("no_session") == {"never"}, [f.line() for f in found]
    assert by_check.get("device_missing") == {"gone"}
    assert by_check.get("device_quarantined") == {"moved"}
    assert by_check.get("orphan_session") == {"stray"}
    quarantined = next(f for f in found if f.check == "device_quarantined")
    assert "store_unusable" in quarantined.message and "5511900000003:3@s.whatsapp.net" in quarantined.fix


def test_the_doctor_ignores_a_leftover_sqlite_store_under_postgresql_and_checks_the_shared_simulator_server(
        tmp_path: Path, wm_dsn: str) -> None:
    """Under PostgreSQL a session dir's store.db is session_unused, not a session; a shared simulator server's device is a session."""
    from whatsappd.worker.simulator import server

    leftover = tmp_path / "state" / "sessions" / "session-old"
    leftover.mkdir(mode=0o700, parents=True)
    assert import_company(baileys_copy(tmp_path / "crm"), "old", tmp_path / "state" / "sessions", min_idle=60).ok
    shared = tmp_path / "simserver"
    (shared / "simco").mkdir(mode=0o700, parents=True)
    server.write_store(shared / "simco", server.SimulatorDevice(jid=JID, push_name="Sim"))
    found = _doctor(tmp_path, f'[store]\nbackend = "postgresql"\ndsn = "{wm_dsn}"\n[simulator]\nserver_dir = "{shared}"\n'
                              '[[companies]]\nid = "simco"\nengine = "simulator"\n')
    by_check = _by_check(found)
    assert by_check.get("session_unused") == {str(leftover / "store.db")}, [f.line() for f in found]
    assert "no_session" not in by_check and "orphan_session" not in by_check
    assert not any(f.subject.startswith(str(leftover)) for f in found if f.check != "session_unused")


# ============================================================================ item 3: check-store


def test_check_store_checks_each_recorded_postgresql_device_and_not_a_leftover_store_db(
        tmp_path: Path, wm_dsn: str) -> None:
    """check-store under PostgreSQL: one line per recorded device (ok, or MISSING with its fix: exit 1); store.db is no session."""
    insert_fake_device(wm_dsn, JID)
    record_device(wm_dsn, "paired", JID)
    record_device(wm_dsn, "gone", "5511900000004:4@s.whatsapp.net")
    state = tmp_path / "state"
    (state / "sessions" / "session-old").mkdir(mode=0o700, parents=True)
    (state / "sessions" / "session-old" / "store.db").write_bytes(b"SQLite format 3\x00" + b"\xff" * 4000)
    config = tmp_path / "whatsappd.toml"
    config.write_text(f'[daemon]\nstate_dir = "{state}"\n[store]\nbackend = "postgresql"\ndsn = "{wm_dsn}"\n')
    result = subprocess.run([sys.executable, "-m", "whatsappd", "check-store", "--config", str(config)],
                            capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert result.returncode == 1, result.stdout + result.stderr
    assert f"paired: device {JID}: ok" in result.stdout
    assert "gone: device 5511900000004:4@s.whatsapp.net: MISSING" in result.stdout
    assert "whatsappctl connect gone" in result.stdout
    assert "store.db:" not in result.stdout


def test_a_worker_whose_heartbeats_wait_unread_while_the_supervisor_is_busy_is_not_killed(tmp_path: Path) -> None:
    """A reader away longer than the heartbeat deadline (awaiting the database) reads the buffered heartbeats before judging."""
    from whatsappd.supervisor.process import Deadlines, WorkerSpec, launch_subprocess, start_worker

    spec = WorkerSpec(company="c", session_dir=tmp_path / "session-c", engine="simulator", proxy=None, pair=True,
                      heartbeat_interval=0.1, log_level="info")

    async def run() -> tuple[str | None, int]:
        worker = await start_worker(spec, Deadlines(heartbeat=3.0, connect=60, pairing=60, paired_connect=60,
                                                    stuck_reconnecting=60), launch_subprocess)
        seen = 0
        try:
            async for _ in worker.messages():
                seen += 1
                if seen == 1:
                    await asyncio.sleep(4.0)  # busy elsewhere, longer than the heartbeat deadline
                if seen >= 15:
                    break
        finally:
            killed = worker.kill_reason
            worker.ask_to_stop()
            await worker.close()
        return killed, seen

    (tmp_path / "session-c").mkdir(mode=0o700)
    assert asyncio.run(asyncio.wait_for(run(), 30)) == (None, 15)
