"""The neonize engine's messaging (issue 4): real neonize event objects in, exact events out;
the durable send log; send / send_status / check_number / download with a client stand-in whose
builders are neonize's own; and the real client in a subprocess through a 127.0.0.1 proxy.

No test creates a neonize client in the pytest process (one client per process); the one that
needs a real client runs it in a subprocess, killed by pid. Nothing leaves the machine.
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import signal
import stat
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from whatsappd.testing.socks5 import Socks5FaultProxy
from whatsappd.worker.engine import EngineError, EngineOptions
from whatsappd.worker.media import MEDIA_LIMITS
from whatsappd.worker.neonize.classify import classify_download_error, classify_send_error
from whatsappd.worker.neonize.engine import NeonizeEngine
from whatsappd.worker.neonize.gogate import GoGate as _GoGate
from whatsappd.worker.neonize.incoming import incoming_event, receipt_event
from whatsappd.worker.neonize.replay import group, jid, lid, message_ev, pn, receipt_ev
from whatsappd.worker.neonize.sendlog import SEND_LOG_FILE, SendLog, SendLogCorrupt, read_send_log

from neonize.client import NewClient  # isort: skip  (imported by the engine above, side effects undone)
from neonize.events import ConnectedEv, DisconnectedEv, MessageEv  # isort: skip
from neonize.exc import (  # isort: skip
    DownloadError,
    IsOnWhatsAppError,
    SendMessageError,
    SendPresenceError,
    UploadError,
)
from neonize.proto.Neonize_pb2 import (  # isort: skip
    JID,
    Device,
    IsOnWhatsAppResponse,
    SendResponse,
    UploadResponse,
)
from neonize.proto.waE2E.WAWebProtobufsE2E_pb2 import (  # isort: skip
    AudioMessage,
    DocumentMessage,
    ExtendedTextMessage,
    FutureProofMessage,
    ImageMessage,
    LocationMessage,
    Message,
    MessageContextInfo,
    ProtocolMessage,
    ReactionMessage,
    SenderKeyDistributionMessage,
    StickerMessage,
    VideoMessage,
)
from neonize.utils.enum import ChatPresence, ChatPresenceMedia, MediaType  # isort: skip

pytestmark = pytest.mark.neonize

REPO = Path(__file__).resolve().parents[1]
NOW = 1_767_225_600.0  # 2026-01-01T00:00:00Z
CONTACT = "5511987654321"
ISO_MS = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")


ME = pn("5511999999999", device=12)


IMAGE = ImageMessage(
    URL="https://example.com/o1/v/t62.7118-24/f1/m231/abc.enc",
    mimetype="image/jpeg",
    caption="Fachada do imóvel",
    fileSHA256=b"\x01" * 32,
    fileLength=48213,
    height=1280,
    width=960,
    mediaKey=b"\x02" * 32,
    fileEncSHA256=b"\x03" * 32,
    directPath="/o1/v/t62.7118-24/f1/m231/abc.enc?ccb=9-4&oh=01&oe=68A",
    mediaKeyTimestamp=1_767_225_590,
    JPEGThumbnail=b"\xff\xd8\xff" + b"\x00" * 900,
)


# --------------------------------------------------------------------------- incoming messages


def test_text_from_a_contact() -> None:
    """A contact's text becomes a message.incoming event with plain JIDs, push name, ISO timestamp and no raw."""
    ev = message_ev(Message(conversation="Olá, o apartamento ainda está disponível?"))
    assert incoming_event(ev) == {
        "type": "message.incoming",
        "id": "3EB0C767D26A1D8D6F9E2A",
        "chat": "5511987654321@s.whatsapp.net",
        "sender": "5511987654321@s.whatsapp.net",
        "push_name": "Maria Souza",
        "timestamp": "2026-01-01T00:00:00.123Z",
        "is_group": False,
        "from_me": False,
        "kind": "text",
        "text": "Olá, o apartamento ainda está disponível?",
        "media": None,
    }


def test_extended_text_in_a_lid_group_names_the_sender_by_phone() -> None:
    """A group in LID addressing: Sender is the hidden id (with device), SenderAlt the phone."""
    msg = Message(
        extendedTextMessage=ExtendedTextMessage(text="Segue o link https://example.com/x", matchedText="x"),
        senderKeyDistributionMessage=SenderKeyDistributionMessage(groupID="120363025246125486@g.us",
                                                                  axolotlSenderKeyDistributionMessage=b"k"),
        messageContextInfo=MessageContextInfo(messageSecret=b"s" * 32),
    )
    ev = message_ev(msg, chat=group(), sender=lid("201234567890123", device=33),
                    sender_alt=pn(CONTACT, device=33), is_group=True)
    event = incoming_event(ev)
    assert event is not None
    assert (event["chat"], event["sender"], event["is_group"]) == (
        "120363025246125486@g.us", "5511987654321@s.whatsapp.net", True)
    assert (event["kind"], event["text"], event["media"]) == ("text", "Segue o link https://example.com/x", None)
    assert "raw" not in event


def test_lid_direct_chat_and_a_device_suffix_become_plain_phone_jids() -> None:
    """A LID chat and a device suffix become the plain phone JIDs whatsmeow gave beside them."""
    ev = message_ev(Message(conversation="oi"), chat=lid("201234567890123"), sender=lid("201234567890123", 2),
                    sender_alt=pn(CONTACT, 2))
    event = incoming_event(ev)
    assert event is not None
    assert (event["chat"], event["sender"]) == ("5511987654321@s.whatsapp.net", "5511987654321@s.whatsapp.net")
    # with no phone number beside it, the hidden id is all there is
    event = incoming_event(message_ev(Message(conversation="oi"), sender=lid("201234567890123", 2)))
    assert event is not None and (event["chat"], event["sender"]) == ("201234567890123@lid", "201234567890123@lid")


def test_a_message_sent_from_the_companys_phone_is_kept_with_from_me() -> None:
    """A message sent from the company's phone is kept, from_me true, its chat the recipient's phone JID."""
    ev = message_ev(Message(conversation="Bom dia! Posso ajudar?"), chat=lid("201234567890123"), sender=ME,
                    recipient_alt=pn(CONTACT), from_me=True, push_name="Imobiliaria Acme")
    event = incoming_event(ev)
    assert event is not None
    assert event["from_me"] is True
    assert event["chat"] == "5511987654321@s.whatsapp.net"
    assert event["sender"] == "5511999999999@s.whatsapp.net"
    assert event["push_name"] == "Imobiliaria Acme"


