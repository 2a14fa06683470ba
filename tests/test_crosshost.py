"""The API on every host: two real daemons on one real PostgreSQL database (issue 13).

Host A runs company acme (and the runtime companies the tests add); host B runs none of them.
Without [cluster] leases, "the owner" of a company is the host that runs it. Everything B says
about A's companies comes through the database: the journal tail and its LISTEN connection,
the company status table, the routed-acts table and the outbox's wake-up.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from whatsappd.cluster.hosts import ROUTE_TIMEOUT
from whatsappd.cluster.tail import listener_name
from whatsappd.testing.daemon import wait_until
from whatsappd.testing.events import EventReader
from whatsappd.testing.scenario import SimDaemon, daemon_pool, sim_config
from whatsappd.testing.webhooks import Receiver
from whatsappd.webhooks.spec import SEQ_HEADER
from whatsappd.worker.simulator import server


class Hosts:
    def __init__(self, a: SimDaemon, b: SimDaemon, dsn: str) -> None:
        self.a, self.b, self.dsn = a, b, dsn

    def sql(self, query: str, *args: Any) -> list[tuple[Any, ...]]:
        with psycopg.connect(self.dsn, autocommit=True) as db:
            return db.execute(query, args).fetchall()


@pytest.fixture(scope="module")
def hosts(tmp_path_factory: pytest.TempPathFactory,
          store_tables: Callable[[str], dict[str, str]]) -> Iterator[Hosts]:
    """Hosts A (running acme, connected) and B (running nothing) on one PostgreSQL database."""
    store = store_tables("postgresql")
    with daemon_pool(tmp_path_factory.mktemp("crosshost")) as make:
        a = make(sim_config("acme", cluster={"host_id": "host-a"}, workers={"heartbeat_timeout": "10s"}),
                 store=store)
        b = make(sim_config(cluster={"host_id": "host-b"}), store=store)
        a.start(timeout=30)
        b.start(timeout=30)
        a.pair("acme", timeout=30)
        yield Hosts(a, b, store["dsn"])
        assert b.stop() == 0
        assert a.stop() == 0


def lines_of(live: EventReader, predicate: Callable[[dict[str, Any]], bool], n: int,
             timeout: float = 20.0) -> list[dict[str, Any]]:
    """The first n events read for which predicate holds (waiting for them)."""
    try:
        wait_until(lambda: len([e for e in live.events() if predicate(e)]) >= n, timeout, what=f"{n} events")
    except TimeoutError:
        raise TimeoutError(f"{len([e for e in live.events() if predicate(e)])} of {n}; read {live.lines[-5:]}") from None
    return [e for e in live.events() if predicate(e)][:n]


def add_company(hosts: Hosts, company: str) -> None:
    """A runtime simulator company on host A, known to B once A wrote its status."""
    assert hosts.a.client.request("PUT", f"/v1/companies/{company}", {"engine": "simulator"}).status == 201
    wait_until(lambda: company in hosts.b.companies(), 10, what=f"B to know {company}")


def test_an_event_written_on_one_host_reaches_anothers_live_stream_and_resumes_by_seq(hosts):
    """An incoming message on A's company shows on B's live stream, then again when B resumes by seq."""
    with EventReader(hosts.b.socket_path, "company=acme&type=message.incoming") as live:
        assert live.status == 200, live.error
        sent = hosts.a.simulate("acme", "incoming", text="across hosts").json()
        event = live.wait_for(lambda line: line.get("id") == sent["id"], timeout=10)
    assert event["text"] == "across hosts" and event["company"] == "acme"
    with EventReader(hosts.b.socket_path, f"since={event['seq'] - 1}&company=acme") as resumed:
        assert resumed.wait_count(1)[0] == {k: v for k, v in event.items()}


def test_a_cursor_just_read_on_one_host_is_accepted_on_another(hosts):
    """A seq fresh from A's stream resumes on B at once (B waits briefly for its tail), never cursor_ahead."""
    with EventReader(hosts.a.socket_path, "company=acme&type=message.incoming") as on_a:
        sent = hosts.a.simulate("acme", "incoming", text="fresh cursor").json()
        seq = on_a.wait_for(lambda line: line.get("id") == sent["id"], timeout=10)["seq"]
        with EventReader(hosts.b.socket_path, f"since={seq}&company=acme") as on_b:
            assert on_b.status == 200, on_b.error


