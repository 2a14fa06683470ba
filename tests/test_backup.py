"""Online backup and restore: `whatsappd backup`/`restore`, POST /v1/backup, `whatsappctl backup`.

Real daemons with real simulator workers; the archives are real files, read back with tarfile
and sqlite3. A simulator company is "paired" when its session directory holds `simulator.json`
with a device (whatsappd/sessionstore.py): without that file a company has no session and can
only start by pairing (a QR code), so a restored company that connects proves the restore
brought its credentials back.
"""

from __future__ import annotations

import asyncio
import gzip
import io
import json
import os
import pty
import sqlite3
import stat
import subprocess
import tarfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from whatsappd.backup.archive import verify
from whatsappd.sessionstore import SimulatorDevice, simulator_store_bytes
from whatsappd.testing.daemon import clean_env, ctl_command, run_ctl, wait_until, whatsappd_command
from whatsappd.testing.events import ApiSession, EventReader
from whatsappd.testing.scenario import SimDaemon, sim_config, tree_state
from whatsappd.worker.simulator.server import read_send_log

COMPANIES = [f"c{n:02d}" for n in range(50)]
MESSAGES = 1000
GAP = 1_000_000
#: 50 workers booting on a loaded 2-core machine: patience for their first message.
SLOW_BOOT = {"heartbeat_timeout": "20s"}


def jid_of(company: str) -> str:
    return f"55119{sum(map(ord, company)):08d}:{len(company) + 10}@s.whatsapp.net"


def seed_paired(state_dir: Path, *companies: str) -> None:
    """Give each company a paired simulator session on disk, as a QR scan would have left it."""
    for company in companies:
        directory = state_dir / "sessions" / f"session-{company}"
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        store = directory / "simulator.json"
        store.write_bytes(simulator_store_bytes(SimulatorDevice(jid_of(company), company), "2026-01-01T00:00:00.000Z"))
        store.chmod(0o600)


def whatsappd(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*whatsappd_command(), *args], env=clean_env(), capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)


def journal_rows(database: Path) -> dict[int, tuple[Any, ...]]:
    """seq -> (at, company, type, data) of every event in a journal file (no daemon has it open)."""
    with sqlite3.connect(f"{database.as_uri()}?mode=ro", uri=True) as db:
        return {row[0]: tuple(row[1:]) for row in db.execute("SELECT seq, at, company, type, data FROM events")}


def members(archive: Path) -> dict[str, bytes]:
    with tarfile.open(archive, "r:gz") as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers()}  # type: ignore[union-attr]


