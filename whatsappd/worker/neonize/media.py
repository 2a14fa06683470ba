"""Outgoing media: the waE2E message for a `send`, its media uploaded (nothing is sent yet)."""

from __future__ import annotations

import shutil
from typing import Any

from whatsappd.errors import ErrorCode
from whatsappd.protocol import EngineError, Send
from whatsappd.worker.neonize.classify import is_not_connected
from whatsappd.worker.neonize.lib import AudioMessage, MediaType, NeonizeError, UploadError, WAMessage, magic, neonize_ffmpeg

__all__ = ["build_message"]


def _magic_mime(data: bytes) -> str:
    """The MIME type libmagic sees, as neonize's builders and upload() sniff it."""
    try:
        return str(magic.from_buffer(data, mime=True))
    except Exception:  # noqa: BLE001
        return "application/octet-stream"


def _audio_seconds(data: bytes) -> int | None:
    """The duration ffprobe reads (None without ffprobe, or when it cannot tell)."""
    if shutil.which("ffprobe") is None:
        return None
    try:
        with neonize_ffmpeg.FFmpeg(data) as ffmpeg:
            duration = ffmpeg.extract_info().format.duration
        return max(0, int(float(duration))) if duration is not None else None
    except Exception:  # noqa: BLE001 - the duration is a nicety
        return None


def build_message(client: Any, send: Send, data: bytes | None) -> WAMessage:
    """The waE2E Message to send; media is uploaded here (nothing is sent to anyone yet).

    Captions are set after neonize's builders run, so neonize does not scan them for
    "@digits" mentions or "@…@g.us" group mentions (each of those costs an IQ); text is a
    plain ``conversation`` for the same reason (neonize's str path always builds an
    extendedTextMessage and parses mentions).
    """
    kind = send.kind
    if kind == "text":
        return WAMessage(conversation=send.text)
    assert data is not None
    try:
        if kind == "image":
            # neonize uploads with the media type libmagic sniffs: anything it does not call an
            # image would be encrypted with document keys under an imageMessage (undownloadable)
            sniffed = _magic_mime(data)
            if not sniffed.startswith("image/"):
                raise EngineError(ErrorCode.MEDIA_INVALID, f"the image file is not an image (it looks like {sniffed})",
                                  permanent=True)
            message = client.build_image_message(data)
            media = message.imageMessage
        elif kind == "document":
            message = client.build_document_message(data, filename=send.filename, mimetype=send.mimetype)
            media = message.documentMessage
        else:  # audio: neonize's builder needs ffprobe and sniffs the upload type; built here
            upload = client.upload(data, MediaType.MediaAudio)
            media = AudioMessage(
                URL=upload.url,
                directPath=upload.DirectPath,
                fileEncSHA256=upload.FileEncSHA256,
                fileLength=upload.FileLength,
                fileSHA256=upload.FileSHA256,
                mediaKey=upload.MediaKey,
                mimetype=send.mimetype or _magic_mime(data),
                PTT=False,
            )
            seconds = _audio_seconds(data)
            if seconds is not None:
                media.seconds = seconds
            message = WAMessage(audioMessage=media)
    except EngineError:
        raise
    except UploadError as exc:
        text = str(exc)
        if "status code 413" in text:
            raise EngineError(ErrorCode.TOO_LARGE, f"WhatsApp refused the upload: {exc}", permanent=True) from None
        if is_not_connected(text):
            raise EngineError(ErrorCode.NOT_CONNECTED, f"the media upload needs a live connection: {exc}") from None
        raise EngineError(ErrorCode.SEND_FAILED, f"the media upload failed, nothing was sent: {exc}") from None
    except NeonizeError as exc:
        raise EngineError(ErrorCode.SEND_FAILED, f"the media could not be prepared, nothing was sent: {exc}") from None
    except Exception as exc:  # PIL cannot decode the image, and the like
        raise EngineError(ErrorCode.MEDIA_INVALID, f"the {kind} file cannot be sent: {exc}", permanent=True) from None
    if send.caption is not None and kind in ("image", "document"):
        media.caption = send.caption
    if media.HasField("contextInfo") and media.contextInfo.ByteSize() == 0:
        media.ClearField("contextInfo")  # the builders leave empty mention lists behind
    return message
