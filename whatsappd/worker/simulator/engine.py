"""SimulatorEngine: the fake WhatsApp's state machine (phases, timers, connection attempts) and
the commands and simulate actions it carries out (see the package docstring)."""

from __future__ import annotations

import base64
import enum
import heapq
import itertools
import logging
import math
import os
import secrets
import signal
import threading
import time
from collections.abc import Callable, Mapping
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, ClassVar, assert_never

from whatsappd.errors import ErrorCode
from whatsappd.protocol import (
    MAX_BURST,
    MAX_CLOCK_SKEW,
    SIMULATE_ACTIONS,
    CheckNumber,
    Command,
    Disconnect,
    Download,
    EngineError,
    EventMessage,
    ExitCode,
    Logout,
    Op,
    Paired,
    PairPhone,
    Qr,
    ReceiptEvent,
    Replay,
    Send,
    SendStatus,
    ServerTime,
    Simulate,
    StateReport,
    WorkerState,
)
from whatsappd.worker.durable import write_private
from whatsappd.worker.engine import Emit, Engine, EngineOptions
from whatsappd.worker.media import media_chunks
from whatsappd.worker.simulator import actions, server
from whatsappd.worker.simulator.actions import optional_bool, optional_seconds, optional_str
from whatsappd.worker.simulator.config import SimulatorConfig
from whatsappd.worker.simulator.connections import WATCH_SECONDS, ConnectionLog
from whatsappd.worker.simulator.server import SESSION_FILE, SimulatorDevice, iso, now

__all__ = ["CRASH_EXIT_STATUS", "MAX_BURST", "PAIRING_CODE_ALPHABET", "Phase", "SimulatorEngine"]

log = logging.getLogger(__name__)

#: whatsmeow's linking-code base32 alphabet (no 0, O, I, U).
PAIRING_CODE_ALPHABET = "123456789ABCDEFGHJKLMNPQRSTVWXYZ"
#: Exit status of `simulate crash` (EX_SOFTWARE): not an ExitCode, so the supervisor sees a crash.
CRASH_EXIT_STATUS = 70
_DEFAULT_PUSH_NAME = "Simulator"

#: One simulate action: called with the engine's lock held (except actions.UNLOCKED), the
#: engine not done.
Action = Callable[["SimulatorEngine", Mapping[str, Any]], dict[str, Any]]


class Phase(enum.StrEnum):
    """The engine's own phases; the supervisor sees the `state` messages."""

    STARTING = "starting"  # run() has not begun
    CONNECTING = "connecting"
    PAIRING = "pairing"
    CONNECTED = "connected"
    RECONNECTING = "reconnecting"
    DONE = "done"  # the exit code is decided


def _b64(nbytes: int) -> str:
    return base64.b64encode(secrets.token_bytes(nbytes)).decode("ascii")


def _pairing_code() -> str:
    chars = "".join(secrets.choice(PAIRING_CODE_ALPHABET) for _ in range(8))
    return f"{chars[:4]}-{chars[4:]}"


def _fake_jid(phone: str | None) -> str:
    number = phone or "5511" + "".join(secrets.choice("0123456789") for _ in range(9))
    return f"{number}:{secrets.randbelow(90) + 10}@s.whatsapp.net"


