"""The outbox through the API: POST/GET /v1/companies/{id}/messages against a real daemon.

One daemon (real worker subprocesses, simulator engine) serves the whole module; a test that
changes a company's state gets a company of its own (`fresh`). What the simulator "sent" is read
from its send log on disk, the only witness that is not our own code.
"""

from __future__ import annotations

import base64
import itertools
import json
import os
import re
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from whatsappd.client import Response
from whatsappd.testing.daemon import run_ctl, wait_until
from whatsappd.testing.events import message_statuses, wait_message
from whatsappd.testing.metrics import metric_value, samples
from whatsappd.testing.scenario import SimDaemon, daemon_pool, sim_config
from whatsappd.worker.simulator.server import read_send_log, send_log_stats

#: Workers boot slowly on a loaded 2-core machine: more patience than the fast tables' 2 s.
SLOW_BOOT = {"heartbeat_timeout": "10s"}

MAX_BODY = 256 * 1024
MAX_FILE = 16 * 1024
MESSAGE_ID = re.compile(r"msg_[0-9a-f]{24}")
WA_ID = re.compile(r"3EB0[0-9A-F]{16}")
_COMPANY_NUMBERS = itertools.count(1)
PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4


#: The store backends the outbox's own scenarios run on (`@BOTH_STORES`); request validation and
#: the rest run on the default, SQLite.
BACKENDS = ["sqlite", "postgresql"]
BOTH_STORES = pytest.mark.parametrize("sim", BACKENDS, indirect=True)


@pytest.fixture(scope="module")
def sim(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory,
        store_tables: Callable[[str], dict[str, str]]) -> Iterator[SimDaemon]:
    """A daemon with company `acme` connected; small body and file limits; a send-fail file per
    company (`send_fail(d, company)`) that does not exist until a test makes it. On SQLite unless
    a test is parametrized with BOTH_STORES."""
    backend = getattr(request, "param", "sqlite")
    base = tmp_path_factory.mktemp(f"outbox-{backend}")
    with daemon_pool(base) as make:
        d = make(sim_config("acme", workers=SLOW_BOOT, control={"max_body_size": MAX_BODY},
                            outbox={"max_file_size": MAX_FILE, "media_dirs": ["/tmp"]}),
                 env={"WHATSAPPD_SIM_SEND_FAIL_FILE": str(base / "send-fail-{company}")}, store=store_tables(backend))
        d.start(timeout=30)
        d.pair("acme", timeout=30)
        yield d
        assert d.stop() == 0


@pytest.fixture
def fresh(sim: SimDaemon, request: pytest.FixtureRequest) -> Callable[..., str]:
    """fresh() -> the id of a new connected company of the module's daemon, for this test alone."""
    def make(connect: bool = True) -> str:
        cid = f"c{next(_COMPANY_NUMBERS)}-" + re.sub(r"[^a-z0-9]+", "-", request.node.name.lower())[5:40].strip("-")
        response = sim.client.request("PUT", f"/v1/companies/{cid}", {"engine": "simulator"})
        assert response.status == 201, response.body
        if connect:
            sim.pair(cid, timeout=30)
        return cid

    return make


def post(d: SimDaemon, company: str, body: Any, key: str | None = None, query: str = "") -> Response:
    headers = {"Idempotency-Key": key} if key is not None else None
    return d.client.post(f"/v1/companies/{company}/messages{query}", body, headers=headers)


def error(response: Response) -> dict[str, Any]:
    body = response.json()
    assert set(body) == {"error"}, body
    return dict(body["error"])


def send_fail(d: SimDaemon, company: str) -> Path:
    return d.root.parent / f"send-fail-{company}"


def sent_to(d: SimDaemon, company: str, jid: str) -> list[dict[str, Any]]:
    """The simulator's send log records for jid (read from disk)."""
    return [r for r in read_send_log(d.session_dir(company)) if r["to"] == jid]


# ------------------------------------------------------------------------------ sending


