"""Issue 13's acceptance, scaled down: real hosts on one PostgreSQL (whatsappd.testing.cluster),
killed with SIGKILL, frozen with SIGSTOP, cold-started together, watched by the independent
double-owner checker. bench/bench_cluster.py runs the same scenarios at full size."""

from __future__ import annotations

from pathlib import Path

from whatsappd.testing.cluster import Checker, Cluster
from whatsappd.testing.daemon import wait_until
from whatsappd.testing.postgres import PostgresServer


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
