"""Company leases: each company owned by at most one host, with a fencing token and self-fencing.

The database side (`Leases`, psycopg 3, one connection) keeps one row per company in
`whatsappd_company_leases (company, owner, token, expires_at, acquired_at)` and one per host in
`whatsappd_cluster_hosts (host, max_companies, expires_at)`. Times in them are the database's
(`now()`): hosts never compare their own wall clocks.

- `renew_all` is ONE statement per period, whatever the number of companies: it extends every
  lease the host still holds with the token it knows, refreshes the host's own row, and reads
  the cluster view (companies, free ones, live hosts and their caps) the next step plans with.
  A lease that expired is not renewed, even if nobody took it yet: it is lost, and can only be
  taken again by a new acquisition with a new token (never silently re-won).
- `acquire` takes up to n expired or unowned companies (`FOR UPDATE SKIP LOCKED`, so hosts
  acquiring at once split them); each acquisition takes a new token from one sequence, so a
  company's tokens strictly increase across owners (and survive the row being deleted).
- `release` gives a lease back (owner NULL, expired) so another host need not wait a TTL.
- `check_token(db, company, token)` is for writes: inside the writer's transaction it locks the
  lease row `FOR SHARE` and raises `StaleLease` unless the token is the current one and the
  lease is unexpired. The lock holds until the write commits, so an acquisition by another host
  (an UPDATE of that row) waits for it: no write of the old owner commits after the new token.

Spread (`share`): a host aims at its share of the companies, found by water-filling the live
hosts' caps: the smallest level L with sum(min(cap, L)) >= companies; its share is min(cap, L).
With equal caps that is ceil(companies / live hosts); a host with a small cap takes less and the
others make up for it. A host below its share acquires the difference; a host above it (a new
host joined) releases the surplus, fencing it locally first (on_lost with reason "rebalanced").
A host that starts waits one renew period after announcing itself before acquiring, so hosts
started together see each other and do not all grab everything first.

Self-fencing (`LeaseKeeper`): for each held company a LOCAL deadline = the monotonic time at the
START of the renewal (read before the statement is sent) + ttl - fence_margin. The database sets
expires_at = now() + ttl where now() is read after the statement arrived, so in real time the
lease cannot expire in the database before start + ttl. The deadline passes before that as long
as this host's monotonic clock does not run slower than the database server's clock by more than
margin/ttl (a RATE assumption: 3 s of 15 s tolerates 20 %; NTP-disciplined clocks differ by
parts per million). OFFSETS between the clocks do not matter: each side measures an interval
from the same event. The keeper calls `on_lost` when a renewal says the lease is gone, or when
the deadline passes without a successful renewal (database unreachable, process frozen and
resumed): a watchdog task wakes at the earliest deadline, and the renew loop checks deadlines
before it sends anything, so a process resumed after a freeze fences before it touches the
database again. A renewal that comes back after its deadline does not revive the lease.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import math
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import psycopg
from psycopg.rows import TupleRow

from whatsappd.cluster.fence import StaleLease
from whatsappd.logs import get_logger

__all__ = ["Clock", "ClusterView", "Held", "LeaseKeeper", "Leases", "Loss", "Renewal", "StaleLease", "SystemClock",
           "check_token", "share"]

log = get_logger()

#: The renewal: one statement (data-modifying CTEs) renewing the host row and every lease it
#: names, and reading the cluster view. `mine` pairs company and token: a lease renews only
#: with the token this host acquired it with, only while unexpired.
RENEW_SQL = """
WITH me AS (
    INSERT INTO whatsappd_cluster_hosts AS h (host, max_companies, expires_at)
    VALUES (%(host)s, %(cap)s, now() + %(ttl)s * interval '1 second')
    ON CONFLICT (host) DO UPDATE SET max_companies = EXCLUDED.max_companies, expires_at = EXCLUDED.expires_at
), kept AS (
    UPDATE whatsappd_company_leases AS l SET expires_at = now() + %(ttl)s * interval '1 second'
    FROM unnest(%(companies)s::text[], %(tokens)s::bigint[]) AS mine(company, token)
    WHERE l.company = mine.company AND l.token = mine.token AND l.owner = %(host)s AND l.expires_at > now()
    RETURNING l.company, l.token
)
SELECT (SELECT coalesce(json_object_agg(company, token), '{}') FROM kept),
       (SELECT count(*) FROM whatsappd_company_leases),
       (SELECT count(*) FROM whatsappd_company_leases WHERE owner IS NULL OR expires_at <= now()),
       (SELECT coalesce(json_agg(json_build_array(host, max_companies)), '[]')
          FROM whatsappd_cluster_hosts WHERE expires_at > now() AND host <> %(host)s)
