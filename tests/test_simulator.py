"""SimulatorEngine, driven in-process: run() in a thread, commands from the test thread."""

from __future__ import annotations

import json
import os
import queue
import re
import signal
import stat
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from whatsappd.protocol import ExitCode
from whatsappd.testing.daemon import wait_until
from whatsappd.worker.engine import EngineError, EngineOptions
from whatsappd.worker.gate import ConnectGate
from whatsappd.worker.simulator.engine import CRASH_EXIT_STATUS, PAIRING_CODE_ALPHABET, SimulatorEngine
from whatsappd.worker.simulator.server import SESSION_FILE, has_session

FAST = {
    "WHATSAPPD_SIM_QR_FIRST": "5",
    "WHATSAPPD_SIM_QR_NEXT": "5",
    "WHATSAPPD_SIM_QR_COUNT": "6",
    "WHATSAPPD_SIM_CONNECT_DELAY": "0.01",
}
B64 = r"[A-Za-z0-9+/]+={0,2}"
QR_CODE = re.compile(rf"2@{B64},{B64},{B64},{B64}")
WAIT = 5.0  # generous upper bound for anything that should happen at once


def parse_iso(value: str) -> datetime:
    assert value.endswith("Z"), value
    moment = datetime.fromisoformat(value)
    offset = moment.utcoffset()
    assert offset is not None and offset.total_seconds() == 0
    return moment


class Sim:
    """One engine with a list-collecting emit and run() in a background thread."""

    def __init__(self, session_dir: Path, *, pair: bool = True, env: dict[str, str] | None = None,
                 company: str = "acme", gate: ConnectGate | None = None, server_dir: Path | None = None) -> None:
        self.messages: list[dict[str, Any]] = []
        self._cond = threading.Condition()
        self.engine = SimulatorEngine(
            EngineOptions(company=company, session_dir=session_dir, proxy=None, pair=pair,
                          gate=gate or ConnectGate.unlimited(), server_dir=server_dir),
            self._emit,
            env={**FAST, **(env or {})},
        )
        self.result: int | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _emit(self, message: dict[str, Any]) -> None:
        with self._cond:
            self.messages.append(message)
            self._cond.notify_all()

    def _run(self) -> None:
        self.result = self.engine.run()
        with self._cond:
            self._cond.notify_all()

    def start(self) -> Sim:
        self._thread.start()
        return self

    def wait_for(self, predicate: Callable[[dict[str, Any]], bool], timeout: float = WAIT) -> dict[str, Any]:
        """The first message matching predicate, waiting for it to arrive."""
        def first() -> dict[str, Any] | None:
            return next((m for m in self.messages if predicate(m)), None)

        with self._cond:
            found = self._cond.wait_for(first, timeout)
            assert found is not None, f"no matching message; got {self.messages}"
            return found

    def wait_state(self, state: str) -> dict[str, Any]:
        return self.wait_for(lambda m: m["type"] == "state" and m["state"] == state)

    def join(self, timeout: float = WAIT) -> int:
        self._thread.join(timeout)
        assert not self._thread.is_alive(), f"run() did not return; messages {self.messages}"
        assert self.result is not None
        return self.result

    def simulate(self, action: str, **args: Any) -> dict[str, Any]:
        return self.engine.command("simulate", {"action": action, **args})

    def types(self) -> list[str]:
        """The states and other messages in order; server_time (a clock reading at each connect,
        not a step) is left out."""
        with self._cond:
            return [m["state"] if m["type"] == "state" else m["type"] for m in self.messages
                    if m["type"] != "server_time"]

    def stop(self) -> None:
        if self._thread.is_alive():
            self.engine.stop()
            self._thread.join(WAIT)


@pytest.fixture
def session_dir(tmp_path: Path) -> Path:
    path = tmp_path / "session-acme"
    path.mkdir(mode=0o700)
    return path


@pytest.fixture
def sims() -> Iterator[Callable[..., Sim]]:
    """A factory of started Sims; every one still running at the end is stopped."""
    made: list[Sim] = []

    def make(session_dir: Path, **kwargs: Any) -> Sim:
        sim = Sim(session_dir, **kwargs).start()
        made.append(sim)
        return sim

    yield make
    for sim in made:
        sim.stop()


