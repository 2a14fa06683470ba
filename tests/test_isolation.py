"""Crash isolation and process hygiene: one company's trouble never reaches another, no worker
outlives the daemon, and two daemons never run the same credentials.

Real daemons, real worker processes, real signals; liveness is read from /proc.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable

import pytest

from whatsappd import pidlock
from whatsappd.config import LAUNCHERS
from whatsappd.testing.daemon import wait_until
from whatsappd.testing.scenario import SimDaemon, process_gone, process_state, sim_config

COMPANIES = ("acme", "bob", "carol")


def paired_daemon(make: Callable[..., SimDaemon], companies: tuple[str, ...] = COMPANIES,
                  launcher: str = "zygote") -> SimDaemon:
    daemon = make(sim_config(*companies, workers={"launcher": launcher}))
    daemon.start()
    for company in companies:
        daemon.pair(company)
    return daemon


class Watcher:
    """Polls the daemon's companies in a thread and records every snapshot it sees."""

    def __init__(self, daemon: SimDaemon) -> None:
        self.daemon = daemon
        self.seen: list[dict[str, dict]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.seen.append(self.daemon.companies())
            time.sleep(0.02)

    def __enter__(self) -> Watcher:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)


@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_kill_9_of_one_worker_restarts_it_and_the_others_never_notice(daemons, launcher):
    """kill -9 of one worker: it comes back; the others' states and pids never change."""
    d = paired_daemon(daemons, launcher=launcher)
    before = d.companies()
    victim = before["acme"]["worker"]["pid"]
    others = {cid: (before[cid]["state"], before[cid]["worker"]["pid"]) for cid in ("bob", "carol")}
    with Watcher(d) as watcher:
        os.kill(victim, signal.SIGKILL)
        snap = d.wait_state("acme", "connected", check=lambda s: s["worker"]["pid"] not in (None, victim))
        time.sleep(0.5)
    assert snap["worker"]["restarts"] == 1
    assert [e["reason"] for e in d.log_lines("state changed", company="acme", new="reconnecting")] == [
        "worker killed by signal 9"]
    assert process_gone(victim)
    assert len(watcher.seen) > 10
    assert {s["acme"]["state"] for s in watcher.seen} & {"reconnecting", "starting", "connecting"}
    for seen in watcher.seen:
        for cid, (state, pid) in others.items():
            assert (seen[cid]["state"], seen[cid]["worker"]["pid"]) == (state, pid), seen[cid]
            assert seen[cid]["worker"]["restarts"] == 0
    for _, pid in others.values():
        assert not process_gone(pid)
    exits = d.log_lines("worker exited")
    assert [e["company"] for e in exits] == ["acme"] and exits[0]["exit_code"] == -9


@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_a_crash_loop_in_one_company_leaves_the_others_connected(daemons, launcher):
    """One company crash-looping to `failed` never disturbs another company's worker."""
    d = daemons(sim_config("acme", "bob", workers={"crash_limit": 2, "launcher": launcher}))
    d.start()
    d.pair("acme")
    bob = d.pair("bob")["worker"]["pid"]
    with Watcher(d) as watcher:
        pid = None
        for _ in range(2):
            snap = d.wait_state("acme", "connected", check=lambda s, p=pid: s["worker"]["pid"] != p)
            pid = snap["worker"]["pid"]
            d.simulate("acme", "crash")
            wait_until(lambda p=pid: process_gone(p), 5)
        d.wait_state("acme", "failed", timeout=10)
    assert all(s["bob"]["state"] == "connected" and s["bob"]["worker"]["pid"] == bob for s in watcher.seen)


@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_kill_9_of_the_daemon_leaves_no_worker_and_restart_restores_every_company(daemons, launcher):
    """kill -9 of the daemon: no worker survives; the restart restores every company."""
    d = paired_daemon(daemons, launcher=launcher)
    pids = [d.worker_pid(cid) for cid in COMPANIES]
    assert all(pids) and not any(process_gone(p) for p in pids)  # type: ignore[arg-type]
    d.kill()
    wait_until(lambda: all(process_gone(p) for p in pids), 5, what="every worker to die with the daemon")  # type: ignore[arg-type]
    mark = d.log_mark()
    d.start()
    for cid in COMPANIES:
        snap = d.wait_state(cid, "connected")
        assert snap["worker"]["pid"] not in pids
    starts = d.log_lines("worker started", mark)
    assert sorted(e["company"] for e in starts) == sorted(COMPANIES)
    assert {e["mode"] for e in starts} == {"restore"}
    assert not [e for e in d.log_lines("state changed", mark) if e["new"] == "pairing"]


@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_a_session_locked_by_another_process_is_never_shared(daemons, launcher):
    """A session whose lock another process holds gets session_locked, not a second client; once released it connects."""
    d = daemons(sim_config("acme", workers={"launcher": launcher}))
    d.start()
    d.pair("acme")
    d.stop()
    holder = pidlock.acquire(d.session_dir("acme") / "whatsappd.lock")  # a leftover client, say
    try:
        d.start()
        snap = d.wait_state("acme", "failed", timeout=10)
        assert snap["last_error"]["code"] == "session_locked"
        assert "another process" in snap["last_error"]["message"]
        assert d.log_lines("worker exited", company="acme", exit_code=17)
        assert d.session_dir("acme").joinpath("whatsappd.lock").read_text().strip() == str(os.getpid())
    finally:
        os.close(holder)
    assert d.post("acme", "connect").status == 202
    d.wait_state("acme", "connected")


