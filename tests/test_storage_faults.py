"""The store when its disk fills up: a real small tmpfs, really filled, then freed.

A full disk is a clear `storage_full` (507) with nothing half-written; health and metrics say
so; the daemon carries on by itself once there is room. Mounting needs root: elsewhere these
tests are skipped, saying why.
"""

from __future__ import annotations

import asyncio
import base64
import errno
import os
import sqlite3
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from whatsappd.store import StorageFull, Store
from whatsappd.testing.daemon import run_ctl, wait_until
from whatsappd.testing.scenario import SimDaemon, sim_config

DAY = 86400.0
JID = "5511999990001@s.whatsapp.net"
BIG = 512 * 1024  # larger than anything the WAL can reuse on the small disk


class SmallDisk:
    """A tmpfs of a few MiB mounted at `path`; fill() takes every free byte, free() gives them back."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.filler = path / "filler"

    def fill(self) -> None:
        fd = os.open(self.filler, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            for size in (1 << 20, 1 << 16, 1 << 12, 1):
                try:
                    while True:
                        os.write(fd, b"\0" * size)
                except OSError as exc:
                    assert exc.errno == errno.ENOSPC, exc
        finally:
            os.close(fd)
        assert os.statvfs(self.path).f_bavail == 0

    def free(self) -> None:
        self.filler.unlink(missing_ok=True)


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[SmallDisk]:
    """A real 4 MiB tmpfs under tmp_path, unmounted at teardown."""
    if os.geteuid() != 0:
        pytest.skip("needs root, to mount a small tmpfs and fill it")
    path = tmp_path / "disk"
    path.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m,mode=0700", "tmpfs", str(path)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield SmallDisk(path)
    finally:
        subprocess.run(["umount", "-l", str(path)], check=True)


def rows(path: Path, sql: str) -> list[tuple[Any, ...]]:
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return db.execute(sql).fetchall()
    finally:
        db.close()


async def enqueue(store: Store, text: str, media: bytes | None = None) -> tuple[bool, dict[str, Any]]:
    return await store.enqueue("acme", None, {"text": text}, JID, "+5511999990001", "document" if media else "text",
                               {"text": text}, media, DAY, DAY)


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
    """POST on a full disk: 507 storage_full, nothing stored; health/metrics say full; 202 once freed."""
    state = small_disk.path / "state"
    d = SimDaemon(tmp_path / "d", config=f'[daemon]\nstate_dir = "{state}"\n'
                  + sim_config("acme", outbox={"max_file_size": "1MiB"}))
    d.start(timeout=30)
    try:
        body = {"to": "+5511999990001", "document": {"base64": base64.b64encode(os.urandom(BIG)).decode()}}
        assert d.client.post("/v1/companies/acme/messages", body).status == 202
        small_disk.fill()
        mark = d.log_mark()
        for _ in range(3):
            response = d.client.post("/v1/companies/acme/messages", body)
            assert response.status == 507, response.body
            error = response.json()["error"]
            assert error["code"] == "storage_full" and str(state / "whatsappd.sqlite") in error["message"]
        health = d.client.get("/v1/health").json()
        assert health["status"] == "degraded" and health["storage"]["state"] == "full"
        ctl = run_ctl("--socket", str(d.socket_path), "health")
        assert "degraded" in ctl.stdout and "storage:   FULL since" in ctl.stdout, ctl.stdout + ctl.stderr
        metrics = d.client.get("/v1/metrics").body.decode()
        assert "whatsappd_storage_full 1\n" in metrics and "whatsappd_storage_full_refusals_total 3\n" in metrics
        assert rows(state / "whatsappd.sqlite", "SELECT count(*) FROM messages") == [(1,)]
        small_disk.free()
        wait_until(lambda: d.client.get("/v1/health").json()["storage"]["state"] == "ok", 10,
                   what="health to see the space again")
        assert d.client.get("/v1/health").json()["status"] == "ok"
        assert "whatsappd_storage_full 0\n" in d.client.get("/v1/metrics").body.decode()
        assert d.client.post("/v1/companies/acme/messages", body).status == 202
        logged = d.log_since(mark)
        assert [e["event"] for e in logged if "storage" in e["event"]] == [
            "storage full: writes are refused until there is room", "storage writable again"]
        assert not [e for e in logged if e.get("level") in ("error", "critical") and "storage full" not in e["event"]]
        assert "cannot rollback" not in d.logs()
        assert d.stop() == 0
    finally:
        d.kill()
