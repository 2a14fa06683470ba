"""The neonize engine: its decisions on real neonize event objects, and the real client against
a local fault-injecting SOCKS5 listener.

No test creates a neonize client in the pytest process (one client per process: two crash Go);
the ones that need a real client run it in a subprocess through a 127.0.0.1 proxy, and kill it
by pid. Nothing leaves the machine.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from whatsappd.protocol import ExitCode
from whatsappd.testing.socks5 import ClosedPort, Socks5FaultProxy
from whatsappd.worker.engine import EngineError, EngineOptions
from whatsappd.worker.neonize.classify import connect_failure_exit, is_store_error
from whatsappd.worker.neonize.engine import NeonizeEngine
from whatsappd.worker.neonize.store import STORE_FILES, StoreUnusable, inspect_store, store_dsn

from neonize.events import (  # isort: skip  (imported by the engine above, side effects undone)
    ClientOutdatedEv,
    ConnectedEv,
    ConnectFailureEv,
    DisconnectedEv,
    KeepAliveRestoredEv,
    KeepAliveTimeoutEv,
    LoggedOutEv,
    PairStatusEv,
    StreamReplacedEv,
    TemporaryBanEv,
)
from neonize.proto.Neonize_pb2 import JID, ConnectFailureReason, Device  # isort: skip

pytestmark = pytest.mark.neonize

REPO = Path(__file__).resolve().parents[1]
NOW = 1_767_225_600.0  # 2026-01-01T00:00:00Z
ME = JID(User="5511999999999", Device=12, Server="s.whatsapp.net")


class FakeClient:
    """What the handlers use of a neonize client: get_me(), .me and stop()."""

    def __init__(self, push_name: str = "Imobiliaria Acme") -> None:
        self.me = Device(JID=ME, PushName=push_name)
        self.stopped = 0
        self.stop_called = threading.Event()

    def get_me(self) -> Device:
        return self.me

    def stop(self) -> None:
        self.stopped += 1
        self.stop_called.set()


class Harness:
    def __init__(self, tmp_path: Path, pair: bool = True) -> None:
        self.messages: list[dict[str, Any]] = []
        options = EngineOptions(company="acme", session_dir=tmp_path, proxy=None, pair=pair)
        self.engine = NeonizeEngine(options, self.messages.append, clock=lambda: NOW)
        self.client = FakeClient()

    def states(self) -> list[dict[str, Any]]:
        return [m for m in self.messages if m["type"] == "state"]

    def connect(self) -> None:
        self.engine.on_connected(self.client, ConnectedEv(status=True))


@pytest.fixture
def h(tmp_path: Path) -> Harness:
    return Harness(tmp_path)


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


# --------------------------------------------------------------------------- terminal events


def test_logged_out(h: Harness) -> None:
    """LoggedOut after connecting exits LOGGED_OUT, told by the exit code alone (no state message)."""
    h.connect()
    h.engine.on_logged_out(h.client, LoggedOutEv())
    assert h.engine.exit_code is ExitCode.LOGGED_OUT
    assert h.engine.reason == "logged_out"
    assert [m["state"] for m in h.states()] == ["connected"]  # told by the exit code alone


def test_logged_out_on_connect_keeps_its_reason(h: Harness) -> None:
    """A LoggedOut on connect keeps WhatsApp's reason (main_device_gone) as the exit reason."""
    ev = LoggedOutEv(OnConnect=True, Reason=ConnectFailureReason.Value("MAIN_DEVICE_GONE"))
    h.engine.on_logged_out(h.client, ev)
    assert h.engine.exit_code is ExitCode.LOGGED_OUT
    assert h.engine.reason == "main_device_gone"


def test_stream_replaced(h: Harness) -> None:
    """StreamReplaced exits REPLACED without a state message."""
    h.connect()
    h.engine.on_stream_replaced(h.client, StreamReplacedEv())
    assert h.engine.exit_code is ExitCode.REPLACED
    assert [m["state"] for m in h.states()] == ["connected"]


