"""The message routes: queue an outgoing message, read its status, check a number, fetch an
incoming message's media.

An outgoing message is checked whole before anything is stored (fields, recipient, ttl, media);
its media comes as base64 or as a path read beneath outbox.media_dirs (mediafile.py decides what
may be read).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import mimetypes
import os
import re
import secrets
from pathlib import Path
from typing import Any

from aiohttp import web

from whatsappd.control.bodies import json_seconds, read_json
from whatsappd.control.companies import company_state
from whatsappd.control.services import company_runner, services
from whatsappd.errors import ApiError, ErrorCode
from whatsappd.mediafile import MediaRefused, read_media
from whatsappd.protocol import MAX_TEXT
from whatsappd.recipients import InvalidRecipient, normalize_phone, normalize_recipient
from whatsappd.states import CANNOT_SEND, State
from whatsappd.store import IdempotencyConflict, MessageStatus, OutgoingMessage, Payload

__all__ = ["check_contact", "get_media", "get_message", "send_message"]

_MEDIA_KINDS = ("image", "document", "audio")
_MESSAGE_FIELDS = {"to", "text", "caption", "filename", "mimetype", "ttl", *_MEDIA_KINDS}

#: A message in these has no outcome yet: ?wait=sent waits through them.
_UNSETTLED = frozenset({MessageStatus.QUEUED, MessageStatus.SENDING})


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
    parts = services(request)
    config = parts.config()
    company, state = await company_state(request)  # whichever host owns it: the outbox is shared
    body = await read_json(request)
    if not isinstance(body, dict):
        raise ApiError(ErrorCode.INVALID_MESSAGE, "the body must be a JSON object")
    unknown = sorted(set(body) - _MESSAGE_FIELDS)
    if unknown:
        raise ApiError(ErrorCode.INVALID_MESSAGE, f"unknown fields: {', '.join(unknown)}; allowed: "
                       f"{', '.join(sorted(_MESSAGE_FIELDS))}")
    wait_bound = _wait_bound(request, config.outbox_max_wait)  # checked before anything is stored
    key = request.headers.get("Idempotency-Key")
    if key is not None and not re.fullmatch(r"[ -~]{1,255}", key):
        raise ApiError(ErrorCode.BAD_REQUEST, "Idempotency-Key must be 1 to 255 printable ASCII characters")
    if state in CANNOT_SEND:
        raise ApiError(ErrorCode.COMPANY_UNAVAILABLE, f"company {company!r} is {state}: messages cannot be "
                       "sent until it is connected again (connect, and pair if needed)")
    to = body.get("to")
    try:
        recipient = normalize_recipient(to, config.outbox_default_country) if isinstance(to, str) else None
    except InvalidRecipient as exc:
        raise ApiError(ErrorCode.INVALID_RECIPIENT, str(exc)) from None
    if recipient is None:
        raise ApiError(ErrorCode.INVALID_RECIPIENT, '"to" is required: a phone number in international format or a JID')
    kinds = [k for k in _MEDIA_KINDS if k in body]
    if len(kinds) > 1 or (kinds and "text" in body):
        raise ApiError(ErrorCode.INVALID_MESSAGE, 'send one of "text", "image", "document" or "audio"')
    ttl = config.outbox_default_ttl
    if "ttl" in body:
        try:
            ttl = json_seconds(body["ttl"])
        except ValueError:
            raise ApiError(ErrorCode.INVALID_MESSAGE, 'ttl must be a duration such as "1h" or seconds') from None
        if not 1 <= ttl <= config.outbox_max_ttl:
            raise ApiError(ErrorCode.INVALID_MESSAGE, f"ttl must be between 1s and outbox.max_ttl "
                           f"({config.outbox_max_ttl:g}s)")
    for name in ("caption", "filename", "mimetype"):
        if name in body and not isinstance(body[name], str):
            raise ApiError(ErrorCode.INVALID_MESSAGE, f'"{name}" must be a string')
    media: bytes | None = None
    if kinds:
        kind = kinds[0]
        data, filename, mimetype = await asyncio.to_thread(
            _media_bytes, body[kind], kind, config.outbox_max_file_size, config.outbox_media_dirs,
            config.daemon_state_dir)
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
        if len(text) > MAX_TEXT:
            raise ApiError(ErrorCode.INVALID_MESSAGE, f"the text is {len(text)} characters; at most {MAX_TEXT}")
        payload = {"text": text}
    try:
        created, message = await parts.messaging.enqueue(OutgoingMessage(
            company=company, recipient=recipient, to=str(to), kind=kind, payload=payload, media=media, ttl=ttl,
            idempotency_key=key, body=body))
    except IdempotencyConflict as exc:
        raise ApiError(ErrorCode.IDEMPOTENCY_KEY_REUSED, f"Idempotency-Key {key!r} was already used for message "
                       f"{exc.args[0]} with a different body; use a new key for a new message") from None
    if wait_bound is not None:
        message = await parts.messaging.wait_status(
            company, message["id"], lambda m: m["status"] not in _UNSETTLED, wait_bound) or message
    headers = {} if created else {"Idempotent-Replayed": "true"}
    return web.json_response(parts.messaging.with_pacing(message), status=202 if created else 200, headers=headers)


async def get_message(request: web.Request) -> web.Response:
    company, _ = await company_state(request)
    message_id = request.match_info["mid"]
    message = await services(request).store.message(company, message_id)
    if message is None:
        raise ApiError(ErrorCode.MESSAGE_NOT_FOUND, f"company {company!r} has no message {message_id!r}")
    return web.json_response(services(request).messaging.with_pacing(message))


async def check_contact(request: web.Request) -> web.Response:
    runner = company_runner(request)
    try:
        phone = normalize_phone(request.match_info["phone"], services(request).config().outbox_default_country)
    except InvalidRecipient as exc:
        raise ApiError(ErrorCode.INVALID_RECIPIENT, str(exc)) from None
    if runner.state is not State.CONNECTED:
        raise ApiError(ErrorCode.NOT_CONNECTED, f"company {runner.id!r} is {runner.state}; a number can be checked "
                       "only while connected")
    return web.json_response(await runner.command("check_number", {"phone": phone}))


async def get_media(request: web.Request) -> web.StreamResponse:
    parts = services(request)
    config = parts.config()
    runner = company_runner(request)
    wa_id = request.match_info["message_id"]
    media = await parts.store.incoming_media(runner.id, wa_id)
    if media is None:
        raise ApiError(ErrorCode.MEDIA_NOT_FOUND, f"no incoming media message {wa_id!r} for company {runner.id!r} "
                       "(unknown id, not media, or older than journal.max_age)")
    if runner.state is not State.CONNECTED:
        raise ApiError(ErrorCode.NOT_CONNECTED, f"company {runner.id!r} is {runner.state}; media is downloaded from "
                       "WhatsApp and needs a connection")
    directory = config.daemon_state_dir / "tmp"
    directory.mkdir(mode=0o700, exist_ok=True)
    target = directory / f"download-{secrets.token_hex(8)}"
    try:
        result = await runner.command("download", {"message": media["raw"], "path": str(target)},
                                      timeout=config.outbox_send_timeout)
        data = await asyncio.to_thread(target.read_bytes)
    finally:
        target.unlink(missing_ok=True)
    return web.Response(body=data, content_type=str(result.get("mimetype") or media.get("mimetype")
                                                   or "application/octet-stream"))