def pair_and_connect(sims: Callable[..., Sim], session_dir: Path, **scan_args: Any) -> Sim:
    sim = sims(session_dir)
    sim.wait_for(lambda m: m["type"] == "qr")
    sim.simulate("scan", **scan_args)
    sim.wait_state("connected")
    return sim


# ------------------------------------------------------------------------------- pairing


def test_pairing_emits_connecting_pairing_then_a_whatsapp_like_qr(sims, session_dir):
    """With no session: state connecting, state pairing, then a qr with a 2@... code and expiry."""
    before = datetime.now(UTC)
    sim = sims(session_dir)
    qr = sim.wait_for(lambda m: m["type"] == "qr")
    assert sim.types()[:3] == ["connecting", "pairing", "qr"]
    assert sim.messages[0] == {"type": "state", "state": "connecting"}
    assert sim.messages[1] == {"type": "state", "state": "pairing"}
    assert set(qr) == {"type", "code", "expires_at"}
    assert QR_CODE.fullmatch(qr["code"]), qr["code"]
    remaining = (parse_iso(qr["expires_at"]) - before).total_seconds()
    assert 4.9 <= remaining <= 5.5


def test_qr_rotates_first_then_next_count_times_then_pairing_times_out(sims, session_dir):
    """QR_FIRST, then QR_NEXT per code, QR_COUNT codes, then run() returns PAIRING_TIMEOUT."""
    env = {"WHATSAPPD_SIM_QR_FIRST": "0.3", "WHATSAPPD_SIM_QR_NEXT": "0.1", "WHATSAPPD_SIM_QR_COUNT": "4"}
    started = time.monotonic()
    sim = sims(session_dir, env=env)
    arrivals: list[float] = []
    for n in range(1, 5):
        sim.wait_for(lambda m, n=n: sum(x["type"] == "qr" for x in sim.messages) >= n)
        arrivals.append(time.monotonic())
    assert sim.join() == ExitCode.PAIRING_TIMEOUT
    elapsed = time.monotonic() - started
    assert 0.6 <= elapsed < 1.5  # 0.3 + 3 * 0.1, plus the connect delay
    assert arrivals[1] - arrivals[0] >= 0.25
    codes = [m["code"] for m in sim.messages if m["type"] == "qr"]
    assert len(codes) == 4 and len(set(codes)) == 4
    # like whatsmeow, only the server ref rotates; the keys stay for the whole pairing
    assert len({code.split(",", 1)[1] for code in codes}) == 1
    assert sim.types()[-1] == "qr"  # the timeout is told by the exit code alone
    assert not (session_dir / SESSION_FILE).exists()


def test_timings_come_from_the_process_environment_by_default(session_dir, monkeypatch):
    """Without an env argument the WHATSAPPD_SIM_* variables are read from os.environ."""
    monkeypatch.setenv("WHATSAPPD_SIM_QR_FIRST", "0.05")
    monkeypatch.setenv("WHATSAPPD_SIM_QR_NEXT", "0.05")
    monkeypatch.setenv("WHATSAPPD_SIM_QR_COUNT", "2")
    monkeypatch.setenv("WHATSAPPD_SIM_CONNECT_DELAY", "0")
    emitted: list[dict[str, Any]] = []
    engine = SimulatorEngine(EngineOptions("acme", session_dir, None, True), emitted.append)
    assert engine.run() == ExitCode.PAIRING_TIMEOUT
    assert [m["type"] for m in emitted].count("qr") == 2


def test_bad_environment_makes_run_return_bad_invocation(session_dir):
    """An unparsable WHATSAPPD_SIM_* value ends run() with BAD_INVOCATION before connecting."""
    emitted: list[dict[str, Any]] = []
    engine = SimulatorEngine(EngineOptions("acme", session_dir, None, True), emitted.append,
                             env={"WHATSAPPD_SIM_QR_COUNT": "zero"})
    assert engine.run() == ExitCode.BAD_INVOCATION
    assert emitted == []