def test_image_with_caption() -> None:
    """An image becomes kind image with its media fields, and raw holds only the downloadable media, no thumbnail."""
    event = incoming_event(message_ev(Message(imageMessage=IMAGE)))
    assert event is not None
    raw = event.pop("raw")
    assert event == {
        "type": "message.incoming",
        "id": "3EB0C767D26A1D8D6F9E2A",
        "chat": "5511987654321@s.whatsapp.net",
        "sender": "5511987654321@s.whatsapp.net",
        "push_name": "Maria Souza",
        "timestamp": "2026-01-01T00:00:00.123Z",
        "is_group": False,
        "from_me": False,
        "kind": "image",
        "text": None,
        "media": {"mimetype": "image/jpeg", "size": 48213, "caption": "Fachada do imóvel", "filename": None},
    }
    # raw: the serialized waE2E Message with only the media, minus the thumbnail
    decoded = Message.FromString(base64.b64decode(raw, validate=True))
    assert [f.name for f, _ in decoded.ListFields()] == ["imageMessage"]
    assert decoded.imageMessage.mediaKey == IMAGE.mediaKey
    assert decoded.imageMessage.directPath == IMAGE.directPath
    assert decoded.imageMessage.fileEncSHA256 == IMAGE.fileEncSHA256
    assert not decoded.imageMessage.HasField("JPEGThumbnail")
    assert len(raw) < 400


@pytest.mark.parametrize(
    ("message", "kind", "media", "raw_field"),
    [
        (Message(documentMessage=DocumentMessage(
            URL="https://example.com/d/f/doc.enc", mimetype="application/pdf", title="contrato",
            fileLength=183_442, mediaKey=b"k" * 32, fileName="contrato.pdf", directPath="/v/t62.7119-24/doc.enc",
            caption="assinado")),
         "document", {"mimetype": "application/pdf", "size": 183_442, "caption": "assinado",
                      "filename": "contrato.pdf"}, "documentMessage"),
        (Message(audioMessage=AudioMessage(
            URL="https://example.com/a.enc", mimetype="audio/ogg; codecs=opus", fileLength=9_876, seconds=7,
            PTT=True, mediaKey=b"k" * 32, directPath="/v/t62.7117-24/a.enc", waveform=b"\x01" * 64)),
         "audio", {"mimetype": "audio/ogg; codecs=opus", "size": 9_876, "caption": None, "filename": None},
         "audioMessage"),
        (Message(videoMessage=VideoMessage(
            URL="https://example.com/v.enc", mimetype="video/mp4", fileLength=2_000_000, seconds=12,
            caption="tour", mediaKey=b"k" * 32, directPath="/v/t62.7161-24/v.enc", JPEGThumbnail=b"t" * 500)),
         "video", {"mimetype": "video/mp4", "size": 2_000_000, "caption": "tour", "filename": None},
         "videoMessage"),
        (Message(ptvMessage=VideoMessage(  # a round "video note" is downloadable as a video
            URL="https://example.com/p.enc", mimetype="video/mp4", fileLength=500_000, seconds=5,
            mediaKey=b"k" * 32, directPath="/v/t62.7161-24/p.enc")),
         "video", {"mimetype": "video/mp4", "size": 500_000, "caption": None, "filename": None}, "videoMessage"),
        (Message(stickerMessage=StickerMessage(
            URL="https://example.com/s.enc", mimetype="image/webp", fileLength=15_000, mediaKey=b"k" * 32,
            directPath="/v/t62.15575-24/s.enc", isAnimated=False, pngThumbnail=b"p" * 300)),
         "sticker", {"mimetype": "image/webp", "size": 15_000, "caption": None, "filename": None},
         "stickerMessage"),
        (Message(lottieStickerMessage=FutureProofMessage(message=Message(stickerMessage=StickerMessage(
            mimetype="application/was", fileLength=3_000, mediaKey=b"k" * 32, directPath="/l.enc",
            isLottie=True)))),
         "sticker", {"mimetype": "application/was", "size": 3_000, "caption": None, "filename": None},
         "stickerMessage"),
    ],
    ids=["document", "voice-note", "video", "ptv", "sticker", "lottie-sticker"],
)
def test_media_kinds(message: Message, kind: str, media: dict[str, Any], raw_field: str) -> None:
    """Each media type gets its kind and media fields, and a raw that download_any can use."""
    event = incoming_event(message_ev(message))
    assert event is not None
    assert (event["kind"], event["text"], event["media"]) == (kind, None, media)
    decoded = Message.FromString(base64.b64decode(event["raw"]))
    assert [f.name for f, _ in decoded.ListFields()] == [raw_field]
    for heavy in ("JPEGThumbnail", "pngThumbnail", "contextInfo"):
        part = getattr(decoded, raw_field)
        assert heavy not in part.DESCRIPTOR.fields_by_name or not part.HasField(heavy)


def test_wrappers_are_opened() -> None:
    """whatsmeow unwraps ephemeral / view-once / document-with-caption itself; so does the engine."""
    wrapped = Message(ephemeralMessage=FutureProofMessage(message=Message(viewOnceMessageV2=FutureProofMessage(
        message=Message(imageMessage=IMAGE)))))
    event = incoming_event(message_ev(wrapped))
    assert event is not None and event["kind"] == "image" and event["media"]["size"] == 48213
    doc = Message(documentWithCaptionMessage=FutureProofMessage(message=Message(documentMessage=DocumentMessage(
        fileName="planta.pdf", caption="planta", mimetype="application/pdf", fileLength=10, mediaKey=b"k",
        directPath="/d"))))
    event = incoming_event(message_ev(doc))
    assert event is not None and event["media"]["caption"] == "planta" and event["media"]["filename"] == "planta.pdf"


def test_other_content_is_kind_other_without_raw() -> None:
    """Content that is neither text nor media is kind other, without raw."""
    ev = message_ev(Message(locationMessage=LocationMessage(degreesLatitude=-23.56, degreesLongitude=-46.65,
                                                            name="Av. Paulista")))
    event = incoming_event(ev)
    assert event is not None
    assert (event["kind"], event["text"], event["media"]) == ("other", None, None)
    assert "raw" not in event


@pytest.mark.parametrize(
    "ev",
    [
        message_ev(Message(reactionMessage=ReactionMessage(text="👍"))),
        message_ev(Message(protocolMessage=ProtocolMessage(type=ProtocolMessage.REVOKE))),  # a deletion
        message_ev(Message(editedMessage=FutureProofMessage(message=Message(protocolMessage=ProtocolMessage(
            type=ProtocolMessage.Type.Value("MESSAGE_EDIT"), editedMessage=Message(conversation="x")))))),
        message_ev(Message(senderKeyDistributionMessage=SenderKeyDistributionMessage(groupID="g"),
                           messageContextInfo=MessageContextInfo(messageSecret=b"s")), chat=group(), is_group=True),
        message_ev(None),  # nothing decrypted
        message_ev(Message(conversation="minha viagem"), chat=jid("status", "broadcast"), is_group=True),
        message_ev(Message(conversation="news"), chat=jid("120363000000000000", "newsletter")),
    ],
    ids=["reaction", "revoke", "edit", "key-distribution", "empty", "status-update", "channel"],
)
def test_plumbing_and_non_conversations_are_skipped(ev: MessageEv) -> None:
    """Protocol plumbing, status updates, broadcasts and channels make no event."""
    assert incoming_event(ev) is None


