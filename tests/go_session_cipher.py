"""Test helper: decrypt a Signal WhisperMessage (type 1) with a whatsmeow store's session, the way
go.mau.fi/libsignal's `session.Cipher` does (`DecryptWithRecord` → `DecryptWithState` →
`getOrCreateChainKey` / `getOrCreateMessageKeys`, then MAC check and AES-256-CBC).

It reads and writes the session row as whatsmeow would (the record's JSON), so a test can feed
several messages in order. One simplification: a state is worked on as a copy and only kept when
the message decrypts (the Go code mutates it first; for successful decryption the result is the
same).
"""

from __future__ import annotations

import base64
import copy
import hashlib
import hmac
import json
import sqlite3
from typing import Any

from cryptography.hazmat.primitives import hashes, padding
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

MAX_FUTURE_MESSAGES = 2000
MAX_MESSAGE_KEYS = 2000
MAX_RECEIVER_CHAINS = 5


class DecryptError(Exception):
    """The message does not decrypt with any state of the record (Go: ErrNoValidSessions)."""


def _b(text: str | None) -> bytes:
    return b"" if text is None else base64.b64decode(text)


def _e(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _hkdf(secret: bytes, salt: bytes | None, info: bytes, length: int) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=salt if salt else bytes(32), info=info).derive(secret)


def _varint(data: bytes, i: int) -> tuple[int, int]:
    shift = value = 0
    while True:
        byte = data[i]
        i += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return value, i


def parse_whisper(body: bytes) -> dict[str, Any]:
    """A serialized SignalMessage: version byte, protobuf (ratchetKey=1, counter=2, previousCounter=3,
    ciphertext=4), 8-byte MAC."""
    fields: dict[int, Any] = {}
    proto = body[1:-8]
    i = 0
    while i < len(proto):
        tag, i = _varint(proto, i)
        number, wire = tag >> 3, tag & 7
        if wire == 0:
            fields[number], i = _varint(proto, i)
        elif wire == 2:
            length, i = _varint(proto, i)
            fields[number] = proto[i:i + length]
            i += length
        else:
            raise ValueError(f"unexpected wire type {wire}")
    return {"version": body[0] >> 4, "ratchet_key": fields[1], "counter": fields.get(2, 0),
            "previous_counter": fields.get(3, 0), "ciphertext": fields[4], "signed": body[:-8], "mac": body[-8:]}


def _message_keys(chain_key: bytes, index: int) -> dict[str, Any]:
    seed = hmac.new(chain_key, b"\x01", hashlib.sha256).digest()
    material = _hkdf(seed, None, b"WhisperMessageKeys", 80)
    return {"CipherKey": _e(material[:32]), "MacKey": _e(material[32:64]), "IV": _e(material[64:80]), "Index": index}


def _next_key(chain_key: bytes) -> bytes:
    return hmac.new(chain_key, b"\x02", hashlib.sha256).digest()


def _create_chain(root_key: bytes, their_public: bytes, our_private: bytes) -> tuple[bytes, bytes]:
    """RootKey.CreateChain: (new root key, new chain key)."""
    shared = X25519PrivateKey.from_private_bytes(our_private).exchange(X25519PublicKey.from_public_bytes(their_public[1:]))
    derived = _hkdf(shared, root_key, b"WhisperRatchet", 64)
    return derived[:32], derived[32:]


def _receiver_chain(state: dict[str, Any], their: bytes) -> dict[str, Any] | None:
    for chain in state["ReceiverChains"]:
        if _b(chain["SenderRatchetKeyPublic"])[1:] == their[1:]:
            return chain
    return None


