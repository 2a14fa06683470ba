"""whatsappd/store/ in-process: the event journal and the outbox on a real SQLite file, and the
backend-independent behaviour on a real PostgreSQL database too (the `where` fixture).

Each test runs its own event loop (asyncio.run) over a Store opened on a file under tmp_path
(or a PostgresStore on a new database of the session's server); nothing is faked. What a daemon
does with the store is covered end to end in test_outbox.py, test_events.py and
test_crash_exactly_once.py.
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
import stat
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest

from whatsappd.store import Event, IdempotencyConflict, OutgoingMessage, Payload, Store, StoreBackend, StoreError

T = TypeVar("T")
DAY = 86400.0
JID = "5511999990001@s.whatsapp.net"


@pytest.fixture(params=["sqlite", "postgresql"])
def where(request: pytest.FixtureRequest, tmp_path: Path) -> Path | str:
    """Where a backend-independent test's store lives: a SQLite file, or a new PostgreSQL database's DSN."""
    if request.param == "sqlite":
        return tmp_path / "whatsappd.sqlite"
    return str(request.getfixturevalue("pg_dsn"))


def run(path: Path | str, body: Callable[[Any], Awaitable[T]]) -> T:
    """Open a store on path (a SQLite file, or a PostgreSQL DSN), run body(store) in a fresh event
    loop, close the store."""

    async def main() -> T:
        store: StoreBackend
        if isinstance(path, Path):
            store = Store(path)
        else:
            from whatsappd.store.postgresql import PostgresStore

            store = PostgresStore(path)
        store.open()
        try:
            return await body(store)
        finally:
            await store.close()

    return asyncio.run(main())


class Recorder:
    """A store listener keeping every delivered event with the store's last_seq at that moment."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.events: list[Event] = []
        self.last_seq_seen: list[int] = []
        store.subscribe(self)

    def __call__(self, event: Event, secret: dict[str, Any] | None) -> None:
        self.events.append(event)
        self.last_seq_seen.append(self.store.last_seq)

    def statuses(self) -> list[tuple[str, str]]:
        return [(e.data["message_id"], e.data["status"]) for e in self.events if e.type == "message.status"]


async def enqueue(store: Store, text: str = "hi", company: str = "acme", key: str | None = None,
                  ttl: float = DAY, window: float = DAY, media: bytes | None = None) -> tuple[bool, dict[str, Any]]:
    body = {"to": "+5511999990001", "text": text}
    payload: Payload = {"caption": None, "size": len(media)} if media else {"text": text}
    return await store.enqueue(OutgoingMessage(
        company=company, recipient=JID, to="+5511999990001", kind="image" if media else "text", payload=payload,
        media=media, ttl=ttl, idempotency_key=key, body=body), window)


def rows(path: Path, sql: str, *args: Any) -> list[tuple[Any, ...]]:
    db = sqlite3.connect(path)
    try:
        return db.execute(sql, args).fetchall()
    finally:
        db.close()


# ------------------------------------------------------------------------------ the journal


def test_seq_is_monotonic_and_durable_across_reopen(where):
    """Seqs go 1, 2, 3... across batches; after close and reopen they continue from the last one."""
    path = where

    async def first(store: Store) -> list[int]:
        for n in range(3):
            for i in range(4):
                store.append("acme", "message.incoming", {"n": n * 4 + i})
            await store.flush()
        return [e.seq for e in await store.events_after(0, 100)]

    assert run(path, first) == list(range(1, 13))

    async def second(store: Store) -> tuple[int, list[Event]]:
        before = store.last_seq
        store.append("acme", "company.state", {"new": "connected"})
        await store.flush()
        return before, await store.events_after(0, 100)

    before, events = run(path, second)
    assert before == 12
    assert [e.seq for e in events] == list(range(1, 14))
    assert [e.data.get("n") for e in events[:12]] == list(range(12))
    assert events[-1].type == "company.state" and events[-1].data == {"new": "connected"}


