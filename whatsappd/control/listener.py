"""The control socket: binding it ourselves (when systemd did not hand one over), and who may
hold a connection on it.

Binding: the socket file is created under a umask that makes it owner-only, then given its
group, then its configured mode: it is never, even for an instant, looser than configured. A
socket file left by a dead daemon is replaced; one that a live daemon answers on is not.

Accepting: a connection's peer credentials (SO_PEERCRED) are read the moment it is accepted. A
peer that may not use the API (control.allowed_uids / allowed_groups), or one beyond
control.max_connections or its uid's control.max_connections_per_uid, never reaches the HTTP
server and never counts against a cap: it gets its 403 or 503 as JSON once its request head
has been read (bounded, with a short deadline), so a client that writes its request before
reading sees the answer instead of a broken pipe. Admitted connections are served by
`_Connection`, which also answers malformed HTTP with a JSON 400 and one warning line.
"""

from __future__ import annotations

import asyncio
import collections
import errno
import grp
import json
import os
import pwd
import socket
import stat
import struct
from collections.abc import Callable
from dataclasses import dataclass
from http import HTTPStatus
from pathlib import Path
from typing import Any

from aiohttp import web

from whatsappd.config import Config
from whatsappd.errors import ApiError, ErrorCode
from whatsappd.logs import get_logger

__all__ = [
    "CappedSockSite", "PeerCred", "SocketInUse", "SocketSetupError", "admits", "bind_control_socket",
    "forbidden", "peer_of",
]

log = get_logger()


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


# ---------------------------------------------------------------------------------------------
# Who is on the other end.


@dataclass(frozen=True)
class PeerCred:
    pid: int
    uid: int
    gid: int

    def fields(self) -> dict[str, int]:
        """How a log line names the peer."""
        return {"peer_pid": self.pid, "peer_uid": self.uid}


def peer_of(transport: asyncio.BaseTransport | None) -> PeerCred | None:
    """SO_PEERCRED of a connection (None on a socket that has no peer credentials)."""
    sock = transport.get_extra_info("socket") if transport is not None else None
    if sock is None or sock.family != socket.AF_UNIX:
        return None
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    except OSError:  # already gone
        return None
    return PeerCred(*struct.unpack("3i", raw))


def _user_groups(uid: int, gid: int) -> set[int]:
    try:
        entry = pwd.getpwuid(uid)
    except KeyError:
        return {gid}
    return {gid, *os.getgrouplist(entry.pw_name, entry.pw_gid)}


def admits(config: Config, cred: PeerCred | None) -> bool:
    """Whether control.allowed_uids / allowed_groups let this peer use the API."""
    uids, gids = config.control_allowed_uids, config.control_allowed_groups
    if not uids and not gids:
        return True  # the socket file's mode and group are the only gate
    if cred is None:
        return False
    if cred.uid in (0, os.getuid()) or cred.uid in uids:
        return True
    return bool(gids) and not _user_groups(cred.uid, cred.gid).isdisjoint(gids)


def forbidden(cred: PeerCred | None) -> ApiError:
    return ApiError(ErrorCode.FORBIDDEN, f"uid {cred.uid if cred else '?'} may not use this API; add it to "
                    "control.allowed_uids or one of its groups to control.allowed_groups")


# ---------------------------------------------------------------------------------------------
# Accepting connections.

#: How long a refused connection may take to send its request head before it is answered and
#: closed anyway (at most control.idle_timeout), and how much of the head is read.
_REFUSAL_GRACE = 2.0
_REFUSAL_HEAD_LIMIT = 64 * 1024
#: Refused connections waiting for their request head at most (or max_connections if more);
#: past that, a refused connection is answered at once.
_REFUSALS_WAITING = 64


def _http_error(error: ApiError) -> bytes:
    """A complete HTTP/1.1 response carrying error's JSON body; the connection closes after it."""
    body = json.dumps(error.body()).encode()
    head = [f"HTTP/1.1 {error.status} {HTTPStatus(error.status).phrase}",
            "Content-Type: application/json; charset=utf-8", "Connection: close",
            f"Content-Length: {len(body)}"]
    if error.status == 503:
        head.append("Retry-After: 1")
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


def _request_line(head: bytes) -> dict[str, str]:
    """Method and path of a request head, for the log line (nothing when it has none)."""
    parts = head.split(b"\r\n", 1)[0].split(b" ")
    if len(parts) != 3 or not parts[2].startswith(b"HTTP/"):
        return {}
    method, path = (p.decode("latin-1")[:200] for p in parts[:2])
    return {"method": method, "path": path} if method.isalpha() and path.isprintable() else {}


class _Refusal(asyncio.Protocol):
    """One refused connection: reads the request head, answers the error, drains, closes.

    Closing without reading (what the cap did before) left many clients with a broken pipe on
    their write instead of the answer. After answering, our side is shut down for writing and
    what the client still sends is read and dropped until it closes or the grace ends.
    """

    def __init__(self, error: ApiError, event: str, fields: dict[str, Any], grace: float,
                 done: Callable[[_Refusal], None]) -> None:
        self._error, self._event, self._fields, self._grace, self._done = error, event, fields, grace, done
        self._head = b""
        self._answered = False
        self._transport: asyncio.Transport | None = None
        self._timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        self._timer = asyncio.get_running_loop().call_later(self._grace, self.close)

    def data_received(self, data: bytes) -> None:
        if self._answered:
            return  # the rest of the request: dropped
        self._head += data
        if b"\r\n\r\n" in self._head or len(self._head) >= _REFUSAL_HEAD_LIMIT:
            self._answer()

    def eof_received(self) -> bool:
        self._answer()
        return False  # the transport closes itself once the answer is written

    def close(self) -> None:
        """Answer (if not done yet) and close."""
        self._answer()
        if self._transport is not None:
            self._transport.close()

    def _answer(self) -> None:
        if self._answered or self._transport is None:
            return
        self._answered = True
        log.warning(self._event, **self._fields, **_request_line(self._head))
        self._head = b""
        self._transport.write(_http_error(self._error))
        if self._transport.can_write_eof():
            self._transport.write_eof()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._done(self)


