"""SimulatorEngine messaging (issue 4), driven in-process like tests/test_simulator.py."""

from __future__ import annotations

import base64
import json
import os
import re
import stat
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from test_simulator import WAIT, Sim, pair_and_connect, parse_iso

from whatsappd.protocol import MAX_BURST, ExitCode
from whatsappd.worker.engine import EngineError, EngineOptions
from whatsappd.worker.simulator.actions import DEFAULT_CONTACT, DEFAULT_GROUP
from whatsappd.worker.simulator.engine import SimulatorEngine
from whatsappd.worker.simulator.server import DUPLICATES_FILE, MEDIA_DIR, SEND_LOG_FILE, read_send_log, send_log_stats

WA_ID = re.compile(r"3EB0[0-9A-F]{16}")
ALICE = "5511999990001@s.whatsapp.net"
BOB = "5511999990002@s.whatsapp.net"
NOBODY = "5511999990000@s.whatsapp.net"  # ends in 0000: not on WhatsApp
LOG_KEYS = {"outbox_id", "wa_id", "to", "kind", "text", "caption", "filename", "mimetype", "size", "timestamp"}

Sims = Callable[..., Sim]


@pytest.fixture(params=["local", "shared"])
def server_mode(request: pytest.FixtureRequest) -> str:
    """Every scenario here runs twice: the simulator's "server" in the session directory (the
    default), and on a shared server ([simulator] server_dir), where the send log, duplicates,
    presence and media must behave the same."""
    return str(request.param)


@pytest.fixture
def session_dir(tmp_path: Path, server_mode: str) -> Path:
    """Where the engine keeps the "server's" files: the session directory, or server_dir/acme."""
    path = tmp_path / ("session-acme" if server_mode == "local" else "server/acme")
    path.mkdir(mode=0o700, parents=True)
    return path


@pytest.fixture
def sims(tmp_path: Path, server_mode: str) -> Iterator[Sims]:
    """A factory of started Sims (tests/test_simulator.py's harness); all stopped at the end.
    sims(session_dir): on a shared server, session_dir is server_dir/acme and the engine gets a
    session directory of its own (where only a daemon's lock would be)."""
    made: list[Sim] = []

    def make(session_dir: Path, **kwargs: Any) -> Sim:
        if server_mode == "shared":
            local = tmp_path / "host" / "sessions" / "session-acme"
            local.mkdir(mode=0o700, parents=True, exist_ok=True)
            kwargs["server_dir"] = session_dir.parent
            session_dir = local
        sim = Sim(session_dir, **kwargs).start()
        made.append(sim)
        return sim

    yield make
    for sim in made:
        sim.stop()


def send(sim: Sim, outbox_id: str = "msg_1", to: str = ALICE, **args: Any) -> dict[str, Any]:
    args.setdefault("kind", "text")
    if args["kind"] == "text":
        args.setdefault("text", "hi")
    return sim.engine.command("send", {"outbox_id": outbox_id, "to": to, **args})


def error_of(call: Callable[[], Any]) -> EngineError:
    with pytest.raises(EngineError) as caught:
        call()
    return caught.value


def events(sim: Sim, kind: str) -> list[dict[str, Any]]:
    return [m["event"] for m in list(sim.messages) if m["type"] == "event" and m["event"]["type"] == kind]


def connected(sims: Sims, session_dir: Path, env: dict[str, str] | None = None) -> Sim:
    """A paired, connected engine (paired by a first engine that is then stopped, if env is given)."""
    if env is None:
        return pair_and_connect(sims, session_dir)
    first = pair_and_connect(sims, session_dir)
    first.stop()
    sim = sims(session_dir, env=env)
    sim.wait_state("connected")
    return sim


def media_file(tmp_path: Path, data: bytes, name: str = "upload.bin") -> str:
    path = tmp_path / name
    path.write_bytes(data)
    return str(path)


# ------------------------------------------------------------------------------- send


