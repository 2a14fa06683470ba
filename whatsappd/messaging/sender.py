"""What the CRM uses the connections for: the event journal, live streams and the outbox.

- Every supervisor event (state changes, pairing progress, incoming messages, receipts) is
  appended to the journal; outbox status changes too. Readers see an event only once it is
  committed (see store.py).
- Outbox status changes are journaled by the store in the same transaction as the change
  (a crash cannot separate them); they reach live readers like every other event.
- One sender task per company sends its queued messages in order while it is connected.
  A message is marked `sending` before the worker is asked; after a crash the worker's send
  log settles it (see docs/INTERNALS.md): sent once, or reported failed, never sent twice.
- Live stream readers get bounded queues: a reader that falls behind is cut off and resumes
  from its last seq; it never slows the daemon or other readers.
"""

from __future__ import annotations

import asyncio
import collections
import os
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from whatsappd.errors import ApiError, ErrorCode, Failure
from whatsappd.logs import get_logger
from whatsappd.states import State
from whatsappd.store.sqlite import EVENT_TYPES, Event, StorageFull, Store

if TYPE_CHECKING:
    from whatsappd.config import Config
    from whatsappd.supervisor import Runner, Supervisor

__all__ = ["EVENT_TYPES", "Messaging", "Subscriber"]

log = get_logger()

#: How long a receipt for a WhatsApp id we have not recorded yet is kept, waiting for it.
EARLY_RECEIPT_TTL = 300.0
_RECEIPT_RANK = {"delivered": 1, "read": 2}
#: Pause after a transient send failure before the next try (the worker is still connected).
SEND_RETRY_PAUSE = (1.0, 30.0)


@dataclass(eq=False)  # identity semantics: each reader is its own subscriber
class Subscriber:
    """One live stream reader: its filters and a bounded queue."""

    companies: frozenset[str]
    types: frozenset[str]
    maxsize: int
    queue: asyncio.Queue[tuple[int, bytes] | None] = field(init=False)  # (seq, NDJSON line); None ends
    overflowed: bool = False

    def __post_init__(self) -> None:
        self.queue = asyncio.Queue(self.maxsize)

    def wants(self, event: Event) -> bool:
        return ((not self.companies or event.company in self.companies)
                and (not self.types or event.type in self.types))

    def offer(self, item: tuple[int, bytes] | None) -> None:
        if self.overflowed:
            return
        try:
            self.queue.put_nowait(item)
        except asyncio.QueueFull:
            # Never wait for a slow reader: mark it; its stream ends with a "cut" line.
            self.overflowed = True


