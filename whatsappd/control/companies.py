"""The company routes: list, get, add or update, delete, and the operator's acts on one company
(connect, QR, pair code, logout, restart, simulate).

The acts themselves are the supervisor's (supervisor/runner.py); a route checks its input,
says why an act cannot happen now, and waits, within a bound, for the answer worth giving.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from aiohttp import web

from whatsappd import qr as qr_render
from whatsappd.config import parse_companies
from whatsappd.control.bodies import bool_param, company_id, read_json, read_resource
from whatsappd.control.peers import peer_of
from whatsappd.control.services import Services, company_runner, services
from whatsappd.errors import ApiError, ErrorCode, Failure
from whatsappd.protocol import SIMULATE_ACTIONS
from whatsappd.states import SETTLING, State

if TYPE_CHECKING:
    from whatsappd.cluster.hosts import Answer, Owner
    from whatsappd.supervisor import Runner

__all__ = [
    "ACTS", "company_state", "connect", "delete_company", "get_company", "get_qr", "list_companies", "logout",
    "pair_code", "put_company", "restart", "resume_sending", "run_act", "simulate",
]

_PHONE_JUNK = re.compile(r"[\s()+.-]")

#: How long connect and restart wait for the worker's first word before answering anyway.
_SETTLE_WAIT = 10.0

#: What a restart answers after: the new worker has reported anything (connecting included).
_RESTARTING = SETTLING - {State.CONNECTING}

async def list_companies(request: web.Request) -> web.Response:
    parts = services(request)
    messaging, cluster = parts.messaging, parts.cluster
    local = [{**c, "sending": messaging.pacing(c["id"])} for c in parts.supervisor.list()
             if cluster is None or cluster.owned(c["id"]) is not None]
    if cluster is None:
        return web.json_response({"companies": local})
    # Several hosts: this host's companies as it sees them, the others' as their owners wrote them.
    owners = await cluster.owners()
    here = {c["id"] for c in local}
    mine = {"host": cluster.host, "token": None, "lease_expires_at": None}
    out = [{**c, "owner": owners[c["id"]].field() if c["id"] in owners and cluster.cluster else mine} for c in local]
    out += [_remote(cid, owner) for cid, owner in owners.items() if cid not in here]
    return web.json_response({"companies": sorted(out, key=lambda c: str(c["id"]))})


def _remote(company: str, owner: Owner) -> dict[str, Any]:
    """A company this host does not own, as its owner last wrote it (GET's answer)."""
    # `reported`: whose snapshot this is and when it was written. With `owner` null (a failover under
    # way) it is the last owner's, which may describe a worker that is gone.
    return {**(owner.snapshot or {"id": company, "state": None}), "owner": owner.field(),
            "reported": owner.reported}


async def get_company(request: web.Request) -> web.Response:
    parts = services(request)
    cluster = parts.cluster
    company = company_id(request)
    if cluster is not None and cluster.owned(company) is None:
        owner = await cluster.owner(company)
        if owner is None:
            raise ApiError(ErrorCode.COMPANY_NOT_FOUND, f"no company {company!r} on any host")
        return web.json_response(_remote(company, owner))
    runner = company_runner(request)
    if (runner.state is State.STOPPED and not runner.stopped_by_operator and not runner.busy
            and runner.has_session()):
        # The old CRM's promise: a status call (a page refresh) brings a stored session back.
        runner.start("status call on a stopped company with a stored session")
    body = {**runner.snapshot(), "sending": parts.messaging.pacing(runner.id)}
    if cluster is not None:
        owner = await cluster.owner(company) if cluster.cluster else None
        body["owner"] = (owner.field() if owner is not None else
                         {"host": cluster.host, "token": None, "lease_expires_at": None})
    return web.json_response(body)


async def company_state(request: web.Request) -> tuple[str, State | None]:
    """The path's company and its state, whichever host owns it (None: its owner has not said yet)."""
    parts = services(request)
    cluster = parts.cluster
    company = company_id(request)
    if cluster is None or cluster.owned(company) is not None:
        runner = company_runner(request)
        return runner.id, runner.state
    owner = await cluster.owner(company)
    if owner is None:
        raise ApiError(ErrorCode.COMPANY_NOT_FOUND, f"no company {company!r} on any host")
    state = (owner.snapshot or {}).get("state")
    return company, State(state) if isinstance(state, str) and state in set(State) else None


# ------------------------------------------------------------------------------------- acts
# An act runs where the company is owned: here, or routed to its owner through the database
# (cluster/hosts.py), which runs the same function and answers with its status and body.

Act = Callable[[Services, "Runner", dict[str, Any]], Awaitable["Answer"]]

async def run_act(parts: Services, act: str, company: str, args: dict[str, Any]) -> Answer:
    """Run act on company, owned here: (HTTP status, JSON body). Also what routed acts run."""
    return await ACTS[act](parts, parts.supervisor.get(company), args)


async def _routed(request: web.Request, act: str, args: dict[str, Any]) -> web.Response:
    """Answer act on the path's company: run here if owned here, else by its owner."""
    parts = services(request)
    cluster = parts.cluster
    company = company_id(request)
    if cluster is None or cluster.owned(company) is not None:
        try:
            status, body = await run_act(parts, act, company, args)
            return web.json_response(body, status=status)
        except Failure as exc:
            if cluster is None or exc.code is not ErrorCode.NOT_OWNER:  # the lease moved meanwhile
                raise
    assert cluster is not None
    status, body = await cluster.route(company, act, args)
    return web.json_response(body, status=status)


async def delete_company(request: web.Request) -> web.Response:
    return await _routed(request, "delete", {"wipe": bool_param(request, "wipe")})


async def _delete(parts: Services, runner: Runner, args: dict[str, Any]) -> Answer:
    return 200, await parts.supervisor.delete_company(runner.id, bool(args.get("wipe")))


async def connect(request: web.Request) -> web.Response:
    return await _routed(request, "connect", {})


async def _connect(parts: Services, runner: Runner, args: dict[str, Any]) -> Answer:
    if not await runner.connect("connect requested"):
        return 200, runner.snapshot()
    # Answer once it is clear how it goes: pairing (a QR is ready), connected, or a failure;
    # within a bound, since a silent network can keep it `connecting` for long.
    await runner.wait_for(lambda r: r.state not in SETTLING, _SETTLE_WAIT)
    return 202, runner.snapshot()


async def put_company(request: web.Request) -> web.Response:
    company = company_id(request)
    body = await read_resource(request, company, ErrorCode.BAD_REQUEST, "name, engine, proxy")
    problems: list[str] = []
    parsed = parse_companies([{**body, "id": company}], problems)
    if problems or not parsed:
        raise ApiError(ErrorCode.BAD_REQUEST, "; ".join(p.replace("companies[0]", "body") for p in problems))
    created, runner = await services(request).supervisor.put_company(parsed[0])
    return web.json_response(runner.snapshot(), status=201 if created else 200)


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


def _known(request: web.Request) -> None:
    """On a single host, an unknown company is said before anything about the body."""
    if services(request).cluster is None:
        company_runner(request)


async def pair_code(request: web.Request) -> web.Response:
    _known(request)
    body = await read_json(request)
    phone = body.get("phone") if isinstance(body, dict) else None
    if not isinstance(phone, str) or not phone.strip():
        raise ApiError(ErrorCode.BAD_REQUEST, 'send {"phone": "<number in international format>"}')
    digits = _PHONE_JUNK.sub("", phone)
    if not re.fullmatch(r"[1-9][0-9]{6,14}", digits):
        raise ApiError(ErrorCode.INVALID_PHONE, f"{phone!r} is not a phone number in international format "
                       "(country code first, e.g. +55 11 99999-9999)")
    return await _routed(request, "pair_code", {"phone": digits})


async def _pair_code(parts: Services, runner: Runner, args: dict[str, Any]) -> Answer:
    if runner.state is not State.PAIRING:
        raise ApiError(ErrorCode.NOT_PAIRING, f"company {runner.id!r} is not pairing (state {runner.state}); "
                       "connect it first, then ask for a code")
    return 200, await runner.command("pair_phone", {"phone": str(args["phone"])})


async def logout(request: web.Request) -> web.Response:
    return await _routed(request, "logout", {})


async def _logout(parts: Services, runner: Runner, args: dict[str, Any]) -> Answer:
    return 200, await runner.logout()


async def restart(request: web.Request) -> web.Response:
    return await _routed(request, "restart", {})


async def _restart(parts: Services, runner: Runner, args: dict[str, Any]) -> Answer:
    await runner.restart("restart requested")
    await runner.wait_for(lambda r: r.state not in _RESTARTING, _SETTLE_WAIT)
    return 202, runner.snapshot()


async def resume_sending(request: web.Request) -> web.Response:
    cred = peer_of(request.transport)
    return await _routed(request, "resume_sending", {"who": cred.fields() if cred else {}})


async def _resume_sending(parts: Services, runner: Runner, args: dict[str, Any]) -> Answer:
    messaging = parts.messaging
    resumed = await messaging.resume_sending(runner.id, dict(args.get("who") or {}))
    return 200, {"company": runner.id, "resumed": resumed, "sending": messaging.pacing(runner.id)}


async def simulate(request: web.Request) -> web.Response:
    _known(request)
    body = await read_json(request)
    if not isinstance(body, dict) or not isinstance(body.get("action"), str):
        raise ApiError(ErrorCode.BAD_REQUEST, f'send {{"action": "{"|".join(SIMULATE_ACTIONS)}", ...}}')
    return await _routed(request, "simulate", body)


async def _simulate(parts: Services, runner: Runner, body: dict[str, Any]) -> Answer:
    if runner.config.engine != "simulator":
        raise ApiError(ErrorCode.NOT_FOUND, f"company {runner.id!r} runs the real WhatsApp engine; "
                       'simulate exists only for engine = "simulator"')
    action = SIMULATE_ACTIONS.get(body["action"])
    if action is not None and not action.replies:
        # Fire and forget: waiting for an answer would only time out.
        if runner.worker is None:
            raise ApiError(ErrorCode.NOT_RUNNING, f"company {runner.id!r} has no running worker")
        runner.worker.send({"type": "command", "id": 0, "company": runner.id, "op": "simulate", "args": body})
        return 202, {"action": body["action"], "sent": True}
    return 200, await runner.command("simulate", body)


#: Every act a route may have run on the company's owner, by name.
ACTS: dict[str, Act] = {
    "connect": _connect, "delete": _delete, "logout": _logout, "pair_code": _pair_code, "restart": _restart,
    "resume_sending": _resume_sending, "simulate": _simulate,
}