def test_scan_emits_paired_saves_the_session_then_connects(sims, session_dir):
    """scan while pairing: paired(jid), session saved, connecting (the 515), connected(jid, name)."""
    sim = sims(session_dir)
    sim.wait_for(lambda m: m["type"] == "qr")
    result = sim.simulate("scan", jid="5511912345678:7@s.whatsapp.net", push_name="Imobiliária Sol")
    assert result == {"action": "scan", "jid": "5511912345678:7@s.whatsapp.net", "push_name": "Imobiliária Sol"}
    assert has_session(session_dir)
    connected = sim.wait_state("connected")
    assert connected == {"type": "state", "state": "connected",
                         "jid": "5511912345678:7@s.whatsapp.net", "push_name": "Imobiliária Sol"}
    assert sim.types()[-3:] == ["paired", "connecting", "connected"]
    assert {"type": "paired", "jid": "5511912345678:7@s.whatsapp.net"} in sim.messages


def test_scan_defaults_to_a_device_jid_and_a_push_name(sims, session_dir):
    """scan without arguments invents a number:device@s.whatsapp.net JID and push name Simulator."""
    sim = pair_and_connect(sims, session_dir)
    connected = sim.wait_state("connected")
    assert re.fullmatch(r"5511\d{9}:\d{2}@s\.whatsapp\.net", connected["jid"])
    assert connected["push_name"] == "Simulator"


def test_scan_with_connect_false_stays_connecting_after_paired(sims, session_dir):
    """scan connect=false: paired then connecting, never connected (the lost 515 reconnect)."""
    sim = sims(session_dir)
    sim.wait_for(lambda m: m["type"] == "qr")
    sim.simulate("scan", connect=False)
    time.sleep(0.1)
    assert sim.types()[-2:] == ["paired", "connecting"]
    sim.engine.stop()
    assert sim.join() == ExitCode.STOPPED


def test_scan_when_not_pairing_is_refused(sims, session_dir):
    """scan on a connected engine raises EngineError not_pairing."""
    sim = pair_and_connect(sims, session_dir)
    with pytest.raises(EngineError) as caught:
        sim.simulate("scan")
    assert caught.value.code == "not_pairing"


def test_pair_phone_gives_an_xxxx_xxxx_code_and_scan_completes_with_that_number(sims, session_dir):
    """pair_phone while pairing returns a code in the WhatsApp alphabet valid to the window's end."""
    sim = sims(session_dir, env={"WHATSAPPD_SIM_QR_FIRST": "10", "WHATSAPPD_SIM_QR_NEXT": "2"})
    qr = sim.wait_for(lambda m: m["type"] == "qr")
    result = sim.engine.command("pair_phone", {"phone": "5511999999999"})
    assert set(result) == {"code", "expires_at"}
    assert re.fullmatch(rf"[{PAIRING_CODE_ALPHABET}]{{4}}-[{PAIRING_CODE_ALPHABET}]{{4}}", result["code"])
    window = (parse_iso(result["expires_at"]) - parse_iso(qr["expires_at"])).total_seconds()
    assert 9.9 <= window <= 10.1  # 10 + 5 * 2 in all, the first code covers 10
    sim.simulate("scan")
    assert sim.wait_state("connected")["jid"].startswith("5511999999999:")


@pytest.mark.parametrize("phone", ["+5511999999999", "55 11 99999-9999", "011999999999", "123", "", 5511999999999])
def test_pair_phone_rejects_anything_but_international_digits(sims, session_dir, phone):
    """pair_phone with a non-digit, too short, or leading-zero phone raises invalid_phone."""
    sim = sims(session_dir)
    sim.wait_for(lambda m: m["type"] == "qr")
    with pytest.raises(EngineError) as caught:
        sim.engine.command("pair_phone", {"phone": phone})
    assert caught.value.code == "invalid_phone"


def test_pair_phone_when_not_pairing_is_refused(sims, session_dir):
    """pair_phone on a connected engine raises not_pairing."""
    sim = pair_and_connect(sims, session_dir)
    with pytest.raises(EngineError) as caught:
        sim.engine.command("pair_phone", {"phone": "5511999999999"})
    assert caught.value.code == "not_pairing"


# ------------------------------------------------------------------------------- the store


