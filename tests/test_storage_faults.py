"""The store when its disk fills up or its file is damaged.

A full disk (a real small tmpfs, really filled, then freed) is a clear `storage_full` (507)
with nothing half-written; health and metrics say so; the daemon carries on by itself once there
is room. Mounting needs root: elsewhere those tests are skipped, saying why. A damaged database
file (really damaged, page by page) stops the start with one line naming the file and the fix,
and an exit status systemd does not restart on; `whatsappd check-store` lists the damage.
"""

from __future__ import annotations

import asyncio
import base64
import os
import sqlite3
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from whatsappd.exits import EX_DATAERR
from whatsappd.store import OutgoingMessage, StorageFull, Store
from whatsappd.testing.daemon import DaemonProcess, clean_env, run_ctl, wait_until
from whatsappd.testing.disk import SmallDisk
from whatsappd.testing.metrics import metric_value
from whatsappd.testing.scenario import SimDaemon, sim_config

DAY = 86400.0
JID = "5511999990001@s.whatsapp.net"
BIG = 512 * 1024  # larger than anything the WAL can reuse on the small disk


def rows(path: Path, sql: str) -> list[tuple[Any, ...]]:
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return db.execute(sql).fetchall()
    finally:
        db.close()


async def enqueue(store: Store, text: str, media: bytes | None = None) -> tuple[bool, dict[str, Any]]:
    return await store.enqueue(OutgoingMessage(
        company="acme", recipient=JID, to="+5511999990001", kind="document" if media else "text",
        payload={"text": text}, media=media, ttl=DAY, idempotency_key=None, body={"text": text}), DAY)


class TestTheStoreOnAFullDisk:
    def test_an_enqueue_is_refused_whole_and_the_store_recovers_when_space_returns(self, small_disk: SmallDisk) -> None:
        """StorageFull, nothing of the message stored, `full` in health; a write works again once freed."""
        path = small_disk.path / "whatsappd.sqlite"

        async def main() -> None:
            store = Store(path)
            store.open()
            try:
                await enqueue(store, "before")
                small_disk.fill()
                with pytest.raises(StorageFull) as caught:
                    await enqueue(store, "refused", media=os.urandom(BIG))
                assert str(path) in str(caught.value) and "full" in str(caught.value)
                health = store.health()
                assert health["state"] == "full" and health["since"] and str(path) in health["message"]
                assert store.full_refusals == 1
                small_disk.free()
                await asyncio.to_thread(wait_until, lambda: store.health()["state"] == "ok", 10,
                                        what="the store's probe to see the space again")
                created, message = await enqueue(store, "after", media=os.urandom(BIG))
                assert created and message["status"] == "queued"
            finally:
                small_disk.free()  # a failed check must not leave close() waiting for room
                await store.close()

        asyncio.run(main())
        texts = [t for (t,) in rows(path, "SELECT json_extract(payload, '$.text') FROM messages ORDER BY n")]
        assert texts == ["before", "after"]  # nothing of the refused one
        assert rows(path, "SELECT count(*) FROM media") == [(1,)]
        assert rows(path, "SELECT count(*) FROM events") == [(2,)]  # one message.status each

    def test_events_appended_while_full_are_kept_and_committed_once_there_is_room(self,
                                                                                  small_disk: SmallDisk) -> None:
        """Journal events that cannot be written are kept in order, then committed; none lost, none twice."""
        path = small_disk.path / "whatsappd.sqlite"

        async def main() -> list[int]:
            store = Store(path)
            store.open()
            delivered: list[int] = []
            store.subscribe(lambda event, _secret: delivered.append(event.data["n"]))
            try:
                store.append("acme", "message.incoming", {"n": 0})
                await store.flush()
                small_disk.fill()
                for n in range(1, 4):
                    store.append("acme", "message.incoming", {"n": n, "blob": "x" * BIG})
                await asyncio.sleep(1.5)  # the flush fails and is retried meanwhile
                assert delivered == [0] and store.health()["state"] == "full"
                small_disk.free()
                await asyncio.wait_for(store.flush(), 60)
                assert store.health()["state"] == "ok"
            finally:
                small_disk.free()  # a failed check must not leave close() waiting for room
                await store.close()
            return delivered

        assert asyncio.run(main()) == [0, 1, 2, 3]
        assert [n for (n,) in rows(path, "SELECT json_extract(data, '$.n') FROM events ORDER BY seq")] == [0, 1, 2, 3]


