"""systemd integration: the notify protocol, the watchdog interval and socket activation.

Everything here is a no-op without systemd, so the daemon code calls it unconditionally.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
from collections.abc import MutableMapping

import sdnotify

__all__ = ["SD_LISTEN_FDS_START", "Notifier", "listen_sockets", "scrub_environment", "watchdog_interval"]

SD_LISTEN_FDS_START = 3
STATUS_INTERVAL = 1.0  # seconds between two STATUS= updates at most
SEND_TIMEOUT = 1.0  # seconds a notification may wait for room in the notify socket

#: Variables that belong to this process alone: a worker subprocess must never inherit them
#: (it would notify systemd in our name, or believe it was socket-activated).
_PRIVATE_VARS = ("NOTIFY_SOCKET", "LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES", "WATCHDOG_USEC", "WATCHDOG_PID")


class Notifier:
    """Sends sd_notify messages. Without NOTIFY_SOCKET it does nothing."""

    def __init__(self, env: MutableMapping[str, str] | None = None) -> None:
        env = os.environ if env is None else env
        self.enabled = bool(env.get("NOTIFY_SOCKET"))
        # sdnotify reads NOTIFY_SOCKET itself (and handles abstract '@' addresses).
        self._notifier = sdnotify.SystemdNotifier() if self.enabled else None
        if self._notifier is not None and self._notifier.socket is not None:
            # Never let a notify socket nobody drains freeze the event loop: a datagram that
            # cannot be queued within this is dropped (sdnotify swallows the error).
            self._notifier.socket.settimeout(SEND_TIMEOUT)
        self._last_status: str | None = None
        self._pending_status: str | None = None
        self._status_sent_at = 0.0
        self._status_timer: asyncio.TimerHandle | None = None

    def send(self, *fields: str) -> None:
        if self._notifier is not None:
            self._notifier.notify("\n".join(fields))

    def ready(self, status: str) -> None:
        self._cancel_status()
        self._last_status = status
        self._status_sent_at = time.monotonic()
        self.send("READY=1", f"STATUS={status}")

    def status(self, status: str) -> None:
        """Send STATUS= when it changes, at most once per STATUS_INTERVAL (the last one wins).

        A hundred companies connecting change the summary hundreds of times in a few seconds;
        systemd needs only the latest.
        """
        status = status.replace("\n", " ")
        self._pending_status = status
        if self._status_timer is not None:
            return
        wait = self._status_sent_at + STATUS_INTERVAL - time.monotonic()
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            wait = 0.0
            loop = None
        if wait > 0 and loop is not None:
            self._status_timer = loop.call_later(wait, self._flush_status)
        else:
            self._flush_status()

    def _flush_status(self) -> None:
        self._status_timer = None
        status, self._pending_status = self._pending_status, None
        if status is not None and status != self._last_status:
            self._last_status = status
            self._status_sent_at = time.monotonic()
            self.send(f"STATUS={status}")

    def reloading(self) -> None:
        # MONOTONIC_USEC is what Type=notify-reload (systemd 253+) expects; older ones ignore it.
        now_us = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        self._last_status = "reloading configuration"
        self.send("RELOADING=1", f"MONOTONIC_USEC={now_us}", "STATUS=reloading configuration")

    def stopping(self) -> None:
        self._cancel_status()
        self._last_status = "stopping"
        self.send("STOPPING=1", "STATUS=stopping")

    def _cancel_status(self) -> None:
        if self._status_timer is not None:
            self._status_timer.cancel()
            self._status_timer = None
        self._pending_status = None

    def watchdog(self) -> None:
        self.send("WATCHDOG=1")


def watchdog_interval(env: MutableMapping[str, str] | None = None, pid: int | None = None) -> float | None:
    """Seconds between WATCHDOG=1 pings (half of WATCHDOG_USEC), or None if not asked for.

    WATCHDOG_PID, when set, names the process that must ping: if it is not us, we don't.
    """
    env = os.environ if env is None else env
    pid = os.getpid() if pid is None else pid
    usec = env.get("WATCHDOG_USEC", "")
    if not usec.isdigit() or int(usec) == 0:
        return None
    wd_pid = env.get("WATCHDOG_PID", "")
    if wd_pid and (not wd_pid.isdigit() or int(wd_pid) != pid):
        return None
    return int(usec) / 2_000_000


def listen_sockets(env: MutableMapping[str, str] | None = None, pid: int | None = None) -> list[socket.socket]:
    """The sockets systemd passed us (LISTEN_FDS for our pid), then unset the variables.

    Unsetting them (as sd_listen_fds(unset_environment=1) does) keeps them out of children.
    """
    env = os.environ if env is None else env
    pid = os.getpid() if pid is None else pid
    listen_pid, listen_fds = env.get("LISTEN_PID", ""), env.get("LISTEN_FDS", "")
    for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        env.pop(name, None)
    if not listen_pid.isdigit() or int(listen_pid) != pid or not listen_fds.isdigit():
        return []
    sockets = []
    for fd in range(SD_LISTEN_FDS_START, SD_LISTEN_FDS_START + int(listen_fds)):
        os.set_inheritable(fd, False)
        sockets.append(socket.socket(fileno=fd))
    return sockets


def scrub_environment(env: MutableMapping[str, str]) -> dict[str, str]:
    """A copy of env without the variables that are ours alone (for worker subprocesses)."""
    return {k: v for k, v in env.items() if k not in _PRIVATE_VARS}