def test_temporary_ban_reports_its_expiry(h: Harness) -> None:
    """A temporary ban emits state banned with its reason and until (now + Expire seconds), then exits BANNED."""
    ev = TemporaryBanEv(Code=TemporaryBanEv.SEND_TO_TOO_MANY_PEOPLE, Expire=3600)
    h.engine.on_temporary_ban(h.client, ev)
    assert h.engine.exit_code is ExitCode.BANNED
    assert h.messages[-1] == {
        "type": "state",
        "state": "banned",
        "reason": "send_to_too_many_people",
        "until": "2026-01-01T01:00:00Z",
    }


def test_temporary_ban_without_expiry(h: Harness) -> None:
    """A ban without Expire still exits BANNED, with until null and a default reason."""
    h.engine.on_temporary_ban(h.client, TemporaryBanEv())
    assert h.engine.exit_code is ExitCode.BANNED
    assert h.messages[-1]["until"] is None
    assert h.messages[-1]["reason"] == "temporary_ban"


def test_client_outdated(h: Harness) -> None:
    """ClientOutdated exits OUTDATED and emits nothing."""
    h.engine.on_client_outdated(h.client, ClientOutdatedEv())
    assert h.engine.exit_code is ExitCode.OUTDATED
    assert h.messages == []


@pytest.mark.parametrize(
    ("reason", "expected"),
    [
        ("LOGGED_OUT", ExitCode.LOGGED_OUT),
        ("MAIN_DEVICE_GONE", ExitCode.LOGGED_OUT),
        ("UNKNOWN_LOGOUT", ExitCode.LOGGED_OUT),
        ("TEMP_BANNED", ExitCode.BANNED),
        ("CLIENT_OUTDATED", ExitCode.OUTDATED),
        ("GENERIC", ExitCode.TRANSIENT),
        ("BAD_USER_AGENT", ExitCode.TRANSIENT),
        ("INTERNAL_SERVER_ERROR", ExitCode.TRANSIENT),
        ("EXPERIMENTAL", ExitCode.TRANSIENT),
        ("SERVICE_UNAVAILABLE", ExitCode.TRANSIENT),
        (None, ExitCode.TRANSIENT),  # a whatsmeow reason neonize has no name for arrives unset
    ],
)
def test_connect_failure_reasons(h: Harness, reason: str | None, expected: ExitCode) -> None:
    """Each ConnectFailure reason maps to its exit code (logged out, banned, outdated, else transient)."""
    ev = ConnectFailureEv(Message="x") if reason is None else ConnectFailureEv(Reason=ConnectFailureReason.Value(reason))
    h.engine.on_connect_failure(h.client, ev)
    assert h.engine.exit_code is expected
    assert connect_failure_exit(ev.Reason if ev.HasField("Reason") else None) is expected
    if expected is ExitCode.BANNED:
        assert h.messages == [{"type": "state", "state": "banned", "reason": "temp_banned", "until": None}]
    else:
        assert h.messages == []  # the supervisor owns the states that follow an exit
    if expected is ExitCode.TRANSIENT:
        assert h.engine.reason.startswith("connect_failure_")


def test_first_decision_wins_but_a_server_verdict_beats_stop(h: Harness) -> None:
    """The first exit decision wins, except that a session-fatal server verdict overrides stop or a transient end."""
    h.engine.stop()
    assert h.engine.exit_code is ExitCode.STOPPED
    h.engine.on_logged_out(h.client, LoggedOutEv())
    assert h.engine.exit_code is ExitCode.LOGGED_OUT  # the session must still be wiped
    h.engine.on_stream_replaced(h.client, StreamReplacedEv())
    assert h.engine.exit_code is ExitCode.LOGGED_OUT
    h.engine.on_connected(h.client, ConnectedEv(status=True))
    assert h.messages == []  # nothing after the end


# --------------------------------------------------------------------------- connection life


def test_connected_reports_jid_and_push_name(h: Harness) -> None:
    """Connected emits state connected with the device's JID and push name."""
    h.connect()
    assert h.messages == [
        {"type": "state", "state": "connected", "jid": "5511999999999:12@s.whatsapp.net", "push_name": "Imobiliaria Acme"}
    ]
    assert h.engine.exit_code is None