def rewrite(archive: Path, target: Path, change: Callable[[str, bytes], bytes]) -> None:
    """A copy of archive with each member's bytes passed through change(name, data)."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in members(archive).items():
            data = change(name, data)
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), 0o600
            tar.addfile(info, io.BytesIO(data))
    target.write_bytes(gzip.compress(out.getvalue()))


@pytest.mark.slow
def test_backup_during_a_send_flood_and_50_connects_restores_all_connected_without_qr_and_the_journal_continues(
        daemons: Callable[..., SimDaemon], tmp_path: Path) -> None:
    """A backup taken mid-flood while 50 companies connect is sound; restored, all connect with no QR, seqs never repeat."""
    config = sim_config("flood", *COMPANIES, workers=SLOW_BOOT, reconnect={"connect_rate": 10})
    d1 = daemons(config)
    seed_paired(d1.state_dir, "flood", *COMPANIES)
    d1.start(timeout=30)
    d1.wait_state("flood", "connected", timeout=30)

    sent: list[str] = []
    lock = threading.Lock()

    def flood(part: int) -> None:
        with ApiSession(str(d1.socket_path)) as api:
            for n in range(part, MESSAGES, 4):
                response = api.post("/v1/companies/flood/messages", {"to": "+55 11 99999-0001", "text": f"m{n}"})
                assert response.status == 202, response.body
                with lock:
                    sent.append(response.json()["id"])

    senders = [threading.Thread(target=flood, args=(part,)) for part in range(4)]
    for thread in senders:
        thread.start()
    wait_until(lambda: len(sent) >= MESSAGES // 5, timeout=30, what="the flood to be under way")
    archive = tmp_path / "backups" / "state.tar.gz"
    archive.parent.mkdir()
    result = whatsappd("backup", "--config", str(d1.config_path), "--to", str(archive))
    assert result.returncode == 0, result.stderr
    queued_at_backup = len(sent)
    for thread in senders:
        thread.join(60)
    assert len(sent) == MESSAGES
    assert queued_at_backup < MESSAGES, "the backup did not land during the flood"
    for company in COMPANIES:
        d1.wait_state(company, "connected", timeout=60)
    assert d1.stop() == 0
    old = journal_rows(d1.state_dir / "whatsappd.sqlite")

    # The archive: 0600, verified, every SQLite store in it sound; the manifest says who is who.
    assert stat.S_IMODE(archive.stat().st_mode) == 0o600
    assert [p.name for p in archive.parent.iterdir()] == [archive.name]  # no temporary file left
    manifest = verify(archive)
    files = members(archive)
    check = tmp_path / "check"
    check.mkdir()
    for name, data in files.items():
        if data.startswith(b"SQLite format 3\x00"):
            path = check / name.replace("/", "_")
            path.write_bytes(data)
            with sqlite3.connect(path) as db:
                assert db.execute("PRAGMA integrity_check").fetchall() == [("ok",)], name
    assert "whatsappd.sqlite" in files
    states = {c["id"]: c["state"] for c in manifest.data["companies"]}
    assert set(states) == {"flood", *COMPANIES}
    assert any(state != "connected" for state in states.values()), "the backup did not land while companies connected"
    assert all(manifest.companies[c]["jid"] == jid_of(c) for c in COMPANIES)
    backup_seq = manifest.journal_last_seq
    assert backup_seq is not None and 0 < backup_seq < max(old), "the old daemon went on journaling after the backup"

    # Restored into a fresh state directory: all 50 connect, none ever pairs.
    d2 = daemons(config)
    result = whatsappd("restore", str(archive), "--config", str(d2.config_path))
    assert result.returncode == 0, result.stderr
    d2.start(timeout=30)
    cursor = max(old)  # a reader that read everything the old daemon wrote, after the backup too
    with EventReader(str(d2.socket_path), f"since={cursor}") as reader:
        for company in COMPANIES:
            d2.wait_state(company, "connected", timeout=60)
        new = reader.events()
    wait_until(lambda: not unsettled(d2.state_dir / "whatsappd.sqlite"), timeout=60,
               what="the restored outbox to be sent")
    assert d2.stop() == 0
    restored = journal_rows(d2.state_dir / "whatsappd.sqlite")
    assert {seq: row for seq, row in restored.items() if seq <= backup_seq} == \
        {seq: row for seq, row in old.items() if seq <= backup_seq}
    after = sorted(seq for seq in restored if seq > backup_seq)
    assert after and after[0] == backup_seq + GAP + 1
    assert not set(after) & set(old), "a seq the old daemon handed out was handed out again"
    assert [e["seq"] for e in new] == [seq for seq in after if seq <= new[-1]["seq"]]
    types = [json.loads(restored[seq][3]) for seq in after if restored[seq][2] == "company.state"]
    assert {t["new"] for t in types} >= {"connecting", "connected"}
    assert "pairing" not in {t["new"] for t in types}
    assert not [seq for seq in after if restored[seq][2] in ("company.pairing", "company.paired")]
    # Every message the backup held went out exactly once: the send log is the "server".
    logged = [r["outbox_id"] for r in read_send_log(d2.session_dir("flood"))]
    assert len(logged) == len(set(logged))
    with sqlite3.connect(f"{(d2.state_dir / 'whatsappd.sqlite').as_uri()}?mode=ro", uri=True) as db:
        statuses = dict(db.execute("SELECT id, status FROM messages").fetchall())
    assert 0 < len(statuses) <= queued_at_backup + 4  # the four senders' requests in flight at the backup
    assert set(statuses.values()) <= {"sent", "delivered", "read"}, set(statuses.values())
    assert set(statuses) <= set(logged)


def unsettled(database: Path) -> int:
    """Messages still queued or sending in a live daemon's store (read-only, beside its writer)."""
    with sqlite3.connect(f"{database.as_uri()}?mode=ro", uri=True) as db:
        return int(db.execute("SELECT count(*) FROM messages WHERE status IN ('queued', 'sending')").fetchone()[0])