def test_session_persists_across_two_engines_on_the_same_dir(sims, session_dir):
    """A second engine with pair=False restores the paired device: connected, no QR, same JID."""
    first = pair_and_connect(sims, session_dir, jid="551100000001:3@s.whatsapp.net", push_name="Sol")
    first.engine.stop()
    assert first.join() == ExitCode.STOPPED
    second = sims(session_dir, pair=False)
    connected = second.wait_state("connected")
    assert connected == {"type": "state", "state": "connected",
                         "jid": "551100000001:3@s.whatsapp.net", "push_name": "Sol"}
    assert second.types() == ["connecting", "connected"]


def test_the_store_decides_pairing_not_the_pair_flag(sims, session_dir):
    """pair=False without a device starts pairing; pair=True with a device restores it."""
    unpaired = sims(session_dir, pair=False)
    unpaired.wait_for(lambda m: m["type"] == "qr")
    unpaired.simulate("scan")
    unpaired.wait_state("connected")
    unpaired.engine.stop()
    unpaired.join()
    again = sims(session_dir, pair=True)
    again.wait_state("connected")
    assert "qr" not in again.types()


@pytest.mark.parametrize("umask", [0o077, 0o022])
def test_session_file_is_0600_whatever_the_umask_and_no_temp_file_remains(sims, session_dir, umask):
    """The store is written atomically as a 0600 file (0600 also under the worker's umask 077)."""
    old = os.umask(umask)
    try:
        pair_and_connect(sims, session_dir)
    finally:
        os.umask(old)
    path = session_dir / SESSION_FILE
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert sorted(p.name for p in session_dir.iterdir()) == [SESSION_FILE]
    data = json.loads(path.read_text())
    assert data["format"] == "whatsappd-simulator" and data["device"]["jid"]


@pytest.mark.parametrize("content", [b"{not json", b'{"format": "other"}', b"\xff\xfe",
                                     b'{"format": "whatsappd-simulator", "version": 1, "device": 3}'])
def test_corrupt_store_makes_run_return_store_unusable(sims, session_dir, content):
    """A store that does not parse ends run() with STORE_UNUSABLE, emitting nothing."""
    (session_dir / SESSION_FILE).write_bytes(content)
    sim = sims(session_dir, pair=False)
    assert sim.join() == ExitCode.STORE_UNUSABLE
    assert sim.messages == []
    assert not has_session(session_dir)


# ------------------------------------------------------------------------------- connected life


def test_drop_goes_reconnecting_with_a_reason_until_restore(sims, session_dir):
    """drop emits reconnecting with a reason and stays there (the network is down); restore reconnects."""
    sim = pair_and_connect(sims, session_dir, jid="1555000111:2@s.whatsapp.net")
    assert sim.simulate("drop", reason="wifi off") == {"action": "drop", "state": "reconnecting", "down": True}
    assert sim.messages[-1] == {"type": "state", "state": "reconnecting", "reason": "wifi off"}
    time.sleep(0.1)
    assert sim.types()[-1] == "reconnecting"
    count = len(sim.types())
    assert sim.simulate("restore") == {"action": "restore", "state": "reconnecting"}
    wait_until(lambda: sim.types()[count:] == ["connected"], WAIT)
    assert sim.messages[-1]["jid"] == "1555000111:2@s.whatsapp.net"


def test_every_connection_attempt_waits_for_a_token_of_the_gate(sims, session_dir):
    """The first connect uses the token the worker starts with; the reconnect after a drop asks for one and waits."""
    requests: list[float] = []
    gate = ConnectGate(lambda: requests.append(time.monotonic()), tokens=1)
    (session_dir / SESSION_FILE).write_text(json.dumps(
        {"format": "whatsappd-simulator", "version": 1, "device": {"jid": "1555:1@s.whatsapp.net", "push_name": "x"}}))
    sim = sims(session_dir, pair=False, gate=gate)
    sim.wait_state("connected")
    assert requests == []  # the first attempt needed no request
    count = len(sim.types())
    sim.simulate("drop", down=False)
    wait_until(lambda: len(requests) == 1)
    time.sleep(0.3)
    assert sim.types()[-1] == "reconnecting"  # no attempt without a token
    gate.grant()
    wait_until(lambda: sim.types()[count:] == ["reconnecting", "connected"], WAIT)
    assert len(requests) == 1 and gate.attempts == 2