def test_connected_falls_back_on_the_cached_device(h: Harness) -> None:
    """When get_me fails, connected reports the device neonize cached."""
    class NoGo(FakeClient):
        def get_me(self) -> Device:
            raise RuntimeError("no Go today")

    h.engine.on_connected(NoGo(), ConnectedEv(status=True))
    assert h.messages[-1]["jid"] == "5511999999999:12@s.whatsapp.net"


def test_disconnect_after_connected_means_reconnecting_then_connected_again(h: Harness) -> None:
    """A drop after connecting is reported once as reconnecting, and Connected brings back connected."""
    h.engine.on_disconnected(h.client, DisconnectedEv(status=True))
    assert h.messages == []  # not connected yet: still "connecting"
    h.connect()
    h.engine.on_disconnected(h.client, DisconnectedEv(status=True))
    h.engine.on_disconnected(h.client, DisconnectedEv(status=True))  # reported once
    h.connect()
    assert [(m["state"], m.get("reason")) for m in h.states()] == [
        ("connected", None),
        ("reconnecting", "disconnected"),
        ("connected", None),
    ]
    assert h.engine.exit_code is None


def test_keepalive_timeout_and_restored(h: Harness) -> None:
    """Keepalive timeouts report reconnecting once; a restored keepalive reports connected again."""
    h.connect()
    h.engine.on_keepalive_timeout(h.client, KeepAliveTimeoutEv(ErrorCount=1, LastSuccess=int(NOW) - 30))
    h.engine.on_keepalive_timeout(h.client, KeepAliveTimeoutEv(ErrorCount=2, LastSuccess=int(NOW) - 30))
    h.engine.on_keepalive_restored(h.client, KeepAliveRestoredEv())
    assert [(m["state"], m.get("reason")) for m in h.states()] == [
        ("connected", None),
        ("reconnecting", "keepalive_timeout"),
        ("connected", None),
    ]
    assert h.states()[-1]["jid"] == "5511999999999:12@s.whatsapp.net"
    assert h.engine.exit_code is None


def test_qr_codes_then_pair_success_then_connected(h: Harness) -> None:
    """QR codes give pairing and qr messages with their expiries, then paired, then connected."""
    h.engine.on_qr(h.client, b"2@first,code")
    h.engine.on_qr(h.client, b"2@second,code")
    assert h.messages == [
        {"type": "state", "state": "pairing"},
        {"type": "qr", "code": "2@first,code", "expires_at": _iso(NOW + 60)},
        {"type": "qr", "code": "2@second,code", "expires_at": _iso(NOW + 20)},
    ]
    assert h.engine.phase == "pairing"
    h.engine.on_login_status("success")
    h.engine.on_pair_status(h.client, PairStatusEv(ID=ME, Status=PairStatusEv.SUCCESS, Platform="android"))
    assert h.messages[-1] == {"type": "paired", "jid": "5511999999999:12@s.whatsapp.net"}
    assert h.engine.phase == "paired"
    h.connect()
    assert h.messages[-1]["state"] == "connected"
    assert h.engine.exit_code is None


def test_pair_error_is_transient(h: Harness) -> None:
    """A failed pairing exits TRANSIENT and reports no paired."""
    h.engine.on_pair_status(h.client, PairStatusEv(Status=PairStatusEv.ERROR, Error="bad signature"))
    assert h.engine.exit_code is ExitCode.TRANSIENT
    assert not any(m["type"] == "paired" for m in h.messages)


def test_qr_timeout_after_the_window_is_a_pairing_timeout(h: Harness, monkeypatch: pytest.MonkeyPatch) -> None:
    """A QR-loop timeout after the whole window exits PAIRING_TIMEOUT."""
    h.engine.on_qr(h.client, b"code")
    start = time.monotonic()
    monkeypatch.setattr("whatsappd.worker.neonize.engine.time.monotonic", lambda: start + 161)
    h.engine.on_login_status("timeout")
    assert h.engine.exit_code is ExitCode.PAIRING_TIMEOUT


