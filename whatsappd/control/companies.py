"""The company routes: list, get, add or update, delete, and the operator's acts on one company
(connect, QR, pair code, logout, restart, simulate).

The acts themselves are the supervisor's (supervisor/runner.py); a route checks its input,
says why an act cannot happen now, and waits, within a bound, for the answer worth giving.
"""

from __future__ import annotations

import re

from aiohttp import web

from whatsappd import qr as qr_render
from whatsappd.config import parse_companies
from whatsappd.control.bodies import bool_param, company_id, read_json, read_resource
from whatsappd.control.peers import peer_of
from whatsappd.control.services import company_runner, services
from whatsappd.errors import ApiError, ErrorCode
from whatsappd.protocol import SIMULATE_ACTIONS
from whatsappd.states import SETTLING, State

__all__ = [
    "connect", "delete_company", "get_company", "get_qr", "list_companies", "logout", "pair_code", "put_company",
    "restart", "resume_sending", "simulate",
]

_PHONE_JUNK = re.compile(r"[\s()+.-]")

#: How long connect and restart wait for the worker's first word before answering anyway.
_SETTLE_WAIT = 10.0

#: What a restart answers after: the new worker has reported anything (connecting included).
_RESTARTING = SETTLING - {State.CONNECTING}

async def list_companies(request: web.Request) -> web.Response:
    messaging = services(request).messaging
    return web.json_response({"companies": [{**c, "sending": messaging.pacing(c["id"])}
                                            for c in services(request).supervisor.list()]})


async def get_company(request: web.Request) -> web.Response:
    runner = company_runner(request)
    if (runner.state is State.STOPPED and not runner.stopped_by_operator and not runner.busy
            and runner.has_session()):
        # The old CRM's promise: a status call (a page refresh) brings a stored session back.
        runner.start("status call on a stopped company with a stored session")
    return web.json_response({**runner.snapshot(), "sending": services(request).messaging.pacing(runner.id)})


async def put_company(request: web.Request) -> web.Response:
    company = company_id(request)
    body = await read_resource(request, company, ErrorCode.BAD_REQUEST, "name, engine, proxy")
    problems: list[str] = []
    parsed = parse_companies([{**body, "id": company}], problems)
    if problems or not parsed:
        raise ApiError(ErrorCode.BAD_REQUEST, "; ".join(p.replace("companies[0]", "body") for p in problems))
    created, runner = await services(request).supervisor.put_company(parsed[0])
    return web.json_response(runner.snapshot(), status=201 if created else 200)


async def delete_company(request: web.Request) -> web.Response:
    runner = company_runner(request)
    wipe = bool_param(request, "wipe")
    return web.json_response(await services(request).supervisor.delete_company(runner.id, wipe))


async def connect(request: web.Request) -> web.Response:
    runner = company_runner(request)
    if not await runner.connect("connect requested"):
        return web.json_response(runner.snapshot())
    # Answer once it is clear how it goes: pairing (a QR is ready), connected, or a failure;
    # within a bound, since a silent network can keep it `connecting` for long.
    await runner.wait_for(lambda r: r.state not in SETTLING, _SETTLE_WAIT)
    return web.json_response(runner.snapshot(), status=202)


async def get_qr(request: web.Request) -> web.StreamResponse:
    runner = company_runner(request)
    qr = runner.qr
    if runner.state is not State.PAIRING or qr is None or not qr.get("code"):
        hint = ("connect it first (POST /v1/companies/{id}/connect)" if runner.state is not State.CONNECTED
                else "it is already connected")
        raise ApiError(ErrorCode.NO_QR, f"company {runner.id!r} has no QR code now (state {runner.state}); {hint}")
    fmt = request.query.get("format", "")
    if fmt not in ("", "json", "png", "text"):
        raise ApiError(ErrorCode.BAD_REQUEST, "format must be json, png or text")
    code = str(qr["code"])
    no_store = {"Cache-Control": "no-store"}
    if fmt == "png" or (not fmt and "image/png" in request.headers.get("Accept", "")):
        return web.Response(body=qr_render.to_png(code), content_type="image/png", headers=no_store)
    if fmt == "text":
        ansi = bool_param(request, "ansi")
        return web.Response(text=qr_render.to_text(code, ansi=ansi), content_type="text/plain", headers=no_store)
    return web.json_response({"code": code, "expires_at": qr.get("expires_at")}, headers=no_store)


async def pair_code(request: web.Request) -> web.Response:
    runner = company_runner(request)
    body = await read_json(request)
    phone = body.get("phone") if isinstance(body, dict) else None
    if not isinstance(phone, str) or not phone.strip():
        raise ApiError(ErrorCode.BAD_REQUEST, 'send {"phone": "<number in international format>"}')
    digits = _PHONE_JUNK.sub("", phone)
    if not re.fullmatch(r"[1-9][0-9]{6,14}", digits):
        raise ApiError(ErrorCode.INVALID_PHONE, f"{phone!r} is not a phone number in international format "
                       "(country code first, e.g. +55 11 99999-9999)")
    if runner.state is not State.PAIRING:
        raise ApiError(ErrorCode.NOT_PAIRING, f"company {runner.id!r} is not pairing (state {runner.state}); "
                       "connect it first, then ask for a code")
    return web.json_response(await runner.command("pair_phone", {"phone": digits}))


async def logout(request: web.Request) -> web.Response:
    return web.json_response(await company_runner(request).logout())


async def restart(request: web.Request) -> web.Response:
    runner = company_runner(request)
    await runner.restart("restart requested")
    await runner.wait_for(lambda r: r.state not in _RESTARTING, _SETTLE_WAIT)
    return web.json_response(runner.snapshot(), status=202)


async def resume_sending(request: web.Request) -> web.Response:
    runner = company_runner(request)
    cred = peer_of(request.transport)
    messaging = services(request).messaging
    resumed = await messaging.resume_sending(runner.id, cred.fields() if cred else {})
    return web.json_response({"company": runner.id, "resumed": resumed, "sending": messaging.pacing(runner.id)})


async def simulate(request: web.Request) -> web.Response:
    runner = company_runner(request)
    if runner.config.engine != "simulator":
        raise ApiError(ErrorCode.NOT_FOUND, f"company {runner.id!r} runs the real WhatsApp engine; "
                       'simulate exists only for engine = "simulator"')
    body = await read_json(request)
    if not isinstance(body, dict) or not isinstance(body.get("action"), str):
        raise ApiError(ErrorCode.BAD_REQUEST, f'send {{"action": "{"|".join(SIMULATE_ACTIONS)}", ...}}')
    action = SIMULATE_ACTIONS.get(body["action"])
    if action is not None and not action.replies:
        # Fire and forget: waiting for an answer would only time out.
        if runner.worker is None:
            raise ApiError(ErrorCode.NOT_RUNNING, f"company {runner.id!r} has no running worker")
        runner.worker.send({"type": "command", "id": 0, "company": runner.id, "op": "simulate", "args": body})
        return web.json_response({"action": body["action"], "sent": True}, status=202)
    return web.json_response(await runner.command("simulate", body))