def test_the_journal_prunes_by_count_across_the_seq_gap_a_restore_leaves(tmp_path):
    """After a restore moved the next seq forward, prune(max_events) still keeps the newest max_events events."""
    from whatsappd.backup.restore import _set_next_seq
    from whatsappd.store import Store

    async def fill(path: Path, first: int, count: int) -> None:
        store = Store(path)
        store.open()
        for i in range(count):
            store.append("acme", "message.incoming", {"i": first + i})
        await store.flush()
        await store.close()

    async def prune(path: Path) -> tuple[int, list[int]]:
        store = Store(path)
        store.open()
        pruned = await store.prune(max_age=86400, max_events=20)
        seqs = [e.seq for e in await store.events_after(0, 1000)]
        await store.close()
        return pruned, seqs

    path = tmp_path / "whatsappd.sqlite"
    asyncio.run(fill(path, 0, 15))
    _set_next_seq(path, 15 + GAP)  # what `whatsappd restore` does to the journal it restores
    asyncio.run(fill(path, 15, 10))
    pruned, seqs = asyncio.run(prune(path))
    assert pruned == 5
    assert seqs == [*range(6, 16), *range(GAP + 16, GAP + 26)]


def test_a_snapshot_of_a_store_being_written_is_one_commit_of_it(tmp_path):
    """snapshot_sqlite of a WAL store under a busy writer gives sound copies, each as of one commit."""
    from whatsappd.backup.snapshot import snapshot_sqlite

    store = tmp_path / "store.db"
    with sqlite3.connect(store) as db:
        db.execute("PRAGMA journal_mode = WAL")
        db.execute("CREATE TABLE pairs (n INTEGER, half INTEGER)")
    stop = threading.Event()

    def write() -> None:  # like a worker's library: every transaction inserts two rows
        db = sqlite3.connect(store, isolation_level=None, timeout=30)
        n = 0
        while not stop.is_set():
            db.execute("BEGIN IMMEDIATE")
            db.execute("INSERT INTO pairs VALUES (?, 0)", (n,))
            db.execute("INSERT INTO pairs VALUES (?, 1)", (n,))
            db.execute("COMMIT")
            n += 1
        db.close()

    writer = threading.Thread(target=write)
    writer.start()
    try:
        counts = []
        for i in range(20):
            copy = tmp_path / f"copy{i}.db"
            snapshot_sqlite(store, copy)
            assert stat.S_IMODE(copy.stat().st_mode) == 0o600
            assert not Path(f"{copy}-wal").exists()
            with sqlite3.connect(copy) as db:
                assert db.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
                (count,), = db.execute("SELECT count(*) FROM pairs").fetchall()
            assert count % 2 == 0, "a snapshot caught half a transaction"
            counts.append(count)
    finally:
        stop.set()
        writer.join()
    assert counts == sorted(counts) and counts[-1] > counts[0], "the writer did not run during the snapshots"


