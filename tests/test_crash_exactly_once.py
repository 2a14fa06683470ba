"""Exactly once across a daemon crash: 1,000 queued messages, `kill -9` midway through sending.

A real daemon with a real simulator worker; the simulator's send log on disk is the "server"
(what WhatsApp received), read after the fact with no worker running. The outbox marks a
message `sending` before asking the worker, and after a crash settles every such message from
the worker's send log (docs/INTERNALS.md, "Messaging over the channel"): sent once, or
reported failed with `send_interrupted`, never sent twice.
"""

from __future__ import annotations

import collections
import sqlite3
from typing import Any

import psycopg
import pytest

from whatsappd.testing.daemon import wait_until
from whatsappd.testing.events import ApiSession, EventReader
from whatsappd.testing.metrics import metric_value
from whatsappd.testing.scenario import SimDaemon, process_gone, sim_config
from whatsappd.worker.simulator.server import read_send_log, send_log_stats

#: Workers boot slowly on a loaded 2-core machine: more patience than the fast tables' 2 s.
SLOW_BOOT = {"heartbeat_timeout": "10s"}

MESSAGES = 1000
#: Each send takes this long in the simulator, so sending 1,000 lasts several seconds and the
#: kill lands in the middle of it.
SEND_DELAY = "0.002"
AFTER_SENT = ("sent", "delivered", "read")


def statuses_on_disk(d: SimDaemon, status: str) -> list[str]:
    """Ids of the messages with this status in the daemon's store (the daemon is dead)."""
    if d.store:
        with psycopg.connect(d.store["dsn"]) as pg:
            return [row[0] for row in pg.execute("SELECT id FROM whatsappd_messages WHERE status = %s ORDER BY n",
                                                 (status,))]
    db = sqlite3.connect(d.state_dir / "whatsappd.sqlite")
    try:
        return [row[0] for row in db.execute("SELECT id FROM messages WHERE status = ? ORDER BY n", (status,))]
    finally:
        db.close()


def journal(daemon: SimDaemon) -> list[dict[str, Any]]:
    """Every event the journal holds, read through the stream (backlog up to the newest seq)."""
    last = int(metric_value(daemon.client.get("/v1/metrics").body.decode(), "whatsappd_journal_last_seq") or 0)
    with EventReader(daemon.socket_path, "since=0") as reader:
        reader.wait_for(lambda line: line.get("seq") == last, timeout=30, what=f"seq {last}")
        return list(reader.events())


@pytest.mark.slow
@pytest.mark.parametrize("store_table", ["sqlite", "postgresql"], indirect=True)
def test_kill_9_midway_through_sending_1000_queued_messages_sends_each_exactly_once(daemons, store_table):
    """1,000 queued messages, kill -9 midway through sending: each is sent once, in order, status right."""
    d = daemons(sim_config("acme", workers=SLOW_BOOT), env={"WHATSAPPD_SIM_SEND_DELAY": SEND_DELAY}, store=store_table)
    d.start(timeout=30)
    d.pair("acme", timeout=30)
    assert d.simulate("acme", "drop").status == 200
    d.wait_state("acme", "reconnecting")
    session = d.session_dir("acme")

    # Queue them one by one, so the enqueue order is known; each with its own key, so a retried
    # request could never add a second message.
    ids: list[str] = []
    with ApiSession(d.socket_path) as api:
        for n in range(MESSAGES):
            response = api.post("/v1/companies/acme/messages", {"to": "+55 11 99999-0001", "text": f"m{n}"},
                                headers={"Idempotency-Key": f"crash-{n}"})
            assert response.status == 202, response.body
            assert response.json()["status"] == "queued"
            ids.append(response.json()["id"])
    assert len(set(ids)) == MESSAGES
    assert read_send_log(session) == []  # kept while disconnected: nothing went out

    assert d.simulate("acme", "restore").status == 200
    worker = d.worker_pid("acme")
    assert worker is not None
    wait_until(lambda: len(read_send_log(session)) >= MESSAGES // 2, timeout=60, interval=0.005,
               what="half of the messages to be sent")
    d.kill()  # SIGKILL; the worker follows through its parent-death signal
    sent_at_kill = len(read_send_log(session))
    wait_until(lambda: process_gone(worker), timeout=10, what="the worker to die with the daemon")
    assert MESSAGES // 4 < sent_at_kill < MESSAGES, f"the kill did not land midway ({sent_at_kill} sent)"
    in_flight = statuses_on_disk(d, "sending")
    assert len(in_flight) <= 1, f"one message at a time is sent, yet {in_flight} were in flight"
    in_flight_logged = [mid for mid in in_flight if mid in {r["outbox_id"] for r in read_send_log(session)}]

    d.start(timeout=30)
    d.wait_state("acme", "connected", timeout=30)
    with ApiSession(d.socket_path) as api:
        def settled() -> bool:
            last = api.get(f"/v1/companies/acme/messages/{ids[-1]}").json()
            return last["status"] not in ("queued", "sending")

        wait_until(settled, timeout=60, interval=0.1, what="the last message to be sent")
        messages = {}
        for mid in ids:
            response = api.get(f"/v1/companies/acme/messages/{mid}")
            assert response.status == 200, response.body
            messages[mid] = response.json()
    events = journal(d)
    assert d.stop() == 0

    # The "server's" view, read from disk with no worker running.
    log = read_send_log(session)
    stats = send_log_stats(session)
    logged = [record["outbox_id"] for record in log]
    assert stats.duplicate_requests == 0, "a message was asked to be sent twice"
    assert len(logged) == len(set(logged)), "a message was sent twice"
    assert set(logged) <= set(ids)
    interrupted = [mid for mid in ids if messages[mid]["status"] == "failed"]
    for mid in interrupted:
        assert messages[mid]["error"]["code"] == "send_interrupted", messages[mid]
    # Every message not reported failed was sent exactly once; a failed one at most once.
    assert set(ids) - set(interrupted) <= set(logged)
    assert len(interrupted) <= 1, f"more than the one in-flight message was interrupted: {interrupted}"
    # Per-company order: the log follows the enqueue order.
    assert logged == [mid for mid in ids if mid in set(logged)]

    by_outbox = {record["outbox_id"]: record for record in log}
    for mid in ids:
        message = messages[mid]
        if mid in interrupted:
            continue
        assert message["status"] in AFTER_SENT, message
        assert message["wa_id"] == by_outbox[mid]["wa_id"], message
        assert message["sent_at"] is not None and message["error"] is None, message

    # The journal tells the same story: each message's last status event is its status now, and
    # `sent` was announced once per message.
    last_status: dict[str, str] = {}
    sent_events: collections.Counter[str] = collections.Counter()
    for event in events:
        if event["type"] == "message.status" and event["message_id"] in messages:
            last_status[event["message_id"]] = event["status"]
            if event["status"] == "sent":
                sent_events[event["message_id"]] += 1
    assert {mid: s for mid, s in last_status.items() if s != messages[mid]["status"]} == {}
    assert set(last_status) == set(ids)
    assert all(sent_events[mid] == 1 for mid in ids if mid not in interrupted), \
        {mid: sent_events[mid] for mid in ids if sent_events[mid] != 1}
    for mid in in_flight:  # settled from the send log: recorded as sent, or requeued and sent once
        assert messages[mid]["status"] in AFTER_SENT or mid in interrupted
        assert messages[mid]["attempts"] == (1 if mid in in_flight_logged else 2), messages[mid]
    print(f"crash test: {sent_at_kill} sent at the kill; in flight {len(in_flight)} "
          f"(already in the send log: {len(in_flight_logged)}); send_interrupted {len(interrupted)}")