def test_events_of_both_hosts_reach_a_stream_in_seq_order_once_each(hosts):
    """B's stream carries A's events and B's own (a queued message) in seq order, without gaps or repeats."""
    with EventReader(hosts.b.socket_path, "") as live:
        first = hosts.a.simulate("acme", "burst", count=200, text="mixed").json()
        for n in range(20):  # B's own commits (its enqueues) interleave with A's burst
            assert hosts.b.client.post("/v1/companies/acme/messages", {"to": "+5511999990000", "text": f"m{n}"}).status == 202
        assert first
        lines = lines_of(live, lambda line: str(line.get("text")).startswith("mixed "), 200)
        seqs = live.seqs()
    assert lines and seqs == list(range(seqs[0], seqs[0] + len(seqs)))


def test_a_qr_code_reaches_another_hosts_live_stream_and_never_a_journal_row(hosts):
    """A's pairing QR code reaches B's live stream through NOTIFY; the journal row holds no code."""
    add_company(hosts, "qr-far")
    with EventReader(hosts.b.socket_path, "company=qr-far&type=company.pairing") as live:
        hosts.a.connect_pairing("qr-far")
        event = live.wait_for(lambda line: line.get("type") == "company.pairing", timeout=10)
    code = hosts.a.client.get("/v1/companies/qr-far/qr").json()["code"]
    assert event["code"] == code
    rows = hosts.sql("SELECT data::text FROM whatsappd_events WHERE seq = %s", event["seq"])
    assert rows and "expires_at" in rows[0][0] and code.split(",")[0] not in rows[0][0]


def test_a_message_posted_on_another_host_is_sent_by_the_owner_promptly(hosts):
    """A message POSTed to B for A's company is sent by A at once (the outbox NOTIFY wakes A's sender)."""
    started = time.monotonic()
    response = hosts.b.client.post("/v1/companies/acme/messages?wait=sent&timeout=10",
                                   {"to": "+5511988887777", "text": "from B"})
    assert response.status == 202 and response.json()["status"] == "sent", response.body
    assert time.monotonic() - started < 10
    on_a = hosts.a.client.get(f"/v1/companies/acme/messages/{response.json()['id']}").json()
    assert on_a["status"] == "sent" and on_a["wa_id"]


def test_acts_posted_on_another_host_are_run_by_the_owner_and_answered_with_its_answer(hosts):
    """connect, pair-code, logout, sending/resume and DELETE asked on B run on A; B answers with A's status and body."""
    add_company(hosts, "acts")
    connected = hosts.b.post("acts", "connect")
    assert connected.status == 202, connected.body
    assert connected.json()["state"] == "pairing" and connected.json()["worker"]["pid"] == hosts.a.worker_pid("acts")
    code = hosts.b.post("acts", "pair-code", {"phone": "+55 11 98888-7777"})
    assert code.status == 200 and code.json()["code"], code.body
    bad = hosts.b.post("acts", "pair-code", {"phone": "12"})  # refused on B, before anything is routed
    assert bad.status == 400 and bad.json()["error"]["code"] == "invalid_phone"
    out = hosts.b.post("acts", "logout")
    assert out.status == 200, out.body
    assert hosts.a.snapshot("acts")["state"] == "logged_out"
    refused = hosts.b.post("acts", "pair-code", {"phone": "+55 11 98888-7777"})  # A's refusal, A's code
    assert refused.status == 409 and refused.json()["error"]["code"] == "not_pairing"
    resumed = hosts.b.post("acme", "sending/resume")
    assert resumed.status == 200 and resumed.json()["resumed"] is False and resumed.json()["company"] == "acme"
    deleted = hosts.b.client.request("DELETE", "/v1/companies/acts")  # a runtime company: A removes it
    assert deleted.status == 200 and deleted.json()["removed"] is True, deleted.body
    assert "acts" not in {c["id"] for c in hosts.a.client.get("/v1/companies").json()["companies"]}
    wait_until(lambda: "acts" not in hosts.b.companies(), 10, what="acts gone on B")
    assert hosts.sql("SELECT count(*) FROM whatsappd_commands") == [(0,)]