def test_missing_timestamp_uses_the_clock() -> None:
    """A message without a timestamp is stamped with the engine's clock."""
    event = incoming_event(message_ev(Message(conversation="x"), millis=0), now=NOW)
    assert event is not None and event["timestamp"] == "2026-01-01T00:00:00.000Z"


def test_the_event_shapes_are_the_simulators(tmp_path: Path) -> None:
    """Same keys, same types, same timestamp format as SimulatorEngine's `simulate incoming`."""
    from whatsappd.worker.simulator.actions import incoming_event as simulated_incoming_event

    for sim_args, ours in (
        ({"kind": "text", "text": "oi"}, message_ev(Message(conversation="oi"))),
        ({"kind": "image", "caption": "c", "size": 10}, message_ev(Message(imageMessage=IMAGE))),
        ({"kind": "document", "filename": "a.pdf", "size": 10},
         message_ev(Message(documentMessage=DocumentMessage(fileName="a.pdf", mimetype="x/y", fileLength=1,
                                                            mediaKey=b"k", directPath="/d")))),
    ):
        expected = simulated_incoming_event(sim_args, tmp_path)
        event = incoming_event(ours)
        assert event is not None
        assert list(event) == list(expected)
        for key in expected:
            assert type(event[key]) is type(expected[key]) or expected[key] is None or event[key] is None, key
        if expected["media"] is not None:
            assert list(event["media"]) == list(expected["media"])
        assert ISO_MS.fullmatch(event["timestamp"]) and ISO_MS.fullmatch(expected["timestamp"])
    from whatsappd.worker.media import MEDIA_LIMITS as SIM_LIMITS  # one table for both engines

    assert MEDIA_LIMITS == SIM_LIMITS


# --------------------------------------------------------------------------- receipts


@pytest.mark.parametrize(("kind", "name"), [("DELIVERED", "delivered"), ("READ", "read"), ("PLAYED", "played")])
def test_receipts_for_our_messages(kind: str, name: str) -> None:
    """delivered, read and played receipts become message.receipt events with every id."""
    ev = receipt_ev(kind, ["3EB0AAAA0000000000000001", "3EB0AAAA0000000000000002"])
    assert receipt_event(ev) == {
        "type": "message.receipt",
        "ids": ["3EB0AAAA0000000000000001", "3EB0AAAA0000000000000002"],
        "chat": "5511987654321@s.whatsapp.net",
        "sender": "5511987654321@s.whatsapp.net",
        "receipt": name,
        "timestamp": "2026-01-01T00:01:00.000Z",
    }


def test_group_receipt_names_the_reader() -> None:
    """A group receipt names the group as chat and the reader's phone JID as sender."""
    ev = receipt_ev("READ", ["3EB0AAAA"], chat=group(), sender=lid("201234567890123", 4),
                    sender_alt=pn(CONTACT, 4), is_group=True)
    event = receipt_event(ev)
    assert event is not None
    assert (event["chat"], event["sender"], event["receipt"]) == (
        "120363025246125486@g.us", "5511987654321@s.whatsapp.net", "read")


@pytest.mark.parametrize(
    "kind",
    ["SENDER", "RETRY", "READ_SELF", "PLAYED_SELF", "SERVER_ERROR", "INACTIVE", "PEER_MSG", "HISTORY_SYNC", None],
)
def test_other_receipt_types_are_skipped(kind: str | None) -> None:
    # None: neonize leaves Type unset for a type it does not map (server-error, any new one); reading
    # it would say DELIVERED. (Go's proto.Marshal refuses such a receipt, so it should never come.)
    """Receipt types other than delivered, read and played make no event."""
    ev = receipt_ev(kind, ["3EB0AAAA"])
    assert receipt_event(ev) is None


def test_receipts_from_our_own_devices_are_skipped() -> None:
    """Receipts from the company's own devices, and receipts without ids, make no event."""
    assert receipt_event(receipt_ev("DELIVERED", ["3EB0AAAA"], sender=ME, from_me=True)) is None
    assert receipt_event(receipt_ev("READ", [])) is None


# --------------------------------------------------------------------------- the engine harness


class FakeClient:
    """A connected neonize client without Go: neonize's own builders, fake network calls."""

    # neonize's real code, run on this object (it uses only upload() and the mention parsers)
    build_image_message = NewClient.build_image_message
    build_document_message = NewClient.build_document_message
    _parse_mention = NewClient._parse_mention
    _parse_group_mention = NewClient._parse_group_mention

    def __init__(self, log_path: Path | None = None) -> None:
        self.me = Device(JID=ME, PushName="Imobiliaria Acme")
        self.sent: list[tuple[JID, Message]] = []
        self.uploads: list[tuple[int, MediaType | None]] = []
        self.log_at_send: list[list[dict[str, Any]]] = []
        self.log_path = log_path
        self.send_error: Exception | None = None
        self.upload_error: Exception | None = None
        self.hold: threading.Event | None = None
        self.in_send = threading.Event()
        self.numbers: list[IsOnWhatsAppResponse] = []
        self.number_error: Exception | None = None
        self.asked: list[str] = []
        self.download: bytes | Exception = b""
        self.stopped = 0
        self.presences: list[tuple[str, ChatPresence, ChatPresenceMedia, float]] = []  # (user, state, media, when)
        self.presence_error: Exception | None = None
        self.sent_at: list[float] = []

    def get_me(self) -> Device:
        return self.me

    def stop(self) -> None:
        self.stopped += 1

    def upload(self, binary: bytes, media_type: MediaType | None = None) -> UploadResponse:
        self.uploads.append((len(binary), media_type))
        if self.upload_error is not None:
            raise self.upload_error
        return UploadResponse(url="https://example.com/x.enc", DirectPath="/v/t62/x.enc", MediaKey=b"m" * 32,
                              FileEncSHA256=b"e" * 32, FileSHA256=b"s" * 32, FileLength=len(binary))

    def send_message(self, to: JID, message: Message) -> SendResponse:
        self.in_send.set()
        if self.log_path is not None:
            self.log_at_send.append(read_send_log(self.log_path.parent))
        if self.hold is not None:
            self.hold.wait(5)
        if self.send_error is not None:
            raise self.send_error
        self.sent.append((to, message))
        self.sent_at.append(time.monotonic())
        return SendResponse(ID=f"3EB0{len(self.sent):016X}", Timestamp=int(NOW) + 5, ServerID=0)

    def send_chat_presence(self, jid: JID, state: ChatPresence, media: ChatPresenceMedia) -> None:
        if self.presence_error is not None:
            raise self.presence_error
        self.presences.append((jid.User, state, media, time.monotonic()))

    def is_on_whatsapp(self, *numbers: str) -> list[IsOnWhatsAppResponse]:
        self.asked.extend(numbers)
        if self.number_error is not None:
            raise self.number_error
        return self.numbers

    def get_pn_from_lid(self, jid: JID) -> JID:
        return pn("5511988887777") if jid.User == "201234567890123" else JID()

    def download_any(self, message: Message) -> bytes:
        if isinstance(self.download, Exception):
            raise self.download
        return self.download