@BOTH_STORES
def test_a_text_message_is_queued_then_sent_once_with_its_whatsapp_id(sim):
    """POST gives 202 `queued`; the message is sent once and GET and the journal show it `sent` with its wa_id."""
    response = post(sim, "acme", {"to": "+55 11 99999-1001", "text": "hello there"})
    assert response.status == 202, response.body
    message = response.json()
    assert MESSAGE_ID.fullmatch(message["id"])
    assert message["status"] == "queued" and message["company"] == "acme" and message["kind"] == "text"
    assert message["to"] == "+55 11 99999-1001" and message["jid"] == "5511999991001@s.whatsapp.net"
    assert "text" not in message  # the body of a message is not echoed back

    sent = wait_message(sim.socket_path, "acme", message["id"], "sent")
    assert WA_ID.fullmatch(sent["wa_id"]) and sent["sent_at"] and sent["error"] is None and sent["attempts"] == 1
    records = sent_to(sim, "acme", "5511999991001@s.whatsapp.net")
    assert [(r["outbox_id"], r["wa_id"], r["text"]) for r in records] == [(message["id"], sent["wa_id"], "hello there")]
    assert message_statuses(sim.socket_path, "acme", message["id"], "sent") == ["queued", "sending", "sent"]


@BOTH_STORES
def test_wait_sent_answers_once_the_message_is_sent(sim):
    """?wait=sent holds the request until the message is sent and returns it `sent` with its wa_id."""
    response = post(sim, "acme", {"to": "+55 11 99999-1002", "text": "now"}, query="?wait=sent")
    assert response.status == 202, response.body
    assert response.json()["status"] == "sent" and WA_ID.fullmatch(response.json()["wa_id"])


def test_wait_sent_returns_queued_after_its_timeout_while_disconnected(sim, fresh):
    """?wait=sent&timeout=0.3 on a disconnected company returns the message still `queued` at the bound."""
    company = fresh()
    assert sim.simulate(company, "drop").status == 200
    started = time.monotonic()
    response = post(sim, company, {"to": "+55 11 99999-1003", "text": "later"}, query="?wait=sent&timeout=0.3")
    assert response.status == 202 and response.json()["status"] == "queued"
    assert 0.25 < time.monotonic() - started < 3


@BOTH_STORES
def test_media_by_path_and_by_base64_are_sent_with_size_caption_filename_and_mimetype(sim, tmp_path):
    """Media by path or base64 is sent with its size, caption, file name and (guessed) mimetype."""
    image = tmp_path / "house.png"
    image.write_bytes(PNG)
    first = post(sim, "acme", {"to": "+55 11 99999-1004", "image": {"path": str(image)}, "caption": "the house"},
                 query="?wait=sent")
    assert first.status == 202 and first.json()["status"] == "sent", first.body
    assert first.json()["kind"] == "image" and first.json()["size"] == len(PNG)
    assert first.json()["mimetype"] == "image/png" and first.json()["filename"] == "house.png"
    pdf = b"%PDF-1.4 contract"
    second = post(sim, "acme", {"to": "+55 11 99999-1004", "filename": "contract.pdf",
                                "document": {"base64": base64.b64encode(pdf).decode()}}, query="?wait=sent")
    assert second.status == 202 and second.json()["status"] == "sent", second.body
    records = sent_to(sim, "acme", "5511999991004@s.whatsapp.net")
    assert [(r["kind"], r["size"], r["caption"], r["filename"], r["mimetype"]) for r in records] == [
        ("image", len(PNG), "the house", "house.png", "image/png"),
        ("document", len(pdf), None, "contract.pdf", "application/pdf"),
    ]
    assert list((sim.state_dir / "tmp").glob("media-*")) == []  # the worker's copies are gone


def test_jid_recipients_are_sent_to_as_normalised(sim):
    """A group JID is sent to as given; a device-suffixed user JID goes to the user's plain JID."""
    for to, jid in (("120363000000000077@g.us", "120363000000000077@g.us"),
                    ("5511999991009:7@s.whatsapp.net", "5511999991009@s.whatsapp.net")):
        response = post(sim, "acme", {"to": to, "text": "to a jid"}, query="?wait=sent")
        assert response.status == 202 and response.json()["status"] == "sent", response.body
        assert response.json()["jid"] == jid and response.json()["to"] == to
        assert [r["outbox_id"] for r in sent_to(sim, "acme", jid)] == [response.json()["id"]]


@BOTH_STORES
def test_messages_are_kept_while_disconnected_then_sent_in_order(sim, fresh):
    """Messages posted while disconnected stay queued, then go out in posting order after the reconnect."""
    company = fresh()
    assert sim.simulate(company, "drop").status == 200
    sim.wait_state(company, "reconnecting")
    ids = []
    for n in range(8):
        response = post(sim, company, {"to": "+55 11 99999-1005", "text": f"#{n}"})
        assert response.status == 202, response.body
        ids.append(response.json()["id"])
    time.sleep(0.3)
    assert read_send_log(sim.session_dir(company)) == []
    assert all(sim.client.get(f"/v1/companies/{company}/messages/{i}").json()["status"] == "queued" for i in ids)
    assert sim.simulate(company, "restore").status == 200
    wait_message(sim.socket_path, company, ids[-1], "sent")
    log = read_send_log(sim.session_dir(company))
    assert [r["outbox_id"] for r in log] == ids
    assert [r["text"] for r in log] == [f"#{n}" for n in range(8)]