def test_early_qr_timeout_is_a_dropped_socket(h: Harness) -> None:
    """A QR-loop timeout before the window ran out is a dropped socket: TRANSIENT."""
    h.engine.on_qr(h.client, b"code")
    h.engine.on_login_status("timeout")  # whatsmeow says "timeout" for a server disconnect too
    assert h.engine.exit_code is ExitCode.TRANSIENT


def test_outdated_while_pairing(h: Harness) -> None:
    """err-client-outdated from the QR loop exits OUTDATED."""
    h.engine.on_login_status("err-client-outdated")
    assert h.engine.exit_code is ExitCode.OUTDATED


# --------------------------------------------------------------------------- commands


def test_unknown_op(h: Harness) -> None:
    """An op the engine does not offer is refused with unknown_op."""
    with pytest.raises(EngineError) as err:
        h.engine.command("reboot", {})
    assert err.value.code == "unknown_op"


def test_pair_phone_needs_a_qr_on_screen(h: Harness) -> None:
    """pair_phone outside pairing is refused with not_pairing."""
    with pytest.raises(EngineError) as err:
        h.engine.command("pair_phone", {"phone": "5511999999999"})
    assert err.value.code == "not_pairing"


@pytest.mark.parametrize("phone", ["+5511999999999", "05511999999", "55 11 99999", "123", None, 5511999999999])
def test_pair_phone_wants_digits_only(h: Harness, phone: object) -> None:
    """pair_phone with anything but international digits is refused with invalid_phone."""
    with pytest.raises(EngineError) as err:
        h.engine.command("pair_phone", {"phone": phone})
    assert err.value.code == "invalid_phone"


def test_logout_needs_a_connection(h: Harness) -> None:
    """logout without a connection is refused with not_connected."""
    with pytest.raises(EngineError) as err:
        h.engine.command("logout", {})
    assert err.value.code == "not_connected"


def test_disconnect_stops(h: Harness) -> None:
    """The disconnect command stops the engine: it exits STOPPED."""
    assert h.engine.command("disconnect", {}) == {"disconnected": True}
    assert h.engine.exit_code is ExitCode.STOPPED


# --------------------------------------------------------------------------- run() without Go


def _run_with_fake_client(h: Harness, feed: Any) -> int:
    """run() with the Go client replaced: `feed(engine, client)` plays the events, then the fake
    connect() blocks, as neonize's does, until the client is stopped."""

    def connect(client: FakeClient) -> None:
        feed(h.engine, client)
        client.stop_called.wait(5)

    h.engine._make_client = lambda: h.client  # type: ignore[method-assign]
    h.engine._connect = connect  # type: ignore[method-assign]
    return h.engine.run()


def test_run_returns_the_code_a_handler_decided(h: Harness) -> None:
    """run() returns promptly with the exit code an event handler decided."""
    def feed(engine: NeonizeEngine, client: FakeClient) -> None:
        engine.on_connected(client, ConnectedEv(status=True))
        engine.on_temporary_ban(client, TemporaryBanEv(Code=TemporaryBanEv.BLOCKED_BY_USERS, Expire=60))

    started = time.monotonic()
    assert _run_with_fake_client(h, feed) == ExitCode.BANNED
    assert time.monotonic() - started < 2
    assert [m["state"] for m in h.states()] == ["connecting", "connected", "banned"]
    assert h.client.stopped == 1  # the Go client is stopped once the socket was up


def test_run_returns_stopped_when_stopped(h: Harness) -> None:
    """run() returns STOPPED after stop()."""
    def feed(engine: NeonizeEngine, client: FakeClient) -> None:
        engine.on_connected(client, ConnectedEv(status=True))
        engine.stop()

    assert _run_with_fake_client(h, feed) == ExitCode.STOPPED


def test_paired_but_never_connected_restarts_the_worker(h: Harness, monkeypatch: pytest.MonkeyPatch) -> None:
    """After pairing the server forces one reconnect; if no Connected follows, exit TRANSIENT."""
    monkeypatch.setattr("whatsappd.worker.neonize.pairing.CONNECTED_AFTER_PAIR_SECONDS", 0.3)

    def feed(engine: NeonizeEngine, client: FakeClient) -> None:
        engine.on_qr(client, b"code")
        engine.on_login_status("success")
        engine.on_pair_status(client, PairStatusEv(ID=ME, Status=PairStatusEv.SUCCESS))

    assert _run_with_fake_client(h, feed) == ExitCode.TRANSIENT
    assert h.engine.reason == "no_connection_after_pairing"
    assert [m["type"] for m in h.messages] == ["state", "state", "qr", "paired"]