def test_send_text_returns_wa_id_and_timestamp_and_logs_one_fsynced_0600_line(sims, session_dir):
    """send: {wa_id 3EB0+16 hex, ISO ms Z timestamp}; the log holds exactly that record, 0600."""
    sim = connected(sims, session_dir)
    result = send(sim, "msg_a", ALICE, text="olá")
    assert set(result) == {"wa_id", "timestamp"}
    assert WA_ID.fullmatch(result["wa_id"])
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", result["timestamp"])
    parse_iso(result["timestamp"])
    path = session_dir / SEND_LOG_FILE
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    lines = path.read_text().splitlines()
    assert len(lines) == 1
    assert json.loads(lines[0]) == {
        "outbox_id": "msg_a", "wa_id": result["wa_id"], "to": ALICE, "kind": "text", "text": "olá",
        "caption": None, "filename": None, "mimetype": None, "size": None, "timestamp": result["timestamp"],
    }


def test_resending_an_outbox_id_sends_nothing_and_returns_the_first_result(sims, session_dir):
    """A second send of the same outbox_id: same wa_id/timestamp, one log line, one duplicate counted."""
    sim = connected(sims, session_dir)
    first = send(sim, "msg_dup", ALICE, text="one")
    again = send(sim, "msg_dup", BOB, text="changed body")
    assert again == first
    assert [r["outbox_id"] for r in read_send_log(session_dir)] == ["msg_dup"]
    assert sim.simulate("stats") == {"sent": 1, "duplicate_requests": 1, "by_recipient": {ALICE: 1}}


def test_concurrent_sends_of_one_outbox_id_send_it_once(sims, session_dir):
    """Eight threads sending the same outbox_id at once: one log line, all get the same wa_id."""
    sim = connected(sims, session_dir)
    results: list[dict[str, Any]] = []
    barrier = threading.Barrier(8)

    def worker() -> None:
        barrier.wait()
        results.append(send(sim, "msg_race"))

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(WAIT)
    assert len(results) == 8 and len({r["wa_id"] for r in results}) == 1
    assert len(read_send_log(session_dir)) == 1
    assert send_log_stats(session_dir).duplicate_requests == 7


def test_send_log_survives_a_new_engine_on_the_same_session(sims, session_dir):
    """A new engine loads the log: send_status says sent, a resend is a duplicate, stats add up."""
    sim = connected(sims, session_dir)
    first = send(sim, "msg_p1", ALICE)
    send(sim, "msg_p2", BOB)
    send(sim, "msg_p1", ALICE)  # one duplicate before the restart
    sim.stop()
    nxt = sims(session_dir)
    nxt.wait_state("connected")
    status = nxt.engine.command("send_status", {"outbox_ids": ["msg_p1"]})
    assert status == {"statuses": {"msg_p1": {"state": "sent", **first}}}
    assert send(nxt, "msg_p1", ALICE) == first
    assert nxt.simulate("stats") == {"sent": 2, "duplicate_requests": 2, "by_recipient": {ALICE: 1, BOB: 1}}
    assert len((session_dir / SEND_LOG_FILE).read_text().splitlines()) == 2
    assert stat.S_IMODE((session_dir / DUPLICATES_FILE).stat().st_mode) == 0o600


def test_send_refused_while_not_connected_is_transient_and_logs_nothing(sims, session_dir):
    """send while reconnecting: not_connected, permanent False, no log file."""
    sim = connected(sims, session_dir)
    sim.simulate("drop")
    err = error_of(lambda: send(sim))
    assert (err.code, err.permanent) == ("not_connected", False)
    assert not (session_dir / SEND_LOG_FILE).exists()
    sim.simulate("restore")
    sim.wait_for(lambda m: m.get("state") == "connected" and m is sim.messages[-1])
    assert WA_ID.fullmatch(send(sim)["wa_id"])


def test_send_to_a_number_not_on_whatsapp_fails_permanently(sims, session_dir):
    """A phone JID whose digits end in 0000: not_on_whatsapp, permanent; groups always exist."""
    sim = connected(sims, session_dir)
    err = error_of(lambda: send(sim, "msg_x", NOBODY))
    assert (err.code, err.permanent) == ("not_on_whatsapp", True)
    assert read_send_log(session_dir) == []
    assert WA_ID.fullmatch(send(sim, "msg_g", "120363000000010000@g.us")["wa_id"])
    assert WA_ID.fullmatch(send(sim, "msg_g2", "5511999999999-1600000000@g.us")["wa_id"])


