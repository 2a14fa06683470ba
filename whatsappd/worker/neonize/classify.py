"""whatsmeow's failures in our terms: error texts and ConnectFailure reasons -> codes and exits.

neonize hands whatsmeow's errors over as text only (SendMessageError(str) and the like); the
patterns below are whatsmeow's own wording, each found in the shipped .so (docs/neonize-notes.md).
"""

from __future__ import annotations

import re

from whatsappd.errors import ErrorCode
from whatsappd.protocol import ExitCode
from whatsappd.worker.neonize.lib import ConnectFailureReason

__all__ = [
    "classify_download_error",
    "is_upgrade_race",
    "classify_send_error",
    "connect_failure_exit",
    "is_not_connected",
    "is_store_error",
]

# A NeonizeError from connect() that names the database, not the network.
_STORE_ERROR = re.compile(
    r"upgrade database|open database|not a database|malformed|unable to open|no such table|"
    r"failed to scan|database corrupt|disk I/O error",
    re.IGNORECASE,
)

# What only a damaged store says (even inside a failed upgrade).
_DAMAGED = re.compile(r"not a database|malformed|database corrupt|disk I/O error|unable to open", re.IGNORECASE)

_REASON = ConnectFailureReason
_LOGGED_OUT_REASONS = frozenset(
    {_REASON.Value("LOGGED_OUT"), _REASON.Value("MAIN_DEVICE_GONE"), _REASON.Value("UNKNOWN_LOGOUT")}
)
_BANNED_REASONS = frozenset({_REASON.Value("TEMP_BANNED")})
_OUTDATED_REASONS = frozenset({_REASON.Value("CLIENT_OUTDATED")})

#: (pattern, code, permanent, may_have_reached_whatsapp)
_SEND_ERRORS: tuple[tuple[re.Pattern[str], ErrorCode, bool, bool], ...] = tuple(
    (re.compile(pattern), code, permanent, reached)
    for pattern, code, permanent, reached in (
        # the node was written (or may have been) and no acknowledgement came back
        (r"timed out waiting for message send response", ErrorCode.SEND_INTERRUPTED, True, True),
        (r"websocket disconnected before message send returned response", ErrorCode.SEND_INTERRUPTED, True, True),
        (r"^websocket not connected$", ErrorCode.SEND_INTERRUPTED, True, True),  # retryFrame: resend impossible
        # WhatsApp refuses the number's sending: 463 (a restriction, reported after many sends to new
        # contacts) on the message node, 429 / rate-overlimit on the queries before it. Nothing was
        # taken; the outbox pauses the company (pacing.limit_pause) rather than retry into a ban.
        (r"^server returned error (463|429)\b|rate-overlimit|returned status 429\b",
         ErrorCode.RATE_LIMITED, False, False),
        # rejected before anything was sent
        (r"^no LID found for \S+ from server", ErrorCode.NOT_ON_WHATSAPP, True, False),
        (r"^failed to get group members: (that group does not exist|you're not participating in that group)",
         ErrorCode.INVALID_RECIPIENT, True, False),
        (r"^(message recipient must be a user JID with no device part|can't send message to unknown server|"
         r"sending to non-status broadcast lists)", ErrorCode.INVALID_RECIPIENT, True, False),
        (r"^(client is nil|the store doesn't contain a device JID)", ErrorCode.NOT_CONNECTED, False, False),
        (r"^failed to [^:]+(: [^:]+)*: (websocket not connected|websocket disconnected before info query)",
         ErrorCode.NOT_CONNECTED, False, False),
        (r"^failed to (get|send|encrypt|create|marshal|prepare)\b|^can't encrypt message|^proto:",
         ErrorCode.SEND_FAILED, False, False),
        # the server answered with an error code: it received the message and refused it
        (r"^server returned error \d+", ErrorCode.SEND_FAILED, False, False),
    )
)

_DOWNLOAD_GONE = re.compile(
    r"download failed with status code (403|404|410)|no url present|didn't find any attachments|"
    r"unknown media type|invalid media hmac|hash of media|hash of unencrypted media|file too short|"
    r"does not start with slash|failed to decrypt file|invalid checksum"
)
_NOT_CONNECTED = re.compile(r"websocket not connected|websocket disconnected before|client is nil|"
                            r"the store doesn't contain a device JID")


def is_upgrade_race(message: str) -> bool:
    """Whether a NeonizeError from connect() is whatsmeow's schema upgrade failing for a reason
    other than a damaged file: on PostgreSQL, another client upgrading the same tables at the same
    moment (`pq: duplicate key value ... pg_type_typname_nsp_index`, `relation "whatsmeow_version"
    already exists`). Transient, never a reason to quarantine: the next start finds it done.
    (A SQLite file that is not a database also fails the upgrade: that one is damaged.)"""
    return "failed to upgrade database" in message and _DAMAGED.search(message) is None


def is_store_error(message: str) -> bool:
    """Whether a NeonizeError from connect() is about the store rather than the network (a reason
    to quarantine it). whatsmeow's upgrade race is not: see is_upgrade_race."""
    return _STORE_ERROR.search(message) is not None and "dial" not in message and not is_upgrade_race(message)


def is_not_connected(text: str) -> bool:
    """Whether a failed Go call failed for want of a live connection."""
    return _NOT_CONNECTED.search(text) is not None


def connect_failure_exit(reason: int | None) -> ExitCode:
    """The exit code for a ConnectFailure reason (neonize's enum; None when unset)."""
    if reason in _LOGGED_OUT_REASONS:
        return ExitCode.LOGGED_OUT
    if reason in _BANNED_REASONS:
        return ExitCode.BANNED
    if reason in _OUTDATED_REASONS:
        return ExitCode.OUTDATED
    return ExitCode.TRANSIENT


def classify_send_error(text: str) -> tuple[ErrorCode, bool, bool]:
    """(code, permanent, may_have_reached_whatsapp) for a SendMessageError's text.

    Anything not known to have happened before the message node left is treated as possibly
    delivered: the message then fails with send_interrupted rather than risk a duplicate.
    """
    for pattern, code, permanent, reached in _SEND_ERRORS:
        if pattern.search(text):
            return code, permanent, reached
    return ErrorCode.SEND_INTERRUPTED, True, True


def classify_download_error(text: str) -> tuple[ErrorCode, bool]:
    """(code, permanent) for a DownloadError's text."""
    if _DOWNLOAD_GONE.search(text):
        return ErrorCode.MEDIA_UNAVAILABLE, True
    if is_not_connected(text):
        return ErrorCode.NOT_CONNECTED, False
    return ErrorCode.DOWNLOAD_FAILED, False
