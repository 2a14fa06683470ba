"""Every error code a client can receive, with its HTTP status and meaning; the errors that carry one.

Clients script against the codes, never the messages. The code is chosen where the fault is
known (a handler, the supervisor, an engine inside a worker); its HTTP status comes from this
table, once, at the HTTP edge. `/v1/openapi.json` lists the codes of each operation from here,
and a test walks this enum against the served document.
"""

from __future__ import annotations

import enum
from typing import Any

__all__ = ["CODES", "IMPORT_REFUSALS", "ApiError", "ErrorCode", "Failure"]


class ErrorCode(enum.StrEnum):
    """A stable snake_case code, the HTTP status it is answered with, and what it means."""

    status: int
    meaning: str

    def __new__(cls, value: str, status: int, meaning: str) -> ErrorCode:
        member = str.__new__(cls, value)
        member._value_ = value
        member.status = status
        member.meaning = meaning
        return member

    # The request itself.
    BAD_REQUEST = "bad_request", 400, "The request is not valid HTTP or not what the route takes."
    INVALID_JSON = "invalid_json", 400, "The body is not a JSON value this API accepts (syntax, depth, NaN)."
    INVALID_COMPANY_ID = "invalid_company_id", 400, "The company id does not match ^[a-z0-9][a-z0-9_-]{0,63}$."
    INVALID_PHONE = "invalid_phone", 400, "The phone number cannot be read as an international number."
    INVALID_RECIPIENT = "invalid_recipient", 400, "The recipient is neither a phone number nor a JID."
    INVALID_MESSAGE = "invalid_message", 400, "The message body is malformed (kind, text, media, ttl...)."
    UNREADABLE_FILE = "unreadable_file", 400, "A media path is outside outbox.media_dirs, a link, or not a readable file."
    FORBIDDEN = "forbidden", 403, "This uid may not use the API (allowed_uids / allowed_groups)."
    NOT_FOUND = "not_found", 404, "No such route."
    COMPANY_NOT_FOUND = "company_not_found", 404, "No company with this id."
    MESSAGE_NOT_FOUND = "message_not_found", 404, "No message with this id for this company."
    MEDIA_NOT_FOUND = "media_not_found", 404, "No media with this id for this company."
    METHOD_NOT_ALLOWED = "method_not_allowed", 405, "The route exists, not with this method."
    REQUEST_TIMEOUT = "request_timeout", 408, "The request body did not arrive in time."
    BODY_TOO_LARGE = "body_too_large", 413, "The body is over control.max_body_size."
    UNSUPPORTED_MEDIA_TYPE = "unsupported_media_type", 415, "The body is not application/json."
    IDEMPOTENCY_KEY_REUSED = "idempotency_key_reused", 422, "The Idempotency-Key was used with another body."
    CONFIG_INVALID = "config_invalid", 422, "The configuration file is invalid; the running one stays in force."
    SINCE_EXPIRED = "since_expired", 410, "Events after this cursor were pruned from the journal."
    # The company's state does not allow it now.
    DEFINED_IN_CONFIG = "defined_in_config", 409, "The company (or webhook) is defined in the config file; change it there."
    NO_QR = "no_qr", 409, "No QR code is available now."
    NOT_PAIRING = "not_pairing", 409, "The company is not pairing."
    NOT_RUNNING = "not_running", 409, "The company has no running worker."
    NOT_CONNECTED = "not_connected", 409, "The company is not connected to WhatsApp."
    COMPANY_UNAVAILABLE = "company_unavailable", 409, "The company is logged_out or replaced: it cannot send."
    CURSOR_AHEAD = "cursor_ahead", 409, "The cursor is past the newest event."
    # A command the worker refused or failed.
    INVALID_ARGUMENT = "invalid_argument", 400, "The worker refused an argument of the command."
    UNKNOWN_ACTION = "unknown_action", 400, "No such simulate action."
    UNKNOWN_OP = "unknown_op", 400, "The engine does not offer this command."
    NOT_RECONNECTING = "not_reconnecting", 409, "The simulated network is not down."
    UNKNOWN_MESSAGE = "unknown_message", 409, "The simulator knows no sent message with this id."
    STORE_FAILED = "store_failed", 409, "The engine could not write its session store."
    SEND_LOG_UNUSABLE = "send_log_unusable", 409, "The session's send log cannot be read, so nothing is sent."
    PAIR_PHONE_FAILED = "pair_phone_failed", 409, "WhatsApp refused to give a pairing code."
    CHECK_FAILED = "check_failed", 409, "WhatsApp did not answer whether the number is on WhatsApp."
    MEDIA_UNAVAILABLE = "media_unavailable", 409, "The media of this message can no longer be downloaded."
    DOWNLOAD_FAILED = "download_failed", 409, "Downloading the media failed; it may work later."
    LOGOUT_FAILED = "logout_failed", 409, "WhatsApp did not confirm the logout."
    ENGINE_ERROR = "engine_error", 409, "The worker failed the command in a way it did not classify."
    WORKER_EXITED = "worker_exited", 409, "The worker ended before it answered."
    # A message's failure (the `error.code` of a failed message; also a send's refusal).
    NOT_ON_WHATSAPP = "not_on_whatsapp", 400, "The recipient has no WhatsApp account."
    MEDIA_INVALID = "media_invalid", 400, "The media was refused (type, content)."
    TOO_LARGE = "too_large", 400, "The media is over WhatsApp's limit for its kind."
    SEND_FAILED = "send_failed", 409, "WhatsApp did not take the message; it is retried."
    SEND_IN_PROGRESS = "send_in_progress", 409, "A send of this message is already under way."
    SEND_INTERRUPTED = "send_interrupted", 409, "A send began but its outcome cannot be known; never resent."
    RATE_LIMITED = "rate_limited", 429, ("WhatsApp refused a send as too fast or restricted (463, 429): the "
                                         "company's sending is paused for pacing.limit_pause, the message kept.")
    EXPIRED = "expired", 409, "The message's ttl passed before it could be sent."
    # Moving a company from Baileys (POST /v1/companies/{id}/import-baileys, `whatsappd import-baileys`).
    IMPORT_DISABLED = "import_disabled", 409, "import.baileys_root is not set, so the import route is off."
    WRONG_ENGINE = "wrong_engine", 409, "The company's engine cannot take this (an import needs engine neonize)."
    COMPANY_RUNNING = "company_running", 409, "The company runs (or its worker holds its session lock); stop it first."
    SESSION_EXISTS = "session_exists", 409, "The company already has a whatsappd session; an import never overwrites one."
    SOURCE_BUSY = "source_busy", 409, "A Baileys file changed within the idle time: Baileys may still be running."
    SOURCE_CHANGED = "source_changed", 409, "A Baileys file changed during the import: Baileys may still be running."
    SOURCE_NOT_FOUND = "source_not_found", 404, "The Baileys folder session-{id} does not exist."
    UNREADABLE_SOURCE = "unreadable_source", 422, "The Baileys folder or one of its files cannot be read."
    NOT_BAILEYS = "not_baileys", 422, "The source is not a Baileys folder (no creds.json, a symbolic link, not a directory)."
    NOT_PAIRED = "not_paired", 422, "creds.json holds no paired account (Baileys never finished pairing)."
    MALFORMED_SOURCE = "malformed_source", 422, "A Baileys file is truncated, not Baileys' JSON, or holds a wrong value."
    KEY_MISMATCH = "key_mismatch", 422, "A private key does not match its public key, or a signature does not verify."
    STORE_CHECK_FAILED = "store_check_failed", 422, "The converted store failed SQLite's integrity or foreign key check."
    NEONIZE_CHECK_FAILED = "neonize_check_failed", 422, "neonize could not open the converted store or did not list the expected JID."
    WRITE_FAILED = "write_failed", 500, "The converted store could not be written (permissions, disk); nothing was put in place."
    # Backups (POST /v1/backup).
    BACKUP_FAILED = "backup_failed", 500, "The backup could not be taken (a full disk under STATE_DIR/tmp, an unreadable file)."
    # Webhooks (PUT/GET/DELETE /v1/webhooks/{id}).
    INVALID_WEBHOOK_ID = "invalid_webhook_id", 400, "The webhook id does not match ^[a-z0-9][a-z0-9_-]{0,63}$."
    INVALID_WEBHOOK = "invalid_webhook", 400, "The webhook is malformed (url, secret, events, companies); error.problems lists why."
    WEBHOOK_NOT_FOUND = "webhook_not_found", 404, "No webhook with this id."
    # Several hosts sharing PostgreSQL ([cluster], issue 13).
    NOT_OWNER = "not_owner", 409, "Another host owns the company (holds its lease): the act must run there."
    # Several hosts on one PostgreSQL (issue 13): an act asked on a host that does not own the company.
    NO_OWNER = "no_owner", 503, "No host owns the company now (its lease lapsed); another takes it over shortly: retry."
    OWNER_UNREACHABLE = "owner_unreachable", 504, "The host owning the company did not answer in time (or could not be reached)."
    # The daemon.
    WORKER_TIMEOUT = "worker_timeout", 504, "The worker did not answer in time."
    TOO_MANY_CONNECTIONS = "too_many_connections", 503, "All control connections (or this uid's) are taken."
    STORAGE_FULL = "storage_full", 507, "The disk holding the store is full: nothing was stored."
    INTERNAL_ERROR = "internal_error", 500, "A bug; the daemon's log has the details."

    @classmethod
    def parse(cls, code: object) -> ErrorCode:
        """A code received from a worker; ENGINE_ERROR for one this table does not know."""
        known = cls._value2member_map_.get(code) if isinstance(code, str) else None
        return known if isinstance(known, cls) else cls.ENGINE_ERROR


