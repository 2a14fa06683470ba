"""The supervisor <-> worker protocol (whatsappd/protocol.py): commands parsed once, worker
messages typed, the simulate-action table, and the rules both sides share (no engine loaded)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from whatsappd.errors import ErrorCode
from whatsappd.protocol import (
    SIMULATE_ACTIONS,
    CommandMessage,
    ConnectRequest,
    EngineError,
    EventMessage,
    Heartbeat,
    Hello,
    Op,
    Paired,
    Qr,
    Recipient,
    Reply,
    ReplyError,
    Send,
    Simulate,
    StateReport,
    UnknownMessage,
    WorkerState,
    decode,
    encode,
    parse_command,
    parse_worker_message,
)
from whatsappd.recipients import InvalidRecipient, normalize_recipient
from whatsappd.worker.engine import EngineOptions
from whatsappd.worker.simulator.engine import SimulatorEngine

REPO = Path(__file__).resolve().parents[1]
ALICE = "5511999990001@s.whatsapp.net"


def refusal(op: str, args: Any) -> tuple[str, str, bool]:
    with pytest.raises(EngineError) as caught:
        parse_command({"type": "command", "id": 1, "op": op, "args": args})
    return caught.value.code, caught.value.message, caught.value.permanent


@pytest.mark.parametrize(("args", "code"), [
    ({"to": ALICE, "kind": "text", "text": "x"}, "invalid_argument"),  # no outbox_id
    ({"outbox_id": "msg_1", "to": "12@g.us", "text": "x"}, "invalid_recipient"),
    ({"outbox_id": "msg_1", "to": f"{ALICE[:13]}:3@s.whatsapp.net", "text": "x"}, "invalid_recipient"),
    ({"outbox_id": "msg_1", "to": ALICE, "kind": "video"}, "invalid_argument"),
    ({"outbox_id": "msg_1", "to": ALICE, "text": "x" * 65537}, "too_large"),
    ({"outbox_id": "msg_1", "to": ALICE, "kind": "image", "caption": "x" * 65537, "media_path": "/x"}, "too_large"),
    ({"outbox_id": "msg_1", "to": ALICE, "kind": "document"}, "media_invalid"),
])
def test_a_bad_send_is_refused_permanently_before_any_engine(args: dict[str, Any], code: str) -> None:
    """parse_command refuses a bad send with the engines' codes, each permanent (a retry cannot fix it)."""
    assert refusal("send", args)[::2] == (code, True)


def test_a_valid_send_arrives_typed() -> None:
    """A valid send becomes a Send with its recipient split; to_args gives the wire arguments back."""
    wire = {"outbox_id": "msg_1", "to": "120363000000000001@g.us", "kind": "image", "text": None, "caption": "c",
            "filename": None, "mimetype": "image/png", "media_path": "/tmp/x"}
    send = parse_command({"type": "command", "id": 7, "op": "send", "args": wire})
    assert send == Send("msg_1", Recipient("120363000000000001@g.us", "120363000000000001", "g.us"), "image",
                        caption="c", mimetype="image/png", media_path="/tmp/x")
    assert send.to.phone is None
    assert CommandMessage(7, send).to_wire() == {"type": "command", "id": 7, "op": "send", "args": wire}


@pytest.mark.parametrize("to", ["5511999990001@s.whatsapp.net", "5511999990001:3@s.whatsapp.net", "12@g.us",
                                "120363000000000001@g.us", "1203630-12345@g.us", "abc@g.us", "0511999990001@s.whatsapp.net"])
def test_the_engines_take_exactly_the_jids_the_api_gives_them(to: str) -> None:
    """One JID grammar: what normalize_recipient gives is what a send accepts, and nothing else."""
    try:
        normalized: str | None = normalize_recipient(to)
    except InvalidRecipient:
        normalized = None
    accepted: set[str] = set()
    for candidate in {to, normalized} - {None}:
        try:
            parse_command({"op": "send", "args": {"outbox_id": "m", "to": candidate, "text": "x"}})
            accepted.add(str(candidate))
        except EngineError as exc:
            assert exc.code == ErrorCode.INVALID_RECIPIENT
    assert accepted == ({normalized} if normalized is not None else set())


def test_commands_the_engine_does_not_offer_are_unknown_op_before_their_arguments() -> None:
    """An op outside the engine's set is unknown_op, whatever its arguments."""
    for op in ("teleport", None, "simulate"):
        with pytest.raises(EngineError) as caught:
            parse_command({"op": op, "args": {"action": 5}}, ops={Op.SEND}, engine="neonize")
        assert caught.value.code == ErrorCode.UNKNOWN_OP and "neonize engine" in caught.value.message
    assert refusal("logout", [1])[0] == "invalid_argument"  # arguments must be an object


@pytest.mark.parametrize(("op", "args", "code", "permanent"), [
    ("pair_phone", {"phone": "+5511999999999"}, "invalid_phone", False),
    ("check_number", {"phone": "05511999999"}, "invalid_phone", True),
    ("send_status", {"outbox_ids": "msg_1"}, "invalid_argument", False),
    ("download", {"message": "", "path": "/x"}, "media_unavailable", True),
    ("download", {"message": "abc"}, "invalid_argument", False),
    ("simulate", {"action": 3}, "invalid_argument", False),
    ("simulate", {"action": "explode"}, "unknown_action", False),
])
def test_other_commands_are_checked_once(op: str, args: dict[str, Any], code: str, permanent: bool) -> None:
    """pair_phone, check_number, send_status, download, simulate: refused with their codes."""
    got_code, _, got_permanent = refusal(op, args)
    assert (got_code, got_permanent) == (code, permanent)


