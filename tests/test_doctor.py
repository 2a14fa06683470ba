"""`whatsappd doctor` and `whatsappctl doctor`: each fault made for real is named with its fix.

The state-directory checks run on a directory the tests build with real files (modes, owners,
SQLite stores really damaged, a lock really held by another process, a real full tmpfs); the
live checks (company states, the clock against the server's) ask a real daemon whose simulator
companies are driven into those states. A clean installation reports nothing and exits 0.
"""

from __future__ import annotations

import os
import socket
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from whatsappd.config import load_config
from whatsappd.doctor import Finding, inspect_state_dir
from whatsappd.protocol import ServerTime, parse_worker_message
from whatsappd.testing.daemon import NOBODY, clean_env, run_ctl, wait_until, whatsappd_command
from whatsappd.testing.scenario import SimDaemon, sim_config, tree_state
from whatsappd.worker.simulator import server

JID = "5511999990001@s.whatsapp.net"


class Install:
    """A state directory and a config naming it (and a socket path beside it)."""

    def __init__(self, root: Path, companies: tuple[str, ...] = (), extra: str = "") -> None:
        self.root = root
        self.state = root / "state"
        self.sessions = self.state / "sessions"
        self.socket = root / "ctl.sock"
        self.config_path = root / "whatsappd.toml"
        lines = ["[daemon]", f'state_dir = "{self.state}"', "[control]", f'socket_path = "{self.socket}"', extra]
        for company in companies:
            lines += ["[[companies]]", f'id = "{company}"', 'engine = "simulator"']
        self.config_path.write_text("\n".join(lines) + "\n")
        self.sessions.mkdir(mode=0o700, parents=True)
        os.chmod(self.state, 0o700)
        for company in companies:
            self.paired(company)

    def paired(self, company: str) -> Path:
        directory = self.sessions / f"session-{company}"
        directory.mkdir(mode=0o700, exist_ok=True)
        server.write_store(directory, server.SimulatorDevice(jid=JID, push_name="Acme"))
        return directory

    def findings(self) -> list[Finding]:
        return inspect_state_dir(load_config(self.config_path))

    def cli(self) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*whatsappd_command(), "doctor", "--config", str(self.config_path)], env=clean_env(),
                              capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)


def named(findings: list[Finding], check: str, subject: object) -> Finding:
    """The one finding of this check about this subject (a clear failure if there is none)."""
    hits = [f for f in findings if f.check == check and f.subject == str(subject)]
    assert len(hits) == 1, f"no single {check} about {subject}: {[f.line() for f in findings]}"
    return hits[0]


@pytest.fixture
def install(tmp_path: Path) -> Install:
    return Install(tmp_path, ("acme",))


def test_a_clean_state_directory_reports_nothing_and_exits_0(install):
    """A state directory with a paired company, 0700/0600 throughout, gives no finding and exit 0."""
    assert install.findings() == []
    proc = install.cli()
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.strip() == "no problems found"


def test_loose_modes_are_named_with_the_chmod_that_fixes_them(install):
    """A 0755 session directory and a 0644 session file are each a loose_mode with its chmod."""
    directory = install.sessions / "session-acme"
    os.chmod(directory, 0o755)
    os.chmod(directory / "simulator.json", 0o644)
    found = install.findings()
    assert named(found, "loose_mode", directory).fix == f"chmod 0700 {directory}"
    assert named(found, "loose_mode", directory / "simulator.json").fix == f"chmod 0600 {directory}/simulator.json"
    proc = install.cli()
    assert proc.returncode == 1
    assert f"[loose_mode] {directory}: mode 0755" in proc.stdout and f"chmod 0700 {directory}" in proc.stdout


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root, to give a file to another user")
def test_a_file_of_another_user_is_named_with_its_chown(install):
    """A session file owned by another uid than the state directory's is a wrong_owner."""
    path = install.sessions / "session-acme" / "simulator.json"
    os.chown(path, NOBODY, NOBODY)
    finding = named(install.findings(), "wrong_owner", path)
    assert f"uid {NOBODY}" in finding.message and finding.fix.startswith("chown -R 0 ")