@BOTH_STORES
def test_a_permanent_failure_marks_the_message_failed_with_the_reason(sim):
    """A number not on WhatsApp makes the message `failed` (not_on_whatsapp) with an event; nothing is sent."""
    response = post(sim, "acme", {"to": "+55 11 99999-0000", "text": "anyone?"}, query="?wait=sent")
    assert response.status == 202
    message = response.json()
    assert message["status"] == "failed", message
    assert message["error"]["code"] == "not_on_whatsapp" and "5511999990000" in message["error"]["message"]
    assert message["wa_id"] is None
    assert sent_to(sim, "acme", "5511999990000@s.whatsapp.net") == []
    assert message_statuses(sim.socket_path, "acme", message["id"], "failed") == ["queued", "sending", "failed"]


@pytest.mark.slow
@BOTH_STORES
def test_a_transient_failure_keeps_the_message_queued_until_a_send_succeeds_once(sim, fresh):
    """Transient send failures keep the message `queued` (with the error); once they stop it is sent once."""
    company = fresh()
    fault = send_fail(sim, company)
    fault.touch()
    try:
        response = post(sim, company, {"to": "+55 11 99999-1006", "text": "retry me"})
        mid = response.json()["id"]

        def failed_once() -> dict[str, Any] | None:
            message = sim.client.get(f"/v1/companies/{company}/messages/{mid}").json()
            return message if message["attempts"] >= 1 and message["status"] == "queued" else None

        message = wait_until(failed_once, timeout=10, what="a first failed attempt")
        assert message["error"]["code"] == "send_failed"
        time.sleep(0.3)
        assert sim.client.get(f"/v1/companies/{company}/messages/{mid}").json()["status"] in ("queued", "sending")
        assert read_send_log(sim.session_dir(company)) == []
    finally:
        fault.unlink()
    sent = wait_message(sim.socket_path, company, mid, "sent", timeout=15)
    assert sent["attempts"] >= 2 and sent["error"] is None
    stats = send_log_stats(sim.session_dir(company))
    assert (stats.sent, stats.duplicate_requests) == (1, 0)


@pytest.mark.slow
@BOTH_STORES
def test_a_message_not_sent_within_its_ttl_expires(sim, fresh):
    """A message not sent within its ttl becomes `expired` (ttl_expired) with an event and is never sent."""
    company = fresh()
    assert sim.simulate(company, "drop").status == 200
    response = post(sim, company, {"to": "+55 11 99999-1007", "text": "soon stale", "ttl": "1s"})
    assert response.status == 202
    mid = response.json()["id"]
    assert response.json()["expires_at"] is not None
    expired = wait_message(sim.socket_path, company, mid, "expired", timeout=10)
    assert expired["error"]["code"] == "ttl_expired"
    assert message_statuses(sim.socket_path, company, mid, "expired") == ["queued", "expired"]
    assert sim.simulate(company, "restore").status == 200
    fresh_one = post(sim, company, {"to": "+55 11 99999-1007", "text": "fresh"}, query="?wait=sent")
    assert fresh_one.json()["status"] == "sent"
    assert [r["text"] for r in read_send_log(sim.session_dir(company))] == ["fresh"]


def test_an_unknown_message_id_is_404_message_not_found(sim, fresh):
    """GET of a message id that does not exist, or that belongs to another company, is 404."""
    response = sim.client.get("/v1/companies/acme/messages/msg_000000000000000000000000")
    assert response.status == 404 and error(response)["code"] == "message_not_found"
    other = fresh(connect=False)
    mid = post(sim, "acme", {"to": "+55 11 99999-1008", "text": "mine"}).json()["id"]
    response = sim.client.get(f"/v1/companies/{other}/messages/{mid}")
    assert response.status == 404 and error(response)["code"] == "message_not_found"


# --------------------------------------------------------------------------- idempotency