@pytest.mark.parametrize("to", ["5511999990001", "+5511999990001@s.whatsapp.net", "0511999990001@s.whatsapp.net",
                                "5511999990001:3@s.whatsapp.net", "abc@g.us", "5511999990001@lid", "", None, 42])
def test_malformed_recipient_is_a_permanent_invalid_recipient(sims, session_dir, to):
    """A `to` that is not <digits>@s.whatsapp.net or <id>@g.us: invalid_recipient, permanent."""
    sim = connected(sims, session_dir)
    err = error_of(lambda: sim.engine.command("send", {"outbox_id": "msg_1", "to": to, "kind": "text", "text": "x"}))
    assert (err.code, err.permanent) == ("invalid_recipient", True)


@pytest.mark.parametrize(("args", "code"), [
    ({"outbox_id": None}, "invalid_argument"),
    ({"kind": "video"}, "invalid_argument"),
    ({"text": ""}, "invalid_argument"),
    ({"text": 5}, "invalid_argument"),
    ({"text": "x" * 65537}, "too_large"),
    ({"kind": "image"}, "media_invalid"),
    ({"kind": "image", "media_path": "/nonexistent/x.jpg", "caption": 7}, "invalid_argument"),
])
def test_bad_send_arguments_are_permanent_errors(sims, session_dir, args, code):
    """Missing or wrong arguments are permanent errors (a retry cannot fix them); nothing is sent."""
    sim = connected(sims, session_dir)
    base = {"outbox_id": "msg_1", "to": ALICE, "kind": "text", "text": "x"}
    err = error_of(lambda: sim.engine.command("send", {**base, **args}))
    assert (err.code, err.permanent) == (code, True)
    assert read_send_log(session_dir) == []


def test_send_media_reads_the_file_and_logs_its_size_and_fields(sims, session_dir, tmp_path):
    """image/document/audio with media_path: the log has size, caption, filename and mimetype."""
    sim = connected(sims, session_dir)
    path = media_file(tmp_path, b"\x89PNG" + b"x" * 96)
    send(sim, "msg_img", ALICE, kind="image", media_path=path, caption="look", mimetype="image/png")
    send(sim, "msg_doc", ALICE, kind="document", media_path=path, filename="r.pdf", mimetype="application/pdf")
    send(sim, "msg_aud", ALICE, kind="audio", media_path=path)
    img, doc, aud = read_send_log(session_dir)
    assert all(set(r) == LOG_KEYS for r in (img, doc, aud))
    assert (img["kind"], img["text"], img["caption"], img["mimetype"], img["size"]) == (
        "image", None, "look", "image/png", 100)
    assert (doc["filename"], doc["mimetype"], doc["caption"]) == ("r.pdf", "application/pdf", None)
    assert aud["mimetype"] == "audio/ogg; codecs=opus" and aud["size"] == 100


def test_unusable_media_is_a_permanent_media_invalid(sims, session_dir, tmp_path):
    """A missing, unreadable, empty or non-regular media_path: media_invalid, permanent."""
    sim = connected(sims, session_dir)
    unreadable = Path(media_file(tmp_path, b"data", "secret.bin"))
    unreadable.chmod(0)
    candidates = [str(tmp_path / "missing.jpg"), media_file(tmp_path, b"", "empty.jpg"), str(tmp_path)]
    if os.geteuid() != 0:  # root reads anything
        candidates.append(str(unreadable))
    for n, path in enumerate(candidates):
        err = error_of(lambda n=n, path=path: send(sim, f"msg_{n}", kind="image", media_path=path))
        assert (err.code, err.permanent) == ("media_invalid", True), path
    assert read_send_log(session_dir) == []


