"""Several daemons on one PostgreSQL ([cluster] enabled): each company runs on one host, a dead host's
companies move, a frozen host's workers die by their dead-man switch, stale tokens write nothing.

Real daemons as subprocesses (whatsappd.testing.daemon) sharing the `postgres` fixture's database and
one simulator "server" (`[simulator] server_dir`: one paired device, send log and connection log per
company, whichever host connects), short leases (ttl 3 s, renew 0.5 s, margin 1 s).
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from whatsappd.cluster.fence import StaleLease
from whatsappd.cluster.leases import Leases
from whatsappd.protocol import ExitCode
from whatsappd.store import MessageStatus, OutgoingMessage
from whatsappd.store.postgresql import PostgresStore, migrate
from whatsappd.supervisor.process import Deadlines, WorkerProcess, WorkerSpec, start_worker
from whatsappd.testing import simserver
from whatsappd.testing.daemon import DaemonProcess, wait_until
from whatsappd.testing.metrics import metric_value
from whatsappd.worker.simulator import server

COMPANIES = [f"c{n}" for n in range(1, 7)]
TTL, RENEW, MARGIN = 3.0, 0.5, 1.0
#: Scheduling slack for liveness bounds on a loaded 2-core machine (safety checks have none).
SLACK = 2.0


class Cluster:
    """Daemons h1, h2... on one database; each killed (by process group) at the end."""

    def __init__(self, dsn: str, root: Path) -> None:
        self.dsn, self.root = dsn, root
        self.server = root / "server"
        self.daemons: dict[str, DaemonProcess] = {}
        for n, company in enumerate(COMPANIES):  # paired once, on the shared server
            directory = self.server / company
            directory.mkdir(mode=0o700, parents=True)
            server.write_store(directory, server.SimulatorDevice(jid=f"55119{n:08d}:1@s.whatsapp.net", push_name=company))

    def add(self, host: str, env: dict[str, str] | None = None) -> DaemonProcess:
        companies = "".join(f'[[companies]]\nid = "{c}"\nengine = "simulator"\n' for c in COMPANIES)
        config = (f'[store]\nbackend = "postgresql"\ndsn = "{self.dsn}"\n'
                  f'[cluster]\nenabled = true\nhost_id = "{host}"\nlease_ttl = "{TTL}s"\n'
                  f'renew_interval = "{int(RENEW * 1000)}ms"\nfence_margin = "{MARGIN}s"\n'
                  f'[simulator]\nserver_dir = "{self.server}"\n[reconnect]\ninitial_delay = "100ms"\n' + companies)
        daemon = DaemonProcess(self.root / host, config, env=env, start_new_session=True)
        self.daemons[host] = daemon
        return daemon

    def start(self) -> None:
        for daemon in self.daemons.values():
            daemon.start(wait=False)
        for daemon in self.daemons.values():
            daemon.wait_ready(30)

    def leases(self) -> dict[str, tuple[str | None, int, bool]]:
        """company -> (owner, token, live) from the lease table."""
        with psycopg.connect(self.dsn, autocommit=True) as db:
            rows = db.execute("SELECT company, owner, token, expires_at > now() FROM whatsappd_company_leases").fetchall()
        return {c: (o, int(t), bool(live)) for c, o, t, live in rows}

    def running(self, hosts: list[str] | None = None) -> dict[str, list[str]]:
        """company -> hosts whose API shows it connected with a worker."""
        out: dict[str, list[str]] = {c: [] for c in COMPANIES}
        for host in hosts or list(self.daemons):
            for company in self.daemons[host].client.get("/v1/companies").json()["companies"]:
                # Every host lists every company; the owner's own entry is the one whose worker is its.
                mine = (company.get("owner") or {}).get("host") == host
                if mine and (company.get("worker") or {}).get("pid") is not None and company["state"] == "connected":
                    out[company["id"]].append(host)
        return out

    def double_owners(self) -> dict[str, list[tuple[str, int]]]:
        """Companies the shared server sees connected more than once right now (never, if fencing works)."""
        return {c: conns for c, conns in simserver.live(self.server).items() if len(conns) > 1}

    def kill_all(self) -> None:
        for daemon in self.daemons.values():
            if daemon.proc is not None and daemon.proc.poll() is None:
                os.kill(daemon.pid, signal.SIGCONT)
                os.killpg(daemon.pid, signal.SIGKILL)
                daemon.proc.wait()


@pytest.fixture
def cluster(pg_dsn: str, tmp_path: Path) -> Iterator[Cluster]:
    made = Cluster(pg_dsn, tmp_path)
    try:
        yield made
    finally:
        made.kill_all()


def _spread(cluster: Cluster, hosts: list[str]) -> dict[str, str]:
    """Wait until every company runs on exactly one of hosts, as its live lease says: company -> host."""
    def settled() -> dict[str, str] | None:
        leases, running = cluster.leases(), cluster.running(hosts)
        if all(len(running[c]) == 1 and leases[c][2] and leases[c][0] == running[c][0] for c in COMPANIES):
            return {c: running[c][0] for c in COMPANIES}
        return None

    found: dict[str, str] = wait_until(settled, 30, interval=0.2, what="every company running on one host")
    return found


def _alive(pid: int) -> bool:
    """The process exists and is not a zombie."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, IndexError):
        return False


