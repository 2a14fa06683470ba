"""Pairing a new device: whatsmeow's QR timings, what the QR loop's outcome means, and the two
calls that link or unlink a device (a phone code, a logout)."""

from __future__ import annotations

from typing import Any

from whatsappd.errors import ErrorCode
from whatsappd.protocol import EngineError, ExitCode
from whatsappd.worker.neonize.lib import ClientName, LogoutError, PairPhoneError

__all__ = [
    "CONNECTED_AFTER_PAIR_SECONDS",
    "FIRST_QR_SECONDS",
    "NEXT_QR_SECONDS",
    "PAIRING_DEADLINE_SECONDS",
    "QR_WINDOW_SECONDS",
    "login_failure",
    "pair_code",
    "qr_lifetime",
    "unlink",
]

FIRST_QR_SECONDS = 60  # whatsmeow: the first of 6 codes lives 60 s ...
NEXT_QR_SECONDS = 20  # ... the 5 others 20 s each
QR_WINDOW_SECONDS = FIRST_QR_SECONDS + 5 * NEXT_QR_SECONDS  # 160 s, then the socket is closed
PAIRING_DEADLINE_SECONDS = 170  # our own deadline in case the "timeout" status never comes
CONNECTED_AFTER_PAIR_SECONDS = 30  # pairing succeeded but no Connected: restart the worker


def qr_lifetime(index: int) -> int:
    """Seconds the index-th QR code (1 for the first) is valid."""
    return FIRST_QR_SECONDS if index == 1 else NEXT_QR_SECONDS


def login_failure(status: str, elapsed: float | None) -> tuple[ExitCode, str] | None:
    """How the QR loop's outcome other than "success" ends the worker: (exit code, reason), or
    None for a status that only gets logged. elapsed: seconds since the first QR code."""
    if status == "timeout":
        if elapsed is not None and elapsed >= QR_WINDOW_SECONDS - 10:
            return ExitCode.PAIRING_TIMEOUT, "qr_timeout"
        return ExitCode.TRANSIENT, "disconnected_while_pairing"  # the server closed the socket early
    return {
        "err-client-outdated": (ExitCode.OUTDATED, "client_outdated"),
        "err-unexpected-state": (ExitCode.TRANSIENT, "pairing_unexpected_state"),
        "error": (ExitCode.TRANSIENT, "pairing_error"),
    }.get(status)


def pair_code(client: Any, phone: str) -> str:
    """Ask WhatsApp for a phone code that links this device to phone; pair_phone_failed."""
    try:
        return str(client.PairPhone(phone, True, ClientName.LINUX))
    except PairPhoneError as exc:
        raise EngineError(ErrorCode.PAIR_PHONE_FAILED, f"WhatsApp refused the phone-code pairing: {exc}") from exc


def unlink(client: Any, log: Any) -> None:
    """Log the device out on WhatsApp's side; logout_failed unless it is unlinked."""
    try:
        client.logout()
    except LogoutError as exc:
        message = str(exc)
        # whatsmeow unlinks on the server first, then deletes its rows: a failure of the
        # second step still leaves the device unlinked
        if not message.startswith("error deleting data from store"):
            raise EngineError(ErrorCode.LOGOUT_FAILED, f"WhatsApp did not confirm the logout: {message}") from exc
        log.warning("logout_store_cleanup_failed", error=message)
