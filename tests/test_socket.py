"""The control socket: socket activation (LISTEN_FDS) and binding our own (mode, group, stale, live)."""

from __future__ import annotations

import grp
import os
import signal
import socket
import stat
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from whatsappd.client import Client
from whatsappd.control.socket_file import SocketInUse, SocketSetupError, bind_control_socket
from whatsappd.testing.daemon import DaemonProcess, exec_wrapper


@pytest.fixture
def activation_socket(tmp_path: Path) -> Iterator[socket.socket]:
    """A listening AF_UNIX socket, as whatsappd.socket would hold it for the daemon."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(tmp_path / "activated.sock"))
    sock.listen(16)
    yield sock
    sock.close()


def _activated_daemon(make: Callable[..., DaemonProcess], listener: socket.socket, own: Path) -> DaemonProcess:
    """A daemon handed `listener` as fd 3 with LISTEN_FDS=1 and LISTEN_PID = its own pid; its
    config names `own` as socket_path."""
    return make(
        f'[control]\nsocket_path = "{own}"\n',
        socket_path=Path(listener.getsockname()),  # where the test's client connects
        env={"LISTEN_FDS": "1", "LISTEN_FDNAMES": "control"},
        prefix=exec_wrapper(pid_vars=["LISTEN_PID"], fd=listener.fileno()),
        pass_fds=(listener.fileno(),),
    )


def test_socket_passed_with_listen_fds_is_used(
    daemon_factory: Callable[..., DaemonProcess], activation_socket: socket.socket, tmp_path: Path
) -> None:
    """A socket handed over as fd 3 is served and logged; the configured path is never made; SIGTERM keeps the file."""
    own = tmp_path / "own" / "control.sock"
    handed = Path(activation_socket.getsockname())
    daemon = _activated_daemon(daemon_factory, activation_socket, own).start()

    health = daemon.client.get("/v1/health").json()
    assert health["socket"] == str(handed) and health["pid"] == daemon.pid
    assert not own.exists() and not own.parent.exists()
    assert any(e["event"] == "using the control socket passed by systemd" and e["socket"] == str(handed)
               for e in daemon.log_events())

    assert daemon.stop() == 0
    assert stat.S_ISSOCK(handed.lstat().st_mode), "the daemon removed a socket it did not create"
    assert not own.exists()


def test_connections_queue_on_the_held_socket_across_a_restart(
    daemon_factory: Callable[..., DaemonProcess], activation_socket: socket.socket, tmp_path: Path
) -> None:
    """A client connecting on the held socket between two daemons is answered by the next one, not refused."""
    own = tmp_path / "own.sock"
    first = _activated_daemon(daemon_factory, activation_socket, own).start()
    assert first.stop() == 0

    waiting = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    with waiting:
        waiting.settimeout(20)
        waiting.connect(activation_socket.getsockname())  # no daemon now: queued in the backlog
        waiting.sendall(b"GET /v1/health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        second = _activated_daemon(daemon_factory, activation_socket, own).start(wait=False)
        answer = b""
        while chunk := waiting.recv(65536):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 200 ")
    assert f'"pid": {second.pid}'.encode() in answer
    assert second.stop() == 0


def test_listen_pid_of_another_process_is_ignored(daemon_factory: Callable[..., DaemonProcess]) -> None:
    """LISTEN_FDS meant for another pid: the daemon binds its own configured path instead."""
    daemon = daemon_factory("", env={"LISTEN_PID": "1", "LISTEN_FDS": "1"}).start()
    assert stat.S_ISSOCK(daemon.socket_path.lstat().st_mode)
    assert daemon.client.get("/v1/health").json()["socket"] == str(daemon.socket_path)
    assert not any("passed by systemd" in e["event"] for e in daemon.log_events())
    assert daemon.stop() == 0
    assert not daemon.socket_path.exists()


# ---------------------------------------------------------------------------------------------
# bind_control_socket, in process, on real sockets.


def _other_group() -> tuple[str, int]:
    """A group this process may give a file to: any group as root, else one of its own."""
    if os.geteuid() == 0:
        for name in ("daemon", "adm", "nogroup", "users"):
            try:
                return name, grp.getgrnam(name).gr_gid
            except KeyError:
                continue
    gid = os.getgid()
    return grp.getgrgid(gid).gr_name, gid


@pytest.mark.parametrize("mode", [0o600, 0o660, 0o666])
def test_bound_socket_has_the_configured_mode_and_group(tmp_path: Path, mode: int) -> None:
    """The socket file gets exactly the configured mode and group; the umask is left as it was."""
    name, gid = _other_group()
    path = tmp_path / "run" / "control.sock"
    umask = os.umask(0o022)
    try:
        sock = bind_control_socket(path, mode, name)
        assert os.umask(0o022) == 0o022
    finally:
        os.umask(umask)
    with sock:
        st = path.lstat()
        assert stat.S_ISSOCK(st.st_mode)
        assert stat.S_IMODE(st.st_mode) == mode
        assert st.st_gid == gid
        assert stat.S_IMODE(path.parent.stat().st_mode) == 0o755


def test_stale_socket_file_is_replaced(tmp_path: Path) -> None:
    """A socket file nobody listens on (its daemon died) is replaced by a new one."""
    path = tmp_path / "control.sock"
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(str(path))
    dead.close()
    os.link(path, tmp_path / "old.sock")  # keeps the old inode allocated, so it cannot be reused
    old_inode = path.lstat().st_ino
    with bind_control_socket(path, 0o600) as sock:
        assert path.lstat().st_ino != old_inode
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
            client.connect(str(path))
        assert sock.getsockname() == str(path)


def test_live_socket_is_not_taken_over(tmp_path: Path) -> None:
    """A socket something still accepts on is refused with SocketInUse, and left alone."""
    path = tmp_path / "control.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as live:
        live.bind(str(path))
        live.listen(1)
        inode = path.lstat().st_ino
        with pytest.raises(SocketInUse, match="another whatsappd is already running and answering on"):
            bind_control_socket(path, 0o600)
        assert path.lstat().st_ino == inode


def test_non_socket_file_is_refused(tmp_path: Path) -> None:
    """A regular file at the socket path is never deleted: the error says to remove it or move."""
    path = tmp_path / "control.sock"
    path.write_text("important")
    with pytest.raises(SocketSetupError, match="exists and is not a socket; refusing to replace it"):
        bind_control_socket(path, 0o600)
    assert path.read_text() == "important"


def test_too_long_path_is_refused(tmp_path: Path) -> None:
    """A path longer than a Unix socket address allows gets a clear error, not a truncated socket."""
    path = tmp_path / ("x" * 120) / "control.sock"
    with pytest.raises(SocketSetupError, match="too long for a Unix socket"):
        bind_control_socket(path, 0o600)


def test_unknown_group_is_refused(tmp_path: Path) -> None:
    """A socket group that does not exist fails before anything is bound."""
    path = tmp_path / "control.sock"
    with pytest.raises(SocketSetupError, match="no such group"):
        bind_control_socket(path, 0o600, "no-such-group-whatsappd")
    assert not path.exists()


def test_client_reaches_a_bound_socket(tmp_path: Path) -> None:
    """Sanity of the test client itself against a plain listener: an unanswered socket is a timeout."""
    path = tmp_path / "control.sock"
    with bind_control_socket(path, 0o600), pytest.raises(TimeoutError):
        Client(str(path), timeout=0.2).get("/v1/health")


def test_handed_socket_is_closed_on_exec(daemon_factory: Callable[..., DaemonProcess],
                                         activation_socket: socket.socket, tmp_path: Path) -> None:
    """The daemon keeps fd 3 to itself: it is marked close-on-exec, so workers do not inherit it."""
    daemon = _activated_daemon(daemon_factory, activation_socket, tmp_path / "own.sock").start()
    flags = (Path(f"/proc/{daemon.pid}/fdinfo/3").read_text().split("flags:")[1].split()[0])
    assert int(flags, 8) & os.O_CLOEXEC
    daemon.signal(signal.SIGTERM)
    assert daemon.proc is not None and daemon.proc.wait(15) == 0