def test_kill_9_of_a_host_moves_its_companies_with_higher_tokens_and_its_claims_end_send_interrupted(
        cluster: Cluster) -> None:
    """Three daemons spread six companies (none on two); kill -9 of one's process group: each of its companies
    runs on another host with a higher token within 30 s, and its message left `sending` ends send_interrupted,
    never sent by the new owner."""
    cluster.add("h1")
    cluster.add("h2")
    cluster.add("h3", env={"WHATSAPPD_SIM_SEND_DELAY": "60"})  # its sends hang: killed mid-send
    cluster.start()
    owners = _spread(cluster, ["h1", "h2", "h3"])
    victim = cluster.daemons["h3"]
    mine = sorted(c for c, h in owners.items() if h == "h3")
    assert mine, owners
    before = cluster.leases()
    sent = victim.client.post(f"/v1/companies/{mine[0]}/messages", body={"to": "+5511999999999", "text": "hi"})
    assert sent.status == 202, sent.json()
    message_id = sent.json()["id"]
    wait_until(lambda: victim.client.get(f"/v1/companies/{mine[0]}/messages/{message_id}").json()["status"] == "sending",
               10, what="the message claimed by h3")

    killed_at = time.monotonic()
    os.killpg(victim.pid, signal.SIGKILL)
    assert victim.proc is not None
    victim.proc.wait()

    def moved() -> dict[str, list[str]] | None:
        running, leases = cluster.running(["h1", "h2"]), cluster.leases()
        ok = all(len(running[c]) == 1 and leases[c][0] == running[c][0] and leases[c][1] > before[c][1] for c in mine)
        return running if ok else None

    running = wait_until(moved, 30, interval=0.2, what="h3's companies running elsewhere with higher tokens")
    took = time.monotonic() - killed_at
    assert took < 30, took
    assert all(len(hosts) <= 1 for hosts in cluster.running(["h1", "h2"]).values())
    new_owner = cluster.daemons[running[mine[0]][0]]

    def settled() -> dict[str, Any] | None:
        message: dict[str, Any] = new_owner.client.get(f"/v1/companies/{mine[0]}/messages/{message_id}").json()
        return message if message["status"] != "sending" else None

    message = wait_until(settled, 15, interval=0.2, what="the dead owner's claim settled")
    assert message["status"] == "failed" and message["error"]["code"] == "send_interrupted", message
    assert all(record["outbox_id"] != message_id for record in server.read_send_log(cluster.server / mine[0]))
    assert all(stats.duplicate_requests == 0 for stats in simserver.send_stats(cluster.server).values())
    assert cluster.double_owners() == {}