class SimulatorEngine(Engine):
    """A fake WhatsApp client: same messages and exit codes as the real engine, no network.

    Thread model: run() in the main thread; command() and stop() from another. All state is
    guarded by one Condition. Commands that change the state emit their messages themselves,
    while holding it, so by the time command() returns (and the worker main sends the reply)
    those messages are already out and in order. Timed transitions (connect delay, QR
    rotation, pairing timeout) are carried out by run(), which sleeps on the Condition.
    """

    name = "simulator"
    ops = frozenset({Op.SIMULATE, Op.PAIR_PHONE, Op.LOGOUT, Op.SEND, Op.SEND_STATUS, Op.CHECK_NUMBER, Op.DOWNLOAD})
    session_files = (SESSION_FILE,)

    def __init__(self, options: EngineOptions, emit: Emit, env: Mapping[str, str] | None = None) -> None:
        super().__init__(options, emit)
        self._cond = threading.Condition()
        self._config_error: str | None = None
        try:
            self.config = SimulatorConfig.from_env(os.environ if env is None else env)
        except ValueError as exc:
            self._config_error = str(exc)
            self.config = SimulatorConfig()
        self._phase: Phase = Phase.STARTING
        self._exit: ExitCode | None = None
        self._device: SimulatorDevice | None = None
        self._connect_due: float | None = None  # monotonic; None = no dial under way (or stalled)
        self._fail_next_connect = False
        # Connection attempts: each waits for the gate in a dialer thread (see _dial).
        self._dial_episode = 0  # bumped when the phase moves on: a dialer of an older one quits
        self._dial_now = False  # restore: the waiting dialer skips what is left of its delay
        self._reconnect_errors = 0  # failed reconnect attempts since the drop (whatsmeow's count)
        self._network_down = False  # drop: reconnect attempts fail until restore
        self._clock_skew = 0.0  # simulate clock: the fake server's clock minus ours, in seconds
        # pairing
        self._qr_keys = ""  # noise, identity, adv secret: fixed for one pairing, like whatsmeow
        self._qr_emitted = 0
        self._qr_due = 0.0  # monotonic expiry of the current code
        self._pairing_deadline: datetime | None = None
        self._pair_phone: str | None = None
        # messaging: the send log has its own lock; receipts are due on a heap, emitted by one
        # thread (lock order: self._cond before self._receipt_cond, never the other way)
        # The "server's" side: the device, the send log, presence and media live in home. With
        # a shared server (options.server_dir) a connection log there lets a newer connection
        # of the company, from any daemon, replace ours (see connections.py).
        self.home = options.session_dir if options.server_dir is None else options.server_dir / options.company
        self._connections = None if options.server_dir is None else ConnectionLog(
            self.home, host=str(options.session_dir.parent.parent))  # the daemon's state directory
        self._sent = server.SendLog(self.home)
        self._receipt_cond = threading.Condition()
        self._receipts_due: list[tuple[float, int, tuple[str, str, str]]] = []  # (due, seq, (receipt, wa_id, to))
        self._receipt_seq = itertools.count()
        self._receipt_thread: threading.Thread | None = None
        # simulate rate_limit: the next sends WhatsApp refuses, and with which error code
        self._rate_limited_sends = 0
        self._rate_limit_code = 463

    # ----------------------------------------------------------------- Engine interface

    def run(self) -> int:
        with self._cond:
            if self._config_error is not None:
                log.error("simulator: bad environment: %s", self._config_error)
                self._finish(ExitCode.BAD_INVOCATION)
                return self._exit_code()
            if self._exit is not None:  # stopped (or failed) before run() began
                return self._exit_code()
        try:
            if self._connections is not None:
                self.home.mkdir(mode=0o700, parents=True, exist_ok=True)
            device = server.read_store(self.home)
            self._sent.load()  # the "server's" memory of what was sent: needed before any send
        except (OSError, ValueError) as exc:
            log.error("simulator: session store unusable: %s", exc)
            with self._cond:
                self._finish(ExitCode.STORE_UNUSABLE)
                return self._exit_code()
        with self._cond:
            if self._exit is not None:
                return self._exit_code()
            self._device = device
            if self._connections is not None:
                threading.Thread(target=self._watch_replacement, name="simulator-conflict", daemon=True).start()
            self._start_connecting()
            while self._exit is None:
                self._run_due_timers()
                if self._exit is None:
                    self._cond.wait(self._time_to_next_timer())
            return self._exit_code()

    def execute(self, command: Command) -> dict[str, Any]:
        match command:
            case Simulate():
                return self._simulate(command)
            case PairPhone():
                return self._pair_phone_code(command)
            case Logout():
                return self._logout()
            case Send():
                return self._send(command)
            case SendStatus():
                return self._send_status(command)
            case CheckNumber():
                return self._check_number(command)
            case Download():
                return self._download(command)
            case Disconnect() | Replay():
                raise EngineError(ErrorCode.UNKNOWN_OP, f"the simulator engine has no operation {command.op.value!r}")
            case _:
                assert_never(command)

    def stop(self) -> None:
        with self._cond:
            self._finish(ExitCode.STOPPED)

    # ----------------------------------------------------------------- commands

    def _simulate(self, command: Simulate) -> dict[str, Any]:
        handler = self._ACTIONS[command.action]
        if command.action in actions.UNLOCKED:
            return handler(self, command.args)
        with self._cond:
            if self._phase == Phase.DONE:
                raise EngineError(ErrorCode.NOT_RUNNING, "the engine has already ended")
            try:
                return handler(self, command.args)
            finally:
                self._cond.notify_all()  # run() recomputes its next timer from the new phase

    def _pair_phone_code(self, command: PairPhone) -> dict[str, Any]:
        with self._cond:
            if self._phase != Phase.PAIRING:
                raise EngineError(ErrorCode.NOT_PAIRING, "a pairing code can only be requested while pairing")
            self._pair_phone = command.phone
            assert self._pairing_deadline is not None
            return {"code": _pairing_code(), "expires_at": iso(self._pairing_deadline)}

    def _logout(self) -> dict[str, Any]:
        with self._cond:
            if self._phase != Phase.CONNECTED:
                raise EngineError(ErrorCode.NOT_CONNECTED, "logging out needs a live connection")
            self._forget_device()
            self._finish(ExitCode.LOGGED_OUT)
            return {"unlinked": True}

    # ----------------------------------------------------------------- messaging commands

    def _send(self, send: Send) -> dict[str, Any]:
        """Send one message: connection, delay, fault file, dedupe, recipient, media, send.

        Every check that a retry cannot fix raises a permanent EngineError. The send itself is
        one append + fsync to the send log: once it is there, it was sent.
        """
        with self._cond:
            self._require_connected("sending a message")
            if self.config.send_delay > 0:  # the time the network takes; a drop or stop ends it
                self._cond.wait_for(lambda: self._phase != Phase.CONNECTED, self.config.send_delay)
                self._require_connected("sending a message")
        if self._file_exists(self.config.send_fail_file):
            raise EngineError(ErrorCode.SEND_FAILED, "the send failed (simulated: the send-fail file exists)")
        original = self._sent.duplicate(send.outbox_id)
        if original is not None:
            return {"wa_id": original["wa_id"], "timestamp": original["timestamp"]}
        if send.typing > 0:
            self._show_typing(send)
        with self._cond:
            if self._rate_limited_sends > 0:
                self._rate_limited_sends -= 1
                # whatsmeow's words for a refused message node (see neonize/classify.py)
                raise EngineError(ErrorCode.RATE_LIMITED, f"WhatsApp did not take the message: server returned "
                                  f"error {self._rate_limit_code} (simulated rate limit)")
        phone = send.to.phone
        if phone is not None and not server.on_whatsapp(phone):
            raise EngineError(ErrorCode.NOT_ON_WHATSAPP, f"{phone} is not on WhatsApp", permanent=True)
        size = None if send.media_path is None else sum(map(len, media_chunks(send.media_path, send.kind)))  # upload
        record: dict[str, Any] = {
            "outbox_id": send.outbox_id,
            "wa_id": server.wa_id(),
            "to": send.to.jid,
            "kind": send.kind,
            "text": send.text,
            "caption": send.caption,
            "filename": send.filename,
            "mimetype": None if send.kind == "text" else send.mimetype or actions.DEFAULT_MIMETYPES[send.kind],
            "size": size,
            "timestamp": iso(now()),
        }
        if send.typing:
            record["typing"] = send.typing  # the "typing…" shown before it (simulator-presence.jsonl)
        record, duplicate = self._send_on_connection(record)
        if not duplicate:
            self._schedule_receipts(record["wa_id"], record["to"])
        return {"wa_id": record["wa_id"], "timestamp": record["timestamp"]}

    def _send_on_connection(self, record: dict[str, Any]) -> tuple[dict[str, Any], bool]:
        """Record the send in the send log: with a shared server, only while our connection is
        still the company's (under the connection log's lock, so no replacement comes between)."""
        if self._connections is None:
            return self._sent.send(record)
        with self._connections.locked():
            if self._connections.replaced():
                with self._cond:
                    self._finish(ExitCode.REPLACED)
            # A plain read of the phase: taking self._cond under the file lock could deadlock
            # with a connect, which holds self._cond while it takes the file lock.
            if self._phase != Phase.CONNECTED:
                raise EngineError(ErrorCode.NOT_CONNECTED, "sending a message needs a live connection "
                                  f"(the engine is {self._phase})")
            return self._sent.send(record)

    def _watch_replacement(self) -> None:
        """A shared server's conflict: end REPLACED once another connection of the company took
        over ours (a frozen worker notices when it is resumed)."""
        assert self._connections is not None
        while self._phase != Phase.DONE:
            time.sleep(WATCH_SECONDS)
            try:
                replaced = self._connections.replaced()
            except (OSError, ValueError) as exc:
                log.warning("simulator: cannot read the connection log: %s", exc)
                continue
            if replaced:
                log.warning("simulator: another connection of this company replaced ours (stream conflict)")
                with self._cond:
                    self._finish(ExitCode.REPLACED)

    def _show_typing(self, send: Send) -> None:
        """The "typing…" presence before a text, as whatsmeow sends it (composing, then the
        message clears it): noted in the presence log, then held for its seconds (a drop or stop
        ends it, and the send fails as not connected: nothing was sent)."""
        server.log_presence(self.home, {
            "to": send.to.jid, "outbox_id": send.outbox_id, "state": "composing", "seconds": send.typing,
            "timestamp": iso(now())})
        log.info("simulator: typing presence to %s for %.3fs", send.to.jid, send.typing)
        with self._cond:
            self._cond.wait_for(lambda: self._phase != Phase.CONNECTED, send.typing)
            self._require_connected("sending a message")

    def _send_status(self, command: SendStatus) -> dict[str, Any]:
        """What the send log says of each outbox id: sent (never "attempted": a send is atomic)."""
        statuses: dict[str, dict[str, Any]] = {}
        for outbox_id in command.outbox_ids:
            record = self._sent.by_outbox(outbox_id)
            statuses[outbox_id] = (
                {"state": "unknown"} if record is None
                else {"state": "sent", "wa_id": record["wa_id"], "timestamp": record["timestamp"]}
            )
        return {"statuses": statuses}

    def _check_number(self, command: CheckNumber) -> dict[str, Any]:
        with self._cond:
            self._require_connected("checking a number")
        phone = command.phone
        on_whatsapp = server.on_whatsapp(phone)
        return {"phone": phone, "on_whatsapp": on_whatsapp, "jid": f"{phone}@s.whatsapp.net" if on_whatsapp else None}

    def _download(self, command: Download) -> dict[str, Any]:
        """Write the bytes of an incoming media message (its event's raw) to path, 0600."""
        doc = server.decode_raw(command.message)
        if doc is None:
            raise EngineError(ErrorCode.MEDIA_UNAVAILABLE, "'message' is not the raw of a media message",
                              permanent=True)
        with self._cond:
            self._require_connected("downloading media")
        try:
            size = write_private(Path(command.path), server.media_chunks(doc, self.home))
        except OSError as exc:
            raise EngineError(ErrorCode.DOWNLOAD_FAILED, f"could not write the media to {command.path}: {exc}") from None
        return {"path": command.path, "size": size, "mimetype": doc["mimetype"]}

    # ----------------------------------------------------------------- simulate actions
    # Called with the lock held (except crash and hang); the engine is not done.

    def _act_scan(self, args: Mapping[str, Any]) -> dict[str, Any]:
        if self._phase != Phase.PAIRING:
            raise EngineError(ErrorCode.NOT_PAIRING, "there is no QR code to scan: the engine is not pairing")
        jid = optional_str(args, "jid") or _fake_jid(self._pair_phone)
        push_name = optional_str(args, "push_name", max_len=64) or _DEFAULT_PUSH_NAME
        reconnect = optional_bool(args, "connect", True)
        device = SimulatorDevice(jid=jid, push_name=push_name)
        try:
            server.write_store(self.home, device)
        except OSError as exc:
            raise EngineError(ErrorCode.STORE_FAILED, f"could not save the session: {exc}") from None
        self._device = device
        self.emit(Paired(jid).to_wire())
        # The server forces one reconnect after pairing (515). connect=false simulates the
        # library failing to come back: "connecting" then stays until the supervisor acts.
        self._start_connecting(stall=not reconnect)
        return {"action": "scan", "jid": jid, "push_name": push_name}

    def _act_drop(self, args: Mapping[str, Any]) -> dict[str, Any]:
        if self._phase != Phase.CONNECTED:
            raise EngineError(ErrorCode.NOT_CONNECTED, "only a connected engine can drop its connection")
        reason = optional_str(args, "reason") or "simulated connection drop"
        down = optional_bool(args, "down", True)
        self._leave_connection("drop")
        self._phase = Phase.RECONNECTING
        self._network_down = down
        self._reconnect_errors = 0
        self.emit(StateReport(WorkerState.RECONNECTING, reason=reason).to_wire())
        # Like whatsmeow after a live drop: the first reconnect attempt goes at once (through
        # the gate), later ones after 1, 2, 3... times the reconnect delay.
        self._dial()
        return {"action": "drop", "state": "reconnecting", "down": down}

    def _act_restore(self, args: Mapping[str, Any]) -> dict[str, Any]:
        if self._phase != Phase.RECONNECTING:
            raise EngineError(ErrorCode.NOT_RECONNECTING, "only a dropped connection can be restored")
        self._network_down = False
        self._dial_now = True  # the next attempt starts now, once the gate lets it
        self._cond.notify_all()
        return {"action": "restore", "state": "reconnecting"}

    def _act_logged_out(self, args: Mapping[str, Any]) -> dict[str, Any]:
        self._forget_device()
        return self._end("logged_out", ExitCode.LOGGED_OUT)

    def _act_replaced(self, args: Mapping[str, Any]) -> dict[str, Any]:
        return self._end("replaced", ExitCode.REPLACED)

    def _act_ban(self, args: Mapping[str, Any]) -> dict[str, Any]:
        seconds = optional_seconds(args, "seconds", 3600.0)
        reason = optional_str(args, "reason") or "temporary ban (simulated)"
        until = iso(now() + timedelta(seconds=seconds))
        self.emit(StateReport(WorkerState.BANNED, reason=reason, until=until).to_wire())
        result = self._end("ban", ExitCode.BANNED)
        result["until"] = until
        return result

    def _act_outdated(self, args: Mapping[str, Any]) -> dict[str, Any]:
        return self._end("outdated", ExitCode.OUTDATED)

    def _act_fail_connect(self, args: Mapping[str, Any]) -> dict[str, Any]:
        if self._phase == Phase.STARTING:  # run() has not begun: its first connect attempt fails
            self._fail_next_connect = True
            return {"action": "fail_connect", "exit_code": int(ExitCode.TRANSIENT)}
        # connecting: this attempt fails; pairing, connected, reconnecting: the connection is
        # lost for good. Either way the supervisor retries with backoff in a fresh process.
        return self._end("fail_connect", ExitCode.TRANSIENT)

    def _act_crash(self, args: Mapping[str, Any]) -> dict[str, Any]:
        """The process dies at once (status 70), no reply; `after` seconds delays it."""
        after = optional_seconds(args, "after", 0.0)
        if after == 0:
            os._exit(CRASH_EXIT_STATUS)
        _daemon_timer(after, lambda: os._exit(CRASH_EXIT_STATUS))
        return {"action": "crash", "after": after}

    def _act_hang(self, args: Mapping[str, Any]) -> dict[str, Any]:
        """The whole process stops (SIGSTOP): no heartbeat, no replies, until SIGKILL/SIGCONT.

        The worker main heart-beats from its own thread, so blocking an engine thread would
        not look hung; stopping the process does, like a wedged Go runtime would.
        """
        after = optional_seconds(args, "after", 0.0)
        if after == 0:
            os.kill(os.getpid(), signal.SIGSTOP)
            return {"action": "hang", "after": 0.0}  # reached only after a SIGCONT
        _daemon_timer(after, lambda: os.kill(os.getpid(), signal.SIGSTOP))
        return {"action": "hang", "after": after}

    def _act_incoming(self, args: Mapping[str, Any]) -> dict[str, Any]:
        """Someone writes to us: emit a message.incoming event; {"id": its WhatsApp id}."""
        self._require_connected("a message can only arrive on a live connection")
        event = actions.incoming_event(args, self.home)
        self.emit(EventMessage(event).to_wire())
        return {"id": event["id"]}

    def _act_receipt(self, args: Mapping[str, Any]) -> dict[str, Any]:
        """Receipts for messages we sent: ids are WhatsApp ids or outbox ids (via the send log)."""
        self._require_connected("a receipt can only arrive on a live connection")
        asked = actions.parse_receipts(args)
        by_chat: dict[str, list[str]] = {}  # one event per chat, in the order the ids came
        for some_id in asked.ids:
            record = self._sent.by_outbox(some_id) or self._sent.by_wa(some_id)
            if record is not None:
                wa_id, chat = record["wa_id"], record["to"]
            elif some_id.startswith("msg_"):
                raise EngineError(ErrorCode.UNKNOWN_MESSAGE, f"{some_id!r} is not in the send log")
            elif asked.chat is None:
                raise EngineError(ErrorCode.INVALID_ARGUMENT, f"{some_id!r} is not in the send log: give its 'chat'")
            else:
                wa_id, chat = some_id, asked.chat
            by_chat.setdefault(chat, []).append(wa_id)
        timestamp = iso(now())
        for chat, wa_ids in by_chat.items():
            event: ReceiptEvent = {"type": "message.receipt", "ids": wa_ids, "chat": chat,
                                   "sender": asked.sender or chat, "receipt": asked.receipt, "timestamp": timestamp}
            self.emit(EventMessage(event).to_wire())
        return {"ids": [wa_id for wa_ids in by_chat.values() for wa_id in wa_ids], "receipt": asked.receipt}

    def _act_clock(self, args: Mapping[str, Any]) -> dict[str, Any]:
        skew = args.get("skew", 0)
        if (isinstance(skew, bool) or not isinstance(skew, int | float) or not math.isfinite(skew)
                or abs(skew) > MAX_CLOCK_SKEW):
            raise EngineError(ErrorCode.INVALID_ARGUMENT,
                              f"'skew' must be a number of seconds from -{MAX_CLOCK_SKEW} to {MAX_CLOCK_SKEW}")
        self._clock_skew = float(skew)
        if self._phase == Phase.CONNECTED:
            self._emit_server_time()
        return {"action": "clock", "skew": self._clock_skew}

    def _act_stats(self, args: Mapping[str, Any]) -> dict[str, Any]:
        """What the send log holds (any phase, even not connected): sent, duplicates, per JID."""
        return self._sent.stats().as_dict()

    def _act_rate_limit(self, args: Mapping[str, Any]) -> dict[str, Any]:
        """Arm the next count sends to fail as WhatsApp's rate-limit answer (463 or 429)."""
        self._rate_limited_sends, self._rate_limit_code = actions.parse_rate_limit(args)
        return {"armed": self._rate_limited_sends, "code": self._rate_limit_code}

    def _act_burst(self, args: Mapping[str, Any]) -> dict[str, Any]:
        """count incoming text events as fast as they go (the throughput benchmark's source)."""
        burst = actions.parse_burst(args)
        with self._cond:
            if self._phase == Phase.DONE:
                raise EngineError(ErrorCode.NOT_RUNNING, "the engine has already ended")
            self._require_connected("a message can only arrive on a live connection")
        prefix = "3EB0" + secrets.token_hex(4).upper()  # + 8 hex digits of the counter: unique ids
        emitted = 0
        started = time.monotonic()
        for n in range(burst.count):
            if n % 1024 == 0 and self._phase != Phase.CONNECTED:  # dropped or stopped: the burst ends
                break
            if burst.rate is not None:
                # Event n is due at started + n/rate; sleep only when more than 1 ms ahead, so the
                # schedule is kept to about a millisecond without a sleep per event. Sleeps are cut
                # into 0.1 s slices so that a drop or stop still ends a slow burst promptly.
                while (ahead := started + n / burst.rate - time.monotonic()) > 0.001 and self._phase == Phase.CONNECTED:
                    time.sleep(min(ahead, 0.1))
                if self._phase != Phase.CONNECTED:
                    break
            self.emit(EventMessage(actions.burst_event(burst, f"{prefix}{n:08X}", n, time.time_ns())).to_wire())
            emitted += 1
        return {"emitted": emitted}

    #: One handler per key of protocol.SIMULATE_ACTIONS (filled in below the class, from it).
    _ACTIONS: ClassVar[dict[str, Action]]

    # ----------------------------------------------------------------- transitions (lock held)

    def _finish(self, code: ExitCode) -> None:
        """Decide run()'s result (the first decision wins) and wake run()."""
        if self._exit is None:
            if self._phase == Phase.CONNECTED and code != ExitCode.REPLACED:
                self._leave_connection(code.name.lower())
            self._exit = code
            self._phase = Phase.DONE
            self._dial_episode += 1
            self.options.gate.close()
        self._cond.notify_all()
        with self._receipt_cond:  # the receipt thread ends with the engine
            self._receipt_cond.notify_all()

    def _leave_connection(self, reason: str) -> None:
        """A shared server: note that our connection ended (lock held, phase still connected)."""
        if self._connections is None:
            return
        try:
            self._connections.disconnect(reason)
        except OSError as exc:  # the reader sees the connection end with the process
            log.warning("simulator: could not note the disconnect in the connection log: %s", exc)

    def _exit_code(self) -> int:
        assert self._exit is not None
        return int(self._exit)

    def _end(self, action: str, code: ExitCode) -> dict[str, Any]:
        self._finish(code)
        return {"action": action, "exit_code": int(code)}

    def _forget_device(self) -> None:
        """Drop the device from the store but keep the file, as whatsmeow does on logout."""
        self._device = None
        try:
            if (self.home / SESSION_FILE).exists():
                server.write_store(self.home, None)
        except OSError as exc:  # the supervisor wipes the directory anyway
            log.warning("simulator: could not clear the device from the store: %s", exc)

    def _start_connecting(self, *, stall: bool = False) -> None:
        self._phase = Phase.CONNECTING
        self.emit(StateReport(WorkerState.CONNECTING).to_wire())
        self._dial(stall=stall)

    def _dial(self, *, delay: float = 0.0, stall: bool = False) -> None:
        """Start one connection attempt: after `delay`, once the gate grants it (a token of the
        supervisor's connect-rate limiter), the dial takes connect_delay; run() then settles
        it. The wait is a thread's (whatsmeow's reconnect goroutine), so the lock stays free."""
        self._dial_episode += 1
        self._connect_due = None
        threading.Thread(target=self._dialer, args=(self._dial_episode, delay, stall),
                         name="simulator-dial", daemon=True).start()

    def _dialer(self, episode: int, delay: float, stall: bool) -> None:
        deadline = time.monotonic() + delay
        with self._cond:
            while self._dial_episode == episode and not self._dial_now:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._cond.wait(remaining)
            self._dial_now = False
            if self._dial_episode != episode:
                return
        if not self.options.gate.acquire("reconnect" if self._phase == Phase.RECONNECTING else "connect"):
            return  # the engine is ending
        with self._cond:
            if self._dial_episode != episode or stall:
                return  # moved on meanwhile; or a dial that never completes (scan connect=false)
            delay = self.config.connect_delay
            self._connect_due = None if math.isinf(delay) else time.monotonic() + delay
            self._cond.notify_all()  # run() settles the dial when it is due

    def _enter_connected(self) -> None:
        assert self._device is not None
        if self._connections is not None:
            try:  # the server takes the connection: an older one of the company is replaced
                self._connections.connect()
            except (OSError, ValueError) as exc:
                log.error("simulator: cannot record the connection in the shared server: %s", exc)
                self._finish(ExitCode.TRANSIENT)
                return
        self._dial_episode += 1
        self._connect_due = None
        self._reconnect_errors = 0
        self._phase = Phase.CONNECTED
        self._emit_server_time()  # the server's time comes with its "success", before connected is reported
        self.emit(StateReport(WorkerState.CONNECTED, jid=self._device.jid, push_name=self._device.push_name).to_wire())

    def _emit_server_time(self) -> None:
        """The server's clock as a connect (or `simulate clock`) shows it, as a real server's would."""
        local = time.time()
        self.emit(ServerTime(local + self._clock_skew, local).to_wire())

    def _enter_pairing(self) -> None:
        self._phase = Phase.PAIRING
        self._qr_keys = ",".join((_b64(32), _b64(32), _b64(32)))
        self._qr_emitted = 0
        self._pair_phone = None
        self._pairing_deadline = now() + timedelta(seconds=self.config.pairing_window)
        self.emit(StateReport(WorkerState.PAIRING).to_wire())
        self._emit_next_qr()

    def _emit_next_qr(self) -> None:
        lifetime = self.config.qr_first if self._qr_emitted == 0 else self.config.qr_next
        self._qr_emitted += 1
        self._qr_due = time.monotonic() + lifetime
        code = f"2@{_b64(72)},{self._qr_keys}"
        self.emit(Qr(code, iso(now() + timedelta(seconds=lifetime))).to_wire())

    def _fail_file_exists(self) -> bool:
        return self._file_exists(self.config.fail_connect_file)

    def _file_exists(self, pattern: str | None) -> bool:
        """Whether a fault-injection file ("{company}" replaced) exists now."""
        if pattern is None:
            return False
        return Path(pattern.replace("{company}", self.options.company)).exists()

    def _require_connected(self, what: str) -> None:
        if self._phase != Phase.CONNECTED:
            raise EngineError(ErrorCode.NOT_CONNECTED, f"{what} needs a live connection (the engine is {self._phase})")

    def _schedule_receipts(self, wa_id: str, to: str) -> None:
        """WHATSAPPD_SIM_AUTO_RECEIPTS: each receipt RECEIPT_DELAY after the one before, in order."""
        if not self.config.auto_receipts:
            return
        if self.config.receipts_first:
            for receipt in self.config.auto_receipts:
                self._emit_receipt(receipt, wa_id, to)
            return
        with self._receipt_cond:
            due = time.monotonic()
            for receipt in self.config.auto_receipts:
                due += self.config.receipt_delay
                heapq.heappush(self._receipts_due, (due, next(self._receipt_seq), (receipt, wa_id, to)))
            if self._receipt_thread is None:
                self._receipt_thread = threading.Thread(target=self._emit_receipts,
                                                        name="sim-receipts", daemon=True)
                self._receipt_thread.start()
            self._receipt_cond.notify_all()

    def _emit_receipts(self) -> None:
        """The receipt thread: emit each due receipt while connected (one due otherwise is lost)."""
        while True:
            with self._receipt_cond:
                while True:
                    if self._phase == Phase.DONE:
                        self._receipts_due.clear()
                        return
                    if self._receipts_due:
                        wait = self._receipts_due[0][0] - time.monotonic()
                        if wait <= 0:
                            receipt, wa_id, to = heapq.heappop(self._receipts_due)[2]
                            break
                        self._receipt_cond.wait(wait)
                    else:
                        self._receipt_cond.wait()
            if self._phase == Phase.CONNECTED:
                self._emit_receipt(receipt, wa_id, to)

    def _emit_receipt(self, receipt: str, wa_id: str, to: str) -> None:
        event: ReceiptEvent = {"type": "message.receipt", "ids": [wa_id], "chat": to, "sender": to,
                               "receipt": receipt, "timestamp": iso(now())}
        self.emit(EventMessage(event).to_wire())

    def _run_due_timers(self) -> None:
        now = time.monotonic()
        if self._phase == Phase.RECONNECTING and self._connect_due is not None and now >= self._connect_due:
            self._connect_due = None
            if self._network_down or self._fail_file_exists():
                self._reconnect_errors += 1
                log.info("simulator: reconnect attempt %d failed (simulated)", self._reconnect_errors)
                self._dial(delay=self._reconnect_errors * self.config.reconnect_delay)
            else:
                self._enter_connected()
        elif self._phase == Phase.CONNECTING and self._connect_due is not None and now >= self._connect_due:
            self._connect_due = None
            if self._fail_next_connect or self._fail_file_exists():
                log.warning("simulator: connect failed (simulated)")
                self._finish(ExitCode.TRANSIENT)
            elif self._device is not None:
                self._enter_connected()
            else:
                self._enter_pairing()
        elif self._phase == Phase.PAIRING and now >= self._qr_due:
            if self._qr_emitted < self.config.qr_count:
                self._emit_next_qr()
            else:
                log.info("simulator: pairing timed out, nobody scanned the QR code")
                self._finish(ExitCode.PAIRING_TIMEOUT)

    def _time_to_next_timer(self) -> float | None:
        """Seconds until the next timed transition; None to wait for a command or stop()."""
        if self._phase in (Phase.CONNECTING, Phase.RECONNECTING) and self._connect_due is not None:
            due = self._connect_due
        elif self._phase == Phase.PAIRING:
            due = self._qr_due
        else:
            return None
        return min(max(due - time.monotonic(), 0.0), threading.TIMEOUT_MAX)


def _daemon_timer(seconds: float, action: Callable[[], None]) -> None:
    timer = threading.Timer(seconds, action)
    timer.daemon = True
    timer.start()


#: The simulator dispatches from protocol.SIMULATE_ACTIONS: each action there has its _act_ method.
SimulatorEngine._ACTIONS = {name: getattr(SimulatorEngine, f"_act_{name}") for name in SIMULATE_ACTIONS}
