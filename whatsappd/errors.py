"""Stable error codes of the control API. Clients script against the codes, never the messages."""

from __future__ import annotations

from typing import Any

__all__ = ["ApiError"]


class ApiError(Exception):
    """An error answered as {"error": {"code", "message", ...details}} with an HTTP status."""

    def __init__(self, status: int, code: str, message: str, **details: Any) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.details = details

    def body(self) -> dict[str, Any]:
        return {"error": {"code": self.code, "message": self.message, **self.details}}


# The codes a client can meet, each with its HTTP status (the OpenAPI document lists them).
CODES: dict[str, int] = {
    "bad_request": 400,
    "invalid_json": 400,
    "invalid_company_id": 400,
    "forbidden": 403,
    "not_found": 404,
    "company_not_found": 404,
    "method_not_allowed": 405,
    "body_too_large": 413,
    "unsupported_media_type": 415,
    "invalid_phone": 400,
    "defined_in_config": 409,
    "no_qr": 409,
    "not_pairing": 409,
    "not_running": 409,
    "not_connected": 409,
    "config_invalid": 422,
    "worker_timeout": 504,
    "too_many_connections": 503,
    "internal_error": 500,
}