def _sqlite(path: Path, rows: int, blob: int) -> None:
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE whatsmeow_contacts (jid TEXT PRIMARY KEY, data BLOB)")
    db.executemany("INSERT INTO whatsmeow_contacts VALUES (?, ?)", ((f"{i}@s.whatsapp.net", os.urandom(blob))
                                                                     for i in range(rows)))
    db.commit()
    db.close()
    os.chmod(path, 0o600)


def test_a_damaged_store_is_named_with_its_integrity_check_and_fix(install):
    """A session store with overwritten pages is a store_damaged finding quoting integrity_check;
    the doctor changes no file."""
    directory = install.sessions / "session-bob"
    directory.mkdir(mode=0o700)
    store = directory / "store.db"
    _sqlite(store, 400, 200)
    with open(store, "r+b") as f:  # damage the table's pages, keep the header
        f.seek(4096 * 2)
        f.write(os.urandom(4096 * 3))
    before = tree_state(install.root)
    finding = [f for f in install.findings() if f.check == "store_damaged"]
    assert finding and finding[0].subject == str(store), finding
    assert "integrity_check" in finding[0].message and "restore" in finding[0].fix
    assert tree_state(install.root) == before  # read-only: no file created, changed or removed


def test_a_store_too_big_for_its_age_names_its_biggest_tables(install):
    """A fresh session store of 5 MiB is store_large, naming the table that makes it big."""
    directory = install.sessions / "session-acme"
    store = directory / "store.db"
    _sqlite(store, 80, 64 * 1024)
    finding = named(install.findings(), "store_large", store)
    assert "whatsmeow_contacts" in finding.message


def test_legacy_browser_profiles_and_baileys_folders_point_to_the_commands(install):
    """A Chrome profile and a Baileys folder under sessions/ point to clean-sessions / import-baileys."""
    browser = install.sessions / "session-old1"
    (browser / "Default").mkdir(parents=True, mode=0o700)
    baileys = install.sessions / "session-old2"
    baileys.mkdir(mode=0o700)
    (baileys / "creds.json").write_text("{}")
    os.chmod(baileys / "creds.json", 0o600)
    found = install.findings()
    assert "whatsappd clean-sessions" in named(found, "legacy_browser", browser).fix
    assert "whatsappd import-baileys" in named(found, "legacy_baileys", baileys).fix


def test_orphan_sessions_and_companies_without_a_session(install):
    """A session no company owns is orphan_session; a configured company without one is no_session."""
    orphan = install.paired("stray")
    (install.sessions / "session-acme" / "simulator.json").unlink()
    found = install.findings()
    assert "whatsappctl add stray" in named(found, "orphan_session", orphan).fix
    assert "whatsappctl connect acme" in named(found, "no_session", "acme").fix


