"""neonize workers on the PostgreSQL whatsmeow store (issue 13): one shared database, each
company's device selected by the JID recorded in `whatsappd_devices` (supervisor/devices.py).

Real PostgreSQL (the session's test server), real neonize clients and workers, and real daemons;
every neonize client dials only a refusing SOCKS5 listener on 127.0.0.1 (nothing leaves the
machine). Devices are fake rows with random keys of whatsmeow's lengths
(whatsappd.testing.whatsmeow_pg), as a real pairing needs WhatsApp.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg
import pytest

from whatsappd.config import ConfigError, build_config
from whatsappd.protocol import ExitCode
from whatsappd.store.postgresql import migrate
from whatsappd.supervisor.devices import Devices
from whatsappd.supervisor.process import Deadlines, WorkerSpec, launch_subprocess, start_worker
from whatsappd.testing.scenario import SimDaemon
from whatsappd.testing.socks5 import Socks5FaultProxy
from whatsappd.testing.whatsmeow_pg import (
    cold_start_round,
    device_rows,
    insert_fake_device,
    loaded_jid,
    neonize_pg_daemon,
    quarantines,
    record_device,
    wait_started,
)
from whatsappd.worker.neonize.classify import is_store_error, is_upgrade_race

pytestmark = [pytest.mark.neonize]

A = "5511900000001:11@s.whatsapp.net"
B = "5511900000002:22@s.whatsapp.net"
GONE = "5511900000003:33@s.whatsapp.net"


@pytest.fixture
def refusing() -> Iterator[Socks5FaultProxy]:
    with Socks5FaultProxy(mode="refuse") as proxy:
        yield proxy


def _pg_daemon(make: Callable[..., SimDaemon], proxy: Socks5FaultProxy, dsn: str, *companies: str) -> SimDaemon:
    return neonize_pg_daemon(make, proxy, dsn, *companies)


def _started(d: SimDaemon) -> SimDaemon:
    d.start()
    return wait_started(d)


def _mappings(dsn: str) -> dict[str, str]:
    with psycopg.connect(dsn) as db:
        return {c: j for c, j in db.execute("SELECT company, jid FROM whatsappd_devices")}


def _quarantined(dsn: str) -> list[tuple[str, str, str]]:
    with psycopg.connect(dsn) as db:
        return [tuple(r) for r in db.execute("SELECT company, jid, reason FROM whatsappd_devices_quarantine")]


# ------------------------------------------------------------------------------ config


def test_whatsmeow_dsn_defaults_to_the_store_dsn_and_must_be_a_postgresql_url(tmp_path: Path) -> None:
    """[store] whatsmeow_dsn: store.dsn by default; a key=value DSN (neonize: SQLite) or a SQLite backend is refused."""
    base = {"daemon": {"state_dir": str(tmp_path)}}
    store = {"backend": "postgresql", "dsn": "postgresql://w@db.example.com/w"}
    assert build_config({**base, "store": store}, "t").whatsmeow_dsn == store["dsn"]
    bouncer = "postgresql://w@db.example.com:6432/w"
    assert build_config({**base, "store": {**store, "whatsmeow_dsn": bouncer}}, "t").whatsmeow_dsn == bouncer
    assert build_config(base, "t").whatsmeow_dsn is None  # SQLite: session files
    with pytest.raises(ConfigError) as keyvalue:
        build_config({**base, "store": {**store, "whatsmeow_dsn": "host=db.example.com dbname=w"}}, "t")
    assert any(p.startswith("store.whatsmeow_dsn = ") and "postgresql://" in p for p in keyvalue.value.problems)
    with pytest.raises(ConfigError) as sqlite:
        build_config({**base, "store": {"whatsmeow_dsn": bouncer}}, "t")
    assert any(p.startswith("store.whatsmeow_dsn: only with") for p in sqlite.value.problems)


# ------------------------------------------------------------------ classification (d)


@pytest.mark.parametrize("message", [
    'failed to upgrade database: failed to run upgrade v0->v15: pq: duplicate key value violates unique '
    'constraint "pg_type_typname_nsp_index" (23505)',
    'failed to upgrade database: failed to create version table: pq: relation "whatsmeow_version" already '
    "exists (42P07)",
    'failed to upgrade database: failed to add compat column to version table: pq: column "compat" of relation '
    '"whatsmeow_version" already exists (42701)',
])
def test_whatsmeows_upgrade_race_is_transient_never_a_store_to_quarantine(message: str) -> None:
    """The three upgrade-race errors seen on PostgreSQL are transient (retried), never store_unusable."""
    assert is_upgrade_race(message)
    assert not is_store_error(message)


def test_a_damaged_sqlite_store_failing_its_upgrade_is_still_a_store_error() -> None:
    """A SQLite file that is not a database fails whatsmeow's upgrade too: that one stays store_unusable."""
    message = "failed to upgrade database: failed to check if foreign keys are enabled: file is not a database"
    assert is_store_error(message) and not is_upgrade_race(message)