def test_a_down_network_is_retried_with_growing_delays_each_attempt_through_the_gate(sims, session_dir):
    """drop (network down): reconnect attempts at once, then 1x, 2x the reconnect delay, each granted; restore connects."""
    requests: queue.SimpleQueue[None] = queue.SimpleQueue()
    grants: list[float] = []
    gate = ConnectGate(lambda: requests.put(None), tokens=1)

    def grant_all() -> None:  # a supervisor that grants each request at once
        while True:
            requests.get()
            grants.append(time.monotonic())
            gate.grant()

    threading.Thread(target=grant_all, daemon=True).start()
    sim = sims(session_dir, gate=gate, env={"WHATSAPPD_SIM_RECONNECT_DELAY": "0.3"})
    sim.wait_for(lambda m: m["type"] == "qr")
    sim.simulate("scan")
    sim.wait_state("connected")
    before = gate.attempts  # the first connect and the one after pairing
    sim.simulate("drop")
    wait_until(lambda: gate.attempts >= before + 3, timeout=5)
    assert sim.types()[-1] == "reconnecting"
    times = grants[-3:]
    assert 0.25 <= times[1] - times[0] < 0.6 and 0.55 <= times[2] - times[1] < 1.0, times
    count = len(sim.types())
    sim.simulate("restore")
    wait_until(lambda: sim.types()[count:] == ["connected"], WAIT)
    sim.stop()
    assert gate.closed


def test_drop_and_restore_are_refused_in_the_wrong_state(sims, session_dir):
    """drop needs connected (not_connected); restore needs reconnecting (not_reconnecting)."""
    sim = pair_and_connect(sims, session_dir)
    with pytest.raises(EngineError) as caught:
        sim.simulate("restore")
    assert caught.value.code == "not_reconnecting"
    sim.simulate("drop")
    assert sim.messages[-1]["reason"]  # a default reason is given
    with pytest.raises(EngineError) as caught:
        sim.simulate("drop")
    assert caught.value.code == "not_connected"


def test_logged_out_returns_logged_out_keeps_the_file_but_forgets_the_device(sims, session_dir):
    """logged_out: run() returns LOGGED_OUT; the file stays (the supervisor wipes) without a device."""
    sim = pair_and_connect(sims, session_dir)
    count = len(sim.messages)
    assert sim.simulate("logged_out") == {"action": "logged_out", "exit_code": 11}
    assert sim.join() == ExitCode.LOGGED_OUT
    assert len(sim.messages) == count  # told by the exit code alone
    assert (session_dir / SESSION_FILE).exists()
    assert not has_session(session_dir)
    nxt = sims(session_dir, pair=False)
    nxt.wait_for(lambda m: m["type"] == "qr")


@pytest.mark.parametrize(("action", "code"), [("replaced", ExitCode.REPLACED), ("outdated", ExitCode.OUTDATED)])
def test_replaced_and_outdated_end_run_with_their_exit_code(sims, session_dir, action, code):
    """replaced → REPLACED, outdated → OUTDATED, no message; the session is kept."""
    sim = pair_and_connect(sims, session_dir)
    count = len(sim.messages)
    assert sim.simulate(action) == {"action": action, "exit_code": int(code)}
    assert sim.join() == code
    assert len(sim.messages) == count
    assert has_session(session_dir)


def test_outdated_can_also_happen_while_pairing(sims, session_dir):
    """Terminal actions work in any phase: outdated during pairing ends run() with OUTDATED."""
    sim = sims(session_dir)
    sim.wait_for(lambda m: m["type"] == "qr")
    sim.simulate("outdated")
    assert sim.join() == ExitCode.OUTDATED


@pytest.mark.parametrize(("args", "seconds"), [({}, 3600), ({"seconds": 90, "reason": "spam"}, 90)])
def test_ban_emits_banned_with_until_then_returns_banned(sims, session_dir, args, seconds):
    """ban emits state banned with reason and until (now + seconds, default 3600), then BANNED."""
    sim = pair_and_connect(sims, session_dir)
    before = datetime.now(UTC)
    result = sim.simulate("ban", **args)
    assert sim.join() == ExitCode.BANNED
    banned = sim.messages[-1]
    assert set(banned) == {"type", "state", "reason", "until"} and banned["state"] == "banned"
    assert banned["reason"] == args.get("reason", banned["reason"]) and banned["reason"]
    assert result == {"action": "ban", "exit_code": 13, "until": banned["until"]}
    ahead = (parse_iso(banned["until"]) - before).total_seconds()
    assert seconds - 1 <= ahead <= seconds + 1


