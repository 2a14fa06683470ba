"""Company leases (whatsappd/cluster/leases.py, issue 13): fencing tokens, one renew statement
per period, spread across hosts, and self-fencing that ends a host's belief in a lease before
any other host can take it.

A real PostgreSQL (the session's `postgres` fixture). The "hosts" are separate OS processes
(whatsappd.testing.lease_host) so kill -9 and SIGSTOP/SIGCONT are real; each logs what it
believes with CLOCK_MONOTONIC stamps, which compare across processes on Linux. Short TTLs keep
the whole file within about 30 s.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from whatsappd.cluster.leases import TOKEN_HELD_SQL, LeaseKeeper, Leases, Loss, StaleLease, check_token, share
from whatsappd.config import ConfigError, build_config
from whatsappd.store.postgresql import migrate
from whatsappd.testing.lease_host import read_log

TTL, RENEW, MARGIN = 1.5, 0.25, 0.5
#: Scheduling slack for liveness bounds on a loaded 2-core machine (safety checks have none).
SLACK = 0.75


@pytest.fixture
def lease_dsn(pg_dsn: str) -> str:
    migrate(pg_dsn)
    return pg_dsn


class Hosts:
    """Lease host processes on one database, each logging to tmp_path/<host>.jsonl; killed at the end."""

    def __init__(self, dsn: str, root: Path) -> None:
        self.dsn, self.root = dsn, root
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, *hosts: str, ttl: float = TTL, renew: float = RENEW, margin: float = MARGIN, cap: int = 400) -> None:
        for host in hosts:
            self.procs[host] = subprocess.Popen(
                [sys.executable, "-m", "whatsappd.testing.lease_host", "--dsn", self.dsn, "--host", host,
                 "--log", str(self.log_path(host)), "--ttl", str(ttl), "--renew", str(renew), "--margin", str(margin),
                 "--cap", str(cap)],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def log_path(self, host: str) -> Path:
        return self.root / f"{host}.jsonl"

    def log(self, host: str) -> list[dict[str, Any]]:
        return read_log(self.log_path(host))

    def held(self, host: str) -> dict[str, int]:
        """What host believes it holds now, by its log."""
        held: dict[str, int] = {}
        for event in self.log(host):
            if event["ev"] == "acquired":
                held[event["company"]] = event["token"]
            elif event["ev"] == "lost":
                held.pop(event["company"], None)
        return held

    def wait(self, predicate: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout}s waiting for {what}: "
                                     f"{ {h: sorted(self.held(h)) for h in self.procs} }")
            time.sleep(0.05)

    def two_by_two(self) -> dict[str, int]:
        """4 companies, hosts h1 and h2 started and holding 2 each; what h1 holds."""
        add_companies(self.dsn, 4)
        self.start("h1", "h2")
        self.wait(lambda: len(self.held("h1")) == 2 and len(self.held("h2")) == 2, 15, "2 + 2")
        return self.held("h1")

    def signal(self, host: str, sig: int) -> float:
        os.kill(self.procs[host].pid, sig)
        return time.monotonic()

    def kill_all(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGCONT)
                proc.kill()
            proc.wait()


@pytest.fixture
def hosts(lease_dsn: str, tmp_path: Path) -> Iterator[Hosts]:
    made = Hosts(lease_dsn, tmp_path)
    yield made
    made.kill_all()


def add_companies(dsn: str, n: int) -> list[str]:
    companies = [f"c{i:02d}" for i in range(n)]
    leases = Leases(dsn, "setup", TTL, 1)
    leases.add_companies(companies)
    leases.close()
    return companies


def belief_intervals(hosts: Hosts) -> dict[str, list[tuple[float, float, str, int]]]:
    """company -> [(start, end, host, token)]: from acquisition until on_lost or the local
    deadline then in force, whichever came first (a frozen host cannot act past its deadline)."""
    out: dict[str, list[tuple[float, float, str, int]]] = {}
    for host in hosts.procs:
        start: dict[str, tuple[float, int]] = {}
        for event in hosts.log(host):
            if event["ev"] == "acquired":
                start[event["company"]] = (event["mono"], event["token"])
            elif event["ev"] == "lost":
                began, token = start.pop(event["company"])
                out.setdefault(event["company"], []).append(
                    (began, min(event["mono"], event["deadline"]), host, token))
        for company, (began, token) in start.items():
            out.setdefault(company, []).append((began, float("inf"), host, token))
    return out


def assert_one_owner_at_a_time(hosts: Hosts, killed: dict[str, float] | None = None) -> None:
    """No two hosts' belief intervals for a company overlap (a host killed at t believes nothing
    after t), and tokens grow from one owner to the next."""
    for company, intervals in belief_intervals(hosts).items():
        intervals = [(s, min(e, (killed or {}).get(h, e)), h, t) for s, e, h, t in intervals]
        intervals.sort()
        for (_s1, e1, h1, t1), (s2, _e2, h2, t2) in zip(intervals, intervals[1:], strict=False):
            assert e1 <= s2, f"{company}: {h1} (token {t1}) believed it owned it until {e1}, {h2} took it at {s2}"
            assert t2 > t1, f"{company}: token {t2} after {t1}"


def test_a_killed_holder_s_companies_are_taken_within_ttl_plus_renew_interval_with_higher_tokens(hosts: Hosts):
    """kill -9 of a lease holder: the other host holds each of its companies within ttl + renew_interval, with a higher token."""
    victim = hosts.two_by_two()
    killed = hosts.signal("h1", signal.SIGKILL)
    hosts.wait(lambda: len(hosts.held("h2")) == 4, TTL + RENEW + 5, "h2 to hold all 4")
    taken = {e["company"]: e for e in hosts.log("h2") if e["ev"] == "acquired" and e["mono"] > killed}
    for company, token in victim.items():
        assert taken[company]["token"] > token
        assert taken[company]["mono"] - killed <= TTL + RENEW + SLACK, (company, taken[company]["mono"] - killed)
    assert_one_owner_at_a_time(hosts, killed={"h1": killed})


def test_a_frozen_host_fences_itself_before_touching_the_database_and_before_anyone_else_owns(hosts: Hosts):
    """SIGSTOP 2 x ttl, SIGCONT: on_lost fires for each lease before any statement; the other host took each after the deadline."""
    frozen = hosts.two_by_two()
    stopped = hosts.signal("h1", signal.SIGSTOP)
    time.sleep(2 * TTL)
    resumed = hosts.signal("h1", signal.SIGCONT)
    hosts.wait(lambda: len(hosts.held("h1")) == 2 and len(hosts.held("h2")) == 2, 15, "2 + 2 again")
    log = hosts.log("h1")
    losses = {e["company"]: e for e in log if e["ev"] == "lost" and e["company"] in frozen
              and e["token"] == frozen[e["company"]]}
    assert set(losses) == set(frozen)
    assert {e["reason"] for e in losses.values()} == {"deadline"}
    first_statement = min(e["mono"] for e in log if e["ev"] == "stmt" and e["mono"] > resumed)
    assert all(e["mono"] < first_statement for e in losses.values())
    taken = {e["company"]: e for e in hosts.log("h2")
             if e["ev"] == "acquired" and e["company"] in frozen and stopped < e["mono"] < resumed}
    assert set(taken) == set(frozen)  # h2 took them while h1 was frozen...
    for company, loss in losses.items():
        assert taken[company]["mono"] > loss["deadline"]  # ...only after h1's deadline
        assert taken[company]["token"] > loss["token"]
    assert_one_owner_at_a_time(hosts)


def test_thirty_companies_spread_ten_ten_ten_over_three_hosts(hosts: Hosts):
    """Three hosts started together on 30 companies end up holding 10 each, with no company owned twice at any moment."""
    add_companies(hosts.dsn, 30)
    hosts.start("h1", "h2", "h3")
    hosts.wait(lambda: [len(hosts.held(h)) for h in ("h1", "h2", "h3")] == [10, 10, 10], 15, "10/10/10")
    owners = [c for h in ("h1", "h2", "h3") for c in hosts.held(h)]
    assert len(owners) == len(set(owners)) == 30
    with psycopg.connect(hosts.dsn) as db:
        rows = db.execute("SELECT owner, count(*) FROM whatsappd_company_leases GROUP BY owner ORDER BY owner").fetchall()
    assert rows == [("h1", 10), ("h2", 10), ("h3", 10)]
    assert_one_owner_at_a_time(hosts)


def test_a_host_at_its_cap_leaves_the_rest_to_the_others(hosts: Hosts):
    """30 companies, one host capped at 4: it holds 4 and the two others 13 each."""
    add_companies(hosts.dsn, 30)
    hosts.start("h1", cap=4)
    hosts.start("h2", "h3")
    hosts.wait(lambda: [len(hosts.held(h)) for h in ("h1", "h2", "h3")] == [4, 13, 13], 15, "4/13/13")
    assert_one_owner_at_a_time(hosts)


def test_share_water_fills_the_live_hosts_caps():
    """A host's share is ceil(companies / hosts) with equal caps; hosts with room make up for a small cap; never above the own cap."""
    assert share(30, 400, [400, 400]) == 10
    assert share(31, 400, [400, 400]) == 11
    assert share(30, 400, [2, 400]) == 14  # 2 + 14 + 14
    assert share(30, 2, [400, 400]) == 2
    assert share(30, 5, []) == 5  # over capacity: the cap
    assert share(0, 400, [400]) == 0