@BOTH_STORES
def test_a_replayed_idempotency_key_returns_the_first_message_and_sends_once(sim):
    """A replayed key gives 200, Idempotent-Replayed: true and the first id; the message is sent once."""
    body = {"to": "+55 11 99999-1101", "text": "only once"}
    first = post(sim, "acme", body, key="order-1101", query="?wait=sent")
    assert first.status == 202 and "idempotent-replayed" not in first.headers
    for _ in range(3):
        again = post(sim, "acme", body, key="order-1101")
        assert again.status == 200, again.body
        assert again.headers["idempotent-replayed"] == "true"
        assert again.json()["id"] == first.json()["id"] and again.json()["status"] == "sent"
    assert len(sent_to(sim, "acme", "5511999991101@s.whatsapp.net")) == 1
    stats = sim.simulate("acme", "stats").json()
    assert stats["by_recipient"]["5511999991101@s.whatsapp.net"] == 1 and stats["duplicate_requests"] == 0


def test_a_replay_answers_the_message_as_it_is_now_as_readme_and_openapi_say(sim):
    """A replay answers the message's current status (`delivered`, not the first answer's `queued`),
    which is what the README and the served OpenAPI document promise."""
    body = {"to": "+55 11 99999-1105", "text": "how is it going"}
    first = post(sim, "acme", body, key="order-1105")
    assert first.status == 202 and first.json()["status"] == "queued"
    message_id = first.json()["id"]
    wait_message(sim.socket_path, "acme", message_id, "sent")
    assert sim.simulate("acme", "receipt", ids=[message_id], receipt="delivered").status == 200
    wait_message(sim.socket_path, "acme", message_id, "delivered")
    again = post(sim, "acme", body, key="order-1105")
    assert (again.status, again.json()["id"], again.json()["status"]) == (200, message_id, "delivered")

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    promise = readme.split("- `Idempotency-Key`:", 1)[1].split("\n- ", 1)[0]
    assert "current status" in promise and "first answer" not in promise
    operation = sim.client.get("/v1/openapi.json").json()["paths"]["/v1/companies/{id}/messages"]["post"]
    assert "current status" in operation["description"] and "first result" not in operation["description"]
    assert "current status" in operation["responses"]["200"]["description"]


@BOTH_STORES
def test_a_reused_idempotency_key_with_a_different_body_is_422(sim):
    """A key reused with another body is 422 idempotency_key_reused naming the first message."""
    first = post(sim, "acme", {"to": "+55 11 99999-1102", "text": "one"}, key="order-1102", query="?wait=sent")
    response = post(sim, "acme", {"to": "+55 11 99999-1102", "text": "two"}, key="order-1102")
    assert response.status == 422
    assert error(response)["code"] == "idempotency_key_reused"
    assert first.json()["id"] in error(response)["message"]
    time.sleep(0.1)
    assert [r["text"] for r in sent_to(sim, "acme", "5511999991102@s.whatsapp.net")] == ["one"]


def test_the_same_idempotency_key_for_another_company_is_independent(sim, fresh):
    """Idempotency keys are per company: the same key and body elsewhere makes a new message."""
    other = fresh()
    body = {"to": "+55 11 99999-1103", "text": "hi"}
    a = post(sim, "acme", body, key="shared-key", query="?wait=sent")
    b = post(sim, other, body, key="shared-key", query="?wait=sent")
    assert a.status == b.status == 202
    assert a.json()["id"] != b.json()["id"] and b.json()["company"] == other
    assert len(sent_to(sim, "acme", "5511999991103@s.whatsapp.net")) == 1
    assert len(sent_to(sim, other, "5511999991103@s.whatsapp.net")) == 1


def test_a_malformed_idempotency_key_is_400(sim):
    """An Idempotency-Key over 255 characters is refused before anything is stored."""
    response = post(sim, "acme", {"to": "+55 11 99999-1104", "text": "x"}, key="k" * 256)
    assert response.status == 400 and error(response)["code"] == "bad_request"


# ---------------------------------------------------------------------------- refusals


@pytest.mark.parametrize(("body", "reason"), [
    ({"to": "+55 11 9999", "text": "x"}, "wrong number of digits"),
    ({"to": "not a number", "text": "x"}, "not a phone number"),
    ({"to": "11 99999-9999", "text": "x"}, "'11 99999-9999' has no '+', so its first digits were taken as the "
                                           "country code: it was read as +1 1999999999"),
    ({"to": "5511999999999@c.us", "text": "x"}, "not a WhatsApp JID"),
    ({"to": "", "text": "x"}, "empty"),
    ({"to": "   ", "text": "x"}, "empty"),
    ({"text": "x"}, '"to" is required'),
    ({"to": 5511999999999, "text": "x"}, '"to" is required'),
])
def test_an_invalid_recipient_is_400_with_the_reason(sim, body, reason):
    """Bad phone numbers, bad JIDs, an empty or missing "to" get 400 invalid_recipient saying why."""
    response = post(sim, "acme", body)
    assert response.status == 400
    assert error(response)["code"] == "invalid_recipient"
    assert reason in error(response)["message"]


