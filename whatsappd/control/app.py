"""The control API: HTTP/1.1 with JSON bodies over the Unix control socket (aiohttp).

Who may connect, and how many, is settled when a connection is accepted (control_socket.py).
Cross-cutting rules of each request live in middlewares, in this order: peer credentials (log;
allowed_uids / allowed_groups again, as a reload may have narrowed them -> 403), errors (every
failure becomes {"error": {...}} with a stable code), body limit (413 even for handlers that
never read the body, 408 for a body that stops arriving).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import math
import mimetypes
import os
import re
import secrets
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aiohttp import web

from whatsappd import __version__
from whatsappd import qr as qr_render
from whatsappd.config import parse_companies, parse_duration
from whatsappd.control.listener import admits, forbidden, peer_of
from whatsappd.control.openapi import SIMULATE_ACTIONS, openapi_document
from whatsappd.errors import ApiError, ErrorCode, Failure
from whatsappd.ids import InvalidCompanyId, check_company_id
from whatsappd.logs import get_logger
from whatsappd.mediafile import MediaRefused, read_media
from whatsappd.recipients import InvalidRecipient, normalize_phone, normalize_recipient
from whatsappd.states import State
from whatsappd.store import EVENT_TYPES, STATUSES, IdempotencyConflict, OutgoingMessage, Payload, StorageFull
from whatsappd.timefmt import iso

if TYPE_CHECKING:
    from whatsappd.daemon import Daemon
    from whatsappd.supervisor.runner import Runner

__all__ = ["build_app"]

log = get_logger()
DAEMON: web.AppKey[Daemon] = web.AppKey("daemon")
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

#: aiohttp's own refusals, as codes.
_STATUS_CODES = {
    400: ErrorCode.BAD_REQUEST, 403: ErrorCode.FORBIDDEN, 404: ErrorCode.NOT_FOUND,
    405: ErrorCode.METHOD_NOT_ALLOWED, 413: ErrorCode.BODY_TOO_LARGE, 415: ErrorCode.UNSUPPORTED_MEDIA_TYPE,
}


@web.middleware
async def _peer_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    daemon = request.app[DAEMON]
    cred = peer_of(request.transport)
    started = time.monotonic()
    who = cred.fields() if cred else {}
    if not admits(daemon.config, cred):
        log.warning("request refused: peer not allowed", method=request.method, path=request.path, **who)
        return _error_response(forbidden(cred))
    response = await handler(request)
    log.debug("request", method=request.method, path=request.path, status=response.status,
              ms=round((time.monotonic() - started) * 1000, 1), **who)
    return response


def _error_response(error: Failure) -> web.Response:
    return web.json_response(error.body(), status=error.status)


@web.middleware
async def _error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except Failure as exc:
        return _error_response(exc)
    except StorageFull as exc:  # any write, any route: the store logged it once, with the path
        return _error_response(ApiError(ErrorCode.STORAGE_FULL, str(exc)))
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        code = _STATUS_CODES.get(exc.status, ErrorCode.BAD_REQUEST)
        message = {
            404: f"no such route: {request.method} {request.path}; see GET /v1/openapi.json",
            405: f"{request.method} is not allowed on {request.path}",
            413: f"the request body is larger than control.max_body_size "
                 f"({request.app[DAEMON].config.control_max_body_size} bytes)",
        }.get(exc.status, exc.text or exc.reason)
        response = _error_response(ApiError(code, message))
        for header in ("Allow",):
            if header in exc.headers:
                response.headers[header] = exc.headers[header]
        return response
    except asyncio.CancelledError:
        raise
    except Exception:
        log.exception("request failed", method=request.method, path=request.path)
        return _error_response(ApiError(ErrorCode.INTERNAL_ERROR, "internal error; see the daemon's log"))


@web.middleware
async def _body_limit_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    if request.can_read_body:
        # aiohttp's keep-alive timeout stops at the headers: a client stalling mid-body would hold
        # its connection (and a slot under max_connections) for ever without this deadline.
        timeout = request.app[DAEMON].config.control_idle_timeout
        try:
            async with asyncio.timeout(timeout):
                await request.read()  # raises 413 past client_max_size, whether or not the handler reads
        except TimeoutError:
            # Answer and close at once: aiohttp would otherwise linger (10 s) to drain a body
            # that is not coming, holding the connection's slot past the idle timeout.
            response = _error_response(ApiError(ErrorCode.REQUEST_TIMEOUT, f"the request body did not arrive "
                                                f"within control.idle_timeout ({timeout:g}s)"))
            await response.prepare(request)
            await response.write_eof()
            request.protocol.force_close()
            return response
    return await handler(request)


#: How deep a JSON body may nest. Every body the API takes is a few levels deep; a deeper one (a
#: run of "[" well under the size limit) would otherwise reach Python's recursion limit.
MAX_JSON_DEPTH = 32


def _not_json(constant: str) -> Any:
    raise ValueError(f"{constant} is not a JSON number")


def _too_deep(value: Any) -> bool:
    """Whether value nests deeper than MAX_JSON_DEPTH. Iterative, holding one iterator per level,
    so neither the stack nor memory grows with the body's size."""

    def children(node: dict[str, Any] | list[Any]) -> Iterator[Any]:
        return iter(node.values() if isinstance(node, dict) else node)

    if not isinstance(value, dict | list):
        return False
    levels = [children(value)]
    while levels:
        for child in levels[-1]:
            if isinstance(child, dict | list):
                if len(levels) >= MAX_JSON_DEPTH:
                    return True
                levels.append(children(child))
                break
        else:
            levels.pop()
    return False