def test_a_write_with_a_stale_token_is_refused_and_no_one_acquires_during_a_checked_write(lease_dsn: str):
    """check_token refuses a superseded or expired token (StaleLease); while a checked write is open nobody acquires."""
    add_companies(lease_dsn, 2)
    h1, h2 = Leases(lease_dsn, "h1", 0.3, 10), Leases(lease_dsn, "h2", 30, 10)
    (old,) = h1.acquire(1).values()
    with psycopg.connect(lease_dsn, autocommit=True) as db:  # transactions explicit, as the store's
        with db.transaction():
            check_token(db, "c00", old)  # live: fine
        time.sleep(0.4)
        with pytest.raises(StaleLease, match="expired"), db.transaction():
            check_token(db, "c00", old)
        (new,) = h2.acquire(1).values()
        assert new > old
        with pytest.raises(StaleLease) as stale, db.transaction():
            check_token(db, "c00", old)
        assert f"lease token {old} is stale (the lease is now token {new}, held by h2)" in str(stale.value)
        with pytest.raises(StaleLease, match="no lease row"), db.transaction():
            check_token(db, "nobody", old)
        assert db.execute(f"SELECT {TOKEN_HELD_SQL}", {"company": "c00", "token": old}).fetchone() == (False,)
        assert db.execute(f"SELECT {TOKEN_HELD_SQL}", {"company": "c00", "token": new}).fetchone() == (True,)

        # A write checks h4's lease; the lease expires while the write's transaction is open: no
        # other host can take the company (its row is locked) until the write commits.
        h4, h3 = Leases(lease_dsn, "h4", 0.5, 10), Leases(lease_dsn, "h3", 30, 10)
        (checked,) = h4.acquire(1).values()
        with db.transaction():
            check_token(db, "c01", checked)
            time.sleep(0.6)
            assert h3.acquire(5) == {}
        (after,) = h3.acquire(5).values()
        assert after > checked
    for leases in (h1, h2, h3, h4):
        leases.close()