def test_default_country_applies_to_numbers_without_plus(tmp_path):
    """With outbox.default_country = "BR", a national "(11) 99999-1106" is queued for +55 11 99999-1106,
    and a number that does not fit says it was read as a Brazilian one."""
    with daemon_pool(tmp_path) as make:
        d = make(sim_config("acme", workers=SLOW_BOOT, outbox={"default_country": "BR"}))
        d.start(timeout=30)
        response = post(d, "acme", {"to": "(11) 99999-1106", "text": "oi"})
        assert response.status == 202, response.body
        assert response.json()["jid"] == "5511999991106@s.whatsapp.net"
        response = post(d, "acme", {"to": "99999-1106", "text": "oi"})
        assert response.status == 400 and error(response)["code"] == "invalid_recipient"
        assert "so it was read as a number of BR (outbox.default_country)" in error(response)["message"]
        assert d.stop() == 0


@pytest.mark.parametrize(("body", "fragment"), [
    ({"to": "+5511999991201", "text": "x", "image": {"base64": "aGk="}}, 'one of "text"'),
    ({"to": "+5511999991201", "image": {"base64": "aGk="}, "audio": {"base64": "aGk="}}, 'one of "text"'),
    ({"to": "+5511999991201", "text": "x", "priority": "high"}, "unknown fields: priority"),
    ({"to": "+5511999991201"}, 'send "text"'),
    ({"to": "+5511999991201", "text": ""}, 'send "text"'),
    ({"to": "+5511999991201", "text": "x" * 65537}, "at most 65536"),
    ({"to": "+5511999991201", "image": {"base64": "not base64!"}}, "not valid base64"),
    ({"to": "+5511999991201", "image": {"path": "/x", "base64": "aGk="}}, '"image" must be'),
    ({"to": "+5511999991201", "image": {"url": "http://example.com/x"}}, '"image" must be'),
    ({"to": "+5511999991201", "text": "x", "ttl": "soon"}, "ttl must be"),
    ({"to": "+5511999991201", "text": "x", "ttl": 0}, "ttl must be between"),
    ({"to": "+5511999991201", "text": "x", "ttl": "400d"}, "ttl must be between"),
    ({"to": "+5511999991201", "text": "x", "caption": 3}, '"caption" must be a string'),
    (["to", "text"], "JSON object"),
])
def test_a_malformed_message_is_400_invalid_message(sim, body, fragment):
    """Malformed message bodies get 400 invalid_message with a sentence saying what to fix."""
    response = post(sim, "acme", body)
    assert response.status == 400, response.body
    assert error(response)["code"] == "invalid_message"
    assert fragment in error(response)["message"]


def test_a_body_that_is_not_json_is_400_invalid_json(sim):
    """A request body that does not parse is 400 invalid_json."""
    response = sim.client.post("/v1/companies/acme/messages", b"{not json",
                               headers={"Content-Type": "application/json"})
    assert response.status == 400 and error(response)["code"] == "invalid_json"


def test_a_body_over_max_body_size_is_413(sim):
    """A request body beyond control.max_body_size is refused with 413 body_too_large."""
    response = post(sim, "acme", {"to": "+5511999991202", "text": "x" * (MAX_BODY + 1)})
    assert response.status == 413
    assert error(response)["code"] == "body_too_large"
    assert "control.max_body_size" in error(response)["message"]


def test_media_over_max_file_size_is_413_by_path_and_by_base64(sim, tmp_path):
    """A file or base64 content beyond outbox.max_file_size is 413 body_too_large."""
    big = tmp_path / "big.jpg"
    big.write_bytes(b"\xff\xd8\xff" + b"\0" * MAX_FILE)
    response = post(sim, "acme", {"to": "+5511999991203", "image": {"path": str(big)}})
    assert response.status == 413 and error(response)["code"] == "body_too_large"
    assert "outbox.max_file_size" in error(response)["message"]
    content = base64.b64encode(b"\0" * (MAX_FILE + 1)).decode()
    response = post(sim, "acme", {"to": "+5511999991203", "document": {"base64": content}})
    assert response.status == 413 and error(response)["code"] == "body_too_large"


def test_unreadable_file_paths_are_400_unreadable_file(sim, tmp_path):
    """Missing files, directories, FIFOs and devices are 400 unreadable_file, at once (a FIFO never blocks)."""
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    (tmp_path / "plain").write_bytes(b"x")
    for path in (tmp_path / "missing.png", tmp_path, tmp_path / "plain" / "x.png", fifo, Path("/dev/zero")):
        started = time.monotonic()
        response = post(sim, "acme", {"to": "+5511999991204", "image": {"path": str(path)}})
        assert response.status == 400, (path, response.body)
        assert error(response)["code"] == "unreadable_file"
        assert str(path) in error(response)["message"]
        assert time.monotonic() - started < 5


