"""A Baileys folder snapshot → the rows of a whatsmeow store, with every key checked.

Everything that maps is converted (the table in the module docstring of `whatsappd.baileys`);
what does not is listed with why. Key material that is malformed or inconsistent refuses the
whole company (`Refused`): a half-imported identity is worse than a QR scan. Caches whatsmeow
can rebuild from the server (LID mappings, app-state versions, privacy tokens) are skipped
with a warning when malformed instead.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from whatsappd.baileys.keys import KeyProblem, check_pair, djb_public, xeddsa_verify
from whatsappd.baileys.report import Refused, Unmapped
from whatsappd.baileys.signal import convert_sender_key, convert_session
from whatsappd.baileys.source import Snapshot, SourceFile, as_bytes, as_int, sized
from whatsappd.errors import ErrorCode

__all__ = ["Conversion", "Device", "convert", "fingerprint_proto"]

_PN_JID = re.compile(r"([1-9][0-9]{4,19}):([0-9]{1,5})@s\.whatsapp\.net")
_LID_JID = re.compile(r"([1-9][0-9]{0,19})(?::([0-9]{1,5}))?@lid")
_ADDRESS = re.compile(r"([0-9]{1,20}(?:_[0-9]{1,3})?)\.([0-9]{1,5})")  # libsignal-node "name.device"
_USER_JID = re.compile(r"[0-9]{1,20}@(?:s\.whatsapp\.net|lid)")
_APP_STATE_NAMES = frozenset({"critical_block", "critical_unblock_low", "regular_high", "regular_low", "regular"})
_ADV_ACCOUNT_PREFIXES = (bytes([6, 0]), bytes([6, 5]))  # ordinary and hosted accounts
_ADV_DEVICE_PREFIX = bytes([6, 1])
_MAX_PRE_KEY_ID = 2**24 - 1
_BAILEYS_7_KINDS = ("lid-mapping", "identity-key", "device-list", "tctoken")  # key types Baileys 6 never writes

_CREDS_MAPPED = frozenset({"noiseKey", "signedIdentityKey", "signedPreKey", "registrationId", "advSecretKey", "me",
                           "account", "platform", "nextPreKeyId", "firstUnuploadedPreKeyId", "signalIdentities"})
_CREDS_UNMAPPED = {
    "pairingEphemeralKeyPair": "used only while pairing",
    "processedHistoryMessages": "Baileys' record of the history syncs it handled; whatsmeow keeps none",
    "accountSyncCounter": "Baileys bookkeeping",
    "accountSettings": "Baileys' own settings, not WhatsApp data",
    "registered": "Baileys bookkeeping for pairing by code",
    "pairingCode": "used only while pairing",
    "routingInfo": "an edge-routing hint; the server sends a new one at login",
    "lastAccountSyncTimestamp": "Baileys bookkeeping",
    "myAppStateKeyId": "whatsmeow picks the newest app-state sync key itself",
    "lastPropHash": "Baileys' cache of server properties; whatsmeow fetches them again",
    "additionalData": "Baileys' free-form field",
}
_KIND_UNMAPPED = {
    "device-list": "whatsmeow asks the server for device lists (usync) and keeps them in memory",
    "sender-key-memory": "whatsmeow has no record of who received our group sender keys; it sends them again",
}


@dataclass
class Device:
    jid: str
    lid: str | None
    registration_id: int
    noise_key: bytes
    identity_key: bytes
    identity_public: bytes
    signed_pre_key: bytes
    signed_pre_key_id: int
    signed_pre_key_sig: bytes
    adv_key: bytes
    adv_details: bytes
    adv_account_sig: bytes
    adv_account_sig_key: bytes
    adv_device_sig: bytes
    platform: str
    push_name: str


@dataclass
class Conversion:
    device: Device
    creds_sha256: str
    layout: str = "6"
    pre_keys: list[tuple[int, bytes, bool]] = field(default_factory=list)
    identities: dict[str, bytes] = field(default_factory=dict)
    sessions: dict[str, bytes] = field(default_factory=dict)
    session_states: int = 0
    sender_keys: list[tuple[str, str, bytes]] = field(default_factory=list)
    app_state_sync_keys: list[tuple[bytes, bytes, int, bytes]] = field(default_factory=list)
    app_state_versions: list[tuple[str, int, bytes, list[tuple[bytes, bytes]]]] = field(default_factory=list)
    lid_map: dict[str, str] = field(default_factory=dict)  # LID user -> phone user
    privacy_tokens: list[tuple[str, bytes, int, int | None]] = field(default_factory=list)
    key_pairs: int = 0
    signatures: int = 0
    unmapped: list[Unmapped] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def counts(self) -> dict[str, int]:
        return {
            "pre_keys": len(self.pre_keys),
            "pre_keys_uploaded": sum(1 for _, _, up in self.pre_keys if up),
            "sessions": len(self.sessions),
            "session_states": self.session_states,
            "identity_keys": len(self.identities),
            "sender_keys": len(self.sender_keys),
            "app_state_sync_keys": len(self.app_state_sync_keys),
            "app_state_versions": len(self.app_state_versions),
            "lid_mappings": len(self.lid_map),
            "privacy_tokens": len(self.privacy_tokens),
        }


def convert(snapshot: Snapshot) -> Conversion:
    """Convert a snapshot; raise Refused (malformed_source, key_mismatch, not_paired) if it cannot be."""
    creds_file = snapshot.files["creds.json"]
    with _reading(snapshot, creds_file):
        creds = _json(creds_file)
        if not isinstance(creds, Mapping):
            raise ValueError("it is not a JSON object")
        conversion = Conversion(_device(creds, snapshot, creds_file), creds_file.sha256)
        conversion.key_pairs = 3
        conversion.signatures = 3
    _creds_leftovers(creds, conversion)
    _own_identity(creds, conversion)
    _pre_keys(creds, snapshot, conversion)
    _identity_keys(snapshot, conversion)
    _sessions(snapshot, conversion)
    _sender_keys(snapshot, conversion)
    _app_state_sync_keys(snapshot, conversion)
    _app_state_versions(snapshot, conversion)
    _lid_mappings(snapshot, conversion)
    _privacy_tokens(snapshot, conversion)
    for kind, reason in _KIND_UNMAPPED.items():
        files = snapshot.of_kind(kind)
        if files:
            conversion.unmapped.append(Unmapped(f"{kind}-*.json ({len(files)} files)", reason))
    for f in snapshot.files.values():
        if f.kind is None:
            conversion.unmapped.append(Unmapped(f.name, "not a file Baileys' multi-file auth state writes"))
    for name, why in snapshot.others:
        conversion.unmapped.append(Unmapped(name, why))
    if any(snapshot.of_kind(kind) for kind in _BAILEYS_7_KINDS):
        conversion.layout = "7"
    return conversion


@contextmanager
def _reading(snapshot: Snapshot, f: SourceFile) -> Iterator[None]:
    """Turn a problem in one file into a refusal that names the file."""
    path = snapshot.directory / f.name
    try:
        yield
    except KeyProblem as exc:
        raise Refused(ErrorCode.KEY_MISMATCH, f"{path}: {exc}; the folder is damaged, so nothing was imported") from None
    except (ValueError, TypeError, KeyError) as exc:
        raise Refused(ErrorCode.MALFORMED_SOURCE, f"{path}: {exc}") from None


def _json(f: SourceFile) -> Any:
    try:
        return json.loads(f.data)
    except UnicodeDecodeError:
        raise ValueError("it is not UTF-8 text") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"it is not complete JSON ({exc.msg} at byte {exc.pos} of {f.size}); "
                         "is it truncated?") from None


def _pair(value: Any, what: str) -> tuple[bytes, bytes]:
    if not isinstance(value, Mapping):
        raise ValueError(f"{what} is missing")
    private = sized(value.get("private"), f"{what} private key", 32)
    public = as_bytes(value.get("public"), f"{what} public key")
    check_pair(what, private, public)
    return private, djb_public(public, what)


def _device(creds: Mapping[str, Any], snapshot: Snapshot, f: SourceFile) -> Device:
    me = creds.get("me")
    account = creds.get("account")
    path = snapshot.directory / f.name
    if not isinstance(me, Mapping) or not me.get("id") or not isinstance(account, Mapping):
        raise Refused(ErrorCode.NOT_PAIRED, f"{path} holds no paired account (no me.id or account): Baileys never "
                      "finished pairing, so there is nothing to move; pair this company with a QR code instead")
    jid = me.get("id")
    if not isinstance(jid, str) or not (m := _PN_JID.fullmatch(jid)) or int(m.group(2)) == 0:
        raise ValueError(f"me.id {jid!r} is not a linked device's JID (like 5511999990000:12@s.whatsapp.net)")
    lid = me.get("lid")
    if lid is not None and (not isinstance(lid, str) or not _LID_JID.fullmatch(lid)):
        raise ValueError(f"me.lid {lid!r} is not a LID (like 123456789012345:12@lid)")
    noise, _ = _pair(creds.get("noiseKey"), "the noise key")
    identity, identity_public = _pair(creds.get("signedIdentityKey"), "the identity key")
    spk = creds.get("signedPreKey")
    if not isinstance(spk, Mapping):
        raise ValueError("signedPreKey is missing")
    spk_private, spk_public = _pair(spk.get("keyPair"), "the signed pre-key")
    spk_sig = sized(spk.get("signature"), "the signed pre-key signature", 64)
    if not xeddsa_verify(identity_public, bytes([5]) + spk_public, spk_sig):
        raise KeyProblem("the signed pre-key's signature does not verify with the identity key")
    details = as_bytes(account.get("details"), "account.details")
    account_sig = sized(account.get("accountSignature"), "account.accountSignature", 64)
    account_key = sized(account.get("accountSignatureKey"), "account.accountSignatureKey", 32)
    device_sig = sized(account.get("deviceSignature"), "account.deviceSignature", 64)
    if not details:
        raise ValueError("account.details is empty")
    if not any(xeddsa_verify(account_key, p + details + identity_public, account_sig) for p in _ADV_ACCOUNT_PREFIXES):
        raise KeyProblem("the account signature does not verify with the phone's key for this device's identity key")
    if not xeddsa_verify(identity_public, _ADV_DEVICE_PREFIX + details + identity_public + account_key, device_sig):
        raise KeyProblem("the device signature does not verify with the identity key")
    adv_key = as_bytes(creds.get("advSecretKey"), "advSecretKey")
    if not adv_key:
        raise ValueError("advSecretKey is empty")
    platform = creds.get("platform") or ""
    name = me.get("name") or ""
    if not isinstance(platform, str) or not isinstance(name, str):
        raise ValueError("platform or me.name is not text")
    return Device(
        jid=jid, lid=lid, registration_id=as_int(creds.get("registrationId"), "registrationId"),
        noise_key=noise, identity_key=identity, identity_public=identity_public,
        signed_pre_key=spk_private, signed_pre_key_id=as_int(spk.get("keyId"), "signedPreKey.keyId", 0, _MAX_PRE_KEY_ID),
        signed_pre_key_sig=spk_sig, adv_key=adv_key, adv_details=details, adv_account_sig=account_sig,
        adv_account_sig_key=account_key, adv_device_sig=device_sig, platform=platform, push_name=name,
    )


def _creds_leftovers(creds: Mapping[str, Any], conversion: Conversion) -> None:
    for key in creds:
        if key in _CREDS_MAPPED:
            continue
        reason = _CREDS_UNMAPPED.get(key, "not a field this importer knows; left out")
        conversion.unmapped.append(Unmapped(f"creds.json: {key}", reason))


def _user(jid: str) -> str:
    return jid.split("@", 1)[0].split(":", 1)[0]


def _own_identity(creds: Mapping[str, Any], conversion: Conversion) -> None:
    """The primary phone's identity key, as whatsmeow records it when pairing (and the own LID)."""
    device = conversion.device
    conversion.identities[f"{_user(device.jid)}:0"] = device.adv_account_sig_key
    if device.lid:
        conversion.identities[f"{_user(device.lid)}_1:0"] = device.adv_account_sig_key
        conversion.lid_map[_user(device.lid)] = _user(device.jid)
    for entry in creds.get("signalIdentities") or []:
        try:
            key = as_bytes(entry["identifierKey"], "signalIdentities[].identifierKey")
        except (KeyError, TypeError, ValueError):
            conversion.warnings.append("creds.json: a signalIdentities entry is unreadable; ignored")
            continue
        if djb_public(key, "signalIdentities[].identifierKey") != device.adv_account_sig_key:
            conversion.warnings.append("creds.json: signalIdentities names a key other than the account "
                                       "signature key; the account signature key was imported")