async def read_json(request: web.Request) -> Any:
    """The request's JSON body (an empty body is {}): strict JSON (no NaN or Infinity), nested
    at most MAX_JSON_DEPTH levels."""
    raw = await request.read()
    if not raw.strip():
        return {}
    if request.content_type.startswith("multipart/"):
        raise ApiError(ErrorCode.UNSUPPORTED_MEDIA_TYPE, "send the body as application/json")
    too_deep = ApiError(ErrorCode.INVALID_JSON, f"the body nests deeper than {MAX_JSON_DEPTH} levels")
    try:
        value = json.loads(raw, parse_constant=_not_json)
    except RecursionError:
        raise too_deep from None
    except ValueError as exc:
        raise ApiError(ErrorCode.INVALID_JSON, f"the body is not valid JSON: {exc}") from None
    if _too_deep(value):
        raise too_deep
    return value


def _json_seconds(value: object) -> float:
    """Seconds from a JSON field: a duration string ("1h30m") or a finite number. A boolean is
    not a number here, although Python counts it as one ("ttl": true is not 1 s)."""
    if isinstance(value, str):
        return parse_duration(value)
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError("expected a duration string or a number of seconds")
    return float(value)


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
            ErrorCode.CONFIG_INVALID,
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
        raise ApiError(ErrorCode.INVALID_COMPANY_ID, str(exc)) from None


def _runner(request: web.Request) -> Runner:
    return request.app[DAEMON].supervisor.get(_company_id(request))


def _bool_param(request: web.Request, name: str) -> bool:
    value = request.query.get(name, "false").lower()
    if value not in ("true", "false", "1", "0", "yes", "no"):
        raise ApiError(ErrorCode.BAD_REQUEST, f"query parameter {name!r} must be true or false")
    return value in ("true", "1", "yes")


async def get_company(request: web.Request) -> web.Response:
    runner = _runner(request)
    if (runner.state is State.STOPPED and not runner.stopped_by_operator and not runner.busy
            and runner.has_session()):
        # The old CRM's promise: a status call (a page refresh) brings a stored session back.
        runner.start("status call on a stopped company with a stored session")
    return web.json_response(runner.snapshot())


async def put_company(request: web.Request) -> web.Response:
    company = _company_id(request)
    body = await read_json(request)
    if not isinstance(body, dict):
        raise ApiError(ErrorCode.BAD_REQUEST, "the body must be a JSON object with name, engine, proxy")
    if "id" in body and body["id"] != company:
        # The path names the company; a different id in the body is a mistake, not a rename.
        raise ApiError(ErrorCode.BAD_REQUEST, f"the body's id {body['id']!r} differs from the path's "
                       f"{company!r}; leave id out of the body")
    problems: list[str] = []
    parsed = parse_companies([{**body, "id": company}], problems)
    if problems or not parsed:
        raise ApiError(ErrorCode.BAD_REQUEST, "; ".join(p.replace("companies[0]", "body") for p in problems))
    created, runner = await request.app[DAEMON].supervisor.put_company(parsed[0])
    return web.json_response(runner.snapshot(), status=201 if created else 200)


