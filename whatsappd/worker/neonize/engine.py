"""NeonizeEngine: the state machine around one neonize client (phases, handlers, the exit code).

The threading rules it follows are in the package docstring; the client's life is client.py's,
pairing pairing.py's, the messaging commands messaging.py's.
"""

from __future__ import annotations

import contextlib
import ctypes
import enum
import gc
import os
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import Any, assert_never

import structlog

from whatsappd.errors import ErrorCode
from whatsappd.protocol import (
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
    Replay,
    Send,
    SendStatus,
    Simulate,
    StateReport,
    WorkerState,
    parse_command,
)
from whatsappd.worker.engine import Emit, Engine, EngineOptions
from whatsappd.worker.neonize import client as client_life
from whatsappd.worker.neonize import pairing
from whatsappd.worker.neonize.classify import connect_failure_exit
from whatsappd.worker.neonize.gogate import GoGate
from whatsappd.worker.neonize.incoming import incoming_event, jid_string, receipt_event
from whatsappd.worker.neonize.lib import (
    ClientOutdatedEv,
    ConnectedEv,
    ConnectFailureEv,
    ConnectFailureReason,
    DisconnectedEv,
    KeepAliveRestoredEv,
    KeepAliveTimeoutEv,
    LoggedOutEv,
    MessageEv,
    NewClient,
    PairStatus,
    PairStatusEv,
    ReceiptEv,
    StreamErrorEv,
    StreamReplacedEv,
    TemporaryBan,
    TemporaryBanEv,
)
from whatsappd.worker.neonize.messaging import Messenger
from whatsappd.worker.neonize.sendlog import SendLog, SendLogCorrupt
from whatsappd.worker.neonize.store import STORE_FILE, StorePlace, StoreUnusable, device_exists, inspect_store
from whatsappd.worker.relay import Relay

__all__ = ["REPLAY_ENV", "NeonizeEngine", "Phase"]

#: Set to 1 in a worker's environment (benchmarks only) to allow the `replay` command.
REPLAY_ENV = "WHATSAPPD_NEONIZE_REPLAY"

GATE_WAIT_SECONDS = 30.0  # how long a messaging call waits while logout / pairing holds Go alone

# Exit codes a server event can force even after stop() or a transient failure was decided:
# they change what the supervisor must do with the session.
_SESSION_FATAL = frozenset({ExitCode.LOGGED_OUT, ExitCode.REPLACED, ExitCode.BANNED, ExitCode.OUTDATED})


class Phase(enum.StrEnum):
    """Where the engine is; the supervisor sees the `state` messages, not this."""

    IDLE = "idle"  # made, run() not called
    STARTING = "starting"  # run() prepares the store and the relay
    DIALING = "dialing"  # the first connect is under way
    PAIRING = "pairing"  # a QR code is shown
    PAIRED = "paired"  # the QR loop succeeded; waiting for Connected (after the 515 reconnect)
    CONNECTED = "connected"
    RECONNECTING = "reconnecting"  # the connection dropped; whatsmeow reconnects by itself
    ENDED = "ended"  # the exit code is decided