# ------------------------------------------------------------- device selection (a)


def test_pairing_in_a_shared_database_makes_a_new_device_and_restoring_selects_by_jid(
        wm_dsn: str, refusing: Socks5FaultProxy) -> None:
    """With another company's device in the database, a pairing client loads a new device; a restoring one its own JID."""
    insert_fake_device(wm_dsn, A, "a")
    record_device(wm_dsn, "a", A)
    insert_fake_device(wm_dsn, B, "b")
    # what this guards against: a client made without a JID loads the first device, another company's
    assert loaded_jid(wm_dsn, "c", refusing.url, pair=True, unselected=True) in (A, B)
    assert loaded_jid(wm_dsn, "c", refusing.url, pair=True) is None  # a new device, nobody's
    assert loaded_jid(wm_dsn, "b", refusing.url, pair=False, jid=B) == B
    assert set(refusing.requests) == {("web.whatsapp.com", 443)}
    assert set(device_rows(wm_dsn)) == {A, B}  # nothing created, nothing lost


def test_two_companies_in_one_database_one_restores_its_device_the_other_pairs_a_new_one(
        daemons, pg_dsn: str, refusing: Socks5FaultProxy) -> None:
    """a restores by its recorded JID, b pairs a new device; the DSN is on no argv and in no log; nothing quarantined."""
    migrate(pg_dsn, whatsmeow=True)
    insert_fake_device(pg_dsn, A, "a")
    record_device(pg_dsn, "a", A)
    secret_dsn = pg_dsn.replace("whatsappd@", "whatsappd:hunter2secret@")  # trust auth: the password is unused
    d = _pg_daemon(daemons, refusing, secret_dsn, "a", "b")
    _started(d)
    a = d.wait_state("a", "reconnecting", timeout=30, check=lambda s: s["last_error"])
    assert a["has_session"] and a["last_error"]["code"] == "connection_failed", a
    assert d.snapshot("b")["has_session"] is False
    assert d.post("b", "connect").status == 202
    pid = d.wait_state("b", "starting", "connecting", "reconnecting", timeout=30,
                       check=lambda s: s["worker"]["pid"])["worker"]["pid"]
    argv = Path(f"/proc/{pid}/cmdline").read_bytes()
    assert b"hunter2secret" not in argv and b"postgres" not in argv
    d.wait_state("b", "reconnecting", timeout=30, check=lambda s: s["last_error"])
    started = {e["company"]: e["mode"] for e in d.log_lines("worker started")}
    assert started == {"a": "restore", "b": "pairing"}, started
    assert set(device_rows(pg_dsn)) == {A} and _mappings(pg_dsn) == {"a": A}
    assert quarantines(d, pg_dsn) == 0, d.companies()
    assert d.stop() == 0
    assert "hunter2secret" not in d.log_path.read_text()


# --------------------------------------------------------------- not paired (b)


def test_a_recorded_jid_without_its_device_row_is_not_paired_and_nothing_starts(
        daemons, wm_dsn: str, refusing: Socks5FaultProxy) -> None:
    """A JID recorded for a company whose whatsmeow row is gone: not paired (last_error says so), no worker, no quarantine."""
    record_device(wm_dsn, "c", GONE)
    d = _pg_daemon(daemons, refusing, wm_dsn, "c")
    _started(d)
    snap = d.client.get("/v1/companies/c").json()  # a status call restores a stored session: none here
    assert (snap["state"], snap["has_session"], snap["worker"]["pid"]) == ("stopped", False, None), snap
    assert snap["last_error"]["code"] == "not_paired", snap
    assert not d.log_lines("worker started") and refusing.connections == 0
    assert _quarantined(wm_dsn) == [] and _mappings(wm_dsn) == {"c": GONE}
    assert d.stop() == 0