def test_media_over_the_kind_limit_is_a_permanent_too_large(sims, session_dir, tmp_path):
    """An image over 16 MiB is too_large (permanent); the same file as a document is fine."""
    sim = connected(sims, session_dir)
    big = tmp_path / "big.jpg"
    with open(big, "wb") as f:
        f.truncate(16 * 1024 * 1024 + 1)  # sparse: cheap
    err = error_of(lambda: send(sim, "msg_big", kind="image", media_path=str(big)))
    assert (err.code, err.permanent) == ("too_large", True)
    send(sim, "msg_big", kind="document", media_path=str(big))
    assert read_send_log(session_dir)[0]["size"] == 16 * 1024 * 1024 + 1


def test_send_fail_file_makes_sends_fail_transiently_while_it_exists(sims, session_dir, tmp_path):
    """WHATSAPPD_SIM_SEND_FAIL_FILE ({company} replaced): send_failed, not permanent, nothing sent."""
    flag = tmp_path / "sendfail-acme"
    flag.touch()
    sim = connected(sims, session_dir, env={"WHATSAPPD_SIM_SEND_FAIL_FILE": str(tmp_path / "sendfail-{company}")})
    err = error_of(lambda: send(sim, "msg_f"))
    assert (err.code, err.permanent) == ("send_failed", False)
    assert read_send_log(session_dir) == []
    flag.unlink()
    assert WA_ID.fullmatch(send(sim, "msg_f")["wa_id"])
    assert sim.simulate("stats")["duplicate_requests"] == 0


def test_send_delay_is_taken_and_a_drop_during_it_sends_nothing(sims, session_dir):
    """WHATSAPPD_SIM_SEND_DELAY: a send takes that long; dropped meanwhile → not_connected, no line."""
    sim = connected(sims, session_dir, env={"WHATSAPPD_SIM_SEND_DELAY": "0.2"})
    started = time.monotonic()
    send(sim, "msg_slow")
    assert 0.2 <= time.monotonic() - started < 1.0
    errors: list[EngineError] = []

    def slow_send() -> None:
        try:
            send(sim, "msg_cut")
        except EngineError as exc:
            errors.append(exc)

    t = threading.Thread(target=slow_send)
    t.start()
    time.sleep(0.05)
    sim.simulate("drop")
    t.join(WAIT)
    assert [(e.code, e.permanent) for e in errors] == [("not_connected", False)]
    assert [r["outbox_id"] for r in read_send_log(session_dir)] == ["msg_slow"]


def test_auto_receipts_follow_each_send_delivered_before_read(sims, session_dir):
    """WHATSAPPD_SIM_AUTO_RECEIPTS="read,delivered": delivered then read events for each new send."""
    env = {"WHATSAPPD_SIM_AUTO_RECEIPTS": "read,delivered", "WHATSAPPD_SIM_RECEIPT_DELAY": "0.01"}
    sim = connected(sims, session_dir, env=env)
    a = send(sim, "msg_r1", ALICE)["wa_id"]
    b = send(sim, "msg_r2", BOB)["wa_id"]
    send(sim, "msg_r1", ALICE)  # a duplicate: no new receipts
    sim.wait_for(lambda m: sum(1 for _ in events(sim, "message.receipt")) >= 4)
    time.sleep(0.1)
    receipts = events(sim, "message.receipt")
    assert len(receipts) == 4
    for wa_id, to in ((a, ALICE), (b, BOB)):
        mine = [r for r in receipts if r["ids"] == [wa_id]]
        assert [r["receipt"] for r in mine] == ["delivered", "read"]
        for r in mine:
            assert set(r) == {"type", "ids", "chat", "sender", "receipt", "timestamp"}
            assert (r["chat"], r["sender"]) == (to, to)
            parse_iso(r["timestamp"])


def test_bad_auto_receipts_setting_makes_run_return_bad_invocation(session_dir):
    """An unknown receipt in WHATSAPPD_SIM_AUTO_RECEIPTS ends run() with BAD_INVOCATION."""
    engine = SimulatorEngine(EngineOptions("acme", session_dir, None, True), lambda m: None,
                             env={"WHATSAPPD_SIM_AUTO_RECEIPTS": "delivered,seen"})
    assert engine.run() == ExitCode.BAD_INVOCATION


