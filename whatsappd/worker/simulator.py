"""A fake WhatsApp: an engine with no network, for tests and for CRM developers without a phone.

From the supervisor's side it behaves like the real neonize engine: the same messages on the
channel, the same exit codes. It is driven with the `simulate` command, args {"action": A, ...}:

    scan [jid] [push_name] [connect=true]  pairing -> paired, session saved, connected
    drop [reason] / restore                connected -> reconnecting -> connected
    logged_out | replaced | outdated       run() returns LOGGED_OUT | REPLACED | OUTDATED
    ban [seconds=3600] [reason]            state banned with until, then BANNED
    fail_connect                           run() returns TRANSIENT (before run(): its connect fails)
    crash [after=0]                        os._exit(70), no reply
    hang [after=0]                         SIGSTOP to the whole process: heartbeats stop too

plus the real commands `pair_phone` {"phone"} and `logout` {}.

Life of one engine (one worker process):

    starting --run()--> connecting --(connect delay)--+-- stored device --> connected
                                                      +-- no device ------> pairing
    pairing: QR codes rotate (first 60 s, then 20 s each, 6 in all), then PAIRING_TIMEOUT;
             `simulate scan` -> paired, session saved -> connecting (the 515 reconnect)
             -> connected
    connected <--drop/restore--> reconnecting
    any phase: logged_out / replaced / ban / outdated / fail_connect / stop() end run()

Choices (documented for the worker main and the supervisor):

* The store decides, not `options.pair`, exactly like whatsmeow (which pairs whenever the store
  has no device): with `pair=False` and no stored device the simulator starts pairing rather
  than returning LOGGED_OUT; with `pair=True` and a stored device it restores the session.
* Terminal outcomes are told by the exit code only. The single exception is a ban: a
  `state` message `banned` with `until` precedes ExitCode.BANNED (the expiry is not in the code).
* Logging out (the phone unlinks, or the `logout` command) clears the device from the store
  but leaves the file in place, as whatsmeow deletes its device rows: the supervisor removes
  the session files; if it does not, the next start pairs anew instead of "restoring".
* A store that cannot be parsed makes run() return ExitCode.STORE_UNUSABLE.
* Environment variables (read when the engine is created) tune the timings; a bad value makes
  run() return ExitCode.BAD_INVOCATION:
    WHATSAPPD_SIM_QR_FIRST       seconds the first QR code is valid (60)
    WHATSAPPD_SIM_QR_NEXT        seconds every later code is valid (20)
    WHATSAPPD_SIM_QR_COUNT       codes before the pairing times out (6)
    WHATSAPPD_SIM_CONNECT_DELAY  seconds "connecting" takes (0.05); "inf" never connects,
                                 like a proxy that accepts and stays silent (stop() still works)
    WHATSAPPD_SIM_FAIL_CONNECT_FILE  a path ("{company}" is replaced by the company id): while
                                 that file exists every connect attempt fails (TRANSIENT). It is
                                 checked at each attempt, so a test can let a company fail a few
                                 times, remove the file, and watch it connect.
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import math
import os
import re
import secrets
import signal
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from whatsappd.protocol import ExitCode
from whatsappd.worker.engine import Emit, Engine, EngineError, EngineOptions

__all__ = [
    "CRASH_EXIT_STATUS",
    "PAIRING_CODE_ALPHABET",
    "SESSION_FILE",
    "SimulatorConfig",
    "SimulatorEngine",
    "has_session",
]

log = logging.getLogger(__name__)

#: The simulator's whole "store": the fake device, inside the company's session directory.
SESSION_FILE = "simulator.json"
_STORE_FORMAT = "whatsappd-simulator"
_STORE_VERSION = 1

#: whatsmeow's linking-code base32 alphabet (no 0, O, I, U).
PAIRING_CODE_ALPHABET = "123456789ABCDEFGHJKLMNPQRSTVWXYZ"

#: Exit status of `simulate crash` (EX_SOFTWARE): not an ExitCode, so the supervisor sees a crash.
CRASH_EXIT_STATUS = 70

_PHONE = re.compile(r"[1-9][0-9]{6,14}")  # E.164 digits, no "+", no leading zero
_DEFAULT_PUSH_NAME = "Simulator"


def has_session(session_dir: Path) -> bool:
    """True if session_dir holds a simulator store with a paired device (never raises)."""
    try:
        return _read_store(session_dir / SESSION_FILE) is not None
    except (OSError, ValueError):
        return False


# --------------------------------------------------------------------------- configuration


@dataclass(frozen=True)
class SimulatorConfig:
    """Timings and fault injection, from WHATSAPPD_SIM_* environment variables."""

    qr_first: float = 60.0
    qr_next: float = 20.0
    qr_count: int = 6
    connect_delay: float = 0.05
    fail_connect_file: str | None = None

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> SimulatorConfig:
        """Parse the environment; raise ValueError naming the bad variable."""
        default = cls()
        fail_file = env.get("WHATSAPPD_SIM_FAIL_CONNECT_FILE") or None
        return cls(
            qr_first=_env_seconds(env, "WHATSAPPD_SIM_QR_FIRST", default.qr_first, allow_inf=False),
            qr_next=_env_seconds(env, "WHATSAPPD_SIM_QR_NEXT", default.qr_next, allow_inf=False),
            qr_count=_env_count(env, "WHATSAPPD_SIM_QR_COUNT", default.qr_count),
            connect_delay=_env_seconds(
                env, "WHATSAPPD_SIM_CONNECT_DELAY", default.connect_delay, allow_inf=True
            ),
            fail_connect_file=fail_file,
        )

    @property
    def pairing_window(self) -> float:
        """Seconds from the first QR code to the pairing timeout (160 with the defaults)."""
        return self.qr_first + self.qr_next * (self.qr_count - 1)


def _env_seconds(env: Mapping[str, str], name: str, default: float, *, allow_inf: bool) -> float:
    raw = env.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"{name}={raw!r} is not a number of seconds") from None
    if math.isnan(value) or value < 0 or (math.isinf(value) and not allow_inf):
        raise ValueError(f"{name}={raw!r} must be a finite number of seconds >= 0")
    return value


def _env_count(env: Mapping[str, str], name: str, default: int) -> int:
    raw = env.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"{name}={raw!r} is not a whole number") from None
    if value < 1:
        raise ValueError(f"{name}={raw!r} must be at least 1")
    return value


# --------------------------------------------------------------------------- the store


@dataclass(frozen=True)
class _Device:
    jid: str
    push_name: str


def _read_store(path: Path) -> _Device | None:
    """The stored device, None if there is no store or no device; ValueError if corrupt."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path} is not valid JSON: {exc}") from None
    if (
        not isinstance(data, dict)
        or data.get("format") != _STORE_FORMAT
        or data.get("version") != _STORE_VERSION
    ):
        raise ValueError(f"{path} is not a version {_STORE_VERSION} simulator store")
    device = data.get("device")
    if device is None:
        return None
    if (
        not isinstance(device, dict)
        or not isinstance(device.get("jid"), str)
        or not isinstance(device.get("push_name"), str)
    ):
        raise ValueError(f"{path} holds a malformed device")
    return _Device(jid=device["jid"], push_name=device["push_name"])


