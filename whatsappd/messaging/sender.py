"""The outbox sender: one task per company sends its queued messages, in order, while connected.

Before each send the company's pacer (whatsappd/pacing.py) says whether the message may go now
or waits, and until when (the message stays `queued`; the API shows `paced_until`). A send that
WhatsApp refuses as rate-limited pauses the company's sending for pacing.limit_pause.

A message is marked `sending` before the worker is asked; after a crash the worker's send log
settles it (see docs/INTERNALS.md): sent once, or reported failed, never sent twice. The sender
also applies what the supervisor reports about messages (EventBus hands it each event before
the journal does): receipts (kept a while if they overtake their send's reply), incoming media
references, and company state changes that wake a sender or end what can no longer be settled.
"""

from __future__ import annotations

import asyncio
import collections
import os
import random
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from whatsappd.cluster.fence import StaleLease
from whatsappd.errors import ErrorCode, Failure
from whatsappd.logs import get_logger
from whatsappd.pacing import CompanyPacer, PacingPolicy, Wait, WaitReason
from whatsappd.recipients import is_group_jid
from whatsappd.states import State
from whatsappd.store import RECEIPT_RANK, MessageStatus, OutboxMessage, OutgoingMessage, StorageFull, StoreBackend
from whatsappd.timefmt import iso_or_none

if TYPE_CHECKING:
    from whatsappd.config import Config
    from whatsappd.messaging.bus import Published
    from whatsappd.supervisor import Runner, Supervisor

__all__ = ["OutboxSender"]

log = get_logger()

#: How long a receipt for a WhatsApp id we have not recorded yet is kept, waiting for it.
EARLY_RECEIPT_TTL = 300.0
#: What each receipt kind the worker reports means for a message.
_RECEIPTS = {"delivered": MessageStatus.DELIVERED, "read": MessageStatus.READ, "played": MessageStatus.READ}
#: Pause after a transient send failure before the next try (the worker is still connected).
SEND_RETRY_PAUSE = (1.0, 30.0)
#: The longest a paced sender sleeps before it decides again (a reload may change its pacing).
PACING_RECHECK = 10.0