# ------------------------------------------------------------------------------- send_status


def test_send_status_sent_or_unknown_in_any_phase(sims, session_dir):
    """send_status: sent with wa_id/timestamp from the log, else unknown; works while reconnecting."""
    sim = connected(sims, session_dir)
    first = send(sim, "msg_s1")
    sim.simulate("drop")
    status = sim.engine.command("send_status", {"outbox_ids": ["msg_s1", "msg_never"]})
    assert status == {"statuses": {"msg_s1": {"state": "sent", **first}, "msg_never": {"state": "unknown"}}}
    sim.stop()
    cold = SimulatorEngine(EngineOptions("acme", session_dir, None, False), lambda m: None)  # run() not called
    assert cold.command("send_status", {"outbox_ids": ["msg_s1"]})["statuses"]["msg_s1"]["state"] == "sent"
    for bad in (None, "msg_s1", [1]):
        assert error_of(lambda bad=bad: cold.command("send_status", {"outbox_ids": bad})).code == "invalid_argument"


# ------------------------------------------------------------------------------- check_number


def test_check_number_says_who_is_on_whatsapp(sims, session_dir):
    """check_number: on_whatsapp and jid; digits ending in 0000 are not on WhatsApp (jid null)."""
    sim = connected(sims, session_dir)
    assert sim.engine.command("check_number", {"phone": "5511999990001"}) == {
        "phone": "5511999990001", "on_whatsapp": True, "jid": ALICE}
    assert sim.engine.command("check_number", {"phone": "5511999990000"}) == {
        "phone": "5511999990000", "on_whatsapp": False, "jid": None}
    err = error_of(lambda: sim.engine.command("check_number", {"phone": "+55 11"}))
    assert (err.code, err.permanent) == ("invalid_phone", True)
    sim.simulate("drop")
    err = error_of(lambda: sim.engine.command("check_number", {"phone": "5511999990001"}))
    assert (err.code, err.permanent) == ("not_connected", False)


# ------------------------------------------------------------------------------- incoming


def test_incoming_text_emits_a_message_incoming_event(sims, session_dir):
    """incoming with defaults: a text event from the default contact, "hello", no raw; returns its id."""
    sim = connected(sims, session_dir)
    result = sim.simulate("incoming")
    event = sim.messages[-1]
    assert event["type"] == "event"
    ev = event["event"]
    assert result == {"id": ev["id"]} and WA_ID.fullmatch(ev["id"])
    sender = f"{DEFAULT_CONTACT}@s.whatsapp.net"
    assert ev == {"type": "message.incoming", "id": ev["id"], "chat": sender, "sender": sender,
                  "push_name": ev["push_name"], "timestamp": ev["timestamp"], "is_group": False,
                  "from_me": False, "kind": "text", "text": "hello", "media": None}
    assert ev["push_name"]
    parse_iso(ev["timestamp"])


def test_incoming_takes_sender_text_id_and_push_name(sims, session_dir):
    """from (digits, +digits or JID), text, id and push_name appear in the event as given."""
    sim = connected(sims, session_dir)
    for sender in ("5511999990001", "+5511999990001", ALICE):
        sim.simulate("incoming", **{"from": sender, "text": "oi", "id": "ABCDEF", "push_name": "Ana"})
        ev = sim.messages[-1]["event"]
        got = (ev["sender"], ev["chat"], ev["text"], ev["id"], ev["push_name"])
        assert got == (ALICE, ALICE, "oi", "ABCDEF", "Ana")


def test_incoming_in_a_group(sims, session_dir):
    """group=true: chat is the default group, sender the contact; a group JID string is used as is."""
    sim = connected(sims, session_dir)
    sim.simulate("incoming", group=True, **{"from": "5511999990002"})
    ev = sim.messages[-1]["event"]
    assert (ev["is_group"], ev["chat"], ev["sender"]) == (True, DEFAULT_GROUP, BOB)
    sim.simulate("incoming", group="120363999@g.us")
    assert sim.messages[-1]["event"]["chat"] == "120363999@g.us"


