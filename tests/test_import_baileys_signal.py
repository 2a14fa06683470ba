"""Converted Signal sessions decrypt what the contacts sent after the switch, as go.mau.fi/libsignal would.

`post-migration.json` holds ciphertexts the fixture's contacts produced after the Baileys folder
was frozen. `go_session_cipher` (a test helper) follows go.mau.fi/libsignal's session cipher over
the converted store's rows. The controls undo one of the two semantic bridges the converter
makes and must fail, which shows the test would catch a converter that missed it.
"""

from __future__ import annotations

import base64
import contextlib
import json
import sqlite3
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from baileys_fixture import FIXTURE, FIXTURE7, baileys7, baileys_copy
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from go_session_cipher import DecryptError, decrypt, encrypt, load_session, node_peer_decrypt, store_session

from whatsappd.baileys.convert import convert
from whatsappd.baileys.signal import convert_sender_key
from whatsappd.baileys.source import read_snapshot
from whatsappd.baileys.whatsmeow import write_store

POST = json.loads((FIXTURE / "post-migration.json").read_text())
A, B = "5511888880001:0", "5511888880002:3"


def _body(text: str) -> bytes:
    return base64.b64decode(text)


@contextlib.contextmanager
def converted(source: Path, path: Path) -> Iterator[sqlite3.Connection]:
    """The folder converted into a store file, open."""
    conversion = convert(read_snapshot(source, 60))
    with contextlib.closing(sqlite3.connect(path)) as db:
        write_store(db, conversion)
        yield db


@pytest.fixture
def store(tmp_path: Path) -> Iterator[sqlite3.Connection]:
    with converted(baileys_copy(tmp_path / "crm"), tmp_path / "store.db") as db:
        yield db


def test_undelivered_and_post_migration_messages_from_a_decrypt(store: sqlite3.Connection) -> None:
    """A's two messages that never reached Baileys (stored skipped keys), then A's next one (the chain key) decrypt."""
    assert [decrypt(store, A, _body(m)) for m in POST["A_undelivered"]] == [b"hello from A #2", b"hello from A #3"]
    assert decrypt(store, A, _body(POST["A"]["body"])) == b"post-migration message from A"


def test_a_message_after_a_dh_ratchet_step_from_b_decrypts(store: sqlite3.Connection) -> None:
    """B's message carries a new ratchet key: the root key and our ratchet private key must be right."""
    assert decrypt(store, B, _body(POST["B"]["body"])) == b"post-migration message from B"


def test_a_message_decrypts_once_only(store: sqlite3.Connection) -> None:
    """The session advances as whatsmeow's would: the same message a second time is an old counter."""
    decrypt(store, A, _body(POST["A"]["body"]))
    with pytest.raises(DecryptError, match="old counter"):
        decrypt(store, A, _body(POST["A"]["body"]))


def _edit_receiver_chains(db: sqlite3.Connection, change: Callable[[dict[str, Any]], None]) -> None:
    record = load_session(db, A)
    for chain in record["SessionState"]["ReceiverChains"]:
        change(chain)
    store_session(db, A, record)


def test_off_by_one_control_fails(store: sqlite3.Connection) -> None:
    """Control: with Go's Index set to libsignal-node's counter (no + 1), A's post-migration message does not decrypt."""
    _edit_receiver_chains(store, lambda chain: chain["ChainKey"].update(Index=chain["ChainKey"]["Index"] - 1))
    with pytest.raises(DecryptError, match="bad MAC"):
        decrypt(store, A, _body(POST["A"]["body"]))