async def delete_company(request: web.Request) -> web.Response:
    runner = _runner(request)
    wipe = _bool_param(request, "wipe")
    return web.json_response(await request.app[DAEMON].supervisor.delete_company(runner.id, wipe))


async def connect(request: web.Request) -> web.Response:
    runner = _runner(request)
    if not await runner.connect("connect requested"):
        return web.json_response(runner.snapshot())
    # Answer once it is clear how it goes: pairing (a QR is ready), connected, or a failure;
    # within a bound, since a silent network can keep it `connecting` for long.
    await runner.wait_for(lambda r: r.state not in (State.STARTING, State.STOPPED, State.CONNECTING), 10.0)
    return web.json_response(runner.snapshot(), status=202)


async def get_qr(request: web.Request) -> web.StreamResponse:
    runner = _runner(request)
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
        ansi = _bool_param(request, "ansi")
        return web.Response(text=qr_render.to_text(code, ansi=ansi), content_type="text/plain", headers=no_store)
    return web.json_response({"code": code, "expires_at": qr.get("expires_at")}, headers=no_store)


async def pair_code(request: web.Request) -> web.Response:
    runner = _runner(request)
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
    return web.json_response(await _runner(request).logout())


async def restart(request: web.Request) -> web.Response:
    runner = _runner(request)
    await runner.restart("restart requested")
    await runner.wait_for(lambda r: r.state not in (State.STARTING, State.STOPPED), 10.0)
    return web.json_response(runner.snapshot(), status=202)


async def simulate(request: web.Request) -> web.Response:
    runner = _runner(request)
    if runner.config.engine != "simulator":
        raise ApiError(ErrorCode.NOT_FOUND, f"company {runner.id!r} runs the real WhatsApp engine; "
                       'simulate exists only for engine = "simulator"')
    body = await read_json(request)
    if not isinstance(body, dict) or not isinstance(body.get("action"), str):
        raise ApiError(ErrorCode.BAD_REQUEST, f'send {{"action": "{"|".join(SIMULATE_ACTIONS)}", ...}}')
    if body["action"] in ("crash", "hang"):
        # The worker cannot answer these: it dies or freezes. Fire and forget.
        if runner.worker is None:
            raise ApiError(ErrorCode.NOT_RUNNING, f"company {runner.id!r} has no running worker")
        runner.worker.send({"type": "command", "id": 0, "company": runner.id, "op": "simulate", "args": body})
        return web.json_response({"action": body["action"], "sent": True}, status=202)
    return web.json_response(await runner.command("simulate", body))


# ---------------------------------------------------------------------------------- messages

_MEDIA_KINDS = ("image", "document", "audio")
_MESSAGE_FIELDS = {"to", "text", "caption", "filename", "mimetype", "ttl", *_MEDIA_KINDS}
_MAX_TEXT = 65536


def _path_bytes(spec: dict[str, Any], kind: str, limit: int, media_dirs: tuple[Path, ...],
                state_dir: Path) -> bytes:
    """The bytes of the file spec["path"] names, read beneath outbox.media_dirs (mediafile.py).

    The daemon can read every company's credentials; a client must not be able to send any
    file it can read, so paths are confined to directories the sysadmin chose, followed without
    symlinks, and never into the state directory.
    """
    path = spec["path"]
    if not isinstance(path, str) or not os.path.isabs(path):
        raise ApiError(ErrorCode.UNREADABLE_FILE, f"{kind}.path must be an absolute path")
    if not media_dirs:
        raise ApiError(ErrorCode.UNREADABLE_FILE, "sending files by path is off: list the directories the CRM may "
                       "send from in outbox.media_dirs, or send the content as base64")
    try:
        return b"".join(read_media(path, media_dirs, limit, forbidden=state_dir))
    except MediaRefused as exc:
        if exc.reason == "too_large":
            raise ApiError(ErrorCode.BODY_TOO_LARGE, f"{exc.message}; outbox.max_file_size is {limit}") from None
        if exc.reason == "outside":
            raise ApiError(ErrorCode.UNREADABLE_FILE, f"{exc.message}: files are sent only from inside "
                           f"outbox.media_dirs ({', '.join(str(d) for d in media_dirs)}), without symbolic "
                           "links; the state directory is never allowed") from None
        if exc.reason == "invalid":
            raise ApiError(ErrorCode.UNREADABLE_FILE, f"{kind}.path: {exc.message}, inside outbox.media_dirs") from None
        if exc.reason == "unreadable":
            raise ApiError(ErrorCode.UNREADABLE_FILE, f"the daemon (uid {os.getuid()}) {exc.message}") from None
        raise ApiError(ErrorCode.UNREADABLE_FILE, f"{exc.message}; give the path of a regular file the daemon "
                       "can read") from None