class Harness:
    def __init__(self, tmp_path: Path) -> None:
        self.session = tmp_path / "session-acme"
        self.session.mkdir(mode=0o700)
        self.messages: list[dict[str, Any]] = []
        options = EngineOptions(company="acme", session_dir=self.session, proxy=None, pair=False)
        self.engine = NeonizeEngine(options, self.messages.append, clock=lambda: NOW)
        self.client = FakeClient(self.session / SEND_LOG_FILE)
        self.log_path = self.session / SEND_LOG_FILE

    def connect(self) -> None:
        self.engine._client = self.client  # run() would have made it
        self.engine.on_connected(self.client, ConnectedEv(status=True))

    def send(self, **args: Any) -> dict[str, Any]:
        base: dict[str, Any] = {"outbox_id": "msg_01", "to": f"{CONTACT}@s.whatsapp.net", "kind": "text",
                                "text": "Olá!"}
        return self.engine.command("send", {**base, **args})

    def error(self, op: str, args: dict[str, Any]) -> EngineError:
        with pytest.raises(EngineError) as err:
            self.engine.command(op, args)
        return err.value

    def send_error(self, **args: Any) -> EngineError:
        with pytest.raises(EngineError) as err:
            self.send(**args)
        return err.value

    def log(self) -> list[dict[str, Any]]:
        return read_send_log(self.session)

    def write_log(self, *records: dict[str, Any], tail: bytes = b"") -> None:
        data = b"".join(json.dumps(r).encode() + b"\n" for r in records) + tail
        self.log_path.write_bytes(data)
        self.log_path.chmod(0o600)


@pytest.fixture
def h(tmp_path: Path) -> Harness:
    return Harness(tmp_path)


def test_handlers_emit_events(h: Harness) -> None:
    """on_message and on_receipt emit event messages, skipping what makes no event."""
    h.engine.on_message(h.client, message_ev(Message(conversation="oi")))
    h.engine.on_message(h.client, message_ev(Message(reactionMessage=ReactionMessage(text="x"))))  # skipped
    h.engine.on_receipt(h.client, receipt_ev("READ", ["3EB0AAAA"]))
    h.engine.on_receipt(h.client, receipt_ev("READ_SELF", ["3EB0AAAA"]))  # skipped
    assert [(m["type"], m["event"]["type"]) for m in h.messages] == [
        ("event", "message.incoming"), ("event", "message.receipt")]
    assert h.messages[0]["event"]["text"] == "oi"


def test_a_failing_event_handler_does_not_end_the_engine(h: Harness) -> None:
    """A message handler that raises is logged; the engine carries on."""
    guarded = h.engine._guard_event(h.engine.on_message)
    guarded(h.client, object())  # not a MessageEv: the handler raises inside
    assert h.engine.exit_code is None


# --------------------------------------------------------------------------- send: text and the log


def test_send_text_logs_attempted_before_the_network_and_sent_after(h: Harness) -> None:
    """A text send is a plain conversation; attempted is on disk before the network call, sent after it, 0600."""
    h.connect()
    result = h.send()
    assert result == {"wa_id": "3EB00000000000000001", "timestamp": "2026-01-01T00:00:05.000Z"}
    to, message = h.client.sent[0]
    assert (to.User, to.Server, to.Device) == (CONTACT, "s.whatsapp.net", 0)
    assert message == Message(conversation="Olá!")  # no mention parsing, no extendedTextMessage
    # while send_message ran, "attempted" was already on disk
    assert h.client.log_at_send == [[{"outbox_id": "msg_01", "state": "attempted", "at": "2026-01-01T00:00:00.000Z"}]]
    assert h.log() == [
        {"outbox_id": "msg_01", "state": "attempted", "at": "2026-01-01T00:00:00.000Z"},
        {"outbox_id": "msg_01", "state": "sent", "wa_id": "3EB00000000000000001",
         "timestamp": "2026-01-01T00:00:05.000Z"},
    ]
    assert stat.S_IMODE(h.log_path.stat().st_mode) == 0o600


def test_send_to_a_group(h: Harness) -> None:
    """A group JID is sent to as the group (server g.us)."""
    h.connect()
    h.send(to="120363025246125486@g.us")
    assert (h.client.sent[0][0].User, h.client.sent[0][0].Server) == ("120363025246125486", "g.us")


def test_a_sent_message_is_never_sent_again(h: Harness) -> None:
    """An outbox id already sent is answered from the send log, even by a new engine not connected."""
    h.connect()
    first = h.send()
    assert h.send() == first
    assert len(h.client.sent) == 1
    # and from the log alone, in a new engine that is not even connected
    again = NeonizeEngine(EngineOptions(company="acme", session_dir=h.session, proxy=None, pair=False),
                          lambda m: None)
    assert again.command("send", {"outbox_id": "msg_01", "to": f"{CONTACT}@s.whatsapp.net", "text": "x"}) == first


def test_an_attempt_never_confirmed_is_not_sent_again(h: Harness) -> None:
    """An outbox id left attempted is refused with send_interrupted (permanent) and never sent."""
    h.write_log({"outbox_id": "msg_01", "state": "attempted", "at": "2025-12-31T23:59:00.000Z"})
    h.connect()
    err = h.send_error()
    assert (err.code, err.permanent) == ("send_interrupted", True)
    assert h.client.sent == [] and not h.client.in_send.is_set()
    assert len(h.log()) == 1


def test_send_while_not_connected_writes_nothing(h: Harness) -> None:
    """A send while not connected is a transient not_connected and writes no log."""
    err = h.send_error()
    assert (err.code, err.permanent) == ("not_connected", False)
    assert not h.log_path.exists()
    h.connect()
    h.engine.on_disconnected(h.client, DisconnectedEv(status=True))
    err = h.send_error()
    assert err.code == "not_connected"
    assert not h.log_path.exists()