#: The codes an import from Baileys refuses a company with (whatsappd.baileys: the CLI's --json
#: and POST /v1/companies/{id}/import-baileys alike).
IMPORT_REFUSALS: tuple[ErrorCode, ...] = (
    ErrorCode.INVALID_COMPANY_ID,
    ErrorCode.SOURCE_NOT_FOUND,
    ErrorCode.UNREADABLE_SOURCE,
    ErrorCode.NOT_BAILEYS,
    ErrorCode.NOT_PAIRED,
    ErrorCode.MALFORMED_SOURCE,
    ErrorCode.KEY_MISMATCH,
    ErrorCode.SOURCE_BUSY,
    ErrorCode.SOURCE_CHANGED,
    ErrorCode.COMPANY_RUNNING,
    ErrorCode.SESSION_EXISTS,
    ErrorCode.STORE_CHECK_FAILED,
    ErrorCode.NEONIZE_CHECK_FAILED,
    ErrorCode.WRITE_FAILED,
)

#: code -> HTTP status, for readers that want the plain mapping.
CODES: dict[str, int] = {code.value: code.status for code in ErrorCode}


class Failure(Exception):
    """Something failed with a code: raised by the supervisor, messaging and engines alike.

    `permanent` says whether retrying can help (a send to a bad recipient cannot); it steers the
    outbox and is never part of a response body. The HTTP edge answers any Failure as
    {"error": {"code", "message", ...details}} with the code's status.
    """

    def __init__(self, code: ErrorCode, message: str, permanent: bool = False, **details: Any) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.permanent = permanent
        self.details = details

    @property
    def status(self) -> int:
        return self.code.status

    def body(self) -> dict[str, Any]:
        return {"error": {"code": self.code.value, "message": self.message, **self.details}}


class ApiError(Failure):
    """A Failure found by the HTTP layer itself (a bad request, a missing company)."""
