"""The real engine: one neonize (whatsmeow) client in this worker process.

This is the only module of whatsappd that imports neonize. The worker main imports it only when
the engine is neonize, after configuring logging. docs/neonize-notes.md lists the facts about
neonize 0.5.2 this code relies on; the important ones:

- ``NewClient.connect()`` blocks until the Go side is stopped. It runs here in a daemon thread;
  run() waits on an Event in the caller's thread, so signals keep working and run() can return
  even when the Go call never does.
- While the first dial is in progress (and during whatsmeow's own reconnect dials) any Go call
  that takes whatsmeow's socket lock (``stop()``, ``disconnect()``) blocks the caller for as
  long as the dial lasts, which is forever against a silent peer. So stop() never calls Go:
  run() does, from a helper thread, with a bounded wait, and only once the socket was up.
- In the QR flow, neonize delivers no event to Python until the QR loop ends; QR codes come
  through the QR callback and the loop's outcome ("success", "timeout", "err-...") through the
  login-status callback, which neonize only print()s. The engine installs its own.
- After a QR timeout, a pairing error, or a stop() during pairing, neonize's ``Neonize()`` Go
  call never returns and its thread is not a daemon: the worker must leave with ``os._exit``.

Every handler takes the real neonize event object, so the decisions (messages and exit code)
are testable without a network: ``engine.on_logged_out(client, LoggedOutEv())``.

Never log QR codes, pairing codes, keys or message bodies at info or above: whatsmeow's own
debug log prints QR codes, so its level is held at INFO unless ``whatsmeow_debug`` is set.
"""

from __future__ import annotations

import ctypes
import io
import logging
import os
import re
import sqlite3
import subprocess
import threading
import time
import urllib.parse
import warnings
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import structlog

from whatsappd.protocol import ExitCode
from whatsappd.worker.engine import Emit, Engine, EngineError, EngineOptions


def _import_neonize() -> None:
    """Import neonize without letting its import side effects leak into the process.

    ``import neonize`` calls ``logging.basicConfig(level=INFO)`` (a no-op once the worker main
    configured logging, but not in tests) and runs ``os.popen("uname -a").read()`` twice without
    closing the pipe (a ResourceWarning, and a zombie reaped later). Both are undone here: the
    root logger is restored, and os.popen is replaced for the import by a version that waits.
    """
    root = logging.getLogger()
    saved_level, saved_handlers = root.level, list(root.handlers)
    saved_popen = os.popen

    def closing_popen(cmd: str, mode: str = "r", buffering: int = -1) -> io.StringIO:
        result = subprocess.run(cmd, shell=True, capture_output=True, text=True, check=False)  # noqa: S602
        return io.StringIO(result.stdout)

    try:
        os.popen = closing_popen  # type: ignore[assignment]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ResourceWarning)
            import neonize.client  # noqa: F401  (loads the Go library)
    finally:
        os.popen = saved_popen
        root.setLevel(saved_level)
        for handler in list(root.handlers):
            if handler not in saved_handlers:
                root.removeHandler(handler)


_import_neonize()

import neonize.utils.ffmpeg as _neonize_ffmpeg  # noqa: E402
from neonize._binder import ProxySettings  # noqa: E402
from neonize.client import NewClient  # noqa: E402
from neonize.events import (  # noqa: E402
    ClientOutdatedEv,
    ConnectedEv,
    ConnectFailureEv,
    DisconnectedEv,
    KeepAliveRestoredEv,
    KeepAliveTimeoutEv,
    LoggedOutEv,
    PairStatusEv,
    StreamErrorEv,
    StreamReplacedEv,
    TemporaryBanEv,
)
from neonize.exc import LogoutError, NeonizeError, PairPhoneError  # noqa: E402
from neonize.proto.Neonize_pb2 import JID, ConnectFailureReason, PairStatus, TemporaryBan  # noqa: E402
from neonize.utils.enum import ClientName  # noqa: E402
from neonize.utils.jid import Jid2String  # noqa: E402
from neonize.utils.log import log as _neonize_go_level  # noqa: E402

# neonize warns on every connect that ffmpeg is missing; whatsappd sends no media through it.
_neonize_ffmpeg._ffmpeg_checked = True

