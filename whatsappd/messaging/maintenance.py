"""Outbox and journal upkeep, once a second: expiry, unsettleable sends, pruning.

- Queued messages past their ttl become `expired` (each with its message.status event).
- A message left `sending` past its ttl, with no send under way, belongs to a company that never
  came back to settle it from the worker's send log: its fate is unknown, so it is reported
  `failed` (send_interrupted), never resent.
- The journal is pruned by age and size at start, then at most once a minute.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from whatsappd.logs import get_logger
from whatsappd.store import StorageFull, StoreBackend

if TYPE_CHECKING:
    from whatsappd.config import Config

__all__ = ["Maintenance"]

log = get_logger()

#: Seconds between two rounds.
INTERVAL = 1.0
#: Seconds between two prunes of the journal.
PRUNE_INTERVAL = 60.0


class Maintenance:
    def __init__(self, store: StoreBackend, busy: Callable[[], frozenset[str]], config: Callable[[], Config]) -> None:
        self.store = store
        self._busy = busy  # the message ids a sender is sending right now
        self._config = config  # the daemon's current configuration (reloadable)
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="maintenance")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _run(self) -> None:
        last_prune: float | None = None  # None: prune at start, then at most once a minute
        while True:
            try:
                await self.store.expire()
                await self.store.fail_stale_sending(time.time(), self._busy())
                if last_prune is None or time.monotonic() - last_prune > PRUNE_INTERVAL:
                    last_prune = time.monotonic()
                    config = self._config()
                    pruned = await self.store.prune(config.journal_max_age, config.journal_max_events)
                    if pruned:
                        log.info("journal pruned", events=pruned)
            except asyncio.CancelledError:
                raise
            except StorageFull:
                pass  # the store logged it, once; the next round tries again
            except Exception:
                log.exception("maintenance failed")
            await asyncio.sleep(INTERVAL)
