"""Stable error codes of the control API. Clients script against the codes, never the messages."""

from __future__ import annotations

from typing import Any

__all__ = ["ApiError"]


class ApiError(Exception):
    """An error answered as {"error": {"code", "message", ...details}} with an HTTP status."""

    def __init__(self, status: int, code: str, message: str, permanent: bool = False, **details: Any) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.details = details
        #: For a failed worker command: True if retrying cannot help (not part of the body).
        self.permanent = permanent

    def body(self) -> dict[str, Any]:
        return {"error": {"code": self.code, "message": self.message, **self.details}}


# The codes a client can meet, each with its HTTP status (the OpenAPI document lists them, per
# operation). A worker's failure of a command keeps the worker's code and gets its status here
# (a code missing here would be 409); a test keeps every code the workers raise in this table.
CODES: dict[str, int] = {
    "bad_request": 400,
    "invalid_json": 400,
    "invalid_company_id": 400,
    "forbidden": 403,
    "not_found": 404,
    "company_not_found": 404,
    "method_not_allowed": 405,
    "request_timeout": 408,
    "body_too_large": 413,
    "unsupported_media_type": 415,
    "invalid_phone": 400,
    "defined_in_config": 409,
    "no_qr": 409,
    "not_pairing": 409,
    "not_running": 409,
    "not_connected": 409,
    # Failures the worker reports for a command (pair-code, contacts, media, logout, simulate):
    "invalid_argument": 400,
    "unknown_action": 400,
    "unknown_op": 400,
    "not_reconnecting": 409,
    "unknown_message": 409,
    "store_failed": 409,
    "pair_phone_failed": 409,
    "check_failed": 409,
    "media_unavailable": 409,
    "download_failed": 409,
    "logout_failed": 409,
    "engine_error": 409,
    "invalid_recipient": 400,
    "unreadable_file": 400,
    "invalid_message": 400,
    "idempotency_key_reused": 422,
    "company_unavailable": 409,
    "message_not_found": 404,
    "media_not_found": 404,
    "since_expired": 410,
    "cursor_ahead": 409,
    "config_invalid": 422,
    "worker_timeout": 504,
    "too_many_connections": 503,
    "storage_full": 507,
    "internal_error": 500,
}
