"""whatsappctl's company commands against a real daemon with simulator companies."""

from __future__ import annotations

import json
import subprocess
import threading
import time
from collections.abc import Callable

import pytest

from whatsappd.terminal import first_unsafe
from whatsappd.testing.daemon import clean_env, ctl_command, run_ctl, wait_until
from whatsappd.testing.scenario import SimDaemon, sim_config


@pytest.fixture
def d(daemons: Callable[..., SimDaemon]) -> SimDaemon:
    daemon = daemons(sim_config("acme", "bob"))
    daemon.start()
    return daemon


def ctl(d: SimDaemon, *args: str) -> subprocess.CompletedProcess[str]:
    return run_ctl("--socket", str(d.socket_path), *args)


def test_connect_draws_the_qr_and_returns_once_connected(d):
    """`connect` shows the QR while pairing and exits 0 with the JID once the phone scanned it."""
    proc = subprocess.Popen([*ctl_command(), "--socket", str(d.socket_path), "connect", "acme", "--wait", "30"],
                            env=clean_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            stdin=subprocess.DEVNULL)
    try:
        d.wait_state("acme", "pairing")
        wait_until(lambda: d.snapshot("acme")["qr_available"], 5)
        time.sleep(1.0)  # whatsappctl polls every 0.5 s: let it fetch and draw the code
        assert d.simulate("acme", "scan", push_name="Acme").status == 200
        out, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    assert "█" in out or "▀" in out  # the QR drawn with block characters
    assert "Linked devices" in out
    assert "acme: connected as " in out


def test_status_list_qr_pair_code_restart_and_logout(d, tmp_path):
    """status, list, qr (text, --json, --png), pair-code, restart and logout each do their job."""
    assert ctl(d, "connect", "acme", "--no-wait").returncode == 0
    d.wait_state("acme", "pairing")
    status = ctl(d, "status", "acme")
    assert status.returncode == 0 and "acme: pairing since" in status.stdout
    assert "a QR code is waiting" in status.stdout
    listing = ctl(d, "list")
    assert listing.returncode == 0
    rows = {line.split()[0]: line.split()[1] for line in listing.stdout.splitlines()[1:]}
    assert rows == {"acme": "pairing", "bob": "stopped"}
    qr = ctl(d, "qr", "acme")
    assert qr.returncode == 0 and ("▀" in qr.stdout or "█" in qr.stdout)
    qr_json = json.loads(ctl(d, "--json", "qr", "acme").stdout)
    assert qr_json["code"].startswith("2@") and qr_json["expires_at"]
    png = tmp_path / "qr.png"
    assert ctl(d, "qr", "acme", "--png", str(png)).returncode == 0
    assert png.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    code = ctl(d, "pair-code", "acme", "+55 11 98888-7777")
    assert code.returncode == 0 and "pairing code: " in code.stdout
    bad = ctl(d, "pair-code", "acme", "12")
    assert bad.returncode == 1 and "invalid_phone" in bad.stderr
    d.simulate("acme", "scan")
    pid = d.wait_state("acme", "connected")["worker"]["pid"]
    restarted = ctl(d, "restart", "acme")
    assert restarted.returncode == 0 and "worker restarted" in restarted.stdout
    d.wait_state("acme", "connected", check=lambda s: s["worker"]["pid"] != pid)
    out = ctl(d, "logout", "acme")
    assert out.returncode == 0 and "unlinked on WhatsApp and session wiped" in out.stdout
    assert d.snapshot("acme")["state"] == "logged_out"
    again = ctl(d, "logout", "acme")
    assert again.returncode == 0 and "wiped locally" in again.stdout


def test_company_errors_exit_1_with_the_daemons_sentence(d):
    """An unknown company or a bad id: exit 1 and the daemon's message with its code."""
    unknown = ctl(d, "status", "nobody")
    assert unknown.returncode == 1 and "company_not_found" in unknown.stderr
    bad = ctl(d, "status", "Bad!")
    assert bad.returncode == 1 and "invalid_company_id" in bad.stderr
    no_qr = ctl(d, "qr", "bob")
    assert no_qr.returncode == 1 and "no_qr" in no_qr.stderr


def test_events_follows_the_stream_from_a_cursor(d):
    """`events --since 0 --company acme` prints the company's events, one per line, in seq order."""
    d.post("acme", "connect")
    d.wait_state("acme", "pairing")
    proc = subprocess.Popen([*ctl_command(), "--socket", str(d.socket_path), "events", "--since", "0",
                             "--company", "acme", "--type", "company.state"],
                            env=clean_env(), stdout=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL)
    try:
        lines: list[str] = []
        assert proc.stdout is not None
        while len(lines) < 3:
            lines.append(proc.stdout.readline())
    finally:
        proc.kill()
        proc.communicate()  # reads and closes its stdout
    seqs = [int(line.split()[0]) for line in lines]
    assert seqs == sorted(seqs)
    assert all(" acme company.state " in line for line in lines)
    assert 'new="pairing"' in "".join(lines)


# Window title, screen clear, a C1 CSI, a bidi override, a forged line, a carriage return, DEL.
HOSTILE = "\x1b]0;pwned\x07\x1b[2J\x9b31m\u202eevil\nforged line\r\x7f"


def _printed_safely(out: str) -> list[str]:
    """The output's lines, after checking that none holds a character a terminal would obey."""
    lines = out.split("\n")
    for line in lines:
        assert first_unsafe(line) is None, line
    assert not any(line.startswith("forged line") for line in lines)
    return lines


def test_hostile_values_from_the_daemon_are_printed_escaped(d):
    """Control characters in any field the daemon returns are printed escaped by whatsappctl; --json keeps them exact."""
    d.pair("acme", jid=f"5511999990001{HOSTILE}@s.whatsapp.net", push_name=HOSTILE[:64])
    assert d.simulate("acme", "incoming", text=HOSTILE, push_name=HOSTILE[:64]).status == 200
    assert d.simulate("acme", "drop", reason=HOSTILE).status == 200
    d.wait_state("acme", "reconnecting")

    status = ctl(d, "status", "acme")
    assert status.returncode == 0, status.stderr
    lines = _printed_safely(status.stdout)
    escaped = r"\x1b]0;pwned\x07\x1b[2J\x9b31m\u202eevil\nforged line\r\x7f"
    assert f"  reason:     {escaped}" in lines, lines
    assert any(line.startswith("  jid:        5511999990001\\x1b]0;pwned") for line in lines)

    as_json = ctl(d, "--json", "status", "acme")
    assert as_json.returncode == 0 and first_unsafe(as_json.stdout.replace("\n", "")) is None
    assert json.loads(as_json.stdout)["reason"] == HOSTILE

    for args in (("events", "--since", "0", "--type", "message.incoming"),
                 ("--json", "events", "--since", "0", "--type", "message.incoming")):
        proc = subprocess.Popen([*ctl_command(), "--socket", str(d.socket_path), *args], env=clean_env(),
                                stdout=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL)
        timer = threading.Timer(20, proc.kill)
        timer.start()
        try:
            assert proc.stdout is not None
            line = proc.stdout.readline()
        finally:
            timer.cancel()
            proc.kill()
            proc.communicate()
        _printed_safely(line.rstrip("\n"))
        if "--json" in args:
            event = json.loads(line)
            assert (event["text"], event["push_name"]) == (HOSTILE, HOSTILE[:64])
        else:
            assert " message.incoming " in line
            assert r'text="\u001b]0;pwned\u0007\u001b[2J\x9b31m\u202eevil\nforged line\r\x7f"' in line, line
