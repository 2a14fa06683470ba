"""Sessions on disk: privacy, restore, corruption, legacy clean-up.

Real daemons and simulator workers write real session directories under tmp_path; the tests
read modes, files and the daemon's log back from disk.
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import stat
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from whatsappd.testing.daemon import clean_env, whatsappd_command
from whatsappd.testing.scenario import SimDaemon, daemon_pool, parse_iso, process_gone, sim_config, tree_state

#: Quarantine and restore, the supervision flows here that cross a daemon restart, also run on
#: the PostgreSQL store (sessions stay files either way; the journal and outbox move).
BOTH_STORES = pytest.mark.parametrize("store_table", ["sqlite", "postgresql"], indirect=True)


@pytest.fixture
def daemons(tmp_path: Path, store_table: dict[str, str]) -> Iterator[Callable[..., SimDaemon]]:
    """Make SimDaemons under tmp_path, on the store of `store_table` (SQLite unless the test is
    parametrized with BOTH_STORES); any still running at teardown is killed."""
    with daemon_pool(tmp_path) as make:
        yield functools.partial(make, store=store_table)


def modes(root: Path) -> dict[str, int]:
    """Permission bits of root and of everything under it, by relative path."""
    out = {".": stat.S_IMODE(root.lstat().st_mode)}
    for path in root.rglob("*"):
        out[str(path.relative_to(root))] = stat.S_IMODE(path.lstat().st_mode)
    return out


# ------------------------------------------------------------------------------ privacy


def test_every_session_directory_is_0700_and_every_file_0600(daemons):
    """After pairing and a restart, the sessions tree is 0700 dirs and 0600 files."""
    d = daemons(sim_config("acme", "bob"))
    d.start()
    d.pair("acme")
    d.pair("bob")
    d.stop()
    d.start()
    d.wait_state("acme", "connected")
    d.wait_state("bob", "connected")
    sessions = d.state_dir / "sessions"
    found = modes(sessions)
    assert {"session-acme/simulator.json", "session-bob/whatsappd.lock"} <= set(found)
    for rel, mode in found.items():
        want = 0o700 if (sessions / rel).is_dir() else 0o600
        assert mode == want, f"{rel}: {mode:04o}, want {want:04o}"
    assert stat.S_IMODE(d.state_dir.stat().st_mode) == 0o700


def test_loose_permissions_are_tightened_at_the_next_start_with_a_log_line(daemons):
    """Modes loosened while stopped are set back to 0700/0600 at start, each change logged."""
    d = daemons(sim_config("acme"))
    d.start()
    d.pair("acme")
    d.stop()
    sessions = d.state_dir / "sessions"
    session = d.session_dir("acme")
    sessions.chmod(0o755)
    session.chmod(0o755)
    (session / "simulator.json").chmod(0o644)
    (session / "whatsappd.lock").chmod(0o666)
    mark = d.log_mark()
    d.start()
    d.wait_state("acme", "connected")
    assert set(modes(sessions).values()) <= {0o700, 0o600}
    assert modes(session) == {".": 0o700, "simulator.json": 0o600, "whatsappd.lock": 0o600}
    changes = [e["change"] for e in d.log_lines("fixed session file permissions", mark)]
    assert f"{sessions}: 0755 -> 0700" in changes
    assert f"{session}: 0755 -> 0700" in changes
    assert f"{session / 'simulator.json'}: 0644 -> 0600" in changes
    assert f"{session / 'whatsappd.lock'}: 0666 -> 0600" in changes


def test_a_symlink_in_a_session_fails_that_company_only(daemons, tmp_path):
    """A symlink in a session fails that company (reason names it); the others restore."""
    d = daemons(sim_config("acme", "bob"))
    d.start()
    d.pair("acme")
    d.pair("bob")
    d.stop()
    target = tmp_path / "elsewhere.txt"
    target.write_text("not a session file\n")
    target.chmod(0o644)
    link = d.session_dir("acme") / "extra.db"
    link.symlink_to(target)
    d.start()
    snap = d.wait_state("acme", "failed")
    assert snap["last_error"]["code"] == "session_permissions"
    assert str(link) in snap["last_error"]["message"] and "symbolic link" in snap["last_error"]["message"]
    assert snap["worker"]["pid"] is None
    assert d.wait_state("bob", "connected")["worker"]["pid"]
    assert stat.S_IMODE(target.stat().st_mode) == 0o644 and target.read_text() == "not a session file\n"
    assert not d.log_lines("worker started", company="acme", mode="restore")[1:]  # never ran again


# ------------------------------------------------------------------------------ corruption


@BOTH_STORES
def test_a_corrupt_store_is_quarantined_and_the_company_failed(daemons):
    """An unparsable store is moved to sessions/quarantine/ and the company is `failed`."""
    d = daemons(sim_config("acme", "bob"))
    d.start()
    d.pair("acme")
    d.pair("bob")
    d.stop()
    store = d.session_dir("acme") / "simulator.json"
    store.write_text('{"format": "whatsappd-simulator", "device": {"jid": ')  # truncated
    d.start()
    d.wait_state("bob", "connected")
    snap = d.wait_state("acme", "failed")  # tried at start: a corrupt store still counts as a session
    assert snap["last_error"]["code"] == "store_unusable"
    quarantine = d.state_dir / "sessions" / "quarantine"
    assert stat.S_IMODE(quarantine.stat().st_mode) == 0o700
    moved = list(quarantine.iterdir())
    assert len(moved) == 1 and re.fullmatch(r"session-acme-\d{8}T\d{6}Z", moved[0].name), moved
    assert str(moved[0]) in snap["last_error"]["message"]
    assert (moved[0] / "simulator.json").read_text().endswith('"jid": ')
    assert not d.session_dir("acme").exists()
    assert d.snapshot("bob")["state"] == "connected"
    d.connect_pairing("acme")


def test_a_session_corrupted_while_the_daemon_was_down_is_reported_at_start(daemons):
    """A store corrupted while the daemon was down is reported `failed` at the next start."""
    d = daemons(sim_config("acme"))
    d.start()
    d.pair("acme")
    d.stop()
    (d.session_dir("acme") / "simulator.json").write_text("{")
    d.start()
    snap = d.wait_state("acme", "failed", timeout=3)
    assert snap["last_error"]["code"] == "store_unusable"


# ------------------------------------------------------------------------------ restore


@pytest.mark.parametrize("what", ["directory", "credentials"])
def test_a_session_deleted_while_connected_logs_out_with_session_deleted_and_leaves_nothing(daemons, what):
    """rm -rf of a connected company's session (or of its credentials file): worker ended, `logged_out`
    with reason session_deleted, and no half session is re-created."""
    d = daemons(sim_config("acme", "bob"))
    d.start()
    pid = d.pair("acme")["worker"]["pid"]
    bob = d.pair("bob")["worker"]["pid"]
    mark = d.log_mark()
    if what == "directory":
        shutil.rmtree(d.session_dir("acme"))
    else:
        (d.session_dir("acme") / "simulator.json").unlink()
    snap = d.wait_state("acme", "logged_out", timeout=10)
    assert snap["reason"] == "session_deleted" and snap["last_error"]["code"] == "session_deleted", snap
    assert snap["has_session"] is False and snap["jid"] is None and snap["worker"]["pid"] is None
    assert process_gone(pid)
    assert d.log_lines("worker exited", mark, company="acme", exit_code=18)
    time.sleep(1.5)  # nothing comes back: no restart, no store file written anew
    assert d.snapshot("acme")["state"] == "logged_out"
    assert not d.session_dir("acme").exists()
    assert d.snapshot("bob")["state"] == "connected" and d.worker_pid("bob") == bob
    d.connect_pairing("acme")  # connect starts a fresh pairing


@BOTH_STORES
def test_a_paired_company_comes_back_connected_without_a_qr_after_a_restart(daemons):
    """A paired company reconnects after a daemon restart, same JID, never a QR."""
    d = daemons(sim_config("acme"))
    d.start()
    jid = d.pair("acme", push_name="Acme")["jid"]
    assert d.stop() == 0
    mark = d.log_mark()
    d.start()
    snap = d.wait_state("acme", "connected")
    assert (snap["jid"], snap["push_name"]) == (jid, "Acme")
    assert [e["mode"] for e in d.log_lines("worker started", mark)] == ["restore"]
    assert [e["new"] for e in d.log_lines("state changed", mark)] == ["starting", "connecting", "connected"]


def test_a_session_on_disk_for_a_company_not_in_the_config_is_discovered_and_restored(daemons, tmp_path):
    """A paired session of a company in no config is discovered at start and connected."""
    first = daemons(sim_config("ghost"), root=tmp_path / "a")
    first.start()
    jid = first.pair("ghost")["jid"]
    first.stop()
    second = daemons(sim_config("acme"), root=tmp_path / "a")  # same state dir, ghost is gone
    second.start()
    snap = second.wait_state("ghost", "connected")
    assert (snap["source"], snap["engine"], snap["jid"]) == ("discovered", "simulator", jid)
    assert second.snapshot("acme")["state"] == "stopped"
    assert second.log_lines("found a paired session on disk", company="ghost")


def test_a_status_call_restores_a_stopped_company_whose_session_appeared(daemons, tmp_path):
    """GET status on a stopped company whose session appeared (a backup) restores it."""
    donor = daemons(sim_config("acme"), root=tmp_path / "donor")
    donor.start()
    jid = donor.pair("acme")["jid"]
    donor.stop()
    d = daemons(sim_config("acme"), root=tmp_path / "live")
    d.start()
    assert d.snapshot("acme")["state"] == "stopped"
    shutil.copytree(donor.session_dir("acme"), d.session_dir("acme"))
    assert d.snapshot("acme")["state"] == "stopped"  # the list call never starts anything
    response = d.client.get("/v1/companies/acme")
    assert response.status == 200
    assert response.json()["state"] in ("starting", "connecting", "connected")
    snap = d.wait_state("acme", "connected")
    assert snap["jid"] == jid
    assert d.log_lines("worker started", company="acme")[0]["mode"] == "restore"


@pytest.mark.slow
def test_restores_at_start_are_paced_by_the_global_connect_rate(daemons, tmp_path):
    """connect_rate = 2: six restores at start begin about 0.5 s apart, not all at once."""
    ids = [f"c{i}" for i in range(6)]
    root = tmp_path / "rate"
    first = daemons(sim_config(*ids), root=root)
    first.start()
    for cid in ids:
        first.pair(cid)
    first.stop()
    second = daemons(sim_config(*ids, reconnect={"connect_rate": 2}), root=root)
    mark = second.log_mark()
    second.start()
    for cid in ids:
        second.wait_state(cid, "connected", timeout=15)
    times = sorted(parse_iso(e["timestamp"]) for e in second.log_lines("worker started", mark))
    assert len(times) == 6
    gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
    assert all(0.3 <= gap <= 0.9 for gap in gaps), gaps
    assert 2.2 <= times[-1] - times[0] <= 3.5, gaps


# ------------------------------------------------------------------------------ legacy


def _clean_sessions(daemon: SimDaemon, *args: str) -> subprocess.CompletedProcess[str]:
    assert daemon.config_path is not None
    return subprocess.run([*whatsappd_command(), "clean-sessions", "--config", str(daemon.config_path), *args],
                          env=clean_env(), capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL)


def test_clean_sessions_lists_and_removes_legacy_sessions_and_never_whatsappd_ones(daemons):
    """clean-sessions lists (dry run) and removes legacy sessions, never whatsappd's own."""
    d = daemons(sim_config("acme"))
    d.start()
    d.pair("acme")
    d.stop()
    sessions = d.state_dir / "sessions"
    chrome = sessions / "session-oldchrome"
    (chrome / "Default").mkdir(parents=True)
    (chrome / "Default" / "Cookies").write_bytes(b"x" * 3000)
    (chrome / "DevToolsActivePort").write_text("9222\n")
    (chrome / "Crashpad").mkdir()
    baileys = sessions / "session-oldbaileys"
    baileys.mkdir()
    (baileys / "creds.json").write_text('{"noiseKey": {}}' + " " * 1000)
    (baileys / "app-state-sync-key-1.json").write_text("{}")
    ours = tree_state(d.session_dir("acme"))
    before = tree_state(sessions)

    dry = _clean_sessions(d, "--dry-run")
    assert dry.returncode == 0, dry.stderr
    out = dry.stdout
    assert re.search(rf"would remove {re.escape(str(chrome))} \(browser profile, [0-9.]+ (KiB|B)\)", out), out
    assert re.search(rf"would remove {re.escape(str(baileys))} \(Baileys session, [0-9.]+ (KiB|B)\)", out), out
    assert "session-acme" not in out
    assert "dry run, nothing removed" in out
    assert tree_state(sessions) == before

    real = _clean_sessions(d)
    assert real.returncode == 0, real.stderr
    assert f"removed {chrome}" in real.stdout and f"removed {baileys}" in real.stdout
    assert not chrome.exists() and not baileys.exists()
    assert tree_state(d.session_dir("acme")) == ours
    assert sorted(os.listdir(sessions)) == ["session-acme"]

    again = _clean_sessions(d, "--dry-run")
    assert again.returncode == 0 and "no legacy sessions" in again.stdout
    d.start()
    d.wait_state("acme", "connected")