def test_renewal_is_one_statement_per_period_for_all_leases(lease_dsn: str):
    """A keeper holding 50 leases sends one statement per period in steady state; that statement extends all 50."""
    companies = add_companies(lease_dsn, 50)
    leases = Leases(lease_dsn, "h1", TTL, 400)
    lost: list[Loss] = []

    async def scenario() -> tuple[int, int, int]:
        keeper = LeaseKeeper(leases, renew_interval=0.1, fence_margin=MARGIN, on_lost=lost.append)
        task = asyncio.create_task(keeper.run())
        while len(keeper.held) < 50:
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.15)
        before = sum(leases.statements.values())
        renews = leases.statements["renew"]
        await asyncio.sleep(1.0)
        sent = sum(leases.statements.values()) - before
        periods = leases.statements["renew"] - renews
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return sent, periods, len(keeper.held)

    sent, periods, left = asyncio.run(scenario())
    assert 8 <= periods <= 11 and sent == periods  # renew only: nothing to acquire, no release
    assert [loss.reason for loss in lost] == ["stopped"] * 50 and left == 0

    held = Leases(lease_dsn, "h2", TTL, 400)
    tokens = held.acquire(50)  # released at stop: free again
    assert sorted(tokens) == companies
    with psycopg.connect(lease_dsn) as db:
        before_expiry = db.execute("SELECT max(expires_at) FROM whatsappd_company_leases").fetchone()
        count = sum(held.statements.values())
        renewal = held.renew_all(tokens)
        assert sum(held.statements.values()) == count + 1
        after = db.execute("SELECT min(expires_at) FROM whatsappd_company_leases").fetchone()
    assert renewal.held == tokens and renewal.view.companies == 50 and renewal.view.free == 0
    assert before_expiry is not None and after is not None and after[0] > before_expiry[0]
    held.close()


