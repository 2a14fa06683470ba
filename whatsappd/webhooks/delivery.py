"""Webhook delivery: every journal event a webhook's filters match is POSTed to it, at least once,
in seq order (so in order per company), from a cursor persisted in the store.

The journal is the source of truth. Each webhook has its own task, which reads the journal after
its cursor (`StoreBackend.events_after`), POSTs one event at a time and moves its cursor once the
receiver answered 2xx. The commit listener (`committed`) wakes it; while it is caught up, it also
keeps the committed events it is handed (at most LIVE_MAX) so that it need not read back what was
just written. They are the journal's rows (a listener sees only committed events), and the
cursor is what survives: a restart, a reload or a crash resumes from the cursor, reading the
journal, and loses nothing. The cursor
is saved with at most one write in flight per webhook (a newer value replaces a pending one), so
a kill -9 re-delivers at most the events delivered during the last cursor write.

A failed POST (a non-2xx answer, a 3xx included: redirects are never followed; no answer within
`webhook_delivery.timeout`; no connection) is retried after a capped exponential delay with full
jitter; after `failing_after` failures in a row the webhook is `failing` until a POST succeeds.
Each webhook has its own HTTP session and task and holds no lock shared with anything: a dead
receiver holds back only its own webhook.

Events pruned from the journal (journal.max_age, journal.max_events) before a webhook delivered
them are reported, never skipped silently: the webhook's `lost_events` and `last_lost`, the
`whatsappd_webhook_events_lost_total` metric, and a warning in the log.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import enum
import functools
import json
import random
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from whatsappd import __version__
from whatsappd.errors import ErrorCode, Failure
from whatsappd.logs import get_logger
from whatsappd.store import Event, Secret, StoreBackend, StoreError
from whatsappd.supervisor.backoff import BackoffPolicy
from whatsappd.timefmt import iso_or_none
from whatsappd.webhooks.spec import (
    EVENT_TYPES_HEADER,
    SEQ_HEADER,
    SIGNATURE_HEADER,
    TIMESTAMP_HEADER,
    WEBHOOK_ID_HEADER,
    WebhookConfig,
    sign,
)

if TYPE_CHECKING:
    from whatsappd.config import Config

__all__ = ["Webhook", "WebhookDelivery", "WebhookState"]

log = get_logger()

#: Events read from the journal at once.
BATCH = 500
#: A webhook with nothing to do re-reads the journal this often anyway (its filters decide what
#: wakes it; this moves its cursor past events they leave out, and covers any missed wake-up).
IDLE_POLL = 5.0
#: The most of a receiver's answer that is read (the rest is dropped with the connection).
MAX_ANSWER = 64 * 1024
#: Events kept in memory for a caught-up webhook at most; past this it reads the journal again.
LIVE_MAX = 2 * BATCH
#: Seconds between two tries to save a cursor while the store refuses writes (disk full).
SAVE_RETRY = 1.0


class OwnThreadResolver(AbstractResolver):
    """Name lookups on the webhook's own thread. aiohttp's default resolver uses the loop's default
    executor, which the store's reads use too: a DNS server that never answers would tie up its
    threads and slow the event stream. Here it holds back only this webhook."""

    def __init__(self) -> None:
        self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="webhook-dns")

    async def resolve(self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
                      ) -> list[ResolveResult]:
        lookup = functools.partial(socket.getaddrinfo, host, port, family, socket.SOCK_STREAM, 0, socket.AI_ADDRCONFIG)
        infos = await asyncio.get_running_loop().run_in_executor(self._executor, lookup)
        return [ResolveResult(hostname=host, host=str(address[0]), port=int(address[1]), family=found, proto=proto,
                              flags=socket.AI_NUMERICHOST | socket.AI_NUMERICSERV)
                for found, _, proto, _, address in infos if found in (socket.AF_INET, socket.AF_INET6)]

    async def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


class WebhookState(enum.StrEnum):
    OK = "ok"  # the last POST succeeded (or none was needed yet)
    RETRYING = "retrying"  # the last POST failed; it is retried after a delay
    FAILING = "failing"  # failing_after POSTs in a row failed; still retried, from its cursor


@dataclass(frozen=True)
class Retry:
    """The retry settings, read from the configuration at each failure (reloadable)."""

    timeout: float
    policy: BackoffPolicy
    failing_after: int

    @classmethod
    def of(cls, config: Config) -> Retry:
        return cls(config.webhook_delivery_timeout,
                   BackoffPolicy(config.webhook_delivery_initial_delay, 2.0, config.webhook_delivery_max_delay),
                   config.webhook_delivery_failing_after)


class Webhook:
    """One webhook: its definition, its delivery task and HTTP session, its cursor and figures."""

    def __init__(self, config: WebhookConfig, source: str, cursor: int, store: StoreBackend,
                 retry: Callable[[], Retry], turn: asyncio.Event | None = None) -> None:
        self.config = config
        self._turn = turn  # several hosts: set while this host is the one delivering (None: always)
        self.source = source  # "config" or "runtime"
        self.cursor = cursor
        self._saved = cursor
        self._store = store
        self._retry = retry
        self.wake = asyncio.Event()
        self.state = WebhookState.OK
        self.delivered = 0  # since the daemon started
        self.failures = 0
        self.consecutive_failures = 0
        self.last_error: dict[str, Any] | None = None
        self.last_success_at: float | None = None
        self.next_attempt_at: float | None = None
        self.pending_since: float | None = None  # the `at` of the event being delivered
        self.lost_events = 0
        self.last_lost: dict[str, Any] | None = None
        self._task: asyncio.Task[None] | None = None
        self._saving: asyncio.Task[None] | None = None
        self._session: aiohttp.ClientSession | None = None
        self._resolver: OwnThreadResolver | None = None
        #: While caught up: the matching events committed after _live_from, as the listener handed
        #: them over (None: not kept; the journal is read).
        self._live: list[Event] | None = None
        self._live_from = 0

    # ------------------------------------------------------------------------ start, stop

    def start(self) -> None:
        target = self.config.target
        self._resolver = OwnThreadResolver()
        connector: aiohttp.BaseConnector = (aiohttp.UnixConnector(path=target.socket) if target.socket
                                            else aiohttp.TCPConnector(limit=1, resolver=self._resolver))
        self._session = aiohttp.ClientSession(connector=connector, headers={"User-Agent": f"whatsappd/{__version__}"})
        self.wake.set()
        self._task = asyncio.get_running_loop().create_task(self._run(), name=f"webhook {self.config.id}")

    async def stop(self) -> None:
        """Stop delivering (an in-flight POST is abandoned: it is sent again later) and save the cursor."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self._session is not None:
            await self._session.close()
        if self._resolver is not None:
            await self._resolver.close()  # the connector closes only a resolver it made itself
        self._save()
        if self._saving is not None:
            # Bounded: a store that refuses writes (full disk) must not hold up a shutdown; the
            # cursor saved before is then where delivery resumes (those events come again).
            done, _ = await asyncio.wait({self._saving}, timeout=SAVE_RETRY * 5)
            if not done:
                self._saving.cancel()
                await asyncio.gather(self._saving, return_exceptions=True)

    # -------------------------------------------------------------------------- delivery

    def offer(self, event: Event) -> None:
        """A committed event its filters match (from the commit listener): kept while the webhook is
        caught up, so that it need not read back what it was just handed; then it is woken."""
        if self._live is not None:
            if len(self._live) < LIVE_MAX:
                self._live.append(event)
            else:  # it fell behind (a receiver down): read the journal again when it catches up
                self._live = None
        self.wake.set()

    async def _run(self) -> None:
        store, config = self._store, self.config
        while True:
            try:
                if self._turn is not None and not self._turn.is_set():
                    await self._wait_turn()
                self.wake.clear()  # before reading: anything committed from now on wakes us again
                top = store.last_seq  # every event up to here has been offered (deliver() is synchronous)
                full = False
                if self._live is not None and self._live_from <= self.cursor:
                    # Caught up: what the listener handed over since _live_from is every matching event.
                    batch = [event for event in self._live if event.seq > self.cursor]
                    self._live, self._live_from = [], top
                else:
                    batch = await store.events_after(self.cursor, BATCH, config.companies, config.events, until=top)
                    await self._check_lost(batch[0].seq if batch else top + 1)
                    full = len(batch) == BATCH
                for event in batch:
                    await self._deliver(event)
                    self.cursor = event.seq
                    self._save()
                if not full:
                    if top > self.cursor:  # what is left up to top, its filters left out
                        self.cursor = top
                        self._save()
                    if self._live is None:  # keep what is committed from now on; the journal has the rest
                        self._live, self._live_from = [], store.last_seq
                    try:
                        await asyncio.wait_for(self.wake.wait(), IDLE_POLL)
                    except TimeoutError:
                        pass
            except asyncio.CancelledError:
                raise
            except Exception:  # a store read failed (or a bug): say so, wait, start over from the cursor
                log.exception("webhook delivery failed; retrying", webhook=config.id)
                self._live = None
                await asyncio.sleep(SAVE_RETRY)

    async def _wait_turn(self) -> None:
        """Another host delivers (several hosts, one store): wait until it is this host's turn,
        then go on from the cursor the other host stored (at least once: it may have sent an
        event it had not stored as done yet)."""
        assert self._turn is not None
        await self._turn.wait()
        stored = {row["id"]: row["cursor"] for row in await self._store.webhooks()}.get(self.config.id)
        if stored is not None:
            self.cursor = self._saved = stored
        self._live = None

    async def _check_lost(self, first: int) -> None:
        """Report the events between the cursor and `first` (the next one to deliver) that the
        journal no longer holds; those that are still there were left out by the filters."""
        if first <= self.cursor + 1:
            return
        oldest = await self._store.oldest_seq()
        kept_from = self._store.last_seq + 1 if oldest is None else oldest
        last_lost = min(first, kept_from) - 1
        if last_lost <= self.cursor:
            return
        count = last_lost - self.cursor
        self.lost_events += count
        self.last_lost = {"first_seq": self.cursor + 1, "last_seq": last_lost, "count": count,
                          "at": iso_or_none(time.time())}
        log.warning("webhook events lost: pruned from the journal before they were delivered", webhook=self.config.id,
                    first_seq=self.cursor + 1, last_seq=last_lost, count=count,
                    hint="some may not have matched its filters; raise journal.max_age / journal.max_events, "
                         "or fix the receiver sooner")
        self.cursor = last_lost
        self._save()

    async def _deliver(self, event: Event) -> None:
        """POST the event until the receiver answers 2xx."""
        assert self._session is not None
        body = json.dumps(event.as_dict(), separators=(",", ":"), ensure_ascii=False).encode()
        target = self.config.target
        self.pending_since = event.at
        while True:
            retry = self._retry()
            timestamp = int(time.time())
            headers = {"Content-Type": "application/json", TIMESTAMP_HEADER: str(timestamp),
                       SIGNATURE_HEADER: sign(self.config.secret, timestamp, body),
                       WEBHOOK_ID_HEADER: self.config.id, SEQ_HEADER: str(event.seq), EVENT_TYPES_HEADER: event.type}
            error = await self._post(target.url, body, headers, retry.timeout)
            if error is None:
                self._succeeded()
                self.pending_since = None
                return
            delay = self._failed(error, event.seq, retry)
            await asyncio.sleep(delay)

    async def _post(self, url: str, body: bytes, headers: dict[str, str], timeout: float) -> str | None:
        """One POST; None if the receiver took it, else why not (one sentence)."""
        assert self._session is not None
        try:
            async with asyncio.timeout(timeout):
                async with self._session.post(url, data=body, headers=headers, allow_redirects=False) as resp:
                    await resp.content.read(MAX_ANSWER)
                    if 200 <= resp.status < 300:
                        return None
                    if 300 <= resp.status < 400:
                        return (f"answered {resp.status} (a redirect to {resp.headers.get('Location', '?')!r}); "
                                "redirects are never followed: configure the final URL")
                    return f"answered HTTP {resp.status}"
        except TimeoutError:
            return f"no answer within {timeout:g}s (webhook_delivery.timeout)"
        except (aiohttp.ClientError, OSError) as exc:
            return f"cannot reach it: {exc or type(exc).__name__}"

    def _succeeded(self) -> None:
        self.delivered += 1
        self.last_success_at = time.time()
        self.next_attempt_at = None
        if self.state is not WebhookState.OK:
            log.info("webhook receiver answers again; delivering from its cursor", webhook=self.config.id,
                     failed_attempts=self.consecutive_failures, cursor=self.cursor)
            self.state = WebhookState.OK
        self.consecutive_failures = 0

    def _failed(self, error: str, seq: int, retry: Retry) -> float:
        """Count a failed POST; the delay before the next attempt."""
        self.failures += 1
        self.consecutive_failures += 1
        self.last_error = {"message": error, "seq": seq, "at": iso_or_none(time.time())}
        delay = random.uniform(0.0, retry.policy.cap(self.consecutive_failures - 1))
        self.next_attempt_at = time.time() + delay
        if self.consecutive_failures == 1:
            log.warning("webhook POST failed; retrying", webhook=self.config.id, seq=seq, error=error,
                        retry_in_seconds=round(delay, 3))
            self.state = WebhookState.RETRYING
        if self.consecutive_failures >= retry.failing_after and self.state is not WebhookState.FAILING:
            log.error("webhook failing: its receiver keeps refusing; still retrying from its cursor",
                      webhook=self.config.id, seq=seq, error=error, failed_attempts=self.consecutive_failures)
            self.state = WebhookState.FAILING
        return delay

    # ---------------------------------------------------------------------------- cursor

    def _save(self) -> None:
        """Persist the cursor: one write in flight at a time, the newest value next."""
        if self.cursor != self._saved and (self._saving is None or self._saving.done()):
            self._saving = asyncio.get_running_loop().create_task(self._save_loop())

    async def _save_loop(self) -> None:
        while self._saved != self.cursor:
            cursor = self.cursor
            try:
                await self._store.set_webhook_cursor(self.config.id, cursor)
            except StoreError as exc:  # a full disk: delivery goes on; the cursor is saved once there is room
                log.warning("cannot save a webhook's cursor; retrying", webhook=self.config.id, error=str(exc))
                await asyncio.sleep(SAVE_RETRY)
                continue
            self._saved = cursor

    # ---------------------------------------------------------------------------- status

    def snapshot(self) -> dict[str, Any]:
        top = self._store.last_seq
        return {
            **self.config.public(), "source": self.source, "has_secret": True, "state": str(self.state),
            "cursor": self.cursor, "last_seq": top, "lag": max(0, top - self.cursor),
            "pending_since": iso_or_none(self.pending_since), "delivered": self.delivered, "failures": self.failures,
            "consecutive_failures": self.consecutive_failures, "last_error": self.last_error,
            "last_success_at": iso_or_none(self.last_success_at), "next_attempt_at": iso_or_none(self.next_attempt_at),
            "lost_events": self.lost_events, "last_lost": self.last_lost,
        }