def _write_store(path: Path, device: _Device | None) -> None:
    """Replace the store atomically (temp file, fsync, rename, fsync dir); the file is 0600."""
    data: dict[str, Any] = {"format": _STORE_FORMAT, "version": _STORE_VERSION, "device": None}
    if device is not None:
        data["device"] = {"jid": device.jid, "push_name": device.push_name, "paired_at": _iso(_now())}
    body = json.dumps(data, indent=2, ensure_ascii=False).encode() + b"\n"
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)  # 0600
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), 0o600)
            f.write(body)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


# --------------------------------------------------------------------------- small helpers


def _now() -> datetime:
    return datetime.now(UTC)


def _iso(moment: datetime) -> str:
    """ISO-8601 UTC with milliseconds and a Z, e.g. 2025-01-31T12:00:00.000Z."""
    return moment.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _b64(nbytes: int) -> str:
    return base64.b64encode(secrets.token_bytes(nbytes)).decode("ascii")


def _pairing_code() -> str:
    chars = "".join(secrets.choice(PAIRING_CODE_ALPHABET) for _ in range(8))
    return f"{chars[:4]}-{chars[4:]}"


def _fake_jid(phone: str | None) -> str:
    number = phone or "5511" + "".join(secrets.choice("0123456789") for _ in range(9))
    return f"{number}:{secrets.randbelow(90) + 10}@s.whatsapp.net"


def _optional_str(args: dict[str, Any], key: str, *, max_len: int = 256) -> str | None:
    value = args.get(key)
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip() or len(value) > max_len:
        raise EngineError("invalid_argument", f"'{key}' must be a non-empty string of at most {max_len} characters")
    return value