def test_cluster_settings_validate_and_enabling_needs_postgresql_and_a_host_id(tmp_path: Path):
    """[cluster] keys parse and are checked together; enabled = true needs the PostgreSQL store, and an empty
    host_id becomes the machine's hostname."""
    base = {"daemon": {"state_dir": str(tmp_path)}}
    config = build_config({**base, "cluster": {"host_id": "wa-3", "lease_ttl": "5s", "renew_interval": "1s",
                                               "fence_margin": "1s", "max_companies": 30}}, "test")
    assert (config.cluster_enabled, config.cluster_host_id, config.cluster_lease_ttl, config.cluster_renew_interval,
            config.cluster_fence_margin, config.cluster_max_companies) == (False, "wa-3", 5.0, 1.0, 1.0, 30)

    def problems(cluster: dict[str, Any]) -> list[str]:
        with pytest.raises(ConfigError) as refused:
            build_config({**base, "cluster": cluster}, "test")
        return refused.value.problems

    assert problems({"enabled": True}) == ['cluster.enabled = true: needs store.backend = "postgresql" (the hosts '
                                           "share its leases, company registry, journal and outbox); a single host on "
                                           "SQLite needs no [cluster]"]
    pg = {**base, "store": {"backend": "postgresql", "dsn": "postgresql://whatsappd@db.example.com/whatsappd"}}
    enabled = build_config({**pg, "cluster": {"enabled": True}}, "test")
    assert enabled.cluster_enabled and enabled.cluster_host_id == socket.gethostname()
    assert build_config({**pg, "cluster": {"enabled": True, "host_id": "wa-3"}}, "test").cluster_host_id == "wa-3"
    assert problems({"fence_margin": "15s"})[0].startswith("cluster.fence_margin = \"15s\": must be shorter")
    assert problems({"lease_ttl": "5s", "fence_margin": "1s", "renew_interval": "2500ms"})[0].startswith(
        "cluster.renew_interval = \"2s500ms\": must be at most (lease_ttl - fence_margin) / 2 = 2s")
    assert problems({"host_id": "wa 3"})[0].startswith("cluster.host_id = \"wa 3\": expected 1 to 64 characters")
    assert problems({"max_companies": 0})[0].startswith("cluster.max_companies = 0:")


