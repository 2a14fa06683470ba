"""Failover and reconfiguration holes found in review of the cluster (issue 13): real hosts on one
PostgreSQL (whatsappd.testing.cluster), short leases, neonize workers only behind a refusing
127.0.0.1 SOCKS5 listener (WHATSAPPD_LOOPBACK_ONLY set by the cluster's hosts)."""

from __future__ import annotations

import asyncio
import signal
import socket
from pathlib import Path

from whatsappd.config import build_config
from whatsappd.states import State
from whatsappd.store.postgresql import migrate
from whatsappd.supervisor import Supervisor
from whatsappd.supervisor.process import OsProcess, WorkerSpec, launch_subprocess
from whatsappd.testing.cluster import Cluster
from whatsappd.testing.daemon import wait_until
from whatsappd.testing.postgres import PostgresServer
from whatsappd.testing.socks5 import Socks5FaultProxy
from whatsappd.testing.whatsmeow_pg import insert_fake_device, record_device

TTL, RENEW, MARGIN = 3.0, 0.5, 1.0
JID = "5511900000077:3@s.whatsapp.net"


def test_a_neonize_company_paired_after_the_hosts_started_is_started_by_the_host_taking_it_over(
        tmp_path: Path, postgres: PostgresServer) -> None:
    """A device recorded in PostgreSQL after every host read its devices: the host taking the company over
    from a killed owner reads it again and starts a worker for it (not left `stopped` by a stale cache)."""
    with Socks5FaultProxy(mode="refuse") as proxy, \
            Cluster(tmp_path, postgres.create_database(), [], hosts=2, neonize={"nz": proxy.url},
                    lease_ttl=TTL, renew_interval=RENEW, fence_margin=MARGIN) as cluster:
        cluster.start()
        first = cluster.wait_owned(["nz"])["nz"]
        assert first.owner is not None
        insert_fake_device(cluster.dsn, JID, "nz")  # paired elsewhere, as the research's devices were made
        record_device(cluster.dsn, "nz", JID)
        victim = cluster.host(first.owner)
        heir = next(h for h in cluster.hosts if h is not victim)
        victim.kill()

        def started() -> bool:
            lease = cluster.leases()["nz"]
            return bool(lease.live and lease.owner == heir.host_id
                        and heir.log_lines("worker started", company="nz", mode="restore"))

        wait_until(started, 30, interval=0.2, what="the heir's worker for nz, restoring its device")
        assert heir.companies()["nz"]["has_session"] is True


def test_a_proxy_changed_on_another_host_restarts_the_owners_worker(tmp_path: Path, postgres: PostgresServer) -> None:
    """PUT of a runtime company with a new proxy on a host that does not own it: the owner restarts its worker
    (a new pid) and runs on with the new configuration, as a single host does."""
    with Cluster(tmp_path, postgres.create_database(), [], hosts=2, lease_ttl=TTL, renew_interval=RENEW,
                 fence_margin=MARGIN) as cluster:
        cluster.pre_pair(["rt"])
        cluster.start()
        h1 = cluster.hosts[0]
        assert h1.client.request("PUT", "/v1/companies/rt", body={"engine": "simulator"}).status == 201
        lease = cluster.wait_owned(["rt"], working=["rt"], states=("connected",))["rt"]
        owner = cluster.host(str(lease.owner))
        other = next(h for h in cluster.hosts if h is not owner)
        before = owner.companies()["rt"]["worker"]["pid"]
        assert before is not None
        changed = other.client.request("PUT", "/v1/companies/rt",
                                       body={"engine": "simulator", "proxy": "socks5://127.0.0.1:9"})
        assert changed.status == 200, changed.json()

        def restarted() -> bool:
            rt = owner.companies()["rt"]
            return rt["worker"]["pid"] not in (None, before) and rt["state"] == "connected"

        wait_until(restarted, 15, interval=0.2, what="the owner's worker restarted")
        assert cluster.leases()["rt"].token == lease.token  # the same owner, not a failover


def test_a_worker_spawned_while_its_lease_was_lost_is_killed_not_asked_to_stop(tmp_path: Path, pg_dsn: str) -> None:
    """The lease goes (fence) while the runner's worker is being spawned, so fence() finds no worker to kill:
    the worker is SIGKILLed as soon as it exists (lease_lost), never left to a graceful stop it could connect in."""
    config = build_config({"daemon": {"state_dir": str(tmp_path / "state")},
                           "store": {"backend": "postgresql", "dsn": pg_dsn},
                           "cluster": {"enabled": True, "host_id": "h1"},
                           "workers": {"stop_grace": "30s", "heartbeat_interval": "200ms"},
                           "companies": [{"id": "acme", "engine": "simulator"}]}, "test")

    migrate(pg_dsn)  # the daemon's start does it (whatsappd_devices is read at the supervisor's start)

    async def scenario() -> None:
        spawned: list[OsProcess] = []

        async def launch(spec: WorkerSpec) -> tuple[OsProcess, socket.socket]:
            proc, channel = await launch_subprocess(spec)
            spawned.append(proc)
            sup.companies["acme"].fence("lease lost (rebalanced)")  # the keeper, during the spawn's await
            return proc, channel

        sup = Supervisor(config, launch=launch)
        await sup.start()
        runner = sup.companies["acme"]
        runner.token = 7  # the lease, as ClusterNode gives it
        runner.start("lease acquired")
        assert await runner.wait_for(lambda r: bool(spawned) and r.worker is None and r.state is State.STOPPED, 10)
        assert await spawned[0].wait() == -signal.SIGKILL  # not its own graceful exit
        await sup.shutdown(5)

    asyncio.run(scenario())