@pytest.mark.parametrize("args", [{"from": "bob"}, {"group": "x@s.whatsapp.net"}, {"kind": "poll"},
                                  {"text": ""}, {"kind": "image", "size": 0}, {"kind": "image", "data": "!!"},
                                  {"kind": "image", "data": "AAAA", "size": 5}])
def test_incoming_rejects_bad_arguments(sims, session_dir, args):
    """Malformed incoming arguments raise invalid_argument and emit nothing."""
    sim = connected(sims, session_dir)
    count = len(sim.messages)
    assert error_of(lambda: sim.simulate("incoming", **args)).code == "invalid_argument"
    assert len(sim.messages) == count


def test_media_round_trip_inline_data_through_download(sims, session_dir, tmp_path):
    """incoming image with data: the event's media and raw; download writes the same bytes, 0600."""
    sim = connected(sims, session_dir)
    data = os.urandom(3000)
    sim.simulate("incoming", kind="image", data=base64.b64encode(data).decode(), caption="pic",
                 mimetype="image/png")
    ev = sim.messages[-1]["event"]
    assert (ev["kind"], ev["text"]) == ("image", None)
    assert ev["media"] == {"mimetype": "image/png", "size": 3000, "caption": "pic", "filename": None}
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    target = downloads / "out.png"
    result = sim.engine.command("download", {"message": ev["raw"], "path": str(target)})
    assert result == {"path": str(target), "size": 3000, "mimetype": "image/png"}
    assert target.read_bytes() == data
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    assert [p.name for p in downloads.iterdir()] == ["out.png"]  # no temp file left


def test_media_round_trip_big_data_is_kept_in_the_session(sims, session_dir, tmp_path):
    """data over 64 KiB is stored under simulator-media/ (0700/0600) and downloads identically."""
    sim = connected(sims, session_dir)
    data = os.urandom(200_000)
    sim.simulate("incoming", kind="document", data=base64.b64encode(data).decode(), filename="a.pdf")
    ev = sim.messages[-1]["event"]
    assert len(ev["raw"]) < 1000
    assert ev["media"] == {"mimetype": "application/octet-stream", "size": 200_000, "caption": None,
                           "filename": "a.pdf"}
    stored = list((session_dir / MEDIA_DIR).iterdir())
    assert len(stored) == 1
    assert stat.S_IMODE((session_dir / MEDIA_DIR).stat().st_mode) == 0o700
    assert stat.S_IMODE(stored[0].stat().st_mode) == 0o600
    target = tmp_path / "doc"
    sim.engine.command("download", {"message": ev["raw"], "path": str(target)})
    assert target.read_bytes() == data
    stored[0].unlink()  # the session lost it: permanent
    err = error_of(lambda: sim.engine.command("download", {"message": ev["raw"], "path": str(target)}))
    assert (err.code, err.permanent) == ("media_unavailable", True)


@pytest.mark.parametrize("kind", ["video", "audio"])
def test_media_without_data_downloads_reproducible_bytes_of_the_given_size(sims, session_dir, tmp_path, kind):
    """incoming media with only size: download writes that many bytes, the same on every download."""
    sim = connected(sims, session_dir)
    sim.simulate("incoming", kind=kind, size=5000)
    ev = sim.messages[-1]["event"]
    assert ev["media"]["size"] == 5000 and ev["media"]["mimetype"].startswith(kind)
    one, two = tmp_path / "1", tmp_path / "2"
    assert sim.engine.command("download", {"message": ev["raw"], "path": str(one)})["size"] == 5000
    sim.engine.command("download", {"message": ev["raw"], "path": str(two)})
    assert one.read_bytes() == two.read_bytes() and len(one.read_bytes()) == 5000


@pytest.mark.parametrize("raw", ["", "not base64!", base64.b64encode(b"\x08\x01garbage proto").decode(),
                                 base64.b64encode(b'{"sim_media": 1, "size": 3}').decode(),
                                 base64.b64encode(b'{"sim_media":1,"size":3,"mimetype":"a/b",'
                                                  b'"file":"../x.bin"}').decode(),
                                 None])