def _media_bytes(spec: object, kind: str, limit: int, media_dirs: tuple[Path, ...] = (),
                 state_dir: Path = Path("/nonexistent")) -> tuple[bytes, str | None, str | None]:
    """(bytes, filename, mimetype) from {"path": ...} or {"base64": ...}; clear 400s otherwise."""
    if isinstance(spec, str):
        spec = {"path": spec}
    if not isinstance(spec, dict) or (("path" in spec) == ("base64" in spec)):
        raise ApiError(ErrorCode.INVALID_MESSAGE, f'"{kind}" must be {{"path": "/abs/file"}} or {{"base64": "..."}}')
    unknown = sorted(set(spec) - {"path", "base64", "filename", "mimetype"})
    if unknown:
        raise ApiError(ErrorCode.INVALID_MESSAGE, f'unknown fields in "{kind}": {", ".join(unknown)}')
    if "path" in spec:
        data = _path_bytes(spec, kind, limit, media_dirs, state_dir)
        return data, spec.get("filename") or os.path.basename(spec["path"]), spec.get("mimetype")
    try:
        data = base64.b64decode(str(spec["base64"]), validate=True)
    except (ValueError, binascii.Error):
        raise ApiError(ErrorCode.INVALID_MESSAGE, f"{kind}.base64 is not valid base64") from None
    if len(data) > limit:
        raise ApiError(ErrorCode.BODY_TOO_LARGE, f"the {kind} is {len(data)} bytes; outbox.max_file_size is {limit}")
    return data, spec.get("filename"), spec.get("mimetype")


def _guess_mimetype(kind: str, filename: str | None, data: bytes) -> str:
    if filename:
        guessed = mimetypes.guess_type(filename)[0]
        if guessed:
            return guessed
    if data.startswith(b"\x89PNG"):
        return "image/png"
    if data.startswith(b"\xff\xd8\xff"):
        return "image/jpeg"
    if data.startswith(b"%PDF"):
        return "application/pdf"
    if data.startswith(b"OggS"):
        return "audio/ogg"
    return {"image": "image/jpeg", "audio": "audio/ogg"}.get(kind, "application/octet-stream")


def _wait_bound(request: web.Request, max_wait: float) -> float | None:
    """Seconds to hold the answer for ?wait=sent (None: answer at once)."""
    wait = request.query.get("wait")
    if wait is None:
        if "timeout" in request.query:
            raise ApiError(ErrorCode.BAD_REQUEST, "timeout goes with wait=sent")
        return None
    if wait != "sent":
        raise ApiError(ErrorCode.BAD_REQUEST, "wait accepts only 'sent'")
    if "timeout" not in request.query:
        return max_wait
    try:
        timeout = float(request.query["timeout"])
    except ValueError:
        raise ApiError(ErrorCode.BAD_REQUEST, "timeout must be a number of seconds") from None
    if not 0 <= timeout < float("inf"):
        raise ApiError(ErrorCode.BAD_REQUEST, "timeout must be a number of seconds, 0 or more")
    return min(max_wait, timeout)