def _pre_keys(creds: Mapping[str, Any], snapshot: Snapshot, conversion: Conversion) -> None:
    with _reading(snapshot, snapshot.files["creds.json"]):
        next_id = as_int(creds.get("nextPreKeyId", 1), "nextPreKeyId", 1, _MAX_PRE_KEY_ID + 1)
        first_unuploaded = as_int(creds.get("firstUnuploadedPreKeyId", 1), "firstUnuploadedPreKeyId", 1, _MAX_PRE_KEY_ID + 1)
    seen: set[int] = set()
    for f in snapshot.of_kind("pre-key"):
        with _reading(snapshot, f):
            key_id = as_int(f.key, "the pre-key id in the file name", 0, _MAX_PRE_KEY_ID)
            private, _ = _pair(_json(f), f"pre-key {key_id}")
            conversion.pre_keys.append((key_id, private, key_id < first_unuploaded))
            conversion.key_pairs += 1
            seen.add(key_id)
    newest = next_id - 1
    if newest >= 1 and newest not in seen and newest < first_unuploaded:
        # whatsmeow numbers new pre-keys from MAX(key_id) + 1. The newest ids were uploaded and
        # used up, so the server may still hand them out: a placeholder row (marked uploaded, so
        # never uploaded again) keeps whatsmeow from reusing them for a different key.
        conversion.pre_keys.append((newest, X25519PrivateKey.generate().private_bytes_raw(), True))
        conversion.warnings.append(f"pre-keys up to {newest} were used up; a placeholder row with id {newest} keeps "
                                   "whatsmeow from giving those ids to new keys")
    conversion.pre_keys.sort()


