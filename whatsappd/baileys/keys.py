"""Key checks: every private key against the public key Baileys stored, and the signatures.

whatsmeow keeps only private keys and rebuilds each public key from it (X25519 with the base
point), so a private key that does not match what the WhatsApp server knows would give a store
that looks fine and never logs in, or ratchets that never decrypt. Every pair is therefore
checked before anything is written. Signatures are XEdDSA (libsignal's "curve25519 sign"):
the Montgomery public key is turned into an Ed25519 one and verified with Ed25519.

The arithmetic comes from `cryptography` (PyCA): X25519 and Ed25519 from OpenSSL, never a
hand-written curve.
"""

from __future__ import annotations

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

__all__ = ["DJB_TYPE", "KeyProblem", "check_pair", "djb_public", "x25519_public", "xeddsa_verify"]

DJB_TYPE = 0x05  # libsignal's type byte in front of a 32-byte Curve25519 public key
_P = 2**255 - 19


class KeyProblem(ValueError):
    """A key or signature that is not what it must be; the message names it and says how."""


def x25519_public(private: bytes) -> bytes:
    """The X25519 public key of a 32-byte private key (clamped as X25519 always does)."""
    return X25519PrivateKey.from_private_bytes(private).public_key().public_bytes_raw()


def djb_public(key: bytes, what: str) -> bytes:
    """The 32 raw bytes of a public key stored as 0x05 + 32 bytes (libsignal) or as 32 bytes."""
    if len(key) == 33 and key[0] == DJB_TYPE:
        return key[1:]
    if len(key) == 32:
        return key
    raise KeyProblem(f"{what} is {len(key)} bytes; a Curve25519 public key is 32 (or 33 with the 0x05 type byte)")


def check_pair(what: str, private: bytes, public: bytes) -> None:
    """Raise KeyProblem unless private is 32 bytes and its X25519 public key is public."""
    if len(private) != 32:
        raise KeyProblem(f"the private key of {what} is {len(private)} bytes, not 32")
    if x25519_public(private) != djb_public(public, f"the public key of {what}"):
        raise KeyProblem(f"the private key of {what} does not match its public key")


def xeddsa_verify(public: bytes, message: bytes, signature: bytes) -> bool:
    """True if signature is a valid XEdDSA signature of message by the Curve25519 key public."""
    if len(signature) != 64:
        return False
    u = int.from_bytes(djb_public(public, "the signing key"), "little") & ((1 << 255) - 1)
    if (u + 1) % _P == 0:
        return False
    # The birational map from Montgomery u to Edwards y: y = (u - 1) / (u + 1).
    y = (u - 1) * pow(u + 1, _P - 2, _P) % _P
    edwards = bytearray(y.to_bytes(32, "little"))
    edwards[31] = (edwards[31] & 0x7F) | (signature[63] & 0x80)  # the sign bit travels in the signature
    plain = bytearray(signature)
    plain[63] &= 0x7F
    try:
        Ed25519PublicKey.from_public_bytes(bytes(edwards)).verify(bytes(plain), message)
    except (InvalidSignature, ValueError):
        return False
    return True
