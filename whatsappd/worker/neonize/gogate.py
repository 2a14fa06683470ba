"""Who may call into Go now: messaging calls together, Stop/Logout/PairPhone alone."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

__all__ = ["GoGate"]


class GoGate:
    """A reader-writer gate with writer preference over neonize's Go calls.

    Go keeps neonize's clients in maps without locks: ``Stop()`` deletes from them while any
    other call reads them, and a call on a removed id dereferences nil. A waiting exclusive
    holder keeps new shared holders out, so a stop is never starved by a stream of sends.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._shared = 0
        self._exclusive = False
        self._waiting = 0

    def acquire_shared(self, timeout: float | None = None) -> bool:
        with self._cond:
            if not self._cond.wait_for(lambda: not self._exclusive and not self._waiting, timeout):
                return False
            self._shared += 1
            return True

    def release_shared(self) -> None:
        with self._cond:
            self._shared -= 1
            self._cond.notify_all()

    def acquire_exclusive(self, timeout: float | None = None) -> bool:
        with self._cond:
            self._waiting += 1
            try:
                ok = self._cond.wait_for(lambda: not self._exclusive and not self._shared, timeout)
            finally:
                self._waiting -= 1
            if ok:
                self._exclusive = True
            self._cond.notify_all()
            return ok

    def release_exclusive(self) -> None:
        with self._cond:
            self._exclusive = False
            self._cond.notify_all()

    @contextlib.contextmanager
    def exclusive(self) -> Iterator[None]:
        self.acquire_exclusive()
        try:
            yield
        finally:
            self.release_exclusive()