def test_a_frozen_host_loses_its_workers_before_another_host_takes_over_and_writes_nothing_after(
        cluster: Cluster) -> None:
    """SIGSTOP of a daemon process alone: its workers end by their dead-man switch before another host owns
    their company; after SIGCONT it fences itself, and its stale writes (company events) are refused and
    counted (metrics)."""
    cluster.add("h1")
    cluster.add("h2")
    cluster.start()
    owners = _spread(cluster, ["h1", "h2"])
    frozen = cluster.daemons["h1"]
    mine = sorted(c for c, h in owners.items() if h == "h1")
    pids = {c["id"]: c["worker"]["pid"] for c in frozen.client.get("/v1/companies").json()["companies"] if c["id"] in mine}
    assert all(pids.values()), pids

    os.kill(frozen.pid, signal.SIGSTOP)
    stopped_at = time.monotonic()
    died_at: dict[str, float] = {}
    deadline = stopped_at + TTL * 2 + 10
    while time.monotonic() < deadline and not all(cluster.leases()[c][0] == "h2" and cluster.leases()[c][2]
                                                  for c in mine):
        leases = cluster.leases()
        for company in mine:
            if company not in died_at and not _alive(pids[company]):
                died_at[company] = time.monotonic()
            # The safety property: never a live worker on h1 while h2 holds the company's lease.
            assert not (leases[company][0] == "h2" and _alive(pids[company])), (company, leases[company])
        assert cluster.double_owners() == {}
        time.sleep(0.05)
    assert set(died_at) == set(mine), (died_at, mine)
    assert all(died_at[c] - stopped_at < TTL - MARGIN + SLACK for c in mine), died_at
    wait_until(lambda: all(h == ["h2"] for h in cluster.running(["h2"]).values()), 20, interval=0.2,
               what="h2 running every company")

    os.kill(frozen.pid, signal.SIGCONT)
    frozen.wait_ready()
    wait_until(lambda: any(e.get("event") == "journal event dropped: stale lease" for e in frozen.log_events()), 10,
               what="h1's stale company events refused")
    lost = [e for e in frozen.log_events() if e.get("event") == "lease lost"]
    assert {e["company"] for e in lost} >= set(mine) and {e["reason"] for e in lost} <= {"deadline", "taken"}, lost
    with psycopg.connect(cluster.dsn, autocommit=True) as db:
        reasons = [r[0] for r in db.execute("SELECT data->>'reason' FROM whatsappd_events WHERE type = 'company.state'")]
    assert not any(str(r).startswith("lease lost") for r in reasons), reasons  # h1's own events, refused
    assert all(h == ["h2"] for h in cluster.running(["h1", "h2"]).values())
    assert cluster.double_owners() == {}
    frozen_metrics, h2_metrics = (cluster.daemons[h].client.get("/v1/metrics").body.decode() for h in ("h1", "h2"))
    assert (metric_value(frozen_metrics, "whatsappd_cluster_stale_writes_refused_total") or 0) >= 1
    losses = sum(metric_value(frozen_metrics, "whatsappd_cluster_leases_lost_total", reason=r) or 0
                 for r in ("deadline", "taken"))
    assert losses >= len(mine)
    assert metric_value(frozen_metrics, "whatsappd_cluster_leases_held") == 0
    assert metric_value(h2_metrics, "whatsappd_cluster_leases_held") == len(COMPANIES)


def test_a_claim_or_settle_with_a_stale_token_is_refused_by_the_store(pg_dsn: str) -> None:
    """Against real PostgreSQL: a claim records its token; once another host took the lease, the old token's
    settle, claim and ttl sweep of `sending` are refused and change nothing, and its company events are
    dropped, others kept."""
    migrate(pg_dsn)
    first, second = Leases(pg_dsn, "h1", 0.3, 10), Leases(pg_dsn, "h2", 30, 10)
    first.add_companies(["acme", "other"])
    held = first.acquire(2)
    tokens: dict[str, int | None] = dict(held)

    async def scenario() -> None:
        store = PostgresStore(pg_dsn)
        store.open()
        store.tokens = tokens.get
        try:
            created = [(await store.enqueue(OutgoingMessage("acme", "5511999999999@s.whatsapp.net", "+5511999999999",
                                                             "text", {"text": f"m{n}"}, None, 60, None, {"n": n}),
                                             60))[1] for n in range(2)]
            claimed = await store.set_status(created[0]["id"], MessageStatus.SENDING)
            assert claimed is not None
            with psycopg.connect(pg_dsn, autocommit=True) as db:
                row = db.execute("SELECT claim FROM whatsappd_messages WHERE id = %s", (created[0]["id"],)).fetchone()
            assert row == (held["acme"],)
            await asyncio.sleep(0.4)  # h1's 0.3 s leases expire; h2 takes acme
            taken = second.acquire(1)
            assert list(taken) == ["acme"] and taken["acme"] > held["acme"]
            with pytest.raises(StaleLease):
                await store.set_status(created[0]["id"], MessageStatus.SENT, wa_id="3EB0AA")
            with pytest.raises(StaleLease):
                await store.set_status(created[1]["id"], MessageStatus.SENDING)
            assert store.stale_refusals == 2
            assert await store.fail_stale_sending(time.time() + 3600, frozenset()) == []  # h2's to settle now
            tokens["acme"] = None  # this host learns it lost acme: not even looked at any more
            assert await store.fail_stale_sending(time.time() + 3600, frozenset()) == []
            assert store.stale_refusals == 3
            tokens["other"] = None  # not held here at all
            store.append("acme", "company.state", {"new": "connected", "reason": "stale"})
            store.append(None, "daemon.note", {"reason": "kept"})
            await store.flush()
            now = [await store.message("acme", m["id"]) for m in created]
            assert [m["status"] if m else None for m in now] == ["sending", "queued"]
            events = await store.events_after(0, 100)
            assert [e.type for e in events if e.type != "message.status"] == ["daemon.note"]
            assert store.stale_refusals == 4
        finally:
            await store.close()
            first.close()
            second.close()

    asyncio.run(scenario())