def _iso(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def _enum_name(enum_type: Any, message: Any, field: str) -> str | None:
    if not message.HasField(field):
        return None
    try:
        return str(enum_type.Name(getattr(message, field))).lower()
    except ValueError:
        return None


class NeonizeEngine(Engine):
    """One neonize client; see the package docstring for the threading rules it follows."""

    name = "neonize"
    ops = frozenset({Op.PAIR_PHONE, Op.LOGOUT, Op.DISCONNECT, Op.SEND, Op.SEND_STATUS, Op.CHECK_NUMBER,
                     Op.DOWNLOAD})
    session_files = (STORE_FILE,)

    def __init__(
        self,
        options: EngineOptions,
        emit: Emit,
        *,
        whatsmeow_debug: bool = False,
        connect_timeout: float | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        super().__init__(options, emit)
        self._log = structlog.get_logger("whatsappd.worker.neonize.engine").bind(company=options.company)
        self._whatsmeow_debug = whatsmeow_debug
        self._connect_timeout = connect_timeout
        self._clock = clock
        self._lock = threading.RLock()  # engine state
        self._gate = GoGate()  # Go calls: messaging shared; Stop, Logout, PairPhone alone
        self._done = threading.Event()
        self._exit: ExitCode | None = None
        self._reason: str | None = None
        self._ran = False
        self._returned = False
        self._phase = Phase.IDLE
        self._socket_up = False  # something came from the server: Go calls no longer block on the dial
        self._stop_requested = False
        self._client: NewClient | None = None
        self._relay: Relay | None = None
        self._connect_thread: threading.Thread | None = None
        self._dial_started: float | None = None  # monotonic
        self._qr_count = 0
        self._pairing_started: float | None = None  # monotonic
        self._pairing_window_end: float | None = None  # wall clock
        self._paired_at: float | None = None  # monotonic
        self._login_succeeded = False  # the QR loop ended in "success": neonize's event loop runs
        self._jid: str | None = None
        self._push_name: str | None = None
        self._place = StorePlace(options.session_dir, options.whatsmeow_dsn, options.jid, options.pair)
        self._send_log = SendLog(options.session_dir, clock=clock)
        self._messenger = Messenger(self._send_log, self._go_call, self._connected_client, clock, self._log)

    # ------------------------------------------------------------------ public facts

    @property
    def phase(self) -> Phase:
        return self._phase

    @property
    def exit_code(self) -> ExitCode | None:
        """The decided exit code (None while undecided)."""
        return self._exit

    @property
    def reason(self) -> str | None:
        return self._reason

    # ------------------------------------------------------------------ Engine interface

    def run(self) -> int:
        with self._lock:
            if self._ran:
                raise RuntimeError("NeonizeEngine.run() may be called only once")
            self._ran = True
            if self._exit is None:
                self._phase = Phase.STARTING
        self._emit_state(WorkerState.CONNECTING)
        if not self._done.is_set():
            self._prepare_store()
        try:  # cut a torn tail now; a log that cannot be read only stops sending (send_log_unusable)
            self._send_log.load()
        except (OSError, SendLogCorrupt) as exc:
            self._log.error("send_log_unusable", error=str(exc))
        if not self._done.is_set():
            # whatsmeow dials only through the relay, which holds every attempt to the chat
            # server at the connect gate: its own reconnects after a drop included (relay.py).
            try:
                self._relay = Relay(self.options.proxy, self.options.gate, self._log).start()
            except (OSError, ValueError) as exc:
                self._log.error("relay_failed", error=str(exc))
                self._decide(ExitCode.TRANSIENT, "relay_failed")
        if not self._done.is_set():
            client = self._make_client()
            with self._lock:
                if not self._done.is_set():
                    self._client = client
                    self._phase = Phase.DIALING
                    self._dial_started = time.monotonic()
                    self._connect_thread = threading.Thread(
                        target=self._connect, args=(client,), name="neonize-connect", daemon=True
                    )
                    self._connect_thread.start()
        while not self._done.wait(0.25):
            self._check_deadlines()
        self._shutdown_client()
        if self._relay is not None:
            self._relay.close()  # no new connections; open tunnels end with the process
        with self._lock:
            self._returned = True
            code = self._exit if self._exit is not None else ExitCode.TRANSIENT
            self._log.info("engine_finished", exit_code=int(code), exit_name=code.name, reason=self._reason)
            return int(code)

    def parse(self, message: dict[str, Any]) -> Command:
        ops = self.ops | {Op.REPLAY} if os.environ.get(REPLAY_ENV) == "1" else self.ops
        return parse_command(message, ops, self.name)

    def execute(self, command: Command) -> dict[str, Any]:
        match command:
            case PairPhone():
                return self._pair_phone(command.phone)
            case Logout():
                return self._logout()
            case Disconnect():
                self.stop()
                return {"disconnected": True}
            case Send():
                return self._messenger.send(command)
            case SendStatus():
                return self._messenger.send_status(command)
            case CheckNumber():
                return self._messenger.check_number(command)
            case Download():
                return self._messenger.download(command)
            case Simulate():
                raise EngineError(ErrorCode.UNKNOWN_OP, "the neonize engine has no operation 'simulate'")
            case Replay():
                return self._replay(command)
            case _:
                assert_never(command)

    def _replay(self, command: Replay) -> dict[str, Any]:
        """Benchmarks only ($WHATSAPPD_NEONIZE_REPLAY=1): `count` incoming messages through the
        event callback neonize hands to Go, so they take the real path to the supervisor."""
        refs = getattr(self._client, "_connect_refs", None)
        if not refs:
            raise EngineError(ErrorCode.NOT_CONNECTED, "the client has not started connecting yet")
        from whatsappd.worker.neonize.replay import replay_incoming

        # neonize names the client by the JID's user when it restores one by JID
        replayed = replay_incoming(refs[2], getattr(self._client, "uuid", self.options.company.encode()),
                                   command.count)
        if command.collect:  # a full collection, as a long-running worker eventually has
            gc.collect()
        return {"replayed": replayed}

    def stop(self) -> None:
        """Ask run() to return STOPPED. Never calls into Go, so it never blocks."""
        with self._lock:
            self._stop_requested = True
        self._decide(ExitCode.STOPPED, "stop_requested")

    # ------------------------------------------------------------------ event handlers
    # Each takes the neonize client and the real event object, as neonize calls them.

    def on_qr(self, client: Any, data: bytes | str) -> None:
        """A QR code to show (neonize's QR callback; codes never reach the log)."""
        code = data.decode("utf-8", "replace") if isinstance(data, bytes) else str(data)
        with self._lock:
            if self._exit is not None:
                return
            self._socket_up = True
            self._qr_count += 1
            now = self._clock()
            if self._pairing_started is None:
                self._pairing_started = time.monotonic()
                self._pairing_window_end = now + pairing.QR_WINDOW_SECONDS
            expires_at = _iso(now + pairing.qr_lifetime(self._qr_count))
            if self._phase in (Phase.IDLE, Phase.STARTING, Phase.DIALING):
                self._phase = Phase.PAIRING
                self._emit_state(WorkerState.PAIRING)
            self.emit(Qr(code, expires_at).to_wire())
            index = self._qr_count
        self._log.info("qr_issued", index=index, expires_at=expires_at)

    def on_login_status(self, status: str) -> None:
        """The outcome of neonize's QR loop: "success", "timeout", "err-..." (whatsmeow's names)."""
        self._log.info("pairing_status", status=status)
        with self._lock:
            self._socket_up = True
            if status == "success":
                self._login_succeeded = True
                if self._phase in (Phase.STARTING, Phase.DIALING, Phase.PAIRING):
                    self._phase = Phase.PAIRED
                if self._paired_at is None:
                    self._paired_at = time.monotonic()
                return
            stopping = self._stop_requested
            started = self._pairing_started
        if status == "timeout" and stopping:
            return
        if status == "err-scanned-without-multidevice":
            self._log.warning("qr_scanned_without_multidevice")
        outcome = pairing.login_failure(status, None if started is None else time.monotonic() - started)
        if outcome is not None:
            self._decide(*outcome)
        # anything else (passkey-request, passkey-confirmation, ...) only gets logged above

    def on_pair_status(self, client: Any, ev: PairStatusEv) -> None:
        if ev.Status == PairStatus.SUCCESS:
            jid = jid_string(ev.ID if ev.HasField("ID") else None)
            with self._lock:
                self._socket_up = True
                if self._exit is not None:
                    return
                if self._phase not in (Phase.CONNECTED, Phase.RECONNECTING):
                    self._phase = Phase.PAIRED
                if self._paired_at is None:
                    self._paired_at = time.monotonic()
                if jid:
                    self._jid = jid
                self.emit(Paired(jid).to_wire())
            self._log.info("paired", jid=jid, platform=ev.Platform or None)
        else:
            self._log.warning("pairing_failed", error=ev.Error or None)
            self._decide(ExitCode.TRANSIENT, "pair_error")

    def on_connected(self, client: Any, ev: ConnectedEv) -> None:
        jid, push_name = self._whoami(client)
        with self._lock:
            self._socket_up = True
            if self._exit is not None:
                return
            if jid:
                self._jid = jid
            if push_name:
                self._push_name = push_name
            self._phase = Phase.CONNECTED
            self._paired_at = None
            self._emit_state(WorkerState.CONNECTED, jid=self._jid, push_name=self._push_name)
        self._log.info("connected", jid=self._jid)

    def on_disconnected(self, client: Any, ev: DisconnectedEv) -> None:
        self._lost("disconnected")

    def on_keepalive_timeout(self, client: Any, ev: KeepAliveTimeoutEv) -> None:
        self._log.warning("keepalive_timeout", error_count=ev.ErrorCount, last_success=ev.LastSuccess or None)
        self._lost("keepalive_timeout")

    def on_keepalive_restored(self, client: Any, ev: KeepAliveRestoredEv) -> None:
        with self._lock:
            if self._exit is not None or self._phase != Phase.RECONNECTING:
                return
            self._phase = Phase.CONNECTED
            self._emit_state(WorkerState.CONNECTED, jid=self._jid, push_name=self._push_name)
        self._log.info("keepalive_restored")

    def on_logged_out(self, client: Any, ev: LoggedOutEv) -> None:
        reason = _enum_name(ConnectFailureReason, ev, "Reason") or "logged_out"
        self._log.warning("logged_out", reason=reason, on_connect=ev.OnConnect)
        self._decide(ExitCode.LOGGED_OUT, reason)

    def on_stream_replaced(self, client: Any, ev: StreamReplacedEv) -> None:
        self._log.warning("stream_replaced")
        self._decide(ExitCode.REPLACED, "stream_replaced")

    def on_temporary_ban(self, client: Any, ev: TemporaryBanEv) -> None:
        reason = _enum_name(TemporaryBan.TempBanReason, ev, "Code") or "temporary_ban"
        # neonize sends Expire as the ban's remaining duration in seconds, not a timestamp
        until = _iso(self._clock() + ev.Expire) if ev.Expire > 0 else None
        self._log.warning("temporary_ban", reason=reason, until=until)
        self._decide(ExitCode.BANNED, reason, until=until)

    def on_client_outdated(self, client: Any, ev: ClientOutdatedEv) -> None:
        self._log.error("client_outdated")
        self._decide(ExitCode.OUTDATED, "client_outdated")

    def on_connect_failure(self, client: Any, ev: ConnectFailureEv) -> None:
        reason_value = ev.Reason if ev.HasField("Reason") else None
        name = _enum_name(ConnectFailureReason, ev, "Reason") or "unknown"
        code = connect_failure_exit(reason_value)
        self._log.warning("connect_failure", reason=name, message=ev.Message or None, exit_name=code.name)
        self._decide(code, f"connect_failure_{name}" if code is ExitCode.TRANSIENT else name)

    def on_stream_error(self, client: Any, ev: StreamErrorEv) -> None:
        # whatsmeow reconnects by itself after an unknown stream error; a Disconnected follows
        self._log.warning("stream_error", stream_error_code=ev.Code or None)

    def on_message(self, client: Any, ev: MessageEv) -> None:
        """An incoming message (or one sent from the company's phone): a message.incoming event.

        Emitted whatever the phase, even after the end was decided: whatsmeow has taken the
        message off the server, and the channel still carries it until the process exits.
        """
        event = incoming_event(ev, now=self._clock())
        if event is None:
            self._log.debug("message_skipped", message_id=ev.Info.ID or None)
            return
        self.emit(EventMessage(event).to_wire())
        self._log.debug("message_incoming", message_id=event["id"], kind=event["kind"], from_me=event["from_me"])

    def on_receipt(self, client: Any, ev: ReceiptEv) -> None:
        """Delivered / read / played for messages we sent: a message.receipt event."""
        event = receipt_event(ev, now=self._clock())
        if event is None:
            return
        self.emit(EventMessage(event).to_wire())
        self._log.debug("message_receipt", receipt=event["receipt"], count=len(event["ids"]))

    # ------------------------------------------------------------------ internals

    def _emit_state(self, state: WorkerState, **fields: Any) -> None:
        self.emit(StateReport(state, **fields).to_wire())

    def _decide(self, code: ExitCode, reason: str, *, until: str | None = None) -> bool:
        """Settle run()'s exit code (first decision wins, but see _SESSION_FATAL) and wake it.

        Terminal outcomes are told by the exit code alone, except a ban, whose expiry the code
        cannot carry: a `state` message `banned` with `until` comes first (as the simulator does).
        """
        with self._lock:
            if self._returned:
                return False
            if self._exit is not None and not (code in _SESSION_FATAL and self._exit not in _SESSION_FATAL):
                return False
            self._exit = code
            self._reason = reason
            self._phase = Phase.ENDED
            if code is ExitCode.BANNED:
                self._emit_state(WorkerState.BANNED, reason=reason, until=until)
            self._done.set()
            self.options.gate.close()  # a reconnect held at the relay now fails at once
        self._log.info("exit_decided", exit_code=int(code), exit_name=code.name, reason=reason)
        return True

    def _lost(self, reason: str) -> None:
        """The connection dropped or stalled: whatsmeow reconnects by itself."""
        with self._lock:
            self._socket_up = True
            if self._exit is not None or self._phase != Phase.CONNECTED:
                return
            self._phase = Phase.RECONNECTING
            self._emit_state(WorkerState.RECONNECTING, reason=reason)
        self._log.warning("reconnecting", reason=reason)

    def _whoami(self, client: Any) -> tuple[str | None, str | None]:
        device = None
        if self._gate.acquire_shared(timeout=1):
            try:
                with self._lock:
                    usable = self._exit is None
                if usable:
                    device = client.get_me()
            except Exception:  # noqa: BLE001 - fall back on what neonize cached
                device = None
            finally:
                self._gate.release_shared()
        if device is None or not device.HasField("JID"):
            device = getattr(client, "me", None) or device
        if device is None:
            return None, None
        jid = jid_string(device.JID) if device.HasField("JID") else None
        return jid, (device.PushName or None)

    def _prepare_store(self) -> None:
        if self._place.dsn is not None:
            self._prepare_pg_store(self._place.dsn)
            return
        try:
            devices = inspect_store(self.options.session_dir / STORE_FILE)
        except StoreUnusable as exc:
            self._log.error("store_unusable", error=str(exc))
            self._decide(ExitCode.STORE_UNUSABLE, "store_unusable")
            return
        if not self.options.pair and not devices:
            # whatsmeow pairs whenever the store holds no device; so does the simulator
            self._log.warning("no_session_to_restore", store_exists=devices is not None)

    def _prepare_pg_store(self, dsn: str) -> None:
        """PostgreSQL: pairing makes a new device; restoring needs the recorded JID's row, checked
        here because neonize crashes (SIGABRT) on a JID without one."""
        if self.options.pair:
            return
        jid = self.options.jid
        try:
            exists = jid is not None and device_exists(dsn, jid)
        except Exception as exc:  # noqa: BLE001 - psycopg.Error, or a DSN it cannot parse
            self._log.warning("store_unreachable", error=str(exc).replace(dsn, "***"))
            self._decide(ExitCode.TRANSIENT, "store_unreachable")
            return
        if not exists:
            self._log.warning("not_paired", jid=jid, why="no JID recorded" if jid is None else "no device row")
            self._decide(ExitCode.NOT_PAIRED, "not_paired")

    def _make_client(self) -> NewClient:
        handlers: client_life.Handlers = [
            (PairStatusEv, self.on_pair_status),
            (ConnectedEv, self.on_connected),
            (DisconnectedEv, self.on_disconnected),
            (KeepAliveTimeoutEv, self.on_keepalive_timeout),
            (KeepAliveRestoredEv, self.on_keepalive_restored),
            (LoggedOutEv, self.on_logged_out),
            (StreamReplacedEv, self.on_stream_replaced),
            (TemporaryBanEv, self.on_temporary_ban),
            (ClientOutdatedEv, self.on_client_outdated),
            (ConnectFailureEv, self.on_connect_failure),
            (StreamErrorEv, self.on_stream_error),
        ]
        return client_life.new_client(
            self._place, self.options.company, whatsmeow_debug=self._whatsmeow_debug,
            on_qr=self._guard(self.on_qr), on_login_status=self._raw_login_status,
            handlers=[(event_type, self._guard(handler)) for event_type, handler in handlers],
            # a message that cannot be turned into an event is logged, not a reason to reconnect
            event_handlers=[(MessageEv, self._guard_event(self.on_message)),
                            (ReceiptEv, self._guard_event(self.on_receipt))],
            log=self._log,
        )

    def _guard(self, handler: Callable[..., None]) -> Callable[..., None]:
        """Wrap a handler called from Go: an exception must not vanish into ctypes."""

        def guarded(*args: Any) -> None:
            try:
                handler(*args)
            except Exception:
                self._log.exception("engine_handler_failed", handler=handler.__name__)
                self._decide(ExitCode.TRANSIENT, "engine_error")

        return guarded

    def _guard_event(self, handler: Callable[..., None]) -> Callable[..., None]:
        """Wrap a message/receipt handler called from Go: log a failure and carry on."""

        def guarded(*args: Any) -> None:
            try:
                handler(*args)
            except Exception:
                self._log.exception("event_handler_failed", handler=handler.__name__)

        return guarded

    def _raw_login_status(self, uuid: Any, status: Any) -> None:
        try:
            text = ctypes.string_at(status).decode("utf-8", "replace") if status else ""
            self.on_login_status(text)
        except Exception:
            self._log.exception("engine_handler_failed", handler="on_login_status")
            self._decide(ExitCode.TRANSIENT, "engine_error")

    def _connect(self, client: NewClient) -> None:
        assert self._relay is not None
        self._decide(*client_life.dial(client, self._relay.url, self.options.proxy, self.options.pair, self._log))

    def _check_deadlines(self) -> None:
        now = time.monotonic()
        with self._lock:
            phase = self._phase
            dial_started, pairing_started, paired_at = self._dial_started, self._pairing_started, self._paired_at
        if (
            phase == Phase.DIALING
            and self._connect_timeout is not None
            and dial_started is not None
            and now - dial_started > self._connect_timeout
        ):
            self._decide(ExitCode.TRANSIENT, "connect_timeout")
        elif (phase == Phase.PAIRING and pairing_started is not None
              and now - pairing_started > pairing.PAIRING_DEADLINE_SECONDS):
            self._decide(ExitCode.PAIRING_TIMEOUT, "qr_timeout")
        elif (phase == Phase.PAIRED and paired_at is not None
              and now - paired_at > pairing.CONNECTED_AFTER_PAIR_SECONDS):
            self._decide(ExitCode.TRANSIENT, "no_connection_after_pairing")

    def _shutdown_client(self) -> None:
        """Stop the Go client (client.shutdown): bounded, and skipped while the first dial runs."""
        with self._lock:
            client, socket_up, connect_thread = self._client, self._socket_up, self._connect_thread
            # connect() can end only from neonize's event loop, which a QR loop that did not
            # succeed never reaches (it waits forever for a device ID): then do not wait for it
            connect_can_end = self._pairing_started is None or self._login_succeeded
        if client is None or connect_thread is None:
            return
        client_life.shutdown(client, connect_thread, socket_up=socket_up, connect_can_end=connect_can_end,
                             gate=self._gate, log=self._log)

    # ------------------------------------------------------------------ pairing and logout

    def _pair_phone(self, phone: str) -> dict[str, Any]:
        with self._lock:
            self._require_pairing()
            client = self._client
            window_end = self._pairing_window_end
        assert client is not None and window_end is not None
        with self._gate.exclusive():
            with self._lock:
                self._require_pairing()
            code = pairing.pair_code(client, phone)
        self._log.info("pair_code_issued", expires_at=_iso(window_end))
        return {"code": code, "expires_at": _iso(window_end)}

    def _require_pairing(self) -> None:
        if (
            self._phase != Phase.PAIRING
            or self._client is None
            or self._pairing_window_end is None
            or self._clock() >= self._pairing_window_end
        ):
            raise EngineError(
                ErrorCode.NOT_PAIRING,
                "no pairing is in progress: a phone code can be asked for only while a QR code is shown",
            )

    def _logout(self) -> dict[str, Any]:
        with self._lock:
            if self._phase != Phase.CONNECTED or self._client is None:
                raise EngineError(ErrorCode.NOT_CONNECTED, "logout needs a connected session")
            client = self._client
        with self._gate.exclusive():
            with self._lock:
                if self._phase != Phase.CONNECTED or self._exit is not None:
                    raise EngineError(ErrorCode.NOT_CONNECTED, "logout needs a connected session")
            pairing.unlink(client, self._log)
        self._log.info("logged_out_on_request")
        self._decide(ExitCode.LOGGED_OUT, "logout_requested")
        return {"unlinked": True}

    # ------------------------------------------------------------------ messaging: Go calls

    @contextlib.contextmanager
    def _go_call(self, what: str) -> Iterator[Any]:
        """The connected client, for Go calls that may run side by side (not_connected if none)."""
        if not self._gate.acquire_shared(timeout=GATE_WAIT_SECONDS):
            raise EngineError(ErrorCode.NOT_CONNECTED, f"{what} must wait: the client is logging out, pairing or stopping")
        try:
            yield self._connected_client(what)
        finally:
            self._gate.release_shared()

    def _connected_client(self, what: str) -> Any:
        with self._lock:
            if self._exit is not None or self._phase != Phase.CONNECTED or self._client is None:
                phase = "ending" if self._exit is not None else self._phase
                raise EngineError(ErrorCode.NOT_CONNECTED, f"{what} needs a live connection (the engine is {phase})")
            return self._client