"""

ACQUIRE_SQL = """
WITH pick AS (
    SELECT company FROM whatsappd_company_leases
    WHERE owner IS NULL OR expires_at <= now()
    ORDER BY company LIMIT %(n)s FOR UPDATE SKIP LOCKED
)
UPDATE whatsappd_company_leases AS l
SET owner = %(host)s, token = nextval('whatsappd_lease_tokens'),
    expires_at = now() + %(ttl)s * interval '1 second', acquired_at = now()
FROM pick WHERE l.company = pick.company
RETURNING l.company, l.token
"""

RELEASE_SQL = """
UPDATE whatsappd_company_leases AS l SET owner = NULL, expires_at = '-infinity'
FROM unnest(%(companies)s::text[], %(tokens)s::bigint[]) AS mine(company, token)
WHERE l.company = mine.company AND l.token = mine.token AND l.owner = %(host)s
RETURNING l.company
"""

#: For writes that prefer a predicate to `check_token`: true while (company, token) is the live
#: lease; it locks the row like check_token. Parameters: %(company)s, %(token)s.
TOKEN_HELD_SQL = ("EXISTS (SELECT 1 FROM whatsappd_company_leases WHERE company = %(company)s "
                  "AND token = %(token)s AND expires_at > now() FOR SHARE)")


def check_token(db: psycopg.Connection[Any], company: str, token: int) -> None:
    """Inside the caller's transaction: raise StaleLease unless token is company's live lease.

    Locks the lease row FOR SHARE until the caller's transaction ends, so no other host can
    acquire the company (a new token) between this check and the write's commit.
    """
    with db.cursor(row_factory=psycopg.rows.tuple_row) as cur:
        row = cur.execute("SELECT owner, token, expires_at > now() FROM whatsappd_company_leases "
                          "WHERE company = %s FOR SHARE", (company,)).fetchone()
    if row is None:
        raise StaleLease(company, token, None, None, False)
    owner, current, live = row
    if current != token or not live:
        raise StaleLease(company, token, int(current), owner, bool(live))


@dataclass(frozen=True)
class ClusterView:
    """What a renewal saw: every company, the free ones (unowned or expired), the other live hosts' caps."""

    companies: int
    free: int
    others: tuple[tuple[str, int], ...]


@dataclass(frozen=True)
class Renewal:
    held: dict[str, int]  # company -> token, the leases this host still holds (just renewed)
    view: ClusterView


def share(companies: int, cap: int, other_caps: Sequence[int]) -> int:
    """This host's share of companies: water-filling the live hosts' caps (see the module doc)."""
    caps = [cap, *other_caps]
    if sum(caps) <= companies:
        return cap
    lo, hi = 0, max(caps)  # the smallest level L with sum(min(c, L)) >= companies
    while lo < hi:
        mid = (lo + hi) // 2
        if sum(min(c, mid) for c in caps) >= companies:
            hi = mid
        else:
            lo = mid + 1
    return min(cap, lo)