async def send_message(request: web.Request) -> web.Response:
    daemon = request.app[DAEMON]
    runner = _runner(request)
    body = await read_json(request)
    if not isinstance(body, dict):
        raise ApiError(ErrorCode.INVALID_MESSAGE, "the body must be a JSON object")
    unknown = sorted(set(body) - _MESSAGE_FIELDS)
    if unknown:
        raise ApiError(ErrorCode.INVALID_MESSAGE, f"unknown fields: {', '.join(unknown)}; allowed: "
                       f"{', '.join(sorted(_MESSAGE_FIELDS))}")
    wait_bound = _wait_bound(request, daemon.config.outbox_max_wait)  # checked before anything is stored
    key = request.headers.get("Idempotency-Key")
    if key is not None and not re.fullmatch(r"[ -~]{1,255}", key):
        raise ApiError(ErrorCode.BAD_REQUEST, "Idempotency-Key must be 1 to 255 printable ASCII characters")
    if runner.state in (State.LOGGED_OUT, State.REPLACED):
        raise ApiError(ErrorCode.COMPANY_UNAVAILABLE, f"company {runner.id!r} is {runner.state}: messages cannot be "
                       "sent until it is connected again (connect, and pair if needed)")
    to = body.get("to")
    try:
        recipient = normalize_recipient(to, daemon.config.outbox_default_country) if isinstance(to, str) else None
    except InvalidRecipient as exc:
        raise ApiError(ErrorCode.INVALID_RECIPIENT, str(exc)) from None
    if recipient is None:
        raise ApiError(ErrorCode.INVALID_RECIPIENT, '"to" is required: a phone number in international format or a JID')
    kinds = [k for k in _MEDIA_KINDS if k in body]
    if len(kinds) > 1 or (kinds and "text" in body):
        raise ApiError(ErrorCode.INVALID_MESSAGE, 'send one of "text", "image", "document" or "audio"')
    ttl = daemon.config.outbox_default_ttl
    if "ttl" in body:
        try:
            ttl = _json_seconds(body["ttl"])
        except ValueError:
            raise ApiError(ErrorCode.INVALID_MESSAGE, 'ttl must be a duration such as "1h" or seconds') from None
        if not 1 <= ttl <= daemon.config.outbox_max_ttl:
            raise ApiError(ErrorCode.INVALID_MESSAGE, f"ttl must be between 1s and outbox.max_ttl "
                           f"({daemon.config.outbox_max_ttl:g}s)")
    for name in ("caption", "filename", "mimetype"):
        if name in body and not isinstance(body[name], str):
            raise ApiError(ErrorCode.INVALID_MESSAGE, f'"{name}" must be a string')
    media: bytes | None = None
    if kinds:
        kind = kinds[0]
        data, filename, mimetype = await asyncio.to_thread(
            _media_bytes, body[kind], kind, daemon.config.outbox_max_file_size, daemon.config.outbox_media_dirs,
            daemon.config.daemon_state_dir)
        media = data
        filename = body.get("filename") or filename
        payload: Payload = {
            "caption": body.get("caption"), "filename": filename,
            "mimetype": body.get("mimetype") or mimetype or _guess_mimetype(kind, filename, data),
            "size": len(data),
        }
    else:
        kind = "text"
        text = body.get("text")
        if not isinstance(text, str) or not text:
            raise ApiError(ErrorCode.INVALID_MESSAGE, 'send "text" (a non-empty string) or a media field')
        if len(text) > _MAX_TEXT:
            raise ApiError(ErrorCode.INVALID_MESSAGE, f"the text is {len(text)} characters; at most {_MAX_TEXT}")
        payload = {"text": text}
    try:
        created, message = await daemon.messaging.enqueue(OutgoingMessage(
            company=runner.id, recipient=recipient, to=str(to), kind=kind, payload=payload, media=media, ttl=ttl,
            idempotency_key=key, body=body))
    except IdempotencyConflict as exc:
        raise ApiError(ErrorCode.IDEMPOTENCY_KEY_REUSED, f"Idempotency-Key {key!r} was already used for message "
                       f"{exc.args[0]} with a different body; use a new key for a new message") from None
    if wait_bound is not None:
        message = await daemon.messaging.wait_status(
            runner.id, message["id"], lambda m: m["status"] not in ("queued", "sending"), wait_bound) or message
    headers = {} if created else {"Idempotent-Replayed": "true"}
    return web.json_response(message, status=202 if created else 200, headers=headers)


async def get_message(request: web.Request) -> web.Response:
    runner = _runner(request)
    message_id = request.match_info["mid"]
    message = await request.app[DAEMON].store.message(runner.id, message_id)
    if message is None:
        raise ApiError(ErrorCode.MESSAGE_NOT_FOUND, f"company {runner.id!r} has no message {message_id!r}")
    return web.json_response(message)


async def check_contact(request: web.Request) -> web.Response:
    runner = _runner(request)
    try:
        phone = normalize_phone(request.match_info["phone"], request.app[DAEMON].config.outbox_default_country)
    except InvalidRecipient as exc:
        raise ApiError(ErrorCode.INVALID_RECIPIENT, str(exc)) from None
    if runner.state is not State.CONNECTED:
        raise ApiError(ErrorCode.NOT_CONNECTED, f"company {runner.id!r} is {runner.state}; a number can be checked "
                       "only while connected")
    return web.json_response(await runner.command("check_number", {"phone": phone}))


