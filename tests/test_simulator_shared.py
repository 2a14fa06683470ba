"""The simulator's "server" shared by several daemons (`[simulator] server_dir`): one device, one
send log and one connection log per company under server_dir/<company>/, and a second
connection of a company replacing the first, as WhatsApp does.

Engine-level tests run two engines (two session directories, as two daemons would have) on one
server directory in this process; the daemon tests run two real daemons (separate state dirs,
SQLite stores and sockets) on one server directory. What happened is read from the server's
files (whatsappd.testing.simserver), the witness that is not the daemons' own code.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from test_simulator import Sim

from whatsappd.protocol import ExitCode
from whatsappd.testing import simserver
from whatsappd.testing.events import wait_message
from whatsappd.testing.scenario import SimDaemon, sim_config
from whatsappd.worker.engine import EngineError
from whatsappd.worker.simulator.connections import CONNECTION_LOG_FILE, ConnectionLog, read_connections
from whatsappd.worker.simulator.server import SESSION_FILE, read_send_log

ALICE = "5511999990001@s.whatsapp.net"


@pytest.fixture
def server(tmp_path: Path) -> Path:
    return tmp_path / "server"


@pytest.fixture
def sims(tmp_path: Path, server: Path) -> Iterator[Callable[[str], Sim]]:
    """sims(host, env=None) -> a started engine of company acme on the shared server, with the
    session directory of daemon `host` (hosts/<host>/sessions/session-acme)."""
    made: list[Sim] = []

    def make(host: str, env: dict[str, str] | None = None) -> Sim:
        session = tmp_path / "hosts" / host / "sessions" / "session-acme"
        session.mkdir(mode=0o700, parents=True, exist_ok=True)
        sim = Sim(session, server_dir=server, env=env).start()
        made.append(sim)
        return sim

    yield make
    for sim in made:
        sim.stop()


def paired_on(sims: Callable[[str], Sim], host: str) -> Sim:
    sim = sims(host)
    sim.wait_for(lambda m: m["type"] == "qr")
    sim.simulate("scan")
    sim.wait_state("connected")
    return sim


def send(sim: Sim, outbox_id: str) -> dict[str, Any]:
    return sim.engine.command("send", {"outbox_id": outbox_id, "to": ALICE, "kind": "text", "text": "hi"})


# ------------------------------------------------------------------------------ engines


def test_the_device_lives_on_the_server_and_a_second_host_restores_it_without_pairing(sims, server, tmp_path):
    """Paired on host a, the device is in server_dir/acme (not a's session dir); host b connects with it, no QR."""
    a = paired_on(sims, "a")
    assert (server / "acme" / SESSION_FILE).exists()
    assert not (a.engine.options.session_dir / SESSION_FILE).exists()
    a.stop()
    b = sims("b")
    connected = b.wait_state("connected")
    assert "qr" not in b.types() and connected["jid"] == a.wait_state("connected")["jid"]


def test_a_second_connection_replaces_the_first_which_ends_replaced(sims, server):
    """Host b connecting makes host a's engine end REPLACED; the log shows a replaced by b, b live until it stops."""
    a = paired_on(sims, "a")
    b = sims("b")
    b.wait_state("connected")
    assert a.join() == ExitCode.REPLACED
    first, second = read_connections(server / "acme").values()
    assert first.host.endswith("/hosts/a") and second.host.endswith("/hosts/b")
    assert first.ended == "replaced" and first.by == second.conn and not first.live
    assert second.ended is None and second.live
    assert first.ended_mono is not None and first.mono <= first.ended_mono <= second.mono
    assert [r["event"] for r in _log(server)] == ["connect", "replaced", "connect"]
    b.stop()
    last = list(read_connections(server / "acme").values())[-1]
    assert (last.ended, last.reason, last.live) == ("disconnect", "stopped", False)


def test_a_replaced_connection_sends_nothing(sims, server):
    """A send on a connection another host has replaced fails not_connected and is not in the send log."""
    a = paired_on(sims, "a")
    ConnectionLog(server / "acme", "intruder").connect()  # another host's connection, recorded first
    with pytest.raises(EngineError) as caught:
        send(a, "msg_late")
    assert caught.value.code == "not_connected"
    assert a.join() == ExitCode.REPLACED
    assert read_send_log(server / "acme") == []


def test_an_outbox_id_is_sent_once_whichever_host_sends_it(sims, server):
    """msg_1 sent by host a after host b read the send log: asked of b, nothing is sent, a's wa_id answers, one duplicate."""
    a = paired_on(sims, "a")
    b = sims("b", env={"WHATSAPPD_SIM_CONNECT_DELAY": "0.5"})  # b has read the send log and is connecting
    b.wait_state("connecting")
    first = send(a, "msg_1")
    b.wait_state("connected")
    again = send(b, "msg_1")
    assert again == first
    assert b.engine.command("send_status", {"outbox_ids": ["msg_1"]})["statuses"]["msg_1"]["state"] == "sent"
    stats = simserver.send_stats(server)["acme"]
    assert (stats.sent, stats.duplicate_requests) == (1, 1)


def test_a_dead_workers_connection_counts_as_disconnected(server):
    """A connection whose worker process is gone is not live; the next connect marks it gone, not replaced."""
    (server / "acme").mkdir(parents=True)
    child = subprocess.run([sys.executable, "-c",
                            "import sys; from pathlib import Path; "
                            "from whatsappd.worker.simulator.connections import ConnectionLog; "
                            f"ConnectionLog(Path({str(server / 'acme')!r}), 'dead').connect()"], check=True)
    assert child.returncode == 0
    assert simserver.live(server) == {"acme": []}
    ours = ConnectionLog(server / "acme", "alive")
    ours.connect()
    dead, alive = read_connections(server / "acme").values()
    assert dead.ended == "disconnect" and dead.reason == "gone"
    assert simserver.live(server) == {"acme": [("alive", alive.pid)]}


def _log(server: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (server / "acme" / CONNECTION_LOG_FILE).read_text().splitlines()]


# ------------------------------------------------------------------------------ daemons


def shared(make: Callable[..., SimDaemon], server: Path) -> SimDaemon:
    return make(sim_config("acme", simulator={"server_dir": str(server)}))


def test_two_daemons_share_the_device_and_the_second_connection_replaces_the_first(daemons, server):
    """Paired on daemon A, company acme restores on daemon B without a QR; A then reports `replaced`."""
    a = shared(daemons, server)
    a.start(timeout=30)
    jid = a.pair("acme", timeout=30)["jid"]
    assert [p.name for p in a.session_dir("acme").iterdir()] == ["whatsappd.lock"]  # all else is the server's
    a_pid = a.worker_pid("acme")

    b = shared(daemons, server)
    b.start(timeout=30)
    snap = b.wait_state("acme", "connected", timeout=30)
    assert snap["jid"] == jid and snap["has_session"] is True and not b.log_lines("qr", company="acme")
    replaced = a.wait_state("acme", "replaced", timeout=10)
    assert replaced["last_error"]["code"] == "replaced"
    first, second = simserver.connections(server)["acme"]
    assert (first.host, first.pid, first.ended, first.by) == (str(a.state_dir), a_pid, "replaced", second.conn)
    assert simserver.live(server) == {"acme": [(str(b.state_dir), b.worker_pid("acme"))]}
    assert a.stop() == 0 and b.stop() == 0


def test_a_frozen_daemons_worker_notices_its_replacement_when_resumed(daemons, server):
    """Daemon A and its worker SIGSTOPped: B still connects (the session lock is not shared); resumed, A reports `replaced`."""
    a = shared(daemons, server)
    a.start(timeout=30)
    a.pair("acme", timeout=30)
    a_worker = a.worker_pid("acme")
    assert a_worker is not None
    frozen = (a.pid, a_worker)
    for pid in frozen:
        os.kill(pid, signal.SIGSTOP)
    try:
        b = shared(daemons, server)
        b.start(timeout=30)
        b.wait_state("acme", "connected", timeout=30)
        assert simserver.live(server) == {"acme": [(str(b.state_dir), b.worker_pid("acme"))]}
    finally:
        for pid in frozen:
            os.kill(pid, signal.SIGCONT)
    a.wait_state("acme", "replaced", timeout=10)
    assert [c.ended for c in simserver.connections(server)["acme"]] == ["replaced", None]
    [(older, newer)] = simserver.replacements(server)["acme"]
    assert (older.host, older.pid, newer.host) == (str(a.state_dir), a_worker, str(b.state_dir))
    assert b.snapshot("acme")["state"] == "connected"
    assert a.stop() == 0 and b.stop() == 0


def test_a_message_sent_by_one_daemon_is_not_sent_again_by_another(daemons, server, tmp_path):
    """A message both daemons' stores hold queued is sent by A; B then sends nothing (a duplicate is noted) and gets A's wa_id."""
    a = shared(daemons, server)
    a.start(timeout=30)
    a.pair("acme", timeout=30)
    assert a.simulate("acme", "drop").status == 200  # A's network is down: nothing is sent
    a.wait_state("acme", "reconnecting")
    response = a.client.post("/v1/companies/acme/messages", {"to": "+55 11 99999-0001", "text": "once"})
    assert response.status == 202, response.body
    message_id = response.json()["id"]
    assert wait_message(a.socket_path, "acme", message_id, "queued")["attempts"] == 0
    b = shared(daemons, server)
    b.state_dir.mkdir(parents=True)
    with sqlite3.connect(a.state_dir / "whatsappd.sqlite") as src, \
            sqlite3.connect(b.state_dir / "whatsappd.sqlite") as dst:
        src.backup(dst)  # B's store also holds the message, queued (a store that missed A's send)

    assert a.simulate("acme", "restore").status == 200
    sent_by_a = wait_message(a.socket_path, "acme", message_id, "sent", timeout=30)
    b.start(timeout=30)
    sent_by_b = wait_message(b.socket_path, "acme", message_id, "sent", timeout=30)
    assert sent_by_b["wa_id"] == sent_by_a["wa_id"]
    assert [r["outbox_id"] for r in read_send_log(server / "acme")] == [message_id]
    stats = simserver.send_stats(server)["acme"]
    assert (stats.sent, stats.duplicate_requests) == (1, 1)
    assert a.wait_state("acme", "replaced", timeout=10)
    assert a.stop() == 0 and b.stop() == 0


def test_a_local_logout_wipes_the_shared_device_and_an_unusable_one_is_moved_aside(daemons, server):
    """Logout while not connected removes server_dir/acme's device (not paired any more); a corrupt device is quarantined there."""
    d = shared(daemons, server)
    d.start(timeout=30)
    d.pair("acme", timeout=30)
    assert d.simulate("acme", "drop").status == 200
    d.wait_state("acme", "reconnecting")
    response = d.post("acme", "logout")
    assert response.status == 200 and response.json()["wiped"] is True, response.body
    assert not (server / "acme" / SESSION_FILE).exists() and d.snapshot("acme")["has_session"] is False

    (server / "acme" / SESSION_FILE).write_text("{not json")
    assert d.post("acme", "connect").status == 202
    failed = d.wait_state("acme", "failed", timeout=30)
    assert failed["last_error"]["code"] == "store_unusable"
    assert not (server / "acme" / SESSION_FILE).exists()
    assert [p.read_text() for p in (server / "acme").glob(f"{SESSION_FILE}.quarantine-*")] == ["{not json"]
    assert d.stop() == 0