def test_file_paths_are_confined_to_outbox_media_dirs(sim, daemons_for_paths, tmp_path):
    """Paths outside outbox.media_dirs, in the state dir, or through a symlink out are refused; none by default."""
    allowed = tmp_path / "uploads"
    allowed.mkdir()
    (allowed / "house.png").write_bytes(PNG)
    outside = tmp_path / "elsewhere.png"
    outside.write_bytes(PNG)
    (allowed / "escape.png").symlink_to(outside)
    d = daemons_for_paths(sim_config("acme", workers=SLOW_BOOT, outbox={"media_dirs": [str(allowed)]}))
    d.start(timeout=30)
    ok = post(d, "acme", {"to": "+5511999991207", "image": {"path": str(allowed / "house.png")}})
    assert ok.status == 202, ok.body
    for path in (outside, allowed / "escape.png", allowed / ".." / "elsewhere.png"):
        response = post(d, "acme", {"to": "+5511999991207", "image": {"path": str(path)}})
        assert response.status == 400 and error(response)["code"] == "unreadable_file", (path, response.body)
        assert "outbox.media_dirs" in error(response)["message"]
    state = d.state_dir / "whatsappd.sqlite"
    d2 = daemons_for_paths(sim_config("bob", workers=SLOW_BOOT, outbox={"media_dirs": [str(d.state_dir)]}))
    d2.start(timeout=30)
    response = post(d2, "bob", {"to": "+5511999991207", "document": {"path": str(d2.state_dir / "whatsappd.sqlite")}})
    assert response.status == 400 and "state directory is never allowed" in error(response)["message"]
    d3 = daemons_for_paths(sim_config("carol", workers=SLOW_BOOT))
    d3.start(timeout=30)
    response = post(d3, "carol", {"to": "+5511999991207", "image": {"path": str(allowed / "house.png")}})
    assert response.status == 400 and "sending files by path is off" in error(response)["message"]
    assert state.exists()


def test_a_directory_swapped_for_a_symlink_never_attaches_a_session_file(sim, fresh, tmp_path):
    """While a thread swaps a media dir's subdirectory for a symlink to a session, no POST attaches the session."""
    company = fresh(connect=False)  # the messages stay queued: nothing is sent
    session = sim.session_dir("acme") / "simulator.json"
    decoy = tmp_path / "sub"
    decoy.mkdir()
    (decoy / session.name).write_bytes(b"decoy")
    assert session.stat().st_size != len(b"decoy")
    stop = threading.Event()

    def swap() -> None:
        while not stop.is_set():
            decoy.rename(tmp_path / "sub.real")
            decoy.symlink_to(session.parent)
            decoy.unlink()
            (tmp_path / "sub.real").rename(decoy)

    racer = threading.Thread(target=swap)
    racer.start()
    outcomes: list[int] = []
    try:
        for _ in range(300):
            response = post(sim, company, {"to": "+5511999991209", "document": {"path": str(decoy / session.name)}})
            outcomes.append(response.status)
            if response.status == 202:
                assert response.json()["size"] == len(b"decoy"), "a session file was attached"
            else:
                assert response.status == 400 and error(response)["code"] == "unreadable_file", response.body
    finally:
        stop.set()
        racer.join()
    assert 202 in outcomes and 400 in outcomes, outcomes  # both sides of the race were met


def test_a_symlink_below_a_media_dir_is_not_followed_even_to_inside(sim, tmp_path):
    """A symlink below outbox.media_dirs is refused (400), even one whose target lies inside them."""
    (tmp_path / "real").mkdir()
    (tmp_path / "real" / "house.png").write_bytes(PNG)
    (tmp_path / "dirlink").symlink_to(tmp_path / "real")
    (tmp_path / "filelink.png").symlink_to(tmp_path / "real" / "house.png")
    for path in (tmp_path / "dirlink" / "house.png", tmp_path / "filelink.png"):
        response = post(sim, "acme", {"to": "+5511999991210", "image": {"path": str(path)}})
        assert response.status == 400 and error(response)["code"] == "unreadable_file", (path, response.body)
        assert "symbolic link" in error(response)["message"]


