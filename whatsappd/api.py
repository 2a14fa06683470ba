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
import re
import socket
import struct
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from aiohttp import web

from whatsappd import __version__
from whatsappd import qr as qr_render
from whatsappd.config import parse_companies
from whatsappd.errors import ApiError
from whatsappd.ids import InvalidCompanyId, check_company_id
from whatsappd.logs import get_logger
from whatsappd.openapi import openapi_document
from whatsappd.states import State

if TYPE_CHECKING:
    from whatsappd.daemon import Daemon
    from whatsappd.supervisor import Runner

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
    if request.content_type.startswith("multipart/"):
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


# --------------------------------------------------------------------------------- companies

_PHONE_JUNK = re.compile(r"[\s()+.-]")


def _company_id(request: web.Request) -> str:
    try:
        return check_company_id(request.match_info["id"])
    except InvalidCompanyId as exc:
        raise ApiError(400, "invalid_company_id", str(exc)) from None


def _runner(request: web.Request) -> Runner:
    return request.app[DAEMON].supervisor.get(_company_id(request))


def _bool_param(request: web.Request, name: str) -> bool:
    value = request.query.get(name, "false").lower()
    if value not in ("true", "false", "1", "0", "yes", "no"):
        raise ApiError(400, "bad_request", f"query parameter {name!r} must be true or false")
    return value in ("true", "1", "yes")


async def get_company(request: web.Request) -> web.Response:
    runner = _runner(request)
    if runner.state is State.STOPPED and not runner.stopped_by_operator and runner.has_session():
        # The old CRM's promise: a status call (a page refresh) brings a stored session back.
        runner.start("status call on a stopped company with a stored session")
    return web.json_response(runner.snapshot())


async def put_company(request: web.Request) -> web.Response:
    company = _company_id(request)
    body = await read_json(request)
    if not isinstance(body, dict):
        raise ApiError(400, "bad_request", "the body must be a JSON object with name, engine, proxy")
    problems: list[str] = []
    parsed = parse_companies([{**body, "id": company}], problems)
    if problems or not parsed:
        raise ApiError(400, "bad_request", "; ".join(p.replace("companies[0]", "body") for p in problems))
    created, runner = await request.app[DAEMON].supervisor.put_company(parsed[0])
    return web.json_response(runner.snapshot(), status=201 if created else 200)


async def delete_company(request: web.Request) -> web.Response:
    runner = _runner(request)
    wipe = _bool_param(request, "wipe")
    return web.json_response(await request.app[DAEMON].supervisor.delete_company(runner.id, wipe))


async def connect(request: web.Request) -> web.Response:
    runner = _runner(request)
    if runner.state in (State.CONNECTED, State.PAIRING, State.CONNECTING):
        return web.json_response(runner.snapshot())
    runner.start("connect requested")
    # Answer once the worker is up and has said how it goes (or failed), within a bound.
    await runner.wait_for(lambda r: r.state not in (State.STARTING, State.STOPPED), 10.0)
    return web.json_response(runner.snapshot(), status=202)


async def get_qr(request: web.Request) -> web.StreamResponse:
    runner = _runner(request)
    qr = runner.qr
    if runner.state is not State.PAIRING or qr is None or not qr.get("code"):
        hint = ("connect it first (POST /v1/companies/{id}/connect)" if runner.state is not State.CONNECTED
                else "it is already connected")
        raise ApiError(409, "no_qr", f"company {runner.id!r} has no QR code now (state {runner.state}); {hint}")
    fmt = request.query.get("format", "")
    if fmt not in ("", "json", "png", "text"):
        raise ApiError(400, "bad_request", "format must be json, png or text")
    code = str(qr["code"])
    no_store = {"Cache-Control": "no-store"}
    if fmt == "png" or (not fmt and "image/png" in request.headers.get("Accept", "")):
        return web.Response(body=qr_render.to_png(code), content_type="image/png", headers=no_store)
    if fmt == "text":
        ansi = _bool_param(request, "ansi")
        return web.Response(text=qr_render.to_text(code, ansi=ansi), content_type="text/plain", headers=no_store)
    return web.json_response({"code": code, "expires_at": qr.get("expires_at")}, headers=no_store)


async def pair_code(request: web.Request) -> web.Response:
    runner = _runner(request)
    body = await read_json(request)
    phone = body.get("phone") if isinstance(body, dict) else None
    if not isinstance(phone, str) or not phone.strip():
        raise ApiError(400, "bad_request", 'send {"phone": "<number in international format>"}')
    digits = _PHONE_JUNK.sub("", phone)
    if not re.fullmatch(r"[1-9][0-9]{6,14}", digits):
        raise ApiError(400, "invalid_phone", f"{phone!r} is not a phone number in international format "
                       "(country code first, e.g. +55 11 99999-9999)")
    if runner.state is not State.PAIRING:
        raise ApiError(409, "not_pairing", f"company {runner.id!r} is not pairing (state {runner.state}); "
                       "connect it first, then ask for a code")
    return web.json_response(await runner.command("pair_phone", {"phone": digits}))


async def logout(request: web.Request) -> web.Response:
    return web.json_response(await _runner(request).logout())


async def restart(request: web.Request) -> web.Response:
    runner = _runner(request)
    await runner.restart("restart requested")
    await runner.wait_for(lambda r: r.state not in (State.STARTING, State.STOPPED), 10.0)
    return web.json_response(runner.snapshot(), status=202)


async def simulate(request: web.Request) -> web.Response:
    runner = _runner(request)
    if runner.config.engine != "simulator":
        raise ApiError(404, "not_found", f"company {runner.id!r} runs the real WhatsApp engine; "
                       'simulate exists only for engine = "simulator"')
    body = await read_json(request)
    if not isinstance(body, dict) or not isinstance(body.get("action"), str):
        raise ApiError(400, "bad_request", 'send {"action": "scan|drop|restore|logged_out|replaced|ban|'
                       'outdated|crash|hang|fail_connect", ...}')
    if body["action"] in ("crash", "hang"):
        # The worker cannot answer these: it dies or freezes. Fire and forget.
        if runner.worker is None:
            raise ApiError(409, "not_running", f"company {runner.id!r} has no running worker")
        runner.worker.send({"type": "command", "id": 0, "company": runner.id, "op": "simulate", "args": body})
        return web.json_response({"action": body["action"], "sent": True}, status=202)
    return web.json_response(await runner.command("simulate", body))


def build_app(daemon: Daemon) -> web.Application:
    app = web.Application(
        middlewares=[_peer_middleware, _error_middleware, _body_limit_middleware],
        client_max_size=daemon.config.control_max_body_size,
        handler_args={"max_field_size": 16 * 1024, "max_line_size": 16 * 1024},
    )
    app[DAEMON] = daemon
    r = app.router
    r.add_get("/v1/health", health)
    r.add_get("/v1/companies", list_companies)
    r.add_get("/v1/companies/{id}", get_company)
    r.add_put("/v1/companies/{id}", put_company)
    r.add_delete("/v1/companies/{id}", delete_company)
    r.add_post("/v1/companies/{id}/connect", connect)
    r.add_get("/v1/companies/{id}/qr", get_qr)
    r.add_post("/v1/companies/{id}/pair-code", pair_code)
    r.add_post("/v1/companies/{id}/logout", logout)
    r.add_post("/v1/companies/{id}/restart", restart)
    r.add_post("/v1/companies/{id}/simulate", simulate)
    r.add_post("/v1/reload", reload)
    r.add_get("/v1/openapi.json", openapi)
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
