"""libsignal-node records (Baileys) → go.mau.fi/libsignal records (whatsmeow).

whatsmeow stores sessions and sender keys as JSON: go.mau.fi/libsignal's `JSONSessionSerializer`
and `JSONSenderKeySessionSerializer` (`serialize.NewProtoBufSerializer()` uses them for records;
only wire messages are protobuf). The JSON is Go's `encoding/json` of the record structures:
Go field names, byte slices as standard base64, nil as null.

Two semantic differences, each of which breaks decryption when missed:

1. libsignal-node's `chainKey.counter` is the index of the last message key derived (−1 for a
   fresh chain); Go's `ChainKey.Index` is the index of the next one: Index = counter + 1.
2. libsignal-node keeps a skipped message's key as the 32-byte seed HMAC(chainKey, 0x01); Go
   keeps the derived keys: CipherKey‖MacKey‖IV = HKDF-SHA256(seed, 32 zero bytes,
   "WhisperMessageKeys", 80). Group sender keys likewise with "WhisperGroup": IV(16)‖CipherKey(32),
   the seed kept beside them.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from whatsappd.baileys.keys import DJB_TYPE, check_pair, djb_public
from whatsappd.baileys.source import as_bytes, as_int, sized

__all__ = ["ConvertedSenderKey", "ConvertedSession", "convert_sender_key", "convert_session", "hkdf"]

SESSION_VERSION = 3
MAX_RECEIVER_CHAINS = 5  # go.mau.fi/libsignal keeps the newest five
MAX_MESSAGE_KEYS = 2000  # per chain, in both libraries
MAX_PREVIOUS_STATES = 40  # go.mau.fi/libsignal's archivedStatesMaxLength
MAX_SENDER_KEY_STATES = 5
MAX_INT32 = 2**31 - 1
SENDING, RECEIVING = 1, 2  # libsignal-node's ChainType


def hkdf(seed: bytes, info: bytes, length: int) -> bytes:
    """HKDF-SHA256 with a salt of 32 zero bytes (what both libraries use for message keys)."""
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=bytes(32), info=info).derive(seed)


def _b64(data: bytes | None) -> str | None:
    return None if data is None else base64.b64encode(data).decode("ascii")


def _public(value: Any, what: str) -> bytes:
    """A public key as libsignal serializes it: 0x05 + 32 bytes (32 bare bytes get the type byte)."""
    return bytes([DJB_TYPE]) + djb_public(as_bytes(value, what), what)


@dataclass
class ConvertedSession:
    record: bytes | None  # Go JSON of a SessionStructure; None when nothing can be imported
    remote_identity: bytes | None  # 32 bytes: the open state's remote identity key
    states: int = 0  # states imported (current + previous)
    key_pairs: int = 0  # key pairs checked
    dropped: list[str] = field(default_factory=list)  # what was left out, and why


@dataclass
class ConvertedSenderKey:
    record: bytes
    states: int
    key_pairs: int


def convert_session(record: Mapping[str, Any], local_identity: bytes, local_registration_id: int,
                    what: str) -> ConvertedSession:
    """One libsignal-node `SessionRecord` (as Baileys stores it) as a go.mau.fi/libsignal record.

    The open entry becomes `SessionState`, closed ones `PreviousStates`, most recently closed
    first. Raises ValueError (malformed) or KeyProblem (a private key not matching its public).
    """
    entries = record.get("_sessions")
    if not isinstance(entries, Mapping):
        raise ValueError(f"{what} has no _sessions object")
    fallback_registration = record.get("registrationId")  # libsignal-node's pre-"v1" records
    local_public = bytes([DJB_TYPE]) + local_identity
    out = ConvertedSession(None, None)
    open_states: list[tuple[int, dict[str, Any], bytes]] = []
    closed_states: list[tuple[int, dict[str, Any]]] = []
    for base_key, entry in entries.items():
        if not isinstance(entry, Mapping):
            raise ValueError(f"{what}: session {base_key} is not an object")
        label = f"{what}, session {base_key}"
        if entry.get("registrationId") is None and fallback_registration is not None:
            entry = {**entry, "registrationId": fallback_registration}
        state, remote_identity, closed, used = _state(entry, local_public, local_registration_id, label, out)
        if state is None:
            continue
        if closed == -1:
            open_states.append((used, state, remote_identity))
        else:
            closed_states.append((closed, state))
    if not open_states:
        if closed_states or entries:
            out.dropped.append(f"{what}: no open session to continue ({len(entries)} closed or unusable); "
                               "whatsmeow starts a new one with the next message")
        return out
    open_states.sort(key=lambda s: s[0], reverse=True)
    _, current, remote_identity = open_states[0]
    # A second open entry should not exist; keep it as the newest previous state rather than lose it.
    previous = [s for _, s, _ in open_states[1:]] + [s for _, s in sorted(closed_states, key=lambda c: c[0], reverse=True)]
    if len(previous) > MAX_PREVIOUS_STATES:
        out.dropped.append(f"{what}: the {len(previous) - MAX_PREVIOUS_STATES} oldest closed sessions "
                           f"(whatsmeow keeps {MAX_PREVIOUS_STATES})")
        previous = previous[:MAX_PREVIOUS_STATES]
    out.record = json.dumps({"SessionState": current, "PreviousStates": previous}, separators=(",", ":")).encode()
    out.remote_identity = remote_identity[1:]
    out.states = 1 + len(previous)
    return out


def _state(entry: Mapping[str, Any], local_public: bytes, local_registration_id: int, what: str,
           out: ConvertedSession) -> tuple[dict[str, Any] | None, bytes, int, int]:
    ratchet = entry.get("currentRatchet")
    index = entry.get("indexInfo")
    chains = entry.get("_chains")
    if not isinstance(ratchet, Mapping) or not isinstance(index, Mapping) or not isinstance(chains, Mapping):
        raise ValueError(f"{what} lacks currentRatchet, indexInfo or _chains")
    pair = ratchet.get("ephemeralKeyPair")
    if not isinstance(pair, Mapping):
        raise ValueError(f"{what} lacks currentRatchet.ephemeralKeyPair")
    our_public = _public(pair.get("pubKey"), f"{what}: ephemeral public key")
    our_private = sized(pair.get("privKey"), f"{what}: ephemeral private key", 32)
    check_pair(f"{what}'s ratchet key", our_private, our_public)
    out.key_pairs += 1
    root_key = sized(ratchet.get("rootKey"), f"{what}: root key", 32)
    _public(ratchet.get("lastRemoteEphemeralKey"), f"{what}: last remote ephemeral key")
    previous_counter = as_int(ratchet.get("previousCounter", 0), f"{what}: previousCounter", -1)
    remote_identity = _public(index.get("remoteIdentityKey"), f"{what}: remote identity key")
    base_key = _public(index.get("baseKey"), f"{what}: base key")
    closed = as_int(index.get("closed", -1), f"{what}: closed", -1, 2**63 - 1)
    used = as_int(index.get("used", 0) or 0, f"{what}: used", 0, 2**63 - 1)
    registration_id = as_int(entry.get("registrationId"), f"{what}: registrationId")

    sender: dict[str, Any] | None = None
    receivers: list[dict[str, Any]] = []
    for chain_key_b64, chain in chains.items():
        if not isinstance(chain, Mapping):
            raise ValueError(f"{what}: chain {chain_key_b64} is not an object")
        ratchet_public = _public(chain_key_b64, f"{what}: chain id")
        kind = chain.get("chainType")
        if kind == SENDING and ratchet_public == our_public:
            sender = _chain(chain, ratchet_public, our_private, f"{what}: sending chain")
        elif kind == RECEIVING:
            receivers.append(_chain(chain, ratchet_public, None, f"{what}: receiving chain {chain_key_b64}"))
        elif kind != SENDING:
            raise ValueError(f"{what}: chain {chain_key_b64} has chainType {kind!r}, not 1 or 2")
    if sender is None:
        out.dropped.append(f"{what}: no sending chain for its current ratchet key (a session that never "
                           "decrypted its first message); left out")
        return None, remote_identity, closed, used
    if len(receivers) > MAX_RECEIVER_CHAINS:
        lost = sum(len(c["MessageKeys"]) for c in receivers[:-MAX_RECEIVER_CHAINS])
        if lost:
            out.dropped.append(f"{what}: {lost} skipped-message keys of receiving chains older than the newest "
                               f"{MAX_RECEIVER_CHAINS} (whatsmeow keeps five)")
        receivers = receivers[-MAX_RECEIVER_CHAINS:]

    pending = entry.get("pendingPreKey")
    pending_go: dict[str, Any] | None = None
    if pending is not None:
        if not isinstance(pending, Mapping):
            raise ValueError(f"{what}: pendingPreKey is not an object")
        pre_key_id = pending.get("preKeyId")
        pending_go = {
            "PreKeyID": ({"Value": 0, "IsEmpty": True} if pre_key_id is None
                         else {"Value": as_int(pre_key_id, f"{what}: pendingPreKey.preKeyId"), "IsEmpty": False}),
            "SignedPreKeyID": as_int(pending.get("signedKeyId"), f"{what}: pendingPreKey.signedKeyId"),
            "BaseKey": _b64(_public(pending.get("baseKey"), f"{what}: pendingPreKey.baseKey")),
        }
    state = {
        "LocalIdentityPublic": _b64(local_public),
        "LocalRegistrationID": local_registration_id,
        "NeedsRefresh": False,
        "PendingKeyExchange": None,
        "PendingPreKey": pending_go,
        # libsignal-node: last index sent on the previous sending chain, −1 for none; Go clamps at 0.
        "PreviousCounter": max(previous_counter, 0),
        "ReceiverChains": receivers,
        "RemoteIdentityPublic": _b64(remote_identity),
        "RemoteRegistrationID": registration_id,
        "RootKey": _b64(root_key),
        "SenderBaseKey": _b64(base_key),
        "SenderChain": sender,
        "SessionVersion": SESSION_VERSION,
    }
    return state, remote_identity, closed, used


def _chain(chain: Mapping[str, Any], ratchet_public: bytes, ratchet_private: bytes | None, what: str) -> dict[str, Any]:
    chain_key = chain.get("chainKey")
    if not isinstance(chain_key, Mapping):
        raise ValueError(f"{what} lacks chainKey")
    counter = as_int(chain_key.get("counter"), f"{what}: counter", -1, MAX_INT32)
    key_value = chain_key.get("key")
    # A receiving chain libsignal-node closed (after a DH ratchet step) has no key any more;
    # only its skipped-message keys still matter.
    key = None if key_value is None else sized(key_value, f"{what}: chain key", 32)
    message_keys = chain.get("messageKeys") or {}
    if not isinstance(message_keys, Mapping):
        raise ValueError(f"{what}: messageKeys is not an object")
    derived = []
    for index_text, seed_value in sorted(message_keys.items(), key=lambda kv: as_int(kv[0], f"{what}: message key index")):
        index = as_int(index_text, f"{what}: message key index")
        material = hkdf(sized(seed_value, f"{what}: message key {index}", 32), b"WhisperMessageKeys", 80)
        derived.append({"CipherKey": _b64(material[:32]), "MacKey": _b64(material[32:64]),
                        "IV": _b64(material[64:80]), "Index": index})
    return {
        "SenderRatchetKeyPublic": _b64(ratchet_public),
        "SenderRatchetKeyPrivate": _b64(ratchet_private),
        "ChainKey": {"Key": _b64(key), "Index": counter + 1},  # next index (Go) = last derived (node) + 1
        "MessageKeys": derived[-MAX_MESSAGE_KEYS:],
    }



def convert_sender_key(states: Any, what: str) -> ConvertedSenderKey:
    """A Baileys sender-key record (a list of states, newest last) as a go.mau.fi/libsignal
    `SenderKeyStructure` (newest first)."""
    if not isinstance(states, list):
        raise ValueError(f"{what} is not a list of sender key states")
    converted = []
    key_pairs = 0
    for n, state in enumerate(states):
        label = f"{what}, state {n}"
        if not isinstance(state, Mapping):
            raise ValueError(f"{label} is not an object")
        chain = state.get("senderChainKey")
        signing = state.get("senderSigningKey")
        if not isinstance(chain, Mapping) or not isinstance(signing, Mapping):
            raise ValueError(f"{label} lacks senderChainKey or senderSigningKey")
        public = _public(signing.get("public"), f"{label}: signing public key")
        private = None
        if signing.get("private") is not None:
            private = sized(signing.get("private"), f"{label}: signing private key", 32)
            check_pair(f"{label}'s signing key", private, public)
            key_pairs += 1
        keys = []
        for message_key in state.get("senderMessageKeys") or []:
            if not isinstance(message_key, Mapping):
                raise ValueError(f"{label}: a sender message key is not an object")
            iteration = as_int(message_key.get("iteration"), f"{label}: sender message key iteration")
            seed = sized(message_key.get("seed"), f"{label}: sender message key {iteration}", 32)
            material = hkdf(seed, b"WhisperGroup", 48)
            keys.append({"Iteration": iteration, "IV": _b64(material[:16]), "CipherKey": _b64(material[16:48]),
                         "Seed": _b64(seed)})
        converted.append({
            "Keys": keys[-MAX_MESSAGE_KEYS:],
            "KeyID": as_int(state.get("senderKeyId"), f"{label}: senderKeyId"),
            "SenderChainKey": {"Iteration": as_int(chain.get("iteration"), f"{label}: iteration"),
                               "ChainKey": _b64(sized(chain.get("seed"), f"{label}: chain key", 32))},
            "SigningKeyPrivate": _b64(private),
            "SigningKeyPublic": _b64(public),
        })
    converted.reverse()
    converted = converted[:MAX_SENDER_KEY_STATES]
    record = json.dumps({"SenderKeyStates": converted}, separators=(",", ":")).encode()
    return ConvertedSenderKey(record, len(converted), key_pairs)
