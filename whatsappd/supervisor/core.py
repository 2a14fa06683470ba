"""The Supervisor: every company's runner, what they share, and the acts on the set of companies.

It starts and shuts down the runners, applies a reloaded config, adds (put) and removes
(delete) companies, and answers counts and the status line. What happens inside one company
is runner.py's business; the worker process is process.py's. Every supervisor event leaves
through `publish`.
"""

from __future__ import annotations

import asyncio
import collections
import socket
import time
from collections.abc import Callable
from typing import Any, Protocol

from whatsappd import sessions
from whatsappd.config import CompanyConfig, Config, ConfigDiff
from whatsappd.errors import ErrorCode, Failure
from whatsappd.logs import get_logger
from whatsappd.states import State
from whatsappd.store.backend import StoreError
from whatsappd.supervisor.backoff import RateLimiter
from whatsappd.supervisor.devices import Devices, Place
from whatsappd.supervisor.launcher import make_launch
from whatsappd.supervisor.process import Kill, Launch, Launcher
from whatsappd.supervisor.registry import CompanyRegistry, RuntimeRegistry
from whatsappd.supervisor.runner import Intent, Runner, backoff_policy
from whatsappd.timefmt import iso_or_none

__all__ = ["ClusterHooks", "Supervisor"]


class ClusterHooks(Protocol):
    """What the supervisor asks of its host's cluster membership (cluster/node.py's ClusterNode
    fills it; the supervisor side never imports the cluster package)."""

    def deadline(self, company: str) -> float:
        """A new worker's fence deadline (CLOCK_MONOTONIC)."""
        ...

    def desire(self, company: str, run: bool) -> None:
        """Record the operator's run (connect) or stop, so it survives a failover."""
        ...


log = get_logger()

#: Workers that may be booting (spawned, not yet heard from) at once.
MAX_BOOTING_WORKERS = 8
#: States the status line does not remark on.
_UNREMARKABLE = frozenset({State.CONNECTED, State.STOPPED})