def test_the_daemon_answers_507_storage_full_says_so_and_recovers(small_disk: SmallDisk, tmp_path: Path) -> None:
    """Full disk: POST gets 507 and stores nothing, health says full, a receipt waits; freed: all resumes."""
    state = small_disk.path / "state"
    d = SimDaemon(tmp_path / "d", config=f'[daemon]\nstate_dir = "{state}"\n'
                  + sim_config("acme", outbox={"max_file_size": "1MiB"}))
    d.start(timeout=30)
    try:
        d.pair("acme", timeout=30)
        sent = d.client.post("/v1/companies/acme/messages?wait=sent", {"to": "+5511999990001", "text": "oi"})
        assert sent.status == 202 and sent.json()["status"] == "sent", sent.body
        message_id = sent.json()["id"]
        body = {"to": "+5511999990001", "document": {"base64": base64.b64encode(os.urandom(BIG)).decode()}}
        small_disk.fill()
        mark = d.log_mark()
        for _ in range(3):
            response = d.client.post("/v1/companies/acme/messages", body)
            assert response.status == 507, response.body
            error = response.json()["error"]
            assert error["code"] == "storage_full" and str(state / "whatsappd.sqlite") in error["message"]
        read = d.simulate("acme", "receipt", ids=[message_id], receipt="read")
        assert read.status == 200, read.body
        health = d.client.get("/v1/health").json()
        assert health["status"] == "degraded" and health["storage"]["state"] == "full"
        ctl = run_ctl("--socket", str(d.socket_path), "health")
        assert "degraded" in ctl.stdout and "storage:   FULL since" in ctl.stdout, ctl.stdout + ctl.stderr
        metrics = d.client.get("/v1/metrics").body.decode()
        assert metric_value(metrics, "whatsappd_storage_full") == 1
        refusals = metric_value(metrics, "whatsappd_storage_full_refusals_total")
        assert refusals is not None and refusals >= 3, metrics  # the POSTs, and writes retried meanwhile
        assert rows(state / "whatsappd.sqlite", "SELECT id, status FROM messages") == [(message_id, "sent")]
        small_disk.free()
        wait_until(lambda: d.client.get("/v1/health").json()["storage"]["state"] == "ok", 10,
                   what="health to see the space again")
        assert d.client.get("/v1/health").json()["status"] == "ok"
        assert metric_value(d.client.get("/v1/metrics").body.decode(), "whatsappd_storage_full") == 0
        wait_until(lambda: d.client.get(f"/v1/companies/acme/messages/{message_id}").json()["status"] == "read", 10,
                   what="the receipt that came while the disk was full to be applied")
        assert d.client.post("/v1/companies/acme/messages", body).status == 202
        logged = d.log_since(mark)
        assert [e["event"] for e in logged if "storage" in e["event"]] == [
            "storage full: writes are refused until there is room", "storage writable again"]
        assert not [e for e in logged if e.get("level") in ("error", "critical") and "storage full" not in e["event"]
                    and "cannot write events" not in e["event"]], logged
        assert "cannot rollback" not in d.logs() and "Traceback" not in d.logs()
        assert d.stop() == 0
    finally:
        d.kill()


# ------------------------------------------------------------------------------ a damaged file

REPO = Path(__file__).resolve().parent.parent


def make_store(path: Path, events: int = 3000) -> None:
    """A real journal with `events` events (the events table spans many pages)."""

    async def main() -> None:
        store = Store(path)
        store.open()
        for n in range(events):
            store.append("acme", "message.incoming", {"n": n, "text": "olá " * 8})
        await store.close()

    asyncio.run(main())


