"""Outbox enqueues are group-committed (whatsappd/store/): concurrent enqueues share one
transaction, each answers only once it is committed, and one that fails is undone alone.

In-process on a real SQLite file, like test_store.py.
"""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path
from typing import Any

from whatsappd.store import IdempotencyConflict, OutgoingMessage, Store
from whatsappd.store.core import GroupCommit

DAY = 86400.0
JID = "5511999990001@s.whatsapp.net"


def enqueue(store: Store, text: str, key: str | None = None) -> Any:
    body = {"to": "+5511999990001", "text": text}
    return store.enqueue(OutgoingMessage(company="acme", recipient=JID, to="+5511999990001", kind="text",
                                         payload={"text": text}, media=None, ttl=DAY, idempotency_key=key, body=body),
                         DAY)


def committed_texts(path: Path) -> list[str]:
    """What another connection sees: only committed rows, in send order."""
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return [row[0] for row in db.execute("SELECT json_extract(payload, '$.text') FROM messages ORDER BY n")]
    finally:
        db.close()


def test_concurrent_enqueues_are_committed_with_their_event_when_they_return_in_call_order(tmp_path):
    """50 concurrent enqueues: each is committed (with its event delivered) when it returns, in call order."""
    path = tmp_path / "store.sqlite"

    async def main() -> list[tuple[bool, dict[str, Any]]]:
        store = Store(path)
        store.open()
        seen: list[str] = []
        store.subscribe(lambda event, secret: seen.append(event.data["message_id"]))
        try:
            async def one(n: int) -> tuple[bool, dict[str, Any]]:
                result = await enqueue(store, f"m{n}")
                assert f"m{n}" in committed_texts(path)  # on disk (committed) by the time it returns
                assert result[1]["id"] in seen  # and its queued event delivered
                return result

            return await asyncio.gather(*(one(n) for n in range(50)))
        finally:
            await store.close()

    results = asyncio.run(main())
    assert all(created for created, _ in results)
    assert len({m["id"] for _, m in results}) == 50
    assert committed_texts(path) == [f"m{n}" for n in range(50)]


def test_items_submitted_while_a_commit_runs_share_the_next_commit_in_order():
    """GroupCommit: 50 concurrent submits take fewer than 50 commits, in call order, each answered after its commit."""
    commits: list[list[int]] = []
    committed: set[int] = set()

    async def commit(items: list[int]) -> list[int | Exception]:
        await asyncio.sleep(0.01)  # a commit takes time; submits arriving meanwhile wait for the next one
        commits.append(items)
        committed.update(items)
        return [item * 2 for item in items]

    async def main() -> list[int]:
        group: GroupCommit[int, int] = GroupCommit(commit)

        async def one(n: int) -> int:
            await asyncio.sleep(n * 0.0005)  # arrivals spread over several commits
            result = await group.submit(n)
            assert n in committed
            return result

        return await asyncio.gather(*(one(n) for n in range(50)))

    assert asyncio.run(main()) == [n * 2 for n in range(50)]
    assert [item for batch in commits for item in batch] == list(range(50))
    assert 1 < len(commits) < 50


def test_a_commit_that_raises_answers_its_whole_batch_with_the_error_and_the_next_batch_commits():
    """GroupCommit: when commit itself fails, every caller of that batch gets the error; later submits still commit."""
    failing = True

    async def commit(items: list[str]) -> list[str | Exception]:
        await asyncio.sleep(0)
        if failing:
            raise sqlite3.OperationalError("disk I/O error")
        return items

    async def main() -> list[Any]:
        nonlocal failing
        group: GroupCommit[str, str] = GroupCommit(commit)
        failed = await asyncio.gather(*(group.submit(f"x{n}") for n in range(5)), return_exceptions=True)
        failing = False
        return [*failed, await group.submit("after")]

    *failed, after = asyncio.run(main())
    assert len(failed) == 5 and all(isinstance(f, sqlite3.OperationalError) for f in failed)
    assert after == "after"


def test_a_conflict_in_a_batch_fails_alone_and_a_replay_in_the_same_batch_gets_the_first(tmp_path):
    """In one batch a reused key replays (same body) or conflicts alone (other body); the rest commit."""
    path = tmp_path / "store.sqlite"

    async def main() -> list[Any]:
        store = Store(path)
        store.open()
        try:
            return await asyncio.gather(
                enqueue(store, "a"), enqueue(store, "keyed", key="k1"), enqueue(store, "keyed", key="k1"),
                enqueue(store, "other body", key="k1"), enqueue(store, "b"), return_exceptions=True)
        finally:
            await store.close()

    a, first, replay, conflict, b = asyncio.run(main())
    assert a[0] and b[0] and first[0]
    assert replay == (False, first[1])
    assert isinstance(conflict, IdempotencyConflict) and conflict.args[0] == first[1]["id"]
    assert committed_texts(path) == ["a", "keyed", "b"]


def test_a_single_enqueue_is_a_batch_of_one(tmp_path):
    """No waiting for company: a lone enqueue commits at once."""
    path = tmp_path / "store.sqlite"

    async def main() -> tuple[bool, dict[str, Any]]:
        store = Store(path)
        store.open()
        try:
            return await asyncio.wait_for(enqueue(store, "alone"), 5)
        finally:
            await store.close()

    created, message = asyncio.run(main())
    assert created and message["status"] == "queued"
    assert committed_texts(path) == ["alone"]