@pytest.mark.parametrize(
    ("text", "code", "permanent", "state"),
    [
        ("no LID found for 5511987650000@s.whatsapp.net from server", "not_on_whatsapp", True, "unknown"),
        ("failed to get group members: that group does not exist", "invalid_recipient", True, "unknown"),
        ("failed to get device list: info query timed out", "send_failed", False, "unknown"),
        ("failed to send message node: websocket not connected", "not_connected", False, "unknown"),
        ("server returned error 479", "send_failed", False, "unknown"),
        ("timed out waiting for message send response", "send_interrupted", True, "attempted"),
        ("websocket disconnected before message send returned response", "send_interrupted", True, "attempted"),
        ("something whatsmeow never said before", "send_interrupted", True, "attempted"),
    ],
)
def test_send_errors(h: Harness, text: str, code: str, permanent: bool, state: str) -> None:
    """Each whatsmeow send error maps to its code; a retry is allowed only if nothing can have reached WhatsApp."""
    h.connect()
    h.client.send_error = SendMessageError(text)
    err = h.send_error()
    assert (err.code, err.permanent) == (code, permanent)
    assert h.engine.command("send_status", {"outbox_ids": ["msg_01"]}) == {"statuses": {"msg_01": {"state": state}}}
    h.client.send_error = None
    if state == "unknown":  # provably not sent: a retry sends it
        assert h.send()["wa_id"] == "3EB00000000000000001"
        assert [r["state"] for r in h.log()] == ["attempted", "not_sent", "attempted", "sent"]
    else:  # may have reached WhatsApp: never again
        assert h.send_error().code == "send_interrupted"
        assert h.client.sent == []


# ------------------------------------------------------------------------- pacing (issue 12)


def test_a_send_with_typing_shows_composing_to_the_recipient_for_that_long_first(h: Harness) -> None:
    """typing=0.2: a composing text presence to the recipient, then the message at least 0.2 s later."""
    h.connect()
    h.send(typing=0.2)
    assert [(user, state, media) for user, state, media, _ in h.client.presences] == [
        (CONTACT, ChatPresence.CHAT_PRESENCE_COMPOSING, ChatPresenceMedia.CHAT_PRESENCE_MEDIA_TEXT)]
    assert h.client.sent_at[0] - h.client.presences[0][3] >= 0.2


def test_a_refused_typing_presence_does_not_stop_the_message(h: Harness) -> None:
    """send_chat_presence failing is logged; the message is still sent, once."""
    h.connect()
    h.client.presence_error = SendPresenceError("presence refused")
    assert h.send(typing=0.1)["wa_id"] and len(h.client.sent) == 1 and h.client.presences == []


def test_a_send_whatsapp_rate_limits_is_not_sent_and_may_be_retried(h: Harness) -> None:
    """server returned error 463: rate_limited, not permanent, the send log says not_sent (a later send goes)."""
    h.connect()
    h.client.send_error = SendMessageError("server returned error 463")
    error = h.send_error()
    assert error.code == "rate_limited" and not error.permanent
    assert [r["state"] for r in h.log()] == ["attempted", "not_sent"]
    h.client.send_error = None
    assert h.send()["wa_id"] and len(h.client.sent) == 1


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("timed out waiting for message send response", ("send_interrupted", True, True)),
        ("websocket not connected", ("send_interrupted", True, True)),  # retryFrame after the first write
        ("failed to send message node: websocket not connected", ("not_connected", False, False)),
        ("failed to get group members: you're not participating in that group", ("invalid_recipient", True, False)),
        ("failed to get group members: info query timed out", ("send_failed", False, False)),
        ("failed to get device list: failed to send usync query: websocket not connected",
         ("not_connected", False, False)),
        ("failed to get user info for 5511@s.whatsapp.net to fill LID cache: websocket disconnected before info "
         "query returned response", ("not_connected", False, False)),
        ("message recipient must be a user JID with no device part", ("invalid_recipient", True, False)),
        ("can't send message to unknown server lid2", ("invalid_recipient", True, False)),
        ("the store doesn't contain a device JID", ("not_connected", False, False)),
        ("failed to get user info for 5511@s.whatsapp.net to fill LID cache: info query timed out",
         ("send_failed", False, False)),
        ("can't encrypt message for device: no signal session established", ("send_failed", False, False)),
        ("proto: cannot parse invalid wire-format data", ("send_failed", False, False)),
        ("context deadline exceeded", ("send_interrupted", True, True)),
        # WhatsApp refuses the number's sending: the outbox pauses the company (pacing)
        ("server returned error 463", ("rate_limited", False, False)),
        ("failed to get device list: info query returned status 429: rate-overlimit", ("rate_limited", False, False)),
        ("server returned error 479", ("send_failed", False, False)),
    ],
)
def test_classify_send_error(text: str, expected: tuple[str, bool, bool]) -> None:
    """classify_send_error maps whatsmeow's wording to (code, permanent, may_have_reached_whatsapp)."""
    assert classify_send_error(text) == expected


def test_the_same_message_twice_at_once(h: Harness) -> None:
    """A second send of an outbox id while the first runs is a transient send_in_progress; one message goes out."""
    h.connect()
    h.client.hold = threading.Event()
    results: list[Any] = []
    first = threading.Thread(target=lambda: results.append(h.send()))
    first.start()
    assert h.client.in_send.wait(5)
    err = h.send_error()
    assert (err.code, err.permanent) == ("send_in_progress", False)
    h.client.hold.set()
    first.join(5)
    assert len(h.client.sent) == 1 and results[0]["wa_id"]


def test_send_arguments(h: Harness) -> None:
    """Bad send arguments are permanent errors with their codes, and nothing is logged."""
    h.connect()
    for args, code in (
        ({"to": "+55 11 98765-4321"}, "invalid_recipient"),
        ({"to": "5511987654321:12@s.whatsapp.net"}, "invalid_recipient"),
        ({"to": "201234567890123@lid"}, "invalid_recipient"),
        ({"outbox_id": ""}, "invalid_argument"),
        ({"kind": "sticker"}, "invalid_argument"),
        ({"text": ""}, "invalid_argument"),
        ({"text": "x" * 65537}, "too_large"),
        ({"kind": "image", "media_path": None}, "media_invalid"),
    ):
        err = h.send_error(**args)
        assert (err.code, err.permanent) == (code, True), args
    assert not h.log_path.exists()


# --------------------------------------------------------------------------- send: media


def png_bytes(size: tuple[int, int] = (64, 48)) -> bytes:
    from PIL import Image

    out = io.BytesIO()
    Image.new("RGB", size, (200, 30, 30)).save(out, format="PNG")
    return out.getvalue()