def _optional_seconds(args: dict[str, Any], key: str, default: float) -> float:
    value = args.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
        raise EngineError("invalid_argument", f"'{key}' must be a number of seconds >= 0")
    return float(value)


# --------------------------------------------------------------------------- the engine

# Phases (the engine's own; the supervisor sees the `state` messages).
_STARTING = "starting"
_CONNECTING = "connecting"
_PAIRING = "pairing"
_CONNECTED = "connected"
_RECONNECTING = "reconnecting"
_DONE = "done"


class SimulatorEngine(Engine):
    """A fake WhatsApp client: same messages and exit codes as the real engine, no network.

    Thread model: run() in the main thread; command() and stop() from another. All state is
    guarded by one Condition. Commands that change the state emit their messages themselves,
    while holding it, so by the time command() returns (and the worker main sends the reply)
    those messages are already out and in order. Timed transitions (connect delay, QR
    rotation, pairing timeout) are carried out by run(), which sleeps on the Condition.
    """

    name = "simulator"

    def __init__(self, options: EngineOptions, emit: Emit, env: Mapping[str, str] | None = None) -> None:
        super().__init__(options, emit)
        self._cond = threading.Condition()
        self._config_error: str | None = None
        try:
            self.config = SimulatorConfig.from_env(os.environ if env is None else env)
        except ValueError as exc:
            self._config_error = str(exc)
            self.config = SimulatorConfig()
        self._store_path = options.session_dir / SESSION_FILE
        self._phase = _STARTING
        self._exit: ExitCode | None = None
        self._device: _Device | None = None
        self._connect_due: float | None = None  # monotonic; None = never (stalled)
        self._fail_next_connect = False
        # pairing
        self._qr_keys = ""  # noise, identity, adv secret: fixed for one pairing, like whatsmeow
        self._qr_emitted = 0
        self._qr_due = 0.0  # monotonic expiry of the current code
        self._pairing_deadline: datetime | None = None
        self._pair_phone: str | None = None

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
            device = _read_store(self._store_path)
        except (OSError, ValueError) as exc:
            log.error("simulator: session store unusable: %s", exc)
            with self._cond:
                self._finish(ExitCode.STORE_UNUSABLE)
                return self._exit_code()
        with self._cond:
            if self._exit is not None:
                return self._exit_code()
            self._device = device
            self._start_connecting()
            while self._exit is None:
                self._run_due_timers()
                if self._exit is None:
                    self._cond.wait(self._time_to_next_timer())
            return self._exit_code()

    def command(self, op: str, args: dict[str, Any]) -> dict[str, Any]:
        handler = self._OPS.get(op)
        if handler is None:
            raise EngineError("unknown_op", f"the simulator engine has no command {op!r}")
        if not isinstance(args, dict):
            raise EngineError("invalid_argument", "command arguments must be a JSON object")
        return handler(self, args)

    def stop(self) -> None:
        with self._cond:
            self._finish(ExitCode.STOPPED)

    # ----------------------------------------------------------------- commands

    def _cmd_simulate(self, args: dict[str, Any]) -> dict[str, Any]:
        action = args.get("action")
        if not isinstance(action, str):
            raise EngineError("invalid_argument", "'action' must be a string")
        handler = self._ACTIONS.get(action)
        if handler is None:
            raise EngineError(
                "unknown_action",
                f"unknown simulate action {action!r}; known: {', '.join(sorted(self._ACTIONS))}",
            )
        # crash and hang act on the whole process, outside the lock (a lock held by a
        # stopped process would not matter, but a crash needs no state at all).
        if action in ("crash", "hang"):
            return handler(self, args)
        with self._cond:
            if self._phase == _DONE:
                raise EngineError("not_running", "the engine has already ended")
            try:
                return handler(self, args)
            finally:
                self._cond.notify_all()  # run() recomputes its next timer from the new phase

    def _cmd_pair_phone(self, args: dict[str, Any]) -> dict[str, Any]:
        phone = args.get("phone")
        if not isinstance(phone, str) or _PHONE.fullmatch(phone) is None:
            raise EngineError(
                "invalid_phone",
                "the phone number must be digits only in international format, "
                "country code first, no '+' and no leading zero (e.g. 5511999999999)",
            )
        with self._cond:
            if self._phase != _PAIRING:
                raise EngineError("not_pairing", "a pairing code can only be requested while pairing")
            self._pair_phone = phone
            assert self._pairing_deadline is not None
            return {"code": _pairing_code(), "expires_at": _iso(self._pairing_deadline)}

    def _cmd_logout(self, args: dict[str, Any]) -> dict[str, Any]:
        with self._cond:
            if self._phase != _CONNECTED:
                raise EngineError("not_connected", "logging out needs a live connection")
            self._forget_device()
            self._finish(ExitCode.LOGGED_OUT)
            return {"unlinked": True}

    # Issue 4 hook: a "send" op goes here (and an `incoming` simulate action that emits
    # {"type": "event", ...}); both need the connected phase and the device JID held above.
    _OPS: dict[str, Callable[[SimulatorEngine, dict[str, Any]], dict[str, Any]]] = {
        "simulate": _cmd_simulate,
        "pair_phone": _cmd_pair_phone,
        "logout": _cmd_logout,
    }

    # ----------------------------------------------------------------- simulate actions
    # Called with the lock held (except crash and hang); the engine is not done.

    def _act_scan(self, args: dict[str, Any]) -> dict[str, Any]:
        if self._phase != _PAIRING:
            raise EngineError("not_pairing", "there is no QR code to scan: the engine is not pairing")
        jid = _optional_str(args, "jid") or _fake_jid(self._pair_phone)
        push_name = _optional_str(args, "push_name", max_len=64) or _DEFAULT_PUSH_NAME
        reconnect = args.get("connect", True)
        if not isinstance(reconnect, bool):
            raise EngineError("invalid_argument", "'connect' must be true or false")
        device = _Device(jid=jid, push_name=push_name)
        try:
            _write_store(self._store_path, device)
        except OSError as exc:
            raise EngineError("store_failed", f"could not save the session: {exc}") from None
        self._device = device
        self.emit({"type": "paired", "jid": jid})
        # The server forces one reconnect after pairing (515). connect=false simulates the
        # library failing to come back: "connecting" then stays until the supervisor acts.
        self._start_connecting(stall=not reconnect)
        return {"action": "scan", "jid": jid, "push_name": push_name}

    def _act_drop(self, args: dict[str, Any]) -> dict[str, Any]:
        if self._phase != _CONNECTED:
            raise EngineError("not_connected", "only a connected engine can drop its connection")
        reason = _optional_str(args, "reason") or "simulated connection drop"
        self._phase = _RECONNECTING
        self.emit({"type": "state", "state": "reconnecting", "reason": reason})
        return {"action": "drop", "state": "reconnecting"}

    def _act_restore(self, args: dict[str, Any]) -> dict[str, Any]:
        if self._phase != _RECONNECTING:
            raise EngineError("not_reconnecting", "only a dropped connection can be restored")
        self._enter_connected()
        return {"action": "restore", "state": "connected"}

    def _act_logged_out(self, args: dict[str, Any]) -> dict[str, Any]:
        self._forget_device()
        return self._end("logged_out", ExitCode.LOGGED_OUT)

    def _act_replaced(self, args: dict[str, Any]) -> dict[str, Any]:
        return self._end("replaced", ExitCode.REPLACED)

    def _act_ban(self, args: dict[str, Any]) -> dict[str, Any]:
        seconds = _optional_seconds(args, "seconds", 3600.0)
        reason = _optional_str(args, "reason") or "temporary ban (simulated)"
        until = _iso(_now() + timedelta(seconds=seconds))
        self.emit({"type": "state", "state": "banned", "reason": reason, "until": until})
        result = self._end("ban", ExitCode.BANNED)
        result["until"] = until
        return result

    def _act_outdated(self, args: dict[str, Any]) -> dict[str, Any]:
        return self._end("outdated", ExitCode.OUTDATED)

    def _act_fail_connect(self, args: dict[str, Any]) -> dict[str, Any]:
        if self._phase == _STARTING:  # run() has not begun: its first connect attempt fails
            self._fail_next_connect = True
            return {"action": "fail_connect", "exit_code": int(ExitCode.TRANSIENT)}
        # connecting: this attempt fails; pairing, connected, reconnecting: the connection is
        # lost for good. Either way the supervisor retries with backoff in a fresh process.
        return self._end("fail_connect", ExitCode.TRANSIENT)

    def _act_crash(self, args: dict[str, Any]) -> dict[str, Any]:
        """The process dies at once (status 70), no reply; `after` seconds delays it."""
        after = _optional_seconds(args, "after", 0.0)
        if after == 0:
            os._exit(CRASH_EXIT_STATUS)
        _daemon_timer(after, lambda: os._exit(CRASH_EXIT_STATUS))
        return {"action": "crash", "after": after}

    def _act_hang(self, args: dict[str, Any]) -> dict[str, Any]:
        """The whole process stops (SIGSTOP): no heartbeat, no replies, until SIGKILL/SIGCONT.

        The worker main heart-beats from its own thread, so blocking an engine thread would
        not look hung; stopping the process does, like a wedged Go runtime would.
        """
        after = _optional_seconds(args, "after", 0.0)
        if after == 0:
            os.kill(os.getpid(), signal.SIGSTOP)
            return {"action": "hang", "after": 0.0}  # reached only after a SIGCONT
        _daemon_timer(after, lambda: os.kill(os.getpid(), signal.SIGSTOP))
        return {"action": "hang", "after": after}

    _ACTIONS: dict[str, Callable[[SimulatorEngine, dict[str, Any]], dict[str, Any]]] = {
        "scan": _act_scan,
        "drop": _act_drop,
        "restore": _act_restore,
        "logged_out": _act_logged_out,
        "replaced": _act_replaced,
        "ban": _act_ban,
        "outdated": _act_outdated,
        "fail_connect": _act_fail_connect,
        "crash": _act_crash,
        "hang": _act_hang,
    }

    # ----------------------------------------------------------------- transitions (lock held)

    def _finish(self, code: ExitCode) -> None:
        """Decide run()'s result (the first decision wins) and wake run()."""
        if self._exit is None:
            self._exit = code
            self._phase = _DONE
        self._cond.notify_all()

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
            if self._store_path.exists():
                _write_store(self._store_path, None)
        except OSError as exc:  # the supervisor wipes the directory anyway
            log.warning("simulator: could not clear the device from the store: %s", exc)

    def _start_connecting(self, *, stall: bool = False) -> None:
        self._phase = _CONNECTING
        self.emit({"type": "state", "state": "connecting"})
        delay = self.config.connect_delay
        self._connect_due = None if stall or math.isinf(delay) else time.monotonic() + delay

    def _enter_connected(self) -> None:
        assert self._device is not None
        self._phase = _CONNECTED
        self.emit(
            {
                "type": "state",
                "state": "connected",
                "jid": self._device.jid,
                "push_name": self._device.push_name,
            }
        )

    def _enter_pairing(self) -> None:
        self._phase = _PAIRING
        self._qr_keys = ",".join((_b64(32), _b64(32), _b64(32)))
        self._qr_emitted = 0
        self._pair_phone = None
        self._pairing_deadline = _now() + timedelta(seconds=self.config.pairing_window)
        self.emit({"type": "state", "state": "pairing"})
        self._emit_next_qr()

    def _emit_next_qr(self) -> None:
        lifetime = self.config.qr_first if self._qr_emitted == 0 else self.config.qr_next
        self._qr_emitted += 1
        self._qr_due = time.monotonic() + lifetime
        code = f"2@{_b64(72)},{self._qr_keys}"
        self.emit({"type": "qr", "code": code, "expires_at": _iso(_now() + timedelta(seconds=lifetime))})

    def _fail_file_exists(self) -> bool:
        pattern = self.config.fail_connect_file
        if pattern is None:
            return False
        return Path(pattern.replace("{company}", self.options.company)).exists()

    def _run_due_timers(self) -> None:
        now = time.monotonic()
        if self._phase == _CONNECTING and self._connect_due is not None and now >= self._connect_due:
            self._connect_due = None
            if self._fail_next_connect or self._fail_file_exists():
                log.warning("simulator: connect failed (simulated)")
                self._finish(ExitCode.TRANSIENT)
            elif self._device is not None:
                self._enter_connected()
            else:
                self._enter_pairing()
        elif self._phase == _PAIRING and now >= self._qr_due:
            if self._qr_emitted < self.config.qr_count:
                self._emit_next_qr()
            else:
                log.info("simulator: pairing timed out, nobody scanned the QR code")
                self._finish(ExitCode.PAIRING_TIMEOUT)

    def _time_to_next_timer(self) -> float | None:
        """Seconds until the next timed transition; None to wait for a command or stop()."""
        if self._phase == _CONNECTING and self._connect_due is not None:
            due = self._connect_due
        elif self._phase == _PAIRING:
            due = self._qr_due
        else:
            return None
        return min(max(due - time.monotonic(), 0.0), threading.TIMEOUT_MAX)


def _daemon_timer(seconds: float, action: Callable[[], None]) -> None:
    timer = threading.Timer(seconds, action)
    timer.daemon = True
    timer.start()
