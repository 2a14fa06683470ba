"""The PostgreSQL store's own parts: the test server, the settings, `whatsappd migrate` under its
lock, NOTIFY as a wake-up, and seq order equal to commit order with several writers.

A real PostgreSQL server (the session's `postgres` fixture), real databases, real threads and
subprocesses; nothing is faked. The backend-independent journal and outbox behaviour runs on
both backends in test_store.py; whole daemons on PostgreSQL in test_events.py and
test_crash_exactly_once.py.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import threading
from pathlib import Path

import psycopg
import pytest

from whatsappd.config import ConfigError, build_config
from whatsappd.store import StoreError
from whatsappd.store.postgresql import NOTIFY_CHANNEL, SCHEMA_VERSION, PostgresStore, migrate, redact
from whatsappd.testing.daemon import at_once, clean_env, whatsappd_command
from whatsappd.testing.postgres import PostgresServer


def schema_version(dsn: str) -> str | None:
    with psycopg.connect(dsn) as db:
        row = db.execute("SELECT value FROM whatsappd_meta WHERE key = 'schema_version'").fetchone()
        return None if row is None else str(row[0])


def test_the_test_server_listens_on_its_unix_socket_only_as_an_unprivileged_user(postgres: PostgresServer):
    """The tests' PostgreSQL listens on no TCP address, only on its socket file, and never runs as root."""
    with psycopg.connect(postgres.dsn()) as db:
        assert db.execute("SHOW listen_addresses").fetchone() == ("",)
    assert (postgres.socket_dir / ".s.PGSQL.5432").is_socket()
    assert postgres.proc is not None
    assert os.stat(f"/proc/{postgres.proc.pid}").st_uid != 0


def test_a_postgresql_backend_needs_a_dsn_in_url_form(tmp_path: Path):
    """backend = "postgresql" without store.dsn, or with a key=value DSN, is a config error naming the setting."""
    base = {"daemon": {"state_dir": str(tmp_path)}}
    with pytest.raises(ConfigError) as missing:
        build_config({**base, "store": {"backend": "postgresql"}}, "test")
    assert any(p.startswith("store.dsn: required") for p in missing.value.problems), missing.value.problems
    with pytest.raises(ConfigError) as keyvalue:
        build_config({**base, "store": {"backend": "postgresql", "dsn": "host=db.example.com dbname=w"}}, "test")
    assert any(p.startswith("store.dsn = ") and "postgresql://" in p for p in keyvalue.value.problems)
    with pytest.raises(ConfigError):
        build_config({**base, "store": {"backend": "mysql"}}, "test")
    config = build_config({**base, "store": {"backend": "postgresql", "dsn": "postgres://w@db.example.com/w"}}, "t")
    assert (config.store_backend, config.store_dsn) == ("postgresql", "postgres://w@db.example.com/w")
    assert build_config(base, "test").store_backend == "sqlite"


def test_concurrent_migrations_of_an_empty_database_apply_the_schema_exactly_once(pg_dsn: str):
    """Eight migrations started at once on an empty database all succeed; one applies the schema."""
    results = at_once([lambda: migrate(pg_dsn) for _ in range(8)])
    assert sorted(r[:2] for r in results) == [(0, SCHEMA_VERSION)] + [(SCHEMA_VERSION, SCHEMA_VERSION)] * 7
    assert schema_version(pg_dsn) == str(SCHEMA_VERSION)


@pytest.mark.neonize  # it creates whatsmeow's tables with neonize (no client, no dial)
def test_whatsappd_migrate_creates_the_schema_then_finds_it_up_to_date(pg_dsn: str, tmp_path: Path):
    """`whatsappd migrate` creates the schema, then says it is up to date; a newer schema is refused, untouched."""
    config = tmp_path / "whatsappd.toml"
    config.write_text(f'[daemon]\nstate_dir = "{tmp_path / "state"}"\n[store]\nbackend = "postgresql"\ndsn = "{pg_dsn}"\n')

    def run() -> subprocess.CompletedProcess[str]:
        return subprocess.run([*whatsappd_command(), "migrate", "--config", str(config)], capture_output=True,
                              text=True, timeout=60, env=clean_env(), stdin=subprocess.DEVNULL)

    first = run()
    assert first.returncode == 0, first.stderr
    assert f"schema {SCHEMA_VERSION}, upgraded from schema 0" in first.stdout
    second = run()
    assert second.returncode == 0 and "up to date" in second.stdout, second
    with psycopg.connect(pg_dsn, autocommit=True) as db:
        db.execute("UPDATE whatsappd_meta SET value = '999' WHERE key = 'schema_version'")
    newer = run()
    assert newer.returncode == 1 and "newer whatsappd" in newer.stderr, newer
    assert schema_version(pg_dsn) == "999"
    assert not (tmp_path / "state").exists()  # the PostgreSQL backend keeps nothing in state_dir


