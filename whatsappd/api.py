"""The control API: HTTP/1.1 with JSON bodies over the Unix control socket (aiohttp).

Cross-cutting rules live in middlewares, in this order: peer credentials (log, allowed_uids /
allowed_groups -> 403), errors (every failure becomes {"error": {...}} with a stable code),
body limit (413 even for handlers that never read the body).
"""

from __future__ import annotations

import asyncio
import json
import os
import pwd
import socket
import struct
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from aiohttp import web

from whatsappd import __version__
from whatsappd.errors import ApiError
from whatsappd.logs import get_logger
from whatsappd.openapi import openapi_document

if TYPE_CHECKING:
    from whatsappd.daemon import Daemon

__all__ = ["CappedSockSite", "PeerCred", "build_app", "peer_credentials"]

log = get_logger()
DAEMON: web.AppKey["Daemon"] = web.AppKey("daemon")
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

_STATUS_CODES = {
    400: "bad_request", 403: "forbidden", 404: "not_found", 405: "method_not_allowed",
    413: "body_too_large", 415: "unsupported_media_type",
}


@dataclass(frozen=True)
class PeerCred:
    pid: int
    uid: int
    gid: int


def peer_credentials(request: web.BaseRequest) -> PeerCred | None:
    """SO_PEERCRED of the connection (None on a socket that has no peer credentials)."""
    transport = request.transport
    sock = transport.get_extra_info("socket") if transport is not None else None
    if sock is None or sock.family != socket.AF_UNIX:
        return None
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return PeerCred(*struct.unpack("3i", raw))


def _user_groups(uid: int, gid: int) -> set[int]:
    try:
        entry = pwd.getpwuid(uid)
    except KeyError:
        return {gid}
    return {gid, *os.getgrouplist(entry.pw_name, entry.pw_gid)}


def _allowed(daemon: Daemon, cred: PeerCred | None) -> bool:
    uids, gids = daemon.config.control_allowed_uids, daemon.config.control_allowed_groups
    if not uids and not gids:
        return True  # the socket file's mode and group are the only gate
    if cred is None:
        return False
    if cred.uid in (0, os.getuid()) or cred.uid in uids:
        return True
    return bool(gids) and not _user_groups(cred.uid, cred.gid).isdisjoint(gids)


@web.middleware
async def _peer_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    daemon = request.app[DAEMON]
    cred = peer_credentials(request)
    started = time.monotonic()
    who = {"peer_pid": cred.pid, "peer_uid": cred.uid} if cred else {}
    if not _allowed(daemon, cred):
        log.warning("request refused: peer not allowed", method=request.method, path=request.path, **who)
        return _error_response(ApiError(
            403, "forbidden",
            f"uid {cred.uid if cred else '?'} may not use this API; add it to control.allowed_uids "
            "or one of its groups to control.allowed_groups",
        ))
    response = await handler(request)
    log.debug("request", method=request.method, path=request.path, status=response.status,
              ms=round((time.monotonic() - started) * 1000, 1), **who)
    return response


def _error_response(error: ApiError) -> web.Response:
    return web.json_response(error.body(), status=error.status)


@web.middleware
async def _error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except ApiError as exc:
        return _error_response(exc)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        code = _STATUS_CODES.get(exc.status, "bad_request")
        message = {
            404: f"no such route: {request.method} {request.path}; see GET /v1/openapi.json",
            405: f"{request.method} is not allowed on {request.path}",
            413: f"the request body is larger than control.max_body_size "
                 f"({request.app[DAEMON].config.control_max_body_size} bytes)",
        }.get(exc.status, exc.text or exc.reason)
        response = _error_response(ApiError(exc.status, code, message))
        for header in ("Allow",):
            if header in exc.headers:
                response.headers[header] = exc.headers[header]
        return response
    except asyncio.CancelledError:
        raise
    except Exception:
        log.exception("request failed", method=request.method, path=request.path)
        return _error_response(ApiError(500, "internal_error", "internal error; see the daemon's log"))


@web.middleware
async def _body_limit_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    if request.can_read_body:
        await request.read()  # raises 413 past client_max_size, whether or not the handler reads
    return await handler(request)


async def read_json(request: web.Request) -> Any:
    """The request's JSON body (an empty body is {})."""
    raw = await request.read()
    if not raw.strip():
        return {}
    if request.content_type not in ("application/json", "application/octet-stream", ""):
        raise ApiError(415, "unsupported_media_type", "send the body as application/json")
    try:
        return json.loads(raw)
    except ValueError as exc:
        raise ApiError(400, "invalid_json", f"the body is not valid JSON: {exc}") from None


# ----------------------------------------------------------------------------------- handlers


async def health(request: web.Request) -> web.Response:
    daemon = request.app[DAEMON]
    return web.json_response(daemon.health())


async def list_companies(request: web.Request) -> web.Response:
    daemon = request.app[DAEMON]
    return web.json_response({"companies": daemon.supervisor.list()})


async def reload(request: web.Request) -> web.Response:
    daemon = request.app[DAEMON]
    await read_json(request)  # no parameters; a malformed body is still an error
    result = await daemon.reload(reason="api")
    if not result["ok"]:
        raise ApiError(
            422, "config_invalid",
            f"the configuration was not reloaded: {result['source']} is invalid; the previous "
            "configuration stays in force",
            source=result["source"], problems=result["problems"],
        )
    return web.json_response(result)


async def openapi(request: web.Request) -> web.Response:
    return web.json_response(openapi_document(__version__))


def build_app(daemon: Daemon) -> web.Application:
    app = web.Application(
        middlewares=[_peer_middleware, _error_middleware, _body_limit_middleware],
        client_max_size=daemon.config.control_max_body_size,
        handler_args={"max_field_size": 16 * 1024, "max_line_size": 16 * 1024},
    )
    app[DAEMON] = daemon
    app.router.add_get("/v1/health", health)
    app.router.add_get("/v1/companies", list_companies)
    app.router.add_post("/v1/reload", reload)
    app.router.add_get("/v1/openapi.json", openapi)
    return app


class _Refuser(asyncio.Protocol):
    """Answers a connection over the cap with 503 and closes it, without reading a request."""

    BODY = (
        b'{"error":{"code":"too_many_connections","message":"the daemon has reached '
        b'control.max_connections open connections; retry shortly"}}'
    )

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.WriteTransport)
        transport.write(
            b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
            b"Connection: close\r\nRetry-After: 1\r\nContent-Length: "
            + str(len(self.BODY)).encode() + b"\r\n\r\n" + self.BODY
        )
        transport.close()


class CappedSockSite(web.SockSite):
    """SockSite that answers connections beyond max_connections with 503 (aiohttp has no cap)."""

    def __init__(self, runner: web.BaseRunner, sock: socket.socket, max_connections: int, **kw: Any) -> None:
        super().__init__(runner, sock, **kw)
        self.max_connections = max_connections

    async def start(self) -> None:
        await web.BaseSite.start(self)  # registers the site with its runner
        server = self._runner.server
        assert server is not None

        def factory() -> asyncio.BaseProtocol:
            if len(server.connections) >= self.max_connections:
                log.warning("connection refused: too many open connections", limit=self.max_connections)
                return _Refuser()
            return server()

        self._server = await asyncio.get_running_loop().create_unix_server(
            factory, sock=self._sock, backlog=self._backlog
        )