def _chain_key(state: dict[str, Any], their: bytes) -> dict[str, Any]:
    """getOrCreateChainKey: the receiver chain for their ratchet key, after a DH step if it is new."""
    chain = _receiver_chain(state, their)
    if chain is not None:
        return chain
    our = state["SenderChain"]
    root, receiver_key = _create_chain(_b(state["RootKey"]), their, _b(our["SenderRatchetKeyPrivate"]))
    new_private = X25519PrivateKey.generate()
    new_public = b"\x05" + new_private.public_key().public_bytes_raw()
    root, sender_key = _create_chain(root, their, new_private.private_bytes_raw())
    state["RootKey"] = _e(root)
    chain = {"SenderRatchetKeyPublic": _e(their), "SenderRatchetKeyPrivate": None,
             "ChainKey": {"Key": _e(receiver_key), "Index": 0}, "MessageKeys": []}
    state["ReceiverChains"].append(chain)
    if len(state["ReceiverChains"]) > MAX_RECEIVER_CHAINS:
        state["ReceiverChains"].pop(0)
    state["PreviousCounter"] = max(our["ChainKey"]["Index"] - 1, 0)
    state["SenderChain"] = {"SenderRatchetKeyPublic": _e(new_public), "SenderRatchetKeyPrivate": _e(new_private.private_bytes_raw()),
                            "ChainKey": {"Key": _e(sender_key), "Index": 0}, "MessageKeys": []}
    return chain


def _message_keys_for(chain: dict[str, Any], counter: int) -> dict[str, Any]:
    """getOrCreateMessageKeys."""
    key, index = _b(chain["ChainKey"]["Key"]), chain["ChainKey"]["Index"]
    if index > counter:
        for n, keys in enumerate(chain["MessageKeys"]):
            if keys["Index"] == counter:
                return chain["MessageKeys"].pop(n)
        raise DecryptError(f"old counter: chain index {index}, message {counter}")
    if counter - index > MAX_FUTURE_MESSAGES:
        raise DecryptError("too far into the future")
    while index < counter:
        chain["MessageKeys"].append(_message_keys(key, index))
        chain["MessageKeys"] = chain["MessageKeys"][-MAX_MESSAGE_KEYS:]
        key, index = _next_key(key), index + 1
    chain["ChainKey"] = {"Key": _e(_next_key(key)), "Index": index + 1}
    return _message_keys(key, index)


def decrypt_with_state(state: dict[str, Any], message: dict[str, Any]) -> bytes:
    if state.get("SenderChain") is None:
        raise DecryptError("uninitialized session")
    if message["version"] != state["SessionVersion"]:
        raise DecryptError("wrong message version")
    chain = _chain_key(state, message["ratchet_key"])
    keys = _message_keys_for(chain, message["counter"])
    mac = hmac.new(_b(keys["MacKey"]), _b(state["RemoteIdentityPublic"]) + _b(state["LocalIdentityPublic"]) + message["signed"],
                   hashlib.sha256).digest()[:8]
    if not hmac.compare_digest(mac, message["mac"]):
        raise DecryptError("bad MAC")
    decryptor = Cipher(algorithms.AES(_b(keys["CipherKey"])), modes.CBC(_b(keys["IV"]))).decryptor()
    padded = decryptor.update(message["ciphertext"]) + decryptor.finalize()
    unpadder = padding.PKCS7(128).unpadder()
    plaintext = unpadder.update(padded) + unpadder.finalize()
    state["PendingPreKey"] = None
    return plaintext


def decrypt_with_record(record: dict[str, Any], body: bytes) -> bytes:
    """DecryptWithRecord: the current state, then each previous one (promoted when it works)."""
    message = parse_whisper(body)
    errors = []
    candidates = [record["SessionState"], *record["PreviousStates"]]
    for n, state in enumerate(candidates):
        work = copy.deepcopy(state)
        try:
            plaintext = decrypt_with_state(work, message)
        except (DecryptError, ValueError) as exc:
            errors.append(str(exc))
            continue
        if n == 0:
            record["SessionState"] = work
        else:
            previous = record["PreviousStates"]
            del previous[n - 1]
            record["PreviousStates"] = [record["SessionState"], *previous]
            record["SessionState"] = work
        return plaintext
    raise DecryptError("no valid session: " + "; ".join(errors))


def load_session(db: sqlite3.Connection, their_id: str) -> dict[str, Any]:
    row = db.execute("SELECT session FROM whatsmeow_sessions WHERE their_id = ?", (their_id,)).fetchone()
    assert row is not None, f"no session for {their_id}"
    record: dict[str, Any] = json.loads(row[0])
    return record


def store_session(db: sqlite3.Connection, their_id: str, record: dict[str, Any]) -> None:
    with db:
        db.execute("UPDATE whatsmeow_sessions SET session = ? WHERE their_id = ?", (json.dumps(record).encode(), their_id))


