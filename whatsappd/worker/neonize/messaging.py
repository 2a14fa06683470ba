"""The messaging commands of the neonize engine: send (exactly once, through the send log),
send_status, check_number and download; each given typed, already-valid arguments."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from whatsappd.errors import ErrorCode
from whatsappd.protocol import CheckNumber, Download, EngineError, Send, SendStatus
from whatsappd.timefmt import iso
from whatsappd.worker.durable import write_private
from whatsappd.worker.media import media_chunks
from whatsappd.worker.neonize.classify import classify_download_error, classify_send_error, is_not_connected
from whatsappd.worker.neonize.incoming import LID_SERVERS, PN_SERVER, decode_media_raw
from whatsappd.worker.neonize.lib import (
    JID,
    ChatPresence,
    ChatPresenceMedia,
    DownloadError,
    IsOnWhatsAppError,
    NeonizeError,
    SendMessageError,
)
from whatsappd.worker.neonize.media import build_message
from whatsappd.worker.neonize.sendlog import SendLog

__all__ = ["Messenger"]

#: Opens a Go call for messaging: the connected client, shared with other messaging calls
#: (not_connected if there is none, or while logout / pairing / stop holds Go alone).
GoCall = Callable[[str], contextlib.AbstractContextManager[Any]]


def _jid(user: str, server: str) -> JID:
    return JID(User=user, Server=server, Device=0, RawAgent=0, Integrator=0, IsEmpty=False)


class Messenger:
    """Carries out the messaging commands on the engine's client (see docs/INTERNALS.md)."""

    def __init__(self, send_log: SendLog, go_call: GoCall, connected_client: Callable[[str], Any],
                 clock: Callable[[], float], log: Any) -> None:
        self.send_log = send_log
        self._go_call = go_call
        self._connected_client = connected_client
        self._clock = clock
        self._log = log

    def send(self, send: Send) -> dict[str, Any]:
        """Send one message, at most once per outbox id (see sendlog.py).

        Order: the send log (an id already sent is answered from it, without a connection), the
        connection, the media file, building and uploading the media, then ``attempted``
        (fsync'ed), ``send_message``, ``sent``.
        """
        outbox_id = send.outbox_id
        previous = self.send_log.reserve(outbox_id)
        if previous is not None:
            self._log.warning("send_deduplicated", outbox_id=outbox_id, wa_id=previous["wa_id"])
            return {"wa_id": previous["wa_id"], "timestamp": previous["timestamp"]}
        try:
            self._connected_client("sending a message")  # before reading a big file for nothing
            if send.typing > 0:
                self._show_typing(send)
            data = None if send.media_path is None else b"".join(media_chunks(send.media_path, send.kind))
            with self._go_call("sending a message") as client:
                message = build_message(client, send, data)
                self._connected_client("sending a message")  # a stop may have come during the upload
                self.send_log.attempted(outbox_id)
                try:
                    response = client.send_message(_jid(send.to.user, send.to.server), message)
                except SendMessageError as exc:
                    code, permanent, reached = classify_send_error(str(exc))
                    self._log.warning("send_failed", outbox_id=outbox_id, code=code, error=str(exc),
                                      may_have_reached_whatsapp=reached)
                    if reached:
                        raise EngineError(
                            ErrorCode.SEND_INTERRUPTED,
                            f"WhatsApp did not confirm the send ({exc}); it may have been delivered, so it is not "
                            "sent again",
                            permanent=True,
                        ) from None
                    self.send_log.not_sent(outbox_id, code)
                    raise EngineError(code, f"WhatsApp did not take the message: {exc}", permanent) from None
                except Exception as exc:
                    self._log.exception("send_crashed", outbox_id=outbox_id)
                    raise EngineError(
                        ErrorCode.SEND_INTERRUPTED, f"the send ended in an unexpected error ({exc!r}); it may have been "
                        "delivered, so it is not sent again", permanent=True,
                    ) from None
            wa_id = str(response.ID)
            seconds = response.Timestamp if response.Timestamp > 0 else self._clock()
            record = self.send_log.sent(outbox_id, wa_id, iso(seconds))
            self._log.info("message_sent", outbox_id=outbox_id, wa_id=wa_id, kind=send.kind)
            return {"wa_id": record["wa_id"], "timestamp": record["timestamp"]}
        finally:
            self.send_log.release(outbox_id)

    def _show_typing(self, send: Send) -> None:
        """"typing…" to the recipient for send.typing seconds (pacing); the message then clears it.

        The presence is a Go call of its own and the wait holds none, so a logout or stop is not
        kept waiting. A refused presence is only logged: it is politeness, not the message.
        """
        jid = _jid(send.to.user, send.to.server)
        try:
            with self._go_call("showing typing") as client:
                client.send_chat_presence(jid, ChatPresence.CHAT_PRESENCE_COMPOSING,
                                          ChatPresenceMedia.CHAT_PRESENCE_MEDIA_TEXT)
        except NeonizeError as exc:
            self._log.warning("typing_presence_failed", outbox_id=send.outbox_id, error=str(exc))
            return
        self._log.info("typing_presence", outbox_id=send.outbox_id, seconds=send.typing)
        time.sleep(send.typing)

    def send_status(self, command: SendStatus) -> dict[str, Any]:
        """What the send log says of each outbox id (a file read: works before connecting)."""
        return {"statuses": self.send_log.statuses(list(command.outbox_ids))}

    def check_number(self, command: CheckNumber) -> dict[str, Any]:
        phone = command.phone
        with self._go_call("checking a number") as client:
            try:
                # whatsmeow wants the number with its "+" (it becomes the usync <contact> query)
                responses = list(client.is_on_whatsapp("+" + phone))
            except IsOnWhatsAppError as exc:
                message = str(exc)
                if message == "Function returned nothing.":  # neonize's words for an empty answer
                    responses = []
                elif is_not_connected(message):
                    raise EngineError(ErrorCode.NOT_CONNECTED, f"checking a number needs a live connection: {exc}") from None
                else:
                    raise EngineError(ErrorCode.CHECK_FAILED, f"WhatsApp did not answer the number check: {exc}") from None
            match = next((r for r in responses if r.Query.lstrip("+") == phone), None)
            if match is None and len(responses) == 1:
                match = responses[0]
            on_whatsapp = bool(match is not None and match.IsIn)
            jid = self._phone_jid(client, match.JID, phone) if on_whatsapp and match is not None else None
        return {"phone": phone, "on_whatsapp": on_whatsapp, "jid": jid}

    def _phone_jid(self, client: Any, jid: JID, phone: str) -> str:
        """The phone-number JID of a number check's answer (whatsmeow asks in LID addressing mode)."""
        if jid.User and jid.Server == PN_SERVER:
            return f"{jid.User}@{PN_SERVER}"
        if jid.User and jid.Server in LID_SERVERS:
            try:
                pn = client.get_pn_from_lid(_jid(jid.User, jid.Server))
                if pn.User and pn.Server == PN_SERVER:
                    return f"{pn.User}@{PN_SERVER}"
            except NeonizeError:
                pass
        return f"{phone}@{PN_SERVER}"

    def download(self, command: Download) -> dict[str, Any]:
        """Write the bytes of an incoming media message (its event's raw) to path, 0600."""
        message, media = decode_media_raw(command.message)
        with self._go_call("downloading media") as client:
            try:
                data = client.download_any(message)
            except DownloadError as exc:
                code, permanent = classify_download_error(str(exc))
                raise EngineError(code, f"the media could not be downloaded: {exc}", permanent) from None
        if not isinstance(data, bytes | bytearray):
            raise EngineError(ErrorCode.MEDIA_UNAVAILABLE, "WhatsApp returned no bytes for this media", permanent=True)
        try:
            size = write_private(Path(command.path), (bytes(data),))
        except OSError as exc:
            raise EngineError(ErrorCode.DOWNLOAD_FAILED, f"could not write the media to {command.path}: {exc}") from None
        return {"path": command.path, "size": size, "mimetype": media.mimetype or "application/octet-stream"}
