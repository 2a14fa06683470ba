"""One daemon as a host of a cluster (`[cluster] enabled = true`): leases drive its companies.

`ClusterNode` wires the lease layer (cluster/leases.py) and the company registry
(cluster/registry.py) into the daemon; daemon.py calls prepare, start, reloaded and stop, and the
supervisor asks it only for a worker's fence deadline and to record the operator's acts:

- Runners exist on every host for every registered company (reads work everywhere); the
  registry is read again each renew period, so companies added or removed elsewhere follow.
- A lease acquired (on_acquired): the runner gets the token; the company starts if it has a
  session and the operator did not stop it; otherwise messages a previous owner left `sending`
  are failed `send_interrupted` at once (when it starts, the sender settles them against the
  worker's send log, never requeuing another token's claim).
- A lease lost, or its local deadline passed (on_lost): the runner is fenced: its worker is
  SIGKILLed at once (not stopped gracefully: the lease may be another host's soon), its token
  cleared, so the store refuses anything more it would write for the company.
- After each renewal every worker gets its new fence deadline (protocol `fence`): a worker whose
  daemon is frozen dies by its own dead-man switch before the lease can expire elsewhere.
- The store gets a token lookup: claims, settles and company events are fenced (store/postgresql.py).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import TYPE_CHECKING, Any

import psycopg
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from whatsappd.cluster.leases import LeaseKeeper, Leases, Loss
from whatsappd.cluster.registry import ClusterRegistry, Registered
from whatsappd.config import Config, ConfigDiff
from whatsappd.errors import Failure
from whatsappd.logs import get_logger
from whatsappd.supervisor.registry import RegistryError
from whatsappd.supervisor.runner import Intent, Runner

if TYPE_CHECKING:
    from whatsappd.store.postgresql import PostgresStore
    from whatsappd.supervisor import Supervisor

__all__ = ["ClusterNode"]

log = get_logger()


class ClusterNode:
    def __init__(self, config: Config, supervisor: Supervisor, store: PostgresStore,
                 fail_in_flight: Callable[[str], Awaitable[None]]) -> None:
        self.host = config.cluster_host_id
        self.sup = supervisor
        self.store = store
        self._fail_in_flight = fail_in_flight
        self.registry = ClusterRegistry(config.store_dsn)
        self.leases = Leases(config.store_dsn, self.host, config.cluster_lease_ttl, config.cluster_max_companies)
        self.keeper = LeaseKeeper(self.leases, renew_interval=config.cluster_renew_interval,
                                  fence_margin=config.cluster_fence_margin, on_lost=self._lost,
                                  on_acquired=self._acquired, on_renewed=self._renewed)
        self.rows: dict[str, Registered] = {}
        self.losses: collections.Counter[str] = collections.Counter()  # leases lost, by reason
        self._tasks: list[asyncio.Task[None]] = []
        self._acts: set[asyncio.Task[None]] = set()  # restarts of companies changed elsewhere
        supervisor.registry = self.registry  # companies.json's place, same interface
        supervisor.node = self
        store.tokens = self.token

    # ------------------------------------------------------------------- what others ask

    def token(self, company: str) -> int | None:
        """The lease token this host holds for company, None if it holds none (the store's lookup,
        on its writer thread). The keeper's view, not the runner's: a company deleted here keeps its
        lease until the registry's next read, so its last events (its stop) still commit."""
        held = self.keeper.held.get(company)
        return held.token if held is not None else None

    def deadline(self, company: str) -> float:
        """The fence deadline for a worker of company starting now (CLOCK_MONOTONIC); already
        past if this host holds no lease for it, so such a worker could not live."""
        held = self.keeper.held.get(company)
        return held.deadline if held is not None else time.monotonic()

    def desire(self, company: str, run: bool) -> None:
        """The operator connected (run) or stopped the company: kept in the registry, so a stop
        survives a failover."""
        self.registry.desire(company, run)
        row = self.rows.get(company)
        if row is not None:
            self.rows[company] = Registered(row.company, row.source, run)

    # ------------------------------------------------------------------------- the life

    def prepare(self, config: Config) -> None:
        """Before the supervisor starts: this host's [[companies]] into the registry (with lease rows)."""
        try:
            self.registry.upsert_config(config.companies)
        except psycopg.Error as exc:
            raise RegistryError(f"cannot write this host's companies to the registry: {str(exc).strip()}") from exc

    async def start(self) -> None:
        """After the supervisor started: follow the registry, then the leases."""
        try:
            await self.refresh()
        except psycopg.Error as exc:
            raise RegistryError(f"cannot read the company registry: {str(exc).strip()}") from exc
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self.keeper.run(), name="lease-keeper"),
                       loop.create_task(self._follow_registry(), name="company-registry")]
        log.info("cluster host started", host=self.host, companies=len(self.rows),
                 lease_ttl=self.leases.ttl, renew_interval=self.keeper.renew_interval)

    async def stop(self) -> None:
        """After the workers stopped: give the leases back (LeaseKeeper releases them as it ends)."""
        tasks = [*self._tasks, *self._acts]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []
        self.registry.close()

    async def reloaded(self, config: Config, diff: ConfigDiff) -> None:
        """After the supervisor applied a reload: the file's companies upserted, the ones it
        dropped (and not added at runtime) removed from the registry, so every host drops them."""
        for cid in diff.removed:
            if self.registry.get(cid) is None:
                await asyncio.to_thread(self.registry.remove, cid)
        await asyncio.to_thread(self.registry.upsert_config, config.companies)

    # --------------------------------------------------------------------- the registry

    async def _follow_registry(self) -> None:
        while True:
            await asyncio.sleep(self.keeper.renew_interval)
            try:
                await self.refresh()
            except Exception as exc:  # the database away: the leases fence what must be fenced
                log.warning("cannot read the company registry; trying again", host=self.host, error=str(exc).strip())

    async def refresh(self) -> None:
        """Read the registry; add runners for companies new here, drop those removed elsewhere."""
        rows = await asyncio.to_thread(self.registry.rows)
        self.rows = rows
        changed = False
        for cid, row in rows.items():
            runner = self.sup.companies.get(cid)
            if runner is None:
                self.sup.companies[cid] = Runner(self.sup, row.company, row.source)
                log.info("company registered on another host", company=cid, host=self.host)
                changed = True
            elif not runner.busy and runner.reconfigure(row.company, row.source):
                # Changed on another host (PUT there): the owner restarts its worker, as one host does.
                self._spawn(self._restart(runner, "engine or proxy changed on another host"))
        # This host's own [[companies]] stay while its file lists them (a reload upserts them after
        # the supervisor added their runners: a refresh in between must not drop those).
        ours = {company.id for company in self.sup.config.companies}
        for cid in [c for c in self.sup.companies if c not in rows and c not in ours]:
            gone = self.sup.companies[cid]
            async with gone.exclusive():
                if cid not in self.rows and await self.sup.remove_runner(gone, "removed from the registry"):
                    log.info("company removed on another host", company=cid, host=self.host)
                    changed = True
        if changed:
            self.sup.on_change()

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._acts.add(task)
        task.add_done_callback(self._acts.discard)

    async def _restart(self, runner: Runner, reason: str) -> None:
        try:
            await runner.restart(reason)
        except Failure as exc:  # removed, or no longer owned here, while it waited its turn
            log.info("not restarting the company", company=runner.id, reason=reason, why=str(exc))

    # ----------------------------------------------------------------------- the leases

    async def _acquired(self, company: str, token: int) -> None:
        runner = self.sup.companies.get(company)
        if runner is None:
            await self.refresh()
            runner = self.sup.companies.get(company)
        if runner is None:  # a lease row without a company: nothing to run (the row goes with it)
            log.warning("acquired the lease of an unregistered company", company=company, token=token)
            return
        # Whether it has a session decides whether it starts: this host's device cache may predate
        # a pairing (or an unlink) on another host, so read the company's device again, off the loop
        # (within a renew period: the keeper awaits this; a database that slow leaves the cache's answer).
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.sup.devices.refresh(company, runner.config.engine), self.keeper.renew_interval)
        held = self.keeper.held.get(company)
        if held is None or held.token != token or self.sup.companies.get(company) is not runner:
            return  # lost (or the company removed) while its device was read: nothing to start here
        runner.token = token
        row = self.rows.get(company)
        wanted = row is None or row.run
        if not wanted and not runner.removed:  # the operator's stop, on whichever host: a status call must not undo it here
            runner.intent = Intent.STOP
        if wanted and runner.has_session():
            runner.start(f"lease acquired by {self.host} (token {token})")
        else:
            # No worker will settle them against its send log: a previous owner's claims end now.
            await self._fail_in_flight(company)

    def _lost(self, loss: Loss) -> None:
        self.losses[loss.reason] += 1
        runner = self.sup.companies.get(loss.company)
        if runner is not None and runner.token == loss.token:
            runner.fence(f"lease lost ({loss.reason})")

    def _renewed(self) -> None:
        for company, held in self.keeper.held.items():
            runner = self.sup.companies.get(company)
            if runner is not None and runner.worker is not None:
                runner.worker.fence(held.deadline)

    # ---------------------------------------------------------------------------- metrics

    def collect(self) -> list[Metric]:
        """The host's cluster series for the daemon's prometheus_client registry (daemon.py registers this)."""
        held = GaugeMetricFamily("whatsappd_cluster_leases_held", "Company leases this host holds (companies it owns).",
                                 value=len(self.keeper.held))
        lost = CounterMetricFamily("whatsappd_cluster_leases_lost", "Leases this host stopped holding, by reason: "
                                   "taken, deadline (not renewed in time), rebalanced, stopped.", labels=["reason"])
        for reason in ("taken", "deadline", "rebalanced", "stopped"):
            lost.add_metric([reason], self.losses[reason])
        refused = CounterMetricFamily("whatsappd_cluster_stale_writes_refused", "Writes for a company refused because "
                                      "this host no longer held its lease (a claim, a settle, a journal event).",
                                      value=self.store.stale_refusals)
        return [held, lost, refused]
