"""The company state machine, driven through the HTTP API against simulator workers.

Every test runs a real `whatsappd run` with real worker subprocesses (engine = "simulator")
and talks to it over its real control socket. `Runner._decide` in whatsappd/supervisor/runner.py is
what most of these pin down: what each way a worker can end means for its company.
"""

from __future__ import annotations

import functools
import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from whatsappd.config import LAUNCHERS
from whatsappd.testing.daemon import NotifySocket, at_once, wait_until
from whatsappd.testing.scenario import (
    SimDaemon,
    daemon_pool,
    parse_iso,
    process_gone,
    settled_tree_state,
    sim_config,
    tree_state,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PAIR_CODE = re.compile(r"[1-9A-HJ-NP-TV-Z]{4}-[1-9A-HJ-NP-TV-Z]{4}")


#: The scenarios that drive a whole supervision flow (pairing, crash, backoff, logout, stop,
#: restart, ban...) also run on the PostgreSQL store: the journal of every state change, the
#: outbox and the pacing tables are then in PostgreSQL. Checks of requests and of one answer
#: run on the default, SQLite.
BOTH_STORES = pytest.mark.parametrize("store_table", ["sqlite", "postgresql"], indirect=True)
#: A launcher-parametrized scenario on PostgreSQL with the default launcher only (the store does
#: not care how a worker was started): (launcher, store) pairs.
LAUNCHERS_AND_STORES = pytest.mark.parametrize(
    ("launcher", "store_table"), [*((launcher, "sqlite") for launcher in LAUNCHERS), ("zygote", "postgresql")],
    indirect=["store_table"])


@pytest.fixture
def daemons(tmp_path: Path, store_table: dict[str, str]) -> Iterator[Callable[..., SimDaemon]]:
    """Make SimDaemons under tmp_path, on the store of `store_table` (SQLite unless the test is
    parametrized with BOTH_STORES); any still running at teardown is killed."""
    with daemon_pool(tmp_path) as make:
        yield functools.partial(make, store=store_table)


def started(make: Callable[..., SimDaemon], *companies: str, env: dict[str, str] | None = None,
            **tables: dict[str, object]) -> SimDaemon:
    daemon = make(sim_config(*companies, **tables), env=env)
    daemon.start()
    return daemon


def error_code(response) -> str:  # type: ignore[no-untyped-def]
    return str(response.json()["error"]["code"])


def stays(daemon: SimDaemon, company: str, seconds: float, predicate: Callable[[dict], bool]) -> dict:
    """Assert predicate(snapshot) holds on every poll for `seconds`; return the last snapshot."""
    deadline = time.monotonic() + seconds
    snap = daemon.snapshot(company)
    while time.monotonic() < deadline:
        snap = daemon.snapshot(company)
        assert predicate(snap), snap
        time.sleep(0.05)
    return snap


# ------------------------------------------------------------------------------- pairing


def test_connect_without_session_starts_pairing_with_a_rotating_qr(daemons):
    """connect without a session goes `pairing`; GET qr is JSON with expires_at and rotates on expiry."""
    d = started(daemons, "acme", env={"WHATSAPPD_SIM_QR_FIRST": "1.5", "WHATSAPPD_SIM_QR_NEXT": "30"})
    response = d.post("acme", "connect")
    assert response.status == 202
    assert response.json()["state"] in ("connecting", "pairing")
    snap = d.wait_state("acme", "pairing", check=lambda s: s["qr_available"])
    assert snap["has_session"] is False and snap["worker"]["pid"]

    first = d.client.get("/v1/companies/acme/qr")
    assert first.status == 200
    assert first.headers["content-type"].startswith("application/json")
    assert first.headers["cache-control"] == "no-store"
    body = first.json()
    assert set(body) == {"code", "expires_at"}
    assert body["code"].startswith("2@")
    assert time.time() - 1 < parse_iso(body["expires_at"]) < time.time() + 2

    def rotated():
        now = d.client.get("/v1/companies/acme/qr").json()
        return now if now["code"] != body["code"] else None

    second = wait_until(rotated, timeout=5, what="the QR code to rotate")
    assert parse_iso(second["expires_at"]) > time.time() + 20  # the next codes last QR_NEXT
    assert d.snapshot("acme")["state"] == "pairing"


def test_qr_is_served_as_png_and_as_terminal_text(daemons):
    """The QR is a PNG (Accept or ?format=png), text with ?format=text; other formats are 400."""
    d = started(daemons, "acme")
    d.connect_pairing("acme")
    for response in (d.client.get("/v1/companies/acme/qr", headers={"Accept": "image/png"}),
                     d.client.get("/v1/companies/acme/qr?format=png")):
        assert response.status == 200
        assert response.headers["content-type"] == "image/png"
        assert response.body.startswith(PNG_SIGNATURE)
        assert response.headers["cache-control"] == "no-store"
    text = d.client.get("/v1/companies/acme/qr?format=text")
    assert text.status == 200
    assert text.headers["content-type"].startswith("text/plain")
    lines = text.body.decode().splitlines()
    assert len(lines) > 10 and len({len(line) for line in lines if line.strip()}) <= 2
    bad = d.client.get("/v1/companies/acme/qr?format=gif")
    assert bad.status == 400 and error_code(bad) == "bad_request"


def test_qr_without_pairing_is_409(daemons):
    """GET qr on a stopped or a connected company answers 409 no_qr."""
    d = started(daemons, "acme", "bob")
    response = d.client.get("/v1/companies/acme/qr")
    assert response.status == 409 and error_code(response) == "no_qr"
    d.pair("bob")
    response = d.client.get("/v1/companies/bob/qr?format=png")
    assert response.status == 409 and error_code(response) == "no_qr"


def test_pair_code_gives_an_xxxx_xxxx_code_and_the_scan_links_that_phone(daemons):
    """pair-code while pairing gives XXXX-XXXX and expires_at; that phone becomes the JID."""
    d = started(daemons, "acme")
    d.connect_pairing("acme")
    response = d.post("acme", "pair-code", {"phone": "+55 (11) 98765-4321"})
    assert response.status == 200, response.body
    body = response.json()
    assert PAIR_CODE.fullmatch(body["code"]), body
    assert parse_iso(body["expires_at"]) > time.time()
    assert d.simulate("acme", "scan").status == 200
    snap = d.wait_state("acme", "connected")
    assert snap["jid"].startswith("5511987654321:")


def test_pair_code_with_an_invalid_phone_is_400(daemons):
    """pair-code refuses anything but an international phone number with 400; pairing goes on."""
    d = started(daemons, "acme")
    d.connect_pairing("acme")
    for body, code in [({"phone": "abc"}, "invalid_phone"), ({"phone": "0123456789"}, "invalid_phone"),
                       ({"phone": "+1 23"}, "invalid_phone"), ({"phone": "55 11 9999 9999 9999 99"}, "invalid_phone"),
                       ({"phone": "5511999999999; rm"}, "invalid_phone"), ({"phone": ""}, "bad_request"),
                       ({}, "bad_request"), ({"phone": 5511999999999}, "bad_request"), ([1], "bad_request")]:
        response = d.post("acme", "pair-code", body)
        assert (response.status, error_code(response)) == (400, code), body
    assert d.snapshot("acme")["state"] == "pairing"


def test_pair_code_when_not_pairing_is_409(daemons):
    """pair-code on a stopped or a connected company answers 409 not_pairing."""
    d = started(daemons, "acme", "bob")
    response = d.post("acme", "pair-code", {"phone": "5511999999999"})
    assert response.status == 409 and error_code(response) == "not_pairing"
    d.pair("bob")
    response = d.post("bob", "pair-code", {"phone": "5511999999999"})
    assert response.status == 409 and error_code(response) == "not_pairing"


@BOTH_STORES
def test_scan_connects_with_the_jid_and_push_name(daemons):
    """scan while pairing: `connected` in the same worker, with JID, push name and a session."""
    d = started(daemons, "acme")
    d.connect_pairing("acme")
    pid = d.worker_pid("acme")
    response = d.simulate("acme", "scan", jid="5511912345678:7@s.whatsapp.net", push_name="Acme Imóveis")
    assert response.status == 200
    snap = d.wait_state("acme", "connected")
    assert snap["jid"] == "5511912345678:7@s.whatsapp.net"
    assert snap["push_name"] == "Acme Imóveis"
    assert snap["has_session"] is True and snap["qr_available"] is False
    assert snap["last_error"] is None
    assert snap["worker"] == {"pid": pid, "restarts": 0}  # the same worker paired and connected
    assert d.client.get("/v1/companies/acme/qr").status == 409
    assert [e["new"] for e in d.log_lines("state changed", company="acme")] == [
        "starting", "connecting", "pairing", "connecting", "connected"]


@pytest.mark.slow
def test_pairing_deadline_kills_the_worker_and_stops_with_qr_timeout(daemons):
    """No scan by workers.pairing_timeout: worker killed, `stopped` with qr_timeout, no retry."""
    d = started(daemons, "acme", workers={"pairing_timeout": "10s"},
                env={"WHATSAPPD_SIM_QR_FIRST": "30", "WHATSAPPD_SIM_QR_NEXT": "30"})
    d.connect_pairing("acme")
    pid = d.worker_pid("acme")
    snap = d.wait_state("acme", "stopped", timeout=20)
    assert snap["last_error"]["code"] == "qr_timeout"
    assert snap["worker"]["pid"] is None and snap["qr_available"] is False
    assert wait_until(lambda: process_gone(pid), 5)
    assert d.log_lines("killing worker", company="acme", reason="pairing_timeout")
    assert d.log_lines("worker exited", company="acme", killed="pairing_timeout")
    stays(d, "acme", 1.2, lambda s: s["state"] == "stopped" and s["worker"]["pid"] is None)


def test_engine_pairing_timeout_stops_with_qr_timeout_and_is_not_retried(daemons):
    """ExitCode.PAIRING_TIMEOUT from the engine: `stopped` with qr_timeout, no retry."""
    d = started(daemons, "acme", env={"WHATSAPPD_SIM_QR_FIRST": "0.3", "WHATSAPPD_SIM_QR_NEXT": "0.3",
                                      "WHATSAPPD_SIM_QR_COUNT": "2"})
    d.post("acme", "connect")
    snap = d.wait_state("acme", "stopped", check=lambda s: s["last_error"])
    assert snap["last_error"]["code"] == "qr_timeout"
    assert d.log_lines("worker exited", company="acme", exit_code=15, killed=None)
    stays(d, "acme", 1.2, lambda s: s["state"] == "stopped" and s["worker"]["pid"] is None)
    assert len(d.log_lines("worker started", company="acme")) == 1
    # connect again gives a new QR
    d.connect_pairing("acme")


def test_paired_without_connected_restarts_the_worker_after_the_paired_deadline(daemons):
    """Paired but not connected within workers.paired_connect_timeout: the worker is restarted."""
    d = started(daemons, "acme", workers={"paired_connect_timeout": "3s"})
    d.connect_pairing("acme")
    pid = d.worker_pid("acme")
    assert d.simulate("acme", "scan", connect=False).status == 200
    d.wait_state("acme", "connecting")
    time.sleep(2)
    assert d.snapshot("acme")["state"] == "connecting"
    snap = d.wait_state("acme", "connected", timeout=15, check=lambda s: s["worker"]["pid"] != pid)
    assert snap["worker"]["restarts"] == 1 and snap["has_session"] is True
    assert d.log_lines("killing worker", company="acme", reason="paired_without_connect")
    assert d.log_lines("worker started", company="acme", mode="restore")
    assert process_gone(pid)


# ---------------------------------------------------------------------------- connection


@BOTH_STORES
def test_drop_goes_reconnecting_and_restore_goes_connected_in_the_same_worker(daemons):
    """drop shows `reconnecting`, restore `connected`, and the worker is not replaced."""
    d = started(daemons, "acme")
    pid = d.pair("acme")["worker"]["pid"]
    assert d.simulate("acme", "drop", reason="network down").status == 200
    snap = d.wait_state("acme", "reconnecting")
    assert snap["reason"] == "network down" and snap["worker"]["pid"] == pid
    assert d.simulate("acme", "restore").status == 200
    snap = d.wait_state("acme", "connected")
    assert snap["worker"] == {"pid": pid, "restarts": 0}


@BOTH_STORES
def test_logged_out_wipes_every_session_file_and_the_next_connect_shows_a_qr(daemons):
    """Unlinked from the phone: `logged_out`, every session file gone, no retry; connect pairs anew."""
    d = started(daemons, "acme")
    d.pair("acme")
    session = d.session_dir("acme")
    assert sorted(p.name for p in session.iterdir()) == ["simulator.json", "whatsappd.lock"]
    # what else a store leaves beside it (the neonize engine's SQLite, its WAL and SHM, a subdir)
    for name in ("store.db", "store.db-wal", "store.db-shm", "media/blob"):
        (session / name).parent.mkdir(mode=0o700, exist_ok=True)
        (session / name).write_bytes(b"x")
    assert d.simulate("acme", "logged_out").status == 200
    snap = d.wait_state("acme", "logged_out")
    assert snap["last_error"]["code"] == "logged_out"
    assert snap["has_session"] is False and snap["jid"] is None
    assert not session.exists()
    stays(d, "acme", 1.0, lambda s: s["state"] == "logged_out" and s["worker"]["pid"] is None)
    d.connect_pairing("acme")
    assert d.log_lines("worker started", company="acme", mode="pairing")[-1]


@BOTH_STORES
def test_replaced_is_not_retried_until_connect(daemons):
    """Stream replaced: `replaced` with no worker and no retry until connect restores the session."""
    d = started(daemons, "acme")
    jid = d.pair("acme")["jid"]
    assert d.simulate("acme", "replaced").status == 200
    snap = d.wait_state("acme", "replaced")
    assert snap["last_error"]["code"] == "replaced" and snap["has_session"] is True
    stays(d, "acme", 1.2, lambda s: s["state"] == "replaced" and s["worker"]["pid"] is None)
    assert d.post("acme", "connect").ok
    snap = d.wait_state("acme", "connected")
    assert snap["jid"] == jid
    assert d.log_lines("worker started", company="acme")[-1]["mode"] == "restore"


@pytest.mark.slow
@BOTH_STORES
def test_ban_waits_until_its_expiry_then_reconnects(daemons):
    """A temporary ban: `banned` with banned_until and no worker, then `connected` after expiry."""
    d = started(daemons, "acme")
    d.pair("acme")
    assert d.simulate("acme", "ban", seconds=2).status == 200
    snap = d.wait_state("acme", "banned")
    until = parse_iso(snap["banned_until"])
    assert time.time() < until < time.time() + 3
    assert snap["last_error"]["code"] == "banned"
    while time.time() < until - 0.3:
        snap = d.snapshot("acme")
        assert snap["state"] == "banned" and snap["worker"]["pid"] is None, snap
        time.sleep(0.05)
    snap = d.wait_state("acme", "connected", timeout=10)
    assert snap["banned_until"] is None and snap["last_error"] is None
    starts = d.log_lines("worker started", company="acme")
    assert len(starts) == 2 and parse_iso(starts[1]["timestamp"]) >= until - 0.05


def test_outdated_is_not_retried(daemons):
    """Client outdated: `outdated`, no retry."""
    d = started(daemons, "acme")
    d.pair("acme")
    assert d.simulate("acme", "outdated").status == 200
    snap = d.wait_state("acme", "outdated")
    assert snap["last_error"]["code"] == "outdated"
    stays(d, "acme", 1.2, lambda s: s["state"] == "outdated" and s["worker"]["pid"] is None)
    assert len(d.log_lines("worker started", company="acme")) == 1


@pytest.mark.slow
@BOTH_STORES
def test_failing_connects_back_off_up_to_max_delay_then_connect_once_the_fault_is_gone(daemons, tmp_path):
    """Failed connects back off (attempt grows, delays capped at max_delay) until the fault goes."""
    fault = tmp_path / "fail-acme"
    d = started(daemons, "acme", env={"WHATSAPPD_SIM_FAIL_CONNECT_FILE": str(tmp_path / "fail-{company}")})
    d.pair("acme")
    fault.touch()
    mark = d.log_mark()
    assert d.simulate("acme", "fail_connect").status == 200
    snap = d.wait_state("acme", "reconnecting", check=lambda s: s["reconnect"]["next_retry_at"])
    assert snap["last_error"]["code"] == "connection_failed"
    assert parse_iso(snap["reconnect"]["next_retry_at"]) <= time.time() + 1.5
    # Attempt 6 would wait up to 0.1 * 2**5 = 3.2 s without the 1 s cap.
    d.wait_state("acme", "reconnecting", "starting", "connecting", timeout=20,
                 check=lambda s: s["reconnect"]["attempt"] >= 7)
    retries = [e for e in d.log_lines("state changed", mark, company="acme") if e["new"] == "reconnecting"]
    assert [e["attempt"] for e in retries][:7] == [1, 2, 3, 4, 5, 6, 7]
    assert all(0 <= e["retry_in_seconds"] <= 1.0 for e in retries)
    starts = [parse_iso(e["timestamp"]) for e in d.log_lines("worker started", mark, company="acme")]
    exits = [parse_iso(e["timestamp"]) for e in d.log_lines("worker exited", mark, company="acme")]
    # Each retry starts within max_delay (plus scheduling slack) of the previous worker's end.
    assert len(starts) >= 6
    assert all(start - end < 1.0 + 1.0 for end, start in zip(exits, starts, strict=False))
    fault.unlink()
    snap = d.wait_state("acme", "connected", timeout=5)
    assert snap["reconnect"]["next_retry_at"] is None and snap["last_error"] is None


def test_a_connect_that_never_completes_is_abandoned_after_connect_timeout(daemons):
    """A connect that never ends is killed after connect_timeout: `reconnecting`, connect_timeout."""
    d = started(daemons, "acme", reconnect={"connect_timeout": "1s"},
                env={"WHATSAPPD_SIM_CONNECT_DELAY": "inf"})
    d.post("acme", "connect")
    snap = d.wait_state("acme", "reconnecting", timeout=8, check=lambda s: s["last_error"])
    assert snap["last_error"]["code"] == "connect_timeout"
    assert snap["reconnect"]["attempt"] >= 1
    first = d.log_lines("worker started", company="acme")[0]
    exited = d.log_lines("worker exited", company="acme", pid=first["pid"])
    assert exited and exited[0]["killed"] == "connect_timeout" and exited[0]["exit_code"] == -9
    assert parse_iso(exited[0]["timestamp"]) - parse_iso(first["timestamp"]) >= 0.9
    assert process_gone(first["pid"])
    # and it keeps trying with fresh workers
    d.wait_state("acme", "connecting", "reconnecting", "starting", timeout=8,
                 check=lambda s: s["worker"]["restarts"] >= 1)


# ---------------------------------------------------------------------------- worker faults


@LAUNCHERS_AND_STORES
def test_a_crash_restarts_the_worker_with_backoff(daemons, launcher):
    """A crash: a new worker after backoff, restarts counted, the session restored without a QR."""
    d = started(daemons, "acme", workers={"launcher": launcher})
    pid = d.pair("acme")["worker"]["pid"]
    assert d.simulate("acme", "crash").status == 202
    snap = d.wait_state("acme", "reconnecting", "starting", "connecting", "connected",
                        check=lambda s: s["last_error"] and s["worker"]["pid"] != pid)
    assert snap["last_error"]["code"] == "worker_crashed"
    assert "exited with status 70" in snap["last_error"]["message"]
    snap = d.wait_state("acme", "connected", check=lambda s: s["worker"]["pid"] not in (None, pid))
    assert snap["worker"]["restarts"] == 1
    assert process_gone(pid)
    assert [e["mode"] for e in d.log_lines("worker started", company="acme")] == ["pairing", "restore"]
    assert [e["new"] for e in d.log_lines("state changed", company="acme")][-4:] == [
        "reconnecting", "starting", "connecting", "connected"]


@pytest.mark.slow
@LAUNCHERS_AND_STORES
def test_a_crash_loop_fails_until_connect_or_restart(daemons, launcher):
    """crash_limit crashes in crash_window: `failed` crash_loop until connect or restart."""
    d = started(daemons, "acme", workers={"crash_limit": 2, "crash_window": "1m", "launcher": launcher})
    d.pair("acme")

    def crash_loop() -> dict:
        pid = None
        for _ in range(2):
            # crash is fire-and-forget: wait for the new worker before crashing it again
            snap = d.wait_state("acme", "connected", timeout=10, check=lambda s, p=pid: s["worker"]["pid"] != p)
            pid = snap["worker"]["pid"]
            assert d.simulate("acme", "crash").status == 202
            wait_until(lambda p=pid: process_gone(p), 5)
        snap = d.wait_state("acme", "failed", timeout=10)
        assert snap["last_error"]["code"] == "crash_loop"
        assert "crashed 2 times" in snap["last_error"]["message"]
        return stays(d, "acme", 1.2, lambda s: s["state"] == "failed" and s["worker"]["pid"] is None)

    crash_loop()
    assert d.post("acme", "connect").status == 202
    d.wait_state("acme", "connected")
    crash_loop()
    assert d.post("acme", "restart").status == 202
    snap = d.wait_state("acme", "connected")
    assert snap["has_session"] is True


@pytest.mark.slow
@LAUNCHERS_AND_STORES
def test_a_hung_worker_is_killed_after_heartbeat_timeout_and_replaced(daemons, launcher):
    """A worker silent for heartbeat_timeout (SIGSTOP) is SIGKILLed and replaced."""
    d = started(daemons, "acme", workers={"heartbeat_timeout": "2s", "launcher": launcher})
    snap = d.pair("acme")
    pid, restarts = snap["worker"]["pid"], snap["worker"]["restarts"]
    hung_at = time.monotonic()
    assert d.simulate("acme", "hang").status == 202
    wait_until(lambda: process_gone(pid), 10, what="the hung worker to be killed")
    assert time.monotonic() - hung_at >= 1.5  # not before the heartbeat timeout
    snap = d.wait_state("acme", "connected", check=lambda s: s["worker"]["pid"] not in (None, pid))
    assert snap["worker"]["restarts"] == restarts + 1
    assert d.log_lines("killing worker", company="acme", pid=pid, reason="heartbeat")
    changes = d.log_lines("state changed", company="acme", new="reconnecting")
    assert changes and "stopped heart-beating" in changes[-1]["reason"]


# ---------------------------------------------------------------------------- operator acts


@BOTH_STORES
def test_logout_when_connected_unlinks_and_wipes(daemons):
    """logout when connected unlinks through the library, wipes, and leaves `logged_out`."""
    d = started(daemons, "acme")
    d.pair("acme")
    response = d.post("acme", "logout")
    assert response.status == 200
    assert response.json() == {"unlinked": True, "wiped": True, "state": "logged_out"}
    assert not d.session_dir("acme").exists()
    snap = d.snapshot("acme")
    assert snap["state"] == "logged_out" and snap["has_session"] is False and snap["worker"]["pid"] is None


@BOTH_STORES
def test_logout_when_not_connected_wipes_locally_and_says_so(daemons):
    """logout when not connected wipes locally and notes the phone may still list the device."""
    d = started(daemons, "acme")
    d.pair("acme")
    assert d.client.request("DELETE", "/v1/companies/acme").status == 200
    assert d.session_dir("acme").exists()
    response = d.post("acme", "logout")
    assert response.status == 200
    body = response.json()
    assert body["unlinked"] is False and body["wiped"] is True and body["state"] == "logged_out"
    assert "Linked devices" in body["note"]
    assert not d.session_dir("acme").exists()


@BOTH_STORES
def test_restart_replaces_the_worker(daemons):
    """restart: the worker stops cleanly and a new one (new pid, restarts + 1) restores."""
    d = started(daemons, "acme")
    pid = d.pair("acme")["worker"]["pid"]
    response = d.post("acme", "restart")
    assert response.status == 202
    snap = d.wait_state("acme", "connected", check=lambda s: s["worker"]["pid"] not in (None, pid))
    assert snap["worker"]["restarts"] == 1
    assert process_gone(pid)
    assert d.log_lines("worker exited", company="acme", pid=pid, exit_code=0, killed=None)


@BOTH_STORES
def test_delete_stops_the_worker_and_keeps_the_session(daemons):
    """DELETE stops the worker, keeps the session; status does not undo it, connect restores."""
    d = started(daemons, "acme")
    pid = d.pair("acme")["worker"]["pid"]
    response = d.client.request("DELETE", "/v1/companies/acme")
    assert response.status == 200
    assert response.json()["state"] == "stopped"
    assert wait_until(lambda: process_gone(pid), 5)
    status = d.client.get("/v1/companies/acme").json()
    assert status["state"] == "stopped" and status["has_session"] is True
    stays(d, "acme", 0.5, lambda s: s["state"] == "stopped")
    assert d.post("acme", "connect").status == 202
    d.wait_state("acme", "connected")
    assert d.log_lines("worker started", company="acme")[-1]["mode"] == "restore"


@BOTH_STORES
def test_delete_with_wipe_logs_out_and_wipes(daemons):
    """DELETE ?wipe=true unlinks the device and wipes the session: `logged_out`."""
    d = started(daemons, "acme")
    pid = d.pair("acme")["worker"]["pid"]
    response = d.client.request("DELETE", "/v1/companies/acme?wipe=true")
    assert response.status == 200
    body = response.json()
    assert body["state"] == "logged_out" and body["wiped"] is True and body["unlinked"] is True
    assert not d.session_dir("acme").exists()
    assert process_gone(pid)
    assert d.snapshot("acme")["state"] == "logged_out"
    bad = d.client.request("DELETE", "/v1/companies/acme?wipe=maybe")
    assert bad.status == 400


def test_simulate_on_a_neonize_company_is_404(daemons):
    """simulate on a real-engine company answers 404."""
    d = started(daemons, neonize=["real"])
    response = d.simulate("real", "scan")
    assert response.status == 404
    assert "simulator" in response.json()["error"]["message"]
    assert d.snapshot("real")["state"] == "stopped"


def test_simulate_with_a_bad_body_is_400_and_without_a_worker_is_409(daemons):
    """simulate needs {"action"} (else 400) and a running worker (else 409 not_running)."""
    d = started(daemons, "acme")
    assert d.post("acme", "simulate", {"nothing": 1}).status == 400
    for action in ("scan", "crash"):
        response = d.simulate("acme", action)
        assert response.status == 409 and error_code(response) == "not_running"


COMPANY_ROUTES = [
    ("GET", ""), ("PUT", ""), ("DELETE", ""), ("POST", "/connect"), ("GET", "/qr"),
    ("POST", "/pair-code"), ("POST", "/logout"), ("POST", "/restart"), ("POST", "/simulate"),
]
BAD_IDS = ["..%2Fx", "%2E%2E", "x%2F..%2F..%2Fstate", "A", "Acme", "a" * 65, "-x", "_x", "a.b", "a%20b",
           "%00", "caf%C3%A9"]


def test_invalid_company_ids_are_400_on_every_route_and_touch_nothing(daemons, tmp_path):
    """Bad ids are 400 invalid_company_id on every company route, and no file changes anywhere."""
    d = started(daemons, "acme")
    d.pair("acme")
    (tmp_path / "x").mkdir()
    (tmp_path / "d0" / "state" / "x").mkdir()
    before = settled_tree_state(tmp_path, exclude=[d.log_path])  # what pairing set off is written
    for bad in BAD_IDS:
        for method, suffix in COMPANY_ROUTES:
            body = {"phone": "5511999999999", "action": "scan", "engine": "simulator"}
            response = d.client.request(method, f"/v1/companies/{bad}{suffix}", body=body)
            assert response.status == 400, (method, bad, suffix, response.body)
            assert error_code(response) == "invalid_company_id", (method, bad, suffix)
    assert tree_state(tmp_path, exclude=[d.log_path]) == before
    assert d.snapshot("acme")["state"] == "connected"
    assert list(d.companies()) == ["acme"]


def test_an_empty_company_id_matches_no_route(daemons):
    """An empty company id reaches no handler: 404 (no such route)."""
    d = started(daemons, "acme")
    for method, suffix in COMPANY_ROUTES:
        response = d.client.request(method, f"/v1/companies/{suffix}")
        if suffix == "":  # "/v1/companies/" is not "/v1/companies"
            assert response.status == 404, (method, response.body)
        else:
            assert response.status in (404, 405), (method, suffix, response.body)


def test_unknown_company_is_404_company_not_found_on_every_route(daemons, tmp_path):
    """An unknown valid id is 404 company_not_found on every route but PUT; no dir appears."""
    d = started(daemons, "acme")
    for method, suffix in COMPANY_ROUTES:
        if method == "PUT":
            continue
        response = d.client.request(method, f"/v1/companies/ghost{suffix}",
                                    body={"phone": "5511999999999", "action": "scan"})
        assert response.status == 404, (method, suffix, response.body)
        assert error_code(response) == "company_not_found"
    assert not d.session_dir("ghost").exists()


# ---------------------------------------------------------------------------- status line


def test_status_line_summarises_the_states_through_the_notify_socket(daemons, tmp_path):
    """STATUS= counts connected companies, names the others' states, and follows changes."""
    notify = NotifySocket(tmp_path / "notify.sock")
    try:
        d = daemons(sim_config("acme", "bob"), notify=notify)
        d.start()
        notify.wait_for("READY", "1")
        notify.wait_for("STATUS", "0/2 connected")
        d.pair("acme")
        notify.wait_for("STATUS", "1/2 connected")
        d.connect_pairing("bob")
        notify.wait_for("STATUS", "1/2 connected; bob pairing")
        d.simulate("acme", "drop")
        notify.wait_for("STATUS", "0/2 connected; acme reconnecting, bob pairing")
        d.simulate("acme", "restore")
        index = notify.wait_for("STATUS", "1/2 connected; bob pairing",
                                after=notify.wait_for("STATUS", "0/2 connected; acme reconnecting, bob pairing") + 1)
        d.simulate("bob", "scan")
        notify.wait_for("STATUS", "2/2 connected", after=index + 1)
    finally:
        notify.close()


def test_status_line_shows_the_retry_countdown(daemons, tmp_path):
    """A company waiting to retry shows in STATUS= as `acme reconnecting (retry in Ns)`."""
    notify = NotifySocket(tmp_path / "notify.sock")
    failing = tmp_path / "fail-acme"
    try:
        # Every retry fails while the file exists, so some drawn delay is long enough to show
        # (STATUS= is sent at most once a second, and refreshed each second while waiting).
        d = daemons(sim_config("acme", reconnect={"initial_delay": "5s", "max_delay": "5s"}), notify=notify,
                    env={"WHATSAPPD_SIM_FAIL_CONNECT_FILE": str(failing)})
        d.start()
        d.pair("acme")
        index = notify.wait_for("STATUS", "1/1 connected")
        failing.touch()
        d.simulate("acme", "crash")
        wait_until(lambda: any(re.fullmatch(r"0/1 connected; acme reconnecting \(retry in [0-5]s\)", text)
                               for text in _statuses(notify, index)), 30)
    finally:
        notify.close()


def _statuses(notify: NotifySocket, after: int) -> list[str]:
    notify.collect(0.1)
    return [fields["STATUS"] for _, fields in notify.received[after:] if "STATUS" in fields]


def test_a_worker_stuck_reconnecting_is_restarted(daemons):
    """`reconnecting` reported by the worker for longer than stuck_reconnecting_after: a fresh worker."""
    d = started(daemons, "acme", workers={"stuck_reconnecting_after": "2s"})
    pid = d.pair("acme")["worker"]["pid"]
    assert d.simulate("acme", "drop", reason="keep-alive timeout").status == 200
    d.wait_state("acme", "reconnecting")
    snap = d.wait_state("acme", "connected", timeout=15, check=lambda s: s["worker"]["pid"] != pid)
    assert snap["worker"]["restarts"] == 1
    assert d.log_lines("killing worker", company="acme", reason="keepalive")
    assert process_gone(pid)


def test_an_engine_error_about_the_request_is_400_and_about_the_state_409(daemons):
    """simulate with an unknown action is 400 (the request); scan when not pairing is 409 (the state)."""
    d = started(daemons, "acme")
    d.pair("acme")
    unknown = d.simulate("acme", "no-such-action")
    assert unknown.status == 400 and error_code(unknown) == "unknown_action"
    not_pairing = d.simulate("acme", "scan")
    assert not_pairing.status == 409 and error_code(not_pairing) == "not_pairing"


@pytest.mark.slow
def test_reconnects_after_a_network_loss_are_paced_by_the_global_connect_rate(daemons):
    """Six companies dropped at once reconnect in their own workers at no more than connect_rate."""
    ids = [f"c{i}" for i in range(6)]
    rate = 2.0
    d = started(daemons, *ids, reconnect={"connect_rate": rate})
    pids = {cid: d.pair(cid)["worker"]["pid"] for cid in ids}
    time.sleep(1.5)  # the bucket is full again (one token)
    mark = d.log_mark()
    answers = at_once([lambda cid=cid: d.simulate(cid, "drop", down=False).status for cid in ids])
    assert answers == [200] * len(ids)
    for cid in ids:
        d.wait_state(cid, "connected", timeout=20, check=lambda s, cid=cid: s["worker"]["pid"] == pids[cid])
    attempts = sorted(parse_iso(e["timestamp"]) for e in d.log_lines("connection attempt", mark, kind="reconnect"))
    assert len(attempts) == len(ids)
    # In any span of time, a token bucket of burst 1 lets through 1 + rate * span attempts at
    # the most; 0.25 s allows for a grant's trip to the worker and the log's clock.
    for i, first in enumerate(attempts):
        for j in range(i + 1, len(attempts)):
            assert j - i + 1 <= 1 + rate * (attempts[j] - first + 0.25), attempts
    assert not d.log_lines("worker started", mark)  # reconnected by the library, not by restarts
