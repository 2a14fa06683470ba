"""What arrives, in protocol terms: neonize's message and receipt events -> message.incoming and
message.receipt events (pure functions of the real neonize objects), and back: the media
message behind an incoming event's `raw`, for `download`."""

from __future__ import annotations

import base64
import binascii
import time
from typing import Any

from whatsappd.errors import ErrorCode
from whatsappd.protocol import EngineError, IncomingEvent, ReceiptEvent
from whatsappd.timefmt import iso
from whatsappd.worker.neonize.lib import JID, DecodeError, Jid2String, MessageEv, MessageSource, Receipt, ReceiptEv, WAMessage

__all__ = ["PN_SERVER", "LID_SERVERS", "decode_media_raw", "incoming_event", "jid_string", "receipt_event"]

PN_SERVER = "s.whatsapp.net"
LID_SERVERS = frozenset({"lid", "hosted.lid"})
#: Chats whose messages are not conversations: contacts' status updates, broadcast lists,
#: channels.
_SKIPPED_SERVERS = frozenset({"broadcast", "newsletter"})
#: Containers whatsmeow normally opens itself (UnwrapRaw); opened again here in case.
_WRAPPERS = (
    "deviceSentMessage", "botInvokeMessage", "ephemeralMessage", "viewOnceMessage", "viewOnceMessageV2",
    "viewOnceMessageV2Extension", "lottieStickerMessage", "documentWithCaptionMessage", "editedMessage",
)
#: Message fields that are protocol plumbing, not something a person wrote: a message made of
#: these alone (key distribution, edits and deletions, reactions, poll votes, pins, ...) is skipped.
_PLUMBING = frozenset({
    "senderKeyDistributionMessage", "fastRatchetKeySenderKeyDistributionMessage", "messageContextInfo",
    "protocolMessage", "reactionMessage", "encReactionMessage", "pollUpdateMessage", "keepInChatMessage",
    "pinInChatMessage", "stickerSyncRmrMessage", "encEventResponseMessage", "encCommentMessage",
    "secretEncryptedMessage", "groupRootKeyShare", "rootSecretDistributeMessage", "messageHistoryNotice",
    "callLogMesssage", "bcallMessage", "placeholderMessage",
})
#: Media fields, the event kind, and the field the media goes under in `raw` (whatsmeow's
#: DownloadAny looks only at these five; a round video "ptv" is a VideoMessage).
_MEDIA = (
    ("imageMessage", "image", "imageMessage"),
    ("videoMessage", "video", "videoMessage"),
    ("ptvMessage", "video", "videoMessage"),
    ("audioMessage", "audio", "audioMessage"),
    ("documentMessage", "document", "documentMessage"),
    ("stickerMessage", "sticker", "stickerMessage"),
)
_DOWNLOADABLE = ("imageMessage", "videoMessage", "audioMessage", "documentMessage", "stickerMessage")
#: Heavy fields left out of `raw` (download needs none of them).
_RAW_DROP = ("JPEGThumbnail", "contextInfo", "pngThumbnail")
#: Receipt types reported for messages we sent; all others (our own devices' read-self and
#: played-self, sender, retry, server-error, inactive, peer, history sync) are skipped.
_RECEIPT_NAMES = {
    Receipt.ReceiptType.Value("DELIVERED"): "delivered",
    Receipt.ReceiptType.Value("READ"): "read",
    Receipt.ReceiptType.Value("PLAYED"): "played",
}


def _has_jid(message: Any, field: str) -> bool:
    return bool(message.HasField(field) and getattr(message, field).User)


def _plain_jid(jid: JID) -> str:
    """``user@server`` without agent or device: the form the CRM stores and sends to."""
    return f"{jid.User}@{jid.Server}" if jid.User else jid.Server


def _phone_first(jid: JID, alt: JID | None) -> JID:
    """A LID (WhatsApp's hidden id) replaced by the phone-number JID whatsmeow gave beside it."""
    if jid.Server in LID_SERVERS and alt is not None and alt.User and alt.Server == PN_SERVER:
        return alt
    return jid


def _source_jids(source: MessageSource) -> tuple[str, str]:
    """(chat, sender) of a message or receipt: plain JIDs, phone numbers rather than LIDs."""
    sender_alt = source.SenderAlt if _has_jid(source, "SenderAlt") else None
    sender = _phone_first(source.Sender, sender_alt)
    chat = source.Chat
    if chat.Server in LID_SERVERS and not source.IsGroup:
        if source.IsFromMe:
            chat = _phone_first(chat, source.RecipientAlt if _has_jid(source, "RecipientAlt") else None)
        elif chat.User == source.Sender.User:
            chat = _phone_first(chat, sender_alt)
    return _plain_jid(chat), _plain_jid(sender)


def _unwrap(message: WAMessage) -> WAMessage:
    for _ in range(len(_WRAPPERS)):
        for field in _WRAPPERS:
            if message.HasField(field) and getattr(message, field).HasField("message"):
                message = getattr(message, field).message
                break
        else:
            return message
    return message