def test_seed_control_fails(tmp_path: Path, store: sqlite3.Connection) -> None:
    """Control: skipped-message keys stored as libsignal-node's seeds (not HKDF-derived) do not decrypt A's undelivered ones."""
    source = FIXTURE / "session-7" / "session-5511888880001.0.json"
    entry = next(iter(json.loads(source.read_text())["_sessions"].values()))
    seeds = next(c["messageKeys"] for c in entry["_chains"].values() if c["messageKeys"])

    def as_seeds(chain: dict[str, Any]) -> None:
        if chain["MessageKeys"]:
            chain["MessageKeys"] = [{"CipherKey": s, "MacKey": s, "IV": base64.b64encode(base64.b64decode(s)[:16]).decode(),
                                     "Index": int(i)} for i, s in seeds.items()]

    _edit_receiver_chains(store, as_seeds)
    with pytest.raises(DecryptError, match="bad MAC"):
        decrypt(store, A, _body(POST["A_undelivered"][0]))


def test_baileys_7_sessions_decrypt_under_the_lid_and_the_phone_address(tmp_path: Path) -> None:
    """Baileys 7 fixture: A's session, kept under its LID (user_1.0), continues as whatsmeow's 987654321_1:0; B's too."""
    post = json.loads((FIXTURE7 / "post-migration.json").read_text())
    with converted(baileys7(tmp_path / "crm"), tmp_path / "store.db") as db:
        lid_a = "987654321_1:0"
        assert [decrypt(db, lid_a, _body(m)) for m in post["A_undelivered"]] == [b"hello from A #2", b"hello from A #3"]
        assert decrypt(db, lid_a, _body(post["A"]["body"])) == b"post-migration message from A"
        assert decrypt(db, B, _body(post["B"]["body"])) == b"post-migration message from B"
        assert db.execute("SELECT pn FROM whatsmeow_lid_map WHERE lid = '987654321'").fetchone() == ("5511888880001",)


def test_messages_encrypted_with_a_converted_session_decrypt_at_the_contact(store: sqlite3.Connection) -> None:
    """Sending continues: what whatsmeow encrypts with B's converted session, B's libsignal-node state decrypts, in order."""
    peer = json.loads((FIXTURE / "peers.json").read_text())["B"]
    record = peer["sessions"]["5511999990000.12"]
    first, second = encrypt(store, B, b"first after the switch"), encrypt(store, B, b"second after the switch")
    identity = base64.b64decode(peer["identityPub"])
    assert node_peer_decrypt(record, identity, first) == b"first after the switch"
    assert node_peer_decrypt(record, identity, second) == b"second after the switch"


def test_a_session_still_waiting_for_its_first_answer_keeps_its_pending_pre_key(store: sqlite3.Connection) -> None:
    """C never answered: the session keeps the pending pre-key, so whatsmeow's next message is a pre-key message again."""
    state = load_session(store, "5511888880003:0")["SessionState"]
    assert state["PendingPreKey"]["PreKeyID"] == {"Value": 77, "IsEmpty": False}
    assert state["PendingPreKey"]["SignedPreKeyID"] == 1


def test_sender_key_states_turn_newest_first_with_derived_skipped_keys() -> None:
    """Baileys keeps sender-key states oldest first and skipped keys as seeds; Go wants newest first and IV‖CipherKey."""
    seed = bytes(range(32))
    public = "BQsVBAomYrbMjOGc6L0QAjQxvvvcqvq8sxLCweiJOfNx"
    states = [{"senderKeyId": n, "senderChainKey": {"iteration": 5, "seed": base64.b64encode(bytes(32)).decode()},
               "senderSigningKey": {"public": public},
               "senderMessageKeys": [{"iteration": 3, "seed": base64.b64encode(seed).decode()}]} for n in (1, 2)]
    record = json.loads(convert_sender_key(states, "test").record)
    assert [s["KeyID"] for s in record["SenderKeyStates"]] == [2, 1]
    (key,) = record["SenderKeyStates"][0]["Keys"]
    material = HKDF(algorithm=hashes.SHA256(), length=48, salt=bytes(32), info=b"WhisperGroup").derive(seed)
    assert (key["Iteration"], base64.b64decode(key["IV"]), base64.b64decode(key["CipherKey"]), base64.b64decode(key["Seed"])) == (
        3, material[:16], material[16:], seed)
    assert record["SenderKeyStates"][0]["SigningKeyPrivate"] is None  # a contact's key: public only