def test_companies_follow_the_registry_on_every_host_acts_run_on_the_owner_and_a_stop_survives_failover(
        cluster: Cluster) -> None:
    """A company added or removed on one host (API or reload) follows on the other, lease row included; an act
    on a company another host owns is run by that owner; an operator's stop outlives a kill -9 of the owner."""
    cluster.add("h1")
    cluster.add("h2")
    cluster.start()
    owners = _spread(cluster, ["h1", "h2"])
    h1, h2 = cluster.daemons["h1"], cluster.daemons["h2"]
    mine = sorted(c for c, h in owners.items() if h == "h1")
    routed = h2.client.post(f"/v1/companies/{mine[0]}/restart")  # run by its owner (cluster/hosts.py)
    assert routed.status == 202 and routed.json()["id"] == mine[0], routed.json()

    def listed(daemon: DaemonProcess) -> set[str]:
        return {c["id"] for c in daemon.client.get("/v1/companies").json()["companies"]}

    assert h2.client.request("PUT", "/v1/companies/newco", body={"engine": "simulator"}).status == 201
    wait_until(lambda: "newco" in listed(h1), 10, what="newco on h1")
    assert "newco" in cluster.leases()
    newco_owner = wait_until(lambda: cluster.leases()["newco"][0] if cluster.leases()["newco"][2] else None, 10,
                             what="newco's lease taken")
    deleted = cluster.daemons[newco_owner].client.request("DELETE", "/v1/companies/newco")
    assert deleted.status == 200 and deleted.json()["removed"] is True, deleted.json()
    wait_until(lambda: "newco" not in listed(h1) | listed(h2), 10, what="newco gone from both hosts")
    assert "newco" not in cluster.leases()

    assert h1.config_path is not None  # a company added to h1's file by a reload: on h2 too, then gone again
    config = h1.config_path.read_text()
    h1.config_path.write_text(config + '[[companies]]\nid = "c7"\nengine = "simulator"\n')
    assert h1.client.post("/v1/reload").json()["ok"] is True
    wait_until(lambda: "c7" in listed(h2) and "c7" in cluster.leases(), 10, what="c7 on h2, with its lease row")
    h1.config_path.write_text(config)
    assert h1.client.post("/v1/reload").json()["ok"] is True
    wait_until(lambda: "c7" not in listed(h1) | listed(h2) and "c7" not in cluster.leases(), 10, what="c7 gone")

    stopped = h1.client.request("DELETE", f"/v1/companies/{mine[0]}")  # a config company: stopped by the operator, kept
    assert stopped.status == 200 and stopped.json()["state"] == "stopped", stopped.json()
    before = cluster.leases()
    os.killpg(h1.pid, signal.SIGKILL)
    assert h1.proc is not None
    h1.proc.wait()
    wait_until(lambda: all(cluster.running(["h2"])[c] == ["h2"] for c in mine[1:])
               and cluster.leases()[mine[0]][0] == "h2" and cluster.leases()[mine[0]][1] > before[mine[0]][1],
               30, interval=0.2, what="h1's companies on h2")
    time.sleep(1.0)  # a start, had there been one, would show by now
    company = h2.client.get(f"/v1/companies/{mine[0]}").json()
    assert company["state"] == "stopped" and company["worker"]["pid"] is None, company


def test_a_worker_ends_itself_fenced_when_its_deadline_passes_unrefreshed_and_lives_on_while_refreshed(
        tmp_path: Path) -> None:
    """The dead-man switch: a worker whose fence deadline is not moved on exits FENCED by itself; one that gets
    `fence` messages outlives its first deadline."""

    async def scenario() -> None:
        deadlines = Deadlines(heartbeat=30, connect=30, pairing=30, paired_connect=30, stuck_reconnecting=30)

        first = time.monotonic() + 3.0  # both start with this deadline

        def spec(company: str) -> WorkerSpec:
            return WorkerSpec(company=company, session_dir=tmp_path / company, engine="simulator", proxy=None,
                              pair=True, heartbeat_interval=0.2, log_level="info", fence_deadline=first)

        left, kept = await start_worker(spec("left"), deadlines), await start_worker(spec("kept"), deadlines)
        readers = [asyncio.create_task(_drain(w)) for w in (left, kept)]
        try:
            while time.monotonic() < first + 1.5:  # kept's deadline moves on; left's does not
                kept.fence(time.monotonic() + 1.5)
                await asyncio.sleep(0.25)
            assert await asyncio.wait_for(left.wait(), 5) == ExitCode.FENCED
            assert kept.proc.returncode is None  # refreshed: alive well past its first deadline
        finally:
            for worker in (left, kept):
                worker.kill("test over")
                await worker.close()
            for reader in readers:
                reader.cancel()

    asyncio.run(scenario())


async def _drain(worker: WorkerProcess) -> None:
    async for _ in worker.messages():
        pass