class OutboxSender:
    def __init__(self, store: StoreBackend, supervisor: Supervisor, config: Callable[[], Config]) -> None:
        self.store = store
        self.sup = supervisor
        self._config = config  # the daemon's current configuration (reloadable)
        self._senders: dict[str, asyncio.Task[None]] = {}
        self._wake: dict[str, asyncio.Event] = {}
        # Oldest first, so expired entries are dropped from the front (see _apply_receipt).
        self._early_receipts: collections.OrderedDict[tuple[str, str], tuple[MessageStatus, float]] = (
            collections.OrderedDict())
        self._sending: set[str] = set()  # message ids a sender has asked a worker to send, right now
        self._tasks: set[asyncio.Task[Any]] = set()
        self.closed = False
        # Pacing, per company: its pacer, and what its next message waits for now (if anything).
        self._pacers: dict[str, CompanyPacer] = {}
        self._waits: dict[str, Wait] = {}
        self._rng = random.Random()

    def start(self) -> None:
        for runner in self.sup.companies.values():
            self._ensure_sender(runner)

    async def close(self) -> None:
        self.closed = True
        tasks = [*self._senders.values(), *self._tasks]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def busy(self) -> frozenset[str]:
        """The message ids whose send is under way right now (maintenance leaves them alone)."""
        return frozenset(self._sending)

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

    # ------------------------------------------------------------- what the supervisor says

    def on_event(self, event: Published) -> None:
        """React to a supervisor event (EventBus calls this before journaling it)."""
        company, data = event.company, event.data
        if event.type == "message.incoming":
            chat = data.get("chat")
            if company and isinstance(chat, str) and not data.get("is_group") and not data.get("from_me"):
                # They wrote to this number: sending to them is no first contact (pacing).
                self._spawn(lambda: self.store.record_contact(str(company), chat))
            raw = event.raw
            if raw and data.get("id"):
                self._spawn(lambda: self.store.store_incoming_media(
                    str(company), str(data["id"]), str(data.get("kind")), (data.get("media") or {}).get("mimetype"),
                    raw))
        elif event.type == "message.receipt":
            self._spawn(lambda: self._apply_receipt(str(company), data))
        elif event.type == "company.state":
            runner = self.sup.companies.get(str(company))
            if runner is not None:
                self._ensure_sender(runner)
                if data.get("new") == State.CONNECTED:
                    self._wake[runner.id].set()
                elif data.get("new") in (State.LOGGED_OUT, State.FAILED) and not runner.session_dir.exists():
                    # The wiped (or quarantined) session took the worker's send log with it: what
                    # was in flight can no longer be settled, and must not be resent later.
                    self._spawn(lambda: self.fail_in_flight(runner.id, "the session was logged out or quarantined"))

    # ----------------------------------------------------------------------------- outbox

    async def enqueue(self, message: OutgoingMessage) -> tuple[bool, OutboxMessage]:
        """Store message (its `queued` event is journaled with it) and wake its company's sender."""
        created, stored = await self.store.enqueue(message, self._config().outbox_idempotency_window)
        runner = self.sup.companies.get(message.company)
        if created and runner is not None:
            self._ensure_sender(runner)
            self._wake[runner.id].set()
        return created, stored

    def wake(self, company: str) -> None:
        """A message was queued for company on another host (the shared outbox): send it now."""
        runner = self.sup.companies.get(company)
        if runner is not None and not self.closed:
            self._ensure_sender(runner)
            self._wake[runner.id].set()

    async def _apply_receipt(self, company: str, data: dict[str, Any]) -> None:
        status = _RECEIPTS.get(str(data.get("receipt")))
        ids = [str(i) for i in data.get("ids") or []]
        if status is None or not ids:
            return
        _, unknown = await self.store.receipt(company, ids, status)
        # A receipt can overtake the reply to its send (they travel separately): keep it until
        # the message is recorded as sent, then apply it.
        now = time.monotonic()
        for wa_id in unknown:
            previous = self._early_receipts.get((company, wa_id))
            if previous is None or RECEIPT_RANK[status] > RECEIPT_RANK[previous[0]]:
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
                if company not in self._pacers:
                    await self._restore_pacer(company, self._config().pacing_policy(runner.config))
                message = await self.store.next_pending(company)
                if message is None:
                    self._waits.pop(company, None)
                    wake.clear()
                    if await self.store.next_pending(company) is None:
                        await wake.wait()
                    continue
                policy = self._config().pacing_policy(runner.config)
                wait, first_contact = await self._pace(company, policy, message)
                if wait is not None:
                    self._waits[company] = wait
                    wake.clear()
                    try:
                        await asyncio.wait_for(wake.wait(), min(max(wait.until - time.time(), 0.001), PACING_RECHECK))
                    except TimeoutError:
                        pass
                    continue
                self._waits.pop(company, None)
                if first_contact:  # counted before the send: a crash may overcount, never undercount
                    await self.store.record_first_contact(company, message["jid"], time.time())
                ok = await self._send_one(runner, message, policy)
                # The token is taken when the send is over, so the next one is paced from the moment
                # this one reached WhatsApp (its send log time), whatever the typing took.
                self._pacer(company).sent(policy, time.time())
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
            except StaleLease as exc:  # [cluster] this host lost the company meanwhile: the write was refused
                log.warning("outbox write refused: this host no longer owns the company", company=company,
                            error=str(exc))
                await asyncio.sleep(SEND_RETRY_PAUSE[0])
            except Exception:
                log.exception("outbox sender failed; retrying", company=company)
                await asyncio.sleep(SEND_RETRY_PAUSE[0])

    # ---------------------------------------------------------------------------- pacing

    def _pacer(self, company: str) -> CompanyPacer:
        return self._pacers.setdefault(company, CompanyPacer(self._rng))

    async def _restore_pacer(self, company: str, policy: PacingPolicy) -> None:
        """A new pacer from the store: a kept pause, and the recent sends (no fresh burst after a restart)."""
        pacer = CompanyPacer(self._rng)
        pacer.restore(policy, await self.store.recent_sends(company, policy.burst))
        pause = (await self.store.pacing_pauses()).get(company)
        if pause is not None:
            pacer.pause(*pause)
        self._pacers[company] = pacer

    async def _pace(self, company: str, policy: PacingPolicy, message: OutboxMessage) -> tuple[Wait | None, bool]:
        """(what the message waits for, None: it may go now; whether it is a first contact)."""
        pacer = self._pacer(company)
        was_paused = pacer.paused_until is not None
        now = time.time()
        if pacer.paused_until is not None and now < pacer.paused_until:
            return Wait(pacer.paused_until, WaitReason.PAUSED), False
        jid = message["jid"]
        recent: list[float] | None = None
        if policy.enabled and not is_group_jid(jid) and not await self.store.is_known_contact(company, jid):
            counted = await self.store.first_contacts(company, now)
            if jid not in counted:  # a second message to the same new recipient within 24 h is free
                recent = list(counted.values())
        # The constraints hold for the moment the message reaches WhatsApp; "typing…" comes first,
        # so the send starts that much earlier (a pause, above, is waited out whole).
        lead = self._typing(policy, message)
        wait = pacer.decide(policy, now + lead, recent)
        if wait is not None:
            wait = Wait(wait.until - lead, wait.reason) if wait.until - lead > now else None
        if was_paused and pacer.paused_until is None:
            await self.store.set_pacing_pause(company, None, None)
            log.info("sending resumed after a rate-limit pause", company=company)
            self._publish_sending(company, "active", None, "the pause ended", by="pause_over")
        return wait, recent is not None

    def _typing(self, policy: PacingPolicy, message: OutboxMessage) -> float:
        """Seconds of "typing…" before message; never so long that the send itself would time out."""
        return min(policy.typing_for(message["kind"], message.get("text")), self._config().outbox_send_timeout / 2)

    async def _pause(self, company: str, policy: PacingPolicy, reason: str) -> None:
        until = time.time() + policy.limit_pause
        self._pacer(company).pause(until, reason)
        self._waits[company] = Wait(until, WaitReason.PAUSED)
        await self.store.set_pacing_pause(company, until, reason)
        log.warning("sending paused: WhatsApp answered with a rate-limit error", company=company,
                    until=iso_or_none(until), reason=reason)
        self._publish_sending(company, "paused", until, reason)

    async def resume(self, company: str, who: dict[str, Any]) -> bool:
        """The operator ends the company's pause now (who: the peer, for the log); False: none to end.

        The pause is cleared in memory and in the store (a pacer not loaded yet would read it back),
        and the sender is woken: its first queued message goes at once, bucket and budget allowing.
        """
        pacer = self._pacers.get(company)
        now = time.time()
        stored = (await self.store.pacing_pauses()).get(company)
        paused = ((pacer is not None and pacer.paused_until is not None and pacer.paused_until > now)
                  or (stored is not None and stored[0] > now))
        if not paused:
            # Also when a pause ran out but the sender has not noticed yet: it ends that one itself
            # (and journals `by: pause_over`), so a CRM never sees a pause without its end.
            return False
        if pacer is not None:
            pacer.paused_until = pacer.pause_reason = None
        wait = self._waits.get(company)
        if wait is not None and wait.reason is WaitReason.PAUSED:
            del self._waits[company]
        await self.store.set_pacing_pause(company, None, None)
        log.warning("sending resumed by the operator before its rate-limit pause ended", company=company, **who)
        self._publish_sending(company, "active", None, "resumed by the operator", by="operator")
        wake = self._wake.get(company)
        if wake is not None:
            wake.set()
        return True

    def _publish_sending(self, company: str, state: str, until: float | None, reason: str | None,
                         by: str | None = None) -> None:
        """Journal a company.sending event: its sending paused (until, why) or is active again (by whom)."""
        event: dict[str, Any] = {"type": "company.sending", "company": company, "state": state,
                                 "until": iso_or_none(until), "reason": reason}
        if by is not None:
            event["by"] = by
        self.sup.publish(event)

    def pacing(self, company: str) -> dict[str, Any]:
        """What the company's sending waits for now: {"state": "active" | "paced" | "paused", "until", "reason"}."""
        now = time.time()
        pacer = self._pacers.get(company)
        if pacer is not None and pacer.paused_until is not None and pacer.paused_until > now:
            return {"state": "paused", "until": iso_or_none(pacer.paused_until), "reason": pacer.pause_reason}
        wait = self._waits.get(company)
        if wait is not None and wait.until > now:
            return {"state": "paced", "until": iso_or_none(wait.until), "reason": str(wait.reason)}
        return {"state": "active", "until": None, "reason": None}

    def pacing_delay(self, company: str) -> float:
        """Seconds until the company's next message may go (0: now, or nothing waits)."""
        wait = self._waits.get(company)
        return max(0.0, wait.until - time.time()) if wait is not None else 0.0

    def with_pacing(self, message: OutboxMessage) -> OutboxMessage:
        """message, with `paced_until` and `paced_reason` while it is queued behind pacing."""
        if message["status"] is MessageStatus.QUEUED:
            wait = self._waits.get(message["company"])
            if wait is not None and wait.until <= time.time():
                wait = None  # over: the sender is about to decide again
            message["paced_until"] = None if wait is None else iso_or_none(wait.until)
            message["paced_reason"] = None if wait is None else str(wait.reason)
        return message

    async def _settle_in_flight(self, runner: Runner) -> None:
        """Messages left `sending` by a crash: ask the worker's send log what became of them."""
        in_flight = await self.store.in_flight(runner.id)
        if not in_flight:
            return
        ids = [m["id"] for m in in_flight]
        result = await runner.command("send_status", {"outbox_ids": ids}, timeout=self._config().outbox_send_timeout)
        statuses = result.get("statuses") or {}
        for message in in_flight:
            status = statuses.get(message["id"]) or {"state": "unknown"}
            if self.sup.cluster and message.get("claim") != runner.token and status.get("state") != "sent":
                # Claimed under another lease (a previous owner's): its send may have gone out from a
                # log this worker cannot see, so "unknown" is never a reason to send it again.
                status = {"state": "attempted"}
            if status.get("state") == "sent":
                changed = await self.store.set_status(message["id"], MessageStatus.SENT, wa_id=status.get("wa_id"))
                if changed is not None:
                    await self._apply_early_receipt(runner.id, changed.get("wa_id"))
                    continue
            elif status.get("state") == "attempted":
                changed = await self.store.set_status(
                    message["id"], MessageStatus.FAILED, error_code=ErrorCode.SEND_INTERRUPTED,
                    error="the daemon stopped while this message was being sent; it may or may not have "
                          "been delivered, and it is not resent to avoid a duplicate")
            else:
                changed = await self.store.set_status(message["id"], MessageStatus.QUEUED)
            if changed is not None:
                log.info("settled an interrupted send", company=runner.id, message_id=message["id"],
                         status=changed["status"])

    async def fail_in_flight(self, company: str, why: str = "the host sending it stopped owning the company") -> None:
        """Fail what is left `sending` as send_interrupted: no send log can settle it any more."""
        for message in await self.store.in_flight(company):
            await self.store.set_status(  # journals its message.status event itself (store/sqlite.py)
                message["id"], MessageStatus.FAILED, error_code=ErrorCode.SEND_INTERRUPTED,
                error=f"{why} while this message was being sent; it may or may not have been delivered, "
                      "and it is not resent to avoid a duplicate")

    async def _send_one(self, runner: Runner, message: OutboxMessage, policy: PacingPolicy) -> bool:
        sending = await self.store.set_status(message["id"], MessageStatus.SENDING)
        if sending is None:
            return True  # expired or changed meanwhile
        self._sending.add(message["id"])
        try:
            return await self._send_sending(runner, message, policy)
        finally:
            self._sending.discard(message["id"])

    async def _send_sending(self, runner: Runner, message: OutboxMessage, policy: PacingPolicy) -> bool:
        media_path: Path | None = None
        args: dict[str, Any] = {
            "outbox_id": message["id"], "to": message["jid"], "kind": message["kind"],
            "text": message.get("text"), "caption": message.get("caption"),
            "filename": message.get("filename"), "mimetype": message.get("mimetype"),
        }
        typing = self._typing(policy, message)
        if typing:
            args["typing"] = typing
        config = self._config()
        try:
            if message["kind"] != "text":
                data = await self.store.media(message["id"])
                if data is None:
                    raise Failure(ErrorCode.MEDIA_INVALID, "the stored media is missing")
                media_path = await asyncio.to_thread(_write_media_file, config.daemon_state_dir, data)
                args["media_path"] = str(media_path)
            result = await runner.command("send", args, timeout=config.outbox_send_timeout)
        except Failure as exc:
            if exc.code in (ErrorCode.WORKER_EXITED, ErrorCode.NOT_RUNNING):
                return False  # outcome unknown: stays `sending`, settled from the send log later
            if exc.code == ErrorCode.WORKER_TIMEOUT:
                if runner.worker is not None:
                    runner.worker.kill("send_timeout")  # its send log will settle the message
                return False
            if exc.code == ErrorCode.RATE_LIMITED:
                # Nothing was sent; retrying now would only dig the hole deeper: pause the company.
                await self.store.set_status(message["id"], MessageStatus.QUEUED, error_code=exc.code,
                                            error=exc.message)
                await self._pause(runner.id, policy, exc.message)
                return False
            if exc.permanent or exc.code == ErrorCode.MEDIA_INVALID:
                await self.store.set_status(message["id"], MessageStatus.FAILED, error_code=exc.code,
                                            error=exc.message)
                return True
            await self.store.set_status(message["id"], MessageStatus.QUEUED, error_code=exc.code, error=exc.message)
            return False
        finally:
            if media_path is not None:
                media_path.unlink(missing_ok=True)
        sent = await self.store.set_status(message["id"], MessageStatus.SENT, wa_id=result.get("wa_id"))
        if sent:
            await self._apply_early_receipt(runner.id, sent.get("wa_id"))
        return True


def _write_media_file(state_dir: Path, data: bytes) -> Path:
    """A private temporary file with the media bytes, for the worker to read."""
    directory = state_dir / "tmp"
    directory.mkdir(mode=0o700, exist_ok=True)
    fd, path = tempfile.mkstemp(dir=directory, prefix="media-")
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    return Path(path)