def test_ban_rejects_a_bad_duration(sims, session_dir):
    """ban with a negative or non-numeric seconds raises invalid_argument and changes nothing."""
    sim = pair_and_connect(sims, session_dir)
    for bad in (-1, "1h", True):
        with pytest.raises(EngineError) as caught:
            sim.simulate("ban", seconds=bad)
        assert caught.value.code == "invalid_argument"
    assert sim.types()[-1] == "connected"


def test_fail_connect_while_connecting_returns_transient(sims, session_dir):
    """fail_connect during a connect attempt (here one that never ends) returns TRANSIENT."""
    sim = sims(session_dir, env={"WHATSAPPD_SIM_CONNECT_DELAY": "inf"})
    sim.wait_state("connecting")
    assert sim.simulate("fail_connect") == {"action": "fail_connect", "exit_code": 10}
    assert sim.join() == ExitCode.TRANSIENT
    assert sim.types() == ["connecting"]


def test_fail_connect_while_connected_returns_transient(sims, session_dir):
    """fail_connect on a live connection: the connection is lost for good, TRANSIENT."""
    sim = pair_and_connect(sims, session_dir)
    sim.simulate("fail_connect")
    assert sim.join() == ExitCode.TRANSIENT


def test_fail_connect_before_run_fails_the_first_attempt(session_dir):
    """fail_connect before run() began: run() emits connecting, then returns TRANSIENT."""
    emitted: list[dict[str, Any]] = []
    engine = SimulatorEngine(EngineOptions("acme", session_dir, None, True), emitted.append, env=FAST)
    engine.command("simulate", {"action": "fail_connect"})
    assert engine.run() == ExitCode.TRANSIENT
    assert emitted == [{"type": "state", "state": "connecting"}]


def test_fail_connect_file_fails_every_attempt_while_it_exists(sims, session_dir, tmp_path):
    """WHATSAPPD_SIM_FAIL_CONNECT_FILE ({company} substituted): TRANSIENT while the file exists."""
    flag = tmp_path / "fail-acme"
    flag.touch()
    env = {"WHATSAPPD_SIM_FAIL_CONNECT_FILE": str(tmp_path / "fail-{company}")}
    for _ in range(2):
        assert sims(session_dir, env=env).join() == ExitCode.TRANSIENT
    flag.unlink()
    sims(session_dir, env=env).wait_for(lambda m: m["type"] == "qr")


def test_logout_unlinks_when_connected_and_run_returns_logged_out(sims, session_dir):
    """logout while connected returns {"unlinked": true}; run() returns LOGGED_OUT."""
    sim = pair_and_connect(sims, session_dir)
    assert sim.engine.command("logout", {}) == {"unlinked": True}
    assert sim.join() == ExitCode.LOGGED_OUT
    assert (session_dir / SESSION_FILE).exists() and not has_session(session_dir)


def test_logout_when_not_connected_is_refused(sims, session_dir):
    """logout while pairing, or while reconnecting, raises not_connected."""
    sim = sims(session_dir)
    sim.wait_for(lambda m: m["type"] == "qr")
    with pytest.raises(EngineError) as caught:
        sim.engine.command("logout", {})
    assert caught.value.code == "not_connected"
    sim.simulate("scan")
    sim.wait_state("connected")
    sim.simulate("drop")
    with pytest.raises(EngineError) as caught:
        sim.engine.command("logout", {})
    assert caught.value.code == "not_connected"


def test_unknown_action_op_and_malformed_arguments_are_refused(sims, session_dir):
    """Unknown action → unknown_action, unknown op → unknown_op, no action → invalid_argument."""
    sim = pair_and_connect(sims, session_dir)
    for op, args, code in [
        ("simulate", {"action": "explode"}, "unknown_action"),
        ("simulate", {}, "invalid_argument"),
        ("simulate", {"action": "scan", "jid": ""}, "not_pairing"),
        ("teleport", {}, "unknown_op"),
    ]:
        with pytest.raises(EngineError) as caught:
            sim.engine.command(op, args)
        assert caught.value.code == code, (op, args)
    assert sim.types()[-1] == "connected"


