"""`whatsappd run --daemonize --pidfile P`: detach, pid file locked, one instance, clean stop."""

from __future__ import annotations

import fcntl
import json
import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from whatsappd.cli import PidFile
from whatsappd.client import Client, DaemonUnavailable
from whatsappd.testing.daemon import clean_env, wait_until, whatsappd_command


def _alive(pid: int) -> bool:
    """True while pid runs (a zombie nobody reaped yet counts as gone)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state not in ("Z", "X")


class Detached:
    """Paths of one daemonized instance; kills what it started if a test leaves it running."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.pidfile = root / "whatsappd.pid"
        self.log = root / "whatsappd.log"
        self.socket = root / "run" / "control.sock"
        self.config = root / "whatsappd.toml"
        self.config.write_text(
            f'[daemon]\nstate_dir = "{root}/state"\nshutdown_timeout = "5s"\n'
            f'[control]\nsocket_path = "{self.socket}"\n'
            '[[companies]]\nid = "acme"\nengine = "simulator"\n'
        )
        self.pids: list[int] = []

    def run(self, *extra: str, config: Path | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*whatsappd_command(), "run", "--daemonize", "--pidfile", str(self.pidfile),
             "--config", str(config or self.config), "--log-file", str(self.log), *extra],
            env=clean_env(), capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL,
        )

    def pid(self) -> int:
        pid = int(self.pidfile.read_text())
        if pid not in self.pids:
            self.pids.append(pid)
        return pid

    def cleanup(self) -> None:
        for pid in self.pids:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)


@pytest.fixture
def detached(tmp_path: Path) -> Iterator[Detached]:
    instance = Detached(tmp_path)
    yield instance
    instance.cleanup()


def test_daemonize_detaches_writes_and_locks_the_pidfile(detached: Detached) -> None:
    """--daemonize returns at once; pid file written and locked; a second instance exits 1; SIGTERM cleans up."""
    result = detached.run()
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip() == (f"whatsappd: detaching; logs go to {detached.log}, "
                                     f"pid file {detached.pidfile}")

    client = Client(str(detached.socket), timeout=5)
    wait_until(lambda: detached.pidfile.exists() and detached.pidfile.read_text().strip().isdigit(),
               timeout=15, what="the pid file")
    pid = detached.pid()
    health = wait_until(lambda: _health(client), timeout=15, what="the detached daemon to answer")
    assert health["pid"] == pid
    assert os.getsid(pid) != os.getsid(0)  # in a session of its own: detached from our terminal
    assert Path(f"/proc/{pid}/cwd").resolve() == Path("/")

    # The pid file is locked for the daemon's life.
    fd = os.open(detached.pidfile, os.O_RDONLY)
    try:
        with pytest.raises(BlockingIOError):
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    finally:
        os.close(fd)
    assert PidFile(detached.pidfile).holder() == pid

    # A second instance with the same pid file is refused before doing anything.
    second = detached.run()
    assert second.returncode == 1
    assert second.stderr.strip() == (f"whatsappd: already running (pid {pid} holds {detached.pidfile}); "
                                     "not starting a second instance")
    assert _health(client)["pid"] == pid

    # Logs went to the log file, as JSON lines (not a terminal, not the journal).
    def ready_line() -> dict[str, Any] | None:  # the socket answers before the daemon has finished starting
        for line in detached.log.read_text().splitlines():
            if '"whatsappd ready"' in line and line.endswith("}"):  # a whole line, not one being written
                event: dict[str, Any] = json.loads(line)
                return event
        return None

    ready = wait_until(ready_line, timeout=10, what="the ready line")
    assert ready["pid"] == pid and ready["socket"] == str(detached.socket)

    os.kill(pid, signal.SIGTERM)
    wait_until(lambda: not _alive(pid), timeout=15, what="the daemon to stop")
    assert not detached.pidfile.exists()
    assert not detached.socket.exists()
    assert any(json.loads(line)["event"] == "stopped" for line in detached.log.read_text().splitlines())


def test_daemonize_needs_a_pidfile(tmp_path: Path) -> None:
    """--daemonize without --pidfile is a usage error (exit 2) and nothing starts."""
    config = tmp_path / "c.toml"
    config.write_text(f'[daemon]\nstate_dir = "{tmp_path}/state"\n[control]\nsocket_path = "{tmp_path}/c.sock"\n')
    result = subprocess.run([*whatsappd_command(), "run", "--daemonize", "--config", str(config)],
                            env=clean_env(), capture_output=True, text=True, timeout=30)
    assert result.returncode == 2 and "--daemonize needs --pidfile PATH" in result.stderr
    assert not (tmp_path / "state").exists() and not (tmp_path / "c.sock").exists()


def test_daemonize_with_bad_config_exits_78_before_detaching(detached: Detached) -> None:
    """A bad config is reported on the terminal with exit 78, not lost in a detached process."""
    bad = detached.root / "bad.toml"
    bad.write_text("[control]\nmax_connections = 0\n")
    result = detached.run(config=bad)
    assert result.returncode == 78
    assert "control.max_connections = 0" in result.stderr
    assert not detached.pidfile.exists() and not detached.log.exists()


def test_stale_pidfile_does_not_block_a_start(detached: Detached) -> None:
    """A pid file left by a crash (nobody holds its lock) does not stop the next start."""
    detached.pidfile.write_text("999999\n")
    result = detached.run()
    assert result.returncode == 0, result.stderr
    wait_until(lambda: detached.pidfile.exists() and detached.pidfile.read_text().strip() not in ("", "999999"),
               timeout=15, what="the new pid in the pid file")
    pid = detached.pid()
    wait_until(lambda: _health(Client(str(detached.socket), timeout=5)), timeout=15, what="the daemon")
    os.kill(pid, signal.SIGTERM)
    wait_until(lambda: not _alive(pid), timeout=15, what="the daemon to stop")
    assert not detached.pidfile.exists()


def test_foreground_pidfile_refuses_a_second_instance(detached: Detached, tmp_path: Path) -> None:
    """Without --daemonize, --pidfile still locks: a second foreground run exits 1 saying who holds it."""
    fd = os.open(detached.pidfile, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        result = subprocess.run(
            [*whatsappd_command(), "run", "--pidfile", str(detached.pidfile), "--config", str(detached.config)],
            env=clean_env(), capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL,
        )
    finally:
        os.close(fd)
    assert result.returncode == 1
    assert f"another instance holds {detached.pidfile}" in result.stderr
    assert not detached.socket.exists()


def _health(client: Client) -> dict[str, object] | None:
    try:
        response = client.get("/v1/health")
    except (DaemonUnavailable, OSError):  # still starting
        return None
    return response.json() if response.ok else None