def test_seqs_are_never_reused_even_after_every_event_was_pruned(where):
    """Pruning the whole journal and reopening keeps counting up: a reader's cursor stays valid."""
    path = where

    async def fill_and_prune(store: Store) -> int:
        for i in range(5):
            store.append("acme", "message.incoming", {"i": i})
        await store.flush()
        time.sleep(0.01)
        return await store.prune(max_age=0.0, max_events=1000)

    assert run(path, fill_and_prune) == 5

    async def again(store: Store) -> tuple[int, int | None, list[int]]:
        oldest = await store.oldest_seq()
        store.append("acme", "message.incoming", {"i": 5})
        await store.flush()
        return store.last_seq, oldest, [e.seq for e in await store.events_after(0, 10)]

    assert run(path, again) == (6, None, [6])


def test_appends_in_one_tick_are_one_batch_delivered_in_order_after_commit(tmp_path):
    """Appends in one loop tick commit as one batch, reach listeners in order, and only once on disk."""
    path = tmp_path / "whatsappd.sqlite"
    on_disk_when_seen: list[bool] = []

    async def body(store: Store) -> Recorder:
        recorder = Recorder(store)
        probe = sqlite3.connect(path)

        def committed(event: Event, secret: dict[str, Any] | None) -> None:
            found = probe.execute("SELECT 1 FROM events WHERE seq = ?", (event.seq,)).fetchone()
            on_disk_when_seen.append(found is not None)

        store.subscribe(committed)
        try:
            for n in range(500):  # no await in between: one tick
                store.append("acme", "message.incoming", {"n": n})
            await store.flush()
            for n in range(500, 503):  # one per tick: three batches
                store.append("acme", "message.incoming", {"n": n})
                await store.flush()
        finally:
            probe.close()
        return recorder

    recorder = run(path, body)
    assert [e.data["n"] for e in recorder.events] == list(range(503))
    assert [e.seq for e in recorder.events] == list(range(1, 504))
    assert set(recorder.last_seq_seen[:500]) == {500}, "the 500 appends were not one batch"
    assert recorder.last_seq_seen[500:] == [501, 502, 503]
    assert all(on_disk_when_seen) and len(on_disk_when_seen) == 503


def test_events_after_filters_by_company_type_and_until(where):
    """events_after returns events after `since`, up to `until`, of the given companies and types."""

    async def body(store: Store) -> dict[str, list[int]]:
        for company in ("acme", "beta", "acme", None):
            store.append(company, "company.state", {})
            store.append(company, "message.incoming", {})
        await store.flush()
        return {
            "all": [e.seq for e in await store.events_after(0, 100)],
            "since": [e.seq for e in await store.events_after(5, 100)],
            "limit": [e.seq for e in await store.events_after(0, 3)],
            "until": [e.seq for e in await store.events_after(2, 100, until=4)],
            "acme": [e.seq for e in await store.events_after(0, 100, companies=["acme"])],
            "type": [e.seq for e in await store.events_after(0, 100, types=["message.incoming"])],
            "both": [e.seq for e in await store.events_after(0, 100, ["beta", "acme"], ["company.state"])],
        }

    got = run(where, body)
    assert got == {"all": list(range(1, 9)), "since": [6, 7, 8], "limit": [1, 2, 3], "until": [3, 4],
                   "acme": [1, 2, 5, 6], "type": [2, 4, 6, 8], "both": [1, 3, 5]}


def test_prune_by_count_keeps_only_the_newest_events(where):
    """prune(max_events=20) over 50 events deletes the 30 oldest; the oldest seq left is 31."""

    async def body(store: Store) -> tuple[int, int | None, int]:
        for i in range(50):
            store.append("acme", "message.incoming", {"i": i})
        await store.flush()
        pruned = await store.prune(max_age=DAY, max_events=20)
        return pruned, await store.oldest_seq(), len(await store.events_after(0, 1000))

    assert run(where, body) == (30, 31, 20)