def test_get_on_another_host_names_the_owner_and_shows_its_state(hosts):
    """GET /v1/companies/acme on B says host-a owns it and shows A's state, jid and since, reported by host-a."""
    on_a = hosts.a.client.get("/v1/companies/acme").json()
    on_b = hosts.b.client.get("/v1/companies/acme")
    assert on_b.status == 200
    body = on_b.json()
    assert body["owner"]["host"] == "host-a" and on_a["owner"]["host"] == "host-a"
    assert (body["state"], body["jid"], body["since"]) == (on_a["state"], on_a["jid"], on_a["since"]) == (
        "connected", on_a["jid"], on_a["since"])
    assert body["reported"]["host"] == "host-a" and body["reported"]["at"]
    assert "acme" in hosts.b.companies()
    missing = hosts.b.client.get("/v1/companies/nowhere")
    assert missing.status == 404 and missing.json()["error"]["code"] == "company_not_found"


def test_a_killed_listen_connection_loses_no_event(hosts):
    """B's LISTEN connection terminated (pg_terminate_backend) while A writes: B's stream still gets every event."""
    with EventReader(hosts.b.socket_path, "company=acme&type=message.incoming") as live:
        name = listener_name("host-b")
        assert wait_until(lambda: hosts.sql("SELECT count(*) FROM pg_stat_activity WHERE application_name = %s",
                                            name)[0][0] == 1, 10)
        hosts.a.simulate("acme", "burst", count=100, text="before")
        hosts.sql("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = %s", name)
        hosts.a.simulate("acme", "burst", count=100, text="while away")
        got = lines_of(live, lambda line: str(line.get("text")).startswith(("before ", "while away ")), 200)
    assert len(got) == 200
    seqs = [line["seq"] for line in got]
    assert seqs == sorted(set(seqs))
    assert wait_until(lambda: hosts.b.log_lines("LISTEN connection made again; catching up from the journal"), 10)


def test_an_owner_that_does_not_answer_is_504_and_the_withdrawn_act_never_runs(hosts):
    """A frozen owner (SIGSTOP): B answers 504 owner_unreachable after ROUTE_TIMEOUT; thawed, A never runs that act."""
    add_company(hosts, "frozen")
    os.kill(hosts.a.pid, signal.SIGSTOP)
    try:
        started = time.monotonic()
        late = hosts.b.post("frozen", "connect")
        waited = time.monotonic() - started
    finally:
        os.kill(hosts.a.pid, signal.SIGCONT)
    assert late.status == 504 and late.json()["error"]["code"] == "owner_unreachable", late.body
    assert "never took the request" in late.json()["error"]["message"] and waited >= ROUTE_TIMEOUT
    assert hosts.sql("SELECT count(*) FROM whatsappd_commands") == [(0,)]
    time.sleep(1.0)  # A, thawed, hears the old notification: the row is gone, nothing runs
    assert hosts.a.snapshot("frozen")["state"] == "stopped"


# ------------------------------------------------------------------------- [cluster] mode

SECRET = "crosshost-webhook-secret-0123456789"


@pytest.fixture
def leased(pg_dsn: str, tmp_path: Path) -> Iterator[tuple[dict[str, SimDaemon], Receiver, str]]:
    """[cluster] hosts h1 and h2, two companies each at most (max_companies = 2), four companies on a
    shared simulator server (k1-k3 paired; idle never paired, so it stays stopped), and one webhook
    for every event."""
    server_dir = tmp_path / "server"
    (server_dir / "idle").mkdir(mode=0o700, parents=True)
    for n, company in enumerate(("k1", "k2", "k3")):
        (server_dir / company).mkdir(mode=0o700, parents=True)
        server.write_store(server_dir / company, server.SimulatorDevice(jid=f"55119{n:08d}:1@s.whatsapp.net",
                                                                        push_name=company))
    receiver = Receiver(SECRET, unix=tmp_path / "hook.sock")
    with daemon_pool(tmp_path) as make:
        daemons = {}
        for host in ("h1", "h2"):
            config = sim_config("k1", "k2", "k3", "idle", cluster={
                "enabled": True, "host_id": host, "lease_ttl": "3s", "renew_interval": "500ms", "fence_margin": "1s",
                "max_companies": 2}, simulator={"server_dir": str(server_dir)})
            config += f'[[webhooks]]\nid = "all"\nurl = "{receiver.url}"\nsecret = "{SECRET}"\n'
            daemons[host] = make(config, store={"backend": "postgresql", "dsn": pg_dsn})
        for daemon in daemons.values():
            daemon.start(timeout=30)
        try:
            yield daemons, receiver, pg_dsn
        finally:
            receiver.close()