def test_optional_connect_timeout(tmp_path: Path) -> None:
    """With connect_timeout, a dial that never ends exits TRANSIENT (connect_timeout) in time."""
    messages: list[dict[str, Any]] = []
    options = EngineOptions(company="acme", session_dir=tmp_path, proxy=None, pair=True)
    engine = NeonizeEngine(options, messages.append, connect_timeout=0.3)
    client = FakeClient()
    engine._make_client = lambda: client  # type: ignore[method-assign]
    engine._connect = lambda c: c.stop_called.wait(5)  # type: ignore[method-assign]  # a dial that hangs
    started = time.monotonic()
    assert engine.run() == ExitCode.TRANSIENT
    assert time.monotonic() - started < 2
    assert engine.reason == "connect_timeout"
    assert client.stopped == 0  # nothing came from the server: Go's Stop() would block on the dial
    client.stop_called.set()


def test_stop_before_run(h: Harness) -> None:
    """stop() before run() makes run() return STOPPED at once."""
    h.engine.stop()
    assert h.engine.run() == ExitCode.STOPPED


def test_unreadable_store_is_unusable(tmp_path: Path) -> None:
    """A store.db that is not a database exits STORE_UNUSABLE before any dial."""
    (tmp_path / "store.db").write_bytes(b"this is not a database" * 300)
    h = Harness(tmp_path, pair=False)
    assert h.engine.run() == ExitCode.STORE_UNUSABLE


# --------------------------------------------------------------------------- store helpers


def test_store_dsn_is_wal_and_percent_encoded() -> None:
    """The store DSN asks for WAL and a busy timeout, with the path percent-encoded."""
    dsn = store_dsn(Path("/var/lib/whatsappd/sessions/session-acme"))
    assert dsn == (
        "/var/lib/whatsappd/sessions/session-acme/store.db"
        "?_journal_mode=WAL&_busy_timeout=10000&_foreign_keys=on&_pad="
    )
    assert store_dsn(Path("/tmp/a b%/s")).startswith("/tmp/a%20b%25/s/store.db?")
    assert STORE_FILES == ("store.db", "store.db-wal", "store.db-shm")


def test_inspect_store(tmp_path: Path) -> None:
    """inspect_store counts device rows: None without a file (never made), 0 without the table; garbage: StoreUnusable."""
    store = tmp_path / "store.db"
    assert inspect_store(store) is None
    assert not store.exists()
    with sqlite3.connect(store) as db:
        db.execute("CREATE TABLE t (x)")
    assert inspect_store(store) == 0
    with sqlite3.connect(store) as db:
        db.execute("CREATE TABLE whatsmeow_device (jid TEXT)")
        db.execute("INSERT INTO whatsmeow_device VALUES ('5511999999999:12@s.whatsapp.net')")
    db.close()
    assert inspect_store(store) == 1
    store.write_bytes(b"garbage" * 1000)
    with pytest.raises(StoreUnusable):
        inspect_store(store)


@pytest.mark.parametrize(
    ("message", "expected"),
    [  # as neonize 0.5.2 words them (docs/neonize-notes.md)
        ("failed to upgrade database: failed to check if foreign keys are enabled: file is not a database", True),
        ("failed to upgrade database: failed to check if foreign keys are enabled: "
         "unable to open database file: is a directory", True),
        ('failed to dial whatsapp web websocket: failed to WebSocket dial: failed to send handshake request: '
         'Get "https://web.whatsapp.com/ws/chat": socks connect tcp 127.0.0.1:1->web.whatsapp.com:443: '
         "unknown error connection refused", False),
        ('failed to dial whatsapp web websocket: failed to WebSocket dial: failed to send handshake request: '
         'Get "https://example.com/ws/chat": EOF', False),
    ],
)
def test_store_errors_are_told_from_network_errors(message: str, expected: bool) -> None:
    """is_store_error tells store failures from dial failures in a connect error's text."""
    assert is_store_error(message) is expected