def test_prune_by_age_deletes_older_events_and_incoming_media(where):
    """prune(max_age) deletes events and incoming media older than max_age, and keeps newer ones."""

    async def body(store: Store) -> tuple[int, int | None, Any, Any]:
        for i in range(10):
            store.append("acme", "message.incoming", {"i": i})
        await store.flush()
        await store.store_incoming_media("acme", "3EB0OLD", "image", "image/jpeg", "b2xk")
        time.sleep(0.3)
        for i in range(5):
            store.append("acme", "message.incoming", {"i": 10 + i})
        await store.flush()
        await store.store_incoming_media("acme", "3EB0NEW", "image", "image/jpeg", "bmV3")
        pruned = await store.prune(max_age=0.15, max_events=1_000_000)
        return (pruned, await store.oldest_seq(), await store.incoming_media("acme", "3EB0OLD"),
                await store.incoming_media("acme", "3EB0NEW"))

    pruned, oldest, old, new = run(where, body)
    assert (pruned, oldest, old) == (10, 11, None)
    assert new == {"kind": "image", "mimetype": "image/jpeg", "raw": "bmV3"}


# ------------------------------------------------------------------------------- the outbox


def test_enqueue_stores_a_queued_message_and_journals_its_queued_event_with_it(tmp_path):
    """enqueue stores a `queued` message and journals its message.status event in the same transaction."""
    path = tmp_path / "whatsappd.sqlite"

    async def body(store: Store) -> tuple[bool, dict[str, Any], list[tuple[str, str]], Any]:
        recorder = Recorder(store)
        created, message = await enqueue(store, "hello")
        delivered = recorder.statuses()
        pending = await store.next_pending("acme")
        return created, message, delivered, pending

    created, message, delivered, pending = run(path, body)
    assert created is True
    assert message["status"] == "queued" and message["id"].startswith("msg_")
    assert message["jid"] == JID and message["to"] == "+5511999990001" and message["attempts"] == 0
    assert delivered == [(message["id"], "queued")]
    assert pending["id"] == message["id"] and pending["text"] == "hello"
    journaled = rows(path, "SELECT company, type, json_extract(data, '$.message_id'), "
                           "json_extract(data, '$.status') FROM events")
    assert journaled == [("acme", "message.status", message["id"], "queued")]


def test_status_transitions_follow_the_table_and_refused_ones_change_nothing(where):
    """Status moves follow the table; refused ones (e.g. read -> sent) return None and journal nothing."""
    path = where

    async def body(store: Store) -> tuple[dict[str, Any], dict[str, Any], list[tuple[str, str]], list[Any]]:
        recorder = Recorder(store)
        _, a = await enqueue(store, "a")
        _, b = await enqueue(store, "b")
        refused = [await store.set_status(a["id"], "sent", wa_id="3EB0X")]  # skips sending
        assert (await store.set_status(a["id"], "sending"))["attempts"] == 1
        sent = await store.set_status(a["id"], "sent", wa_id="3EB0A")
        assert sent is not None and sent["wa_id"] == "3EB0A" and sent["sent_at"] is not None
        refused.append(await store.set_status(a["id"], "queued"))
        await store.receipt("acme", ["3EB0A"], "delivered")
        await store.receipt("acme", ["3EB0A"], "read")
        refused.append(await store.set_status(a["id"], "sent", wa_id="3EB0A"))  # read -> sent
        refused.append(await store.set_status(a["id"], "delivered"))
        assert (await store.set_status(b["id"], "sending")) is not None
        failed = await store.set_status(b["id"], "failed", error_code="not_on_whatsapp", error="nope")
        assert failed is not None and failed["error"] == {"code": "not_on_whatsapp", "message": "nope"}
        refused.append(await store.set_status(b["id"], "queued"))
        refused.append(await store.set_status("msg_unknown", "sending"))
        return (await store.message("acme", a["id"]), await store.message("acme", b["id"]),
                recorder.statuses(), refused)

    a, b, statuses, refused = run(path, body)
    assert refused == [None] * 6
    assert a["status"] == "read" and a["wa_id"] == "3EB0A" and a["read_at"] and a["delivered_at"]
    assert b["status"] == "failed"
    assert statuses == [(a["id"], "queued"), (b["id"], "queued"), (a["id"], "sending"), (a["id"], "sent"),
                        (a["id"], "delivered"), (a["id"], "read"), (b["id"], "sending"), (b["id"], "failed")]