class WebhookDelivery:
    """Every webhook: those of the config file and those added through the API (config wins)."""

    def __init__(self, store: StoreBackend, config: Callable[[], Config]) -> None:
        self.store = store
        self._config = config
        self.hooks: dict[str, Webhook] = {}
        self._runtime: dict[str, WebhookConfig] = {}  # PUT /v1/webhooks definitions, by id
        self._cursors: dict[str, int] = {}  # every stored row's cursor, by id
        self._lock = asyncio.Lock()  # one act (start, reload, put, delete) at a time; never held by delivery
        self._started = False
        #: Several hosts on one store: set while this host is the one that delivers (cluster/hosts.py).
        self.turn: asyncio.Event | None = None

    def _retry(self) -> Retry:
        return Retry.of(self._config())

    async def start(self) -> None:
        """Once the store is open: load the stored rows and start every webhook."""
        from whatsappd.webhooks.spec import parse_webhook

        async with self._lock:
            for row in await self.store.webhooks():
                self._cursors[row["id"]] = row["cursor"]
                if row["definition"] is not None:
                    try:
                        self._runtime[row["id"]] = parse_webhook(row["definition"])
                    except ValueError as exc:  # written by a later version, or edited by hand: say so
                        log.error("a stored webhook is unusable; it is not delivered to", webhook=row["id"],
                                  problems=str(exc), hint="PUT /v1/webhooks/{id} again, or DELETE it")
            self._started = True
            await self._reconcile(self._config().webhooks)

    async def apply(self, config: Config) -> dict[str, list[str]]:
        """A reloaded configuration: start, stop or restart the webhooks it changed; which, by id
        ({"added", "changed", "removed"}: /v1/reload's `webhooks`)."""
        if not self._started:
            return {"added": [], "changed": [], "removed": []}
        async with self._lock:
            return await self._reconcile(config.webhooks)

    async def _reconcile(self, configured: tuple[WebhookConfig, ...]) -> dict[str, list[str]]:
        """Run exactly the wanted webhooks; the ids started, restarted (another definition or source), stopped."""
        wanted: dict[str, tuple[WebhookConfig, str]] = {w.id: (w, "runtime") for w in self._runtime.values()}
        wanted.update({w.id: (w, "config") for w in configured})  # the config file wins
        before = set(self.hooks)
        restarted: list[str] = []
        for webhook_id, hook in list(self.hooks.items()):
            if wanted.get(webhook_id) != (hook.config, hook.source):
                await self._stop(webhook_id)
                if webhook_id in wanted:
                    restarted.append(webhook_id)
        for webhook_id, (definition, source) in sorted(wanted.items()):
            if webhook_id not in self.hooks:
                await self._start(definition, source)
        return {"added": sorted(set(self.hooks) - before), "changed": sorted(restarted),
                "removed": sorted(before - set(self.hooks))}

    async def _start(self, definition: WebhookConfig, source: str) -> Webhook:
        cursor = self._cursors.get(definition.id)
        if cursor is None:  # a new webhook gets the events from now on
            cursor = await self.store.put_webhook(definition.id, None, self.store.last_seq)
            self._cursors[definition.id] = cursor
        hook = self.hooks[definition.id] = Webhook(definition, source, cursor, self.store, self._retry, self.turn)
        hook.start()
        log.info("webhook delivering", webhook=definition.id, source=source, cursor=cursor)
        return hook

    async def _stop(self, webhook_id: str) -> None:
        hook = self.hooks.pop(webhook_id)
        await hook.stop()
        self._cursors[webhook_id] = hook.cursor
        log.info("webhook stopped", webhook=webhook_id, cursor=hook.cursor)

    async def close(self) -> None:
        async with self._lock:
            await asyncio.gather(*(self._stop(w) for w in list(self.hooks)))
            self._started = False

    # --------------------------------------------------------------------- commit listener

    def committed(self, event: Event, secret: Secret) -> None:
        """A committed journal event (the store calls this): wake the webhooks it is for."""
        for hook in self.hooks.values():
            if hook.config.wants(event.company, event.type):
                hook.offer(event)

    # ------------------------------------------------------------------------ for the API

    def snapshots(self) -> list[dict[str, Any]]:
        return [self.hooks[w].snapshot() for w in sorted(self.hooks)]

    def get(self, webhook_id: str) -> Webhook:
        hook = self.hooks.get(webhook_id)
        if hook is None:
            raise Failure(ErrorCode.WEBHOOK_NOT_FOUND, f"no webhook {webhook_id!r}; add it to the config "
                          "([[webhooks]]) or with PUT /v1/webhooks/{id}")
        return hook

    def runtime_secret(self, webhook_id: str) -> str | None:
        """The secret of a webhook added through the API (an update may leave it out)."""
        existing = self._runtime.get(webhook_id)
        return None if existing is None else existing.secret

    async def put(self, definition: WebhookConfig) -> tuple[bool, Webhook]:
        """Add or replace a runtime webhook (stored before the answer); (created, webhook)."""
        async with self._lock:
            if any(w.id == definition.id for w in self._config().webhooks):
                raise Failure(ErrorCode.DEFINED_IN_CONFIG, f"webhook {definition.id!r} is defined in the config "
                              f"file ({self._config().source}); change it there and reload")
            created = definition.id not in self._runtime
            cursor = await self.store.put_webhook(definition.id, definition.definition(),
                                                  self._cursors.get(definition.id, self.store.last_seq))
            self._cursors.setdefault(definition.id, cursor)
            self._runtime[definition.id] = definition
            await self._reconcile(self._config().webhooks)
            return created, self.hooks[definition.id]

    async def delete(self, webhook_id: str) -> dict[str, Any]:
        """Remove a runtime webhook with its cursor."""
        async with self._lock:
            hook = self.get(webhook_id)
            if hook.source == "config":
                raise Failure(ErrorCode.DEFINED_IN_CONFIG, f"webhook {webhook_id!r} is defined in the config "
                              f"file ({self._config().source}); remove it there and reload")
            await self._stop(webhook_id)
            await self.store.delete_webhook(webhook_id)
            del self._runtime[webhook_id]
            self._cursors.pop(webhook_id, None)
            return {"id": webhook_id, "removed": True, "cursor": hook.cursor}

    def collect(self) -> list[Metric]:
        """Per-webhook series for the daemon's prometheus_client registry (daemon.py registers this)."""
        hooks = [self.hooks[w] for w in sorted(self.hooks)]
        lag = GaugeMetricFamily("whatsappd_webhook_lag", "Journal events after a webhook's cursor.", labels=["webhook"])
        failing = GaugeMetricFamily("whatsappd_webhook_failing", "1 while a webhook is failing.", labels=["webhook"])
        for h in hooks:
            lag.add_metric([h.config.id], max(0, self.store.last_seq - h.cursor))
            failing.add_metric([h.config.id], int(h.state is WebhookState.FAILING))
        out: list[Metric] = [lag, failing]
        for name, attr, what in (("delivered", "delivered", "Events delivered (2xx) since start."),
                                 ("failures", "failures", "Failed POSTs since start."),
                                 ("events_lost", "lost_events", "Events pruned from the journal before delivery.")):
            counter = CounterMetricFamily(f"whatsappd_webhook_{name}", what, labels=["webhook"])
            for h in hooks:
                counter.add_metric([h.config.id], getattr(h, attr))
            out.append(counter)
        return out