def test_a_nul_byte_in_a_path_is_400_unreadable_file(sim, tmp_path):
    """A path holding a NUL byte is a clear 400 unreadable_file, not a 500."""
    (tmp_path / "house.png").write_bytes(PNG)
    response = post(sim, "acme", {"to": "+5511999991211", "image": {"path": f"{tmp_path}/house.png\u0000.txt"}})
    assert response.status == 400 and error(response)["code"] == "unreadable_file", response.body
    assert "NUL byte" in error(response)["message"]


@pytest.fixture
def daemons_for_paths(tmp_path: Path) -> Iterator[Callable[..., SimDaemon]]:
    with daemon_pool(tmp_path / "daemons") as make:
        yield make


def test_a_relative_file_path_is_400_unreadable_file(sim):
    """Only absolute paths are accepted (the daemon's working directory is not the client's)."""
    response = post(sim, "acme", {"to": "+5511999991205", "image": {"path": "photos/house.png"}})
    assert response.status == 400 and error(response)["code"] == "unreadable_file"
    assert "absolute path" in error(response)["message"]


def test_a_file_the_daemon_may_not_read_is_400_unreadable_file(sim, tmp_path):
    """A file without read permission for the daemon's user is 400 unreadable_file (Permission denied)."""
    if os.geteuid() == 0:
        pytest.skip("root reads any file: test_..._as_a_second_user covers this when run as root")
    secret = tmp_path / "secret.png"
    secret.write_bytes(PNG)
    secret.chmod(0)
    response = post(sim, "acme", {"to": "+5511999991206", "image": {"path": str(secret)}})
    assert response.status == 400 and error(response)["code"] == "unreadable_file"
    assert "Permission denied" in error(response)["message"]


@pytest.mark.root
def test_a_file_the_daemon_may_not_read_is_400_unreadable_file_as_a_second_user(shared_dir, second_user):
    """A daemon running as uid 65534 answers 400 unreadable_file (Permission denied) for root's 0600 file."""
    prefix, popen = second_user()
    root = shared_dir / "daemon"
    root.mkdir(mode=0o777)
    root.chmod(0o777)  # the daemon (uid 65534) creates its state and socket in here
    secret = shared_dir / "secret.png"
    secret.write_bytes(PNG)
    secret.chmod(0o600)
    with daemon_pool(shared_dir / "unused") as make:
        d = make(sim_config("acme", workers=SLOW_BOOT, outbox={"media_dirs": [str(shared_dir)]}), root=root,
                 prefix=prefix, **popen)
        d.start(timeout=30)
        response = post(d, "acme", {"to": "+5511999991206", "image": {"path": str(secret)}})
        assert response.status == 400, response.body
        assert error(response)["code"] == "unreadable_file"
        assert "uid 65534" in error(response)["message"] and "Permission denied" in error(response)["message"]
        readable = shared_dir / "public.png"
        readable.write_bytes(PNG)
        readable.chmod(0o644)
        response = post(d, "acme", {"to": "+5511999991206", "image": {"path": str(readable)}})
        assert response.status == 202 and response.json()["size"] == len(PNG)
        assert d.stop() == 0


@pytest.mark.parametrize("action", ["logged_out", "replaced"])
def test_a_logged_out_or_replaced_company_refuses_new_messages_with_409(sim, fresh, action):
    """A `logged_out` or `replaced` company refuses new messages with 409 company_unavailable."""
    company = fresh()
    assert sim.simulate(company, action).status == 200
    sim.wait_state(company, action)
    response = post(sim, company, {"to": "+5511999991207", "text": "x"})
    assert response.status == 409
    assert error(response)["code"] == "company_unavailable" and action in error(response)["message"]


def test_a_stopped_company_accepts_messages_and_keeps_them(sim, fresh):
    """A company that is not connected (never connected) still accepts messages: they wait queued."""
    company = fresh(connect=False)
    response = post(sim, company, {"to": "+5511999991208", "text": "x"})
    assert response.status == 202 and response.json()["status"] == "queued"


def test_unknown_and_invalid_companies(sim):
    """An unknown company is 404 company_not_found; a malformed id is 400 invalid_company_id."""
    response = post(sim, "nobody-here", {"to": "+5511999991209", "text": "x"})
    assert response.status == 404 and error(response)["code"] == "company_not_found"
    response = post(sim, "Bad_ID", {"to": "+5511999991209", "text": "x"})
    assert response.status == 400 and error(response)["code"] == "invalid_company_id"
    response = sim.client.get("/v1/companies/nobody-here/messages/msg_000000000000000000000000")
    assert response.status == 404 and error(response)["code"] == "company_not_found"


# ------------------------------------------------------------------------ number check