def test_a_session_lock_held_by_a_foreign_process_is_named_with_its_pid(install):
    """Another process holding a session's lock (no daemon running) is a foreign_lock with its pid."""
    lock = install.sessions / "session-acme" / "whatsappd.lock"
    with subprocess.Popen(
        [sys.executable, "-c", "import sys; from pathlib import Path; from whatsappd import pidlock; "
         "pidlock.acquire(Path(sys.argv[1])); print('held', flush=True); sys.stdin.read()", str(lock)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True) as holder:
        try:
            assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
            finding = named(install.findings(), "foreign_lock", lock)
            assert f"pid {holder.pid}" in finding.message and f"pid {holder.pid}" in finding.fix
        finally:
            holder.kill()
    assert not [f for f in install.findings() if f.check == "foreign_lock"]


def test_a_full_disk_is_named_with_its_free_space(small_disk):
    """A state directory on a really full tmpfs is an error disk_space finding."""
    install = Install(small_disk.path, ("acme",))
    small_disk.fill()
    finding = named(install.findings(), "disk_space", install.state)
    assert finding.severity == "error" and finding.message.startswith("0 B free")
    assert "free space" in finding.fix


def test_a_filesystem_out_of_inodes_is_named(small_disk):
    """A state directory on a tmpfs whose inodes are all used is an error disk_inodes finding."""
    install = Install(small_disk.path, ("acme",))
    n = 0
    while True:
        try:
            (small_disk.path / f"f{n}").touch()
        except OSError:
            break
        n += 1
    finding = named(install.findings(), "disk_inodes", install.state)
    assert finding.severity == "error" and finding.message.startswith("0 free inodes")


def test_a_store_locked_by_a_writer_is_reported_busy_without_waiting(install):
    """A session store held under an exclusive lock is store_busy after the short busy timeout."""
    directory = install.sessions / "session-acme"
    store = directory / "store.db"
    _sqlite(store, 1, 16)
    writer = sqlite3.connect(store, isolation_level=None)
    writer.execute("BEGIN EXCLUSIVE")
    try:
        finding = named(install.findings(), "store_busy", store)
    finally:
        writer.execute("ROLLBACK")
        writer.close()
    assert "locked" in finding.message


def test_a_missing_state_directory_is_named(tmp_path):
    """A config whose state directory does not exist gives state_dir_missing and nothing else."""
    install = Install(tmp_path, ())
    install.sessions.rmdir()
    install.state.rmdir()
    found = install.findings()
    assert [f.check for f in found] == ["state_dir_missing"] and found[0].subject == str(install.state)


def test_the_control_socket_against_its_configured_mode_and_group(tmp_path):
    """A socket file looser than control.socket_mode, or of another group, is named with chmod/chgrp."""
    group = "daemon"
    install = Install(tmp_path, ("acme",), extra=f'socket_mode = "0660"\nsocket_group = "{group}"')
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(install.socket))
    os.chmod(install.socket, 0o666)
    try:
        found = install.findings()
    finally:
        sock.close()
    assert named(found, "socket_mode", install.socket).fix.startswith(f"chmod 0660 {install.socket}")
    assert named(found, "socket_group", install.socket).fix.startswith(f"chgrp {group} {install.socket}")


def test_server_time_messages_are_parsed_and_malformed_ones_refused():
    """A worker's server_time is read as two Unix times; a missing, boolean or infinite one is a violation."""
    parsed = parse_worker_message(ServerTime(1.5e9, 1.5e9 - 300).to_wire())
    assert parsed == ServerTime(1.5e9, 1.5e9 - 300)
    for bad in ({"server_time": 1.0}, {"server_time": True, "local_time": 1.0},
                {"server_time": float("inf"), "local_time": 1.0}, {"server_time": "now", "local_time": 1.0}):
        with pytest.raises(ValueError):
            parse_worker_message({"type": "server_time", **bad})


# ============================================================================ the running daemon


def ctl(d: SimDaemon, *args: str) -> subprocess.CompletedProcess[str]:
    return run_ctl("--socket", str(d.socket_path), *args)


def live(d: SimDaemon) -> list[Finding]:
    response = d.client.get("/v1/doctor")
    assert response.status == 200, response.body
    body: dict[str, Any] = response.json()
    assert body["clean"] is (not body["findings"])
    return [Finding.from_json(f) for f in body["findings"]]