class Leases:
    """The lease table for one host, on one connection of its own (autocommit: each call is one
    statement, so `now()` is that statement's time).

    `statements` counts statements sent, by kind ("renew", "acquire", ...); `trace`, if given,
    is called with the kind just before each statement is sent. A connection error closes the
    connection (the next call reconnects) and is raised as psycopg.Error.
    """

    def __init__(self, dsn: str, host: str, ttl: float, cap: int, *, statement_timeout: float = 5.0,
                 trace: Callable[[str], None] | None = None) -> None:
        self.dsn, self.host, self.ttl, self.cap = dsn, host, ttl, cap
        self.statement_timeout = statement_timeout
        self.trace = trace
        self.statements: Counter[str] = Counter()
        self._db: psycopg.Connection[TupleRow] | None = None

    def _run(self, kind: str, sql: str, params: Mapping[str, Any] | Sequence[Any]) -> list[TupleRow]:
        if self._db is None or self._db.closed:
            timeout_ms = max(1, int(self.statement_timeout * 1000))
            self._db = psycopg.connect(self.dsn, autocommit=True, connect_timeout=max(1, math.ceil(self.statement_timeout)),
                                       options=f"-c statement_timeout={timeout_ms}")
        if self.trace is not None:
            self.trace(kind)
        self.statements[kind] += 1
        try:
            cur = self._db.execute(sql, params)
            return cur.fetchall() if cur.description is not None else []
        except psycopg.Error:
            self.close()
            raise

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None

    def add_companies(self, companies: Sequence[str]) -> int:
        """Make companies leasable (unowned); those already there are left alone. How many were new."""
        rows = self._run("add", "INSERT INTO whatsappd_company_leases (company) SELECT unnest(%s::text[]) "
                                "ON CONFLICT (company) DO NOTHING RETURNING company", (list(companies),))
        return len(rows)

    def renew_all(self, held: Mapping[str, int]) -> Renewal:
        """One statement: renew the leases held (company -> token) that are still this host's and
        unexpired, refresh the host's row; the ones still held and the cluster view."""
        companies = list(held)
        (row,) = self._run("renew", RENEW_SQL, {"host": self.host, "cap": self.cap, "ttl": self.ttl,
                                                "companies": companies, "tokens": [held[c] for c in companies]})
        kept, total, free, others = row
        kept = kept if isinstance(kept, dict) else json.loads(kept)
        others = others if isinstance(others, list) else json.loads(others)
        return Renewal({str(c): int(t) for c, t in kept.items()},
                       ClusterView(int(total), int(free), tuple((str(h), int(c)) for h, c in others)))

    def acquire(self, n: int) -> dict[str, int]:
        """Take up to n expired or unowned companies, each with a new token: company -> token."""
        if n <= 0:
            return {}
        rows = self._run("acquire", ACQUIRE_SQL, {"host": self.host, "ttl": self.ttl, "n": n})
        return {str(c): int(t) for c, t in rows}

    def release(self, held: Mapping[str, int]) -> list[str]:
        """Give back leases (company -> token) still held with that token; the ones released."""
        if not held:
            return []
        companies = list(held)
        rows = self._run("release", RELEASE_SQL, {"host": self.host, "companies": companies,
                                                  "tokens": [held[c] for c in companies]})
        return [str(c) for (c,) in rows]


# ------------------------------------------------------------------------------ the keeper


class Clock(Protocol):
    """Local time for the keeper: a monotonic clock and a sleep on the same clock."""

    def monotonic(self) -> float: ...

    async def sleep(self, seconds: float) -> None: ...


class SystemClock:
    """CLOCK_MONOTONIC (system-wide on Linux) and asyncio's sleep, which runs on it."""

    def monotonic(self) -> float:
        return time.monotonic()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


@dataclass
class Held:
    token: int
    deadline: float  # local monotonic time by which the lease must be renewed, or given up


@dataclass(frozen=True)
class Loss:
    """A lease this host stopped owning: why ("taken", "deadline", "rebalanced", "stopped"), the
    deadline that was in force, and when on_lost was called (both local monotonic)."""

    company: str
    token: int
    reason: str
    deadline: float
    at: float


OnLost = Callable[[Loss], Awaitable[None] | None]
OnAcquired = Callable[[str, int], Awaitable[None] | None]


async def _call(fn: Callable[..., Awaitable[None] | None], *args: Any) -> None:
    result = fn(*args)
    if inspect.isawaitable(result):
        await result