async def get_media(request: web.Request) -> web.StreamResponse:
    daemon = request.app[DAEMON]
    runner = _runner(request)
    wa_id = request.match_info["message_id"]
    media = await daemon.store.incoming_media(runner.id, wa_id)
    if media is None:
        raise ApiError(ErrorCode.MEDIA_NOT_FOUND, f"no incoming media message {wa_id!r} for company {runner.id!r} "
                       "(unknown id, not media, or older than journal.max_age)")
    if runner.state is not State.CONNECTED:
        raise ApiError(ErrorCode.NOT_CONNECTED, f"company {runner.id!r} is {runner.state}; media is downloaded from "
                       "WhatsApp and needs a connection")
    directory = daemon.config.daemon_state_dir / "tmp"
    directory.mkdir(mode=0o700, exist_ok=True)
    target = directory / f"download-{secrets.token_hex(8)}"
    try:
        result = await runner.command("download", {"message": media["raw"], "path": str(target)},
                                      timeout=daemon.config.outbox_send_timeout)
        data = await asyncio.to_thread(target.read_bytes)
    finally:
        target.unlink(missing_ok=True)
    return web.Response(body=data, content_type=str(result.get("mimetype") or media.get("mimetype")
                                                   or "application/octet-stream"))


# ------------------------------------------------------------------------------------ events


async def events(request: web.Request) -> web.StreamResponse:
    daemon = request.app[DAEMON]
    store, messaging = daemon.store, daemon.messaging
    since_text = request.query.get("since")
    if since_text is not None and not re.fullmatch(r"[0-9]{1,18}", since_text):
        raise ApiError(ErrorCode.BAD_REQUEST, "since must be a sequence number (0 for everything kept)")
    companies = frozenset(request.query.getall("company", []))
    for company in companies:
        try:
            check_company_id(company)
        except InvalidCompanyId as exc:
            raise ApiError(ErrorCode.INVALID_COMPANY_ID, str(exc)) from None
    types = frozenset(request.query.getall("type", []))
    unknown = sorted(types - set(EVENT_TYPES))
    if unknown:
        raise ApiError(ErrorCode.BAD_REQUEST, f"unknown event types {', '.join(unknown)}; known: {', '.join(EVENT_TYPES)}")
    # Subscribe before reading the backlog, so nothing committed in between is missed.
    sub = messaging.subscribe(companies, types)
    try:
        top = store.last_seq
        since = int(since_text) if since_text is not None else top
        if since > top:
            raise ApiError(ErrorCode.CURSOR_AHEAD, f"since={since} is ahead of the newest event ({top}); the journal "
                           "was reset or the cursor is from another daemon: resume from 0", last_seq=top)
        oldest = await store.oldest_seq()
        if since_text is not None and oldest is not None and 0 < since < oldest - 1:  # 0: all that is kept
            raise ApiError(ErrorCode.SINCE_EXPIRED, f"events after {since} were pruned by the retention policy; "
                           f"the oldest available is {oldest}: resume from {oldest - 1}", oldest_available=oldest)
        response = web.StreamResponse(headers={"Content-Type": "application/x-ndjson", "Cache-Control": "no-store"})
        await response.prepare(request)
        timeout = daemon.config.events_write_timeout

        async def write(*lines: bytes) -> None:
            # Several lines go out in one write (one send, one timeout), not one per event.
            await asyncio.wait_for(response.write(b"".join(lines)), timeout)

        def line(item: dict[str, Any]) -> bytes:
            return json.dumps(item, separators=(",", ":")).encode() + b"\n"

        last = since
        try:
            while last < top:
                batch = await store.events_after(last, 1000, companies, types, until=top)
                if not batch:
                    break
                await write(*(event.line() for event in batch))
                last = batch[-1].seq
            last = max(last, top)
            heartbeat = daemon.config.events_heartbeat_interval
            while True:
                try:
                    item = sub.queue.get_nowait()
                except asyncio.QueueEmpty:
                    if sub.overflowed:
                        # Cut off: everything buffered has been written, so say so now (not after
                        # a heartbeat interval of silence); it resumes from `last`.
                        item = None
                    else:
                        try:
                            item = await asyncio.wait_for(sub.queue.get(), heartbeat)
                        except TimeoutError:
                            await write(line({"type": "heartbeat", "at": iso(time.time()), "last_seq": last}))
                            continue
                # Take what else is already queued (up to a bound) and write it with this one.
                lines = []
                while item is not None:
                    seq, encoded = item
                    if seq > last:
                        lines.append(encoded)
                        last = seq
                    if len(lines) >= _STREAM_BATCH:
                        break
                    try:
                        item = sub.queue.get_nowait()
                    except asyncio.QueueEmpty:
                        break
                if lines:
                    await write(*lines)
                if item is None:
                    why = "this reader fell too far behind" if sub.overflowed else "the daemon is stopping"
                    await write(line({"type": "stream.end", "reason": "too_slow" if sub.overflowed else "daemon_stopping",
                                      "resume_from": last, "message": f"{why}; reconnect with since={last}"}))
                    break
        except (TimeoutError, ConnectionResetError):
            # A stalled reader (or one that went away): drop it, never wait for it.
            if request.transport is not None:
                request.transport.close()
        return response
    finally:
        messaging.unsubscribe(sub)