def damage(path: Path, table: str) -> None:
    """Scramble the root page of `table` in the database file at path, as a bad disk would."""
    db = sqlite3.connect(path)
    page_size = db.execute("PRAGMA page_size").fetchone()[0]
    root = db.execute("SELECT rootpage FROM sqlite_master WHERE name = ?", (table,)).fetchone()[0]
    db.close()
    with open(path, "r+b") as f:
        f.seek((root - 1) * page_size)
        page = bytearray(f.read(page_size))
        f.seek((root - 1) * page_size)
        f.write(bytes(b ^ 0xA5 for b in page))


@pytest.mark.parametrize("table", ["sqlite_sequence", "events"])
def test_a_damaged_journal_stops_the_start_with_one_line_and_exit_65(
        daemon_factory: Callable[..., DaemonProcess], table: str) -> None:
    """A damaged whatsappd.sqlite: exit 65 (not restarted), one error line naming the file and the fix."""
    d = daemon_factory()
    journal = d.state_dir / "whatsappd.sqlite"
    journal.parent.mkdir(parents=True)
    make_store(journal)
    damage(journal, table)
    d.start(wait=False)
    assert d.proc is not None
    assert d.proc.wait(30) == EX_DATAERR, d.logs()
    errors = [e for e in d.log_events() if e.get("level") in ("error", "critical")]
    assert [e["event"] for e in errors] == ["cannot start: the store is damaged"], d.logs()
    line = errors[0]
    assert line["path"] == str(journal) and line["problem"] and line["exit_status"] == EX_DATAERR
    assert "backup" in line["fix"] and f"mv {journal} {journal}.damaged" in line["fix"]
    assert "whatsappd check-store" in line["fix"]
    assert "Traceback" not in d.logs()
    assert not d.socket_path.exists()  # it did not stay half up


def test_the_unit_does_not_restart_a_daemon_whose_store_is_damaged() -> None:
    """systemd/whatsappd.service lists EX_DATAERR (65) beside EX_CONFIG (78) in RestartPreventExitStatus=."""
    unit = (REPO / "systemd" / "whatsappd.service").read_text()
    values = [line.split("=", 1)[1].split() for line in unit.splitlines()
              if line.startswith("RestartPreventExitStatus=")]
    assert values and {"65", "78"} <= set(values[-1]), values


def check_store(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "whatsappd", "check-store", *args], env=clean_env(),
                          capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)


def test_check_store_says_ok_for_sound_stores_and_exits_0(tmp_path: Path) -> None:
    """check-store on a sound journal and session store: one `ok` line each, exit 0 (read-only)."""
    state = tmp_path / "state"
    (state / "sessions" / "session-acme").mkdir(parents=True)
    make_store(state / "whatsappd.sqlite", events=10)
    sqlite3.connect(state / "sessions" / "session-acme" / "store.db").execute("CREATE TABLE t (x)").connection.close()
    config = tmp_path / "whatsappd.toml"
    config.write_text(f'[daemon]\nstate_dir = "{state}"\n')
    before = {p.name: p.stat().st_mtime_ns for p in state.iterdir() if p.is_file()}
    result = check_store("--config", str(config))
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.splitlines() == [f"{state / 'whatsappd.sqlite'}: ok",
                                          f"{state / 'sessions' / 'session-acme' / 'store.db'}: ok"]
    assert {p.name: p.stat().st_mtime_ns for p in state.iterdir() if p.is_file()} == before


def test_check_store_lists_each_finding_of_a_damaged_file_and_exits_1(tmp_path: Path) -> None:
    """check-store on a damaged journal: one line per finding, then DAMAGED with the fix; exit 1."""
    journal = tmp_path / "whatsappd.sqlite"
    make_store(journal)
    damage(journal, "events")
    result = check_store("--path", str(journal))
    assert result.returncode == 1, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) >= 2 and all(line.startswith(f"{journal}: ") for line in lines), lines
    assert lines[-1].startswith(f"{journal}: DAMAGED ({len(lines) - 1} findings); ") and "backup" in lines[-1]
    assert check_store("--path", str(tmp_path / "missing.sqlite")).returncode == 1