__all__ = [
    "STORE_FILE",
    "STORE_FILES",
    "NeonizeEngine",
    "StoreUnusable",
    "connect_failure_exit",
    "inspect_store",
    "is_store_error",
    "store_dsn",
]

#: The whatsmeow store inside a session directory, and every file SQLite keeps beside it (WAL).
STORE_FILE = "store.db"
STORE_FILES = (STORE_FILE, f"{STORE_FILE}-wal", f"{STORE_FILE}-shm")

FIRST_QR_SECONDS = 60  # whatsmeow: the first of 6 codes lives 60 s ...
NEXT_QR_SECONDS = 20  # ... the 5 others 20 s each
QR_WINDOW_SECONDS = FIRST_QR_SECONDS + 5 * NEXT_QR_SECONDS  # 160 s, then the socket is closed
PAIRING_DEADLINE_SECONDS = 170  # our own deadline in case the "timeout" status never comes
CONNECTED_AFTER_PAIR_SECONDS = 30  # pairing succeeded but no Connected: restart the worker
SHUTDOWN_SECONDS = 3.0  # how long run() waits for the Go side to stop before returning anyway

_PHONE = re.compile(r"[1-9][0-9]{6,14}")

# A NeonizeError from connect() that names the database, not the network.
_STORE_ERROR = re.compile(
    r"upgrade database|open database|not a database|malformed|unable to open|no such table|"
    r"failed to scan|database corrupt|disk I/O error",
    re.IGNORECASE,
)

_REASON = ConnectFailureReason
_LOGGED_OUT_REASONS = frozenset(
    {_REASON.Value("LOGGED_OUT"), _REASON.Value("MAIN_DEVICE_GONE"), _REASON.Value("UNKNOWN_LOGOUT")}
)
_BANNED_REASONS = frozenset({_REASON.Value("TEMP_BANNED")})
_OUTDATED_REASONS = frozenset({_REASON.Value("CLIENT_OUTDATED")})

# Exit codes a server event can force even after stop() or a transient failure was decided:
# they change what the supervisor must do with the session.
_SESSION_FATAL = frozenset({ExitCode.LOGGED_OUT, ExitCode.REPLACED, ExitCode.BANNED, ExitCode.OUTDATED})

# Terminal outcomes are told by the exit code alone, except a ban, whose expiry the code cannot
# carry: a `state` message `banned` with `until` comes first (as the simulator does).
_TERMINAL_STATE = {ExitCode.BANNED: "banned"}


class StoreUnusable(Exception):
    """The session's SQLite store cannot be opened or read."""


def store_dsn(session_dir: Path) -> str:
    """The ``NewClient(name=...)`` string for a session directory: SQLite in WAL mode.

    neonize opens ``file:{name}?_foreign_keys=on``; the trailing ``_pad=`` swallows that second
    ``?...`` so our parameters hold. The path is percent-encoded because SQLite decodes URIs.
    """
    path = urllib.parse.quote(str(Path(session_dir) / STORE_FILE), safe="/")
    return f"{path}?_journal_mode=WAL&_busy_timeout=10000&_foreign_keys=on&_pad="


def inspect_store(path: Path) -> int | None:
    """Count the device rows of a whatsmeow store; None if the file does not exist.

    Raises StoreUnusable if SQLite cannot open or read it. Never creates the file.
    """
    path = Path(path)
    if not path.exists() and not path.is_symlink():
        return None
    uri = f"file:{urllib.parse.quote(str(path), safe='/')}?mode=rw"
    try:
        connection = sqlite3.connect(uri, uri=True, timeout=10)
        try:
            (has_table,) = connection.execute(
                "SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name = 'whatsmeow_device'"
            ).fetchone()
            if not has_table:
                return 0
            (devices,) = connection.execute("SELECT count(*) FROM whatsmeow_device").fetchone()
            return int(devices)
        finally:
            connection.close()
    except sqlite3.Error as exc:
        raise StoreUnusable(f"{path}: {exc}") from exc


def is_store_error(message: str) -> bool:
    """Whether a NeonizeError from connect() is about the SQLite store rather than the network."""
    return _STORE_ERROR.search(message) is not None and "dial" not in message