def test_contacts_says_whether_a_number_is_on_whatsapp_and_its_jid(sim):
    """GET contacts/{phone} normalises the number and answers on_whatsapp with the JID (or null)."""
    response = sim.client.get("/v1/companies/acme/contacts/+55%2011%2099999-1301")
    assert response.status == 200, response.body
    assert response.json() == {"phone": "5511999991301", "on_whatsapp": True, "jid": "5511999991301@s.whatsapp.net"}
    response = sim.client.get("/v1/companies/acme/contacts/5511999990000")
    assert response.json() == {"phone": "5511999990000", "on_whatsapp": False, "jid": None}


def test_contacts_with_an_invalid_number_is_400_and_not_connected_is_409(sim, fresh):
    """An invalid phone is 400 invalid_recipient; a company that is not connected is 409 not_connected."""
    response = sim.client.get("/v1/companies/acme/contacts/12")
    assert response.status == 400 and error(response)["code"] == "invalid_recipient"
    company = fresh()
    assert sim.simulate(company, "drop").status == 200
    sim.wait_state(company, "reconnecting")
    response = sim.client.get(f"/v1/companies/{company}/contacts/5511999991302")
    assert response.status == 409 and error(response)["code"] == "not_connected"


# --------------------------------------------------------------------------- whatsappctl


def test_whatsappctl_send_queues_a_text_and_reports_it(sim):
    """`whatsappctl send` queues a text, reports id and status, honours --idempotency-key, exits 1 on failure."""
    sock = ["--socket", str(sim.socket_path)]
    result = run_ctl(*sock, "send", "acme", "+55 11 99999-1401", "from the shell", "--wait")
    assert result.returncode == 0, result.stderr
    assert re.fullmatch(r"msg_[0-9a-f]{24}: sent \(WhatsApp id 3EB0[0-9A-F]{16}\)\n", result.stdout)
    assert [r["text"] for r in sent_to(sim, "acme", "5511999991401@s.whatsapp.net")] == ["from the shell"]

    first = run_ctl(*sock, "--json", "send", "acme", "+5511999991402", "keyed", "--idempotency-key", "ctl-1")
    again = run_ctl(*sock, "--json", "send", "acme", "+5511999991402", "keyed", "--idempotency-key", "ctl-1")
    assert first.returncode == again.returncode == 0, (first.stderr, again.stderr)
    assert json.loads(first.stdout)["id"] == json.loads(again.stdout)["id"]

    failed = run_ctl(*sock, "send", "acme", "+5511999990000", "nobody", "--wait")
    assert failed.returncode == 1
    assert "failed" in failed.stderr and "not on WhatsApp" in failed.stderr
    invalid = run_ctl(*sock, "send", "acme", "12", "x")
    assert invalid.returncode == 1 and "[invalid_recipient]" in invalid.stderr


# ------------------------------------------------------------------------------- metrics


@BOTH_STORES
def test_metrics_count_outbox_messages_by_status(sim):
    """GET /v1/metrics has whatsappd_outbox_messages by status, matching what was sent and failed."""
    text = sim.client.get("/v1/metrics").body.decode()
    counts = {s.labels["status"]: s.value for s in samples(text) if s.name == "whatsappd_outbox_messages"}
    assert set(counts) == {"queued", "sending", "sent", "delivered", "read", "failed", "expired"}
    before = counts["sent"]
    post(sim, "acme", {"to": "+5511999991501", "text": "count me"}, query="?wait=sent")
    text = sim.client.get("/v1/metrics").body.decode()
    assert metric_value(text, "whatsappd_outbox_messages", status="sent") == before + 1
    assert (metric_value(text, "whatsappd_journal_last_seq") or 0) > 0


def test_a_bad_wait_or_timeout_is_refused_before_anything_is_stored(sim, fresh):
    """?wait=bogus or a bad timeout is a 400 and queues nothing (a retry cannot then send twice)."""
    cid = fresh(connect=False)
    before = sim.client.get("/v1/metrics").body
    for query in ("wait=bogus", "wait=sent&timeout=abc", "wait=sent&timeout=-1", "timeout=3"):
        response = sim.client.post(f"/v1/companies/{cid}/messages?{query}", {"to": "+5511999991301", "text": "x"})
        assert response.status == 400 and error(response)["code"] == "bad_request", (query, response.body)
    after = sim.client.get("/v1/metrics").body
    queued = metric_value(after.decode(), "whatsappd_outbox_messages", status="queued")
    assert queued == metric_value(before.decode(), "whatsappd_outbox_messages", status="queued")
