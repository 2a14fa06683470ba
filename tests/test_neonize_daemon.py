"""The real neonize engine under the real daemon, pointed at a fault-injecting SOCKS5 listener.

Nothing leaves the machine: every neonize company has `proxy = "socks5://127.0.0.1:PORT"`, a
local listener that never forwards anything, and the listener's log shows every destination
the client asked for.
"""

from __future__ import annotations

import shutil
import time

import pytest

from whatsappd.testing.daemon import wait_until
from whatsappd.testing.scenario import SimDaemon, process_gone
from whatsappd.testing.socks5 import Socks5FaultProxy

pytestmark = [pytest.mark.neonize, pytest.mark.slow]

WHATSAPP = ("web.whatsapp.com", 443)


def _config(proxy: Socks5FaultProxy, **reconnect: str) -> str:
    settings = {"initial_delay": '"200ms"', "max_delay": '"1s"', **{k: f'"{v}"' for k, v in reconnect.items()}}
    return ("[reconnect]\n" + "".join(f"{k} = {v}\n" for k, v in settings.items())
            + f'[[companies]]\nid = "real"\nengine = "neonize"\nproxy = "{proxy.url}"\n')


def _retries(daemon: SimDaemon) -> list[dict]:
    return [line for line in daemon.log_lines("state changed", company="real") if line.get("new") == "reconnecting"]


@pytest.mark.parametrize("mode", ["refuse", "close"])
def test_a_failing_proxy_puts_the_company_in_reconnecting_with_growing_jittered_capped_delays(daemons, mode):
    """Refused or closed by the proxy: `reconnecting`, attempts grow, delays jittered under the cap."""
    with Socks5FaultProxy(mode=mode) as proxy:
        d = daemons(_config(proxy))
        d.start()
        assert d.post("real", "connect").status == 202
        wait_until(lambda: len(_retries(d)) >= 5, 40, what="five failed attempts")
        snap = d.snapshot("real")
        assert snap["state"] in ("reconnecting", "starting", "connecting")
        assert snap["last_error"]["code"] == "connection_failed"
        retries = _retries(d)[:5]
        attempts = [r["attempt"] for r in retries]
        assert attempts == list(range(attempts[0], attempts[0] + 5))  # one more each time
        delays = [r["retry_in_seconds"] for r in retries]
        caps = [min(1.0, 0.2 * 2 ** (a - 1)) for a in attempts]
        assert all(0 <= delay <= cap for delay, cap in zip(delays, caps, strict=True)), (delays, caps)
        assert len(set(delays)) > 1  # drawn, not fixed
        exits = d.log_lines("worker exited", company="real")
        assert exits and all(e["exit_code"] == 10 for e in exits)  # transient, never a crash
        assert proxy.requests and set(proxy.requests) == {WHATSAPP}
        assert d.stop() == 0


def test_a_silent_proxy_is_abandoned_at_the_connect_deadline_and_retried(daemons):
    """A proxy that accepts and never answers: the worker is killed at connect_timeout, then retried."""
    with Socks5FaultProxy(mode="silent") as proxy:
        d = daemons(_config(proxy, connect_timeout="2s"))
        d.start()
        first = d.post("real", "connect").json()["worker"]["pid"]
        snap = d.wait_state("real", "reconnecting", timeout=15, check=lambda s: s["last_error"])
        assert snap["last_error"]["code"] == "connect_timeout"
        assert d.log_lines("killing worker", company="real", reason="connect_timeout")
        d.wait_state("real", "starting", "connecting", "reconnecting", timeout=10,
                     check=lambda s: s["worker"]["pid"] not in (None, first))
        assert proxy.wait_for_connections(2, timeout=10)  # the new worker dials through it too
        assert d.stop() == 0


def test_a_session_directory_deleted_under_a_dialing_worker_ends_it_and_is_not_recreated(daemons):
    """rm -rf of the session while the real client dials: worker ended, `logged_out` (session_deleted), nothing re-created."""
    with Socks5FaultProxy(mode="stall") as proxy:
        d = daemons(_config(proxy, connect_timeout="60s"))
        d.start()
        pid = d.post("real", "connect").json()["worker"]["pid"]
        session = d.session_dir("real")
        wait_until(lambda: proxy.requests and (session / "store.db").exists(), 15, what="the client to dial")
        mark = d.log_mark()
        shutil.rmtree(session)
        snap = d.wait_state("real", "logged_out", timeout=10)
        assert snap["reason"] == "session_deleted" and snap["worker"]["pid"] is None, snap
        assert d.log_lines("worker exited", mark, company="real", exit_code=18)
        assert process_gone(pid)
        time.sleep(1.5)
        assert not session.exists()
        assert d.stop() == 0


def test_a_neonize_company_without_a_proxy_dials_nothing_off_loopback_under_the_test_suite(daemons):
    """WHATSAPPD_LOOPBACK_ONLY (set for every test): a company with no proxy is refused by the relay, never dialed."""
    d = daemons("[reconnect]\ninitial_delay = \"200ms\"\nmax_delay = \"1s\"\n"
                "[[companies]]\nid = \"real\"\nengine = \"neonize\"\n")
    d.start()
    assert d.post("real", "connect").status == 202
    wait_until(lambda: d.log_lines("relay_refused", company="real"), 40, what="the relay's refusal")
    refused = d.log_lines("relay_refused", company="real")[0]
    assert refused["reply"] == 2 and "not a loopback address" in refused["reason"]
    assert refused["destination"] == "web.whatsapp.com:443"
    assert d.snapshot("real")["state"] != "connected"