def connect_failure_exit(reason: int | None) -> ExitCode:
    """The exit code for a ConnectFailure reason (neonize's enum; None when unset)."""
    if reason in _LOGGED_OUT_REASONS:
        return ExitCode.LOGGED_OUT
    if reason in _BANNED_REASONS:
        return ExitCode.BANNED
    if reason in _OUTDATED_REASONS:
        return ExitCode.OUTDATED
    return ExitCode.TRANSIENT


def _iso(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def _jid_string(jid: JID | None) -> str | None:
    """whatsmeow's own form, device included: ``5511999999999:12@s.whatsapp.net``."""
    if jid is None or not jid.User:
        return None
    return Jid2String(jid)


def _enum_name(enum: Any, message: Any, field: str) -> str | None:
    if not message.HasField(field):
        return None
    try:
        return str(enum.Name(getattr(message, field))).lower()
    except ValueError:
        return None


def _redact_proxy(url: str | None) -> str | None:
    if not url:
        return url
    parts = urllib.parse.urlsplit(url)
    if parts.username is None and parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"***@{host}" + (f":{parts.port}" if parts.port else "")
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


class NeonizeEngine(Engine):
    """One neonize client; see the module docstring for the threading rules it follows."""

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
        self._log = structlog.get_logger("whatsappd.worker.neonize_engine").bind(company=options.company)
        self._whatsmeow_debug = whatsmeow_debug
        self._connect_timeout = connect_timeout
        self._clock = clock
        self._lock = threading.RLock()  # engine state
        self._go_lock = threading.Lock()  # serialises Go calls that touch neonize's client map
        self._done = threading.Event()
        self._exit: ExitCode | None = None
        self._reason: str | None = None
        self._ran = False
        self._returned = False
        self._phase = "idle"  # idle starting dialing pairing paired connected reconnecting ended
        self._socket_up = False  # something came from the server: Go calls no longer block on the dial
        self._stop_requested = False
        self._client: NewClient | None = None
        self._connect_thread: threading.Thread | None = None
        self._dial_started: float | None = None  # monotonic
        self._qr_count = 0
        self._pairing_started: float | None = None  # monotonic
        self._pairing_window_end: float | None = None  # wall clock
        self._paired_at: float | None = None  # monotonic
        self._login_succeeded = False  # the QR loop ended in "success": neonize's event loop runs
        self._jid: str | None = None
        self._push_name: str | None = None

    # ------------------------------------------------------------------ public facts

    @property
    def phase(self) -> str:
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
                self._phase = "starting"
        self._emit_state("connecting")
        if not self._done.is_set():
            self._prepare_store()
        if not self._done.is_set():
            client = self._make_client()
            with self._lock:
                if not self._done.is_set():
                    self._client = client
                    self._phase = "dialing"
                    self._dial_started = time.monotonic()
                    self._connect_thread = threading.Thread(
                        target=self._connect, args=(client,), name="neonize-connect", daemon=True
                    )
                    self._connect_thread.start()
        while not self._done.wait(0.25):
            self._check_deadlines()
        self._shutdown_client()
        with self._lock:
            self._returned = True
            code = self._exit if self._exit is not None else ExitCode.TRANSIENT
            self._log.info("engine_finished", exit_code=int(code), exit_name=code.name, reason=self._reason)
            return int(code)

    def command(self, op: str, args: dict[str, Any]) -> dict[str, Any]:
        if op == "pair_phone":
            return self._pair_phone(args)
        if op == "logout":
            return self._logout()
        if op == "disconnect":
            self.stop()
            return {"disconnected": True}
        raise EngineError("unknown_op", f"the neonize engine has no operation {op!r}")

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
            first = self._pairing_started is None
            if first:
                self._pairing_started = time.monotonic()
                self._pairing_window_end = now + QR_WINDOW_SECONDS
            expires_at = _iso(now + (FIRST_QR_SECONDS if self._qr_count == 1 else NEXT_QR_SECONDS))
            if self._phase in ("idle", "starting", "dialing"):
                self._phase = "pairing"
                self._emit_state("pairing")
            self.emit({"type": "qr", "code": code, "expires_at": expires_at})
            index = self._qr_count
        self._log.info("qr_issued", index=index, expires_at=expires_at)

    def on_login_status(self, status: str) -> None:
        """The outcome of neonize's QR loop: "success", "timeout", "err-..." (whatsmeow's names)."""
        self._log.info("pairing_status", status=status)
        with self._lock:
            self._socket_up = True
            if status == "success":
                self._login_succeeded = True
                if self._phase in ("starting", "dialing", "pairing"):
                    self._phase = "paired"
                if self._paired_at is None:
                    self._paired_at = time.monotonic()
                return
            stopping = self._stop_requested
            started = self._pairing_started
        if status == "timeout":
            if stopping:
                return
            elapsed = None if started is None else time.monotonic() - started
            if elapsed is not None and elapsed >= QR_WINDOW_SECONDS - 10:
                self._decide(ExitCode.PAIRING_TIMEOUT, "qr_timeout")
            else:  # the server closed the socket before the QR codes ran out
                self._decide(ExitCode.TRANSIENT, "disconnected_while_pairing")
        elif status == "err-client-outdated":
            self._decide(ExitCode.OUTDATED, "client_outdated")
        elif status == "err-unexpected-state":
            self._decide(ExitCode.TRANSIENT, "pairing_unexpected_state")
        elif status == "error":
            self._decide(ExitCode.TRANSIENT, "pairing_error")
        elif status == "err-scanned-without-multidevice":
            self._log.warning("qr_scanned_without_multidevice")
        # anything else (passkey-request, passkey-confirmation, ...) only gets logged above

    def on_pair_status(self, client: Any, ev: PairStatusEv) -> None:
        if ev.Status == PairStatus.SUCCESS:
            jid = _jid_string(ev.ID if ev.HasField("ID") else None)
            with self._lock:
                self._socket_up = True
                if self._exit is not None:
                    return
                if self._phase not in ("connected", "reconnecting"):
                    self._phase = "paired"
                if self._paired_at is None:
                    self._paired_at = time.monotonic()
                if jid:
                    self._jid = jid
                self.emit({"type": "paired", "jid": jid})
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
            self._phase = "connected"
            self._paired_at = None
            self._emit_state("connected", jid=self._jid, push_name=self._push_name)
        self._log.info("connected", jid=self._jid)

    def on_disconnected(self, client: Any, ev: DisconnectedEv) -> None:
        self._lost("disconnected")

    def on_keepalive_timeout(self, client: Any, ev: KeepAliveTimeoutEv) -> None:
        self._log.warning("keepalive_timeout", error_count=ev.ErrorCount, last_success=ev.LastSuccess or None)
        self._lost("keepalive_timeout")

    def on_keepalive_restored(self, client: Any, ev: KeepAliveRestoredEv) -> None:
        with self._lock:
            if self._exit is not None or self._phase != "reconnecting":
                return
            self._phase = "connected"
            self._emit_state("connected", jid=self._jid, push_name=self._push_name)
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
        if code is ExitCode.TRANSIENT:
            self._decide(code, f"connect_failure_{name}")
        elif code is ExitCode.BANNED:
            self._decide(code, name, until=None)
        else:
            self._decide(code, name)

    def on_stream_error(self, client: Any, ev: StreamErrorEv) -> None:
        # whatsmeow reconnects by itself after an unknown stream error; a Disconnected follows
        self._log.warning("stream_error", stream_error_code=ev.Code or None)

    # ------------------------------------------------------------------ internals

    def _emit_state(self, state: str, **fields: Any) -> None:
        self.emit({"type": "state", "state": state, **fields})

    def _decide(self, code: ExitCode, reason: str, **state_fields: Any) -> bool:
        """Settle run()'s exit code (first decision wins, but see _SESSION_FATAL) and wake it."""
        with self._lock:
            if self._returned:
                return False
            if self._exit is not None and not (code in _SESSION_FATAL and self._exit not in _SESSION_FATAL):
                return False
            self._exit = code
            self._reason = reason
            self._phase = "ended"
            state = _TERMINAL_STATE.get(code)
            if state is not None:
                self._emit_state(state, reason=reason, **state_fields)
            self._done.set()
        self._log.info("exit_decided", exit_code=int(code), exit_name=code.name, reason=reason)
        return True

    def _lost(self, reason: str) -> None:
        """The connection dropped or stalled: whatsmeow reconnects by itself."""
        with self._lock:
            self._socket_up = True
            if self._exit is not None or self._phase != "connected":
                return
            self._phase = "reconnecting"
            self._emit_state("reconnecting", reason=reason)
        self._log.warning("reconnecting", reason=reason)

    def _whoami(self, client: Any) -> tuple[str | None, str | None]:
        device = None
        if self._go_lock.acquire(timeout=1):
            try:
                with self._lock:
                    usable = self._exit is None
                if usable:
                    device = client.get_me()
            except Exception:  # noqa: BLE001 - fall back on what neonize cached
                device = None
            finally:
                self._go_lock.release()
        if device is None or not device.HasField("JID"):
            device = getattr(client, "me", None) or device
        if device is None:
            return None, None
        jid = _jid_string(device.JID) if device.HasField("JID") else None
        return jid, (device.PushName or None)

    def _prepare_store(self) -> None:
        store = self.options.session_dir / STORE_FILE
        try:
            devices = inspect_store(store)
        except StoreUnusable as exc:
            self._log.error("store_unusable", error=str(exc))
            self._decide(ExitCode.STORE_UNUSABLE, "store_unusable")
            return
        if not self.options.pair and not devices:
            # whatsmeow pairs whenever the store holds no device; so does the simulator
            self._log.warning("no_session_to_restore", store_exists=devices is not None)

    def _make_client(self) -> NewClient:
        if not self._whatsmeow_debug:
            # whatsmeow logs QR codes and node dumps at debug: never let them out of Go
            level = max(logging.INFO, logging.getLogger("whatsmeow").getEffectiveLevel())
            _neonize_go_level.setLevel(level)
        client = NewClient(store_dsn(self.options.session_dir), uuid=self.options.company)
        finalizer = getattr(client, "_stop_finalizer", None)
        if finalizer is not None:
            finalizer.atexit = False  # Stop() at exit would block while a dial is in progress
        client.event.qr(self._guard(self.on_qr))  # also keeps neonize from printing the QR
        if hasattr(client, "_NewClient__onLoginStatus"):
            client._NewClient__onLoginStatus = self._raw_login_status
        else:  # pragma: no cover - a neonize release that renamed it
            self._log.warning("neonize_login_status_hook_missing")
        handlers: list[tuple[type, Callable[[Any, Any], None]]] = [
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
        for event_type, handler in handlers:
            client.event(event_type)(self._guard(handler))
        return client

    def _guard(self, handler: Callable[..., None]) -> Callable[..., None]:
        """Wrap a handler called from Go: an exception must not vanish into ctypes."""

        def guarded(*args: Any) -> None:
            try:
                handler(*args)
            except Exception:
                self._log.exception("engine_handler_failed", handler=handler.__name__)
                self._decide(ExitCode.TRANSIENT, "engine_error")

        return guarded

    def _raw_login_status(self, uuid: Any, status: Any) -> None:
        try:
            text = ctypes.string_at(status).decode("utf-8", "replace") if status else ""
            self.on_login_status(text)
        except Exception:
            self._log.exception("engine_handler_failed", handler="on_login_status")
            self._decide(ExitCode.TRANSIENT, "engine_error")

    def _connect(self, client: NewClient) -> None:
        proxy = ProxySettings(proxy_address=self.options.proxy) if self.options.proxy else None
        self._log.info("dialing", proxy=_redact_proxy(self.options.proxy), pair=self.options.pair)
        try:
            client.connect(proxy)
        except NeonizeError as exc:
            message = str(exc)
            if is_store_error(message):
                self._log.error("store_unusable", error=message)
                self._decide(ExitCode.STORE_UNUSABLE, "store_unusable")
            else:
                self._log.warning("connect_failed", error=message)
                self._decide(ExitCode.TRANSIENT, "connect_failed")
        except Exception:
            self._log.exception("connect_crashed")
            self._decide(ExitCode.TRANSIENT, "connect_crashed")
        else:
            self._decide(ExitCode.TRANSIENT, "client_ended")

    def _check_deadlines(self) -> None:
        now = time.monotonic()
        with self._lock:
            phase = self._phase
            dial_started, pairing_started, paired_at = self._dial_started, self._pairing_started, self._paired_at
        if (
            phase == "dialing"
            and self._connect_timeout is not None
            and dial_started is not None
            and now - dial_started > self._connect_timeout
        ):
            self._decide(ExitCode.TRANSIENT, "connect_timeout")
        elif phase == "pairing" and pairing_started is not None and now - pairing_started > PAIRING_DEADLINE_SECONDS:
            self._decide(ExitCode.PAIRING_TIMEOUT, "qr_timeout")
        elif phase == "paired" and paired_at is not None and now - paired_at > CONNECTED_AFTER_PAIR_SECONDS:
            self._decide(ExitCode.TRANSIENT, "no_connection_after_pairing")

    def _shutdown_client(self) -> None:
        """Stop the Go client, waiting at most SHUTDOWN_SECONDS; skip it while the first dial runs."""
        with self._lock:
            client, socket_up, connect_thread = self._client, self._socket_up, self._connect_thread
            # connect() can end only from neonize's event loop, which a QR loop that did not
            # succeed never reaches (it waits forever for a device ID): then do not wait for it
            connect_can_end = self._pairing_started is None or self._login_succeeded
        if client is None or connect_thread is None:
            return
        connect_thread.join(0.2)  # a failed connect() is usually finishing right now
        if not connect_thread.is_alive():
            return
        if not socket_up:
            self._log.info("dial_abandoned")  # Stop() would block until the dial ends
            return
        deadline = time.monotonic() + SHUTDOWN_SECONDS

        def stop_go() -> None:
            if not self._go_lock.acquire(timeout=SHUTDOWN_SECONDS):
                return
            try:
                client.stop()
            except Exception:  # noqa: BLE001
                self._log.debug("neonize_stop_failed", exc_info=True)
            finally:
                self._go_lock.release()

        stopper = threading.Thread(target=stop_go, name="neonize-stop", daemon=True)
        stopper.start()
        stopper.join(max(0.0, deadline - time.monotonic()))
        if connect_can_end:
            connect_thread.join(max(0.0, deadline - time.monotonic()))
        self._log.debug("client_shutdown", go_stopped=not stopper.is_alive(), connect_ended=not connect_thread.is_alive())

    # ------------------------------------------------------------------ commands

    def _pair_phone(self, args: dict[str, Any]) -> dict[str, Any]:
        phone = args.get("phone")
        if not isinstance(phone, str) or _PHONE.fullmatch(phone) is None:
            raise EngineError(
                "invalid_phone",
                "phone must be the number in international format, digits only (7 to 15, no '+' or leading 0)",
            )
        with self._lock:
            self._require_pairing()
            client = self._client
            window_end = self._pairing_window_end
        assert client is not None and window_end is not None
        with self._go_lock:
            with self._lock:
                self._require_pairing()
            try:
                code = client.PairPhone(phone, True, ClientName.LINUX)
            except PairPhoneError as exc:
                raise EngineError("pair_phone_failed", f"WhatsApp refused the phone-code pairing: {exc}") from exc
        self._log.info("pair_code_issued", expires_at=_iso(window_end))
        return {"code": code, "expires_at": _iso(window_end)}

    def _require_pairing(self) -> None:
        if (
            self._phase != "pairing"
            or self._client is None
            or self._pairing_window_end is None
            or self._clock() >= self._pairing_window_end
        ):
            raise EngineError(
                "not_pairing",
                "no pairing is in progress: a phone code can be asked for only while a QR code is shown",
            )

    def _logout(self) -> dict[str, Any]:
        with self._lock:
            if self._phase != "connected" or self._client is None:
                raise EngineError("not_connected", "logout needs a connected session")
            client = self._client
        with self._go_lock:
            with self._lock:
                if self._phase != "connected":
                    raise EngineError("not_connected", "logout needs a connected session")
            try:
                client.logout()
            except LogoutError as exc:
                message = str(exc)
                # whatsmeow unlinks on the server first, then deletes its rows: a failure of the
                # second step still leaves the device unlinked
                if not message.startswith("error deleting data from store"):
                    raise EngineError("logout_failed", f"WhatsApp did not confirm the logout: {message}") from exc
                self._log.warning("logout_store_cleanup_failed", error=message)
        self._log.info("logged_out_on_request")
        self._decide(ExitCode.LOGGED_OUT, "logout_requested")
        return {"unlinked": True}