class _Connection(web.RequestHandler):
    """aiohttp's HTTP protocol for one admitted connection: knows its peer, tells the site when
    it ends, and answers what aiohttp cannot parse the API's way (JSON, one warning line)."""

    def __init__(self, manager: web.Server, peer: PeerCred | None, ended: Callable[[_Connection], None],
                 **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self.peer = peer
        self._ended = ended

    def connection_lost(self, exc: BaseException | None) -> None:
        try:
            super().connection_lost(exc)
        finally:
            self._ended(self)

    def handle_error(self, request: web.BaseRequest, status: int = 500, exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        """The answer to a request aiohttp could not parse (400) or whose handler failed (500)."""
        if request.writer.output_size > 0:  # as aiohttp does: the answer has begun, nothing to add
            raise ConnectionError("the response has been sent in part; it cannot become an error")
        who = self.peer.fields() if self.peer else {}
        if status >= 500:
            # Only a bug gets here (the API's own middleware answers every handler error).
            log.error("request failed", exc_info=exc, **who)
            error = ApiError(ErrorCode.INTERNAL_ERROR, "internal error; see the daemon's log")
        else:
            # A client's malformed request: one line, no traceback, so no client can flood the log.
            text = (message or str(exc) or "malformed request").strip().split("\n", 1)[0]
            reason = text.split(": b'", 1)[0].rstrip(":. ")[:200]
            log.warning("malformed HTTP request refused", reason=reason, **who)
            error = ApiError(ErrorCode.BAD_REQUEST, f"the request is not valid HTTP/1.1: {reason}")
        response = web.json_response(error.body(), status=error.status)
        response.force_close()
        return response


class _Gate(asyncio.Protocol):
    """What a new connection starts as: admit() hands the transport to its real protocol."""

    def __init__(self, admit: Callable[[asyncio.Transport], None]) -> None:
        self._admit = admit

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._admit(transport)


class CappedSockSite(web.SockSite):
    """The control socket's site: admits a connection only if its peer may use the API and is
    within control.max_connections and control.max_connections_per_uid (aiohttp checks none)."""

    def __init__(self, runner: web.BaseRunner, sock: socket.socket, config: Callable[[], Config], **kw: Any) -> None:
        super().__init__(runner, sock, **kw)
        self._config = config  # the running configuration (allowed_uids and groups are reloadable)
        self._open: dict[_Connection, int] = {}  # admitted connection -> its peer's uid (-1: unknown)
        self._per_uid: collections.Counter[int] = collections.Counter()
        self._refusals: set[_Refusal] = set()

    async def start(self) -> None:
        await web.BaseSite.start(self)  # registers the site with its runner
        self._server = await asyncio.get_running_loop().create_unix_server(
            lambda: _Gate(self._admit), sock=self._sock, backlog=self._backlog)

    async def stop(self) -> None:
        await super().stop()
        for refusal in list(self._refusals):
            refusal.close()

    def _admit(self, transport: asyncio.Transport) -> None:
        config = self._config()
        peer = peer_of(transport)
        who = peer.fields() if peer else {}
        uid = peer.uid if peer else -1
        if not admits(config, peer):
            self._refuse(transport, forbidden(peer), "request refused: peer not allowed", who)
        elif len(self._open) >= config.control_max_connections:
            self._refuse(transport, ApiError(
                ErrorCode.TOO_MANY_CONNECTIONS,
                "the daemon has reached control.max_connections open connections; retry shortly"),
                "connection refused: too many open connections", {"limit": config.control_max_connections, **who})
        elif self._per_uid[uid] >= config.control_max_connections_per_uid:
            self._refuse(transport, ApiError(
                ErrorCode.TOO_MANY_CONNECTIONS,
                f"uid {uid} has reached control.max_connections_per_uid "
                f"({config.control_max_connections_per_uid}) open connections; close some or retry shortly"),
                "connection refused: too many open connections for one uid",
                {"limit": config.control_max_connections_per_uid, **who})
        else:
            server = self._runner.server
            assert server is not None
            # server._kwargs: what aiohttp's own Server() passes each RequestHandler (timeouts, limits).
            handler = _Connection(server, peer, self._ended, loop=asyncio.get_running_loop(), **server._kwargs)
            self._open[handler] = uid
            self._per_uid[uid] += 1
            transport.set_protocol(handler)
            handler.connection_made(transport)

    def _ended(self, handler: _Connection) -> None:
        uid = self._open.pop(handler, None)
        if uid is not None:
            self._per_uid[uid] -= 1
            if self._per_uid[uid] <= 0:
                del self._per_uid[uid]

    def _refuse(self, transport: asyncio.Transport, error: ApiError, event: str, fields: dict[str, Any]) -> None:
        # Refused connections hold no slot, but each is an open file until answered: past a
        # bound, a new one is answered at once instead of waiting for its request.
        config = self._config()
        waiting = max(_REFUSALS_WAITING, config.control_max_connections)
        grace = min(_REFUSAL_GRACE, config.control_idle_timeout) if len(self._refusals) < waiting else 0.0
        refusal = _Refusal(error, event, fields, grace, self._refusals.discard)
        self._refusals.add(refusal)
        transport.set_protocol(refusal)
        refusal.connection_made(transport)