def _address(name: str) -> str:
    """libsignal-node's address "user.device" (user may carry a domain, "user_1") → Go's "user:device"."""
    m = _ADDRESS.fullmatch(name)
    if not m:
        raise ValueError(f"{name!r} in the file name is not a Signal address (user.device)")
    return f"{m.group(1)}:{m.group(2)}"


def _maybe_buffer_json(value: Any, what: str) -> Any:
    """Baileys 7 stores some records as a Buffer of their JSON text; unwrap that."""
    if isinstance(value, Mapping) and value.get("type") == "Buffer":
        try:
            return json.loads(as_bytes(value, what))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise ValueError(f"{what} is a Buffer that does not hold JSON") from None
    return value


def _identity_keys(snapshot: Snapshot, conversion: Conversion) -> None:
    for f in snapshot.of_kind("identity-key"):
        with _reading(snapshot, f):
            their_id = _address(f.key)
            conversion.identities[their_id] = djb_public(as_bytes(_json(f), "the identity key"), "the identity key")


def _sessions(snapshot: Snapshot, conversion: Conversion) -> None:
    device = conversion.device
    for f in snapshot.of_kind("session"):
        with _reading(snapshot, f):
            their_id = _address(f.key)
            record = _maybe_buffer_json(_json(f), "the session record")
            if not isinstance(record, Mapping):
                raise ValueError("the session record is not a JSON object")
            result = convert_session(record, device.identity_public, device.registration_id, f.name)
        conversion.key_pairs += result.key_pairs
        conversion.warnings.extend(result.dropped)
        if result.record is None or result.remote_identity is None:
            conversion.unmapped.append(Unmapped(f.name, "no open session state to continue"))
            continue
        conversion.sessions[their_id] = result.record
        conversion.session_states += result.states
        known = conversion.identities.get(their_id)
        if known is not None and known != result.remote_identity:
            conversion.warnings.append(f"{f.name}: the identity-key file and the open session disagree on "
                                       f"{their_id}'s identity; the session's key was imported")
        conversion.identities[their_id] = result.remote_identity