def test_receipts_only_move_a_message_forward(where):
    """Receipts only move a message forward; ids no message of that company carries come back unknown."""

    async def body(store: Store) -> dict[str, Any]:
        _, m = await enqueue(store)
        await store.set_status(m["id"], "sending")
        await store.set_status(m["id"], "sent", wa_id="3EB0R")
        read, unknown = await store.receipt("acme", ["3EB0R", "3EB0NOPE"], "read")
        late, _ = await store.receipt("acme", ["3EB0R"], "delivered")
        again, _ = await store.receipt("acme", ["3EB0R"], "read")
        other_company, other_unknown = await store.receipt("beta", ["3EB0R"], "delivered")
        return {"read": read, "unknown": unknown, "late": late, "again": again, "other": other_company,
                "other_unknown": other_unknown, "now": await store.message("acme", m["id"])}

    got = run(where, body)
    assert [m["status"] for m in got["read"]] == ["read"]
    assert got["unknown"] == ["3EB0NOPE"]
    assert got["late"] == [] and got["again"] == []
    assert got["other"] == [] and got["other_unknown"] == ["3EB0R"]  # wa ids are per company
    assert got["now"]["status"] == "read" and got["now"]["delivered_at"] and got["now"]["read_at"]


def test_expire_turns_overdue_queued_messages_expired_and_drops_their_media(where):
    """Queued messages past their ttl become `expired` and lose their media; in-flight ones are left alone."""

    async def body(store: Store) -> dict[str, Any]:
        recorder = Recorder(store)
        _, short = await enqueue(store, "short", ttl=0.05, media=b"\x89PNG...")
        _, inflight = await enqueue(store, "inflight", ttl=0.05)
        _, long = await enqueue(store, "long")
        await store.set_status(inflight["id"], "sending")
        assert await store.media(short["id"]) == b"\x89PNG..."
        await asyncio.sleep(0.1)
        expired = await store.expire()
        return {"expired": expired, "again": await store.expire(), "media": await store.media(short["id"]),
                "pending": await store.next_pending("acme"), "inflight": await store.message("acme", inflight["id"]),
                "events": recorder.statuses(), "ids": (short["id"], long["id"])}

    got = run(where, body)
    short_id, long_id = got["ids"]
    assert [(m["id"], m["status"]) for m in got["expired"]] == [(short_id, "expired")]
    assert got["expired"][0]["error"]["code"] == "ttl_expired"
    assert got["again"] == [] and got["media"] is None
    assert got["pending"]["id"] == long_id
    assert got["inflight"]["status"] == "sending"
    assert got["events"][-1] == (short_id, "expired")