@pytest.mark.neonize
def test_migrates_started_at_once_on_an_empty_database_create_whatsmeows_tables_once(pg_dsn: str, tmp_path: Path):
    """Three `whatsappd migrate` at once on an empty database all succeed, whatsmeow's tables made by one."""
    config = tmp_path / "whatsappd.toml"
    config.write_text(f'[daemon]\nstate_dir = "{tmp_path / "state"}"\n[store]\nbackend = "postgresql"\ndsn = "{pg_dsn}"\n')
    procs = [subprocess.Popen([*whatsappd_command(), "migrate", "--config", str(config)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=clean_env(), stdin=subprocess.DEVNULL)
             for _ in range(3)]
    outcomes = [(proc.wait(120), *proc.communicate()) for proc in procs]
    assert [rc for rc, _, _ in outcomes] == [0, 0, 0], outcomes
    created = [out for _, out, _ in outcomes if "whatsmeow's tables created or upgraded by neonize" in out]
    assert len(created) == 1, outcomes
    with psycopg.connect(pg_dsn) as db:
        tables = {row[0] for row in db.execute("SELECT table_name FROM information_schema.tables "
                                               "WHERE table_name LIKE 'whatsmeow_%'")}
        assert {"whatsmeow_device", "whatsmeow_version"} <= tables
        assert db.execute("SELECT count(*) FROM whatsmeow_device").fetchone() == (0,)
        done_by = db.execute("SELECT value FROM whatsappd_meta WHERE key = 'whatsmeow_schema'").fetchone()
    assert done_by is not None and done_by[0].startswith("neonize ")


def test_a_committed_event_wakes_a_listener_with_its_seq(pg_dsn: str):
    """Each journal commit sends NOTIFY with its newest seq, so readers elsewhere wake without polling."""
    with psycopg.connect(pg_dsn, autocommit=True) as listener:
        listener.execute(f"LISTEN {NOTIFY_CHANNEL}")

        async def body() -> int:
            store = PostgresStore(pg_dsn)
            store.open()
            try:
                for i in range(3):
                    store.append("acme", "message.incoming", {"i": i})
                await store.flush()
                return store.last_seq
            finally:
                await store.close()

        last = asyncio.run(body())
        payloads = [n.payload for n in listener.notifies(timeout=5, stop_after=1)]
    assert payloads == [str(last)] and last == 3


def test_seq_order_is_commit_order_with_two_stores_writing_at_once(pg_dsn: str):
    """Two stores appending to one database at once: a reader tailing seq > last never skips a seq."""
    migrate(pg_dsn)
    per_writer = 150
    stop = threading.Event()
    seen: list[int] = []

    def tail() -> None:
        last = 0
        with psycopg.connect(pg_dsn, autocommit=True) as db:
            while True:
                done = stop.is_set()
                for (seq,) in db.execute("SELECT seq FROM whatsappd_events WHERE seq > %s ORDER BY seq", (last,)):
                    seen.append(seq)
                    last = seq
                if done:
                    return

    async def write(writer: int) -> None:
        store = PostgresStore(pg_dsn)
        store.open()
        try:
            for i in range(per_writer):
                store.append("acme", "message.incoming", {"writer": writer, "i": i})
                await store.flush()  # one event per transaction: the most interleaving
        finally:
            await store.close()

    reader = threading.Thread(target=tail)
    reader.start()
    try:
        at_once([lambda w=w: asyncio.run(write(w)) for w in range(2)])
    finally:
        stop.set()
        reader.join(30)
    assert seen == list(range(1, 2 * per_writer + 1))


def test_an_unreachable_database_is_a_store_error_without_its_password(tmp_path: Path):
    """A DSN nobody answers on fails open() with a StoreError that names it, password redacted."""
    for dsn in (f"postgresql://whatsappd:s3cret@/whatsappd?host={tmp_path}",
                f"postgresql://whatsappd@/whatsappd?host={tmp_path}&password=s3cret"):
        with pytest.raises(StoreError) as failed:
            PostgresStore(dsn).open()
        assert "s3cret" not in str(failed.value) and redact(dsn) in str(failed.value)
        assert "***" in redact(dsn)


def test_a_daemon_whose_database_is_unreachable_exits_1_naming_it(daemon_factory, tmp_path: Path):
    """A daemon whose PostgreSQL store cannot be reached stops its start with exit 1 and one line naming it."""
    dsn = f"postgresql://whatsappd:s3cret@/whatsappd?host={tmp_path}"
    d = daemon_factory(f'[store]\nbackend = "postgresql"\ndsn = "{dsn}"\n')
    d.start(wait=False)
    assert d.proc is not None and d.proc.wait(30) == 1
    lines = [e for e in d.log_events() if e.get("event", "").startswith("cannot start")]
    assert len(lines) == 1 and redact(dsn) in lines[0]["reason"], d.logs()
    assert "s3cret" not in d.logs()


def test_events_appended_while_the_connection_is_lost_are_kept_and_committed_after_it(pg_dsn: str):
    """The writer's connection killed by the server: the batch is kept, retried on a new connection, nothing lost."""

    async def body() -> tuple[list[int], list[int]]:
        store = PostgresStore(pg_dsn)
        store.open()
        delivered: list[int] = []
        store.subscribe(lambda event, secret: delivered.append(event.data["i"]))
        try:
            store.append("acme", "message.incoming", {"i": 0})
            await store.flush()
            with psycopg.connect(pg_dsn, autocommit=True) as admin:
                killed = admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                                       "WHERE datname = current_database() AND pid <> pg_backend_pid()").fetchall()
            assert killed, "no connection of the store's to end"
            for i in range(1, 4):
                store.append("acme", "message.incoming", {"i": i})
            await asyncio.wait_for(store.flush(), 30)
            return delivered, [e.data["i"] for e in await store.events_after(0, 100)]
        finally:
            await store.close()

    delivered, stored = asyncio.run(body())
    assert delivered == stored == [0, 1, 2, 3]