@pytest.fixture(scope="module")
def stopped_state(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A config and a stopped state directory with two paired simulator companies and a journal."""
    tmp_path = tmp_path_factory.mktemp("stopped")
    d = SimDaemon(tmp_path / "src", sim_config("acme", "beta"))
    seed_paired(d.state_dir, "acme", "beta")
    try:
        d.start(timeout=30)
        d.wait_state("acme", "connected", timeout=30)
        d.wait_state("beta", "connected", timeout=30)
        assert d.stop() == 0
    finally:
        d.kill()
    archive = tmp_path / "backup.tar.gz"
    result = whatsappd("backup", "--config", str(d.config_path), "--to", str(archive))
    assert result.returncode == 0, result.stderr
    assert "not running" in result.stderr  # taken from the stopped state directory
    assert d.config_path is not None
    return d.config_path, archive


def restore_refused(config: Path, archive: Path, state_dir: Path, *extra: str, live: bool = False) -> str:
    """Run a restore that must be refused: its one sentence; the state directory unchanged (live:
    but for the files a running daemon writes itself)."""
    daemons_own = [state_dir / f"whatsappd.sqlite{suffix}" for suffix in ("", "-wal", "-shm")] if live else []
    before = tree_state(state_dir, daemons_own) if state_dir.exists() else None
    result = whatsappd("restore", str(archive), "--config", str(config), *extra)
    assert result.returncode == 1, result.stdout + result.stderr
    assert (tree_state(state_dir, daemons_own) if state_dir.exists() else None) == before
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("whatsappd: restore refused: "), result.stderr
    assert "nothing was changed" in lines[0]
    return lines[0]


def target(tmp_path: Path, name: str) -> tuple[Path, Path]:
    """A config for a fresh state directory under tmp_path/name, and that directory."""
    root = tmp_path / name
    root.mkdir()
    config = root / "whatsappd.toml"
    config.write_text(f'[daemon]\nstate_dir = "{root / "state"}"\n[control]\nsocket_path = "{root / "ctl.sock"}"\n')
    return config, root / "state"


def test_restore_refuses_an_archive_with_a_flipped_byte_in_a_member(stopped_state, tmp_path):
    """A member whose bytes changed after the backup fails its manifest checksum: refused, nothing written."""
    _, archive = stopped_state
    tampered = tmp_path / "tampered.tar.gz"

    def flip(name: str, data: bytes) -> bytes:
        if name != "sessions/session-acme/simulator.json":
            return data
        return data[:40] + bytes([data[40] ^ 0x01]) + data[41:]

    rewrite(archive, tampered, flip)
    config, state = target(tmp_path, "t")
    message = restore_refused(config, tampered, state)
    assert "simulator.json does not match its checksum" in message
    assert not state.exists()


def test_restore_refuses_an_archive_whose_manifest_was_edited(stopped_state, tmp_path):
    """An edited manifest (a JID changed by hand) no longer matches its own checksum: refused."""
    _, archive = stopped_state
    tampered = tmp_path / "edited.tar.gz"
    rewrite(archive, tampered, lambda name, data: data.replace(jid_of("acme").encode(), b"5511900000000:1@s.whatsapp.net")
            if name == "manifest.json" else data)
    config, state = target(tmp_path, "t")
    message = restore_refused(config, tampered, state)
    assert "manifest does not match its checksum" in message


def test_restore_refuses_a_damaged_archive_file(stopped_state, tmp_path):
    """A byte flipped in the compressed file itself (not a valid gzip any more): refused, nothing written."""
    _, archive = stopped_state
    data = bytearray(archive.read_bytes())
    data[len(data) // 2] ^= 0xFF
    damaged = tmp_path / "damaged.tar.gz"
    damaged.write_bytes(bytes(data))
    config, state = target(tmp_path, "t")
    message = restore_refused(config, damaged, state)
    assert "damaged" in message or "checksum" in message


def test_restore_refuses_a_paired_session_without_overwrite_and_keeps_the_old_one_with_it(stopped_state, tmp_path):
    """A paired session at the target is replaced only with --overwrite, which moves it to replaced/."""
    _, archive = stopped_state
    config, state = target(tmp_path, "t")
    other = SimulatorDevice("5511988887777:5@s.whatsapp.net", "other")
    directory = state / "sessions" / "session-acme"
    directory.mkdir(mode=0o700, parents=True)
    (directory / "simulator.json").write_bytes(simulator_store_bytes(other, "2026-01-01T00:00:00.000Z"))
    message = restore_refused(config, archive, state, "--company", "acme")
    assert "company acme already has a paired session" in message and "--overwrite" in message
    restore_refused(config, archive, state)  # whole: the same session is in the way

    result = whatsappd("restore", str(archive), "--config", str(config), "--company", "acme", "--overwrite")
    assert result.returncode == 0, result.stderr
    assert jid_of("acme") in (directory / "simulator.json").read_text()
    kept = list((state / "replaced").glob("*/sessions/session-acme/simulator.json"))
    assert len(kept) == 1 and other.jid in kept[0].read_text()
    assert not (state / "sessions" / "session-beta").exists()  # only the company asked for
    assert not (state / "whatsappd.sqlite").exists()


def test_restore_refuses_a_running_daemon_and_a_running_company_but_restores_a_stopped_one(
        stopped_state, daemons, tmp_path):
    """While the daemon runs, a whole restore and a running company are refused; a stopped one is restored, no QR."""
    _, archive = stopped_state
    d = daemons(sim_config("acme", "beta"))
    seed_paired(d.state_dir, "acme")
    d.start(timeout=30)
    d.wait_state("acme", "connected", timeout=30)
    assert d.config_path is not None
    message = restore_refused(d.config_path, archive, d.state_dir, live=True)
    assert f"whatsappd (pid {d.pid}) is running on {d.state_dir}" in message
    message = restore_refused(d.config_path, archive, d.state_dir, "--company", "acme", "--overwrite", live=True)
    assert "company acme is running" in message

    # beta is stopped (it has no session): restored alone, it connects without pairing.
    with EventReader(str(d.socket_path), "company=beta") as reader:
        result = whatsappd("restore", str(archive), "--config", str(d.config_path), "--company", "beta")
        assert result.returncode == 0, result.stderr
        assert d.post("beta", "connect").status == 202
        d.wait_state("beta", "connected", timeout=30, check=lambda s: s["jid"] == jid_of("beta"))
        reader.wait_for(lambda e: e.get("type") == "company.state" and e.get("new") == "connected", timeout=10,
                        what="beta's connected event")
        states = [e["new"] for e in reader.of_type("company.state")]
    assert "pairing" not in states and states[-1] == "connected"
    assert d.stop() == 0


def test_post_backup_streams_the_archive_and_whatsappctl_backup_saves_it_0600(daemons, tmp_path):
    """POST /v1/backup?company= holds only those sessions; unknown companies get 404; whatsappctl saves a verified 0600 file."""
    d = daemons(sim_config("acme", "beta"))
    seed_paired(d.state_dir, "acme", "beta")
    d.start(timeout=30)
    d.wait_state("acme", "connected", timeout=30)
    response = d.client.post("/v1/backup?company=acme")
    assert response.status == 200 and response.headers["content-type"] == "application/gzip"
    (tmp_path / "one.tar.gz").write_bytes(response.body)
    manifest = verify(tmp_path / "one.tar.gz")
    assert list(manifest.companies) == ["acme"] and manifest.journal_last_seq is None
    assert manifest.companies["acme"] == {"id": "acme", "engine": "simulator", "state": "connected",
                                          "jid": jid_of("acme"), "source": "config", "session": "paired"}
    assert not [name for name in manifest.files if "beta" in name or name == "whatsappd.sqlite"]
    refused = d.client.post("/v1/backup?company=nobody")
    assert refused.status == 404 and refused.json()["error"]["code"] == "company_not_found"

    out = tmp_path / "ctl"
    out.mkdir()
    result = run_ctl("--socket", str(d.socket_path), "backup", "--to", str(out), timeout=60)
    assert result.returncode == 0, result.stderr
    [saved] = list(out.iterdir())
    assert saved.name.startswith("whatsappd-backup-") and saved.name.endswith(".tar.gz")
    assert stat.S_IMODE(saved.stat().st_mode) == 0o600
    full = verify(saved)
    assert set(full.companies) == {"acme", "beta"} and full.journal_last_seq is not None
    assert "backup written to" in result.stdout
    assert d.stop() == 0
    assert not list((d.state_dir / "tmp").iterdir()), "the daemon left a temporary file behind"
    assert os.listdir(out) == [saved.name]


# ------------------------------------------------------------------------- a PostgreSQL store

#: A PostgreSQL store's DSN: an offline backup and a restore never connect to it, they only name it.
PG_DSN = "postgresql://whatsappd:hunter2@127.0.0.1:9/whatsappd"
PG_NAMED = "postgresql://whatsappd:***@127.0.0.1:9/whatsappd"


def pg_target(tmp_path: Path, name: str) -> tuple[Path, Path]:
    """target() with `[store] backend = "postgresql"`."""
    config, state = target(tmp_path, name)
    config.write_text(config.read_text() + f'[store]\nbackend = "postgresql"\ndsn = "{PG_DSN}"\n')
    return config, state


def test_a_postgresql_backup_leaves_the_journal_out_and_says_so_and_its_restore_invents_none(tmp_path):
    """With the PostgreSQL store, backup archives sessions, companies.json and config, records in the
    manifest (and prints) that the journal and outbox are in PostgreSQL, not archived, even with a
    stale whatsappd.sqlite in the state directory; restore writes no journal and says to use the dump."""
    from whatsappd.config import build_config
    from whatsappd.store import Store
    from whatsappd.supervisor.registry import RuntimeRegistry

    config, state = pg_target(tmp_path, "src")
    seed_paired(state, "acme", "beta")
    beta = build_config({"companies": [{"id": "beta", "engine": "simulator"}]}, "test").company("beta")
    assert beta is not None
    RuntimeRegistry(state / "companies.json").put(beta)

    async def stale() -> None:  # left by the daemon before it was switched to PostgreSQL
        store = Store(state / "whatsappd.sqlite")
        store.open()
        store.append("acme", "message.incoming", {"text": "old"})
        await store.close()

    asyncio.run(stale())
    archive = tmp_path / "pg.tar.gz"
    result = whatsappd("backup", "--config", str(config), "--to", str(archive))
    assert result.returncode == 0, result.stderr
    assert "NOT in this archive" in result.stdout and "pg_dump" in result.stdout and PG_NAMED in result.stdout
    assert "journal up to seq" not in result.stdout and "hunter2" not in result.stdout + result.stderr
    manifest = verify(archive)
    assert manifest.data["store"] == {"backend": "postgresql", "database": PG_NAMED, "in_archive": False}
    assert manifest.journal_last_seq is None and manifest.external_journal == PG_NAMED
    assert set(manifest.files) == {"companies.json", "config.toml", "sessions/session-acme/simulator.json",
                                   "sessions/session-beta/simulator.json"}

    config2, state2 = pg_target(tmp_path, "dst")
    restored = whatsappd("restore", str(archive), "--config", str(config2))
    assert restored.returncode == 0, restored.stderr
    assert "restored acme" in restored.stdout and "restored beta" in restored.stdout
    assert "restored the journal" not in restored.stdout
    assert "are not in this archive: restore them from your pg_dump" in restored.stdout
    assert not list(state2.glob("whatsappd.sqlite*"))
    assert (state2 / "companies.json").read_bytes() == (state / "companies.json").read_bytes()
    assert jid_of("beta") in (state2 / "sessions" / "session-beta" / "simulator.json").read_text()


def test_a_sqlite_backup_restored_for_a_postgresql_store_writes_no_journal(stopped_state, tmp_path):
    """A SQLite backup (with its journal) restored where the config names PostgreSQL: the sessions
    come back, no whatsappd.sqlite is written, and the output says the archive's journal was left out."""
    _, archive = stopped_state
    config, state = pg_target(tmp_path, "t")
    result = whatsappd("restore", str(archive), "--config", str(config))
    assert result.returncode == 0, result.stderr
    assert "restored acme" in result.stdout and "restored the journal" not in result.stdout
    assert "no whatsappd.sqlite was written; the archive's SQLite journal (up to seq" in result.stdout
    assert not list(state.glob("whatsappd.sqlite*"))
    assert jid_of("acme") in (state / "sessions" / "session-acme" / "simulator.json").read_text()


def test_backup_to_stdout_pipes_a_verified_archive_and_refuses_a_terminal(daemons, tmp_path):
    """`whatsappctl backup --to -` and `whatsappd backup --to -` (daemon up, then stopped) write the archive into
    a pipe (words on stderr, nothing on disk beside it); into a terminal both refuse in one sentence."""
    d = daemons(sim_config("acme"))
    seed_paired(d.state_dir, "acme")
    d.start(timeout=30)
    d.wait_state("acme", "connected", timeout=30)
    assert d.config_path is not None
    ctl = ["--socket", str(d.socket_path), "backup", "--to", "-"]
    tool = ["backup", "--config", str(d.config_path), "--to", "-"]

    def piped(command: list[str], name: str) -> tuple[Path, str]:
        """Run command with its stdout piped into a separate `cat` process writing tmp_path/name."""
        out = tmp_path / name
        with open(out, "wb") as sink:
            consumer = subprocess.Popen(["cat"], stdin=subprocess.PIPE, stdout=sink)
            assert consumer.stdin is not None
            producer = subprocess.run(command, env=clean_env(), stdout=consumer.stdin, stderr=subprocess.PIPE,
                                      stdin=subprocess.DEVNULL, timeout=60, text=True)
            consumer.stdin.close()
            assert consumer.wait(timeout=30) == 0
        assert producer.returncode == 0, producer.stderr
        assert f"backup written to stdout ({out.stat().st_size} bytes)" in producer.stderr, producer.stderr
        return out, producer.stderr

    live, _ = piped([*ctl_command(), *ctl], "ctl.tar.gz")
    assert set(verify(live).companies) == {"acme"} and verify(live).journal_last_seq is not None
    tool_live, _ = piped([*whatsappd_command(), *tool], "tool.tar.gz")
    assert set(verify(tool_live).companies) == {"acme"}
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.endswith(".tar.gz")) == ["ctl.tar.gz", "tool.tar.gz"]

    leader, follower = pty.openpty()
    try:
        for command in ([*ctl_command(), *ctl], [*whatsappd_command(), *tool]):
            refused = subprocess.run(command, env=clean_env(), stdout=follower, stderr=subprocess.PIPE,
                                     stdin=subprocess.DEVNULL, timeout=60, text=True)
            assert refused.returncode == 1 and refused.stderr.count("\n") == 1, refused.stderr
            assert "refusing to write the backup archive to a terminal" in refused.stderr
    finally:
        os.close(leader)
        os.close(follower)
    assert d.stop() == 0
    stopped, words = piped([*whatsappd_command(), *tool], "stopped.tar.gz")
    assert "not running" in words and set(verify(stopped).companies) == {"acme"}