def test_live_doctor_clean_then_clock_skew_and_company_states(daemons):
    """A running daemon with paired companies is clean (both doctors exit 0); then a skewed server
    clock, a ban, an outdated client and a crash loop are each named, with since-when and the fix."""
    d = daemons(sim_config("acme", "bob", "carol", "dave", workers={"crash_limit": 1}))
    d.start()
    for company in ("acme", "bob", "carol", "dave"):
        d.pair(company)
    assert live(d) == []
    proc = ctl(d, "doctor")
    assert proc.returncode == 0 and proc.stdout.strip() == "no problems found", proc.stdout + proc.stderr
    offline = subprocess.run([*whatsappd_command(), "doctor", "--config", str(d.config_path)], env=clean_env(),
                             capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert offline.returncode == 0, offline.stdout + offline.stderr

    assert d.simulate("acme", "clock", skew=-300).status == 200  # the server 5 minutes behind us
    finding = wait_until(lambda: [f for f in live(d) if f.check == "clock_skew"], 5)[0]
    assert finding.subject == "acme" and "300 s ahead of" in finding.message and "ntp" in finding.fix

    assert d.simulate("bob", "ban", seconds=3600).status == 200
    assert d.simulate("carol", "outdated").status == 200
    assert d.simulate("dave", "crash").status == 202
    for company, state in (("bob", "banned"), ("carol", "outdated"), ("dave", "failed")):
        d.wait_state(company, state)
    found = live(d)
    banned = named(found, "company_banned", "bob")
    assert "banned since 20" in banned.message and " until 20" in banned.message
    assert "upgrade whatsappd" in named(found, "company_outdated", "carol").fix
    assert "whatsappctl restart dave" in named(found, "company_failed", "dave").fix
    proc = ctl(d, "doctor")
    assert proc.returncode == 1
    assert "[company_banned] bob: banned since" in proc.stdout and "[clock_skew] acme" in proc.stdout


def test_ctl_add_simulate_remove_and_clear_errors(daemons):
    """add, simulate and remove do what the curl calls did; refusals show the daemon's code."""
    d = daemons(sim_config("acme"))
    d.start()
    hostile = ctl(d, "add", "new1", "--name", "New \x1b[31mOne", "--engine", "simulator")
    assert hostile.returncode == 1 and "[bad_request]" in hostile.stderr
    assert "\x1b" not in hostile.stderr and "\\x1b" in hostile.stderr  # the daemon's echo, escaped
    assert "new1" not in d.companies()
    added = ctl(d, "add", "new1", "--name", "New One", "--engine", "simulator")
    assert added.returncode == 0, added.stderr
    assert "new1: added (engine simulator); now stopped. Pair it: whatsappctl connect new1" in added.stdout
    assert d.snapshot("new1")["name"] == "New One"
    again = ctl(d, "add", "new1", "--name", "Renamed")
    assert again.returncode == 1 and "already exists; --replace" in again.stderr
    assert d.snapshot("new1")["engine"] == "simulator"
    replaced = ctl(d, "add", "new1", "--replace", "--name", "Renamed", "--engine", "simulator")
    assert replaced.stdout.startswith("new1: updated"), replaced.stderr
    refused = ctl(d, "add", "acme", "--replace", "--name", "X", "--engine", "simulator")
    assert refused.returncode == 1 and "[defined_in_config]" in refused.stderr

    assert ctl(d, "connect", "new1", "--no-wait").returncode == 0
    d.wait_state("new1", "pairing")
    scanned = ctl(d, "simulate", "new1", "scan", "push_name=Acme Corp", "connect=true")
    assert scanned.returncode == 0, scanned.stderr
    d.wait_state("new1", "connected")
    bad = ctl(d, "simulate", "new1", "clock", "skew=many")
    assert bad.returncode == 1 and "[invalid_argument]" in bad.stderr
    assert ctl(d, "simulate", "new1", "nonsense").returncode == 2  # argparse: not an action
    assert ctl(d, "simulate", "nobody", "scan").returncode == 1

    removed = ctl(d, "remove", "new1", "--wipe")
    assert removed.returncode == 0 and "new1: removed and its session wiped" in removed.stdout, removed.stderr
    assert "new1" not in d.companies()
    gone = ctl(d, "remove", "new1")
    assert gone.returncode == 1 and "[company_not_found]" in gone.stderr


def test_a_postgresql_store_is_checked_in_the_database_not_as_a_missing_sqlite_file(tmp_path, pg_dsn):
    """With backend postgresql: a migrated database and no whatsappd.sqlite is clean (exit 0); an
    unmigrated one is store_schema; an unreachable one is store_unreachable, its password hidden."""
    from whatsappd.store.postgresql import migrate, redact

    def install(name: str, dsn: str) -> Install:
        (tmp_path / name).mkdir()
        return Install(tmp_path / name, ("acme",), extra=f'[store]\nbackend = "postgresql"\ndsn = "{dsn}"')

    fresh = install("fresh", pg_dsn)
    schema = named(fresh.findings(), "store_schema", redact(pg_dsn))
    assert schema.severity == "warning" and "whatsappd migrate" in schema.fix
    migrate(pg_dsn)
    assert fresh.findings() == []
    proc = fresh.cli()
    assert proc.returncode == 0 and proc.stdout.strip() == "no problems found", proc.stdout + proc.stderr

    dsn = f"postgresql://whatsappd:hunter2@/whatsappd?host={tmp_path / 'no-server'}"
    gone = install("gone", dsn)
    unreachable = named(gone.findings(), "store_unreachable", redact(dsn))
    assert unreachable.severity == "error" and "hunter2" not in unreachable.line()
    assert "store.dsn" in unreachable.fix