def test_a_sending_message_nobody_can_settle_fails_after_its_ttl_unless_a_send_is_under_way(where):
    """`sending` past its ttl: failed with send_interrupted, journalled; one a sender holds is left alone."""

    async def body(store: Store) -> dict[str, Any]:
        recorder = Recorder(store)
        _, stale = await enqueue(store, "stale", ttl=0.05)
        _, busy = await enqueue(store, "busy", ttl=0.05)
        _, young = await enqueue(store, "young")
        for message in (stale, busy, young):
            await store.set_status(message["id"], "sending")
        await asyncio.sleep(0.1)
        failed = await store.fail_stale_sending(time.time(), frozenset({busy["id"]}))
        return {"failed": failed, "again": await store.fail_stale_sending(time.time(), frozenset()),
                "busy": await store.message("acme", busy["id"]), "young": await store.message("acme", young["id"]),
                "events": recorder.statuses(), "stale": stale["id"], "busy_id": busy["id"]}

    got = run(where, body)
    assert [(m["id"], m["status"], m["error"]["code"]) for m in got["failed"]] == [
        (got["stale"], "failed", "send_interrupted")]
    assert [m["id"] for m in got["again"]] == [got["busy_id"]]  # once nobody holds it any more
    assert got["young"]["status"] == "sending"
    assert (got["stale"], "failed") in got["events"]


def test_idempotency_key_replays_within_the_window_and_is_reusable_after_it(where):
    """A key replays within the window, conflicts on another body, is per company, and is free after it."""

    async def body(store: Store) -> dict[str, Any]:
        window = 0.3
        _, first = await enqueue(store, "one", key="K", window=window)
        replay = await enqueue(store, "one", key="K", window=window)
        with pytest.raises(IdempotencyConflict) as conflict:
            await enqueue(store, "two", key="K", window=window)
        other = await enqueue(store, "one", key="K", company="beta", window=window)
        await asyncio.sleep(window + 0.05)
        later = await enqueue(store, "two", key="K", window=window)
        return {"first": first, "replay": replay, "conflict": conflict.value.args[0], "other": other,
                "later": later, "old": await store.message("acme", first["id"])}

    got = run(where, body)
    first = got["first"]
    assert got["replay"] == (False, first)
    assert got["conflict"] == first["id"]
    assert got["other"][0] is True and got["other"][1]["id"] != first["id"]
    created, later = got["later"]
    assert created is True and later["id"] != first["id"] and later["idempotency_key"] == "K"
    assert got["old"]["id"] == first["id"] and got["old"]["idempotency_key"] is None


# ---------------------------------------------------------------- pacing and webhook rows


def test_pacing_state_is_kept_across_a_reopen_with_the_same_semantics(where):
    """Contacts, the first-contact window (one count per jid, old rows ignored), pauses and recent
    send times read back the same after a reopen, on both backends."""
    now = time.time()
    other = "5511999990002@s.whatsapp.net"

    async def write(store: Store) -> None:
        await store.record_contact("acme", JID)
        await store.record_contact("acme", JID)  # a second message from them changes nothing
        await store.record_first_contact("acme", other, now - 100)
        await store.record_first_contact("acme", other, now - 50)  # within the window: counted once
        await store.record_first_contact("acme", "old@s.whatsapp.net", now - DAY - 10)  # outside it
        await store.record_first_contact("beta", other, now - 10)
        await store.set_pacing_pause("acme", now + 60, "rate_limited")
        await store.set_pacing_pause("acme", now + 120, "rate_limited again")  # replaces it
        await store.set_pacing_pause("beta", now + 60, None)
        await store.set_pacing_pause("beta", None, None)  # ends it
        for sent_at in (now - 30, now - 20, now - 10):
            _, m = await enqueue(store, str(sent_at))
            await store.set_status(m["id"], "sending")
            await store.set_status(m["id"], "sent", wa_id=f"3EB0{int(sent_at)}", sent_at=sent_at)

    async def read(store: Store) -> dict[str, Any]:
        return {"known": [await store.is_known_contact("acme", JID), await store.is_known_contact("beta", JID),
                          await store.is_known_contact("acme", other)],
                "first": await store.first_contacts("acme", now), "beta": await store.first_contacts("beta", now),
                "pauses": await store.pacing_pauses(), "recent": await store.recent_sends("acme", 2),
                "none": await store.recent_sends("beta", 5)}

    run(where, write)
    got = run(where, read)
    assert got["known"] == [True, False, False]
    assert got["first"] == {other: pytest.approx(now - 100)}
    assert got["beta"] == {other: pytest.approx(now - 10)}
    assert got["pauses"] == {"acme": (pytest.approx(now + 120), "rate_limited again")}
    assert got["recent"] == [pytest.approx(now - 20), pytest.approx(now - 10)]  # the last two, oldest first
    assert got["none"] == []