def test_download_of_an_unknown_raw_is_a_permanent_media_unavailable(sims, session_dir, tmp_path, raw):
    """A raw the simulator did not make: media_unavailable, permanent; nothing written."""
    sim = connected(sims, session_dir)
    err = error_of(lambda: sim.engine.command("download", {"message": raw, "path": str(tmp_path / "x")}))
    assert (err.code, err.permanent) == ("media_unavailable", True)
    assert not (tmp_path / "x").exists()


def test_download_needs_a_connection(sims, session_dir, tmp_path):
    """download while reconnecting: not_connected (transient)."""
    sim = connected(sims, session_dir)
    sim.simulate("incoming", kind="image", size=10)
    raw = sim.messages[-1]["event"]["raw"]
    sim.simulate("drop")
    err = error_of(lambda: sim.engine.command("download", {"message": raw, "path": str(tmp_path / "x")}))
    assert (err.code, err.permanent) == ("not_connected", False)


# ------------------------------------------------------------------------------- receipt


def test_receipt_resolves_outbox_ids_and_wa_ids_through_the_send_log(sims, session_dir):
    """receipt ids may be outbox or WhatsApp ids: one event per chat with the wa_ids, chat = to."""
    sim = connected(sims, session_dir)
    a = send(sim, "msg_a", ALICE)["wa_id"]
    b = send(sim, "msg_b", BOB)["wa_id"]
    c = send(sim, "msg_c", ALICE)["wa_id"]
    result = sim.simulate("receipt", ids=["msg_a", b, "msg_c"], receipt="read")
    assert result == {"ids": [a, c, b], "receipt": "read"}
    receipts = events(sim, "message.receipt")
    assert [(r["ids"], r["chat"], r["sender"], r["receipt"]) for r in receipts] == [
        ([a, c], ALICE, ALICE, "read"), ([b], BOB, BOB, "read")]
    assert set(receipts[0]) == {"type", "ids", "chat", "sender", "receipt", "timestamp"}


def test_receipt_for_unknown_ids(sims, session_dir):
    """An unknown msg_ id is unknown_message; a foreign wa_id needs 'chat'; played is allowed."""
    sim = connected(sims, session_dir)
    assert error_of(lambda: sim.simulate("receipt", ids=["msg_nope"])).code == "unknown_message"
    assert error_of(lambda: sim.simulate("receipt", ids=["3EB0AAAA"])).code == "invalid_argument"
    assert error_of(lambda: sim.simulate("receipt", ids=[])).code == "invalid_argument"
    assert error_of(lambda: sim.simulate("receipt", ids=["3EB0AAAA"], chat=ALICE, receipt="seen")).code == (
        "invalid_argument")
    sim.simulate("receipt", ids=["3EB0AAAA"], chat=DEFAULT_GROUP, sender=BOB, receipt="played")
    r = events(sim, "message.receipt")[-1]
    assert (r["ids"], r["chat"], r["sender"], r["receipt"]) == (["3EB0AAAA"], DEFAULT_GROUP, BOB, "played")


def test_incoming_receipt_and_burst_need_a_connection(sims, session_dir):
    """incoming, receipt and burst while reconnecting (or pairing): not_connected, nothing emitted."""
    sim = connected(sims, session_dir)
    send(sim, "msg_a")
    sim.simulate("drop")
    count = len(sim.messages)
    for action, args in (("incoming", {}), ("receipt", {"ids": ["msg_a"]}), ("burst", {"count": 3})):
        assert error_of(lambda action=action, args=args: sim.simulate(action, **args)).code == "not_connected"
    assert len(sim.messages) == count


# ------------------------------------------------------------------------------- stats and burst