def test_a_worker_asked_to_restore_a_jid_without_its_row_ends_not_paired_before_any_go_call(
        wm_dsn: str, refusing: Socks5FaultProxy, tmp_path: Path) -> None:
    """The worker checks the row itself (neonize aborts on a missing JID, rc 134): exit NOT_PAIRED, no dial."""
    spec = WorkerSpec(company="c", session_dir=tmp_path / "session-c", engine="neonize", proxy=refusing.url,
                      pair=False, heartbeat_interval=0.5, log_level="info", whatsmeow_dsn=wm_dsn, jid=GONE)

    async def run() -> int | None:
        worker = await start_worker(spec, Deadlines(heartbeat=30, connect=60, pairing=60, paired_connect=60,
                                                    stuck_reconnecting=60), launch_subprocess)
        async for _ in worker.messages():
            pass
        return (await worker.close()).code

    assert asyncio.run(asyncio.wait_for(run(), 60)) == ExitCode.NOT_PAIRED
    assert refusing.connections == 0


# ---------------------------------------------------------------- wipe, quarantine (e)


def test_logout_deletes_exactly_that_companys_device_rows_and_mapping(
        daemons, wm_dsn: str, refusing: Socks5FaultProxy) -> None:
    """A local logout deletes a's device (its whatsmeow rows cascade) and mapping; b's rows are untouched."""
    for company, jid in (("a", A), ("b", B)):
        insert_fake_device(wm_dsn, jid, company)
        record_device(wm_dsn, company, jid)
    before = device_rows(wm_dsn)
    assert before == {A: 2, B: 2}
    d = _pg_daemon(daemons, refusing, wm_dsn, "a", "b")
    _started(d)
    d.wait_state("a", "reconnecting", timeout=30)
    answer = d.post("a", "logout").json()
    assert answer["wiped"] is True and answer["state"] == "logged_out", answer
    assert device_rows(wm_dsn) == {B: 2}
    assert _mappings(wm_dsn) == {"b": B}
    assert d.snapshot("a")["has_session"] is False and d.snapshot("b")["has_session"] is True
    assert quarantines(d, wm_dsn) == 0, d.companies()
    assert d.stop() == 0


def test_quarantine_moves_the_mapping_aside_with_its_reason_and_keeps_the_credentials(
        wm_dsn: str, tmp_path: Path) -> None:
    """Devices.quarantine on PostgreSQL: the mapping moves to whatsappd_devices_quarantine; no device row is deleted."""
    insert_fake_device(wm_dsn, A, "a")
    record_device(wm_dsn, "a", A)

    async def run() -> tuple[str, str, str | None, str]:
        devices = Devices(tmp_path, wm_dsn, wm_dsn)
        try:
            await devices.load()
            before = devices.state("a", "neonize")
            where = await devices.quarantine("a", "neonize", "store_unusable")
            return str(before), str(devices.state("a", "neonize")), where, str(await devices.refresh("a", "neonize"))
        finally:
            devices.close()

    before, after, where, reread = asyncio.run(run())
    assert (before, after, reread) == ("paired", "none", "none")
    assert where is not None and A in where
    assert device_rows(wm_dsn) == {A: 2}
    assert _mappings(wm_dsn) == {} and _quarantined(wm_dsn) == [("a", A, "store_unusable")]


# -------------------------------------------------------------------- cold start (c)


COLD_ROUNDS = 2  # bench/bench_pg_coldstart.py runs 20 rounds of 3 hosts x 2 companies


def test_three_daemons_cold_started_at_once_on_an_empty_database_quarantine_nothing(
        daemons, postgres, refusing: Socks5FaultProxy) -> None:
    """Three daemons with neonize companies started together on an empty database: whatsmeow's tables made, zero quarantines."""
    for _ in range(COLD_ROUNDS):
        dsn = postgres.create_database()
        made = cold_start_round(daemons, refusing, dsn, hosts=3, per_host=1)
        for d in made:
            assert quarantines(d, dsn) == 0, d.companies()
            for company in d.companies().values():
                assert company["last_error"]["code"] == "connection_failed", company
        with psycopg.connect(dsn) as db:
            assert db.execute("SELECT count(*) FROM whatsmeow_version").fetchone() == (1,)
        assert _quarantined(dsn) == []
        for d in made:
            assert d.stop() == 0
    assert os.environ.get("WHATSAPPD_LOOPBACK_ONLY") == "1"
