"""neonize event objects as neonize's Go side builds them, and a replay through its event path.

Used by the messaging tests to build their events, and by the neonize engine's `replay` command
(benchmarks only: bench/bench_zygote.py has real neonize workers handle incoming messages),
which calls the very ctypes callback neonize hands to Go (`NewClient._connect_refs[2]`), with
each event serialized as Go would serialize it. Worker-side code: neonize's names come from
lib.py, like everywhere else in the engine.

Events are built complete: Go's proto.Marshal refuses a proto2 message with a required field
unset (and neonize's event loop then ends).
"""

from __future__ import annotations

import ctypes
import random
from collections.abc import Callable
from typing import Any

from whatsappd.worker.neonize.lib import (
    JID,
    ExtendedTextMessage,
    MessageEv,
    MessageInfo,
    MessageSource,
    Receipt,
    ReceiptEv,
)
from whatsappd.worker.neonize.lib import WAMessage as Message

__all__ = [
    "EMPTY", "EVENT_MESSAGE", "EVENT_RECEIPT", "group", "jid", "lid", "message_ev", "pn", "receipt_ev",
    "replay_incoming",
]

#: neonize's event codes (neonize.events.EVENT_TO_INT) for the events replayed here.
EVENT_MESSAGE = 17
EVENT_RECEIPT = 18


def jid(user: str, server: str, device: int = 0) -> JID:
    return JID(User=user, RawAgent=0, Device=device, Integrator=0, Server=server, IsEmpty=not user)


def pn(user: str, device: int = 0) -> JID:
    return jid(user, "s.whatsapp.net", device)


def lid(user: str, device: int = 0) -> JID:
    return jid(user, "lid", device)


def group(user: str = "120363025246125486") -> JID:
    return jid(user, "g.us")


EMPTY = jid("", "")


def message_ev(
    message: Message | None,
    *,
    chat: JID | None = None,
    sender: JID | None = None,
    sender_alt: JID | None = None,
    recipient_alt: JID | None = None,
    from_me: bool = False,
    is_group: bool = False,
    push_name: str = "Maria Souza",
    msg_id: str = "3EB0C767D26A1D8D6F9E2A",
    millis: int = 1_767_225_600_123,
) -> MessageEv:
    """A MessageEv as neonize's Go side encodes it (utils/encoder.go: EncodeEventTypesMessage)."""
    sender = sender if sender is not None else pn("5511987654321")
    source = MessageSource(
        Chat=chat if chat is not None else jid(sender.User, sender.Server),
        Sender=sender,
        IsFromMe=from_me,
        IsGroup=is_group,
        SenderAlt=sender_alt if sender_alt is not None else EMPTY,
        RecipientAlt=recipient_alt if recipient_alt is not None else EMPTY,
        BroadcastListOwner=EMPTY,
    )
    info = MessageInfo(MessageSource=source, ID=msg_id, ServerID=0, Type="text", Pushname=push_name,
                       Timestamp=millis, Category="", Multicast=False, MediaType="", Edit="")
    ev = MessageEv(Info=info, IsEphemeral=False, IsViewOnce=False, IsViewOnceV2=False, IsEdit=False,
                   IsViewOnceV2Extension=False, IsDocumentWithCaption=False, IsLottieSticker=False,
                   UnavailableRequestID="", RetryCount=0)
    if message is not None:
        ev.Message.CopyFrom(message)
        ev.Raw.CopyFrom(message)
    if not ev.IsInitialized():
        raise ValueError("incomplete MessageEv: Go would refuse to marshal it")
    return ev


def receipt_ev(kind: str | None, ids: list[str], *, chat: JID | None = None, sender: JID | None = None,
               from_me: bool = False, is_group: bool = False, seconds: int = 1_767_225_660,
               sender_alt: JID | None = None) -> ReceiptEv:
    sender = sender if sender is not None else pn("5511987654321")
    source = MessageSource(Chat=chat if chat is not None else jid(sender.User, sender.Server),
                           Sender=sender, IsFromMe=from_me, IsGroup=is_group,
                           SenderAlt=sender_alt if sender_alt is not None else EMPTY, RecipientAlt=EMPTY,
                           BroadcastListOwner=EMPTY)
    ev = ReceiptEv(MessageSource=source, MessageIDs=ids, Timestamp=seconds)
    if kind is not None:
        ev.Type = Receipt.ReceiptType.Value(kind)
        if not ev.IsInitialized():
            raise ValueError("incomplete ReceiptEv: Go would refuse to marshal it")
    return ev


_WORDS = ("olá", "bom", "dia", "apartamento", "casa", "visita", "amanhã", "preço", "aluguel", "venda",
          "quartos", "garagem", "centro", "bairro", "obrigado", "pode", "ligar", "hoje", "proposta", "fotos")


def replay_incoming(callback: Callable[..., Any], uuid: bytes, count: int, seed: int = 0) -> int:
    """Deliver `count` incoming messages (plain and extended texts from 40 contacts, one in ten
    in a group) through neonize's event callback, each serialized as Go sends it. Returns count."""
    rng = random.Random(seed)
    for n in range(count):
        contact = pn(f"55119{rng.randrange(10**7, 10**8)}")
        text = " ".join(rng.choice(_WORDS) for _ in range(rng.randrange(3, 30)))
        content = (Message(conversation=text) if n % 3 else
                   Message(extendedTextMessage=ExtendedTextMessage(text=text)))
        in_group = n % 10 == 0
        ev = message_ev(content, sender=contact, chat=group() if in_group else None, is_group=in_group,
                        push_name=f"Contato {n % 40}", msg_id=f"3EB0{seed:04X}{n:012X}",
                        millis=1_767_225_600_000 + n * 1000)
        data = ev.SerializeToString()
        # a pointer to the bytes, as Go passes one (a ctypes buffer would make a new array type
        # per size: garbage real events never cause)
        callback(uuid, ctypes.cast(ctypes.c_char_p(data), ctypes.c_void_p), len(data), EVENT_MESSAGE)
    return count
