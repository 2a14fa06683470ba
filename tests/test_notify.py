"""The sd_notify protocol, seen from a real NOTIFY_SOCKET bound by the test (no systemd)."""

from __future__ import annotations

import signal
import statistics
from collections.abc import Callable

from whatsappd.client import Client
from whatsappd.systemd import listen_sockets, scrub_environment, watchdog_interval
from whatsappd.testing.daemon import DaemonProcess, NotifySocket, exec_wrapper

COMPANIES = '[[companies]]\nid = "acme"\nengine = "simulator"\n[[companies]]\nid = "beta"\nengine = "simulator"\n'


def test_notify_sequence_ready_watchdog_reload_stop(
    daemon_factory: Callable[..., DaemonProcess], notify: NotifySocket
) -> None:
    """READY+STATUS, WATCHDOG at WATCHDOG_USEC/2, RELOADING then READY on SIGHUP, STOPPING on SIGTERM, in order."""
    daemon = daemon_factory(COMPANIES, notify=notify, env={"WATCHDOG_USEC": "400000"})
    daemon.start(wait=False)

    ready = notify.wait_for("READY", "1")
    # READY is only sent once the control socket accepts: a request made right now succeeds.
    assert Client(str(daemon.socket_path), timeout=5).get("/v1/health").status == 200
    assert notify.received[ready][1]["STATUS"] == "0/2 connected"

    notify.collect(1.3)
    pings = [t for t, fields in notify.received[ready:] if fields.get("WATCHDOG") == "1"]
    assert len(pings) >= 4, notify.keys()
    mean = statistics.mean(b - a for a, b in zip(pings, pings[1:], strict=False))
    assert 0.14 <= mean <= 0.3, f"watchdog pings every {mean:.3f}s, expected about 0.2s"

    mark = len(notify.received)
    daemon.signal(signal.SIGHUP)
    reloading = notify.wait_for("RELOADING", "1", after=mark)
    assert "MONOTONIC_USEC" in notify.received[reloading][1]
    ready_again = notify.wait_for("READY", "1", after=reloading + 1)
    assert notify.received[ready_again][1]["STATUS"] == "0/2 connected"

    daemon.signal(signal.SIGTERM)
    stopping = notify.wait_for("STOPPING", "1", after=ready_again + 1)
    assert daemon.proc is not None and daemon.proc.wait(15) == 0

    # The whole story, watchdog pings left out, in order.
    story = [k for _, fields in notify.received for k in fields if k in ("READY", "RELOADING", "STOPPING")]
    assert story == ["READY", "RELOADING", "READY", "STOPPING"]
    assert ready < reloading < ready_again < stopping


def test_status_line_follows_reload(daemon_factory: Callable[..., DaemonProcess], notify: NotifySocket) -> None:
    """STATUS counts the companies of the configuration in force after a reload."""
    daemon = daemon_factory(COMPANIES, notify=notify)
    daemon.start()
    notify.wait_for("READY", "1")
    assert daemon.config_path is not None
    daemon.config_path.write_text(daemon.config_path.read_text().split("[[companies]]")[0])
    assert daemon.client.post("/v1/reload").status == 200
    last_ready = notify.wait_for("READY", "1", after=notify.wait_for("RELOADING", "1"))
    assert notify.received[last_ready][1]["STATUS"] == "no companies configured"
    assert daemon.stop() == 0


def test_no_watchdog_pings_for_another_pid(daemon_factory: Callable[..., DaemonProcess], notify: NotifySocket) -> None:
    """WATCHDOG_PID naming another process: the daemon does not ping (that process must)."""
    daemon = daemon_factory("", notify=notify, env={"WATCHDOG_USEC": "200000", "WATCHDOG_PID": "1"})
    daemon.start()
    ready = notify.wait_for("READY", "1")
    notify.collect(0.6)
    assert not any("WATCHDOG" in fields for _, fields in notify.received[ready:]), notify.keys()
    assert daemon.stop() == 0


def test_watchdog_pings_when_watchdog_pid_is_ours(
    daemon_factory: Callable[..., DaemonProcess], notify: NotifySocket
) -> None:
    """WATCHDOG_PID naming the daemon itself (as systemd sets it): pings are sent."""
    daemon = daemon_factory("", notify=notify, env={"WATCHDOG_USEC": "200000"},
                            prefix=exec_wrapper(pid_vars=["WATCHDOG_PID"]))
    daemon.start()
    ready = notify.wait_for("READY", "1")
    notify.wait_for("WATCHDOG", "1", after=ready)
    assert daemon.stop() == 0


def test_no_notify_socket_means_no_notifications(daemon_factory: Callable[..., DaemonProcess]) -> None:
    """Without NOTIFY_SOCKET the daemon runs normally and sends nothing anywhere."""
    daemon = daemon_factory("", env={"WATCHDOG_USEC": "200000"})
    daemon.start()
    assert daemon.client.get("/v1/health").ok
    assert daemon.stop() == 0


def test_watchdog_interval_rules() -> None:
    """Half of WATCHDOG_USEC; none when unset, zero, malformed or meant for another pid."""
    assert watchdog_interval({"WATCHDOG_USEC": "30000000"}, pid=10) == 15.0
    assert watchdog_interval({"WATCHDOG_USEC": "400000", "WATCHDOG_PID": "10"}, pid=10) == 0.2
    assert watchdog_interval({"WATCHDOG_USEC": "400000", "WATCHDOG_PID": "11"}, pid=10) is None
    assert watchdog_interval({"WATCHDOG_USEC": "0"}, pid=10) is None
    assert watchdog_interval({"WATCHDOG_USEC": "abc"}, pid=10) is None
    assert watchdog_interval({}, pid=10) is None


def test_listen_sockets_ignores_another_pid_and_unsets_the_variables() -> None:
    """LISTEN_FDS meant for another pid is ignored, and the variables are removed either way."""
    env = {"LISTEN_PID": "1", "LISTEN_FDS": "1", "LISTEN_FDNAMES": "control", "PATH": "/bin"}
    assert listen_sockets(env, pid=2) == []
    assert env == {"PATH": "/bin"}


def test_worker_environment_is_scrubbed() -> None:
    """A worker's environment never carries the variables that are the daemon's alone."""
    env = {"NOTIFY_SOCKET": "/run/n", "LISTEN_PID": "1", "LISTEN_FDS": "1", "LISTEN_FDNAMES": "x",
           "WATCHDOG_USEC": "1", "WATCHDOG_PID": "1", "HOME": "/root"}
    assert scrub_environment(env) == {"HOME": "/root"}