# --------------------------------------------------------------------------- the real client


CHILD = textwrap.dedent(
    """
    import json, os, signal, sys, time
    from pathlib import Path
    from whatsappd.worker.engine import EngineOptions
    from whatsappd.worker.neonize.engine import NeonizeEngine

    session, proxy, pair = Path(sys.argv[1]), sys.argv[2], sys.argv[3] == "pair"

    def emit(message):
        sys.stdout.write("MSG " + json.dumps(message) + "\\n")
        sys.stdout.flush()

    from whatsappd.worker.gate import ConnectGate
    gate = ConnectGate.unlimited()
    if "gated" in sys.argv[4:]:
        # No token to start with: every dial asks (REQUEST on stdout); a line on stdin grants one.
        import threading
        gate = ConnectGate(lambda: (sys.stdout.write("REQUEST\\n"), sys.stdout.flush()), tokens=0)
        threading.Thread(target=lambda: [gate.grant() for _ in sys.stdin], daemon=True).start()
    engine = NeonizeEngine(EngineOptions(company="acme", session_dir=session, proxy=proxy, pair=pair, gate=gate), emit)
    signal.signal(signal.SIGTERM, lambda *_: engine.stop())

    def play_go_callbacks():
        # Call the ctypes callbacks neonize handed to Go, as Go does during a QR loop.
        import ctypes, threading
        while getattr(engine._client, "_connect_refs", None) is None:
            time.sleep(0.05)
        qr_cb, login_cb = engine._client._connect_refs[:2]
        for data in (b"2@first-qr-code", b"2@second-qr-code"):
            qr_cb(None, ctypes.cast(ctypes.c_char_p(data), ctypes.c_void_p))
        login_cb(None, ctypes.cast(ctypes.c_char_p(b"timeout"), ctypes.c_void_p))

    if len(sys.argv) > 4 and sys.argv[4] == "play":
        import threading
        import whatsappd.worker.neonize.client as module
        module.SHUTDOWN_SECONDS = 0.5  # the fake QR came while the dial still holds Go's lock
        threading.Thread(target=play_go_callbacks, daemon=True).start()
    started = time.monotonic()
    code = engine.run()
    sys.stdout.write("EXIT %d %.3f\\n" % (code, time.monotonic() - started))
    sys.stdout.flush()
    os._exit(code)  # neonize's Go thread may never end: leave without joining it
    """
)


class Child:
    """One worker-like process running the real engine; killed by pid if it outlives the test."""

    def __init__(self, session: Path, proxy_url: str, pair: bool = True, *extra: str) -> None:
        session.mkdir(mode=0o700, exist_ok=True)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("NOTIFY_SOCKET", "LISTEN_", "WATCHDOG_"))}
        env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
        self.proc = subprocess.Popen(
            [sys.executable, "-c", CHILD, str(session), proxy_url, "pair" if pair else "restore", *extra],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=str(session),
            text=True,
        )

    def wait(self, timeout: float) -> tuple[int, list[dict[str, Any]], float | None]:
        try:
            out, _ = self.proc.communicate(timeout=timeout)
        finally:
            self.kill()
        self.output = out
        messages = [json.loads(line[4:]) for line in out.splitlines() if line.startswith("MSG ")]
        took = [float(line.split()[2]) for line in out.splitlines() if line.startswith("EXIT ")]
        return self.proc.returncode, messages, (took[0] if took else None)

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(5)
        for pipe in (self.proc.stdin, self.proc.stdout):
            if pipe is not None:
                pipe.close()