def test_send_image_through_neonizes_builder(h: Harness, tmp_path: Path) -> None:
    """An image goes through neonize's builder: caption set afterwards (no mention parsing), type as libmagic sees it."""
    media = tmp_path / "foto.png"
    media.write_bytes(png_bytes())
    h.connect()
    h.send(kind="image", text=None, caption="Fachada @5511999999999", mimetype="image/jpeg", media_path=str(media))
    message = h.client.sent[0][1]
    assert [f.name for f, _ in message.ListFields()] == ["imageMessage"]
    image = message.imageMessage
    assert image.caption == "Fachada @5511999999999"
    assert not image.HasField("contextInfo")  # set after the builder: no mention parsing
    assert image.mimetype == "image/png"  # what the bytes are (libmagic), as neonize sets it
    assert image.fileLength == media.stat().st_size and image.mediaKey == b"m" * 32
    assert image.JPEGThumbnail.startswith(b"\xff\xd8\xff")  # neonize's thumbnail
    assert h.client.uploads == [(media.stat().st_size, None)]  # neonize sniffs the type: an image
    assert [r["state"] for r in h.log()] == ["attempted", "sent"]


def test_send_document(h: Harness, tmp_path: Path) -> None:
    """A document keeps its file name, MIME type and caption, uploaded as a document."""
    media = tmp_path / "contrato.pdf"
    media.write_bytes(b"%PDF-1.4\n" + b"0" * 2000)
    h.connect()
    h.send(kind="document", text=None, caption="Contrato", filename="contrato.pdf", mimetype="application/pdf",
           media_path=str(media))
    doc = h.client.sent[0][1].documentMessage
    assert (doc.fileName, doc.mimetype, doc.caption, doc.fileLength) == (
        "contrato.pdf", "application/pdf", "Contrato", media.stat().st_size)
    assert h.client.uploads == [(media.stat().st_size, MediaType.MediaDocument)]


def test_send_audio(h: Harness, tmp_path: Path) -> None:
    """Audio is built by the engine and uploaded as audio whatever libmagic says."""
    media = tmp_path / "audio.ogg"
    media.write_bytes(b"OggS" + b"\x00" * 3000)
    h.connect()
    h.send(kind="audio", text=None, mimetype="audio/ogg; codecs=opus", media_path=str(media))
    audio = h.client.sent[0][1].audioMessage
    assert (audio.mimetype, audio.fileLength, audio.PTT, audio.directPath) == (
        "audio/ogg; codecs=opus", 3004, False, "/v/t62/x.enc")
    assert h.client.uploads == [(3004, MediaType.MediaAudio)]  # uploaded as audio whatever libmagic says