def test_ctrl_c_reaches_the_daemon_only_and_it_stops_its_workers_cleanly(daemons):
    """SIGINT to the daemon's whole process group (Ctrl-C): workers exit 0 by the daemon's stop, not the signal."""
    d = daemons(sim_config(*COMPANIES), start_new_session=True)  # its own group, as in a terminal
    d.start()
    for company in COMPANIES:
        d.pair(company)
    pids = [d.worker_pid(cid) for cid in COMPANIES]
    mark = d.log_mark()
    os.killpg(d.pid, signal.SIGINT)
    assert d.proc is not None and d.proc.wait(20) == 0
    assert all(process_gone(p) for p in pids)  # type: ignore[arg-type]
    assert d.log_lines("stopping", mark, signal="SIGINT")
    exits = d.log_lines("worker exited", mark)
    assert sorted(e["company"] for e in exits) == sorted(COMPANIES)
    assert all(e["exit_code"] == 0 and e["killed"] is None for e in exits), exits
    assert not [e for e in d.log_lines("state changed", mark) if e["new"] != "stopped"]


def test_sigterm_asks_every_worker_to_stop_and_leaves_none_behind(daemons):
    """SIGTERM: every worker exits 0 on request, none is left behind, the daemon exits 0."""
    d = paired_daemon(daemons, (*COMPANIES, "dave"))
    d.simulate("dave", "logged_out")
    d.wait_state("dave", "logged_out")
    d.connect_pairing("dave")  # one company is pairing, the others connected
    pids = [d.worker_pid(cid) for cid in (*COMPANIES, "dave")]
    mark = d.log_mark()
    assert d.stop() == 0
    assert all(process_gone(p) for p in pids)  # type: ignore[arg-type]
    exits = d.log_lines("worker exited", mark)
    assert sorted(e["company"] for e in exits) == sorted((*COMPANIES, "dave"))
    assert all(e["exit_code"] == 0 and e["killed"] is None for e in exits)
    assert not d.log_lines("worker did not stop in time; killing it", mark)


@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_sigterm_kills_a_hung_worker_after_stop_grace(daemons, launcher):
    """SIGTERM with a frozen worker: SIGKILLed after stop_grace; exit 0, nothing left."""
    d = daemons(sim_config("acme", "bob", workers={"heartbeat_timeout": "30s", "stop_grace": "1s",
                                                   "launcher": launcher}))
    d.start()
    hung = d.pair("acme")["worker"]["pid"]
    fine = d.pair("bob")["worker"]["pid"]
    d.simulate("acme", "hang")
    wait_until(lambda: process_state(hung) == "T", 5, what="the worker to be stopped (SIGSTOP)")
    mark = d.log_mark()
    started = time.monotonic()
    assert d.stop() == 0
    assert 0.8 <= time.monotonic() - started < 8
    assert process_gone(hung) and process_gone(fine)
    assert d.log_lines("worker did not stop in time; killing it", mark, pid=hung)
    assert d.log_lines("worker exited", mark, company="bob", exit_code=0)


def test_a_second_sigterm_during_shutdown_exits_at_once(daemons):
    """A second SIGTERM while a hung worker holds up the shutdown kills what is left and exits at once."""
    d = daemons(sim_config("acme", workers={"heartbeat_timeout": "60s", "stop_grace": "30s"},
                           daemon={"shutdown_timeout": "60s"}))
    d.start()
    hung = d.pair("acme")["worker"]["pid"]
    d.simulate("acme", "hang")
    wait_until(lambda: process_state(hung) == "T", 5, what="the worker to be stopped (SIGSTOP)")
    mark = d.log_mark()
    d.signal(signal.SIGTERM)
    wait_until(lambda: d.log_lines("stopping", mark), 5, what="the shutdown to begin")
    time.sleep(0.5)
    assert d.proc is not None and d.proc.poll() is None  # still waiting for the hung worker
    started = time.monotonic()
    d.signal(signal.SIGTERM)
    d.proc.wait(5)
    assert time.monotonic() - started < 3
    assert d.proc.returncode == 1
    assert process_gone(hung)
    assert d.log_lines("forcing shutdown", mark, reason="second signal")
    assert not d.socket_path.exists()


def test_sigterm_while_companies_wait_for_their_turn_to_connect_is_prompt(daemons):
    """Companies queued behind the connect-rate limiter do not hold up a SIGTERM."""
    d = daemons(sim_config(*COMPANIES, "dave", "erin", reconnect={"connect_rate": 50},
                           daemon={"shutdown_timeout": "30s"}))
    d.start()
    for company in (*COMPANIES, "dave", "erin"):
        d.pair(company)
    assert d.stop() == 0
    assert d.config_path is not None
    text = d.config_path.read_text()
    assert "connect_rate = 50" in text
    d.config_path.write_text(text.replace("connect_rate = 50", "connect_rate = 0.2"))
    d.start()  # five sessions to restore at 0.2/s: most wait for the limiter
    time.sleep(0.5)
    started = time.monotonic()
    mark = d.log_mark()
    assert d.stop() == 0
    assert time.monotonic() - started < 5
    assert not d.log_lines("forcing shutdown", mark)