def _kind_of(message: WAMessage) -> tuple[str, str | None] | None:
    """(kind, media field or None) of a message; None if it is protocol plumbing only."""
    present = [field.name for field, _ in message.ListFields()]
    if not [name for name in present if name not in _PLUMBING]:
        return None
    if "conversation" in present or "extendedTextMessage" in present:
        return "text", None
    for field, kind, _ in _MEDIA:
        if field in present:
            return kind, field
    return "other", None


def _raw_media(message: WAMessage, field: str) -> str:
    """base64 of a Message holding only the media (what download_any needs), thumbnails left out."""
    target = next(raw_field for name, _, raw_field in _MEDIA if name == field)
    media = type(getattr(message, field))()
    media.CopyFrom(getattr(message, field))
    for heavy in _RAW_DROP:
        if heavy in media.DESCRIPTOR.fields_by_name:
            media.ClearField(heavy)
    raw = WAMessage()
    getattr(raw, target).CopyFrom(media)
    return base64.b64encode(raw.SerializeToString()).decode("ascii")


def incoming_event(ev: MessageEv, now: float | None = None) -> IncomingEvent | None:
    """The ``message.incoming`` event for a neonize MessageEv, or None for one that is skipped.

    Skipped: protocol plumbing (see _PLUMBING: edits, deletions, reactions, key distribution, ...),
    status updates, broadcast lists and channels. Messages sent from the company's phone are kept,
    with ``from_me`` true. ``raw`` is there only for media.
    """
    info = ev.Info
    source = info.MessageSource
    if source.Chat.Server in _SKIPPED_SERVERS:
        return None
    message = ev.Message if ev.HasField("Message") else (ev.Raw if ev.HasField("Raw") else WAMessage())
    message = _unwrap(message)
    kinded = _kind_of(message)
    if kinded is None:
        return None
    kind, field = kinded
    chat, sender = _source_jids(source)
    millis = info.Timestamp
    when = millis / 1000 if millis > 0 else (time.time() if now is None else now)
    event: IncomingEvent = {
        "type": "message.incoming",
        "id": info.ID,
        "chat": chat,
        "sender": sender,
        "push_name": info.Pushname or None,
        "timestamp": iso(when),
        "is_group": bool(source.IsGroup),
        "from_me": bool(source.IsFromMe),
        "kind": kind,
        "text": None,
        "media": None,
    }
    if kind == "text":
        event["text"] = message.conversation if message.HasField("conversation") else message.extendedTextMessage.text
    elif field is not None:
        media = getattr(message, field)
        event["media"] = {
            "mimetype": media.mimetype or None,
            "size": int(media.fileLength) if media.HasField("fileLength") else None,
            "caption": getattr(media, "caption", "") or None,
            "filename": getattr(media, "fileName", "") or None,
        }
        event["raw"] = _raw_media(message, field)
    return event


def receipt_event(ev: ReceiptEv, now: float | None = None) -> ReceiptEvent | None:
    """The ``message.receipt`` event for a neonize ReceiptEv, or None for one that is skipped.

    Only delivered, read and played, from the other side (a receipt of our own devices is
    skipped). An unset type is skipped too: neonize leaves it unset for types it does not map,
    and reading it would give DELIVERED, the enum's first value.
    """
    if not ev.HasField("Type") or ev.Type not in _RECEIPT_NAMES or not ev.MessageIDs:
        return None
    source = ev.MessageSource
    if source.IsFromMe or source.Chat.Server in _SKIPPED_SERVERS:
        return None
    chat, sender = _source_jids(source)
    seconds = ev.Timestamp
    return {
        "type": "message.receipt",
        "ids": list(ev.MessageIDs),
        "chat": chat,
        "sender": sender,
        "receipt": _RECEIPT_NAMES[ev.Type],
        "timestamp": iso(seconds if seconds > 0 else (time.time() if now is None else now)),
    }




def jid_string(jid: JID | None) -> str | None:
    """whatsmeow's own form, device included: ``5511999999999:12@s.whatsapp.net``."""
    if jid is None or not jid.User:
        return None
    return str(Jid2String(jid))


def decode_media_raw(raw: str) -> tuple[WAMessage, Any]:
    """The Message behind an incoming media event's raw and its media part; media_unavailable."""
    unavailable = EngineError(ErrorCode.MEDIA_UNAVAILABLE, "'message' is not the raw of an incoming media message",
                              permanent=True)
    try:
        message = WAMessage.FromString(base64.b64decode(raw, validate=True))
    except (binascii.Error, ValueError, DecodeError):
        raise unavailable from None
    for field in _DOWNLOADABLE:
        if message.HasField(field):
            media = getattr(message, field)
            if media.mediaKey and (media.directPath or media.URL):
                return message, media
    raise unavailable
