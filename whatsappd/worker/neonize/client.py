"""The neonize client's life: made with the engine's handlers wired in, dialled through the
relay, and stopped without ever blocking on Go (see the package docstring for why)."""

from __future__ import annotations

import logging
import threading
import time
import urllib.parse
from collections.abc import Callable
from typing import Any

from whatsappd.protocol import ExitCode
from whatsappd.worker.neonize.classify import is_store_error, is_upgrade_race
from whatsappd.worker.neonize.gogate import GoGate
from whatsappd.worker.neonize.lib import NeonizeError, NewClient, ProxySettings, go_log_level
from whatsappd.worker.neonize.store import StorePlace

__all__ = ["SHUTDOWN_SECONDS", "Handlers", "dial", "new_client", "redact_proxy", "shutdown"]

SHUTDOWN_SECONDS = 3.0  # how long run() waits for the Go side to stop before returning anyway

#: (neonize event type, handler(client, event)) pairs.
Handlers = list[tuple[type, Callable[..., None]]]


def redact_proxy(url: str | None) -> str | None:
    """A proxy URL fit for the log: its credentials replaced by ***."""
    if not url:
        return url
    parts = urllib.parse.urlsplit(url)
    if parts.username is None and parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"***@{host}" + (f":{parts.port}" if parts.port else "")
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def new_client(place: StorePlace, company: str, *, whatsmeow_debug: bool, on_qr: Callable[..., None],
               on_login_status: Callable[[Any, Any], None], handlers: Handlers, event_handlers: Handlers,
               log: Any) -> NewClient:
    """A client on the company's store with every handler wired in (not connected yet).

    handlers end the worker if they fail (the caller wraps them); event_handlers are the
    message and receipt handlers, whose failure is only logged.
    """
    if not whatsmeow_debug:
        # whatsmeow logs QR codes and node dumps at debug: never let them out of Go
        level = max(logging.INFO, logging.getLogger("whatsmeow").getEffectiveLevel())
        go_log_level.setLevel(level)
    client = place.client(company)
    finalizer = getattr(client, "_stop_finalizer", None)
    if finalizer is not None:
        finalizer.atexit = False  # Stop() at exit would block while a dial is in progress
    client.event.qr(on_qr)  # also keeps neonize from printing the QR
    if hasattr(client, "_NewClient__onLoginStatus"):
        client._NewClient__onLoginStatus = on_login_status
    else:  # pragma: no cover - a neonize release that renamed it
        log.warning("neonize_login_status_hook_missing")
    for event_type, handler in [*handlers, *event_handlers]:
        client.event(event_type)(handler)
    return client


def dial(client: NewClient, relay_url: str, proxy: str | None, pair: bool, log: Any) -> tuple[ExitCode, str]:
    """Connect (blocks until the Go side stops) and say how that ends the worker."""
    log.info("dialing", proxy=redact_proxy(proxy), pair=pair)
    try:
        client.connect(ProxySettings(proxy_address=relay_url))
    except NeonizeError as exc:
        message = str(exc)
        if is_upgrade_race(message):
            # whatsmeow's schema upgrade raced another client's (PostgreSQL): retried, never quarantined
            log.warning("store_upgrade_race", error=message)
            return ExitCode.TRANSIENT, "store_upgrade_race"
        if is_store_error(message):
            log.error("store_unusable", error=message)
            return ExitCode.STORE_UNUSABLE, "store_unusable"
        log.warning("connect_failed", error=message)
        return ExitCode.TRANSIENT, "connect_failed"
    except Exception:
        log.exception("connect_crashed")
        return ExitCode.TRANSIENT, "connect_crashed"
    return ExitCode.TRANSIENT, "client_ended"


def shutdown(client: Any, connect_thread: threading.Thread, *, socket_up: bool, connect_can_end: bool,
             gate: GoGate, log: Any) -> None:
    """Stop the Go client, waiting at most SHUTDOWN_SECONDS; skip it while the first dial runs.

    connect_can_end: whether connect() can return at all (not after a QR loop that did not
    succeed, which waits forever for a device ID).
    """
    connect_thread.join(0.2)  # a failed connect() is usually finishing right now
    if not connect_thread.is_alive():
        return
    if not socket_up:
        log.info("dial_abandoned")  # Stop() would block until the dial ends
        return
    deadline = time.monotonic() + SHUTDOWN_SECONDS

    def stop_go() -> None:
        if not gate.acquire_exclusive(timeout=SHUTDOWN_SECONDS):
            return  # a send or download still runs in Go: the process ends with os._exit
        try:
            client.stop()
        except Exception:  # noqa: BLE001
            log.debug("neonize_stop_failed", exc_info=True)
        finally:
            gate.release_exclusive()

    stopper = threading.Thread(target=stop_go, name="neonize-stop", daemon=True)
    stopper.start()
    stopper.join(max(0.0, deadline - time.monotonic()))
    if connect_can_end:
        connect_thread.join(max(0.0, deadline - time.monotonic()))
    log.debug("client_shutdown", go_stopped=not stopper.is_alive(), connect_ended=not connect_thread.is_alive())