def _sender_keys(snapshot: Snapshot, conversion: Conversion) -> None:
    for f in snapshot.of_kind("sender-key"):
        with _reading(snapshot, f):
            # SenderKeyName "group::user::device", with ":" written "-" in the file name
            parts = f.key.rsplit("--", 2)
            if len(parts) != 3 or not parts[0].endswith("@g.us"):
                raise ValueError(f"{f.key!r} in the file name is not group--user--device")
            group, user, device = parts
            sender = _address(f"{user}.{device}")
            converted = convert_sender_key(_maybe_buffer_json(_json(f), "the sender key record"), f.name)
        conversion.key_pairs += converted.key_pairs
        conversion.sender_keys.append((group, sender, converted.record))


def fingerprint_proto(value: Any) -> bytes:
    """The protobuf bytes of an AppStateSyncKeyFingerprint {rawID=1, currentIndex=2, deviceIndexes=3 packed},
    as whatsmeow stores it (proto.Marshal of the fingerprint the phone sent)."""
    if not isinstance(value, Mapping):
        raise ValueError("fingerprint is missing")

    def varint(n: int) -> bytes:
        out = bytearray()
        while True:
            byte = n & 0x7F
            n >>= 7
            out.append(byte | (0x80 if n else 0))
            if not n:
                return bytes(out)

    out = bytearray()
    if value.get("rawId") is not None:
        out += b"\x08" + varint(as_int(value["rawId"], "fingerprint.rawId"))
    if value.get("currentIndex") is not None:
        out += b"\x10" + varint(as_int(value["currentIndex"], "fingerprint.currentIndex"))
    indexes = value.get("deviceIndexes") or []
    if indexes:
        packed = b"".join(varint(as_int(i, "fingerprint.deviceIndexes[]")) for i in indexes)
        out += b"\x1a" + varint(len(packed)) + packed
    return bytes(out)