class LeaseKeeper:
    """Renews, acquires and self-fences one host's leases (see the module doc). `run()` until
    cancelled; on the way out every lease is fenced (reason "stopped") and released."""

    def __init__(self, leases: Leases, *, renew_interval: float, fence_margin: float, on_lost: OnLost,
                 on_acquired: OnAcquired | None = None, on_renewed: Callable[[], None] | None = None,
                 clock: Clock | None = None) -> None:
        if not 0 < renew_interval < leases.ttl - fence_margin:
            raise ValueError("renew_interval must be positive and shorter than ttl - fence_margin")
        self.leases = leases
        self.renew_interval = renew_interval
        self.fence_margin = fence_margin
        self.on_lost = on_lost
        self.on_acquired = on_acquired
        self.on_renewed = on_renewed  # after each successful renewal (the held deadlines moved on)
        self.clock = clock or SystemClock()
        self.held: dict[str, Held] = {}
        self.view: ClusterView | None = None
        self._changed = asyncio.Event()

    @property
    def window(self) -> float:
        """From a renewal's start to the deadline it grants."""
        return self.leases.ttl - self.fence_margin

    async def _db(self, fn: Callable[..., Any], *args: Any) -> Any:
        try:
            return await asyncio.to_thread(fn, *args)
        except psycopg.Error as exc:
            log.warning("lease database call failed", host=self.leases.host, error=str(exc).strip())
            return None

    async def _lose(self, company: str, reason: str) -> None:
        held = self.held.pop(company, None)
        if held is None:
            return
        self._changed.set()
        log.warning("lease lost", host=self.leases.host, company=company, token=held.token, reason=reason)
        await _call(self.on_lost, Loss(company, held.token, reason, held.deadline, self.clock.monotonic()))

    async def fence_due(self) -> None:
        """on_lost for every lease whose local deadline has passed."""
        now = self.clock.monotonic()
        for company, held in list(self.held.items()):
            if now >= held.deadline:
                await self._lose(company, "deadline")

    async def run(self) -> None:
        watchdog = asyncio.create_task(self._watch())
        try:
            first = True
            while True:
                started = self.clock.monotonic()
                await self.fence_due()  # a process resumed after a freeze stops here, before any statement
                renewal = await self._db(self.leases.renew_all, {c: h.token for c, h in self.held.items()})
                if renewal is not None:
                    await self._renewed(renewal, started)
                    if not first:  # the first renewal only announces this host
                        await self._balance(renewal.view)
                    first = False
                await self.clock.sleep(max(0.0, started + self.renew_interval - self.clock.monotonic()))
        finally:
            watchdog.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watchdog
            await self._stop()

    async def _stop(self) -> None:
        tokens = {c: h.token for c, h in self.held.items()}
        for company in list(self.held):
            await self._lose(company, "stopped")
        if tokens:
            await self._db(self.leases.release, tokens)
        self.leases.close()

    async def _renewed(self, renewal: Renewal, started: float) -> None:
        self.view = renewal.view
        deadline = started + self.window
        for company, held in list(self.held.items()):
            if renewal.held.get(company) == held.token:
                held.deadline = max(held.deadline, deadline)
            else:
                await self._lose(company, "taken")
        # Renewed in the database but fenced here while the statement was in flight: give back.
        stray = {c: t for c, t in renewal.held.items() if c not in self.held or self.held[c].token != t}
        if stray:
            await self._db(self.leases.release, stray)
        self._changed.set()
        await self.fence_due()  # a renewal that came back after its own deadline revives nothing
        if self.on_renewed is not None:
            self.on_renewed()

    async def _balance(self, view: ClusterView) -> None:
        target = share(view.companies, self.leases.cap, [cap for _, cap in view.others])
        surplus = len(self.held) - target
        if surplus > 0:
            give = sorted(self.held)[-surplus:]
            tokens = {c: self.held[c].token for c in give}
            for company in give:  # fenced here before the database lets anyone else take it
                await self._lose(company, "rebalanced")
            await self._db(self.leases.release, tokens)
        elif surplus < 0 and view.free > 0:
            started = self.clock.monotonic()
            got = await self._db(self.leases.acquire, min(-surplus, view.free))
            if got:
                log.info("leases acquired", host=self.leases.host, leases=got)
            for company, token in (got or {}).items():
                self.held[company] = Held(token, started + self.window)
                if self.on_acquired is not None:
                    await _call(self.on_acquired, company, token)
            self._changed.set()
            await self.fence_due()

    async def _watch(self) -> None:
        """Wake at the earliest deadline (or when deadlines change) and fence what is due."""
        while True:
            self._changed.clear()
            now = self.clock.monotonic()
            wait = min((h.deadline for h in self.held.values()), default=now + self.renew_interval) - now
            sleeper = asyncio.ensure_future(self.clock.sleep(max(0.0, wait)))
            changed = asyncio.ensure_future(self._changed.wait())
            try:
                await asyncio.wait({sleeper, changed}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for task in (sleeper, changed):
                    task.cancel()
            await self.fence_due()
