"""Issue 13's acceptance, scaled down: real hosts on one PostgreSQL (whatsappd.testing.cluster),
killed with SIGKILL, frozen with SIGSTOP, cold-started together, watched by the independent
double-owner checker. bench/bench_cluster.py runs the same scenarios at full size."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from whatsappd.testing.cluster import (
    Checker,
    Cluster,
    freeze_and_thaw,
    kill_and_failover,
    quarantined,
    send_and_kill,
    wait_balanced,
)
from whatsappd.testing.daemon import wait_until
from whatsappd.testing.postgres import PostgresServer
from whatsappd.testing.socks5 import Socks5FaultProxy

COMPANIES = [f"c{n}" for n in range(6)]
#: Short leases (the bench runs the shipped 15 s / 5 s / 3 s): takeover within about 3.5 s.
TTL, RENEW, MARGIN = 3.0, 0.5, 1.0


@contextmanager
def started(tmp_path: Path, postgres: PostgresServer, **kw: Any) -> Iterator[Cluster]:
    """Three hosts on a fresh database, COMPANIES paired on the shared simulator server, started at once."""
    with Cluster(tmp_path, postgres.create_database(), COMPANIES, lease_ttl=TTL, renew_interval=RENEW,
                 fence_margin=MARGIN, **kw) as cluster:
        cluster.pre_pair()
        cluster.start()
        yield cluster


def test_checker_sees_two_owners_and_not_a_frozen_one(tmp_path: Path, postgres: PostgresServer) -> None:
    """The checker is not blind: two unclustered hosts running one company are a double owner by
    /proc alone; frozen workers are counted apart and are not; a killed host leaves no process."""
    with Cluster(tmp_path, postgres.create_database(), ["acme"], hosts=2, clustered=False) as cluster:
        cluster.start()
        for host in cluster.hosts:
            host.connect_pairing("acme", timeout=30)  # a live worker on each host
        checker = Checker(cluster)
        wait_until(lambda: checker.sample_once(cluster.db).workers == 2, 10, what="two live workers")
        assert checker.double_owner_samples() >= 1
        assert {v.company for v in checker.violations} == {"acme"}
        h1, h2 = cluster.hosts
        h2.freeze()
        before = len(checker.violations)
        sample = checker.sample_once(cluster.db)
        assert (sample.workers, sample.frozen) == (1, 1) and len(checker.violations) == before
        h2.thaw()
        h2.kill()
        assert not h2.tree() and cluster.running_on() == {"acme": {"h1"}}


def test_kill_9_of_a_host_moves_its_companies_with_higher_tokens_and_no_double_owner(tmp_path: Path,
                                                                                   postgres: PostgresServer) -> None:
    """kill -9 of one host's whole process tree: each company it owned runs connected on another
    host with a higher token, and the 100 ms checker never sees two owners."""
    with started(tmp_path, postgres) as cluster, Checker(cluster) as checker:
        leases = wait_balanced(cluster, COMPANIES, timeout=60)
        victim = cluster.host(str(leases[COMPANIES[0]].owner))
        result = kill_and_failover(cluster, victim, connected=COMPANIES, timeout=60)
        assert result.before and set(result.after) == set(result.before)
        assert all(result.after[c][0] != victim.host_id and result.after[c][1] > t for c, t in result.before.items())
        assert checker.samples and not checker.errors, checker.errors
        assert checker.violations == []


def test_a_host_frozen_for_twice_the_ttl_never_overlaps_the_new_owners(tmp_path: Path, postgres: PostgresServer) -> None:
    """SIGSTOP of a host for 2 x ttl, then SIGCONT: others take its companies, its stale workers
    exit after SIGCONT, and the 100 ms checker sees zero moments with two acting owners."""
    with started(tmp_path, postgres) as cluster, Checker(cluster) as checker:
        leases = wait_balanced(cluster, COMPANIES, timeout=60)
        victim = cluster.host(str(leases[COMPANIES[0]].owner))
        result = freeze_and_thaw(cluster, victim, 2 * TTL)
        wait_balanced(cluster, COMPANIES, timeout=60)  # and the cluster recovers, the thawed host included
        assert result.before and result.taken == len(result.before)
        assert max(s.frozen for s in checker.samples) >= len(result.before)  # the checker saw them frozen
        assert not checker.errors, checker.errors
        assert checker.violations == []


def test_three_hosts_cold_started_at_once_on_an_empty_database_quarantine_nothing(tmp_path: Path,
                                                                                 postgres: PostgresServer) -> None:
    """Three hosts started together on an empty database: every company is owned, and the neonize
    ones (connecting behind refusing 127.0.0.1 proxies) are never quarantined."""
    with Socks5FaultProxy("refuse") as p1, Socks5FaultProxy("refuse") as p2, \
            started(tmp_path, postgres, neonize={"n1": p1.url, "n2": p2.url}) as cluster:
        leases = cluster.wait_owned(timeout=60, working=COMPANIES)
        for cid in cluster.neonize:
            assert cluster.host(str(leases[cid].owner)).post(cid, "connect").status in (200, 202)
        wait_until(lambda: p1.requests and p2.requests, 60, what="both neonize workers to dial their proxy")
        assert quarantined(cluster) == set()


def test_owners_killed_mid_send_send_no_message_twice(tmp_path: Path, postgres: PostgresServer) -> None:
    """100 messages queued over the companies, the owner of most of them killed -9 mid-send: the
    shared server received none twice, and every message is sent or failed send_interrupted."""
    with started(tmp_path, postgres, env={"WHATSAPPD_SIM_SEND_DELAY": "0.05"}) as cluster, Checker(cluster) as checker:
        result = send_and_kill(cluster, COMPANIES, 100, kills=1, timeout=90)
        assert 0 < result.sent_at_kills[0] < 100, "the kill did not land mid-send"
        assert result.duplicates == 0
        assert result.statuses.get("failed", 0) == result.interrupted  # no other failure
        assert result.sent + result.interrupted >= 100 and result.sent <= 100
        assert checker.double_owner_samples() == 0, checker.violations