def test_commands_after_the_end_are_refused(sims, session_dir):
    """Once run() has decided its result, simulate actions raise not_running."""
    sim = pair_and_connect(sims, session_dir)
    sim.simulate("replaced")
    sim.join()
    with pytest.raises(EngineError) as caught:
        sim.simulate("drop")
    assert caught.value.code == "not_running"


# ------------------------------------------------------------------------------- stop()


@pytest.mark.parametrize("phase", ["connecting", "pairing", "connected", "reconnecting"])
def test_stop_returns_stopped_promptly_in_every_phase(sims, session_dir, phase):
    """stop() from another thread makes run() return STOPPED within a fraction of a second."""
    env = {"WHATSAPPD_SIM_CONNECT_DELAY": "inf"} if phase == "connecting" else {}
    sim = sims(session_dir, env=env)
    if phase == "connecting":
        sim.wait_state("connecting")
    else:
        sim.wait_for(lambda m: m["type"] == "qr")
        if phase != "pairing":
            sim.simulate("scan")
            sim.wait_state("connected")
        if phase == "reconnecting":
            sim.simulate("drop")
    started = time.monotonic()
    sim.engine.stop()
    assert sim.join() == ExitCode.STOPPED
    assert time.monotonic() - started < 0.5


def test_stop_before_run_and_first_decision_wins(session_dir):
    """stop() before run() makes run() return STOPPED at once; a later logout cannot override it."""
    emitted: list[dict[str, Any]] = []
    engine = SimulatorEngine(EngineOptions("acme", session_dir, None, True), emitted.append, env=FAST)
    engine.stop()
    assert engine.run() == ExitCode.STOPPED
    assert emitted == []
    engine.stop()  # idempotent
    with pytest.raises(EngineError):
        engine.command("simulate", {"action": "logged_out"})


# ------------------------------------------------------------------------------- whole process

_CHILD = textwrap.dedent(
    """
    import sys, threading
    from pathlib import Path
    from whatsappd.worker.engine import EngineOptions
    from whatsappd.worker.simulator.engine import SimulatorEngine
    engine = SimulatorEngine(EngineOptions("acme", Path(sys.argv[1]), None, True), lambda m: None,
                             env={"WHATSAPPD_SIM_CONNECT_DELAY": "0"})
    threading.Thread(target=engine.run, daemon=True).start()
    print("ready", flush=True)
    result = engine.command("simulate", {"action": sys.argv[2]})
    print("replied", result, flush=True)
    """
)


def _child(session_dir: Path, action: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-c", _CHILD, str(session_dir), action],
                            stdout=subprocess.PIPE, text=True)


def test_crash_kills_the_process_at_once_with_status_70(session_dir):
    """simulate crash: the process exits with status 70 (not an ExitCode) and never replies."""
    child = _child(session_dir, "crash")
    out, _ = child.communicate(timeout=WAIT * 2)
    assert child.returncode == CRASH_EXIT_STATUS
    assert "ready" in out and "replied" not in out
    assert CRASH_EXIT_STATUS not in {int(code) for code in ExitCode}


def _proc_state(pid: int) -> str:
    stat_line = Path(f"/proc/{pid}/stat").read_text()
    return stat_line.rsplit(")", 1)[1].split()[0]


def test_hang_stops_the_whole_process_so_heartbeats_stop_too(session_dir):
    """simulate hang: the process is SIGSTOPped (state T), never replies, and dies to SIGKILL."""
    child = _child(session_dir, "hang")
    try:
        assert child.stdout is not None
        assert child.stdout.readline().strip() == "ready"
        deadline = time.monotonic() + WAIT * 2
        while _proc_state(child.pid) != "T":
            assert time.monotonic() < deadline, "the child never stopped"
            time.sleep(0.01)
    finally:
        os.kill(child.pid, signal.SIGKILL)
        out, _ = child.communicate(timeout=WAIT)
    assert child.returncode == -signal.SIGKILL
    assert "replied" not in out
