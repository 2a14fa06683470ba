"""The daemon's life: start, serve, reload, stop.

Signal handlers only queue the signal; this loop acts on it (gunicorn's rule, in asyncio).
Shutdown runs in phases within daemon.shutdown_timeout: stop accepting, stop the workers,
flush; a second SIGTERM/SIGINT during it kills what is left and exits at once.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import os
import signal
import socket
import time
from pathlib import Path
from typing import Any

from aiohttp import web

from whatsappd import __version__, pidlock
from whatsappd.cluster.setup import cluster_node, crosshost
from whatsappd.config import SETTINGS, Config, ConfigError, diff_configs, load_config
from whatsappd.control.app import Services, build_app
from whatsappd.control.companies import run_act
from whatsappd.control.listener import CappedSockSite
from whatsappd.control.socket_file import SocketSetupError, bind_control_socket
from whatsappd.exits import EX_DATAERR
from whatsappd.logs import configure_logging, get_logger
from whatsappd.messaging import EventBus, Maintenance, Messaging, OutboxSender
from whatsappd.metrics.collector import CompanySeries, DaemonMetrics
from whatsappd.metrics.listener import MetricsListener, bind_listen_socket
from whatsappd.store import Event, Secret, StoreBackend, StoreCorrupt, StoreError
from whatsappd.store.select import make_store
from whatsappd.supervisor import Supervisor
from whatsappd.supervisor.registry import RegistryError
from whatsappd.systemd import Notifier, listen_sockets, watchdog_interval
from whatsappd.timefmt import iso
from whatsappd.webhooks.delivery import WebhookDelivery

__all__ = ["Daemon"]

log = get_logger()

#: In STATE_DIR, held (flock) by the running daemon and naming its pid: one daemon per state dir.
STATE_LOCK_FILE = "whatsappd.lock"


def _sweep_tmp(directory: Path) -> None:
    """Remove what a previous run left in STATE_DIR/tmp (media handed to workers, downloads)."""
    if directory.is_dir() and not directory.is_symlink():
        for child in directory.iterdir():
            if child.is_file() or child.is_symlink():
                child.unlink(missing_ok=True)


class Daemon:
    def __init__(self, config: Config, config_path: Path | None, notifier: Notifier | None = None) -> None:
        self.config = config
        self.config_path = config_path
        self.notifier = notifier or Notifier()
        self.supervisor = Supervisor(config, on_change=self._status_changed)
        self.store: StoreBackend = make_store(config)
        # The event path (messaging/bus.py): the supervisor's events go to the bus, which lets the
        # outbox sender react and then journals them; each committed event comes back to the bus,
        # which hands it to the live stream readers and to the callers waiting for a status.
        sender = OutboxSender(self.store, self.supervisor, lambda: self.config)
        self.bus = EventBus(self.store, lambda: self.config.events_reader_buffer, react=sender.on_event)
        self.supervisor.listeners.append(self.bus.publish)
        # On PostgreSQL every host's events reach the bus, in seq order, through the journal tail.
        self.crosshost = crosshost(config, self.store, self.supervisor, self._committed, sender.wake,
                                   lambda r: {**r.snapshot(), "sending": self.messaging.pacing(r.id)})
        self.store.subscribe(self._committed if self.crosshost is None else self.crosshost.tail.local)
        self.cluster = cluster_node(config, self.supervisor, self.store, sender)  # None on a single host
        maintenance = Maintenance(self.store, sender.busy, lambda: self.config)
        self.messaging = Messaging(self.store, self.bus, sender, maintenance)
        # Webhooks read the journal from their own cursors; a commit only wakes them.
        self.webhooks = WebhookDelivery(self.store, lambda: self.config)
        self.webhooks.turn = self.crosshost.webhook_turn if self.crosshost is not None else None  # [cluster]: one host
        self.started_at = time.time()
        self.metrics = DaemonMetrics(self.supervisor, self.store, lambda: len(self.bus.subscribers),
                                     lambda: self.config.daemon_state_dir, self.started_at)
        self.store.subscribe(self.metrics.on_commit)
        self.metrics.registry.register(self.webhooks)  # per-webhook series (WebhookDelivery.collect)
        if self.cluster is not None:
            self.metrics.registry.register(self.cluster)  # leases held, lost, stale writes (ClusterNode.collect)
        self.metrics.company_series += [  # send pacing (issue 12); the queue's depth is whatsappd_outbox_pending_messages
            CompanySeries("whatsappd_pacing_delay_seconds",
                          "Seconds until pacing lets the company's next message go (0: it may send now).",
                          lambda r: self.messaging.pacing_delay(r.id)),
            CompanySeries("whatsappd_sending_paused",
                          "1 while a rate-limit or restriction error keeps the company from sending.",
                          lambda r: int(self.messaging.pacing(r.id)["state"] == "paused")),
        ]
        self.metrics_listener: MetricsListener | None = None
        self.stopping = False
        self.socket_path: str = ""
        self.last_reload: dict[str, Any] | None = None
        self._reload_lock = asyncio.Lock()
        self._signals: asyncio.Queue[signal.Signals] = asyncio.Queue()
        self._runner: web.AppRunner | None = None
        self._bound_inode: int | None = None  # set when we bound the socket file ourselves

    def _committed(self, event: Event, secret: Secret) -> None:
        """A committed journal event (every host's, on PostgreSQL): live readers, then webhooks."""
        self.bus.committed(event, secret)
        self.webhooks.committed(event, secret)

    # ------------------------------------------------------------------------- status, health

    def _status_changed(self) -> None:
        if self.crosshost is not None:
            self.crosshost.companies_changed()
        if not self.stopping:
            self.notifier.status(self.supervisor.status_line())

    def health(self) -> dict[str, Any]:
        counts = self.supervisor.counts()
        storage = self.store.health()
        return {
            "status": "stopping" if self.stopping else "ok" if storage["state"] == "ok" else "degraded",
            "version": __version__,
            "pid": os.getpid(),
            "started_at": iso(self.started_at),
            "uptime_seconds": round(time.time() - self.started_at, 3),
            "socket": self.socket_path,
            "config": {"source": self.config.source, "last_reload": self.last_reload},
            "companies": {"total": sum(counts.values()), "by_state": counts},
            "storage": storage,
            # Companies whose sending WhatsApp rate-limited: paused until, and why (pacing).
            "sending_paused": {cid: pacing for cid in sorted(self.supervisor.companies)
                               if (pacing := self.messaging.pacing(cid))["state"] == "paused"},
        }

    # --------------------------------------------------------------------------------- start

    def _open_socket(self) -> socket.socket:
        handed = listen_sockets()
        if handed:
            sock = handed[0]
            for extra in handed[1:]:
                extra.close()
            sock.setblocking(False)
            self.socket_path = str(sock.getsockname())
            log.info("using the control socket passed by systemd", socket=self.socket_path)
            return sock
        path = self.config.control_socket_path
        sock = bind_control_socket(path, self.config.control_socket_mode, self.config.control_socket_group)
        self._bound_inode = path.stat().st_ino
        self.socket_path = str(path)
        return sock

    def _remove_socket_file(self) -> None:
        """Remove the socket file we bound, unless it was since replaced by someone else's."""
        if self._bound_inode is None:
            return
        path = Path(self.socket_path)
        try:
            if path.stat().st_ino == self._bound_inode:
                path.unlink()
        except FileNotFoundError:
            pass

    async def run(self) -> int:
        """Serve until SIGTERM/SIGINT; return the process exit code."""
        try:
            self.config.daemon_state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as exc:
            log.error("cannot create the state directory", path=str(self.config.daemon_state_dir),
                      error=exc.strerror, hint="create it or set daemon.state_dir")
            return 1
        # Before anything else is opened: a second daemon on this state directory would serve the
        # same outbox and journal beside the first (only the sessions have locks of their own).
        lock_path = self.config.daemon_state_dir / STATE_LOCK_FILE
        try:
            lock = pidlock.acquire(lock_path)
        except pidlock.Held as held:
            log.error("cannot start: another whatsappd uses this state directory",
                      pid=held.pid, state_dir=str(self.config.daemon_state_dir), lock=str(lock_path),
                      hint=f"stop that daemon (pid {held.pid or 'unknown'}) first, or give this one "
                           "another daemon.state_dir")
            return 1
        except OSError as exc:
            log.error("cannot lock the state directory", path=str(lock_path), error=exc.strerror)
            return 1
        try:
            return await self._run_locked()
        finally:
            os.close(lock)  # the last thing: everything in the state directory is closed by now

    async def _run_locked(self) -> int:
        loop = asyncio.get_running_loop()
        try:
            sock = self._open_socket()
        except SocketSetupError as exc:
            log.error("cannot start: control socket unavailable", reason=str(exc))
            return 1
        listen = self.config.metrics_listen
        if listen is not None:
            try:
                self.metrics_listener = MetricsListener(bind_listen_socket(listen), listen, self.metrics.exposition)
            except OSError as exc:
                log.error("cannot start: the metrics listener cannot bind", address=str(listen), error=exc.strerror,
                          hint="free the port, or change or empty metrics.listen")
                sock.close()
                self._remove_socket_file()
                return 1

        services = Services(config=lambda: self.config, supervisor=self.supervisor, messaging=self.messaging,
                            store=self.store, health=self.health, reload=self.reload, started_at=self.started_at,
                            metrics=self.metrics, webhooks=self.webhooks, cluster=self.crosshost)
        self._runner = web.AppRunner(
            build_app(services), handle_signals=False, access_log=None,
            keepalive_timeout=self.config.control_idle_timeout,
        )
        await self._runner.setup()
        site = CappedSockSite(self._runner, sock, lambda: self.config,
                              shutdown_timeout=min(5.0, self.config.daemon_shutdown_timeout / 2))
        await site.start()

        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.add_signal_handler(sig, self._signals.put_nowait, sig)
        _sweep_tmp(self.config.daemon_state_dir / "tmp")
        try:
            self.store.open()
            if self.cluster is not None:
                await asyncio.to_thread(self.cluster.prepare, self.config)
            self.messaging.start()
            await self.supervisor.start()
            if self.cluster is not None:
                await self.cluster.start()
            if self.crosshost is not None:
                self.crosshost.start(functools.partial(run_act, services))
            await self.webhooks.start()  # last: its store read must not reorder the others' first steps
        except StoreCorrupt as exc:
            # One line that names the file and the fix; the exit status stops systemd's restarts.
            log.error("cannot start: the store is damaged", path=str(exc.path), problem=exc.problem, fix=exc.fix,
                      exit_status=EX_DATAERR)
            await self._runner.cleanup()
            await self._stop_metrics_listener()
            self._remove_socket_file()
            return EX_DATAERR
        except (RegistryError, StoreError, OSError) as exc:
            log.error("cannot start: unusable state directory", reason=str(exc))
            await self._runner.cleanup()
            await self._stop_metrics_listener()
            self._remove_socket_file()
            return 1
        if self.metrics_listener is not None:
            await self.metrics_listener.start()
        self.notifier.ready(self.supervisor.status_line())
        log.info("whatsappd ready", version=__version__, pid=os.getpid(), socket=self.socket_path,
                 state_dir=str(self.config.daemon_state_dir), config=self.config.source,
                 companies=len(self.supervisor.companies))
        watchdog = self._start_watchdog()
        ticker = loop.create_task(self._tick_status())
        try:
            while True:
                sig = await self._signals.get()
                if sig == signal.SIGHUP:
                    loop.create_task(self.reload(reason="SIGHUP"))
                    continue
                log.info("stopping", signal=sig.name, budget_seconds=self.config.daemon_shutdown_timeout)
                return await self._shutdown(site)
        finally:
            ticker.cancel()
            if watchdog is not None:
                watchdog.cancel()
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                loop.remove_signal_handler(sig)

    async def _tick_status(self) -> None:
        """While a company waits to retry, its countdown in STATUS= moves each second."""
        while True:
            await asyncio.sleep(1.0)
            if any(r.retry_at is not None and r.worker is None for r in self.supervisor.companies.values()):
                self._status_changed()

    def _start_watchdog(self) -> asyncio.Task[None] | None:
        interval = watchdog_interval()
        if interval is None:
            return None
        log.debug("watchdog enabled", interval_seconds=interval)

        async def ping() -> None:
            # Sent from the event loop on purpose: if the loop is stuck, systemd notices.
            while True:
                self.notifier.watchdog()
                await asyncio.sleep(interval)

        return asyncio.get_running_loop().create_task(ping())

    # ------------------------------------------------------------------------------ shutdown

    async def _shutdown(self, site: CappedSockSite) -> int:
        budget = self.config.daemon_shutdown_timeout
        deadline = time.monotonic() + budget
        # A reload under way finishes first (it is short), so systemd sees READY before STOPPING.
        try:
            await asyncio.wait_for(self._reload_lock.acquire(), timeout=budget / 4)
        except TimeoutError:
            log.warning("a reload is still running; stopping anyway")
        self.stopping = True
        self.supervisor.stopping = True  # a status call on a keep-alive connection restarts nothing now
        self.notifier.stopping()
        graceful = asyncio.get_running_loop().create_task(self._graceful_stop(site, deadline))
        forced = asyncio.get_running_loop().create_task(self._next_stop_signal())
        done, _ = await asyncio.wait({graceful, forced}, timeout=budget, return_when=asyncio.FIRST_COMPLETED)
        code = 0
        if graceful in done and graceful.exception() is not None:
            log.error("graceful shutdown failed; forcing", error=repr(graceful.exception()))
            await self.supervisor.kill_all()
            code = 1
        elif graceful not in done:
            reason = "second signal" if forced in done else "shutdown budget exhausted"
            log.warning("forcing shutdown", reason=reason)
            graceful.cancel()
            await self.supervisor.kill_all()
            try:  # what was committed is safe either way; this only tidies up
                await asyncio.wait_for(self._close_store(), 5.0)
            except (TimeoutError, Exception):
                log.warning("the store did not close cleanly; committed data is safe")
            code = 0 if forced not in done else 1
        forced.cancel()
        self._remove_socket_file()
        log.info("stopped", exit_code=code, seconds=round(budget - (deadline - time.monotonic()), 3))
        return code

    async def _stop_metrics_listener(self) -> None:
        if self.metrics_listener is not None:
            await self.metrics_listener.stop()
            self.metrics_listener = None

    async def _close_store(self) -> None:
        if self.crosshost is not None:
            await self.crosshost.close()
        await self.webhooks.close()
        await self.messaging.close()
        await self.store.close()

    async def _next_stop_signal(self) -> None:
        while (await self._signals.get()) == signal.SIGHUP:
            pass  # no reloads while stopping

    async def _graceful_stop(self, site: CappedSockSite, deadline: float) -> None:
        # 1. stop accepting new connections; open ones finish their request.
        await site.stop()
        await self._stop_metrics_listener()
        # 2. end the live event streams (their readers resume from their last seq).
        self.bus.end_streams()
        # 3. ask every worker to disconnect, kill those that do not in time.
        await self.supervisor.shutdown(timeout=max(0.5, deadline - time.monotonic() - 1.0))
        if self.cluster is not None:  # the workers are gone: give the leases back
            await self.cluster.stop()
        # 4. flush the journal and close the store, then the remaining client connections.
        await self._close_store()
        assert self._runner is not None
        await self._runner.cleanup()

    # -------------------------------------------------------------------------------- reload

    async def reload(self, reason: str) -> dict[str, Any]:
        """Parse, validate, diff, apply. An invalid file changes nothing."""
        async with self._reload_lock:
            self.notifier.reloading()
            log.info("reloading configuration", reason=reason, source=str(self.config_path or "default"))
            try:
                new = await asyncio.to_thread(load_config, self.config_path)
            except ConfigError as exc:
                log.error("reload failed; the previous configuration stays in force",
                          source=exc.source, problems=exc.problems)
                self.last_reload = {"at": iso(time.time()), "ok": False, "source": exc.source,
                                    "problems": exc.problems}
                self.notifier.ready(self.supervisor.status_line())
                return {"ok": False, "source": exc.source, "problems": exc.problems}
            diff = diff_configs(self.config, new)
            # Settings that apply only at start keep their running values until a restart.
            keep = {s.attr: getattr(self.config, s.attr) for s in SETTINGS if not s.reloadable}
            new = dataclasses.replace(new, **keep)
            if {"logging.format", "logging.level"} & set(diff.settings):
                configure_logging(new.logging_format, new.logging_level)
            self.config = new  # messaging reads it from here
            try:
                await self.supervisor.apply(new, diff)
                if self.cluster is not None:
                    await self.cluster.reloaded(new, diff)
                webhooks = await self.webhooks.apply(new)
            except Exception as exc:  # a bug: say so, but never leave systemd "reloading"
                log.exception("applying the reloaded configuration failed part-way")
                self.notifier.ready(self.supervisor.status_line())
                return {"ok": False, "source": new.source, "problems": [f"applying the change failed: {exc}"]}
            result = {"ok": True, "source": new.source, **diff.as_dict(), "webhooks": webhooks}
            self.last_reload = {"at": iso(time.time()), **result}
            log.info("configuration reloaded", **diff.as_dict(), webhooks=webhooks)
            if diff.restart_required:
                log.warning("some changed settings apply only after a restart",
                            settings=list(diff.restart_required))
            self.notifier.ready(self.supervisor.status_line())
            return result