class Messaging:
    def __init__(self, store: Store, supervisor: Supervisor, config: Config) -> None:
        self.store = store
        self.sup = supervisor
        self.config = config
        self.subscribers: set[Subscriber] = set()
        self._senders: dict[str, asyncio.Task[None]] = {}
        self._wake: dict[str, asyncio.Event] = {}
        self._status_waiters: dict[str, list[asyncio.Future[None]]] = {}
        # Oldest first, so expired entries are dropped from the front (see _apply_receipt).
        self._early_receipts: collections.OrderedDict[tuple[str, str], tuple[str, float]] = collections.OrderedDict()
        self._sending: set[str] = set()  # message ids a sender has asked a worker to send, right now
        self._tasks: set[asyncio.Task[Any]] = set()
        self._maintenance: asyncio.Task[None] | None = None
        self.closed = False

    # ------------------------------------------------------------------------------ wiring

    def start(self) -> None:
        self.sup.listeners.append(self._on_supervisor_event)
        self.store.subscribe(self._on_committed)
        for runner in self.sup.companies.values():
            self._ensure_sender(runner)
        self._maintenance = asyncio.get_running_loop().create_task(self._maintain(), name="maintenance")

    async def close(self) -> None:
        self.closed = True
        for sub in list(self.subscribers):
            sub.offer(None)
        tasks = [t for t in (*self._senders.values(), self._maintenance, *self._tasks) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self.store.flush()

    def _spawn(self, write: Callable[[], Awaitable[Any]]) -> None:
        """Run write() in a task; while the disk is full it is tried again each second, so an
        incoming media reference or a receipt is applied once there is room, not lost."""

        async def until_stored() -> None:
            while True:
                try:
                    await write()
                    return
                except StorageFull:
                    await asyncio.sleep(1.0)  # the store logged it, once

        task = asyncio.get_running_loop().create_task(until_stored())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _ensure_sender(self, runner: Runner) -> None:
        task = self._senders.get(runner.id)
        if task is None or task.done():
            self._wake.setdefault(runner.id, asyncio.Event())
            self._senders[runner.id] = asyncio.get_running_loop().create_task(
                self._sender(runner.id), name=f"sender-{runner.id}")

    def _on_supervisor_event(self, event: dict[str, Any], secret: dict[str, Any] | None) -> None:
        if self.closed:
            return
        data = {k: v for k, v in event.items() if k not in ("type", "company", "at")}
        company = event.get("company")
        kind = event["type"]
        if kind == "message.incoming":
            raw = data.pop("raw", None)
            if raw and data.get("id"):
                self._spawn(lambda: self.store.store_incoming_media(
                    str(company), str(data["id"]), str(data.get("kind")), (data.get("media") or {}).get("mimetype"),
                    raw))
        elif kind == "message.receipt":
            self._spawn(lambda: self._apply_receipt(str(company), data))
        elif kind == "company.state":
            runner = self.sup.companies.get(str(company))
            if runner is not None:
                self._ensure_sender(runner)
                if data.get("new") == State.CONNECTED:
                    self._wake[runner.id].set()
                elif data.get("new") in (State.LOGGED_OUT, State.FAILED) and not runner.session_dir.exists():
                    # The wiped (or quarantined) session took the worker's send log with it: what
                    # was in flight can no longer be settled, and must not be resent later.
                    self._spawn(lambda: self._fail_in_flight(runner.id))
        self.store.append(company, kind, data, secret)

    def _on_committed(self, event: Event, secret: dict[str, Any] | None) -> None:
        encoded: tuple[int, bytes] | None = None
        for sub in list(self.subscribers):
            if sub.wants(event):
                if encoded is None:
                    # QR codes reach live readers only; the journal on disk never holds them.
                    encoded = (event.seq, event.line(secret))
                sub.offer(encoded)
        if event.type == "message.status":
            for future in self._status_waiters.pop(str(event.data.get("message_id")), []):
                if not future.done():
                    future.set_result(None)

    # ------------------------------------------------------------------------ live readers

    def subscribe(self, companies: frozenset[str], types: frozenset[str]) -> Subscriber:
        sub = Subscriber(companies, types, self.config.events_reader_buffer)
        self.subscribers.add(sub)
        return sub

    def unsubscribe(self, sub: Subscriber) -> None:
        self.subscribers.discard(sub)

    # ----------------------------------------------------------------------------- outbox

    async def enqueue(self, runner: Runner, idem_key: str | None, body: Any, recipient: str, to_input: str,
                      kind: str, payload: dict[str, Any], media: bytes | None, ttl: float) -> tuple[bool, dict[str, Any]]:
        created, message = await self.store.enqueue(runner.id, idem_key, body, recipient, to_input, kind,
                                                    payload, media, ttl, self.config.outbox_idempotency_window)
        if created:  # its `queued` event was journaled with it (store.py)
            self._ensure_sender(runner)
            self._wake[runner.id].set()
        return created, message

    async def wait_status(self, company: str, message_id: str, done: Callable[[dict[str, Any]], bool],
                          timeout: float) -> dict[str, Any] | None:
        deadline = time.monotonic() + timeout
        while True:
            future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            waiters = self._status_waiters.setdefault(message_id, [])
            waiters.append(future)
            try:
                message = await self.store.message(company, message_id)
                if message is None or done(message):
                    return message
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return message
                try:
                    await asyncio.wait_for(future, remaining)
                except TimeoutError:
                    return await self.store.message(company, message_id)
            finally:
                # Never leave a waiter behind: a message that is already final gets no event.
                if future in waiters:
                    waiters.remove(future)
                if not waiters and self._status_waiters.get(message_id) is waiters:
                    del self._status_waiters[message_id]

    async def _apply_receipt(self, company: str, data: dict[str, Any]) -> None:
        status = {"delivered": "delivered", "read": "read", "played": "read"}.get(str(data.get("receipt")))
        ids = [str(i) for i in data.get("ids") or []]
        if status is None or not ids:
            return
        _, unknown = await self.store.receipt(company, ids, status)
        # A receipt can overtake the reply to its send (they travel separately): keep it until
        # the message is recorded as sent, then apply it.
        now = time.monotonic()
        for wa_id in unknown:
            previous = self._early_receipts.get((company, wa_id))
            if previous is None or _RECEIPT_RANK[status] > _RECEIPT_RANK[previous[0]]:
                self._early_receipts[(company, wa_id)] = (status, previous[1] if previous else now)
        while self._early_receipts:
            key, (_, at) = next(iter(self._early_receipts.items()))
            if now - at <= EARLY_RECEIPT_TTL:
                break
            del self._early_receipts[key]

    async def _apply_early_receipt(self, company: str, wa_id: str | None) -> None:
        early = self._early_receipts.pop((company, str(wa_id)), None) if wa_id else None
        if early is not None:
            await self.store.receipt(company, [str(wa_id)], early[0])

    async def _sender(self, company: str) -> None:
        """Send this company's queued messages, one at a time, in order, while connected."""
        wake = self._wake[company]
        settled_for_pid: int | None = None
        pause = SEND_RETRY_PAUSE[0]
        while not self.closed:
            runner = self.sup.companies.get(company)
            if runner is None:
                return
            worker = runner.worker
            if runner.state is not State.CONNECTED or worker is None:
                wake.clear()
                await wake.wait()
                continue
            try:
                if settled_for_pid != worker.pid:
                    await self._settle_in_flight(runner)
                    settled_for_pid = worker.pid
                message = await self.store.next_pending(company)
                if message is None:
                    wake.clear()
                    if await self.store.next_pending(company) is None:
                        await wake.wait()
                    continue
                ok = await self._send_one(runner, message)
                pause = SEND_RETRY_PAUSE[0] if ok else min(pause * 2, SEND_RETRY_PAUSE[1])
                if not ok:
                    wake.clear()
                    try:
                        await asyncio.wait_for(wake.wait(), pause)
                    except TimeoutError:
                        pass
            except asyncio.CancelledError:
                raise
            except StorageFull:
                await asyncio.sleep(SEND_RETRY_PAUSE[0])  # the store logged it, once; the message waits
            except Exception:
                log.exception("outbox sender failed; retrying", company=company)
                await asyncio.sleep(SEND_RETRY_PAUSE[0])

    async def _settle_in_flight(self, runner: Runner) -> None:
        """Messages left `sending` by a crash: ask the worker's send log what became of them."""
        in_flight = await self.store.in_flight(runner.id)
        if not in_flight:
            return
        ids = [m["id"] for m in in_flight]
        result = await runner.command("send_status", {"outbox_ids": ids}, timeout=self.config.outbox_send_timeout)
        statuses = result.get("statuses") or {}
        for message in in_flight:
            status = statuses.get(message["id"]) or {"state": "unknown"}
            if status.get("state") == "sent":
                changed = await self.store.set_status(message["id"], "sent", wa_id=status.get("wa_id"))
                if changed is not None:
                    await self._apply_early_receipt(runner.id, changed.get("wa_id"))
                    continue
            elif status.get("state") == "attempted":
                changed = await self.store.set_status(
                    message["id"], "failed", error_code=ErrorCode.SEND_INTERRUPTED,
                    error="the daemon stopped while this message was being sent; it may or may not have "
                          "been delivered, and it is not resent to avoid a duplicate")
            else:
                changed = await self.store.set_status(message["id"], "queued")
            if changed is not None:
                log.info("settled an interrupted send", company=runner.id, message_id=message["id"],
                         status=changed["status"])

    async def _fail_in_flight(self, company: str) -> None:
        for message in await self.store.in_flight(company):
            await self.store.set_status(  # journals its message.status event itself (store.py)
                message["id"], "failed", error_code=ErrorCode.SEND_INTERRUPTED,
                error="the session was logged out or quarantined while this message was being sent; it "
                      "may or may not have been delivered")

    async def _send_one(self, runner: Runner, message: dict[str, Any]) -> bool:
        sending = await self.store.set_status(message["id"], "sending")
        if sending is None:
            return True  # expired or changed meanwhile
        self._sending.add(message["id"])
        try:
            return await self._send_sending(runner, message)
        finally:
            self._sending.discard(message["id"])

    async def _send_sending(self, runner: Runner, message: dict[str, Any]) -> bool:
        media_path: Path | None = None
        args: dict[str, Any] = {
            "outbox_id": message["id"], "to": message["jid"], "kind": message["kind"],
            "text": message.get("text"), "caption": message.get("caption"),
            "filename": message.get("filename"), "mimetype": message.get("mimetype"),
        }
        try:
            if message["kind"] != "text":
                data = await self.store.media(message["id"])
                if data is None:
                    raise ApiError(ErrorCode.MEDIA_INVALID, "the stored media is missing")
                media_path = await asyncio.to_thread(_write_media_file, self.sup.config.daemon_state_dir, data)
                args["media_path"] = str(media_path)
            result = await runner.command("send", args, timeout=self.config.outbox_send_timeout)
        except Failure as exc:
            if exc.code in (ErrorCode.WORKER_EXITED, ErrorCode.NOT_RUNNING):
                return False  # outcome unknown: stays `sending`, settled from the send log later
            if exc.code == ErrorCode.WORKER_TIMEOUT:
                if runner.worker is not None:
                    runner.worker.kill("send_timeout")  # its send log will settle the message
                return False
            if exc.permanent or exc.code == ErrorCode.MEDIA_INVALID:
                await self.store.set_status(message["id"], "failed", error_code=exc.code, error=exc.message)
                return True
            await self.store.set_status(message["id"], "queued", error_code=exc.code, error=exc.message)
            return False
        finally:
            if media_path is not None:
                media_path.unlink(missing_ok=True)
        sent = await self.store.set_status(message["id"], "sent", wa_id=result.get("wa_id"))
        if sent:
            await self._apply_early_receipt(runner.id, sent.get("wa_id"))
        return True

    # ------------------------------------------------------------------------ maintenance

    async def _maintain(self) -> None:
        """Expire messages past their ttl; prune the journal by age and size."""
        last_prune: float | None = None  # None: prune at start, then at most once a minute
        while not self.closed:
            try:
                await self.store.expire()  # each with its message.status event
                # `sending` past its ttl, with no send under way: its company never came back to
                # settle it from the worker's send log. Its fate is unknown; say so, never resend.
                await self.store.fail_stale_sending(time.time(), frozenset(self._sending))
                if last_prune is None or time.monotonic() - last_prune > 60:
                    last_prune = time.monotonic()
                    pruned = await self.store.prune(self.config.journal_max_age, self.config.journal_max_events)
                    if pruned:
                        log.info("journal pruned", events=pruned)
            except asyncio.CancelledError:
                raise
            except StorageFull:
                pass  # the store logged it, once; the next round tries again
            except Exception:
                log.exception("maintenance failed")
            await asyncio.sleep(1.0)


def _write_media_file(state_dir: Path, data: bytes) -> Path:
    """A private temporary file with the media bytes, for the worker to read."""
    directory = state_dir / "tmp"
    directory.mkdir(mode=0o700, exist_ok=True)
    fd, path = tempfile.mkstemp(dir=directory, prefix="media-")
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    return Path(path)
