"""Incoming messages and receipts, end to end: simulator worker -> supervisor -> journal -> reader.

The simulator's `simulate incoming` and `simulate receipt` (and WHATSAPPD_SIM_AUTO_RECEIPTS after
each send) stand in for WhatsApp; the events are read on the real event stream, media bytes
through GET /v1/companies/{id}/media/{message_id}.
"""

from __future__ import annotations

import base64
import os
import re
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from whatsappd.testing.daemon import wait_until
from whatsappd.testing.events import EventReader, message_statuses, wait_message
from whatsappd.testing.scenario import SimDaemon, daemon_pool, parse_iso, sim_config
from whatsappd.worker.simulator.actions import DEFAULT_GROUP

#: Workers boot slowly on a loaded 2-core machine: more patience than the fast tables' 2 s.
SLOW_BOOT = {"heartbeat_timeout": "10s"}

WA_ID = re.compile(r"3EB0[0-9A-F]{16}")


#: The scenarios that go through the store (the journal of incoming events and their media, the
#: outbox's receipts) also run on PostgreSQL: `@BOTH_STORES` (see tests/test_outbox.py).
BOTH_STORES = pytest.mark.parametrize("sim", ["sqlite", "postgresql"], indirect=True)


@pytest.fixture(scope="module")
def sim(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory,
        store_tables: Callable[[str], dict[str, str]]) -> Iterator[SimDaemon]:
    """A daemon with acme connected; every message it sends is delivered, then read. On SQLite
    unless a test is parametrized with BOTH_STORES."""
    backend = getattr(request, "param", "sqlite")
    with daemon_pool(tmp_path_factory.mktemp(f"incoming-{backend}")) as make:
        d = make(sim_config("acme", workers=SLOW_BOOT), env={"WHATSAPPD_SIM_AUTO_RECEIPTS": "delivered,read",
                                           "WHATSAPPD_SIM_RECEIPT_DELAY": "0.05"},
                 store=store_tables(backend))
        d.start(timeout=30)
        d.pair("acme", timeout=30)
        yield d
        assert d.stop() == 0


def incoming(d: SimDaemon, **args: Any) -> dict[str, Any]:
    """simulate incoming on acme and return its event as a fresh reader of the journal sees it."""
    with EventReader(d.socket_path, "company=acme&type=message.incoming") as reader:
        response = d.simulate("acme", "incoming", **args)
        assert response.status == 200, response.body
        wa_id = response.json()["id"]
        return dict(reader.wait_for(lambda line: line.get("id") == wa_id, timeout=5))


def journaled(d: SimDaemon, seq: int) -> dict[str, Any]:
    """The event with this seq as the journal (the backlog) gives it."""
    with EventReader(d.socket_path, f"since={seq - 1}") as reader:
        return dict(reader.wait_count(1)[0])


@BOTH_STORES
def test_an_incoming_text_is_an_event_with_sender_chat_push_name_timestamp_and_id(sim):
    """An incoming text is a message.incoming event with id, sender, chat, push name, timestamp, is_group false."""
    event = incoming(sim, **{"from": "+5511988887777", "text": "Is the flat still available?",
                             "push_name": "Maria", "id": "3EB0AAAABBBBCCCCDDDD"})
    assert event["type"] == "message.incoming" and event["company"] == "acme"
    assert event["id"] == "3EB0AAAABBBBCCCCDDDD"
    assert event["sender"] == event["chat"] == "5511988887777@s.whatsapp.net"
    assert event["push_name"] == "Maria"
    assert event["is_group"] is False and event["from_me"] is False
    assert event["kind"] == "text" and event["text"] == "Is the flat still available?"
    assert event["media"] is None and "raw" not in event
    assert abs(parse_iso(event["timestamp"]) - parse_iso(event["at"])) < 5
    assert journaled(sim, event["seq"]) == {k: v for k, v in event.items()}


def test_a_group_message_says_is_group_with_the_group_as_chat(sim):
    """A message in a group: chat is the group JID, sender the person, is_group true."""
    event = incoming(sim, **{"from": "5511977776666", "group": True, "text": "hello group"})
    assert event["is_group"] is True
    assert event["chat"] == DEFAULT_GROUP and event["sender"] == "5511977776666@s.whatsapp.net"


@BOTH_STORES
@pytest.mark.parametrize("size", [3000, 100 * 1024], ids=["inline", "kept-in-session"])
def test_incoming_media_is_described_in_the_event_and_its_bytes_are_served(sim, size):
    """Incoming media is described in its event (no raw) and GET media/{id} returns exactly its bytes."""
    data = os.urandom(size)
    event = incoming(sim, kind="image", caption="front of the house", mimetype="image/jpeg",
                     data=base64.b64encode(data).decode())
    assert event["kind"] == "image" and event["text"] is None
    assert event["media"] == {"mimetype": "image/jpeg", "size": size, "caption": "front of the house",
                              "filename": None}
    assert "raw" not in event and "raw" not in journaled(sim, event["seq"])
    response = sim.client.get(f"/v1/companies/acme/media/{event['id']}")
    assert response.status == 200, response.body
    assert response.body == data
    assert response.headers["content-type"] == "image/jpeg"


