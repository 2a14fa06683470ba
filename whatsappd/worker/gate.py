"""The connect gate: every connection attempt of a worker spends one token of the supervisor's
global connect-rate limiter, including the library's own reconnects after a live drop.

The supervisor takes a token before it spawns a worker, so each worker starts holding one: its
first attempt goes at once. Every later attempt in the same process (whatsmeow's automatic
reconnect, the 515 reconnect after pairing, the simulator's model of both) asks for a new one
with a `connect_request` message and waits for the `connect_grant`. When many connected
companies lose the network together, their reconnects are therefore paced exactly like a
restore at daemon start: first come, first served, at `reconnect.connect_rate`.

Thread-safe: engines wait in their own threads, the channel thread grants.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

__all__ = ["ConnectGate"]

log = logging.getLogger(__name__)


class ConnectGate:
    def __init__(self, request: Callable[[], None] | None, tokens: int = 1, company: str | None = None) -> None:
        """request() asks the supervisor for one token (None: never ask, every attempt goes at
        once, for an engine run without a supervisor, as in unit tests)."""
        self._request = request
        self._company = company
        self._tokens = tokens
        self._cond = threading.Condition()
        self._requested = False
        self._closed = False
        self.attempts = 0  # attempts let through so far
        self.waited = 0.0  # seconds spent waiting for grants, in all

    @classmethod
    def unlimited(cls) -> ConnectGate:
        return cls(None)

    def acquire(self, what: str = "connect") -> bool:
        """Wait until this attempt may start (one token spent); False if the gate was closed
        (the worker is ending): then the attempt must not be made."""
        started = time.monotonic()
        with self._cond:
            while self._request is not None and self._tokens == 0 and not self._closed:
                if not self._requested:
                    self._requested = True
                    self._request()
                self._cond.wait()
            if self._closed:
                return False
            if self._request is not None:
                self._tokens -= 1
            self.attempts += 1
            attempt = self.attempts
            waited = time.monotonic() - started
            self.waited += waited
        # Any thread may get here, and contextvars do not cross threads: name the company.
        log.info("connection attempt", extra={"company": self._company, "attempt": attempt, "kind": what,
                                              "waited_seconds": round(waited, 3)})
        return True

    def grant(self) -> None:
        """The supervisor's answer to a request: one token."""
        with self._cond:
            self._tokens += 1
            self._requested = False
            self._cond.notify_all()

    def close(self) -> None:
        """No attempt may start any more; waiters get False."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    @property
    def closed(self) -> bool:
        return self._closed