def test_a_store_holds_at_most_five_connections_however_many_reads_run_at_once(pg_dsn: str):
    """Fifty reads at once: the store still holds one writing and at most four reading connections."""

    async def body() -> int:
        store = PostgresStore(pg_dsn)
        store.open()
        try:
            store.append("acme", "message.incoming", {})
            await store.flush()
            await asyncio.gather(*(store.events_after(0, 10) for _ in range(50)))
            with psycopg.connect(pg_dsn) as admin:
                row = admin.execute("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                                    "AND pid <> pg_backend_pid()").fetchone()
            assert row is not None
            return int(row[0])
        finally:
            await store.close()

    assert 2 <= asyncio.run(body()) <= 5


def test_an_upgrade_from_schema_1_knows_who_wrote_in_the_kept_journal(pg_dsn: str):
    """Migration 2 (pacing's contacts) fills them from the kept `message.incoming` events, as the
    SQLite store's backfill does: groups, own messages and other companies' chats are not contacts."""
    from whatsappd.store.postgresql import MIGRATIONS

    with psycopg.connect(pg_dsn, autocommit=True) as db:  # a database left by the first release
        db.execute("CREATE TABLE whatsappd_meta (key text PRIMARY KEY, value text NOT NULL)")
        db.execute(MIGRATIONS[0])
        db.execute("INSERT INTO whatsappd_meta VALUES ('schema_version', '1')")
        for seq, (chat, is_group, from_me) in enumerate([("a@s.whatsapp.net", False, False),
                                                         ("g@g.us", True, False),
                                                         ("me@s.whatsapp.net", False, True)], 1):
            db.execute("INSERT INTO whatsappd_events VALUES (%s, 1.0, 'acme', 'message.incoming', %s::json)",
                       (seq, f'{{"chat": "{chat}", "is_group": {str(is_group).lower()}, '
                             f'"from_me": {str(from_me).lower()}}}'))

    async def known() -> list[bool]:
        store = PostgresStore(pg_dsn)
        store.open()
        try:
            return [await store.is_known_contact(company, jid) for company, jid in (
                ("acme", "a@s.whatsapp.net"), ("acme", "g@g.us"), ("acme", "me@s.whatsapp.net"),
                ("beta", "a@s.whatsapp.net"))]
        finally:
            await store.close()

    assert asyncio.run(known()) == [True, False, False, False]
    assert schema_version(pg_dsn) == str(SCHEMA_VERSION)


def test_check_store_with_the_postgresql_backend_names_the_database_not_a_leftover_sqlite_file(tmp_path: Path):
    """`whatsappd check-store` on a PostgreSQL configuration does not check (or fail on) a
    whatsappd.sqlite left in the state directory: it says the journal is in the database."""
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    (state / "whatsappd.sqlite").write_bytes(b"SQLite format 3\x00" + b"\xff" * 4000)  # damaged leftover
    config = tmp_path / "whatsappd.toml"
    config.write_text(f'[daemon]\nstate_dir = "{state}"\n[store]\nbackend = "postgresql"\n'
                      'dsn = "postgresql://whatsappd:hunter2@127.0.0.1:9/whatsappd"\n')
    result = subprocess.run([*whatsappd_command(), "check-store", "--config", str(config)], capture_output=True,
                            text=True, timeout=60, env=clean_env(), stdin=subprocess.DEVNULL)
    # 1: the devices recorded there could not be read (nothing answers on port 9), said in one line
    assert result.returncode == 1, result.stdout + result.stderr
    assert "cannot read the recorded devices" in result.stdout
    assert "in PostgreSQL (postgresql://whatsappd:***@127.0.0.1:9/whatsappd)" in result.stdout
    assert "whatsappd.sqlite" not in result.stdout and "hunter2" not in result.stdout + result.stderr