def test_an_incoming_document_with_a_file_name_is_downloadable_at_its_size(sim):
    """A document with a file name and only a size: the event names the file, the download has that size."""
    event = incoming(sim, kind="document", filename="contract.pdf", mimetype="application/pdf", size=5000)
    assert event["kind"] == "document"
    assert event["media"] == {"mimetype": "application/pdf", "size": 5000, "caption": None,
                              "filename": "contract.pdf"}
    response = sim.client.get(f"/v1/companies/acme/media/{event['id']}")
    assert response.status == 200 and len(response.body) == 5000
    assert response.headers["content-type"] == "application/pdf"
    assert sim.client.get(f"/v1/companies/acme/media/{event['id']}").body == response.body


@BOTH_STORES
def test_media_of_an_unknown_or_text_message_is_404_media_not_found(sim):
    """An id no media message had (unknown, or a text message's) is 404 media_not_found."""
    text = incoming(sim, text="just text")
    for wa_id in ("3EB0000000000000DEAD", text["id"]):
        response = sim.client.get(f"/v1/companies/acme/media/{wa_id}")
        assert response.status == 404, response.body
        assert response.json()["error"]["code"] == "media_not_found"
    response = sim.client.get("/v1/companies/nobody/media/3EB0000000000000DEAD")
    assert response.status == 404 and response.json()["error"]["code"] == "company_not_found"


def test_media_needs_a_connection(sim):
    """While the company is not connected, fetching media is 409 not_connected (it comes from WhatsApp)."""
    event = incoming(sim, kind="audio", size=100)
    assert sim.simulate("acme", "drop").status == 200
    try:
        sim.wait_state("acme", "reconnecting")
        response = sim.client.get(f"/v1/companies/acme/media/{event['id']}")
        assert response.status == 409 and response.json()["error"]["code"] == "not_connected"
    finally:
        assert sim.simulate("acme", "restore").status == 200
        sim.wait_state("acme", "connected")
    assert len(sim.client.get(f"/v1/companies/acme/media/{event['id']}").body) == 100


@BOTH_STORES
def test_receipts_move_a_sent_message_to_delivered_then_read(sim):
    """delivered and read receipts move a sent message to `delivered` then `read`, in GET and in events."""
    with EventReader(sim.socket_path, "company=acme&type=message.receipt") as receipts:
        response = sim.client.post("/v1/companies/acme/messages?wait=sent",
                                   {"to": "+5511999993001", "text": "visit at 3pm?"})
        assert response.json()["status"] == "sent", response.body
        mid, wa_id = response.json()["id"], response.json()["wa_id"]
        message = wait_message(sim.socket_path, "acme", mid, "read", timeout=10)
        seen = [receipts.wait_for(lambda line, r=r: line.get("receipt") == r and wa_id in line["ids"], timeout=5)
                for r in ("delivered", "read")]
    assert message["delivered_at"] and message["read_at"]
    assert parse_iso(message["sent_at"]) <= parse_iso(message["delivered_at"]) <= parse_iso(message["read_at"])
    assert [s["chat"] for s in seen] == ["5511999993001@s.whatsapp.net"] * 2
    assert message_statuses(sim.socket_path, "acme", mid, "read") == ["queued", "sending", "sent", "delivered", "read"]


@BOTH_STORES
def test_a_late_delivered_receipt_after_read_does_not_move_the_message_back(sim):
    """A `delivered` receipt after `read` is journaled but leaves the message `read`, with no status event."""
    response = sim.client.post("/v1/companies/acme/messages?wait=sent", {"to": "+5511999993002", "text": "hi"})
    mid, wa_id = response.json()["id"], response.json()["wa_id"]
    read = wait_message(sim.socket_path, "acme", mid, "read", timeout=10)
    with EventReader(sim.socket_path, "company=acme&type=message.receipt&type=message.status") as reader:
        late = sim.simulate("acme", "receipt", ids=[wa_id], receipt="delivered")
        assert late.status == 200, late.body
        reader.wait_for(lambda line: line.get("type") == "message.receipt" and line.get("ids") == [wa_id]
                        and line.get("receipt") == "delivered", timeout=5)
        # A marker after it: the stream is in seq order, so a status event for mid would be before it.
        marker = sim.client.post("/v1/companies/acme/messages", {"to": "+5511999993003", "text": "marker"})
        reader.wait_for(lambda line: line.get("message_id") == marker.json()["id"], timeout=5)
        statuses_for_mid = [e for e in reader.events() if e.get("message_id") == mid]
    assert statuses_for_mid == []
    now = sim.client.get(f"/v1/companies/acme/messages/{mid}").json()
    assert now["status"] == "read" and now["read_at"] == read["read_at"]
    assert WA_ID.fullmatch(wa_id)


@pytest.mark.parametrize("store_table", ["sqlite", "postgresql"], indirect=True)
def test_a_receipt_that_overtakes_its_send_reply_is_applied_once_the_message_is_sent(tmp_path, store_table):
    """Receipts emitted before the send's reply reach the supervisor first; the message still ends `read`."""
    with daemon_pool(tmp_path) as make:
        d = make(sim_config("acme"), env={"WHATSAPPD_SIM_AUTO_RECEIPTS": "delivered,read",
                                          "WHATSAPPD_SIM_RECEIPTS_FIRST": "1"}, store=store_table)
        d.start()
        d.pair("acme")
        message = d.client.post("/v1/companies/acme/messages?wait=sent&timeout=10",
                                {"to": "+5511999990202", "text": "hi"}).json()
        assert message["status"] in ("sent", "delivered", "read"), message
        wait_until(lambda: d.client.get(f"/v1/companies/acme/messages/{message['id']}").json()["status"] == "read",
                   10, what="the early receipts to be applied")
        final = d.client.get(f"/v1/companies/acme/messages/{message['id']}").json()
        assert final["delivered_at"] and final["read_at"]