def _app_state_sync_keys(snapshot: Snapshot, conversion: Conversion) -> None:
    for f in snapshot.of_kind("app-state-sync-key"):
        with _reading(snapshot, f):
            try:
                key_id = base64.b64decode(f.key.replace("__", "/"), validate=True)
            except (binascii.Error, ValueError):
                raise ValueError(f"{f.key!r} in the file name is not a base64 key id") from None
            value = _json(f)
            if not isinstance(value, Mapping):
                raise ValueError("it is not a JSON object")
            key_data = as_bytes(value.get("keyData"), "keyData")
            if not key_data:
                raise ValueError("keyData is empty")
            timestamp = as_int(value.get("timestamp", 0), "timestamp", 0, 2**63 - 1)
            conversion.app_state_sync_keys.append((key_id, key_data, timestamp, fingerprint_proto(value.get("fingerprint"))))


def _app_state_versions(snapshot: Snapshot, conversion: Conversion) -> None:
    for f in snapshot.of_kind("app-state-sync-version"):
        try:
            if f.key not in _APP_STATE_NAMES:
                raise ValueError(f"{f.key!r} is not an app-state collection whatsmeow knows")
            value = _json(f)
            if not isinstance(value, Mapping):
                raise ValueError("it is not a JSON object")
            version = as_int(value.get("version"), "version", 1, 2**63 - 1)
            hash_ = as_bytes(value.get("hash"), "hash")
            if len(hash_) != 128:
                raise ValueError(f"hash is {len(hash_)} bytes, not 128")
            macs = []
            for index_mac_b64, entry in (value.get("indexValueMap") or {}).items():
                index_mac = base64.b64decode(index_mac_b64, validate=True)
                value_mac = as_bytes(entry.get("valueMac") if isinstance(entry, Mapping) else None, "valueMac")
                if len(index_mac) != 32 or len(value_mac) != 32:
                    raise ValueError("an index or value MAC is not 32 bytes")
                macs.append((index_mac, value_mac))
        except (ValueError, TypeError, binascii.Error) as exc:
            conversion.unmapped.append(Unmapped(f.name, f"{exc}; whatsmeow fetches this collection again in full"))
            continue
        conversion.app_state_versions.append((f.key, version, hash_, macs))


def _lid_mappings(snapshot: Snapshot, conversion: Conversion) -> None:
    pairs: list[tuple[str, str, str]] = []  # (lid, pn, file)
    for f in snapshot.of_kind("lid-mapping"):
        try:
            value = _json(f)
            if not isinstance(value, str) or not value.isdigit():
                raise ValueError(f"the mapped user {value!r} is not digits")
            if f.key.endswith("_reverse"):
                lid, pn = f.key.removesuffix("_reverse"), value
            else:
                pn, lid = f.key, value
            if not (lid.isdigit() and pn.isdigit()):
                raise ValueError(f"{f.key!r} in the file name is not a user number")
        except ValueError as exc:
            conversion.unmapped.append(Unmapped(f.name, f"{exc}; whatsmeow learns LID mappings again from the server"))
            continue
        pairs.append((lid, pn, f.name))
    pn_taken = {pn: lid for lid, pn in conversion.lid_map.items()}
    for lid, pn, name in pairs:
        if conversion.lid_map.get(lid, pn) != pn or pn_taken.get(pn, lid) != lid:
            conversion.warnings.append(f"{name}: conflicts with another LID mapping; the first one was kept")
            continue
        conversion.lid_map[lid] = pn
        pn_taken[pn] = lid


def _privacy_tokens(snapshot: Snapshot, conversion: Conversion) -> None:
    for f in snapshot.of_kind("tctoken"):
        try:
            if not _USER_JID.fullmatch(f.key):
                raise ValueError("the file name does not name a user's JID (Baileys' own index, or a device JID)")
            value = _json(f)
            if not isinstance(value, Mapping):
                raise ValueError("it is not a JSON object")
            token = as_bytes(value.get("token"), "token")
            if not token or value.get("timestamp") is None:
                raise ValueError("it has no token or no timestamp")
            timestamp = as_int(value.get("timestamp"), "timestamp", 0, 2**63 - 1)
            sender = value.get("senderTimestamp")
            sender_ts = None if sender is None else as_int(sender, "senderTimestamp", 0, 2**63 - 1)
        except ValueError as exc:
            conversion.unmapped.append(Unmapped(f.name, f"{exc}; whatsmeow asks for privacy tokens again"))
            continue
        conversion.privacy_tokens.append((f.key, token, timestamp, sender_ts))

