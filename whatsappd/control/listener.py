"""Accepting connections on the control socket: who may hold one, and how many.

A connection's peer credentials (SO_PEERCRED) are read the moment it is accepted. A peer that
may not use the API (control.allowed_uids / allowed_groups), or one beyond
control.max_connections or its uid's control.max_connections_per_uid, never reaches the HTTP
server and never counts against a cap: it gets its 403 or 503 as JSON once its request head
has been read (bounded, with a short deadline), so a client that writes its request before
reading sees the answer instead of a broken pipe. Admitted connections are served by
`_Connection`, which also answers malformed HTTP with a JSON 400 and one warning line.
"""

from __future__ import annotations

import asyncio
import collections
import json
import socket
from collections.abc import Callable
from http import HTTPStatus
from typing import Any

from aiohttp import web

from whatsappd.config import Config
from whatsappd.control.peers import PeerCred, admits, forbidden, peer_of
from whatsappd.errors import ApiError, ErrorCode
from whatsappd.logs import get_logger

__all__ = ["CappedSockSite"]

log = get_logger()

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