def test_an_expired_lease_is_lost_even_if_nobody_took_it(lease_dsn: str):
    """A renewal after expiry renews nothing, even with no other host: the lease is lost, never silently re-won."""
    add_companies(lease_dsn, 1)
    leases = Leases(lease_dsn, "h1", 0.3, 10)
    tokens = leases.acquire(1)
    assert leases.renew_all(tokens).held == tokens
    time.sleep(0.4)
    renewal = leases.renew_all(tokens)
    assert renewal.held == {} and renewal.view.free == 1
    again = leases.acquire(1)  # only a new acquisition, with a new token
    assert again["c00"] > tokens["c00"]
    leases.close()


def test_a_renewal_stuck_in_the_database_fences_at_the_local_deadline_before_the_lease_expires(lease_dsn: str):
    """A renew blocked by a lock: on_lost fires at each local deadline while the lease is still live in the database."""
    add_companies(lease_dsn, 3)
    leases = Leases(lease_dsn, "h1", TTL, 400)
    lost: list[tuple[Loss, bool]] = []
    acquired: list[tuple[str, int]] = []

    async def scenario() -> dict[str, int]:
        with psycopg.connect(lease_dsn, autocommit=True) as blocker:
            def fenced(loss: Loss) -> None:  # is the lease still live in the database right now?
                (live,) = blocker.execute("SELECT expires_at > clock_timestamp() FROM whatsappd_company_leases "
                                          "WHERE company = %s", (loss.company,)).fetchone() or (None,)
                lost.append((loss, bool(live)))

            keeper = LeaseKeeper(leases, renew_interval=RENEW, fence_margin=MARGIN, on_lost=fenced,
                                 on_acquired=lambda c, t: acquired.append((c, t)))
            task = asyncio.create_task(keeper.run())
            while len(keeper.held) < 3:
                await asyncio.sleep(0.02)
            first = dict((c, h.token) for c, h in keeper.held.items())
            with blocker.transaction():
                blocker.execute("LOCK TABLE whatsappd_company_leases IN ACCESS EXCLUSIVE MODE")
                while len(lost) < 3:
                    await asyncio.sleep(0.02)
            while len(keeper.held) < 3:  # the lock gone: the late renewal comes back, then new leases
                await asyncio.sleep(0.02)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            return first

    first = asyncio.run(scenario())
    fences = lost[:3]
    assert {loss.company for loss, _ in fences} == set(first)
    for loss, live in fences:
        assert loss.reason == "deadline" and loss.at >= loss.deadline and live
    again = dict(acquired[3:])
    assert set(again) == set(first) and all(again[c] > first[c] for c in first)


def test_the_local_deadline_counts_from_the_start_of_a_slow_renewal(lease_dsn: str):
    """A renewal held up 0.6 s by a lock grants a deadline measured from when it was sent, not from when it came back."""
    add_companies(lease_dsn, 1)
    leases = Leases(lease_dsn, "h1", TTL, 400)

    async def scenario() -> tuple[float, float]:
        keeper = LeaseKeeper(leases, renew_interval=RENEW, fence_margin=MARGIN, on_lost=lambda loss: None)
        task = asyncio.create_task(keeper.run())
        while not keeper.held:
            await asyncio.sleep(0.02)
        with psycopg.connect(lease_dsn, autocommit=True) as blocker:
            with blocker.transaction():
                blocker.execute("LOCK TABLE whatsappd_company_leases IN ACCESS EXCLUSIVE MODE")
                locked = time.monotonic()
                await asyncio.sleep(0.6)
            # The deadline the blocked renewal granted, as it stands when the next statement is sent.
            granted: list[float] = []
            leases.trace = lambda kind: granted.extend([keeper.held["c00"].deadline] if kind == "renew" else [])
            while not granted:
                await asyncio.sleep(0.01)
        deadline = granted[0]
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return locked, deadline

    locked, deadline = asyncio.run(scenario())
    # Sent at most one renew_interval after the lock was taken (plus scheduling), answered 0.6 s later.
    assert deadline <= locked + RENEW + 0.15 + (TTL - MARGIN)