def test_webhook_rows_keep_their_cursor_across_a_redefinition_and_a_reopen(where):
    """put_webhook creates a row at its cursor and a redefinition keeps the cursor; cursor moves and
    deletes are kept across a reopen; moving an unknown webhook's cursor creates nothing."""
    definition = {"url": "http://127.0.0.1:9/hook", "events": ["message.status"], "secret": "s3cret"}

    async def write(store: Store) -> list[int]:
        cursors = [await store.put_webhook("b-api", definition, 7),
                   await store.put_webhook("a-file", None, 3)]
        await store.set_webhook_cursor("b-api", 42)
        cursors.append(await store.put_webhook("b-api", {**definition, "events": []}, 0))  # keeps 42
        await store.set_webhook_cursor("nobody", 5)
        await store.put_webhook("gone", None, 1)
        await store.delete_webhook("gone")
        return cursors

    assert run(where, write) == [7, 3, 42]
    assert run(where, lambda store: store.webhooks()) == [
        {"id": "a-file", "cursor": 3, "definition": None},
        {"id": "b-api", "cursor": 42, "definition": {**definition, "events": []}},
    ]


def test_counts_by_company_gives_each_status_count_and_its_oldest_message(where):
    """counts_by_company: (company, status) -> (how many, the oldest created_at), for the metrics."""

    async def body(store: Store) -> dict[tuple[str, str], tuple[int, float]]:
        for text, company in (("a", "acme"), ("b", "acme"), ("c", "acme"), ("d", "beta")):
            _, last = await enqueue(store, text, company=company)
            if text == "b":
                await store.set_status(last["id"], "sending")
        return await store.counts_by_company()

    before = time.time()
    counts = run(where, body)
    assert {key: n for key, (n, _) in counts.items()} == {("acme", "queued"): 2, ("acme", "sending"): 1,
                                                           ("beta", "queued"): 1}
    oldest = [counts[key][1] for key in (("acme", "queued"), ("acme", "sending"), ("beta", "queued"))]
    assert before <= oldest[0] < oldest[1] < oldest[2] <= time.time()  # a, b, d: created in that order


def test_store_files_are_private_whatever_the_umask(tmp_path):
    """The database, WAL and shm files are 0600 and a directory the store makes is 0700, even under umask 0."""
    path = tmp_path / "state" / "whatsappd.sqlite"
    old = os.umask(0)
    try:
        async def body(store: Store) -> dict[str, int]:
            await enqueue(store)
            store.append("acme", "company.state", {})
            await store.flush()
            return {p.name: stat.S_IMODE(p.stat().st_mode) for p in path.parent.iterdir()}

        modes = run(path, body)
    finally:
        os.umask(old)
    assert modes["whatsappd.sqlite"] == 0o600
    assert all(mode == 0o600 for mode in modes.values()), modes
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700


def test_a_store_from_a_newer_version_or_a_damaged_file_is_refused_with_what_to_do(tmp_path):
    """A newer schema or a damaged file is refused with StoreError naming the file and the fix."""
    newer = tmp_path / "newer.sqlite"
    db = sqlite3.connect(newer)
    db.execute("PRAGMA user_version = 99")
    db.close()
    with pytest.raises(StoreError, match=r"newer whatsappd.*upgrade"):
        Store(newer).open()
    damaged = tmp_path / "damaged.sqlite"
    damaged.write_bytes(b"this is not a database" * 500)
    with pytest.raises(StoreError, match=r"damaged\.sqlite.*move it aside"):
        Store(damaged).open()
