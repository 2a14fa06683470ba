"""Binding the control socket file ourselves, when systemd did not hand one over.

The socket file is created under a umask that makes it owner-only, then given its group, then
its configured mode: it is never, even for an instant, looser than configured. A socket file
left by a dead daemon is replaced; one that a live daemon answers on is not.
"""

from __future__ import annotations

import errno
import grp
import os
import socket
import stat
from pathlib import Path

__all__ = ["SocketInUse", "SocketSetupError", "bind_control_socket"]


class SocketSetupError(Exception):
    """The control socket cannot be set up; the message says why and what to do."""


class SocketInUse(SocketSetupError):
    """Another live daemon answers on the socket."""


def _probe_live(path: Path) -> bool:
    """True if something accepts connections on the socket file at path."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(str(path))
    except OSError as exc:
        if exc.errno in (errno.ECONNREFUSED, errno.ENOENT):
            return False
        if isinstance(exc, TimeoutError) or exc.errno == errno.EAGAIN:
            return True  # the backlog is full: something is listening
        raise SocketSetupError(f"cannot check whether {path} is in use: {exc.strerror}") from exc
    else:
        return True
    finally:
        probe.close()


def bind_control_socket(path: Path, mode: int, group: str = "", backlog: int = 128) -> socket.socket:
    """Create, bind and listen on a Unix stream socket at path with the given mode and group."""
    parent = path.parent
    try:
        # The directory is only created if missing (systemd's RuntimeDirectory= makes it otherwise);
        # 0755 lets members of the socket's group reach the socket, whose own mode decides.
        parent.mkdir(mode=0o755, parents=True, exist_ok=True)
    except OSError as exc:
        raise SocketSetupError(
            f"cannot create the socket directory {parent}: {exc.strerror}; "
            "create it or set control.socket_path to a writable place"
        ) from exc
    if len(os.fsencode(path)) >= 108:
        raise SocketSetupError(f"the socket path {path} is too long for a Unix socket (107 bytes at most)")

    try:
        st = path.lstat()
    except FileNotFoundError:
        st = None
    if st is not None:
        if not stat.S_ISSOCK(st.st_mode):
            raise SocketSetupError(
                f"{path} exists and is not a socket; refusing to replace it. Remove it or choose "
                "another control.socket_path"
            )
        if _probe_live(path):
            raise SocketInUse(
                f"another whatsappd is already running and answering on {path}; stop it first "
                "(systemctl stop whatsappd) or give this one another control.socket_path"
            )
        path.unlink()  # stale: its daemon died without removing it

    gid = -1
    if group:
        try:
            gid = grp.getgrnam(group).gr_gid
        except KeyError as exc:
            raise SocketSetupError(f"control.socket_group {group!r}: no such group") from exc

    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o177)  # bind() creates the file 0600 at most
    try:
        sock.bind(str(path))
    except OSError as exc:
        sock.close()
        raise SocketSetupError(f"cannot bind the control socket {path}: {exc.strerror}") from exc
    finally:
        os.umask(old_umask)
    try:
        if gid != -1:
            os.chown(path, -1, gid)
        os.chmod(path, mode)
        sock.listen(backlog)
    except OSError as exc:
        sock.close()
        path.unlink(missing_ok=True)
        raise SocketSetupError(f"cannot set up the control socket {path}: {exc.strerror}") from exc
    sock.setblocking(False)
    return sock