@pytest.mark.neonize
def test_both_engines_refuse_bad_arguments_with_the_same_words(tmp_path: Path) -> None:
    """The engines answer a bad command identically: the check lives once, in protocol.parse_command."""
    from whatsappd.worker.neonize.engine import NeonizeEngine

    neonize = NeonizeEngine(EngineOptions("acme", tmp_path / "n", None, True), lambda m: None)
    simulator = SimulatorEngine(EngineOptions("acme", tmp_path / "s", None, True), lambda m: None, env={})
    for op, args in [("pair_phone", {"phone": "123"}), ("check_number", {"phone": None}),
                     ("send", {"outbox_id": "m", "to": "x@lid", "text": "x"}),
                     ("send", {"outbox_id": "m", "to": ALICE, "text": ""}),
                     ("send_status", {"outbox_ids": [1]}), ("download", {"message": "x"})]:
        answers = []
        for engine in (neonize, simulator):
            with pytest.raises(EngineError) as caught:
                engine.command(op, args)
            answers.append((caught.value.code, caught.value.message, caught.value.permanent))
        assert answers[0] == answers[1], (op, args)


def test_unknown_simulate_action_lists_the_table() -> None:
    """unknown_action names every action of SIMULATE_ACTIONS, and the simulator has a handler for each."""
    _, message, _ = refusal("simulate", {"action": "explode"})
    assert message.endswith("known: " + ", ".join(sorted(SIMULATE_ACTIONS)))
    assert set(SimulatorEngine._ACTIONS) == set(SIMULATE_ACTIONS)
    assert {name for name, action in SIMULATE_ACTIONS.items() if not action.replies} == {"crash", "hang"}
    simulate = parse_command({"op": "simulate", "args": {"action": "drop", "down": False}})
    assert simulate == Simulate("drop", {"action": "drop", "down": False})


@pytest.mark.parametrize("message", [
    Hello(42, "simulator"), Heartbeat(), ConnectRequest(), Paired(None), Qr("2@x", "2026-01-01T00:00:00Z"),
    StateReport(WorkerState.CONNECTING), StateReport(WorkerState.CONNECTED, jid="5511:1@s.whatsapp.net", push_name=None),
    StateReport(WorkerState.RECONNECTING, reason="drop"), StateReport(WorkerState.BANNED, reason="spam", until=None),
    Reply(3, result={"wa_id": "3EB0"}), Reply(4, error=ReplyError(ErrorCode.NOT_CONNECTED, "down", False)),
    Reply(5, error=ReplyError(ErrorCode.ENGINE_ERROR, "bug")),
    EventMessage({"type": "message.receipt", "ids": ["3EB0"], "chat": ALICE, "sender": ALICE, "receipt": "read",
                  "timestamp": "2026-01-01T00:00:00.000Z"}),
])
def test_worker_messages_round_trip_through_the_wire(message: Any) -> None:
    """Each worker message, encoded as a JSON line with its company, parses back to itself."""
    line = encode({**message.to_wire(), "company": "acme"})
    assert parse_worker_message(decode(line)) == message


def test_the_wire_keeps_its_exact_shape() -> None:
    """to_wire gives the JSON objects the worker always sent: fields per state, null when unknown."""
    assert StateReport(WorkerState.BANNED, reason="x").to_wire() == {
        "type": "state", "state": "banned", "reason": "x", "until": None}
    assert StateReport(WorkerState.PAIRING, reason="ignored").to_wire() == {"type": "state", "state": "pairing"}
    assert Reply(1, error=ReplyError(ErrorCode.ENGINE_ERROR, "bug")).to_wire() == {
        "type": "reply", "id": 1, "ok": False, "error": {"code": "engine_error", "message": "bug"}}
    assert Reply(1, error=ReplyError(ErrorCode.SEND_FAILED, "no", True)).failure().permanent


@pytest.mark.parametrize("message", [
    {"type": "hello", "pid": "1", "engine": "x"}, {"type": "state", "state": "dancing"},
    {"type": "qr", "code": 5, "expires_at": "x"}, {"type": "event", "event": {"type": "message.nope"}},
    {"type": "event", "event": {"type": "message.receipt", "ids": "x"}}, {"type": 3},
])
def test_a_malformed_worker_message_is_a_protocol_violation(message: dict[str, Any]) -> None:
    """parse_worker_message raises ValueError for a malformed known message."""
    with pytest.raises(ValueError):
        parse_worker_message(message)


def test_an_unknown_worker_message_type_is_ignored_not_fatal() -> None:
    """A type this side does not know (a newer worker) parses as UnknownMessage."""
    assert parse_worker_message({"type": "greeting", "company": "acme"}) == UnknownMessage("greeting")


def test_the_supervisor_side_never_loads_an_engine() -> None:
    """Importing sessions, protocol and the supervisor loads nothing of whatsappd.worker (no simulator, no neonize)."""
    code = ("import sys, whatsappd.sessions, whatsappd.sessionstore, whatsappd.protocol, whatsappd.supervisor.runner;"
            "print(sorted(m for m in sys.modules if m.startswith(('whatsappd.worker', 'neonize'))))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "[]"