#: Live events written to a stream reader in one go, at most.
_STREAM_BATCH = 1000


# ----------------------------------------------------------------------------------- metrics


async def metrics(request: web.Request) -> web.Response:
    daemon = request.app[DAEMON]
    lines = [
        "# HELP whatsappd_up 1 while the daemon runs.", "# TYPE whatsappd_up gauge", "whatsappd_up 1",
        "# HELP whatsappd_uptime_seconds Seconds since the daemon started.",
        "# TYPE whatsappd_uptime_seconds gauge", f"whatsappd_uptime_seconds {time.time() - daemon.started_at:.3f}",
        "# HELP whatsappd_companies Companies by connection state.", "# TYPE whatsappd_companies gauge",
    ]
    counts = daemon.supervisor.counts()
    lines += [f'whatsappd_companies{{state="{s}"}} {counts.get(str(s), 0)}' for s in State]
    lines += ["# HELP whatsappd_worker_restarts_total Worker restarts per company.",
              "# TYPE whatsappd_worker_restarts_total counter"]
    lines += [f'whatsappd_worker_restarts_total{{company="{r.id}"}} {r.restarts}'
              for r in sorted(daemon.supervisor.companies.values(), key=lambda r: r.id)]
    lines += ["# HELP whatsappd_connected Whether a company is connected (1) or not (0).",
              "# TYPE whatsappd_connected gauge"]
    lines += [f'whatsappd_connected{{company="{r.id}"}} {int(r.state is State.CONNECTED)}'
              for r in sorted(daemon.supervisor.companies.values(), key=lambda r: r.id)]
    outbox = await daemon.store.counts()
    lines += ["# HELP whatsappd_outbox_messages Outgoing messages by status.", "# TYPE whatsappd_outbox_messages gauge"]
    lines += [f'whatsappd_outbox_messages{{status="{s}"}} {outbox.get(s, 0)}' for s in STATUSES]
    lines += ["# HELP whatsappd_journal_last_seq The newest event's sequence number.",
              "# TYPE whatsappd_journal_last_seq counter", f"whatsappd_journal_last_seq {daemon.store.last_seq}",
              "# HELP whatsappd_event_readers Live event stream readers.", "# TYPE whatsappd_event_readers gauge",
              f"whatsappd_event_readers {len(daemon.messaging.subscribers)}",
              "# HELP whatsappd_storage_full 1 while the disk holding the store is full (writes refused).",
              "# TYPE whatsappd_storage_full gauge", f"whatsappd_storage_full {int(daemon.store.full_since is not None)}",
              "# HELP whatsappd_storage_full_refusals_total Writes refused because the disk was full.",
              "# TYPE whatsappd_storage_full_refusals_total counter",
              f"whatsappd_storage_full_refusals_total {daemon.store.full_refusals}"]
    return web.Response(text="\n".join(lines) + "\n", content_type="text/plain",
                        headers={"X-Content-Format": "prometheus-0.0.4"})


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
    r.add_post("/v1/companies/{id}/messages", send_message)
    r.add_get("/v1/companies/{id}/messages/{mid}", get_message)
    r.add_get("/v1/companies/{id}/contacts/{phone}", check_contact)
    r.add_get("/v1/companies/{id}/media/{message_id}", get_media)
    r.add_get("/v1/events", events)
    r.add_get("/v1/metrics", metrics)
    r.add_post("/v1/reload", reload)
    r.add_get("/v1/openapi.json", openapi)
    return app