def test_stats_count_unique_sends_duplicates_and_recipients_in_any_phase(sims, session_dir):
    """stats works connected, reconnecting, after the end and before run(); send_log_stats agrees."""
    sim = connected(sims, session_dir)
    expected = {"sent": 0, "duplicate_requests": 0, "by_recipient": {}}
    assert sim.simulate("stats") == expected
    for outbox_id, to in (("m1", ALICE), ("m2", ALICE), ("m3", BOB), ("m1", ALICE), ("m1", ALICE)):
        send(sim, outbox_id, to)
    expected = {"sent": 3, "duplicate_requests": 2, "by_recipient": {ALICE: 2, BOB: 1}}
    assert sim.simulate("stats") == expected
    sim.simulate("drop")
    assert sim.simulate("stats") == expected
    sim.simulate("replaced")
    sim.join()
    assert sim.simulate("stats") == expected
    cold = SimulatorEngine(EngineOptions("acme", session_dir, None, False), lambda m: None)
    assert cold.command("simulate", {"action": "stats"}) == expected
    assert send_log_stats(session_dir).as_dict() == expected


def test_burst_emits_count_numbered_text_events_with_unique_ids(sims, session_dir):
    """burst count=N: N message.incoming text events, unique ids, texts numbered 1..N, fast."""
    sim = connected(sims, session_dir)
    started = time.monotonic()
    assert sim.simulate("burst", count=5000) == {"emitted": 5000}
    assert time.monotonic() - started < 2.0
    burst = events(sim, "message.incoming")
    assert len(burst) == 5000 and len({e["id"] for e in burst}) == 5000
    assert all(WA_ID.fullmatch(e["id"]) for e in burst)
    assert [e["text"] for e in burst[:2]] == ["burst 1", "burst 2"] and burst[-1]["text"] == "burst 5000"
    assert burst[0]["kind"] == "text" and burst[0]["media"] is None and "raw" not in burst[0]
    for bad in ({"count": MAX_BURST + 1}, {"count": -1}, {"count": True}, {"count": 2, "kind": "image"}, {}):
        assert error_of(lambda bad=bad: sim.simulate("burst", **bad)).code == "invalid_argument"


def test_a_paced_burst_keeps_its_rate_and_stamps_each_event(sims, session_dir):
    """burst rate=R: events follow the schedule n/R; each carries emitted_at_ns (time.time_ns)."""
    sim = connected(sims, session_dir)
    before = time.time_ns()
    started = time.monotonic()
    assert sim.simulate("burst", count=300, rate=1000) == {"emitted": 300}
    took = time.monotonic() - started
    assert 0.29 <= took < 2.0
    burst = events(sim, "message.incoming")
    stamps = [e["emitted_at_ns"] for e in burst]
    assert len(stamps) == 300 and stamps == sorted(stamps) and before <= stamps[0] <= time.time_ns()
    assert (stamps[-1] - stamps[0]) / 1e9 >= 0.29  # 299 intervals of 1 ms
    for bad in (0, -1, True, "fast", float("inf")):
        assert error_of(lambda bad=bad: sim.simulate("burst", count=2, rate=bad)).code == "invalid_argument"


# ------------------------------------------------------------------------------- the log on disk


def test_a_torn_last_line_is_cut_off_at_start(sims, session_dir):
    """A crash mid-append leaves half a line: the next engine drops it and appends cleanly after."""
    sim = connected(sims, session_dir)
    send(sim, "msg_whole")
    sim.stop()
    with open(session_dir / SEND_LOG_FILE, "ab") as f:
        f.write(b'{"outbox_id": "msg_torn", "wa_')
    assert [r["outbox_id"] for r in read_send_log(session_dir)] == ["msg_whole"]  # readers skip it
    nxt = sims(session_dir)
    nxt.wait_state("connected")
    send(nxt, "msg_next")
    assert [r["outbox_id"] for r in read_send_log(session_dir)] == ["msg_whole", "msg_next"]
    assert nxt.engine.command("send_status", {"outbox_ids": ["msg_torn"]})["statuses"]["msg_torn"] == {
        "state": "unknown"}


def test_a_corrupt_send_log_makes_run_return_store_unusable(sims, session_dir):
    """A complete line that is not a send record: run() returns STORE_UNUSABLE, like a corrupt store."""
    pair_and_connect(sims, session_dir).stop()
    (session_dir / SEND_LOG_FILE).write_bytes(b"not json\n")
    assert sims(session_dir).join() == ExitCode.STORE_UNUSABLE