def decrypt(db: sqlite3.Connection, their_id: str, body: bytes) -> bytes:
    """Decrypt with the stored session and store the advanced session, as whatsmeow does."""
    record = load_session(db, their_id)
    plaintext = decrypt_with_record(record, body)
    store_session(db, their_id, record)
    return plaintext


def _field(number: int, value: int | bytes) -> bytes:
    def varint(n: int) -> bytes:
        out = bytearray()
        while True:
            out.append((n & 0x7F) | (0x80 if n > 0x7F else 0))
            n >>= 7
            if not n:
                return bytes(out)

    if isinstance(value, int):
        return varint(number << 3) + varint(value)
    return varint(number << 3 | 2) + varint(len(value)) + value


def encrypt(db: sqlite3.Connection, their_id: str, plaintext: bytes) -> bytes:
    """session.Cipher.Encrypt for an acknowledged session (a WhisperMessage, type 1); stores the advanced session."""
    record = load_session(db, their_id)
    state = record["SessionState"]
    if state.get("PendingPreKey") is not None:
        raise NotImplementedError("a session with a pending pre-key sends PreKeyWhisperMessages")
    chain = state["SenderChain"]
    key, index = _b(chain["ChainKey"]["Key"]), chain["ChainKey"]["Index"]
    keys = _message_keys(key, index)
    padder = padding.PKCS7(128).padder()
    encryptor = Cipher(algorithms.AES(_b(keys["CipherKey"])), modes.CBC(_b(keys["IV"]))).encryptor()
    ciphertext = encryptor.update(padder.update(plaintext) + padder.finalize()) + encryptor.finalize()
    serialized = bytes([state["SessionVersion"] << 4 | state["SessionVersion"]]) + (
        _field(1, _b(chain["SenderRatchetKeyPublic"])) + _field(2, index) + _field(3, state["PreviousCounter"])
        + _field(4, ciphertext))
    mac = hmac.new(_b(keys["MacKey"]), _b(state["LocalIdentityPublic"]) + _b(state["RemoteIdentityPublic"]) + serialized,
                   hashlib.sha256).digest()[:8]
    chain["ChainKey"] = {"Key": _e(_next_key(key)), "Index": index + 1}
    store_session(db, their_id, record)
    return serialized + mac


def node_peer_decrypt(record: dict[str, Any], our_identity_public: bytes, body: bytes) -> bytes:
    """The contact's side, as libsignal-node's SessionCipher decrypts on an existing receiving chain
    (fillMessageKeys from `counter`, seeds through HKDF), independent of the converter."""
    message = parse_whisper(body)
    chain_id = base64.b64encode(message["ratchet_key"]).decode()
    for entry in sorted(record["_sessions"].values(), key=lambda e: e["indexInfo"].get("used", 0), reverse=True):
        chain = copy.deepcopy(entry["_chains"].get(chain_id))
        if chain is None or chain["chainType"] != 2:
            continue
        counter, key = chain["chainKey"]["counter"], chain["chainKey"].get("key")
        keys = {int(i): _b(s) for i, s in chain["messageKeys"].items()}
        while counter < message["counter"]:
            keys[counter + 1] = hmac.new(_b(key), b"\x01", hashlib.sha256).digest()
            key = _e(hmac.new(_b(key), b"\x02", hashlib.sha256).digest())
            counter += 1
        if message["counter"] not in keys:
            raise DecryptError("key used already or never filled")
        material = _hkdf(keys[message["counter"]], None, b"WhisperMessageKeys", 96)
        remote = _b(entry["indexInfo"]["remoteIdentityKey"])
        mac = hmac.new(material[32:64], remote + our_identity_public + message["signed"], hashlib.sha256).digest()[:8]
        if not hmac.compare_digest(mac, message["mac"]):
            raise DecryptError("bad MAC")
        decryptor = Cipher(algorithms.AES(material[:32]), modes.CBC(material[64:80])).decryptor()
        unpadder = padding.PKCS7(128).unpadder()
        return unpadder.update(decryptor.update(message["ciphertext"]) + decryptor.finalize()) + unpadder.finalize()
    raise DecryptError("no receiving chain for the message's ratchet key")