class Supervisor:
    def __init__(self, config: Config, on_change: Callable[[], None] = lambda: None,
                 launch: Launch | None = None) -> None:
        self.config = config
        self.on_change = on_change
        # How a worker process is started: by default as `[workers] launcher` says (applies at
        # restart: a zygote launcher keeps its helper processes until kill_all closes it).
        self.launch: Launch = launch or make_launch(config.workers_launcher, config.logging_level)
        self.listeners: list[Callable[[dict[str, Any], dict[str, Any] | None], None]] = []
        self.limiter = RateLimiter(config.reconnect_connect_rate)
        self.start_slots = asyncio.Semaphore(MAX_BOOTING_WORKERS)
        self.registry: CompanyRegistry = RuntimeRegistry(config.daemon_state_dir / "companies.json")
        # [cluster] (cluster/node.py sets node and replaces the registry): this host's id; whether
        # companies run only where their lease is held.
        self.host_id = config.cluster_host_id or socket.gethostname()
        self.cluster = config.cluster_enabled
        self.node: ClusterHooks | None = None
        # Where sessions live (files, or whatsmeow's tables in PostgreSQL for neonize companies).
        self.devices = Devices(config.sessions_dir, config.store_dsn or None, config.whatsmeow_dsn,
                               simulator_server_dir=config.simulator_server_dir)
        self.companies: dict[str, Runner] = {}
        self.stopping = False  # set at shutdown: nothing starts any more
        for company in config.companies:
            self.companies[company.id] = Runner(self, company, "config")

    def publish(self, event: dict[str, Any], secret: dict[str, Any] | None = None) -> None:
        """The one exit of supervisor events (state changes, pairing, worker events)."""
        event = {"at": iso_or_none(time.time()), **event}
        for listener in list(self.listeners):
            try:
                listener(event, secret)
            except Exception:
                log.exception("event listener failed")

    async def start(self) -> None:
        """Load runtime companies and discovered sessions; restore every paired company."""
        sessions_root = self.config.sessions_dir
        sessions.ensure_root(sessions_root)
        for company in self.registry.load():
            if company.id not in self.companies:
                self.companies[company.id] = Runner(self, company, "runtime")
        await self.devices.load()
        for found in [] if self.cluster else self.devices.discover():  # a cluster's are registered
            if found.company not in self.companies:
                log.info("found a paired session on disk" if self.devices.place(found.engine) is Place.FILES
                         else "found a paired device in PostgreSQL", company=found.company, engine=found.engine)
                self.companies[found.company] = Runner(
                    self, CompanyConfig(id=found.company, engine=found.engine), "discovered")
        if any(self.devices.place(r.config.engine) is Place.POSTGRESQL for r in self.companies.values()):
            # whatsmeow's schema once, under the migration lock, before any worker starts (each
            # worker start checks again: a company added later, a database that was down now).
            try:
                await self.devices.ensure_schema()
            except StoreError as exc:
                log.error("cannot create or upgrade whatsmeow's tables; workers will retry", error=str(exc))
        for runner in [] if self.cluster else self.companies.values():  # a cluster's start with their leases
            state = runner.session_state()
            if state is not sessions.SessionState.NONE:
                runner.start("restoring the stored session at daemon start" if state is sessions.SessionState.PAIRED
                             else "checking a session store that cannot be read")
            elif self.devices.jid(runner.id, runner.config.engine) is not None:
                log.warning("the company's recorded device is gone from the whatsmeow store; not starting it",
                            company=runner.id, jid=self.devices.jid(runner.id, runner.config.engine))
                runner.note_not_paired()

    async def shutdown(self, timeout: float) -> None:
        self.stopping = True
        grace = min(self.config.workers_stop_grace, timeout)
        await asyncio.gather(*(r.stop("daemon stopping", grace) for r in self.companies.values()),
                             return_exceptions=True)
        await self.kill_all()  # whatever is still there (it should be nothing) does not outlive us
        self.devices.close()

    async def kill_all(self) -> None:
        self.stopping = True
        for runner in self.companies.values():
            runner.stand_down()
            if runner.worker is not None:
                runner.worker.kill(Kill.FORCED_SHUTDOWN)
        await asyncio.gather(*(r.worker.wait() for r in self.companies.values() if r.worker),
                             return_exceptions=True)
        if isinstance(self.launch, Launcher):
            await self.launch.close()  # its zygotes (never a worker: they are all gone by now)

    async def apply(self, config: Config, diff: ConfigDiff) -> None:
        """Apply a reloaded config: only the companies in the diff are touched."""
        self.config = config
        self.limiter.rate = config.reconnect_connect_rate
        for runner in self.companies.values():
            runner.backoff.policy = backoff_policy(config)
        for cid in diff.removed:
            dropped = self.companies.get(cid)
            if dropped is None:  # deleted through the API meanwhile
                continue
            async with dropped.exclusive():
                runtime = self.registry.get(cid)
                if runtime is not None:
                    dropped.config, dropped.source = runtime, "runtime"
                    continue
                if await self._remove(dropped, "removed from the config"):
                    log.info("company removed by reload", company=cid)
        for cid in diff.added:
            company = config.company(cid)
            assert company is not None
            existing = self.companies.get(cid)
            if existing is not None:  # was runtime or discovered: the config now owns it
                existing.config, existing.source = company, "config"
                continue
            runner = self.companies[cid] = Runner(self, company, "config")
            log.info("company added by reload", company=cid)
            if runner.has_session():
                runner.start("added to the config with a stored session")
        for cid in diff.changed:
            company = config.company(cid)
            assert company is not None
            changed = self.companies.get(cid)
            if changed is None:
                continue
            log.info("company changed by reload", company=cid)
            if changed.reconfigure(company, changed.source):
                try:
                    await changed.restart("engine or proxy changed by reload")
                except Failure as exc:  # deleted while the restart waited its turn
                    if exc.code is not ErrorCode.COMPANY_NOT_FOUND:
                        raise

    def owned(self, company_id: str) -> int | None:
        """The lease token this host holds for the company, None if it does not own it; on a single
        host (no [cluster]) every company is this host's: 0."""
        if not self.cluster:
            return 0 if company_id in self.companies else None
        runner = self.companies.get(company_id)
        return runner.token if runner is not None else None

    def fence_deadline(self, company: str) -> float | None:
        """[cluster] A new worker's dead-man deadline (CLOCK_MONOTONIC); None on a single host."""
        return self.node.deadline(company) if self.node is not None else None

    def desire(self, company: str, run: bool) -> None:
        """[cluster] Record the operator's run/stop in the registry (it survives a failover)."""
        if self.node is not None:
            self.node.desire(company, run)

    def get(self, company_id: str) -> Runner:
        runner = self.companies.get(company_id)
        if runner is None:
            raise Failure(ErrorCode.COMPANY_NOT_FOUND, f"no company {company_id!r}; add it to the config "
                          "or with PUT /v1/companies/{id}")
        return runner

    async def put_company(self, company: CompanyConfig) -> tuple[bool, Runner]:
        while (existing := self.companies.get(company.id)) is not None:
            async with existing.exclusive():
                if existing.removed:
                    continue  # deleted while this waited its turn: create it anew
                if existing.source == "config":
                    raise Failure(ErrorCode.DEFINED_IN_CONFIG, f"company {company.id!r} is defined in the "
                                  f"config file ({self.config.source}); change it there and reload")
                self.registry.put(company)
                if existing.reconfigure(company, "runtime"):
                    await existing.restart_unlocked("engine or proxy changed")
                return False, existing
        self.registry.put(company)
        runner = self.companies[company.id] = Runner(self, company, "runtime")
        log.info("company added at runtime", company=company.id)
        if runner.has_session():
            runner.start("added with a stored session")
        self.on_change()
        return True, runner

    async def delete_company(self, company_id: str, wipe: bool) -> dict[str, Any]:
        """Stop (wipe=False) or log out and wipe (wipe=True) a company; a runtime one is then
        removed. Idempotent under concurrency: a delete that waited for another one that
        removed the company gets that one's answer."""
        runner = self.get(company_id)
        async with runner.exclusive():
            if runner.removed:
                if runner.removal is not None:
                    return dict(runner.removal)
                raise Failure(ErrorCode.COMPANY_NOT_FOUND, f"company {company_id!r} was removed meanwhile")
            runner.check_owner()
            result: dict[str, Any] = {"id": company_id}
            if wipe:
                result |= await runner.logout_unlocked()
            else:
                await runner.stop_unlocked("stopped by the operator", intent=Intent.STOP)
            if runner.source != "config":
                self.registry.remove(company_id)
                if wipe or not runner.has_session():
                    await self._remove(runner, "removed")
                    result["removed"] = True
            result["state"] = str(runner.state)
            if runner.removed:
                runner.removal = dict(result)
        self.on_change()
        return result

    async def remove_runner(self, runner: Runner, reason: str) -> bool:
        """Stop a company for good and forget it here (its act lock held), e.g. removed on another host."""
        return await self._remove(runner, reason)

    async def _remove(self, runner: Runner, reason: str) -> bool:
        """Stop a company for good and forget it (its act lock held). False if already gone."""
        if runner.removed:
            return False
        await runner.stop_unlocked(reason, intent=Intent.REMOVED)
        if self.companies.get(runner.id) is runner:
            del self.companies[runner.id]
        return True

    def counts(self) -> dict[str, int]:
        return dict(collections.Counter(str(r.state) for r in self.companies.values()))

    def list(self) -> list[dict[str, Any]]:
        return [self.companies[cid].snapshot() for cid in sorted(self.companies)]

    def status_line(self) -> str:
        total = len(self.companies)
        if not total:
            return "no companies configured"
        connected = sum(1 for r in self.companies.values() if r.state is State.CONNECTED)
        notes = []
        for runner in sorted(self.companies.values(), key=lambda r: r.id):
            if runner.state in _UNREMARKABLE:
                continue
            note = f"{runner.id} {runner.state}"
            if runner.retry_at is not None and runner.worker is None:
                note += f" (retry in {max(0, round(runner.retry_at - time.time()))}s)"
            notes.append(note)
        line = f"{connected}/{total} connected"
        if notes:
            line += "; " + ", ".join(notes[:3]) + (f" and {len(notes) - 3} more" if len(notes) > 3 else "")
        return line