def leases(dsn: str) -> dict[str, tuple[str | None, int, bool]]:
    with psycopg.connect(dsn, autocommit=True) as db:
        rows = db.execute("SELECT company, owner, token, expires_at > now() FROM whatsappd_company_leases").fetchall()
    return {c: (o, int(t), bool(live)) for c, o, t, live in rows}


def connected_on(daemon: SimDaemon, company: str) -> dict[str, Any]:
    """GET /v1/companies/{company} on daemon, once it shows the company connected."""
    def body() -> dict[str, Any] | None:
        got: dict[str, Any] = daemon.client.get(f"/v1/companies/{company}").json()
        return got if got.get("state") == "connected" else None

    found: dict[str, Any] = wait_until(body, 20, what=f"{company} connected, seen from {daemon.root.name}")
    return found


def all_leased(dsn: str) -> dict[str, tuple[str | None, int, bool]]:
    """The lease table once the four configured companies are held."""
    held: dict[str, tuple[str | None, int, bool]] = wait_until(
        lambda: (lambda now: now if sum(live for _, _, live in now.values()) == 4 else None)(leases(dsn)),
        20, what="four companies leased")
    return held


def test_in_a_cluster_get_names_the_lease_holder_acts_go_to_it_and_an_unowned_company_is_503(leased):
    """[cluster] GET on the other host names the lease holder, token, expiry and its state (a stopped company
    too); an act goes to the holder; a company no host has room for: 503 no_owner."""
    daemons, _, dsn = leased
    for company, (owner, token, _) in all_leased(dsn).items():
        other = daemons["h2" if owner == "h1" else "h1"]
        if company == "idle":  # acquired without any event: its owner still says so
            seen = wait_until(lambda o=other: o.client.get("/v1/companies/idle").json().get("state"), 10)
            body = other.client.get("/v1/companies/idle").json()
            assert (seen, body["owner"]["host"], body["owner"]["token"]) == ("stopped", owner, token), body
            continue
        seen = connected_on(other, company)
        assert seen["owner"]["host"] == owner and seen["owner"]["token"] == token and seen["owner"]["lease_expires_at"]
        restarted = other.post(company, "restart")
        assert restarted.status == 202 and restarted.json()["id"] == company, restarted.body
    assert daemons["h1"].client.request("PUT", "/v1/companies/spare", {"engine": "simulator"}).status == 201
    wait_until(lambda: "spare" in leases(dsn), 10, what="spare registered")
    refused = daemons["h2"].post("spare", "connect")
    assert refused.status == 503 and refused.json()["error"]["code"] == "no_owner", refused.body


def test_in_a_cluster_one_host_delivers_the_webhooks(leased):
    """[cluster] Events of companies on both hosts reach the webhook once each: only one host delivers."""
    daemons, receiver, dsn = leased
    owned = all_leased(dsn)
    for company, (owner, _, live) in owned.items():
        if live and company != "idle":
            daemons[str(owner)].wait_state(company, "connected", timeout=20)
            assert daemons[str(owner)].simulate(company, "burst", count=20, text=f"hook {company}").status == 200
    receiver.wait_accepted(lambda got: sum(str(d.event.get("text", "")).startswith("hook ") for d in got) >= 60, 20)
    time.sleep(1.0)  # a second host delivering would have sent its copies by now
    seqs = [d.headers[SEQ_HEADER] for d in receiver.accepted()]
    assert len(seqs) == len(set(seqs)), "an event was delivered twice"