@pytest.mark.parametrize(("mode", "pair"), [("refuse", True), ("close", True), ("refuse", False)])
def test_real_client_fails_fast_through_a_failing_proxy(tmp_path: Path, mode: str, pair: bool) -> None:
    """The real client exits TRANSIENT within seconds when the proxy fails the connection."""
    with Socks5FaultProxy(mode=mode) as proxy:
        child = Child(tmp_path / "session-acme", proxy.url, pair=pair)
        code, messages, took = child.wait(timeout=20)
        assert code == ExitCode.TRANSIENT
        assert took is not None and took < 3
        assert messages[0] == {"type": "state", "state": "connecting"}
        assert not any(m["type"] in ("qr", "paired") for m in messages)
        # the client asked for nothing but the WhatsApp websocket, and only through the proxy
        assert proxy.requests == [("web.whatsapp.com", 443)]
        assert proxy.connections == 1
    files = sorted(p.name for p in (tmp_path / "session-acme").iterdir())
    assert set(files) <= set(STORE_FILES) and "store.db" in files


def test_the_real_clients_dial_is_held_at_the_connect_gate_until_a_token_comes(tmp_path: Path) -> None:
    """whatsmeow dials through the worker's relay: with no token its CONNECT waits (nothing reaches the proxy) until granted."""
    with Socks5FaultProxy(mode="refuse") as proxy:
        child = Child(tmp_path / "session-acme", proxy.url, True, "gated")
        assert child.proc.stdout is not None and child.proc.stdin is not None
        try:
            line = ""
            while "REQUEST" not in line:
                line = child.proc.stdout.readline()
                assert line, "the child ended without asking for a token"
            time.sleep(1.0)
            assert proxy.connections == 0 and child.proc.poll() is None  # held, not dialed
            child.proc.stdin.write("grant\n")
            child.proc.stdin.flush()
            code, _, _ = child.wait(timeout=20)
        finally:
            child.kill()
        assert code == ExitCode.TRANSIENT
        assert proxy.requests == [("web.whatsapp.com", 443)] and proxy.connections == 1


def test_real_client_fails_fast_on_a_refused_port(tmp_path: Path) -> None:
    """The real client exits TRANSIENT within seconds when the proxy port refuses connections."""
    with ClosedPort() as closed:
        code, messages, took = Child(tmp_path / "session-acme", closed.url).wait(timeout=20)
    assert code == ExitCode.TRANSIENT
    assert took is not None and took < 3


def test_real_client_hangs_on_a_silent_proxy_and_stops_on_request(tmp_path: Path) -> None:
    """Against a silent proxy the real client hangs in its dial, and stop() still ends it promptly."""
    with Socks5FaultProxy(mode="silent") as proxy:
        hung = Child(tmp_path / "session-a", proxy.url)
        stopped = Child(tmp_path / "session-b", proxy.url)
        try:
            assert proxy.wait_for_connections(2, timeout=15)
            time.sleep(2.5)
            assert hung.proc.poll() is None  # connect() never returns: the supervisor's deadline
            assert stopped.proc.poll() is None
            assert proxy.requests == []  # the greeting was never answered
            sent = time.monotonic()
            stopped.proc.send_signal(signal.SIGTERM)  # the worker main's stop path: engine.stop()
            code, messages, _ = stopped.wait(timeout=10)
            assert code == ExitCode.STOPPED
            assert time.monotonic() - sent < 3
            assert messages == [{"type": "state", "state": "connecting"}]
            assert hung.proc.poll() is None
        finally:
            hung.kill()
            stopped.kill()
        assert proxy.connections == 2


def test_qr_and_login_status_reach_the_engine_through_neonize_callbacks(tmp_path: Path) -> None:
    """The QR loop's callbacks, called through the very ctypes objects neonize gives Go."""
    with Socks5FaultProxy(mode="silent") as proxy:
        child = Child(tmp_path / "session-acme", proxy.url, True, "play")
        code, messages, took = child.wait(timeout=20)
    # an early "timeout" is whatsmeow's word for a socket closed during pairing: retry
    assert code == ExitCode.TRANSIENT
    assert [m["type"] for m in messages] == ["state", "state", "qr", "qr"]
    assert messages[1] == {"type": "state", "state": "pairing"}
    assert [m["code"] for m in messages[2:]] == ["2@first-qr-code", "2@second-qr-code"]
    assert "first-qr-code" not in child.output.replace(json.dumps(messages[2]), "")  # never logged
    assert "\u2580" not in child.output and "\u2588" not in child.output  # neonize drew no QR