def test_media_that_cannot_be_sent(h: Harness, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A non-image image, a missing, empty or oversized file is a permanent media_invalid or too_large, nothing uploaded."""
    h.connect()
    not_image = tmp_path / "a.png"
    not_image.write_bytes(b"not an image at all" * 10)
    empty = tmp_path / "empty.pdf"
    empty.write_bytes(b"")
    big = tmp_path / "big.pdf"
    big.write_bytes(b"x" * 2048)
    monkeypatch.setitem(MEDIA_LIMITS, "document", 1024)
    for kind, path, code in (
        ("image", not_image, "media_invalid"),
        ("document", tmp_path / "missing.pdf", "media_invalid"),
        ("document", tmp_path, "media_invalid"),  # a directory
        ("document", empty, "media_invalid"),
        ("document", big, "too_large"),
    ):
        err = h.send_error(kind=kind, text=None, media_path=str(path))
        assert (err.code, err.permanent) == (code, True), (kind, path)
    assert h.client.uploads == [] and not h.log_path.exists()


def test_upload_failures(h: Harness, tmp_path: Path) -> None:
    """Upload failures map to send_failed, not_connected or too_large, and nothing is logged as attempted."""
    media = tmp_path / "c.pdf"
    media.write_bytes(b"%PDF-1.4 x")
    h.connect()
    for text, code, permanent in (
        ("failed to execute request: Post ...: EOF", "send_failed", False),
        ("failed to refresh media connections: websocket not connected", "not_connected", False),
        ("upload failed with status code 413", "too_large", True),
    ):
        h.client.upload_error = UploadError(text)
        err = h.send_error(kind="document", text=None, media_path=str(media))
        assert (err.code, err.permanent) == (code, permanent)
    assert not h.log_path.exists()  # an upload sends nothing to anyone


# --------------------------------------------------------------------------- send_status and the log file


def test_send_status_from_a_prepared_log_before_connecting(h: Harness) -> None:
    """send_status answers sent, attempted or unknown from the log alone, before connecting."""
    h.write_log(
        {"outbox_id": "msg_sent", "state": "attempted", "at": "2026-01-01T00:00:00.000Z"},
        {"outbox_id": "msg_sent", "state": "sent", "wa_id": "3EB0AB", "timestamp": "2026-01-01T00:00:01.000Z"},
        {"outbox_id": "msg_lost", "state": "attempted", "at": "2026-01-01T00:00:02.000Z"},
        {"outbox_id": "msg_refused", "state": "attempted", "at": "2026-01-01T00:00:03.000Z"},
        {"outbox_id": "msg_refused", "state": "not_sent", "code": "send_failed", "at": "2026-01-01T00:00:03.500Z"},
    )
    ids = ["msg_sent", "msg_lost", "msg_refused", "msg_never"]
    assert h.engine.command("send_status", {"outbox_ids": ids}) == {"statuses": {
        "msg_sent": {"state": "sent", "wa_id": "3EB0AB", "timestamp": "2026-01-01T00:00:01.000Z"},
        "msg_lost": {"state": "attempted"},
        "msg_refused": {"state": "unknown"},
        "msg_never": {"state": "unknown"},
    }}
    assert h.error("send_status", {"outbox_ids": "msg_sent"}).code == "invalid_argument"


def test_a_torn_last_line_is_cut_off(h: Harness) -> None:
    """A crash in the middle of appending "sent": the attempt stays unconfirmed."""
    h.write_log({"outbox_id": "msg_01", "state": "attempted", "at": "2026-01-01T00:00:00.000Z"},
                tail=b'{"outbox_id":"msg_01","state":"sent","wa_id":"3EB0')
    assert h.engine.command("send_status", {"outbox_ids": ["msg_01"]})["statuses"]["msg_01"] == {"state": "attempted"}
    assert h.log_path.read_bytes().endswith(b"}\n")
    h.connect()
    h.send(outbox_id="msg_02")
    assert [r["outbox_id"] for r in h.log()] == ["msg_01", "msg_02", "msg_02"]


def test_a_corrupt_log_stops_sending(h: Harness) -> None:
    """A corrupt line in the send log makes sends and status questions fail with send_log_unusable."""
    h.write_log({"outbox_id": "msg_01", "state": "sent", "wa_id": "3EB0", "timestamp": "x"})
    h.log_path.write_bytes(h.log_path.read_bytes() + b"garbage\n")
    h.connect()
    assert (h.send_error().code, h.send_error().permanent) == ("send_log_unusable", False)
    assert h.error("send_status", {"outbox_ids": ["msg_01"]}).code == "send_log_unusable"
    assert h.client.sent == []
    with pytest.raises(SendLogCorrupt):
        read_send_log(h.session)


def test_a_big_log_is_compacted_at_load(h: Harness, monkeypatch: pytest.MonkeyPatch) -> None:
    """A log over the compaction size is rewritten at load: one line per outbox id, old ids dropped."""
    monkeypatch.setattr("whatsappd.worker.neonize.sendlog.SEND_LOG_COMPACT_BYTES", 200)
    old, recent = "2025-10-01T00:00:00.000Z", "2025-12-31T00:00:00.000Z"
    h.write_log(
        {"outbox_id": "msg_old", "state": "attempted", "at": old},
        {"outbox_id": "msg_old", "state": "sent", "wa_id": "3EB0OLD", "timestamp": old},
        {"outbox_id": "msg_new", "state": "attempted", "at": recent},
        {"outbox_id": "msg_new", "state": "sent", "wa_id": "3EB0NEW", "timestamp": recent},
        {"outbox_id": "msg_lost", "state": "attempted", "at": recent},
    )
    log = SendLog(h.session, clock=lambda: NOW)
    assert log.status("msg_new") == {"state": "sent", "wa_id": "3EB0NEW", "timestamp": recent}
    assert [(r["outbox_id"], r["state"]) for r in read_send_log(h.session)] == [
        ("msg_new", "sent"), ("msg_lost", "attempted")]
    assert stat.S_IMODE(h.log_path.stat().st_mode) == 0o600


# --------------------------------------------------------------------------- check_number


def test_check_number_on_whatsapp_with_a_lid_answer(h: Harness) -> None:
    """check_number answers with the phone JID even when WhatsApp answers with a LID."""
    h.connect()
    h.client.numbers = [IsOnWhatsAppResponse(Query="+5511988887777", JID=lid("201234567890123"), IsIn=True)]
    assert h.engine.command("check_number", {"phone": "5511988887777"}) == {
        "phone": "5511988887777", "on_whatsapp": True, "jid": "5511988887777@s.whatsapp.net"}
    assert h.client.asked == ["+5511988887777"]  # whatsmeow wants the "+"


def test_check_number_pn_answer_and_not_on_whatsapp(h: Harness) -> None:
    """check_number keeps WhatsApp's canonical number, and says false (jid null) for a number not on WhatsApp."""
    h.connect()
    h.client.numbers = [IsOnWhatsAppResponse(Query="+551188887777", JID=pn("5511988887777"), IsIn=True)]
    # the server's canonical number wins (Brazil's ninth digit)
    assert h.engine.command("check_number", {"phone": "551188887777"})["jid"] == "5511988887777@s.whatsapp.net"
    h.client.numbers = [IsOnWhatsAppResponse(Query="+5511987650000", JID=pn("5511987650000"), IsIn=False)]
    assert h.engine.command("check_number", {"phone": "5511987650000"}) == {
        "phone": "5511987650000", "on_whatsapp": False, "jid": None}
    h.client.number_error = IsOnWhatsAppError("Function returned nothing.")
    assert h.engine.command("check_number", {"phone": "5511987650000"})["on_whatsapp"] is False


def test_check_number_errors(h: Harness) -> None:
    """check_number errors: not_connected, invalid_phone, check_failed (transient), not_connected on a dropped socket."""
    assert h.error("check_number", {"phone": "5511988887777"}).code == "not_connected"
    assert h.error("check_number", {"phone": "+5511988887777"}).code == "invalid_phone"
    h.connect()
    h.client.number_error = IsOnWhatsAppError("info query timed out")
    err = h.error("check_number", {"phone": "5511988887777"})
    assert (err.code, err.permanent) == ("check_failed", False)
    h.client.number_error = IsOnWhatsAppError("websocket disconnected before info query returned response")
    assert h.error("check_number", {"phone": "5511988887777"}).code == "not_connected"


# --------------------------------------------------------------------------- download


def raw_of(message: Message) -> str:
    event = incoming_event(message_ev(message))
    assert event is not None
    return str(event["raw"])


def test_download_writes_a_private_file(h: Harness, tmp_path: Path) -> None:
    """download writes the media bytes to a 0600 file and answers path, size and MIME type."""
    h.connect()
    h.client.download = b"\xff\xd8\xff" + b"j" * 1000
    target = tmp_path / "out.bin"
    result = h.engine.command("download", {"message": raw_of(Message(imageMessage=IMAGE)), "path": str(target)})
    assert result == {"path": str(target), "size": 1003, "mimetype": "image/jpeg"}
    assert target.read_bytes() == h.client.download
    assert stat.S_IMODE(target.stat().st_mode) == 0o600


@pytest.mark.parametrize(
    "raw",
    [
        "not base64 at all!",
        base64.b64encode(b"\xff\xfe garbage that is no protobuf").decode(),
        base64.b64encode(Message(conversation="oi").SerializeToString()).decode(),  # no media in it
        base64.b64encode(Message(imageMessage=ImageMessage(mimetype="image/jpeg")).SerializeToString()).decode(),
        "",
        None,
    ],
)
def test_download_of_a_bad_raw_is_media_unavailable(h: Harness, tmp_path: Path, raw: Any) -> None:
    """A raw that is not an incoming media message is a permanent media_unavailable."""
    h.connect()
    err = h.error("download", {"message": raw, "path": str(tmp_path / "x")})
    assert (err.code, err.permanent) == ("media_unavailable", True)


def test_download_errors(h: Harness, tmp_path: Path) -> None:
    """Download errors map to not_connected, media_unavailable (permanent) or download_failed."""
    raw = raw_of(Message(imageMessage=IMAGE))
    assert h.error("download", {"message": raw, "path": str(tmp_path / "x")}).code == "not_connected"
    h.connect()
    h.client.download = DownloadError("download failed with status code 404")
    err = h.error("download", {"message": raw, "path": str(tmp_path / "x")})
    assert (err.code, err.permanent) == ("media_unavailable", True)
    assert not (tmp_path / "x").exists()
    assert classify_download_error("failed to refresh media connections: websocket not connected") == (
        "not_connected", False)
    assert classify_download_error("failed to download media from last host: dial tcp: i/o timeout") == (
        "download_failed", False)
    assert classify_download_error("invalid media hmac") == ("media_unavailable", True)


# --------------------------------------------------------------------------- the Go gate


def test_go_gate_stop_waits_for_messaging_and_keeps_new_calls_out() -> None:
    """The Go gate: messaging calls share it, Stop waits for them and, waiting, keeps new calls out."""
    gate = _GoGate()
    assert gate.acquire_shared()
    assert gate.acquire_shared()  # messaging calls run side by side
    assert not gate.acquire_exclusive(timeout=0.05)  # Stop() waits for them
    got = threading.Event()

    def stop() -> None:
        gate.acquire_exclusive()
        got.set()

    stopper = threading.Thread(target=stop)
    stopper.start()
    threading.Event().wait(0.05)
    assert not gate.acquire_shared(timeout=0.05)  # a waiting Stop() keeps new calls out
    gate.release_shared()
    gate.release_shared()
    assert got.wait(2)
    stopper.join(2)
    gate.release_exclusive()
    assert gate.acquire_shared(timeout=0.05)


# --------------------------------------------------------------------------- the real client


CHILD = textwrap.dedent(
    """
    import ctypes, json, os, sys, threading, time
    from pathlib import Path
    from whatsappd.worker.engine import EngineError, EngineOptions
    from whatsappd.worker.neonize.engine import NeonizeEngine
    from test_neonize_messaging import Message, message_ev, pn, receipt_ev  # the same event builders

    session, proxy, raw = Path(sys.argv[1]), sys.argv[2], sys.argv[3]

    def emit(message):
        sys.stdout.write("MSG " + json.dumps(message) + "\\n")
        sys.stdout.flush()

    engine = NeonizeEngine(EngineOptions(company="acme", session_dir=session, proxy=proxy, pair=True), emit)

    def call(op, args):
        try:
            return {"ok": engine.command(op, args)}
        except EngineError as exc:
            return {"error": exc.code, "permanent": exc.permanent}

    def play():
        try:
            while getattr(engine._client, "_connect_refs", None) is None:  # the dial hangs at the proxy
                time.sleep(0.02)
            sys.stdin.readline()  # the test saw the relay's connection reach the proxy
            out = {
                "send": call("send", {"outbox_id": "msg_new", "to": "5511987654321@s.whatsapp.net",
                                      "kind": "text", "text": "oi"}),
                "dedupe": call("send", {"outbox_id": "msg_a", "to": "5511987654321@s.whatsapp.net", "text": "oi"}),
                "check": call("check_number", {"phone": "5511987654321"}),
                "download": call("download", {"message": raw, "path": str(session / "media.bin")}),
                "status": call("send_status", {"outbox_ids": ["msg_a", "msg_b", "msg_new"]}),
                "subscribed": sorted(engine._client.event.list_func),
            }
            # events, through the very ctypes callback neonize hands to Go (as Go would marshal them)
            message = message_ev(Message(conversation="via Go callback"), sender=pn("5511987654321", 3),
                                 push_name="Maria", msg_id="3EB0FEED")
            receipt = receipt_ev("READ", ["3EB0AB"])
            callback = engine._client._connect_refs[2]
            for code, ev in ((17, message), (18, receipt)):
                data = ev.SerializeToString()
                buf = ctypes.create_string_buffer(data, len(data))
                callback(b"acme", ctypes.cast(buf, ctypes.c_void_p), len(data), code)
            sys.stdout.write("OUT " + json.dumps(out) + "\\n")
            sys.stdout.flush()
        finally:
            engine.stop()

    threading.Thread(target=play, daemon=True).start()
    code = engine.run()
    sys.stdout.write("EXIT %d\\n" % code)
    sys.stdout.flush()
    os._exit(code)
    """
)


def test_real_client_before_connecting(tmp_path: Path) -> None:
    """The real neonize client, its dial hanging at a silent 127.0.0.1 proxy: the messaging ops
    that need a connection say not_connected without touching Go or the log; send_status and a
    deduplicated send answer from the log; message and receipt events reach the engine through
    neonize's own dispatch, subscribed for Go."""
    session = tmp_path / "session-acme"
    session.mkdir(mode=0o700)
    log = [
        {"outbox_id": "msg_a", "state": "attempted", "at": "2026-01-01T00:00:00.000Z"},
        {"outbox_id": "msg_a", "state": "sent", "wa_id": "3EB0AB", "timestamp": "2026-01-01T00:00:01.000Z"},
        {"outbox_id": "msg_b", "state": "attempted", "at": "2026-01-01T00:00:02.000Z"},
    ]
    (session / SEND_LOG_FILE).write_text("".join(json.dumps(r) + "\n" for r in log))
    before = (session / SEND_LOG_FILE).read_bytes()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("NOTIFY_SOCKET", "LISTEN_", "WATCHDOG_"))}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), str(REPO / "tests"), env.get("PYTHONPATH", "")])
    with Socks5FaultProxy(mode="silent") as proxy:
        proc = subprocess.Popen(
            [sys.executable, "-c", CHILD, str(session), proxy.url, raw_of(Message(imageMessage=IMAGE))],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, cwd=str(session),
            text=True,
        )
        try:
            # the engine stops once the child has played its part: let the dial reach the proxy first
            proxy.wait_for_connections(1, timeout=15)
            output, _ = proc.communicate(input="go\n", timeout=20)
        finally:
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait(5)
        assert proxy.requests == []  # the greeting was never answered: nothing went anywhere
        assert proxy.connections == 1
    outs = [json.loads(line[4:]) for line in output.splitlines() if line.startswith("OUT ")]
    assert outs, output
    out = outs[0]
    assert out["send"] == {"error": "not_connected", "permanent": False}
    assert out["dedupe"] == {"ok": {"wa_id": "3EB0AB", "timestamp": "2026-01-01T00:00:01.000Z"}}
    assert out["check"] == {"error": "not_connected", "permanent": False}
    assert out["download"] == {"error": "not_connected", "permanent": False}
    assert out["status"] == {"ok": {"statuses": {
        "msg_a": {"state": "sent", "wa_id": "3EB0AB", "timestamp": "2026-01-01T00:00:01.000Z"},
        "msg_b": {"state": "attempted"},
        "msg_new": {"state": "unknown"},
    }}}
    assert {17, 18} <= set(out["subscribed"])  # MessageEv, ReceiptEv: Go sends only what is subscribed
    messages = [json.loads(line[4:]) for line in output.splitlines() if line.startswith("MSG ")]
    events = [m["event"] for m in messages if m["type"] == "event"]
    assert events == [
        {"type": "message.incoming", "id": "3EB0FEED", "chat": "5511987654321@s.whatsapp.net",
         "sender": "5511987654321@s.whatsapp.net", "push_name": "Maria", "timestamp": "2026-01-01T00:00:00.123Z",
         "is_group": False, "from_me": False, "kind": "text", "text": "via Go callback", "media": None},
        {"type": "message.receipt", "ids": ["3EB0AB"], "chat": "5511987654321@s.whatsapp.net",
         "sender": "5511987654321@s.whatsapp.net", "receipt": "read", "timestamp": "2026-01-01T00:01:00.000Z"},
    ]
    assert "EXIT 0" in output
    assert (session / SEND_LOG_FILE).read_bytes() == before  # nothing was attempted
    assert not (session / "media.bin").exists()
